//! Choosing a certificate by name, and loading pairs (ECDSA and RSA; a key of another
//! certificate refused).

use super::*;
use crate::config::CertPair;
use spooky_peers::certs::{issue_for, SiteCert};

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(what: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("spooky-certs-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    spooky_peers::certs::generate(&d).unwrap();
    Dir(d)
}

/// The name of the certificate that names `h`.
fn host(c: &Certificates, h: &str) -> Option<String> {
    c.for_host(h).map(|s| s.name.clone())
}

/// The name of the certificate a ClientHello with `sni` gets.
fn pick(c: &Certificates, sni: Option<&str>) -> Option<String> {
    c.select(sni).map(|s| s.name.clone())
}

fn rsa_pem() -> String {
    let rsa = boring::rsa::Rsa::generate(2048).unwrap();
    let key = PKey::from_rsa(rsa).unwrap();
    String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap()
}

fn pair(d: &Dir, name: &str) -> CertPair {
    CertPair {
        cert: d.0.join(format!("{name}.crt")),
        key: d.0.join(format!("{name}.key")),
    }
}

fn site(d: &Dir, name: &str, names: &[&str]) -> CertPair {
    let spec = SiteCert {
        names,
        key_pem: None,
        valid_days: None,
    };
    issue_for(&d.0, name, name, &spec).unwrap();
    pair(d, name)
}

fn load(pairs: Vec<CertPair>, unknown_sni: UnknownSni) -> Certificates {
    let tls = ListenTls {
        certificates: pairs,
        unknown_sni,
    };
    Certificates::load(&tls, &Arc::new(TlsShared::default())).unwrap()
}

#[test]
fn exact_names_first_then_one_label_wildcards_then_the_default() {
    let d = dir("select");
    let certs = load(
        vec![
            site(&d, "a", &["a.example", "www.a.example"]),
            site(&d, "b", &["*.b.example"]),
            site(&d, "c", &["special.b.example"]),
        ],
        UnknownSni::Default,
    );
    assert_eq!(certs.all()[0].name, "a.example");
    assert_eq!(certs.all()[1].names, ["*.b.example"]);
    assert_eq!(host(&certs, "a.example").as_deref(), Some("a.example"));
    assert_eq!(host(&certs, "WWW.A.Example.").as_deref(), Some("a.example"));
    assert_eq!(host(&certs, "x.b.example").as_deref(), Some("*.b.example"));
    assert_eq!(
        host(&certs, "special.b.example").as_deref(),
        Some("special.b.example"),
        "exact beats *"
    );
    assert_eq!(host(&certs, "b.example"), None, "* needs a label");
    assert_eq!(host(&certs, "y.x.b.example"), None, "* is one label");
    assert_eq!(host(&certs, "c.example"), None);
    assert_eq!(
        pick(&certs, Some("x.b.example")).as_deref(),
        Some("*.b.example")
    );
    assert_eq!(
        pick(&certs, Some("c.example")).as_deref(),
        Some("a.example")
    );
    assert_eq!(pick(&certs, None).as_deref(), Some("a.example"));
}

#[test]
fn refuse_gives_unknown_names_and_no_sni_nothing() {
    let d = dir("refuse");
    let certs = load(
        vec![site(&d, "a", &["a.example"]), site(&d, "b", &["b.example"])],
        UnknownSni::Refuse,
    );
    assert_eq!(
        pick(&certs, Some("b.example")).as_deref(),
        Some("b.example")
    );
    assert_eq!(pick(&certs, Some("c.example")), None);
    assert_eq!(pick(&certs, None), None);
    // Counted per certificate, and the unknown ones apart.
    assert!(certs.choose(Some("b.example")).is_some());
    assert!(certs.choose(Some("c.example")).is_none());
    assert!(certs.choose(None).is_none());
    assert_eq!(certs.all()[1].handshakes(), 1);
    assert_eq!(certs.all()[0].handshakes(), 0);
    assert_eq!(certs.shared().unknown_sni.load(Ordering::Relaxed), 2);
}

#[test]
fn a_host_another_certificate_names_is_misdirected() {
    let d = dir("misdirected");
    let certs = load(
        vec![
            site(&d, "a", &["a.example"]),
            site(&d, "b", &["*.b.example"]),
        ],
        UnknownSni::Default,
    );
    assert!(!certs.misdirected(Some("a.example"), "a.example"));
    assert!(
        !certs.misdirected(Some("x.b.example"), "y.b.example"),
        "same certificate"
    );
    assert!(certs.misdirected(Some("a.example"), "x.b.example"));
    assert!(certs.misdirected(Some("x.b.example"), "a.example"));
    // No SNI: the default (a) was presented.
    assert!(!certs.misdirected(None, "a.example"));
    assert!(certs.misdirected(None, "x.b.example"));
    // Hosts no certificate names are served anywhere.
    assert!(!certs.misdirected(Some("a.example"), "other.example"));
}

#[test]
fn rsa_and_ecdsa_pairs_load_with_their_expiry() {
    let d = dir("kinds");
    let rsa = rsa_pem();
    let spec = SiteCert {
        names: &["rsa.example"],
        key_pem: Some(&rsa),
        valid_days: Some(10),
    };
    issue_for(&d.0, "rsa", "rsa", &spec).unwrap();
    let certs = load(
        vec![pair(&d, "rsa"), site(&d, "ec", &["ec.example"])],
        UnknownSni::Default,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let left = certs.all()[0].not_after - now;
    assert!((9 * 86_400..=11 * 86_400).contains(&left), "{left} s left");
    assert!(certs.all()[1].not_after - now > 365 * 86_400);
    assert_eq!(
        pick(&certs, Some("ec.example")).as_deref(),
        Some("ec.example")
    );
    // Both serve a QUIC context.
    assert!(Arc::new(certs).quic_context().is_ok());
}

#[test]
fn a_key_of_another_certificate_is_refused() {
    let d = dir("mismatch");
    site(&d, "a", &["a.example"]);
    site(&d, "b", &["b.example"]);
    let tls = ListenTls {
        certificates: vec![CertPair {
            cert: d.0.join("a.crt"),
            key: d.0.join("b.key"),
        }],
        unknown_sni: UnknownSni::Default,
    };
    let err = Certificates::load(&tls, &Arc::new(TlsShared::default())).unwrap_err();
    assert!(matches!(err, CertError::Mismatch { .. }), "{err}");
    assert!(err.to_string().contains("b.key"), "{err}");
}

#[test]
fn counters_outlive_a_reload_by_name() {
    let d = dir("counters");
    let counters = Arc::new(TlsShared::default());
    let tls = ListenTls {
        certificates: vec![site(&d, "a", &["a.example"])],
        unknown_sni: UnknownSni::Default,
    };
    let first = Certificates::load(&tls, &counters).unwrap();
    assert!(first.choose(Some("a.example")).is_some());
    let second = Certificates::load(&tls, &counters).unwrap();
    assert!(second.choose(Some("a.example")).is_some());
    assert_eq!(second.all()[0].handshakes(), 2);
}

#[test]
fn check_reports_names_and_warns_two_weeks_before_expiry() {
    let d = dir("report");
    let soon = SiteCert {
        names: &["soon.example"],
        key_pem: None,
        valid_days: Some(10),
    };
    issue_for(&d.0, "soon", "soon", &soon).unwrap();
    let tls = ListenTls {
        certificates: vec![
            site(&d, "a", &["a.example", "*.a.example"]),
            pair(&d, "soon"),
        ],
        unknown_sni: UnknownSni::Default,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (lines, warned) = report(&tls, now).unwrap();
    assert!(warned);
    assert!(
        lines[0].contains("a.example, *.a.example") && !lines[0].contains("WARNING"),
        "{lines:?}"
    );
    assert!(
        lines[1].contains("WARNING: expires in 9 days")
            || lines[1].contains("WARNING: expires in 10 days"),
        "{lines:?}"
    );
    let (lines, warned) = report(&tls, now + 30 * 86_400).unwrap();
    assert!(warned);
    assert!(lines[1].contains("EXPIRED"), "{lines:?}");
    let (_, warned) = report(&tls, now - 30 * 86_400).unwrap();
    assert!(!warned);
}

#[test]
fn a_certificate_installed_at_run_time_takes_its_names_first_everywhere() {
    let d = dir("managed");
    let shared = Arc::new(TlsShared::default());
    let tls = ListenTls {
        certificates: vec![site(&d, "a", &["a.example", "*.b.example"])],
        unknown_sni: UnknownSni::Refuse,
    };
    let certs = Certificates::load(&tls, &shared).unwrap();
    // A second snapshot (a reload) shares what the process obtained.
    let reloaded = Certificates::load(&tls, &shared).unwrap();
    assert_eq!(
        pick(&certs, Some("x.b.example")).as_deref(),
        Some("a.example")
    );
    assert!(!certs.several());
    site(&d, "acme", &["x.b.example"]);
    let obtained = shared
        .load(&d.0.join("acme.crt"), &d.0.join("acme.key"))
        .unwrap();
    shared.install("x.b.example", obtained);
    for c in [&certs, &reloaded] {
        assert_eq!(pick(c, Some("x.b.example")).as_deref(), Some("x.b.example"));
        assert_eq!(pick(c, Some("y.b.example")).as_deref(), Some("a.example"));
        assert!(c.several());
        assert!(c.misdirected(Some("a.example"), "x.b.example"));
        assert_eq!(c.all().len(), 2);
    }
    // A renewal replaces it (installed as the same entry, its names in any order).
    site(&d, "acme2", &["z.b.example", "x.b.example"]);
    let renewed = shared
        .load(&d.0.join("acme2.crt"), &d.0.join("acme2.key"))
        .unwrap();
    shared.install("x.b.example", renewed);
    assert_eq!(certs.all().len(), 2);
    assert!(certs.all()[1].cert_path.ends_with("acme2.crt"));
}
