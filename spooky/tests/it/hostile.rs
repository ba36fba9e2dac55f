//! Hostile input and faults: limits (header list size, body size, connections per address,
//! handshake timeout, request heads that never complete, idle request bodies), request-smuggling attempts, and backends that
//! reset mid-response or answer with malformed HTTP/2.

use crate::support::*;
use spooky_peers::client::{Client, ClientOptions, Request};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn one_pool(backend: SocketAddr, upstream_extra: &str, extra: &str) -> Proxy {
    proxy(
        &pool(
            "main",
            "/",
            None,
            "round-robin",
            &[("b1", backend)],
            upstream_extra,
        ),
        extra,
        2,
    )
}

#[test]
fn an_oversized_header_list_is_431_and_the_connection_keeps_working() {
    let b = backend("b1");
    let p = one_pool(b.addr, "", "proxy:\n  max_header_list_size: 8KiB\n");
    let mut c = client(p.addr);
    let big = "x".repeat(10 * 1024);
    let r = c
        .request(&Request::get("localhost", "/").header("x-big", &big), T)
        .unwrap();
    assert_eq!(r.status, 431);
    assert_eq!(
        c.request(&Request::get("localhost", "/size/10"), T)
            .unwrap()
            .status,
        200
    );
    assert_eq!(b.served(), 1);
}

#[test]
fn bodies_over_the_pool_limit_are_413() {
    let b = backend("b1");
    let p = one_pool(b.addr, "max_request_body: 64KiB", "");
    let mut c = client(p.addr);
    // Declared too large: refused before anything reaches the backend.
    let declared = Request::new("POST", "localhost", "/upload")
        .header("content-length", "100000")
        .body(vec![1u8; 100_000]);
    assert_eq!(c.request(&declared, T).unwrap().status, 413);
    assert_eq!(b.served(), 0);
    // Undeclared and too large: cut off while streaming.
    let streamed = Request::new("POST", "localhost", "/upload").body(vec![1u8; 300_000]);
    let r = c.request(&streamed, T).unwrap();
    assert_eq!(r.status, 413);
    // At the limit is fine.
    let ok = Request::new("POST", "localhost", "/upload").body(vec![1u8; 64 * 1024]);
    let r = c.request(&ok, T).unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"65536\n"[..]));
}

#[test]
fn request_smuggling_attempts_are_rejected() {
    let b = backend("b1");
    let p = one_pool(b.addr, "", "");
    let mut c = client(p.addr);
    let cases = [
        Request::new("POST", "localhost", "/echo")
            .header("content-length", "5")
            .header("content-length", "6")
            .body(&b"hello"[..]),
        Request::new("POST", "localhost", "/echo")
            .header("transfer-encoding", "chunked")
            .body(&b"5\r\nhello\r\n0\r\n\r\n"[..]),
        Request::new("POST", "localhost", "/echo")
            .header("content-length", "5, 5")
            .body(&b"hello"[..]),
        Request::new("POST", "localhost", "/echo")
            .header("content-length", "-1")
            .body(&b"hello"[..]),
        Request::new("GET", "localhost", "/").header("te", "chunked"),
        Request::new("GET", "localhost", "/").header("upgrade", "h2c"),
        Request::new("GET", "localhost", "/").header("x-evil", "a\nb"),
    ];
    for (i, req) in cases.iter().enumerate() {
        let r = c.request(req, T).unwrap();
        assert!(
            r.status == 400 || r.reset == Some(H3_MESSAGE_ERROR),
            "case {i}: {} {:?}",
            r.status,
            r.reset
        );
        assert_eq!(
            c.request(&Request::get("localhost", "/size/3"), T)
                .unwrap()
                .status,
            200,
            "case {i}"
        );
    }
    // A body longer than its content-length never completes upstream: the stream is reset.
    let r = c
        .request(
            &Request::new("POST", "localhost", "/echo")
                .header("content-length", "2")
                .body(&b"hello"[..]),
            T,
        )
        .unwrap();
    assert!(
        r.reset == Some(H3_MESSAGE_ERROR) || r.status == 400,
        "{r:?}"
    );
    // Only the good requests reached the backend, plus perhaps the head of the over-long one
    // (its stream was reset upstream as soon as the excess arrived).
    let good = cases.len() as u64;
    assert!(
        (good..=good + 1).contains(&b.served()),
        "{} requests reached the backend",
        b.served()
    );
}

#[test]
fn connections_per_address_are_limited() {
    let b = backend("b1");
    let p = one_pool(
        b.addr,
        "",
        "quic:\n  retry: off\n  max_connections_per_ip: 4\n",
    );
    let opts = ClientOptions {
        verify: true,
        ca: Some(certs_dir().join("ca.crt")),
        ..Default::default()
    };
    // Twelve handshakes at once; a refused one is never answered (its Initial is dropped),
    // so it ends in the client's timeout, long enough for any slow but accepted one.
    let attempts: Vec<_> = (0..12)
        .map(|_| {
            let (addr, opts) = (p.addr, opts.clone());
            std::thread::spawn(move || Client::connect(addr, &opts, Duration::from_secs(3)))
        })
        .collect();
    let mut open = Vec::new();
    let mut refused = 0;
    for a in attempts {
        match a.join().unwrap() {
            Ok(c) => open.push(c),
            Err(spooky_peers::client::ClientError::Timeout(_)) => refused += 1,
            Err(e) => panic!("a connection failed otherwise: {e}"),
        }
    }
    let accepted = p.stats_sum(|s| s.connections_accepted.load(Ordering::Relaxed));
    assert_eq!(
        accepted,
        open.len() as u64,
        "accepted by Spooky and open at the client"
    );
    // 2 workers × ceil(4 / 2): at most 4 (fewer if the hash put more on one worker).
    assert!(
        (1..=4).contains(&open.len()),
        "{} open, {refused} refused",
        open.len()
    );
    assert!(refused >= 8);
    let refused_count = p.stats_sum(|s| s.refused.load(Ordering::Relaxed));
    assert!(refused_count > 0);
    for c in &mut open {
        assert_eq!(
            c.request(&Request::get("localhost", "/size/1"), T)
                .unwrap()
                .status,
            200
        );
    }
}

#[test]
fn a_handshake_that_never_finishes_is_dropped_after_the_timeout() {
    let b = backend("b1");
    let p = one_pool(
        b.addr,
        "",
        "quic:\n  retry: off\n  handshake_timeout: 300ms\n",
    );
    // A client that sends its first flight and then goes silent.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut cfg = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    cfg.set_application_protos(quiche::h3::APPLICATION_PROTOCOL)
        .unwrap();
    cfg.verify_peer(false);
    let scid = quiche::ConnectionId::from_ref(&[7; 16]);
    let mut conn = quiche::connect(
        Some("localhost"),
        &scid,
        sock.local_addr().unwrap(),
        p.addr,
        &mut cfg,
    )
    .unwrap();
    let mut out = [0u8; 1500];
    let (n, _) = conn.send(&mut out).unwrap();
    sock.send_to(&out[..n], p.addr).unwrap();
    let active = || p.stats_sum(|s| s.connections_active.load(Ordering::Relaxed));
    let deadline = Instant::now() + T;
    while active() == 0 {
        assert!(
            Instant::now() < deadline,
            "the Initial never created a connection"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // quiche's own idle timeout is 30 s: only the handshake timeout can end it this soon.
    let deadline = Instant::now() + Duration::from_secs(5);
    while active() != 0 {
        assert!(
            Instant::now() < deadline,
            "the half-open connection was not dropped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_request_head_that_never_completes_is_reset_and_others_are_unaffected() {
    let b = backend("b1");
    let p = one_pool(
        b.addr,
        "",
        "quic:\n  retry: off\n  request_header_timeout: 500ms\n",
    );
    let mut c = client(p.addr);
    // Stream 0: a good request still running when the slow head times out.
    let good = c.send(&Request::get("localhost", "/delay/1500")).unwrap();
    assert_eq!(good, 0);
    // Stream 4: a HEADERS frame (type 0x01) announcing 200 bytes, of which 10 ever come.
    let slow = good + 4;
    let mut frame = vec![0x01, 0x40, 200];
    frame.extend_from_slice(&[0u8; 10]);
    c.send_raw(slow, &frame, false).unwrap();
    let started = Instant::now();
    let r = c.wait(slow, T).unwrap();
    let waited = started.elapsed();
    assert_eq!(r.status, 0, "no response for a request never received");
    assert_eq!(
        r.reset,
        Some(spooky::http::bridge::H3_REQUEST_REJECTED),
        "reset with H3_REQUEST_REJECTED"
    );
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(5),
        "reset after {waited:?}, timeout 500ms"
    );
    assert_eq!(
        p.stats_sum(|s| s.request_head_timeouts.load(Ordering::Relaxed)),
        1
    );
    // The connection and its other stream carry on; other clients never noticed.
    let r = c.wait(good, T).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.finished);
    let mut other = client(p.addr);
    for _ in 0..3 {
        let r = other
            .request(&Request::get("localhost", "/size/5"), T)
            .unwrap();
        assert_eq!(r.status, 200);
    }
    // A head that completes in time is not touched by the clock.
    assert_eq!(
        p.stats_sum(|s| s.request_head_timeouts.load(Ordering::Relaxed)),
        1
    );
}

#[test]
fn an_idle_request_body_is_408_and_others_are_unaffected() {
    let b = backend("b1");
    let p = one_pool(b.addr, "timeouts:\n  idle: 400ms", "");
    let mut c = client(p.addr);
    let f = |n: &str, v: &str| (n.as_bytes().to_vec(), v.as_bytes().to_vec());
    let fields = vec![
        f(":method", "POST"),
        f(":scheme", "https"),
        f(":authority", "localhost"),
        f(":path", "/upload"),
    ];
    let slow = c.send_open(&fields).unwrap();
    c.send_body(slow, b"first bytes, then silence", false)
        .unwrap();
    // Meanwhile other requests on the same connection complete.
    for _ in 0..3 {
        assert_eq!(
            c.request(&Request::get("localhost", "/size/5"), T)
                .unwrap()
                .status,
            200
        );
    }
    let r = c.wait(slow, T).unwrap();
    assert_eq!(r.status, 408);
}

#[test]
fn a_backend_reset_mid_response_resets_the_client_stream() {
    let b = backend("b1");
    let p = one_pool(b.addr, "", "");
    let mut c = client(p.addr);
    let r = c
        .request(&Request::get("localhost", "/reset/10000"), T)
        .unwrap();
    assert_eq!(r.status, 200, "the head was already relayed");
    assert!(
        r.reset == Some(H3_INTERNAL_ERROR),
        "a truncated response must not look complete: {r:?}"
    );
    assert!(!r.finished);
    assert!(r.body.len() <= 10000);
    assert_eq!(
        c.request(&Request::get("localhost", "/size/5"), T)
            .unwrap()
            .status,
        200
    );
}

/// A raw HTTP/2 server that answers every request with a malformed field section (an
/// uppercase field name), which a conforming client must treat as a protocol error.
fn malformed_h2_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for tcp in l.incoming() {
            let Ok(mut tcp) = tcp else { continue };
            std::thread::spawn(move || {
                let mut preface = [0u8; 24];
                if tcp.read_exact(&mut preface).is_err() {
                    return;
                }
                let _ = tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS
                let mut head = [0u8; 9];
                while tcp.read_exact(&mut head).is_ok() {
                    let len = (usize::from(head[0]) << 16)
                        | (usize::from(head[1]) << 8)
                        | usize::from(head[2]);
                    let mut payload = vec![0u8; len];
                    if tcp.read_exact(&mut payload).is_err() {
                        return;
                    }
                    let (kind, flags) = (head[3], head[4]);
                    let stream = &head[5..9];
                    if kind == 4 && flags & 1 == 0 {
                        let _ = tcp.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]); // SETTINGS ACK
                    }
                    if kind == 1 {
                        // :status 200 (static index 8), then "Bad-Name: x" as a literal.
                        let mut block = vec![0x88, 0x00, 8];
                        block.extend_from_slice(b"Bad-Name");
                        block.extend_from_slice(&[1, b'x']);
                        let mut frame = vec![0, 0, block.len() as u8, 1, 0x4 | 0x1];
                        frame.extend_from_slice(stream);
                        frame.extend_from_slice(&block);
                        let _ = tcp.write_all(&frame);
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_malformed_backend_response_is_502() {
    let bad = malformed_h2_backend();
    let good = backend("good");
    let upstreams = pool("bad", "/bad", None, "round-robin", &[("bad", bad)], "")
        + &pool("main", "/", None, "round-robin", &[("good", good.addr)], "");
    let p = proxy(&upstreams, "", 1);
    let mut c = client(p.addr);
    let r = c.request(&Request::get("localhost", "/bad/x"), T).unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(
        c.request(&Request::get("localhost", "/ok"), T)
            .unwrap()
            .status,
        200
    );
}

#[test]
#[ignore = "needs root"]
fn spooky_drops_to_an_unprivileged_user_and_keeps_serving() {
    let uid = std::fs::read_to_string("/proc/self/status").unwrap();
    assert!(
        uid.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")),
        "this test needs root (it checks that Spooky switches from root to nobody)"
    );
    let b = backend("b1");
    let dir = std::env::temp_dir().join(format!("spooky-priv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_udp_port();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pins = unique_pin_path();
    let upstream = pool("main", "/", None, "round-robin", &[("b1", b.addr)], "");
    let yaml = config_yaml(
        port,
        &upstream,
        &format!(
            "admin:\n  address: 127.0.0.1:{admin_port}\nsteering:\n  pin_path: {}\nuser: nobody\n",
            pins.display()
        ),
    );
    let cfg = dir.join("spooky.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let mut child = spawn_spooky(&cfg, 2);
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let deadline = Instant::now() + T;
    while std::net::TcpStream::connect(admin).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "spooky exited at start"
        );
        assert!(Instant::now() < deadline, "spooky did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The admin socket accepts connections into its backlog as soon as it listens, which
    // is before the switch: wait for the switch itself (it must come, and soon).
    let uid_line = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap()
            .to_string()
    };
    let switched = |line: &str| line.split_whitespace().skip(1).all(|u| u == "65534");
    while !switched(&uid_line()) {
        assert!(Instant::now() < deadline, "still {}", uid_line());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = client(format!("127.0.0.1:{port}").parse().unwrap());
    for _ in 0..20 {
        assert_eq!(
            c.request(&Request::get("localhost", "/size/100"), T)
                .unwrap()
                .status,
            200
        );
    }
    // The kernel steering keeps working with the pinned maps it opened as root.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spooky"))
        .args(["status", "--pin-path", pins.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.close();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert!(
        !pins.exists(),
        "pins left behind after a clean shutdown as nobody"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Passive health belongs to the backends: a client that makes them answer 5xx ejects none
/// of them (unless the pool counts 5xx), and backends that really fail are ejected only up to
/// the pool's `max_ejection_percent`; the ejection held back is counted.
#[test]
fn clients_cannot_eject_backends_and_ejections_are_capped_per_pool() {
    let backends: Vec<Backend> = (0..4).map(|i| backend(&format!("b{i}"))).collect();
    let addrs: Vec<(String, SocketAddr)> =
        backends.iter().map(|b| (b.id.clone(), b.addr)).collect();
    let named: Vec<(&str, SocketAddr)> = addrs.iter().map(|(i, a)| (i.as_str(), *a)).collect();
    let passive = "passive_health:\n  consecutive_failures: 2\n  cooldown: 1m";
    // A pool whose only backend refuses connections: its ejection is the barrier that says
    // the health checker has processed every report sent before it (one worker, one queue).
    let barrier = pool(
        "barrier",
        "/barrier",
        None,
        "round-robin",
        &[("refusing", dead_tcp_addr())],
        "passive_health:\n  consecutive_failures: 1\n  cooldown: 1m\n  max_ejection_percent: 100",
    );
    let p = proxy(
        &(pool("main", "/", None, "round-robin", &named, passive) + &barrier),
        "",
        1,
    );
    let mut c = client(p.addr);
    for _ in 0..40 {
        let r = c
            .request(&Request::get("localhost", "/status/503"), T)
            .unwrap();
        assert_eq!(r.status, 503);
    }
    assert_eq!(
        c.request(&Request::get("localhost", "/barrier"), T)
            .unwrap()
            .status,
        502
    );
    wait_until("the barrier backend's ejection", T, || {
        backend_state(&p, "refusing") == Some(2)
    });
    assert!(
        backend_states(&p)
            .iter()
            .filter(|(b, _)| b != "refusing")
            .all(|(_, s)| *s == 0),
        "5xx answers a client asked for ejected a backend: {:?}",
        backend_states(&p)
    );
    drop(p);

    // Counting 5xx is a choice a pool can make.
    let p = proxy(
        &pool(
            "main",
            "/",
            None,
            "round-robin",
            &named,
            "passive_health:\n  consecutive_failures: 2\n  cooldown: 1m\n  server_errors: true\n  max_ejection_percent: 100",
        ),
        "",
        1,
    );
    let mut c = client(p.addr);
    for _ in 0..16 {
        let _ = c
            .request(&Request::get("localhost", "/status/503"), T)
            .unwrap();
    }
    let deadline = Instant::now() + T;
    while backend_states(&p).iter().filter(|(_, s)| *s == 2).count() < 4 {
        assert!(Instant::now() < deadline, "{:?}", backend_states(&p));
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(p);

    // Three of four backends down, at most half of the pool may be ejected.
    let dead: Vec<(String, SocketAddr)> = (0..3)
        .map(|i| (format!("dead{i}"), dead_tcp_addr()))
        .chain([("alive".to_string(), backends[0].addr)])
        .collect();
    let named: Vec<(&str, SocketAddr)> = dead.iter().map(|(i, a)| (i.as_str(), *a)).collect();
    let p = proxy(
        &pool(
            "main",
            "/",
            None,
            "round-robin",
            &named,
            "passive_health:\n  consecutive_failures: 1\n  cooldown: 1m\n  max_ejection_percent: 50",
        ),
        "",
        1,
    );
    let withheld = |p: &Proxy| {
        let text = p.running.as_ref().unwrap().metrics_text();
        metric_sum(&text, "spooky_health_ejections_withheld_total ")
    };
    let before = withheld(&p);
    let mut c = client(p.addr);
    let deadline = Instant::now() + T;
    while withheld(&p) == before {
        assert!(Instant::now() < deadline, "{:?}", backend_states(&p));
        let _ = c.request(&Request::get("localhost", "/"), T).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let states = backend_states(&p);
    assert_eq!(
        states.iter().filter(|(_, s)| *s == 2).count(),
        2,
        "half of four may be ejected: {states:?}"
    );
    assert!(
        states.iter().any(|(b, s)| b == "alive" && *s == 0),
        "{states:?}"
    );
}

/// RFC 9000 §5.2.2: a datagram of an unknown version under 1200 bytes gets no Version
/// Negotiation (no amplification); one of 1200 bytes does.
#[test]
fn version_negotiation_only_answers_full_size_datagrams() {
    let b1 = backend("b1");
    let p = one_pool(b1.addr, "", "");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let datagram = |len: usize| {
        let mut d = vec![0xc0u8];
        d.extend_from_slice(&0x1a2a_3a4au32.to_be_bytes());
        d.push(8);
        d.extend_from_slice(&[0x11; 8]);
        d.push(8);
        d.extend_from_slice(&[0x22; 8]);
        d.resize(len, 0);
        d
    };
    let mut buf = [0u8; 1500];
    sock.send_to(&datagram(100), p.addr).unwrap();
    assert!(
        sock.recv_from(&mut buf).is_err(),
        "a 100-byte datagram of an unknown version was answered"
    );
    sock.send_to(&datagram(1200), p.addr).unwrap();
    let (n, _) = sock
        .recv_from(&mut buf)
        .expect("no Version Negotiation for a 1200-byte datagram");
    assert_eq!(&buf[1..5], &[0, 0, 0, 0], "a Version Negotiation packet");
    assert!(n < 1200, "smaller than what it answers");
    let sent = p.stats_sum(|w| w.negotiations_sent.load(Ordering::Relaxed));
    assert_eq!(sent, 1);
}

/// A client that never reads (aioquic with its flow-control credit withheld): each of its
/// stalled response streams is reset after `quic.send_timeout`, with the backend stream behind
/// it, counted; another client is served meanwhile.
#[test]
fn streams_a_client_never_reads_are_reset_with_their_backend_streams() {
    let b1 = backend("b1");
    // Caps above what the probe holds: this test is about the timeout alone.
    let p = one_pool(
        b1.addr,
        "",
        "quic:\n  retry: off\n  send_timeout: 2s\n  max_stalled_streams: 25\n",
    );
    let stall = stall_probe(p.addr.port(), 4, 25, 6);
    // Another client, on the same backend, while the streams are stalled.
    wait_for_backend_streams_at_least(&b1, 25);
    let mut c = client(p.addr);
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let r = c
            .request(&Request::get("localhost", "/size/1000"), T)
            .unwrap();
        assert_eq!(r.status, 200);
        slowest = slowest.max(started.elapsed());
    }
    // Served while the stalled streams still held the backend (before their 2 s timeout).
    assert!(
        slowest < Duration::from_secs(2),
        "the other client's slowest request: {slowest:?}"
    );
    let report = stall_report(stall);
    assert_eq!(report["reset"], 100, "every stalled stream reset: {report}");
    assert_eq!(report["ended"], 0, "{report}");
    assert_eq!(
        report["reset_codes"],
        serde_json::json!([0x10c]),
        "H3_REQUEST_CANCELLED: {report}"
    );
    let first = report["first_reset_s"].as_f64().unwrap();
    assert!(first >= 1.5, "reset before the send timeout: {report}");
    let metrics = p.running.as_ref().unwrap().metrics_text();
    let value = |name: &str| metric_sum(&metrics, name);
    assert_eq!(
        value("spooky_http3_send_timeouts_total"),
        100.0,
        "{metrics}"
    );
    // The backend streams were released with them: the backend is sending nothing.
    wait_for_backend_streams(&b1, 0);
}

/// Runs `h3_stall.py` (aioquic, flow-control credit withheld) against `port`.
fn stall_probe(port: u16, connections: u32, streams: u32, wait_s: u32) -> std::process::Child {
    std::process::Command::new("python3")
        .arg(repo_root().join("spooky/tests/peers/h3_stall.py"))
        .args(["--port", &port.to_string(), "--ca"])
        .arg(certs_dir().join("ca.crt"))
        .args(["--connections", &connections.to_string()])
        .args(["--streams", &streams.to_string()])
        .args(["--wait", &wait_s.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (aioquic) cannot be started: run cargo xtask setup")
}

fn stall_report(probe: std::process::Child) -> serde_json::Value {
    let out = probe.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("h3_stall.py: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(report["error"], serde_json::Value::Null, "{report}");
    report
}

/// The never-reading client again, with low caps and one worker so that the counts are
/// exact: a connection holds `quic.max_stalled_streams` (4) stalled streams, the client's
/// address `quic.max_stalled_streams_per_ip` (6); the other 24 of its 30 streams are reset
/// with `H3_EXCESSIVE_LOAD` about a second after they stall (not after the 30 s send
/// timeout), with their backend streams; another client is served meanwhile.
#[test]
fn stalled_streams_are_capped_per_connection_and_per_address() {
    let b1 = backend("b1");
    let p = proxy(
        &pool("main", "/", None, "round-robin", &[("b1", b1.addr)], ""),
        "quic:\n  retry: off\n  send_timeout: 30s\n  max_stalled_streams: 4\n  \
         max_stalled_streams_per_ip: 6\n",
        1,
    );
    let probe = stall_probe(p.addr.port(), 3, 10, 6);
    wait_for_backend_streams_at_least(&b1, 6);
    let mut c = client(p.addr);
    for _ in 0..20 {
        let r = c
            .request(&Request::get("localhost", "/size/1000"), T)
            .unwrap();
        assert_eq!(r.status, 200);
    }
    // While the probe still runs: the shed streams' backend streams are released, the 6
    // held ones remain.
    wait_for_backend_streams(&b1, 6);
    let report = stall_report(probe);
    assert_eq!(report["reset"], 24, "30 streams, 6 held: {report}");
    assert_eq!(report["ended"], 0, "{report}");
    assert_eq!(
        report["reset_codes"],
        serde_json::json!([0x107]),
        "H3_EXCESSIVE_LOAD: {report}"
    );
    let first = report["first_reset_s"].as_f64().unwrap();
    assert!(first >= 0.9, "reset before the stall grace: {report}");
    let metrics = p.running.as_ref().unwrap().metrics_text();
    let value = |name: &str| metric_sum(&metrics, name);
    assert_eq!(
        value("spooky_http3_stalled_streams_shed_total"),
        24.0,
        "{metrics}"
    );
    assert_eq!(value("spooky_http3_send_timeouts_total"), 0.0, "{metrics}");
    // The probe closed its connections on exit: the held streams go too.
    wait_for_backend_streams(&b1, 0);
}

/// Above `proxy.memory_limit` (lowered by a reload below what the process holds): new
/// requests get 503 with `retry-after`, held stalled streams are reset with
/// `H3_EXCESSIVE_LOAD`, both counted; lifting the limit restores service.
#[test]
fn above_the_memory_limit_requests_are_shed_and_stalled_streams_reset() {
    let b1 = backend("b1");
    let p = one_pool(
        b1.addr,
        "",
        "quic:\n  retry: off\n  max_stalled_streams: 100\n",
    );
    let running = p.running.as_ref().unwrap();
    let probe = stall_probe(p.addr.port(), 1, 10, 5);
    // Its ten downloads are at the backend (stalled soon after; nothing sheds them: no cap is
    // reached). Over the limit, every stream stalled for a second is reset.
    wait_for_backend_streams(&b1, 10);
    let live = running.reloader();
    let mut config = live.current().config.clone();
    config.proxy.memory_limit = Some(1 << 20);
    live.apply(config.clone()).unwrap();
    let mut c = client(p.addr);
    let get = Request::get("localhost", "/size/100");
    let r = c.request(&get, T).unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    let report = stall_report(probe);
    assert_eq!(report["reset"], 10, "{report}");
    wait_for_backend_streams(&b1, 0);
    assert_eq!(
        report["reset_codes"],
        serde_json::json!([0x107]),
        "{report}"
    );
    let metrics = running.metrics_text();
    let value = |name: &str| metric_sum(&metrics, name);
    assert_eq!(value("spooky_memory_shed_total"), 11.0, "{metrics}");
    assert!(value("spooky_process_resident_memory_bytes") > f64::from(1 << 20));
    config.proxy.memory_limit = None;
    live.apply(config).unwrap();
    assert_eq!(c.request(&get, T).unwrap().status, 200);
}

/// A worker that dies while serving: its clients get a Stateless Reset on their next packet
/// (not a wait for the idle timeout), new connections go to the live workers only, `/readyz`
/// says 503 naming it, a reload applies to the live worker and reports the dead one, and the
/// process keeps serving.
#[test]
#[ignore = "needs root"]
fn a_dead_worker_is_steered_around_and_its_clients_are_reset() {
    let b1 = backend("b1");
    let p = one_pool(b1.addr, "", "quic:\n  retry: off\n");
    let running = p.running.as_ref().unwrap();
    let admin = running.admin_addr.unwrap();
    // A connection, and the worker that has it.
    let mut doomed = client(p.addr);
    let get = Request::get("localhost", "/size/100");
    assert_eq!(doomed.request(&get, T).unwrap().status, 200);
    let owner = running
        .worker_stats()
        .iter()
        .position(|w| w.connections_active.load(Ordering::Relaxed) == 1)
        .expect("one worker holds the connection");
    running.kill_worker(owner);
    let deadline = Instant::now() + T;
    loop {
        let (status, body) = http_get(admin, "/readyz");
        if status == 503 {
            assert!(body.contains(&format!("worker(s) {owner} died")), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz still {status}: {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its client learns at once.
    let started = Instant::now();
    let err = doomed
        .request(&get, Duration::from_secs(20))
        .expect_err("a request on the dead worker's connection");
    assert!(
        matches!(err, spooky_peers::client::ClientError::StatelessReset),
        "{err} after {:?}",
        started.elapsed()
    );
    // A reload applies to the live worker and names the dead one (it used to block every
    // reload until a takeover).
    let reloader = running.reloader();
    let mut config = reloader.current().config.clone();
    config.log.level = "warn,spooky=warn".into();
    let summary = reloader.apply(config).expect("a reload with a dead worker");
    assert!(
        summary.contains(&format!("worker(s) [{owner}] are dead")),
        "{summary}"
    );
    let live = 1 - owner;
    assert_eq!(
        running.worker_stats()[live]
            .snapshots_applied
            .load(Ordering::Acquire),
        1,
        "the live worker switched"
    );
    assert_eq!(reloader.generation(), 2);
    // New connections are all served, by the live worker, without a misroute.
    let misrouted = p.stats_sum(|w| w.misrouted.load(Ordering::Relaxed));
    for _ in 0..20 {
        let mut c = client(p.addr);
        assert_eq!(c.request(&get, T).unwrap().status, 200);
        c.close();
    }
    let accepted = running.worker_stats()[owner]
        .connections_accepted
        .load(Ordering::Relaxed);
    assert_eq!(accepted, 1, "the dead worker took no new connection");
    assert_eq!(
        p.stats_sum(|w| w.misrouted.load(Ordering::Relaxed)),
        misrouted,
        "misrouted packets"
    );
    // The killed worker is the one error the process reports when it stops.
    let mut p = p;
    let running = p.running.take().unwrap();
    running.begin_shutdown();
    assert!(
        matches!(running.join(), Err(spooky::app::WorkerError::Killed(w)) if w == owner),
        "the killed worker is reported"
    );
}

/// `GET path` on the admin listener: (status, body).
fn http_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nhost: a\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        out.split_once("\r\n\r\n").map_or("", |b| b.1).to_string(),
    )
}
