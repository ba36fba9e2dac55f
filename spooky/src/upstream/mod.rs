//! HTTP/2 connections to backends: one [`BackendPool`] per worker per backend, owned by that
//! worker's single-threaded runtime (no locks shared across threads). A pool multiplexes
//! requests over its connections up to each peer's stream limit (100 until the peer's
//! SETTINGS say otherwise), opens more connections when they are saturated, and forgets
//! connections that closed or received GOAWAY.
//!
//! Admission, as Envoy's circuit breakers and linkerd's fail-fast buffers do it: a request
//! that finds no free stream slot waits, as one of at most `max_pending` (more get
//! [`ErrorKind::Overflow`] at once), for a connection being made or a slot being freed, until
//! the connect timeout (then [`ErrorKind::PendingTimeout`]) or until its caller gives up (the
//! client left: the wait is dropped). Connects run concurrently, outside any request: as many
//! as the waiting requests need (one per 100 of them), up to [`MAX_CONNS_PER_BACKEND`]
//! connections. When the backend looks unreachable — no connection open and none being made —
//! a failed connect fails every request that waited for it, with its error; after a failure,
//! new connects wait out a back-off ([`BACKOFF_BASE`] doubling per consecutive failure, at most
//! [`BACKOFF_MAX`]) and requests during it fail at once with the last error. With connections
//! open, requests wait for a slot on them instead. Such repeats of one failure are marked
//! ([`UpstreamError::repeat`]) so passive health counts the failure once. Nothing parks in
//! h2's own unbounded queue.
//!
//! Transport is h2c (prior knowledge) or TLS with ALPN `h2` through rustls (the client
//! configuration comes built from the snapshot). What went wrong is classified here, as
//! [`UpstreamError`] kinds; what a kind means for the client (502 or 504), for the backend's
//! health and for the logs is decided in one place, `http::outcome`.

pub mod h1;
pub mod readahead;

use crate::config::{Backend, BackendProtocol};
use crate::snapshot::TlsPlan;
use crate::stats::WorkerStats;
use bytes::Bytes;
use h2::client::SendRequest;
use readahead::ReadAhead;
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Most HTTP/2 connections a worker opens to one backend.
pub const MAX_CONNS_PER_BACKEND: usize = 16;
/// Most HTTP/1.1 connections a worker opens to one backend (one request each at a time).
pub const MAX_H1_CONNS_PER_BACKEND: usize = 256;
/// An HTTP/1.1 connection idle this long is closed rather than reused: below the keep-alive
/// timeouts of common servers (nginx 75 s, Node 5 s … gunicorn's 2 s is the exception, which
/// the retry of an idempotent request on a fresh connection covers).
pub const H1_IDLE_EXPIRY: Duration = Duration::from_secs(4);
/// Streams a new connection is taken to carry before its peer's SETTINGS arrive (RFC 9113
/// §6.5.2 recommends allowing at least 100), and how many waiting requests call for one more
/// connect.
pub const STREAMS_PER_NEW_CONN: usize = 100;
/// Back-off after a failed connect, doubling per consecutive failure up to [`BACKOFF_MAX`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// HTTP/2 receive windows towards backends: per stream and per connection. The stream window
/// bounds what one response may hold in h2's buffers while its client does not read; the
/// connection window is as large as HTTP/2 allows, so that streams whose clients do not read
/// never hold up the others on the same backend connection (head-of-line blocking).
const STREAM_WINDOW: u32 = 256 << 10;
const CONN_WINDOW: u32 = (1 << 31) - 1;

/// What went wrong talking to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// TCP connect refused, reset, unreachable.
    Connect,
    /// TCP connect did not finish in time.
    ConnectTimeout,
    /// TLS handshake failed (certificate, protocol) or ALPN was not h2.
    Tls,
    /// The HTTP/2 handshake failed.
    Handshake,
    /// The backend refused the stream before processing it (REFUSED_STREAM, or it was above
    /// a GOAWAY's last stream id): safe to retry.
    Refused,
    /// The stream or connection failed after the request was (maybe) processed.
    Reset,
    /// The response head did not arrive in time.
    ResponseTimeout,
    /// The backend sent something that is not valid HTTP/2 or HTTP.
    Protocol,
    /// `max_pending` requests already wait for this backend: refused at once.
    Overflow,
    /// No stream slot came free (and no connection came up) within the connect timeout.
    PendingTimeout,
}

/// A failure talking to backend `backend`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("backend {backend}: {kind:?}: {detail}")]
pub struct UpstreamError {
    pub kind: ErrorKind,
    pub backend: Rc<str>,
    pub detail: String,
    /// Another request's failure handed on (it waited for the same connect, or came during
    /// the back-off after it): already counted once for the backend's health.
    pub repeat: bool,
}

impl UpstreamError {
    pub fn new(kind: ErrorKind, backend: &Rc<str>, detail: impl std::fmt::Display) -> Self {
        Self {
            kind,
            backend: backend.clone(),
            detail: detail.to_string(),
            repeat: false,
        }
    }

    /// This failure as handed on to another request.
    fn repeated(&self, why: &str) -> Self {
        Self {
            detail: format!("{why}: {}", self.detail),
            repeat: true,
            ..self.clone()
        }
    }

    /// Classifies an h2 error seen on a request stream.
    pub fn from_h2(err: &h2::Error, backend: &Rc<str>) -> Self {
        let refused = (err.is_go_away() && err.is_remote())
            || (err.is_reset()
                && err.is_remote()
                && err.reason() == Some(h2::Reason::REFUSED_STREAM));
        let kind = if refused {
            ErrorKind::Refused
        } else if err.reason() == Some(h2::Reason::PROTOCOL_ERROR) && err.is_library() {
            ErrorKind::Protocol
        } else {
            ErrorKind::Reset
        };
        Self::new(kind, backend, err)
    }
}

/// How to reach one backend: address, optional TLS, connect timeout.
#[derive(Clone)]
pub struct Connector {
    pub backend: Rc<str>,
    pub addr: SocketAddr,
    pub tls: Option<TlsPlan>,
    pub protocol: BackendProtocol,
    pub connect_timeout: Duration,
    /// Each connection opens with a PROXY protocol v2 header naming the client it is for
    /// (`upstream.NAME.send_proxy_protocol`); connections then serve that client only.
    pub send_proxy: bool,
}

/// A connection's sending half: an HTTP/2 handle (cloned per stream) or an HTTP/1.1 one.
#[derive(Clone)]
pub enum Sender {
    H2(SendRequest<Bytes>),
    H1(Rc<h1::Conn>),
}

impl Connector {
    /// A connector for `backend`, with its TLS plan from the snapshot.
    pub fn new(
        backend: &Backend,
        tls: Option<TlsPlan>,
        connect_timeout: Duration,
        send_proxy: bool,
    ) -> Self {
        Self {
            backend: Rc::from(backend.id.as_str()),
            addr: backend.address,
            tls,
            protocol: backend.protocol,
            connect_timeout,
            send_proxy,
        }
    }

    /// Opens one connection (HTTP/2 or HTTP/1.1, by protocol and ALPN) and spawns its driver
    /// on the current `LocalSet`.
    ///
    /// # Errors
    /// [`UpstreamError`] of kind `Connect`, `ConnectTimeout`, `Tls` or `Handshake`.
    async fn connect(
        &self,
        closed: Rc<Cell<bool>>,
        pool: Weak<BackendPool>,
        client: Option<SocketAddr>,
    ) -> Result<Sender, UpstreamError> {
        let b = &self.backend;
        let tcp =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr)).await {
                Err(_) => {
                    return Err(UpstreamError::new(
                        ErrorKind::ConnectTimeout,
                        b,
                        format!("connect to {} timed out", self.addr),
                    ))
                }
                Ok(Err(e)) => {
                    return Err(UpstreamError::new(
                        ErrorKind::Connect,
                        b,
                        format!("connect to {}: {e}", self.addr),
                    ))
                }
                Ok(Ok(s)) => s,
            };
        let mut tcp = tcp;
        let _ = tcp.set_nodelay(true);
        if self.send_proxy {
            use tokio::io::AsyncWriteExt;
            let local = tcp.local_addr().unwrap_or(self.addr);
            let header = proxy_v2_header(client, local, self.addr);
            if let Err(e) = tcp.write_all(&header).await {
                return Err(UpstreamError::new(
                    ErrorKind::Connect,
                    b,
                    format!("PROXY header to {}: {e}", self.addr),
                ));
            }
        }
        let mut builder = h2::client::Builder::new();
        builder
            .initial_max_send_streams(STREAMS_PER_NEW_CONN)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(64 * 1024)
            .enable_push(false);
        match &self.tls {
            None if self.protocol == BackendProtocol::Http1 => {
                self.handshake_h1(tcp, closed, pool).await
            }
            None => {
                let (send, conn) = builder
                    .handshake::<_, Bytes>(ReadAhead::h2_frames(tcp))
                    .await
                    .map_err(|e| UpstreamError::new(ErrorKind::Handshake, b, e))?;
                spawn_driver(conn, closed, pool.clone(), b.clone());
                Ok(Sender::H2(send))
            }
            Some(plan) => {
                let connector = tokio_rustls::TlsConnector::from(plan.config.clone());
                let hs = connector.connect(plan.server_name.clone(), ReadAhead::new(tcp));
                let tls = match tokio::time::timeout(self.connect_timeout, hs).await {
                    Err(_) => {
                        return Err(UpstreamError::new(
                            ErrorKind::ConnectTimeout,
                            b,
                            "TLS handshake timed out",
                        ))
                    }
                    Ok(Err(e)) => {
                        return Err(UpstreamError::new(
                            ErrorKind::Tls,
                            b,
                            format!("TLS handshake with {}: {e}", self.addr),
                        ))
                    }
                    Ok(Ok(s)) => s,
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                match self.protocol {
                    BackendProtocol::Http2 if !h2 => Err(UpstreamError::new(
                        ErrorKind::Tls,
                        b,
                        "backend did not negotiate ALPN h2",
                    )),
                    BackendProtocol::Http2 | BackendProtocol::Auto if h2 => {
                        let (send, conn) = builder
                            .handshake::<_, Bytes>(tls)
                            .await
                            .map_err(|e| UpstreamError::new(ErrorKind::Handshake, b, e))?;
                        spawn_driver(conn, closed, pool.clone(), b.clone());
                        Ok(Sender::H2(send))
                    }
                    // `http/1.1` negotiated, or no ALPN at all (an HTTP/1.1 server that does
                    // not know ALPN).
                    _ => self.handshake_h1(tls, closed, pool).await,
                }
            }
        }
    }

    /// HTTP/1.1 on a connected transport: hyper's client connection, driven on the
    /// `LocalSet`, its response heads read through the smuggling guard.
    async fn handshake_h1<T>(
        &self,
        io: T,
        closed: Rc<Cell<bool>>,
        pool: Weak<BackendPool>,
    ) -> Result<Sender, UpstreamError>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let b = &self.backend;
        let head_due = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let io = hyper_util::rt::TokioIo::new(h1::HeadGuard::new(io, head_due.clone()));
        let (send, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(256 << 10)
            .handshake::<_, h1::RequestBody>(io)
            .await
            .map_err(|e| UpstreamError::new(ErrorKind::Handshake, b, e))?;
        let backend = b.clone();
        tokio::task::spawn_local(async move {
            // With upgrades: a WebSocket's 101 hands the connection to its tunnel.
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(backend = %backend, error = %e, "upstream connection ended");
            }
            closed.set(true);
            if let Some(pool) = pool.upgrade() {
                pool.connection_closed();
            }
        });
        Ok(Sender::H1(Rc::new(h1::Conn {
            send: RefCell::new(send),
            head_due,
            uses: Cell::new(0),
        })))
    }
}

fn spawn_driver<T>(
    conn: h2::client::Connection<T, Bytes>,
    closed: Rc<Cell<bool>>,
    pool: Weak<BackendPool>,
    backend: Rc<str>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.await {
            tracing::debug!(backend = %backend, error = %e, "upstream connection ended");
        }
        closed.set(true);
        // Weak: a pool a reload dropped lets its connections go.
        if let Some(pool) = pool.upgrade() {
            pool.connection_closed();
        }
    });
}

struct PooledConn {
    send: Sender,
    in_flight: Rc<Cell<usize>>,
    closed: Rc<Cell<bool>>,
    /// The client whose PROXY header opened it (`send_proxy` pools): it serves that client
    /// only. `None` in other pools.
    client: Option<SocketAddr>,
    /// Since when no request is in flight on it (HTTP/1.1 idle expiry).
    idle_since: Rc<Cell<Instant>>,
}

impl PooledConn {
    /// Requests it can take now.
    fn room(&self) -> usize {
        match &self.send {
            Sender::H2(s) => s
                .current_max_send_streams()
                .max(1)
                .saturating_sub(self.in_flight.get()),
            // Free: no lease on it. (hyper may not have seen the end of the previous
            // response yet; the request waits for the connection to be ready.)
            Sender::H1(_) => usize::from(self.in_flight.get() == 0),
        }
    }

    /// Still worth keeping: open, no GOAWAY, an HTTP/1.1 one not idle too long.
    fn usable(&mut self) -> bool {
        if self.closed.get() {
            return false;
        }
        match &mut self.send {
            Sender::H2(s) => usable(s),
            Sender::H1(c) => {
                !c.send.borrow().is_closed()
                    && (self.in_flight.get() > 0
                        || self.idle_since.get().elapsed() < H1_IDLE_EXPIRY)
            }
        }
    }
}

/// A request slot on a pooled connection; releases the slot when dropped.
pub struct Lease {
    pub send: Sender,
    in_flight: Rc<Cell<usize>>,
    idle_since: Rc<Cell<Instant>>,
    pool: Rc<BackendPool>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        if self.in_flight.get() == 0 {
            self.idle_since.set(Instant::now());
        }
        if self.pool.pending.get() > 0 {
            // One waiting request may take the slot.
            self.pool.changed.notify_one();
        }
    }
}

/// How a pool bounds the requests waiting for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// Most requests waiting at once (this worker's share of `max_pending_requests`).
    pub max_pending: usize,
}

/// The back-off after failed connects.
#[derive(Clone, Copy, Default)]
struct Backoff {
    /// Consecutive failed connects.
    failures: u32,
    /// No new connect before then.
    until: Option<Instant>,
}

/// One worker's connections to one backend, and the requests waiting for room on them.
pub struct BackendPool {
    pub connector: Connector,
    limits: Cell<PoolLimits>,
    conns: RefCell<Vec<PooledConn>>,
    /// Connects under way.
    connecting: Cell<usize>,
    /// The backend speaks HTTP/1.1 (configured so, or ALPN said so): a connection carries
    /// one request at a time.
    speaks_h1: Cell<bool>,
    /// Requests waiting for a slot.
    pending: Cell<usize>,
    /// Rung when a slot may have come free: a connection came up, closed or failed to come
    /// up, or a stream ended.
    changed: Notify,
    backoff: Cell<Backoff>,
    /// Connect failures so far, and the last one (handed to the requests that waited: the
    /// first to take it gets it as it is, the others as a repeat).
    failures: Cell<u64>,
    last_failure: RefCell<Option<UpstreamError>>,
    /// The last failure has been handed out once.
    last_failure_taken: Cell<bool>,
    /// The worker's counters (overflows, pending timeouts, back-off refusals); none for the
    /// health checker's probes.
    stats: Option<Arc<WorkerStats>>,
}

/// Counts a request as waiting while it lives.
struct Waiting<'a>(&'a BackendPool);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.pending.set(self.0.pending.get().saturating_sub(1));
    }
}

impl BackendPool {
    pub fn new(connector: Connector, limits: PoolLimits, stats: Option<Arc<WorkerStats>>) -> Self {
        Self {
            limits: Cell::new(limits),
            conns: RefCell::new(Vec::new()),
            connecting: Cell::new(0),
            speaks_h1: Cell::new(connector.protocol == BackendProtocol::Http1),
            pending: Cell::new(0),
            changed: Notify::new(),
            backoff: Cell::new(Backoff::default()),
            failures: Cell::new(0),
            last_failure: RefCell::new(None),
            last_failure_taken: Cell::new(false),
            stats,
            connector,
        }
    }

    /// New limits (a reload that kept this pool).
    pub fn set_limits(&self, limits: PoolLimits) {
        self.limits.set(limits);
    }

    /// Requests in flight on this worker to this backend.
    pub fn in_flight(&self) -> usize {
        self.conns.borrow().iter().map(|c| c.in_flight.get()).sum()
    }

    /// A slot on a connection with room for one more stream: at once when there is one,
    /// else after waiting for a connection to come up or a slot to come free (see the module
    /// documentation). `fresh` asks for a new connection of its own (the one retry after a
    /// refused stream).
    ///
    /// # Errors
    /// [`ErrorKind::Overflow`] at once when too many requests wait; the connect's error when
    /// the connect it waited for failed (or, during the back-off after one, at once);
    /// [`ErrorKind::PendingTimeout`] after the connect timeout.
    ///
    /// # Cancel safety
    /// Cancel-safe: a request that stops waiting (its client left) leaves the pool as it
    /// was, and a connect it caused goes on for the others.
    pub async fn checkout(
        self: &Rc<Self>,
        fresh: bool,
        client: Option<SocketAddr>,
    ) -> Result<Lease, UpstreamError> {
        if self.connector.send_proxy {
            // Connections of their own per client: a free one of this client's, else a new
            // one (bounded like the others).
            if !fresh {
                if let Some(lease) = self.try_lease(client) {
                    return Ok(lease);
                }
            }
            if self.conns.borrow().len() + self.connecting.get() >= MAX_H1_CONNS_PER_BACKEND {
                self.count(|s| &s.upstream_overflow);
                return Err(UpstreamError::new(
                    ErrorKind::Overflow,
                    &self.connector.backend,
                    "every connection this worker may open to the backend is open",
                ));
            }
            return self.connect_own(client).await;
        }
        if fresh {
            return self.connect_own(None).await;
        }
        if let Some(lease) = self.try_lease(None) {
            return Ok(lease);
        }
        let backend = &self.connector.backend;
        if self.pending.get() >= self.limits.get().max_pending {
            self.count(|s| &s.upstream_overflow);
            return Err(UpstreamError::new(
                ErrorKind::Overflow,
                backend,
                format!(
                    "{} requests already wait for a connection or a stream slot",
                    self.pending.get()
                ),
            ));
        }
        self.pending.set(self.pending.get() + 1);
        let _waiting = Waiting(self);
        let deadline = Instant::now() + self.connector.connect_timeout;
        let failures_before = self.failures.get();
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if let Some(lease) = self.try_lease(None) {
                return Ok(lease);
            }
            // Unreachable, as far as we know: no connection open and none coming. (With
            // connections open, a request waits for a slot on them instead.)
            let unreachable = self.connecting.get() == 0 && self.conns.borrow().is_empty();
            if self.failures.get() != failures_before && unreachable {
                // The connect we waited for failed, and no other is under way.
                if let Some(e) = self.last_failure.borrow().as_ref() {
                    if self.last_failure_taken.replace(true) {
                        return Err(e.repeated("the connect this request waited for failed"));
                    }
                    return Err(e.clone());
                }
            }
            if unreachable {
                if let Some(e) = self.backing_off() {
                    self.count(|s| &s.upstream_backoff_refusals);
                    return Err(e);
                }
            }
            self.connect_if_needed();
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline.into()) => {
                    if let Some(lease) = self.try_lease(None) {
                        return Ok(lease);
                    }
                    self.count(|s| &s.upstream_pending_timeouts);
                    return Err(UpstreamError::new(
                        ErrorKind::PendingTimeout,
                        backend,
                        format!(
                            "no connection or stream slot within {:?} ({} open, {} connecting)",
                            self.connector.connect_timeout,
                            self.conns.borrow().len(),
                            self.connecting.get()
                        ),
                    ));
                }
            }
        }
    }

    /// The last connect error, repeated, while the back-off after it lasts.
    fn backing_off(&self) -> Option<UpstreamError> {
        let until = self.backoff.get().until?;
        if Instant::now() >= until {
            return None;
        }
        let last = self.last_failure.borrow();
        last.as_ref()
            .map(|e| e.repeated("backing off after a failed connect"))
    }

    /// Starts a connect when the waiting requests outnumber what the connects under way will
    /// bring, within [`MAX_CONNS_PER_BACKEND`] and outside a back-off.
    fn connect_if_needed(self: &Rc<Self>) {
        let open = self.conns.borrow().len() + self.connecting.get();
        let (per_conn, most) = if self.speaks_h1.get() {
            (1, MAX_H1_CONNS_PER_BACKEND)
        } else {
            (STREAMS_PER_NEW_CONN, MAX_CONNS_PER_BACKEND)
        };
        let coming = self.connecting.get() * per_conn;
        let wanted = self.pending.get() > coming;
        if !wanted || open >= most || self.backing_off().is_some() {
            return;
        }
        self.connecting.set(self.connecting.get() + 1);
        let pool = self.clone();
        tokio::task::spawn_local(async move {
            let result = pool.open_connection(None).await;
            pool.connecting.set(pool.connecting.get().saturating_sub(1));
            if let Err(e) = result {
                tracing::debug!(backend = %e.backend, error = %e.detail, "connect failed");
            }
            pool.changed.notify_waiters();
        });
    }

    /// A connection of the caller's own (after a refused stream: the retry must not land on
    /// the connection that refused it).
    async fn connect_own(
        self: &Rc<Self>,
        client: Option<SocketAddr>,
    ) -> Result<Lease, UpstreamError> {
        self.connecting.set(self.connecting.get() + 1);
        let result = self.open_connection(client).await;
        self.connecting.set(self.connecting.get().saturating_sub(1));
        self.changed.notify_waiters();
        let (send, in_flight, idle_since) = result?;
        in_flight.set(in_flight.get() + 1);
        Ok(Lease {
            send,
            in_flight,
            idle_since,
            pool: self.clone(),
        })
    }

    /// Connects, and adds the connection to the pool (or records the failure and backs off).
    async fn open_connection(
        self: &Rc<Self>,
        client: Option<SocketAddr>,
    ) -> Result<(Sender, Rc<Cell<usize>>, Rc<Cell<Instant>>), UpstreamError> {
        let closed = Rc::new(Cell::new(false));
        match self
            .connector
            .connect(closed.clone(), Rc::downgrade(self), client)
            .await
        {
            Ok(send) => {
                self.backoff.set(Backoff::default());
                if matches!(send, Sender::H1(_)) {
                    self.speaks_h1.set(true);
                }
                let in_flight = Rc::new(Cell::new(0));
                let idle_since = Rc::new(Cell::new(Instant::now()));
                self.conns.borrow_mut().push(PooledConn {
                    send: send.clone(),
                    in_flight: in_flight.clone(),
                    closed,
                    client,
                    idle_since: idle_since.clone(),
                });
                Ok((send, in_flight, idle_since))
            }
            Err(e) => {
                let mut b = self.backoff.get();
                let wait = BACKOFF_BASE
                    .saturating_mul(1 << b.failures.min(16))
                    .min(BACKOFF_MAX);
                b.failures = b.failures.saturating_add(1);
                b.until = Some(Instant::now() + wait);
                self.backoff.set(b);
                self.failures.set(self.failures.get() + 1);
                *self.last_failure.borrow_mut() = Some(e.clone());
                self.last_failure_taken.set(false);
                Err(e)
            }
        }
    }

    /// A connection closed: waiting requests look again (a connect may be needed).
    fn connection_closed(&self) {
        self.changed.notify_waiters();
    }

    fn count(&self, counter: impl Fn(&WorkerStats) -> &AtomicU64) {
        if let Some(stats) = &self.stats {
            counter(stats).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A slot on a connection with room, of `client`'s (`send_proxy` pools) or shared.
    fn try_lease(self: &Rc<Self>, client: Option<SocketAddr>) -> Option<Lease> {
        let mut conns = self.conns.borrow_mut();
        conns.retain_mut(PooledConn::usable);
        let c = conns
            .iter()
            .filter(|c| c.client == client && c.room() > 0)
            .min_by_key(|c| c.in_flight.get())?;
        c.in_flight.set(c.in_flight.get() + 1);
        Some(Lease {
            send: c.send.clone(),
            in_flight: c.in_flight.clone(),
            idle_since: c.idle_since.clone(),
            pool: self.clone(),
        })
    }
}

/// The PROXY protocol v2 header (HAProxy's specification, §2.2) opening a connection to
/// `backend` from `local` for `client`: the `PROXY` command with TCP over IPv4 (both
/// addresses IPv4) or IPv6 (IPv4 ones mapped), or `LOCAL` without a client (a health probe).
pub fn proxy_v2_header(
    client: Option<SocketAddr>,
    local: SocketAddr,
    backend: SocketAddr,
) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    let Some(client) = client else {
        h.extend_from_slice(&[0x20, 0x00, 0, 0]);
        return h;
    };
    // The destination: where the client's connection went is ours to know only as the
    // backend connection's own source; what backends use is the source.
    let dst = SocketAddr::new(local.ip(), backend.port());
    let (src_ip, dst_ip) = (client.ip(), dst.ip());
    match (src_ip, dst_ip) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
            h.extend_from_slice(&[0x21, 0x11, 0, 12]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
        }
        _ => {
            let v6 = |ip: std::net::IpAddr| match ip {
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                std::net::IpAddr::V6(v6) => v6,
            };
            h.extend_from_slice(&[0x21, 0x21, 0, 36]);
            h.extend_from_slice(&v6(src_ip).octets());
            h.extend_from_slice(&v6(dst_ip).octets());
        }
    }
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

/// Whether a connection can take a new stream now: not closed and no GOAWAY received.
fn usable(send: &mut SendRequest<Bytes>) -> bool {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    !matches!(send.poll_ready(&mut cx), std::task::Poll::Ready(Err(_)))
}
