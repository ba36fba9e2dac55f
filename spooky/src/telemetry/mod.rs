//! The low telemetry the data plane writes to, without waiting on anything: the access log
//! ([`access_log`], a writer thread behind a byte-bounded queue), the process's resident
//! memory ([`memory`], for `proxy.memory_limit`), and logging ([`logging`]: `tracing` set up
//! with a writer thread so that a blocked stderr never stalls a worker, and a per-worker gate
//! on the lines clients can cause). The control plane that reads it (admin, metrics
//! exposition, reload) is `ops`.

pub mod access_log;
pub mod logging;
pub mod memory;
