//! The PROXY protocol header (HAProxy's, versions 1 and 2) a load balancer puts in front of a
//! TCP connection to say whose it is: sans-IO parsing, and the stream that hands what came
//! after the header to TLS.
//!
//! Only sources in `listen.tcp.proxy_protocol.trusted` may send one, and from them it is
//! required (as HAProxy's `accept-proxy`): otherwise any client could claim any address.
//! A version 2 `LOCAL` header (the balancer's own health check) or an address family other
//! than TCP over IPv4/IPv6 keeps the connection's own address.

use bytes::Bytes;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// Version 2's signature (its first 12 bytes).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A version 1 line is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// The most we read for a header (version 2 may carry TLVs; we skip them).
pub const MAX_HEADER: usize = 4096;

/// A parse that needs no more bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    /// The client's address, when the header carries one (TCP over IPv4 or IPv6, `PROXY`).
    pub source: Option<SocketAddr>,
    /// The header's length: what follows it is the connection's data.
    pub len: usize,
}

/// Parses a header at the start of `buf`: `Ok(None)` when more bytes are needed.
///
/// # Errors
/// What is wrong (no header at all, or a malformed one).
pub fn parse(buf: &[u8]) -> Result<Option<Header>, &'static str> {
    if buf.len() < V2_SIGNATURE.len() && V2_SIGNATURE.starts_with(buf)
        || buf.len() < 6 && b"PROXY ".starts_with(buf)
    {
        return Ok(None);
    }
    if buf.starts_with(V2_SIGNATURE) {
        return parse_v2(buf);
    }
    if buf.starts_with(b"PROXY ") {
        return parse_v1(buf);
    }
    Err("the connection did not open with a PROXY protocol header")
}

fn parse_v1(buf: &[u8]) -> Result<Option<Header>, &'static str> {
    let Some(end) = buf.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err("PROXY v1 line longer than 107 bytes")
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| "PROXY v1 line is not text")?;
    let len = end + 2;
    let mut parts = line.split(' ');
    let _proxy = parts.next();
    let family = parts.next().ok_or("PROXY v1 line without a protocol")?;
    if family == "UNKNOWN" {
        return Ok(Some(Header { source: None, len }));
    }
    let fields: Vec<&str> = parts.collect();
    let [src, _dst, sport, _dport] = fields[..] else {
        return Err("PROXY v1 line does not have 4 address fields");
    };
    let ip: IpAddr = match family {
        "TCP4" => IpAddr::V4(src.parse().map_err(|_| "bad PROXY v1 IPv4 source")?),
        "TCP6" => IpAddr::V6(src.parse().map_err(|_| "bad PROXY v1 IPv6 source")?),
        _ => return Err("PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN"),
    };
    // Decimal without leading zeros, as the specification writes it.
    if sport.is_empty() || (sport.len() > 1 && sport.starts_with('0')) {
        return Err("bad PROXY v1 source port");
    }
    let port: u16 = sport.parse().map_err(|_| "bad PROXY v1 source port")?;
    Ok(Some(Header {
        source: Some(SocketAddr::new(ip, port)),
        len,
    }))
}

fn parse_v2(buf: &[u8]) -> Result<Option<Header>, &'static str> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err("PROXY v2 header with another version");
    }
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + body;
    if len > MAX_HEADER {
        return Err("PROXY v2 header too long");
    }
    if buf.len() < len {
        return Ok(None);
    }
    let addr = &buf[16..len];
    let source = match (command, buf[13]) {
        // LOCAL: the balancer speaking for itself.
        (0, _) => None,
        (1, 0x11) if addr.len() >= 12 => {
            let ip = Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([addr[8], addr[9]]),
            ))
        }
        (1, 0x21) if addr.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&addr[..16]);
            let port = u16::from_be_bytes([addr[32], addr[33]]);
            Some(SocketAddr::new(Ipv6Addr::from(octets).into(), port))
        }
        (1, 0x11 | 0x21) => return Err("PROXY v2 address block too short"),
        // UDP, UNIX or unspecified: not a TCP client address.
        (1, _) => None,
        _ => return Err("PROXY v2 command is neither LOCAL nor PROXY"),
    };
    Ok(Some(Header { source, len }))
}

/// Whether a connection's first byte could start a PROXY header (from a source that may not
/// send one). A TLS connection starts with 0x16.
pub fn looks_like_header(first: u8) -> bool {
    first == b'P' || first == b'\r'
}

/// A stream that first hands out `prefix` (bytes read past a PROXY header), then reads on.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

writes_through!(Rewind);

#[cfg(test)]
mod tests {
    use super::*;

    fn done(buf: &[u8]) -> Header {
        match parse(buf) {
            Ok(Some(h)) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn version_1() {
        let line = b"PROXY TCP4 198.51.100.7 10.0.0.1 51234 443\r\n\x16\x03";
        let h = done(line);
        assert_eq!(h.source, Some("198.51.100.7:51234".parse().unwrap()));
        assert_eq!(&line[h.len..], b"\x16\x03", "what follows is left for TLS");
        let h = done(b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n");
        assert_eq!(h.source, Some("[2001:db8::7]:51234".parse().unwrap()));
        assert_eq!(done(b"PROXY UNKNOWN\r\n").source, None);
        // Incomplete, then malformed.
        assert_eq!(parse(b"PRO"), Ok(None));
        assert_eq!(parse(b"PROXY TCP4 198.51.100.7"), Ok(None));
        assert!(parse(b"PROXY TCP4 198.51.100.7 10.0.0.1 051234 443\r\n").is_err());
        assert!(parse(b"PROXY TCP4 nope 10.0.0.1 1 443\r\n").is_err());
        assert!(parse(b"PROXY UDP4 198.51.100.7 10.0.0.1 1 443\r\n").is_err());
        assert!(parse(&[b'P'; 200]).is_err());
        let mut long = b"PROXY TCP4 ".to_vec();
        long.extend_from_slice(&[b'1'; 120]);
        assert!(parse(&long).is_err(), "no CRLF within 107 bytes");
    }

    fn v2(command: u8, family: u8, addr: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addr.len() as u16).to_be_bytes());
        h.extend_from_slice(addr);
        h
    }

    #[test]
    fn version_2() {
        let mut a = vec![198, 51, 100, 7, 10, 0, 0, 1];
        a.extend_from_slice(&51234u16.to_be_bytes());
        a.extend_from_slice(&443u16.to_be_bytes());
        // A TLV after the addresses is skipped.
        a.extend_from_slice(&[0x04, 0x00, 0x01, 0xff]);
        let mut buf = v2(1, 0x11, &a);
        let total = buf.len();
        buf.extend_from_slice(b"\x16\x03");
        let h = done(&buf);
        assert_eq!(h.source, Some("198.51.100.7:51234".parse().unwrap()));
        assert_eq!(h.len, total);
        // Byte by byte, it needs more until the end.
        for n in 0..total {
            assert_eq!(parse(&buf[..n]), Ok(None), "{n} bytes");
        }
        let mut a6 = vec![0u8; 36];
        a6[..16].copy_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        a6[32..34].copy_from_slice(&8443u16.to_be_bytes());
        assert_eq!(
            done(&v2(1, 0x21, &a6)).source,
            Some("[2001:db8::7]:8443".parse().unwrap())
        );
        assert_eq!(done(&v2(0, 0x00, &[])).source, None, "LOCAL");
        assert_eq!(done(&v2(1, 0x31, &[0; 216])).source, None, "UNIX");
        assert!(parse(&v2(1, 0x11, &[1, 2, 3])).is_err(), "short addresses");
        assert!(parse(&v2(2, 0x11, &a)).is_err(), "unknown command");
        let mut v3 = v2(1, 0x11, &a);
        v3[12] = 0x31;
        assert!(parse(&v3).is_err(), "version 3");
    }

    #[test]
    fn what_spooky_sends_to_backends_reads_back() {
        let local: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let backend: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        for client in ["198.51.100.7:4000", "[2001:db8::7]:4001"] {
            let client: SocketAddr = client.parse().unwrap();
            let h = crate::upstream::proxy_v2_header(Some(client), local, backend);
            let parsed = done(&h);
            assert_eq!(parsed.source, Some(client));
            assert_eq!(parsed.len, h.len());
        }
        let probe = crate::upstream::proxy_v2_header(None, local, backend);
        assert_eq!(done(&probe).source, None, "LOCAL");
    }

    #[test]
    fn anything_else_is_not_a_header() {
        assert!(parse(b"\x16\x03\x01\x02\x00").is_err());
        assert!(parse(b"GET / HTTP/1.1\r\n").is_err());
        assert!(looks_like_header(b'P') && looks_like_header(b'\r'));
        assert!(!looks_like_header(0x16));
    }
}
