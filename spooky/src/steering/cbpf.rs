//! The classic BPF program of the unprivileged tier: attached to the SO_REUSEPORT group, it
//! returns the worker index read from the DCID's worker byte (short headers, and long headers
//! whose DCID is one of ours), or `fnv1a32(DCID) % workers` for client-chosen DCIDs — the same
//! decision as [`spooky_common::cid::steer`], which the unit tests check by running the
//! program in the interpreter here ([`interpret`]).

use spooky_common::cid::{FNV_OFFSET, FNV_PRIME};
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

const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
const LD_MEM: u16 = 0x60; // BPF_LD | BPF_MEM
const ST: u16 = 0x02;
const TAX: u16 = 0x07; // BPF_MISC | BPF_TAX
const ALU_XOR_X: u16 = 0xac; // BPF_ALU | BPF_XOR | BPF_X
const ALU_MUL_K: u16 = 0x24;
const ALU_MOD_K: u16 = 0x94;
const ALU_AND_K: u16 = 0x54;
const ALU_RSH_K: u16 = 0x74;
const JMP_JGT_K: u16 = 0x25;
const JMP_JEQ_K: u16 = 0x15;
const JMP_JGE_K: u16 = 0x35;
const JMP_JSET_K: u16 = 0x45;
const JMP_JA: u16 = 0x05;
const RET_A: u16 = 0x16;
const RET_K: u16 = 0x06;
const LD_IMM: u16 = 0x00; // BPF_LD | BPF_W | BPF_IMM

fn i(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
    Insn { code, jt, jf, k }
}

/// The reuseport program for `layout` and `workers` sockets. It runs on the UDP payload.
pub fn reuseport_program(layout: &CidLayout, workers: u32) -> Vec<Insn> {
    let workers = workers.max(1);
    let w_off = layout.worker_offset() as u32;
    let cid_len = layout.cid_len() as u32;
    let mut p = Vec::new();
    // Jumps whose targets are patched once the targets exist: (insn index, true-branch?).
    let mut to_hash: Vec<(usize, bool)> = Vec::new();
    let mut to_ret: Vec<usize> = Vec::new();
    // A = first byte; long header → skip the short-header path.
    p.push(i(LD_B_ABS, 0, 0, 0));
    p.push(i(JMP_JSET_K, 2, 0, 0x80));
    // Short header: the DCID starts at 1; return its worker byte (out of range → kernel hash).
    p.push(i(LD_B_ABS, 0, 0, 1 + w_off));
    to_ret.push(p.len());
    p.push(i(JMP_JA, 0, 0, 0));
    // Long header: DCID length at 5 (kept in M[1]), DCID at 6.
    p.push(i(LD_B_ABS, 0, 0, 5));
    p.push(i(ST, 0, 0, 1));
    p.push(i(JMP_JGT_K, 0, 1, MAX_CID_LEN as u32));
    p.push(i(RET_K, 0, 0, 0)); // longer than QUIC allows: socket 0 (user space drops it)
    to_hash.push((p.len(), false));
    p.push(i(JMP_JEQ_K, 0, 0, cid_len)); // not our length → hash
    p.push(i(LD_B_ABS, 0, 0, 6));
    p.push(i(ALU_AND_K, 0, 0, 0x1f));
    to_hash.push((p.len(), false));
    p.push(i(JMP_JEQ_K, 0, 0, cid_len - 1)); // length bits differ → hash
    p.push(i(LD_B_ABS, 0, 0, 6));
    p.push(i(ALU_RSH_K, 0, 0, 5));
    to_hash.push((p.len(), true));
    p.push(i(JMP_JEQ_K, 0, 0, 7)); // unroutable generation → hash
    p.push(i(LD_B_ABS, 0, 0, 6 + w_off)); // ours: the worker byte, if it names a worker
    to_hash.push((p.len(), true));
    p.push(i(JMP_JGE_K, 0, 0, workers));
    to_ret.push(p.len());
    p.push(i(JMP_JA, 0, 0, 0));
    // Hash: M[0] = FNV offset; for each DCID byte below the length: M[0] = (M[0] ^ b) * prime.
    let hash_start = p.len();
    p.push(i(LD_IMM, 0, 0, FNV_OFFSET));
    p.push(i(ST, 0, 0, 0));
    let mut to_done = Vec::new();
    for idx in 0..MAX_CID_LEN as u32 {
        p.push(i(LD_MEM, 0, 0, 1));
        to_done.push(p.len());
        p.push(i(JMP_JGT_K, 0, 0, idx)); // len <= idx → done
        p.push(i(LD_B_ABS, 0, 0, 6 + idx));
        p.push(i(TAX, 0, 0, 0));
        p.push(i(LD_MEM, 0, 0, 0));
        p.push(i(ALU_XOR_X, 0, 0, 0));
        p.push(i(ALU_MUL_K, 0, 0, FNV_PRIME));
        p.push(i(ST, 0, 0, 0));
    }
    let done = p.len();
    p.push(i(LD_MEM, 0, 0, 0));
    p.push(i(ALU_MOD_K, 0, 0, workers));
    let ret = p.len();
    p.push(i(RET_A, 0, 0, 0));
    // Jump offsets are relative to the next instruction; every distance here is < 256.
    let rel = |from: usize, to: usize| (to - from - 1) as u8;
    for (at, on_true) in to_hash {
        if on_true {
            p[at].jt = rel(at, hash_start);
        } else {
            p[at].jf = rel(at, hash_start);
        }
    }
    for at in to_done {
        p[at].jf = rel(at, done);
    }
    for at in to_ret {
        p[at].k = (ret - at - 1) as u32;
    }
    p
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
        len: filters.len() as u16,
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
/// against [`spooky_common::cid::steer`] without a kernel. `None` = the kernel would abort
/// (a load past the end of the packet), which selects socket 0.
pub fn interpret(prog: &[Insn], pkt: &[u8]) -> Option<u32> {
    let (mut a, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
    let mut pc = 0usize;
    while let Some(ins) = prog.get(pc) {
        pc += 1;
        match ins.code {
            LD_B_ABS => a = *pkt.get(ins.k as usize)? as u32,
            LD_MEM => a = *mem.get(ins.k as usize)?,
            LD_IMM => a = ins.k,
            ST => *mem.get_mut(ins.k as usize)? = a,
            TAX => x = a,
            ALU_XOR_X => a ^= x,
            ALU_MUL_K => a = a.wrapping_mul(ins.k),
            ALU_MOD_K => a %= ins.k,
            ALU_AND_K => a &= ins.k,
            ALU_RSH_K => a >>= ins.k,
            JMP_JA => pc += ins.k as usize,
            JMP_JGT_K => pc += if a > ins.k { ins.jt } else { ins.jf } as usize,
            JMP_JEQ_K => pc += if a == ins.k { ins.jt } else { ins.jf } as usize,
            JMP_JGE_K => pc += if a >= ins.k { ins.jt } else { ins.jf } as usize,
            JMP_JSET_K => pc += if a & ins.k != 0 { ins.jt } else { ins.jf } as usize,
            RET_A => return Some(a),
            RET_K => return Some(ins.k),
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use spooky_common::cid::steer;

    fn layout() -> CidLayout {
        CidLayout::new(16, 2, 0).unwrap()
    }

    fn long_header(dcid: &[u8]) -> Vec<u8> {
        let mut p = vec![0xc0, 0, 0, 0, 1, dcid.len() as u8];
        p.extend_from_slice(dcid);
        p.push(8);
        p.extend_from_slice(&[9; 8]);
        p.resize(1200, 0);
        p
    }

    #[test]
    fn program_agrees_with_steer_for_every_kind_of_dcid() {
        let l = layout();
        for workers in [1u32, 2, 3, 7] {
            let prog = reuseport_program(&l, workers);
            assert!(prog.len() < 4096);
            // Our own IDs, every worker index.
            for w in 0..workers as u8 {
                let mut cid = [0u8; 16];
                l.write(&[0, 1], w, &[0xaa; 16], &mut cid);
                let mut short = vec![0x40];
                short.extend_from_slice(&cid);
                short.extend_from_slice(&[0; 30]);
                assert_eq!(interpret(&prog, &short), Some(w as u32));
                assert_eq!(
                    interpret(&prog, &long_header(&cid)),
                    Some(steer(&l, &cid, workers))
                );
            }
            // Client-chosen DCIDs of every legal length.
            for len in 0..=20usize {
                let dcid: Vec<u8> = (0..len as u8)
                    .map(|b| b.wrapping_mul(37).wrapping_add(11))
                    .collect();
                let got = interpret(&prog, &long_header(&dcid));
                assert_eq!(
                    got,
                    Some(steer(&l, &dcid, workers)),
                    "len {len} workers {workers}"
                );
            }
            // Unroutable generation and too-long DCIDs.
            let mut cid = [0u8; 16];
            l.write(&[0, 1], 0, &[0x11; 16], &mut cid);
            cid[0] |= 0b111 << 5;
            assert_eq!(
                interpret(&prog, &long_header(&cid)),
                Some(steer(&l, &cid, workers))
            );
            // A client DCID that happens to carry our length bits but names no worker: hashed,
            // exactly as `steer` does (the kernel's own fallback would disagree).
            let mut lookalike = [0u8; 16];
            l.write(&[0, 1], 200, &[0x42; 16], &mut lookalike);
            assert_eq!(
                interpret(&prog, &long_header(&lookalike)),
                Some(steer(&l, &lookalike, workers))
            );
            let mut bad = long_header(&[1; 20]);
            bad[5] = 21;
            assert_eq!(interpret(&prog, &bad), Some(0));
        }
    }
}
