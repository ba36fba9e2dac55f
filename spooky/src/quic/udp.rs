//! UDP sends with generic segmentation offload: consecutive QUIC packets to the same peer go
//! to the kernel in one `sendmsg` with a `UDP_SEGMENT` control message, which the kernel (or
//! the NIC) splits into datagrams. Where the kernel refuses GSO, packets are sent one by one
//! and GSO stays off for that socket.
//!
//! On a socket bound to a wildcard address (`0.0.0.0`, `::`) the kernel says which of the
//! host's addresses each datagram was sent to (`IP_PKTINFO`, `IPV6_RECVPKTINFO`), and every
//! send names the address to send from: replies leave from the address the client used
//! (a VIP on the loopback, say), not from the outgoing interface's own.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

/// Most segments in one GSO send (the kernel's limit is 64).
pub const MAX_SEGMENTS: usize = 64;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;

/// Sends `buf` to `dst` as datagrams of `seg` bytes (the last may be shorter) with one
/// `sendmsg`, from `src` when given (for wildcard-bound sockets). Returns the bytes sent.
///
/// # Errors
/// The `sendmsg` error (`WouldBlock` included; the caller waits for writability).
pub fn send_gso(
    socket: &impl AsRawFd,
    buf: &[u8],
    seg: usize,
    dst: SocketAddr,
    src: Option<IpAddr>,
) -> std::io::Result<usize> {
    let addr = socket2::SockAddr::from(dst);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // Room for a cmsg carrying a u16 and one carrying an in6_pktinfo, aligned as the kernel
    // expects.
    let mut control = [0u64; 12];
    let mut used = 0usize;
    // SAFETY: msghdr is plain data; every pointer set below refers to storage that outlives
    // the sendmsg call; the CMSG_* walk stays within `control`, sized for both cmsgs, and
    // `msg_controllen` grows only by the space of the cmsg just written.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = addr.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = addr.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        if seg < buf.len() {
            (*cmsg).cmsg_level = SOL_UDP;
            (*cmsg).cmsg_type = UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), seg as u16);
            used += libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize;
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        match (src, dst) {
            (Some(src), SocketAddr::V4(_)) => {
                let IpAddr::V4(v4) = crate::quic::fleet::canonical(src) else {
                    return Err(std::io::Error::other("IPv6 source for an IPv4 peer"));
                };
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                (*cmsg).cmsg_level = libc::IPPROTO_IP;
                (*cmsg).cmsg_type = libc::IP_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(&info) as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
                used += libc::CMSG_SPACE(std::mem::size_of_val(&info) as u32) as usize;
            }
            (Some(src), SocketAddr::V6(_)) => {
                let v6 = match src {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
                (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(&info) as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
                used += libc::CMSG_SPACE(std::mem::size_of_val(&info) as u32) as usize;
            }
            (None, _) => {}
        }
        msg.msg_controllen = used;
        if used == 0 {
            msg.msg_control = std::ptr::null_mut();
        }
        let n = libc::sendmsg(socket.as_raw_fd(), &msg, 0);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Asks the kernel to say, with each datagram, which local address it was sent to (for a
/// socket bound to a wildcard address). False when it refused.
pub fn enable_pktinfo(socket: &impl AsRawFd, ipv6: bool) -> bool {
    if ipv6 {
        // IPv4 datagrams on a dual-stack socket come with an IPv4-mapped IPV6_PKTINFO.
        switch_on(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        switch_on(socket, libc::IPPROTO_IP, libc::IP_PKTINFO)
    }
}

const UDP_GRO: libc::c_int = 104;

/// Asks the kernel to coalesce consecutive datagrams of a flow (UDP GRO); false when the
/// kernel does not support it.
pub fn enable_gro(socket: &impl AsRawFd) -> bool {
    switch_on(socket, SOL_UDP, UDP_GRO)
}

/// Sets the integer socket option `level`/`name` to 1; false when the kernel refused.
fn switch_on(socket: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&on`, which lives for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// What a received message's control data says: the GRO segment size, if the kernel
/// coalesced, and the local address the datagram was sent to, if asked for.
///
/// # Safety
/// `msg` must be a message the kernel just filled, its control pointer still valid.
unsafe fn control_data(msg: &libc::msghdr) -> (Option<usize>, Option<IpAddr>) {
    let (mut seg, mut to) = (None, None);
    // SAFETY: the CMSG_* walk stays within `msg_controllen` as the kernel set it, and each
    // payload is read as the type its level and type say the kernel wrote.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                (SOL_UDP, UDP_GRO) => {
                    let size =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                    if size > 0 {
                        seg = Some(size as usize);
                    }
                }
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>());
                    to = Some(IpAddr::from(info.ipi_addr.s_addr.to_ne_bytes()));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in6_pktinfo>());
                    to = Some(IpAddr::from(info.ipi6_addr.s6_addr));
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    (seg, to)
}

/// The sender address the kernel wrote into `storage`.
fn sender(storage: &libc::sockaddr_storage) -> std::io::Result<SocketAddr> {
    // SAFETY: the family field says which sockaddr type the storage holds; both fit in it.
    unsafe {
        match i32::from(storage.ss_family) {
            libc::AF_INET => {
                let sin = &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                Ok(SocketAddr::from((
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let sin6 =
                    &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                Ok(SocketAddr::V6(std::net::SocketAddrV6::new(
                    sin6.sin6_addr.s6_addr.into(),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => Err(std::io::Error::other("sender is not an IP address")),
        }
    }
}

/// Datagrams per `recvmmsg`.
pub const BATCH: usize = 16;

/// One message of a [`RecvBatch`]: `len` bytes from `from`, `seg`-byte datagrams if the kernel
/// coalesced several (GRO), sent to local address `to` (when the socket asked to know).
#[derive(Clone, Copy)]
pub struct Received {
    pub len: usize,
    pub from: SocketAddr,
    pub seg: Option<usize>,
    pub to: Option<IpAddr>,
}

/// Buffers for receiving up to [`BATCH`] messages with one `recvmmsg`, each up to `slot`
/// bytes (a GRO-coalesced message can be up to 64 KiB). The default is empty (a placeholder
/// while a batch is being read; receiving into it fails).
#[derive(Default)]
pub struct RecvBatch {
    buf: Vec<u8>,
    slot: usize,
    addrs: Vec<libc::sockaddr_storage>,
    controls: Vec<[u64; 16]>,
    got: Vec<Received>,
}

impl RecvBatch {
    pub fn new(slot: usize) -> Self {
        Self {
            buf: vec![0; slot * BATCH],
            slot,
            // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            controls: vec![[0u64; 16]; BATCH],
            got: Vec::with_capacity(BATCH),
        }
    }

    /// Receives what is queued, up to [`BATCH`] messages; returns how many.
    ///
    /// # Errors
    /// The `recvmmsg` error (`WouldBlock` when nothing is queued).
    pub fn recv(&mut self, socket: &impl AsRawFd) -> std::io::Result<usize> {
        self.got.clear();
        let slot = self.slot;
        if slot == 0 || self.buf.len() < slot * BATCH {
            return Err(std::io::Error::other("receive batch without buffers"));
        }
        let mut iovs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.buf[i * slot..].as_mut_ptr().cast(),
            iov_len: slot,
        });
        // SAFETY: mmsghdr is plain data; every pointer set below refers to `iovs`, `addrs`,
        // `controls` or `buf`, all alive and unmoved for the call; each iovec covers its own
        // `slot`-byte part of `buf`; the kernel writes at most the lengths given.
        unsafe {
            let mut msgs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
            for (i, m) in msgs.iter_mut().enumerate() {
                m.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                m.msg_hdr.msg_namelen =
                    std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                m.msg_hdr.msg_iov = &mut iovs[i];
                m.msg_hdr.msg_iovlen = 1;
                m.msg_hdr.msg_control = self.controls[i].as_mut_ptr().cast();
                m.msg_hdr.msg_controllen = std::mem::size_of::<[u64; 16]>();
            }
            let n = libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                0,
                std::ptr::null_mut(),
            );
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for (i, m) in msgs.iter().take(n as usize).enumerate() {
                let Ok(from) = sender(&self.addrs[i]) else {
                    continue;
                };
                let (seg, to) = control_data(&m.msg_hdr);
                self.got.push(Received {
                    len: m.msg_len as usize,
                    from,
                    seg,
                    to,
                });
            }
        }
        Ok(self.got.len())
    }

    /// Message `i` of the last [`RecvBatch::recv`] and its bytes.
    pub fn message(&mut self, i: usize) -> Option<(Received, &mut [u8])> {
        let r = *self.got.get(i)?;
        let start = i * self.slot;
        Some((r, &mut self.buf[start..start + r.len.min(self.slot)]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn one_recvmmsg_returns_queued_datagrams_in_order_with_their_senders() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        // More than one batch's worth, of different sizes, from two senders.
        let sent: Vec<(Vec<u8>, SocketAddr)> = (0..BATCH + 3)
            .map(|i| {
                let s = if i % 2 == 0 { &a } else { &b };
                let data = vec![i as u8; 100 + i * 37];
                s.send_to(&data, to).unwrap();
                (data, s.local_addr().unwrap())
            })
            .collect();
        rx.set_nonblocking(true).unwrap();
        let mut batch = RecvBatch::new(2048);
        let mut got = Vec::new();
        let mut calls = 0;
        while got.len() < sent.len() {
            let n = match batch.recv(&rx) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("recvmmsg: {e}"),
            };
            calls += 1;
            assert!(n <= BATCH);
            for i in 0..n {
                let (r, data) = batch.message(i).unwrap();
                assert_eq!(r.len, data.len());
                assert_eq!(r.seg, None, "GRO is off on this socket");
                got.push((data.to_vec(), r.from));
            }
            assert!(batch.message(n).is_none());
        }
        assert!(got == sent, "datagrams differ, or their order or senders");
        assert_eq!(calls, 2, "{BATCH} per call, then the rest");
    }

    /// Waits (up to 5 s) for what a non-blocking socket receives.
    fn recv_one(batch: &mut RecvBatch, socket: &UdpSocket) -> usize {
        socket.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match batch.recv(socket) {
                Ok(n) => return n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "nothing received");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => panic!("recvmmsg: {e}"),
            }
        }
    }

    #[test]
    fn a_wildcard_socket_learns_the_address_it_was_sent_to_and_answers_from_it() {
        // The whole of 127/8 is local: a client writes to 127.0.0.2, the server listens on
        // 0.0.0.0. Without PKTINFO the reply would leave from 127.0.0.1.
        let rx = UdpSocket::bind("0.0.0.0:0").unwrap();
        assert!(enable_pktinfo(&rx, false));
        let port = rx.local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        for target in ["127.0.0.2", "127.0.0.3"] {
            let to: IpAddr = target.parse().unwrap();
            client.send_to(b"ping", (to, port)).unwrap();
            let mut batch = RecvBatch::new(2048);
            assert_eq!(recv_one(&mut batch, &rx), 1);
            let (r, data) = batch.message(0).unwrap();
            assert_eq!(data, b"ping");
            assert_eq!(r.to, Some(to), "the address the client sent to");
            // One datagram, and a GSO batch of two, both from that address.
            send_gso(&rx, b"pong", 4, r.from, r.to).unwrap();
            send_gso(&rx, b"abcdef", 3, r.from, r.to).unwrap();
            for want in [&b"pong"[..], b"abc", b"def"] {
                let mut buf = [0u8; 16];
                let (n, from) = client.recv_from(&mut buf).unwrap();
                assert_eq!((&buf[..n], from), (want, SocketAddr::new(to, port)));
            }
        }
        // A dual-stack socket says the same of IPv4 datagrams, as mapped addresses.
        let rx6 = UdpSocket::bind("[::]:0").unwrap();
        assert!(enable_pktinfo(&rx6, true));
        let port6 = rx6.local_addr().unwrap().port();
        client.send_to(b"ping", ("127.0.0.4", port6)).unwrap();
        let mut batch = RecvBatch::new(2048);
        assert_eq!(recv_one(&mut batch, &rx6), 1);
        let (r, _) = batch.message(0).unwrap();
        assert_eq!(r.to, Some("::ffff:127.0.0.4".parse().unwrap()));
        send_gso(&rx6, b"pong", 4, r.from, r.to).unwrap();
        let mut buf = [0u8; 16];
        let (_, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(from, SocketAddr::from(([127, 0, 0, 4], port6)));
    }

    #[test]
    fn the_empty_placeholder_refuses_to_receive() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(RecvBatch::default().recv(&rx).is_err());
    }
}
