//! The QUIC endpoint's admission decision, sans-IO: what a worker does with a datagram whose
//! destination connection ID names none of its connections. A function of the packet header,
//! the source address, the time and the endpoint's state (counts of open connections, the
//! new-connection rate, draining), returning a [`Decision`]; the worker loop does the I/O the
//! decision asks for (forward, send Version Negotiation or Retry, hand the Initial to quiche).
//!
//! The rules, in order:
//! 1. Whose packet is it? `spooky_common::cid::place`, the rule the kernel programs follow
//!    too: a packet whose DCID is one of ours goes to the generation and worker it names; any
//!    other DCID (a client's first Initials) to the newest generation, by its hash (with eBPF
//!    steering the kernel already placed a client's first Initials: they are this worker's). A packet of this process owned by another worker is forwarded
//!    to it (once: a forwarded packet is never forwarded again); one of another live process
//!    (a takeover in progress) is dropped, never reset.
//! 2. A short-header packet for a connection nobody has — gone, or of a process that crashed
//!    or finished — gets a Stateless Reset (RFC 9000 §10.3): 43 bytes, only in answer to a
//!    larger packet (so never to a reset), at most [`RESETS_PER_SEC`] per second per worker.
//!    Other packets for unknown connections are dropped.
//! 3. An unsupported version gets Version Negotiation, only in answer to a datagram of at least
//!    1200 bytes (RFC 9000 §5.2.2: no amplification) and at most [`NEGOTIATIONS_PER_SEC`] per
//!    second per worker.
//! 4. A draining endpoint takes no new connection, except one the steering still sends it by
//!    its generation (answering a Retry it sent, or a client DCID that looks like its own).
//! 5. An Initial must come in a datagram of at least 1200 bytes (RFC 9000 §14.1).
//! 6. Connection limits: this worker's share of `quic.max_connections` and of
//!    `quic.max_connections_per_ip`.
//! 7. A token must be a valid Retry token of ours, on an Initial to the connection ID that
//!    Retry chose; without one, a Retry is sent when `quic.retry` asks for it (always, or
//!    above a new-connection rate).
//! 8. Otherwise: accept.

use super::ids::IdFormat;
use super::token;
use crate::config::RetryMode;
use crate::keys::KeyRing;
use quiche::{ConnectionId, Header, Type};
use spooky_common::cid::{self, CidLayout, Place};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// RFC 9000 §14.1: a client's datagram carrying an Initial is at least this long.
pub const MIN_INITIAL_DATAGRAM: usize = 1200;
/// How long a Retry token stays valid.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(30);
/// Bytes of a Stateless Reset we send; we answer only larger packets with one.
pub const RESET_LEN: usize = 43;
/// Stateless Resets a worker sends per second at most (and in one burst).
pub const RESETS_PER_SEC: u32 = 1000;
/// Version Negotiation packets a worker sends per second at most (and in one burst).
pub const NEGOTIATIONS_PER_SEC: u32 = 1000;

/// At most `limit` events per second (a window restarting every second).
#[derive(Debug, Clone, Copy)]
struct PerSecond {
    start: Instant,
    taken: u32,
    limit: u32,
}

impl PerSecond {
    fn new(limit: u32, now: Instant) -> Self {
        Self {
            start: now,
            taken: 0,
            limit,
        }
    }

    /// Whether one more may happen at `now` (and counts it if so).
    fn take(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.start) >= Duration::from_secs(1) {
            self.start = now;
            self.taken = 0;
        }
        if self.taken >= self.limit {
            return false;
        }
        self.taken += 1;
        true
    }
}

/// The time, as the endpoint needs it: a monotonic instant for rates, Unix seconds for
/// tokens (which outlive the process's clock).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    pub unix_secs: u64,
}

impl Now {
    /// The current time (the worker loop's only clock read for admission).
    pub fn read() -> Self {
        Self {
            instant: Instant::now(),
            unix_secs: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

/// The limits a worker enforces on new connections (its share of the process's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most open connections on this worker.
    pub connections: usize,
    /// Most open connections from one client address on this worker (an IPv6 client counts
    /// by its /64, see [`address_key`]).
    pub per_address: u32,
    pub retry: RetryMode,
}

impl Limits {
    /// One worker's share of the configured limits (`ceil(limit / workers)`, so never 0): a
    /// client's connections spread over the workers by connection ID, so each enforces its
    /// part.
    pub fn share(quic: &crate::config::Quic, workers: usize) -> Self {
        let workers = workers.max(1);
        Self {
            connections: quic.max_connections.div_ceil(workers),
            per_address: u32::try_from(quic.max_connections_per_ip.div_ceil(workers))
                .unwrap_or(u32::MAX),
            retry: quic.retry,
        }
    }
}

/// Why a datagram was dropped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not an Initial, and no connection of ours has its DCID (gone, or junk).
    UnknownConnection,
    /// An Initial in a datagram under 1200 bytes.
    ShortInitial,
    /// A token that is not a valid Retry token of ours.
    InvalidToken,
    /// A valid Retry token of ours on an Initial to another connection ID than the one our
    /// Retry chose (a client trying to take over a connection ID it saw: never accepted).
    TokenForAnotherCid,
    /// The endpoint is shutting down and takes no new connection.
    Draining,
    /// Another live process owns it (its generation): never ours to answer.
    OtherGeneration,
    /// A Stateless Reset was due, but the packet is too small to answer or the reset rate
    /// is spent.
    ResetWithheld,
    /// An unsupported version in a datagram under 1200 bytes: no Version Negotiation.
    ShortUnknownVersion,
    /// Version Negotiation was due, but the rate is spent.
    NegotiationWithheld,
    /// A DCID in our layout with another server id: another server's connection (a fleet's
    /// load balancer sent it here). Never answered: a Stateless Reset from us would end it.
    OtherServer,
}

/// Why a new connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// This worker holds its share of `quic.max_connections`.
    Full,
    /// The client address holds its share of `quic.max_connections_per_ip` here.
    PerAddress,
}

/// What to do with a datagram for no known connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Drop(DropReason),
    /// Another worker owns it: hand it over (a misroute).
    Forward {
        owner: usize,
    },
    /// Answer with Version Negotiation.
    NegotiateVersion,
    /// Answer with a Retry from source connection ID `scid` carrying `token` (good only on
    /// an Initial sent to `scid`).
    Retry {
        scid: ConnectionId<'static>,
        token: Vec<u8>,
    },
    /// Answer with a Stateless Reset of [`RESET_LEN`] bytes ending in this token.
    Reset {
        token: u128,
    },
    Refuse(Refusal),
    /// Accept a new connection. `odcid` is set when the client came back with a valid Retry
    /// token: the original DCID, and the packet's DCID is the CID we chose in the Retry.
    Accept {
        odcid: Option<ConnectionId<'static>>,
    },
}

/// The processes steering knows, as one endpoint sees them: its own generation, the newest
/// one (where new connections go), and the workers of every live generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generations {
    pub own: u8,
    pub newest: u8,
    /// Workers of the live process of each generation; 0 for generations nobody owns.
    pub workers: [u32; 8],
    /// Key of the hash placing client-chosen DCIDs (`cid::fnv1a32_keyed`), the one the
    /// steering uses.
    pub hash_key: u32,
    /// Bit `w`: worker `w` of this process died. New connections go around it; packets of
    /// its connections are nobody's (they get a Stateless Reset).
    pub dead: crate::board::WorkerSet,
}

impl Generations {
    /// A process alone: generation `own` with `workers` workers.
    pub fn alone(own: u8, workers: usize) -> Self {
        let mut w = [0; 8];
        if let Some(slot) = w.get_mut(usize::from(own)) {
            *slot = u32::try_from(workers).unwrap_or(u32::MAX);
        }
        Self {
            own,
            newest: own,
            workers: w,
            hash_key: 0,
            dead: Default::default(),
        }
    }

    fn is_dead(&self, generation: u8, worker: u32) -> bool {
        generation == self.own && self.dead.contains(worker as usize)
    }

    /// The first live worker of this process at or after `worker` (wrapping).
    fn live_from(&self, worker: u32) -> u32 {
        let n = self.workers_of(self.own);
        (0..n)
            .map(|step| (worker + step) % n.max(1))
            .find(|w| !self.is_dead(self.own, *w))
            .unwrap_or(worker)
    }

    fn workers_of(&self, generation: u8) -> u32 {
        self.workers
            .get(usize::from(generation))
            .copied()
            .unwrap_or(0)
    }
}

/// What the per-address connection limit counts by: an IPv4 address, or an IPv6 client's /64
/// (one subscriber's prefix: a host that owns a /64 can use any of its 2^64 addresses, so
/// counting /128s would not limit it). An IPv4-mapped IPv6 address counts as its IPv4 address.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

/// One worker's admission state.
#[derive(Debug)]
pub struct Endpoint {
    worker: usize,
    generations: Generations,
    kernel_places_initials: bool,
    layout: CidLayout,
    limits: Limits,
    open: usize,
    /// Open connections by [`address_key`].
    per_address: HashMap<IpAddr, u32>,
    /// Start of the current one-second window and the connections accepted in it.
    window: (Instant, u32),
    /// Stateless Resets sent in the current second.
    resets: PerSecond,
    /// Version Negotiation packets sent in the current second.
    negotiations: PerSecond,
    draining: bool,
    /// Our server id (`quic.server_id`).
    server_id: Vec<u8>,
    /// Which server an ID names; `None`: not checked.
    ids: Option<std::sync::Arc<IdFormat>>,
}

impl Endpoint {
    /// Worker `worker` of the process of `generations.own`, whose connection IDs have
    /// `layout`. `kernel_places_initials`: an eBPF program places new connections (skipping
    /// dead workers), so a new connection that reaches this worker is this worker's.
    pub fn new(
        worker: usize,
        generations: Generations,
        kernel_places_initials: bool,
        layout: CidLayout,
        limits: Limits,
        now: Instant,
    ) -> Self {
        Self {
            worker,
            generations,
            kernel_places_initials,
            layout,
            limits,
            open: 0,
            per_address: HashMap::new(),
            window: (now, 0),
            resets: PerSecond::new(RESETS_PER_SEC, now),
            negotiations: PerSecond::new(NEGOTIATIONS_PER_SEC, now),
            draining: false,
            server_id: Vec::new(),
            ids: None,
        }
    }

    /// Our server id (`quic.server_id`) and the format that says which server an ID names:
    /// packets other than Initials whose DCID names another server are dropped
    /// ([`DropReason::OtherServer`]), never reset.
    pub fn set_server_id(&mut self, ids: std::sync::Arc<IdFormat>, server_id: &[u8]) {
        self.server_id = server_id.to_vec();
        self.ids = Some(ids);
    }

    /// Whether `dcid` is one of our layout's naming a server that is not ours (another host
    /// of the fleet owns it), or minted under a load balancer configuration we do not have.
    pub fn other_server(&self, dcid: &[u8]) -> bool {
        self.ids
            .as_ref()
            .is_some_and(|ids| ids.names_another_server(dcid, &self.server_id))
    }

    /// The server id `dcid` names when it is another server's (for forwarding there); `None`
    /// for ours, for IDs not in our layout, and for IDs of a config we cannot read.
    pub fn other_server_id(&self, dcid: &[u8]) -> Option<Vec<u8>> {
        self.ids
            .as_ref()?
            .server_id_of(dcid)
            .filter(|id| *id != self.server_id)
    }

    /// The processes steering knows changed (a takeover began or ended).
    pub fn set_generations(&mut self, generations: Generations) {
        self.generations = generations;
    }

    /// New limits (a configuration reload); open connections stay.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// From now on no new connection is accepted.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Connections open on this worker.
    pub fn open(&self) -> usize {
        self.open
    }

    /// A connection from `ip` was opened (after [`Decision::Accept`]).
    pub fn opened(&mut self, ip: IpAddr) {
        self.open += 1;
        *self.per_address.entry(address_key(ip)).or_insert(0) += 1;
    }

    /// A connection from `ip` is gone.
    pub fn closed(&mut self, ip: IpAddr) {
        self.open = self.open.saturating_sub(1);
        let key = address_key(ip);
        if let Some(n) = self.per_address.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_address.remove(&key);
            }
        }
    }

    /// Client addresses (by [`address_key`]) with a connection open here.
    pub fn addresses(&self) -> usize {
        self.per_address.len()
    }

    /// Decides for a datagram of `datagram_len` bytes from `from` whose header is `hdr` and
    /// whose DCID names none of this worker's connections. `forwarded`: another worker
    /// handed it over. `retry_scid` mints the source connection ID of a Retry, when one is
    /// sent (one of this worker's, placed so that the client's next Initials reach it).
    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        &mut self,
        hdr: &Header<'_>,
        datagram_len: usize,
        from: SocketAddr,
        forwarded: bool,
        keys: &KeyRing,
        now: Now,
        retry_scid: impl FnOnce() -> ConnectionId<'static>,
    ) -> Decision {
        let given = hdr.token.as_deref().unwrap_or(&[]);
        if hdr.ty != Type::Initial && self.other_server(&hdr.dcid) {
            return Decision::Drop(DropReason::OtherServer);
        }
        let own = self.generations.own;
        let ours = self.layout.generation_of(&hdr.dcid) == Some(own);
        // A client's first Initials (no token, a DCID it chose). The kernel programs placed
        // them, by its hash or, for a DCID that only looks like one of ours, by its worker
        // byte: the worker they reached takes them.
        let fresh = hdr.ty == Type::Initial && given.is_empty();
        let place = if fresh && self.kernel_places_initials {
            Place::Worker {
                generation: if ours { own } else { self.generations.newest },
                worker: self.worker as u32,
                by_cid: false,
            }
        } else {
            let g = &self.generations;
            let initial = hdr.ty == Type::Initial;
            cid::place(
                &self.layout,
                &hdr.dcid,
                initial,
                g.hash_key,
                g.newest,
                |x| g.workers_of(x),
            )
        };
        // A dead worker of ours: its connections are gone, new ones go to the next live one.
        let place = match place {
            Place::Worker {
                generation,
                worker,
                by_cid: true,
            } if self.generations.is_dead(generation, worker) => Place::Unowned,
            Place::Worker {
                generation,
                worker,
                by_cid: false,
            } if self.generations.is_dead(generation, worker) => Place::Worker {
                generation,
                worker: self.generations.live_from(worker),
                by_cid: false,
            },
            other => other,
        };
        match place {
            Place::Worker { generation, .. } if generation != own => {
                return Decision::Drop(DropReason::OtherGeneration);
            }
            Place::Worker { worker, .. } if worker as usize != self.worker && !forwarded => {
                return Decision::Forward {
                    owner: worker as usize,
                };
            }
            _ if hdr.ty == Type::Short => return self.reset(&hdr.dcid, datagram_len, keys, now),
            Place::Worker { .. } if hdr.ty == Type::Initial => {}
            _ => return Decision::Drop(DropReason::UnknownConnection),
        }
        if !quiche::version_is_supported(hdr.version) {
            if datagram_len < MIN_INITIAL_DATAGRAM {
                return Decision::Drop(DropReason::ShortUnknownVersion);
            }
            if !self.negotiations.take(now.instant) {
                return Decision::Drop(DropReason::NegotiationWithheld);
            }
            return Decision::NegotiateVersion;
        }
        // Draining, only what the steering still sends here by our generation: the answer to
        // a Retry we sent, or a client's first Initial whose DCID happens to look like ours
        // (its connection gets GOAWAY at once and the client moves on).
        if self.draining && !ours {
            return Decision::Drop(DropReason::Draining);
        }
        if datagram_len < MIN_INITIAL_DATAGRAM {
            return Decision::Drop(DropReason::ShortInitial);
        }
        if self.open >= self.limits.connections {
            return Decision::Refuse(Refusal::Full);
        }
        let from_here = self.per_address.get(&address_key(from.ip()));
        if from_here.copied().unwrap_or(0) >= self.limits.per_address {
            return Decision::Refuse(Refusal::PerAddress);
        }
        let odcid = if given.is_empty() {
            if self.retry_wanted(now.instant) {
                let scid = retry_scid();
                let token = token::mint(keys, &hdr.dcid, &scid, &from, now.unix_secs);
                return Decision::Retry { scid, token };
            }
            None
        } else {
            match token::validate(keys, given, &from, now.unix_secs, TOKEN_LIFETIME) {
                // Only on an Initial to the ID our Retry chose: the connection takes that ID
                // as its own, and its reset token goes to the client (see `token`).
                Ok(v) if v.retry_scid.as_ref() == hdr.dcid.as_ref() => Some(v.odcid),
                Ok(_) => return Decision::Drop(DropReason::TokenForAnotherCid),
                Err(_) => return Decision::Drop(DropReason::InvalidToken),
            }
        };
        self.count_new_connection(now.instant);
        Decision::Accept { odcid }
    }

    /// A Stateless Reset for `dcid`, when the packet is large enough to answer and the rate
    /// allows.
    fn reset(&mut self, dcid: &[u8], datagram_len: usize, keys: &KeyRing, now: Now) -> Decision {
        if datagram_len <= RESET_LEN || !self.resets.take(now.instant) {
            return Decision::Drop(DropReason::ResetWithheld);
        }
        Decision::Reset {
            token: token::reset_token(keys, dcid),
        }
    }

    fn retry_wanted(&self, now: Instant) -> bool {
        match self.limits.retry {
            RetryMode::Off => false,
            RetryMode::Always => true,
            RetryMode::Auto {
                new_connections_per_sec,
            } => {
                let (start, count) = self.window;
                now.saturating_duration_since(start) < Duration::from_secs(1)
                    && count >= new_connections_per_sec
            }
        }
    }

    fn count_new_connection(&mut self, now: Instant) {
        let (start, count) = self.window;
        self.window = if now.saturating_duration_since(start) >= Duration::from_secs(1) {
            (now, 1)
        } else {
            (start, count.saturating_add(1))
        };
    }
}

#[cfg(test)]
mod tests;
