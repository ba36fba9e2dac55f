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
pub fn host_of(authority: &str) -> Option<&str> {
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
mod tests;
