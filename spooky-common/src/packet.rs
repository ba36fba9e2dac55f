//! Bounds-checked reads of packet memory, and the Ethernet (+ 802.1Q/802.1ad) / IPv4 / IPv6
//! walk down to a UDP header. Every read checks `start + offset + len <= end` first, which is
//! the shape the verifier accepts; offsets stay small and bounded (no unbounded loops).
//! QUIC itself lives in [`crate::quic`].
//!
//! The XDP program runs this code on packet memory; host tests and the fuzzer run the very
//! same code on a byte slice ([`Packet::over`]).

use core::marker::PhantomData;
use core::mem::size_of;

use crate::maps::SourcePrefix;

/// Types a [`Packet`] may be read as: plain bytes whatever their values.
///
/// # Safety
/// Implement it only for types made of `u8`s and byte arrays: alignment 1, no padding, and
/// every bit pattern a valid value. [`Packet::read`] copies packet bytes into one.
pub unsafe trait Plain: Copy {}

// SAFETY: one byte; every value is valid.
unsafe impl Plain for u8 {}
// SAFETY: bytes; every value is valid.
unsafe impl<const N: usize> Plain for [u8; N] {}

/// A window of packet memory: `[start, end)` as the kernel hands it to the program, readable
/// for `'a`.
#[derive(Clone, Copy)]
pub struct Packet<'a> {
    start: usize,
    end: usize,
    memory: PhantomData<&'a [u8]>,
}

impl<'a> Packet<'a> {
    /// The window `[start, end)` (from `data()` / `data_end()` of a program context).
    ///
    /// # Safety
    /// Every byte of `[start, end)` must be readable memory for as long as `'a` lasts (for a
    /// program context: while the program runs), and `start <= end`.
    #[inline(always)]
    pub const unsafe fn new(start: usize, end: usize) -> Self {
        Self {
            start,
            end,
            memory: PhantomData,
        }
    }

    /// The window over `bytes` (host code: tests, fuzzing); it borrows them.
    #[inline(always)]
    pub fn over(bytes: &'a [u8]) -> Self {
        let start = bytes.as_ptr() as usize;
        // SAFETY: `bytes` is readable for `'a`, and the window is exactly its bytes.
        unsafe { Self::new(start, start + bytes.len()) }
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

    /// A copy of the `T` at `offset`, when all of it lies inside the packet.
    #[inline(always)]
    pub fn read<T: Plain>(&self, offset: usize) -> Option<T> {
        if self.start + offset + size_of::<T>() > self.end {
            return None;
        }
        let p = (self.start + offset) as *const T;
        // SAFETY: the check above keeps `size_of::<T>()` bytes at `p` inside the window,
        // readable for `'a` (`new`'s contract); `T: Plain` has alignment 1 (read unaligned
        // anyway) and no invalid bit patterns.
        Some(unsafe { p.read_unaligned() })
    }

    /// The byte at `offset`.
    #[inline(always)]
    pub fn byte(&self, offset: usize) -> Option<u8> {
        self.read::<u8>(offset)
    }
}

/// What [`crate::quic::parse`] reads: packet memory ([`Packet`], the XDP program's) or a copy
/// of a packet's first bytes (`[u8]`: the sk_reuseport program's, which `bpf_skb_load_bytes`
/// fills whether or not the bytes are in the socket buffer's linear area).
pub trait Bytes {
    /// The byte at `offset`, when it is there.
    fn byte(&self, offset: usize) -> Option<u8>;
    /// The `N` bytes at `offset`, when all are there.
    fn array<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

impl Bytes for Packet<'_> {
    #[inline(always)]
    fn byte(&self, offset: usize) -> Option<u8> {
        Packet::byte(self, offset)
    }

    #[inline(always)]
    fn array<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.read(offset)
    }
}

impl Bytes for [u8] {
    #[inline(always)]
    fn byte(&self, offset: usize) -> Option<u8> {
        self.get(offset).copied()
    }

    #[inline(always)]
    fn array<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.get(offset..offset.checked_add(N)?)?.try_into().ok()
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

// SAFETY: byte fields only (`repr(C)`, alignment 1, no padding).
unsafe impl Plain for EthHdr {}

/// 802.1Q / 802.1ad tag (after the outer EtherType).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VlanHdr {
    pub tci: [u8; 2],
    pub ether_type: [u8; 2],
}

// SAFETY: byte fields only (`repr(C)`, alignment 1, no padding).
unsafe impl Plain for VlanHdr {}

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

// SAFETY: byte fields only (`repr(C)`, alignment 1, no padding).
unsafe impl Plain for Ipv4Hdr {}

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

// SAFETY: byte fields only (`repr(C)`, alignment 1, no padding).
unsafe impl Plain for Ipv6Hdr {}

/// UDP header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub len: [u8; 2],
    pub checksum: [u8; 2],
}

// SAFETY: byte fields only (`repr(C)`, alignment 1, no padding).
unsafe impl Plain for UdpHdr {}

pub const UDP_HDR_LEN: usize = size_of::<UdpHdr>();

// What `Plain` promises, checked: the header types are their wire sizes, with no padding, at
// alignment 1.
const _: () = {
    use core::mem::align_of;
    assert!(size_of::<EthHdr>() == 14 && align_of::<EthHdr>() == 1);
    assert!(size_of::<VlanHdr>() == 4 && align_of::<VlanHdr>() == 1);
    assert!(size_of::<Ipv4Hdr>() == 20 && align_of::<Ipv4Hdr>() == 1);
    assert!(size_of::<Ipv6Hdr>() == 40 && align_of::<Ipv6Hdr>() == 1);
    assert!(size_of::<UdpHdr>() == 8 && align_of::<UdpHdr>() == 1);
};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_UDP: u8 = 17;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
/// Most IPv6 extension headers walked before the UDP header.
const MAX_IPV6_EXTENSIONS: usize = 4;
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
    /// The datagram is the first fragment of a fragmented one (QUIC forbids IP
    /// fragmentation: RFC 9000 §14).
    pub fragment: bool,
}

/// Walks Ethernet, up to two VLAN tags, IPv4 (any IHL) or IPv6 (through up to four
/// hop-by-hop, routing, destination-options and fragment headers) down to a UDP header.
/// A first fragment is found and marked ([`UdpLocation::fragment`]). `None` for anything
/// else: not IP, not UDP, a later fragment (it carries no UDP header), headers cut short.
/// Such packets are "not QUIC" and pass.
#[inline(always)]
pub fn locate_udp(pkt: &Packet<'_>) -> Option<UdpLocation> {
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
    let (udp_offset, source, fragment) = match ether_type {
        ETH_P_IPV4 => ipv4_payload(pkt, offset)?,
        ETH_P_IPV6 => ipv6_payload(pkt, offset)?,
        _ => return None,
    };
    let udp: UdpHdr = pkt.read(udp_offset)?;
    Some(UdpLocation {
        offset: udp_offset,
        dst_port: u16::from_be_bytes(udp.dst_port),
        source,
        fragment,
    })
}

/// Offset of the UDP header after the IPv4 header at `offset` (options skipped by IHL), the
/// source's /24, and whether it is a first fragment.
#[inline(always)]
fn ipv4_payload(pkt: &Packet<'_>, offset: usize) -> Option<(usize, SourcePrefix, bool)> {
    let ip: Ipv4Hdr = pkt.read(offset)?;
    if ip.version_ihl >> 4 != 4 || ip.protocol != IPPROTO_UDP {
        return None;
    }
    let ihl = usize::from(ip.version_ihl & 0x0f) * 4;
    if ihl < size_of::<Ipv4Hdr>() {
        return None;
    }
    let frag = u16::from_be_bytes(ip.frag_off);
    // A later fragment carries no UDP header; a first one (more-fragments set) does.
    if frag & 0x1fff != 0 {
        return None;
    }
    let first_fragment = frag & 0x2000 != 0;
    Some((offset + ihl, SourcePrefix::ipv4(ip.src), first_fragment))
}

/// Offset of the UDP header after the IPv6 header at `offset` and its extension headers, the
/// source's /56, and whether it is a first fragment.
#[inline(always)]
fn ipv6_payload(pkt: &Packet<'_>, offset: usize) -> Option<(usize, SourcePrefix, bool)> {
    let ip: Ipv6Hdr = pkt.read(offset)?;
    if ip.version_class_flow[0] >> 4 != 6 {
        return None;
    }
    let source = SourcePrefix::ipv6(&ip.src);
    let mut next = ip.next_header;
    let mut at = offset + size_of::<Ipv6Hdr>();
    let mut fragment = false;
    let mut walked = 0;
    while walked < MAX_IPV6_EXTENSIONS {
        match next {
            IPPROTO_UDP => return Some((at, source, fragment)),
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                // Next header, then the length in 8-byte units beyond the first 8.
                let [nh, len]: [u8; 2] = pkt.read(at)?;
                next = nh;
                at += (usize::from(len) + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let [nh, _, off_hi, off_lo]: [u8; 4] = pkt.read(at)?;
                // A later fragment carries no UDP header.
                if u16::from_be_bytes([off_hi, off_lo]) & 0xfff8 != 0 {
                    return None;
                }
                fragment = true;
                next = nh;
                at += 8;
            }
            _ => return None,
        }
        walked += 1;
    }
    (next == IPPROTO_UDP).then_some((at, source, fragment))
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
    fn first_fragments_are_marked_later_ones_and_other_protocols_are_not_udp() {
        let (more_fragments, udp) = ipv4(0, 5, 0x2000, 443);
        let loc = locate_udp(&Packet::over(&more_fragments));
        assert!(loc.is_some_and(|l| l.fragment && l.offset == udp && l.dst_port == 443));
        let (whole, _) = ipv4(0, 5, 0x4000, 443); // don't-fragment: a whole datagram
        assert!(locate_udp(&Packet::over(&whole)).is_some_and(|l| !l.fragment));
        let (later_fragment, _) = ipv4(0, 5, 0x0010, 443);
        assert!(locate_udp(&Packet::over(&later_fragment)).is_none());
        let (bad_ihl, _) = ipv4(0, 4, 0, 443);
        assert!(locate_udp(&Packet::over(&bad_ihl)).is_none());
        let (frame, _) = ipv4(0, 5, 0, 443);
        assert!(
            locate_udp(&Packet::over(&frame[..30])).is_none(),
            "cut short"
        );
    }

    /// Ethernet + IPv6 whose next headers are `chain` (each extension 8 bytes, a fragment
    /// header with offset `frag_off`), then UDP to port 443.
    fn ipv6(chain: &[u8], frag_off: u16) -> ([u8; 160], usize) {
        let mut f = [0u8; 160];
        f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        f[14] = 0x60;
        let mut next_at = 20;
        let mut at = 14 + 40;
        for &h in chain {
            f[next_at] = h;
            if h == IPV6_FRAGMENT {
                f[at + 2..at + 4].copy_from_slice(&frag_off.to_be_bytes());
            }
            next_at = at;
            at += 8;
        }
        f[next_at] = IPPROTO_UDP;
        f[at + 2..at + 4].copy_from_slice(&443u16.to_be_bytes());
        (f, at)
    }

    #[test]
    fn ipv6_extension_headers_are_walked_and_fragments_marked() {
        let (plain, udp) = ipv6(&[], 0);
        assert!(locate_udp(&Packet::over(&plain)).is_some_and(|l| l.offset == udp && !l.fragment));
        let (ext, udp) = ipv6(&[IPV6_HOP_BY_HOP, IPV6_DEST_OPTS], 0);
        assert!(locate_udp(&Packet::over(&ext)).is_some_and(|l| l.offset == udp && !l.fragment));
        let (first, udp) = ipv6(&[IPV6_FRAGMENT], 0x0001); // offset 0, more fragments
        assert!(locate_udp(&Packet::over(&first)).is_some_and(|l| l.offset == udp && l.fragment));
        let (later, _) = ipv6(&[IPV6_FRAGMENT], 0x0008);
        assert!(locate_udp(&Packet::over(&later)).is_none());
        let (deep, _) = ipv6(&[IPV6_HOP_BY_HOP; 5], 0);
        assert!(
            locate_udp(&Packet::over(&deep)).is_none(),
            "more than four extensions"
        );
        let (tcp, _) = ipv6(&[6], 0);
        assert!(locate_udp(&Packet::over(&tcp)).is_none());
    }
}
