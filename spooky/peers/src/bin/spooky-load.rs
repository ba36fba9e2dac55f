//! `spooky-load https://localhost:9889/path -c 10 -m 10 -D 10s`: an h2load-style HTTP/3 load
//! generator (see `spooky_peers::loadgen`). Prints a summary, or the whole report as JSON with
//! `--json`.

use anyhow::{bail, Context, Result};
use clap::Parser;
use spooky_peers::loadgen::{self, LoadOptions};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "spooky-load",
    about = "HTTP/3 load generator on quiche: many connections × many streams, latency percentiles"
)]
struct Args {
    /// https://HOST[:PORT]/PATH
    url: String,
    /// Concurrent connections.
    #[arg(short = 'c', long, default_value_t = 10)]
    connections: usize,
    /// Concurrent requests per connection.
    #[arg(short = 'm', long, default_value_t = 10)]
    streams: usize,
    /// Threads, each with its own UDP socket (one per core is the most that helps).
    #[arg(short = 't', long, default_value_t = 1)]
    threads: usize,
    /// Stop after this many measured requests.
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Measure for this long (10s, 500ms, 2m). Default 10s unless -n is given.
    #[arg(short = 'D', long, value_parser = loadgen::parse_duration)]
    duration: Option<Duration>,
    /// Send unmeasured requests for this long first.
    #[arg(long, value_parser = loadgen::parse_duration, default_value = "0s")]
    warm_up: Duration,
    /// Request method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// Send a request body of this many bytes (use with --method PUT or POST).
    #[arg(long, default_value_t = 0)]
    data_size: usize,
    /// One request per connection: a full handshake for every request.
    #[arg(long)]
    new_connection: bool,
    /// Pause of each stream between one response and its next request (mostly idle
    /// connections).
    #[arg(long, value_parser = loadgen::parse_duration)]
    interval: Option<Duration>,
    /// Handshakes in progress per thread at most.
    #[arg(long, default_value_t = 100)]
    max_handshakes: usize,
    /// Send datagrams here instead of resolving the URL's host.
    #[arg(long)]
    connect: Option<String>,
    /// Verify the server certificate against this CA (PEM). Without it, no verification.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Receive datagrams one by one, without UDP GRO (by default the socket asks the kernel to
    /// coalesce them, as QUIC stacks such as quic-go and msquic do).
    #[arg(long)]
    no_gro: bool,
    /// Give up this long after the planned end.
    #[arg(long, value_parser = loadgen::parse_duration, default_value = "60s")]
    timeout: Duration,
    /// Read CPU time and memory of this process over the window: NAME=PID (repeatable).
    #[arg(long = "watch", value_name = "NAME=PID")]
    watch: Vec<String>,
    /// Write the report as JSON to this file ("-" for stdout) instead of the summary.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the report as flat `key=value` lines (`latency.p99_ms=1.2`,
    /// `watched.0.cpu_seconds=…`) to this file, for scripts without a JSON parser.
    #[arg(long)]
    kv: Option<PathBuf>,
}

/// Flattens a JSON value into `path=value` lines.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut String) {
    use std::fmt::Write;
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        serde_json::Value::Object(m) => m.iter().for_each(|(k, v)| flatten(&key(k), v, out)),
        serde_json::Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| flatten(&key(&i.to_string()), v, out)),
        serde_json::Value::String(s) => {
            let _ = writeln!(out, "{prefix}={s}");
        }
        other => {
            let _ = writeln!(out, "{prefix}={other}");
        }
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    let rest = a
        .url
        .strip_prefix("https://")
        .context("only https:// URLs")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .trim_matches(['[', ']']);
    let target = match &a.connect {
        Some(c) => c.clone(),
        None if authority.contains(':') => authority.to_string(),
        None => format!("{authority}:443"),
    };
    let Some(addr) = target.to_socket_addrs()?.next() else {
        bail!("cannot resolve {target}")
    };
    let mut watch = Vec::new();
    for w in &a.watch {
        let Some((name, pid)) = w.split_once('=') else {
            bail!("--watch wants NAME=PID, got {w:?}")
        };
        watch.push((name.to_string(), pid.parse().context("--watch PID")?));
    }
    let duration = match (a.duration, a.requests) {
        (None, None) => Some(Duration::from_secs(10)),
        (d, _) => d,
    };
    let opts = LoadOptions {
        target: addr,
        authority: authority.to_string(),
        server_name: host.to_string(),
        path: path.to_string(),
        method: a.method.clone(),
        body_len: a.data_size,
        connections: a.connections,
        streams: a.streams,
        threads: a.threads,
        requests: a.requests,
        duration,
        warm_up: a.warm_up,
        new_connection: a.new_connection,
        interval: a.interval,
        max_handshakes: a.max_handshakes.max(1),
        ca: a.ca.clone(),
        hard_timeout: a.timeout,
        gro: !a.no_gro,
        watch,
    };
    let r = loadgen::run(&opts)?;
    if let Some(p) = &a.kv {
        let mut text = String::new();
        flatten("", &serde_json::to_value(&r)?, &mut text);
        std::fs::write(p, text).with_context(|| format!("write {}", p.display()))?;
    }
    match &a.json {
        Some(p) if p.as_os_str() == "-" => println!("{}", serde_json::to_string_pretty(&r)?),
        Some(p) => std::fs::write(p, serde_json::to_vec_pretty(&r)?)
            .with_context(|| format!("write {}", p.display()))?,
        None => {
            let l = &r.latency;
            println!(
                "{} requests in {:.2}s: {:.0} req/s, {:.2} MiB/s, {} handshakes",
                r.requests, r.window_seconds, r.requests_per_second, r.mib_per_second, r.handshakes
            );
            println!(
                "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
                l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.mean_ms
            );
            println!(
                "errors: {} (status {}, reset {}, truncated {}, connection {}, timeout {})",
                r.errors.total(),
                r.errors.status,
                r.errors.reset,
                r.errors.truncated,
                r.errors.connection,
                r.errors.timeout
            );
            println!(
                "all phases: {} sent, {} completed; {} connections open at the end",
                r.sent_total, r.completed_total, r.open_connections
            );
            println!(
                "spooky-load CPU: {:.2}s ({:.0}% of a core)",
                r.loadgen_cpu_seconds, r.loadgen_cpu_percent
            );
            for w in &r.watched {
                println!(
                    "{} (pid {}): CPU {:.2}s ({:.0}%), RSS {} KiB, peak {} KiB",
                    w.name, w.pid, w.cpu_seconds, w.cpu_percent, w.rss_kib, w.hwm_kib
                );
            }
        }
    }
    if r.requests == 0 {
        bail!("no request succeeded");
    }
    Ok(())
}
