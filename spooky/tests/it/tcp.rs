//! The TLS-over-TCP listener (`listen.tcp`), against clients nobody on the team wrote:
//!
//! - Debian's `curl` over HTTP/2 and HTTP/1.1 gets what the HTTP/3 client gets, and sees
//!   `alt-svc`;
//! - libcurl through curl_cffi (`spooky/tests/peers/altsvc_client.py`) with an alt-svc cache
//!   goes over TCP first and over HTTP/3 after;
//! - raw HTTP/1.1 request-smuggling probes over rustls are answered 400 and reach no backend;
//! - draining finishes requests in flight (HTTP/1.1 `connection: close`) and refuses new
//!   connections; silent and slow clients are cut off.

use crate::support::*;
use spooky_peers::client::Request;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

fn tcp_addr(p: &Proxy) -> SocketAddr {
    p.running
        .as_ref()
        .and_then(|r| r.tcp_addr)
        .expect("the TCP listener is on by default")
}

fn one_pool(b: &Backend) -> String {
    pool("main", "/", None, "round-robin", &[("b1", b.addr)], "")
}

/// One response as curl saw it.
#[derive(Debug)]
struct Curled {
    status: u16,
    /// curl's `%{http_version}`: `1.1`, `2`.
    version: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Curled {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Debian's curl against Spooky's TCP listener at `addr` (as `localhost`, verified with the
/// demo CA), speaking `proto` (`--http2` or `--http1.1`); `extra` are more curl arguments.
fn curl(addr: SocketAddr, proto: &str, path: &str, extra: &[&str]) -> Curled {
    let dir = std::env::temp_dir().join(format!(
        "spooky-curl-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (head, body) = (dir.join("head"), dir.join("body"));
    let out = Command::new("curl")
        .args(["-sS", proto, "--max-time", "20"])
        .arg("--cacert")
        .arg(certs_dir().join("ca.crt"))
        .args(["--resolve", &format!("localhost:{}:127.0.0.1", addr.port())])
        .arg("-D")
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_version}"])
        .args(extra)
        .arg(format!("https://localhost:{}{path}", addr.port()))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("curl cannot be started ({e}): run cargo xtask setup"));
    assert!(
        out.status.success(),
        "curl {proto} {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = std::fs::read_to_string(&head).unwrap();
    let body = std::fs::read(&body).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Curled {
        status,
        version: String::from_utf8_lossy(&out.stdout).into_owned(),
        headers,
        body,
    }
}

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Requests answered over `protocol` (`h3`, `h2`, `http/1.1`) with a 2xx from backend b1.
fn answered(p: &Proxy, protocol: &str) -> f64 {
    let text = p.running.as_ref().unwrap().metrics_text();
    metric_sum(
        &text,
        &format!(
            "spooky_requests_total{{pool=\"main\",backend=\"b1\",protocol=\"{protocol}\",class=\"2xx\"}}"
        ),
    )
}

#[test]
fn curl_over_tcp_gets_what_http3_clients_get_and_sees_alt_svc() {
    let b = backend("b1");
    let p = proxy(&one_pool(&b), "quic:\n  retry: off\n", 2);
    let tcp = tcp_addr(&p);
    let alt_svc = format!("h3=\":{}\"; ma=86400", p.addr.port());
    let upload: Vec<u8> = pattern(300_000);
    let upload_file = std::env::temp_dir().join(format!("spooky-up-{}", std::process::id()));
    std::fs::write(&upload_file, &upload).unwrap();
    let data_arg = format!("@{}", upload_file.display());

    // What the HTTP/3 client gets.
    let mut h3 = client(p.addr);
    let hello = h3.request(&Request::get("localhost", "/hello"), T).unwrap();
    let big = h3
        .request(&Request::get("localhost", "/size/1000000"), T)
        .unwrap();
    let echo = h3
        .request(
            &Request::new("POST", "localhost", "/echo").body(upload.clone()),
            T,
        )
        .unwrap();
    let missing = h3
        .request(&Request::get("localhost", "/status/404"), T)
        .unwrap();
    let headers = h3
        .request(&Request::get("localhost", "/headers"), T)
        .unwrap();
    let seen = String::from_utf8_lossy(&headers.body);
    assert!(seen.lines().any(|l| l == "via: 3 spooky"), "{seen}");
    for r in [&hello, &big, &echo, &missing] {
        assert_eq!(
            r.header("alt-svc"),
            Some(alt_svc.as_str()),
            "HTTP/3 too: {r:?}"
        );
    }

    for (proto, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let r = curl(tcp, proto, "/hello", &[]);
        assert_eq!(r.version, version, "{proto}: ALPN chose it");
        assert_eq!((r.status, &r.body), (hello.status, &hello.body), "{proto}");
        assert_eq!(r.header("x-backend"), Some("b1"));
        assert_eq!(
            r.header("alt-svc"),
            Some(alt_svc.as_str()),
            "{proto}: {r:?}"
        );

        let r = curl(tcp, proto, "/size/1000000", &[]);
        assert_eq!(r.status, 200, "{proto}");
        assert!(
            r.body == big.body && r.body == pattern(1_000_000),
            "{proto}: 1 MB intact"
        );

        let r = curl(tcp, proto, "/echo", &["--data-binary", &data_arg]);
        assert_eq!(r.status, 200, "{proto}");
        assert!(
            r.body == echo.body && r.body == upload,
            "{proto}: upload echoed intact"
        );

        // The same forwarding fields, with `via` naming the protocol the client spoke.
        let r = curl(tcp, proto, "/headers", &[]);
        let seen = String::from_utf8_lossy(&r.body).into_owned();
        for line in ["x-forwarded-for: 127.0.0.1", "x-forwarded-proto: https"] {
            assert!(
                seen.lines().any(|l| l == line),
                "{proto}: {line} in\n{seen}"
            );
        }
        let via = format!("via: {version} spooky");
        assert!(seen.lines().any(|l| l == via), "{proto}: {via} in\n{seen}");

        let r = curl(tcp, proto, "/status/404", &[]);
        assert_eq!(r.status, missing.status, "{proto}");
        assert_eq!(
            r.header("alt-svc"),
            Some(alt_svc.as_str()),
            "{proto}: on errors too"
        );
    }
    let _ = std::fs::remove_file(&upload_file);
    // The backend's 404s count as 4xx; the rest as 2xx, each under its protocol.
    assert_eq!(answered(&p, "h3"), 4.0);
    assert_eq!(answered(&p, "h2"), 4.0);
    assert_eq!(answered(&p, "http/1.1"), 4.0);
}

#[test]
fn alt_svc_can_be_turned_off_and_tcp_off_means_no_listener() {
    let b = backend("b1");
    init_logging();
    // A load balancer in front maps 443 to this port: the advertised port is 443.
    let yaml = config_yaml(free_udp_port(), &one_pool(&b), "").replace(
        "  tcp:\n    port: 0\n",
        "  tcp:\n    port: 0\n  alt_svc:\n    port: 443\n    max_age: 1h\n",
    );
    let p = proxy_from(spooky::config::parse(&yaml, &repo_root()).unwrap());
    let r = curl(tcp_addr(&p), "--http2", "/hello", &[]);
    assert_eq!(r.header("alt-svc"), Some("h3=\":443\"; ma=3600"), "{r:?}");
    drop(p);
    let port = free_udp_port();
    let yaml = config_yaml(port, &one_pool(&b), "").replace(
        "  tcp:\n    port: 0\n",
        "  tcp:\n    port: 0\n  alt_svc:\n    enabled: false\n",
    );
    let config = spooky::config::parse(&yaml, &repo_root()).unwrap();
    let p = proxy_from(config);
    let r = curl(tcp_addr(&p), "--http2", "/hello", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("alt-svc"), None, "{r:?}");
    let h3 = client(p.addr)
        .request(&Request::get("localhost", "/hello"), T)
        .unwrap();
    assert_eq!(h3.header("alt-svc"), None);
    drop(p);

    let yaml = config_yaml(free_udp_port(), &one_pool(&b), "")
        .replace("  tcp:\n    port: 0\n", "  tcp:\n    enabled: false\n");
    let p = proxy_from(spooky::config::parse(&yaml, &repo_root()).unwrap());
    assert_eq!(p.running.as_ref().unwrap().tcp_addr, None);
    let h3 = client(p.addr)
        .request(&Request::get("localhost", "/hello"), T)
        .unwrap();
    assert_eq!(h3.status, 200, "HTTP/3 serves without TCP");
}

#[test]
fn curl_cffi_goes_over_tcp_first_then_over_http3_by_alt_svc() {
    require_python("curl_cffi", "curl_cffi");
    let b = backend("b1");
    let p = proxy(&one_pool(&b), "quic:\n  retry: off\n", 2);
    let out = Command::new("python3")
        .arg(peers_dir().join("altsvc_client.py"))
        .args(["--tcp-port", &tcp_addr(&p).port().to_string()])
        .args(["--udp-port", &p.addr.port().to_string()])
        .arg("--ca")
        .arg(certs_dir().join("ca.crt"))
        .args(["--requests", "3"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "altsvc_client.py printed no result ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let versions: Vec<u64> = v["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["status"], 200, "{r}");
            assert!(r["body"].as_str().unwrap().starts_with("hello from b1"));
            r["http_version"].as_u64().unwrap()
        })
        .collect();
    // libcurl's CURL_HTTP_VERSION_2_0 is 3, CURL_HTTP_VERSION_3 is 30.
    assert_eq!(versions, [3, 30, 30], "TCP first, then HTTP/3 by alt-svc");
    assert_eq!((answered(&p, "h2"), answered(&p, "h3")), (1.0, 2.0));
}

/// `read()` once it equals `want`, or what it says after the test deadline.
fn settled(read: impl Fn() -> u64, want: u64) -> u64 {
    let deadline = Instant::now() + T;
    while read() != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    read()
}

/// A TLS connection to Spooky's TCP listener, offering `alpn`.
fn tls(addr: SocketAddr, alpn: &[u8]) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let config = Arc::new(tls_client_config(alpn));
    let conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(T)).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Everything the server sends until it closes (a close without close_notify counts as one).
fn read_all(s: &mut impl Read) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "reading the answer: {e}; so far: {}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn http1_smuggling_probes_are_answered_400_and_reach_no_backend() {
    let b = backend("b1");
    let p = proxy(&one_pool(&b), "", 1);
    let addr = tcp_addr(&p);
    let refused = || p.stats_sum(|s| s.http1_smuggling_refused.load(Ordering::Relaxed));
    let probes: [(&str, &[u8], bool); 8] = [
        ("content-length and transfer-encoding", b"POST /cl-te HTTP/1.1\r\nHost: localhost\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX", true),
        ("transfer-encoding then content-length", b"POST /te-cl HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", true),
        ("two equal content-lengths", b"POST /cl-cl HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", true),
        ("two different content-lengths", b"POST /cl-cl2 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", true),
        ("bare LF after the request line", b"GET /lf HTTP/1.1\nHost: localhost\r\n\r\n", true),
        ("bare LF after a field", b"GET /lf2 HTTP/1.1\r\nHost: localhost\n\r\n", true),
        // hyper's parser refuses these itself.
        ("obs-fold", b"GET /fold HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n 2\r\n\r\n", false),
        ("transfer-encoding not ending in chunked", b"POST /te HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", false),
    ];
    for (what, probe, ours) in probes {
        let before = refused();
        let mut s = tls(addr, b"http/1.1");
        // A good request first, on the same connection: it is answered, then the probe is.
        s.write_all(b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        s.write_all(probe).unwrap();
        s.flush().unwrap();
        let answer = read_all(&mut s);
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n"),
            "{what}: the request before it is served: {answer:?}"
        );
        let second = answer
            .match_indices("HTTP/1.1 ")
            .nth(1)
            .map(|(i, _)| &answer[i..]);
        assert!(
            second.is_some_and(|r| r.starts_with("HTTP/1.1 400 Bad Request\r\n")),
            "{what}: answered 400, connection closed: {answer:?}"
        );
        assert_eq!(
            refused() - before,
            u64::from(ours),
            "{what}: counted as smuggling"
        );
    }
    assert_eq!(
        b.served(),
        probes.len() as u64,
        "only the good requests reached the backend"
    );
}

#[test]
fn draining_finishes_tcp_requests_in_flight_and_refuses_new_connections() {
    let b = backend("b1");
    let mut p = proxy(&one_pool(&b), "", 2);
    let addr = tcp_addr(&p);
    let slow =
        |proto: &'static str| std::thread::spawn(move || curl(addr, proto, "/delay/5000", &[]));
    let (h2, h1) = (slow("--http2"), slow("--http1.1"));
    // Both requests are at the backend…
    wait_until("both requests at the backend", T, || {
        b.stats.streams_open.load(Ordering::Relaxed) == 2
    });
    // …when Spooky is told to stop: its listener closes while they are still running.
    p.running.as_ref().unwrap().begin_shutdown();
    wait_until("the TCP listener closed", Duration::from_secs(5), || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
    });
    assert!(
        !h2.is_finished() && !h1.is_finished(),
        "the requests in flight were still running when the listener closed"
    );
    let (h2, h1) = (h2.join().unwrap(), h1.join().unwrap());
    assert_eq!((h2.status, h2.version.as_str()), (200, "2"), "{h2:?}");
    assert_eq!((h1.status, h1.version.as_str()), (200, "1.1"), "{h1:?}");
    assert_eq!(
        h1.header("connection"),
        Some("close"),
        "HTTP/1.1 is told: {h1:?}"
    );
    let started = Instant::now();
    p.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the workers end once their connections are done, not at the 30 s grace"
    );
}

#[test]
fn silent_and_slow_clients_are_cut_off_at_the_header_timeout() {
    let b = backend("b1");
    init_logging();
    let yaml = config_yaml(free_udp_port(), &one_pool(&b), "").replace(
        "  tcp:\n    port: 0\n",
        "  tcp:\n    port: 0\n    header_timeout: 1s\n",
    );
    let p = proxy_from(spooky::config::parse(&yaml, &repo_root()).unwrap());
    let addr = tcp_addr(&p);

    // No TLS handshake at all.
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).unwrap();
    silent.set_read_timeout(Some(T)).unwrap();
    let mut buf = [0u8; 64];
    assert!(matches!(silent.read(&mut buf), Ok(0) | Err(_)));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after about 1 s: {waited:?}"
    );
    // The worker counts it just after closing.
    let failures = || p.stats_sum(|s| s.tcp_handshake_failures.load(Ordering::Relaxed));
    assert_eq!(settled(failures, 1), 1);

    // A request head that never ends.
    let started = Instant::now();
    let mut slow = tls(addr, b"http/1.1");
    slow.write_all(b"GET /never HTTP/1.1\r\nHost: localhost\r\nX-Slow: 1\r\n")
        .unwrap();
    slow.flush().unwrap();
    let answer = read_all(&mut slow);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after about 1 s (the header timeout): {waited:?}, answered {answer:?}"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "nothing but a 408 for a head that never ends: {answer:?}"
    );
    assert_eq!(b.served(), 0, "nothing reached the backend");
}

/// A proxy with one worker and `tcp` settings added under `listen.tcp`.
fn proxy_with_tcp(b: &Backend, tcp: &str) -> Proxy {
    init_logging();
    let yaml = config_yaml(free_udp_port(), &one_pool(b), "workers: 1\n").replace(
        "  tcp:\n    port: 0\n",
        &format!("  tcp:\n    port: 0\n{tcp}"),
    );
    proxy_from(spooky::config::parse(&yaml, &repo_root()).unwrap())
}

/// One HTTP/1.1 keep-alive request on `s`; the answer's head and body (by content-length).
fn keep_alive_get(s: &mut (impl Read + Write), path: &str) -> String {
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    s.flush().unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    let b = backend("b1");
    let p = proxy_with_tcp(&b, "    idle_timeout: 1s\n");
    let mut s = tls(tcp_addr(&p), b"http/1.1");
    assert!(keep_alive_get(&mut s, "/hello").starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let rest = read_all(&mut s);
    let waited = started.elapsed();
    assert_eq!(rest, "", "nothing more is sent");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "an idle keep-alive connection is closed after 1–2 idle timeouts: {waited:?}"
    );
}

#[test]
fn connections_over_the_limit_are_closed_at_once() {
    let b = backend("b1");
    let p = proxy_with_tcp(&b, "    max_connections: 2\n");
    let addr = tcp_addr(&p);
    let mut first = tls(addr, b"http/1.1");
    let mut second = tls(addr, b"http/1.1");
    assert!(keep_alive_get(&mut first, "/a").starts_with("HTTP/1.1 200"));
    assert!(keep_alive_get(&mut second, "/b").starts_with("HTTP/1.1 200"));
    // A third: accepted by the kernel, closed by Spooky before any TLS.
    let started = Instant::now();
    let mut third = TcpStream::connect(addr).unwrap();
    third.set_read_timeout(Some(T)).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(third.read(&mut buf), Ok(0) | Err(_)));
    assert!(started.elapsed() < Duration::from_secs(2), "closed at once");
    let refused = || p.stats_sum(|s| s.tcp_refused.load(Ordering::Relaxed));
    assert_eq!(settled(refused, 1), 1);
    // One closes; a new connection is served again.
    drop(first);
    wait_until("the first connection closed", T, || {
        p.stats_sum(|s| s.tcp_active.load(Ordering::Relaxed)) <= 1
    });
    let mut again = tls(addr, b"http/1.1");
    assert!(keep_alive_get(&mut again, "/c").starts_with("HTTP/1.1 200"));
    assert!(keep_alive_get(&mut second, "/d").starts_with("HTTP/1.1 200"));
}

#[test]
fn a_reload_reaches_tcp_connections_already_open() {
    let (b1, b2) = (backend("b1"), backend("b2"));
    init_logging();
    let yaml = config_yaml(free_udp_port(), &one_pool(&b1), "workers: 1\n");
    let p = proxy_from(spooky::config::parse(&yaml, &repo_root()).unwrap());
    let mut s = tls(tcp_addr(&p), b"http/1.1");
    assert!(keep_alive_get(&mut s, "/a").contains("x-backend: b1"));
    // The same file with the pool's backend replaced.
    let next = yaml.replace(
        &pool("main", "/", None, "round-robin", &[("b1", b1.addr)], ""),
        &pool("main", "/", None, "round-robin", &[("b2", b2.addr)], ""),
    );
    assert_ne!(next, yaml);
    let reloader = p.running.as_ref().unwrap().reloader();
    reloader
        .apply(spooky::config::parse(&next, &repo_root()).unwrap())
        .unwrap();
    // The next request on the same connection goes by the new configuration.
    let answer = keep_alive_get(&mut s, "/b");
    assert!(answer.contains("x-backend: b2"), "{answer}");
    assert_eq!(b2.served(), 1);
}

/// The PROXY protocol client (`spooky/tests/peers/proxy_protocol_client.py`, Python's own
/// socket and ssl): its status line and body, or `refused: …`.
fn proxied(addr: SocketAddr, version: &str, client: &str, path: &str) -> String {
    let out = Command::new("python3")
        .arg(peers_dir().join("proxy_protocol_client.py"))
        .arg(addr.port().to_string())
        .arg(certs_dir().join("ca.crt"))
        .args([version, client, "40000", path])
        .output()
        .expect("python3");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn proxy_refusals(p: &Proxy) -> u64 {
    p.stats_sum(|s| s.tcp_proxy_refused.load(Ordering::Relaxed))
}

#[test]
fn proxy_protocol_from_trusted_balancers_carries_the_client_address() {
    let b = backend("b1");
    let p = proxy_with_tcp(&b, "    proxy_protocol:\n      trusted: [127.0.0.1/32]\n");
    let addr = tcp_addr(&p);
    for (version, client) in [
        ("1", "198.51.100.7"),
        ("2", "203.0.113.9"),
        ("2", "2001:db8::7"),
        ("1", "2001:db8::8"),
    ] {
        let out = proxied(addr, version, client, "/headers");
        assert!(
            out.starts_with("HTTP/1.1 200"),
            "v{version} {client}: {out}"
        );
        assert!(
            out.contains(&format!("x-forwarded-for: {client}\n")),
            "v{version}: the carried address is the client's: {out}"
        );
    }
    // A v2 LOCAL header (the balancer's health check) keeps the connection's own address.
    let out = proxied(addr, "2-local", "203.0.113.9", "/headers");
    assert!(out.contains("x-forwarded-for: 127.0.0.1\n"), "{out}");
    // curl's own v1 header.
    let r = curl(addr, "--http1.1", "/headers", &["--haproxy-protocol"]);
    assert_eq!(r.status, 200);
    // From a trusted source a header is required.
    assert_eq!(proxy_refusals(&p), 0);
    let out = proxied(addr, "none", "203.0.113.9", "/headers");
    assert!(out.starts_with("refused"), "{out}");
    wait_until("the refusal counted", T, || proxy_refusals(&p) == 1);
    let text = p.running.as_ref().unwrap().metrics_text();
    assert_eq!(
        metric_sum(&text, "spooky_tcp_proxy_protocol_refused_total"),
        1.0
    );
}

#[test]
fn a_proxy_protocol_header_from_an_untrusted_source_is_refused() {
    let b = backend("b1");
    // Only 127.0.0.2 may send one; the clients here connect from 127.0.0.1.
    let p = proxy_with_tcp(&b, "    proxy_protocol:\n      trusted: [127.0.0.2/32]\n");
    let addr = tcp_addr(&p);
    for version in ["1", "2"] {
        let out = proxied(addr, version, "203.0.113.9", "/headers");
        assert!(out.starts_with("refused"), "v{version}: {out}");
    }
    wait_until("the refusals counted", T, || proxy_refusals(&p) == 2);
    assert_eq!(b.served(), 0, "nothing reached the backend");
    // Without a header the client is served as itself.
    let r = curl(addr, "--http2", "/headers", &[]);
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("x-forwarded-for: 127.0.0.1\n"));
}
