//! One client QUIC connection on its worker: HTTP/3 events in (request heads, bodies,
//! trailers, resets), buffered response data out, resuming partial writes where quiche left
//! off. New requests are validated ([`crate::http::bridge`]), routed, and handed to a proxy task
//! ([`crate::http::forward`]); local answers (400, 404, 501) never reach a backend.

use super::heads::PendingHeads;
use super::worker::WorkerCtx;
use crate::http::bridge::{
    self, H3_MESSAGE_ERROR, H3_NO_ERROR, H3_REQUEST_CANCELLED, H3_REQUEST_REJECTED,
};
use crate::http::exchange::{QuicConn, SharedStream, StreamIo, REQ_BUF_LIMIT};
use bytes::Bytes;
use quiche::h3::{self, NameValue};
use quiche::ConnectionId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

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
    streams: HashMap<u64, SharedStream>,
    goaway_sent: bool,
    max_request_id: u64,
    /// Streams whose response is fully written but maybe not yet acknowledged: a draining
    /// connection closes only once quiche has collected them.
    lingering: Vec<u64>,
    /// Request streams whose head has not arrived yet (`quic.request_header_timeout`).
    heads: PendingHeads,
}

impl Conn {
    pub fn new(
        quic: QuicConn,
        peer: SocketAddr,
        gen: u64,
        aliases: Vec<ConnectionId<'static>>,
        handshake_deadline: Instant,
    ) -> Self {
        Self {
            quic,
            h3: None,
            ip: peer.ip(),
            handshake_deadline,
            peer,
            gen,
            aliases,
            deadline: None,
            touched: false,
            streams: HashMap::new(),
            goaway_sent: false,
            max_request_id: 0,
            lingering: Vec::new(),
            heads: PendingHeads::default(),
        }
    }

    /// Tells every proxy task of this connection that the client is gone.
    pub fn abort_streams(&mut self) {
        for io in self.streams.values() {
            io.borrow_mut().abort_client();
        }
        self.streams.clear();
    }

    /// Processes HTTP/3 events and moves buffered response data into quiche.
    pub fn service(
        &mut self,
        ctx: &Rc<WorkerCtx>,
        h3config: &h3::Config,
        slot: usize,
        draining: bool,
    ) {
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
        self.expire_heads(ctx, now);
        // Two rounds: reading a blocked body may surface `Finished`, flushing may unblock reads.
        for _ in 0..2 {
            self.poll_events(&mut h3c, ctx, slot);
            self.resume_reads(&mut h3c);
            self.flush_streams(&mut h3c);
        }
        if draining {
            if !self.goaway_sent {
                let _ = h3c.send_goaway(&mut self.quic, self.max_request_id + 4);
                self.goaway_sent = true;
            }
            if self.streams.is_empty() && self.lingering.is_empty() {
                let _ = self.quic.close(true, H3_NO_ERROR, b"");
            }
        }
        self.h3 = Some(h3c);
    }

    /// When the oldest stream still waiting for its request head runs out of time.
    pub fn head_deadline(&self, timeout: std::time::Duration) -> Option<Instant> {
        self.heads.next_deadline(timeout)
    }

    /// Resets the request streams whose head is overdue; the rest of the connection carries
    /// on. `H3_REQUEST_REJECTED`: nothing of the request was processed, a client may retry.
    fn expire_heads(&mut self, ctx: &Rc<WorkerCtx>, now: Instant) {
        let timeout = ctx.shared.config.quic.request_header_timeout;
        for sid in self.heads.expire(now, timeout) {
            if self.streams.contains_key(&sid) || self.quic.stream_capacity(sid).is_err() {
                continue; // answered, or already gone
            }
            tracing::debug!(peer = %self.peer, stream = sid, ?timeout, "request head timed out");
            ctx.shared.stats[ctx.index]
                .request_head_timeouts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.reset(sid, H3_REQUEST_REJECTED);
        }
    }

    fn poll_events(&mut self, h3c: &mut h3::Connection, ctx: &Rc<WorkerCtx>, slot: usize) {
        loop {
            match h3c.poll(&mut self.quic) {
                Ok((sid, h3::Event::Headers { list, more_frames })) => {
                    if let Some(io) = self.streams.get(&sid) {
                        // A second field section on a request stream: trailers.
                        let mut io = io.borrow_mut();
                        match bridge::trailers_to_h2(&list) {
                            Ok(t) if !more_frames => {
                                io.req_trailers = Some(t);
                                io.req_fin = true;
                                io.wake_req();
                            }
                            _ => {
                                io.abort_client();
                                drop(io);
                                self.reset(sid, H3_MESSAGE_ERROR);
                            }
                        }
                    } else {
                        self.heads.opened(sid, Instant::now());
                        self.heads.arrived(sid);
                        self.on_request(h3c, ctx, slot, sid, &list, more_frames);
                    }
                }
                Ok((sid, h3::Event::Data)) => self.read_body(h3c, sid),
                Ok((sid, h3::Event::Finished)) => {
                    if let Some(io) = self.streams.get(&sid) {
                        let mut io = io.borrow_mut();
                        if io.req_expected.is_some_and(|n| n != io.req_received) {
                            io.abort_client();
                            drop(io);
                            self.reset(sid, H3_MESSAGE_ERROR);
                            continue;
                        }
                        io.req_fin = true;
                        io.wake_req();
                    }
                }
                Ok((sid, h3::Event::Reset(_))) => {
                    self.heads.arrived(sid);
                    if let Some(io) = self.streams.remove(&sid) {
                        io.borrow_mut().abort_client();
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

    fn on_request(
        &mut self,
        h3c: &mut h3::Connection,
        ctx: &Rc<WorkerCtx>,
        slot: usize,
        sid: u64,
        list: &[h3::Header],
        more_frames: bool,
    ) {
        self.max_request_id = self.max_request_id.max(sid);
        let started = Instant::now();
        ctx.shared.stats[ctx.index]
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // RFC 9114 §4.2.2: the size of a field section counts each field's name, value and 32.
        let list_size: u64 = list
            .iter()
            .map(|h| (h.name().len() + h.value().len() + 32) as u64)
            .sum();
        if list_size > ctx.shared.config.proxy.max_header_list_size {
            tracing::info!(peer = %self.peer, stream = sid, size = list_size, "request header list too large");
            self.answer_local(
                h3c,
                ctx,
                sid,
                431,
                "request header fields too large",
                more_frames,
            );
            ctx.record_local(self.peer, 431, None, started);
            return;
        }
        let head = match bridge::validate_request(list) {
            Ok(h) => h,
            Err(e) => {
                tracing::info!(peer = %self.peer, stream = sid, error = %e, "malformed request rejected");
                self.answer_local(
                    h3c,
                    ctx,
                    sid,
                    400,
                    &format!("malformed request: {e}"),
                    more_frames,
                );
                ctx.record_local(self.peer, 400, None, started);
                let _ = self
                    .quic
                    .stream_shutdown(sid, quiche::Shutdown::Read, H3_MESSAGE_ERROR);
                return;
            }
        };
        if head.path.as_ref() == b"*" {
            // OPTIONS * asks about the server itself: Spooky answers it.
            self.answer_local(h3c, ctx, sid, 200, "ok", more_frames);
            ctx.record_local(self.peer, 200, Some(&head), started);
            return;
        }
        if head.method == http::Method::CONNECT {
            self.answer_local(h3c, ctx, sid, 501, "CONNECT is not supported", more_frames);
            ctx.record_local(self.peer, 501, Some(&head), started);
            return;
        }
        if !more_frames && head.content_length.is_some_and(|n| n > 0) {
            tracing::info!(peer = %self.peer, stream = sid, "content-length without a body");
            self.answer_local(
                h3c,
                ctx,
                sid,
                400,
                "malformed request: content-length mismatch",
                false,
            );
            ctx.record_local(self.peer, 400, Some(&head), started);
            return;
        }
        let Some(upstream) = ctx
            .shared
            .routes
            .lookup(Some(head.authority_str()), head.path_str())
        else {
            tracing::debug!(peer = %self.peer, authority = head.authority_str(), path = head.path_str(), "no route");
            self.answer_local(h3c, ctx, sid, 404, "no route", more_frames);
            ctx.record_local(self.peer, 404, Some(&head), started);
            return;
        };
        let limit = ctx
            .shared
            .config
            .upstreams
            .get(upstream)
            .and_then(|u| u.max_request_body);
        if let (Some(limit), Some(declared)) = (limit, head.content_length) {
            if declared > limit {
                self.answer_local(h3c, ctx, sid, 413, "request body too large", more_frames);
                ctx.record_local(self.peer, 413, Some(&head), started);
                return;
            }
        }
        let io = StreamIo::new(head.content_length, ctx.stats.clone());
        io.borrow_mut().req_limit = limit;
        if !more_frames {
            io.borrow_mut().req_fin = true;
        }
        self.streams.insert(sid, io.clone());
        let job = crate::http::forward::Job {
            ctx: ctx.clone(),
            io,
            head,
            peer: self.peer,
            upstream,
            conn: (slot, self.gen),
            started,
            chosen: std::cell::Cell::new(None),
            upstream_latency: std::cell::Cell::new(None),
            bytes_out: std::cell::Cell::new(0),
            body_sent: std::cell::Cell::new(false),
        };
        tokio::task::spawn_local(crate::http::forward::run(job));
    }

    /// Answers a request locally; the request body, if any, is not read.
    fn answer_local(
        &mut self,
        h3c: &mut h3::Connection,
        ctx: &WorkerCtx,
        sid: u64,
        status: u16,
        text: &str,
        body_follows: bool,
    ) {
        let (fields, body) = bridge::local_response(status, text, None);
        let io = StreamIo::new(None, ctx.stats.clone());
        {
            let mut io = io.borrow_mut();
            io.respond_local(status, fields, body);
            io.task_done = true;
            io.req_fin = !body_follows;
        }
        self.streams.insert(sid, io);
        self.flush_stream(h3c, sid);
    }

    fn read_body(&mut self, h3c: &mut h3::Connection, sid: u64) {
        let Some(io) = self.streams.get(&sid).cloned() else {
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
        loop {
            if io.borrow().req_buffered >= REQ_BUF_LIMIT {
                io.borrow_mut().req_read_blocked = true;
                return;
            }
            match h3c.recv_body(&mut self.quic, sid, &mut buf) {
                Ok(n) if n > 0 => {
                    let mut s = io.borrow_mut();
                    if s.task_done {
                        // Answered already: drop what arrives.
                        continue;
                    }
                    s.push_req(Bytes::copy_from_slice(&buf[..n]));
                    if s.req_limit.is_some_and(|limit| s.req_received > limit) {
                        // 413 from the proxy task; stop the client's upload.
                        s.req_too_large = true;
                        s.wake_req();
                        drop(s);
                        let _ = self.quic.stream_shutdown(
                            sid,
                            quiche::Shutdown::Read,
                            H3_REQUEST_REJECTED,
                        );
                        return;
                    }
                    if s.req_expected.is_some_and(|exp| s.req_received > exp) {
                        s.abort_client();
                        drop(s);
                        self.reset(sid, H3_MESSAGE_ERROR);
                        return;
                    }
                }
                _ => break,
            }
        }
        io.borrow_mut().req_read_blocked = false;
    }

    fn resume_reads(&mut self, h3c: &mut h3::Connection) {
        let blocked: Vec<u64> = self
            .streams
            .iter()
            .filter(|(_, io)| {
                let io = io.borrow();
                io.req_read_blocked && io.req_buffered < REQ_BUF_LIMIT
            })
            .map(|(sid, _)| *sid)
            .collect();
        for sid in blocked {
            self.read_body(h3c, sid);
        }
    }

    fn flush_streams(&mut self, h3c: &mut h3::Connection) {
        let sids: Vec<u64> = self.streams.keys().copied().collect();
        for sid in sids {
            self.flush_stream(h3c, sid);
        }
    }

    fn reset(&mut self, sid: u64, code: u64) {
        let _ = self
            .quic
            .stream_shutdown(sid, quiche::Shutdown::Write, code);
        let _ = self.quic.stream_shutdown(sid, quiche::Shutdown::Read, code);
        self.streams.remove(&sid);
    }

    /// Moves what the proxy task produced into quiche, resuming partial writes.
    fn flush_stream(&mut self, h3c: &mut h3::Connection, sid: u64) {
        let Some(io_rc) = self.streams.get(&sid).cloned() else {
            return;
        };
        let mut io = io_rc.borrow_mut();
        if io.client_gone {
            drop(io);
            self.streams.remove(&sid);
            return;
        }
        if let Some(code) = io.resp_reset {
            io.abort_client();
            drop(io);
            self.reset(sid, code);
            return;
        }
        if !io.head_sent {
            let Some(head) = io.resp_head.as_ref() else {
                return;
            };
            let fin = io.resp_fin && io.resp_body.is_empty() && io.resp_trailers.is_none();
            match h3c.send_response(&mut self.quic, sid, head, fin) {
                Ok(()) => {
                    io.head_sent = true;
                    if fin {
                        io.resp_done = true;
                    }
                }
                Err(h3::Error::StreamBlocked | h3::Error::Done) => return,
                Err(e) => {
                    tracing::debug!(stream = sid, error = %e, "send_response failed");
                    io.abort_client();
                    drop(io);
                    self.reset(sid, H3_REQUEST_CANCELLED);
                    return;
                }
            }
        }
        let room_before = io.resp_buffered;
        while !io.resp_done {
            let last = io.resp_body.len() == 1 && io.resp_fin && io.resp_trailers.is_none();
            let Some(chunk) = io.resp_body.front_mut() else {
                break;
            };
            // Zero-copy: quiche keeps a reference to the chunk until the client acknowledges it.
            let mut zc = chunk.clone();
            match h3c.send_body_zc(&mut self.quic, sid, &mut zc, last) {
                Ok(n) => {
                    let whole = n == chunk.len();
                    let _ = chunk.split_to(n);
                    io.resp_buffered -= n;
                    io.bytes_out += n as u64;
                    if whole {
                        io.resp_body.pop_front();
                        if last {
                            io.resp_done = true;
                        }
                    } else {
                        break;
                    }
                }
                Err(h3::Error::Done) => break,
                Err(e) => {
                    tracing::debug!(stream = sid, error = %e, "send_body failed");
                    io.abort_client();
                    drop(io);
                    self.reset(sid, H3_REQUEST_CANCELLED);
                    return;
                }
            }
        }
        if !io.resp_done && io.resp_body.is_empty() && io.resp_fin {
            let sent = match io.resp_trailers.as_ref() {
                Some(t) => h3c.send_additional_headers(&mut self.quic, sid, t, true, true),
                None => h3c.send_body(&mut self.quic, sid, b"", true).map(|_| ()),
            };
            match sent {
                Ok(()) => io.resp_done = true,
                Err(h3::Error::StreamBlocked | h3::Error::Done) => {}
                Err(e) => {
                    tracing::debug!(stream = sid, error = %e, "finishing response failed");
                    io.abort_client();
                    drop(io);
                    self.reset(sid, H3_REQUEST_CANCELLED);
                    return;
                }
            }
        }
        if io.resp_buffered < room_before {
            io.wake_resp();
        }
        if io.resp_done && io.task_done {
            let unread = !io.req_fin;
            drop(io);
            if unread {
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
