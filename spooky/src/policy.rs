//! Edge policy shared by every worker of the process: per-route rate limits, per-route access
//! lists, and the TCP listener's per-address connection limits.
//!
//! Rate limits are GCRA (the generic cell rate algorithm: one "theoretical arrival time" per
//! key, no timer, no refill task) over a fixed table of atomic slots. A key (a client address,
//! its /24 or /64, a header's value, or nothing for one global limit) is hashed with a random
//! per-process key into a slot, so memory is the table's whatever the number of clients, and
//! nobody can aim two keys at one slot on purpose. Two keys that meet in a slot share its
//! budget (stricter for both, never looser). Concurrent-connection counts use the same kind of
//! table.
//!
//! Sans-IO: every decision takes `now` (nanoseconds since [`Policy`]'s epoch); the tables are
//! lock-free (compare-and-swap), so workers never wait on each other.

use crate::config::{Access, RateKey, RateLimit};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Slots of a keyed table (a power of two): 512 KiB for a rate table.
pub const SLOTS: usize = 1 << 16;

/// One rate: `burst` requests at once, then one per `interval`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// Nanoseconds between two requests at the sustained rate.
    interval: u64,
    /// How far ahead of now a key's arrival time may run: `(burst - 1) × interval`.
    tolerance: u64,
}

impl Gcra {
    /// `per_second` sustained (> 0), `burst` at once (≥ 1).
    pub fn new(per_second: f64, burst: u32) -> Self {
        let interval = (1e9 / per_second.max(1e-9))
            .round()
            .clamp(1.0, u64::MAX as f64) as u64;
        Self {
            interval,
            tolerance: interval.saturating_mul(u64::from(burst.max(1)) - 1),
        }
    }

    /// The decision for a key whose arrival time is `tat`, at `now`: the new arrival time
    /// when the request may go, or how long until one may.
    pub fn decide(&self, tat: u64, now: u64) -> Result<u64, Duration> {
        let tat = tat.max(now);
        let ahead = tat - now;
        if ahead > self.tolerance {
            Err(Duration::from_nanos(ahead - self.tolerance))
        } else {
            Ok(tat.saturating_add(self.interval))
        }
    }
}

/// A GCRA per slot.
pub struct RateTable {
    gcra: Gcra,
    slots: Box<[AtomicU64]>,
}

impl RateTable {
    /// A table of `slots` (a power of two; 1 for a global limit).
    pub fn new(gcra: Gcra, slots: usize) -> Self {
        Self {
            gcra,
            slots: (0..slots.next_power_of_two())
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// Counts a request of the key hashing to `hash` at `now`: `Err(retry_after)` when over
    /// its rate.
    pub fn check(&self, hash: u64, now: u64) -> Result<(), Duration> {
        let mask = self.slots.len() - 1;
        let Some(slot) = self.slots.get(hash as usize & mask) else {
            return Ok(());
        };
        let mut tat = slot.load(Ordering::Relaxed);
        loop {
            let next = self.gcra.decide(tat, now)?;
            match slot.compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }
}

/// A route's rate limit in force: its settings (to keep its state over a reload that does not
/// change them) and its table.
pub struct RouteLimiter {
    pub limit: RateLimit,
    pub table: RateTable,
}

/// Concurrent counts per slot (the TCP listener's connections per client address).
pub struct CountTable {
    slots: Box<[AtomicU32]>,
}

impl CountTable {
    pub fn new(slots: usize) -> Self {
        Self {
            slots: (0..slots.next_power_of_two())
                .map(|_| AtomicU32::new(0))
                .collect(),
        }
    }

    fn slot(&self, hash: u64) -> Option<&AtomicU32> {
        self.slots.get(hash as usize & (self.slots.len() - 1))
    }

    /// Takes one of `max` places of the slot of `hash`; false when all are taken.
    pub fn acquire(&self, hash: u64, max: u32) -> bool {
        self.slot(hash).is_some_and(|s| {
            s.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
        })
    }

    /// Gives back a place taken by [`acquire`](Self::acquire).
    pub fn release(&self, hash: u64) {
        if let Some(s) = self.slot(hash) {
            let _ = s.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }
}

/// The process's policy state.
pub struct Policy {
    epoch: Instant,
    hasher: std::collections::hash_map::RandomState,
    routes: Mutex<HashMap<String, Arc<RouteLimiter>>>,
    /// TCP connections open per client address (IPv4, or IPv6 /64).
    pub tcp_open: CountTable,
    tcp_rate: Mutex<Option<Arc<RateTable>>>,
    /// The host is drained (admin `POST /drain`): no new connection, QUIC or TCP; open ones
    /// go on. For taking a fleet member out of service without a restart.
    drained: std::sync::atomic::AtomicBool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            hasher: Default::default(),
            routes: Mutex::default(),
            tcp_open: CountTable::new(SLOTS),
            tcp_rate: Mutex::default(),
            drained: Default::default(),
        }
    }
}

impl Policy {
    /// Whether new connections are refused (the host is drained).
    pub fn drained(&self) -> bool {
        self.drained.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Drains the host (`true`) or takes it back into service; returns what it was.
    pub fn set_drained(&self, drained: bool) -> bool {
        self.drained
            .swap(drained, std::sync::atomic::Ordering::Relaxed)
    }
}

impl Policy {
    /// Nanoseconds since the epoch at `at`.
    pub fn now(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// The keyed hash of `value`.
    pub fn hash(&self, value: impl Hash) -> u64 {
        self.hasher.hash_one(value)
    }

    /// The hash of a client address as a per-address limit counts it: an IPv4 address, or an
    /// IPv6 address's /64 (one host usually holds a whole /64).
    pub fn address_hash(&self, ip: IpAddr) -> u64 {
        self.hash(prefix(ip, 32, 64))
    }

    /// The limiter of the route of pool `pool` with `limit`: the same one as before when the
    /// pool had the same limit (a reload keeps its state), else a fresh one. Every worker asks
    /// and gets the same table.
    pub fn route_limiter(&self, pool: &str, limit: &RateLimit) -> Arc<RouteLimiter> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = routes.get(pool).filter(|l| l.limit == *limit) {
            return l.clone();
        }
        let slots = if limit.key == RateKey::Global {
            1
        } else {
            SLOTS
        };
        let l = Arc::new(RouteLimiter {
            limit: limit.clone(),
            table: RateTable::new(Gcra::new(limit.per_second, limit.burst), slots),
        });
        routes.insert(pool.to_owned(), l.clone());
        l
    }

    /// Forgets the limiters of pools that are gone (after a reload).
    pub fn retain_routes(&self, pools: &[&str]) {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes.retain(|name, _| pools.contains(&name.as_str()));
    }

    /// The TCP listener's table of new connections per address for `rate` (per second,
    /// burst), kept while the rate does not change.
    pub fn tcp_rate(&self, rate: (f64, u32)) -> Arc<RateTable> {
        let gcra = Gcra::new(rate.0, rate.1);
        let mut slot = self.tcp_rate.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Some(t) if t.gcra == gcra => t.clone(),
            _ => {
                let t = Arc::new(RateTable::new(gcra, SLOTS));
                *slot = Some(t.clone());
                t
            }
        }
    }

    /// The hash of a request's rate-limit key: its client address (or the address's /24 or
    /// /64), a header's value (`header_value`; the address when the request has none), or
    /// one key for everyone.
    pub fn request_key(&self, key: &RateKey, client: IpAddr, header_value: Option<&[u8]>) -> u64 {
        match key {
            RateKey::Global => 0,
            RateKey::Client => self.hash(prefix(client, 32, 128)),
            RateKey::ClientPrefix => self.hash(prefix(client, 24, 64)),
            RateKey::Header(_) => match header_value {
                Some(v) => self.hash((1u8, v)),
                None => self.hash(prefix(client, 32, 128)),
            },
        }
    }
}

/// `ip` cut to its first `v4` bits (IPv4, or IPv4-mapped IPv6) or `v6` bits (IPv6).
pub fn prefix(ip: IpAddr, v4: u32, v6: u32) -> IpAddr {
    let ip = match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - v4.min(32)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - v6.min(128)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    }
}

impl Access {
    /// Whether `ip` may use the route: not in `deny`, and in `allow` when `allow` is set.
    pub fn permits(&self, ip: IpAddr) -> bool {
        !crate::config::in_any(&self.deny, ip)
            && (self.allow.is_empty() || crate::config::in_any(&self.allow, ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cidr;

    const S: u64 = 1_000_000_000;

    #[test]
    fn gcra_lets_a_burst_through_then_the_rate() {
        // 10 per second, burst 5.
        let g = Gcra::new(10.0, 5);
        let mut tat = 0;
        let now = 100 * S;
        for i in 0..5 {
            tat = g
                .decide(tat, now)
                .unwrap_or_else(|_| panic!("request {i} of the burst"));
        }
        let wait = g.decide(tat, now).expect_err("the 6th at once is over");
        assert_eq!(
            wait,
            Duration::from_millis(100),
            "one interval until the next"
        );
        assert!(
            g.decide(tat, now + S / 10 - 1).is_err(),
            "not a nanosecond early"
        );
        let tat = g.decide(tat, now + S / 10).expect("after one interval");
        assert!(g.decide(tat, now + S / 10).is_err());
        // After a long pause the burst is whole again, not more.
        let mut tat = tat;
        for _ in 0..5 {
            tat = g.decide(tat, now + 60 * S).expect("a fresh burst");
        }
        assert!(g.decide(tat, now + 60 * S).is_err());
    }

    #[test]
    fn gcra_holds_the_rate_over_time() {
        // 100/s with burst 1: in 10 s of requests every millisecond, about 1,000 pass.
        let g = Gcra::new(100.0, 1);
        let (mut tat, mut passed) = (0, 0);
        for ms in 0..10_000u64 {
            if let Ok(t) = g.decide(tat, ms * 1_000_000) {
                tat = t;
                passed += 1;
            }
        }
        assert_eq!(passed, 1000);
    }

    #[test]
    fn tables_keep_keys_apart_and_the_global_one_does_not() {
        let p = Policy::default();
        let limit = RateLimit {
            per_second: 1.0,
            burst: 2,
            key: RateKey::Client,
        };
        let l = p.route_limiter("api", &limit);
        let a = p.request_key(&limit.key, "192.0.2.1".parse().unwrap(), None);
        let b = p.request_key(&limit.key, "192.0.2.2".parse().unwrap(), None);
        assert_ne!(a, b);
        assert!(l.table.check(a, S).is_ok() && l.table.check(a, S).is_ok());
        assert!(l.table.check(a, S).is_err(), "a is over");
        assert!(l.table.check(b, S).is_ok(), "b has its own budget");
        // The same settings keep the table (a reload); other settings start afresh.
        assert!(Arc::ptr_eq(&l, &p.route_limiter("api", &limit)));
        let global = RateLimit {
            key: RateKey::Global,
            ..limit
        };
        let g = p.route_limiter("api", &global);
        assert!(!Arc::ptr_eq(&l, &g));
        let ga = p.request_key(&global.key, "192.0.2.1".parse().unwrap(), None);
        let gb = p.request_key(&global.key, "198.51.100.1".parse().unwrap(), None);
        assert!(g.table.check(ga, S).is_ok() && g.table.check(gb, S).is_ok());
        assert!(g.table.check(ga, S).is_err(), "one budget for everyone");
        p.retain_routes(&[]);
        assert!(!Arc::ptr_eq(&g, &p.route_limiter("api", &global)));
    }

    #[test]
    fn prefixes_and_header_keys() {
        let p = Policy::default();
        let key =
            |k: &RateKey, ip: &str, h: Option<&[u8]>| p.request_key(k, ip.parse().unwrap(), h);
        let pre = RateKey::ClientPrefix;
        assert_eq!(key(&pre, "192.0.2.1", None), key(&pre, "192.0.2.200", None));
        assert_ne!(key(&pre, "192.0.2.1", None), key(&pre, "192.0.3.1", None));
        assert_eq!(
            key(&pre, "192.0.2.1", None),
            key(&pre, "::ffff:192.0.2.9", None),
            "an IPv4-mapped address is its IPv4 one"
        );
        assert_eq!(
            key(&pre, "2001:db8:1:2::1", None),
            key(&pre, "2001:db8:1:2:ffff::9", None)
        );
        assert_ne!(
            key(&pre, "2001:db8:1:2::1", None),
            key(&pre, "2001:db8:1:3::1", None)
        );
        let client = RateKey::Client;
        assert_ne!(
            key(&client, "2001:db8::1", None),
            key(&client, "2001:db8::2", None)
        );
        let h = RateKey::Header(http::HeaderName::from_static("x-api-key"));
        assert_eq!(
            key(&h, "192.0.2.1", Some(b"k1")),
            key(&h, "198.51.100.7", Some(b"k1"))
        );
        assert_ne!(
            key(&h, "192.0.2.1", Some(b"k1")),
            key(&h, "192.0.2.1", Some(b"k2"))
        );
        assert_eq!(
            key(&h, "192.0.2.1", None),
            key(&client, "192.0.2.1", None),
            "no header: the address"
        );
    }

    #[test]
    fn count_table_holds_at_most_max_per_slot() {
        let t = CountTable::new(SLOTS);
        let p = Policy::default();
        let a = p.address_hash("192.0.2.1".parse().unwrap());
        assert!(t.acquire(a, 2) && t.acquire(a, 2));
        assert!(!t.acquire(a, 2));
        t.release(a);
        assert!(t.acquire(a, 2));
        let v6 = p.address_hash("2001:db8:0:1::1".parse().unwrap());
        assert_eq!(
            v6,
            p.address_hash("2001:db8:0:1::2".parse().unwrap()),
            "one /64"
        );
    }

    #[test]
    fn access_lists_deny_first_then_allow() {
        let c = |s: &str| Cidr::parse(s).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let open = Access::default();
        assert!(open.permits(ip("203.0.113.9")));
        let a = Access {
            allow: vec![c("10.0.0.0/8"), c("2001:db8::/32")],
            deny: vec![c("10.1.0.0/16")],
        };
        assert!(a.permits(ip("10.2.3.4")));
        assert!(!a.permits(ip("10.1.3.4")), "deny wins");
        assert!(!a.permits(ip("192.0.2.1")), "not allowed");
        assert!(a.permits(ip("2001:db8:5::1")));
        assert!(a.permits(ip("::ffff:10.2.3.4")), "IPv4-mapped");
        let deny_only = Access {
            allow: vec![],
            deny: vec![c("192.0.2.0/24")],
        };
        assert!(!deny_only.permits(ip("192.0.2.8")));
        assert!(deny_only.permits(ip("198.51.100.8")));
    }
}
