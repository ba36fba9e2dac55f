//! The `zero-rtt` scenario: time to first byte over HTTP/3 for a returning client that sends
//! its request in 0-RTT, against a full handshake, through each proxy. The client is aioquic
//! (`spooky/tests/peers/h3_ttfb.py`): N connections one after the other with no ticket, then
//! N resuming with the newest ticket the proxy gave, one GET of 100 B each.
//!
//! On loopback there is no round trip to save (this kernel has no `netem` to add one), so
//! the difference shows the handshake's own work: certificate, signature and key exchange
//! against a PSK resumption. On a real path 0-RTT saves one round trip more.

use super::measure::{process_ticks, ticks_per_second};
use super::peers::ProxyKind;
use super::RunCtx;
use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};

/// One proxy, one run.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub proxy: &'static str,
    pub run: u32,
    pub connections: u64,
    /// Time to the response head: (p50, p90, p99) in ms.
    pub full: (f64, f64, f64),
    pub zero_rtt: (f64, f64, f64),
    /// Connections of the second set that resumed, and whose early data was accepted.
    pub resumed: u64,
    pub early_data: u64,
    pub failed: u64,
    /// The proxy's CPU per connection over both sets, µs.
    pub cpu_us_per_connection: f64,
    /// The proxy's peak resident memory, KiB.
    pub hwm_kib: u64,
}

/// Runs the client against `kind` once.
pub fn run(ctx: &RunCtx<'_>, kind: ProxyKind, nginx_port: u16, run: u32) -> Result<Outcome> {
    eprintln!("bench: zero-rtt / aioquic / {} run {run}", kind.name());
    let (mut proxy, port) = super::start_ready(ctx, kind, nginx_port, false)?;
    let pid = proxy.pid();
    let count: u64 = if ctx.quick { 50 } else { 200 };
    let ticks0 = process_ticks(pid).unwrap_or(0);
    let script = crate::workspace_root().join("spooky/tests/peers/h3_ttfb.py");
    let mut cmd = Command::new("python3");
    if let Some(cpu) = ctx.load_cpu {
        cmd = Command::new("taskset");
        cmd.args(["-c", &cpu.to_string(), "python3"]);
    }
    let out = cmd
        .arg(&script)
        .args(["--port", &port.to_string(), "--count", &count.to_string()])
        .arg("--ca")
        .arg(ctx.ca)
        .stdin(Stdio::null())
        .output()
        .context("python3 h3_ttfb.py (aioquic; cargo xtask setup installs it)")?;
    let ticks1 = process_ticks(pid).unwrap_or(0);
    let hwm_kib = super::report::status_kib(pid, "VmHWM:");
    proxy.stop();
    if !out.status.success() {
        bail!(
            "h3_ttfb.py failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("h3_ttfb.py's JSON")?;
    let pct = |mode: &str| {
        let f = |k: &str| v[mode][k].as_f64().unwrap_or(f64::NAN);
        (f("p50_ms"), f("p90_ms"), f("p99_ms"))
    };
    let n = |mode: &str, k: &str| v[mode][k].as_u64().unwrap_or(0);
    let cpu_s = ticks1.saturating_sub(ticks0) as f64 / ticks_per_second();
    let o = Outcome {
        proxy: kind.name(),
        run,
        connections: count,
        full: pct("full"),
        zero_rtt: pct("zero_rtt"),
        resumed: n("zero_rtt", "resumed"),
        early_data: n("zero_rtt", "early_data"),
        failed: n("full", "failed") + n("zero_rtt", "failed"),
        cpu_us_per_connection: cpu_s * 1e6 / (2 * count) as f64,
        hwm_kib,
    };
    eprintln!("bench:   {o:?}");
    Ok(o)
}
