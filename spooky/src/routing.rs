//! Request routing: which upstream pool takes a request, from its `:authority` and `:path`.
//!
//! [`RouteTable`] is built once per configuration (it is part of the immutable snapshot the
//! workers share) and answers [`RouteTable::lookup`] without locks, allocation (for lower-case
//! authorities) or work proportional to the number of routes.
//!
//! Rules, in order:
//! 1. Host tiers, most specific first: the exact host (ASCII case-insensitive, port stripped,
//!    `[v6]` literals unbracketed, one trailing dot ignored); then `*.suffix` wildcards, longest
//!    suffix first (`*.example.com` matches `a.example.com` and `a.b.example.com`, never
//!    `example.com`); then the routes without a host.
//! 2. Within a tier, the longest matching path prefix wins. Prefixes are segment-aware: `/api`
//!    matches `/api`, `/api/`, `/api/x` and `/api?q`, not `/apix`. A prefix ending in `/` matches
//!    any path that starts with it, and `/` matches every path. The query string (and a
//!    fragment, should one appear) is ignored; paths are compared byte for byte, case-sensitive
//!    and without percent-decoding.
//! 3. A tier with no matching prefix falls through to the next tier.
//!
//! What does not live here: request validation (the bridge), the 404 response for "no route",
//! and backend selection inside a pool ([`crate::lb`]).

use std::collections::HashMap;

use crate::config;

/// Why a route table could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Two upstreams claim the same (host, path prefix) pair.
    #[error(
        "upstreams #{first} and #{second} both route host {host} with path prefix {prefix:?}",
        host = host.as_deref().unwrap_or("(any)")
    )]
    Duplicate {
        host: Option<String>,
        prefix: String,
        first: usize,
        second: usize,
    },
    /// A route's host is empty or a malformed wildcard.
    #[error("upstream #{upstream}: invalid route host {host:?}")]
    InvalidHost { upstream: usize, host: String },
    /// A route's path prefix does not start with `/`.
    #[error("upstream #{upstream}: path prefix {prefix:?} must start with '/'")]
    InvalidPrefix { upstream: usize, prefix: String },
}

/// Longest host name we normalise on the stack (DNS names are at most 253 bytes).
const HOST_BUF: usize = 256;

/// The path prefixes of one host tier, each mapped to its upstream index.
#[derive(Debug, Default, Clone)]
struct PrefixSet {
    by_prefix: HashMap<String, usize>,
    /// Length of the longest prefix: longer candidates are not probed.
    max_len: usize,
}

impl PrefixSet {
    /// Adds a prefix; on a duplicate returns the upstream that already holds it.
    fn insert(&mut self, prefix: &str, upstream: usize) -> Result<(), usize> {
        if let Some(&first) = self.by_prefix.get(prefix) {
            return Err(first);
        }
        self.max_len = self.max_len.max(prefix.len());
        self.by_prefix.insert(prefix.to_owned(), upstream);
        Ok(())
    }

    /// The upstream of the longest prefix matching `path` (query already stripped).
    ///
    /// Candidates are the whole path and, for every `/` in it (right to left), the path up to
    /// and including that `/` (plain-prefix routes ending in `/`) and up to but excluding it
    /// (segment-aware routes). One hash probe per candidate no longer than the longest prefix.
    fn lookup(&self, path: &str) -> Option<usize> {
        let probe = |len: usize| -> Option<usize> {
            if len == 0 || len > self.max_len {
                return None;
            }
            path.get(..len).and_then(|p| self.by_prefix.get(p).copied())
        };
        if let Some(up) = probe(path.len()) {
            return Some(up);
        }
        for (i, _) in path.rmatch_indices('/') {
            if let Some(up) = probe(i + 1).or_else(|| probe(i)) {
                return Some(up);
            }
        }
        // `/` matches every path, also ones that do not start with `/` (such as `*`).
        self.by_prefix.get("/").copied()
    }
}

/// Routes requests to upstream indices. See the module documentation for the rules.
#[derive(Debug, Default, Clone)]
pub struct RouteTable {
    exact: HashMap<String, PrefixSet>,
    /// Keyed by the suffix after `*.` (`example.com` for `*.example.com`).
    wildcard: HashMap<String, PrefixSet>,
    any_host: PrefixSet,
}

impl RouteTable {
    /// Builds the table from `(upstream index, route)` pairs.
    ///
    /// Hosts are normalised like request authorities (lower case, port and one trailing dot
    /// dropped, IPv6 brackets removed), so `Example.COM.` and `example.com` are the same host.
    ///
    /// # Errors
    /// [`RouteError::Duplicate`] when two routes have the same host and prefix (naming both
    /// upstream indices), [`RouteError::InvalidHost`] for an empty host or a wildcard that is
    /// not `*.suffix`, [`RouteError::InvalidPrefix`] for a prefix not starting with `/`.
    pub fn new(routes: &[(usize, &config::Route)]) -> Result<RouteTable, RouteError> {
        let mut table = RouteTable::default();
        for &(upstream, route) in routes {
            let prefix = route.path_prefix.as_str();
            if !prefix.starts_with('/') {
                return Err(RouteError::InvalidPrefix {
                    upstream,
                    prefix: prefix.to_owned(),
                });
            }
            let (set, host_key) = match route.host.as_deref() {
                None => (&mut table.any_host, None),
                Some(host) => {
                    let invalid = || RouteError::InvalidHost {
                        upstream,
                        host: host.to_owned(),
                    };
                    if let Some(suffix) = host.strip_prefix("*.") {
                        let key = normalize_owned(suffix).ok_or_else(invalid)?;
                        if key.contains('*') {
                            return Err(invalid());
                        }
                        let shown = format!("*.{key}");
                        (table.wildcard.entry(key).or_default(), Some(shown))
                    } else {
                        let key = normalize_owned(host).ok_or_else(invalid)?;
                        if key.contains('*') {
                            return Err(invalid());
                        }
                        (table.exact.entry(key.clone()).or_default(), Some(key))
                    }
                }
            };
            set.insert(prefix, upstream)
                .map_err(|first| RouteError::Duplicate {
                    host: host_key,
                    prefix: prefix.to_owned(),
                    first,
                    second: upstream,
                })?;
        }
        Ok(table)
    }

    /// The upstream index for a request, or `None` (answer 404).
    ///
    /// `authority` is the `:authority` pseudo-header (or `host`), as sent; `path` is `:path`
    /// including any query string. Allocates only for an authority that is not already lower
    /// case and longer than 256 bytes.
    pub fn lookup(&self, authority: Option<&str>, path: &str) -> Option<usize> {
        let path = strip_query(path);
        if let Some(host) = authority.and_then(host_of) {
            let mut buf = [0u8; HOST_BUF];
            let owned;
            let host: &str = if !host.bytes().any(|b| b.is_ascii_uppercase()) {
                host
            } else if let Some(dst) = buf.get_mut(..host.len()) {
                for (d, s) in dst.iter_mut().zip(host.bytes()) {
                    *d = s.to_ascii_lowercase();
                }
                // ASCII lower-casing keeps UTF-8 valid; the error arm is unreachable.
                std::str::from_utf8(dst).ok()?
            } else {
                owned = host.to_ascii_lowercase();
                &owned
            };
            if let Some(up) = self.lookup_host(host, path) {
                return Some(up);
            }
        }
        self.any_host.lookup(path)
    }

    /// Exact then wildcard tiers for a normalised host.
    fn lookup_host(&self, host: &str, path: &str) -> Option<usize> {
        if let Some(up) = self.exact.get(host).and_then(|set| set.lookup(path)) {
            return Some(up);
        }
        if self.wildcard.is_empty() {
            return None;
        }
        // Suffixes after each dot, longest first; the label before the dot must be non-empty.
        host.char_indices()
            .filter(|&(i, c)| c == '.' && i > 0)
            .filter_map(|(i, _)| host.get(i + 1..))
            .filter(|suffix| !suffix.is_empty())
            .find_map(|suffix| self.wildcard.get(suffix).and_then(|set| set.lookup(path)))
    }

    /// Whether no route at all is configured.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty() && self.any_host.by_prefix.is_empty()
    }
}

/// `path` without its query string (and fragment).
fn strip_query(path: &str) -> &str {
    match path.find(['?', '#']) {
        Some(i) => path.get(..i).unwrap_or(path),
        None => path,
    }
}

/// The host part of an authority: userinfo and port dropped, IPv6 brackets removed, one
/// trailing dot dropped. `None` when nothing is left. Case is left alone.
fn host_of(authority: &str) -> Option<&str> {
    let a = match authority.rfind('@') {
        Some(i) => authority.get(i + 1..)?,
        None => authority,
    };
    let host = if let Some(rest) = a.strip_prefix('[') {
        // `[v6]` or `[v6]:port`.
        rest.split_once(']').map_or(rest, |(inner, _)| inner)
    } else {
        match a.rsplit_once(':') {
            // A bare IPv6 literal (more than one colon) is taken whole.
            Some((h, _)) if !h.contains(':') => h,
            _ => a,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

/// Normalised (lower-cased) host of a configured route.
fn normalize_owned(host: &str) -> Option<String> {
    host_of(host).map(str::to_ascii_lowercase)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, prefix: &str) -> config::Route {
        config::Route {
            host: host.map(str::to_owned),
            path_prefix: prefix.to_owned(),
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
    const NO_CATCH_ALL: &[(Option<&str>, &str)] =
        &[(Some("example.com"), "/a"), (Some("*.com"), "/b")];

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
}
