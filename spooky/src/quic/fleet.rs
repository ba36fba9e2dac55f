//! Sans-IO: packets that reached the wrong host of a fleet, carried to the host their
//! connection ID names. The format is GUE (Generic UDP Encapsulation,
//! draft-ietf-intarea-gue, variant 0), the one Katran and Cloudflare's Unimog use: a 4-byte
//! GUE header, then the packet as the client sent it — IPv4 or IPv6 header, UDP header, QUIC
//! datagram — so the owner sees the client's address and the address the client sent to,
//! and answers the client directly from it.
//!
//! ```text
//! GUE: 0b00 (variant) | C=0 | Hlen=0 (5 bits) | protocol (4 = IPv4, 41 = IPv6) | flags 0 (16 bits)
//! then 20-byte IPv4 header (no options) or 40-byte IPv6 header, 8-byte UDP header, payload
//! ```
//!
//! The member table (`fleet.members`) says which server id lives where; forwarded packets
//! are accepted only from a member's address, and a packet that arrived forwarded is never
//! forwarded again (no loops, whatever the tables say).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Bytes of the GUE header.
pub const GUE_LEN: usize = 4;
/// Most bytes encapsulation adds: GUE, IPv6, UDP.
pub const MAX_OVERHEAD: usize = GUE_LEN + 40 + 8;

const PROTO_IPV4: u8 = 4;
const PROTO_IPV6: u8 = 41;
const PROTO_UDP: u8 = 17;

/// The fleet as one host sees it: where each other server id lives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Members {
    by_id: HashMap<Vec<u8>, SocketAddr>,
    addresses: HashSet<IpAddr>,
}

impl Members {
    /// The table of `(server id, forwarding address)` pairs; `own` (this host's server id)
    /// is kept for the address check but never forwarded to.
    pub fn new(members: &[(Vec<u8>, SocketAddr)], own: &[u8]) -> Self {
        let mut by_id = HashMap::new();
        let mut addresses = HashSet::new();
        for (id, addr) in members {
            addresses.insert(canonical(addr.ip()));
            if id.as_slice() != own {
                by_id.insert(id.clone(), *addr);
            }
        }
        Self { by_id, addresses }
    }

    /// Where packets for `server_id` go, if it is another member's.
    pub fn address_of(&self, server_id: &[u8]) -> Option<SocketAddr> {
        self.by_id.get(server_id).copied()
    }

    /// Whether `ip` is a member's address (forwarded packets are taken only from members).
    pub fn is_member(&self, ip: IpAddr) -> bool {
        self.addresses.contains(&canonical(ip))
    }

    /// Whether the table names any other host.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// An IPv4-mapped IPv6 address as IPv4; anything else as is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Writes into `out` the GUE packet carrying `payload` as a datagram from `client` to
/// `server` (the address the client sent to). Returns its length, or `None` when `out` is too
/// small, the payload too large for one IP packet, or the two addresses of different families.
pub fn encapsulate(
    client: SocketAddr,
    server: SocketAddr,
    payload: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    let udp_len = u16::try_from(8 + payload.len()).ok()?;
    let addresses = (canonical(client.ip()), canonical(server.ip()));
    let (ip_len, proto) = match addresses {
        (IpAddr::V4(_), IpAddr::V4(_)) => (20, PROTO_IPV4),
        (IpAddr::V6(_), IpAddr::V6(_)) => (40, PROTO_IPV6),
        _ => return None,
    };
    let total = GUE_LEN + ip_len + usize::from(udp_len);
    let out = out.get_mut(..total)?;
    out[..GUE_LEN].copy_from_slice(&[0, proto, 0, 0]);
    let ip = &mut out[GUE_LEN..];
    match addresses {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let len = u16::try_from(20 + usize::from(udp_len)).ok()?;
            let h = &mut ip[..20];
            h.fill(0);
            h[0] = 0x45; // version 4, 5 words of header
            h[2..4].copy_from_slice(&len.to_be_bytes());
            h[6] = 0x40; // don't fragment
            h[8] = 64; // TTL
            h[9] = PROTO_UDP;
            h[12..16].copy_from_slice(&src.octets());
            h[16..20].copy_from_slice(&dst.octets());
            let sum = checksum(&ip[..20], 0);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            ip[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 0, PROTO_UDP, 64]);
            ip[4..6].copy_from_slice(&udp_len.to_be_bytes());
            ip[8..24].copy_from_slice(&src.octets());
            ip[24..40].copy_from_slice(&dst.octets());
        }
        _ => return None,
    }
    let (head, udp) = ip.split_at_mut(ip_len);
    udp[0..2].copy_from_slice(&client.port().to_be_bytes());
    udp[2..4].copy_from_slice(&server.port().to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    udp[8..].copy_from_slice(payload);
    // IPv4 may leave the UDP checksum out; IPv6 may not (RFC 8200 §8.1).
    if proto == PROTO_IPV6 {
        let mut pseudo = [0u8; 40];
        pseudo[..32].copy_from_slice(&head[8..40]);
        pseudo[32..36].copy_from_slice(&u32::from(udp_len).to_be_bytes());
        pseudo[39] = PROTO_UDP;
        let sum = match checksum(udp, fold(&pseudo)) {
            0 => 0xffff,
            s => s,
        };
        udp[6..8].copy_from_slice(&sum.to_be_bytes());
    }
    Some(total)
}

/// A forwarded packet taken apart: the client's address, the address it sent to, and where
/// the QUIC datagram lies in the buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inner {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub payload: std::ops::Range<usize>,
}

/// Why a packet on the forwarding port was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Not GUE variant 0 carrying IPv4 or IPv6 (or a control message).
    Gue,
    /// The inner IP header is cut short, has options, a bad checksum, or is not UDP.
    Ip,
    /// The inner UDP length disagrees with the IP header's.
    Udp,
}

/// Takes a GUE packet apart (extension fields skipped, as GUE allows).
///
/// # Errors
/// [`Malformed`] saying which layer is wrong.
pub fn decapsulate(packet: &[u8]) -> Result<Inner, Malformed> {
    let gue = packet.get(..GUE_LEN).ok_or(Malformed::Gue)?;
    // Variant 0, data message (C = 0).
    if gue[0] & 0xe0 != 0 {
        return Err(Malformed::Gue);
    }
    let start = GUE_LEN + 4 * usize::from(gue[0] & 0x1f);
    let ip = packet.get(start..).ok_or(Malformed::Gue)?;
    let (src, dst, ip_len, ip_total) = match gue[1] {
        PROTO_IPV4 => {
            let h = ip.get(..20).ok_or(Malformed::Ip)?;
            if h[0] != 0x45 || h[9] != PROTO_UDP || checksum(h, 0) != 0 {
                return Err(Malformed::Ip);
            }
            // Fragments are not expected: a QUIC datagram fits one packet.
            if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
                return Err(Malformed::Ip);
            }
            let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
            let src: [u8; 4] = h[12..16].try_into().map_err(|_| Malformed::Ip)?;
            let dst: [u8; 4] = h[16..20].try_into().map_err(|_| Malformed::Ip)?;
            (
                IpAddr::V4(Ipv4Addr::from(src)),
                IpAddr::V4(Ipv4Addr::from(dst)),
                20,
                total,
            )
        }
        PROTO_IPV6 => {
            let h = ip.get(..40).ok_or(Malformed::Ip)?;
            if h[0] >> 4 != 6 || h[6] != PROTO_UDP {
                return Err(Malformed::Ip);
            }
            let total = 40 + usize::from(u16::from_be_bytes([h[4], h[5]]));
            let src: [u8; 16] = h[8..24].try_into().map_err(|_| Malformed::Ip)?;
            let dst: [u8; 16] = h[24..40].try_into().map_err(|_| Malformed::Ip)?;
            let (src, dst) = (Ipv6Addr::from(src), Ipv6Addr::from(dst));
            // IPv4-mapped addresses never appear in IPv6 headers on the wire (RFC 4291
            // §2.5.5.2); an IPv4 client travels in an IPv4 packet.
            if src.to_ipv4_mapped().is_some() || dst.to_ipv4_mapped().is_some() {
                return Err(Malformed::Ip);
            }
            (IpAddr::V6(src), IpAddr::V6(dst), 40, total)
        }
        _ => return Err(Malformed::Gue),
    };
    if ip_total != ip.len() {
        return Err(Malformed::Ip);
    }
    let udp = ip.get(ip_len..ip_len + 8).ok_or(Malformed::Udp)?;
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len != ip_total - ip_len {
        return Err(Malformed::Udp);
    }
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    let payload_start = start + ip_len + 8;
    Ok(Inner {
        client: SocketAddr::new(src, sport),
        server: SocketAddr::new(dst, dport),
        payload: payload_start..start + ip_total,
    })
}

/// The Internet checksum (RFC 1071) of `data`, starting from the folded sum `initial`.
fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial + fold(data);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The one's-complement sum of `data` as 16-bit words, folded into 17 bits at most.
fn fold(data: &[u8]) -> u32 {
    let mut sum: u32 = 0;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

#[cfg(test)]
mod tests;
