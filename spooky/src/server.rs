//! Starting and stopping the proxy: builds the shared read-only state ([`Shared`]), binds one
//! UDP socket per worker in a SO_REUSEPORT group with the steering program attached, starts
//! the worker threads and the control thread (health checks, signals), and waits for a
//! graceful shutdown.
//!
//! Also home of the pieces every worker shares: Retry tokens and stateless-reset tokens
//! (HMAC with a per-process key), the QUIC configuration, per-worker counters.

use crate::config::Config;
use crate::health::checker::HealthBoard;
use crate::routing::RouteTable;
use quiche::ConnectionId;
use ring::hmac;
use spooky_common::CidLayout;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio_rustls::rustls;

/// A datagram handed from the worker that received it to the worker that owns it.
pub struct Forwarded {
    pub data: Vec<u8>,
    pub from: SocketAddr,
}

/// Counters of one worker, written only by that worker (relaxed atomics), read at scrape time.
#[derive(Default, Debug)]
pub struct WorkerStats {
    pub packets_in: AtomicU64,
    pub packets_out: AtomicU64,
    pub dropped: AtomicU64,
    pub misrouted: AtomicU64,
    pub retry_sent: AtomicU64,
    pub refused: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_active: AtomicU64,
    pub streams_active: AtomicU64,
    /// Configuration snapshots this worker has swapped in since start (reloads).
    pub snapshots_applied: AtomicU64,
    pub requests: AtomicU64,
    /// Request streams reset because their head did not arrive in time.
    pub request_head_timeouts: AtomicU64,
}

/// Read-only state shared by all workers.
pub struct Shared {
    pub config: Config,
    pub routes: RouteTable,
    pub layout: CidLayout,
    pub token_key: hmac::Key,
    pub rng: ring::rand::SystemRandom,
    /// `[upstream][backend]`: rustls client configs of TLS backends.
    pub backend_tls: Vec<Vec<Option<Arc<rustls::ClientConfig>>>>,
    pub health: HealthBoard,
    pub stats: Vec<Arc<WorkerStats>>,
    /// Request metrics (process-wide, kept across reloads).
    pub metrics: Arc<crate::ops::metrics::Metrics>,
    pub access_log: Arc<crate::ops::access_log::AccessLogger>,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("routing table: {0}")]
    Routes(String),
    #[error("connection ID layout: {0:?}")]
    Layout(spooky_common::cid::LayoutError),
    #[error("backend {backend}: TLS: {message}")]
    BackendTls { backend: String, message: String },
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("steering: {0}")]
    Steering(#[from] crate::steering::SteeringError),
    #[error("QUIC configuration: {0}")]
    Quic(String),
    #[error("admin listener {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("dropping privileges: {0}")]
    Privilege(#[from] crate::ops::privilege::PrivilegeError),
    #[error("access log: {0}")]
    AccessLog(String),
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
}

impl Shared {
    /// Compiles routes, layouts and TLS client configs for `config` with `workers` workers.
    ///
    /// # Errors
    /// [`StartError`] when a derived piece cannot be built.
    pub fn new(config: Config, workers: usize) -> Result<Self, StartError> {
        let layout = CidLayout::new(
            config.quic.cid_len,
            config.quic.server_id.len() as u8,
            config.quic.generation,
        )
        .map_err(StartError::Layout)?;
        let rng = ring::rand::SystemRandom::new();
        let token_key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| StartError::Quic("no randomness".into()))?;
        let stats = (0..workers)
            .map(|_| Arc::new(WorkerStats::default()))
            .collect();
        let metrics = Arc::new(crate::ops::metrics::Metrics::new(workers));
        let access_log = Arc::new(
            crate::ops::access_log::AccessLogger::start(&config.log.access, metrics.clone())
                .map_err(|e| StartError::AccessLog(e.to_string()))?,
        );
        let process = Process {
            layout,
            token_key,
            rng,
            stats,
            metrics,
            access_log,
        };
        Self::build(config, process)
    }

    /// The snapshot after a reload: process-wide parts (token key, counters, metrics, access
    /// log) are kept; routes, TLS client configs and the health board are built anew.
    ///
    /// # Errors
    /// [`StartError`] when a derived piece cannot be built.
    pub fn next(old: &Shared, config: Config) -> Result<Self, StartError> {
        let process = Process {
            layout: old.layout,
            token_key: old.token_key.clone(),
            rng: old.rng.clone(),
            stats: old.stats.clone(),
            metrics: old.metrics.clone(),
            access_log: old.access_log.clone(),
        };
        let next = Self::build(config, process)?;
        next.health.inherit_bpf(&old.health);
        Ok(next)
    }

    fn build(config: Config, p: Process) -> Result<Self, StartError> {
        let routes_in: Vec<(usize, &crate::config::Route)> = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| (i, &u.route))
            .collect();
        let routes = RouteTable::new(&routes_in).map_err(|e| StartError::Routes(e.to_string()))?;
        let mut backend_tls = Vec::new();
        for up in &config.upstreams {
            let mut row = Vec::new();
            for b in &up.backends {
                let cfg = match &b.tls {
                    Some(t) => {
                        if !t.verify {
                            tracing::warn!(backend = %b.id, "TLS certificate verification is DISABLED for this backend (tls.verify: false)");
                        }
                        Some(crate::upstream::tls_config(t).map_err(|message| {
                            StartError::BackendTls {
                                backend: b.id.clone(),
                                message,
                            }
                        })?)
                    }
                    None => None,
                };
                row.push(cfg);
            }
            backend_tls.push(row);
        }
        let health = HealthBoard::new(&config);
        Ok(Self {
            routes,
            layout: p.layout,
            token_key: p.token_key,
            rng: p.rng,
            backend_tls,
            health,
            stats: p.stats,
            metrics: p.metrics,
            access_log: p.access_log,
            config,
        })
    }
}

/// The parts of [`Shared`] that live as long as the process.
struct Process {
    layout: CidLayout,
    token_key: hmac::Key,
    rng: ring::rand::SystemRandom,
    stats: Vec<Arc<WorkerStats>>,
    metrics: Arc<crate::ops::metrics::Metrics>,
    access_log: Arc<crate::ops::access_log::AccessLogger>,
}

/// The QUIC configuration of a worker (each worker builds its own: quiche's TLS context is
/// per config).
///
/// # Errors
/// A message naming what quiche refused (certificate, key, protocols).
pub fn quic_config(cfg: &Config) -> Result<quiche::Config, String> {
    let mut q = quiche::Config::new(quiche::PROTOCOL_VERSION).map_err(|e| e.to_string())?;
    let cert = cfg.listen.tls.cert.to_string_lossy();
    let key = cfg.listen.tls.key.to_string_lossy();
    q.load_cert_chain_from_pem_file(&cert)
        .map_err(|e| format!("certificate {cert}: {e}"))?;
    q.load_priv_key_from_pem_file(&key)
        .map_err(|e| format!("key {key}: {e}"))?;
    q.set_application_protos(quiche::h3::APPLICATION_PROTOCOL)
        .map_err(|e| e.to_string())?;
    let quic = &cfg.quic;
    q.set_max_idle_timeout(quic.idle_timeout.as_millis() as u64);
    q.set_max_recv_udp_payload_size(65527);
    q.set_max_send_udp_payload_size(1350);
    q.set_initial_max_data(quic.initial_max_data);
    q.set_initial_max_stream_data_bidi_local(quic.initial_max_stream_data);
    q.set_initial_max_stream_data_bidi_remote(quic.initial_max_stream_data);
    q.set_initial_max_stream_data_uni(1 << 20);
    q.set_initial_max_streams_bidi(quic.max_concurrent_streams);
    q.set_initial_max_streams_uni(16);
    q.set_active_connection_id_limit(4);
    q.set_disable_active_migration(false);
    q.set_max_connection_window(quic.initial_max_data.max(25 << 20));
    q.set_max_stream_window(quic.initial_max_stream_data.max(16 << 20));
    Ok(q)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn addr_bytes(addr: &SocketAddr) -> Vec<u8> {
    let mut v = match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    v.extend_from_slice(&addr.port().to_be_bytes());
    v
}

const TAG_LEN: usize = 16;

/// A Retry token binding the client's address and original DCID: `time | len | odcid | tag`.
pub fn mint_token(key: &hmac::Key, odcid: &ConnectionId<'_>, peer: &SocketAddr) -> Vec<u8> {
    let mut t = Vec::with_capacity(8 + 1 + odcid.len() + TAG_LEN);
    t.extend_from_slice(&now_secs().to_be_bytes());
    t.push(odcid.len() as u8);
    t.extend_from_slice(odcid);
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(&t);
    ctx.update(&addr_bytes(peer));
    let tag = ctx.sign();
    t.extend_from_slice(&tag.as_ref()[..TAG_LEN]);
    t
}

/// The original DCID from a valid, fresh token minted for `peer`.
pub fn validate_token(
    key: &hmac::Key,
    token: &[u8],
    peer: &SocketAddr,
    lifetime: Duration,
) -> Option<ConnectionId<'static>> {
    let ts = u64::from_be_bytes(token.get(..8)?.try_into().ok()?);
    let len = *token.get(8)? as usize;
    let body_len = 9 + len;
    let odcid = token.get(9..body_len)?;
    let tag = token.get(body_len..)?;
    if tag.len() != TAG_LEN || len > 20 {
        return None;
    }
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(token.get(..body_len)?);
    ctx.update(&addr_bytes(peer));
    let want = ctx.sign();
    // Constant-time enough: ring's verify needs the full tag, so compare truncated tags by xor-fold.
    let diff = want.as_ref()[..TAG_LEN]
        .iter()
        .zip(tag)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 {
        return None;
    }
    let age = now_secs().saturating_sub(ts);
    if age > lifetime.as_secs() {
        return None;
    }
    Some(ConnectionId::from_vec(odcid.to_vec()))
}

/// The stateless-reset token of one of our connection IDs.
pub fn reset_token(key: &hmac::Key, cid: &ConnectionId<'_>) -> u128 {
    let tag = hmac::sign(key, &[b"reset".as_slice(), cid.as_ref()].concat());
    let mut b = [0u8; 16];
    b.copy_from_slice(&tag.as_ref()[..16]);
    u128::from_be_bytes(b)
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

/// What `run` was asked to do beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub workers: Option<usize>,
    pub iface: Option<String>,
    /// Pin worker k to CPU k (default on when there are at least as many CPUs as workers).
    pub pin: bool,
}

/// A running proxy: its workers, its shared state, and the handle to stop it.
pub struct Running {
    /// The snapshot the proxy started with (process-wide parts — counters, metrics — stay
    /// valid across reloads; use `live.current()` for the configuration in force).
    pub shared: Arc<Shared>,
    /// The configuration in force, reloads, admin API state.
    pub live: Arc<crate::ops::reload::Live>,
    /// Where the admin listener listens, when enabled.
    pub admin_addr: Option<SocketAddr>,
    admin_stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub local_addr: SocketAddr,
    pub steering: crate::steering::Mode,
    shutdown: watch::Sender<bool>,
    workers: Vec<std::thread::JoinHandle<Result<(), String>>>,
    control: Arc<std::sync::Mutex<Option<crate::health::checker::Control>>>,
    /// Kept alive while running; detached (XDP off, pins removed) after the workers stop.
    kernel_steering: Option<crate::steering::Steering>,
}

impl Running {
    /// Starts graceful shutdown: GOAWAY to clients, in-flight requests finish within the
    /// configured grace, then connections close.
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits for every worker to finish.
    ///
    /// # Errors
    /// The first worker error.
    pub fn join(mut self) -> Result<(), String> {
        let mut first_err = None;
        for w in self.workers.drain(..) {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert_with(|| "worker thread panicked".to_string());
                }
            }
        }
        if let Some(stop) = self.admin_stop.take() {
            let _ = stop.send(());
        }
        let control = self.control.lock().map(|mut c| c.take()).unwrap_or(None);
        if let Some(c) = control {
            c.stop();
        }
        if let Some(s) = self.kernel_steering.take() {
            s.detach();
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Starts the proxy: sockets, steering, workers, control thread.
///
/// # Errors
/// [`StartError`] when any of it cannot be set up; nothing keeps running then.
pub fn start(config: Config, opts: &RunOptions) -> Result<Running, StartError> {
    start_inner(config, opts, None)
}

/// Loads the configuration at `path` and starts the proxy; reloads (SIGHUP, `POST /reload`)
/// read that file again.
///
/// # Errors
/// [`StartError::Config`] for an unreadable or invalid file, else as [`start`].
pub fn start_file(path: &std::path::Path, opts: &RunOptions) -> Result<Running, StartError> {
    let config = Config::from_path(path)
        .map_err(|e| StartError::Config(format!("{}: {e}", path.display())))?;
    start_inner(config, opts, Some(path.to_path_buf()))
}

/// Starts the proxy with an already loaded `config` that came from `path` (reloads read that
/// file again; command-line overrides of steering settings stay in force).
///
/// # Errors
/// As [`start`].
pub fn start_from(
    config: Config,
    opts: &RunOptions,
    path: Option<std::path::PathBuf>,
) -> Result<Running, StartError> {
    start_inner(config, opts, path)
}

fn start_inner(
    config: Config,
    opts: &RunOptions,
    path: Option<std::path::PathBuf>,
) -> Result<Running, StartError> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let workers = opts
        .workers
        .or(config.workers)
        .unwrap_or(cpus)
        .clamp(1, 255);
    let addr = config.listen.addr;
    let shared = Arc::new(Shared::new(config, workers)?);
    let sockets = bind_group(addr, workers)?;
    let local_addr = sockets
        .first()
        .and_then(|s| s.local_addr().ok())
        .unwrap_or(addr);
    let kernel_steering = crate::steering::attach(&sockets, &shared, opts)?;
    let steering = kernel_steering.mode();
    tracing::info!(mode = %steering, workers, listen = %local_addr, "steering mode");

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut senders = Vec::with_capacity(workers);
    let mut receivers = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = mpsc::channel(1024);
        senders.push(tx);
        receivers.push(rx);
    }
    let admin_listener = match shared.config.admin.addr {
        Some(addr) => Some(
            crate::ops::admin::bind(addr).map_err(|source| StartError::Admin { addr, source })?,
        ),
        None => None,
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(user) = &shared.config.user {
        let pins = kernel_steering.pin_path().map(std::path::Path::to_path_buf);
        let (uid, gid) = crate::ops::privilege::drop_to(user, pins.as_deref())?;
        tracing::info!(%user, uid, gid, "dropped privileges");
    }
    let control = Arc::new(std::sync::Mutex::new(Some(
        crate::health::checker::Control::start(shared.clone()).map_err(StartError::Thread)?,
    )));
    let applier_control = control.clone();
    let applier: crate::ops::reload::Applier = Box::new(move |old, config| {
        let next = Arc::new(Shared::next(old, config).map_err(|e| e.to_string())?);
        let mut guard = applier_control
            .lock()
            .map_err(|_| "control thread state poisoned".to_owned())?;
        let carry = guard.take().map(|c| c.stop()).unwrap_or_default();
        *guard = Some(
            crate::health::checker::Control::start_with(next.clone(), carry)
                .map_err(|e| format!("cannot restart the health checker: {e}"))?,
        );
        Ok(next)
    });
    let (live, updates) =
        crate::ops::reload::Live::new(shared.clone(), path, steering.to_string(), applier);
    if let Some(ebpf_metrics) = kernel_steering.ebpf_metrics() {
        live.set_extra_metrics(ebpf_metrics);
    }
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(listener) = admin_listener {
        let live = live.clone();
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
                                () = crate::ops::admin::serve(l, live) => {}
                                _ = admin_stopped => {}
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "admin listener"),
                    }
                });
            })
            .map_err(StartError::Thread)?;
        if let Some(addr) = admin_addr {
            tracing::info!(%addr, "admin listener (metrics, health, status, reload)");
        }
    }
    let pin = opts.pin && cpus >= workers;
    let mut handles = Vec::with_capacity(workers);
    for (index, (socket, inbox)) in sockets.into_iter().zip(receivers).enumerate() {
        let setup = crate::quic::worker::WorkerSetup {
            index,
            socket,
            cpu: pin.then_some(index),
            shared: shared.clone(),
            inbox,
            peers: senders.clone(),
            shutdown: shutdown_rx.clone(),
            updates: updates.clone(),
            kernel_places_initials: steering.is_ebpf(),
        };
        let h = std::thread::Builder::new()
            .name(format!("spooky-w{index}"))
            .spawn(move || crate::quic::worker::run(setup))
            .map_err(StartError::Thread)?;
        handles.push(h);
    }
    Ok(Running {
        shared,
        live,
        admin_addr,
        admin_stop: Some(admin_stop),
        local_addr,
        steering,
        shutdown: shutdown_tx,
        workers: handles,
        control,
        kernel_steering: Some(kernel_steering),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bind_the_address() {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).unwrap();
        let odcid = ConnectionId::from_vec(vec![7; 12]);
        let peer: SocketAddr = "192.0.2.1:4433".parse().unwrap();
        let token = mint_token(&key, &odcid, &peer);
        let life = Duration::from_secs(30);
        assert_eq!(
            validate_token(&key, &token, &peer, life).unwrap().as_ref(),
            &[7; 12]
        );
        let other: SocketAddr = "192.0.2.1:4434".parse().unwrap();
        assert!(validate_token(&key, &token, &other, life).is_none());
        let mut forged = token.clone();
        forged[10] ^= 1;
        assert!(validate_token(&key, &forged, &peer, life).is_none());
        assert!(validate_token(&key, &token[..5], &peer, life).is_none());
    }
}
