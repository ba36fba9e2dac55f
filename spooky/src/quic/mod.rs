//! The QUIC side of the data plane: each worker's front owns a UDP socket of the listener's
//! reuseport group and its QUIC connections; the worker loop (`crate::worker`) drives it.
//!
//! | module | what |
//! |---|---|
//! | [`endpoint`] | sans-IO: what to do with a datagram for no known connection (forward, Version Negotiation, Retry, refuse, accept) |
//! | [`fleet`] | sans-IO: the member table, and GUE encapsulation of packets forwarded to the host that owns them |
//! | [`ids`] | sans-IO: the connection ID format a load balancer reads (Spooky's, QUIC-LB, Katran): minting, and which server an ID names |
//! | [`quic_lb`] | sans-IO: QUIC-LB connection IDs (server id in plaintext, one AES pass or four) |
//! | [`token`] | sans-IO: Retry and stateless-reset tokens, time passed in |
//! | `conn` | one client connection: HTTP/3 events in, responses out |
//! | `heads` | the request-header clock (`quic.request_header_timeout`) |
//! | `stall` | stalled response streams a client may hold (`quic.max_stalled_streams`) |
//! | `send`, `udp` | the socket: GSO batches out, `recvmmsg` with GRO in |
//! | [`front`] | a worker's socket and connections: the I/O around all of it, a bounded step at a time |

mod conn;
pub mod endpoint;
pub mod fleet;
pub(crate) mod front;
mod heads;
pub mod ids;
pub mod quic_lb;
mod send;
mod stall;
pub(crate) mod token;
mod udp;
