//! How a request ends, in one place. Every way a request can fail is a [`Failure`]; this
//! module alone decides what follows from one: the status and short body Spooky answers with
//! (or the HTTP/3 code its stream is reset with when the response head already went out), the
//! STOP_SENDING code, what it says about the backend's health, and its log line. It also
//! turns every finished request — answered by a backend or by Spooky — into its metrics and
//! access-log record ([`record`]). The QUIC connection and the request task ask this module;
//! no other file writes a status code.
//!
//! Stream-level protocol errors that get no HTTP answer at all (a request head that never
//! completes, malformed trailers, a body that contradicts `content-length`) are
//! [`StreamError`]s, with their HTTP/3 codes here too.

use super::bridge::{
    self, ConvertError, RequestError, RequestHead, H3_EXCESSIVE_LOAD, H3_INTERNAL_ERROR,
    H3_MESSAGE_ERROR, H3_REQUEST_CANCELLED, H3_REQUEST_REJECTED,
};
use super::Forwarder;
use crate::health::TrafficOutcome;
use crate::stats::Outcome;
use crate::telemetry::access_log;
use crate::telemetry::logging::{LogGate, LogKind};
use crate::upstream::{ErrorKind, UpstreamError};
use bytes::Bytes;
use quiche::h3::Header;
use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Status recorded for a request whose client went away before any answer (nginx's 499).
pub const CLIENT_CLOSED: u16 = 499;

/// Why a request did not get a backend's complete response.
#[derive(Debug)]
pub enum Failure {
    /// The field section is larger than `proxy.max_header_list_size`.
    HeadersTooLarge { size: u64 },
    /// RFC 9114 §4.3: malformed.
    Malformed(RequestError),
    /// `content-length` announced a body that the stream (ended by HEADERS) does not carry.
    BodyMissing,
    /// No pool routes this host and path.
    NoRoute,
    /// Another of our certificates names the request's host: the client reused a connection
    /// that is not for it (RFC 9110 §15.5.20).
    Misdirected,
    /// CONNECT is not supported.
    Connect,
    /// The body is larger than the pool's `max_request_body` (declared, or as it arrived).
    BodyTooLarge { limit: u64 },
    /// The client's body went silent for the pool's idle timeout.
    BodyIdle { idle: Duration },
    /// No backend of the pool may take the request.
    NoHealthyBackend { pool: String },
    /// The process is above `proxy.memory_limit`: new requests are shed.
    Overloaded,
    /// The client's address has `quic.max_streams_per_ip` request streams open already.
    TooManyStreams,
    /// A request with an unsafe method arrived in 0-RTT and `quic.early_data` is `reject`
    /// (RFC 8470 §5.2: 425, the client repeats it after the handshake).
    TooEarly,
    /// The route's `access` list does not let the client's address in.
    Forbidden,
    /// The route's `rate_limit` is spent for the request's key; one may go in `retry_after`.
    RateLimited { retry_after: Duration },
    /// Every backend the balancer offered has `max_requests_per_backend` in flight.
    BackendsFull { pool: String },
    /// The route's `timeouts.request` passed before the response was complete.
    Deadline { after: Duration },
    /// The head could not be expressed in HTTP/2.
    Convert(ConvertError),
    /// Talking to the backend failed.
    Upstream(UpstreamError),
    /// After the response head went out: the rest cannot be delivered (the backend reset,
    /// went silent, or the request body could not be sent).
    Broken { cause: String },
    /// The client went away: there is nobody to answer.
    ClientGone,
}

/// What to do with the client's stream once a failure is known.
#[derive(Debug)]
pub enum Reaction {
    /// Nothing (the client is gone).
    Nothing,
    /// Answer with this response; afterwards send STOP_SENDING with the code, if any.
    Answer {
        status: u16,
        fields: Vec<Header>,
        body: Bytes,
        stop_sending: Option<u64>,
    },
    /// Reset the stream with this HTTP/3 code (the head went out already).
    Reset(u64),
}

impl Failure {
    /// The status Spooky answers with (or records, for a client that left).
    pub fn status(&self) -> u16 {
        match self {
            Failure::HeadersTooLarge { .. } => 431,
            Failure::Malformed(_) | Failure::BodyMissing => 400,
            Failure::NoRoute => 404,
            Failure::Forbidden => 403,
            Failure::RateLimited { .. } => 429,
            Failure::BackendsFull { .. } => 503,
            Failure::Deadline { .. } => 504,
            Failure::Misdirected => 421,
            Failure::Connect => 501,
            Failure::BodyTooLarge { .. } => 413,
            Failure::BodyIdle { .. } => 408,
            Failure::NoHealthyBackend { .. } | Failure::Overloaded => 503,
            Failure::Upstream(e) if is_busy(e.kind) => 503,
            Failure::TooEarly => 425,
            Failure::TooManyStreams => 429,
            Failure::Upstream(e) if is_timeout(e.kind) => 504,
            Failure::Convert(_) | Failure::Upstream(_) | Failure::Broken { .. } => 502,
            Failure::ClientGone => CLIENT_CLOSED,
        }
    }

    /// The short body of the answer.
    fn text(&self) -> Cow<'static, str> {
        match self {
            Failure::HeadersTooLarge { .. } => "request header fields too large".into(),
            Failure::Malformed(e) => format!("malformed request: {e}").into(),
            Failure::BodyMissing => "malformed request: content-length mismatch".into(),
            Failure::NoRoute => "no route".into(),
            Failure::Forbidden => "forbidden".into(),
            Failure::RateLimited { .. } => "too many requests".into(),
            Failure::BackendsFull { .. } => "upstream busy".into(),
            Failure::Deadline { .. } => "request timed out".into(),
            Failure::Misdirected => {
                "misdirected request: this connection's certificate is not the host's".into()
            }
            Failure::Connect => "CONNECT is not supported".into(),
            Failure::BodyTooLarge { .. } => "request body too large".into(),
            Failure::BodyIdle { .. } => "request body timed out".into(),
            Failure::NoHealthyBackend { .. } => "no healthy backend".into(),
            Failure::Overloaded => "overloaded".into(),
            Failure::TooManyStreams => "too many requests open from this address".into(),
            Failure::TooEarly => "too early: repeat the request after the handshake".into(),
            Failure::Upstream(e) if is_timeout(e.kind) => "upstream timed out".into(),
            Failure::Upstream(e) if is_busy(e.kind) => "upstream busy".into(),
            _ => "bad gateway".into(),
        }
    }

    /// What the client's stream gets, given whether the response head went out already.
    pub fn reaction(&self, head_sent: bool) -> Reaction {
        match self {
            Failure::ClientGone => Reaction::Nothing,
            Failure::Broken { .. } => Reaction::Reset(H3_INTERNAL_ERROR),
            _ if head_sent => Reaction::Reset(H3_INTERNAL_ERROR),
            _ => {
                let status = self.status();
                let busy = matches!(self, Failure::Upstream(e) if is_busy(e.kind));
                let retry_after = match self {
                    // Whole seconds, rounded up (RFC 9110 §10.2.3), at least 1.
                    Failure::RateLimited { retry_after } => Some(
                        u32::try_from(retry_after.as_nanos().div_ceil(1_000_000_000).max(1))
                            .unwrap_or(u32::MAX),
                    ),
                    _ => (busy
                        || matches!(
                            self,
                            Failure::NoHealthyBackend { .. }
                                | Failure::Overloaded
                                | Failure::TooManyStreams
                                | Failure::BackendsFull { .. }
                        ))
                    .then_some(1),
                };
                let (fields, body) = bridge::local_response(status, &self.text(), retry_after);
                Reaction::Answer {
                    status,
                    fields,
                    body,
                    // A malformed request is not read further.
                    stop_sending: matches!(self, Failure::Malformed(_)).then_some(H3_MESSAGE_ERROR),
                }
            }
        }
    }

    /// What the failure says about the backend: `None` when it says nothing (a refused
    /// stream is retried; the client's own mistakes are not the backend's).
    pub fn passive_health(&self) -> Option<TrafficOutcome> {
        match self {
            // Another request's failure handed on: counted once, where it happened.
            Failure::Upstream(e) if e.repeat => None,
            Failure::Upstream(e) => upstream_health(e.kind),
            _ => None,
        }
    }

    /// One log line, through the worker's `gate` (clients must not be able to buy log
    /// volume: `suppressed` says how many lines of its kind were left out before it).
    /// Answers Spooky gives before choosing a pool are at info/debug (clients' mistakes);
    /// failures of a chosen pool at warn, naming it and its backend.
    pub fn log(&self, peer: SocketAddr, pool: Option<&str>, gate: &LogGate) {
        let status = self.status();
        let kind = match (self, pool) {
            (Failure::ClientGone, _) => return,
            (Failure::NoRoute, _) => {
                tracing::debug!(%peer, status, "no route");
                return;
            }
            (Failure::Broken { .. }, _) => LogKind::Aborted,
            (_, None) => LogKind::Refused,
            (f, Some(_)) if f.is_policy() => LogKind::Refused,
            (_, Some(_)) => LogKind::Failed,
        };
        let Some(suppressed) = gate.admit(kind) else {
            return;
        };
        match (self, pool) {
            (Failure::Broken { cause }, pool) => tracing::warn!(
                upstream = pool.unwrap_or(""),
                %cause,
                suppressed,
                "response aborted; client stream reset"
            ),
            (_, None) => {
                tracing::info!(%peer, status, reason = %self.text(), detail = ?self, suppressed, "request refused")
            }
            (f, Some(pool)) if f.is_policy() => {
                tracing::info!(%peer, upstream = pool, status, reason = %self.cause(), suppressed, "request refused by the route's policy")
            }
            (_, Some(pool)) => {
                let cause = self.cause();
                tracing::warn!(upstream = pool, status, %cause, suppressed, "request failed");
            }
        }
    }

    fn cause(&self) -> String {
        match self {
            Failure::HeadersTooLarge { size } => format!("request header list of {size} bytes"),
            Failure::Malformed(e) => format!("malformed request: {e}"),
            Failure::Upstream(e) => e.to_string(),
            Failure::NoHealthyBackend { pool } => format!("no healthy backend in upstream {pool}"),
            Failure::BodyTooLarge { limit } => format!("request body over {limit} bytes"),
            Failure::BodyIdle { idle } => format!("request body idle for {idle:?}"),
            Failure::Convert(e) => e.to_string(),
            Failure::Forbidden => "client address not allowed by access".into(),
            Failure::RateLimited { retry_after } => {
                format!("over rate_limit (next in {} ms)", retry_after.as_millis())
            }
            Failure::BackendsFull { pool } => {
                format!("every backend of upstream {pool} has max_requests_per_backend in flight")
            }
            Failure::Deadline { after } => format!("timeouts.request of {after:?} passed"),
            other => other.text().into_owned(),
        }
    }

    /// A refusal by the route's own policy (the client's doing, or a configured limit), not a
    /// backend's failure: logged at info.
    pub fn is_policy(&self) -> bool {
        matches!(
            self,
            Failure::Forbidden
                | Failure::RateLimited { .. }
                | Failure::BackendsFull { .. }
                | Failure::HeadersTooLarge { .. }
        )
    }

    /// The route policy reason this failure counts under (`spooky_route_refusals_total`).
    pub fn refusal(&self) -> Option<crate::stats::Refusal> {
        use crate::stats::Refusal;
        match self {
            Failure::Forbidden => Some(Refusal::Access),
            Failure::RateLimited { .. } => Some(Refusal::RateLimit),
            Failure::BackendsFull { .. } => Some(Refusal::BackendLimit),
            Failure::Deadline { .. } => Some(Refusal::Deadline),
            Failure::HeadersTooLarge { .. } => Some(Refusal::Headers),
            Failure::BodyTooLarge { .. } => Some(Refusal::Body),
            _ => None,
        }
    }
}

/// Logs a request that succeeded after a backend failed it (on another backend, or on a fresh
/// connection): the failure, once, through the worker's `gate`. A request that fails for good
/// is logged by [`Failure::log`] instead, naming the backend.
pub fn log_recovered(pool: &str, e: &UpstreamError, gate: &LogGate) {
    if let Some(suppressed) = gate.admit(LogKind::Failed) {
        tracing::info!(upstream = %pool, backend = %e.backend, kind = ?e.kind, cause = %e.detail, suppressed, "request recovered after a backend failure");
    }
}

fn is_timeout(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::ConnectTimeout | ErrorKind::ResponseTimeout)
}

/// The backend cannot take more now (too many waiting, or no slot came free): 503, and
/// nothing about its health.
fn is_busy(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Overflow | ErrorKind::PendingTimeout)
}

fn upstream_health(kind: ErrorKind) -> Option<TrafficOutcome> {
    match kind {
        ErrorKind::Refused => None,
        k if is_busy(k) => None,
        k if is_timeout(k) => Some(TrafficOutcome::Timeout),
        ErrorKind::Connect | ErrorKind::Tls | ErrorKind::Handshake => {
            Some(TrafficOutcome::ConnectFailure)
        }
        _ => Some(TrafficOutcome::ServerError),
    }
}

/// What a backend's response status says about the backend: a 5xx is a failure only where
/// the pool counts them (`passive_health.server_errors`), since a client can provoke one.
pub fn response_health(status: u16, server_errors: bool) -> TrafficOutcome {
    if status >= 500 && server_errors {
        TrafficOutcome::ServerError
    } else {
        TrafficOutcome::Success
    }
}

/// The answer to `OPTIONS *`: a question about Spooky itself, answered by Spooky.
pub fn options_answer() -> (u16, Vec<Header>, Bytes) {
    let (fields, body) = bridge::local_response(200, "ok", None);
    (200, fields, body)
}

/// Request-stream errors that get no HTTP answer, only an HTTP/3 stream error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamError {
    /// The request head did not arrive within `quic.request_header_timeout`: nothing of the
    /// request was processed, the client may retry.
    HeadTimeout,
    /// Trailers that are not valid, or HEADERS after the trailers.
    BadTrailers,
    /// The body contradicts `content-length`.
    LengthMismatch,
    /// The body went past the pool's limit: stop the upload (the task answers 413).
    StopUpload,
    /// Writing the response into the stream failed.
    WriteFailed,
    /// The client took no byte of the response for `quic.send_timeout` (it never reads, or
    /// withholds flow-control credit): the stream and the backend's are released.
    SendTimeout,
    /// A stalled response stream over `quic.max_stalled_streams(_per_ip)`, or held while the
    /// process is above `proxy.memory_limit`: released with the backend's.
    Shed,
}

impl StreamError {
    /// The HTTP/3 error code the stream is reset (or stopped) with.
    pub fn code(self) -> u64 {
        match self {
            StreamError::HeadTimeout | StreamError::StopUpload => H3_REQUEST_REJECTED,
            StreamError::BadTrailers | StreamError::LengthMismatch => H3_MESSAGE_ERROR,
            StreamError::WriteFailed | StreamError::SendTimeout => H3_REQUEST_CANCELLED,
            StreamError::Shed => H3_EXCESSIVE_LOAD,
        }
    }
}

/// A finished request, as metrics and the access log see it.
pub struct Finished<'a> {
    pub client: &'a super::Client,
    pub head: Option<&'a RequestHead>,
    /// The pool and the backend finally used, when there were any.
    pub upstream: Option<usize>,
    pub backend: Option<usize>,
    pub status: u16,
    pub started: Instant,
    /// Time to the backend's response head.
    pub upstream_latency: Option<Duration>,
    /// The route policy that refused it, if one did.
    pub refusal: Option<crate::stats::Refusal>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Records a finished request: its metric series (pool and backend, the pool alone, or
/// Spooky's own answers) and its access-log line.
pub fn record(fwd: &Forwarder, f: &Finished<'_>) {
    let outcome = Outcome {
        protocol: f.client.protocol,
        status: f.status,
        total: f.started.elapsed(),
        upstream: f.upstream_latency,
        refusal: f.refusal,
        bytes_in: f.bytes_in,
        bytes_out: f.bytes_out,
    };
    let worker = fwd.services.worker;
    fwd.series(f.upstream, f.backend).record(worker, &outcome);
    let log = &fwd.services.access_log;
    if !log.enabled() {
        return;
    }
    let up = f
        .upstream
        .and_then(|u| fwd.snapshot.config.upstreams.get(u));
    let backend = up.zip(f.backend).and_then(|(up, b)| up.backends.get(b));
    let field = |name: &str| {
        f.head
            .and_then(|h| h.fields.iter().find(|(n, _)| n.as_ref() == name.as_bytes()))
            .map(|(_, v)| access_log::bounded(&String::from_utf8_lossy(v)))
            .unwrap_or_default()
    };
    log.log(access_log::Record {
        time: Some(std::time::SystemTime::now()),
        client: Some(f.client.peer),
        protocol: f.client.protocol.label(),
        tls_version: f.client.tls_version,
        sni: f
            .client
            .sni
            .as_deref()
            .map(access_log::bounded)
            .unwrap_or_default(),
        request_id: f
            .head
            .map(|h| String::from_utf8_lossy(&h.request_id).into_owned())
            .unwrap_or_default(),
        user_agent: field("user-agent"),
        referer: field("referer"),
        upstream_status: f.upstream_latency.map(|_| outcome.status),
        upstream_time: f.upstream_latency,
        host: f
            .head
            .map(|h| access_log::bounded(h.authority_str()))
            .unwrap_or_default(),
        method: f
            .head
            .map(|h| access_log::bounded(h.method.as_str()))
            .unwrap_or_default(),
        path: f
            .head
            .map(|h| access_log::bounded(h.path_str()))
            .unwrap_or_default(),
        status: outcome.status,
        bytes_in: outcome.bytes_in,
        bytes_out: outcome.bytes_out,
        duration: outcome.total,
        pool: up.map(|u| u.name.clone()).unwrap_or_default(),
        backend: backend.map(|b| b.id.clone()).unwrap_or_default(),
        worker,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    fn upstream(kind: ErrorKind) -> Failure {
        Failure::Upstream(UpstreamError::new(kind, &Rc::from("b1"), "detail"))
    }

    /// A failure handed on from another request's connect: counted once, not again.
    fn repeated(kind: ErrorKind) -> Failure {
        let mut e = UpstreamError::new(kind, &Rc::from("b1"), "detail");
        e.repeat = true;
        Failure::Upstream(e)
    }

    fn answered(f: &Failure) -> (u16, String, Option<u64>, Option<String>) {
        match f.reaction(false) {
            Reaction::Answer {
                status,
                fields,
                body,
                stop_sending,
            } => {
                let field = |n: &[u8]| {
                    fields
                        .iter()
                        .find(|h| quiche::h3::NameValue::name(*h) == n)
                        .map(|h| {
                            String::from_utf8_lossy(quiche::h3::NameValue::value(h)).into_owned()
                        })
                };
                assert_eq!(field(b":status"), Some(status.to_string()));
                (
                    status,
                    String::from_utf8_lossy(&body).trim_end().to_owned(),
                    stop_sending,
                    field(b"retry-after"),
                )
            }
            other => panic!("{f:?} answered with {other:?}"),
        }
    }

    #[test]
    fn every_failure_has_its_answer() {
        use ErrorKind::*;
        type Row = (
            Failure,
            u16,
            &'static str,
            Option<u64>,
            Option<&'static str>,
            Option<TrafficOutcome>,
        );
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            (Failure::HeadersTooLarge { size: 99_999 }, 431, "request header fields too large", None, None, None),
            (Failure::Malformed(RequestError::BadTe), 400, "malformed request: te header other than \"trailers\"", Some(H3_MESSAGE_ERROR), None, None),
            (Failure::BodyMissing, 400, "malformed request: content-length mismatch", None, None, None),
            (Failure::NoRoute, 404, "no route", None, None, None),
            (Failure::Connect, 501, "CONNECT is not supported", None, None, None),
            (Failure::BodyTooLarge { limit: 10 }, 413, "request body too large", None, None, None),
            (Failure::BodyIdle { idle: Duration::from_secs(1) }, 408, "request body timed out", None, None, None),
            (Failure::NoHealthyBackend { pool: "api".into() }, 503, "no healthy backend", None, Some("1"), None),
            (Failure::TooManyStreams, 429, "too many requests open from this address", None, Some("1"), None),
            (upstream(Connect), 502, "bad gateway", None, None, Some(TrafficOutcome::ConnectFailure)),
            (upstream(Tls), 502, "bad gateway", None, None, Some(TrafficOutcome::ConnectFailure)),
            (upstream(Handshake), 502, "bad gateway", None, None, Some(TrafficOutcome::ConnectFailure)),
            (upstream(ConnectTimeout), 504, "upstream timed out", None, None, Some(TrafficOutcome::Timeout)),
            (upstream(ResponseTimeout), 504, "upstream timed out", None, None, Some(TrafficOutcome::Timeout)),
            (upstream(Reset), 502, "bad gateway", None, None, Some(TrafficOutcome::ServerError)),
            (upstream(Protocol), 502, "bad gateway", None, None, Some(TrafficOutcome::ServerError)),
            (upstream(Refused), 502, "bad gateway", None, None, None),
            (upstream(Overflow), 503, "upstream busy", None, Some("1"), None),
            (upstream(PendingTimeout), 503, "upstream busy", None, Some("1"), None),
            (repeated(ConnectTimeout), 504, "upstream timed out", None, None, None),
            (repeated(Connect), 502, "bad gateway", None, None, None),
            (Failure::Forbidden, 403, "forbidden", None, None, None),
            (Failure::RateLimited { retry_after: Duration::from_millis(200) }, 429, "too many requests", None, Some("1"), None),
            (Failure::RateLimited { retry_after: Duration::from_millis(2_100) }, 429, "too many requests", None, Some("3"), None),
            (Failure::BackendsFull { pool: "api".into() }, 503, "upstream busy", None, Some("1"), None),
            (Failure::Deadline { after: Duration::from_secs(1) }, 504, "request timed out", None, None, None),
        ];
        for (f, status, text, stop, retry_after, health) in rows {
            let (s, t, st, ra) = answered(&f);
            assert_eq!(
                (s, t.as_str(), st, ra.as_deref()),
                (status, text, stop, retry_after),
                "{f:?}"
            );
            assert_eq!(f.status(), status);
            assert_eq!(f.passive_health(), health, "{f:?}");
            // Once the head is out, every one of them resets the stream instead.
            assert!(
                matches!(f.reaction(true), Reaction::Reset(H3_INTERNAL_ERROR)),
                "{f:?}"
            );
        }
    }

    #[test]
    fn after_the_head_or_without_a_client() {
        let broken = Failure::Broken {
            cause: "backend reset".into(),
        };
        assert!(matches!(
            broken.reaction(false),
            Reaction::Reset(H3_INTERNAL_ERROR)
        ));
        assert_eq!(broken.status(), 502);
        assert!(matches!(
            Failure::ClientGone.reaction(false),
            Reaction::Nothing
        ));
        assert_eq!(Failure::ClientGone.status(), CLIENT_CLOSED);
    }

    #[test]
    fn responses_and_stream_errors() {
        assert_eq!(response_health(200, true), TrafficOutcome::Success);
        assert_eq!(response_health(404, true), TrafficOutcome::Success);
        assert_eq!(response_health(503, true), TrafficOutcome::ServerError);
        assert_eq!(response_health(503, false), TrafficOutcome::Success);
        assert_eq!(options_answer().0, 200);
        assert_eq!(StreamError::HeadTimeout.code(), H3_REQUEST_REJECTED);
        assert_eq!(StreamError::StopUpload.code(), H3_REQUEST_REJECTED);
        assert_eq!(StreamError::BadTrailers.code(), H3_MESSAGE_ERROR);
        assert_eq!(StreamError::LengthMismatch.code(), H3_MESSAGE_ERROR);
        assert_eq!(StreamError::WriteFailed.code(), H3_REQUEST_CANCELLED);
    }
}
