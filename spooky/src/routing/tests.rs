use super::*;

fn route(host: Option<&str>, prefix: &str) -> config::Route {
    config::Route {
        host: host.map(str::to_owned),
        path_prefix: prefix.to_owned(),
        rewrite_prefix: None,
    }
}

fn table(routes: &[(Option<&str>, &str)]) -> RouteTable {
    let owned: Vec<config::Route> = routes.iter().map(|(h, p)| route(*h, p)).collect();
    let pairs: Vec<(usize, &config::Route)> = owned.iter().enumerate().collect();
    RouteTable::new(&pairs).unwrap()
}

/// (routes, authority, path, expected upstream index = position in `routes`).
type Case = (
    &'static [(Option<&'static str>, &'static str)],
    Option<&'static str>,
    &'static str,
    Option<usize>,
);

const SEGMENTS: &[(Option<&str>, &str)] = &[(None, "/api"), (None, "/api/v2/"), (None, "/")];
const HOSTS: &[(Option<&str>, &str)] = &[
    (Some("example.com"), "/"),
    (Some("*.example.com"), "/"),
    (Some("*.b.example.com"), "/"),
    (None, "/"),
    (Some("::1"), "/"),
    (Some("10.0.0.1"), "/"),
];
const FALLBACK: &[(Option<&str>, &str)] = &[
    (Some("*.example.com"), "/api"),
    (None, "/"),
    (Some("shop.example.com"), "/cart"),
    (None, "/static/"),
];
const NO_CATCH_ALL: &[(Option<&str>, &str)] = &[(Some("example.com"), "/a"), (Some("*.com"), "/b")];

const CASES: &[Case] = &[
    // Segment-aware prefixes.
    (SEGMENTS, None, "/api", Some(0)),
    (SEGMENTS, None, "/api/", Some(0)),
    (SEGMENTS, None, "/api/x", Some(0)),
    (SEGMENTS, None, "/api?q=1", Some(0)),
    (SEGMENTS, None, "/api#frag", Some(0)),
    (SEGMENTS, None, "/apix", Some(2)),
    (SEGMENTS, None, "/ap", Some(2)),
    (SEGMENTS, None, "/", Some(2)),
    (SEGMENTS, None, "*", Some(2)),
    (SEGMENTS, None, "", Some(2)),
    (SEGMENTS, None, "/API", Some(2)),
    // A prefix ending in `/` matches by plain prefix, and only that.
    (SEGMENTS, None, "/api/v2/", Some(1)),
    (SEGMENTS, None, "/api/v2/users", Some(1)),
    (SEGMENTS, None, "/api/v2/users/7?x", Some(1)),
    (SEGMENTS, None, "/api/v2", Some(0)),
    (SEGMENTS, None, "/api/v2x", Some(0)),
    (SEGMENTS, None, "/api//v2/", Some(0)),
    // Any authority reaches host-less routes.
    (SEGMENTS, Some("whatever.test"), "/api/x", Some(0)),
    // Exact host: case, port, trailing dot, IPv6 literal.
    (HOSTS, Some("example.com"), "/", Some(0)),
    (HOSTS, Some("EXAMPLE.com"), "/", Some(0)),
    (HOSTS, Some("example.com:443"), "/", Some(0)),
    (HOSTS, Some("Example.Com.:8443"), "/", Some(0)),
    (HOSTS, Some("example.com."), "/", Some(0)),
    (HOSTS, Some("user@example.com"), "/", Some(0)),
    (HOSTS, Some("[::1]:443"), "/", Some(4)),
    (HOSTS, Some("[::1]"), "/", Some(4)),
    (HOSTS, Some("::1"), "/", Some(4)),
    (HOSTS, Some("10.0.0.1:4433"), "/", Some(5)),
    // Wildcards: one or more labels, longest suffix wins, never the bare suffix.
    (HOSTS, Some("a.example.com"), "/", Some(1)),
    (HOSTS, Some("a.b.example.com"), "/", Some(2)),
    (HOSTS, Some("x.a.b.example.com"), "/", Some(2)),
    (HOSTS, Some("b.example.com"), "/", Some(1)),
    (HOSTS, Some("A.B.Example.COM:443"), "/", Some(2)),
    (HOSTS, Some(".example.com"), "/", Some(3)),
    (HOSTS, Some("notexample.com"), "/", Some(3)),
    (HOSTS, Some("example.org"), "/", Some(3)),
    (HOSTS, Some(""), "/", Some(3)),
    (HOSTS, Some(":443"), "/", Some(3)),
    (HOSTS, None, "/", Some(3)),
    // A tier with no matching prefix falls through to the next one.
    (FALLBACK, Some("a.example.com"), "/api/x", Some(0)),
    (FALLBACK, Some("a.example.com"), "/other", Some(1)),
    (FALLBACK, Some("shop.example.com"), "/cart/1", Some(2)),
    (FALLBACK, Some("shop.example.com"), "/api", Some(0)),
    (
        FALLBACK,
        Some("shop.example.com"),
        "/static/app.js",
        Some(3),
    ),
    (FALLBACK, Some("shop.example.com"), "/x", Some(1)),
    (FALLBACK, Some("example.com"), "/api", Some(1)),
    // No route at all.
    (NO_CATCH_ALL, Some("example.com"), "/a/b", Some(0)),
    (NO_CATCH_ALL, Some("example.com"), "/b", Some(1)),
    (NO_CATCH_ALL, Some("x.com"), "/b", Some(1)),
    (NO_CATCH_ALL, Some("x.com"), "/a", None),
    (NO_CATCH_ALL, Some("example.org"), "/a", None),
    (NO_CATCH_ALL, None, "/a", None),
];

#[test]
fn table_of_cases() {
    for (i, &(routes, authority, path, expected)) in CASES.iter().enumerate() {
        let t = table(routes);
        assert_eq!(
            t.lookup(authority, path),
            expected,
            "case {i}: authority {authority:?} path {path:?}"
        );
    }
}

#[test]
fn duplicate_pairs_name_both_upstreams() {
    let a = route(Some("Example.com"), "/api");
    let b = route(Some("example.com."), "/x");
    let c = route(Some("example.com:443"), "/api");
    let err = RouteTable::new(&[(3, &a), (5, &b), (7, &c)]).unwrap_err();
    assert_eq!(
        err,
        RouteError::Duplicate {
            host: Some("example.com".into()),
            prefix: "/api".into(),
            first: 3,
            second: 7,
        }
    );
    assert!(err.to_string().contains("#3") && err.to_string().contains("#7"));

    let w1 = route(Some("*.example.com"), "/");
    let w2 = route(Some("*.EXAMPLE.com"), "/");
    let err = RouteTable::new(&[(0, &w1), (1, &w2)]).unwrap_err();
    assert!(matches!(
        err,
        RouteError::Duplicate {
            first: 0,
            second: 1,
            ..
        }
    ));

    let n1 = route(None, "/");
    let n2 = route(None, "/");
    let err = RouteTable::new(&[(1, &n1), (2, &n2)]).unwrap_err();
    assert!(matches!(
        err,
        RouteError::Duplicate {
            host: None,
            first: 1,
            second: 2,
            ..
        }
    ));

    // Same prefix on different host tiers is fine.
    assert!(RouteTable::new(&[(0, &a), (1, &w1), (2, &n1)]).is_ok());
}

#[test]
fn invalid_routes_are_rejected() {
    for host in ["", "*", "*.", "a.*.com", "*.*.com", ":80"] {
        let r = route(Some(host), "/");
        assert!(
            matches!(
                RouteTable::new(&[(4, &r)]),
                Err(RouteError::InvalidHost { upstream: 4, .. })
            ),
            "{host:?}"
        );
    }
    let r = route(None, "api");
    assert!(matches!(
        RouteTable::new(&[(2, &r)]),
        Err(RouteError::InvalidPrefix { upstream: 2, .. })
    ));
}

#[test]
fn empty_table_routes_nothing() {
    let t = RouteTable::new(&[]).unwrap();
    assert!(t.is_empty());
    assert_eq!(t.lookup(Some("example.com"), "/"), None);
}

#[test]
fn long_mixed_case_authority_is_lowercased() {
    let long = format!("{}.example.com", "a".repeat(300));
    let t = table(&[(Some("*.example.com"), "/")]);
    assert_eq!(t.lookup(Some(&long.to_uppercase()), "/"), Some(0));
    assert_eq!(t.lookup(Some(&long), "/"), Some(0));
}

/// Property: against a brute-force reference over random routes and requests.
#[test]
fn matches_brute_force_reference() {
    let mut seed = 0x5eed_u64;
    let mut next = move || {
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let hosts = [
        None,
        Some("a.com"),
        Some("*.a.com"),
        Some("*.b.a.com"),
        Some("x.b.a.com"),
    ];
    let segs = ["a", "ab", "b", ""];
    let mut pick = |n: usize| (next() % n as u64) as usize;
    for _ in 0..200 {
        let mut routes: Vec<config::Route> = Vec::new();
        for _ in 0..8 {
            let mut p = String::new();
            for _ in 0..pick(3) {
                p.push('/');
                p.push_str(segs[pick(segs.len())]);
            }
            if p.is_empty() || pick(3) == 0 {
                p.push('/');
            }
            let r = route(hosts[pick(hosts.len())], &p);
            if !routes.contains(&r) {
                routes.push(r);
            }
        }
        let pairs: Vec<(usize, &config::Route)> = routes.iter().enumerate().collect();
        let t = RouteTable::new(&pairs).unwrap();
        for _ in 0..50 {
            let mut path = String::new();
            for _ in 0..pick(4) {
                path.push('/');
                path.push_str(segs[pick(segs.len())]);
            }
            if path.is_empty() {
                path.push('/');
            }
            let host = [
                "a.com",
                "q.a.com",
                "b.a.com",
                "x.b.a.com",
                "y.x.b.a.com",
                "c.com",
            ][pick(6)];
            assert_eq!(
                t.lookup(Some(host), &path),
                reference(&routes, host, &path),
                "{host} {path} {routes:?}"
            );
        }
    }
}

/// The rules, written as directly (and slowly) as possible.
fn reference(routes: &[config::Route], host: &str, path: &str) -> Option<usize> {
    let prefix_matches = |p: &str| {
        p == "/"
            || if p.ends_with('/') {
                path.starts_with(p)
            } else {
                path == p || path.starts_with(&format!("{p}/"))
            }
    };
    let host_rank = |h: &Option<String>| -> Option<usize> {
        match h.as_deref() {
            None => Some(0),
            Some(h) => match h.strip_prefix("*.") {
                Some(s) => host.ends_with(&format!(".{s}")).then(|| 1 + s.len()),
                None => (h == host).then_some(usize::MAX),
            },
        }
    };
    let mut tiers: Vec<usize> = routes.iter().filter_map(|r| host_rank(&r.host)).collect();
    tiers.sort_unstable_by(|a, b| b.cmp(a));
    tiers.dedup();
    tiers.into_iter().find_map(|tier| {
        routes
            .iter()
            .enumerate()
            .filter(|(_, r)| host_rank(&r.host) == Some(tier) && prefix_matches(&r.path_prefix))
            .max_by_key(|(_, r)| r.path_prefix.len())
            .map(|(i, _)| i)
    })
}
