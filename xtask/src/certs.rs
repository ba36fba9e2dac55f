//! Demo certificates: a private CA (`ca.crt`), a certificate for Spooky (`spooky.crt`,
//! `spooky.key`) and one for TLS demo backends (`backend.crt`, `backend.key`), all for
//! `localhost`, `127.0.0.1` and `::1`. Existing files are kept (idempotent).
//!
//! This file is also compiled into spooky's integration tests (`#[path]`), so the tests and
//! the quickstart use the very same generator.

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::path::{Path, PathBuf};

const NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Writes the demo CA and certificates into `dir` unless they are all there already.
/// Returns `dir`.
pub fn generate(dir: &Path) -> Result<PathBuf> {
    let files = [
        "ca.crt",
        "spooky.crt",
        "spooky.key",
        "backend.crt",
        "backend.key",
    ];
    if files.iter().all(|f| dir.join(f).is_file()) {
        return Ok(dir.to_path_buf());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Spooky demo CA");
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    write(dir, "ca.crt", &ca_cert.pem())?;
    for (name, cn) in [
        ("spooky", "spooky demo"),
        ("backend", "spooky demo backend"),
    ] {
        let names: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write(dir, &format!("{name}.crt"), &cert.pem())?;
        write(dir, &format!("{name}.key"), &key.serialize_pem())?;
    }
    Ok(dir.to_path_buf())
}

fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))
}
