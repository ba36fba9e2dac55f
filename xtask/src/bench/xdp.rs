//! The `xdp` scenario: packets per second of Spooky's XDP program on one CPU, measured in
//! the kernel with `BPF_PROG_TEST_RUN` and `repeat` (no NIC, no traffic). The measurement
//! itself is the ignored test `ebpf::xdp_benchmark` (it shares the packet builders of the
//! kernel tests); the harness builds it in release mode, runs it as root and reads the
//! `xdp-bench:` lines it prints.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// One packet kind through the program.
#[derive(Debug, Clone)]
pub struct Case {
    pub packet: String,
    pub verdict: String,
    pub ns_per_packet: f64,
    pub mpps: f64,
}

/// Builds the eBPF object (unless `no_build`) and runs the measurement.
pub fn run(root: &Path, no_build: bool) -> Result<Vec<Case>> {
    if !crate::is_root() {
        bail!("the xdp scenario loads XDP programs: run the bench as root, or leave xdp out of --scenarios");
    }
    if !no_build {
        crate::ebpf::build(true)?;
    }
    eprintln!("bench: xdp: cargo test -p spooky --release --test it ebpf::xdp_benchmark");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["test", "-p", "spooky", "--release", "--test", "it"])
        .args([
            "--",
            "--ignored",
            "--exact",
            "ebpf::xdp_benchmark",
            "--nocapture",
        ])
        .current_dir(root)
        .output()
        .context("cargo test")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let cases = parse(&text);
    if !out.status.success() || cases.is_empty() {
        bail!(
            "the XDP benchmark failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for c in &cases {
        eprintln!(
            "bench:   {:<52} {:>10} {:>6.1} ns {:>6.2} Mpps",
            c.packet, c.verdict, c.ns_per_packet, c.mpps
        );
    }
    Ok(cases)
}

/// `xdp-bench: <packet>|<verdict>|<ns per packet>` lines.
fn parse(text: &str) -> Vec<Case> {
    text.lines()
        .filter_map(|l| l.strip_prefix("xdp-bench: "))
        .filter_map(|l| {
            let mut f = l.split('|');
            let packet = f.next()?.trim().to_string();
            let verdict = f.next()?.trim().to_string();
            let ns: f64 = f.next()?.trim().parse().ok()?;
            Some(Case {
                packet,
                verdict,
                ns_per_packet: ns,
                mpps: if ns > 0.0 { 1_000.0 / ns } else { 0.0 },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_lines_the_test_prints_and_nothing_else() {
        let text = "running 1 test\nxdp-bench: junk: fixed bit clear (dropped)|Drop|12.5\nnoise\nxdp-bench: bad|Pass|x\n";
        let c = parse(text);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].verdict, "Drop");
        assert!((c[0].mpps - 80.0).abs() < 1e-9);
    }
}
