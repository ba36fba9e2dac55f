//! Operations: the admin API, exact metrics, the access log, live reload under load (backend
//! set changes, certificate rotation, an invalid file), SIGHUP and SIGTERM on the real binary.

use crate::support::*;
use spooky_peers::client::{Client, ClientOptions, Request};
use spooky_peers::demo::DemoOptions;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One HTTP/1.1 request to the admin listener: (status, body).
fn admin(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: admin\r\n{auth}content-length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

/// A strict parser of the Prometheus text format: every sample's family is declared by a TYPE
/// line first, names and labels are well-formed, values parse, histogram buckets are
/// cumulative and end in `+Inf` equal to `_count`. Returns `series → value`, where the series
/// key is `name{k="v",…}` with labels sorted.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut types: HashMap<String, String> = HashMap::new();
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(name_ok(name), "line {n}: bad HELP name {name:?}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name_ok(name), "line {n}: bad TYPE name");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "line {n}: bad type {kind}"
            );
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "line {n}: {name} declared twice"
            );
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "line {n}: unexpected {line:?}"
        );
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("line {n}: no value"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("line {n}: bad value {value:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("line {n}: unclosed labels"));
                let mut labels = Vec::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (k, after) = rest
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("line {n}: bad label in {body}"));
                    assert!(name_ok(k), "line {n}: bad label name {k:?}");
                    let mut v = String::new();
                    let mut chars = after.char_indices();
                    let end = loop {
                        match chars.next() {
                            Some((_, '\\')) => v.push(chars.next().unwrap().1),
                            Some((i, '"')) => break i,
                            Some((_, c)) => v.push(c),
                            None => panic!("line {n}: unterminated label value"),
                        }
                    };
                    labels.push((k.to_string(), v));
                    rest = after[end + 1..]
                        .strip_prefix(',')
                        .unwrap_or(&after[end + 1..]);
                }
                labels.sort();
                (name, labels)
            }
            None => (series, Vec::new()),
        };
        assert!(name_ok(name), "line {n}: bad metric name {name:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "line {n}: {name} has no TYPE");
        let key = format!(
            "{name}{{{}}}",
            labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(
            out.insert(key.clone(), value).is_none(),
            "line {n}: duplicate series {key}"
        );
    }
    // Histograms: cumulative buckets ending in +Inf == _count.
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let mut groups: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for (k, v) in out.range(format!("{family}_bucket{{")..format!("{family}_bucket|")) {
            let labels = &k[family.len() + 8..k.len() - 1];
            let mut le = None;
            let rest: Vec<&str> = labels
                .split(',')
                .filter(|l| match l.strip_prefix("le=\"") {
                    Some(v) => {
                        le = Some(v.trim_end_matches('"').to_string());
                        false
                    }
                    None => true,
                })
                .collect();
            let le = le.unwrap_or_else(|| panic!("{k}: bucket without le"));
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            groups.entry(rest.join(",")).or_default().push((le, *v));
        }
        for (labels, mut buckets) in groups {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family}{{{labels}}}: buckets not cumulative"
            );
            assert_eq!(buckets.last().unwrap().0, f64::INFINITY);
            let count_key = format!("{family}_count{{{labels}}}");
            assert_eq!(
                out.get(&count_key),
                Some(&buckets.last().unwrap().1),
                "{count_key}"
            );
        }
    }
    out
}

fn metric(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("no series {key}"))
}

#[test]
fn metrics_count_exactly_the_requests_sent() {
    let b1 = backend("b1");
    let dead = dead_tcp_addr();
    let upstreams = pool(
        "main",
        "/",
        Some("example.com"),
        "round-robin",
        &[("b1", b1.addr)],
        "",
    ) + &pool(
        "down",
        "/",
        Some("down.example"),
        "round-robin",
        &[("gone", dead)],
        "",
    );
    let p = proxy(&upstreams, "quic:\n  retry: off\n", 2);
    let mut c = client(p.addr);
    for _ in 0..5 {
        assert_eq!(
            c.request(&Request::get("example.com", "/size/100"), T)
                .unwrap()
                .status,
            200
        );
    }
    for _ in 0..2 {
        assert_eq!(
            c.request(&Request::get("example.com", "/status/503"), T)
                .unwrap()
                .status,
            503
        );
    }
    for _ in 0..3 {
        assert_eq!(
            c.request(&Request::get("nowhere.test", "/"), T)
                .unwrap()
                .status,
            404
        );
    }
    assert_eq!(
        c.request(&Request::get("down.example", "/"), T)
            .unwrap()
            .status,
        502
    );
    let malformed = Request::get("example.com", "/").header("connection", "close");
    assert_eq!(c.request(&malformed, T).unwrap().status, 400);
    let up = Request::new("POST", "example.com", "/upload").body(vec![7u8; 3000]);
    assert_eq!(c.request(&up, T).unwrap().status, 200);

    let (status, text) = admin(
        p.running.as_ref().unwrap().admin_addr.unwrap(),
        "GET",
        "/metrics",
        None,
    );
    assert_eq!(status, 200);
    let m = parse_prometheus(&text);
    let req = |pool: &str, backend: &str, class: &str| {
        metric(
            &m,
            &format!(
                "spooky_requests_total{{backend=\"{backend}\",class=\"{class}\",pool=\"{pool}\",protocol=\"h3\"}}"
            ),
        )
    };
    assert_eq!(req("main", "b1", "2xx"), 6.0);
    assert_eq!(req("main", "b1", "5xx"), 2.0);
    assert_eq!(req("main", "b1", "4xx"), 0.0);
    assert_eq!(req("", "", "4xx"), 4.0); // 3 × 404 + 1 × 400
    assert_eq!(req("down", "gone", "5xx"), 1.0);
    assert_eq!(
        metric(
            &m,
            "spooky_request_duration_seconds_count{backend=\"b1\",pool=\"main\"}"
        ),
        8.0
    );
    assert_eq!(
        metric(
            &m,
            "spooky_upstream_response_seconds_count{backend=\"b1\",pool=\"main\"}"
        ),
        8.0
    );
    assert_eq!(
        metric(
            &m,
            "spooky_request_body_bytes_total{backend=\"b1\",pool=\"main\"}"
        ),
        3000.0
    );
    assert_eq!(
        metric(
            &m,
            "spooky_response_body_bytes_total{backend=\"b1\",pool=\"main\"}"
        ),
        500.0 + 2.0 * 11.0 + 5.0
    );
    let heads: f64 = (0..2)
        .map(|w| {
            metric(
                &m,
                &format!("spooky_http3_requests_total{{worker=\"{w}\"}}"),
            )
        })
        .sum();
    assert_eq!(heads, 13.0);
    let accepted: f64 = (0..2)
        .map(|w| {
            metric(
                &m,
                &format!("spooky_quic_connections_accepted_total{{worker=\"{w}\"}}"),
            )
        })
        .sum();
    assert_eq!(accepted, 1.0);
    let active: f64 = (0..2)
        .map(|w| {
            metric(
                &m,
                &format!("spooky_quic_connections_active{{worker=\"{w}\"}}"),
            )
        })
        .sum();
    assert_eq!(active, 1.0);
    assert_eq!(
        metric(&m, "spooky_backend_up{backend=\"b1\",pool=\"main\"}"),
        1.0
    );
    assert_eq!(metric(&m, "spooky_config_generation{}"), 1.0);
}

#[test]
fn admin_endpoints_answer_over_http1_and_h2c_and_guard_reload_with_the_token() {
    let b1 = backend("b1");
    let dead = dead_tcp_addr();
    let upstreams = pool("main", "/", None, "round-robin", &[("b1", b1.addr)], "")
        + &pool(
            "down",
            "/down",
            None,
            "round-robin",
            &[("gone", dead)],
            "passive_health:\n  consecutive_failures: 1\n  cooldown: 1m\nreadiness: required",
        );
    let token = "0123456789abcdef-secret";
    let extra = format!("admin:\n  address: 127.0.0.1:0\n  token: {token}\n");
    let p = proxy(&upstreams, &extra, 1);
    let addr = p.running.as_ref().unwrap().admin_addr.unwrap();
    assert_eq!(admin(addr, "GET", "/healthz", None), (200, "ok\n".into()));
    assert_eq!(admin(addr, "GET", "/readyz", None).0, 200);
    // One refused connect ejects the only backend of `down`, a required pool: not ready,
    // naming the pool.
    let mut c = client(p.addr);
    assert_eq!(
        c.request(&Request::get("localhost", "/down"), T)
            .unwrap()
            .status,
        502
    );
    let deadline = Instant::now() + T;
    let (status, body) = loop {
        let r = admin(addr, "GET", "/readyz", None);
        if r.0 == 503 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        (status, body.as_str()),
        (503, "no healthy backend in required pool(s): down\n")
    );
    let (status, body) = admin(addr, "GET", "/status", None);
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["generation"], 1);
    assert_eq!(v["pools"][0]["name"], "down");
    assert_eq!(v["pools"][0]["backends"][0]["state"], "ejected");
    assert_eq!(v["pools"][1]["backends"][0]["id"], "b1");
    assert_eq!(v["workers"][0]["connections"], 1);
    // Reload is guarded; this proxy was started without a file, so an authorized reload is
    // refused with the reason.
    assert_eq!(admin(addr, "POST", "/reload", None).0, 401);
    assert_eq!(
        admin(addr, "POST", "/reload", Some("wrong-token-wrong-token")).0,
        401
    );
    let (status, body) = admin(addr, "POST", "/reload", Some(token));
    assert_eq!(status, 400);
    assert!(body.contains("without a configuration file"), "{body}");
    assert_eq!(admin(addr, "GET", "/reload", Some(token)).0, 405);
    // h2c with prior knowledge.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let text = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let mut send = send.ready().await.unwrap();
        let req = http::Request::get(format!("http://{addr}/metrics"))
            .body(())
            .unwrap();
        let (resp, _) = send.send_request(req, true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut text = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            text.extend_from_slice(&chunk);
        }
        String::from_utf8(text).unwrap()
    });
    let m = parse_prometheus(&text);
    assert_eq!(
        metric(&m, "spooky_backend_up{backend=\"gone\",pool=\"down\"}"),
        0.0
    );
    assert_eq!(
        metric(&m, "spooky_config_reloads_total{result=\"failure\"}"),
        1.0
    );
}

#[test]
fn the_access_log_has_one_json_line_per_request() {
    let b1 = backend("b1");
    let dir = tempdir("access");
    let log = dir.join("access.log");
    let extra = format!("log:\n  level: warn\n  access: {}\n", log.display());
    let p = proxy(
        &pool("main", "/", None, "round-robin", &[("b1", b1.addr)], ""),
        &extra,
        1,
    );
    let mut c = client(p.addr);
    assert_eq!(
        c.request(&Request::get("example.com", "/size/10"), T)
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        c.request(
            &Request::get("example.com", "/x").header("connection", "x"),
            T
        )
        .unwrap()
        .status,
        400
    );
    let deadline = Instant::now() + T;
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= 2 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["path"], "/size/10");
    assert_eq!(lines[0]["host"], "example.com");
    assert_eq!(lines[0]["method"], "GET");
    assert_eq!(lines[0]["bytes_out"], 10);
    assert_eq!(lines[0]["pool"], "main");
    assert_eq!(lines[0]["backend"], "b1");
    assert!(lines[0]["client"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert_eq!(lines[1]["status"], 400);
    assert_eq!(lines[1]["pool"], "");
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "spooky-test-{name}-{}-{}",
        std::process::id(),
        free_udp_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The reload test's config file: `backends` with weights, listening on `port`, certificate
/// from `cert_dir`.
fn write_config(path: &Path, port: u16, cert_dir: &Path, backends: &[(&str, SocketAddr, u32)]) {
    let mut pools = String::from("  main:\n    load_balancing:\n      type: round-robin\n    route:\n      path_prefix: /\n    backends:\n");
    for (id, addr, w) in backends {
        pools.push_str(&format!(
            "      - id: {id}\n        address: \"{addr}\"\n        weight: {w}\n"
        ));
    }
    let yaml = format!(
        "version: 1\nlisten:\n  protocol: http3\n  address: 127.0.0.1\n  port: {port}\n  tls:\n    cert: {}\n    key: {}\nadmin:\n  address: 127.0.0.1:0\nsteering:\n  pin_path: /sys/fs/bpf/spooky-test-{port}\nquic:\n  retry: off\ncontrol_socket: {}\nupstream:\n{pools}",
        cert_dir.join("spooky.crt").display(),
        cert_dir.join("spooky.key").display(),
        path.with_extension("sock").display()
    );
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn peer_cert(addr: SocketAddr) -> Vec<u8> {
    let opts = ClientOptions {
        verify: true,
        ca: Some(certs_dir().join("ca.crt")),
        ..Default::default()
    };
    let c = Client::connect(addr, &opts, Duration::from_secs(5)).unwrap();
    c.quic().peer_cert().unwrap().to_vec()
}

fn pem_der(path: &Path) -> Vec<u8> {
    let pem = std::fs::read(path).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .unwrap()
        .unwrap();
    der.to_vec()
}

#[test]
fn reload_under_load_changes_backends_and_certificate_without_a_failed_request() {
    let b1 = backend("b1");
    let b2 = backend("b2");
    let b3 = backend("b3");
    // A private copy of the demo certificates, so that rotating Spooky's does not disturb
    // other tests.
    let dir = tempdir("reload");
    for f in ["ca.crt", "ca.key", "spooky.crt", "spooky.key"] {
        std::fs::copy(certs_dir().join(f), dir.join(f)).unwrap();
    }
    let cfg = dir.join("spooky.yaml");
    let port = free_udp_port();
    write_config(&cfg, port, &dir, &[("b1", b1.addr, 1)]);
    let running = start_file(&cfg, 2);
    let live = running.reloader();
    let addr = running.local_addr;
    let first_cert = peer_cert(addr);
    assert_eq!(first_cert, pem_der(&dir.join("spooky.crt")));

    // Four clients, each with one connection and two requests always in flight.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let seen: Arc<Mutex<Vec<(Instant, String, usize)>>> = Arc::new(Mutex::new(Vec::new()));
    // Each record is (when the request was SENT, the backend that answered, the loader):
    // requests sent after a reload must follow the new configuration; those in flight may
    // finish on the old. A loader waits for its requests in the order it sent them.
    let loaders: Vec<_> = (0..4)
        .map(|loader| {
            let (stop, failures, seen) = (stop.clone(), failures.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut c = client(addr);
                let req = Request::get("localhost", "/size/64");
                let mut inflight: Vec<(u64, Instant)> = (0..2)
                    .map(|_| (c.send(&req).unwrap(), Instant::now()))
                    .collect();
                while !stop.load(Ordering::Relaxed) || !inflight.is_empty() {
                    let (sid, sent_at) = inflight.remove(0);
                    match c.wait(sid, T) {
                        Ok(r) if r.status == 200 && r.body.len() == 64 => {
                            let b = r.header("x-backend").unwrap_or("").to_string();
                            seen.lock().unwrap().push((sent_at, b, loader));
                        }
                        other => {
                            eprintln!("failed request: {other:?}");
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if !stop.load(Ordering::Relaxed) {
                        inflight.push((c.send(&req).unwrap(), Instant::now()));
                    }
                }
            })
        })
        .collect();
    let backends_since = |t: Instant| -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for (_, b, _) in seen.lock().unwrap().iter().filter(|(at, _, _)| *at > t) {
            *m.entry(b.clone()).or_insert(0) += 1;
        }
        m
    };
    // Every loader has an answer to a request it sent after `t`: nothing sent before `t`
    // is in flight any more.
    let drained_since = |t: Instant| {
        wait_until("every loader answered after the reload", T, || {
            let seen = seen.lock().unwrap();
            (0..4).all(|l| seen.iter().any(|(at, _, who)| *who == l && *at > t))
        })
    };
    let deadline = Instant::now() + T;
    while seen.lock().unwrap().len() < 20 {
        assert!(
            Instant::now() < deadline,
            "load never started ({} failures)",
            failures.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let all: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b, _)| b.clone())
        .collect();
    assert!(all.iter().all(|b| b == "b1"), "{all:?}");
    assert_eq!(
        backends_since(Instant::now() - Duration::from_secs(60))
            .keys()
            .collect::<Vec<_>>(),
        ["b1"]
    );

    // 1. Add b2.
    write_config(&cfg, port, &dir, &[("b1", b1.addr, 1), ("b2", b2.addr, 1)]);
    assert!(live.reload().unwrap().contains("generation 2"));
    let t = Instant::now();
    wait_until("both b1 and b2 answering", T, || {
        let m = backends_since(t);
        m.contains_key("b1") && m.contains_key("b2")
    });

    // 2. Remove b1: after the reload no new request reaches it.
    write_config(&cfg, port, &dir, &[("b2", b2.addr, 1), ("b3", b3.addr, 1)]);
    live.reload().unwrap();
    let t = Instant::now();
    drained_since(t);
    let b1_count = b1.served();
    wait_until("b2 and b3 answering", T, || {
        let m = backends_since(t);
        m.contains_key("b2") && m.contains_key("b3")
    });
    assert_eq!(
        b1.served(),
        b1_count,
        "b1 still gets requests after its removal"
    );
    let m = backends_since(t);
    assert!(!m.contains_key("b1"), "{m:?}");

    // 3. Change weights: b3 gets three times b2's share.
    write_config(&cfg, port, &dir, &[("b2", b2.addr, 1), ("b3", b3.addr, 3)]);
    live.reload().unwrap();
    let t = Instant::now();
    // Enough answers since the reload for the ratio to mean something (round-robin by
    // weight is exact over each cycle of 4; in-flight requests blur the edges).
    wait_until("200 answers after the weight change", T, || {
        backends_since(t).values().sum::<usize>() >= 200
    });
    let m = backends_since(t);
    let (n2, n3) = (
        m.get("b2").copied().unwrap_or(0) as f64,
        m.get("b3").copied().unwrap_or(0) as f64,
    );
    assert!(
        n2 > 0.0 && (2.0..=4.5).contains(&(n3 / n2)),
        "b2 {n2} b3 {n3}"
    );

    // 4. An invalid file mid-load is refused and nothing changes.
    std::fs::write(&cfg, "version: 1\nlisten: {port: 0}\n").unwrap();
    let err = live.reload().unwrap_err();
    assert!(err.to_string().contains("listen"), "{err}");
    assert_eq!(live.generation(), 4);

    // 5. Rotate the certificate: new handshakes get the new one.
    write_config(&cfg, port, &dir, &[("b2", b2.addr, 1), ("b3", b3.addr, 3)]);
    crate::support::issue_cert(&dir, "spooky", "spooky rotated");
    live.reload().unwrap();
    let new_cert = peer_cert(addr);
    assert_ne!(new_cert, first_cert);
    assert_eq!(new_cert, pem_der(&dir.join("spooky.crt")));
    drained_since(Instant::now());

    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.join().unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed during reloads"
    );
    // The loaders' connections stayed up: only they and the two certificate probes connected.
    let accepted: u64 = running
        .worker_stats()
        .iter()
        .map(|s| s.connections_accepted.load(Ordering::Relaxed))
        .sum();
    assert_eq!(accepted, 4 + 2);
    assert_eq!(live.generation(), 5);
    running.begin_shutdown();
    running.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reload whose file validates but cannot be built — the key of another certificate: both
/// files parse, BoringSSL refuses the pair — answers 400 naming the key, and every worker
/// stays on the configuration it had: the generation, each worker's switch count, the
/// certificate served and the routing all stay. A good file afterwards reloads as usual.
#[test]
fn a_reload_that_cannot_be_built_answers_400_and_changes_nothing() {
    let b1 = backend("b1");
    let b2 = backend("b2");
    let dir = tempdir("reload-unbuildable");
    for f in ["ca.crt", "ca.key", "spooky.crt", "spooky.key"] {
        std::fs::copy(certs_dir().join(f), dir.join(f)).unwrap();
    }
    crate::support::issue_cert(&dir, "other", "another certificate");
    let cfg = dir.join("spooky.yaml");
    let port = free_udp_port();
    write_config(&cfg, port, &dir, &[("b1", b1.addr, 1)]);
    let running = start_file(&cfg, 2);
    let admin_addr = running.admin_addr.unwrap();
    let addr = running.local_addr;
    let first_cert = peer_cert(addr);
    let switches = |running: &spooky::app::Running| -> Vec<u64> {
        running
            .worker_stats()
            .iter()
            .map(|w| w.snapshots_applied.load(Ordering::Acquire))
            .collect()
    };
    let answered_by = |n: usize| -> Vec<String> {
        let mut c = client(addr);
        (0..n)
            .map(|_| {
                let r = c.request(&Request::get("localhost", "/"), T).unwrap();
                assert_eq!(r.status, 200);
                r.header("x-backend").unwrap_or("").to_owned()
            })
            .collect()
    };

    // New backends, and a key that is not the certificate's.
    write_config(&cfg, port, &dir, &[("b2", b2.addr, 1)]);
    let yaml = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, yaml.replace("spooky.key", "other.key")).unwrap();
    let (status, body) = admin(admin_addr, "POST", "/reload", None);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("other.key"),
        "the answer names the key: {body}"
    );
    assert_eq!(running.reloader().generation(), 1);
    assert_eq!(switches(&running), [0, 0], "a worker switched");
    assert_eq!(peer_cert(addr), first_cert);
    assert_eq!(answered_by(4), ["b1"; 4]);

    write_config(&cfg, port, &dir, &[("b2", b2.addr, 1)]);
    let (status, body) = admin(admin_addr, "POST", "/reload", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(running.reloader().generation(), 2);
    assert_eq!(switches(&running), [1, 1]);
    assert_eq!(answered_by(4), ["b2"; 4]);
    running.begin_shutdown();
    running.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_binary_reloads_on_sighup_and_exits_0_on_sigterm() {
    let b1 = backend("b1");
    let b2 = backend_with(DemoOptions {
        id: "b2".into(),
        goaway_every: None,
    });
    let dir = tempdir("sighup");
    let cfg = dir.join("spooky.yaml");
    let port = free_udp_port();
    let admin_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let write = |backends: &[(&str, SocketAddr, u32)]| {
        write_config(&cfg, port, &certs_dir(), backends);
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("127.0.0.1:0", &format!("127.0.0.1:{admin_port}"));
        std::fs::write(&cfg, text).unwrap();
    };
    write(&[("b1", b1.addr, 1)]);
    let mut child = spawn_spooky(&cfg, 1);
    let admin_addr: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let deadline = Instant::now() + T;
    while TcpStream::connect(admin_addr).is_err() {
        assert!(Instant::now() < deadline, "spooky did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = client(addr);
    assert_eq!(
        c.request(&Request::get("localhost", "/"), T)
            .unwrap()
            .header("x-backend"),
        Some("b1")
    );
    write(&[("b2", b2.addr, 1)]);
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + T;
    loop {
        let v: serde_json::Value =
            serde_json::from_str(&admin(admin_addr, "GET", "/status", None).1).unwrap();
        if v["generation"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Same connection, new configuration.
    assert_eq!(
        c.request(&Request::get("localhost", "/"), T)
            .unwrap()
            .header("x-backend"),
        Some("b2")
    );
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The admin listener is bounded: connections beyond its maximum are closed at once and
/// counted, a client that never finishes its request is cut off after the timeout, and the
/// listener keeps answering everyone else.
#[test]
fn the_admin_listener_caps_connections_and_times_out_silent_clients() {
    let b1 = backend("b1");
    let p = proxy(
        &pool("main", "/", None, "round-robin", &[("b1", b1.addr)], ""),
        "",
        1,
    );
    let addr = p.running.as_ref().unwrap().admin_addr.unwrap();
    let max = spooky::ops::ADMIN_MAX_CONNECTIONS;
    // Silent clients: connected, a partial request head, nothing more.
    let connected_at = Instant::now();
    let silent: Vec<TcpStream> = (0..max)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    // One more (the listener takes its backlog in order: this is the one over the cap) is
    // closed without an answer, at once — not at a read timeout.
    let mut extra = TcpStream::connect(addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let asked = Instant::now();
    let mut buf = [0u8; 64];
    let read = extra.read(&mut buf);
    let closed = matches!(read, Ok(0))
        || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
    assert!(closed, "over the cap: closed, no answer");
    assert!(asked.elapsed() < Duration::from_secs(2), "closed at once");
    // The silent ones are cut off by the timeout, and not before it.
    let mut first_close = None;
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        first_close.get_or_insert(connected_at.elapsed());
        assert!(out.is_empty(), "a silent client got an answer");
    }
    let waited = connected_at.elapsed();
    let first = first_close.unwrap();
    assert!(
        first >= spooky::ops::ADMIN_H1_TIMEOUT - Duration::from_millis(200),
        "a silent client was cut off after {first:?}, before the timeout"
    );
    assert!(
        waited < spooky::ops::ADMIN_H1_TIMEOUT + Duration::from_secs(5),
        "silent clients held for {waited:?}"
    );
    // Room again: the listener answers, and counted the refusal.
    let (status, metrics) = admin(addr, "GET", "/metrics", None);
    assert_eq!(status, 200);
    assert!(
        metrics.contains("spooky_admin_connections_refused_total 1"),
        "{metrics}"
    );
}

/// `POST /drain`: `/readyz` says 503, a connection open before goes on, new ones are refused
/// (HTTP/3: no handshake; TCP: closed at once), counted; `POST /undrain` takes them again.
#[test]
fn a_drained_host_keeps_its_connections_and_refuses_new_ones() {
    let b = backend("d1");
    let p = proxy(
        &pool("main", "/", None, "round-robin", &[("d1", b.addr)], ""),
        "",
        2,
    );
    let running = p.running.as_ref().unwrap();
    let (admin_addr, tcp_addr) = (running.admin_addr.unwrap(), running.tcp_addr.unwrap());
    let get = |c: &mut Client, path: &str| {
        c.request(&Request::get("localhost", path), Duration::from_secs(5))
            .unwrap()
            .status
    };
    let fresh = || {
        let opts = ClientOptions {
            verify: true,
            ca: Some(certs_dir().join("ca.crt")),
            ..Default::default()
        };
        Client::connect(p.addr, &opts, Duration::from_secs(2))
    };
    // A raw TCP connection waits for a ClientHello, or is closed at once.
    let tcp_closed_at_once = || {
        let mut s = TcpStream::connect(tcp_addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        match s.read(&mut [0u8; 16]) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    };
    let mut open = client(p.addr);
    assert_eq!(get(&mut open, "/before"), 200);
    assert!(!tcp_closed_at_once());

    assert_eq!(
        admin(admin_addr, "POST", "/drain", None),
        (200, "drained\n".to_owned())
    );
    let (status, body) = admin(admin_addr, "GET", "/readyz", None);
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("drained"), "{body}");
    assert_eq!(
        get(&mut open, "/during"),
        200,
        "the open connection goes on"
    );
    assert!(fresh().is_err(), "a new HTTP/3 connection is refused");
    assert!(tcp_closed_at_once(), "a new TCP connection is closed");
    let refused = p.stats_sum(|s| s.drain_refused.load(Ordering::Relaxed));
    assert!(refused >= 2, "{refused}");
    let status: serde_json::Value =
        serde_json::from_str(&admin(admin_addr, "GET", "/status", None).1).unwrap();
    assert_eq!(status["drained"], true);

    assert_eq!(
        admin(admin_addr, "POST", "/undrain", None),
        (200, "undrained\n".to_owned())
    );
    assert_eq!(admin(admin_addr, "GET", "/readyz", None).0, 200);
    let mut again = fresh().expect("new connections are taken again");
    assert_eq!(get(&mut again, "/after"), 200);
    assert!(!tcp_closed_at_once());
    assert_eq!(admin(admin_addr, "GET", "/drain", None).0, 405);
}
