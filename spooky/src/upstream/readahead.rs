//! Large reads under a framed reader. `h2` reads a backend socket through a codec that asks
//! for little more than the frame it is assembling (often 8–16 KiB), so a 1 MiB response
//! costs about 200 `recv` calls, each with TCP's receive-side bookkeeping and, on loopback,
//! a window-update ACK processed on our CPU. [`ReadAhead`] reads up to [`READ_AHEAD`] bytes
//! at once and serves the small reads from memory. Writes pass through untouched.
//!
//! In HTTP/2 frame mode ([`ReadAhead::h2_frames`], for a stream that carries nothing but
//! frames from its first byte, as a server's side of an HTTP/2 connection does) a frame is
//! handed out as its 9-byte header first, then its payload, and no read crosses the end of a
//! frame. The codec sizes its buffer for a frame when it decodes the header; while earlier
//! frames' payloads are still referenced (we keep them, zero-copy, until the client
//! acknowledges them) growing that buffer means a new allocation and a copy of everything in
//! it. Given the header alone, that copy is 9 bytes instead of up to a whole frame.
//!
//! Measured in `docs/benchmarks.md` (1 MiB downloads through nginx h2c).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// Bytes asked of the socket per read.
pub const READ_AHEAD: usize = 64 * 1024;

/// An HTTP/2 frame header: 24-bit length, type, flags, stream id (RFC 9113 §4.1).
const H2_FRAME_HEADER: usize = 9;

pub struct ReadAhead<T> {
    inner: T,
    buf: Box<[u8]>,
    /// `buf[start..end]` holds bytes read but not yet handed out.
    start: usize,
    end: usize,
    /// The inner reader reported its end.
    eof: bool,
    /// Frame mode: bytes left in the current frame (0: at a frame boundary). `None`: plain.
    frame_left: Option<usize>,
}

impl<T> ReadAhead<T> {
    /// Plain read-ahead.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: vec![0; READ_AHEAD].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            frame_left: None,
        }
    }

    /// Read-ahead whose reads end at HTTP/2 frame boundaries (`inner` carries only frames).
    pub fn h2_frames(inner: T) -> Self {
        Self {
            frame_left: Some(0),
            ..Self::new(inner)
        }
    }

    #[cfg(test)]
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// How many buffered bytes may be handed out now.
    fn servable(&mut self) -> usize {
        let avail = self.end - self.start;
        match self.frame_left {
            None => avail,
            Some(0) if avail >= H2_FRAME_HEADER => {
                let b = &self.buf[self.start..self.start + 3];
                let len = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
                self.frame_left = Some(H2_FRAME_HEADER + len);
                // The header alone: the codec then sizes its buffer for the whole frame
                // before the payload arrives, instead of growing (and copying) it midway.
                H2_FRAME_HEADER
            }
            // A header cut short by the end of the stream: hand over what there is.
            Some(0) if self.eof => avail,
            Some(0) => 0,
            Some(left) => avail.min(left),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            let limit = this.servable();
            if limit > 0 {
                let n = out.remaining().min(limit);
                out.put_slice(&this.buf[this.start..this.start + n]);
                this.start += n;
                if let Some(left) = this.frame_left.as_mut() {
                    *left = left.saturating_sub(n);
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // Keep what is left (at most a partial frame header) and read more after it.
            this.buf.copy_within(this.start..this.end, 0);
            this.end -= this.start;
            this.start = 0;
            let mut fill = ReadBuf::new(&mut this.buf[this.end..]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut fill) {
                Poll::Ready(Ok(())) => {
                    let n = fill.filled().len();
                    this.eof = n == 0;
                    this.end += n;
                }
                other => return other,
            }
        }
    }
}

writes_through!(ReadAhead);

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
    async fn a_short_stream_and_its_end_are_passed_on() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        w.write_all(&[7u8; 100]).await.unwrap();
        drop(w);
        let mut r = ReadAhead::new(r);
        let mut big = vec![0u8; 2 * READ_AHEAD];
        assert_eq!(r.read(&mut big).await.unwrap(), 100);
        assert_eq!(r.read(&mut big).await.unwrap(), 0, "end of stream");
    }

    /// HTTP/2 frames of these payload lengths, each payload filled with its index.
    fn frames(lens: &[usize]) -> Vec<u8> {
        let mut v = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            v.extend_from_slice(&[
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                0,
                0,
                0,
                0,
                0,
                1,
            ]);
            v.extend(std::iter::repeat_n(i as u8, len));
        }
        v
    }

    #[tokio::test]
    async fn frame_mode_reads_end_at_frame_boundaries() {
        let lens = [0usize, 6, 8192, 70_000, 1, 16_384, 0, 3];
        let data = frames(&lens);
        let (mut w, r) = tokio::io::duplex(1 << 20);
        w.write_all(&data).await.unwrap();
        drop(w);
        let mut r = ReadAhead::h2_frames(Counting { inner: r, reads: 0 });
        // Boundaries a read may end on: every frame's end.
        let mut ends = Vec::new();
        let mut at = 0;
        for len in lens {
            at += H2_FRAME_HEADER + len;
            ends.push(at);
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; 100_000];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            // A read may stop inside a frame (the buffer ran dry) but never run past one's end;
            // a frame's header comes alone.
            let before = got.len() - n;
            if ends.contains(&before) || before == 0 {
                assert_eq!(n, H2_FRAME_HEADER, "a header and more at {before}");
            }
            let next_end = ends.iter().find(|&&e| e > before).copied().unwrap();
            assert!(
                got.len() <= next_end,
                "read {before}..{} crosses {next_end}",
                got.len()
            );
        }
        assert!(got == data, "bytes differ or are out of order");
        assert!(r.get_ref().reads <= 5, "{} socket reads", r.get_ref().reads);
    }

    #[tokio::test]
    async fn frame_mode_waits_for_a_whole_header_and_passes_a_truncated_one_at_the_end() {
        let (mut w, r) = tokio::io::duplex(1024);
        let mut r = ReadAhead::h2_frames(r);
        // Half a header: nothing is handed out until the rest arrives.
        w.write_all(&[0, 0, 2, 0, 0]).await.unwrap();
        let mut buf = [0u8; 64];
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(50), r.read(&mut buf)).await;
        assert!(early.is_err(), "a partial header was handed out");
        w.write_all(&[0, 0, 0, 1, b'h', b'i', 0, 0]).await.unwrap();
        drop(w);
        // The header first, then the payload.
        assert_eq!(r.read(&mut buf).await.unwrap(), 9);
        assert_eq!(r.read(&mut buf).await.unwrap(), 2);
        assert_eq!(&buf[..2], b"hi");
        // Two bytes of a header and then the end: handed over as they are, then the end.
        assert_eq!(r.read(&mut buf).await.unwrap(), 2);
        assert_eq!(r.read(&mut buf).await.unwrap(), 0);
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
