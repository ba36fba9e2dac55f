//! A worker's control protocol for reloads: the two phases a configuration switch goes
//! through ([`Command`]: prepare, commit, abort) and [`switch`], which drives every live
//! worker through them, all or none. The reload coordinator (`ops::reload`) reads and builds
//! the configuration and calls [`switch`]; a worker answers [`Command`]s in its loop.

use crate::snapshot::Snapshot;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long workers have to answer each phase.
pub const WORKER_ANSWER: Duration = Duration::from_secs(2);

/// What the reload coordinator tells one worker.
#[derive(Debug)]
pub enum Command<U> {
    /// Build what you need from `update` and keep it ready; answer on `reply`.
    Prepare {
        generation: u64,
        update: U,
        reply: std_mpsc::Sender<Answer>,
    },
    /// Switch to the prepared `generation`; confirm on `reply`.
    Commit {
        generation: u64,
        reply: std_mpsc::Sender<Answer>,
    },
    /// Forget the prepared `generation`.
    Abort { generation: u64 },
}

/// A worker's answer to a phase.
#[derive(Debug)]
pub struct Answer {
    pub worker: usize,
    /// `Err` with the reason when the worker cannot do it.
    pub result: Result<(), String>,
}

/// What a worker gets with a new snapshot: the snapshot and its own QUIC configuration.
pub struct WorkerUpdate {
    pub snapshot: Arc<Snapshot>,
    pub quic: quiche::Config,
}

impl std::fmt::Debug for WorkerUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerUpdate")
            .field("generation", &self.snapshot.generation)
            .finish_non_exhaustive()
    }
}

/// The coordinator's line to one worker.
pub type Link<U> = mpsc::UnboundedSender<Command<U>>;

/// Why the workers did not switch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwitchError {
    #[error("no worker is alive")]
    NoneAlive,
    #[error("worker {worker} cannot take the new configuration: {reason}")]
    Refused { worker: usize, reason: String },
    #[error("workers {0:?} did not answer within {WORKER_ANSWER:?}; nothing changed")]
    NoAnswer(Vec<usize>),
    /// The commit went out but not every worker confirmed it: those listed may still run the
    /// previous configuration.
    #[error("workers {0:?} did not confirm the switch within {WORKER_ANSWER:?}")]
    Unconfirmed(Vec<usize>),
}

/// Makes every live worker of `links` switch to `generation`, with `updates[i]` for worker
/// `i`, or none of them. A worker that is gone (its thread ended: it died) cannot take
/// anything and holds nobody's requests: the live ones switch without it, and it is
/// reported. Blocks for at most twice `wait`.
///
/// # Errors
/// [`SwitchError`]; all but [`SwitchError::Unconfirmed`] leave every worker as it was.
pub fn switch<U>(
    links: &[Link<U>],
    updates: Vec<U>,
    generation: u64,
    wait: Duration,
) -> Result<Switched, SwitchError> {
    let (tx, rx) = std_mpsc::channel();
    let mut gone = Vec::new();
    for (worker, (link, update)) in links.iter().zip(updates).enumerate() {
        let prepare = Command::Prepare {
            generation,
            update,
            reply: tx.clone(),
        };
        if link.send(prepare).is_err() {
            gone.push(worker);
        }
    }
    let live: Vec<usize> = (0..links.len()).filter(|w| !gone.contains(w)).collect();
    if live.is_empty() && !links.is_empty() {
        return Err(SwitchError::NoneAlive);
    }
    let abort_all = || {
        for link in links {
            let _ = link.send(Command::Abort { generation });
        }
    };
    if let Err(e) = collect(&rx, &live, wait) {
        abort_all();
        return Err(match e {
            Missing::Refused(worker, reason) => SwitchError::Refused { worker, reason },
            Missing::Silent(workers) => SwitchError::NoAnswer(workers),
        });
    }
    for &w in &live {
        let commit = Command::Commit {
            generation,
            reply: tx.clone(),
        };
        if links.get(w).is_some_and(|l| l.send(commit).is_err()) {
            // It died between the phases: it holds nothing any more either.
            gone.push(w);
        }
    }
    let live: Vec<usize> = live.into_iter().filter(|w| !gone.contains(w)).collect();
    collect(&rx, &live, wait).map_err(|e| match e {
        Missing::Refused(worker, _) => SwitchError::Unconfirmed(vec![worker]),
        Missing::Silent(workers) => SwitchError::Unconfirmed(workers),
    })?;
    Ok(Switched { gone })
}

/// A switch that happened: the workers that were gone (dead) and did not take part.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Switched {
    pub gone: Vec<usize>,
}

enum Missing {
    Refused(usize, String),
    Silent(Vec<usize>),
}

/// Waits for a positive answer from each of `workers`.
fn collect(
    rx: &std_mpsc::Receiver<Answer>,
    workers: &[usize],
    wait: Duration,
) -> Result<(), Missing> {
    let deadline = Instant::now() + wait;
    let mut waiting: Vec<usize> = workers.to_vec();
    while !waiting.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Answer { worker, result }) => {
                if let Err(reason) = result {
                    return Err(Missing::Refused(worker, reason));
                }
                waiting.retain(|w| *w != worker);
            }
            Err(_) => return Err(Missing::Silent(waiting)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
