//! `cargo xtask bench`: Spooky against Envoy and Caddy as HTTP/3 → HTTP/2 reverse proxies in
//! front of one nginx, measured with `spooky-load` (see `spooky_peers::loadgen` and
//! docs/benchmarks.md).
//!
//! Pinned mode (the default on a machine with at least 2 CPUs): the proxy under test runs
//! alone on CPU 1, the load generator and nginx share CPU 0. Each (scenario, proxy) pair gets
//! a freshly started proxy, so peak RSS belongs to that scenario. CPU time of the proxy, of
//! nginx and of the load generator is read from /proc/PID/stat by the load generator at the
//! instants its measurement window opens and closes. Every run's request count is checked
//! against nginx's access log.
//!
//! Writes `results.json`, `results.md` and `chart.svg` into the output directory
//! (`target/bench` by default); `--chart PATH` writes the chart there too.

mod peers;
mod report;
mod upgrade;

use anyhow::{bail, Context, Result};
use clap::Parser;
use peers::{PeerBins, ProxyKind, ProxySetup};
use report::{Env, RunResult};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
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
    /// Scenarios, comma-separated: small, download, upload, handshake, idle, upgrade.
    #[arg(long, default_value = "small,download,upload,handshake,idle,upgrade")]
    scenarios: String,
    /// Proxies, comma-separated: spooky, envoy, caddy.
    #[arg(long, default_value = "spooky,envoy,caddy")]
    proxies: String,
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
    load_args: Vec<String>,
    warm_up: f64,
    duration: f64,
}

fn scenarios(quick: bool, duration: f64, warm_up: f64) -> Vec<Scenario> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let idle_conns = if quick { "300" } else { "1000" };
    vec![
        Scenario {
            name: "small",
            unit: "req",
            path: "/100b",
            load_args: s(&["-c", "10", "-m", "10"]),
            warm_up,
            duration,
        },
        Scenario {
            name: "download",
            unit: "MiB",
            path: "/1m",
            load_args: s(&["-c", "10", "-m", "1"]),
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
            warm_up,
            duration,
        },
        Scenario {
            name: "handshake",
            unit: "req",
            path: "/100b",
            load_args: s(&["-c", "16", "-m", "1", "--new-connection"]),
            warm_up,
            duration,
        },
        Scenario {
            name: "idle",
            unit: "req",
            path: "/100b",
            load_args: s(&["-c", idle_conns, "-m", "1", "--interval", "5s"]),
            warm_up: if quick { 3.0 } else { 5.0 },
            duration: if quick { 2.0 } else { 5.0 },
        },
        // Its own load and timing: see `upgrade.rs`.
        Scenario {
            name: "upgrade",
            unit: "req",
            path: "/100b",
            load_args: Vec::new(),
            warm_up: 0.0,
            duration: 0.0,
        },
    ]
}

/// Runs the harness with the arguments after `cargo xtask bench --`.
pub fn run(args: &[String]) -> Result<()> {
    let a = Args::try_parse_from(std::iter::once("bench".to_string()).chain(args.iter().cloned()))
        .map_err(|e| {
            let _ = e.print();
            anyhow::anyhow!("bad arguments")
        })?;
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

    // Prerequisites, idempotently.
    let bins = peers::ensure()?;
    let certs = spooky_peers::certs::generate(&root.join("config/certs"))?;
    if !a.no_build {
        eprintln!("bench: cargo build --release -p spooky -p spooky-peers --bins");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "spooky",
                "-p",
                "spooky-peers",
                "--bins",
            ])
            .current_dir(&root)
            .status()?
            .success();
        if !ok {
            bail!("release build failed");
        }
    }
    let target_dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
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
    let result = run_all(
        &RunCtx {
            bins: &bins,
            spooky: &spooky,
            load: &load,
            dir: &dir,
            cert: &certs.join("spooky.crt"),
            key: &certs.join("spooky.key"),
            ca: &certs.join("ca.crt"),
            proxy_cpu,
            load_cpu,
            quick: a.quick,
            no_gro: a.no_gro,
        },
        &chosen,
        &proxies,
    );
    let _ = std::fs::remove_dir_all(&dir);
    let (results, checks, upgrades) = result?;

    let env = Env::collect(&bins, &spooky, pinned, &root, args);
    let json = report::json(&env, &results, &checks, &upgrades);
    std::fs::write(out.join("results.json"), json)?;
    let md = report::markdown(&env, &results, &checks, &upgrades);
    std::fs::write(out.join("results.md"), &md)?;
    let svg = report::svg(&results, &env);
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
    dir: &'a Path,
    cert: &'a Path,
    key: &'a Path,
    ca: &'a Path,
    proxy_cpu: Option<usize>,
    load_cpu: Option<usize>,
    quick: bool,
    no_gro: bool,
}

/// A count-mode run through one proxy whose request count must equal nginx's exactly.
pub struct CountCheck {
    pub proxy: &'static str,
    pub requested: u64,
    pub client_completed: u64,
    pub nginx_logged: u64,
}

fn free_port(udp: bool) -> Result<u16> {
    let port = if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    };
    Ok(port)
}

type Results = (Vec<RunResult>, Vec<CountCheck>, Vec<upgrade::Outcome>);

fn run_all(ctx: &RunCtx<'_>, chosen: &[&Scenario], proxies: &[ProxyKind]) -> Result<Results> {
    let nginx_port = free_port(false)?;
    let mut nginx = peers::Nginx::start(&ctx.bins.nginx, ctx.dir, nginx_port, ctx.load_cpu)?;
    let nginx_worker = nginx.worker_pid().context("no nginx worker process")?;
    let mut results = Vec::new();
    let mut checks = Vec::new();
    let mut upgrades = Vec::new();
    for &kind in proxies {
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
        checks.push(CountCheck {
            proxy: kind.name(),
            requested: n,
            client_completed: kv_u64(&kv, "completed_total"),
            nginx_logged: after.saturating_sub(before),
        });
        proxy.0.stop();
    }
    for sc in chosen {
        if sc.name == "upgrade" {
            for &kind in proxies.iter().filter(|k| **k != ProxyKind::Caddy) {
                eprintln!("bench: upgrade through {}", kind.name());
                let o = upgrade::run(ctx, kind, nginx.port)?;
                eprintln!("bench:   {o:?}");
                upgrades.push(o);
            }
            continue;
        }
        for &kind in proxies {
            let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
            eprintln!(
                "bench: {} through {} (loadavg {})",
                sc.name,
                kind.name(),
                load_avg
                    .split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let (mut proxy, port) = start_ready(ctx, kind, nginx.port, false)?;
            let pid = proxy.pid();
            let rss_base = report::status_kib(pid, "VmRSS:");
            let logged_before = nginx.logged_requests();
            let mut args = sc.load_args.clone();
            args.extend([
                "--warm-up".into(),
                format!("{}s", sc.warm_up),
                "-D".into(),
                format!("{}s", sc.duration),
            ]);
            let watch = [("proxy", pid), ("nginx", nginx_worker)];
            let kv = load_run(
                ctx,
                port,
                sc.path,
                &args,
                &watch,
                &ctx.dir.join(format!("{}-{}.kv", sc.name, kind.name())),
            );
            let logged = nginx.logged_requests().saturating_sub(logged_before);
            let alive = proxy.alive();
            proxy.stop();
            if !nginx.alive() {
                bail!("nginx died; see its log in {}", ctx.dir.display());
            }
            let kv = match kv {
                Ok(kv) => kv,
                Err(e) => {
                    eprintln!("bench: {} / {}: {e:#}", sc.name, kind.name());
                    HashMap::new()
                }
            };
            let r = RunResult::from_kv(
                sc.name,
                sc.unit,
                kind.name(),
                &kv,
                rss_base,
                logged,
                alive,
                load_avg.trim(),
            );
            eprintln!("bench:   {}", r.one_line());
            results.push(r);
        }
    }
    nginx.stop();
    Ok((results, checks, upgrades))
}

/// Starts a proxy on a fresh port and waits until a request through it succeeds;
/// `upgradable`: so that a second process can take over from it (Envoy: hot restart on).
fn start_ready(
    ctx: &RunCtx<'_>,
    kind: ProxyKind,
    nginx_port: u16,
    upgradable: bool,
) -> Result<(peers::Proc, u16)> {
    let port = free_port(true)?;
    let setup = ProxySetup {
        dir: ctx.dir,
        cert: ctx.cert,
        key: ctx.key,
        port,
        backend_port: nginx_port,
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
            return Ok((proc, port));
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
    load_run_with(
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

/// [`load_run`] with the parts of the context it needs, for a thread of its own.
#[allow(clippy::too_many_arguments)]
fn load_run_with(
    load: &Path,
    load_cpu: Option<usize>,
    no_gro: bool,
    port: u16,
    path: &str,
    args: &[String],
    watch: &[(&str, u32)],
    kv_path: &Path,
) -> Result<HashMap<String, String>> {
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
        .args(["--kv", &kv_path.to_string_lossy()]);
    if no_gro {
        cmd.arg("--no-gro");
    }
    for (name, pid) in watch {
        cmd.args(["--watch", &format!("{name}={pid}")]);
    }
    let out = cmd.output()?;
    let text = std::fs::read_to_string(kv_path).unwrap_or_default();
    let kv: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if kv.is_empty() {
        bail!(
            "spooky-load failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(kv)
}

fn kv_u64(kv: &HashMap<String, String>, key: &str) -> u64 {
    kv.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}
