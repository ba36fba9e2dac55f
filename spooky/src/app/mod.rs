//! Starting and stopping Spooky: the one module that wires everything together, and that no
//! other module imports (the `spooky` binary and the integration tests call it).
//!
//! Start-up, in order: (a successor: the running process's state, over its control socket);
//! the process-lifetime state (counters, the metrics registry, the health board, random keys,
//! the access-log writer); the first configuration [`Snapshot`]; one UDP socket per worker in
//! a SO_REUSEPORT group, with the steering tier attached (next to the predecessor's, for a
//! successor); the admin listener (the predecessor's, for a successor); the control socket;
//! the privilege drop; the health checker; the workers. Nothing keeps running when a step
//! fails. Shutdown: workers drain (GOAWAY, in-flight requests get `proxy.shutdown_grace`),
//! then the admin listener, the checker and the kernel steering stop. A takeover
//! ([`takeover`]) is a shutdown that begins once the successor serves.

mod takeover;
mod watchdog;

use crate::board::HealthBoard;
use crate::config::{Config, ConfigError, ControlSocket as ControlSetting};
use crate::health::checker::Checker;
use crate::keys::Keys;
use crate::ops::reload::Reloader;
use crate::ops::takeover::{ControlSocket, TakeoverError};
use crate::ops::Ops;
use crate::privilege::PrivilegeError;
use crate::quic::endpoint::Generations;
use crate::quic::ids::IdFormat;
pub use crate::snapshot::SnapshotError;
use crate::snapshot::{QuicConfigError, Snapshot};
use crate::stats::{Metrics, WorkerStats};
use crate::steering::{self, Mode, ProbeBoard, SteeringError};
use crate::telemetry::access_log::AccessLogger;
use crate::worker::control::{Link, WorkerUpdate};
pub use crate::worker::WorkerError;
use crate::worker::{self, WorkerSetup};
use spooky_common::cid::next_generation;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use takeover::{Live, Successor};
use tokio::sync::{mpsc, watch};

/// What `start` was asked to do beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub workers: Option<usize>,
    pub iface: Option<String>,
    /// Pin worker k to CPU k (default on when there are at least as many CPUs as workers).
    pub pin: bool,
    /// Take over from the Spooky listening on the configuration's control socket.
    pub takeover: bool,
    /// Give up every capability and set `no_new_privs` once the privileged set-up is done,
    /// before the workers start (the binary does; tests that start Spooky in their own
    /// process, and then need root themselves, do not).
    pub lock_down: bool,
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
    #[error("resolver: {0}")]
    Dns(String),
    #[error("{0}")]
    Snapshot(#[from] SnapshotError),
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("acme.state_dir {}: {source}", path.display())]
    Acme {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("listen.tcp: cannot listen on TCP {addr}: {source}")]
    BindTcp {
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
    #[error("{0}")]
    Takeover(#[from] TakeoverError),
}

/// A running Spooky: its workers, its control threads, and the handle to stop it.
pub struct Running {
    pub local_addr: SocketAddr,
    /// Where the TLS-over-TCP listener listens, when on.
    pub tcp_addr: Option<SocketAddr>,
    /// Where the plaintext HTTP/1.1 listener listens, when on.
    pub http_addr: Option<SocketAddr>,
    pub steering: Mode,
    /// Where the admin listener listens, when enabled.
    pub admin_addr: Option<SocketAddr>,
    /// This process's connection-ID generation.
    pub generation: u8,
    ops: Arc<Ops>,
    live: Arc<Live>,
    workers: Vec<std::thread::JoinHandle<Result<(), WorkerError>>>,
    checker: Option<Checker>,
    /// Stops the ACME thread, when there is one.
    acme: Option<tokio::sync::oneshot::Sender<()>>,
    /// Stops the resolver's thread.
    dns: Option<std::sync::mpsc::Sender<()>>,
}

impl Running {
    /// The configuration in force and reloads.
    pub fn reloader(&self) -> Arc<Reloader> {
        self.ops.reloader.clone()
    }

    /// Has the access log reopen its file (SIGUSR1, after logrotate moved it).
    pub fn reopen_access_log(&self) {
        self.ops.access_log.reopen();
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
        let _ = self.live.shutdown.send(true);
    }

    /// Ends worker `index` at once, as a crash would (for tests of what a dead worker does
    /// to the rest).
    #[doc(hidden)]
    pub fn kill_worker(&self, index: usize) {
        if let Some(kill) = self.live.kills.get(index) {
            kill.notify_one();
        }
    }

    /// Turns true once a successor serves (this process is draining then).
    pub fn handed_over(&self) -> watch::Receiver<bool> {
        self.live.handed_over.subscribe()
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
        self.live
            .stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some((_, stop)) = self.live.admin.lock().ok().and_then(|mut a| a.take()) {
            let _ = stop.send(());
        }
        if let Some(c) = self.checker.take() {
            c.stop();
        }
        if let Some(stop) = self.acme.take() {
            let _ = stop.send(());
        }
        if let Some(stop) = self.dns.take() {
            let _ = stop.send(());
        }
        let steering = self.live.steering.lock().ok().and_then(|mut s| s.take());
        if let Some(s) = steering {
            s.detach();
        }
        if let Ok(mut group) = self.live.group.lock() {
            group.clear();
        }
        // Last: our connections and sockets are gone, so the successor may forget us.
        if let Ok(mut successor) = self.live.successor.lock() {
            successor.take();
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

/// Binds `workers` TCP listening sockets on `addr` in one SO_REUSEPORT group, one per worker.
///
/// # Errors
/// [`StartError::BindTcp`] naming the address.
pub fn bind_tcp_group(
    addr: SocketAddr,
    workers: usize,
) -> Result<Vec<std::net::TcpListener>, StartError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(workers);
    // Port 0: the first socket picks one, the others join it.
    let mut addr = addr;
    for _ in 0..workers {
        let bind_err = |source| StartError::BindTcp { addr, source };
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(bind_err)?;
        s.set_reuse_address(true).map_err(bind_err)?;
        s.set_reuse_port(true).map_err(bind_err)?;
        if addr.is_ipv6() {
            let _ = s.set_only_v6(false);
        }
        s.set_nonblocking(true).map_err(bind_err)?;
        s.bind(&addr.into()).map_err(bind_err)?;
        s.listen(1024).map_err(bind_err)?;
        let l: std::net::TcpListener = s.into();
        if let Ok(a) = l.local_addr() {
            addr = a;
        }
        out.push(l);
    }
    Ok(out)
}

/// At a takeover both processes' TCP listeners are in one SO_REUSEPORT group, and the
/// predecessor closes its own: with `net.ipv4.tcp_migrate_req` (Linux 5.14) the kernel moves
/// connections still in their accept queues to ours instead of resetting them. Set here,
/// in our network namespace, when we can.
fn enable_tcp_migration() {
    const PATH: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    match std::fs::read_to_string(PATH) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => match std::fs::write(PATH, "1") {
            Ok(()) => tracing::info!("set net.ipv4.tcp_migrate_req = 1: TCP connections queued at the predecessor's listeners move to ours"),
            Err(e) => tracing::warn!(error = %e, "cannot set net.ipv4.tcp_migrate_req: TCP connections queued at the predecessor when it stops listening are reset"),
        },
        Err(e) => tracing::warn!(error = %e, "no net.ipv4.tcp_migrate_req (Linux before 5.14?): TCP connections queued at the predecessor when it stops listening are reset"),
    }
}

/// Starts Spooky on `config`, which came from `path` (reloads read that file again;
/// command-line overrides of steering settings stay in force). With `opts.takeover`, takes
/// over from the Spooky listening on the configuration's control socket.
///
/// # Errors
/// As [`start`].
pub fn start_from(
    mut config: Config,
    opts: &RunOptions,
    path: Option<PathBuf>,
) -> Result<Running, StartError> {
    // Before any thread starts: those started ahead of the lock-down drop their own. Not
    // with `user:`: switching user clears every thread's capabilities anyway, and glibc
    // aborts the process when a thread cannot follow the switch (no CAP_SETGID left).
    crate::privilege::plan_lock_down(opts.lock_down && config.user.is_none());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let workers = opts
        .workers
        .or(config.workers)
        .unwrap_or(cpus)
        .clamp(1, 255);
    // Worker k is pinned to the k-th CPU this process may run on (its affinity: a cpuset or
    // `taskset` may allow other CPUs than 0..N), when there are enough of them.
    let allowed = allowed_cpus();
    let pinned: Option<Vec<usize>> = (opts.pin && cpus >= workers && allowed.len() >= workers)
        .then(|| allowed[..workers].to_vec());
    let successor = match (opts.takeover, config.control_socket.path()) {
        (false, _) => None,
        (true, Some(control)) => Some(Successor::begin(control)?),
        (true, None) => {
            return Err(TakeoverError::Refused(
                "control_socket is off: there is no running Spooky to take over from".into(),
            )
            .into())
        }
    };
    let predecessor = successor.as_ref().map(|s| s.predecessor.clone());
    let quic = &config.quic;
    let generation = predecessor
        .as_ref()
        .map_or(quic.generation, |p| next_generation(p.generation));
    let ids = Arc::new(
        IdFormat::new(
            &quic.connection_ids,
            quic.cid_len,
            quic.server_id.len() as u8,
            generation,
        )
        .map_err(StartError::Layout)?,
    );
    let layout = ids.layout();

    // Process-lifetime state.
    let rng = ring::rand::SystemRandom::new();
    let own_keys = match &successor {
        Some(s) => s.keys.clone(),
        None => Keys::generate(&rng).map_err(|_| StartError::Randomness)?,
    };
    let stats: Vec<Arc<WorkerStats>> = (0..workers)
        .map(|_| Arc::new(WorkerStats::default()))
        .collect();
    let metrics = Arc::new(Metrics::new(workers));
    let policy = Arc::new(crate::policy::Policy::default());
    let board = Arc::new(HealthBoard::default());
    let tls = Arc::new(crate::certs::TlsShared::default());
    let access_log = Arc::new(
        AccessLogger::start(&config.log.access, &config.log.access_format)
            .map_err(StartError::AccessLog)?,
    );
    let probes = Arc::new(ProbeBoard::default());
    // Secret, so nobody outside can aim client-chosen DCIDs at one worker; the same along a
    // chain of takeovers (the keys are passed on), so each process's minted IDs stay placed.
    let hash_key = own_keys.cid_hash_key();

    // Backends named by DNS: resolved now, followed by the resolver's thread later.
    let dns = match (crate::dns::Dns::new(&config.resolver), config.dns_names()) {
        (Ok(dns), names) => {
            dns.learn(&names);
            crate::config::expand(&mut config, |name| dns.addresses(name));
            Some(Arc::new(dns))
        }
        (Err(e), names) if names.is_empty() => {
            tracing::warn!(error = %e, "no DNS resolver: backends named by DNS cannot be added by a reload");
            None
        }
        (Err(e), _) => return Err(StartError::Dns(e)),
    };

    // The first snapshot, complete before anything uses it.
    let snapshot = Arc::new(Snapshot::build(config, &board, &tls, &own_keys, 1)?);
    let cfg = &snapshot.config;
    let quic_configs = (0..workers)
        .map(|_| snapshot.quic_config())
        .collect::<Result<Vec<_>, QuicConfigError>>()
        .map_err(SnapshotError::from)?;

    // A fresh start claims the control socket first: a second Spooky stops here.
    let control = match (&successor, &cfg.control_socket) {
        (None, ControlSetting::At { path, explicit }) => match ControlSocket::bind(path) {
            Ok(c) => Some(c),
            Err(e @ TakeoverError::Running(_)) => return Err(e.into()),
            Err(e) if *explicit => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "no control socket: this Spooky cannot be taken over");
                None
            }
        },
        _ => None,
    };
    let sockets = bind_group(cfg.listen.addr, workers)?;
    let tcp_listeners = match &cfg.listen.tcp {
        Some(tcp) => {
            if successor.is_some() {
                enable_tcp_migration();
            }
            bind_tcp_group(tcp.addr, workers)?
                .into_iter()
                .map(Some)
                .collect()
        }
        None => (0..workers).map(|_| None).collect::<Vec<_>>(),
    };
    let tcp_addr = tcp_listeners
        .first()
        .and_then(|l| l.as_ref())
        .and_then(|l| l.local_addr().ok());
    if let Some(a) = tcp_addr {
        tracing::info!(listen = %a, "TLS over TCP (HTTP/2, HTTP/1.1)");
    }
    let plain_listeners = match &cfg.listen.http {
        Some(http) => bind_tcp_group(http.addr, workers)?
            .into_iter()
            .map(Some)
            .collect(),
        None => (0..workers).map(|_| None).collect::<Vec<_>>(),
    };
    let plain_addr = plain_listeners
        .first()
        .and_then(|l| l.as_ref())
        .and_then(|l| l.local_addr().ok());
    if let Some(a) = plain_addr {
        tracing::info!(listen = %a, "plaintext HTTP/1.1: ACME HTTP-01 and redirects to https");
    }
    let local_addr = sockets
        .first()
        .and_then(|s| s.local_addr().ok())
        .unwrap_or(cfg.listen.addr);
    let mut kernel_steering = steering::attach(
        &sockets,
        &steering::Plan {
            layout,
            settings: &cfg.steering,
            iface: opts.iface.as_deref(),
            cpus: pinned.as_deref(),
            hash_key,
            stats: &stats,
            predecessor: predecessor.as_ref(),
            probes: probes.clone(),
            thread_start: crate::privilege::lock_down_helper_thread,
            // The kernel reads plaintext server ids only; encrypted ones are user space's.
            fleet: cfg
                .fleet
                .as_ref()
                .filter(|_| ids.server_id_in_plaintext())
                .map(|f| (cfg.quic.server_id.as_slice(), f)),
        },
    )?;
    let mode = kernel_steering.mode();
    tracing::info!(mode = %mode, workers, generation, listen = %local_addr, "steering mode");

    let inherited = successor.as_ref().and_then(|s| s.admin.as_ref());
    let admin_listener = match cfg.admin.addr {
        Some(addr) => match inherited.filter(|l| same_listener(l, addr)) {
            Some(l) => Some(
                l.try_clone()
                    .map_err(|source| StartError::Admin { addr, source })?,
            ),
            None => Some(
                crate::ops::admin::bind(addr)
                    .map_err(|source| StartError::Admin { addr, source })?,
            ),
        },
        None => None,
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(acme) = &cfg.acme {
        let owner = cfg.user.as_ref().map(|u| (u.uid, u.gid));
        crate::acme::prepare(acme, owner).map_err(|source| StartError::Acme {
            path: acme.state_dir.clone(),
            source,
        })?;
    }
    if let Some(user) = &cfg.user {
        let pins = kernel_steering.pin_path().map(Path::to_path_buf);
        let (uid, gid) = crate::privilege::drop_to(user, pins.as_deref())?;
        tracing::info!(%user, uid, gid, "dropped privileges");
    }
    if opts.lock_down {
        crate::privilege::lock_down()?;
        // SAFETY: geteuid has no preconditions.
        if cfg.user.is_none() && unsafe { libc::geteuid() } == 0 {
            tracing::warn!(
                "serving as root (with no capabilities left): set `user:` to a service user"
            );
        }
    }

    // From here on no thread waits on stderr (a thread with the process's final identity
    // writes the lines). The binary only: tests in this process keep their own subscriber.
    if opts.lock_down {
        crate::telemetry::logging::write_from_a_thread().map_err(StartError::Thread)?;
    }
    let acme = match &cfg.acme {
        Some(acme) => Some(
            crate::acme::start(acme.clone(), snapshot.certs.shared().clone())
                .map_err(StartError::Thread)?,
        ),
        None => None,
    };

    let (checker, reporter) = Checker::start(
        snapshot.clone(),
        metrics.clone(),
        kernel_steering.take_backends(),
    )
    .map_err(StartError::Thread)?;

    let mut known = Generations::alone(generation, workers);
    known.hash_key = hash_key;
    if let Some(p) = &predecessor {
        if let Some(w) = known.workers.get_mut(usize::from(p.generation)) {
            *w = p.workers;
        }
    }
    let dead_workers = Arc::new(crate::board::AtomicWorkerSet::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (generations_tx, generations_rx) = watch::channel(known);
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
        own_keys.clone(),
        links,
        {
            // After a reload: the health checker follows, and the metric series and rate
            // limiters of pools and backends that are gone are dropped.
            let follow = checker.follower();
            let (metrics, policy) = (metrics.clone(), policy.clone());
            // XDP's fleet maps follow `fleet.members`.
            let fleet_maps = kernel_steering.take_fleet_maps().map(Mutex::new);
            Box::new(move |next: &Arc<Snapshot>| {
                follow(next);
                if let (Some(maps), Some(fleet)) = (&fleet_maps, &next.config.fleet) {
                    let entries = steering::fleet_entries(&next.config.quic.server_id, fleet);
                    let mut maps = maps.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = maps.sync(&entries.members, &entries.sources) {
                        tracing::error!(error = %e, "XDP's fleet member table not updated; forwarding from XDP may miss new members");
                    }
                }
                let ups = &next.config.upstreams;
                metrics.retain(|pool, backend| {
                    ups.iter().any(|u| {
                        u.name == pool
                            && (backend.is_empty() || u.backends.iter().any(|b| b.id == backend))
                    })
                });
                let names: Vec<&str> = ups.iter().map(|u| u.name.as_str()).collect();
                policy.retain_routes(&names);
            })
        },
    ));
    let dns = match dns {
        Some(dns) => {
            reloader.set_dns(dns.clone());
            Some(crate::dns::start(dns, reloader.dns_follower()).map_err(StartError::Thread)?)
        }
        None => None,
    };
    let ops = Arc::new(Ops {
        reloader,
        stats: stats.clone(),
        metrics: metrics.clone(),
        access_log: access_log.clone(),
        ebpf: kernel_steering.ebpf_metrics(),
        mode: mode.to_string(),
        generation,
        dead_workers: dead_workers.clone(),
        draining: shutdown_rx.clone(),
        policy: policy.clone(),
    });
    let admin = match admin_listener {
        Some(listener) => {
            let handle = listener.try_clone().map_err(|source| StartError::Admin {
                addr: admin_addr.unwrap_or(local_addr),
                source,
            })?;
            Some((handle, start_admin(listener, ops.clone(), admin_addr)?))
        }
        None => None,
    };
    let live = Arc::new(Live {
        steering: Mutex::new(Some(kernel_steering)),
        admin: Mutex::new(admin),
        shutdown: shutdown_tx,
        generations: generations_tx,
        handed_over: watch::channel(false).0,
        stats: stats.clone(),
        successor: Mutex::new(None),
        stopping: AtomicBool::new(false),
        predecessor_draining: AtomicBool::new(predecessor.is_some()),
        keys: own_keys.clone(),
        dead: dead_workers.clone(),
        group: Mutex::new(Vec::new()),
        kills: (0..workers)
            .map(|_| Arc::new(tokio::sync::Notify::new()))
            .collect(),
    });

    let group = sockets
        .iter()
        .map(|s| s.try_clone().map(Some))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| StartError::Bind {
            addr: local_addr,
            source,
        })?;
    if let Ok(mut g) = live.group.lock() {
        *g = group;
    }
    let (deaths_tx, deaths_rx) = std::sync::mpsc::channel::<usize>();
    let mut handles = Vec::with_capacity(workers);
    // Fleet forwarding: one socket per worker in a SO_REUSEPORT group, as for QUIC; a
    // forwarded packet is handed to its connection's worker like any misroute.
    let fleet_sockets: Vec<Option<std::net::UdpSocket>> = match &cfg.fleet {
        Some(f) => {
            let group = bind_group(f.listen, workers)?;
            tracing::info!(listen = %f.listen, members = f.members.len(), "fleet mode: packets of other members' connections are forwarded to them");
            if !ids.server_id_in_plaintext() && opts.iface.is_some() {
                tracing::info!("fleet mode: server ids are encrypted (QUIC-LB), so other members' packets are forwarded from user space, not from XDP");
            }
            group.into_iter().map(Some).collect()
        }
        None => (0..workers).map(|_| None).collect(),
    };
    let per_worker = sockets
        .into_iter()
        .zip(fleet_sockets)
        .zip(tcp_listeners)
        .zip(plain_listeners)
        .zip(inboxes)
        .zip(commands)
        .zip(quic_configs);
    for (index, ((((((socket, fleet), tcp), plain), inbox), commands), quic)) in
        per_worker.enumerate()
    {
        let setup = WorkerSetup {
            index,
            workers,
            socket,
            tcp,
            plain,
            https_port: tcp_addr.map_or(local_addr.port(), |a| a.port()),
            cpu: pinned.as_ref().and_then(|c| c.get(index).copied()),
            ids: ids.clone(),
            rng: rng.clone(),
            stats: stats[index].clone(),
            metrics: metrics.clone(),
            access_log: access_log.clone(),
            policy: policy.clone(),
            health: reporter.clone(),
            snapshot: snapshot.clone(),
            quic,
            inbox,
            peers: peers.clone(),
            shutdown: shutdown_rx.clone(),
            commands,
            kernel_places_initials: mode.is_ebpf(),
            generations: generations_rx.clone(),
            probes: probes.clone(),
            kill: live.kills[index].clone(),
            fleet,
        };
        let death = watchdog::Death {
            index,
            to: deaths_tx.clone(),
        };
        let h = std::thread::Builder::new()
            .name(format!("spooky-w{index}"))
            .spawn(move || {
                let _death = death;
                worker::run(setup)
            })
            .map_err(StartError::Thread)?;
        handles.push(h);
    }
    drop(deaths_tx);
    watchdog::watch(deaths_rx, live.clone()).map_err(StartError::Thread)?;

    // A successor serves now: the predecessor may drain; we take its control socket.
    let control = match (successor, predecessor) {
        (Some(successor), Some(p)) => {
            let stream = successor.ready(generation, workers as u32)?;
            if let Ok(mut steering) = live.steering.lock() {
                if let Some(s) = steering.as_mut() {
                    s.confirm();
                }
            }
            takeover::watch_predecessor(stream, p, live.clone());
            match cfg.control_socket.path() {
                Some(path) => Some(ControlSocket::bind_over(path)?),
                None => None,
            }
        }
        _ => control,
    };
    if let Some(control) = control {
        tracing::info!(path = %control.path().display(), "control socket (takeover)");
        takeover::serve_control(control, live.clone()).map_err(StartError::Thread)?;
    }
    Ok(Running {
        local_addr,
        tcp_addr,
        http_addr: plain_addr,
        steering: mode,
        admin_addr,
        generation,
        ops,
        live,
        workers: handles,
        checker: Some(checker),
        acme,
        dns,
    })
}

/// The CPUs this process may run on (`sched_getaffinity`), in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is plain data the call fills; 0 names the calling thread.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the size is the set's.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `set` is initialised; the index is below CPU_SETSIZE.
        .filter(|cpu| unsafe { libc::CPU_ISSET(*cpu, &set) })
        .collect()
}

/// Whether `listener` listens where `addr` asks (port 0: any port).
fn same_listener(listener: &std::net::TcpListener, addr: SocketAddr) -> bool {
    listener
        .local_addr()
        .is_ok_and(|l| l.ip() == addr.ip() && (addr.port() == 0 || l.port() == addr.port()))
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
