//! One worker per CPU: an OS thread (pinned when asked) running a single-threaded tokio
//! runtime with a `LocalSet`. A worker owns one UDP socket of the listener's SO_REUSEPORT
//! group, every QUIC connection whose connection IDs carry its index, its HTTP/2 pools and
//! its load-balancer state. Nothing on the request path crosses threads or takes a lock.
//!
//! The loop: receive a batch of datagrams → feed each to its connection (accepting new ones,
//! answering Retry / version negotiation, forwarding misrouted packets to their owner) →
//! service every touched connection (HTTP/3 events, buffered response data) → send what
//! quiche produced. Proxy tasks wake the loop through [`WorkerCtx::wake`]; quiche timers are
//! kept in an ordered set.

use super::{conn, udp};

use crate::health::TrafficOutcome;
use crate::lb::Balancer;
use crate::server::{Forwarded, Shared, WorkerStats};
use crate::upstream::{BackendPool, Connector, UpstreamError};
use conn::Conn;
use quiche::ConnectionId;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};

/// Largest UDP payload we receive or send.
const MAX_DATAGRAM: usize = 65535;
/// Datagrams taken from the socket before servicing connections.
const RECV_BATCH: usize = 64;
/// Lifetime of a Retry token.
const TOKEN_LIFETIME: Duration = Duration::from_secs(30);

/// What a worker thread is given.
pub struct WorkerSetup {
    pub index: usize,
    pub socket: std::net::UdpSocket,
    pub cpu: Option<usize>,
    pub shared: Arc<Shared>,
    pub inbox: mpsc::Receiver<Forwarded>,
    pub peers: Vec<mpsc::Sender<Forwarded>>,
    pub shutdown: watch::Receiver<bool>,
    /// New configuration snapshots (reloads).
    pub updates: watch::Receiver<Arc<Shared>>,
    /// eBPF steering is in force: the kernel places client-chosen DCIDs (skipping workers
    /// marked dead), so an Initial that reaches this worker is this worker's.
    pub kernel_places_initials: bool,
}

/// Per-worker state that proxy tasks reach through an `Rc`.
pub struct WorkerCtx {
    pub index: usize,
    pub shared: Arc<Shared>,
    /// `[upstream][backend]`.
    pub pools: Vec<Vec<Rc<BackendPool>>>,
    pub balancers: Vec<RefCell<Balancer>>,
    /// `[upstream][backend]`, plus one last series per upstream for answers without a backend.
    pub route_metrics: Vec<Vec<Arc<crate::ops::metrics::RouteMetrics>>>,
    /// Answers given before any upstream was chosen (malformed, no route).
    pub local_metrics: Arc<crate::ops::metrics::RouteMetrics>,
    pub stats: Arc<WorkerStats>,
    /// Shared by every snapshot's context, so tasks of an old snapshot still wake the loop.
    wakeup: Rc<Wakeup>,
    /// `[upstream][backend]`: (last outcome sent was a failure, successes seen) for passive
    /// health sampling.
    passive: Vec<Vec<Cell<(bool, u32)>>>,
}

/// One success in this many is sent to the health checker (as a latency sample).
const SUCCESS_SAMPLE: u32 = 32;

/// Connections that proxy tasks asked the loop to service.
#[derive(Default)]
struct Wakeup {
    dirty: RefCell<Vec<(usize, u64)>>,
    notify: Notify,
}

impl WorkerCtx {
    /// Metrics and access log for an answer Spooky gave itself before choosing an upstream.
    pub fn record_local(
        &self,
        peer: SocketAddr,
        status: u16,
        head: Option<&crate::http::bridge::RequestHead>,
        started: Instant,
    ) {
        let outcome = crate::ops::metrics::Outcome {
            status,
            total: started.elapsed(),
            upstream: None,
            bytes_in: 0,
            bytes_out: 0,
        };
        self.local_metrics.record(self.index, &outcome);
        if self.shared.access_log.enabled() {
            self.shared.access_log.log(crate::ops::access_log::Record {
                time: std::time::SystemTime::now(),
                client: peer,
                host: head
                    .map(|h| h.authority_str().to_owned())
                    .unwrap_or_default(),
                method: head.map(|h| h.method.to_string()).unwrap_or_default(),
                path: head.map(|h| h.path_str().to_owned()).unwrap_or_default(),
                status,
                bytes_in: 0,
                bytes_out: 0,
                duration: outcome.total,
                pool: String::new(),
                backend: String::new(),
                worker: self.index,
            });
        }
    }

    /// Asks the loop to service connection `conn` (slot, generation) soon.
    pub fn wake(&self, conn: (usize, u64)) {
        self.wakeup.dirty.borrow_mut().push(conn);
        self.wakeup.notify.notify_one();
    }

    /// Passive health: a failure on real traffic.
    pub fn report(&self, upstream: usize, backend: usize, err: &UpstreamError) {
        if err.is_backend_failure() {
            let outcome = match err.kind {
                crate::upstream::ErrorKind::ConnectTimeout
                | crate::upstream::ErrorKind::ResponseTimeout
                | crate::upstream::ErrorKind::IdleTimeout => TrafficOutcome::Timeout,
                crate::upstream::ErrorKind::Connect
                | crate::upstream::ErrorKind::Tls
                | crate::upstream::ErrorKind::Handshake => TrafficOutcome::ConnectFailure,
                _ => TrafficOutcome::ServerError,
            };
            self.shared.health.report(upstream, backend, outcome, None);
        }
    }

    /// Passive health: the outcome of a response head, with its latency.
    ///
    /// Successes matter to the health checker only after a failure (they reset the failure
    /// count) and as latency samples, so a worker sends the first success after a failure and
    /// then one in [`SUCCESS_SAMPLE`]: the control thread is not woken for every request.
    pub fn report_outcome(
        &self,
        upstream: usize,
        backend: usize,
        outcome: TrafficOutcome,
        latency: Duration,
    ) {
        let Some(cell) = self.passive.get(upstream).and_then(|r| r.get(backend)) else {
            return;
        };
        let (after_failure, successes) = cell.get();
        if outcome == TrafficOutcome::Success {
            cell.set((false, successes.wrapping_add(1)));
            if !after_failure && successes % SUCCESS_SAMPLE != 0 {
                return;
            }
        } else {
            cell.set((true, successes));
        }
        self.shared
            .health
            .report(upstream, backend, outcome, Some(latency));
    }
}

/// Runs a worker on the current thread until shutdown completes.
///
/// # Errors
/// A message when the runtime, the socket or the QUIC configuration cannot be set up.
pub fn run(setup: WorkerSetup) -> Result<(), String> {
    if let Some(cpu) = setup.cpu {
        pin_to_cpu(cpu);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("worker {}: runtime: {e}", setup.index))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut worker = Worker::new(setup)?;
        worker.run().await;
        Ok(())
    })
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0, …) affects only this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(cpu, "could not pin worker thread to its CPU");
        }
    }
}

struct Worker {
    ctx: Rc<WorkerCtx>,
    socket: tokio::net::UdpSocket,
    local: SocketAddr,
    qconfig: quiche::Config,
    h3config: quiche::h3::Config,
    /// Connections by slot. Boxed: a `Conn` (with its quiche connection) is kilobytes, and
    /// a slab of them inline would grow by copying and keep up to twice the room it needs.
    conns: Vec<Option<Box<Conn>>>,
    free: Vec<usize>,
    next_gen: u64,
    by_cid: HashMap<ConnectionId<'static>, usize>,
    /// Open connections per client address.
    per_ip: HashMap<std::net::IpAddr, u32>,
    timers: BTreeSet<(Instant, usize)>,
    inbox: mpsc::Receiver<Forwarded>,
    peers: Vec<mpsc::Sender<Forwarded>>,
    shutdown: watch::Receiver<bool>,
    updates: watch::Receiver<Arc<Shared>>,
    kernel_places_initials: bool,
    draining: Option<Instant>,
    stats: Arc<WorkerStats>,
    recv_buf: udp::RecvBatch,
    out: Vec<u8>,
    /// UDP GSO works on this socket (turned off at the first refusal).
    gso: bool,
    touched: Vec<usize>,
    rate_window: Cell<(Instant, u32)>,
}

impl Worker {
    fn new(setup: WorkerSetup) -> Result<Self, String> {
        let shared = setup.shared;
        let cfg = &shared.config;
        let qconfig =
            crate::server::quic_config(cfg).map_err(|e| format!("worker {}: {e}", setup.index))?;
        let mut h3config = quiche::h3::Config::new().map_err(|e| format!("h3 config: {e}"))?;
        h3config.set_max_field_section_size(hard_header_cap(cfg.proxy.max_header_list_size));
        setup
            .socket
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        let local = setup.socket.local_addr().map_err(|e| e.to_string())?;
        let socket = tokio::net::UdpSocket::from_std(setup.socket).map_err(|e| e.to_string())?;
        // Coalesced receives where the kernel supports them; `recv_batch` handles both.
        if !udp::enable_gro(&socket) {
            tracing::debug!(worker = setup.index, "UDP GRO not available");
        }

        let stats = shared.stats[setup.index].clone();
        let ctx = Rc::new(build_ctx(
            setup.index,
            shared,
            Rc::new(Wakeup::default()),
            None,
        )?);
        Ok(Self {
            ctx,
            socket,
            local,
            qconfig,
            h3config,
            conns: Vec::new(),
            free: Vec::new(),
            next_gen: 1,
            by_cid: HashMap::new(),
            per_ip: HashMap::new(),
            timers: BTreeSet::new(),
            inbox: setup.inbox,
            peers: setup.peers,
            shutdown: setup.shutdown,
            updates: setup.updates,
            kernel_places_initials: setup.kernel_places_initials,
            draining: None,
            stats,
            recv_buf: udp::RecvBatch::new(MAX_DATAGRAM),
            out: vec![0; MAX_DATAGRAM],
            gso: true,
            touched: Vec::new(),
            rate_window: Cell::new((Instant::now(), 0)),
        })
    }

    async fn run(&mut self) {
        tracing::debug!(worker = self.ctx.index, local = %self.local, "worker running");
        let wakeup = self.ctx.wakeup.clone();
        loop {
            let next_timer = self.timers.first().map(|(t, _)| *t);
            let grace_end = self.draining;
            tokio::select! {
                biased;
                r = self.socket.readable() => {
                    if r.is_ok() {
                        self.recv_batch();
                    }
                }
                () = wakeup.notify.notified() => {}
                r = self.updates.changed() => {
                    if r.is_ok() {
                        let next = self.updates.borrow_and_update().clone();
                        self.apply(next);
                    }
                }
                Some(fwd) = self.inbox.recv() => {
                    let mut data = fwd.data;
                    self.on_datagram(&mut data, fwd.from, true);
                }
                () = sleep_until(next_timer) => {
                    self.fire_timers();
                }
                r = self.shutdown.changed(), if self.draining.is_none() => {
                    if r.is_err() || *self.shutdown.borrow() {
                        self.begin_drain();
                    }
                }
                () = sleep_until(grace_end) => {
                    self.close_all();
                }
            }
            self.service_dirty();
            self.service_touched().await;
            if self.draining.is_some() && self.conns.iter().all(Option::is_none) {
                tracing::info!(worker = self.ctx.index, "worker drained");
                return;
            }
        }
    }

    /// Swaps in a new configuration snapshot: new requests use it, requests in flight keep
    /// the context they started with, connections stay.
    fn apply(&mut self, next: Arc<Shared>) {
        let qconfig = match crate::server::quic_config(&next.config) {
            Ok(q) => q,
            Err(e) => {
                tracing::error!(worker = self.ctx.index, error = %e, "reload: QUIC config refused; keeping the old one");
                return;
            }
        };
        match build_ctx(
            self.ctx.index,
            next.clone(),
            self.ctx.wakeup.clone(),
            Some(&self.ctx),
        ) {
            Ok(ctx) => {
                let mut h3config = match quiche::h3::Config::new() {
                    Ok(h) => h,
                    Err(_) => return,
                };
                h3config.set_max_field_section_size(hard_header_cap(
                    next.config.proxy.max_header_list_size,
                ));
                self.h3config = h3config;
                self.qconfig = qconfig;
                self.ctx = Rc::new(ctx);
                self.stats.snapshots_applied.fetch_add(1, Ordering::Release);
                tracing::debug!(worker = self.ctx.index, "configuration snapshot applied");
            }
            Err(e) => {
                tracing::error!(worker = self.ctx.index, error = %e, "reload: cannot build worker state")
            }
        }
    }

    fn recv_batch(&mut self) {
        // Up to `RECV_BATCH` messages (each a datagram, or several coalesced by GRO) per
        // wakeup, `udp::BATCH` per `recvmmsg`.
        for _ in 0..RECV_BATCH / udp::BATCH {
            let mut batch = std::mem::take(&mut self.recv_buf);
            let received = self
                .socket
                .try_io(tokio::io::Interest::READABLE, || batch.recv(&self.socket));
            let n = received.unwrap_or(0);
            for i in 0..n {
                let Some((r, data)) = batch.message(i) else {
                    continue;
                };
                // A GRO buffer holds several datagrams of `seg` bytes (the last shorter).
                let len = data.len();
                let seg = r.seg.unwrap_or(len).max(1);
                let mut off = 0;
                while off < len {
                    let end = (off + seg).min(len);
                    self.stats.packets_in.fetch_add(1, Ordering::Relaxed);
                    self.on_datagram(&mut data[off..end], r.from, false);
                    off = end;
                }
            }
            self.recv_buf = batch;
            if n < udp::BATCH {
                break;
            }
        }
    }

    /// One datagram from `from` (possibly several coalesced QUIC packets).
    fn on_datagram(&mut self, data: &mut [u8], from: SocketAddr, forwarded: bool) {
        let layout = self.ctx.shared.layout;
        let hdr = match quiche::Header::from_slice(data, layout.cid_len()) {
            Ok(h) => h,
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if let Some(&slot) = self.by_cid.get(&hdr.dcid) {
            let _ = self.feed(slot, data, from);
            return;
        }
        // Not a connection of ours: whose is it? Initial and 0-RTT packets carry the client's
        // DCID (placed by hash); every other packet must carry a DCID we issued.
        let workers = self.peers.len() as u32;
        let client_chosen = matches!(hdr.ty, quiche::Type::Initial | quiche::Type::ZeroRTT);
        let owner = if client_chosen && self.kernel_places_initials {
            Some(self.ctx.index)
        } else if client_chosen {
            Some(spooky_common::cid::steer(&layout, &hdr.dcid, workers) as usize)
        } else {
            layout
                .worker_of(&hdr.dcid)
                .map(usize::from)
                .filter(|w| *w < workers as usize)
        };
        match owner {
            Some(owner) if owner != self.ctx.index && !forwarded => {
                self.stats.misrouted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(worker = self.ctx.index, owner, ty = ?hdr.ty, "misrouted packet forwarded to its owner");
                if let Some(peer) = self.peers.get(owner) {
                    let _ = peer.try_send(Forwarded {
                        data: data.to_vec(),
                        from,
                    });
                }
                return;
            }
            Some(_) if hdr.ty == quiche::Type::Initial => {}
            _ => {
                // A packet for a connection that is gone, or junk.
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if !quiche::version_is_supported(hdr.version) {
            if let Ok(len) = quiche::negotiate_version(&hdr.scid, &hdr.dcid, &mut self.out) {
                let _ = self.socket.try_send_to(&self.out[..len], from);
            }
            return;
        }
        if self.draining.is_some() {
            return;
        }
        self.accept(hdr, data, from);
    }

    fn new_cid(&self) -> ConnectionId<'static> {
        let shared = &self.ctx.shared;
        let mut nonce = [0u8; 20];
        let _ = ring::rand::SecureRandom::fill(&shared.rng, &mut nonce);
        let mut cid = [0u8; 20];
        let n = shared.layout.write(
            &shared.config.quic.server_id,
            self.ctx.index as u8,
            &nonce,
            &mut cid,
        );
        ConnectionId::from_vec(cid[..n].to_vec())
    }

    fn retry_wanted(&self) -> bool {
        match self.ctx.shared.config.quic.retry {
            crate::config::RetryMode::Off => false,
            crate::config::RetryMode::Always => true,
            crate::config::RetryMode::Auto {
                new_connections_per_sec,
            } => {
                let (start, count) = self.rate_window.get();
                start.elapsed() < Duration::from_secs(1) && count >= new_connections_per_sec
            }
        }
    }

    fn count_new_connection(&self) {
        let (start, count) = self.rate_window.get();
        let now = Instant::now();
        if now.duration_since(start) >= Duration::from_secs(1) {
            self.rate_window.set((now, 1));
        } else {
            self.rate_window.set((start, count.saturating_add(1)));
        }
    }

    fn accept(&mut self, hdr: quiche::Header<'_>, data: &mut [u8], from: SocketAddr) {
        // RFC 9000 §14.1: a client Initial must be in a datagram of at least 1200 bytes.
        if data.len() < 1200 {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let quic_cfg = &self.ctx.shared.config.quic;
        let workers = self.peers.len().max(1);
        if self.live_conns() > quic_cfg.max_connections / workers {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Each worker enforces its share of the per-address limit (a client's connections
        // spread over the workers by connection ID).
        let per_ip_limit = quic_cfg.max_connections_per_ip.div_ceil(workers) as u32;
        if self
            .per_ip
            .get(&from.ip())
            .is_some_and(|n| *n >= per_ip_limit)
        {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(client = %from.ip(), "connection refused: per-address limit");
            return;
        }
        let token = hdr.token.as_deref().unwrap_or(&[]);
        let mut odcid = None;
        if !token.is_empty() {
            match crate::server::validate_token(
                &self.ctx.shared.token_key,
                token,
                &from,
                TOKEN_LIFETIME,
            ) {
                Some(id) => odcid = Some(id),
                None => {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        } else if self.retry_wanted() {
            let new_scid = self.new_cid();
            let token = crate::server::mint_token(&self.ctx.shared.token_key, &hdr.dcid, &from);
            if let Ok(len) = quiche::retry(
                &hdr.scid,
                &hdr.dcid,
                &new_scid,
                &token,
                hdr.version,
                &mut self.out,
            ) {
                let _ = self.socket.try_send_to(&self.out[..len], from);
                self.stats.retry_sent.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        self.count_new_connection();
        // After a Retry the client's DCID is the retry SCID we chose: keep it as our SCID.
        let scid = if odcid.is_some() {
            hdr.dcid.clone().into_owned()
        } else {
            self.new_cid()
        };
        let odcid_ref = odcid.as_ref();
        let quic = match quiche::accept_with_buf_factory::<crate::http::exchange::BytesFactory>(
            &scid,
            odcid_ref,
            self.local,
            from,
            &mut self.qconfig,
        ) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(peer = %from, error = %e, "accept failed");
                return;
            }
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let gen = self.next_gen;
        self.next_gen += 1;
        let client_dcid = hdr.dcid.clone().into_owned();
        self.by_cid.insert(scid.clone(), slot);
        let mut aliases = vec![scid];
        if odcid.is_none() {
            // The client's retransmitted Initials still carry its own DCID.
            self.by_cid.insert(client_dcid.clone(), slot);
            aliases.push(client_dcid);
        }
        let handshake_deadline = Instant::now() + self.ctx.shared.config.quic.handshake_timeout;
        self.conns[slot] = Some(Box::new(Conn::new(
            quic,
            from,
            gen,
            aliases,
            handshake_deadline,
        )));
        *self.per_ip.entry(from.ip()).or_insert(0) += 1;
        self.stats
            .connections_active
            .fetch_add(1, Ordering::Relaxed);
        if self.feed(slot, data, from) {
            self.stats
                .connections_accepted
                .fetch_add(1, Ordering::Relaxed);
        } else if let Some(conn) = self.conns.get_mut(slot).and_then(Option::take) {
            // The Initial did not decrypt (forged or corrupt): keep no state for it.
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.remove(slot, conn);
        }
    }

    fn live_conns(&self) -> usize {
        self.conns.len() - self.free.len()
    }

    /// Feeds a datagram to connection `slot`; false when quiche refused it.
    fn feed(&mut self, slot: usize, data: &mut [u8], from: SocketAddr) -> bool {
        let local = self.local;
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        let info = quiche::RecvInfo { from, to: local };
        let ok = match conn.quic.recv(data, info) {
            Ok(_) => {
                conn.peer = from;
                true
            }
            Err(e) => {
                tracing::trace!(error = %e, "recv failed");
                false
            }
        };
        if !conn.touched {
            conn.touched = true;
            self.touched.push(slot);
        }
        ok
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(&(t, slot)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
                conn.deadline = None;
                conn.quic.on_timeout();
                if !conn.touched {
                    conn.touched = true;
                    self.touched.push(slot);
                }
            }
        }
    }

    fn service_dirty(&mut self) {
        let dirty = std::mem::take(&mut *self.ctx.wakeup.dirty.borrow_mut());
        for (slot, gen) in dirty {
            if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
                if conn.gen == gen && !conn.touched {
                    conn.touched = true;
                    self.touched.push(slot);
                }
            }
        }
    }

    async fn service_touched(&mut self) {
        while let Some(slot) = self.touched.pop() {
            let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            conn.touched = false;
            conn.service(&self.ctx, &self.h3config, slot, self.draining.is_some());
            self.provide_cids(&mut conn, slot);
            self.flush(&mut conn).await;
            if conn.quic.is_closed() {
                self.remove(slot, conn);
                continue;
            }
            let mut deadline = conn.quic.timeout_instant();
            let heads = conn.head_deadline(self.ctx.shared.config.quic.request_header_timeout);
            if let Some(h) = heads {
                deadline = Some(deadline.map_or(h, |d| d.min(h)));
            }
            if !conn.quic.is_established() {
                if Instant::now() >= conn.handshake_deadline {
                    tracing::debug!(peer = %conn.peer, "handshake timed out");
                    // CONNECTION_REFUSED; quiche then drains and closes the connection.
                    let _ = conn.quic.close(false, 0x2, b"handshake timeout");
                    self.flush(&mut conn).await;
                }
                deadline = deadline.map(|d| d.min(conn.handshake_deadline));
            }
            if deadline != conn.deadline {
                if let Some(old) = conn.deadline {
                    self.timers.remove(&(old, slot));
                }
                if let Some(new) = deadline {
                    self.timers.insert((new, slot));
                }
                conn.deadline = deadline;
            }
            self.conns[slot] = Some(conn);
        }
    }

    /// Gives the client spare connection IDs (all encoding this worker) so that it can
    /// migrate, and forgets the ones it retired.
    fn provide_cids(&mut self, conn: &mut Conn, slot: usize) {
        while let Some(old) = conn.quic.retired_scid_next() {
            self.by_cid.remove(&old);
            conn.aliases.retain(|c| *c != old);
        }
        if !conn.quic.is_established() {
            return;
        }
        while conn.quic.scids_left() > 0 && conn.aliases.len() < 8 {
            let cid = self.new_cid();
            let token = crate::server::reset_token(&self.ctx.shared.token_key, &cid);
            if conn.quic.new_scid(&cid, token, false).is_err() {
                break;
            }
            self.by_cid.insert(cid.clone(), slot);
            conn.aliases.push(cid);
        }
    }

    /// Sends everything quiche has for `conn`, batching equal-size packets to the same peer
    /// into GSO sends.
    async fn flush(&mut self, conn: &mut Conn) {
        let max = conn.quic.max_send_udp_payload_size().min(self.out.len());
        loop {
            // Fill a batch: packets of `seg` bytes (the last may be shorter) to `dst`.
            let (mut used, mut seg, mut count, mut dst) = (0usize, 0usize, 0usize, None);
            let mut odd: Option<(usize, usize, SocketAddr)> = None;
            let mut done = false;
            while count < udp::MAX_SEGMENTS && used + max <= self.out.len() {
                match conn.quic.send(&mut self.out[used..used + max]) {
                    Ok((len, info)) => {
                        let fits = dst.is_none_or(|d| d == info.to) && (count == 0 || len <= seg);
                        if !fits {
                            // Sent alone after the batch.
                            odd = Some((used, len, info.to));
                            break;
                        }
                        if count == 0 {
                            seg = len;
                            dst = Some(info.to);
                        }
                        used += len;
                        count += 1;
                        if len < seg || !self.gso {
                            break;
                        }
                    }
                    Err(quiche::Error::Done) => {
                        done = true;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "quic send failed");
                        let _ = conn.quic.close(false, 0x1, b"");
                        done = true;
                        break;
                    }
                }
            }
            if let Some(to) = dst {
                self.send_batch(0, used, seg, count, to).await;
            }
            if let Some((at, len, to)) = odd {
                self.send_batch(at, len, len, 1, to).await;
            }
            if done || (dst.is_none() && odd.is_none()) {
                break;
            }
        }
    }

    /// Sends `out[at..at + len]` as `count` datagrams of `seg` bytes to `to`.
    async fn send_batch(
        &mut self,
        at: usize,
        len: usize,
        seg: usize,
        count: usize,
        to: SocketAddr,
    ) {
        self.stats
            .packets_out
            .fetch_add(count as u64, Ordering::Relaxed);
        let buf = &self.out[at..at + len];
        if count > 1 && self.gso {
            loop {
                let sent = self.socket.try_io(tokio::io::Interest::WRITABLE, || {
                    udp::send_gso(&self.socket, buf, seg, to)
                });
                match sent {
                    Ok(_) => return,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if self.socket.writable().await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::info!(worker = self.ctx.index, error = %e, "UDP GSO refused; sending datagrams one by one");
                        self.gso = false;
                        break;
                    }
                }
            }
        }
        for chunk in buf.chunks(seg.max(1)) {
            if let Err(e) = self.socket.send_to(chunk, to).await {
                tracing::debug!(error = %e, %to, "send failed");
                return;
            }
        }
    }

    fn remove(&mut self, slot: usize, mut conn: Box<Conn>) {
        for cid in conn.aliases.drain(..) {
            if self.by_cid.get(&cid) == Some(&slot) {
                self.by_cid.remove(&cid);
            }
        }
        if let Some(old) = conn.deadline {
            self.timers.remove(&(old, slot));
        }
        conn.abort_streams();
        if let Some(n) = self.per_ip.get_mut(&conn.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&conn.ip);
            }
        }
        self.stats
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
        self.free.push(slot);
    }

    fn begin_drain(&mut self) {
        let grace = self.ctx.shared.config.proxy.shutdown_grace;
        tracing::info!(
            worker = self.ctx.index,
            connections = self.live_conns(),
            ?grace,
            "draining"
        );
        self.draining = Some(Instant::now() + grace);
        for (slot, c) in self.conns.iter_mut().enumerate() {
            if let Some(conn) = c {
                if !conn.touched {
                    conn.touched = true;
                    self.touched.push(slot);
                }
            }
        }
    }

    fn close_all(&mut self) {
        for (slot, c) in self.conns.iter_mut().enumerate() {
            if let Some(conn) = c {
                let _ = conn
                    .quic
                    .close(true, crate::http::bridge::H3_NO_ERROR, b"shutdown");
                if !conn.touched {
                    conn.touched = true;
                    self.touched.push(slot);
                }
            }
        }
        self.draining = Some(Instant::now() + Duration::from_secs(3600));
    }
}

/// A worker's view of snapshot `shared`: pools (connections of `old` are kept for backends
/// whose id, address and TLS settings did not change), balancers, metric series.
fn build_ctx(
    index: usize,
    shared: Arc<Shared>,
    wakeup: Rc<Wakeup>,
    old: Option<&WorkerCtx>,
) -> Result<WorkerCtx, String> {
    let cfg = &shared.config;
    let mut pools = Vec::with_capacity(cfg.upstreams.len());
    let mut balancers = Vec::with_capacity(cfg.upstreams.len());
    for (u, up) in cfg.upstreams.iter().enumerate() {
        let mut row = Vec::with_capacity(up.backends.len());
        for (b, backend) in up.backends.iter().enumerate() {
            let reuse = old.and_then(|o| {
                o.shared
                    .config
                    .upstreams
                    .iter()
                    .zip(&o.pools)
                    .find_map(|(ou, orow)| {
                        ou.backends.iter().zip(orow).find_map(|(ob, pool)| {
                            let same = ob.id == backend.id
                                && ob.address == backend.address
                                && ob.tls == backend.tls
                                && ou.timeouts.connect == up.timeouts.connect;
                            same.then(|| pool.clone())
                        })
                    })
            });
            let pool = match reuse {
                Some(p) => p,
                None => {
                    let tls = shared
                        .backend_tls
                        .get(u)
                        .and_then(|r| r.get(b))
                        .cloned()
                        .flatten();
                    Rc::new(BackendPool::new(Connector::new(
                        backend,
                        tls,
                        up.timeouts.connect,
                    )?))
                }
            };
            row.push(pool);
        }
        pools.push(row);
        let weights: Vec<u32> = up.backends.iter().map(|b| b.weight).collect();
        let ids: Vec<&str> = up.backends.iter().map(|b| b.id.as_str()).collect();
        let seed = 0x5eed_0000 + index as u64 * 7919 + u as u64;
        balancers.push(RefCell::new(Balancer::with_ids(
            &up.load_balancing,
            &weights,
            &ids,
            seed,
        )));
    }
    let route_metrics = cfg
        .upstreams
        .iter()
        .map(|up| {
            let mut row: Vec<_> = up
                .backends
                .iter()
                .map(|b| shared.metrics.route(&up.name, &b.id))
                .collect();
            row.push(shared.metrics.route(&up.name, ""));
            row
        })
        .collect();
    let local_metrics = shared.metrics.route("", "");
    let stats = shared
        .stats
        .get(index)
        .cloned()
        .ok_or("no stats for this worker")?;
    let passive = cfg
        .upstreams
        .iter()
        .map(|up| up.backends.iter().map(|_| Cell::new((false, 0))).collect())
        .collect();
    Ok(WorkerCtx {
        index,
        route_metrics,
        local_metrics,
        stats,
        shared,
        pools,
        balancers,
        wakeup,
        passive,
    })
}

/// The field-section size quiche enforces by closing the connection: well above the limit
/// Spooky answers with 431 per request, so that only absurd sections cost a connection.
fn hard_header_cap(limit: u64) -> u64 {
    limit.saturating_mul(4).max(256 * 1024)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
