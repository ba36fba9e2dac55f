//! `cargo xtask test`: the whole suite, as CI runs it. Installs prerequisites (idempotent),
//! builds the eBPF object, makes the demo certificates, then runs fmt, clippy and every test.
//! Tests that need root (eBPF, network namespaces) fail loudly without it; they are not
//! skipped.

use crate::{ebpf, setup, workspace_root};
use anyhow::{bail, Context, Result};
use spooky_peers::certs;
use std::process::Command;
use std::time::Instant;

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
    step(
        "cargo test",
        Command::new("cargo")
            .args(["test", "--workspace"])
            .args(extra),
    )?;
    // A short smoke run of every fuzz target (the long runs are `cargo xtask fuzz`).
    eprintln!("==> fuzz smoke (20 s per target)");
    crate::fuzz::run(None, 20)?;
    eprintln!(
        "all checks passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
