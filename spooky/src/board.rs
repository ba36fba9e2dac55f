//! The health board: the published health of every backend, for the whole process. One
//! [`BackendSlot`] of relaxed atomics per backend, written only by the health checker and
//! read by workers on the request path (one atomic load per candidate, never a lock).
//!
//! A slot belongs to a backend's identity ([`BackendKey`]: pool name, backend id, address),
//! not to a configuration: a reload that keeps a backend keeps its slot, so its health (an
//! ejection, say) stays in force without a gap, and requests still running on the previous
//! snapshot report to the same slot. A slot nobody references any more is forgotten.
//!
//! The process's other published set lives here too: which workers died ([`WorkerSet`],
//! shared as [`AtomicWorkerSet`]), for steering, `/readyz` and `/status`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Which backend a slot is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub pool: String,
    pub id: String,
    pub address: SocketAddr,
}

/// Published health of one backend.
#[derive(Debug)]
pub struct BackendSlot {
    pub key: BackendKey,
    pub available: AtomicBool,
    /// `health::HealthState::as_u32`.
    pub state: AtomicU32,
    pub consecutive_failures: AtomicU32,
    pub ewma_latency_us: AtomicU64,
    pub last_latency_us: AtomicU64,
    pub probes_ok: AtomicU64,
    pub probes_failed: AtomicU64,
    /// Drained by the operator (admin `POST /backends/POOL/ID/drain`): no new requests,
    /// whatever its health, until undrained. Health checks go on.
    pub drained: AtomicBool,
}

impl BackendSlot {
    /// Every backend starts available (the optimistic start of the health state machine).
    fn new(key: BackendKey) -> Self {
        Self {
            key,
            available: AtomicBool::new(true),
            state: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ewma_latency_us: AtomicU64::new(0),
            last_latency_us: AtomicU64::new(0),
            probes_ok: AtomicU64::new(0),
            probes_failed: AtomicU64::new(0),
            drained: AtomicBool::new(false),
        }
    }

    /// Whether the backend may receive new requests: healthy and not drained.
    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::Relaxed) && !self.is_drained()
    }

    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }
}

/// Every backend's slot, by identity.
#[derive(Default)]
pub struct HealthBoard {
    slots: Mutex<Vec<Weak<BackendSlot>>>,
}

impl HealthBoard {
    /// The slot of `key`: the one already published if any snapshot still holds it, else a
    /// new one (available). Called when a snapshot is built, never on the request path.
    pub fn slot(&self, key: BackendKey) -> Arc<BackendSlot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|w| w.strong_count() > 0);
        if let Some(s) = slots
            .iter()
            .filter_map(Weak::upgrade)
            .find(|s| s.key == key)
        {
            return s;
        }
        let s = Arc::new(BackendSlot::new(key));
        slots.push(Arc::downgrade(&s));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> BackendKey {
        BackendKey {
            pool: "api".into(),
            id: id.into(),
            address: "127.0.0.1:7001".parse().unwrap(),
        }
    }

    #[test]
    fn a_backend_keeps_its_slot_while_referenced() {
        let board = HealthBoard::default();
        let a = board.slot(key("a"));
        a.available.store(false, Ordering::Relaxed);
        let again = board.slot(key("a"));
        assert!(Arc::ptr_eq(&a, &again));
        assert!(!again.is_available(), "the published state carries over");
        let moved = board.slot(BackendKey {
            address: "127.0.0.1:7002".parse().unwrap(),
            ..key("a")
        });
        assert!(moved.is_available(), "another address is another backend");
        drop((a, again));
        assert!(board.slot(key("a")).is_available(), "forgotten, then new");
    }
}

/// A set of worker indices (0 to 255, as a connection ID's worker byte holds them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerSet([u64; 4]);

impl WorkerSet {
    /// Adds worker `w` (beyond 255: nothing).
    pub fn insert(&mut self, w: usize) {
        if let Some(word) = self.0.get_mut(w / 64) {
            *word |= 1 << (w % 64);
        }
    }

    pub fn contains(&self, w: usize) -> bool {
        self.0
            .get(w / 64)
            .is_some_and(|word| word & (1 << (w % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// The workers in it, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..256).filter(|w| self.contains(*w))
    }
}

/// A [`WorkerSet`] shared between threads.
#[derive(Debug, Default)]
pub struct AtomicWorkerSet([AtomicU64; 4]);

impl AtomicWorkerSet {
    pub fn insert(&self, w: usize) {
        if let Some(word) = self.0.get(w / 64) {
            word.fetch_or(1 << (w % 64), Ordering::Relaxed);
        }
    }

    pub fn load(&self) -> WorkerSet {
        let mut s = WorkerSet::default();
        for (out, word) in s.0.iter_mut().zip(&self.0) {
            *out = word.load(Ordering::Relaxed);
        }
        s
    }
}

#[cfg(test)]
mod worker_set_tests {
    use super::*;

    #[test]
    fn worker_sets_hold_every_worker_byte() {
        let mut s = WorkerSet::default();
        assert!(s.is_empty());
        for w in [0, 63, 64, 200, 255] {
            s.insert(w);
        }
        s.insert(256);
        assert_eq!(s.iter().collect::<Vec<_>>(), [0, 63, 64, 200, 255]);
        assert!(s.contains(200) && !s.contains(199) && !s.contains(256));
        let a = AtomicWorkerSet::default();
        a.insert(70);
        a.insert(3);
        assert_eq!(a.load().iter().collect::<Vec<_>>(), [3, 70]);
    }
}
