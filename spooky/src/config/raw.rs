//! The configuration file as written: serde structs that mirror the YAML one to one.
//!
//! Every struct denies unknown fields, and every optional field has its default here (the
//! `Default` impls), so this file is the one place that says what an omitted key means.
//! Values whose rules are checked with a field path (ranges, enum names, durations, sizes) are
//! kept loose here (`i64`, `String`, [`RawDuration`], [`RawSize`]) so that `validate` can report
//! every problem at once instead of serde stopping at the first.
//!
//! Nothing here checks meaning; that is `validate`'s job.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub version: i64,
    pub listen: RawListen,
    #[serde(default)]
    pub quic: RawQuic,
    #[serde(default)]
    pub proxy: RawProxy,
    /// Pools by name; a `BTreeMap` so that they come out sorted by name.
    #[serde(default)]
    pub upstream: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub steering: RawSteering,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub workers: Option<i64>,
    /// `off`, or a path; `None` = the default path.
    #[serde(default)]
    pub control_socket: Option<String>,
    #[serde(default)]
    pub acme: Option<RawAcme>,
    #[serde(default)]
    pub resolver: RawResolver,
    #[serde(default)]
    pub fleet: Option<RawFleet>,
}

/// `fleet`: the other hosts behind the same load balancers, and where forwarded packets
/// arrive.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    /// `IP:PORT` (UDP) where members send packets that reached them for our connections.
    pub listen: String,
    /// Server id (as `quic.server_id` is written, in text) → `IP` or `IP:PORT`.
    #[serde(default)]
    pub members: BTreeMap<String, String>,
}

/// `resolver`: how backends named by DNS are resolved.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawResolver {
    /// `IP` or `IP:PORT` each; empty = the system's.
    pub nameservers: Vec<String>,
    pub min_ttl: RawDuration,
    pub max_ttl: RawDuration,
}

impl Default for RawResolver {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            min_ttl: RawDuration::Millis(1_000),
            max_ttl: RawDuration::Millis(300_000),
        }
    }
}

/// `acme`: certificates obtained and renewed automatically (RFC 8555).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAcme {
    pub directory: String,
    #[serde(default)]
    pub email: Option<String>,
    /// `None`: `state/acme` beside the configuration file.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Extra trust anchors (PEM) for the directory's HTTPS; `None`: the system's roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// `http-01` or `tls-alpn-01`; `None`: `http-01` when `listen.http` is on.
    #[serde(default)]
    pub challenge: Option<String>,
    pub certificates: Vec<RawAcmeCertificate>,
}

/// One of `acme.certificates`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAcmeCertificate {
    pub domains: Vec<String>,
}

/// `admin`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub enabled: bool,
    pub address: String,
    pub token: Option<String>,
    pub token_for_reads: bool,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            enabled: true,
            address: "127.0.0.1:9900".to_owned(),
            token: None,
            token_for_reads: false,
        }
    }
}

/// `listen`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListen {
    #[serde(default = "default_protocol")]
    pub protocol: String,
    pub port: i64,
    #[serde(default = "default_listen_address")]
    pub address: String,
    pub tls: RawListenTls,
    #[serde(default)]
    pub tcp: RawTcp,
    #[serde(default)]
    pub alt_svc: RawAltSvc,
    #[serde(default)]
    pub http: RawPlainHttp,
}

/// `listen.http`: the plaintext HTTP/1.1 listener (redirects to https, ACME HTTP-01), off
/// by default.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawPlainHttp {
    pub enabled: bool,
    pub port: i64,
    pub redirect_status: i64,
}

impl Default for RawPlainHttp {
    fn default() -> Self {
        Self {
            enabled: false,
            port: 80,
            redirect_status: 308,
        }
    }
}

/// `listen.tcp`: HTTP/2 and HTTP/1.1 over TLS over TCP, on by default.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawTcp {
    pub enabled: bool,
    /// `None`: `listen.port`.
    pub port: Option<i64>,
    pub header_timeout: RawDuration,
    pub idle_timeout: RawDuration,
    pub max_connections: i64,
    /// Sources whose connections open with a PROXY protocol header (v1 or v2).
    pub proxy_protocol: RawProxyProtocol,
    pub max_connections_per_ip: i64,
    pub connection_rate_per_ip: Option<RawRate>,
}

/// A rate: `per_second` sustained, `burst` at once.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRate {
    pub per_second: f64,
    pub burst: Option<i64>,
}

/// `listen.tcp.proxy_protocol`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawProxyProtocol {
    pub trusted: Vec<String>,
}

impl Default for RawTcp {
    fn default() -> Self {
        Self {
            enabled: true,
            port: None,
            header_timeout: RawDuration::Millis(10_000),
            idle_timeout: RawDuration::Millis(60_000),
            max_connections: 10_000,
            proxy_protocol: RawProxyProtocol::default(),
            max_connections_per_ip: 256,
            connection_rate_per_ip: None,
        }
    }
}

/// `listen.alt_svc`: the `alt-svc` field on every response.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawAltSvc {
    pub enabled: bool,
    pub max_age: RawDuration,
    /// `None`: `listen.port`.
    pub port: Option<i64>,
}

impl Default for RawAltSvc {
    fn default() -> Self {
        Self {
            enabled: true,
            max_age: RawDuration::Millis(86_400_000),
            port: None,
        }
    }
}

fn default_protocol() -> String {
    "http3".to_owned()
}

fn default_listen_address() -> String {
    "0.0.0.0".to_owned()
}

/// `listen.tls`: one pair (`cert`, `key`), or several (`certificates`) chosen by SNI.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListenTls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub certificates: Vec<RawCertPair>,
    /// `default` or `refuse`; `None` = `default`.
    pub unknown_sni: Option<String>,
}

/// One of `listen.tls.certificates`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `quic`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawQuic {
    pub idle_timeout: RawDuration,
    pub handshake_timeout: RawDuration,
    pub request_header_timeout: RawDuration,
    pub send_timeout: RawDuration,
    pub max_concurrent_streams: i64,
    pub initial_max_data: RawSize,
    pub initial_max_stream_data: RawSize,
    pub max_connections: i64,
    pub max_connections_per_ip: i64,
    pub max_stalled_streams: i64,
    pub max_stalled_streams_per_ip: i64,
    pub max_streams_per_ip: i64,
    pub retry: String,
    /// Only meaningful with `retry: auto`; `None` = 1000.
    pub retry_threshold: Option<i64>,
    /// `off`, `defer` or `reject`.
    pub early_data: String,
    pub cid_len: i64,
    pub server_id: RawServerId,
    pub generation: i64,
    /// `None`: random keys per process.
    pub key_file: Option<PathBuf>,
    pub connection_ids: RawConnectionIds,
}

/// `quic.connection_ids`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawConnectionIds {
    /// `spooky`, `quic-lb`, `katran-v2` or `katran-v3`.
    pub format: String,
    pub config_rotation: Option<i64>,
    pub key: Option<String>,
    pub length_self_encoding: Option<bool>,
    pub previous: Option<RawQuicLbConfig>,
}

impl Default for RawConnectionIds {
    fn default() -> Self {
        Self {
            format: "spooky".to_owned(),
            config_rotation: None,
            key: None,
            length_self_encoding: None,
            previous: None,
        }
    }
}

/// `quic.connection_ids.previous`: the QUIC-LB config being rotated out.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawQuicLbConfig {
    pub config_rotation: i64,
    pub key: Option<String>,
    pub length_self_encoding: bool,
}

/// Default for `quic.retry_threshold` (new connections per second per worker).
pub(super) const DEFAULT_RETRY_THRESHOLD: i64 = 1000;

impl Default for RawQuic {
    fn default() -> Self {
        Self {
            idle_timeout: RawDuration::Millis(30_000),
            handshake_timeout: RawDuration::Millis(10_000),
            request_header_timeout: RawDuration::Millis(10_000),
            send_timeout: RawDuration::Millis(30_000),
            max_concurrent_streams: 100,
            initial_max_data: RawSize::Bytes(10 * 1024 * 1024),
            initial_max_stream_data: RawSize::Bytes(1024 * 1024),
            max_connections: 100_000,
            max_connections_per_ip: 100,
            max_stalled_streams: 16,
            max_stalled_streams_per_ip: 256,
            max_streams_per_ip: 512,
            retry: "auto".to_owned(),
            retry_threshold: None,
            early_data: "defer".to_owned(),
            cid_len: 16,
            server_id: RawServerId::Int(1),
            generation: 0,
            key_file: None,
            connection_ids: RawConnectionIds::default(),
        }
    }
}

/// `proxy`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawProxy {
    pub forwarded: String,
    pub trusted_proxies: Vec<String>,
    pub via: bool,
    pub request_id: bool,
    pub shutdown_grace: RawDuration,
    pub max_header_list_size: RawSize,
    /// `None` (or `auto`): three quarters of the memory available; `off`: no limit.
    pub memory_limit: Option<RawSize>,
}

impl Default for RawProxy {
    fn default() -> Self {
        Self {
            forwarded: "append".to_owned(),
            trusted_proxies: Vec::new(),
            via: true,
            request_id: true,
            shutdown_grace: RawDuration::Millis(30_000),
            max_header_list_size: RawSize::Bytes(64 * 1024),
            memory_limit: None,
        }
    }
}

/// `upstream.NAME`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    #[serde(default)]
    pub load_balancing: RawLoadBalancing,
    #[serde(default)]
    pub route: RawRoute,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub passive_health: RawPassiveHealth,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub max_request_body: Option<RawSize>,
    /// Requests that may wait for a connection or a stream slot, per backend.
    #[serde(default = "default_max_pending")]
    pub max_pending_requests: i64,
    /// Header rules towards the backend.
    #[serde(default)]
    pub request_headers: RawHeaderRules,
    /// Header rules towards the client.
    #[serde(default)]
    pub response_headers: RawHeaderRules,
    /// Answer every request of the route with a redirect (and have no backends).
    #[serde(default)]
    pub redirect: Option<RawRedirect>,
    /// `v2`: a PROXY protocol v2 header opens each backend connection; `off` (default).
    #[serde(default)]
    pub send_proxy_protocol: Option<String>,
    #[serde(default)]
    pub access: RawAccess,
    #[serde(default)]
    pub rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    pub max_request_headers: Option<RawSize>,
    #[serde(default)]
    pub max_requests_per_backend: Option<i64>,
    /// `required` or `optional` (default).
    #[serde(default)]
    pub readiness: Option<String>,
}

/// `upstream.NAME.access`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawAccess {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

/// `upstream.NAME.rate_limit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub requests_per_second: f64,
    /// Default: `requests_per_second`, at least 1.
    pub burst: Option<i64>,
    /// `client` (default), `client_prefix`, `header:NAME` or `global`.
    pub key: Option<String>,
}

/// `upstream.NAME.request_headers` / `response_headers`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawHeaderRules {
    /// Replace (or add) the field.
    pub set: std::collections::BTreeMap<String, String>,
    /// Add a field line, keeping the ones there.
    pub add: std::collections::BTreeMap<String, String>,
    /// Remove the field.
    pub remove: Vec<String>,
}

/// `upstream.NAME.redirect`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedirect {
    pub to: String,
    #[serde(default = "default_redirect_status")]
    pub status: i64,
    #[serde(default = "default_true")]
    pub keep_path: bool,
}

fn default_redirect_status() -> i64 {
    308
}

fn default_true() -> bool {
    true
}

/// Default for `upstream.NAME.max_pending_requests` (Envoy's `max_pending_requests` too).
pub(super) const DEFAULT_MAX_PENDING: i64 = 1024;

fn default_max_pending() -> i64 {
    DEFAULT_MAX_PENDING
}

/// `upstream.NAME.load_balancing`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawLoadBalancing {
    #[serde(rename = "type")]
    pub kind: String,
    /// Only for `consistent-hash`; `None` = 160.
    pub replicas: Option<i64>,
    /// Only for `consistent-hash`; `None` = `client-ip`.
    pub key: Option<String>,
}

/// Default for `load_balancing.replicas`.
pub(super) const DEFAULT_REPLICAS: i64 = 160;

impl Default for RawLoadBalancing {
    fn default() -> Self {
        Self {
            kind: "round-robin".to_owned(),
            replicas: None,
            key: None,
        }
    }
}

/// `upstream.NAME.route`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawRoute {
    pub path_prefix: String,
    /// `None` = any host.
    pub host: Option<String>,
    /// Drop `path_prefix` from the path before the request goes to the backend.
    pub strip_prefix: bool,
    /// Replace `path_prefix` with this before the request goes to the backend.
    pub rewrite_prefix: Option<String>,
}

impl Default for RawRoute {
    fn default() -> Self {
        Self {
            path_prefix: "/".to_owned(),
            host: None,
            strip_prefix: false,
            rewrite_prefix: None,
        }
    }
}

/// `upstream.NAME.timeouts`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawTimeouts {
    pub connect: RawDuration,
    pub response_head: RawDuration,
    pub idle: RawDuration,
    /// `None`: no limit.
    pub websocket_lifetime: Option<RawDuration>,
    /// `None`: no limit.
    pub request: Option<RawDuration>,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        Self {
            connect: RawDuration::Millis(2_000),
            response_head: RawDuration::Millis(30_000),
            idle: RawDuration::Millis(60_000),
            websocket_lifetime: None,
            request: None,
        }
    }
}

/// `upstream.NAME.passive_health`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawPassiveHealth {
    pub consecutive_failures: i64,
    pub cooldown: RawDuration,
    pub server_errors: bool,
    pub max_ejection_percent: i64,
}

impl Default for RawPassiveHealth {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            cooldown: RawDuration::Millis(30_000),
            server_errors: false,
            max_ejection_percent: 50,
        }
    }
}

/// `upstream.NAME.backends[i]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub id: String,
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: i64,
    /// `None` = no active health checks (passive health still applies).
    #[serde(default)]
    pub health_check: Option<RawHealthCheck>,
    /// `None` = HTTP/2 cleartext (h2c).
    #[serde(default)]
    pub tls: Option<RawBackendTls>,
    /// `http2` (default), `http1` or `auto` (TLS only: ALPN decides).
    #[serde(default)]
    pub protocol: Option<String>,
}

fn default_weight() -> i64 {
    1
}

/// `upstream.NAME.backends[i].health_check`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    pub enabled: bool,
    pub path: String,
    pub interval: RawDuration,
    pub timeout: RawDuration,
    pub healthy_threshold: i64,
    pub unhealthy_threshold: i64,
    pub expected_status: Vec<RawStatusRange>,
}

impl Default for RawHealthCheck {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/health".to_owned(),
            interval: RawDuration::Millis(5_000),
            timeout: RawDuration::Millis(1_000),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            expected_status: vec![RawStatusRange::Pair(vec![200, 399])],
        }
    }
}

/// `upstream.NAME.backends[i].tls`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawBackendTls {
    /// `None` = the host part of the backend's `address`.
    pub server_name: Option<String>,
    /// `None` = the system's trust roots.
    pub ca: Option<PathBuf>,
    pub verify: bool,
}

impl Default for RawBackendTls {
    fn default() -> Self {
        Self {
            server_name: None,
            ca: None,
            verify: true,
        }
    }
}

/// `log`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawLog {
    pub level: String,
    pub format: String,
    pub access: String,
    /// `json` (default), `common` or `combined`.
    pub access_format: String,
    /// The JSON format's fields, in order (default: all).
    pub access_fields: Option<Vec<String>>,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: "text".to_owned(),
            access: "off".to_owned(),
            access_format: "json".to_owned(),
            access_fields: None,
        }
    }
}

/// `steering`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawSteering {
    pub pin_path: PathBuf,
    pub xdp_mode: String,
    pub initial_rate: i64,
    pub initial_burst: i64,
}

impl Default for RawSteering {
    fn default() -> Self {
        Self {
            pin_path: PathBuf::from("/sys/fs/bpf/spooky"),
            xdp_mode: "auto".to_owned(),
            initial_rate: 2000,
            initial_burst: 4000,
        }
    }
}

/// A duration as written: an integer number of milliseconds, or text such as `250ms`, `5s`,
/// `1m`, `1h`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum RawDuration {
    Millis(i64),
    Text(String),
}

impl RawDuration {
    /// The duration this stands for.
    ///
    /// # Errors
    /// A message (without field path) when the value is negative or not `<integer><unit>`.
    pub fn to_duration(&self) -> Result<Duration, String> {
        match self {
            Self::Millis(ms) => u64::try_from(*ms)
                .map(Duration::from_millis)
                .map_err(|_| format!("must not be negative, got {ms}")),
            Self::Text(text) => parse_duration_text(text).ok_or_else(|| {
                format!(
                    "invalid duration \"{text}\" (use milliseconds as an integer, or an integer \
                     with a unit: ms, s, m, h, e.g. \"250ms\", \"5s\")"
                )
            }),
        }
    }
}

fn parse_duration_text(text: &str) -> Option<Duration> {
    let (number, unit) = split_number(text.trim())?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    number
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
}

/// A byte size as written: an integer number of bytes, or text such as `64KiB`, `10MiB`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum RawSize {
    Bytes(i64),
    Text(String),
}

impl RawSize {
    /// The number of bytes this stands for.
    ///
    /// # Errors
    /// A message (without field path) when the value is negative or not `<integer><unit>`.
    pub fn to_bytes(&self) -> Result<u64, String> {
        match self {
            Self::Bytes(n) => {
                u64::try_from(*n).map_err(|_| format!("must not be negative, got {n}"))
            }
            Self::Text(text) => parse_size_text(text).ok_or_else(|| {
                format!(
                    "invalid size \"{text}\" (use bytes as an integer, or an integer with a unit: \
                     B, KB, KiB, MB, MiB, GB, GiB, e.g. \"64KiB\")"
                )
            }),
        }
    }
}

fn parse_size_text(text: &str) -> Option<u64> {
    let (number, unit) = split_number(text.trim())?;
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "KB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

/// Splits `"250ms"` into `(250, "ms")`; `None` without leading digits or on overflow.
fn split_number(text: &str) -> Option<(u64, &str)> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let (number, unit) = text.split_at(digits);
    Some((number.parse().ok()?, unit.trim_start()))
}

/// `quic.server_id` as written: an integer (stored in 2 bytes) or a hex string `"0x0001"`
/// (as many bytes as it has digit pairs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum RawServerId {
    Int(i64),
    Text(String),
}

/// One `expected_status` entry as written: a single status or an inclusive `[low, high]` pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum RawStatusRange {
    Single(i64),
    /// Exactly two numbers when well formed; `validate` reports any other length.
    Pair(Vec<i64>),
}

/// Implements `Deserialize` for a two-variant "integer or text" enum.
macro_rules! int_or_text {
    ($ty:ident, $int:ident, $expecting:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$ty, E> {
                        Ok($ty::$int(v))
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$ty, E> {
                        Ok($ty::$int(i64::try_from(v).unwrap_or(i64::MAX)))
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        Ok($ty::Text(v.to_owned()))
                    }
                }
                deserializer.deserialize_any(V)
            }
        }
    };
}

int_or_text!(
    RawDuration,
    Millis,
    "a duration: integer milliseconds or text like \"5s\""
);
int_or_text!(
    RawSize,
    Bytes,
    "a size: integer bytes or text like \"64KiB\""
);
int_or_text!(
    RawServerId,
    Int,
    "a server id: an integer or a hex string like \"0x0001\""
);

impl<'de> Deserialize<'de> for RawStatusRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawStatusRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a status code or a [low, high] pair")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawStatusRange, E> {
                Ok(RawStatusRange::Single(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawStatusRange, E> {
                Ok(RawStatusRange::Single(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawStatusRange, A::Error> {
                let mut values = Vec::new();
                while let Some(v) = seq.next_element::<i64>()? {
                    values.push(v);
                }
                Ok(RawStatusRange::Pair(values))
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_millis_and_units() {
        let cases = [
            (RawDuration::Millis(5000), Duration::from_secs(5)),
            (
                RawDuration::Text("250ms".into()),
                Duration::from_millis(250),
            ),
            (RawDuration::Text("5s".into()), Duration::from_secs(5)),
            (RawDuration::Text("1m".into()), Duration::from_secs(60)),
            (RawDuration::Text("1h".into()), Duration::from_secs(3600)),
            (RawDuration::Text(" 2 s ".into()), Duration::from_secs(2)),
        ];
        for (raw, want) in cases {
            assert_eq!(raw.to_duration(), Ok(want), "{raw:?}");
        }
    }

    #[test]
    fn durations_reject_garbage() {
        assert_eq!(
            RawDuration::Millis(-1).to_duration(),
            Err("must not be negative, got -1".to_owned())
        );
        for text in ["5", "s", "1.5s", "5d", "", "99999999999999999999h"] {
            let err = RawDuration::Text(text.into()).to_duration().unwrap_err();
            assert!(
                err.starts_with(&format!("invalid duration \"{text}\"")),
                "{err}"
            );
        }
    }

    #[test]
    fn sizes_accept_bytes_and_units() {
        let cases = [
            (RawSize::Bytes(10), 10),
            (RawSize::Text("64KiB".into()), 65_536),
            (RawSize::Text("10MiB".into()), 10 * 1024 * 1024),
            (RawSize::Text("1GiB".into()), 1 << 30),
            (RawSize::Text("2KB".into()), 2000),
            (RawSize::Text("3MB".into()), 3_000_000),
            (RawSize::Text("4GB".into()), 4_000_000_000),
            (RawSize::Text("7B".into()), 7),
            (RawSize::Text("8".into()), 8),
        ];
        for (raw, want) in cases {
            assert_eq!(raw.to_bytes(), Ok(want), "{raw:?}");
        }
    }

    #[test]
    fn sizes_reject_garbage() {
        assert_eq!(
            RawSize::Bytes(-5).to_bytes(),
            Err("must not be negative, got -5".to_owned())
        );
        for text in ["KiB", "1.5MiB", "10mib", "1TiB"] {
            let err = RawSize::Text(text.into()).to_bytes().unwrap_err();
            assert!(
                err.starts_with(&format!("invalid size \"{text}\"")),
                "{err}"
            );
        }
    }

    #[test]
    fn status_ranges_deserialize_from_numbers_and_pairs() {
        let got: Vec<RawStatusRange> =
            serde_yaml::from_str("[204, [200, 299], [1, 2, 3]]").unwrap();
        assert_eq!(
            got,
            vec![
                RawStatusRange::Single(204),
                RawStatusRange::Pair(vec![200, 299]),
                RawStatusRange::Pair(vec![1, 2, 3]),
            ]
        );
    }

    #[test]
    fn int_or_text_values_deserialize() {
        let got: Vec<RawDuration> = serde_yaml::from_str("[5000, 5s]").unwrap();
        assert_eq!(
            got,
            vec![RawDuration::Millis(5000), RawDuration::Text("5s".into())]
        );
        let got: Vec<RawServerId> = serde_yaml::from_str("[7, \"0x0001\"]").unwrap();
        assert_eq!(
            got,
            vec![RawServerId::Int(7), RawServerId::Text("0x0001".into())]
        );
        let err = serde_yaml::from_str::<RawSize>("[1]")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a size: integer bytes or text like \"64KiB\""),
            "{err}"
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_yaml::from_str::<RawRoute>("path_prefix: /\nhots: x\n").unwrap_err();
        assert!(err.to_string().starts_with("unknown field `hots`"), "{err}");
    }
}
