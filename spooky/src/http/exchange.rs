//! The state one request stream shares between its worker's QUIC loop and its proxy task,
//! both on the same thread (`Rc<RefCell<…>>`, no locks). Both directions are bounded
//! buffers: the loop stops reading the client's body when `req` is full (QUIC flow control
//! then pushes back on the client), and the task stops reading the backend's body when
//! `resp` is full (HTTP/2 flow control pushes back on the backend).

use crate::server::WorkerStats;
use bytes::Bytes;
use quiche::h3::Header;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};

/// quiche buffers stream data as `Bytes`: response bodies go from the backend's HTTP/2 frames
/// into QUIC packets without being copied into quiche first (`send_body_zc`).
#[derive(Clone, Debug, Default)]
pub struct BytesFactory;

impl quiche::BufFactory for BytesFactory {
    type Buf = Bytes;
    type DgramBuf = Vec<u8>;

    fn buf_from_slice(buf: &[u8]) -> Bytes {
        Bytes::copy_from_slice(buf)
    }

    fn dgram_buf_from_slice(buf: &[u8]) -> Vec<u8> {
        buf.to_vec()
    }
}

/// A client connection on a worker.
pub type QuicConn = quiche::Connection<BytesFactory>;

/// Most request-body bytes buffered per stream between client and backend.
pub const REQ_BUF_LIMIT: usize = 256 * 1024;
/// Most response-body bytes buffered per stream between backend and client.
pub const RESP_BUF_LIMIT: usize = 256 * 1024;

/// What the proxy task gets next from the client side.
pub enum ReqEvent {
    Data(Bytes),
    /// The body ended, with optional trailers.
    End(Option<http::HeaderMap>),
    /// The client reset the stream or the connection went away.
    Aborted,
    /// The body grew past the pool's `max_request_body`.
    TooLarge,
}

#[derive(Default)]
pub struct StreamIo {
    // client → backend
    pub req: VecDeque<Bytes>,
    pub req_buffered: usize,
    pub req_fin: bool,
    pub req_trailers: Option<http::HeaderMap>,
    pub req_received: u64,
    pub req_expected: Option<u64>,
    /// The pool's `max_request_body`; past it the loop stops reading and sets `req_too_large`.
    pub req_limit: Option<u64>,
    pub req_too_large: bool,
    /// The loop stopped reading because `req` was full; the task asks for more when it drains.
    pub req_read_blocked: bool,
    req_waker: Option<Waker>,

    // backend → client
    pub resp_head: Option<Vec<Header>>,
    pub resp_body: VecDeque<Bytes>,
    pub resp_buffered: usize,
    pub resp_trailers: Option<Vec<Header>>,
    pub resp_fin: bool,
    /// Reset the client stream with this HTTP/3 error code instead of finishing it.
    pub resp_reset: Option<u64>,
    resp_waker: Option<Waker>,

    // loop-side progress
    pub head_sent: bool,
    pub resp_done: bool,
    /// The client side is gone (stream reset, STOP_SENDING or connection closed).
    pub client_gone: bool,
    pub task_done: bool,
    /// Response status, for logs and metrics.
    pub status: u16,
    pub bytes_out: u64,
    /// The worker's counters: `streams_active` counts live `StreamIo`s.
    stats: Option<Arc<WorkerStats>>,
}

impl Drop for StreamIo {
    fn drop(&mut self) {
        if let Some(s) = &self.stats {
            s.streams_active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

pub type SharedStream = Rc<RefCell<StreamIo>>;

impl StreamIo {
    pub fn new(expected: Option<u64>, stats: Arc<WorkerStats>) -> SharedStream {
        stats.streams_active.fetch_add(1, Ordering::Relaxed);
        let mut io = StreamIo::default();
        io.req_expected = expected;
        io.stats = Some(stats);
        Rc::new(RefCell::new(io))
    }

    /// Loop side: a body chunk from the client.
    pub fn push_req(&mut self, data: Bytes) {
        self.req_received += data.len() as u64;
        self.req_buffered += data.len();
        self.req.push_back(data);
        self.wake_req();
    }

    pub fn wake_req(&mut self) {
        if let Some(w) = self.req_waker.take() {
            w.wake();
        }
    }

    pub fn wake_resp(&mut self) {
        if let Some(w) = self.resp_waker.take() {
            w.wake();
        }
    }

    /// Loop side: the client is gone; wake the task so it stops.
    pub fn abort_client(&mut self) {
        self.client_gone = true;
        self.wake_req();
        self.wake_resp();
    }

    /// Task side: the next request event, or `Pending` with the waker kept.
    pub fn poll_req(&mut self, waker: &Waker) -> Poll<ReqEvent> {
        if self.req_too_large {
            return Poll::Ready(ReqEvent::TooLarge);
        }
        if let Some(chunk) = self.req.pop_front() {
            self.req_buffered -= chunk.len();
            return Poll::Ready(ReqEvent::Data(chunk));
        }
        if self.client_gone {
            return Poll::Ready(ReqEvent::Aborted);
        }
        if self.req_fin {
            return Poll::Ready(ReqEvent::End(self.req_trailers.take()));
        }
        self.req_waker = Some(waker.clone());
        Poll::Pending
    }

    /// Task side: ready when the response buffer has room (`Ok`) or the client left (`Err`).
    pub fn poll_resp_room(&mut self, waker: &Waker) -> Poll<Result<(), ()>> {
        if self.client_gone {
            return Poll::Ready(Err(()));
        }
        if self.resp_buffered < RESP_BUF_LIMIT {
            return Poll::Ready(Ok(()));
        }
        self.resp_waker = Some(waker.clone());
        Poll::Pending
    }

    /// Task side: a response body chunk.
    pub fn push_resp(&mut self, data: Bytes) {
        self.resp_buffered += data.len();
        self.resp_body.push_back(data);
    }

    /// Task side: a whole local response (404, 502, …).
    pub fn respond_local(&mut self, status: u16, fields: Vec<Header>, body: Bytes) {
        self.status = status;
        self.resp_head = Some(fields);
        if !body.is_empty() {
            self.push_resp(body);
        }
        self.resp_fin = true;
    }
}
