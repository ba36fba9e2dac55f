//! With real TLS (rustls on both ends, over an in-memory pipe): what leaves the server's
//! socket, in how many writes, and that the client reads it all in order.

use super::*;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// The server's socket: records the size of every write it takes.
struct Counting {
    inner: DuplexStream,
    writes: Rc<RefCell<Vec<usize>>>,
}

impl AsyncRead for Counting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counting {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.writes.borrow_mut().push(n);
        }
        r
    }
    /// A socket takes all of a `writev` it has room for, as a TCP socket does.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        self.poll_write(cx, &all)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TLS server stream over a [`Counting`] socket and the client stream at the other end.
async fn pair(
    pipe: usize,
) -> (
    TlsStream<Counting>,
    tokio_rustls::client::TlsStream<DuplexStream>,
    Rc<RefCell<Vec<usize>>>,
) {
    // Generated once per test process (the tests run in parallel).
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("spooky-gather-{}", std::process::id()));
        spooky_peers::certs::generate(&dir).expect("certificates")
    });
    let read = |f: &str| std::fs::read(dir.join(f)).expect("certificate file");
    let certs: Vec<_> = rustls_pemfile::certs(&mut &read("spooky.crt")[..])
        .collect::<Result<_, _>>()
        .expect("certificate");
    let key = rustls_pemfile::private_key(&mut &read("spooky.key")[..])
        .expect("key")
        .expect("a key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls_pemfile::certs(&mut &read("ca.crt")[..]) {
        roots.add(ca.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (a, b) = tokio::io::duplex(pipe);
    let writes = Rc::new(RefCell::new(Vec::new()));
    let socket = Counting {
        inner: a,
        writes: writes.clone(),
    };
    let accept = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(socket);
    let connect = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect("localhost".try_into().unwrap(), b);
    let (server, client) = tokio::join!(accept, connect);
    (server.unwrap(), client.unwrap(), writes)
}

/// One HTTP/2 DATA frame's worth: a 9-byte head, then 16 KiB, written as hyper does (a
/// vectored write, the rest if it took part), then flushed.
async fn frame(io: &mut Gathered<Counting>, i: u8) {
    let head = [i; 9];
    let payload = vec![i; 16_384];
    let bufs = [io::IoSlice::new(&head), io::IoSlice::new(&payload)];
    let n = std::future::poll_fn(|cx| Pin::new(&mut *io).poll_write_vectored(cx, &bufs))
        .await
        .unwrap();
    let whole: Vec<u8> = head.iter().chain(&payload).copied().collect();
    io.write_all(&whole[n..]).await.unwrap();
    io.flush().await.unwrap();
}

#[tokio::test]
async fn a_round_of_frames_leaves_in_one_write_when_the_round_ends() {
    let (server, mut client, writes) = pair(1 << 20).await;
    writes.borrow_mut().clear();
    let (mut io, out) = gather(server);
    let round = async {
        for i in 0..3 {
            frame(&mut io, i).await;
        }
        // The round ends: hyper waits for more.
        std::future::pending::<()>().await;
    };
    let mut driven = std::pin::pin!(Flushing::new(round, out));
    let noop = std::task::Waker::noop();
    assert!(driven
        .as_mut()
        .poll(&mut Context::from_waker(noop))
        .is_pending());
    // Three frames, flushed one by one by hyper, left in one write when the round ended.
    assert_eq!(writes.borrow().len(), 1, "{:?}", writes.borrow());
    // rustls cut each of hyper's writes into a 16 KiB record and a 9-byte one.
    assert!(writes.borrow()[0] > 3 * 16_393);
    let mut got = vec![0u8; 3 * 16_393];
    client.read_exact(&mut got).await.unwrap();
    let want: Vec<u8> = (0..3u8)
        .flat_map(|i| std::iter::repeat_n(i, 9).chain(std::iter::repeat_n(i, 16_384)))
        .collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn frames_are_not_sent_before_the_round_ends() {
    let (server, _client, writes) = pair(1 << 20).await;
    writes.borrow_mut().clear();
    let (mut io, out) = gather(server);
    for i in 0..3 {
        frame(&mut io, i).await;
    }
    assert!(
        writes.borrow().is_empty(),
        "nothing sent before the round ended"
    );
    let noop = std::task::Waker::noop();
    assert!(out.poll(&mut Context::from_waker(noop)).is_ready());
    let sent: usize = writes.borrow().iter().sum();
    // Everything, in one write.
    assert_eq!(writes.borrow().len(), 1);
    assert!(sent > 3 * 16_393, "{sent}");
}

#[tokio::test]
async fn a_full_socket_holds_the_rest_until_it_takes_more_and_nothing_is_lost() {
    // A pipe that holds 20 KB: the client must read for the server to go on.
    let (server, mut client, _writes) = pair(20_000).await;
    let (mut io, out) = gather(server);
    let round = async {
        for i in 0..8 {
            frame(&mut io, i).await;
        }
        io.shutdown().await.unwrap();
    };
    let reader = async {
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(Flushing::new(round, out), reader);
    let want: Vec<u8> = (0..8u8)
        .flat_map(|i| std::iter::repeat_n(i, 9).chain(std::iter::repeat_n(i, 16_384)))
        .collect();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "everything, in order, then close_notify");
}

#[tokio::test]
async fn shutdown_sends_what_is_queued_first() {
    let (server, mut client, _writes) = pair(1 << 20).await;
    let (mut io, _out) = gather(server);
    io.write_all(b"goaway").await.unwrap();
    io.flush().await.unwrap();
    io.shutdown().await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"goaway");
}
