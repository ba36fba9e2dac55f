//! Names and `#[repr(C)]` value layouts of the BPF maps shared by `spooky-ebpf` and user space.
//! Every layout here has a size assertion; user space gets `aya::Pod` through the `user` feature.
//!
//! Layouts use fixed-width integers only, `u32` flags instead of `bool`, and spell out any
//! padding as `reserved` bytes, so kernel and user space agree byte for byte. The maps
//! themselves (their kinds and sizes) are declared once in `spooky-ebpf`; the constants here
//! are what user space looks them up by. Nothing here does I/O.

use crate::cid::{CidLayout, LayoutError};

/// Name of the XDP program (parse, count, drop junk, steer).
pub const XDP_PROGRAM: &str = "spooky_xdp";
/// Name of the `sk_reuseport` program (picks the owning worker's socket).
pub const REUSEPORT_PROGRAM: &str = "spooky_reuseport";

/// `Array<SteeringConfig, 1>`: the steering configuration, written by user space at start.
pub const CONFIG_MAP: &str = "config";
/// `PerCpuArray<u64, COUNTER_COUNT>`: per-CPU packet counters, indexed by [`Counter`].
pub const STATS_MAP: &str = "stats";
/// `PerCpuArray<u64, SLOTS>`: per-CPU count of QUIC packets steered to each worker, by
/// [`slot`].
pub const WORKER_STATS_MAP: &str = "worker_stats";
/// `Array<WorkerEntry, SLOTS>`: a worker's CPU and liveness, by [`slot`] (generation, worker).
pub const WORKERS_MAP: &str = "workers";
/// `Array<GenerationEntry, MAX_GENERATIONS>`: the processes steering knows, by generation.
pub const GENERATIONS_MAP: &str = "generations";
/// `CpuMap<MAX_CPUS>`: the CPUs XDP may redirect to (entry per CPU, queue size > 0 to enable).
pub const CPUS_MAP: &str = "cpus";
/// `ReusePortSockArray<SLOTS>`: [`slot`] (generation, worker) → that worker's UDP socket.
pub const SOCKETS_MAP: &str = "sockets";
/// `Array<BackendEntry, MAX_BACKENDS>`: flattened backend index → published health, written
/// by the health checker (user space); for operators (`bpftool`, `spooky status`).
pub const BACKENDS_MAP: &str = "backends";
/// `Array<WorkerCounters, SLOTS>`: user-space counters of each worker (packets received,
/// misroutes, connections, requests) by [`slot`], mirrored by the steering thread for
/// `spooky status`.
pub const WORKER_COUNTERS_MAP: &str = "worker_counters";

/// `LruHashMap<SourcePrefix, InitialBucket, MAX_INITIAL_PREFIXES>`: the Initial-flood
/// defense's state, one rate-limit bucket per client source prefix (/24, /56), written by XDP.
pub const INITIAL_LIMITS_MAP: &str = "initial_limits";

/// `HashMap<fleet::ServerIdKey, fleet::FleetMember, MAX_FLEET_MEMBERS>`: the other hosts of
/// the fleet by server id, where XDP forwards their connections' packets (`fleet.members`).
pub const FLEET_MEMBERS_MAP: &str = "fleet_members";
/// `HashMap<fleet::MemberAddr, u8, MAX_FLEET_MEMBERS>`: the members' addresses, the only
/// senders whose forwarded packets XDP takes apart.
pub const FLEET_SOURCES_MAP: &str = "fleet_sources";
/// Entries of the fleet maps.
pub const MAX_FLEET_MEMBERS: u32 = 4096;

/// The maps pinned under the pin path while Spooky runs (file name = map name). Every map is
/// pinned: a process taking over loads its programs onto these same maps, so the sockets,
/// workers and limits of the process it replaces stay in force while that one drains.
pub const PINNED_MAPS: [&str; 12] = [
    CONFIG_MAP,
    GENERATIONS_MAP,
    WORKERS_MAP,
    SOCKETS_MAP,
    CPUS_MAP,
    BACKENDS_MAP,
    STATS_MAP,
    WORKER_STATS_MAP,
    WORKER_COUNTERS_MAP,
    INITIAL_LIMITS_MAP,
    FLEET_MEMBERS_MAP,
    FLEET_SOURCES_MAP,
];

/// Layout version of the maps: a process refuses to take over maps pinned by a Spooky
/// whose layouts differ (it says so; a full restart is needed then).
pub const MAPS_ABI: u32 = 5;

/// Most workers the steering can address: the CID carries the worker index in one byte.
pub const MAX_WORKERS: u32 = 256;
/// Generations (3 bits of the CID; 7 is reserved, so 0..=6 are used).
pub const MAX_GENERATIONS: u32 = 8;
/// Entries of the per-worker maps: one per (generation, worker).
pub const SLOTS: u32 = MAX_GENERATIONS * MAX_WORKERS;

/// The index of worker `worker` of generation `generation` in the per-worker maps.
#[inline(always)]
pub const fn slot(generation: u8, worker: u32) -> u32 {
    (generation as u32 & (MAX_GENERATIONS - 1)) * MAX_WORKERS + (worker & (MAX_WORKERS - 1))
}
/// Entries of the CPU map (CPU ids the XDP program may redirect to).
pub const MAX_CPUS: u32 = 256;
/// Entries of the backends map (backends of all upstreams together).
pub const MAX_BACKENDS: u32 = 1024;
/// Source prefixes the Initial rate limit tracks at once (least recently used ones are
/// evicted, and start again with a full burst when they come back).
pub const MAX_INITIAL_PREFIXES: u32 = 65_536;
/// Bytes of a name in [`BackendEntry`] (longer names are cut, shorter ones NUL-padded).
pub const NAME_LEN: usize = 32;

/// [`SteeringConfig::flags`]: XDP redirects each QUIC packet to its worker's CPU through
/// the CPU map when that worker is alive (else the packet passes up the stack).
pub const FLAG_REDIRECT_CPU: u32 = 1 << 0;
/// [`SteeringConfig::flags`]: fleet mode. XDP forwards (GUE, `XDP_TX`) IPv4 packets whose
/// connection ID names another member in `fleet_members`, and takes apart GUE packets from
/// `fleet_sources` to [`SteeringConfig::fleet_port`] that name our server id.
pub const FLAG_FLEET: u32 = 1 << 1;
/// Connection IDs are in the load balancer's layout
/// ([`CidLayout::for_load_balancer`]): generation and worker are their last two bytes.
pub const FLAG_LB_LAYOUT: u32 = 1 << 2;

/// The steering configuration, the only entry (index 0) of [`CONFIG_MAP`].
///
/// All zero (the state before user space writes it) means "no QUIC port": every packet
/// passes and is counted as non-QUIC. `mode`, `pid` and `ifindex` are for operators
/// (`spooky status`); the kernel programs ignore them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteeringConfig {
    /// UDP destination port of the QUIC listener, host byte order; 0 disables parsing.
    pub quic_port: u16,
    /// Length of server-chosen connection IDs (the short-header DCID length).
    pub cid_len: u8,
    /// Server id length inside the connection ID.
    pub server_id_len: u8,
    /// The newest generation: the process new connections go to.
    pub generation: u8,
    /// The steering mode in force, one of the `MODE_*` constants.
    pub mode: u8,
    /// Always zero (explicit padding).
    pub reserved: [u8; 2],
    /// Number of workers of the newest generation; 0 disables steering.
    pub workers: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Process id of the Spooky that wrote this entry.
    pub pid: u32,
    /// Interface index XDP is attached to; 0 when XDP is not attached.
    pub ifindex: u32,
    /// Name of that interface, NUL-padded (interface indices are per network namespace; the
    /// name says which one an operator should look for).
    pub iface: [u8; IFACE_LEN],
    /// Initial-flood defense: client Initial packets per second allowed from one source
    /// prefix (/24 IPv4, /56 IPv6; [`WIDE_PREFIX_FACTOR`] times that from a /16 or /48); 0
    /// turns the limit off (`steering.initial_rate`).
    pub initial_rate: u32,
    /// Initial packets a prefix may send at once above the rate (`steering.initial_burst`;
    /// 0 is read as 1).
    pub initial_burst: u32,
    /// [`MAPS_ABI`] of the Spooky that wrote this entry.
    pub abi: u32,
    /// Key of the hash that places client-chosen connection IDs
    /// (`spooky_common::cid::fnv1a32_keyed`), drawn at random by the process that wrote this
    /// entry.
    pub hash_key: u32,
    /// Fleet mode ([`FLAG_FLEET`]): UDP port of `fleet.listen`, host byte order.
    pub fleet_port: u16,
    /// Always zero (explicit padding).
    pub reserved2: [u8; 2],
    /// This host's IPv4 address among the members: the outer source of what XDP forwards.
    pub fleet_source: [u8; 4],
    /// Our server id (`quic.server_id`), zero-padded.
    pub server_id: [u8; 8],
}

/// Bytes of [`SteeringConfig::iface`] (`IFNAMSIZ`).
pub const IFACE_LEN: usize = 16;
const _: () = assert!(size_of::<SteeringConfig>() == 56 + IFACE_LEN);

/// One process steering knows, an entry of [`GENERATIONS_MAP`] (index = its generation).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenerationEntry {
    /// Its number of workers; 0 when no live process owns the generation.
    pub workers: u32,
    /// 1 while it takes new connections (the newest); 0 while it drains.
    pub accepting: u32,
    /// Its process id (for operators).
    pub pid: u32,
    /// When it started, seconds since the epoch (for operators).
    pub started: u32,
}
const _: () = assert!(size_of::<GenerationEntry>() == 16);

impl GenerationEntry {
    /// The workers of a live generation, 0 for one nobody owns.
    #[inline(always)]
    pub const fn live_workers(&self) -> u32 {
        if self.workers > MAX_WORKERS {
            MAX_WORKERS
        } else {
            self.workers
        }
    }
}

/// [`SteeringConfig::mode`]: not written (no Spooky has configured the maps).
pub const MODE_NONE: u8 = 0;
/// [`SteeringConfig::mode`]: the `sk_reuseport` program picks the socket; no XDP.
pub const MODE_SK_REUSEPORT: u8 = 1;
/// [`SteeringConfig::mode`]: plus XDP in generic (SKB) mode.
pub const MODE_XDP_GENERIC: u8 = 2;
/// [`SteeringConfig::mode`]: plus XDP in native (driver) mode.
pub const MODE_XDP_NATIVE: u8 = 3;

impl SteeringConfig {
    /// The connection-ID layout this configuration names.
    ///
    /// # Errors
    /// [`LayoutError`] when the lengths or generation do not form a valid layout.
    #[inline(always)]
    pub const fn layout(&self) -> Result<CidLayout, LayoutError> {
        if self.flags & FLAG_LB_LAYOUT != 0 {
            CidLayout::for_load_balancer(self.cid_len, self.server_id_len, self.generation)
        } else {
            CidLayout::new(self.cid_len, self.server_id_len, self.generation)
        }
    }

    /// The interface name without its NUL padding.
    pub fn iface_bytes(&self) -> &[u8] {
        let end = self.iface.iter().position(|b| *b == 0).unwrap_or(IFACE_LEN);
        self.iface.get(..end).unwrap_or(&[])
    }

    /// `name` as an [`Self::iface`] value (cut to `IFACE_LEN` bytes).
    pub fn iface_name(name: &[u8]) -> [u8; IFACE_LEN] {
        let mut out = [0u8; IFACE_LEN];
        for (dst, src) in out.iter_mut().zip(name) {
            *dst = *src;
        }
        out
    }

    /// Whether `flag` (one of the `FLAG_*` constants) is set.
    #[inline(always)]
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// [`SourcePrefix::family`] of an IPv4 source (prefix: the first 3 bytes, a /24).
pub const FAMILY_IPV4: u32 = 4;
/// [`SourcePrefix::family`] of an IPv6 source (prefix: the first 7 bytes, a /56).
pub const FAMILY_IPV6: u32 = 6;
/// [`SourcePrefix::family`] of an IPv4 source's wider prefix (the first 2 bytes, a /16).
pub const FAMILY_IPV4_WIDE: u32 = 0x0410;
/// [`SourcePrefix::family`] of an IPv6 source's wider prefix (the first 6 bytes, a /48).
pub const FAMILY_IPV6_WIDE: u32 = 0x0630;
/// The wider prefixes (/16, /48) are allowed this many times a narrow prefix's rate and burst:
/// a /16 holds 256 /24s, so a flood spread over many of them is held back, while up to 16
/// /24s of one network at full rate (a large NAT, a cloud region) are not.
pub const WIDE_PREFIX_FACTOR: u32 = 16;
/// Bytes of an IPv4 source address kept in [`SourcePrefix::prefix`] (/24).
pub const IPV4_PREFIX_BYTES: usize = 3;
/// Bytes of an IPv6 source address kept in [`SourcePrefix::prefix`] (/56).
pub const IPV6_PREFIX_BYTES: usize = 7;

/// The key of [`INITIAL_LIMITS_MAP`]: a client's source prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourcePrefix {
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u32,
    /// The leading bytes of the source address ([`IPV4_PREFIX_BYTES`] or
    /// [`IPV6_PREFIX_BYTES`]), the rest zero.
    pub prefix: [u8; 8],
}
const _: () = assert!(size_of::<SourcePrefix>() == 12);

impl SourcePrefix {
    /// The /24 of an IPv4 source address.
    #[inline(always)]
    pub const fn ipv4(src: [u8; 4]) -> Self {
        Self {
            family: FAMILY_IPV4,
            prefix: [src[0], src[1], src[2], 0, 0, 0, 0, 0],
        }
    }

    /// The /56 of an IPv6 source address.
    #[inline(always)]
    pub const fn ipv6(src: &[u8; 16]) -> Self {
        Self {
            family: FAMILY_IPV6,
            prefix: [src[0], src[1], src[2], src[3], src[4], src[5], src[6], 0],
        }
    }

    /// The wider prefix holding this one: the /16 of a /24, the /48 of a /56 (a wider prefix
    /// is its own).
    #[inline(always)]
    pub const fn wider(&self) -> Self {
        let p = self.prefix;
        match self.family {
            FAMILY_IPV4 | FAMILY_IPV4_WIDE => Self {
                family: FAMILY_IPV4_WIDE,
                prefix: [p[0], p[1], 0, 0, 0, 0, 0, 0],
            },
            _ => Self {
                family: FAMILY_IPV6_WIDE,
                prefix: [p[0], p[1], p[2], p[3], p[4], p[5], 0, 0],
            },
        }
    }
}

/// The value of [`INITIAL_LIMITS_MAP`]: one prefix's rate-limit state as a token bucket in
/// its "virtual scheduling" form (GCRA): a single timestamp instead of a token count.
///
/// With `interval = 1 s / rate`, an Initial arriving at `now` is allowed when
/// `max(tat_ns, now) + interval - now <= burst * interval`, and then `tat_ns` becomes
/// `max(tat_ns, now) + interval`; otherwise it is dropped and `tat_ns` stays. That is exactly
/// a bucket of `burst` tokens refilled at `rate` per second, kept in one `u64`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InitialBucket {
    /// Theoretical arrival time of the next Initial, `bpf_ktime_get_ns` clock (monotonic
    /// since boot).
    pub tat_ns: u64,
}
const _: () = assert!(size_of::<InitialBucket>() == 8);

impl InitialBucket {
    /// The GCRA decision for an Initial at `now_ns` with `rate` per second and `burst`:
    /// the new state when the packet is allowed, `None` when it is over the limit. `rate`
    /// must not be 0 (0 means "no limit" and is decided before asking). Pure arithmetic, no
    /// panics (saturating, no division by zero), so the kernel and the tests share it.
    #[inline(always)]
    pub fn admit(self, now_ns: u64, rate: u32, burst: u32) -> Option<Self> {
        let interval = NANOS_PER_SEC.checked_div(u64::from(rate))?.max(1);
        let tolerance = interval.saturating_mul(u64::from(burst.max(1)));
        let start = if self.tat_ns > now_ns {
            self.tat_ns
        } else {
            now_ns
        };
        let next = start.saturating_add(interval);
        if next - now_ns > tolerance {
            return None;
        }
        Some(Self { tat_ns: next })
    }
}

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// One worker, an entry of [`WORKERS_MAP`] (index = [`slot`] of its generation and index).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerEntry {
    /// The CPU the worker thread is pinned to (the CPU map key XDP redirects to).
    pub cpu: u32,
    /// 1 when the worker takes new connections. 0 (dead or draining): client-chosen DCIDs
    /// that hash to it go to the next live worker; packets naming it by CID still reach it.
    pub alive: u32,
    /// The CID generation the worker's process uses.
    pub generation: u32,
}
const _: () = assert!(size_of::<WorkerEntry>() == 12);

impl WorkerEntry {
    /// Whether the worker is running.
    #[inline(always)]
    pub const fn is_alive(&self) -> bool {
        self.alive != 0
    }
}

/// Published health of one backend, an entry of [`BACKENDS_MAP`] (index = position of the
/// backend in the configuration, upstreams in order, then their backends in order).
///
/// Entries past the last backend are all zero (`present == 0`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendEntry {
    /// Index of the backend's upstream (pool) in the configuration.
    pub upstream: u32,
    /// Index of the backend inside its upstream.
    pub backend: u32,
    /// Health state (`spooky::health::HealthState::as_u32`: 0 healthy, 1 unhealthy,
    /// 2 ejected, 3 recovering).
    pub state: u32,
    /// Failed checks or requests in a row.
    pub consecutive_failures: u32,
    /// Requests in flight to the backend (0 when not tracked).
    pub in_flight: u32,
    /// 1 when this slot holds a backend.
    pub present: u32,
    /// Latency of the last successful probe or response, µs.
    pub last_latency_us: u64,
    /// Exponentially weighted moving average of the latency, µs.
    pub ewma_latency_us: u64,
    /// Name of the upstream (pool), NUL-padded.
    pub pool: [u8; NAME_LEN],
    /// The backend's id, NUL-padded.
    pub name: [u8; NAME_LEN],
}
const _: () = assert!(size_of::<BackendEntry>() == 40 + 2 * NAME_LEN);

impl Default for BackendEntry {
    fn default() -> Self {
        Self {
            upstream: 0,
            backend: 0,
            state: 0,
            consecutive_failures: 0,
            in_flight: 0,
            present: 0,
            last_latency_us: 0,
            ewma_latency_us: 0,
            pool: [0; NAME_LEN],
            name: [0; NAME_LEN],
        }
    }
}

impl BackendEntry {
    /// A present entry for backend `backend` of upstream `upstream`, names cut to
    /// [`NAME_LEN`] bytes; health fields zero (healthy, no latency yet).
    pub fn named(upstream: u32, backend: u32, pool: &[u8], name: &[u8]) -> Self {
        Self {
            upstream,
            backend,
            present: 1,
            pool: padded(pool),
            name: padded(name),
            ..Self::default()
        }
    }

    /// The pool name without its NUL padding.
    pub fn pool_bytes(&self) -> &[u8] {
        unpadded(&self.pool)
    }

    /// The backend id without its NUL padding.
    pub fn name_bytes(&self) -> &[u8] {
        unpadded(&self.name)
    }
}

fn padded(bytes: &[u8]) -> [u8; NAME_LEN] {
    let mut out = [0u8; NAME_LEN];
    for (dst, src) in out.iter_mut().zip(bytes) {
        *dst = *src;
    }
    out
}

fn unpadded(bytes: &[u8; NAME_LEN]) -> &[u8] {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(NAME_LEN);
    bytes.get(..end).unwrap_or(&[])
}

/// User-space counters of one worker, an entry of [`WORKER_COUNTERS_MAP`] (index = worker
/// index). Each is a running total since the worker started.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerCounters {
    /// Datagrams the worker read from its own socket.
    pub packets_in: u64,
    /// Datagrams the worker sent.
    pub packets_out: u64,
    /// Datagrams that reached this worker but belong to another: forwarded in user space.
    /// Zero while eBPF steering works.
    pub misrouted: u64,
    /// Datagrams dropped in user space (unparsable, unknown connection, short Initial).
    pub dropped: u64,
    /// QUIC connections accepted.
    pub connections_accepted: u64,
    /// QUIC connections open now.
    pub connections_active: u64,
    /// HTTP requests received.
    pub requests: u64,
}
const _: () = assert!(size_of::<WorkerCounters>() == 56);

/// Indices of the per-CPU counters in [`STATS_MAP`] (each value a `u64`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Every packet the XDP program saw.
    Packets = 0,
    /// Passed up the stack because it is not UDP to the QUIC port (or not IP at all).
    PassedNonQuic = 1,
    /// Valid QUIC short-header packets.
    QuicShort = 2,
    /// Valid QUIC long-header packets.
    QuicLong = 3,
    /// Dropped: QUIC fixed bit (0x40) clear.
    DropFixedBit = 4,
    /// Dropped: long-header DCID length above 20.
    DropDcidTooLong = 5,
    /// Dropped: client Initial in a UDP payload shorter than 1200 bytes.
    DropShortInitial = 6,
    /// Dropped: headers cut short (UDP length or QUIC header past the packet's end).
    DropTruncated = 7,
    /// Steered by the worker byte of one of our connection IDs.
    SteeredByCid = 8,
    /// Steered by the hash of a client-chosen connection ID.
    SteeredByHash = 9,
    /// QUIC packet redirected to its worker's CPU.
    Redirected = 10,
    /// Redirect wanted but not possible (worker dead, or CPU map entry missing): passed.
    RedirectFailed = 11,
    /// Valid QUIC packet passed up the stack (not redirected).
    PassedQuic = 12,
    /// Dropped: a client Initial over its source prefix's rate limit.
    DropInitialRateLimited = 13,
    /// One of our connection IDs whose generation no live process owns (a process that
    /// finished or crashed): passed without a choice of socket, for user space to answer with
    /// a Stateless Reset.
    UnknownGeneration = 14,
    /// Dropped: an IP fragment of a datagram to the QUIC port (QUIC forbids IP fragmentation,
    /// RFC 9000 §14; a first fragment is where its UDP header shows the port).
    DropFragment = 15,
    /// A packet of another fleet member's connection, GUE-encapsulated and sent back out
    /// (`XDP_TX`) towards that member.
    FleetForwarded = 16,
    /// A GUE packet from a member, taken apart and passed up as the client's packet.
    FleetReceived = 17,
    /// Dropped: a packet to the fleet port from an address that is no member.
    FleetRefused = 18,
    /// Dropped: a forwarded packet that is malformed, or names a server id other than ours
    /// (never forwarded twice).
    FleetMalformed = 19,
}

/// Number of counters in [`STATS_MAP`].
pub const COUNTER_COUNT: u32 = 20;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Packets,
        Counter::PassedNonQuic,
        Counter::QuicShort,
        Counter::QuicLong,
        Counter::DropFixedBit,
        Counter::DropDcidTooLong,
        Counter::DropShortInitial,
        Counter::DropTruncated,
        Counter::SteeredByCid,
        Counter::SteeredByHash,
        Counter::Redirected,
        Counter::RedirectFailed,
        Counter::PassedQuic,
        Counter::DropInitialRateLimited,
        Counter::UnknownGeneration,
        Counter::DropFragment,
        Counter::FleetForwarded,
        Counter::FleetReceived,
        Counter::FleetRefused,
        Counter::FleetMalformed,
    ];

    /// The map index of this counter.
    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// A stable snake_case name (metrics label, `spooky status`).
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Packets => "packets",
            Counter::PassedNonQuic => "passed_non_quic",
            Counter::QuicShort => "quic_short",
            Counter::QuicLong => "quic_long",
            Counter::DropFixedBit => "drop_fixed_bit",
            Counter::DropDcidTooLong => "drop_dcid_too_long",
            Counter::DropShortInitial => "drop_short_initial",
            Counter::DropTruncated => "drop_truncated",
            Counter::SteeredByCid => "steered_by_cid",
            Counter::SteeredByHash => "steered_by_hash",
            Counter::Redirected => "redirected",
            Counter::RedirectFailed => "redirect_failed",
            Counter::PassedQuic => "passed_quic",
            Counter::DropInitialRateLimited => "drop_initial_rate_limited",
            Counter::UnknownGeneration => "unknown_generation",
            Counter::DropFragment => "drop_fragment",
            Counter::FleetForwarded => "fleet_forwarded",
            Counter::FleetReceived => "fleet_received",
            Counter::FleetRefused => "fleet_refused",
            Counter::FleetMalformed => "fleet_malformed",
        }
    }
}

const _: () = {
    let mut i = 0;
    while i < Counter::ALL.len() {
        assert!(Counter::ALL[i] as usize == i);
        i += 1;
    }
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]`, only integer fields, no implicit padding (size assertions
    // above), every bit pattern valid.
    unsafe impl aya::Pod for super::SteeringConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WorkerEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GenerationEntry {}
    // SAFETY: as above (byte arrays are integers too).
    unsafe impl aya::Pod for super::BackendEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WorkerCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SourcePrefix {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InitialBucket {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_config_has_no_valid_layout_and_no_flags() {
        let c = SteeringConfig::default();
        assert!(c.layout().is_err());
        assert!(!c.has(FLAG_REDIRECT_CPU));
    }

    #[test]
    fn backend_names_are_padded_and_cut() {
        let e = BackendEntry::named(1, 2, b"api", &[b'x'; 40]);
        assert_eq!(e.pool_bytes(), b"api");
        assert_eq!(e.name_bytes(), &[b'x'; NAME_LEN]);
        assert_eq!((e.upstream, e.backend, e.present), (1, 2, 1));
        assert_eq!(BackendEntry::default().pool_bytes(), b"");
    }

    #[test]
    fn source_prefixes_keep_24_and_56_bits() {
        let a = SourcePrefix::ipv4([192, 0, 2, 7]);
        assert_eq!(a, SourcePrefix::ipv4([192, 0, 2, 200]));
        assert_ne!(a, SourcePrefix::ipv4([192, 0, 3, 7]));
        assert_eq!(a.prefix, [192, 0, 2, 0, 0, 0, 0, 0]);
        let mut v6 = [0u8; 16];
        v6[..8].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0x12]);
        let b = SourcePrefix::ipv6(&v6);
        v6[7] = 0xff; // inside the /56
        v6[15] = 1;
        assert_eq!(b, SourcePrefix::ipv6(&v6));
        v6[6] = 1; // outside
        assert_ne!(b, SourcePrefix::ipv6(&v6));
        assert_ne!(b.family, a.family);
    }

    #[test]
    fn gcra_allows_the_burst_then_the_rate() {
        let (rate, burst) = (10u32, 5u32); // interval 100 ms
        let t0 = 1_000_000_000_000u64;
        let mut b = InitialBucket { tat_ns: t0 };
        for i in 0..burst {
            b = b
                .admit(t0, rate, burst)
                .unwrap_or_else(|| panic!("packet {i}"));
        }
        assert_eq!(b.admit(t0, rate, burst), None, "over the burst");
        // Half an interval later: still nothing; a whole one: exactly one more.
        assert_eq!(b.admit(t0 + 50_000_000, rate, burst), None);
        let b = b.admit(t0 + 100_000_000, rate, burst).unwrap();
        assert_eq!(b.admit(t0 + 100_000_000, rate, burst), None);
        // Idle for long: a full burst again, not more.
        let mut idle = b;
        let later = t0 + 60_000_000_000;
        for _ in 0..burst {
            idle = idle.admit(later, rate, burst).unwrap();
        }
        assert_eq!(idle.admit(later, rate, burst), None);
        // A state from the future (a racing CPU's update) is read as such, not underflowed.
        assert!(InitialBucket { tat_ns: t0 + 1 }
            .admit(t0, rate, burst)
            .is_some());
        // Rate 0 is decided by the caller; here it admits nothing rather than dividing by 0.
        assert_eq!(InitialBucket::default().admit(t0, 0, burst), None);
        // Burst 0 is read as 1; huge rates do not overflow.
        assert!(InitialBucket::default().admit(t0, rate, 0).is_some());
        assert!(InitialBucket::default()
            .admit(u64::MAX - 1, u32::MAX, u32::MAX)
            .is_some());
    }

    #[test]
    fn counter_names_are_unique() {
        for (i, a) in Counter::ALL.iter().enumerate() {
            assert_eq!(a.index() as usize, i);
            for b in &Counter::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
