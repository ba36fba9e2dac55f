//! Takeover, the handover from a running Spooky to its successor (a new binary, a new
//! configuration, or both), over the running one's control socket (`control_socket`, a Unix
//! stream socket).
//!
//! ```text
//! successor                                   running Spooky (generation g)
//!     ── Hello { pid } ──────────────────────────►
//!                                                 pins its XDP link (eBPF tiers), stops its
//!                                                 admin listener
//!     ◄── State { predecessor, admin } ── + the admin listener's descriptor (SCM_RIGHTS)
//! binds its sockets in the same reuseport group,
//! steers new connections to itself (generation
//! next(g)), serves
//!     ── Ready { generation, workers } ──────────►
//!                                                 stops accepting, GOAWAY to its clients,
//!                                                 drains within proxy.shutdown_grace, exits
//!     ◄────────────────────────────────── EOF ───
//! forgets generation g
//! ```
//!
//! Messages are length-prefixed JSON; a descriptor rides with the first byte of the message
//! it belongs to. This module is the wire and the socket; `app` decides what to do.

use crate::steering::Predecessor;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest message accepted.
const MAX_MESSAGE: usize = 64 * 1024;
/// How long one side waits for the other's next message.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// What the two processes say to each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Successor → running: I am taking over.
    Hello { pid: u32 },
    /// Running → successor: what it needs of the running process; with `admin`, the admin
    /// listener's descriptor comes along.
    State {
        predecessor: Predecessor,
        admin: bool,
        /// The running process's own keys (key file text), for a successor without
        /// `quic.key_file`: its resets and Retry tokens must match ours.
        keys: String,
    },
    /// Successor → running: I serve; stop accepting and drain.
    Ready { generation: u8, workers: u32 },
    /// Either side: the takeover cannot go on, and why.
    Refused { reason: String },
}

/// Why the control socket or the protocol failed.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("control socket {}: {source}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no running Spooky listens on the control socket {}: {source}", path.display())]
    NoneRunning {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another Spooky (control socket {}) is running: take over from it with --takeover, or stop it first", .0.display())]
    Running(PathBuf),
    #[error("takeover conversation: {0}")]
    Io(#[from] std::io::Error),
    #[error("takeover conversation: unexpected message {0:?}")]
    Unexpected(Box<Message>),
    #[error("takeover refused: {0}")]
    Refused(String),
    #[error("takeover conversation: {0}")]
    Malformed(String),
}

/// The running process's end: the listening control socket.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The inode of the socket file we bound (a successor binds a file of its own there).
    ino: u64,
}

impl ControlSocket {
    /// Binds `path` for a process that starts alone. Refuses when a live Spooky answers
    /// there; a stale socket file (a crashed process) is replaced.
    ///
    /// # Errors
    /// [`TakeoverError::Running`], or [`TakeoverError::Socket`] when it cannot be bound.
    pub fn bind(path: &Path) -> Result<Self, TakeoverError> {
        if UnixStream::connect(path).is_ok() {
            return Err(TakeoverError::Running(path.to_path_buf()));
        }
        Self::bind_over(path)
    }

    /// Binds `path` in place of whatever is there (the successor, once it serves: the
    /// predecessor's listener stays open but unreachable until it exits).
    ///
    /// # Errors
    /// [`TakeoverError::Socket`] when it cannot be bound.
    pub fn bind_over(path: &Path) -> Result<Self, TakeoverError> {
        let socket_err = |source| TakeoverError::Socket {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(socket_err)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(socket_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(socket_err)?;
        listener.set_nonblocking(true).map_err(socket_err)?;
        use std::os::unix::fs::PermissionsExt;
        // Only the owner (root, or the service user) may take over.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(socket_err)?;
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(path).map_err(socket_err)?.ino();
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            ino,
        })
    }

    /// The next successor, if one is waiting (`WouldBlock` when none).
    ///
    /// # Errors
    /// The `accept` error.
    pub fn accept(&self) -> std::io::Result<UnixStream> {
        let (stream, _) = self.listener.accept()?;
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(ANSWER_WITHIN))?;
        stream.set_write_timeout(Some(ANSWER_WITHIN))?;
        Ok(stream)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if it is still ours (the last process out).
    pub fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The successor's end: connects to the running process's control socket.
///
/// # Errors
/// [`TakeoverError::NoneRunning`] when nobody listens there.
pub fn connect(path: &Path) -> Result<UnixStream, TakeoverError> {
    let stream = UnixStream::connect(path).map_err(|source| TakeoverError::NoneRunning {
        path: path.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(ANSWER_WITHIN))?;
    stream.set_write_timeout(Some(ANSWER_WITHIN))?;
    Ok(stream)
}

/// Sends `message`, with `fd` attached when given.
///
/// # Errors
/// The I/O error.
pub fn send(
    stream: &mut UnixStream,
    message: &Message,
    fd: Option<RawFd>,
) -> Result<(), TakeoverError> {
    let body = serde_json::to_vec(message).map_err(|e| TakeoverError::Malformed(e.to_string()))?;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let (first, rest) = frame.split_at(1);
    send_with_fd(stream, first, fd)?;
    stream.write_all(rest)?;
    Ok(())
}

/// Receives the next message and the descriptor that came with it, if any.
///
/// # Errors
/// [`TakeoverError`] on I/O failure, a message too large or not JSON.
pub fn recv(stream: &mut UnixStream) -> Result<(Message, Option<OwnedFd>), TakeoverError> {
    let mut first = [0u8; 1];
    let fd = recv_with_fd(stream, &mut first)?;
    let mut rest = [0u8; 3];
    stream.read_exact(&mut rest)?;
    let len = u32::from_be_bytes([first[0], rest[0], rest[1], rest[2]]) as usize;
    if len > MAX_MESSAGE {
        return Err(TakeoverError::Malformed(format!(
            "a message of {len} bytes"
        )));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    let message =
        serde_json::from_slice(&body).map_err(|e| TakeoverError::Malformed(e.to_string()))?;
    Ok((message, fd))
}

/// Writes `data` (one byte) with `fd` as SCM_RIGHTS ancillary data.
fn send_with_fd(stream: &UnixStream, data: &[u8], fd: Option<RawFd>) -> std::io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; it points at `iov` (into `data`) and `control`, alive for
    // the call; the CMSG_* macros stay within `control`, sized for one descriptor.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = fd {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
        libc::sendmsg(stream.as_raw_fd(), &msg, 0)
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if sent as usize != data.len() {
        return Err(std::io::Error::other("short write on the control socket"));
    }
    Ok(())
}

/// Reads exactly `data.len()` (one) bytes and the descriptor that came with them.
fn recv_with_fd(stream: &UnixStream, data: &mut [u8]) -> std::io::Result<Option<OwnedFd>> {
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: as in `send_with_fd`; the CMSG walk stays within the `msg_controllen` the kernel
    // set; a descriptor the kernel passed is ours to own (MSG_CMSG_CLOEXEC keeps it from
    // leaking into children).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        let n = libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut fd = None;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok(fd)
    }
}

/// Waits for the peer to close its end (the predecessor exiting).
pub fn wait_closed(mut stream: UnixStream) {
    let _ = stream.set_read_timeout(None);
    let mut buf = [0u8; 64];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn predecessor() -> Predecessor {
        Predecessor {
            generation: 2,
            workers: 4,
            pid: 42,
            mode: "classic-bpf".into(),
            iface: None,
            sockets: vec![0, 1, 2, 3],
            in_group: 4,
            xdp_link: false,
        }
    }

    #[test]
    fn messages_and_a_descriptor_cross_a_socket_pair() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        send(&mut a, &Message::Hello { pid: 7 }, None).unwrap();
        let state = Message::State {
            predecessor: predecessor(),
            admin: true,
            keys: "reset: 00\n".into(),
        };
        send(&mut a, &state, Some(listener.as_fd().as_raw_fd())).unwrap();
        assert_eq!(recv(&mut b).unwrap().0, Message::Hello { pid: 7 });
        let (got, fd) = recv(&mut b).unwrap();
        assert_eq!(got, state);
        // The descriptor is the same listening socket.
        let passed = std::net::TcpListener::from(fd.unwrap());
        assert_eq!(passed.local_addr().unwrap(), addr);
        drop(a);
        assert!(recv(&mut b).is_err(), "EOF after the peer closed");
    }

    #[test]
    fn a_second_process_cannot_bind_a_live_control_socket() {
        let dir = std::env::temp_dir().join(format!("spooky-ctl-{}", std::process::id()));
        let path = dir.join("control.sock");
        let first = ControlSocket::bind(&path).unwrap();
        assert!(matches!(
            ControlSocket::bind(&path),
            Err(TakeoverError::Running(_))
        ));
        let next = || loop {
            match first.accept() {
                Ok(p) => break p,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        };
        // The refused bind's check was a connection that says nothing.
        assert!(recv(&mut next()).is_err());
        let mut s = connect(&path).unwrap();
        let mut peer = next();
        send(&mut s, &Message::Hello { pid: 1 }, None).unwrap();
        assert_eq!(recv(&mut peer).unwrap().0, Message::Hello { pid: 1 });
        // A crashed process's file is replaced.
        drop((s, peer, first));
        let again = ControlSocket::bind(&path).unwrap();
        again.remove();
        assert!(!path.exists());
        assert!(matches!(
            connect(&path),
            Err(TakeoverError::NoneRunning { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
