//! End to end through a real interface: two network namespaces joined by a veth pair
//! (documentation addresses only: 192.0.2.0/24, 2001:db8::/64), Spooky inside the server
//! namespace with `--iface` on its veth (XDP + cpumap + sk_reuseport), HTTP/3 clients in the
//! client namespace. Spooky runs in-process on a thread that entered the server namespace
//! with `setns` (the worker threads it spawns inherit the namespace); the classic-BPF run is
//! the real `spooky` binary as an unprivileged user under `ip netns exec`.
//!
//! Needs root, `ip`, `ethtool`, `bpftool`, `setpriv`; fails with the reason otherwise. The
//! namespaces are deleted by a Drop guard even when a test fails.

use crate::support::{certs_dir, init_logging, pool};
use spooky::app::{RunOptions, Running};
use spooky::ops::status::Status;
use spooky_peers::client::{Client, ClientOptions, Request};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const SERVER_V4: &str = "192.0.2.1";
const CLIENT_V4: &str = "192.0.2.2";
pub const SERVER_V6: &str = "2001:db8::1";
const CLIENT_V6: &str = "2001:db8::2";
const T: Duration = Duration::from_secs(20);

/// Runs `program args`, failing the test with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{program}` (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A server and a client namespace joined by a veth pair; both deleted on drop.
pub struct Netns {
    pub server: String,
    pub client: String,
    pub server_if: String,
    pub client_if: String,
}

impl Netns {
    /// Creates the pair with names unique to this process and call.
    pub fn new() -> Self {
        assert!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() } == 0,
            "the network-namespace tests need root (ip netns, XDP, BPF)"
        );
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let ns = Self {
            server: format!("spk{tag}s"),
            client: format!("spk{tag}c"),
            server_if: format!("spk{tag}s"),
            client_if: format!("spk{tag}c"),
        };
        // From here on, Drop cleans up whatever exists.
        run("ip", &["netns", "add", &ns.server]);
        run("ip", &["netns", "add", &ns.client]);
        run(
            "ip",
            &[
                "link",
                "add",
                &ns.server_if,
                "netns",
                &ns.server,
                "type",
                "veth",
                "peer",
                "name",
                &ns.client_if,
                "netns",
                &ns.client,
            ],
        );
        for (netns, iface, v4, v6) in [
            (&ns.server, &ns.server_if, SERVER_V4, SERVER_V6),
            (&ns.client, &ns.client_if, CLIENT_V4, CLIENT_V6),
        ] {
            run("ip", &["-n", netns, "link", "set", "lo", "up"]);
            run(
                "ip",
                &[
                    "-n",
                    netns,
                    "addr",
                    "add",
                    &format!("{v4}/24"),
                    "dev",
                    iface,
                ],
            );
            run(
                "ip",
                &[
                    "-n",
                    netns,
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    iface,
                    "nodad",
                ],
            );
            run("ip", &["-n", netns, "link", "set", iface, "up"]);
        }
        // Native XDP on the receiving veth sees the frames before any checksum is filled in:
        // the sender must compute UDP checksums itself.
        run(
            "ip",
            &[
                "netns",
                "exec",
                &ns.client,
                "ethtool",
                "-K",
                &ns.client_if,
                "tx",
                "off",
            ],
        );
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for netns in [&self.server, &self.client] {
            let _ = Command::new("ip")
                .args(["netns", "del", netns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs `f` on a new thread inside network namespace `netns` and returns its result. Threads
/// `f` spawns stay in that namespace.
pub fn in_netns<R: Send + 'static>(netns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        use std::os::fd::AsRawFd;
        // SAFETY: a valid namespace fd; CLONE_NEWNET only moves this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A pin path unique to this test run.
fn pin_path(name: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    PathBuf::from(format!(
        "/sys/fs/bpf/spooky-test-{}-{name}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

fn config_yaml(port: u16, backends: &[(&str, SocketAddr)], pin: &Path, xdp_mode: &str) -> String {
    let certs = certs_dir();
    format!(
        "version: 1\nlisten:\n  protocol: http3\n  address: \"::\"\n  port: {port}\n  tls:\n    cert: {}\n    key: {}\nquic:\n  retry: off\nsteering:\n  pin_path: {}\n  xdp_mode: {xdp_mode}\ncontrol_socket: {}\nupstream:\n{}",
        certs.join("spooky.crt").display(),
        certs.join("spooky.key").display(),
        pin.display(),
        crate::support::unique_control_socket().display(),
        pool("main", "/", None, "round-robin", backends, ""),
    )
}

/// An HTTP/3 client (must be called on a thread inside the client namespace).
fn client(addr: SocketAddr) -> Client {
    let opts = ClientOptions {
        verify: true,
        ca: Some(certs_dir().join("ca.crt")),
        ..Default::default()
    };
    Client::connect(addr, &opts, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// `connections` connections with `requests` GETs each, spread over 4 client threads in the
/// client namespace, alternating IPv4 and IPv6. Returns the number of 200 responses.
fn traffic(ns: &Netns, port: u16, connections: usize, requests: usize) -> usize {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let netns = ns.client.clone();
            std::thread::spawn(move || {
                in_netns(&netns, move || {
                    let mut ok = 0;
                    for c in (t..connections).step_by(4) {
                        let ip = if c % 2 == 0 { SERVER_V4 } else { SERVER_V6 };
                        let addr = SocketAddr::new(ip.parse().unwrap(), port);
                        let mut cl = client(addr);
                        for r in 0..requests {
                            let resp = cl
                                .request(
                                    &Request::get("localhost", &format!("/size/{}", 100 + r)),
                                    T,
                                )
                                .unwrap_or_else(|e| panic!("connection {c} request {r}: {e}"));
                            assert_eq!(resp.status, 200, "connection {c} request {r}");
                            ok += 1;
                        }
                        cl.close();
                    }
                    ok
                })
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).sum()
}

/// Spooky in the server namespace: `workers` pinned workers, XDP on the server veth.
fn start_in(ns: &Netns, yaml: String, workers: usize, iface: bool) -> Running {
    start_pinned(ns, yaml, workers, iface, true)
}

/// [`start_in`], with the workers pinned or not.
fn start_pinned(ns: &Netns, yaml: String, workers: usize, iface: bool, pin: bool) -> Running {
    let iface = iface.then(|| ns.server_if.clone());
    in_netns(&ns.server, move || {
        let config = spooky::config::parse(&yaml, &crate::support::repo_root())
            .unwrap_or_else(|e| panic!("config: {e}\n{yaml}"));
        spooky::app::start(
            config,
            &RunOptions {
                workers: Some(workers),
                iface,
                pin,
                takeover: false,
                lock_down: false,
            },
        )
        .unwrap_or_else(|e| panic!("spooky did not start in the server namespace: {e}"))
    })
}

fn stat_sum(running: &Running, f: impl Fn(&spooky::stats::WorkerStats) -> &AtomicU64) -> u64 {
    running
        .worker_stats()
        .iter()
        .map(|s| f(s).load(Ordering::Relaxed))
        .sum()
}

use std::sync::atomic::AtomicU64;

fn per_worker(
    running: &Running,
    f: impl Fn(&spooky::stats::WorkerStats) -> &AtomicU64,
) -> Vec<u64> {
    running
        .worker_stats()
        .iter()
        .map(|s| f(s).load(Ordering::Relaxed))
        .collect()
}

/// `spooky status --json` (the binary) for `pin`.
fn status_json(pin: &Path) -> serde_json::Value {
    let out = run(
        env!("CARGO_BIN_EXE_spooky"),
        &["status", "--pin-path", &pin.display().to_string(), "--json"],
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}\n{out}"))
}

/// Polls the pinned maps until `done` holds (the counters thread mirrors every 100 ms).
fn status_until(pin: &Path, what: &str, done: impl Fn(&Status) -> bool) -> Status {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = spooky::ops::status::read(pin).expect("read pinned maps");
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}; status: {status:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn total(status: &Status, counter: &str) -> u64 {
    status.counter(counter).map_or(0, |c| c.total)
}

/// Sum of a counter over CPUs in `bpftool -j map dump pinned <pin>/stats`.
fn bpftool_stat(pin: &Path, index: u32) -> u64 {
    let out = run(
        "bpftool",
        &[
            "-j",
            "map",
            "dump",
            "pinned",
            &pin.join("stats").display().to_string(),
        ],
    );
    let dump: serde_json::Value = serde_json::from_str(&out).expect("bpftool json");
    let entry = dump
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["formatted"])
        .find(|e| e["key"].as_u64() == Some(u64::from(index)))
        .unwrap_or_else(|| panic!("no key {index} in {out}"));
    entry["values"]
        .as_array()
        .unwrap_or_else(|| panic!("{entry}"))
        .iter()
        .map(|v| v["value"].as_u64().unwrap_or_else(|| panic!("{v}")))
        .sum()
}

/// The flood test takes this exclusively: the exact packet accounting of the other XDP tests
/// should not compete with 40 000 packets per second for the same two CPUs.
static FLOOD_EXCLUSIVE: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn xdp_end_to_end(mode: &str, native: bool) {
    let _shared = FLOOD_EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner());
    init_logging();
    let ns = Netns::new();
    let backend = in_netns(&ns.server, || crate::support::backend("b1"));
    let pin = pin_path(mode);
    let port = 4433;
    let running = start_in(
        &ns,
        config_yaml(port, &[("b1", backend.addr)], &pin, mode),
        2,
        true,
    );
    assert_eq!(running.steering, spooky::steering::Mode::Xdp { native });

    // Hundreds of requests over many connections.
    let (connections, requests) = (40, 8);
    let ok = traffic(&ns, port, connections, requests);
    assert_eq!(ok, connections * requests);
    assert_eq!(
        stat_sum(&running, |s| &s.misrouted),
        0,
        "misrouted with XDP steering"
    );
    let sent = (connections * requests) as u64;
    // `xdp_packets` is the kernel's live count, `packets_in` the workers' count mirrored every
    // 100 ms: wait until the mirror has caught up with the last (closing) packets too.
    let status = status_until(
        &pin,
        "worker counters never reached the requests sent and the packets XDP placed",
        |s| {
            s.workers.iter().map(|w| w.requests).sum::<u64>() == sent
                && s.workers.iter().all(|w| w.xdp_packets == w.packets_in)
        },
    );
    assert_eq!(
        status.mode,
        if native { "xdp-native" } else { "xdp-generic" }
    );
    assert_eq!(status.iface.as_deref(), Some(ns.server_if.as_str()));
    assert!(status.ifindex > 0);
    let redirected = status.counter("redirected").unwrap();
    assert!(redirected.total > 0, "{status:#?}");
    assert!(status.cpu_redirect, "pinned workers: CPU redirect on");
    assert_eq!(total(&status, "redirect_failed"), 0, "{status:#?}");
    assert_eq!(total(&status, "passed_quic"), 0, "{status:#?}");
    assert_eq!(
        redirected.total,
        total(&status, "quic_short") + total(&status, "quic_long"),
        "every valid QUIC packet is redirected"
    );
    // Every redirected packet reached the owning worker's socket, and each worker read
    // exactly what XDP placed on it.
    for w in &status.workers {
        assert_eq!(
            w.xdp_packets, w.packets_in,
            "worker {}: {status:#?}",
            w.index
        );
        assert!(
            w.connections_accepted > 0,
            "worker {} got no connections",
            w.index
        );
        assert_eq!(w.misrouted, 0);
    }
    assert_eq!(
        redirected.total,
        status.workers.iter().map(|w| w.packets_in).sum::<u64>()
    );
    // The health checker's view, and bpftool agreeing with spooky status.
    let b1 = &status.pools[0].backends[0];
    assert_eq!(
        (
            status.pools[0].name.as_str(),
            b1.id.as_str(),
            b1.state.as_str()
        ),
        ("main", "b1", "healthy")
    );
    assert!(b1.ewma_latency_us > 0, "{b1:?}");
    let json = status_json(&pin);
    assert_eq!(json["mode"], status.mode);
    let json_redirected = json["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "redirected")
        .unwrap()["total"]
        .as_u64()
        .unwrap();
    assert_eq!(json_redirected, redirected.total);
    assert_eq!(
        bpftool_stat(&pin, spooky_common::maps::Counter::Redirected.index()),
        redirected.total
    );
    let dump = run(
        "bpftool",
        &[
            "map",
            "dump",
            "pinned",
            &pin.join("backends").display().to_string(),
        ],
    );
    for field in [
        "ewma_latency_us",
        "consecutive_failures",
        "state",
        "in_flight",
    ] {
        assert!(
            dump.contains(field),
            "bpftool lacks field names: {dump:.2000}"
        );
    }

    // NAT rebinding: the connection stays on its worker.
    let before = per_worker(&running, |s| &s.packets_in);
    let accepted = stat_sum(&running, |s| &s.connections_accepted);
    let netns = ns.client.clone();
    let (owner_packets, rebound_ok) = in_netns(&netns, move || {
        let mut cl = client(SocketAddr::new(SERVER_V4.parse().unwrap(), port));
        let r = cl
            .request(&Request::get("localhost", "/size/10"), T)
            .unwrap();
        assert_eq!(r.status, 200);
        let old = cl.local_addr().unwrap();
        cl.rebind().unwrap();
        assert_ne!(old.port(), cl.local_addr().unwrap().port());
        let mut ok = 0;
        for _ in 0..5 {
            let r = cl
                .request(&Request::get("localhost", "/size/1000"), T)
                .unwrap();
            assert_eq!(r.status, 200);
            ok += 1;
        }
        cl.close();
        (old, ok)
    });
    let _ = owner_packets;
    assert_eq!(rebound_ok, 5);
    let after = per_worker(&running, |s| &s.packets_in);
    let touched: Vec<usize> = (0..after.len())
        .filter(|&w| after[w] != before[w])
        .collect();
    assert_eq!(
        touched.len(),
        1,
        "the rebound connection's packets reached workers {touched:?}"
    );
    assert_eq!(
        stat_sum(&running, |s| &s.connections_accepted),
        accepted + 1
    );
    assert_eq!(
        stat_sum(&running, |s| &s.misrouted),
        0,
        "misrouted after rebinding"
    );

    // A worker marked dead in the pinned map gets no new connections.
    let mut maps = spooky::steering::ebpf::PinnedMaps::open(&pin).unwrap();
    let mut w1 = maps.worker(1).unwrap();
    w1.alive = 0;
    maps.set_worker(1, &w1).unwrap();
    let accepted_by = per_worker(&running, |s| &s.connections_accepted);
    let ok = traffic(&ns, port, 24, 2);
    assert_eq!(ok, 48);
    let accepted_after = per_worker(&running, |s| &s.connections_accepted);
    assert_eq!(
        accepted_after[1], accepted_by[1],
        "dead worker 1 accepted connections"
    );
    assert_eq!(accepted_after[0], accepted_by[0] + 24);
    assert_eq!(stat_sum(&running, |s| &s.misrouted), 0);
    let status = spooky::ops::status::read(&pin).unwrap();
    assert!(!status.workers[1].alive);
    assert_eq!(total(&status, "redirect_failed"), 0, "{status:#?}");

    // Clean shutdown detaches XDP and removes the pins.
    running.begin_shutdown();
    running.join().unwrap();
    assert!(
        !pin.join("stats").exists(),
        "pins left after a clean shutdown"
    );
    let link = run("ip", &["-n", &ns.server, "link", "show", &ns.server_if]);
    assert!(!link.contains("xdp"), "XDP still attached: {link}");
}

#[test]
#[ignore = "needs root"]
fn xdp_native_steers_every_packet_to_its_worker() {
    xdp_end_to_end("native", true);
}

#[test]
#[ignore = "needs root"]
fn xdp_generic_steers_every_packet_to_its_worker() {
    xdp_end_to_end("generic", false);
}

/// Workers that are not pinned run on any CPU: XDP then parses, drops, counts and places, but
/// does not redirect to a CPU (it would pick CPUs the workers may not be on).
#[test]
#[ignore = "needs root"]
fn xdp_without_pinned_workers_does_not_redirect_to_cpus() {
    init_logging();
    let ns = Netns::new();
    let backend = in_netns(&ns.server, || crate::support::backend("b1"));
    let pin = pin_path("unpinned");
    let port = 4437;
    let running = start_pinned(
        &ns,
        config_yaml(port, &[("b1", backend.addr)], &pin, "native"),
        2,
        true,
        false,
    );
    let ok = traffic(&ns, port, 8, 4);
    assert_eq!(ok, 32);
    let status = status_until(&pin, "no requests counted", |s| {
        s.workers.iter().map(|w| w.requests).sum::<u64>() == 32
    });
    assert!(!status.cpu_redirect, "{status:#?}");
    assert_eq!(total(&status, "redirected"), 0, "{status:#?}");
    assert!(total(&status, "passed_quic") > 0, "{status:#?}");
    assert!(total(&status, "steered_by_cid") > 0, "{status:#?}");
    assert_eq!(stat_sum(&running, |s| &s.misrouted), 0);
    drop(running);
    // Spooky keeps its pins when it stops (for bpftool and a successor); the test's go.
    let _ = std::fs::remove_dir_all(&pin);
}

/// `setpriv` arguments running what follows as `nobody` with no capabilities.
pub const UNPRIVILEGED: [&str; 7] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
    "--",
];

/// A directory readable by `nobody` with a copy of Spooky's certificate and key and a
/// `config.yaml` listening on `port` with one backend.
fn unprivileged_config(ns: &Netns, port: u16, backend: SocketAddr, pin: &Path) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spooky-netns-{}", ns.server));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["spooky.crt", "spooky.key"] {
        std::fs::copy(certs_dir().join(f), dir.join(f)).unwrap();
    }
    let yaml = config_yaml(port, &[("b1", backend)], pin, "auto").replace(
        &certs_dir().display().to_string(),
        &dir.display().to_string(),
    );
    std::fs::write(dir.join("config.yaml"), yaml).unwrap();
    run("chmod", &["-R", "a+rX", &dir.display().to_string()]);
    dir
}

/// The unprivileged tier: the real binary as `nobody` falls back to classic BPF (logged),
/// serves every request, and pins nothing.
#[test]
#[ignore = "needs root"]
fn unprivileged_binary_uses_classic_bpf_and_serves() {
    init_logging();
    let ns = Netns::new();
    let backend = in_netns(&ns.server, || crate::support::backend("b1"));
    let pin = pin_path("classic");
    let port = 4434;
    let dir = unprivileged_config(&ns, port, backend.addr, &pin);
    let log = std::fs::File::create(dir.join("spooky.log")).unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.server])
        .args(UNPRIVILEGED)
        .arg(env!("CARGO_BIN_EXE_spooky"))
        .args([
            "--config",
            &dir.join("config.yaml").display().to_string(),
            "--workers",
            "2",
        ])
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn spooky under ip netns exec");
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let guard = Kill(child.id());
    // Ready when a request succeeds.
    let netns = ns.client.clone();
    in_netns(&netns, move || {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let opts = ClientOptions {
                verify: true,
                ca: Some(certs_dir().join("ca.crt")),
                ..Default::default()
            };
            let addr = SocketAddr::new(SERVER_V4.parse().unwrap(), port);
            if Client::connect(addr, &opts, Duration::from_millis(500)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "spooky (unprivileged) never answered"
            );
        }
    });
    let ok = traffic(&ns, port, 20, 6);
    assert_eq!(ok, 120);
    // SAFETY: our child; SIGTERM asks for a graceful shutdown.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    drop(guard);
    let log = std::fs::read_to_string(dir.join("spooky.log")).unwrap();
    assert!(status.success(), "spooky exited with {status}: {log}");
    assert!(log.contains("classic-bpf"), "mode not logged: {log}");
    assert!(
        log.contains("eBPF steering unavailable"),
        "fallback reason not logged: {log}"
    );
    assert!(
        !pin.exists(),
        "classic BPF pinned something at {}",
        pin.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A requested XDP mode that cannot be had is a start-up error, never a downgrade.
#[test]
#[ignore = "needs root"]
fn xdp_on_a_missing_interface_or_without_privilege_is_an_error() {
    init_logging();
    let ns = Netns::new();
    let pin = pin_path("missing");
    let yaml = config_yaml(
        4435,
        &[("b1", "127.0.0.1:1".parse().unwrap())],
        &pin,
        "native",
    );
    let err = in_netns(&ns.server, move || {
        let config = spooky::config::parse(&yaml, &crate::support::repo_root()).unwrap();
        spooky::app::start(
            config,
            &RunOptions {
                workers: Some(2),
                iface: Some("nosuchif0".into()),
                pin: false,
                takeover: false,
                lock_down: false,
            },
        )
        .err()
        .map(|e| e.to_string())
    });
    let err = err.expect("start with a missing interface succeeded");
    assert!(
        err.contains("nosuchif0") && err.contains("no such network interface"),
        "{err}"
    );
    assert!(!pin.join("stats").exists());

    // Not root: the binary says why and exits 1.
    let dir = unprivileged_config(&ns, 4436, "127.0.0.1:1".parse().unwrap(), &pin);
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.server])
        .args(UNPRIVILEGED)
        .arg(env!("CARGO_BIN_EXE_spooky"))
        .args([
            "--config",
            &dir.join("config.yaml").display().to_string(),
            "--iface",
            &ns.server_if,
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("needs root"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Hostile input: an Initial flood (and junk) from one source prefix while legitimate clients
// from another prefix keep working.

/// The flooding prefix: TEST-NET-2 on the client's veth, routed from the server namespace.
const FLOODER_V4: &str = "198.51.100.2";
/// Initial limit of the flood test: per second per prefix, and the burst.
const FLOOD_RATE: u32 = 200;
const FLOOD_BURST: u32 = 400;

/// xorshift64*: cheap, deterministic filler for the flood's random bytes.
struct Prng(u64);

impl Prng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// A well-formed-looking client Initial (QUIC v1, 1200-byte UDP payload, random 8-byte DCID
/// and SCID, empty token, a Length covering the rest, "protected" filler bytes): it parses as
/// an Initial for the XDP program; user space cannot decrypt it.
fn crafted_initial(rng: &mut Prng, out: &mut [u8; 1200]) {
    out[0] = 0xc3; // long header, fixed bit, type Initial, 4-byte packet number
    out[1..5].copy_from_slice(&1u32.to_be_bytes());
    out[5] = 8; // DCID length
    out[6..14].copy_from_slice(&rng.next().to_le_bytes());
    out[14] = 8; // SCID length
    out[15..23].copy_from_slice(&rng.next().to_le_bytes());
    out[23] = 0; // token length
    let rest = (1200 - 26) as u16; // after the 2-byte Length field
    out[24..26].copy_from_slice(&(0x4000 | rest).to_be_bytes());
    rng.fill(&mut out[26..58]); // packet number and the first protected bytes
}

/// Junk for the QUIC port: random bytes with the fixed bit (0x40) clear, 40..=299 bytes.
fn junk(rng: &mut Prng, out: &mut [u8; 1200]) -> usize {
    rng.fill(&mut out[..40]);
    out[0] &= !0x40;
    40 + (rng.next() % 260) as usize
}

/// What the flooding thread sent.
#[derive(Debug, Default, Clone, Copy)]
struct Flood {
    initials: u64,
    junk: u64,
    send_errors: u64,
    elapsed: Duration,
}

/// Sends `total` packets (alternately crafted Initials and junk) from `FLOODER_V4` to
/// `target`, paced evenly over `over`, from one thread in the client namespace; signals
/// `started` after the first tenth. Bounded in count, and in time (stops at `over` + 10 s
/// when the machine is too busy to keep the pace).
fn flood(
    netns: &str,
    target: SocketAddr,
    total: u64,
    over: Duration,
    started: std::sync::mpsc::Sender<()>,
) -> Flood {
    in_netns(netns, move || {
        let from: SocketAddr = SocketAddr::new(FLOODER_V4.parse().unwrap(), 0);
        let socket = std::net::UdpSocket::bind(from).expect("bind the flooding address");
        let mut rng = Prng(0x9e37_79b9_7f4a_7c15);
        let mut buf = [0u8; 1200];
        rng.fill(&mut buf);
        let mut report = Flood::default();
        let begin = Instant::now();
        let mut sent = 0u64;
        while sent < total && begin.elapsed() < over + Duration::from_secs(10) {
            let due = ((begin.elapsed().as_secs_f64() / over.as_secs_f64()) * total as f64)
                .min(total as f64) as u64;
            while sent < due.max(1) {
                let len = if sent.is_multiple_of(2) {
                    crafted_initial(&mut rng, &mut buf);
                    report.initials += 1;
                    1200
                } else {
                    report.junk += 1;
                    junk(&mut rng, &mut buf)
                };
                if socket.send_to(&buf[..len], target).is_err() {
                    report.send_errors += 1;
                }
                sent += 1;
                if sent == total / 10 {
                    let _ = started.send(());
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        report.elapsed = begin.elapsed();
        report
    })
}

/// Legitimate clients: 4 threads in the client namespace (192.0.2.2 and 2001:db8::2), each
/// opening connections of `requests` GETs one after the other until `stop` is set (and at
/// least `min_connections` each). A failure is counted, not fatal. Returns (ok, attempted).
fn legitimate_traffic(
    client_netns: &str,
    port: u16,
    requests: usize,
    min_connections: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (u64, u64, Vec<String>) {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let netns = client_netns.to_owned();
            let stop = stop.clone();
            std::thread::spawn(move || {
                in_netns(&netns, move || {
                    let (mut ok, mut attempted, mut errors) = (0u64, 0u64, Vec::new());
                    let mut c = 0;
                    while c < min_connections || !stop.load(Ordering::Relaxed) {
                        let ip = if (t + c) % 2 == 0 {
                            SERVER_V4
                        } else {
                            SERVER_V6
                        };
                        let addr = SocketAddr::new(ip.parse().unwrap(), port);
                        attempted += requests as u64;
                        let opts = ClientOptions {
                            verify: true,
                            ca: Some(certs_dir().join("ca.crt")),
                            ..Default::default()
                        };
                        match Client::connect(addr, &opts, T) {
                            Ok(mut cl) => {
                                for r in 0..requests {
                                    let path = format!("/size/{}", 100 + r);
                                    match cl.request(&Request::get("localhost", &path), T) {
                                        Ok(resp) if resp.status == 200 => ok += 1,
                                        Ok(resp) => errors.push(format!(
                                            "{addr} connection {c} request {r}: status {}",
                                            resp.status
                                        )),
                                        Err(e) => errors.push(format!(
                                            "{addr} connection {c} request {r}: {e}"
                                        )),
                                    }
                                }
                                cl.close();
                            }
                            Err(e) => errors.push(format!("{addr} connection {c}: connect: {e}")),
                        }
                        c += 1;
                    }
                    (ok, attempted, errors)
                })
            })
        })
        .collect();
    let mut all = (0, 0, Vec::new());
    for t in threads {
        let (ok, attempted, errors) = t.join().unwrap();
        all.0 += ok;
        all.1 += attempted;
        all.2.extend(errors);
    }
    all
}

/// `spooky_ebpf_packets_total{counter="<counter>"}` (summed over the CPUs) in `metrics`.
fn metrics_counter(metrics: &str, counter: &str) -> u64 {
    let prefix = format!("spooky_ebpf_packets_total{{counter=\"{counter}\"}} ");
    metrics
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("bad metrics line {l}"))
        })
        .sum()
}

fn json_counter(json: &serde_json::Value, name: &str) -> u64 {
    json["counters"]
        .as_array()
        .unwrap_or_else(|| panic!("no counters in {json}"))
        .iter()
        .find(|c| c["name"] == name)
        .and_then(|c| c["total"].as_u64())
        .unwrap_or_else(|| panic!("no counter {name} in {json}"))
}

#[test]
#[ignore = "needs root"]
fn xdp_initial_flood_is_dropped_while_legitimate_clients_are_served() {
    let _exclusive = FLOOD_EXCLUSIVE.write().unwrap_or_else(|p| p.into_inner());
    init_logging();
    let ns = Netns::new();
    // The flooding prefix: a second address on the client's veth, routed back from the server.
    run(
        "ip",
        &[
            "-n",
            &ns.client,
            "addr",
            "add",
            &format!("{FLOODER_V4}/24"),
            "dev",
            &ns.client_if,
        ],
    );
    run(
        "ip",
        &[
            "-n",
            &ns.server,
            "route",
            "add",
            "198.51.100.0/24",
            "dev",
            &ns.server_if,
        ],
    );
    let backend = in_netns(&ns.server, || crate::support::backend("b1"));
    let pin = pin_path("flood");
    let port = 4437;
    let yaml = config_yaml(port, &[("b1", backend.addr)], &pin, "native").replace(
        "  xdp_mode: native\n",
        &format!(
            "  xdp_mode: native\n  initial_rate: {FLOOD_RATE}\n  initial_burst: {FLOOD_BURST}\n"
        ),
    );
    let running = start_in(&ns, yaml, 2, true);
    assert_eq!(
        running.steering,
        spooky::steering::Mode::Xdp { native: true }
    );

    // 200k packets over ~5 s from 198.51.100.2; legitimate clients meanwhile.
    let (flood_packets, over) = (200_000u64, Duration::from_secs(5));
    let target = SocketAddr::new(SERVER_V4.parse().unwrap(), port);
    let (started_tx, started) = std::sync::mpsc::channel();
    let netns = ns.client.clone();
    let flooder =
        std::thread::spawn(move || flood(&netns, target, flood_packets, over, started_tx));
    started
        .recv_timeout(Duration::from_secs(10))
        .expect("the flood never got going");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let legit = {
        let (stop, netns) = (stop.clone(), ns.client.clone());
        std::thread::spawn(move || legitimate_traffic(&netns, port, 5, 8, stop))
    };
    let sent = flooder.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let (ok, attempted, errors) = legit.join().unwrap();
    eprintln!(
        "flood: {sent:?}; legitimate requests: {ok} of {attempted} succeeded; errors: {errors:#?}"
    );
    // Normally all of them; a machine too busy to keep the pace stops at the time bound.
    assert!(
        sent.initials + sent.junk >= flood_packets / 4,
        "the flood fell far behind: {sent:?}"
    );
    assert!(attempted >= 4 * 8 * 5);
    assert!(
        ok * 100 >= attempted * 99,
        "only {ok} of {attempted} legitimate requests succeeded: {errors:#?}"
    );

    // The kernel dropped the flood by reason: pinned maps, `spooky status --json`, /metrics.
    let status = status_until(&pin, "flood drops never showed in the counters", |s| {
        total(s, "drop_initial_rate_limited") > 0 && total(s, "drop_fixed_bit") > 0
    });
    let limited = total(&status, "drop_initial_rate_limited");
    let junk_dropped = total(&status, "drop_fixed_bit");
    // At most the burst plus the rate over the flood's duration got through (plus slack for
    // cross-CPU races on the bucket, see docs/ebpf.md).
    let allowed = u64::from(FLOOD_BURST)
        + (sent.elapsed.as_secs_f64() * f64::from(FLOOD_RATE)).ceil() as u64
        + 64;
    eprintln!(
        "xdp: {limited} Initials rate-limited of {} sent (at most {allowed} may pass), {junk_dropped} junk dropped of {} sent; status: {}",
        sent.initials,
        sent.junk,
        spooky::ops::status::render(&status)
    );
    assert!(
        limited + allowed >= sent.initials - sent.send_errors,
        "too few rate-limited: {limited} of {} Initials (at most {allowed} allowed): {status:#?}",
        sent.initials
    );
    assert!(limited <= sent.initials, "{status:#?}");
    assert!(junk_dropped <= sent.junk, "{status:#?}");
    assert!(
        junk_dropped * 100 >= (sent.junk - sent.send_errors) * 95,
        "junk: {junk_dropped} of {} dropped by XDP",
        sent.junk
    );
    assert_eq!(status.initial_rate, FLOOD_RATE);
    assert_eq!(status.initial_burst, FLOOD_BURST);
    assert!(status.initial_prefixes >= 1, "{status:#?}");
    // Rate-limited Initials are not valid QUIC to place: every valid packet was still
    // redirected, and nothing was misrouted.
    assert_eq!(
        total(&status, "redirected"),
        total(&status, "quic_short") + total(&status, "quic_long"),
        "{status:#?}"
    );
    assert_eq!(stat_sum(&running, |s| &s.misrouted), 0);
    let json = status_json(&pin);
    assert_eq!(json_counter(&json, "drop_initial_rate_limited"), limited);
    assert_eq!(json_counter(&json, "drop_fixed_bit"), junk_dropped);
    assert_eq!(json["initial_rate"], FLOOD_RATE);
    let metrics = running.metrics_text();
    assert_eq!(
        metrics_counter(&metrics, "drop_initial_rate_limited"),
        limited,
        "{metrics}"
    );
    assert_eq!(metrics_counter(&metrics, "drop_fixed_bit"), junk_dropped);
    assert!(metrics_counter(&metrics, "packets") >= sent.initials + sent.junk - sent.send_errors);

    running.begin_shutdown();
    running.join().unwrap();
    assert!(!pin.join("stats").exists(), "pins left after shutdown");
}
