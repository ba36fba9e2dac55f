//! The listener's certificates (`listen.tls`), chosen by the SNI of each ClientHello: exact
//! names first, then `*.suffix` wildcards (one label, RFC 6125 §6.4.3), else the first
//! certificate or a refused handshake (`unknown_sni`). One [`Certificates`] per configuration
//! snapshot serves both listeners: the QUIC one through BoringSSL's servername callback
//! ([`Certificates::quic_context`]), the TCP one through rustls
//! ([`Certificates::resolver`]).
//!
//! The names a certificate answers for are its subject alternative names of type DNS; a
//! certificate with none (IP addresses only) is chosen only as the default.
//!
//! Handshake counts outlive a reload: they live in the process's [`TlsCounters`], by
//! certificate name.

use crate::config::{ListenTls, UnknownSni};
use boring::pkey::{PKey, Private};
use boring::ssl::{SniError, SslAlert, SslContextBuilder, SslMethod, SslRef};
use boring::x509::X509;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio_rustls::rustls;

/// Why a certificate pair cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("key {} does not belong to certificate {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("TLS library: {0}")]
    Context(String),
}

/// Handshakes per certificate name and with an unknown SNI, for the whole process.
#[derive(Default)]
pub struct TlsCounters {
    by_name: Mutex<Vec<(String, Arc<AtomicU64>)>>,
    /// ClientHellos whose SNI named no certificate, or that sent none.
    pub unknown_sni: AtomicU64,
}

impl TlsCounters {
    /// The counter of certificate `name`, created on first use.
    fn handshakes(&self, name: &str) -> Arc<AtomicU64> {
        let mut all = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c)) = all.iter().find(|(n, _)| n == name) {
            return c.clone();
        }
        let c = Arc::new(AtomicU64::new(0));
        all.push((name.to_owned(), c.clone()));
        c
    }
}

/// One certificate chain with its key, in both TLS libraries' forms.
pub struct Site {
    /// Its first DNS name, else its file name: the `name` label of its metrics.
    pub name: String,
    pub cert_path: PathBuf,
    /// DNS subject alternative names, lower-case (`*.suffix` for wildcards).
    pub names: Vec<String>,
    /// `notAfter`, in seconds since the Unix epoch.
    pub not_after: i64,
    /// Leaf first, then the chain.
    chain: Vec<X509>,
    key: PKey<Private>,
    rustls: Arc<rustls::sign::CertifiedKey>,
    handshakes: Arc<AtomicU64>,
}

impl Site {
    /// Handshakes that chose this certificate (both listeners, the whole process).
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }
}

/// Every certificate of the listener and how a name picks one.
pub struct Certificates {
    pub sites: Vec<Site>,
    exact: HashMap<String, usize>,
    /// `suffix` of `*.suffix` → site.
    wildcard: HashMap<String, usize>,
    pub unknown_sni: UnknownSni,
    counters: Arc<TlsCounters>,
}

impl Certificates {
    /// Loads every pair of `tls`, checking that each key belongs to its certificate.
    ///
    /// # Errors
    /// [`CertError`] naming the file at fault.
    pub fn load(tls: &ListenTls, counters: &Arc<TlsCounters>) -> Result<Self, CertError> {
        let mut sites = Vec::with_capacity(tls.certificates.len());
        for pair in &tls.certificates {
            let site = load_site(&pair.cert, &pair.key, &sites, counters)?;
            sites.push(site);
        }
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        // The first certificate that names a host keeps it.
        for (i, site) in sites.iter().enumerate() {
            for name in &site.names {
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_owned()).or_insert(i),
                    None => exact.entry(name.clone()).or_insert(i),
                };
            }
        }
        Ok(Self {
            sites,
            exact,
            wildcard,
            unknown_sni: tls.unknown_sni,
            counters: counters.clone(),
        })
    }

    /// The process's handshake counters (a reload passes them on).
    pub fn counters(&self) -> &Arc<TlsCounters> {
        &self.counters
    }

    /// The certificate that names `host` (a DNS name, any case, no port), if one does.
    pub fn for_host(&self, host: &str) -> Option<usize> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if let Some(&i) = self.exact.get(&host) {
            return Some(i);
        }
        let (_, suffix) = host.split_once('.')?;
        self.wildcard.get(suffix).copied()
    }

    /// The certificate a ClientHello with `sni` gets; `None`: refuse the handshake.
    pub fn select(&self, sni: Option<&str>) -> Option<usize> {
        match sni.and_then(|s| self.for_host(s)) {
            Some(i) => Some(i),
            None => match self.unknown_sni {
                UnknownSni::Default => Some(0),
                UnknownSni::Refuse => None,
            },
        }
    }

    /// [`Self::select`], counted.
    fn choose(&self, sni: Option<&str>) -> Option<&Site> {
        let known = sni.and_then(|s| self.for_host(s));
        if known.is_none() {
            self.counters.unknown_sni.fetch_add(1, Ordering::Relaxed);
        }
        let site = self.sites.get(self.select(sni)?)?;
        site.handshakes.fetch_add(1, Ordering::Relaxed);
        Some(site)
    }

    /// Whether a request for `host` may be answered on a connection whose ClientHello
    /// carried `sni`: not when another certificate names the host (RFC 9110 §15.5.20: the
    /// client must not have coalesced onto this connection; it gets 421 and retries on a
    /// connection of its own). Hosts no certificate names are served on any connection.
    pub fn misdirected(&self, sni: Option<&str>, host: &str) -> bool {
        match self.for_host(host) {
            Some(i) => self.select(sni) != Some(i),
            None => false,
        }
    }

    /// A BoringSSL context for a QUIC listener that picks the certificate per ClientHello.
    ///
    /// # Errors
    /// [`CertError::Context`] when BoringSSL refuses.
    pub fn quic_context(self: &Arc<Self>) -> Result<SslContextBuilder, CertError> {
        let err = |e: boring::error::ErrorStack| CertError::Context(e.to_string());
        let mut ctx = SslContextBuilder::new(SslMethod::tls()).map_err(err)?;
        let certs = self.clone();
        // Called for every ClientHello, with or without SNI, before the certificate is used.
        // The context holds no certificate: each connection gets exactly its own chain.
        ctx.set_servername_callback(move |ssl: &mut SslRef, alert: &mut SslAlert| {
            let sni = ssl.servername(boring::ssl::NameType::HOST_NAME);
            let Some(site) = certs.choose(sni) else {
                *alert = SslAlert::UNRECOGNIZED_NAME;
                return Err(SniError::ALERT_FATAL);
            };
            let set = |ssl: &mut SslRef| -> Result<(), boring::error::ErrorStack> {
                let (leaf, rest) = site
                    .chain
                    .split_first()
                    .ok_or_else(boring::error::ErrorStack::get)?;
                ssl.set_certificate(leaf)?;
                ssl.set_private_key(&site.key)?;
                for c in rest {
                    ssl.add_chain_cert(c)?;
                }
                Ok(())
            };
            set(ssl).map_err(|e| {
                tracing::warn!(certificate = %site.name, error = %e, "cannot use certificate");
                *alert = SslAlert::INTERNAL_ERROR;
                SniError::ALERT_FATAL
            })
        });
        Ok(ctx)
    }

    /// The rustls certificate resolver of the TCP listener.
    pub fn resolver(self: &Arc<Self>) -> Arc<dyn rustls::server::ResolvesServerCert> {
        Arc::new(Resolver(self.clone()))
    }
}

/// Certificates this close to expiry are reported by `spooky check`.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// What `spooky check` says about `tls`: one line per certificate (its names and expiry,
/// with a warning when it expires within [`EXPIRY_WARNING_DAYS`]), and whether any did.
///
/// # Errors
/// [`CertError`] when a pair cannot serve (a key that is not the certificate's, above all).
pub fn report(tls: &ListenTls, now_unix: i64) -> Result<(Vec<String>, bool), CertError> {
    let certs = Certificates::load(tls, &Arc::new(TlsCounters::default()))?;
    let mut warned = false;
    let lines = certs
        .sites
        .iter()
        .map(|s| {
            let left = s.not_after - now_unix;
            let days = left.div_euclid(86_400);
            let names = if s.names.is_empty() {
                "no DNS names: only the default".to_owned()
            } else {
                s.names.join(", ")
            };
            let when = if left <= 0 {
                warned = true;
                format!("WARNING: EXPIRED {} days ago", -days)
            } else if days < EXPIRY_WARNING_DAYS {
                warned = true;
                format!("WARNING: expires in {days} days")
            } else {
                format!("expires in {days} days")
            };
            format!(
                "certificate {} ({names}): key matches; {when}",
                s.cert_path.display()
            )
        })
        .collect();
    Ok((lines, warned))
}

#[derive(Debug)]
struct Resolver(Arc<Certificates>);

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.sites.iter().map(|s| s.name.as_str()).collect();
        f.debug_struct("Certificates")
            .field("sites", &names)
            .finish()
    }
}

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.choose(hello.server_name())?.rustls.clone())
    }
}

fn load_site(
    cert_path: &PathBuf,
    key_path: &PathBuf,
    earlier: &[Site],
    counters: &TlsCounters,
) -> Result<Site, CertError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| CertError::Read {
            path: path.clone(),
            source,
        })
    };
    let parse = |path: &PathBuf, reason: String| CertError::Parse {
        path: path.clone(),
        reason,
    };
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let chain = X509::stack_from_pem(&cert_pem).map_err(|e| parse(cert_path, e.to_string()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| parse(cert_path, "no certificate".to_owned()))?;
    let key = PKey::private_key_from_pem(&key_pem).map_err(|e| parse(key_path, e.to_string()))?;
    let mismatch = || CertError::Mismatch {
        cert: cert_path.clone(),
        key: key_path.clone(),
    };
    let public = leaf
        .public_key()
        .map_err(|e| parse(cert_path, e.to_string()))?;
    if !public.public_eq(&key) {
        return Err(mismatch());
    }
    let names: Vec<String> = leaf
        .subject_alt_names()
        .map(|sans| {
            sans.iter()
                .filter_map(|n| n.dnsname())
                .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    let epoch =
        boring::asn1::Asn1Time::from_unix(0).map_err(|e| parse(cert_path, e.to_string()))?;
    let lifetime = epoch
        .diff(leaf.not_after())
        .map_err(|e| parse(cert_path, e.to_string()))?;
    let not_after = i64::from(lifetime.days) * 86_400 + i64::from(lifetime.secs);
    // rustls's form of the same pair.
    let der_chain: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls_pemfile::certs(&mut cert_pem.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| parse(cert_path, e.to_string()))?;
    let der_key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| parse(key_path, e.to_string()))?
        .ok_or_else(|| parse(key_path, "no private key".to_owned()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&der_key)
        .map_err(|e| parse(key_path, e.to_string()))?;
    let certified = rustls::sign::CertifiedKey::new(der_chain, signing);
    certified.keys_match().map_err(|_| mismatch())?;
    let file = || {
        cert_path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut name = names.first().cloned().unwrap_or_else(file);
    if earlier.iter().any(|s| s.name == name) {
        // Two certificates for one name (e.g. RSA and ECDSA): the file tells them apart.
        name = format!("{name} ({})", file());
    }
    Ok(Site {
        handshakes: counters.handshakes(&name),
        name,
        cert_path: cert_path.clone(),
        names,
        not_after,
        chain,
        key,
        rustls: Arc::new(certified),
    })
}

#[cfg(test)]
mod tests;
