//! The independent load generator: oha (crates.io, `--features http3`, quinn + h3), installed
//! by the harness with `cargo install` like the other peers, and one run of it turned into
//! the harness's figures.
//!
//! oha is always run in duration mode (`-z`): in count mode (`-n`) its HTTP/3 client waits
//! about 30 s for the connections to close after the last response. Each connection is its
//! own quinn endpoint, so `-c 10` is ten client sockets (ten 4-tuples) for every proxy.
//! oha has no warm-up: spooky-load warms the proxy up with the same kind of requests, then
//! oha runs for the measured seconds. At its deadline oha's HTTP/3 client sends GOAWAY and
//! waits for the server to close the connection; no proxy does so before its idle timeout,
//! so the harness takes its figures at the deadline and then stops the proxy gracefully
//! (`measure::run`).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The pinned release, as for Envoy and Caddy.
pub const VERSION: &str = "1.16.0";

/// Installs oha into `target/bench-tools/oha` if that version is not there yet; returns the
/// binary.
pub fn ensure(target_dir: &Path) -> Result<PathBuf> {
    let root = target_dir.join("bench-tools/oha");
    let bin = root.join("bin/oha");
    let have = Command::new(&bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(VERSION));
    if have {
        return Ok(bin);
    }
    eprintln!("bench: cargo install oha {VERSION} --features http3 (a few minutes, once)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .args([
            "install",
            "oha",
            "--version",
            VERSION,
            "--features",
            "http3",
        ])
        .args(["--locked", "--root"])
        .arg(&root)
        .status()?
        .success();
    if !ok || !bin.is_file() {
        bail!("cargo install oha {VERSION} --features http3 failed");
    }
    Ok(bin)
}

/// One oha invocation against `https://localhost:PORT{path}` over HTTP/3 (or HTTP/2).
pub struct OhaRun<'a> {
    pub bin: &'a Path,
    pub cpu: Option<usize>,
    pub ca: &'a Path,
    pub port: u16,
    pub path: &'a str,
    pub connections: u32,
    /// Requests in flight per connection (`-p`).
    pub parallel: u32,
    pub seconds: f64,
    /// Open loop: this many requests per second in all, latency corrected for coordinated
    /// omission (`-q R --latency-correction`).
    pub rate: Option<f64>,
    /// `PUT` with this file as the body.
    pub upload: Option<&'a Path>,
    pub json_out: PathBuf,
    /// Run inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// Connect to this address instead of what `localhost` resolves to.
    pub connect_to: Option<&'a str>,
    /// HTTP/2 over TLS over TCP instead of HTTP/3.
    pub http2: bool,
}

impl OhaRun<'_> {
    /// The command, pinned when asked.
    pub fn command(&self) -> Command {
        // `ip netns exec` and `taskset` both exec: the PID is oha's.
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = &self.netns {
            argv.extend(["ip", "netns", "exec", ns].map(String::from));
        }
        if let Some(cpu) = self.cpu {
            argv.extend(["taskset".to_string(), "-c".to_string(), cpu.to_string()]);
        }
        argv.push(self.bin.to_string_lossy().into_owned());
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]);
        c.arg(format!("https://localhost:{}{}", self.port, self.path))
            .args(["--http-version", if self.http2 { "2" } else { "3" }])
            .args(["--ipv4", "--no-tui"])
            .arg("--cacert")
            .arg(self.ca)
            .args(["-c", &self.connections.to_string()])
            .args(["-p", &self.parallel.to_string()])
            .args(["-z", &format!("{}ms", (self.seconds * 1000.0) as u64)])
            .args(["--output-format", "json", "-o"])
            .arg(&self.json_out)
            // One runtime thread: it shares one CPU with nginx when pinned.
            .env("TOKIO_WORKER_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log_file());
        if let Some(q) = self.rate {
            c.args(["-q", &format!("{q:.0}"), "--latency-correction"]);
        }
        if let Some(addr) = self.connect_to {
            let p = self.port;
            c.args(["--connect-to", &format!("localhost:{p}:{addr}:{p}")]);
        }
        if let Some(body) = self.upload {
            c.args(["-m", "PUT", "-D"]).arg(body);
        }
        c
    }
}

impl OhaRun<'_> {
    /// oha's own messages go next to its report.
    fn log_file(&self) -> Stdio {
        std::fs::File::create(self.json_out.with_extension("log"))
            .map_or_else(|_| Stdio::null(), Stdio::from)
    }
}

/// What the harness takes from oha's JSON report.
#[derive(Debug, Default, Clone)]
pub struct OhaReport {
    /// Responses with a 2xx status.
    pub ok: u64,
    /// Responses with another status, and requests that failed (oha's error distribution).
    pub failed: u64,
    /// Response body bytes.
    pub body_bytes: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// What the failures were: `N× kind` for each kind oha names (statuses included).
    pub failure_kinds: String,
}

/// Reads the report oha wrote.
pub fn parse(path: &Path) -> Result<OhaReport> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("oha wrote no report to {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).context("oha's JSON report")?;
    let mut r = OhaReport::default();
    if let Some(codes) = v["statusCodeDistribution"].as_object() {
        for (code, n) in codes {
            let n = n.as_u64().unwrap_or(0);
            if code.starts_with('2') {
                r.ok += n;
            } else {
                r.failed += n;
            }
        }
    }
    let mut kinds = Vec::new();
    if let Some(codes) = v["statusCodeDistribution"].as_object() {
        for (code, n) in codes.iter().filter(|(c, _)| !c.starts_with('2')) {
            kinds.push(format!("{}× status {code}", n.as_u64().unwrap_or(0)));
        }
    }
    if let Some(errs) = v["errorDistribution"].as_object() {
        // Requests still in flight when the time was up are not failures.
        for (e, n) in errs
            .iter()
            .filter(|(e, _)| !e.contains("aborted due to deadline"))
        {
            let n = n.as_u64().unwrap_or(0);
            r.failed += n;
            kinds.push(format!("{n}× {e}"));
        }
    }
    r.failure_kinds = kinds.join("; ");
    r.body_bytes = v["summary"]["totalData"].as_u64().unwrap_or(0);
    // Seconds in the percentile table.
    let pct = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1000.0;
    r.p50_ms = pct("p50");
    r.p99_ms = pct("p99");
    r.p999_ms = pct("p99.9");
    Ok(r)
}
