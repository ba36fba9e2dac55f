//! Results of a benchmark run: one [`RunResult`] per (scenario, proxy), the machine and
//! versions ([`Env`]), and their renderings: a Markdown table, JSON (written by hand: xtask
//! has no JSON crate) and an SVG bar chart drawn without external tools.

use super::peers::PeerBins;
use super::upgrade::Outcome;
use super::CountCheck;
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

/// One scenario through one proxy.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    pub scenario: String,
    /// "req" or "MiB": what `per_cpu_second` counts.
    pub unit: String,
    pub proxy: String,
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
    #[allow(clippy::too_many_arguments)]
    pub fn from_kv(
        scenario: &str,
        unit: &str,
        proxy: &str,
        kv: &HashMap<String, String>,
        rss_base_kib: u64,
        nginx_logged: u64,
        proxy_survived: bool,
        loadavg: &str,
    ) -> RunResult {
        let mut r = RunResult {
            scenario: scenario.into(),
            unit: unit.into(),
            proxy: proxy.into(),
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
            rss_base_kib,
            nginx_logged,
            proxy_survived,
            loadavg: loadavg.into(),
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
            "{:.0} req/s, {:.1} MiB/s, p99 {:.2} ms, proxy CPU {:.0}%, {:.0} {}/CPU-s, RSS {} KiB, errors {}, nginx saw {} (client: {} done, {} sent)",
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
            self.sent_total
        )
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

/// The whole run as JSON.
pub fn json(
    env: &Env,
    results: &[RunResult],
    checks: &[CountCheck],
    upgrades: &[Outcome],
) -> String {
    let mut s = String::from("{\n");
    let _ = writeln!(
        s,
        "  \"env\": {{\"date\": \"{}\", \"nproc\": {}, \"cpu_model\": \"{}\", \"kernel\": \"{}\", \"spooky\": \"{}\", \"envoy\": \"{}\", \"caddy\": \"{}\", \"nginx\": \"{}\", \"pinned\": {}, \"command\": \"{}\"}},",
        esc(&env.date), env.nproc, esc(&env.cpu_model), esc(&env.kernel), esc(&env.spooky),
        esc(&env.envoy), esc(&env.caddy), esc(&env.nginx), env.pinned, esc(&env.command)
    );
    s.push_str("  \"count_checks\": [\n");
    for (i, c) in checks.iter().enumerate() {
        let _ = writeln!(
            s,
            "    {{\"proxy\": \"{}\", \"requested\": {}, \"client_completed\": {}, \"nginx_logged\": {}}}{}",
            c.proxy,
            c.requested,
            c.client_completed,
            c.nginx_logged,
            if i + 1 < checks.len() { "," } else { "" }
        );
    }
    s.push_str("  ],\n  \"results\": [\n");
    for (i, r) in results.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"scenario\": \"{}\", \"proxy\": \"{}\", \"ok\": {}, \"window_s\": {}, \"requests\": {}, \"requests_per_second\": {}, \"mib_per_second\": {}, \"p50_ms\": {}, \"p99_ms\": {}, \"p999_ms\": {}, \"errors\": {}, \"proxy_cpu_seconds\": {}, \"proxy_cpu_percent\": {}, \"unit\": \"{}\", \"per_proxy_cpu_second\": {}, \"proxy_rss_base_kib\": {}, \"proxy_rss_end_kib\": {}, \"proxy_hwm_kib\": {}, \"open_connections\": {}, \"kib_per_connection\": {}, \"nginx_cpu_percent\": {}, \"loadgen_cpu_percent\": {}, \"sent_total\": {}, \"completed_total\": {}, \"nginx_logged\": {}, \"count_consistent\": {}, \"proxy_survived\": {}, \"loadavg\": \"{}\"}}",
            r.scenario, r.proxy, r.ok, num(r.window_s), r.requests, num(r.rps), num(r.mib_s),
            num(r.p50_ms), num(r.p99_ms), num(r.p999_ms), r.errors, num(r.proxy_cpu_s),
            num(r.proxy_cpu_pct), r.unit, num(r.per_cpu_second), r.rss_base_kib, r.rss_end_kib,
            r.hwm_kib, r.open_connections, num(r.kib_per_connection()), num(r.nginx_cpu_pct),
            num(r.loadgen_cpu_pct), r.sent_total, r.completed_total, r.nginx_logged,
            r.count_consistent(), r.proxy_survived, esc(&r.loadavg)
        );
        s.push_str(if i + 1 < results.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ],\n  \"upgrades\": [\n");
    for (i, u) in upgrades.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"proxy\": \"{}\", \"method\": \"{}\", \"requests_per_second\": {}, \"p50_ms\": {}, \"p99_ms\": {}, \"max_ms\": {}, \"failed\": {}, \"unanswered\": {}, \"old_exit_s\": {}, \"note\": \"{}\"}}",
            u.proxy, esc(u.method), num(u.rps), num(u.p50_ms), num(u.p99_ms), num(u.max_ms),
            u.failed, u.unanswered, u.old_exit_s.map_or("null".to_string(), num), esc(&u.note)
        );
        s.push_str(if i + 1 < upgrades.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ]\n}\n");
    s
}

/// The Markdown report (also printed).
pub fn markdown(
    env: &Env,
    results: &[RunResult],
    checks: &[CountCheck],
    upgrades: &[Outcome],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Date: {}  ", env.date);
    let _ = writeln!(
        s,
        "Machine: {} CPUs, {}, kernel {}  ",
        env.nproc, env.cpu_model, env.kernel
    );
    let _ = writeln!(
        s,
        "Versions: spooky {}; Envoy {}; Caddy {}; {}  ",
        env.spooky, env.envoy, env.caddy, env.nginx
    );
    let _ = writeln!(
        s,
        "Mode: {}  ",
        if env.pinned {
            "pinned (proxy alone on CPU 1; spooky-load and nginx on CPU 0)"
        } else {
            "unpinned"
        }
    );
    let _ = writeln!(s, "Command: `{}`\n", env.command);
    s.push_str("| scenario | proxy | req/s | MiB/s | p50 ms | p99 ms | p99.9 ms | proxy CPU % | per proxy CPU-s | proxy RSS end / peak MiB | errors | nginx CPU % | load CPU % | nginx count |\n");
    s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for r in results {
        let per = if r.unit == "MiB" {
            format!("{:.0} MiB", r.per_cpu_second)
        } else {
            format!("{:.0} req", r.per_cpu_second)
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.0} | {} | {:.1} / {:.1} | {} | {:.0} | {:.0} | {} ({}..{}) |",
            r.scenario,
            r.proxy,
            r.rps,
            r.mib_s,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.proxy_cpu_pct,
            per,
            r.rss_end_kib as f64 / 1024.0,
            r.hwm_kib as f64 / 1024.0,
            r.errors,
            r.nginx_cpu_pct,
            r.loadgen_cpu_pct,
            if r.count_consistent() { "ok" } else { "MISMATCH" },
            r.completed_total,
            r.sent_total,
        );
    }
    let idle: Vec<&RunResult> = results.iter().filter(|r| r.scenario == "idle").collect();
    if !idle.is_empty() {
        s.push_str("\nIdle connections (memory of the proxy with the connections open):\n\n");
        s.push_str("| proxy | connections | RSS before MiB | RSS with connections MiB | KiB per connection |\n|---|---:|---:|---:|---:|\n");
        for r in idle {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {:.1} | {:.1} |",
                r.proxy,
                r.open_connections,
                r.rss_base_kib as f64 / 1024.0,
                r.rss_end_kib as f64 / 1024.0,
                r.kib_per_connection()
            );
        }
    }
    if !upgrades.is_empty() {
        s.push_str("\nUpgrade: 100 B requests at a fixed rate (20 connections, 10 ms between a response and the next request), a new process of the proxy started 0.5 s into an 8 s window (Envoy: `--drain-time-s 2 --parent-shutdown-time-s 4`):\n\n| proxy | how | req/s | p50 ms | p99 ms | max ms | failed | unanswered | old process gone after s | |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for u in upgrades {
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
    }
    if !checks.is_empty() {
        s.push_str("\nCount check (count mode, `-n`, no warm-up): requests answered per the load generator vs lines in nginx's access log:\n\n| proxy | requested | answered | nginx logged | |\n|---|---:|---:|---:|---|\n");
        for c in checks {
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

const COLORS: [(&str, &str); 3] = [
    ("spooky", "#7b3fbf"),
    ("envoy", "#d9822b"),
    ("caddy", "#2b8a3e"),
];

/// One chart panel: title, unit line, and (proxy, value) bars.
type Panel = (String, String, Vec<(String, f64)>);

/// Bar chart panels, one per scenario: requests or MiB per proxy CPU-second (higher is
/// better), and KiB per idle connection (lower is better).
pub fn svg(results: &[RunResult], env: &Env) -> String {
    let mut panels: Vec<Panel> = Vec::new();
    for sc in ["small", "download", "upload", "handshake", "idle"] {
        let rows: Vec<&RunResult> = results.iter().filter(|r| r.scenario == sc).collect();
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
            .map(|r| {
                let v = if sc == "idle" {
                    r.kib_per_connection()
                } else {
                    r.per_cpu_second
                };
                (r.proxy.clone(), v)
            })
            .collect();
        panels.push((title.into(), unit.into(), bars));
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
