//! The secrets that must outlive a process: the stateless-reset key and the address-validation
//! (Retry token) key, from the key file (`quic.key_file`). Every process that reads the same
//! file — the next Spooky after an upgrade or a crash, or another host of a fleet that shares
//! it — accepts the others' Retry tokens and can reset the others' connections.
//!
//! The file is YAML with hex keys, created (mode 0600) when it does not exist:
//!
//! ```yaml
//! reset: 64 hex digits
//! token: 64 hex digits
//! previous_token: 64 hex digits   # after a rotation: still accepted, never minted with
//! ```
//!
//! Rotation (`spooky keys rotate --file F`, then a reload) moves `token` to `previous_token`
//! and makes a new `token`: tokens minted before it stay valid for one more rotation. The
//! reset key does not rotate: resets must match the tokens clients were given with their
//! connection IDs, for as long as those connections may live.

use ring::hmac;
use ring::rand::SecureRandom;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes of one key.
const KEY_LEN: usize = 32;

/// One secret key.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; KEY_LEN]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Secret {
    fn random(rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        let mut b = [0u8; KEY_LEN];
        rng.fill(&mut b).map_err(|_| KeyError::Randomness)?;
        Ok(Self(b))
    }

    fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn from_hex(name: &str, text: &str) -> Result<Self, KeyError> {
        let bad = || KeyError::Malformed(format!("{name}: not {} hex digits", 2 * KEY_LEN));
        let text = text.trim();
        if text.len() != 2 * KEY_LEN || !text.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; KEY_LEN];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }

    /// The HMAC-SHA256 key made of this secret.
    pub fn hmac(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.0)
    }
}

/// The keys of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    /// Stateless-reset tokens of our connection IDs.
    pub reset: Secret,
    /// Retry tokens are minted with this one and accepted with it…
    pub token: Secret,
    /// …or with this one (the key before the last rotation).
    pub previous_token: Option<Secret>,
}

/// Bytes of TLS session-ticket key material: BoringSSL's `SSL_CTX_set_tlsext_ticket_keys`
/// takes a 16-byte key name, a 16-byte HMAC key and a 16-byte AES key.
pub const TICKET_KEY_LEN: usize = 48;

/// The keys as the data plane uses them: HMAC-SHA256 keys, built once per snapshot.
pub struct KeyRing {
    pub reset: hmac::Key,
    pub token: hmac::Key,
    pub previous_token: Option<hmac::Key>,
    /// Session tickets (resumption and 0-RTT): the same for every worker, and for the
    /// processes that follow each other (the keys are passed on), so a ticket one worker
    /// issued resumes on any. Derived from the token key: `spooky keys rotate` (then a
    /// reload) rotates it too; tickets sealed with the old one then fall back to a full
    /// handshake.
    pub ticket: [u8; TICKET_KEY_LEN],
    /// Session tickets of the TCP listener (rustls), sealed with a key derived the same
    /// way: a ticket from any worker, successor or fleet member resumes on any other.
    pub tcp_tickets: Arc<SharedTickets>,
}

impl From<&Keys> for KeyRing {
    fn from(k: &Keys) -> Self {
        Self {
            reset: k.reset.hmac(),
            token: k.token.hmac(),
            previous_token: k.previous_token.as_ref().map(Secret::hmac),
            ticket: ticket_key(&k.token),
            tcp_tickets: Arc::new(SharedTickets::new(&k.token, k.previous_token.as_ref())),
        }
    }
}

/// How long a TCP session ticket is good for (what rustls's own ticketer uses).
const TCP_TICKET_LIFETIME: u32 = 6 * 60 * 60;

/// rustls session tickets sealed with AES-256-GCM under a key derived from the token key
/// (so the processes and hosts that share a key file accept each other's), accepted also
/// under the key before the last rotation. A ticket is `nonce (12) ‖ ciphertext ‖ tag`.
pub struct SharedTickets {
    /// `None` only if ring refused the key (it takes any 32 bytes): no tickets then.
    current: Option<ring::aead::LessSafeKey>,
    previous: Option<ring::aead::LessSafeKey>,
}

impl fmt::Debug for SharedTickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedTickets(…)")
    }
}

impl SharedTickets {
    fn new(token: &Secret, previous: Option<&Secret>) -> Self {
        let key = |s: &Secret| {
            let k = hmac::sign(&s.hmac(), b"spooky: tcp session tickets");
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, k.as_ref())
                .ok()
                .map(ring::aead::LessSafeKey::new)
        };
        Self {
            current: key(token),
            previous: previous.and_then(key),
        }
    }
}

impl rustls::server::ProducesTickets for SharedTickets {
    fn enabled(&self) -> bool {
        self.current.is_some()
    }

    fn lifetime(&self) -> u32 {
        TCP_TICKET_LIFETIME
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; ring::aead::NONCE_LEN];
        ring::rand::SystemRandom::new().fill(&mut nonce).ok()?;
        let mut sealed = plain.to_vec();
        self.current
            .as_ref()?
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::empty(),
                &mut sealed,
            )
            .ok()?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let nonce: [u8; ring::aead::NONCE_LEN] =
            cipher.get(..ring::aead::NONCE_LEN)?.try_into().ok()?;
        let body = cipher.get(ring::aead::NONCE_LEN..)?;
        [self.current.as_ref(), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .find_map(|key| {
                let mut buf = body.to_vec();
                let plain = key
                    .open_in_place(
                        ring::aead::Nonce::assume_unique_for_key(nonce),
                        ring::aead::Aad::empty(),
                        &mut buf,
                    )
                    .ok()?;
                Some(plain.to_vec())
            })
    }
}

/// Session-ticket key material derived from `token` (two HMAC-SHA256 outputs, truncated).
fn ticket_key(token: &Secret) -> [u8; TICKET_KEY_LEN] {
    let key = token.hmac();
    let first = hmac::sign(&key, b"spooky: session tickets, part 1");
    let second = hmac::sign(&key, b"spooky: session tickets, part 2");
    let mut out = [0u8; TICKET_KEY_LEN];
    out[..32].copy_from_slice(first.as_ref());
    out[32..].copy_from_slice(&second.as_ref()[..TICKET_KEY_LEN - 32]);
    out
}

/// Why keys could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the system has no randomness to make a key")]
    Randomness,
    #[error("{0}")]
    Malformed(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    reset: String,
    token: String,
    previous_token: Option<String>,
}

impl Keys {
    /// New random keys.
    ///
    /// # Errors
    /// [`KeyError::Randomness`].
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        Ok(Self {
            reset: Secret::random(rng)?,
            token: Secret::random(rng)?,
            previous_token: None,
        })
    }

    /// The keys in a key file's text.
    ///
    /// # Errors
    /// [`KeyError::Malformed`] naming the field.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let raw: RawKeys =
            serde_yaml::from_str(text).map_err(|e| KeyError::Malformed(e.to_string()))?;
        Ok(Self {
            reset: Secret::from_hex("reset", &raw.reset)?,
            token: Secret::from_hex("token", &raw.token)?,
            previous_token: raw
                .previous_token
                .as_deref()
                .map(|t| Secret::from_hex("previous_token", t))
                .transpose()?,
        })
    }

    /// The key file's text.
    pub fn to_text(&self) -> String {
        let mut s = String::from(
            "# Spooky's keys: stateless resets and Retry tokens. Keep it secret (mode 0600);\n\
             # share it across a fleet so that every host accepts the others' tokens.\n",
        );
        s.push_str(&format!(
            "reset: {}\ntoken: {}\n",
            self.reset.hex(),
            self.token.hex()
        ));
        if let Some(p) = &self.previous_token {
            s.push_str(&format!("previous_token: {}\n", p.hex()));
        }
        s
    }

    /// The key of the hash that places Initials on workers (`cid::fnv1a32_keyed`), derived
    /// from the reset key: processes that follow each other pass their keys on, so they place
    /// alike, and the connection IDs one minted to hash onto its workers still do while a
    /// successor's steering places them.
    pub fn cid_hash_key(&self) -> u32 {
        let tag = hmac::sign(&self.reset.hmac(), b"spooky: connection ID placement");
        let mut key = [0u8; 4];
        key.copy_from_slice(&tag.as_ref()[..4]);
        u32::from_le_bytes(key)
    }

    /// These keys after a rotation: a new token key, the current one kept as the previous.
    ///
    /// # Errors
    /// [`KeyError::Randomness`].
    pub fn rotated(&self, rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        Ok(Self {
            reset: self.reset.clone(),
            token: Secret::random(rng)?,
            previous_token: Some(self.token.clone()),
        })
    }

    /// The keys in the file at `path`, which is created with new keys (mode 0600) when it
    /// does not exist.
    ///
    /// # Errors
    /// [`KeyError`] when the file cannot be read, written or parsed.
    pub fn load_or_create(path: &Path, rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).map_err(|e| match e {
                KeyError::Malformed(m) => KeyError::Malformed(format!("{}: {m}", path.display())),
                other => other,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let keys = Self::generate(rng)?;
                write_private(path, &keys.to_text()).map_err(io)?;
                tracing::info!(path = %path.display(), "created the key file");
                Ok(keys)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Rotates the token key of the file at `path` (see [`Keys::rotated`]).
    ///
    /// # Errors
    /// [`KeyError`] when the file cannot be read, parsed or written.
    pub fn rotate_file(path: &Path, rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let next = Self::parse(&text)?.rotated(rng)?;
        write_private(path, &next.to_text()).map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(next)
    }
}

/// Writes `text` to `path` readable by its owner only, replacing it atomically; a missing
/// directory is created for the owner only (0700). (The ACME state is written this way too.)
pub(crate) fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_placement_key_follows_the_reset_key_through_token_rotations() {
        let rng = ring::rand::SystemRandom::new();
        let keys = Keys::generate(&rng).unwrap();
        let key = keys.cid_hash_key();
        assert_eq!(keys.clone().cid_hash_key(), key, "passed on: the same");
        assert_eq!(keys.rotated(&rng).unwrap().cid_hash_key(), key);
        let other = Keys::generate(&rng).unwrap();
        assert_ne!(
            other.cid_hash_key(),
            key,
            "another process's keys: another key"
        );
    }

    #[test]
    fn the_ticket_key_is_shared_by_copies_and_changes_with_a_rotation() {
        let rng = ring::rand::SystemRandom::new();
        let keys = Keys::generate(&rng).unwrap();
        let ticket = KeyRing::from(&keys).ticket;
        assert_eq!(
            KeyRing::from(&keys.clone()).ticket,
            ticket,
            "every worker: the same"
        );
        assert_ne!(
            ticket[..16],
            ticket[16..32],
            "name, HMAC and AES parts differ"
        );
        assert_ne!(KeyRing::from(&keys.rotated(&rng).unwrap()).ticket, ticket);
        let other = Keys::generate(&rng).unwrap();
        assert_ne!(KeyRing::from(&other).ticket, ticket);
    }

    #[test]
    fn tcp_tickets_open_wherever_the_keys_are_shared_and_for_one_rotation() {
        use rustls::server::ProducesTickets;
        let rng = ring::rand::SystemRandom::new();
        let keys = Keys::generate(&rng).unwrap();
        let a = KeyRing::from(&keys).tcp_tickets;
        let b = KeyRing::from(&keys.clone()).tcp_tickets;
        let plain = b"a resumption secret".to_vec();
        let t1 = a.encrypt(&plain).unwrap();
        let t2 = a.encrypt(&plain).unwrap();
        assert_ne!(t1, t2, "a fresh nonce each time");
        assert!(
            !t1.windows(plain.len()).any(|w| w == plain.as_slice()),
            "sealed"
        );
        assert_eq!(
            b.decrypt(&t1),
            Some(plain.clone()),
            "another host with the file"
        );
        let rotated = keys.rotated(&rng).unwrap();
        let r = KeyRing::from(&rotated).tcp_tickets;
        assert_eq!(
            r.decrypt(&t1),
            Some(plain.clone()),
            "the previous key still opens"
        );
        let twice = KeyRing::from(&rotated.rotated(&rng).unwrap()).tcp_tickets;
        assert_eq!(twice.decrypt(&t1), None, "two rotations later: no more");
        let other = KeyRing::from(&Keys::generate(&rng).unwrap()).tcp_tickets;
        assert_eq!(other.decrypt(&t1), None);
        let mut bad = t1.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(b.decrypt(&bad), None, "tampered");
        assert_eq!(b.decrypt(&t1[..10]), None, "cut short");
    }

    #[test]
    fn a_key_file_round_trips_and_rotates() {
        let rng = ring::rand::SystemRandom::new();
        let keys = Keys::generate(&rng).unwrap();
        assert_eq!(Keys::parse(&keys.to_text()).unwrap(), keys);
        let rotated = keys.rotated(&rng).unwrap();
        assert_eq!(rotated.reset, keys.reset, "the reset key stays");
        assert_eq!(rotated.previous_token.as_ref(), Some(&keys.token));
        assert_ne!(rotated.token, keys.token);
        let twice = rotated.rotated(&rng).unwrap();
        assert_eq!(twice.previous_token.as_ref(), Some(&rotated.token));
        assert_eq!(Keys::parse(&twice.to_text()).unwrap(), twice);
    }

    #[test]
    fn malformed_files_name_the_field() {
        let good = "0".repeat(64);
        let e = Keys::parse(&format!("reset: {good}\ntoken: abc\n")).unwrap_err();
        assert!(e.to_string().contains("token"), "{e}");
        let e = Keys::parse(&format!("reset: {good}\n")).unwrap_err();
        assert!(e.to_string().contains("token"), "{e}");
        let e = Keys::parse(&format!("reset: {good}\ntoken: {good}\nextra: 1\n")).unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        assert!(format!(
            "{:?}",
            Keys::parse(&format!("reset: {good}\ntoken: {good}\n"))
        )
        .contains("Secret(…)"));
    }

    #[test]
    fn a_missing_file_is_created_private_and_then_read_back() {
        let rng = ring::rand::SystemRandom::new();
        let dir = std::env::temp_dir().join(format!("spooky-keys-{}", std::process::id()));
        let path = dir.join("sub/keys.yaml");
        let _ = std::fs::remove_dir_all(&dir);
        let first = Keys::load_or_create(&path, &rng).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let made = std::fs::metadata(dir.join("sub"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(made & 0o777, 0o700, "the directory it made");
        assert_eq!(Keys::load_or_create(&path, &rng).unwrap(), first);
        let rotated = Keys::rotate_file(&path, &rng).unwrap();
        assert_eq!(Keys::load_or_create(&path, &rng).unwrap(), rotated);
        assert_eq!(rotated.previous_token, Some(first.token));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
