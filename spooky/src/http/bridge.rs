//! The HTTP/3 → HTTP/2 bridge core, sans-IO: validation of an HTTP/3 request head
//! (RFC 9114 §4.3), conversion of the head into an HTTP/2 request (RFC 9113 §8.2–8.3) with
//! the `forwarded` / `x-forwarded-*` / `via` hop headers, and conversion of HTTP/2 response
//! heads and trailers back into HTTP/3 fields.
//!
//! No sockets, no runtime: every function here takes fields and returns fields or an error.

use crate::config::ForwardedMode;
use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri};
use quiche::h3::{Header, NameValue};
use std::net::IpAddr;
use std::ops::Range;

/// HTTP/3 `H3_MESSAGE_ERROR` (RFC 9114 §8.1): a malformed message.
pub const H3_MESSAGE_ERROR: u64 = 0x10e;
/// HTTP/3 `H3_REQUEST_REJECTED`: the request was not processed at all (safe to retry).
pub const H3_REQUEST_REJECTED: u64 = 0x10b;
/// HTTP/3 `H3_REQUEST_CANCELLED`.
pub const H3_REQUEST_CANCELLED: u64 = 0x10c;
/// HTTP/3 `H3_INTERNAL_ERROR`.
pub const H3_INTERNAL_ERROR: u64 = 0x102;
/// HTTP/3 `H3_EXCESSIVE_LOAD`: the peer behaves in a way that generates excessive load.
pub const H3_EXCESSIVE_LOAD: u64 = 0x107;
/// HTTP/3 `H3_NO_ERROR`.
pub const H3_NO_ERROR: u64 = 0x100;

/// Header fields that are connection-specific in HTTP/1.1 and malformed in HTTP/2 and 3.
pub const CONNECTION_SPECIFIC: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// Why a request head is malformed. Every variant maps to `H3_MESSAGE_ERROR` (and a 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("header name {0:?} is not a lowercase token")]
    BadName(String),
    #[error("value of {0:?} has forbidden characters or surrounding whitespace")]
    BadValue(String),
    #[error("pseudo-header {0:?} after a regular header")]
    PseudoAfterRegular(String),
    #[error("unknown pseudo-header {0:?}")]
    UnknownPseudo(String),
    #[error("duplicate pseudo-header {0:?}")]
    DuplicatePseudo(&'static str),
    #[error("missing pseudo-header {0:?}")]
    MissingPseudo(&'static str),
    #[error("connection-specific header {0:?}")]
    ConnectionSpecific(String),
    #[error("te header other than \"trailers\"")]
    BadTe,
    #[error("invalid content-length")]
    BadContentLength,
    #[error("host {host:?} differs from :authority {authority:?}")]
    HostMismatch { host: String, authority: String },
    #[error("invalid :path or :authority")]
    BadTarget,
    #[error("invalid :method")]
    BadMethod,
    /// RFC 9114 §4.3.1: an `https` request names its authority (`:authority` or `host`).
    #[error("no :authority and no host")]
    MissingAuthority,
    /// Only `https` is served (the client reached us over QUIC).
    #[error(":scheme {0:?} is not https")]
    UnsupportedScheme(String),
}

/// A validated request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    /// `https` (empty for CONNECT, which carries none).
    pub scheme: Bytes,
    /// From `:authority`, else from `host`; never empty.
    pub authority: Bytes,
    pub path: Bytes,
    /// Regular fields in arrival order, `host` removed (it travels as `:authority`).
    pub fields: Vec<(Bytes, Bytes)>,
    pub content_length: Option<u64>,
    /// `:protocol` of an extended CONNECT (RFC 8441, RFC 9220): `websocket` opens a tunnel.
    pub protocol: Option<Bytes>,
    /// The request's `x-request-id` as Spooky forwards and returns it (empty: none; set by
    /// the forwarder, not by validation).
    pub request_id: Bytes,
    /// The upstream URI validation built and read back (`https://authority/path`); the
    /// conversion uses it while it still names `authority` and `path`.
    pub uri: Option<Uri>,
}

impl RequestHead {
    /// An extended CONNECT for a WebSocket (RFC 8441 / RFC 9220; HTTP/1.1's `Upgrade:
    /// websocket` arrives as one too).
    pub fn is_websocket(&self) -> bool {
        self.method == Method::CONNECT
            && self
                .protocol
                .as_ref()
                .is_some_and(|p| p.eq_ignore_ascii_case(b"websocket"))
    }

    /// The authority as text (validated ASCII).
    pub fn authority_str(&self) -> &str {
        std::str::from_utf8(&self.authority).unwrap_or("")
    }

    /// The path as text (validated ASCII).
    pub fn path_str(&self) -> &str {
        std::str::from_utf8(&self.path).unwrap_or("/")
    }

    /// First value of the regular field `name` (lowercase).
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| n.as_ref() == name.as_bytes())
            .map(|(_, v)| v.as_ref())
    }
}

/// Lowercase RFC 9110 token characters (`tchar` without the uppercase letters), as a table.
const TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    t
};

fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// RFC 9110 §5.5 field values: visible characters, obs-text, spaces and tabs inside; no
/// control characters (so no NUL, CR, LF) and no DEL; no surrounding whitespace.
fn valid_value(v: &[u8]) -> bool {
    let bad_edge = |b: &u8| *b == b' ' || *b == b'\t';
    // Every byte looked at (no early exit), so the loop runs on vectors.
    v.iter().fold(true, |ok, &b| {
        ok & ((b >= 0x20 && b != 0x7f) | (b == b'\t'))
    }) && !v.first().is_some_and(bad_edge)
        && !v.last().is_some_and(bad_edge)
}

/// RFC 3986 scheme: a letter, then letters, digits, `+`, `-`, `.`.
fn valid_scheme(s: &[u8]) -> bool {
    s.first().is_some_and(u8::is_ascii_alphabetic)
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

/// An HTTP authority without userinfo: a registered name (unreserved, sub-delims and
/// percent-encoding) or a bracketed IPv6 literal, then an optional `:port` of digits. Nothing
/// that could start a path, query or fragment, so routing and the upstream see the same host.
fn valid_authority(a: &[u8]) -> bool {
    let (host, port) = if a.first() == Some(&b'[') {
        let Some(end) = a.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &a[1..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        (&a[..=end], &a[end + 1..])
    } else {
        match a.iter().rposition(|&b| b == b':') {
            Some(i) => (&a[..i], &a[i..]),
            None => (a, &a[a.len()..]),
        }
    };
    let host_ok = host.first() == Some(&b'[')
        || (!host.is_empty()
            && host.iter().all(|&b| {
                b.is_ascii_alphanumeric()
                    || matches!(
                        b,
                        b'-' | b'.'
                            | b'_'
                            | b'~'
                            | b'%'
                            | b'!'
                            | b'$'
                            | b'&'
                            | b'\''
                            | b'('
                            | b')'
                            | b'*'
                            | b'+'
                            | b','
                            | b';'
                            | b'='
                    )
            }));
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    host_ok && port_ok
}

/// [`valid_authority`], and the `http` crate reads it back unchanged: for heads whose
/// authority is not checked as part of the upstream URI (CONNECT, `OPTIONS *`).
fn valid_authority_alone(a: &Bytes) -> bool {
    valid_authority(a)
        && http::uri::Authority::from_maybe_shared(a.clone())
            .is_ok_and(|parsed| parsed.as_str().as_bytes() == a.as_ref())
}

/// An origin-form request target with no fragment. That the upstream sees it exactly as
/// routing saw it is checked on the whole upstream URI (`validate_request`).
fn valid_path(p: &[u8]) -> bool {
    p.starts_with(b"/") && !p.contains(&b'#') && p.iter().all(|b| b.is_ascii_graphic())
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Validates an HTTP/3 request head (RFC 9114 §4.3.1 and §4.2).
///
/// # Errors
/// [`RequestError`] naming the first problem; the request is malformed and must be answered
/// with a stream error `H3_MESSAGE_ERROR` (or a 400) without reaching a backend.
pub fn validate_request(list: &[Header]) -> Result<RequestHead, RequestError> {
    // Every value kept (and every regular field's name) is copied once into one buffer, and
    // the head's fields are slices of it: one allocation for the head, not two per field.
    let total = list.iter().map(|h| h.name().len() + h.value().len()).sum();
    let mut store = BytesMut::with_capacity(total);
    let mut keep = |b: &[u8]| {
        let start = store.len();
        store.extend_from_slice(b);
        start..store.len()
    };
    let mut method = None;
    let mut scheme = None;
    let mut authority = None;
    let mut path = None;
    let mut protocol = None;
    let mut host: Option<Range<usize>> = None;
    let mut content_length: Option<u64> = None;
    let mut spans = Vec::with_capacity(list.len());
    let mut seen_regular = false;

    for h in list {
        let (name, value) = (h.name(), h.value());
        if let Some(pseudo) = name.strip_prefix(b":") {
            if seen_regular {
                return Err(RequestError::PseudoAfterRegular(lossy(name)));
            }
            let slot = match pseudo {
                b"method" => (&mut method, ":method"),
                b"scheme" => (&mut scheme, ":scheme"),
                b"authority" => (&mut authority, ":authority"),
                b"path" => (&mut path, ":path"),
                b"protocol" => (&mut protocol, ":protocol"),
                _ => return Err(RequestError::UnknownPseudo(lossy(name))),
            };
            if slot.0.is_some() {
                return Err(RequestError::DuplicatePseudo(slot.1));
            }
            if !valid_value(value) {
                return Err(RequestError::BadValue(lossy(name)));
            }
            *slot.0 = Some(keep(value));
            continue;
        }
        seen_regular = true;
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(RequestError::BadName(lossy(name)));
        }
        if !valid_value(value) {
            return Err(RequestError::BadValue(lossy(name)));
        }
        if let Ok(n) = std::str::from_utf8(name) {
            if CONNECTION_SPECIFIC.contains(&n) {
                return Err(RequestError::ConnectionSpecific(n.to_owned()));
            }
        }
        match name {
            b"te" if value != b"trailers" => return Err(RequestError::BadTe),
            b"content-length" => {
                let parsed = parse_content_length(value)?;
                if content_length.is_some_and(|c| c != parsed) {
                    return Err(RequestError::BadContentLength);
                }
                content_length = Some(parsed);
            }
            b"host" => {
                if host.is_some() {
                    return Err(RequestError::BadValue("host".into()));
                }
                host = Some(keep(value));
                continue;
            }
            _ => {}
        }
        spans.push((keep(name), keep(value)));
    }
    let store = store.freeze();
    let at = |r: Range<usize>| store.slice(r);
    let (method, scheme, authority, path, protocol, host) = (
        method.map(at),
        scheme.map(at),
        authority.map(at),
        path.map(at),
        protocol.map(at),
        host.map(at),
    );
    let fields: Vec<(Bytes, Bytes)> = spans.into_iter().map(|(n, v)| (at(n), at(v))).collect();

    let method = method.ok_or(RequestError::MissingPseudo(":method"))?;
    let method = Method::from_bytes(&method).map_err(|_| RequestError::BadMethod)?;
    if protocol.is_some() && method != Method::CONNECT {
        // RFC 8441 §4: `:protocol` belongs to an extended CONNECT only.
        return Err(RequestError::UnknownPseudo(":protocol".into()));
    }
    if method == Method::CONNECT && protocol.is_none() {
        // Plain CONNECT carries no :scheme/:path; Spooky does not tunnel (the caller answers
        // 501), but the head itself is well-formed.
        let authority = authority.ok_or(RequestError::MissingPseudo(":authority"))?;
        if scheme.is_some() || path.is_some() || !valid_authority_alone(&authority) {
            return Err(RequestError::BadTarget);
        }
        return Ok(RequestHead {
            method,
            scheme: Bytes::new(),
            authority,
            path: Bytes::new(),
            fields,
            content_length,
            protocol: None,
            request_id: Bytes::new(),
            uri: None,
        });
    }
    let scheme = scheme.ok_or(RequestError::MissingPseudo(":scheme"))?;
    let path = path.ok_or(RequestError::MissingPseudo(":path"))?;
    let asterisk = path.as_ref() == b"*" && method == Method::OPTIONS;
    if !asterisk && !valid_path(&path) {
        return Err(RequestError::BadTarget);
    }
    if !valid_scheme(&scheme) {
        return Err(RequestError::BadTarget);
    }
    if scheme.as_ref() != b"https" {
        return Err(RequestError::UnsupportedScheme(lossy(&scheme)));
    }
    let authority = match (authority, host) {
        (Some(a), Some(h)) if !a.eq_ignore_ascii_case(&h) => {
            return Err(RequestError::HostMismatch {
                host: lossy(&h),
                authority: lossy(&a),
            })
        }
        (Some(a), _) => a,
        (None, Some(h)) => h,
        (None, None) => return Err(RequestError::MissingAuthority),
    };
    let authority_ok = if asterisk {
        valid_authority_alone(&authority)
    } else {
        valid_authority(&authority)
    };
    if !authority_ok {
        return Err(RequestError::BadTarget);
    }
    let mut head = RequestHead {
        method,
        scheme,
        authority,
        path,
        fields,
        content_length,
        protocol,
        request_id: Bytes::new(),
        uri: None,
    };
    // The upstream must see exactly the target routing saw: build the URI as the conversion
    // will, and refuse what does not read back unchanged.
    if !asterisk {
        let uri = upstream_uri(&head).map_err(|_| RequestError::BadTarget)?;
        if !uri_names(&uri, &head) {
            return Err(RequestError::BadTarget);
        }
        // Kept for the conversion, which would build the same.
        head.uri = Some(uri);
    }
    Ok(head)
}

/// Whether `uri` carries exactly `head`'s authority and path.
fn uri_names(uri: &Uri, head: &RequestHead) -> bool {
    uri.authority()
        .is_some_and(|a| a.as_str().as_bytes() == head.authority.as_ref())
        && uri
            .path_and_query()
            .is_some_and(|p| p.as_str().as_bytes() == head.path.as_ref())
}

/// The absolute URI the upstream request carries.
fn upstream_uri(head: &RequestHead) -> Result<Uri, ConvertError> {
    let scheme: &[u8] = if head.scheme.is_empty() {
        b"https"
    } else {
        &head.scheme
    };
    let mut uri = Vec::with_capacity(scheme.len() + 3 + head.authority.len() + head.path.len());
    uri.extend_from_slice(scheme);
    uri.extend_from_slice(b"://");
    if head.authority.is_empty() {
        return Err(ConvertError("no authority".into()));
    }
    uri.extend_from_slice(&head.authority);
    uri.extend_from_slice(&head.path);
    Uri::from_maybe_shared(Bytes::from(uri)).map_err(|e| ConvertError(e.to_string()))
}

fn parse_content_length(v: &[u8]) -> Result<u64, RequestError> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return Err(RequestError::BadContentLength);
    }
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(RequestError::BadContentLength)
}

/// Facts about the hop that the forwarding headers describe.
#[derive(Debug, Clone, Copy)]
pub struct Hop {
    pub client_ip: IpAddr,
    pub mode: ForwardedMode,
    /// The `via` entry's received-protocol (RFC 9110 §7.6.3: the version the client spoke,
    /// `3`, `2` or `1.1`), or `None` when `proxy.via` is off.
    pub via: Option<&'static str>,
}

/// Why a head could not become an HTTP/2 request.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the upstream request: {0}")]
pub struct ConvertError(pub String);

/// Builds the HTTP/2 request for `head`: the URI carries scheme, the client's authority (sent
/// as `:authority`, never also as `host`) and path; regular fields are copied once, in order,
/// except the hop headers that `hop.mode` rewrites.
///
/// # Errors
/// [`ConvertError`] when the URI or a field cannot be represented (already validated input
/// makes this rare).
pub fn to_h2_request(head: &RequestHead, hop: &Hop) -> Result<Request<()>, ConvertError> {
    if head.path.as_ref() == b"*" {
        return Err(ConvertError(
            "the asterisk form is answered by Spooky, not forwarded".into(),
        ));
    }
    let uri = match &head.uri {
        // Built by validation, unless a rule has rewritten the path since.
        Some(uri) if uri_names(uri, head) => uri.clone(),
        _ => upstream_uri(head)?,
    };

    // Room for the fields and the hop's own (four forwarding fields and `via`).
    let mut headers = HeaderMap::with_capacity(head.fields.len() + 5);
    let rewrite = hop.mode == ForwardedMode::Replace;
    let mut xff_prev: Option<&[u8]> = None;
    let mut fwd_prev: Option<&[u8]> = None;
    let mut via_prev: Option<&[u8]> = None;
    for (name, value) in &head.fields {
        match name.as_ref() {
            b"x-forwarded-for" if hop.mode != ForwardedMode::Off => {
                xff_prev = (!rewrite).then_some(value.as_ref());
                continue;
            }
            b"forwarded" if hop.mode != ForwardedMode::Off => {
                fwd_prev = (!rewrite).then_some(value.as_ref());
                continue;
            }
            b"x-forwarded-proto" | b"x-forwarded-host" if hop.mode != ForwardedMode::Off => {
                continue
            }
            b"via" if hop.via.is_some() => {
                via_prev = Some(value.as_ref());
                continue;
            }
            _ => {}
        }
        let n = HeaderName::from_bytes(name).map_err(|e| ConvertError(e.to_string()))?;
        let v = HeaderValue::from_maybe_shared(value.clone())
            .map_err(|e| ConvertError(e.to_string()))?;
        headers.append(n, v);
    }
    if hop.mode != ForwardedMode::Off {
        let ip = hop.client_ip.to_string();
        let mut fwd_elem = Vec::with_capacity(32 + head.authority.len());
        match hop.client_ip {
            IpAddr::V4(_) => {
                fwd_elem.extend_from_slice(b"for=");
                fwd_elem.extend_from_slice(ip.as_bytes());
            }
            IpAddr::V6(_) => {
                fwd_elem.extend_from_slice(b"for=\"[");
                fwd_elem.extend_from_slice(ip.as_bytes());
                fwd_elem.extend_from_slice(b"]\"");
            }
        }
        fwd_elem.extend_from_slice(b";proto=https");
        if !head.authority.is_empty() {
            fwd_elem.extend_from_slice(b";host=\"");
            fwd_elem.extend_from_slice(&head.authority);
            fwd_elem.push(b'"');
        }
        insert(
            &mut headers,
            "x-forwarded-for",
            join_hop(xff_prev, ip.into_bytes()),
        )?;
        insert(&mut headers, "forwarded", join_hop(fwd_prev, fwd_elem))?;
        headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("https"),
        );
        if !head.authority.is_empty() {
            let host = HeaderValue::from_maybe_shared(head.authority.clone())
                .map_err(|e| ConvertError(e.to_string()))?;
            headers.insert(HeaderName::from_static("x-forwarded-host"), host);
        }
    }
    if let Some(version) = hop.via {
        let via = match (via_prev, version) {
            // The usual case, without an allocation.
            (None, "3") => HeaderValue::from_static("3 spooky"),
            (None, "2") => HeaderValue::from_static("2 spooky"),
            (None, "1.1") => HeaderValue::from_static("1.1 spooky"),
            (prev, _) => {
                let ours = format!("{version} spooky");
                HeaderValue::from_maybe_shared(Bytes::from(join_hop(prev, ours.into_bytes())))
                    .map_err(|e| ConvertError(e.to_string()))?
            }
        };
        headers.insert(HeaderName::from_static("via"), via);
    }

    let mut req = Request::new(());
    *req.method_mut() = head.method.clone();
    if let Some(protocol) = head
        .protocol
        .as_ref()
        .and_then(|p| std::str::from_utf8(p).ok())
    {
        // An extended CONNECT to an HTTP/2 backend (RFC 8441).
        req.extensions_mut()
            .insert(h2::ext::Protocol::from(protocol));
    }
    *req.uri_mut() = uri;
    *req.version_mut() = http::Version::HTTP_2;
    *req.headers_mut() = headers;
    Ok(req)
}

/// `ours` after the previous hops' value, if any (`ours` alone is returned as it is).
fn join_hop(prev: Option<&[u8]>, ours: Vec<u8>) -> Vec<u8> {
    match prev {
        Some(p) if !p.is_empty() => {
            let mut v = Vec::with_capacity(p.len() + 2 + ours.len());
            v.extend_from_slice(p);
            v.extend_from_slice(b", ");
            v.extend_from_slice(&ours);
            v
        }
        _ => ours,
    }
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: Vec<u8>) -> Result<(), ConvertError> {
    let v = HeaderValue::from_maybe_shared(Bytes::from(value))
        .map_err(|e| ConvertError(e.to_string()))?;
    headers.insert(HeaderName::from_static(name), v);
    Ok(())
}

/// HTTP/3 fields for an HTTP/2 response head: `:status` first, then the fields minus the
/// connection-specific ones (which an HTTP/2 peer must not send, but a sloppy one might).
pub fn response_to_h3(status: http::StatusCode, headers: &HeaderMap) -> Vec<Header> {
    let mut out = Vec::with_capacity(headers.len() + 1);
    out.push(Header::new(b":status", status.as_str().as_bytes()));
    push_fields(&mut out, headers);
    out
}

/// HTTP/3 trailer fields from HTTP/2 trailers (pseudo-headers are impossible here).
pub fn trailers_to_h3(headers: &HeaderMap) -> Vec<Header> {
    let mut out = Vec::with_capacity(headers.len());
    push_fields(&mut out, headers);
    out
}

/// A backend's fields for the client, without connection-specific ones. Values lose
/// surrounding spaces and tabs: HTTP/2 and HTTP/3 forbid them (RFC 9113 §8.2.1, RFC 9114
/// §4.2), the h2 crate lets them through, and a strict client would reject the response.
fn push_fields(out: &mut Vec<Header>, headers: &HeaderMap) {
    for (name, value) in headers {
        if CONNECTION_SPECIFIC.contains(&name.as_str()) {
            continue;
        }
        let value = value.as_bytes().trim_ascii();
        out.push(Header::new(name.as_str().as_bytes(), value));
    }
}

/// HTTP/2 trailers from HTTP/3 trailer fields; pseudo-headers and invalid fields are
/// malformed in a trailer section.
///
/// # Errors
/// [`RequestError`] for a pseudo-header, an invalid name or value.
pub fn trailers_to_h2(list: &[Header]) -> Result<HeaderMap, RequestError> {
    let mut map = HeaderMap::with_capacity(list.len());
    for h in list {
        let (name, value) = (h.name(), h.value());
        if name.starts_with(b":") {
            return Err(RequestError::PseudoAfterRegular(lossy(name)));
        }
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(RequestError::BadName(lossy(name)));
        }
        if !valid_value(value) {
            return Err(RequestError::BadValue(lossy(name)));
        }
        let n = HeaderName::from_bytes(name).map_err(|_| RequestError::BadName(lossy(name)))?;
        let v = HeaderValue::from_bytes(value).map_err(|_| RequestError::BadValue(lossy(name)))?;
        map.append(n, v);
    }
    Ok(map)
}

/// A short response that Spooky itself produces (404, 502, …): fields and body.
pub fn local_response(status: u16, body: &str, retry_after: Option<u32>) -> (Vec<Header>, Bytes) {
    let body = Bytes::from(format!("{body}\n"));
    let mut h = vec![
        Header::new(b":status", status.to_string().as_bytes()),
        Header::new(b"content-type", b"text/plain; charset=utf-8"),
        Header::new(b"content-length", body.len().to_string().as_bytes()),
        Header::new(b"server", b"spooky"),
    ];
    if let Some(secs) = retry_after {
        h.push(Header::new(b"retry-after", secs.to_string().as_bytes()));
    }
    (h, body)
}

#[cfg(test)]
mod tests;
