//! The process's resident memory, for `proxy.memory_limit`: read from `/proc/self/statm` at
//! most every [`SAMPLE_EVERY`] by whichever worker asks first (no thread of its own), and
//! shared by all. Above the limit a worker answers new requests 503 and resets the response
//! streams its clients have stalled (see `quic::conn`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How stale a sample may be.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The last sample, bytes.
static RESIDENT: AtomicU64 = AtomicU64::new(0);
/// When it was taken, milliseconds since [`epoch`] plus one (0: never).
static SAMPLED_AT: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The process's resident memory in bytes (at most [`SAMPLE_EVERY`] old); 0 when
/// `/proc/self/statm` cannot be read.
pub fn resident() -> u64 {
    let now = epoch().elapsed().as_millis() as u64 + 1;
    let at = SAMPLED_AT.load(Ordering::Relaxed);
    let stale = at == 0 || now.saturating_sub(at) >= SAMPLE_EVERY.as_millis() as u64;
    // One worker refreshes; the others use the sample it replaces.
    if stale
        && SAMPLED_AT
            .compare_exchange(at, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        if let Some(bytes) = read_statm() {
            RESIDENT.store(bytes, Ordering::Relaxed);
        }
    }
    RESIDENT.load(Ordering::Relaxed)
}

/// Whether the process is above `limit` (never without one).
pub fn over(limit: Option<u64>) -> bool {
    limit.is_some_and(|limit| resident() > limit)
}

/// Resident bytes from `/proc/self/statm` (its second field, in pages).
fn read_statm() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok().filter(|p| *p > 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_is_read_and_compared() {
        let rss = resident();
        // A test process holds at least a megabyte and far less than a terabyte.
        assert!((1 << 20..1 << 40).contains(&rss), "{rss}");
        assert!(over(Some(1)));
        assert!(!over(Some(u64::MAX)));
        assert!(!over(None));
    }
}
