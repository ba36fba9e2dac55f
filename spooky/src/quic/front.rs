//! A worker's QUIC front: its UDP socket of the listener's SO_REUSEPORT group and every QUIC
//! connection whose connection IDs carry its index. The worker loop (`crate::worker`) drives
//! it, a bounded step at a time: [`QuicFront::recv_batch`] feeds up to [`RECV_BATCH`]
//! datagrams to their connections, or asks the [`Endpoint`] what to do with one for no
//! connection (forward to its owner, Version Negotiation, Retry, accept) and does that;
//! [`QuicFront::fire_timers`] runs quiche's due timers; [`QuicFront::service`] services the
//! touched connections (HTTP/3 events, what request tasks produced, the exchanges having woken
//! them through [`crate::http::Wakeup`]) and sends what quiche produced.

use super::conn::{BytesFactory, Conn};
use super::endpoint::{Decision, DropReason, Endpoint, Generations, Limits, Now, RESET_LEN};
use super::fleet::{self, Members};
use super::ids::IdFormat;
use super::send::{Sender, MAX_DATAGRAM};
use super::stall::AddressBook;
use super::token;
use super::udp;
use crate::http::{ConnWaker, Forwarder, Services};
use crate::steering::{self, ProbeBoard};
use quiche::ConnectionId;
use spooky_common::CidLayout;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// Datagrams taken from the socket per step.
pub const RECV_BATCH: usize = 64;

/// A datagram handed from the worker that received it to the worker that owns it.
pub struct Forwarded {
    pub data: Vec<u8>,
    pub from: SocketAddr,
    /// The local address it was sent to.
    pub to: SocketAddr,
}

/// How a datagram reached this worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// Our own socket: the client sent it here.
    Socket,
    /// Another worker of this process handed it over.
    Worker,
    /// Another host of the fleet forwarded it (never forwarded again).
    Fleet,
}

/// What a QUIC front starts with.
pub struct Setup {
    pub index: usize,
    pub workers: usize,
    pub socket: std::net::UdpSocket,
    /// The connection ID format (and the layout steering reads).
    pub ids: Arc<IdFormat>,
    pub rng: ring::rand::SystemRandom,
    pub services: Rc<Services>,
    /// The forwarder of the first snapshot, and its QUIC and HTTP/3 configurations.
    pub current: Current,
    pub peers: Vec<mpsc::Sender<Forwarded>>,
    /// eBPF steering is in force: the kernel places client-chosen DCIDs (skipping workers
    /// marked dead), so an Initial that reaches this worker is this worker's.
    pub kernel_places_initials: bool,
    pub generations: Generations,
    /// Where probes of the classic BPF tier are reported.
    pub probes: Arc<ProbeBoard>,
    /// This worker's socket of the fleet forwarding group (`fleet.listen`), if fleet mode
    /// is on.
    pub fleet: Option<std::net::UdpSocket>,
}

/// What the QUIC front runs with for one snapshot.
pub struct Current {
    pub fwd: Rc<Forwarder>,
    pub qconfig: quiche::Config,
    pub h3config: quiche::h3::Config,
}

/// One worker's QUIC side.
pub struct QuicFront {
    index: usize,
    services: Rc<Services>,
    cur: Current,
    tx: Sender,
    local: SocketAddr,
    endpoint: Endpoint,
    layout: CidLayout,
    mint: Mint,
    /// Connections by slot. Boxed: a `Conn` (with its quiche connection) is kilobytes, and
    /// a slab of them inline would grow by copying and keep up to twice the room it needs.
    conns: Vec<Option<Box<Conn>>>,
    free: Vec<usize>,
    next_gen: u64,
    by_cid: HashMap<ConnectionId<'static>, usize>,
    timers: BTreeSet<(Instant, usize)>,
    peers: Vec<mpsc::Sender<Forwarded>>,
    probes: Arc<ProbeBoard>,
    draining: bool,
    recv_buf: udp::RecvBatch,
    touched: Vec<usize>,
    /// Stalled response streams held per client address (`quic.max_stalled_streams_per_ip`).
    stalls: Rc<AddressBook>,
    fleet: Option<FleetPort>,
}

/// A worker's end of fleet forwarding: its socket of the `fleet.listen` group, the member
/// table of the snapshot in force, and buffers.
struct FleetPort {
    socket: tokio::net::UdpSocket,
    members: Members,
    recv: udp::RecvBatch,
    out: Vec<u8>,
}

impl FleetPort {
    fn members_of(config: &crate::config::Config) -> Members {
        config.fleet.as_ref().map_or_else(Members::default, |f| {
            Members::new(&f.members, &config.quic.server_id)
        })
    }
}

impl QuicFront {
    /// The front on `setup.socket`.
    ///
    /// # Errors
    /// When the socket cannot be registered with the runtime.
    pub fn new(setup: Setup) -> std::io::Result<Self> {
        let worker = setup.index;
        setup.socket.set_nonblocking(true)?;
        let local = setup.socket.local_addr()?;
        let socket = tokio::net::UdpSocket::from_std(setup.socket)?;
        // Coalesced receives where the kernel supports them; `recv_batch` handles both.
        if !udp::enable_gro(&socket) {
            tracing::debug!(worker, "UDP GRO not available");
        }
        let config = &setup.current.fwd.snapshot.config;
        let limits = Limits::share(&config.quic, setup.workers);
        let mut endpoint = Endpoint::new(
            worker,
            setup.generations,
            setup.kernel_places_initials,
            setup.ids.layout(),
            limits,
            Instant::now(),
        );
        let server_id = config.quic.server_id.clone();
        endpoint.set_server_id(setup.ids.clone(), &server_id);
        let fleet = match setup.fleet {
            Some(socket) => {
                socket.set_nonblocking(true)?;
                Some(FleetPort {
                    socket: tokio::net::UdpSocket::from_std(socket)?,
                    members: FleetPort::members_of(config),
                    recv: udp::RecvBatch::new(MAX_DATAGRAM),
                    out: vec![0; MAX_DATAGRAM],
                })
            }
            None => None,
        };
        Ok(Self {
            index: worker,
            tx: Sender::new(socket, setup.services.stats.clone(), worker),
            services: setup.services,
            cur: setup.current,
            local,
            endpoint,
            layout: setup.ids.layout(),
            mint: Mint {
                worker: worker as u8,
                workers: u32::try_from(setup.workers).unwrap_or(u32::MAX),
                ids: setup.ids.clone(),
                server_id,
                hash_key: setup.generations.hash_key,
                rng: setup.rng,
            },
            conns: Vec::new(),
            free: Vec::new(),
            next_gen: 1,
            by_cid: HashMap::new(),
            timers: BTreeSet::new(),
            peers: setup.peers,
            probes: setup.probes,
            draining: false,
            recv_buf: udp::RecvBatch::new(MAX_DATAGRAM),
            touched: Vec::new(),
            stalls: Rc::new(AddressBook::new(setup.workers)),
            fleet,
        })
    }

    /// Resolves when the socket may have datagrams to read.
    ///
    /// # Cancel safety
    /// Cancel-safe.
    pub async fn readable(&self) {
        match &self.fleet {
            Some(f) => tokio::select! {
                _ = self.tx.socket.readable() => {}
                _ = f.socket.readable() => {}
            },
            None => {
                let _ = self.tx.socket.readable().await;
            }
        }
    }

    /// When the earliest connection timer is due.
    pub fn next_timer(&self) -> Option<Instant> {
        self.timers.first().map(|(t, _)| *t)
    }

    /// Connections open (or closing) on this front.
    pub fn open(&self) -> usize {
        self.endpoint.open()
    }

    /// The processes steering knows changed (a takeover began or ended).
    pub fn set_generations(&mut self, g: Generations) {
        tracing::debug!(worker = self.index, ?g, "generations changed");
        self.endpoint.set_generations(g);
    }

    /// Switches to a new snapshot's forwarder and configurations (a reload's commit): new
    /// connections and requests use them, requests in flight keep the forwarder they started
    /// with, connections stay.
    pub fn switch(&mut self, next: Current) {
        let limits = Limits::share(&next.fwd.snapshot.config.quic, self.peers.len());
        self.endpoint.set_limits(limits);
        if let Some(f) = self.fleet.as_mut() {
            f.members = FleetPort::members_of(&next.fwd.snapshot.config);
        }
        self.cur = next;
    }

    /// Up to [`RECV_BATCH`] messages (each a datagram, or several coalesced by GRO) from the
    /// socket, `udp::BATCH` per `recvmmsg`, each fed to its connection or decided by the
    /// endpoint. Returns how many messages were read: [`RECV_BATCH`] means there may be more.
    pub fn recv_batch(&mut self) -> usize {
        let mut total = 0;
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
                // On a wildcard socket, the address the client sent to.
                let to = SocketAddr::new(r.to.unwrap_or(self.local.ip()), self.local.port());
                let mut off = 0;
                while off < len {
                    let end = (off + seg).min(len);
                    self.services
                        .stats
                        .packets_in
                        .fetch_add(1, Ordering::Relaxed);
                    self.on_datagram(&mut data[off..end], r.from, to, Via::Socket);
                    off = end;
                }
            }
            self.recv_buf = batch;
            total += n;
            if n < udp::BATCH {
                break;
            }
        }
        total + self.recv_fleet()
    }

    /// Up to [`udp::BATCH`] packets other hosts of the fleet forwarded: taken only from
    /// members, taken apart, and fed as if the client had sent them here.
    fn recv_fleet(&mut self) -> usize {
        let Some(mut port) = self.fleet.take() else {
            return 0;
        };
        let n = port
            .socket
            .try_io(tokio::io::Interest::READABLE, || {
                port.recv.recv(&port.socket)
            })
            .unwrap_or(0);
        let stats = self.services.stats.clone();
        for i in 0..n {
            let Some((r, data)) = port.recv.message(i) else {
                continue;
            };
            if !port.members.is_member(r.from.ip()) {
                stats.fleet_refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(from = %r.from, "forwarded packet from a host that is no fleet member dropped");
                continue;
            }
            let inner = match fleet::decapsulate(data) {
                Ok(inner) => inner,
                Err(why) => {
                    stats.fleet_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(from = %r.from, ?why, "malformed forwarded packet dropped");
                    continue;
                }
            };
            stats.fleet_received.fetch_add(1, Ordering::Relaxed);
            stats.packets_in.fetch_add(1, Ordering::Relaxed);
            // Addresses as our own socket would have given them (mapped on a dual-stack one).
            let client = same_family(inner.client, self.local);
            let to = same_family(
                SocketAddr::new(inner.server.ip(), self.local.port()),
                self.local,
            );
            self.on_datagram(&mut data[inner.payload], client, to, Via::Fleet);
        }
        self.fleet = Some(port);
        n
    }

    /// A datagram another worker received for one of this worker's connections.
    pub fn on_forwarded(&mut self, f: Forwarded) {
        let mut data = f.data;
        self.on_datagram(&mut data, f.from, f.to, Via::Worker);
    }

    /// Sends a datagram of another host's connection (its DCID names server id `sid`) to that
    /// host, if the fleet knows it; false when it does not.
    fn forward_to_host(
        &mut self,
        sid: &[u8],
        data: &[u8],
        from: SocketAddr,
        to: SocketAddr,
    ) -> bool {
        let Some(port) = self.fleet.as_mut() else {
            return false;
        };
        let Some(member) = port.members.address_of(sid) else {
            return false;
        };
        let stats = &self.services.stats;
        match fleet::encapsulate(from, to, data, &mut port.out) {
            Some(n) => match port.socket.try_send_to(&port.out[..n], member) {
                Ok(_) => {
                    stats.fleet_forwarded.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    stats.fleet_send_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%member, error = %e, "forwarding to a fleet member failed");
                }
            },
            None => {
                stats.fleet_send_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        true
    }

    /// One datagram from `from` to local address `to` (possibly several coalesced QUIC
    /// packets): to its connection, to the fleet member its DCID names, or whatever the
    /// endpoint decides.
    fn on_datagram(&mut self, data: &mut [u8], from: SocketAddr, to: SocketAddr, via: Via) {
        let forwarded = via == Via::Worker;
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
            let _ = self.feed(slot, data, from, to);
            return;
        }
        // Another host's connection (a rebinding or a rehash sent it here): to that host,
        // unless it already came from one.
        // (An encrypted ID is decrypted once, here.)
        if via == Via::Socket {
            if let Some(sid) = self.endpoint.other_server_id(&hdr.dcid) {
                if self.forward_to_host(&sid, data, from, to) {
                    return;
                }
            }
        }
        // A drained host takes no new connection (its open ones go on; Initials of another
        // member's connections were forwarded above).
        if hdr.ty == quiche::Type::Initial && self.services.policy.drained() {
            self.services
                .stats
                .drain_refused
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let fwd = self.cur.fwd.clone();
        let mint = &self.mint;
        let decision = self.endpoint.admit(
            &hdr,
            len,
            from,
            forwarded,
            &fwd.snapshot.keys,
            Now::read(),
            || mint.cid(true),
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
            Decision::Drop(DropReason::InvalidToken | DropReason::TokenForAnotherCid) => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                stats.invalid_tokens.fetch_add(1, Ordering::Relaxed);
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
                        to,
                    });
                }
            }
            Decision::NegotiateVersion => {
                if let Ok(n) = quiche::negotiate_version(&hdr.scid, &hdr.dcid, &mut self.tx.out) {
                    // Counted first: whoever sees the packet sees the count.
                    stats.negotiations_sent.fetch_add(1, Ordering::Relaxed);
                    self.tx.send_now(n, from, to);
                }
            }
            Decision::Refuse(reason) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(client = %from.ip(), ?reason, "connection refused");
            }
            Decision::Reset { token } => {
                let out = &mut self.tx.out[..RESET_LEN];
                let _ = ring::rand::SecureRandom::fill(&self.mint.rng, &mut out[..RESET_LEN - 16]);
                // A short header: form bit clear, fixed bit set, the rest unpredictable.
                out[0] = 0x40 | (out[0] & 0x3f);
                out[RESET_LEN - 16..].copy_from_slice(&token.to_be_bytes());
                self.tx.send_now(RESET_LEN, from, to);
                stats.resets_sent.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(worker = self.index, peer = %from, "stateless reset sent");
            }
            Decision::Retry { scid, token } => {
                if let Ok(n) = quiche::retry(
                    &hdr.scid,
                    &hdr.dcid,
                    &scid,
                    &token,
                    hdr.version,
                    &mut self.tx.out,
                ) {
                    self.tx.send_now(n, from, to);
                    stats.retry_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            Decision::Accept { odcid } => {
                let client_dcid = hdr.dcid.into_owned();
                self.accept(client_dcid, odcid, data, from, to);
            }
        }
    }

    /// Opens the connection the endpoint accepted and feeds it its first Initial.
    fn accept(
        &mut self,
        client_dcid: ConnectionId<'static>,
        odcid: Option<ConnectionId<'static>>,
        data: &mut [u8],
        from: SocketAddr,
        to: SocketAddr,
    ) {
        // After a Retry the client's DCID is the retry SCID we chose: keep it as our SCID.
        let scid = if odcid.is_some() {
            client_dcid.clone()
        } else {
            self.mint.cid(true)
        };
        // The first connection ID's reset token goes in the transport parameters.
        let reset = token::reset_token(&self.cur.fwd.snapshot.keys, &scid);
        self.cur.qconfig.set_stateless_reset_token(Some(reset));
        let quic = match quiche::accept_with_buf_factory::<BytesFactory>(
            &scid,
            odcid.as_ref(),
            to,
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
        let waker = ConnWaker::new(self.services.wakeup.clone(), (slot, gen));
        self.conns[slot] = Some(Box::new(Conn::new(
            quic,
            from,
            gen,
            aliases,
            handshake_deadline,
            self.stalls.clone(),
            waker,
        )));
        self.endpoint.opened(from.ip());
        let stats = self.services.stats.clone();
        stats
            .client_addresses
            .store(self.endpoint.addresses() as u64, Ordering::Relaxed);
        stats.connections_active.fetch_add(1, Ordering::Relaxed);
        if self.feed(slot, data, from, to) {
            stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
        } else if let Some(conn) = self.conns.get_mut(slot).and_then(Option::take) {
            // The Initial did not decrypt (forged or corrupt): keep no state for it.
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.remove(slot, conn);
        }
    }

    /// Feeds a datagram to connection `slot`; false when quiche refused it.
    fn feed(&mut self, slot: usize, data: &mut [u8], from: SocketAddr, to: SocketAddr) -> bool {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        let info = quiche::RecvInfo { from, to };
        let ok = match conn.quic.recv(data, info) {
            Ok(_) => {
                conn.peer = from;
                true
            }
            Err(e) => {
                if conn.quic.local_error().is_some() {
                    tracing::debug!(peer = %from, error = %e, "a packet closed the connection");
                } else {
                    tracing::trace!(error = %e, "recv failed");
                }
                false
            }
        };
        if !conn.touched {
            conn.touched = true;
            self.touched.push(slot);
        }
        ok
    }

    /// Runs quiche's timers that are due.
    pub fn fire_timers(&mut self) {
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

    /// Services every connection that needs it: those whose packets, timers or request tasks
    /// touched them. Sends what quiche produced.
    pub async fn service(&mut self) {
        self.service_dirty();
        self.service_touched().await;
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
            conn.service(&fwd, &self.cur.h3config, self.draining);
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
            let cid = self.mint.cid(false);
            let reset = token::reset_token(&self.cur.fwd.snapshot.keys, &cid);
            if conn.quic.new_scid(&cid, reset, false).is_err() {
                break;
            }
            self.by_cid.insert(cid.clone(), slot);
            conn.aliases.push(cid);
        }
    }

    fn remove(&mut self, slot: usize, mut conn: Box<Conn>) {
        if let Some(e) = conn.quic.local_error() {
            tracing::debug!(peer = %conn.peer, error = e.error_code, app = e.is_app, reason = %String::from_utf8_lossy(&e.reason), "connection closed by us");
        }
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
            .client_addresses
            .store(self.endpoint.addresses() as u64, Ordering::Relaxed);
        self.services
            .stats
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
        self.free.push(slot);
    }

    /// From now on no new connection is accepted; open ones get GOAWAY and close when their
    /// streams are done.
    pub fn drain(&mut self) {
        self.endpoint.drain();
        self.draining = true;
        self.touch_all();
    }

    /// Closes every connection now (the grace period is over).
    pub fn close_all(&mut self) {
        for c in self.conns.iter_mut().flatten() {
            let _ = c
                .quic
                .close(true, crate::http::bridge::H3_NO_ERROR, b"shutdown");
        }
        self.touch_all();
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

/// What a worker mints its connection IDs from: its index, the format, the server id and
/// the placement hash (all fixed for the process's life), and randomness.
struct Mint {
    worker: u8,
    workers: u32,
    ids: Arc<IdFormat>,
    server_id: Vec<u8>,
    hash_key: u32,
    rng: ring::rand::SystemRandom,
}

impl Mint {
    /// A connection ID of this worker. `for_initials`: one a client's Initials will carry
    /// (the handshake's, a Retry's), minted so that the placement of Initials, which hashes
    /// them and never trusts their worker byte, brings them here (`CidLayout::write_placed`).
    fn cid(&self, for_initials: bool) -> ConnectionId<'static> {
        let mut cid = [0u8; 20];
        let fill = |nonce: &mut [u8]| {
            let _ = ring::rand::SecureRandom::fill(&self.rng, nonce);
        };
        let placed = for_initials.then_some((self.hash_key, self.workers));
        let n = self
            .ids
            .write(&self.server_id, self.worker, placed, fill, &mut cid);
        ConnectionId::from_vec(cid[..n].to_vec())
    }
}

/// `addr` in the family of `local`'s socket: IPv4 as IPv4-mapped on an IPv6 one, mapped
/// IPv6 as IPv4 on an IPv4 one.
fn same_family(addr: SocketAddr, local: SocketAddr) -> SocketAddr {
    let ip = match (fleet::canonical(addr.ip()), local) {
        (std::net::IpAddr::V4(v4), SocketAddr::V6(_)) => std::net::IpAddr::V6(v4.to_ipv6_mapped()),
        (ip, _) => ip,
    };
    SocketAddr::new(ip, addr.port())
}
