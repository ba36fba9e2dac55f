//! Backends named by DNS. Each name is resolved at start (and when a reload brings a new one)
//! and again when its answer expires: the records' TTL, clamped to `resolver.min_ttl` ..
//! `resolver.max_ttl`. Every address becomes a backend of its own (`ID@ADDRESS`, with its own
//! health and connections: [`crate::config::expand`]); when the set changes, the
//! configuration in force is re-expanded and applied as a reload would be, so an address that
//! is gone gets no new requests while its requests in flight finish on the snapshot they
//! started with, and an address that stays keeps its connections and health.
//!
//! A lookup that fails (timeout, SERVFAIL, no such name, no address) keeps the last good set,
//! is logged and counted, and is tried again after `min_ttl` (at least a second). Lookups
//! run on the resolver's own thread, never on a worker; the one exception is a reload that
//! names a host not seen before, which resolves it on the reloading thread.
//!
//! The resolver is hickory's, reading `/etc/resolv.conf` and `/etc/hosts`, or asking the
//! name servers `resolver.nameservers` names.

use crate::config::Resolver as Settings;
use hickory_resolver::config::{NameServerConfig, NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest a lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Lookups done, failed, and address-set changes applied (all names, since start).
pub static LOOKUPS: AtomicU64 = AtomicU64::new(0);
pub static FAILURES: AtomicU64 = AtomicU64::new(0);
pub static CHANGES: AtomicU64 = AtomicU64::new(0);

/// What is known of one name.
#[derive(Debug, Clone)]
struct Known {
    /// The last good answer (empty: none yet).
    addresses: Vec<IpAddr>,
    /// When to ask again.
    due: Instant,
}

/// The resolver and the answers in force.
pub struct Dns {
    resolver: TokioResolver,
    /// Lookups run here, one at a time.
    runtime: Mutex<tokio::runtime::Runtime>,
    min_ttl: Duration,
    names: Mutex<BTreeMap<String, Known>>,
}

impl Dns {
    /// A resolver for `settings`.
    ///
    /// # Errors
    /// When the system's resolver configuration cannot be read, or the runtime not made.
    pub fn new(settings: &Settings) -> Result<Self, String> {
        let provider = TokioConnectionProvider::default();
        let mut builder = if settings.nameservers.is_empty() {
            TokioResolver::builder(provider)
                .map_err(|e| format!("system resolver configuration: {e}"))?
        } else {
            let mut group = NameServerConfigGroup::new();
            for addr in &settings.nameservers {
                group.push(NameServerConfig::new(*addr, Protocol::Udp));
                group.push(NameServerConfig::new(*addr, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], group),
                provider,
            )
        };
        let opts = builder.options_mut();
        opts.positive_min_ttl = Some(settings.min_ttl);
        opts.positive_max_ttl = Some(settings.max_ttl);
        opts.timeout = Duration::from_secs(2);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("resolver runtime: {e}"))?;
        Ok(Self {
            resolver: builder.build(),
            runtime: Mutex::new(runtime),
            min_ttl: settings.min_ttl.max(Duration::from_secs(1)),
            names: Mutex::new(BTreeMap::new()),
        })
    }

    /// Resolves the names not known yet (start, reload). A name that does not resolve has
    /// no addresses for now; it is tried again in the background.
    pub fn learn(&self, names: &[String]) {
        for name in names {
            let known = self.lock().contains_key(name);
            if !known {
                let k = self.lookup(name, Vec::new());
                self.lock().insert(name.clone(), k);
            }
        }
    }

    /// The addresses `name` resolves to (empty when unknown or never resolved).
    pub fn addresses(&self, name: &str) -> Vec<IpAddr> {
        self.lock()
            .get(name)
            .map(|k| k.addresses.clone())
            .unwrap_or_default()
    }

    /// Asks again for the names among `names` whose answers expired; forgets names no longer
    /// configured. Whether any name's addresses changed.
    pub fn refresh(&self, names: &[String]) -> bool {
        if names.is_empty() && self.lock().is_empty() {
            return false;
        }
        self.lock().retain(|n, _| names.contains(n));
        let now = Instant::now();
        let due: Vec<(String, Vec<IpAddr>)> = self
            .lock()
            .iter()
            .filter(|(_, k)| k.due <= now)
            .map(|(n, k)| (n.clone(), k.addresses.clone()))
            .collect();
        let mut changed = false;
        for (name, before) in due {
            let k = self.lookup(&name, before.clone());
            if k.addresses != before {
                tracing::info!(name = %name, before = ?before, after = ?k.addresses, "backend addresses changed");
                changed = true;
            }
            self.lock().insert(name, k);
        }
        self.learn(names);
        changed
    }

    /// When the next answer expires.
    pub fn next_due(&self) -> Option<Instant> {
        self.lock().values().map(|k| k.due).min()
    }

    /// One lookup; on failure the `last` good addresses stay.
    fn lookup(&self, name: &str, last: Vec<IpAddr>) -> Known {
        LOOKUPS.fetch_add(1, Ordering::Relaxed);
        let runtime = self.runtime.lock().unwrap_or_else(|p| p.into_inner());
        let answer = runtime.block_on(async {
            tokio::time::timeout(LOOKUP_TIMEOUT, self.resolver.lookup_ip(name)).await
        });
        drop(runtime);
        let retry = Instant::now() + self.min_ttl;
        let failed = |why: String| {
            FAILURES.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(name = %name, error = %why, kept = ?last, "backend name did not resolve; the last good addresses stay");
            Known {
                addresses: last.clone(),
                due: retry,
            }
        };
        match answer {
            Err(_) => failed(format!("no answer within {LOOKUP_TIMEOUT:?}")),
            Ok(Err(e)) => failed(e.to_string()),
            Ok(Ok(found)) => {
                let mut addresses: Vec<IpAddr> = found.iter().collect();
                addresses.sort_unstable();
                addresses.dedup();
                if addresses.is_empty() {
                    return failed("no address".into());
                }
                Known {
                    addresses,
                    due: found.valid_until().max(retry),
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Known>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the resolver's thread needs of the configuration in force: the names it configures,
/// and the means to have it follow their addresses (a reload of the re-expanded
/// configuration; `Ok(Some(summary))` when something changed).
pub trait Follower: Send + Sync + 'static {
    fn names(&self) -> Vec<String>;
    fn follow(&self) -> Result<Option<String>, String>;
}

/// The resolver's thread: waits for the next answer to expire, asks again, and has the
/// configuration follow a changed set. Stops when the returned sender is dropped or sent to.
///
/// # Errors
/// When the thread cannot be started.
pub fn start(dns: Arc<Dns>, config: impl Follower) -> std::io::Result<mpsc::Sender<()>> {
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("spooky-dns".into())
        .spawn(move || loop {
            let wait = dns
                .next_due()
                .map_or(Duration::from_secs(1), |due| {
                    due.saturating_duration_since(Instant::now())
                })
                .clamp(Duration::from_millis(100), Duration::from_secs(1));
            match stopped.recv_timeout(wait) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let names = config.names();
            if names.is_empty() {
                continue;
            }
            dns.refresh(&names);
            // Also when nothing changed just now: a change that could not be applied before
            // is tried again.
            match config.follow() {
                Ok(Some(summary)) => {
                    CHANGES.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%summary, "backends follow DNS");
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "backends could not follow DNS; the running set stays"),
            }
        })?;
    Ok(stop)
}
