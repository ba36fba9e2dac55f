//! A blocking HTTP/3 client on quiche, for `spooky get`, the quickstart and the tests. One
//! [`Client`] is one QUIC connection; several requests may be in flight on it. The I/O loop
//! is explicit ([`Client::pump`]) so a test can watch a response arrive piece by piece,
//! rebind the local port mid-connection, or send malformed field sections on purpose.

use bytes::Bytes;
use quiche::h3::{self, NameValue};
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("quic: {0}")]
    Quic(#[from] quiche::Error),
    #[error("http/3: {0}")]
    H3(#[from] h3::Error),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("connection closed: {0}")]
    Closed(String),
    /// The server sent a Stateless Reset: it has no state for the connection (it restarted).
    #[error("connection reset by the server (stateless reset)")]
    StatelessReset,
    #[error("connection timed out (idle timeout)")]
    IdleTimeout,
}

/// Connection options.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Verify the server certificate (against `ca` if given).
    pub verify: bool,
    pub ca: Option<std::path::PathBuf>,
    pub server_name: String,
    pub idle_timeout: Duration,
    /// The `max_udp_payload_size` transport parameter: the largest datagram the server may
    /// send us.
    pub max_udp_payload: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            verify: false,
            ca: None,
            server_name: "localhost".into(),
            idle_timeout: Duration::from_secs(30),
            max_udp_payload: 65527,
        }
    }
}

/// A response as far as it has arrived.
#[derive(Debug, Default, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    pub finished: bool,
    /// The server reset the stream with this code.
    pub reset: Option<u64>,
}

impl Response {
    /// First value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the stream has ended one way or another.
    pub fn done(&self) -> bool {
        self.finished || self.reset.is_some()
    }
}

/// A request to send.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The whole field section, pseudo-headers included, sent as given (no validation).
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Bytes,
    pub trailers: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Request {
    /// A GET for `authority` and `path`.
    pub fn get(authority: &str, path: &str) -> Self {
        Self::new("GET", authority, path)
    }

    /// A request with the four pseudo-headers.
    pub fn new(method: &str, authority: &str, path: &str) -> Self {
        let f = |n: &str, v: &str| (n.as_bytes().to_vec(), v.as_bytes().to_vec());
        Self {
            fields: vec![
                f(":method", method),
                f(":scheme", "https"),
                f(":authority", authority),
                f(":path", path),
            ],
            ..Default::default()
        }
    }

    /// Adds a field.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.fields
            .push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Adds a trailer field.
    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers
            .push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
        self
    }
}

struct Upload {
    body: Bytes,
    trailers: Vec<h3::Header>,
    done: bool,
    /// End the stream once the body is out (false while more is to come).
    fin: bool,
}

/// One HTTP/3 connection.
pub struct Client {
    socket: UdpSocket,
    peer: SocketAddr,
    conn: quiche::Connection,
    h3: Option<h3::Connection>,
    responses: HashMap<u64, Response>,
    uploads: HashMap<u64, Upload>,
    /// The local address quiche knows (kept across [`Client::rebind`], as NAT rebinding
    /// is invisible to the client).
    local: SocketAddr,
    buf: Vec<u8>,
    out: Vec<u8>,
}

fn to_h3(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<h3::Header> {
    fields.iter().map(|(n, v)| h3::Header::new(n, v)).collect()
}

fn from_h3(list: &[h3::Header]) -> Vec<(String, String)> {
    list.iter()
        .map(|h| {
            (
                String::from_utf8_lossy(h.name()).into_owned(),
                String::from_utf8_lossy(h.value()).into_owned(),
            )
        })
        .collect()
}

/// The QUIC settings of Spooky's HTTP/3 clients (this one and `spooky-load`): ALPN `h3`,
/// peer verification against `ca` when `verify`, windows large enough for 1 MiB bodies.
///
/// # Errors
/// When quiche refuses a setting or cannot read `ca`.
pub fn quic_config(
    verify: bool,
    ca: Option<&std::path::Path>,
    idle_timeout: Duration,
    max_streams_bidi: u64,
    active_cid_limit: u64,
) -> Result<quiche::Config, quiche::Error> {
    let mut cfg = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
    cfg.set_application_protos(h3::APPLICATION_PROTOCOL)?;
    cfg.verify_peer(verify);
    if let Some(ca) = ca {
        cfg.load_verify_locations_from_file(&ca.to_string_lossy())?;
    }
    cfg.set_max_idle_timeout(idle_timeout.as_millis() as u64);
    cfg.set_max_recv_udp_payload_size(65527);
    cfg.set_max_send_udp_payload_size(1350);
    cfg.set_initial_max_data(64 << 20);
    cfg.set_initial_max_stream_data_bidi_local(16 << 20);
    cfg.set_initial_max_stream_data_bidi_remote(16 << 20);
    cfg.set_initial_max_stream_data_uni(1 << 20);
    cfg.set_initial_max_streams_bidi(max_streams_bidi);
    cfg.set_initial_max_streams_uni(100);
    cfg.set_active_connection_id_limit(active_cid_limit);
    Ok(cfg)
}

impl Client {
    /// Connects to `peer` and finishes the handshake (and HTTP/3 setup) within `timeout`.
    ///
    /// # Errors
    /// [`ClientError`] on socket, TLS or QUIC failure, or timeout.
    pub fn connect(
        peer: SocketAddr,
        opts: &ClientOptions,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let bind: SocketAddr = if peer.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .map_err(|_| ClientError::Timeout("bind"))?;
        let socket = UdpSocket::bind(bind)?;
        let mut cfg = quic_config(opts.verify, opts.ca.as_deref(), opts.idle_timeout, 1000, 4)?;
        cfg.set_max_recv_udp_payload_size(opts.max_udp_payload);
        let mut scid = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut scid)
            .map_err(|_| ClientError::Timeout("rng"))?;
        let scid = quiche::ConnectionId::from_ref(&scid);
        let local = socket.local_addr()?;
        let conn = quiche::connect(Some(&opts.server_name), &scid, local, peer, &mut cfg)?;
        let mut client = Self {
            socket,
            peer,
            conn,
            h3: None,
            responses: HashMap::new(),
            uploads: HashMap::new(),
            local,
            buf: vec![0; 65535],
            out: vec![0; 65535],
        };
        let deadline = Instant::now() + timeout;
        client.flush()?;
        while client.h3.is_none() {
            client.pump(deadline)?;
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout("handshake"));
            }
        }
        Ok(client)
    }

    /// The local address (changes after [`Client::rebind`]).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The QUIC connection, for inspection.
    pub fn quic(&self) -> &quiche::Connection {
        &self.conn
    }

    /// Moves the connection to a new local UDP port without telling the server (what a NAT
    /// rebinding looks like from the server's side).
    ///
    /// # Errors
    /// When the new socket cannot be bound.
    pub fn rebind(&mut self) -> Result<(), ClientError> {
        let bind = if self.peer.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        self.socket = UdpSocket::bind(bind)?;
        Ok(())
    }

    /// Sends a request; returns its stream id.
    ///
    /// # Errors
    /// When HTTP/3 refuses the request (e.g. stream limit).
    pub fn send(&mut self, req: &Request) -> Result<u64, ClientError> {
        let h3c = self
            .h3
            .as_mut()
            .ok_or(ClientError::Closed("no h3".into()))?;
        let fin = req.body.is_empty() && req.trailers.is_empty();
        let sid = h3c.send_request(&mut self.conn, &to_h3(&req.fields), fin)?;
        self.responses.insert(sid, Response::default());
        if !fin {
            self.uploads.insert(
                sid,
                Upload {
                    body: req.body.clone(),
                    trailers: to_h3(&req.trailers),
                    done: false,
                    fin: true,
                },
            );
        }
        self.progress_uploads();
        self.flush()?;
        Ok(sid)
    }

    /// Sends a request head without ending the stream; the body follows with
    /// [`Client::send_body`] (for slow or never-finished uploads).
    ///
    /// # Errors
    /// When HTTP/3 refuses the request.
    pub fn send_open(&mut self, fields: &[(Vec<u8>, Vec<u8>)]) -> Result<u64, ClientError> {
        let h3c = self
            .h3
            .as_mut()
            .ok_or(ClientError::Closed("no h3".into()))?;
        let sid = h3c.send_request(&mut self.conn, &to_h3(fields), false)?;
        self.responses.insert(sid, Response::default());
        self.flush()?;
        Ok(sid)
    }

    /// Sends a body chunk on an open request stream (queued behind earlier chunks).
    ///
    /// # Errors
    /// When the connection fails.
    pub fn send_body(&mut self, sid: u64, data: &[u8], fin: bool) -> Result<(), ClientError> {
        let up = self.uploads.entry(sid).or_insert_with(|| Upload {
            body: Bytes::new(),
            trailers: Vec::new(),
            done: false,
            fin: false,
        });
        let mut body = up.body.to_vec();
        body.extend_from_slice(data);
        up.body = Bytes::from(body);
        up.fin = fin;
        self.progress_uploads();
        self.flush()
    }

    /// Writes raw bytes on request stream `sid`, below HTTP/3 (for crafting frames that
    /// quiche's HTTP/3 API would not send, such as a HEADERS frame cut short). Use a stream id
    /// HTTP/3 will not pick itself: the next one after the last [`Client::send`] is taken
    /// by the next `send`.
    ///
    /// # Errors
    /// When quiche refuses the write.
    pub fn send_raw(&mut self, sid: u64, data: &[u8], fin: bool) -> Result<(), ClientError> {
        self.conn.stream_send(sid, data, fin)?;
        self.responses.entry(sid).or_default();
        self.flush()
    }

    /// The response of stream `sid` so far.
    pub fn response(&self, sid: u64) -> Option<&Response> {
        self.responses.get(&sid)
    }

    /// Runs the I/O loop until stream `sid` ends, then returns and forgets its response.
    ///
    /// # Errors
    /// [`ClientError::Timeout`] past `timeout`, or the connection's failure.
    pub fn wait(&mut self, sid: u64, timeout: Duration) -> Result<Response, ClientError> {
        let deadline = Instant::now() + timeout;
        while !self.responses.get(&sid).is_some_and(Response::done) {
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout("response"));
            }
            self.pump(deadline)?;
        }
        Ok(self.responses.remove(&sid).unwrap_or_default())
    }

    /// Sends `req` and waits for its whole response.
    ///
    /// # Errors
    /// As [`Client::send`] and [`Client::wait`].
    pub fn request(&mut self, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
        let sid = self.send(req)?;
        self.wait(sid, timeout)
    }

    /// Receives what arrives until `deadline` or the next quiche timeout (at most 50 ms),
    /// processes it, and sends what is due.
    ///
    /// # Errors
    /// When the connection is closed or a socket call fails.
    pub fn pump(&mut self, deadline: Instant) -> Result<(), ClientError> {
        if self.conn.is_closed() {
            return Err(match (self.conn.peer_error(), self.conn.local_error()) {
                _ if self.conn.is_timed_out() => ClientError::IdleTimeout,
                // Closed with no error frame either way: quiche recognised a Stateless Reset.
                (None, None) => ClientError::StatelessReset,
                (peer, local) => ClientError::Closed(format!("{:?}", peer.or(local))),
            });
        }
        let now = Instant::now();
        let wait = self
            .conn
            .timeout()
            .unwrap_or(Duration::from_millis(50))
            .min(deadline.saturating_duration_since(now))
            .min(Duration::from_millis(50));
        self.socket
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        match self.socket.recv_from(&mut self.buf) {
            Ok((len, from)) => {
                let local = self.local;
                let _ = self
                    .conn
                    .recv(&mut self.buf[..len], quiche::RecvInfo { from, to: local });
                // Drain whatever else is queued without waiting.
                self.socket.set_nonblocking(true)?;
                while let Ok((len, from)) = self.socket.recv_from(&mut self.buf) {
                    let _ = self
                        .conn
                        .recv(&mut self.buf[..len], quiche::RecvInfo { from, to: local });
                }
                self.socket.set_nonblocking(false)?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                self.conn.on_timeout();
            }
            Err(e) => return Err(e.into()),
        }
        if self.h3.is_none() && self.conn.is_established() {
            let cfg = h3::Config::new()?;
            self.h3 = Some(h3::Connection::with_transport(&mut self.conn, &cfg)?);
        }
        self.poll_h3();
        self.progress_uploads();
        self.flush()
    }

    fn poll_h3(&mut self) {
        let Some(h3c) = self.h3.as_mut() else { return };
        loop {
            match h3c.poll(&mut self.conn) {
                Ok((sid, h3::Event::Headers { list, .. })) => {
                    let r = self.responses.entry(sid).or_default();
                    if r.status == 0 {
                        let fields = from_h3(&list);
                        r.status = fields
                            .iter()
                            .find(|(n, _)| n == ":status")
                            .and_then(|(_, v)| v.parse().ok())
                            .unwrap_or(0);
                        r.headers = fields
                            .into_iter()
                            .filter(|(n, _)| !n.starts_with(':'))
                            .collect();
                    } else {
                        r.trailers = from_h3(&list);
                    }
                }
                Ok((sid, h3::Event::Data)) => {
                    let r = self.responses.entry(sid).or_default();
                    while let Ok(n) = h3c.recv_body(&mut self.conn, sid, &mut self.buf) {
                        r.body.extend_from_slice(&self.buf[..n]);
                    }
                }
                Ok((sid, h3::Event::Finished)) => {
                    self.responses.entry(sid).or_default().finished = true
                }
                Ok((sid, h3::Event::Reset(code))) => {
                    self.responses.entry(sid).or_default().reset = Some(code)
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        // A stream the server reset (or stopped) without HTTP/3 noticing yet.
        for (sid, r) in self.responses.iter_mut() {
            if !r.done() && self.conn.stream_finished(*sid) && r.status == 0 {
                r.reset = Some(0);
            }
        }
    }

    fn progress_uploads(&mut self) {
        let Some(h3c) = self.h3.as_mut() else { return };
        for (sid, up) in self.uploads.iter_mut() {
            while !up.body.is_empty() {
                let fin = up.fin && up.trailers.is_empty();
                let len = up.body.len();
                match h3c.send_body(&mut self.conn, *sid, &up.body, fin) {
                    Ok(n) => {
                        let _ = up.body.split_to(n);
                        if n == len && fin {
                            up.done = true;
                        }
                        if n < len {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            if up.body.is_empty() && up.fin && !up.done {
                let sent = if up.trailers.is_empty() {
                    h3c.send_body(&mut self.conn, *sid, b"", true).map(|_| ())
                } else {
                    h3c.send_additional_headers(&mut self.conn, *sid, &up.trailers, true, true)
                };
                up.done = sent.is_ok();
            }
        }
        self.uploads.retain(|_, u| !u.done);
    }

    fn flush(&mut self) -> Result<(), ClientError> {
        loop {
            match self.conn.send(&mut self.out) {
                Ok((len, info)) => {
                    self.socket.send_to(&self.out[..len], info.to)?;
                }
                Err(quiche::Error::Done) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Closes the connection politely.
    pub fn close(&mut self) {
        let _ = self.conn.close(true, 0x100, b"");
        let _ = self.flush();
    }
}
