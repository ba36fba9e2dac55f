//! Starting and stopping Spooky: the one module that wires everything together, and that no
//! other module imports (the `spooky` binary and the integration tests call it).
//!
//! Start-up, in order: the process-lifetime state (counters, the metrics registry, the
//! health board, the token key, the access-log writer); the first configuration
//! [`Snapshot`]; one UDP socket per worker in a SO_REUSEPORT group, with the steering tier
//! attached; the admin listener; the privilege drop; the health checker; the workers. Nothing
//! keeps running when a step fails. Shutdown: workers drain (GOAWAY, in-flight requests get
//! `proxy.shutdown_grace`), then the admin listener, the checker and the kernel steering stop.

use crate::board::HealthBoard;
use crate::config::{Config, ConfigError};
use crate::health::checker::Checker;
use crate::http::{Services, Wakeup};
use crate::ops::access_log::AccessLogger;
use crate::ops::privilege::PrivilegeError;
use crate::ops::reload::{Link, Reloader, WorkerUpdate};
use crate::ops::Ops;
use crate::quic::token::TokenKey;
pub use crate::quic::worker::WorkerError;
use crate::quic::worker::{self, WorkerSetup};
pub use crate::snapshot::SnapshotError;
use crate::snapshot::{QuicConfigError, Snapshot};
use crate::stats::{Metrics, WorkerStats};
use crate::steering::{self, Mode, Steering, SteeringError};
use spooky_common::CidLayout;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// What `start` was asked to do beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub workers: Option<usize>,
    pub iface: Option<String>,
    /// Pin worker k to CPU k (default on when there are at least as many CPUs as workers).
    pub pin: bool,
}

/// Why Spooky could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{}: {source}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("connection ID layout: {0:?}")]
    Layout(spooky_common::cid::LayoutError),
    #[error("{0}")]
    Snapshot(#[from] SnapshotError),
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("steering: {0}")]
    Steering(#[from] SteeringError),
    #[error("admin listener {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("dropping privileges: {0}")]
    Privilege(#[from] PrivilegeError),
    #[error("access log: {0}")]
    AccessLog(#[source] std::io::Error),
    #[error("no randomness for the token key")]
    Randomness,
    #[error("cannot start thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A running Spooky: its workers, its control threads, and the handle to stop it.
pub struct Running {
    pub local_addr: SocketAddr,
    pub steering: Mode,
    /// Where the admin listener listens, when enabled.
    pub admin_addr: Option<SocketAddr>,
    ops: Arc<Ops>,
    admin_stop: Option<tokio::sync::oneshot::Sender<()>>,
    shutdown: watch::Sender<bool>,
    workers: Vec<std::thread::JoinHandle<Result<(), WorkerError>>>,
    checker: Option<Checker>,
    /// Kept alive while running; detached (XDP off, pins removed) after the workers stop.
    kernel_steering: Option<Steering>,
}

impl Running {
    /// The configuration in force and reloads.
    pub fn reloader(&self) -> Arc<Reloader> {
        self.ops.reloader.clone()
    }

    /// `/metrics` text.
    pub fn metrics_text(&self) -> String {
        self.ops.metrics_text()
    }

    /// Each worker's counters.
    pub fn worker_stats(&self) -> &[Arc<WorkerStats>] {
        &self.ops.stats
    }

    /// Starts graceful shutdown: GOAWAY to clients, in-flight requests finish within the
    /// configured grace, then connections close.
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits for every worker to finish, then stops the rest.
    ///
    /// # Errors
    /// The first worker error.
    pub fn join(mut self) -> Result<(), WorkerError> {
        let mut first_err = None;
        for w in self.workers.drain(..) {
            let result = w.join().unwrap_or(Err(WorkerError::Panicked));
            if let Err(e) = result {
                first_err.get_or_insert(e);
            }
        }
        if let Some(stop) = self.admin_stop.take() {
            let _ = stop.send(());
        }
        if let Some(c) = self.checker.take() {
            c.stop();
        }
        if let Some(s) = self.kernel_steering.take() {
            s.detach();
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Starts Spooky on `config`; reloads are refused (there is no file to read again).
///
/// # Errors
/// [`StartError`] when any of it cannot be set up; nothing keeps running then.
pub fn start(config: Config, opts: &RunOptions) -> Result<Running, StartError> {
    start_from(config, opts, None)
}

/// Loads the configuration at `path` and starts Spooky; reloads read that file again.
///
/// # Errors
/// [`StartError::Config`] for an unreadable or invalid file, else as [`start`].
pub fn start_file(path: &Path, opts: &RunOptions) -> Result<Running, StartError> {
    let config = Config::from_path(path).map_err(|source| StartError::Config {
        path: path.to_path_buf(),
        source,
    })?;
    start_from(config, opts, Some(path.to_path_buf()))
}

/// Binds `workers` UDP sockets on `addr` in one SO_REUSEPORT group, in worker order (the
/// group's socket index is the worker index).
///
/// # Errors
/// [`StartError::Bind`] naming the address.
pub fn bind_group(
    addr: SocketAddr,
    workers: usize,
) -> Result<Vec<std::net::UdpSocket>, StartError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut out = Vec::with_capacity(workers);
    for _ in 0..workers {
        let bind_err = |source| StartError::Bind { addr, source };
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(bind_err)?;
        s.set_reuse_port(true).map_err(bind_err)?;
        if addr.is_ipv6() {
            let _ = s.set_only_v6(false);
        }
        let _ = s.set_recv_buffer_size(4 << 20);
        let _ = s.set_send_buffer_size(4 << 20);
        s.set_nonblocking(true).map_err(bind_err)?;
        s.bind(&addr.into()).map_err(bind_err)?;
        out.push(s.into());
    }
    Ok(out)
}

/// Starts Spooky on `config`, which came from `path` (reloads read that file again;
/// command-line overrides of steering settings stay in force).
///
/// # Errors
/// As [`start`].
pub fn start_from(
    config: Config,
    opts: &RunOptions,
    path: Option<PathBuf>,
) -> Result<Running, StartError> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let workers = opts
        .workers
        .or(config.workers)
        .unwrap_or(cpus)
        .clamp(1, 255);
    let pin = opts.pin && cpus >= workers;
    let quic = &config.quic;
    let layout = CidLayout::new(quic.cid_len, quic.server_id.len() as u8, quic.generation)
        .map_err(StartError::Layout)?;

    // Process-lifetime state.
    let rng = ring::rand::SystemRandom::new();
    let token_key = Arc::new(TokenKey::generate(&rng).map_err(|_| StartError::Randomness)?);
    let stats: Vec<Arc<WorkerStats>> = (0..workers)
        .map(|_| Arc::new(WorkerStats::default()))
        .collect();
    let metrics = Arc::new(Metrics::new(workers));
    let board = Arc::new(HealthBoard::default());
    let access_log =
        Arc::new(AccessLogger::start(&config.log.access).map_err(StartError::AccessLog)?);

    // The first snapshot, complete before anything uses it.
    let snapshot = Arc::new(Snapshot::build(config, &board, 1)?);
    let cfg = &snapshot.config;
    let quic_configs = (0..workers)
        .map(|_| snapshot.quic_config())
        .collect::<Result<Vec<_>, QuicConfigError>>()
        .map_err(SnapshotError::from)?;

    let sockets = bind_group(cfg.listen.addr, workers)?;
    let local_addr = sockets
        .first()
        .and_then(|s| s.local_addr().ok())
        .unwrap_or(cfg.listen.addr);
    let mut kernel_steering = steering::attach(
        &sockets,
        &steering::Plan {
            layout,
            generation: cfg.quic.generation,
            server_id_len: cfg.quic.server_id.len() as u8,
            settings: &cfg.steering,
            iface: opts.iface.as_deref(),
            pin,
            stats: &stats,
        },
    )?;
    let mode = kernel_steering.mode();
    tracing::info!(mode = %mode, workers, listen = %local_addr, "steering mode");

    let admin_listener = match cfg.admin.addr {
        Some(addr) => Some(
            crate::ops::admin::bind(addr).map_err(|source| StartError::Admin { addr, source })?,
        ),
        None => None,
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(user) = &cfg.user {
        let pins = kernel_steering.pin_path().map(Path::to_path_buf);
        let (uid, gid) = crate::ops::privilege::drop_to(user, pins.as_deref())?;
        tracing::info!(%user, uid, gid, "dropped privileges");
    }

    let (checker, reporter) = Checker::start(
        snapshot.clone(),
        metrics.clone(),
        kernel_steering.take_backends(),
    )
    .map_err(StartError::Thread)?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut peers = Vec::with_capacity(workers);
    let mut inboxes = Vec::with_capacity(workers);
    let mut links: Vec<Link<WorkerUpdate>> = Vec::with_capacity(workers);
    let mut commands = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = mpsc::channel(1024);
        peers.push(tx);
        inboxes.push(rx);
        let (tx, rx) = mpsc::unbounded_channel();
        links.push(tx);
        commands.push(rx);
    }
    let reloader = Arc::new(Reloader::new(
        snapshot.clone(),
        path,
        board,
        links,
        checker.follower(),
    ));
    let ops = Arc::new(Ops {
        reloader,
        stats: stats.clone(),
        metrics: metrics.clone(),
        access_log: access_log.clone(),
        ebpf: kernel_steering.ebpf_metrics(),
        mode: mode.to_string(),
    });
    let admin_stop = match admin_listener {
        Some(listener) => Some(start_admin(listener, ops.clone(), admin_addr)?),
        None => None,
    };

    let mut handles = Vec::with_capacity(workers);
    let per_worker = sockets
        .into_iter()
        .zip(inboxes)
        .zip(commands)
        .zip(quic_configs);
    for (index, (((socket, inbox), commands), quic)) in per_worker.enumerate() {
        let setup = WorkerSetup {
            index,
            workers,
            socket,
            cpu: pin.then_some(index),
            layout,
            token_key: token_key.clone(),
            rng: rng.clone(),
            services: Services {
                worker: index,
                stats: stats[index].clone(),
                metrics: metrics.clone(),
                access_log: access_log.clone(),
                health: reporter.clone(),
                wakeup: Wakeup::default(),
            },
            snapshot: snapshot.clone(),
            quic,
            inbox,
            peers: peers.clone(),
            shutdown: shutdown_rx.clone(),
            commands,
            kernel_places_initials: mode.is_ebpf(),
        };
        let h = std::thread::Builder::new()
            .name(format!("spooky-w{index}"))
            .spawn(move || worker::run(setup))
            .map_err(StartError::Thread)?;
        handles.push(h);
    }
    Ok(Running {
        local_addr,
        steering: mode,
        admin_addr,
        ops,
        admin_stop,
        shutdown: shutdown_tx,
        workers: handles,
        checker: Some(checker),
        kernel_steering: Some(kernel_steering),
    })
}

/// The admin listener's thread; returns what stops it.
fn start_admin(
    listener: std::net::TcpListener,
    ops: Arc<Ops>,
    addr: Option<SocketAddr>,
) -> Result<tokio::sync::oneshot::Sender<()>, StartError> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("spooky-admin".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                tracing::error!("admin thread: no runtime");
                return;
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => {
                        tokio::select! {
                            () = crate::ops::admin::serve(l, ops) => {}
                            _ = stopped => {}
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "admin listener"),
                }
            });
        })
        .map_err(StartError::Thread)?;
    if let Some(addr) = addr {
        tracing::info!(%addr, "admin listener (metrics, health, status, reload)");
    }
    Ok(stop)
}
