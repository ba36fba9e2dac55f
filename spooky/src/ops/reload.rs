//! Live reload, all or nothing (SIGHUP or `POST /reload`).
//!
//! 1. The file is read and validated again; a setting that needs a restart (listen address,
//!    worker count, connection-ID layout, steering, admin, user, access log) refuses the
//!    reload.
//! 2. The whole new [`Snapshot`] is built — routes, TLS client configurations, health slots,
//!    and one QUIC configuration per worker — before anything is published.
//! 3. Two phases with the workers (`worker::control::switch`): each is asked to *prepare* (build its pools and
//!    balancers for the new snapshot and keep them ready) and answers; only when every worker
//!    has answered yes are they all told to *commit*, and each confirms. A worker that says no,
//!    or does not answer in time, aborts the reload for all of them.
//! 4. Then the snapshot becomes current, the health checker follows it, the log level changes.
//!
//! If any step fails nothing changes, and the caller gets the typed reason: a problem with the
//! configuration ([`ReloadError::is_client_error`]: the admin answers 4xx) or an internal one
//! (5xx). Requests in flight finish on the snapshot they started with; QUIC connections stay
//! up; new handshakes use the new certificate.

use crate::board::HealthBoard;
use crate::config::{expand, Config, ConfigError};
use crate::dns::Dns;
use crate::keys::Keys;
use crate::snapshot::{Follower, QuicConfigError, Snapshot, SnapshotError};
use crate::telemetry::logging::LevelReloader;
use crate::worker::control::{switch, Link, SwitchError, WorkerUpdate, WORKER_ANSWER};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("this process was started without a configuration file")]
    NoFile,
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{}", .0.join("; "))]
    NeedsRestart(Vec<String>),
    #[error("{0}")]
    Snapshot(#[from] SnapshotError),
    #[error("{0}")]
    Workers(#[from] SwitchError),
}

impl ReloadError {
    /// Whether the request or the configuration is at fault (4xx), not Spooky (5xx).
    pub fn is_client_error(&self) -> bool {
        match self {
            ReloadError::NoFile | ReloadError::Config(_) | ReloadError::NeedsRestart(_) => true,
            // What the configuration names (routes, TLS files, certificate and key) is the
            // operator's to fix; quiche refusing a setting it validated is ours.
            ReloadError::Snapshot(SnapshotError::Quic(QuicConfigError::Setting(_)))
            | ReloadError::Snapshot(SnapshotError::Quic(QuicConfigError::H3(_))) => false,
            ReloadError::Snapshot(_) => true,
            ReloadError::Workers(_) => false,
        }
    }
}

/// Settings a reload cannot change, compared between the running and the new config.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut v = Vec::new();
    if old.listen.addr != new.listen.addr {
        v.push(format!(
            "listen address {} → {} needs a restart",
            old.listen.addr, new.listen.addr
        ));
    }
    let tcp_listener =
        |t: &Option<crate::config::Tcp>| t.as_ref().map(|t| (t.addr, t.max_connections));
    if old.listen.http.as_ref().map(|h| h.addr) != new.listen.http.as_ref().map(|h| h.addr) {
        v.push("listen.http.enabled / listen.http.port need a restart".to_owned());
    }
    if tcp_listener(&old.listen.tcp) != tcp_listener(&new.listen.tcp) {
        v.push(
            "listen.tcp.enabled / listen.tcp.port / listen.tcp.max_connections need a restart"
                .to_owned(),
        );
    }
    if old.acme != new.acme {
        v.push("acme needs a restart".to_owned());
    }
    if old.workers != new.workers {
        v.push("workers needs a restart".to_owned());
    }
    let (a, b) = (&old.quic, &new.quic);
    if (a.cid_len, &a.server_id, a.generation) != (b.cid_len, &b.server_id, b.generation) {
        v.push("quic.cid_len / quic.server_id / quic.generation need a restart".to_owned());
    }
    if a.connection_ids != b.connection_ids {
        v.push("quic.connection_ids needs a restart".to_owned());
    }
    if old.steering.pin_path != new.steering.pin_path {
        v.push("steering.pin_path needs a restart".to_owned());
    }
    if (old.steering.initial_rate, old.steering.initial_burst)
        != (new.steering.initial_rate, new.steering.initial_burst)
    {
        v.push("steering.initial_rate / steering.initial_burst need a restart".to_owned());
    }
    if old.admin != new.admin {
        v.push("admin settings need a restart".to_owned());
    }
    if old.user != new.user {
        v.push("user needs a restart".to_owned());
    }
    if old.log.access != new.log.access {
        v.push("log.access needs a restart".to_owned());
    }
    if old.log.access_format != new.log.access_format {
        v.push("log.access_format / log.access_fields need a restart".to_owned());
    }
    if old.log.format != new.log.format {
        v.push("log.format needs a restart".to_owned());
    }
    if old.control_socket != new.control_socket {
        v.push("control_socket needs a restart".to_owned());
    }
    if old.resolver != new.resolver {
        v.push("resolver needs a restart".to_owned());
    }
    // Members may change (a host added to the fleet); the forwarding socket may not.
    if old.fleet.as_ref().map(|f| f.listen) != new.fleet.as_ref().map(|f| f.listen) {
        v.push("fleet (on, off, fleet.listen) needs a restart".to_owned());
    }
    v
}

/// The configuration in force and the means to change it.
pub struct Reloader {
    path: Option<PathBuf>,
    current: RwLock<Arc<Snapshot>>,
    board: Arc<HealthBoard>,
    /// The process's random keys, for configurations without `quic.key_file`.
    own_keys: Keys,
    workers: Vec<Link<WorkerUpdate>>,
    /// Told about every snapshot that became current (the health checker follows).
    on_commit: Follower,
    log_level: Mutex<Option<LevelReloader>>,
    one_at_a_time: Mutex<()>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    /// The resolver of backends named by DNS.
    dns: OnceLock<Arc<Dns>>,
}

impl Reloader {
    /// The reloader of a process that started on `snapshot`; `path` is where reloads read
    /// from (`None`: reloads are refused).
    pub fn new(
        snapshot: Arc<Snapshot>,
        path: Option<PathBuf>,
        board: Arc<HealthBoard>,
        own_keys: Keys,
        workers: Vec<Link<WorkerUpdate>>,
        on_commit: Follower,
    ) -> Self {
        Self {
            path,
            current: RwLock::new(snapshot),
            board,
            own_keys,
            workers,
            on_commit,
            log_level: Mutex::new(None),
            one_at_a_time: Mutex::new(()),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            dns: OnceLock::new(),
        }
    }

    /// The snapshot in force.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The configuration generation in force: 1 at start, +1 per successful reload.
    pub fn generation(&self) -> u64 {
        self.current().generation
    }

    /// Reloads that succeeded and that failed.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }

    /// Installs the resolver that configurations' backend names are resolved with.
    pub fn set_dns(&self, dns: Arc<Dns>) {
        let _ = self.dns.set(dns);
    }

    /// Makes the configuration in force follow the addresses its backend names resolve to
    /// now: re-expanded and applied like a reload when they changed (`Some(summary)`).
    ///
    /// # Errors
    /// As [`Reloader::apply`]; nothing changed then.
    pub fn follow_dns(&self) -> Result<Option<String>, ReloadError> {
        let Some(dns) = self.dns.get() else {
            return Ok(None);
        };
        let _one = self.one_at_a_time.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.current();
        let mut config = old.config.clone();
        expand(&mut config, |name| dns.addresses(name));
        let moved = config
            .upstreams
            .iter()
            .zip(&old.config.upstreams)
            .any(|(new, old)| new.backends != old.backends);
        if !moved {
            return Ok(None);
        }
        self.apply_locked(config).map(Some)
    }

    /// The resolver thread's view of this reloader.
    pub fn dns_follower(self: &Arc<Self>) -> impl crate::dns::Follower {
        DnsFollower(self.clone())
    }

    /// Installs the function that changes the log filter on reload.
    pub fn set_log_reloader(&self, f: LevelReloader) {
        *self.log_level.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Re-reads the configuration file and applies it.
    ///
    /// # Errors
    /// [`ReloadError`]; nothing changed then.
    pub fn reload(&self) -> Result<String, ReloadError> {
        let result = match &self.path {
            None => Err(ReloadError::NoFile),
            Some(path) => Config::from_path(path)
                .map_err(ReloadError::from)
                .and_then(|c| self.apply(c)),
        };
        match &result {
            Ok(summary) => {
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%summary, "configuration reloaded");
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "configuration reload refused; the running configuration stays");
            }
        }
        result
    }

    /// Applies an already validated configuration.
    ///
    /// # Errors
    /// [`ReloadError`]; nothing changed then (except for [`SwitchError::Unconfirmed`]).
    pub fn apply(&self, mut config: Config) -> Result<String, ReloadError> {
        let _one = self.one_at_a_time.lock().unwrap_or_else(|p| p.into_inner());
        match self.dns.get() {
            Some(dns) => {
                dns.learn(&config.dns_names());
                expand(&mut config, |name| dns.addresses(name));
            }
            None if !config.dns_names().is_empty() => {
                return Err(ReloadError::NeedsRestart(vec![
                    "backends named by DNS need the resolver, which starts with Spooky".into(),
                ]))
            }
            None => {}
        }
        self.apply_locked(config)
    }

    /// [`Reloader::apply`] of an expanded configuration, under the one-at-a-time lock.
    fn apply_locked(&self, mut config: Config) -> Result<String, ReloadError> {
        let old = self.current();
        // Not refused: `--xdp-mode` on the command line overrides the file's, so the file may
        // differ from what runs. Said in the reload's answer instead.
        let mut notes = String::new();
        if config.steering.xdp_mode != old.config.steering.xdp_mode {
            tracing::warn!("steering.xdp_mode changes take effect at the next start");
            notes.push_str("; steering.xdp_mode not changed (it takes effect at the next start)");
            config.steering.xdp_mode = old.config.steering.xdp_mode;
        }
        let refused = restart_only_changes(&old.config, &config);
        if !refused.is_empty() {
            return Err(ReloadError::NeedsRestart(refused));
        }
        let level = (old.config.log.level != config.log.level).then(|| config.log.level.clone());
        let generation = old.generation + 1;
        let next = Arc::new(Snapshot::build(
            config,
            &self.board,
            old.certs.shared(),
            &self.own_keys,
            generation,
        )?);
        let updates = (0..self.workers.len())
            .map(|_| {
                Ok(WorkerUpdate {
                    snapshot: next.clone(),
                    quic: next.quic_config()?,
                })
            })
            .collect::<Result<Vec<_>, SnapshotError>>()?;
        let switched = switch(&self.workers, updates, generation, WORKER_ANSWER)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next.clone();
        (self.on_commit)(&next);
        if let Some(level) = level {
            let guard = self.log_level.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(Err(e)) = guard.as_ref().map(|f| f(&level)) {
                // The level was validated with the file; this only fails if tracing refuses.
                tracing::warn!(error = %e, "log level not changed");
            }
        }
        let backends: usize = next.config.upstreams.iter().map(|u| u.backends.len()).sum();
        let mut summary = format!(
            "generation {generation}: {} upstreams, {backends} backends",
            next.config.upstreams.len()
        );
        summary.push_str(&notes);
        if !switched.gone.is_empty() {
            tracing::warn!(workers = ?switched.gone, "reload applied to the live workers only: these died (restart Spooky, with --takeover to keep the others' connections)");
            summary.push_str(&format!(
                "; worker(s) {:?} are dead and were skipped",
                switched.gone
            ));
        }
        Ok(summary)
    }
}

struct DnsFollower(Arc<Reloader>);

impl crate::dns::Follower for DnsFollower {
    fn names(&self) -> Vec<String> {
        self.0.current().config.dns_names()
    }

    fn follow(&self) -> Result<Option<String>, String> {
        self.0.follow_dns().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests;
