//! Server-chosen connection IDs in the QUIC-LB plaintext layout, and the hash that places
//! client-chosen connection IDs (Initial and 0-RTT packets) on a worker.
//!
//! ```text
//! byte 0        : 3 bits generation | 5 bits length of the rest (cid_len - 1)
//! bytes 1..1+S  : server id (S bytes)
//! byte 1+S      : worker index
//! rest          : nonce
//! ```
//!
//! Generation `0b111` is never used: QUIC-LB reserves it for unroutable IDs.

/// The longest connection ID QUIC v1 allows (RFC 9000 §17.2).
pub const MAX_CID_LEN: usize = 20;
/// The generation value QUIC-LB reserves for "unroutable".
pub const UNROUTABLE_GENERATION: u8 = 0b111;
/// Fewest random bytes a connection ID must carry after the routing bytes.
pub const MIN_NONCE_LEN: u8 = 4;
/// Longest server id the layout accepts.
pub const MAX_SERVER_ID_LEN: u8 = 8;

/// FNV-1a offset basis (32 bit).
pub const FNV_OFFSET: u32 = 0x811c_9dc5;
/// FNV-1a prime (32 bit).
pub const FNV_PRIME: u32 = 0x0100_0193;

/// One FNV-1a step; exposed so that the eBPF program can unroll the loop itself.
#[inline(always)]
pub const fn fnv1a32_step(hash: u32, byte: u8) -> u32 {
    (hash ^ byte as u32).wrapping_mul(FNV_PRIME)
}

/// FNV-1a (32 bit) of `bytes`: the one hash kernel and user space use to place a client-chosen
/// connection ID on a worker (`fnv1a32(dcid) % live_workers`).
#[inline(always)]
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut hash = FNV_OFFSET;
    let mut i = 0;
    while i < bytes.len() && i < MAX_CID_LEN {
        hash = fnv1a32_step(hash, bytes[i]);
        i += 1;
    }
    hash
}

/// The shape of this process's connection IDs: total length, server id length, generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidLayout {
    cid_len: u8,
    server_id_len: u8,
    generation: u8,
}

/// Why a layout was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// `cid_len` is outside what the layout can hold.
    CidLen,
    /// `server_id_len` is 0, too long, or leaves fewer than [`MIN_NONCE_LEN`] nonce bytes.
    ServerIdLen,
    /// `generation` is 7 (reserved) or does not fit in 3 bits.
    Generation,
}

impl CidLayout {
    /// A layout of `cid_len` bytes in all, `server_id_len` bytes of server id, `generation`.
    ///
    /// # Errors
    /// [`LayoutError`] when the parts do not fit in a QUIC connection ID with at least
    /// [`MIN_NONCE_LEN`] bytes of nonce, or the generation is reserved.
    pub const fn new(cid_len: u8, server_id_len: u8, generation: u8) -> Result<Self, LayoutError> {
        if cid_len as usize > MAX_CID_LEN || cid_len < 2 + 1 + MIN_NONCE_LEN {
            return Err(LayoutError::CidLen);
        }
        if server_id_len == 0
            || server_id_len > MAX_SERVER_ID_LEN
            || 1 + server_id_len + 1 + MIN_NONCE_LEN > cid_len
        {
            return Err(LayoutError::ServerIdLen);
        }
        if generation >= UNROUTABLE_GENERATION {
            return Err(LayoutError::Generation);
        }
        Ok(Self {
            cid_len,
            server_id_len,
            generation,
        })
    }

    /// Total connection ID length in bytes.
    pub const fn cid_len(&self) -> usize {
        self.cid_len as usize
    }

    /// Server id length in bytes.
    pub const fn server_id_len(&self) -> usize {
        self.server_id_len as usize
    }

    /// The generation (config rotation) bits.
    pub const fn generation(&self) -> u8 {
        self.generation
    }

    /// The first octet every connection ID of this layout starts with.
    pub const fn first_octet(&self) -> u8 {
        (self.generation << 5) | (self.cid_len - 1)
    }

    /// Offset of the worker byte inside a connection ID.
    pub const fn worker_offset(&self) -> usize {
        1 + self.server_id_len as usize
    }

    /// Writes a connection ID for `worker` into `out` (which must hold [`Self::cid_len`]
    /// bytes): first octet, `server_id` (padded with zeros or cut to the server id length),
    /// worker byte, then `nonce` bytes. Returns the number of bytes written, 0 when `out` or
    /// `nonce` is too short.
    pub fn write(&self, server_id: &[u8], worker: u8, nonce: &[u8], out: &mut [u8]) -> usize {
        let len = self.cid_len();
        let nonce_len = len - self.worker_offset() - 1;
        if out.len() < len || nonce.len() < nonce_len {
            return 0;
        }
        out[0] = self.first_octet();
        let mut i = 0;
        while i < self.server_id_len() {
            out[1 + i] = if i < server_id.len() { server_id[i] } else { 0 };
            i += 1;
        }
        out[self.worker_offset()] = worker;
        out[self.worker_offset() + 1..len].copy_from_slice(&nonce[..nonce_len]);
        len
    }

    /// The worker a destination connection ID names, when it is one of ours: exactly this
    /// layout's length, first octet carrying that length, and not the unroutable generation.
    /// `None` means "client-chosen": place it with [`fnv1a32`].
    pub fn worker_of(&self, dcid: &[u8]) -> Option<u8> {
        if dcid.len() != self.cid_len() {
            return None;
        }
        let first = dcid[0];
        if first & 0x1f != self.cid_len - 1 || first >> 5 == UNROUTABLE_GENERATION {
            return None;
        }
        Some(dcid[self.worker_offset()])
    }
}

/// The worker a packet with destination connection ID `dcid` belongs to, among `workers`
/// workers: the worker byte for our IDs (when in range), else `fnv1a32(dcid) % workers`.
pub fn steer(layout: &CidLayout, dcid: &[u8], workers: u32) -> u32 {
    if workers == 0 {
        return 0;
    }
    match layout.worker_of(dcid) {
        Some(w) if (w as u32) < workers => w as u32,
        _ => fnv1a32(dcid) % workers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> CidLayout {
        match CidLayout::new(16, 2, 1) {
            Ok(l) => l,
            Err(e) => unreachable!("{e:?}"),
        }
    }

    #[test]
    fn fnv_matches_reference_vectors() {
        // Reference values of 32-bit FNV-1a.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn write_then_read_back_the_worker() {
        let l = layout();
        let mut out = [0u8; 20];
        let n = l.write(&[0xab, 0xcd], 7, &[0x55; 20], &mut out);
        assert_eq!(n, 16);
        assert_eq!(out[0], (1 << 5) | 15);
        assert_eq!(&out[1..3], &[0xab, 0xcd]);
        assert_eq!(out[3], 7);
        assert_eq!(&out[4..16], &[0x55; 12]);
        assert_eq!(l.worker_of(&out[..16]), Some(7));
        assert_eq!(steer(&l, &out[..16], 8), 7);
    }

    #[test]
    fn foreign_ids_are_hashed() {
        let l = layout();
        let client = [0x11u8; 8];
        assert_eq!(l.worker_of(&client), None);
        assert_eq!(steer(&l, &client, 3), fnv1a32(&client) % 3);
        // Right length bits but the unroutable generation.
        let mut id = [0u8; 16];
        id[0] = (7 << 5) | 15;
        assert_eq!(l.worker_of(&id), None);
        // Our layout, but a worker index beyond the live count falls back to the hash.
        let mut ours = [0u8; 16];
        assert_eq!(l.write(&[1, 2], 9, &[0; 16], &mut ours), 16);
        assert_eq!(steer(&l, &ours, 4), fnv1a32(&ours) % 4);
    }

    #[test]
    fn layouts_that_cannot_fit_are_refused() {
        assert_eq!(CidLayout::new(21, 2, 0), Err(LayoutError::CidLen));
        assert_eq!(CidLayout::new(6, 1, 0), Err(LayoutError::CidLen));
        assert_eq!(CidLayout::new(8, 3, 0), Err(LayoutError::ServerIdLen));
        assert_eq!(CidLayout::new(16, 0, 0), Err(LayoutError::ServerIdLen));
        assert_eq!(CidLayout::new(16, 2, 7), Err(LayoutError::Generation));
        assert!(CidLayout::new(8, 2, 6).is_ok());
    }
}
