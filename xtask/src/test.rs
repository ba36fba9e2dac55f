//! `cargo xtask test`: the whole suite, as CI runs it. Installs prerequisites (idempotent),
//! builds the eBPF object, makes the demo certificates, then runs fmt, clippy, builds the
//! Debian package (`cargo xtask package`, which a test installs) and runs every test.
//! Tests that need root (eBPF, network namespaces, dropping privileges) are marked
//! `#[ignore = "needs root"]` so that a plain `cargo test` as a user passes; this task runs
//! them too and fails when one of them did not run and pass. Without root they fail loudly.

use crate::{ebpf, setup, workspace_root};
use anyhow::{bail, Context, Result};
use spooky_peers::certs;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Ignored tests that are not root-only and stay out of the suite (they are benchmarks).
const NOT_IN_SUITE: &[&str] = &["ebpf::xdp_benchmark"];

fn step(name: &str, cmd: &mut Command) -> Result<()> {
    let started = Instant::now();
    eprintln!("==> {name}");
    let status = cmd
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("cannot run {name}"))?;
    eprintln!(
        "<== {name}: {status} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    if !status.success() {
        bail!("{name} failed");
    }
    Ok(())
}

pub fn run(extra: &[String]) -> Result<()> {
    let started = Instant::now();
    setup::all()?;
    // SAFETY-free check of the effective uid through the environment-independent syscall.
    if !crate::is_root() {
        eprintln!("WARNING: not running as root: the eBPF and network-namespace tests will FAIL (they need CAP_BPF/CAP_NET_ADMIN)");
    }
    crate::layers::check(&workspace_root())?;
    ebpf::build(true)?;
    certs::generate(&workspace_root().join("config/certs"))?;
    step(
        "cargo fmt --check",
        Command::new("cargo").args(["fmt", "--all", "--", "--check"]),
    )?;
    step(
        "cargo clippy",
        Command::new("cargo").args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // The package test (spooky/tests/it/package.rs) installs the .deb this makes.
    crate::package::build()?;
    if extra.is_empty() {
        every_test_including_root_only()?;
    } else {
        // The caller picked the tests: run just those.
        step(
            "cargo test",
            Command::new("cargo")
                .args(["test", "--workspace"])
                .args(extra),
        )?;
    }
    // A short smoke run of every fuzz target (the long runs are `cargo xtask fuzz`).
    eprintln!("==> fuzz smoke (20 s per target)");
    crate::fuzz::run(None, 20)?;
    eprintln!(
        "all checks passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo test --workspace -- --include-ignored` (the root-only tests are marked
/// `#[ignore = "needs root"]` so that a plain `cargo test` as a user passes), then a check
/// that every ignored test did run and pass: a root-only test that silently did not run would
/// otherwise look like a green suite.
fn every_test_including_root_only() -> Result<()> {
    let started = Instant::now();
    eprintln!("==> cargo test (root-only tests included)");
    let listed = Command::new("cargo")
        .args(["test", "--workspace", "--", "--list", "--ignored"])
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("cannot list the ignored tests")?;
    if !listed.status.success() {
        bail!("cargo test --list failed");
    }
    let ignored: BTreeSet<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .filter(|name| !NOT_IN_SUITE.contains(name))
        .map(str::to_owned)
        .collect();
    let mut args = vec!["test", "--workspace", "--", "--include-ignored"];
    for skip in NOT_IN_SUITE {
        args.extend(["--skip", skip, "--exact"]);
    }
    let mut child = Command::new("cargo")
        .args(&args)
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let mut passed = BTreeSet::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(name) = line
                .strip_prefix("test ")
                .and_then(|l| l.strip_suffix(" ... ok"))
            {
                passed.insert(name.to_owned());
            }
        }
    }
    let status = child.wait()?;
    eprintln!(
        "<== cargo test: {status} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    if !status.success() {
        bail!("cargo test failed");
    }
    let missing: Vec<&String> = ignored.difference(&passed).collect();
    if !missing.is_empty() {
        bail!("root-only tests that did not run and pass: {missing:?}");
    }
    eprintln!("all {} root-only tests ran and passed", ignored.len());
    Ok(())
}
