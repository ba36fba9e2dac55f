//! Request metrics and their Prometheus text exposition.
//!
//! Hot-path cost: a request's outcome is a handful of relaxed atomic adds on the recording
//! worker's own shard (cache-line aligned, so workers never write the same line); nothing is
//! locked per request. Shards are summed at scrape time. Series are created when a
//! configuration is built (a mutex, off the request path) and live for the whole process, so a
//! reload keeps counting into the same series for pools and backends that keep their names.

use crate::server::Shared;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Histogram bucket bounds, seconds.
pub const BUCKETS_S: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Default)]
struct Histogram {
    /// Non-cumulative counts per bucket; the last is +Inf.
    buckets: [AtomicU64; BUCKETS_S.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn record(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS_S
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS_S.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
#[repr(align(64))]
struct Shard {
    requests: [AtomicU64; 5],
    duration: Histogram,
    upstream: Histogram,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    in_flight: std::sync::atomic::AtomicI64,
}

/// The series of one (pool, backend) pair; `backend` is empty for answers Spooky gave
/// itself (no route, malformed request, no healthy backend), `pool` empty when no pool was
/// chosen.
pub struct RouteMetrics {
    pub pool: String,
    pub backend: String,
    shards: Box<[Shard]>,
}

/// What one finished request contributes.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub status: u16,
    pub total: Duration,
    /// Time to the backend's response head, when a backend answered.
    pub upstream: Option<Duration>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl RouteMetrics {
    /// Records a finished request on `worker`'s shard.
    pub fn record(&self, worker: usize, o: &Outcome) {
        let Some(shard) = self.shards.get(worker).or_else(|| self.shards.first()) else {
            return;
        };
        let class = usize::from(o.status / 100).saturating_sub(1).min(4);
        if let Some(c) = shard.requests.get(class) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        shard.duration.record(o.total);
        if let Some(u) = o.upstream {
            shard.upstream.record(u);
        }
        shard.bytes_in.fetch_add(o.bytes_in, Ordering::Relaxed);
        shard.bytes_out.fetch_add(o.bytes_out, Ordering::Relaxed);
    }

    /// A request to this backend started (`+1`) or ended (`-1`) on `worker`.
    pub fn in_flight(&self, worker: usize, delta: i64) {
        if let Some(shard) = self.shards.get(worker) {
            shard.in_flight.fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// Requests in flight, all workers.
    pub fn in_flight_total(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    fn sum(&self, f: impl Fn(&Shard) -> u64) -> u64 {
        self.shards.iter().map(f).sum()
    }
}

/// Process-wide metrics registry.
pub struct Metrics {
    workers: usize,
    series: Mutex<Vec<Arc<RouteMetrics>>>,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub access_log_dropped: AtomicU64,
}

impl Metrics {
    pub fn new(workers: usize) -> Self {
        Self {
            workers: workers.max(1),
            series: Mutex::new(Vec::new()),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            access_log_dropped: AtomicU64::new(0),
        }
    }

    /// The series for (`pool`, `backend`), created on first use.
    pub fn route(&self, pool: &str, backend: &str) -> Arc<RouteMetrics> {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = series
            .iter()
            .find(|s| s.pool == pool && s.backend == backend)
        {
            return s.clone();
        }
        let s = Arc::new(RouteMetrics {
            pool: pool.to_owned(),
            backend: backend.to_owned(),
            shards: (0..self.workers).map(|_| Shard::default()).collect(),
        });
        series.push(s.clone());
        s
    }

    fn snapshot(&self) -> Vec<Arc<RouteMetrics>> {
        self.series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    series: &RouteMetrics,
    pick: fn(&Shard) -> &Histogram,
) {
    let mut cumulative = 0;
    for (i, bound) in BUCKETS_S.iter().enumerate() {
        cumulative += series.sum(|s| {
            pick(s)
                .buckets
                .get(i)
                .map_or(0, |b| b.load(Ordering::Relaxed))
        });
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
    }
    cumulative += series.sum(|s| {
        pick(s)
            .buckets
            .get(BUCKETS_S.len())
            .map_or(0, |b| b.load(Ordering::Relaxed))
    });
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
    let sum_us = series.sum(|s| pick(s).sum_us.load(Ordering::Relaxed));
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
}

/// A per-worker metric: name, type, help, how to read it.
type WorkerMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&crate::server::WorkerStats) -> u64,
);

/// Renders every metric in the Prometheus text format (version 0.0.4).
pub fn render(shared: &Shared, generation: u64, extra: &[(String, String, u64)]) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let series = shared.metrics.snapshot();
    let labels =
        |s: &RouteMetrics| format!("pool=\"{}\",backend=\"{}\"", esc(&s.pool), esc(&s.backend));

    head(
        &mut out,
        "spooky_requests_total",
        "counter",
        "Requests answered, by pool, backend (empty: answered by Spooky) and status class.",
    );
    for s in &series {
        for (i, class) in CLASSES.iter().enumerate() {
            let n = s.sum(|sh| sh.requests.get(i).map_or(0, |c| c.load(Ordering::Relaxed)));
            let _ = writeln!(
                out,
                "spooky_requests_total{{{},class=\"{class}\"}} {n}",
                labels(s)
            );
        }
    }
    head(
        &mut out,
        "spooky_request_duration_seconds",
        "histogram",
        "From request head received to response handed to QUIC.",
    );
    for s in &series {
        histogram(
            &mut out,
            "spooky_request_duration_seconds",
            &labels(s),
            s,
            |sh| &sh.duration,
        );
    }
    head(
        &mut out,
        "spooky_upstream_response_seconds",
        "histogram",
        "From request sent to the backend to its response head.",
    );
    for s in series.iter().filter(|s| !s.backend.is_empty()) {
        histogram(
            &mut out,
            "spooky_upstream_response_seconds",
            &labels(s),
            s,
            |sh| &sh.upstream,
        );
    }
    head(
        &mut out,
        "spooky_request_body_bytes_total",
        "counter",
        "Request body bytes received from clients.",
    );
    for s in &series {
        let _ = writeln!(
            out,
            "spooky_request_body_bytes_total{{{}}} {}",
            labels(s),
            s.sum(|sh| sh.bytes_in.load(Ordering::Relaxed))
        );
    }
    head(
        &mut out,
        "spooky_response_body_bytes_total",
        "counter",
        "Response body bytes received from backends for clients.",
    );
    for s in &series {
        let _ = writeln!(
            out,
            "spooky_response_body_bytes_total{{{}}} {}",
            labels(s),
            s.sum(|sh| sh.bytes_out.load(Ordering::Relaxed))
        );
    }

    let worker_metrics: [WorkerMetric; 11] = [
        ("spooky_quic_connections_active", "gauge", "Open QUIC connections.", |w| w.connections_active.load(Ordering::Relaxed)),
        ("spooky_http3_streams_active", "gauge", "Open HTTP/3 request streams.", |w| w.streams_active.load(Ordering::Relaxed)),
        ("spooky_quic_connections_accepted_total", "counter", "QUIC connections accepted (handshakes started).", |w| w.connections_accepted.load(Ordering::Relaxed)),
        ("spooky_quic_connections_refused_total", "counter", "New connections refused by quic.max_connections.", |w| w.refused.load(Ordering::Relaxed)),
        ("spooky_quic_retry_sent_total", "counter", "Retry packets sent (address validation).", |w| w.retry_sent.load(Ordering::Relaxed)),
        ("spooky_misrouted_packets_total", "counter", "Packets that reached a worker other than their connection's owner (0 when kernel steering works).", |w| w.misrouted.load(Ordering::Relaxed)),
        ("spooky_udp_datagrams_received_total", "counter", "UDP datagrams received.", |w| w.packets_in.load(Ordering::Relaxed)),
        ("spooky_udp_datagrams_sent_total", "counter", "UDP datagrams sent.", |w| w.packets_out.load(Ordering::Relaxed)),
        ("spooky_packets_dropped_total", "counter", "Datagrams dropped in user space (unparseable, unknown connection, short Initial, bad token).", |w| w.dropped.load(Ordering::Relaxed)),
        ("spooky_http3_requests_total", "counter", "HTTP/3 request heads received.", |w| w.requests.load(Ordering::Relaxed)),
        ("spooky_http3_request_head_timeouts_total", "counter", "Request streams reset because their head did not arrive within quic.request_header_timeout.", |w| w.request_head_timeouts.load(Ordering::Relaxed)),
    ];
    for (name, kind, help, get) in worker_metrics {
        head(&mut out, name, kind, help);
        for (i, w) in shared.stats.iter().enumerate() {
            let _ = writeln!(out, "{name}{{worker=\"{i}\"}} {}", get(w));
        }
    }

    head(
        &mut out,
        "spooky_backend_health_state",
        "gauge",
        "0 healthy, 1 unhealthy, 2 ejected, 3 recovering.",
    );
    let mut backend_rows = Vec::new();
    for (u, up) in shared.config.upstreams.iter().enumerate() {
        for (b, be) in up.backends.iter().enumerate() {
            if let Some(slot) = shared.health.slot(u, b) {
                backend_rows.push((
                    format!("pool=\"{}\",backend=\"{}\"", esc(&up.name), esc(&be.id)),
                    slot,
                ));
            }
        }
    }
    for (l, slot) in &backend_rows {
        let _ = writeln!(
            out,
            "spooky_backend_health_state{{{l}}} {}",
            slot.state.load(Ordering::Relaxed)
        );
    }
    head(
        &mut out,
        "spooky_backend_up",
        "gauge",
        "1 when the backend takes new requests.",
    );
    for (l, slot) in &backend_rows {
        let _ = writeln!(
            out,
            "spooky_backend_up{{{l}}} {}",
            u8::from(slot.available.load(Ordering::Relaxed))
        );
    }
    head(
        &mut out,
        "spooky_backend_in_flight",
        "gauge",
        "Requests in flight to the backend, all workers.",
    );
    for s in series.iter().filter(|s| !s.backend.is_empty()) {
        let _ = writeln!(
            out,
            "spooky_backend_in_flight{{{}}} {}",
            labels(s),
            s.in_flight_total()
        );
    }
    head(
        &mut out,
        "spooky_backend_latency_ewma_seconds",
        "gauge",
        "Exponentially weighted moving average of response-head latency.",
    );
    for (l, slot) in &backend_rows {
        let _ = writeln!(
            out,
            "spooky_backend_latency_ewma_seconds{{{l}}} {}",
            slot.ewma_latency_us.load(Ordering::Relaxed) as f64 / 1e6
        );
    }
    head(
        &mut out,
        "spooky_health_checks_total",
        "counter",
        "Active health probes by result.",
    );
    for (l, slot) in &backend_rows {
        let _ = writeln!(
            out,
            "spooky_health_checks_total{{{l},result=\"success\"}} {}",
            slot.probes_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "spooky_health_checks_total{{{l},result=\"failure\"}} {}",
            slot.probes_failed.load(Ordering::Relaxed)
        );
    }

    let m = &shared.metrics;
    head(
        &mut out,
        "spooky_config_reloads_total",
        "counter",
        "Configuration reloads by result.",
    );
    let _ = writeln!(
        out,
        "spooky_config_reloads_total{{result=\"success\"}} {}",
        m.reloads_ok.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "spooky_config_reloads_total{{result=\"failure\"}} {}",
        m.reloads_failed.load(Ordering::Relaxed)
    );
    head(
        &mut out,
        "spooky_config_generation",
        "gauge",
        "Configuration generation in force (1 at start, +1 per successful reload).",
    );
    let _ = writeln!(out, "spooky_config_generation {generation}");
    head(
        &mut out,
        "spooky_access_log_dropped_total",
        "counter",
        "Access-log lines dropped because the writer fell behind.",
    );
    let _ = writeln!(
        out,
        "spooky_access_log_dropped_total {}",
        m.access_log_dropped.load(Ordering::Relaxed)
    );

    if !extra.is_empty() {
        head(
            &mut out,
            "spooky_ebpf_packets_total",
            "counter",
            "Per-CPU counters of the XDP program, summed (see docs/ebpf.md).",
        );
        for (counter, cpu, v) in extra {
            let _ = writeln!(
                out,
                "spooky_ebpf_packets_total{{counter=\"{}\",cpu=\"{}\"}} {v}",
                esc(counter),
                esc(cpu)
            );
        }
    }
    out
}
