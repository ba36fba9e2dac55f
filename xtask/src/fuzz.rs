//! `cargo xtask fuzz [TARGET] [--seconds N]`: runs the cargo-fuzz targets in `fuzz/` (its own
//! cargo workspace and target dir) with the pinned nightly, one target at a time, and reports
//! executions, speed, coverage and any crash with the file that reproduces it.
//!
//! New corpus entries go to `fuzz/target/corpus/TARGET` (kept between runs, never committed);
//! the committed seeds in `fuzz/corpus/TARGET` are passed as a second, read-only directory.
//! Crash inputs land in `fuzz/artifacts/TARGET/` (cargo-fuzz's default). What each target
//! checks, and why the sanitizer is off, is in `docs/fuzzing.md`.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::setup::{self, NIGHTLY};

/// Every fuzz target, in the order a full run goes through them.
pub const TARGETS: &[&str] = &[
    "cid",
    "request_head",
    "response_head",
    "endpoint",
    "config",
    "http1_strict",
    "access_log",
    "quic_lb",
    "gue",
];

/// No sanitizer: the code under test is safe Rust (the one `unsafe` read, in the XDP packet
/// walk, is checked against a slice-based reference instead), so AddressSanitizer would find
/// little and halve the speed. See docs/fuzzing.md for the measurements.
const SANITIZER: &str = "none";

/// Longest time one input may take before libFuzzer reports it as a hang.
const INPUT_TIMEOUT_SECS: u64 = 10;

/// Fewest executions per second of fuzzing a run must reach. The slowest target (`config`)
/// does about 25,000/s on the 2-core CI machine; a target that does far fewer is stuck (a
/// slow input loop, a setup redone per input) and a smoke run of it proves little.
const MIN_EXECUTIONS_PER_SEC: u64 = 1_000;

/// What one target's run amounted to.
struct Outcome {
    target: String,
    executions: Option<u64>,
    exec_per_sec: Option<u64>,
    coverage: Option<u64>,
    features: Option<u64>,
    corpus: Option<u64>,
    /// Seconds libFuzzer reports having fuzzed (`Done N runs in S second(s)`).
    fuzzed_secs: Option<u64>,
    /// Wall-clock seconds of the whole `cargo fuzz run`, build check included.
    elapsed_secs: f64,
    failure: Option<Failure>,
}

/// Why a target's run failed.
enum Failure {
    /// It crashed or hung; the input, when libFuzzer wrote one.
    Crash(Option<PathBuf>),
    /// It ran, but fewer than this many inputs.
    TooFew(u64),
}

/// Runs `target` (every target when `None`) for `seconds` each.
///
/// # Errors
/// When the tools cannot be installed, the targets do not build, or any target crashes,
/// hangs or fails to start (after all requested targets ran).
pub fn run(target: Option<&str>, seconds: u64) -> Result<()> {
    if seconds == 0 {
        bail!("--seconds must be at least 1 (libFuzzer treats 0 as \"run forever\")");
    }
    let targets: Vec<&str> = match target {
        None => TARGETS.to_vec(),
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target {t:?}; targets: {}", TARGETS.join(", ")),
    };
    setup::apt()?;
    nightly()?;
    setup::cargo_fuzz()?;

    let root = crate::workspace_root();
    let fuzz_dir = root.join("fuzz");
    let started = Instant::now();
    let mut build = cargo_fuzz_command(&root, "build");
    let status = build
        .status()
        .with_context(|| format!("cannot start {build:?}"))?;
    if !status.success() {
        bail!("building the fuzz targets failed ({status}); command: {build:?}");
    }
    eprintln!("fuzz: targets built in {:.1?}", started.elapsed());

    let mut outcomes = Vec::new();
    for t in &targets {
        outcomes.push(run_one(&root, &fuzz_dir, t, seconds)?);
    }

    eprintln!();
    eprintln!("fuzz: summary ({seconds} s per target, sanitizer {SANITIZER})");
    for o in &outcomes {
        eprintln!("  {}", summary_line(o));
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failure.is_some()).collect();
    if failed.is_empty() {
        return Ok(());
    }
    for o in &failed {
        match &o.failure {
            Some(Failure::Crash(Some(input))) => eprintln!(
                "fuzz: {} FAILED; input: {}\n      reproduce: cargo +{NIGHTLY} fuzz run --fuzz-dir fuzz --sanitizer {SANITIZER} {} {}",
                o.target,
                input.display(),
                o.target,
                input.display()
            ),
            Some(Failure::TooFew(min)) => eprintln!(
                "fuzz: {} FAILED: {} executions, fewer than {min} ({MIN_EXECUTIONS_PER_SEC} per \
                 second); see its log in fuzz/target/logs/",
                o.target,
                o.executions.unwrap_or(0)
            ),
            _ => eprintln!(
                "fuzz: {} FAILED without writing an input; see its log in fuzz/target/logs/",
                o.target
            ),
        }
    }
    let names: Vec<&str> = failed.iter().map(|o| o.target.as_str()).collect();
    bail!("fuzz target(s) failed: {}", names.join(", "))
}

/// The pinned nightly (cargo-fuzz needs `-Z` flags), installed when `rustup` lacks it. The
/// eBPF build adds `rust-src` to the same toolchain (`setup::ebpf_toolchain`).
fn nightly() -> Result<()> {
    let present = Command::new("rustup")
        .args(["run", NIGHTLY, "rustc", "--version"])
        .env("RUSTUP_AUTO_INSTALL", "0")
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("setup: installing {NIGHTLY}");
    let status = Command::new("rustup")
        .args(["toolchain", "install", NIGHTLY, "--profile", "minimal"])
        .status()
        .context("cannot start rustup")?;
    if !status.success() {
        bail!("rustup toolchain install {NIGHTLY} failed: {status}");
    }
    Ok(())
}

/// `cargo +NIGHTLY fuzz SUBCOMMAND --fuzz-dir fuzz --sanitizer …` in the workspace root, with
/// the variables the outer (stable) cargo sets for this process cleared, so the child picks
/// the nightly's compiler and cargo-fuzz's own flags.
fn cargo_fuzz_command(root: &Path, subcommand: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .arg(format!("+{NIGHTLY}"))
        .args([
            "fuzz",
            subcommand,
            "--fuzz-dir",
            "fuzz",
            "--sanitizer",
            SANITIZER,
        ])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR");
    cmd
}

fn run_one(root: &Path, fuzz_dir: &Path, target: &str, seconds: u64) -> Result<Outcome> {
    let work = fuzz_dir.join("target/corpus").join(target);
    let seeds = fuzz_dir.join("corpus").join(target);
    let logs = fuzz_dir.join("target/logs");
    for dir in [&work, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let log_path = logs.join(format!("{target}.log"));
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;

    let mut cmd = cargo_fuzz_command(root, "run");
    // libFuzzer adds new inputs to the first directory only; the seeds stay as committed.
    cmd.arg(target)
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg("-print_final_stats=1")
        .stderr(Stdio::piped());
    eprintln!("fuzz: {target}: {seconds} s, log in {}", log_path.display());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let mut outcome = Outcome {
        target: target.to_string(),
        executions: None,
        exec_per_sec: None,
        coverage: None,
        features: None,
        corpus: None,
        fuzzed_secs: None,
        elapsed_secs: 0.0,
        failure: None,
    };
    let mut crash_input = None;
    if let Some(stderr) = child.stderr.take() {
        let mut reader = BufReader::new(stderr);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            let n = reader
                .read_until(b'\n', &mut raw)
                .context("reading the fuzzer's output")?;
            if n == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end();
            eprintln!("{line}");
            // The log is a convenience; a full disk must not hide the fuzzer's verdict.
            let _ = writeln!(log, "{line}");
            observe(line, &mut outcome, &mut crash_input, root);
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    outcome.elapsed_secs = started.elapsed().as_secs_f64();
    let min = MIN_EXECUTIONS_PER_SEC * seconds;
    if !status.success() {
        outcome.failure = Some(Failure::Crash(crash_input));
    } else if outcome.executions.unwrap_or(0) < min {
        outcome.failure = Some(Failure::TooFew(min));
    }
    eprintln!("fuzz: {}", summary_line(&outcome));
    Ok(outcome)
}

/// Picks the numbers and the crash file out of one line of libFuzzer output.
fn observe(line: &str, o: &mut Outcome, crash: &mut Option<PathBuf>, root: &Path) {
    if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
        o.executions = v.trim().parse().ok();
    } else if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
        o.exec_per_sec = v.trim().parse().ok();
    } else if line.starts_with('#') {
        // `#4096  pulse  cov: 812 ft: 2301 corp: 310/40Kb lim: 1200 exec/s: 2048 rss: 61Mb`
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            let value = || {
                words
                    .clone()
                    .next()
                    .map(|v| v.split('/').next().unwrap_or(v))
            };
            let number = value().and_then(|v| v.parse().ok());
            match w {
                "cov:" => o.coverage = number.or(o.coverage),
                "ft:" => o.features = number.or(o.features),
                "corp:" => o.corpus = number.or(o.corpus),
                _ => {}
            }
        }
    } else if let Some(done) = line.strip_prefix("Done ") {
        // `Done 1234567 runs in 20 second(s)`
        o.fuzzed_secs = done
            .split_once(" runs in ")
            .and_then(|(_, secs)| secs.split_whitespace().next())
            .and_then(|secs| secs.parse().ok());
    } else if let Some((_, path)) = line.split_once("Test unit written to ") {
        let path = PathBuf::from(path.trim());
        *crash = Some(if path.is_absolute() {
            path
        } else {
            root.join(path)
        });
    }
}

fn summary_line(o: &Outcome) -> String {
    let show = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
    let verdict = match &o.failure {
        None => "ok".to_string(),
        Some(Failure::Crash(Some(input))) => format!("FAILED, input {}", input.display()),
        Some(Failure::Crash(None)) => "FAILED".to_string(),
        Some(Failure::TooFew(min)) => format!("FAILED, fewer than {min} executions"),
    };
    format!(
        "{}: {} executions in {} s ({}/s; {:.0} s with the build check), coverage {} edges / {} features, corpus {}: {verdict}",
        o.target,
        show(o.executions),
        show(o.fuzzed_secs),
        show(o.exec_per_sec),
        o.elapsed_secs,
        show(o.coverage),
        show(o.features),
        show(o.corpus),
    )
}
