//! WebSocket tunnels to HTTP/1.1 backends. Whatever the client spoke (an extended CONNECT over
//! HTTP/3 or HTTP/2, or HTTP/1.1's `Upgrade: websocket`, which the TCP front turns into one),
//! the backend gets an HTTP/1.1 upgrade: `GET` with `upgrade: websocket`, and the client's
//! `sec-websocket-key` (or a fresh one; the answer's `sec-websocket-accept` is then checked).
//! Its `101` becomes the client's `200` (the TCP front answers an HTTP/1.1 client `101` in
//! turn), and from then on bytes go both ways unchanged: the exchange's request body to the
//! backend's socket, the socket's bytes into the exchange's response body, each side waiting
//! for the other to take them (backpressure both ways).
//!
//! The tunnel ends when both directions have: the client's end of its stream shuts the
//! backend socket's write side; the backend closing ends the response. A side silent for the
//! pool's `timeouts.idle` (both at once) ends it, as does the client leaving. Draining gives
//! tunnels the shutdown grace like any request in flight, then closes them.

use super::{Attempt, Job};
use crate::http::bridge;
use crate::http::exchange::RequestEvent;
use crate::http::outcome::Failure;
use crate::upstream::{h1, ErrorKind, UpstreamError};
use bytes::BytesMut;
use http::{HeaderValue, Method, Request, StatusCode};
use std::future::poll_fn;
use std::rc::Rc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes read from the backend per chunk handed to the client.
const READ_CHUNK: usize = 64 * 1024;

/// The upgrade request for the backend, from the extended CONNECT `req` (HTTP/2 form).
/// Returns it with the key whose answer to expect.
fn upgrade_request(
    req: Request<()>,
    client_key: Option<&[u8]>,
) -> Result<(Request<h1::RequestBody>, String), String> {
    let (mut parts, ()) = req.into_parts();
    parts.method = Method::GET;
    let key = match client_key {
        Some(k) => String::from_utf8_lossy(k).trim().to_owned(),
        None => h1::websocket_key(),
    };
    let h = &mut parts.headers;
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        http::header::SEC_WEBSOCKET_KEY,
        HeaderValue::from_str(&key).map_err(|e| e.to_string())?,
    );
    h.entry(http::header::SEC_WEBSOCKET_VERSION)
        .or_insert(HeaderValue::from_static("13"));
    let req = h1::to_http1(Request::from_parts(parts, ()), h1::RequestBody::empty())?;
    Ok((req, key))
}

/// Opens the tunnel on HTTP/1.1 connection `conn` and relays until it ends.
pub(super) async fn run(
    job: &Job,
    backend: usize,
    conn: &Rc<h1::Conn>,
    request: Request<()>,
    name: &Rc<str>,
) -> Result<(), Attempt> {
    let fwd = &job.fwd;
    let timeouts = &fwd.snapshot.config.upstreams[job.upstream].timeouts;
    let (req, key) = upgrade_request(request, job.head.field("sec-websocket-key"))
        .map_err(|e| Failure::Convert(bridge::ConvertError(e)))?;
    let started = Instant::now();
    let (_, response) = conn.send(req);
    let response = match tokio::time::timeout(timeouts.response_head, response).await {
        Err(_) => {
            return Err(Attempt::Upstream(UpstreamError::new(
                ErrorKind::ResponseTimeout,
                name,
                format!(
                    "no answer to the WebSocket upgrade within {:?}",
                    timeouts.response_head
                ),
            )))
        }
        Ok(r) => super::h1_head_raw(r, name)?,
    };
    job.replay.borrow_mut().close();
    job.upstream_latency.set(Some(started.elapsed()));
    let status = response.status();
    fwd.report_response(job.upstream, backend, status.as_u16(), started.elapsed());
    if status != StatusCode::SWITCHING_PROTOCOLS {
        // Refused (403, 426 …): an ordinary response, relayed as one.
        job.status.set(status.as_u16());
        let (mut parts, body) = response.into_parts();
        h1::strip_connection_named(&mut parts.headers);
        let body = super::ResponseBody::H1 {
            body,
            trailers: None,
        };
        let nothing = std::pin::pin!(std::future::ready(Ok(())));
        return super::relay_response(job, name, parts.status, &parts.headers, body, nothing, true)
            .await;
    }
    let accept = response
        .headers()
        .get(http::header::SEC_WEBSOCKET_ACCEPT)
        .map(HeaderValue::as_bytes);
    if accept != Some(h1::websocket_accept(key.as_bytes()).as_bytes()) {
        return Err(Attempt::Upstream(UpstreamError::new(
            ErrorKind::Protocol,
            name,
            "101 without the right sec-websocket-accept",
        )));
    }
    // What the client is told: the subprotocol and extensions the backend chose.
    let mut headers = http::HeaderMap::new();
    for n in [
        http::header::SEC_WEBSOCKET_PROTOCOL,
        http::header::SEC_WEBSOCKET_EXTENSIONS,
    ] {
        if let Some(v) = response.headers().get(&n) {
            headers.insert(n, v.clone());
        }
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| Attempt::Upstream(UpstreamError::new(ErrorKind::Reset, name, e)))?;
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    job.status.set(200);
    let mut fields = bridge::response_to_h3(StatusCode::OK, &headers);
    fwd.finish_head(&mut fields, Some(job.upstream), &job.head.request_id);
    let _ = job.task.respond(fields);
    fwd.services
        .stats
        .websockets_opened
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);

    let idle = timeouts.idle;
    let mut to_backend_open = true;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        let from_client = async { poll_fn(|cx| job.task.poll_request(cx.waker())).await };
        let from_backend = async {
            if poll_fn(|cx| job.task.poll_response_room(cx.waker()))
                .await
                .is_err()
            {
                return Step::ClientGone;
            }
            buf.reserve(READ_CHUNK);
            Step::Backend(io.read_buf(&mut buf).await.map_err(|_| ()))
        };
        let step = tokio::time::timeout(idle, async {
            tokio::select! {
                ev = from_client, if to_backend_open => Step::Client(ev),
                step = from_backend => step,
            }
        })
        .await;
        match step {
            Err(_) => {
                return Err(Failure::Broken {
                    cause: format!("WebSocket idle for {idle:?}"),
                }
                .into())
            }
            Ok(Step::Client(RequestEvent::Data(data))) => {
                if io.write_all(&data).await.is_err() {
                    return Err(Failure::Broken {
                        cause: format!("backend {name}: WebSocket closed under the client's data"),
                    }
                    .into());
                }
            }
            Ok(Step::Client(RequestEvent::End(_))) => {
                // The client is done sending: so is the backend's side of the socket.
                to_backend_open = false;
                let _ = io.shutdown().await;
            }
            Ok(Step::Client(_) | Step::ClientGone) => return Err(Failure::ClientGone.into()),
            Ok(Step::Backend(Err(()))) | Ok(Step::Backend(Ok(0))) => {
                // The backend closed: the tunnel is over.
                let _ = job.task.finish(None);
                return Ok(());
            }
            Ok(Step::Backend(Ok(n))) => {
                job.bytes_out.set(job.bytes_out.get() + n as u64);
                let _ = job.task.push_body(buf.split().freeze());
            }
        }
    }
}

enum Step {
    Client(RequestEvent),
    Backend(Result<usize, ()>),
    ClientGone,
}
