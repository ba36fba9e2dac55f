//! The `steering` scenario: what Spooky's kernel steering costs per request, with and
//! without XDP, at the same load. Two network namespaces of the harness's own, joined by a
//! veth pair (the machine's own interfaces and addresses are not touched): the client (oha)
//! in one; Spooky (on CPU 1) and an nginx of its own in the other, so the client's packets
//! arrive on an interface an XDP program can sit on. Spooky runs once with `--iface` on its
//! veth (XDP parses each packet and redirects it through a cpumap to the worker's CPU;
//! sk_reuseport picks the socket) and once without (sk_reuseport alone). oha sends the same
//! fixed rate of 100 B requests both times.
//!
//! With XDP part of the receive work moves out of Spooky's process: the program runs in
//! the veth's NAPI poll on the sending CPU, and the cpumap's kernel thread builds the
//! packets on CPU 1. So three figures per request: Spooky's own CPU, all of CPU 1 (Spooky,
//! the cpumap thread, interrupts and softirqs there) and the whole machine (client and
//! nginx included).

use super::measure::{cpu_idle_ticks, process_ticks, ticks_per_second};
use super::oha::{self, OhaRun};
use super::peers::{Nginx, Proc};
use super::RunCtx;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

// Private addresses on a link that exists only between the two namespaces.
const SERVER: &str = "10.77.0.1";
const CLIENT: &str = "10.77.0.2";

/// One run of one mode.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// "xdp" or "sk_reuseport".
    pub mode: String,
    pub run: u32,
    pub rate: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// Microseconds of CPU per request: Spooky's process, all of CPU 1, the whole machine.
    pub spooky_us: f64,
    pub cpu1_us: f64,
    pub machine_us: f64,
    /// Packets the XDP program redirected to a CPU, per request (0 without XDP).
    pub xdp_redirects_per_request: f64,
}

/// The two namespaces and the veth pair between them; deleted on drop.
struct Namespaces {
    server: String,
    client: String,
    server_if: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Namespaces {
    fn new() -> Result<Namespaces> {
        let tag = std::process::id() % 100_000;
        let ns = Namespaces {
            server: format!("spkb{tag}s"),
            client: format!("spkb{tag}c"),
            server_if: format!("spkb{tag}s"),
        };
        let client_if = format!("spkb{tag}c");
        ip(&["netns", "add", &ns.server])?;
        ip(&["netns", "add", &ns.client])?;
        ip(&[
            "link",
            "add",
            &ns.server_if,
            "netns",
            &ns.server,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "netns",
            &ns.client,
        ])?;
        for (netns, iface, addr) in [
            (&ns.server, &ns.server_if, SERVER),
            (&ns.client, &client_if, CLIENT),
        ] {
            ip(&["-n", netns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                iface,
            ])?;
            ip(&["-n", netns, "link", "set", iface, "up"])?;
        }
        // Native XDP on the receiving veth sees frames before any checksum is filled in:
        // the sender computes UDP checksums itself.
        let ok = Command::new("ip")
            .args([
                "netns", "exec", &ns.client, "ethtool", "-K", &client_if, "tx", "off",
            ])
            .status()
            .context("ethtool")?
            .success();
        if !ok {
            bail!("ethtool -K {client_if} tx off failed");
        }
        Ok(ns)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.client]);
        let _ = ip(&["netns", "del", &self.server]);
    }
}

/// Both modes, `runs` times each, interleaved, at `rate` requests per second.
pub fn run(ctx: &RunCtx<'_>, rate: f64) -> Result<Vec<Outcome>> {
    if !crate::is_root() {
        bail!("the steering scenario needs root (network namespaces, XDP)");
    }
    let Some(oha_bin) = ctx.oha else {
        bail!("the steering scenario runs oha: leave it in --generators");
    };
    let ns = Namespaces::new()?;
    let nginx_dir = ctx.dir.join("steering-nginx");
    std::fs::create_dir_all(&nginx_dir)?;
    let nginx_port = 8080;
    let mut nginx = Nginx::start_in(
        &ctx.bins.nginx,
        &nginx_dir,
        nginx_port,
        ctx.load_cpu,
        Some(&ns.server),
    )?;
    let mut out = Vec::new();
    for run in 1..=ctx.runs {
        for xdp in [true, false] {
            let o = one(ctx, oha_bin, &ns, nginx_port, rate, xdp, run)?;
            eprintln!("bench:   {o:?}");
            out.push(o);
        }
    }
    nginx.stop();
    Ok(out)
}

fn one(
    ctx: &RunCtx<'_>,
    oha_bin: &Path,
    ns: &Namespaces,
    nginx_port: u16,
    rate: f64,
    xdp: bool,
    run: u32,
) -> Result<Outcome> {
    let mode = if xdp { "xdp" } else { "sk_reuseport" };
    eprintln!("bench: steering / {mode} run {run} ({rate:.0} req/s)");
    let port = super::free_port(true)?;
    let conf = format!(
        r#"version: 1
listen:
  protocol: http3
  address: "{SERVER}"
  port: {port}
  tls: {{cert: "{cert}", key: "{key}"}}
quic:
  retry: "off"
  max_concurrent_streams: 100
steering:
  pin_path: /sys/fs/bpf/spooky-bench-{pid}
control_socket: {dir}/spooky-control-steering.sock
admin: {{address: "127.0.0.1:9900"}}
upstream:
  nginx:
    route: {{path_prefix: /}}
    backends:
      - {{id: nginx, address: "127.0.0.1:{nginx_port}"}}
# info: the steering mode is logged at start (nothing per request).
log: {{level: info, format: text}}
"#,
        cert = ctx.cert.display(),
        key = ctx.key.display(),
        pid = std::process::id(),
        dir = ctx.dir.display(),
    );
    let path = ctx.dir.join(format!("spooky-steering-{mode}.yaml"));
    std::fs::write(&path, conf)?;
    let spooky = ctx.spooky.to_string_lossy().to_string();
    let p = path.to_string_lossy().to_string();
    // Pinned (no --no-pin): the worker's CPU is then known, and XDP redirects to it. taskset
    // leaves Spooky CPU 1 alone, so the worker goes there. (`ip netns exec` execs.)
    let mut cmd = vec!["ip", "netns", "exec", &ns.server];
    cmd.extend([spooky.as_str(), "--config", &p, "--workers", "1"]);
    if xdp {
        cmd.extend(["--iface", &ns.server_if]);
    }
    let log = ctx.dir.join(format!("spooky-steering-{mode}.log"));
    let mut proxy = Proc::start("spooky", ctx.proxy_cpu, &cmd, &log)?;
    wait_ready(ctx, &mut proxy, ns, port, &log)?;
    if xdp {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if !text.contains("cpumap redirect") || text.contains("CPU redirect off") {
            bail!("XDP is not redirecting to the worker's CPU:\n{text}");
        }
    }
    let json = ctx.dir.join(format!("steering-{mode}-{run}.json"));
    let seconds = 8.0;
    let mut cmd = OhaRun {
        bin: oha_bin,
        cpu: ctx.load_cpu,
        ca: ctx.ca,
        port,
        path: "/100b",
        connections: 10,
        parallel: 10,
        seconds,
        rate: Some(rate),
        upload: None,
        json_out: json.clone(),
        netns: Some(ns.client.clone()),
        connect_to: Some(SERVER),
        http2: false,
    }
    .command();
    let redirects0 = xdp_redirects(ns);
    let hz = ticks_per_second();
    let cpu1 = ctx.proxy_cpu;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let (m0, c0, p0) = (
        cpu_idle_ticks(None),
        cpu_idle_ticks(cpu1),
        process_ticks(proxy.pid()).unwrap_or(0),
    );
    let started = Instant::now();
    let mut child = cmd.spawn().context("oha")?;
    std::thread::sleep(Duration::from_secs_f64(seconds + 0.2));
    let (m1, c1, p1) = (
        cpu_idle_ticks(None),
        cpu_idle_ticks(cpu1),
        process_ticks(proxy.pid()).unwrap_or(p0),
    );
    let wall = started.elapsed().as_secs_f64() * hz;
    let redirects1 = xdp_redirects(ns);
    // oha waits for the server to close its connections (see `oha.rs`).
    proxy.terminate();
    let deadline = Instant::now() + Duration::from_secs(45);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("oha did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.stop();
    let o = oha::parse(&json)?;
    let n = o.ok.max(1) as f64;
    let us = |t: f64| 1e6 * t / hz / n;
    // Busy = wall time minus idle time (see `cpu_idle_ticks`).
    let busy = |idle: u64, cpus: f64| (wall * cpus - idle as f64).max(0.0);
    Ok(Outcome {
        mode: mode.into(),
        run,
        rate,
        rps: o.ok as f64 / seconds,
        p50_ms: o.p50_ms,
        p99_ms: o.p99_ms,
        errors: o.failed,
        spooky_us: us(p1.saturating_sub(p0) as f64),
        // Unpinned, "CPU 1" is every CPU.
        cpu1_us: us(busy(
            c1.saturating_sub(c0),
            if cpu1.is_some() { 1.0 } else { cpus },
        )),
        machine_us: us(busy(m1.saturating_sub(m0), cpus)),
        xdp_redirects_per_request: match (redirects0, redirects1) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / n,
            _ => 0.0,
        },
    })
}

/// Waits until a request through the proxy succeeds, from the client's namespace.
fn wait_ready(
    ctx: &RunCtx<'_>,
    proxy: &mut Proc,
    ns: &Namespaces,
    port: u16,
    log: &Path,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if !proxy.alive() {
            bail!(
                "spooky exited at start:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        let probe = Command::new("ip")
            .args(["netns", "exec", &ns.client])
            .arg(ctx.load)
            .arg(format!("https://localhost:{port}/100b"))
            .args(["--connect", &format!("{SERVER}:{port}")])
            .args(["-c", "1", "-m", "1", "-n", "1", "--timeout", "1s", "--ca"])
            .arg(ctx.ca)
            .output()?;
        if probe.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("spooky never answered on {SERVER}:{port}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Packets the XDP program redirected to a CPU so far, from Spooky's metrics (its pinned
/// maps live in the server namespace's own bpffs mount).
fn xdp_redirects(ns: &Namespaces) -> Option<u64> {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.server, "curl", "-sf"])
        .arg("http://127.0.0.1:9900/metrics")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let name = spooky_common::maps::Counter::Redirected.name();
    let prefix = format!("spooky_ebpf_packets_total{{counter=\"{name}\"");
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum(),
    )
}
