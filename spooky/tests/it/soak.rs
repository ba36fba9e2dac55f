//! Soak: the real `spooky` binary under mixed load for `SPOOKY_SOAK_SECS` seconds (120 by
//! default, as in CI; `SPOOKY_SOAK_SECS=600` for the documented 10-minute run) while backends
//! restart gracefully one after another, the configuration is reloaded with SIGHUP, and a burst
//! of junk and forged Initial packets hits the QUIC port. Asserts zero failed requests and no
//! memory growth after warm-up; prints the RSS slope.

use crate::support::*;
use spooky_peers::client::Request;
use spooky_peers::demo::DemoOptions;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `/metrics` from the admin listener at `admin`.
fn admin_metrics(admin: SocketAddr) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(admin) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nhost: a\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Least-squares slope of `(seconds, KiB)` samples, in KiB per minute.
fn slope_kib_per_min(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    let (sx, sy) = samples
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = samples.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 {
        0.0
    } else {
        num / den * 60.0
    }
}

fn write_config(
    path: &std::path::Path,
    port: u16,
    admin_port: u16,
    pins: &std::path::Path,
    backends: &[(String, SocketAddr, u32)],
) {
    let mut pool = String::from(
        "  main:\n    load_balancing:\n      type: round-robin\n    route:\n      path_prefix: /\n    passive_health:\n      consecutive_failures: 3\n      cooldown: 2s\n    backends:\n",
    );
    for (id, addr, w) in backends {
        pool.push_str(&format!(
            "      - id: {id}\n        address: \"{addr}\"\n        weight: {w}\n        health_check:\n          path: /health\n          interval: 300ms\n          timeout: 250ms\n          healthy_threshold: 2\n          unhealthy_threshold: 2\n"
        ));
    }
    let yaml = config_yaml(
        port,
        &pool,
        &format!("admin:\n  address: 127.0.0.1:{admin_port}\nsteering:\n  pin_path: {}\ncontrol_socket: {}\nquic:\n  handshake_timeout: 2s\n  retry: auto\n  retry_threshold: 200\nlog:\n  level: warn\n", pins.display(), path.with_extension("sock").display()),
    );
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A burst of junk datagrams and forged client Initials from one socket, bounded in count.
fn flood(target: SocketAddr, packets: usize) -> usize {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut sent = 0;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..packets {
        let mut pkt = vec![0u8; if i % 2 == 0 { 1200 } else { 60 }];
        for b in pkt.iter_mut() {
            *b = next() as u8;
        }
        if i % 2 == 0 {
            // Long header, Initial, version 1, 8-byte DCID, no SCID, no token.
            pkt[0] = 0xc3;
            pkt[1..5].copy_from_slice(&1u32.to_be_bytes());
            pkt[5] = 8;
            pkt[14] = 0;
            pkt[15] = 0;
            pkt[16] = 0x44;
            pkt[17] = 0x00;
        } else {
            pkt[0] &= 0x3f; // fixed bit clear: junk
        }
        if sock.send_to(&pkt, target).is_ok() {
            sent += 1;
        }
        if i % 64 == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    sent
}

#[test]
fn soak_mixed_load_with_restarts_reloads_and_a_flood() {
    let secs: u64 = std::env::var("SPOOKY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let total = Duration::from_secs(secs);
    let ids = ["s1", "s2", "s3"];
    let backends: Arc<Mutex<Vec<Backend>>> =
        Arc::new(Mutex::new(ids.iter().map(|id| backend(id)).collect()));
    let addrs: Vec<(String, SocketAddr, u32)> = backends
        .lock()
        .unwrap()
        .iter()
        .map(|b| (b.id.clone(), b.addr, 1))
        .collect();
    let dir = std::env::temp_dir().join(format!("spooky-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("spooky.yaml");
    let port = free_udp_port();
    let admin_port = free_udp_port();
    let pins = unique_pin_path();
    write_config(&cfg, port, admin_port, &pins, &addrs);
    let mut child = spawn_spooky(&cfg, 2);
    let pid = child.id();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let deadline = Instant::now() + T;
    while std::net::TcpStream::connect(admin).is_err() {
        assert!(Instant::now() < deadline, "spooky did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    // Mixed, paced load: small GETs, 1 MiB downloads, 256 KiB uploads; new connections now
    // and then.
    let loaders: Vec<_> =
        (0..4)
            .map(|t| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    let mut c = client(addr);
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let (req, want) =
                            match (i + t) % 10 {
                                0 => (Request::get("localhost", "/size/1048576"), 1_048_576),
                                1 => (
                                    Request::new("POST", "localhost", "/echo")
                                        .body(vec![(t as u8) ^ (i as u8); 262_144]),
                                    262_144,
                                ),
                                _ => (Request::get("localhost", "/size/200"), 200),
                            };
                        match c.request(&req, T) {
                            Ok(r) if r.status == 200 && r.body.len() == want && r.finished => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                eprintln!(
                                    "soak: failed request: {:?}",
                                    other.map(|r| (r.status, r.body.len(), r.reset))
                                );
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        if i.is_multiple_of(200) {
                            c.close();
                            c = client(addr);
                        }
                        std::thread::sleep(Duration::from_millis(15));
                    }
                })
            })
            .collect();

    let started = Instant::now();
    let warm = total / 4;
    let mut samples = Vec::new();
    let mut last_restart = Instant::now();
    let mut last_reload = Instant::now();
    let mut restarted = 0usize;
    let mut reloads = 0u32;
    let mut flooded = false;
    let mut warm_rss = 0u64;
    while started.elapsed() < total {
        std::thread::sleep(Duration::from_millis(500));
        let t = started.elapsed();
        let rss = rss_kib(pid);
        if t >= warm {
            if warm_rss == 0 {
                warm_rss = rss;
            }
            samples.push((t.as_secs_f64(), rss as f64));
        }
        // A graceful backend restart every ~15 s, round robin over the three.
        if last_restart.elapsed() >= Duration::from_secs(15) {
            let k = restarted % ids.len();
            let old = backends.lock().unwrap().remove(k);
            let (id, baddr) = (old.id.clone(), old.addr);
            old.server.graceful_stop();
            std::thread::sleep(Duration::from_secs(2));
            let fresh = backend_at(
                baddr,
                DemoOptions {
                    id,
                    goaway_every: None,
                },
            );
            backends.lock().unwrap().insert(k, fresh);
            restarted += 1;
            last_restart = Instant::now();
        }
        // A SIGHUP reload every ~20 s, changing weights.
        if last_reload.elapsed() >= Duration::from_secs(20) {
            reloads += 1;
            let weighted: Vec<_> = addrs
                .iter()
                .enumerate()
                .map(|(i, (id, a, _))| (id.clone(), *a, 1 + (i as u32 + reloads) % 3))
                .collect();
            write_config(&cfg, port, admin_port, &pins, &weighted);
            assert!(std::process::Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .unwrap()
                .success());
            // Applied before the loop goes on: the configuration generation says so.
            let want = format!("spooky_config_generation {}", reloads + 1);
            wait_until("the SIGHUP reload applied", T, || {
                admin_metrics(admin).contains(&want)
            });
            last_reload = Instant::now();
        }
        // One flood burst in the middle.
        if !flooded && t >= total / 2 {
            let sent = flood(addr, 40_000);
            eprintln!("soak: flood burst of {sent} datagrams at {t:?}");
            flooded = true;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.join().unwrap();
    }
    let final_rss = rss_kib(pid);
    let slope = slope_kib_per_min(&samples);
    let metrics = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nhost: a\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let sum = |name: &str| crate::support::metric_sum(&metrics, name);
    eprintln!(
        "soak: {secs}s, {} ok, {} failed, {restarted} backend restarts, {reloads} reloads, retry sent {}, dropped {}, rss warm {warm_rss} KiB final {final_rss} KiB, slope {slope:.1} KiB/min",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        sum("spooky_quic_retry_sent_total{"),
        sum("spooky_packets_dropped_total{"),
    );
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests to a healthy pool failed"
    );
    assert!(
        ok.load(Ordering::Relaxed) > secs * 20,
        "too little load got through"
    );
    assert!(restarted >= 1 && reloads >= 1 && flooded);
    assert!(
        sum("spooky_packets_dropped_total{") > 0.0,
        "the junk was not dropped"
    );
    assert_eq!(
        sum("spooky_config_reloads_total{result=\"success\"}"),
        f64::from(reloads)
    );
    // Memory: flat after warm-up within generous bounds (buffers, pools, bursts), so that a
    // leak per request or per connection fails while noise does not.
    assert!(
        final_rss < warm_rss + warm_rss / 2 + 32 * 1024,
        "RSS grew from {warm_rss} KiB to {final_rss} KiB"
    );
    assert!(slope < 8.0 * 1024.0, "RSS slope {slope:.0} KiB/min");
}
