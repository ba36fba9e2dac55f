//! Load balancing inside one upstream pool: which backend takes a request.
//!
//! A [`Balancer`] is owned by one worker for one upstream (no sharing, no locks). It sees the
//! pool as indices into the weights it was built with, plus per-request [`Candidates`] (health
//! and in-flight counts, indexed the same way) and a request hash (from [`request_hash`]). It
//! only ever picks healthy backends and returns `None` when there is none.
//!
//! Strategies ([`config::LoadBalancing`]):
//! - `Random`: weighted random.
//! - `RoundRobin`: smooth weighted round-robin (nginx): every pick adds each healthy backend's
//!   weight to its running score, takes the highest score and subtracts the healthy total.
//! - `ConsistentHash`: a ring of `replicas × weight` points per backend (scaled down together
//!   past [`MAX_RING_POINTS`]), placed by a stable hash
//!   of (backend id, replica number); a request goes to the first point at or after its hash,
//!   walking on past unhealthy backends. The ring depends only on ids and weights, so every
//!   worker (and every process) maps a key to the same backend.
//! - `LeastRequest`: power of two choices, weighted: two distinct healthy backends drawn by
//!   weight; the one with fewer in-flight requests per unit of weight wins.
//!
//! Weight 0 backends are never picked (drained). Randomness comes from a per-balancer
//! splitmix64 generator seeded by the caller (give each worker a different seed).
//!
//! What does not live here: health state ([`crate::health`]), `fail_open` (the caller retries
//! with everything marked healthy), counting in-flight requests (the worker does).

use std::net::IpAddr;

use crate::config;

/// Most points on one consistent-hash ring (12 bytes each). When `Σ replicas × weight` is
/// larger, every backend's share is scaled down in proportion (at least one point each), which
/// keeps the weights and keeps every worker's ring identical.
pub const MAX_RING_POINTS: u64 = 1 << 16;

/// Per-request view of the pool, indexed like the balancer's weights. Missing entries count
/// as unhealthy / zero in flight.
#[derive(Clone, Copy, Debug)]
pub struct Candidates<'a> {
    pub healthy: &'a [bool],
    pub in_flight: &'a [u32],
}

impl Candidates<'_> {
    fn healthy(&self, i: usize) -> bool {
        self.healthy.get(i).copied().unwrap_or(false)
    }

    fn in_flight(&self, i: usize) -> u32 {
        self.in_flight.get(i).copied().unwrap_or(0)
    }
}

/// splitmix64: tiny, fast, good enough for load balancing (not for secrets).
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (multiply-shift; bias ≤ n / 2^64). `n` must be non-zero.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// The splitmix64 / murmur3 finaliser: a bijection that spreads every input bit.
const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Streaming FNV-1a 64, finished with [`mix64`] so that similar inputs land far apart.
/// Stable across processes, versions and platforms (unlike std's `RandomState`).
#[derive(Clone, Copy, Debug)]
struct StableHasher(u64);

impl StableHasher {
    const fn new() -> Self {
        StableHasher(FNV_OFFSET)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
    }

    const fn finish(self) -> u64 {
        mix64(self.0)
    }
}

/// Stable 64-bit hash of `bytes` (FNV-1a 64 + splitmix64 finaliser).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = StableHasher::new();
    h.write(bytes);
    h.finish()
}

/// The hash a consistent-hash pool places a request by.
///
/// - `ClientIp`: the client address (IPv4-mapped IPv6 hashed as the IPv4 address).
/// - `Header(name)`: the header's values, hashed as if joined with `", "` (the HTTP meaning of
///   repeated fields).
/// - `Cookie(name)`: the value of the first `name=` pair in the `cookie` field(s).
/// - `Path`: the `:path` as sent, query included.
///
/// A missing header or cookie falls back to the client address. `header(name)` returns the
/// values of the field `name` (lower case): an `Option<&[u8]>` for a single value, or any
/// iterator of values when the field may repeat (HTTP/3 splits `cookie` into several fields);
/// the iterator may borrow `name`, which lives as long as `key`.
pub fn request_hash<'k, 'h, I>(
    key: &'k config::HashKey,
    client_ip: IpAddr,
    path: &str,
    header: impl Fn(&'k str) -> I,
) -> u64
where
    I: IntoIterator<Item = &'h [u8]>,
{
    let mut h = StableHasher::new();
    let found = match key {
        config::HashKey::ClientIp => false,
        config::HashKey::Path => {
            h.write(path.as_bytes());
            true
        }
        config::HashKey::Header(name) => {
            let mut any = false;
            for value in header(name) {
                if any {
                    h.write(b", ");
                }
                h.write(value);
                any = true;
            }
            any
        }
        config::HashKey::Cookie(name) => match header("cookie")
            .into_iter()
            .find_map(|field| cookie_value(field, name.as_bytes()))
        {
            Some(value) => {
                h.write(value);
                true
            }
            None => false,
        },
    };
    if !found {
        h = StableHasher::new();
        match client_ip.to_canonical() {
            IpAddr::V4(v4) => h.write(&v4.octets()),
            IpAddr::V6(v6) => h.write(&v6.octets()),
        }
    }
    h.finish()
}

/// The value of cookie `name` in one `cookie` field (`a=1; b=2`), if present.
fn cookie_value<'v>(field: &'v [u8], name: &[u8]) -> Option<&'v [u8]> {
    field.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        let (n, v) = pair.split_at(eq);
        (n.trim_ascii() == name).then(|| v.get(1..).unwrap_or_default().trim_ascii())
    })
}

#[derive(Clone, Debug)]
enum Strategy {
    Random,
    RoundRobin {
        /// Running scores of smooth weighted round-robin.
        current: Vec<i64>,
    },
    ConsistentHash {
        /// Ring points, sorted.
        points: Vec<u64>,
        /// Owner (backend index) of the point at the same position.
        owners: Vec<u32>,
    },
    LeastRequest,
}

/// Backend selection for one upstream on one worker. See the module documentation.
#[derive(Clone, Debug)]
pub struct Balancer {
    weights: Vec<u32>,
    strategy: Strategy,
    rng: SplitMix64,
}

impl Balancer {
    /// A balancer over backends with `weights`; consistent-hash rings use the backend indices
    /// as ids (use [`Balancer::with_ids`] so a ring survives backends being added or removed).
    pub fn new(lb: &config::LoadBalancing, weights: &[u32], seed: u64) -> Balancer {
        let by_index = |i: usize, h: &mut StableHasher| h.write(&(i as u64).to_le_bytes());
        Self::build(lb, weights, &by_index, seed)
    }

    /// A balancer whose consistent-hash ring places each backend by its id (`ids` indexed like
    /// `weights`; a missing id falls back to the index). `seed` does not affect the ring.
    pub fn with_ids(
        lb: &config::LoadBalancing,
        weights: &[u32],
        ids: &[&str],
        seed: u64,
    ) -> Balancer {
        let id_of = |i: usize, h: &mut StableHasher| match ids.get(i) {
            Some(id) => h.write(id.as_bytes()),
            None => h.write(&(i as u64).to_le_bytes()),
        };
        Self::build(lb, weights, &id_of, seed)
    }

    fn build(
        lb: &config::LoadBalancing,
        weights: &[u32],
        id_of: &dyn Fn(usize, &mut StableHasher),
        seed: u64,
    ) -> Balancer {
        let strategy = match lb {
            config::LoadBalancing::Random => Strategy::Random,
            config::LoadBalancing::LeastRequest => Strategy::LeastRequest,
            config::LoadBalancing::RoundRobin => Strategy::RoundRobin {
                current: vec![0; weights.len()],
            },
            config::LoadBalancing::ConsistentHash { replicas, .. } => {
                let (points, owners) = build_ring(weights, *replicas, id_of);
                Strategy::ConsistentHash { points, owners }
            }
        };
        Balancer {
            weights: weights.to_vec(),
            strategy,
            rng: SplitMix64(seed),
        }
    }

    /// Number of backends this balancer was built for.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Whether the pool has no backends.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Picks a healthy backend index, or `None` when no backend with a non-zero weight is
    /// healthy. `request_hash` matters only to consistent hashing.
    pub fn pick(&mut self, candidates: &Candidates<'_>, request_hash: u64) -> Option<usize> {
        match &mut self.strategy {
            Strategy::Random => weighted_random(&self.weights, candidates, None, &mut self.rng),
            Strategy::RoundRobin { current } => smooth_wrr(&self.weights, current, candidates),
            Strategy::ConsistentHash { points, owners } => {
                ring_lookup(points, owners, candidates, request_hash)
            }
            Strategy::LeastRequest => {
                let first = weighted_random(&self.weights, candidates, None, &mut self.rng)?;
                let Some(second) =
                    weighted_random(&self.weights, candidates, Some(first), &mut self.rng)
                else {
                    return Some(first);
                };
                // Compare in_flight/weight without division: a/wa <= b/wb ⇔ a·wb <= b·wa.
                let load = |i: usize, other: usize| {
                    u64::from(candidates.in_flight(i)) * u64::from(weight(&self.weights, other))
                };
                if load(second, first) < load(first, second) {
                    Some(second)
                } else {
                    Some(first)
                }
            }
        }
    }
}

fn weight(weights: &[u32], i: usize) -> u32 {
    weights.get(i).copied().unwrap_or(0)
}

/// Healthy, non-zero weights with their indices.
fn eligible<'w>(
    weights: &'w [u32],
    candidates: &'w Candidates<'_>,
    exclude: Option<usize>,
) -> impl Iterator<Item = (usize, u32)> + 'w {
    weights
        .iter()
        .enumerate()
        .filter(move |&(i, &w)| w > 0 && candidates.healthy(i) && Some(i) != exclude)
        .map(|(i, &w)| (i, w))
}

fn weighted_random(
    weights: &[u32],
    candidates: &Candidates<'_>,
    exclude: Option<usize>,
    rng: &mut SplitMix64,
) -> Option<usize> {
    let total: u64 = eligible(weights, candidates, exclude)
        .map(|(_, w)| u64::from(w))
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = rng.below(total);
    for (i, w) in eligible(weights, candidates, exclude) {
        let w = u64::from(w);
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

fn smooth_wrr(weights: &[u32], current: &mut [i64], candidates: &Candidates<'_>) -> Option<usize> {
    let mut total: i64 = 0;
    let mut best: Option<(usize, i64)> = None;
    for (i, w) in eligible(weights, candidates, None) {
        let Some(score) = current.get_mut(i) else {
            continue;
        };
        let w = i64::from(w);
        *score += w;
        total += w;
        if best.is_none_or(|(_, b)| *score > b) {
            best = Some((i, *score));
        }
    }
    let (i, _) = best?;
    if let Some(score) = current.get_mut(i) {
        *score -= total;
    }
    Some(i)
}

/// The sorted points of a consistent-hash ring and, position for position, their owners.
fn build_ring(
    weights: &[u32],
    replicas: u32,
    id_of: &dyn Fn(usize, &mut StableHasher),
) -> (Vec<u64>, Vec<u32>) {
    let wanted = |w: u32| u128::from(replicas) * u128::from(w);
    let total: u128 = weights.iter().map(|&w| wanted(w)).sum();
    let cap = u128::from(MAX_RING_POINTS);
    let mut ring: Vec<(u64, u32)> = Vec::new();
    for (i, &w) in weights.iter().enumerate() {
        let Ok(index) = u32::try_from(i) else { break };
        let want = wanted(w);
        let count = if want == 0 {
            0
        } else if total <= cap {
            want
        } else {
            (want * cap / total).max(1)
        };
        let mut base = StableHasher::new();
        id_of(i, &mut base);
        base.write(&[0xff]); // separates the id from the replica number
        for r in 0..u64::try_from(count).unwrap_or(0) {
            let mut h = base;
            h.write(&r.to_le_bytes());
            ring.push((h.finish(), index));
        }
    }
    ring.sort_unstable();
    ring.into_iter().unzip()
}

fn ring_lookup(
    points: &[u64],
    owners: &[u32],
    candidates: &Candidates<'_>,
    hash: u64,
) -> Option<usize> {
    let start = points.partition_point(|&point| point < hash);
    let (after, before) = (owners.get(start..)?, owners.get(..start)?);
    after
        .iter()
        .chain(before)
        .map(|&b| b as usize)
        .find(|&b| candidates.healthy(b))
}

#[cfg(test)]
mod tests;
