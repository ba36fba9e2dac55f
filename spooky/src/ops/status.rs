//! `spooky status`: what a running Spooky's pinned BPF maps say — the steering mode, the
//! Initial rate limit in force, the generations in use (the newest process, and during a
//! takeover the one draining), the workers of each (CPU, liveness, user-space counters), backend
//! health per pool, and the XDP per-CPU counters — read straight from the pins under
//! `steering.pin_path`. There is no API of the running process involved: the same numbers are
//! what `bpftool map dump pinned …` prints.
//!
//! [`read`] collects a [`Status`] (serialisable: `--json`); [`render`] makes the table.
//! Reading needs CAP_BPF (root), like `bpftool`.
//!
//! Without it (or with nothing pinned: classic BPF steering), `spooky status` asks the running
//! Spooky's admin listener instead: [`Target::from_config`] finds its address in the
//! configuration file, [`read_admin`] fetches `GET /status`, [`render_admin`] makes the same
//! kind of table from it (workers and backend health; the kernel's counters are in the maps
//! only). The first line of either table says where it came from ([`Source`]).

use crate::health::HealthState;
use crate::steering::ebpf::{EbpfError, PinnedMaps};
use crate::steering::Mode;
use serde::{Deserialize, Serialize};
use spooky_common::maps::{slot, Counter, CONFIG_MAP, MAX_GENERATIONS};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Nothing is pinned there.
    #[error(
        "no pinned maps at {}: Spooky is not running with eBPF steering there (classic BPF \
         steering, used when Spooky is not root, pins nothing; or another steering.pin_path is \
         configured)",
        path.display()
    )]
    NotRunning {
        /// The pin path looked at.
        path: PathBuf,
    },
    /// A pin exists but could not be read (not root, not a Spooky map).
    #[error("{0}")]
    Maps(#[from] EbpfError),
}

/// Everything `spooky status` shows.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Status {
    /// Where the maps are pinned.
    pub pin_path: PathBuf,
    /// The steering mode in force (`sk-reuseport`, `xdp-native`, `xdp-generic`).
    pub mode: String,
    /// Process id of the Spooky that pinned the maps.
    pub pid: u32,
    /// UDP port of the QUIC listener.
    pub quic_port: u16,
    /// Interface index XDP is attached to (0: none), in Spooky's network namespace.
    pub ifindex: u32,
    /// XDP redirects each packet to its worker's CPU (the workers are pinned).
    pub cpu_redirect: bool,
    /// Its name (None without XDP).
    pub iface: Option<String>,
    /// Initial-flood defense: client Initials per second per source prefix (0: off).
    pub initial_rate: u32,
    /// Initials a prefix may send at once above the rate.
    pub initial_burst: u32,
    /// Source prefixes the rate limit tracks now (entries of `initial_limits`).
    pub initial_prefixes: usize,
    /// The connection-ID generation new connections go to.
    pub newest_generation: u8,
    /// Every generation a live process owns (the newest, and any still draining).
    pub generations: Vec<GenerationStatus>,
    /// One row per worker of every generation in use.
    pub workers: Vec<WorkerStatus>,
    /// Backend health, per upstream pool in configuration order.
    pub pools: Vec<PoolStatus>,
    /// The XDP per-CPU counters.
    pub counters: Vec<CounterStatus>,
}

/// One process steering knows: an entry of the `generations` map.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct GenerationStatus {
    pub generation: u8,
    pub workers: u32,
    /// Whether it takes new connections (false: it is draining after a takeover).
    pub accepting: bool,
    pub pid: u32,
    /// Start time, seconds since the epoch.
    pub started: u32,
}

/// One worker: the `workers` map, XDP's count of packets placed on it, and the user-space
/// counters from `worker_counters`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Index among its generation's workers.
    pub index: u32,
    /// Its entry in the per-worker maps (`spooky_common::maps::slot`).
    pub slot: u32,
    pub cpu: u32,
    pub alive: bool,
    pub generation: u32,
    /// QUIC packets XDP placed on this worker (0 without XDP).
    pub xdp_packets: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub misrouted: u64,
    pub dropped: u64,
    pub connections_accepted: u64,
    pub connections_active: u64,
    pub requests: u64,
}

/// The backends of one upstream pool.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PoolStatus {
    pub name: String,
    pub backends: Vec<BackendStatus>,
}

/// One entry of the `backends` map.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackendStatus {
    /// Key in the `backends` map.
    pub index: u32,
    pub id: String,
    /// `healthy`, `unhealthy`, `ejected`, `recovering` (or `unknown(N)`).
    pub state: String,
    pub consecutive_failures: u32,
    pub last_latency_us: u64,
    pub ewma_latency_us: u64,
    pub in_flight: u32,
}

/// One XDP counter: its total and its value on each possible CPU.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CounterStatus {
    pub name: String,
    pub total: u64,
    pub per_cpu: Vec<u64>,
}

impl Status {
    /// The counter named `name` (see `spooky_common::maps::Counter::name`).
    pub fn counter(&self, name: &str) -> Option<&CounterStatus> {
        self.counters.iter().find(|c| c.name == name)
    }
}

/// Reads the maps pinned under `pin_path`.
///
/// # Errors
/// [`StatusError::NotRunning`] when nothing is pinned there; [`StatusError::Maps`] when a pin
/// cannot be opened or read.
pub fn read(pin_path: &Path) -> Result<Status, StatusError> {
    if !pin_path.join(CONFIG_MAP).exists() {
        return Err(StatusError::NotRunning {
            path: pin_path.to_path_buf(),
        });
    }
    let maps = PinnedMaps::open(pin_path)?;
    let config = maps.config()?;
    let mode = Mode::from_code(config.mode).map_or_else(
        || format!("unknown({})", config.mode),
        |m| m.name().to_string(),
    );
    let mut generations = Vec::new();
    let mut workers = Vec::new();
    for generation in 0..MAX_GENERATIONS as u8 {
        let entry = maps.generation(generation)?;
        if entry.live_workers() == 0 {
            continue;
        }
        generations.push(GenerationStatus {
            generation,
            workers: entry.live_workers(),
            accepting: entry.accepting != 0,
            pid: entry.pid,
            started: entry.started,
        });
        for index in 0..entry.live_workers() {
            workers.push(worker_status(&maps, generation, index)?);
        }
    }
    let mut pools: Vec<PoolStatus> = Vec::new();
    for (index, entry) in maps.backends()?.iter().enumerate() {
        let pool = String::from_utf8_lossy(entry.pool_bytes()).into_owned();
        let backend = BackendStatus {
            index: index as u32,
            id: String::from_utf8_lossy(entry.name_bytes()).into_owned(),
            state: HealthState::from_u32(entry.state)
                .map_or_else(|| format!("unknown({})", entry.state), |s| s.to_string()),
            consecutive_failures: entry.consecutive_failures,
            last_latency_us: entry.last_latency_us,
            ewma_latency_us: entry.ewma_latency_us,
            in_flight: entry.in_flight,
        };
        match pools.last_mut() {
            Some(last) if last.name == pool => last.backends.push(backend),
            _ => pools.push(PoolStatus {
                name: pool,
                backends: vec![backend],
            }),
        }
    }
    let stats = maps.stats()?;
    let counters = Counter::ALL
        .iter()
        .map(|&c| CounterStatus {
            name: c.name().to_string(),
            total: stats.total(c),
            per_cpu: stats.per_cpu(c),
        })
        .collect();
    Ok(Status {
        pin_path: pin_path.to_path_buf(),
        mode,
        pid: config.pid,
        quic_port: config.quic_port,
        ifindex: config.ifindex,
        cpu_redirect: config.has(spooky_common::maps::FLAG_REDIRECT_CPU),
        iface: (config.ifindex != 0)
            .then(|| String::from_utf8_lossy(config.iface_bytes()).into_owned()),
        initial_rate: config.initial_rate,
        initial_burst: config.initial_burst,
        initial_prefixes: maps.initial_limits().len(),
        newest_generation: config.generation,
        generations,
        workers,
        pools,
        counters,
    })
}

fn worker_status(maps: &PinnedMaps, generation: u8, index: u32) -> Result<WorkerStatus, EbpfError> {
    let slot = slot(generation, index);
    let entry = maps.worker(slot)?;
    let counters = maps.worker_counters(slot)?;
    Ok(WorkerStatus {
        index,
        slot,
        cpu: entry.cpu,
        alive: entry.is_alive(),
        generation: entry.generation,
        xdp_packets: maps.worker_packets(slot)?.iter().sum(),
        packets_in: counters.packets_in,
        packets_out: counters.packets_out,
        misrouted: counters.misrouted,
        dropped: counters.dropped,
        connections_accepted: counters.connections_accepted,
        connections_active: counters.connections_active,
        requests: counters.requests,
    })
}

/// The human-readable tables of `spooky status`.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let iface = match (&status.iface, status.ifindex) {
        (_, 0) => "-".to_string(),
        (Some(name), i) => format!("{name} (ifindex {i})"),
        (None, i) => format!("ifindex {i}"),
    };
    let _ = writeln!(
        out,
        "steering: {}   pid: {}   quic port: {}   xdp interface: {}   cpu redirect: {}   pins: {}",
        status.mode,
        status.pid,
        status.quic_port,
        iface,
        if status.cpu_redirect { "on" } else { "off" },
        status.pin_path.display()
    );
    let limit = if status.initial_rate == 0 {
        "off".to_string()
    } else {
        format!(
            "{}/s per prefix (/24, /56), burst {}; {}× per /16 and /48 ({} prefixes tracked)",
            status.initial_rate,
            status.initial_burst,
            spooky_common::maps::WIDE_PREFIX_FACTOR,
            status.initial_prefixes
        )
    };
    let _ = writeln!(out, "initial rate limit: {limit}");
    let _ = writeln!(
        out,
        "\ngenerations (new connections go to {})",
        status.newest_generation
    );
    let _ = writeln!(
        out,
        "  {:>3} {:>8} {:<9} {:>8} {:>12}",
        "gen", "workers", "state", "pid", "started"
    );
    for g in &status.generations {
        let _ = writeln!(
            out,
            "  {:>3} {:>8} {:<9} {:>8} {:>12}",
            g.generation,
            g.workers,
            if g.accepting { "accepting" } else { "draining" },
            g.pid,
            g.started
        );
    }
    let _ = writeln!(out, "\nworkers");
    let _ = writeln!(
        out,
        "  {:>6} {:>4} {:>5} {:>4} {:>12} {:>12} {:>12} {:>10} {:>9} {:>9} {:>7} {:>10}",
        "worker",
        "cpu",
        "alive",
        "gen",
        "xdp_packets",
        "packets_in",
        "packets_out",
        "misrouted",
        "dropped",
        "accepted",
        "active",
        "requests"
    );
    for w in &status.workers {
        let _ = writeln!(
            out,
            "  {:>6} {:>4} {:>5} {:>4} {:>12} {:>12} {:>12} {:>10} {:>9} {:>9} {:>7} {:>10}",
            w.index,
            w.cpu,
            if w.alive { "yes" } else { "no" },
            w.generation,
            w.xdp_packets,
            w.packets_in,
            w.packets_out,
            w.misrouted,
            w.dropped,
            w.connections_accepted,
            w.connections_active,
            w.requests
        );
    }
    for pool in &status.pools {
        let _ = writeln!(out, "\npool {}", pool.name);
        let _ = writeln!(
            out,
            "  {:<24} {:<11} {:>9} {:>12} {:>12} {:>9}",
            "backend", "state", "failures", "last_us", "ewma_us", "in_flight"
        );
        for b in &pool.backends {
            let _ = writeln!(
                out,
                "  {:<24} {:<11} {:>9} {:>12} {:>12} {:>9}",
                b.id,
                b.state,
                b.consecutive_failures,
                b.last_latency_us,
                b.ewma_latency_us,
                b.in_flight
            );
        }
    }
    let cpus = status.counters.first().map_or(0, |c| c.per_cpu.len());
    let _ = writeln!(out, "\nxdp counters (per CPU)");
    let mut header = format!("  {:<26} {:>12}", "counter", "total");
    for cpu in 0..cpus {
        let _ = write!(header, " {:>10}", format!("cpu{cpu}"));
    }
    let _ = writeln!(out, "{header}");
    for c in &status.counters {
        let mut line = format!("  {:<26} {:>12}", c.name, c.total);
        for v in &c.per_cpu {
            let _ = write!(line, " {v:>10}");
        }
        let _ = writeln!(out, "{line}");
    }
    out
}

/// `steering.pin_path` when the configuration does not say (as `config` defaults it).
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/spooky";
/// `admin.address` when the configuration does not say (as `config` defaults it).
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:9900";

/// Where a running Spooky can be asked: its pins, and its admin listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `steering.pin_path`.
    pub pin_path: PathBuf,
    /// `admin.address` (`None`: `admin.enabled: false`).
    pub admin: Option<SocketAddr>,
    /// `admin.token`, sent with the request (needed with `admin.token_for_reads`).
    pub token: Option<String>,
}

impl Default for Target {
    /// A configuration that sets neither `steering` nor `admin`.
    fn default() -> Self {
        Self {
            pin_path: PathBuf::from(DEFAULT_PIN_PATH),
            admin: DEFAULT_ADMIN_ADDRESS.parse().ok(),
            token: None,
        }
    }
}

impl Target {
    /// The `steering` and `admin` sections of the configuration file at `path`, read on
    /// their own: the rest of the file is not validated, and the certificate and key it
    /// names are not read (they may be readable by the service's user only).
    ///
    /// # Errors
    /// The file cannot be read, is not YAML, or holds a malformed value in those sections.
    pub fn from_config(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_yaml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// [`Target::from_config`] of a configuration's text.
    ///
    /// # Errors
    /// As [`Target::from_config`].
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        use serde_yaml::Value;
        let doc: Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let mut target = Self::default();
        let field = |section: &str, key: &str| doc.get(section).and_then(|s| s.get(key)).cloned();
        if let Some(pin) = field("steering", "pin_path") {
            target.pin_path = pin
                .as_str()
                .map(PathBuf::from)
                .ok_or("steering.pin_path: not a path")?;
        }
        if let Some(address) = field("admin", "address") {
            let text = address.as_str().ok_or("admin.address: not text")?;
            target.admin = Some(
                text.parse()
                    .map_err(|_| format!("admin.address: {text:?} is not IP:PORT"))?,
            );
        }
        if let Some(token) = field("admin", "token") {
            target.token = Some(token.as_str().ok_or("admin.token: not text")?.to_owned());
        }
        if field("admin", "enabled").and_then(|v| v.as_bool()) == Some(false) {
            target.admin = None;
        }
        Ok(target)
    }
}

/// Where `spooky status` read what it shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The pinned maps at this path.
    Pins(PathBuf),
    /// The admin listener at this address, and why the maps were not read.
    Admin { addr: SocketAddr, why: String },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Pins(path) => write!(f, "pinned maps at {}", path.display()),
            Source::Admin { addr, why } => write!(f, "admin listener http://{addr} ({why})"),
        }
    }
}

/// Why the maps at `pin_path` were not read, in a few words for the source line.
pub fn why_not_pins(error: &StatusError, root: bool) -> String {
    match error {
        _ if !root => "pinned maps need root".to_owned(),
        StatusError::NotRunning { path } => format!("nothing pinned at {}", path.display()),
        StatusError::Maps(e) => format!("pinned maps unreadable: {e}"),
    }
}

/// What a running Spooky's `GET /status` says (fields an older Spooky does not send are
/// left at their defaults).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct AdminStatus {
    pub mode: String,
    pub pid: u32,
    /// The configuration generation (1 at start, +1 per reload).
    pub generation: u64,
    /// The connection-ID generation of the process.
    pub cid_generation: u8,
    pub listen: String,
    pub workers: Vec<AdminWorker>,
    pub pools: Vec<AdminPool>,
}

/// One worker, as `GET /status` shows it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct AdminWorker {
    pub index: u32,
    pub alive: bool,
    pub connections: u64,
    pub streams: u64,
    pub accepted: u64,
    pub misrouted: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub dropped: u64,
    pub requests: u64,
}

/// One pool, as `GET /status` shows it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct AdminPool {
    pub name: String,
    pub backends: Vec<AdminBackend>,
}

/// One backend, as `GET /status` shows it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct AdminBackend {
    pub id: String,
    pub address: String,
    pub state: String,
    pub available: bool,
    pub drained: bool,
    pub consecutive_failures: u32,
    pub last_latency_us: u64,
    pub ewma_latency_us: u64,
}

/// Asks the admin listener at `addr` for `GET /status` (HTTP/1.1, one request on its own
/// connection, as `curl` would), with `token` as a bearer token when given. An unspecified
/// address (`0.0.0.0`, `::`) is asked on loopback. Returns the JSON as sent, and parsed.
///
/// # Errors
/// The connection fails or times out, the answer is not `200`, or not the JSON expected.
pub fn read_admin(
    addr: SocketAddr,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(serde_json::Value, AdminStatus), String> {
    use std::io::{Read, Write};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect: {e}"))?;
    tcp.set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        tcp,
        "GET /status HTTP/1.1\r\nhost: {addr}\r\n{auth}connection: close\r\n\r\n"
    )
    .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer)
        .map_err(|e| format!("no answer: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("not an HTTP answer")?;
    let code = head.split(' ').nth(1).unwrap_or("");
    if code != "200" {
        return Err(format!("GET /status answered {code}: {}", body.trim()));
    }
    let value: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("GET /status: not JSON: {e}"))?;
    let status = serde_json::from_value(value.clone())
        .map_err(|e| format!("GET /status: unexpected JSON: {e}"))?;
    Ok((value, status))
}

/// The tables of `spooky status` from the admin listener's answer, under the line naming
/// `source`.
pub fn render_admin(status: &AdminStatus, source: &Source) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "source: {source}");
    let _ = writeln!(
        out,
        "steering: {}   pid: {}   listen: {}   config generation: {}   cid generation: {}",
        status.mode, status.pid, status.listen, status.generation, status.cid_generation
    );
    let _ = writeln!(out, "\nworkers");
    let row = |cells: [&dyn std::fmt::Display; 10]| {
        format!(
            "  {:>6} {:>5} {:>11} {:>8} {:>9} {:>10} {:>12} {:>12} {:>9} {:>10}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            cells[7],
            cells[8],
            cells[9]
        )
    };
    let _ = writeln!(
        out,
        "{}",
        row([
            &"worker",
            &"alive",
            &"connections",
            &"streams",
            &"accepted",
            &"misrouted",
            &"packets_in",
            &"packets_out",
            &"dropped",
            &"requests"
        ])
    );
    for w in &status.workers {
        let _ = writeln!(
            out,
            "{}",
            row([
                &w.index,
                &if w.alive { "yes" } else { "no" },
                &w.connections,
                &w.streams,
                &w.accepted,
                &w.misrouted,
                &w.packets_in,
                &w.packets_out,
                &w.dropped,
                &w.requests
            ])
        );
    }
    for pool in &status.pools {
        let _ = writeln!(out, "\npool {}", pool.name);
        let _ = writeln!(
            out,
            "  {:<24} {:<22} {:<11} {:>9} {:>7} {:>9} {:>12} {:>12}",
            "backend", "address", "state", "available", "drained", "failures", "last_us", "ewma_us"
        );
        for b in &pool.backends {
            let _ = writeln!(
                out,
                "  {:<24} {:<22} {:<11} {:>9} {:>7} {:>9} {:>12} {:>12}",
                b.id,
                b.address,
                b.state,
                if b.available { "yes" } else { "no" },
                if b.drained { "yes" } else { "no" },
                b.consecutive_failures,
                b.last_latency_us,
                b.ewma_latency_us
            );
        }
    }
    let _ = writeln!(
        out,
        "\nkernel counters: in the pinned maps only (spooky status as root), or /metrics"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with a self-signed pair, for configurations the full parser accepts.
    fn tls_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("spooky-status-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pair = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.join("cert.pem"), pair.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), pair.signing_key.serialize_pem()).unwrap();
        dir
    }

    const HEAD: &str = "version: 1\nlisten:\n  port: 9889\n  tls: {cert: cert.pem, key: key.pem}\nupstream:\n  api:\n    backends:\n      - {id: a1, address: \"127.0.0.1:7001\"}\n";

    #[test]
    fn the_status_target_is_what_the_configuration_means() {
        let dir = tls_dir();
        for extra in [
            "",
            "admin: {address: \"127.0.0.1:9911\", token: 0123456789abcdef, token_for_reads: true}\nsteering: {pin_path: /sys/fs/bpf/other}\n",
            "admin: {enabled: false}\n",
            "admin: {address: \"[::1]:9900\"}\n",
        ] {
            let yaml = format!("{HEAD}{extra}");
            let full = crate::config::parse(&yaml, &dir).unwrap();
            let light = Target::from_yaml(&yaml).unwrap();
            assert_eq!(light.pin_path, full.steering.pin_path, "{extra}");
            assert_eq!(light.admin, full.admin.addr, "{extra}");
            assert_eq!(light.token, full.admin.token, "{extra}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(Target::from_yaml("admin: {address: nowhere}\n")
            .unwrap_err()
            .contains("admin.address"));
    }

    #[test]
    fn the_admin_table_names_its_source_and_every_backend() {
        let json = r#"{"mode":"classic-bpf","pid":42,"generation":3,"cid_generation":1,
            "listen":"0.0.0.0:443","uid":998,
            "workers":[{"index":0,"alive":true,"connections":2,"streams":1,"accepted":5,"misrouted":0}],
            "pools":[{"name":"app","backends":[{"id":"app-1","address":"127.0.0.1:8080",
            "state":"unhealthy","available":false,"drained":false,"consecutive_failures":3,
            "ewma_latency_us":0}]}]}"#;
        let status: AdminStatus = serde_json::from_str(json).unwrap();
        assert_eq!(status.workers[0].requests, 0, "absent fields: defaults");
        let source = Source::Admin {
            addr: "127.0.0.1:9900".parse().unwrap(),
            why: "pinned maps need root".into(),
        };
        let text = render_admin(&status, &source);
        assert!(text
            .starts_with("source: admin listener http://127.0.0.1:9900 (pinned maps need root)\n"));
        for want in [
            "classic-bpf",
            "pid: 42",
            "pool app",
            "app-1",
            "127.0.0.1:8080",
            "unhealthy",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }
}
