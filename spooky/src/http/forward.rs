//! The request task, one per forwarded request (on the worker's `LocalSet`): pick a backend,
//! open an HTTP/2 stream on the worker's pool, pump the request body and trailers up and the
//! response head, body and trailers down through the stream's bounded exchange
//! ([`super::exchange`]). How a failure is answered, logged and counted is
//! [`super::outcome`]'s decision; this file only finds out what happened.

mod tunnel;

use super::bridge::{self, Hop, RequestHead};
use super::exchange::{RequestEvent, TaskEnd};
use super::outcome::{self, Failure, Finished, Reaction};
use super::{rules, Client, Forwarder};
use crate::lb::{self, Candidates};
use crate::stats::RouteMetrics;
use crate::upstream::{h1, BackendPool, ErrorKind, Sender, UpstreamError};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Smallest DATA frame the request pump waits for window to send (unless less remains).
const MIN_DATA_FRAME: usize = 4096;
/// Request body kept for sending again when a backend refuses a stream before processing it
/// (REFUSED_STREAM, or above a GOAWAY's last stream id): a body up to this size is retried on
/// a fresh connection, a longer one is not (the client gets 502).
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// The request as taken from the exchange so far, for a retry after a refused stream: the
/// body chunks (as long as they total at most [`REPLAY_LIMIT`]) and the end with its
/// trailers. Kept until the response head arrives; a retry sends all of it again first.
#[derive(Default)]
struct Replay {
    chunks: Vec<Bytes>,
    bytes: usize,
    /// The client's end of the body, once taken (with trailers, if any).
    end: Option<Option<http::HeaderMap>>,
    /// Not everything taken is kept (too long, or the response head came): no retry.
    closed: bool,
}

impl Replay {
    /// A chunk taken from the exchange.
    fn keep(&mut self, chunk: &Bytes) {
        if self.closed {
            return;
        }
        self.bytes += chunk.len();
        if self.bytes > REPLAY_LIMIT {
            self.close();
        } else {
            self.chunks.push(chunk.clone());
        }
    }

    /// No retry from now on: what was kept goes.
    fn close(&mut self) {
        self.closed = true;
        self.chunks = Vec::new();
    }

    /// The next attempt's stream may carry END_STREAM on its head: no body was taken, and
    /// the end was taken without trailers — or not taken yet, and `rest_is_empty` says the
    /// exchange holds nothing but an end without trailers either.
    fn head_alone(&self, rest_is_empty: bool) -> bool {
        self.bytes == 0
            && match &self.end {
                Some(end) => end.is_none(),
                None => rest_is_empty,
            }
    }
}

/// Everything a request task needs, moved into it.
pub struct Job {
    fwd: Rc<Forwarder>,
    task: TaskEnd,
    head: RequestHead,
    client: Client,
    peer: SocketAddr,
    upstream: usize,
    /// When the request head arrived.
    started: Instant,
    /// The backend finally used, time to its response head, response status and body bytes.
    chosen: Cell<Option<usize>>,
    upstream_latency: Cell<Option<Duration>>,
    status: Cell<u16>,
    bytes_out: Cell<u64>,
    /// What of the request was taken from the exchange, for a retry.
    replay: RefCell<Replay>,
    /// The first backend failure, logged if the request succeeds after all.
    first_failure: RefCell<Option<UpstreamError>>,
}

impl Job {
    pub fn new(
        fwd: Rc<Forwarder>,
        task: TaskEnd,
        head: RequestHead,
        client: Client,
        upstream: usize,
        started: Instant,
    ) -> Self {
        Self {
            fwd,
            task,
            head,
            peer: client.peer,
            client,
            upstream,
            started,
            chosen: Cell::new(None),
            upstream_latency: Cell::new(None),
            status: Cell::new(0),
            bytes_out: Cell::new(0),
            replay: RefCell::new(Replay::default()),
            first_failure: RefCell::new(None),
        }
    }

    /// The backend chosen last, by name.
    fn backend_name(&self) -> Rc<str> {
        let (u, b) = (self.upstream, self.chosen.get().unwrap_or(0));
        self.fwd
            .pools
            .get(u)
            .and_then(|row| row.get(b))
            .map_or_else(|| Rc::from(""), |p| p.connector.backend.clone())
    }

    fn pool_name(&self) -> &str {
        self.fwd
            .snapshot
            .config
            .upstreams
            .get(self.upstream)
            .map_or("", |u| u.name.as_str())
    }
}

/// Counts a request as in flight to a backend for as long as it lives.
struct InFlight<'a>(&'a RouteMetrics, usize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight(self.1, -1);
    }
}

/// Runs one request to completion.
pub async fn run(job: Job, gate: Option<super::HandshakeGate>) {
    // 0-RTT could be a replay: nothing goes upstream before the handshake proves the client
    // is live. A connection that dies first (a replay never completes) drops the gate's
    // sender.
    let live = match gate {
        Some(mut gate) => gate.wait_for(|done| *done).await.is_ok(),
        None => true,
    };
    let timeouts = job
        .fwd
        .snapshot
        .config
        .upstreams
        .get(job.upstream)
        .map(|u| &u.timeouts);
    // A tunnel's limit is its lifetime; a request's, the route's deadline.
    let limit = if job.head.is_websocket() {
        timeouts
            .and_then(|t| t.websocket_lifetime)
            .map(|d| (d, true))
    } else {
        timeouts.and_then(|t| t.request).map(|d| (d, false))
    };
    // The request's work is boxed: this task's future stays small, so spawning it (and
    // the runtime's moves of it) copies a few hundred bytes, not kilobytes, per request.
    let result = match (live, limit) {
        (false, _) => Err(Failure::ClientGone),
        (true, None) => Box::pin(forward(&job)).await,
        // Past its limit a request is answered 504 (or its stream reset once the head went
        // out) and a tunnel closed; its backend stream or connection is dropped, whatever it
        // is doing.
        (true, Some((limit, tunnel))) => tokio::time::timeout(limit, Box::pin(forward(&job)))
            .await
            .unwrap_or_else(|_| {
                Err(if tunnel {
                    Failure::Broken {
                        cause: format!("WebSocket open for its lifetime ({limit:?})"),
                    }
                } else {
                    Failure::Deadline { after: limit }
                })
            }),
    };
    let refusal = result.as_ref().err().and_then(Failure::refusal);
    match result {
        Ok(backend) => {
            if let Some(e) = job.first_failure.take() {
                outcome::log_recovered(job.pool_name(), &e, &job.fwd.services.log_gate);
            }
            tracing::debug!(upstream = job.pool_name(), backend = %backend, status = job.status.get(),
                elapsed_us = job.started.elapsed().as_micros() as u64, "request done");
        }
        Err(failure) => {
            match failure.reaction(job.task.responded()) {
                Reaction::Nothing => {}
                Reaction::Answer {
                    status,
                    fields,
                    body,
                    ..
                } => {
                    job.status.set(status);
                    // A fresh response: these transitions are allowed.
                    let mut fields = fields;
                    job.fwd
                        .finish_head(&mut fields, Some(job.upstream), &job.head.request_id);
                    let _ = job.task.respond(fields);
                    if !body.is_empty() {
                        let _ = job.task.push_body(body);
                    }
                    let _ = job.task.finish(None);
                }
                Reaction::Reset(code) => {
                    let _ = job.task.reset(code);
                }
            }
            failure.log(job.peer, Some(job.pool_name()), &job.fwd.services.log_gate);
        }
    }
    if job.status.get() == 0 {
        job.status.set(outcome::CLIENT_CLOSED);
    }
    outcome::record(
        &job.fwd,
        &Finished {
            client: &job.client,
            head: Some(&job.head),
            upstream: Some(job.upstream),
            backend: job.chosen.get(),
            status: job.status.get(),
            started: job.started,
            upstream_latency: job.upstream_latency.get(),
            refusal,
            bytes_in: job.task.request_bytes(),
            bytes_out: job.bytes_out.get(),
        },
    );
    // Dropping the task's end wakes the loop, which finds the exchange complete.
    drop(job);
}

/// The key a consistent-hash pool hashes for this request.
fn request_hash(job: &Job) -> u64 {
    let upstream = &job.fwd.snapshot.config.upstreams[job.upstream];
    match &upstream.load_balancing {
        crate::config::LoadBalancing::ConsistentHash { key, .. } => {
            lb::request_hash(key, job.peer.ip(), job.head.path_str(), |name| {
                job.head
                    .fields
                    .iter()
                    .filter(move |(n, _)| n.as_ref() == name.as_bytes())
                    .map(|(_, v)| v.as_ref())
                    .collect::<Vec<&[u8]>>()
            })
        }
        _ => 0,
    }
}

fn pick(job: &Job, exclude: Option<usize>) -> Result<usize, Failure> {
    let fwd = &job.fwd;
    let upstream = &fwd.snapshot.config.upstreams[job.upstream];
    let pools = &fwd.pools[job.upstream];
    let plans = &fwd.snapshot.backends[job.upstream];
    // Backends with `max_requests_per_backend` in flight (all workers) take no more.
    let full = |b: usize| {
        upstream
            .max_requests_per_backend
            .is_some_and(|max| fwd.in_flight_total(job.upstream, b) >= i64::from(max))
    };
    let mut healthy: Vec<bool> = (0..pools.len())
        .map(|b| {
            plans.get(b).is_some_and(|p| p.slot.is_available()) && Some(b) != exclude && !full(b)
        })
        .collect();
    let in_flight: Vec<u32> = pools.iter().map(|p| p.in_flight() as u32).collect();
    let hash = request_hash(job);
    let mut balancer = fwd.balancers[job.upstream].borrow_mut();
    if let Some(b) = balancer.pick(
        &Candidates {
            healthy: &healthy,
            in_flight: &in_flight,
        },
        hash,
    ) {
        return Ok(b);
    }
    if upstream.fail_open {
        // Unhealthy ones too, but never one an operator drained.
        healthy.iter_mut().enumerate().for_each(|(b, h)| {
            *h = Some(b) != exclude
                && plans.get(b).is_some_and(|p| !p.slot.is_drained())
                && !full(b);
        });
        if let Some(b) = balancer.pick(
            &Candidates {
                healthy: &healthy,
                in_flight: &in_flight,
            },
            hash,
        ) {
            return Ok(b);
        }
    }
    // Some backend could have taken it but for its limit: the pool is busy, not down.
    let busy = upstream.max_requests_per_backend.is_some()
        && (0..pools.len()).any(|b| {
            Some(b) != exclude
                && plans.get(b).is_some_and(|p| {
                    p.slot.is_available() || upstream.fail_open && !p.slot.is_drained()
                })
                && full(b)
        });
    Err(if busy {
        Failure::BackendsFull {
            pool: upstream.name.clone(),
        }
    } else {
        Failure::NoHealthyBackend {
            pool: upstream.name.clone(),
        }
    })
}

async fn forward(job: &Job) -> Result<Rc<str>, Failure> {
    let fwd = &job.fwd;
    let cfg = &fwd.snapshot.config;
    let hop = Hop {
        client_ip: job.peer.ip(),
        mode: cfg.proxy.forwarded_for(job.peer.ip()),
        via: cfg.proxy.via.then_some(job.client.protocol.version()),
    };
    let fail = |backend: usize, e: UpstreamError| {
        if job.first_failure.borrow().is_none() {
            *job.first_failure.borrow_mut() = Some(e.clone());
        }
        let f = Failure::Upstream(e);
        fwd.report_failure(job.upstream, backend, &f);
        f
    };
    // At most one switch to another backend (refused TCP connect) and one retry on a fresh
    // connection (stream refused before processing), in any order.
    // The route's rules: the path the backend sees, and its fields.
    let up = fwd.snapshot.config.upstreams.get(job.upstream);
    let rewritten = up.and_then(|u| {
        let replacement = u.route.rewrite_prefix.as_deref()?;
        let path = rules::upstream_path(&job.head.path, &u.route.path_prefix, replacement)?;
        let mut head = job.head.clone();
        head.path = path;
        Some(head)
    });
    let mut backend = pick(job, None)?;
    let mut switched = false;
    let mut refreshed = false;
    loop {
        job.chosen.set(Some(backend));
        let pool = fwd.pools[job.upstream][backend].clone();
        let mut request = bridge::to_h2_request(rewritten.as_ref().unwrap_or(&job.head), &hop)
            .map_err(Failure::Convert)?;
        if let Some(up) = up {
            rules::apply_request(&up.request_headers, request.headers_mut());
        }
        let end_of_stream = job.replay.borrow().head_alone(job.task.request_is_empty());
        // Waiting for a connection or a stream slot ends when the client leaves.
        let checkout = tokio::select! {
            biased;
            r = pool.checkout(refreshed, Some(job.peer)) => r,
            () = poll_fn(|cx| job.task.poll_client_gone(cx.waker())) => {
                return Err(Failure::ClientGone);
            }
        };
        let lease = match checkout {
            Ok(l) => l,
            Err(e) => {
                let connect = matches!(e.kind, ErrorKind::Connect | ErrorKind::ConnectTimeout);
                let err = fail(backend, e);
                if connect && !switched {
                    if let Ok(b) = pick(job, Some(backend)) {
                        switched = true;
                        backend = b;
                        continue;
                    }
                }
                return Err(err);
            }
        };
        let attempt = match &lease.send {
            Sender::H2(sender) => {
                let mut sender = sender.clone();
                let (response_fut, send) = match sender.send_request(request, end_of_stream) {
                    Ok(pair) => pair,
                    Err(e) => {
                        let e = UpstreamError::from_h2(&e, &pool.connector.backend);
                        if e.kind == ErrorKind::Refused && !refreshed {
                            refreshed = true;
                            continue;
                        }
                        return Err(fail(backend, e));
                    }
                };
                let name = pool.connector.backend.clone();
                let head = async move {
                    match response_fut.await {
                        Ok(r) => {
                            let (parts, body) = r.into_parts();
                            Ok((parts.status, parts.headers, ResponseBody::H2(body)))
                        }
                        Err(e) => {
                            let e = UpstreamError::from_h2(&e, &name);
                            Err(if e.kind == ErrorKind::Refused {
                                Attempt::Refused(e)
                            } else {
                                Attempt::Upstream(e)
                            })
                        }
                    }
                };
                exchange(job, backend, &pool, head, Sink::H2(send), end_of_stream).await
            }
            Sender::H1(conn) if job.head.is_websocket() => {
                let name = pool.connector.backend.clone();
                let _in_flight = fwd.route_metrics[job.upstream].get(backend).map(|m| {
                    m.in_flight(fwd.services.worker, 1);
                    InFlight(m, fwd.services.worker)
                });
                tunnel::run(job, backend, conn, request, &name).await
            }
            Sender::H1(conn) => {
                let (sink, body) = if end_of_stream {
                    (Sink::Nothing, h1::RequestBody::empty())
                } else {
                    let (tx, body) = h1::RequestBody::channel();
                    (Sink::H1(tx), body)
                };
                let request = h1::to_http1(request, body)
                    .map_err(|e| Failure::Convert(bridge::ConvertError(e)))?;
                let (reused, response) = conn.send(request);
                // A reused connection that fails under an idempotent request may have been
                // closed by the backend while idle: one more try, on a fresh connection.
                let stale_retry = reused && h1::idempotent(&job.head.method);
                let name = pool.connector.backend.clone();
                let head = async move { h1_head(response.await, stale_retry, &name) };
                exchange(job, backend, &pool, head, sink, end_of_stream).await
            }
        };
        match attempt {
            Ok(()) => return Ok(pool.connector.backend.clone()),
            Err(Attempt::Refused(e)) if !refreshed && !job.replay.borrow().closed => {
                tracing::debug!(backend = %e.backend, cause = %e.detail, "request refused before processing, or a kept-alive connection failed under an idempotent one; retrying on a fresh connection");
                refreshed = true;
            }
            Err(Attempt::Refused(e)) => return Err(fail(backend, e)),
            Err(Attempt::Upstream(e)) => return Err(fail(backend, e)),
            Err(Attempt::Failed(f)) => return Err(f),
            Err(Attempt::Closed) => {
                return Err(Failure::Broken {
                    cause: "backend closed the stream under the request body".into(),
                })
            }
        }
        drop(lease);
    }
}

/// The response from an HTTP/1.1 backend as hyper gives it, or why there is none (nothing is
/// retried: a WebSocket upgrade).
fn h1_head_raw(
    result: h1::ResponseResult,
    backend: &Rc<str>,
) -> Result<http::Response<hyper::body::Incoming>, Attempt> {
    result.map_err(|e| Attempt::Upstream(h1_error(&e.error, backend)))
}

/// A response head from an HTTP/1.1 backend, or why there is none.
fn h1_head(
    result: h1::ResponseResult,
    stale_retry: bool,
    backend: &Rc<str>,
) -> Result<Head, Attempt> {
    match result {
        Ok(r) => {
            let (mut parts, body) = r.into_parts();
            h1::strip_connection_named(&mut parts.headers);
            Ok((
                parts.status,
                parts.headers,
                ResponseBody::H1 {
                    body,
                    trailers: None,
                },
            ))
        }
        Err(failed) => {
            let e = h1_error(&failed.error, backend);
            if failed.unsent || (stale_retry && e.kind == ErrorKind::Reset) {
                Err(Attempt::Refused(e))
            } else {
                Err(Attempt::Upstream(e))
            }
        }
    }
}

/// Classifies a hyper error on an HTTP/1.1 backend connection.
fn h1_error(err: &hyper::Error, backend: &Rc<str>) -> UpstreamError {
    if let Some(why) = h1::guard_error(err) {
        return UpstreamError::new(ErrorKind::Protocol, backend, why);
    }
    let kind = if err.is_parse() || err.is_parse_status() || err.is_parse_too_large() {
        ErrorKind::Protocol
    } else if err.is_canceled() {
        ErrorKind::Refused
    } else {
        ErrorKind::Reset
    };
    let mut detail = err.to_string();
    if let Some(source) = std::error::Error::source(err) {
        detail = format!("{detail}: {source}");
    }
    UpstreamError::new(kind, backend, detail)
}

/// A response head: status, fields, and the body to come.
type Head = (StatusCode, HeaderMap, ResponseBody);

/// A response body from either kind of backend connection.
enum ResponseBody {
    H2(h2::RecvStream),
    H1 {
        body: hyper::body::Incoming,
        trailers: Option<HeaderMap>,
    },
}

impl ResponseBody {
    /// The next chunk, or `None` at the end of the data (trailers may follow).
    async fn data(&mut self) -> Option<Result<Bytes, String>> {
        match self {
            Self::H2(body) => body.data().await.map(|r| r.map_err(|e| e.to_string())),
            Self::H1 { body, trailers } => loop {
                let frame =
                    poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut *body), cx)).await?;
                match frame {
                    Err(e) => {
                        let detail = h1::guard_error(&e).unwrap_or_else(|| e.to_string());
                        return Some(Err(detail));
                    }
                    Ok(frame) => match frame.into_data() {
                        Ok(data) => return Some(Ok(data)),
                        Err(frame) => {
                            if let Ok(t) = frame.into_trailers() {
                                *trailers = Some(t);
                            }
                        }
                    },
                }
            },
        }
    }

    /// `n` bytes were passed on: the backend may send more (HTTP/2 flow control).
    fn release(&mut self, n: usize) {
        if let Self::H2(body) = self {
            let _ = body.flow_control().release_capacity(n);
        }
    }

    async fn trailers(&mut self) -> Result<Option<HeaderMap>, String> {
        match self {
            Self::H2(body) => body.trailers().await.map_err(|e| e.to_string()),
            Self::H1 { trailers, .. } => Ok(trailers.take()),
        }
    }
}

/// Where the request body goes.
enum Sink {
    H2(h2::SendStream<Bytes>),
    H1(h1::BodySender),
    /// The request head carried its end: no body to send.
    Nothing,
}

/// How one attempt at a backend ended, when not with a response.
enum Attempt {
    /// The stream was refused before the backend processed it: safe to retry.
    Refused(UpstreamError),
    /// The request body could not go on because the stream closed (the pump stops; the
    /// response future tells what happened).
    Closed,
    /// The backend failed before its response head.
    Upstream(UpstreamError),
    Failed(Failure),
}

/// A request-body failure once the response head is out: whatever it was, the request is
/// broken now (a refusal can no longer be retried).
fn after_head(a: Attempt) -> Result<(), Failure> {
    match a {
        // A complete response before the whole request (RFC 9113 §8.1): the backend does not
        // want the rest.
        Attempt::Closed => Ok(()),
        Attempt::Failed(f) => Err(f),
        Attempt::Refused(e) | Attempt::Upstream(e) => Err(Failure::Broken {
            cause: format!("request body: {e}"),
        }),
    }
}

impl From<Failure> for Attempt {
    fn from(f: Failure) -> Self {
        Attempt::Failed(f)
    }
}

/// One request/response exchange on an open HTTP/2 stream: waits for the head while the
/// request body goes up, then relays body and trailers down.
async fn exchange(
    job: &Job,
    backend: usize,
    pool: &Rc<BackendPool>,
    head: impl Future<Output = Result<Head, Attempt>>,
    sink: Sink,
    end_of_stream: bool,
) -> Result<(), Attempt> {
    let fwd = &job.fwd;
    let worker = fwd.services.worker;
    let timeouts = &fwd.snapshot.config.upstreams[job.upstream].timeouts;
    let backend_name = pool.connector.backend.clone();
    let _in_flight = fwd.route_metrics[job.upstream].get(backend).map(|m| {
        m.in_flight(worker, 1);
        InFlight(m, worker)
    });
    let started = Instant::now();

    let mut pump = std::pin::pin!(pump_request(job, sink, timeouts.idle));
    let mut pump_done = end_of_stream;
    let mut head_fut = std::pin::pin!(tokio::time::timeout(timeouts.response_head, head));
    let response = loop {
        tokio::select! {
            r = &mut head_fut => break r,
            r = &mut pump, if !pump_done => {
                pump_done = true;
                match r {
                    Ok(()) | Err(Attempt::Closed) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    };
    let response = match response {
        Err(_) => {
            return Err(Attempt::Upstream(UpstreamError::new(
                ErrorKind::ResponseTimeout,
                &backend_name,
                format!("no response head within {:?}", timeouts.response_head),
            )));
        }
        Ok(Err(attempt)) => return Err(attempt),
        Ok(Ok(head)) => head,
    };
    // Answered: no retry from here on, and the kept body goes.
    job.replay.borrow_mut().close();
    job.upstream_latency.set(Some(started.elapsed()));
    let (status_code, headers, body) = response;
    let status = status_code.as_u16();
    fwd.report_response(job.upstream, backend, status, started.elapsed());
    job.status.set(status);
    relay_response(
        job,
        &backend_name,
        status_code,
        &headers,
        body,
        pump,
        pump_done,
    )
    .await
}

/// Sends the response head to the client, then the body and trailers as the backend sends
/// them, while `pump` (unless `pump_done`) may still be sending the request body up.
async fn relay_response<P>(
    job: &Job,
    backend_name: &str,
    status_code: StatusCode,
    headers: &HeaderMap,
    mut body: ResponseBody,
    mut pump: Pin<&mut P>,
    mut pump_done: bool,
) -> Result<(), Attempt>
where
    P: Future<Output = Result<(), Attempt>>,
{
    let fwd = &job.fwd;
    let timeouts = &fwd.snapshot.config.upstreams[job.upstream].timeouts;
    // The first response head of this exchange.
    let mut fields = bridge::response_to_h3(status_code, headers);

    fwd.finish_head(&mut fields, Some(job.upstream), &job.head.request_id);
    let _ = job.task.respond(fields);

    // Body down, while the request body may still be going up.
    loop {
        let next = async {
            poll_fn(|cx| job.task.poll_response_room(cx.waker()))
                .await
                .map_err(|_| Failure::ClientGone)?;
            match tokio::time::timeout(timeouts.idle, body.data()).await {
                Err(_) => Err(Failure::Broken {
                    cause: format!(
                        "backend {backend_name}: response body idle for {:?}",
                        timeouts.idle
                    ),
                }),
                Ok(None) => Ok(None),
                Ok(Some(Err(e))) => Err(Failure::Broken {
                    cause: format!("backend {backend_name}: {e}"),
                }),
                Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
            }
        };
        let chunk = tokio::select! {
            r = next => r?,
            r = &mut pump, if !pump_done => {
                pump_done = true;
                if let Err(a) = r {
                    after_head(a)?;
                }
                continue;
            }
        };
        let Some(chunk) = chunk else { break };
        if chunk.is_empty() {
            // h2 hands over the empty frame that carried END_STREAM.
            continue;
        }
        let n = chunk.len();
        job.bytes_out.set(job.bytes_out.get() + n as u64);
        // The head went out above and the end only comes after this loop.
        let _ = job.task.push_body(chunk);
        body.release(n);
    }
    let trailers = match tokio::time::timeout(timeouts.idle, body.trailers()).await {
        Err(_) => {
            return Err(Failure::Broken {
                cause: format!("backend {backend_name}: trailers idle"),
            }
            .into())
        }
        Ok(Err(e)) => {
            return Err(Failure::Broken {
                cause: format!("backend {backend_name}: {e}"),
            }
            .into())
        }
        Ok(Ok(t)) => t,
    };
    let _ = job
        .task
        .finish(trailers.as_ref().map(bridge::trailers_to_h3));
    // The response is complete: a request body still being sent is cancelled upstream when
    // `pump` is dropped on return (RFC 9113 §8.1 allows the early response).
    Ok(())
}

/// Moves the client's request body and trailers to the backend: into the HTTP/2 stream,
/// reserving HTTP/2 send capacity before each write so nothing piles up unbounded inside h2,
/// or into the HTTP/1.1 body channel, whose capacity does the same. What an earlier attempt
/// took from the exchange (kept in the job's [`Replay`]) goes first.
async fn pump_request(job: &Job, sink: Sink, idle: Duration) -> Result<(), Attempt> {
    match sink {
        Sink::H2(send) => pump_h2(job, send, idle).await,
        Sink::H1(tx) => pump_h1(job, tx, idle).await,
        Sink::Nothing => Ok(()),
    }
}

/// The next piece of the request body: from the replay first, then from the exchange.
async fn next_event(job: &Job, replayed: &mut usize, idle: Duration) -> Option<RequestEvent> {
    let again = {
        let replay = job.replay.borrow();
        match replay.chunks.get(*replayed) {
            Some(chunk) => Some(RequestEvent::Data(chunk.clone())),
            None => replay.end.clone().map(RequestEvent::End),
        }
    };
    if let Some(event) = again {
        *replayed += 1;
        return Some(event);
    }
    let polled = poll_fn(|cx| job.task.poll_request(cx.waker()));
    let event = tokio::time::timeout(idle, polled).await.ok()?;
    let mut replay = job.replay.borrow_mut();
    match &event {
        RequestEvent::Data(chunk) => {
            replay.keep(chunk);
            *replayed = replay.chunks.len();
        }
        RequestEvent::End(trailers) => replay.end = Some(trailers.clone()),
        _ => {}
    }
    Some(event)
}

async fn pump_h1(job: &Job, tx: h1::BodySender, idle: Duration) -> Result<(), Attempt> {
    use http_body::Frame;
    let mut replayed = 0;
    loop {
        let Some(event) = next_event(job, &mut replayed, idle).await else {
            tx.abort("request body idle");
            return Err(Failure::BodyIdle { idle }.into());
        };
        match event {
            RequestEvent::Data(data) => {
                // The connection stopped reading the body: the response says why.
                tx.send(Frame::data(data))
                    .await
                    .map_err(|()| Attempt::Closed)?;
            }
            RequestEvent::End(Some(trailers)) => {
                // Sent when the request declared them in `trailer` (hyper's rule for
                // chunked trailers); dropped otherwise.
                return tx
                    .send(Frame::trailers(trailers))
                    .await
                    .map_err(|()| Attempt::Closed);
            }
            // Dropping the sender ends the body.
            RequestEvent::End(None) => return Ok(()),
            RequestEvent::Aborted => {
                tx.abort("the client abandoned the request");
                return Err(Failure::ClientGone.into());
            }
            RequestEvent::TooLarge => {
                tx.abort("request body over the limit");
                return Err(Failure::BodyTooLarge {
                    limit: job.task.request_limit().unwrap_or(0),
                }
                .into());
            }
        }
    }
}

async fn pump_h2(
    job: &Job,
    mut send: h2::SendStream<Bytes>,
    idle: Duration,
) -> Result<(), Attempt> {
    let backend = job.backend_name();
    // A refused stream can be retried (the caller decides); anything else breaks the request.
    let failed = |what: &str, e: &h2::Error| {
        let e = UpstreamError::from_h2(e, &backend);
        if e.kind == ErrorKind::Refused {
            Attempt::Refused(e)
        } else {
            Attempt::Failed(Failure::Broken {
                cause: format!("request {what}: {e}"),
            })
        }
    };
    let mut replayed = 0;
    loop {
        let Some(event) = next_event(job, &mut replayed, idle).await else {
            send.send_reset(h2::Reason::CANCEL);
            return Err(Failure::BodyIdle { idle }.into());
        };
        match event {
            RequestEvent::Data(mut data) => {
                while !data.is_empty() {
                    send.reserve_capacity(data.len());
                    // Wait for a window worth a frame: trickling tiny DATA frames wastes both
                    // sides' CPU and trips h2's small-frame flood protection on echoing peers.
                    let want = data.len().min(MIN_DATA_FRAME);
                    let mut small_grants = 0;
                    let cap = loop {
                        match poll_fn(|cx| send.poll_capacity(cx)).await {
                            Some(Ok(n)) if n >= want || (n > 0 && small_grants >= 16) => break n,
                            Some(Ok(_)) => small_grants += 1,
                            Some(Err(e)) => return Err(failed("body", &e)),
                            // The stream closed under the body: the response says why
                            // (a refusal, a reset, or a complete early response).
                            None => return Err(Attempt::Closed),
                        }
                    };
                    let chunk = data.split_to(cap.min(data.len()));
                    send.send_data(chunk, false)
                        .map_err(|e| failed("body", &e))?;
                }
            }
            RequestEvent::End(Some(trailers)) => {
                return send
                    .send_trailers(trailers)
                    .map_err(|e| failed("trailers", &e));
            }
            RequestEvent::End(None) => {
                return send
                    .send_data(Bytes::new(), true)
                    .map_err(|e| failed("end", &e));
            }
            RequestEvent::Aborted => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(Failure::ClientGone.into());
            }
            RequestEvent::TooLarge => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(Failure::BodyTooLarge {
                    limit: job.task.request_limit().unwrap_or(0),
                }
                .into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_sends_its_head_alone_only_when_no_body_was_taken() {
        let mut r = Replay::default();
        assert!(
            r.head_alone(true),
            "nothing taken, the exchange holds only the end"
        );
        assert!(!r.head_alone(false), "nothing taken, a body still to come");
        r.keep(&Bytes::from_static(b"abc"));
        // The bug this guards against: the end arrived meanwhile, but a body was taken and
        // must be sent again, so the head cannot end the stream.
        assert!(!r.head_alone(true));
        let mut ended = Replay {
            end: Some(None),
            ..Replay::default()
        };
        assert!(
            ended.head_alone(false),
            "the end was taken, without body or trailers"
        );
        ended.end = Some(Some(http::HeaderMap::new()));
        assert!(!ended.head_alone(false), "trailers follow the head");
    }

    #[test]
    fn the_replay_keeps_a_body_up_to_its_limit() {
        let mut r = Replay::default();
        r.keep(&Bytes::from(vec![1; REPLAY_LIMIT - 1]));
        r.keep(&Bytes::from_static(b"x"));
        assert!(!r.closed);
        assert_eq!(r.chunks.len(), 2);
        r.keep(&Bytes::from_static(b"y"));
        assert!(
            r.closed && r.chunks.is_empty(),
            "past the limit: no retry, nothing kept"
        );
        r.keep(&Bytes::from_static(b"z"));
        assert!(r.chunks.is_empty());
    }
}
