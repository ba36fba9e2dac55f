//! Live reload, all or nothing (SIGHUP or `POST /reload`).
//!
//! 1. The file is read and validated again; a setting that needs a restart (listen address,
//!    worker count, connection-ID layout, steering, admin, user, access log) refuses the
//!    reload.
//! 2. The whole new [`Snapshot`] is built — routes, TLS client configurations, health slots,
//!    and one QUIC configuration per worker — before anything is published.
//! 3. Two phases with the workers ([`switch`]): each is asked to *prepare* (build its pools and
//!    balancers for the new snapshot and keep them ready) and answers; only when every worker
//!    has answered yes are they all told to *commit*, and each confirms. A worker that says no,
//!    or does not answer in time, aborts the reload for all of them.
//! 4. Then the snapshot becomes current, the health checker follows it, the log level changes.
//!
//! If any step fails nothing changes, and the caller gets the typed reason: a problem with the
//! configuration ([`ReloadError::is_client_error`]: the admin answers 4xx) or an internal one
//! (5xx). Requests in flight finish on the snapshot they started with; QUIC connections stay
//! up; new handshakes use the new certificate.

use super::telemetry::LevelReloader;
use crate::board::HealthBoard;
use crate::config::{Config, ConfigError};
use crate::keys::Keys;
use crate::snapshot::{Follower, QuicConfigError, Snapshot, SnapshotError};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long workers have to answer each phase.
const WORKER_ANSWER: Duration = Duration::from_secs(2);

/// What the reload coordinator tells one worker.
#[derive(Debug)]
pub enum Command<U> {
    /// Build what you need from `update` and keep it ready; answer on `reply`.
    Prepare {
        generation: u64,
        update: U,
        reply: std_mpsc::Sender<Answer>,
    },
    /// Switch to the prepared `generation`; confirm on `reply`.
    Commit {
        generation: u64,
        reply: std_mpsc::Sender<Answer>,
    },
    /// Forget the prepared `generation`.
    Abort { generation: u64 },
}

/// A worker's answer to a phase.
#[derive(Debug)]
pub struct Answer {
    pub worker: usize,
    /// `Err` with the reason when the worker cannot do it.
    pub result: Result<(), String>,
}

/// What a worker gets with a new snapshot: the snapshot and its own QUIC configuration.
pub struct WorkerUpdate {
    pub snapshot: Arc<Snapshot>,
    pub quic: quiche::Config,
}

impl std::fmt::Debug for WorkerUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerUpdate")
            .field("generation", &self.snapshot.generation)
            .finish_non_exhaustive()
    }
}

/// The coordinator's line to one worker.
pub type Link<U> = mpsc::UnboundedSender<Command<U>>;

/// Why the workers did not switch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwitchError {
    #[error("no worker is alive")]
    NoneAlive,
    #[error("worker {worker} cannot take the new configuration: {reason}")]
    Refused { worker: usize, reason: String },
    #[error("workers {0:?} did not answer within {WORKER_ANSWER:?}; nothing changed")]
    NoAnswer(Vec<usize>),
    /// The commit went out but not every worker confirmed it: those listed may still run the
    /// previous configuration.
    #[error("workers {0:?} did not confirm the switch within {WORKER_ANSWER:?}")]
    Unconfirmed(Vec<usize>),
}

/// Makes every live worker of `links` switch to `generation`, with `updates[i]` for worker
/// `i`, or none of them. A worker that is gone (its thread ended: it died) cannot take
/// anything and holds nobody's requests: the live ones switch without it, and it is
/// reported. Blocks for at most twice `wait`.
///
/// # Errors
/// [`SwitchError`]; all but [`SwitchError::Unconfirmed`] leave every worker as it was.
pub fn switch<U>(
    links: &[Link<U>],
    updates: Vec<U>,
    generation: u64,
    wait: Duration,
) -> Result<Switched, SwitchError> {
    let (tx, rx) = std_mpsc::channel();
    let mut gone = Vec::new();
    for (worker, (link, update)) in links.iter().zip(updates).enumerate() {
        let prepare = Command::Prepare {
            generation,
            update,
            reply: tx.clone(),
        };
        if link.send(prepare).is_err() {
            gone.push(worker);
        }
    }
    let live: Vec<usize> = (0..links.len()).filter(|w| !gone.contains(w)).collect();
    if live.is_empty() && !links.is_empty() {
        return Err(SwitchError::NoneAlive);
    }
    let abort_all = || {
        for link in links {
            let _ = link.send(Command::Abort { generation });
        }
    };
    if let Err(e) = collect(&rx, &live, wait) {
        abort_all();
        return Err(match e {
            Missing::Refused(worker, reason) => SwitchError::Refused { worker, reason },
            Missing::Silent(workers) => SwitchError::NoAnswer(workers),
        });
    }
    for &w in &live {
        let commit = Command::Commit {
            generation,
            reply: tx.clone(),
        };
        if links.get(w).is_some_and(|l| l.send(commit).is_err()) {
            // It died between the phases: it holds nothing any more either.
            gone.push(w);
        }
    }
    let live: Vec<usize> = live.into_iter().filter(|w| !gone.contains(w)).collect();
    collect(&rx, &live, wait).map_err(|e| match e {
        Missing::Refused(worker, _) => SwitchError::Unconfirmed(vec![worker]),
        Missing::Silent(workers) => SwitchError::Unconfirmed(workers),
    })?;
    Ok(Switched { gone })
}

/// A switch that happened: the workers that were gone (dead) and did not take part.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Switched {
    pub gone: Vec<usize>,
}

enum Missing {
    Refused(usize, String),
    Silent(Vec<usize>),
}

/// Waits for a positive answer from each of `workers`.
fn collect(
    rx: &std_mpsc::Receiver<Answer>,
    workers: &[usize],
    wait: Duration,
) -> Result<(), Missing> {
    let deadline = Instant::now() + wait;
    let mut waiting: Vec<usize> = workers.to_vec();
    while !waiting.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Answer { worker, result }) => {
                if let Err(reason) = result {
                    return Err(Missing::Refused(worker, reason));
                }
                waiting.retain(|w| *w != worker);
            }
            Err(_) => return Err(Missing::Silent(waiting)),
        }
    }
    Ok(())
}

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
    if tcp_listener(&old.listen.tcp) != tcp_listener(&new.listen.tcp) {
        v.push(
            "listen.tcp.enabled / listen.tcp.port / listen.tcp.max_connections need a restart"
                .to_owned(),
        );
    }
    if old.workers != new.workers {
        v.push("workers needs a restart".to_owned());
    }
    let (a, b) = (&old.quic, &new.quic);
    if (a.cid_len, &a.server_id, a.generation) != (b.cid_len, &b.server_id, b.generation) {
        v.push("quic.cid_len / quic.server_id / quic.generation need a restart".to_owned());
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
    if old.control_socket != new.control_socket {
        v.push("control_socket needs a restart".to_owned());
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
        let old = self.current();
        if config.steering.xdp_mode != old.config.steering.xdp_mode {
            tracing::warn!("steering.xdp_mode changes take effect at the next start");
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

#[cfg(test)]
mod tests;
