use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn ipv4_round_trip_with_a_valid_header_checksum() {
    let payload = b"\x40quic short header and some bytes";
    let mut out = [0u8; 256];
    let n = encapsulate(
        addr("192.0.2.7:50123"),
        addr("10.9.9.9:443"),
        payload,
        &mut out,
    )
    .unwrap();
    assert_eq!(n, GUE_LEN + 20 + 8 + payload.len());
    assert_eq!(&out[..4], &[0, 4, 0, 0], "GUE variant 0, IPv4 inside");
    // The header sums to zero with its checksum, as a receiver checks it.
    assert_eq!(checksum(&out[4..24], 0), 0);
    let inner = decapsulate(&out[..n]).unwrap();
    assert_eq!(inner.client, addr("192.0.2.7:50123"));
    assert_eq!(inner.server, addr("10.9.9.9:443"));
    assert_eq!(&out[inner.payload], payload);
}

#[test]
fn ipv6_round_trip_with_a_valid_udp_checksum() {
    let payload = vec![0x5a; 1200];
    let mut out = vec![0u8; 1400];
    let (c, s) = (addr("[2001:db8::7]:4000"), addr("[2001:db8:1::1]:443"));
    let n = encapsulate(c, s, &payload, &mut out).unwrap();
    assert_eq!(out[1], 41);
    // Pseudo-header + UDP header + payload sums to zero with the checksum in place.
    let ip = &out[4..n];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[8..40]);
    pseudo.extend_from_slice(&(1208u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    assert_eq!(checksum(&ip[40..], fold(&pseudo)), 0);
    let inner = decapsulate(&out[..n]).unwrap();
    assert_eq!((inner.client, inner.server), (c, s));
    assert_eq!(&out[inner.payload], payload.as_slice());
}

#[test]
fn mapped_addresses_travel_as_ipv4_and_mixed_families_are_refused() {
    let mut out = [0u8; 128];
    let n = encapsulate(
        addr("[::ffff:192.0.2.1]:1000"),
        addr("10.0.0.1:443"),
        b"x",
        &mut out,
    )
    .unwrap();
    assert_eq!(
        decapsulate(&out[..n]).unwrap().client,
        addr("192.0.2.1:1000")
    );
    assert_eq!(
        encapsulate(
            addr("[2001:db8::1]:1"),
            addr("10.0.0.1:443"),
            b"x",
            &mut out
        ),
        None
    );
    assert_eq!(
        encapsulate(
            addr("10.0.0.2:1"),
            addr("10.0.0.1:443"),
            &[0; 200],
            &mut out
        ),
        None,
        "does not fit"
    );
}

#[test]
fn damaged_packets_are_refused_layer_by_layer() {
    let mut good = [0u8; 64];
    let n = encapsulate(
        addr("192.0.2.7:1"),
        addr("10.0.0.1:443"),
        b"hello",
        &mut good,
    )
    .unwrap();
    let good = &good[..n];
    let with = |i: usize, v: u8| {
        let mut p = good.to_vec();
        p[i] = v;
        p
    };
    assert_eq!(
        decapsulate(&with(0, 0x40)),
        Err(Malformed::Gue),
        "variant 1"
    );
    assert_eq!(
        decapsulate(&with(0, 0x20)),
        Err(Malformed::Gue),
        "control message"
    );
    assert_eq!(
        decapsulate(&with(1, 6)),
        Err(Malformed::Gue),
        "not IP inside"
    );
    assert_eq!(
        decapsulate(&with(4 + 9, 6)),
        Err(Malformed::Ip),
        "TCP inside"
    );
    assert_eq!(
        decapsulate(&with(4 + 15, 1)),
        Err(Malformed::Ip),
        "checksum"
    );
    assert_eq!(decapsulate(&good[..n - 1]), Err(Malformed::Ip), "cut short");
    assert_eq!(decapsulate(&good[..3]), Err(Malformed::Gue));
    // An IPv4-mapped address inside an IPv6 header (never on the wire): refused.
    let mut v6 = vec![0u8; 128];
    let n6 = encapsulate(
        addr("[2001:db8::7]:1"),
        addr("[2001:db8::1]:443"),
        b"x",
        &mut v6,
    )
    .unwrap();
    v6[4 + 8..4 + 24].copy_from_slice(&"::ffff:192.0.2.7".parse::<Ipv6Addr>().unwrap().octets());
    assert_eq!(decapsulate(&v6[..n6]), Err(Malformed::Ip));
    let mut udp = good.to_vec();
    udp[4 + 20 + 5] += 1;
    assert_eq!(decapsulate(&udp), Err(Malformed::Udp));
    // Extension words are skipped, as GUE allows.
    let mut ext = vec![0x01, 4, 0, 0, 0xaa, 0xbb, 0xcc, 0xdd];
    ext.extend_from_slice(&good[4..]);
    assert_eq!(&ext[decapsulate(&ext).unwrap().payload], b"hello");
}

#[test]
fn members_forward_to_others_and_recognise_every_member_address() {
    let members = Members::new(
        &[
            (vec![0, 1], addr("10.0.0.1:4434")),
            (vec![0, 2], addr("10.0.0.2:4434")),
        ],
        &[0, 1],
    );
    assert_eq!(members.address_of(&[0, 1]), None, "never to ourselves");
    assert_eq!(members.address_of(&[0, 2]), Some(addr("10.0.0.2:4434")));
    assert_eq!(members.address_of(&[0, 3]), None);
    assert!(members.is_member("10.0.0.1".parse().unwrap()));
    assert!(members.is_member("::ffff:10.0.0.2".parse().unwrap()));
    assert!(!members.is_member("10.0.0.3".parse().unwrap()));
    assert!(!members.is_empty());
}
