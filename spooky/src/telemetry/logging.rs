//! Logging: `tracing` with the level from the config, `RUST_LOG` overriding it, text or JSON
//! on stderr; the level can be changed later (configuration reload).
//!
//! Two bounds keep logging from being turned against the proxy:
//! - **No thread waits on stderr.** Once the process serves ([`write_from_a_thread`], called
//!   after the privilege drop and before the workers start), a line is handed to a writer
//!   thread through a queue of at most [`QUEUE_BYTES`]; a line that does not fit is dropped
//!   and counted ([`dropped`]), so a stderr nobody reads (a full pipe, a stuck terminal)
//!   stalls the writer thread only. Before that, during start-up, lines are written directly.
//! - **Clients cannot buy log volume.** The lines a client can cause per request (a refusal,
//!   a failed request, an aborted response, a smuggling attempt) pass a per-worker
//!   [`LogGate`]: at most [`LINES_PER_SECOND`] of each kind a second; the others are counted
//!   ([`suppressed`]) and the next line that passes says how many it stands for.

use crate::config::LogFormat;
use std::cell::Cell;
use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Bytes of log lines queued for the writer thread at most.
pub const QUEUE_BYTES: usize = 1 << 20;
/// Lines of one kind a worker's [`LogGate`] lets through per second.
pub const LINES_PER_SECOND: u32 = 20;

/// Lines dropped because the writer thread was behind (stderr not taking them).
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Lines a [`LogGate`] held back.
static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped because stderr did not take them fast enough.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Log lines a client could have caused that were left out (rate limit).
pub fn suppressed() -> u64 {
    SUPPRESSED.load(Ordering::Relaxed)
}

/// The queue to the writer thread, once it runs.
struct Pipe {
    tx: SyncSender<Vec<u8>>,
    queued: std::sync::Arc<AtomicUsize>,
}

static PIPE: OnceLock<Pipe> = OnceLock::new();

/// From now on log lines go to stderr through a writer thread of their own (see the module
/// documentation). Call it once the process has its final identity: the thread starts with
/// the caller's.
///
/// # Errors
/// When the thread cannot start (lines keep going directly to stderr then).
pub fn write_from_a_thread() -> std::io::Result<()> {
    if PIPE.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = sync_channel::<Vec<u8>>(16 * 1024);
    let queued = std::sync::Arc::new(AtomicUsize::new(0));
    let written = queued.clone();
    std::thread::Builder::new()
        .name("spooky-log".into())
        .spawn(move || {
            let stderr = std::io::stderr();
            while let Ok(line) = rx.recv() {
                let mut out = stderr.lock();
                let _ = out.write_all(&line);
                written.fetch_sub(line.len(), Ordering::Relaxed);
                // Whatever else is queued, under one lock.
                while let Ok(line) = rx.try_recv() {
                    let _ = out.write_all(&line);
                    written.fetch_sub(line.len(), Ordering::Relaxed);
                }
            }
        })?;
    let _ = PIPE.set(Pipe { tx, queued });
    Ok(())
}

/// Waits (at most `timeout`) until the lines queued so far are written: before the process
/// exits.
pub fn flush(timeout: Duration) {
    let Some(pipe) = PIPE.get() else { return };
    let deadline = Instant::now() + timeout;
    while pipe.queued.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Where `tracing` writes: one [`Line`] per event.
#[derive(Clone, Copy)]
struct Lines;

impl<'a> MakeWriter<'a> for Lines {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(Vec::new())
    }
}

/// One event's text, handed on whole when dropped: queued for the writer thread (or dropped
/// and counted when the queue is full), or written directly before the thread runs.
struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.0);
        let Some(pipe) = PIPE.get() else {
            let _ = std::io::stderr().write_all(&line);
            return;
        };
        let len = line.len();
        if pipe.queued.fetch_add(len, Ordering::Relaxed) + len > QUEUE_BYTES
            || pipe.tx.try_send(line).is_err()
        {
            pipe.queued.fetch_sub(len, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Kinds of lines a client can cause, each with its own budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    /// A request Spooky refused itself (malformed, too large, …).
    Refused,
    /// A request whose backend failed (or that recovered on another backend).
    Failed,
    /// A response cut off after its head.
    Aborted,
    /// An HTTP/1.1 request refused as smuggling.
    Smuggling,
}

const KINDS: usize = 4;

/// One worker's rate limit on the lines clients can cause (see the module documentation).
/// Not shared between threads.
#[derive(Debug, Default)]
pub struct LogGate {
    /// Per kind: (start of the current second, lines let through in it, lines held back
    /// since the last one let through).
    windows: [Cell<(Option<Instant>, u32, u64)>; KINDS],
}

impl LogGate {
    /// Whether a line of `kind` may be written now: `Some(n)` with the number of lines of its
    /// kind left out since the last one written (for the line to say), `None` to leave it out.
    pub fn admit(&self, kind: LogKind) -> Option<u64> {
        self.admit_at(kind, Instant::now())
    }

    fn admit_at(&self, kind: LogKind, now: Instant) -> Option<u64> {
        let cell = &self.windows[kind as usize];
        let (start, taken, held) = cell.get();
        let (start, taken) = match start {
            Some(s) if now.saturating_duration_since(s) < Duration::from_secs(1) => (s, taken),
            _ => (now, 0),
        };
        if taken >= LINES_PER_SECOND {
            cell.set((Some(start), taken, held + 1));
            SUPPRESSED.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        cell.set((Some(start), taken + 1, 0));
        Some(held)
    }
}

/// Changes the log filter of a running process.
pub type LevelReloader = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level` (and over later
/// reloads). Returns the function that changes the level.
///
/// # Errors
/// A message when the filter does not parse or a subscriber is already installed.
pub fn init(level: &str, format: LogFormat) -> Result<LevelReloader, String> {
    let from_env = std::env::var("RUST_LOG").ok().filter(|e| !e.is_empty());
    let filter = EnvFilter::try_new(from_env.as_deref().unwrap_or(level))
        .map_err(|e| format!("log filter: {e}"))?;
    let (filter, handle) = reload::Layer::<EnvFilter, Registry>::new(filter);
    // Colour only for a terminal: a file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(Lines)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(fmt.json())
            .try_init(),
    };
    result.map_err(|e| e.to_string())?;
    Ok(Box::new(move |level: &str| {
        if from_env.is_some() {
            tracing::info!("RUST_LOG is set: the configured log level is not applied");
            return Ok(());
        }
        let filter = EnvFilter::try_new(level).map_err(|e| format!("log filter: {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_lets_a_budget_of_lines_through_each_second_and_counts_the_rest() {
        let gate = LogGate::default();
        let t0 = Instant::now();
        for _ in 0..LINES_PER_SECOND {
            assert_eq!(gate.admit_at(LogKind::Refused, t0), Some(0));
        }
        let before = suppressed();
        for _ in 0..500 {
            assert_eq!(gate.admit_at(LogKind::Refused, t0), None);
        }
        assert!(suppressed() >= before + 500);
        // Another kind has its own budget.
        assert_eq!(gate.admit_at(LogKind::Failed, t0), Some(0));
        // The next second: the first line says how many were left out.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(gate.admit_at(LogKind::Refused, t1), Some(500));
        assert_eq!(gate.admit_at(LogKind::Refused, t1), Some(0));
    }
}
