//! `spooky status`: what a running Spooky's pinned BPF maps say — the steering mode, the
//! Initial rate limit in force, the generations in use (the newest process, and during a
//! takeover the one draining), the workers of each (CPU, liveness, user-space counters), backend
//! health per pool, and the XDP per-CPU counters — read straight from the pins under
//! `steering.pin_path`. There is no API of the running process involved: the same numbers are
//! what `bpftool map dump pinned …` prints.
//!
//! [`read`] collects a [`Status`] (serialisable: `--json`); [`render`] makes the table.
//! Reading needs CAP_BPF (root), like `bpftool`.

use crate::health::HealthState;
use crate::steering::ebpf::{EbpfError, PinnedMaps};
use crate::steering::Mode;
use serde::Serialize;
use spooky_common::maps::{slot, Counter, CONFIG_MAP, MAX_GENERATIONS};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Nothing is pinned there.
    #[error(
        "no pinned maps at {}: Spooky is not running with eBPF steering there (classic BPF \
         steering, used when Spooky is not root, pins nothing; or another steering.pin_path is \
         configured)",
        path.display()
    )]
    NotRunning {
        /// The pin path looked at.
        path: PathBuf,
    },
    /// A pin exists but could not be read (not root, not a Spooky map).
    #[error("{0}")]
    Maps(#[from] EbpfError),
}

/// Everything `spooky status` shows.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Status {
    /// Where the maps are pinned.
    pub pin_path: PathBuf,
    /// The steering mode in force (`sk-reuseport`, `xdp-native`, `xdp-generic`).
    pub mode: String,
    /// Process id of the Spooky that pinned the maps.
    pub pid: u32,
    /// UDP port of the QUIC listener.
    pub quic_port: u16,
    /// Interface index XDP is attached to (0: none), in Spooky's network namespace.
    pub ifindex: u32,
    /// XDP redirects each packet to its worker's CPU (the workers are pinned).
    pub cpu_redirect: bool,
    /// Its name (None without XDP).
    pub iface: Option<String>,
    /// Initial-flood defense: client Initials per second per source prefix (0: off).
    pub initial_rate: u32,
    /// Initials a prefix may send at once above the rate.
    pub initial_burst: u32,
    /// Source prefixes the rate limit tracks now (entries of `initial_limits`).
    pub initial_prefixes: usize,
    /// The connection-ID generation new connections go to.
    pub newest_generation: u8,
    /// Every generation a live process owns (the newest, and any still draining).
    pub generations: Vec<GenerationStatus>,
    /// One row per worker of every generation in use.
    pub workers: Vec<WorkerStatus>,
    /// Backend health, per upstream pool in configuration order.
    pub pools: Vec<PoolStatus>,
    /// The XDP per-CPU counters.
    pub counters: Vec<CounterStatus>,
}

/// One process steering knows: an entry of the `generations` map.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct GenerationStatus {
    pub generation: u8,
    pub workers: u32,
    /// Whether it takes new connections (false: it is draining after a takeover).
    pub accepting: bool,
    pub pid: u32,
    /// Start time, seconds since the epoch.
    pub started: u32,
}

/// One worker: the `workers` map, XDP's count of packets placed on it, and the user-space
/// counters from `worker_counters`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Index among its generation's workers.
    pub index: u32,
    /// Its entry in the per-worker maps (`spooky_common::maps::slot`).
    pub slot: u32,
    pub cpu: u32,
    pub alive: bool,
    pub generation: u32,
    /// QUIC packets XDP placed on this worker (0 without XDP).
    pub xdp_packets: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub misrouted: u64,
    pub dropped: u64,
    pub connections_accepted: u64,
    pub connections_active: u64,
    pub requests: u64,
}

/// The backends of one upstream pool.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PoolStatus {
    pub name: String,
    pub backends: Vec<BackendStatus>,
}

/// One entry of the `backends` map.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackendStatus {
    /// Key in the `backends` map.
    pub index: u32,
    pub id: String,
    /// `healthy`, `unhealthy`, `ejected`, `recovering` (or `unknown(N)`).
    pub state: String,
    pub consecutive_failures: u32,
    pub last_latency_us: u64,
    pub ewma_latency_us: u64,
    pub in_flight: u32,
}

/// One XDP counter: its total and its value on each possible CPU.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CounterStatus {
    pub name: String,
    pub total: u64,
    pub per_cpu: Vec<u64>,
}

impl Status {
    /// The counter named `name` (see `spooky_common::maps::Counter::name`).
    pub fn counter(&self, name: &str) -> Option<&CounterStatus> {
        self.counters.iter().find(|c| c.name == name)
    }
}

/// Reads the maps pinned under `pin_path`.
///
/// # Errors
/// [`StatusError::NotRunning`] when nothing is pinned there; [`StatusError::Maps`] when a pin
/// cannot be opened or read.
pub fn read(pin_path: &Path) -> Result<Status, StatusError> {
    if !pin_path.join(CONFIG_MAP).exists() {
        return Err(StatusError::NotRunning {
            path: pin_path.to_path_buf(),
        });
    }
    let maps = PinnedMaps::open(pin_path)?;
    let config = maps.config()?;
    let mode = Mode::from_code(config.mode).map_or_else(
        || format!("unknown({})", config.mode),
        |m| m.name().to_string(),
    );
    let mut generations = Vec::new();
    let mut workers = Vec::new();
    for generation in 0..MAX_GENERATIONS as u8 {
        let entry = maps.generation(generation)?;
        if entry.live_workers() == 0 {
            continue;
        }
        generations.push(GenerationStatus {
            generation,
            workers: entry.live_workers(),
            accepting: entry.accepting != 0,
            pid: entry.pid,
            started: entry.started,
        });
        for index in 0..entry.live_workers() {
            workers.push(worker_status(&maps, generation, index)?);
        }
    }
    let mut pools: Vec<PoolStatus> = Vec::new();
    for (index, entry) in maps.backends()?.iter().enumerate() {
        let pool = String::from_utf8_lossy(entry.pool_bytes()).into_owned();
        let backend = BackendStatus {
            index: index as u32,
            id: String::from_utf8_lossy(entry.name_bytes()).into_owned(),
            state: HealthState::from_u32(entry.state)
                .map_or_else(|| format!("unknown({})", entry.state), |s| s.to_string()),
            consecutive_failures: entry.consecutive_failures,
            last_latency_us: entry.last_latency_us,
            ewma_latency_us: entry.ewma_latency_us,
            in_flight: entry.in_flight,
        };
        match pools.last_mut() {
            Some(last) if last.name == pool => last.backends.push(backend),
            _ => pools.push(PoolStatus {
                name: pool,
                backends: vec![backend],
            }),
        }
    }
    let stats = maps.stats()?;
    let counters = Counter::ALL
        .iter()
        .map(|&c| CounterStatus {
            name: c.name().to_string(),
            total: stats.total(c),
            per_cpu: stats.per_cpu(c),
        })
        .collect();
    Ok(Status {
        pin_path: pin_path.to_path_buf(),
        mode,
        pid: config.pid,
        quic_port: config.quic_port,
        ifindex: config.ifindex,
        cpu_redirect: config.has(spooky_common::maps::FLAG_REDIRECT_CPU),
        iface: (config.ifindex != 0)
            .then(|| String::from_utf8_lossy(config.iface_bytes()).into_owned()),
        initial_rate: config.initial_rate,
        initial_burst: config.initial_burst,
        initial_prefixes: maps.initial_limits().len(),
        newest_generation: config.generation,
        generations,
        workers,
        pools,
        counters,
    })
}

fn worker_status(maps: &PinnedMaps, generation: u8, index: u32) -> Result<WorkerStatus, EbpfError> {
    let slot = slot(generation, index);
    let entry = maps.worker(slot)?;
    let counters = maps.worker_counters(slot)?;
    Ok(WorkerStatus {
        index,
        slot,
        cpu: entry.cpu,
        alive: entry.is_alive(),
        generation: entry.generation,
        xdp_packets: maps.worker_packets(slot)?.iter().sum(),
        packets_in: counters.packets_in,
        packets_out: counters.packets_out,
        misrouted: counters.misrouted,
        dropped: counters.dropped,
        connections_accepted: counters.connections_accepted,
        connections_active: counters.connections_active,
        requests: counters.requests,
    })
}

/// The human-readable tables of `spooky status`.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let iface = match (&status.iface, status.ifindex) {
        (_, 0) => "-".to_string(),
        (Some(name), i) => format!("{name} (ifindex {i})"),
        (None, i) => format!("ifindex {i}"),
    };
    let _ = writeln!(
        out,
        "steering: {}   pid: {}   quic port: {}   xdp interface: {}   cpu redirect: {}   pins: {}",
        status.mode,
        status.pid,
        status.quic_port,
        iface,
        if status.cpu_redirect { "on" } else { "off" },
        status.pin_path.display()
    );
    let limit = if status.initial_rate == 0 {
        "off".to_string()
    } else {
        format!(
            "{}/s per prefix (/24, /56), burst {}; {}× per /16 and /48 ({} prefixes tracked)",
            status.initial_rate,
            status.initial_burst,
            spooky_common::maps::WIDE_PREFIX_FACTOR,
            status.initial_prefixes
        )
    };
    let _ = writeln!(out, "initial rate limit: {limit}");
    let _ = writeln!(
        out,
        "\ngenerations (new connections go to {})",
        status.newest_generation
    );
    let _ = writeln!(
        out,
        "  {:>3} {:>8} {:<9} {:>8} {:>12}",
        "gen", "workers", "state", "pid", "started"
    );
    for g in &status.generations {
        let _ = writeln!(
            out,
            "  {:>3} {:>8} {:<9} {:>8} {:>12}",
            g.generation,
            g.workers,
            if g.accepting { "accepting" } else { "draining" },
            g.pid,
            g.started
        );
    }
    let _ = writeln!(out, "\nworkers");
    let _ = writeln!(
        out,
        "  {:>6} {:>4} {:>5} {:>4} {:>12} {:>12} {:>12} {:>10} {:>9} {:>9} {:>7} {:>10}",
        "worker",
        "cpu",
        "alive",
        "gen",
        "xdp_packets",
        "packets_in",
        "packets_out",
        "misrouted",
        "dropped",
        "accepted",
        "active",
        "requests"
    );
    for w in &status.workers {
        let _ = writeln!(
            out,
            "  {:>6} {:>4} {:>5} {:>4} {:>12} {:>12} {:>12} {:>10} {:>9} {:>9} {:>7} {:>10}",
            w.index,
            w.cpu,
            if w.alive { "yes" } else { "no" },
            w.generation,
            w.xdp_packets,
            w.packets_in,
            w.packets_out,
            w.misrouted,
            w.dropped,
            w.connections_accepted,
            w.connections_active,
            w.requests
        );
    }
    for pool in &status.pools {
        let _ = writeln!(out, "\npool {}", pool.name);
        let _ = writeln!(
            out,
            "  {:<24} {:<11} {:>9} {:>12} {:>12} {:>9}",
            "backend", "state", "failures", "last_us", "ewma_us", "in_flight"
        );
        for b in &pool.backends {
            let _ = writeln!(
                out,
                "  {:<24} {:<11} {:>9} {:>12} {:>12} {:>9}",
                b.id,
                b.state,
                b.consecutive_failures,
                b.last_latency_us,
                b.ewma_latency_us,
                b.in_flight
            );
        }
    }
    let cpus = status.counters.first().map_or(0, |c| c.per_cpu.len());
    let _ = writeln!(out, "\nxdp counters (per CPU)");
    let mut header = format!("  {:<26} {:>12}", "counter", "total");
    for cpu in 0..cpus {
        let _ = write!(header, " {:>10}", format!("cpu{cpu}"));
    }
    let _ = writeln!(out, "{header}");
    for c in &status.counters {
        let mut line = format!("  {:<26} {:>12}", c.name, c.total);
        for v in &c.per_cpu {
            let _ = write!(line, " {v:>10}");
        }
        let _ = writeln!(out, "{line}");
    }
    out
}
