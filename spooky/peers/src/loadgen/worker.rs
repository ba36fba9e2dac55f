//! The event loop of one load thread: its socket, its connections, its share of the
//! requests. See the parent module for what is measured and how.

use super::{LoadError, LoadOptions, Plan, ThreadResult};
use quiche::h3::{self, NameValue};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Length of the source connection IDs we choose (incoming packets carry them as DCID).
const SCID_LEN: usize = 16;
/// Datagrams received per loop turn before connections are serviced.
const RECV_BATCH: usize = 512;

pub(super) fn thread_main(
    opts: &LoadOptions,
    plan: &Plan,
    index: usize,
    conns: usize,
    budget: Option<u64>,
) -> Result<ThreadResult, LoadError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            // Still meet the others, or the main thread would wait forever.
            plan.closed.wait();
            plan.read.wait();
            return Err(e.into());
        }
    };
    let mut worker = match rt.block_on(Worker::new(opts, plan, index, conns, budget)) {
        Ok(w) => w,
        Err(e) => {
            plan.closed.wait();
            plan.read.wait();
            return Err(e);
        }
    };
    let outcome = rt.block_on(worker.run());
    worker.result.open_connections = worker.live as u64;
    plan.closed.wait();
    plan.read.wait();
    worker.close_all();
    outcome.map(|()| worker.result)
}

/// One request in flight.
struct InFlight {
    /// When it was sent (or its connection started, with `new_connection`).
    start: Instant,
    measured: bool,
    status: u16,
    content_length: Option<u64>,
    body: u64,
    /// Request body bytes still to send.
    upload_at: usize,
    upload_done: bool,
}

struct Conn {
    quic: quiche::Connection,
    h3: Option<h3::Connection>,
    scid: [u8; SCID_LEN],
    started: Instant,
    streams: HashMap<u64, InFlight>,
    /// When each idle stream slot may send its next request.
    slots: VecDeque<Instant>,
    /// Requests sent on this connection.
    sent: u64,
    goaway: bool,
    dirty: bool,
}

struct Worker<'a> {
    opts: &'a LoadOptions,
    plan: &'a Plan,
    socket: tokio::net::UdpSocket,
    /// The socket delivers GRO-coalesced buffers.
    gro: bool,
    local: SocketAddr,
    quic_cfg: quiche::Config,
    h3_cfg: h3::Config,
    headers: Vec<h3::Header>,
    body: Vec<u8>,
    conns: Vec<Option<Box<Conn>>>,
    by_cid: HashMap<[u8; SCID_LEN], usize>,
    free: Vec<usize>,
    dirty: Vec<usize>,
    /// Connections this thread keeps open.
    target: usize,
    live: usize,
    handshaking: usize,
    /// Measured requests this thread may still send (count mode).
    budget: Option<u64>,
    measured_in_flight: u64,
    /// Packets that met a full socket buffer, sent once it drains.
    backlog: VecDeque<(Vec<u8>, SocketAddr)>,
    scid_prefix: [u8; 8],
    scid_seq: u64,
    opened: u64,
    buf: Vec<u8>,
    out: Vec<u8>,
    result: ThreadResult,
}

impl<'a> Worker<'a> {
    async fn new(
        opts: &'a LoadOptions,
        plan: &'a Plan,
        index: usize,
        target: usize,
        budget: Option<u64>,
    ) -> Result<Worker<'a>, LoadError> {
        let bind: SocketAddr = match opts.target {
            SocketAddr::V4(a) if a.ip().is_loopback() => "127.0.0.1:0",
            SocketAddr::V4(_) => "0.0.0.0:0",
            SocketAddr::V6(a) if a.ip().is_loopback() => "[::1]:0",
            SocketAddr::V6(_) => "[::]:0",
        }
        .parse()
        .map_err(|_| LoadError::Options("bind address"))?;
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(bind),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        let _ = sock.set_recv_buffer_size(8 << 20);
        let _ = sock.set_send_buffer_size(8 << 20);
        sock.set_nonblocking(true)?;
        sock.bind(&bind.into())?;
        let std_sock: std::net::UdpSocket = sock.into();
        let gro = opts.gro && crate::udp::enable_gro(&std_sock);
        let socket = tokio::net::UdpSocket::from_std(std_sock)?;
        let local = socket.local_addr()?;

        let mut cfg = crate::client::quic_config(
            opts.ca.is_some(),
            opts.ca.as_deref(),
            Duration::from_secs(30),
            100,
            2,
        )?;
        cfg.set_max_connection_window(64 << 20);
        cfg.set_max_stream_window(16 << 20);

        let mut headers = vec![
            h3::Header::new(b":method", opts.method.as_bytes()),
            h3::Header::new(b":scheme", b"https"),
            h3::Header::new(b":authority", opts.authority.as_bytes()),
            h3::Header::new(b":path", opts.path.as_bytes()),
            h3::Header::new(b"user-agent", b"spooky-load"),
        ];
        if opts.body_len > 0 {
            headers.push(h3::Header::new(
                b"content-length",
                opts.body_len.to_string().as_bytes(),
            ));
        }
        let body: Vec<u8> = (0..opts.body_len).map(|i| (i % 251) as u8).collect();
        let mut scid_prefix = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut scid_prefix)
            .map_err(|_| LoadError::Options("no randomness"))?;
        if let Some(b) = scid_prefix.first_mut() {
            *b ^= index as u8;
        }
        Ok(Worker {
            opts,
            plan,
            socket,
            gro,
            local,
            quic_cfg: cfg,
            h3_cfg: h3::Config::new()?,
            headers,
            body,
            conns: Vec::new(),
            by_cid: HashMap::new(),
            free: Vec::new(),
            dirty: Vec::new(),
            target,
            live: 0,
            handshaking: 0,
            budget,
            measured_in_flight: 0,
            backlog: VecDeque::new(),
            scid_prefix,
            scid_seq: 0,
            opened: 0,
            buf: vec![0; 65535],
            out: vec![0; 65535],
            result: ThreadResult::default(),
        })
    }

    /// Whether measured sending is over (count mode: budget spent; duration mode: time up).
    fn sending_over(&self, now: Instant) -> bool {
        if self.plan.end.is_some_and(|end| now >= end) {
            return true;
        }
        now >= self.plan.warm_end && self.budget == Some(0)
    }

    /// Whether the whole run of this thread is over.
    fn finished(&self, now: Instant) -> bool {
        if now >= self.plan.hard_end {
            return true;
        }
        match self.plan.end {
            Some(end) => now >= end,
            None => self.budget == Some(0) && self.measured_in_flight == 0,
        }
    }

    async fn run(&mut self) -> Result<(), LoadError> {
        loop {
            let now = Instant::now();
            if self.finished(now) {
                if now >= self.plan.hard_end && self.plan.end.is_none() {
                    self.result.errors.timeout += self.measured_in_flight;
                }
                return Ok(());
            }
            self.receive()?;
            self.expire_timers(Instant::now());
            self.service_dirty();
            // Replace connections that just finished (and open the first ones).
            self.open_connections(Instant::now())?;
            self.service_dirty();
            if !self.backlog.is_empty() {
                self.drain_backlog().await?;
                continue;
            }
            let wake = self.next_wake();
            tokio::select! {
                r = self.socket.readable() => r?,
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    fn next_wake(&self) -> Instant {
        let mut wake = self.plan.end.unwrap_or(self.plan.hard_end);
        if Instant::now() < self.plan.warm_end {
            wake = wake.min(self.plan.warm_end);
        }
        for c in self.conns.iter().flatten() {
            if let Some(t) = c.quic.timeout_instant() {
                wake = wake.min(t);
            }
            if c.h3.is_some() && !c.goaway {
                if let Some(&t) = c.slots.front() {
                    wake = wake.min(t);
                }
            }
        }
        wake
    }

    fn open_connections(&mut self, now: Instant) -> Result<(), LoadError> {
        while self.live < self.target
            && self.handshaking < self.opts.max_handshakes
            && !self.sending_over(now)
        {
            self.open_one(now)?;
        }
        Ok(())
    }

    fn open_one(&mut self, now: Instant) -> Result<(), LoadError> {
        self.scid_seq += 1;
        let mut scid = [0u8; SCID_LEN];
        scid[..8].copy_from_slice(&self.scid_prefix);
        scid[8..].copy_from_slice(&self.scid_seq.to_be_bytes());
        let quic = quiche::connect(
            Some(&self.opts.server_name),
            &quiche::ConnectionId::from_ref(&scid),
            self.local,
            self.opts.target,
            &mut self.quic_cfg,
        )?;
        // Spread the first requests of paced connections over one interval.
        let spread = self.opts.interval.map_or(Duration::ZERO, |i| {
            i.mul_f64((self.opened % self.target.max(1) as u64) as f64 / self.target.max(1) as f64)
        });
        self.opened += 1;
        let streams = if self.opts.new_connection {
            1
        } else {
            self.opts.streams
        };
        let conn = Box::new(Conn {
            quic,
            h3: None,
            scid,
            started: now,
            streams: HashMap::new(),
            slots: (0..streams).map(|_| now + spread).collect(),
            sent: 0,
            goaway: false,
            dirty: true,
        });
        let idx = match self.free.pop() {
            Some(i) => {
                if let Some(slot) = self.conns.get_mut(i) {
                    *slot = Some(conn);
                }
                i
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        self.by_cid.insert(scid, idx);
        self.dirty.push(idx);
        self.live += 1;
        self.handshaking += 1;
        Ok(())
    }

    fn receive(&mut self) -> Result<(), LoadError> {
        for _ in 0..RECV_BATCH {
            let received = if self.gro {
                let (socket, buf) = (&self.socket, &mut self.buf);
                socket.try_io(tokio::io::Interest::READABLE, || {
                    crate::udp::recv_gro(socket, buf)
                })
            } else {
                self.socket
                    .try_recv_from(&mut self.buf)
                    .map(|(n, from)| (n, from, None))
            };
            let (len, from, seg) = match received {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e.into()),
            };
            // A GRO buffer holds several datagrams of `seg` bytes (the last shorter).
            let seg = seg.unwrap_or(len).max(1);
            let mut off = 0;
            while off < len {
                let end = (off + seg).min(len);
                self.on_datagram(off, end, from);
                off = end;
            }
        }
        Ok(())
    }

    /// One datagram, `buf[start..end]`.
    fn on_datagram(&mut self, start: usize, end: usize, from: SocketAddr) {
        let Some(pkt) = self.buf.get_mut(start..end) else {
            return;
        };
        let idx = match quiche::Header::from_slice(pkt, SCID_LEN) {
            Ok(hdr) => {
                let key: Option<[u8; SCID_LEN]> = hdr.dcid.as_ref().try_into().ok();
                key.and_then(|k| self.by_cid.get(&k).copied())
            }
            Err(_) => None,
        };
        let Some(idx) = idx else { return };
        let Some(Some(conn)) = self.conns.get_mut(idx) else {
            return;
        };
        let _ = conn.quic.recv(
            pkt,
            quiche::RecvInfo {
                from,
                to: self.local,
            },
        );
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(idx);
        }
    }

    fn expire_timers(&mut self, now: Instant) {
        for (idx, slot) in self.conns.iter_mut().enumerate() {
            let Some(conn) = slot else { continue };
            let mut due = false;
            if conn.quic.timeout_instant().is_some_and(|t| t <= now) {
                conn.quic.on_timeout();
                due = true;
            }
            if conn.h3.is_some() && conn.slots.front().is_some_and(|&t| t <= now) {
                due = true;
            }
            if due && !conn.dirty {
                conn.dirty = true;
                self.dirty.push(idx);
            }
        }
    }

    fn service_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &idx in &dirty {
            let Some(mut conn) = self.conns.get_mut(idx).and_then(Option::take) else {
                continue;
            };
            conn.dirty = false;
            let keep = self.service(&mut conn);
            if keep {
                if let Some(slot) = self.conns.get_mut(idx) {
                    *slot = Some(conn);
                }
            } else {
                self.by_cid.remove(&conn.scid);
                self.free.push(idx);
                self.live -= 1;
                if conn.h3.is_none() {
                    self.handshaking -= 1;
                }
            }
        }
        if self.dirty.is_empty() {
            let mut dirty = dirty;
            dirty.clear();
            self.dirty = dirty;
        }
    }

    /// Processes what arrived on `conn`, sends what is due. Returns false when the
    /// connection is finished and must be dropped.
    fn service(&mut self, conn: &mut Conn) -> bool {
        let now = Instant::now();
        if conn.h3.is_none() && conn.quic.is_established() {
            match h3::Connection::with_transport(&mut conn.quic, &self.h3_cfg) {
                Ok(h) => {
                    conn.h3 = Some(h);
                    self.handshaking -= 1;
                    if now >= self.plan.warm_end && self.plan.end.is_none_or(|e| now < e) {
                        self.result.handshakes += 1;
                    }
                }
                Err(_) => {
                    let _ = conn.quic.close(true, 0x101, b"");
                }
            }
        }
        self.poll_events(conn, now);
        self.send_uploads(conn);
        self.issue_requests(conn, now);
        let done = self.opts.new_connection && conn.sent >= 1 && conn.streams.is_empty();
        let drained = conn.goaway && conn.streams.is_empty();
        if (done || drained) && !conn.quic.is_closed() {
            let _ = conn.quic.close(true, 0x100, b"");
        }
        self.flush(conn);
        if conn.quic.is_closed() || done || drained {
            if !(done || drained) {
                // Closed under us (idle timeout, error, server close).
                self.result.errors.connection += 1;
                for s in conn.streams.values() {
                    if s.measured {
                        self.result.errors.connection += 1;
                        self.measured_in_flight -= 1;
                    }
                }
            }
            return false;
        }
        true
    }

    fn poll_events(&mut self, conn: &mut Conn, now: Instant) {
        let Some(h3c) = conn.h3.as_mut() else { return };
        loop {
            match h3c.poll(&mut conn.quic) {
                Ok((sid, h3::Event::Headers { list, .. })) => {
                    if let Some(s) = conn.streams.get_mut(&sid) {
                        if s.status == 0 {
                            for h in &list {
                                match h.name() {
                                    b":status" => {
                                        s.status = std::str::from_utf8(h.value())
                                            .ok()
                                            .and_then(|v| v.parse().ok())
                                            .unwrap_or(0)
                                    }
                                    b"content-length" => {
                                        s.content_length = std::str::from_utf8(h.value())
                                            .ok()
                                            .and_then(|v| v.parse().ok())
                                    }
                                    _ => {}
                                }
                            }
                        }
                    }
                }
                Ok((sid, h3::Event::Data)) => {
                    let mut got = 0u64;
                    while let Ok(n) = h3c.recv_body(&mut conn.quic, sid, &mut self.buf) {
                        got += n as u64;
                    }
                    if let Some(s) = conn.streams.get_mut(&sid) {
                        s.body += got;
                    }
                }
                Ok((sid, h3::Event::Finished)) => {
                    if let Some(s) = conn.streams.remove(&sid) {
                        self.finish(&mut conn.slots, s, now, false);
                    }
                }
                Ok((sid, h3::Event::Reset(_))) => {
                    if let Some(s) = conn.streams.remove(&sid) {
                        self.finish(&mut conn.slots, s, now, true);
                    }
                }
                Ok((_, h3::Event::GoAway)) => conn.goaway = true,
                Ok(_) => {}
                Err(h3::Error::Done) => break,
                Err(_) => {
                    let _ = conn.quic.close(true, 0x101, b"");
                    break;
                }
            }
        }
    }

    fn finish(&mut self, slots: &mut VecDeque<Instant>, s: InFlight, now: Instant, reset: bool) {
        let next = now + self.opts.interval.unwrap_or(Duration::ZERO);
        slots.push_back(next);
        if !reset {
            self.result.completed_total += 1;
        }
        if !s.measured {
            return;
        }
        self.measured_in_flight -= 1;
        if self.plan.end.is_some_and(|end| now >= end) {
            return;
        }
        let r = &mut self.result;
        if reset {
            r.errors.reset += 1;
        } else if s.status == 0 || s.status >= 400 {
            r.errors.status += 1;
        } else if s.content_length.is_some_and(|cl| cl != s.body) || !s.upload_done {
            r.errors.truncated += 1;
        } else {
            r.requests += 1;
            r.bytes_down += s.body;
            r.bytes_up += s.upload_at as u64;
            let us = now.saturating_duration_since(s.start).as_micros();
            r.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
        }
    }

    fn send_uploads(&mut self, conn: &mut Conn) {
        if self.body.is_empty() {
            return;
        }
        let Some(h3c) = conn.h3.as_mut() else { return };
        for (sid, s) in conn.streams.iter_mut() {
            while !s.upload_done {
                let Some(rest) = self.body.get(s.upload_at..) else {
                    s.upload_done = true;
                    break;
                };
                match h3c.send_body(&mut conn.quic, *sid, rest, true) {
                    Ok(n) => {
                        s.upload_at += n;
                        if s.upload_at >= self.body.len() {
                            s.upload_done = true;
                        } else if n == 0 {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
    }

    fn issue_requests(&mut self, conn: &mut Conn, now: Instant) {
        if conn.goaway || conn.h3.is_none() {
            return;
        }
        while conn.slots.front().is_some_and(|&t| t <= now) {
            if self.sending_over(now) {
                return;
            }
            if self.opts.new_connection && conn.sent >= 1 {
                return;
            }
            let measured = now >= self.plan.warm_end;
            let fin = self.body.is_empty();
            let Some(h3c) = conn.h3.as_mut() else { return };
            let sid = match h3c.send_request(&mut conn.quic, &self.headers, fin) {
                Ok(sid) => sid,
                // Out of stream credit or send buffer: try again on the next event.
                Err(_) => return,
            };
            conn.slots.pop_front();
            conn.sent += 1;
            self.result.sent_total += 1;
            if measured {
                self.measured_in_flight += 1;
                if let Some(b) = self.budget.as_mut() {
                    *b = b.saturating_sub(1);
                }
            }
            let start = if self.opts.new_connection {
                conn.started
            } else {
                now
            };
            conn.streams.insert(
                sid,
                InFlight {
                    start,
                    measured,
                    status: 0,
                    content_length: None,
                    body: 0,
                    upload_at: 0,
                    upload_done: fin,
                },
            );
            if !fin {
                self.send_uploads(conn);
            }
        }
    }

    fn flush(&mut self, conn: &mut Conn) {
        loop {
            match conn.quic.send(&mut self.out) {
                Ok((len, info)) => {
                    let Some(pkt) = self.out.get(..len) else {
                        return;
                    };
                    if !self.backlog.is_empty() {
                        self.backlog.push_back((pkt.to_vec(), info.to));
                        continue;
                    }
                    match self.socket.try_send_to(pkt, info.to) {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            self.backlog.push_back((pkt.to_vec(), info.to));
                        }
                        Err(_) => {}
                    }
                }
                Err(quiche::Error::Done) => return,
                Err(_) => {
                    let _ = conn.quic.close(false, 0x1, b"");
                    return;
                }
            }
        }
    }

    async fn drain_backlog(&mut self) -> Result<(), LoadError> {
        while let Some((pkt, to)) = self.backlog.front() {
            match self.socket.try_send_to(pkt, *to) {
                Ok(_) => {
                    self.backlog.pop_front();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.socket.writable().await?;
                }
                Err(_) => {
                    self.backlog.pop_front();
                }
            }
        }
        Ok(())
    }

    /// Closes every connection politely (best effort, no waiting).
    fn close_all(&mut self) {
        let mut conns = std::mem::take(&mut self.conns);
        for conn in conns.iter_mut().flatten() {
            let _ = conn.quic.close(true, 0x100, b"");
            while let Ok((len, info)) = conn.quic.send(&mut self.out) {
                if let Some(pkt) = self.out.get(..len) {
                    let _ = self.socket.try_send_to(pkt, info.to);
                }
            }
        }
    }
}
