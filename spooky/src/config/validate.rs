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
    CidLayout, LayoutError, HOST_BYTES, MAX_CID_LEN, MAX_SERVER_ID_LEN, MIN_NONCE_LEN,
    UNROUTABLE_GENERATION,
};

use super::env::{Env, System};
use super::raw::{
    RawAcme, RawAdmin, RawBackend, RawBackendTls, RawConfig, RawConnectionIds, RawDuration,
    RawFleet, RawHeaderRules, RawHealthCheck, RawListen, RawListenTls, RawLoadBalancing, RawLog,
    RawPassiveHealth, RawProxy, RawQuic, RawRateLimit, RawRedirect, RawResolver, RawRoute,
    RawServerId, RawSize, RawStatusRange, RawSteering, RawTimeouts, RawUpstream, DEFAULT_REPLICAS,
    DEFAULT_RETRY_THRESHOLD,
};
use super::{
    Access, AccessField, AccessFormat, AccessLog, Acme, AcmeChallenge, Admin, AltSvc, Backend,
    BackendProtocol, BackendTls, CertPair, CidFormat, Cidr, Config, ControlSocket, EarlyData,
    Fleet, ForwardedMode, HashKey, HeaderRules, HealthCheck, Listen, ListenTls, LoadBalancing, Log,
    LogFormat, NamedBackend, PassiveHealth, PlainHttp, Proxy, Quic, QuicLbConfig, RateKey,
    RateLimit, Readiness, Redirect, Resolver, RetryMode, Route, Steering, Tcp, UnknownSni,
    Upstream, UpstreamTimeouts, User, XdpMode,
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
        Some(first) => serde::Deserialize::deserialize(first).map_err(shape_error)?,
        None => serde_yaml::from_str(yaml).map_err(shape_error)?,
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

/// A serde error; a key of an earlier Spooky version is reported with its replacement.
fn shape_error(e: serde_yaml::Error) -> ConfigError {
    match super::earlier::renamed_key(&e) {
        Some((path, message)) => ConfigError::Invalid(vec![FieldError { path, message }]),
        None => ConfigError::Syntax(e),
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
    let quic = build_quic(&raw.quic, io, errs);
    let proxy = build_proxy(&raw.proxy, io.env, errs);
    let upstreams = upstream::build_upstreams(raw, io, errs);
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
        Some(n) => errs.check("workers", int_in(n, 1, 255)).map(Some),
    };
    let acme = build_acme(&raw.acme, listen.as_ref(), io, errs);
    let resolver = build_resolver(&raw.resolver, errs);
    let fleet = match &raw.fleet {
        None => Some(None),
        Some(f) => build_fleet(f, quic.as_ref().map(|q| q.server_id.len()), errs).map(Some),
    };
    let control_socket = match raw.control_socket.as_deref() {
        None => Some(ControlSocket::At {
            path: PathBuf::from(super::DEFAULT_CONTROL_SOCKET),
            explicit: false,
        }),
        Some("off") => Some(ControlSocket::Off),
        Some("") => errs.check("control_socket", Err("empty (a path, or `off`)".to_owned())),
        Some(path) => Some(ControlSocket::At {
            path: io.base.join(path),
            explicit: true,
        }),
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
        control_socket: control_socket?,
        acme: acme?,
        resolver: resolver?,
        fleet: fleet?,
    })
}

/// `fleet`: the forwarding address, and members whose server ids have our server id's
/// length (`server_id_len`, when `quic` itself is valid).
fn build_fleet(raw: &RawFleet, server_id_len: Option<usize>, errs: &mut Errors) -> Option<Fleet> {
    let listen = errs.check(
        "fleet.listen",
        raw.listen
            .parse::<SocketAddr>()
            .map_err(|_| format!("not an IP:PORT: \"{}\"", raw.listen))
            .and_then(|a| {
                if a.port() == 0 {
                    Err("needs a port (members send to it)".to_owned())
                } else {
                    Ok(a)
                }
            }),
    );
    let mut members: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(raw.members.len());
    let mut ok = true;
    for (id_text, addr_text) in &raw.members {
        let field = format!("fleet.members.{id_text}");
        let id = match id_text.parse::<i64>() {
            Ok(n) => parse_server_id(&RawServerId::Int(n)),
            Err(_) => parse_server_id(&RawServerId::Text(id_text.clone())),
        };
        let id = match (id, server_id_len) {
            (Ok(id), Some(len)) if id.len() != len => Err(format!(
                "a server id of {} bytes, but quic.server_id has {len}",
                id.len()
            )),
            (Ok(id), _) if members.iter().any(|(m, _)| *m == id) => {
                Err("the same server id as another member".to_owned())
            }
            (other, _) => other,
        };
        let port = listen.map_or(0, |l| l.port());
        let addr = addr_text.parse::<SocketAddr>().ok().or_else(|| {
            addr_text
                .parse::<std::net::IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, port))
        });
        let addr = addr.ok_or_else(|| format!("not an IP address or IP:PORT: \"{addr_text}\""));
        match (errs.check(&field, id), errs.check(&field, addr)) {
            (Some(id), Some(addr)) => members.push((id, addr)),
            _ => ok = false,
        }
    }
    Some(Fleet {
        listen: listen?,
        members: ok.then_some(members)?,
    })
}

fn build_resolver(raw: &RawResolver, errs: &mut Errors) -> Option<Resolver> {
    let mut nameservers = Vec::with_capacity(raw.nameservers.len());
    let mut ok = true;
    for (i, text) in raw.nameservers.iter().enumerate() {
        let parsed = text.parse::<SocketAddr>().ok().or_else(|| {
            text.parse::<std::net::IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 53))
        });
        match parsed {
            Some(a) => nameservers.push(a),
            None => {
                ok = false;
                errs.push(
                    format!("resolver.nameservers[{i}]"),
                    format!("not an IP address or IP:PORT: \"{text}\""),
                );
            }
        }
    }
    let min_ttl = duration(errs, "resolver.min_ttl", &raw.min_ttl);
    let max_ttl = positive_duration(errs, "resolver.max_ttl", &raw.max_ttl);
    if let (Some(min), Some(max)) = (min_ttl, max_ttl) {
        if min > max {
            errs.push(
                "resolver.min_ttl",
                format!("must not exceed max_ttl ({max:?})"),
            );
            return None;
        }
    }
    Some(Resolver {
        nameservers: ok.then_some(nameservers)?,
        min_ttl: min_ttl?,
        max_ttl: max_ttl?,
    })
}

fn build_acme(
    raw: &Option<RawAcme>,
    listen: Option<&Listen>,
    io: &Io<'_>,
    errs: &mut Errors,
) -> Option<Option<Acme>> {
    let Some(raw) = raw else {
        return Some(None);
    };
    let directory = errs.check(
        "acme.directory",
        match raw.directory.parse::<http::Uri>() {
            Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => {
                Ok(raw.directory.clone())
            }
            _ => Err(format!("\"{}\" is not an https:// URL", raw.directory)),
        },
    );
    let email = match &raw.email {
        None => Some(None),
        Some(e) => errs
            .check(
                "acme.email",
                match e.split_once('@') {
                    Some((user, domain))
                        if !user.is_empty()
                            && domain.contains('.')
                            && !e.contains(|c: char| c.is_whitespace() || c == ',') =>
                    {
                        Ok(e.clone())
                    }
                    _ => Err(format!("\"{e}\" is not an e-mail address")),
                },
            )
            .map(Some),
    };
    let ca = match &raw.ca {
        None => Some(None),
        Some(path) => errs.check("acme.ca", check_certs(io, path)).map(Some),
    };
    let (http_on, tcp_on) = listen.map_or((true, true), |l| (l.http.is_some(), l.tcp.is_some()));
    let challenge = match raw.challenge.as_deref() {
        None if http_on => Some(AcmeChallenge::Http01),
        None => Some(AcmeChallenge::TlsAlpn01),
        Some(text) => errs.check(
            "acme.challenge",
            one_of(
                text,
                "challenge",
                &[
                    ("http-01", AcmeChallenge::Http01),
                    ("tls-alpn-01", AcmeChallenge::TlsAlpn01),
                ],
            ),
        ),
    };
    match challenge {
        Some(AcmeChallenge::Http01) if !http_on => {
            errs.push("acme.challenge", "http-01 needs listen.http enabled");
        }
        Some(AcmeChallenge::TlsAlpn01) if !tcp_on => {
            errs.push("acme.challenge", "tls-alpn-01 needs listen.tcp enabled");
        }
        _ => {}
    }
    if raw.certificates.is_empty() {
        errs.push("acme.certificates", "at least one certificate is required");
    }
    let mut certificates = Vec::with_capacity(raw.certificates.len());
    for (i, c) in raw.certificates.iter().enumerate() {
        let at = format!("acme.certificates[{i}].domains");
        if c.domains.is_empty() {
            errs.push(&at, "at least one domain is required");
        }
        let mut names = Vec::with_capacity(c.domains.len());
        for d in &c.domains {
            let name = d.trim_end_matches('.').to_ascii_lowercase();
            // A numeric last label is an address, not a name (RFC 3696 §2).
            let numeric_tld = name
                .rsplit('.')
                .next()
                .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
            let ok = !name.is_empty()
                && name.len() <= 253
                && name.contains('.')
                && !numeric_tld
                && name.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                });
            if ok {
                names.push(name);
            } else {
                errs.push(
                    &at,
                    format!("\"{d}\" is not a DNS name this challenge can prove (no wildcards, no addresses)"),
                );
            }
        }
        certificates.push(names);
    }
    let state_dir = io.base.join(
        raw.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("state/acme")),
    );
    Some(Some(Acme {
        directory: directory?,
        email: email?,
        state_dir,
        ca: ca?,
        challenge: challenge?,
        certificates,
    }))
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
    // Anyone who reaches a non-loopback admin address could reload the configuration.
    if let (Some(Some(a)), None) = (&addr, &raw.token) {
        if !a.ip().is_loopback() {
            errs.check::<()>(
                "admin.token",
                Err(format!(
                    "required with a non-loopback admin.address ({a}): set a token of at least \
                     16 characters, or listen on 127.0.0.1"
                )),
            );
        }
    }
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
    let tls = build_listen_tls(&raw.tls, io, errs);
    let t = &raw.tcp;
    let tcp_port = match t.port {
        None => port,
        // 0: any free port (tests; `spooky` logs the one it got).
        Some(p) => errs.check("listen.tcp.port", int_in::<u16>(p, 0, 65535)),
    };
    let header_timeout = positive_duration(errs, "listen.tcp.header_timeout", &t.header_timeout);
    let idle_timeout = positive_duration(errs, "listen.tcp.idle_timeout", &t.idle_timeout);
    let max_connections = errs.check(
        "listen.tcp.max_connections",
        int_in::<usize>(t.max_connections, 1, 10_000_000),
    );
    let proxy_protocol = cidrs(
        errs,
        "listen.tcp.proxy_protocol.trusted",
        &t.proxy_protocol.trusted,
    );
    let max_age = duration(errs, "listen.alt_svc.max_age", &raw.alt_svc.max_age);
    let alt_svc_port = match raw.alt_svc.port {
        None => port,
        Some(p) => errs.check("listen.alt_svc.port", int_in::<u16>(p, 1, 65535)),
    };
    let h = &raw.http;
    let http_port = errs.check("listen.http.port", int_in::<u16>(h.port, 0, 65535));
    let redirect_status = errs.check(
        "listen.http.redirect_status",
        match h.redirect_status {
            301 | 302 | 307 | 308 => Ok(h.redirect_status as u16),
            s => Err(format!(
                "{s} is not a redirect that keeps the method (301, 302, 307 or 308)"
            )),
        },
    );
    let http = match (h.enabled, ip) {
        (false, _) => Some(None),
        (true, Some(ip)) => match (http_port, redirect_status) {
            (Some(port), Some(redirect_status)) => Some(Some(PlainHttp {
                addr: SocketAddr::new(ip, port),
                redirect_status,
            })),
            _ => None,
        },
        (true, None) => None,
    };
    let max_connections_per_ip = errs.check(
        "listen.tcp.max_connections_per_ip",
        int_in::<u32>(t.max_connections_per_ip, 1, 1_000_000),
    );
    let connection_rate_per_ip = match &t.connection_rate_per_ip {
        None => Some(None),
        Some(r) => rate(
            errs,
            "listen.tcp.connection_rate_per_ip",
            "per_second",
            r.per_second,
            r.burst,
        )
        .map(Some),
    };
    let tcp = match (t.enabled, ip) {
        (false, _) => Some(None),
        (true, Some(ip)) => Some(Some(Tcp {
            addr: SocketAddr::new(ip, tcp_port?),
            header_timeout: header_timeout?,
            idle_timeout: idle_timeout?,
            max_connections: max_connections?,
            proxy_protocol: proxy_protocol?,
            max_connections_per_ip: max_connections_per_ip?,
            connection_rate_per_ip: connection_rate_per_ip?,
        })),
        (true, None) => None,
    };
    Some(Listen {
        addr: SocketAddr::new(ip?, port?),
        tls: tls?,
        tcp: tcp?,
        http: http?,
        alt_svc: if raw.alt_svc.enabled {
            Some(AltSvc {
                max_age: max_age?,
                port: alt_svc_port?,
            })
        } else {
            None
        },
    })
}

fn build_listen_tls(raw: &RawListenTls, io: &Io<'_>, errs: &mut Errors) -> Option<ListenTls> {
    let unknown_sni = errs.check(
        "listen.tls.unknown_sni",
        one_of(
            raw.unknown_sni.as_deref().unwrap_or("default"),
            "unknown_sni",
            &[
                ("default", UnknownSni::Default),
                ("refuse", UnknownSni::Refuse),
            ],
        ),
    );
    let mut pairs: Vec<(String, &Path, &Path)> = Vec::new();
    match (&raw.cert, &raw.key, raw.certificates.is_empty()) {
        (Some(cert), Some(key), true) => pairs.push(("listen.tls".to_owned(), cert, key)),
        (None, None, false) => {
            for (i, p) in raw.certificates.iter().enumerate() {
                pairs.push((format!("listen.tls.certificates[{i}]"), &p.cert, &p.key));
            }
        }
        (None, None, true) => {
            errs.push(
                "listen.tls",
                "needs cert and key, or certificates".to_owned(),
            );
            return None;
        }
        (_, _, false) => {
            errs.push(
                "listen.tls",
                "cert and key, or certificates: not both".to_owned(),
            );
            return None;
        }
        (cert, _, true) => {
            let missing = if cert.is_none() { "cert" } else { "key" };
            errs.push(format!("listen.tls.{missing}"), "missing");
            return None;
        }
    }
    let mut certificates = Vec::with_capacity(pairs.len());
    for (at, cert, key) in pairs {
        let cert = errs.check(&format!("{at}.cert"), check_certs(io, cert));
        let key = errs.check(&format!("{at}.key"), check_key(io, key));
        if let (Some(cert), Some(key)) = (cert, key) {
            certificates.push(CertPair { cert, key });
        }
    }
    if certificates.len() != raw.certificates.len().max(1) {
        return None;
    }
    Some(ListenTls {
        certificates,
        unknown_sni: unknown_sni?,
    })
}

fn build_quic(raw: &RawQuic, io: &Io<'_>, errs: &mut Errors) -> Option<Quic> {
    let idle_timeout = positive_duration(errs, "quic.idle_timeout", &raw.idle_timeout);
    let handshake_timeout =
        positive_duration(errs, "quic.handshake_timeout", &raw.handshake_timeout);
    let send_timeout = positive_duration(errs, "quic.send_timeout", &raw.send_timeout);
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
    let max_stalled_streams = errs.check(
        "quic.max_stalled_streams",
        int_in(raw.max_stalled_streams, 1, 1 << 30),
    );
    let max_streams_per_ip = errs.check(
        "quic.max_streams_per_ip",
        int_in(raw.max_streams_per_ip, 1, 1 << 30),
    );
    let max_stalled_streams_per_ip = errs.check(
        "quic.max_stalled_streams_per_ip",
        int_in(raw.max_stalled_streams_per_ip, 1, 1 << 30),
    );
    let retry = build_retry(raw, errs);
    let early_data = errs.check(
        "quic.early_data",
        one_of(
            &raw.early_data,
            "0-RTT mode",
            &[
                ("off", EarlyData::Off),
                ("defer", EarlyData::Defer),
                ("reject", EarlyData::Reject),
            ],
        ),
    );
    let cid_len = errs.check("quic.cid_len", int_in::<u8>(raw.cid_len, 0, 255));
    let server_id = errs.check("quic.server_id", parse_server_id(&raw.server_id));
    let max_generation = i64::from(UNROUTABLE_GENERATION) - 1;
    let generation = errs.check(
        "quic.generation",
        int_in::<u8>(raw.generation, 0, max_generation),
    );
    let connection_ids = build_connection_ids(&raw.connection_ids, errs);
    if let (Some(len), Some(id), Some(format)) = (cid_len, &server_id, &connection_ids) {
        // A bad generation is already reported; check the lengths with a routable one.
        check_cid_layout(len, id.len(), generation.unwrap_or(0), format, errs);
    }
    Some(Quic {
        idle_timeout: idle_timeout?,
        handshake_timeout: handshake_timeout?,
        request_header_timeout: request_header_timeout?,
        send_timeout: send_timeout?,
        max_concurrent_streams: max_concurrent_streams?,
        initial_max_data: initial_max_data?,
        initial_max_stream_data: initial_max_stream_data?,
        max_connections: max_connections?,
        max_connections_per_ip: max_connections_per_ip?,
        max_stalled_streams: max_stalled_streams?,
        max_stalled_streams_per_ip: max_stalled_streams_per_ip?,
        max_streams_per_ip: max_streams_per_ip?,
        retry: retry?,
        early_data: early_data?,
        cid_len: cid_len?,
        server_id: server_id?,
        generation: generation?,
        key_file: raw.key_file.as_ref().map(|f| io.base.join(f)),
        connection_ids: connection_ids?,
    })
}

/// `quic.connection_ids`: the format, and for QUIC-LB the config rotation, key and the
/// previous config.
fn build_connection_ids(raw: &RawConnectionIds, errs: &mut Errors) -> Option<CidFormat> {
    const AT: &str = "quic.connection_ids";
    let formats = [
        ("spooky", 0u8),
        ("quic-lb", 1),
        ("katran-v2", 2),
        ("katran-v3", 3),
    ];
    let format = errs.check(
        &format!("{AT}.format"),
        one_of(&raw.format, "connection ID format", &formats),
    )?;
    if format != 1 {
        let mut ok = true;
        for (set, field) in [
            (raw.config_rotation.is_some(), "config_rotation"),
            (raw.key.is_some(), "key"),
            (raw.length_self_encoding.is_some(), "length_self_encoding"),
            (raw.previous.is_some(), "previous"),
        ] {
            if set {
                errs.push(format!("{AT}.{field}"), "only applies with format: quic-lb");
                ok = false;
            }
        }
        return ok.then_some(match format {
            0 => CidFormat::Spooky,
            v => CidFormat::Katran { version: v },
        });
    }
    let current = quic_lb_config(
        AT,
        raw.config_rotation.unwrap_or(0),
        raw.key.as_deref(),
        raw.length_self_encoding.unwrap_or(false),
        errs,
    );
    let previous = match &raw.previous {
        None => Some(None),
        Some(p) => {
            let at = format!("{AT}.previous");
            let prev = quic_lb_config(
                &at,
                p.config_rotation,
                p.key.as_deref(),
                p.length_self_encoding,
                errs,
            );
            match (&prev, &current) {
                (Some(p), Some(c)) if p.rotation == c.rotation => {
                    errs.push(
                        format!("{at}.config_rotation"),
                        format!(
                            "the previous config must have another codepoint than the current \
                             one ({})",
                            c.rotation
                        ),
                    );
                    None
                }
                _ => prev.map(Some),
            }
        }
    };
    Some(CidFormat::QuicLb {
        current: current?,
        previous: previous?,
    })
}

/// One QUIC-LB config under `at`: rotation 0..=6, key of 32 hex digits or none.
fn quic_lb_config(
    at: &str,
    rotation: i64,
    key: Option<&str>,
    length_self_encoding: bool,
    errs: &mut Errors,
) -> Option<QuicLbConfig> {
    let rotation = errs.check(
        &format!("{at}.config_rotation"),
        int_in::<u8>(rotation, 0, i64::from(UNROUTABLE_GENERATION) - 1),
    );
    let key = match key {
        None => Some(None),
        Some(text) => {
            let digits = text.strip_prefix("0x").unwrap_or(text);
            let parsed = (digits.len() == 32)
                .then(|| {
                    let mut k = [0u8; 16];
                    for (i, b) in k.iter_mut().enumerate() {
                        *b = u8::from_str_radix(digits.get(2 * i..2 * i + 2)?, 16).ok()?;
                    }
                    Some(k)
                })
                .flatten();
            match parsed {
                Some(k) => Some(Some(k)),
                None => {
                    errs.push(
                        format!("{at}.key"),
                        "an AES-128 key is 32 hex digits (the load balancer's config has the \
                         same)",
                    );
                    None
                }
            }
        }
    };
    Some(QuicLbConfig {
        rotation: rotation?,
        key: key?,
        length_self_encoding,
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

/// Asks [`CidLayout`] whether the connection ID parts fit in `format`'s layout, and files
/// its refusal under the field to change.
fn check_cid_layout(
    cid_len: u8,
    server_id_len: usize,
    generation: u8,
    format: &CidFormat,
    errs: &mut Errors,
) {
    let lb = !matches!(format, CidFormat::Spooky);
    let (min_cid, room) = if lb {
        (
            1 + 1 + 2 * HOST_BYTES + MIN_NONCE_LEN,
            format!(
                "leave {} bytes after it (generation and worker twice, {MIN_NONCE_LEN} random)",
                2 * HOST_BYTES + MIN_NONCE_LEN
            ),
        )
    } else {
        (
            2 + 1 + MIN_NONCE_LEN,
            format!("leave {MIN_NONCE_LEN} nonce bytes"),
        )
    };
    let too_long = || {
        format!(
            "a server id of {server_id_len} bytes does not fit: it must be \
             1..={MAX_SERVER_ID_LEN} bytes and {room} in a {cid_len}-byte connection ID"
        )
    };
    if let CidFormat::Katran { version } = format {
        let want = if *version == 2 { 3 } else { 4 };
        if server_id_len != want {
            errs.push(
                "quic.server_id",
                format!(
                    "Katran version {version} connection IDs carry a {}-bit server id: write \
                     it as {want} bytes of hex (got {server_id_len})",
                    want * 8
                ),
            );
            return;
        }
    }
    let Ok(sid_len) = u8::try_from(server_id_len) else {
        errs.push("quic.server_id", too_long());
        return;
    };
    let layout = if lb {
        CidLayout::for_load_balancer(cid_len, sid_len, generation)
    } else {
        CidLayout::new(cid_len, sid_len, generation)
    };
    match layout {
        Ok(_) => {}
        Err(LayoutError::CidLen) => errs.push(
            "quic.cid_len",
            format!("must be between {min_cid} and {MAX_CID_LEN}, got {cid_len}"),
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

fn build_proxy(raw: &RawProxy, env: &dyn Env, errs: &mut Errors) -> Option<Proxy> {
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
    let memory_limit = match &raw.memory_limit {
        None => Some(super::memory::auto_limit(env)),
        Some(RawSize::Text(t)) if t == "auto" => Some(super::memory::auto_limit(env)),
        Some(RawSize::Text(t)) if t == "off" => Some(None),
        Some(limit) => size_in(errs, "proxy.memory_limit", limit).map(Some),
    };
    let trusted_proxies = cidrs(errs, "proxy.trusted_proxies", &raw.trusted_proxies);
    Some(Proxy {
        forwarded: forwarded?,
        trusted_proxies: trusted_proxies?,
        via: raw.via,
        request_id: raw.request_id,
        shutdown_grace: shutdown_grace?,
        max_header_list_size: max_header_list_size?,
        memory_limit: memory_limit?,
    })
}

/// A list of address blocks, each checked under `path[i]`.
fn cidrs(errs: &mut Errors, path: &str, raw: &[String]) -> Option<Vec<Cidr>> {
    let parsed: Vec<Option<Cidr>> = raw
        .iter()
        .enumerate()
        .map(|(i, t)| errs.check(&format!("{path}[{i}]"), Cidr::parse(t.trim())))
        .collect();
    parsed.into_iter().collect()
}

fn build_log(raw: &RawLog, errs: &mut Errors) -> Option<Log> {
    let level = errs.check(
        "log.level",
        if raw.level.trim().is_empty() {
            Err("must not be empty".to_owned())
        } else if let Some(problem) = super::earlier::log_level_problem(&raw.level) {
            Err(problem)
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
    let access_format = match raw.access_format.as_str() {
        "json" => {
            let fields = match &raw.access_fields {
                None => Some(AccessField::ALL.iter().map(|(_, f)| *f).collect()),
                Some(names) => names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        let names = AccessField::ALL;
                        errs.check(
                            &format!("log.access_fields[{i}]"),
                            one_of(n.trim(), "access-log field", &names),
                        )
                    })
                    .collect::<Vec<_>>()
                    .into_iter()
                    .collect::<Option<Vec<_>>>(),
            };
            if fields.as_ref().is_some_and(Vec::is_empty) {
                errs.push("log.access_fields", "at least one field is required");
            }
            fields.map(AccessFormat::Json)
        }
        text => {
            if raw.access_fields.is_some() {
                errs.push(
                    "log.access_fields",
                    "only the json access_format takes a field list",
                );
            }
            errs.check(
                "log.access_format",
                match text {
                    "common" => Ok(AccessFormat::Common),
                    "combined" => Ok(AccessFormat::Combined),
                    other => Err(format!(
                        "unknown access-log format \"{other}\" (allowed: json, common, combined)"
                    )),
                },
            )
        }
    };
    Some(Log {
        level: level?,
        format: format?,
        access: access?,
        access_format: access_format?,
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
pub(super) fn int_in<T: TryFrom<i64>>(value: i64, min: i64, max: i64) -> Result<T, String> {
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

/// A rate of `per_second` (field `path.field`, > 0 and at most a million) with a burst
/// (`path.burst`, 1 to a million; default: the rate, at least 1).
fn rate(
    errs: &mut Errors,
    path: &str,
    field: &str,
    per_second: f64,
    burst: Option<i64>,
) -> Option<(f64, u32)> {
    let rate = errs.check(
        &format!("{path}.{field}"),
        if per_second.is_finite() && per_second > 0.0 && per_second <= 1e6 {
            Ok(per_second)
        } else {
            Err(format!(
                "must be a number above 0 and at most 1000000, got {per_second}"
            ))
        },
    );
    let burst = match burst {
        None => Some(per_second.ceil().clamp(1.0, 1e6) as u32),
        Some(b) => errs.check(&format!("{path}.burst"), int_in::<u32>(b, 1, 1_000_000)),
    };
    Some((rate?, burst?))
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

mod upstream;

#[cfg(test)]
mod tests;
