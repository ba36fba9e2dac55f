//! A strict reading of an HTTP/1.1 client's bytes, in front of hyper.
//!
//! hyper parses HTTP/1.1 leniently where RFC 9112 lets a recipient choose: a bare LF ends a
//! line, `content-length` beside `transfer-encoding` is dropped (the latter wins), and two
//! equal `content-length` fields count as one. Each of these is a request-smuggling vector
//! when an intermediary in front of Spooky reads the same bytes differently, so Spooky
//! refuses them (RFC 9112 §6.3 allows it; §2.2 makes bare LF optional).
//!
//! [`Strict`] wraps the client stream and follows the message framing: each request head
//! (and each chunk-size line and trailer section) is parsed with `httparse`, the parser
//! hyper itself uses, and checked before any of its bytes reach hyper; body bytes are counted
//! through untouched. A head that breaks a rule is never handed on: hyper gets the bytes
//! before it, then [`REFUSAL`], a line it cannot parse, so hyper answers `400 Bad Request`
//! and closes the connection after the responses already due. Whatever the client sent
//! after that is never read.
//!
//! What hyper refuses on its own (a malformed head, obs-fold, an invalid `content-length`, a
//! `transfer-encoding` not ending in chunked, a head over its buffer) is handed on as it is:
//! hyper answers it and closes, so this reader stops checking there.
//!
//! The work per byte is bounded however the bytes arrive: new bytes are scanned once for line
//! ends ([`Scan`]), and a piece is parsed only when it can be judged — a head or trailer
//! section when its blank line (or a bare LF) has arrived, a chunk-size line at its LF, any
//! piece once it is longer than its limit. A head trickled a byte at a time costs one scan
//! and a parse or two, not a parse per read.

use bytes::{Buf, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What hyper reads in place of a refused head: not a request line, so hyper answers 400.
pub const REFUSAL: &[u8] = b"\x00 refused\r\n\r\n";

/// Headers parsed per head at most (hyper's own limit is 100; more is left to hyper).
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (with extensions) held for checking before handing on.
const MAX_CHUNK_LINE: usize = 16 * 1024;
/// Read size from the client.
const READ_SIZE: usize = 16 * 1024;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A line ends in LF without CR.
    BareLf,
    /// Both `content-length` and `transfer-encoding`.
    LengthAndChunked,
    /// More than one `content-length` field.
    TwoLengths,
}

impl Refusal {
    pub fn text(self) -> &'static str {
        match self {
            Refusal::BareLf => "a line ends in a bare LF",
            Refusal::LengthAndChunked => "both content-length and transfer-encoding",
            Refusal::TwoLengths => "more than one content-length field",
        }
    }
}

/// Where the reader is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a request head.
    Head,
    /// Inside a body of known length: this many bytes remain.
    Body(u64),
    /// At a chunk-size line.
    ChunkSize,
    /// Inside a chunk: this many bytes remain.
    ChunkData(u64),
    /// At the CRLF that ends a chunk.
    ChunkEnd,
    /// At the trailer section of a chunked body.
    Trailers,
    /// Hyper refuses what comes now: hand everything on unchecked.
    Unchecked,
    /// A head was refused: nothing more is handed on after [`REFUSAL`].
    Refused,
}

/// Where the scan of the piece being held (a head, a trailer section, a chunk-size line)
/// stands: the bytes looked at so far, and whether the piece can be judged yet.
#[derive(Debug, Clone, Copy, Default)]
struct Scan {
    /// Bytes of the piece scanned.
    pos: usize,
    /// Where the line being scanned starts.
    line_start: usize,
    /// A line with something in it has ended (leading empty lines before a request line are
    /// skipped by the parser).
    content: bool,
    /// The piece can be judged: its end (or a bare LF) has arrived.
    ready: bool,
}

impl Scan {
    /// Scans the new bytes of `piece`; true once it can be judged. `line`: the piece is one
    /// line (a chunk size), judged at its first LF; else a section ending in an empty line.
    fn ready(&mut self, piece: &[u8], line: bool) -> bool {
        while !self.ready && self.pos < piece.len() {
            let i = self.pos;
            self.pos += 1;
            if piece[i] != b'\n' {
                continue;
            }
            let bare = i == 0 || piece[i - 1] != b'\r';
            let empty = i == self.line_start || (i == self.line_start + 1 && !bare);
            self.ready = bare || line || (empty && self.content);
            self.content |= !empty;
            self.line_start = i + 1;
        }
        self.ready
    }
}

/// The client stream, checked (see the module documentation).
pub struct Strict<IO> {
    inner: IO,
    state: State,
    /// The scan of the piece at `held[cleared..]`.
    scan: Scan,
    /// Bytes handed to the parser so far (its work, which the tests bound).
    parsed: std::cell::Cell<u64>,
    /// Bytes read from the client, not yet handed to hyper.
    held: BytesMut,
    /// How many bytes at the front of `held` are checked and may be handed on.
    cleared: usize,
    /// Longest head held for checking; longer ones go to hyper, which answers 431.
    max_head: usize,
    /// The refusal line still to hand on (its unsent tail).
    refusal: &'static [u8],
    /// Told what was refused, when it is (it logs and counts).
    on_refusal: Box<dyn Fn(Refusal) + Send>,
    eof: bool,
}

impl<IO> Strict<IO> {
    /// `inner`, checked; `on_refusal` is called once if a head is refused.
    pub fn new(inner: IO, max_head: usize, on_refusal: Box<dyn Fn(Refusal) + Send>) -> Self {
        Self {
            inner,
            state: State::Head,
            scan: Scan::default(),
            parsed: std::cell::Cell::new(0),
            held: BytesMut::new(),
            cleared: 0,
            max_head,
            refusal: &[],
            on_refusal,
            eof: false,
        }
    }

    /// Bytes handed to `httparse` so far.
    pub fn parsed_bytes(&self) -> u64 {
        self.parsed.get()
    }

    /// Counts `bytes` as handed to the parser.
    fn parsing(&self, bytes: &[u8]) {
        self.parsed.set(self.parsed.get() + bytes.len() as u64);
    }

    /// The piece at hand is judged: the next one starts unscanned.
    fn next_piece(&mut self, state: State) {
        self.state = state;
        self.scan = Scan::default();
    }

    fn refuse(&mut self, why: Refusal) {
        self.state = State::Refused;
        (self.on_refusal)(why);
        self.refusal = REFUSAL;
    }

    /// Checks as much of `held` as can be checked now, moving `cleared` on.
    fn advance(&mut self) {
        loop {
            let rest = &self.held[self.cleared..];
            if rest.is_empty() && !matches!(self.state, State::Refused) {
                return;
            }
            match self.state {
                State::Refused => return,
                State::Unchecked => {
                    self.cleared = self.held.len();
                    return;
                }
                State::Body(n) | State::ChunkData(n) => {
                    let take = (rest.len() as u64).min(n);
                    self.cleared += take as usize;
                    let left = n - take;
                    self.state = match (self.state, left) {
                        (State::Body(_), 0) => State::Head,
                        (State::Body(_), _) => State::Body(left),
                        (_, 0) => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                }
                State::ChunkEnd => match rest {
                    [b'\r', b'\n', ..] => {
                        self.cleared += 2;
                        self.next_piece(State::ChunkSize);
                    }
                    [b'\n', ..] => return self.refuse(Refusal::BareLf),
                    [b'\r'] => return,
                    _ => self.state = State::Unchecked,
                },
                State::ChunkSize => {
                    if !self.scan.ready(rest, true) && rest.len() <= MAX_CHUNK_LINE {
                        return;
                    }
                    let parse = |b: &[u8]| {
                        self.parsing(b);
                        parsed(httparse::parse_chunk_size(b), |(used, _)| used)
                    };
                    match check(rest, parse, MAX_CHUNK_LINE) {
                        Check::Refuse => return self.refuse(Refusal::BareLf),
                        Check::Wait => {
                            // Not judged after all: wait for the next line end.
                            self.scan.ready = false;
                            return;
                        }
                        Check::Unchecked => self.state = State::Unchecked,
                        Check::Good(used) => {
                            let size = match httparse::parse_chunk_size(&rest[..used]) {
                                Ok(httparse::Status::Complete((_, size))) => size,
                                _ => 0,
                            };
                            self.cleared += used;
                            self.next_piece(if size == 0 {
                                State::Trailers
                            } else {
                                State::ChunkData(size)
                            });
                        }
                    }
                }
                State::Trailers => {
                    if rest.starts_with(b"\r\n") {
                        self.cleared += 2;
                        self.next_piece(State::Head);
                        continue;
                    }
                    if rest.starts_with(b"\n") {
                        return self.refuse(Refusal::BareLf);
                    }
                    if !self.scan.ready(rest, false) && rest.len() <= self.max_head {
                        return;
                    }
                    let parse = |b: &[u8]| {
                        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                        self.parsing(b);
                        parsed(httparse::parse_headers(b, &mut headers), |(used, _)| used)
                    };
                    match check(rest, parse, self.max_head) {
                        Check::Refuse => return self.refuse(Refusal::BareLf),
                        Check::Wait => {
                            // Not judged after all: wait for the next line end.
                            self.scan.ready = false;
                            return;
                        }
                        Check::Unchecked => self.state = State::Unchecked,
                        Check::Good(used) => {
                            self.cleared += used;
                            self.next_piece(State::Head);
                        }
                    }
                }
                State::Head => {
                    if !self.scan.ready(rest, false) && rest.len() <= self.max_head {
                        return;
                    }
                    let parse = |b: &[u8]| {
                        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                        self.parsing(b);
                        parsed(httparse::Request::new(&mut headers).parse(b), |used| used)
                    };
                    match check(rest, parse, self.max_head) {
                        Check::Refuse => return self.refuse(Refusal::BareLf),
                        Check::Wait => {
                            // Not judged after all: wait for the next line end.
                            self.scan.ready = false;
                            return;
                        }
                        Check::Unchecked => self.state = State::Unchecked,
                        Check::Good(used) => {
                            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                            let mut req = httparse::Request::new(&mut headers);
                            let (framing, upgrade) = match req.parse(&rest[..used]) {
                                Ok(httparse::Status::Complete(_)) => {
                                    (framing(req.headers), websocket_upgrade(req.headers))
                                }
                                _ => (Ok(Framing::Invalid), false),
                            };
                            let framing = match framing {
                                Ok(f) => f,
                                Err(why) => return self.refuse(why),
                            };
                            self.cleared += used;
                            self.next_piece(match framing {
                                // A WebSocket upgrade without a body: after the 101 the bytes
                                // are frames, not HTTP (a refused upgrade closes the
                                // connection, see `tcp::request`).
                                Framing::Length(0) if upgrade => State::Unchecked,
                                Framing::Chunked => State::ChunkSize,
                                Framing::Length(0) => State::Head,
                                Framing::Length(n) => State::Body(n),
                                // hyper refuses it.
                                Framing::Invalid => State::Unchecked,
                            });
                        }
                    }
                }
            }
        }
    }
}

/// Whether a head asks for a WebSocket (`upgrade: websocket`).
fn websocket_upgrade(headers: &[httparse::Header<'_>]) -> bool {
    headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("upgrade")
            && h.value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"))
    })
}

/// How a request's body is delimited.
enum Framing {
    Length(u64),
    Chunked,
    /// Something hyper refuses (an unparseable length, a coding other than chunked last).
    Invalid,
}

fn framing(headers: &[httparse::Header<'_>]) -> Result<Framing, Refusal> {
    let mut length = None;
    let mut lengths = 0;
    let mut chunked = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding of the last field decides (RFC 9112 §6.1).
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    if lengths > 1 {
        return Err(Refusal::TwoLengths);
    }
    match (chunked, lengths) {
        (Some(_), 1) => Err(Refusal::LengthAndChunked),
        (Some(true), _) => Ok(Framing::Chunked),
        (Some(false), _) => Ok(Framing::Invalid),
        (None, 0) => Ok(Framing::Length(0)),
        (None, _) => Ok(length.map_or(Framing::Invalid, Framing::Length)),
    }
}

/// What `httparse` says of the bytes at hand.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Parsed {
    /// A whole head (or line, or trailer section) of this many bytes.
    Complete(usize),
    Partial,
    Invalid,
}

/// `httparse`'s verdict as [`Parsed`]; `used` takes the length out of a complete one.
fn parsed<T, E>(r: Result<httparse::Status<T>, E>, used: impl FnOnce(T) -> usize) -> Parsed {
    match r {
        Ok(httparse::Status::Complete(t)) => Parsed::Complete(used(t)),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Invalid,
    }
}

/// What to do with the bytes at hand.
enum Check {
    Refuse,
    Wait,
    /// Let them through: hyper refuses them itself.
    Unchecked,
    /// A well-formed piece of this many bytes.
    Good(usize),
}

/// The one decision for a head, a chunk-size line or a trailer section, made so that it does
/// not depend on how the bytes arrived: a bare LF is refused if it comes within `max` bytes
/// and before (or at) the first byte the parser refuses; a piece longer than `max`, or one the
/// parser refuses first, is left to hyper.
fn check(rest: &[u8], parse: impl Fn(&[u8]) -> Parsed, max: usize) -> Check {
    let bare_lf_within = |end: usize| has_bare_lf(&rest[..end.min(max).min(rest.len())]);
    match parse(rest) {
        Parsed::Complete(used) if used <= max => {
            if has_bare_lf(&rest[..used]) {
                Check::Refuse
            } else {
                Check::Good(used)
            }
        }
        Parsed::Complete(_) | Parsed::Partial => {
            if bare_lf_within(rest.len()) {
                Check::Refuse
            } else if rest.len() > max {
                Check::Unchecked
            } else {
                Check::Wait
            }
        }
        Parsed::Invalid => {
            // The shortest prefix the parser refuses: what a client sending byte by byte
            // would have been judged on.
            let (mut partial, mut invalid) = (0, rest.len());
            while invalid - partial > 1 {
                let mid = partial + (invalid - partial) / 2;
                if parse(&rest[..mid]) == Parsed::Invalid {
                    invalid = mid;
                } else {
                    partial = mid;
                }
            }
            if bare_lf_within(invalid) {
                Check::Refuse
            } else {
                Check::Unchecked
            }
        }
    }
}

/// Whether an LF in `bytes` is not preceded by CR.
fn has_bare_lf(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
}

impl<IO: AsyncRead + Unpin> AsyncRead for Strict<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.cleared > 0 {
                let n = this.cleared.min(buf.remaining());
                buf.put_slice(&this.held[..n]);
                this.held.advance(n);
                this.cleared -= n;
                return Poll::Ready(Ok(()));
            }
            if this.state == State::Refused {
                let n = this.refusal.len().min(buf.remaining());
                buf.put_slice(&this.refusal[..n]);
                this.refusal = &this.refusal[n..];
                // After the refusal line: end of file.
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // What is held is an incomplete head or line: hyper sees it, then the end.
                let n = this.held.len().min(buf.remaining());
                buf.put_slice(&this.held[..n]);
                this.held.advance(n);
                return Poll::Ready(Ok(()));
            }
            // Body bytes with nothing held go straight to hyper's buffer.
            if let (State::Body(left) | State::ChunkData(left), true) =
                (this.state, this.held.is_empty())
            {
                let want = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(buf.remaining());
                let mut direct = ReadBuf::new(buf.initialize_unfilled_to(want));
                std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut direct))?;
                let n = direct.filled().len();
                buf.advance(n);
                if n > 0 {
                    this.state = match (this.state, left - n as u64) {
                        (State::Body(_), 0) => State::Head,
                        (State::Body(_), l) => State::Body(l),
                        (_, 0) => State::ChunkEnd,
                        (_, l) => State::ChunkData(l),
                    };
                }
                return Poll::Ready(Ok(()));
            }
            this.held.reserve(READ_SIZE);
            let before = this.held.len();
            this.held.resize(before + READ_SIZE, 0);
            let mut rb = ReadBuf::new(&mut this.held[before..]);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            this.held.truncate(before + n);
            std::task::ready!(polled)?;
            if n == 0 {
                this.eof = true;
            } else {
                this.advance();
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Strict<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
