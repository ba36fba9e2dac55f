//! An h2load-style HTTP/3 load generator on quiche, behind the `spooky-load` binary and
//! `cargo xtask bench`. Many connections × many concurrent streams, bounded by a duration or
//! a request count, with a warm-up, per-request latency, and CPU / memory readings of other
//! processes (the proxy under test, the backend) taken at the very instants the measurement
//! window opens and closes.
//!
//! Thread model: `threads` OS threads, each owning one non-blocking UDP socket and a share of
//! the connections, driven by a current-thread tokio runtime used only to wait for
//! readability, writability or the next timer. Incoming datagrams are matched to their
//! connection by destination connection ID (we choose 16-byte source IDs). Nothing is shared
//! between threads while they run; results are merged at the end.
//!
//! What counts: a request is *measured* when it was sent at or after the end of the warm-up
//! and (in duration mode) finished before the end. Latency is from `send_request` (or, with
//! `new_connection`, from the start of the handshake) to the end of the response. Byte
//! throughput counts response bodies (download) and request bodies (upload) of measured
//! requests. Requests still in flight when the duration ends are dropped, not counted as
//! errors; `sent_total` and `completed_total` (all phases) let a caller compare with the
//! server's own request counts.
//!
//! Not here: HTTP/1 or HTTP/2, pacing of packets (datagrams leave as soon as quiche produces
//! them), 0-RTT or session resumption (every handshake is a full one).

mod worker;

use quiche::h3;
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Clock ticks per second of /proc/*/stat (USER_HZ, fixed at 100 on Linux).
const CLK_TCK: f64 = 100.0;

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Where to send datagrams.
    pub target: SocketAddr,
    /// `:authority` of every request.
    pub authority: String,
    /// TLS server name (SNI).
    pub server_name: String,
    /// `:path` of every request.
    pub path: String,
    /// `:method` of every request.
    pub method: String,
    /// Request body length in bytes (0: no body).
    pub body_len: usize,
    /// Concurrent connections (in all threads together).
    pub connections: usize,
    /// Concurrent requests per connection.
    pub streams: usize,
    /// Worker threads (each with its own socket).
    pub threads: usize,
    /// Stop after this many measured requests (in all threads together).
    pub requests: Option<u64>,
    /// Stop measuring after this long (after the warm-up).
    pub duration: Option<Duration>,
    /// Requests sent before this has passed are not measured.
    pub warm_up: Duration,
    /// One request per connection: close it after the response and open a new one.
    pub new_connection: bool,
    /// Pause of each stream slot between the end of a request and the next one.
    pub interval: Option<Duration>,
    /// Handshakes in progress per thread at most (opening 1,000 connections at once would
    /// only overflow socket buffers).
    pub max_handshakes: usize,
    /// Verify the server certificate against this CA file (PEM); no verification if `None`.
    pub ca: Option<std::path::PathBuf>,
    /// Give up (counting what is left as timeouts) this long after the planned end (count
    /// mode: after the warm-up).
    pub hard_timeout: Duration,
    /// Processes to read CPU time and memory of, as (name, pid).
    pub watch: Vec<(String, u32)>,
    /// Ask the kernel to coalesce received datagrams (UDP GRO). On loopback this also spares
    /// the sender: without it, the kernel splits the server's GSO batches into datagrams in
    /// the sending process's context, charging the client's receive work to the server.
    pub gro: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            target: SocketAddr::from(([127, 0, 0, 1], 443)),
            authority: "localhost".into(),
            server_name: "localhost".into(),
            path: "/".into(),
            method: "GET".into(),
            body_len: 0,
            connections: 10,
            streams: 10,
            threads: 1,
            requests: None,
            duration: Some(Duration::from_secs(10)),
            warm_up: Duration::ZERO,
            new_connection: false,
            interval: None,
            max_handshakes: 100,
            ca: None,
            hard_timeout: Duration::from_secs(120),
            watch: Vec::new(),
            gro: true,
        }
    }
}

/// Why a run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid options: {0}")]
    Options(&'static str),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("quic: {0}")]
    Quic(#[from] quiche::Error),
    #[error("http/3: {0}")]
    H3(#[from] h3::Error),
    #[error("a load thread failed: {0}")]
    Thread(String),
}

/// Failed requests and connections, by kind.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Errors {
    /// Responses with a status of 400 or more.
    pub status: u64,
    /// Streams reset by the server.
    pub reset: u64,
    /// Bodies shorter or longer than their `content-length`, or an upload the server
    /// answered before it was sent in full.
    pub truncated: u64,
    /// Connections that closed under us (their in-flight requests are in `connection` too).
    pub connection: u64,
    /// Requests still unanswered when the hard timeout struck (count mode only).
    pub timeout: u64,
}

impl Errors {
    fn add(&mut self, o: &Errors) {
        self.status += o.status;
        self.reset += o.reset;
        self.truncated += o.truncated;
        self.connection += o.connection;
        self.timeout += o.timeout;
    }

    /// All of them.
    pub fn total(&self) -> u64 {
        self.status + self.reset + self.truncated + self.connection + self.timeout
    }
}

/// CPU and memory of a watched process over the measurement window.
#[derive(Clone, Debug, Serialize)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
    /// utime + stime spent inside the window.
    pub cpu_seconds: f64,
    /// `cpu_seconds / window`, in percent of one core.
    pub cpu_percent: f64,
    /// VmRSS at the end of the window (connections still open), KiB.
    pub rss_kib: u64,
    /// VmHWM (peak RSS since start) at the end of the window, KiB.
    pub hwm_kib: u64,
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// The outcome of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Length of the measurement window, seconds.
    pub window_seconds: f64,
    /// Measured, successful requests.
    pub requests: u64,
    pub requests_per_second: f64,
    /// Body bytes of measured requests (down + up), MiB per second.
    pub mib_per_second: f64,
    pub bytes_down: u64,
    pub bytes_up: u64,
    /// Handshakes completed inside the window.
    pub handshakes: u64,
    pub latency: Latency,
    pub errors: Errors,
    /// Requests sent in all phases (warm-up, window, cut off at the end).
    pub sent_total: u64,
    /// Requests answered in full in all phases, whatever their status.
    pub completed_total: u64,
    /// Connections open when the window closed.
    pub open_connections: u64,
    /// Our own CPU time inside the window (all threads), seconds and percent of one core.
    pub loadgen_cpu_seconds: f64,
    pub loadgen_cpu_percent: f64,
    pub watched: Vec<Watched>,
}

/// utime + stime of `pid` in seconds (`None` if it is gone).
pub fn proc_cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / CLK_TCK)
}

/// A `Vm*:` line of /proc/PID/status in KiB (0 if absent).
pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// When the phases begin and end, the same for every thread.
struct Plan {
    warm_end: Instant,
    end: Option<Instant>,
    hard_end: Instant,
    /// Threads meet here when their window closes, wait for the readings, then clean up.
    closed: Barrier,
    read: Barrier,
}

#[derive(Default)]
struct ThreadResult {
    latencies_us: Vec<u32>,
    requests: u64,
    bytes_down: u64,
    bytes_up: u64,
    handshakes: u64,
    sent_total: u64,
    completed_total: u64,
    open_connections: u64,
    errors: Errors,
}

/// Runs the load and returns the report.
///
/// # Errors
/// [`LoadError`] when the options are inconsistent, a socket cannot be bound, the QUIC
/// configuration is refused, or a thread fails.
pub fn run(opts: &LoadOptions) -> Result<Report, LoadError> {
    if opts.connections == 0 || opts.streams == 0 || opts.threads == 0 {
        return Err(LoadError::Options(
            "connections, streams and threads must be at least 1",
        ));
    }
    if opts.requests.is_none() && opts.duration.is_none() {
        return Err(LoadError::Options("give a duration or a request count"));
    }
    let threads = opts.threads.min(opts.connections);
    let start = Instant::now();
    let warm_end = start + opts.warm_up;
    let plan = Arc::new(Plan {
        warm_end,
        end: opts.duration.map(|d| warm_end + d),
        hard_end: warm_end + opts.duration.unwrap_or(Duration::ZERO) + opts.hard_timeout,
        closed: Barrier::new(threads + 1),
        read: Barrier::new(threads + 1),
    });
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        let share =
            |total: u64| total / threads as u64 + u64::from((t as u64) < total % threads as u64);
        let conns = share(opts.connections as u64) as usize;
        let budget = opts.requests.map(share);
        let opts = opts.clone();
        let plan = plan.clone();
        let h = std::thread::Builder::new()
            .name(format!("load-{t}"))
            .spawn(move || worker::thread_main(&opts, &plan, t, conns, budget))?;
        handles.push(h);
    }

    // Readings at the opening of the window.
    std::thread::sleep(warm_end.saturating_duration_since(Instant::now()));
    let opened = Instant::now();
    let self_cpu0 = proc_cpu_seconds(None).unwrap_or(0.0);
    let watch_cpu0: Vec<f64> = opts
        .watch
        .iter()
        .map(|(_, pid)| proc_cpu_seconds(Some(*pid)).unwrap_or(0.0))
        .collect();

    // Readings at the close, while the threads hold their connections open.
    plan.closed.wait();
    let window = opened.elapsed().as_secs_f64().max(1e-9);
    let self_cpu = proc_cpu_seconds(None).unwrap_or(0.0) - self_cpu0;
    let watched: Vec<Watched> = opts
        .watch
        .iter()
        .zip(watch_cpu0)
        .map(|((name, pid), c0)| {
            let cpu = proc_cpu_seconds(Some(*pid)).map_or(0.0, |c| c - c0);
            Watched {
                name: name.clone(),
                pid: *pid,
                cpu_seconds: cpu,
                cpu_percent: 100.0 * cpu / window,
                rss_kib: proc_status_kib(*pid, "VmRSS:"),
                hwm_kib: proc_status_kib(*pid, "VmHWM:"),
            }
        })
        .collect();
    plan.read.wait();

    let mut all = ThreadResult::default();
    for h in handles {
        let r = h
            .join()
            .map_err(|_| LoadError::Thread("panicked".into()))?
            .map_err(|e| LoadError::Thread(e.to_string()))?;
        all.latencies_us.extend_from_slice(&r.latencies_us);
        all.requests += r.requests;
        all.bytes_down += r.bytes_down;
        all.bytes_up += r.bytes_up;
        all.handshakes += r.handshakes;
        all.sent_total += r.sent_total;
        all.completed_total += r.completed_total;
        all.open_connections += r.open_connections;
        all.errors.add(&r.errors);
    }
    let bytes = (all.bytes_down + all.bytes_up) as f64;
    Ok(Report {
        window_seconds: window,
        requests: all.requests,
        requests_per_second: all.requests as f64 / window,
        mib_per_second: bytes / window / (1024.0 * 1024.0),
        bytes_down: all.bytes_down,
        bytes_up: all.bytes_up,
        handshakes: all.handshakes,
        latency: percentiles(&mut all.latencies_us),
        errors: all.errors,
        sent_total: all.sent_total,
        completed_total: all.completed_total,
        open_connections: all.open_connections,
        loadgen_cpu_seconds: self_cpu,
        loadgen_cpu_percent: 100.0 * self_cpu / window,
        watched,
    })
}

fn percentiles(us: &mut [u32]) -> Latency {
    if us.is_empty() {
        return Latency::default();
    }
    us.sort_unstable();
    let at = |p: f64| {
        let rank = ((p * us.len() as f64).ceil() as usize).clamp(1, us.len());
        us.get(rank - 1).copied().unwrap_or(0) as f64 / 1000.0
    };
    let sum: u64 = us.iter().map(|&v| u64::from(v)).sum();
    Latency {
        p50_ms: at(0.50),
        p90_ms: at(0.90),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
        max_ms: at(1.0),
        mean_ms: sum as f64 / us.len() as f64 / 1000.0,
    }
}

/// Parses `10`, `10s`, `500ms`, `2m` or `1.5s` into a duration.
///
/// # Errors
/// A message naming the text when it is not a duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a duration: {text:?} (use 10s, 500ms, 2m)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("not a duration: {text:?}"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn percentiles_are_ranks() {
        let mut v: Vec<u32> = (1..=1000).map(|i| i * 1000).collect();
        let l = percentiles(&mut v);
        assert_eq!(l.p50_ms, 500.0);
        assert_eq!(l.p99_ms, 990.0);
        assert_eq!(l.p999_ms, 999.0);
        assert_eq!(l.max_ms, 1000.0);
        assert!(percentiles(&mut []).p50_ms == 0.0);
    }

    #[test]
    fn proc_readings_of_self() {
        assert!(proc_cpu_seconds(None).is_some());
        assert!(proc_status_kib(std::process::id(), "VmRSS:") > 0);
    }
}
