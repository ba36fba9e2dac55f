//! Kernel steering of QUIC packets to the worker that owns their connection: choosing the
//! tier, attaching it, and undoing it on shutdown (see the tiers in `docs/architecture.md`
//! and the operator's view in `docs/ebpf.md`).
//!
//! - Classic BPF (always available, no privilege): a program on the SO_REUSEPORT group that
//!   returns the worker index read from the DCID's worker byte (short headers, and long
//!   headers whose DCID is one of ours), or `fnv1a32(DCID) % workers` for client-chosen
//!   DCIDs — the same decision as [`spooky_common::cid::steer`], which the unit tests check by
//!   running the program in an interpreter here. A packet that still lands on the wrong worker
//!   is forwarded in user space and counted as misrouted.
//! - eBPF (root): the `spooky_reuseport` program picks the worker's socket from the
//!   `sockets` map and skips workers marked dead in `workers`; with an interface, XDP also
//!   runs there and redirects each QUIC packet to its worker's CPU. The maps are pinned under
//!   `steering.pin_path` while Spooky runs; a thread mirrors the workers' user-space counters
//!   into `worker_counters`, and the health checker mirrors backend health into `backends`.
//!   The XDP program also rate-limits client Initials per source prefix
//!   (`steering.initial_rate` / `initial_burst`, written into the `config` map here), and its
//!   per-CPU counters feed `/metrics` through [`Steering::ebpf_metrics`].
//!
//! The only automatic choice is the unprivileged default: without `--iface`, when the eBPF
//! object cannot be loaded (not root, BPF unavailable), classic BPF is used and the reason
//! logged. Anything asked for explicitly either works or fails start-up with the reason.

pub mod ebpf;

mod cbpf;
mod pins;

pub use cbpf::{interpret, reuseport_program, Insn};

use crate::config::XdpMode;
use crate::stats::WorkerStats;
use cbpf::attach_cbpf;
use ebpf::{BackendsMap, EbpfError, EbpfPrograms, StatsReader, WorkerCountersMap};
use pins::Pins;
use spooky_common::maps::{
    SteeringConfig, WorkerCounters, WorkerEntry, FLAG_REDIRECT_CPU, MODE_SK_REUSEPORT,
    MODE_XDP_GENERIC, MODE_XDP_NATIVE,
};
use spooky_common::CidLayout;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// Frames each CPU map entry may queue for its CPU.
const CPU_QUEUE_SIZE: u32 = 2048;
/// How often the steering thread copies the workers' counters into `worker_counters`.
const COUNTERS_PERIOD: Duration = Duration::from_millis(100);

/// The steering mode in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Classic BPF on the reuseport group; misroutes forwarded in user space.
    ClassicBpf,
    /// The `sk_reuseport` eBPF program picks the owning worker's socket.
    SkReuseport,
    /// `sk_reuseport` plus XDP on an interface, redirecting to the worker's CPU.
    Xdp {
        /// Native (driver) mode; generic (SKB) mode when false.
        native: bool,
    },
}

impl Mode {
    /// Whether an eBPF program places packets (the kernel is authoritative for client-chosen
    /// DCIDs, including skipping dead workers).
    pub fn is_ebpf(self) -> bool {
        !matches!(self, Mode::ClassicBpf)
    }

    /// A short stable name (`spooky status`, logs).
    pub fn name(self) -> &'static str {
        match self {
            Mode::ClassicBpf => "classic-bpf",
            Mode::SkReuseport => "sk-reuseport",
            Mode::Xdp { native: true } => "xdp-native",
            Mode::Xdp { native: false } => "xdp-generic",
        }
    }

    /// The `spooky_common::maps::MODE_*` value.
    pub fn code(self) -> u8 {
        match self {
            Mode::ClassicBpf => spooky_common::maps::MODE_NONE,
            Mode::SkReuseport => MODE_SK_REUSEPORT,
            Mode::Xdp { native: false } => MODE_XDP_GENERIC,
            Mode::Xdp { native: true } => MODE_XDP_NATIVE,
        }
    }

    /// The mode a `MODE_*` value names.
    pub fn from_code(code: u8) -> Option<Mode> {
        match code {
            MODE_SK_REUSEPORT => Some(Mode::SkReuseport),
            MODE_XDP_GENERIC => Some(Mode::Xdp { native: false }),
            MODE_XDP_NATIVE => Some(Mode::Xdp { native: true }),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            Mode::ClassicBpf => "reuseport cBPF by DCID; misroutes forwarded in user space",
            Mode::SkReuseport => "sk_reuseport eBPF picks the worker socket by DCID",
            Mode::Xdp { native: true } => "native XDP + cpumap redirect + sk_reuseport eBPF",
            Mode::Xdp { native: false } => "generic XDP + cpumap redirect + sk_reuseport eBPF",
        };
        write!(f, "{} ({what})", self.name())
    }
}

/// Why steering could not be set up as asked.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    /// No sockets to steer between.
    #[error("no sockets to steer")]
    NoSockets,
    /// Attaching the classic BPF program failed.
    #[error("SO_ATTACH_REUSEPORT_CBPF: {0}")]
    Classic(#[source] std::io::Error),
    /// `--iface` needs the eBPF programs, which could not be loaded.
    #[error("--iface {iface}: XDP steering needs root (CAP_BPF + CAP_NET_ADMIN) and a kernel with BTF: {source}")]
    Unavailable {
        /// The interface asked for.
        iface: String,
        /// Why loading failed.
        #[source]
        source: Box<EbpfError>,
    },
    /// The interface does not exist (in this network namespace).
    #[error("--iface {0}: no such network interface")]
    NoInterface(String),
    /// XDP could not be attached in the mode asked for.
    #[error("--iface {iface}: cannot attach XDP in {mode} mode: {source}")]
    XdpAttach {
        /// The interface.
        iface: String,
        /// The mode tried last.
        mode: &'static str,
        /// What the kernel said.
        #[source]
        source: Box<EbpfError>,
    },
    /// Setting up the eBPF tier (maps, sockets, sk_reuseport) failed.
    #[error("eBPF steering: {0}")]
    Ebpf(#[source] Box<EbpfError>),
    /// The pin path is not on a BPF filesystem and none could be mounted.
    #[error("pin path {}: {reason}", path.display())]
    PinPath {
        /// `steering.pin_path`.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The steering thread could not be started.
    #[error("cannot start the steering thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl From<EbpfError> for SteeringError {
    fn from(e: EbpfError) -> Self {
        SteeringError::Ebpf(Box::new(e))
    }
}

/// The steering in force; keep it alive while the proxy runs. [`Steering::detach`] (or
/// dropping it) detaches XDP, stops the counters thread and removes the pins this process
/// made.
pub(crate) struct Steering {
    mode: Mode,
    kernel: Option<Kernel>,
}

impl fmt::Debug for Steering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Steering")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// What the eBPF tiers hold while running.
struct Kernel {
    programs: EbpfPrograms,
    xdp: Option<(String, aya::programs::xdp::XdpLinkId)>,
    pins: Pins,
    counters: Option<CountersThread>,
    /// The `stats` map through a descriptor of its own, opened at attach time (while still
    /// privileged), for `/metrics`.
    stats: Option<Arc<StatsReader>>,
    /// The `backends` map, until the health checker takes it.
    backends: Option<BackendsMap>,
}

/// Extra metrics lines the kernel programs contribute: (counter, cpu, value).
pub(crate) type ExtraMetrics = Box<dyn Fn() -> Vec<(String, String, u64)> + Send + Sync>;

/// What steering is set up from.
pub(crate) struct Plan<'a> {
    pub layout: CidLayout,
    /// This process's connection-ID generation.
    pub generation: u8,
    pub server_id_len: u8,
    pub settings: &'a crate::config::Steering,
    /// `--iface`: attach XDP there.
    pub iface: Option<&'a str>,
    /// Workers are pinned to CPUs 0..N.
    pub pin: bool,
    /// The workers' counters, mirrored into `worker_counters`.
    pub stats: &'a [Arc<WorkerStats>],
}

impl Steering {
    /// The mode in force.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Where the maps are pinned (eBPF tiers only).
    pub fn pin_path(&self) -> Option<&Path> {
        self.kernel.as_ref().map(|k| k.pins.dir.as_path())
    }

    /// The `spooky_ebpf_packets_total{counter,cpu}` source for `/metrics` (eBPF tiers only):
    /// a closure reading the per-CPU `stats` map through its own file descriptor, so it is
    /// `Send + Sync` and can be called from the admin thread at scrape time. The descriptor
    /// was opened when steering was attached, so this works after privileges are dropped. A
    /// failed read yields no lines (and a debug log), never an error page.
    pub fn ebpf_metrics(&self) -> Option<ExtraMetrics> {
        let reader = self.kernel.as_ref()?.stats.clone()?;
        Some(Box::new(move || match reader.read() {
            Ok(stats) => stats.metric_lines(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the XDP counters");
                Vec::new()
            }
        }))
    }

    /// The `backends` map for the health checker to publish into (eBPF tiers; once).
    pub fn take_backends(&mut self) -> Option<BackendsMap> {
        self.kernel.as_mut()?.backends.take()
    }

    /// Detaches XDP, writes the final counters, removes our pins. Idempotent.
    pub fn detach(mut self) {
        self.detach_inner();
    }

    fn detach_inner(&mut self) {
        let Some(mut kernel) = self.kernel.take() else {
            return;
        };
        if let Some(counters) = kernel.counters.take() {
            counters.stop();
        }
        if let Some((iface, link)) = kernel.xdp.take() {
            match kernel.programs.detach_xdp(link) {
                Ok(()) => tracing::info!(iface, "XDP detached"),
                Err(e) => tracing::warn!(iface, error = %e, "cannot detach XDP"),
            }
        }
        kernel.pins.remove();
        tracing::info!(mode = self.mode.name(), "eBPF steering detached");
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        self.detach_inner();
    }
}

/// Attaches the steering asked for (`plan.iface`, `steering.xdp_mode` in the config) to the
/// reuseport group `sockets` (index = worker index).
///
/// # Errors
/// [`SteeringError`] when the requested mode cannot be had: never a silent downgrade.
pub(crate) fn attach(
    sockets: &[std::net::UdpSocket],
    plan: &Plan<'_>,
) -> Result<Steering, SteeringError> {
    let Some(first) = sockets.first() else {
        return Err(SteeringError::NoSockets);
    };
    let programs = match (EbpfPrograms::load(), plan.iface) {
        (Ok(programs), _) => programs,
        (Err(source), Some(iface)) => {
            return Err(SteeringError::Unavailable {
                iface: iface.to_string(),
                source: Box::new(source),
            })
        }
        (Err(reason), None) => {
            tracing::info!(
                %reason,
                "eBPF steering unavailable (not root, or no BPF): using classic BPF steering"
            );
            let prog = reuseport_program(&plan.layout, sockets.len() as u32);
            attach_cbpf(first, &prog).map_err(SteeringError::Classic)?;
            return Ok(Steering {
                mode: Mode::ClassicBpf,
                kernel: None,
            });
        }
    };
    let (kernel, mode) = attach_ebpf(programs, sockets, plan)?;
    Ok(Steering {
        mode,
        kernel: Some(kernel),
    })
}

/// The CPU worker `index` runs on (pinned: its own; else spread over the CPUs).
fn worker_cpu(index: usize, workers: usize, pin: bool) -> u32 {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let pinned = pin && cpus >= workers;
    let cpu = if pinned { index } else { index % cpus };
    u32::try_from(cpu).unwrap_or(0)
}

fn attach_ebpf(
    mut programs: EbpfPrograms,
    sockets: &[std::net::UdpSocket],
    plan: &Plan<'_>,
) -> Result<(Kernel, Mode), SteeringError> {
    let workers = sockets.len();
    let port = sockets
        .first()
        .and_then(|s| s.local_addr().ok())
        .map_or(0, |a| a.port());
    let layout = &plan.layout;
    let generation = plan.generation;
    let mut config = SteeringConfig {
        quic_port: port,
        cid_len: layout.cid_len() as u8,
        server_id_len: plan.server_id_len,
        generation,
        mode: MODE_SK_REUSEPORT,
        reserved: [0; 2],
        workers: workers as u32,
        flags: 0,
        pid: std::process::id(),
        ifindex: 0,
        iface: [0; spooky_common::maps::IFACE_LEN],
        initial_rate: plan.settings.initial_rate,
        initial_burst: plan.settings.initial_burst,
    };
    programs.set_config(&config)?;
    for (index, socket) in sockets.iter().enumerate() {
        let entry = WorkerEntry {
            cpu: worker_cpu(index, workers, plan.pin),
            alive: 1,
            generation: u32::from(generation),
        };
        programs.set_worker(index as u32, &entry)?;
        programs.set_worker_socket(index as u32, socket)?;
    }
    if let Some(first) = sockets.first() {
        programs.attach_reuseport(first)?;
    }
    let xdp = match plan.iface {
        None => None,
        Some(iface) => {
            let ifindex = interface_index(iface)?;
            for index in 0..workers {
                programs.enable_cpu(worker_cpu(index, workers, plan.pin), CPU_QUEUE_SIZE)?;
            }
            // Redirect only once the CPU map is filled.
            config.flags = FLAG_REDIRECT_CPU;
            config.ifindex = ifindex;
            config.iface = SteeringConfig::iface_name(iface.as_bytes());
            programs.set_config(&config)?;
            let (link, native) = attach_xdp(&mut programs, iface, plan.settings.xdp_mode)?;
            config.mode = if native {
                MODE_XDP_NATIVE
            } else {
                MODE_XDP_GENERIC
            };
            programs.set_config(&config)?;
            Some((iface.to_string(), link))
        }
    };
    let pins = Pins::create(&programs, &plan.settings.pin_path)?;
    let backends = programs.take_backends()?;
    let counters = CountersThread::start(programs.take_worker_counters()?, plan.stats.to_vec())
        .map_err(SteeringError::Thread)?;
    tracing::info!(pin_path = %pins.dir.display(), "eBPF maps pinned");
    let mode = Mode::from_code(config.mode).unwrap_or(Mode::SkReuseport);
    let stats = match programs.stats_reader() {
        Ok(reader) => Some(Arc::new(reader)),
        Err(e) => {
            tracing::warn!(error = %e, "XDP counters not available to /metrics");
            None
        }
    };
    let kernel = Kernel {
        programs,
        xdp,
        pins,
        counters: Some(counters),
        stats,
        backends: Some(backends),
    };
    Ok((kernel, mode))
}

fn interface_index(iface: &str) -> Result<u32, SteeringError> {
    let name =
        std::ffi::CString::new(iface).map_err(|_| SteeringError::NoInterface(iface.to_string()))?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(SteeringError::NoInterface(iface.to_string()));
    }
    Ok(index)
}

/// Attaches XDP in `mode`; `Auto` tries native, then generic, and logs which it got.
/// Returns the link and whether it is native.
fn attach_xdp(
    programs: &mut EbpfPrograms,
    iface: &str,
    mode: XdpMode,
) -> Result<(aya::programs::xdp::XdpLinkId, bool), SteeringError> {
    use aya::programs::XdpMode as Flags;
    let fail = |mode: &'static str| {
        let iface = iface.to_string();
        move |source| SteeringError::XdpAttach {
            iface,
            mode,
            source: Box::new(source),
        }
    };
    match mode {
        XdpMode::Native => {
            let link = programs
                .attach_xdp(iface, Flags::Driver)
                .map_err(fail("native"))?;
            Ok((link, true))
        }
        XdpMode::Generic => {
            let link = programs
                .attach_xdp(iface, Flags::Skb)
                .map_err(fail("generic"))?;
            Ok((link, false))
        }
        XdpMode::Auto => match programs.attach_xdp(iface, Flags::Driver) {
            Ok(link) => {
                tracing::info!(iface, "xdp_mode auto: attached in native (driver) mode");
                Ok((link, true))
            }
            Err(native_error) => {
                let link = programs
                    .attach_xdp(iface, Flags::Skb)
                    .map_err(fail("generic (after native failed)"))?;
                tracing::info!(
                    iface,
                    native_error = %native_error,
                    "xdp_mode auto: native mode refused, attached in generic (SKB) mode"
                );
                Ok((link, false))
            }
        },
    }
}

/// The thread copying the workers' counters into `worker_counters` every
/// [`COUNTERS_PERIOD`], and once more when stopped.
struct CountersThread {
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl CountersThread {
    fn start(mut map: WorkerCountersMap, stats: Vec<Arc<WorkerStats>>) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("spooky-steering".into())
            .spawn(move || loop {
                write_counters(&mut map, &stats);
                match stopped.recv_timeout(COUNTERS_PERIOD) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                        write_counters(&mut map, &stats);
                        return;
                    }
                }
            })?;
        Ok(Self { stop, thread })
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

fn write_counters(map: &mut WorkerCountersMap, stats: &[Arc<WorkerStats>]) {
    for (index, s) in stats.iter().enumerate() {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let counters = WorkerCounters {
            packets_in: load(&s.packets_in),
            packets_out: load(&s.packets_out),
            misrouted: load(&s.misrouted),
            dropped: load(&s.dropped),
            connections_accepted: load(&s.connections_accepted),
            connections_active: load(&s.connections_active),
            requests: load(&s.requests),
        };
        if let Err(e) = map.set(index as u32, &counters) {
            tracing::debug!(worker = index, error = %e, "cannot write worker counters");
        }
    }
}
