//! A route's rules, sans-IO: the path the backend sees (`strip_prefix`, `rewrite_prefix`),
//! field changes towards the backend and towards the client (`request_headers`,
//! `response_headers`: remove, then set, then add), and redirect answers. The same for every
//! client protocol: they act on the HTTP/2 request and on HTTP/3-style field lists, which
//! all three fronts share.

use crate::config::{HeaderRules, Redirect};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use quiche::h3::{Header, NameValue};

/// The path sent to the backend for `path` (with its query) matched by `prefix`:
/// `replacement` in place of the prefix; always starting with `/`. `None` when the path does
/// not start with the prefix (the catch-all `/` route also takes other paths).
pub fn upstream_path(path: &[u8], prefix: &str, replacement: &str) -> Option<Bytes> {
    let rest = path.strip_prefix(prefix.as_bytes())?;
    let mut out = Vec::with_capacity(replacement.len() + rest.len() + 1);
    out.extend_from_slice(replacement.as_bytes());
    match (out.last(), rest.first()) {
        (Some(b'/'), Some(b'/')) => out.extend_from_slice(rest.get(1..).unwrap_or_default()),
        _ => out.extend_from_slice(rest),
    }
    if out.first() != Some(&b'/') {
        out.insert(0, b'/');
    }
    Some(Bytes::from(out))
}

/// Applies `rules` to a request's fields (validated names and values: nothing fails).
pub fn apply_request(rules: &HeaderRules, headers: &mut HeaderMap) {
    for name in &rules.remove {
        headers.remove(name.as_str());
    }
    for (name, value) in &rules.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &rules.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(n, v);
        }
    }
}

/// Applies `rules` to a response head (`:status` first, kept).
pub fn apply_response(rules: &HeaderRules, fields: &mut Vec<Header>) {
    if rules.is_empty() {
        return;
    }
    fields.retain(|h| {
        let name = h.name();
        !rules.remove.iter().any(|r| r.as_bytes() == name)
            && !rules.set.iter().any(|(n, _)| n.as_bytes() == name)
    });
    for (name, value) in rules.set.iter().chain(&rules.add) {
        fields.push(Header::new(name.as_bytes(), value.as_bytes()));
    }
}

/// The redirect answer to a request for `path` (with its query): status, head, body.
pub fn redirect_answer(redirect: &Redirect, path: &[u8]) -> (u16, Vec<Header>, Bytes) {
    let mut location = redirect.to.clone().into_bytes();
    if redirect.keep_path && path.first() == Some(&b'/') {
        location.extend_from_slice(path);
    } else if !redirect.keep_path && !location.ends_with(b"/") {
        // `https://example.com` becomes `https://example.com/`; a path given stays as is.
        let has_path = redirect
            .to
            .split_once("://")
            .is_some_and(|(_, rest)| rest.contains('/'));
        if !has_path {
            location.push(b'/');
        }
    }
    let status = redirect.status;
    let body = Bytes::from_static(b"");
    let fields = vec![
        Header::new(b":status", status.to_string().as_bytes()),
        Header::new(b"location", &location),
        Header::new(b"content-length", b"0"),
        Header::new(b"server", b"spooky"),
    ];
    (status, fields, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(path: &str, prefix: &str, replacement: &str) -> Option<String> {
        upstream_path(path.as_bytes(), prefix, replacement)
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn strip_and_rewrite_keep_one_leading_slash_and_the_query() {
        assert_eq!(p("/api/x?q=1", "/api", "").as_deref(), Some("/x?q=1"));
        assert_eq!(p("/api", "/api", "").as_deref(), Some("/"));
        assert_eq!(p("/api?q", "/api", "").as_deref(), Some("/?q"));
        assert_eq!(p("/api/x", "/api/", "").as_deref(), Some("/x"));
        assert_eq!(p("/api/x", "/api", "/v2").as_deref(), Some("/v2/x"));
        assert_eq!(p("/api", "/api", "/v2").as_deref(), Some("/v2"));
        assert_eq!(p("/api/x", "/api/", "/v2/").as_deref(), Some("/v2/x"));
        assert_eq!(p("/api/x", "/api", "/").as_deref(), Some("/x"));
        assert_eq!(p("*", "/", ""), None);
    }

    #[test]
    fn header_rules_remove_then_set_then_add() {
        let rules = HeaderRules {
            remove: vec!["x-debug".into()],
            set: vec![("x-site".into(), "a".into())],
            add: vec![("x-tag".into(), "2".into())],
        };
        let mut h = HeaderMap::new();
        h.append("x-debug", HeaderValue::from_static("1"));
        h.append("x-site", HeaderValue::from_static("old"));
        h.append("x-site", HeaderValue::from_static("older"));
        h.append("x-tag", HeaderValue::from_static("1"));
        apply_request(&rules, &mut h);
        assert!(h.get("x-debug").is_none());
        assert_eq!(h.get_all("x-site").iter().collect::<Vec<_>>(), ["a"]);
        assert_eq!(h.get_all("x-tag").iter().collect::<Vec<_>>(), ["1", "2"]);

        let mut f = vec![
            Header::new(b":status", b"200"),
            Header::new(b"x-debug", b"1"),
            Header::new(b"x-site", b"old"),
            Header::new(b"x-tag", b"1"),
        ];
        apply_response(&rules, &mut f);
        let got: Vec<(String, String)> = f
            .iter()
            .map(|h| {
                (
                    String::from_utf8_lossy(h.name()).into(),
                    String::from_utf8_lossy(h.value()).into(),
                )
            })
            .collect();
        let want = [
            (":status", "200"),
            ("x-tag", "1"),
            ("x-site", "a"),
            ("x-tag", "2"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn redirects_keep_the_path_and_query_or_not() {
        let r = |to: &str, keep_path| Redirect {
            to: to.into(),
            status: 308,
            keep_path,
        };
        let location = |r: &Redirect, path: &str| {
            let (status, f, _) = redirect_answer(r, path.as_bytes());
            assert_eq!(status, 308);
            let l = f.iter().find(|h| h.name() == b"location").unwrap();
            String::from_utf8(l.value().to_vec()).unwrap()
        };
        assert_eq!(
            location(&r("https://new.example", true), "/a/b?c=1"),
            "https://new.example/a/b?c=1"
        );
        assert_eq!(
            location(&r("https://new.example", false), "/a"),
            "https://new.example/"
        );
        assert_eq!(
            location(&r("https://new.example/moved", false), "/a"),
            "https://new.example/moved"
        );
        assert_eq!(
            location(&r("https://new.example/base", true), "/a"),
            "https://new.example/base/a"
        );
    }
}
