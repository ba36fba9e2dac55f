//! QUIC-LB connection IDs (draft-ietf-quic-load-balancers-21, "Server ID Encoding in
//! Connection IDs"): the format a QUIC-aware load balancer (AWS NLB's QUIC listeners, Google's
//! QUICHE load balancer) reads the server id from. Sans-IO: bytes in, bytes out.
//!
//! ```text
//! first octet: config rotation (3 bits: 0..=6; 0b111 = unroutable) | length or random (5)
//! then:        server id (sid_len octets) | nonce (nonce_len octets), sid_len + nonce_len ≤ 19
//! ```
//!
//! Three modes, chosen by the configuration: plaintext (no key); one AES-128-ECB pass when
//! server id and nonce are exactly 16 octets; otherwise the four-pass Feistel network of the
//! draft, whose round function is AES-128-ECB of `expand(plaintext_len, pass, half)`.
//! Checked against the draft's test vectors (with the errata: the vector for config rotation 3
//! prints a first octet `0x12` where `0x72` is meant) and against an independent Python
//! implementation in the tests.

use boring::symm::{Cipher, Crypter, Mode};

/// The config rotation codepoint of connection IDs no configuration routes.
pub const UNROUTABLE: u8 = 0b111;
/// The longest connection ID QUIC version 1 allows.
const MAX_CID: usize = 20;

/// Why a configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuicLbError {
    #[error("config rotation must be 0 to 6 (7 marks unroutable connection IDs), got {0}")]
    Rotation(u8),
    #[error("the server id is 1 octet or more, the nonce 4 or more, together at most 19 (got {sid} + {nonce})")]
    Lengths { sid: usize, nonce: usize },
}

/// One QUIC-LB configuration.
#[derive(Clone)]
pub struct QuicLb {
    rotation: u8,
    sid_len: usize,
    nonce_len: usize,
    /// `None`: plaintext.
    key: Option<[u8; 16]>,
    /// The first octet's low 5 bits carry the length after it (else they are the caller's).
    encode_len: bool,
}

impl std::fmt::Debug for QuicLb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicLb")
            .field("rotation", &self.rotation)
            .field("sid_len", &self.sid_len)
            .field("nonce_len", &self.nonce_len)
            .field("encrypted", &self.key.is_some())
            .field("encode_len", &self.encode_len)
            .finish()
    }
}

/// How a configuration protects the server id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuicLbMode {
    Plaintext,
    SinglePass,
    FourPass,
}

impl QuicLb {
    /// A configuration.
    ///
    /// # Errors
    /// A rotation codepoint of 7 or more, or lengths the draft does not allow.
    pub fn new(
        rotation: u8,
        sid_len: usize,
        nonce_len: usize,
        key: Option<[u8; 16]>,
        encode_len: bool,
    ) -> Result<Self, QuicLbError> {
        if rotation >= UNROUTABLE {
            return Err(QuicLbError::Rotation(rotation));
        }
        if sid_len == 0 || nonce_len < 4 || sid_len + nonce_len > MAX_CID - 1 {
            return Err(QuicLbError::Lengths {
                sid: sid_len,
                nonce: nonce_len,
            });
        }
        Ok(Self {
            rotation,
            sid_len,
            nonce_len,
            key,
            encode_len,
        })
    }

    /// The mode its lengths and key select.
    pub fn mode(&self) -> QuicLbMode {
        match self.key {
            None => QuicLbMode::Plaintext,
            Some(_) if self.plaintext_len() == 16 => QuicLbMode::SinglePass,
            Some(_) => QuicLbMode::FourPass,
        }
    }

    /// Its config rotation codepoint.
    pub fn rotation(&self) -> u8 {
        self.rotation
    }

    /// Whether the server id is in plaintext (no key).
    pub fn is_plaintext(&self) -> bool {
        self.key.is_none()
    }

    /// The length of its connection IDs.
    pub fn cid_len(&self) -> usize {
        1 + self.plaintext_len()
    }

    fn plaintext_len(&self) -> usize {
        self.sid_len + self.nonce_len
    }

    /// The connection ID for server id `sid` and `nonce` (their configured lengths); `low` is
    /// the first octet's low 5 bits when the length is not encoded there. `None` when a
    /// length is wrong or AES fails.
    pub fn encode(&self, sid: &[u8], nonce: &[u8], low: u8) -> Option<Vec<u8>> {
        if sid.len() != self.sid_len || nonce.len() != self.nonce_len {
            return None;
        }
        let len = self.plaintext_len();
        let low = if self.encode_len { len as u8 } else { low };
        let mut cid = Vec::with_capacity(1 + len);
        cid.push(self.rotation << 5 | (low & 0x1f));
        cid.extend_from_slice(sid);
        cid.extend_from_slice(nonce);
        let key = match self.key {
            None => return Some(cid),
            Some(k) => k,
        };
        let body = cid.get_mut(1..)?;
        match self.mode() {
            QuicLbMode::SinglePass => {
                let block: [u8; 16] = (*body).try_into().ok()?;
                body.copy_from_slice(&aes(&key, &block, Mode::Encrypt)?);
            }
            _ => feistel(&key, body, true)?,
        }
        Some(cid)
    }

    /// The config rotation codepoint of a connection ID (its first octet's top 3 bits).
    pub fn rotation_of(cid: &[u8]) -> Option<u8> {
        cid.first().map(|b| b >> 5)
    }

    /// The server id a connection ID of this configuration carries; `None` when it is not of
    /// this configuration (another rotation codepoint, too short) or AES fails.
    pub fn server_id(&self, cid: &[u8]) -> Option<Vec<u8>> {
        let (sid, _) = self.decode(cid)?;
        Some(sid)
    }

    /// The server id and nonce of a connection ID of this configuration.
    pub fn decode(&self, cid: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
        if Self::rotation_of(cid)? != self.rotation {
            return None;
        }
        let mut body: Vec<u8> = cid.get(1..1 + self.plaintext_len())?.to_vec();
        if let Some(key) = self.key {
            match self.mode() {
                QuicLbMode::SinglePass => {
                    let block: [u8; 16] = body.as_slice().try_into().ok()?;
                    body.copy_from_slice(&aes(&key, &block, Mode::Decrypt)?);
                }
                _ => feistel(&key, &mut body, false)?,
            }
        }
        let nonce = body.split_off(self.sid_len);
        Some((body, nonce))
    }
}

/// One AES-128-ECB block.
fn aes(key: &[u8; 16], block: &[u8; 16], mode: Mode) -> Option<[u8; 16]> {
    let mut c = Crypter::new(Cipher::aes_128_ecb(), mode, key, None).ok()?;
    c.pad(false);
    let mut out = [0u8; 32];
    let n = c.update(block, &mut out).ok()?;
    let m = c.finalize(out.get_mut(n..)?).ok()?;
    if n + m != 16 {
        return None;
    }
    out.get(..16)?.try_into().ok()
}

/// `expand(length, pass, half)`: `half` in the most significant octets, zeros, then the
/// plaintext length and the pass number as the last two octets.
fn expand(len: usize, pass: u8, half: &[u8]) -> [u8; 16] {
    let mut b = [0u8; 16];
    for (d, s) in b.iter_mut().zip(half) {
        *d = *s;
    }
    b[14] = len as u8;
    b[15] = pass;
    b
}

/// The draft's four-pass Feistel network over `body` (server id and nonce), in place:
/// encrypting (`forward`) or decrypting.
fn feistel(key: &[u8; 16], body: &mut [u8], forward: bool) -> Option<()> {
    let len = body.len();
    let half = len.div_ceil(2);
    let odd = len % 2 == 1;
    // left: the first `half` octets (an odd middle octet's low nibble cleared); right: the last
    // `half` (its high nibble cleared).
    let mut left: Vec<u8> = body.get(..half)?.to_vec();
    let mut right: Vec<u8> = body.get(len - half..)?.to_vec();
    let clear_left = |l: &mut Vec<u8>| {
        if odd {
            if let Some(last) = l.last_mut() {
                *last &= 0xf0;
            }
        }
    };
    let clear_right = |r: &mut Vec<u8>| {
        if odd {
            if let Some(first) = r.first_mut() {
                *first &= 0x0f;
            }
        }
    };
    clear_left(&mut left);
    clear_right(&mut right);
    let round = |pass: u8, input: &[u8], into: &mut Vec<u8>| -> Option<()> {
        let out = aes(key, &expand(len, pass, input), Mode::Encrypt)?;
        for (d, k) in into.iter_mut().zip(out) {
            *d ^= k;
        }
        Some(())
    };
    // Odd passes change the right half from the left, even passes the left from the right;
    // decrypting runs them in reverse.
    let passes: [u8; 4] = if forward { [1, 2, 3, 4] } else { [4, 3, 2, 1] };
    for pass in passes {
        if pass % 2 == 1 {
            round(pass, &left, &mut right)?;
            clear_right(&mut right);
        } else {
            round(pass, &right, &mut left)?;
            clear_left(&mut left);
        }
    }
    // Join: an odd middle octet is the left's high nibble and the right's low one.
    body.get_mut(..half)?.copy_from_slice(&left);
    let tail = body.get_mut(len - half..)?;
    if odd {
        let middle = left.last().copied().unwrap_or(0) | right.first().copied().unwrap_or(0);
        tail.copy_from_slice(&right);
        *tail.first_mut()? = middle;
    } else {
        tail.copy_from_slice(&right);
    }
    Some(())
}

#[cfg(test)]
mod tests;
