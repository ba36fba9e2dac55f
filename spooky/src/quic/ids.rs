//! The connection IDs a load balancer in front can route (`quic.connection_ids`): Spooky's
//! own layout, QUIC-LB (plaintext or encrypted, two configs during a rotation) or Katran's
//! version 2 or 3. Sans-IO: what a minted ID looks like once sealed, and which server an ID
//! names.
//!
//! Every format but Spooky's uses the load balancer's layout
//! ([`CidLayout::for_load_balancer`]): the front is the load balancer's, the last two bytes
//! (generation, worker) are what in-host steering — XDP, the sk_reuseport programs, user
//! space — reads, so steering never needs the key. The generation and worker are also the
//! first two nonce bytes, inside the encrypted part: ciphertexts never repeat across workers
//! or processes. Only a packet for no local connection is decrypted, to find the member it
//! belongs to.

use spooky_common::cid::{CidLayout, LayoutError, HOST_BYTES};

use super::quic_lb::QuicLb;
use crate::config::{CidFormat, QuicLbConfig};

/// What the first octet and the server id bytes are.
#[derive(Debug)]
enum Kind {
    Spooky,
    QuicLb {
        current: QuicLb,
        /// The config being rotated out: still read, never minted.
        previous: Option<QuicLb>,
        length_self_encoding: bool,
    },
    /// Katran: the first octet's top two bits are the version, the server id follows.
    Katran {
        version: u8,
    },
}

/// This process's connection ID format.
#[derive(Debug)]
pub struct IdFormat {
    layout: CidLayout,
    kind: Kind,
}

impl IdFormat {
    /// The format of `config` for IDs of `cid_len` bytes with a `server_id_len`-byte server
    /// id, process generation `generation`.
    ///
    /// # Errors
    /// The parts do not fit (the configuration check refuses those first).
    pub fn new(
        config: &CidFormat,
        cid_len: u8,
        server_id_len: u8,
        generation: u8,
    ) -> Result<Self, LayoutError> {
        let kind = match config {
            CidFormat::Spooky => {
                return Ok(Self {
                    layout: CidLayout::new(cid_len, server_id_len, generation)?,
                    kind: Kind::Spooky,
                })
            }
            CidFormat::Katran { version } => Kind::Katran { version: *version },
            CidFormat::QuicLb { current, previous } => {
                let nonce_len = usize::from(cid_len)
                    .checked_sub(1 + usize::from(server_id_len) + usize::from(HOST_BYTES))
                    .ok_or(LayoutError::CidLen)?;
                let make = |c: &QuicLbConfig| {
                    QuicLb::new(
                        c.rotation,
                        usize::from(server_id_len),
                        nonce_len,
                        c.key,
                        false,
                    )
                    .map_err(|_| LayoutError::ServerIdLen)
                };
                Kind::QuicLb {
                    current: make(current)?,
                    previous: previous.as_ref().map(make).transpose()?,
                    length_self_encoding: current.length_self_encoding,
                }
            }
        };
        Ok(Self {
            layout: CidLayout::for_load_balancer(cid_len, server_id_len, generation)?,
            kind,
        })
    }

    /// The layout in-host steering reads.
    pub fn layout(&self) -> CidLayout {
        self.layout
    }

    /// Whether the server id is in plaintext at offset 1, where the XDP program reads it to
    /// forward another member's packets (not so with encrypted QUIC-LB: user space decrypts).
    pub fn server_id_in_plaintext(&self) -> bool {
        match &self.kind {
            Kind::QuicLb {
                current, previous, ..
            } => current.is_plaintext() && previous.as_ref().is_none_or(QuicLb::is_plaintext),
            _ => true,
        }
    }

    /// A connection ID of `worker` with `server_id`: placed (hashing onto `worker` of
    /// `workers` under `key`, for IDs a client's Initials will carry, see
    /// [`CidLayout::write_placed`]) or not, sealed. `fill` draws random bytes. Returns the
    /// length written into `out` (20 bytes hold any).
    pub fn write(
        &self,
        server_id: &[u8],
        worker: u8,
        placed: Option<(u32, u32)>,
        mut fill: impl FnMut(&mut [u8]),
        out: &mut [u8],
    ) -> usize {
        let seal = |id: &mut [u8], random: u8| self.seal(id, random);
        match placed {
            Some((key, workers)) => self
                .layout
                .write_placed_sealed(server_id, worker, key, workers, fill, seal, out),
            None => {
                let mut nonce = [0u8; spooky_common::MAX_CID_LEN];
                fill(&mut nonce);
                let n = self.layout.write(server_id, worker, &nonce, out);
                if n != 0 {
                    self.seal(&mut out[..n], nonce[spooky_common::MAX_CID_LEN - 1]);
                }
                n
            }
        }
    }

    /// Turns an ID [`CidLayout::write`] made into its final form: the load balancer's first
    /// octet (with `random`'s bits where the format has no meaning for them) and, for
    /// encrypted QUIC-LB, the encrypted server id and nonce. Spooky's layout is left as is.
    fn seal(&self, id: &mut [u8], random: u8) {
        let len = id.len();
        match &self.kind {
            Kind::Spooky => {}
            Kind::Katran { version } => id[0] = version << 6 | (random & 0x3f),
            Kind::QuicLb {
                current,
                length_self_encoding,
                ..
            } => {
                let sid_end = 1 + self.layout.server_id_len();
                let body_end = len - usize::from(HOST_BYTES);
                let low = if *length_self_encoding {
                    (len - 1) as u8
                } else {
                    random
                };
                if let Some(sealed) = current.encode(&id[1..sid_end], &id[sid_end..body_end], low) {
                    id[..body_end].copy_from_slice(&sealed);
                }
            }
        }
    }

    /// Whether `dcid`, in our layout, is not `own`'s: it names another server, or it carries a
    /// codepoint (QUIC-LB) or version (Katran) of a configuration we do not have — another
    /// host's, minted under a configuration rolled out there first. Such packets are never
    /// answered with a Stateless Reset (RFC 9000 §21.11).
    pub fn names_another_server(&self, dcid: &[u8], own: &[u8]) -> bool {
        if self.layout.generation_of(dcid).is_none() {
            return false;
        }
        match self.server_id_of(dcid) {
            Some(id) => id != own,
            None => !matches!(self.kind, Kind::Spooky),
        }
    }

    /// The server id a destination connection ID names, when it is one of ours by the
    /// layout and (QUIC-LB) carries the codepoint of the current or the previous config.
    pub fn server_id_of(&self, dcid: &[u8]) -> Option<Vec<u8>> {
        self.layout.generation_of(dcid)?;
        match &self.kind {
            Kind::QuicLb {
                current, previous, ..
            } => {
                let rotation = QuicLb::rotation_of(dcid)?;
                [Some(current), previous.as_ref()]
                    .into_iter()
                    .flatten()
                    .find(|c| c.rotation() == rotation)?
                    .server_id(dcid)
            }
            Kind::Katran { version } if dcid[0] >> 6 != *version => None,
            _ => dcid
                .get(1..1 + self.layout.server_id_len())
                .map(<[u8]>::to_vec),
        }
    }
}

#[cfg(test)]
mod tests;
