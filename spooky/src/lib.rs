//! Spooky: an HTTP/3 edge proxy. The binary (`main.rs`) is a thin CLI over this library.
//!
//! Sans-IO cores (no sockets, clocks or runtimes inside): [`config`] validation, [`bridge`]
//! (HTTP/3 request validation and HTTP/3 → HTTP/2 header conversion), [`routing`], [`lb`],
//! [`health`] state machines, the CID layout (in `spooky-common`). I/O glue: [`worker`] (one
//! QUIC event loop per CPU), [`proxy`] (one task per request), [`upstream`] (HTTP/2
//! connection pools), [`health_board`] (published health, probers), [`steering`] (reuseport
//! programs), [`ebpf`] (the kernel object), [`server`] (starting and stopping it all),
//! [`telemetry`] (logging). Test peers: [`demo`] (an HTTP/2 backend), [`client`] (an HTTP/3
//! client on quiche).

pub mod access_log;
pub mod admin;
pub mod bridge;
pub mod config;
pub mod ebpf;
pub mod health;
pub mod health_board;
pub mod lb;
pub mod metrics;
pub mod privilege;
pub mod proxy;
pub mod readahead;
pub mod reload;
pub mod routing;
pub mod server;
pub mod status;
pub mod steering;
pub mod telemetry;
pub mod upstream;
pub mod worker;
