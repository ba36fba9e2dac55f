//! Types, constants and pure functions shared by the kernel programs (`spooky-ebpf`) and user
//! space (`spooky`): the connection-ID layout, the one hash that places client-chosen connection
//! IDs on a worker, the `#[repr(C)]` layouts of every BPF map value, and the XDP program's
//! packet parsing ([`packet`], [`quic`]), which host tests and the fuzzer run unchanged.
//!
//! Everything here is `no_std`, allocation-free and panic-free, so the same code runs in the
//! verifier-checked XDP program and in user space (where it is unit-tested on the host).
//! Nothing here does I/O.
#![no_std]

pub mod cid;
pub mod fleet;
pub mod maps;
pub mod packet;
pub mod quic;

pub use cid::{fnv1a32, CidLayout, MAX_CID_LEN};
