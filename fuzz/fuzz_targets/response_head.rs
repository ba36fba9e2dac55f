//! Fuzz target `response_head`: HTTP/2 response heads and trailers from a backend, on their
//! way to an HTTP/3 client (`bridge::response_to_h3`, `bridge::trailers_to_h3`).
//!
//! Input: a status as `u16` LE, then fields as `name_len: u8, name, value_len: u8, value` until
//! the input runs out. A status or field the `http` crate refuses is skipped, as the h2 client
//! would refuse it before Spooky sees it (it builds its header map with the same crate).
//!
//! Checked:
//! - `response_to_h3` never panics and puts `:status` first, once, with the status's three
//!   digits; no other pseudo-header follows;
//! - every field name is lowercase (RFC 9114 §4.2: uppercase is malformed);
//! - no connection-specific field (`connection`, `keep-alive`, `proxy-connection`,
//!   `transfer-encoding`, `upgrade`) reaches the client, and every other field does, in the
//!   header map's order, with its value unchanged but for surrounding spaces and tabs (which
//!   HTTP/3 forbids and the h2 crate lets through);
//! - `trailers_to_h3` gives the same fields without `:status`, and they are accepted back by
//!   `trailers_to_h2` (a trailer section Spooky sent must be one it would accept).

#![no_main]

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use quiche::h3::NameValue;
use spooky::http::bridge::{response_to_h3, trailers_to_h2, trailers_to_h3};

const CONNECTION_SPECIFIC: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

fuzz_target!(|input: &[u8]| {
    let Some((status, mut rest)) = input.split_first_chunk::<2>() else {
        return;
    };
    let Ok(status) = StatusCode::from_u16(u16::from_le_bytes(*status)) else {
        return;
    };
    let mut map = HeaderMap::new();
    while let Some((name, value, tail)) = field(rest) {
        rest = tail;
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            map.append(n, v);
        }
    }
    let out = response_to_h3(status, &map);
    let (first, fields) = out.split_first().expect(":status is always there");
    assert_eq!(first.name(), b":status");
    assert_eq!(first.value(), status.as_str().as_bytes());
    assert_eq!(first.value().len(), 3);

    let want: Vec<(&[u8], &[u8])> = map
        .iter()
        .filter(|(n, _)| !CONNECTION_SPECIFIC.contains(&n.as_str()))
        .map(|(n, v)| (n.as_str().as_bytes(), trim(v.as_bytes())))
        .collect();
    let got: Vec<(&[u8], &[u8])> = fields.iter().map(|h| (h.name(), h.value())).collect();
    assert_eq!(got, want, "response fields lost, added or reordered");
    for (name, _) in &got {
        assert!(!name.starts_with(b":"), "a pseudo-header after :status");
        assert!(
            !name.iter().any(u8::is_ascii_uppercase),
            "an uppercase field name"
        );
    }

    let trailers = trailers_to_h3(&map);
    let trailer_fields: Vec<(&[u8], &[u8])> =
        trailers.iter().map(|h| (h.name(), h.value())).collect();
    assert_eq!(
        trailer_fields, want,
        "trailers differ from the head's fields"
    );
    match trailers_to_h2(&trailers) {
        Ok(back) => assert_eq!(back.len(), want.len(), "a trailer field was lost"),
        Err(e) => panic!("trailers Spooky sends are refused on the way back: {e}"),
    }
});

/// `v` without leading and trailing spaces and tabs (written out, not `trim_ascii`, which
/// also strips other whitespace the `http` crate refuses anyway).
fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// One `len, bytes, len, bytes` field off the front of `input`.
fn field(input: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (&n, rest) = input.split_first()?;
    let (name, rest) = rest.split_at_checked(usize::from(n))?;
    let (&v, rest) = rest.split_first()?;
    let (value, rest) = rest.split_at_checked(usize::from(v))?;
    Some((name, value, rest))
}
