//! Upgrades, restarts and crashes, end to end: the real `spooky` binary in a server network
//! namespace, clients in a client namespace (see `netns`), on each steering tier:
//!
//! - classic BPF: the binary as `nobody` (no privileges, so no eBPF);
//! - sk_reuseport: as root without `--iface`;
//! - XDP: as root with `--iface` on the server's veth.
//!
//! A takeover (`spooky --takeover`) is run three times in a row under a steady aioquic load
//! (`spooky/tests/peers/h3_load.py`: 24 clients, each sending a request 50 ms after the last answer and opening connection after connection, plus a
//! 64 MiB download checked byte for byte): not one request may fail, and every predecessor
//! must drain and exit 0. A crash (`kill -9`) is followed by a fresh start with the same key
//! file: clients of the dead process get a Stateless Reset at once (quiche's client, and curl
//! through curl_cffi, which then retries on a new connection) instead of waiting out the idle
//! timeout. Beside the HTTP/3 load, curl keeps fetching over TCP (HTTP/2 and HTTP/1.1, four
//! requests per connection) through the takeovers: not one may fail either. A Retry token minted before a restart is accepted after it, and after one rotation
//! of the token key, but not after two.

use crate::netns::{in_netns, run, Netns, SERVER_V4, UNPRIVILEGED};
use crate::support::{certs_dir, init_logging, metric_sum, pool, T};
use spooky_peers::client::{Client, ClientError, ClientOptions, Request};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const PORT: u16 = 4443;
const ADMIN: &str = "127.0.0.1:9901";
/// Where `nobody` may read (the repository may be below a directory it cannot enter).
const NOBODY: &str = "65534:65534";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tier {
    Classic,
    SkReuseport,
    Xdp,
}

/// A server namespace with a backend and a configuration directory for Spooky.
struct Site {
    ns: Netns,
    tier: Tier,
    dir: PathBuf,
    pin: PathBuf,
    _backend: crate::support::Backend,
}

impl Site {
    fn new(tier: Tier) -> Self {
        Self::with_quic(tier, "")
    }

    /// A site whose `quic:` section also has `quic` (indented lines).
    fn with_quic(tier: Tier, quic: &str) -> Self {
        init_logging();
        let ns = Netns::new();
        let backend = in_netns(&ns.server, || crate::support::backend("b1"));
        let dir = std::env::temp_dir().join(format!("spooky-takeover-{}", ns.server));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run")).unwrap();
        for f in ["spooky.crt", "spooky.key"] {
            std::fs::copy(certs_dir().join(f), dir.join(f)).unwrap();
        }
        // `ip netns exec` mounts a fresh /sys for each command, so a BPF filesystem under
        // /sys/fs/bpf would not outlive one process: the pins go on one of our own.
        let bpffs = dir.join("bpf");
        std::fs::create_dir_all(&bpffs).unwrap();
        run("mount", &["-t", "bpf", "bpf", &bpffs.display().to_string()]);
        let pin = bpffs.join("spooky");
        let yaml = format!(
            "version: 1\nlisten:\n  protocol: http3\n  address: \"::\"\n  port: {PORT}\n  tls:\n    cert: {dir}/spooky.crt\n    key: {dir}/spooky.key\nadmin:\n  address: {ADMIN}\nquic:\n  key_file: {dir}/run/keys.yaml\n{quic}steering:\n  pin_path: {pin}\ncontrol_socket: {dir}/run/control.sock\nproxy:\n  shutdown_grace: 300s\nupstream:\n{pools}",
            dir = dir.display(),
            pin = pin.display(),
            pools = pool("main", "/", None, "round-robin", &[("b1", backend.addr)], ""),
        );
        std::fs::write(dir.join("config.yaml"), yaml).unwrap();
        run("chmod", &["-R", "a+rX", &dir.display().to_string()]);
        if tier == Tier::Classic {
            // `nobody` makes its control socket and key file there; root (with no
            // capability left after start-up) needs its own directory, as in /run/spooky.
            run("chown", &[NOBODY, &dir.join("run").display().to_string()]);
        }
        Self {
            ns,
            tier,
            dir,
            pin,
            _backend: backend,
        }
    }

    /// Starts process `n` of this site (with `--takeover` when `takeover`).
    fn spawn(&self, n: usize, takeover: bool) -> Proc {
        self.spawn_with_env(n, takeover, &[])
    }

    /// [`Site::spawn`] with environment variables.
    fn spawn_with_env(&self, n: usize, takeover: bool, env: &[(&str, &std::path::Path)]) -> Proc {
        let log = self.dir.join(format!("spooky-{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.server]);
        // (The 64 MiB download may outlast the default 30 s drain when the machine is busy:
        // `proxy.shutdown_grace` is 300 s here.)
        if self.tier == Tier::Classic {
            cmd.args(UNPRIVILEGED);
        }
        cmd.arg(env!("CARGO_BIN_EXE_spooky"))
            .arg("--config")
            .arg(self.dir.join("config.yaml"))
            .args(["--workers", "2", "--no-pin"]);
        if self.tier == Tier::Xdp {
            cmd.args(["--iface", &self.ns.server_if]);
        }
        if takeover {
            cmd.arg("--takeover");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("SPOOKY_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn spooky under ip netns exec");
        Proc { child, log }
    }

    /// Runs `args` of the `spooky` binary in the server namespace (as root).
    fn spooky(&self, args: &[&str]) -> String {
        let mut all = vec![
            "netns",
            "exec",
            &self.ns.server,
            env!("CARGO_BIN_EXE_spooky"),
        ];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `spooky status --json` of the pins (eBPF tiers).
    fn status(&self) -> serde_json::Value {
        let pin = self.pin.display().to_string();
        let out = self.spooky(&["status", "--pin-path", &pin, "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON ({e}): {out}"))
    }

    /// The admin `/metrics` text of whichever process serves it now.
    fn metrics(&self) -> String {
        let url = format!("http://{ADMIN}/metrics");
        run(
            "ip",
            &["netns", "exec", &self.ns.server, "curl", "-sf", &url],
        )
    }

    /// The aioquic load, from the client namespace; returns once it is under way.
    fn load(&self) -> Load {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns.client, "python3"])
            .arg(crate::support::repo_root().join("spooky/tests/peers/h3_load.py"))
            .args(["--host", SERVER_V4, "--port", &PORT.to_string(), "--ca"])
            .arg(certs_dir().join("ca.crt"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 (aioquic) cannot be started: run cargo xtask setup");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            "started",
            "the aioquic load did not get going: {line}"
        );
        Load {
            child,
            stdin,
            stdout,
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.join("bpf")).status();
        if std::env::var_os("SPOOKY_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One Spooky process (our child: `ip netns exec` and `setpriv` exec into it).
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until it logs that it serves.
    fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log().contains("spooky is serving HTTP/3") {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("spooky exited ({status}) before serving:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "spooky never served:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for it to exit (at most `within`).
    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "spooky (pid {}) still running after {within:?}:\n{}",
                self.child.id(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: signalling our own child, by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// The running aioquic load.
struct Load {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Load {
    /// Stops it and returns its report.
    fn stop(mut self) -> serde_json::Value {
        writeln!(self.stdin, "stop").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let _ = self.child.wait();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("load report ({e}): {line}"))
    }
}

/// Three takeovers in a row under load on `tier`: no failed request, every predecessor
/// drains and exits 0, the successor serves the same address and admin listener.
/// curl over `proto` (`--http2`, `--http1.1`) from the client namespace `ns`, fetching `paths`
/// on one connection; stdout has one status per line.
fn curl_tcp(ns: &str, proto: &str, paths: &[&str]) -> std::process::Output {
    let base = format!("https://localhost:{PORT}");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "curl", "-sS", proto])
        .args(["--max-time", "20", "--cacert"])
        .arg(certs_dir().join("ca.crt"))
        .args(["--resolve", &format!("localhost:{PORT}:{SERVER_V4}")])
        .args(["-w", "%{http_code}\n"]);
    for path in paths {
        cmd.args(["-o", "/dev/null"]).arg(format!("{base}{path}"));
    }
    cmd.output().expect("curl")
}

/// curl over `proto` (`--http2`, `--http1.1`) from the client namespace, again and again until
/// stopped. Each run streams one response for a second (100 chunks 10 ms apart) and then
/// fetches 100 KB on the same connection: a connection open when a takeover starts is still
/// open when the old process drains, and one cut under a response in flight shows as a failed
/// transfer (curl retries only requests that got no byte). Returns (responses with status
/// 200, everything else: other statuses and curl failures, with what they were).
fn tcp_load(
    ns: String,
    proto: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut ok, mut failed) = (0u64, Vec::new());
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let out = curl_tcp(&ns, proto, &["/stream/100/10", "/size/100000"]);
            let text = String::from_utf8_lossy(&out.stdout);
            for code in text.lines() {
                if code == "200" {
                    ok += 1;
                } else {
                    failed.push(format!("{proto}: status {code}"));
                }
            }
            if !out.status.success() {
                failed.push(format!(
                    "{proto}: curl {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        (ok, failed)
    })
}

/// A response streaming over TCP (`/stream/300/10`: 300 chunks 10 ms apart) to curl in `ns`
/// over `proto`, started and seen flowing: returns once its first chunk arrived, with the
/// thread that reads the rest: (curl's exit, chunks received, the last line — curl's
/// status code —, curl's stderr).
fn stream_over_tcp(
    ns: &str,
    proto: &'static str,
) -> std::thread::JoinHandle<(std::process::ExitStatus, usize, String, String)> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sS", "-N", proto])
        .args(["--max-time", "20", "--cacert"])
        .arg(certs_dir().join("ca.crt"))
        .args(["--resolve", &format!("localhost:{PORT}:{SERVER_V4}")])
        .args(["-w", "\n%{http_code}\n"])
        .arg(format!("https://localhost:{PORT}/stream/300/10"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl");
    let stdout = child.stdout.take().unwrap();
    let (began, begun) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let (mut chunks, mut last) = (0usize, String::new());
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("chunk ") {
                chunks += 1;
                if chunks == 1 {
                    let _ = began.send(());
                }
            }
            if !line.is_empty() {
                last = line;
            }
        }
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let exit = child.wait().expect("curl exits");
        (exit, chunks, last, stderr)
    });
    begun
        .recv_timeout(T)
        .unwrap_or_else(|_| panic!("the streaming response over TCP ({proto}) never began"));
    reader
}

fn takeovers_under_load(tier: Tier) {
    let site = Site::new(tier);
    let mut current = site.spawn(0, false);
    current.wait_serving();
    let load = site.load();
    let stop_tcp = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tcp =
        ["--http2", "--http1.1"].map(|p| tcp_load(site.ns.client.clone(), p, stop_tcp.clone()));
    let first_generation = 0u64;
    for n in 1..=3 {
        // Two responses streaming over TCP from the process about to be replaced, for 3 s,
        // seen flowing before the takeover starts: they must finish whole after it hands
        // over.
        let in_flight =
            ["--http2", "--http1.1"].map(|proto| stream_over_tcp(&site.ns.client, proto));
        let mut next = site.spawn(n, true);
        next.wait_serving();
        let status = current.wait_exit(Duration::from_secs(300));
        for (t, proto) in in_flight.into_iter().zip(["--http2", "--http1.1"]) {
            let (exit, chunks, last, stderr) = t.join().unwrap();
            assert!(
                exit.success() && chunks == 300 && last == "200",
                "takeover {n}: a response streaming over TCP ({proto}) from the old process \
                 did not finish: {exit}, {chunks} chunks, last line {last:?}: {stderr}"
            );
        }
        let log = current.log();
        assert!(
            status.success(),
            "process {} exited with {status}:\n{log}",
            n - 1
        );
        assert!(
            log.contains("handed over; draining"),
            "no handover logged:\n{log}"
        );
        assert!(
            log.contains("draining connections="),
            "no drain progress:\n{log}"
        );
        assert!(
            !log.contains('\u{1b}'),
            "colour codes in a log file:\n{log}"
        );
        current = next;
        if tier != Tier::Classic {
            // The successor forgets its predecessor once the predecessor's sockets are gone.
            let deadline = Instant::now() + Duration::from_secs(10);
            let status = loop {
                let status = site.status();
                if status["generations"]
                    .as_array()
                    .is_some_and(|g| g.len() == 1)
                {
                    break status;
                }
                assert!(
                    Instant::now() < deadline,
                    "the predecessor is still known: {status:#}"
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            let generations = status["generations"].as_array().unwrap();
            assert_eq!(generations[0]["generation"], first_generation + n as u64);
            assert_eq!(generations[0]["accepting"], true);
            // XDP stayed on the interface, with the newest process's program.
            let want = if tier == Tier::Xdp {
                "xdp-"
            } else {
                "sk-reuseport"
            };
            assert!(
                status["mode"].as_str().unwrap().starts_with(want),
                "{status:#}"
            );
            assert_eq!(status["pid"], u64::from(current.child.id()), "{status:#}");
        }
    }
    let report = load.stop();
    eprintln!("{tier:?}: {report}");
    stop_tcp.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut tcp_ok, mut tcp_failed) = (0, Vec::new());
    for t in tcp {
        let (ok, failed) = t.join().unwrap();
        tcp_ok += ok;
        tcp_failed.extend(failed);
    }
    eprintln!("{tier:?}: over TCP {tcp_ok} answered 200, failures: {tcp_failed:?}");
    assert!(
        tcp_failed.is_empty(),
        "requests over TCP failed across the takeovers: {tcp_failed:#?}"
    );
    assert!(tcp_ok > 20, "the TCP load ran: {tcp_ok} answered");
    assert_eq!(
        report["failed"], 0,
        "requests failed across the takeovers: {report:#}"
    );
    assert_eq!(
        report["download"]["ok"], true,
        "the 64 MiB download: {report:#}"
    );
    assert!(report["ok"].as_u64().unwrap() > 100, "{report:#}");
    // The admin listener went from process to process: the last one answers on it, and the
    // process serving holds no capability any more.
    let status = run(
        "ip",
        &[
            "netns",
            "exec",
            &site.ns.server,
            "curl",
            "-sf",
            &format!("http://{ADMIN}/status"),
        ],
    );
    assert!(status.contains("\"capabilities\":\"0x0\""), "{status}");
    let metrics = site.metrics();
    assert!(
        metrics.contains("spooky_quic_connections_accepted_total"),
        "{metrics}"
    );
    if tier == Tier::Classic {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !current
            .log()
            .contains("re-attached after the predecessor left")
        {
            assert!(Instant::now() < deadline, "{}", current.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    current.signal(libc::SIGTERM);
    let status = current.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{}", current.log());
    assert!(
        !site.pin.join("config").exists(),
        "pins left after the last process"
    );
}

#[test]
#[ignore = "needs root"]
fn three_takeovers_under_load_lose_nothing_with_classic_bpf() {
    takeovers_under_load(Tier::Classic);
}

#[test]
#[ignore = "needs root"]
fn three_takeovers_under_load_lose_nothing_with_sk_reuseport() {
    takeovers_under_load(Tier::SkReuseport);
}

#[test]
#[ignore = "needs root"]
fn three_takeovers_under_load_lose_nothing_with_xdp() {
    takeovers_under_load(Tier::Xdp);
}

/// The systemd way: `spooky --takeover --detach` returns 0 once the new process serves, and
/// each process tells `$NOTIFY_SOCKET` it is ready and is the service's main process.
#[test]
#[ignore = "needs root"]
fn a_detached_takeover_returns_once_the_successor_serves_and_notifies_systemd() {
    let site = Site::new(Tier::SkReuseport);
    let notify_path = site.dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let notified = || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).expect("no sd_notify message");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut first = site.spawn_with_env(0, false, &[("NOTIFY_SOCKET", &notify_path)]);
    first.wait_serving();
    let first_pid = first.child.id();
    assert_eq!(notified(), format!("READY=1\nMAINPID={first_pid}\n"));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &site.ns.server,
            env!("CARGO_BIN_EXE_spooky"),
        ])
        .arg("--config")
        .arg(site.dir.join("config.yaml"))
        .args(["--workers", "2", "--no-pin", "--takeover", "--detach"])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "spooky --takeover --detach: {}",
        out.status
    );
    // It serves by now: its notification is there, and the admin listener is its own.
    let message = notified();
    let pid: u32 = message
        .strip_prefix("READY=1\nMAINPID=")
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or_else(|| panic!("{message:?}"));
    assert_ne!(pid, first_pid);
    let status = site.status();
    assert_eq!(status["pid"], u64::from(pid), "{status:#}");
    assert!(
        first.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        first.log()
    );
    // The detached process is ours to stop: by its pid.
    // SAFETY: signalling the process this test started (through --detach).
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the detached spooky did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// quiche's client in the client namespace, connected to the site.
fn quiche_client() -> Client {
    let opts = ClientOptions {
        verify: true,
        ca: Some(certs_dir().join("ca.crt")),
        ..Default::default()
    };
    let addr = SocketAddr::new(SERVER_V4.parse().unwrap(), PORT);
    Client::connect(addr, &opts, Duration::from_secs(10)).expect("connect")
}

/// curl (libcurl with ngtcp2, through curl_cffi) in the client namespace: one HTTP/3 GET on a
/// fresh connection, then, after a line on stdin, a second GET on the same handle.
const CURL_TWICE: &str = r#"
import sys, time
from curl_cffi import requests, CurlHttpVersion, CurlOpt
s = requests.Session(
    http_version=CurlHttpVersion.V3ONLY,
    verify=sys.argv[2],
    curl_options={CurlOpt.RESOLVE: [sys.argv[3]]},
)
r = s.get(sys.argv[1], timeout=10)
print(r.status_code, len(r.content), flush=True)
sys.stdin.readline()
t = time.monotonic()
# libcurl sends the request again on a new connection when the reset comes before the
# request; when it comes after, it reports the error: then a second try, once.
failed = "-"
try:
    r = s.get(sys.argv[1], timeout=10)
except Exception as e:
    failed = round(time.monotonic() - t, 3)
    print("first try failed after", failed, "s:", e, file=sys.stderr, flush=True)
    s = requests.Session(
        http_version=CurlHttpVersion.V3ONLY,
        verify=sys.argv[2],
        curl_options={CurlOpt.RESOLVE: [sys.argv[3]]},
    )
    r = s.get(sys.argv[1], timeout=10)
print(r.status_code, len(r.content), round(time.monotonic() - t, 3), failed, flush=True)
"#;

/// A `kill -9`, then a fresh start on the same key file: the dead process's clients get a
/// Stateless Reset from the new one instead of waiting out their idle timeout.
#[test]
#[ignore = "needs root"]
fn after_a_crash_the_next_process_resets_the_dead_ones_connections() {
    let site = Site::new(Tier::SkReuseport);
    let mut first = site.spawn(0, false);
    first.wait_serving();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let client = std::thread::spawn({
        let netns = site.ns.client.clone();
        move || {
            in_netns(&netns, move || {
                let mut c = quiche_client();
                let get = Request::get("localhost", "/size/100");
                let r = c.request(&get, Duration::from_secs(10)).unwrap();
                assert_eq!(r.status, 200);
                ready_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                let started = Instant::now();
                let err = c
                    .request(&get, Duration::from_secs(20))
                    .expect_err("a request on a connection of a dead process");
                let took = started.elapsed();
                // The client reconnects, and the new process serves it.
                let mut fresh = quiche_client();
                let r = fresh.request(&get, Duration::from_secs(10)).unwrap();
                assert_eq!(r.status, 200, "a new connection after the reset");
                (err, took)
            })
        }
    });
    // curl's connection, through curl_cffi.
    let url = format!("https://localhost:{PORT}/size/100");
    let mut curl = Command::new("ip")
        .args([
            "netns",
            "exec",
            &site.ns.client,
            "python3",
            "-c",
            CURL_TWICE,
            &url,
        ])
        .arg(certs_dir().join("ca.crt"))
        .arg(format!("localhost:{PORT}:{SERVER_V4}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (curl_cffi)");
    let mut curl_out = BufReader::new(curl.stdout.take().unwrap());
    let mut line = String::new();
    curl_out.read_line(&mut line).unwrap();
    assert_eq!(
        line.split_whitespace().next(),
        Some("200"),
        "curl over HTTP/3: {line}"
    );
    ready_rx.recv().unwrap();

    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(10));
    let mut second = site.spawn(1, false);
    second.wait_serving();
    let log = second.log();
    assert!(
        log.contains("did not shut down cleanly"),
        "stale pins not noticed:\n{log}"
    );

    go_tx.send(()).unwrap();
    let (err, took) = client.join().unwrap();
    assert!(
        matches!(err, ClientError::StatelessReset),
        "quiche's client: {err} after {took:?}"
    );
    // Not the idle timeout (30 s): the reset answers the first packet (a bound with room for
    // a loaded 2-core machine).
    assert!(took < Duration::from_secs(5), "the reset took {took:?}");
    eprintln!("quiche client: stateless reset after {took:?}");
    // curl learns of the reset at once and gets its answer on a new connection (by itself,
    // or after reporting the reset: which one depends on when the reset arrives).
    writeln!(curl.stdin.as_mut().unwrap(), "go").unwrap();
    let mut line = String::new();
    curl_out.read_line(&mut line).unwrap();
    let out = curl.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        fields.first(),
        Some(&"200"),
        "curl's second request: {line}{stderr}"
    );
    let curl_took: f64 = fields[2].parse().unwrap();
    assert!(
        curl_took < 5.0,
        "curl's second request took {curl_took} s: {stderr}"
    );
    eprintln!(
        "curl: second request answered after {curl_took}s (first try failed after: {} s) {stderr}",
        fields[3]
    );
    let metrics = site.metrics();
    let resets = metric_sum(&metrics, "spooky_quic_stateless_resets_sent_total");
    assert!(resets >= 2.0, "resets sent: {resets}\n{metrics}");
    second.signal(libc::SIGTERM);
    assert!(second.wait_exit(Duration::from_secs(30)).success());
}

/// The key file outlives the process: Retry tokens minted before a restart are accepted after
/// it; after one rotation of the token key (`spooky keys rotate`, then a reload) a token of the
/// old key is still accepted, after a second one it is refused (dropped: the handshake never
/// completes).
#[test]
#[ignore = "needs root"]
fn retry_tokens_survive_a_restart_and_one_key_rotation() {
    let site = Site::with_quic(Tier::SkReuseport, "  retry: always\n");
    let mut first = site.spawn(0, false);
    first.wait_serving();
    let keys = site.dir.join("run/keys.yaml");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&keys)
            .expect("key file created")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "key file mode {mode:o}");
    // Three clients, each holding a token of the first process.
    let netns = site.ns.client.clone();
    let mut clients = in_netns(&netns, || {
        (0..3).map(|_| RetriedClient::new()).collect::<Vec<_>>()
    });
    first.signal(libc::SIGTERM);
    assert!(first.wait_exit(Duration::from_secs(30)).success());
    let mut second = site.spawn(1, false);
    second.wait_serving();
    let file = keys.display().to_string();
    let mut reloads = 0;
    let mut rotate = |second: &Proc| {
        site.spooky(&["keys", "rotate", "--file", &file]);
        second.signal(libc::SIGHUP);
        reloads += 1;
        let want = format!("spooky_config_reloads_total{{result=\"success\"}} {reloads}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !site.metrics().contains(&want) {
            assert!(Instant::now() < deadline, "reload {reloads} not applied");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let z = clients.pop().unwrap();
    let y = clients.pop().unwrap();
    let x = clients.pop().unwrap();
    assert!(
        x.answer(Duration::from_secs(10)),
        "a token from before the restart was refused"
    );
    rotate(&second);
    assert!(
        y.answer(Duration::from_secs(10)),
        "a token of the previous key was refused"
    );
    rotate(&second);
    let refused = |m: &str| metric_sum(m, "spooky_quic_invalid_tokens_total");
    let before = refused(&site.metrics());
    let z = z.send_answer();
    // Refused: counted as an invalid token, and no handshake follows.
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused(&site.metrics()) <= before {
        assert!(
            Instant::now() < deadline,
            "the token of a rotated-out key was not refused"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !z.established(Duration::from_secs(1)),
        "a token of a rotated-out key was accepted"
    );
    // The second process took the tokens it accepted: it sent no Retry of its own.
    let metrics = site.metrics();
    let retries = metric_sum(&metrics, "spooky_quic_retry_sent_total");
    assert_eq!(retries, 0.0, "{metrics}");
    second.signal(libc::SIGTERM);
    assert!(second.wait_exit(Duration::from_secs(30)).success());
}

/// A quiche client driven by hand that has sent its Initial and holds the server's Retry.
struct RetriedClient {
    conn: quiche::Connection,
    socket: std::net::UdpSocket,
    local: SocketAddr,
    retry: Vec<u8>,
}

impl RetriedClient {
    fn server() -> SocketAddr {
        SocketAddr::new(SERVER_V4.parse().unwrap(), PORT)
    }

    fn flush(&mut self) {
        let mut out = [0u8; 1500];
        while let Ok((n, info)) = self.conn.send(&mut out) {
            self.socket.send_to(&out[..n], info.to).unwrap();
        }
    }

    /// Sends an Initial (call in the client namespace) and keeps the Retry that answers it.
    fn new() -> Self {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let local = socket.local_addr().unwrap();
        let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
        config
            .set_application_protos(quiche::h3::APPLICATION_PROTOCOL)
            .unwrap();
        config
            .load_verify_locations_from_file(certs_dir().join("ca.crt").to_str().unwrap())
            .unwrap();
        config.verify_peer(true);
        config.set_max_idle_timeout(10_000);
        config.set_initial_max_data(1 << 20);
        config.set_initial_max_streams_bidi(10);
        let mut scid = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut scid).unwrap();
        let conn = quiche::connect(
            Some("localhost"),
            &quiche::ConnectionId::from_ref(&scid),
            local,
            Self::server(),
            &mut config,
        )
        .unwrap();
        let mut c = Self {
            conn,
            socket,
            local,
            retry: Vec::new(),
        };
        c.flush();
        let mut buf = [0u8; 65535];
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.retry.is_empty() {
            assert!(Instant::now() < deadline, "no Retry from the server");
            if let Ok((n, _)) = c.socket.recv_from(&mut buf) {
                let hdr =
                    quiche::Header::from_slice(&mut buf[..n], quiche::MAX_CONN_ID_LEN).unwrap();
                assert_eq!(hdr.ty, quiche::Type::Retry, "expected a Retry first");
                c.retry = buf[..n].to_vec();
            }
        }
        // A ClientHello with a post-quantum key share spans two Initials, and each got a
        // Retry: let the others go.
        while c.socket.recv_from(&mut buf).is_ok() {}
        c
    }

    /// Answers the Retry with its token now; whether the handshake completes `within`.
    fn answer(self, within: Duration) -> bool {
        self.send_answer().established(within)
    }

    /// Takes the Retry and sends the Initial that answers it, with the token.
    fn send_answer(mut self) -> Self {
        let (server, local) = (Self::server(), self.local);
        let mut retry = std::mem::take(&mut self.retry);
        self.conn
            .recv(
                &mut retry,
                quiche::RecvInfo {
                    from: server,
                    to: local,
                },
            )
            .unwrap();
        let mut out = [0u8; 1500];
        let (n, info) = self
            .conn
            .send(&mut out)
            .expect("an Initial answering the Retry");
        let hdr = quiche::Header::from_slice(&mut out[..n], quiche::MAX_CONN_ID_LEN).unwrap();
        assert!(
            hdr.token.is_some_and(|t| !t.is_empty()),
            "quiche did not take the Retry"
        );
        self.socket.send_to(&out[..n], info.to).unwrap();
        self.flush();
        self
    }

    /// Whether the handshake completes within `within` (the connection is closed then).
    fn established(mut self, within: Duration) -> bool {
        let local = self.local;
        let mut buf = [0u8; 65535];
        let deadline = Instant::now() + within;
        while !self.conn.is_established() {
            if Instant::now() >= deadline || self.conn.is_closed() {
                return false;
            }
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let _ = self
                        .conn
                        .recv(&mut buf[..n], quiche::RecvInfo { from, to: local });
                }
                Err(_) => self.conn.on_timeout(),
            }
            self.flush();
        }
        let _ = self.conn.close(true, 0x100, b"");
        self.flush();
        true
    }
}
