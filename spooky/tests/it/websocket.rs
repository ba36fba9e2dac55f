//! WebSockets end to end, with clients and servers nobody on the team wrote: the Python
//! `websockets` package as client (HTTP/1.1 upgrade over Spooky's TLS listener) and as echo
//! server (HTTP/1.1 upgrade behind Spooky), hypercorn's ASGI WebSockets as a second server,
//! and aioquic with wsproto opening an extended CONNECT over HTTP/3 (RFC 9220). Each run
//! checks every echoed message, many small ones and large ones, and a close from either side.

use crate::peers::{
    accepts_tcp, free_tcp_port, start_on_free_ports, Hypercorn, PeerProcess, ScratchDir,
};
use crate::support::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

/// The `websockets` echo server (`spooky/tests/peers/ws_echo_server.py`).
struct EchoServer {
    addr: SocketAddr,
    _process: PeerProcess,
    dir: ScratchDir,
}

impl EchoServer {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("server.log")).unwrap_or_default()
    }
}

impl EchoServer {
    fn start() -> Self {
        require_python("websockets", "websockets 15.0.1");
        start_on_free_ports("websockets", || {
            let dir = ScratchDir::new("ws-echo");
            let addr = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
            let mut process = PeerProcess::spawn(
                "websockets",
                Command::new("python3")
                    .arg(peers_dir().join("ws_echo_server.py"))
                    .arg(addr.port().to_string())
                    .env("PYTHONDONTWRITEBYTECODE", "1"),
                dir.0.join("server.log"),
                "run cargo xtask setup",
            );
            process.wait_until("listening", || accepts_tcp(addr))?;
            Ok(Self {
                addr,
                _process: process,
                dir,
            })
        })
    }
}

fn ws_proxy(backend: SocketAddr) -> Proxy {
    proxy(&ws_pool(backend, ""), "quic:\n  retry: off\n", 2)
}

/// Runs a client script; its JSON line.
fn run_client(script: &str, port: u16, count: usize, size: usize, closer: &str) -> Value {
    let out = Command::new("python3")
        .arg(peers_dir().join(script))
        .arg(port.to_string())
        .arg(certs_dir().join("ca.crt"))
        .args(["/ws", &count.to_string(), &size.to_string(), closer])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{script}: {e}: {stdout}"))
}

fn tcp_port(p: &Proxy) -> u16 {
    p.running.as_ref().unwrap().tcp_addr.unwrap().port()
}

fn opened(p: &Proxy) -> u64 {
    p.stats_sum(|s| s.websockets_opened.load(Ordering::Relaxed))
}

fn check(r: &Value, count: usize, close_code: u64) {
    assert_eq!(r["echoed"], count, "{r}");
    assert!(r.get("mismatch").is_none(), "{r}");
    assert_eq!(r["text"], "hello text", "{r}");
    assert_eq!(r["close_code"], close_code, "{r}");
}

#[test]
fn websockets_over_http1_reach_a_websockets_server_many_small_and_large_messages() {
    let server = EchoServer::start();
    let p = ws_proxy(server.addr);
    let port = tcp_port(&p);
    let r = run_client("ws_client.py", port, 10_000, 100, "client");
    check(&r, 10_000, 1000);
    assert_eq!(
        r["subprotocol"], "echo",
        "the backend's subprotocol reaches the client"
    );
    let r = run_client("ws_client.py", port, 4, 1 << 20, "server");
    check(&r, 4, 4001);
    assert_eq!(opened(&p), 2);
}

#[test]
fn websockets_over_http3_reach_a_websockets_server() {
    let server = EchoServer::start();
    let p = ws_proxy(server.addr);
    let port = p.addr.port();
    let r = run_client("ws_h3_client.py", port, 2_000, 100, "client");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["subprotocol"], "echo", "{r}");
    check(&r, 2_000, 1000);
    let r = run_client("ws_h3_client.py", port, 2, 1 << 20, "server");
    check(&r, 2, 4001);
    assert_eq!(opened(&p), 2);
}

#[test]
fn websockets_reach_hypercorns_asgi_websockets() {
    let h = Hypercorn::start();
    let p = ws_proxy(h.addr);
    let r = run_client("ws_client.py", tcp_port(&p), 1_000, 1000, "client");
    check(&r, 1_000, 1000);
    let r = run_client("ws_h3_client.py", p.addr.port(), 100, 1000, "client");
    check(&r, 100, 1000);
}

#[test]
fn chromium_opens_a_websocket_from_a_page() {
    let server = EchoServer::start();
    let page = backend("page");
    let upstreams = format!(
        "  ws:\n    route:\n      path_prefix: \"/ws\"\n    backends:\n      - id: ws\n        address: \"{}\"\n        protocol: http1\n  web:\n    route:\n      path_prefix: \"/\"\n    backends:\n      - id: page\n        address: \"{}\"\n",
        server.addr, page.addr
    );
    let p = proxy(&upstreams, "quic:\n  retry: off\n", 2);
    let trust = crate::browser::spki(&certs_dir().join("spooky.crt"));
    let url = format!("https://localhost:{}/wspage", tcp_port(&p));
    // `--dump-dom` does not wait for a WebSocket (it is not part of the page's load): on a
    // busy machine the page may be printed while it still says `connecting`. Load it again
    // then; anything else is an answer.
    let mut dom = String::new();
    for attempt in 0..3 {
        let profile = Scratch::new(&format!("chromium-ws-{attempt}"));
        dom = crate::browser::chromium(&profile.0, &url, &trust, None);
        if crate::browser::seen(&dom) != "connecting" {
            break;
        }
    }
    assert_eq!(
        crate::browser::seen(&dom),
        "echo=hello from the browser",
        "{dom}\nserver log:\n{}",
        server.log()
    );
    assert!(opened(&p) >= 1);
    // Chromium asked over HTTP/2, by extended CONNECT (RFC 8441): Spooky's TCP listener
    // offers it (SETTINGS_ENABLE_CONNECT_PROTOCOL).
    // (Counted when the tunnel is over: after Chromium has closed it.)
    let h2_tunnels = || {
        let text = p.running.as_ref().unwrap().metrics_text();
        metric_sum(
            &text,
            "spooky_requests_total{pool=\"ws\",backend=\"ws\",protocol=\"h2\",class=\"2xx\"}",
        )
    };
    wait_until("the tunnels counted as HTTP/2", T, || {
        h2_tunnels() == opened(&p) as f64
    });
}

#[test]
fn websockets_reach_an_http2_backend_by_extended_connect() {
    // hypercorn over h2c offers SETTINGS_ENABLE_CONNECT_PROTOCOL: the tunnel is an HTTP/2
    // stream to it (RFC 8441), whatever the client spoke.
    let h = Hypercorn::start();
    let upstreams = format!(
        "  main:\n    route:\n      path_prefix: \"/\"\n    backends:\n      - id: ws\n        address: \"{}\"\n",
        h.addr
    );
    let p = proxy(&upstreams, "quic:\n  retry: off\n", 2);
    let r = run_client("ws_client.py", tcp_port(&p), 1_000, 1000, "client");
    check(&r, 1_000, 1000);
    let r = run_client("ws_h3_client.py", p.addr.port(), 4, 1 << 20, "client");
    check(&r, 4, 1000);
}

/// `ws_client.py` in `hold` mode against Spooky's TCP listener at `port`: opened once it
/// printed `open`; [`HeldClient::release`] lets it send one more message and returns what it
/// saw.
struct HeldClient {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl HeldClient {
    fn open(port: u16) -> Self {
        use std::io::BufRead;
        let mut child = Command::new("python3")
            .arg(peers_dir().join("ws_client.py"))
            .arg(port.to_string())
            .arg(certs_dir().join("ca.crt"))
            .args(["/ws", "10", "100", "hold"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "open", "the tunnel opened and echoed");
        Self { child, out }
    }

    fn release(mut self) -> Value {
        use std::io::{BufRead, Write};
        writeln!(self.child.stdin.take().unwrap()).unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let r: Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(self.child.wait().unwrap().success());
        r
    }
}

/// One pool of one HTTP/1.1 backend at `backend`, with `extra` pool settings.
fn ws_pool(backend: SocketAddr, extra: &str) -> String {
    format!(
        "  main:\n    route:\n      path_prefix: \"/\"\n{extra}    backends:\n      - id: ws\n        address: \"{}\"\n        protocol: http1\n",
        backend
    )
}

#[test]
fn a_drain_gives_an_http1_websocket_its_grace_then_closes_it() {
    let server = EchoServer::start();
    let mut p = proxy(
        &ws_pool(server.addr, ""),
        "quic:\n  retry: off\nproxy:\n  shutdown_grace: 3s\n",
        1,
    );
    let client = HeldClient::open(tcp_port(&p));
    // The drain begins with the tunnel open: it keeps working during the grace…
    p.running.as_ref().unwrap().begin_shutdown();
    std::thread::sleep(Duration::from_millis(500));
    let r = client.release();
    assert_eq!(r["late_echo"], "after the line", "{r}");
    // …and is closed when it is over (no close frame: the connection ends under it).
    assert_eq!(r["closed"], true, "{r}");
    p.shutdown();
}

#[test]
fn a_websocket_is_closed_when_its_lifetime_is_over() {
    let server = EchoServer::start();
    let p = proxy(
        &ws_pool(server.addr, "    timeouts: {websocket_lifetime: 1s}\n"),
        "quic:\n  retry: off\n",
        1,
    );
    // The tunnel works within its lifetime (the client saw its echo)…
    let client = HeldClient::open(tcp_port(&p));
    // …and past it, the next message finds the tunnel closed.
    std::thread::sleep(Duration::from_millis(2000));
    let r = client.release();
    assert_eq!(r["closed"], true, "{r}");
    assert!(r.get("late_echo").is_none(), "{r}");
}
