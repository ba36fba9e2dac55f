//! The `upgrade` scenario: small requests at a fixed rate (20 connections, one request at a
//! time each, 10 ms between a response and the next request: about 1,900 requests/s) through
//! one proxy, and a handover to a new process of that proxy while the load runs:
//!
//! - Spooky: `spooky --config … --takeover` (docs/upgrades.md);
//! - Envoy: its hot restart, driven directly (`--restart-epoch 1` with the first process's
//!   `--base-id`; `--drain-time-s 2 --parent-shutdown-time-s 4`, so that the old process is
//!   gone inside the window, as Spooky's is: Envoy's defaults are 600 s and 900 s);
//! - Caddy is not run: it has no handover between processes (`caddy reload` changes the
//!   configuration inside the running process; a new binary means stop, then start).
//!
//! The measured window is 8 s: it opens 0.5 s before the new process is started, so it holds
//! the handover and the old process's exit. Reported: requests/s, p50/p99/max latency and
//! failed requests in the window, requests the load generator sent but never got an answer for
//! (whole run), and how long after the new process was started the old one exited.

use super::peers::{self, ProxyKind};
use super::RunCtx;
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const WARM_UP_S: f64 = 2.0;
const WINDOW_S: f64 = 8.0;
/// When, after the window opens, the new process is started.
const HANDOVER_AT_S: f64 = 0.5;
/// Envoy's hot-restart base id for the benchmark (separates it from any other Envoy).
pub const ENVOY_BASE_ID: &str = "5077";

/// One proxy's handover.
#[derive(Debug, Default)]
pub struct Outcome {
    pub proxy: &'static str,
    pub method: &'static str,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Failed requests in the window (error status, reset, truncated, connection closed
    /// under them, timeout).
    pub failed: u64,
    /// Requests sent in the whole run that never got a complete answer, beyond the ones
    /// still in flight when the load stopped (at most one per connection).
    pub unanswered: u64,
    /// Seconds from starting the new process to the old one's exit (None: it did not exit).
    pub old_exit_s: Option<f64>,
    pub note: String,
}

/// Runs the scenario through `kind` (Spooky or Envoy).
pub fn run(ctx: &RunCtx<'_>, kind: ProxyKind, nginx_port: u16) -> Result<Outcome> {
    let method = match kind {
        ProxyKind::Spooky => "spooky --takeover",
        ProxyKind::Envoy => "hot restart (--restart-epoch 1)",
        ProxyKind::Caddy | ProxyKind::EnvoyNoGro => {
            bail!("the upgrade scenario runs Spooky and Envoy only")
        }
    };
    let (mut old, port) = super::start_ready(ctx, kind, nginx_port, true)?;
    let load = {
        let args: Vec<String> = [
            "-c",
            "20",
            "-m",
            "1",
            "--interval",
            "10ms",
            "--timeout",
            "10s",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "--warm-up".into(),
            format!("{WARM_UP_S}s"),
            "-D".into(),
            format!("{WINDOW_S}s"),
        ])
        .collect();
        let kv_path = ctx.dir.join(format!("upgrade-{}.kv", kind.name()));
        let ctx_load = ctx.load.to_path_buf();
        let (load_cpu, no_gro) = (ctx.load_cpu, ctx.no_gro);
        std::thread::spawn(move || {
            let out = super::load_command_with(
                &ctx_load,
                load_cpu,
                no_gro,
                port,
                "/100b",
                &args,
                &[],
                &kv_path,
            )
            .output()?;
            super::read_kv(&kv_path, &out)
        })
    };
    std::thread::sleep(Duration::from_secs_f64(WARM_UP_S + HANDOVER_AT_S));
    let started = Instant::now();
    let mut new = start_successor(ctx, kind)?;
    let mut old_exit_s = None;
    while started.elapsed() < Duration::from_secs(30) {
        if !old.alive() {
            old_exit_s = Some(started.elapsed().as_secs_f64());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let kv = match load.join() {
        Ok(r) => r?,
        Err(_) => bail!("the load thread panicked"),
    };
    let alive = new.alive();
    new.stop();
    old.stop();
    let u = |k: &str| kv_u64(&kv, k);
    let f = |k: &str| kv.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let failed = ["status", "reset", "truncated", "connection", "timeout"]
        .iter()
        .map(|e| u(&format!("errors.{e}")))
        .sum();
    // In flight when the load stopped: at most one request per connection.
    let unanswered = u("sent_total")
        .saturating_sub(u("completed_total"))
        .saturating_sub(20);
    let mut note = String::new();
    if !alive {
        note.push_str("the new process died; ");
    }
    if old_exit_s.is_none() {
        note.push_str("the old process was still running 30 s after the handover; ");
    }
    Ok(Outcome {
        proxy: kind.name(),
        method,
        rps: f("requests_per_second"),
        p50_ms: f("latency.p50_ms"),
        p99_ms: f("latency.p99_ms"),
        max_ms: f("latency.max_ms"),
        failed,
        unanswered,
        old_exit_s,
        note,
    })
}

fn kv_u64(kv: &HashMap<String, String>, key: &str) -> u64 {
    kv.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The second process of `kind`, on the same configuration, taking over from the first.
fn start_successor(ctx: &RunCtx<'_>, kind: ProxyKind) -> Result<peers::Proc> {
    let log = ctx.dir.join(format!("{}-successor.log", kind.name()));
    match kind {
        ProxyKind::Spooky => peers::Proc::start(
            "spooky (successor)",
            ctx.proxy_cpu,
            &[
                &ctx.spooky.to_string_lossy(),
                "--config",
                &ctx.dir.join("spooky.yaml").to_string_lossy(),
                "--workers",
                "1",
                "--no-pin",
                "--takeover",
            ],
            &log,
        ),
        ProxyKind::Envoy => peers::Proc::start(
            "envoy (epoch 1)",
            ctx.proxy_cpu,
            &[
                &ctx.bins.envoy.to_string_lossy(),
                "-c",
                &ctx.dir.join("envoy.yaml").to_string_lossy(),
                "--concurrency",
                "1",
                "--log-level",
                "warn",
                "--base-id",
                ENVOY_BASE_ID,
                "--restart-epoch",
                "1",
                "--drain-time-s",
                "2",
                "--parent-shutdown-time-s",
                "4",
            ],
            &log,
        ),
        ProxyKind::Caddy | ProxyKind::EnvoyNoGro => {
            bail!("the upgrade scenario runs Spooky and Envoy only")
        }
    }
}
