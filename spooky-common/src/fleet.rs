//! Fleet forwarding in the XDP program: the pure parts, shared with host tests and the fuzzer.
//!
//! A QUIC packet whose connection ID names another member's server id is wrapped, in place,
//! into GUE (variant 0, the format of `spooky::quic::fleet` and of Katran): the frame's
//! Ethernet header is rewritten to go back where it came from (the router), and an outer IPv4
//! header, UDP header and GUE header go in front of the untouched client packet:
//!
//! ```text
//! before: eth | IPv4 (client → VIP) | UDP | QUIC
//! after:  eth (MACs swapped) | IPv4 (us → member) | UDP (→ fleet port) | GUE | IPv4 (client → VIP) | UDP | QUIC
//! ```
//!
//! The member's XDP program takes the outer 32 bytes off again (after checking the sender is
//! a member and the inner packet names *its* server id: a forwarded packet is never
//! forwarded again) and lets the client's packet go up the stack as if it had arrived
//! directly. Only plain Ethernet + IPv4 without options is handled here; anything else (VLAN
//! tags, IPv6, IP options) passes to user space, which forwards it the same way.

use crate::cid::CidLayout;
use crate::packet::{EthHdr, Ipv4Hdr, Packet, UdpHdr, UDP_HDR_LEN};
use core::mem::size_of;

/// Bytes an encapsulation adds: outer IPv4, UDP and GUE headers.
pub const GUE_OVERHEAD: usize = size_of::<Ipv4Hdr>() + UDP_HDR_LEN + GUE_LEN;
/// Bytes of the GUE header.
pub const GUE_LEN: usize = 4;
/// Bytes written at the front of an encapsulated frame: Ethernet and the outer headers.
pub const ENCAP_HEADER_LEN: usize = size_of::<EthHdr>() + GUE_OVERHEAD;
/// Where the client's IPv4 header starts in a frame without VLAN tags.
pub const IPV4_OFFSET: usize = size_of::<EthHdr>();
/// Where the client's packet starts in an encapsulated frame.
pub const INNER_OFFSET: usize = ENCAP_HEADER_LEN;

const ETH_P_IPV4: [u8; 2] = [0x08, 0x00];
const IPPROTO_UDP: u8 = 17;
const GUE_PROTO_IPV4: u8 = 4;

/// Longest server id the fleet maps hold (as `cid::MAX_SERVER_ID_LEN`).
pub const SERVER_ID_LEN: usize = 8;

/// Key of the `fleet_members` map: a server id, zero-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServerIdKey {
    pub id: [u8; SERVER_ID_LEN],
}

/// Value of the `fleet_members` map: where that member takes forwarded packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetMember {
    /// IPv4 address, network byte order (IPv6 members are forwarded to from user space).
    pub addr: [u8; 4],
    /// UDP port of its `fleet.listen`, network byte order.
    pub port: [u8; 2],
    /// Always zero.
    pub reserved: [u8; 2],
}

/// Key of the `fleet_sources` map: a member's IPv4 address (the only senders whose GUE
/// packets are taken).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemberAddr {
    pub addr: [u8; 4],
}

const _: () = {
    assert!(size_of::<ServerIdKey>() == 8);
    assert!(size_of::<FleetMember>() == 8);
    assert!(size_of::<MemberAddr>() == 4);
    assert!(ENCAP_HEADER_LEN == 46 && GUE_OVERHEAD == 32);
};

/// The server id `dcid` names, zero-padded, when `dcid` is one of `layout`'s
/// ([`CidLayout::generation_of`]) and the server id is in plaintext at offset 1 (Spooky's
/// layout; QUIC-LB plaintext and Katran in the load balancer's).
#[inline(always)]
pub fn server_of(dcid: &[u8], layout: &CidLayout) -> Option<ServerIdKey> {
    layout.generation_of(dcid)?;
    let mut key = ServerIdKey::default();
    let mut i = 0;
    while i < SERVER_ID_LEN && i < layout.server_id_len() {
        key.id[i] = *dcid.get(1 + i)?;
        i += 1;
    }
    Some(key)
}

/// [`server_of`], when the id is not `own`: another host's connection.
#[inline(always)]
pub fn other_server(
    dcid: &[u8],
    layout: &CidLayout,
    own: &[u8; SERVER_ID_LEN],
) -> Option<ServerIdKey> {
    server_of(dcid, layout).filter(|k| k.id != *own)
}

/// The Internet checksum of an IPv4 header (its checksum field read as zero).
#[inline(always)]
pub fn ipv4_checksum(header: &[u8; 20]) -> [u8; 2] {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        if i != 10 {
            sum += u32::from(u16::from_be_bytes([header[i], header[i + 1]]));
        }
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// The 46 bytes that go in front of a client's IPv4 packet of `inner_len` bytes to send it
/// to `member` from `source`: Ethernet back to where `eth` came from, outer IPv4, UDP (source
/// port `entropy`, so that routers spread members' flows; no checksum, as IPv4 allows) and
/// GUE. `None` when the result would not fit an IPv4 packet.
#[inline(always)]
pub fn encap_header(
    eth: &EthHdr,
    inner_len: usize,
    source: [u8; 4],
    member: &FleetMember,
    entropy: u16,
) -> Option<[u8; ENCAP_HEADER_LEN]> {
    let udp_len = u16::try_from(UDP_HDR_LEN + GUE_LEN + inner_len).ok()?;
    let total = u16::try_from(usize::from(udp_len) + size_of::<Ipv4Hdr>()).ok()?;
    let mut h = [0u8; ENCAP_HEADER_LEN];
    // Ethernet: back to the neighbour that sent it (the router in front of us).
    let mut i = 0;
    while i < 6 {
        h[i] = eth.src[i];
        h[6 + i] = eth.dst[i];
        i += 1;
    }
    h[12] = ETH_P_IPV4[0];
    h[13] = ETH_P_IPV4[1];
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&source);
    ip[16..20].copy_from_slice(&member.addr);
    let sum = ipv4_checksum(&ip);
    ip[10] = sum[0];
    ip[11] = sum[1];
    h[14..34].copy_from_slice(&ip);
    // UDP: a source port from the 1024..65535 range.
    h[34..36].copy_from_slice(&(entropy | 0x8000).to_be_bytes());
    h[36..38].copy_from_slice(&member.port);
    h[38..40].copy_from_slice(&udp_len.to_be_bytes());
    // GUE variant 0, no extension words, IPv4 inside (bytes 40..42, the UDP checksum, and
    // 44..46, the GUE flags, stay zero).
    h[43] = GUE_PROTO_IPV4;
    Some(h)
}

/// What the receiving side found in a frame sent to its fleet port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decap {
    /// A GUE packet from `sender` carrying an IPv4 UDP packet to `quic_port` whose QUIC
    /// datagram starts at `payload` (`len` bytes): strip [`GUE_OVERHEAD`] bytes after the
    /// Ethernet header.
    Client {
        sender: MemberAddr,
        payload: usize,
        len: usize,
    },
    /// Not for the XDP program (VLAN tags, IPv6, options, GUE extensions): user space
    /// decides.
    Pass,
    /// Malformed GUE or inner packet: dropped.
    Malformed,
}

/// Reads a frame that reached the fleet port: outer Ethernet + IPv4 (no options) + UDP, GUE
/// variant 0 without extensions carrying IPv4, an inner IPv4 header without options and a
/// UDP header to `quic_port`, lengths consistent with each other and the frame.
#[inline(always)]
pub fn decap(pkt: &Packet<'_>, quic_port: u16) -> Decap {
    let Some(eth) = pkt.read::<EthHdr>(0) else {
        return Decap::Pass;
    };
    let Some(outer) = pkt.read::<Ipv4Hdr>(IPV4_OFFSET) else {
        return Decap::Pass;
    };
    if eth.ether_type != ETH_P_IPV4 || outer.version_ihl != 0x45 || outer.protocol != IPPROTO_UDP {
        return Decap::Pass;
    }
    let outer_total = usize::from(u16::from_be_bytes(outer.total_len));
    let Some(gue) = pkt.read::<[u8; GUE_LEN]>(IPV4_OFFSET + 20 + UDP_HDR_LEN) else {
        return Decap::Malformed;
    };
    if gue[0] != 0 || gue[1] != GUE_PROTO_IPV4 {
        // Another variant, a control message, extension words, IPv6 inside: user space.
        return Decap::Pass;
    }
    let Some(inner) = pkt.read::<Ipv4Hdr>(INNER_OFFSET) else {
        return Decap::Malformed;
    };
    let Some(udp) = pkt.read::<UdpHdr>(INNER_OFFSET + 20) else {
        return Decap::Malformed;
    };
    let inner_total = usize::from(u16::from_be_bytes(inner.total_len));
    let udp_len = usize::from(u16::from_be_bytes(udp.len));
    let frag = u16::from_be_bytes(inner.frag_off);
    if inner.version_ihl != 0x45
        || inner.protocol != IPPROTO_UDP
        || frag & 0x3fff != 0
        || u16::from_be_bytes(udp.dst_port) != quic_port
        || outer_total != GUE_OVERHEAD + inner_total
        || IPV4_OFFSET + outer_total > pkt.len()
        || udp_len != inner_total.wrapping_sub(20)
        || udp_len <= UDP_HDR_LEN
    {
        return Decap::Malformed;
    }
    Decap::Client {
        sender: MemberAddr { addr: outer.src },
        payload: INNER_OFFSET + 20 + UDP_HDR_LEN,
        len: udp_len - UDP_HDR_LEN,
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]`, byte arrays only, no padding (size assertions above), every bit
    // pattern valid.
    unsafe impl aya::Pod for super::ServerIdKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FleetMember {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MemberAddr {}
}

#[cfg(test)]
mod tests;
