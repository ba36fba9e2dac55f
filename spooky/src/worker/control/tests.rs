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
