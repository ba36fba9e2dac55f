//! CPU accounting around one load-generator run, the same for every generator: the CPU
//! time of the proxy, nginx and the generator from /proc/PID/stat, and the machine's whole
//! user + system time from /proc/stat. What the machine spent beyond those three is other
//! load: above [`NOISY_CPU_FRACTION`] of one CPU the run is flagged as noisy.

use anyhow::{bail, Context, Result};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Other processes' CPU, as a fraction of one CPU over the run, above which a run is noisy.
pub const NOISY_CPU_FRACTION: f64 = 0.10;

/// Clock ticks per second of /proc's CPU times.
pub fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process in ticks (a zombie keeps its final figures until reaped).
pub fn process_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.get(s.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the line, utime 14 and stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.get(s.rfind(')')? + 2..)?.to_string();
            Some(!rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// User + nice + system ticks of all CPUs (interrupt and softirq time left out: the
/// traffic under test is processed there and not charged to any process).
fn machine_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_string();
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            Some(v.first()? + v.get(1)? + v.get(2)?)
        })
        .unwrap_or(0)
}

/// Idle + iowait ticks of one CPU, or of all of them. The kernel keeps these exactly (it
/// measures idle time when a CPU goes idle); the busy categories are only sampled at each
/// tick, so busy time is best taken as wall time minus this.
pub fn cpu_idle_ticks(cpu: Option<usize>) -> u64 {
    let name = cpu.map_or_else(|| "cpu".to_string(), |c| format!("cpu{c}"));
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name.as_str()))?
                .to_string();
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            Some(v.get(3)? + v.get(4)?)
        })
        .unwrap_or(0)
}

/// CPU seconds over one generator run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Window {
    pub seconds: f64,
    pub proxy_cpu_s: f64,
    pub nginx_cpu_s: f64,
    pub generator_cpu_s: f64,
    /// CPU seconds of everything else on the machine.
    pub other_cpu_s: f64,
}

impl Window {
    /// Other load as a fraction of one CPU.
    pub fn other_fraction(&self) -> f64 {
        if self.seconds > 0.0 {
            self.other_cpu_s / self.seconds
        } else {
            0.0
        }
    }

    pub fn noisy(&self) -> bool {
        self.other_fraction() > NOISY_CPU_FRACTION
    }
}

/// How long a generator may take to finish after its window before it is killed.
const EXIT_WITHIN: Duration = Duration::from_secs(45);

/// Runs `cmd` while watching the proxy and nginx; the generator's own CPU is read until it
/// exits, or until the window ends.
///
/// `window`: when given, the figures are taken that long after the start and then
/// `at_window_end` runs (it stops the proxy gracefully: oha's HTTP/3 client sends GOAWAY at
/// its deadline and then waits for the server to close, which no proxy does before its idle
/// timeout). Without it, the window is the generator's whole life.
pub fn run(
    mut cmd: Command,
    proxy: u32,
    nginx: u32,
    window: Option<Duration>,
    at_window_end: impl FnOnce(),
) -> Result<(Output, Window)> {
    let hz = ticks_per_second();
    let started = Instant::now();
    let m0 = machine_ticks();
    let (p0, n0) = (
        process_ticks(proxy).unwrap_or(0),
        process_ticks(nginx).unwrap_or(0),
    );
    let mut child = cmd.spawn().context("cannot start the load generator")?;
    let pid = child.id();
    let mut generator = 0;
    let mut end = None;
    let mut at_window_end = Some(at_window_end);
    loop {
        if let Some(t) = process_ticks(pid) {
            generator = t;
        }
        let exited = child.try_wait()?.is_some();
        let window_over = window.is_some_and(|w| started.elapsed() >= w);
        if end.is_none() && (exited || window_over) {
            end = Some((
                started.elapsed().as_secs_f64(),
                machine_ticks(),
                process_ticks(proxy).unwrap_or(p0),
                process_ticks(nginx).unwrap_or(n0),
                generator,
            ));
            if let Some(f) = at_window_end.take() {
                f();
            }
        }
        if exited {
            break;
        }
        if started.elapsed() > window.unwrap_or(Duration::ZERO) + EXIT_WITHIN {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the load generator did not finish within {EXIT_WITHIN:?} of its window");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output()?;
    let Some((seconds, m1, p1, n1, generator)) = end else {
        bail!("no measurement window");
    };
    let s = |t: u64| t as f64 / hz;
    let (proxy_t, nginx_t) = (p1.saturating_sub(p0), n1.saturating_sub(n0));
    let other = m1
        .saturating_sub(m0)
        .saturating_sub(proxy_t + nginx_t + generator);
    Ok((
        out,
        Window {
            seconds,
            proxy_cpu_s: s(proxy_t),
            nginx_cpu_s: s(nginx_t),
            generator_cpu_s: s(generator),
            other_cpu_s: s(other),
        },
    ))
}
