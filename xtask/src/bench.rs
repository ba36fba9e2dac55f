//! `cargo xtask bench`: Spooky against Envoy and Caddy as HTTP/3 → HTTP/2 reverse proxies in
//! front of one nginx, measured with two load generators: oha (independent, quinn-based;
//! the headline figures) and the in-tree `spooky-load` (see `spooky_peers::loadgen` and
//! docs/benchmarks.md), plus the XDP program's packet rate in the kernel.
//!
//! Pinned mode (the default on a machine with at least 2 CPUs): the proxy under test runs
//! alone on CPU 1, the load generator and nginx share CPU 0. Each (scenario, generator,
//! proxy, run) gets a freshly started proxy, so peak RSS belongs to that run. Runs are
//! interleaved (run 1 of every proxy, then run 2, ...) and reported as median, min and max.
//! CPU time of the proxy, of nginx and of the generator is read from /proc/PID/stat
//! (`measure.rs`); CPU used by anything else flags the run as noisy. Every run's request
//! count is checked against nginx's access log.
//!
//! Writes `results.json`, `results.md` and `chart.svg` into the output directory
//! (`target/bench` by default); `--chart PATH` writes the chart there too.

mod measure;
mod oha;
mod peers;
mod report;
mod steering;
mod upgrade;
mod websocket;
mod xdp;
mod zero_rtt;

use anyhow::{bail, Context, Result};
use clap::Parser;
use peers::{PeerBins, ProxyKind, ProxySetup};
use report::{Env, RunResult};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask bench --",
    about = "Spooky vs Envoy vs Caddy, HTTP/3 → HTTP/2"
)]
struct Args {
    /// Short runs (2 s measured, 1 s warm-up, 300 idle connections) to check the harness.
    #[arg(long)]
    quick: bool,
    /// Scenarios, comma-separated: small, download, upload, handshake, idle, rate, tcp-small,
    /// tcp-download, h1-small, h1-download (HTTP/1.1 to the backend), zero-rtt, upgrade, xdp,
    /// steering.
    #[arg(
        long,
        default_value = "small,download,upload,handshake,idle,rate,tcp-small,tcp-download,h1-small,h1-download,zero-rtt,upgrade,xdp,steering"
    )]
    scenarios: String,
    /// Proxies, comma-separated: spooky, envoy, envoy-nogro (Envoy without `prefer_gro`,
    /// oha runs only), caddy.
    #[arg(long, default_value = "spooky,envoy,envoy-nogro,caddy")]
    proxies: String,
    /// Load generators, comma-separated: oha, spooky-load.
    #[arg(long, default_value = "oha,spooky-load")]
    generators: String,
    /// Runs of every (scenario, generator, proxy); figures are their median, min and max.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Requests per second of the `rate` scenario (default: half of the slowest proxy's
    /// median oha rate in `small` in this run, or 2,000 without it).
    #[arg(long)]
    rate: Option<f64>,
    /// Measured seconds per run (default 10, quick 2).
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up seconds per run (default 2, quick 1).
    #[arg(long)]
    warm_up: Option<f64>,
    /// Directory for results and the run's scratch files.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Also write the SVG chart here (e.g. docs/benchmarks.svg).
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Do not run `cargo build --release -p spooky -p spooky-peers --bins` first.
    #[arg(long)]
    no_build: bool,
    /// Let every process run on every CPU instead of pinning.
    #[arg(long)]
    unpinned: bool,
    /// Run spooky-load without UDP GRO (`spooky-load --no-gro`): on loopback the kernel then
    /// splits each proxy's GSO batches in the proxy's own sendmsg, charging the client's
    /// receive work to the proxy.
    #[arg(long)]
    no_gro: bool,
}

/// One workload.
struct Scenario {
    name: &'static str,
    /// What the headline efficiency counts: "req" or "MiB".
    unit: &'static str,
    path: &'static str,
    /// spooky-load's arguments; empty: spooky-load does not run this scenario.
    load_args: Vec<String>,
    /// oha's shape: (connections, requests in flight per connection); `None`: oha cannot
    /// run it (its HTTP/3 client reuses connections, and holds none idle).
    oha: Option<(u32, u32)>,
    /// oha's fixed rate for this scenario (`-q`), when it has one of its own.
    oha_rate: Option<f64>,
    /// Over the proxy's TCP listener (TLS, HTTP/2) instead of HTTP/3: oha only.
    tcp: bool,
    /// The proxies forward over HTTP/1.1 (to nginx's HTTP/1.1 port) instead of h2c.
    h1_backend: bool,
    warm_up: f64,
    duration: f64,
}

/// Which load generator drives a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generator {
    Oha,
    SpookyLoad,
}

impl Generator {
    pub fn name(self) -> &'static str {
        match self {
            Generator::Oha => "oha",
            Generator::SpookyLoad => "spooky-load",
        }
    }

    fn parse(s: &str) -> Option<Generator> {
        match s {
            "oha" => Some(Generator::Oha),
            "spooky-load" => Some(Generator::SpookyLoad),
            _ => None,
        }
    }
}

impl Scenario {
    /// A scenario that brings its own load (or none): no generator arguments, no windows.
    fn own(name: &'static str, unit: &'static str, path: &'static str) -> Scenario {
        Scenario {
            name,
            unit,
            path,
            load_args: Vec::new(),
            oha: None,
            oha_rate: None,
            tcp: false,
            h1_backend: false,
            warm_up: 0.0,
            duration: 0.0,
        }
    }
}

fn scenarios(quick: bool, duration: f64, warm_up: f64) -> Vec<Scenario> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let idle_conns: u32 = if quick { 300 } else { 1000 };
    vec![
        Scenario {
            name: "small",
            unit: "req",
            path: "/100b",
            load_args: s(&["-c", "10", "-m", "10"]),
            oha: Some((10, 10)),
            oha_rate: None,
            tcp: false,
            h1_backend: false,
            warm_up,
            duration,
        },
        Scenario {
            name: "download",
            unit: "MiB",
            path: "/1m",
            load_args: s(&["-c", "10", "-m", "1"]),
            oha: Some((10, 1)),
            oha_rate: None,
            tcp: false,
            h1_backend: false,
            warm_up,
            duration,
        },
        Scenario {
            name: "upload",
            unit: "MiB",
            path: "/upload/blob",
            load_args: s(&[
                "-c",
                "10",
                "-m",
                "1",
                "--method",
                "PUT",
                "--data-size",
                "1048576",
            ]),
            oha: Some((10, 1)),
            oha_rate: None,
            tcp: false,
            h1_backend: false,
            warm_up,
            duration,
        },
        Scenario {
            name: "handshake",
            unit: "req",
            path: "/100b",
            load_args: s(&["-c", "16", "-m", "1", "--new-connection"]),
            oha: None,
            oha_rate: None,
            tcp: false,
            h1_backend: false,
            warm_up,
            duration,
        },
        Scenario {
            name: "idle",
            unit: "req",
            path: "/100b",
            load_args: s(&["-c", &idle_conns.to_string(), "-m", "1", "--interval", "5s"]),
            // The same with oha: that many connections, a request on each every 5 s on
            // average (`-q`).
            oha: Some((idle_conns, 1)),
            oha_rate: Some(f64::from(idle_conns) / 5.0),
            tcp: false,
            h1_backend: false,
            warm_up: if quick { 3.0 } else { 5.0 },
            duration: if quick { 2.0 } else { 5.0 },
        },
        // Open loop: the same request rate for every proxy (oha `-q`, latency corrected).
        Scenario {
            name: "rate",
            unit: "req",
            path: "/100b",
            load_args: Vec::new(),
            oha: Some((10, 10)),
            oha_rate: None,
            tcp: false,
            h1_backend: false,
            warm_up,
            duration,
        },
        // The same over each proxy's TCP listener: TLS, HTTP/2 (oha `--http2`).
        Scenario {
            name: "tcp-small",
            unit: "req",
            path: "/100b",
            load_args: Vec::new(),
            oha: Some((10, 10)),
            oha_rate: None,
            tcp: true,
            h1_backend: false,
            warm_up,
            duration,
        },
        Scenario {
            name: "tcp-download",
            unit: "MiB",
            path: "/1m",
            load_args: Vec::new(),
            oha: Some((10, 1)),
            oha_rate: None,
            tcp: true,
            h1_backend: false,
            warm_up,
            duration,
        },
        // HTTP/1.1 towards the backend (keep-alive), HTTP/3 from the client.
        Scenario {
            name: "h1-small",
            unit: "req",
            path: "/100b",
            load_args: s(&["-c", "10", "-m", "10"]),
            oha: Some((10, 10)),
            oha_rate: None,
            tcp: false,
            h1_backend: true,
            warm_up,
            duration,
        },
        Scenario {
            name: "h1-download",
            unit: "MiB",
            path: "/1m",
            load_args: s(&["-c", "10", "-m", "1"]),
            oha: Some((10, 1)),
            oha_rate: None,
            tcp: false,
            h1_backend: true,
            warm_up,
            duration,
        },
        // Its own load and timing: see `upgrade.rs`.
        Scenario::own("upgrade", "req", "/100b"),
        // Spooky with and without XDP, a client in a namespace: see `steering.rs`.
        Scenario::own("steering", "req", "/100b"),
        // Time to first byte, 0-RTT against a full handshake (aioquic): see `zero_rtt.rs`.
        Scenario::own("zero-rtt", "ms", "/100b"),
        // WebSocket relays over each proxy's TCP listener (`websockets` client and echo
        // server, HTTP/1.1 upgrade): see `websocket.rs`.
        Scenario {
            duration,
            ..Scenario::own(websocket::SMALL.name, "msg", "/")
        },
        Scenario {
            duration,
            ..Scenario::own(websocket::BULK.name, "MiB", "/")
        },
        // The XDP program in the kernel, no traffic: see `xdp.rs`.
        Scenario::own("xdp", "Mpps", ""),
    ]
}

/// Runs the harness with the arguments after `cargo xtask bench --`.
pub fn run(args: &[String]) -> Result<()> {
    let a = match Args::try_parse_from(
        std::iter::once("bench".to_string()).chain(args.iter().cloned()),
    ) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            // `--help` is an answer, not a mistake.
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) {
                return Ok(());
            }
            bail!("bad arguments");
        }
    };
    let root = crate::workspace_root();
    let out = if a.out.is_absolute() {
        a.out.clone()
    } else {
        root.join(&a.out)
    };
    std::fs::create_dir_all(&out)?;
    let duration = a.duration.unwrap_or(if a.quick { 2.0 } else { 10.0 });
    let warm_up = a.warm_up.unwrap_or(if a.quick { 1.0 } else { 2.0 });
    let wanted: Vec<&str> = a.scenarios.split(',').map(str::trim).collect();
    let all = scenarios(a.quick, duration, warm_up);
    for w in &wanted {
        if !all.iter().any(|s| s.name == *w) {
            bail!("unknown scenario {w:?}");
        }
    }
    let chosen: Vec<&Scenario> = all.iter().filter(|s| wanted.contains(&s.name)).collect();
    let proxies = a
        .proxies
        .split(',')
        .map(|p| ProxyKind::parse(p.trim()).with_context(|| format!("unknown proxy {p:?}")))
        .collect::<Result<Vec<_>>>()?;
    let generators = a
        .generators
        .split(',')
        .map(|g| Generator::parse(g.trim()).with_context(|| format!("unknown generator {g:?}")))
        .collect::<Result<Vec<_>>>()?;
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }

    // Prerequisites, idempotently.
    let bins = peers::ensure()?;
    let certs = spooky_peers::certs::generate(&root.join("config/certs"))?;
    if !a.no_build {
        // The quickstart's and the package's release build: after either, nothing to build.
        crate::package::build_release(&root)?;
    }
    let target_dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let oha_bin = if generators.contains(&Generator::Oha) {
        Some(oha::ensure(&target_dir)?)
    } else {
        None
    };
    let spooky = target_dir.join("release/spooky");
    let load = target_dir.join("release/spooky-load");
    for b in [&spooky, &load] {
        if !b.is_file() {
            bail!(
                "{} missing: build with cargo build --release -p spooky -p spooky-peers --bins",
                b.display()
            );
        }
    }

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = !a.unpinned && cpus >= 2;
    let (proxy_cpu, load_cpu) = if pinned {
        (Some(1), Some(0))
    } else {
        (None, None)
    };

    // Scratch space on tmpfs when there is one (nginx stores uploads there).
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("spooky-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let body = dir.join("upload-1m.bin");
    std::fs::write(&body, vec![b'u'; 1 << 20])?;
    let result = run_all(
        &RunCtx {
            bins: &bins,
            spooky: &spooky,
            load: &load,
            oha: oha_bin.as_deref(),
            upload_body: &body,
            dir: &dir,
            cert: &certs.join("spooky.crt"),
            key: &certs.join("spooky.key"),
            ca: &certs.join("ca.crt"),
            proxy_cpu,
            load_cpu,
            quick: a.quick,
            no_gro: a.no_gro,
            runs: a.runs,
            rate: a.rate,
        },
        &chosen,
        &proxies,
        &generators,
    );
    let _ = std::fs::remove_dir_all(&dir);
    // Spooky keeps its pinned maps when it stops (for bpftool, and for a successor).
    let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/spooky-bench-{}", std::process::id()));
    let mut results = result?;
    if chosen.iter().any(|s| s.name == "xdp") {
        results.xdp = xdp::run(&root, a.no_build)?;
    }

    let env = Env::collect(&bins, &spooky, oha_bin.as_deref(), pinned, &root, args);
    let json = report::json(&env, &results);
    std::fs::write(out.join("results.json"), json)?;
    let md = report::markdown(&env, &results);
    std::fs::write(out.join("results.md"), &md)?;
    let svg = report::svg(&results.runs, &env);
    std::fs::write(out.join("chart.svg"), &svg)?;
    if let Some(c) = &a.chart {
        let c = if c.is_absolute() {
            c.clone()
        } else {
            root.join(c)
        };
        std::fs::write(&c, &svg)?;
        eprintln!("bench: chart written to {}", c.display());
    }
    println!("{md}");
    eprintln!("bench: results in {}", out.display());
    Ok(())
}

struct RunCtx<'a> {
    bins: &'a PeerBins,
    spooky: &'a Path,
    load: &'a Path,
    oha: Option<&'a Path>,
    upload_body: &'a Path,
    dir: &'a Path,
    cert: &'a Path,
    key: &'a Path,
    ca: &'a Path,
    proxy_cpu: Option<usize>,
    load_cpu: Option<usize>,
    quick: bool,
    no_gro: bool,
    runs: u32,
    rate: Option<f64>,
}

/// A count-mode run through one proxy whose request count must equal nginx's exactly.
pub struct CountCheck {
    pub proxy: &'static str,
    pub requested: u64,
    pub client_completed: u64,
    pub nginx_logged: u64,
}

/// A free port on 127.0.0.1. `udp`: free over UDP and TCP both (the proxies listen on both
/// with one number; a UDP port alone may be some TCP connection's source port).
fn free_port(udp: bool) -> Result<u16> {
    if !udp {
        return Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port());
    }
    for _ in 0..100 {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = socket.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free over both UDP and TCP on 127.0.0.1")
}

/// Everything one harness run measured.
#[derive(Default)]
pub struct Results {
    pub runs: Vec<RunResult>,
    pub checks: Vec<CountCheck>,
    pub upgrades: Vec<upgrade::Outcome>,
    /// Requests per second of the `rate` scenario.
    pub rate: Option<f64>,
    pub xdp: Vec<xdp::Case>,
    pub steering: Vec<steering::Outcome>,
    pub zero_rtt: Vec<zero_rtt::Outcome>,
    pub websocket: Vec<websocket::Outcome>,
}

fn run_all(
    ctx: &RunCtx<'_>,
    chosen: &[&Scenario],
    proxies: &[ProxyKind],
    generators: &[Generator],
) -> Result<Results> {
    let nginx_port = free_port(false)?;
    let mut nginx = peers::Nginx::start(&ctx.bins.nginx, ctx.dir, nginx_port, ctx.load_cpu)?;
    let nginx_worker = nginx.worker_pid().context("no nginx worker process")?;
    let mut res = Results::default();
    for &kind in proxies.iter().filter(|k| !k.oha_only()) {
        // The count check: N requests in count mode, N lines in nginx's log.
        let mut proxy = start_ready(ctx, kind, nginx.port, false)?;
        let n = if ctx.quick { 500 } else { 5000 };
        let before = nginx.logged_requests();
        let kv = load_run(
            ctx,
            proxy.1,
            "/100b",
            &[
                "-c".into(),
                "10".into(),
                "-m".into(),
                "10".into(),
                "-n".into(),
                n.to_string(),
            ],
            &[],
            &ctx.dir.join("count.kv"),
        )?;
        let after = nginx.logged_requests();
        res.checks.push(CountCheck {
            proxy: kind.name(),
            requested: n,
            client_completed: kv_u64(&kv, "completed_total"),
            nginx_logged: after.saturating_sub(before),
        });
        proxy.0.stop();
    }
    let steady = |sc: &&&Scenario| {
        !matches!(
            sc.name,
            "upgrade" | "xdp" | "rate" | "steering" | "zero-rtt" | "ws-small" | "ws-bulk"
        )
    };
    for run in 1..=ctx.runs {
        for sc in chosen.iter().filter(steady) {
            for &generator in generators {
                for &kind in proxies {
                    if let Some(r) = one_run(
                        ctx,
                        sc,
                        generator,
                        kind,
                        &mut nginx,
                        nginx_worker,
                        run,
                        None,
                    )? {
                        res.runs.push(r);
                    }
                }
            }
        }
    }
    if let Some(sc) = chosen.iter().find(|s| s.name == "rate") {
        let rate = ctx.rate.unwrap_or_else(|| half_the_slowest(&res.runs));
        res.rate = Some(rate);
        for run in 1..=ctx.runs {
            for &kind in proxies {
                let r = one_run(
                    ctx,
                    sc,
                    Generator::Oha,
                    kind,
                    &mut nginx,
                    nginx_worker,
                    run,
                    Some(rate),
                )?;
                res.runs.extend(r);
            }
        }
    }
    if chosen.iter().any(|s| s.name == "steering") {
        let rate = res
            .rate
            .or(ctx.rate)
            .unwrap_or_else(|| half_the_slowest(&res.runs));
        res.steering = steering::run(ctx, rate)?;
    }
    if chosen.iter().any(|s| s.name == "zero-rtt") {
        for run in 1..=ctx.runs {
            for &kind in proxies {
                res.zero_rtt
                    .push(zero_rtt::run(ctx, kind, nginx.port, run)?);
            }
        }
    }
    for shape in [&websocket::SMALL, &websocket::BULK] {
        let Some(sc) = chosen.iter().find(|s| s.name == shape.name) else {
            continue;
        };
        for run in 1..=ctx.runs {
            for &kind in proxies.iter().filter(|k| !k.oha_only()) {
                res.websocket
                    .push(websocket::run(ctx, shape, kind, sc.duration, run)?);
            }
        }
    }
    if chosen.iter().any(|s| s.name == "upgrade") {
        let kinds = [ProxyKind::Spooky, ProxyKind::Envoy];
        for &kind in proxies.iter().filter(|k| kinds.contains(k)) {
            eprintln!("bench: upgrade through {}", kind.name());
            let o = upgrade::run(ctx, kind, nginx.port)?;
            eprintln!("bench:   {o:?}");
            res.upgrades.push(o);
        }
    }
    nginx.stop();
    Ok(res)
}

/// Half of the slowest proxy's median oha rate for 100 B requests (2,000/s without one).
fn half_the_slowest(runs: &[RunResult]) -> f64 {
    let mut by_proxy: HashMap<&str, Vec<f64>> = HashMap::new();
    for r in runs
        .iter()
        .filter(|r| r.scenario == "small" && r.generator == "oha" && r.ok)
    {
        by_proxy.entry(&r.proxy).or_default().push(r.rps);
    }
    by_proxy
        .values_mut()
        .map(|v| report::median(v))
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))))
        .map_or(2000.0, |slowest| (slowest / 2.0).round())
}

/// One run of `sc` through a fresh `kind`, or `None` when the generator does not drive that
/// scenario or proxy.
#[allow(clippy::too_many_arguments)]
fn one_run(
    ctx: &RunCtx<'_>,
    sc: &Scenario,
    generator: Generator,
    kind: ProxyKind,
    nginx: &mut peers::Nginx,
    nginx_worker: u32,
    run: u32,
    rate: Option<f64>,
) -> Result<Option<RunResult>> {
    let oha_shape = match generator {
        Generator::Oha => match (sc.oha, ctx.oha) {
            (Some(shape), Some(bin)) => Some((shape, bin)),
            _ => return Ok(None),
        },
        Generator::SpookyLoad if sc.load_args.is_empty() || kind.oha_only() => return Ok(None),
        Generator::SpookyLoad => None,
    };
    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load_avg: String = load_avg
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!(
        "bench: {} / {} / {} run {run} (loadavg {load_avg})",
        sc.name,
        generator.name(),
        kind.name(),
    );
    let backend = if sc.h1_backend {
        Backend::Http1(nginx.h1_port)
    } else {
        Backend::H2c(nginx.port)
    };
    let (mut proxy, port, admin) = start_ready_admin(ctx, kind, backend)?;
    let pid = proxy.pid();
    let rss_base = report::status_kib(pid, "VmRSS:");
    // Spooky's datagram counters, to see how many packets the client sends per packet it
    // gets (its ACK rate).
    let datagrams = || {
        (kind == ProxyKind::Spooky)
            .then(|| peers::spooky_datagrams(admin))
            .flatten()
    };
    let datagrams_before = datagrams();
    let datagrams_after = std::cell::Cell::new(None);
    let tag = format!("{}-{}-{}-{run}", sc.name, generator.name(), kind.name());
    let logged_before = nginx.logged_requests();
    // (VmHWM, VmRSS, running) of the proxy as the window closed.
    let at_end = std::cell::Cell::new((0, 0, false));
    let measured = match oha_shape {
        Some(((connections, parallel), bin)) => {
            // The warm-up: spooky-load, the same kind of requests (none before the idle
            // connections: their memory is measured from the proxy's RSS before them).
            let warm_args = if sc.load_args.is_empty() {
                vec!["-c".into(), "10".into(), "-m".into(), "10".into()]
            } else {
                sc.load_args.clone()
            };
            let mut warm_args = warm_args;
            warm_args.extend(["-D".into(), format!("{}s", sc.warm_up)]);
            let warm_kv = ctx.dir.join(format!("{tag}-warm.kv"));
            let oha_run = |seconds: f64, json_out: PathBuf| oha::OhaRun {
                bin,
                cpu: ctx.load_cpu,
                ca: ctx.ca,
                port,
                path: sc.path,
                connections,
                parallel,
                seconds,
                rate: rate.or(sc.oha_rate),
                upload: (sc.name == "upload").then_some(ctx.upload_body),
                json_out,
                netns: None,
                connect_to: None,
                http2: sc.tcp,
            };
            if sc.tcp {
                // spooky-load speaks HTTP/3 only: oha itself warms up the TCP path.
                let warm = oha_run(sc.warm_up, ctx.dir.join(format!("{tag}-warm.json")));
                let _ = warm.command().status();
            } else if sc.name != "idle" {
                let _ = load_command(ctx, port, sc.path, &warm_args, &[], &warm_kv).status();
            }
            let logged_warm = nginx.logged_requests();
            let json = ctx.dir.join(format!("{tag}.json"));
            let command = oha_run(sc.duration, json.clone()).command();
            // oha's deadline plus a little: the figures are taken then, and the proxy is
            // told to stop so that oha's connections close.
            let window = Duration::from_secs_f64(sc.duration + 0.2);
            let end = || {
                datagrams_after.set(datagrams());
                at_end.set((
                    report::status_kib(pid, "VmHWM:"),
                    report::status_kib(pid, "VmRSS:"),
                    measure::running(pid),
                ));
                proxy.terminate();
            };
            measure::run(command, pid, nginx_worker, Some(window), end)
                .and_then(|(_, w)| Ok((oha::parse(&json)?, w)))
                .map(|(o, w)| {
                    // oha's requests in flight at its deadline, and the warm-up's at its end
                    // (their lines may reach nginx's log after the warm-up was counted).
                    let in_flight = 2 * u64::from(connections * parallel);
                    let mut r = RunResult::from_oha(
                        sc.name,
                        sc.unit,
                        kind.name(),
                        sc.duration,
                        &o,
                        &w,
                        in_flight,
                    )
                    .with_logged(nginx.logged_requests().saturating_sub(logged_warm));
                    if sc.name == "idle" {
                        r.open_connections = u64::from(connections);
                    }
                    r
                })
        }
        None => {
            let mut args = sc.load_args.clone();
            args.extend([
                "--warm-up".into(),
                format!("{}s", sc.warm_up),
                "-D".into(),
                format!("{}s", sc.duration),
            ]);
            let watch = [("proxy", pid), ("nginx", nginx_worker)];
            let kv_path = ctx.dir.join(format!("{tag}.kv"));
            let cmd = load_command(ctx, port, sc.path, &args, &watch, &kv_path);
            let end = || datagrams_after.set(datagrams());
            measure::run(cmd, pid, nginx_worker, None, end).and_then(|(out, w)| {
                let kv = read_kv(&kv_path, &out)?;
                Ok(RunResult::from_kv(sc.name, sc.unit, kind.name(), &kv, &w)
                    .with_logged(nginx.logged_requests().saturating_sub(logged_before)))
            })
        }
    };
    let (hwm, rss_end, running_at_end) = at_end.get();
    // A proxy stopped at the end of an oha window: whether it ran until then.
    let alive = if proxy.terminated() {
        running_at_end
    } else {
        proxy.alive()
    };
    proxy.stop();
    if !nginx.alive() {
        bail!("nginx died; see its log in {}", ctx.dir.display());
    }
    let mut r = measured.unwrap_or_else(|e| {
        eprintln!("bench: {tag}: {e:#}");
        RunResult::failed(sc.name, sc.unit, kind.name(), generator.name())
    });
    r.run = run;
    r.rss_base_kib = rss_base;
    if let (Some((in0, out0)), Some((in1, out1))) = (datagrams_before, datagrams_after.get()) {
        r.datagrams_in = in1.saturating_sub(in0);
        r.datagrams_out = out1.saturating_sub(out0);
    }
    if r.generator == "oha" {
        r.hwm_kib = hwm;
        r.rss_end_kib = rss_end;
    }
    r.proxy_survived = alive;
    r.loadavg = load_avg;
    eprintln!("bench:   {}", r.one_line());
    Ok(Some(r))
}

/// Starts a proxy on a fresh port and waits until a request through it succeeds;
/// `upgradable`: so that a second process can take over from it (Envoy: hot restart on).
fn start_ready(
    ctx: &RunCtx<'_>,
    kind: ProxyKind,
    nginx_port: u16,
    upgradable: bool,
) -> Result<(peers::Proc, u16)> {
    start_ready_with(ctx, kind, Backend::H2c(nginx_port), upgradable).map(|(p, port, _)| (p, port))
}

/// Where the proxies forward: nginx's h2c port or its HTTP/1.1 one.
#[derive(Clone, Copy)]
enum Backend {
    H2c(u16),
    Http1(u16),
}

/// [`start_ready`], also returning the admin port (Spooky's metrics).
fn start_ready_admin(
    ctx: &RunCtx<'_>,
    kind: ProxyKind,
    backend: Backend,
) -> Result<(peers::Proc, u16, u16)> {
    start_ready_with(ctx, kind, backend, false)
}

fn start_ready_with(
    ctx: &RunCtx<'_>,
    kind: ProxyKind,
    backend: Backend,
    upgradable: bool,
) -> Result<(peers::Proc, u16, u16)> {
    let port = free_port(true)?;
    let (backend_port, backend_http1) = match backend {
        Backend::H2c(p) => (p, false),
        Backend::Http1(p) => (p, true),
    };
    let setup = ProxySetup {
        admin_port: free_port(false)?,
        dir: ctx.dir,
        cert: ctx.cert,
        key: ctx.key,
        port,
        backend_port,
        backend_http1,
        cpu: ctx.proxy_cpu,
        upgradable,
    };
    let mut proc = peers::start_proxy(kind, ctx.bins, ctx.spooky, &setup)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if !proc.alive() {
            let log = std::fs::read_to_string(ctx.dir.join(format!("{}.log", kind.name())))
                .unwrap_or_default();
            bail!("{} exited at start:\n{log}", kind.name());
        }
        // Verifies the certificate chain against the CA, as a client would.
        let probe = Command::new(ctx.load)
            .args([
                &format!("https://localhost:{port}/100b"),
                "--connect",
                &format!("127.0.0.1:{port}"),
                "-c",
                "1",
                "-m",
                "1",
                "-n",
                "1",
                "--timeout",
                "1s",
                "--ca",
                &ctx.ca.to_string_lossy(),
            ])
            .output()?;
        if probe.status.success() {
            return Ok((proc, port, setup.admin_port));
        }
        if Instant::now() > deadline {
            bail!(
                "{} never answered: {}",
                kind.name(),
                String::from_utf8_lossy(&probe.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs spooky-load (pinned with the backend) and returns its flat report.
fn load_run(
    ctx: &RunCtx<'_>,
    port: u16,
    path: &str,
    args: &[String],
    watch: &[(&str, u32)],
    kv_path: &Path,
) -> Result<HashMap<String, String>> {
    let out = load_command(ctx, port, path, args, watch, kv_path).output()?;
    read_kv(kv_path, &out)
}

/// The spooky-load command line (pinned with the backend when the run is pinned).
fn load_command(
    ctx: &RunCtx<'_>,
    port: u16,
    path: &str,
    args: &[String],
    watch: &[(&str, u32)],
    kv_path: &Path,
) -> Command {
    load_command_with(
        ctx.load,
        ctx.load_cpu,
        ctx.no_gro,
        port,
        path,
        args,
        watch,
        kv_path,
    )
}

/// [`load_command`] with the parts of the context it needs, for a thread of its own.
#[allow(clippy::too_many_arguments)]
fn load_command_with(
    load: &Path,
    load_cpu: Option<usize>,
    no_gro: bool,
    port: u16,
    path: &str,
    args: &[String],
    watch: &[(&str, u32)],
    kv_path: &Path,
) -> Command {
    let mut cmd = match load_cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string()]).arg(load);
            c
        }
        None => Command::new(load),
    };
    cmd.arg(format!("https://localhost:{port}{path}"))
        .args(["--connect", &format!("127.0.0.1:{port}")])
        .args(args)
        .args(["--kv", &kv_path.to_string_lossy()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(kv_path.with_extension("log"))
                .map_or_else(|_| Stdio::null(), Stdio::from),
        );
    if no_gro {
        cmd.arg("--no-gro");
    }
    for (name, pid) in watch {
        cmd.args(["--watch", &format!("{name}={pid}")]);
    }
    cmd
}

/// spooky-load's flat `key=value` report.
fn read_kv(kv_path: &Path, out: &std::process::Output) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(kv_path).unwrap_or_default();
    let kv: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if kv.is_empty() {
        let log = std::fs::read_to_string(kv_path.with_extension("log")).unwrap_or_default();
        bail!("spooky-load failed ({}): {}", out.status, log.trim());
    }
    Ok(kv)
}

fn kv_u64(kv: &HashMap<String, String>, key: &str) -> u64 {
    kv.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}
