//! UDP sends with generic segmentation offload: consecutive QUIC packets to the same peer go
//! to the kernel in one `sendmsg` with a `UDP_SEGMENT` control message, which the kernel (or
//! the NIC) splits into datagrams. Where the kernel refuses GSO, packets are sent one by one
//! and GSO stays off for that socket.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;

/// Most segments in one GSO send (the kernel's limit is 64).
pub const MAX_SEGMENTS: usize = 64;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;

/// Sends `buf` to `dst` as datagrams of `seg` bytes (the last may be shorter) with one
/// `sendmsg`. Returns the bytes sent.
///
/// # Errors
/// The `sendmsg` error (`WouldBlock` included; the caller waits for writability).
pub fn send_gso(
    socket: &impl AsRawFd,
    buf: &[u8],
    seg: usize,
    dst: SocketAddr,
) -> std::io::Result<usize> {
    let addr = socket2::SockAddr::from(dst);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // Room for one cmsg carrying a u16, aligned as the kernel expects.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; every pointer set below refers to storage that outlives
    // the sendmsg call; CMSG_* macros stay within `control`, sized for one u16 payload.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = addr.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = addr.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if seg < buf.len() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = SOL_UDP;
            (*cmsg).cmsg_type = UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), seg as u16);
        }
        let n = libc::sendmsg(socket.as_raw_fd(), &msg, 0);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

const UDP_GRO: libc::c_int = 104;

/// Asks the kernel to coalesce consecutive datagrams of a flow (UDP GRO); false when the
/// kernel does not support it.
pub fn enable_gro(socket: &impl AsRawFd) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&on`, which lives for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            SOL_UDP,
            UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// The GRO segment size in a received message's control data, if the kernel coalesced.
///
/// # Safety
/// `msg` must be a message the kernel just filled, its control pointer still valid.
unsafe fn gro_segment(msg: &libc::msghdr) -> Option<usize> {
    let mut seg = None;
    // SAFETY: the CMSG_* walk stays within `msg_controllen` as the kernel set it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                if size > 0 {
                    seg = Some(size as usize);
                }
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    seg
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
/// coalesced several (GRO).
#[derive(Clone, Copy)]
pub struct Received {
    pub len: usize,
    pub from: SocketAddr,
    pub seg: Option<usize>,
}

/// Buffers for receiving up to [`BATCH`] messages with one `recvmmsg`, each up to `slot`
/// bytes (a GRO-coalesced message can be up to 64 KiB). The default is empty (a placeholder
/// while a batch is being read; receiving into it fails).
#[derive(Default)]
pub struct RecvBatch {
    buf: Vec<u8>,
    slot: usize,
    addrs: Vec<libc::sockaddr_storage>,
    controls: Vec<[u64; 8]>,
    got: Vec<Received>,
}

impl RecvBatch {
    pub fn new(slot: usize) -> Self {
        Self {
            buf: vec![0; slot * BATCH],
            slot,
            // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            controls: vec![[0u64; 8]; BATCH],
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
                m.msg_hdr.msg_controllen = std::mem::size_of::<[u64; 8]>();
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
                self.got.push(Received {
                    len: m.msg_len as usize,
                    from,
                    seg: gro_segment(&m.msg_hdr),
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

    #[test]
    fn the_empty_placeholder_refuses_to_receive() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(RecvBatch::default().recv(&rx).is_err());
    }
}
