//! `cargo xtask …`: the developer and operator tasks. Each task installs what it needs first
//! (idempotently, see `setup`), so a fresh Debian 12 machine needs nothing but Rust and root.

mod bench;
mod ebpf;
mod fuzz;
mod layers;
mod package;
mod quickstart;
mod setup;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Spooky's build, setup, demo and test tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install every prerequisite (apt packages, pinned nightly, bpf-linker, Python peers); skips what is there.
    Setup,
    /// Build the eBPF object (spooky-ebpf) that the spooky binary embeds.
    BuildEbpf {
        /// Build without optimisations (the verifier usually refuses such objects).
        #[arg(long)]
        debug: bool,
    },
    /// Generate a self-signed demo CA and a certificate for localhost into DIR.
    Certs {
        #[arg(long, default_value = "config/certs")]
        dir: PathBuf,
    },
    /// Run Spooky on config/config.yaml with two local HTTP/2 demo backends, and send one
    /// HTTP/3 request through it.
    Quickstart {
        /// Stop right after the demo request instead of serving until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Benchmarks: Spooky against Envoy and Caddy on this machine (see docs/benchmarks.md).
    Bench {
        /// Arguments for the bench harness (scenarios, durations; see `cargo xtask bench -- --help`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Fuzz targets (cargo-fuzz, pinned nightly): run one or all for a while.
    Fuzz {
        /// Target name (default: every target).
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// A Debian package of Spooky (dpkg-deb, no cargo-deb) in target/debian/, from the release
    /// build; what it installs: docs/install.md.
    Package,
    /// The whole test suite: fmt, clippy, unit and integration tests (root needed for eBPF).
    Test {
        /// Extra arguments for `cargo test`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::all(),
        Task::BuildEbpf { debug } => {
            setup::ebpf_toolchain()?;
            let obj = ebpf::build(!debug)?;
            println!("eBPF object: {}", obj.display());
            Ok(())
        }
        Task::Certs { dir } => spooky_peers::certs::generate(&dir).map(|_| ()),
        Task::Quickstart { once } => quickstart::run(once),
        Task::Package => package::run(),
        Task::Bench { args } => bench::run(&args),
        Task::Fuzz { target, seconds } => fuzz::run(target.as_deref(), seconds),
        Task::Test { args } => test::run(&args),
    }
}

/// Whether this process runs as root (uid 0), read from /proc without any unsafe code.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// The workspace root (this crate lives in `xtask/`).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}
