//! The one integration-test binary of the `spooky` crate. Tests that need root, BPF or a peer
//! fail loudly with the reason when it is missing; none returns early and passes.

mod config_files;
mod ebpf;
mod support;
