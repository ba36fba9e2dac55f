//! Server-chosen connection IDs, and the hash that places client-chosen connection IDs
//! (Initial and 0-RTT packets) on a worker. Two layouts:
//!
//! Spooky's own, the QUIC-LB plaintext layout with the process generation as its config
//! rotation bits:
//!
//! ```text
//! byte 0        : 3 bits generation | 5 bits length of the rest (cid_len - 1)
//! bytes 1..1+S  : server id (S bytes)
//! byte 1+S      : worker index
//! rest          : nonce
//! ```
//!
//! The load balancer's ([`CidLayout::for_load_balancer`]): the front belongs to a load
//! balancer's format (QUIC-LB in any mode, Katran), which user space writes and may encrypt;
//! the two host-local bytes at the end are what in-host steering reads, and are also the
//! first two nonce bytes, so that the encrypted part never repeats across workers and
//! generations:
//!
//! ```text
//! byte 0              : the load balancer's (config rotation, Katran version…)
//! bytes 1..len-2      : server id (S bytes) | generation | worker | random  (maybe encrypted)
//! byte len-2          : generation
//! byte len-1          : worker index
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
/// Host-local bytes (generation, worker) at the end of a load balancer's layout.
pub const HOST_BYTES: u8 = 2;

/// FNV-1a offset basis (32 bit).
pub const FNV_OFFSET: u32 = 0x811c_9dc5;
/// FNV-1a prime (32 bit).
pub const FNV_PRIME: u32 = 0x0100_0193;

/// One FNV-1a step; exposed so that the eBPF program can unroll the loop itself.
#[inline(always)]
pub const fn fnv1a32_step(hash: u32, byte: u8) -> u32 {
    (hash ^ byte as u32).wrapping_mul(FNV_PRIME)
}

/// FNV-1a (32 bit) of `bytes`.
#[inline(always)]
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    fnv1a32_keyed(0, bytes)
}

/// FNV-1a (32 bit) of `bytes` from the offset basis `FNV_OFFSET ^ key`: the one hash kernel and
/// user space use to place a client-chosen connection ID on a worker
/// (`fnv1a32_keyed(key, dcid) % live_workers`). The key is a secret (derived from the reset
/// key, so it is the same along a chain of takeovers), so a client cannot choose DCIDs that
/// land on a worker of its choice. (FNV with a secret basis is no MAC: it hides the mapping
/// from a blind sender, it does not resist one that can observe which worker answered; no
/// DCID-keyed hash spreads a flood that repeats one DCID; and modulo a power of two FNV-1a is
/// linear in the low bits of the bytes, so DCIDs can be made to land together, on a worker
/// only the key names. Random DCIDs, clients' and ours, are spread evenly.)
#[inline(always)]
pub fn fnv1a32_keyed(key: u32, bytes: &[u8]) -> u32 {
    let mut hash = FNV_OFFSET ^ key;
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
    /// The front is a load balancer's; generation and worker are the last two bytes.
    lb: bool,
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
        Self::checked(cid_len, server_id_len, generation, false)
    }

    /// The load balancer's layout (see the module): first octet and server id in a load
    /// balancer's format, generation and worker in the last two bytes, and in the nonce.
    ///
    /// # Errors
    /// As [`Self::new`]; the nonce (generation, worker and random bytes) must have
    /// [`MIN_NONCE_LEN`] random bytes besides the two host bytes.
    pub const fn for_load_balancer(
        cid_len: u8,
        server_id_len: u8,
        generation: u8,
    ) -> Result<Self, LayoutError> {
        Self::checked(cid_len, server_id_len, generation, true)
    }

    const fn checked(
        cid_len: u8,
        server_id_len: u8,
        generation: u8,
        lb: bool,
    ) -> Result<Self, LayoutError> {
        // Besides first octet, server id and random nonce: the worker byte, or generation
        // and worker twice.
        let fixed = if lb { 2 * HOST_BYTES } else { 1 };
        if cid_len as usize > MAX_CID_LEN || cid_len < 1 + 1 + fixed + MIN_NONCE_LEN {
            return Err(LayoutError::CidLen);
        }
        if server_id_len == 0
            || server_id_len > MAX_SERVER_ID_LEN
            || 1 + server_id_len + fixed + MIN_NONCE_LEN > cid_len
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
            lb,
        })
    }

    /// Whether this is the load balancer's layout.
    pub const fn is_for_load_balancer(&self) -> bool {
        self.lb
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
        if self.lb {
            self.cid_len as usize - 1
        } else {
            1 + self.server_id_len as usize
        }
    }

    /// Offset of the byte carrying the generation: the first octet's top 3 bits in Spooky's
    /// layout, the whole byte before the worker's in the load balancer's.
    pub const fn generation_offset(&self) -> usize {
        if self.lb {
            self.cid_len as usize - 2
        } else {
            0
        }
    }

    /// Writes a connection ID for `worker` into `out` (which must hold [`Self::cid_len`]
    /// bytes): first octet, `server_id` (padded with zeros or cut to the server id length),
    /// worker byte, then `nonce` bytes; in the load balancer's layout a zero first octet (the
    /// caller's to set), the server id, generation, worker, `nonce` bytes, generation, worker.
    /// Returns the number of bytes written, 0 when `out` or `nonce` is too short.
    pub fn write(&self, server_id: &[u8], worker: u8, nonce: &[u8], out: &mut [u8]) -> usize {
        let len = self.cid_len();
        let sid_end = 1 + self.server_id_len();
        let host = [self.generation, worker];
        let (fixed, nonce_len) = if self.lb {
            (&host[..], len - sid_end - 2 * HOST_BYTES as usize)
        } else {
            (&host[1..], len - sid_end - 1)
        };
        if out.len() < len || nonce.len() < nonce_len {
            return 0;
        }
        out[0] = if self.lb { 0 } else { self.first_octet() };
        let mut i = 0;
        while i < self.server_id_len() {
            out[1 + i] = if i < server_id.len() { server_id[i] } else { 0 };
            i += 1;
        }
        let nonce_at = sid_end + fixed.len();
        out[sid_end..nonce_at].copy_from_slice(fixed);
        out[nonce_at..nonce_at + nonce_len].copy_from_slice(&nonce[..nonce_len]);
        if self.lb {
            out[len - 2..len].copy_from_slice(&host);
        }
        len
    }

    /// Writes a connection ID for worker `worker` of `workers` (as [`Self::write`]) that the
    /// Initial rule of [`place`] puts on that worker: `fnv1a32_keyed(key, id) % workers ==
    /// worker`. An Initial's worker byte is never trusted (a client may choose a DCID that
    /// only looks like ours), so the IDs a client's Initials carry, the handshake's and a
    /// Retry's, are made to hash where they belong. Nonces are drawn with `fill` until one
    /// does (about `workers` draws); after `64 × workers` draws the last is kept (a chance
    /// below e⁻⁶⁴) and the worker its Initials reach forwards them. Returns the length
    /// written, 0 as [`Self::write`] does.
    pub fn write_placed(
        &self,
        server_id: &[u8],
        worker: u8,
        key: u32,
        workers: u32,
        fill: impl FnMut(&mut [u8]),
        out: &mut [u8],
    ) -> usize {
        self.write_placed_sealed(server_id, worker, key, workers, fill, |_, _| {}, out)
    }

    /// [`Self::write_placed`] for the load balancer's layout: `seal` turns each candidate
    /// into its final form (first octet, encryption) before its hash is checked. It gets the
    /// candidate and a random byte of its own (the last byte of the draw, which no layout's
    /// nonce reaches).
    #[allow(clippy::too_many_arguments)]
    pub fn write_placed_sealed(
        &self,
        server_id: &[u8],
        worker: u8,
        key: u32,
        workers: u32,
        mut fill: impl FnMut(&mut [u8]),
        mut seal: impl FnMut(&mut [u8], u8),
        out: &mut [u8],
    ) -> usize {
        let mut nonce = [0u8; MAX_CID_LEN];
        let tries = 64 * workers.max(1);
        let mut n = 0;
        for _ in 0..tries {
            fill(&mut nonce);
            n = self.write(server_id, worker, &nonce, out);
            if n != 0 {
                seal(&mut out[..n], nonce[MAX_CID_LEN - 1]);
            }
            if n == 0
                || fnv1a32_keyed(key, &out[..n]).checked_rem(workers) == Some(u32::from(worker))
            {
                break;
            }
        }
        n
    }

    /// The same layout for another generation (a process taking over from this one).
    ///
    /// # Errors
    /// [`LayoutError::Generation`] for the reserved generation.
    pub const fn with_generation(&self, generation: u8) -> Result<Self, LayoutError> {
        if self.lb {
            Self::for_load_balancer(self.cid_len, self.server_id_len, generation)
        } else {
            Self::new(self.cid_len, self.server_id_len, generation)
        }
    }

    /// The worker a destination connection ID names, when it is one of ours: exactly this
    /// layout's length, first octet carrying that length (in the load balancer's layout: a
    /// generation byte below 7), and not the unroutable generation.
    /// `None` means "client-chosen": place it with [`fnv1a32`]. Any generation is accepted
    /// (see [`CidLayout::generation_of`]).
    pub fn worker_of(&self, dcid: &[u8]) -> Option<u8> {
        self.generation_of(dcid)?;
        dcid.get(self.worker_offset()).copied()
    }

    /// The generation a destination connection ID carries, when it has this layout.
    pub fn generation_of(&self, dcid: &[u8]) -> Option<u8> {
        if dcid.len() != self.cid_len() {
            return None;
        }
        if self.lb {
            let generation = *dcid.get(self.generation_offset())?;
            return (generation < UNROUTABLE_GENERATION).then_some(generation);
        }
        let first = *dcid.first()?;
        let generation = first >> 5;
        if first & 0x1f != self.cid_len - 1 || generation == UNROUTABLE_GENERATION {
            return None;
        }
        Some(generation)
    }
}

/// The generation after `generation`: the next value of 0..=6, wrapping, never the reserved 7.
pub const fn next_generation(generation: u8) -> u8 {
    (generation + 1) % UNROUTABLE_GENERATION
}

/// Where a packet belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Worker `worker` of the process that owns `generation`; `by_cid`: one of our
    /// connection IDs named it (else the DCID was hashed).
    Worker {
        generation: u8,
        worker: u32,
        by_cid: bool,
    },
    /// One of our connection IDs whose generation no live process owns (a process that
    /// finished or crashed), or that names a worker that generation does not have.
    Unowned,
}

/// The one placement rule, for the kernel programs, the classic BPF generator and user space
/// alike. `newest` is the generation new connections go to; `workers(g)` is the number of
/// workers of the live process of generation `g`, 0 when no live process owns it.
///
/// - A packet other than an Initial whose DCID is one of ours goes to the generation and
///   worker it names, when that generation is live and has that worker; else nobody's (a
///   crashed or finished process's connection: user space answers with a Stateless Reset).
/// - An Initial (`initial`) whose DCID is one of ours by the look never has its worker byte
///   trusted: a client may choose a DCID that only looks like ours to aim at one worker. It
///   is hashed onto a worker of the generation it names, `fnv1a32_keyed(key, dcid) %
///   workers(g)`, when that generation is live. The IDs we hand out for Initials (the
///   handshake's, a Retry's) are minted to hash onto their own worker
///   ([`CidLayout::write_placed`]), so the client's later Initials and the answer to a Retry
///   still reach the worker that has their connection.
/// - Any other DCID is a client's choice (a new connection's first Initials and 0-RTT):
///   worker `fnv1a32_keyed(key, dcid) % workers` of the newest generation.
#[inline(always)]
pub fn place<F: Fn(u8) -> u32>(
    layout: &CidLayout,
    dcid: &[u8],
    initial: bool,
    key: u32,
    newest: u8,
    workers: F,
) -> Place {
    if let Some(generation) = layout.generation_of(dcid) {
        if initial {
            if let Some(worker) = fnv1a32_keyed(key, dcid).checked_rem(workers(generation)) {
                return Place::Worker {
                    generation,
                    worker,
                    by_cid: false,
                };
            }
        } else {
            let worker = dcid
                .get(layout.worker_offset())
                .map_or(u32::MAX, |w| *w as u32);
            if worker < workers(generation) {
                return Place::Worker {
                    generation,
                    worker,
                    by_cid: true,
                };
            }
            return Place::Unowned;
        }
    }
    match fnv1a32_keyed(key, dcid).checked_rem(workers(newest)) {
        Some(worker) => Place::Worker {
            generation: newest,
            worker,
            by_cid: false,
        },
        None => Place::Unowned,
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
        assert_eq!(l.generation_of(&out[..16]), Some(1));
    }

    /// Generation 1 has 8 workers, 2 has 3 (the newest); the others are not live.
    fn live(g: u8) -> u32 {
        match g {
            1 => 8,
            2 => 3,
            _ => 0,
        }
    }

    fn ours(generation: u8, worker: u8) -> [u8; 16] {
        let mut id = [0u8; 16];
        let l = layout()
            .with_generation(generation)
            .unwrap_or_else(|e| unreachable!("{e:?}"));
        assert_eq!(l.write(&[1, 2], worker, &[0; 16], &mut id), 16);
        id
    }

    #[test]
    fn our_ids_go_to_the_worker_and_generation_they_name() {
        let l = layout();
        for (g, w) in [(1, 7), (2, 0), (2, 2)] {
            let id = ours(g, w);
            assert_eq!(
                place(&l, &id, false, 0, 2, live),
                Place::Worker {
                    generation: g,
                    worker: u32::from(w),
                    by_cid: true
                }
            );
        }
    }

    #[test]
    fn our_ids_nobody_owns_are_unowned_never_hashed() {
        let l = layout();
        // A generation no live process has (finished or crashed), and a worker its
        // generation does not have: hashing either onto a live worker would hand a stranger's
        // packet to a process that cannot decrypt it; unowned, it gets a Stateless Reset.
        assert_eq!(place(&l, &ours(5, 0), false, 0, 2, live), Place::Unowned);
        assert_eq!(place(&l, &ours(2, 3), false, 0, 2, live), Place::Unowned);
        // Right length bits but the unroutable generation: not ours, hashed.
        let mut id = [0u8; 16];
        id[0] = (7 << 5) | 15;
        assert_eq!(l.worker_of(&id), None);
        assert!(matches!(
            place(&l, &id, false, 0, 2, live),
            Place::Worker {
                generation: 2,
                by_cid: false,
                ..
            }
        ));
    }

    #[test]
    fn new_connections_and_foreign_ids_hash_onto_the_newest() {
        let l = layout();
        let client = [0x11u8; 8];
        assert_eq!(l.worker_of(&client), None);
        let want = Place::Worker {
            generation: 2,
            worker: fnv1a32(&client) % 3,
            by_cid: false,
        };
        assert_eq!(place(&l, &client, true, 0, 2, live), want);
        assert_eq!(place(&l, &client, false, 0, 2, live), want);
        // An Initial whose DCID looks like ours of a generation nobody owns is a new
        // connection: hashed onto the newest.
        let lookalike = ours(5, 0);
        assert_eq!(
            place(&l, &lookalike, true, 0, 2, live),
            Place::Worker {
                generation: 2,
                worker: fnv1a32(&lookalike) % 3,
                by_cid: false
            }
        );
        // One of a live generation is hashed onto that generation's workers: its worker
        // byte (here 3, which generation 2 does not even have) is not trusted.
        for (g, w, workers) in [(2, 3, 3), (2, 0, 3), (1, 7, 8)] {
            let lookalike = ours(g, w);
            assert_eq!(
                place(&l, &lookalike, true, 0, 2, live),
                Place::Worker {
                    generation: g,
                    worker: fnv1a32(&lookalike) % workers,
                    by_cid: false
                }
            );
        }
        // No live newest generation: nobody takes it.
        assert_eq!(place(&l, &client, true, 0, 4, live), Place::Unowned);
    }

    #[test]
    fn minted_ids_hash_onto_their_own_worker() {
        let l = layout();
        let mut seed = 1u32;
        let mut fill = |buf: &mut [u8]| {
            for b in buf.iter_mut() {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                *b = (seed >> 16) as u8;
            }
        };
        for (key, workers) in [(0, 3), (0x5eed_1234, 8), (7, 256), (9, 1)] {
            for worker in [0, workers - 1, workers / 2] {
                let mut id = [0u8; 20];
                let n = l.write_placed(&[1, 2], worker as u8, key, workers, &mut fill, &mut id);
                assert_eq!(n, 16);
                assert_eq!(l.worker_of(&id[..n]), Some(worker as u8));
                assert_eq!(
                    place(&l, &id[..n], true, key, 1, |_| workers),
                    Place::Worker {
                        generation: 1,
                        worker,
                        by_cid: false
                    },
                    "key {key:#x}, {workers} workers"
                );
            }
        }
    }

    fn lb_layout(generation: u8) -> CidLayout {
        CidLayout::for_load_balancer(14, 3, generation).unwrap_or_else(|e| unreachable!("{e:?}"))
    }

    #[test]
    fn the_load_balancers_layout_keeps_the_host_bytes_at_the_end_and_in_the_nonce() {
        let l = lb_layout(2);
        let mut out = [0u8; 20];
        let n = l.write(&[0xab, 0xcd, 0xef], 9, &[0x55; 20], &mut out);
        assert_eq!(n, 14);
        assert_eq!(
            &out[..14],
            &[0, 0xab, 0xcd, 0xef, 2, 9, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 2, 9]
        );
        // Whatever the load balancer's format does to the front, the end steers.
        let mut sealed = out;
        for b in &mut sealed[..12] {
            *b ^= 0xa5;
        }
        assert_eq!(l.generation_of(&sealed[..14]), Some(2));
        assert_eq!(l.worker_of(&sealed[..14]), Some(9));
        assert_eq!(l.worker_offset(), 13);
        assert_eq!(l.generation_offset(), 12);
        let live = |g: u8| if g == 2 { 10 } else { 0 };
        assert_eq!(
            place(&l, &sealed[..14], false, 0, 2, live),
            Place::Worker {
                generation: 2,
                worker: 9,
                by_cid: true
            }
        );
        // Another length, or the unroutable generation byte: not ours.
        assert_eq!(l.generation_of(&sealed[..13]), None);
        sealed[12] = 7;
        assert_eq!(l.worker_of(&sealed[..14]), None);
        assert_eq!(
            l.with_generation(3).map(|l| l.is_for_load_balancer()),
            Ok(true)
        );
    }

    #[test]
    fn sealed_ids_are_placed_after_sealing() {
        let l = lb_layout(1);
        let mut seed = 7u32;
        let mut fill = |buf: &mut [u8]| {
            for b in buf.iter_mut() {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                *b = (seed >> 16) as u8;
            }
        };
        let seal = |id: &mut [u8], _: u8| {
            id[0] = 0x40;
            for b in &mut id[1..12] {
                *b = b.rotate_left(3) ^ 0x3c;
            }
        };
        for worker in [0u8, 3, 7] {
            let mut id = [0u8; 20];
            let n = l.write_placed_sealed(&[1, 2, 3], worker, 0xfeed, 8, &mut fill, seal, &mut id);
            assert_eq!(n, 14);
            assert_eq!(id[0], 0x40, "sealed");
            assert_eq!(fnv1a32_keyed(0xfeed, &id[..n]) % 8, u32::from(worker));
            assert_eq!(l.worker_of(&id[..n]), Some(worker));
        }
    }

    #[test]
    fn generations_wrap_around_the_reserved_one() {
        assert_eq!(next_generation(0), 1);
        assert_eq!(next_generation(5), 6);
        assert_eq!(next_generation(6), 0);
    }

    #[test]
    fn layouts_that_cannot_fit_are_refused() {
        assert_eq!(CidLayout::new(21, 2, 0), Err(LayoutError::CidLen));
        assert_eq!(CidLayout::new(6, 1, 0), Err(LayoutError::CidLen));
        assert_eq!(CidLayout::new(8, 3, 0), Err(LayoutError::ServerIdLen));
        assert_eq!(CidLayout::new(16, 0, 0), Err(LayoutError::ServerIdLen));
        assert_eq!(CidLayout::new(16, 2, 7), Err(LayoutError::Generation));
        assert!(CidLayout::new(8, 2, 6).is_ok());
        // The load balancer's: two host bytes at the end and two in the nonce besides four
        // random ones.
        assert_eq!(
            CidLayout::for_load_balancer(9, 1, 0),
            Err(LayoutError::CidLen)
        );
        assert_eq!(
            CidLayout::for_load_balancer(11, 3, 0),
            Err(LayoutError::ServerIdLen)
        );
        assert!(CidLayout::for_load_balancer(11, 2, 0).is_ok());
        assert_eq!(
            CidLayout::for_load_balancer(20, 4, 7),
            Err(LayoutError::Generation)
        );
    }
}

#[cfg(test)]
mod keyed {
    use super::*;

    #[test]
    fn the_key_moves_client_dcids_between_workers() {
        let l = match CidLayout::new(16, 2, 0) {
            Ok(l) => l,
            Err(e) => unreachable!("{e:?}"),
        };
        let dcids: [[u8; 8]; 64] = core::array::from_fn(|n| [n as u8, 7, 7, 7, 7, 7, 7, 7]);
        let on = |key: u32| -> [Place; 64] {
            core::array::from_fn(|i| place(&l, &dcids[i], true, key, 0, |_| 8))
        };
        assert_eq!(on(0), on(0));
        assert_ne!(
            on(0),
            on(0x5eed_1234),
            "a different key, a different mapping"
        );
        assert_eq!(fnv1a32_keyed(0, b"foobar"), fnv1a32(b"foobar"));
    }
}
