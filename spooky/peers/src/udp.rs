//! UDP GRO for the load generator: the kernel coalesces consecutive datagrams of a flow, and
//! one `recvmsg` returns them with their segment size (as a real client's stack would, so a
//! GSO sender on loopback is not charged the receiver's per-datagram work; see
//! docs/benchmarks.md).

use socket2::{SockAddr, SockAddrStorage};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

const SOL_UDP: libc::c_int = 17;
const UDP_GRO: libc::c_int = 104;

/// Asks the kernel to coalesce consecutive datagrams of a flow; false when it cannot.
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

/// Receives one (possibly coalesced) buffer: its length, the sender, and the segment size when
/// the kernel coalesced several datagrams (each `seg` bytes, the last possibly shorter).
///
/// # Errors
/// The `recvmsg` error (`WouldBlock` when nothing is queued).
pub fn recv_gro(
    socket: &impl AsRawFd,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, Option<usize>)> {
    // SAFETY: msghdr is plain data (all-zero valid); msghdr points at
    // `storage`, `iov` (into `buf`) and `control`, all alive and unmoved for the call; the
    // control walk stays within the `msg_controllen` the kernel set.
    unsafe {
        let mut storage = SockAddrStorage::zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 8];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name =
            (storage.view_as::<libc::sockaddr_storage>() as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = storage.size_of();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        let n = libc::recvmsg(socket.as_raw_fd(), &mut msg, 0);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let from = SockAddr::new(storage, msg.msg_namelen)
            .as_socket()
            .ok_or_else(|| std::io::Error::other("sender is not an IP address"))?;
        let mut seg = None;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                seg = usize::try_from(size).ok().filter(|s| *s > 0);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok((n as usize, from, seg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn a_datagram_comes_back_with_its_sender() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"hello", rx.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 64];
        let (n, from, seg) = recv_gro(&rx, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(from, tx.local_addr().unwrap());
        assert_eq!(seg, None, "GRO is off on this socket");
    }
}
