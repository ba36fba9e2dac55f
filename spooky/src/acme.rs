//! Automatic HTTPS (`acme`): certificates obtained from an ACME server (RFC 8555) through
//! `instant-acme`, kept on disk, renewed at two thirds of their lifetime, and swapped in live
//! on every worker (through [`TlsShared::install`]).
//!
//! One thread (`spooky-acme`) with a runtime of its own: the data plane never waits on it.
//! For each `acme.certificates` entry it
//!
//! 1. at start, loads the stored certificate (`STATE_DIR/NAME/cert.pem`, `key.pem`) when it
//!    covers the names and has not expired, and serves it at once — a restart or a takeover
//!    successor orders nothing new;
//! 2. when the certificate is missing or two thirds of its lifetime have passed, orders a new
//!    one: the account (`STATE_DIR/account.json`, created once), an order for the names, each
//!    authorization answered by the configured challenge (HTTP-01 on the plaintext listener,
//!    TLS-ALPN-01 on the TCP listener, both through [`TlsShared`]), a new key and CSR, the
//!    chain; files written whole (temp + rename, 0600), then installed;
//! 3. on a failure, keeps serving what it has, logs a warning naming the names and the error,
//!    counts it, and tries again after a back-off (10 s doubling to 1 h).

use crate::certs::{Site, TlsShared};
use crate::config::{Acme, AcmeChallenge};
use crate::keys::write_private;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_rustls::rustls;

/// First wait after a failed order; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// How long an order may take, challenges and all, before it counts as failed.
const ORDER_TIMEOUT: Duration = Duration::from_secs(90);

/// Makes the state directory (0700), handed to `owner` (`user:`) with what is in it, since
/// the thread writes there after the privilege drop.
///
/// # Errors
/// When the directory cannot be made or handed over.
pub fn prepare(config: &Acme, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    private_dir(&config.state_dir)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&config.state_dir, Some(uid), Some(gid))?;
        for entry in walk(&config.state_dir) {
            std::os::unix::fs::chown(&entry, Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

/// Starts the ACME thread for `config`, installing into `shared` (started after the
/// privilege drop: it holds no privilege). Sending on (or dropping) what it returns stops
/// the thread, mid-order too.
///
/// # Errors
/// When the thread cannot start.
pub fn start(
    config: Acme,
    shared: Arc<TlsShared>,
) -> std::io::Result<tokio::sync::oneshot::Sender<()>> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("spooky-acme".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "ACME: no runtime; no certificates will be obtained");
                    return;
                }
            };
            rt.block_on(async {
                tokio::select! {
                    () = run(config, shared) => {}
                    _ = stopped => {}
                }
            });
        })?;
    Ok(stop)
}

/// One managed certificate's state.
struct Managed {
    /// What the certificate is installed as: its names, as configured.
    key: String,
    names: Vec<String>,
    dir: PathBuf,
    /// When to order next (Unix seconds).
    due: i64,
    backoff: Duration,
}

async fn run(config: Acme, shared: Arc<TlsShared>) {
    let stats = &shared.acme;
    let mut managed: Vec<Managed> = config
        .certificates
        .iter()
        .map(|names| {
            let dir = config.state_dir.join(names.first().map_or("cert", String::as_str));
            let mut m = Managed {
                key: names.join(","),
                names: names.clone(),
                dir,
                due: 0,
                backoff: FIRST_BACKOFF,
            };
            match stored(&m, &shared) {
                Some(site) => {
                    m.due = renewal_time(&site);
                    tracing::info!(names = ?m.names, expires = site.not_after, "ACME: serving the stored certificate");
                    shared.install(&m.key, site);
                    stats.reused.fetch_add(1, Ordering::Relaxed);
                }
                None => m.due = 0,
            }
            m
        })
        .collect();
    let mut account: Option<Account> = None;
    loop {
        let now = unix_now();
        for m in managed.iter_mut().filter(|m| m.due <= now) {
            stats.orders.fetch_add(1, Ordering::Relaxed);
            let result =
                tokio::time::timeout(ORDER_TIMEOUT, obtain(&config, &mut account, m, &shared))
                    .await
                    .unwrap_or_else(|_| Err(format!("no certificate within {ORDER_TIMEOUT:?}")));
            match result {
                Ok(site) => {
                    m.due = renewal_time(&site);
                    m.backoff = FIRST_BACKOFF;
                    tracing::info!(names = ?m.names, expires = site.not_after, renew_at = m.due, "ACME: certificate obtained and in force");
                    shared.install(&m.key, site);
                    stats.issued.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(names = ?m.names, error = %e, retry_in = ?m.backoff, "ACME: no certificate; the one in force (if any) stays");
                    m.due = unix_now() + m.backoff.as_secs() as i64;
                    m.backoff = (m.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        let next = managed.iter().map(|m| m.due).min().unwrap_or(i64::MAX);
        let wait = u64::try_from(next.saturating_sub(unix_now()))
            .unwrap_or(0)
            .clamp(1, MAX_BACKOFF.as_secs());
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
}

/// The stored certificate of `m`, when it covers every name and has not expired.
fn stored(m: &Managed, shared: &TlsShared) -> Option<Site> {
    let (cert, key) = (m.dir.join("cert.pem"), m.dir.join("key.pem"));
    if !cert.is_file() {
        return None;
    }
    match shared.load(&cert, &key) {
        Ok(site) if site.not_after > unix_now() && m.names.iter().all(|n| site.covers(n)) => {
            Some(site)
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(path = %cert.display(), error = %e, "ACME: the stored certificate cannot serve; ordering a new one");
            None
        }
    }
}

/// Two thirds into the certificate's lifetime.
fn renewal_time(site: &Site) -> i64 {
    site.not_before + (site.not_after - site.not_before) * 2 / 3
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The account: the stored one, or a new one (stored at once).
async fn account(config: &Acme) -> Result<Account, String> {
    let path = config.state_dir.join("account.json");
    let builder = || match &config.ca {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    };
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(stored) = serde_json::from_str::<StoredAccount>(&text) {
            if stored.directory == config.directory {
                return builder()
                    .map_err(|e| e.to_string())?
                    .from_credentials(stored.credentials)
                    .await
                    .map_err(|e| format!("stored account: {e}"));
            }
        }
    }
    let contact = config.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder()
        .map_err(|e| e.to_string())?
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            config.directory.clone(),
            None,
        )
        .await
        .map_err(|e| format!("new account at {}: {e}", config.directory))?;
    let stored = StoredAccount {
        directory: config.directory.clone(),
        credentials,
    };
    let text = serde_json::to_string(&stored).map_err(|e| e.to_string())?;
    write_private(&path, &text).map_err(|e| format!("{}: {e}", path.display()))?;
    tracing::info!(directory = %config.directory, "ACME: account created");
    Ok(account)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// Challenges answered for one order; withdrawn when it ends, however it ends.
struct Answers<'a> {
    shared: &'a TlsShared,
    tokens: Vec<String>,
    names: Vec<String>,
}

impl Drop for Answers<'_> {
    fn drop(&mut self) {
        for t in &self.tokens {
            self.shared.remove_http01(t);
        }
        for n in &self.names {
            self.shared.remove_alpn01(n);
        }
    }
}

/// Orders, proves and fetches a certificate for `m.names`; stores and loads it.
async fn obtain(
    config: &Acme,
    account_slot: &mut Option<Account>,
    m: &Managed,
    shared: &TlsShared,
) -> Result<Site, String> {
    if account_slot.is_none() {
        *account_slot = Some(account(config).await?);
    }
    let account = account_slot.as_ref().ok_or("no account")?;
    let identifiers: Vec<Identifier> = m.names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(|e| format!("new order: {e}"))?;
    let mut answers = Answers {
        shared,
        tokens: Vec::new(),
        names: Vec::new(),
    };
    let kind = match config.challenge {
        AcmeChallenge::Http01 => ChallengeType::Http01,
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(|e| format!("authorization: {e}"))?;
        match authz.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            other => return Err(format!("authorization is {other:?}")),
        }
        let mut challenge = authz
            .challenge(kind.clone())
            .ok_or_else(|| format!("the server offers no {kind:?} challenge"))?;
        let name = challenge.identifier().to_string();
        let key_authorization = challenge.key_authorization();
        match config.challenge {
            AcmeChallenge::Http01 => {
                shared.add_http01(&challenge.token, key_authorization.as_str());
                answers.tokens.push(challenge.token.clone());
            }
            AcmeChallenge::TlsAlpn01 => {
                let cert = alpn_challenge_cert(&name, key_authorization.digest().as_ref())?;
                shared.add_alpn01(&name, cert);
                answers.names.push(name.clone());
            }
        }
        challenge
            .set_ready()
            .await
            .map_err(|e| format!("challenge for {name}: {e}"))?;
    }
    let retries = RetryPolicy::new().timeout(Duration::from_secs(60));
    let status = order
        .poll_ready(&retries)
        .await
        .map_err(|e| format!("waiting for validation: {e}"))?;
    if status != OrderStatus::Ready {
        return Err(format!(
            "order is {status:?}, not ready (validation failed)"
        ));
    }
    let key_pem = order
        .finalize()
        .await
        .map_err(|e| format!("finalize: {e}"))?;
    let chain_pem = order
        .poll_certificate(&retries)
        .await
        .map_err(|e| format!("certificate: {e}"))?;
    drop(answers);
    private_dir(&m.dir).map_err(|e| format!("{}: {e}", m.dir.display()))?;
    let (cert, key) = (m.dir.join("cert.pem"), m.dir.join("key.pem"));
    // The key first: a cert.pem on disk always has its key beside it.
    write_private(&key, &key_pem).map_err(|e| format!("{}: {e}", key.display()))?;
    write_private(&cert, &chain_pem).map_err(|e| format!("{}: {e}", cert.display()))?;
    shared.load(&cert, &key).map_err(|e| e.to_string())
}

/// The self-signed certificate that answers a TLS-ALPN-01 challenge for `name` (RFC 8737
/// §3: the name, and the key authorization's digest in the `acmeIdentifier` extension).
fn alpn_challenge_cert(
    name: &str,
    digest: &[u8],
) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(|e| e.to_string())?;
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der_key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| e.to_string())?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&der_key).map_err(|e| e.to_string())?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// Every file and directory under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

/// Makes `dir` (and its parents) with mode 0700 for the last one.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}
