//! The eBPF tiers: the `spooky_reuseport` program on the reuseport group and, with an
//! interface, the XDP program there, both working on the maps pinned under
//! `steering.pin_path`. A process registers its generation and its workers' sockets and CPUs
//! in those maps; a process taking over loads its programs onto the same maps, registers its
//! own generation next to its predecessor's, makes itself the newest, adopts the XDP link its
//! predecessor pinned (the interface is never without a program), and, once the predecessor
//! has gone, forgets it.

use super::ebpf::{BackendsMap, EbpfPrograms, FleetMaps, StatsReader, WorkerCountersMap};
use super::pins::Pins;
use super::{Mode, Plan, Predecessor, SteeringError};
use crate::config::XdpMode;
use crate::stats::WorkerStats;
use spooky_common::fleet::{FleetMember, MemberAddr, ServerIdKey};
use spooky_common::maps::{
    slot, GenerationEntry, SteeringConfig, WorkerCounters, WorkerEntry, FLAG_FLEET, FLAG_LB_LAYOUT,
    FLAG_REDIRECT_CPU, MAPS_ABI, MODE_SK_REUSEPORT, MODE_XDP_GENERIC, MODE_XDP_NATIVE,
};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// Frames each CPU map entry may queue for its CPU.
const CPU_QUEUE_SIZE: u32 = 2048;
/// How often the steering thread copies the workers' counters into `worker_counters`.
const COUNTERS_PERIOD: Duration = Duration::from_millis(100);

/// What the eBPF tiers hold while running.
pub(super) struct Kernel {
    programs: EbpfPrograms,
    xdp: Option<(String, aya::programs::xdp::XdpLinkId)>,
    pub(super) pins: Pins,
    counters: Option<CountersThread>,
    /// The `stats` map through a descriptor of its own, opened at attach time (while still
    /// privileged), for `/metrics`.
    pub(super) stats: Option<Arc<StatsReader>>,
    /// The `backends` map, until the health checker takes it.
    pub(super) backends: Option<BackendsMap>,
    /// The fleet maps (fleet mode with plaintext server ids), until reloads take them.
    pub(super) fleet: Option<FleetMaps>,
    generation: u8,
    workers: u32,
    xdp_mode: XdpMode,
    /// The interface whose XDP link we pinned for a successor.
    handed_iface: Option<String>,
    /// We took over from a predecessor…
    took_over: bool,
    /// …and told it we serve (until then, failing leaves everything to it).
    pub(super) confirmed: bool,
}

/// The CPU worker `index` is pinned to (0 when the workers are not pinned: no CPU redirect
/// then).
fn worker_cpu(plan: &Plan<'_>, index: usize) -> u32 {
    plan.cpus
        .and_then(|c| c.get(index))
        .map_or(0, |cpu| u32::try_from(*cpu).unwrap_or(0))
}

/// Fleet mode in the config entry: our server id, the fleet port, our IPv4 address among
/// the members (the outer source of what XDP forwards; without one XDP leaves forwarding to
/// user space).
fn fleet_config(config: &mut SteeringConfig, own: &[u8], fleet: &crate::config::Fleet) {
    config.flags |= FLAG_FLEET;
    config.fleet_port = fleet.listen.port();
    config.server_id = server_id_key(own).id;
    config.fleet_source = fleet_entries(own, fleet).own.unwrap_or([0; 4]);
}

fn server_id_key(id: &[u8]) -> ServerIdKey {
    let mut k = ServerIdKey::default();
    for (dst, src) in k.id.iter_mut().zip(id) {
        *dst = *src;
    }
    k
}

/// What XDP's fleet maps hold for a member table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FleetEntries {
    /// Every other IPv4 member by server id.
    pub members: Vec<(ServerIdKey, FleetMember)>,
    /// Every IPv4 member's address, ours too: where GUE packets are taken from.
    pub sources: Vec<MemberAddr>,
    /// Our own address, when listed.
    pub own: Option<[u8; 4]>,
}

/// [`FleetEntries`] of `fleet` seen from the member `own` (IPv6 members are forwarded to
/// from user space).
pub fn fleet_entries(own: &[u8], fleet: &crate::config::Fleet) -> FleetEntries {
    let (mut members, mut sources, mut own_addr) = (Vec::new(), Vec::new(), None);
    for (id, addr) in &fleet.members {
        let ip = match addr.ip() {
            std::net::IpAddr::V4(v4) => v4,
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4,
                None => continue,
            },
        };
        sources.push(MemberAddr { addr: ip.octets() });
        if id.as_slice() == own {
            own_addr = Some(ip.octets());
        } else {
            let member = FleetMember {
                addr: ip.octets(),
                port: addr.port().to_be_bytes(),
                reserved: [0; 2],
            };
            members.push((server_id_key(id), member));
        }
    }
    FleetEntries {
        members,
        sources,
        own: own_addr,
    }
}

/// The running kernel's (major, minor) version.
fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn now_secs() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

impl Kernel {
    /// Loads the programs onto the pinned maps (made ready by `pins`) and attaches them for
    /// the reuseport group `sockets`.
    ///
    /// A fresh start that fails leaves no pins behind (a takeover leaves the predecessor's).
    pub(super) fn attach(
        pins: Pins,
        sockets: &[std::net::UdpSocket],
        plan: &Plan<'_>,
    ) -> Result<(Self, Mode), SteeringError> {
        let dir = pins.dir.clone();
        let attached = Self::attach_pinned(pins, sockets, plan);
        if attached.is_err() && plan.predecessor.is_none() {
            // Every pin there is ours: `Pins::prepare` removed what a dead Spooky left.
            Pins::remove_all(&dir);
        }
        attached
    }

    fn attach_pinned(
        mut pins: Pins,
        sockets: &[std::net::UdpSocket],
        plan: &Plan<'_>,
    ) -> Result<(Self, Mode), SteeringError> {
        let mut programs = EbpfPrograms::load_pinned(&pins.dir)?;
        pins.record();
        let workers = sockets.len();
        let port = sockets
            .first()
            .and_then(|s| s.local_addr().ok())
            .map_or(0, |a| a.port());
        let generation = plan.layout.generation();
        let pid = std::process::id();
        // Our workers and their sockets first: nothing is steered to them yet.
        for (index, socket) in sockets.iter().enumerate() {
            let at = slot(generation, index as u32);
            let entry = WorkerEntry {
                cpu: worker_cpu(plan, index),
                alive: 1,
                generation: u32::from(generation),
            };
            programs.set_worker(at, &entry)?;
            programs.set_worker_socket(at, socket)?;
        }
        programs.set_generation(
            generation,
            &GenerationEntry {
                workers: workers as u32,
                accepting: 1,
                pid,
                started: now_secs(),
            },
        )?;
        if let Some(p) = plan.predecessor {
            let mut old = programs.generation(p.generation)?;
            old.accepting = 0;
            programs.set_generation(p.generation, &old)?;
        }
        let mut config = SteeringConfig {
            quic_port: port,
            cid_len: plan.layout.cid_len() as u8,
            server_id_len: plan.layout.server_id_len() as u8,
            generation,
            mode: MODE_SK_REUSEPORT,
            reserved: [0; 2],
            workers: workers as u32,
            flags: 0,
            pid,
            ifindex: 0,
            iface: [0; spooky_common::maps::IFACE_LEN],
            initial_rate: plan.settings.initial_rate,
            initial_burst: plan.settings.initial_burst,
            abi: MAPS_ABI,
            hash_key: plan.hash_key,
            fleet_port: 0,
            reserved2: [0; 2],
            fleet_source: [0; 4],
            server_id: [0; 8],
        };
        if plan.layout.is_for_load_balancer() {
            config.flags |= FLAG_LB_LAYOUT;
        }
        let fleet_maps = match plan.fleet {
            Some((own, fleet)) => {
                fleet_config(&mut config, own, fleet);
                let mut maps = programs.take_fleet()?;
                let entries = fleet_entries(own, fleet);
                maps.sync(&entries.members, &entries.sources)?;
                Some(maps)
            }
            None => None,
        };
        let xdp = match plan.iface {
            None => None,
            Some(iface) => {
                let ifindex = interface_index(iface)?;
                config.ifindex = ifindex;
                config.iface = SteeringConfig::iface_name(iface.as_bytes());
                let adopted = plan.predecessor.is_some_and(|p| p.xdp_link);
                let (link, native) = if adopted {
                    // The predecessor's link, with our program on it; its attach mode stays.
                    let link = programs.adopt_xdp_link(&pins.xdp_link())?;
                    let native = programs.config()?.mode == MODE_XDP_NATIVE;
                    tracing::info!(iface, "XDP link taken over from the predecessor");
                    (link, native)
                } else {
                    attach_xdp(&mut programs, iface, plan.settings.xdp_mode)?
                };
                config.mode = if native {
                    MODE_XDP_NATIVE
                } else {
                    MODE_XDP_GENERIC
                };
                // Redirect each packet to its worker's CPU only where that CPU is known (the
                // workers are pinned, to CPUs this process may use) and the kernel can
                // (generic-mode cpumap redirect needs Linux 5.15).
                let old_generic = !native && kernel_version().is_some_and(|v| v < (5, 15));
                match plan.cpus {
                    Some(cpus) if !old_generic => {
                        for cpu in cpus.iter().take(workers) {
                            let cpu = u32::try_from(*cpu).unwrap_or(0);
                            programs.enable_cpu(cpu, CPU_QUEUE_SIZE)?;
                        }
                        config.flags |= FLAG_REDIRECT_CPU;
                    }
                    Some(_) => tracing::info!(
                        iface,
                        "XDP CPU redirect off: generic-mode cpumap redirect needs Linux 5.15 \
                         (XDP still parses, drops and counts)"
                    ),
                    None => tracing::info!(
                        iface,
                        "XDP CPU redirect off: the workers are not pinned (--no-pin, or fewer \
                         usable CPUs than workers); XDP still parses, drops and counts"
                    ),
                }
                Some((iface.to_string(), link))
            }
        };
        // Now the newest generation: new connections come to us from here on.
        programs.set_config(&config)?;
        if let Some(first) = sockets.first() {
            // Our program (the same maps) replaces the group's, atomically.
            programs.attach_reuseport(first)?;
        }
        let backends = programs.take_backends()?;
        let counters = CountersThread::start(
            programs.take_worker_counters()?,
            plan.stats.to_vec(),
            generation,
            plan.thread_start,
        )
        .map_err(SteeringError::Thread)?;
        tracing::info!(pin_path = %pins.dir.display(), generation, "eBPF maps pinned");
        let mode = Mode::from_code(config.mode).unwrap_or(Mode::SkReuseport);
        let stats = match programs.stats_reader() {
            Ok(reader) => Some(Arc::new(reader)),
            Err(e) => {
                tracing::warn!(error = %e, "XDP counters not available to /metrics");
                None
            }
        };
        let kernel = Self {
            programs,
            xdp,
            pins,
            counters: Some(counters),
            stats,
            backends: Some(backends),
            fleet: fleet_maps,
            generation,
            workers: workers as u32,
            xdp_mode: plan.settings.xdp_mode,
            handed_iface: None,
            took_over: plan.predecessor.is_some(),
            confirmed: false,
        };
        Ok((kernel, mode))
    }

    /// Hands over to a successor: pins the XDP link for it to adopt. Returns whether there
    /// was one.
    pub(super) fn handover(&mut self) -> Result<bool, SteeringError> {
        let Some((iface, link)) = self.xdp.take() else {
            return Ok(false);
        };
        let path = self.pins.xdp_link();
        self.programs.pin_xdp_link(link, &path)?;
        tracing::info!(iface, path = %path.display(), "XDP link pinned for the successor");
        self.handed_iface = Some(iface);
        Ok(true)
    }

    /// A handover that did not happen (the successor failed, or died, before it served):
    /// steering is ours again. The successor may have made itself the newest and taken the
    /// XDP link; we write ourselves back as the newest, forget its generation (always the
    /// one after ours), and put our program back on the interface: the link the successor
    /// pinned back for us, else ours if it is still pinned, else a new attachment.
    pub(super) fn take_back(&mut self) -> Result<(), SteeringError> {
        let mut config = self.programs.config()?;
        config.generation = self.generation;
        config.workers = self.workers;
        self.programs.set_generation(
            self.generation,
            &GenerationEntry {
                accepting: 1,
                ..self.programs.generation(self.generation)?
            },
        )?;
        let successor = spooky_common::cid::next_generation(self.generation);
        self.programs
            .set_generation(successor, &GenerationEntry::default())?;
        self.programs.set_config(&config)?;
        let Some(iface) = self.handed_iface.take() else {
            return Ok(());
        };
        let path = self.pins.xdp_link();
        // The successor pins the link back as it fails; give it a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !path.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let link = match self.programs.adopt_xdp_link(&path) {
            Ok(link) => link,
            Err(e) => {
                tracing::warn!(iface, error = %e, "the XDP link is gone with the successor: attaching XDP again");
                attach_xdp(&mut self.programs, &iface, self.xdp_mode)?.0
            }
        };
        tracing::info!(iface, "steering taken back after a failed handover");
        self.xdp = Some((iface, link));
        Ok(())
    }

    /// The predecessor is gone: its generation and workers are forgotten (its sockets left
    /// the maps when they closed); packets still naming it are nobody's.
    pub(super) fn predecessor_gone(&mut self, p: &Predecessor) -> Result<(), SteeringError> {
        if p.generation == self.generation {
            return Ok(());
        }
        self.programs
            .set_generation(p.generation, &GenerationEntry::default())?;
        for w in 0..p.workers {
            self.programs
                .set_worker(slot(p.generation, w), &WorkerEntry::default())?;
        }
        tracing::info!(
            generation = p.generation,
            pid = p.pid,
            "predecessor gone: its generation is forgotten"
        );
        Ok(())
    }

    /// Worker `index` died: it takes no new connection (the programs go around it); its
    /// socket, once closed, leaves the `sockets` map by itself.
    pub(super) fn worker_died(&mut self, index: u32) -> Result<(), SteeringError> {
        let at = slot(self.generation, index);
        let entry = WorkerEntry {
            alive: 0,
            ..self.programs.worker(at)?
        };
        self.programs.set_worker(at, &entry)?;
        Ok(())
    }

    /// Stops: writes the final counters; unless `handed_over`, detaches XDP and removes the
    /// pins (the last process out).
    pub(super) fn detach(mut self, handed_over: bool, mode: Mode) {
        if let Some(counters) = self.counters.take() {
            counters.stop();
        }
        if self.took_over && !self.confirmed {
            // A takeover that failed before we served: everything stays the predecessor's,
            // which takes steering back; the XDP link we adopted goes back to its pin.
            if let Some((iface, link)) = self.xdp.take() {
                match self.programs.pin_xdp_link(link, &self.pins.xdp_link()) {
                    Ok(()) => tracing::info!(iface, "XDP link left pinned for the predecessor"),
                    Err(e) => {
                        tracing::warn!(iface, error = %e, "cannot give the XDP link back; the predecessor attaches again")
                    }
                }
            }
            tracing::info!("takeover abandoned: steering left to the predecessor");
            return;
        }
        if handed_over {
            // The successor owns the maps (and the XDP link) now.
            let _ = self.programs.set_generation(
                self.generation,
                &GenerationEntry {
                    accepting: 0,
                    ..self
                        .programs
                        .generation(self.generation)
                        .unwrap_or_default()
                },
            );
            tracing::info!(
                mode = mode.name(),
                "left the eBPF steering to the successor"
            );
            return;
        }
        if let Some((iface, link)) = self.xdp.take() {
            match self.programs.detach_xdp(link) {
                Ok(()) => tracing::info!(iface, "XDP detached"),
                Err(e) => tracing::warn!(iface, error = %e, "cannot detach XDP"),
            }
        }
        self.pins.remove();
        tracing::info!(mode = mode.name(), "eBPF steering detached");
    }

    /// Where the maps are pinned.
    pub(super) fn pin_dir(&self) -> &Path {
        &self.pins.dir
    }
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
    fn start(
        mut map: WorkerCountersMap,
        stats: Vec<Arc<WorkerStats>>,
        generation: u8,
        thread_start: fn(),
    ) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("spooky-steering".into())
            .spawn(move || {
                thread_start();
                loop {
                    write_counters(&mut map, &stats, generation);
                    match stopped.recv_timeout(COUNTERS_PERIOD) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                            write_counters(&mut map, &stats, generation);
                            return;
                        }
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

fn write_counters(map: &mut WorkerCountersMap, stats: &[Arc<WorkerStats>], generation: u8) {
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
        if let Err(e) = map.set(slot(generation, index as u32), &counters) {
            tracing::debug!(worker = index, error = %e, "cannot write worker counters");
        }
    }
}
