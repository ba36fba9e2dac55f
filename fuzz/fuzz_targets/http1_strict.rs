//! Fuzz target `http1_strict`: an HTTP/1.1 client's bytes through `tcp::strict::Strict`, the
//! reader that refuses request smuggling before hyper parses.
//!
//! Input: one byte `step` (the client's bytes arrive in pieces of `1 + step % 64` bytes), then
//! the client's bytes.
//!
//! Checked:
//! - the reader never panics and always ends (the client's end of file ends it);
//! - what hyper reads is the client's bytes unchanged, or, when the reader refused a head, a
//!   prefix of them (ending where that head began) followed by `REFUSAL` and nothing more;
//! - it refused at most once;
//! - how the bytes were split does not change what hyper reads (the same input whole gives the
//!   same output).

#![no_main]

use libfuzzer_sys::fuzz_target;
use spooky::tcp::strict::{Strict, REFUSAL};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

struct Pieces<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let n = this.step.min(this.data.len()).min(buf.remaining());
        buf.put_slice(&this.data[..n]);
        this.data = &this.data[n..];
        Poll::Ready(Ok(()))
    }
}

fn through(data: &[u8], step: usize) -> (Vec<u8>, u32) {
    let refusals = Arc::new(AtomicU32::new(0));
    let seen = refusals.clone();
    let mut reader = Strict::new(
        Pieces { data, step },
        8192,
        Box::new(move |_| {
            seen.fetch_add(1, Ordering::Relaxed);
        }),
    );
    let mut out = Vec::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(reader.read_to_end(&mut out)).expect("read");
    (out, refusals.load(Ordering::Relaxed))
}

fuzz_target!(|input: &[u8]| {
    let Some((&step, data)) = input.split_first() else {
        return;
    };
    let (out, refusals) = through(data, 1 + usize::from(step) % 64);
    assert!(refusals <= 1, "refused {refusals} times");
    if refusals == 0 {
        assert_eq!(out, data, "unrefused bytes pass unchanged");
    } else {
        let kept = out
            .strip_suffix(REFUSAL)
            .expect("a refusal ends with the refusal line");
        assert!(
            data.starts_with(kept),
            "what passed is a prefix of the input"
        );
    }
    let (whole, whole_refusals) = through(data, usize::MAX);
    assert_eq!(
        (whole, whole_refusals),
        (out, refusals),
        "the split does not matter"
    );
});
