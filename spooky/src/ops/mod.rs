//! The control plane: the admin listener ([`admin`]), the Prometheus exposition
//! ([`metrics`]), live reload ([`reload`]: reading, validating and building a configuration,
//! then switching the workers through their control protocol), `spooky status` ([`status`])
//! and the takeover control socket ([`takeover`]). It sits above the workers and only reads
//! what they count; the telemetry they write to is `crate::telemetry`.

pub(crate) mod admin;
/// The admin listener's bounds (see `admin`).
pub use admin::{H1_TIMEOUT as ADMIN_H1_TIMEOUT, MAX_CONNECTIONS as ADMIN_MAX_CONNECTIONS};
pub(crate) mod metrics;
pub mod reload;
pub mod status;
pub(crate) mod takeover;

use crate::stats::{Metrics, WorkerStats};
use crate::steering::ExtraMetrics;
use std::sync::Arc;

/// What the admin listener reads and does: the reloader (and through it the snapshot in
/// force), the process's counters, and the kernel programs' counters.
pub(crate) struct Ops {
    pub reloader: Arc<reload::Reloader>,
    pub stats: Vec<Arc<WorkerStats>>,
    pub metrics: Arc<Metrics>,
    pub access_log: Arc<crate::telemetry::access_log::AccessLogger>,
    /// The XDP counters (eBPF tiers).
    pub ebpf: Option<ExtraMetrics>,
    /// The steering mode, as logged at start.
    pub mode: String,
    /// This process's connection-ID generation.
    pub generation: u8,
    /// Bit `i` set: worker `i` died (its thread ended while the process serves).
    pub dead_workers: Arc<crate::board::AtomicWorkerSet>,
    /// True once the process drains (shutdown): `/readyz` answers 503 from then on, so load
    /// balancers stop sending new clients.
    pub draining: tokio::sync::watch::Receiver<bool>,
    /// What the workers share, among it whether the host is drained (`POST /drain`).
    pub policy: Arc<crate::policy::Policy>,
}

impl Ops {
    /// The workers that died, in index order.
    pub fn dead_workers(&self) -> Vec<usize> {
        self.dead_workers.load().iter().collect()
    }
}

impl Ops {
    /// `/metrics` text.
    pub fn metrics_text(&self) -> String {
        metrics::render(self)
    }
}
