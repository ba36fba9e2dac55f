//! The classic BPF program against the one placement rule, `spooky_common::cid::place`, in the
//! interpreter: every kind of packet, every socket table shape (one process; two during a
//! takeover, sockets in any order).

use super::*;
use spooky_common::cid::{self, Place};

fn layout(generation: u8) -> CidLayout {
    CidLayout::new(16, 2, generation).unwrap()
}

/// Both layouts: Spooky's and the load balancer's (generation and worker at the end).
fn layouts() -> [CidLayout; 2] {
    [layout(0), CidLayout::for_load_balancer(16, 2, 0).unwrap()]
}

/// Where `place` says a packet with `dcid` belongs, as a socket index of `table`.
fn expected(l: &CidLayout, table: &SocketTable, dcid: &[u8], initial: bool) -> u32 {
    let workers = |g| table.of(g).map_or(0, |s| s.len() as u32);
    match cid::place(l, dcid, initial, table.hash_key, table.newest, workers) {
        Place::Worker {
            generation, worker, ..
        } => table.of(generation).unwrap()[worker as usize],
        Place::Unowned => NO_CHOICE,
    }
}

fn cid(l: &CidLayout, generation: u8, worker: u8) -> Vec<u8> {
    let mut out = [0u8; 16];
    l.with_generation(generation)
        .unwrap()
        .write(&[0, 1], worker, &[0xaa; 16], &mut out);
    out.to_vec()
}

fn short(dcid: &[u8]) -> Vec<u8> {
    let mut p = vec![0x41];
    p.extend_from_slice(dcid);
    p.extend_from_slice(&[0; 30]);
    p
}

/// A long header: `first` byte, `version`, `dcid`, an 8-byte SCID, then (for Initials) the
/// token length byte `token`, padded to 1200.
fn long(first: u8, version: u32, dcid: &[u8], token: u8) -> Vec<u8> {
    let mut p = vec![first];
    p.extend_from_slice(&version.to_be_bytes());
    p.push(dcid.len() as u8);
    p.extend_from_slice(dcid);
    p.push(8);
    p.extend_from_slice(&[9; 8]);
    p.push(token);
    p.resize(1200, 0);
    p
}

fn tables() -> Vec<SocketTable> {
    vec![
        SocketTable::alone(0, 1),
        SocketTable::alone(0, 3),
        SocketTable::alone(5, 7),
        // A takeover: generation 2 (4 workers, sockets 0..4) drains, 3 (2 workers) is newest.
        SocketTable {
            newest: 3,
            generations: vec![
                GenerationSockets {
                    generation: 2,
                    sockets: vec![0, 1, 2, 3],
                },
                GenerationSockets {
                    generation: 3,
                    sockets: vec![4, 5],
                },
            ],
            hash_key: 0x5eed_0001,
        },
        // After the drainer left: the group's order changed, a probe found it.
        SocketTable {
            newest: 3,
            generations: vec![GenerationSockets {
                generation: 3,
                sockets: vec![1, 0],
            }],
            hash_key: 0xdead_beef,
        },
    ]
}

#[test]
fn program_agrees_with_place_for_every_kind_of_packet() {
    for (l, table) in layouts()
        .into_iter()
        .flat_map(|l| tables().into_iter().map(move |t| (l, t)))
    {
        let prog = reuseport_program(&l, &table);
        assert!(prog.len() < 4096, "{} instructions", prog.len());
        let run = |pkt: &[u8]| interpret(&prog, pkt).unwrap_or(0);
        for g in 0..7u8 {
            for w in [0u8, 1, 3, 6, 200] {
                let id = cid(&l, g, w);
                let want = expected(&l, &table, &id, false);
                assert_eq!(run(&short(&id)), want, "short g{g} w{w} {table:?}");
                for (first, version) in [(0xe0, 1), (0xd0, 1), (0xe0, 0x6b33_43cf)] {
                    // Handshake, 0-RTT (v1), Initial of v2 type bits under v2's handshake type.
                    assert_eq!(run(&long(first, version, &id, 0)), want, "long {first:#x}");
                }
                // Initials: by our CID when it names a live worker, else a client's choice.
                let initial = expected(&l, &table, &id, true);
                assert_eq!(run(&long(0xc0, 1, &id, 5)), initial, "retried g{g} w{w}");
                assert_eq!(run(&long(0xc0, 1, &id, 0)), initial, "Initial g{g} w{w}");
                assert_eq!(run(&long(0xd0, 0x6b33_43cf, &id, 0)), initial, "v2");
            }
        }
        // Client-chosen DCIDs of every legal length.
        for len in 0..=20usize {
            let dcid: Vec<u8> = (0..len as u8)
                .map(|b| b.wrapping_mul(37).wrapping_add(11))
                .collect();
            let new = expected(&l, &table, &dcid, true);
            assert_eq!(run(&long(0xc0, 1, &dcid, 0)), new, "len {len}");
            let other = expected(&l, &table, &dcid, false);
            assert_eq!(run(&long(0xe0, 1, &dcid, 0)), other, "handshake len {len}");
        }
        // A DCID longer than QUIC allows: no choice.
        let mut bad = long(0xc0, 1, &[1; 20], 0);
        bad[5] = 21;
        assert_eq!(run(&bad), NO_CHOICE);
        // Probes pick their socket.
        for k in [0u8, 3, 9] {
            assert_eq!(run(&probe(k)), u32::from(k));
            assert_eq!(probe_index(&probe(k)), Some(u32::from(k)));
        }
    }
}

#[test]
fn probes_are_never_quic_and_quic_is_never_a_probe() {
    assert_eq!(probe_index(&short(&cid(&layout(0), 0, 1))), None);
    assert_eq!(probe_index(&probe(7)[..8]), None);
    assert_eq!(probe(7)[0] & 0x40, 0, "fixed bit clear");
}

#[test]
fn a_takeover_keeps_the_drainers_connections_on_its_sockets() {
    let table = &tables()[3];
    let prog = reuseport_program(&layout(0), table);
    // The drainer's (generation 2) worker 3 keeps its short headers…
    assert_eq!(interpret(&prog, &short(&cid(&layout(0), 2, 3))), Some(3));
    // …the newest (3) gets its own and every new connection…
    assert_eq!(interpret(&prog, &short(&cid(&layout(0), 3, 1))), Some(5));
    let new = interpret(&prog, &long(0xc0, 1, &[0x11; 8], 0)).unwrap();
    assert!([4, 5].contains(&new), "{new}");
    // …and a generation nobody owns gets no choice (user space resets it).
    assert_eq!(
        interpret(&prog, &short(&cid(&layout(0), 1, 0))),
        Some(NO_CHOICE)
    );
}
