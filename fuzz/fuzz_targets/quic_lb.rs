//! Fuzz target `quic_lb`: connection IDs from anyone through the QUIC-LB decoder
//! (`spooky::quic::quic_lb`), as a fleet member or load balancer reads them.
//!
//! Input: one byte of configuration (config rotation `% 7`, whether keyed), one byte of server
//! id length (`1 + b % 15`), one of nonce length (4 up to what fits in 19), 16 key bytes, then
//! the connection ID.
//!
//! Checked:
//! - decoding never panics, whatever the bytes and lengths;
//! - it decodes exactly the IDs of its config rotation that are long enough;
//! - decoding is the inverse of encoding: what it decodes encodes back to the same ID (the
//!   first octet's low bits kept as the caller's), so two IDs never share a server id and nonce.

#![no_main]

use libfuzzer_sys::fuzz_target;
use spooky::quic::quic_lb::QuicLb;

fuzz_target!(|data: &[u8]| {
    let Some((head, cid)) = data.split_at_checked(19) else {
        return;
    };
    let rotation = head[0] % 7;
    let keyed = head[0] & 0x80 != 0;
    let sid_len = 1 + usize::from(head[1]) % 15;
    let nonce_len = 4 + usize::from(head[2]) % (19 - sid_len - 3);
    let key: [u8; 16] = head[3..19].try_into().expect("16 octets");
    let lb = QuicLb::new(rotation, sid_len, nonce_len, keyed.then_some(key), false)
        .expect("valid lengths");
    let decoded = lb.decode(cid);
    let ours = cid.first().is_some_and(|b| b >> 5 == rotation) && cid.len() > sid_len + nonce_len;
    assert_eq!(decoded.is_some(), ours, "{lb:?} {cid:02x?}");
    if let Some((sid, nonce)) = decoded {
        assert_eq!((sid.len(), nonce.len()), (sid_len, nonce_len));
        let again = lb.encode(&sid, &nonce, cid[0] & 0x1f).expect("encodes");
        assert_eq!(again, cid[..1 + sid_len + nonce_len], "{lb:?}");
    }
});
