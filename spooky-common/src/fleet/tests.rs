use super::*;

const OWN: [u8; SERVER_ID_LEN] = [0, 1, 0, 0, 0, 0, 0, 0];

/// A 16-byte connection ID in the layout: generation `gen`, server id `sid` (2 bytes).
fn cid(gen: u8, sid: [u8; 2]) -> [u8; 16] {
    let mut c = [0x5a; 16];
    c[0] = (gen << 5) | 15;
    c[1] = sid[0];
    c[2] = sid[1];
    c
}

fn layout() -> CidLayout {
    CidLayout::new(16, 2, 0).unwrap()
}

#[test]
fn only_ids_in_our_layout_naming_another_server_are_other_servers() {
    let other = other_server(&cid(0, [0, 2]), &layout(), &OWN).unwrap();
    assert_eq!(other.id, [0, 2, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        other_server(&cid(3, [0, 2]), &layout(), &OWN),
        Some(other),
        "any live generation"
    );
    assert_eq!(other_server(&cid(0, [0, 1]), &layout(), &OWN), None, "ours");
    assert_eq!(
        other_server(&cid(7, [0, 2]), &layout(), &OWN),
        None,
        "unroutable"
    );
    assert_eq!(
        other_server(&cid(0, [0, 2])[..15], &layout(), &OWN),
        None,
        "another length"
    );
    let mut wrong_len_bits = cid(0, [0, 2]);
    wrong_len_bits[0] = 14;
    assert_eq!(other_server(&wrong_len_bits, &layout(), &OWN), None);
    assert_eq!(other_server(&[], &layout(), &OWN), None);
    // The load balancer's layout (QUIC-LB plaintext, Katran): the host bytes at the end say
    // whether it is one of ours, the first octet is the load balancer's.
    let lb = CidLayout::for_load_balancer(16, 2, 0).unwrap();
    let mut id = cid(7, [0, 2]);
    id[14] = 3;
    assert_eq!(other_server(&id, &lb, &OWN), Some(other));
    id[14] = 7;
    assert_eq!(other_server(&id, &lb, &OWN), None, "unroutable");
}

#[test]
fn the_ipv4_checksum_matches_a_known_header() {
    // A header from RFC 1071-style worked examples: checksum 0xb861.
    let h = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];
    assert_eq!(ipv4_checksum(&h), [0xb8, 0x61]);
}

/// A client frame: Ethernet from `BB…` to `AA…`, IPv4 192.0.2.7 → 10.199.0.1 (valid
/// checksum), UDP 50000 → 4433, a 40-byte payload. Returns the frame and its length.
fn client_frame() -> ([u8; 128], usize) {
    let mut f = [0u8; 128];
    f[..6].copy_from_slice(&[0xaa; 6]);
    f[6..12].copy_from_slice(&[0xbb; 6]);
    f[12..14].copy_from_slice(&[8, 0]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(20u16 + 8 + 40).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[192, 0, 2, 7]);
    ip[16..20].copy_from_slice(&[10, 199, 0, 1]);
    let sum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&sum);
    f[14..34].copy_from_slice(&ip);
    f[34..36].copy_from_slice(&50000u16.to_be_bytes());
    f[36..38].copy_from_slice(&4433u16.to_be_bytes());
    f[38..40].copy_from_slice(&48u16.to_be_bytes());
    for (i, b) in f[42..82].iter_mut().enumerate() {
        *b = 0x40 | (i as u8 & 0x3f);
    }
    (f, 82)
}

const MEMBER: FleetMember = FleetMember {
    addr: [10, 211, 2, 2],
    port: [0x17, 0xc0], // 6080
    reserved: [0; 2],
};

/// `frame` encapsulated as the XDP program does it: the 46-byte header, then the client's
/// IPv4 packet.
fn encapsulated(frame: &[u8], len: usize) -> ([u8; 256], usize) {
    let eth: EthHdr = Packet::over(frame).read(0).unwrap();
    let inner = len - 14;
    let h = encap_header(&eth, inner, [10, 211, 1, 2], &MEMBER, 0x1234).unwrap();
    let mut out = [0u8; 256];
    out[..46].copy_from_slice(&h);
    out[46..46 + inner].copy_from_slice(&frame[14..len]);
    (out, 46 + inner)
}

#[test]
fn encapsulation_goes_back_to_the_router_with_valid_outer_headers() {
    let (frame, len) = client_frame();
    let (out, n) = encapsulated(&frame, len);
    assert_eq!(&out[..6], &[0xbb; 6], "to the neighbour that sent it");
    assert_eq!(&out[6..12], &[0xaa; 6], "from us");
    let outer: [u8; 20] = out[14..34].try_into().unwrap();
    assert_eq!(ipv4_checksum(&outer), [outer[10], outer[11]]);
    assert_eq!(
        usize::from(u16::from_be_bytes([outer[2], outer[3]])),
        n - 14
    );
    assert_eq!(&outer[12..20], &[10, 211, 1, 2, 10, 211, 2, 2]);
    assert_eq!(
        u16::from_be_bytes([out[34], out[35]]),
        0x9234,
        "entropy, high bit set"
    );
    assert_eq!(&out[36..38], &[0x17, 0xc0]);
    assert_eq!(usize::from(u16::from_be_bytes([out[38], out[39]])), n - 34);
    assert_eq!(
        &out[40..46],
        &[0, 0, 0, 4, 0, 0],
        "no UDP checksum; GUE v0, IPv4"
    );
    assert_eq!(
        &out[46..n],
        &frame[14..len],
        "the client's packet untouched"
    );
}

#[test]
fn decapsulation_finds_the_clients_datagram_and_refuses_the_rest() {
    let (frame, len) = client_frame();
    let (out, n) = encapsulated(&frame, len);
    assert_eq!(
        decap(&Packet::over(&out[..n]), 4433),
        Decap::Client {
            sender: MemberAddr {
                addr: [10, 211, 1, 2]
            },
            payload: 46 + 28,
            len: 40
        }
    );
    // Ethernet padding after the packet is fine.
    assert!(matches!(
        decap(&Packet::over(&out[..n + 6]), 4433),
        Decap::Client { .. }
    ));
    assert_eq!(
        decap(&Packet::over(&out[..n]), 443),
        Decap::Malformed,
        "not to our QUIC port"
    );
    assert_eq!(
        decap(&Packet::over(&out[..n - 1]), 4433),
        Decap::Malformed,
        "cut short"
    );
    let with = |i: usize, v: u8| {
        let mut p = out;
        p[i] = v;
        p
    };
    assert_eq!(
        decap(&Packet::over(&with(43, 41)[..n]), 4433),
        Decap::Pass,
        "IPv6 inside"
    );
    assert_eq!(
        decap(&Packet::over(&with(42, 1)[..n]), 4433),
        Decap::Pass,
        "extension words"
    );
    assert_eq!(
        decap(&Packet::over(&with(12, 0x81)[..n]), 4433),
        Decap::Pass,
        "VLAN"
    );
    assert_eq!(
        decap(&Packet::over(&with(46 + 9, 6)[..n]), 4433),
        Decap::Malformed,
        "TCP inside"
    );
    assert_eq!(
        decap(&Packet::over(&with(46 + 6, 0x20)[..n]), 4433),
        Decap::Malformed,
        "fragment"
    );
    assert_eq!(
        decap(&Packet::over(&with(17, 0xff)[..n]), 4433),
        Decap::Malformed,
        "outer length"
    );
    assert_eq!(
        decap(&Packet::over(&with(66 + 5, 0)[..n]), 4433),
        Decap::Malformed,
        "UDP length"
    );
}
