//! Live configuration: the snapshot in force ([`Live::current`]) and reloads.
//!
//! A reload (SIGHUP or `POST /reload`) reads and validates the file again. An invalid file, or
//! one that changes a setting that needs a restart (listen address, worker count, connection-ID
//! layout, steering), is refused with the reason and nothing changes. A valid one becomes a new
//! [`Shared`] snapshot: health state carries over for backends that keep their id and address,
//! the control thread restarts its probers, and every worker receives the snapshot over a
//! `watch` channel and swaps it in between two batches of packets. New requests follow the
//! new routes, pools and balancers; requests in flight finish on the snapshot they started
//! with; QUIC connections stay up; new handshakes use the new certificate.

use crate::config::Config;
use crate::server::Shared;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::watch;

/// Settings a reload cannot change, compared between the running and the new config.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut v = Vec::new();
    if old.listen.addr != new.listen.addr {
        v.push(format!(
            "listen address {} → {} needs a restart",
            old.listen.addr, new.listen.addr
        ));
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
    v
}

/// Extra metrics lines a kernel-steering backend can contribute (the XDP counters).
pub type ExtraMetrics = Box<dyn Fn() -> Vec<(String, String, u64)> + Send + Sync>;

/// What applies a validated config: builds the next snapshot and hands it to the health
/// checker (the server provides it).
pub type Applier = Box<dyn Fn(&Arc<Shared>, Config) -> Result<Arc<Shared>, String> + Send + Sync>;

/// The configuration in force and the means to change it.
pub struct Live {
    current: RwLock<Arc<Shared>>,
    generation: AtomicU64,
    path: Option<PathBuf>,
    mode: String,
    to_workers: watch::Sender<Arc<Shared>>,
    applier: Applier,
    extra_metrics: Mutex<Option<ExtraMetrics>>,
    reloading: Mutex<()>,
    /// Reloads the log filter (level) in place.
    log_level: Mutex<Option<crate::ops::telemetry::LevelReloader>>,
}

impl Live {
    /// The starting snapshot; `path` is where reloads read from (`None`: reload refused).
    pub fn new(
        shared: Arc<Shared>,
        path: Option<PathBuf>,
        mode: String,
        applier: Applier,
    ) -> (Arc<Self>, watch::Receiver<Arc<Shared>>) {
        let (tx, rx) = watch::channel(shared.clone());
        let live = Arc::new(Self {
            current: RwLock::new(shared),
            generation: AtomicU64::new(1),
            path,
            mode,
            to_workers: tx,
            applier,
            extra_metrics: Mutex::new(None),
            reloading: Mutex::new(()),
            log_level: Mutex::new(None),
        });
        (live, rx)
    }

    /// The snapshot in force.
    pub fn current(&self) -> Arc<Shared> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// 1 at start, +1 per successful reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The steering mode, as logged at start.
    pub fn mode(&self) -> String {
        self.mode.clone()
    }

    /// Installs the XDP-counter source for `/metrics`.
    pub fn set_extra_metrics(&self, f: ExtraMetrics) {
        *self.extra_metrics.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Installs the function that changes the log filter on reload.
    pub fn set_log_reloader(&self, f: crate::ops::telemetry::LevelReloader) {
        *self.log_level.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// `/metrics` text.
    pub fn metrics_text(&self) -> String {
        let extra = self
            .extra_metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|f| f())
            .unwrap_or_default();
        crate::ops::metrics::render(&self.current(), self.generation(), &extra)
    }

    /// Re-reads the configuration file and applies it.
    ///
    /// # Errors
    /// Every validation error, or the restart-only settings that changed; nothing changes then.
    pub fn reload(&self) -> Result<String, String> {
        let result = match &self.path {
            None => Err("this process was started without a configuration file".to_owned()),
            Some(path) => Config::from_path(path)
                .map_err(|e| e.to_string())
                .and_then(|c| self.apply(c)),
        };
        let shared = self.current();
        match &result {
            Ok(summary) => {
                shared.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(generation = self.generation(), %summary, "configuration reloaded");
            }
            Err(e) => {
                shared
                    .metrics
                    .reloads_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "configuration reload refused; the running configuration stays");
            }
        }
        result
    }

    /// Applies an already validated configuration.
    ///
    /// # Errors
    /// The restart-only settings that changed, or what building the snapshot refused.
    pub fn apply(&self, mut config: Config) -> Result<String, String> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.current();
        if config.steering.xdp_mode != old.config.steering.xdp_mode {
            tracing::warn!("steering.xdp_mode changes take effect at the next start");
            config.steering.xdp_mode = old.config.steering.xdp_mode;
        }
        let refused = restart_only_changes(&old.config, &config);
        if !refused.is_empty() {
            return Err(refused.join("; "));
        }
        let level_changed = old.config.log.level != config.log.level;
        let level = config.log.level.clone();
        let next = (self.applier)(&old, config)?;
        if level_changed {
            if let Some(f) = self
                .log_level
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                f(&level)?;
            }
        }
        let backends: usize = next.config.upstreams.iter().map(|u| u.backends.len()).sum();
        let summary = format!(
            "generation {}: {} upstreams, {} backends",
            self.generation() + 1,
            next.config.upstreams.len(),
            backends
        );
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next.clone();
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self.to_workers.send(next.clone());
        // Return once every worker runs the new snapshot (they swap between two batches of
        // packets, so this takes microseconds unless a worker is stuck or gone).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while next
            .stats
            .iter()
            .any(|w| w.snapshots_applied.load(Ordering::Acquire) + 1 < generation)
        {
            if std::time::Instant::now() > deadline {
                tracing::warn!("reload: not every worker took the new configuration within 2 s");
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(summary)
    }
}
