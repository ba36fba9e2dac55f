//! Real browsers: headless Chromium (Debian's `chromium`) loads a page of site A and a page
//! of site B, each with its own certificate, over HTTP/3 (QUIC forced for the origin) and
//! over TCP; the page writes the protocol it was fetched with (`nextHopProtocol`) into
//! itself, and Chromium prints the document (`--dump-dom`). Each load trusts only the
//! certificate of its own site (`--ignore-certificate-errors-spki-list`), so a wrong
//! certificate is a failed load. Chromium records the `alt-svc` of both origins (h3 at the
//! UDP port). Then `http://` redirects to `https://` in the browser. Firefox ESR (neqo and
//! NSS, trusting the test CA from its own certificate database) loads both sites over HTTP/3
//! and HTTP/2. Spooky's access log confirms each protocol from the server's side.

use crate::support::*;
use spooky::config::{AccessLog, PlainHttp, UnknownSni};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// base64(SHA-256(SubjectPublicKeyInfo)) of the certificate at `cert`: what
/// `--ignore-certificate-errors-spki-list` takes.
pub(crate) fn spki(cert: &Path) -> String {
    let pem = std::fs::read(cert).unwrap();
    let x509 = boring::x509::X509::from_pem(&pem).unwrap();
    let der = x509.public_key().unwrap().public_key_to_der().unwrap();
    let digest = boring::hash::hash(boring::hash::MessageDigest::sha256(), &der).unwrap();
    boring::base64::encode_block(&digest)
}

/// What Chromium made of `url`: the document after its scripts ran.
pub(crate) fn chromium(
    profile: &Path,
    url: &str,
    trust: &str,
    quic_origin: Option<&str>,
) -> String {
    require_command("chromium", "chromium");
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
pub(crate) fn seen(dom: &str) -> &str {
    dom.split("<p id=\"seen\">")
        .nth(1)
        .and_then(|rest| rest.split("</p>").next())
        .unwrap_or("")
}

/// Spooky with site A (`a.example`, ECDSA) and site B (`*.b.example`, RSA), each its own
/// certificate and pool (`sites::config`), a plaintext listener, and an access log.
struct Sites {
    certs: crate::sites::Sites,
    _p: Proxy,
    udp: u16,
    tcp: u16,
    http: u16,
    _backends: (Backend, Backend),
}

impl Sites {
    fn start() -> Self {
        let certs = crate::sites::sites();
        let (ba, bb) = (backend("ba"), backend("bb"));
        let mut c = crate::sites::config(&certs, &ba, &bb, UnknownSni::Refuse);
        c.listen.http = Some(PlainHttp {
            addr: "127.0.0.1:0".parse().unwrap(),
            redirect_status: 308,
        });
        c.log.access = AccessLog::File(certs.dir.0.join("access.log"));
        let p = proxy_from(c);
        let running = p.running.as_ref().unwrap();
        let (udp, tcp, http) = (
            p.addr.port(),
            running.tcp_addr.unwrap().port(),
            running.http_addr.unwrap().port(),
        );
        Self {
            certs,
            _p: p,
            udp,
            tcp,
            http,
            _backends: (ba, bb),
        }
    }

    fn dir(&self) -> &Path {
        &self.certs.dir.0
    }

    /// What the access log says of requests for `path` on `host`: (protocol, status) each.
    fn logged(&self, host: &str, path: &str) -> Vec<(String, u64)> {
        let text = std::fs::read_to_string(self.dir().join("access.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["host"].as_str().is_some_and(|h| h.starts_with(host)) && v["path"] == path
            })
            .map(|v| {
                (
                    v["protocol"].as_str().unwrap_or("").to_owned(),
                    v["status"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }
}

#[test]
fn chromium_loads_each_site_with_its_certificate_over_http3_and_tcp() {
    let sites = Sites::start();
    let (dir, udp, tcp, http) = (sites.dir(), sites.udp, sites.tcp, sites.http);
    let trust = |n: &str| spki(&dir.join(format!("{n}.crt")));

    for (site, host, backend) in [("a", "a.example", "ba"), ("b", "x.b.example", "bb")] {
        // HTTP/3: QUIC forced for the origin (the UDP port).
        let profile = dir.join(format!("profile-h3-{site}"));
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
        let profile = dir.join(format!("profile-h2-{site}"));
        let origin = format!("{host}:{tcp}");
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
        let profile = dir.join(format!("profile-wrong-{site}"));
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

    // Spooky saw the same: per host, the h3 load, the h2 load (the wrong-certificate loads
    // never sent a request).
    for host in ["a.example", "x.b.example"] {
        wait_until(
            "the loads are in the access log",
            Duration::from_secs(5),
            || sites.logged(host, "/page").len() >= 2,
        );
        let seen = sites.logged(host, "/page");
        assert_eq!(
            seen,
            [("h3".to_owned(), 200), ("h2".to_owned(), 200)],
            "{host}"
        );
    }

    // http:// → https:// in the browser: the page ends up fetched over TLS.
    let profile = dir.join("profile-redirect");
    let url = format!("http://a.example:{http}/page");
    let dom = chromium(&profile, &url, &trust("a"), None);
    eprintln!("chromium {url}: {}", seen(&dom));
    assert_eq!(
        seen(&dom),
        format!("protocol=h2 backend=ba host=a.example:{tcp}")
    );
}

/// A Firefox profile in `dir` that trusts `ca` (an NSS database made with `certutil`),
/// resolves every name to 127.0.0.1, and, with `h3`, takes `h3=:PORT` as the alt-svc of
/// `host` from the first request (Firefox's own QUIC stack, neqo).
fn firefox_profile(dir: &Path, ca: &Path, h3: Option<(&str, u16)>) {
    require_command("certutil", "libnss3-tools");
    std::fs::create_dir_all(dir).unwrap();
    let db = format!("sql:{}", dir.display());
    let run = |args: &[&str]| {
        let out = Command::new("certutil").args(args).output().expect(
            "certutil is missing: install the Debian package libnss3-tools (cargo xtask setup does)",
        );
        assert!(
            out.status.success(),
            "certutil {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["-N", "-d", &db, "--empty-password"]);
    let ca = ca.display().to_string();
    run(&[
        "-A",
        "-d",
        &db,
        "-n",
        "spooky-test-ca",
        "-t",
        "C,,",
        "-i",
        &ca,
    ]);
    let mut prefs = String::from(
        "user_pref(\"network.dns.forceResolve\", \"127.0.0.1\");\n\
         user_pref(\"network.dns.disableIPv6\", true);\n\
         user_pref(\"network.proxy.type\", 0);\n\
         user_pref(\"browser.shell.checkDefaultBrowser\", false);\n\
         user_pref(\"network.http.http3.enable\", true);\n",
    );
    if let Some((host, port)) = h3 {
        prefs.push_str(&format!(
            "user_pref(\"network.http.http3.alt-svc-mapping-for-testing\", \"{host};h3=:{port}\");\n\
             user_pref(\"network.http.http3.force-use-alt-svc-mapping-for-testing\", true);\n\
             user_pref(\"network.http.http3.disable_when_third_party_roots_found\", false);\n"
        ));
    }
    std::fs::write(dir.join("user.js"), prefs).unwrap();
}

/// Firefox ESR, headless, loads `url` in `profile` (and takes a screenshot: the page is
/// loaded, its scripts run, then Firefox quits).
fn firefox(profile: &Path, url: &str) {
    require_command("firefox-esr", "firefox-esr");
    let out = Command::new("timeout")
        .args([
            "60",
            "firefox-esr",
            "--headless",
            "--no-remote",
            "--profile",
        ])
        .arg(profile)
        .arg("--screenshot")
        .arg(profile.join("page.png"))
        .arg(url)
        .env("HOME", profile)
        .stdin(Stdio::null())
        .output()
        .expect("firefox-esr");
    assert!(
        out.status.success(),
        "firefox {url}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Firefox ESR (its own QUIC and TLS stacks: neqo, NSS) loads each site's page over HTTP/3
/// and over HTTP/2, trusting the test CA from its own certificate database; Spooky's access
/// log says which protocol each load used.
#[test]
fn firefox_loads_each_site_over_http3_and_tcp() {
    let sites = Sites::start();
    let ca = sites.certs.ca();
    for (site, host) in [("a", "a.example"), ("b", "x.b.example")] {
        for (n, (protocol, h3)) in [("h3", Some((host, sites.udp))), ("h2", None)]
            .into_iter()
            .enumerate()
        {
            let profile = sites.dir().join(format!("ff-{protocol}-{site}"));
            firefox_profile(&profile, &ca, h3);
            firefox(&profile, &format!("https://{host}:{}/page", sites.tcp));
            // The access log is written by a thread of its own.
            wait_until(
                "the load is in the access log",
                Duration::from_secs(5),
                || sites.logged(host, "/page").len() > n,
            );
        }
        let seen = sites.logged(host, "/page");
        eprintln!("firefox {host}: {seen:?}");
        assert_eq!(
            seen,
            [("h3".to_owned(), 200), ("h2".to_owned(), 200)],
            "{host}"
        );
    }
}
