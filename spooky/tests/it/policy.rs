//! Edge policy and what an on-call engineer reads: per-route access lists, rate limits,
//! header and concurrency limits, request deadlines, the TCP listener's per-address limits,
//! request ids, the access log's formats and its rotation by logrotate, readiness per pool,
//! and /metrics as Prometheus's own `promtool` reads it.

use crate::support::*;
use crate::upstreams::admin;
use spooky_peers::client::Request;
use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

fn metrics(p: &Proxy) -> String {
    p.running.as_ref().unwrap().metrics_text()
}

/// The value of the metric line that starts with `series` (its full name and labels).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn routes_refuse_by_their_own_policy_and_count_it_by_code_and_reason() {
    let b = backend("b1");
    let ups = [
        pool(
            "open",
            "/open",
            None,
            "round-robin",
            &[("open1", b.addr)],
            "access: {allow: [127.0.0.1/32]}",
        ),
        pool(
            "closed",
            "/closed",
            None,
            "round-robin",
            &[("closed1", b.addr)],
            "access: {allow: [\"::1\"], deny: [127.0.0.0/8]}",
        ),
        pool(
            "limited",
            "/limited",
            None,
            "round-robin",
            &[("limited1", b.addr)],
            "rate_limit: {requests_per_second: 0.5, burst: 3}",
        ),
        pool(
            "keyed",
            "/keyed",
            None,
            "round-robin",
            &[("keyed1", b.addr)],
            "rate_limit: {requests_per_second: 0.5, burst: 1, key: \"header:x-api-key\"}",
        ),
        pool(
            "small",
            "/small",
            None,
            "round-robin",
            &[("small1", b.addr)],
            "max_request_headers: 300",
        ),
    ]
    .concat();
    let p = proxy(&ups, "quic:\n  retry: off\n", 2);
    let mut c = client(p.addr);
    let mut get = |path: &str, headers: &[(&str, &str)]| {
        let mut r = Request::get("localhost", path);
        for (n, v) in headers {
            r = r.header(n, v);
        }
        c.request(&r, T).unwrap()
    };
    assert_eq!(get("/open", &[]).status, 200);
    let r = get("/closed", &[]);
    assert_eq!(
        (r.status, String::from_utf8_lossy(&r.body).trim()),
        (403, "forbidden")
    );
    // A burst of 3, then 429 with retry-after (0.5/s: the next one in 2 s).
    let statuses: Vec<u16> = (0..5).map(|_| get("/limited", &[]).status).collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    let r = get("/limited", &[]);
    assert_eq!(r.status, 429);
    let retry: u64 = r
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "retry-after {retry}");
    // Keyed by a header: each key has its own budget.
    assert_eq!(get("/keyed", &[("x-api-key", "k1")]).status, 200);
    assert_eq!(get("/keyed", &[("x-api-key", "k1")]).status, 429);
    assert_eq!(get("/keyed", &[("x-api-key", "k2")]).status, 200);
    // The route's header limit, below the proxy's.
    assert_eq!(get("/small", &[]).status, 200);
    assert_eq!(get("/small", &[("x-big", &"a".repeat(400))]).status, 431);

    // The same policy over TCP (HTTP/2), from curl; the limited route's budget is spent.
    require_command("curl", "curl");
    let tcp = p.running.as_ref().unwrap().tcp_addr.unwrap().port();
    let (status, head, _) = curl(tcp, "/closed");
    assert_eq!(status, 403, "{head}");
    let (status, head, _) = curl(tcp, "/limited");
    assert_eq!(status, 429, "{head}");
    assert!(head.contains("retry-after: "), "{head}");
    assert!(
        head.contains("x-request-id: "),
        "Spooky's own answers carry the id: {head}"
    );

    let text = metrics(&p);
    let refusals = |pool: &str, reason: &str| {
        metric(
            &text,
            &format!("spooky_route_refusals_total{{pool=\"{pool}\",reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(refusals("closed", "access"), Some(2.0), "{text}");
    assert_eq!(refusals("limited", "rate_limit"), Some(4.0));
    assert_eq!(refusals("keyed", "rate_limit"), Some(1.0));
    assert_eq!(refusals("small", "max_request_headers"), Some(1.0));
    assert_eq!(refusals("open", "access"), Some(0.0));
    let code = |pool: &str, backend: &str, code: u16| {
        metric(
            &text,
            &format!(
                "spooky_responses_total{{pool=\"{pool}\",backend=\"{backend}\",code=\"{code}\"}}"
            ),
        )
    };
    assert_eq!(code("limited", "", 429), Some(4.0));
    assert_eq!(code("limited", "limited1", 200), Some(3.0));
    assert_eq!(code("closed", "", 403), Some(2.0));
    assert_eq!(code("small", "", 431), Some(1.0));
}

#[test]
fn a_backend_limit_gives_503_and_a_request_deadline_504() {
    let b = backend("b1");
    // Each route strips its prefix, so /one/delay/MS is the backend's /delay/MS.
    let route = |name: &str, extra: &str| {
        pool(
            name,
            &format!("/{name}/"),
            None,
            "round-robin",
            &[(&format!("{name}1"), b.addr)],
            extra,
        )
        .replace(
            &format!("      path_prefix: \"/{name}/\"\n"),
            &format!("      path_prefix: \"/{name}/\"\n      rewrite_prefix: \"/\"\n"),
        )
    };
    let ups =
        route("one", "max_requests_per_backend: 1") + &route("quick", "timeouts: {request: 300ms}");
    let p = proxy(&ups, "quic:\n  retry: off\n", 2);
    // One slow request holds the backend's only place.
    let addr = p.addr;
    let slow = std::thread::spawn(move || {
        let mut c = client(addr);
        c.request(&Request::get("localhost", "/one/delay/1500"), T)
            .unwrap()
            .status
    });
    wait_for_backend_streams(&b, 1);
    let mut c = client(p.addr);
    let r = c.request(&Request::get("localhost", "/one/"), T).unwrap();
    assert_eq!((r.status, r.header("retry-after")), (503, Some("1")));
    assert_eq!(slow.join().unwrap(), 200, "the request in flight finishes");
    assert_eq!(
        c.request(&Request::get("localhost", "/one/"), T)
            .unwrap()
            .status,
        200
    );
    // The deadline: a 2 s answer is cut at 300 ms with 504.
    let started = Instant::now();
    let r = c
        .request(&Request::get("localhost", "/quick/delay/2000"), T)
        .unwrap();
    assert_eq!(r.status, 504);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        c.request(&Request::get("localhost", "/quick/"), T)
            .unwrap()
            .status,
        200
    );
    let text = metrics(&p);
    let refusals = |pool: &str, reason: &str| {
        metric(
            &text,
            &format!("spooky_route_refusals_total{{pool=\"{pool}\",reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(
        refusals("one", "max_requests_per_backend"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(refusals("quick", "request_timeout"), Some(1.0));
}

#[test]
fn the_tcp_listener_limits_connections_per_address() {
    let b = backend("b1");
    // The limit is in `listen.tcp`, which the test config writes: add it there.
    let port = free_udp_port();
    let yaml = config_yaml(
        port,
        &pool("main", "/", None, "round-robin", &[("b1", b.addr)], ""),
        "",
    )
    .replace(
        "  tcp:\n    port: 0\n",
        "  tcp:\n    port: 0\n    max_connections_per_ip: 2\n",
    );
    let config = spooky::config::parse(&yaml, &repo_root()).unwrap();
    let p = proxy_from(config);
    let tcp = p.running.as_ref().unwrap().tcp_addr.unwrap();
    let open = |n: usize| -> Vec<TcpStream> {
        (0..n)
            .map(|_| {
                let s = TcpStream::connect(tcp).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(700)))
                    .unwrap();
                s
            })
            .collect()
    };
    // Closed at once (EOF or reset) versus held open (the read times out).
    let closed = |s: &mut TcpStream| {
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => true,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            other => panic!("unexpected read: {other:?}"),
        }
    };
    // Three from one address: one is closed at once (which one depends on which worker
    // accepts first), two stay open.
    let mut three = open(3);
    let verdicts: Vec<bool> = three.iter_mut().map(closed).collect();
    assert_eq!(verdicts.iter().filter(|c| **c).count(), 1, "{verdicts:?}");
    let held: Vec<TcpStream> = three
        .into_iter()
        .zip(&verdicts)
        .filter(|(_, c)| !**c)
        .map(|(s, _)| s)
        .collect();
    let mut fourth = open(1);
    assert!(closed(&mut fourth[0]), "the address still has two open");
    let refused = p.stats_sum(|s| {
        s.tcp_refused_per_ip
            .load(std::sync::atomic::Ordering::Relaxed)
    });
    assert_eq!(refused, 2);
    drop(held);
    // Their places come back when they close.
    wait_until("places given back", T, || {
        let mut s = open(1);
        !closed(&mut s[0])
    });
}

#[test]
fn readiness_follows_the_pools_policy() {
    let (b1, b2) = (backend("b1"), backend("b2"));
    let ups = [
        pool(
            "core",
            "/core",
            None,
            "round-robin",
            &[("c1", b1.addr)],
            "readiness: required",
        ),
        pool(
            "extra",
            "/extra",
            None,
            "round-robin",
            &[("e1", b2.addr)],
            "",
        ),
    ]
    .concat();
    let p = proxy(&ups, "quic:\n  retry: off\n", 1);
    assert_eq!(admin(&p, "GET", "/readyz"), (200, "ready\n".to_owned()));
    // An optional pool without a backend: still ready, and said.
    admin(&p, "POST", "/backends/extra/e1/drain");
    assert_eq!(
        admin(&p, "GET", "/readyz"),
        (200, "ready; no healthy backend in: extra\n".to_owned())
    );
    // A required one: not ready.
    admin(&p, "POST", "/backends/core/c1/drain");
    admin(&p, "POST", "/backends/extra/e1/undrain");
    assert_eq!(
        admin(&p, "GET", "/readyz"),
        (
            503,
            "no healthy backend in required pool(s): core\n".to_owned()
        )
    );
    admin(&p, "POST", "/backends/core/c1/undrain");
    assert_eq!(admin(&p, "GET", "/readyz").0, 200);
}

#[test]
fn metrics_pass_promtool_and_removed_pools_leave_them() {
    require_command("promtool", "prometheus");
    let b = backend("b1");
    let dir = Scratch::new("promtool");
    let port = free_udp_port();
    let ups = |names: &[&str]| {
        names
            .iter()
            .map(|n| {
                pool(
                    n,
                    &format!("/{n}"),
                    None,
                    "round-robin",
                    &[(&format!("{n}1"), b.addr)],
                    "rate_limit: {requests_per_second: 100}",
                )
            })
            .collect::<String>()
    };
    let path = dir.0.join("spooky.yaml");
    let first = config_yaml(port, &ups(&["a", "gone"]), "quic:\n  retry: off\n");
    std::fs::write(&path, &first).unwrap();
    let running = start_file(&path, 2);
    let p = Proxy {
        addr: running.local_addr,
        running: Some(running),
    };
    let mut c = client(p.addr);
    for path in ["/a", "/gone", "/nowhere"] {
        c.request(&Request::get("localhost", path), T).unwrap();
    }
    let text = metrics(&p);
    let check = |text: &str| {
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, said) = check(&text);
    assert!(
        ok && said.trim().is_empty(),
        "promtool check metrics: {said}"
    );
    // And it would say so: a counter without _total is a lint problem.
    let (ok, said) = check("# HELP x_requests requests\n# TYPE x_requests counter\nx_requests 1\n");
    assert!(!ok && said.contains("_total"), "{said}");
    assert!(text.contains("pool=\"gone\""));
    std::fs::write(&path, first.replace(&ups(&["a", "gone"]), &ups(&["a"]))).unwrap();
    p.running.as_ref().unwrap().reloader().reload().unwrap();
    let text = metrics(&p);
    assert!(
        !text.contains("pool=\"gone\""),
        "a removed pool's series are gone:\n{text}"
    );
    assert!(
        text.contains("spooky_responses_total{pool=\"a\",backend=\"a1\",code=\"200\"} 1"),
        "{text}"
    );
}

/// curl over TLS over TCP to Spooky's `port` (as `localhost`), with a user-agent and a
/// referer: (status, response head, body).
fn curl(port: u16, path: &str) -> (u16, String, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "5", "-D", "-", "--cacert"])
        .arg(certs_dir().join("ca.crt"))
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["-A", "agent/1.0", "-e", "https://ref.example/page"])
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

#[test]
fn request_ids_and_the_combined_access_log_survive_a_logrotate() {
    require_command("logrotate", "logrotate");
    require_command("curl", "curl");
    let b = backend("b1");
    let dir = Scratch::new("logrotate");
    let log = dir.0.join("access.log");
    let port = free_udp_port();
    let yaml = config_yaml(
        port,
        &pool("main", "/", None, "round-robin", &[("b1", b.addr)], ""),
        &format!(
            "log:\n  access: {}\n  access_format: combined\n",
            log.display()
        ),
    )
    .replace("  tcp:\n    port: 0\n", "");
    let cfg = dir.0.join("spooky.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let mut child = spawn_spooky(&cfg, 1);
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = child.id();
    let _kill = Kill(&mut child);
    wait_until("spooky serves over TCP", T, || curl(port, "/").0 == 200);
    let lines = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // The id: made by Spooky, seen by the backend, returned to the client, logged.
    let (status, head, body) = curl(port, "/headers");
    assert_eq!(status, 200, "{head}");
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("x-request-id in the response")
        .trim()
        .to_owned();
    assert_eq!(id.len(), 36, "{id}");
    assert!(
        body.contains(&format!("x-request-id: {id}")),
        "the backend saw it: {body}"
    );
    wait_until("the lines are written", T, || lines(&log).len() >= 2);
    let before = lines(&log);
    let last = before.last().unwrap();
    assert!(last.starts_with("127.0.0.1 - - ["), "{last}");
    assert!(
        last.contains("] \"GET /headers HTTP/2.0\" 200 ")
            && last.ends_with(" \"https://ref.example/page\" \"agent/1.0\""),
        "a combined line: {last}"
    );
    // logrotate moves the file and sends SIGUSR1; Spooky writes on in a new one.
    let conf = dir.0.join("logrotate.conf");
    std::fs::write(
        &conf,
        format!(
            "{} {{\n  rotate 2\n  missingok\n  nocompress\n  postrotate\n    kill -USR1 {pid}\n  endscript\n}}\n",
            log.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new("logrotate")
        .arg("-f")
        .arg("-s")
        .arg(dir.0.join("logrotate.state"))
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "logrotate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rotated = dir.0.join("access.log.1");
    assert_eq!(lines(&rotated), before, "the old lines moved with the file");
    assert_eq!(curl(port, "/size/10").0, 200);
    wait_until("a line in the new file", T, || {
        lines(&log)
            .iter()
            .any(|l| l.contains("\"GET /size/10 HTTP/2.0\" 200 10 "))
    });
    assert_eq!(lines(&rotated), before, "nothing more went to the old file");
}
