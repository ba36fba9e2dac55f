//! Kernel steering of QUIC packets to the process and worker that own their connection:
//! choosing the tier, attaching it, handing it over to a successor, and undoing it on
//! shutdown (see the tiers in `docs/architecture.md`, the operator's view in `docs/ebpf.md`,
//! upgrades in `docs/upgrades.md`).
//!
//! Every tier follows one placement rule, `spooky_common::cid::place`: a packet whose DCID is
//! one of ours goes to the process of the generation it names (the one draining keeps its
//! connections) and the worker it names; a new connection goes to the newest process.
//!
//! - Classic BPF (always available, no privilege): [`cbpf`]'s program on the SO_REUSEPORT
//!   group returns the owning socket's index in the group ([`classic`] keeps its table
//!   true across takeovers). A packet that still lands on the wrong worker is forwarded in
//!   user space and counted as misrouted.
//! - eBPF (root, [`kernel`]): the `spooky_reuseport` program picks the socket from the
//!   `sockets` map by (generation, worker) and skips workers marked dead; with an interface,
//!   XDP also runs there and redirects each QUIC packet to its worker's CPU. The maps are
//!   pinned under `steering.pin_path`; a thread mirrors the workers' user-space counters into
//!   `worker_counters`, and the health checker mirrors backend health into `backends`. The
//!   XDP program also rate-limits client Initials per source prefix, and its per-CPU counters
//!   feed `/metrics` through [`Steering::ebpf_metrics`].
//!
//! The only automatic choice is the unprivileged default: without `--iface`, when the eBPF
//! object cannot be loaded (not root, BPF unavailable), classic BPF is used and the reason
//! logged. Anything asked for explicitly either works or fails start-up with the reason.

pub mod ebpf;

mod cbpf;
mod classic;
mod kernel;
mod pins;

pub use cbpf::{
    interpret, probe, probe_index, reuseport_program, GenerationSockets, Insn, SocketTable,
    NO_CHOICE,
};
pub use classic::ProbeBoard;
pub use kernel::{fleet_entries, FleetEntries};

use classic::Classic;
use ebpf::{BackendsMap, EbpfError, FleetMaps};
use kernel::Kernel;
use pins::Pins;
use spooky_common::maps::{MODE_SK_REUSEPORT, MODE_XDP_GENERIC, MODE_XDP_NATIVE};
use spooky_common::CidLayout;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// `--iface` needs the maps pinned, and the pin path cannot be made (not root).
    #[error("--iface {iface}: XDP steering needs root (CAP_BPF + CAP_NET_ADMIN): pin path {}: {reason}", path.display())]
    PinsUnavailable {
        /// The interface asked for.
        iface: String,
        /// `steering.pin_path`.
        path: PathBuf,
        /// What is wrong.
        reason: String,
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
    /// Another live Spooky steers with the maps pinned there.
    #[error("another Spooky (pid {pid}) steers with the maps pinned at {}: take over from it (`spooky --takeover`) or stop it first", path.display())]
    Busy {
        /// Its process id.
        pid: u32,
        /// `steering.pin_path`.
        path: PathBuf,
    },
    /// Taking over the predecessor's steering is not possible.
    #[error("takeover: {0}")]
    Takeover(String),
    /// A probe of the classic tier was never reported.
    #[error("classic BPF: the probe for socket {0} was not received")]
    Probe(u32),
}

impl From<EbpfError> for SteeringError {
    fn from(e: EbpfError) -> Self {
        SteeringError::Ebpf(Box::new(e))
    }
}

/// What a process taking over learns of the one it replaces (sent over the control socket).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Predecessor {
    pub generation: u8,
    pub workers: u32,
    pub pid: u32,
    /// Its steering mode's name (`Mode::name`).
    pub mode: String,
    /// The interface its XDP program is on.
    pub iface: Option<String>,
    /// Its workers' socket indices in the reuseport group (classic BPF; a dead worker's is
    /// the next live worker's).
    pub sockets: Vec<u32>,
    /// How many sockets it has in the group (its live workers'): a successor's come after.
    #[serde(default)]
    pub in_group: u32,
    /// It pinned its XDP link for the successor to adopt.
    pub xdp_link: bool,
}

/// Extra metrics lines the kernel programs contribute: (counter, cpu, value).
pub(crate) type ExtraMetrics = Box<dyn Fn() -> Vec<(String, String, u64)> + Send + Sync>;

/// What steering is set up from.
pub(crate) struct Plan<'a> {
    /// Our connection IDs' layout; its generation is ours.
    pub layout: CidLayout,
    pub settings: &'a crate::config::Steering,
    /// `--iface`: attach XDP there.
    pub iface: Option<&'a str>,
    /// Key of the hash placing client-chosen DCIDs (`spooky_common::cid::fnv1a32_keyed`).
    pub hash_key: u32,
    /// The CPU each worker is pinned to (index = worker), from the process's allowed CPUs;
    /// `None` when the workers are not pinned (then XDP does not redirect to CPUs).
    pub cpus: Option<&'a [usize]>,
    /// The workers' counters, mirrored into `worker_counters`.
    pub stats: &'a [Arc<crate::stats::WorkerStats>],
    /// The process this one takes over from.
    pub predecessor: Option<&'a Predecessor>,
    /// Where workers report probes (classic BPF).
    pub probes: Arc<ProbeBoard>,
    /// Run first on the thread steering starts (the counters' copier): the process gives up
    /// that thread's capabilities there when it locks down.
    pub thread_start: fn(),
    /// Fleet mode: our server id and the `fleet` section (XDP forwards and unwraps).
    pub fleet: Option<(&'a [u8], &'a crate::config::Fleet)>,
}

/// The tier in force.
enum Tier {
    Classic(Classic),
    Kernel(Box<Kernel>),
}

/// The steering in force; keep it alive while the proxy runs. [`Steering::detach`] (or
/// dropping it) stops it: the last process out detaches XDP and removes the pins; one that
/// handed over leaves them to its successor.
pub(crate) struct Steering {
    mode: Mode,
    iface: Option<String>,
    workers: u32,
    generation: u8,
    tier: Option<Tier>,
    handed_over: bool,
}

impl fmt::Debug for Steering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Steering")
            .field("mode", &self.mode)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Steering {
    /// The mode in force.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Where the maps are pinned (eBPF tiers only).
    pub fn pin_path(&self) -> Option<&Path> {
        match &self.tier {
            Some(Tier::Kernel(k)) => Some(k.pin_dir()),
            _ => None,
        }
    }

    /// The `spooky_ebpf_packets_total{counter,cpu}` source for `/metrics` (eBPF tiers only):
    /// a closure reading the per-CPU `stats` map through its own file descriptor, so it is
    /// `Send + Sync` and can be called from the admin thread at scrape time. The descriptor
    /// was opened when steering was attached, so this works after privileges are dropped. A
    /// failed read yields no lines (and a debug log), never an error page.
    pub fn ebpf_metrics(&self) -> Option<ExtraMetrics> {
        let Some(Tier::Kernel(k)) = &self.tier else {
            return None;
        };
        let reader = k.stats.clone()?;
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
        match &mut self.tier {
            Some(Tier::Kernel(k)) => k.backends.take(),
            _ => None,
        }
    }

    /// The fleet maps, for reloads to keep equal to `fleet.members` (XDP fleet mode; once).
    pub fn take_fleet_maps(&mut self) -> Option<FleetMaps> {
        match &mut self.tier {
            Some(Tier::Kernel(k)) => k.fleet.take(),
            _ => None,
        }
    }

    /// Hands over to a successor: what it needs to know of us (and, with XDP, our link
    /// pinned for it). From now on stopping leaves the maps and the link to it.
    ///
    /// # Errors
    /// [`SteeringError`] when the XDP link cannot be pinned.
    pub fn handover(&mut self) -> Result<Predecessor, SteeringError> {
        let (sockets, in_group, xdp_link) = match &mut self.tier {
            Some(Tier::Classic(c)) => (c.own_sockets(), c.in_group(), false),
            Some(Tier::Kernel(k)) => ((0..self.workers).collect(), 0, k.handover()?),
            None => (Vec::new(), 0, false),
        };
        self.handed_over = true;
        Ok(Predecessor {
            generation: self.generation,
            workers: self.workers,
            pid: std::process::id(),
            mode: self.mode.name().to_owned(),
            iface: self.iface.clone(),
            sockets,
            in_group,
            xdp_link,
        })
    }

    /// We serve as a successor (the predecessor was told): stopping from now on is ours.
    pub fn confirm(&mut self) {
        if let Some(Tier::Kernel(k)) = &mut self.tier {
            k.confirmed = true;
        }
    }

    /// The successor never served: steering is ours again (the XDP link comes back).
    pub fn handover_aborted(&mut self) {
        self.handed_over = false;
        let taken = match &mut self.tier {
            Some(Tier::Kernel(k)) => k.take_back(),
            Some(Tier::Classic(c)) => c.take_back(),
            None => Ok(()),
        };
        if let Err(e) = taken {
            tracing::warn!(error = %e, "cannot take steering back after a failed handover");
        }
    }

    /// The predecessor has left: forget it (eBPF) or find our sockets again (classic BPF).
    ///
    /// # Errors
    /// [`SteeringError`] when the maps cannot be written or a probe went unanswered.
    pub fn predecessor_gone(&mut self, p: &Predecessor) -> Result<(), SteeringError> {
        match &mut self.tier {
            Some(Tier::Classic(c)) => c.predecessor_gone(),
            Some(Tier::Kernel(k)) => k.predecessor_gone(p),
            None => Ok(()),
        }
    }

    /// Worker `index` died (its socket is closed): steer around it. Before its socket is
    /// closed, `before_close` (kernel tiers); classic BPF finds the group's order again after.
    ///
    /// # Errors
    /// [`SteeringError`] when the maps cannot be written or a probe went unanswered.
    pub fn worker_died(
        &mut self,
        index: u32,
        close_socket: impl FnOnce(),
    ) -> Result<(), SteeringError> {
        match &mut self.tier {
            Some(Tier::Kernel(k)) => {
                let marked = k.worker_died(index);
                close_socket();
                marked
            }
            Some(Tier::Classic(c)) => {
                close_socket();
                c.worker_died(index)
            }
            None => {
                close_socket();
                Ok(())
            }
        }
    }

    /// Stops steering (see [`Steering`]). Idempotent.
    pub fn detach(mut self) {
        self.detach_inner();
    }

    fn detach_inner(&mut self) {
        if let Some(Tier::Kernel(k)) = self.tier.take() {
            k.detach(self.handed_over, self.mode);
        }
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        self.detach_inner();
    }
}

/// Attaches the steering asked for (`plan.iface`, `steering.xdp_mode` in the config) to the
/// reuseport group `sockets` (index = worker index), next to `plan.predecessor`'s.
///
/// # Errors
/// [`SteeringError`] when the requested mode cannot be had: never a silent downgrade.
pub(crate) fn attach(
    sockets: &[std::net::UdpSocket],
    plan: &Plan<'_>,
) -> Result<Steering, SteeringError> {
    if sockets.is_empty() {
        return Err(SteeringError::NoSockets);
    }
    let predecessor_kernel = plan
        .predecessor
        .is_some_and(|p| p.mode != Mode::ClassicBpf.name());
    if let Some(p) = plan.predecessor {
        if p.iface.as_deref() != plan.iface {
            return Err(SteeringError::Takeover(format!(
                "the running Spooky steers with XDP on {:?}; take over with the same --iface ({:?} asked)",
                p.iface, plan.iface
            )));
        }
    }
    let generation = plan.layout.generation();
    let workers = sockets.len() as u32;
    let steering = |mode, tier| Steering {
        mode,
        iface: plan.iface.map(str::to_owned),
        workers,
        generation,
        tier: Some(tier),
        handed_over: false,
    };
    // A successor keeps its predecessor's tier: a classic predecessor's sockets are known
    // only by their places in the group, which the eBPF maps do not hold.
    let classic = || -> Result<Steering, SteeringError> {
        let classic = Classic::attach(
            sockets,
            plan.layout,
            plan.hash_key,
            plan.predecessor,
            plan.probes.clone(),
        )?;
        Ok(steering(Mode::ClassicBpf, Tier::Classic(classic)))
    };
    // A successor keeps its predecessor's tier: a classic predecessor's sockets are known
    // only by their places in the group, which the eBPF maps do not hold.
    if plan.predecessor.is_some() && !predecessor_kernel {
        tracing::info!("the predecessor steers with classic BPF: so does this process");
        return classic();
    }
    let kernel = Pins::prepare(&plan.settings.pin_path, plan.predecessor.is_some())
        .and_then(|pins| Kernel::attach(pins, sockets, plan));
    match kernel {
        Ok((k, mode)) => Ok(steering(mode, Tier::Kernel(Box::new(k)))),
        // Refusals that are answers, not a lack of privilege.
        Err(e @ (SteeringError::Busy { .. } | SteeringError::Takeover(_))) => Err(e),
        Err(e) if plan.iface.is_some() || predecessor_kernel => Err(match e {
            SteeringError::Ebpf(source) if plan.iface.is_some() => SteeringError::Unavailable {
                iface: plan.iface.unwrap_or_default().to_owned(),
                source,
            },
            SteeringError::PinPath { path, reason } if plan.iface.is_some() => {
                SteeringError::PinsUnavailable {
                    iface: plan.iface.unwrap_or_default().to_owned(),
                    path,
                    reason,
                }
            }
            other => other,
        }),
        Err(reason) => {
            tracing::info!(
                %reason,
                "eBPF steering unavailable (not root, or no BPF): using classic BPF steering"
            );
            classic()
        }
    }
}
