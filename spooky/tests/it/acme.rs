//! Automatic HTTPS against a real ACME server: Debian's `pebble`, resolving names through a
//! `dnsmasq` the test runs, both on loopback. Spooky orders a certificate for `a.example` and
//! `www.a.example`, proves the names (HTTP-01 on its plaintext listener, or TLS-ALPN-01 on its
//! TCP listener: pebble connects to them), stores it and serves it; clients verify it with
//! pebble's root. Then: a restart serves the stored certificate and orders nothing; a stored
//! certificate past two thirds of its lifetime is served at once and renewed; with pebble gone
//! the renewal fails, is counted, and the old certificate stays.

use crate::support::*;
use spooky::config::{Acme, AcmeChallenge, PlainHttp, UnknownSni};
use spooky_peers::certs::{issue_for, SiteCert};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process killed (by PID) when dropped.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq on 127.0.0.1:`port` answering `names` with 127.0.0.1, and nothing else.
fn dnsmasq(port: u16, names: &[&str]) -> Peer {
    let answers: Vec<String> = names
        .iter()
        .map(|n| format!("--address=/{n}/127.0.0.1"))
        .collect();
    Peer(crate::support::dnsmasq(port, &answers))
}

/// pebble with its directory at `https://127.0.0.1:DIR/dir` (HTTPS with the demo CA's
/// `localhost` certificate), validating HTTP-01 at `http_port` and TLS-ALPN-01 at `tls_port`,
/// resolving names through `dns`.
fn pebble(dir: &Path, ports: (u16, u16), http_port: u16, tls_port: u16, dns: u16) -> Peer {
    require_command("pebble", "pebble");
    let certs = certs_dir();
    let config = serde_json::json!({"pebble": {
        "listenAddress": format!("127.0.0.1:{}", ports.0),
        "managementListenAddress": format!("127.0.0.1:{}", ports.1),
        "certificate": certs.join("spooky.crt"),
        "privateKey": certs.join("spooky.key"),
        "httpPort": http_port,
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false
    }});
    let path = dir.join("pebble.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let child = Command::new("pebble")
        .arg("-config")
        .arg(&path)
        .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("pebble.log")).unwrap())
        .spawn()
        .expect("pebble");
    let peer = Peer(child);
    wait_until("pebble listens", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", ports.0)).is_ok()
    });
    peer
}

/// pebble's root certificate (new at each start), for clients.
fn pebble_root(management: u16, to: &Path) {
    let out = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "10", "-o"])
        .arg(to)
        .arg(format!("https://127.0.0.1:{management}/roots/0"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Setup {
    scratch: Scratch,
    /// (directory, management), the proxy's TCP and plaintext ports, DNS.
    pebble_ports: (u16, u16),
    tcp: u16,
    http: u16,
    dns: u16,
    challenge: AcmeChallenge,
}

impl Setup {
    fn new(challenge: AcmeChallenge) -> Self {
        Self {
            scratch: Scratch::new("acme"),
            pebble_ports: (free_udp_port(), free_udp_port()),
            tcp: free_udp_port(),
            http: free_udp_port(),
            dns: free_udp_port(),
            challenge,
        }
    }

    fn state(&self) -> PathBuf {
        self.scratch.0.join("acme-state")
    }

    fn pebble(&self) -> Peer {
        pebble(
            &self.scratch.0,
            self.pebble_ports,
            self.http,
            self.tcp,
            self.dns,
        )
    }

    /// Spooky with a default certificate (the demo one) and an ACME certificate for
    /// `a.example` and `www.a.example`.
    fn proxy(&self, b: &Backend) -> Proxy {
        let upstreams = pool("a", "/", None, "round-robin", &[("ba", b.addr)], "");
        let yaml = config_yaml(free_udp_port(), &upstreams, "quic:\n  retry: off\n");
        let mut c = spooky::config::parse(&yaml, &repo_root()).unwrap();
        c.listen.tls.unknown_sni = UnknownSni::Default;
        if let Some(tcp) = c.listen.tcp.as_mut() {
            tcp.addr.set_port(self.tcp);
        }
        c.listen.http = Some(PlainHttp {
            addr: SocketAddr::from(([127, 0, 0, 1], self.http)),
            redirect_status: 308,
        });
        c.acme = Some(Acme {
            directory: format!("https://127.0.0.1:{}/dir", self.pebble_ports.0),
            email: Some("ops@a.example".into()),
            state_dir: self.state(),
            ca: Some(certs_dir().join("ca.crt")),
            challenge: self.challenge,
            certificates: vec![vec!["a.example".into(), "www.a.example".into()]],
        });
        c.workers = Some(2);
        proxy_from(c)
    }
}

fn metric_of(p: &Proxy, name: &str) -> f64 {
    metric_sum(&p.running.as_ref().unwrap().metrics_text(), name)
}

/// curl over TLS to `name` at the proxy's TCP port, verifying with `ca`; the subject and
/// issuer lines it printed, or its error.
fn served(tcp: u16, name: &str, ca: &Path) -> Result<String, String> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-v",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "--cacert",
        ])
        .arg(ca)
        .args(["--resolve", &format!("{name}:{tcp}:127.0.0.1")])
        .arg(format!("https://{name}:{tcp}/hello"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("subject:") || l.contains("issuer:"))
        .collect();
    if out.status.success() {
        Ok(lines.join(" | "))
    } else {
        Err(stderr.lines().last().unwrap_or("").to_owned())
    }
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn issue_renew_reuse_and_fail(challenge: AcmeChallenge) {
    let s = Setup::new(challenge);
    let _dns = dnsmasq(s.dns, &["a.example", "www.a.example"]);
    let b = backend("ba");
    let mut pebble = Some(s.pebble());
    let root = s.scratch.0.join("pebble-root.pem");
    pebble_root(s.pebble_ports.1, &root);

    // 1. A first start orders, proves both names and serves the certificate.
    let p = s.proxy(&b);
    wait_until("the certificate is issued", Duration::from_secs(60), || {
        metric_of(&p, "spooky_acme_certificates_issued_total") >= 1.0
    });
    for name in ["a.example", "www.a.example"] {
        let seen = served(s.tcp, name, &root).unwrap_or_else(|e| panic!("{name}: {e}"));
        eprintln!("{challenge:?} issued, {name}: {seen}");
        assert!(seen.contains("Pebble"), "{seen}");
    }
    let stored = s.state().join("a.example");
    assert_eq!(mode(&s.state()), 0o700);
    assert_eq!(mode(&stored.join("cert.pem")), 0o600);
    assert_eq!(mode(&stored.join("key.pem")), 0o600);
    assert_eq!(mode(&s.state().join("account.json")), 0o600);
    let issued = std::fs::read(stored.join("cert.pem")).unwrap();
    drop(p);

    // 2. A restart serves the stored certificate and orders nothing.
    let p = s.proxy(&b);
    wait_until(
        "the stored certificate is served",
        Duration::from_secs(10),
        || metric_of(&p, "spooky_acme_stored_certificates_reused_total") >= 1.0,
    );
    assert!(served(s.tcp, "a.example", &root).is_ok());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        metric_of(&p, "spooky_acme_orders_total"),
        0.0,
        "nothing ordered"
    );
    assert_eq!(std::fs::read(stored.join("cert.pem")).unwrap(), issued);
    drop(p);

    // 3. A stored certificate past two thirds of its lifetime (from the demo CA, valid one
    //    more day) is served at once, and renewed.
    let stale = SiteCert {
        names: &["a.example", "www.a.example"],
        key_pem: None,
        valid_days: Some(1),
    };
    let stale_cert = issue_for(&stale_dir(&s), "stale", "stale a.example", &stale).unwrap();
    let install_stale = || {
        std::fs::copy(&stale_cert, stored.join("cert.pem")).unwrap();
        std::fs::copy(stale_cert.with_extension("key"), stored.join("key.pem")).unwrap();
    };
    install_stale();
    let p = s.proxy(&b);
    wait_until(
        "the stale certificate is renewed",
        Duration::from_secs(60),
        || metric_of(&p, "spooky_acme_certificates_issued_total") >= 1.0,
    );
    assert_eq!(
        metric_of(&p, "spooky_acme_stored_certificates_reused_total"),
        1.0
    );
    let seen = served(s.tcp, "a.example", &root).unwrap_or_else(|e| {
        let demo = served(s.tcp, "a.example", &certs_dir().join("ca.crt"));
        panic!("{e}; with the demo CA: {demo:?}")
    });
    eprintln!("{challenge:?} renewed: {seen}");
    assert_ne!(
        std::fs::read(stored.join("cert.pem")).unwrap(),
        issued,
        "a new certificate"
    );
    drop(p);

    // 4. Pebble gone: the renewal fails, is counted, and the stale certificate stays.
    drop(pebble.take());
    install_stale();
    let p = s.proxy(&b);
    wait_until(
        "the failed renewal is counted",
        Duration::from_secs(30),
        || metric_of(&p, "spooky_acme_failures_total") >= 1.0,
    );
    let demo_ca = certs_dir().join("ca.crt");
    let seen = served(s.tcp, "a.example", &demo_ca).unwrap();
    eprintln!("{challenge:?} renewal failed, still serving: {seen}");
    assert!(seen.contains("stale a.example"), "{seen}");
    assert_eq!(metric_of(&p, "spooky_acme_certificates_issued_total"), 0.0);
}

/// A directory with the demo CA, to issue the stale certificate from.
fn stale_dir(s: &Setup) -> PathBuf {
    let d = s.scratch.0.join("demo-ca");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["ca.crt", "ca.key"] {
        std::fs::copy(certs_dir().join(f), d.join(f)).unwrap();
    }
    d
}

#[test]
fn http01_issue_reuse_renew_and_a_failed_renewal_against_pebble() {
    issue_renew_reuse_and_fail(AcmeChallenge::Http01);
}

#[test]
fn tls_alpn01_issue_reuse_renew_and_a_failed_renewal_against_pebble() {
    issue_renew_reuse_and_fail(AcmeChallenge::TlsAlpn01);
}
