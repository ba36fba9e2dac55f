//! Raw config → typed [`Config`]: every rule, every problem reported at once with its field path.
//!
//! Each `build_*` function takes the raw section, the field path that leads to it and the shared
//! [`Errors`] collector; it returns `Some(typed)` when its section is valid and `None` otherwise,
//! after recording every problem it found. Defaults live in `raw`, not here.
//!
//! Validation does no I/O of its own: reading the TLS files the configuration names (to check
//! they parse), resolving backend host names and looking up `user` go through an [`Env`]
//! ([`System`] for the real thing).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use spooky_common::cid::{
    CidLayout, LayoutError, MAX_CID_LEN, MAX_SERVER_ID_LEN, MIN_NONCE_LEN, UNROUTABLE_GENERATION,
};

use super::env::{Env, System};
use super::raw::{
    RawAdmin, RawBackend, RawBackendTls, RawConfig, RawDuration, RawHealthCheck, RawListen,
    RawLoadBalancing, RawLog, RawPassiveHealth, RawProxy, RawQuic, RawRoute, RawServerId, RawSize,
    RawStatusRange, RawSteering, RawTimeouts, RawUpstream, DEFAULT_REPLICAS,
    DEFAULT_RETRY_THRESHOLD,
};
use super::{
    AccessLog, Admin, Backend, BackendTls, Config, ForwardedMode, HashKey, HealthCheck, Listen,
    ListenTls, LoadBalancing, Log, LogFormat, PassiveHealth, Proxy, Quic, RetryMode, Route,
    Steering, Upstream, UpstreamTimeouts, User, XdpMode,
};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("cannot read configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not YAML, or not the shape of a configuration (unknown or missing field, wrong type);
    /// serde's message carries the field path and line.
    #[error("{0}")]
    Syntax(#[from] serde_yaml::Error),
    /// Well-formed but breaking rules: every problem found, in file order.
    #[error("{}", InvalidList(.0))]
    Invalid(Vec<FieldError>),
}

impl ConfigError {
    /// The process exit code for this error: 2 when the file cannot be read, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Read { .. } => 2,
            Self::Syntax(_) | Self::Invalid(_) => 1,
        }
    }
}

/// One broken rule: where (`upstream.api.backends[1].address`) and what.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

/// Displays `invalid configuration (N problems):` and one indented line per problem.
struct InvalidList<'a>(&'a [FieldError]);

impl fmt::Display for InvalidList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "invalid configuration ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for e in self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// Reads and validates the configuration file at `path`. Relative paths inside it (TLS
/// certificate, key, CA files) resolve against the file's directory.
///
/// # Errors
/// [`ConfigError::Read`] when the file cannot be read; otherwise as [`parse`].
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, &System)
}

/// [`load`] with the I/O of `env`.
///
/// # Errors
/// As [`load`].
pub fn load_with(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
    let read = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let bytes = env.read(path).map_err(read)?;
    let yaml = String::from_utf8(bytes)
        .map_err(|e| read(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    let base_dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    parse_with(&yaml, base_dir, env)
}

/// Validates configuration text; relative paths in it resolve against `base_dir`.
///
/// # Errors
/// [`ConfigError::Syntax`] when the text is not a configuration's shape,
/// [`ConfigError::Invalid`] listing every broken rule.
pub fn parse(yaml: &str, base_dir: &Path) -> Result<Config, ConfigError> {
    parse_with(yaml, base_dir, &System)
}

/// [`parse`] with the I/O of `env` (tests and the fuzzer give one that touches nothing).
///
/// # Errors
/// As [`parse`].
pub fn parse_with(yaml: &str, base_dir: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
    // Read the first document; serde_yaml refuses a second one without saying where, so the
    // check for it is ours.
    let mut documents = serde_yaml::Deserializer::from_str(yaml);
    let raw: RawConfig = match documents.next() {
        Some(first) => serde::Deserialize::deserialize(first)?,
        None => serde_yaml::from_str(yaml)?,
    };
    if documents.next().is_some() {
        return Err(ConfigError::Invalid(vec![FieldError {
            path: "(file)".to_owned(),
            message:
                "holds more than one YAML document (a `---` separator); Spooky reads exactly one"
                    .to_owned(),
        }]));
    }
    let mut errs = Errors::default();
    let io = Io {
        base: base_dir,
        env,
    };
    match build_config(&raw, &io, &mut errs) {
        Some(config) if errs.0.is_empty() => Ok(config),
        _ => Err(ConfigError::Invalid(errs.0)),
    }
}

/// Where relative paths start, and the I/O to reach what the configuration names.
struct Io<'a> {
    base: &'a Path,
    env: &'a dyn Env,
}

/// The collector every check writes into.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// `Some(v)` for `Ok(v)`; records the message under `path` for `Err`.
    fn check<T>(&mut self, path: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.push(path, message)).ok()
    }
}

fn build_config(raw: &RawConfig, io: &Io<'_>, errs: &mut Errors) -> Option<Config> {
    let version = errs.check(
        "version",
        if raw.version == 1 {
            Ok(1)
        } else {
            Err(format!(
                "unsupported version {} (only 1 exists)",
                raw.version
            ))
        },
    );
    let listen = build_listen(&raw.listen, io, errs);
    let quic = build_quic(&raw.quic, errs);
    let proxy = build_proxy(&raw.proxy, errs);
    let upstreams = build_upstreams(raw, io, errs);
    let log = build_log(&raw.log, errs);
    let steering = build_steering(&raw.steering, errs);
    let admin = build_admin(&raw.admin, errs);
    let user = match &raw.user {
        None => Some(None),
        Some(name) => errs.check(
            "user",
            io.env
                .user(name)
                .map(|(uid, gid)| {
                    Some(User {
                        name: name.clone(),
                        uid,
                        gid,
                    })
                })
                .ok_or_else(|| format!("user {name:?} does not exist")),
        ),
    };
    let workers = match raw.workers {
        None => Some(None),
        Some(n) => errs.check("workers", int_in(n, 1, 4096)).map(Some),
    };
    Some(Config {
        version: version?,
        listen: listen?,
        quic: quic?,
        proxy: proxy?,
        upstreams: upstreams?,
        log: log?,
        steering: steering?,
        admin: admin?,
        user: user?,
        workers: workers?,
    })
}

fn build_admin(raw: &RawAdmin, errs: &mut Errors) -> Option<Admin> {
    let addr = if raw.enabled {
        errs.check(
            "admin.address",
            raw.address
                .parse::<SocketAddr>()
                .map(Some)
                .map_err(|_| format!("invalid socket address \"{}\"", raw.address)),
        )
    } else {
        Some(None)
    };
    let token = match &raw.token {
        Some(t) if t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()) => {
            errs.check::<Option<String>>(
                "admin.token",
                Err("must be at least 16 characters without whitespace".to_owned()),
            )
        }
        t => Some(t.clone()),
    };
    let token_for_reads = errs.check(
        "admin.token_for_reads",
        if raw.token_for_reads && raw.token.is_none() {
            Err("needs admin.token".to_owned())
        } else {
            Ok(raw.token_for_reads)
        },
    );
    Some(Admin {
        addr: addr?,
        token: token?,
        token_for_reads: token_for_reads?,
    })
}

fn build_listen(raw: &RawListen, io: &Io<'_>, errs: &mut Errors) -> Option<Listen> {
    errs.check(
        "listen.protocol",
        one_of(&raw.protocol, "protocol", &[("http3", ())]),
    );
    let port = errs.check("listen.port", int_in::<u16>(raw.port, 1, 65535));
    let ip = errs.check(
        "listen.address",
        raw.address
            .parse::<IpAddr>()
            .map_err(|_| format!("invalid IP address \"{}\"", raw.address)),
    );
    let cert = errs.check("listen.tls.cert", check_certs(io, &raw.tls.cert));
    let key = errs.check("listen.tls.key", check_key(io, &raw.tls.key));
    Some(Listen {
        addr: SocketAddr::new(ip?, port?),
        tls: ListenTls {
            cert: cert?,
            key: key?,
        },
    })
}

fn build_quic(raw: &RawQuic, errs: &mut Errors) -> Option<Quic> {
    let idle_timeout = positive_duration(errs, "quic.idle_timeout", &raw.idle_timeout);
    let handshake_timeout =
        positive_duration(errs, "quic.handshake_timeout", &raw.handshake_timeout);
    let request_header_timeout = positive_duration(
        errs,
        "quic.request_header_timeout",
        &raw.request_header_timeout,
    );
    let max_concurrent_streams = errs.check(
        "quic.max_concurrent_streams",
        int_in(raw.max_concurrent_streams, 1, 1 << 60),
    );
    let initial_max_data = size_in(errs, "quic.initial_max_data", &raw.initial_max_data);
    let initial_max_stream_data = size_in(
        errs,
        "quic.initial_max_stream_data",
        &raw.initial_max_stream_data,
    );
    let max_connections = errs.check(
        "quic.max_connections",
        int_in(raw.max_connections, 1, 100_000_000),
    );
    let max_connections_per_ip = errs.check(
        "quic.max_connections_per_ip",
        int_in(raw.max_connections_per_ip, 1, 100_000_000),
    );
    let retry = build_retry(raw, errs);
    let cid_len = errs.check("quic.cid_len", int_in::<u8>(raw.cid_len, 0, 255));
    let server_id = errs.check("quic.server_id", parse_server_id(&raw.server_id));
    let max_generation = i64::from(UNROUTABLE_GENERATION) - 1;
    let generation = errs.check(
        "quic.generation",
        int_in::<u8>(raw.generation, 0, max_generation),
    );
    if let (Some(len), Some(id)) = (cid_len, &server_id) {
        // A bad generation is already reported; check the lengths with a routable one.
        check_cid_layout(len, id.len(), generation.unwrap_or(0), errs);
    }
    Some(Quic {
        idle_timeout: idle_timeout?,
        handshake_timeout: handshake_timeout?,
        request_header_timeout: request_header_timeout?,
        max_concurrent_streams: max_concurrent_streams?,
        initial_max_data: initial_max_data?,
        initial_max_stream_data: initial_max_stream_data?,
        max_connections: max_connections?,
        max_connections_per_ip: max_connections_per_ip?,
        retry: retry?,
        cid_len: cid_len?,
        server_id: server_id?,
        generation: generation?,
    })
}

fn build_retry(raw: &RawQuic, errs: &mut Errors) -> Option<RetryMode> {
    #[derive(Clone, Copy)]
    enum Kind {
        Off,
        Always,
        Auto,
    }
    let kinds = [
        ("off", Kind::Off),
        ("always", Kind::Always),
        ("auto", Kind::Auto),
    ];
    let kind = errs.check("quic.retry", one_of(&raw.retry, "retry mode", &kinds))?;
    match (kind, raw.retry_threshold) {
        (Kind::Auto, threshold) => {
            let threshold = threshold.unwrap_or(DEFAULT_RETRY_THRESHOLD);
            let n = errs.check("quic.retry_threshold", int_in(threshold, 1, 100_000_000))?;
            Some(RetryMode::Auto {
                new_connections_per_sec: n,
            })
        }
        (_, Some(_)) => {
            errs.push("quic.retry_threshold", "only applies when retry is auto");
            None
        }
        (Kind::Off, None) => Some(RetryMode::Off),
        (Kind::Always, None) => Some(RetryMode::Always),
    }
}

/// An integer is stored in 2 bytes; `"0x…"` text gives one byte per pair of hex digits.
fn parse_server_id(raw: &RawServerId) -> Result<Vec<u8>, String> {
    match raw {
        RawServerId::Int(n) => match u16::try_from(*n) {
            Ok(v) => Ok(v.to_be_bytes().to_vec()),
            Err(_) => Err(format!(
                "integer server id must be between 0 and 65535, got {n} (write longer ids as \
                 hex text like \"0x00010203\")"
            )),
        },
        RawServerId::Text(text) => {
            let bad =
                || format!("invalid server id \"{text}\" (expected hex text like \"0x0001\")");
            let digits = text
                .strip_prefix("0x")
                .or_else(|| text.strip_prefix("0X"))
                .filter(|d| !d.is_empty() && d.len() % 2 == 0)
                .ok_or_else(bad)?;
            digits
                .as_bytes()
                .chunks(2)
                .map(|pair| {
                    std::str::from_utf8(pair)
                        .ok()
                        .and_then(|p| u8::from_str_radix(p, 16).ok())
                        .ok_or_else(bad)
                })
                .collect()
        }
    }
}

/// Asks [`CidLayout::new`] whether the connection ID parts fit, and files its refusal under
/// the field to change.
fn check_cid_layout(cid_len: u8, server_id_len: usize, generation: u8, errs: &mut Errors) {
    let too_long = || {
        format!(
            "a server id of {server_id_len} bytes does not fit: it must be \
             1..={MAX_SERVER_ID_LEN} bytes and leave {MIN_NONCE_LEN} nonce bytes in a \
             {cid_len}-byte connection ID"
        )
    };
    let Ok(sid_len) = u8::try_from(server_id_len) else {
        errs.push("quic.server_id", too_long());
        return;
    };
    match CidLayout::new(cid_len, sid_len, generation) {
        Ok(_) => {}
        Err(LayoutError::CidLen) => errs.push(
            "quic.cid_len",
            format!(
                "must be between {} and {MAX_CID_LEN}, got {cid_len}",
                2 + 1 + MIN_NONCE_LEN
            ),
        ),
        Err(LayoutError::ServerIdLen) => errs.push("quic.server_id", too_long()),
        Err(LayoutError::Generation) => errs.push(
            "quic.generation",
            format!(
                "must be between 0 and {}, got {generation}",
                UNROUTABLE_GENERATION - 1
            ),
        ),
    }
}

fn build_proxy(raw: &RawProxy, errs: &mut Errors) -> Option<Proxy> {
    let modes = [
        ("append", ForwardedMode::Append),
        ("replace", ForwardedMode::Replace),
        ("off", ForwardedMode::Off),
    ];
    let forwarded = errs.check(
        "proxy.forwarded",
        one_of(&raw.forwarded, "forwarded mode", &modes),
    );
    let shutdown_grace = duration(errs, "proxy.shutdown_grace", &raw.shutdown_grace);
    let max_header_list_size = size_in(
        errs,
        "proxy.max_header_list_size",
        &raw.max_header_list_size,
    );
    Some(Proxy {
        forwarded: forwarded?,
        via: raw.via,
        shutdown_grace: shutdown_grace?,
        max_header_list_size: max_header_list_size?,
    })
}

fn build_upstreams(raw: &RawConfig, io: &Io<'_>, errs: &mut Errors) -> Option<Vec<Upstream>> {
    if raw.upstream.is_empty() {
        errs.push("upstream", "at least one upstream is required");
        return None;
    }
    // First place each backend id and each (host, path_prefix) was seen.
    let mut ids: HashMap<&str, String> = HashMap::new();
    let mut routes: HashMap<(Option<String>, String), &str> = HashMap::new();
    let mut upstreams = Vec::with_capacity(raw.upstream.len());
    let mut all_ok = true;
    for (name, up) in &raw.upstream {
        let path = format!("upstream.{name}");
        let built = build_upstream(name, up, &path, io, errs);
        for (i, b) in up.backends.iter().enumerate() {
            let here = format!("{path}.backends[{i}]");
            if let Some(first) = ids.get(b.id.as_str()) {
                errs.push(
                    format!("{here}.id"),
                    format!("duplicate backend id \"{}\" (first used at {first})", b.id),
                );
            } else {
                ids.insert(&b.id, here);
            }
        }
        match built {
            Some(u) => {
                let key = (u.route.host.clone(), u.route.path_prefix.clone());
                if let Some(other) = routes.get(&key) {
                    let host = match &u.route.host {
                        Some(h) => format!("host \"{h}\""),
                        None => "any host".to_owned(),
                    };
                    errs.push(
                        format!("{path}.route"),
                        format!(
                            "upstreams \"{other}\" and \"{name}\" both route {host} with \
                             path_prefix \"{}\"",
                            u.route.path_prefix
                        ),
                    );
                } else {
                    routes.insert(key, name);
                }
                upstreams.push(u);
            }
            None => all_ok = false,
        }
    }
    all_ok.then_some(upstreams)
}

fn build_upstream(
    name: &str,
    raw: &RawUpstream,
    path: &str,
    io: &Io<'_>,
    errs: &mut Errors,
) -> Option<Upstream> {
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
    if !name_ok {
        errs.push(
            path,
            format!("invalid upstream name \"{name}\" (use letters, digits, '_' and '-')"),
        );
    }
    let route = build_route(&raw.route, &format!("{path}.route"), errs);
    let load_balancing =
        build_load_balancing(&raw.load_balancing, &format!("{path}.load_balancing"), errs);
    let backends_path = format!("{path}.backends");
    if raw.backends.is_empty() {
        errs.push(&backends_path, "at least one backend is required");
    }
    let backends: Vec<Option<Backend>> = raw
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| build_backend(b, &format!("{backends_path}[{i}]"), io, errs))
        .collect();
    let timeouts = build_timeouts(&raw.timeouts, &format!("{path}.timeouts"), errs);
    let passive_health =
        build_passive_health(&raw.passive_health, &format!("{path}.passive_health"), errs);
    let max_request_body = match &raw.max_request_body {
        None => Some(None),
        Some(size) => size_in(errs, &format!("{path}.max_request_body"), size).map(Some),
    };
    if !name_ok || raw.backends.is_empty() {
        return None;
    }
    Some(Upstream {
        name: name.to_owned(),
        route: route?,
        load_balancing: load_balancing?,
        backends: backends.into_iter().collect::<Option<Vec<_>>>()?,
        timeouts: timeouts?,
        passive_health: passive_health?,
        fail_open: raw.fail_open,
        max_request_body: max_request_body?,
    })
}

fn build_route(raw: &RawRoute, path: &str, errs: &mut Errors) -> Option<Route> {
    let path_prefix = errs.check(
        &format!("{path}.path_prefix"),
        if raw.path_prefix.starts_with('/') {
            Ok(raw.path_prefix.clone())
        } else {
            Err(format!("must start with '/', got \"{}\"", raw.path_prefix))
        },
    );
    let host = match &raw.host {
        None => Some(None),
        Some(h) => errs.check(&format!("{path}.host"), route_host(h)).map(Some),
    };
    Some(Route {
        host: host?,
        path_prefix: path_prefix?,
    })
}

/// Lower-cases and checks a route host: an exact name (or IP literal) or `*.suffix`.
fn route_host(raw: &str) -> Result<String, String> {
    let host = raw.to_ascii_lowercase();
    if let Some(suffix) = host.strip_prefix("*.") {
        if is_dns_name(suffix) {
            return Ok(host);
        }
    } else if host.contains('*') {
        return Err(format!(
            "invalid host \"{raw}\" (a wildcard must be the whole first label, as in \
             \"*.example.com\")"
        ));
    } else if is_dns_name(&host)
        || host.parse::<IpAddr>().is_ok()
        || host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .is_some_and(|h| h.parse::<Ipv6Addr>().is_ok())
    {
        return Ok(host);
    }
    Err(format!(
        "invalid host \"{raw}\" (expected a name like \"example.com\" or \"*.example.com\")"
    ))
}

/// Dot-separated labels of 1..=63 letters, digits, `-` or `_`; 253 bytes at most.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        })
}

fn build_load_balancing(
    raw: &RawLoadBalancing,
    path: &str,
    errs: &mut Errors,
) -> Option<LoadBalancing> {
    const TYPES: [&str; 4] = ["random", "round-robin", "consistent-hash", "least-request"];
    let kind = errs.check(
        &format!("{path}.type"),
        one_of(&raw.kind, "load balancing type", &TYPES.map(|t| (t, t))),
    )?;
    if kind != "consistent-hash" {
        for (field, set) in [
            ("replicas", raw.replicas.is_some()),
            ("key", raw.key.is_some()),
        ] {
            if set {
                errs.push(
                    format!("{path}.{field}"),
                    "only applies to type consistent-hash",
                );
            }
        }
    }
    match kind {
        "random" => Some(LoadBalancing::Random),
        "round-robin" => Some(LoadBalancing::RoundRobin),
        "least-request" => Some(LoadBalancing::LeastRequest),
        _ => {
            let replicas = errs.check(
                &format!("{path}.replicas"),
                int_in(raw.replicas.unwrap_or(DEFAULT_REPLICAS), 1, 10_000),
            );
            let key = match &raw.key {
                None => Some(HashKey::ClientIp),
                Some(k) => errs.check(&format!("{path}.key"), hash_key(k)),
            };
            Some(LoadBalancing::ConsistentHash {
                replicas: replicas?,
                key: key?,
            })
        }
    }
}

fn hash_key(raw: &str) -> Result<HashKey, String> {
    let named = |name: &str| !name.is_empty() && name.bytes().all(is_token_char);
    match raw.split_once(':') {
        None if raw == "client-ip" => Ok(HashKey::ClientIp),
        None if raw == "path" => Ok(HashKey::Path),
        Some(("header", name)) if named(name) => Ok(HashKey::Header(name.to_ascii_lowercase())),
        Some(("cookie", name)) if named(name) => Ok(HashKey::Cookie(name.to_owned())),
        Some(("header" | "cookie", name)) => {
            Err(format!("invalid name \"{name}\" in hash key \"{raw}\""))
        }
        _ => Err(format!(
            "unknown hash key \"{raw}\" (allowed: client-ip, header:NAME, cookie:NAME, path)"
        )),
    }
}

/// RFC 9110 `tchar`: what header and cookie names are made of.
fn is_token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

fn build_backend(raw: &RawBackend, path: &str, io: &Io<'_>, errs: &mut Errors) -> Option<Backend> {
    let id_ok = (1..=64).contains(&raw.id.len())
        && raw
            .id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c));
    if !id_ok {
        errs.push(
            format!("{path}.id"),
            format!(
                "invalid backend id \"{}\" (1 to 64 letters, digits, '_', '.' and '-')",
                raw.id
            ),
        );
    }
    let address = errs.check(
        &format!("{path}.address"),
        resolve_address(io, &raw.address),
    );
    let weight = errs.check(&format!("{path}.weight"), int_in(raw.weight, 1, 10_000));
    let health_check = build_health_check(
        raw.health_check.as_ref(),
        &format!("{path}.health_check"),
        errs,
    );
    let tls = match &raw.tls {
        None => Some(None),
        Some(t) => build_backend_tls(t, &raw.address, &format!("{path}.tls"), io, errs).map(Some),
    };
    if !id_ok {
        return None;
    }
    Some(Backend {
        id: raw.id.clone(),
        address: address?,
        address_text: raw.address.clone(),
        weight: weight?,
        health_check: health_check?,
        tls: tls?,
    })
}

/// A socket address literal, or `host:port` resolved once (the first address wins).
fn resolve_address(io: &Io<'_>, text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return if addr.port() == 0 {
            Err(format!("port must not be 0 in \"{text}\""))
        } else {
            Ok(addr)
        };
    }
    let invalid = || format!("invalid socket address \"{text}\"");
    let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
    let port: u16 = port.parse().map_err(|_| invalid())?;
    if !is_dns_name(host) {
        return Err(invalid());
    }
    if port == 0 {
        return Err(format!("port must not be 0 in \"{text}\""));
    }
    io.env
        .resolve(host, port)
        .map_err(|e| format!("cannot resolve \"{text}\": {e}"))?
        .into_iter()
        .next()
        .ok_or_else(|| format!("\"{text}\" resolved to no address"))
}

/// The host part of a backend address: `[::1]:443` → `::1`, `api:443` → `api`.
fn host_part(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

fn build_backend_tls(
    raw: &RawBackendTls,
    address: &str,
    path: &str,
    io: &Io<'_>,
    errs: &mut Errors,
) -> Option<BackendTls> {
    let (server_name, origin) = match &raw.server_name {
        Some(n) => (n.as_str(), ""),
        None => (
            host_part(address),
            " (taken from address; set tls.server_name)",
        ),
    };
    let server_name = errs.check(
        &format!("{path}.server_name"),
        rustls::pki_types::ServerName::try_from(server_name)
            .map(|_| server_name.to_owned())
            .map_err(|_| format!("invalid server name \"{server_name}\"{origin}")),
    );
    let ca = match &raw.ca {
        None => Some(None),
        Some(ca) => errs
            .check(&format!("{path}.ca"), check_certs(io, ca))
            .map(Some),
    };
    Some(BackendTls {
        server_name: server_name?,
        ca: ca?,
        verify: raw.verify,
    })
}

fn build_health_check(
    raw: Option<&RawHealthCheck>,
    path: &str,
    errs: &mut Errors,
) -> Option<HealthCheck> {
    let (raw, enabled) = match raw {
        Some(r) => (r, r.enabled),
        None => (&RawHealthCheck::default(), false),
    };
    let check_path = errs.check(
        &format!("{path}.path"),
        if raw.path.starts_with('/') {
            Ok(raw.path.clone())
        } else {
            Err(format!("must start with '/', got \"{}\"", raw.path))
        },
    );
    let interval = positive_duration(errs, &format!("{path}.interval"), &raw.interval);
    let timeout = positive_duration(errs, &format!("{path}.timeout"), &raw.timeout);
    if let (Some(i), Some(t)) = (interval, timeout) {
        if t > i {
            errs.push(
                format!("{path}.timeout"),
                format!("must not exceed interval ({}), got {}", show(i), show(t)),
            );
        }
    }
    let healthy = errs.check(
        &format!("{path}.healthy_threshold"),
        int_in(raw.healthy_threshold, 1, 1000),
    );
    let unhealthy = errs.check(
        &format!("{path}.unhealthy_threshold"),
        int_in(raw.unhealthy_threshold, 1, 1000),
    );
    let expected = expected_status(
        &raw.expected_status,
        &format!("{path}.expected_status"),
        errs,
    );
    Some(HealthCheck {
        enabled,
        path: check_path?,
        interval: interval?,
        timeout: timeout?,
        healthy_threshold: healthy?,
        unhealthy_threshold: unhealthy?,
        expected_status: expected?,
    })
}

fn expected_status(
    raw: &[RawStatusRange],
    path: &str,
    errs: &mut Errors,
) -> Option<Vec<(u16, u16)>> {
    if raw.is_empty() {
        errs.push(path, "must list at least one status or [low, high] range");
        return None;
    }
    let ranges: Vec<Option<(u16, u16)>> = raw
        .iter()
        .enumerate()
        .map(|(i, r)| errs.check(&format!("{path}[{i}]"), status_range(r)))
        .collect();
    ranges.into_iter().collect()
}

fn status_range(raw: &RawStatusRange) -> Result<(u16, u16), String> {
    let (low, high) = match raw {
        RawStatusRange::Single(s) => (*s, *s),
        RawStatusRange::Pair(v) => match v.as_slice() {
            [low, high] => (*low, *high),
            _ => {
                return Err(format!(
                    "expected a status or a [low, high] pair, got {v:?}"
                ))
            }
        },
    };
    let status = |s: i64| u16::try_from(s).ok().filter(|s| (100..=599).contains(s));
    match (status(low), status(high)) {
        (Some(l), Some(h)) if l <= h => Ok((l, h)),
        (Some(_), Some(_)) => Err(format!("range [{low}, {high}] is reversed")),
        _ => Err(format!(
            "statuses must be between 100 and 599, got [{low}, {high}]"
        )),
    }
}

fn build_timeouts(raw: &RawTimeouts, path: &str, errs: &mut Errors) -> Option<UpstreamTimeouts> {
    let connect = positive_duration(errs, &format!("{path}.connect"), &raw.connect);
    let response_head =
        positive_duration(errs, &format!("{path}.response_head"), &raw.response_head);
    let idle = positive_duration(errs, &format!("{path}.idle"), &raw.idle);
    Some(UpstreamTimeouts {
        connect: connect?,
        response_head: response_head?,
        idle: idle?,
    })
}

fn build_passive_health(
    raw: &RawPassiveHealth,
    path: &str,
    errs: &mut Errors,
) -> Option<PassiveHealth> {
    let failures = errs.check(
        &format!("{path}.consecutive_failures"),
        int_in(raw.consecutive_failures, 1, 1000),
    );
    let cooldown = positive_duration(errs, &format!("{path}.cooldown"), &raw.cooldown);
    Some(PassiveHealth {
        consecutive_failures: failures?,
        cooldown: cooldown?,
    })
}

fn build_log(raw: &RawLog, errs: &mut Errors) -> Option<Log> {
    let level = errs.check(
        "log.level",
        if raw.level.trim().is_empty() {
            Err("must not be empty".to_owned())
        } else {
            tracing_subscriber::EnvFilter::try_new(&raw.level)
                .map(|_| raw.level.clone())
                .map_err(|e| format!("invalid log filter \"{}\": {e}", raw.level))
        },
    );
    let formats = [("text", LogFormat::Text), ("json", LogFormat::Json)];
    let format = errs.check("log.format", one_of(&raw.format, "log format", &formats));
    let access = errs.check(
        "log.access",
        match raw.access.as_str() {
            "off" => Ok(AccessLog::Off),
            "stdout" => Ok(AccessLog::Stdout),
            p if p.starts_with('/') => Ok(AccessLog::File(PathBuf::from(p))),
            other => Err(format!(
                "must be off, stdout or an absolute file path, got \"{other}\""
            )),
        },
    );
    Some(Log {
        level: level?,
        format: format?,
        access: access?,
    })
}

fn build_steering(raw: &RawSteering, errs: &mut Errors) -> Option<Steering> {
    let pin_path = errs.check(
        "steering.pin_path",
        if raw.pin_path.is_absolute() {
            Ok(raw.pin_path.clone())
        } else {
            Err(format!(
                "must be an absolute path, got \"{}\"",
                raw.pin_path.display()
            ))
        },
    );
    let modes = [
        ("auto", XdpMode::Auto),
        ("native", XdpMode::Native),
        ("generic", XdpMode::Generic),
    ];
    let xdp_mode = errs.check(
        "steering.xdp_mode",
        one_of(&raw.xdp_mode, "XDP mode", &modes),
    );
    let initial_rate = errs.check(
        "steering.initial_rate",
        int_in(raw.initial_rate, 0, 10_000_000),
    );
    let initial_burst = errs.check(
        "steering.initial_burst",
        int_in(raw.initial_burst, 1, 10_000_000),
    );
    Some(Steering {
        pin_path: pin_path?,
        xdp_mode: xdp_mode?,
        initial_rate: initial_rate?,
        initial_burst: initial_burst?,
    })
}

// ---- leaf checks: each returns the value or a message without the field path ----

/// The value named `text` among `choices`, or an error listing the allowed names.
fn one_of<T: Copy>(text: &str, what: &str, choices: &[(&str, T)]) -> Result<T, String> {
    choices
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let allowed: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
            format!(
                "unknown {what} \"{text}\" (allowed: {})",
                allowed.join(", ")
            )
        })
}

/// `value` as `T` when it lies in `min..=max`.
fn int_in<T: TryFrom<i64>>(value: i64, min: i64, max: i64) -> Result<T, String> {
    (min..=max)
        .contains(&value)
        .then(|| T::try_from(value).ok())
        .flatten()
        .ok_or_else(|| format!("must be between {min} and {max}, got {value}"))
}

fn duration(errs: &mut Errors, path: &str, raw: &RawDuration) -> Option<Duration> {
    errs.check(path, raw.to_duration())
}

fn positive_duration(errs: &mut Errors, path: &str, raw: &RawDuration) -> Option<Duration> {
    let d = duration(errs, path, raw)?;
    if d.is_zero() {
        errs.push(path, "must be greater than 0");
        return None;
    }
    Some(d)
}

/// A size in `1..=2^62-1` (the largest QUIC variable-length integer).
fn size_in(errs: &mut Errors, path: &str, raw: &RawSize) -> Option<u64> {
    const MAX: u64 = (1 << 62) - 1;
    let n = errs.check(path, raw.to_bytes())?;
    errs.check(
        path,
        if (1..=MAX).contains(&n) {
            Ok(n)
        } else {
            Err(format!("must be between 1 and {MAX} bytes, got {n}"))
        },
    )
}

/// A duration as people write it: `5s`, `250ms`, `1.5s`.
fn show(d: Duration) -> String {
    format!("{d:?}")
}

/// Reads a PEM file that must hold at least one certificate; returns its resolved path.
fn check_certs(io: &Io<'_>, written: &Path) -> Result<PathBuf, String> {
    let (path, bytes) = read_pem(io, written)?;
    let mut count = 0;
    for cert in rustls_pemfile::certs(&mut bytes.as_slice()) {
        cert.map_err(|e| format!("invalid PEM in \"{}\": {e}", written.display()))?;
        count += 1;
    }
    if count == 0 {
        return Err(format!("no PEM certificate in \"{}\"", written.display()));
    }
    Ok(path)
}

/// Reads a PEM file that must hold a private key; returns its resolved path.
fn check_key(io: &Io<'_>, written: &Path) -> Result<PathBuf, String> {
    let (path, bytes) = read_pem(io, written)?;
    match rustls_pemfile::private_key(&mut bytes.as_slice()) {
        Ok(Some(_)) => Ok(path),
        Ok(None) => Err(format!("no PEM private key in \"{}\"", written.display())),
        Err(e) => Err(format!("invalid PEM in \"{}\": {e}", written.display())),
    }
}

/// Messages name the path as written, so they read the same on every machine.
fn read_pem(io: &Io<'_>, written: &Path) -> Result<(PathBuf, Vec<u8>), String> {
    let path = io.base.join(written);
    let bytes = io
        .env
        .read(&path)
        .map_err(|e| format!("cannot read \"{}\": {e}", written.display()))?;
    Ok((path, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::sync::OnceLock;

    /// A directory with `cert.pem` + `key.pem` (self-signed, localhost) and `junk.pem`.
    fn tls_dir() -> &'static Path {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        DIR.get_or_init(|| {
            let dir =
                std::env::temp_dir().join(format!("spooky-config-unit-{}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            let pair = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
            fs::write(dir.join("cert.pem"), pair.cert.pem()).unwrap();
            fs::write(dir.join("key.pem"), pair.signing_key.serialize_pem()).unwrap();
            fs::write(dir.join("junk.pem"), "not a pem file\n").unwrap();
            dir
        })
    }

    const HEAD: &str = "version: 1\nlisten:\n  port: 9889\n  tls: {cert: cert.pem, key: key.pem}\n";
    const ONE_UPSTREAM: &str =
        "upstream:\n  api:\n    backends:\n      - {id: a1, address: \"127.0.0.1:7001\"}\n";

    fn parse_full(yaml: &str) -> Result<Config, ConfigError> {
        parse(yaml, tls_dir())
    }

    /// Parses `HEAD` + `rest`, which must be valid.
    fn ok(rest: &str) -> Config {
        match parse_full(&format!("{HEAD}{rest}")) {
            Ok(c) => c,
            Err(e) => panic!("expected a valid config, got:\n{e}"),
        }
    }

    /// Every problem of a full document, as `path: message` lines.
    fn problems_full(yaml: &str) -> Vec<String> {
        match parse_full(yaml) {
            Err(ConfigError::Invalid(list)) => list.iter().map(ToString::to_string).collect(),
            Err(other) => panic!("expected Invalid, got {other:?}"),
            Ok(_) => panic!("expected Invalid, got a valid config"),
        }
    }

    /// Every problem of `HEAD` + `rest`.
    fn problems(rest: &str) -> Vec<String> {
        problems_full(&format!("{HEAD}{rest}"))
    }

    /// One upstream `api` with one backend whose mapping body is `backend` (after `id: a1`).
    fn backend(backend: &str) -> String {
        format!("upstream:\n  api:\n    backends:\n      - id: a1\n{backend}")
    }

    /// One upstream `api` with `body` (indented 4) and one h2c backend.
    fn upstream(body: &str) -> String {
        format!("{ONE_UPSTREAM}{body}")
    }

    #[test]
    fn minimal_config_gets_every_default() {
        let c = ok(ONE_UPSTREAM);
        assert_eq!(c.version, 1);
        assert_eq!(c.listen.addr, "0.0.0.0:9889".parse().unwrap());
        assert_eq!(c.listen.tls.cert, tls_dir().join("cert.pem"));
        assert_eq!(c.listen.tls.key, tls_dir().join("key.pem"));
        assert_eq!(
            c.quic,
            Quic {
                idle_timeout: Duration::from_secs(30),
                handshake_timeout: Duration::from_secs(10),
                request_header_timeout: Duration::from_secs(10),
                max_concurrent_streams: 100,
                initial_max_data: 10 << 20,
                initial_max_stream_data: 1 << 20,
                max_connections: 100_000,
                max_connections_per_ip: 1000,
                retry: RetryMode::Auto {
                    new_connections_per_sec: 1000
                },
                cid_len: 16,
                server_id: vec![0, 1],
                generation: 0,
            }
        );
        assert_eq!(
            c.proxy,
            Proxy {
                forwarded: ForwardedMode::Append,
                via: true,
                shutdown_grace: Duration::from_secs(30),
                max_header_list_size: 64 << 10,
            }
        );
        assert_eq!(
            c.log,
            Log {
                level: "info".into(),
                format: LogFormat::Text,
                access: AccessLog::Off,
            }
        );
        assert_eq!(
            c.steering,
            Steering {
                pin_path: "/sys/fs/bpf/spooky".into(),
                xdp_mode: XdpMode::Auto,
                initial_rate: 2000,
                initial_burst: 4000,
            }
        );
        assert_eq!(c.workers, None);
        let up = c.upstream("api").unwrap();
        assert_eq!(
            up.route,
            Route {
                host: None,
                path_prefix: "/".into()
            }
        );
        assert_eq!(up.load_balancing, LoadBalancing::RoundRobin);
        assert_eq!(
            up.timeouts,
            UpstreamTimeouts {
                connect: Duration::from_secs(2),
                response_head: Duration::from_secs(30),
                idle: Duration::from_secs(60),
            }
        );
        assert_eq!(
            up.passive_health,
            PassiveHealth {
                consecutive_failures: 5,
                cooldown: Duration::from_secs(30)
            }
        );
        assert!(!up.fail_open);
        let b = &up.backends[0];
        assert_eq!(b.id, "a1");
        assert_eq!(b.address, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(b.address_text, "127.0.0.1:7001");
        assert_eq!(b.weight, 1);
        assert_eq!(b.tls, None);
        assert_eq!(
            b.health_check,
            HealthCheck {
                enabled: false,
                path: "/health".into(),
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(1),
                healthy_threshold: 2,
                unhealthy_threshold: 3,
                expected_status: vec![(200, 399)],
            }
        );
    }

    #[test]
    fn every_field_is_read() {
        let c = parse_full(
            r#"
version: 1
listen:
  protocol: http3
  address: "::1"
  port: 443
  tls: {cert: cert.pem, key: key.pem}
quic:
  idle_timeout: 45s
  handshake_timeout: 2500
  request_header_timeout: 3s
  max_concurrent_streams: 50
  initial_max_data: 20MiB
  initial_max_stream_data: 65536
  max_connections: 10
  retry: always
  cid_len: 20
  server_id: "0x0a0b0c"
  generation: 6
proxy:
  forwarded: replace
  via: false
  shutdown_grace: 1m
  max_header_list_size: 32KiB
upstream:
  web:
    load_balancing: {type: consistent-hash, replicas: 40, key: "header:X-User"}
    route: {host: "*.Example.COM", path_prefix: /app}
    timeouts: {connect: 100ms, response_head: 1h, idle: 90s}
    passive_health: {consecutive_failures: 2, cooldown: 10s}
    fail_open: true
    backends:
      - id: w1
        address: "[::1]:8443"
        weight: 10000
        health_check:
          path: /ready
          interval: 2s
          timeout: 2s
          healthy_threshold: 1
          unhealthy_threshold: 4
          expected_status: [204, [200, 202]]
        tls: {server_name: web.internal, ca: cert.pem, verify: false}
  api:
    load_balancing: {type: least-request}
    backends: [{id: a1, address: "localhost:7001", tls: {}}]
log: {level: "spooky=debug,info", format: json}
steering: {pin_path: /sys/fs/bpf/other, xdp_mode: generic}
workers: 4
"#,
        )
        .unwrap();
        assert_eq!(c.listen.addr, "[::1]:443".parse().unwrap());
        assert_eq!(c.quic.idle_timeout, Duration::from_secs(45));
        assert_eq!(c.quic.handshake_timeout, Duration::from_millis(2500));
        assert_eq!(c.quic.request_header_timeout, Duration::from_secs(3));
        assert_eq!(c.quic.max_concurrent_streams, 50);
        assert_eq!(c.quic.initial_max_data, 20 << 20);
        assert_eq!(c.quic.initial_max_stream_data, 65536);
        assert_eq!(c.quic.max_connections, 10);
        assert_eq!(c.quic.retry, RetryMode::Always);
        assert_eq!((c.quic.cid_len, c.quic.generation), (20, 6));
        assert_eq!(c.quic.server_id, vec![0x0a, 0x0b, 0x0c]);
        assert_eq!(
            c.proxy,
            Proxy {
                forwarded: ForwardedMode::Replace,
                via: false,
                shutdown_grace: Duration::from_secs(60),
                max_header_list_size: 32 << 10,
            }
        );
        // Sorted by name.
        let names: Vec<&str> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["api", "web"]);
        let web = c.upstream("web").unwrap();
        assert_eq!(
            web.load_balancing,
            LoadBalancing::ConsistentHash {
                replicas: 40,
                key: HashKey::Header("x-user".into())
            }
        );
        assert_eq!(
            web.route,
            Route {
                host: Some("*.example.com".into()),
                path_prefix: "/app".into()
            }
        );
        assert_eq!(web.timeouts.connect, Duration::from_millis(100));
        assert_eq!(web.timeouts.response_head, Duration::from_secs(3600));
        assert_eq!(web.timeouts.idle, Duration::from_secs(90));
        assert_eq!(web.passive_health.consecutive_failures, 2);
        assert_eq!(web.passive_health.cooldown, Duration::from_secs(10));
        assert!(web.fail_open);
        let w1 = &web.backends[0];
        assert_eq!(w1.address, "[::1]:8443".parse().unwrap());
        assert_eq!(w1.weight, 10000);
        assert_eq!(
            w1.health_check,
            HealthCheck {
                enabled: true,
                path: "/ready".into(),
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(2),
                healthy_threshold: 1,
                unhealthy_threshold: 4,
                expected_status: vec![(204, 204), (200, 202)],
            }
        );
        assert_eq!(
            w1.tls,
            Some(BackendTls {
                server_name: "web.internal".into(),
                ca: Some(tls_dir().join("cert.pem")),
                verify: false,
            })
        );
        let api = c.upstream("api").unwrap();
        assert_eq!(api.load_balancing, LoadBalancing::LeastRequest);
        let a1 = &api.backends[0];
        assert!(a1.address.ip().is_loopback(), "{:?}", a1.address);
        assert_eq!(a1.address.port(), 7001);
        assert_eq!(a1.address_text, "localhost:7001");
        assert_eq!(
            a1.tls,
            Some(BackendTls {
                server_name: "localhost".into(),
                ca: None,
                verify: true
            })
        );
        assert_eq!(
            c.log,
            Log {
                level: "spooky=debug,info".into(),
                format: LogFormat::Json,
                access: AccessLog::Off,
            }
        );
        assert_eq!(
            c.steering,
            Steering {
                pin_path: "/sys/fs/bpf/other".into(),
                xdp_mode: XdpMode::Generic,
                initial_rate: 2000,
                initial_burst: 4000,
            }
        );
        assert_eq!(c.workers, Some(4));
    }

    #[test]
    fn version_must_be_1() {
        let yaml = format!("{HEAD}{ONE_UPSTREAM}").replace("version: 1", "version: 2");
        assert_eq!(
            problems_full(&yaml),
            ["version: unsupported version 2 (only 1 exists)"]
        );
    }

    #[test]
    fn listen_rules() {
        let listen = |body: &str| {
            problems_full(&format!(
                "version: 1\nlisten:\n  tls: {{cert: cert.pem, key: key.pem}}\n{body}{ONE_UPSTREAM}"
            ))
        };
        assert_eq!(
            listen("  port: 1\n  protocol: http2\n"),
            ["listen.protocol: unknown protocol \"http2\" (allowed: http3)"]
        );
        assert_eq!(
            listen("  port: 0\n"),
            ["listen.port: must be between 1 and 65535, got 0"]
        );
        assert_eq!(
            listen("  port: 65536\n"),
            ["listen.port: must be between 1 and 65535, got 65536"]
        );
        assert_eq!(
            listen("  port: 1\n  address: localhost\n"),
            ["listen.address: invalid IP address \"localhost\""]
        );
    }

    #[test]
    fn listen_tls_files_must_be_readable_pem() {
        let tls = |cert: &str, key: &str| {
            problems_full(&format!(
                "version: 1\nlisten:\n  port: 1\n  tls: {{cert: {cert}, key: {key}}}\n{ONE_UPSTREAM}"
            ))
        };
        assert_eq!(
            tls("missing.pem", "key.pem"),
            [
                "listen.tls.cert: cannot read \"missing.pem\": No such file or directory (os error 2)"
            ]
        );
        assert_eq!(
            tls("junk.pem", "key.pem"),
            ["listen.tls.cert: no PEM certificate in \"junk.pem\""]
        );
        assert_eq!(
            tls("key.pem", "cert.pem"),
            [
                "listen.tls.cert: no PEM certificate in \"key.pem\"",
                "listen.tls.key: no PEM private key in \"cert.pem\"",
            ]
        );
        let abs = tls_dir().join("cert.pem");
        let c = parse_full(&format!(
            "version: 1\nlisten:\n  port: 1\n  tls: {{cert: {}, key: key.pem}}\n{ONE_UPSTREAM}",
            abs.display()
        ))
        .unwrap();
        assert_eq!(c.listen.tls.cert, abs);
    }

    #[test]
    fn upstreams_are_required() {
        assert_eq!(
            problems(""),
            ["upstream: at least one upstream is required"]
        );
        assert_eq!(
            problems("upstream: {}\n"),
            ["upstream: at least one upstream is required"]
        );
    }

    #[test]
    fn upstream_names_are_restricted() {
        let yaml = ONE_UPSTREAM.replace("api:", "\"a.b c\":");
        assert_eq!(
            problems(&yaml),
            ["upstream.a.b c: invalid upstream name \"a.b c\" (use letters, digits, '_' and '-')"]
        );
        let yaml = ONE_UPSTREAM.replace("api:", "\"\":");
        assert_eq!(
            problems(&yaml),
            ["upstream.: invalid upstream name \"\" (use letters, digits, '_' and '-')"]
        );
        ok(&ONE_UPSTREAM.replace("api:", "Api_2-x:"));
    }

    #[test]
    fn pools_need_backends() {
        assert_eq!(
            problems("upstream:\n  api:\n    backends: []\n"),
            ["upstream.api.backends: at least one backend is required"]
        );
        assert_eq!(
            problems("upstream:\n  api: {}\n"),
            ["upstream.api.backends: at least one backend is required"]
        );
    }

    #[test]
    fn backend_ids_are_unique_across_the_config() {
        let yaml = "upstream:
  one:
    route: {path_prefix: /one}
    backends:
      - {id: x, address: \"127.0.0.1:1\"}
      - {id: x, address: \"127.0.0.1:2\"}
  two:
    backends:
      - {id: x, address: \"127.0.0.1:3\"}
";
        assert_eq!(
            problems(yaml),
            [
                "upstream.one.backends[1].id: duplicate backend id \"x\" (first used at upstream.one.backends[0])",
                "upstream.two.backends[0].id: duplicate backend id \"x\" (first used at upstream.one.backends[0])",
            ]
        );
    }

    #[test]
    fn backend_ids_are_restricted() {
        assert_eq!(
            problems(&ONE_UPSTREAM.replace("id: a1", "id: \"a 1\"")),
            ["upstream.api.backends[0].id: invalid backend id \"a 1\" (1 to 64 letters, digits, '_', '.' and '-')"]
        );
        let long = "a".repeat(65);
        assert_eq!(
            problems(&ONE_UPSTREAM.replace("id: a1", &format!("id: {long}"))).len(),
            1
        );
    }

    #[test]
    fn weight_is_1_to_10000() {
        for (w, want) in [
            (
                0,
                "upstream.api.backends[0].weight: must be between 1 and 10000, got 0",
            ),
            (
                10001,
                "upstream.api.backends[0].weight: must be between 1 and 10000, got 10001",
            ),
            (
                -3,
                "upstream.api.backends[0].weight: must be between 1 and 10000, got -3",
            ),
        ] {
            assert_eq!(
                problems(&backend(&format!(
                    "        address: \"127.0.0.1:1\"\n        weight: {w}\n"
                ))),
                [want]
            );
        }
    }

    #[test]
    fn backend_addresses_must_be_socket_addresses() {
        let addr = |a: &str| problems(&backend(&format!("        address: \"{a}\"\n")));
        assert_eq!(
            addr("x:y"),
            ["upstream.api.backends[0].address: invalid socket address \"x:y\""]
        );
        assert_eq!(
            addr("10.0.0.1"),
            ["upstream.api.backends[0].address: invalid socket address \"10.0.0.1\""]
        );
        assert_eq!(
            addr("bad host:80"),
            ["upstream.api.backends[0].address: invalid socket address \"bad host:80\""]
        );
        assert_eq!(
            addr("10.0.0.1:0"),
            ["upstream.api.backends[0].address: port must not be 0 in \"10.0.0.1:0\""]
        );
        assert_eq!(
            addr("localhost:0"),
            ["upstream.api.backends[0].address: port must not be 0 in \"localhost:0\""]
        );
    }

    #[test]
    fn unresolvable_backend_host_names_the_field() {
        let got = problems(&backend("        address: \"no-such-host.invalid:80\"\n"));
        assert_eq!(got.len(), 1);
        assert!(
            got[0].starts_with(
                "upstream.api.backends[0].address: cannot resolve \"no-such-host.invalid:80\": "
            ),
            "{got:?}"
        );
    }

    #[test]
    fn unknown_lb_type_lists_the_allowed_ones() {
        assert_eq!(
            problems(&upstream("    load_balancing: {type: fastest}\n")),
            ["upstream.api.load_balancing.type: unknown load balancing type \"fastest\" (allowed: random, round-robin, consistent-hash, least-request)"]
        );
        for (name, want) in [
            ("random", LoadBalancing::Random),
            ("round-robin", LoadBalancing::RoundRobin),
            ("least-request", LoadBalancing::LeastRequest),
        ] {
            let c = ok(&upstream(&format!(
                "    load_balancing: {{type: {name}}}\n"
            )));
            assert_eq!(c.upstreams[0].load_balancing, want);
        }
    }

    #[test]
    fn consistent_hash_defaults_and_keys() {
        let lb = |body: &str| {
            ok(&upstream(&format!(
                "    load_balancing: {{type: consistent-hash{body}}}\n"
            )))
            .upstreams[0]
                .load_balancing
                .clone()
        };
        assert_eq!(
            lb(""),
            LoadBalancing::ConsistentHash {
                replicas: 160,
                key: HashKey::ClientIp
            }
        );
        let key = |k: &str| match lb(&format!(", key: \"{k}\"")) {
            LoadBalancing::ConsistentHash { key, .. } => key,
            other => panic!("{other:?}"),
        };
        assert_eq!(key("client-ip"), HashKey::ClientIp);
        assert_eq!(key("path"), HashKey::Path);
        assert_eq!(key("header:X-Tenant"), HashKey::Header("x-tenant".into()));
        assert_eq!(key("cookie:Session"), HashKey::Cookie("Session".into()));
        assert_eq!(
            lb(", replicas: 1"),
            LoadBalancing::ConsistentHash {
                replicas: 1,
                key: HashKey::ClientIp
            }
        );
    }

    #[test]
    fn consistent_hash_rules() {
        let lb = |body: &str| problems(&upstream(&format!("    load_balancing: {{{body}}}\n")));
        assert_eq!(
            lb("type: consistent-hash, replicas: 0"),
            ["upstream.api.load_balancing.replicas: must be between 1 and 10000, got 0"]
        );
        assert_eq!(
            lb("type: consistent-hash, replicas: 10001"),
            ["upstream.api.load_balancing.replicas: must be between 1 and 10000, got 10001"]
        );
        assert_eq!(
            lb("type: consistent-hash, key: ip"),
            ["upstream.api.load_balancing.key: unknown hash key \"ip\" (allowed: client-ip, header:NAME, cookie:NAME, path)"]
        );
        assert_eq!(
            lb("type: consistent-hash, key: \"header:\""),
            ["upstream.api.load_balancing.key: invalid name \"\" in hash key \"header:\""]
        );
        assert_eq!(
            lb("type: consistent-hash, key: \"cookie:a b\""),
            ["upstream.api.load_balancing.key: invalid name \"a b\" in hash key \"cookie:a b\""]
        );
        assert_eq!(
            lb("type: random, replicas: 3, key: path"),
            [
                "upstream.api.load_balancing.replicas: only applies to type consistent-hash",
                "upstream.api.load_balancing.key: only applies to type consistent-hash",
            ]
        );
    }

    #[test]
    fn route_path_prefix_starts_with_slash() {
        assert_eq!(
            problems(&upstream("    route: {path_prefix: api}\n")),
            ["upstream.api.route.path_prefix: must start with '/', got \"api\""]
        );
        assert_eq!(
            problems(&upstream("    route: {path_prefix: \"\"}\n")),
            ["upstream.api.route.path_prefix: must start with '/', got \"\""]
        );
    }

    #[test]
    fn route_hosts_are_lowercased_exact_or_wildcard() {
        let host = |h: &str| {
            ok(&upstream(&format!("    route: {{host: \"{h}\"}}\n"))).upstreams[0]
                .route
                .host
                .clone()
        };
        assert_eq!(host("API.Example.com"), Some("api.example.com".into()));
        assert_eq!(host("*.Example.com"), Some("*.example.com".into()));
        assert_eq!(host("10.0.0.1"), Some("10.0.0.1".into()));
        assert_eq!(host("[::1]"), Some("[::1]".into()));
        let bad = |h: &str| problems(&upstream(&format!("    route: {{host: \"{h}\"}}\n")));
        for h in [
            "a.*.com",
            "*",
            "*example.com",
            "api*.example.com",
            "*.*.example.com",
        ] {
            assert_eq!(bad(h).len(), 1, "{h}");
        }
        assert_eq!(
            bad("a.*.com"),
            ["upstream.api.route.host: invalid host \"a.*.com\" (a wildcard must be the whole first label, as in \"*.example.com\")"]
        );
        assert_eq!(
            bad("*.*.com"),
            ["upstream.api.route.host: invalid host \"*.*.com\" (expected a name like \"example.com\" or \"*.example.com\")"]
        );
        assert_eq!(
            bad("example.com:443"),
            ["upstream.api.route.host: invalid host \"example.com:443\" (expected a name like \"example.com\" or \"*.example.com\")"]
        );
        assert_eq!(
            bad(""),
            ["upstream.api.route.host: invalid host \"\" (expected a name like \"example.com\" or \"*.example.com\")"]
        );
    }

    #[test]
    fn identical_routes_name_both_pools() {
        let yaml = "upstream:
  a:
    route: {host: Example.com, path_prefix: /x}
    backends: [{id: a1, address: \"127.0.0.1:1\"}]
  b:
    route: {host: example.com, path_prefix: /x}
    backends: [{id: b1, address: \"127.0.0.1:2\"}]
  c:
    backends: [{id: c1, address: \"127.0.0.1:3\"}]
  d:
    route: {path_prefix: /}
    backends: [{id: d1, address: \"127.0.0.1:4\"}]
  e:
    route: {host: example.com, path_prefix: /x/}
    backends: [{id: e1, address: \"127.0.0.1:5\"}]
";
        assert_eq!(
            problems(yaml),
            [
                "upstream.b.route: upstreams \"a\" and \"b\" both route host \"example.com\" with path_prefix \"/x\"",
                "upstream.d.route: upstreams \"c\" and \"d\" both route any host with path_prefix \"/\"",
            ]
        );
    }

    #[test]
    fn health_check_rules() {
        let hc = |body: &str| {
            problems(&backend(&format!(
                "        address: \"127.0.0.1:1\"\n        health_check: {{{body}}}\n"
            )))
        };
        let p = "upstream.api.backends[0].health_check";
        assert_eq!(
            hc("interval: 0"),
            [format!("{p}.interval: must be greater than 0")]
        );
        assert_eq!(
            hc("timeout: 0s"),
            [format!("{p}.timeout: must be greater than 0")]
        );
        assert_eq!(
            hc("interval: 1s, timeout: 1500ms"),
            [format!(
                "{p}.timeout: must not exceed interval (1s), got 1.5s"
            )]
        );
        assert_eq!(
            hc("healthy_threshold: 0, unhealthy_threshold: 0"),
            [
                format!("{p}.healthy_threshold: must be between 1 and 1000, got 0"),
                format!("{p}.unhealthy_threshold: must be between 1 and 1000, got 0"),
            ]
        );
        assert_eq!(
            hc("path: health"),
            [format!("{p}.path: must start with '/', got \"health\"")]
        );
        assert_eq!(
            hc("expected_status: []"),
            [format!(
                "{p}.expected_status: must list at least one status or [low, high] range"
            )]
        );
        assert_eq!(
            hc("expected_status: [[200, 600], 99, [300, 200], [1, 2, 3]]"),
            [
                format!("{p}.expected_status[0]: statuses must be between 100 and 599, got [200, 600]"),
                format!("{p}.expected_status[1]: statuses must be between 100 and 599, got [99, 99]"),
                format!("{p}.expected_status[2]: range [300, 200] is reversed"),
                format!("{p}.expected_status[3]: expected a status or a [low, high] pair, got [1, 2, 3]"),
            ]
        );
        assert_eq!(
            hc("interval: soon"),
            [format!("{p}.interval: invalid duration \"soon\" (use milliseconds as an integer, or an integer with a unit: ms, s, m, h, e.g. \"250ms\", \"5s\")")]
        );
        // Present without `enabled` means enabled.
        let c = ok(&backend(
            "        address: \"127.0.0.1:1\"\n        health_check: {}\n",
        ));
        assert!(c.upstreams[0].backends[0].health_check.enabled);
        let c = ok(&backend(
            "        address: \"127.0.0.1:1\"\n        health_check: {enabled: false}\n",
        ));
        assert!(!c.upstreams[0].backends[0].health_check.enabled);
    }

    #[test]
    fn quic_rules() {
        let quic = |body: &str| problems(&format!("quic: {{{body}}}\n{ONE_UPSTREAM}"));
        assert_eq!(
            quic("idle_timeout: 0, handshake_timeout: -5, request_header_timeout: 0ms"),
            [
                "quic.idle_timeout: must be greater than 0",
                "quic.handshake_timeout: must not be negative, got -5",
                "quic.request_header_timeout: must be greater than 0",
            ]
        );
        assert_eq!(
            quic("max_concurrent_streams: 0, max_connections: 0"),
            [
                "quic.max_concurrent_streams: must be between 1 and 1152921504606846976, got 0",
                "quic.max_connections: must be between 1 and 100000000, got 0",
            ]
        );
        assert_eq!(
            quic("initial_max_data: 0, initial_max_stream_data: 1PiB"),
            [
                "quic.initial_max_data: must be between 1 and 4611686018427387903 bytes, got 0",
                "quic.initial_max_stream_data: invalid size \"1PiB\" (use bytes as an integer, or an integer with a unit: B, KB, KiB, MB, MiB, GB, GiB, e.g. \"64KiB\")",
            ]
        );
        assert_eq!(
            quic("retry: sometimes"),
            ["quic.retry: unknown retry mode \"sometimes\" (allowed: off, always, auto)"]
        );
        assert_eq!(
            quic("retry: off, retry_threshold: 5"),
            ["quic.retry_threshold: only applies when retry is auto"]
        );
        assert_eq!(
            quic("retry_threshold: 0"),
            ["quic.retry_threshold: must be between 1 and 100000000, got 0"]
        );
        let retry = |body: &str| ok(&format!("quic: {{{body}}}\n{ONE_UPSTREAM}")).quic.retry;
        assert_eq!(retry("retry: off"), RetryMode::Off);
        assert_eq!(retry("retry: always"), RetryMode::Always);
        assert_eq!(
            retry("retry: auto, retry_threshold: 7"),
            RetryMode::Auto {
                new_connections_per_sec: 7
            }
        );
    }

    #[test]
    fn connection_id_layout_rules() {
        let quic = |body: &str| problems(&format!("quic: {{{body}}}\n{ONE_UPSTREAM}"));
        let sid = |v: &str| {
            ok(&format!("quic: {{server_id: {v}}}\n{ONE_UPSTREAM}"))
                .quic
                .server_id
        };
        assert_eq!(sid("258"), vec![1, 2]);
        assert_eq!(sid("0"), vec![0, 0]);
        assert_eq!(sid("\"0x01\""), vec![1]);
        assert_eq!(sid("\"0XdeadBEEF\""), vec![0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(
            quic("cid_len: 6"),
            ["quic.cid_len: must be between 7 and 20, got 6"]
        );
        assert_eq!(
            quic("cid_len: 21"),
            ["quic.cid_len: must be between 7 and 20, got 21"]
        );
        assert_eq!(
            quic("cid_len: 300"),
            ["quic.cid_len: must be between 0 and 255, got 300"]
        );
        assert_eq!(
            quic("generation: 7"),
            ["quic.generation: must be between 0 and 6, got 7"]
        );
        assert_eq!(
            quic("cid_len: 7"),
            ["quic.server_id: a server id of 2 bytes does not fit: it must be 1..=8 bytes and leave 4 nonce bytes in a 7-byte connection ID"]
        );
        assert_eq!(
            quic("server_id: \"0x010203040506070809\""),
            ["quic.server_id: a server id of 9 bytes does not fit: it must be 1..=8 bytes and leave 4 nonce bytes in a 16-byte connection ID"]
        );
        assert_eq!(
            quic("server_id: \"0x0102030405060708090a\", generation: 7"),
            [
                "quic.generation: must be between 0 and 6, got 7",
                "quic.server_id: a server id of 10 bytes does not fit: it must be 1..=8 bytes and leave 4 nonce bytes in a 16-byte connection ID",
            ]
        );
        for bad in ["\"0x123\"", "\"0x\"", "\"1234\"", "\"0xzz\""] {
            let text = bad.trim_matches('"');
            assert_eq!(
                quic(&format!("server_id: {bad}")),
                [format!("quic.server_id: invalid server id \"{text}\" (expected hex text like \"0x0001\")")]
            );
        }
        assert_eq!(
            quic("server_id: 65536"),
            ["quic.server_id: integer server id must be between 0 and 65535, got 65536 (write longer ids as hex text like \"0x00010203\")"]
        );
    }

    #[test]
    fn proxy_rules() {
        let proxy = |body: &str| problems(&format!("proxy: {{{body}}}\n{ONE_UPSTREAM}"));
        assert_eq!(
            proxy("forwarded: sometimes"),
            ["proxy.forwarded: unknown forwarded mode \"sometimes\" (allowed: append, replace, off)"]
        );
        assert_eq!(
            proxy("max_header_list_size: 0, shutdown_grace: -1"),
            [
                "proxy.shutdown_grace: must not be negative, got -1",
                "proxy.max_header_list_size: must be between 1 and 4611686018427387903 bytes, got 0",
            ]
        );
        let c = ok(&format!(
            "proxy: {{forwarded: \"off\", shutdown_grace: 0}}\n{ONE_UPSTREAM}"
        ));
        assert_eq!(c.proxy.forwarded, ForwardedMode::Off);
        assert_eq!(c.proxy.shutdown_grace, Duration::ZERO);
    }

    #[test]
    fn upstream_timeouts_and_passive_health_rules() {
        assert_eq!(
            problems(&upstream(
                "    timeouts: {connect: 0, response_head: 0ms, idle: 0s}\n    passive_health: {consecutive_failures: 0, cooldown: 0}\n"
            )),
            [
                "upstream.api.timeouts.connect: must be greater than 0",
                "upstream.api.timeouts.response_head: must be greater than 0",
                "upstream.api.timeouts.idle: must be greater than 0",
                "upstream.api.passive_health.consecutive_failures: must be between 1 and 1000, got 0",
                "upstream.api.passive_health.cooldown: must be greater than 0",
            ]
        );
    }

    #[test]
    fn backend_tls_rules() {
        let tls = |address: &str, body: &str| {
            format!("        address: \"{address}\"\n        tls: {{{body}}}\n")
        };
        let c = ok(&backend(&tls("127.0.0.1:8443", "verify: false")));
        assert_eq!(
            c.upstreams[0].backends[0].tls,
            Some(BackendTls {
                server_name: "127.0.0.1".into(),
                ca: None,
                verify: false
            })
        );
        let c = ok(&backend(&tls("[::1]:8443", "")));
        assert_eq!(
            c.upstreams[0].backends[0].tls.as_ref().unwrap().server_name,
            "::1"
        );
        let p = "upstream.api.backends[0].tls";
        assert_eq!(
            problems(&backend(&tls(
                "127.0.0.1:8443",
                "server_name: \"bad name\""
            ))),
            [format!("{p}.server_name: invalid server name \"bad name\"")]
        );
        assert_eq!(
            problems(&backend(&tls("x y:1", ""))),
            [
                "upstream.api.backends[0].address: invalid socket address \"x y:1\"".to_owned(),
                format!("{p}.server_name: invalid server name \"x y\" (taken from address; set tls.server_name)"),
            ]
        );
        assert_eq!(
            problems(&backend(&tls("127.0.0.1:8443", "ca: junk.pem"))),
            [format!("{p}.ca: no PEM certificate in \"junk.pem\"")]
        );
        assert_eq!(
            problems(&backend(&tls("127.0.0.1:8443", "ca: nope.pem"))),
            [format!(
                "{p}.ca: cannot read \"nope.pem\": No such file or directory (os error 2)"
            )]
        );
    }

    #[test]
    fn log_rules() {
        let log = |body: &str| problems(&format!("log: {{{body}}}\n{ONE_UPSTREAM}"));
        assert_eq!(log("level: \"\""), ["log.level: must not be empty"]);
        let got = log("level: \"spooky=loud\"");
        assert_eq!(got.len(), 1);
        assert!(
            got[0].starts_with("log.level: invalid log filter \"spooky=loud\": "),
            "{got:?}"
        );
        assert_eq!(
            log("format: xml"),
            ["log.format: unknown log format \"xml\" (allowed: text, json)"]
        );
        ok(&format!(
            "log: {{level: \"warn,spooky::worker=trace\"}}\n{ONE_UPSTREAM}"
        ));
    }

    #[test]
    fn steering_and_workers_rules() {
        assert_eq!(
            problems(&format!(
                "steering: {{pin_path: bpf/spooky, xdp_mode: fast}}\n{ONE_UPSTREAM}"
            )),
            [
                "steering.pin_path: must be an absolute path, got \"bpf/spooky\"",
                "steering.xdp_mode: unknown XDP mode \"fast\" (allowed: auto, native, generic)",
            ]
        );
        assert_eq!(
            problems(&format!("workers: 0\n{ONE_UPSTREAM}")),
            ["workers: must be between 1 and 4096, got 0"]
        );
        let c = ok(&format!("steering: {{xdp_mode: native}}\n{ONE_UPSTREAM}"));
        assert_eq!(c.steering.xdp_mode, XdpMode::Native);
    }

    #[test]
    fn a_second_yaml_document_is_named() {
        let yaml = format!("{HEAD}{ONE_UPSTREAM}---\n");
        let err = parse(&yaml, Path::new("/")).unwrap_err().to_string();
        assert!(
            err.contains("(file): holds more than one YAML document"),
            "{err}"
        );
    }

    #[test]
    fn several_problems_are_reported_together() {
        let yaml = "version: 3
listen:
  port: 0
  address: nowhere
  tls: {cert: missing.pem, key: key.pem}
quic: {generation: 7}
upstream:
  api:
    load_balancing: {type: fastest}
    backends:
      - {id: a1, address: \"127.0.0.1:1\", weight: 0}
      - {id: a2, address: \"x:y\"}
log: {format: xml}
";
        let err = parse_full(yaml).unwrap_err();
        assert_eq!(err.exit_code(), 1);
        assert_eq!(
            err.to_string(),
            "invalid configuration (9 problems):
  version: unsupported version 3 (only 1 exists)
  listen.port: must be between 1 and 65535, got 0
  listen.address: invalid IP address \"nowhere\"
  listen.tls.cert: cannot read \"missing.pem\": No such file or directory (os error 2)
  quic.generation: must be between 0 and 6, got 7
  upstream.api.load_balancing.type: unknown load balancing type \"fastest\" (allowed: random, round-robin, consistent-hash, least-request)
  upstream.api.backends[0].weight: must be between 1 and 10000, got 0
  upstream.api.backends[1].address: invalid socket address \"x:y\"
  log.format: unknown log format \"xml\" (allowed: text, json)"
        );
    }

    #[test]
    fn one_problem_reads_singular() {
        let err = parse_full(&format!("{HEAD}{ONE_UPSTREAM}workers: 0\n")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration (1 problem):\n  workers: must be between 1 and 4096, got 0"
        );
    }

    #[test]
    fn shape_errors_come_from_serde_with_path_and_line() {
        let err = parse_full(&format!("{HEAD}{ONE_UPSTREAM}      weight: 2\n")).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax(_)), "{err:?}");
        let yaml = format!(
            "{HEAD}{}",
            ONE_UPSTREAM.replace("id: a1", "id: a1, wieght: 2")
        );
        let err = parse_full(&yaml).unwrap_err();
        assert_eq!(err.exit_code(), 1);
        assert_eq!(
            err.to_string(),
            "upstream.api.backends[0]: unknown field `wieght`, expected one of `id`, `address`, `weight`, `health_check`, `tls` at line 8 column 18"
        );
        let err = parse_full("version: 1\n").unwrap_err();
        assert_eq!(err.to_string(), "missing field `listen`");
        let err = parse_full(&format!(
            "{HEAD}{ONE_UPSTREAM}quic: {{idle_timeout: [1]}}\n"
        ))
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("quic.idle_timeout: invalid type: sequence, expected a duration"),
            "{err}"
        );
    }

    #[test]
    fn load_resolves_relative_paths_against_the_file() {
        let dir = tls_dir();
        let file = dir.join("spooky.yaml");
        fs::write(&file, format!("{HEAD}{ONE_UPSTREAM}")).unwrap();
        let c = load(&file).unwrap();
        assert_eq!(c.listen.tls.cert, dir.join("cert.pem"));
        assert_eq!(Config::from_path(&file).unwrap(), c);
    }

    #[test]
    fn unreadable_file_exits_with_2() {
        let path = tls_dir().join("absent.yaml");
        let err = load(&path).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert_eq!(err.exit_code(), 2);
        assert_eq!(
            err.to_string(),
            format!(
                "cannot read configuration file {}: No such file or directory (os error 2)",
                path.display()
            )
        );
    }
}
