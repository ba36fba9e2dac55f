//! One task per request (on the worker's `LocalSet`): route, pick a backend, open an HTTP/2
//! stream on the worker's pool, pump the request body and trailers up and the response head,
//! body and trailers down through the stream's bounded buffers ([`crate::http::exchange`]).
//! Failures before the response head become 502/503/504 with one log line naming the
//! upstream, the backend and the cause; failures after it reset the client stream, so a
//! truncated response never looks complete.

use crate::health::TrafficOutcome;
use crate::http::bridge::{self, Hop, RequestHead, H3_INTERNAL_ERROR};
use crate::http::exchange::{ReqEvent, SharedStream};
use crate::lb::{self, Candidates};
use crate::quic::worker::WorkerCtx;
use crate::upstream::{BackendPool, ErrorKind, UpstreamError};
use bytes::Bytes;
use std::cell::Cell;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

/// Smallest DATA frame the request pump waits for window to send (unless less remains).
const MIN_DATA_FRAME: usize = 4096;

/// Everything a request task needs, moved into it.
pub struct Job {
    pub ctx: Rc<WorkerCtx>,
    pub io: SharedStream,
    pub head: RequestHead,
    pub peer: SocketAddr,
    pub upstream: usize,
    /// Wakes the worker loop to flush this connection.
    pub conn: (usize, u64),
    /// When the request head arrived.
    pub started: Instant,
    /// The backend finally used, time to its response head, response body bytes relayed.
    pub chosen: Cell<Option<usize>>,
    pub upstream_latency: Cell<Option<std::time::Duration>>,
    pub bytes_out: Cell<u64>,
    /// Request body bytes went upstream (a refused stream is then not retried).
    pub body_sent: Cell<bool>,
}

/// Counts a request as in flight to a backend for as long as it lives.
struct InFlight<'a>(&'a crate::ops::metrics::RouteMetrics, usize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight(self.1, -1);
    }
}

enum Failure {
    /// Answer locally with this status (nothing sent to the client yet).
    Local(u16, String, Option<u32>),
    /// Something went wrong after the head went out: reset the client stream.
    Reset(String),
    /// The client went away: nothing to answer.
    ClientGone,
}

/// Runs one request to completion.
pub async fn run(job: Job) {
    let result = forward(&job).await;
    let ctx = &job.ctx;
    let upstream = &ctx.shared.config.upstreams[job.upstream];
    {
        let mut io = job.io.borrow_mut();
        match result {
            Ok(backend) => {
                tracing::debug!(upstream = %upstream.name, backend = %backend, status = io.status,
                    elapsed_us = job.started.elapsed().as_micros() as u64, "request done");
            }
            Err(Failure::Local(status, cause, retry_after)) => {
                let reason = match status {
                    503 => "no healthy backend",
                    504 => "upstream timed out",
                    408 => "request body timed out",
                    413 => "request body too large",
                    _ => "bad gateway",
                };
                let (fields, body) = bridge::local_response(status, reason, retry_after);
                if io.resp_head.is_none() {
                    io.respond_local(status, fields, body);
                } else {
                    io.resp_reset = Some(H3_INTERNAL_ERROR);
                }
                tracing::warn!(upstream = %upstream.name, status, cause = %cause, "request failed");
            }
            Err(Failure::Reset(cause)) => {
                io.resp_reset = Some(H3_INTERNAL_ERROR);
                tracing::warn!(upstream = %upstream.name, cause = %cause, "response aborted; client stream reset");
            }
            Err(Failure::ClientGone) => {}
        }
        io.task_done = true;
        if io.status == 0 {
            // The client went away before any answer (nginx's 499).
            io.status = 499;
        }
        let outcome = crate::ops::metrics::Outcome {
            status: io.status,
            total: job.started.elapsed(),
            upstream: job.upstream_latency.get(),
            bytes_in: io.req_received,
            bytes_out: job.bytes_out.get(),
        };
        let row = &ctx.route_metrics[job.upstream];
        let series = job.chosen.get().and_then(|b| row.get(b)).or(row.last());
        if let Some(series) = series {
            series.record(ctx.index, &outcome);
        }
        if ctx.shared.access_log.enabled() {
            let backend = job
                .chosen
                .get()
                .and_then(|b| upstream.backends.get(b))
                .map(|b| b.id.clone());
            ctx.shared.access_log.log(crate::ops::access_log::Record {
                time: std::time::SystemTime::now(),
                client: job.peer,
                host: job.head.authority_str().to_owned(),
                method: job.head.method.to_string(),
                path: job.head.path_str().to_owned(),
                status: outcome.status,
                bytes_in: outcome.bytes_in,
                bytes_out: outcome.bytes_out,
                duration: outcome.total,
                pool: upstream.name.clone(),
                backend: backend.unwrap_or_default(),
                worker: ctx.index,
            });
        }
    }
    ctx.wake(job.conn);
}

/// The key a consistent-hash pool hashes for this request.
fn request_hash(job: &Job) -> u64 {
    let upstream = &job.ctx.shared.config.upstreams[job.upstream];
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
    let ctx = &job.ctx;
    let upstream = &ctx.shared.config.upstreams[job.upstream];
    let pools = &ctx.pools[job.upstream];
    let mut healthy: Vec<bool> = (0..pools.len())
        .map(|b| ctx.shared.health.is_available(job.upstream, b) && Some(b) != exclude)
        .collect();
    let in_flight: Vec<u32> = pools.iter().map(|p| p.in_flight() as u32).collect();
    let hash = request_hash(job);
    let mut balancer = ctx.balancers[job.upstream].borrow_mut();
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
        healthy
            .iter_mut()
            .enumerate()
            .for_each(|(b, h)| *h = Some(b) != exclude);
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
    Err(Failure::Local(
        503,
        format!("no healthy backend in upstream {}", upstream.name),
        Some(1),
    ))
}

async fn forward(job: &Job) -> Result<Rc<str>, Failure> {
    let ctx = &job.ctx;
    let cfg = &ctx.shared.config;
    let upstream = &cfg.upstreams[job.upstream];
    let hop = Hop {
        client_ip: job.peer.ip(),
        mode: cfg.proxy.forwarded,
        via: cfg.proxy.via,
    };
    let fail = |backend: usize, e: UpstreamError| {
        ctx.report(job.upstream, backend, &e);
        tracing::warn!(upstream = %upstream.name, backend = %e.backend, kind = ?e.kind, cause = %e.detail, "upstream failure");
        Failure::Local(e.status(), e.to_string(), None)
    };
    // At most one switch to another backend (refused TCP connect) and one retry on a fresh
    // connection (stream refused before processing), in any order.
    let mut backend = pick(job, None)?;
    let mut switched = false;
    let mut refreshed = false;
    loop {
        job.chosen.set(Some(backend));
        let pool = ctx.pools[job.upstream][backend].clone();
        let request = bridge::to_h2_request(&job.head, &hop)
            .map_err(|e| Failure::Local(502, e.to_string(), None))?;
        let end_of_stream = {
            let io = job.io.borrow();
            io.req_fin && io.req.is_empty() && io.req_trailers.is_none()
        };
        let lease = match pool.checkout(refreshed).await {
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
        let mut sender = lease.send.clone();
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
        match exchange(job, backend, &pool, response_fut, send, end_of_stream).await {
            Ok(()) => return Ok(pool.connector.backend.clone()),
            Err(Attempt::Refused(e)) if !refreshed && !job.body_sent.get() => {
                tracing::debug!(backend = %e.backend, cause = %e.detail, "stream refused before processing; retrying on a fresh connection");
                refreshed = true;
            }
            Err(Attempt::Refused(e)) => return Err(fail(backend, e)),
            Err(Attempt::Failed(f)) => return Err(f),
        }
        drop(lease);
    }
}

/// How one attempt at a backend ended, when not with a response.
enum Attempt {
    /// The stream was refused before the backend processed it: safe to retry.
    Refused(UpstreamError),
    Failed(Failure),
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
    response_fut: h2::client::ResponseFuture,
    send: h2::SendStream<Bytes>,
    end_of_stream: bool,
) -> Result<(), Attempt> {
    let ctx = &job.ctx;
    let upstream = &ctx.shared.config.upstreams[job.upstream];
    let backend_name = pool.connector.backend.clone();
    let metrics_row = &ctx.route_metrics[job.upstream];
    let _in_flight = metrics_row.get(backend).map(|m| {
        m.in_flight(ctx.index, 1);
        InFlight(m, ctx.index)
    });
    let timeouts = &upstream.timeouts;
    let started = Instant::now();

    let mut pump = std::pin::pin!(pump_request(job, send, timeouts.idle));
    let mut pump_done = end_of_stream;
    let mut head_fut = std::pin::pin!(tokio::time::timeout(timeouts.response_head, response_fut));
    let response = loop {
        tokio::select! {
            r = &mut head_fut => break r,
            r = &mut pump, if !pump_done => {
                pump_done = true;
                r?;
            }
        }
    };
    let response = match response {
        Err(_) => {
            let e = UpstreamError::new(
                ErrorKind::ResponseTimeout,
                &backend_name,
                format!("no response head within {:?}", timeouts.response_head),
            );
            ctx.report(job.upstream, backend, &e);
            tracing::warn!(upstream = %upstream.name, backend = %backend_name, cause = %e.detail, "upstream timeout");
            return Err(Failure::Local(504, e.to_string(), None).into());
        }
        Ok(Err(e)) => {
            let e = UpstreamError::from_h2(&e, &backend_name);
            if e.kind == ErrorKind::Refused {
                return Err(Attempt::Refused(e));
            }
            ctx.report(job.upstream, backend, &e);
            tracing::warn!(upstream = %upstream.name, backend = %backend_name, kind = ?e.kind, cause = %e.detail, "upstream failure");
            return Err(Failure::Local(e.status(), e.to_string(), None).into());
        }
        Ok(Ok(r)) => r,
    };
    job.upstream_latency.set(Some(started.elapsed()));
    let (parts, mut body) = response.into_parts();
    let status = parts.status.as_u16();
    ctx.report_outcome(
        job.upstream,
        backend,
        if status >= 500 {
            TrafficOutcome::ServerError
        } else {
            TrafficOutcome::Success
        },
        started.elapsed(),
    );
    {
        let mut io = job.io.borrow_mut();
        io.status = status;
        io.resp_head = Some(bridge::response_to_h3(parts.status, &parts.headers));
    }
    ctx.wake(job.conn);

    // Body down, while the request body may still be going up.
    loop {
        let next = async {
            poll_fn(|cx| job.io.borrow_mut().poll_resp_room(cx.waker()))
                .await
                .map_err(|_| Failure::ClientGone)?;
            match tokio::time::timeout(timeouts.idle, body.data()).await {
                Err(_) => Err(Failure::Reset(format!(
                    "backend {backend_name}: response body idle for {:?}",
                    timeouts.idle
                ))),
                Ok(None) => Ok(None),
                Ok(Some(Err(e))) => Err(Failure::Reset(format!("backend {backend_name}: {e}"))),
                Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
            }
        };
        let chunk = tokio::select! {
            r = next => r?,
            r = &mut pump, if !pump_done => {
                pump_done = true;
                r?;
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
        job.io.borrow_mut().push_resp(chunk);
        let _ = body.flow_control().release_capacity(n);
        ctx.wake(job.conn);
    }
    let trailers = match tokio::time::timeout(timeouts.idle, body.trailers()).await {
        Err(_) => {
            return Err(Failure::Reset(format!("backend {backend_name}: trailers idle")).into())
        }
        Ok(Err(e)) => return Err(Failure::Reset(format!("backend {backend_name}: {e}")).into()),
        Ok(Ok(t)) => t,
    };
    {
        let mut io = job.io.borrow_mut();
        io.resp_trailers = trailers.as_ref().map(bridge::trailers_to_h3);
        io.resp_fin = true;
    }
    ctx.wake(job.conn);
    // The response is complete: a request body still being sent is cancelled upstream when
    // `pump` is dropped on return (RFC 9113 §8.1 allows the early response).
    Ok(())
}

/// Moves the client's request body and trailers into the HTTP/2 stream, reserving HTTP/2
/// send capacity before each write so nothing piles up unbounded inside h2.
async fn pump_request(
    job: &Job,
    mut send: h2::SendStream<Bytes>,
    idle: std::time::Duration,
) -> Result<(), Failure> {
    loop {
        let event = match tokio::time::timeout(
            idle,
            poll_fn(|cx| job.io.borrow_mut().poll_req(cx.waker())),
        )
        .await
        {
            Ok(ev) => ev,
            Err(_) => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(Failure::Local(408, "request body idle".into(), None));
            }
        };
        {
            // The loop may have stopped reading from the client for lack of room.
            let blocked = job.io.borrow().req_read_blocked;
            if blocked {
                job.ctx.wake(job.conn);
            }
        }
        match event {
            ReqEvent::Data(mut data) => {
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
                            Some(Err(e)) => {
                                return Err(Failure::Reset(format!("request body: {e}")))
                            }
                            None => {
                                return Err(Failure::Reset(
                                    "request body: upstream stream closed".into(),
                                ))
                            }
                        }
                    };
                    let chunk = data.split_to(cap.min(data.len()));
                    job.body_sent.set(true);
                    if let Err(e) = send.send_data(chunk, false) {
                        return Err(Failure::Reset(format!("request body: {e}")));
                    }
                }
            }
            ReqEvent::End(Some(trailers)) => {
                return send
                    .send_trailers(trailers)
                    .map_err(|e| Failure::Reset(format!("request trailers: {e}")));
            }
            ReqEvent::End(None) => {
                return send
                    .send_data(Bytes::new(), true)
                    .map_err(|e| Failure::Reset(format!("request end: {e}")));
            }
            ReqEvent::Aborted => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(Failure::ClientGone);
            }
            ReqEvent::TooLarge => {
                send.send_reset(h2::Reason::CANCEL);
                let limit = job.io.borrow().req_limit.unwrap_or(0);
                return Err(Failure::Local(
                    413,
                    format!("request body over {limit} bytes"),
                    None,
                ));
            }
        }
    }
}
