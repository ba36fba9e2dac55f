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

/// A certificate [`issue_for`] makes: the names it carries, its key, how long it lasts.
pub struct SiteCert<'a> {
    /// DNS names (`*.example` wildcards too) and IP addresses.
    pub names: &'a [&'a str],
    /// The certificate's key (PKCS#8 PEM, e.g. RSA made by the caller); `None`: a new ECDSA
    /// P-256 key.
    pub key_pem: Option<&'a str>,
    /// Days from now to `notAfter` (rounded to midnight UTC); `None`: far in the future.
    pub valid_days: Option<i64>,
}

/// Issues `NAME.crt` / `NAME.key` in `dir` from the CA there, replacing existing files.
/// Returns the certificate's path.
pub fn issue_for(
    dir: &Path,
    name: &str,
    common_name: &str,
    site: &SiteCert<'_>,
) -> Result<PathBuf> {
    let ca_key_pem = std::fs::read_to_string(dir.join("ca.key")).context("read ca.key")?;
    let issuer = Issuer::new(ca_params()?, KeyPair::from_pem(&ca_key_pem)?);
    let names: Vec<String> = site.names.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if let Some(days) = site.valid_days {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("clock")?
            .as_secs() as i64;
        let (y, m, d) = civil_from_days(now / 86_400 + days);
        params.not_after = rcgen::date_time_ymd(y, m, d);
    }
    let key = match site.key_pem {
        Some(pem) => KeyPair::from_pem_and_sign_algo(pem, &rcgen::PKCS_RSA_SHA256)?,
        None => KeyPair::generate()?,
    };
    let cert = params.signed_by(&key, &issuer)?;
    let key_pem = match site.key_pem {
        Some(pem) => pem.to_owned(),
        None => key.serialize_pem(),
    };
    write(dir, &format!("{name}.key"), &key_pem)?;
    write(dir, &format!("{name}.crt"), &cert.pem())?;
    Ok(dir.join(format!("{name}.crt")))
}

/// The calendar date of day `z` since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + i64::from(m <= 2)) as i32;
    (y, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(super::civil_from_days(19_782), (2024, 2, 29));
    }
}
