use super::*;
use spooky_common::cid::{fnv1a32_keyed, place, Place};

const KEY_A: [u8; 16] = [
    0xfd, 0xf7, 0x26, 0xa9, 0x89, 0x3e, 0xc0, 0x5c, 0x06, 0x32, 0xd3, 0x95, 0x66, 0x80, 0xba, 0xf0,
];
const KEY_B: [u8; 16] = [0x11; 16];

fn quic_lb(rotation: u8, key: Option<[u8; 16]>, previous: Option<(u8, [u8; 16])>) -> CidFormat {
    CidFormat::QuicLb {
        current: QuicLbConfig {
            rotation,
            key,
            length_self_encoding: false,
        },
        previous: previous.map(|(rotation, key)| QuicLbConfig {
            rotation,
            key: Some(key),
            length_self_encoding: false,
        }),
    }
}

/// A deterministic `fill`.
fn counter(mut seed: u32) -> impl FnMut(&mut [u8]) {
    move |buf: &mut [u8]| {
        for b in buf.iter_mut() {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *b = (seed >> 16) as u8;
        }
    }
}

fn mint(ids: &IdFormat, sid: &[u8], worker: u8, placed: Option<(u32, u32)>, seed: u32) -> Vec<u8> {
    let mut out = [0u8; 20];
    let n = ids.write(sid, worker, placed, counter(seed), &mut out);
    assert_eq!(n, ids.layout().cid_len());
    out[..n].to_vec()
}

#[test]
fn encrypted_quic_lb_ids_hide_the_server_id_and_still_steer_by_their_last_bytes() {
    // 3-byte server id; 16 bytes in all: 10 nonce bytes (single-pass needs 16: 19-byte IDs).
    for (cid_len, mode) in [(16u8, "four-pass"), (19, "single-pass")] {
        let ids = IdFormat::new(&quic_lb(2, Some(KEY_A), None), cid_len, 3, 1).unwrap();
        assert!(!ids.server_id_in_plaintext());
        let sid = [0xa1, 0xb2, 0xc3];
        for worker in [0u8, 5] {
            let id = mint(&ids, &sid, worker, None, 9);
            assert_eq!(id[0] >> 5, 2, "{mode}: config rotation codepoint");
            assert_ne!(&id[1..4], &sid, "{mode}: the server id is not in the clear");
            assert_eq!(ids.server_id_of(&id), Some(sid.to_vec()), "{mode}");
            let layout = ids.layout();
            assert_eq!(layout.worker_of(&id), Some(worker), "{mode}");
            assert_eq!(layout.generation_of(&id), Some(1), "{mode}");
            assert_eq!(
                place(&layout, &id, false, 0, 1, |_| 8),
                Place::Worker {
                    generation: 1,
                    worker: u32::from(worker),
                    by_cid: true
                }
            );
            // The generation and worker are in the encrypted nonce too.
            let lb = QuicLb::new(2, 3, usize::from(cid_len) - 6, Some(KEY_A), false).unwrap();
            let (_, nonce) = lb.decode(&id).unwrap();
            assert_eq!(&nonce[..2], &[1, worker], "{mode}");
        }
        // The same random draw on two workers: the encrypted parts differ.
        let (a, b) = (mint(&ids, &sid, 0, None, 3), mint(&ids, &sid, 1, None, 3));
        assert_ne!(a[..a.len() - 2], b[..b.len() - 2]);
    }
}

#[test]
fn ids_for_initials_hash_onto_their_worker_after_encryption() {
    let ids = IdFormat::new(&quic_lb(0, Some(KEY_A), None), 16, 2, 0).unwrap();
    for worker in 0..4u8 {
        let id = mint(&ids, &[0, 7], worker, Some((0xfeed, 4)), u32::from(worker));
        assert_eq!(fnv1a32_keyed(0xfeed, &id) % 4, u32::from(worker));
        assert_eq!(ids.server_id_of(&id), Some(vec![0, 7]));
    }
}

#[test]
fn during_a_rotation_both_configs_are_read() {
    let old = IdFormat::new(&quic_lb(1, Some(KEY_A), None), 16, 2, 0).unwrap();
    let new = IdFormat::new(&quic_lb(2, Some(KEY_B), Some((1, KEY_A))), 16, 2, 0).unwrap();
    let before = mint(&old, &[0, 9], 0, None, 1);
    let after = mint(&new, &[0, 9], 0, None, 1);
    assert_eq!(after[0] >> 5, 2, "new IDs are minted with the new config");
    assert_eq!(new.server_id_of(&before), Some(vec![0, 9]));
    assert_eq!(new.server_id_of(&after), Some(vec![0, 9]));
    // The old config alone cannot read the new IDs (another codepoint), nor can any host
    // read an ID of a codepoint it has no config for.
    assert_eq!(old.server_id_of(&after), None);
    let mut stranger = after.clone();
    stranger[0] = (5 << 5) | (stranger[0] & 0x1f);
    assert_eq!(new.server_id_of(&stranger), None);
    // Which is never taken for one of ours (no Stateless Reset for it): it may be another
    // host's, minted under a config rolled out there first.
    assert!(new.names_another_server(&stranger, &[0, 9]));
    assert!(old.names_another_server(&after, &[0, 9]));
    assert!(!new.names_another_server(&before, &[0, 9]));
    assert!(new.names_another_server(&before, &[0, 8]));
    // Not our layout at all (a client's choice): not concerned.
    assert!(!new.names_another_server(&after[..15], &[0, 9]));
}

#[test]
fn plaintext_quic_lb_keeps_the_server_id_where_xdp_reads_it() {
    let mut config = quic_lb(3, None, None);
    if let CidFormat::QuicLb { current, .. } = &mut config {
        current.length_self_encoding = true;
    }
    let ids = IdFormat::new(&config, 12, 2, 4).unwrap();
    assert!(ids.server_id_in_plaintext());
    let id = mint(&ids, &[0xbe, 0xef], 2, None, 5);
    assert_eq!(id[0], 3 << 5 | 11, "codepoint 3, length 12 - 1");
    assert_eq!(&id[1..3], &[0xbe, 0xef]);
    assert_eq!(&id[10..], &[4, 2]);
    let key = spooky_common::fleet::server_of(&id, &ids.layout()).unwrap();
    assert_eq!(&key.id[..2], &[0xbe, 0xef]);
}

/// Katran's reading of a server id (balancer's `parse_quic`): version in the first octet's
/// top two bits, then 24 (v2) or 32 (v3) bits big-endian.
fn katran_server_id(cid: &[u8]) -> Option<(u8, u32)> {
    let version = cid[0] >> 6;
    let be = |n: usize| cid[1..=n].iter().fold(0u32, |a, b| a << 8 | u32::from(*b));
    match version {
        2 => Some((2, be(3))),
        3 => Some((3, be(4))),
        _ => None,
    }
}

#[test]
fn katran_ids_carry_the_version_and_server_id_where_katran_reads_them() {
    for (version, sid) in [
        (2u8, vec![0x12, 0x34, 0x56]),
        (3, vec![0xde, 0xad, 0xbe, 0xef]),
    ] {
        let ids = IdFormat::new(&CidFormat::Katran { version }, 16, sid.len() as u8, 0).unwrap();
        let want = sid.iter().fold(0u32, |a, b| a << 8 | u32::from(*b));
        for seed in 0..20 {
            let id = mint(&ids, &sid, 3, Some((7, 4)), seed);
            assert_eq!(katran_server_id(&id), Some((version, want)));
            assert_eq!(ids.server_id_of(&id), Some(sid.clone()));
            assert_eq!(ids.layout().worker_of(&id), Some(3));
        }
        // Another Katran version's ID is not ours to read.
        let mut other = mint(&ids, &sid, 0, None, 1);
        other[0] ^= 0x40;
        assert_eq!(ids.server_id_of(&other), None);
    }
}

#[test]
fn spookys_own_layout_is_unchanged() {
    let ids = IdFormat::new(&CidFormat::Spooky, 16, 2, 1).unwrap();
    let id = mint(&ids, &[0, 1], 6, None, 2);
    assert_eq!(id[0], 1 << 5 | 15);
    assert_eq!(&id[1..4], &[0, 1, 6]);
    assert_eq!(ids.server_id_of(&id), Some(vec![0, 1]));
}
