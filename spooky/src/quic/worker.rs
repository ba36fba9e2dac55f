//! One worker per CPU: an OS thread (pinned when asked) running a single-threaded tokio
//! runtime with a `LocalSet`. A worker owns one UDP socket of the listener's SO_REUSEPORT
//! group, every QUIC connection whose connection IDs carry its index, its HTTP/2 pools and
//! its load-balancer state. Nothing on the request path crosses threads or takes a lock.
//!
//! The loop only does I/O: receive a batch of datagrams → feed each to its connection, or ask
//! the [`Endpoint`] what to do with it (forward to its owner, Version Negotiation, Retry,
//! accept) and do that → service every touched connection (HTTP/3 events, what request tasks
//! produced) → send what quiche produced. Request tasks wake the loop through the forwarder's
//! [`crate::http::Wakeup`]; quiche timers are kept in an ordered set. Reloads arrive as the
//! two phases of [`crate::ops::reload::switch`].

use super::conn::{BytesFactory, Conn};
use super::endpoint::{Decision, DropReason, Endpoint, Generations, Limits, Now, RESET_LEN};
use super::send::{Sender, MAX_DATAGRAM};
use super::stall::StallBook;
use super::token;
use super::udp;
use crate::http::{Forwarder, Services};
use crate::ops::reload::{Answer, Command, WorkerUpdate};
use crate::snapshot::Snapshot;
use crate::steering::{self, ProbeBoard};
use crate::tcp;
use quiche::ConnectionId;
use spooky_common::CidLayout;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Datagrams taken from the socket before servicing connections.
const RECV_BATCH: usize = 64;

/// A datagram handed from the worker that received it to the worker that owns it.
pub struct Forwarded {
    pub data: Vec<u8>,
    pub from: SocketAddr,
}

/// What a worker thread is given.
pub struct WorkerSetup {
    pub index: usize,
    pub workers: usize,
    pub socket: std::net::UdpSocket,
    /// Its socket of the TCP listener's SO_REUSEPORT group, when `listen.tcp` is on.
    pub tcp: Option<std::net::TcpListener>,
    pub cpu: Option<usize>,
    pub layout: CidLayout,
    pub rng: ring::rand::SystemRandom,
    /// What its request tasks use for the whole process.
    pub services: Services,
    pub snapshot: Arc<Snapshot>,
    pub quic: quiche::Config,
    pub inbox: mpsc::Receiver<Forwarded>,
    pub peers: Vec<mpsc::Sender<Forwarded>>,
    pub shutdown: watch::Receiver<bool>,
    /// Reloads (two phases).
    pub commands: mpsc::UnboundedReceiver<Command<WorkerUpdate>>,
    /// eBPF steering is in force: the kernel places client-chosen DCIDs (skipping workers
    /// marked dead), so an Initial that reaches this worker is this worker's.
    pub kernel_places_initials: bool,
    /// The processes steering knows (this one, and one it takes over from or hands over to).
    pub generations: watch::Receiver<Generations>,
    /// Where probes of the classic BPF tier are reported.
    pub probes: Arc<ProbeBoard>,
    /// Ends the worker at once, as a crash would (`app::Running::kill_worker`, for tests of
    /// what happens when a worker dies).
    pub kill: Arc<tokio::sync::Notify>,
}

/// Why a worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("worker {worker}: cannot start its runtime: {source}")]
    Runtime {
        worker: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("worker {worker}: TCP listener: {source}")]
    Tcp {
        worker: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("worker {worker}: socket: {source}")]
    Socket {
        worker: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("worker {worker}: HTTP/3 settings: {source}")]
    H3 {
        worker: usize,
        #[source]
        source: crate::snapshot::QuicConfigError,
    },
    #[error("worker thread panicked")]
    Panicked,
    #[error("worker {0} was killed (test hook)")]
    Killed(usize),
}

/// Runs a worker on the current thread until shutdown completes.
///
/// # Errors
/// [`WorkerError`] when the runtime or the socket cannot be set up.
pub fn run(setup: WorkerSetup) -> Result<(), WorkerError> {
    if let Some(cpu) = setup.cpu {
        pin_to_cpu(cpu);
    }
    let worker = setup.index;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| WorkerError::Runtime { worker, source })?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut worker = Worker::new(setup)?;
        worker.run().await
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

/// What a worker runs with for one snapshot.
struct Current {
    fwd: Rc<Forwarder>,
    qconfig: quiche::Config,
    h3config: quiche::h3::Config,
}

struct Worker {
    index: usize,
    services: Rc<Services>,
    cur: Current,
    /// A prepared reload waiting for its commit: (generation, what to switch to).
    staged: Option<(u64, Current)>,
    tx: Sender,
    local: SocketAddr,
    endpoint: Endpoint,
    layout: CidLayout,
    rng: ring::rand::SystemRandom,
    /// Connections by slot. Boxed: a `Conn` (with its quiche connection) is kilobytes, and
    /// a slab of them inline would grow by copying and keep up to twice the room it needs.
    conns: Vec<Option<Box<Conn>>>,
    free: Vec<usize>,
    next_gen: u64,
    by_cid: HashMap<ConnectionId<'static>, usize>,
    timers: BTreeSet<(Instant, usize)>,
    inbox: mpsc::Receiver<Forwarded>,
    peers: Vec<mpsc::Sender<Forwarded>>,
    shutdown: watch::Receiver<bool>,
    commands: mpsc::UnboundedReceiver<Command<WorkerUpdate>>,
    generations: watch::Receiver<Generations>,
    probes: Arc<ProbeBoard>,
    kill: Arc<tokio::sync::Notify>,
    draining: Option<Instant>,
    recv_buf: udp::RecvBatch,
    touched: Vec<usize>,
    /// Stalled response streams held per client address (`quic.max_stalled_streams_per_ip`).
    stalls: Rc<StallBook>,
    /// The TLS-over-TCP front on this worker, when `listen.tcp` is on.
    tcp: Option<tcp::Front>,
}

impl Worker {
    fn new(setup: WorkerSetup) -> Result<Self, WorkerError> {
        let worker = setup.index;
        let socket_err = |source| WorkerError::Socket { worker, source };
        setup.socket.set_nonblocking(true).map_err(socket_err)?;
        let local = setup.socket.local_addr().map_err(socket_err)?;
        let socket = tokio::net::UdpSocket::from_std(setup.socket).map_err(socket_err)?;
        // Coalesced receives where the kernel supports them; `recv_batch` handles both.
        if !udp::enable_gro(&socket) {
            tracing::debug!(worker, "UDP GRO not available");
        }
        let h3config = setup
            .snapshot
            .h3_config()
            .map_err(|source| WorkerError::H3 { worker, source })?;
        let services = Rc::new(setup.services);
        let generations = *setup.generations.borrow();
        let limits = Limits::share(&setup.snapshot.config.quic, setup.workers);
        let mut endpoint = Endpoint::new(
            worker,
            generations,
            setup.kernel_places_initials,
            setup.layout,
            limits,
            Instant::now(),
        );
        endpoint.set_server_id(&setup.snapshot.config.quic.server_id);
        let fwd = Rc::new(Forwarder::new(services.clone(), setup.snapshot, None));
        let tcp = match setup.tcp {
            Some(listener) => Some(
                tcp::Front::start(listener, fwd.clone(), setup.workers)
                    .map_err(|source| WorkerError::Tcp { worker, source })?,
            ),
            None => None,
        };
        Ok(Self {
            tcp,
            index: worker,
            tx: Sender::new(socket, services.stats.clone(), worker),
            services,
            cur: Current {
                fwd,
                qconfig: setup.quic,
                h3config,
            },
            staged: None,
            local,
            endpoint,
            layout: setup.layout,
            rng: setup.rng,
            conns: Vec::new(),
            free: Vec::new(),
            next_gen: 1,
            by_cid: HashMap::new(),
            timers: BTreeSet::new(),
            inbox: setup.inbox,
            peers: setup.peers,
            shutdown: setup.shutdown,
            commands: setup.commands,
            generations: setup.generations,
            probes: setup.probes,
            kill: setup.kill,
            draining: None,
            recv_buf: udp::RecvBatch::new(MAX_DATAGRAM),
            touched: Vec::new(),
            stalls: Rc::new(StallBook::new(setup.workers)),
        })
    }

    async fn run(&mut self) -> Result<(), WorkerError> {
        tracing::debug!(worker = self.index, local = %self.local, "worker running");
        let services = self.services.clone();
        let kill = self.kill.clone();
        let tcp = self.tcp.clone();
        loop {
            let next_timer = self.timers.first().map(|(t, _)| *t);
            let grace_end = self.draining;
            // Only while draining with TCP connections open: it resolves at once otherwise.
            let tcp_waits = self.draining.is_some() && tcp.as_ref().is_some_and(|t| t.open() > 0);
            let tcp_drained = async {
                match &tcp {
                    Some(front) => front.all_closed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                r = self.tx.socket.readable() => {
                    if r.is_ok() {
                        self.recv_batch();
                    }
                }
                () = services.wakeup.notified() => {}
                Some(cmd) = self.commands.recv() => self.on_command(cmd),
                r = self.generations.changed() => {
                    if r.is_ok() {
                        let g = *self.generations.borrow_and_update();
                        tracing::debug!(worker = self.index, ?g, "generations changed");
                        self.endpoint.set_generations(g);
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
                () = kill.notified() => return Err(WorkerError::Killed(self.index)),
                () = tcp_drained, if tcp_waits => {}
            }
            self.service_dirty();
            self.service_touched().await;
            let tcp_open = self.tcp.as_ref().map_or(0, tcp::Front::open);
            if self.draining.is_some() && self.conns.iter().all(Option::is_none) && tcp_open == 0 {
                tracing::info!(worker = self.index, "worker drained");
                return Ok(());
            }
        }
    }

    /// A reload phase. Prepare builds everything for the new snapshot (pools of backends
    /// that did not change carry over) and keeps it; commit switches to it between two
    /// batches of packets: new requests use it, requests in flight keep the forwarder they
    /// started with, connections stay.
    fn on_command(&mut self, cmd: Command<WorkerUpdate>) {
        let worker = self.index;
        match cmd {
            Command::Prepare {
                generation,
                update,
                reply,
            } => {
                let result = update.snapshot.h3_config().map(|h3config| Current {
                    fwd: Rc::new(Forwarder::new(
                        self.services.clone(),
                        update.snapshot,
                        Some(&self.cur.fwd),
                    )),
                    qconfig: update.quic,
                    h3config,
                });
                let answer = match result {
                    Ok(next) => {
                        self.staged = Some((generation, next));
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                };
                let _ = reply.send(Answer {
                    worker,
                    result: answer,
                });
            }
            Command::Commit { generation, reply } => {
                let result = match self.staged.take() {
                    Some((g, next)) if g == generation => {
                        let limits =
                            Limits::share(&next.fwd.snapshot.config.quic, self.peers.len());
                        self.endpoint.set_limits(limits);
                        self.cur = next;
                        if let Some(front) = &self.tcp {
                            front.set_forwarder(self.cur.fwd.clone());
                        }
                        self.services
                            .stats
                            .snapshots_applied
                            .fetch_add(1, Ordering::Release);
                        tracing::debug!(worker, generation, "configuration snapshot applied");
                        Ok(())
                    }
                    _ => Err(format!("generation {generation} was not prepared")),
                };
                let _ = reply.send(Answer { worker, result });
            }
            Command::Abort { generation } => {
                if self.staged.as_ref().is_some_and(|(g, _)| *g == generation) {
                    self.staged = None;
                }
            }
        }
    }

    fn recv_batch(&mut self) {
        // Up to `RECV_BATCH` messages (each a datagram, or several coalesced by GRO) per
        // wakeup, `udp::BATCH` per `recvmmsg`.
        for _ in 0..RECV_BATCH / udp::BATCH {
            let mut batch = std::mem::take(&mut self.recv_buf);
            let received = self.tx.socket.try_io(tokio::io::Interest::READABLE, || {
                batch.recv(&self.tx.socket)
            });
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
                    self.services
                        .stats
                        .packets_in
                        .fetch_add(1, Ordering::Relaxed);
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

    /// One datagram from `from` (possibly several coalesced QUIC packets): to its
    /// connection, or whatever the endpoint decides.
    fn on_datagram(&mut self, data: &mut [u8], from: SocketAddr, forwarded: bool) {
        let len = data.len();
        // Probes of the classic BPF tier (QUIC never starts with a zero byte).
        if data.first() == Some(&0) {
            if let Some(index) = steering::probe_index(data) {
                self.probes.report(index, self.index);
                return;
            }
        }
        let hdr = match quiche::Header::from_slice(data, self.layout.cid_len()) {
            Ok(h) => h,
            Err(_) => {
                self.services.stats.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if let Some(&slot) = self.by_cid.get(&hdr.dcid) {
            let _ = self.feed(slot, data, from);
            return;
        }
        let decision = self.endpoint.admit(
            &hdr,
            len,
            from,
            forwarded,
            &self.cur.fwd.snapshot.keys,
            Now::read(),
        );
        let stats = &self.services.stats;
        let fresh = hdr.ty == quiche::Type::Initial && hdr.token.as_ref().is_none_or(Vec::is_empty);
        if fresh && !forwarded && self.layout.generation_of(&hdr.dcid).is_some() {
            stats.lookalike_initials.fetch_add(1, Ordering::Relaxed);
        }
        match decision {
            Decision::Drop(DropReason::Draining) => {}
            Decision::Drop(DropReason::OtherGeneration) => {
                stats.foreign.fetch_add(1, Ordering::Relaxed);
            }
            Decision::Drop(DropReason::OtherServer) => {
                stats.other_server.fetch_add(1, Ordering::Relaxed);
            }
            Decision::Drop(_) => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Decision::Forward { owner } => {
                stats.misrouted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(worker = self.index, owner, ty = ?hdr.ty, "misrouted packet forwarded to its owner");
                if let Some(peer) = self.peers.get(owner) {
                    let _ = peer.try_send(Forwarded {
                        data: data.to_vec(),
                        from,
                    });
                }
            }
            Decision::NegotiateVersion => {
                if let Ok(n) = quiche::negotiate_version(&hdr.scid, &hdr.dcid, &mut self.tx.out) {
                    // Counted first: whoever sees the packet sees the count.
                    stats.negotiations_sent.fetch_add(1, Ordering::Relaxed);
                    self.tx.send_now(n, from);
                }
            }
            Decision::Refuse(reason) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(client = %from.ip(), ?reason, "connection refused");
            }
            Decision::Reset { token } => {
                let out = &mut self.tx.out[..RESET_LEN];
                let _ = ring::rand::SecureRandom::fill(&self.rng, &mut out[..RESET_LEN - 16]);
                // A short header: form bit clear, fixed bit set, the rest unpredictable.
                out[0] = 0x40 | (out[0] & 0x3f);
                out[RESET_LEN - 16..].copy_from_slice(&token.to_be_bytes());
                self.tx.send_now(RESET_LEN, from);
                stats.resets_sent.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(worker = self.index, peer = %from, "stateless reset sent");
            }
            Decision::Retry { token } => {
                let new_scid = self.new_cid(true);
                if let Ok(n) = quiche::retry(
                    &hdr.scid,
                    &hdr.dcid,
                    &new_scid,
                    &token,
                    hdr.version,
                    &mut self.tx.out,
                ) {
                    self.tx.send_now(n, from);
                    stats.retry_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            Decision::Accept { odcid } => {
                let client_dcid = hdr.dcid.into_owned();
                self.accept(client_dcid, odcid, data, from);
            }
        }
    }

    /// A connection ID of this worker. `for_initials`: one a client's Initials will carry
    /// (the handshake's, a Retry's), minted so that the placement of Initials, which hashes
    /// them and never trusts their worker byte, brings them here (`CidLayout::write_placed`).
    fn new_cid(&self, for_initials: bool) -> ConnectionId<'static> {
        let mut cid = [0u8; 20];
        let server_id = &self.cur.fwd.snapshot.config.quic.server_id;
        let fill = |nonce: &mut [u8]| {
            let _ = ring::rand::SecureRandom::fill(&self.rng, nonce);
        };
        let n = if for_initials {
            let key = self.generations.borrow().hash_key;
            let workers = u32::try_from(self.peers.len()).unwrap_or(u32::MAX);
            self.layout
                .write_placed(server_id, self.index as u8, key, workers, fill, &mut cid)
        } else {
            let mut nonce = [0u8; 20];
            fill(&mut nonce);
            self.layout
                .write(server_id, self.index as u8, &nonce, &mut cid)
        };
        ConnectionId::from_vec(cid[..n].to_vec())
    }

    /// Opens the connection the endpoint accepted and feeds it its first Initial.
    fn accept(
        &mut self,
        client_dcid: ConnectionId<'static>,
        odcid: Option<ConnectionId<'static>>,
        data: &mut [u8],
        from: SocketAddr,
    ) {
        // After a Retry the client's DCID is the retry SCID we chose: keep it as our SCID.
        let scid = if odcid.is_some() {
            client_dcid.clone()
        } else {
            self.new_cid(true)
        };
        // The first connection ID's reset token goes in the transport parameters.
        let reset = token::reset_token(&self.cur.fwd.snapshot.keys, &scid);
        self.cur.qconfig.set_stateless_reset_token(Some(reset));
        let quic = match quiche::accept_with_buf_factory::<BytesFactory>(
            &scid,
            odcid.as_ref(),
            self.local,
            from,
            &mut self.cur.qconfig,
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
        self.by_cid.insert(scid.clone(), slot);
        let mut aliases = vec![scid];
        if odcid.is_none() {
            // The client's retransmitted Initials still carry its own DCID.
            self.by_cid.insert(client_dcid.clone(), slot);
            aliases.push(client_dcid);
        }
        let handshake_deadline =
            Instant::now() + self.cur.fwd.snapshot.config.quic.handshake_timeout;
        self.conns[slot] = Some(Box::new(Conn::new(
            quic,
            from,
            gen,
            aliases,
            handshake_deadline,
            self.stalls.clone(),
        )));
        self.endpoint.opened(from.ip());
        let stats = self.services.stats.clone();
        stats.connections_active.fetch_add(1, Ordering::Relaxed);
        if self.feed(slot, data, from) {
            stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
        } else if let Some(conn) = self.conns.get_mut(slot).and_then(Option::take) {
            // The Initial did not decrypt (forged or corrupt): keep no state for it.
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.remove(slot, conn);
        }
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
        for (slot, gen) in self.services.wakeup.take() {
            if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
                if conn.gen == gen && !conn.touched {
                    conn.touched = true;
                    self.touched.push(slot);
                }
            }
        }
    }

    async fn service_touched(&mut self) {
        let fwd = self.cur.fwd.clone();
        let quic_cfg = &fwd.snapshot.config.quic;
        while let Some(slot) = self.touched.pop() {
            let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            conn.touched = false;
            conn.service(&fwd, &self.cur.h3config, slot, self.draining.is_some());
            self.provide_cids(&mut conn, slot);
            self.tx.flush(&mut conn.quic).await;
            if conn.quic.is_closed() {
                self.remove(slot, conn);
                continue;
            }
            let mut deadline = conn.quic.timeout_instant();
            // A draining connection wakes up to close when its GOAWAY grace ends (past it,
            // the last stream's end closes it).
            let draining = conn.drain_deadline().filter(|d| *d > Instant::now());
            let head = conn.head_deadline(quic_cfg.request_header_timeout);
            let memory_limit = fwd.snapshot.config.proxy.memory_limit.is_some();
            let stalled = conn.send_deadline(quic_cfg.send_timeout, memory_limit);
            for d in [head, stalled, draining].into_iter().flatten() {
                deadline = Some(deadline.map_or(d, |x| x.min(d)));
            }
            if !conn.quic.is_established() {
                if Instant::now() >= conn.handshake_deadline {
                    tracing::debug!(peer = %conn.peer, "handshake timed out");
                    // CONNECTION_REFUSED; quiche then drains and closes the connection.
                    let _ = conn.quic.close(false, 0x2, b"handshake timeout");
                    self.tx.flush(&mut conn.quic).await;
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
            let cid = self.new_cid(false);
            let reset = token::reset_token(&self.cur.fwd.snapshot.keys, &cid);
            if conn.quic.new_scid(&cid, reset, false).is_err() {
                break;
            }
            self.by_cid.insert(cid.clone(), slot);
            conn.aliases.push(cid);
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
        self.endpoint.closed(conn.ip);
        self.services
            .stats
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
        self.free.push(slot);
    }

    fn begin_drain(&mut self) {
        let grace = self.cur.fwd.snapshot.config.proxy.shutdown_grace;
        tracing::info!(
            worker = self.index,
            connections = self.endpoint.open(),
            tcp_connections = self.tcp.as_ref().map_or(0, tcp::Front::open),
            ?grace,
            "draining"
        );
        self.endpoint.drain();
        if let Some(front) = &self.tcp {
            front.drain();
        }
        self.draining = Some(Instant::now() + grace);
        self.touch_all();
    }

    fn close_all(&mut self) {
        for c in self.conns.iter_mut().flatten() {
            let _ = c
                .quic
                .close(true, crate::http::bridge::H3_NO_ERROR, b"shutdown");
        }
        if let Some(front) = &self.tcp {
            front.close_all();
        }
        self.touch_all();
        self.draining = Some(Instant::now() + Duration::from_secs(3600));
    }

    fn touch_all(&mut self) {
        for (slot, c) in self.conns.iter_mut().enumerate() {
            if let Some(conn) = c {
                if !conn.touched {
                    conn.touched = true;
                    self.touched.push(slot);
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
