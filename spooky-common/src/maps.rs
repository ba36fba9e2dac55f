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
/// `PerCpuArray<u64, MAX_WORKERS>`: per-CPU count of QUIC packets steered to each worker.
pub const WORKER_STATS_MAP: &str = "worker_stats";
/// `Array<WorkerEntry, MAX_WORKERS>`: worker index → CPU, liveness, generation.
pub const WORKERS_MAP: &str = "workers";
/// `CpuMap<MAX_CPUS>`: the CPUs XDP may redirect to (entry per CPU, queue size > 0 to enable).
pub const CPUS_MAP: &str = "cpus";
/// `ReusePortSockArray<MAX_WORKERS>`: worker index → that worker's UDP socket.
pub const SOCKETS_MAP: &str = "sockets";

/// Most workers the steering can address: the CID carries the worker index in one byte.
pub const MAX_WORKERS: u32 = 256;
/// Entries of the CPU map (CPU ids the XDP program may redirect to).
pub const MAX_CPUS: u32 = 256;

/// [`SteeringConfig::flags`]: XDP redirects each QUIC packet to its worker's CPU through
/// the CPU map when that worker is alive (else the packet passes up the stack).
pub const FLAG_REDIRECT_CPU: u32 = 1 << 0;

/// The steering configuration, the only entry (index 0) of [`CONFIG_MAP`].
///
/// All zero (the state before user space writes it) means "no QUIC port": every packet
/// passes and is counted as non-QUIC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteeringConfig {
    /// UDP destination port of the QUIC listener, host byte order; 0 disables parsing.
    pub quic_port: u16,
    /// Length of server-chosen connection IDs (the short-header DCID length).
    pub cid_len: u8,
    /// Server id length inside the connection ID.
    pub server_id_len: u8,
    /// Generation of this process's connection IDs.
    pub generation: u8,
    /// Always zero (explicit padding).
    pub reserved: [u8; 3],
    /// Number of live workers (`steer` places hashed DCIDs among them); 0 disables steering.
    pub workers: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<SteeringConfig>() == 16);

impl SteeringConfig {
    /// The connection-ID layout this configuration names.
    ///
    /// # Errors
    /// [`LayoutError`] when the lengths or generation do not form a valid layout.
    #[inline(always)]
    pub const fn layout(&self) -> Result<CidLayout, LayoutError> {
        CidLayout::new(self.cid_len, self.server_id_len, self.generation)
    }

    /// Whether `flag` (one of the `FLAG_*` constants) is set.
    #[inline(always)]
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// One worker, an entry of [`WORKERS_MAP`] (index = worker index).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerEntry {
    /// The CPU the worker thread is pinned to (the CPU map key XDP redirects to).
    pub cpu: u32,
    /// 1 when the worker is running and owns its socket, 0 otherwise.
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
}

/// Number of counters in [`STATS_MAP`].
pub const COUNTER_COUNT: u32 = 13;

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
    fn counter_names_are_unique() {
        for (i, a) in Counter::ALL.iter().enumerate() {
            assert_eq!(a.index() as usize, i);
            for b in &Counter::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
