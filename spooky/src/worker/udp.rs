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
