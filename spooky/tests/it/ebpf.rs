//! The kernel programs, exercised in the kernel: the embedded object loads (the verifier
//! accepts both programs), and table tests in the katran style run crafted Ethernet / IPv4 /
//! IPv6 / UDP / QUIC packets through `spooky_xdp` with `BPF_PROG_TEST_RUN` and check the
//! verdict, the unchanged packet and every per-CPU counter's delta.
//!
//! These tests need root (CAP_BPF, CAP_NET_ADMIN) and the object from `cargo xtask
//! build-ebpf`; without either they fail with the reason.

// Test helpers outside `#[test]` functions fail loudly too (clippy.toml only exempts the
// test functions themselves).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use spooky::steering::ebpf::{EbpfPrograms, Stats, XdpAction, OBJECT};
use spooky_common::cid::{fnv1a32, CidLayout};
use spooky_common::maps::{
    slot, Counter, GenerationEntry, SteeringConfig, WorkerEntry, CONFIG_MAP, CPUS_MAP,
    FLAG_REDIRECT_CPU, GENERATIONS_MAP, INITIAL_LIMITS_MAP, SLOTS, SOCKETS_MAP, STATS_MAP,
    WORKERS_MAP, WORKER_STATS_MAP,
};

const QUIC_PORT: u16 = 4433;
const CID_LEN: u8 = 16;
const SERVER_ID_LEN: u8 = 2;
const GENERATION: u8 = 1;
const WORKERS: u32 = 4;

const QUIC_V1: u32 = 1;
const QUIC_V2: u32 = 0x6b33_43cf;

fn layout() -> CidLayout {
    CidLayout::new(CID_LEN, SERVER_ID_LEN, GENERATION).expect("test layout is valid")
}

fn config(flags: u32) -> SteeringConfig {
    SteeringConfig {
        quic_port: QUIC_PORT,
        cid_len: CID_LEN,
        server_id_len: SERVER_ID_LEN,
        generation: GENERATION,
        mode: 0,
        reserved: [0; 2],
        workers: WORKERS,
        flags,
        pid: 0,
        ifindex: 0,
        iface: [0; 16],
        initial_rate: 0,
        initial_burst: 0,
        abi: spooky_common::maps::MAPS_ABI,
        hash_key: 0,
        fleet_port: 0,
        reserved2: [0; 2],
        fleet_source: [0; 4],
        server_id: [0; 8],
    }
}

/// Loads the embedded object, or fails the test saying why.
fn load() -> EbpfPrograms {
    assert!(
        !OBJECT.is_empty(),
        "spooky was built without the eBPF object: run `cargo xtask build-ebpf` before the tests"
    );
    EbpfPrograms::load().unwrap_or_else(|e| {
        panic!(
            "loading the eBPF programs failed; these tests need root (CAP_BPF + CAP_NET_ADMIN) \
             on a kernel with BTF: {e} ({e:?})"
        )
    })
}

/// Worker `worker`'s entry in the per-worker maps (of the test's generation).
fn at(worker: u32) -> u32 {
    slot(GENERATION, worker)
}

/// Registers generation `generation` with `workers` live workers on CPU 0.
fn register(programs: &mut EbpfPrograms, generation: u8, workers: u32, accepting: bool) {
    programs
        .set_generation(
            generation,
            &GenerationEntry {
                workers,
                accepting: u32::from(accepting),
                pid: 1,
                started: 0,
            },
        )
        .expect("write generation");
    for worker in 0..workers {
        programs
            .set_worker(
                slot(generation, worker),
                &WorkerEntry {
                    cpu: 0,
                    alive: 1,
                    generation: generation.into(),
                },
            )
            .expect("write worker");
    }
}

/// Loads the programs and writes the test configuration (4 live workers on CPU 0).
fn load_configured(flags: u32) -> EbpfPrograms {
    let mut programs = load();
    programs.set_config(&config(flags)).expect("write config");
    register(&mut programs, GENERATION, WORKERS, true);
    programs
}

// ---------------------------------------------------------------------------------------------
// Packet builders (Ethernet / VLAN / IPv4 / IPv6 / UDP / QUIC), all big-endian on the wire.

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;
const ETH_ARP: u16 = 0x0806;
const ETH_8021Q: u16 = 0x8100;
const ETH_8021AD: u16 = 0x88a8;
const PROTO_UDP: u8 = 17;
const PROTO_TCP: u8 = 6;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;

fn eth(ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Ethernet with VLAN tags (outer first) before `ether_type`.
fn eth_vlan(tags: &[u16], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut inner = Vec::new();
    for (i, tpid) in tags.iter().enumerate() {
        if i > 0 {
            inner.extend_from_slice(&tpid.to_be_bytes());
        }
        inner.extend_from_slice(&(100u16 + i as u16).to_be_bytes()); // TCI: VLAN id
    }
    inner.extend_from_slice(&ether_type.to_be_bytes());
    inner.extend_from_slice(payload);
    eth(tags[0], &inner)
}

/// IPv4 with `options` bytes of NOP options (a multiple of 4) and the fragment field `frag`.
fn ipv4_full(protocol: u8, options: usize, frag: u16, payload: &[u8]) -> Vec<u8> {
    assert_eq!(options % 4, 0);
    let ihl = 20 + options;
    let total = (ihl + payload.len()) as u16;
    let mut p = vec![0x40 | (ihl / 4) as u8, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1]); // id
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, protocol, 0, 0]); // ttl, protocol, checksum (not checked)
    p.extend_from_slice(&[192, 0, 2, 1, 192, 0, 2, 2]);
    p.extend(std::iter::repeat_n(1u8, options)); // NOP options
    p.extend_from_slice(payload);
    p
}

fn ipv4(protocol: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_full(protocol, 0, 0, payload)
}

fn ipv6(next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next_header, 64]);
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    let mut dst = src;
    src[15] = 1;
    dst[15] = 2;
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

/// UDP with a length field of `len` (normally 8 + payload).
fn udp_len(dst_port: u16, len: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&50_000u16.to_be_bytes());
    p.extend_from_slice(&dst_port.to_be_bytes());
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[0, 0]); // checksum 0: none (IPv4); not checked by XDP (IPv6)
    p.extend_from_slice(payload);
    p
}

fn udp(dst_port: u16, payload: &[u8]) -> Vec<u8> {
    udp_len(dst_port, (8 + payload.len()) as u16, payload)
}

fn udp4(payload: &[u8]) -> Vec<u8> {
    eth(ETH_IPV4, &ipv4(PROTO_UDP, &udp(QUIC_PORT, payload)))
}

fn udp6(payload: &[u8]) -> Vec<u8> {
    eth(ETH_IPV6, &ipv6(PROTO_UDP, &udp(QUIC_PORT, payload)))
}

/// One of our connection IDs naming `worker`.
fn our_cid(worker: u8) -> Vec<u8> {
    let mut cid = vec![0u8; CID_LEN as usize];
    let written = layout().write(&[0xab, 0xcd], worker, &[0x5a; 20], &mut cid);
    assert_eq!(written, CID_LEN as usize);
    cid
}

/// One of our connection IDs for `worker` as a worker mints the ones Initials carry: the
/// keyed hash (key 0, as `config` sets it) of it names `worker`.
fn placed_cid(worker: u8) -> Vec<u8> {
    let mut cid = vec![0u8; CID_LEN as usize];
    let mut seed = u32::from(worker) + 1;
    let fill = |nonce: &mut [u8]| {
        for b in nonce.iter_mut() {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            *b = (seed >> 16) as u8;
        }
    };
    let n = layout().write_placed(&[0xab, 0xcd], worker, 0, WORKERS, fill, &mut cid);
    assert_eq!(n, CID_LEN as usize);
    cid
}

/// A short-header packet (fixed bit set unless `first` says otherwise) with `dcid`.
fn short_header(first: u8, dcid: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    p.extend_from_slice(dcid);
    p.extend_from_slice(&[0x77; 24]); // packet number + protected payload
    p
}

/// A long-header packet of `version` with type bits `type_bits` (already shifted), padded
/// with zeros to `total` bytes of UDP payload.
fn long_header(version: u32, type_bits: u8, dcid: &[u8], total: usize) -> Vec<u8> {
    let mut p = vec![0xc0 | type_bits | 0x03];
    p.extend_from_slice(&version.to_be_bytes());
    p.push(dcid.len() as u8);
    p.extend_from_slice(dcid);
    p.push(8); // SCID length
    p.extend_from_slice(&[0x11; 8]);
    if p.len() < total {
        p.resize(total, 0);
    }
    p
}

fn initial_v1(dcid: &[u8], total: usize) -> Vec<u8> {
    long_header(QUIC_V1, 0x00, dcid, total)
}

const CLIENT_DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];

// ---------------------------------------------------------------------------------------------
// The table runner.

/// One row: a packet in, the verdict and counter deltas out.
struct Case {
    name: &'static str,
    packet: Vec<u8>,
    action: XdpAction,
    /// Counters expected to go up by exactly one besides `Packets` (all others stay put).
    counters: &'static [Counter],
    /// The worker the packet must be counted for, if it is steered.
    worker: Option<u32>,
}

fn snapshot(programs: &EbpfPrograms) -> (Stats, Vec<u64>) {
    let stats = programs.stats().expect("read stats");
    let workers = (0..WORKERS)
        .map(|w| programs.worker_packets(at(w)).expect("read worker_stats"))
        .collect();
    (stats, workers)
}

/// Runs every case through `programs` and checks verdict, output packet and counters.
fn run_table(programs: &EbpfPrograms, cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        let (before, workers_before) = snapshot(programs);
        let run = programs
            .run_xdp(&case.packet)
            .unwrap_or_else(|e| panic!("{}: BPF_PROG_TEST_RUN failed: {e} ({e:?})", case.name));
        let (after, workers_after) = snapshot(programs);
        if run.action != case.action {
            failures.push(format!(
                "{}: action {:?}, want {:?}",
                case.name, run.action, case.action
            ));
        }
        if run.packet != case.packet {
            failures.push(format!("{}: the program changed the packet", case.name));
        }
        for counter in Counter::ALL {
            let want = u64::from(counter == Counter::Packets || case.counters.contains(&counter));
            let got = after.total(counter) - before.total(counter);
            if got != want {
                failures.push(format!(
                    "{}: {} went up by {got}, want {want}",
                    case.name,
                    counter.name()
                ));
            }
        }
        for worker in 0..WORKERS {
            let want = u64::from(case.worker == Some(worker));
            let got = workers_after[worker as usize] - workers_before[worker as usize];
            if got != want {
                failures.push(format!(
                    "{}: worker {worker} counted {got}, want {want}",
                    case.name
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

use Counter::*;

const SHORT: &[Counter] = &[QuicShort, SteeredByCid, PassedQuic];
const SHORT_HASHED: &[Counter] = &[QuicShort, SteeredByHash, PassedQuic];
const LONG_HASHED: &[Counter] = &[QuicLong, SteeredByHash, PassedQuic];
const LONG_BY_CID: &[Counter] = &[QuicLong, SteeredByCid, PassedQuic];
const NON_QUIC: &[Counter] = &[PassedNonQuic];
const UNOWNED: &[Counter] = &[QuicShort, UnknownGeneration, PassedQuic];

/// Where a new connection with client-chosen `dcid` goes: `fnv1a32(dcid) % workers` of the
/// newest generation (`spooky_common::cid::place`).
fn hashed(dcid: &[u8]) -> u32 {
    fnv1a32(dcid) % WORKERS
}

fn hashed_worker(dcid: &[u8]) -> Option<u32> {
    Some(hashed(dcid))
}

/// Where a client-chosen `dcid` lands when the workers in `dead` take no new connections:
/// its hashed worker, else the next live one.
fn live_hashed_worker(dcid: &[u8], dead: &[u32]) -> u32 {
    let hashed = hashed(dcid);
    (0..WORKERS)
        .map(|step| (hashed + step) % WORKERS)
        .find(|w| !dead.contains(w))
        .unwrap_or(hashed)
}

/// A client-chosen 8-byte DCID that hashes onto `worker`.
fn dcid_hashing_to(worker: u32) -> Vec<u8> {
    (0u8..=255)
        .map(|n| vec![n, 0x42, 0x17, 0x99, 0x55, 0x01, 0x02, 0x03])
        .find(|d| hashed(d) == worker)
        .expect("some DCID hashes onto the worker")
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
#[ignore = "needs root"]
fn object_is_embedded_and_loads_into_the_kernel() {
    assert!(
        OBJECT.len() > 1024,
        "embedded eBPF object is only {} bytes",
        OBJECT.len()
    );
    assert_eq!(
        &OBJECT[..4],
        b"\x7fELF",
        "embedded eBPF object is not an ELF file"
    );
    let mut programs = load();
    for name in [
        CONFIG_MAP,
        STATS_MAP,
        WORKER_STATS_MAP,
        WORKERS_MAP,
        GENERATIONS_MAP,
        CPUS_MAP,
        SOCKETS_MAP,
        INITIAL_LIMITS_MAP,
    ] {
        assert!(
            programs.ebpf_mut().map(name).is_some(),
            "map `{name}` missing from the object"
        );
    }
    programs.xdp().expect("XDP program");
    programs.reuseport_mut().expect("sk_reuseport program");
    // Fresh counters are all zero on every possible CPU.
    let stats = programs.stats().expect("read stats");
    assert!(stats.cpus() >= 1);
    assert!(
        stats.totals().iter().all(|(_, v)| *v == 0),
        "{:?}",
        stats.totals()
    );
}

#[test]
#[ignore = "needs root"]
fn xdp_table_ipv4_ipv6_vlan_and_quic_forms() {
    let programs = load_configured(0);
    let ours = our_cid(3);
    let foreign = [0x00u8; CID_LEN as usize];
    let out_of_range = our_cid(9); // worker 9 with 4 workers: nobody's
    let unowned_generation = {
        let mut cid = vec![0u8; CID_LEN as usize];
        let other = CidLayout::new(CID_LEN, SERVER_ID_LEN, 5).unwrap();
        other.write(&[0xab, 0xcd], 1, &[0x5a; 20], &mut cid);
        cid
    };
    let minted = placed_cid(3);
    let mut retried = initial_v1(&minted, 1200);
    retried[6 + minted.len() + 1 + 8] = 4; // token length 4 after the 8-byte SCID
                                           // One naming worker 3 whose hash says another: an Initial's worker byte is not trusted.
    let lookalike = (0u8..=255)
        .map(|n| {
            let mut cid = our_cid(3);
            cid[CID_LEN as usize - 1] = n;
            cid
        })
        .find(|cid| hashed(cid) != 3)
        .unwrap();
    let cases = vec![
        Case {
            name: "ipv4 short header, our CID",
            packet: udp4(&short_header(0x41, &ours)),
            action: XdpAction::Pass,
            counters: SHORT,
            worker: Some(3),
        },
        Case {
            name: "ipv6 short header, our CID",
            packet: udp6(&short_header(0x41, &ours)),
            action: XdpAction::Pass,
            counters: SHORT,
            worker: Some(3),
        },
        Case {
            name: "802.1Q + ipv4 short header",
            packet: eth_vlan(
                &[ETH_8021Q],
                ETH_IPV4,
                &ipv4(PROTO_UDP, &udp(QUIC_PORT, &short_header(0x41, &our_cid(1)))),
            ),
            action: XdpAction::Pass,
            counters: SHORT,
            worker: Some(1),
        },
        Case {
            name: "802.1ad + 802.1Q + ipv6 short header",
            packet: eth_vlan(
                &[ETH_8021AD, ETH_8021Q],
                ETH_IPV6,
                &ipv6(PROTO_UDP, &udp(QUIC_PORT, &short_header(0x41, &our_cid(2)))),
            ),
            action: XdpAction::Pass,
            counters: SHORT,
            worker: Some(2),
        },
        Case {
            name: "ipv4 with 4 bytes of options (IHL 6)",
            packet: eth(
                ETH_IPV4,
                &ipv4_full(
                    PROTO_UDP,
                    4,
                    0,
                    &udp(QUIC_PORT, &short_header(0x41, &our_cid(0))),
                ),
            ),
            action: XdpAction::Pass,
            counters: SHORT,
            worker: Some(0),
        },
        Case {
            name: "ipv4 with 40 bytes of options (IHL 15)",
            packet: eth(
                ETH_IPV4,
                &ipv4_full(
                    PROTO_UDP,
                    40,
                    0,
                    &udp(QUIC_PORT, &short_header(0x41, &our_cid(2))),
                ),
            ),
            action: XdpAction::Pass,
            counters: SHORT,
            worker: Some(2),
        },
        Case {
            name: "short header, foreign CID: hashed",
            packet: udp4(&short_header(0x41, &foreign)),
            action: XdpAction::Pass,
            counters: SHORT_HASHED,
            worker: hashed_worker(&foreign),
        },
        Case {
            name: "short header, our CID naming worker 9 of 4: nobody's (passed unsteered)",
            packet: udp4(&short_header(0x41, &out_of_range)),
            action: XdpAction::Pass,
            counters: UNOWNED,
            worker: None,
        },
        Case {
            name: "short header, our CID of a generation no process owns: passed unsteered",
            packet: udp4(&short_header(0x41, &unowned_generation)),
            action: XdpAction::Pass,
            counters: UNOWNED,
            worker: None,
        },
        Case {
            name: "Initial with a token (answering our Retry, to the CID we minted): hashed, there",
            packet: udp4(&retried),
            action: XdpAction::Pass,
            counters: LONG_HASHED,
            worker: Some(3),
        },
        Case {
            name: "Initial whose client-chosen DCID looks like ours but names no worker: hashed",
            packet: udp4(&initial_v1(&out_of_range, 1200)),
            action: XdpAction::Pass,
            counters: LONG_HASHED,
            worker: hashed_worker(&out_of_range),
        },
        Case {
            name: "Initial without a token to a CID we minted (a client's later Initial): there",
            packet: udp4(&initial_v1(&minted, 1200)),
            action: XdpAction::Pass,
            counters: LONG_HASHED,
            worker: Some(3),
        },
        Case {
            name: "Initial whose DCID looks like ours, naming worker 3: hashed, not aimed",
            packet: udp4(&initial_v1(&lookalike, 1200)),
            action: XdpAction::Pass,
            counters: LONG_HASHED,
            worker: hashed_worker(&lookalike),
        },
        Case {
            name: "ipv4 client Initial v1, 1200 bytes",
            packet: udp4(&initial_v1(&CLIENT_DCID, 1200)),
            action: XdpAction::Pass,
            counters: LONG_HASHED,
            worker: hashed_worker(&CLIENT_DCID),
        },
        Case {
            name: "ipv6 client Initial v1, 1350 bytes, 20-byte DCID",
            packet: udp6(&initial_v1(&[0xee; 20], 1350)),
            action: XdpAction::Pass,
            counters: LONG_HASHED,
            worker: hashed_worker(&[0xee; 20]),
        },
        Case {
            name: "Initial v2, 1200 bytes",
            packet: udp4(&long_header(QUIC_V2, 0x10, &CLIENT_DCID, 1200)),
            action: XdpAction::Pass,
            counters: LONG_HASHED,
            worker: hashed_worker(&CLIENT_DCID),
        },
        Case {
            name: "Initial with empty DCID, 1200 bytes",
            packet: udp4(&initial_v1(&[], 1200)),
            action: XdpAction::Pass,
            counters: LONG_HASHED,
            worker: hashed_worker(&[]),
        },
        Case {
            name: "Handshake v1 (small is fine), our CID",
            packet: udp4(&long_header(QUIC_V1, 0x20, &ours, 60)),
            action: XdpAction::Pass,
            counters: LONG_BY_CID,
            worker: Some(3),
        },
        Case {
            name: "0-RTT v1 (small is fine), client DCID",
            packet: udp6(&long_header(QUIC_V1, 0x10, &CLIENT_DCID, 80)),
            action: XdpAction::Pass,
            counters: LONG_HASHED,
            worker: hashed_worker(&CLIENT_DCID),
        },
        Case {
            name: "v2 type bits 00 is Retry, not Initial: small is fine",
            packet: udp4(&long_header(QUIC_V2, 0x00, &CLIENT_DCID, 60)),
            action: XdpAction::Pass,
            counters: LONG_HASHED,
            worker: hashed_worker(&CLIENT_DCID),
        },
        // Drops.
        Case {
            name: "short header with the fixed bit clear",
            packet: udp4(&short_header(0x01, &ours)),
            action: XdpAction::Drop,
            counters: &[DropFixedBit],
            worker: None,
        },
        Case {
            name: "long header with the fixed bit clear",
            packet: udp6(&{
                let mut p = initial_v1(&CLIENT_DCID, 1200);
                p[0] &= !0x40;
                p
            }),
            action: XdpAction::Drop,
            counters: &[DropFixedBit],
            worker: None,
        },
        Case {
            name: "long header with a 21-byte DCID",
            packet: udp4(&initial_v1(&[0x42; 21], 1200)),
            action: XdpAction::Drop,
            counters: &[DropDcidTooLong],
            worker: None,
        },
        Case {
            name: "long header with a 255-byte DCID length, unknown version",
            packet: udp4(
                &long_header(0x1a2a_3a4a, 0, &[], 40)
                    .into_iter()
                    .enumerate()
                    .map(|(i, b)| if i == 5 { 255 } else { b })
                    .collect::<Vec<_>>(),
            ),
            action: XdpAction::Drop,
            counters: &[DropDcidTooLong],
            worker: None,
        },
        Case {
            name: "ipv4 client Initial v1 in 1199 bytes",
            packet: udp4(&initial_v1(&CLIENT_DCID, 1199)),
            action: XdpAction::Drop,
            counters: &[DropShortInitial],
            worker: None,
        },
        Case {
            name: "ipv6 client Initial v2 in 300 bytes",
            packet: udp6(&long_header(QUIC_V2, 0x10, &CLIENT_DCID, 300)),
            action: XdpAction::Drop,
            counters: &[DropShortInitial],
            worker: None,
        },
        Case {
            name: "empty UDP payload",
            packet: udp4(&[]),
            action: XdpAction::Drop,
            counters: &[DropTruncated],
            worker: None,
        },
        Case {
            name: "empty UDP payload in a frame padded to the Ethernet minimum",
            packet: {
                let mut p = udp4(&[]);
                p.resize(60, 0);
                p
            },
            action: XdpAction::Drop,
            counters: &[DropTruncated],
            worker: None,
        },
        Case {
            name: "short header with 5 of 16 DCID bytes",
            packet: udp4(&short_header(0x41, &ours)[..6]),
            action: XdpAction::Drop,
            counters: &[DropTruncated],
            worker: None,
        },
        Case {
            name: "long header cut inside the version",
            packet: udp6(&[0xc3, 0, 0]),
            action: XdpAction::Drop,
            counters: &[DropTruncated],
            worker: None,
        },
        Case {
            name: "long header cut inside the DCID",
            packet: udp4(&initial_v1(&CLIENT_DCID, 0)[..10]),
            action: XdpAction::Drop,
            counters: &[DropTruncated],
            worker: None,
        },
        Case {
            name: "UDP length beyond the frame",
            packet: eth(
                ETH_IPV4,
                &ipv4(
                    PROTO_UDP,
                    &udp_len(QUIC_PORT, 400, &short_header(0x41, &ours)),
                ),
            ),
            action: XdpAction::Drop,
            counters: &[DropTruncated],
            worker: None,
        },
        Case {
            name: "UDP length below the UDP header",
            packet: eth(
                ETH_IPV6,
                &ipv6(
                    PROTO_UDP,
                    &udp_len(QUIC_PORT, 7, &short_header(0x41, &ours)),
                ),
            ),
            action: XdpAction::Drop,
            counters: &[DropTruncated],
            worker: None,
        },
        // Everything else passes.
        Case {
            name: "UDP to another port",
            packet: eth(
                ETH_IPV4,
                &ipv4(PROTO_UDP, &udp(53, &short_header(0x01, &ours))),
            ),
            action: XdpAction::Pass,
            counters: NON_QUIC,
            worker: None,
        },
        Case {
            name: "TCP to the QUIC port number",
            packet: eth(
                ETH_IPV4,
                &ipv4(PROTO_TCP, &udp(QUIC_PORT, &short_header(0x01, &ours))),
            ),
            action: XdpAction::Pass,
            counters: NON_QUIC,
            worker: None,
        },
        Case {
            name: "ARP",
            packet: eth(ETH_ARP, &[0; 28]),
            action: XdpAction::Pass,
            counters: NON_QUIC,
            worker: None,
        },
        Case {
            name: "bare Ethernet header claiming IPv4",
            packet: eth(ETH_IPV4, &[]),
            action: XdpAction::Pass,
            counters: NON_QUIC,
            worker: None,
        },
        Case {
            name: "ipv4 header cut short",
            packet: eth(ETH_IPV4, &ipv4(PROTO_UDP, &[])[..12]),
            action: XdpAction::Pass,
            counters: NON_QUIC,
            worker: None,
        },
        Case {
            name: "UDP header cut short",
            packet: eth(ETH_IPV4, &ipv4(PROTO_UDP, &udp(QUIC_PORT, &[])[..4])),
            action: XdpAction::Pass,
            counters: NON_QUIC,
            worker: None,
        },
        Case {
            name: "ipv4 first fragment (MF) to the QUIC port: QUIC forbids fragments",
            packet: eth(
                ETH_IPV4,
                &ipv4_full(
                    PROTO_UDP,
                    0,
                    0x2000,
                    &udp(QUIC_PORT, &short_header(0x41, &ours)),
                ),
            ),
            action: XdpAction::Drop,
            counters: &[DropFragment],
            worker: None,
        },
        Case {
            name: "ipv4 first fragment to another port: not ours",
            packet: eth(
                ETH_IPV4,
                &ipv4_full(PROTO_UDP, 0, 0x2000, &udp(53, &[0; 40])),
            ),
            action: XdpAction::Pass,
            counters: NON_QUIC,
            worker: None,
        },
        Case {
            name: "ipv6 first fragment (fragment header) to the QUIC port",
            packet: eth(ETH_IPV6, &{
                let mut ext = vec![PROTO_UDP, 0, 0, 1, 0, 0, 0, 7];
                ext.extend_from_slice(&udp(QUIC_PORT, &short_header(0x41, &ours)));
                ipv6(IPV6_FRAGMENT, &ext)
            }),
            action: XdpAction::Drop,
            counters: &[DropFragment],
            worker: None,
        },
        Case {
            name: "ipv6 hop-by-hop and destination options, then UDP: walked and steered",
            packet: eth(ETH_IPV6, &{
                let mut ext = vec![IPV6_DEST_OPTS, 0, 1, 4, 0, 0, 0, 0];
                ext.extend_from_slice(&[PROTO_UDP, 0, 1, 4, 0, 0, 0, 0]);
                ext.extend_from_slice(&udp(QUIC_PORT, &short_header(0x41, &ours)));
                ipv6(IPV6_HOP_BY_HOP, &ext)
            }),
            action: XdpAction::Pass,
            counters: SHORT,
            worker: Some(3),
        },
        Case {
            name: "unknown version in 100 bytes: no Version Negotiation to amplify",
            packet: udp4(&long_header(0x1a2a_3a4a, 0, &CLIENT_DCID, 100)),
            action: XdpAction::Drop,
            counters: &[DropShortInitial],
            worker: None,
        },
        Case {
            name: "unknown version in 1200 bytes: placed like a new connection",
            packet: udp4(&long_header(0x1a2a_3a4a, 0, &CLIENT_DCID, 1200)),
            action: XdpAction::Pass,
            counters: LONG_HASHED,
            worker: hashed_worker(&CLIENT_DCID),
        },
        Case {
            name: "ipv4 later fragment",
            packet: eth(
                ETH_IPV4,
                &ipv4_full(
                    PROTO_UDP,
                    0,
                    0x00b9,
                    &udp(QUIC_PORT, &short_header(0x01, &ours)),
                ),
            ),
            action: XdpAction::Pass,
            counters: NON_QUIC,
            worker: None,
        },
        Case {
            name: "ipv4 with IHL below 5",
            packet: eth(ETH_IPV4, &{
                let mut p = ipv4(PROTO_UDP, &udp(QUIC_PORT, &short_header(0x01, &ours)));
                p[0] = 0x44;
                p
            }),
            action: XdpAction::Pass,
            counters: NON_QUIC,
            worker: None,
        },
        Case {
            name: "ipv6 with a hop-by-hop extension header",
            packet: eth(
                ETH_IPV6,
                &ipv6(IPV6_HOP_BY_HOP, &[PROTO_UDP, 0, 1, 4, 0, 0, 0, 0]),
            ),
            action: XdpAction::Pass,
            counters: NON_QUIC,
            worker: None,
        },
        Case {
            name: "three VLAN tags (more than walked)",
            packet: eth_vlan(
                &[ETH_8021AD, ETH_8021Q, ETH_8021Q],
                ETH_IPV4,
                &ipv4(PROTO_UDP, &udp(QUIC_PORT, &short_header(0x41, &ours))),
            ),
            action: XdpAction::Pass,
            counters: NON_QUIC,
            worker: None,
        },
        Case {
            name: "IPv4 EtherType carrying an IPv6 header",
            packet: eth(
                ETH_IPV4,
                &ipv6(PROTO_UDP, &udp(QUIC_PORT, &short_header(0x01, &ours))),
            ),
            action: XdpAction::Pass,
            counters: NON_QUIC,
            worker: None,
        },
    ];
    run_table(&programs, &cases);
}

#[test]
#[ignore = "needs root"]
fn xdp_steers_every_dcid_like_user_space() {
    let programs = load_configured(0);
    let mut expected = [0u64; WORKERS as usize];
    // A small deterministic generator (xorshift) for varied DCIDs.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..200u32 {
        let len = (next() % 21) as usize;
        let dcid: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let packet = if i % 2 == 0 {
            udp4(&initial_v1(&dcid, 1200))
        } else {
            udp6(&initial_v1(&dcid, 1252))
        };
        let run = programs.run_xdp(&packet).expect("test run");
        assert_eq!(run.action, XdpAction::Pass, "dcid {dcid:02x?}");
        expected[hashed(&dcid) as usize] += 1;
    }
    for worker in 0..(WORKERS as u8) {
        let packet = udp4(&short_header(0x41, &our_cid(worker)));
        programs.run_xdp(&packet).expect("test run");
        expected[worker as usize] += 1;
    }
    let got: Vec<u64> = (0..WORKERS)
        .map(|w| programs.worker_packets(at(w)).expect("worker_stats"))
        .collect();
    assert_eq!(
        got,
        expected.to_vec(),
        "per-worker counts: kernel vs spooky_common::cid::place"
    );
    let stats = programs.stats().expect("stats");
    assert_eq!(stats.total(SteeredByHash), 200);
    assert_eq!(stats.total(SteeredByCid), u64::from(WORKERS));
    assert_eq!(stats.total(Packets), 200 + u64::from(WORKERS));
    // Per-CPU values add up to the totals.
    for counter in Counter::ALL {
        assert_eq!(
            stats.per_cpu(counter).iter().sum::<u64>(),
            stats.total(counter)
        );
    }
    assert!(
        programs
            .worker_packets(SLOTS - 1)
            .expect("last worker slot")
            == 0
    );
}

/// QUIC-LB's encrypted connection IDs (and any load balancer's format): the XDP program
/// cannot read the server id, and needs not: it steers by the two host bytes at the end
/// (`FLAG_LB_LAYOUT`), as user space does.
#[test]
#[ignore = "needs root"]
fn xdp_steers_encrypted_quic_lb_ids_by_their_host_bytes() {
    use spooky::config::{CidFormat, QuicLbConfig};
    use spooky::quic::ids::IdFormat;
    let programs = load_configured(spooky_common::maps::FLAG_LB_LAYOUT);
    let format = CidFormat::QuicLb {
        current: QuicLbConfig {
            rotation: 1,
            key: Some([0x42; 16]),
            length_self_encoding: false,
        },
        previous: None,
    };
    let ids = IdFormat::new(&format, CID_LEN, SERVER_ID_LEN, GENERATION).expect("format");
    let mut seed = 5u32;
    let mut expected = [0u64; WORKERS as usize];
    for n in 0..40u32 {
        let worker = (n * 7 % WORKERS) as u8;
        let mut id = [0u8; 20];
        let fill = |buf: &mut [u8]| {
            for b in buf.iter_mut() {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                *b = (seed >> 16) as u8;
            }
        };
        let len = ids.write(&[0xab, 0xcd], worker, None, fill, &mut id);
        assert_eq!(ids.server_id_of(&id[..len]), Some(vec![0xab, 0xcd]));
        programs
            .run_xdp(&udp4(&short_header(0x41, &id[..len])))
            .expect("test run");
        expected[usize::from(worker)] += 1;
    }
    let got: Vec<u64> = (0..WORKERS)
        .map(|w| programs.worker_packets(at(w)).expect("worker_stats"))
        .collect();
    assert_eq!(got, expected.to_vec(), "per-worker counts");
    assert_eq!(programs.stats().expect("stats").total(SteeredByCid), 40);
}

/// Client-chosen DCIDs are hashed with the key in `config` (drawn per process): the kernel's
/// placement is `fnv1a32_keyed(key, dcid) % workers`, and a different key moves them.
#[test]
#[ignore = "needs root"]
fn xdp_hashes_client_dcids_with_the_configured_key() {
    let mut programs = load_configured(0);
    let key = 0x5eed_c0de;
    programs
        .set_config(&SteeringConfig {
            hash_key: key,
            ..config(0)
        })
        .expect("config");
    let counts = |p: &EbpfPrograms| -> Vec<u64> {
        (0..WORKERS)
            .map(|w| p.worker_packets(at(w)).expect("worker_stats"))
            .collect()
    };
    let (mut got, mut want, mut unkeyed) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..64u8 {
        let d = [n, 3, 1, 4, 1, 5, 9, 2];
        let before = counts(&programs);
        programs
            .run_xdp(&udp4(&initial_v1(&d, 1200)))
            .expect("test run");
        let after = counts(&programs);
        got.push((0..WORKERS).find(|w| after[*w as usize] > before[*w as usize]));
        want.push(Some(spooky_common::cid::fnv1a32_keyed(key, &d) % WORKERS));
        unkeyed.push(Some(hashed(&d)));
    }
    assert_eq!(got, want, "placement by the keyed hash");
    assert_ne!(got, unkeyed, "the key changes where DCIDs land");
}

#[test]
#[ignore = "needs root"]
fn xdp_redirects_to_the_owning_workers_cpu_when_enabled() {
    let mut programs = load_configured(FLAG_REDIRECT_CPU);
    programs.enable_cpu(0, 192).expect("cpumap entry for CPU 0");
    // Worker 1 is dead; worker 2 runs on a CPU that is not in the CPU map.
    programs
        .set_worker(
            at(1),
            &WorkerEntry {
                cpu: 0,
                alive: 0,
                generation: 1,
            },
        )
        .expect("worker 1");
    programs
        .set_worker(
            at(2),
            &WorkerEntry {
                cpu: 1,
                alive: 1,
                generation: 1,
            },
        )
        .expect("worker 2");
    let cases = vec![
        Case {
            name: "alive worker on an enabled CPU: redirected",
            packet: udp4(&short_header(0x41, &our_cid(3))),
            action: XdpAction::Redirect,
            counters: &[QuicShort, SteeredByCid, Redirected],
            worker: Some(3),
        },
        Case {
            name: "Initial hashed onto a worker (the next live one if dead), redirected or not as it allows",
            packet: udp6(&initial_v1(&CLIENT_DCID, 1200)),
            action: match live_hashed_worker(&CLIENT_DCID, &[1]) {
                2 => XdpAction::Pass,
                _ => XdpAction::Redirect,
            },
            counters: match live_hashed_worker(&CLIENT_DCID, &[1]) {
                2 => &[QuicLong, SteeredByHash, RedirectFailed, PassedQuic],
                _ => &[QuicLong, SteeredByHash, Redirected],
            },
            worker: Some(live_hashed_worker(&CLIENT_DCID, &[1])),
        },
        Case {
            name: "Initial hashing onto dead worker 1: the next live worker (2) takes it",
            packet: udp4(&initial_v1(&dcid_hashing_to(1), 1200)),
            action: XdpAction::Pass,
            counters: &[QuicLong, SteeredByHash, RedirectFailed, PassedQuic],
            worker: Some(2),
        },
        Case {
            name: "dead worker: passed",
            packet: udp4(&short_header(0x41, &our_cid(1))),
            action: XdpAction::Pass,
            counters: &[QuicShort, SteeredByCid, RedirectFailed, PassedQuic],
            worker: Some(1),
        },
        Case {
            name: "worker's CPU missing from the CPU map: passed",
            packet: udp4(&short_header(0x41, &our_cid(2))),
            action: XdpAction::Pass,
            counters: &[QuicShort, SteeredByCid, RedirectFailed, PassedQuic],
            worker: Some(2),
        },
        Case {
            name: "non-QUIC is never redirected",
            packet: eth(ETH_IPV4, &ipv4(PROTO_UDP, &udp(53, &[1, 2, 3]))),
            action: XdpAction::Pass,
            counters: NON_QUIC,
            worker: None,
        },
    ];
    run_table(&programs, &cases);
}

#[test]
#[ignore = "needs root"]
fn xdp_without_configuration_passes_everything() {
    let programs = load();
    let cases = vec![
        Case {
            name: "short header before config is written",
            packet: udp4(&short_header(0x41, &our_cid(1))),
            action: XdpAction::Pass,
            counters: NON_QUIC,
            worker: None,
        },
        Case {
            name: "invalid QUIC before config is written",
            packet: udp4(&short_header(0x01, &our_cid(1))),
            action: XdpAction::Pass,
            counters: NON_QUIC,
            worker: None,
        },
    ];
    run_table(&programs, &cases);
}

#[test]
#[ignore = "needs root"]
fn xdp_with_port_but_no_workers_counts_without_steering() {
    let mut programs = load();
    programs
        .set_config(&SteeringConfig {
            workers: 0,
            ..config(FLAG_REDIRECT_CPU)
        })
        .expect("config");
    let cases = vec![
        Case {
            name: "short header, no workers",
            packet: udp4(&short_header(0x41, &our_cid(1))),
            action: XdpAction::Pass,
            counters: &[QuicShort, PassedQuic],
            worker: None,
        },
        Case {
            name: "short Initial is still dropped",
            packet: udp4(&initial_v1(&CLIENT_DCID, 500)),
            action: XdpAction::Drop,
            counters: &[DropShortInitial],
            worker: None,
        },
    ];
    run_table(&programs, &cases);
}

#[test]
#[ignore = "needs root"]
fn xdp_counts_on_the_cpu_it_ran_on() {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let programs = load_configured(0);
    let packet = udp4(&short_header(0x41, &our_cid(0)));
    for cpu in 0..cpus {
        pin_to_cpu(cpu);
        programs.run_xdp(&packet).expect("test run");
        programs.run_xdp(&packet).expect("test run");
    }
    let stats = programs.stats().expect("stats");
    let per_cpu = stats.per_cpu(QuicShort);
    for cpu in 0..cpus {
        assert_eq!(per_cpu[cpu], 2, "CPU {cpu}: {per_cpu:?}");
    }
    assert_eq!(stats.total(QuicShort), 2 * cpus as u64);
}

/// Pins the calling thread to `cpu` (the test runs on its own thread).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: `set` is a plain bitmask owned by this frame; the calls only read it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        rc,
        0,
        "sched_setaffinity(CPU {cpu}): {}",
        std::io::Error::last_os_error()
    );
}

/// A UDP socket on 127.0.0.1:`port` (0: any) with `SO_REUSEPORT`, and a 2 s read timeout.
fn reuseport_socket(port: u16) -> std::net::UdpSocket {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("socket");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    socket.bind(&addr.into()).expect("bind 127.0.0.1");
    let socket: std::net::UdpSocket = socket.into();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .expect("read timeout");
    socket
}

#[test]
#[ignore = "needs root"]
fn reuseport_picks_the_owning_workers_socket() {
    reuseport_places_every_datagram(false);
}

/// A client sending with UDP GSO (`UDP_SEGMENT`) builds paged datagrams: on loopback the
/// socket lookup sees only the UDP header in the linear area, the QUIC header sits in page
/// fragments, as on NICs that split headers from payload. The program must read it anyway
/// (`bpf_skb_load_bytes`), not fall back to the kernel's hash.
#[test]
#[ignore = "needs root"]
fn reuseport_reads_the_dcid_of_a_paged_datagram() {
    reuseport_places_every_datagram(true);
}

/// Sends short headers for every worker and Initials to a reuseport group with the program
/// attached, and checks each reaches its worker's socket and no other; `paged`: from a
/// socket with `UDP_SEGMENT` set, whose datagrams are paged.
fn reuseport_places_every_datagram(paged: bool) {
    let mut programs = load_configured(0);
    let first = reuseport_socket(0);
    let port = first.local_addr().expect("local addr").port();
    let mut sockets = vec![first];
    for _ in 1..WORKERS {
        sockets.push(reuseport_socket(port));
    }
    programs
        .set_config(&SteeringConfig {
            quic_port: port,
            ..config(0)
        })
        .expect("config");
    for (worker, socket) in sockets.iter().enumerate() {
        programs
            .set_worker_socket(at(worker as u32), socket)
            .expect("sockets map");
    }
    programs
        .attach_reuseport(&sockets[0])
        .expect("attach sk_reuseport");

    let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("client socket");
    if paged {
        use std::os::fd::AsRawFd;
        let segment: libc::c_int = 1400;
        // SAFETY: a valid socket and a pointer to a live c_int of the length given.
        let rc = unsafe {
            libc::setsockopt(
                client.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                (&raw const segment).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
    }
    let mut datagrams: Vec<(String, Vec<u8>, u32)> = Vec::new();
    for worker in 0..(WORKERS as u8) {
        // Several per worker: the kernel's own hash would scatter them.
        for n in 0..3u8 {
            let mut cid = our_cid(worker);
            cid[CID_LEN as usize - 1] = n;
            datagrams.push((
                format!("short header for worker {worker} (#{n})"),
                short_header(0x41, &cid),
                u32::from(worker),
            ));
        }
    }
    for n in 0..8u8 {
        let dcid = [n, 0x42, 0x17, 0x99, n, 0x01, 0x02, 0x03];
        let worker = hashed(&dcid);
        datagrams.push((format!("Initial #{n}"), initial_v1(&dcid, 1200), worker));
    }
    let mut buf = [0u8; 2048];
    for (name, datagram, worker) in &datagrams {
        client.send_to(datagram, ("127.0.0.1", port)).expect("send");
        let owner = &sockets[*worker as usize];
        let n = owner
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{name}: worker {worker}'s socket got nothing: {e}"));
        assert_eq!(
            &buf[..n],
            &datagram[..],
            "{name}: a different datagram arrived"
        );
        for (other, socket) in sockets.iter().enumerate() {
            socket.set_nonblocking(true).expect("nonblocking");
            let stray = socket.recv(&mut buf);
            socket.set_nonblocking(false).expect("blocking");
            assert!(
                stray.is_err(),
                "{name}: also/instead reached worker {other}'s socket"
            );
        }
    }
}

#[test]
#[ignore = "needs root"]
fn reuseport_skips_dead_workers_for_new_connections_only() {
    let mut programs = load_configured(0);
    let first = reuseport_socket(0);
    let port = first.local_addr().expect("local addr").port();
    let mut sockets = vec![first];
    for _ in 1..WORKERS {
        sockets.push(reuseport_socket(port));
    }
    programs
        .set_config(&SteeringConfig {
            quic_port: port,
            ..config(0)
        })
        .expect("config");
    for (worker, socket) in sockets.iter().enumerate() {
        programs
            .set_worker_socket(at(worker as u32), socket)
            .expect("sockets map");
    }
    // Workers 1 and 2 take no new connections.
    for dead in [1, 2] {
        programs
            .set_worker(
                at(dead),
                &WorkerEntry {
                    cpu: 0,
                    alive: 0,
                    generation: GENERATION.into(),
                },
            )
            .expect("mark dead");
    }
    programs
        .attach_reuseport(&sockets[0])
        .expect("attach sk_reuseport");
    let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("client socket");
    let cases: Vec<(&str, Vec<u8>, usize)> = vec![
        (
            "Initial hashing to dead 1 → 3",
            initial_v1(&dcid_hashing_to(1), 1200),
            3,
        ),
        (
            "Initial hashing to dead 2 → 3",
            initial_v1(&dcid_hashing_to(2), 1200),
            3,
        ),
        (
            "Initial hashing to live 0 → 0",
            initial_v1(&dcid_hashing_to(0), 1200),
            0,
        ),
        (
            "Initial hashing to live 3 → 3",
            initial_v1(&dcid_hashing_to(3), 1200),
            3,
        ),
        (
            "short header naming dead 1 → 1 (draining keeps its connections)",
            short_header(0x41, &our_cid(1)),
            1,
        ),
        (
            "Handshake naming dead 2 → 2",
            long_header(QUIC_V1, 0x20, &our_cid(2), 60),
            2,
        ),
    ];
    let mut buf = [0u8; 2048];
    for (name, datagram, worker) in &cases {
        client.send_to(datagram, ("127.0.0.1", port)).expect("send");
        let n = sockets[*worker]
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{name}: worker {worker}'s socket got nothing: {e}"));
        assert_eq!(&buf[..n], &datagram[..], "{name}");
        for (other, socket) in sockets.iter().enumerate() {
            socket.set_nonblocking(true).expect("nonblocking");
            let stray = socket.recv(&mut buf);
            socket.set_nonblocking(false).expect("blocking");
            assert!(stray.is_err(), "{name}: also reached worker {other}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Two generations at once: a takeover in progress (generation 1 drains, 2 is the newest).

const NEWEST: u8 = 2;
const NEWEST_WORKERS: u32 = 2;

/// One of our connection IDs of `generation` naming `worker`.
fn cid_of(generation: u8, worker: u8) -> Vec<u8> {
    let mut cid = vec![0u8; CID_LEN as usize];
    let layout = CidLayout::new(CID_LEN, SERVER_ID_LEN, generation).unwrap();
    assert_eq!(
        layout.write(&[0xab, 0xcd], worker, &[0x5a; 20], &mut cid),
        cid.len()
    );
    cid
}

/// An Initial carrying a Retry token, to `dcid` (the Retry's source ID: ours).
fn retried_initial(dcid: &[u8]) -> Vec<u8> {
    let mut p = initial_v1(dcid, 1200);
    p[6 + dcid.len() + 1 + 8] = 4;
    p
}

/// The programs as during a takeover: generation 1 (4 workers) draining, 2 (2) the newest.
fn load_takeover() -> EbpfPrograms {
    let mut programs = load_configured(0);
    register(&mut programs, GENERATION, WORKERS, false);
    register(&mut programs, NEWEST, NEWEST_WORKERS, true);
    programs
        .set_config(&SteeringConfig {
            generation: NEWEST,
            workers: NEWEST_WORKERS,
            ..config(0)
        })
        .expect("config");
    programs
}

/// Every (generation, worker) slot in use.
fn takeover_slots() -> Vec<u32> {
    (0..WORKERS)
        .map(|w| slot(GENERATION, w))
        .chain((0..NEWEST_WORKERS).map(|w| slot(NEWEST, w)))
        .collect()
}

/// Runs `packet` and returns the slot XDP counted it for (None: none) and the counters that
/// went up besides `Packets`.
fn placed(programs: &EbpfPrograms, packet: &[u8]) -> (Option<u32>, Vec<Counter>) {
    let slots = takeover_slots();
    let count = |p: &EbpfPrograms| -> Vec<u64> {
        slots
            .iter()
            .map(|s| p.worker_packets(*s).unwrap())
            .collect()
    };
    let (stats_before, before) = (programs.stats().unwrap(), count(programs));
    let run = programs.run_xdp(packet).expect("test run");
    assert_eq!(run.action, XdpAction::Pass);
    let (stats_after, after) = (programs.stats().unwrap(), count(programs));
    let hits: Vec<u32> = slots
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| a > b)
        .map(|(s, _)| *s)
        .collect();
    assert!(hits.len() <= 1, "counted on several workers: {hits:?}");
    let counters = Counter::ALL
        .into_iter()
        .filter(|c| *c != Packets && stats_after.total(*c) > stats_before.total(*c))
        .collect();
    (hits.first().copied(), counters)
}

#[test]
#[ignore = "needs root"]
fn xdp_places_both_generations_during_a_takeover() {
    let mut programs = load_takeover();
    let by_cid = vec![QuicShort, SteeredByCid, PassedQuic];
    // The drainer keeps every connection it has, by the generation in the CID…
    for w in 0..WORKERS as u8 {
        let got = placed(
            &programs,
            &udp4(&short_header(0x41, &cid_of(GENERATION, w))),
        );
        assert_eq!(got, (Some(slot(GENERATION, u32::from(w))), by_cid.clone()));
    }
    // …and its handshakes in flight, including those answering its Retry.
    let got = placed(&programs, &udp4(&retried_initial(&cid_of(GENERATION, 3))));
    assert_eq!(got.0, Some(slot(GENERATION, 3)), "{got:?}");
    let got = placed(
        &programs,
        &udp4(&long_header(QUIC_V1, 0x20, &cid_of(GENERATION, 2), 60)),
    );
    assert_eq!(got.0, Some(slot(GENERATION, 2)), "{got:?}");
    // The newest has its own…
    for w in 0..NEWEST_WORKERS as u8 {
        let got = placed(&programs, &udp4(&short_header(0x41, &cid_of(NEWEST, w))));
        assert_eq!(got, (Some(slot(NEWEST, u32::from(w))), by_cid.clone()));
    }
    // …and every new connection, by hash over its workers only.
    for n in 0..16u8 {
        let dcid = [n, 0x42, 0x17, 0x99, n, 0x01, 0x02, 0x03];
        let got = placed(&programs, &udp6(&initial_v1(&dcid, 1200)));
        let want = slot(NEWEST, fnv1a32(&dcid) % NEWEST_WORKERS);
        assert_eq!(got, (Some(want), vec![QuicLong, SteeredByHash, PassedQuic]));
    }
    // A worker the newest does not have, and a generation nobody owns: nobody's.
    let unowned = vec![QuicShort, PassedQuic, UnknownGeneration];
    for cid in [cid_of(NEWEST, 3), cid_of(5, 0), cid_of(0, 0)] {
        assert_eq!(
            placed(&programs, &udp4(&short_header(0x41, &cid))),
            (None, unowned.clone())
        );
    }
    // The drainer exits: its generation is forgotten, and its IDs are nobody's.
    programs
        .set_generation(GENERATION, &GenerationEntry::default())
        .unwrap();
    let got = placed(
        &programs,
        &udp4(&short_header(0x41, &cid_of(GENERATION, 1))),
    );
    assert_eq!(got, (None, unowned));
}

#[test]
#[ignore = "needs root"]
fn reuseport_places_both_generations_during_a_takeover() {
    let mut programs = load_takeover();
    let first = reuseport_socket(0);
    let port = first.local_addr().expect("local addr").port();
    // The drainer's 4 sockets joined the group first, the newest's 2 after.
    let mut sockets = vec![first];
    for _ in 1..WORKERS + NEWEST_WORKERS {
        sockets.push(reuseport_socket(port));
    }
    programs
        .set_config(&SteeringConfig {
            quic_port: port,
            generation: NEWEST,
            workers: NEWEST_WORKERS,
            ..config(0)
        })
        .expect("config");
    let slots = takeover_slots();
    for (socket, at) in sockets.iter().zip(&slots) {
        programs
            .set_worker_socket(*at, socket)
            .expect("sockets map");
    }
    programs
        .attach_reuseport(&sockets[0])
        .expect("attach sk_reuseport");
    let index_of = |generation: u8, worker: u32| {
        slots
            .iter()
            .position(|s| *s == slot(generation, worker))
            .unwrap()
    };
    let mut cases: Vec<(String, Vec<u8>, usize)> = Vec::new();
    for w in 0..WORKERS {
        cases.push((
            format!("drainer's worker {w}"),
            short_header(0x41, &cid_of(GENERATION, w as u8)),
            index_of(GENERATION, w),
        ));
    }
    cases.push((
        "drainer's Retry continuation".into(),
        retried_initial(&cid_of(GENERATION, 1)),
        index_of(GENERATION, 1),
    ));
    for w in 0..NEWEST_WORKERS {
        cases.push((
            format!("newest's worker {w}"),
            short_header(0x41, &cid_of(NEWEST, w as u8)),
            index_of(NEWEST, w),
        ));
    }
    for n in 0..8u8 {
        let dcid = [n, 0x42, 0x17, 0x99, n, 0x01, 0x02, 0x03];
        cases.push((
            format!("new connection #{n}"),
            initial_v1(&dcid, 1200),
            index_of(NEWEST, fnv1a32(&dcid) % NEWEST_WORKERS),
        ));
    }
    let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("client socket");
    let mut buf = [0u8; 2048];
    for (name, datagram, index) in &cases {
        client.send_to(datagram, ("127.0.0.1", port)).expect("send");
        let n = sockets[*index]
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{name}: socket {index} got nothing: {e}"));
        assert_eq!(&buf[..n], &datagram[..], "{name}");
        for (other, socket) in sockets.iter().enumerate() {
            socket.set_nonblocking(true).expect("nonblocking");
            let stray = socket.recv(&mut buf);
            socket.set_nonblocking(false).expect("blocking");
            assert!(stray.is_err(), "{name}: also reached socket {other}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The sk_reuseport tier with the real proxy (no network namespace: 127.0.0.1).

fn unique_pin(name: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    std::path::PathBuf::from(format!(
        "/sys/fs/bpf/spooky-test-{}-{name}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

fn ebpf_proxy(
    backends: &[(&str, std::net::SocketAddr)],
    pin: &std::path::Path,
    workers: usize,
) -> crate::support::Proxy {
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the sk_reuseport tier needs root"
    );
    let p = crate::support::proxy(
        &crate::support::pool("main", "/", None, "round-robin", backends, ""),
        &format!(
            "quic:\n  retry: off\nsteering:\n  pin_path: {}\n",
            pin.display()
        ),
        workers,
    );
    assert_eq!(
        p.running.as_ref().unwrap().steering,
        spooky::steering::Mode::SkReuseport,
        "as root without --iface the sk_reuseport tier is the default"
    );
    p
}

fn poll_status(
    pin: &std::path::Path,
    what: &str,
    done: impl Fn(&spooky::ops::status::Status) -> bool,
) -> spooky::ops::status::Status {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let status = spooky::ops::status::read(pin).expect("read pinned maps");
        if done(&status) {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {status:#?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs root"]
fn sk_reuseport_tier_on_loopback_has_no_misroutes() {
    use spooky_peers::client::Request;
    let b1 = crate::support::backend("b1");
    let b2 = crate::support::backend("b2");
    let pin = unique_pin("loopback");
    let mut p = ebpf_proxy(&[("b1", b1.addr), ("b2", b2.addr)], &pin, 4);
    let addr = p.addr;
    let (connections, requests) = (48usize, 5usize);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for c in (t..connections).step_by(4) {
                    let mut cl = crate::support::client(addr);
                    for r in 0..requests {
                        let resp = cl
                            .request(&Request::get("localhost", "/size/500"), crate::support::T)
                            .unwrap_or_else(|e| panic!("connection {c} request {r}: {e}"));
                        assert_eq!(resp.status, 200);
                    }
                    cl.close();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(p.misrouted(), 0, "misrouted with sk_reuseport steering");
    let sent = (connections * requests) as u64;
    let status = poll_status(&pin, "requests never reached the pinned counters", |s| {
        s.workers.iter().map(|w| w.requests).sum::<u64>() == sent
    });
    assert_eq!(status.mode, "sk-reuseport");
    assert_eq!(status.pid, std::process::id());
    assert_eq!(status.quic_port, addr.port());
    assert_eq!(status.workers.len(), 4);
    for w in &status.workers {
        assert!(w.alive);
        assert_eq!(w.misrouted, 0);
        assert!(
            w.connections_accepted > 0,
            "worker {} got no connection",
            w.index
        );
        assert_eq!(w.xdp_packets, 0, "no XDP in this tier");
    }
    assert_eq!(
        status
            .workers
            .iter()
            .map(|w| w.connections_accepted)
            .sum::<u64>(),
        connections as u64
    );
    let pool = &status.pools[0];
    assert_eq!(pool.name, "main");
    let ids: Vec<&str> = pool.backends.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, ["b1", "b2"]);
    for b in &pool.backends {
        assert_eq!(b.state, "healthy");
        assert!(b.ewma_latency_us > 0, "{b:?}");
    }
    assert!(
        status.counters.iter().all(|c| c.total == 0),
        "XDP is not attached"
    );
    // `/metrics` carries every XDP counter, summed over the CPUs (all zero in this tier).
    let metrics = p.running.as_ref().unwrap().metrics_text();
    for counter in Counter::ALL {
        let line = format!(
            "spooky_ebpf_packets_total{{counter=\"{}\"}} 0",
            counter.name()
        );
        assert!(metrics.contains(&line), "`{line}` missing from:\n{metrics}");
    }
    assert_eq!(
        status.initial_rate, 2000,
        "the default steering.initial_rate"
    );
    assert_eq!(status.initial_burst, 4000);
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_spooky"))
        .args(["status", "--pin-path", &pin.display().to_string()])
        .output()
        .expect("spooky status");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&table.stderr)
    );
    for want in [
        "sk-reuseport",
        "pool main",
        "b1",
        "healthy",
        "misrouted",
        "redirected",
    ] {
        assert!(text.contains(want), "`{want}` missing from:\n{text}");
    }
    p.shutdown();
    for name in spooky_common::maps::PINNED_MAPS {
        assert!(
            !pin.join(name).exists(),
            "{name} still pinned after shutdown"
        );
    }
    assert!(!pin.exists());
    let gone = std::process::Command::new(env!("CARGO_BIN_EXE_spooky"))
        .args(["status", "--pin-path", &pin.display().to_string()])
        .output()
        .expect("spooky status");
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no pinned maps"));
}

#[test]
#[ignore = "needs root"]
fn stale_pins_are_replaced_and_only_our_own_are_removed() {
    use spooky_common::maps::PINNED_MAPS;
    let b1 = crate::support::backend("b1");
    let pin = unique_pin("stale");
    // A "crashed" process: maps pinned, process (object) gone.
    let stale_ids: Vec<u32> = {
        let programs = load();
        let _ = ebpf_proxy(&[("b1", b1.addr)], &pin, 1); // mounts bpffs if needed; cleans up
        std::fs::create_dir_all(&pin).unwrap();
        PINNED_MAPS
            .iter()
            .map(|name| programs.pin_map(name, &pin).expect("pin stale map"))
            .collect()
    };
    let mut first = ebpf_proxy(&[("b1", b1.addr)], &pin, 2);
    let ids = |pin: &std::path::Path| -> Vec<u32> {
        PINNED_MAPS
            .iter()
            .map(|n| spooky::steering::ebpf::pinned_map_id(&pin.join(n)).expect("pinned"))
            .collect()
    };
    let first_ids = ids(&pin);
    for (a, b) in first_ids.iter().zip(&stale_ids) {
        assert_ne!(a, b, "stale pin not replaced");
    }
    // A second process on the same pin path takes over; the first one's shutdown leaves the
    // second one's pins alone.
    let mut second = ebpf_proxy(&[("b1", b1.addr)], &pin, 2);
    let second_ids = ids(&pin);
    first.shutdown();
    assert_eq!(ids(&pin), second_ids);
    assert_eq!(spooky::ops::status::read(&pin).unwrap().workers.len(), 2);
    second.shutdown();
    assert!(!pin.exists(), "pins left after the last shutdown");
}

// ---------------------------------------------------------------------------------------------
// The Initial-flood defense: a rate limit per source prefix (/24, /56) on client Initials,
// and per wider prefix (/16, /48) at WIDE_PREFIX_FACTOR times the rate and burst.

/// `frame` (from `udp4`/`eth(ETH_IPV4, ..)`) with the IPv4 source address `src`.
fn from_v4(src: [u8; 4], mut frame: Vec<u8>) -> Vec<u8> {
    frame[14 + 12..14 + 16].copy_from_slice(&src);
    frame
}

/// `frame` (from `udp6`) with the IPv6 source address `src`.
fn from_v6(src: std::net::Ipv6Addr, mut frame: Vec<u8>) -> Vec<u8> {
    frame[14 + 8..14 + 24].copy_from_slice(&src.octets());
    frame
}

/// Loads the programs with the Initial limit at `rate` per second and `burst`.
fn load_rate_limited(rate: u32, burst: u32) -> EbpfPrograms {
    let mut programs = load_configured(0);
    programs
        .set_config(&SteeringConfig {
            initial_rate: rate,
            initial_burst: burst,
            ..config(0)
        })
        .expect("config");
    programs
}

/// Runs every frame once; returns how many passed and how many were dropped.
fn run_all(programs: &EbpfPrograms, frames: &[Vec<u8>]) -> (u64, u64) {
    let (mut passed, mut dropped) = (0, 0);
    for frame in frames {
        match programs.run_xdp(frame).expect("test run").action {
            XdpAction::Pass => passed += 1,
            XdpAction::Drop => dropped += 1,
            other => panic!("unexpected verdict {other:?}"),
        }
    }
    (passed, dropped)
}

fn delta(before: &Stats, after: &Stats, counter: Counter) -> u64 {
    after.total(counter) - before.total(counter)
}

/// `n` distinct client Initials (1200 B, different DCIDs), built by `frame`.
fn initials(n: usize, frame: impl Fn(&[u8]) -> Vec<u8>) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut dcid = CLIENT_DCID;
            dcid[..4].copy_from_slice(&(i as u32).to_be_bytes());
            frame(&initial_v1(&dcid, 1200))
        })
        .collect()
}

// Rate 1 per second: the whole burst below runs in milliseconds, so no token comes back
// while it runs and the counts are exact.
const FLOOD_RATE: u32 = 1;
const FLOOD_BURST: u32 = 16;
const FLOOD: usize = 40;

/// A flood from one prefix: exactly the burst passes, the rest is dropped and counted; the
/// hosts of the prefix share one bucket, and the bucket is in the `initial_limits` map, with
/// the bucket of its wider prefix.
fn flood_one_prefix(
    programs: &EbpfPrograms,
    what: &str,
    frames: &[Vec<u8>],
    key: spooky_common::maps::SourcePrefix,
) {
    let before = programs.stats().unwrap();
    let (passed, dropped) = run_all(programs, frames);
    let after = programs.stats().unwrap();
    let over = (FLOOD as u64) - u64::from(FLOOD_BURST);
    assert_eq!((passed, dropped), (u64::from(FLOOD_BURST), over), "{what}");
    assert_eq!(
        delta(&before, &after, DropInitialRateLimited),
        over,
        "{what}"
    );
    assert_eq!(
        delta(&before, &after, QuicLong),
        u64::from(FLOOD_BURST),
        "{what}"
    );
    assert_eq!(
        delta(&before, &after, PassedQuic),
        u64::from(FLOOD_BURST),
        "{what}"
    );
    assert_eq!(delta(&before, &after, Packets), FLOOD as u64, "{what}");
    let limits = programs.initial_limits().expect("read initial_limits");
    for key in [key, key.wider()] {
        let bucket = limits
            .iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("{what}: no bucket for {key:?} in {limits:?}"));
        assert!(bucket.1.tat_ns > 0, "{what}: {bucket:?}");
    }
    assert_eq!(
        limits.len(),
        2,
        "{what}: one prefix, its bucket and its wider prefix's: {limits:?}"
    );
}

/// A flood spread over many narrow prefixes of one wider prefix (one Initial from each of 40
/// /24s of a /16, or /56s of a /48): each narrow bucket lets its one through, the wider one
/// holds the flood to `WIDE_PREFIX_FACTOR ×` the burst; the next wider prefix is unaffected.
#[test]
#[ignore = "needs root"]
fn xdp_rate_limits_initials_per_ipv4_16_and_ipv6_48() {
    use spooky_common::maps::{SourcePrefix, WIDE_PREFIX_FACTOR};
    let burst = 1;
    let wide_burst = u64::from(burst * WIDE_PREFIX_FACTOR);
    let spread_v4: Vec<Vec<u8>> = initials(FLOOD, udp4)
        .into_iter()
        .enumerate()
        .map(|(i, f)| from_v4([10, 1, i as u8, 5], f))
        .collect();
    let spread_v6: Vec<Vec<u8>> = initials(FLOOD, udp6)
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let src = std::net::Ipv6Addr::new(0x2001, 0xdb8, 5, (i as u16) << 8, 0, 0, 0, 1);
            from_v6(src, f)
        })
        .collect();
    for (what, spread, next) in [
        (
            "ipv4 /16",
            spread_v4,
            from_v4([10, 2, 0, 5], initials(1, udp4).remove(0)),
        ),
        (
            "ipv6 /48",
            spread_v6,
            from_v6(
                "2001:db8:6::1".parse().unwrap(),
                initials(1, udp6).remove(0),
            ),
        ),
    ] {
        let programs = load_rate_limited(FLOOD_RATE, burst);
        let before = programs.stats().unwrap();
        let (passed, dropped) = run_all(&programs, &spread);
        let after = programs.stats().unwrap();
        assert_eq!(
            (passed, dropped),
            (wide_burst, FLOOD as u64 - wide_burst),
            "{what}"
        );
        assert_eq!(
            delta(&before, &after, DropInitialRateLimited),
            FLOOD as u64 - wide_burst,
            "{what}"
        );
        let limits = programs.initial_limits().expect("read initial_limits");
        let wide: Vec<&(SourcePrefix, _)> =
            limits.iter().filter(|(k, _)| k.wider() == *k).collect();
        assert_eq!(wide.len(), 1, "{what}: one wider prefix: {limits:?}");
        assert_eq!(run_all(&programs, &[next]), (1, 0), "{what}: the next one");
    }
}

#[test]
#[ignore = "needs root"]
fn xdp_rate_limits_initials_per_ipv4_24() {
    use spooky_common::maps::SourcePrefix;
    let programs = load_rate_limited(FLOOD_RATE, FLOOD_BURST);
    // 40 Initials from hosts all over 192.0.2.0/24.
    let flood = initials(FLOOD, udp4)
        .into_iter()
        .enumerate()
        .map(|(i, f)| from_v4([192, 0, 2, (i * 6) as u8], f))
        .collect::<Vec<_>>();
    flood_one_prefix(
        &programs,
        "ipv4 /24",
        &flood,
        SourcePrefix::ipv4([192, 0, 2, 0]),
    );
    let flooder = |frame| from_v4([192, 0, 2, 77], frame);
    let cases = vec![
        Case {
            name: "another Initial from the flooding /24: rate-limited",
            packet: flooder(udp4(&initial_v1(&[0x99; 8], 1200))),
            action: XdpAction::Drop,
            counters: &[DropInitialRateLimited],
            worker: None,
        },
        Case {
            name: "an Initial v2 from the flooding /24: rate-limited too",
            packet: flooder(udp4(&long_header(QUIC_V2, 0x10, &CLIENT_DCID, 1200))),
            action: XdpAction::Drop,
            counters: &[DropInitialRateLimited],
            worker: None,
        },
        Case {
            name: "Initial from the neighbouring /24 (192.0.3.0): unaffected",
            packet: from_v4([192, 0, 3, 2], udp4(&initial_v1(&CLIENT_DCID, 1200))),
            action: XdpAction::Pass,
            counters: LONG_HASHED,
            worker: hashed_worker(&CLIENT_DCID),
        },
        Case {
            name: "Initial from another network (198.51.100.0/24): unaffected",
            packet: from_v4([198, 51, 100, 2], udp4(&initial_v1(&CLIENT_DCID, 1200))),
            action: XdpAction::Pass,
            counters: LONG_HASHED,
            worker: hashed_worker(&CLIENT_DCID),
        },
        Case {
            name: "Handshake from the flooding /24: never limited",
            packet: flooder(udp4(&long_header(QUIC_V1, 0x20, &our_cid(3), 60))),
            action: XdpAction::Pass,
            counters: LONG_BY_CID,
            worker: Some(3),
        },
        Case {
            name: "0-RTT from the flooding /24: never limited",
            packet: flooder(udp4(&long_header(QUIC_V1, 0x10, &CLIENT_DCID, 1200))),
            action: XdpAction::Pass,
            counters: LONG_HASHED,
            worker: hashed_worker(&CLIENT_DCID),
        },
        Case {
            name: "short header from the flooding /24: never limited",
            packet: flooder(udp4(&short_header(0x41, &our_cid(2)))),
            action: XdpAction::Pass,
            counters: SHORT,
            worker: Some(2),
        },
        Case {
            name: "junk from the flooding /24 keeps its own drop reason",
            packet: flooder(udp4(&short_header(0x01, &our_cid(2)))),
            action: XdpAction::Drop,
            counters: &[DropFixedBit],
            worker: None,
        },
        Case {
            name: "a short Initial from the flooding /24 is dropped as short",
            packet: flooder(udp4(&initial_v1(&CLIENT_DCID, 300))),
            action: XdpAction::Drop,
            counters: &[DropShortInitial],
            worker: None,
        },
        Case {
            name: "non-QUIC from the flooding /24 passes",
            packet: from_v4(
                [192, 0, 2, 77],
                eth(ETH_IPV4, &ipv4(PROTO_UDP, &udp(53, &[0; 64]))),
            ),
            action: XdpAction::Pass,
            counters: NON_QUIC,
            worker: None,
        },
    ];
    run_table(&programs, &cases);
}

#[test]
#[ignore = "needs root"]
fn xdp_rate_limits_initials_per_ipv6_56() {
    use spooky_common::maps::SourcePrefix;
    use std::net::Ipv6Addr;
    let programs = load_rate_limited(FLOOD_RATE, FLOOD_BURST);
    // 40 Initials from all over 2001:db8:0::/56 (the fourth group 0x00..=0xff is inside).
    let flood = initials(FLOOD, udp6)
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let src = Ipv6Addr::new(0x2001, 0xdb8, 0, (i * 6) as u16, 0, 0, 0, i as u16 + 1);
            from_v6(src, f)
        })
        .collect::<Vec<_>>();
    flood_one_prefix(
        &programs,
        "ipv6 /56",
        &flood,
        SourcePrefix::ipv6(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0).octets()),
    );
    let flooder = |frame| from_v6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0xff, 1, 2, 3, 4), frame);
    let cases = vec![
        Case {
            name: "another Initial from the flooding /56: rate-limited",
            packet: flooder(udp6(&initial_v1(&[0x99; 8], 1200))),
            action: XdpAction::Drop,
            counters: &[DropInitialRateLimited],
            worker: None,
        },
        Case {
            name: "Initial from the next /56 (2001:db8:0:100::): unaffected",
            packet: from_v6(
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0x100, 0, 0, 0, 1),
                udp6(&initial_v1(&CLIENT_DCID, 1200)),
            ),
            action: XdpAction::Pass,
            counters: LONG_HASHED,
            worker: hashed_worker(&CLIENT_DCID),
        },
        Case {
            name: "Initial over IPv4 (another family): unaffected",
            packet: udp4(&initial_v1(&CLIENT_DCID, 1200)),
            action: XdpAction::Pass,
            counters: LONG_HASHED,
            worker: hashed_worker(&CLIENT_DCID),
        },
        Case {
            name: "Handshake from the flooding /56: never limited",
            packet: flooder(udp6(&long_header(QUIC_V1, 0x20, &our_cid(1), 60))),
            action: XdpAction::Pass,
            counters: LONG_BY_CID,
            worker: Some(1),
        },
        Case {
            name: "short header from the flooding /56: never limited",
            packet: flooder(udp6(&short_header(0x41, &our_cid(0)))),
            action: XdpAction::Pass,
            counters: SHORT,
            worker: Some(0),
        },
        Case {
            name: "junk from the flooding /56 keeps its own drop reason",
            packet: flooder(udp6(&short_header(0x00, &our_cid(0)))),
            action: XdpAction::Drop,
            counters: &[DropFixedBit],
            worker: None,
        },
    ];
    run_table(&programs, &cases);
}

/// Datagrams of unknown versions ask for Version Negotiation: they count against the same
/// per-prefix limit as Initials (otherwise a flood of them would bypass it).
#[test]
#[ignore = "needs root"]
fn xdp_rate_limits_unknown_versions_like_initials() {
    let programs = load_rate_limited(1, 2);
    let frame = from_v4(
        [192, 0, 2, 9],
        udp4(&long_header(0x1a2a_3a4a, 0, &CLIENT_DCID, 1200)),
    );
    let before = programs.stats().unwrap();
    let (passed, dropped) = run_all(&programs, &vec![frame; 10]);
    let after = programs.stats().unwrap();
    assert_eq!((passed, dropped), (2, 8), "a burst of 2, then the limit");
    assert_eq!(delta(&before, &after, DropInitialRateLimited), 8);
}

#[test]
#[ignore = "needs root"]
fn xdp_initial_rate_zero_limits_nothing() {
    let programs = load_rate_limited(0, 1);
    let flood = initials(FLOOD * 5, |p| from_v4([192, 0, 2, 9], udp4(p)));
    let before = programs.stats().unwrap();
    let (passed, dropped) = run_all(&programs, &flood);
    let after = programs.stats().unwrap();
    assert_eq!((passed, dropped), (flood.len() as u64, 0));
    assert_eq!(delta(&before, &after, DropInitialRateLimited), 0);
    assert_eq!(delta(&before, &after, QuicLong), flood.len() as u64);
    // With the limit off the program keeps no state at all.
    assert_eq!(
        programs.initial_limits().expect("read initial_limits"),
        vec![]
    );
}

#[test]
#[ignore = "needs root"]
fn xdp_initial_limit_refills_at_the_rate() {
    // 50 per second with a burst of 5: after the burst, waiting 100 ms buys ~5 more Initials
    // (not all 40: the rate holds), and a different source's bucket is its own.
    let programs = load_rate_limited(50, 5);
    let flood = initials(FLOOD, |p| from_v4([203, 0, 113, 5], udp4(p)));
    // The bucket refills with time, so the bounds follow the clock (a test thread preempted
    // on a busy machine gets tokens back): the burst, plus 50 a second of what elapsed.
    let t0 = std::time::Instant::now();
    let (passed, _) = run_all(&programs, &flood);
    let first_run = t0.elapsed().as_millis() as u64;
    let most = 5 + first_run * 50 / 1000 + 1;
    assert!(
        (5..=most).contains(&passed),
        "first burst ({first_run} ms): {passed} passed, want 5..={most}"
    );
    let started = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (passed, _) = run_all(&programs, &flood);
    let waited = started.elapsed().as_millis() as u64;
    let since_start = t0.elapsed().as_millis() as u64;
    let most = since_start * 50 / 1000 + 2;
    assert!(
        (4..=most).contains(&passed),
        "after {waited} ms: {passed} passed, want 4..={most}"
    );
}

/// Packets per second of the XDP program, measured in the kernel with `BPF_PROG_TEST_RUN`
/// and `repeat` (no NIC involved). `cargo xtask bench -- --scenarios xdp` runs it and
/// records the figures; by hand, in release mode:
/// `cargo test -p spooky --release --test it ebpf::xdp_benchmark -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
fn xdp_benchmark() {
    let mut programs = load_configured(FLAG_REDIRECT_CPU);
    programs.enable_cpu(0, 2048).expect("cpumap");
    let repeat = 5_000_000;
    // Initial limit off (rate 0) for these, as before the limit existed.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "valid short header (IPv4), steered by CID",
            udp4(&short_header(0x41, &our_cid(2))),
        ),
        (
            "valid Initial 1200 B (IPv6), hashed",
            udp6(&initial_v1(&CLIENT_DCID, 1200)),
        ),
        (
            "junk: fixed bit clear (dropped)",
            udp4(&short_header(0x01, &our_cid(1))),
        ),
        (
            "junk: Initial of 300 B (dropped)",
            udp4(&initial_v1(&CLIENT_DCID, 300)),
        ),
        (
            "non-QUIC UDP to port 53 (passed)",
            eth(ETH_IPV4, &ipv4(PROTO_UDP, &udp(53, &[0; 64]))),
        ),
    ];
    // The Initial rate limit on: a bucket so large that every Initial is within it (the
    // lookup + GCRA + store path), and one so small that all but the first are dropped.
    let mut within = load_configured(FLAG_REDIRECT_CPU);
    within.enable_cpu(0, 2048).expect("cpumap");
    within
        .set_config(&SteeringConfig {
            initial_rate: 10_000_000,
            initial_burst: 10_000_000,
            ..config(FLAG_REDIRECT_CPU)
        })
        .expect("config");
    let over = load_rate_limited(1, 1);
    let limited: Vec<(&str, &EbpfPrograms, Vec<u8>)> = vec![
        (
            "Initial 1200 B (IPv4), limit on, within: redirect",
            &within,
            udp4(&initial_v1(&CLIENT_DCID, 1200)),
        ),
        (
            "Initial 1200 B (IPv6), limit on, within: redirect",
            &within,
            udp6(&initial_v1(&CLIENT_DCID, 1200)),
        ),
        (
            "Initial 1200 B (IPv4), over the limit (dropped)",
            &over,
            udp4(&initial_v1(&CLIENT_DCID, 1200)),
        ),
        (
            "short header (IPv4), limit on (not looked at)",
            &within,
            udp4(&short_header(0x41, &our_cid(2))),
        ),
    ];
    println!(
        "{:<52} {:>10} {:>10} {:>14}",
        "packet", "verdict", "ns/pkt", "Mpps (1 CPU)"
    );
    let all = cases
        .into_iter()
        .map(|(name, packet)| (name, &programs, packet))
        .chain(limited);
    for (name, programs, packet) in all {
        let (action, per_run) = programs.bench_xdp(&packet, repeat).expect("test run");
        let ns = per_run.as_nanos().max(1) as f64;
        println!(
            "{name:<52} {:>10} {ns:>10} {:>14.2}",
            format!("{action:?}"),
            1_000.0 / ns
        );
        // For `cargo xtask bench` (scenario xdp).
        println!("xdp-bench: {name}|{action:?}|{ns}");
    }
    // Fleet forwarding moves the packet's start, so `repeat` would run it again on its own
    // output: one run per call instead, timed by the kernel, for the fleet paths and, measured
    // the same way, a path of the table above (the counters prove every run took its path).
    let a = fleet_host([0xab, 0xcd], HOST_A, [0x00, 0x02], HOST_B);
    let b = fleet_host([0x00, 0x02], HOST_B, [0xab, 0xcd], HOST_A);
    let client = fleet_client_frame();
    let wrapped = a.run_xdp(&client).unwrap().packet;
    let single: Vec<(&str, &EbpfPrograms, Vec<u8>, Counter)> = vec![
        (
            "short header (IPv4) of our own, one run per call",
            &a,
            udp4(&short_header(0x41, &cid_of_server([0xab, 0xcd]))),
            Counter::SteeredByCid,
        ),
        (
            "short header (IPv4) of another member: GUE + XDP_TX",
            &a,
            client,
            Counter::FleetForwarded,
        ),
        (
            "GUE from a member naming us: unwrapped, passed",
            &b,
            wrapped,
            Counter::FleetReceived,
        ),
    ];
    for (name, programs, packet, counter) in single {
        let before = programs.stats().unwrap();
        let runs = 200_000;
        let (action, per_run) = programs.bench_xdp_single(&packet, runs).expect("test run");
        let took = delta(&before, &programs.stats().unwrap(), counter);
        assert_eq!(
            took,
            u64::from(runs),
            "{name}: every run counted as {counter:?}"
        );
        let ns = per_run.as_nanos().max(1) as f64;
        let verdict = format!("{action:?}");
        println!("{name:<52} {verdict:>10} {ns:>10} {:>14.2}", 1_000.0 / ns);
        println!("xdp-bench: {name}|{verdict}|{ns}");
    }
}

/// A client's IPv4 short-header frame for member B's connection, with a valid IPv4
/// checksum (as a real client's packet has; the builders leave it 0).
fn fleet_client_frame() -> Vec<u8> {
    let mut client = udp4(&short_header(0x41, &cid_of_server([0x00, 0x02])));
    let header: [u8; 20] = client[14..34].try_into().unwrap();
    let sum = spooky_common::fleet::ipv4_checksum(&header);
    client[24..26].copy_from_slice(&sum);
    client
}

// ---------------------------------------------------------------------------------------------
// Fleet forwarding: packets of another member's connections go out again in GUE (XDP_TX);
// GUE packets from members naming us are unwrapped and passed up.

const FLEET_PORT: u16 = 6080;
const HOST_A: [u8; 4] = [10, 211, 1, 2];
const HOST_B: [u8; 4] = [10, 211, 2, 2];

fn sid_key(id: [u8; 2]) -> spooky_common::fleet::ServerIdKey {
    let mut k = spooky_common::fleet::ServerIdKey::default();
    k.id[..2].copy_from_slice(&id);
    k
}

/// A host of a two-member fleet: server id `own` at `addr`, the other member `other` at
/// `other_addr`.
fn fleet_host(own: [u8; 2], addr: [u8; 4], other: [u8; 2], other_addr: [u8; 4]) -> EbpfPrograms {
    use spooky_common::fleet::{FleetMember, MemberAddr};
    let mut programs = load_configured(spooky_common::maps::FLAG_FLEET);
    programs
        .set_config(&SteeringConfig {
            fleet_port: FLEET_PORT,
            fleet_source: addr,
            server_id: sid_key(own).id,
            ..config(spooky_common::maps::FLAG_FLEET)
        })
        .expect("config");
    programs
        .set_fleet_member(
            &sid_key(other),
            &FleetMember {
                addr: other_addr,
                port: FLEET_PORT.to_be_bytes(),
                reserved: [0; 2],
            },
        )
        .expect("member");
    for a in [addr, other_addr] {
        programs
            .set_fleet_source(&MemberAddr { addr: a })
            .expect("source");
    }
    programs
}

/// A connection ID of server `sid` in the test layout.
fn cid_of_server(sid: [u8; 2]) -> Vec<u8> {
    let mut cid = vec![0u8; CID_LEN as usize];
    assert_eq!(
        layout().write(&sid, 1, &[0x5a; 20], &mut cid),
        CID_LEN as usize
    );
    cid
}

#[test]
#[ignore = "needs root"]
fn xdp_forwards_other_members_packets_in_gue_and_unwraps_its_own() {
    let a = fleet_host([0xab, 0xcd], HOST_A, [0x00, 0x02], HOST_B);
    let b = fleet_host([0x00, 0x02], HOST_B, [0xab, 0xcd], HOST_A);
    let client = fleet_client_frame();

    // Host A: not its connection, member B's: wrapped and sent back out.
    let before = a.stats().unwrap();
    let out = a.run_xdp(&client).unwrap();
    assert_eq!(out.action, XdpAction::Tx);
    assert_eq!(
        delta(&before, &a.stats().unwrap(), Counter::FleetForwarded),
        1
    );
    let f = &out.packet;
    assert_eq!(f.len(), client.len() + 32);
    assert_eq!(
        (&f[..6], &f[6..12]),
        (&client[6..12], &client[..6]),
        "back to the sender's MAC"
    );
    assert_eq!(&f[12..14], &[8, 0]);
    let outer: [u8; 20] = f[14..34].try_into().unwrap();
    assert_eq!(
        spooky_common::fleet::ipv4_checksum(&outer),
        [outer[10], outer[11]]
    );
    assert_eq!((&outer[12..16], &outer[16..20]), (&HOST_A[..], &HOST_B[..]));
    assert_eq!(u16::from_be_bytes([f[36], f[37]]), FLEET_PORT);
    // User space's GUE decoder (spooky::quic::fleet) reads what XDP wrote.
    let inner = spooky::quic::fleet::decapsulate(&f[42..]).expect("GUE");
    assert_eq!(inner.client, "192.0.2.1:50000".parse().unwrap());
    assert_eq!(
        inner.server,
        format!("192.0.2.2:{QUIC_PORT}").parse().unwrap()
    );
    assert_eq!(&f[42..][inner.payload], &client[42..]);

    // Host B: from member A, naming B: unwrapped into the client's frame, passed up.
    let before = b.stats().unwrap();
    let back = b.run_xdp(f).unwrap();
    assert_eq!(back.action, XdpAction::Pass);
    assert_eq!(
        delta(&before, &b.stats().unwrap(), Counter::FleetReceived),
        1
    );
    assert_eq!(
        &back.packet[14..],
        &client[14..],
        "the client's packet as it was sent"
    );
    assert_eq!(&back.packet[12..14], &[8, 0]);

    // Never twice: host A's program receiving it (it names B, not A) drops it.
    let before = a.stats().unwrap();
    assert_eq!(a.run_xdp(f).unwrap().action, XdpAction::Drop);
    assert_eq!(
        delta(&before, &a.stats().unwrap(), Counter::FleetMalformed),
        1
    );
    // From an address that is no member: dropped.
    let mut stranger = f.clone();
    stranger[14 + 12..14 + 16].copy_from_slice(&[198, 51, 100, 9]);
    let before = b.stats().unwrap();
    assert_eq!(b.run_xdp(&stranger).unwrap().action, XdpAction::Drop);
    assert_eq!(
        delta(&before, &b.stats().unwrap(), Counter::FleetRefused),
        1
    );

    // Its own connections, and a server id no member has, are steered as before (user space
    // drops the latter without a reset); IPv6 is left to user space's forwarder.
    for (frame, why) in [
        (
            udp4(&short_header(0x41, &cid_of_server([0xab, 0xcd]))),
            "ours",
        ),
        (
            udp4(&short_header(0x41, &cid_of_server([0x00, 0x09]))),
            "no such member",
        ),
        (
            udp6(&short_header(0x41, &cid_of_server([0x00, 0x02]))),
            "IPv6",
        ),
    ] {
        let before = a.stats().unwrap();
        let run = a.run_xdp(&frame).unwrap();
        assert_ne!(run.action, XdpAction::Tx, "{why}");
        assert_eq!(run.packet, frame, "{why}: untouched");
        assert_eq!(
            delta(&before, &a.stats().unwrap(), Counter::FleetForwarded),
            0,
            "{why}"
        );
    }
}

/// A reload's member table reaches XDP: `FleetMaps::sync` (what a reload runs) removes a
/// member that left, adds one that joined, and the program forwards and accepts accordingly.
#[test]
#[ignore = "needs root"]
fn xdp_fleet_maps_follow_member_reloads() {
    use spooky_common::fleet::MemberAddr;
    const HOST_C: [u8; 4] = [10, 211, 3, 2];
    let mut a = fleet_host([0xab, 0xcd], HOST_A, [0x00, 0x02], HOST_B);
    let mut maps = a.take_fleet().expect("fleet maps");
    let (members, sources) = maps.read();
    assert_eq!(members.len(), 1);
    assert_eq!(sources.len(), 2);
    let to = |ip: [u8; 4]| std::net::SocketAddr::from((ip, FLEET_PORT));
    // The reloaded table: B left, C (server id 0009) joined; A lists itself.
    let fleet = spooky::config::Fleet {
        listen: to([0, 0, 0, 0]),
        members: vec![
            (vec![0xab, 0xcd], to(HOST_A)),
            (vec![0x00, 0x09], to(HOST_C)),
        ],
    };
    let entries = spooky::steering::fleet_entries(&[0xab, 0xcd], &fleet);
    assert_eq!(entries.own, Some(HOST_A));
    maps.sync(&entries.members, &entries.sources).expect("sync");
    let (now_members, mut now_sources) = maps.read();
    assert_eq!(now_members, entries.members);
    now_sources.sort_by_key(|s| s.addr);
    assert_eq!(
        now_sources,
        [MemberAddr { addr: HOST_A }, MemberAddr { addr: HOST_C }]
    );
    // B's connections are no longer forwarded from XDP (user space has the same table)…
    let to_b = udp4(&short_header(0x41, &cid_of_server([0x00, 0x02])));
    assert_ne!(a.run_xdp(&to_b).unwrap().action, XdpAction::Tx);
    // …C's are, to C.
    let to_c = a
        .run_xdp(&udp4(&short_header(0x41, &cid_of_server([0x00, 0x09]))))
        .unwrap();
    assert_eq!(to_c.action, XdpAction::Tx);
    assert_eq!(&to_c.packet[14 + 16..14 + 20], &HOST_C[..]);
    // B's GUE packets are refused now.
    let b = fleet_host([0x00, 0x02], HOST_B, [0xab, 0xcd], HOST_A);
    let from_b = b
        .run_xdp(&udp4(&short_header(0x41, &cid_of_server([0xab, 0xcd]))))
        .unwrap();
    assert_eq!(from_b.action, XdpAction::Tx);
    let before = a.stats().unwrap();
    assert_eq!(a.run_xdp(&from_b.packet).unwrap().action, XdpAction::Drop);
    assert_eq!(
        delta(&before, &a.stats().unwrap(), Counter::FleetRefused),
        1
    );
}
