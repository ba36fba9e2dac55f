//! The `ws-small` and `ws-bulk` scenarios: WebSocket relays through each proxy's TCP
//! listener (TLS, HTTP/1.1 upgrade) to one echo server (the `websockets` package,
//! `spooky/tests/peers/ws_echo_server.py`) that every proxy reaches over HTTP/1.1. The
//! client is `spooky/tests/peers/ws_load.py` on the same package: 10 connections, each
//! keeping a window of messages in flight, every echo checked. oha speaks no WebSocket, so
//! the load is the `websockets` client's; what is compared is the proxy's CPU per message,
//! which does not depend on how fast the client is.
//!
//! Envoy relays WebSockets only where its connection manager names the upgrade
//! (`upgrade_configs`, as its WebSocket documentation configures it); Spooky and Caddy do by
//! default.

use super::measure::{process_ticks, ticks_per_second};
use super::peers::{Proc, ProxyKind};
use super::{Backend, RunCtx};
use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One scenario's shape.
pub struct Shape {
    pub name: &'static str,
    pub connections: u32,
    pub inflight: u32,
    pub size: u32,
}

pub const SMALL: Shape = Shape {
    name: "ws-small",
    connections: 10,
    inflight: 16,
    size: 128,
};

pub const BULK: Shape = Shape {
    name: "ws-bulk",
    connections: 10,
    inflight: 4,
    size: 64 * 1024,
};

/// One proxy, one run.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub scenario: &'static str,
    pub proxy: &'static str,
    pub run: u32,
    pub seconds: f64,
    /// Messages echoed (each crossed the proxy twice).
    pub messages: u64,
    /// Echoed payload, MiB (the same went the other way).
    pub mib: f64,
    /// Round trip from send to echo: (p50, p90, p99) in ms.
    pub rtt: (f64, f64, f64),
    pub proxy_cpu_s: f64,
    pub backend_cpu_s: f64,
    pub hwm_kib: u64,
    pub failed: u64,
    pub first_error: String,
}

impl Outcome {
    pub fn per_cpu_second(&self) -> f64 {
        if self.proxy_cpu_s > 0.0 {
            self.messages as f64 / self.proxy_cpu_s
        } else {
            f64::NAN
        }
    }

    pub fn mib_per_cpu_second(&self) -> f64 {
        if self.proxy_cpu_s > 0.0 {
            self.mib / self.proxy_cpu_s
        } else {
            f64::NAN
        }
    }
}

/// The echo server, on the load generator's CPU.
fn start_echo(ctx: &RunCtx<'_>, port: u16) -> Result<Proc> {
    let script = crate::workspace_root().join("spooky/tests/peers/ws_echo_server.py");
    let log = ctx.dir.join("ws-echo.log");
    let proc = Proc::start(
        "ws-echo",
        ctx.load_cpu,
        &[
            "python3",
            &script.to_string_lossy(),
            &port.to_string(),
            "--plain-ok",
        ],
        &log,
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the WebSocket echo server never listened: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(proc)
}

/// Runs `shape` through `kind` once.
pub fn run(
    ctx: &RunCtx<'_>,
    shape: &Shape,
    kind: ProxyKind,
    seconds: f64,
    run: u32,
) -> Result<Outcome> {
    eprintln!(
        "bench: {} / websockets / {} run {run}",
        shape.name,
        kind.name()
    );
    let echo_port = super::free_port(false)?;
    let mut echo = start_echo(ctx, echo_port)?;
    let (mut proxy, port, _) = super::start_ready_admin(ctx, kind, Backend::Http1(echo_port))?;
    let script = crate::workspace_root().join("spooky/tests/peers/ws_load.py");
    let mut cmd = Command::new("python3");
    if let Some(cpu) = ctx.load_cpu {
        cmd = Command::new("taskset");
        cmd.args(["-c", &cpu.to_string(), "python3"]);
    }
    cmd.arg(&script)
        .args(["--port", &port.to_string(), "--ca"])
        .arg(ctx.ca)
        .args([
            "--connections",
            &shape.connections.to_string(),
            "--inflight",
            &shape.inflight.to_string(),
            "--size",
            &shape.size.to_string(),
            "--seconds",
            &seconds.to_string(),
        ])
        .stdin(Stdio::null());
    let (p0, e0) = (
        process_ticks(proxy.pid()).unwrap_or(0),
        process_ticks(echo.pid()).unwrap_or(0),
    );
    let out = cmd
        .output()
        .context("python3 ws_load.py (cargo xtask setup installs websockets)");
    let hz = ticks_per_second();
    let proxy_cpu_s = process_ticks(proxy.pid()).unwrap_or(p0).saturating_sub(p0) as f64 / hz;
    let backend_cpu_s = process_ticks(echo.pid()).unwrap_or(e0).saturating_sub(e0) as f64 / hz;
    let hwm_kib = super::report::status_kib(proxy.pid(), "VmHWM:");
    let alive = proxy.alive();
    proxy.stop();
    echo.stop();
    let out = out?;
    if !alive {
        bail!("{} died under WebSocket load", kind.name());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "ws_load.py's JSON ({}; stderr: {})",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let o = Outcome {
        scenario: shape.name,
        proxy: kind.name(),
        run,
        seconds: f("seconds"),
        messages: v["messages"].as_u64().unwrap_or(0),
        mib: v["bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0),
        rtt: (f("p50_ms"), f("p90_ms"), f("p99_ms")),
        proxy_cpu_s,
        backend_cpu_s,
        hwm_kib,
        failed: v["failed"].as_u64().unwrap_or(0) + v["mismatched"].as_u64().unwrap_or(0),
        first_error: v["first_error"].as_str().unwrap_or("").to_string(),
    };
    eprintln!("bench:   {o:?}");
    // A proxy that relays nothing has no figure to compare.
    if o.messages == 0 {
        bail!(
            "no WebSocket message came back through {}: {}",
            kind.name(),
            o.first_error
        );
    }
    Ok(o)
}
