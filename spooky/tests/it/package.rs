//! The Debian package that `cargo xtask package` builds, checked as an operator meets it:
//! `dpkg -i` on this machine; `spooky check` accepts the packaged configuration; the installed
//! binary, run as the unit runs it (the spooky user, only the unit's ambient capabilities,
//! no_new_privs), serves an HTTP/3 and an HTTP/2 request through a copy of that configuration
//! on free ports, steers with eBPF, writes the access log and reopens it on SIGUSR1, and exits
//! 0 on SIGTERM; lintian finds no error and no warning; `dpkg --purge` leaves no file and no
//! user behind.
//!
//! Root only: it installs into the real system. It refuses to run where a spooky package or
//! user already exists (it would replace and purge them; its own installation, left by a
//! run killed before its cleanup, it purges first), uses its own ports, pin path and
//! control socket (a developer's running Spooky is left alone), and purges in a drop guard
//! so that a failure cleans up too. No systemd is needed (CI has none running).

use crate::support::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Left in the package's state directory while this test has the package installed: a run
/// killed before its cleanup is recognised (and its installation purged) by the next one.
const MARKER: &str = "/var/lib/spooky/.installed-by-the-package-test";

/// Files the package installs, or its postinst makes.
const INSTALLED: &[&str] = &[
    "/usr/bin/spooky",
    "/usr/lib/systemd/system/spooky.service",
    "/etc/spooky/config.yaml",
    "/etc/logrotate.d/spooky",
    "/usr/share/man/man1/spooky.1.gz",
    "/usr/share/doc/spooky/copyright",
    "/usr/share/doc/spooky/changelog.Debian.gz",
    "/etc/spooky/tls/spooky.crt",
    "/etc/spooky/tls/spooky.key",
    "/var/lib/spooky",
    "/var/log/spooky",
];

/// What must be gone after the purge.
const PURGED: &[&str] = &[
    "/usr/bin/spooky",
    "/usr/lib/systemd/system/spooky.service",
    "/etc/spooky",
    "/etc/logrotate.d/spooky",
    "/usr/share/man/man1/spooky.1.gz",
    "/usr/share/doc/spooky",
    "/var/lib/spooky",
    "/var/log/spooky",
    "/etc/systemd/system/multi-user.target.wants/spooky.service",
];

/// The .deb of this tree: `target/debian/spooky_VERSION_ARCH.deb`, VERSION from the top of
/// `spooky/debian/changelog`.
fn deb() -> PathBuf {
    let root = repo_root();
    let changelog = std::fs::read_to_string(root.join("spooky/debian/changelog")).unwrap();
    let version = changelog
        .lines()
        .next()
        .and_then(|l| l.split_once('(')?.1.split_once(')'))
        .map(|(v, _)| v.to_owned())
        .expect("spooky/debian/changelog: no `spooky (VERSION)` first line");
    let arch = run(Command::new("dpkg").arg("--print-architecture"));
    let deb = root.join(format!(
        "target/debian/spooky_{version}_{}.deb",
        arch.trim()
    ));
    assert!(
        deb.is_file(),
        "{} is missing: build it with `cargo xtask package` (`cargo xtask test` does)",
        deb.display()
    );
    deb
}

/// Runs `cmd`, fails the test with its output unless it succeeds; returns its stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{stdout}{stderr}",
        out.status
    );
    stdout
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn package_installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "spooky"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("installed"))
}

fn user_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn group_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["group", name])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Undoes everything the test did, whatever state it stopped in: the Spooky it started
/// (by its PID), the package (purged), the pin directory, the scratch directory.
struct Cleanup {
    spooky: Option<Child>,
    pin: PathBuf,
    scratch: Scratch,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut child) = self.spooky.take() {
            if let Ok(None) = child.try_wait() {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if package_installed() {
            let _ = Command::new("dpkg")
                .args(["--purge", "spooky"])
                .stdout(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

/// The packaged configuration with this test's ports, pin path, control socket and backend;
/// everything else (certificate, key file, access log) as packaged.
fn test_config(
    packaged: &str,
    port: u16,
    admin_port: u16,
    pin: &Path,
    control: &Path,
    backend: std::net::SocketAddr,
) -> String {
    use serde_yaml::Value;
    let mut doc: Value = serde_yaml::from_str(packaged).unwrap();
    let set = |doc: &mut Value, section: &str, key: &str, value: Value| {
        doc[section]
            .as_mapping_mut()
            .unwrap_or_else(|| panic!("the packaged configuration has no `{section}`"))
            .insert(key.into(), value);
    };
    set(&mut doc, "listen", "address", "127.0.0.1".into());
    set(&mut doc, "listen", "port", u64::from(port).into());
    set(
        &mut doc,
        "admin",
        "address",
        format!("127.0.0.1:{admin_port}").into(),
    );
    set(
        &mut doc,
        "steering",
        "pin_path",
        pin.display().to_string().into(),
    );
    doc["control_socket"] = control.display().to_string().into();
    doc["upstream"] = serde_yaml::from_str(&format!(
        "demo:\n  route: {{path_prefix: /}}\n  backends:\n    - {{id: pkg-1, address: \"{backend}\"}}\n"
    ))
    .unwrap();
    serde_yaml::to_string(&doc).unwrap()
}

/// The capabilities of the unit's `AmbientCapabilities=` line, as setpriv wants them
/// (`+net_bind_service,+bpf,…`).
fn unit_capabilities(unit: &str) -> String {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("the unit has no AmbientCapabilities= line");
    let caps: Vec<String> = line
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    assert!(!caps.is_empty());
    caps.join(",")
}

/// `GET /status` of the admin listener at `port`, once it answers.
fn admin_status(port: u16) -> serde_json::Value {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (value, _) = spooky::ops::status::read_admin(addr, None, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("admin listener {addr}: {e}"));
    value
}

fn access_log_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[test]
#[ignore = "needs root"]
fn the_package_installs_serves_as_its_user_passes_lintian_and_purges() {
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "needs root: it installs the package with dpkg"
    );
    require_command("dpkg-deb", "dpkg");
    require_command("lintian", "lintian");
    require_command("setpriv", "util-linux");
    require_command("curl", "curl");
    let deb = deb();
    if package_installed() && Path::new(MARKER).exists() {
        // This test's own installation, left by a run that was killed before its cleanup.
        run(Command::new("dpkg").args(["--purge", "spooky"]));
    }
    assert!(
        !package_installed(),
        "a spooky package is installed on this machine: this test would replace and purge it \
         (remove it first: dpkg --purge spooky)"
    );
    assert!(
        !user_exists("spooky") && !group_exists("spooky"),
        "a spooky user or group exists: this test would delete it with the purge"
    );
    let mut cleanup = Cleanup {
        spooky: None,
        pin: unique_pin_path(),
        scratch: Scratch::new("package"),
    };

    // Install.
    let started = Instant::now();
    run(Command::new("dpkg").arg("-i").arg(&deb));
    eprintln!("dpkg -i: {:?}", started.elapsed());
    std::fs::write(
        MARKER,
        "installed by the spooky package test; purged at its end\n",
    )
    .unwrap();
    for path in INSTALLED {
        assert!(Path::new(path).exists(), "{path} missing after dpkg -i");
    }
    assert!(user_exists("spooky"), "no spooky user after dpkg -i");
    let key = std::fs::metadata("/etc/spooky/tls/spooky.key").unwrap();
    assert_eq!(key.mode() & 0o777, 0o640, "the private key's mode");

    // The packaged configuration is valid as installed.
    let out =
        run(Command::new("/usr/bin/spooky").args(["check", "--config", "/etc/spooky/config.yaml"]));
    assert!(out.contains(": ok ("), "spooky check:\n{out}");

    // Run it as the unit does, on free ports.
    let backend = backend("pkg-1");
    let (port, admin_port) = (free_udp_port(), {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    let dir = cleanup.scratch.0.clone();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        test_config(
            &std::fs::read_to_string("/etc/spooky/config.yaml").unwrap(),
            port,
            admin_port,
            &cleanup.pin,
            &dir.join("control.sock"),
            backend.addr,
        ),
    )
    .unwrap();
    // The spooky user's own directory (the control socket goes there), and its pin
    // directory, as the unit's ExecStartPre makes it.
    run(Command::new("chown")
        .arg("-R")
        .arg("spooky:spooky")
        .arg(&dir));
    run(Command::new("install")
        .args(["-d", "-o", "spooky", "-g", "spooky", "-m", "0700"])
        .arg(&cleanup.pin));
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/spooky.service").unwrap();
    let caps = unit_capabilities(&unit);
    let log = std::fs::File::create(dir.join("spooky.log")).unwrap();
    cleanup.spooky = Some(
        Command::new("setpriv")
            .args([
                "--reuid=spooky",
                "--regid=spooky",
                "--clear-groups",
                &format!("--inh-caps={caps}"),
                &format!("--ambient-caps={caps}"),
                &format!("--bounding-set=-all,{caps}"),
                "--no-new-privs",
                "--",
                "/usr/bin/spooky",
                "--config",
            ])
            .arg(&config)
            .args(["--workers", "2", "--no-pin"])
            .stderr(log)
            .spawn()
            .expect("setpriv /usr/bin/spooky"),
    );
    let get = || {
        Command::new("/usr/bin/spooky")
            .args([
                "get",
                "-i",
                "-k",
                "--connect",
                &format!("127.0.0.1:{port}"),
                &format!("https://localhost:{port}/hello"),
            ])
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + T;
    let answer = loop {
        let out = get();
        if out.status.success() {
            break text(&out).0;
        }
        let exited = cleanup.spooky.as_mut().unwrap().try_wait().unwrap();
        let log = std::fs::read_to_string(dir.join("spooky.log")).unwrap_or_default();
        assert!(exited.is_none(), "spooky exited ({exited:?}):\n{log}");
        assert!(Instant::now() < deadline, "spooky never answered:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(answer.starts_with("HTTP/3 200"), "{answer}");
    assert!(answer.contains("x-backend: pkg-1"), "{answer}");
    assert!(answer.contains("hello from pkg-1: GET /hello"), "{answer}");
    let over_tcp = run(Command::new("curl")
        .args(["-sS", "-k", "--http2", "-i", "--resolve"])
        .arg(format!("localhost:{port}:127.0.0.1"))
        .arg(format!("https://localhost:{port}/tcp")));
    assert!(over_tcp.starts_with("HTTP/2 200"), "{over_tcp}");
    assert!(
        over_tcp.contains("hello from pkg-1: GET /tcp"),
        "{over_tcp}"
    );

    // The unit's capabilities are enough for eBPF steering, and none is kept.
    let status = admin_status(admin_port);
    let spooky_uid = std::fs::metadata("/var/lib/spooky").unwrap().uid();
    assert!(
        status["mode"].as_str().unwrap().starts_with("sk-reuseport"),
        "{status}"
    );
    assert_eq!(status["uid"], spooky_uid, "{status}");
    assert_eq!(status["capabilities"], "0x0", "{status}");

    // State and logs where the package put them, owned by the spooky user.
    let keys = std::fs::metadata("/var/lib/spooky/quic.keys").expect("no key file");
    assert_eq!((keys.uid(), keys.mode() & 0o777), (spooky_uid, 0o600));
    let access = Path::new("/var/log/spooky/access.log");
    wait_until("two access-log lines", T, || access_log_lines(access) == 2);
    // logrotate's move and SIGUSR1: the next line goes to a new file.
    std::fs::rename(access, "/var/log/spooky/access.log.1").unwrap();
    let pid = cleanup.spooky.as_ref().unwrap().id().to_string();
    run(Command::new("kill").args(["-USR1", &pid]));
    wait_until("the access log reopened", T, || access.exists());
    assert!(get().status.success());
    wait_until("a line in the new access log", T, || {
        access_log_lines(access) == 1
    });
    assert_eq!(
        access_log_lines(Path::new("/var/log/spooky/access.log.1")),
        2
    );

    // Stop by PID: a graceful exit.
    run(Command::new("kill").args(["-TERM", &pid]));
    let exit = cleanup.spooky.take().unwrap().wait().unwrap();
    assert_eq!(
        exit.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(dir.join("spooky.log")).unwrap_or_default()
    );

    // lintian: no error, no warning.
    let started = Instant::now();
    let out = Command::new("lintian").arg(&deb).output().expect("lintian");
    let (report, stderr) = text(&out);
    eprintln!("lintian ({:?}):\n{report}{stderr}", started.elapsed());
    let bad: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
        .collect();
    assert!(bad.is_empty(), "lintian:\n{report}");
    assert!(out.status.success(), "lintian failed: {stderr}");

    // Purge: nothing left.
    run(Command::new("dpkg").args(["--purge", "spooky"]));
    for path in PURGED {
        assert!(
            std::fs::symlink_metadata(path).is_err(),
            "{path} left after dpkg --purge"
        );
    }
    assert!(!user_exists("spooky"), "the spooky user is left");
    assert!(!group_exists("spooky"), "the spooky group is left");
    assert!(!package_installed());
}
