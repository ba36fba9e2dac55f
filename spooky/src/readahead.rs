//! Large reads under a framed reader. `h2` reads a backend socket through a codec that asks
//! for little more than the frame it is assembling (often 8–16 KiB), so a 1 MiB response
//! costs about 200 `recv` calls, each with TCP's receive-side bookkeeping and, on loopback,
//! a window-update ACK processed on our CPU. [`ReadAhead`] reads up to [`READ_AHEAD`] bytes
//! at once and serves the small reads from memory; a read that asks for at least that much
//! goes straight to the socket. Writes pass through untouched.
//!
//! Measured in `docs/benchmarks.md` (1 MiB downloads through nginx h2c).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes asked of the socket per read.
pub const READ_AHEAD: usize = 64 * 1024;

pub struct ReadAhead<T> {
    inner: T,
    buf: Box<[u8]>,
    /// `buf[start..end]` holds bytes read but not yet handed out.
    start: usize,
    end: usize,
}

impl<T> ReadAhead<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: vec![0; READ_AHEAD].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.start == this.end {
            if out.remaining() >= READ_AHEAD {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            let mut fill = ReadBuf::new(&mut this.buf);
            match Pin::new(&mut this.inner).poll_read(cx, &mut fill) {
                Poll::Ready(Ok(())) => {
                    this.start = 0;
                    this.end = fill.filled().len();
                }
                other => return other,
            }
        }
        let n = out.remaining().min(this.end - this.start);
        out.put_slice(&this.buf[this.start..this.start + n]);
        this.start += n;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the reads that reach the inner reader.
    struct Counting<T> {
        inner: T,
        reads: usize,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let r = Pin::new(&mut self.inner).poll_read(cx, out);
            if r.is_ready() {
                self.reads += 1;
            }
            r
        }
    }

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order_from_few_large_ones() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let (mut w, r) = tokio::io::duplex(1 << 20);
        w.write_all(&data).await.unwrap();
        drop(w);
        let mut r = ReadAhead::new(Counting { inner: r, reads: 0 });
        let mut got = Vec::new();
        let mut small_reads = 0;
        loop {
            // Alternate a frame header's and a frame's worth, as a codec does.
            let mut chunk = vec![0u8; if small_reads % 2 == 0 { 9 } else { 8 * 1024 }];
            let n = r.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            small_reads += 1;
        }
        assert!(got == data, "bytes differ or are out of order");
        // 300,000 bytes in 64 KiB reads: 5 with data and 1 for the end of stream.
        assert!(small_reads > 60);
        assert_eq!(r.get_ref().reads, 6);
    }

    #[tokio::test]
    async fn a_large_read_bypasses_the_buffer_and_eof_is_passed_on() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        w.write_all(&[7u8; 100]).await.unwrap();
        drop(w);
        let mut r = ReadAhead::new(r);
        let mut big = vec![0u8; READ_AHEAD];
        assert_eq!(r.read(&mut big).await.unwrap(), 100);
        assert_eq!(r.start, r.end, "nothing went through the buffer");
        assert_eq!(r.read(&mut big).await.unwrap(), 0, "end of stream");
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut a = ReadAhead::new(a);
        a.write_all(b"hello").await.unwrap();
        a.flush().await.unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }
}
