//! One worker per CPU: an OS thread (pinned when asked) running a single-threaded tokio
//! runtime with a `LocalSet`. A worker owns both fronts of its CPU — the QUIC front (one UDP
//! socket of the listener's SO_REUSEPORT group and its connections, [`crate::quic::front`])
//! and the TLS-over-TCP front ([`crate::tcp::Front`]) — their shared [`Forwarder`] (HTTP/2
//! pools, balancers), the QUIC timers, and the control messages: reloads (the two phases of
//! [`control::switch`]), the steering's generations, shutdown and the kill hook.
//! Nothing on the request path crosses threads or takes a lock.
//!
//! The loop's promise: however hard the socket is hit, control messages, timers and the
//! drain are served within one turn. A turn waits for anything to be ready, then does a
//! bounded amount of everything, whatever woke it: every pending control message, the due
//! timers, at most [`RECV_BATCH`] datagrams from the socket and as many handed over by other
//! workers, then services the touched connections. A turn that found a full batch yields to
//! the request tasks before the next one (quinn's driver bounds its I/O the same way).

pub mod control;

use crate::health::checker::Reporter;
use crate::http::{Forwarder, Services};
use crate::quic::endpoint::Generations;
use crate::quic::front::{self, Current, Forwarded, QuicFront, RECV_BATCH};
use crate::snapshot::Snapshot;
use crate::stats::{Metrics, WorkerStats};
use crate::steering::ProbeBoard;
use crate::tcp;
use crate::telemetry::access_log::AccessLogger;
use control::{Answer, Command, WorkerUpdate};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// What a worker thread is given.
pub struct WorkerSetup {
    pub index: usize,
    pub workers: usize,
    pub socket: std::net::UdpSocket,
    /// Its socket of the TCP listener's SO_REUSEPORT group, when `listen.tcp` is on.
    pub tcp: Option<std::net::TcpListener>,
    /// Its socket of the plaintext listener's group, when `listen.http` is on.
    pub plain: Option<std::net::TcpListener>,
    /// Where plaintext requests are redirected: the TLS listener's port (bound).
    pub https_port: u16,
    pub cpu: Option<usize>,
    pub ids: std::sync::Arc<crate::quic::ids::IdFormat>,
    pub rng: ring::rand::SystemRandom,
    /// What its request tasks use for the whole process: its counters, the metrics
    /// registry, the access log, the health checker's inbox.
    pub stats: Arc<WorkerStats>,
    pub metrics: Arc<Metrics>,
    pub access_log: Arc<AccessLogger>,
    pub policy: Arc<crate::policy::Policy>,
    pub health: Reporter,
    pub snapshot: Arc<Snapshot>,
    pub quic: quiche::Config,
    pub inbox: mpsc::Receiver<Forwarded>,
    pub peers: Vec<mpsc::Sender<Forwarded>>,
    pub shutdown: watch::Receiver<bool>,
    /// Reloads (two phases).
    pub commands: mpsc::UnboundedReceiver<Command<WorkerUpdate>>,
    /// eBPF steering is in force: the kernel places client-chosen DCIDs (skipping workers
    /// marked dead), so an Initial that reaches this worker is this worker's.
    pub kernel_places_initials: bool,
    /// The processes steering knows (this one, and one it takes over from or hands over to).
    pub generations: watch::Receiver<Generations>,
    /// Where probes of the classic BPF tier are reported.
    pub probes: Arc<ProbeBoard>,
    /// Its socket of the fleet forwarding group (`fleet.listen`), when fleet mode is on.
    pub fleet: Option<std::net::UdpSocket>,
    /// Ends the worker at once, as a crash would (`app::Running::kill_worker`, for tests of
    /// what happens when a worker dies).
    pub kill: Arc<tokio::sync::Notify>,
}

/// Why a worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("worker {worker}: cannot start its runtime: {source}")]
    Runtime {
        worker: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("worker {worker}: TCP listener: {source}")]
    Tcp {
        worker: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("worker {worker}: socket: {source}")]
    Socket {
        worker: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("worker {worker}: HTTP/3 settings: {source}")]
    H3 {
        worker: usize,
        #[source]
        source: crate::snapshot::QuicConfigError,
    },
    #[error("worker thread panicked")]
    Panicked,
    #[error("worker {0} was killed (test hook)")]
    Killed(usize),
}

/// Runs a worker on the current thread until shutdown completes.
///
/// # Errors
/// [`WorkerError`] when the runtime or the sockets cannot be set up.
pub fn run(setup: WorkerSetup) -> Result<(), WorkerError> {
    if let Some(cpu) = setup.cpu {
        pin_to_cpu(cpu);
    }
    let worker = setup.index;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| WorkerError::Runtime { worker, source })?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut worker = Worker::new(setup)?;
        worker.run().await
    })
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0, …) affects only this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(cpu, "could not pin worker thread to its CPU");
        }
    }
}

/// Everything a worker switches to for one snapshot.
struct Next {
    fwd: Rc<Forwarder>,
    quic: Current,
}

struct Worker {
    index: usize,
    services: Rc<Services>,
    /// The forwarder in force (both fronts use it for new requests).
    fwd: Rc<Forwarder>,
    quic: QuicFront,
    /// The TCP fronts: TLS (when `listen.tcp` is on) and plaintext (when `listen.http` is).
    tcp: Vec<tcp::Front>,
    /// A prepared reload waiting for its commit: (generation, what to switch to).
    staged: Option<(u64, Next)>,
    inbox: mpsc::Receiver<Forwarded>,
    shutdown: watch::Receiver<bool>,
    commands: mpsc::UnboundedReceiver<Command<WorkerUpdate>>,
    generations: watch::Receiver<Generations>,
    /// The generations' sender is still there (its channel has not closed).
    generations_open: bool,
    kill: Arc<tokio::sync::Notify>,
    /// Draining: when the grace period ends (then everything still open is closed).
    grace_end: Option<Instant>,
}

/// What a turn of the loop found ready while it waited.
enum Woke {
    Killed,
    Other,
}

impl Worker {
    fn new(setup: WorkerSetup) -> Result<Self, WorkerError> {
        let worker = setup.index;
        let h3config = setup
            .snapshot
            .h3_config()
            .map_err(|source| WorkerError::H3 { worker, source })?;
        let services = Rc::new(Services {
            worker,
            workers: setup.workers,
            stats: setup.stats,
            metrics: setup.metrics,
            access_log: setup.access_log,
            health: setup.health,
            wakeup: Rc::default(),
            log_gate: Default::default(),
            policy: setup.policy,
        });
        let fwd = Rc::new(Forwarder::new(services.clone(), setup.snapshot, None));
        let mut tcp = Vec::new();
        for (listener, kind) in [
            (setup.tcp, tcp::Kind::Tls),
            (
                setup.plain,
                tcp::Kind::Plain {
                    https_port: setup.https_port,
                },
            ),
        ] {
            if let Some(listener) = listener {
                tcp.push(
                    tcp::Front::start(listener, fwd.clone(), setup.workers, kind)
                        .map_err(|source| WorkerError::Tcp { worker, source })?,
                );
            }
        }
        let generations = *setup.generations.borrow();
        let quic = QuicFront::new(front::Setup {
            index: worker,
            workers: setup.workers,
            socket: setup.socket,
            ids: setup.ids,
            rng: setup.rng,
            services: services.clone(),
            current: Current {
                fwd: fwd.clone(),
                qconfig: setup.quic,
                h3config,
            },
            peers: setup.peers,
            kernel_places_initials: setup.kernel_places_initials,
            generations,
            probes: setup.probes,
            fleet: setup.fleet,
        })
        .map_err(|source| WorkerError::Socket { worker, source })?;
        Ok(Self {
            index: worker,
            services,
            fwd,
            quic,
            tcp,
            staged: None,
            inbox: setup.inbox,
            shutdown: setup.shutdown,
            commands: setup.commands,
            generations: setup.generations,
            generations_open: true,
            kill: setup.kill,
            grace_end: None,
        })
    }

    async fn run(&mut self) -> Result<(), WorkerError> {
        tracing::debug!(worker = self.index, "worker running");
        loop {
            if let Woke::Killed = self.wait().await {
                return Err(WorkerError::Killed(self.index));
            }
            // A bounded amount of everything, whatever woke us.
            self.control();
            self.quic.fire_timers();
            let datagrams = self.quic.recv_batch();
            let mut handed = 0;
            while handed < RECV_BATCH {
                let Ok(f) = self.inbox.try_recv() else { break };
                self.quic.on_forwarded(f);
                handed += 1;
            }
            self.quic.service().await;
            let tcp_open: usize = self.tcp.iter().map(tcp::Front::open).sum();
            if self.grace_end.is_some() && self.quic.open() == 0 && tcp_open == 0 {
                tracing::info!(worker = self.index, "worker drained");
                return Ok(());
            }
            if datagrams == RECV_BATCH || handed == RECV_BATCH {
                // More is waiting: let the request tasks run first.
                tokio::task::yield_now().await;
            }
        }
    }

    /// Waits until something is ready: a control message, a timer, the socket, a request
    /// task's wake-up, a datagram from another worker, the TCP front emptying while draining.
    /// Control messages are looked at first.
    async fn wait(&mut self) -> Woke {
        let next_timer = self.quic.next_timer();
        let grace_end = self.grace_end;
        let draining = self.grace_end.is_some();
        let tcp = self.tcp.clone();
        // Only while draining with TCP connections open: it resolves at once otherwise.
        let tcp_waits = draining && tcp.iter().any(|t| t.open() > 0);
        let tcp_drained = async {
            if tcp.is_empty() {
                std::future::pending::<()>().await;
            }
            for front in &tcp {
                front.all_closed().await;
            }
        };
        let wakeup = self.services.wakeup.clone();
        tokio::select! {
            biased;
            () = self.kill.notified() => Woke::Killed,
            Some(cmd) = self.commands.recv() => {
                self.on_command(cmd);
                Woke::Other
            }
            r = self.shutdown.changed(), if !draining => {
                if r.is_err() || *self.shutdown.borrow() {
                    self.begin_drain();
                }
                Woke::Other
            }
            r = self.generations.changed(), if self.generations_open => {
                match r {
                    Ok(()) => {
                        let g = *self.generations.borrow_and_update();
                        self.quic.set_generations(g);
                    }
                    Err(_) => self.generations_open = false,
                }
                Woke::Other
            }
            () = sleep_until(grace_end) => Woke::Other,
            () = sleep_until(next_timer) => Woke::Other,
            () = self.quic.readable() => Woke::Other,
            () = wakeup.notified() => Woke::Other,
            Some(f) = self.inbox.recv() => {
                self.quic.on_forwarded(f);
                Woke::Other
            }
            () = tcp_drained, if tcp_waits => Woke::Other,
        }
    }

    /// Every pending control message: reload phases, generation changes, the shutdown, the
    /// end of the grace period.
    fn control(&mut self) {
        while let Ok(cmd) = self.commands.try_recv() {
            self.on_command(cmd);
        }
        if self.generations.has_changed().unwrap_or(false) {
            let g = *self.generations.borrow_and_update();
            self.quic.set_generations(g);
        }
        // A closed channel (the process is going away) drains too.
        if self.grace_end.is_none()
            && (*self.shutdown.borrow() || self.shutdown.has_changed().is_err())
        {
            self.begin_drain();
        }
        if self.grace_end.is_some_and(|end| Instant::now() >= end) {
            self.close_all();
        }
    }

    /// A reload phase. Prepare builds everything for the new snapshot (pools of backends
    /// that did not change carry over) and keeps it; commit switches to it between two
    /// turns: new requests use it, requests in flight keep the forwarder they started
    /// with, connections stay.
    fn on_command(&mut self, cmd: Command<WorkerUpdate>) {
        let worker = self.index;
        match cmd {
            Command::Prepare {
                generation,
                update,
                reply,
            } => {
                let result = update.snapshot.h3_config().map(|h3config| {
                    let fwd = Rc::new(Forwarder::new(
                        self.services.clone(),
                        update.snapshot,
                        Some(&self.fwd),
                    ));
                    Next {
                        quic: Current {
                            fwd: fwd.clone(),
                            qconfig: update.quic,
                            h3config,
                        },
                        fwd,
                    }
                });
                let answer = match result {
                    Ok(next) => {
                        self.staged = Some((generation, next));
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                };
                let _ = reply.send(Answer {
                    worker,
                    result: answer,
                });
            }
            Command::Commit { generation, reply } => {
                let result = match self.staged.take() {
                    Some((g, next)) if g == generation => {
                        self.fwd = next.fwd;
                        self.quic.switch(next.quic);
                        for front in &self.tcp {
                            front.set_forwarder(self.fwd.clone());
                        }
                        self.services
                            .stats
                            .snapshots_applied
                            .fetch_add(1, Ordering::Release);
                        tracing::debug!(worker, generation, "configuration snapshot applied");
                        Ok(())
                    }
                    _ => Err(format!("generation {generation} was not prepared")),
                };
                let _ = reply.send(Answer { worker, result });
            }
            Command::Abort { generation } => {
                if self.staged.as_ref().is_some_and(|(g, _)| *g == generation) {
                    self.staged = None;
                }
            }
        }
    }

    fn begin_drain(&mut self) {
        let grace = self.fwd.snapshot.config.proxy.shutdown_grace;
        tracing::info!(
            worker = self.index,
            connections = self.quic.open(),
            tcp_connections = self.tcp.iter().map(tcp::Front::open).sum::<usize>(),
            ?grace,
            "draining"
        );
        self.quic.drain();
        for front in &self.tcp {
            front.drain();
        }
        self.grace_end = Some(Instant::now() + grace);
    }

    fn close_all(&mut self) {
        self.quic.close_all();
        for front in &self.tcp {
            front.close_all();
        }
        // Closing takes a little while (CONNECTION_CLOSE, quiche's draining period): the
        // loop ends when the last connection is gone.
        self.grace_end = Some(Instant::now() + Duration::from_secs(3600));
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
