//! One TCP connection: the TLS handshake (within `listen.tcp.header_timeout`), the protocol
//! ALPN chose, hyper serving it, and its end: idle for `listen.tcp.idle_timeout`, or the
//! front draining (HTTP/2 GOAWAY, HTTP/1.1 `connection: close` after the request in
//! progress), or closing.
//!
//! Idle means no request: none in progress and none begun for the idle timeout. Bytes alone
//! do not count, so a client that only sends HTTP/2 PINGs or SETTINGS (or trickles TLS
//! records) cannot hold a connection slot for ever.

use super::proxy_header::{self, Rewind};
use super::request::{self, ConnCtx};
use super::strict::{Refusal, Strict};
use super::{Front, Open, Phase};
use crate::http::Protocol;
use crate::telemetry::logging::LogKind;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Serves one accepted connection to its end.
pub(super) async fn serve(
    front: Front,
    open: Open,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let fwd = front.forwarder();
    if matches!(front.0.kind, super::Kind::Plain { .. }) {
        serve_plain(&front, open, stream, peer).await;
        return;
    }
    let (Some(tcp), Some(tls)) = (
        fwd.snapshot.config.listen.tcp.clone(),
        fwd.snapshot.tcp_tls.clone(),
    ) else {
        return;
    };
    let Some((stream, peer)) = proxy_header(&fwd, &tcp, stream, peer).await else {
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let tls = match tokio::time::timeout(tcp.header_timeout, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            fwd.services
                .stats
                .tcp_handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            fwd.services
                .stats
                .tcp_handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "TLS handshake did not finish within listen.tcp.header_timeout");
            return;
        }
    };
    let protocol = match tls.get_ref().1.alpn_protocol() {
        Some(b"h2") => Protocol::H2,
        // An ACME server validating TLS-ALPN-01: the handshake was the answer (RFC 8737 §3).
        Some(crate::certs::ACME_TLS_ALPN) => {
            tracing::info!(%peer, name = tls.get_ref().1.server_name().unwrap_or(""), "answered an ACME TLS-ALPN-01 validation");
            let mut tls = tls;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
            return;
        }
        _ => Protocol::H1,
    };
    let proxy = &fwd.snapshot.config.proxy;
    // hyper's smallest read buffer is 8 KiB.
    let max_head = usize::try_from(proxy.max_header_list_size)
        .unwrap_or(usize::MAX)
        .max(8192);
    // Shared with the connection's WebSocket tunnels: an upgraded HTTP/1.1 connection is
    // open (for the connection limit and the drain) until its tunnel ends.
    let open = Rc::new(open);
    let ctx = Rc::new(ConnCtx {
        front: front.clone(),
        peer,
        protocol,
        sni: tls.get_ref().1.server_name().map(Rc::from),
        tls_version: match tls.get_ref().1.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            _ => "",
        },
        requests: Default::default(),
        open: open.clone(),
    });
    let requests = ctx.clone();
    let requests = move || requests.requests.get();
    let service = hyper::service::service_fn(move |req| request::handle(ctx.clone(), req));
    let ended = match protocol {
        Protocol::H2 => {
            let (io, write_out) = super::gather::gather(tls);
            let conn = http2::Builder::new(LocalExec)
                .timer(TokioTimer::new())
                // WebSockets over HTTP/2 (RFC 8441).
                .enable_connect_protocol()
                .max_concurrent_streams(
                    u32::try_from(fwd.snapshot.config.quic.max_concurrent_streams)
                        .unwrap_or(u32::MAX),
                )
                .max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX))
                .serve_connection(TokioIo::new(io), service);
            // hyper's writes are gathered and go to TLS at the end of each round.
            let conn = std::pin::pin!(super::gather::Flushing::new(conn, write_out));
            let graceful = |c: Pin<&mut _>| {
                http2::Connection::graceful_shutdown(super::gather::Flushing::conn(c));
            };
            drive(
                &front,
                conn,
                graceful,
                &requests,
                tcp.idle_timeout,
                tcp.header_timeout,
            )
            .await
        }
        _ => {
            // Counted at once; logged (through the worker's log gate, which stays on this
            // thread) when the connection has ended, which a refusal makes it do.
            let stats = fwd.services.stats.clone();
            let refused = std::sync::Arc::new(std::sync::Mutex::new(None::<Refusal>));
            let noted = refused.clone();
            let on_refusal = Box::new(move |why: Refusal| {
                stats
                    .http1_smuggling_refused
                    .fetch_add(1, Ordering::Relaxed);
                if let Ok(mut r) = noted.lock() {
                    *r = Some(why);
                }
            });
            let _log_refusal = LogRefusal {
                refused,
                services: fwd.services.clone(),
                peer,
            };
            let io = Strict::new(tls, max_head, on_refusal);
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(tcp.header_timeout)
                .max_buf_size(max_head)
                .serve_connection(TokioIo::new(io), service)
                // A WebSocket's 101 hands the connection to its tunnel.
                .with_upgrades();
            let conn = std::pin::pin!(conn);
            let graceful = |c: Pin<&mut http1::UpgradeableConnection<_, _>>| c.graceful_shutdown();
            drive(
                &front,
                conn,
                graceful,
                &requests,
                tcp.idle_timeout,
                tcp.header_timeout,
            )
            .await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, protocol = protocol.label(), error = %e, "TCP connection ended with an error");
    }
    drop(open);
}

/// Logs a refused HTTP/1.1 head when its connection is done with (dropped with it).
struct LogRefusal {
    refused: std::sync::Arc<std::sync::Mutex<Option<Refusal>>>,
    services: Rc<crate::http::Services>,
    peer: SocketAddr,
}

impl Drop for LogRefusal {
    fn drop(&mut self) {
        let why = self.refused.lock().ok().and_then(|mut r| r.take());
        if let Some(why) = why {
            if let Some(suppressed) = self.services.log_gate.admit(LogKind::Smuggling) {
                let peer = self.peer;
                tracing::info!(%peer, reason = why.text(), suppressed, "HTTP/1.1 request refused as request smuggling (400, connection closed)");
            }
        }
    }
}

/// The connection's client: from the PROXY protocol header a trusted load balancer opens it
/// with ([`proxy_header`](super::proxy_header)), else its own peer address. `None`: the
/// connection is refused (a header from an untrusted source, a trusted source without a
/// valid one, or none within the header timeout), counted and logged.
async fn proxy_header(
    fwd: &crate::http::Forwarder,
    tcp: &crate::config::Tcp,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) -> Option<(Rewind<tokio::net::TcpStream>, SocketAddr)> {
    use tokio::io::AsyncReadExt;
    let plain = |stream| Some((Rewind::new(bytes::Bytes::new(), stream), peer));
    if tcp.proxy_protocol.is_empty() {
        return plain(stream);
    }
    let refuse = |why: &str| {
        fwd.services
            .stats
            .tcp_proxy_refused
            .fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = fwd.services.log_gate.admit(LogKind::Smuggling) {
            tracing::info!(%peer, reason = why, suppressed, "TCP connection refused: PROXY protocol");
        }
        None
    };
    if !crate::config::in_any(&tcp.proxy_protocol, peer.ip()) {
        // A client may not say whose the connection is: one that tries is refused.
        let mut first = [0u8; 1];
        return match tokio::time::timeout(tcp.header_timeout, stream.peek(&mut first)).await {
            Ok(Ok(1)) if proxy_header::looks_like_header(first[0]) => {
                refuse("a PROXY header from a source not in listen.tcp.proxy_protocol.trusted")
            }
            _ => plain(stream),
        };
    }
    let mut stream = stream;
    let mut buf = bytes::BytesMut::with_capacity(256);
    let deadline = tokio::time::Instant::now() + tcp.header_timeout;
    loop {
        match proxy_header::parse(&buf) {
            Ok(Some(h)) => {
                let rest = buf.split_off(h.len).freeze();
                return Some((Rewind::new(rest, stream), h.source.unwrap_or(peer)));
            }
            Ok(None) if buf.len() < proxy_header::MAX_HEADER => {}
            Ok(None) => return refuse("PROXY header too long"),
            Err(why) => return refuse(why),
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(_)) => {}
            Err(_) => return refuse("no PROXY header within listen.tcp.header_timeout"),
        }
    }
}

/// Serves one plaintext HTTP/1.1 connection (`listen.http`): the TLS listener's header and
/// idle timeouts (10 s and 60 s when it is off), small heads, every request answered by
/// [`super::plain`].
async fn serve_plain(front: &Front, open: Open, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let fwd = front.forwarder();
    let (header_timeout, idle_timeout) = fwd
        .snapshot
        .config
        .listen
        .tcp
        .as_ref()
        .map_or((Duration::from_secs(10), Duration::from_secs(60)), |t| {
            (t.header_timeout, t.idle_timeout)
        });
    let open = Rc::new(open);
    let ctx = Rc::new(ConnCtx {
        front: front.clone(),
        peer,
        protocol: Protocol::H1,
        sni: None,
        tls_version: "",
        requests: Default::default(),
        open: open.clone(),
    });
    let requests = ctx.clone();
    let requests = move || requests.requests.get();
    let service = hyper::service::service_fn(move |req| request::handle(ctx.clone(), req));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service);
    let conn = std::pin::pin!(conn);
    let graceful = |c: Pin<&mut _>| http1::Connection::graceful_shutdown(c);
    if let Err(e) = drive(
        front,
        conn,
        graceful,
        &requests,
        idle_timeout,
        header_timeout,
    )
    .await
    {
        tracing::debug!(%peer, error = %e, "plaintext connection ended with an error");
    }
    drop(open);
}

/// Runs `conn` until it ends, the front closes, or it idles out; starts a graceful shutdown
/// when the front drains or the connection is idle, and ends it when it stays idle.
/// `requests` says how many requests the connection has begun and how many are in progress.
///
/// A connection that has begun no request when the front starts to drain (it was accepted
/// just before, and its client is still in the TLS handshake or sending its first request)
/// gets that first request served, within `first_request`, before its graceful shutdown:
/// shutting it down at once would close it under a request already on its way, which the
/// client then sees as an empty reply.
async fn drive<C>(
    front: &Front,
    mut conn: Pin<&mut C>,
    graceful: impl Fn(Pin<&mut C>),
    requests: &impl Fn() -> (u64, usize),
    idle: Duration,
    first_request: Duration,
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    let mut phase = front.0.phase.subscribe();
    let mut shutting_down = false;
    // Draining, but waiting for the first request (until then).
    let mut deferred: Option<Instant> = None;
    let drain = |conn: Pin<&mut C>, shutting_down: &mut bool, deferred: &mut Option<Instant>| {
        if *shutting_down || deferred.is_some() {
            return;
        }
        if requests().0 == 0 {
            *deferred = Some(Instant::now() + first_request);
        } else {
            *shutting_down = true;
            graceful(conn);
        }
    };
    // The front may have begun to drain during the TLS handshake.
    match *phase.borrow_and_update() {
        Phase::Closing => return Ok(()),
        Phase::Draining => drain(conn.as_mut(), &mut shutting_down, &mut deferred),
        Phase::Serving => {}
    }
    let mut seen = requests().0;
    loop {
        tokio::select! {
            r = conn.as_mut() => return r,
            r = phase.changed() => {
                let now = r.map_or(Phase::Closing, |()| *phase.borrow_and_update());
                match now {
                    Phase::Closing => return Ok(()),
                    Phase::Draining => drain(conn.as_mut(), &mut shutting_down, &mut deferred),
                    Phase::Serving => {}
                }
            }
            () = tokio::time::sleep(FIRST_REQUEST_POLL), if deferred.is_some() => {
                if requests().0 > 0 || deferred.is_some_and(|d| Instant::now() >= d) {
                    deferred = None;
                    shutting_down = true;
                    graceful(conn.as_mut());
                }
            }
            () = tokio::time::sleep(idle) => {
                let (begun, open) = requests();
                if begun == seen && open == 0 {
                    if shutting_down {
                        return Ok(());
                    }
                    deferred = None;
                    shutting_down = true;
                    graceful(conn.as_mut());
                }
                seen = begun;
            }
        }
    }
}

/// How often a draining connection waiting for its first request looks whether it began.
const FIRST_REQUEST_POLL: Duration = Duration::from_millis(10);

/// Runs hyper's HTTP/2 stream tasks on the worker's `LocalSet`.
#[derive(Clone, Copy)]
pub(super) struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}
