//! The HTTP side of the data plane: request validation and HTTP/3 ↔ HTTP/2 conversion
//! ([`bridge`]), the per-stream exchange between the QUIC loop and the request task
//! ([`exchange`]), and the request task ([`forward`]).

pub mod bridge;
pub mod exchange;
pub mod forward;
