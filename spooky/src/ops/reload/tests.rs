//! The reload coordinator: which failures are the configuration's (4xx) and which are ours,
//! and a snapshot that cannot be built leaving the one in force.

use super::*;
use crate::snapshot::QuicConfigError;
use std::sync::mpsc as std_mpsc;

#[test]
fn configuration_problems_are_the_clients_and_switch_failures_ours() {
    assert!(ReloadError::NoFile.is_client_error());
    assert!(ReloadError::NeedsRestart(vec!["workers".into()]).is_client_error());
    assert!(!ReloadError::Workers(SwitchError::NoAnswer(vec![0])).is_client_error());
    let key = SnapshotError::Certificates(crate::certs::CertError::Mismatch {
        cert: "c.pem".into(),
        key: "k.pem".into(),
    });
    assert!(ReloadError::Snapshot(key).is_client_error());
    let setting = SnapshotError::Quic(QuicConfigError::Setting(quiche::Error::TlsFail));
    assert!(!ReloadError::Snapshot(setting).is_client_error());
}

#[test]
fn a_snapshot_that_cannot_be_built_leaves_the_old_one_in_force_and_says_why() {
    let dir = std::env::temp_dir().join(format!("spooky-reload-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    spooky_peers::certs::generate(&dir).unwrap();
    spooky_peers::certs::issue(&dir, "other", "another certificate").unwrap();
    let config = |key: &str| {
        let yaml = format!(
            "version: 1\nlisten:\n  port: 9889\n  tls: {{cert: spooky.crt, key: {key}}}\n\
             upstream:\n  api:\n    backends:\n      - {{id: a1, address: \"127.0.0.1:7001\"}}\n"
        );
        crate::config::parse(&yaml, &dir).unwrap()
    };
    let board = Arc::new(HealthBoard::default());
    let keys = Keys::generate(&ring::rand::SystemRandom::new()).unwrap();
    let first = Arc::new(
        Snapshot::build(config("spooky.key"), &board, &Default::default(), &keys, 1).unwrap(),
    );
    let (followed_tx, followed) = std_mpsc::channel();
    let reloader = Reloader::new(
        first.clone(),
        None,
        board,
        keys,
        Vec::new(),
        Box::new(move |s: &Arc<Snapshot>| {
            let _ = followed_tx.send(s.generation);
        }),
    );
    // Both files parse, so validation passes; the key is not the certificate's.
    let err = reloader.apply(config("other.key")).unwrap_err();
    assert!(
        matches!(
            err,
            ReloadError::Snapshot(SnapshotError::Certificates(
                crate::certs::CertError::Mismatch { .. }
            ))
        ),
        "{err:?}"
    );
    assert!(err.is_client_error());
    assert!(err.to_string().contains("other.key"), "{err}");
    assert!(
        Arc::ptr_eq(&reloader.current(), &first),
        "the old snapshot stays"
    );
    assert!(
        followed.try_recv().is_err(),
        "nobody was told about a new one"
    );
    let summary = reloader.apply(config("spooky.key")).unwrap();
    assert!(summary.starts_with("generation 2"), "{summary}");
    assert_eq!(followed.try_recv(), Ok(2));
    let _ = std::fs::remove_dir_all(&dir);
}
