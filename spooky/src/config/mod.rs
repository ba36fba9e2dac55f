//! Configuration: YAML → raw serde structs (`raw`, `deny_unknown_fields`) → this typed,
//! validated [`Config`]. Validation (`validate`) reports every problem at once, each with its
//! field path. Nothing downstream re-parses strings: durations are [`Duration`], addresses
//! [`SocketAddr`], choices enums.
//!
//! Validation is sans-IO: what it must read, resolve or look up goes through an [`Env`]
//! ([`System`] in the proxy, an in-memory one in tests and the fuzzer).

mod earlier;
pub mod env;
mod memory;
mod raw;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use env::{Env, System};
pub use validate::{load, load_with, parse, parse_with, ConfigError, FieldError};

/// The whole validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Schema version (only 1 exists).
    pub version: u32,
    pub listen: Listen,
    pub quic: Quic,
    pub proxy: Proxy,
    /// Upstream pools, in the order their names sort.
    pub upstreams: Vec<Upstream>,
    pub log: Log,
    pub steering: Steering,
    pub admin: Admin,
    /// Switch to this user once sockets are bound and kernel programs loaded (`None`: stay).
    pub user: Option<User>,
    /// Worker count from the file (`--workers` overrides); `None` = one per online CPU.
    pub workers: Option<usize>,
    /// Where a running Spooky waits for its successor (`spooky --takeover`).
    pub control_socket: ControlSocket,
    /// Certificates obtained and renewed automatically; `None`: none.
    pub acme: Option<Acme>,
    /// How backends named by DNS are resolved.
    pub resolver: Resolver,
    /// Fleet mode: packets of other hosts' connections are forwarded to them; `None`: off.
    pub fleet: Option<Fleet>,
}

/// `fleet`: this host's place among hosts sharing a VIP behind ECMP routers or QUIC-aware
/// load balancers (docs/fleet.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fleet {
    /// Where forwarded packets arrive (UDP, GUE), and the source of the ones we forward.
    pub listen: SocketAddr,
    /// Server id → forwarding address of each member (ours may be listed: it is skipped).
    pub members: Vec<(Vec<u8>, SocketAddr)>,
}

/// `resolver`: the DNS resolver for backends named by host name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolver {
    /// Name servers to ask (UDP, then TCP); empty: the system's (`/etc/resolv.conf`).
    /// `/etc/hosts` is read either way.
    pub nameservers: Vec<SocketAddr>,
    /// Bounds on how long an answer is used before it is asked again (its TTL, clamped).
    pub min_ttl: Duration,
    pub max_ttl: Duration,
}

/// `acme`: certificates obtained from an ACME server (RFC 8555) and renewed at two thirds
/// of their lifetime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acme {
    /// The directory URL (`https://…/directory`).
    pub directory: String,
    /// The account's contact (`mailto:`), if any.
    pub email: Option<String>,
    /// Where the account key and the certificates are kept (0700; files 0600).
    pub state_dir: PathBuf,
    /// Extra trust anchors for the directory's HTTPS (a test CA such as pebble's).
    pub ca: Option<PathBuf>,
    pub challenge: AcmeChallenge,
    /// One certificate per entry, for these DNS names (lower-case).
    pub certificates: Vec<Vec<String>>,
}

/// How the ACME server validates that we hold a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// A request to `http://NAME/.well-known/acme-challenge/TOKEN` (needs `listen.http`).
    Http01,
    /// A TLS handshake with ALPN `acme-tls/1` (needs `listen.tcp`), RFC 8737.
    TlsAlpn01,
}

/// The default control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/spooky/control.sock";

/// Where a running Spooky waits for its successor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlSocket {
    /// No takeover possible (`control_socket: off`).
    Off,
    /// At this path. `explicit`: written in the file (a start that cannot bind it fails);
    /// the default path is skipped with a warning when it cannot be bound.
    At { path: PathBuf, explicit: bool },
}

impl ControlSocket {
    /// The path, unless off.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ControlSocket::Off => None,
            ControlSocket::At { path, .. } => Some(path),
        }
    }
}

/// A user of this machine, looked up when the configuration was loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl std::fmt::Display for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Where clients reach us.
#[derive(Clone, Debug, PartialEq)]
pub struct Listen {
    /// `address` and `port` together.
    pub addr: SocketAddr,
    pub tls: ListenTls,
    /// HTTP/2 and HTTP/1.1 over TLS over TCP; `None` when turned off.
    pub tcp: Option<Tcp>,
    /// The `alt-svc` field every response carries; `None`: none.
    pub alt_svc: Option<AltSvc>,
    /// The plaintext HTTP/1.1 listener; `None` when off.
    pub http: Option<PlainHttp>,
}

/// `listen.alt_svc`: where clients are told HTTP/3 is, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AltSvc {
    /// How long clients may remember it (`ma`).
    pub max_age: Duration,
    /// The UDP port advertised: `listen.port` unless a load balancer in front maps ports.
    pub port: u16,
}

/// The plaintext listener (`listen.http`): ACME HTTP-01 answers, and a redirect to `https://`
/// for everything else.
#[derive(Clone, Debug, PartialEq)]
pub struct PlainHttp {
    /// `listen.address` and `listen.http.port`.
    pub addr: SocketAddr,
    /// 301, 302, 307 or 308.
    pub redirect_status: u16,
}

/// The TLS-over-TCP listener (`listen.tcp`).
#[derive(Clone, Debug, PartialEq)]
pub struct Tcp {
    /// The listener's address: `listen.address` and `listen.tcp.port`.
    pub addr: SocketAddr,
    /// The TLS handshake and each request head must arrive within this.
    pub header_timeout: Duration,
    /// A connection that reads and writes nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Open TCP connections at most (shared out over the workers).
    pub max_connections: usize,
    /// Load balancers whose connections open with a PROXY protocol header (v1 or v2), whose
    /// client address then stands for the connection's everywhere. Empty: none; a PROXY
    /// header from anyone else is refused.
    pub proxy_protocol: Vec<Cidr>,
    /// Connections open at once per client address (IPv4, or IPv6 /64), over all workers.
    /// Sources in `proxy_protocol` are not counted (they carry many clients).
    pub max_connections_per_ip: u32,
    /// New connections per second per client address, and the burst; `None`: no limit.
    pub connection_rate_per_ip: Option<(f64, u32)>,
}

/// Our certificates (`listen.tls`), chosen by the SNI of each ClientHello.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenTls {
    /// Never empty; the first is the default (no SNI, or a name no certificate carries, with
    /// `unknown_sni: default`).
    pub certificates: Vec<CertPair>,
    pub unknown_sni: UnknownSni,
}

/// A certificate chain and its key (PEM files, checked readable and parseable at load time).
#[derive(Clone, Debug, PartialEq)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a client gets whose SNI names no certificate (or who sends none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownSni {
    /// The first certificate.
    Default,
    /// No certificate: the handshake ends with `unrecognized_name`.
    Refuse,
}

/// When to validate client addresses with a Retry packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryMode {
    Off,
    Always,
    /// Retry once a worker sees more than this many new connections per second.
    Auto {
        new_connections_per_sec: u32,
    },
}

/// What Spooky does with requests a resuming client sends in 0-RTT (TLS early data), which
/// an attacker who recorded them can replay. Requests with a safe method (GET, HEAD,
/// OPTIONS, TRACE) are forwarded at once with `early-data: 1` (RFC 8470), so a backend can
/// answer 425 itself; the setting decides the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EarlyData {
    /// No 0-RTT: resumed connections still skip the certificate, but send nothing early.
    Off,
    /// Requests with other methods wait for the handshake to complete (a replay never
    /// completes it, so such a request reaches a backend at most once).
    Defer,
    /// Requests with other methods are answered 425 Too Early; the client repeats them
    /// after the handshake.
    Reject,
}

/// QUIC transport settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Quic {
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    /// A request stream must deliver its complete HEADERS frame within this long of being
    /// opened, or it is reset with `H3_REQUEST_REJECTED` (slowloris on request heads).
    pub request_header_timeout: Duration,
    /// A response stream the client lets take no byte for this long is reset, with the
    /// backend stream behind it (a client that never reads holds nothing for ever).
    pub send_timeout: Duration,
    pub max_concurrent_streams: u64,
    pub initial_max_data: u64,
    pub initial_max_stream_data: u64,
    pub max_connections: usize,
    /// Most connections one client address may hold (checked per worker, so across the
    /// process this is approximate).
    pub max_connections_per_ip: usize,
    /// Response streams one connection may hold stalled (the client takes nothing on the
    /// whole connection); more are reset with `H3_EXCESSIVE_LOAD`.
    pub max_stalled_streams: u32,
    /// The same over all connections from one client address (an IPv6 client: its /64); each
    /// worker enforces its share.
    pub max_stalled_streams_per_ip: u32,
    /// Request streams one client address (an IPv6 client: its /64) may have open at once,
    /// over all its connections; each worker enforces its share.
    pub max_streams_per_ip: u32,
    pub retry: RetryMode,
    /// 0-RTT (`quic.early_data`).
    pub early_data: EarlyData,
    /// Total connection ID length (bytes).
    pub cid_len: u8,
    /// Server id written into every connection ID (its length is the server id length).
    pub server_id: Vec<u8>,
    /// The connection-ID generation (QUIC-LB config rotation bits, 0..=6) of the first
    /// process; each takeover uses the next one.
    pub generation: u8,
    /// The format a load balancer in front reads the server id from
    /// (`quic.connection_ids`).
    pub connection_ids: CidFormat,
    /// The key file (stateless-reset and Retry-token keys), created when missing; `None`:
    /// random keys per process, so tokens and resets do not survive a restart.
    pub key_file: Option<PathBuf>,
}

/// `quic.connection_ids.format`: how a load balancer in front finds the server id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CidFormat {
    /// Spooky's own: QUIC-LB plaintext, the process generation as config rotation bits.
    Spooky,
    /// QUIC-LB (draft-ietf-quic-load-balancers-21) with a load balancer's config: plaintext
    /// or encrypted; during a key rotation the previous config is still read.
    QuicLb {
        current: QuicLbConfig,
        previous: Option<QuicLbConfig>,
    },
    /// Katran's version 2 (24-bit server id) or 3 (32-bit).
    Katran { version: u8 },
}

/// One QUIC-LB configuration as the load balancer has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuicLbConfig {
    /// The config rotation codepoint, 0..=6.
    pub rotation: u8,
    /// AES-128 key; `None`: plaintext.
    pub key: Option<[u8; 16]>,
    /// The first octet's low bits carry the connection ID length (else they are random).
    pub length_self_encoding: bool,
}

/// How `forwarded` / `x-forwarded-*` headers are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardedMode {
    /// Append our hop to what the client sent.
    Append,
    /// Drop what the client sent and write our hop only.
    Replace,
    /// Pass the client's headers untouched and add nothing.
    Off,
}

/// An address block: `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `ADDR/LEN` or `ADDR`.
    ///
    /// # Errors
    /// What is wrong, for the field's message.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = addr
            .parse()
            .map_err(|_| format!("\"{text}\" is not an address or ADDRESS/LENGTH"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("prefix length in \"{text}\" must be 0 to {max}"))?,
        };
        Ok(Self { addr, prefix })
    }

    /// Whether `ip` is in this block (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let p = u32::from(self.prefix);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - p).unwrap_or(0);
                u32::from(ip) & mask == u32::from(net) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - p).unwrap_or(0);
                u128::from(ip) & mask == u128::from(net) & mask
            }
            _ => false,
        }
    }
}

/// Whether `ip` is in any of `blocks`.
pub fn in_any(blocks: &[Cidr], ip: std::net::IpAddr) -> bool {
    blocks.iter().any(|b| b.contains(ip))
}

impl Proxy {
    /// Whether `client` is one of `trusted_proxies`.
    pub fn trusted(&self, client: std::net::IpAddr) -> bool {
        in_any(&self.trusted_proxies, client)
    }

    /// How the forwarding headers of a request from `client` are treated: its chain is
    /// extended only when it is a trusted proxy; anyone else's is replaced.
    pub fn forwarded_for(&self, client: std::net::IpAddr) -> ForwardedMode {
        match self.forwarded {
            ForwardedMode::Append if !in_any(&self.trusted_proxies, client) => {
                ForwardedMode::Replace
            }
            mode => mode,
        }
    }
}

/// Proxy behaviour shared by all upstreams.
#[derive(Clone, Debug, PartialEq)]
pub struct Proxy {
    /// For clients in `trusted_proxies`; others' forwarding headers are always replaced
    /// (unless `Off`).
    pub forwarded: ForwardedMode,
    /// Peers whose `x-forwarded-for` / `forwarded` chains are kept and extended (other load
    /// balancers, CDNs). Empty: nobody's.
    pub trusted_proxies: Vec<Cidr>,
    /// Add `via: 3 spooky`.
    pub via: bool,
    /// Give each request an `x-request-id` (kept when a trusted proxy sent one), forwarded to
    /// the backend, returned to the client and logged.
    pub request_id: bool,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Duration,
    /// Largest request header list accepted (bytes, as HTTP/3 counts it).
    pub max_header_list_size: u64,
    /// Resident memory above which new requests get 503 and stalled streams are reset;
    /// `None`: no limit. By default (`auto`) three quarters of the memory available: the
    /// machine's, or its cgroup's limit when smaller.
    pub memory_limit: Option<u64>,
}

/// One upstream pool.
#[derive(Clone, Debug, PartialEq)]
pub struct Upstream {
    pub name: String,
    pub route: Route,
    pub load_balancing: LoadBalancing,
    pub backends: Vec<Backend>,
    pub timeouts: UpstreamTimeouts,
    pub passive_health: PassiveHealth,
    /// Try unhealthy backends anyway when none is healthy (instead of 503).
    pub fail_open: bool,
    /// Largest request body accepted (413 beyond it); `None` = no limit.
    pub max_request_body: Option<u64>,
    /// Requests that may wait for a connection or a stream slot of one backend (all workers
    /// together); more get 503 at once.
    pub max_pending_requests: u32,
    /// Changes to the request's fields before it goes to a backend.
    pub request_headers: HeaderRules,
    /// Changes to the response's fields before they go to the client (also on the answers
    /// Spooky gives for the pool: 502, 503, 504, a redirect).
    pub response_headers: HeaderRules,
    /// Every request of the route is answered with this redirect; the pool has no backends.
    pub redirect: Option<Redirect>,
    /// Each backend connection opens with a PROXY protocol v2 header naming the client it
    /// serves (connections are then the client's own).
    pub send_proxy_protocol: bool,
    /// Who may use the route.
    pub access: Access,
    /// Requests per second per key; `None`: no limit.
    pub rate_limit: Option<RateLimit>,
    /// The largest request field section for this route (RFC 9114 §4.2.2 size); `None`:
    /// `proxy.max_header_list_size` alone.
    pub max_request_headers: Option<u64>,
    /// Requests in flight to one backend at most (all workers); beyond, 503. `None`: no
    /// limit.
    pub max_requests_per_backend: Option<u32>,
    pub readiness: Readiness,
    /// Backends named by DNS: each address the name resolves to becomes one backend in
    /// `backends` (see [`expand`]); these are what they are made from.
    pub named: Vec<NamedBackend>,
}

/// A backend whose address is a DNS name.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedBackend {
    pub host: String,
    pub port: u16,
    /// The backend as configured; its `address` is only a placeholder (unspecified, the
    /// port). Each resolved address gets a copy with `address` set and id `ID@ADDRESS`.
    pub template: Backend,
}

/// Makes one backend of every address each [`NamedBackend`] resolves to (`addresses` of the
/// host name; sorted, so the order is stable), in place of the ones made last time. A name
/// without addresses has no backends (its pool answers 503 until it resolves).
pub fn expand(config: &mut Config, addresses: impl Fn(&str) -> Vec<std::net::IpAddr>) {
    for up in &mut config.upstreams {
        up.backends.retain(|b| b.resolved_from.is_none());
        for named in &up.named {
            let mut ips = addresses(&named.host);
            ips.sort_unstable();
            ips.dedup();
            for ip in ips {
                up.backends.push(Backend {
                    id: format!("{}@{ip}", named.template.id),
                    address: SocketAddr::new(ip, named.port),
                    resolved_from: Some(named.host.clone()),
                    ..named.template.clone()
                });
            }
        }
    }
}

impl Config {
    /// The host names backends are to be resolved from.
    pub fn dns_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .upstreams
            .iter()
            .flat_map(|u| u.named.iter().map(|n| n.host.clone()))
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// Field changes, applied in this order: `remove`, `set`, `add`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderRules {
    /// Lower-case names.
    pub remove: Vec<String>,
    /// (lower-case name, value): replaces every line of the field.
    pub set: Vec<(String, String)>,
    /// (lower-case name, value): one more line.
    pub add: Vec<(String, String)>,
}

impl HeaderRules {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

/// A redirect answer (`upstream.NAME.redirect`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// `scheme://authority[/path]`, without a trailing `/`.
    pub to: String,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
    /// Append the request's path (after the route's prefix) and query to `to`.
    pub keep_path: bool,
}

/// Which requests a pool takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Lower-cased exact host, or `*.suffix` wildcard; `None` = any host.
    pub host: Option<String>,
    /// Always starts with `/`.
    pub path_prefix: String,
    /// What replaces `path_prefix` in the path sent to the backend (`Some("")`: the prefix
    /// is stripped); `None`: the path goes as it came.
    pub rewrite_prefix: Option<String>,
}

/// What a consistent-hash pool hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    /// Lower-cased header name.
    Header(String),
    Cookie(String),
    Path,
}

/// Load-balancing strategy of a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadBalancing {
    Random,
    RoundRobin,
    ConsistentHash { replicas: u32, key: HashKey },
    LeastRequest,
}

/// Per-pool upstream timeouts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamTimeouts {
    pub connect: Duration,
    /// From request sent to response head received.
    pub response_head: Duration,
    /// Longest silence on a body in either direction.
    pub idle: Duration,
    /// Longest a WebSocket tunnel may stay open; `None`: no limit.
    pub websocket_lifetime: Option<Duration>,
    /// Longest a whole request may take, from its head to the response's end (WebSockets
    /// excepted: `websocket_lifetime`); `None`: no limit.
    pub request: Option<Duration>,
}

/// `upstream.NAME.access`: who may use the route, by client address. `deny` is checked
/// first; when `allow` is not empty, only its blocks may.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
}

impl Access {
    /// Whether the list lets everyone in.
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

/// What one rate-limit budget is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateKey {
    /// Each client address.
    Client,
    /// Each client address's /24 (IPv4) or /64 (IPv6).
    ClientPrefix,
    /// Each value of this request header (the client address when it is absent).
    Header(http::HeaderName),
    /// One budget for the whole route.
    Global,
}

/// `upstream.NAME.rate_limit`.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Requests that may arrive at once.
    pub burst: u32,
    pub key: RateKey,
}

/// `upstream.NAME.readiness`: whether the pool counts for `/readyz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// The node is not ready while this pool has no backend to serve.
    Required,
    /// The pool does not hold readiness back (the node is unready only when no pool can
    /// serve).
    Optional,
}

/// Passive health: eject after consecutive failures on real traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassiveHealth {
    pub consecutive_failures: u32,
    pub cooldown: Duration,
    /// Whether a 5xx answer counts as a failure (else only connect failures, resets and
    /// timeouts do: a client can make a backend answer 5xx).
    pub server_errors: bool,
    /// Most backends of the pool passive health may have ejected at once, in percent (at
    /// least one backend may always be ejected).
    pub max_ejection_percent: u32,
}

/// One backend server.
#[derive(Clone, Debug, PartialEq)]
pub struct Backend {
    pub id: String,
    pub address: SocketAddr,
    /// What was written (host name or address), for logs, SNI and `:authority` of probes.
    pub address_text: String,
    pub weight: u32,
    pub health_check: HealthCheck,
    /// `None`: cleartext (HTTP/2 with prior knowledge, or HTTP/1.1).
    pub tls: Option<BackendTls>,
    pub protocol: BackendProtocol,
    /// Made from a [`NamedBackend`]: the host name it resolved from.
    pub resolved_from: Option<String>,
}

/// The HTTP version spoken to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendProtocol {
    /// HTTP/2: h2c with prior knowledge in cleartext, ALPN `h2` over TLS.
    #[default]
    Http2,
    /// HTTP/1.1 with keep-alive, cleartext or over TLS (ALPN `http/1.1`).
    Http1,
    /// Over TLS only: ALPN offers `h2` and `http/1.1` and the backend picks.
    Auto,
}

impl BackendProtocol {
    /// The ALPN protocols offered to a TLS backend, in order of preference.
    pub fn alpn(self) -> Vec<Vec<u8>> {
        match self {
            Self::Http2 => vec![b"h2".to_vec()],
            Self::Http1 => vec![b"http/1.1".to_vec()],
            Self::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        }
    }
}

/// TLS towards a backend (ALPN h2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendTls {
    /// SNI and the name the certificate must carry; defaults to the host part of `address`.
    pub server_name: String,
    /// Extra trust anchors (PEM); `None` = the system's roots.
    pub ca: Option<PathBuf>,
    /// Verification is on unless this is explicitly set to `false` (logged loudly).
    pub verify: bool,
}

/// Active health checking of one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub enabled: bool,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// Inclusive status ranges counted healthy (default 200..=399).
    pub expected_status: Vec<(u16, u16)>,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Log {
    /// A `tracing` filter directive such as `info` or `spooky=debug,info`.
    pub level: String,
    pub format: LogFormat,
    /// Where one line per request goes (JSON), written off the request path.
    pub access: AccessLog,
    /// How access-log lines are written.
    pub access_format: AccessFormat,
}

/// `log.access_format` (with `log.access_fields` for JSON).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessFormat {
    /// One JSON object per line with these fields, in this order.
    Json(Vec<AccessField>),
    /// The Common Log Format (NCSA): `client - - [time] "request" status bytes`.
    Common,
    /// Common, then `"referer" "user-agent"` (Apache's and nginx's `combined`).
    Combined,
}

/// A field of a JSON access-log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessField {
    Time,
    Client,
    Protocol,
    Host,
    Method,
    Path,
    Status,
    BytesIn,
    BytesOut,
    DurationMs,
    Pool,
    Backend,
    Worker,
    RequestId,
    UserAgent,
    Referer,
    UpstreamStatus,
    UpstreamTimeMs,
    TlsVersion,
    Sni,
}

impl AccessField {
    /// Every field, in the default order, with its name.
    pub const ALL: [(&'static str, AccessField); 20] = [
        ("time", AccessField::Time),
        ("client", AccessField::Client),
        ("protocol", AccessField::Protocol),
        ("host", AccessField::Host),
        ("method", AccessField::Method),
        ("path", AccessField::Path),
        ("status", AccessField::Status),
        ("bytes_in", AccessField::BytesIn),
        ("bytes_out", AccessField::BytesOut),
        ("duration_ms", AccessField::DurationMs),
        ("pool", AccessField::Pool),
        ("backend", AccessField::Backend),
        ("worker", AccessField::Worker),
        ("request_id", AccessField::RequestId),
        ("user_agent", AccessField::UserAgent),
        ("referer", AccessField::Referer),
        ("upstream_status", AccessField::UpstreamStatus),
        ("upstream_time_ms", AccessField::UpstreamTimeMs),
        ("tls_version", AccessField::TlsVersion),
        ("sni", AccessField::Sni),
    ];

    /// Its name in the configuration and in the line.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("", |(n, _)| n)
    }
}

/// Access log destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    Stdout,
    File(PathBuf),
}

/// The admin listener (HTTP/1.1 and h2c over TCP): metrics, health, status, reload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admin {
    /// `None` when disabled.
    pub addr: Option<SocketAddr>,
    /// Bearer token required by state-changing endpoints (and by every endpoint when
    /// `token_for_reads` is set).
    pub token: Option<String>,
    pub token_for_reads: bool,
}

/// How XDP attaches when `--iface` is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    Auto,
    Native,
    Generic,
}

/// Kernel steering settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Steering {
    /// Where the BPF maps are pinned while running.
    pub pin_path: PathBuf,
    pub xdp_mode: XdpMode,
    /// XDP flood defense: client Initial packets allowed per second per source prefix
    /// (/24 IPv4, /56 IPv6); 0 turns the limit off.
    pub initial_rate: u32,
    /// Initial packets a prefix may send in a burst above the rate.
    pub initial_burst: u32,
}

impl Config {
    /// The upstream named `name`.
    pub fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// Loads and validates the file at `path` (see [`load`]).
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read, [`ConfigError::Invalid`] with every
    /// problem found otherwise.
    pub fn from_path(path: &Path) -> Result<Self, ConfigError> {
        load(path)
    }
}
