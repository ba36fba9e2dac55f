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

/// Receives one (possibly GRO-coalesced) buffer: its length, the sender, and the segment size
/// when several datagrams were coalesced (each `seg` bytes, the last possibly shorter).
///
/// # Errors
/// The `recvmsg` error (`WouldBlock` when nothing is queued).
pub fn recv_gro(
    socket: &impl AsRawFd,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, Option<usize>)> {
    // SAFETY: sockaddr_storage is plain data (all-zero valid); msghdr points at `storage`,
    // `iov` (into `buf`) and `control`, all alive for the call; CMSG_* walk stays within
    // `msg_controllen` as the kernel set it.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 8];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut storage as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        let n = libc::recvmsg(socket.as_raw_fd(), &mut msg, 0);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut seg = None;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                if size > 0 {
                    seg = Some(size as usize);
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        let from = match i32::from(storage.ss_family) {
            libc::AF_INET => {
                let sin = &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                SocketAddr::from((
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                    u16::from_be(sin.sin_port),
                ))
            }
            libc::AF_INET6 => {
                let sin6 =
                    &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                SocketAddr::V6(std::net::SocketAddrV6::new(
                    sin6.sin6_addr.s6_addr.into(),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                ))
            }
            _ => return Err(std::io::Error::other("sender is not an IP address")),
        };
        Ok((n as usize, from, seg))
    }
}
