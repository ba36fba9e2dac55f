use super::*;
use std::fs;
use std::sync::OnceLock;

/// A directory with `cert.pem` + `key.pem` (self-signed, localhost) and `junk.pem`.
fn tls_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("spooky-config-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let pair = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        fs::write(dir.join("cert.pem"), pair.cert.pem()).unwrap();
        fs::write(dir.join("key.pem"), pair.signing_key.serialize_pem()).unwrap();
        fs::write(dir.join("junk.pem"), "not a pem file\n").unwrap();
        dir
    })
}

const HEAD: &str = "version: 1\nlisten:\n  port: 9889\n  tls: {cert: cert.pem, key: key.pem}\n";
const ONE_UPSTREAM: &str =
    "upstream:\n  api:\n    backends:\n      - {id: a1, address: \"127.0.0.1:7001\"}\n";

fn parse_full(yaml: &str) -> Result<Config, ConfigError> {
    parse(yaml, tls_dir())
}

/// Parses `HEAD` + `rest`, which must be valid.
fn ok(rest: &str) -> Config {
    match parse_full(&format!("{HEAD}{rest}")) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

/// Every problem of a full document, as `path: message` lines.
fn problems_full(yaml: &str) -> Vec<String> {
    match parse_full(yaml) {
        Err(ConfigError::Invalid(list)) => list.iter().map(ToString::to_string).collect(),
        Err(other) => panic!("expected Invalid, got {other:?}"),
        Ok(_) => panic!("expected Invalid, got a valid config"),
    }
}

/// Every problem of `HEAD` + `rest`.
fn problems(rest: &str) -> Vec<String> {
    problems_full(&format!("{HEAD}{rest}"))
}

/// One upstream `api` with one backend whose mapping body is `backend` (after `id: a1`).
fn backend(backend: &str) -> String {
    format!("upstream:\n  api:\n    backends:\n      - id: a1\n{backend}")
}

/// One upstream `api` with `body` (indented 4) and one h2c backend.
fn upstream(body: &str) -> String {
    format!("{ONE_UPSTREAM}{body}")
}

#[test]
fn minimal_config_gets_every_default() {
    let c = ok(ONE_UPSTREAM);
    assert_eq!(c.version, 1);
    assert_eq!(c.listen.addr, "0.0.0.0:9889".parse().unwrap());
    assert_eq!(
        c.listen.tls.certificates[0].cert,
        tls_dir().join("cert.pem")
    );
    assert_eq!(c.listen.tls.certificates[0].key, tls_dir().join("key.pem"));
    assert_eq!(
        c.quic,
        Quic {
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            request_header_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            max_concurrent_streams: 100,
            initial_max_data: 10 << 20,
            initial_max_stream_data: 1 << 20,
            max_connections: 100_000,
            max_connections_per_ip: 100,
            max_stalled_streams: 16,
            max_stalled_streams_per_ip: 256,
            max_streams_per_ip: 512,
            retry: RetryMode::Auto {
                new_connections_per_sec: 1000
            },
            early_data: EarlyData::Defer,
            cid_len: 16,
            server_id: vec![0, 1],
            generation: 0,
            key_file: None,
            connection_ids: CidFormat::Spooky,
        }
    );
    assert_eq!(
        c.proxy,
        Proxy {
            forwarded: ForwardedMode::Append,
            trusted_proxies: vec![],
            via: true,
            request_id: true,
            shutdown_grace: Duration::from_secs(30),
            max_header_list_size: 64 << 10,
            // `auto`: three quarters of this machine's (or its cgroup's) memory.
            memory_limit: crate::config::memory::auto_limit(&crate::config::System),
        }
    );
    assert!(c.proxy.memory_limit.is_some_and(|m| m > 1 << 20));
    assert_eq!(
        c.log,
        Log {
            level: "info".into(),
            format: LogFormat::Text,
            access: AccessLog::Off,
            access_format: crate::config::AccessFormat::Json(
                crate::config::AccessField::ALL
                    .iter()
                    .map(|(_, f)| *f)
                    .collect()
            ),
        }
    );
    assert_eq!(
        c.steering,
        Steering {
            pin_path: "/sys/fs/bpf/spooky".into(),
            xdp_mode: XdpMode::Auto,
            initial_rate: 2000,
            initial_burst: 4000,
        }
    );
    assert_eq!(c.workers, None);
    let up = c.upstream("api").unwrap();
    assert_eq!(
        up.route,
        Route {
            host: None,
            path_prefix: "/".into(),
            rewrite_prefix: None,
        }
    );
    assert_eq!(up.load_balancing, LoadBalancing::RoundRobin);
    assert_eq!(
        up.timeouts,
        UpstreamTimeouts {
            connect: Duration::from_secs(2),
            response_head: Duration::from_secs(30),
            idle: Duration::from_secs(60),
            websocket_lifetime: None,
            request: None,
        }
    );
    assert_eq!(up.access, crate::config::Access::default());
    assert_eq!(up.rate_limit, None);
    assert_eq!(up.max_request_headers, None);
    assert_eq!(up.max_requests_per_backend, None);
    assert_eq!(up.readiness, crate::config::Readiness::Optional);
    let tcp = c.listen.tcp.as_ref().unwrap();
    assert_eq!(tcp.max_connections_per_ip, 256);
    assert_eq!(tcp.connection_rate_per_ip, None);
    assert_eq!(
        up.passive_health,
        PassiveHealth {
            consecutive_failures: 5,
            cooldown: Duration::from_secs(30),
            server_errors: false,
            max_ejection_percent: 50,
        }
    );
    assert!(!up.fail_open);
    let b = &up.backends[0];
    assert_eq!(b.id, "a1");
    assert_eq!(b.address, "127.0.0.1:7001".parse().unwrap());
    assert_eq!(b.address_text, "127.0.0.1:7001");
    assert_eq!(b.weight, 1);
    assert_eq!(b.tls, None);
    assert_eq!(
        b.health_check,
        HealthCheck {
            enabled: false,
            path: "/health".into(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            expected_status: vec![(200, 399)],
        }
    );
}

#[test]
fn every_field_is_read() {
    let c = parse_full(
        r#"
version: 1
listen:
  protocol: http3
  address: "::1"
  port: 443
  tls: {cert: cert.pem, key: key.pem}
quic:
  idle_timeout: 45s
  handshake_timeout: 2500
  request_header_timeout: 3s
  max_concurrent_streams: 50
  initial_max_data: 20MiB
  initial_max_stream_data: 65536
  max_connections: 10
  max_stalled_streams: 4
  max_stalled_streams_per_ip: 40
  retry: always
  cid_len: 20
  server_id: "0x0a0b0c"
  generation: 6
proxy:
  forwarded: replace
  trusted_proxies: [10.0.0.0/8, "2001:db8::/32", 192.0.2.7]
  via: false
  request_id: false
  shutdown_grace: 1m
  max_header_list_size: 32KiB
  memory_limit: 512MiB
upstream:
  web:
    load_balancing: {type: consistent-hash, replicas: 40, key: "header:X-User"}
    route: {host: "*.Example.COM", path_prefix: /app}
    timeouts: {connect: 100ms, response_head: 1h, idle: 90s, websocket_lifetime: 12h}
    passive_health: {consecutive_failures: 2, cooldown: 10s}
    fail_open: true
    backends:
      - id: w1
        address: "[::1]:8443"
        weight: 10000
        health_check:
          path: /ready
          interval: 2s
          timeout: 2s
          healthy_threshold: 1
          unhealthy_threshold: 4
          expected_status: [204, [200, 202]]
        tls: {server_name: web.internal, ca: cert.pem, verify: false}
  api:
    load_balancing: {type: least-request}
    backends: [{id: a1, address: "localhost:7001", tls: {}}]
log: {level: "spooky=debug,info", format: json, access_format: combined}
steering: {pin_path: /sys/fs/bpf/other, xdp_mode: generic}
workers: 4
"#,
    )
    .unwrap();
    assert_eq!(c.listen.addr, "[::1]:443".parse().unwrap());
    assert_eq!(c.quic.idle_timeout, Duration::from_secs(45));
    assert_eq!(c.quic.handshake_timeout, Duration::from_millis(2500));
    assert_eq!(c.quic.request_header_timeout, Duration::from_secs(3));
    assert_eq!(c.quic.max_concurrent_streams, 50);
    assert_eq!(c.quic.initial_max_data, 20 << 20);
    assert_eq!(c.quic.initial_max_stream_data, 65536);
    assert_eq!(c.quic.max_connections, 10);
    assert_eq!(
        (
            c.quic.max_stalled_streams,
            c.quic.max_stalled_streams_per_ip
        ),
        (4, 40)
    );
    assert_eq!(c.quic.retry, RetryMode::Always);
    assert_eq!((c.quic.cid_len, c.quic.generation), (20, 6));
    assert_eq!(c.quic.server_id, vec![0x0a, 0x0b, 0x0c]);
    assert_eq!(
        c.proxy,
        Proxy {
            forwarded: ForwardedMode::Replace,
            trusted_proxies: vec![
                Cidr::parse("10.0.0.0/8").unwrap(),
                Cidr::parse("2001:db8::/32").unwrap(),
                Cidr::parse("192.0.2.7/32").unwrap(),
            ],
            via: false,
            request_id: false,
            shutdown_grace: Duration::from_secs(60),
            max_header_list_size: 32 << 10,
            memory_limit: Some(512 << 20),
        }
    );
    // Sorted by name.
    let names: Vec<&str> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["api", "web"]);
    let web = c.upstream("web").unwrap();
    assert_eq!(
        web.load_balancing,
        LoadBalancing::ConsistentHash {
            replicas: 40,
            key: HashKey::Header("x-user".into())
        }
    );
    assert_eq!(
        web.route,
        Route {
            host: Some("*.example.com".into()),
            path_prefix: "/app".into(),
            rewrite_prefix: None,
        }
    );
    assert_eq!(web.timeouts.connect, Duration::from_millis(100));
    assert_eq!(web.timeouts.response_head, Duration::from_secs(3600));
    assert_eq!(web.timeouts.idle, Duration::from_secs(90));
    assert_eq!(
        web.timeouts.websocket_lifetime,
        Some(Duration::from_secs(12 * 3600))
    );
    assert_eq!(web.passive_health.consecutive_failures, 2);
    assert_eq!(web.passive_health.cooldown, Duration::from_secs(10));
    assert!(web.fail_open);
    let w1 = &web.backends[0];
    assert_eq!(w1.address, "[::1]:8443".parse().unwrap());
    assert_eq!(w1.weight, 10000);
    assert_eq!(
        w1.health_check,
        HealthCheck {
            enabled: true,
            path: "/ready".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            healthy_threshold: 1,
            unhealthy_threshold: 4,
            expected_status: vec![(204, 204), (200, 202)],
        }
    );
    assert_eq!(
        w1.tls,
        Some(BackendTls {
            server_name: "web.internal".into(),
            ca: Some(tls_dir().join("cert.pem")),
            verify: false,
        })
    );
    let api = c.upstream("api").unwrap();
    assert_eq!(api.load_balancing, LoadBalancing::LeastRequest);
    let a1 = &api.named[0].template;
    assert_eq!(api.named[0].host, "localhost");
    assert_eq!(a1.address.port(), 7001);
    assert_eq!(a1.address_text, "localhost:7001");
    assert_eq!(
        a1.tls,
        Some(BackendTls {
            server_name: "localhost".into(),
            ca: None,
            verify: true
        })
    );
    assert_eq!(
        c.log,
        Log {
            level: "spooky=debug,info".into(),
            format: LogFormat::Json,
            access: AccessLog::Off,
            access_format: crate::config::AccessFormat::Combined,
        }
    );
    assert_eq!(
        c.steering,
        Steering {
            pin_path: "/sys/fs/bpf/other".into(),
            xdp_mode: XdpMode::Generic,
            initial_rate: 2000,
            initial_burst: 4000,
        }
    );
    assert_eq!(c.workers, Some(4));
}

#[test]
fn version_must_be_1() {
    let yaml = format!("{HEAD}{ONE_UPSTREAM}").replace("version: 1", "version: 2");
    assert_eq!(
        problems_full(&yaml),
        ["version: unsupported version 2 (only 1 exists)"]
    );
}

#[test]
fn listen_rules() {
    let listen = |body: &str| {
        problems_full(&format!(
            "version: 1\nlisten:\n  tls: {{cert: cert.pem, key: key.pem}}\n{body}{ONE_UPSTREAM}"
        ))
    };
    assert_eq!(
        listen("  port: 1\n  protocol: http2\n"),
        ["listen.protocol: unknown protocol \"http2\" (allowed: http3)"]
    );
    assert_eq!(
        listen("  port: 0\n"),
        ["listen.port: must be between 1 and 65535, got 0"]
    );
    assert_eq!(
        listen("  port: 65536\n"),
        ["listen.port: must be between 1 and 65535, got 65536"]
    );
    assert_eq!(
        listen("  port: 1\n  address: localhost\n"),
        ["listen.address: invalid IP address \"localhost\""]
    );
}

#[test]
fn listen_tls_files_must_be_readable_pem() {
    let tls = |cert: &str, key: &str| {
        problems_full(&format!(
            "version: 1\nlisten:\n  port: 1\n  tls: {{cert: {cert}, key: {key}}}\n{ONE_UPSTREAM}"
        ))
    };
    assert_eq!(
        tls("missing.pem", "key.pem"),
        ["listen.tls.cert: cannot read \"missing.pem\": No such file or directory (os error 2)"]
    );
    assert_eq!(
        tls("junk.pem", "key.pem"),
        ["listen.tls.cert: no PEM certificate in \"junk.pem\""]
    );
    assert_eq!(
        tls("key.pem", "cert.pem"),
        [
            "listen.tls.cert: no PEM certificate in \"key.pem\"",
            "listen.tls.key: no PEM private key in \"cert.pem\"",
        ]
    );
    let abs = tls_dir().join("cert.pem");
    let c = parse_full(&format!(
        "version: 1\nlisten:\n  port: 1\n  tls: {{cert: {}, key: key.pem}}\n{ONE_UPSTREAM}",
        abs.display()
    ))
    .unwrap();
    assert_eq!(c.listen.tls.certificates[0].cert, abs);
}

#[test]
fn listen_tls_takes_one_pair_or_a_list_and_names_each_entry() {
    let tls = |body: &str| {
        problems_full(&format!(
            "version: 1\nlisten:\n  port: 1\n  tls: {body}\n{ONE_UPSTREAM}"
        ))
    };
    assert_eq!(tls("{cert: cert.pem}"), ["listen.tls.key: missing"]);
    assert_eq!(
        tls("{unknown_sni: refuse}"),
        ["listen.tls: needs cert and key, or certificates"]
    );
    assert_eq!(
        tls("{cert: cert.pem, key: key.pem, certificates: [{cert: cert.pem, key: key.pem}]}"),
        ["listen.tls: cert and key, or certificates: not both"]
    );
    assert_eq!(
        tls("{certificates: [{cert: cert.pem, key: key.pem}, {cert: cert.pem, key: gone.pem}]}"),
        ["listen.tls.certificates[1].key: cannot read \"gone.pem\": No such file or directory (os error 2)"]
    );
    assert_eq!(
        tls("{cert: cert.pem, key: key.pem, unknown_sni: maybe}"),
        ["listen.tls.unknown_sni: unknown unknown_sni \"maybe\" (allowed: default, refuse)"]
    );
    let c = parse_full(&format!(
        "version: 1\nlisten:\n  port: 1\n  tls:\n    unknown_sni: refuse\n    certificates:\n      - {{cert: cert.pem, key: key.pem}}\n      - {{cert: cert.pem, key: key.pem}}\n{ONE_UPSTREAM}"
    ))
    .unwrap();
    assert_eq!(c.listen.tls.certificates.len(), 2);
    assert_eq!(c.listen.tls.unknown_sni, crate::config::UnknownSni::Refuse);
    assert_eq!(c.listen.tls.certificates[1].key, tls_dir().join("key.pem"));
}

#[test]
fn route_rules_are_checked_and_named() {
    let up = |body: &str| problems(&format!("upstream:\n  web:\n{body}"));
    let b = "    backends: [{id: a, address: \"127.0.0.1:1\"}]\n";
    assert_eq!(
        up(&format!(
            "    route: {{path_prefix: /a, strip_prefix: true, rewrite_prefix: /b}}\n{b}"
        )),
        ["upstream.web.route.rewrite_prefix: strip_prefix and rewrite_prefix: one or the other"]
    );
    assert_eq!(
        up(&format!(
            "    route: {{path_prefix: /a, rewrite_prefix: b}}\n{b}"
        )),
        ["upstream.web.route.rewrite_prefix: must be a path starting with '/', got \"b\""]
    );
    assert_eq!(
        up(&format!("    request_headers: {{set: {{connection: close}}, remove: [\"bad name\"]}}\n{b}")),
        [
            "upstream.web.request_headers.remove: \"bad name\" is not a field name",
            "upstream.web.request_headers.set.connection: \"connection\" belongs to the connection or the message framing, not to a rule",
        ]
    );
    assert_eq!(
        up(&format!("    response_headers: {{add: {{x-a: \" padded\"}}}}\n{b}")),
        ["upstream.web.response_headers.add.x-a: the value has control characters or surrounding spaces"]
    );
    assert_eq!(
        up(&format!("    redirect: {{to: \"https://x.example\"}}\n{b}")),
        ["upstream.web.backends: a pool with a redirect has no backends (it answers every request itself)"]
    );
    assert_eq!(
        up("    redirect: {to: \"ftp://x.example\", status: 200}\n"),
        [
            "upstream.web.redirect.status: 200 is not a redirect (301, 302, 303, 307 or 308)",
            "upstream.web.redirect.to: \"ftp://x.example\" is not an absolute http:// or https:// URL without query or fragment",
        ]
    );
    let c = ok(
        "upstream:\n  web:\n    route: {path_prefix: /a, strip_prefix: true}\n    \
        response_headers: {set: {Strict-Transport-Security: max-age=1}}\n    \
        backends: [{id: a, address: \"127.0.0.1:1\"}]\n  old:\n    route: {path_prefix: /old}\n    \
        redirect: {to: \"https://new.example/\"}\n",
    );
    let web = c.upstreams.iter().find(|u| u.name == "web").unwrap();
    assert_eq!(web.route.rewrite_prefix.as_deref(), Some(""));
    assert_eq!(
        web.response_headers.set,
        [(
            "strict-transport-security".to_owned(),
            "max-age=1".to_owned()
        )]
    );
    let old = c.upstreams.iter().find(|u| u.name == "old").unwrap();
    let r = old.redirect.as_ref().unwrap();
    assert_eq!(
        (r.to.as_str(), r.status, r.keep_path),
        ("https://new.example", 308, true)
    );
    assert!(old.backends.is_empty());
}

#[test]
fn acme_is_checked_and_names_each_problem() {
    let acme = |listen_extra: &str, body: &str| {
        let yaml = format!(
            "version: 1\nlisten:\n  port: 9889\n  tls: {{cert: cert.pem, key: key.pem}}\n{listen_extra}{ONE_UPSTREAM}acme:\n{body}"
        );
        match parse_full(&yaml) {
            Ok(c) => Ok(c.acme.unwrap()),
            Err(ConfigError::Invalid(list)) => {
                Err(list.iter().map(ToString::to_string).collect::<Vec<_>>())
            }
            Err(e) => panic!("{e}"),
        }
    };
    let good = "  directory: https://acme.example/dir\n  certificates:\n    - domains: [A.example, www.a.example]\n";
    // Without listen.http, TLS-ALPN-01 on the TCP listener; with it, HTTP-01.
    let a = acme("", good).unwrap();
    assert_eq!(a.challenge, crate::config::AcmeChallenge::TlsAlpn01);
    assert_eq!(
        a.certificates,
        [vec!["a.example".to_owned(), "www.a.example".to_owned()]]
    );
    assert_eq!(a.state_dir, tls_dir().join("state/acme"));
    let a = acme("  http: {enabled: true}\n", good).unwrap();
    assert_eq!(a.challenge, crate::config::AcmeChallenge::Http01);
    assert_eq!(
        acme("", &format!("{good}  challenge: http-01\n")).unwrap_err(),
        ["acme.challenge: http-01 needs listen.http enabled"]
    );
    assert_eq!(
        acme(
            "",
            "  directory: http://acme.example/dir\n  email: nobody\n  certificates:\n    - domains: [\"*.a.example\", 192.0.2.1]\n    - domains: []\n"
        )
        .unwrap_err(),
        [
            "acme.directory: \"http://acme.example/dir\" is not an https:// URL",
            "acme.email: \"nobody\" is not an e-mail address",
            "acme.certificates[0].domains: \"*.a.example\" is not a DNS name this challenge can prove (no wildcards, no addresses)",
            "acme.certificates[0].domains: \"192.0.2.1\" is not a DNS name this challenge can prove (no wildcards, no addresses)",
            "acme.certificates[1].domains: at least one domain is required",
        ]
    );
}

#[test]
fn upstreams_are_required() {
    assert_eq!(
        problems(""),
        ["upstream: at least one upstream is required"]
    );
    assert_eq!(
        problems("upstream: {}\n"),
        ["upstream: at least one upstream is required"]
    );
}

#[test]
fn alt_svc_advertises_the_listen_port_unless_told_another() {
    let c = ok(ONE_UPSTREAM);
    assert_eq!(
        c.listen.alt_svc,
        Some(crate::config::AltSvc {
            max_age: Duration::from_secs(86_400),
            port: 9889,
        })
    );
    let c = parse_full(&format!(
        "{HEAD}  alt_svc: {{port: 443, max_age: 1h}}\n{ONE_UPSTREAM}"
    ))
    .unwrap();
    assert_eq!(
        c.listen.alt_svc.map(|a| (a.port, a.max_age)),
        Some((443, Duration::from_secs(3600)))
    );
    assert_eq!(
        problems_full(&format!("{HEAD}  alt_svc: {{port: 0}}\n{ONE_UPSTREAM}")),
        ["listen.alt_svc.port: must be between 1 and 65535, got 0"]
    );
}

#[test]
fn route_policy_is_read_and_checked() {
    use crate::config::{Access, Cidr, RateKey, RateLimit, Readiness};
    let c = ok(&upstream(
        "    access: {allow: [10.0.0.0/8, \"2001:db8::/32\"], deny: [10.1.0.0/16]}\n    \
         rate_limit: {requests_per_second: 2.5, burst: 10, key: \"header:X-Api-Key\"}\n    \
         max_request_headers: 8KiB\n    max_requests_per_backend: 100\n    \
         readiness: required\n    timeouts: {request: 15s}\n",
    ));
    let up = c.upstream("api").unwrap();
    let cidr = |s| Cidr::parse(s).unwrap();
    assert_eq!(
        up.access,
        Access {
            allow: vec![cidr("10.0.0.0/8"), cidr("2001:db8::/32")],
            deny: vec![cidr("10.1.0.0/16")],
        }
    );
    assert_eq!(
        up.rate_limit,
        Some(RateLimit {
            per_second: 2.5,
            burst: 10,
            key: RateKey::Header(http::HeaderName::from_static("x-api-key")),
        })
    );
    assert_eq!(up.max_request_headers, Some(8192));
    assert_eq!(up.max_requests_per_backend, Some(100));
    assert_eq!(up.readiness, Readiness::Required);
    assert_eq!(up.timeouts.request, Some(Duration::from_secs(15)));
    // The burst defaults to the rate (at least 1); the key to the client address.
    let c = ok(&upstream("    rate_limit: {requests_per_second: 0.5}\n"));
    let rl = c.upstream("api").unwrap().rate_limit.clone().unwrap();
    assert_eq!((rl.burst, rl.key), (1, RateKey::Client));
    let c = ok(&format!(
        "{ONE_UPSTREAM}    rate_limit: {{requests_per_second: 30, key: client_prefix}}\n"
    ));
    let rl = c.upstream("api").unwrap().rate_limit.clone().unwrap();
    assert_eq!((rl.burst, rl.key), (30, RateKey::ClientPrefix));
    assert_eq!(
        problems(&upstream(
            "    access: {allow: [10.0.0.0/33], deny: [nobody]}\n    \
             rate_limit: {requests_per_second: 0, burst: 0, key: cookie}\n    \
             max_requests_per_backend: 0\n    readiness: maybe\n    timeouts: {request: 0s}\n"
        )),
        [
            "upstream.api.timeouts.request: must be greater than 0",
            "upstream.api.access.allow[0]: prefix length in \"10.0.0.0/33\" must be 0 to 32",
            "upstream.api.access.deny[0]: \"nobody\" is not an address or ADDRESS/LENGTH",
            "upstream.api.rate_limit.requests_per_second: must be a number above 0 and at most 1000000, got 0",
            "upstream.api.rate_limit.burst: must be between 1 and 1000000, got 0",
            "upstream.api.rate_limit.key: unknown key \"cookie\" (allowed: client, client_prefix, header:NAME, global)",
            "upstream.api.max_requests_per_backend: must be between 1 and 10000000, got 0",
            "upstream.api.readiness: unknown readiness \"maybe\" (allowed: required, optional)",
        ]
    );
    assert_eq!(
        problems_full(&format!(
            "{HEAD}  tcp: {{max_connections_per_ip: 0, connection_rate_per_ip: {{per_second: -1}}}}\n{ONE_UPSTREAM}"
        )),
        [
            "listen.tcp.max_connections_per_ip: must be between 1 and 1000000, got 0",
            "listen.tcp.connection_rate_per_ip.per_second: must be a number above 0 and at most 1000000, got -1",
        ]
    );
}

#[test]
fn upstream_names_are_restricted() {
    let yaml = ONE_UPSTREAM.replace("api:", "\"a.b c\":");
    assert_eq!(
        problems(&yaml),
        ["upstream.\"a.b c\": invalid upstream name \"a.b c\" (use letters, digits, '_' and '-')"]
    );
    let yaml = ONE_UPSTREAM.replace("api:", "\"\":");
    assert_eq!(
        problems(&yaml),
        ["upstream.\"\": invalid upstream name \"\" (use letters, digits, '_' and '-')"]
    );
    // A multi-line YAML key (found by the config fuzz target): quoted, one line.
    let yaml = ONE_UPSTREAM.replace("api:", "? |\n    a\n    b\n  :");
    let found = problems(&yaml);
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("upstream.\"a\\nb\\n\": invalid")),
        "{found:?}"
    );
    assert!(found.iter().all(|p| !p.contains('\n')), "{found:?}");
    ok(&ONE_UPSTREAM.replace("api:", "Api_2-x:"));
}

#[test]
fn pools_need_backends() {
    assert_eq!(
        problems("upstream:\n  api:\n    backends: []\n"),
        ["upstream.api.backends: at least one backend is required"]
    );
    assert_eq!(
        problems("upstream:\n  api: {}\n"),
        ["upstream.api.backends: at least one backend is required"]
    );
}

#[test]
fn backend_ids_are_unique_across_the_config() {
    let yaml = "upstream:
  one:
    route: {path_prefix: /one}
    backends:
      - {id: x, address: \"127.0.0.1:1\"}
      - {id: x, address: \"127.0.0.1:2\"}
  two:
    backends:
      - {id: x, address: \"127.0.0.1:3\"}
";
    assert_eq!(
            problems(yaml),
            [
                "upstream.one.backends[1].id: duplicate backend id \"x\" (first used at upstream.one.backends[0])",
                "upstream.two.backends[0].id: duplicate backend id \"x\" (first used at upstream.one.backends[0])",
            ]
        );
}

#[test]
fn backend_ids_are_restricted() {
    assert_eq!(
            problems(&ONE_UPSTREAM.replace("id: a1", "id: \"a 1\"")),
            ["upstream.api.backends[0].id: invalid backend id \"a 1\" (1 to 64 letters, digits, '_', '.' and '-')"]
        );
    let long = "a".repeat(65);
    assert_eq!(
        problems(&ONE_UPSTREAM.replace("id: a1", &format!("id: {long}"))).len(),
        1
    );
}

#[test]
fn weight_is_1_to_10000() {
    for (w, want) in [
        (
            0,
            "upstream.api.backends[0].weight: must be between 1 and 10000, got 0",
        ),
        (
            10001,
            "upstream.api.backends[0].weight: must be between 1 and 10000, got 10001",
        ),
        (
            -3,
            "upstream.api.backends[0].weight: must be between 1 and 10000, got -3",
        ),
    ] {
        assert_eq!(
            problems(&backend(&format!(
                "        address: \"127.0.0.1:1\"\n        weight: {w}\n"
            ))),
            [want]
        );
    }
}

#[test]
fn backend_addresses_must_be_socket_addresses() {
    let addr = |a: &str| problems(&backend(&format!("        address: \"{a}\"\n")));
    assert_eq!(
        addr("x:y"),
        ["upstream.api.backends[0].address: invalid socket address \"x:y\""]
    );
    assert_eq!(
        addr("10.0.0.1"),
        ["upstream.api.backends[0].address: invalid socket address \"10.0.0.1\""]
    );
    assert_eq!(
        addr("bad host:80"),
        ["upstream.api.backends[0].address: invalid socket address \"bad host:80\""]
    );
    assert_eq!(
        addr("10.0.0.1:0"),
        ["upstream.api.backends[0].address: port must not be 0 in \"10.0.0.1:0\""]
    );
    assert_eq!(
        addr("localhost:0"),
        ["upstream.api.backends[0].address: port must not be 0 in \"localhost:0\""]
    );
}

#[test]
fn a_backend_host_name_is_not_resolved_when_validating() {
    // `spooky check` needs no DNS: a name that does not exist is still a valid address; it
    // becomes a named backend, resolved when Spooky runs.
    let c = ok(&backend("        address: \"No-Such-Host.invalid:80\"\n"));
    let api = c.upstream("api").unwrap();
    assert!(api.backends.is_empty(), "{:?}", api.backends);
    assert_eq!(api.named.len(), 1);
    assert_eq!(
        (api.named[0].host.as_str(), api.named[0].port),
        ("no-such-host.invalid", 80)
    );
    assert_eq!(c.dns_names(), ["no-such-host.invalid"]);
    // Each address it resolves to becomes one backend, in a stable order; again replaces.
    let mut c = c;
    let two: Vec<std::net::IpAddr> = vec!["10.0.0.2".parse().unwrap(), "10.0.0.1".parse().unwrap()];
    crate::config::expand(&mut c, |_| two.clone());
    let ids: Vec<String> = c.upstreams[0]
        .backends
        .iter()
        .map(|b| format!("{} {}", b.id, b.address))
        .collect();
    assert_eq!(ids, ["a1@10.0.0.1 10.0.0.1:80", "a1@10.0.0.2 10.0.0.2:80"]);
    crate::config::expand(&mut c, |_| vec!["10.0.0.3".parse().unwrap()]);
    assert_eq!(c.upstreams[0].backends.len(), 1);
    assert_eq!(
        c.upstreams[0].backends[0].address_text,
        "No-Such-Host.invalid:80"
    );
    assert_eq!(
        c.upstreams[0].backends[0].resolved_from.as_deref(),
        Some("no-such-host.invalid")
    );
}

#[test]
fn unknown_lb_type_lists_the_allowed_ones() {
    assert_eq!(
            problems(&upstream("    load_balancing: {type: fastest}\n")),
            ["upstream.api.load_balancing.type: unknown load balancing type \"fastest\" (allowed: random, round-robin, consistent-hash, least-request)"]
        );
    for (name, want) in [
        ("random", LoadBalancing::Random),
        ("round-robin", LoadBalancing::RoundRobin),
        ("least-request", LoadBalancing::LeastRequest),
    ] {
        let c = ok(&upstream(&format!(
            "    load_balancing: {{type: {name}}}\n"
        )));
        assert_eq!(c.upstreams[0].load_balancing, want);
    }
}

#[test]
fn consistent_hash_defaults_and_keys() {
    let lb = |body: &str| {
        ok(&upstream(&format!(
            "    load_balancing: {{type: consistent-hash{body}}}\n"
        )))
        .upstreams[0]
            .load_balancing
            .clone()
    };
    assert_eq!(
        lb(""),
        LoadBalancing::ConsistentHash {
            replicas: 160,
            key: HashKey::ClientIp
        }
    );
    let key = |k: &str| match lb(&format!(", key: \"{k}\"")) {
        LoadBalancing::ConsistentHash { key, .. } => key,
        other => panic!("{other:?}"),
    };
    assert_eq!(key("client-ip"), HashKey::ClientIp);
    assert_eq!(key("path"), HashKey::Path);
    assert_eq!(key("header:X-Tenant"), HashKey::Header("x-tenant".into()));
    assert_eq!(key("cookie:Session"), HashKey::Cookie("Session".into()));
    assert_eq!(
        lb(", replicas: 1"),
        LoadBalancing::ConsistentHash {
            replicas: 1,
            key: HashKey::ClientIp
        }
    );
}

#[test]
fn consistent_hash_rules() {
    let lb = |body: &str| problems(&upstream(&format!("    load_balancing: {{{body}}}\n")));
    assert_eq!(
        lb("type: consistent-hash, replicas: 0"),
        ["upstream.api.load_balancing.replicas: must be between 1 and 10000, got 0"]
    );
    assert_eq!(
        lb("type: consistent-hash, replicas: 10001"),
        ["upstream.api.load_balancing.replicas: must be between 1 and 10000, got 10001"]
    );
    assert_eq!(
            lb("type: consistent-hash, key: ip"),
            ["upstream.api.load_balancing.key: unknown hash key \"ip\" (allowed: client-ip, header:NAME, cookie:NAME, path)"]
        );
    assert_eq!(
        lb("type: consistent-hash, key: \"header:\""),
        ["upstream.api.load_balancing.key: invalid name \"\" in hash key \"header:\""]
    );
    assert_eq!(
        lb("type: consistent-hash, key: \"cookie:a b\""),
        ["upstream.api.load_balancing.key: invalid name \"a b\" in hash key \"cookie:a b\""]
    );
    assert_eq!(
        lb("type: random, replicas: 3, key: path"),
        [
            "upstream.api.load_balancing.replicas: only applies to type consistent-hash",
            "upstream.api.load_balancing.key: only applies to type consistent-hash",
        ]
    );
}

#[test]
fn route_path_prefix_starts_with_slash() {
    assert_eq!(
        problems(&upstream("    route: {path_prefix: api}\n")),
        ["upstream.api.route.path_prefix: must start with '/', got \"api\""]
    );
    assert_eq!(
        problems(&upstream("    route: {path_prefix: \"\"}\n")),
        ["upstream.api.route.path_prefix: must start with '/', got \"\""]
    );
}

#[test]
fn route_hosts_are_lowercased_exact_or_wildcard() {
    let host = |h: &str| {
        ok(&upstream(&format!("    route: {{host: \"{h}\"}}\n"))).upstreams[0]
            .route
            .host
            .clone()
    };
    assert_eq!(host("API.Example.com"), Some("api.example.com".into()));
    assert_eq!(host("*.Example.com"), Some("*.example.com".into()));
    assert_eq!(host("10.0.0.1"), Some("10.0.0.1".into()));
    assert_eq!(host("[::1]"), Some("[::1]".into()));
    let bad = |h: &str| problems(&upstream(&format!("    route: {{host: \"{h}\"}}\n")));
    for h in [
        "a.*.com",
        "*",
        "*example.com",
        "api*.example.com",
        "*.*.example.com",
    ] {
        assert_eq!(bad(h).len(), 1, "{h}");
    }
    assert_eq!(
            bad("a.*.com"),
            ["upstream.api.route.host: invalid host \"a.*.com\" (a wildcard must be the whole first label, as in \"*.example.com\")"]
        );
    assert_eq!(
            bad("*.*.com"),
            ["upstream.api.route.host: invalid host \"*.*.com\" (expected a name like \"example.com\" or \"*.example.com\")"]
        );
    assert_eq!(
            bad("example.com:443"),
            ["upstream.api.route.host: invalid host \"example.com:443\" (expected a name like \"example.com\" or \"*.example.com\")"]
        );
    assert_eq!(
            bad(""),
            ["upstream.api.route.host: invalid host \"\" (expected a name like \"example.com\" or \"*.example.com\")"]
        );
}

#[test]
fn identical_routes_name_both_pools() {
    let yaml = "upstream:
  a:
    route: {host: Example.com, path_prefix: /x}
    backends: [{id: a1, address: \"127.0.0.1:1\"}]
  b:
    route: {host: example.com, path_prefix: /x}
    backends: [{id: b1, address: \"127.0.0.1:2\"}]
  c:
    backends: [{id: c1, address: \"127.0.0.1:3\"}]
  d:
    route: {path_prefix: /}
    backends: [{id: d1, address: \"127.0.0.1:4\"}]
  e:
    route: {host: example.com, path_prefix: /x/}
    backends: [{id: e1, address: \"127.0.0.1:5\"}]
";
    assert_eq!(
            problems(yaml),
            [
                "upstream.b.route: upstreams \"a\" and \"b\" both route host \"example.com\" with path_prefix \"/x\"",
                "upstream.d.route: upstreams \"c\" and \"d\" both route any host with path_prefix \"/\"",
            ]
        );
}

#[test]
fn health_check_rules() {
    let hc = |body: &str| {
        problems(&backend(&format!(
            "        address: \"127.0.0.1:1\"\n        health_check: {{{body}}}\n"
        )))
    };
    let p = "upstream.api.backends[0].health_check";
    assert_eq!(
        hc("interval: 0"),
        [format!("{p}.interval: must be greater than 0")]
    );
    assert_eq!(
        hc("timeout: 0s"),
        [format!("{p}.timeout: must be greater than 0")]
    );
    assert_eq!(
        hc("interval: 1s, timeout: 1500ms"),
        [format!(
            "{p}.timeout: must not exceed interval (1s), got 1.5s"
        )]
    );
    assert_eq!(
        hc("healthy_threshold: 0, unhealthy_threshold: 0"),
        [
            format!("{p}.healthy_threshold: must be between 1 and 1000, got 0"),
            format!("{p}.unhealthy_threshold: must be between 1 and 1000, got 0"),
        ]
    );
    assert_eq!(
        hc("path: health"),
        [format!("{p}.path: must start with '/', got \"health\"")]
    );
    assert_eq!(
        hc("expected_status: []"),
        [format!(
            "{p}.expected_status: must list at least one status or [low, high] range"
        )]
    );
    assert_eq!(
        hc("expected_status: [[200, 600], 99, [300, 200], [1, 2, 3]]"),
        [
            format!("{p}.expected_status[0]: statuses must be between 100 and 599, got [200, 600]"),
            format!("{p}.expected_status[1]: statuses must be between 100 and 599, got [99, 99]"),
            format!("{p}.expected_status[2]: range [300, 200] is reversed"),
            format!(
                "{p}.expected_status[3]: expected a status or a [low, high] pair, got [1, 2, 3]"
            ),
        ]
    );
    assert_eq!(
            hc("interval: soon"),
            [format!("{p}.interval: invalid duration \"soon\" (use milliseconds as an integer, or an integer with a unit: ms, s, m, h, e.g. \"250ms\", \"5s\")")]
        );
    // Present without `enabled` means enabled.
    let c = ok(&backend(
        "        address: \"127.0.0.1:1\"\n        health_check: {}\n",
    ));
    assert!(c.upstreams[0].backends[0].health_check.enabled);
    let c = ok(&backend(
        "        address: \"127.0.0.1:1\"\n        health_check: {enabled: false}\n",
    ));
    assert!(!c.upstreams[0].backends[0].health_check.enabled);
}

#[test]
fn quic_rules() {
    let quic = |body: &str| problems(&format!("quic: {{{body}}}\n{ONE_UPSTREAM}"));
    assert_eq!(
        quic("idle_timeout: 0, handshake_timeout: -5, request_header_timeout: 0ms"),
        [
            "quic.idle_timeout: must be greater than 0",
            "quic.handshake_timeout: must not be negative, got -5",
            "quic.request_header_timeout: must be greater than 0",
        ]
    );
    assert_eq!(
        quic("max_concurrent_streams: 0, max_connections: 0"),
        [
            "quic.max_concurrent_streams: must be between 1 and 1152921504606846976, got 0",
            "quic.max_connections: must be between 1 and 100000000, got 0",
        ]
    );
    assert_eq!(
            quic("initial_max_data: 0, initial_max_stream_data: 1PiB"),
            [
                "quic.initial_max_data: must be between 1 and 4611686018427387903 bytes, got 0",
                "quic.initial_max_stream_data: invalid size \"1PiB\" (use bytes as an integer, or an integer with a unit: B, KB, KiB, MB, MiB, GB, GiB, e.g. \"64KiB\")",
            ]
        );
    assert_eq!(
        quic("max_stalled_streams: 0, max_stalled_streams_per_ip: -1"),
        [
            "quic.max_stalled_streams: must be between 1 and 1073741824, got 0",
            "quic.max_stalled_streams_per_ip: must be between 1 and 1073741824, got -1",
        ]
    );
    assert_eq!(
        problems(&format!("proxy: {{memory_limit: 0}}\n{ONE_UPSTREAM}")),
        ["proxy.memory_limit: must be between 1 and 4611686018427387903 bytes, got 0"]
    );
    assert_eq!(
        quic("retry: sometimes"),
        ["quic.retry: unknown retry mode \"sometimes\" (allowed: off, always, auto)"]
    );
    assert_eq!(
        quic("early_data: always"),
        ["quic.early_data: unknown 0-RTT mode \"always\" (allowed: off, defer, reject)"]
    );
    assert_eq!(
        quic("retry: off, retry_threshold: 5"),
        ["quic.retry_threshold: only applies when retry is auto"]
    );
    assert_eq!(
        quic("retry_threshold: 0"),
        ["quic.retry_threshold: must be between 1 and 100000000, got 0"]
    );
    let retry = |body: &str| ok(&format!("quic: {{{body}}}\n{ONE_UPSTREAM}")).quic.retry;
    assert_eq!(retry("retry: off"), RetryMode::Off);
    assert_eq!(retry("retry: always"), RetryMode::Always);
    assert_eq!(
        retry("retry: auto, retry_threshold: 7"),
        RetryMode::Auto {
            new_connections_per_sec: 7
        }
    );
}

#[test]
fn connection_id_layout_rules() {
    let quic = |body: &str| problems(&format!("quic: {{{body}}}\n{ONE_UPSTREAM}"));
    let sid = |v: &str| {
        ok(&format!("quic: {{server_id: {v}}}\n{ONE_UPSTREAM}"))
            .quic
            .server_id
    };
    assert_eq!(sid("258"), vec![1, 2]);
    assert_eq!(sid("0"), vec![0, 0]);
    assert_eq!(sid("\"0x01\""), vec![1]);
    assert_eq!(sid("\"0XdeadBEEF\""), vec![0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(
        quic("cid_len: 6"),
        ["quic.cid_len: must be between 7 and 20, got 6"]
    );
    assert_eq!(
        quic("cid_len: 21"),
        ["quic.cid_len: must be between 7 and 20, got 21"]
    );
    assert_eq!(
        quic("cid_len: 300"),
        ["quic.cid_len: must be between 0 and 255, got 300"]
    );
    assert_eq!(
        quic("generation: 7"),
        ["quic.generation: must be between 0 and 6, got 7"]
    );
    assert_eq!(
            quic("cid_len: 7"),
            ["quic.server_id: a server id of 2 bytes does not fit: it must be 1..=8 bytes and leave 4 nonce bytes in a 7-byte connection ID"]
        );
    assert_eq!(
            quic("server_id: \"0x010203040506070809\""),
            ["quic.server_id: a server id of 9 bytes does not fit: it must be 1..=8 bytes and leave 4 nonce bytes in a 16-byte connection ID"]
        );
    assert_eq!(
            quic("server_id: \"0x0102030405060708090a\", generation: 7"),
            [
                "quic.generation: must be between 0 and 6, got 7",
                "quic.server_id: a server id of 10 bytes does not fit: it must be 1..=8 bytes and leave 4 nonce bytes in a 16-byte connection ID",
            ]
        );
    for bad in ["\"0x123\"", "\"0x\"", "\"1234\"", "\"0xzz\""] {
        let text = bad.trim_matches('"');
        assert_eq!(
            quic(&format!("server_id: {bad}")),
            [format!(
                "quic.server_id: invalid server id \"{text}\" (expected hex text like \"0x0001\")"
            )]
        );
    }
    assert_eq!(
            quic("server_id: 65536"),
            ["quic.server_id: integer server id must be between 0 and 65535, got 65536 (write longer ids as hex text like \"0x00010203\")"]
        );
}

#[test]
fn connection_id_formats_for_load_balancers() {
    let ids = |body: &str| {
        format!("quic: {{server_id: \"0x010203\", connection_ids: {{{body}}}}}\n{ONE_UPSTREAM}")
    };
    let c = ok(&ids(
        "format: quic-lb, config_rotation: 2, key: \"0x8f95f09245765f80256934e50c66207f\", \
         previous: {config_rotation: 1}",
    ));
    assert_eq!(
        c.quic.connection_ids,
        CidFormat::QuicLb {
            current: QuicLbConfig {
                rotation: 2,
                key: Some([
                    0x8f, 0x95, 0xf0, 0x92, 0x45, 0x76, 0x5f, 0x80, 0x25, 0x69, 0x34, 0xe5, 0x0c,
                    0x66, 0x20, 0x7f
                ]),
                length_self_encoding: false,
            },
            previous: Some(QuicLbConfig {
                rotation: 1,
                key: None,
                length_self_encoding: false,
            }),
        }
    );
    assert_eq!(
        ok(&ids("format: katran-v2")).quic.connection_ids,
        CidFormat::Katran { version: 2 }
    );
    assert_eq!(
        problems(&ids("format: katran-v3")),
        ["quic.server_id: Katran version 3 connection IDs carry a 32-bit server id: write it as 4 bytes of hex (got 3)"]
    );
    assert_eq!(
        problems(&ids("format: maglev")),
        ["quic.connection_ids.format: unknown connection ID format \"maglev\" (allowed: spooky, quic-lb, katran-v2, katran-v3)"]
    );
    assert_eq!(
        problems(&ids("format: katran-v2, key: \"00\"")),
        ["quic.connection_ids.key: only applies with format: quic-lb"]
    );
    assert_eq!(
        problems(&ids("format: quic-lb, config_rotation: 7, key: \"0x1234\"")),
        [
            "quic.connection_ids.config_rotation: must be between 0 and 6, got 7",
            "quic.connection_ids.key: an AES-128 key is 32 hex digits (the load balancer's config has the same)",
        ]
    );
    assert_eq!(
        problems(&ids("format: quic-lb, config_rotation: 1, previous: {config_rotation: 1}")),
        ["quic.connection_ids.previous.config_rotation: the previous config must have another codepoint than the current one (1)"]
    );
    // The load balancer's layout needs 4 more bytes than Spooky's own.
    let short = format!(
        "quic: {{server_id: \"0x010203\", cid_len: 11, connection_ids: {{format: quic-lb}}}}\n{ONE_UPSTREAM}"
    );
    assert_eq!(
        problems(&short),
        ["quic.server_id: a server id of 3 bytes does not fit: it must be 1..=8 bytes and leave 8 bytes after it (generation and worker twice, 4 random) in a 11-byte connection ID"]
    );
}

#[test]
fn proxy_rules() {
    let proxy = |body: &str| problems(&format!("proxy: {{{body}}}\n{ONE_UPSTREAM}"));
    assert_eq!(
        proxy("forwarded: sometimes"),
        ["proxy.forwarded: unknown forwarded mode \"sometimes\" (allowed: append, replace, off)"]
    );
    assert_eq!(
        proxy("max_header_list_size: 0, shutdown_grace: -1"),
        [
            "proxy.shutdown_grace: must not be negative, got -1",
            "proxy.max_header_list_size: must be between 1 and 4611686018427387903 bytes, got 0",
        ]
    );
    let c = ok(&format!(
        "proxy: {{forwarded: \"off\", shutdown_grace: 0}}\n{ONE_UPSTREAM}"
    ));
    assert_eq!(c.proxy.forwarded, ForwardedMode::Off);
    assert_eq!(c.proxy.shutdown_grace, Duration::ZERO);
}

#[test]
fn upstream_timeouts_and_passive_health_rules() {
    assert_eq!(
            problems(&upstream(
                "    timeouts: {connect: 0, response_head: 0ms, idle: 0s}\n    passive_health: {consecutive_failures: 0, cooldown: 0}\n"
            )),
            [
                "upstream.api.timeouts.connect: must be greater than 0",
                "upstream.api.timeouts.response_head: must be greater than 0",
                "upstream.api.timeouts.idle: must be greater than 0",
                "upstream.api.passive_health.consecutive_failures: must be between 1 and 1000, got 0",
                "upstream.api.passive_health.cooldown: must be greater than 0",
            ]
        );
}

#[test]
fn backend_tls_rules() {
    let tls = |address: &str, body: &str| {
        format!("        address: \"{address}\"\n        tls: {{{body}}}\n")
    };
    let c = ok(&backend(&tls("127.0.0.1:8443", "verify: false")));
    assert_eq!(
        c.upstreams[0].backends[0].tls,
        Some(BackendTls {
            server_name: "127.0.0.1".into(),
            ca: None,
            verify: false
        })
    );
    let c = ok(&backend(&tls("[::1]:8443", "")));
    assert_eq!(
        c.upstreams[0].backends[0].tls.as_ref().unwrap().server_name,
        "::1"
    );
    let p = "upstream.api.backends[0].tls";
    assert_eq!(
        problems(&backend(&tls(
            "127.0.0.1:8443",
            "server_name: \"bad name\""
        ))),
        [format!("{p}.server_name: invalid server name \"bad name\"")]
    );
    assert_eq!(
            problems(&backend(&tls("x y:1", ""))),
            [
                "upstream.api.backends[0].address: invalid socket address \"x y:1\"".to_owned(),
                format!("{p}.server_name: invalid server name \"x y\" (taken from address; set tls.server_name)"),
            ]
        );
    assert_eq!(
        problems(&backend(&tls("127.0.0.1:8443", "ca: junk.pem"))),
        [format!("{p}.ca: no PEM certificate in \"junk.pem\"")]
    );
    assert_eq!(
        problems(&backend(&tls("127.0.0.1:8443", "ca: nope.pem"))),
        [format!(
            "{p}.ca: cannot read \"nope.pem\": No such file or directory (os error 2)"
        )]
    );
}

#[test]
fn log_rules() {
    let log = |body: &str| problems(&format!("log: {{{body}}}\n{ONE_UPSTREAM}"));
    assert_eq!(log("level: \"\""), ["log.level: must not be empty"]);
    let got = log("level: \"spooky=loud\"");
    assert_eq!(got.len(), 1);
    assert!(
        got[0].starts_with("log.level: invalid log filter \"spooky=loud\": "),
        "{got:?}"
    );
    assert_eq!(
        log("format: xml"),
        ["log.format: unknown log format \"xml\" (allowed: text, json)"]
    );
    ok(&format!(
        "log: {{level: \"warn,spooky::worker=trace\"}}\n{ONE_UPSTREAM}"
    ));
}

#[test]
fn steering_and_workers_rules() {
    assert_eq!(
        problems(&format!(
            "steering: {{pin_path: bpf/spooky, xdp_mode: fast}}\n{ONE_UPSTREAM}"
        )),
        [
            "steering.pin_path: must be an absolute path, got \"bpf/spooky\"",
            "steering.xdp_mode: unknown XDP mode \"fast\" (allowed: auto, native, generic)",
        ]
    );
    assert_eq!(
        problems(&format!("workers: 0\n{ONE_UPSTREAM}")),
        ["workers: must be between 1 and 255, got 0"]
    );
    assert_eq!(
        problems(&format!("workers: 256\n{ONE_UPSTREAM}")),
        ["workers: must be between 1 and 255, got 256"],
        "a connection ID's worker byte names at most 256 workers; 255 is the limit"
    );
    let c = ok(&format!("steering: {{xdp_mode: native}}\n{ONE_UPSTREAM}"));
    assert_eq!(c.steering.xdp_mode, XdpMode::Native);
}

#[test]
fn a_second_yaml_document_is_named() {
    let yaml = format!("{HEAD}{ONE_UPSTREAM}---\n");
    let err = parse(&yaml, Path::new("/")).unwrap_err().to_string();
    assert!(
        err.contains("(file): holds more than one YAML document"),
        "{err}"
    );
}

#[test]
fn several_problems_are_reported_together() {
    let yaml = "version: 3
listen:
  port: 0
  address: nowhere
  tls: {cert: missing.pem, key: key.pem}
quic: {generation: 7}
upstream:
  api:
    load_balancing: {type: fastest}
    backends:
      - {id: a1, address: \"127.0.0.1:1\", weight: 0}
      - {id: a2, address: \"x:y\"}
log: {format: xml}
";
    let err = parse_full(yaml).unwrap_err();
    assert_eq!(err.exit_code(), 1);
    assert_eq!(
            err.to_string(),
            "invalid configuration (9 problems):
  version: unsupported version 3 (only 1 exists)
  listen.port: must be between 1 and 65535, got 0
  listen.address: invalid IP address \"nowhere\"
  listen.tls.cert: cannot read \"missing.pem\": No such file or directory (os error 2)
  quic.generation: must be between 0 and 6, got 7
  upstream.api.load_balancing.type: unknown load balancing type \"fastest\" (allowed: random, round-robin, consistent-hash, least-request)
  upstream.api.backends[0].weight: must be between 1 and 10000, got 0
  upstream.api.backends[1].address: invalid socket address \"x:y\"
  log.format: unknown log format \"xml\" (allowed: text, json)"
        );
}

#[test]
fn one_problem_reads_singular() {
    let err = parse_full(&format!("{HEAD}{ONE_UPSTREAM}workers: 0\n")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration (1 problem):\n  workers: must be between 1 and 255, got 0"
    );
}

#[test]
fn shape_errors_come_from_serde_with_path_and_line() {
    let err = parse_full(&format!("{HEAD}{ONE_UPSTREAM}      weight: 2\n")).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax(_)), "{err:?}");
    let yaml = format!(
        "{HEAD}{}",
        ONE_UPSTREAM.replace("id: a1", "id: a1, wieght: 2")
    );
    let err = parse_full(&yaml).unwrap_err();
    assert_eq!(err.exit_code(), 1);
    assert_eq!(
            err.to_string(),
            "upstream.api.backends[0]: unknown field `wieght`, expected one of `id`, `address`, `weight`, `health_check`, `tls`, `protocol` at line 8 column 18"
        );
    let err = parse_full("version: 1\n").unwrap_err();
    assert_eq!(err.to_string(), "missing field `listen`");
    let err = parse_full(&format!(
        "{HEAD}{ONE_UPSTREAM}quic: {{idle_timeout: [1]}}\n"
    ))
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("quic.idle_timeout: invalid type: sequence, expected a duration"),
        "{err}"
    );
}

#[test]
fn load_resolves_relative_paths_against_the_file() {
    let dir = tls_dir();
    let file = dir.join("spooky.yaml");
    fs::write(&file, format!("{HEAD}{ONE_UPSTREAM}")).unwrap();
    let c = load(&file).unwrap();
    assert_eq!(c.listen.tls.certificates[0].cert, dir.join("cert.pem"));
    assert_eq!(Config::from_path(&file).unwrap(), c);
}

#[test]
fn unreadable_file_exits_with_2() {
    let path = tls_dir().join("absent.yaml");
    let err = load(&path).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert_eq!(err.exit_code(), 2);
    assert_eq!(
        err.to_string(),
        format!(
            "cannot read configuration file {}: No such file or directory (os error 2)",
            path.display()
        )
    );
}

#[test]
fn names_of_earlier_versions_are_refused_naming_the_replacement() {
    let hc = |key: &str| {
        ONE_UPSTREAM.replace(
            "address: \"127.0.0.1:7001\"}",
            &format!("address: \"127.0.0.1:7001\", health_check: {{path: /h, {key}: 3}}}}"),
        )
    };
    assert_eq!(
        problems(&hc("timeout_ms")),
        [
            "upstream.api.backends[0].health_check.timeout_ms: `timeout_ms` is a key of earlier \
          Spooky versions: write `timeout` (a duration, e.g. `timeout: 1500ms`)"
        ]
    );
    assert!(problems(&hc("failure_threshold"))[0].ends_with("write `unhealthy_threshold`"));
    assert!(problems(&hc("success_threshold"))[0].ends_with("write `healthy_threshold`"));
    let passive = ONE_UPSTREAM.replace(
        "    backends:",
        "    passive_health: {failure_threshold: 3}\n    backends:",
    );
    assert!(problems(&passive)[0].ends_with("write `consecutive_failures`"));
    // A key of the top level is named by itself (found by the config fuzz target).
    let top = problems(&format!("{ONE_UPSTREAM}backends: []\n"));
    assert_eq!(top.len(), 1, "{top:?}");
    assert!(
        top[0].starts_with("backends: `backends` is a key of earlier Spooky versions"),
        "{top:?}"
    );
    let levels = problems(&format!("{ONE_UPSTREAM}log: {{level: poltergeist}}\n"));
    assert_eq!(
        levels,
        ["log.level: `poltergeist` is a log level name of earlier Spooky versions: write `trace`"]
    );
}

#[test]
fn a_non_loopback_admin_address_needs_a_token() {
    let problems = problems(&format!(
        "{ONE_UPSTREAM}admin: {{address: \"0.0.0.0:9900\"}}\n"
    ));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0]
            .starts_with("admin.token: required with a non-loopback admin.address (0.0.0.0:9900)"),
        "{problems:?}"
    );
    ok(&format!(
        "{ONE_UPSTREAM}admin: {{address: \"0.0.0.0:9900\", token: 0123456789abcdef}}\n"
    ));
    ok(&format!(
        "{ONE_UPSTREAM}admin: {{address: \"[::1]:9900\"}}\n"
    ));
}

#[test]
fn the_memory_limit_is_auto_by_default_and_can_be_off() {
    let auto = crate::config::memory::auto_limit(&crate::config::System);
    assert!(auto.is_some());
    assert_eq!(ok(ONE_UPSTREAM).proxy.memory_limit, auto);
    let explicit = ok(&format!("proxy: {{memory_limit: auto}}\n{ONE_UPSTREAM}"));
    assert_eq!(explicit.proxy.memory_limit, auto);
    let off = ok(&format!("proxy: {{memory_limit: \"off\"}}\n{ONE_UPSTREAM}"));
    assert_eq!(off.proxy.memory_limit, None);
    assert_eq!(
        problems(&format!("proxy: {{memory_limit: lots}}\n{ONE_UPSTREAM}")).len(),
        1
    );
}

#[test]
fn backend_protocols() {
    let c = ok(&String::from(
        "upstream:\n  api:\n    backends:\n      - {id: a, address: \"127.0.0.1:7001\"}\n      - {id: b, address: \"127.0.0.1:7002\", protocol: http1}\n      - {id: c, address: \"127.0.0.1:7003\", protocol: auto, tls: {}}\n      - {id: d, address: \"127.0.0.1:7004\", protocol: http1, tls: {}}\n",
    ));
    let got: Vec<BackendProtocol> = c.upstreams[0].backends.iter().map(|b| b.protocol).collect();
    use BackendProtocol::*;
    assert_eq!(got, [Http2, Http1, Auto, Http1]);
    assert_eq!(
        problems(&String::from(
            "upstream:\n  api:\n    backends:\n      - {id: a, address: \"127.0.0.1:7001\", protocol: auto}\n      - {id: b, address: \"127.0.0.1:7002\", protocol: h3}\n"
        )),
        [
            "upstream.api.backends[0].protocol: auto needs tls (ALPN decides between h2 and http/1.1); say http1 or http2 for cleartext",
            "upstream.api.backends[1].protocol: unknown protocol \"h3\" (allowed: http2, http1, auto)",
        ]
    );
}

#[test]
fn trusted_proxies_are_address_blocks() {
    let c = ok(&format!(
        "proxy:\n  trusted_proxies: [10.1.0.0/16, \"fd00::/8\"]\n{ONE_UPSTREAM}"
    ));
    let ip = |t: &str| t.parse::<std::net::IpAddr>().unwrap();
    let p = &c.proxy;
    assert_eq!(p.forwarded_for(ip("10.1.2.3")), ForwardedMode::Append);
    assert_eq!(
        p.forwarded_for(ip("::ffff:10.1.2.3")),
        ForwardedMode::Append,
        "IPv4-mapped"
    );
    assert_eq!(p.forwarded_for(ip("fd12::1")), ForwardedMode::Append);
    assert_eq!(p.forwarded_for(ip("10.2.0.1")), ForwardedMode::Replace);
    assert_eq!(p.forwarded_for(ip("fe80::1")), ForwardedMode::Replace);
    // Nobody is trusted by default.
    assert_eq!(
        ok(ONE_UPSTREAM).proxy.forwarded_for(ip("127.0.0.1")),
        ForwardedMode::Replace
    );
    assert!(Cidr::parse("0.0.0.0/0")
        .unwrap()
        .contains(ip("203.0.113.9")));
    assert!(!Cidr::parse("0.0.0.0/0")
        .unwrap()
        .contains(ip("2001:db8::1")));
    assert_eq!(
        problems(&format!(
            "proxy:\n  trusted_proxies: [10.0.0.0/33, nope]\n{ONE_UPSTREAM}"
        )),
        [
            "proxy.trusted_proxies[0]: prefix length in \"10.0.0.0/33\" must be 0 to 32",
            "proxy.trusted_proxies[1]: \"nope\" is not an address or ADDRESS/LENGTH",
        ]
    );
}

#[test]
fn fleet_members_are_read_and_checked() {
    let fleet = |body: &str| format!("fleet: {{{body}}}\n{ONE_UPSTREAM}");
    let c = ok(&fleet(
        "listen: \"0.0.0.0:6080\", members: {\"1\": 10.0.0.1, \"0x0002\": \"10.0.0.2:7000\"}",
    ));
    let f = c.fleet.unwrap();
    assert_eq!(f.listen, "0.0.0.0:6080".parse().unwrap());
    assert_eq!(
        f.members,
        vec![
            (vec![0, 2], "10.0.0.2:7000".parse().unwrap()),
            (vec![0, 1], "10.0.0.1:6080".parse().unwrap()),
        ],
        "ids as quic.server_id reads them, the port defaulting to listen's"
    );
    assert!(ok(ONE_UPSTREAM).fleet.is_none());
    assert_eq!(
        problems(&fleet("listen: \"0.0.0.0\"")),
        ["fleet.listen: not an IP:PORT: \"0.0.0.0\""]
    );
    assert_eq!(
        problems(&fleet("listen: \"0.0.0.0:0\"")),
        ["fleet.listen: needs a port (members send to it)"]
    );
    assert_eq!(
        problems(&fleet(
            "listen: \"[::]:6080\", members: {\"0x01\": 10.0.0.1, \"2\": nowhere, \"0x0001\": 10.0.0.3, \"1\": 10.0.0.4}"
        )),
        [
            "fleet.members.0x01: a server id of 1 bytes, but quic.server_id has 2",
            "fleet.members.1: the same server id as another member",
            "fleet.members.2: not an IP address or IP:PORT: \"nowhere\"",
        ]
    );
}
