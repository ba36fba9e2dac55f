//! Spooky's kernel programs.
//!
//! - `spooky_xdp` (XDP): parses Ethernet (+ VLAN) / IPv4 / IPv6 / UDP; UDP to the configured
//!   QUIC port is classified as a long or short QUIC header, invalid QUIC is dropped (fixed bit
//!   clear, DCID longer than 20, short client Initial, truncated header), valid QUIC is placed
//!   on its worker with `spooky_common::cid::place` and, when enabled, redirected to that
//!   worker's CPU through the `cpus` CPU map. Everything else passes. Every outcome is counted
//!   in the per-CPU `stats` map.
//!   Before a client Initial is placed, it passes the Initial-flood defense: a rate limit per
//!   source prefix (/24, /56) and per wider prefix (/16, /48, at `WIDE_PREFIX_FACTOR` times the
//!   rate and burst) kept in the `initial_limits` LRU hash (see [`initial_allowed`]); over
//!   either limit it is dropped and counted as `drop_initial_rate_limited`. Other packets
//!   (Handshake, 0-RTT, short headers) are never rate-limited.
//! - `spooky_reuseport` (`sk_reuseport`): picks the owning worker's socket from `sockets` by
//!   the same decision, parsing a copy of the QUIC header made with `bpf_skb_load_bytes` (the
//!   header need not be in the socket buffer's linear area).
//!
//! Placement, generations and liveness: every process has a generation (3 bits of its
//! connection IDs) and its workers have slots `generation × 256 + worker` in `workers`,
//! `sockets` and the per-worker counters; `generations` says which generations a live process
//! owns and `config.generation` is the newest. A packet whose DCID is one of ours goes to the
//! generation and worker it names — the process that is draining keeps its connections while
//! the newest takes new ones — alive or not; one whose generation nobody owns any more is
//! counted (`unknown_generation`) and passed without a choice of socket, for user space to
//! answer with a Stateless Reset. A new connection (an Initial without a token) is hashed onto
//! a worker of the newest generation; when `workers` marks that worker dead (`alive == 0`) the
//! next live worker in index order takes it, so a dead worker gets no new connections.
//!
//! Fleet mode (`FLAG_FLEET`, see `spooky_common::fleet`): an IPv4 QUIC packet whose connection
//! ID names another member's server id (in `fleet_members`) is wrapped in GUE and sent back out
//! (`XDP_TX`) towards that member; a GUE packet to the fleet port from a member (in
//! `fleet_sources`) whose inner packet names our server id is unwrapped and passed up as the
//! client's packet. Others to the fleet port pass to user space (IPv6, extensions) or are
//! dropped (not from a member, malformed, naming another server: never forwarded twice).
//!
//! `backends` and `worker_counters` are declared here only so that they exist with BTF in the
//! object (user space writes them, operators read them); no program touches them.
//!
//! Map layouts and names live in `spooky_common::maps`; this crate only declares the maps.
//! Entry points are thin wrappers over `try_*` functions; nothing here can panic (the panic
//! handler is an endless loop, which the verifier would refuse if it were reachable).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{sk_action, xdp_action, BPF_ANY},
    btf_maps::{Array, CpuMap, HashMap, LruHashMap, PerCpuArray, ReusePortSockArray},
    cty::c_void,
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes, bpf_xdp_adjust_head},
    macros::{btf_map, sk_reuseport, xdp},
    programs::{SkReuseportContext, XdpContext},
};
use spooky_common::{
    cid::{self, Place},
    fleet::{self, Decap, FleetMember, MemberAddr, ServerIdKey},
    maps::{
        slot, BackendEntry, Counter, GenerationEntry, InitialBucket, SourcePrefix, SteeringConfig,
        WorkerCounters, WorkerEntry, COUNTER_COUNT, FLAG_FLEET, FLAG_REDIRECT_CPU, MAX_BACKENDS,
        MAX_CPUS, MAX_FLEET_MEMBERS, MAX_GENERATIONS, MAX_INITIAL_PREFIXES, MAX_WORKERS, SLOTS,
        WIDE_PREFIX_FACTOR,
    },
    packet::{locate_udp, EthHdr, Ipv4Hdr, Packet, UdpHdr, UDP_HDR_LEN},
    quic::{self, Form, QuicHeader},
};

/// `spooky_common::maps::FLEET_MEMBERS_MAP`.
#[btf_map(name = "fleet_members")]
static FLEET_MEMBERS: HashMap<ServerIdKey, FleetMember, { MAX_FLEET_MEMBERS as usize }> =
    HashMap::new();

/// `spooky_common::maps::FLEET_SOURCES_MAP`.
#[btf_map(name = "fleet_sources")]
static FLEET_SOURCES: HashMap<MemberAddr, u8, { MAX_FLEET_MEMBERS as usize }> = HashMap::new();

/// `spooky_common::maps::CONFIG_MAP`.
#[btf_map(name = "config")]
static CONFIG: Array<SteeringConfig, 1> = Array::new();

/// `spooky_common::maps::STATS_MAP`.
#[btf_map(name = "stats")]
static STATS: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();

/// `spooky_common::maps::WORKER_STATS_MAP`.
#[btf_map(name = "worker_stats")]
static WORKER_STATS: PerCpuArray<u64, { SLOTS as usize }> = PerCpuArray::new();

/// `spooky_common::maps::WORKERS_MAP`.
#[btf_map(name = "workers")]
static WORKERS: Array<WorkerEntry, { SLOTS as usize }> = Array::new();

/// `spooky_common::maps::GENERATIONS_MAP`.
#[btf_map(name = "generations")]
static GENERATIONS: Array<GenerationEntry, { MAX_GENERATIONS as usize }> = Array::new();

/// `spooky_common::maps::CPUS_MAP`.
#[btf_map(name = "cpus")]
static CPUS: CpuMap<{ MAX_CPUS as usize }> = CpuMap::new();

/// `spooky_common::maps::SOCKETS_MAP`.
#[btf_map(name = "sockets")]
static SOCKETS: ReusePortSockArray<{ SLOTS as usize }> = ReusePortSockArray::new();

/// `spooky_common::maps::BACKENDS_MAP`.
#[btf_map(name = "backends")]
static BACKENDS: Array<BackendEntry, { MAX_BACKENDS as usize }> = Array::new();

/// `spooky_common::maps::WORKER_COUNTERS_MAP`.
#[btf_map(name = "worker_counters")]
static WORKER_COUNTERS: Array<WorkerCounters, { SLOTS as usize }> = Array::new();

/// `spooky_common::maps::INITIAL_LIMITS_MAP`.
#[btf_map(name = "initial_limits")]
static INITIAL_LIMITS: LruHashMap<SourcePrefix, InitialBucket, { MAX_INITIAL_PREFIXES as usize }> =
    LruHashMap::new();

/// Adds one to this CPU's `counter`.
#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = STATS.get_ptr_mut(counter.index()) {
        // SAFETY: a per-CPU array slot of this CPU; XDP runs with preemption off, so no one
        // else writes it concurrently.
        unsafe { *slot += 1 };
    }
}

/// Adds one to this CPU's packet count of the worker at `index` ([`slot`]).
#[inline(always)]
fn count_worker(index: u32) {
    if let Some(slot) = WORKER_STATS.get_ptr_mut(index) {
        // SAFETY: as in `count`.
        unsafe { *slot += 1 };
    }
}

/// The steering configuration, when user space has written one with a QUIC port.
#[inline(always)]
fn config() -> Option<SteeringConfig> {
    let config = *CONFIG.get(0)?;
    if config.quic_port == 0 {
        return None;
    }
    Some(config)
}

/// Whether worker `index` ([`slot`]) takes new connections (one missing from the map does
/// not).
#[inline(always)]
fn is_alive(index: u32) -> bool {
    WORKERS.get(index).is_some_and(WorkerEntry::is_alive)
}

/// The workers of the live process of `generation`, 0 when no live process owns it.
#[inline(always)]
fn workers_of(generation: u8) -> u32 {
    GENERATIONS
        .get(u32::from(generation))
        .map_or(0, GenerationEntry::live_workers)
}

/// The first live worker of `generation` at or after `hashed` (wrapping) among `workers`;
/// `hashed` itself when none is alive.
#[inline(always)]
fn live_worker(generation: u8, hashed: u32, workers: u32) -> u32 {
    let mut step = 0;
    while step < MAX_WORKERS {
        if step >= workers {
            break;
        }
        // `checked_rem`: no division-by-zero panic path for the verifier to refuse.
        let Some(candidate) = hashed.wrapping_add(step).checked_rem(workers) else {
            break;
        };
        if is_alive(slot(generation, candidate)) {
            return candidate;
        }
        step += 1;
    }
    hashed
}

/// Where a packet goes: the (generation, worker) slot, and whether one of our connection
/// IDs named it.
#[derive(Clone, Copy)]
struct Placement {
    slot: u32,
    by_cid: bool,
}

/// The owner of a packet with `dcid` (`spooky_common::cid::place`, the rule user space and
/// the classic BPF program follow too): by the generation and worker our CID names, or, for
/// a new connection, the first live worker of the newest generation from its hash. `Err`
/// with [`Counter::UnknownGeneration`] for a CID of ours that no live process owns; `None`
/// when steering is not configured.
#[inline(always)]
fn place(
    config: &SteeringConfig,
    dcid: &[u8],
    initial: bool,
) -> Option<Result<Placement, Counter>> {
    let layout = config.layout().ok()?;
    if config.workers == 0 {
        return None;
    }
    let newest = config.generation;
    Some(
        match cid::place(&layout, dcid, initial, config.hash_key, newest, workers_of) {
            Place::Worker {
                generation,
                worker,
                by_cid: true,
            } => Ok(Placement {
                slot: slot(generation, worker),
                by_cid: true,
            }),
            Place::Worker {
                generation, worker, ..
            } => {
                let worker = live_worker(generation, worker, workers_of(generation));
                Ok(Placement {
                    slot: slot(generation, worker),
                    by_cid: false,
                })
            }
            Place::Unowned => Err(Counter::UnknownGeneration),
        },
    )
}

/// [`place`] for XDP, counting how the worker was decided; `None` when nobody owns it.
#[inline(always)]
fn owning_slot(config: &SteeringConfig, header: &QuicHeader) -> Option<u32> {
    match place(config, header.dcid(), header.initial)? {
        Ok(placement) => {
            count(if placement.by_cid {
                Counter::SteeredByCid
            } else {
                Counter::SteeredByHash
            });
            Some(placement.slot)
        }
        Err(counter) => {
            count(counter);
            None
        }
    }
}

#[xdp]
pub fn spooky_xdp(ctx: XdpContext) -> u32 {
    count(Counter::Packets);
    match try_spooky_xdp(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count(reason);
            xdp_action::XDP_DROP
        }
    }
}

/// Passes a packet that is not QUIC to us.
#[inline(always)]
fn pass_non_quic() -> Result<u32, Counter> {
    count(Counter::PassedNonQuic);
    Ok(xdp_action::XDP_PASS)
}

/// The XDP decision. `Err` is the drop counter naming why the packet is invalid QUIC.
#[inline(always)]
fn try_spooky_xdp(ctx: &XdpContext) -> Result<u32, Counter> {
    let Some(config) = config() else {
        return pass_non_quic();
    };
    // SAFETY: the kernel hands the program `[data, data_end)` of the packet, readable while
    // it runs; `pkt` does not outlive this call.
    let pkt = unsafe { Packet::new(ctx.data(), ctx.data_end()) };
    let Some(udp) = locate_udp(&pkt) else {
        return pass_non_quic();
    };
    if config.has(FLAG_FLEET) && config.fleet_port != 0 && udp.dst_port == config.fleet_port {
        return Ok(fleet_receive(ctx, &config));
    }
    if udp.dst_port != config.quic_port {
        return pass_non_quic();
    }
    if udp.fragment {
        return Err(Counter::DropFragment);
    }
    // UDP to the QUIC port: from here on, malformed means dropped.
    let header: UdpHdr = pkt.read(udp.offset).ok_or(Counter::DropTruncated)?;
    let udp_len = usize::from(u16::from_be_bytes(header.len));
    // `<=`: an empty payload is cut short too, whatever bytes follow it in the frame
    // (Ethernet pads short frames to 60 bytes).
    if udp_len <= UDP_HDR_LEN || udp.offset + udp_len > pkt.len() {
        return Err(Counter::DropTruncated);
    }
    let payload = udp.offset + UDP_HDR_LEN;
    let quic = quic::parse(
        &pkt,
        payload,
        udp_len - UDP_HDR_LEN,
        usize::from(config.cid_len),
    )?;
    if quic.initial || quic.unknown_version {
        let (rate, burst) = (config.initial_rate, config.initial_burst);
        let wide = (
            rate.saturating_mul(WIDE_PREFIX_FACTOR),
            burst.max(1).saturating_mul(WIDE_PREFIX_FACTOR),
        );
        if !initial_allowed(&udp.source, rate, burst)
            || !initial_allowed(&udp.source.wider(), wide.0, wide.1)
        {
            return Err(Counter::DropInitialRateLimited);
        }
    }
    count(match quic.form {
        Form::Short => Counter::QuicShort,
        Form::Long => Counter::QuicLong,
    });
    if config.has(FLAG_FLEET) {
        let action = fleet_forward(ctx, &config, &quic);
        if action != NOT_FORWARDED {
            return Ok(action);
        }
    }
    let Some(slot) = owning_slot(&config, &quic) else {
        count(Counter::PassedQuic);
        return Ok(xdp_action::XDP_PASS);
    };
    count_worker(slot);
    if config.has(FLAG_REDIRECT_CPU) {
        if let Some(action) = redirect(slot) {
            count(Counter::Redirected);
            return Ok(action);
        }
        count(Counter::RedirectFailed);
    }
    count(Counter::PassedQuic);
    Ok(xdp_action::XDP_PASS)
}

/// A packet of another member's connection, sent on to it in GUE from here (`XDP_TX`):
/// [`NOT_FORWARDED`] when it is not one (ours, or no member has that server id) or cannot be
/// forwarded here (not plain Ethernet + IPv4 without options, no room, no source address),
/// and the packet goes on as usual (user space forwards what XDP does not). A function of its own
/// (a BPF-to-BPF call): inlined, it changed the code generated for the placement after it
/// into something the verifier refused.
#[inline(never)]
fn fleet_forward(ctx: &XdpContext, config: &SteeringConfig, quic: &QuicHeader) -> u32 {
    try_fleet_forward(ctx, config, quic).unwrap_or(NOT_FORWARDED)
}

/// What [`fleet_forward`] returns when the packet goes on as usual (BPF-to-BPF calls return
/// one scalar).
const NOT_FORWARDED: u32 = u32::MAX;

#[inline(always)]
fn try_fleet_forward(ctx: &XdpContext, config: &SteeringConfig, quic: &QuicHeader) -> Option<u32> {
    let layout = config.layout().ok()?;
    let key = fleet::other_server(quic.dcid(), &layout, &config.server_id)?;
    // SAFETY: a lookup in a map of plain values; the value is copied at once.
    let member = *unsafe { FLEET_MEMBERS.get(&key) }?;
    if config.fleet_source == [0; 4] {
        return None;
    }
    // SAFETY: as in `try_spooky_xdp`: the program's own packet, while it runs.
    let pkt = unsafe { Packet::new(ctx.data(), ctx.data_end()) };
    let eth: EthHdr = pkt.read(0)?;
    let ip: Ipv4Hdr = pkt.read(fleet::IPV4_OFFSET)?;
    // Plain Ethernet and IPv4 without options only (the UDP header right after).
    if eth.ether_type != [0x08, 0x00] || ip.version_ihl != 0x45 {
        return None;
    }
    let udp: UdpHdr = pkt.read(fleet::IPV4_OFFSET + core::mem::size_of::<Ipv4Hdr>())?;
    let inner_len = usize::from(u16::from_be_bytes(ip.total_len));
    if fleet::IPV4_OFFSET + inner_len > pkt.len() {
        return None;
    }
    // The client's port as the outer source port: the fleet network's routers keep one
    // client's packets on one path.
    let entropy = u16::from_be_bytes(udp.src_port);
    let header = fleet::encap_header(&eth, inner_len, config.fleet_source, &member, entropy)?;
    let grow = -(fleet::GUE_OVERHEAD as i32);
    // SAFETY: the helper moves the start of this program's own packet.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, grow) } != 0 {
        return None;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + fleet::ENCAP_HEADER_LEN > end {
        return Some(xdp_action::XDP_DROP);
    }
    // SAFETY: the check above keeps the 46 bytes at `start` inside the packet, which the
    // program may write while it runs.
    unsafe {
        core::ptr::write_unaligned(start as *mut [u8; fleet::ENCAP_HEADER_LEN], header);
    }
    count(Counter::FleetForwarded);
    Some(xdp_action::XDP_TX)
}

/// A packet to the fleet port: a member's GUE packet naming our server id is unwrapped and
/// passed up as the client's; one from elsewhere, malformed, or naming another server is
/// dropped (a forwarded packet is never forwarded again); what XDP does not handle (IPv6,
/// GUE extensions, VLAN tags) passes to user space.
#[inline(never)]
fn fleet_receive(ctx: &XdpContext, config: &SteeringConfig) -> u32 {
    match try_fleet_receive(ctx, config) {
        Ok(action) => action,
        Err(reason) => {
            count(reason);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_fleet_receive(ctx: &XdpContext, config: &SteeringConfig) -> Result<u32, Counter> {
    // SAFETY: as in `try_spooky_xdp`: the program's own packet, while it runs.
    let pkt = unsafe { Packet::new(ctx.data(), ctx.data_end()) };
    let pkt = &pkt;
    let (sender, payload, len) = match fleet::decap(pkt, config.quic_port) {
        Decap::Pass => return pass_non_quic(),
        Decap::Malformed => return Err(Counter::FleetMalformed),
        Decap::Client {
            sender,
            payload,
            len,
        } => (sender, payload, len),
    };
    // SAFETY: a lookup in a map of plain values.
    if unsafe { FLEET_SOURCES.get(&sender) }.is_none() {
        return Err(Counter::FleetRefused);
    }
    let quic = quic::parse(pkt, payload, len, usize::from(config.cid_len))
        .map_err(|_| Counter::FleetMalformed)?;
    let layout = config.layout().map_err(|_| Counter::FleetMalformed)?;
    let ours = fleet::server_of(quic.dcid(), &layout).is_some_and(|k| k.id == config.server_id);
    if !ours {
        return Err(Counter::FleetMalformed);
    }
    let eth: EthHdr = pkt.read(0).ok_or(Counter::FleetMalformed)?;
    let at = fleet::GUE_OVERHEAD;
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + at + core::mem::size_of::<EthHdr>() > end {
        return Err(Counter::FleetMalformed);
    }
    // The Ethernet header goes right before the client's packet, then the start moves there.
    // SAFETY: the check above keeps the 14 bytes at `start + at` inside the packet.
    unsafe {
        core::ptr::write_unaligned((start + at) as *mut EthHdr, eth);
    }
    // SAFETY: the helper moves the start of this program's own packet.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, at as i32) } != 0 {
        return Err(Counter::FleetMalformed);
    }
    count(Counter::FleetReceived);
    Ok(xdp_action::XDP_PASS)
}

/// The Initial-flood defense: whether a client Initial from `source` is within the prefix's
/// `rate` per second, in bursts of `burst` (rate 0 = no limit). The decision is `InitialBucket::admit` (GCRA: one timestamp per prefix).
///
/// Concurrency: the bucket is shared by all CPUs and updated with a plain load and store of
/// its one `u64`, not atomically. Two CPUs deciding for the same prefix at the same instant
/// may both read the same state and write the same next state, admitting one packet more
/// than the limit for that race; a lost update never admits less, is never torn (an aligned
/// 8-byte store), and the next decision starts from a valid state. Accepted imprecision:
/// exact on one CPU, at worst `CPUs ×` the rate when every CPU races on the same prefix.
#[inline(never)]
fn initial_allowed(source: &SourcePrefix, rate: u32, burst: u32) -> bool {
    if rate == 0 {
        return true;
    }
    // SAFETY: a helper without arguments or preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match INITIAL_LIMITS.get_ptr_mut(source) {
        Some(slot) => {
            // SAFETY: a value slot of the LRU hash, valid while this program runs (RCU);
            // `InitialBucket` is one aligned u64, so the read and the write are single
            // loads and stores (see the concurrency note above).
            let bucket = unsafe { slot.read() };
            match bucket.admit(now, rate, burst) {
                Some(next) => {
                    // SAFETY: as above.
                    unsafe { slot.write(next) };
                    true
                }
                None => false,
            }
        }
        None => {
            // A prefix not seen (or evicted): a full bucket, of which this packet takes one.
            // When the insert fails (a racing insert from another CPU), let it through.
            if let Some(next) = InitialBucket::default().admit(now, rate, burst) {
                let _ = INITIAL_LIMITS.insert(source, next, u64::from(BPF_ANY));
            }
            true
        }
    }
}

/// Redirects to the CPU of the worker at `index` ([`slot`]) when it is alive and its CPU is in
/// the CPU map.
#[inline(always)]
fn redirect(index: u32) -> Option<u32> {
    let entry = WORKERS.get(index)?;
    if !entry.is_alive() {
        return None;
    }
    CPUS.redirect(entry.cpu, 0).ok()
}

#[sk_reuseport]
pub fn spooky_reuseport(ctx: SkReuseportContext) -> u32 {
    // Without a choice of ours the kernel picks by its own hash: never a reason to drop.
    let _selected = try_spooky_reuseport(&ctx);
    sk_action::SK_PASS
}

/// Selects the owning worker's socket. `None` when the packet is not QUIC we can place, or
/// the worker has no socket in `sockets` (then the kernel's hash decides).
#[inline(always)]
fn try_spooky_reuseport(ctx: &SkReuseportContext) -> Option<()> {
    const IPPROTO_UDP: u32 = 17;
    if ctx.ip_protocol() != IPPROTO_UDP {
        return None;
    }
    let config = config()?;
    // A copy of the QUIC header, read with `bpf_skb_load_bytes`: the socket buffer's linear
    // area may end at the UDP header (drivers that split headers from payload, GRO, a
    // sender's UDP GSO), so direct reads would miss the DCID. A payload shorter than the
    // copy cannot be a QUIC packet (header protection samples 20 bytes after a packet number
    // that follows the DCID, RFC 9001 §5.4.2): the kernel's hash decides, the worker drops it.
    let payload_len = ctx.len().checked_sub(UDP_HDR_LEN)?;
    if payload_len < quic::HEADER_BYTES {
        return None;
    }
    let mut head = [0u8; quic::HEADER_BYTES];
    // SAFETY: the helper writes at most `head.len()` bytes into `head`; for UDP the socket
    // buffer's data starts at the UDP header.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.md as *const c_void,
            UDP_HDR_LEN as u32,
            head.as_mut_ptr().cast(),
            quic::HEADER_BYTES as u32,
        )
    };
    if loaded != 0 {
        return None;
    }
    let quic = quic::parse(&head[..], 0, payload_len, usize::from(config.cid_len)).ok()?;
    let placement = place(&config, quic.dcid(), quic.initial)?.ok()?;
    SOCKETS.select_reuseport(ctx, placement.slot).ok()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The project's license (SPDX id). Not GPL-compatible, so GPL-only helpers (e.g.
/// `bpf_trace_printk`, perf event output) are unavailable; none is used.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 12] = *b"Elastic-2.0\0";
