//! Fuzz target `request_head`: HTTP/3 request heads and trailers through the bridge.
//!
//! Input: one byte of hop settings (bits 0-1 forwarded mode: append, replace, off, append;
//! bit 2 `via`; bit 3 IPv6 client), then fields as `name_len: u8, name, value_len: u8, value`
//! until the input runs out (a cut-off last field is dropped).
//!
//! Checked:
//! - `validate_request` never panics; a head it accepts has no pseudo-header, `host` or
//!   connection-specific field left among its regular fields, its authority is `:authority`
//!   (else `host`) and never empty (RFC 9114 §4.3.1), and its scheme is `https` (empty only
//!   for CONNECT);
//! - every accepted head converts with `to_h2_request` in every forwarded mode, with and without
//!   `via`; the HTTP/2 request has no `host` field, its `:authority` (the URI's authority)
//!   equals the validated authority, its path is the
//!   validated path, its method the validated method, and the hop headers appear once;
//! - `trailers_to_h2` never panics, refuses pseudo-headers, and keeps every field it accepts;
//!   HTTP/2 headers go back to HTTP/3 with `trailers_to_h3` and are accepted again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use quiche::h3::{Header, NameValue};
use spooky::config::ForwardedMode;
use spooky::http::bridge::{to_h2_request, trailers_to_h2, trailers_to_h3, validate_request, Hop};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const MODES: [ForwardedMode; 3] = [
    ForwardedMode::Append,
    ForwardedMode::Replace,
    ForwardedMode::Off,
];
const CONNECTION_SPECIFIC: [&[u8]; 5] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"upgrade",
];

fuzz_target!(|input: &[u8]| {
    let Some((&hop_bits, mut rest)) = input.split_first() else {
        return;
    };
    let mut list = Vec::new();
    while let Some((name, value, tail)) = field(rest) {
        list.push(Header::new(name, value));
        rest = tail;
    }
    let hop = Hop {
        client_ip: if hop_bits & 8 == 0 {
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))
        } else {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7))
        },
        mode: MODES[usize::from(hop_bits & 3) % MODES.len()],
        via: (hop_bits & 4 != 0).then_some("3"),
    };
    check_request(&list, &hop);
    check_trailers(&list);
});

/// One `len, bytes, len, bytes` field off the front of `input`.
fn field(input: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (&n, rest) = input.split_first()?;
    let (name, rest) = rest.split_at_checked(usize::from(n))?;
    let (&v, rest) = rest.split_first()?;
    let (value, rest) = rest.split_at_checked(usize::from(v))?;
    Some((name, value, rest))
}

fn check_request(list: &[Header], first_hop: &Hop) {
    let Ok(head) = validate_request(list) else {
        return;
    };
    for (name, _) in &head.fields {
        assert!(!name.starts_with(b":"), "pseudo-header among fields");
        assert_ne!(name.as_ref(), b"host", "host survived validation");
        assert!(!CONNECTION_SPECIFIC.contains(&name.as_ref()));
    }
    let first = |n: &[u8]| list.iter().find(|h| h.name() == n).map(|h| h.value());
    let want_authority = first(b":authority").or_else(|| first(b"host"));
    assert_eq!(Some(head.authority.as_ref()), want_authority);
    assert!(
        !head.authority.is_empty(),
        "an empty authority was accepted"
    );
    if head.method == http::Method::CONNECT {
        assert!(head.scheme.is_empty() && head.path.is_empty());
    } else {
        assert_eq!(head.scheme.as_ref(), b"https", "a scheme other than https");
    }

    let hops = MODES.iter().flat_map(|&mode| {
        [None, Some("3")].map(|via| Hop {
            mode,
            via,
            ..*first_hop
        })
    });
    // OPTIONS * is answered by Spooky itself and never converted.
    let asterisk = head.path.as_ref() == b"*";
    for hop in std::iter::once(*first_hop).chain(hops) {
        let req = match to_h2_request(&head, &hop) {
            Ok(req) => req,
            Err(_) if asterisk => continue,
            Err(e) => panic!("validated head does not convert ({:?}): {e}", hop.mode),
        };
        assert!(req.headers().get("host").is_none(), "host sent upstream");
        assert!(!asterisk, "OPTIONS * was converted for upstream");
        let authority = req.uri().authority().map(|a| a.as_str());
        assert_eq!(
            authority.map(str::as_bytes),
            Some(head.authority.as_ref()),
            ":authority upstream differs from the validated one"
        );
        if !head.path.is_empty() {
            let path = req.uri().path_and_query().map(|p| p.as_str());
            assert_eq!(
                path.map(str::as_bytes),
                Some(head.path.as_ref()),
                ":path upstream differs from the validated one"
            );
        }
        assert_eq!(req.method(), head.method);
        let once = |name: &str| req.headers().get_all(name).iter().count() == 1;
        if hop.mode != ForwardedMode::Off {
            assert!(once("x-forwarded-for") && once("forwarded") && once("x-forwarded-proto"));
        }
        if hop.via.is_some() {
            assert!(once("via"));
        }
        let back = trailers_to_h3(req.headers());
        if let Err(e) = trailers_to_h2(&back) {
            panic!("HTTP/2 fields do not go back through trailers_to_h2: {e}");
        }
    }
}

fn check_trailers(list: &[Header]) {
    let result = trailers_to_h2(list);
    let has_pseudo = list.iter().any(|h| h.name().starts_with(b":"));
    match result {
        Ok(map) => {
            assert!(!has_pseudo, "pseudo-header accepted in trailers");
            assert_eq!(map.len(), list.len(), "a trailer field was lost");
            let back = trailers_to_h3(&map);
            assert!(back
                .iter()
                .all(|h| !CONNECTION_SPECIFIC.contains(&h.name())));
        }
        Err(_) => {
            // Also the regular fields alone, so that a pseudo-header does not hide the rest.
            if has_pseudo {
                let regular: Vec<Header> = list
                    .iter()
                    .filter(|h| !h.name().starts_with(b":"))
                    .cloned()
                    .collect();
                if let Ok(map) = trailers_to_h2(&regular) {
                    assert_eq!(map.len(), regular.len(), "a trailer field was lost");
                }
            }
        }
    }
}
