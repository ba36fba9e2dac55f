//! One request over TCP, as hyper hands it over: its head becomes the HTTP/3-style field
//! list the forwarder admits (connection-specific fields of HTTP/1.1 dropped), an admitted
//! request gets an exchange and the same request task an HTTP/3 request gets, and the
//! exchange's loop end is driven here as futures: [`pump`] moves the request body in, the
//! service waits for the response head, and [`ResponseBody`] hands the body to hyper.

use super::Front;
use crate::http::exchange::{self, LoopEnd, Pending};
use crate::http::{bridge, Admission, Client, Protocol};
use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use quiche::h3::{Header, NameValue};
use std::cell::Cell;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

/// What every request of one connection shares.
pub(super) struct ConnCtx {
    pub front: Front,
    pub peer: SocketAddr,
    pub protocol: Protocol,
    /// The SNI of the connection's ClientHello (which certificate it got).
    pub sni: Option<Rc<str>>,
    /// `TLSv1.3` or `TLSv1.2` (empty: plaintext).
    pub tls_version: &'static str,
    /// Requests begun on the connection and in progress (its idle clock reads them).
    pub requests: Cell<(u64, usize)>,
    /// Counts the connection as open; a WebSocket tunnel holds it too, past hyper's end of
    /// the upgraded connection.
    pub open: Rc<super::Open>,
}

impl ConnCtx {
    /// The request's client, as the forwarder sees it.
    pub fn client(&self) -> Client {
        Client {
            peer: self.peer,
            protocol: self.protocol,
            tls_version: self.tls_version,
            sni: self.sni.clone(),
        }
    }
}

/// A request in progress on its connection, from its head until its response is handed
/// over whole or given up.
pub(super) struct InProgress(Rc<ConnCtx>);

impl InProgress {
    fn new(ctx: &Rc<ConnCtx>) -> Self {
        let (begun, open) = ctx.requests.get();
        ctx.requests.set((begun + 1, open + 1));
        Self(ctx.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        let (begun, open) = self.0.requests.get();
        self.0.requests.set((begun, open.saturating_sub(1)));
    }
}

/// The response stopped short (the backend failed after its head, or the client left):
/// hyper resets the HTTP/2 stream, or closes the HTTP/1.1 connection mid-body.
#[derive(Debug, thiserror::Error)]
#[error("response aborted")]
pub(super) struct Aborted;

/// Serves one request: admission, then a request task or a local answer.
///
/// # Errors
/// [`Aborted`] when there will be no response head.
pub(super) async fn handle(
    ctx: Rc<ConnCtx>,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Aborted> {
    let started = Instant::now();
    let in_progress = InProgress::new(&ctx);
    let fwd = ctx.front.forwarder();
    let stats = &fwd.services.stats;
    let websocket = is_websocket(&req);
    // The smuggling check stops reading the connection as HTTP after a head that asks for a
    // WebSocket; unless it becomes a tunnel, the connection ends after this answer.
    let close_after = ctx.protocol == Protocol::H1
        && req
            .headers()
            .get_all(http::header::UPGRADE)
            .iter()
            .any(|v| {
                v.as_bytes()
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"))
            });
    let upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    if let super::Kind::Plain { https_port } = ctx.front.0.kind {
        // Nothing is proxied in plaintext; the request body, if any, is not read.
        let answer = super::plain::answer(&fwd, &parts, https_port);
        let end = exchange::local(answer.fields, answer.body, false, stats.clone());
        return respond(end, in_progress).await;
    }
    // A tunnel's bytes follow the head.
    let more_frames = !body.is_end_stream() || websocket;
    let list = if websocket {
        websocket_fields(&parts)
    } else {
        h3_fields(&parts)
    };
    let admission = match fwd.admit(&list, more_frames, ctx.sni.as_deref(), ctx.peer.ip()) {
        Admission::Forward {
            head,
            upstream,
            shape,
        } => {
            let (end, task) = exchange::new(shape, stats.clone(), None);
            // hyper and h2 buffer on their own: hold little here.
            end.set_client_room(0);
            let client = ctx.client();
            let key = head.field("sec-websocket-key").map(Bytes::copy_from_slice);
            fwd.spawn(task, head, upstream, client, started, None);
            if let Some(upgrade) = upgrade {
                return respond_tunnel(&ctx, end, in_progress, upgrade, key).await;
            }
            if more_frames {
                tokio::task::spawn_local(pump(body, end.clone()));
            }
            return respond(end, in_progress)
                .await
                .map(|r| closing(r, close_after));
        }
        other => other,
    };
    let answer = fwd
        .answer_locally(admission, &ctx.client(), started)
        .ok_or(Aborted)?;
    // The request body, if any, is not read: hyper discards it or closes.
    let end = exchange::local(answer.fields, answer.body, false, stats.clone());
    respond(end, in_progress)
        .await
        .map(|r| closing(r, close_after))
}

/// `response` with `connection: close` when `close` (HTTP/1.1: the connection ends after it).
fn closing<B>(mut response: Response<B>, close: bool) -> Response<B> {
    if close {
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Whether `req` opens a WebSocket: HTTP/1.1's `GET` with `upgrade: websocket` (and
/// `connection: upgrade`), or HTTP/2's extended CONNECT with `:protocol websocket`.
fn is_websocket(req: &Request<Incoming>) -> bool {
    if req.method() == http::Method::CONNECT {
        return req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    }
    let has = |name: http::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    };
    req.method() == http::Method::GET
        && req.version() == http::Version::HTTP_11
        && has(http::header::UPGRADE, "websocket")
        && has(http::header::CONNECTION, "upgrade")
}

/// A WebSocket's head as the forwarder admits it: an extended CONNECT (RFC 9220's form),
/// whichever way the client asked.
fn websocket_fields(parts: &http::request::Parts) -> Vec<Header> {
    let mut list = h3_fields(parts);
    list.retain(|h| !matches!(h.name(), b":method" | b":scheme" | b":path"));
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = vec![
        Header::new(b":method", b"CONNECT"),
        Header::new(b":protocol", b"websocket"),
        Header::new(b":scheme", b"https"),
        Header::new(b":path", path.as_bytes()),
    ];
    out.extend(list);
    out
}

/// The answer to a WebSocket request: the tunnel's `200` becomes HTTP/1.1's `101` (with the
/// `sec-websocket-accept` of the client's key) or stays HTTP/2's `200`, and once hyper hands
/// over the upgraded stream, [`splice`] carries bytes between it and the exchange. Any other
/// answer (the backend refused, 502 …) is an ordinary response.
async fn respond_tunnel(
    ctx: &Rc<ConnCtx>,
    end: LoopEnd,
    in_progress: InProgress,
    upgrade: hyper::upgrade::OnUpgrade,
    key: Option<Bytes>,
) -> Result<Response<ResponseBody>, Aborted> {
    let protocol = ctx.protocol;
    let mut response = respond(end.clone(), in_progress).await?;
    if response.status() != StatusCode::OK {
        // Not upgraded: an HTTP/1.1 connection ends after this answer.
        return Ok(closing(response, protocol == Protocol::H1));
    }
    let Some(in_progress) = response.body_mut().take_for_tunnel() else {
        return Err(Aborted);
    };
    if protocol == Protocol::H1 {
        let Some(key) = key else {
            end.abort();
            return Err(Aborted);
        };
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        h.remove(http::header::CONTENT_LENGTH);
        h.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
        h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(v) = HeaderValue::from_str(&crate::upstream::h1::websocket_accept(&key)) {
            h.insert(http::header::SEC_WEBSOCKET_ACCEPT, v);
        }
    }
    let held = Held {
        _in_progress: in_progress,
        _open: ctx.open.clone(),
    };
    tokio::task::spawn_local(splice(upgrade, end, held, ctx.front.clone()));
    Ok(response)
}

/// What a tunnel keeps alive while it runs: its request in progress, and its connection
/// counted open (the drain waits for it).
struct Held {
    _in_progress: InProgress,
    _open: Rc<super::Open>,
}

/// Carries a WebSocket's bytes between the client's upgraded stream and the exchange, each
/// way only as fast as the other side takes them; ends when the backend's side has ended (or
/// either side broke off), or when the front closes everything (the drain's grace is over).
async fn splice(upgrade: hyper::upgrade::OnUpgrade, end: LoopEnd, _held: Held, front: Front) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(io) = upgrade.await else {
        end.abort();
        return;
    };
    let (mut rd, mut wr) = tokio::io::split(hyper_util::rt::TokioIo::new(io));
    let up = async {
        let mut buf = bytes::BytesMut::new();
        loop {
            if !request_room(&end).await {
                return;
            }
            buf.reserve(64 * 1024);
            match rd.read_buf(&mut buf).await {
                Ok(0) => {
                    let _ = end.end_request(None);
                    return;
                }
                Ok(_) => {
                    if end.push_request(buf.split().freeze()).is_err() {
                        end.abort();
                        return;
                    }
                }
                Err(_) => {
                    end.abort();
                    return;
                }
            }
        }
    };
    let down = async {
        loop {
            let next = poll_fn(|cx| match end.pending() {
                Pending::Body { chunk, fin } => Poll::Ready(Some((chunk, fin))),
                Pending::Fin | Pending::Trailers => {
                    let _ = end.end_written();
                    Poll::Ready(None)
                }
                Pending::Nothing if !end.task_done() => {
                    end.wake_on_response(cx.waker());
                    Poll::Pending
                }
                _ => Poll::Ready(None),
            })
            .await;
            let Some((chunk, fin)) = next else {
                let _ = wr.shutdown().await;
                return;
            };
            let _ = end.body_written(chunk.len(), fin);
            if wr.write_all(&chunk).await.is_err() {
                end.abort();
                return;
            }
            if fin {
                let _ = wr.shutdown().await;
                return;
            }
        }
    };
    // The client ending its side does not end the tunnel: the backend's answer to that
    // (its close frame, then its end) still comes down.
    let mut up = std::pin::pin!(up);
    let mut down = std::pin::pin!(down);
    let mut up_done = false;
    let mut phase = front.0.phase.subscribe();
    let closing = phase.wait_for(|p| *p == super::Phase::Closing);
    let mut closing = std::pin::pin!(closing);
    loop {
        tokio::select! {
            () = &mut up, if !up_done => up_done = true,
            () = &mut down => return,
            _ = &mut closing => {
                end.abort();
                return;
            }
        }
    }
}

/// Waits for the response head on `end`, and makes hyper's response of it.
async fn respond(end: LoopEnd, in_progress: InProgress) -> Result<Response<ResponseBody>, Aborted> {
    // Dropped before the head (the client reset the stream): the task learns it.
    let mut body = ResponseBody {
        end: end.clone(),
        done: false,
        in_progress: Some(in_progress),
    };
    let (fields, fin) = poll_fn(|cx| match end.pending() {
        Pending::Head { fin } => Poll::Ready(
            end.take_head(fin)
                .map(|fields| (fields, fin))
                .map_err(|_| Aborted),
        ),
        Pending::Nothing if !end.task_done() => {
            end.wake_on_response(cx.waker());
            Poll::Pending
        }
        _ => Poll::Ready(Err(Aborted)),
    })
    .await?;
    body.done = fin;
    let mut status = StatusCode::BAD_GATEWAY;
    let mut headers = HeaderMap::with_capacity(fields.len() + 1);
    for h in &fields {
        if h.name() == b":status" {
            status = std::str::from_utf8(h.value())
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(StatusCode::BAD_GATEWAY);
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name()),
            HeaderValue::from_bytes(h.value()),
        ) {
            headers.append(n, v);
        }
    }
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// The request head as the forwarder admits it: pseudo-fields from the request line (or
/// HTTP/2's own), then the fields, without HTTP/1.1's connection-specific ones (RFC 9110
/// §7.6.1: those named in `connection` too; `te` only as `trailers`).
fn h3_fields(parts: &http::request::Parts) -> Vec<Header> {
    let mut out = Vec::with_capacity(parts.headers.len() + 4);
    out.push(Header::new(b":method", parts.method.as_str().as_bytes()));
    let connect = parts.method == http::Method::CONNECT;
    if !connect {
        out.push(Header::new(b":scheme", b"https"));
    }
    // HTTP/2's :authority, or HTTP/1.1's absolute form; otherwise the Host field says.
    if let Some(a) = parts.uri.authority() {
        out.push(Header::new(b":authority", a.as_str().as_bytes()));
    }
    if !connect {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        out.push(Header::new(b":path", path.as_bytes()));
    }
    let named: Vec<&[u8]> = parts
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .collect();
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if bridge::CONNECTION_SPECIFIC.contains(&n)
            || (n == "te" && !value.as_bytes().eq_ignore_ascii_case(b"trailers"))
            || named.iter().any(|c| c.eq_ignore_ascii_case(n.as_bytes()))
        {
            continue;
        }
        out.push(Header::new(n.as_bytes(), value.as_bytes()));
    }
    out
}

/// Waits until the exchange has room for more of the client's bytes; `false` when nobody
/// will take them any more (the task is done, or the client gone).
async fn request_room(end: &LoopEnd) -> bool {
    poll_fn(|cx| {
        if end.task_done() || end.client_gone() {
            return Poll::Ready(false);
        }
        if end.room_for_request() || end.wants_reading() {
            return Poll::Ready(true);
        }
        end.wake_on_request_room(cx.waker());
        Poll::Pending
    })
    .await
}

/// Moves the client's request body into the exchange, while there is room there.
async fn pump(mut body: Incoming, end: LoopEnd) {
    loop {
        if !request_room(&end).await {
            return;
        }
        let frame = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let pushed = match frame {
            None => end.end_request(None),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => end.push_request(data),
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => end.end_request(Some(trailers)),
                    Err(_) => Ok(()),
                },
            },
            Some(Err(e)) => {
                tracing::debug!(error = %e, "request body broken off");
                end.abort();
                return;
            }
        };
        match pushed {
            Ok(()) if end.request_unfinished() => {}
            Ok(()) => return,
            // Over the pool's limit: the task answers 413.
            Err(exchange::BodyError::TooLarge) => return,
            Err(_) => {
                end.abort();
                return;
            }
        }
    }
}

/// The response body, taken from the exchange as hyper asks for it.
pub(super) struct ResponseBody {
    end: LoopEnd,
    /// The end was handed to hyper (or the response was given up).
    done: bool,
    /// The request is in progress until hyper drops its body (or, for a tunnel, until the
    /// tunnel ends: then it has moved to the splice).
    in_progress: Option<InProgress>,
}

impl ResponseBody {
    /// A tunnel's response carries no body: its bytes go through the upgraded stream. Hands
    /// over what keeps the request in progress.
    fn take_for_tunnel(&mut self) -> Option<InProgress> {
        self.done = true;
        self.in_progress.take()
    }
}

impl Body for ResponseBody {
    type Data = Chunks;
    type Error = Aborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Chunks>, Aborted>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let end = &this.end;
        let frame = match end.pending() {
            Pending::Body { chunk, fin } => {
                let _ = end.body_written(chunk.len(), fin);
                this.done = fin;
                Ok(Frame::data(gather(end, chunk, &mut this.done)))
            }
            Pending::Trailers => {
                let map = end
                    .trailer_fields()
                    .map(|t| {
                        t.iter()
                            .filter_map(|h| {
                                Some((
                                    HeaderName::from_bytes(h.name()).ok()?,
                                    HeaderValue::from_bytes(h.value()).ok()?,
                                ))
                            })
                            .collect::<HeaderMap>()
                    })
                    .unwrap_or_default();
                let _ = end.end_written();
                this.done = true;
                Ok(Frame::trailers(map))
            }
            Pending::Fin => {
                let _ = end.end_written();
                this.done = true;
                return Poll::Ready(None);
            }
            Pending::Nothing if !end.task_done() => {
                end.wake_on_response(cx.waker());
                return Poll::Pending;
            }
            // Reset by the task, or the task ended without finishing.
            _ => {
                this.done = true;
                Err(Aborted)
            }
        };
        Poll::Ready(Some(frame))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Bytes of queued body chunks handed to hyper at once: a backend's small DATA frames (nginx
/// sends 8 KiB ones) would each become a frame, a TLS record and a system call of their own;
/// together they become full frames written in one round (`super::gather`).
const GATHER: usize = 64 * 1024;

/// `first` and the chunks queued behind it, up to [`GATHER`] bytes, as one buffer (no copy);
/// `done` is set when the last of them ended the body.
fn gather(end: &LoopEnd, first: Bytes, done: &mut bool) -> Chunks {
    let mut out = Chunks::default();
    out.push(first);
    while !*done && out.remaining() < GATHER {
        let Pending::Body { chunk, fin } = end.pending() else {
            break;
        };
        if out.remaining() + chunk.len() > GATHER {
            break;
        }
        let _ = end.body_written(chunk.len(), fin);
        out.push(chunk);
        *done = fin;
    }
    out
}

/// Body chunks handed to hyper as one buffer, without copying them together.
#[derive(Debug, Default)]
pub(super) struct Chunks {
    parts: std::collections::VecDeque<Bytes>,
    remaining: usize,
}

impl Chunks {
    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.remaining += b.len();
            self.parts.push_back(b);
        }
    }
}

impl bytes::Buf for Chunks {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |b| b.as_ref())
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end of Chunks");
        self.remaining -= cnt;
        while cnt > 0 {
            let Some(front) = self.parts.front_mut() else {
                return;
            };
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.parts.pop_front();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, part) in dst.iter_mut().zip(&self.parts) {
            *slot = std::io::IoSlice::new(part);
            n += 1;
        }
        n
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        match self.parts.front_mut() {
            // The common case: within one chunk, shared rather than copied.
            Some(front) if len <= front.len() => {
                let out = front.split_to(len);
                if front.is_empty() {
                    self.parts.pop_front();
                }
                self.remaining -= len;
                out
            }
            _ => {
                assert!(
                    len <= self.remaining,
                    "copy_to_bytes past the end of Chunks"
                );
                let mut out = bytes::BytesMut::with_capacity(len);
                let mut left = len;
                while left > 0 {
                    let take = left.min(self.chunk().len());
                    out.extend_from_slice(&self.chunk()[..take]);
                    self.advance(take);
                    left -= take;
                }
                out.freeze()
            }
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if !self.done {
            // hyper gave up on the response: the client reset the stream or left.
            self.end.abort();
        }
    }
}
