//! Shared test support: demo certificates (the same generator `cargo xtask certs` uses),
//! in-process HTTP/2 demo backends, an in-process Spooky built from a YAML snippet, and
//! HTTP/3 clients. Everything binds to 127.0.0.1 only.

#![allow(dead_code)]

use spooky::app::{RunOptions, Running};
use spooky_peers::client::{Client, ClientOptions};
use spooky_peers::demo::{DemoOptions, DemoStats};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `config/certs` with the demo CA, Spooky's and the backends' certificates.
pub fn certs_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        spooky_peers::certs::generate(&repo_root().join("config/certs"))
            .expect("generate demo certificates")
    })
    .clone()
}

/// Issues a new `NAME.crt`/`NAME.key` in `dir` from the CA there (`ca.key`).
pub fn issue_cert(dir: &std::path::Path, name: &str, common_name: &str) -> PathBuf {
    spooky_peers::certs::issue(dir, name, common_name).unwrap()
}

/// Logs go to the test's captured output; `RUST_LOG` picks the level (default warn).
pub fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// A BPF pin directory no other proxy of this test run uses.
pub fn unique_pin_path() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    PathBuf::from(format!(
        "/sys/fs/bpf/spooky-test-{}-{n}",
        std::process::id()
    ))
}

/// A control socket path no other proxy of this test run uses.
pub fn unique_control_socket() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("spooky-test-{}-{n}.sock", std::process::id()))
}

/// The sum of the Prometheus samples in `text` whose series starts with `prefix` (a metric
/// name, or a name and the first labels).
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A port number free on 127.0.0.1 over UDP and TCP, for a process that binds it itself.
///
/// Picked below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`, 32768 and up
/// by default), so no socket bound to port 0 — every backend and client of the other tests —
/// can be handed it between this check and the bind; numbers go round from a point that
/// depends on the process id, and no number is given out twice in one test run.
pub fn free_udp_port() -> u16 {
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let start = (std::process::id() % u32::from(SPAN)) as u16;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = FIRST + (start + n) % SPAN;
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if udp && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no port free over both UDP and TCP on 127.0.0.1 in {FIRST}..{}",
        FIRST + SPAN
    );
}

/// A TCP address where connecting is refused: a socket bound there that never listens, kept
/// for the rest of the test run so that no other socket can take the port.
pub fn dead_tcp_addr() -> SocketAddr {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    std::mem::forget(s);
    addr
}

/// An in-process HTTP/2 demo backend (stopped when dropped).
pub struct Backend {
    pub id: String,
    pub addr: SocketAddr,
    pub stats: Arc<DemoStats>,
    pub server: spooky_peers::demo::DemoServer,
}

impl Backend {
    /// Requests this backend has served.
    pub fn served(&self) -> u64 {
        self.stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops it (listener and connections closed) and returns how to start it again.
    pub fn kill(self) -> (String, SocketAddr) {
        (self.id, self.addr)
    }
}

pub fn backend(id: &str) -> Backend {
    backend_with(DemoOptions {
        id: id.into(),
        goaway_every: None,
    })
}

pub fn backend_with(opts: DemoOptions) -> Backend {
    backend_at("127.0.0.1:0".parse().unwrap(), opts)
}

/// A demo backend on a given address (e.g. restarting one that was killed).
pub fn backend_at(addr: SocketAddr, opts: DemoOptions) -> Backend {
    let id = opts.id.clone();
    let server = spooky_peers::demo::spawn(addr, opts).unwrap();
    Backend {
        id,
        addr: server.addr,
        stats: server.stats.clone(),
        server,
    }
}

/// YAML for one upstream pool.
pub fn pool(
    name: &str,
    prefix: &str,
    host: Option<&str>,
    lb: &str,
    backends: &[(&str, SocketAddr)],
    extra: &str,
) -> String {
    let mut s = format!("  {name}:\n    load_balancing:\n      type: {lb}\n    route:\n      path_prefix: \"{prefix}\"\n");
    if let Some(h) = host {
        s.push_str(&format!("      host: \"{h}\"\n"));
    }
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        s.push_str(&format!("    {line}\n"));
    }
    s.push_str("    backends:\n");
    for (id, addr) in backends {
        s.push_str(&format!("      - id: {id}\n        address: \"{addr}\"\n"));
    }
    s
}

/// A running in-process Spooky; shut down gracefully when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    pub running: Option<Running>,
}

impl Proxy {
    pub fn stats_sum(&self, f: impl Fn(&spooky::stats::WorkerStats) -> u64) -> u64 {
        self.running
            .as_ref()
            .unwrap()
            .worker_stats()
            .iter()
            .map(|s| f(s))
            .sum()
    }

    pub fn misrouted(&self) -> u64 {
        self.stats_sum(|s| s.misrouted.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Graceful shutdown, waiting for the workers.
    pub fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            r.begin_shutdown();
            r.join().unwrap();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.begin_shutdown();
            // A worker that failed (a panic) fails the test, unless it is failing already.
            if let Err(e) = r.join() {
                if !std::thread::panicking() {
                    panic!("a worker failed: {e}");
                }
            }
        }
    }
}

/// The full YAML of a test config around `upstreams` (already indented pools) and `extra`
/// top-level sections. The TCP listener takes a free port (the UDP port number may be taken
/// over TCP by another test's connection). The admin listener takes a free loopback port unless `extra` has an
/// `admin:` section.
pub fn config_yaml(port: u16, upstreams: &str, extra: &str) -> String {
    let certs = certs_dir();
    let mut admin = String::new();
    if !extra.contains("admin:") {
        admin.push_str("admin:\n  address: 127.0.0.1:0\n");
    }
    if !extra.contains("steering:") {
        // Every proxy of the test run pins its BPF maps in a place of its own.
        admin.push_str(&format!(
            "steering:\n  pin_path: {}\n",
            unique_pin_path().display()
        ));
    }
    if !extra.contains("control_socket:") {
        // …and listens for a successor on a control socket of its own.
        admin.push_str(&format!(
            "control_socket: {}\n",
            unique_control_socket().display()
        ));
    }
    format!(
        "version: 1\nlisten:\n  protocol: http3\n  address: 127.0.0.1\n  port: {port}\n  tls:\n    cert: {}\n    key: {}\n  tcp:\n    port: 0\n{admin}{extra}\nupstream:\n{upstreams}",
        certs.join("spooky.crt").display(),
        certs.join("spooky.key").display(),
    )
}

/// Starts Spooky with `workers` workers on a free port.
pub fn proxy(upstreams: &str, extra: &str, workers: usize) -> Proxy {
    init_logging();
    let port = free_udp_port();
    let yaml = config_yaml(port, upstreams, extra);
    let mut config = spooky::config::parse(&yaml, &repo_root())
        .unwrap_or_else(|e| panic!("test config invalid: {e}\n{yaml}"));
    config.workers = Some(workers);
    proxy_from(config)
}

/// What the in-process tests run with: `workers` unpinned workers, no XDP, no takeover.
fn run_options(workers: usize) -> RunOptions {
    RunOptions {
        workers: Some(workers),
        iface: None,
        pin: false,
        takeover: false,
        lock_down: false,
    }
}

/// Starts Spooky from the file at `path` (reloads read it again) with `workers` workers.
pub fn start_file(path: &std::path::Path, workers: usize) -> Running {
    init_logging();
    spooky::app::start_file(path, &run_options(workers)).unwrap()
}

/// Starts Spooky on `config` with the number of workers it names (2 if none), unpinned.
pub fn proxy_from(config: spooky::config::Config) -> Proxy {
    let workers = config.workers.unwrap_or(2);
    let running = spooky::app::start(config, &run_options(workers)).unwrap();
    Proxy {
        addr: running.local_addr,
        running: Some(running),
    }
}

/// An HTTP/3 client connected to `addr`, verifying Spooky's certificate with the demo CA.
/// Starts the real `spooky` binary on `config` with `workers` unpinned workers.
pub fn spawn_spooky(config: &std::path::Path, workers: usize) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_spooky"))
        .arg("--config")
        .arg(config)
        .args(["--workers", &workers.to_string(), "--no-pin"])
        .spawn()
        .expect("start spooky")
}

pub fn client(addr: SocketAddr) -> Client {
    let opts = ClientOptions {
        verify: true,
        ca: Some(certs_dir().join("ca.crt")),
        ..Default::default()
    };
    Client::connect(addr, &opts, T).unwrap()
}

/// The `/size/N` body.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(spooky_peers::demo::pattern_byte).collect()
}

pub const T: Duration = Duration::from_secs(20);

fn python_has(module: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Fails the test, naming the package, when python3 cannot import `module`.
/// Fails the test, naming the Debian package, when `binary` is not on the PATH.
pub fn require_command(binary: &str, package: &str) {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{binary} is missing: install the Debian package {package} (cargo xtask setup does)"
    );
}

pub fn require_python(module: &str, package: &str) {
    assert!(
        python_has(module),
        "python3 cannot import {module}: {package} not installed: run cargo xtask setup"
    );
}

/// The directory of the test peers' scripts and configurations.
pub fn peers_dir() -> PathBuf {
    repo_root().join("spooky/tests/peers")
}

/// Waits until `cond` holds, polling every 10 ms; fails the test naming `what` after
/// `within`.
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The health state of every backend, from `/metrics` (`spooky_backend_health_state`).
pub fn backend_states(p: &Proxy) -> Vec<(String, u64)> {
    let text = p.running.as_ref().unwrap().metrics_text();
    text.lines()
        .filter(|l| l.starts_with("spooky_backend_health_state{"))
        .filter_map(|l| {
            let backend = l.split("backend=\"").nth(1)?.split('"').next()?.to_owned();
            Some((backend, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// The health state of backend `id` (0 healthy, 1 unhealthy, 2 ejected, 3 recovering).
pub fn backend_state(p: &Proxy, id: &str) -> Option<u64> {
    backend_states(p)
        .into_iter()
        .find(|(b, _)| b == id)
        .map(|(_, s)| s)
}

/// Waits until `backend` is sending `n` responses (requests answered in full or reset by
/// the proxy are over).
pub fn wait_for_backend_streams(backend: &Backend, n: u64) {
    let what = format!("the backend sending {n} responses");
    wait_until(&what, T, || {
        backend
            .stats
            .streams_open
            .load(std::sync::atomic::Ordering::Relaxed)
            == n
    });
}

/// Waits until `backend` is sending at least `n` responses.
pub fn wait_for_backend_streams_at_least(backend: &Backend, n: u64) {
    let what = format!("the backend sending at least {n} responses");
    wait_until(&what, T, || {
        backend
            .stats
            .streams_open
            .load(std::sync::atomic::Ordering::Relaxed)
            >= n
    });
}

/// HTTP/3 error codes (RFC 9114 §8.1), written out here rather than taken from the code under
/// test.
pub const H3_INTERNAL_ERROR: u64 = 0x102;
pub const H3_MESSAGE_ERROR: u64 = 0x10e;

/// A rustls client configuration that trusts the demo CA and offers `alpn`.
pub fn tls_client_config(alpn: &[u8]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(certs_dir().join("ca.crt")).unwrap();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

/// A fresh private directory under the system temp dir, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(what: &str) -> Self {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("spooky-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// dnsmasq on 127.0.0.1:`port` in the foreground, answering only what `answers` (its own
/// options: `--address=…`, `--addn-hosts=…`, `--local-ttl=…`) says: no upstream servers, no
/// `/etc/hosts`. The caller stops it by its PID.
pub fn dnsmasq(port: u16, answers: &[String]) -> std::process::Child {
    require_command("dnsmasq", "dnsmasq-base");
    std::process::Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--user=root",
            "--pid-file=",
        ])
        .arg(format!("--port={port}"))
        .args(answers)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("dnsmasq")
}
