//! The request-header clock (`quic.request_header_timeout`): request streams the client has
//! opened whose HEADERS frame has not arrived whole yet.
//!
//! quiche's HTTP/3 layer keeps a partly received HEADERS frame to itself and only reports the
//! stream once the frame is complete, so a client trickling a request head (slowloris) would
//! otherwise hold a stream for as long as the connection lives. The worker tells this clock
//! about every request stream it sees carrying data and about every request head that
//! arrives; streams that outlive the timeout without a head are reset.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most streams one sighting may open at once: a client can only open up to its stream limit
/// (quiche refuses more), this bounds the work even if that limit is huge.
const MAX_OPENED_AT_ONCE: u64 = 4096;

#[derive(Default)]
pub struct PendingHeads {
    /// The lowest client-initiated bidirectional stream id not yet seen opened.
    next: u64,
    /// Streams waiting for their head, with when they were seen opened; oldest first.
    waiting: VecDeque<(u64, Instant)>,
}

/// Client-initiated bidirectional streams (ids 0, 4, 8, …) carry requests.
fn is_request_stream(sid: u64) -> bool {
    sid.is_multiple_of(4)
}

impl PendingHeads {
    /// Stream `sid` exists. Streams of one type open in order (RFC 9000 §3.2), so every lower
    /// request stream not seen yet is open too and waits for its head from now on.
    pub fn opened(&mut self, sid: u64, now: Instant) {
        if !is_request_stream(sid) || sid < self.next {
            return;
        }
        let first = self
            .next
            .max(sid.saturating_sub(4 * (MAX_OPENED_AT_ONCE - 1)));
        self.waiting
            .extend((first..=sid).step_by(4).map(|s| (s, now)));
        self.next = sid.saturating_add(4);
    }

    /// The head of stream `sid` arrived (or the stream is gone): its clock stops.
    pub fn arrived(&mut self, sid: u64) {
        if let Some(i) = self.waiting.iter().position(|&(s, _)| s == sid) {
            self.waiting.remove(i);
        }
    }

    /// When the oldest waiting stream runs out of time.
    pub fn next_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.waiting.front().map(|&(_, t)| t + timeout)
    }

    /// Removes and returns the streams whose head is overdue at `now`.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<u64> {
        let mut late = Vec::new();
        while let Some(&(sid, t)) = self.waiting.front() {
            if t + timeout > now {
                break;
            }
            late.push(sid);
            self.waiting.pop_front();
        }
        late
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn a_head_that_arrives_stops_the_clock() {
        let t0 = Instant::now();
        let mut p = PendingHeads::default();
        p.opened(0, t0);
        assert_eq!(p.next_deadline(T), Some(t0 + T));
        p.arrived(0);
        assert_eq!(p.next_deadline(T), None);
        assert!(p.expire(t0 + 2 * T, T).is_empty());
    }

    #[test]
    fn a_missing_head_expires_exactly_at_the_timeout() {
        let t0 = Instant::now();
        let mut p = PendingHeads::default();
        p.opened(0, t0);
        assert!(p.expire(t0 + T - Duration::from_millis(1), T).is_empty());
        assert_eq!(p.expire(t0 + T, T), [0]);
        assert!(p.expire(t0 + 2 * T, T).is_empty(), "expired once only");
    }

    #[test]
    fn a_higher_stream_opens_the_skipped_ones_and_nothing_twice() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut p = PendingHeads::default();
        p.opened(8, t0); // opens 0, 4 and 8
        p.arrived(8);
        p.opened(4, t1); // seen already: keeps its first time
        p.opened(2, t1); // server-initiated unidirectional: not a request
        p.opened(3, t1); // client unidirectional (control, QPACK): not a request
        p.opened(12, t1);
        assert_eq!(p.expire(t0 + T, T), [0, 4]);
        assert_eq!(p.expire(t1 + T, T), [12]);
        // A head for a stream seen before, e.g. after it carried data: no new entry.
        p.opened(12, t1);
        p.arrived(12);
        assert_eq!(p.next_deadline(T), None);
    }

    #[test]
    fn an_absurd_stream_id_opens_a_bounded_number() {
        let mut p = PendingHeads::default();
        p.opened(u64::MAX - 3, Instant::now());
        assert_eq!(p.waiting.len() as u64, MAX_OPENED_AT_ONCE);
        assert_eq!(p.waiting.back().map(|w| w.0), Some(u64::MAX - 3));
    }
}
