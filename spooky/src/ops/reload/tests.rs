//! The two-phase switch against workers played by threads: every way a worker can fail to
//! take a configuration leaves every worker on the one it had.

use super::*;
use std::thread::JoinHandle;

const WAIT: Duration = Duration::from_millis(300);

/// How a played worker behaves.
#[derive(Clone, Copy, PartialEq)]
enum Plays {
    /// Prepares and commits.
    Fine,
    /// Refuses to prepare.
    Refuses,
    /// Never answers.
    Silent,
    /// Prepares, then never confirms the commit.
    SilentOnCommit,
}

/// A worker thread: returns the generations it ran, in order (it starts on 1).
fn worker(index: usize, plays: Plays) -> (Link<u32>, JoinHandle<Vec<u64>>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Command<u32>>();
    let thread = std::thread::spawn(move || {
        let mut running = vec![1];
        let mut staged = None;
        while let Some(cmd) = rx.blocking_recv() {
            match cmd {
                Command::Prepare {
                    generation,
                    update,
                    reply,
                } => {
                    assert_eq!(update as usize, index, "each worker gets its own update");
                    let result = match plays {
                        Plays::Silent => continue,
                        Plays::Refuses => Err("no room".to_owned()),
                        _ => {
                            staged = Some(generation);
                            Ok(())
                        }
                    };
                    let _ = reply.send(Answer {
                        worker: index,
                        result,
                    });
                }
                Command::Commit { generation, reply } => {
                    if staged.take() == Some(generation) {
                        running.push(generation);
                    }
                    if plays != Plays::SilentOnCommit {
                        let _ = reply.send(Answer {
                            worker: index,
                            result: Ok(()),
                        });
                    }
                }
                Command::Abort { generation } => {
                    if staged == Some(generation) {
                        staged = None;
                    }
                }
            }
        }
        running
    });
    (tx, thread)
}

fn run(plays: &[Plays]) -> (Result<Switched, SwitchError>, Vec<Vec<u64>>) {
    let (links, threads): (Vec<_>, Vec<_>) =
        plays.iter().enumerate().map(|(i, p)| worker(i, *p)).unzip();
    let updates = (0..plays.len() as u32).collect();
    let result = switch(&links, updates, 2, WAIT);
    drop(links);
    let ran = threads.into_iter().map(|t| t.join().unwrap()).collect();
    (result, ran)
}

#[test]
fn every_worker_switches_when_all_prepare() {
    let (result, ran) = run(&[Plays::Fine, Plays::Fine, Plays::Fine]);
    assert_eq!(result, Ok(Switched::default()));
    assert_eq!(ran, vec![vec![1, 2]; 3]);
}

#[test]
fn one_refusal_leaves_every_worker_on_the_old_configuration() {
    let (result, ran) = run(&[Plays::Fine, Plays::Refuses, Plays::Fine]);
    assert_eq!(
        result,
        Err(SwitchError::Refused {
            worker: 1,
            reason: "no room".into()
        })
    );
    assert_eq!(ran, vec![vec![1]; 3]);
}

#[test]
fn a_silent_worker_leaves_every_worker_on_the_old_configuration() {
    let (result, ran) = run(&[Plays::Fine, Plays::Fine, Plays::Silent]);
    assert_eq!(result, Err(SwitchError::NoAnswer(vec![2])));
    assert_eq!(ran, vec![vec![1]; 3]);
}

#[test]
fn a_gone_worker_is_skipped_and_reported_and_the_live_ones_switch() {
    let (first, first_thread) = worker(0, Plays::Fine);
    let (third, third_thread) = worker(2, Plays::Fine);
    let (closed, rx) = mpsc::unbounded_channel::<Command<u32>>();
    drop(rx);
    let result = switch(
        &[first.clone(), closed, third.clone()],
        vec![0, 1, 2],
        2,
        WAIT,
    );
    assert_eq!(result, Ok(Switched { gone: vec![1] }));
    drop((first, third));
    assert_eq!(first_thread.join().unwrap(), vec![1, 2]);
    assert_eq!(third_thread.join().unwrap(), vec![1, 2]);
    // With nobody alive there is nothing to switch.
    let (closed, rx) = mpsc::unbounded_channel::<Command<u32>>();
    drop(rx);
    assert_eq!(
        switch(&[closed], vec![0], 2, WAIT),
        Err(SwitchError::NoneAlive)
    );
}

#[test]
fn an_unconfirmed_commit_is_reported() {
    let (result, ran) = run(&[Plays::Fine, Plays::SilentOnCommit]);
    assert_eq!(result, Err(SwitchError::Unconfirmed(vec![1])));
    // It did switch, it only did not say so: the caller answers 5xx, never 200.
    assert_eq!(ran, vec![vec![1, 2]; 2]);
}

#[test]
fn configuration_problems_are_the_clients_and_switch_failures_ours() {
    assert!(ReloadError::NoFile.is_client_error());
    assert!(ReloadError::NeedsRestart(vec!["workers".into()]).is_client_error());
    assert!(!ReloadError::Workers(SwitchError::NoAnswer(vec![0])).is_client_error());
    let key = SnapshotError::Quic(QuicConfigError::Key {
        path: "k.pem".into(),
        source: quiche::Error::TlsFail,
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
    let first = Arc::new(Snapshot::build(config("spooky.key"), &board, &keys, 1).unwrap());
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
            ReloadError::Snapshot(SnapshotError::Quic(QuicConfigError::Key { .. }))
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
