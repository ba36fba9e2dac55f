//! The admin listener: HTTP/1.1 and h2c (prior knowledge) over TCP, loopback by default.
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when listening, every worker runs and every pool has a healthy backend, else 503 naming the dead workers or the pools |
//! | `GET /status` | JSON: steering mode, workers, pools, backend health, config generation |
//! | `POST /backends/POOL/ID/drain`, `…/undrain` | the backend takes no new requests (those in flight finish), or takes them again; 404 for an unknown one |
//! | `POST /drain`, `POST /undrain` | the host takes no new connections (QUIC or TCP) and `/readyz` answers 503, its open connections go on (a fleet member out of service, still reached by forwarding); or it takes them again |
//! | `POST /reload` | re-reads the configuration file: 200 with a summary once every worker runs it; 400 with every error of a bad file, 409 when a change needs a restart, 500 when workers did not switch (nothing changed) |
//!
//! With `admin.token` set, the `POST`s need `Authorization: Bearer TOKEN` (and so do the
//! reads with `admin.token_for_reads`). HTTP/1.1 connections carry one request each.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] at once (more are closed at once and counted in
//! `spooky_admin_connections_refused_total`), an HTTP/1.1 exchange must be over within
//! [`H1_TIMEOUT`] and an h2c connection within [`H2_TIMEOUT`], and a failing `accept` (out of
//! file descriptors, say) backs off instead of spinning.

use super::reload::ReloadError;
use super::Ops;
use crate::health::HealthState;
use bytes::Bytes;
use std::cell::Cell;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head / body the admin listener reads.
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;
/// Admin connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// An HTTP/1.1 exchange (head, body, answer) must be over within this.
pub const H1_TIMEOUT: Duration = Duration::from_secs(10);
/// An h2c connection lives at most this long.
pub const H2_TIMEOUT: Duration = Duration::from_secs(60);
/// The wait after a failed `accept`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Admin connections closed because [`MAX_CONNECTIONS`] were open.
pub static CONNECTIONS_REFUSED: AtomicU64 = AtomicU64::new(0);

/// One admin answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Answer {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// Serves the admin API on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, ops: Arc<Ops>) {
    let open = Rc::new(Cell::new(0usize));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "admin listener: accept failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if open.get() >= MAX_CONNECTIONS {
            CONNECTIONS_REFUSED.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "admin connection refused: too many open");
            continue;
        }
        open.set(open.get() + 1);
        let (ops, open) = (ops.clone(), open.clone());
        tokio::task::spawn_local(async move {
            if let Err(e) = connection(tcp, &ops).await {
                tracing::debug!(%peer, error = %e, "admin connection ended");
            }
            open.set(open.get() - 1);
        });
    }
}

async fn connection(tcp: TcpStream, ops: &Ops) -> std::io::Result<()> {
    let mut preface = [0u8; 3];
    let n = tokio::time::timeout(H1_TIMEOUT, tcp.peek(&mut preface))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    let (limit, served) = if &preface[..n] == b"PRI" {
        (
            H2_TIMEOUT,
            tokio::time::timeout(H2_TIMEOUT, h2c(tcp, ops)).await,
        )
    } else {
        (
            H1_TIMEOUT,
            tokio::time::timeout(H1_TIMEOUT, h1(tcp, ops)).await,
        )
    };
    served.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("not over within {limit:?}"),
        )
    })?
}

async fn h1(mut tcp: TcpStream, ops: &Ops) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return write_h1(&mut tcp, &Answer::text(431, "request head too large\n")).await;
        }
        let mut chunk = [0u8; 2048];
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or("").split(' ');
    let (method, path) = (
        request_line.next().unwrap_or(""),
        request_line.next().unwrap_or(""),
    );
    let mut auth = None;
    let mut content_length = 0usize;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "authorization" => auth = Some(v.trim().to_owned()),
                "content-length" => content_length = v.trim().parse().unwrap_or(usize::MAX),
                _ => {}
            }
        }
    }
    if content_length > MAX_BODY {
        return write_h1(&mut tcp, &Answer::text(413, "body too large\n")).await;
    }
    // The body is not used by any endpoint; read it so the client sees a clean close.
    let mut have = buf.len() - head_end;
    while have < content_length {
        let mut chunk = [0u8; 2048];
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        have += n;
    }
    let answer = handle(ops, method, path, auth.as_deref());
    write_h1(&mut tcp, &answer).await
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

async fn write_h1(tcp: &mut TcpStream, a: &Answer) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n",
        a.status,
        reason(a.status),
        a.content_type,
        a.body.len()
    );
    if a.status == 401 {
        head.push_str("www-authenticate: Bearer\r\n");
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(a.body.as_bytes()).await?;
    tcp.shutdown().await
}

async fn h2c(tcp: TcpStream, ops: &Ops) -> std::io::Result<()> {
    let mut conn = h2::server::handshake(tcp)
        .await
        .map_err(std::io::Error::other)?;
    while let Some(req) = conn.accept().await {
        let (req, mut respond) = req.map_err(std::io::Error::other)?;
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let answer = handle(
            ops,
            req.method().as_str(),
            req.uri().path(),
            auth.as_deref(),
        );
        let resp = http::Response::builder()
            .status(answer.status)
            .header("content-type", answer.content_type)
            .header("content-length", answer.body.len())
            .body(())
            .map_err(std::io::Error::other)?;
        let mut send = respond
            .send_response(resp, answer.body.is_empty())
            .map_err(std::io::Error::other)?;
        if !answer.body.is_empty() {
            send.send_data(Bytes::from(answer.body), true)
                .map_err(std::io::Error::other)?;
        }
    }
    Ok(())
}

fn authorized(ops: &Ops, auth: Option<&str>) -> bool {
    let Some(token) = ops.reloader.current().config.admin.token.clone() else {
        return true;
    };
    let Some(given) = auth.and_then(|a| a.strip_prefix("Bearer ")) else {
        return false;
    };
    // Constant-time comparison.
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Answers one admin request.
pub fn handle(ops: &Ops, method: &str, path: &str, auth: Option<&str>) -> Answer {
    let path = path.split('?').next().unwrap_or("");
    let reads_need_token = ops.reloader.current().config.admin.token_for_reads;
    match (method, path) {
        ("POST", "/reload") => {
            if !authorized(ops, auth) {
                return Answer::text(401, "missing or wrong bearer token\n");
            }
            match ops.reloader.reload() {
                Ok(summary) => Answer::text(200, format!("{summary}\n")),
                // A bad configuration is the caller's to fix (400, or 409 when it needs a
                // restart); workers that did not switch are ours (500).
                Err(e @ ReloadError::NeedsRestart(_)) => Answer::text(409, format!("{e}\n")),
                Err(e) if e.is_client_error() => Answer::text(400, format!("{e}\n")),
                Err(e) => Answer::text(500, format!("{e}\n")),
            }
        }
        (_, "/reload") => Answer::text(405, "use POST\n"),
        (method, path @ ("/drain" | "/undrain")) => {
            if method != "POST" {
                return Answer::text(405, "use POST\n");
            }
            if !authorized(ops, auth) {
                return Answer::text(401, "missing or wrong bearer token\n");
            }
            let drained = path == "/drain";
            let was = ops.policy.set_drained(drained);
            let verb = if drained { "drained" } else { "undrained" };
            tracing::info!(drained, "host {verb} by the admin API");
            let already = if was == drained { " (already)" } else { "" };
            Answer::text(200, format!("{verb}{already}\n"))
        }
        (method, p) if p.starts_with("/backends/") => {
            if method != "POST" {
                return Answer::text(405, "use POST\n");
            }
            if !authorized(ops, auth) {
                return Answer::text(401, "missing or wrong bearer token\n");
            }
            drain(ops, p)
        }
        ("GET" | "HEAD", _) if reads_need_token && !authorized(ops, auth) => {
            Answer::text(401, "missing or wrong bearer token\n")
        }
        ("GET" | "HEAD", "/healthz") => Answer::text(200, "ok\n"),
        ("GET" | "HEAD", "/readyz") => readyz(ops),
        ("GET" | "HEAD", "/metrics") => Answer {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: super::metrics::render(ops),
        },
        ("GET" | "HEAD", "/status") => Answer {
            status: 200,
            content_type: "application/json",
            body: status_json(ops),
        },
        ("GET" | "HEAD", _) => Answer::text(
            404,
            "unknown endpoint: try /metrics /healthz /readyz /status\n",
        ),
        _ => Answer::text(405, "method not allowed\n"),
    }
}

/// `POST /backends/POOL/ID/drain` or `…/undrain`: the backend takes no new requests (those
/// in flight finish), or takes them again. Kept across reloads that keep the backend.
fn drain(ops: &Ops, path: &str) -> Answer {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["backends", pool, id, action] = parts[..] else {
        return Answer::text(
            404,
            "use /backends/POOL/ID/drain or /backends/POOL/ID/undrain\n",
        );
    };
    let drained = match action {
        "drain" => true,
        "undrain" => false,
        _ => return Answer::text(404, "the action is drain or undrain\n"),
    };
    let snapshot = ops.reloader.current();
    let slot = snapshot
        .backends
        .iter()
        .flatten()
        .map(|plan| &plan.slot)
        .find(|slot| slot.key.pool == pool && slot.key.id == id);
    let Some(slot) = slot else {
        return Answer::text(404, format!("no backend {id} in pool {pool}\n"));
    };
    let was = slot.drained.swap(drained, Ordering::Relaxed);
    tracing::info!(
        pool,
        backend = id,
        drained,
        "backend {} by the admin API",
        if drained { "drained" } else { "undrained" }
    );
    let verb = if drained { "drained" } else { "undrained" };
    let already = if was == drained { " (already)" } else { "" };
    Answer::text(200, format!("{pool}/{id}: {verb}{already}\n"))
}

/// Whether pool `up` can serve a request now: it redirects (no backend needed), a backend is
/// available, or (`fail_open`) one is not drained.
fn servable(up: &crate::config::Upstream, plans: &[crate::snapshot::BackendPlan]) -> bool {
    up.redirect.is_some()
        || plans.iter().any(|p| p.slot.is_available())
        || (up.fail_open && plans.iter().any(|p| !p.slot.is_drained()))
}

/// Ready (200) unless draining, a worker died, a pool with `readiness: required` cannot
/// serve, or no pool can; pools that cannot serve are named either way.
fn readyz(ops: &Ops) -> Answer {
    let snapshot = ops.reloader.current();
    let ups = &snapshot.config.upstreams;
    let down: Vec<&crate::config::Upstream> = ups
        .iter()
        .zip(&snapshot.backends)
        .filter(|(up, plans)| !servable(up, plans))
        .map(|(up, _)| up)
        .collect();
    let names = |list: &[&crate::config::Upstream]| {
        list.iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if *ops.draining.borrow() {
        return Answer::text(503, "draining: shutting down\n");
    }
    if ops.policy.drained() {
        return Answer::text(503, "drained (POST /undrain takes new connections again)\n");
    }
    let dead = ops.dead_workers();
    if !dead.is_empty() {
        let list: Vec<String> = dead.iter().map(ToString::to_string).collect();
        return Answer::text(
            503,
            format!(
                "worker(s) {} died: restart Spooky (spooky --takeover keeps the connections of the others)\n",
                list.join(", ")
            ),
        );
    }
    let required: Vec<&crate::config::Upstream> = down
        .iter()
        .copied()
        .filter(|u| u.readiness == crate::config::Readiness::Required)
        .collect();
    if !required.is_empty() {
        return Answer::text(
            503,
            format!(
                "no healthy backend in required pool(s): {}\n",
                names(&required)
            ),
        );
    }
    if down.len() == ups.len() {
        return Answer::text(503, format!("no pool can serve: {}\n", names(&down)));
    }
    if down.is_empty() {
        Answer::text(200, "ready\n")
    } else {
        Answer::text(
            200,
            format!("ready; no healthy backend in: {}\n", names(&down)),
        )
    }
}

fn status_json(ops: &Ops) -> String {
    let snapshot = ops.reloader.current();
    let workers: Vec<serde_json::Value> = ops
        .stats
        .iter()
        .enumerate()
        .map(|(i, w)| {
            serde_json::json!({
                "index": i,
                "connections": w.connections_active.load(Ordering::Relaxed),
                "streams": w.streams_active.load(Ordering::Relaxed),
                "accepted": w.connections_accepted.load(Ordering::Relaxed),
                "misrouted": w.misrouted.load(Ordering::Relaxed),
                "packets_in": w.packets_in.load(Ordering::Relaxed),
                "packets_out": w.packets_out.load(Ordering::Relaxed),
                "dropped": w.dropped.load(Ordering::Relaxed),
                "requests": w.requests.load(Ordering::Relaxed),
                "alive": !ops.dead_workers().contains(&i),
            })
        })
        .collect();
    let pools: Vec<serde_json::Value> = snapshot
        .config
        .upstreams
        .iter()
        .zip(&snapshot.backends)
        .map(|(up, plans)| {
            let backends: Vec<serde_json::Value> = up
                .backends
                .iter()
                .zip(plans)
                .map(|(be, plan)| {
                    let slot = &plan.slot;
                    let state = slot.state.load(Ordering::Relaxed);
                    serde_json::json!({
                        "id": be.id,
                        "address": be.address.to_string(),
                        "state": HealthState::from_u32(state).map_or("unknown".to_owned(), |s| s.to_string()),
                        "available": slot.is_available(),
                        "drained": slot.is_drained(),
                        "consecutive_failures": slot.consecutive_failures.load(Ordering::Relaxed),
                        "last_latency_us": slot.last_latency_us.load(Ordering::Relaxed),
                        "ewma_latency_us": slot.ewma_latency_us.load(Ordering::Relaxed),
                    })
                })
                .collect();
            serde_json::json!({"name": up.name, "backends": backends})
        })
        .collect();
    let v = serde_json::json!({
        "mode": ops.mode,
        "generation": snapshot.generation,
        "cid_generation": ops.generation,
        "drained": ops.policy.drained(),
        "pid": std::process::id(),
        // SAFETY: geteuid has no preconditions.
        "uid": unsafe { libc::geteuid() },
        "capabilities": format!("{:#x}", crate::privilege::effective_capabilities()),
        "listen": snapshot.config.listen.addr.to_string(),
        "workers": workers,
        "pools": pools,
    });
    let mut s = v.to_string();
    let _ = writeln!(s);
    s
}

/// Binds the admin listener (before privileges are dropped).
///
/// # Errors
/// When the address cannot be bound.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}
