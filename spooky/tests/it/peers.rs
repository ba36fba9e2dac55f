//! Spooky against peers nobody on the team wrote, all on 127.0.0.1:
//!
//! - aioquic as the HTTP/3 client (`spooky/tests/peers/h3_client.py`, run with `python3`),
//! - nginx as an HTTP/2 backend, over h2c and over TLS (`spooky/tests/peers/nginx.conf.in`),
//! - hypercorn, a strict HTTP/2 server, running `spooky/tests/peers/asgi_app.py` over h2c.
//!
//! Peers are child processes started per test and stopped by their PID when dropped; readiness
//! is polled with a deadline. A missing peer fails the test with the reason (install it with
//! `cargo xtask setup`); no test returns early and passes.
//!
//! The in-process demo backends and the in-tree client are covered in `proxy.rs`; this file
//! only adds the independent peers around them.

use crate::support::*;
use serde_json::Value;
use spooky_peers::client::Request;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a peer may take to come up.
const STARTUP: Duration = Duration::from_secs(20);

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A fresh private directory under the system temp dir, removed on drop.
pub(crate) struct ScratchDir(pub(crate) PathBuf);

impl ScratchDir {
    pub(crate) fn new(what: &str) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "spooky-peers-{what}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on 127.0.0.1 for a peer to listen on (see `free_udp_port`).
pub(crate) fn free_tcp_port() -> u16 {
    free_udp_port()
}

/// A peer process this test started; killed by its PID and reaped on drop.
pub(crate) struct PeerProcess {
    name: &'static str,
    child: Child,
    /// Where its log goes, shown when it fails to start.
    log: PathBuf,
}

impl PeerProcess {
    pub(crate) fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf, hint: &str) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("{name} cannot be started ({e}): {hint}"));
        Self { name, child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls until `ready` holds. `Err` with the peer's log when it exited first (a port taken
    /// by someone else between choosing and binding it, say); panics at the deadline.
    pub(crate) fn wait_until(
        &mut self,
        what: &str,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited during startup ({status}); its log:\n{}",
                    self.name,
                    self.log_text()
                ));
            }
            if ready() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready ({what}) after {STARTUP:?}; its log:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts a peer on free ports, choosing new ones when it lost a port to another process
/// (ports are chosen by binding and closing, so that can happen); any other failure panics.
pub(crate) fn start_on_free_ports<P>(
    name: &str,
    mut attempt: impl FnMut() -> Result<P, String>,
) -> P {
    const ATTEMPTS: usize = 3;
    let mut n = 1;
    loop {
        match attempt() {
            Ok(peer) => return peer,
            Err(log) if n < ATTEMPTS && log.to_lowercase().contains("address already in use") => {
                n += 1;
            }
            Err(log) => panic!("{name} failed to start: {log}"),
        }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        // Only the process this test started, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn accepts_tcp(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

// ---------------------------------------------------------------------------------------------
// Spooky configuration with per-backend TLS

struct Be<'a> {
    id: &'a str,
    addr: SocketAddr,
    /// The backend's `tls` mapping in YAML flow style, or `None` for h2c.
    tls: Option<String>,
    /// The backend's `protocol`, when not the default (http2).
    protocol: Option<&'static str>,
}

fn h2c(id: &str, addr: SocketAddr) -> Be<'_> {
    Be {
        id,
        addr,
        tls: None,
        protocol: None,
    }
}

fn http1(id: &str, addr: SocketAddr) -> Be<'_> {
    Be {
        protocol: Some("http1"),
        ..h2c(id, addr)
    }
}

/// YAML for one pool whose backends may use TLS (`support::pool` writes h2c backends only).
fn pool_of(name: &str, prefix: &str, backends: &[Be<'_>]) -> String {
    let mut s = format!(
        "  {name}:\n    load_balancing:\n      type: round-robin\n    route:\n      path_prefix: \"{prefix}\"\n    backends:\n"
    );
    for b in backends {
        s.push_str(&format!(
            "      - id: {}\n        address: \"{}\"\n",
            b.id, b.addr
        ));
        if let Some(tls) = &b.tls {
            s.push_str(&format!("        tls: {tls}\n"));
        }
        if let Some(protocol) = b.protocol {
            s.push_str(&format!("        protocol: {protocol}\n"));
        }
    }
    s
}

fn start_proxy(upstreams: &str) -> Proxy {
    proxy(upstreams, "quic:\n  retry: off\n", 2)
}

// ---------------------------------------------------------------------------------------------
// aioquic, the independent HTTP/3 client

/// One response as the aioquic client saw it.
#[derive(Debug)]
struct H3Response {
    status: Option<u64>,
    headers: Vec<(String, String)>,
    body_len: u64,
    sha256: String,
    /// Up to 64 KiB of the body, as text.
    body: Option<String>,
    ended: bool,
    reset: Option<u64>,
}

impl H3Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json_body(&self) -> Value {
        let text = self.body.as_deref().unwrap_or_default();
        serde_json::from_str(text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text}"))
    }

    /// A complete 200 whose body has `len` bytes hashing to `sha256`.
    fn assert_body(&self, what: &str, len: usize, sha256: &str) {
        assert_eq!(self.status, Some(200), "{what}: {self:?}");
        assert!(self.ended, "{what}: stream not ended cleanly: {self:?}");
        assert_eq!(self.body_len, len as u64, "{what}: body length");
        assert_eq!(self.sha256, sha256, "{what}: body differs");
    }
}

/// What one run of the aioquic client reported: the responses in plan order, and why the
/// connection ended early if it did.
#[derive(Debug)]
struct H3Run {
    responses: Vec<H3Response>,
    error: Option<String>,
}

fn pairs(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p[0].as_str().unwrap_or_default().to_string(),
                        p[1].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The aioquic client (`h3_client.py`) towards `proxy` as `localhost`, verified with the demo
/// CA, giving up after `timeout` seconds.
fn h3_client(proxy: SocketAddr, timeout: u32) -> Command {
    require_python("aioquic", "aioquic 1.7.2");
    let mut c = Command::new("python3");
    c.arg(peers_dir().join("h3_client.py"))
        .args(["--host", &proxy.ip().to_string()])
        .args(["--port", &proxy.port().to_string()])
        .arg("--ca")
        .arg(certs_dir().join("ca.crt"))
        .args([
            "--server-name",
            "localhost",
            "--timeout",
            &timeout.to_string(),
        ]);
    c
}

/// Runs the aioquic client on one connection to `proxy` with `plan` (a JSON list of batches of
/// requests, see the script's docstring).
fn aioquic(proxy: SocketAddr, plan: &Value) -> H3Run {
    let out = h3_client(proxy, 60)
        .arg("--plan")
        .arg(plan.to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("python3 cannot be started ({e}): run cargo xtask setup"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "h3_client.py printed no result ({e}), {}\nstdout: {stdout}\nstderr: {stderr}",
            out.status
        )
    });
    let responses = v["responses"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| H3Response {
                    status: r["status"].as_u64(),
                    headers: pairs(&r["headers"]),
                    body_len: r["body_len"].as_u64().unwrap_or(0),
                    sha256: r["sha256"].as_str().unwrap_or_default().to_string(),
                    body: r["body"].as_str().map(str::to_string),
                    ended: r["ended"].as_bool().unwrap_or(false),
                    reset: r["reset"].as_u64(),
                })
                .collect()
        })
        .unwrap_or_default();
    H3Run {
        responses,
        error: v["error"].as_str().map(str::to_string),
    }
}

impl H3Run {
    /// The responses, after checking the connection stayed up for the whole plan.
    fn ok(self, expected: usize) -> Vec<H3Response> {
        assert!(
            self.error.is_none(),
            "aioquic connection failed: {:?}\nresponses so far: {:#?}",
            self.error,
            self.responses
        );
        assert_eq!(self.responses.len(), expected, "{:#?}", self.responses);
        self.responses
    }
}

fn get(path: &str) -> Value {
    serde_json::json!({ "path": path })
}

fn one_backend_proxy(b: &Backend) -> Proxy {
    start_proxy(&pool_of("main", "/", &[h2c(&b.id, b.addr)]))
}

#[test]
fn aioquic_small_get() {
    let b = backend("b1");
    let p = one_backend_proxy(&b);
    let r = aioquic(
        p.addr,
        &serde_json::json!([[get("/size/1000")], [get("/")]]),
    )
    .ok(2);
    r[0].assert_body("/size/1000", 1000, &sha256_hex(&pattern(1000)));
    assert_eq!(r[0].header("x-backend"), Some("b1"));
    assert_eq!(r[0].header("content-length"), Some("1000"));
    assert_eq!(r[1].status, Some(200));
    assert_eq!(r[1].body.as_deref(), Some("hello from b1: GET /\n"));
}

#[test]
fn aioquic_16_mib_download_arrives_intact() {
    let b = backend("b1");
    let p = one_backend_proxy(&b);
    let n = 16 << 20;
    let r = aioquic(p.addr, &serde_json::json!([[get(&format!("/size/{n}"))]])).ok(1);
    r[0].assert_body("16 MiB download", n, &sha256_hex(&pattern(n)));
}

#[test]
fn aioquic_4_mib_upload_is_echoed_intact() {
    let b = backend("b1");
    let p = one_backend_proxy(&b);
    let n = 4 << 20;
    let plan = serde_json::json!([
        [{ "method": "POST", "path": "/echo", "upload": n }],
        [{ "method": "POST", "path": "/upload", "upload": n }],
    ]);
    let r = aioquic(p.addr, &plan).ok(2);
    // The client uploads the `/size/N` pattern.
    r[0].assert_body("4 MiB echo", n, &sha256_hex(&pattern(n)));
    assert_eq!(r[1].status, Some(200), "{:?}", r[1]);
    assert_eq!(r[1].body.as_deref(), Some(format!("{n}\n").as_str()));
}

#[test]
fn aioquic_twenty_parallel_requests_on_one_connection() {
    let b = backend("b1");
    let p = one_backend_proxy(&b);
    let batch: Vec<Value> = (0..20)
        .map(|i| get(&format!("/size/{}", 5000 + i)))
        .collect();
    let r = aioquic(p.addr, &Value::Array(vec![Value::Array(batch)])).ok(20);
    for (i, resp) in r.iter().enumerate() {
        let n = 5000 + i;
        resp.assert_body(&format!("/size/{n}"), n, &sha256_hex(&pattern(n)));
    }
    assert_eq!(b.stats.requests.load(Ordering::Relaxed), 20);
    // One connection: every packet reached its owner.
    assert_eq!(p.misrouted(), 0);
}

/// Runs aioquic with `--resume n` (see the script): `first` on a fresh connection that keeps
/// the session ticket, then `early` sent in 0-RTT on each of `n` resumed connections, which
/// read nothing from the server for their first 300 ms (so Spooky handles `early` while their
/// handshake is still incomplete). Returns the script's JSON after checking that no
/// connection failed.
fn aioquic_resumed(proxy: SocketAddr, first: &Value, early: &Value, n: usize) -> Value {
    let plan = serde_json::json!([first, early]);
    let out = h3_client(proxy, 30)
        .args(["--resume", &n.to_string(), "--hold-handshake", "0.3"])
        .arg("--plan")
        .arg(plan.to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("python3 cannot be started ({e}): run cargo xtask setup"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "h3_client.py printed no result ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(v["error"].is_null(), "aioquic: {v:#}");
    assert_eq!(v["resumptions"].as_array().map(Vec::len), Some(n), "{v:#}");
    v
}

/// A two-worker proxy in front of `b` with `quic.early_data: mode`.
fn early_data_proxy(b: &Backend, mode: &str) -> Proxy {
    proxy(
        &pool_of("main", "/", &[h2c(&b.id, b.addr)]),
        &format!("quic:\n  retry: off\n  early_data: {mode}\n"),
        2,
    )
}

/// The 0-RTT counters of `p`: (resumed handshakes, forwarded, deferred, rejected).
fn early_counters(p: &Proxy) -> [u64; 4] {
    [
        p.stats_sum(|s| s.resumed.load(Ordering::Relaxed)),
        p.stats_sum(|s| s.early_forwarded.load(Ordering::Relaxed)),
        p.stats_sum(|s| s.early_deferred.load(Ordering::Relaxed)),
        p.stats_sum(|s| s.early_rejected.load(Ordering::Relaxed)),
    ]
}

#[test]
fn aioquic_zero_rtt_get_is_marked_and_post_waits_for_the_handshake() {
    let b = backend("b1");
    // Two workers: a resumed connection lands on either, and resumes on both (one ticket
    // key for all workers).
    let p = one_backend_proxy(&b);
    let resumptions = 6;
    let v = aioquic_resumed(
        p.addr,
        &serde_json::json!([get("/")]),
        &serde_json::json!([
            {"method": "GET", "path": "/headers"},
            {"method": "POST", "path": "/headers"},
        ]),
        resumptions,
    );
    for (i, r) in v["resumptions"].as_array().unwrap().iter().enumerate() {
        assert_eq!(r["resumed"], true, "connection {i} did not resume: {r:#}");
        assert_eq!(
            r["early_data"], true,
            "connection {i}: 0-RTT refused: {r:#}"
        );
        let (get, post) = (&r["responses"][0], &r["responses"][1]);
        assert_eq!(get["status"], 200, "{r:#}");
        assert!(
            get["body"].as_str().unwrap().contains("early-data: 1"),
            "the backend must see a 0-RTT GET marked: {get:#}"
        );
        // Held until the handshake completed: no longer replayable, so not marked.
        assert_eq!(post["status"], 200, "{r:#}");
        assert!(
            !post["body"].as_str().unwrap().contains("early-data"),
            "a POST forwarded after the handshake is not early data: {post:#}"
        );
    }
    let n = resumptions as u64;
    let [resumed, forwarded, deferred, rejected] = early_counters(&p);
    assert_eq!(resumed, n, "resumed handshakes");
    assert_eq!((forwarded, deferred, rejected), (n, n, 0));
}

#[test]
fn aioquic_zero_rtt_post_gets_425_when_early_data_is_reject() {
    let b = backend("b1");
    let p = early_data_proxy(&b, "reject");
    let v = aioquic_resumed(
        p.addr,
        &serde_json::json!([get("/")]),
        &serde_json::json!([
            {"method": "POST", "path": "/headers"},
            {"method": "GET", "path": "/headers"},
        ]),
        1,
    );
    let r = &v["resumptions"][0];
    assert_eq!(r["early_data"], true, "{r:#}");
    assert_eq!(r["responses"][0]["status"], 425, "{r:#}");
    let get = &r["responses"][1];
    assert_eq!(get["status"], 200, "a safe method goes through: {r:#}");
    assert!(
        get["body"].as_str().unwrap().contains("early-data: 1"),
        "{get:#}"
    );
    // (Not HEAD here: aioquic 1.7.2 closes the connection on a HEAD response whose
    // content-length is not 0, "content-length does not match data size".)
    assert_eq!(
        b.served(),
        2,
        "the backend saw the two GETs, never the POST"
    );
    assert_eq!(early_counters(&p), [1, 1, 0, 1]);
}

#[test]
fn aioquic_resumes_without_0rtt_when_early_data_is_off() {
    let b = backend("b1");
    let p = early_data_proxy(&b, "off");
    let v = aioquic_resumed(
        p.addr,
        &serde_json::json!([get("/")]),
        &serde_json::json!([{"method": "GET", "path": "/headers"}]),
        2,
    );
    for r in v["resumptions"].as_array().unwrap() {
        assert_eq!(r["resumed"], true, "{r:#}");
        assert_eq!(r["early_data"], false, "0-RTT must be refused: {r:#}");
        let get = &r["responses"][0];
        assert_eq!(get["status"], 200, "sent again after the handshake: {r:#}");
        assert!(
            !get["body"].as_str().unwrap().contains("early-data"),
            "{get:#}"
        );
    }
    assert_eq!(early_counters(&p), [2, 0, 0, 0]);
}

#[test]
fn aioquic_malformed_requests_are_rejected_and_the_connection_keeps_working() {
    let b = backend("b1");
    let p = one_backend_proxy(&b);
    // aioquic sends names exactly as given, so these reach Spooky as written.
    let bad: Vec<(&str, Value)> = vec![
        (
            "uppercase name",
            serde_json::json!({ "path": "/", "headers": [["X-Upper", "1"]] }),
        ),
        (
            "connection",
            serde_json::json!({ "path": "/", "headers": [["connection", "keep-alive"]] }),
        ),
        (
            "keep-alive",
            serde_json::json!({ "path": "/", "headers": [["keep-alive", "timeout=5"]] }),
        ),
        (
            "upgrade",
            serde_json::json!({ "path": "/", "headers": [["upgrade", "websocket"]] }),
        ),
        (
            "te other than trailers",
            serde_json::json!({ "path": "/", "headers": [["te", "gzip"]] }),
        ),
        (
            "pseudo-header after a regular one",
            serde_json::json!({ "fields": [
                [":method", "GET"], [":scheme", "https"], ["x-a", "1"],
                [":authority", "localhost"], [":path", "/"]
            ] }),
        ),
        (
            "no :path",
            serde_json::json!({ "fields": [
                [":method", "GET"], [":scheme", "https"], [":authority", "localhost"]
            ] }),
        ),
        (
            "neither :authority nor host (RFC 9114 §4.3.1)",
            serde_json::json!({ "path": "/", "authority": null }),
        ),
        (
            ":scheme http",
            serde_json::json!({ "path": "/", "scheme": "http" }),
        ),
    ];
    let mut plan = Vec::new();
    for (_, req) in &bad {
        plan.push(Value::Array(vec![req.clone()]));
        plan.push(Value::Array(vec![get("/size/5")]));
    }
    let r = aioquic(p.addr, &Value::Array(plan)).ok(bad.len() * 2);
    for (i, (what, _)) in bad.iter().enumerate() {
        let rejected = &r[2 * i];
        assert!(
            rejected.status == Some(400) || rejected.reset == Some(H3_MESSAGE_ERROR),
            "{what}: expected 400 or a stream reset, got {rejected:?}"
        );
        let next = &r[2 * i + 1];
        next.assert_body(
            &format!("good request after {what}"),
            5,
            &sha256_hex(&pattern(5)),
        );
    }
    // No malformed request reached the backend.
    assert_eq!(b.stats.requests.load(Ordering::Relaxed), bad.len() as u64);
}

// ---------------------------------------------------------------------------------------------
// nginx, an independent HTTP/2 server (h2c and TLS)

const NGINX: &str = "/usr/sbin/nginx";
const FILE_SIZES: [(&str, usize); 2] = [("1m", 1 << 20), ("16m", 16 << 20)];

/// nginx serving `/health` and `/files/{1m,16m}` (the `/size/N` pattern) on an h2c and a TLS
/// listener.
struct Nginx {
    h2c: SocketAddr,
    tls: SocketAddr,
    /// HTTP/1.1 in cleartext.
    h1: SocketAddr,
    /// HTTP/1.1 behind a PROXY protocol header.
    pp: SocketAddr,
    _process: PeerProcess,
    dir: ScratchDir,
}

impl Nginx {
    fn start() -> Self {
        assert!(
            Path::new(NGINX).exists(),
            "nginx not installed ({NGINX} missing): run cargo xtask setup"
        );
        start_on_free_ports("nginx", Self::try_start)
    }

    fn try_start() -> Result<Self, String> {
        let dir = ScratchDir::new("nginx");
        let root = &dir.0;
        std::fs::create_dir_all(root.join("www/files")).unwrap();
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        for (name, n) in FILE_SIZES {
            std::fs::write(root.join("www/files").join(name), pattern(n)).unwrap();
        }
        let h2c = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let tls = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let h1 = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let pp = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let certs = certs_dir();
        let template = std::fs::read_to_string(peers_dir().join("nginx.conf.in")).unwrap();
        let conf = template
            .replace("{{dir}}", &root.display().to_string())
            .replace("{{h2c_port}}", &h2c.port().to_string())
            .replace("{{tls_port}}", &tls.port().to_string())
            .replace("{{h1_port}}", &h1.port().to_string())
            .replace("{{pp_port}}", &pp.port().to_string())
            .replace("{{cert}}", &certs.join("backend.crt").display().to_string())
            .replace("{{key}}", &certs.join("backend.key").display().to_string());
        assert!(!conf.contains("{{"), "unfilled placeholder:\n{conf}");
        std::fs::write(root.join("nginx.conf"), conf).unwrap();
        let mut process = PeerProcess::spawn(
            "nginx",
            Command::new(NGINX)
                .arg("-p")
                .arg(format!("{}/", root.display()))
                .args(["-c", "nginx.conf", "-e"])
                .arg(root.join("error.log")),
            root.join("stdout.log"),
            "run cargo xtask setup",
        );
        let listening =
            || accepts_tcp(h2c) && accepts_tcp(tls) && accepts_tcp(h1) && accepts_tcp(pp);
        if let Err(log) = process.wait_until("listening", listening) {
            return Err(format!("{log}\nerror.log:\n{}", nginx_error_log(root)));
        }
        Ok(Self {
            h2c,
            tls,
            h1,
            pp,
            _process: process,
            dir,
        })
    }

    fn error_log(&self) -> String {
        nginx_error_log(&self.dir.0)
    }
}

fn nginx_error_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
}

/// Downloads `/health` and every file through Spooky, hashes the bodies, and then the 1 MiB
/// file 8 times in parallel on one connection.
/// Downloads every file and checks it, and that nginx served it over `protocol` (as nginx's
/// `$server_protocol` names it).
fn download_files_through(p: &Proxy, nginx: &Nginx, protocol: &str) {
    let mut c = client(p.addr);
    let r = c.request(&Request::get("localhost", "/health"), T).unwrap();
    assert_eq!(r.status, 200, "nginx log:\n{}", nginx.error_log());
    assert_eq!(r.body, b"ok\n");
    for (name, n) in FILE_SIZES {
        let r = c
            .request(&Request::get("localhost", &format!("/files/{name}")), T)
            .unwrap();
        assert_eq!(
            r.status,
            200,
            "/files/{name}; nginx log:\n{}",
            nginx.error_log()
        );
        assert!(r.finished, "/files/{name}: stream not finished cleanly");
        assert_eq!(r.header("x-backend"), Some("nginx"));
        assert_eq!(r.header("x-protocol"), Some(protocol), "/files/{name}");
        assert_eq!(r.body.len(), n, "/files/{name}");
        assert_eq!(
            sha256_hex(&r.body),
            sha256_hex(&pattern(n)),
            "/files/{name}: body differs"
        );
    }
    let sids: Vec<u64> = (0..8)
        .map(|_| c.send(&Request::get("localhost", "/files/1m")).unwrap())
        .collect();
    let want = sha256_hex(&pattern(1 << 20));
    for sid in sids {
        let r = c.wait(sid, T).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(sha256_hex(&r.body), want, "parallel /files/1m");
    }
}

fn verified_tls() -> String {
    format!(
        "{{ca: \"{}\", server_name: localhost}}",
        certs_dir().join("ca.crt").display()
    )
}

#[test]
fn nginx_over_h2c_serves_large_files_intact() {
    let nginx = Nginx::start();
    let p = start_proxy(&pool_of("main", "/", &[h2c("nginx", nginx.h2c)]));
    download_files_through(&p, &nginx, "HTTP/2.0");
}

#[test]
fn nginx_over_http1_serves_large_files_intact() {
    let nginx = Nginx::start();
    let p = start_proxy(&pool_of("main", "/", &[http1("nginx", nginx.h1)]));
    download_files_through(&p, &nginx, "HTTP/1.1");
}

#[test]
fn nginx_behind_the_proxy_protocol_sees_each_client_on_its_own_connection() {
    let nginx = Nginx::start();
    let mut upstreams = pool_of("main", "/", &[http1("nginx", nginx.pp)]);
    upstreams.push_str(
        "        health_check:\n          path: /health\n          interval: 200ms\n          timeout: 150ms\n    send_proxy_protocol: v2\n",
    );
    let p = start_proxy(&upstreams);
    // Two clients (two source ports), each asking twice, interleaved: nginx must see each
    // request as its own client's (a connection shared between them would say otherwise).
    let (mut a, mut b) = (client(p.addr), client(p.addr));
    for _ in 0..2 {
        for c in [&mut a, &mut b] {
            let port = c.local_addr().unwrap().port();
            let r = c.request(&Request::get("localhost", "/whoami"), T).unwrap();
            assert_eq!(r.status, 200, "nginx log:\n{}", nginx.error_log());
            assert_eq!(
                String::from_utf8_lossy(&r.body),
                format!("127.0.0.1 {port}\n")
            );
        }
    }
    // Its probes open with a LOCAL header, which nginx accepts.
    let probes = |result: &str| {
        let text = p.running.as_ref().unwrap().metrics_text();
        metric_sum(
            &text,
            &format!(
                "spooky_health_checks_total{{pool=\"main\",backend=\"nginx\",result=\"{result}\"}}"
            ),
        )
    };
    wait_until("two successful probes", Duration::from_secs(5), || {
        probes("success") >= 2.0
    });
    assert_eq!(probes("failure"), 0.0, "nginx log:\n{}", nginx.error_log());
}

#[test]
fn nginx_over_tls_speaks_http1_or_lets_alpn_decide() {
    let nginx = Nginx::start();
    for (protocol, served) in [("http1", "HTTP/1.1"), ("auto", "HTTP/2.0")] {
        let be = Be {
            id: "nginx-tls",
            addr: nginx.tls,
            tls: Some(verified_tls()),
            protocol: Some(protocol),
        };
        let p = start_proxy(&pool_of("main", "/", &[be]));
        download_files_through(&p, &nginx, served);
    }
}

#[test]
fn nginx_over_verified_tls_serves_large_files_intact() {
    let nginx = Nginx::start();
    let be = Be {
        id: "nginx-tls",
        addr: nginx.tls,
        tls: Some(verified_tls()),
        protocol: None,
    };
    let p = start_proxy(&pool_of("main", "/", &[be]));
    download_files_through(&p, &nginx, "HTTP/2.0");
}

#[test]
fn nginx_tls_certificate_that_does_not_verify_is_a_502() {
    let nginx = Nginx::start();
    // System roots do not know the demo CA; the demo certificate does not name other.example.
    let unknown_ca = Be {
        id: "unknown-ca",
        addr: nginx.tls,
        tls: Some("{server_name: localhost}".into()),
        protocol: None,
    };
    let wrong_name = Be {
        id: "wrong-name",
        addr: nginx.tls,
        tls: Some(format!(
            "{{ca: \"{}\", server_name: other.example}}",
            certs_dir().join("ca.crt").display()
        )),
        protocol: None,
    };
    let upstreams = pool_of("unknown", "/unknown-ca/", &[unknown_ca])
        + &pool_of("wrong", "/wrong-name/", &[wrong_name])
        + &pool_of("main", "/", &[h2c("nginx", nginx.h2c)]);
    let p = start_proxy(&upstreams);
    let mut c = client(p.addr);
    for path in ["/unknown-ca/health", "/wrong-name/health"] {
        let started = Instant::now();
        let r = c.request(&Request::get("localhost", path), T).unwrap();
        assert_eq!(
            r.status,
            502,
            "{path}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{path}: 502 took {:?}",
            started.elapsed()
        );
        let ok = c.request(&Request::get("localhost", "/health"), T).unwrap();
        assert_eq!(ok.status, 200, "after {path}: the next good request failed");
    }
}

// ---------------------------------------------------------------------------------------------
// hypercorn, a strict HTTP/2 server

/// hypercorn running `asgi_app.py` in one process, h2c with prior knowledge (hypercorn switches
/// a cleartext connection to HTTP/2 when it opens with the HTTP/2 preface).
pub(crate) struct Hypercorn {
    pub(crate) addr: SocketAddr,
    _process: PeerProcess,
    _dir: ScratchDir,
}

impl Hypercorn {
    pub(crate) fn start() -> Self {
        require_python("hypercorn", "hypercorn 0.18.0");
        start_on_free_ports("hypercorn", Self::try_start)
    }

    fn try_start() -> Result<Self, String> {
        let dir = ScratchDir::new("hypercorn");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let mut process = PeerProcess::spawn(
            "hypercorn",
            Command::new("python3")
                .args(["-m", "hypercorn", "--workers", "0", "--bind"])
                .arg(addr.to_string())
                .args(["--error-logfile", "-", "asgi_app:app"])
                .current_dir(peers_dir())
                .env("PYTHONDONTWRITEBYTECODE", "1"),
            dir.0.join("hypercorn.log"),
            "run cargo xtask setup",
        );
        // Listening is not enough: the app is imported after the socket is bound.
        process.wait_until("GET /health over HTTP/1.1", || http1_health(addr))?;
        Ok(Self {
            addr,
            _process: process,
            _dir: dir,
        })
    }
}

/// Whether `GET /health` over HTTP/1.1 answers 200.
fn http1_health(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = b"GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
    if s.write_all(req).is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    answer.starts_with(b"HTTP/1.1 200")
}

fn hypercorn_proxy(h: &Hypercorn) -> Proxy {
    start_proxy(&pool_of("main", "/", &[h2c("hypercorn", h.addr)]))
}

#[test]
fn hypercorn_accepts_the_forwarded_authority() {
    let h = Hypercorn::start();
    let p = hypercorn_proxy(&h);
    let authority = "app.example:9889";
    let plan = serde_json::json!([
        // :authority only, as HTTP/3 clients send it.
        [{ "path": "/who?x=1", "authority": authority }],
        // :authority and an identical host.
        [{ "path": "/who", "authority": authority, "headers": [["host", authority]] }],
        // host only (RFC 9114 §4.3.1 allows either).
        [{ "path": "/who", "authority": null, "headers": [["host", authority]] }],
        // POST with a body and a custom field.
        [{ "method": "POST", "path": "/who", "authority": authority,
           "headers": [["x-test", "yes"]], "upload": 1000 }],
        // :authority and a different host.
        [{ "path": "/who", "authority": authority, "headers": [["host", "other.example"]] }],
        [get("/health")],
    ]);
    let r = aioquic(p.addr, &plan).ok(6);
    // hypercorn (through the h2 library) refuses a request whose `host` differs from its
    // `:authority`, so a 200 means Spooky sent it a consistent pair.
    for (i, resp) in r.iter().take(4).enumerate() {
        assert_eq!(resp.status, Some(200), "case {i}: {resp:?}");
        assert_eq!(resp.header("x-backend"), Some("hypercorn"), "case {i}");
        let seen = resp.json_body();
        assert_eq!(seen["http_version"], "2", "case {i}: {seen}");
        assert_eq!(seen["authority"], authority, "case {i}: {seen}");
        assert_eq!(seen["path"], "/who", "case {i}: {seen}");
    }
    // A client's conflicting pair is Spooky's to refuse; the connection keeps working.
    let conflicting = &r[4];
    assert!(
        conflicting.status == Some(400) || conflicting.reset == Some(H3_MESSAGE_ERROR),
        "conflicting host: expected 400 or a stream reset, got {conflicting:?}"
    );
    assert_eq!(
        r[5].status,
        Some(200),
        "after the conflicting host: {:?}",
        r[5]
    );
    assert_eq!(r[0].json_body()["method"], "GET");
    assert_eq!(r[0].json_body()["query"], "x=1");
    let post = r[3].json_body();
    assert_eq!(post["method"], "POST");
    let headers = post["headers"].as_array().unwrap();
    assert!(
        headers.iter().any(|h| h[0] == "x-test" && h[1] == "yes"),
        "{post}"
    );
}

#[test]
fn hypercorn_receives_a_large_upload_intact() {
    let h = Hypercorn::start();
    let p = hypercorn_proxy(&h);
    let n = 8 << 20;
    let plan = serde_json::json!([
        [{ "method": "POST", "path": "/upload", "authority": "localhost", "upload": n }],
        [get("/health")],
    ]);
    let r = aioquic(p.addr, &plan).ok(2);
    assert_eq!(r[0].status, Some(200), "{:?}", r[0]);
    let seen = r[0].json_body();
    assert_eq!(seen["length"], n, "{seen}");
    assert_eq!(seen["sha256"], sha256_hex(&pattern(n)), "{seen}");
    assert_eq!(r[1].status, Some(200));
    assert_eq!(r[1].body.as_deref(), Some("ok\n"));
}

#[test]
fn hypercorn_over_http1_gets_the_request_and_its_uploads_intact() {
    let h = Hypercorn::start();
    let mut upstreams = pool_of("main", "/", &[http1("hypercorn", h.addr)]);
    upstreams.push_str(
        "        health_check:\n          path: /health\n          interval: 200ms\n          timeout: 150ms\n",
    );
    let p = start_proxy(&upstreams);
    let authority = "app.example:9889";
    let n = 8 << 20;
    let plan = serde_json::json!([
        [{ "path": "/who?x=1", "authority": authority, "headers": [["x-test", "yes"]] }],
        [{ "method": "POST", "path": "/upload", "authority": "localhost", "upload": n }],
        [{ "method": "POST", "path": "/upload", "authority": "localhost", "upload": 1000 }],
        [get("/health")],
    ]);
    let r = aioquic(p.addr, &plan).ok(4);
    let seen = r[0].json_body();
    assert_eq!(r[0].status, Some(200), "{:?}", r[0]);
    assert_eq!(seen["http_version"], "1.1", "{seen}");
    assert_eq!(seen["authority"], authority, "{seen}");
    assert_eq!(seen["path"], "/who", "{seen}");
    assert_eq!(seen["query"], "x=1", "{seen}");
    let headers = seen["headers"].as_array().unwrap();
    assert!(
        headers.iter().any(|h| h[0] == "x-test" && h[1] == "yes"),
        "{seen}"
    );
    assert!(headers.iter().any(|h| h[0] == "x-forwarded-for"), "{seen}");
    for (resp, len) in [(&r[1], n), (&r[2], 1000)] {
        assert_eq!(resp.status, Some(200), "{resp:?}");
        let up = resp.json_body();
        assert_eq!(up["length"], len, "{up}");
        assert_eq!(up["sha256"], sha256_hex(&pattern(len)), "{up}");
    }
    assert_eq!(r[3].body.as_deref(), Some("ok\n"));
    // Its probes are HTTP/1.1 too, and hypercorn answers them.
    let probes = |result: &str| {
        let text = p.running.as_ref().unwrap().metrics_text();
        metric_sum(&text, &format!("spooky_health_checks_total{{pool=\"main\",backend=\"hypercorn\",result=\"{result}\"}}"))
    };
    wait_until("two successful probes", Duration::from_secs(5), || {
        probes("success") >= 2.0
    });
    assert_eq!(probes("failure"), 0.0);
    assert_eq!(backend_state(&p, "hypercorn"), Some(0));
}
