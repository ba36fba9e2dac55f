//! Table tests of the admission decision with literal packets: each row is a datagram (built
//! byte by byte below), where it came from, the endpoint's state, and the decision expected.

use super::*;

const V1: u32 = 1;
/// A version nobody speaks (reserved for version-negotiation tests, RFC 9000 §15).
const GREASE: u32 = 0x1a2a_3a4a;
const NOW_UNIX: u64 = 1_764_000_000;

/// Worker 1 of 4; 16-byte CIDs with a 2-byte server id.
fn layout() -> CidLayout {
    CidLayout::new(16, 2, 0).unwrap()
}

fn key() -> KeyRing {
    let hex = "5".repeat(64);
    KeyRing::from(&crate::keys::Keys::parse(&format!("reset: {hex}\ntoken: {hex}\n")).unwrap())
}

fn client() -> SocketAddr {
    "192.0.2.7:50000".parse().unwrap()
}

fn limits() -> Limits {
    Limits {
        connections: 100,
        per_address: 2,
        retry: RetryMode::Off,
    }
}

fn endpoint(kernel: bool) -> Endpoint {
    Endpoint::new(
        1,
        Generations::alone(0, 4),
        kernel,
        layout(),
        limits(),
        Instant::now(),
    )
}

fn now() -> Now {
    Now {
        instant: Instant::now(),
        unix_secs: NOW_UNIX,
    }
}

/// A QUIC varint.
fn varint(v: u64, out: &mut Vec<u8>) {
    match v {
        0..=63 => out.push(v as u8),
        64..=16383 => out.extend_from_slice(&(0x4000 | v as u16).to_be_bytes()),
        _ => out.extend_from_slice(&(0x8000_0000 | v as u32).to_be_bytes()),
    }
}

/// A long-header packet of type `ty` (0 Initial, 1 0-RTT, 2 Handshake), padded to `len`.
fn long(ty: u8, version: u32, dcid: &[u8], token: &[u8], len: usize) -> Vec<u8> {
    let mut p = vec![0xc0 | (ty << 4)];
    p.extend_from_slice(&version.to_be_bytes());
    p.push(dcid.len() as u8);
    p.extend_from_slice(dcid);
    p.push(8);
    p.extend_from_slice(&[0xcc; 8]);
    if ty == 0 {
        varint(token.len() as u64, &mut p);
        p.extend_from_slice(token);
    }
    varint(1100, &mut p);
    p.resize(len.max(p.len()), 0);
    p
}

fn initial(dcid: &[u8], token: &[u8], len: usize) -> Vec<u8> {
    long(0, V1, dcid, token, len)
}

fn short(dcid: &[u8]) -> Vec<u8> {
    let mut p = vec![0x40];
    p.extend_from_slice(dcid);
    p.extend_from_slice(&[0x55; 40]);
    p
}

/// A CID of ours naming `worker`.
fn our_cid(worker: u8) -> Vec<u8> {
    let mut out = [0u8; 20];
    let n = layout().write(&[0xaa, 0xbb], worker, &[0x11; 20], &mut out);
    out[..n].to_vec()
}

/// A CID of ours for `worker` as the worker mints the ones Initials carry: its hash (key 0, 4
/// workers) places it on `worker`.
fn placed_cid(worker: u8) -> Vec<u8> {
    placed_cid_seeded(worker, 7)
}

/// Another CID of `worker`'s, as [`placed_cid`] with another nonce.
fn placed_cid_seeded(worker: u8, mut seed: u32) -> Vec<u8> {
    let mut out = [0u8; 20];
    let fill = |buf: &mut [u8]| {
        for b in buf.iter_mut() {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            *b = (seed >> 16) as u8;
        }
    };
    let n = layout().write_placed(&[0xaa, 0xbb], worker, 0, 4, fill, &mut out);
    out[..n].to_vec()
}

/// A client-chosen DCID that `steer` places on `worker` of 4.
fn client_dcid_for(worker: usize) -> Vec<u8> {
    (0u8..=255)
        .map(|i| vec![0x80, i, 3, 4, 5, 6, 7, 8])
        .find(|d| spooky_common::cid::fnv1a32(d) % 4 == worker as u32)
        .unwrap()
}

/// The reset a short header with `dcid` gets.
fn reset(dcid: &[u8]) -> Decision {
    Decision::Reset {
        token: crate::quic::token::reset_token(&key(), dcid),
    }
}

fn decide(ep: &mut Endpoint, mut pkt: Vec<u8>, forwarded: bool) -> Decision {
    decide_at(ep, &mut pkt, forwarded, now())
}

fn decide_at(ep: &mut Endpoint, pkt: &mut [u8], forwarded: bool, at: Now) -> Decision {
    let len = pkt.len();
    let hdr = Header::from_slice(pkt, layout().cid_len()).unwrap();
    ep.admit(&hdr, len, client(), forwarded, &key(), at, retry_scid)
}

/// The source connection ID of the Retries worker 1 sends in these tests.
fn retry_scid() -> ConnectionId<'static> {
    ConnectionId::from_vec(placed_cid(1))
}

#[test]
fn who_owns_a_packet() {
    let mine = client_dcid_for(1);
    let theirs = client_dcid_for(3);
    #[rustfmt::skip]
    let rows: Vec<(&str, bool, Vec<u8>, bool, Decision)> = vec![
        ("Initial hashed here", false, initial(&mine, &[], 1200), false, Decision::Accept { odcid: None }),
        ("Initial hashed elsewhere", false, initial(&theirs, &[], 1200), false, Decision::Forward { owner: 3 }),
        ("forwarded Initial is never forwarded again", false, initial(&theirs, &[], 1200), true, Decision::Accept { odcid: None }),
        ("kernel placed the Initial", true, initial(&theirs, &[], 1200), false, Decision::Accept { odcid: None }),
        ("0-RTT hashed elsewhere", false, long(1, V1, &theirs, &[], 1200), false, Decision::Forward { owner: 3 }),
        ("0-RTT for no connection", false, long(1, V1, &mine, &[], 1200), false, Decision::Drop(DropReason::UnknownConnection)),
        ("0-RTT naming worker 2", true, long(1, V1, &our_cid(2), &[], 1200), false, Decision::Forward { owner: 2 }),
        ("short header naming worker 2", false, short(&our_cid(2)), false, Decision::Forward { owner: 2 }),
        ("short header naming a worker past the count", false, short(&our_cid(9)), false, reset(&our_cid(9))),
        ("short header for a connection that is gone", false, short(&our_cid(1)), false, reset(&our_cid(1))),
        ("short header, not our layout, hashed here", false, short(&[0xe1; 16]), false, reset(&[0xe1; 16])),
        ("Handshake naming worker 0", true, long(2, V1, &our_cid(0), &[], 100), false, Decision::Forward { owner: 0 }),
        ("Handshake for no connection here", true, long(2, V1, &our_cid(1), &[], 100), false, Decision::Drop(DropReason::UnknownConnection)),
    ];
    for (what, kernel, pkt, forwarded, want) in rows {
        assert_eq!(
            decide(&mut endpoint(kernel), pkt, forwarded),
            want,
            "{what}"
        );
    }
}

#[test]
fn initials_are_checked_in_order() {
    let mine = client_dcid_for(1);
    #[rustfmt::skip]
    let rows: Vec<(&str, Vec<u8>, Decision)> = vec![
        ("unknown version, small: no amplification", long(0, GREASE, &mine, &[], 1199), Decision::Drop(DropReason::ShortUnknownVersion)),
        ("unknown version, 1200 bytes", long(0, GREASE, &mine, &[], 1200), Decision::NegotiateVersion),
        ("short Initial", initial(&mine, &[], 1199), Decision::Drop(DropReason::ShortInitial)),
        ("1200 bytes", initial(&mine, &[], 1200), Decision::Accept { odcid: None }),
        ("a token that is not ours", initial(&mine, &[9; 40], 1300), Decision::Drop(DropReason::InvalidToken)),
    ];
    for (what, pkt, want) in rows {
        assert_eq!(decide(&mut endpoint(false), pkt, false), want, "{what}");
    }
}

/// Worker 1 with Retry always on, a client's first Initial (to `mine`, hashed here), and the
/// token of the Retry it got: (endpoint, `mine`, token).
fn retried() -> (Endpoint, Vec<u8>, Vec<u8>) {
    let mine = client_dcid_for(1);
    let mut ep = endpoint(false);
    ep.set_limits(Limits {
        retry: RetryMode::Always,
        ..limits()
    });
    let Decision::Retry { token, .. } = decide(&mut ep, initial(&mine, &[], 1200), false) else {
        panic!("no Retry");
    };
    (ep, mine, token)
}

#[test]
fn a_retry_token_comes_back_as_the_original_dcid() {
    let (mut ep, mine, token) = retried();
    // The client's second Initial carries the token and the CID we chose in the Retry.
    let ours = placed_cid(1);
    let d = decide(&mut ep, initial(&ours, &token, 1250), false);
    assert_eq!(
        d,
        Decision::Accept {
            odcid: Some(ConnectionId::from_vec(mine.clone()))
        }
    );
    // The same token from another address is refused.
    let mut pkt = initial(&ours, &token, 1250);
    let len = pkt.len();
    let hdr = Header::from_slice(&mut pkt, 16).unwrap();
    let elsewhere: SocketAddr = "192.0.2.8:50000".parse().unwrap();
    assert_eq!(
        ep.admit(&hdr, len, elsewhere, false, &key(), now(), retry_scid),
        Decision::Drop(DropReason::InvalidToken)
    );
    // Nor on an Initial to any other connection ID (one of ours the client saw on the path,
    // say): the connection would take that ID and hand its reset token to this client.
    let victim = placed_cid_seeded(1, 8);
    assert_ne!(victim, ours);
    assert_eq!(
        decide(&mut ep, initial(&victim, &token, 1250), false),
        Decision::Drop(DropReason::TokenForAnotherCid)
    );
    assert_eq!(
        decide(&mut ep, initial(&mine, &token, 1250), false),
        Decision::Drop(DropReason::TokenForAnotherCid)
    );
    // And after its lifetime.
    let later = Now {
        unix_secs: NOW_UNIX + TOKEN_LIFETIME.as_secs() + 1,
        ..now()
    };
    assert_eq!(
        ep.admit(&hdr, len, client(), false, &key(), later, retry_scid),
        Decision::Drop(DropReason::InvalidToken)
    );
}

#[test]
fn retry_above_the_new_connection_rate() {
    let mine = client_dcid_for(1);
    let start = Instant::now();
    let mut ep = Endpoint::new(
        1,
        Generations::alone(0, 4),
        false,
        layout(),
        Limits {
            retry: RetryMode::Auto {
                new_connections_per_sec: 3,
            },
            per_address: 100,
            ..limits()
        },
        start,
    );
    let at = |ms: u64| Now {
        instant: start + Duration::from_millis(ms),
        unix_secs: NOW_UNIX,
    };
    let mut decide_at = |ms: u64| {
        let mut pkt = initial(&mine, &[], 1200);
        let hdr = Header::from_slice(&mut pkt, 16).unwrap();
        ep.admit(&hdr, 1200, client(), false, &key(), at(ms), retry_scid)
    };
    for ms in [0, 10, 20] {
        assert_eq!(decide_at(ms), Decision::Accept { odcid: None }, "{ms} ms");
    }
    assert!(matches!(decide_at(30), Decision::Retry { .. }));
    // A new one-second window: no Retry again until the rate is reached.
    assert_eq!(decide_at(1031), Decision::Accept { odcid: None });
}

#[test]
fn connection_limits_per_worker_and_per_address() {
    let mine = client_dcid_for(1);
    let mut ep = Endpoint::new(
        1,
        Generations::alone(0, 4),
        false,
        layout(),
        Limits {
            connections: 3,
            ..limits()
        },
        Instant::now(),
    );
    let ip = client().ip();
    ep.opened(ip);
    ep.opened(ip);
    assert_eq!(
        decide(&mut ep, initial(&mine, &[], 1200), false),
        Decision::Refuse(Refusal::PerAddress)
    );
    ep.closed(ip);
    assert_eq!(
        decide(&mut ep, initial(&mine, &[], 1200), false),
        Decision::Accept { odcid: None }
    );
    for other in 1..=2u8 {
        ep.opened(IpAddr::from([198, 51, 100, other]));
    }
    // 3 open: this worker's share of 3 is taken.
    assert_eq!(ep.open(), 3);
    assert_eq!(
        decide(&mut ep, initial(&mine, &[], 1200), false),
        Decision::Refuse(Refusal::Full)
    );
}

#[test]
fn an_ipv6_client_counts_by_its_64_and_a_zero_limit_refuses_the_first() {
    let mine = client_dcid_for(1);
    let mut ep = endpoint(false);
    // limits(): 2 per address. Two addresses of one /64 fill it; another /64 is apart.
    ep.opened("2001:db8:1:2::7".parse().unwrap());
    ep.opened("2001:db8:1:2:ffff::8".parse().unwrap());
    let from = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 4433);
    let decide_from = |ep: &mut Endpoint, ip: &str| {
        let mut buf = initial(&mine, &[], 1200);
        let hdr = Header::from_slice(&mut buf, layout().cid_len()).unwrap();
        ep.admit(&hdr, 1200, from(ip), false, &key(), now(), retry_scid)
    };
    assert_eq!(
        decide_from(&mut ep, "2001:db8:1:2::9"),
        Decision::Refuse(Refusal::PerAddress)
    );
    assert_eq!(
        decide_from(&mut ep, "2001:db8:1:3::7"),
        Decision::Accept { odcid: None }
    );
    ep.closed("2001:db8:1:2::7".parse().unwrap());
    assert_eq!(
        decide_from(&mut ep, "2001:db8:1:2::9"),
        Decision::Accept { odcid: None }
    );
    // When the last connection of a /64 (or of a mapped IPv4 address) closes, its entry goes.
    assert_eq!(ep.addresses(), 1);
    ep.closed("2001:db8:1:2:ffff::8".parse().unwrap());
    assert_eq!(ep.addresses(), 0, "the /64's entry is removed");
    ep.opened("::ffff:192.0.2.9".parse().unwrap());
    ep.closed("::ffff:192.0.2.9".parse().unwrap());
    assert_eq!(ep.addresses(), 0, "the mapped address's entry is removed");
    // An IPv4-mapped address is its IPv4 address.
    assert_eq!(
        address_key("::ffff:192.0.2.7".parse().unwrap()),
        "192.0.2.7".parse::<IpAddr>().unwrap()
    );
    // A limit of 0 (not configurable, but the type allows it) refuses even the first.
    ep.set_limits(Limits {
        per_address: 0,
        ..limits()
    });
    assert_eq!(
        decide_from(&mut ep, "198.51.100.1"),
        Decision::Refuse(Refusal::PerAddress)
    );
}

#[test]
fn a_draining_endpoint_accepts_nothing_but_still_negotiates_versions() {
    let mine = client_dcid_for(1);
    let mut ep = endpoint(false);
    ep.drain();
    assert_eq!(
        decide(&mut ep, initial(&mine, &[], 1200), false),
        Decision::Drop(DropReason::Draining)
    );
    assert_eq!(
        decide(&mut ep, long(0, GREASE, &mine, &[], 1200), false),
        Decision::NegotiateVersion
    );
}

#[test]
fn limits_are_shared_between_workers() {
    let quic = crate::config::Quic {
        idle_timeout: Duration::from_secs(30),
        handshake_timeout: Duration::from_secs(10),
        request_header_timeout: Duration::from_secs(10),
        send_timeout: Duration::from_secs(30),
        max_concurrent_streams: 100,
        initial_max_data: 1 << 20,
        initial_max_stream_data: 1 << 20,
        max_connections: 1000,
        max_connections_per_ip: 10,
        max_stalled_streams: 16,
        max_stalled_streams_per_ip: 256,
        max_streams_per_ip: 512,
        retry: RetryMode::Off,
        early_data: crate::config::EarlyData::Defer,
        cid_len: 16,
        server_id: vec![1, 2],
        generation: 0,
        key_file: None,
        connection_ids: crate::config::CidFormat::Spooky,
    };
    let l = Limits::share(&quic, 4);
    assert_eq!((l.connections, l.per_address), (250, 3));
}

/// Generation 2 drains with 4 workers; this endpoint is worker 1 of generation 3 (2 workers),
/// the newest.
fn after_takeover() -> Endpoint {
    let mut workers = [0; 8];
    workers[2] = 4;
    workers[3] = 2;
    let g = Generations {
        own: 3,
        newest: 3,
        workers,
        hash_key: 0,
        dead: Default::default(),
    };
    Endpoint::new(1, g, false, layout_of(3), limits(), Instant::now())
}

fn layout_of(generation: u8) -> CidLayout {
    CidLayout::new(16, 2, generation).unwrap()
}

fn cid_of(generation: u8, worker: u8) -> Vec<u8> {
    let mut out = [0u8; 20];
    let n = layout_of(generation).write(&[0xaa, 0xbb], worker, &[0x22; 20], &mut out);
    out[..n].to_vec()
}

#[test]
fn generations_decide_who_answers() {
    let mut ep = after_takeover();
    // The drainer's packets are never answered here, whatever reached this worker.
    assert_eq!(
        decide(&mut ep, short(&cid_of(2, 1)), false),
        Decision::Drop(DropReason::OtherGeneration)
    );
    // Ours for the other worker: forwarded; ours for a gone connection: reset.
    assert_eq!(
        decide(&mut ep, short(&cid_of(3, 0)), false),
        Decision::Forward { owner: 0 }
    );
    assert_eq!(
        decide(&mut ep, short(&cid_of(3, 1)), false),
        reset(&cid_of(3, 1))
    );
    // A generation nobody owns any more (a crashed process): reset.
    assert_eq!(
        decide(&mut ep, short(&cid_of(5, 1)), false),
        reset(&cid_of(5, 1))
    );
    // When the drainer is gone, its connections are answered with resets too.
    ep.set_generations(Generations::alone(3, 2));
    assert_eq!(
        decide(&mut ep, short(&cid_of(2, 1)), false),
        reset(&cid_of(2, 1))
    );
}

#[test]
fn resets_are_small_rate_limited_and_never_answer_a_reset() {
    let mut ep = endpoint(false);
    let gone = our_cid(1);
    // 1 + 16 + 26 = 43 bytes: could be a reset itself; not answered.
    let mut tiny = short(&gone);
    tiny.truncate(RESET_LEN);
    assert_eq!(
        decide(&mut ep, tiny, false),
        Decision::Drop(DropReason::ResetWithheld)
    );
    let start = Instant::now();
    let at = |ms: u64| Now {
        instant: start + Duration::from_millis(ms),
        unix_secs: NOW_UNIX,
    };
    let mut pkt = short(&gone);
    let len = pkt.len();
    let hdr = Header::from_slice(&mut pkt, 16).unwrap();
    let answered = (0..RESETS_PER_SEC + 10)
        .filter(|_| {
            matches!(
                ep.admit(&hdr, len, client(), false, &key(), at(10), retry_scid),
                Decision::Reset { .. }
            )
        })
        .count();
    assert_eq!(
        answered, RESETS_PER_SEC as usize,
        "the rest of the second is withheld"
    );
    assert!(matches!(
        ep.admit(&hdr, len, client(), false, &key(), at(1011), retry_scid),
        Decision::Reset { .. }
    ));
}

#[test]
fn a_drainer_still_takes_the_answers_to_its_retries() {
    let (mut ep, mine, token) = retried();
    ep.drain();
    let ours = placed_cid(1);
    assert_eq!(
        decide(&mut ep, initial(&ours, &token, 1250), false),
        Decision::Accept {
            odcid: Some(ConnectionId::from_vec(mine.clone()))
        }
    );
    // A new connection is not taken, nor a token whose DCID is not one of ours.
    assert_eq!(
        decide(&mut ep, initial(&mine, &[], 1200), false),
        Decision::Drop(DropReason::Draining)
    );
    assert_eq!(
        decide(&mut ep, initial(&mine, &token, 1250), false),
        Decision::Drop(DropReason::Draining)
    );
}

/// An Initial's worker byte is never trusted: a client's Initials after its first flight
/// carry the CID we minted, which hashes onto its worker; a DCID that only looks like ours
/// goes where its hash says, whatever worker it names. With kernel placement a first
/// Initial is taken where the kernel put it, and a draining worker takes one whose
/// client-chosen DCID merely looks like its own generation's.
#[test]
fn initials_are_placed_by_hash_and_our_minted_cids_hash_onto_their_worker() {
    // Classic placement: worker 1 sees a token-less Initial to a CID minted for worker 3:
    // forwarded there.
    let mut ep = endpoint(false);
    assert_eq!(
        decide(&mut ep, initial(&placed_cid(3), &[], 1200), false),
        Decision::Forward { owner: 3 }
    );
    // A lookalike naming worker 3 goes where its hash says (here: worker 2), not to 3.
    let lookalike = our_cid(3);
    let hashed = spooky_common::cid::fnv1a32(&lookalike) % 4;
    assert_ne!(
        hashed, 3,
        "pick a lookalike whose hash differs from its worker byte"
    );
    let want = if hashed == 1 {
        Decision::Accept { odcid: None }
    } else {
        Decision::Forward {
            owner: hashed as usize,
        }
    };
    assert_eq!(decide(&mut ep, initial(&lookalike, &[], 1200), false), want);
    // Kernel placement: a first Initial is this worker's, whatever its DCID looks like.
    let mut ep = endpoint(true);
    assert_eq!(
        decide(&mut ep, initial(&our_cid(3), &[], 1200), false),
        Decision::Accept { odcid: None }
    );
    ep.drain();
    assert_eq!(
        decide(&mut ep, initial(&our_cid(3), &[], 1200), false),
        Decision::Accept { odcid: None },
        "a lookalike of our generation reached the drainer: taken"
    );
    assert_eq!(
        decide(&mut ep, initial(&client_dcid_for(1), &[], 1200), false),
        Decision::Drop(DropReason::Draining)
    );
}

#[test]
fn version_negotiation_is_rate_limited() {
    let mine = client_dcid_for(1);
    let mut ep = endpoint(false);
    let t0 = Instant::now();
    let at = |ms: u64| Now {
        instant: t0 + Duration::from_millis(ms),
        unix_secs: 1_000_000,
    };
    let mut answered = 0;
    for _ in 0..NEGOTIATIONS_PER_SEC + 50 {
        let mut pkt = long(0, GREASE, &mine, &[], 1200);
        if decide_at(&mut ep, &mut pkt, false, at(10)) == Decision::NegotiateVersion {
            answered += 1;
        }
    }
    assert_eq!(answered, NEGOTIATIONS_PER_SEC);
    let mut pkt = long(0, GREASE, &mine, &[], 1200);
    assert_eq!(
        decide_at(&mut ep, &mut pkt, false, at(10)),
        Decision::Drop(DropReason::NegotiationWithheld)
    );
    // The next second allows again.
    let mut pkt = long(0, GREASE, &mine, &[], 1200);
    assert_eq!(
        decide_at(&mut ep, &mut pkt, false, at(1_100)),
        Decision::NegotiateVersion
    );
}

#[test]
fn a_dead_workers_connections_are_reset_and_new_ones_go_around_it() {
    let mut ep = endpoint(false);
    let mut g = Generations::alone(0, 4);
    g.dead.insert(3);
    ep.set_generations(g);
    // Its connections: nobody's (a short header gets a Stateless Reset).
    let mut pkt = vec![0x41];
    pkt.extend_from_slice(&our_cid(3));
    pkt.resize(60, 0);
    assert!(matches!(
        decide(&mut ep, pkt, false),
        Decision::Reset { .. }
    ));
    // A new connection hashed onto it goes to the next live worker (0, wrapping).
    assert_eq!(
        decide(&mut ep, initial(&client_dcid_for(3), &[], 1200), false),
        Decision::Forward { owner: 0 }
    );
}

/// A short header for another server's connection (our layout, another server id: a fleet's
/// load balancer misrouted it) is dropped, never reset: our reset would end that connection
/// if the fleet shares its keys. Initials are not concerned (their DCID is the client's).
#[test]
fn another_servers_packets_are_dropped_never_reset() {
    let mut ep = endpoint(false);
    let ids = IdFormat::new(&crate::config::CidFormat::Spooky, 16, 2, 0).unwrap();
    ep.set_server_id(std::sync::Arc::new(ids), &[0xaa, 0xbb]);
    let mut theirs = [0u8; 20];
    let n = layout().write(&[0x01, 0x02], 1, &[0x11; 20], &mut theirs);
    assert_eq!(
        decide(&mut ep, short(&theirs[..n]), false),
        Decision::Drop(DropReason::OtherServer)
    );
    // Whom to forward it to, if the fleet has them; not ours.
    assert_eq!(ep.other_server_id(&theirs[..n]), Some(vec![0x01, 0x02]));
    assert_eq!(ep.other_server_id(&our_cid(1)), None);
    // Ours (server id aabb) for worker 1 with no connection: reset as before.
    assert_eq!(
        decide(&mut ep, short(&our_cid(1)), false),
        reset(&our_cid(1))
    );
    // Unchecked without a server id.
    let mut ep = endpoint(false);
    assert_eq!(
        decide(&mut ep, short(&theirs[..n]), false),
        reset(&theirs[..n])
    );
}
