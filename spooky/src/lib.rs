//! Spooky: an HTTP/3 edge proxy. The binary (`main.rs`) is a thin CLI over [`app`].
//!
//! The modules, top to bottom; each uses only modules below it (checked by `cargo xtask
//! test`, see `docs/architecture.md`):
//!
//! | layer | modules |
//! |---|---|
//! | wiring | [`app`] (imported by nothing) |
//! | data plane | `worker` (one per CPU: the loop, timers, control messages, both fronts) |
//! | data plane | [`quic`] (sans-IO endpoint, the QUIC front, connections) and [`tcp`] (TLS over TCP: HTTP/2 and HTTP/1.1), side by side; [`http`] (bridge, exchange, outcome, request task) |
//! | control | [`ops`] (admin, metrics, access log, reload, status, logging, privileges), [`health`] (state machine, checker), [`acme`], [`dns`] (backends named by DNS) |
//! | data plane | [`upstream`] (HTTP/2 pools to backends) |
//! | control | [`steering`] (tiers, classic BPF, pins, the kernel object) |
//! | state | [`snapshot`] (per configuration), `certs` (the listener's certificates by SNI), [`board`], [`keys`], [`stats`] and [`policy`] (rate limits, access lists; per process) |
//! | sans-IO cores | [`routing`], [`lb`], [`config`] |

/// `impl AsyncWrite for $ty<T>` that passes every write through to its field `inner`: for
/// the read-side wrappers of a stream (read-ahead, the response-head guard, the PROXY header
/// rewind).
macro_rules! writes_through {
    ($ty:ident) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<T> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                data: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
            }
        }
    };
}

pub mod acme;
pub mod app;
mod board;
pub mod certs;
pub mod config;
pub mod dns;
mod health;
pub mod http;
pub mod keys;
pub mod lb;
pub mod ops;
pub mod policy;
mod privilege;
pub mod quic;
pub mod routing;
mod snapshot;
pub mod stats;
pub mod steering;
pub mod tcp;
pub mod telemetry;
mod upstream;
mod worker;
