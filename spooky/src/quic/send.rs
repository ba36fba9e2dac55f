//! A worker's socket and what goes out of it: the packets quiche produces for a connection,
//! batched so that equal-size packets to the same peer reach the kernel in one `sendmsg` with
//! `UDP_SEGMENT` (GSO), and single datagrams (Version Negotiation, Retry).
//!
//! A batch never holds more than [`MAX_GSO_BYTES`], the largest UDP payload over IPv4 (the
//! kernel refuses a larger GSO send with `EMSGSIZE`, whatever the segment size: a peer with a
//! `max_udp_payload_size` of 1260 would otherwise fill 52 segments, 65,520 bytes). A batch the
//! kernel refuses all the same (`EMSGSIZE`, `EINVAL`: a path MTU below the segment size) goes
//! out one datagram per call, counted, and GSO stays on; only the errors that say the device
//! cannot segment at all (`EIO`: no checksum offload; `EOPNOTSUPP`, `ENOPROTOOPT`) turn it off
//! for the socket, logged and shown as `spooky_udp_gso_enabled` 0.

use super::conn::QuicConn;
use super::udp;
use crate::stats::WorkerStats;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Largest UDP payload we receive or send.
pub const MAX_DATAGRAM: usize = 65535;
/// Most bytes in one GSO send: the largest UDP payload over IPv4 (65,535 − 20 − 8).
pub const MAX_GSO_BYTES: usize = 65507;

/// The worker's socket and its send buffer.
pub struct Sender {
    pub socket: tokio::net::UdpSocket,
    /// Room for one GSO batch (or one datagram).
    pub out: Vec<u8>,
    /// UDP GSO works on this socket (turned off at the first refusal).
    gso: bool,
    stats: Arc<WorkerStats>,
    worker: usize,
    /// The socket is bound to a wildcard address: every send names its source address.
    wildcard: bool,
}

impl Sender {
    pub fn new(socket: tokio::net::UdpSocket, stats: Arc<WorkerStats>, worker: usize) -> Self {
        stats.gso_enabled.store(1, Ordering::Relaxed);
        let local = socket.local_addr().ok();
        let wildcard = local.is_some_and(|a| a.ip().is_unspecified());
        if wildcard && !udp::enable_pktinfo(&socket, local.is_some_and(|a| a.is_ipv6())) {
            tracing::warn!(worker, "IP_PKTINFO refused: replies leave from the interface's address, not the one clients sent to");
        }
        Self {
            socket,
            out: vec![0; MAX_DATAGRAM],
            gso: true,
            stats,
            worker,
            wildcard,
        }
    }

    /// The source address to name in a send from local address `from` (none on a socket
    /// bound to one address).
    fn source(&self, from: SocketAddr) -> Option<IpAddr> {
        (self.wildcard && !from.ip().is_unspecified()).then_some(from.ip())
    }

    /// Sends `out[..len]` to `to` from local address `from` now if the socket takes it
    /// (answers to strangers are not worth waiting for).
    pub fn send_now(&self, len: usize, to: SocketAddr, from: SocketAddr) {
        let src = self.source(from);
        if let Some(buf) = self.out.get(..len) {
            let sent = self.socket.try_io(tokio::io::Interest::WRITABLE, || {
                udp::send_gso(&self.socket, buf, len, to, src)
            });
            if sent.is_ok() {
                self.stats.packets_out.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sends everything quiche has for `quic`, batching equal-size packets to the same peer
    /// into GSO sends.
    pub async fn flush(&mut self, quic: &mut QuicConn) {
        let max = quic.max_send_udp_payload_size().min(self.out.len());
        loop {
            // Fill a batch: packets of `seg` bytes (the last may be shorter) to `dst`.
            // `dst`: (peer, local address) of the batch.
            let (mut used, mut seg, mut count, mut dst) = (0usize, 0usize, 0usize, None);
            let mut odd: Option<(usize, usize, (SocketAddr, SocketAddr))> = None;
            let mut done = false;
            let room = MAX_GSO_BYTES.min(self.out.len());
            while count < udp::MAX_SEGMENTS && used + max <= room {
                match quic.send(&mut self.out[used..used + max]) {
                    Ok((len, info)) => {
                        let path = (info.to, info.from);
                        let fits = dst.is_none_or(|d| d == path) && (count == 0 || len <= seg);
                        if !fits {
                            // Sent alone after the batch.
                            odd = Some((used, len, path));
                            break;
                        }
                        if count == 0 {
                            seg = len;
                            dst = Some(path);
                        }
                        used += len;
                        count += 1;
                        if len < seg || !self.gso {
                            break;
                        }
                    }
                    Err(quiche::Error::Done) => {
                        done = true;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "quic send failed");
                        let _ = quic.close(false, 0x1, b"");
                        done = true;
                        break;
                    }
                }
            }
            if let Some(to) = dst {
                self.send_batch(0, used, seg, count, to).await;
            }
            if let Some((at, len, to)) = odd {
                self.send_batch(at, len, len, 1, to).await;
            }
            if done || (dst.is_none() && odd.is_none()) {
                break;
            }
        }
    }

    /// Sends `out[at..at + len]` as `count` datagrams of `seg` bytes on `path` (peer, local
    /// address).
    async fn send_batch(
        &mut self,
        at: usize,
        len: usize,
        seg: usize,
        count: usize,
        (to, from): (SocketAddr, SocketAddr),
    ) {
        let src = self.source(from);
        self.stats
            .packets_out
            .fetch_add(count as u64, Ordering::Relaxed);
        let buf = &self.out[at..at + len];
        if count > 1 && self.gso {
            loop {
                let sent = self.socket.try_io(tokio::io::Interest::WRITABLE, || {
                    udp::send_gso(&self.socket, buf, seg, to, src)
                });
                match sent {
                    Ok(_) => return,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if self.socket.writable().await.is_err() {
                            return;
                        }
                    }
                    Err(e) if gso_unsupported(&e) => {
                        tracing::info!(worker = self.worker, error = %e, "UDP GSO refused by the device; sending datagrams one by one from now on");
                        self.gso = false;
                        self.stats.gso_enabled.store(0, Ordering::Relaxed);
                        break;
                    }
                    Err(e) => {
                        // This batch only (too large for the path, or a transient error).
                        tracing::debug!(worker = self.worker, error = %e, count, seg, "UDP GSO send refused; this batch goes one datagram at a time");
                        self.stats.gso_fallbacks.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
        for chunk in buf.chunks(seg.max(1)) {
            let sent = self
                .socket
                .async_io(tokio::io::Interest::WRITABLE, || {
                    udp::send_gso(&self.socket, chunk, chunk.len(), to, src)
                })
                .await;
            if let Err(e) = sent {
                tracing::debug!(error = %e, %to, "send failed");
                return;
            }
        }
    }
}

/// Whether a GSO send error says the socket's device cannot segment at all (as opposed to
/// refusing this one batch).
fn gso_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EOPNOTSUPP | libc::ENOPROTOOPT)
    )
}
