//! A small HTTP/2 backend (h2c, prior knowledge) on the `h2` crate: the quickstart's demo
//! backends and the tests' in-process peers. Routes:
//!
//! | path | answer |
//! |---|---|
//! | `/health` | 200 `ok` |
//! | `/page` | 200, an HTML page that writes the protocol it was fetched with into itself |
//! | `/wspage` | 200, an HTML page that opens a WebSocket to `/ws` and writes the echo into itself |
//! | `/size/N` | 200 with N bytes of a fixed pattern (`pattern_byte(i)`), `content-length` set |
//! | `/echo` | 200 streaming the request body back; request trailers come back as trailers |
//! | `/upload` | 200 `LEN` after reading the whole body |
//! | `/headers` | 200, the request's `:authority` and fields, one `name: value` per line |
//! | `/status/N` | status N |
//! | `/delay/MS` | 200 after MS milliseconds |
//! | `/stream/N/MS` | N chunks `chunk i\n`, MS ms apart, no content-length |
//! | `/trailers` | 200 `body` with trailers `x-trailer: yes` |
//! | `/reset/N` | 200 announcing 2N bytes, N bytes sent, then the stream is reset |
//! | anything else | 200 `hello from ID: METHOD PATH` |
//!
//! Every response carries `x-backend: ID`. A HEAD request gets the headers the GET would
//! (for the routes answered in one piece), without the body.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Byte `i` of the `/size/N` pattern.
pub fn pattern_byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// Options of a demo backend.
#[derive(Clone, Debug, Default)]
pub struct DemoOptions {
    /// Name returned in `x-backend`.
    pub id: String,
    /// Gracefully close each connection (GOAWAY) after this many requests.
    pub goaway_every: Option<u64>,
}

/// Counts requests served, for tests.
#[derive(Default, Debug)]
pub struct DemoStats {
    pub requests: AtomicU64,
    /// Requests being answered now: a stream whose response is still being sent (a reset
    /// from the proxy ends it).
    pub streams_open: AtomicU64,
}

/// Counts one stream in [`DemoStats::streams_open`] while it lives.
struct OpenStream(Arc<DemoStats>);

impl OpenStream {
    fn new(stats: &Arc<DemoStats>) -> Self {
        stats.streams_open.fetch_add(1, Ordering::Relaxed);
        Self(stats.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.streams_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves on `listener` forever (on the current `LocalSet`).
pub async fn serve(listener: TcpListener, opts: DemoOptions, stats: Arc<DemoStats>) {
    let (_never, drain) = tokio::sync::watch::channel(false);
    serve_until_drained(listener, opts, stats, drain, Duration::MAX).await;
}

/// Serves until `drain` turns true, then stops accepting, sends GOAWAY on every connection,
/// and returns once their requests are done (or `grace` has passed).
pub async fn serve_until_drained(
    listener: TcpListener,
    opts: DemoOptions,
    stats: Arc<DemoStats>,
    mut drain: tokio::sync::watch::Receiver<bool>,
    grace: Duration,
) {
    let opts = Rc::new(opts);
    let open = Rc::new(std::cell::Cell::new(0usize));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = drain.changed() => break,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let _ = tcp.set_nodelay(true);
        let opts = opts.clone();
        let stats = stats.clone();
        let mut drain = drain.clone();
        let open = open.clone();
        open.set(open.get() + 1);
        tokio::task::spawn_local(async move {
            connection(tcp, &opts, &stats, &mut drain).await;
            open.set(open.get() - 1);
        });
    }
    drop(listener);
    let deadline = tokio::time::Instant::now() + grace.min(Duration::from_secs(3600));
    while open.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn connection(
    mut tcp: tokio::net::TcpStream,
    opts: &Rc<DemoOptions>,
    stats: &Arc<DemoStats>,
    drain: &mut tokio::sync::watch::Receiver<bool>,
) {
    let mut conn = match h2::server::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(16 << 20)
        .max_concurrent_streams(256)
        .handshake::<_, Bytes>(&mut tcp)
        .await
    {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut served = 0u64;
    let mut draining = *drain.borrow();
    if draining {
        conn.graceful_shutdown();
    }
    loop {
        let next = tokio::select! {
            n = conn.accept() => n,
            _ = drain.changed(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
        };
        let Some(accepted) = next else { break };
        let Ok((req, respond)) = accepted else { break };
        served += 1;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let goaway = opts.goaway_every.is_some_and(|n| served.is_multiple_of(n));
        let opts = opts.clone();
        let open = OpenStream::new(stats);
        tokio::task::spawn_local(async move {
            let _open = open;
            let _ = handle(req, respond, &opts).await;
        });
        if goaway {
            conn.graceful_shutdown();
        }
    }
    drop(conn);
    linger(tcp).await;
}

/// Closes a connection the way RFC 9112 §9.6 asks of a server (and HTTP/2 needs as much):
/// the write side first, then read and discard until the peer closes too (at most 2 s).
/// Closing at once would make the kernel answer the peer's late frames (its WINDOW_UPDATEs
/// for the last response) with a reset, and a reset throws away the end of that response
/// still queued unsent: the client would lose the tail of a body it was promised.
async fn linger(mut tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// A demo backend serving on its own thread; stopped (listener and every connection closed)
/// by [`DemoServer::stop`] or when dropped.
pub struct DemoServer {
    pub addr: SocketAddr,
    pub stats: Arc<DemoStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    drain: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DemoServer {
    /// Stops serving and waits until the listener and all connections are closed.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Stops like a well-behaved server being restarted: closes the listener, sends GOAWAY on
    /// every connection and waits (at most `grace`) for the requests in flight to finish.
    pub fn graceful_stop(mut self) {
        let _ = self.drain.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.stop.take();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Binds `addr` and serves on a new thread with its own runtime.
///
/// # Errors
/// When the address cannot be bound or the thread cannot start.
pub fn spawn(addr: SocketAddr, opts: DemoOptions) -> std::io::Result<DemoServer> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    let stats = Arc::new(DemoStats::default());
    let s2 = stats.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let thread = std::thread::Builder::new()
        .name(format!("demo-{}", opts.id))
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let local_set = tokio::task::LocalSet::new();
            local_set.block_on(&rt, async move {
                let Ok(listener) = TcpListener::from_std(std_listener) else {
                    return;
                };
                tokio::select! {
                    () = serve_until_drained(listener, opts, s2, drain_rx, Duration::from_secs(10)) => {}
                    _ = rx => {}
                }
            });
            // Dropping the LocalSet here drops every connection task: their sockets close.
        })?;
    Ok(DemoServer {
        addr: local,
        stats,
        stop: Some(tx),
        drain: drain_tx,
        thread: Some(thread),
    })
}

/// The `/page` document: once parsed, its `#seen` paragraph says the protocol the browser
/// fetched it with (`nextHopProtocol`: `h3`, `h2`, `http/1.1`) and which backend answered.
fn page(id: &str) -> String {
    format!(
        "<!doctype html><html><head><title>spooky demo</title></head><body>\
         <p id=\"seen\">script did not run</p><script>\
         const n = performance.getEntriesByType('navigation')[0];\
         document.getElementById('seen').textContent = \
         'protocol=' + n.nextHopProtocol + ' backend={id} host=' + location.host;\
         </script></body></html>\n"
    )
}

/// The `/wspage` document: opens a WebSocket to `/ws` on its own origin (subprotocol `echo`), sends a message, and
/// writes the echo (or what went wrong) into its `#seen` paragraph. An image that takes 3 s
/// holds the page's load event meanwhile: a headless browser's `--dump-dom` waits for the
/// load, not for a WebSocket.
fn ws_page() -> &'static str {
    "<!doctype html><html><head><title>spooky websocket</title></head><body>\
     <p id=\"seen\">script did not run</p><script>\
     const seen = document.getElementById('seen');\
     seen.textContent = 'connecting';\
     const ws = new WebSocket('wss://' + location.host + '/ws', 'echo');\
     ws.onopen = () => ws.send('hello from the browser');\
     ws.onmessage = (e) => { seen.textContent = 'echo=' + e.data; ws.close(1000); };\
     ws.onerror = () => { seen.textContent = 'websocket error'; };\
     </script><img src=\"/delay/3000\" alt=\"\"></body></html>\n"
}

fn header(resp: &mut http::response::Builder, id: &str) {
    if let (Some(h), Ok(v)) = (resp.headers_mut(), HeaderValue::from_str(id)) {
        h.insert("x-backend", v);
    }
}

async fn handle(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    opts: &DemoOptions,
) -> Result<(), h2::Error> {
    let path = req.uri().path().to_string();
    let mut builder = Response::builder().status(200);
    header(&mut builder, &opts.id);
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let simple = |status: u16, body: String| (status, Bytes::from(body));
    let (status, body) = match segs.as_slice() {
        ["health"] => simple(200, "ok\n".into()),
        ["page"] => {
            // For browsers: the page writes how it was fetched into itself (`--dump-dom`).
            if let Some(h) = builder.headers_mut() {
                h.insert(
                    "content-type",
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
            }
            simple(200, page(&opts.id))
        }
        ["wspage"] => {
            if let Some(h) = builder.headers_mut() {
                h.insert(
                    "content-type",
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
            }
            simple(200, ws_page().to_owned())
        }
        ["size", n] => {
            let n: usize = n.parse().unwrap_or(0);
            let resp = builder
                .header("content-length", n)
                .body(())
                .unwrap_or_default();
            let mut send = respond.send_response(resp, n == 0)?;
            drain(req.into_body()).await;
            let mut sent = 0;
            while sent < n {
                let len = (n - sent).min(64 * 1024);
                let chunk: Vec<u8> = (sent..sent + len).map(pattern_byte).collect();
                send_all(&mut send, Bytes::from(chunk), sent + len == n).await?;
                sent += len;
            }
            return Ok(());
        }
        ["echo"] => {
            let resp = builder.body(()).unwrap_or_default();
            let mut send = respond.send_response(resp, false)?;
            let mut body = req.into_body();
            while let Some(chunk) = body.data().await {
                let chunk = chunk?;
                let n = chunk.len();
                send_all(&mut send, chunk, false).await?;
                let _ = body.flow_control().release_capacity(n);
            }
            match body.trailers().await? {
                Some(t) => send.send_trailers(t)?,
                None => send.send_data(Bytes::new(), true)?,
            }
            return Ok(());
        }
        ["upload"] => {
            let n = drain(req.into_body()).await;
            return respond_body(respond, builder, 200, Bytes::from(format!("{n}\n")));
        }
        ["headers"] => {
            let mut out = format!(
                ":authority: {}\n",
                req.uri().authority().map(|a| a.as_str()).unwrap_or("")
            );
            for (k, v) in req.headers() {
                out.push_str(&format!(
                    "{}: {}\n",
                    k,
                    String::from_utf8_lossy(v.as_bytes())
                ));
            }
            simple(200, out)
        }
        ["status", n] => simple(n.parse().unwrap_or(500), format!("status {n}\n")),
        ["delay", ms] => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            simple(200, format!("delayed {ms}ms\n"))
        }
        ["stream", n, ms] => {
            let n: usize = n.parse().unwrap_or(0);
            let ms: u64 = ms.parse().unwrap_or(0);
            let resp = builder.body(()).unwrap_or_default();
            let mut send = respond.send_response(resp, false)?;
            for i in 0..n {
                send_all(&mut send, Bytes::from(format!("chunk {i}\n")), false).await?;
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            send.send_data(Bytes::new(), true)?;
            return Ok(());
        }
        ["reset", n] => {
            // N bytes of the pattern, then RST_STREAM(INTERNAL_ERROR): a backend failing
            // mid-response.
            let n: usize = n.parse().unwrap_or(0);
            let resp = builder
                .header("content-length", n * 2)
                .body(())
                .unwrap_or_default();
            let mut send = respond.send_response(resp, false)?;
            let chunk: Vec<u8> = (0..n).map(pattern_byte).collect();
            send_all(&mut send, Bytes::from(chunk), false).await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            send.send_reset(h2::Reason::INTERNAL_ERROR);
            return Ok(());
        }
        ["trailers"] => {
            let resp = builder.body(()).unwrap_or_default();
            let mut send = respond.send_response(resp, false)?;
            send_all(&mut send, Bytes::from_static(b"body\n"), false).await?;
            let mut t = HeaderMap::new();
            t.insert("x-trailer", HeaderValue::from_static("yes"));
            send.send_trailers(t)?;
            return Ok(());
        }
        _ => simple(
            200,
            format!("hello from {}: {} {}\n", opts.id, req.method(), path),
        ),
    };
    let head = req.method() == http::Method::HEAD;
    drain(req.into_body()).await;
    if head {
        // The GET's headers, no body (RFC 9110 §9.3.2).
        let resp = builder
            .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
            .header("content-length", body.len())
            .body(())
            .unwrap_or_default();
        respond.send_response(resp, true)?;
        return Ok(());
    }
    respond_body(respond, builder, status, body)
}

fn respond_body(
    mut respond: h2::server::SendResponse<Bytes>,
    builder: http::response::Builder,
    status: u16,
    body: Bytes,
) -> Result<(), h2::Error> {
    let resp = builder
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-length", body.len())
        .body(())
        .unwrap_or_default();
    let mut send = respond.send_response(resp, body.is_empty())?;
    if !body.is_empty() {
        // Small bodies: h2 buffers what the window does not take yet.
        send.send_data(body, true)?;
    }
    Ok(())
}

async fn drain(mut body: h2::RecvStream) -> usize {
    let mut n = 0;
    while let Some(Ok(chunk)) = body.data().await {
        n += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    n
}

async fn send_all(
    send: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), h2::Error> {
    if data.is_empty() {
        // An empty chunk (the request's END_STREAM frame, when echoing) is only worth a frame
        // when it ends the stream: h2 peers close the connection after 100 empty non-final
        // DATA frames over its lifetime.
        return if end {
            send.send_data(data, true)
        } else {
            Ok(())
        };
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            // Capacity can be reported as 0 (window used up): wait for more rather than send
            // an empty DATA frame, which peers count as abuse (h2 allows 100 per connection).
            Some(Ok(0)) => continue,
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(e),
            // The stream is over (the peer reset it): stop producing the rest.
            None => return Err(h2::Reason::CANCEL.into()),
        };
        let chunk = data.split_to(cap.min(data.len()));
        send.send_data(chunk, end && data.is_empty())?;
    }
    Ok(())
}
