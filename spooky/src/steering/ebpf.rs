//! Loading the kernel programs (`spooky-ebpf`, embedded at build time as [`OBJECT`]) with aya,
//! writing their configuration maps, reading the per-CPU counters, and running the XDP program
//! over a crafted packet with the kernel's `BPF_PROG_TEST_RUN` (no interface needed).
//!
//! Also: pinning the maps on a BPF filesystem and opening pinned maps again
//! ([`PinnedMaps`], what `spooky status` and operators' tools read), and the owned map handles
//! user space keeps writing while it runs ([`BackendsMap`], [`WorkerCountersMap`]) or reads
//! from another thread ([`StatsReader`], behind `/metrics`).
//!
//! Map names and layouts come from `spooky_common::maps`; deciding which programs to attach
//! where is [`crate::steering`]'s business (see the steering tiers in `docs/architecture.md`).
//! Needs root (CAP_BPF, CAP_NET_ADMIN for XDP).

use aya::{
    maps::{
        xdp::XdpMapError, Array, CpuMap, HashMap, Map, MapData, MapError, MapInfo, PerCpuArray,
        ReusePortSockArray,
    },
    pin::PinError,
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        ProgramError, SkReuseport, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader, TestRun, TestRunOptions,
};
use spooky_common::fleet::{FleetMember, MemberAddr, ServerIdKey};
use spooky_common::maps::{
    BackendEntry, Counter, GenerationEntry, InitialBucket, SourcePrefix, SteeringConfig,
    WorkerCounters, WorkerEntry, BACKENDS_MAP, CONFIG_MAP, COUNTER_COUNT, CPUS_MAP,
    FLEET_MEMBERS_MAP, FLEET_SOURCES_MAP, GENERATIONS_MAP, INITIAL_LIMITS_MAP, PINNED_MAPS,
    REUSEPORT_PROGRAM, SLOTS, SOCKETS_MAP, STATS_MAP, WORKERS_MAP, WORKER_COUNTERS_MAP,
    WORKER_STATS_MAP, XDP_PROGRAM,
};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

mod maps;

pub use maps::{pinned_map_id, BackendsMap, FleetMaps, PinnedMaps, StatsReader, WorkerCountersMap};

/// The object file `cargo xtask build-ebpf` produced, aligned to 8 bytes for the ELF parser.
/// Empty when spooky was built before the object existed (see `build.rs`).
pub static OBJECT: &[u8] = &ALIGNED_OBJECT.0;

#[repr(C, align(8))]
struct Aligned<Bytes: ?Sized>(Bytes);

static ALIGNED_OBJECT: &Aligned<[u8]> = &Aligned(*include_bytes!(env!("SPOOKY_EBPF_OBJECT")));

/// Room the XDP test run's output buffer has beyond the input (for programs that grow packets).
const TEST_RUN_OUT_SLACK: usize = 256;

/// Why loading or driving the kernel programs failed.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// Spooky was built without the kernel object.
    #[error(
        "spooky was built without its eBPF object: run `cargo xtask build-ebpf`, then rebuild spooky"
    )]
    ObjectMissing,
    /// Parsing the object or creating its maps failed (typically: not root / no CAP_BPF).
    #[error("loading the eBPF object failed (root or CAP_BPF is needed): {0}")]
    Load(#[source] aya::EbpfError),
    /// The object has no program of that name.
    #[error("the eBPF object has no program `{0}`")]
    ProgramMissing(&'static str),
    /// Loading (verifying) or running a program failed.
    #[error("eBPF program `{name}`: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// What aya reported (the verifier log for load failures).
        #[source]
        source: ProgramError,
    },
    /// The object has no map of that name.
    #[error("the eBPF object has no map `{0}`")]
    MapMissing(&'static str),
    /// Reading or writing a map failed.
    #[error("eBPF map `{name}`: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What aya reported.
        #[source]
        source: MapError,
    },
    /// Writing the CPU map failed.
    #[error("eBPF map `{CPUS_MAP}`: {0}")]
    CpuMap(#[source] XdpMapError),
    /// Pinning a map on the BPF filesystem failed.
    #[error("cannot pin eBPF map `{name}` at {}: {source}", path.display())]
    Pin {
        /// Map name.
        name: &'static str,
        /// Where it was to be pinned.
        path: PathBuf,
        /// What aya reported.
        #[source]
        source: PinError,
    },
    /// Opening a pinned map failed (missing pin, not a map, no privilege).
    #[error("cannot open pinned eBPF map {}: {source}", path.display())]
    OpenPinned {
        /// The pin.
        path: PathBuf,
        /// What aya reported.
        #[source]
        source: MapError,
    },
    /// Handing the XDP link from one process to the next failed.
    #[error("XDP link: {0}")]
    Link(String),
}

/// An XDP verdict (`enum xdp_action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAction {
    /// `XDP_ABORTED`: a program error.
    Aborted,
    /// `XDP_DROP`.
    Drop,
    /// `XDP_PASS`: up the stack.
    Pass,
    /// `XDP_TX`: back out of the same interface.
    Tx,
    /// `XDP_REDIRECT`: to another CPU, interface or socket.
    Redirect,
    /// A value outside `enum xdp_action`.
    Other(u32),
}

impl From<u32> for XdpAction {
    fn from(value: u32) -> Self {
        match value {
            0 => Self::Aborted,
            1 => Self::Drop,
            2 => Self::Pass,
            3 => Self::Tx,
            4 => Self::Redirect,
            other => Self::Other(other),
        }
    }
}

/// What one `BPF_PROG_TEST_RUN` of the XDP program returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpRun {
    /// The program's verdict.
    pub action: XdpAction,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
}

/// A snapshot of the per-CPU `stats` counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    per_cpu: Vec<[u64; COUNTER_COUNT as usize]>,
}

impl Stats {
    /// `counter` summed over all CPUs.
    pub fn total(&self, counter: Counter) -> u64 {
        self.per_cpu.iter().map(|cpu| cpu_value(cpu, counter)).sum()
    }

    /// `counter` on each possible CPU, in CPU order.
    pub fn per_cpu(&self, counter: Counter) -> Vec<u64> {
        self.per_cpu
            .iter()
            .map(|cpu| cpu_value(cpu, counter))
            .collect()
    }

    /// Number of possible CPUs in the snapshot.
    pub fn cpus(&self) -> usize {
        self.per_cpu.len()
    }

    /// Every counter's total, in index order, named (for logs and `spooky status`).
    pub fn totals(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .map(|&c| (c.name(), self.total(c)))
            .collect()
    }

    /// `(counter name, CPU, value)` for every counter on every possible CPU, counters in
    /// index order: the `spooky_ebpf_packets_total{counter,cpu}` lines of `/metrics`.
    pub fn metric_lines(&self) -> Vec<(String, String, u64)> {
        let mut lines = Vec::with_capacity(Counter::ALL.len() * self.per_cpu.len());
        for counter in Counter::ALL {
            for (cpu, values) in self.per_cpu.iter().enumerate() {
                lines.push((
                    counter.name().to_owned(),
                    cpu.to_string(),
                    cpu_value(values, counter),
                ));
            }
        }
        lines
    }
}

impl Stats {
    fn read<T: std::borrow::Borrow<MapData>>(map: &PerCpuArray<T, u64>) -> Result<Self, EbpfError> {
        let mut per_cpu: Vec<[u64; COUNTER_COUNT as usize]> = Vec::new();
        for counter in Counter::ALL {
            let values = map
                .get(&counter.index(), 0)
                .map_err(|source| map_error(STATS_MAP, source))?;
            if per_cpu.len() < values.len() {
                per_cpu.resize(values.len(), [0; COUNTER_COUNT as usize]);
            }
            for (cpu, value) in per_cpu.iter_mut().zip(values.iter()) {
                if let Some(slot) = cpu.get_mut(counter.index() as usize) {
                    *slot = *value;
                }
            }
        }
        Ok(Self { per_cpu })
    }
}

fn cpu_value(cpu: &[u64; COUNTER_COUNT as usize], counter: Counter) -> u64 {
    cpu.get(counter.index() as usize).copied().unwrap_or(0)
}

/// The kernel programs, loaded (verified) but not attached, with their maps.
pub struct EbpfPrograms {
    ebpf: Ebpf,
}

impl std::fmt::Debug for EbpfPrograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfPrograms").finish_non_exhaustive()
    }
}

impl EbpfPrograms {
    /// Loads the embedded [`OBJECT`]: creates its maps and loads both programs into the
    /// kernel (the verifier runs here). Nothing is attached.
    ///
    /// # Errors
    /// [`EbpfError::ObjectMissing`] when spooky was built without the object; otherwise
    /// whatever the kernel refused (missing privileges, verifier rejection).
    pub fn load() -> Result<Self, EbpfError> {
        Self::load_from(OBJECT)
    }

    /// Loads the embedded [`OBJECT`] onto the maps pinned under `dir` (each at `dir/NAME`):
    /// maps already pinned there are reused — a process taking over shares its
    /// predecessor's sockets, workers and limits — and the others are created and pinned.
    ///
    /// # Errors
    /// As [`Self::load`], and when a pin cannot be made.
    pub fn load_pinned(dir: &Path) -> Result<Self, EbpfError> {
        let paths: Vec<(&'static str, PathBuf)> = PINNED_MAPS
            .iter()
            .map(|name| (*name, dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        Self::load_with(&mut loader, OBJECT)
    }

    /// [`Self::load`] for an object given as bytes.
    ///
    /// # Errors
    /// As [`Self::load`].
    pub fn load_from(object: &[u8]) -> Result<Self, EbpfError> {
        Self::load_with(&mut EbpfLoader::new(), object)
    }

    fn load_with(loader: &mut EbpfLoader<'_>, object: &[u8]) -> Result<Self, EbpfError> {
        if object.is_empty() {
            return Err(EbpfError::ObjectMissing);
        }
        let ebpf = loader.load(object).map_err(EbpfError::Load)?;
        let mut programs = Self { ebpf };
        programs
            .xdp_mut()?
            .load()
            .map_err(|source| program_error(XDP_PROGRAM, source))?;
        programs
            .reuseport_mut()?
            .load()
            .map_err(|source| program_error(REUSEPORT_PROGRAM, source))?;
        tracing::debug!(bytes = object.len(), "eBPF programs loaded");
        Ok(programs)
    }

    /// The aya object, for attaching programs and pinning maps.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The XDP program.
    ///
    /// # Errors
    /// [`EbpfError::ProgramMissing`] / [`EbpfError::Program`] when the object lacks it.
    pub fn xdp(&self) -> Result<&Xdp, EbpfError> {
        let program = self
            .ebpf
            .program(XDP_PROGRAM)
            .ok_or(EbpfError::ProgramMissing(XDP_PROGRAM))?;
        program
            .try_into()
            .map_err(|source| program_error(XDP_PROGRAM, source))
    }

    /// The XDP program, mutably (to attach it).
    ///
    /// # Errors
    /// As [`Self::xdp`].
    pub fn xdp_mut(&mut self) -> Result<&mut Xdp, EbpfError> {
        let program = self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or(EbpfError::ProgramMissing(XDP_PROGRAM))?;
        program
            .try_into()
            .map_err(|source| program_error(XDP_PROGRAM, source))
    }

    /// The `sk_reuseport` program, mutably (to attach it to a reuseport group's socket).
    ///
    /// # Errors
    /// [`EbpfError::ProgramMissing`] / [`EbpfError::Program`] when the object lacks it.
    pub fn reuseport_mut(&mut self) -> Result<&mut SkReuseport, EbpfError> {
        let program = self
            .ebpf
            .program_mut(REUSEPORT_PROGRAM)
            .ok_or(EbpfError::ProgramMissing(REUSEPORT_PROGRAM))?;
        program
            .try_into()
            .map_err(|source| program_error(REUSEPORT_PROGRAM, source))
    }

    /// Writes the steering configuration (`config[0]`).
    ///
    /// # Errors
    /// [`EbpfError::Map`] / [`EbpfError::MapMissing`] when the map cannot be written.
    pub fn set_config(&mut self, config: &SteeringConfig) -> Result<(), EbpfError> {
        let mut map: Array<&mut MapData, SteeringConfig> = self.map_mut(CONFIG_MAP)?;
        map.set(0, config, 0)
            .map_err(|source| map_error(CONFIG_MAP, source))
    }

    /// The steering configuration (`config[0]`).
    ///
    /// # Errors
    /// [`EbpfError::Map`] / [`EbpfError::MapMissing`] when the map cannot be read.
    pub fn config(&self) -> Result<SteeringConfig, EbpfError> {
        let map: Array<&MapData, SteeringConfig> = self.map(CONFIG_MAP)?;
        map.get(&0, 0)
            .map_err(|source| map_error(CONFIG_MAP, source))
    }

    /// Writes the entry of `generation` (`generations[generation]`).
    ///
    /// # Errors
    /// [`EbpfError::Map`] when the write fails.
    pub fn set_generation(
        &mut self,
        generation: u8,
        entry: &GenerationEntry,
    ) -> Result<(), EbpfError> {
        let mut map: Array<&mut MapData, GenerationEntry> = self.map_mut(GENERATIONS_MAP)?;
        map.set(u32::from(generation), entry, 0)
            .map_err(|source| map_error(GENERATIONS_MAP, source))
    }

    /// The entry of `generation`.
    ///
    /// # Errors
    /// [`EbpfError::Map`] when the map cannot be read.
    pub fn generation(&self, generation: u8) -> Result<GenerationEntry, EbpfError> {
        let map: Array<&MapData, GenerationEntry> = self.map(GENERATIONS_MAP)?;
        map.get(&u32::from(generation), 0)
            .map_err(|source| map_error(GENERATIONS_MAP, source))
    }

    /// Worker `index`'s entry (`workers[index]`).
    ///
    /// # Errors
    /// [`EbpfError::Map`] when `index` is out of range or the read fails.
    pub fn worker(&self, index: u32) -> Result<WorkerEntry, EbpfError> {
        let map: Array<&MapData, WorkerEntry> = self.map(WORKERS_MAP)?;
        map.get(&index, 0)
            .map_err(|source| map_error(WORKERS_MAP, source))
    }

    /// Writes worker `index`'s entry (`workers[index]`).
    ///
    /// # Errors
    /// [`EbpfError::Map`] when `index` is out of range or the write fails.
    pub fn set_worker(&mut self, index: u32, entry: &WorkerEntry) -> Result<(), EbpfError> {
        let mut map: Array<&mut MapData, WorkerEntry> = self.map_mut(WORKERS_MAP)?;
        map.set(index, entry, 0)
            .map_err(|source| map_error(WORKERS_MAP, source))
    }

    /// Enables `cpu` as an XDP redirect target with a queue of `queue_size` frames.
    ///
    /// # Errors
    /// [`EbpfError::CpuMap`] when the kernel refuses the entry (CPU not possible, size 0).
    pub fn enable_cpu(&mut self, cpu: u32, queue_size: u32) -> Result<(), EbpfError> {
        let map = self
            .ebpf
            .map_mut(CPUS_MAP)
            .ok_or(EbpfError::MapMissing(CPUS_MAP))?;
        let mut cpus = CpuMap::try_from(map).map_err(|source| map_error(CPUS_MAP, source))?;
        cpus.set(cpu, queue_size, None, 0)
            .map_err(EbpfError::CpuMap)
    }

    /// Puts `socket` (a UDP socket of the reuseport group) in `sockets[worker]`, where the
    /// `sk_reuseport` program picks it for the packets `worker` owns.
    ///
    /// # Errors
    /// [`EbpfError::Map`] when `worker` is out of range or the kernel refuses the socket
    /// (not bound, or not in a reuseport group).
    pub fn set_worker_socket<S: AsRawFd>(
        &mut self,
        worker: u32,
        socket: &S,
    ) -> Result<(), EbpfError> {
        let mut map: ReusePortSockArray<&mut MapData> = self.map_mut(SOCKETS_MAP)?;
        map.set(worker, socket, 0)
            .map_err(|source| map_error(SOCKETS_MAP, source))
    }

    /// Attaches the `sk_reuseport` program to the reuseport group `socket` belongs to (for
    /// the whole group; it stays until the group's sockets close).
    ///
    /// # Errors
    /// [`EbpfError::Program`] when `socket` has no `SO_REUSEPORT` or the kernel refuses.
    pub fn attach_reuseport<S: AsFd>(&mut self, socket: S) -> Result<(), EbpfError> {
        self.reuseport_mut()?
            .attach(socket)
            .map_err(|source| program_error(REUSEPORT_PROGRAM, source))
    }

    /// The per-CPU `stats` counters.
    ///
    /// # Errors
    /// [`EbpfError::Map`] when the map cannot be read.
    pub fn stats(&self) -> Result<Stats, EbpfError> {
        let map: PerCpuArray<&MapData, u64> = self.map(STATS_MAP)?;
        Stats::read(&map)
    }

    /// A handle on the `stats` map of its own (a duplicate of the map's file descriptor),
    /// for another thread to read the counters while this object stays where it is.
    ///
    /// # Errors
    /// [`EbpfError::MapMissing`] / [`EbpfError::Map`] when the map is gone or its descriptor
    /// cannot be duplicated.
    pub fn stats_reader(&self) -> Result<StatsReader, EbpfError> {
        use aya::maps::IterableMap as _;
        let array: PerCpuArray<&MapData, u64> = self.map(STATS_MAP)?;
        let fd = array
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| map_error(STATS_MAP, MapError::IoError(e)))?;
        let map = MapData::from_fd(fd)
            .and_then(Map::from_map_data)
            .and_then(PerCpuArray::try_from)
            .map_err(|source| map_error(STATS_MAP, source))?;
        Ok(StatsReader { map })
    }

    /// The Initial rate limit's buckets (`initial_limits`): every source prefix it tracks.
    ///
    /// # Errors
    /// [`EbpfError::Map`] / [`EbpfError::MapMissing`] when the map cannot be read.
    pub fn initial_limits(&self) -> Result<Vec<(SourcePrefix, InitialBucket)>, EbpfError> {
        let map: HashMap<&MapData, SourcePrefix, InitialBucket> = self.map(INITIAL_LIMITS_MAP)?;
        map.iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| map_error(INITIAL_LIMITS_MAP, source))
    }

    /// QUIC packets the XDP program placed on `worker`, summed over CPUs.
    ///
    /// # Errors
    /// [`EbpfError::Map`] when `worker` is out of range or the map cannot be read.
    pub fn worker_packets(&self, worker: u32) -> Result<u64, EbpfError> {
        let map: PerCpuArray<&MapData, u64> = self.map(WORKER_STATS_MAP)?;
        let values = map
            .get(&worker, 0)
            .map_err(|source| map_error(WORKER_STATS_MAP, source))?;
        Ok(values.iter().sum())
    }

    /// Runs the XDP program once over `packet` (an Ethernet frame) with `BPF_PROG_TEST_RUN`,
    /// returning its verdict and the packet as it left it. Counters and maps are the real
    /// ones, so a run counts like a received packet.
    ///
    /// # Errors
    /// [`EbpfError::Program`] when the kernel refuses the run (frame shorter than an
    /// Ethernet header, missing privileges).
    pub fn run_xdp(&self, packet: &[u8]) -> Result<XdpRun, EbpfError> {
        let mut out = vec![0u8; packet.len() + TEST_RUN_OUT_SLACK];
        let result = self
            .xdp()?
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .map_err(|source| program_error(XDP_PROGRAM, source))?;
        out.truncate(result.data_size_out as usize);
        Ok(XdpRun {
            action: XdpAction::from(result.return_value),
            packet: out,
        })
    }

    /// Tells XDP where member `id` (a server id, zero-padded) takes forwarded packets.
    ///
    /// # Errors
    /// [`EbpfError::Map`] when the map is full or the write fails.
    pub fn set_fleet_member(
        &mut self,
        id: &ServerIdKey,
        member: &FleetMember,
    ) -> Result<(), EbpfError> {
        let mut map: HashMap<&mut MapData, ServerIdKey, FleetMember> =
            self.map_mut(FLEET_MEMBERS_MAP)?;
        map.insert(id, member, 0)
            .map_err(|source| map_error(FLEET_MEMBERS_MAP, source))
    }

    /// Tells XDP that GUE packets from `addr` come from a member.
    ///
    /// # Errors
    /// [`EbpfError::Map`] when the map is full or the write fails.
    pub fn set_fleet_source(&mut self, addr: &MemberAddr) -> Result<(), EbpfError> {
        let mut map: HashMap<&mut MapData, MemberAddr, u8> = self.map_mut(FLEET_SOURCES_MAP)?;
        map.insert(addr, 1, 0)
            .map_err(|source| map_error(FLEET_SOURCES_MAP, source))
    }

    /// Writes backend `index`'s entry (`backends[index]`).
    ///
    /// # Errors
    /// [`EbpfError::Map`] when `index` is out of range or the write fails.
    pub fn set_backend(&mut self, index: u32, entry: &BackendEntry) -> Result<(), EbpfError> {
        let mut map: Array<&mut MapData, BackendEntry> = self.map_mut(BACKENDS_MAP)?;
        map.set(index, entry, 0)
            .map_err(|source| map_error(BACKENDS_MAP, source))
    }

    /// Attaches the XDP program to `iface` in `mode` (a link owned by this object: dropping
    /// the object or [`Self::detach_xdp`] detaches it).
    ///
    /// # Errors
    /// [`EbpfError::Program`]: no such interface, or the driver/kernel refuses the mode.
    pub fn attach_xdp(&mut self, iface: &str, mode: XdpMode) -> Result<XdpLinkId, EbpfError> {
        self.xdp_mut()?
            .attach(iface, mode)
            .map_err(|source| program_error(XDP_PROGRAM, source))
    }

    /// Pins the XDP link `link` at `path` and lets go of it: the link (and so the program on
    /// the interface) outlives this process until a successor adopts it
    /// ([`Self::adopt_xdp_link`]).
    ///
    /// # Errors
    /// [`EbpfError::Program`] / [`EbpfError::Pin`] when the link cannot be taken or pinned.
    pub fn pin_xdp_link(&mut self, link: XdpLinkId, path: &Path) -> Result<(), EbpfError> {
        let link = self
            .xdp_mut()?
            .take_link(link)
            .map_err(|source| program_error(XDP_PROGRAM, source))?;
        let fd_link = FdLink::try_from(link).map_err(|e| EbpfError::Link(e.to_string()))?;
        fd_link.pin(path).map_err(|source| EbpfError::Pin {
            name: XDP_PROGRAM,
            path: path.to_path_buf(),
            source,
        })?;
        Ok(())
    }

    /// Takes the XDP link pinned at `path` by a predecessor and puts this object's XDP
    /// program on it, atomically (`BPF_LINK_UPDATE`: the interface is never without one).
    ///
    /// # Errors
    /// [`EbpfError::Link`] when there is no such link or the kernel refuses the update.
    pub fn adopt_xdp_link(&mut self, path: &Path) -> Result<XdpLinkId, EbpfError> {
        let pinned = PinnedLink::from_pin(path).map_err(|e| EbpfError::Link(e.to_string()))?;
        let fd_link = pinned.unpin().map_err(|e| EbpfError::Link(e.to_string()))?;
        let link = XdpLink::try_from(fd_link).map_err(|e| EbpfError::Link(e.to_string()))?;
        self.xdp_mut()?
            .attach_to_link(link)
            .map_err(|source| program_error(XDP_PROGRAM, source))
    }

    /// Detaches the XDP link `link` made by [`Self::attach_xdp`].
    ///
    /// # Errors
    /// [`EbpfError::Program`] when the kernel refuses.
    pub fn detach_xdp(&mut self, link: XdpLinkId) -> Result<(), EbpfError> {
        self.xdp_mut()?
            .detach(link)
            .map_err(|source| program_error(XDP_PROGRAM, source))
    }

    /// Pins map `name` at `dir/name` and returns the kernel's id of the pinned map (to tell
    /// our pin from a newer process's at unpin time).
    ///
    /// # Errors
    /// [`EbpfError::Pin`] when the path exists or is not on a BPF filesystem.
    pub fn pin_map(&self, name: &'static str, dir: &Path) -> Result<u32, EbpfError> {
        let path = dir.join(name);
        let map = self.ebpf.map(name).ok_or(EbpfError::MapMissing(name))?;
        map.pin(&path).map_err(|source| EbpfError::Pin {
            name,
            path: path.clone(),
            source,
        })?;
        pinned_map_id(&path)
    }

    /// Takes the `backends` map out of the object, for the health checker to keep writing.
    ///
    /// # Errors
    /// [`EbpfError::MapMissing`] when it was taken already.
    pub fn take_backends(&mut self) -> Result<BackendsMap, EbpfError> {
        Ok(BackendsMap {
            map: self.take(BACKENDS_MAP)?,
            last: Vec::new(),
        })
    }

    /// Takes the fleet maps out of the object, for reloads to keep writing.
    ///
    /// # Errors
    /// [`EbpfError::MapMissing`] when they were taken already.
    pub fn take_fleet(&mut self) -> Result<FleetMaps, EbpfError> {
        Ok(FleetMaps {
            members: self.take(FLEET_MEMBERS_MAP)?,
            sources: self.take(FLEET_SOURCES_MAP)?,
        })
    }

    /// Takes the `worker_counters` map out of the object, for the steering thread.
    ///
    /// # Errors
    /// [`EbpfError::MapMissing`] when it was taken already.
    pub fn take_worker_counters(&mut self) -> Result<WorkerCountersMap, EbpfError> {
        Ok(WorkerCountersMap {
            map: self.take(WORKER_COUNTERS_MAP)?,
        })
    }

    fn take<T>(&mut self, name: &'static str) -> Result<T, EbpfError>
    where
        T: TryFrom<Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(EbpfError::MapMissing(name))?;
        T::try_from(map).map_err(|source| map_error(name, source))
    }

    /// Runs the XDP program `repeat` times over `packet` in the kernel (`BPF_PROG_TEST_RUN`
    /// with `repeat`): the verdict and the kernel's average time per run. For benchmarks;
    /// every run counts in the real maps.
    ///
    /// # Errors
    /// As [`Self::run_xdp`].
    pub fn bench_xdp(
        &self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(XdpAction, std::time::Duration), EbpfError> {
        let mut out = vec![0u8; packet.len() + TEST_RUN_OUT_SLACK];
        let result = self
            .xdp()?
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::default()
            })
            .map_err(|source| program_error(XDP_PROGRAM, source))?;
        Ok((XdpAction::from(result.return_value), result.duration))
    }

    /// The program's time on `packet` as the kernel measures one run (`repeat` 1, the
    /// kernel's own timer around the program, no syscall), averaged over `runs` runs, each
    /// on a fresh copy of the packet. For programs that move the packet's start (GUE
    /// encapsulation and decapsulation): with `repeat` > 1 the kernel runs the program again
    /// on the packet as the previous run left it. The figure includes the timer's own cost,
    /// so compare it with another path measured the same way.
    ///
    /// # Errors
    /// [`EbpfError::Program`] when the kernel refuses a run.
    pub fn bench_xdp_single(
        &self,
        packet: &[u8],
        runs: u32,
    ) -> Result<(XdpAction, std::time::Duration), EbpfError> {
        let xdp = self.xdp()?;
        let mut total = std::time::Duration::ZERO;
        let mut action = XdpAction::Aborted;
        for _ in 0..runs {
            let result = xdp
                .test_run(TestRunOptions {
                    data_in: Some(packet),
                    ..TestRunOptions::default()
                })
                .map_err(|source| program_error(XDP_PROGRAM, source))?;
            total += result.duration;
            action = XdpAction::from(result.return_value);
        }
        Ok((action, total / runs.max(1)))
    }

    fn map<'a, T>(&'a self, name: &'static str) -> Result<T, EbpfError>
    where
        T: TryFrom<&'a aya::maps::Map, Error = MapError>,
    {
        let map = self.ebpf.map(name).ok_or(EbpfError::MapMissing(name))?;
        T::try_from(map).map_err(|source| map_error(name, source))
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, EbpfError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(EbpfError::MapMissing(name))?;
        T::try_from(map).map_err(|source| map_error(name, source))
    }
}

fn program_error(name: &'static str, source: ProgramError) -> EbpfError {
    EbpfError::Program { name, source }
}

fn map_error(name: &'static str, source: MapError) -> EbpfError {
    EbpfError::Map { name, source }
}
