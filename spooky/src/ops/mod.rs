//! Operating Spooky: the admin listener, metrics, the access log, live reload, `spooky
//! status`, logging and privilege dropping.

pub mod access_log;
pub mod admin;
pub mod metrics;
pub mod privilege;
pub mod reload;
pub mod status;
pub mod telemetry;
