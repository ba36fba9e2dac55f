//! Results of a benchmark run: one [`RunResult`] per (scenario, generator, proxy, run),
//! their [`Summary`] (median, min, max over the runs), the machine and versions ([`Env`]),
//! and their renderings: Markdown tables, JSON (written by hand) and an SVG bar chart drawn
//! without external tools.

use super::measure::Window;
use super::oha::OhaReport;
use super::peers::PeerBins;
use super::Results;
use std::collections::HashMap;
use std::fmt::Write;
use std::path::Path;

/// A `Vm*:` line of /proc/PID/status in KiB (0 if absent).
pub fn status_kib(pid: u32, key: &str) -> u64 {
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

/// One run of one scenario through one proxy, driven by one generator.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    pub scenario: String,
    /// "req" or "MiB": what `per_cpu_second` counts.
    pub unit: String,
    pub proxy: String,
    /// "oha" or "spooky-load".
    pub generator: String,
    /// 1, 2, ...
    pub run: u32,
    pub ok: bool,
    pub window_s: f64,
    pub requests: u64,
    pub rps: f64,
    pub mib_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub errors: u64,
    pub proxy_cpu_s: f64,
    pub proxy_cpu_pct: f64,
    /// Requests (or MiB) per proxy CPU-second.
    pub per_cpu_second: f64,
    pub rss_base_kib: u64,
    pub rss_end_kib: u64,
    pub hwm_kib: u64,
    pub open_connections: u64,
    pub nginx_cpu_pct: f64,
    pub loadgen_cpu_pct: f64,
    pub sent_total: u64,
    pub completed_total: u64,
    pub nginx_logged: u64,
    pub proxy_survived: bool,
    pub loadavg: String,
    /// What failed, by kind (oha runs).
    pub failure_kinds: String,
    /// Spooky only: datagrams it received and sent during the run (its metrics).
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    /// CPU of other processes during the run, % of one CPU (see `measure.rs`).
    pub other_cpu_pct: f64,
    pub noisy: bool,
}

fn f(kv: &HashMap<String, String>, k: &str) -> f64 {
    kv.get(k).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

fn u(kv: &HashMap<String, String>, k: &str) -> u64 {
    kv.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The `watched.N.` prefix of the process called `name`.
fn watched(kv: &HashMap<String, String>, name: &str) -> Option<String> {
    (0..8)
        .map(|i| format!("watched.{i}."))
        .find(|p| kv.get(&format!("{p}name")).is_some_and(|n| n == name))
}

impl RunResult {
    /// A run that produced no figures.
    pub fn failed(scenario: &str, unit: &str, proxy: &str, generator: &str) -> RunResult {
        RunResult {
            scenario: scenario.into(),
            unit: unit.into(),
            proxy: proxy.into(),
            generator: generator.into(),
            ..Default::default()
        }
    }

    /// From spooky-load's report (its own window, which leaves the warm-up out).
    pub fn from_kv(
        scenario: &str,
        unit: &str,
        proxy: &str,
        kv: &HashMap<String, String>,
        w: &Window,
    ) -> RunResult {
        let mut r = RunResult {
            scenario: scenario.into(),
            unit: unit.into(),
            proxy: proxy.into(),
            generator: "spooky-load".into(),
            ok: !kv.is_empty(),
            window_s: f(kv, "window_seconds"),
            requests: u(kv, "requests"),
            rps: f(kv, "requests_per_second"),
            mib_s: f(kv, "mib_per_second"),
            p50_ms: f(kv, "latency.p50_ms"),
            p99_ms: f(kv, "latency.p99_ms"),
            p999_ms: f(kv, "latency.p999_ms"),
            errors: ["status", "reset", "truncated", "connection", "timeout"]
                .iter()
                .map(|e| u(kv, &format!("errors.{e}")))
                .sum(),
            open_connections: u(kv, "open_connections"),
            loadgen_cpu_pct: f(kv, "loadgen_cpu_percent"),
            sent_total: u(kv, "sent_total"),
            completed_total: u(kv, "completed_total"),
            other_cpu_pct: w.other_fraction() * 100.0,
            noisy: w.noisy(),
            ..Default::default()
        };
        if let Some(p) = watched(kv, "proxy") {
            r.proxy_cpu_s = f(kv, &format!("{p}cpu_seconds"));
            r.proxy_cpu_pct = f(kv, &format!("{p}cpu_percent"));
            r.rss_end_kib = u(kv, &format!("{p}rss_kib"));
            r.hwm_kib = u(kv, &format!("{p}hwm_kib"));
        }
        if let Some(p) = watched(kv, "nginx") {
            r.nginx_cpu_pct = f(kv, &format!("{p}cpu_percent"));
        }
        let amount = if unit == "MiB" {
            r.mib_s * r.window_s
        } else {
            r.requests as f64
        };
        if r.proxy_cpu_s > 0.0 {
            r.per_cpu_second = amount / r.proxy_cpu_s;
        }
        r
    }

    /// From oha's report and the harness's CPU window around the oha process. Rates are
    /// over the requested `seconds` (oha's own `requestsPerSec` divides by its whole run,
    /// which includes closing the connections). `in_flight`: oha's concurrency, the most
    /// requests it may have sent and not counted when the time was up.
    pub fn from_oha(
        scenario: &str,
        unit: &str,
        proxy: &str,
        seconds: f64,
        o: &OhaReport,
        w: &Window,
        in_flight: u64,
    ) -> RunResult {
        let mib = if scenario == "upload" {
            o.ok as f64
        } else {
            o.body_bytes as f64 / (1024.0 * 1024.0)
        };
        let pct = |cpu_s: f64| 100.0 * cpu_s / w.seconds.max(1e-9);
        let mut r = RunResult {
            scenario: scenario.into(),
            unit: unit.into(),
            proxy: proxy.into(),
            generator: "oha".into(),
            ok: o.ok > 0,
            window_s: seconds,
            requests: o.ok,
            rps: o.ok as f64 / seconds,
            mib_s: mib / seconds,
            p50_ms: o.p50_ms,
            p99_ms: o.p99_ms,
            p999_ms: o.p999_ms,
            errors: o.failed,
            proxy_cpu_s: w.proxy_cpu_s,
            proxy_cpu_pct: pct(w.proxy_cpu_s),
            nginx_cpu_pct: pct(w.nginx_cpu_s),
            loadgen_cpu_pct: pct(w.generator_cpu_s),
            completed_total: o.ok,
            sent_total: o.ok + o.failed + in_flight,
            other_cpu_pct: w.other_fraction() * 100.0,
            noisy: w.noisy(),
            failure_kinds: o.failure_kinds.clone(),
            ..Default::default()
        };
        let amount = if unit == "MiB" { mib } else { o.ok as f64 };
        if w.proxy_cpu_s > 0.0 {
            r.per_cpu_second = amount / w.proxy_cpu_s;
        }
        r
    }

    pub fn with_logged(mut self, nginx_logged: u64) -> RunResult {
        self.nginx_logged = nginx_logged;
        self
    }

    /// Whether nginx saw a number of requests the client's figures allow: at least every
    /// answered one, at most every one sent.
    pub fn count_consistent(&self) -> bool {
        self.completed_total <= self.nginx_logged && self.nginx_logged <= self.sent_total
    }

    /// Extra memory per open connection, KiB.
    pub fn kib_per_connection(&self) -> f64 {
        if self.open_connections == 0 {
            return 0.0;
        }
        self.rss_end_kib.saturating_sub(self.rss_base_kib) as f64 / self.open_connections as f64
    }

    pub fn one_line(&self) -> String {
        format!(
            "{:.0} req/s, {:.1} MiB/s, p99 {:.2} ms, proxy CPU {:.0}%, {:.0} {}/CPU-s, RSS {} KiB, errors {}, nginx saw {} (client: {} done, {} sent), other CPU {:.0}%{}",
            self.rps,
            self.mib_s,
            self.p99_ms,
            self.proxy_cpu_pct,
            self.per_cpu_second,
            self.unit,
            self.rss_end_kib,
            self.errors,
            self.nginx_logged,
            self.completed_total,
            self.sent_total,
            self.other_cpu_pct,
            if self.noisy { " NOISY" } else { "" }
        ) + &if self.failure_kinds.is_empty() {
            String::new()
        } else {
            format!(" (failures: {})", self.failure_kinds)
        }
    }
}

/// The machine and the versions.
pub struct Env {
    pub date: String,
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub spooky: String,
    pub envoy: String,
    pub caddy: String,
    pub nginx: String,
    pub oha: String,
    pub pinned: bool,
    pub command: String,
}

fn cmd_line(prog: &str, args: &[&str]) -> String {
    std::process::Command::new(prog)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

impl Env {
    pub fn collect(
        bins: &PeerBins,
        spooky: &Path,
        oha: Option<&Path>,
        pinned: bool,
        root: &Path,
        args: &[String],
    ) -> Env {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default();
        let commit = cmd_line(
            "git",
            &[
                "-C",
                &root.to_string_lossy(),
                "rev-parse",
                "--short",
                "HEAD",
            ],
        );
        let mut command = "cargo xtask bench".to_string();
        if !args.is_empty() {
            command.push_str(" -- ");
            command.push_str(&args.join(" "));
        }
        Env {
            date: cmd_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel: cmd_line("uname", &["-r"]),
            spooky: format!(
                "{} (commit {commit}, work tree may differ)",
                super::peers::version_of(spooky, &["--version"])
            ),
            envoy: super::peers::version_of(&bins.envoy, &["--version"])
                .rsplit(' ')
                .next()
                .unwrap_or("")
                .to_string(),
            caddy: super::peers::version_of(&bins.caddy, &["version"])
                .split(' ')
                .next()
                .unwrap_or("")
                .to_string(),
            nginx: super::peers::version_of(&bins.nginx, &["-v"]),
            oha: oha.map_or_else(String::new, |b| super::peers::version_of(b, &["--version"])),
            pinned,
            command,
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "null".into()
    }
}

/// The median of `v` (sorted in place; NaN for none).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Median, min and max of one figure over the runs.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    fn of(mut v: Vec<f64>) -> Stat {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Stat {
            median: median(&mut v),
            min,
            max,
        }
    }

    /// `median (min–max)`.
    fn show(&self, decimals: usize) -> String {
        if !self.median.is_finite() {
            return "-".into();
        }
        format!(
            "{:.d$} ({:.d$}–{:.d$})",
            self.median,
            self.min,
            self.max,
            d = decimals
        )
    }

    fn json(&self) -> String {
        format!(
            "{{\"median\": {}, \"min\": {}, \"max\": {}}}",
            num(self.median),
            num(self.min),
            num(self.max)
        )
    }
}

/// The runs of one (scenario, generator, proxy).
#[derive(Debug, Clone)]
pub struct Summary {
    pub scenario: String,
    pub generator: String,
    pub proxy: String,
    pub unit: String,
    /// Runs with figures, and all runs.
    pub good_runs: usize,
    pub runs: usize,
    pub noisy_runs: usize,
    pub per_cpu_second: Stat,
    pub rps: Stat,
    pub mib_s: Stat,
    pub p50_ms: Stat,
    pub p99_ms: Stat,
    pub p999_ms: Stat,
    pub proxy_cpu_pct: Stat,
    /// Proxy CPU milliseconds per 1,000 requests.
    pub cpu_ms_per_1k: Stat,
    pub kib_per_connection: Stat,
    /// Spooky only: datagrams received per 100 sent (NaN for other proxies).
    pub in_per_100_out: Stat,
    pub open_connections: u64,
    pub hwm_kib: u64,
    pub errors: u64,
    pub counts_ok: bool,
}

/// One [`Summary`] per (scenario, generator, proxy), in the order of their first run.
pub fn summarize(runs: &[RunResult]) -> Vec<Summary> {
    let mut keys: Vec<(&str, &str, &str)> = Vec::new();
    for r in runs {
        let k = (r.scenario.as_str(), r.generator.as_str(), r.proxy.as_str());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(sc, g, p)| {
            let all: Vec<&RunResult> = runs
                .iter()
                .filter(|r| r.scenario == sc && r.generator == g && r.proxy == p)
                .collect();
            let good: Vec<&RunResult> = all.iter().copied().filter(|r| r.ok).collect();
            let stat =
                |f: &dyn Fn(&RunResult) -> f64| Stat::of(good.iter().map(|r| f(r)).collect());
            Summary {
                scenario: sc.into(),
                generator: g.into(),
                proxy: p.into(),
                unit: all[0].unit.clone(),
                good_runs: good.len(),
                runs: all.len(),
                noisy_runs: all.iter().filter(|r| r.noisy).count(),
                per_cpu_second: stat(&|r| r.per_cpu_second),
                rps: stat(&|r| r.rps),
                mib_s: stat(&|r| r.mib_s),
                p50_ms: stat(&|r| r.p50_ms),
                p99_ms: stat(&|r| r.p99_ms),
                p999_ms: stat(&|r| r.p999_ms),
                proxy_cpu_pct: stat(&|r| r.proxy_cpu_pct),
                cpu_ms_per_1k: stat(&|r| {
                    if r.requests > 0 {
                        1e6 * r.proxy_cpu_s / r.requests as f64
                    } else {
                        f64::NAN
                    }
                }),
                kib_per_connection: stat(&|r| r.kib_per_connection()),
                in_per_100_out: Stat::of(
                    good.iter()
                        .filter(|r| r.datagrams_out > 0)
                        .map(|r| 100.0 * r.datagrams_in as f64 / r.datagrams_out as f64)
                        .collect(),
                ),
                open_connections: good.iter().map(|r| r.open_connections).max().unwrap_or(0),
                hwm_kib: all.iter().map(|r| r.hwm_kib).max().unwrap_or(0),
                errors: all.iter().map(|r| r.errors).sum(),
                counts_ok: good.iter().all(|r| r.count_consistent()),
            }
        })
        .collect()
}

/// The whole run as JSON.
pub fn json(env: &Env, res: &Results) -> String {
    let mut s = String::from("{\n");
    let _ = writeln!(
        s,
        "  \"env\": {{\"date\": \"{}\", \"nproc\": {}, \"cpu_model\": \"{}\", \"kernel\": \"{}\", \"spooky\": \"{}\", \"envoy\": \"{}\", \"caddy\": \"{}\", \"nginx\": \"{}\", \"oha\": \"{}\", \"pinned\": {}, \"command\": \"{}\"}},",
        esc(&env.date), env.nproc, esc(&env.cpu_model), esc(&env.kernel), esc(&env.spooky),
        esc(&env.envoy), esc(&env.caddy), esc(&env.nginx), esc(&env.oha), env.pinned,
        esc(&env.command)
    );
    let _ = writeln!(
        s,
        "  \"fixed_rate_per_second\": {},",
        res.rate.map_or("null".into(), num)
    );
    s.push_str("  \"count_checks\": [\n");
    for (i, c) in res.checks.iter().enumerate() {
        let _ = writeln!(
            s,
            "    {{\"proxy\": \"{}\", \"requested\": {}, \"client_completed\": {}, \"nginx_logged\": {}}}{}",
            c.proxy,
            c.requested,
            c.client_completed,
            c.nginx_logged,
            if i + 1 < res.checks.len() { "," } else { "" }
        );
    }
    s.push_str("  ],\n  \"summaries\": [\n");
    let sums = summarize(&res.runs);
    for (i, m) in sums.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"scenario\": \"{}\", \"generator\": \"{}\", \"proxy\": \"{}\", \"unit\": \"{}\", \"runs\": {}, \"good_runs\": {}, \"noisy_runs\": {}, \"per_proxy_cpu_second\": {}, \"requests_per_second\": {}, \"mib_per_second\": {}, \"p50_ms\": {}, \"p99_ms\": {}, \"p999_ms\": {}, \"proxy_cpu_percent\": {}, \"proxy_cpu_ms_per_1000_requests\": {}, \"kib_per_connection\": {}, \"proxy_peak_rss_kib\": {}, \"errors\": {}, \"counts_consistent\": {}}}",
            m.scenario, m.generator, m.proxy, m.unit, m.runs, m.good_runs, m.noisy_runs,
            m.per_cpu_second.json(), m.rps.json(), m.mib_s.json(), m.p50_ms.json(),
            m.p99_ms.json(), m.p999_ms.json(), m.proxy_cpu_pct.json(), m.cpu_ms_per_1k.json(),
            m.kib_per_connection.json(), m.hwm_kib, m.errors, m.counts_ok
        );
        s.push_str(if i + 1 < sums.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ],\n  \"runs\": [\n");
    for (i, r) in res.runs.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"scenario\": \"{}\", \"generator\": \"{}\", \"proxy\": \"{}\", \"run\": {}, \"ok\": {}, \"window_s\": {}, \"requests\": {}, \"requests_per_second\": {}, \"mib_per_second\": {}, \"p50_ms\": {}, \"p99_ms\": {}, \"p999_ms\": {}, \"errors\": {}, \"proxy_cpu_seconds\": {}, \"proxy_cpu_percent\": {}, \"unit\": \"{}\", \"per_proxy_cpu_second\": {}, \"proxy_rss_base_kib\": {}, \"proxy_rss_end_kib\": {}, \"proxy_hwm_kib\": {}, \"open_connections\": {}, \"kib_per_connection\": {}, \"nginx_cpu_percent\": {}, \"loadgen_cpu_percent\": {}, \"sent_total\": {}, \"completed_total\": {}, \"nginx_logged\": {}, \"count_consistent\": {}, \"proxy_survived\": {}, \"loadavg\": \"{}\", \"other_cpu_percent\": {}, \"noisy\": {}, \"spooky_datagrams_in\": {}, \"spooky_datagrams_out\": {}, \"failure_kinds\": \"{}\"}}",
            r.scenario, r.generator, r.proxy, r.run, r.ok, num(r.window_s), r.requests,
            num(r.rps), num(r.mib_s), num(r.p50_ms), num(r.p99_ms), num(r.p999_ms), r.errors,
            num(r.proxy_cpu_s), num(r.proxy_cpu_pct), r.unit, num(r.per_cpu_second),
            r.rss_base_kib, r.rss_end_kib, r.hwm_kib, r.open_connections,
            num(r.kib_per_connection()), num(r.nginx_cpu_pct), num(r.loadgen_cpu_pct),
            r.sent_total, r.completed_total, r.nginx_logged, r.count_consistent(),
            r.proxy_survived, esc(&r.loadavg), num(r.other_cpu_pct), r.noisy, r.datagrams_in,
            r.datagrams_out, esc(&r.failure_kinds)
        );
        s.push_str(if i + 1 < res.runs.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ],\n  \"xdp\": [\n");
    for (i, c) in res.xdp.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"packet\": \"{}\", \"verdict\": \"{}\", \"ns_per_packet\": {}, \"mpps\": {}}}",
            esc(&c.packet),
            esc(&c.verdict),
            num(c.ns_per_packet),
            num(c.mpps)
        );
        s.push_str(if i + 1 < res.xdp.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ],\n  \"steering\": [\n");
    for (i, o) in res.steering.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"mode\": \"{}\", \"run\": {}, \"rate\": {}, \"requests_per_second\": {}, \"p50_ms\": {}, \"p99_ms\": {}, \"errors\": {}, \"spooky_us_per_request\": {}, \"cpu1_us_per_request\": {}, \"machine_us_per_request\": {}, \"xdp_redirects_per_request\": {}}}",
            o.mode, o.run, num(o.rate), num(o.rps), num(o.p50_ms), num(o.p99_ms), o.errors,
            num(o.spooky_us), num(o.cpu1_us), num(o.machine_us), num(o.xdp_redirects_per_request)
        );
        s.push_str(if i + 1 < res.steering.len() {
            ",\n"
        } else {
            "\n"
        });
    }
    s.push_str("  ],\n  \"zero_rtt\": [\n");
    for (i, o) in res.zero_rtt.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"proxy\": \"{}\", \"run\": {}, \"connections\": {}, \"full_ms\": [{}, {}, {}], \"zero_rtt_ms\": [{}, {}, {}], \"resumed\": {}, \"early_data\": {}, \"failed\": {}, \"cpu_us_per_connection\": {}, \"hwm_kib\": {}}}",
            o.proxy, o.run, o.connections, num(o.full.0), num(o.full.1), num(o.full.2),
            num(o.zero_rtt.0), num(o.zero_rtt.1), num(o.zero_rtt.2), o.resumed, o.early_data,
            o.failed, num(o.cpu_us_per_connection), o.hwm_kib
        );
        s.push_str(if i + 1 < res.zero_rtt.len() {
            ",\n"
        } else {
            "\n"
        });
    }
    s.push_str("  ],\n  \"websocket\": [\n");
    for (i, o) in res.websocket.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"scenario\": \"{}\", \"proxy\": \"{}\", \"run\": {}, \"seconds\": {}, \"messages\": {}, \"mib\": {}, \"rtt_ms\": [{}, {}, {}], \"proxy_cpu_s\": {}, \"backend_cpu_s\": {}, \"hwm_kib\": {}, \"failed\": {}, \"first_error\": \"{}\"}}",
            o.scenario, o.proxy, o.run, num(o.seconds), o.messages, num(o.mib), num(o.rtt.0),
            num(o.rtt.1), num(o.rtt.2), num(o.proxy_cpu_s), num(o.backend_cpu_s), o.hwm_kib,
            o.failed, esc(&o.first_error)
        );
        s.push_str(if i + 1 < res.websocket.len() {
            ",\n"
        } else {
            "\n"
        });
    }
    s.push_str("  ],\n  \"upgrades\": [\n");
    for (i, u) in res.upgrades.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"proxy\": \"{}\", \"method\": \"{}\", \"requests_per_second\": {}, \"p50_ms\": {}, \"p99_ms\": {}, \"max_ms\": {}, \"failed\": {}, \"unanswered\": {}, \"old_exit_s\": {}, \"note\": \"{}\"}}",
            u.proxy, esc(u.method), num(u.rps), num(u.p50_ms), num(u.p99_ms), num(u.max_ms),
            u.failed, u.unanswered, u.old_exit_s.map_or("null".to_string(), num), esc(&u.note)
        );
        s.push_str(if i + 1 < res.upgrades.len() {
            ",\n"
        } else {
            "\n"
        });
    }
    s.push_str("  ]\n}\n");
    s
}

/// The table of one generator's steady-state scenarios.
fn steady_table(s: &mut String, sums: &[&Summary]) {
    s.push_str("| scenario | proxy | per proxy CPU-s | req/s | MiB/s | p50 ms | p99 ms | p99.9 ms | proxy CPU % | proxy peak RSS MiB | errors | runs | nginx count |\n");
    s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n");
    for m in sums {
        let d = if m.unit == "MiB" { 1 } else { 0 };
        let runs = format!(
            "{}/{}{}",
            m.good_runs,
            m.runs,
            if m.noisy_runs > 0 {
                format!(", {} NOISY", m.noisy_runs)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "| {} | {} | {} {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} |",
            m.scenario,
            m.proxy,
            m.per_cpu_second.show(d),
            m.unit,
            m.rps.show(0),
            m.mib_s.show(1),
            m.p50_ms.show(2),
            m.p99_ms.show(2),
            m.p999_ms.show(2),
            m.proxy_cpu_pct.show(0),
            m.hwm_kib as f64 / 1024.0,
            m.errors,
            runs,
            if m.counts_ok { "ok" } else { "MISMATCH" },
        );
    }
}

/// Spooky's median per proxy CPU-second over each other proxy's, per scenario.
fn ratios(s: &mut String, sums: &[&Summary]) {
    let spooky: Vec<&&Summary> = sums.iter().filter(|m| m.proxy == "spooky").collect();
    let mut lines = Vec::new();
    for sp in spooky {
        let others: Vec<String> = sums
            .iter()
            .filter(|m| m.scenario == sp.scenario && m.proxy != "spooky")
            .filter(|m| m.per_cpu_second.median > 0.0)
            .map(|m| {
                format!(
                    "{:.2}× {}",
                    sp.per_cpu_second.median / m.per_cpu_second.median,
                    m.proxy
                )
            })
            .collect();
        if !others.is_empty() {
            lines.push(format!("{}: {}", sp.scenario, others.join(", ")));
        }
    }
    if !lines.is_empty() {
        let _ = writeln!(
            s,
            "\nSpooky per proxy CPU-second, median over median: {}.",
            lines.join("; ")
        );
    }
}

/// The Markdown report (also printed).
pub fn markdown(env: &Env, res: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Date: {}  ", env.date);
    let _ = writeln!(
        s,
        "Machine: {} CPUs, {}, kernel {}  ",
        env.nproc, env.cpu_model, env.kernel
    );
    let _ = writeln!(
        s,
        "Versions: spooky {}; Envoy {}; Caddy {}; {}; {}  ",
        env.spooky, env.envoy, env.caddy, env.nginx, env.oha
    );
    let _ = writeln!(
        s,
        "Mode: {}  ",
        if env.pinned {
            "pinned (proxy alone on CPU 1; the load generator and nginx on CPU 0)"
        } else {
            "unpinned"
        }
    );
    let _ = writeln!(s, "Command: `{}`\n", env.command);
    let _ = writeln!(
        s,
        "Each cell: median (min–max) over the runs. A run is NOISY when other processes used more than {:.0} % of a CPU during it.\n",
        super::measure::NOISY_CPU_FRACTION * 100.0
    );
    let sums = summarize(&res.runs);
    for (generator, title) in [
        (
            "oha",
            "Independent generator: oha (quinn + h3), one socket per connection",
        ),
        (
            "spooky-load",
            "In-tree generator: spooky-load (quiche), one socket for all connections",
        ),
    ] {
        let rows: Vec<&Summary> = sums
            .iter()
            .filter(|m| m.generator == generator && !matches!(m.scenario.as_str(), "idle" | "rate"))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(s, "### {title}\n");
        steady_table(&mut s, &rows);
        ratios(&mut s, &rows);
        s.push('\n');
    }
    let acks: Vec<&Summary> = sums
        .iter()
        .filter(|m| m.in_per_100_out.median.is_finite())
        .filter(|m| matches!(m.scenario.as_str(), "download" | "upload"))
        .collect();
    if !acks.is_empty() {
        s.push_str("### What the clients send back (Spooky's datagram counters)

Datagrams Spooky received per 100 it sent, over the whole run (in a download nearly all of them are the client's ACKs; in an upload the client's data):

| scenario | generator | received per 100 sent |
|---|---|---:|
");
        for m in acks {
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                m.scenario,
                m.generator,
                m.in_per_100_out.show(1)
            );
        }
        s.push('\n');
    }
    let rate: Vec<&Summary> = sums.iter().filter(|m| m.scenario == "rate").collect();
    if !rate.is_empty() {
        let _ = writeln!(
            s,
            "### Fixed rate: {:.0} requests/s of 100 B for every proxy (oha `-q`, `--latency-correction`, 10 connections × 10 streams)\n",
            res.rate.unwrap_or(0.0)
        );
        s.push_str("| proxy | req/s done | p50 ms | p99 ms | p99.9 ms | proxy CPU % | proxy CPU ms per 1,000 req | errors | runs |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for m in rate {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {}/{}{} |",
                m.proxy,
                m.rps.show(0),
                m.p50_ms.show(2),
                m.p99_ms.show(2),
                m.p999_ms.show(2),
                m.proxy_cpu_pct.show(0),
                m.cpu_ms_per_1k.show(1),
                m.errors,
                m.good_runs,
                m.runs,
                if m.noisy_runs > 0 { ", NOISY" } else { "" }
            );
        }
        s.push('\n');
    }
    let idle: Vec<&Summary> = sums.iter().filter(|m| m.scenario == "idle").collect();
    if !idle.is_empty() {
        s.push_str(
            "### Idle connections (memory of the proxy with the connections open, over its RSS before them)\n\n",
        );
        s.push_str("| generator | proxy | connections | KiB per connection | proxy peak RSS MiB | runs |\n|---|---|---:|---:|---:|---|\n");
        for m in idle {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.1} | {}/{} |",
                m.generator,
                m.proxy,
                m.open_connections,
                m.kib_per_connection.show(1),
                m.hwm_kib as f64 / 1024.0,
                m.good_runs,
                m.runs
            );
        }
        s.push('\n');
    }
    if !res.zero_rtt.is_empty() {
        s.push_str("### Time to first byte: 0-RTT against a full handshake (aioquic, one GET of 100 B per connection, connections one after the other, loopback)\n\n");
        s.push_str("| proxy | connections per set | full handshake p50 / p90 / p99 ms | resumed, 0-RTT p50 / p90 / p99 ms | resumed | 0-RTT accepted | failed | µs proxy CPU per connection | peak RSS MiB | runs |\n|---|---:|---|---|---:|---:|---:|---:|---:|---|\n");
        let mut names: Vec<&str> = res.zero_rtt.iter().map(|o| o.proxy).collect();
        names.dedup();
        names.sort_unstable();
        names.dedup();
        for name in names {
            let rows: Vec<&super::zero_rtt::Outcome> =
                res.zero_rtt.iter().filter(|o| o.proxy == name).collect();
            let st = |f: &dyn Fn(&super::zero_rtt::Outcome) -> f64| {
                Stat::of(rows.iter().map(|o| f(o)).collect())
            };
            let _ = writeln!(
                s,
                "| {name} | {} | {} / {} / {} | {} / {} / {} | {} | {} | {} | {} | {} | {} |",
                rows.first().map_or(0, |o| o.connections),
                st(&|o| o.full.0).show(2),
                st(&|o| o.full.1).show(2),
                st(&|o| o.full.2).show(2),
                st(&|o| o.zero_rtt.0).show(2),
                st(&|o| o.zero_rtt.1).show(2),
                st(&|o| o.zero_rtt.2).show(2),
                rows.iter().map(|o| o.resumed).sum::<u64>(),
                rows.iter().map(|o| o.early_data).sum::<u64>(),
                rows.iter().map(|o| o.failed).sum::<u64>(),
                st(&|o| o.cpu_us_per_connection).show(0),
                st(&|o| o.hwm_kib as f64 / 1024.0).show(1),
                rows.len()
            );
        }
        s.push('\n');
    }
    if !res.websocket.is_empty() {
        s.push_str("### WebSockets: echoes through each proxy's TCP listener (TLS, HTTP/1.1 upgrade; `websockets` client and echo server, 10 connections)\n\n");
        s.push_str("| scenario | proxy | messages/s | messages per proxy CPU-s | MiB per proxy CPU-s | µs proxy CPU per message | round trip p50 / p90 / p99 ms | peak RSS MiB | failed | runs |\n|---|---|---:|---:|---:|---:|---|---:|---:|---|\n");
        let mut keys: Vec<(&str, &str)> = res
            .websocket
            .iter()
            .map(|o| (o.scenario, o.proxy))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        for (scenario, proxy) in keys {
            let rows: Vec<&super::websocket::Outcome> = res
                .websocket
                .iter()
                .filter(|o| o.scenario == scenario && o.proxy == proxy)
                .collect();
            let st = |f: &dyn Fn(&super::websocket::Outcome) -> f64| {
                Stat::of(rows.iter().map(|o| f(o)).collect())
            };
            let _ = writeln!(
                s,
                "| {scenario} | {proxy} | {} | {} | {} | {} | {} / {} / {} | {} | {} | {} |",
                st(&|o| o.messages as f64 / o.seconds).show(0),
                st(&|o| o.per_cpu_second()).show(0),
                st(&|o| o.mib_per_cpu_second()).show(1),
                st(&|o| 1e6 / o.per_cpu_second()).show(1),
                st(&|o| o.rtt.0).show(2),
                st(&|o| o.rtt.1).show(2),
                st(&|o| o.rtt.2).show(2),
                st(&|o| o.hwm_kib as f64 / 1024.0).show(1),
                rows.iter().map(|o| o.failed).sum::<u64>(),
                rows.len()
            );
        }
        s.push('\n');
    }
    if !res.steering.is_empty() {
        let rate = res.steering[0].rate;
        let _ = writeln!(
            s,
            "### Steering: Spooky with and without XDP, the client in a network namespace behind a veth ({rate:.0} requests/s of 100 B, oha `-q`, 8 s)\n"
        );
        s.push_str("| mode | req/s done | p50 ms | p99 ms | errors | µs CPU per request: Spooky | all of CPU 1 | whole machine | XDP redirects per request | runs |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for mode in ["xdp", "sk_reuseport"] {
            let rows: Vec<&super::steering::Outcome> =
                res.steering.iter().filter(|o| o.mode == mode).collect();
            if rows.is_empty() {
                continue;
            }
            let st = |f: &dyn Fn(&super::steering::Outcome) -> f64| {
                Stat::of(rows.iter().map(|o| f(o)).collect())
            };
            let _ = writeln!(
                s,
                "| {mode} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                st(&|o| o.rps).show(0),
                st(&|o| o.p50_ms).show(2),
                st(&|o| o.p99_ms).show(2),
                rows.iter().map(|o| o.errors).sum::<u64>(),
                st(&|o| o.spooky_us).show(1),
                st(&|o| o.cpu1_us).show(1),
                st(&|o| o.machine_us).show(1),
                st(&|o| o.xdp_redirects_per_request).show(2),
                rows.len()
            );
        }
        s.push('\n');
    }
    if !res.xdp.is_empty() {
        s.push_str("### XDP program, one CPU, in the kernel (`BPF_PROG_TEST_RUN`, repeat 5,000,000)\n\n| packet | verdict | ns per packet | Mpps |\n|---|---|---:|---:|\n");
        for c in &res.xdp {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.1} |",
                c.packet, c.verdict, c.ns_per_packet, c.mpps
            );
        }
        s.push('\n');
    }
    if !res.upgrades.is_empty() {
        s.push_str("### Upgrade\n\n100 B requests at a fixed rate (20 connections, 10 ms between a response and the next request), a new process of the proxy started 0.5 s into an 8 s window (Envoy: `--drain-time-s 2 --parent-shutdown-time-s 4`):\n\n| proxy | how | req/s | p50 ms | p99 ms | max ms | failed | unanswered | old process gone after s | |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for u in &res.upgrades {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {} | {} | {} | {} |",
                u.proxy,
                u.method,
                u.rps,
                u.p50_ms,
                u.p99_ms,
                u.max_ms,
                u.failed,
                u.unanswered,
                u.old_exit_s.map_or("-".to_string(), |t| format!("{t:.2}")),
                u.note
            );
        }
        s.push('\n');
    }
    let failed: Vec<&RunResult> = res.runs.iter().filter(|r| !r.ok || r.errors > 0).collect();
    if !failed.is_empty() {
        s.push_str("### Runs with failures\n\n| scenario | generator | proxy | run | answered | failed | what |\n|---|---|---|---:|---:|---:|---|\n");
        for r in failed {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.scenario,
                r.generator,
                r.proxy,
                r.run,
                r.completed_total,
                r.errors,
                if r.failure_kinds.is_empty() {
                    "-"
                } else {
                    &r.failure_kinds
                }
            );
        }
        s.push('\n');
    }
    if !res.checks.is_empty() {
        s.push_str("### Count check\n\nCount mode (`spooky-load -n`, no warm-up): requests answered per the load generator vs lines in nginx's access log:\n\n| proxy | requested | answered | nginx logged | |\n|---|---:|---:|---:|---|\n");
        for c in &res.checks {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                c.proxy,
                c.requested,
                c.client_completed,
                c.nginx_logged,
                if c.client_completed == c.requested && c.nginx_logged == c.requested {
                    "exact"
                } else {
                    "DIFFERS"
                }
            );
        }
    }
    s
}

const COLORS: [(&str, &str); 4] = [
    ("spooky", "#7b3fbf"),
    ("envoy", "#d9822b"),
    ("envoy-nogro", "#f0b27a"),
    ("caddy", "#2b8a3e"),
];

/// One chart panel: title, unit line, and (proxy, value) bars.
type Panel = (String, String, Vec<(String, f64)>);

/// Bar chart panels, one per scenario: median requests or MiB per proxy CPU-second (higher
/// is better; the oha runs where there are any), and KiB per idle connection (lower is
/// better).
pub fn svg(runs: &[RunResult], env: &Env) -> String {
    let sums = summarize(runs);
    let mut panels: Vec<Panel> = Vec::new();
    for sc in ["small", "download", "upload", "handshake", "idle"] {
        let of = |g: &str| -> Vec<&Summary> {
            sums.iter()
                .filter(|m| m.scenario == sc && m.generator == g)
                .collect()
        };
        let (rows, generator) = match of("oha") {
            r if !r.is_empty() => (r, "oha"),
            _ => (of("spooky-load"), "spooky-load"),
        };
        if rows.is_empty() {
            continue;
        }
        let (title, unit) = match sc {
            "small" => ("100 B requests", "req per proxy CPU-s"),
            "download" => ("1 MiB downloads", "MiB per proxy CPU-s"),
            "upload" => ("1 MiB uploads", "MiB per proxy CPU-s"),
            "handshake" => ("new connections", "handshakes per proxy CPU-s"),
            _ => ("idle connections", "KiB per connection (lower is better)"),
        };
        let bars = rows
            .iter()
            .map(|m| {
                let v = if sc == "idle" {
                    m.kib_per_connection.median
                } else {
                    m.per_cpu_second.median
                };
                (m.proxy.clone(), v)
            })
            .collect();
        panels.push((title.into(), format!("{unit}, {generator}"), bars));
    }
    let pw = 230.0;
    let ph = 260.0;
    let top = 60.0;
    let width = 20.0 + pw * panels.len().max(1) as f64;
    let height = top + ph + 40.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="15" font-weight="bold">HTTP/3 → HTTP/2 proxy efficiency, one pinned core ({})</text>"#,
        env.date
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="40" fill="#555">{} × {}; Envoy {}, Caddy {}, backend {}</text>"##,
        env.nproc, env.cpu_model, env.envoy, env.caddy, env.nginx
    );
    for (i, (title, unit, bars)) in panels.iter().enumerate() {
        let x0 = 20.0 + pw * i as f64;
        let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-9);
        let chart_h = ph - 70.0;
        let base_y = top + 20.0 + chart_h;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-weight="bold">{title}</text>"#,
            x0,
            top + 8.0
        );
        let _ = writeln!(
            s,
            r##"<line x1="{x0:.1}" y1="{base_y:.1}" x2="{:.1}" y2="{base_y:.1}" stroke="#333"/>"##,
            x0 + pw - 30.0
        );
        let bw = (pw - 40.0) / bars.len().max(1) as f64;
        for (j, (proxy, v)) in bars.iter().enumerate() {
            let h = chart_h * v / max;
            let x = x0 + 5.0 + bw * j as f64;
            let color = COLORS.iter().find(|c| c.0 == proxy).map_or("#888", |c| c.1);
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{color}"/>"#,
                base_y - h,
                bw - 8.0
            );
            let label = if *v >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            };
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
                x + (bw - 8.0) / 2.0,
                base_y - h - 4.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{proxy}</text>"#,
                x + (bw - 8.0) / 2.0,
                base_y + 15.0
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{x0:.1}" y="{:.1}" fill="#555" font-size="11">{unit}</text>"##,
            base_y + 35.0
        );
    }
    s.push_str("</svg>\n");
    s
}
