//! The TLS-over-TCP front: HTTP/2 and HTTP/1.1 clients (browsers before they learn of
//! HTTP/3, networks that block UDP) on the same port number as QUIC.
//!
//! Each worker owns one listening socket of an SO_REUSEPORT group, so the kernel spreads TCP
//! connections over the workers as it spreads QUIC connections. A connection lives on the
//! worker that accepted it: rustls terminates TLS, hyper (ALPN `h2`, else HTTP/1.1 behind
//! [`strict`]) parses requests, and each request goes through the worker's [`Forwarder`] as
//! an HTTP/3 request does: the same admission checks, routing, load balancing, health,
//! forwarding headers, metrics (label `protocol`) and access log, and the same request task
//! ([`crate::http`]) relaying through an exchange.
//!
//! | module | what |
//! |---|---|
//! | this file | [`Front`]: the accept loop, connection limit, drain |
//! | `conn` | one connection: TLS handshake, protocol, hyper, idle and shutdown |
//! | `gather` | HTTP/2's frames gathered into 64 KiB writes to TLS, written out at the end of each round |
//! | `request` | one request: hyper's request → admission → exchange → hyper's response |
//! | `plain` | the plaintext listener's requests: ACME HTTP-01 or a redirect to `https://` |
//! | `proxy_header` | the PROXY protocol header (v1, v2) trusted load balancers open with |
//! | [`strict`] | refuses HTTP/1.1 request smuggling before hyper sees it |

mod conn;
mod gather;
mod plain;
mod proxy_header;
mod request;
pub mod strict;

use crate::http::Forwarder;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// `listen.tcp.max_connections`'s default, for the plaintext listener without `listen.tcp`.
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Where the front stands; connections follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    /// No new connections; open ones finish their requests (HTTP/2 GOAWAY, HTTP/1.1
    /// `connection: close`) and close.
    Draining,
    /// Close every connection now.
    Closing,
}

/// What a front's connections speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// TLS, then HTTP/2 or HTTP/1.1 (ALPN): requests are proxied (`listen.tcp`).
    Tls,
    /// Plaintext HTTP/1.1: ACME HTTP-01 answers and redirects to `https://` at
    /// `https_port` (where the TLS listener is), nothing else (`listen.http`).
    Plain { https_port: u16 },
}

/// One worker's TCP front (clones are handles on the same front).
#[derive(Clone)]
pub struct Front(Rc<Inner>);

struct Inner {
    kind: Kind,
    /// The forwarder of the current configuration; a connection takes it per request.
    fwd: RefCell<Rc<Forwarder>>,
    phase: watch::Sender<Phase>,
    /// Connections open on this worker, and the most it keeps.
    open: Cell<usize>,
    max: usize,
    /// Notified when a connection closes.
    closed: Notify,
}

impl Front {
    /// Starts accepting on `listener` (this worker's socket of the group), on the current
    /// thread's `LocalSet`. `share` of `listen.tcp.max_connections` is this worker's.
    ///
    /// # Errors
    /// When the socket cannot be registered with the runtime.
    pub(crate) fn start(
        listener: std::net::TcpListener,
        fwd: Rc<Forwarder>,
        share: usize,
        kind: Kind,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        // The plaintext listener has the TLS one's limit (its own when that is off).
        let max = fwd
            .snapshot
            .config
            .listen
            .tcp
            .as_ref()
            .map_or(DEFAULT_MAX_CONNECTIONS, |t| t.max_connections)
            .div_ceil(share.max(1));
        let front = Front(Rc::new(Inner {
            kind,
            fwd: RefCell::new(fwd),
            phase: watch::Sender::new(Phase::Serving),
            open: Cell::new(0),
            max,
            closed: Notify::new(),
        }));
        tokio::task::spawn_local(accept_loop(front.clone(), listener));
        Ok(front)
    }

    /// New requests use `fwd` (a reload was committed).
    pub(crate) fn set_forwarder(&self, fwd: Rc<Forwarder>) {
        *self.0.fwd.borrow_mut() = fwd;
    }

    fn forwarder(&self) -> Rc<Forwarder> {
        self.0.fwd.borrow().clone()
    }

    /// Stops accepting (the listening socket closes) and lets open connections finish.
    pub fn drain(&self) {
        self.0.phase.send_if_modified(|p| {
            let was = *p == Phase::Serving;
            if was {
                *p = Phase::Draining;
            }
            was
        });
    }

    /// Closes every connection now (the grace period is over).
    pub fn close_all(&self) {
        self.0.phase.send_replace(Phase::Closing);
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.0.open.get()
    }

    /// Resolves when no connection is open.
    pub async fn all_closed(&self) {
        while self.0.open.get() > 0 {
            self.0.closed.notified().await;
        }
    }
}

/// Counts a connection as open for as long as it lives (and holds its place among its
/// address's `listen.tcp.max_connections_per_ip`, when it took one).
struct Open {
    front: Front,
    per_ip: Option<u64>,
}

impl Open {
    fn new(front: &Front, per_ip: Option<u64>) -> Self {
        front.0.open.set(front.0.open.get() + 1);
        let stats = &front.forwarder().services.stats;
        stats.tcp_accepted.fetch_add(1, Ordering::Relaxed);
        stats.tcp_active.fetch_add(1, Ordering::Relaxed);
        Self {
            front: front.clone(),
            per_ip,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let inner = &self.front.0;
        inner.open.set(inner.open.get().saturating_sub(1));
        let fwd = inner.fwd.borrow();
        fwd.services
            .stats
            .tcp_active
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(hash) = self.per_ip {
            fwd.services.policy.tcp_open.release(hash);
        }
        inner.closed.notify_one();
    }
}

/// The per-address limits of `listen.tcp` for a connection from `peer`: `Some(place)` when it
/// may go on (`place`: the per-address count it holds, to give back when it closes), `None`
/// when refused (counted). Sources of `proxy_protocol.trusted` carry many clients and are not
/// limited here (the requests they carry meet the routes' rate limits by their real address).
fn admit_address(front: &Front, peer: std::net::SocketAddr) -> Option<Option<u64>> {
    let fwd = front.forwarder();
    let Some(tcp) = fwd.snapshot.config.listen.tcp.as_ref() else {
        return Some(None);
    };
    if crate::config::in_any(&tcp.proxy_protocol, peer.ip()) {
        return Some(None);
    }
    let services = &fwd.services;
    let policy = &services.policy;
    let hash = policy.address_hash(peer.ip());
    if let Some(rate) = tcp.connection_rate_per_ip {
        let now = policy.now(std::time::Instant::now());
        if policy.tcp_rate(rate).check(hash, now).is_err() {
            services
                .stats
                .tcp_rate_limited
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "TCP connection refused: listen.tcp.connection_rate_per_ip");
            return None;
        }
    }
    if !policy.tcp_open.acquire(hash, tcp.max_connections_per_ip) {
        services
            .stats
            .tcp_refused_per_ip
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, "TCP connection refused: listen.tcp.max_connections_per_ip are open");
        return None;
    }
    Some(Some(hash))
}

/// Accepts until the front drains; dropping the listener then closes the socket.
async fn accept_loop(front: Front, listener: tokio::net::TcpListener) {
    let mut phase = front.0.phase.subscribe();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            r = phase.wait_for(|p| *p != Phase::Serving) => {
                let _ = r;
                break;
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                if front.0.open.get() >= front.0.max {
                    let stats = &front.forwarder().services.stats;
                    stats.tcp_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "TCP connection refused: listen.tcp.max_connections are open");
                    continue;
                }
                let services = &front.forwarder().services;
                if services.policy.drained() {
                    services.stats.drain_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "TCP connection refused: the host is drained");
                    continue;
                }
                let Some(per_ip) = admit_address(&front, peer) else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let open = Open::new(&front, per_ip);
                tokio::task::spawn_local(conn::serve(front.clone(), open, stream, peer));
            }
            Err(e) => {
                // Out of descriptors or memory: wait instead of spinning.
                tracing::warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!("TCP listener closed");
}
