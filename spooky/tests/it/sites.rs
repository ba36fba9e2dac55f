//! Many sites on one edge: the certificate is chosen by the SNI of each ClientHello, on the
//! QUIC listener (BoringSSL through quiche) and the TCP one (rustls) alike, seen by clients
//! nobody on the team wrote — Debian's `curl` over TCP (`--resolve` per name) and aioquic over
//! QUIC (`server_name` per name) — and by the in-tree client; each verifies the certificate
//! against the name it asked for, so a wrong certificate fails the handshake.
//!
//! Site A has an ECDSA certificate for `a.example`; site B an RSA one for `b.example` and
//! `*.b.example`.

use crate::support::*;
use serde_json::Value;
use spooky::config::{CertPair, Config, ListenTls, UnknownSni};
use spooky_peers::certs::{issue_for, SiteCert};
use spooky_peers::client::{Client, ClientOptions, Request};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

/// Two sites' certificates from the demo CA, in a scratch directory.
pub struct Sites {
    pub dir: Scratch,
    a: CertPair,
    b: CertPair,
}

pub fn sites() -> Sites {
    let dir = Scratch::new("sites");
    for f in ["ca.crt", "ca.key"] {
        std::fs::copy(certs_dir().join(f), dir.0.join(f)).unwrap();
    }
    let ecdsa = SiteCert {
        names: &["a.example"],
        key_pem: None,
        valid_days: Some(60),
    };
    issue_for(&dir.0, "a", "site a (ECDSA)", &ecdsa).unwrap();
    let rsa = boring::pkey::PKey::from_rsa(boring::rsa::Rsa::generate(2048).unwrap()).unwrap();
    let rsa = String::from_utf8(rsa.private_key_to_pem_pkcs8().unwrap()).unwrap();
    let rsa = SiteCert {
        names: &["b.example", "*.b.example"],
        key_pem: Some(&rsa),
        valid_days: Some(90),
    };
    issue_for(&dir.0, "b", "site b (RSA)", &rsa).unwrap();
    let pair = |n: &str| CertPair {
        cert: dir.0.join(format!("{n}.crt")),
        key: dir.0.join(format!("{n}.key")),
    };
    Sites {
        a: pair("a"),
        b: pair("b"),
        dir,
    }
}

impl Sites {
    pub fn ca(&self) -> PathBuf {
        self.dir.0.join("ca.crt")
    }

    fn tls(&self, unknown_sni: UnknownSni) -> ListenTls {
        ListenTls {
            certificates: vec![self.a.clone(), self.b.clone()],
            unknown_sni,
        }
    }
}

/// A pool per site: `a.example` → backend `ba`, `*.b.example` → backend `bb`.
pub fn config(s: &Sites, ba: &Backend, bb: &Backend, unknown_sni: UnknownSni) -> Config {
    let upstreams = pool(
        "a",
        "/",
        Some("a.example"),
        "round-robin",
        &[("ba", ba.addr)],
        "",
    ) + &pool(
        "b",
        "/",
        Some("*.b.example"),
        "round-robin",
        &[("bb", bb.addr)],
        "",
    );
    let yaml = config_yaml(free_udp_port(), &upstreams, "quic:\n  retry: off\n");
    let mut c = spooky::config::parse(&yaml, &repo_root()).unwrap();
    c.listen.tls = s.tls(unknown_sni);
    c.workers = Some(2);
    c
}

fn tcp_addr(p: &Proxy) -> SocketAddr {
    p.running.as_ref().and_then(|r| r.tcp_addr).unwrap()
}

/// curl over TCP to `https://NAME:PORT/PATH` with NAME resolved to the proxy, verified with
/// `ca` (or not: `-k` in `extra`), `-v` so that the certificate's subject shows.
fn curl(addr: SocketAddr, name: &str, path: &str, ca: &Path, extra: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "-v", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{name}:{}:127.0.0.1", addr.port())])
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(extra)
        .arg(format!("https://{name}:{}{path}", addr.port()))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("curl cannot be started ({e}): run cargo xtask setup"))
}

/// The body, status and HTTP version curl printed; the subject of the certificate it saw.
fn curled(out: &Output) -> (String, String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl failed: {stderr}");
    let (body, tail) = stdout.rsplit_once('\n').unwrap();
    let subject = stderr
        .lines()
        .find_map(|l| l.trim_start_matches(['*', ' ']).strip_prefix("subject: "))
        .unwrap_or_default()
        .to_owned();
    (body.to_owned(), tail.to_owned(), subject)
}

/// aioquic (`h3_client.py`) on one connection with SNI `server_name`, verified with `ca`:
/// the requests of `plan` (batches, see the script). The parsed JSON.
fn aioquic(addr: SocketAddr, ca: &Path, server_name: &str, plan: &Value) -> Value {
    require_python("aioquic", "aioquic 1.7.2");
    let out = Command::new("python3")
        .arg(peers_dir().join("h3_client.py"))
        .args(["--port", &addr.port().to_string(), "--ca"])
        .arg(ca)
        .args(["--server-name", server_name, "--authority", server_name])
        .args(["--timeout", "10", "--plan", &plan.to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "h3_client.py printed no result ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn in_tree(addr: SocketAddr, ca: Option<&Path>, server_name: &str) -> Result<Client, String> {
    let opts = ClientOptions {
        verify: ca.is_some(),
        ca: ca.map(Path::to_path_buf),
        server_name: server_name.into(),
        ..Default::default()
    };
    Client::connect(addr, &opts, T).map_err(|e| e.to_string())
}

fn metric_of(p: &Proxy, line_prefix: &str) -> f64 {
    metric_sum(&p.running.as_ref().unwrap().metrics_text(), line_prefix)
}

#[test]
fn each_name_gets_its_own_certificate_over_tcp_and_quic() {
    let s = sites();
    let (ba, bb) = (backend("ba"), backend("bb"));
    let p = proxy_from(config(&s, &ba, &bb, UnknownSni::Default));
    let tcp = tcp_addr(&p);

    // curl over TCP, HTTP/2 and HTTP/1.1.
    for (name, backend, subject) in [
        ("a.example", "ba", "CN=site a (ECDSA)"),
        ("x.b.example", "bb", "CN=site b (RSA)"),
    ] {
        for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
            let (body, tail, seen) = curled(&curl(tcp, name, "/hello", &s.ca(), &[flag]));
            eprintln!("curl {flag} {name}: {tail}, certificate {seen}");
            assert_eq!(tail, format!("200 {version}"), "{name} {flag}");
            assert_eq!(body, format!("hello from {backend}: GET /hello\n"));
            assert_eq!(seen, subject, "{name} {flag}");
        }
    }
    // `b.example` itself is on B's certificate too (no route for it: 404 from Spooky).
    let (_, tail, seen) = curled(&curl(tcp, "b.example", "/", &s.ca(), &[]));
    assert_eq!((tail.as_str(), seen.as_str()), ("404 2", "CN=site b (RSA)"));

    // aioquic over QUIC.
    for (name, backend) in [("a.example", "ba"), ("y.b.example", "bb")] {
        let v = aioquic(
            p.addr,
            &s.ca(),
            name,
            &serde_json::json!([[{"path": "/hello"}]]),
        );
        eprintln!("aioquic {name}: {}", v["responses"][0]["status"]);
        assert_eq!(v["error"], Value::Null, "{name}: {v}");
        assert_eq!(v["responses"][0]["status"], 200, "{name}: {v}");
        assert_eq!(
            v["responses"][0]["body"],
            format!("hello from {backend}: GET /hello\n"),
            "{v}"
        );
    }

    // The in-tree client, verifying each name; and a name whose certificate it does not
    // trust for that name fails (the check is real).
    for (name, backend) in [("a.example", "ba"), ("z.b.example", "bb")] {
        let mut c = in_tree(p.addr, Some(&s.ca()), name).unwrap();
        let r = c.request(&Request::get(name, "/hello"), T).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            format!("hello from {backend}: GET /hello\n").into_bytes()
        );
    }
    let wrong = in_tree(p.addr, Some(&s.ca()), "c.example");
    assert!(
        wrong.is_err(),
        "the default certificate does not name c.example"
    );

    // Counted per certificate.
    let a = metric_of(&p, "spooky_tls_handshakes_total{name=\"a.example\"}");
    let b = metric_of(&p, "spooky_tls_handshakes_total{name=\"b.example\"}");
    eprintln!("handshakes: a.example {a}, b.example {b}");
    assert!(a >= 4.0 && b >= 5.0, "a {a}, b {b}");
    let text = p.running.as_ref().unwrap().metrics_text();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    let expiry = metric_sum(
        &text,
        "spooky_tls_certificate_expiry_timestamp_seconds{name=\"a.example\"}",
    );
    let days = (expiry - now) / 86_400.0;
    assert!(
        (59.0..=61.0).contains(&days),
        "a.example expires in {days} days"
    );
}

/// A client that reuses its connection for a host another certificate names gets 421 (RFC
/// 9110 §15.5.20), over every protocol; the connection keeps serving its own host.
#[test]
fn a_host_of_another_certificate_is_misdirected() {
    let s = sites();
    let (ba, bb) = (backend("ba"), backend("bb"));
    let p = proxy_from(config(&s, &ba, &bb, UnknownSni::Default));
    let tcp = tcp_addr(&p);
    for flag in ["--http2", "--http1.1"] {
        let out = curl(
            tcp,
            "a.example",
            "/hello",
            &s.ca(),
            &[flag, "-H", "host: x.b.example"],
        );
        let (_, tail, _) = curled(&out);
        assert!(tail.starts_with("421 "), "{flag}: {tail}");
    }
    let plan = serde_json::json!([
        [{"path": "/hello", "authority": "x.b.example"}],
        [{"path": "/hello"}]
    ]);
    let v = aioquic(p.addr, &s.ca(), "a.example", &plan);
    assert_eq!(v["responses"][0]["status"], 421, "{v}");
    assert_eq!(v["responses"][1]["status"], 200, "{v}");
    assert_eq!(v["error"], Value::Null, "{v}");
    // Reached no backend.
    assert_eq!(
        metric_of(&p, "spooky_requests_total{pool=\"b\""),
        0.0,
        "pool b saw a misdirected request"
    );
}

/// `unknown_sni: default` gives clients without a known name the first certificate;
/// `refuse` (here by a reload) ends their handshakes, on both listeners, while known names
/// go on working; both are counted.
#[test]
fn unknown_names_get_the_default_or_nothing_and_a_reload_switches() {
    let s = sites();
    let (ba, bb) = (backend("ba"), backend("bb"));
    let p = proxy_from(config(&s, &ba, &bb, UnknownSni::Default));
    let tcp = tcp_addr(&p);
    // An unknown name, and no SNI at all (curl sends none to an IP address).
    let (_, _, seen) = curled(&curl(tcp, "c.example", "/", &s.ca(), &["-k"]));
    assert_eq!(seen, "CN=site a (ECDSA)");
    let out = Command::new("curl")
        .args(["-sS", "-v", "-k", "--max-time", "10"])
        .args(["-w", "\n%{http_code} %{http_version}"])
        .arg(format!("https://127.0.0.1:{}/", tcp.port()))
        .output()
        .unwrap();
    let (_, _, seen) = curled(&out);
    assert_eq!(seen, "CN=site a (ECDSA)", "no SNI");
    assert!(in_tree(p.addr, None, "c.example").is_ok());
    let unknown_before = metric_of(&p, "spooky_tls_unknown_sni_total");
    assert!(unknown_before >= 3.0, "{unknown_before}");

    let running = p.running.as_ref().unwrap();
    let mut next = running.reloader().current().config.clone();
    next.listen.tls.unknown_sni = UnknownSni::Refuse;
    running.reloader().apply(next).unwrap();

    let refused = curl(tcp, "c.example", "/", &s.ca(), &["-k"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    eprintln!("refused over TCP: {}", stderr.lines().last().unwrap_or(""));
    assert!(!refused.status.success());
    // rustls ends the handshake with `access_denied` (it has no way to send
    // `unrecognized_name`); BoringSSL, on QUIC, with `unrecognized_name`.
    assert!(stderr.contains("alert access denied"), "{stderr}");
    let quic = in_tree(p.addr, None, "c.example");
    eprintln!("refused over QUIC: {quic:?}", quic = quic.as_ref().err());
    assert!(quic.is_err(), "QUIC handshake without a known name");
    // Known names are unaffected.
    let (_, tail, _) = curled(&curl(tcp, "x.b.example", "/hello", &s.ca(), &[]));
    assert_eq!(tail, "200 2");
    let mut c = in_tree(p.addr, Some(&s.ca()), "a.example").unwrap();
    assert_eq!(
        c.request(&Request::get("a.example", "/"), T)
            .unwrap()
            .status,
        200
    );
    assert!(metric_of(&p, "spooky_tls_unknown_sni_total") >= unknown_before + 2.0);
}

/// A site's rules — prefix stripping, fields towards the backend and towards the client,
/// a redirect route — act alike over HTTP/3 (aioquic), HTTP/2 and HTTP/1.1 (curl).
#[test]
fn route_rules_act_alike_over_http3_http2_and_http1() {
    let s = sites();
    let ba = backend("ba");
    let upstreams = format!(
        "  api:
    route:
      host: a.example
      path_prefix: /api
      strip_prefix: true
    request_headers:
      set: {{x-site: a}}
      add: {{x-tag: edge}}
      remove: [x-debug]
    response_headers:
      set: {{strict-transport-security: max-age=63072000}}
      remove: [x-backend]
    backends:
      - {{id: ba, address: \"{}\"}}
  moved:
    route:
      host: a.example
      path_prefix: /old
    redirect:
      to: https://b.example/new
      status: 301
",
        ba.addr
    );
    let yaml = config_yaml(free_udp_port(), &upstreams, "quic:\n  retry: off\n");
    let mut c = spooky::config::parse(&yaml, &repo_root()).unwrap();
    c.listen.tls = s.tls(UnknownSni::Default);
    c.workers = Some(2);
    let p = proxy_from(c);
    let tcp = tcp_addr(&p);

    // What each protocol got: (status, response fields, body) for the three requests.
    type Got = (u16, Vec<(String, String)>, String);
    let mut seen: Vec<(String, Vec<Got>)> = Vec::new();
    let requests = ["/api/headers", "/api/hello?x=1", "/old/page?q=2"];
    for flag in ["--http2", "--http1.1"] {
        let mut got = Vec::new();
        for path in requests {
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "10", flag, "-D", "-", "--cacert"])
                .arg(s.ca())
                .args(["--resolve", &format!("a.example:{}:127.0.0.1", tcp.port())])
                .args(["-H", "x-debug: 1", "-H", "x-tag: client"])
                .arg(format!("https://a.example:{}{path}", tcp.port()))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
            let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
            let mut lines = head.lines();
            let status: u16 = lines
                .next()
                .unwrap()
                .split(' ')
                .nth(1)
                .unwrap()
                .parse()
                .unwrap();
            let fields = lines
                .filter_map(|l| l.split_once(": "))
                .map(|(n, v)| (n.to_ascii_lowercase(), v.to_owned()))
                .collect();
            got.push((status, fields, body.to_owned()));
        }
        seen.push((flag.to_owned(), got));
    }
    let plan = serde_json::json!([requests
        .iter()
        .map(|p| serde_json::json!({"path": p, "headers": [["x-debug", "1"], ["x-tag", "client"]]}))
        .collect::<Vec<_>>()]);
    let v = aioquic(p.addr, &s.ca(), "a.example", &plan);
    let h3 = v["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let fields = r["headers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    (
                        f[0].as_str().unwrap().to_owned(),
                        f[1].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            (
                r["status"].as_u64().unwrap() as u16,
                fields,
                r["body"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    seen.push(("h3".to_owned(), h3));

    let field = |f: &Vec<(String, String)>, n: &str| -> Vec<String> {
        f.iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .collect()
    };
    for (proto, got) in &seen {
        // The backend saw the stripped path and the changed fields.
        let (status, fields, body) = &got[0];
        eprintln!("{proto}: /api/headers {status}, backend saw:\n{body}");
        assert_eq!(*status, 200, "{proto}");
        assert!(body.contains("x-site: a\n"), "{proto}: {body}");
        assert!(
            body.contains("x-tag: client\n") && body.contains("x-tag: edge\n"),
            "{proto}: {body}"
        );
        assert!(!body.contains("x-debug"), "{proto}: {body}");
        assert_eq!(
            field(fields, "strict-transport-security"),
            ["max-age=63072000"],
            "{proto}"
        );
        assert!(field(fields, "x-backend").is_empty(), "{proto}: {fields:?}");
        let (status, _, body) = &got[1];
        assert_eq!(
            (*status, body.as_str()),
            (200, "hello from ba: GET /hello\n"),
            "{proto}"
        );
        // The redirect route.
        let (status, fields, _) = &got[2];
        assert_eq!(*status, 301, "{proto}");
        assert_eq!(
            field(fields, "location"),
            ["https://b.example/new/old/page?q=2"],
            "{proto}"
        );
    }
}

/// The plaintext listener redirects every request to `https://` on the TLS listener's port
/// (308 keeps the method and body); curl following the redirect ends at the backend.
#[test]
fn plaintext_requests_are_redirected_to_https() {
    let s = sites();
    let (ba, bb) = (backend("ba"), backend("bb"));
    let mut c = config(&s, &ba, &bb, UnknownSni::Default);
    c.listen.http = Some(spooky::config::PlainHttp {
        addr: "127.0.0.1:0".parse().unwrap(),
        redirect_status: 308,
    });
    let p = proxy_from(c);
    let tcp = tcp_addr(&p);
    let http = p
        .running
        .as_ref()
        .unwrap()
        .http_addr
        .expect("listen.http is on");
    let resolve = |name: &str| {
        [
            "--resolve".to_owned(),
            format!("{name}:{}:127.0.0.1", http.port()),
            "--resolve".to_owned(),
            format!("{name}:{}:127.0.0.1", tcp.port()),
        ]
    };
    // The redirect itself.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "/dev/null"])
        .args(["-w", "%{http_code} %{redirect_url}"])
        .args(resolve("a.example"))
        .arg(format!("http://a.example:{}/page?x=1", http.port()))
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    eprintln!("plaintext: {got}");
    assert_eq!(
        got,
        format!("308 https://a.example:{}/page?x=1", tcp.port())
    );
    // Followed, with a body: the POST arrives whole over HTTPS.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-L", "--cacert"])
        .arg(s.ca())
        .args(resolve("x.b.example"))
        .args(["--data-binary", "carried over"])
        .args(["-w", "\n%{http_code} %{num_redirects} %{scheme}"])
        .arg(format!("http://x.b.example:{}/echo", http.port()))
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(got, "carried over\n200 1 HTTPS", "{got}");
    // No host, no redirect.
    let mut raw = std::net::TcpStream::connect(http).unwrap();
    use std::io::{Read, Write};
    raw.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = raw.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.0 400") || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    // Nothing reached a backend in plaintext: the one request the backends saw was the
    // HTTPS one.
    assert_eq!(metric_of(&p, "spooky_requests_total{pool=\"a\""), 0.0);
}

/// `spooky check` lists each certificate with its names and days left, warns two weeks
/// before expiry, and refuses a key that is not its certificate's, naming both files.
#[test]
fn spooky_check_reports_certificates_and_refuses_a_foreign_key() {
    let s = sites();
    let soon = SiteCert {
        names: &["soon.example"],
        key_pem: None,
        valid_days: Some(10),
    };
    issue_for(&s.dir.0, "soon", "soon", &soon).unwrap();
    let write = |name: &str, soon_key: &str| {
        let path = s.dir.0.join(name);
        let yaml = format!(
            "version: 1\nlisten:\n  port: 9889\n  tls:\n    certificates:\n      \
             - {{cert: a.crt, key: a.key}}\n      - {{cert: b.crt, key: b.key}}\n      \
             - {{cert: soon.crt, key: {soon_key}}}\nupstream:\n  web:\n    backends:\n      \
             - {{id: w1, address: \"127.0.0.1:7001\"}}\n"
        );
        std::fs::write(&path, yaml).unwrap();
        path
    };
    let check = |path: &Path| {
        Command::new(env!("CARGO_BIN_EXE_spooky"))
            .args(["check", "--config"])
            .arg(path)
            .output()
            .unwrap()
    };
    let out = check(&write("good.yaml", "soon.key"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].contains("(a.example): key matches; expires in "),
        "{stdout}"
    );
    assert!(
        lines[1].contains("(b.example, *.b.example): key matches; expires in "),
        "{stdout}"
    );
    assert!(
        !lines[0].contains("WARNING") && !lines[1].contains("WARNING"),
        "{stdout}"
    );
    assert!(
        lines[2].contains("(soon.example): key matches; WARNING: expires in"),
        "{stdout}"
    );
    let out = check(&write("bad.yaml", "a.key"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("listen.tls: key")
            && stderr.contains("a.key")
            && stderr.contains("soon.crt"),
        "{stderr}"
    );
}
