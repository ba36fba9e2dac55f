//! HTTP/1.1 towards a backend, on hyper's client connection (`hyper::client::conn::http1`):
//! one request at a time per connection, kept alive in the worker's pool between requests.
//!
//! What is ours around it:
//! - [`RequestBody`], the request body as a bounded channel the request task fills (the
//!   backpressure of the HTTP/2 path, here from the channel's capacity);
//! - [`HeadGuard`], which reads every response head as it passes from the socket to hyper and
//!   fails the read on the shapes a response-smuggling backend uses and hyper would let
//!   through: a bare LF as line end, and `content-length` together with
//!   `transfer-encoding` (hyper drops the length and goes on; RFC 9112 §6.3 calls it an
//!   error a proxy must not pass on). Hyper itself refuses conflicting `content-length`s;
//! - the request head in origin form with `host` ([`to_http1`]), and the response head without
//!   the fields its `connection` field names ([`strip_connection_named`]).

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request};
use http_body::{Body, Frame, SizeHint};
use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

/// Frames a request body may hold between the request task and hyper's connection.
pub const BODY_FRAMES: usize = 4;

/// Why a request body stopped short (the client left, or broke a limit): hyper abandons the
/// request and closes the connection, so the backend never sees a complete message.
#[derive(Debug, thiserror::Error)]
#[error("request body aborted: {0}")]
pub struct BodyAborted(pub &'static str);

pub type BodyFrame = Result<Frame<Bytes>, BodyAborted>;

/// A request body: nothing, or what the request task sends through a [`BodySender`].
pub struct RequestBody {
    rx: Option<mpsc::Receiver<BodyFrame>>,
    aborted: Rc<Cell<Option<&'static str>>>,
}

/// The request task's end of a [`RequestBody`].
pub struct BodySender {
    tx: mpsc::Sender<BodyFrame>,
    aborted: Rc<Cell<Option<&'static str>>>,
}

impl BodySender {
    /// Sends a frame, waiting for room (backpressure from the backend's socket).
    ///
    /// # Errors
    /// When the connection no longer reads the body (it closed, or the response came).
    pub async fn send(&self, frame: Frame<Bytes>) -> Result<(), ()> {
        self.tx.send(Ok(frame)).await.map_err(|_| ())
    }

    /// Ends the body as broken: hyper abandons the request rather than finishing its framing,
    /// so the backend never takes a cut-short chunked body for a complete one. (Sending the
    /// error through the channel could wait for room; the flag is read when the channel ends.)
    pub fn abort(self, why: &'static str) {
        self.aborted.set(Some(why));
    }
}

impl RequestBody {
    /// A request without a body (`content-length` is not sent for it, nor chunked framing).
    pub fn empty() -> Self {
        Self {
            rx: None,
            aborted: Rc::default(),
        }
    }

    /// A body fed through the returned sender; it ends when the sender is dropped.
    pub fn channel() -> (BodySender, Self) {
        let (tx, rx) = mpsc::channel(BODY_FRAMES);
        let aborted: Rc<Cell<Option<&'static str>>> = Rc::default();
        (
            BodySender {
                tx,
                aborted: aborted.clone(),
            },
            Self {
                rx: Some(rx),
                aborted,
            },
        )
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyAborted;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyAborted>>> {
        let this = &mut *self;
        match this.rx.as_mut() {
            None => Poll::Ready(None),
            Some(rx) => match rx.poll_recv(cx) {
                Poll::Ready(None) => {
                    Poll::Ready(this.aborted.get().map(|why| Err(BodyAborted(why))))
                }
                other => other,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rx.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.rx.is_none() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

pub type SendRequest = hyper::client::conn::http1::SendRequest<RequestBody>;

/// One HTTP/1.1 connection's sending half, and the guard reading its response heads.
pub struct Conn {
    pub send: RefCell<SendRequest>,
    /// Set when a request goes out: the guard then reads the next bytes as a response head.
    pub head_due: Arc<AtomicBool>,
    /// Requests sent on it so far (a failure on a reused connection may be a stale keep-alive).
    pub uses: Cell<u64>,
}

/// Why a request got no response: `unsent` when it never left (the connection had closed).
#[derive(Debug)]
pub struct SendError {
    pub unsent: bool,
    pub error: hyper::Error,
}

/// What a sent request's response future yields.
pub type ResponseResult = Result<http::Response<hyper::body::Incoming>, SendError>;

impl Conn {
    /// Sends a request once the connection is ready for it (the previous response may be
    /// ending just now: its lease is gone before hyper has seen the end); its response head
    /// is scanned as it arrives. Also says whether the connection carried a request before
    /// (a failure then may be a stale keep-alive).
    pub fn send(
        self: &Rc<Self>,
        req: Request<RequestBody>,
    ) -> (
        bool,
        impl std::future::Future<Output = ResponseResult> + 'static,
    ) {
        let reused = self.uses.replace(self.uses.get() + 1) > 0;
        let conn = self.clone();
        let response = async move {
            let ready = std::future::poll_fn(|cx| conn.send.borrow_mut().poll_ready(cx)).await;
            if let Err(error) = ready {
                return Err(SendError {
                    unsent: true,
                    error,
                });
            }
            conn.head_due.store(true, Ordering::Relaxed);
            let sent = conn.send.borrow_mut().try_send_request(req);
            sent.await.map_err(|mut e| SendError {
                unsent: e.take_message().is_some(),
                error: e.into_error(),
            })
        };
        (reused, response)
    }
}

/// The request head for an HTTP/1.1 backend: origin form (`/path?query`), the authority as
/// `host`, version 1.1. (The HTTP/2 form carries the authority in the URI instead.)
///
/// # Errors
/// When the URI cannot be rebuilt (already validated input makes this rare).
pub fn to_http1(req: Request<()>, body: RequestBody) -> Result<Request<RequestBody>, String> {
    let (mut parts, ()) = req.into_parts();
    if let Some(authority) = parts.uri.authority() {
        if !parts.headers.contains_key(http::header::HOST) {
            let host = HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
            parts.headers.insert(http::header::HOST, host);
        }
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = path
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    parts.version = http::Version::HTTP_11;
    Ok(Request::from_parts(parts, body))
}

/// Removes the fields a response's `connection` field names (RFC 9110 §7.6.1): they were
/// meant for this hop only. The fixed connection-specific fields go in the common conversion.
pub fn strip_connection_named(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    for n in named {
        if let Ok(name) = http::HeaderName::from_bytes(n.as_bytes()) {
            headers.remove(name);
        }
    }
}

/// RFC 6455 §1.3: the `sec-websocket-accept` answering `sec-websocket-key` `key`.
pub fn websocket_accept(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.trim_ascii());
    ctx.update(GUID);
    base64(ctx.finish().as_ref())
}

/// A fresh `sec-websocket-key` (16 random bytes, base64), for a client that sent none
/// (WebSockets over HTTP/2 and HTTP/3 have no key).
pub fn websocket_key() -> String {
    let mut nonce = [0u8; 16];
    // A failing system RNG leaves zeros: the key is a handshake check, not a secret.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce);
    base64(&nonce)
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Whether a method may be sent again after a connection failed under it (RFC 9110 §9.2.2).
pub fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// A response-head scanner fed every byte the backend sends while a head is due.
#[derive(Debug, Clone)]
pub struct HeadScan {
    /// A head is due (a request went out) and has not ended yet.
    in_head: bool,
    prev_cr: bool,
    /// Bytes on the current line (without CR).
    line_len: usize,
    /// Lines finished in this head (0: on the status line).
    lines: usize,
    /// Still in the current line's field name (before its colon).
    in_name: bool,
    name: [u8; 20],
    name_len: usize,
    /// The status line's first status digit, and the status so far.
    status: u16,
    content_length: bool,
    transfer_encoding: bool,
}

impl HeadScan {
    /// Nothing read yet of a head that is due.
    const FRESH: Self = Self {
        in_head: true,
        prev_cr: false,
        line_len: 0,
        lines: 0,
        in_name: true,
        name: [0; 20],
        name_len: 0,
        status: 0,
        content_length: false,
        transfer_encoding: false,
    };

    /// A new connection: its first bytes are a response head.
    pub fn new() -> Self {
        Self::FRESH
    }

    /// A request is about to go out: the next bytes start its response head.
    pub fn expect_head(&mut self) {
        *self = Self::FRESH;
    }

    /// Scans bytes read from the backend.
    ///
    /// # Errors
    /// What is wrong with the head, for the 502's log line.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        for &b in bytes {
            if !self.in_head {
                return Ok(());
            }
            match b {
                b'\n' => {
                    if !self.prev_cr {
                        return Err("bare LF in the response head");
                    }
                    self.end_line()?;
                }
                b'\r' => {}
                _ => {
                    if self.lines == 0 {
                        // "HTTP/1.1 200 …": the status digits are bytes 9..12.
                        if (9..12).contains(&self.line_len) && b.is_ascii_digit() {
                            self.status = self.status * 10 + u16::from(b - b'0');
                        }
                    } else if self.in_name {
                        if b == b':' {
                            self.in_name = false;
                        } else if self.name_len < self.name.len() {
                            self.name[self.name_len] = b.to_ascii_lowercase();
                            self.name_len += 1;
                        } else {
                            self.name_len = self.name.len() + 1;
                        }
                    }
                    self.line_len += 1;
                }
            }
            self.prev_cr = b == b'\r';
        }
        Ok(())
    }

    fn end_line(&mut self) -> Result<(), &'static str> {
        if self.line_len == 0 && self.lines > 0 {
            // The empty line: the head ends.
            if self.content_length && self.transfer_encoding {
                return Err("content-length and transfer-encoding in one response");
            }
            if (100..200).contains(&self.status) && self.status != 101 {
                // An interim response: the final head follows.
                self.expect_head();
            } else {
                self.in_head = false;
            }
            return Ok(());
        }
        if self.lines > 0 {
            match self.name.get(..self.name_len) {
                Some(b"content-length") => self.content_length = true,
                Some(b"transfer-encoding") => self.transfer_encoding = true,
                _ => {}
            }
        }
        self.lines += 1;
        self.line_len = 0;
        self.in_name = true;
        self.name_len = 0;
        Ok(())
    }
}

/// A backend socket whose response heads pass through a [`HeadScan`]. (Send, as hyper's
/// upgrades want: the flag is the only thing shared with the pool.)
pub struct HeadGuard<T> {
    inner: T,
    scan: HeadScan,
    head_due: Arc<AtomicBool>,
}

impl<T> HeadGuard<T> {
    pub fn new(inner: T, head_due: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            scan: HeadScan::new(),
            head_due,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HeadGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.head_due.swap(false, Ordering::Relaxed) {
                    this.scan.expect_head();
                }
                let new = buf.filled().get(before..).unwrap_or_default();
                match this.scan.feed(new) {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(why) => Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why))),
                }
            }
            other => other,
        }
    }
}

writes_through!(HeadGuard);

/// The smuggling guard's verdict, when it is what broke a hyper error.
pub fn guard_error(e: &hyper::Error) -> Option<String> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::InvalidData {
                return Some(io.to_string());
            }
        }
        source = s.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(input: &[u8]) -> Result<bool, &'static str> {
        let mut s = HeadScan::new();
        // Byte by byte as well as whole: a head split anywhere reads the same.
        let mut one = HeadScan::new();
        for b in input {
            one.feed(std::slice::from_ref(b))?;
        }
        s.feed(input)?;
        assert_eq!(s.in_head, one.in_head);
        Ok(s.in_head)
    }

    #[test]
    fn a_plain_head_ends_at_the_empty_line_and_the_body_is_not_read() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab\ncd";
        assert_eq!(scan(head), Ok(false), "the body's bare LF is not a head's");
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        assert_eq!(
            scan(b"HTTP/1.1 200 OK\ncontent-length: 1\r\n\r\n"),
            Err("bare LF in the response head")
        );
        assert_eq!(
            scan(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err("content-length and transfer-encoding in one response")
        );
        // A long name that starts like one of them is neither.
        assert_eq!(
            scan(b"HTTP/1.1 200 OK\r\ncontent-length-and-more-here: 3\r\ntransfer-encoding: chunked\r\n\r\n"),
            Ok(false)
        );
    }

    #[test]
    fn an_interim_response_is_followed_by_the_final_head() {
        let mut s = HeadScan::new();
        assert_eq!(s.feed(b"HTTP/1.1 100 Continue\r\n\r\n"), Ok(()));
        assert!(s.in_head, "the final head is still due");
        assert_eq!(
            s.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ntransfer-encoding: chunked\r\n\r\n"),
            Err("content-length and transfer-encoding in one response")
        );
        let mut s = HeadScan::new();
        assert_eq!(
            s.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n\n"),
            Ok(())
        );
        assert!(!s.in_head, "101 is final: what follows is another protocol");
    }

    #[test]
    fn origin_form_and_host_for_the_backend() {
        let req = Request::get("https://a.example:8443/x/y?q=1")
            .body(())
            .unwrap_or_default();
        let r = to_http1(req, RequestBody::empty()).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(r.uri().to_string(), "/x/y?q=1");
        assert_eq!(r.headers()["host"], "a.example:8443");
        assert_eq!(r.version(), http::Version::HTTP_11);
    }

    #[test]
    fn websocket_accept_is_rfc_6455s() {
        // The example of RFC 6455 §1.3.
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(websocket_key().len(), 24);
    }

    #[test]
    fn fields_named_by_connection_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, X-Hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-end", HeaderValue::from_static("2"));
        strip_connection_named(&mut h);
        assert!(h.get("x-hop").is_none());
        assert!(h.get("x-end").is_some());
    }
}
