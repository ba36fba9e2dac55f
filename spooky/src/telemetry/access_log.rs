//! The access log: one JSON line per request, written by its own thread so that the request
//! path only pays for a non-blocking channel send. The queue is bounded in bytes
//! ([`QUEUE_BYTES`]) and each record's request fields in length ([`MAX_FIELD`], longer ones
//! cut and marked `…`), so a flood of long requests cannot pile up memory; when the writer
//! falls behind, lines are dropped and counted (`spooky_access_log_dropped_total`), never
//! waited for.

use crate::config::AccessLog;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lines buffered between workers and the writer, at most.
const QUEUE: usize = 65_536;
/// Bytes of records buffered between workers and the writer, at most.
pub const QUEUE_BYTES: usize = 8 << 20;
/// Longest host, method or path kept in a record (bytes); longer ones are cut.
pub const MAX_FIELD: usize = 2048;

/// One request, as logged.
#[derive(Debug, Clone)]
pub struct Record {
    pub time: SystemTime,
    pub client: SocketAddr,
    /// `h3`, `h2` or `http/1.1`.
    pub protocol: &'static str,
    pub host: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: Duration,
    pub pool: String,
    pub backend: String,
    pub worker: usize,
}

impl Record {
    /// What it holds in the queue, roughly (its text fields and a fixed part).
    fn weight(&self) -> usize {
        256 + self.host.len()
            + self.method.len()
            + self.path.len()
            + self.pool.len()
            + self.backend.len()
    }
}

/// `s` cut to at most [`MAX_FIELD`] bytes (at a character boundary), marked `…` when cut.
pub fn bounded(s: &str) -> String {
    if s.len() <= MAX_FIELD {
        return s.to_owned();
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The sending side, shared by all workers.
pub struct AccessLogger {
    tx: Option<SyncSender<Record>>,
    dropped: AtomicU64,
    /// Bytes of records queued now.
    queued: Arc<AtomicUsize>,
}

impl AccessLogger {
    /// Starts the writer thread for `dest` (none for `Off`).
    ///
    /// # Errors
    /// When the file cannot be opened for appending or the thread cannot start.
    pub fn start(dest: &AccessLog) -> std::io::Result<Self> {
        let mut out: Box<dyn Write + Send> = match dest {
            AccessLog::Off => {
                return Ok(Self {
                    tx: None,
                    dropped: AtomicU64::new(0),
                    queued: Arc::default(),
                })
            }
            AccessLog::Stdout => Box::new(std::io::stdout()),
            AccessLog::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (tx, rx) = sync_channel::<Record>(QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        let written = queued.clone();
        std::thread::Builder::new()
            .name("spooky-access".into())
            .spawn(move || {
                crate::privilege::lock_down_helper_thread();
                let mut buf = std::io::BufWriter::with_capacity(64 * 1024, &mut out);
                let write = |buf: &mut std::io::BufWriter<_>, r: Record| {
                    let _ = buf.write_all(format_line(&r).as_bytes());
                    written.fetch_sub(r.weight(), Ordering::Relaxed);
                };
                while let Ok(first) = rx.recv() {
                    write(&mut buf, first);
                    // Write whatever else is queued, then flush once.
                    while let Ok(r) = rx.try_recv() {
                        write(&mut buf, r);
                    }
                    let _ = buf.flush();
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            dropped: AtomicU64::new(0),
            queued,
        })
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Whether lines are wanted at all (skip building them otherwise).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a line; drops it (counted) when the writer is behind.
    pub fn log(&self, r: Record) {
        let Some(tx) = &self.tx else { return };
        let weight = r.weight();
        let over = self.queued.fetch_add(weight, Ordering::Relaxed) + weight > QUEUE_BYTES;
        if over
            || matches!(
                tx.try_send(r),
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_))
            )
        {
            self.queued.fetch_sub(weight, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// RFC 3339 UTC time with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// One JSON line (with the newline).
pub fn format_line(r: &Record) -> String {
    let mut s = String::with_capacity(256);
    s.push_str("{\"time\":");
    json_str(&mut s, &rfc3339(r.time));
    s.push_str(",\"client\":");
    json_str(&mut s, &r.client.to_string());
    s.push_str(",\"protocol\":");
    json_str(&mut s, r.protocol);
    s.push_str(",\"host\":");
    json_str(&mut s, &r.host);
    s.push_str(",\"method\":");
    json_str(&mut s, &r.method);
    s.push_str(",\"path\":");
    json_str(&mut s, &r.path);
    s.push_str(&format!(
        ",\"status\":{},\"bytes_in\":{},\"bytes_out\":{},\"duration_ms\":{:.3},\"pool\":",
        r.status,
        r.bytes_in,
        r.bytes_out,
        r.duration.as_secs_f64() * 1000.0
    ));
    json_str(&mut s, &r.pool);
    s.push_str(",\"backend\":");
    json_str(&mut s, &r.backend);
    s.push_str(&format!(",\"worker\":{}}}\n", r.worker));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_with_every_field() {
        let r = Record {
            time: UNIX_EPOCH + Duration::from_millis(1_764_100_000_123),
            client: "192.0.2.1:5000".parse().unwrap(),
            protocol: "h2",
            host: "example.com".into(),
            method: "GET".into(),
            path: "/a\"b".into(),
            status: 200,
            bytes_in: 1,
            bytes_out: 2,
            duration: Duration::from_micros(1500),
            pool: "p".into(),
            backend: "b".into(),
            worker: 1,
        };
        let line = format_line(&r);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2025-11-25T19:46:40.123Z");
        assert_eq!(v["path"], "/a\"b");
        assert_eq!(v["protocol"], "h2");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["worker"], 1);
        assert!(line.ends_with("}\n"));
    }

    #[test]
    fn long_fields_are_cut_and_marked() {
        assert_eq!(bounded("/short"), "/short");
        let long = "é".repeat(MAX_FIELD);
        let cut = bounded(&long);
        assert!(
            cut.len() <= MAX_FIELD + "…".len() && cut.ends_with('…'),
            "{}",
            cut.len()
        );
        assert!(cut.starts_with("éé"));
    }

    #[test]
    fn civil_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
