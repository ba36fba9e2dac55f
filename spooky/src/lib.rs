//! Spooky: an HTTP/3 edge proxy. The binary (`main.rs`) is a thin CLI over this library.
//!
//! Sans-IO cores (no sockets, clocks or runtimes inside): [`config`] validation, [`bridge`]
//! (HTTP/3 request validation and HTTP/3 → HTTP/2 header conversion), [`routing`], [`lb`],
//! [`health`] state machines. I/O glue: [`worker`] (one QUIC event loop per CPU), [`upstream`]
//! (HTTP/2 connection pools), [`steering`] (reuseport programs), [`ebpf`] (loading the kernel
//! object), [`server`] (starting and stopping it all), [`telemetry`] (logging).

pub mod config;
pub mod ebpf;
pub mod health;
pub mod lb;
pub mod routing;
