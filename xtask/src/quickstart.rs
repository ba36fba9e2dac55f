//! `cargo xtask quickstart`: the README's first command. Installs prerequisites, builds the
//! eBPF object and Spooky (release), writes demo certificates, starts two HTTP/2 demo
//! backends on 127.0.0.1:7001 and :7002, starts Spooky on `config/config.yaml`, sends one
//! HTTP/3 request through it and prints the answer. Then it keeps serving until Ctrl-C
//! (or stops at once with `--once`), ending only the processes it started.

use crate::{ebpf, setup, workspace_root};
use anyhow::{bail, Context, Result};
use spooky_peers::certs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Kids(Vec<(String, Child)>);

impl Drop for Kids {
    fn drop(&mut self) {
        for (name, child) in self.0.iter_mut().rev() {
            // SIGTERM first so Spooky drains gracefully, by PID: only what we started.
            let pid = child.id() as libc_pid;
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("stopped {name} (pid {pid})");
        }
    }
}

#[allow(non_camel_case_types)]
type libc_pid = u32;

pub fn run(once: bool) -> Result<()> {
    setup::apt()?;
    setup::ebpf_toolchain()?;
    ebpf::build(true)?;
    let root = workspace_root();
    certs::generate(&root.join("config/certs"))?;
    // The same build as `cargo xtask package`'s: after one, the other builds nothing.
    crate::package::build_release(&root)?;
    let bin = root.join("target/release");
    let mut kids = Kids(Vec::new());
    for (id, port) in [("demo-1", 7001), ("demo-2", 7002)] {
        let child = Command::new(bin.join("spooky-demo-backend"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--id", id])
            .spawn()
            .context("start demo backend")?;
        kids.0.push((id.to_string(), child));
    }
    let spooky = Command::new(bin.join("spooky"))
        .args(["--config", "config/config.yaml"])
        .current_dir(&root)
        .spawn()
        .context("start spooky")?;
    kids.0.push(("spooky".into(), spooky));

    let get = |print: bool| {
        Command::new(bin.join("spooky"))
            .args([
                "get",
                "-i",
                "--ca",
                "config/certs/ca.crt",
                "--connect",
                "127.0.0.1:9889",
                "https://localhost:9889/hello",
            ])
            .current_dir(&root)
            .stdout(if print {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(if print {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .status()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if get(false)?.success() {
            break;
        }
        if Instant::now() > deadline {
            bail!("spooky did not answer within 20 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("==> an HTTP/3 request through Spooky (spooky get https://localhost:9889/hello):");
    if !get(true)?.success() {
        bail!("the demo request failed");
    }
    eprintln!(
        "\nSpooky is serving HTTP/3 on udp/9889 with two HTTP/2 demo backends.\n\
         Try: target/release/spooky get -i --ca config/certs/ca.crt --connect 127.0.0.1:9889 https://localhost:9889/size/1000\n\
         or any HTTP/3 client (aioquic's examples/http3_client.py --ca-certs config/certs/ca.crt https://localhost:9889/).\n\
         Metrics: curl -s http://127.0.0.1:9900/metrics   Status: target/release/spooky status"
    );
    if once {
        return Ok(());
    }
    eprintln!("Press Ctrl-C to stop.");
    loop {
        for (name, child) in kids.0.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{name} exited: {status}");
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
