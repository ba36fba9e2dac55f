//! Spooky: an HTTP/3 edge proxy. The binary (`main.rs`) is a thin CLI over this library.

pub mod config;
pub mod health;
pub mod http;
pub mod lb;
pub mod ops;
pub mod quic;
pub mod routing;
pub mod server;
pub mod steering;
pub mod upstream;
