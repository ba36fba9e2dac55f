//! The QUIC side of the data plane: one worker per CPU, each owning a UDP socket of the
//! listener's reuseport group and its QUIC connections.

mod conn;
mod heads;
pub(crate) mod udp;
pub mod worker;
