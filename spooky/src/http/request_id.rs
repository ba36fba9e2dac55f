//! Request ids: every request Spooky forwards carries an `x-request-id`, returned to the
//! client and written to the access log, so one request can be followed from the client's
//! report through Spooky's log to the backend's. An id a trusted proxy (`proxy.trusted_proxies`)
//! sent is kept (the request's path began before Spooky); anyone else's is replaced, so a
//! client cannot forge another request's id into the logs.
//!
//! Ids are random UUIDs (version 4) from a per-thread generator seeded once from the system's
//! random source: not secrets, only unique.

use super::bridge::RequestHead;
use bytes::Bytes;
use std::cell::Cell;

/// The field.
pub const NAME: &str = "x-request-id";

/// The longest id kept from a trusted proxy (longer ones are replaced).
const MAX_KEPT: usize = 200;

/// Sets `head`'s id: the one it carries when `trusted` sent it (and it is short, visible
/// ASCII), else a new one; the field itself is made to hold exactly that id.
pub fn assign(head: &mut RequestHead, trusted: bool) {
    let carried = head
        .fields
        .iter()
        .find(|(n, _)| n.as_ref() == NAME.as_bytes())
        .map(|(_, v)| v.clone())
        .filter(|v| {
            trusted
                && !v.is_empty()
                && v.len() <= MAX_KEPT
                && v.iter().all(|b| b.is_ascii_graphic())
        });
    let id = carried.unwrap_or_else(generate);
    head.fields.retain(|(n, _)| n.as_ref() != NAME.as_bytes());
    head.fields
        .push((Bytes::from_static(NAME.as_bytes()), id.clone()));
    head.request_id = id;
}

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        // No system randomness: ids need only be unique, which time and address give.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ (&b as *const _ as u64);
    }
    u64::from_le_bytes(b)
}

/// wyrand: a fast 64-bit generator with a full period.
fn next() -> u64 {
    STATE.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    })
}

/// A new UUID v4, as text.
pub fn generate() -> Bytes {
    let (a, b) = (next(), next());
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&a.to_be_bytes());
    bytes[8..].copy_from_slice(&b.to_be_bytes());
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(36);
    for (i, byte) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push(b'-');
        }
        out.push(HEX[usize::from(byte >> 4)]);
        out.push(HEX[usize::from(byte & 0x0f)]);
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(fields: &[(&'static str, &'static str)]) -> RequestHead {
        let list: Vec<quiche::h3::Header> = [
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", "example.com"),
            (":path", "/"),
        ]
        .iter()
        .chain(fields)
        .map(|(n, v)| quiche::h3::Header::new(n.as_bytes(), v.as_bytes()))
        .collect();
        super::super::bridge::validate_request(&list).expect("valid")
    }

    fn ids(h: &RequestHead) -> Vec<&[u8]> {
        h.fields
            .iter()
            .filter(|(n, _)| n.as_ref() == b"x-request-id")
            .map(|(_, v)| v.as_ref())
            .collect()
    }

    #[test]
    fn ids_are_made_kept_from_trusted_proxies_and_replaced_otherwise() {
        let mut h = head(&[]);
        assign(&mut h, false);
        assert_eq!(h.request_id.len(), 36);
        assert_eq!(ids(&h), [&h.request_id[..]]);
        assert_eq!(h.request_id[14], b'4', "version 4");
        let text = std::str::from_utf8(&h.request_id).unwrap();
        let groups: Vec<usize> = text.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{text}");
        assert!(text
            .bytes()
            .all(|b| b == b'-' || b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert!(
            matches!(text.as_bytes()[19], b'8' | b'9' | b'a' | b'b'),
            "RFC 4122 variant"
        );
        let mut again = head(&[]);
        assign(&mut again, false);
        assert_ne!(again.request_id, h.request_id, "unique");

        let mut h = head(&[("x-request-id", "abc-123")]);
        assign(&mut h, true);
        assert_eq!(
            &h.request_id[..],
            b"abc-123",
            "a trusted proxy's id is kept"
        );
        assert_eq!(ids(&h), [&b"abc-123"[..]]);

        let mut h = head(&[("x-request-id", "abc-123"), ("x-request-id", "second")]);
        assign(&mut h, false);
        assert_ne!(&h.request_id[..], b"abc-123", "a client's id is replaced");
        assert_eq!(ids(&h), [&h.request_id[..]], "one field, the new id");

        let mut h = head(&[("x-request-id", "has space")]);
        assign(&mut h, true);
        assert_eq!(h.request_id.len(), 36, "not kept: not visible ASCII");
    }
}
