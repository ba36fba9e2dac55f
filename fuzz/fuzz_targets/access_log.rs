//! Fuzz target `access_log`: what clients put in a request (host, method, path, user-agent,
//! referer, request id, SNI) through the access log's three formats, which must not let a
//! client forge lines or fields (log injection).
//!
//! Input: one byte choosing the JSON field list (bit `i` keeps field `i`), then the fields'
//! bytes separated by `0xff` (read as lossy UTF-8, as the request path turns bytes into text).
//!
//! Checked:
//! - formatting never panics;
//! - Common and Combined lines are one line of printable ASCII ending in `\n`, with exactly
//!   the format's quotes (2 and 6): a quote, backslash or control character from a client is
//!   written `\xHH`;
//! - a JSON line is one line that parses back to the same values, field for field.

#![no_main]

use libfuzzer_sys::fuzz_target;
use spooky::config::{AccessField, AccessFormat};
use spooky::telemetry::access_log::{format_line, Record};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest
        .split(|b| *b == 0xff)
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let mut next = || parts.next().unwrap_or_default();
    let r = Record {
        host: next(),
        method: next(),
        path: next(),
        user_agent: next(),
        referer: next(),
        request_id: next(),
        sni: next(),
        pool: next(),
        backend: next(),
        protocol: "h3",
        status: 200,
        client: Some("192.0.2.1:443".parse().expect("literal")),
        ..Record::default()
    };
    for (format, quotes) in [(AccessFormat::Common, 2), (AccessFormat::Combined, 6)] {
        let line = format_line(&r, &format);
        let body = line.strip_suffix('\n').expect("ends in a newline");
        assert!(
            body.bytes().all(|b| (0x20..=0x7e).contains(&b)),
            "not printable ASCII: {line:?}"
        );
        assert_eq!(body.matches('"').count(), quotes, "{line:?}");
    }
    let fields: Vec<AccessField> = AccessField::ALL
        .iter()
        .enumerate()
        .filter(|(i, _)| pick & (1 << (i % 8)) != 0)
        .map(|(_, (_, f))| *f)
        .collect();
    let line = format_line(&r, &AccessFormat::Json(fields.clone()));
    let body = line.strip_suffix('\n').expect("ends in a newline");
    assert!(!body.contains('\n'), "one line: {line:?}");
    let v: serde_json::Value = serde_json::from_str(body).expect("valid JSON");
    let obj = v.as_object().expect("an object");
    assert_eq!(obj.len(), fields.len(), "{line}");
    for f in &fields {
        let want = match f {
            AccessField::Host => Some(&r.host),
            AccessField::Method => Some(&r.method),
            AccessField::Path => Some(&r.path),
            AccessField::UserAgent => Some(&r.user_agent),
            AccessField::Referer => Some(&r.referer),
            AccessField::RequestId => Some(&r.request_id),
            AccessField::Sni => Some(&r.sni),
            AccessField::Pool => Some(&r.pool),
            AccessField::Backend => Some(&r.backend),
            _ => None,
        };
        if let Some(want) = want {
            assert_eq!(obj[f.name()].as_str(), Some(want.as_str()), "{line}");
        }
    }
});
