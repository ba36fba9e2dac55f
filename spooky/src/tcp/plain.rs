//! The plaintext listener's requests (`listen.http`): an ACME HTTP-01 challenge
//! (`/.well-known/acme-challenge/TOKEN`, RFC 8555 §8.3) gets its key authorization while the
//! challenge is open; every other request is answered with a redirect to the same host and path over `https://` (`listen.http.redirect_status`, 308 by
//! default: the method and body are kept), at the TLS listener's port (the QUIC one when
//! `listen.tcp` is off). Nothing is proxied in
//! plaintext. A request without a usable host gets 400.

use crate::http::{bridge, Forwarder, LocalAnswer};
use quiche::h3::{Header, NameValue};

/// Where ACME servers fetch HTTP-01 key authorizations.
const ACME_CHALLENGE: &str = "/.well-known/acme-challenge/";

/// The answer to one plaintext request.
pub(super) fn answer(fwd: &Forwarder, parts: &http::request::Parts, port: u16) -> LocalAnswer {
    let listen = &fwd.snapshot.config.listen;
    if let Some(token) = parts.uri.path().strip_prefix(ACME_CHALLENGE) {
        let shared = fwd.snapshot.certs.shared();
        let (status, body) = match shared.http01(token) {
            Some(key_authorization) => (200, key_authorization),
            None => (404, "no such challenge".to_owned()),
        };
        let (mut fields, _) = bridge::local_response(status, "", None);
        let body = bytes::Bytes::from(body);
        for f in &mut fields {
            if f.name() == b"content-length" {
                *f = Header::new(b"content-length", body.len().to_string().as_bytes());
            }
            if f.name() == b"content-type" {
                *f = Header::new(b"content-type", b"application/octet-stream");
            }
        }
        return LocalAnswer {
            fields,
            body,
            stop_sending: None,
        };
    }
    let status = listen.http.as_ref().map_or(308, |h| h.redirect_status);
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let host = authority
        .as_deref()
        .and_then(crate::routing::host_of)
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'_'))
        });
    let Some(host) = host else {
        let (fields, body) = bridge::local_response(400, "no valid host to redirect to", None);
        return LocalAnswer {
            fields,
            body,
            stop_sending: None,
        };
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let path = if path.starts_with('/') { path } else { "/" };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_ascii_lowercase()
    };
    let location = if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    };
    let fields = vec![
        Header::new(b":status", status.to_string().as_bytes()),
        Header::new(b"location", location.as_bytes()),
        Header::new(b"content-length", b"0"),
        Header::new(b"server", b"spooky"),
    ];
    LocalAnswer {
        fields,
        body: bytes::Bytes::new(),
        stop_sending: None,
    }
}
