//! The process's resident memory, for `proxy.memory_limit`: read from `/proc/self/statm` at
//! most every [`SAMPLE_EVERY`] by whichever worker asks first (no thread of its own), and
//! shared by all. Above the limit a worker answers new requests 503 and resets the response
//! streams its clients have stalled (see `quic::conn`). Memory the allocator has freed but
//! kept still counts as resident, so before a sample above the limit is believed the
//! allocator is asked to give free memory back (`malloc_trim`, at most every
//! [`SAMPLE_EVERY`]): otherwise a process would stay "over" once the load that grew it is
//! gone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How stale a sample may be.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The last sample, bytes.
static RESIDENT: AtomicU64 = AtomicU64::new(0);
/// When it was taken, milliseconds since [`epoch`] plus one (0: never).
static SAMPLED_AT: AtomicU64 = AtomicU64::new(0);
/// When free memory was last given back, as [`SAMPLED_AT`].
static TRIMMED_AT: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The process's resident memory in bytes (at most [`SAMPLE_EVERY`] old); 0 when
/// `/proc/self/statm` cannot be read.
pub fn resident() -> u64 {
    if claim(&SAMPLED_AT) {
        sample();
    }
    RESIDENT.load(Ordering::Relaxed)
}

/// Whether the process is above `limit` (never without one). A sample above it is checked
/// again after free memory went back to the system.
pub fn over(limit: Option<u64>) -> bool {
    let Some(limit) = limit else {
        return false;
    };
    if resident() <= limit {
        return false;
    }
    if claim(&TRIMMED_AT) {
        // SAFETY: malloc_trim has no preconditions; it only returns free memory.
        unsafe { libc::malloc_trim(0) };
        sample();
    }
    RESIDENT.load(Ordering::Relaxed) > limit
}

/// Whether the caller may act now on the timestamp `at` (last acted [`SAMPLE_EVERY`] or more
/// ago); one caller wins, the others go on without acting.
fn claim(at: &AtomicU64) -> bool {
    let now = epoch().elapsed().as_millis() as u64 + 1;
    let last = at.load(Ordering::Relaxed);
    let due = last == 0 || now.saturating_sub(last) >= SAMPLE_EVERY.as_millis() as u64;
    due && at
        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
}

fn sample() {
    if let Some(bytes) = read_statm() {
        RESIDENT.store(bytes, Ordering::Relaxed);
    }
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
