//! Both ends of a takeover (see `ops::takeover` for the conversation): the successor's start
//! ([`Successor`]) and the running process's control thread, which hands over to a
//! successor and then drains ([`serve_control`]).

use super::StartError;
use crate::keys::Keys;
use crate::ops::takeover::{self, ControlSocket, Message, TakeoverError};
use crate::quic::endpoint::Generations;
use crate::stats::WorkerStats;
use crate::steering::{Predecessor, Steering};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How long a successor's hello waits for this process's own predecessor to be gone.
const PREDECESSOR_WAIT: Duration = Duration::from_secs(10);

/// What a running process shares with its control thread.
pub(super) struct Live {
    pub steering: Mutex<Option<Steering>>,
    /// The admin listener (a handle to pass on) and what stops our admin thread.
    pub admin: Mutex<Option<(std::net::TcpListener, tokio::sync::oneshot::Sender<()>)>>,
    pub shutdown: watch::Sender<bool>,
    pub generations: watch::Sender<Generations>,
    /// Set once a successor serves; the process then drains and exits.
    pub handed_over: watch::Sender<bool>,
    pub stats: Vec<Arc<WorkerStats>>,
    /// The conversation with a successor, kept open until this process has stopped: its
    /// end of file tells the successor our connections are gone.
    pub successor: Mutex<Option<UnixStream>>,
    /// The control thread should stop.
    pub stopping: AtomicBool,
    /// The process we took over from still drains (a second takeover waits for it).
    pub predecessor_draining: AtomicBool,
    /// This process's own keys (used without `quic.key_file`), for a successor.
    pub keys: Keys,
    /// Bit `i`: worker `i` died while serving.
    pub dead: Arc<crate::board::AtomicWorkerSet>,
    /// A second handle on every worker's socket: a worker that has drained does not take its
    /// socket out of the SO_REUSEPORT group, which would move another socket into its place
    /// (the classic BPF program of a successor addresses sockets by place). They leave
    /// together, once every worker is done, or one by one when a worker dies.
    pub group: Mutex<Vec<Option<std::net::UdpSocket>>>,
    /// What ends each worker at once (`Running::kill_worker`).
    pub kills: Vec<Arc<tokio::sync::Notify>>,
}

/// A process starting as a successor: what the running one told it.
pub(super) struct Successor {
    stream: UnixStream,
    pub predecessor: Predecessor,
    /// The running process's admin listener, when it had one.
    pub admin: Option<std::net::TcpListener>,
    /// The running process's own keys.
    pub keys: Keys,
}

impl Successor {
    /// Tells the process listening on `control` that we take over, and learns its state.
    pub fn begin(control: &Path) -> Result<Self, StartError> {
        let mut stream = takeover::connect(control)?;
        takeover::send(
            &mut stream,
            &Message::Hello {
                pid: std::process::id(),
            },
            None,
        )?;
        match takeover::recv(&mut stream)? {
            (
                Message::State {
                    predecessor,
                    admin,
                    keys,
                },
                fd,
            ) => {
                let admin = admin
                    .then_some(fd)
                    .flatten()
                    .map(|fd: OwnedFd| std::net::TcpListener::from(fd));
                let keys = Keys::parse(&keys)
                    .map_err(|e| TakeoverError::Malformed(format!("keys: {e}")))?;
                tracing::info!(pid = predecessor.pid, generation = predecessor.generation, mode = %predecessor.mode, "taking over");
                Ok(Self {
                    stream,
                    predecessor,
                    admin,
                    keys,
                })
            }
            (Message::Refused { reason }, _) => Err(TakeoverError::Refused(reason).into()),
            (other, _) => Err(TakeoverError::Unexpected(Box::new(other)).into()),
        }
    }

    /// We serve: the predecessor may stop accepting and drain. Returns the conversation, to
    /// watch for its end.
    pub fn ready(mut self, generation: u8, workers: u32) -> Result<UnixStream, StartError> {
        takeover::send(
            &mut self.stream,
            &Message::Ready {
                generation,
                workers,
            },
            None,
        )?;
        Ok(self.stream)
    }
}

/// Waits for the predecessor to exit, then forgets it (its generation, its sockets' places).
pub(super) fn watch_predecessor(stream: UnixStream, predecessor: Predecessor, live: Arc<Live>) {
    let spawned = std::thread::Builder::new()
        .name("spooky-successor".into())
        .spawn(move || {
            takeover::wait_closed(stream);
            tracing::info!(pid = predecessor.pid, generation = predecessor.generation, "the predecessor has finished");
            // Classic BPF finds its sockets' places with probes: on a busy machine one may be
            // late, so try a few times.
            for attempt in 1..=5 {
                let gone = live
                    .steering
                    .lock()
                    .ok()
                    .and_then(|mut s| s.as_mut().map(|s| s.predecessor_gone(&predecessor)));
                match gone {
                    Some(Err(e)) if attempt < 5 => {
                        tracing::info!(error = %e, attempt, "steering: trying again to forget the predecessor");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "steering still knows the predecessor; misroutes are forwarded in user space");
                    }
                    _ => break,
                }
            }
            live.generations.send_modify(|g| {
                if let Some(w) = g.workers.get_mut(usize::from(predecessor.generation)) {
                    *w = 0;
                }
            });
            // Only now is our steering about us alone: a successor may come.
            live.predecessor_draining.store(false, Ordering::Relaxed);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot watch the predecessor");
    }
}

/// The control thread of a running process: waits for a successor on `control`, hands over to
/// it, then starts draining. One successor at a time; a failed handover leaves this process
/// serving as before.
pub(super) fn serve_control(control: ControlSocket, live: Arc<Live>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("spooky-control".into())
        .spawn(move || {
            loop {
                if live.stopping.load(Ordering::Relaxed) || *live.handed_over.borrow() {
                    break;
                }
                match control.accept() {
                    Ok(stream) => match hand_over(stream, &live) {
                        Ok(()) => break,
                        // A process that only checked whether we run (a second start).
                        Err(TakeoverError::Io(e))
                            if e.kind() == std::io::ErrorKind::UnexpectedEof =>
                        {
                            tracing::debug!(
                                "a connection to the control socket closed without a word"
                            );
                        }
                        Err(e) => tracing::error!(error = %e, "takeover failed; still serving"),
                    },
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
            // The successor binds its own control socket at this path: leave it be.
            if !*live.handed_over.borrow() {
                control.remove();
            }
        })
        .map(|_| ())
}

/// Hands over to the successor on `stream`.
fn hand_over(mut stream: UnixStream, live: &Live) -> Result<(), TakeoverError> {
    let (Message::Hello { pid }, _) = takeover::recv(&mut stream)? else {
        return Err(TakeoverError::Malformed("no Hello".into()));
    };
    // Our own predecessor may be finishing (its last connections, or our steering forgetting
    // it): a successor waits a little for that rather than being refused at once.
    let deadline = std::time::Instant::now() + PREDECESSOR_WAIT;
    while live.predecessor_draining.load(Ordering::Relaxed) && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let refusal = if *live.shutdown.borrow() {
        Some("this Spooky is shutting down".to_owned())
    } else if live.predecessor_draining.load(Ordering::Relaxed) {
        Some(
            "this Spooky's own predecessor is still draining; try again when it has exited"
                .to_owned(),
        )
    } else {
        None
    };
    if let Some(reason) = refusal {
        return Err(refuse(&mut stream, reason));
    }
    let handed = {
        let mut steering = live.steering.lock().unwrap_or_else(|p| p.into_inner());
        steering.as_mut().map(Steering::handover)
    };
    let predecessor = match handed {
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            return Err(refuse(
                &mut stream,
                format!("cannot hand over steering: {e}"),
            ))
        }
        None => return Err(TakeoverError::Refused("not running".into())),
    };
    tracing::info!(
        successor = pid,
        generation = predecessor.generation,
        "a successor takes over"
    );
    let admin_fd = live
        .admin
        .lock()
        .ok()
        .and_then(|a| a.as_ref().map(|(l, _)| l.as_raw_fd()));
    let state = Message::State {
        predecessor: predecessor.clone(),
        admin: admin_fd.is_some(),
        keys: live.keys.to_text(),
    };
    let ready =
        takeover::send(&mut stream, &state, admin_fd).and_then(|()| takeover::recv(&mut stream));
    let (generation, workers) = match ready {
        Ok((
            Message::Ready {
                generation,
                workers,
            },
            _,
        )) => (generation, workers),
        other => {
            // It never served: keep serving, with our steering back.
            let mut steering = live.steering.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = steering.as_mut() {
                s.handover_aborted();
            }
            return match other {
                Ok((Message::Refused { reason }, _)) => Err(TakeoverError::Refused(reason)),
                Ok((m, _)) => Err(TakeoverError::Unexpected(Box::new(m))),
                Err(e) => Err(e),
            };
        }
    };
    // The successor serves: new connections go to it, our clients get GOAWAY, we drain.
    live.generations.send_modify(|g| {
        g.newest = generation;
        if let Some(w) = g.workers.get_mut(usize::from(generation)) {
            *w = workers;
        }
    });
    if let Some((_, stop)) = live.admin.lock().ok().and_then(|mut a| a.take()) {
        let _ = stop.send(());
    }
    if let Ok(mut s) = live.successor.lock() {
        *s = Some(stream);
    }
    let _ = live.shutdown.send(true);
    let _ = live.handed_over.send(true);
    tracing::info!(
        successor = pid,
        successor_generation = generation,
        "handed over; draining"
    );
    log_drain(&live.stats);
    Ok(())
}

/// Tells the successor why it cannot take over; the error to return.
fn refuse(stream: &mut UnixStream, reason: String) -> TakeoverError {
    let refused = Message::Refused {
        reason: reason.clone(),
    };
    match takeover::send(stream, &refused, None) {
        Ok(()) => TakeoverError::Refused(reason),
        Err(e) => e,
    }
}

/// Logs the drain's progress every second until nothing is left.
fn log_drain(stats: &[Arc<WorkerStats>]) {
    let stats = stats.to_vec();
    let _ = std::thread::Builder::new()
        .name("spooky-drain".into())
        .spawn(move || loop {
            let sum = |f: fn(&WorkerStats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
            let connections = sum(|s| s.connections_active.load(Ordering::Relaxed));
            let streams = sum(|s| s.streams_active.load(Ordering::Relaxed));
            tracing::info!(connections, streams, "draining");
            if connections == 0 {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        });
}
