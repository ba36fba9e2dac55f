//! `cargo xtask build-ebpf`: builds the kernel programs (`spooky-ebpf/`, its own cargo
//! workspace) with the pinned nightly for `bpfel-unknown-none`, linked by `bpf-linker` with BTF.
//! The `spooky` crate's build script embeds the resulting object. Installing the toolchain is
//! `setup::ebpf_toolchain`, not here.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use crate::setup::NIGHTLY;

/// The BPF target the kernel crate builds for.
pub const TARGET: &str = "bpfel-unknown-none";

/// Builds `spooky-ebpf` (release: optimised, which the verifier needs; debug only for
/// inspecting codegen) and returns the path of the object.
///
/// # Errors
/// When the nightly cargo cannot be started, the build fails, or the object is missing after it.
pub fn build(release: bool) -> Result<PathBuf> {
    let dir = crate::workspace_root().join("spooky-ebpf");
    let profile = if release { "release" } else { "debug" };
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&dir).arg(format!("+{NIGHTLY}")).args([
        "build",
        "--locked",
        "-Z",
        "build-std=core",
        "--target",
        TARGET,
    ]);
    if release {
        cmd.arg("--release");
    }
    // The same settings as spooky-ebpf/.cargo/config.toml, spelled out so that a cargo config
    // elsewhere cannot change them. The variables the outer (stable) cargo sets for this
    // process would make the child use the wrong compiler or flags: clear them.
    cmd.env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", "bpf-linker")
        .env(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
            "-C debuginfo=2 -C link-arg=--btf",
        )
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR");
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("building spooky-ebpf failed ({status}); command: {cmd:?}");
    }
    let object = dir
        .join("target")
        .join(TARGET)
        .join(profile)
        .join("spooky-ebpf");
    if !object.is_file() {
        bail!("spooky-ebpf built, but {} is missing", object.display());
    }
    eprintln!(
        "build-ebpf: {profile} object built in {:.1?}",
        started.elapsed()
    );
    Ok(object)
}
