//! The access log: one line per request (JSON with configurable fields, or the Common and
//! Combined Log Formats), written by its own thread so that the request path only pays for a
//! non-blocking channel send. The queue is bounded in bytes ([`QUEUE_BYTES`]) and each
//! record's request fields in length ([`MAX_FIELD`], longer ones cut and marked `…`), so a
//! flood of long requests cannot pile up memory; when the writer falls behind, lines are
//! dropped and counted (`spooky_access_log_dropped_total`), never waited for.
//!
//! [`AccessLogger::reopen`] (SIGUSR1, as logrotate sends it) has the writer close and reopen
//! its file by path, so lines go to the new file once the old one was moved away.

use crate::config::{AccessField, AccessFormat, AccessLog};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lines buffered between workers and the writer, at most.
const QUEUE: usize = 65_536;
/// Bytes of records buffered between workers and the writer, at most.
pub const QUEUE_BYTES: usize = 8 << 20;
/// Longest host, method, path, user-agent or referer kept in a record (bytes); longer ones
/// are cut.
pub const MAX_FIELD: usize = 2048;

/// One request, as logged.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub time: Option<SystemTime>,
    pub client: Option<SocketAddr>,
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
    /// `x-request-id` (empty when off).
    pub request_id: String,
    pub user_agent: String,
    pub referer: String,
    /// The backend's status, when a backend answered.
    pub upstream_status: Option<u16>,
    /// Time to the backend's response head, when a backend answered.
    pub upstream_time: Option<Duration>,
    /// `TLSv1.3`, `TLSv1.2`, empty for plaintext.
    pub tls_version: &'static str,
    pub sni: String,
}

impl Record {
    /// What it holds in the queue, roughly (its text fields and a fixed part).
    fn weight(&self) -> usize {
        256 + self.host.len()
            + self.method.len()
            + self.path.len()
            + self.pool.len()
            + self.backend.len()
            + self.request_id.len()
            + self.user_agent.len()
            + self.referer.len()
            + self.sni.len()
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

/// What the writer receives: a line, or `None` to look at the reopen flag now.
type Msg = Option<Record>;

/// The sending side, shared by all workers.
pub struct AccessLogger {
    tx: Option<SyncSender<Msg>>,
    dropped: AtomicU64,
    /// Bytes of records queued now.
    queued: Arc<AtomicUsize>,
    /// Set by [`reopen`](Self::reopen), cleared by the writer when it reopened.
    reopen: Arc<AtomicBool>,
    /// Reopens done, and failed.
    reopened: Arc<AtomicU64>,
    reopen_failures: Arc<AtomicU64>,
}

/// Where the writer writes.
enum Sink {
    Stdout,
    File(PathBuf),
}

impl Sink {
    fn open(&self) -> std::io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            Sink::Stdout => Box::new(std::io::stdout()),
            Sink::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        })
    }
}

impl AccessLogger {
    /// Starts the writer thread for `dest` (none for `Off`), writing lines in `format`.
    ///
    /// # Errors
    /// When the file cannot be opened for appending or the thread cannot start.
    pub fn start(dest: &AccessLog, format: &AccessFormat) -> std::io::Result<Self> {
        let sink = match dest {
            AccessLog::Off => {
                return Ok(Self {
                    tx: None,
                    dropped: AtomicU64::new(0),
                    queued: Arc::default(),
                    reopen: Arc::default(),
                    reopened: Arc::default(),
                    reopen_failures: Arc::default(),
                })
            }
            AccessLog::Stdout => Sink::Stdout,
            AccessLog::File(path) => Sink::File(path.clone()),
        };
        let out = sink.open()?;
        let (tx, rx) = sync_channel::<Msg>(QUEUE);
        let me = Self {
            tx: Some(tx),
            dropped: AtomicU64::new(0),
            queued: Arc::default(),
            reopen: Arc::default(),
            reopened: Arc::default(),
            reopen_failures: Arc::default(),
        };
        let writer = Writer {
            sink,
            format: format.clone(),
            queued: me.queued.clone(),
            reopen: me.reopen.clone(),
            reopened: me.reopened.clone(),
            reopen_failures: me.reopen_failures.clone(),
        };
        std::thread::Builder::new()
            .name("spooky-access".into())
            .spawn(move || {
                crate::privilege::lock_down_helper_thread();
                writer.run(out, rx);
            })?;
        Ok(me)
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Reopens done (SIGUSR1), and reopens that failed (the old file is kept then).
    pub fn reopens(&self) -> (u64, u64) {
        (
            self.reopened.load(Ordering::Relaxed),
            self.reopen_failures.load(Ordering::Relaxed),
        )
    }

    /// Whether lines are wanted at all (skip building them otherwise).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Has the writer reopen its file (after logrotate moved it): the lines queued before go
    /// to the old file, the ones after to the new.
    pub fn reopen(&self) {
        let Some(tx) = &self.tx else { return };
        self.reopen.store(true, Ordering::Release);
        // A full queue wakes the writer anyway; it looks at the flag after every batch.
        let _ = tx.try_send(None);
    }

    /// Queues a line; drops it (counted) when the writer is behind.
    pub fn log(&self, r: Record) {
        let Some(tx) = &self.tx else { return };
        let weight = r.weight();
        let over = self.queued.fetch_add(weight, Ordering::Relaxed) + weight > QUEUE_BYTES;
        if over
            || matches!(
                tx.try_send(Some(r)),
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_))
            )
        {
            self.queued.fetch_sub(weight, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The writer thread's state.
struct Writer {
    sink: Sink,
    format: AccessFormat,
    queued: Arc<AtomicUsize>,
    reopen: Arc<AtomicBool>,
    reopened: Arc<AtomicU64>,
    reopen_failures: Arc<AtomicU64>,
}

impl Writer {
    fn run(self, out: Box<dyn Write + Send>, rx: Receiver<Msg>) {
        let mut buf = std::io::BufWriter::with_capacity(64 * 1024, out);
        let mut line = String::with_capacity(512);
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            // Write whatever else is queued, then flush once (a reopen asked for ends the batch,
            // so a steady stream of lines cannot hold it back).
            while let Some(msg) = next
                .take()
                .or_else(|| (!self.reopen.load(Ordering::Relaxed)).then(|| rx.try_recv().ok())?)
            {
                if let Some(r) = msg {
                    line.clear();
                    format_into(&mut line, &r, &self.format);
                    let _ = buf.write_all(line.as_bytes());
                    self.queued.fetch_sub(r.weight(), Ordering::Relaxed);
                }
            }
            let _ = buf.flush();
            if self.reopen.swap(false, Ordering::AcqRel) {
                match self.sink.open() {
                    Ok(fresh) => {
                        buf = std::io::BufWriter::with_capacity(64 * 1024, fresh);
                        self.reopened.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.reopen_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "access log not reopened; writing to the old file");
                    }
                }
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

/// A UTC time broken down.
struct Civil {
    year: i64,
    month: i64,
    day: i64,
    hour: i64,
    minute: i64,
    second: i64,
    millis: u32,
}

fn civil(t: SystemTime) -> Civil {
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
    Civil {
        year: yoe + era * 400 + i64::from(month <= 2),
        month,
        day,
        hour: rem / 3600,
        minute: rem % 3600 / 60,
        second: rem % 60,
        millis: d.subsec_millis(),
    }
}

/// RFC 3339 UTC time with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let c = civil(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second, c.millis
    )
}

/// One line in `format` (with the newline).
pub fn format_line(r: &Record, format: &AccessFormat) -> String {
    let mut s = String::with_capacity(256);
    format_into(&mut s, r, format);
    s
}

fn format_into(s: &mut String, r: &Record, format: &AccessFormat) {
    match format {
        AccessFormat::Json(fields) => json_line(s, r, fields),
        AccessFormat::Common => clf_line(s, r, false),
        AccessFormat::Combined => clf_line(s, r, true),
    }
}

fn json_line(s: &mut String, r: &Record, fields: &[AccessField]) {
    use std::fmt::Write as _;
    s.push('{');
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        json_str(s, f.name());
        s.push(':');
        match f {
            AccessField::Time => json_str(s, &r.time.map(rfc3339).unwrap_or_default()),
            AccessField::Client => {
                json_str(s, &r.client.map(|c| c.to_string()).unwrap_or_default())
            }
            AccessField::Protocol => json_str(s, r.protocol),
            AccessField::Host => json_str(s, &r.host),
            AccessField::Method => json_str(s, &r.method),
            AccessField::Path => json_str(s, &r.path),
            AccessField::Status => {
                let _ = write!(s, "{}", r.status);
            }
            AccessField::BytesIn => {
                let _ = write!(s, "{}", r.bytes_in);
            }
            AccessField::BytesOut => {
                let _ = write!(s, "{}", r.bytes_out);
            }
            AccessField::DurationMs => {
                let _ = write!(s, "{:.3}", r.duration.as_secs_f64() * 1000.0);
            }
            AccessField::Pool => json_str(s, &r.pool),
            AccessField::Backend => json_str(s, &r.backend),
            AccessField::Worker => {
                let _ = write!(s, "{}", r.worker);
            }
            AccessField::RequestId => json_str(s, &r.request_id),
            AccessField::UserAgent => json_str(s, &r.user_agent),
            AccessField::Referer => json_str(s, &r.referer),
            AccessField::UpstreamStatus => match r.upstream_status {
                Some(st) => {
                    let _ = write!(s, "{st}");
                }
                None => s.push_str("null"),
            },
            AccessField::UpstreamTimeMs => match r.upstream_time {
                Some(t) => {
                    let _ = write!(s, "{:.3}", t.as_secs_f64() * 1000.0);
                }
                None => s.push_str("null"),
            },
            AccessField::TlsVersion => json_str(s, r.tls_version),
            AccessField::Sni => json_str(s, &r.sni),
        }
    }
    s.push_str("}\n");
}

/// A quoted field of the text formats: `"`, `\`, controls and non-ASCII bytes escaped as
/// `\xHH` (as nginx does), so a line is one line and its quotes mean what they say.
fn clf_quoted(s: &mut String, v: &str) {
    use std::fmt::Write as _;
    s.push('"');
    for b in v.bytes() {
        match b {
            b'"' | b'\\' => {
                let _ = write!(s, "\\x{b:02X}");
            }
            0x20..=0x7e => s.push(char::from(b)),
            _ => {
                let _ = write!(s, "\\x{b:02X}");
            }
        }
    }
    s.push('"');
}

/// The Common Log Format (and Combined's two fields more): `client - - [10/Oct/2000:13:55:36
/// +0000] "GET /path HTTP/2.0" 200 2326`.
fn clf_line(s: &mut String, r: &Record, combined: bool) {
    use std::fmt::Write as _;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let client = r
        .client
        .map_or_else(|| "-".to_owned(), |c| c.ip().to_string());
    let c = civil(r.time.unwrap_or(UNIX_EPOCH));
    let month = MONTHS
        .get(usize::try_from(c.month).unwrap_or(1).saturating_sub(1))
        .unwrap_or(&"Jan");
    let _ = write!(
        s,
        "{client} - - [{:02}/{month}/{:04}:{:02}:{:02}:{:02} +0000] ",
        c.day, c.year, c.hour, c.minute, c.second
    );
    let version = match r.protocol {
        "h3" => "HTTP/3.0",
        "h2" => "HTTP/2.0",
        _ => "HTTP/1.1",
    };
    let request = if r.method.is_empty() {
        "-".to_owned()
    } else {
        format!("{} {} {version}", r.method, r.path)
    };
    clf_quoted(s, &request);
    let _ = write!(s, " {} ", r.status);
    if r.bytes_out == 0 {
        s.push('-');
    } else {
        let _ = write!(s, "{}", r.bytes_out);
    }
    if combined {
        for v in [&r.referer, &r.user_agent] {
            s.push(' ');
            if v.is_empty() {
                s.push_str("\"-\"");
            } else {
                clf_quoted(s, v);
            }
        }
    }
    s.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            time: Some(UNIX_EPOCH + Duration::from_millis(1_764_100_000_123)),
            client: Some("192.0.2.1:5000".parse().unwrap()),
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
            request_id: "id-1".into(),
            user_agent: "curl/8.0 \"x\"".into(),
            referer: "".into(),
            upstream_status: Some(200),
            upstream_time: Some(Duration::from_micros(250)),
            tls_version: "TLSv1.3",
            sni: "example.com".into(),
        }
    }

    #[test]
    fn lines_are_json_with_every_field() {
        let all: Vec<AccessField> = AccessField::ALL.iter().map(|(_, f)| *f).collect();
        let line = format_line(&record(), &AccessFormat::Json(all));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2025-11-25T19:46:40.123Z");
        assert_eq!(v["path"], "/a\"b");
        assert_eq!(v["protocol"], "h2");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["worker"], 1);
        assert_eq!(v["request_id"], "id-1");
        assert_eq!(v["user_agent"], "curl/8.0 \"x\"");
        assert_eq!(v["upstream_status"], 200);
        assert_eq!(v["upstream_time_ms"], 0.25);
        assert_eq!(v["tls_version"], "TLSv1.3");
        assert_eq!(v["sni"], "example.com");
        assert_eq!(v.as_object().unwrap().len(), AccessField::ALL.len());
        assert!(line.ends_with("}\n"));
        // A chosen list, in its order; no backend: nulls.
        let r = Record {
            upstream_status: None,
            upstream_time: None,
            ..record()
        };
        let line = format_line(
            &r,
            &AccessFormat::Json(vec![
                AccessField::Status,
                AccessField::UpstreamStatus,
                AccessField::UpstreamTimeMs,
            ]),
        );
        assert_eq!(
            line,
            "{\"status\":200,\"upstream_status\":null,\"upstream_time_ms\":null}\n"
        );
    }

    #[test]
    fn common_and_combined_lines() {
        let line = format_line(&record(), &AccessFormat::Common);
        assert_eq!(
            line,
            "192.0.2.1 - - [25/Nov/2025:19:46:40 +0000] \"GET /a\\x22b HTTP/2.0\" 200 2\n"
        );
        let line = format_line(&record(), &AccessFormat::Combined);
        assert_eq!(
            line,
            "192.0.2.1 - - [25/Nov/2025:19:46:40 +0000] \"GET /a\\x22b HTTP/2.0\" 200 2 \"-\" \"curl/8.0 \\x22x\\x22\"\n"
        );
        // Nothing received: "-" for the request and the size; a control byte escaped.
        let r = Record {
            method: String::new(),
            bytes_out: 0,
            status: 400,
            referer: "a\nb".into(),
            ..record()
        };
        assert_eq!(
            format_line(&r, &AccessFormat::Combined),
            "192.0.2.1 - - [25/Nov/2025:19:46:40 +0000] \"-\" 400 - \"a\\x0Ab\" \"curl/8.0 \\x22x\\x22\"\n"
        );
    }

    #[test]
    fn reopen_moves_lines_to_the_new_file() {
        let dir = std::env::temp_dir().join(format!("spooky-access-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("access.log");
        let log = AccessLogger::start(&AccessLog::File(path.clone()), &AccessFormat::Common)
            .expect("start");
        let wait_for = |p: &std::path::Path, lines: usize| {
            for _ in 0..500 {
                let n = std::fs::read_to_string(p).map_or(0, |t| t.lines().count());
                if n >= lines {
                    return n;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("{} never had {lines} lines", p.display());
        };
        log.log(record());
        wait_for(&path, 1);
        let rotated = dir.join("access.log.1");
        std::fs::rename(&path, &rotated).expect("rotate");
        log.log(record());
        wait_for(&rotated, 2);
        log.reopen();
        for _ in 0..500 {
            if log.reopens().0 == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(log.reopens(), (1, 0));
        log.log(record());
        assert_eq!(
            wait_for(&path, 1),
            1,
            "the new file has the line after the reopen"
        );
        assert_eq!(wait_for(&rotated, 2), 2, "the old one kept its two");
        let _ = std::fs::remove_dir_all(&dir);
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
