//! Stalled response streams: the bounds on how many a client may hold.
//!
//! A response stream is *stalled* when data waits for it that quiche will not take (the
//! client's flow control is closed, or its turn has not come). It is *held* once it has been
//! stalled for [`STALL_GRACE`] while its whole connection took nothing for as long: the
//! client is not reading at all, so the stream (and the backend stream behind it) only
//! holds memory. A connection may hold `quic.max_stalled_streams` streams and a client
//! address (an IPv6 client: its /64) `quic.max_stalled_streams_per_ip` (each worker its
//! share); a stream that would go over either is reset with `H3_EXCESSIVE_LOAD` at once,
//! instead of waiting out `quic.send_timeout`. A connection that keeps taking bytes on some
//! stream holds none: its waiting streams are queued behind others (priorities, congestion),
//! not withheld, and only `quic.send_timeout` bounds them.
//!
//! This module is the per-worker count by address (held streams, and open request streams
//! for `quic.max_streams_per_ip`); `conn` decides per stream.

use super::endpoint::address_key;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

/// How long a stream (and its connection) must take nothing before it counts as held.
pub const STALL_GRACE: Duration = Duration::from_secs(1);

/// Per client address on one worker: its held stalled streams, and its open request
/// streams (`quic.max_streams_per_ip`).
#[derive(Debug)]
pub struct AddressBook {
    workers: usize,
    held: RefCell<HashMap<IpAddr, u32>>,
    open: RefCell<HashMap<IpAddr, u32>>,
}

/// One more for `ip`'s address in `map`.
fn up(map: &RefCell<HashMap<IpAddr, u32>>, ip: IpAddr) {
    *map.borrow_mut().entry(address_key(ip)).or_insert(0) += 1;
}

/// One fewer for `ip`'s address in `map` (its entry goes at zero; never below).
fn down(map: &RefCell<HashMap<IpAddr, u32>>, ip: IpAddr) {
    let mut map = map.borrow_mut();
    let key = address_key(ip);
    if let Some(n) = map.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&key);
        }
    }
}

fn count(map: &RefCell<HashMap<IpAddr, u32>>, ip: IpAddr) -> u32 {
    map.borrow().get(&address_key(ip)).copied().unwrap_or(0)
}

impl AddressBook {
    /// The book of one of `workers` workers.
    pub fn new(workers: usize) -> Self {
        Self {
            workers: workers.max(1),
            held: RefCell::new(HashMap::new()),
            open: RefCell::new(HashMap::new()),
        }
    }

    /// This worker's share of a process-wide per-address limit (`ceil(limit / workers)`).
    pub fn share(&self, limit: u32) -> u32 {
        limit.div_ceil(u32::try_from(self.workers).unwrap_or(u32::MAX))
    }

    /// Streams `ip`'s address holds on this worker.
    pub fn held(&self, ip: IpAddr) -> u32 {
        count(&self.held, ip)
    }

    /// One more stream held by `ip`'s address.
    pub fn hold(&self, ip: IpAddr) {
        up(&self.held, ip);
    }

    /// One stream of `ip`'s address no longer held (it moved, ended or was reset).
    pub fn release(&self, ip: IpAddr) {
        down(&self.held, ip);
    }

    /// Request streams `ip`'s address has open on this worker.
    pub fn open_streams(&self, ip: IpAddr) -> u32 {
        count(&self.open, ip)
    }

    /// A request stream of `ip`'s address opened.
    pub fn stream_opened(&self, ip: IpAddr) {
        up(&self.open, ip);
    }

    /// A request stream of `ip`'s address is done.
    pub fn stream_closed(&self, ip: IpAddr) {
        down(&self.open, ip);
    }

    /// Addresses with held or open streams.
    #[cfg(test)]
    pub fn addresses(&self) -> usize {
        self.held.borrow().len() + self.open.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_streams_count_by_address_and_ipv6_64() {
        let book = AddressBook::new(2);
        assert_eq!(book.share(256), 128);
        assert_eq!(book.share(5), 3);
        let a: IpAddr = "2001:db8:1:2::7".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::8".parse().unwrap();
        book.hold(a);
        book.hold(b);
        assert_eq!(book.held(a), 2, "one /64");
        assert_eq!(book.held("2001:db8:1:3::7".parse().unwrap()), 0);
        book.release(a);
        book.release(b);
        book.release(b); // never below zero
        assert_eq!((book.held(a), book.addresses()), (0, 0));
        book.stream_opened(a);
        book.stream_opened("2001:db8:1:2::9".parse().unwrap());
        assert_eq!(book.open_streams(b), 2, "one /64");
        book.stream_closed(a);
        book.stream_closed(b);
        book.stream_closed(b);
        assert_eq!((book.open_streams(a), book.addresses()), (0, 0));
    }
}
