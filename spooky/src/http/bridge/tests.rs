use super::*;

fn h(list: &[(&str, &str)]) -> Vec<Header> {
    list.iter()
        .map(|(n, v)| Header::new(n.as_bytes(), v.as_bytes()))
        .collect()
}

fn good() -> Vec<(&'static str, &'static str)> {
    vec![
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "example.com"),
        (":path", "/a?b"),
    ]
}

fn with(extra: &[(&'static str, &'static str)]) -> Vec<Header> {
    let mut l = good();
    l.extend_from_slice(extra);
    h(&l)
}

#[test]
fn a_plain_request_validates() {
    let head = validate_request(&with(&[("accept", "*/*")])).unwrap();
    assert_eq!(head.method, Method::GET);
    assert_eq!(head.authority_str(), "example.com");
    assert_eq!(head.path_str(), "/a?b");
    assert_eq!(head.field("accept"), Some(&b"*/*"[..]));
    assert_eq!(head.content_length, None);
}

#[test]
fn malformed_heads_are_named() {
    use RequestError as E;
    let cases: Vec<(Vec<Header>, E)> = vec![
        (with(&[("Accept", "x")]), E::BadName("Accept".into())),
        (
            with(&[("connection", "close")]),
            E::ConnectionSpecific("connection".into()),
        ),
        (
            with(&[("transfer-encoding", "chunked")]),
            E::ConnectionSpecific("transfer-encoding".into()),
        ),
        (with(&[("te", "gzip")]), E::BadTe),
        (with(&[("content-length", "12a")]), E::BadContentLength),
        (
            with(&[("content-length", "1"), ("content-length", "2")]),
            E::BadContentLength,
        ),
        (with(&[("x", "a\r\nb")]), E::BadValue("x".into())),
        (with(&[("x", " lead")]), E::BadValue("x".into())),
        (
            with(&[("host", "other.com")]),
            E::HostMismatch {
                host: "other.com".into(),
                authority: "example.com".into(),
            },
        ),
        (
            h(&[
                (":method", "GET"),
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
            ]),
            E::DuplicatePseudo(":method"),
        ),
        (
            h(&[(":scheme", "https"), (":path", "/")]),
            E::MissingPseudo(":method"),
        ),
        (
            h(&[(":method", "GET"), (":path", "/")]),
            E::MissingPseudo(":scheme"),
        ),
        (
            h(&[(":method", "GET"), (":scheme", "https")]),
            E::MissingPseudo(":path"),
        ),
        (
            h(&[(":method", "GET"), (":scheme", "https"), (":path", "")]),
            E::BadTarget,
        ),
        (
            h(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
                ("a", "b"),
                (":authority", "x"),
            ]),
            E::PseudoAfterRegular(":authority".into()),
        ),
        (
            h(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
                (":protocol", "websocket"),
            ]),
            E::UnknownPseudo(":protocol".into()),
        ),
        (
            h(&[(":method", "G ET"), (":scheme", "https"), (":path", "/")]),
            E::BadMethod,
        ),
    ];
    for (list, want) in cases {
        assert_eq!(validate_request(&list).unwrap_err(), want);
    }
}

#[test]
fn targets_that_would_reach_the_backend_differently_are_refused() {
    let target = |authority: &str, path: &str, scheme: &str| {
        validate_request(&h(&[
            (":method", "GET"),
            (":scheme", scheme),
            (":authority", authority),
            (":path", path),
        ]))
    };
    // Found by the request_head fuzz target: an authority carrying a path or query would
    // route on `:path` but reach the backend as another path.
    assert_eq!(
        target("public.example.com/admin?", "/x", "https").unwrap_err(),
        RequestError::BadTarget
    );
    assert_eq!(
        target("a.example.com", "/a#b", "https").unwrap_err(),
        RequestError::BadTarget
    );
    assert_eq!(
        target("a.example.com", "/", "ht)ps").unwrap_err(),
        RequestError::BadTarget
    );
    for bad in [
        "a{b}.com",
        "user@host",
        "a.com:80:80",
        "a.com:port",
        "[zz::1]",
        "a b",
    ] {
        assert_eq!(
            target(bad, "/", "https").unwrap_err(),
            RequestError::BadTarget,
            "{bad}"
        );
    }
    for good in [
        "example.com",
        "example.com:443",
        "[2001:db8::1]:8443",
        "127.0.0.1",
        "xn--bcher-kva.example",
        "a_b.internal",
    ] {
        let head = target(good, "/p?q=1&r=%20", "https").unwrap();
        let req = to_h2_request(
            &head,
            &Hop {
                client_ip: "192.0.2.1".parse().unwrap(),
                mode: ForwardedMode::Off,
                via: None,
            },
        )
        .unwrap();
        assert_eq!(req.uri().authority().unwrap().as_str(), good);
        assert_eq!(req.uri().path_and_query().unwrap().as_str(), "/p?q=1&r=%20");
    }
    // Control characters other than tab, and DEL, are not field values.
    assert!(validate_request(&with(&[("x-a", "a\u{1}b")])).is_err());
    assert!(validate_request(&with(&[("x-a", "a\u{7f}b")])).is_err());
    assert!(validate_request(&with(&[("x-a", "a\tb")])).is_ok());
    // OPTIONS * validates but is never forwarded.
    let head = validate_request(&h(&[
        (":method", "OPTIONS"),
        (":scheme", "https"),
        (":authority", "example.com"),
        (":path", "*"),
    ]))
    .unwrap();
    assert!(to_h2_request(
        &head,
        &Hop {
            client_ip: "192.0.2.1".parse().unwrap(),
            mode: ForwardedMode::Off,
            via: None
        }
    )
    .is_err());
}

#[test]
fn host_alone_becomes_the_authority_and_is_not_forwarded() {
    let list = h(&[
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/"),
        ("host", "Example.com"),
    ]);
    let head = validate_request(&list).unwrap();
    assert_eq!(head.authority_str(), "Example.com");
    assert!(head.field("host").is_none());
    // Same host as :authority (case aside) is fine and dropped too.
    let head = validate_request(&with(&[("host", "EXAMPLE.com")])).unwrap();
    assert!(head.field("host").is_none());
}

#[test]
fn a_request_without_authority_or_host_and_other_schemes_are_refused() {
    // RFC 9114 §4.3.1: an https request names its authority; nothing is made up for it.
    let list = h(&[(":method", "GET"), (":scheme", "https"), (":path", "/")]);
    assert_eq!(
        validate_request(&list).unwrap_err(),
        RequestError::MissingAuthority
    );
    for scheme in ["http", "ftp", "HTTPS"] {
        let list = h(&[
            (":method", "GET"),
            (":scheme", scheme),
            (":authority", "example.com"),
            (":path", "/"),
        ]);
        assert_eq!(
            validate_request(&list).unwrap_err(),
            RequestError::UnsupportedScheme(scheme.to_owned()),
            "{scheme}"
        );
    }
}

fn hop(mode: ForwardedMode) -> Hop {
    Hop {
        client_ip: "192.0.2.7".parse().unwrap(),
        mode,
        via: Some("3"),
    }
}

#[test]
fn h2_request_carries_authority_once_and_appends_hop_headers() {
    let head = validate_request(&with(&[
        ("cookie", "a=1"),
        ("cookie", "b=2"),
        ("x-forwarded-for", "198.51.100.1"),
        ("te", "trailers"),
    ]))
    .unwrap();
    let req = to_h2_request(&head, &hop(ForwardedMode::Append)).unwrap();
    assert_eq!(req.uri().to_string(), "https://example.com/a?b");
    assert!(req.headers().get("host").is_none());
    let cookies: Vec<_> = req.headers().get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(req.headers()["x-forwarded-for"], "198.51.100.1, 192.0.2.7");
    assert_eq!(
        req.headers()["forwarded"],
        "for=192.0.2.7;proto=https;host=\"example.com\""
    );
    assert_eq!(req.headers()["x-forwarded-proto"], "https");
    assert_eq!(req.headers()["x-forwarded-host"], "example.com");
    assert_eq!(req.headers()["via"], "3 spooky");
    assert_eq!(req.headers()["te"], "trailers");
    assert_eq!(req.headers().get_all("x-forwarded-for").iter().count(), 1);
}

#[test]
fn replace_and_off_modes() {
    let head = validate_request(&with(&[
        ("x-forwarded-for", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6"),
    ]))
    .unwrap();
    let req = to_h2_request(&head, &hop(ForwardedMode::Replace)).unwrap();
    assert_eq!(req.headers()["x-forwarded-for"], "192.0.2.7");
    assert_eq!(
        req.headers()["forwarded"],
        "for=192.0.2.7;proto=https;host=\"example.com\""
    );
    let req = to_h2_request(
        &head,
        &Hop {
            via: None,
            ..hop(ForwardedMode::Off)
        },
    )
    .unwrap();
    assert_eq!(req.headers()["x-forwarded-for"], "6.6.6.6");
    assert!(req.headers().get("x-forwarded-proto").is_none());
    assert!(req.headers().get("via").is_none());
}

#[test]
fn ipv6_clients_are_quoted_in_forwarded() {
    let head = validate_request(&with(&[])).unwrap();
    let hop = Hop {
        client_ip: "2001:db8::1".parse().unwrap(),
        mode: ForwardedMode::Append,
        via: None,
    };
    let req = to_h2_request(&head, &hop).unwrap();
    assert_eq!(
        req.headers()["forwarded"],
        "for=\"[2001:db8::1]\";proto=https;host=\"example.com\""
    );
}

#[test]
fn response_heads_drop_connection_specific_fields() {
    let mut map = HeaderMap::new();
    map.insert("content-type", HeaderValue::from_static("text/plain"));
    map.insert("connection", HeaderValue::from_static("close"));
    let out = response_to_h3(http::StatusCode::OK, &map);
    let names: Vec<_> = out
        .iter()
        .map(|h| String::from_utf8_lossy(h.name()).into_owned())
        .collect();
    assert_eq!(names, [":status", "content-type"]);
    assert_eq!(out[0].value(), b"200");
}

#[test]
fn backend_values_lose_surrounding_whitespace_on_the_way_to_the_client() {
    // Found by the response_head fuzz target: the h2 crate accepts " v\t", which HTTP/3
    // forbids and Spooky itself refuses in the client's trailers.
    let mut map = HeaderMap::new();
    map.insert("set-cookie", HeaderValue::from_static(" a=1\t"));
    map.insert("x-inner", HeaderValue::from_static("a \t b"));
    let out = response_to_h3(http::StatusCode::OK, &map);
    assert_eq!(out[1].value(), b"a=1");
    assert_eq!(out[2].value(), b"a \t b");
    let trailers = trailers_to_h3(&map);
    assert_eq!(trailers[0].value(), b"a=1");
    assert!(trailers_to_h2(&trailers).is_ok());
}

#[test]
fn trailers_reject_pseudo_headers() {
    assert!(trailers_to_h2(&h(&[("grpc-status", "0")])).is_ok());
    assert!(trailers_to_h2(&h(&[(":status", "200")])).is_err());
}
