//! Bounds-checked reads of packet memory, and the Ethernet (+ 802.1Q/802.1ad) / IPv4 / IPv6
//! walk down to a UDP header. Every read checks `start + offset + len <= end` first, which is
//! the shape the verifier accepts; offsets stay small and bounded (no unbounded loops).
//! QUIC itself lives in [`crate::quic`].
//!
//! The XDP program runs this code on packet memory; host tests and the fuzzer run the very
//! same code on a byte slice ([`Packet::over`]).

use core::mem::size_of;

use crate::maps::SourcePrefix;

/// A window of packet memory: `[start, end)` as the kernel hands it to the program.
#[derive(Clone, Copy)]
pub struct Packet {
    start: usize,
    end: usize,
}

impl Packet {
    /// The window `[start, end)` (from `data()` / `data_end()` of a program context).
    #[inline(always)]
    pub const fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    /// The window over `bytes` (host code: tests, fuzzing). The packet must not outlive
    /// `bytes`, which its reads borrow from.
    #[inline(always)]
    pub fn over(bytes: &[u8]) -> Self {
        let start = bytes.as_ptr() as usize;
        Self::new(start, start + bytes.len())
    }

    /// Bytes in the window.
    #[inline(always)]
    pub const fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the window is empty.
    #[inline(always)]
    pub const fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// A pointer to a `T` at `offset`, when all of it lies inside the packet.
    #[inline(always)]
    pub fn ptr_at<T>(&self, offset: usize) -> Option<*const T> {
        if self.start + offset + size_of::<T>() > self.end {
            return None;
        }
        Some((self.start + offset) as *const T)
    }

    /// A copy of the `T` at `offset` (every `T` used here is made of byte arrays, so it has
    /// alignment 1 and every bit pattern is valid).
    #[inline(always)]
    pub fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let p = self.ptr_at::<T>(offset)?;
        // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `p` are inside the packet;
        // the header types have alignment 1 and no invalid bit patterns.
        Some(unsafe { p.read_unaligned() })
    }

    /// The byte at `offset`.
    #[inline(always)]
    pub fn byte(&self, offset: usize) -> Option<u8> {
        self.read::<u8>(offset)
    }
}

/// Ethernet II header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

/// 802.1Q / 802.1ad tag (after the outer EtherType).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VlanHdr {
    pub tci: [u8; 2],
    pub ether_type: [u8; 2],
}

/// IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub checksum: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

/// IPv6 fixed header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub version_class_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// UDP header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub len: [u8; 2],
    pub checksum: [u8; 2],
}

pub const UDP_HDR_LEN: usize = size_of::<UdpHdr>();

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_UDP: u8 = 17;
/// Most VLAN tags walked (802.1ad outer + 802.1Q inner).
const MAX_VLAN_TAGS: usize = 2;

/// Where the UDP header of an Ethernet frame starts, its destination port, and the prefix of
/// the sender's address.
#[derive(Clone, Copy)]
pub struct UdpLocation {
    /// Offset of the UDP header from the start of the frame.
    pub offset: usize,
    /// Destination port, host byte order.
    pub dst_port: u16,
    /// The source address's /24 (IPv4) or /56 (IPv6).
    pub source: SourcePrefix,
}

/// Walks Ethernet, up to two VLAN tags, IPv4 (any IHL) or IPv6 down to a UDP header.
/// `None` for anything else: not IP, not UDP, IPv4 fragments (later fragments carry no UDP
/// header, and a first fragment no whole payload), IPv6 with extension headers, headers cut
/// short. Such packets are "not QUIC" and pass.
#[inline(always)]
pub fn locate_udp(pkt: &Packet) -> Option<UdpLocation> {
    let eth: EthHdr = pkt.read(0)?;
    let mut ether_type = u16::from_be_bytes(eth.ether_type);
    let mut offset = size_of::<EthHdr>();
    let mut tags = 0;
    while tags < MAX_VLAN_TAGS && (ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD) {
        let vlan: VlanHdr = pkt.read(offset)?;
        ether_type = u16::from_be_bytes(vlan.ether_type);
        offset += size_of::<VlanHdr>();
        tags += 1;
    }
    let (udp_offset, source) = match ether_type {
        ETH_P_IPV4 => ipv4_payload(pkt, offset)?,
        ETH_P_IPV6 => ipv6_payload(pkt, offset)?,
        _ => return None,
    };
    let udp: UdpHdr = pkt.read(udp_offset)?;
    Some(UdpLocation {
        offset: udp_offset,
        dst_port: u16::from_be_bytes(udp.dst_port),
        source,
    })
}

/// Offset of the UDP header after the IPv4 header at `offset` (options skipped by IHL), and
/// the source's /24.
#[inline(always)]
fn ipv4_payload(pkt: &Packet, offset: usize) -> Option<(usize, SourcePrefix)> {
    let ip: Ipv4Hdr = pkt.read(offset)?;
    if ip.version_ihl >> 4 != 4 || ip.protocol != IPPROTO_UDP {
        return None;
    }
    let ihl = usize::from(ip.version_ihl & 0x0f) * 4;
    if ihl < size_of::<Ipv4Hdr>() {
        return None;
    }
    // More-fragments flag or a fragment offset: not a whole datagram.
    if u16::from_be_bytes(ip.frag_off) & 0x3fff != 0 {
        return None;
    }
    Some((offset + ihl, SourcePrefix::ipv4(ip.src)))
}

/// Offset of the UDP header after the IPv6 header at `offset` (UDP as the first next header),
/// and the source's /56.
#[inline(always)]
fn ipv6_payload(pkt: &Packet, offset: usize) -> Option<(usize, SourcePrefix)> {
    let ip: Ipv6Hdr = pkt.read(offset)?;
    if ip.version_class_flow[0] >> 4 != 6 || ip.next_header != IPPROTO_UDP {
        return None;
    }
    Some((offset + size_of::<Ipv6Hdr>(), SourcePrefix::ipv6(&ip.src)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ethernet (+ `vlan` tags) + IPv4 (IHL `ihl` words, fragment field `frag`) + UDP to `port`.
    fn ipv4(vlan: usize, ihl: u8, frag: u16, port: u16) -> ([u8; 128], usize) {
        let mut f = [0u8; 128];
        let mut at = 12;
        for _ in 0..vlan {
            f[at..at + 2].copy_from_slice(&ETH_P_8021Q.to_be_bytes());
            at += 4;
        }
        f[at..at + 2].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
        at += 2;
        f[at] = 0x40 | ihl;
        f[at + 6..at + 8].copy_from_slice(&frag.to_be_bytes());
        f[at + 9] = IPPROTO_UDP;
        f[at + 12..at + 16].copy_from_slice(&[192, 0, 2, 7]);
        let udp = at + usize::from(ihl) * 4;
        f[udp + 2..udp + 4].copy_from_slice(&port.to_be_bytes());
        (f, udp)
    }

    #[test]
    fn the_udp_header_is_found_through_vlan_tags_and_ip_options() {
        for (vlan, ihl) in [(0, 5), (1, 5), (2, 7)] {
            let (frame, udp) = ipv4(vlan, ihl, 0, 443);
            let loc = locate_udp(&Packet::over(&frame)).map(|l| (l.offset, l.dst_port));
            assert_eq!(loc, Some((udp, 443)), "{vlan} tags, IHL {ihl}");
        }
    }

    #[test]
    fn fragments_short_headers_and_other_protocols_are_not_udp() {
        let (more_fragments, _) = ipv4(0, 5, 0x2000, 443);
        assert!(locate_udp(&Packet::over(&more_fragments)).is_none());
        let (later_fragment, _) = ipv4(0, 5, 0x0010, 443);
        assert!(locate_udp(&Packet::over(&later_fragment)).is_none());
        let (bad_ihl, _) = ipv4(0, 4, 0, 443);
        assert!(locate_udp(&Packet::over(&bad_ihl)).is_none());
        let (frame, _) = ipv4(0, 5, 0, 443);
        assert!(
            locate_udp(&Packet::over(&frame[..30])).is_none(),
            "cut short"
        );
        let mut v6 = [0u8; 80];
        v6[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        v6[14] = 0x60;
        v6[20] = 0; // hop-by-hop options first: not parsed, passes
        assert!(locate_udp(&Packet::over(&v6)).is_none());
        v6[20] = IPPROTO_UDP;
        assert!(locate_udp(&Packet::over(&v6)).is_some_and(|l| l.offset == 14 + 40));
    }
}
