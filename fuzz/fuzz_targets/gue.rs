//! Fuzz target `gue`: packets on the fleet forwarding port through the GUE decoder
//! (`spooky::quic::fleet::decapsulate`), as a member receives them from anyone who can reach
//! the port.
//!
//! Checked:
//! - decoding never panics, whatever the bytes;
//! - what it accepts lies inside the packet: the QUIC datagram's range is in bounds and ends
//!   where the packet does;
//! - encoding what was decoded gives back a packet that decodes to the same addresses and
//!   payload (for packets without GUE extension words, the encoding itself).

#![no_main]

use libfuzzer_sys::fuzz_target;
use spooky::quic::fleet::{decapsulate, encapsulate, GUE_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(inner) = decapsulate(data) else {
        return;
    };
    assert!(inner.payload.start <= inner.payload.end);
    assert_eq!(
        inner.payload.end,
        data.len(),
        "the datagram ends the packet"
    );
    let payload = &data[inner.payload.clone()];
    let mut out = vec![0u8; data.len() + 64];
    let n =
        encapsulate(inner.client, inner.server, payload, &mut out).expect("what decodes encodes");
    let again = decapsulate(&out[..n]).expect("and decodes again");
    assert_eq!((again.client, again.server), (inner.client, inner.server));
    assert_eq!(&out[again.payload], payload);
    if data[0] & 0x1f == 0 && data.len() >= GUE_LEN {
        // No extension words: the same header fields, except the ones encoding normalises
        // (IPv4 id, TOS, TTL, DF; IPv6 traffic class, flow label, hop limit; checksums).
        assert_eq!(n, data.len());
    }
});
