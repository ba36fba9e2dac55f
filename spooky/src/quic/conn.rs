//! One client QUIC connection on its worker: HTTP/3 events in (request heads, bodies,
//! trailers, resets), what the request tasks produced out into quiche, resuming partial writes
//! where quiche left off. What a request head means is the forwarder's decision
//! ([`Forwarder::admit`]); answers Spooky gives itself never reach a backend.

use super::heads::PendingHeads;
use super::stall::{AddressBook, STALL_GRACE};
use crate::config::EarlyData;
use crate::http::bridge::{self, RequestHead, H3_NO_ERROR};
use crate::http::exchange::{self, BodyError, LoopEnd, Pending};
use crate::http::outcome::{Failure, StreamError};
use crate::http::{Admission, Client, ConnWaker, Forwarder, HandshakeGate, Protocol};
use bytes::Bytes;
use quiche::h3;
use quiche::ConnectionId;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

/// Bounds of the wait between a draining connection's GOAWAY and its close.
const DRAIN_GRACE_MIN: Duration = Duration::from_millis(100);
const DRAIN_GRACE_MAX: Duration = Duration::from_secs(2);
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tokio::sync::watch;

/// quiche buffers stream data as `Bytes`: response bodies go from the backend's HTTP/2 frames
/// into QUIC packets without being copied into quiche first (`send_body_zc`).
#[derive(Clone, Debug, Default)]
pub struct BytesFactory;

impl quiche::BufFactory for BytesFactory {
    type Buf = Bytes;
    type DgramBuf = Vec<u8>;

    fn buf_from_slice(buf: &[u8]) -> Bytes {
        Bytes::copy_from_slice(buf)
    }

    fn dgram_buf_from_slice(buf: &[u8]) -> Vec<u8> {
        buf.to_vec()
    }
}

/// A client connection on a worker.
pub type QuicConn = quiche::Connection<BytesFactory>;

pub struct Conn {
    pub quic: QuicConn,
    h3: Option<h3::Connection>,
    pub peer: SocketAddr,
    /// The client address the connection was accepted from (per-address limits).
    pub ip: std::net::IpAddr,
    /// A connection still not established by then is closed (`quic.handshake_timeout`).
    pub handshake_deadline: Instant,
    pub gen: u64,
    pub aliases: Vec<ConnectionId<'static>>,
    pub deadline: Option<Instant>,
    pub touched: bool,
    streams: OpenStreams,
    /// When GOAWAY went out (draining): the connection closes no sooner than
    /// [`Conn::drain_deadline`], so that the client hears it before the close.
    goaway_sent: Option<Instant>,
    /// The lowest request stream id not seen yet (the GOAWAY id: 0 before any request).
    next_request_id: u64,
    /// Streams whose response is fully written but maybe not yet acknowledged: a draining
    /// connection closes only once quiche has collected them.
    lingering: Vec<u64>,
    /// The SNI of the ClientHello, once asked for (requests share it).
    sni: std::cell::OnceCell<Option<std::rc::Rc<str>>>,
    /// Request streams whose head has not arrived yet (`quic.request_header_timeout`).
    heads: PendingHeads,
    /// Response streams with data waiting that quiche cannot take (the client's flow control
    /// is closed): since when nothing was taken (`quic.send_timeout`).
    stalled: HashMap<u64, Instant>,
    /// The stalled streams this connection holds (see `stall`), counted in `stalls`.
    held: HashSet<u64>,
    /// Held streams per client address, shared by the worker's connections.
    stalls: Rc<AddressBook>,
    /// When a response stream last took a byte (or the connection was opened).
    last_taken: Instant,
    /// Opened when the handshake completes (requests held back from 0-RTT wait on it).
    handshake: watch::Sender<bool>,
    /// What the connection's exchanges wake when their request tasks move.
    waker: Rc<ConnWaker>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for _ in self.held.drain() {
            self.stalls.release(self.ip);
        }
    }
}

impl Conn {
    /// A request's client on this connection, as the forwarder sees it.
    fn client(&self) -> Client {
        Client {
            peer: self.peer,
            protocol: Protocol::H3,
            tls_version: "TLSv1.3",
            sni: self
                .sni
                .get_or_init(|| self.quic.server_name().map(std::rc::Rc::from))
                .clone(),
        }
    }

    pub fn new(
        quic: QuicConn,
        peer: SocketAddr,
        gen: u64,
        aliases: Vec<ConnectionId<'static>>,
        handshake_deadline: Instant,
        stalls: Rc<AddressBook>,
        waker: Rc<ConnWaker>,
    ) -> Self {
        Self {
            quic,
            h3: None,
            ip: peer.ip(),
            sni: Default::default(),
            handshake_deadline,
            peer,
            gen,
            aliases,
            deadline: None,
            touched: false,
            streams: OpenStreams {
                map: HashMap::new(),
                book: stalls.clone(),
                ip: peer.ip(),
            },
            goaway_sent: None,
            next_request_id: 0,
            lingering: Vec::new(),
            heads: PendingHeads::default(),
            stalled: HashMap::new(),
            held: HashSet::new(),
            stalls,
            last_taken: Instant::now(),
            handshake: watch::channel(false).0,
            waker,
        }
    }

    /// Tells every request task of this connection that the client is gone.
    pub fn abort_streams(&mut self) {
        for s in self.streams.map.values() {
            s.abort();
        }
        self.streams.clear();
    }

    /// Processes HTTP/3 events and moves what the request tasks produced into quiche.
    pub fn service(&mut self, fwd: &Rc<Forwarder>, h3config: &h3::Config, draining: bool) {
        if self.h3.is_none() && (self.quic.is_established() || self.quic.is_in_early_data()) {
            match h3::Connection::with_transport(&mut self.quic, h3config) {
                Ok(h) => self.h3 = Some(h),
                Err(e) => {
                    tracing::debug!(error = %e, "h3 setup failed");
                    let _ = self.quic.close(true, 0x101, b"h3 setup");
                    return;
                }
            }
        }
        if self.quic.is_established() && !*self.handshake.borrow() {
            self.handshake.send_replace(true);
            if self.quic.is_resumed() {
                fwd.services.stats.resumed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let Some(mut h3c) = self.h3.take() else {
            return;
        };
        let quic = &mut self.quic;
        self.lingering
            .retain(|sid| quic.stream_capacity(*sid).is_ok());
        // Before HTTP/3 consumes them: streams with data are open, head or not.
        let now = Instant::now();
        for sid in self.quic.readable() {
            self.heads.opened(sid, now);
        }
        self.expire_heads(fwd, now);
        self.expire_stalled(fwd, now);
        self.police_stalled(fwd, now);
        // Two rounds: reading a blocked body may surface `Finished`, flushing may unblock reads.
        for _ in 0..2 {
            self.poll_events(&mut h3c, fwd);
            self.resume_reads(&mut h3c);
            self.flush_streams(&mut h3c);
        }
        if draining {
            if self.goaway_sent.is_none() {
                let _ = h3c.send_goaway(&mut self.quic, self.next_request_id);
                self.goaway_sent = Some(now);
            }
            let quiet = self.streams.map.is_empty() && self.lingering.is_empty();
            if quiet && self.drain_deadline().is_some_and(|d| now >= d) {
                let _ = self.quic.close(true, H3_NO_ERROR, b"");
            }
        }
        self.h3 = Some(h3c);
    }

    /// Draining: the earliest the connection may close, a little over two round trips after
    /// its GOAWAY (the GOAWAY reaches the client, and a request the client sent before
    /// hearing it reaches us: RFC 9114 §5.2 lets the client retry it only if it knows). A
    /// close sent together with the GOAWAY would drop the GOAWAY (quiche sends nothing but
    /// CONNECTION_CLOSE once closing), and the client could not tell which request to retry.
    pub fn drain_deadline(&self) -> Option<Instant> {
        let rtt = self
            .quic
            .path_stats()
            .next()
            .map_or(Duration::ZERO, |p| p.rtt);
        let grace = (rtt * 3).clamp(DRAIN_GRACE_MIN, DRAIN_GRACE_MAX);
        self.goaway_sent.map(|at| at + grace)
    }

    /// When a stalled response stream next needs a look: it runs out of `timeout`, or (not
    /// held yet) it and its connection have taken nothing for [`STALL_GRACE`]. With a memory
    /// limit (`recheck`), held streams are looked at every [`STALL_GRACE`] too: they are the
    /// first to go when the process is over it.
    pub fn send_deadline(&self, timeout: Duration, recheck: bool) -> Option<Instant> {
        let next_check = Instant::now() + STALL_GRACE;
        self.stalled
            .iter()
            .map(|(sid, since)| {
                let expires = *since + timeout;
                if !self.held.contains(sid) {
                    expires.min((*since).max(self.last_taken) + STALL_GRACE)
                } else if recheck {
                    expires.min(next_check)
                } else {
                    expires
                }
            })
            .min()
    }

    /// The stream stopped being stalled (it took data, ended or was reset).
    fn unstall(&mut self, sid: u64) {
        self.stalled.remove(&sid);
        if self.held.remove(&sid) {
            self.stalls.release(self.ip);
        }
    }

    /// Streams stalled for [`STALL_GRACE`] on a connection that took nothing for as long
    /// become held, within `quic.max_stalled_streams` and this worker's share of
    /// `quic.max_stalled_streams_per_ip`; past either they are reset with their backend
    /// streams (`H3_EXCESSIVE_LOAD`). Above `proxy.memory_limit` every stream stalled for the
    /// grace is reset.
    fn police_stalled(&mut self, fwd: &Forwarder, now: Instant) {
        let config = &fwd.snapshot.config;
        let over_memory = crate::telemetry::memory::over(config.proxy.memory_limit);
        let starved = now.saturating_duration_since(self.last_taken) >= STALL_GRACE;
        if !starved && !over_memory {
            return;
        }
        let mut due: Vec<(Instant, u64)> = self
            .stalled
            .iter()
            .filter(|(sid, since)| {
                now.saturating_duration_since(**since) >= STALL_GRACE
                    && (over_memory || !self.held.contains(sid))
            })
            .map(|(sid, since)| (*since, *sid))
            .collect();
        // The longest-stalled are held first.
        due.sort_unstable();
        let per_ip = self.stalls.share(config.quic.max_stalled_streams_per_ip);
        for (_, sid) in due {
            let stats = &fwd.services.stats;
            if over_memory {
                stats.memory_shed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %self.peer, stream = sid, "stalled stream shed: over proxy.memory_limit");
            } else if self.held.len() >= config.quic.max_stalled_streams as usize
                || self.stalls.held(self.ip) >= per_ip
            {
                stats.stalled_shed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %self.peer, stream = sid, "stalled stream shed: too many held");
            } else {
                self.held.insert(sid);
                self.stalls.hold(self.ip);
                continue;
            }
            self.fail_stream(sid, StreamError::Shed);
        }
    }

    /// Resets the response streams the client has let take nothing for `timeout`, and the
    /// backend streams behind them.
    fn expire_stalled(&mut self, fwd: &Forwarder, now: Instant) {
        let timeout = fwd.snapshot.config.quic.send_timeout;
        let expired: Vec<u64> = self
            .stalled
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= timeout)
            .map(|(sid, _)| *sid)
            .collect();
        for sid in expired {
            self.unstall(sid);
            tracing::debug!(peer = %self.peer, stream = sid, ?timeout, "response stalled: reset");
            fwd.services
                .stats
                .send_timeouts
                .fetch_add(1, Ordering::Relaxed);
            self.fail_stream(sid, StreamError::SendTimeout);
        }
    }

    /// When the oldest stream still waiting for its request head runs out of time.
    pub fn head_deadline(&self, timeout: std::time::Duration) -> Option<Instant> {
        self.heads.next_deadline(timeout)
    }

    /// Resets the request streams whose head is overdue; the rest of the connection carries
    /// on.
    fn expire_heads(&mut self, fwd: &Forwarder, now: Instant) {
        let timeout = fwd.snapshot.config.quic.request_header_timeout;
        for sid in self.heads.expire(now, timeout) {
            if self.streams.map.contains_key(&sid) || self.quic.stream_capacity(sid).is_err() {
                continue; // answered, or already gone
            }
            tracing::debug!(peer = %self.peer, stream = sid, ?timeout, "request head timed out");
            fwd.services
                .stats
                .request_head_timeouts
                .fetch_add(1, Ordering::Relaxed);
            self.reset(sid, StreamError::HeadTimeout.code());
        }
    }

    fn poll_events(&mut self, h3c: &mut h3::Connection, fwd: &Rc<Forwarder>) {
        loop {
            match h3c.poll(&mut self.quic) {
                Ok((sid, h3::Event::Headers { list, more_frames })) => {
                    if let Some(s) = self.streams.map.get(&sid) {
                        // A second field section on a request stream: trailers.
                        let ended = match bridge::trailers_to_h2(&list) {
                            Ok(t) if !more_frames => s.end_request(Some(t)).is_ok(),
                            _ => false,
                        };
                        if !ended {
                            self.fail_stream(sid, StreamError::BadTrailers);
                        }
                    } else {
                        self.heads.opened(sid, Instant::now());
                        self.heads.arrived(sid);
                        self.on_request(h3c, fwd, sid, &list, more_frames);
                    }
                }
                Ok((sid, h3::Event::Data)) => self.read_body(h3c, sid),
                Ok((sid, h3::Event::Finished)) => {
                    let mismatch = self
                        .streams
                        .map
                        .get(&sid)
                        .is_some_and(|s| s.end_request(None) == Err(BodyError::LengthMismatch));
                    if mismatch {
                        self.fail_stream(sid, StreamError::LengthMismatch);
                    }
                }
                Ok((sid, h3::Event::Reset(_))) => {
                    self.heads.arrived(sid);
                    if let Some(s) = self.streams.remove(&sid) {
                        s.abort();
                    }
                }
                Ok((_, h3::Event::PriorityUpdate | h3::Event::GoAway)) => {}
                Err(h3::Error::Done) => break,
                Err(e) => {
                    tracing::debug!(peer = %self.peer, error = %e, "HTTP/3 connection error");
                    // H3_GENERAL_PROTOCOL_ERROR: quiche has already answered specific errors itself.
                    let _ = self.quic.close(true, 0x101, b"");
                    break;
                }
            }
        }
    }

    /// A request that arrived in 0-RTT can be a replay (RFC 8470, RFC 9001 §4.6.1): a
    /// safe method goes on at once, marked `early-data: 1` so the backend may answer 425
    /// itself; another waits for the handshake (the returned gate) or is refused with 425,
    /// as `quic.early_data` says.
    fn early_data(
        &self,
        head: &mut RequestHead,
        fwd: &Forwarder,
    ) -> Result<Option<HandshakeGate>, Failure> {
        if !self.quic.is_in_early_data() {
            return Ok(None);
        }
        let stats = &fwd.services.stats;
        if head.method.is_safe() {
            // A client that is itself an intermediary may have marked it already.
            if head.field("early-data").is_none() {
                head.fields
                    .push((Bytes::from_static(b"early-data"), Bytes::from_static(b"1")));
            }
            stats.early_forwarded.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        match fwd.snapshot.config.quic.early_data {
            EarlyData::Reject => {
                stats.early_rejected.fetch_add(1, Ordering::Relaxed);
                Err(Failure::TooEarly)
            }
            EarlyData::Defer | EarlyData::Off => {
                stats.early_deferred.fetch_add(1, Ordering::Relaxed);
                Ok(Some(self.handshake.subscribe()))
            }
        }
    }

    fn on_request(
        &mut self,
        h3c: &mut h3::Connection,
        fwd: &Rc<Forwarder>,
        sid: u64,
        list: &[h3::Header],
        more_frames: bool,
    ) {
        self.next_request_id = self.next_request_id.max(sid + 4);
        let started = Instant::now();
        fwd.services.stats.requests.fetch_add(1, Ordering::Relaxed);
        let stats = &fwd.services.stats;
        let per_ip = self
            .stalls
            .share(fwd.snapshot.config.quic.max_streams_per_ip);
        let admission = match fwd.admit(list, more_frames, self.quic.server_name(), self.peer.ip())
        {
            Admission::Forward { head, .. } if self.stalls.open_streams(self.ip) >= per_ip => {
                stats.streams_refused_per_ip.fetch_add(1, Ordering::Relaxed);
                Admission::Refuse(Failure::TooManyStreams, Some(head))
            }
            Admission::Forward {
                mut head,
                upstream,
                shape,
            } => match self.early_data(&mut head, fwd) {
                Ok(gate) => {
                    let waker = Some(self.waker.clone());
                    let (loop_end, task) = exchange::new(shape, stats.clone(), waker);
                    self.streams.insert(sid, loop_end);
                    let client = self.client();
                    fwd.spawn(task, head, upstream, client, started, gate);
                    return;
                }
                Err(failure) => Admission::Refuse(failure, Some(head)),
            },
            other => other,
        };
        let Some(answer) = fwd.answer_locally(admission, &self.client(), started) else {
            return;
        };
        // Answered here; the request body, if any, is not read.
        self.streams.insert(
            sid,
            exchange::local(answer.fields, answer.body, more_frames, stats.clone()),
        );
        self.flush_stream(h3c, sid);
        if let Some(code) = answer.stop_sending {
            let _ = self.quic.stream_shutdown(sid, quiche::Shutdown::Read, code);
        }
    }

    fn read_body(&mut self, h3c: &mut h3::Connection, sid: u64) {
        let Some(s) = self.streams.map.get(&sid) else {
            // Nobody wants this body (the stream was answered or is gone): discard it.
            let mut sink = [0u8; 4096];
            while let Ok(n) = h3c.recv_body(&mut self.quic, sid, &mut sink) {
                if n == 0 {
                    break;
                }
            }
            return;
        };
        let mut buf = [0u8; 16 * 1024];
        let failed = loop {
            if !s.room_for_request() {
                return;
            }
            match h3c.recv_body(&mut self.quic, sid, &mut buf) {
                Ok(n) if n > 0 => match s.push_request(Bytes::copy_from_slice(&buf[..n])) {
                    Ok(()) => {}
                    // 413 from the request task; stop the client's upload.
                    Err(BodyError::TooLarge) => break StreamError::StopUpload,
                    Err(BodyError::LengthMismatch | BodyError::Ended) => {
                        break StreamError::LengthMismatch
                    }
                },
                _ => return,
            }
        };
        if failed == StreamError::StopUpload {
            let _ = self
                .quic
                .stream_shutdown(sid, quiche::Shutdown::Read, failed.code());
        } else {
            self.fail_stream(sid, failed);
        }
    }

    fn resume_reads(&mut self, h3c: &mut h3::Connection) {
        let blocked: Vec<u64> = self
            .streams
            .map
            .iter()
            .filter(|(_, s)| s.wants_reading())
            .map(|(sid, _)| *sid)
            .collect();
        for sid in blocked {
            self.read_body(h3c, sid);
        }
    }

    fn flush_streams(&mut self, h3c: &mut h3::Connection) {
        let sids: Vec<u64> = self.streams.map.keys().copied().collect();
        for sid in sids {
            self.flush_stream(h3c, sid);
        }
    }

    /// Tells the request task the client is gone and resets the stream with `error`'s code.
    fn fail_stream(&mut self, sid: u64, error: StreamError) {
        if let Some(s) = self.streams.map.get(&sid) {
            s.abort();
        }
        self.reset(sid, error.code());
    }

    fn reset(&mut self, sid: u64, code: u64) {
        self.unstall(sid);
        let _ = self
            .quic
            .stream_shutdown(sid, quiche::Shutdown::Write, code);
        let _ = self.quic.stream_shutdown(sid, quiche::Shutdown::Read, code);
        self.streams.remove(&sid);
    }

    /// Moves what the request task produced into quiche, resuming partial writes.
    fn flush_stream(&mut self, h3c: &mut h3::Connection, sid: u64) {
        let Some(s) = self.streams.map.get(&sid).cloned() else {
            return;
        };
        if s.client_gone() {
            self.streams.remove(&sid);
            self.unstall(sid);
            return;
        }
        let mut progress = false;
        let written = loop {
            let step = match s.pending() {
                Pending::Nothing => break Ok(()),
                Pending::Reset(code) => {
                    s.abort();
                    self.reset(sid, code);
                    return;
                }
                Pending::Head { fin } => {
                    let sent = match s.head_fields() {
                        Some(fields) => h3c.send_response(&mut self.quic, sid, &fields, fin),
                        None => break Ok(()),
                    };
                    match sent {
                        Ok(()) => {
                            progress = true;
                            s.head_written(fin)
                        }
                        Err(e) => break Err(e),
                    }
                }
                Pending::Body { mut chunk, fin } => {
                    let len = chunk.len();
                    // Zero-copy: quiche keeps a reference to the chunk until the client
                    // acknowledges it.
                    match h3c.send_body_zc(&mut self.quic, sid, &mut chunk, fin) {
                        Ok(n) => {
                            progress |= n > 0;
                            let step = s.body_written(n, fin);
                            if n < len {
                                break step.map_err(|_| h3::Error::InternalError);
                            }
                            step
                        }
                        Err(e) => break Err(e),
                    }
                }
                Pending::Trailers => {
                    let sent = match s.trailer_fields() {
                        Some(t) => h3c.send_additional_headers(&mut self.quic, sid, &t, true, true),
                        None => break Ok(()),
                    };
                    match sent {
                        Ok(()) => s.end_written(),
                        Err(e) => break Err(e),
                    }
                }
                Pending::Fin => match h3c.send_body(&mut self.quic, sid, b"", true) {
                    Ok(_) => s.end_written(),
                    Err(e) => break Err(e),
                },
            };
            if let Err(e) = step {
                tracing::debug!(stream = sid, error = %e, "stream state refused a write");
                break Err(h3::Error::InternalError);
            }
        };
        let now = Instant::now();
        if progress {
            self.last_taken = now;
        }
        // Read from the backend no further ahead of the client than it lets us.
        if let Ok(capacity) = self.quic.stream_capacity(sid) {
            s.set_client_room(capacity);
        }
        match written {
            Ok(()) => self.unstall(sid),
            Err(h3::Error::StreamBlocked | h3::Error::Done) => {
                // Something waits that quiche would not take: the clock runs from the last
                // byte taken.
                if progress {
                    self.unstall(sid);
                }
                self.stalled.entry(sid).or_insert(now);
            }
            Err(e) => {
                tracing::debug!(stream = sid, error = %e, "writing the response failed");
                self.fail_stream(sid, StreamError::WriteFailed);
                return;
            }
        }
        if s.complete() {
            if s.request_unfinished() {
                // RFC 9114 §4.1: a complete response may end the request early.
                let _ = self
                    .quic
                    .stream_shutdown(sid, quiche::Shutdown::Read, H3_NO_ERROR);
            }
            self.streams.remove(&sid);
            self.lingering.push(sid);
        }
    }
}

/// The request streams of a connection that are being answered, each counted for the client
/// address in the worker's [`AddressBook`] while it is here (`quic.max_streams_per_ip`).
struct OpenStreams {
    map: HashMap<u64, LoopEnd>,
    book: Rc<AddressBook>,
    ip: std::net::IpAddr,
}

impl OpenStreams {
    fn insert(&mut self, sid: u64, end: LoopEnd) {
        if self.map.insert(sid, end).is_none() {
            self.book.stream_opened(self.ip);
        }
    }

    fn remove(&mut self, sid: &u64) -> Option<LoopEnd> {
        let end = self.map.remove(sid);
        if end.is_some() {
            self.book.stream_closed(self.ip);
        }
        end
    }

    fn clear(&mut self) {
        for _ in self.map.drain() {
            self.book.stream_closed(self.ip);
        }
    }
}

impl Drop for OpenStreams {
    fn drop(&mut self) {
        self.clear();
    }
}
