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

use crate::config::XdpMode;
use crate::server::{RunOptions, Shared, WorkerStats};
use ebpf::{EbpfError, EbpfPrograms, StatsReader, WorkerCountersMap};
use spooky_common::cid::{FNV_OFFSET, FNV_PRIME};
use spooky_common::maps::{
    BackendEntry, SteeringConfig, WorkerCounters, WorkerEntry, FLAG_REDIRECT_CPU,
    MODE_SK_REUSEPORT, MODE_XDP_GENERIC, MODE_XDP_NATIVE, PINNED_MAPS,
};
use spooky_common::{CidLayout, MAX_CID_LEN};
use std::fmt;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// Frames each CPU map entry may queue for its CPU.
const CPU_QUEUE_SIZE: u32 = 2048;
/// How often the steering thread copies the workers' counters into `worker_counters`.
const COUNTERS_PERIOD: Duration = Duration::from_millis(100);
/// `statfs` magic of the BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where the BPF filesystem is mounted when a pin path below it has none.
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

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
pub struct Steering {
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
    pub fn ebpf_metrics(&self) -> Option<crate::ops::reload::ExtraMetrics> {
        let reader = self.kernel.as_ref()?.stats.clone()?;
        Some(Box::new(move || match reader.read() {
            Ok(stats) => stats.metric_lines(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the XDP counters");
                Vec::new()
            }
        }))
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

/// Attaches the steering asked for (`opts.iface`, `steering.xdp_mode` in the config) to the
/// reuseport group `sockets` (index = worker index).
///
/// # Errors
/// [`SteeringError`] when the requested mode cannot be had: never a silent downgrade.
pub fn attach(
    sockets: &[std::net::UdpSocket],
    shared: &Shared,
    opts: &RunOptions,
) -> Result<Steering, SteeringError> {
    let Some(first) = sockets.first() else {
        return Err(SteeringError::NoSockets);
    };
    let programs = match (EbpfPrograms::load(), opts.iface.as_deref()) {
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
            let prog = reuseport_program(&shared.layout, sockets.len() as u32);
            attach_cbpf(first, &prog).map_err(SteeringError::Classic)?;
            return Ok(Steering {
                mode: Mode::ClassicBpf,
                kernel: None,
            });
        }
    };
    let (kernel, mode) = attach_ebpf(programs, sockets, shared, opts)?;
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
    shared: &Shared,
    opts: &RunOptions,
) -> Result<(Kernel, Mode), SteeringError> {
    let workers = sockets.len();
    let port = sockets
        .first()
        .and_then(|s| s.local_addr().ok())
        .map_or(0, |a| a.port());
    let layout = &shared.layout;
    let generation = shared.config.quic.generation;
    let mut config = SteeringConfig {
        quic_port: port,
        cid_len: layout.cid_len() as u8,
        server_id_len: shared.config.quic.server_id.len() as u8,
        generation,
        mode: MODE_SK_REUSEPORT,
        reserved: [0; 2],
        workers: workers as u32,
        flags: 0,
        pid: std::process::id(),
        ifindex: 0,
        iface: [0; spooky_common::maps::IFACE_LEN],
        initial_rate: shared.config.steering.initial_rate,
        initial_burst: shared.config.steering.initial_burst,
    };
    programs.set_config(&config)?;
    for (index, socket) in sockets.iter().enumerate() {
        let entry = WorkerEntry {
            cpu: worker_cpu(index, workers, opts.pin),
            alive: 1,
            generation: u32::from(generation),
        };
        programs.set_worker(index as u32, &entry)?;
        programs.set_worker_socket(index as u32, socket)?;
    }
    if let Some(first) = sockets.first() {
        programs.attach_reuseport(first)?;
    }
    let xdp = match opts.iface.as_deref() {
        None => None,
        Some(iface) => {
            let ifindex = interface_index(iface)?;
            for index in 0..workers {
                programs.enable_cpu(worker_cpu(index, workers, opts.pin), CPU_QUEUE_SIZE)?;
            }
            // Redirect only once the CPU map is filled.
            config.flags = FLAG_REDIRECT_CPU;
            config.ifindex = ifindex;
            config.iface = SteeringConfig::iface_name(iface.as_bytes());
            programs.set_config(&config)?;
            let (link, native) = attach_xdp(&mut programs, iface, shared.config.steering.xdp_mode)?;
            config.mode = if native {
                MODE_XDP_NATIVE
            } else {
                MODE_XDP_GENERIC
            };
            programs.set_config(&config)?;
            Some((iface.to_string(), link))
        }
    };
    let pins = Pins::create(&programs, &shared.config.steering.pin_path)?;
    let mut backends = programs.take_backends()?;
    let mut index = 0;
    for (u, up) in shared.config.upstreams.iter().enumerate() {
        for (b, backend) in up.backends.iter().enumerate() {
            let entry = BackendEntry::named(
                u as u32,
                b as u32,
                up.name.as_bytes(),
                backend.id.as_bytes(),
            );
            backends.publish(index, &entry)?;
            index += 1;
        }
    }
    shared.health.mirror_to_bpf(backends);
    let counters = CountersThread::start(programs.take_worker_counters()?, shared.stats.clone())
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

/// The pins this process made: `(path, map id)`.
struct Pins {
    dir: PathBuf,
    pinned: Vec<(PathBuf, u32)>,
}

impl Pins {
    /// Pins every map of [`PINNED_MAPS`] under `dir`, mounting the BPF filesystem at
    /// `/sys/fs/bpf` when `dir` is below it and nothing is mounted there, and replacing pins
    /// a crashed process left behind.
    fn create(programs: &EbpfPrograms, dir: &Path) -> Result<Self, SteeringError> {
        ensure_bpffs(dir)?;
        std::fs::create_dir_all(dir).map_err(|e| SteeringError::PinPath {
            path: dir.to_path_buf(),
            reason: format!("cannot create the directory: {e}"),
        })?;
        let mut pins = Self {
            dir: dir.to_path_buf(),
            pinned: Vec::new(),
        };
        for name in PINNED_MAPS {
            if let Err(e) = pins.pin(programs, name) {
                pins.remove();
                return Err(e);
            }
        }
        Ok(pins)
    }

    fn pin(&mut self, programs: &EbpfPrograms, name: &'static str) -> Result<(), SteeringError> {
        let path = self.dir.join(name);
        if path.exists() {
            tracing::warn!(path = %path.display(), "replacing a stale pin (left by a process that did not shut down cleanly, or another Spooky using the same pin path)");
            std::fs::remove_file(&path).map_err(|e| SteeringError::PinPath {
                path: path.clone(),
                reason: format!("cannot remove the stale pin: {e}"),
            })?;
        }
        let id = programs.pin_map(name, &self.dir)?;
        self.pinned.push((path, id));
        Ok(())
    }

    /// Removes the pins that are still ours (a newer process may have replaced them).
    fn remove(&mut self) {
        for (path, id) in self.pinned.drain(..) {
            match crate::steering::ebpf::pinned_map_id(&path) {
                Ok(current) if current == id => {
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), error = %e, "cannot unpin");
                    }
                }
                _ => {
                    tracing::debug!(path = %path.display(), "pin replaced by another process; left alone")
                }
            }
        }
        // Only succeeds when empty: another process's pins keep the directory.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The filesystem type of `path`.
fn fs_type(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `statfs` is plain data; `c` is a valid path for the duration of the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` is a valid out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    (rc == 0).then_some(st.f_type as i64)
}

/// Makes sure `dir` (existing or to be created) is on a BPF filesystem.
fn ensure_bpffs(dir: &Path) -> Result<(), SteeringError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if fs_type(existing) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    let root = Path::new(BPF_FS_ROOT);
    if !dir.starts_with(root) || !(existing == root || root.starts_with(existing)) {
        return Err(SteeringError::PinPath {
            path: dir.to_path_buf(),
            reason: format!(
                "not on a BPF filesystem (mount one: `mount -t bpf bpf {}`)",
                existing.display()
            ),
        });
    }
    std::fs::create_dir_all(root).map_err(|e| SteeringError::PinPath {
        path: dir.to_path_buf(),
        reason: format!("cannot create {BPF_FS_ROOT}: {e}"),
    })?;
    let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
    let (source, target, fstype) = (c("bpf"), c(BPF_FS_ROOT), c("bpf"));
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call;
    // no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // Another thread or process may have mounted it meanwhile.
        if fs_type(root) != Some(BPF_FS_MAGIC) {
            return Err(SteeringError::PinPath {
                path: dir.to_path_buf(),
                reason: format!("no BPF filesystem at {BPF_FS_ROOT} and mounting one failed: {e}"),
            });
        }
    }
    tracing::info!(
        path = BPF_FS_ROOT,
        "no BPF filesystem was mounted: mounted bpffs at {BPF_FS_ROOT}"
    );
    Ok(())
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

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    /// Opcode.
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
const LD_MEM: u16 = 0x60; // BPF_LD | BPF_MEM
const ST: u16 = 0x02;
const TAX: u16 = 0x07; // BPF_MISC | BPF_TAX
const ALU_XOR_X: u16 = 0xac; // BPF_ALU | BPF_XOR | BPF_X
const ALU_MUL_K: u16 = 0x24;
const ALU_MOD_K: u16 = 0x94;
const ALU_AND_K: u16 = 0x54;
const ALU_RSH_K: u16 = 0x74;
const JMP_JGT_K: u16 = 0x25;
const JMP_JEQ_K: u16 = 0x15;
const JMP_JGE_K: u16 = 0x35;
const JMP_JSET_K: u16 = 0x45;
const JMP_JA: u16 = 0x05;
const RET_A: u16 = 0x16;
const RET_K: u16 = 0x06;
const LD_IMM: u16 = 0x00; // BPF_LD | BPF_W | BPF_IMM

fn i(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
    Insn { code, jt, jf, k }
}

/// The reuseport program for `layout` and `workers` sockets. It runs on the UDP payload.
pub fn reuseport_program(layout: &CidLayout, workers: u32) -> Vec<Insn> {
    let workers = workers.max(1);
    let w_off = layout.worker_offset() as u32;
    let cid_len = layout.cid_len() as u32;
    let mut p = Vec::new();
    // Jumps whose targets are patched once the targets exist: (insn index, true-branch?).
    let mut to_hash: Vec<(usize, bool)> = Vec::new();
    let mut to_ret: Vec<usize> = Vec::new();
    // A = first byte; long header → skip the short-header path.
    p.push(i(LD_B_ABS, 0, 0, 0));
    p.push(i(JMP_JSET_K, 2, 0, 0x80));
    // Short header: the DCID starts at 1; return its worker byte (out of range → kernel hash).
    p.push(i(LD_B_ABS, 0, 0, 1 + w_off));
    to_ret.push(p.len());
    p.push(i(JMP_JA, 0, 0, 0));
    // Long header: DCID length at 5 (kept in M[1]), DCID at 6.
    p.push(i(LD_B_ABS, 0, 0, 5));
    p.push(i(ST, 0, 0, 1));
    p.push(i(JMP_JGT_K, 0, 1, MAX_CID_LEN as u32));
    p.push(i(RET_K, 0, 0, 0)); // longer than QUIC allows: socket 0 (user space drops it)
    to_hash.push((p.len(), false));
    p.push(i(JMP_JEQ_K, 0, 0, cid_len)); // not our length → hash
    p.push(i(LD_B_ABS, 0, 0, 6));
    p.push(i(ALU_AND_K, 0, 0, 0x1f));
    to_hash.push((p.len(), false));
    p.push(i(JMP_JEQ_K, 0, 0, cid_len - 1)); // length bits differ → hash
    p.push(i(LD_B_ABS, 0, 0, 6));
    p.push(i(ALU_RSH_K, 0, 0, 5));
    to_hash.push((p.len(), true));
    p.push(i(JMP_JEQ_K, 0, 0, 7)); // unroutable generation → hash
    p.push(i(LD_B_ABS, 0, 0, 6 + w_off)); // ours: the worker byte, if it names a worker
    to_hash.push((p.len(), true));
    p.push(i(JMP_JGE_K, 0, 0, workers));
    to_ret.push(p.len());
    p.push(i(JMP_JA, 0, 0, 0));
    // Hash: M[0] = FNV offset; for each DCID byte below the length: M[0] = (M[0] ^ b) * prime.
    let hash_start = p.len();
    p.push(i(LD_IMM, 0, 0, FNV_OFFSET));
    p.push(i(ST, 0, 0, 0));
    let mut to_done = Vec::new();
    for idx in 0..MAX_CID_LEN as u32 {
        p.push(i(LD_MEM, 0, 0, 1));
        to_done.push(p.len());
        p.push(i(JMP_JGT_K, 0, 0, idx)); // len <= idx → done
        p.push(i(LD_B_ABS, 0, 0, 6 + idx));
        p.push(i(TAX, 0, 0, 0));
        p.push(i(LD_MEM, 0, 0, 0));
        p.push(i(ALU_XOR_X, 0, 0, 0));
        p.push(i(ALU_MUL_K, 0, 0, FNV_PRIME));
        p.push(i(ST, 0, 0, 0));
    }
    let done = p.len();
    p.push(i(LD_MEM, 0, 0, 0));
    p.push(i(ALU_MOD_K, 0, 0, workers));
    let ret = p.len();
    p.push(i(RET_A, 0, 0, 0));
    // Jump offsets are relative to the next instruction; every distance here is < 256.
    let rel = |from: usize, to: usize| (to - from - 1) as u8;
    for (at, on_true) in to_hash {
        if on_true {
            p[at].jt = rel(at, hash_start);
        } else {
            p[at].jf = rel(at, hash_start);
        }
    }
    for at in to_done {
        p[at].jf = rel(at, done);
    }
    for at in to_ret {
        p[at].k = (ret - at - 1) as u32;
    }
    p
}

fn attach_cbpf(socket: &std::net::UdpSocket, prog: &[Insn]) -> std::io::Result<()> {
    let filters: Vec<libc::sock_filter> = prog
        .iter()
        .map(|x| libc::sock_filter {
            code: x.code,
            jt: x.jt,
            jf: x.jf,
            k: x.k,
        })
        .collect();
    let fprog = libc::sock_fprog {
        len: filters.len() as u16,
        filter: filters.as_ptr() as *mut _,
    };
    // SAFETY: fprog points at `filters`, alive for the call; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A tiny interpreter for the instructions this module emits, so tests can check the program
/// against [`spooky_common::cid::steer`] without a kernel. `None` = the kernel would abort
/// (a load past the end of the packet), which selects socket 0.
pub fn interpret(prog: &[Insn], pkt: &[u8]) -> Option<u32> {
    let (mut a, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
    let mut pc = 0usize;
    while let Some(ins) = prog.get(pc) {
        pc += 1;
        match ins.code {
            LD_B_ABS => a = *pkt.get(ins.k as usize)? as u32,
            LD_MEM => a = *mem.get(ins.k as usize)?,
            LD_IMM => a = ins.k,
            ST => *mem.get_mut(ins.k as usize)? = a,
            TAX => x = a,
            ALU_XOR_X => a ^= x,
            ALU_MUL_K => a = a.wrapping_mul(ins.k),
            ALU_MOD_K => a %= ins.k,
            ALU_AND_K => a &= ins.k,
            ALU_RSH_K => a >>= ins.k,
            JMP_JA => pc += ins.k as usize,
            JMP_JGT_K => pc += if a > ins.k { ins.jt } else { ins.jf } as usize,
            JMP_JEQ_K => pc += if a == ins.k { ins.jt } else { ins.jf } as usize,
            JMP_JGE_K => pc += if a >= ins.k { ins.jt } else { ins.jf } as usize,
            JMP_JSET_K => pc += if a & ins.k != 0 { ins.jt } else { ins.jf } as usize,
            RET_A => return Some(a),
            RET_K => return Some(ins.k),
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use spooky_common::cid::steer;

    fn layout() -> CidLayout {
        CidLayout::new(16, 2, 0).unwrap()
    }

    fn long_header(dcid: &[u8]) -> Vec<u8> {
        let mut p = vec![0xc0, 0, 0, 0, 1, dcid.len() as u8];
        p.extend_from_slice(dcid);
        p.push(8);
        p.extend_from_slice(&[9; 8]);
        p.resize(1200, 0);
        p
    }

    #[test]
    fn program_agrees_with_steer_for_every_kind_of_dcid() {
        let l = layout();
        for workers in [1u32, 2, 3, 7] {
            let prog = reuseport_program(&l, workers);
            assert!(prog.len() < 4096);
            // Our own IDs, every worker index.
            for w in 0..workers as u8 {
                let mut cid = [0u8; 16];
                l.write(&[0, 1], w, &[0xaa; 16], &mut cid);
                let mut short = vec![0x40];
                short.extend_from_slice(&cid);
                short.extend_from_slice(&[0; 30]);
                assert_eq!(interpret(&prog, &short), Some(w as u32));
                assert_eq!(
                    interpret(&prog, &long_header(&cid)),
                    Some(steer(&l, &cid, workers))
                );
            }
            // Client-chosen DCIDs of every legal length.
            for len in 0..=20usize {
                let dcid: Vec<u8> = (0..len as u8)
                    .map(|b| b.wrapping_mul(37).wrapping_add(11))
                    .collect();
                let got = interpret(&prog, &long_header(&dcid));
                assert_eq!(
                    got,
                    Some(steer(&l, &dcid, workers)),
                    "len {len} workers {workers}"
                );
            }
            // Unroutable generation and too-long DCIDs.
            let mut cid = [0u8; 16];
            l.write(&[0, 1], 0, &[0x11; 16], &mut cid);
            cid[0] |= 0b111 << 5;
            assert_eq!(
                interpret(&prog, &long_header(&cid)),
                Some(steer(&l, &cid, workers))
            );
            // A client DCID that happens to carry our length bits but names no worker: hashed,
            // exactly as `steer` does (the kernel's own fallback would disagree).
            let mut lookalike = [0u8; 16];
            l.write(&[0, 1], 200, &[0x42; 16], &mut lookalike);
            assert_eq!(
                interpret(&prog, &long_header(&lookalike)),
                Some(steer(&l, &lookalike, workers))
            );
            let mut bad = long_header(&[1; 20]);
            bad[5] = 21;
            assert_eq!(interpret(&prog, &bad), Some(0));
        }
    }
}
