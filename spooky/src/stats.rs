//! Counters that live as long as the process, written on the request path and read at scrape
//! time: each worker's [`WorkerStats`], and the per-(pool, backend) request series of the
//! [`Metrics`] registry. Exposition (the Prometheus text) is `ops::metrics`; this module only
//! counts.
//!
//! Hot-path cost: a request's outcome is a handful of relaxed atomic adds on the recording
//! worker's own shard (cache-line aligned, so workers never write the same line); nothing is
//! locked per request. Series are created when a configuration is built (a mutex, off the
//! request path) and live for the whole process, so a reload keeps counting into the same
//! series for pools and backends that keep their names.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The protocol a client spoke for a request (a metrics label and an access-log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/3 over QUIC.
    H3,
    /// HTTP/2 over TLS over TCP.
    H2,
    /// HTTP/1.1 over TLS over TCP.
    H1,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::H3, Protocol::H2, Protocol::H1];

    /// Its version as `via` names it (RFC 9110 §7.6.3).
    pub fn version(self) -> &'static str {
        match self {
            Protocol::H3 => "3",
            Protocol::H2 => "2",
            Protocol::H1 => "1.1",
        }
    }

    /// Its ALPN name, which is also its label.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::H3 => "h3",
            Protocol::H2 => "h2",
            Protocol::H1 => "http/1.1",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one worker, written only by that worker (relaxed atomics), read at scrape time.
#[derive(Default, Debug)]
pub struct WorkerStats {
    pub packets_in: AtomicU64,
    pub packets_out: AtomicU64,
    pub dropped: AtomicU64,
    pub misrouted: AtomicU64,
    pub retry_sent: AtomicU64,
    pub refused: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_active: AtomicU64,
    pub streams_active: AtomicU64,
    /// Configuration snapshots this worker has switched to since start (reloads).
    pub snapshots_applied: AtomicU64,
    pub requests: AtomicU64,
    /// Request streams reset because their head did not arrive in time.
    pub request_head_timeouts: AtomicU64,
    /// Response streams reset because the client took nothing for `quic.send_timeout`.
    pub send_timeouts: AtomicU64,
    /// Stalled response streams reset because their connection or client address held
    /// `quic.max_stalled_streams(_per_ip)` already.
    pub stalled_shed: AtomicU64,
    /// Above `proxy.memory_limit`: requests answered 503 and stalled streams reset.
    pub memory_shed: AtomicU64,
    /// Requests answered 429 because their address had `quic.max_streams_per_ip` open.
    pub streams_refused_per_ip: AtomicU64,
    /// Stateless Resets sent (packets for connections nobody has).
    pub resets_sent: AtomicU64,
    /// Version Negotiation packets sent.
    pub negotiations_sent: AtomicU64,
    /// Token-less Initials for no connection of ours whose DCID looks like one of ours.
    pub lookalike_initials: AtomicU64,
    /// Packets whose DCID is in our layout with another server id (a fleet's load balancer
    /// sent another server's packet here): dropped, never reset.
    pub other_server: AtomicU64,
    /// New connections (QUIC Initials, TCP accepts) refused because the host is drained.
    pub drain_refused: AtomicU64,
    /// Packets of another fleet member's connections sent on to it (GUE).
    pub fleet_forwarded: AtomicU64,
    /// Packets that could not be sent on to a fleet member (send error, too large).
    pub fleet_send_failures: AtomicU64,
    /// Forwarded packets taken from fleet members.
    pub fleet_received: AtomicU64,
    /// Packets on the forwarding port refused: not from a member, or malformed.
    pub fleet_refused: AtomicU64,
    /// Initials whose token is not a valid Retry token of ours for their DCID (forged,
    /// expired, from another address, or aimed at another connection ID).
    pub invalid_tokens: AtomicU64,
    /// Packets of another live process (a takeover in progress) that reached this one:
    /// dropped, never answered (0 while steering works).
    pub foreign: AtomicU64,
    /// Handshakes completed by resuming a session (a ticket; 0-RTT or not).
    pub resumed: AtomicU64,
    /// Requests received in 0-RTT and forwarded at once, with `early-data: 1`.
    pub early_forwarded: AtomicU64,
    /// Requests received in 0-RTT held until the handshake completed (`early_data: defer`).
    pub early_deferred: AtomicU64,
    /// Requests received in 0-RTT answered 425 Too Early (`early_data: reject`).
    pub early_rejected: AtomicU64,
    /// TCP connections accepted, open now, refused over `listen.tcp.max_connections`.
    pub tcp_accepted: AtomicU64,
    pub tcp_active: AtomicU64,
    pub tcp_refused: AtomicU64,
    /// TCP connections refused because their address had `listen.tcp.max_connections_per_ip`
    /// open, or went over `listen.tcp.connection_rate_per_ip`.
    pub tcp_refused_per_ip: AtomicU64,
    pub tcp_rate_limited: AtomicU64,
    /// TLS handshakes over TCP that failed or did not finish within `listen.tcp.header_timeout`.
    pub tcp_handshake_failures: AtomicU64,
    /// TCP connections refused over the PROXY protocol (a header from an untrusted source, or
    /// none or a bad one from a trusted source).
    pub tcp_proxy_refused: AtomicU64,
    /// WebSocket tunnels opened to backends (all fronts).
    pub websockets_opened: AtomicU64,
    /// HTTP/1.1 requests refused as request smuggling (bare LF, content-length with
    /// transfer-encoding, two content-lengths).
    pub http1_smuggling_refused: AtomicU64,
    /// Request tasks that ended without finishing their response (a panic): the client's
    /// stream was reset instead of left hanging.
    pub tasks_unfinished: AtomicU64,
    /// 1 while UDP GSO is used on the worker's socket (0 once the device refused it).
    pub gso_enabled: AtomicU64,
    /// GSO batches the kernel refused (EMSGSIZE, EINVAL, …) and that went out one datagram
    /// at a time.
    pub gso_fallbacks: AtomicU64,
    /// Client addresses (IPv4, or IPv6 /64) with a QUIC connection open on the worker.
    pub client_addresses: AtomicU64,
    /// Requests refused at once (503) because `max_pending_requests` already waited for
    /// their backend.
    pub upstream_overflow: AtomicU64,
    /// Requests that waited the connect timeout for a connection or stream slot (503).
    pub upstream_pending_timeouts: AtomicU64,
    /// Requests failed at once during the back-off after a failed connect to their backend.
    pub upstream_backoff_refusals: AtomicU64,
}

/// Histogram bucket bounds, seconds.
pub const BUCKETS_S: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets including +Inf.
const BUCKETS: usize = BUCKETS_S.len() + 1;

#[derive(Default)]
struct Histogram {
    /// Non-cumulative counts per bucket; the last is +Inf.
    buckets: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

impl Histogram {
    fn record(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS_S
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS_S.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn add_to(&self, t: &mut HistogramTotals) {
        for (sum, b) in t.buckets.iter_mut().zip(&self.buckets) {
            *sum += b.load(Ordering::Relaxed);
        }
        t.sum_us += self.sum_us.load(Ordering::Relaxed);
    }
}

/// Why a route's policy refused a request (`spooky_route_refusals_total`'s `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `access`: 403.
    Access,
    /// `rate_limit`: 429.
    RateLimit,
    /// `max_requests_per_backend`: 503.
    BackendLimit,
    /// `timeouts.request`: 504 (or a reset after the head).
    Deadline,
    /// `max_request_headers` (or `proxy.max_header_list_size`): 431.
    Headers,
    /// `max_request_body`: 413.
    Body,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::Access,
        Refusal::RateLimit,
        Refusal::BackendLimit,
        Refusal::Deadline,
        Refusal::Headers,
        Refusal::Body,
    ];

    /// Its label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Access => "access",
            Refusal::RateLimit => "rate_limit",
            Refusal::BackendLimit => "max_requests_per_backend",
            Refusal::Deadline => "request_timeout",
            Refusal::Headers => "max_request_headers",
            Refusal::Body => "max_request_body",
        }
    }
}

/// Status codes counted one by one: 100 to 599.
const CODES: usize = 500;

#[derive(Default)]
#[repr(align(64))]
struct Shard {
    /// By protocol ([`Protocol`] order), then status class: 1xx … 5xx.
    requests: [[AtomicU64; 5]; 3],
    /// By status code, `code - 100` ([`CODES`] of them).
    codes: Box<[AtomicU64]>,
    /// By [`Refusal`], in [`Refusal::ALL`] order.
    refusals: [AtomicU64; 6],
    duration: Histogram,
    upstream: Histogram,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    in_flight: AtomicI64,
}

/// What one finished request contributes.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub protocol: Protocol,
    pub status: u16,
    pub total: Duration,
    /// Time to the backend's response head, when a backend answered.
    pub upstream: Option<Duration>,
    /// The route policy that refused it, if one did.
    pub refusal: Option<Refusal>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// The series of one (pool, backend) pair; `backend` is empty for answers Spooky gave
/// itself (no route, malformed request, no healthy backend), `pool` empty when no pool was
/// chosen.
pub struct RouteMetrics {
    pub pool: String,
    pub backend: String,
    shards: Box<[Shard]>,
}

/// A histogram summed over the workers: counts per bucket (not cumulative; the last is +Inf).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HistogramTotals {
    pub buckets: [u64; BUCKETS],
    pub sum_us: u64,
}

/// A series summed over the workers, at scrape time.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    /// By protocol ([`Protocol::ALL`] order), then status class: 1xx … 5xx.
    pub requests: [[u64; 5]; 3],
    /// By status code, the codes seen (ascending).
    pub codes: Vec<(u16, u64)>,
    /// By [`Refusal`], in [`Refusal::ALL`] order.
    pub refusals: [u64; 6],
    pub duration: HistogramTotals,
    pub upstream: HistogramTotals,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub in_flight: i64,
}

impl RouteMetrics {
    /// Records a finished request on `worker`'s shard.
    pub fn record(&self, worker: usize, o: &Outcome) {
        let Some(shard) = self.shards.get(worker).or_else(|| self.shards.first()) else {
            return;
        };
        let class = usize::from(o.status / 100).saturating_sub(1).min(4);
        if let Some(c) = shard.requests[o.protocol.index()].get(class) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(c) = shard.codes.get(usize::from(o.status).wrapping_sub(100)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(r) = o.refusal {
            if let Some(i) = Refusal::ALL.iter().position(|x| *x == r) {
                if let Some(c) = shard.refusals.get(i) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        shard.duration.record(o.total);
        if let Some(u) = o.upstream {
            shard.upstream.record(u);
        }
        shard.bytes_in.fetch_add(o.bytes_in, Ordering::Relaxed);
        shard.bytes_out.fetch_add(o.bytes_out, Ordering::Relaxed);
    }

    /// A request to this backend started (`+1`) or ended (`-1`) on `worker`.
    pub fn in_flight(&self, worker: usize, delta: i64) {
        if let Some(shard) = self.shards.get(worker) {
            shard.in_flight.fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// Requests in flight, all workers.
    pub fn in_flight_total(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    /// Everything, summed over the workers.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        let mut codes = [0u64; CODES];
        for s in self.shards.iter() {
            for (sum, c) in codes.iter_mut().zip(s.codes.iter()) {
                *sum += c.load(Ordering::Relaxed);
            }
            for (sum, c) in t.refusals.iter_mut().zip(&s.refusals) {
                *sum += c.load(Ordering::Relaxed);
            }
            for (sums, counts) in t.requests.iter_mut().zip(&s.requests) {
                for (sum, c) in sums.iter_mut().zip(counts) {
                    *sum += c.load(Ordering::Relaxed);
                }
            }
            s.duration.add_to(&mut t.duration);
            s.upstream.add_to(&mut t.upstream);
            t.bytes_in += s.bytes_in.load(Ordering::Relaxed);
            t.bytes_out += s.bytes_out.load(Ordering::Relaxed);
            t.in_flight += s.in_flight.load(Ordering::Relaxed);
        }
        t.codes = (100u16..).zip(codes).filter(|(_, n)| *n > 0).collect();
        t
    }
}

/// Process-wide registry of request series.
pub struct Metrics {
    workers: usize,
    series: Mutex<Vec<Arc<RouteMetrics>>>,
}

impl Metrics {
    pub fn new(workers: usize) -> Self {
        Self {
            workers: workers.max(1),
            series: Mutex::new(Vec::new()),
        }
    }

    /// The series for (`pool`, `backend`), created on first use.
    pub fn route(&self, pool: &str, backend: &str) -> Arc<RouteMetrics> {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = series
            .iter()
            .find(|s| s.pool == pool && s.backend == backend)
        {
            return s.clone();
        }
        let s = Arc::new(RouteMetrics {
            pool: pool.to_owned(),
            backend: backend.to_owned(),
            shards: (0..self.workers)
                .map(|_| Shard {
                    codes: (0..CODES).map(|_| AtomicU64::new(0)).collect(),
                    ..Shard::default()
                })
                .collect(),
        });
        series.push(s.clone());
        s
    }

    /// Drops the series of pools and backends no longer configured (after a reload), so
    /// their lines leave `/metrics`; `keep` says which (pool, backend) pairs stay. Spooky's
    /// own series (empty pool) always stay.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series.retain(|s| s.pool.is_empty() || keep(&s.pool, &s.backend));
    }

    /// Every series, in creation order.
    pub fn all(&self) -> Vec<Arc<RouteMetrics>> {
        self.series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_sum_their_workers_shards() {
        let m = Metrics::new(2);
        let s = m.route("api", "a1");
        assert!(
            Arc::ptr_eq(&s, &m.route("api", "a1")),
            "one series per pair"
        );
        let ok = Outcome {
            protocol: Protocol::H3,
            status: 200,
            total: Duration::from_millis(3),
            upstream: Some(Duration::from_micros(400)),
            refusal: None,
            bytes_in: 10,
            bytes_out: 100,
        };
        s.record(0, &ok);
        s.record(
            1,
            &Outcome {
                status: 503,
                upstream: None,
                ..ok
            },
        );
        s.record(
            1,
            &Outcome {
                protocol: Protocol::H1,
                ..ok
            },
        );
        s.in_flight(0, 1);
        s.in_flight(1, 1);
        s.in_flight(1, -1);
        let t = s.totals();
        assert_eq!(
            t.requests,
            [[0, 1, 0, 0, 1], [0; 5], [0, 1, 0, 0, 0]],
            "by protocol (h3, h2, http/1.1), then class"
        );
        assert_eq!(t.duration.buckets.iter().sum::<u64>(), 3);
        // 3 ms falls in the 5 ms bucket (index 3).
        assert_eq!(t.duration.buckets[3], 3);
        assert_eq!(t.upstream.buckets[0], 2, "400 µs in the 0.5 ms bucket");
        assert_eq!(t.upstream.sum_us, 800);
        assert_eq!((t.bytes_in, t.bytes_out, t.in_flight), (30, 300, 1));
        assert_eq!(t.codes, vec![(200, 2), (503, 1)], "by code");
        s.record(
            0,
            &Outcome {
                status: 429,
                refusal: Some(Refusal::RateLimit),
                ..ok
            },
        );
        let t = s.totals();
        assert_eq!(t.codes, vec![(200, 2), (429, 1), (503, 1)]);
        assert_eq!(t.refusals, [0, 1, 0, 0, 0, 0]);
        assert_eq!(m.all().len(), 1);
        m.route("gone", "g1");
        m.route("", "");
        m.retain(|pool, _| pool == "api");
        let left: Vec<_> = m.all().iter().map(|s| s.pool.clone()).collect();
        assert_eq!(
            left,
            ["api", ""],
            "a removed pool's series goes, Spooky's own stays"
        );
    }
}
