//! The classic BPF program of the unprivileged tier. Attached to the SO_REUSEPORT group, it
//! returns the index (in the group) of the socket that owns a packet, by the one placement
//! rule, [`spooky_common::cid::place`]: a packet whose DCID is one of ours goes to the
//! generation and worker it names; a DCID of ours that no live generation owns gets no choice
//! (an index past the group, so the kernel hashes it and user space answers with a Stateless
//! Reset); any other DCID (a new connection's) goes to the newest generation's worker
//! `fnv1a32(DCID) % workers`. Which socket each worker is comes from a [`SocketTable`].
//!
//! The group's order is the order sockets joined it, and a socket that leaves is replaced by
//! the last one, so a table can go stale when a process leaves the group. A probe finds the
//! order again: a 9-byte datagram `PROBE_MAGIC ‖ k` is steered to socket `k` by every program
//! this module makes, and the worker that receives it reports `k` ([`probe_index`]). Probes
//! cannot be mistaken for QUIC (their first byte has the fixed bit clear).
//!
//! The unit tests check the program against `place` by running it in the interpreter here
//! ([`interpret`]); the integration tests run it in the kernel.

use spooky_common::cid::{FNV_OFFSET, FNV_PRIME, UNROUTABLE_GENERATION};
use spooky_common::{CidLayout, MAX_CID_LEN};
use std::os::fd::AsRawFd;

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    /// Opcode.
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
const LD_B_IND: u16 = 0x50; // BPF_LD | BPF_B | BPF_IND: A = pkt[X + k]
const LD_MEM: u16 = 0x60; // BPF_LD | BPF_MEM
const LD_IMM: u16 = 0x00; // BPF_LD | BPF_W | BPF_IMM
const ST: u16 = 0x02;
const TAX: u16 = 0x07; // BPF_MISC | BPF_TAX
const ALU_ADD_X: u16 = 0x0c; // BPF_ALU | BPF_ADD | BPF_X
const ALU_XOR_X: u16 = 0xac; // BPF_ALU | BPF_XOR | BPF_X
const ALU_MUL_K: u16 = 0x24;
const ALU_MOD_K: u16 = 0x94;
const ALU_AND_K: u16 = 0x54;
const ALU_RSH_K: u16 = 0x74;
const JMP_JGT_K: u16 = 0x25;
const JMP_JEQ_K: u16 = 0x15;
const JMP_JSET_K: u16 = 0x45;
const JMP_JA: u16 = 0x05;
const RET_A: u16 = 0x16;
const RET_K: u16 = 0x06;

/// What the program returns for a packet nobody owns: past any group, so the kernel hashes it.
pub const NO_CHOICE: u32 = u32::MAX;
/// The first 8 bytes of a probe; the 9th is the socket index it asks for.
pub const PROBE_MAGIC: [u8; 8] = *b"\0SPOOKY\0";

/// Scratch memory cells of the program.
const M_HASH: u32 = 0;
const M_DCID_LEN: u32 = 1;
const M_DCID_AT: u32 = 2;
const M_FIRST: u32 = 3;
const M_GENERATION: u32 = 4;
const M_WORKER: u32 = 5;
/// 1 for a v1 or v2 Initial (its DCID may be a client's that only looks like ours).
const M_INITIAL: u32 = 6;
const QUIC_V1: u32 = 1;
const QUIC_V2: u32 = 0x6b33_43cf;

/// The sockets of one live generation: `sockets[w]` is worker `w`'s index in the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerationSockets {
    pub generation: u8,
    pub sockets: Vec<u32>,
}

/// Which socket of the group each worker of each live generation is, and the newest
/// generation (where new connections go).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketTable {
    pub newest: u8,
    pub generations: Vec<GenerationSockets>,
    /// Key of the hash placing client-chosen DCIDs (`cid::fnv1a32_keyed`).
    pub hash_key: u32,
}

impl SocketTable {
    /// A process alone in the group: generation `generation`, worker `w` is socket `w`.
    pub fn alone(generation: u8, workers: u32) -> Self {
        Self {
            newest: generation,
            generations: vec![GenerationSockets {
                generation,
                sockets: (0..workers).collect(),
            }],
            hash_key: 0,
        }
    }

    /// The sockets of `generation`, when it is live.
    pub fn of(&self, generation: u8) -> Option<&[u32]> {
        self.generations
            .iter()
            .find(|g| g.generation == generation)
            .map(|g| g.sockets.as_slice())
    }
}

/// The socket index a probe datagram asks for.
pub fn probe_index(datagram: &[u8]) -> Option<u32> {
    match datagram {
        [magic @ .., index] if magic == PROBE_MAGIC => Some(u32::from(*index)),
        _ => None,
    }
}

/// A probe datagram asking for socket `index`.
pub fn probe(index: u8) -> [u8; 9] {
    let mut p = [0u8; 9];
    p[..8].copy_from_slice(&PROBE_MAGIC);
    p[8] = index;
    p
}

/// A label in the program being assembled.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Label(usize);

/// A tiny assembler: conditional jumps go to the next instruction or over it, and every far
/// jump is a `ja` (32-bit offset), so no distance ever overflows the 8-bit `jt`/`jf`.
#[derive(Default)]
struct Asm {
    code: Vec<Insn>,
    labels: Vec<Option<usize>>,
    /// `ja` instructions to patch: (instruction index, target).
    fixups: Vec<(usize, Label)>,
}

impl Asm {
    fn op(&mut self, code: u16, k: u32) {
        self.code.push(Insn {
            code,
            jt: 0,
            jf: 0,
            k,
        });
    }

    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    fn here(&mut self, l: Label) {
        if let Some(slot) = self.labels.get_mut(l.0) {
            *slot = Some(self.code.len());
        }
    }

    fn ja(&mut self, to: Label) {
        self.fixups.push((self.code.len(), to));
        self.op(JMP_JA, 0);
    }

    /// If `A <cond> k` jump to `to`, else fall through.
    fn jump_if(&mut self, code: u16, k: u32, to: Label) {
        // cond → the `ja` right after; else skip it.
        self.code.push(Insn {
            code,
            jt: 0,
            jf: 1,
            k,
        });
        self.ja(to);
    }

    /// If not `A <cond> k` jump to `to`, else fall through.
    fn jump_unless(&mut self, code: u16, k: u32, to: Label) {
        self.code.push(Insn {
            code,
            jt: 1,
            jf: 0,
            k,
        });
        self.ja(to);
    }

    /// `return sockets[A]` for `A` among the workers, else fall through.
    fn lookup(&mut self, sockets: &[u32]) {
        for (w, index) in sockets.iter().enumerate() {
            self.code.push(Insn {
                code: JMP_JEQ_K,
                jt: 0,
                jf: 1,
                k: w as u32,
            });
            self.op(RET_K, *index);
        }
    }

    fn finish(mut self) -> Vec<Insn> {
        for (at, to) in std::mem::take(&mut self.fixups) {
            let target = self.labels.get(to.0).copied().flatten().unwrap_or(at + 1);
            if let Some(insn) = self.code.get_mut(at) {
                insn.k = target.saturating_sub(at + 1) as u32;
            }
        }
        self.code
    }
}

/// The reuseport program for `layout` (cid length, server id length) and `table`. It runs on
/// the UDP payload.
pub fn reuseport_program(layout: &CidLayout, table: &SocketTable) -> Vec<Insn> {
    let cid_len = layout.cid_len() as u32;
    let w_off = layout.worker_offset() as u32;
    let mut a = Asm::default();
    let (not_probe, long, existing, hash, unowned, junk) = (
        a.label(),
        a.label(),
        a.label(),
        a.label(),
        a.label(),
        a.label(),
    );

    a.op(LD_IMM, 0);
    a.op(ST, M_INITIAL);
    // No generation yet: 7 (unroutable) is nobody's.
    a.op(LD_IMM, u32::from(UNROUTABLE_GENERATION));
    a.op(ST, M_GENERATION);
    // A probe: `PROBE_MAGIC ‖ k` → socket k.
    a.op(LD_W_ABS, 0);
    a.jump_unless(JMP_JEQ_K, word(&PROBE_MAGIC[..4]), not_probe);
    a.op(LD_W_ABS, 4);
    a.jump_unless(JMP_JEQ_K, word(&PROBE_MAGIC[4..]), not_probe);
    a.op(LD_B_ABS, 8);
    a.op(RET_A, 0);
    a.here(not_probe);

    // Short header: the DCID is the `cid_len` bytes at 1.
    a.op(LD_B_ABS, 0);
    a.jump_if(JMP_JSET_K, 0x80, long);
    a.op(LD_IMM, 1);
    a.op(ST, M_DCID_AT);
    a.op(LD_IMM, cid_len);
    a.op(ST, M_DCID_LEN);
    a.ja(existing);

    // Long header: DCID length at 5, DCID at 6.
    a.here(long);
    a.op(LD_IMM, 6);
    a.op(ST, M_DCID_AT);
    a.op(LD_B_ABS, 5);
    a.op(ST, M_DCID_LEN);
    a.jump_if(JMP_JGT_K, MAX_CID_LEN as u32, junk);
    // An Initial (v1: type bits 00, v2: 01)?
    let (v2, initial) = (a.label(), a.label());
    a.op(LD_W_ABS, 1);
    a.jump_if(JMP_JEQ_K, QUIC_V2, v2);
    a.jump_unless(JMP_JEQ_K, QUIC_V1, existing);
    a.op(LD_B_ABS, 0);
    a.op(ALU_AND_K, 0x30);
    a.jump_unless(JMP_JEQ_K, 0x00, existing);
    a.ja(initial);
    a.here(v2);
    a.op(LD_B_ABS, 0);
    a.op(ALU_AND_K, 0x30);
    a.jump_unless(JMP_JEQ_K, 0x10, existing);
    a.here(initial);
    a.op(LD_IMM, 1);
    a.op(ST, M_INITIAL);
    // One of our IDs (this length, these length bits, a routable generation) goes to the
    // worker it names, if its generation is live; any other DCID is hashed. An Initial's
    // worker byte is not trusted: it is hashed within the generation its DCID names.
    a.here(existing);
    a.op(LD_MEM, M_DCID_LEN);
    a.jump_unless(JMP_JEQ_K, cid_len, hash);
    a.op(LD_MEM, M_DCID_AT);
    a.op(TAX, 0);
    if layout.is_for_load_balancer() {
        // The load balancer's layout: the generation is a byte of its own near the end.
        a.op(LD_B_IND, layout.generation_offset() as u32);
        a.jump_if(JMP_JGT_K, u32::from(UNROUTABLE_GENERATION) - 1, hash);
    } else {
        a.op(LD_B_IND, 0);
        a.op(ST, M_FIRST);
        a.op(ALU_AND_K, 0x1f);
        a.jump_unless(JMP_JEQ_K, cid_len - 1, hash);
        a.op(LD_MEM, M_FIRST);
        a.op(ALU_RSH_K, 5);
        a.jump_if(JMP_JEQ_K, 7, hash);
    }
    a.op(ST, M_GENERATION);
    a.op(LD_MEM, M_INITIAL);
    a.jump_if(JMP_JEQ_K, 1, hash);
    a.op(LD_B_IND, w_off);
    a.op(ST, M_WORKER);
    for g in &table.generations {
        let next = a.label();
        a.op(LD_MEM, M_GENERATION);
        a.jump_unless(JMP_JEQ_K, u32::from(g.generation), next);
        a.op(LD_MEM, M_WORKER);
        a.lookup(&g.sockets);
        a.ja(unowned);
        a.here(next);
    }
    // Ours by the look, but nobody's: an Initial's DCID is a client's choice (hashed), any
    // other packet gets no choice.
    a.here(unowned);
    a.op(LD_MEM, M_INITIAL);
    a.jump_if(JMP_JEQ_K, 1, hash);
    a.op(RET_K, NO_CHOICE);

    // Hash: M[hash] = FNV-1a from the keyed basis over the DCID bytes, then % the workers of
    // the generation an Initial's DCID names (when it is live), else of the newest.
    a.here(hash);
    let newest = table.of(table.newest).unwrap_or(&[]);
    let done = a.label();
    a.op(LD_IMM, FNV_OFFSET ^ table.hash_key);
    a.op(ST, M_HASH);
    for idx in 0..MAX_CID_LEN as u32 {
        a.op(LD_MEM, M_DCID_LEN);
        a.jump_unless(JMP_JGT_K, idx, done);
        a.op(LD_MEM, M_DCID_AT);
        a.op(TAX, 0);
        a.op(LD_B_IND, idx);
        a.op(TAX, 0);
        a.op(LD_MEM, M_HASH);
        a.op(ALU_XOR_X, 0);
        a.op(ALU_MUL_K, FNV_PRIME);
        a.op(ST, M_HASH);
    }
    a.here(done);
    for g in &table.generations {
        if g.generation == table.newest || g.sockets.is_empty() {
            continue; // the newest is the fall-through below
        }
        let next = a.label();
        a.op(LD_MEM, M_GENERATION);
        a.jump_unless(JMP_JEQ_K, u32::from(g.generation), next);
        a.op(LD_MEM, M_HASH);
        a.op(ALU_MOD_K, g.sockets.len() as u32);
        a.lookup(&g.sockets);
        a.op(RET_K, NO_CHOICE);
        a.here(next);
    }
    if !newest.is_empty() {
        a.op(LD_MEM, M_HASH);
        a.op(ALU_MOD_K, newest.len() as u32);
        a.lookup(newest);
    }
    a.op(RET_K, NO_CHOICE);

    // Not QUIC we can read (a connection ID longer than QUIC allows): user space drops it.
    a.here(junk);
    a.op(RET_K, NO_CHOICE);
    a.finish()
}

fn word(b: &[u8]) -> u32 {
    b.iter().take(4).fold(0, |w, x| (w << 8) | u32::from(*x))
}

pub(super) fn attach_cbpf(socket: &std::net::UdpSocket, prog: &[Insn]) -> std::io::Result<()> {
    let filters: Vec<libc::sock_filter> = prog
        .iter()
        .map(|x| libc::sock_filter {
            code: x.code,
            jt: x.jt,
            jf: x.jf,
            k: x.k,
        })
        .collect();
    let fprog = libc::sock_fprog {
        len: u16::try_from(filters.len()).unwrap_or(u16::MAX),
        filter: filters.as_ptr() as *mut _,
    };
    // SAFETY: fprog points at `filters`, alive for the call; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A tiny interpreter for the instructions this module emits, so tests can check the program
/// against [`spooky_common::cid::place`] without a kernel. `None` = the kernel would abort (a
/// load past the end of the packet), which selects socket 0 (user space drops such junk).
pub fn interpret(prog: &[Insn], pkt: &[u8]) -> Option<u32> {
    let (mut a, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
    let mut pc = 0usize;
    let byte = |at: u32| pkt.get(at as usize).map(|b| u32::from(*b));
    while let Some(ins) = prog.get(pc) {
        pc += 1;
        match ins.code {
            LD_W_ABS => {
                let at = ins.k as usize;
                a = u32::from_be_bytes(pkt.get(at..at + 4)?.try_into().ok()?);
            }
            LD_B_ABS => a = byte(ins.k)?,
            LD_B_IND => a = byte(x.checked_add(ins.k)?)?,
            LD_MEM => a = *mem.get(ins.k as usize)?,
            LD_IMM => a = ins.k,
            ST => *mem.get_mut(ins.k as usize)? = a,
            TAX => x = a,
            ALU_ADD_X => a = a.wrapping_add(x),
            ALU_XOR_X => a ^= x,
            ALU_MUL_K => a = a.wrapping_mul(ins.k),
            ALU_MOD_K => a = a.checked_rem(ins.k)?,
            ALU_AND_K => a &= ins.k,
            ALU_RSH_K => a >>= ins.k,
            JMP_JA => pc += ins.k as usize,
            JMP_JGT_K => pc += if a > ins.k { ins.jt } else { ins.jf } as usize,
            JMP_JEQ_K => pc += if a == ins.k { ins.jt } else { ins.jf } as usize,
            JMP_JSET_K => pc += if a & ins.k != 0 { ins.jt } else { ins.jf } as usize,
            RET_A => return Some(a),
            RET_K => return Some(ins.k),
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests;
