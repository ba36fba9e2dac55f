//! The `upstream` section: pools, their routes, load balancing, timeouts and passive health,
//! and each backend (address, TLS, active health check).

use super::*;

pub(super) fn build_upstreams(
    raw: &RawConfig,
    io: &Io<'_>,
    errs: &mut Errors,
) -> Option<Vec<Upstream>> {
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
        // A name that is not one (spaces, dots, a multi-line YAML key) is quoted in paths.
        let path = if valid_name(name) {
            format!("upstream.{name}")
        } else {
            format!("upstream.{name:?}")
        };
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

/// Letters, digits, `_` and `-`; not empty.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

fn build_upstream(
    name: &str,
    raw: &RawUpstream,
    path: &str,
    io: &Io<'_>,
    errs: &mut Errors,
) -> Option<Upstream> {
    if !valid_name(name) {
        errs.push(
            path,
            format!("invalid upstream name {name:?} (use letters, digits, '_' and '-')"),
        );
    }
    let route = build_route(&raw.route, &format!("{path}.route"), errs);
    let load_balancing =
        build_load_balancing(&raw.load_balancing, &format!("{path}.load_balancing"), errs);
    let backends_path = format!("{path}.backends");
    let redirect = match &raw.redirect {
        None => Some(None),
        Some(r) => build_redirect(r, &format!("{path}.redirect"), errs).map(Some),
    };
    match (raw.backends.is_empty(), raw.redirect.is_some()) {
        (true, false) => errs.push(&backends_path, "at least one backend is required"),
        (false, true) => errs.push(
            &backends_path,
            "a pool with a redirect has no backends (it answers every request itself)",
        ),
        _ => {}
    }
    let request_headers = build_header_rules(
        &raw.request_headers,
        &format!("{path}.request_headers"),
        errs,
    );
    let response_headers = build_header_rules(
        &raw.response_headers,
        &format!("{path}.response_headers"),
        errs,
    );
    let entries: Vec<Option<Entry>> = raw
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| build_backend(b, &format!("{backends_path}[{i}]"), io, errs))
        .collect();
    let (mut backends, mut named) = (Some(Vec::new()), Vec::new());
    for e in entries {
        match e {
            Some(Entry::Fixed(b)) => backends.iter_mut().for_each(|v| v.push(b.clone())),
            Some(Entry::Named(n)) => named.push(n),
            None => backends = None,
        }
    }
    let timeouts = build_timeouts(&raw.timeouts, &format!("{path}.timeouts"), errs);
    let passive_health =
        build_passive_health(&raw.passive_health, &format!("{path}.passive_health"), errs);
    let max_request_body = match &raw.max_request_body {
        None => Some(None),
        Some(size) => size_in(errs, &format!("{path}.max_request_body"), size).map(Some),
    };
    let max_pending_requests = errs.check(
        &format!("{path}.max_pending_requests"),
        int_in::<u32>(raw.max_pending_requests, 1, 1_000_000),
    );
    let send_proxy_protocol = match raw.send_proxy_protocol.as_deref() {
        None | Some("off") => Some(false),
        Some("v2") => Some(true),
        Some(other) => {
            errs.push(
                format!("{path}.send_proxy_protocol"),
                format!("unknown value \"{other}\" (allowed: v2, off)"),
            );
            None
        }
    };
    let allow = cidrs(errs, &format!("{path}.access.allow"), &raw.access.allow);
    let deny = cidrs(errs, &format!("{path}.access.deny"), &raw.access.deny);
    let access = allow.zip(deny).map(|(allow, deny)| Access { allow, deny });
    let rate_limit = match &raw.rate_limit {
        None => Some(None),
        Some(r) => build_rate_limit(r, &format!("{path}.rate_limit"), errs).map(Some),
    };
    let max_request_headers = match &raw.max_request_headers {
        None => Some(None),
        Some(size) => size_in(errs, &format!("{path}.max_request_headers"), size).map(Some),
    };
    let max_requests_per_backend = match raw.max_requests_per_backend {
        None => Some(None),
        Some(n) => errs
            .check(
                &format!("{path}.max_requests_per_backend"),
                int_in::<u32>(n, 1, 10_000_000),
            )
            .map(Some),
    };
    let readiness = match raw.readiness.as_deref() {
        None => Some(Readiness::Optional),
        Some(text) => errs.check(
            &format!("{path}.readiness"),
            one_of(
                text,
                "readiness",
                &[
                    ("required", Readiness::Required),
                    ("optional", Readiness::Optional),
                ],
            ),
        ),
    };
    if !valid_name(name) || raw.backends.is_empty() == raw.redirect.is_none() {
        return None;
    }
    Some(Upstream {
        name: name.to_owned(),
        route: route?,
        load_balancing: load_balancing?,
        backends: backends?,
        timeouts: timeouts?,
        passive_health: passive_health?,
        fail_open: raw.fail_open,
        max_request_body: max_request_body?,
        max_pending_requests: max_pending_requests?,
        request_headers: request_headers?,
        response_headers: response_headers?,
        redirect: redirect?,
        send_proxy_protocol: send_proxy_protocol?,
        access: access?,
        rate_limit: rate_limit?,
        max_request_headers: max_request_headers?,
        max_requests_per_backend: max_requests_per_backend?,
        readiness: readiness?,
        named,
    })
}

fn build_rate_limit(raw: &RawRateLimit, path: &str, errs: &mut Errors) -> Option<RateLimit> {
    let rate = super::rate(
        errs,
        path,
        "requests_per_second",
        raw.requests_per_second,
        raw.burst,
    );
    let key = match raw.key.as_deref().map(str::trim) {
        None | Some("client") => Some(RateKey::Client),
        Some("client_prefix") => Some(RateKey::ClientPrefix),
        Some("global") => Some(RateKey::Global),
        Some(other) => match other.strip_prefix("header:") {
            Some(name) => errs
                .check(
                    &format!("{path}.key"),
                    http::HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
                        .map_err(|_| format!("\"{}\" is not a header field name", name.trim())),
                )
                .map(RateKey::Header),
            None => {
                errs.push(
                    format!("{path}.key"),
                    format!(
                        "unknown key \"{other}\" (allowed: client, client_prefix, header:NAME, global)"
                    ),
                );
                None
            }
        },
    };
    let (per_second, burst) = rate?;
    Some(RateLimit {
        per_second,
        burst,
        key: key?,
    })
}

const NOT_FOR_RULES: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "content-length",
    "trailer",
];

/// A field name a rule may touch: not the connection's own fields (HTTP/1.1 hop-by-hop,
/// malformed in HTTP/2 and 3), nor the framing's, nor `host` (it travels as `:authority`);
/// pseudo-headers are not tokens.
fn rule_name(raw: &str) -> Result<String, String> {
    let name = raw.to_ascii_lowercase();
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err(format!("\"{raw}\" is not a field name"));
    }
    if NOT_FOR_RULES.contains(&name.as_str()) {
        return Err(format!(
            "\"{raw}\" belongs to the connection or the message framing, not to a rule"
        ));
    }
    Ok(name)
}

fn build_header_rules(raw: &RawHeaderRules, path: &str, errs: &mut Errors) -> Option<HeaderRules> {
    let mut ok = true;
    let mut rules = HeaderRules::default();
    for name in &raw.remove {
        match errs.check(&format!("{path}.remove"), rule_name(name)) {
            Some(n) => rules.remove.push(n),
            None => ok = false,
        }
    }
    for (what, list, out) in [
        ("set", &raw.set, &mut rules.set),
        ("add", &raw.add, &mut rules.add),
    ] {
        for (name, value) in list {
            // A name that is not a token (a line break, a dot) is quoted in the path.
            let token = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-^_`|~".contains(&b));
            let here = if token {
                format!("{path}.{what}.{name}")
            } else {
                format!("{path}.{what}.{name:?}")
            };
            let n = errs.check(&here, rule_name(name));
            let v = errs.check(
                &here,
                if value
                    .bytes()
                    .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
                    && value.trim() == value
                {
                    Ok(value.clone())
                } else {
                    Err("the value has control characters or surrounding spaces".to_owned())
                },
            );
            match (n, v) {
                (Some(n), Some(v)) => out.push((n, v)),
                _ => ok = false,
            }
        }
    }
    ok.then_some(rules)
}

fn build_redirect(raw: &RawRedirect, path: &str, errs: &mut Errors) -> Option<Redirect> {
    let status = errs.check(
        &format!("{path}.status"),
        match raw.status {
            301 | 302 | 303 | 307 | 308 => Ok(raw.status as u16),
            s => Err(format!("{s} is not a redirect (301, 302, 303, 307 or 308)")),
        },
    );
    let to = errs.check(&format!("{path}.to"), redirect_target(&raw.to));
    Some(Redirect {
        to: to?,
        status: status?,
        keep_path: raw.keep_path,
    })
}

/// `http(s)://authority[/path]`, printable ASCII, no query or fragment; the trailing `/`
/// dropped (the request's path brings its own).
fn redirect_target(raw: &str) -> Result<String, String> {
    let bad = || {
        format!("\"{raw}\" is not an absolute http:// or https:// URL without query or fragment")
    };
    let rest = raw
        .strip_prefix("https://")
        .or_else(|| raw.strip_prefix("http://"))
        .ok_or_else(bad)?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty()
        || authority.contains('@')
        || raw.contains(['?', '#'])
        || !raw.bytes().all(|b| (b'!'..=b'~').contains(&b))
        || raw.parse::<http::Uri>().is_err()
    {
        return Err(bad());
    }
    Ok(raw.trim_end_matches('/').to_owned())
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
    let rewrite_prefix = match (raw.strip_prefix, &raw.rewrite_prefix) {
        (false, None) => Some(None),
        (true, None) => Some(Some(String::new())),
        (false, Some(r)) => errs
            .check(
                &format!("{path}.rewrite_prefix"),
                if r.starts_with('/')
                    && r.bytes().all(|b| (b'!'..=b'~').contains(&b))
                    && !r.contains(['?', '#'])
                {
                    Ok(r.clone())
                } else {
                    Err(format!("must be a path starting with '/', got \"{r}\""))
                },
            )
            .map(Some),
        (true, Some(_)) => {
            errs.push(
                format!("{path}.rewrite_prefix"),
                "strip_prefix and rewrite_prefix: one or the other",
            );
            None
        }
    };
    Some(Route {
        host: host?,
        path_prefix: path_prefix?,
        rewrite_prefix: rewrite_prefix?,
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

/// A backend at a fixed address, or one named by DNS.
enum Entry {
    Fixed(Backend),
    Named(NamedBackend),
}

fn build_backend(raw: &RawBackend, path: &str, io: &Io<'_>, errs: &mut Errors) -> Option<Entry> {
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
    let address = errs.check(&format!("{path}.address"), parse_address(&raw.address));
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
    let protocol = match (raw.protocol.as_deref(), &raw.tls) {
        (None | Some("http2"), _) => Some(BackendProtocol::Http2),
        (Some("http1"), _) => Some(BackendProtocol::Http1),
        (Some("auto"), Some(_)) => Some(BackendProtocol::Auto),
        (Some("auto"), None) => {
            errs.push(
                format!("{path}.protocol"),
                "auto needs tls (ALPN decides between h2 and http/1.1); say http1 or http2 for cleartext",
            );
            None
        }
        (Some(other), _) => {
            errs.push(
                format!("{path}.protocol"),
                format!("unknown protocol \"{other}\" (allowed: http2, http1, auto)"),
            );
            None
        }
    };
    if !id_ok {
        return None;
    }
    let address = address?;
    let backend = Backend {
        id: raw.id.clone(),
        address: match &address {
            Address::Ip(a) => *a,
            // A placeholder: a named backend's copies get the addresses it resolves to.
            Address::Name(_, port) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), *port),
        },
        address_text: raw.address.clone(),
        weight: weight?,
        health_check: health_check?,
        tls: tls?,
        protocol: protocol?,
        resolved_from: None,
    };
    Some(match address {
        Address::Ip(_) => Entry::Fixed(backend),
        Address::Name(host, port) => Entry::Named(NamedBackend {
            host,
            port,
            template: backend,
        }),
    })
}

/// A backend address as written.
enum Address {
    Ip(SocketAddr),
    /// A DNS name (lower-case) and port: resolved when Spooky runs, not here (`spooky check`
    /// needs no DNS).
    Name(String, u16),
}

/// A socket address literal, or `host:port` with a DNS name.
fn parse_address(text: &str) -> Result<Address, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return if addr.port() == 0 {
            Err(format!("port must not be 0 in \"{text}\""))
        } else {
            Ok(Address::Ip(addr))
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
    Ok(Address::Name(host.to_ascii_lowercase(), port))
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
    let websocket_lifetime = match &raw.websocket_lifetime {
        None => Some(None),
        Some(d) => positive_duration(errs, &format!("{path}.websocket_lifetime"), d).map(Some),
    };
    let request = match &raw.request {
        None => Some(None),
        Some(d) => positive_duration(errs, &format!("{path}.request"), d).map(Some),
    };
    Some(UpstreamTimeouts {
        connect: connect?,
        response_head: response_head?,
        idle: idle?,
        websocket_lifetime: websocket_lifetime?,
        request: request?,
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
    let max_ejection_percent = errs.check(
        &format!("{path}.max_ejection_percent"),
        int_in(raw.max_ejection_percent, 1, 100),
    );
    Some(PassiveHealth {
        consecutive_failures: failures?,
        cooldown: cooldown?,
        server_errors: raw.server_errors,
        max_ejection_percent: max_ejection_percent?,
    })
}
