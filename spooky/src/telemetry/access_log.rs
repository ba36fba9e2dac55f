//! The access log: one JSON line per request, written by its own thread so that the request
//! path only pays for a non-blocking channel send. When the writer falls behind, lines are
//! dropped and counted (`spooky_access_log_dropped_total`), never waited for.

use crate::config::AccessLog;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lines buffered between workers and the writer.
const QUEUE: usize = 65_536;

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

/// The sending side, shared by all workers.
pub struct AccessLogger {
    tx: Option<SyncSender<Record>>,
    dropped: AtomicU64,
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
        std::thread::Builder::new()
            .name("spooky-access".into())
            .spawn(move || {
                crate::privilege::lock_down_helper_thread();
                let mut buf = std::io::BufWriter::with_capacity(64 * 1024, &mut out);
                while let Ok(first) = rx.recv() {
                    let _ = buf.write_all(format_line(&first).as_bytes());
                    // Write whatever else is queued, then flush once.
                    while let Ok(r) = rx.try_recv() {
                        let _ = buf.write_all(format_line(&r).as_bytes());
                    }
                    let _ = buf.flush();
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            dropped: AtomicU64::new(0),
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
        if let Some(tx) = &self.tx {
            if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(r) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
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
    fn civil_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
