//! Demo certificates: a private CA (`ca.crt`, `ca.key`), a certificate for Spooky
//! (`spooky.crt`, `spooky.key`) and one for TLS demo backends (`backend.crt`, `backend.key`),
//! all for `localhost`, `127.0.0.1` and `::1`. Existing files are kept (idempotent).
//!
//! `cargo xtask certs`, the quickstart, the benchmarks and the tests all use this generator;
//! [`issue`] makes further certificates from the same CA (the tests rotate Spooky's
//! certificate with it).

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::path::{Path, PathBuf};

const NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

fn ca_params() -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "Spooky demo CA");
    Ok(p)
}

/// Writes the demo CA and certificates into `dir` unless they are all there already.
/// Returns `dir`.
pub fn generate(dir: &Path) -> Result<PathBuf> {
    let files = [
        "ca.crt",
        "ca.key",
        "spooky.crt",
        "spooky.key",
        "backend.crt",
        "backend.key",
    ];
    if files.iter().all(|f| dir.join(f).is_file()) {
        return Ok(dir.to_path_buf());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params()?.self_signed(&ca_key)?;
    write(dir, "ca.crt", &ca_cert.pem())?;
    write(dir, "ca.key", &ca_key.serialize_pem())?;
    issue(dir, "spooky", "spooky demo")?;
    issue(dir, "backend", "spooky demo backend")?;
    Ok(dir.to_path_buf())
}

/// Issues `NAME.crt` / `NAME.key` in `dir` from the CA there (for localhost names), replacing
/// existing files. Returns the certificate's path.
pub fn issue(dir: &Path, name: &str, common_name: &str) -> Result<PathBuf> {
    let ca_key_pem = std::fs::read_to_string(dir.join("ca.key")).context("read ca.key")?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let names: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write(dir, &format!("{name}.key"), &key.serialize_pem())?;
    write(dir, &format!("{name}.crt"), &cert.pem())?;
    Ok(dir.join(format!("{name}.crt")))
}

fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    // Write whole files (temp + rename) so a concurrent reader never sees half a PEM.
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))
}
