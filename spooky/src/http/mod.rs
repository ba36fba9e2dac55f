//! The HTTP side of the data plane, below the QUIC loop and above the backend pools:
//!
//! | module | what |
//! |---|---|
//! | [`bridge`] | sans-IO: request validation (RFC 9114 §4.3), HTTP/3 ↔ HTTP/2 field conversion |
//! | [`exchange`] | the state of one request stream between the QUIC loop and its request task |
//! | [`outcome`] | every failure → status, HTTP/3 code, health, log line; the metrics/access-log record |
//! | `forward` | the request task: pick a backend, open an HTTP/2 stream, relay both ways |
//!
//! A worker keeps one [`Forwarder`] per configuration snapshot: its pools, balancers and
//! metric series for that snapshot, plus the process-lifetime [`Services`]. The QUIC
//! connection asks [`Forwarder::admit`] what to do with a request head and spawns
//! [`Forwarder::spawn`] for those that go to a backend.

pub mod bridge;
pub(crate) mod exchange;
mod forward;
pub(crate) mod outcome;
pub mod request_id;
pub mod rules;

use crate::health::checker::Reporter;
use crate::health::TrafficOutcome;
use crate::lb::Balancer;
use crate::snapshot::Snapshot;
pub(crate) use crate::stats::Protocol;
use crate::stats::{Metrics, RouteMetrics, WorkerStats};
use crate::telemetry::access_log::AccessLogger;
use crate::telemetry::logging::LogGate;
use crate::upstream::{BackendPool, Connector, PoolLimits};
use bridge::RequestHead;
pub(crate) use exchange::{ConnWaker, Wakeup};
use exchange::{RequestShape, TaskEnd};
use outcome::Failure;
use quiche::h3::{Header, NameValue};
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A request Spooky answers itself, ready to send: the head (with `alt-svc`) and the body,
/// and for HTTP/3 the `STOP_SENDING` code when the request's body is not to be read.
pub(crate) struct LocalAnswer {
    pub fields: Vec<Header>,
    pub body: bytes::Bytes,
    pub stop_sending: Option<u64>,
}

/// Who sent a request and how.
#[derive(Clone, Debug)]
pub(crate) struct Client {
    pub peer: SocketAddr,
    pub protocol: Protocol,
    /// The TLS version of the connection (`TLSv1.3`, `TLSv1.2`; empty for plaintext).
    pub tls_version: &'static str,
    /// The SNI of the connection's ClientHello.
    pub sni: Option<Rc<str>>,
}

/// Opens (`true`) when the connection's handshake is complete; its sender goes away with
/// the connection. A request that arrived in 0-RTT with an unsafe method waits on it.
pub(crate) type HandshakeGate = tokio::sync::watch::Receiver<bool>;

/// What one worker's request tasks use for the whole life of the process.
pub(crate) struct Services {
    pub worker: usize,
    /// Workers of the process (limits shared among them).
    pub workers: usize,
    pub stats: Arc<WorkerStats>,
    pub metrics: Arc<Metrics>,
    pub access_log: Arc<AccessLogger>,
    pub health: Reporter,
    /// The QUIC connections the worker loop is to service (woken by their exchanges).
    pub wakeup: Rc<Wakeup>,
    /// The rate limit on the log lines clients can cause.
    pub log_gate: LogGate,
    /// Rate limits and per-address counts shared by the workers.
    pub policy: Arc<crate::policy::Policy>,
}

/// One success in this many is sent to the health checker (as a latency sample).
const SUCCESS_SAMPLE: u32 = 32;

/// A worker's forwarding state for one configuration snapshot.
pub(crate) struct Forwarder {
    pub services: Rc<Services>,
    pub snapshot: Arc<Snapshot>,
    /// `[upstream][backend]`.
    pools: Vec<Vec<Rc<BackendPool>>>,
    balancers: Vec<RefCell<Balancer>>,
    /// `[upstream][backend]`, plus one last series per upstream for answers without a backend.
    route_metrics: Vec<Vec<Arc<RouteMetrics>>>,
    /// Answers given before any upstream was chosen (malformed, no route).
    local_metrics: Arc<RouteMetrics>,
    /// `[upstream][backend]`: (last outcome sent was a failure, successes seen) for passive
    /// health sampling.
    passive: Vec<Vec<Cell<(bool, u32)>>>,
    /// `[upstream]`: the route's rate limiter (shared by the workers), when it has one.
    limiters: Vec<Option<Arc<crate::policy::RouteLimiter>>>,
}

/// What to do with a request head.
pub(crate) enum Admission {
    /// Send it to upstream `upstream`; the exchange has this shape.
    Forward {
        head: RequestHead,
        upstream: usize,
        shape: RequestShape,
    },
    /// Answer it with `OPTIONS *`'s answer.
    Options(RequestHead),
    /// Answer it with upstream `upstream`'s redirect.
    Redirect { head: RequestHead, upstream: usize },
    /// Refuse it (a local answer); the head, when it was valid.
    Refuse(Failure, Option<RequestHead>),
    /// Refuse it by the policy of upstream `upstream`'s route (access, rate, header limit).
    Policy {
        failure: Failure,
        head: RequestHead,
        upstream: usize,
    },
}

impl Forwarder {
    /// The forwarding state for `snapshot`. Pools of `previous` are kept for backends whose
    /// id, address, TLS settings and connect timeout did not change, so their connections
    /// carry over a reload.
    pub fn new(
        services: Rc<Services>,
        snapshot: Arc<Snapshot>,
        previous: Option<&Forwarder>,
    ) -> Self {
        let cfg = &snapshot.config;
        let mut pools = Vec::with_capacity(cfg.upstreams.len());
        let mut balancers = Vec::with_capacity(cfg.upstreams.len());
        for (u, up) in cfg.upstreams.iter().enumerate() {
            let mut row = Vec::with_capacity(up.backends.len());
            // This worker's share of the pool's waiting room, per backend.
            let limits = PoolLimits {
                max_pending: (up.max_pending_requests as usize).div_ceil(services.workers.max(1)),
            };
            for (b, backend) in up.backends.iter().enumerate() {
                let reuse = previous.and_then(|p| p.pool_for(backend, up));
                row.push(match reuse {
                    Some(pool) => {
                        pool.set_limits(limits);
                        pool
                    }
                    None => {
                        let tls = snapshot.backend(u, b).and_then(|p| p.tls.clone());
                        let connector = Connector::new(
                            backend,
                            tls,
                            up.timeouts.connect,
                            up.send_proxy_protocol,
                        );
                        Rc::new(BackendPool::new(
                            connector,
                            limits,
                            Some(services.stats.clone()),
                        ))
                    }
                });
            }
            pools.push(row);
            let weights: Vec<u32> = up.backends.iter().map(|b| b.weight).collect();
            let ids: Vec<&str> = up.backends.iter().map(|b| b.id.as_str()).collect();
            let seed = 0x5eed_0000 + services.worker as u64 * 7919 + u as u64;
            balancers.push(RefCell::new(Balancer::with_ids(
                &up.load_balancing,
                &weights,
                &ids,
                seed,
            )));
        }
        let metrics = &services.metrics;
        let route_metrics = cfg
            .upstreams
            .iter()
            .map(|up| {
                let mut row: Vec<_> = up
                    .backends
                    .iter()
                    .map(|b| metrics.route(&up.name, &b.id))
                    .collect();
                row.push(metrics.route(&up.name, ""));
                row
            })
            .collect();
        let local_metrics = metrics.route("", "");
        let passive = cfg
            .upstreams
            .iter()
            .map(|up| up.backends.iter().map(|_| Cell::new((false, 0))).collect())
            .collect();
        let limiters = cfg
            .upstreams
            .iter()
            .map(|up| {
                let limit = up.rate_limit.as_ref()?;
                Some(services.policy.route_limiter(&up.name, limit))
            })
            .collect();
        Self {
            services,
            snapshot,
            pools,
            balancers,
            route_metrics,
            local_metrics,
            passive,
            limiters,
        }
    }

    /// The pool of this forwarder for the same backend, reached the same way.
    fn pool_for(
        &self,
        backend: &crate::config::Backend,
        up: &crate::config::Upstream,
    ) -> Option<Rc<BackendPool>> {
        let cfg = &self.snapshot.config;
        cfg.upstreams.iter().zip(&self.pools).find_map(|(ou, row)| {
            ou.backends.iter().zip(row).find_map(|(ob, pool)| {
                let same = ob.id == backend.id
                    && ob.address == backend.address
                    && ob.tls == backend.tls
                    && ob.protocol == backend.protocol
                    && ou.timeouts.connect == up.timeouts.connect
                    && ou.send_proxy_protocol == up.send_proxy_protocol;
                same.then(|| pool.clone())
            })
        })
    }

    /// What to do with a request head `list` (`more_frames`: a body or trailers follow) from
    /// `client` on a connection whose ClientHello carried `sni`: the memory limit, the checks
    /// of RFC 9114 §4.3 and the limits, whether the connection is the host's, routing, then
    /// the route's policy (access list, rate limit, header limit).
    pub fn admit(
        &self,
        list: &[Header],
        more_frames: bool,
        sni: Option<&str>,
        client: std::net::IpAddr,
    ) -> Admission {
        let proxy = &self.snapshot.config.proxy;
        if crate::telemetry::memory::over(proxy.memory_limit) {
            self.services
                .stats
                .memory_shed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Admission::Refuse(Failure::Overloaded, None);
        }
        // RFC 9114 §4.2.2: the size of a field section counts each field's name, value and 32.
        let size: u64 = list
            .iter()
            .map(|h| (h.name().len() + h.value().len() + 32) as u64)
            .sum();
        if size > proxy.max_header_list_size {
            return Admission::Refuse(Failure::HeadersTooLarge { size }, None);
        }
        let mut head = match bridge::validate_request(list) {
            Ok(h) => h,
            Err(e) => return Admission::Refuse(Failure::Malformed(e), None),
        };
        if proxy.request_id {
            request_id::assign(&mut head, proxy.trusted(client));
        }
        if head.path.as_ref() == b"*" {
            return Admission::Options(head);
        }
        if head.method == http::Method::CONNECT && !head.is_websocket() {
            return Admission::Refuse(Failure::Connect, Some(head));
        }
        if !more_frames && head.content_length.is_some_and(|n| n > 0) {
            return Admission::Refuse(Failure::BodyMissing, Some(head));
        }
        let certs = &self.snapshot.certs;
        if certs.several() {
            let host = crate::routing::host_of(head.authority_str()).unwrap_or("");
            if certs.misdirected(sni, host) {
                return Admission::Refuse(Failure::Misdirected, Some(head));
            }
        }
        let Some(upstream) = self
            .snapshot
            .routes
            .lookup(Some(head.authority_str()), head.path_str())
        else {
            return Admission::Refuse(Failure::NoRoute, Some(head));
        };
        let up = self.snapshot.config.upstreams.get(upstream);
        if let Some(failure) = up.and_then(|u| self.policy(u, upstream, list, size, client)) {
            return Admission::Policy {
                failure,
                head,
                upstream,
            };
        }
        if up.is_some_and(|u| u.redirect.is_some()) {
            return Admission::Redirect { head, upstream };
        }
        // A tunnel's bytes are not a request body: no size limit (its idle timeout applies).
        let limit = up
            .and_then(|u| u.max_request_body)
            .filter(|_| !head.is_websocket());
        if let (Some(limit), Some(declared)) = (limit, head.content_length) {
            if declared > limit {
                return Admission::Refuse(Failure::BodyTooLarge { limit }, Some(head));
            }
        }
        let shape = RequestShape {
            expected: head.content_length,
            limit,
            body_follows: more_frames,
        };
        Admission::Forward {
            head,
            upstream,
            shape,
        }
    }

    /// What the policy of route `u` (`up`) says of a request from `client` with fields `list`
    /// (`size` bytes by RFC 9114's count): nothing when it may go on. The access list, then
    /// the header limit, then the rate limit (a refused request does not spend the budget).
    fn policy(
        &self,
        up: &crate::config::Upstream,
        u: usize,
        list: &[Header],
        size: u64,
        client: std::net::IpAddr,
    ) -> Option<Failure> {
        if !up.access.permits(client) {
            return Some(Failure::Forbidden);
        }
        if up.max_request_headers.is_some_and(|max| size > max) {
            return Some(Failure::HeadersTooLarge { size });
        }
        let limiter = self.limiters.get(u)?.as_ref()?;
        let policy = &self.services.policy;
        let value = match &limiter.limit.key {
            crate::config::RateKey::Header(name) => list
                .iter()
                .find(|h| h.name() == name.as_str().as_bytes())
                .map(|h| h.value()),
            _ => None,
        };
        let key = policy.request_key(&limiter.limit.key, client, value);
        let now = policy.now(Instant::now());
        limiter
            .table
            .check(key, now)
            .err()
            .map(|retry_after| Failure::RateLimited { retry_after })
    }

    /// Starts the request task of an admitted request on the worker's `LocalSet`; with a
    /// `gate` (a request that came in 0-RTT), it contacts no backend before the gate says
    /// the handshake is complete.
    pub fn spawn(
        self: &Rc<Self>,
        task: TaskEnd,
        head: RequestHead,
        upstream: usize,
        client: Client,
        started: Instant,
        gate: Option<HandshakeGate>,
    ) {
        let job = forward::Job::new(self.clone(), task, head, client, upstream, started);
        tokio::task::spawn_local(forward::run(job, gate));
    }

    /// The answer to a request that goes to no backend (`OPTIONS *`, or a refusal), over any
    /// protocol: the refusal logged, the request recorded (metrics, access log), the head
    /// completed. `None` for [`Admission::Forward`], which is not answered here.
    pub fn answer_locally(
        &self,
        admission: Admission,
        client: &Client,
        started: Instant,
    ) -> Option<LocalAnswer> {
        let peer = client.peer;
        let mut upstream = None;
        let mut refusal = None;
        // A route's refusal is a refusal that names its pool.
        let admission = match admission {
            Admission::Policy {
                failure,
                head,
                upstream: u,
            } => {
                upstream = Some(u);
                Admission::Refuse(failure, Some(head))
            }
            other => other,
        };
        let (status, mut fields, body, stop_sending, head) = match admission {
            Admission::Forward { .. } | Admission::Policy { .. } => return None,
            Admission::Options(head) => {
                let (status, fields, body) = outcome::options_answer();
                (status, fields, body, None, Some(head))
            }
            Admission::Redirect { head, upstream: u } => {
                let redirect = self
                    .snapshot
                    .config
                    .upstreams
                    .get(u)
                    .and_then(|up| up.redirect.as_ref())?;
                let (status, fields, body) = rules::redirect_answer(redirect, &head.path);
                upstream = Some(u);
                // The request body, if any, is not wanted.
                (status, fields, body, None, Some(head))
            }
            Admission::Refuse(failure, head) => {
                // A route's policy names its pool; other refusals come before any pool.
                let pool = upstream
                    .and_then(|u| self.snapshot.config.upstreams.get(u))
                    .map(|up| up.name.as_str());
                failure.log(peer, pool, &self.services.log_gate);
                refusal = failure.refusal();
                // Nothing was sent yet: every failure before a head is answered.
                let outcome::Reaction::Answer {
                    status,
                    fields,
                    body,
                    stop_sending,
                } = failure.reaction(false)
                else {
                    return None;
                };
                (status, fields, body, stop_sending, head)
            }
        };
        outcome::record(
            self,
            &outcome::Finished {
                client,
                head: head.as_ref(),
                upstream,
                backend: None,
                status,
                started,
                upstream_latency: None,
                refusal,
                bytes_in: 0,
                bytes_out: 0,
            },
        );
        let id = head.as_ref().map_or(&[][..], |h| &h.request_id[..]);
        self.finish_head(&mut fields, upstream, id);
        Some(LocalAnswer {
            fields,
            body,
            stop_sending,
        })
    }

    /// Completes a response head for the client: the `response_headers` rules of
    /// `upstream` (when the answer is for one), then Spooky's `alt-svc` (`listen.alt_svc`) in
    /// place of any the backend sent.
    pub fn finish_head(
        &self,
        fields: &mut Vec<Header>,
        upstream: Option<usize>,
        request_id: &[u8],
    ) {
        if let Some(up) = upstream.and_then(|u| self.snapshot.config.upstreams.get(u)) {
            rules::apply_response(&up.response_headers, fields);
        }
        if !request_id.is_empty() {
            fields.retain(|h| h.name() != request_id::NAME.as_bytes());
            fields.push(Header::new(request_id::NAME.as_bytes(), request_id));
        }
        if let Some(alt_svc) = &self.snapshot.alt_svc {
            fields.retain(|h| h.name() != b"alt-svc");
            fields.push(Header::new(b"alt-svc", alt_svc.as_bytes()));
        }
    }

    /// Requests in flight to backend `backend` of `upstream`, all workers.
    fn in_flight_total(&self, upstream: usize, backend: usize) -> i64 {
        self.route_metrics
            .get(upstream)
            .and_then(|row| row.get(backend))
            .map_or(0, |s| s.in_flight_total())
    }

    /// The metric series of (`upstream`, `backend`): the backend's, the pool's when no backend
    /// was used, Spooky's own when no pool was chosen.
    fn series(&self, upstream: Option<usize>, backend: Option<usize>) -> &RouteMetrics {
        let Some(row) = upstream.and_then(|u| self.route_metrics.get(u)) else {
            return &self.local_metrics;
        };
        backend
            .and_then(|b| row.get(b))
            .or(row.last())
            .map_or(&self.local_metrics, |s| s)
    }

    /// Passive health: what a failure says about backend `backend` of `upstream`.
    fn report_failure(&self, upstream: usize, backend: usize, failure: &Failure) {
        if let Some(outcome) = failure.passive_health() {
            self.report(upstream, backend, outcome, None);
        }
    }

    /// Passive health: the outcome of a response head, with its latency.
    ///
    /// Successes matter to the health checker only after a failure (they reset the failure
    /// count) and as latency samples, so a worker sends the first success after a failure and
    /// then one in [`SUCCESS_SAMPLE`]: the checker is not woken for every request.
    fn report_response(&self, upstream: usize, backend: usize, status: u16, latency: Duration) {
        let server_errors = self
            .snapshot
            .config
            .upstreams
            .get(upstream)
            .is_some_and(|u| u.passive_health.server_errors);
        let outcome = outcome::response_health(status, server_errors);
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
        self.report(upstream, backend, outcome, Some(latency));
    }

    fn report(
        &self,
        upstream: usize,
        backend: usize,
        outcome: TrafficOutcome,
        latency: Option<Duration>,
    ) {
        if let Some(plan) = self.snapshot.backend(upstream, backend) {
            self.services.health.report(&plan.slot, outcome, latency);
        }
    }
}
