//! Address-validation tokens (Retry) and stateless-reset tokens, sans-IO: the time is passed
//! in, the keys are the caller's ([`KeyRing`], from the key file).
//!
//! A Retry token is `unix seconds (8) | odcid length (1) | odcid | retry SCID length (1) |
//! retry SCID | tag (16)`, the tag a truncated HMAC-SHA256 over everything before it and the
//! client's address and port, so a token is only good from the address it was minted for, for
//! the original DCID it names, for `lifetime` after it was minted, and only on an Initial
//! sent to the connection ID our Retry chose (RFC 9000 §8.1.4). The last binding matters: the
//! accepted connection keeps that ID as its own and puts its stateless-reset token in the
//! transport parameters, so a token good for any DCID would let its holder learn the reset
//! token of a connection ID it saw on the path, someone else's (RFC 9000 §10.3.2, §21.11). A
//! stateless-reset token is the HMAC of one of our connection IDs under a label of its own.

use crate::keys::KeyRing;
use quiche::ConnectionId;
use ring::hmac;
use std::net::SocketAddr;
use std::time::Duration;

/// Bytes of the truncated tag.
const TAG_LEN: usize = 16;
/// Longest connection ID a token can carry (QUIC v1).
const MAX_CID: usize = 20;

fn address_bytes(addr: &SocketAddr) -> ([u8; 18], usize) {
    let mut out = [0u8; 18];
    let n = match addr.ip() {
        std::net::IpAddr::V4(ip) => {
            out[..4].copy_from_slice(&ip.octets());
            4
        }
        std::net::IpAddr::V6(ip) => {
            out[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    out[n..n + 2].copy_from_slice(&addr.port().to_be_bytes());
    (out, n + 2)
}

fn tag(key: &hmac::Key, body: &[u8], peer: &SocketAddr) -> hmac::Tag {
    let (addr, len) = address_bytes(peer);
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(body);
    ctx.update(&addr[..len]);
    ctx.sign()
}

/// A Retry token for a client at `peer` whose first Initial carried `odcid`, answered with a
/// Retry whose source connection ID is `retry_scid`, minted at `now_unix` (seconds since the
/// epoch) with the current token key.
pub fn mint(
    keys: &KeyRing,
    odcid: &[u8],
    retry_scid: &[u8],
    peer: &SocketAddr,
    now_unix: u64,
) -> Vec<u8> {
    let odcid = &odcid[..odcid.len().min(MAX_CID)];
    let retry_scid = &retry_scid[..retry_scid.len().min(MAX_CID)];
    let mut t = Vec::with_capacity(8 + 2 + odcid.len() + retry_scid.len() + TAG_LEN);
    t.extend_from_slice(&now_unix.to_be_bytes());
    t.push(odcid.len() as u8);
    t.extend_from_slice(odcid);
    t.push(retry_scid.len() as u8);
    t.extend_from_slice(retry_scid);
    let tag = tag(&keys.token, &t, peer);
    t.extend_from_slice(&tag.as_ref()[..TAG_LEN]);
    t
}

/// What a valid Retry token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    /// The DCID of the client's first Initial.
    pub odcid: ConnectionId<'static>,
    /// The source connection ID of our Retry: the DCID the token is good for.
    pub retry_scid: ConnectionId<'static>,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not the shape of one of our tokens.
    Malformed,
    /// The tag does not match (forged, or minted for another address).
    Forged,
    /// Older than the lifetime (or minted in the future).
    Expired,
}

/// What `token` carries, when it is ours (minted with the current or the previous token
/// key), was minted for `peer`, and is at most `lifetime` old at `now_unix`. The caller still
/// checks that the Initial went to [`Validated::retry_scid`].
///
/// # Errors
/// [`TokenError`] naming why the token is refused.
pub fn validate(
    keys: &KeyRing,
    token: &[u8],
    peer: &SocketAddr,
    now_unix: u64,
    lifetime: Duration,
) -> Result<Validated, TokenError> {
    let minted = token
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or(TokenError::Malformed)?;
    let odcid_len = usize::from(*token.get(8).ok_or(TokenError::Malformed)?);
    if odcid_len > MAX_CID {
        return Err(TokenError::Malformed);
    }
    let scid_at = 9 + odcid_len;
    let scid_len = usize::from(*token.get(scid_at).ok_or(TokenError::Malformed)?);
    let body_len = scid_at + 1 + scid_len;
    if scid_len > MAX_CID || token.len() != body_len + TAG_LEN {
        return Err(TokenError::Malformed);
    }
    let (body, given) = token.split_at(body_len);
    let matches = |key: &hmac::Key| {
        let want = tag(key, body, peer);
        // Constant time over the truncated tag.
        want.as_ref()[..TAG_LEN]
            .iter()
            .zip(given)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    };
    if !matches(&keys.token) && !keys.previous_token.as_ref().is_some_and(matches) {
        return Err(TokenError::Forged);
    }
    if minted > now_unix || now_unix - minted > lifetime.as_secs() {
        return Err(TokenError::Expired);
    }
    Ok(Validated {
        odcid: ConnectionId::from_vec(body[9..scid_at].to_vec()),
        retry_scid: ConnectionId::from_vec(body[scid_at + 1..].to_vec()),
    })
}

/// The stateless-reset token of one of our connection IDs.
pub fn reset_token(keys: &KeyRing, cid: &[u8]) -> u128 {
    let mut ctx = hmac::Context::with_key(&keys.reset);
    ctx.update(b"reset");
    ctx.update(cid);
    let tag = ctx.sign();
    let mut b = [0u8; 16];
    b.copy_from_slice(&tag.as_ref()[..16]);
    u128::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keys;

    const NOW: u64 = 1_764_000_000;
    const LIFE: Duration = Duration::from_secs(30);

    fn keys(text_token: &str) -> KeyRing {
        let hex = |c: &str| c.repeat(64);
        KeyRing::from(
            &Keys::parse(&format!(
                "reset: {}\ntoken: {}\n",
                hex("a"),
                hex(text_token)
            ))
            .unwrap(),
        )
    }

    fn key() -> KeyRing {
        keys("1")
    }

    fn peer() -> SocketAddr {
        "192.0.2.1:4433".parse().unwrap()
    }

    #[test]
    fn a_token_round_trips_within_its_lifetime() {
        let t = mint(&key(), &[7; 12], &[9; 16], &peer(), NOW);
        assert_eq!(t.len(), 8 + 2 + 12 + 16 + TAG_LEN);
        let v = validate(&key(), &t, &peer(), NOW + 30, LIFE).unwrap();
        assert_eq!(v.odcid.as_ref(), &[7; 12]);
        assert_eq!(v.retry_scid.as_ref(), &[9; 16]);
    }

    #[test]
    fn a_token_is_bound_to_address_port_key_and_time() {
        let t = mint(&key(), &[7; 12], &[9; 16], &peer(), NOW);
        let other_port: SocketAddr = "192.0.2.1:4434".parse().unwrap();
        let other_ip: SocketAddr = "192.0.2.2:4433".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:4433".parse().unwrap();
        assert_eq!(
            validate(&key(), &t, &other_port, NOW, LIFE),
            Err(TokenError::Forged)
        );
        assert_eq!(
            validate(&key(), &t, &other_ip, NOW, LIFE),
            Err(TokenError::Forged)
        );
        assert_eq!(
            validate(&key(), &t, &v6, NOW, LIFE),
            Err(TokenError::Forged)
        );
        assert_eq!(
            validate(&keys("2"), &t, &peer(), NOW, LIFE),
            Err(TokenError::Forged)
        );
        assert_eq!(
            validate(&key(), &t, &peer(), NOW + 31, LIFE),
            Err(TokenError::Expired)
        );
        assert_eq!(
            validate(&key(), &t, &peer(), NOW - 1, LIFE),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn the_previous_key_is_accepted_until_the_next_rotation() {
        let rng = ring::rand::SystemRandom::new();
        let first = Keys::generate(&rng).unwrap();
        let once = first.rotated(&rng).unwrap();
        let twice = once.rotated(&rng).unwrap();
        let t = mint(&KeyRing::from(&first), &[7; 8], &[9; 8], &peer(), NOW);
        assert!(validate(&KeyRing::from(&first), &t, &peer(), NOW, LIFE).is_ok());
        assert!(validate(&KeyRing::from(&once), &t, &peer(), NOW, LIFE).is_ok());
        assert_eq!(
            validate(&KeyRing::from(&twice), &t, &peer(), NOW, LIFE),
            Err(TokenError::Forged)
        );
        // New tokens are minted with the newest key only.
        let newer = mint(&KeyRing::from(&once), &[7; 8], &[9; 8], &peer(), NOW);
        assert_eq!(
            validate(&KeyRing::from(&first), &newer, &peer(), NOW, LIFE),
            Err(TokenError::Forged)
        );
    }

    #[test]
    fn tampered_and_truncated_tokens_are_refused() {
        let t = mint(&key(), &[7; 12], &[9; 16], &peer(), NOW);
        for i in 0..t.len() {
            let mut forged = t.clone();
            forged[i] ^= 1;
            assert!(
                validate(&key(), &forged, &peer(), NOW, LIFE).is_err(),
                "byte {i}"
            );
        }
        for n in 0..t.len() {
            assert!(
                validate(&key(), &t[..n], &peer(), NOW, LIFE).is_err(),
                "{n} bytes"
            );
        }
        let mut longer = t.clone();
        longer.push(0);
        assert_eq!(
            validate(&key(), &longer, &peer(), NOW, LIFE),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn reset_tokens_differ_per_cid_and_key_and_ignore_the_token_key() {
        let a = reset_token(&key(), &[1; 16]);
        assert_eq!(a, reset_token(&key(), &[1; 16]));
        assert_ne!(a, reset_token(&key(), &[2; 16]));
        assert_eq!(a, reset_token(&keys("2"), &[1; 16]), "same reset key");
    }
}
