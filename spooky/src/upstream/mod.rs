//! HTTP/2 connections to backends: one [`BackendPool`] per worker per backend, owned by that
//! worker's single-threaded runtime (no locks shared across threads). A pool multiplexes
//! requests over its connections up to each peer's stream limit, opens more connections when
//! they are saturated, and forgets connections that closed or received GOAWAY.
//!
//! Transport is h2c (prior knowledge) or TLS with ALPN `h2` through rustls (the client
//! configuration comes built from the snapshot). What went wrong is classified here, as
//! [`UpstreamError`] kinds; what a kind means for the client (502 or 504), for the backend's
//! health and for the logs is decided in one place, `http::outcome`.

pub mod readahead;

use crate::config::Backend;
use crate::snapshot::TlsPlan;
use bytes::Bytes;
use h2::client::SendRequest;
use readahead::ReadAhead;
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;
use tokio::net::TcpStream;

/// Most connections a worker opens to one backend.
const MAX_CONNS_PER_BACKEND: usize = 16;
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
}

/// A failure talking to backend `backend`.
#[derive(Debug, thiserror::Error)]
#[error("backend {backend}: {kind:?}: {detail}")]
pub struct UpstreamError {
    pub kind: ErrorKind,
    pub backend: Rc<str>,
    pub detail: String,
}

impl UpstreamError {
    pub fn new(kind: ErrorKind, backend: &Rc<str>, detail: impl std::fmt::Display) -> Self {
        Self {
            kind,
            backend: backend.clone(),
            detail: detail.to_string(),
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
    pub connect_timeout: Duration,
}

impl Connector {
    /// A connector for `backend`, with its TLS plan from the snapshot.
    pub fn new(backend: &Backend, tls: Option<TlsPlan>, connect_timeout: Duration) -> Self {
        Self {
            backend: Rc::from(backend.id.as_str()),
            addr: backend.address,
            tls,
            connect_timeout,
        }
    }

    /// Opens one HTTP/2 connection and spawns its driver on the current `LocalSet`.
    ///
    /// # Errors
    /// [`UpstreamError`] of kind `Connect`, `ConnectTimeout`, `Tls` or `Handshake`.
    pub async fn connect(
        &self,
        closed: Rc<Cell<bool>>,
    ) -> Result<SendRequest<Bytes>, UpstreamError> {
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
        let _ = tcp.set_nodelay(true);
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(64 * 1024)
            .enable_push(false);
        match &self.tls {
            None => {
                let (send, conn) = builder
                    .handshake::<_, Bytes>(ReadAhead::h2_frames(tcp))
                    .await
                    .map_err(|e| UpstreamError::new(ErrorKind::Handshake, b, e))?;
                spawn_driver(conn, closed, b.clone());
                Ok(send)
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
                if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(UpstreamError::new(
                        ErrorKind::Tls,
                        b,
                        "backend did not negotiate ALPN h2",
                    ));
                }
                let (send, conn) = builder
                    .handshake::<_, Bytes>(tls)
                    .await
                    .map_err(|e| UpstreamError::new(ErrorKind::Handshake, b, e))?;
                spawn_driver(conn, closed, b.clone());
                Ok(send)
            }
        }
    }
}

fn spawn_driver<T>(conn: h2::client::Connection<T, Bytes>, closed: Rc<Cell<bool>>, backend: Rc<str>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.await {
            tracing::debug!(backend = %backend, error = %e, "upstream connection ended");
        }
        closed.set(true);
    });
}

struct PooledConn {
    send: SendRequest<Bytes>,
    in_flight: Rc<Cell<usize>>,
    closed: Rc<Cell<bool>>,
}

/// A request slot on a pooled connection; releases the slot when dropped.
pub struct Lease {
    pub send: SendRequest<Bytes>,
    in_flight: Rc<Cell<usize>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
    }
}

/// One worker's connections to one backend.
pub struct BackendPool {
    pub connector: Connector,
    conns: RefCell<Vec<PooledConn>>,
    connecting: tokio::sync::Mutex<()>,
}

impl BackendPool {
    pub fn new(connector: Connector) -> Self {
        Self {
            connector,
            conns: RefCell::new(Vec::new()),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// Requests in flight on this worker to this backend.
    pub fn in_flight(&self) -> usize {
        self.conns.borrow().iter().map(|c| c.in_flight.get()).sum()
    }

    /// A slot on a connection with room for one more stream, connecting when none has room.
    /// `fresh` forces a new connection (used for the one retry after a refused stream).
    ///
    /// # Errors
    /// The connect error when a new connection was needed and could not be made.
    ///
    /// # Cancel safety
    /// Cancel-safe: a connection made by a cancelled call stays in the pool.
    pub async fn checkout(&self, fresh: bool) -> Result<Lease, UpstreamError> {
        if !fresh {
            if let Some(lease) = self.try_lease() {
                return Ok(lease);
            }
        }
        let _guard = self.connecting.lock().await;
        if !fresh {
            if let Some(lease) = self.try_lease() {
                return Ok(lease);
            }
        }
        if self.conns.borrow().len() >= MAX_CONNS_PER_BACKEND {
            // Saturated everywhere: queue on the least loaded connection.
            let (send, in_flight) = {
                let conns = self.conns.borrow();
                let c = conns.iter().min_by_key(|c| c.in_flight.get());
                match c {
                    Some(c) => (c.send.clone(), c.in_flight.clone()),
                    None => {
                        return Err(UpstreamError::new(
                            ErrorKind::Connect,
                            &self.connector.backend,
                            "no connection",
                        ))
                    }
                }
            };
            in_flight.set(in_flight.get() + 1);
            let mut lease = Lease { send, in_flight };
            lease.send = lease
                .send
                .clone()
                .ready()
                .await
                .map_err(|e| UpstreamError::from_h2(&e, &self.connector.backend))?;
            return Ok(lease);
        }
        let closed = Rc::new(Cell::new(false));
        let send = self.connector.connect(closed.clone()).await?;
        let in_flight = Rc::new(Cell::new(1));
        self.conns.borrow_mut().push(PooledConn {
            send: send.clone(),
            in_flight: in_flight.clone(),
            closed,
        });
        Ok(Lease { send, in_flight })
    }

    fn try_lease(&self) -> Option<Lease> {
        let mut conns = self.conns.borrow_mut();
        conns.retain_mut(|c| !c.closed.get() && usable(&mut c.send));
        let c = conns
            .iter()
            .filter(|c| c.in_flight.get() < c.send.current_max_send_streams().max(1))
            .min_by_key(|c| c.in_flight.get())?;
        c.in_flight.set(c.in_flight.get() + 1);
        Some(Lease {
            send: c.send.clone(),
            in_flight: c.in_flight.clone(),
        })
    }
}

/// Whether a connection can take a new stream now: not closed and no GOAWAY received.
fn usable(send: &mut SendRequest<Bytes>) -> bool {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    !matches!(send.poll_ready(&mut cx), std::task::Poll::Ready(Err(_)))
}
