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
//! Handshake counts outlive a reload, and so do the certificates obtained at run time (ACME)
//! and the challenges being answered: they live in the process's [`TlsShared`]. A run-time
//! certificate takes its names before the configured ones, on every worker at once.

use crate::config::{ListenTls, UnknownSni};
use boring::pkey::{PKey, Private};
use boring::ssl::{SniError, SslAlert, SslContextBuilder, SslMethod, SslRef};
use boring::x509::X509;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
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

/// What the process's TLS keeps across configuration snapshots: handshake counters by
/// certificate name, the certificates obtained at run time (ACME), and the ACME challenges
/// being answered.
#[derive(Default)]
pub struct TlsShared {
    by_name: Mutex<Vec<(String, Arc<AtomicU64>)>>,
    /// ClientHellos whose SNI named no certificate, or that sent none.
    pub unknown_sni: AtomicU64,
    /// Certificates obtained at run time; they take their names before the configured ones.
    managed: RwLock<Arc<SiteSet>>,
    /// How many `managed` holds: read per request without touching the lock or the `Arc`
    /// that every worker shares.
    managed_count: AtomicUsize,
    /// ACME HTTP-01: token → key authorization.
    http01: Mutex<HashMap<String, String>>,
    /// ACME TLS-ALPN-01: name → the challenge certificate (RFC 8737).
    alpn01: Mutex<HashMap<String, Arc<rustls::sign::CertifiedKey>>>,
    /// What the ACME thread did.
    pub acme: AcmeStats,
}

/// What the ACME thread did, for the metrics.
#[derive(Default)]
pub struct AcmeStats {
    /// Orders placed (a new certificate or a renewal).
    pub orders: AtomicU64,
    /// Certificates obtained and installed.
    pub issued: AtomicU64,
    /// Orders that failed (the certificate in force, if any, stays).
    pub failures: AtomicU64,
    /// Stored certificates loaded at start instead of ordering.
    pub reused: AtomicU64,
}

impl TlsShared {
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

    fn managed(&self) -> Arc<SiteSet> {
        self.managed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Serves `site` from now on as the certificate `key` (what it is managed as, e.g. its
    /// ACME entry), in place of the one `key` had: a renewal replaces the old certificate
    /// whatever order its names come in.
    pub fn install(&self, key: &str, site: Site) {
        let mut managed = self.managed.write().unwrap_or_else(|p| p.into_inner());
        let mut sites: Vec<(String, Arc<Site>)> = managed
            .keys
            .iter()
            .zip(&managed.sites)
            .filter(|(k, _)| *k != key)
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        sites.push((key.to_owned(), Arc::new(site)));
        let (keys, sites): (Vec<String>, Vec<Arc<Site>>) = sites.into_iter().unzip();
        let mut set = SiteSet::new(sites);
        set.keys = keys;
        self.managed_count.store(set.sites.len(), Ordering::Relaxed);
        *managed = Arc::new(set);
    }

    /// Loads a pair for [`Self::install`] (ACME: a stored or a new certificate).
    ///
    /// # Errors
    /// [`CertError`] when the pair cannot serve.
    pub fn load(&self, cert: &Path, key: &Path) -> Result<Site, CertError> {
        load_site(&cert.to_path_buf(), &key.to_path_buf(), &[], self)
    }

    /// Answers `/.well-known/acme-challenge/TOKEN` with `key_authorization` until removed.
    pub fn add_http01(&self, token: &str, key_authorization: &str) {
        self.http01
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token.to_owned(), key_authorization.to_owned());
    }

    pub fn remove_http01(&self, token: &str) {
        self.http01
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(token);
    }

    /// The key authorization for an HTTP-01 `token`, while its challenge is open.
    pub fn http01(&self, token: &str) -> Option<String> {
        self.http01
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned()
    }

    /// Answers TLS-ALPN-01 handshakes (ALPN `acme-tls/1`) for `name` with `cert` until
    /// removed.
    pub fn add_alpn01(&self, name: &str, cert: Arc<rustls::sign::CertifiedKey>) {
        self.alpn01
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_ascii_lowercase(), cert);
    }

    pub fn remove_alpn01(&self, name: &str) {
        self.alpn01
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name.to_ascii_lowercase());
    }

    fn alpn01(&self, name: &str) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.alpn01
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name.to_ascii_lowercase())
            .cloned()
    }
}

/// The ALPN protocol of TLS-ALPN-01 validation handshakes (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// One certificate chain with its key, in both TLS libraries' forms.
pub struct Site {
    /// Its first DNS name, else its file name: the `name` label of its metrics.
    pub name: String,
    pub cert_path: PathBuf,
    /// DNS subject alternative names, lower-case (`*.suffix` for wildcards).
    pub names: Vec<String>,
    /// `notBefore` and `notAfter`, in seconds since the Unix epoch.
    pub not_before: i64,
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

    /// Whether the certificate names `host` (exactly, or by a one-label wildcard).
    pub fn covers(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.names.iter().any(|n| match n.strip_prefix("*.") {
            Some(suffix) => host.split_once('.').is_some_and(|(_, s)| s == suffix),
            None => *n == host,
        })
    }
}

/// Certificates and how a name picks one.
#[derive(Default)]
struct SiteSet {
    sites: Vec<Arc<Site>>,
    /// What each site is managed as (run-time certificates only).
    keys: Vec<String>,
    exact: HashMap<String, usize>,
    /// `suffix` of `*.suffix` → site.
    wildcard: HashMap<String, usize>,
}

impl SiteSet {
    fn new(sites: Vec<Arc<Site>>) -> Self {
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
        Self {
            sites,
            keys: Vec::new(),
            exact,
            wildcard,
        }
    }

    /// `host` is lower-case, without a trailing dot.
    fn for_host(&self, host: &str) -> Option<&Arc<Site>> {
        let i = match self.exact.get(host) {
            Some(&i) => i,
            None => *self.wildcard.get(host.split_once('.')?.1)?,
        };
        self.sites.get(i)
    }
}

/// Every certificate of the listener — the configured ones and those obtained at run time —
/// and how a name picks one.
pub struct Certificates {
    configured: SiteSet,
    pub unknown_sni: UnknownSni,
    shared: Arc<TlsShared>,
}

impl Certificates {
    /// Loads every pair of `tls`, checking that each key belongs to its certificate.
    ///
    /// # Errors
    /// [`CertError`] naming the file at fault.
    pub fn load(tls: &ListenTls, shared: &Arc<TlsShared>) -> Result<Self, CertError> {
        let mut sites: Vec<Site> = Vec::with_capacity(tls.certificates.len());
        for pair in &tls.certificates {
            let site = load_site(&pair.cert, &pair.key, &sites, shared)?;
            sites.push(site);
        }
        Ok(Self {
            configured: SiteSet::new(sites.into_iter().map(Arc::new).collect()),
            unknown_sni: tls.unknown_sni,
            shared: shared.clone(),
        })
    }

    /// What the process keeps across snapshots (a reload passes it on).
    pub fn shared(&self) -> &Arc<TlsShared> {
        &self.shared
    }

    /// Every certificate in force: the configured ones, then those obtained at run time.
    pub fn all(&self) -> Vec<Arc<Site>> {
        let mut all = self.configured.sites.clone();
        all.extend(self.shared.managed().sites.iter().cloned());
        all
    }

    /// Whether more than one certificate is in force (else no host can be misdirected).
    pub fn several(&self) -> bool {
        self.configured.sites.len() + self.shared.managed_count.load(Ordering::Relaxed) > 1
    }

    /// The certificate that names `host` (a DNS name, any case, no port), if one does:
    /// run-time certificates first.
    pub fn for_host(&self, host: &str) -> Option<Arc<Site>> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if let Some(site) = self.shared.managed().for_host(&host) {
            return Some(site.clone());
        }
        self.configured.for_host(&host).cloned()
    }

    /// The certificate a ClientHello with `sni` gets; `None`: refuse the handshake.
    pub fn select(&self, sni: Option<&str>) -> Option<Arc<Site>> {
        match sni.and_then(|s| self.for_host(s)) {
            Some(site) => Some(site),
            None => match self.unknown_sni {
                UnknownSni::Default => self.configured.sites.first().cloned(),
                UnknownSni::Refuse => None,
            },
        }
    }

    /// [`Self::select`], counted.
    fn choose(&self, sni: Option<&str>) -> Option<Arc<Site>> {
        let known = sni.and_then(|s| self.for_host(s));
        let site = match known {
            Some(site) => Some(site),
            None => {
                self.shared.unknown_sni.fetch_add(1, Ordering::Relaxed);
                self.select(None)
            }
        }?;
        site.handshakes.fetch_add(1, Ordering::Relaxed);
        Some(site)
    }

    /// Whether a request for `host` may be answered on a connection whose ClientHello
    /// carried `sni`: not when another certificate names the host (RFC 9110 §15.5.20: the
    /// client must not have coalesced onto this connection; it gets 421 and retries on a
    /// connection of its own). Hosts no certificate names are served on any connection.
    pub fn misdirected(&self, sni: Option<&str>, host: &str) -> bool {
        match self.for_host(host) {
            Some(site) => !self.select(sni).is_some_and(|s| Arc::ptr_eq(&s, &site)),
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

    /// The rustls certificate resolver of the TCP listener (TLS-ALPN-01 challenges too).
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
    let certs = Certificates::load(tls, &Arc::new(TlsShared::default()))?;
    let mut warned = false;
    let lines = certs
        .all()
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
        let names: Vec<String> = self.all().iter().map(|s| s.name.clone()).collect();
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
        // An ACME server validating TLS-ALPN-01 offers `acme-tls/1` alone (RFC 8737 §3).
        let challenge = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.all(|p| p == ACME_TLS_ALPN));
        if challenge {
            return self.0.shared.alpn01(hello.server_name()?);
        }
        Some(self.0.choose(hello.server_name())?.rustls.clone())
    }
}

fn load_site(
    cert_path: &PathBuf,
    key_path: &PathBuf,
    earlier: &[Site],
    shared: &TlsShared,
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
    let since = epoch
        .diff(leaf.not_before())
        .map_err(|e| parse(cert_path, e.to_string()))?;
    let not_before = i64::from(since.days) * 86_400 + i64::from(since.secs);
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
        handshakes: shared.handshakes(&name),
        name,
        cert_path: cert_path.clone(),
        names,
        not_before,
        not_after,
        chain,
        key,
        rustls: Arc::new(certified),
    })
}

#[cfg(test)]
mod tests;
