//! The state of one request stream between the worker's QUIC loop and the stream's request
//! task, both on the worker's thread (`Rc<RefCell<…>>`, no locks).
//!
//! Each direction has one writer. The loop holds the [`LoopEnd`]: it writes the request
//! (body chunks, end, trailers, the client going away) and drains the response into quiche.
//! The task holds the [`TaskEnd`]: it reads the request and writes the response (head, body
//! chunks, end or reset). Each half is a small state machine whose transitions are checked
//! (modelled on h2's stream `State`): a call out of order is refused with a
//! [`TransitionError`] and changes nothing.
//!
//! ```text
//! request (loop writes, task reads)        response (task writes, loop writes into quiche)
//!
//!   Open ──end──► Ended ──task reads──► Taken     head:  Waiting ──respond──► Ready ──► Written
//!    │                                            end:   Open ──finish──► Finishing ──► Written
//!    └──over the limit──► TooLarge                       Open/Finishing ──reset──► Reset(code)
//! ```
//!
//! Both directions are bounded: the loop stops reading the client's body while
//! [`REQ_BUF_LIMIT`] bytes wait for the task (QUIC flow control then pushes back on the
//! client), and the task stops reading the backend while [`RESP_BUF_LIMIT`] bytes wait for the
//! loop (HTTP/2 flow control pushes back on the backend) — or, sooner, once it holds
//! [`RESP_AHEAD`] bytes more than the client's flow-control credit lets quiche take, so that a
//! client that reads nothing holds little here. The client going away (stream reset,
//! STOP_SENDING, connection closed) is a flag either side may read and only the loop sets.
//!
//! Wake-ups are the exchange's business, as in h2's stream state: every change the task makes
//! that the loop must act on (a head, a chunk, the end, a reset, request bytes taken while the
//! loop waits for room, the task going away) wakes the loop end itself — the QUIC
//! connection's [`ConnWaker`], or the wakers a loop end awaited as futures (TCP) left — so no
//! caller has to remember to. A task that goes away without finishing its response (it
//! panicked) leaves the stream reset with `H3_INTERNAL_ERROR`, never hanging.

use super::bridge::H3_INTERNAL_ERROR;
use crate::stats::WorkerStats;
use bytes::Bytes;
use quiche::h3::Header;
use std::cell::{Cell, Ref, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};

/// Most request-body bytes buffered per stream between client and backend.
pub const REQ_BUF_LIMIT: usize = 256 * 1024;
/// Most response-body bytes buffered per stream between backend and client.
pub const RESP_BUF_LIMIT: usize = 256 * 1024;
/// Response-body bytes buffered ahead of what the client can take now (its flow-control
/// credit, as quiche's stream capacity says): a client that takes nothing has at most this
/// much of its response waiting here, not [`RESP_BUF_LIMIT`].
pub const RESP_AHEAD: usize = 32 * 1024;

/// A call that the current state does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stream state: {call} not allowed in {state}")]
pub struct TransitionError {
    pub call: &'static str,
    pub state: &'static str,
}

fn refuse<T>(call: &'static str, state: &'static str) -> Result<T, TransitionError> {
    Err(TransitionError { call, state })
}

/// Where the request body stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    /// Body bytes may still arrive.
    Open,
    /// The client ended the body; the task has not seen the end yet.
    Ended(Option<http::HeaderMap>),
    /// The task has seen the end.
    Taken,
    /// The body grew past the pool's limit (the task answers 413).
    TooLarge,
}

/// Where the response head stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Head {
    Waiting,
    Ready(Vec<Header>),
    Written,
}

/// Where the end of the response stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// More body may come from the task.
    Open,
    /// The task gave everything; trailers (if any) follow the queued body.
    Finishing(Option<Vec<Header>>),
    /// The end is written into quiche.
    Written,
    /// The task asked for the stream to be reset with this HTTP/3 code.
    Reset(u64),
}

/// What the task reads next from the request.
#[derive(Debug)]
pub enum RequestEvent {
    Data(Bytes),
    /// The body ended, with optional trailers.
    End(Option<http::HeaderMap>),
    /// The client reset the stream or the connection went away.
    Aborted,
    /// The body grew past the pool's `max_request_body`.
    TooLarge,
}

/// Why the loop refused a piece of the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Past the pool's `max_request_body`: stop reading, the task answers 413.
    TooLarge,
    /// The body does not match `content-length`: the request is malformed.
    LengthMismatch,
    /// The body had already ended (a transition the state does not allow).
    Ended,
}

struct State {
    request: Request,
    req_queue: VecDeque<Bytes>,
    req_buffered: usize,
    req_received: u64,
    req_expected: Option<u64>,
    req_limit: Option<u64>,
    /// The loop stopped reading because the queue was full.
    req_read_blocked: bool,
    req_waker: Option<Waker>,

    head: Head,
    end: End,
    resp_queue: VecDeque<Bytes>,
    resp_buffered: usize,
    /// The task reads the backend while `resp_buffered` is below this: what the client can
    /// take now plus [`RESP_AHEAD`], at most [`RESP_BUF_LIMIT`] (set by the loop).
    resp_limit: usize,
    resp_waker: Option<Waker>,

    client_gone: bool,
    task_done: bool,
    /// The QUIC connection this stream belongs to: woken for whatever the loop must act on.
    conn: Option<Rc<ConnWaker>>,
    /// Set by a loop end that waits as futures (the TCP front). `loop_resp_waker`: the task
    /// gave something to write; `loop_req_waker`: the task took request bytes.
    loop_resp_waker: Option<Waker>,
    loop_req_waker: Option<Waker>,
    /// `streams_active` counts live exchanges.
    stats: Arc<WorkerStats>,
}

impl Drop for State {
    fn drop(&mut self) {
        self.stats.streams_active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl State {
    fn wake_req(&mut self) {
        if let Some(w) = self.req_waker.take() {
            w.wake();
        }
    }

    fn wake_resp(&mut self) {
        if let Some(w) = self.resp_waker.take() {
            w.wake();
        }
    }

    fn wake_loop_resp(&mut self) {
        if let Some(w) = self.loop_resp_waker.take() {
            w.wake();
        }
        if let Some(c) = &self.conn {
            c.wake();
        }
    }

    fn wake_loop_req(&mut self) {
        if let Some(w) = self.loop_req_waker.take() {
            w.wake();
        }
        if let Some(c) = &self.conn {
            c.wake();
        }
    }
}

/// A QUIC client connection on a worker: its slot and the slot's generation (a reused slot
/// gets a new one, so a late wake-up for a closed connection is ignored).
pub(crate) type ConnRef = (usize, u64);

/// The worker loop's list of connections to service, and its doorbell.
#[derive(Default)]
pub(crate) struct Wakeup {
    dirty: RefCell<Vec<Rc<ConnWaker>>>,
    notify: tokio::sync::Notify,
}

impl Wakeup {
    /// The connections woken since the last call; each may be woken again from now on.
    pub fn take(&self) -> Vec<ConnRef> {
        std::mem::take(&mut *self.dirty.borrow_mut())
            .into_iter()
            .map(|c| {
                c.queued.set(false);
                c.conn
            })
            .collect()
    }

    /// Resolves when a connection was woken.
    ///
    /// # Cancel safety
    /// Cancel-safe: a wake-up that arrives meanwhile is kept for the next call.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

/// Wakes one QUIC connection's loop end: puts the connection on the worker's list (once until
/// the loop takes it) and rings the loop. One per connection, shared by its exchanges.
pub(crate) struct ConnWaker {
    conn: ConnRef,
    queued: Cell<bool>,
    wakeup: Rc<Wakeup>,
}

impl ConnWaker {
    pub fn new(wakeup: Rc<Wakeup>, conn: ConnRef) -> Rc<Self> {
        Rc::new(Self {
            conn,
            queued: Cell::new(false),
            wakeup,
        })
    }

    /// Asks the loop to service the connection soon.
    pub fn wake(self: &Rc<Self>) {
        if !self.queued.replace(true) {
            self.wakeup.dirty.borrow_mut().push(self.clone());
            self.wakeup.notify.notify_one();
        }
    }
}

/// What the loop knows of a new request stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestShape {
    /// `content-length`, when the client declared one.
    pub expected: Option<u64>,
    /// The pool's `max_request_body`.
    pub limit: Option<u64>,
    /// The HEADERS frame did not end the stream: a body (or trailers) follows.
    pub body_follows: bool,
}

/// A new exchange: the loop's end and the task's end. `conn`: the QUIC connection to wake
/// (none for a loop end awaited as futures).
pub fn new(
    shape: RequestShape,
    stats: Arc<WorkerStats>,
    conn: Option<Rc<ConnWaker>>,
) -> (LoopEnd, TaskEnd) {
    stats.streams_active.fetch_add(1, Ordering::Relaxed);
    let state = Rc::new(RefCell::new(State {
        request: if shape.body_follows {
            Request::Open
        } else {
            Request::Ended(None)
        },
        req_queue: VecDeque::new(),
        req_buffered: 0,
        req_received: 0,
        req_expected: shape.expected,
        req_limit: shape.limit,
        req_read_blocked: false,
        req_waker: None,
        head: Head::Waiting,
        end: End::Open,
        resp_queue: VecDeque::new(),
        resp_buffered: 0,
        resp_limit: RESP_BUF_LIMIT,
        resp_waker: None,
        client_gone: false,
        task_done: false,
        conn,
        loop_resp_waker: None,
        loop_req_waker: None,
        stats,
    }));
    (LoopEnd(state.clone()), TaskEnd(state))
}

/// An exchange answered by the loop itself, without a task: the whole response is ready.
pub fn local(
    head: Vec<Header>,
    body: Bytes,
    body_follows: bool,
    stats: Arc<WorkerStats>,
) -> LoopEnd {
    let shape = RequestShape {
        body_follows,
        ..RequestShape::default()
    };
    let (loop_end, task) = new(shape, stats, None);
    // A fresh exchange accepts a whole response.
    let _ = task.respond(head);
    if !body.is_empty() {
        let _ = task.push_body(body);
    }
    let _ = task.finish(None);
    drop(task);
    loop_end
}

/// The QUIC loop's end of an exchange (clones are handles on the same end).
#[derive(Clone)]
pub struct LoopEnd(Rc<RefCell<State>>);

/// What the loop should write into quiche next.
#[derive(Debug)]
pub enum Pending {
    /// Nothing now.
    Nothing,
    /// Write the head ([`LoopEnd::head_fields`]); `fin` when nothing follows it.
    Head { fin: bool },
    /// Write this chunk (zero-copy); `fin` when it is the last thing on the stream.
    Body { chunk: Bytes, fin: bool },
    /// Write the trailers ([`LoopEnd::trailer_fields`]), with fin.
    Trailers,
    /// End the stream with an empty fin.
    Fin,
    /// Reset the stream with this HTTP/3 code.
    Reset(u64),
}

impl LoopEnd {
    /// A body chunk from the client.
    ///
    /// # Errors
    /// [`BodyError`] when the chunk breaks the pool's limit or the declared length, or the
    /// body had ended; the chunk is then not queued.
    pub fn push_request(&self, data: Bytes) -> Result<(), BodyError> {
        let mut s = self.0.borrow_mut();
        match s.request {
            Request::Open => {}
            Request::TooLarge => return Err(BodyError::TooLarge),
            Request::Ended(_) | Request::Taken => return Err(BodyError::Ended),
        }
        if s.task_done {
            // Answered already: what arrives is dropped.
            return Ok(());
        }
        let received = s.req_received + data.len() as u64;
        if s.req_limit.is_some_and(|limit| received > limit) {
            s.req_received = received;
            s.request = Request::TooLarge;
            s.wake_req();
            return Err(BodyError::TooLarge);
        }
        if s.req_expected.is_some_and(|n| received > n) {
            return Err(BodyError::LengthMismatch);
        }
        s.req_received = received;
        s.req_buffered += data.len();
        s.req_queue.push_back(data);
        s.wake_req();
        Ok(())
    }

    /// The client ended the body, with `trailers` if it sent some.
    ///
    /// # Errors
    /// [`BodyError::LengthMismatch`] when the body is shorter than `content-length` said,
    /// [`BodyError::Ended`] for trailers after the end. A second end without trailers (the
    /// stream's FIN after trailers or after a HEADERS-only request) changes nothing.
    pub fn end_request(&self, trailers: Option<http::HeaderMap>) -> Result<(), BodyError> {
        let mut s = self.0.borrow_mut();
        match (&s.request, &trailers) {
            (Request::Open, _) => {}
            // Nobody reads on: the task answers 413.
            (Request::TooLarge, _) => return Ok(()),
            // The stream's FIN after trailers, or after a request without a body.
            (Request::Ended(_) | Request::Taken, None) => return Ok(()),
            (Request::Ended(_) | Request::Taken, Some(_)) => return Err(BodyError::Ended),
        }
        if s.req_expected.is_some_and(|n| n != s.req_received) {
            return Err(BodyError::LengthMismatch);
        }
        s.request = Request::Ended(trailers);
        s.wake_req();
        Ok(())
    }

    /// Whether the loop may read more of the client's body now; when not, it is marked
    /// blocked and the task wakes the loop once it has taken some.
    pub fn room_for_request(&self) -> bool {
        let mut s = self.0.borrow_mut();
        let room = s.req_buffered < REQ_BUF_LIMIT;
        s.req_read_blocked = !room;
        room
    }

    /// The loop stopped reading for lack of room and there is room again.
    pub fn wants_reading(&self) -> bool {
        let s = self.0.borrow();
        s.req_read_blocked && s.req_buffered < REQ_BUF_LIMIT
    }

    /// The client is gone: wake the task so it stops.
    pub fn abort(&self) {
        let mut s = self.0.borrow_mut();
        s.client_gone = true;
        s.wake_req();
        s.wake_resp();
    }

    /// The next thing to write into quiche (the head, a chunk, the end) or a reset.
    pub fn pending(&self) -> Pending {
        let s = self.0.borrow();
        if let End::Reset(code) = s.end {
            return Pending::Reset(code);
        }
        match (&s.head, &s.end) {
            (Head::Waiting, _) => Pending::Nothing,
            (Head::Ready(_), end) => Pending::Head {
                fin: matches!(end, End::Finishing(None)) && s.resp_queue.is_empty(),
            },
            (Head::Written, End::Written) => Pending::Nothing,
            (Head::Written, end) => match s.resp_queue.front() {
                Some(chunk) => Pending::Body {
                    chunk: chunk.clone(),
                    fin: s.resp_queue.len() == 1 && matches!(end, End::Finishing(None)),
                },
                None => match end {
                    End::Finishing(Some(_)) => Pending::Trailers,
                    End::Finishing(None) => Pending::Fin,
                    _ => Pending::Nothing,
                },
            },
        }
    }

    /// The response head the task gave, while it waits to be written (borrowed: release it
    /// before the next call on this end).
    pub fn head_fields(&self) -> Option<Ref<'_, [Header]>> {
        Ref::filter_map(self.0.borrow(), |s| match &s.head {
            Head::Ready(fields) => Some(fields.as_slice()),
            _ => None,
        })
        .ok()
    }

    /// The trailers the task gave, while they wait to be written (borrowed, as above).
    pub fn trailer_fields(&self) -> Option<Ref<'_, [Header]>> {
        Ref::filter_map(self.0.borrow(), |s| match &s.end {
            End::Finishing(Some(t)) => Some(t.as_slice()),
            _ => None,
        })
        .ok()
    }

    /// The head went into quiche (with fin when [`Pending::Head`] said so).
    ///
    /// # Errors
    /// A [`TransitionError`] when no head was ready.
    pub fn head_written(&self, fin: bool) -> Result<(), TransitionError> {
        self.take_head(fin).map(drop)
    }

    /// [`Self::head_written`] for a front that converts the head rather than writing it as
    /// it is: the fields are handed over, not copied.
    ///
    /// # Errors
    /// A [`TransitionError`] when no head was ready.
    pub fn take_head(&self, fin: bool) -> Result<Vec<Header>, TransitionError> {
        let mut s = self.0.borrow_mut();
        match std::mem::replace(&mut s.head, Head::Written) {
            Head::Ready(fields) => {
                if fin {
                    s.end = End::Written;
                }
                Ok(fields)
            }
            other => {
                s.head = other;
                drop(s);
                refuse("take_head", "no head ready")
            }
        }
    }

    /// The client can take `capacity` more bytes of this stream now (quiche's stream
    /// capacity): the task may buffer that much plus [`RESP_AHEAD`], at most
    /// [`RESP_BUF_LIMIT`]; woken when that opens room.
    pub fn set_client_room(&self, capacity: usize) {
        let mut s = self.0.borrow_mut();
        s.resp_limit = capacity.saturating_add(RESP_AHEAD).min(RESP_BUF_LIMIT);
        if s.resp_buffered < s.resp_limit {
            s.wake_resp();
        }
    }

    /// `n` bytes of the front chunk went into quiche; `fin` when that ended the stream.
    ///
    /// # Errors
    /// A [`TransitionError`] when no chunk was queued or `n` is longer than it.
    pub fn body_written(&self, n: usize, fin: bool) -> Result<(), TransitionError> {
        let mut s = self.0.borrow_mut();
        if s.head != Head::Written {
            return refuse("body_written", "head not written");
        }
        let Some(front) = s.resp_queue.front_mut() else {
            return refuse("body_written", "no chunk queued");
        };
        if n > front.len() {
            return refuse("body_written", "shorter chunk");
        }
        let whole = n == front.len();
        let _ = front.split_to(n);
        if whole {
            s.resp_queue.pop_front();
        }
        s.resp_buffered -= n;
        if fin && whole && s.resp_queue.is_empty() {
            s.end = End::Written;
        }
        s.wake_resp();
        Ok(())
    }

    /// The trailers or the empty fin went into quiche.
    ///
    /// # Errors
    /// A [`TransitionError`] when the task had not finished or body is still queued.
    pub fn end_written(&self) -> Result<(), TransitionError> {
        let mut s = self.0.borrow_mut();
        if !matches!(s.end, End::Finishing(_)) || !s.resp_queue.is_empty() {
            return refuse("end_written", "response not finishing");
        }
        s.end = End::Written;
        Ok(())
    }

    /// The whole response is in quiche and the task is gone: the exchange is over.
    pub fn complete(&self) -> bool {
        let s = self.0.borrow();
        s.end == End::Written && s.task_done
    }

    /// The client's body was not read to its end (a complete response may stop it early).
    pub fn request_unfinished(&self) -> bool {
        matches!(self.0.borrow().request, Request::Open | Request::TooLarge)
    }

    /// The client is gone (the loop set it).
    pub fn client_gone(&self) -> bool {
        self.0.borrow().client_gone
    }

    /// For a loop end awaited as a future: `waker` is woken when the task gives the loop
    /// something to write (a head, body, the end, a reset) or goes away.
    pub fn wake_on_response(&self, waker: &Waker) {
        self.0.borrow_mut().loop_resp_waker = Some(waker.clone());
    }

    /// For a loop end awaited as a future: `waker` is woken when the task takes request
    /// bytes (so there may be room again, [`Self::wants_reading`]) or goes away.
    pub fn wake_on_request_room(&self, waker: &Waker) {
        self.0.borrow_mut().loop_req_waker = Some(waker.clone());
    }

    /// The task is gone (its response is complete, or it never will be).
    pub fn task_done(&self) -> bool {
        self.0.borrow().task_done
    }
}

/// The request task's end of an exchange; the task is done when it is dropped.
pub struct TaskEnd(Rc<RefCell<State>>);

impl Drop for TaskEnd {
    fn drop(&mut self) {
        let mut s = self.0.borrow_mut();
        s.task_done = true;
        // Gone without finishing (a panic): the client's stream is reset, not left hanging.
        let unfinished = s.head == Head::Waiting || s.end == End::Open;
        if unfinished && !s.client_gone && !matches!(s.end, End::Reset(_) | End::Written) {
            s.end = End::Reset(H3_INTERNAL_ERROR);
            s.stats.tasks_unfinished.fetch_add(1, Ordering::Relaxed);
        }
        s.wake_loop_resp();
        s.wake_loop_req();
    }
}

impl TaskEnd {
    /// The next request event, or `Pending` with the waker kept.
    pub fn poll_request(&self, waker: &Waker) -> Poll<RequestEvent> {
        let mut s = self.0.borrow_mut();
        if s.request == Request::TooLarge {
            return Poll::Ready(RequestEvent::TooLarge);
        }
        if let Some(chunk) = s.req_queue.pop_front() {
            s.req_buffered -= chunk.len();
            if s.req_read_blocked {
                s.wake_loop_req();
            }
            return Poll::Ready(RequestEvent::Data(chunk));
        }
        if s.client_gone {
            return Poll::Ready(RequestEvent::Aborted);
        }
        if let Request::Ended(_) = s.request {
            let Request::Ended(trailers) = std::mem::replace(&mut s.request, Request::Taken) else {
                return Poll::Pending;
            };
            return Poll::Ready(RequestEvent::End(trailers));
        }
        s.req_waker = Some(waker.clone());
        Poll::Pending
    }

    /// The whole request is already here and has no body: the head can carry END_STREAM.
    pub fn request_is_empty(&self) -> bool {
        let s = self.0.borrow();
        matches!(s.request, Request::Ended(None)) && s.req_queue.is_empty()
    }

    /// Request-body bytes received from the client so far.
    pub fn request_bytes(&self) -> u64 {
        self.0.borrow().req_received
    }

    /// The pool's body limit (for the 413's log line).
    pub fn request_limit(&self) -> Option<u64> {
        self.0.borrow().req_limit
    }

    /// Ready when the response queue has room (`Ok`) or the client left (`Err`).
    pub fn poll_response_room(&self, waker: &Waker) -> Poll<Result<(), ClientGone>> {
        let mut s = self.0.borrow_mut();
        if s.client_gone {
            return Poll::Ready(Err(ClientGone));
        }
        if s.resp_buffered < s.resp_limit {
            return Poll::Ready(Ok(()));
        }
        s.resp_waker = Some(waker.clone());
        Poll::Pending
    }

    /// Ready once the client is gone (for a task that waits on something else, a backend's
    /// connection say, and must stop when nobody wants the answer any more).
    pub fn poll_client_gone(&self, waker: &Waker) -> Poll<()> {
        let mut s = self.0.borrow_mut();
        if s.client_gone {
            return Poll::Ready(());
        }
        s.resp_waker = Some(waker.clone());
        Poll::Pending
    }

    /// Whether the head has been given.
    pub fn responded(&self) -> bool {
        self.0.borrow().head != Head::Waiting
    }

    /// The response head.
    ///
    /// # Errors
    /// A [`TransitionError`] when a head was given already.
    pub fn respond(&self, fields: Vec<Header>) -> Result<(), TransitionError> {
        let mut s = self.0.borrow_mut();
        if s.head != Head::Waiting {
            return refuse("respond", "head given");
        }
        s.head = Head::Ready(fields);
        s.wake_loop_resp();
        Ok(())
    }

    /// A response body chunk.
    ///
    /// # Errors
    /// A [`TransitionError`] before the head or after the end.
    pub fn push_body(&self, data: Bytes) -> Result<(), TransitionError> {
        let mut s = self.0.borrow_mut();
        if s.head == Head::Waiting {
            return refuse("push_body", "no head");
        }
        if s.end != End::Open {
            return refuse("push_body", "response ended");
        }
        s.resp_buffered += data.len();
        s.resp_queue.push_back(data);
        s.wake_loop_resp();
        Ok(())
    }

    /// The response is complete, with optional trailers.
    ///
    /// # Errors
    /// A [`TransitionError`] before the head or after the end.
    pub fn finish(&self, trailers: Option<Vec<Header>>) -> Result<(), TransitionError> {
        let mut s = self.0.borrow_mut();
        if s.head == Head::Waiting {
            return refuse("finish", "no head");
        }
        if s.end != End::Open {
            return refuse("finish", "response ended");
        }
        s.end = End::Finishing(trailers);
        s.wake_loop_resp();
        Ok(())
    }

    /// Reset the client stream with `code` instead of finishing it (a failure after the head).
    ///
    /// # Errors
    /// A [`TransitionError`] when the end was already written.
    pub fn reset(&self, code: u64) -> Result<(), TransitionError> {
        let mut s = self.0.borrow_mut();
        match s.end {
            End::Written => refuse("reset", "response written"),
            End::Reset(_) => Ok(()),
            _ => {
                s.end = End::Reset(code);
                s.wake_loop_resp();
                Ok(())
            }
        }
    }
}

/// The client went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientGone;

#[cfg(test)]
mod tests;
