use super::*;
use tokio::io::AsyncReadExt;

/// A client that sends `data` in pieces of `step` bytes.
struct Trickle {
    data: Vec<u8>,
    pos: usize,
    step: usize,
}

impl AsyncRead for Trickle {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = this
            .step
            .min(this.data.len() - this.pos)
            .min(buf.remaining());
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// What hyper would read from `data` sent in `step`-byte pieces, and what was refused.
fn through(data: &[u8], step: usize) -> (Vec<u8>, Option<Refusal>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let refused = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = refused.clone();
        let mut s = Strict::new(
            Trickle {
                data: data.to_vec(),
                pos: 0,
                step,
            },
            64 * 1024,
            Box::new(move |why| *seen.lock().unwrap() = Some(why)),
        );
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let why = *refused.lock().unwrap();
        (out, why)
    })
}

const STEPS: [usize; 6] = [1, 2, 3, 7, 64, 1 << 20];

const GOOD: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\nab\ncd\n\r\nGET /\
PUT /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
5;ext=1\r\nhe\nlo\r\n0\r\nX-Sum: 1\r\n\r\n\
PUT /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
GET /last HTTP/1.1\r\nHost: a\r\n\r\n";

#[test]
fn well_formed_pipelines_pass_unchanged_however_they_arrive() {
    for step in STEPS {
        assert_eq!(through(GOOD, step), (GOOD.to_vec(), None), "step {step}");
    }
}

/// `bad` after a good request: hyper gets the good one, then the refusal line.
fn refused_after_a_good_request(bad: &[u8], why: Refusal) {
    let first = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
    let mut data = first.clone();
    data.extend_from_slice(bad);
    data.extend_from_slice(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n");
    let mut want = first;
    want.extend_from_slice(REFUSAL);
    for step in STEPS {
        assert_eq!(
            through(&data, step),
            (want.clone(), Some(why)),
            "step {step}"
        );
    }
}

#[test]
fn content_length_with_transfer_encoding_is_refused_in_either_order() {
    refused_after_a_good_request(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        Refusal::LengthAndChunked,
    );
    refused_after_a_good_request(
        b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n0\r\n\r\n",
        Refusal::LengthAndChunked,
    );
}

#[test]
fn two_content_lengths_are_refused_even_when_equal() {
    refused_after_a_good_request(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        Refusal::TwoLengths,
    );
}

#[test]
fn bare_lf_is_refused_in_heads_chunk_lines_and_trailers() {
    refused_after_a_good_request(b"GET /x HTTP/1.1\nHost: a\r\n\r\n", Refusal::BareLf);
    refused_after_a_good_request(b"GET /x HTTP/1.1\r\nHost: a\n\n", Refusal::BareLf);
    // The chunk-size line and the end of a chunk: the head before them was handed on.
    let chunked = b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (tail, why) in [
        (&b"3\nabc\r\n0\r\n\r\n"[..], "size line"),
        (&b"3\r\nabc\n0\r\n\r\n"[..], "chunk end"),
        (&b"3\r\nabc\r\n0\r\nX-T: 1\n\r\n"[..], "trailer"),
    ] {
        let mut data = chunked.to_vec();
        data.extend_from_slice(tail);
        let (out, refused) = through(&data, 5);
        assert_eq!(refused, Some(Refusal::BareLf), "{why}");
        assert!(out.ends_with(REFUSAL), "{why}");
        assert!(out.starts_with(chunked), "{why}");
    }
}

#[test]
fn a_request_hidden_in_a_body_is_body() {
    let hidden = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 46\r\n\r\n\
GET /x HTTP/1.1\nHost: a\r\nContent-Length: 1\r\n\r\n";
    for step in STEPS {
        assert_eq!(
            through(hidden, step),
            (hidden.to_vec(), None),
            "step {step}"
        );
    }
}

#[test]
fn what_hyper_refuses_itself_is_handed_on() {
    // obs-fold: httparse rejects it, hyper answers 400 and closes.
    let folded = b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  2\r\n\r\n";
    assert_eq!(through(folded, 3), (folded.to_vec(), None));
    // A head longer than the limit: hyper answers 431.
    let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 70 * 1024));
    assert_eq!(through(&long, 4096), (long.clone(), None));
}

/// The parser's work for `data` sent a byte at a time, and what hyper would read.
fn parse_work_byte_by_byte(data: &[u8]) -> (u64, Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut s = Strict::new(
            Trickle {
                data: data.to_vec(),
                pos: 0,
                step: 1,
            },
            64 * 1024,
            Box::new(|_| {}),
        );
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        (s.parsed_bytes(), out)
    })
}

#[test]
fn a_head_trickled_byte_by_byte_is_parsed_a_bounded_number_of_times() {
    // One long field, many short fields, a long chunked body's size lines and trailers:
    // whatever the shape, the parser sees each byte a few times, not once per read.
    let long = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Long: {}\r\n\r\n",
        "a".repeat(60_000)
    );
    let many = format!(
        "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
        (0..100)
            .map(|i| format!("X-{i}: {}\r\n", "v".repeat(500)))
            .collect::<String>()
    );
    let chunked = format!(
        "PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{}0\r\nX-T: {}\r\n\r\n",
        "1;e=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\nz\r\n".repeat(500),
        "t".repeat(20_000)
    );
    for head in [long, many, chunked] {
        let (work, out) = parse_work_byte_by_byte(head.as_bytes());
        assert_eq!(out, head.as_bytes(), "passed through unchanged");
        let bound = 4 * head.len() as u64;
        assert!(
            work <= bound,
            "{} bytes trickled one at a time cost {work} bytes of parsing (bound {bound})",
            head.len()
        );
    }
}

#[test]
fn after_a_websocket_upgrade_the_bytes_are_frames_not_heads() {
    // Frames carry any byte, bare LFs included: after the upgrade head nothing is checked.
    let mut data =
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            .to_vec();
    data.extend_from_slice(b"\x82\x85\x01\x02\x03\x04\nab\ncd\n\nGET / HTTP/1.1\nX: y\n\n");
    for step in STEPS {
        assert_eq!(through(&data, step), (data.clone(), None), "step {step}");
    }
    // Another upgrade (h2c) is not a WebSocket: the next head is checked as ever.
    let mut data = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\n\r\n".to_vec();
    data.extend_from_slice(b"GET /x HTTP/1.1\nHost: a\n\n");
    let (_, why) = through(&data, 64);
    assert_eq!(why, Some(Refusal::BareLf));
}
