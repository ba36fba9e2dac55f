//! Fuzz target `cid`: the connection-ID codec and every place that reads a DCID off a packet.
//!
//! Input: a 7-byte preamble, then `data` (used as a raw DCID, as a UDP payload and as an
//! Ethernet frame):
//!
//! ```text
//! byte 0     cid_len          byte 3     workers of the newest generation (mod 64)
//! byte 1     server_id_len    byte 4     workers of a draining generation (mod 64; 0: none)
//! byte 2     generation       byte 5     worker (for `CidLayout::write`)
//!            (top bit: the load balancer's layout)
//!                             byte 6     length of the output buffer given to `write`
//! ```
//!
//! Checked, for the layout the preamble names (bytes folded into the legal ranges; its
//! generation is the newest, the one before it drains, as during a takeover):
//! - `CidLayout::new` accepts exactly the layouts the QUIC-LB rules allow (raw bytes), and
//!   `CidLayout::for_load_balancer` those with room for the two host bytes twice;
//! - `fnv1a32` is FNV-1a over at most the first 20 bytes;
//! - `worker_of` / `place` never panic, `place` names a worker its generation has, only
//!   claims IDs whose first octet carries a routable generation (never for an Initial: its
//!   worker byte is not trusted, it is hashed within the live generation it names), and
//!   hashes every other DCID onto the newest generation;
//! - `write` then `worker_of` round-trips the worker, and `place` returns it when in range;
//!   `write_placed` mints an ID whose Initials `place` puts on its worker;
//! - the classic BPF reuseport program is well formed (the kernel's checks) and `interpret`
//!   agrees with `place` on every packet the XDP parser accepts;
//! - the XDP parser (`spooky_common::packet` and `quic`, the kernel program's own code: its
//!   reads take a plain address window, not an XDP context) agrees with a slice-based
//!   reference on the payload and on the frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use spooky::steering::{
    interpret, reuseport_program, GenerationSockets, Insn, SocketTable, NO_CHOICE,
};
use spooky_common::cid::{
    fnv1a32, fnv1a32_keyed, fnv1a32_step, place, CidLayout, LayoutError, Place, FNV_OFFSET,
    HOST_BYTES, MAX_CID_LEN, MAX_SERVER_ID_LEN, MIN_NONCE_LEN, UNROUTABLE_GENERATION,
};
use spooky_common::maps::Counter;

// The kernel program's own parsing code (it lives in spooky-common for both).
use spooky_common::packet::{locate_udp, Packet, UDP_HDR_LEN};
use spooky_common::quic::{self, Form};

const PREAMBLE: usize = 7;

fuzz_target!(|input: &[u8]| {
    let Some((pre, data)) = input.split_first_chunk::<PREAMBLE>() else {
        return;
    };
    let [cid_len, sid_len, generation, newest_workers, draining_workers, worker, out_len] = *pre;

    check_layout_rules(cid_len, sid_len, generation);
    check_lb_layout_rules(cid_len, sid_len, generation);
    check_fnv(data);

    let layout = legal_layout(cid_len, sid_len, generation);
    let table = takeover_table(&layout, newest_workers % 64, draining_workers % 64);
    for initial in [false, true] {
        check_worker_of_and_place(&layout, &table, data, initial);
    }
    check_write(&layout, &table, data, worker, out_len);

    let prog = reuseport_program(&layout, &table);
    check_program_shape(&prog);
    check_xdp_payload(&layout, &table, &prog, data);
    check_xdp_frame(&layout, data);
});

/// The socket group during a takeover: the drainer (the generation before the layout's)
/// joined first, so its workers are sockets `0..draining`; the newest's follow.
fn takeover_table(layout: &CidLayout, newest: u8, draining: u8) -> SocketTable {
    let newest_gen = layout.generation();
    let old_gen = (newest_gen + UNROUTABLE_GENERATION - 1) % UNROUTABLE_GENERATION;
    let mut generations = Vec::new();
    if draining > 0 {
        generations.push(GenerationSockets {
            generation: old_gen,
            sockets: (0..u32::from(draining)).collect(),
        });
    }
    let base = u32::from(draining);
    generations.push(GenerationSockets {
        generation: newest_gen,
        sockets: (base..base + u32::from(newest)).collect(),
    });
    SocketTable {
        newest: newest_gen,
        generations,
        // A key that varies with the input.
        hash_key: u32::from(newest).wrapping_mul(0x9e37_79b9) ^ u32::from(draining),
    }
}

fn workers_of(table: &SocketTable) -> impl Fn(u8) -> u32 + '_ {
    |g| table.of(g).map_or(0, |s| s.len() as u32)
}

/// The socket index `place` picks in `table`, or `NO_CHOICE`.
fn placed_socket(layout: &CidLayout, table: &SocketTable, dcid: &[u8], initial: bool) -> u32 {
    match place(
        layout,
        dcid,
        initial,
        table.hash_key,
        table.newest,
        workers_of(table),
    ) {
        Place::Worker {
            generation, worker, ..
        } => table.of(generation).expect("placed on a live generation")[worker as usize],
        Place::Unowned => NO_CHOICE,
    }
}

/// The reference for `CidLayout::new`: QUIC-LB plaintext layout within a QUIC v1 CID.
fn check_layout_rules(cid_len: u8, sid_len: u8, generation: u8) {
    let want = if usize::from(cid_len) > MAX_CID_LEN || cid_len < 2 + 1 + MIN_NONCE_LEN {
        Err(LayoutError::CidLen)
    } else if sid_len == 0
        || sid_len > MAX_SERVER_ID_LEN
        || usize::from(sid_len) + 2 + usize::from(MIN_NONCE_LEN) > usize::from(cid_len)
    {
        Err(LayoutError::ServerIdLen)
    } else if generation >= UNROUTABLE_GENERATION {
        Err(LayoutError::Generation)
    } else {
        Ok(())
    };
    let got = CidLayout::new(cid_len, sid_len, generation).map(|l| {
        assert_eq!(l.cid_len(), usize::from(cid_len));
        assert_eq!(l.server_id_len(), usize::from(sid_len));
        assert_eq!(l.generation(), generation);
    });
    assert_eq!(
        got, want,
        "CidLayout::new({cid_len}, {sid_len}, {generation})"
    );
}

/// The reference for `CidLayout::for_load_balancer`: the load balancer's first octet, server
/// id, nonce with generation, worker and 4 random bytes, then generation and worker again.
fn check_lb_layout_rules(cid_len: u8, sid_len: u8, generation: u8) {
    let host = 2 * usize::from(HOST_BYTES);
    let want = if usize::from(cid_len) > MAX_CID_LEN
        || usize::from(cid_len) < 2 + host + usize::from(MIN_NONCE_LEN)
    {
        Err(LayoutError::CidLen)
    } else if sid_len == 0
        || sid_len > MAX_SERVER_ID_LEN
        || 1 + usize::from(sid_len) + host + usize::from(MIN_NONCE_LEN) > usize::from(cid_len)
    {
        Err(LayoutError::ServerIdLen)
    } else if generation >= UNROUTABLE_GENERATION {
        Err(LayoutError::Generation)
    } else {
        Ok(())
    };
    let got = CidLayout::for_load_balancer(cid_len, sid_len, generation).map(|l| {
        assert!(l.is_for_load_balancer());
        assert_eq!(l.worker_offset(), usize::from(cid_len) - 1);
        assert_eq!(l.generation_offset(), usize::from(cid_len) - 2);
    });
    assert_eq!(
        got, want,
        "for_load_balancer({cid_len}, {sid_len}, {generation})"
    );
}

/// The layout the bytes name when it is legal, else one folded into the legal ranges; the
/// load balancer's when `generation`'s top bit is set.
fn legal_layout(cid_len: u8, sid_len: u8, generation: u8) -> CidLayout {
    if generation & 0x80 != 0 {
        let generation = (generation & 0x7f) % UNROUTABLE_GENERATION;
        if let Ok(layout) = CidLayout::for_load_balancer(cid_len, sid_len, generation) {
            return layout;
        }
        let min_len = 2 + 2 * HOST_BYTES + MIN_NONCE_LEN; // 10
        let cid_len = min_len + cid_len % (MAX_CID_LEN as u8 - min_len + 1);
        let max_sid = (cid_len - 1 - 2 * HOST_BYTES - MIN_NONCE_LEN).min(MAX_SERVER_ID_LEN);
        let sid_len = 1 + sid_len % max_sid;
        return match CidLayout::for_load_balancer(cid_len, sid_len, generation) {
            Ok(layout) => layout,
            Err(e) => panic!("legal lb layout ({cid_len}, {sid_len}, {generation}): {e:?}"),
        };
    }
    if let Ok(layout) = CidLayout::new(cid_len, sid_len, generation) {
        return layout;
    }
    let min_len = 2 + 1 + MIN_NONCE_LEN; // 7
    let cid_len = min_len + cid_len % (MAX_CID_LEN as u8 - min_len + 1);
    let max_sid = (cid_len - 2 - MIN_NONCE_LEN).min(MAX_SERVER_ID_LEN);
    let sid_len = 1 + sid_len % max_sid;
    let generation = generation % UNROUTABLE_GENERATION;
    match CidLayout::new(cid_len, sid_len, generation) {
        Ok(layout) => layout,
        Err(e) => panic!("legal layout ({cid_len}, {sid_len}, {generation}) refused: {e:?}"),
    }
}

fn check_fnv(data: &[u8]) {
    let want = data
        .iter()
        .take(MAX_CID_LEN)
        .fold(FNV_OFFSET, |h, &b| fnv1a32_step(h, b));
    assert_eq!(fnv1a32(data), want);
}

fn check_worker_of_and_place(layout: &CidLayout, table: &SocketTable, dcid: &[u8], initial: bool) {
    let named = layout.worker_of(dcid);
    if let Some(w) = named {
        assert_eq!(dcid.len(), layout.cid_len());
        if layout.is_for_load_balancer() {
            assert!(dcid[layout.generation_offset()] < UNROUTABLE_GENERATION);
        } else {
            assert_eq!(dcid[0] & 0x1f, layout.first_octet() & 0x1f);
            assert_ne!(dcid[0] >> 5, UNROUTABLE_GENERATION);
        }
        assert_eq!(dcid[layout.worker_offset()], w);
    }
    let workers = workers_of(table);
    let got = place(
        layout,
        dcid,
        initial,
        table.hash_key,
        table.newest,
        &workers,
    );
    let ours = layout.generation_of(dcid);
    match got {
        Place::Worker {
            generation,
            worker,
            by_cid,
        } => {
            assert!(worker < workers(generation), "{got:?} past its generation");
            if by_cid {
                assert!(
                    !initial,
                    "an Initial placed by its worker byte: {dcid:02x?}"
                );
                assert_eq!(ours, Some(generation));
                assert_eq!(dcid.get(layout.worker_offset()), Some(&(worker as u8)));
            } else {
                assert!(ours.is_none() || initial, "our ID hashed: {dcid:02x?}");
                // An Initial that looks like ours stays in the generation it names, if live.
                let within = ours.filter(|g| initial && workers(*g) > 0);
                assert_eq!(generation, within.unwrap_or(table.newest));
                let hash = fnv1a32_keyed(table.hash_key, dcid);
                assert_eq!(worker, hash % workers(generation));
            }
        }
        Place::Unowned => assert!(
            workers(table.newest) == 0 || (ours.is_some() && !initial),
            "unowned {dcid:02x?}"
        ),
    }
}

fn check_write(layout: &CidLayout, table: &SocketTable, data: &[u8], worker: u8, out_len: u8) {
    let mut out = [0u8; 2 * MAX_CID_LEN];
    let out_len = usize::from(out_len) % (out.len() + 1);
    let (server_id, nonce) = data.split_at(data.len().min(layout.server_id_len()));
    let sid_end = 1 + layout.server_id_len();
    let lb = layout.is_for_load_balancer();
    // Spooky's: worker byte after the server id; the load balancer's: generation and worker
    // there and at the end.
    let fixed = if lb { 2 * usize::from(HOST_BYTES) } else { 1 };
    let nonce_len = layout.cid_len() - sid_end - fixed;
    let n = layout.write(server_id, worker, nonce, &mut out[..out_len]);
    if out_len < layout.cid_len() || nonce.len() < nonce_len {
        assert_eq!(n, 0);
        return;
    }
    assert_eq!(n, layout.cid_len());
    let cid = &out[..n];
    assert_eq!(cid[0], if lb { 0 } else { layout.first_octet() });
    for (i, &b) in cid[1..sid_end].iter().enumerate() {
        assert_eq!(b, server_id.get(i).copied().unwrap_or(0));
    }
    let host = [layout.generation(), worker];
    if lb {
        assert_eq!(&cid[sid_end..sid_end + 2], &host);
        assert_eq!(&cid[sid_end + 2..n - 2], &nonce[..nonce_len]);
        assert_eq!(&cid[n - 2..], &host);
    } else {
        assert_eq!(cid[sid_end], worker);
        assert_eq!(&cid[sid_end + 1..], &nonce[..nonce_len]);
    }
    assert_eq!(layout.worker_of(cid), Some(worker));
    // Minted for Initials: the hash that places Initials names the worker.
    let live = workers_of(table)(layout.generation());
    if live > 0 && u32::from(worker) < live {
        let mut placed = [0u8; MAX_CID_LEN];
        let mut draws = 0u32;
        let fill = |nonce: &mut [u8]| {
            draws += 1;
            // Every byte mixed on its own: FNV modulo a power of two is linear in the low
            // bits of the bytes, so bytes that repeat one pattern can cancel out.
            for (i, b) in nonce.iter_mut().enumerate() {
                let mut x = draws
                    .wrapping_mul(0x9e37_79b9)
                    .wrapping_add((i as u32 + 1).wrapping_mul(0x85eb_ca6b));
                x ^= x >> 15;
                x = x.wrapping_mul(0x2c1b_3c6d);
                x ^= x >> 12;
                *b = data.get(i).copied().unwrap_or(0) ^ (x >> 24) as u8;
            }
        };
        let n = layout.write_placed(server_id, worker, table.hash_key, live, fill, &mut placed);
        assert_eq!(n, layout.cid_len());
        let got = place(
            layout,
            &placed[..n],
            true,
            table.hash_key,
            table.newest,
            workers_of(table),
        );
        let want = Place::Worker {
            generation: layout.generation(),
            worker: u32::from(worker),
            by_cid: false,
        };
        assert_eq!(
            got, want,
            "a minted ID's Initials go elsewhere ({draws} draws)"
        );
    }
    let got = place(
        layout,
        cid,
        false,
        table.hash_key,
        table.newest,
        workers_of(table),
    );
    if u32::from(worker) < workers_of(table)(layout.generation()) {
        let want = Place::Worker {
            generation: layout.generation(),
            worker: u32::from(worker),
            by_cid: true,
        };
        assert_eq!(got, want);
    } else {
        assert_eq!(got, Place::Unowned);
    }
}

const BPF_MAXINSNS: usize = 4096;
const BPF_MEMWORDS: u32 = 16;

/// What the kernel's classic BPF checker insists on, for the opcodes the program uses: a
/// bounded length, jumps that land inside the program, scratch memory in range, no division
/// by zero, and a return as the last instruction.
fn check_program_shape(prog: &[Insn]) {
    assert!(!prog.is_empty() && prog.len() <= BPF_MAXINSNS);
    for (pc, ins) in prog.iter().enumerate() {
        let next = pc + 1;
        match ins.code {
            0x05 => assert!(
                next + ins.k as usize <= prog.len() - 1,
                "ja out of range at {pc}"
            ),
            0x15 | 0x25 | 0x35 | 0x45 => {
                assert!(
                    next + usize::from(ins.jt) < prog.len(),
                    "jt out of range at {pc}"
                );
                assert!(
                    next + usize::from(ins.jf) < prog.len(),
                    "jf out of range at {pc}"
                );
            }
            0x60 | 0x02 => assert!(ins.k < BPF_MEMWORDS, "scratch slot {} at {pc}", ins.k),
            0x94 => assert_ne!(ins.k, 0, "mod by zero at {pc}"),
            0x20 | 0x30 | 0x50 | 0x00 | 0x07 | 0x0c | 0xac | 0x24 | 0x54 | 0x74 | 0x06 | 0x16 => {}
            code => panic!("unexpected opcode {code:#x} at {pc}"),
        }
    }
    assert!(matches!(prog.last().map(|i| i.code), Some(0x06 | 0x16)));
}

/// The XDP parser's answer, written over a slice from RFC 9000 §17 / RFC 9369.
fn reference_parse(payload: &[u8], short_dcid_len: usize) -> Result<(Form, &[u8]), Counter> {
    let first = *payload.first().ok_or(Counter::DropTruncated)?;
    if first & 0x40 == 0 {
        return Err(Counter::DropFixedBit);
    }
    if first & 0x80 == 0 {
        if short_dcid_len > MAX_CID_LEN {
            return Err(Counter::DropTruncated);
        }
        let dcid = payload
            .get(1..1 + short_dcid_len)
            .ok_or(Counter::DropTruncated)?;
        return Ok((Form::Short, dcid));
    }
    let prefix = payload.get(..6).ok_or(Counter::DropTruncated)?;
    let version = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
    let dcid_len = usize::from(prefix[5]);
    if dcid_len > MAX_CID_LEN {
        return Err(Counter::DropDcidTooLong);
    }
    let dcid = payload.get(6..6 + dcid_len).ok_or(Counter::DropTruncated)?;
    let packet_type = (first >> 4) & 0b11;
    let initial =
        (version == 1 && packet_type == 0) || (version == 0x6b33_43cf && packet_type == 1);
    let unknown_version = version != 1 && version != 0x6b33_43cf && version != 0;
    if (initial || unknown_version) && payload.len() < quic::MIN_INITIAL_DATAGRAM {
        return Err(Counter::DropShortInitial);
    }
    Ok((Form::Long, dcid))
}

/// The XDP parser over `bytes[offset..offset + payload_len]` inside the window `bytes`.
fn xdp_parse(
    bytes: &[u8],
    offset: usize,
    payload_len: usize,
    short_dcid_len: usize,
) -> Result<quic::QuicHeader, Counter> {
    quic::parse(&Packet::over(bytes), offset, payload_len, short_dcid_len)
}

fn same(got: &Result<quic::QuicHeader, Counter>, want: &Result<(Form, &[u8]), Counter>) -> bool {
    match (got, want) {
        (Ok(h), Ok((form, dcid))) => h.form == *form && h.dcid() == *dcid,
        (Err(a), Err(b)) => a == b,
        _ => false,
    }
}

fn describe(r: &Result<quic::QuicHeader, Counter>) -> String {
    match r {
        Ok(h) => format!(
            "Ok({}, {:02x?})",
            if h.form == Form::Long {
                "long"
            } else {
                "short"
            },
            h.dcid()
        ),
        Err(c) => format!("Err({c:?})"),
    }
}

fn describe_reference(r: &Result<(Form, &[u8]), Counter>) -> String {
    match r {
        Ok((form, dcid)) => format!(
            "Ok({}, {dcid:02x?})",
            if *form == Form::Long { "long" } else { "short" }
        ),
        Err(c) => format!("Err({c:?})"),
    }
}

/// The XDP parser on the datagram as a bare UDP payload; for every packet it accepts, the
/// classic BPF program picks the socket `place` picks for the DCID it parsed.
fn check_xdp_payload(layout: &CidLayout, table: &SocketTable, prog: &[Insn], payload: &[u8]) {
    let got = xdp_parse(payload, 0, payload.len(), layout.cid_len());
    let want = reference_parse(payload, layout.cid_len());
    assert!(
        same(&got, &want),
        "xdp parse {} != reference {}",
        describe(&got),
        describe_reference(&want)
    );
    if let Ok(h) = &got {
        let want = placed_socket(layout, table, h.dcid(), h.initial);
        assert_eq!(
            interpret(prog, payload),
            Some(want),
            "cBPF and place disagree ({:02x?})",
            h.dcid()
        );
    }
}

/// The reference for `locate_udp`: Ethernet, up to two 802.1Q/802.1ad tags, IPv4 (options
/// skipped; a first fragment marked, a later one refused) or IPv6 through up to four
/// hop-by-hop, routing, destination-options and fragment headers.
fn reference_locate_udp(frame: &[u8]) -> Option<(usize, u16, bool)> {
    let be16 = |at: usize| {
        frame
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let mut ether_type = be16(12)?;
    let mut offset = 14;
    for _ in 0..2 {
        if ether_type != 0x8100 && ether_type != 0x88a8 {
            break;
        }
        ether_type = be16(offset + 2)?;
        offset += 4;
    }
    let (udp, fragment) = match ether_type {
        0x0800 => {
            let ip = frame.get(offset..offset + 20)?;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let frag = u16::from_be_bytes([ip[6], ip[7]]);
            if ip[0] >> 4 != 4 || ip[9] != 17 || ihl < 20 || frag & 0x1fff != 0 {
                return None;
            }
            (offset + ihl, frag & 0x2000 != 0)
        }
        0x86dd => {
            let ip = frame.get(offset..offset + 40)?;
            if ip[0] >> 4 != 6 {
                return None;
            }
            let (mut next, mut at, mut fragment) = (ip[6], offset + 40, false);
            for _ in 0..4 {
                match next {
                    17 => break,
                    0 | 43 | 60 => {
                        let h = frame.get(at..at + 2)?;
                        next = h[0];
                        at += (usize::from(h[1]) + 1) * 8;
                    }
                    44 => {
                        let h = frame.get(at..at + 4)?;
                        if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                            return None;
                        }
                        fragment = true;
                        next = h[0];
                        at += 8;
                    }
                    _ => return None,
                }
            }
            if next != 17 {
                return None;
            }
            (at, fragment)
        }
        _ => return None,
    };
    frame.get(udp..udp + 8)?;
    Some((udp, be16(udp + 2)?, fragment))
}

/// The XDP program's walk over a whole frame: down to UDP, the UDP length checks, then the
/// QUIC header inside the UDP payload (the glue mirrors `try_spooky_xdp`).
fn check_xdp_frame(layout: &CidLayout, frame: &[u8]) {
    let pkt = Packet::over(frame);
    let got = locate_udp(&pkt).map(|l| (l.offset, l.dst_port, l.fragment));
    assert_eq!(got, reference_locate_udp(frame), "locate_udp");
    let Some((udp_offset, _, _)) = got else {
        return;
    };
    let udp_len = frame
        .get(udp_offset + 4..udp_offset + 6)
        .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    if udp_len <= UDP_HDR_LEN || udp_offset + udp_len > frame.len() {
        return; // dropped as truncated before any QUIC parsing
    }
    let payload_at = udp_offset + UDP_HDR_LEN;
    let payload_len = udp_len - UDP_HDR_LEN;
    let got = xdp_parse(frame, payload_at, payload_len, layout.cid_len());
    let want = reference_parse(
        &frame[payload_at..payload_at + payload_len],
        layout.cid_len(),
    );
    assert!(
        same(&got, &want),
        "xdp parse in frame {} != reference {}",
        describe(&got),
        describe_reference(&want)
    );
}
