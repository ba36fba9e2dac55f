//! Idempotent installation of every prerequisite: Debian packages, the pinned nightly with
//! `rust-src`, `bpf-linker`, and the Python test peers. Each step first checks whether its
//! piece is already there and does nothing if so.

use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};

/// The nightly the eBPF crate builds with (its LLVM matches Debian 12's llvm-22).
pub const NIGHTLY: &str = "nightly-2026-05-19";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages: quiche's BoringSSL build (cmake, C/C++, libclang), bpf-linker's LLVM,
/// the kernel tools, nginx as an independent HTTP/2 backend for the tests, curl (the
/// takeover tests read the admin endpoint with it), nftables (the tests black-hole a
/// backend's SYNs with it), pebble (the ACME server the automatic-HTTPS tests order from) and
/// dnsmasq (the DNS server those tests control; `dnsmasq-base`: the binary, no service), and
/// two real browsers over HTTP/3 and TCP, headless: chromium, and firefox-esr (its own QUIC
/// stack) with libnss3-tools (`certutil`, to make it trust the test CA), and lintian (the
/// package test checks the `cargo xtask package` .deb with it; dpkg-deb and dpkg-shlibdeps
/// come with build-essential's dpkg-dev), prometheus (`promtool check metrics` lints Spooky's
/// /metrics) and logrotate (rotates the access log in a test, with SIGUSR1 to reopen it).
const APT_PACKAGES: &[&str] = &[
    "build-essential",
    "cmake",
    "pkg-config",
    "clang",
    "libclang-dev",
    "llvm-22-dev",
    "libllvm22",
    "bpftool",
    "iproute2",
    "ethtool",
    "nginx-light",
    "curl",
    "nftables",
    "pebble",
    "dnsmasq-base",
    "chromium",
    "firefox-esr",
    "libnss3-tools",
    "lintian",
    "prometheus",
    "logrotate",
];

/// Python packages: aioquic (an independent HTTP/3 client), hypercorn (a strict HTTP/2
/// server), curl_cffi (libcurl with ngtcp2: a second independent HTTP/3 client) and
/// websockets (a WebSocket client and server), pinned.
const PIP_PACKAGES: &[(&str, &str)] = &[
    ("aioquic", "1.7.2"),
    ("hypercorn", "0.18.0"),
    ("curl_cffi", "0.17.0"),
    ("websockets", "15.0.1"),
];

/// Everything.
pub fn all() -> Result<()> {
    apt()?;
    ebpf_toolchain()?;
    python_peers()?;
    Ok(())
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Debian packages, installed only when one is missing.
pub fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The pinned nightly with `rust-src`, and `bpf-linker` built against LLVM 22.
pub fn ebpf_toolchain() -> Result<()> {
    apt()?;
    let has_src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", NIGHTLY])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false);
    if !has_src {
        eprintln!("setup: installing {NIGHTLY} with rust-src");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !linker_ok {
        eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} (a few minutes)");
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("CARGO_ENCODED_RUSTFLAGS"))?;
    }
    Ok(())
}

/// `cargo-fuzz` (the fuzz targets in `fuzz/`), pinned, installed only when
/// `cargo fuzz --version` does not report that version.
pub fn cargo_fuzz() -> Result<()> {
    const VERSION: &str = "0.13.2";
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().nth(1) == Some(VERSION))
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz {VERSION} (about 2 minutes)");
    run(Command::new("cargo")
        .args(["install", "cargo-fuzz", "--version", VERSION, "--locked"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_ENCODED_RUSTFLAGS"))
}

fn python() -> &'static str {
    "python3"
}

/// The Python test peers, installed only when an import fails or a version differs.
pub fn python_peers() -> Result<()> {
    let check = PIP_PACKAGES
        .iter()
        .map(|(name, version)| {
            format!("assert importlib.metadata.version('{name}') == '{version}', '{name}'")
        })
        .collect::<Vec<_>>()
        .join("; ");
    let script = format!("import importlib.metadata; {check}");
    if quiet_ok(Command::new(python()).args(["-c", &script])) {
        return Ok(());
    }
    let specs: Vec<String> = PIP_PACKAGES
        .iter()
        .map(|(n, v)| format!("{n}=={v}"))
        .collect();
    eprintln!("setup: installing Python peers: {}", specs.join(" "));
    run(Command::new(python())
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(&specs))
}
