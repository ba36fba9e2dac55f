//! `spooky status` without root: the pinned maps need CAP_BPF, so a user's `spooky status`
//! asks the running Spooky's admin listener instead (found through `--config`) and says so on
//! its first line; root still reads the maps. Needs root itself: Spooky steers with eBPF (so
//! there are maps a user cannot read), and the user's command runs under `setpriv`.

use crate::support::*;
use spooky_peers::client::Request;
use std::path::Path;
use std::process::{Command, Output};

/// `spooky ARGS` as the user nobody (uid and gid 65534, no groups, no capabilities), from
/// `/` (so no `config/config.yaml` is picked up by default).
fn as_nobody(args: &[&str]) -> Output {
    require_command("setpriv", "util-linux");
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_spooky"))
        .args(args)
        .current_dir("/")
        .output()
        .expect("setpriv")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[ignore = "needs root"]
fn a_user_reads_the_status_from_the_admin_listener_and_root_from_the_maps() {
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "needs root: Spooky steers with eBPF here, and `spooky status` runs as another user"
    );
    let b1 = backend("b1");
    let b2 = backend("b2");
    let admin_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let pin = unique_pin_path();
    let yaml = config_yaml(
        free_udp_port(),
        &pool(
            "main",
            "/",
            None,
            "round-robin",
            &[("b1", b1.addr), ("b2", b2.addr)],
            "",
        ),
        &format!(
            "admin:\n  address: 127.0.0.1:{admin_port}\nsteering:\n  pin_path: {}\n",
            pin.display()
        ),
    );
    // A configuration file the user can read (the directory is 0755 under umask 022).
    let scratch = Scratch::new("status");
    let config = scratch.0.join("spooky.yaml");
    std::fs::write(&config, &yaml).unwrap();
    let config = config.display().to_string();
    let mut parsed = spooky::config::parse(&yaml, &repo_root()).unwrap();
    parsed.workers = Some(2);
    let mut p = proxy_from(parsed);
    assert_eq!(
        p.running.as_ref().unwrap().steering,
        spooky::steering::Mode::SkReuseport
    );
    let mut c = client(p.addr);
    for _ in 0..4 {
        let resp = c.request(&Request::get("localhost", "/"), T).unwrap();
        assert_eq!(resp.status, 200);
    }

    // Root: the maps.
    let out = Command::new(env!("CARGO_BIN_EXE_spooky"))
        .args(["status", "--config", &config])
        .current_dir("/")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(
        stdout.lines().next(),
        Some(format!("source: pinned maps at {}", pin.display()).as_str()),
        "{stdout}"
    );

    // A user: the admin listener, with the same pools and backends.
    let out = as_nobody(&["status", "--config", &config]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    eprintln!("spooky status as nobody:\n{stdout}");
    assert_eq!(
        stdout.lines().next(),
        Some(
            format!("source: admin listener http://127.0.0.1:{admin_port} (pinned maps need root)")
                .as_str()
        ),
        "{stdout}"
    );
    for want in [
        "sk-reuseport",
        "pool main",
        "b1",
        "b2",
        "healthy",
        "requests",
    ] {
        assert!(stdout.contains(want), "`{want}` missing from:\n{stdout}");
    }
    let requests: u64 = stdout
        .lines()
        .skip_while(|l| l.trim() != "workers")
        .skip(2)
        .take(2)
        .map(|l| l.split_whitespace().last().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(requests, 4, "the workers' requests column:\n{stdout}");

    let out = as_nobody(&["status", "--config", &config, "--json"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(v["source"]
        .as_str()
        .unwrap()
        .starts_with("admin listener http://127.0.0.1:"));
    let ids: Vec<&str> = v["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["b1", "b2"]);

    // Pins named on the command line are the only source asked.
    let out = as_nobody(&["status", "--pin-path", &pin.display().to_string()]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));

    // Nothing to ask: exit 1, naming both sources.
    p.shutdown();
    let out = as_nobody(&["status", "--config", &config]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "admin listener http://127.0.0.1:{admin_port}: cannot connect"
        )),
        "{stderr}"
    );
    assert!(Path::new(&config).exists());
}
