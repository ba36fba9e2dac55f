//! Real browsers: headless Chromium (Debian's `chromium`) loads a page of site A and a page
//! of site B, each with its own certificate, over HTTP/3 (QUIC forced for the origin) and
//! over TCP; the page writes the protocol it was fetched with (`nextHopProtocol`) into
//! itself, and Chromium prints the document (`--dump-dom`). Each load trusts only the
//! certificate of its own site (`--ignore-certificate-errors-spki-list`), so a wrong
//! certificate is a failed load. Chromium records the `alt-svc` of both origins (h3 at the
//! UDP port). Then `http://` redirects to `https://` in the browser.

use crate::support::*;
use spooky::config::{CertPair, ListenTls, PlainHttp, UnknownSni};
use spooky_peers::certs::{issue_for, SiteCert};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

/// base64(SHA-256(SubjectPublicKeyInfo)) of the certificate at `cert`: what
/// `--ignore-certificate-errors-spki-list` takes.
fn spki(cert: &Path) -> String {
    let pem = std::fs::read(cert).unwrap();
    let x509 = boring::x509::X509::from_pem(&pem).unwrap();
    let der = x509.public_key().unwrap().public_key_to_der().unwrap();
    let digest = boring::hash::hash(boring::hash::MessageDigest::sha256(), &der).unwrap();
    boring::base64::encode_block(&digest)
}

/// What Chromium made of `url`: the document after its scripts ran.
fn chromium(profile: &Path, url: &str, trust: &str, quic_origin: Option<&str>) -> String {
    let found = Command::new("sh")
        .args(["-c", "command -v chromium"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "chromium is missing: install the Debian package chromium (cargo xtask setup does)"
    );
    let mut c = Command::new("chromium");
    c.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--enable-quic",
        "--virtual-time-budget=5000",
        "--host-resolver-rules=MAP a.example 127.0.0.1, MAP x.b.example 127.0.0.1",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(format!("--ignore-certificate-errors-spki-list={trust}"));
    if let Some(origin) = quic_origin {
        c.arg(format!("--origin-to-force-quic-on={origin}"));
    }
    let out = c
        .args(["--dump-dom", url])
        .stdin(Stdio::null())
        .output()
        .expect("chromium");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `#seen` paragraph of the demo page.
fn seen(dom: &str) -> &str {
    dom.split("<p id=\"seen\">")
        .nth(1)
        .and_then(|rest| rest.split("</p>").next())
        .unwrap_or("")
}

#[test]
fn chromium_loads_each_site_with_its_certificate_over_http3_and_tcp() {
    let scratch = Scratch::new("browser");
    for f in ["ca.crt", "ca.key"] {
        std::fs::copy(certs_dir().join(f), scratch.0.join(f)).unwrap();
    }
    for (name, names) in [("a", &["a.example"][..]), ("b", &["*.b.example"][..])] {
        let spec = SiteCert {
            names,
            key_pem: None,
            valid_days: Some(30),
        };
        issue_for(&scratch.0, name, name, &spec).unwrap();
    }
    let pair = |n: &str| CertPair {
        cert: scratch.0.join(format!("{n}.crt")),
        key: scratch.0.join(format!("{n}.key")),
    };
    let (ba, bb) = (backend("ba"), backend("bb"));
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
    let yaml = config_yaml(free_udp_port(), &upstreams, "");
    let mut c = spooky::config::parse(&yaml, &repo_root()).unwrap();
    c.listen.tls = ListenTls {
        certificates: vec![pair("a"), pair("b")],
        unknown_sni: UnknownSni::Refuse,
    };
    c.listen.http = Some(PlainHttp {
        addr: "127.0.0.1:0".parse().unwrap(),
        redirect_status: 308,
    });
    c.workers = Some(2);
    let p = proxy_from(c);
    let running = p.running.as_ref().unwrap();
    let udp = p.addr.port();
    let tcp: SocketAddr = running.tcp_addr.unwrap();
    let http = running.http_addr.unwrap();
    let trust = |n: &str| spki(&scratch.0.join(format!("{n}.crt")));

    for (site, host, backend) in [("a", "a.example", "ba"), ("b", "x.b.example", "bb")] {
        // HTTP/3: QUIC forced for the origin (the UDP port).
        let profile = scratch.0.join(format!("profile-h3-{site}"));
        let origin = format!("{host}:{udp}");
        let dom = chromium(
            &profile,
            &format!("https://{origin}/page"),
            &trust(site),
            Some(&origin),
        );
        eprintln!("chromium h3 {host}: {}", seen(&dom));
        assert_eq!(
            seen(&dom),
            format!("protocol=h3 backend={backend} host={origin}"),
            "{dom}"
        );
        // TCP: HTTP/2 by ALPN.
        let profile = scratch.0.join(format!("profile-h2-{site}"));
        let origin = format!("{host}:{}", tcp.port());
        let dom = chromium(
            &profile,
            &format!("https://{origin}/page"),
            &trust(site),
            None,
        );
        eprintln!("chromium h2 {host}: {}", seen(&dom));
        // Chromium kept the `alt-svc` Spooky sent: h3 at the UDP port, for this origin.
        let state = std::fs::read_to_string(profile.join("Default/Network Persistent State"))
            .unwrap_or_default();
        let state: serde_json::Value = serde_json::from_str(&state).unwrap_or_default();
        let servers = state["net"]["http_server_properties"]["servers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let recorded = servers.iter().any(|s| {
            s["server"] == format!("https://{origin}")
                && s["alternative_service"].as_array().is_some_and(|alts| {
                    alts.iter()
                        .any(|a| a["port"] == udp && a["advertised_alpns"][0] == "h3")
                })
        });
        assert!(
            recorded,
            "no alt-svc h3 :{udp} recorded for {origin}: {state}"
        );
        assert_eq!(
            seen(&dom),
            format!("protocol=h2 backend={backend} host={origin}"),
            "{dom}"
        );
        // The other site's certificate is not trusted for this name: nothing loads.
        let other = if site == "a" { "b" } else { "a" };
        let profile = scratch.0.join(format!("profile-wrong-{site}"));
        let dom = chromium(
            &profile,
            &format!("https://{origin}/page"),
            &trust(other),
            None,
        );
        assert!(
            !dom.contains("protocol="),
            "loaded with {other}'s certificate trusted: {dom}"
        );
    }

    // http:// → https:// in the browser: the page ends up fetched over TLS.
    let profile = scratch.0.join("profile-redirect");
    let url = format!("http://a.example:{}/page", http.port());
    let dom = chromium(&profile, &url, &trust("a"), None);
    eprintln!("chromium {url}: {}", seen(&dom));
    assert_eq!(
        seen(&dom),
        format!("protocol=h2 backend=ba host=a.example:{}", tcp.port())
    );
}
