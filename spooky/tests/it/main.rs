//! The one integration-test binary of the `spooky` crate. Tests that need root, BPF or a peer
//! fail loudly with the reason when it is missing; none returns early and passes.
//!
//! Tests that need root (eBPF, network namespaces, dropping privileges) are marked
//! `#[ignore = "needs root"]`, so a plain `cargo test` as a user runs the rest;
//! `cargo xtask test` runs them all (`--include-ignored`) and fails if one of them did not run.

// Test code: a failed unwrap is a failed test with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod acme;
mod browser;
mod config_files;
mod docs;
mod ebpf;
mod fleet;
mod hardening;
mod health;
mod hostile;
mod netns;
mod ops;
mod package;
mod peers;
mod policy;
mod proxy;
mod sites;
mod soak;
mod status;
mod support;
mod takeover;
mod tcp;
mod upstreams;
mod websocket;
