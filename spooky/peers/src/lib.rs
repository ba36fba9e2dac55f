//! The other ends Spooky talks to, kept out of the proxy's library: what the demos, the tests
//! and the benchmarks run against Spooky, and the small HTTP/3 client behind `spooky get`.
//!
//! | module | what | feature |
//! |---|---|---|
//! | [`client`] | a blocking HTTP/3 client on quiche (one QUIC connection, explicit I/O loop) | `client` |
//! | [`demo`] | an HTTP/2 (h2c) backend with test routes (`/size/N`, `/echo`, `/delay/MS`, …) | `demo` |
//! | [`loadgen`] | an h2load-style HTTP/3 load generator (`spooky-load`) | `load` |
//! | [`certs`] | the demo CA and certificates (`cargo xtask certs`) | `certs` |
//!
//! Nothing here depends on the `spooky` crate: these peers see Spooky only from the outside,
//! over sockets, as any other client or backend would.

#[cfg(feature = "certs")]
pub mod certs;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "demo")]
pub mod demo;
#[cfg(feature = "load")]
pub mod loadgen;
#[cfg(feature = "load")]
mod udp;
