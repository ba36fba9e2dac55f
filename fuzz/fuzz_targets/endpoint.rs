//! Fuzz target `endpoint`: the admission decision for datagrams no connection claims
//! (`spooky::quic::endpoint`), over a sequence of datagrams so that its state (open
//! connections, per-address counts, rates, Retry tokens) carries from one to the next.
//!
//! Input: an 11-byte preamble, then datagram records until the input runs out:
//!
//! ```text
//! byte 0     flags: bit 0 the kernel places Initials, bit 1 draining, bits 2-3 retry
//!            (off, always, auto at 1 new connection/s, off), bit 4 IPv6 clients,
//!            bit 5 a takeover (the newest generation is the next one, with 2 workers)
//! byte 1     workers (1 + b % 8)      byte 2   this worker (mod workers)
//! byte 3     dead workers (bit mask; never this one)
//! byte 4     own generation (mod 7)   byte 5   max connections   byte 6   max per address
//! bytes 7-10 hash key (u32 LE)
//! record     ctl: u8 (bit 0 forwarded, bit 1 a second passes first, bit 2 close the oldest
//!            accepted connection first, bit 3 from a second client address, bit 4 from a
//!            third, in the first's /64 when IPv6 and in its /24 when IPv4),
//!            pad: u16 LE (datagram bytes beyond the header given), len: u8, bytes[len]
//! ```
//!
//! Checked, for every datagram whose header quiche parses:
//! - `admit` never panics;
//! - `Forward` only for a datagram no other worker forwarded, to another worker of this
//!   process that is alive;
//! - a Stateless Reset only answers a short header, in a datagram larger than a reset, and
//!   never one whose DCID has our layout and another server id (dropped as `OtherServer`,
//!   only for such DCIDs and never for an Initial);
//! - Version Negotiation only answers a long header of an unsupported version in a datagram of
//!   at least 1200 bytes;
//! - `Accept` only for an Initial of a supported version in a datagram of at least 1200 bytes,
//!   within the connection limits (counted here independently: IPv4 by address, IPv6 by
//!   /64), not while draining unless
//!   the DCID is ours, with an original DCID exactly when a token was given, never without a
//!   token when Retry is always on; `Refuse` only for Initials;
//! - a Retry only for a tokenless Initial with Retry on; the client's answer (an Initial to the
//!   CID we chose, carrying the token, from the same address) is accepted with the original
//!   DCID; the same token from another address is dropped as invalid, and on an Initial to
//!   another of this worker's CIDs (a connection ID seen on the path) it is never accepted.

#![no_main]

use libfuzzer_sys::fuzz_target;
use quiche::{ConnectionId, Header, Type};
use spooky::config::RetryMode;
use spooky::keys::{KeyRing, Keys};
use spooky::quic::endpoint::{
    Decision, DropReason, Endpoint, Generations, Limits, Now, MIN_INITIAL_DATAGRAM, RESET_LEN,
};
use spooky::quic::ids::IdFormat;
use spooky_common::cid::CidLayout;
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const PREAMBLE: usize = 11;
/// Our server id (the Retry round trip writes our IDs with it).
const SERVER_ID: [u8; 2] = [0x5a, 0x5a];
const CID_LEN: u8 = 16;
const UNIX_START: u64 = 1_764_000_000;

fn keys() -> &'static KeyRing {
    static KEYS: OnceLock<KeyRing> = OnceLock::new();
    KEYS.get_or_init(|| {
        let hex = "5a".repeat(32);
        let keys = Keys::parse(&format!("reset: {hex}\ntoken: {hex}\n")).expect("keys parse");
        KeyRing::from(&keys)
    })
}

struct Setup {
    worker: usize,
    workers: usize,
    dead: u64,
    layout: CidLayout,
    draining: bool,
    retry: RetryMode,
    limits: Limits,
    ipv6: bool,
    hash_key: u32,
}

fuzz_target!(|input: &[u8]| {
    let Some((pre, mut rest)) = input.split_first_chunk::<PREAMBLE>() else {
        return;
    };
    let setup = setup(pre);
    let own = setup.layout.generation();
    let mut generations = Generations::alone(own, setup.workers);
    for w in (0..64).filter(|w| setup.dead & (1 << w) != 0) {
        generations.dead.insert(w);
    }
    generations.hash_key = setup.hash_key;
    if pre[0] & 32 != 0 {
        let next = (own + 1) % 7;
        generations.newest = next;
        generations.workers[usize::from(next)] = 2;
    }
    let start = Instant::now();
    let mut endpoint = Endpoint::new(
        setup.worker,
        generations,
        pre[0] & 1 != 0,
        setup.layout,
        setup.limits,
        start,
    );
    let ids = IdFormat::new(
        &spooky::config::CidFormat::Spooky,
        CID_LEN,
        SERVER_ID.len() as u8,
        setup.layout.generation(),
    )
    .expect("the layout's format");
    endpoint.set_server_id(std::sync::Arc::new(ids), &SERVER_ID);
    if setup.draining {
        endpoint.drain();
    }
    let mut elapsed = 0u64;
    // Connections accepted and not yet closed, oldest first (by client address).
    let mut open: VecDeque<IpAddr> = VecDeque::new();

    while let Some((ctl, pad, packet, tail)) = record(rest) {
        rest = tail;
        if ctl & 2 != 0 {
            elapsed += 1;
        }
        if ctl & 4 != 0 {
            if let Some(ip) = open.pop_front() {
                endpoint.closed(ip);
            }
        }
        let from = client(setup.ipv6, (ctl >> 3) & 3);
        let now = Now {
            instant: start + Duration::from_millis(elapsed * 1100),
            unix_secs: UNIX_START + elapsed,
        };
        let mut buf = packet.to_vec();
        let Ok(hdr) = Header::from_slice(&mut buf, setup.layout.cid_len()) else {
            continue;
        };
        let len = packet.len() + usize::from(pad);
        let forwarded = ctl & 1 != 0;
        let decision = endpoint.admit(&hdr, len, from, forwarded, keys(), now, || {
            ConnectionId::from_vec(mint(&setup, 1))
        });
        check(&setup, &hdr, len, from, forwarded, &open, &decision);
        match decision {
            Decision::Accept { .. } => {
                endpoint.opened(from.ip());
                open.push_back(from.ip());
            }
            Decision::Retry { scid, token } => {
                retry_round_trip(&setup, &mut endpoint, &hdr, &scid, &token, from, now);
                endpoint.opened(from.ip());
                open.push_back(from.ip());
            }
            _ => {}
        }
        assert_eq!(endpoint.open(), open.len(), "open connections miscounted");
    }
});

fn setup(pre: &[u8; PREAMBLE]) -> Setup {
    let workers = usize::from(pre[1] % 8) + 1;
    let worker = usize::from(pre[2]) % workers;
    let all = (1u64 << workers) - 1;
    let dead = u64::from(pre[3]) & all & !(1 << worker);
    let layout = CidLayout::new(CID_LEN, 2, pre[4] % 7).expect("a legal layout");
    let retry = match (pre[0] >> 2) & 3 {
        1 => RetryMode::Always,
        2 => RetryMode::Auto {
            new_connections_per_sec: 1,
        },
        _ => RetryMode::Off,
    };
    Setup {
        worker,
        workers,
        dead,
        layout,
        draining: pre[0] & 2 != 0,
        retry,
        limits: Limits {
            connections: usize::from(pre[5]),
            per_address: u32::from(pre[6]),
            retry,
        },
        ipv6: pre[0] & 16 != 0,
        hash_key: u32::from_le_bytes([pre[7], pre[8], pre[9], pre[10]]),
    }
}

/// `ctl, pad (u16 LE), len, bytes` off the front of `input`.
fn record(input: &[u8]) -> Option<(u8, u16, &[u8], &[u8])> {
    let (&ctl, rest) = input.split_first()?;
    let (pad, rest) = rest.split_first_chunk::<2>()?;
    let (&n, rest) = rest.split_first()?;
    let (packet, rest) = rest.split_at_checked(usize::from(n))?;
    Some((ctl, u16::from_le_bytes(*pad), packet, rest))
}

/// Client `which` (0 the first; 1 the second, 2 and 3 the third, near the first).
fn client(ipv6: bool, which: u8) -> SocketAddr {
    let ip = match (ipv6, which) {
        (false, 0) => IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        (false, 1) => IpAddr::V4(Ipv4Addr::new(198, 51, 100, 8)),
        (false, _) => IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)),
        (true, 0) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0, 0, 0, 7)),
        (true, 1) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 8, 0, 0, 0, 8)),
        (true, _) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0xab, 0, 0, 9)),
    };
    SocketAddr::new(ip, 50_000)
}

/// Whether two clients count as one for the per-address limit: the same IPv4 address, or the
/// same IPv6 /64.
fn counted_together(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V6(a), IpAddr::V6(b)) => a.octets()[..8] == b.octets()[..8],
        _ => a == b,
    }
}

fn check(
    setup: &Setup,
    hdr: &Header,
    len: usize,
    from: SocketAddr,
    forwarded: bool,
    open: &VecDeque<IpAddr>,
    decision: &Decision,
) {
    let token = hdr.token.as_deref().unwrap_or(&[]);
    let ours = setup.layout.generation_of(&hdr.dcid) == Some(setup.layout.generation());
    match decision {
        Decision::Forward { owner } => {
            assert!(!forwarded, "a forwarded datagram was forwarded again");
            assert!(
                *owner < setup.workers,
                "forwarded to worker {owner} of {}",
                setup.workers
            );
            assert_ne!(*owner, setup.worker, "forwarded to itself");
            assert_eq!(
                setup.dead & (1 << owner),
                0,
                "forwarded to dead worker {owner}"
            );
        }
        Decision::Reset { .. } => {
            assert_eq!(hdr.ty, Type::Short, "a reset answers a long header");
            assert!(len > RESET_LEN, "a reset answers a {len}-byte datagram");
            let theirs = setup.layout.generation_of(&hdr.dcid).is_some()
                && hdr.dcid.get(1..3) != Some(&SERVER_ID[..]);
            assert!(!theirs, "a reset for another server's connection");
        }
        Decision::NegotiateVersion => {
            assert_ne!(hdr.ty, Type::Short);
            assert!(!quiche::version_is_supported(hdr.version));
            assert!(
                len >= MIN_INITIAL_DATAGRAM,
                "VN answers {len} bytes: amplification"
            );
        }
        Decision::Accept { odcid } => {
            assert_eq!(hdr.ty, Type::Initial, "accepted a {:?} packet", hdr.ty);
            assert!(quiche::version_is_supported(hdr.version));
            assert!(
                len >= MIN_INITIAL_DATAGRAM,
                "accepted a {len}-byte datagram"
            );
            assert!(
                !setup.draining || ours,
                "accepted a new connection while draining"
            );
            assert!(
                open.len() <= setup.limits.connections,
                "over max connections"
            );
            let from_here = open
                .iter()
                .filter(|ip| counted_together(**ip, from.ip()))
                .count();
            assert!(
                from_here < setup.limits.per_address as usize,
                "over max connections per address"
            );
            assert_eq!(odcid.is_some(), !token.is_empty(), "odcid without token");
            if token.is_empty() {
                assert_ne!(setup.retry, RetryMode::Always, "accepted without Retry");
            }
        }
        Decision::Retry { .. } => {
            assert_eq!(hdr.ty, Type::Initial);
            assert!(token.is_empty(), "a Retry answers a token");
            assert_ne!(setup.retry, RetryMode::Off, "a Retry with Retry off");
            assert!(len >= MIN_INITIAL_DATAGRAM);
        }
        Decision::Refuse(_) => assert_eq!(hdr.ty, Type::Initial, "refused a non-Initial"),
        Decision::Drop(DropReason::ShortInitial) => assert!(len < MIN_INITIAL_DATAGRAM),
        Decision::Drop(DropReason::OtherServer) => {
            assert_ne!(hdr.ty, Type::Initial, "an Initial's DCID is the client's");
            assert!(setup.layout.generation_of(&hdr.dcid).is_some());
            assert_ne!(
                hdr.dcid.get(1..3),
                Some(&SERVER_ID[..]),
                "our own server id"
            );
        }
        Decision::Drop(_) => {}
    }
}

/// One of this worker's CIDs, minted as the worker mints the ones Initials carry (so that
/// Initials to it hash here), the nonce drawn from `draw`: every bit of every byte varies from
/// draw to draw, as the worker's random ones do (FNV modulo a power of two only sees the low
/// bits of each byte).
fn mint(setup: &Setup, draw: u32) -> Vec<u8> {
    let mut scid = [0u8; CID_LEN as usize];
    let mut draw = draw;
    let fill = |nonce: &mut [u8]| {
        draw = draw.wrapping_add(0x6d2b_79f5);
        for (i, b) in nonce.iter_mut().enumerate() {
            let x = draw.wrapping_mul(0x9e37_79b9) ^ (i as u32 + 1).wrapping_mul(0x85eb_ca6b);
            *b = (x ^ (x >> 15)).wrapping_mul(0x2c1b_3c6d).to_le_bytes()[3];
        }
    };
    let written = setup.layout.write_placed(
        &SERVER_ID,
        setup.worker as u8,
        setup.hash_key,
        setup.workers as u32,
        fill,
        &mut scid,
    );
    assert_eq!(written, scid.len(), "the layout writes a whole CID");
    scid.to_vec()
}

/// The client answers a Retry: an Initial to the CID the server chose (`scid`, one of this
/// worker's), carrying the token, from the same address; it must be accepted with the
/// original DCID. The same token from another address must not be, nor on an Initial to
/// another of this worker's CIDs.
fn retry_round_trip(
    setup: &Setup,
    endpoint: &mut Endpoint,
    hdr: &Header,
    scid: &[u8],
    token: &[u8],
    from: SocketAddr,
    now: Now,
) {
    let never = || -> ConnectionId<'static> { panic!("a Retry answered a token") };
    let other = client(!setup.ipv6, 0);
    let stolen = answer(hdr.version, scid, token);
    let mut buf = stolen.clone();
    let stolen_hdr = Header::from_slice(&mut buf, scid.len()).expect("our Initial parses");
    let d = endpoint.admit(
        &stolen_hdr,
        MIN_INITIAL_DATAGRAM,
        other,
        false,
        keys(),
        now,
        never,
    );
    assert_eq!(
        d,
        Decision::Drop(DropReason::InvalidToken),
        "a Retry token worked from another address"
    );
    let victim = mint(setup, 2);
    if victim != scid {
        let mut buf = answer(hdr.version, &victim, token);
        let victim_hdr = Header::from_slice(&mut buf, scid.len()).expect("our Initial parses");
        let d = endpoint.admit(
            &victim_hdr,
            MIN_INITIAL_DATAGRAM,
            from,
            false,
            keys(),
            now,
            never,
        );
        assert!(
            !matches!(d, Decision::Accept { .. }),
            "a Retry token was accepted on an Initial to another connection ID"
        );
    }
    let mut buf = stolen;
    let answer_hdr = Header::from_slice(&mut buf, scid.len()).expect("our Initial parses");
    match endpoint.admit(
        &answer_hdr,
        MIN_INITIAL_DATAGRAM,
        from,
        false,
        keys(),
        now,
        never,
    ) {
        Decision::Accept { odcid: Some(odcid) } => {
            assert_eq!(
                odcid.as_ref(),
                hdr.dcid.as_ref(),
                "the original DCID changed"
            );
        }
        other => panic!("the answer to our Retry was not accepted: {other:?}"),
    }
}

/// A client Initial header of `version` to `dcid` with `token` (the payload is not parsed).
fn answer(version: u32, dcid: &[u8], token: &[u8]) -> Vec<u8> {
    let mut p = vec![0xc0];
    p.extend_from_slice(&version.to_be_bytes());
    p.push(dcid.len() as u8);
    p.extend_from_slice(dcid);
    p.push(8);
    p.extend_from_slice(&[0xcc; 8]);
    varint(token.len() as u64, &mut p);
    p.extend_from_slice(token);
    varint(1100, &mut p);
    p.resize(p.len() + 32, 0);
    p
}

fn varint(v: u64, out: &mut Vec<u8>) {
    match v {
        0..=63 => out.push(v as u8),
        64..=16383 => out.extend_from_slice(&(0x4000 | v as u16).to_be_bytes()),
        _ => out.extend_from_slice(&(0x8000_0000 | v as u32).to_be_bytes()),
    }
}
