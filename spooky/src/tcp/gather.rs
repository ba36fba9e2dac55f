//! Gathering HTTP/2's writes in TLS. h2 writes each frame on its own and flushes the
//! transport before it takes the next DATA frame, and tokio-rustls sends what it encrypted
//! on every write, so every frame became a `writev` of its own (with a 16 KiB record and a
//! 9-byte one for the frame head): a 1 MiB download took 128 system calls.
//!
//! [`Gathered`] hands hyper's writes to rustls, which encrypts them into its queue of
//! records (its one copy), and treats hyper's flushes as "more may come"; [`Flushing`], the
//! future that drives the connection, sends the queue whenever hyper has done all it can
//! for now (it returned `Pending`), and rustls's own limit (64 KiB queued) sends it
//! earlier. So one round of hyper's work — every frame it could send — leaves in as few
//! `writev`s as the socket allows, with no copy of our own.
//!
//! Nothing waits in the queue past the poll that wrote it: the connection's task sends it
//! before it sleeps, and a socket that cannot take it wakes the task when it can.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Write};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;

struct Shared<T> {
    tls: TlsStream<T>,
    /// A failure to send, for hyper's next write or flush.
    failed: Option<io::Error>,
}

impl<T> Shared<T> {
    fn take_failure(&mut self) -> io::Result<()> {
        self.failed.take().map_or(Ok(()), Err)
    }
}

/// The transport hyper gets: reads go straight through, writes are encrypted and queued.
pub(super) struct Gathered<T>(Rc<RefCell<Shared<T>>>);

/// `tls` split into the transport for hyper and the handle that sends what it queued.
pub(super) fn gather<T>(tls: TlsStream<T>) -> (Gathered<T>, SendQueued<T>) {
    let shared = Rc::new(RefCell::new(Shared { tls, failed: None }));
    (Gathered(shared.clone()), SendQueued(shared))
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Gathered<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.borrow_mut().tls).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Gathered<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut s = self.0.borrow_mut();
        s.take_failure()?;
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        loop {
            // Encrypted into rustls's queue, up to its limit (64 KiB queued).
            let n = s.tls.get_mut().1.writer().write_vectored(bufs)?;
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            // The queue is full: send it.
            std::task::ready!(Pin::new(&mut s.tls).poll_flush(cx))?;
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Hyper flushes after every frame; the queue is sent at the end of its round
    /// ([`Flushing`]), so here it only stays queued.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.0.borrow_mut().take_failure())
    }

    /// Sends the queue, then `close_notify`.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = self.0.borrow_mut();
        s.take_failure()?;
        std::task::ready!(Pin::new(&mut s.tls).poll_flush(cx))?;
        Pin::new(&mut s.tls).poll_shutdown(cx)
    }
}

/// Sends what [`Gathered`] queued.
pub(super) struct SendQueued<T>(Rc<RefCell<Shared<T>>>);

impl<T: AsyncRead + AsyncWrite + Unpin> SendQueued<T> {
    /// Sends the queue and flushes the socket; `Ready` once done or failed (a failure is
    /// kept for hyper's next write or flush, which ends the connection).
    fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.0.borrow_mut();
        match Pin::new(&mut s.tls).poll_flush(cx) {
            Poll::Ready(Err(e)) => {
                s.failed = Some(e);
                Poll::Ready(())
            }
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }

    fn failed(&self) -> bool {
        self.0.borrow().failed.is_some()
    }
}

/// A connection future whose queued writes are sent each time it has done what it can.
pub(super) struct Flushing<C, T> {
    conn: Pin<Box<C>>,
    out: SendQueued<T>,
}

impl<C, T> Flushing<C, T> {
    pub(super) fn new(conn: C, out: SendQueued<T>) -> Self {
        Self {
            conn: Box::pin(conn),
            out,
        }
    }

    /// The connection future inside.
    pub(super) fn conn(self: Pin<&mut Self>) -> Pin<&mut C> {
        self.get_mut().conn.as_mut()
    }
}

impl<C: Future, T: AsyncRead + AsyncWrite + Unpin> Future for Flushing<C, T> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = &mut *self;
        let r = this.conn.as_mut().poll(cx);
        // A failure is hyper's to see at its next write: let it run once more.
        if r.is_pending() && this.out.poll(cx).is_ready() && this.out.failed() {
            cx.waker().wake_by_ref();
        }
        r
    }
}

#[cfg(test)]
mod tests;
