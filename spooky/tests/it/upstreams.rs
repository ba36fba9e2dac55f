//! HTTP/1.1 backends, driven byte by byte: a raw TCP server in the test answers each request
//! with exactly the bytes a case needs (keep-alive, chunked bodies with trailers, a connection
//! closed under a request, response-smuggling shapes), and counts the connections it accepts.
//! The independent HTTP/1.1 servers (hypercorn, nginx over TLS) are in `peers.rs`.

use crate::support::*;
use spooky_peers::client::Request;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

/// A request as the raw server read it.
#[derive(Debug, Clone, Default)]
struct Seen {
    line: String,
    fields: Vec<(String, String)>,
    body: Vec<u8>,
    chunked: bool,
    trailers: Vec<(String, String)>,
}

impl Seen {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the server does with a request: answer these bytes, or close without answering.
enum Reply {
    Bytes(Vec<u8>),
    Close,
}

type Handler = dyn Fn(&Seen, usize) -> Reply + Send + Sync;

/// A raw HTTP/1.1 server on 127.0.0.1: one thread per connection, requests read in turn
/// (`Content-Length` or chunked bodies), each answered by the handler, which also gets the
/// request's index on its connection.
struct RawServer {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

impl RawServer {
    fn start(handler: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let (a, s, st) = (accepted.clone(), seen.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                a.fetch_add(1, Ordering::Relaxed);
                let (h, s) = (handler.clone(), s.clone());
                std::thread::spawn(move || serve(conn, &*h, &s));
            }
        });
        Self {
            addr,
            accepted,
            seen,
            stop,
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(conn: TcpStream, handler: &Handler, seen: &Mutex<Vec<Seen>>) {
    let mut out = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    for index in 0.. {
        let Some(req) = read_request(&mut r) else {
            return;
        };
        seen.lock().unwrap().push(req.clone());
        match handler(&req, index) {
            Reply::Bytes(b) => {
                if out.write_all(&b).is_err() {
                    return;
                }
            }
            Reply::Close => return,
        }
    }
}

fn read_line(r: &mut impl BufRead) -> Option<String> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    Some(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn read_fields(r: &mut impl BufRead) -> Option<Vec<(String, String)>> {
    let mut fields = Vec::new();
    loop {
        let line = read_line(r)?;
        if line.is_empty() {
            return Some(fields);
        }
        let (n, v) = line.split_once(':')?;
        fields.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
}

fn read_request(r: &mut impl BufRead) -> Option<Seen> {
    let line = read_line(r)?;
    let fields = read_fields(r)?;
    let mut req = Seen {
        line,
        fields,
        ..Seen::default()
    };
    if req.field("transfer-encoding") == Some("chunked") {
        req.chunked = true;
        loop {
            let size = read_line(r)?;
            let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                req.trailers = read_fields(r)?;
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).ok()?;
            req.body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(n) = req.field("content-length") {
        let mut body = vec![0; n.parse().ok()?];
        r.read_exact(&mut body).ok()?;
        req.body = body;
    }
    Some(req)
}

fn ok(body: &str) -> Reply {
    Reply::Bytes(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-backend: raw\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

fn http1_pool(addr: SocketAddr) -> String {
    format!(
        "  main:\n    route:\n      path_prefix: \"/\"\n    backends:\n      - id: raw\n        address: \"{addr}\"\n        protocol: http1\n"
    )
}

fn raw_proxy(server: &RawServer) -> Proxy {
    proxy(&http1_pool(server.addr), "quic:\n  retry: off\n", 2)
}

#[test]
fn requests_reuse_one_kept_alive_connection_in_origin_form_with_host() {
    let server = RawServer::start(|_, _| ok("hello"));
    let p = raw_proxy(&server);
    let mut c = client(p.addr);
    for i in 0..20 {
        let r = c
            .request(&Request::get("app.example", &format!("/a/{i}?q=1")), T)
            .unwrap();
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.body, b"hello");
        assert_eq!(r.header("x-backend"), Some("raw"));
    }
    // One client connection lives on one worker: its sequential requests share one
    // backend connection.
    assert_eq!(
        server.accepted(),
        1,
        "keep-alive: one connection for 20 requests"
    );
    let seen = server.seen();
    assert_eq!(seen[3].line, "GET /a/3?q=1 HTTP/1.1");
    assert_eq!(seen[3].field("host"), Some("app.example"));
    assert!(seen[3].field("x-forwarded-for").is_some(), "{:?}", seen[3]);
    assert!(
        seen[3].field("transfer-encoding").is_none() && seen[3].field("content-length").is_none(),
        "a GET without body has no body framing: {:?}",
        seen[3]
    );
}

#[test]
fn bodies_stream_both_ways_chunked_with_trailers() {
    let server = RawServer::start(|req, _| {
        // Echo the request body back, chunked, with a trailer.
        let mut out =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n".to_vec();
        for piece in req.body.chunks(1000) {
            out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            out.extend_from_slice(piece);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("0\r\nx-sum: {}\r\n\r\n", req.body.len()).as_bytes());
        Reply::Bytes(out)
    });
    let p = raw_proxy(&server);
    let mut c = client(p.addr);
    let body = pattern(300_000);
    // No content-length from the client: the backend gets it chunked, with the declared
    // trailer.
    let r = c
        .request(
            &Request::new("POST", "localhost", "/echo")
                .header("trailer", "x-client")
                .body(body.clone())
                .trailer("x-client", "done"),
            T,
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), body.len());
    assert!(r.body == body, "echoed body differs");
    assert_eq!(
        r.trailers,
        vec![("x-sum".to_owned(), body.len().to_string())],
        "the chunked response's trailer arrives as an HTTP/3 trailer"
    );
    let seen = server.seen();
    assert!(
        seen[0].chunked,
        "unknown length goes chunked: {:?}",
        seen[0].fields
    );
    assert_eq!(seen[0].trailers, vec![("x-client".into(), "done".into())]);
    // With a length, the length is sent.
    let r = c
        .request(
            &Request::new("PUT", "localhost", "/echo")
                .header("content-length", "5")
                .body(&b"12345"[..]),
            T,
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"12345");
    let seen = server.seen();
    assert_eq!(seen[1].field("content-length"), Some("5"));
    assert!(!seen[1].chunked);
}

#[test]
fn head_204_304_and_interim_responses_are_framed_right() {
    let server = RawServer::start(|req, _| {
        let path = req.line.split(' ').nth(1).unwrap_or("");
        Reply::Bytes(match path {
            // A HEAD answer carries the length of the body it does not send.
            "/head" => b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n".to_vec(),
            "/204" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            "/304" => b"HTTP/1.1 304 Not Modified\r\netag: \"x\"\r\n\r\n".to_vec(),
            // 100 Continue, then the answer; hop-by-hop fields go, with those `connection`
            // names.
            _ => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive, x-hop\r\nkeep-alive: timeout=5\r\nx-hop: 1\r\nx-end: 2\r\n\r\nok".to_vec(),
        })
    });
    let p = raw_proxy(&server);
    let mut c = client(p.addr);
    let r = c
        .request(&Request::new("HEAD", "localhost", "/head"), T)
        .unwrap();
    assert_eq!((r.status, r.body.len()), (200, 0));
    assert_eq!(r.header("content-length"), Some("1000"));
    let r = c.request(&Request::get("localhost", "/204"), T).unwrap();
    assert_eq!((r.status, r.body.len()), (204, 0));
    let r = c.request(&Request::get("localhost", "/304"), T).unwrap();
    assert_eq!((r.status, r.body.len()), (304, 0));
    let r = c
        .request(
            &Request::new("POST", "localhost", "/cont")
                .header("expect", "100-continue")
                .header("content-length", "3")
                .body(&b"abc"[..]),
            T,
        )
        .unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
    for hop in ["connection", "keep-alive", "x-hop"] {
        assert!(r.header(hop).is_none(), "{hop} passed: {:?}", r.headers);
    }
    assert_eq!(r.header("x-end"), Some("2"));
    // Every answer left the connection usable.
    assert_eq!(server.accepted(), 1);
}

#[test]
fn a_kept_alive_connection_closed_under_a_request_is_retried_only_when_idempotent() {
    // Each connection answers its first request and closes under the second, as a backend
    // whose keep-alive timeout fires just as the request arrives.
    let server = RawServer::start(|_, index| {
        if index == 0 {
            ok("fresh")
        } else {
            Reply::Close
        }
    });
    let p = raw_proxy(&server);
    let mut c = client(p.addr);
    assert_eq!(
        c.request(&Request::get("localhost", "/1"), T)
            .unwrap()
            .status,
        200
    );
    let r = c.request(&Request::get("localhost", "/2"), T).unwrap();
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"fresh"[..]),
        "GET retried on a new connection"
    );
    assert_eq!(server.accepted(), 2);
    // POST on the kept connection: not idempotent, so not sent twice.
    let r = c
        .request(
            &Request::new("POST", "localhost", "/3")
                .header("content-length", "1")
                .body(&b"x"[..]),
            T,
        )
        .unwrap();
    assert_eq!(
        r.status, 502,
        "a POST that may have been processed is not replayed"
    );
    assert_eq!(
        server
            .seen()
            .iter()
            .filter(|s| s.line.starts_with("POST"))
            .count(),
        1,
        "the POST reached the backend once"
    );
    // The proxy goes on.
    assert_eq!(
        c.request(&Request::get("localhost", "/4"), T)
            .unwrap()
            .status,
        200
    );
}

#[test]
fn response_smuggling_shapes_get_502_and_the_proxy_goes_on() {
    let server = RawServer::start(|req, _| {
        let path = req.line.split(' ').nth(1).unwrap_or("");
        Reply::Bytes(match path {
            "/bare-lf" => b"HTTP/1.1 200 OK\ncontent-length: 2\n\nok".to_vec(),
            "/cl-te" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_vec(),
            "/two-lengths" => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nokk".to_vec(),
            "/bad-chunk" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n".to_vec(),
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        })
    });
    let p = raw_proxy(&server);
    let mut c = client(p.addr);
    for path in ["/bare-lf", "/cl-te", "/two-lengths"] {
        let r = c.request(&Request::get("localhost", path), T).unwrap();
        assert_eq!(
            r.status,
            502,
            "{path}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(
            c.request(&Request::get("localhost", "/fine"), T)
                .unwrap()
                .status,
            200
        );
    }
    // A broken chunk after the head: the head went out, so the stream is reset instead.
    let r = c
        .request(&Request::get("localhost", "/bad-chunk"), T)
        .unwrap();
    assert!(r.reset.is_some() || r.status == 502, "{r:?}");
    assert!(
        r.body.is_empty() || r.reset.is_some(),
        "no body from a broken chunk: {r:?}"
    );
    assert_eq!(
        c.request(&Request::get("localhost", "/fine"), T)
            .unwrap()
            .status,
        200
    );
}

#[test]
fn health_checks_speak_http1() {
    // The probe path fails: the backend must turn unhealthy through HTTP/1.1 probes alone.
    let server = RawServer::start(|req, _| {
        if req.line.starts_with("GET /healthz ") {
            Reply::Bytes(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n".to_vec())
        } else {
            ok("app")
        }
    });
    let pool = format!(
        "{}        health_check:\n          path: /healthz\n          interval: 100ms\n          timeout: 90ms\n          unhealthy_threshold: 2\n",
        http1_pool(server.addr)
    );
    let p = proxy(&pool, "quic:\n  retry: off\n", 2);
    wait_until("the backend unhealthy", T, || {
        backend_state(&p, "raw") == Some(1)
    });
    let probe = server
        .seen()
        .into_iter()
        .find(|s| s.line.starts_with("GET /healthz "))
        .unwrap();
    assert_eq!(probe.line, "GET /healthz HTTP/1.1");
    assert!(probe.field("host").is_some(), "{probe:?}");
    // Probes reuse their connection too.
    assert!(server.accepted() <= 2, "{} connections", server.accepted());
}

// ---------------------------------------------------------------------------------------------
// Backends named by DNS, against a dnsmasq the test runs on loopback

/// dnsmasq on 127.0.0.1:`port` answering from the hosts file `hosts` only, with a 1 s TTL;
/// it reads the file again on SIGHUP. Stopped by its PID when dropped.
struct Dnsmasq(std::process::Child);

impl Dnsmasq {
    fn start(port: u16, hosts: &std::path::Path) -> Self {
        Self(dnsmasq(
            port,
            &[
                "--local-ttl=1".into(),
                format!("--addn-hosts={}", hosts.display()),
            ],
        ))
    }

    /// Has it read its hosts file again.
    fn reread(&self) {
        // SAFETY: a signal to the child we started, by its PID.
        let rc = unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGHUP) };
        assert_eq!(rc, 0, "SIGHUP to dnsmasq");
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A backend on 127.0.0.2 and one on 127.0.0.3, on the same port (the name's port).
fn two_addresses() -> (Backend, Backend) {
    for _ in 0..20 {
        let a = backend_at("127.0.0.2:0".parse().unwrap(), demo("a"));
        let b_addr = SocketAddr::from(([127, 0, 0, 3], a.addr.port()));
        if let Ok(server) = spooky_peers::demo::spawn(b_addr, demo("b")) {
            let b = Backend {
                id: "b".into(),
                addr: server.addr,
                stats: server.stats.clone(),
                server,
            };
            return (a, b);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

fn demo(id: &str) -> spooky_peers::demo::DemoOptions {
    spooky_peers::demo::DemoOptions {
        id: id.into(),
        goaway_every: None,
    }
}

#[test]
fn a_backend_named_by_dns_follows_its_address_under_load_without_a_failed_request() {
    let (a, b) = two_addresses();
    let port = a.addr.port();
    let dir = Scratch::new("dns");
    let hosts = dir.0.join("hosts");
    std::fs::write(&hosts, "127.0.0.2 app.spooky.test\n").unwrap();
    let dns_port = free_udp_port();
    let dns = Dnsmasq::start(dns_port, &hosts);
    let upstreams = format!(
        "  main:\n    route:\n      path_prefix: \"/\"\n    backends:\n      - id: app\n        address: \"app.spooky.test:{port}\"\n"
    );
    let extra = format!(
        "quic:\n  retry: off\nresolver:\n  nameservers: [\"127.0.0.1:{dns_port}\"]\n  min_ttl: 1s\n  max_ttl: 2s\n"
    );
    // dnsmasq may take a moment to listen: the first lookup is at start.
    let mut p = None;
    for _ in 0..50 {
        let candidate = proxy(&upstreams, &extra, 2);
        if backend_state(&candidate, "app@127.0.0.2").is_some() {
            p = Some(candidate);
            break;
        }
        drop(candidate);
        std::thread::sleep(Duration::from_millis(100));
    }
    let p = p.expect("the name resolved at start");
    let metrics = || p.running.as_ref().unwrap().metrics_text();

    // Load: requests back to back from two clients for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let done = Arc::new(AtomicU64::new(0));
    let loaders: Vec<_> = (0..2)
        .map(|_| {
            let (stop, failures, done, addr) =
                (stop.clone(), failures.clone(), done.clone(), p.addr);
            std::thread::spawn(move || {
                let mut c = client(addr);
                while !stop.load(Ordering::Relaxed) {
                    match c.request(&Request::get("localhost", "/"), T) {
                        Ok(r) if r.status == 200 => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => failures
                            .lock()
                            .unwrap()
                            .push(format!("status {}", r.status)),
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                }
            })
        })
        .collect();
    wait_until("A serving", T, || a.served() > 20);
    assert_eq!(b.served(), 0);

    // The name moves from A to B.
    std::fs::write(&hosts, "127.0.0.3 app.spooky.test\n").unwrap();
    dns.reread();
    let moved = std::time::Instant::now();
    wait_until("B serving", Duration::from_secs(5), || b.served() > 20);
    let took = moved.elapsed();
    // A is drained: no new requests once the change is in force.
    let a_after = a.served();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(a.served(), a_after, "A still gets new requests");
    assert!(
        backend_state(&p, "app@127.0.0.2").is_none()
            && backend_state(&p, "app@127.0.0.3").is_some(),
        "{:?}",
        backend_states(&p)
    );
    assert!(metric_sum(&metrics(), "spooky_dns_changes_total") >= 1.0);

    // The name server goes away: lookups fail, the last good address stays in force.
    drop(dns);
    let failed_before = metric_sum(&metrics(), "spooky_dns_lookup_failures_total");
    wait_until("a failed lookup", Duration::from_secs(10), || {
        metric_sum(&metrics(), "spooky_dns_lookup_failures_total") > failed_before
    });
    let b_before = b.served();
    wait_until("B still serving", T, || b.served() > b_before + 20);

    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        done.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    eprintln!(
        "moved after {took:?}; {} requests, none failed",
        done.load(Ordering::Relaxed)
    );
}

#[test]
fn spooky_check_needs_no_dns() {
    let dir = Scratch::new("check-dns");
    let certs = certs_dir();
    let path = dir.0.join("spooky.yaml");
    // The name server is one nobody answers at; the name does not exist anywhere.
    let yaml = format!(
        "version: 1\nlisten:\n  port: 9889\n  tls: {{cert: \"{}\", key: \"{}\"}}\nresolver:\n  nameservers: [\"127.0.0.1:9\"]\nupstream:\n  web:\n    backends:\n      - {{id: w1, address: \"app.does-not-exist.invalid:8080\", protocol: http1}}\n",
        certs.join("spooky.crt").display(),
        certs.join("spooky.key").display()
    );
    std::fs::write(&path, yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spooky"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("backend host app.does-not-exist.invalid: resolved when Spooky runs"),
        "{stdout}"
    );
    assert!(stdout.contains("1 backends"), "{stdout}");
}

/// One HTTP/1.1 request to the admin listener: status and body.
pub(crate) fn admin(p: &Proxy, method: &str, path: &str) -> (u16, String) {
    let addr = p.running.as_ref().unwrap().admin_addr.unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

#[test]
fn the_admin_api_drains_and_undrains_one_backend() {
    let (b1, b2) = (backend("b1"), backend("b2"));
    let p = proxy(
        &pool(
            "main",
            "/",
            None,
            "round-robin",
            &[("b1", b1.addr), ("b2", b2.addr)],
            "",
        ),
        "quic:\n  retry: off\n",
        2,
    );
    let mut c = client(p.addr);
    let mut get = || {
        c.request(&Request::get("localhost", "/"), T)
            .unwrap()
            .status
    };
    for _ in 0..4 {
        assert_eq!(get(), 200);
    }
    assert!(b1.served() > 0 && b2.served() > 0);
    let (status, body) = admin(&p, "POST", "/backends/main/b1/drain");
    assert_eq!((status, body.as_str()), (200, "main/b1: drained\n"));
    let before = b1.served();
    for _ in 0..10 {
        assert_eq!(get(), 200);
    }
    assert_eq!(
        b1.served(),
        before,
        "a drained backend gets no new requests"
    );
    let text = p.running.as_ref().unwrap().metrics_text();
    assert!(
        text.contains("spooky_backend_drained{pool=\"main\",backend=\"b1\"} 1"),
        "{text}"
    );
    assert!(text.contains("spooky_backend_up{pool=\"main\",backend=\"b1\"} 0"));
    let (_, status_json) = admin(&p, "GET", "/status");
    let v: serde_json::Value = serde_json::from_str(&status_json).unwrap();
    let b = &v["pools"][0]["backends"][0];
    assert_eq!(
        (b["id"].as_str(), b["drained"].as_bool()),
        (Some("b1"), Some(true)),
        "{v}"
    );
    // Undrained, it takes requests again.
    assert_eq!(admin(&p, "POST", "/backends/main/b1/undrain").0, 200);
    for _ in 0..4 {
        assert_eq!(get(), 200);
    }
    assert!(b1.served() > before);
    assert_eq!(admin(&p, "POST", "/backends/main/nope/drain").0, 404);
    assert_eq!(admin(&p, "GET", "/backends/main/b1/drain").0, 405);
}
