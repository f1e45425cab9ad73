//! The gRPC exporter's TCP connection, with h2's writes coalesced.
//!
//! h2 sends each DATA frame with its own `writev` and flushes its transport after each
//! one, and a collector's frames are 16 KiB (grpc-go's and h2's default
//! `SETTINGS_MAX_FRAME_SIZE`): a default batch of 512 spans (~190 KB) took ~12 syscalls,
//! each a full trip through the TCP stack and, to a node-local collector, a wakeup of the
//! receiver. OTLP/HTTP needs nothing of the kind: hyper's HTTP/1.1 writes a request's head
//! and body together.
//!
//! [`CoalescingStream`] keeps what h2 writes until a flush that follows no new write, or
//! a read. h2 flushes after every frame it writes and once more when it has nothing left
//! to write, so everything written in one poll of the connection goes out in one `write`
//! at that last flush. A flush that follows new bytes is deferred and wakes the task,
//! whose next poll flushes or reads (h2's connection always reads; so does a TLS
//! handshake waiting for the server's answer): bytes never wait for traffic that may not
//! come.
use std::{
    future::Future,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use hyper_util::{client::legacy::connect::HttpConnector, rt::TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// Bytes kept before they are written regardless of flushes: a default batch with its
/// framing fits.
pub const WRITE_BUFFER_BYTES: usize = 256 << 10;

/// A TCP stream whose writes wait for the writer's last flush (see the module's doc).
pub struct CoalescingStream<S = TcpStream> {
    inner: S,
    buf: Vec<u8>,
    /// Start of what is still to be written in `buf` (a write may take part of it).
    sent: usize,
    /// Bytes were added since the last flush.
    written_since_flush: bool,
}

impl<S> CoalescingStream<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            sent: 0,
            written_since_flush: false,
        }
    }

    fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }
}

impl<S: AsyncWrite + Unpin> CoalescingStream<S> {
    /// Writes everything buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Takes `len` more bytes into the buffer, draining it first if they would not fit.
    /// `Ok(false)`: the bytes are too many to buffer and go straight to the stream.
    fn poll_make_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.pending() + len > WRITE_BUFFER_BYTES {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(len < WRITE_BUFFER_BYTES))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for CoalescingStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        // Whoever reads may be waiting for the answer to what is still buffered. A drain
        // that cannot finish yet does not stop the read: its waker is registered, and a
        // peer that waits for us to read before it reads must not be kept waiting.
        if me.pending() > 0 {
            if let Poll::Ready(Err(e)) = me.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CoalescingStream<S> {
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
        let me = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum();
        if !ready!(me.poll_make_room(cx, len))? {
            return Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            me.buf.extend_from_slice(b);
        }
        me.written_since_flush = true;
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.written_since_flush {
            // More may follow in this poll; if not, the poll this wakes flushes.
            me.written_since_flush = false;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

/// A TCP connector (hyper's, with its DNS resolution, and `TCP_NODELAY`) whose
/// connections are [`CoalescingStream`]s. tonic puts TLS on top for `https://` and applies
/// the endpoint's connect timeout.
#[derive(Clone)]
pub struct CoalescingConnector {
    http: HttpConnector,
}

impl CoalescingConnector {
    pub fn new() -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        // The scheme is tonic's business (it adds TLS); this only opens the TCP connection.
        http.enforce_http(false);
        Self { http }
    }
}

impl tower_service::Service<http::Uri> for CoalescingConnector {
    type Response = TokioIo<CoalescingStream>;
    type Error = <HttpConnector as tower_service::Service<http::Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            Ok(TokioIo::new(CoalescingStream::new(tcp)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        task::{Wake, Waker},
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TCP stream that counts the writes made on it.
    struct Counted {
        tcp: TcpStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let me = self.get_mut();
            me.writes.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut me.tcp).poll_write(cx, data)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
        }
    }

    /// A coalescing client stream (and its write count) connected to a plain server one.
    async fn pair() -> (CoalescingStream<Counted>, Arc<AtomicUsize>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let writes = Arc::new(AtomicUsize::new(0));
        let client = Counted {
            tcp: client.unwrap(),
            writes: writes.clone(),
        };
        (CoalescingStream::new(client), writes, accepted.unwrap().0)
    }

    struct CountingWaker(AtomicUsize);
    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A flush right after writes defers (and wakes the task); the next flush sends it all
    /// in one write.
    #[tokio::test]
    async fn a_flush_after_writes_defers_to_the_next() {
        let (mut client, writes, mut server) = pair().await;
        let woken = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let frame = [7u8; 16 << 10];
        for _ in 0..8 {
            let w = Pin::new(&mut client).poll_write(&mut cx, &frame);
            assert!(matches!(w, Poll::Ready(Ok(n)) if n == frame.len()));
            assert!(Pin::new(&mut client).poll_flush(&mut cx).is_ready());
        }
        assert_eq!(
            writes.load(Ordering::Relaxed),
            0,
            "nothing written before a clean flush"
        );
        assert_eq!(
            woken.0.load(Ordering::Relaxed),
            8,
            "each deferral wakes the task"
        );

        client.flush().await.unwrap();
        assert_eq!(writes.load(Ordering::Relaxed), 1);
        let mut got = vec![0u8; 8 * frame.len()];
        server.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|&b| b == 7));
        // Reads pass through.
        server.write_all(b"pong").await.unwrap();
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
    }

    /// A writer that flushes once and then waits for the answer (a TLS handshake does)
    /// gets it: the read sends what the deferred flush kept.
    #[tokio::test]
    async fn a_read_sends_what_is_buffered() {
        let (mut client, writes, mut server) = pair().await;
        let echo = tokio::spawn(async move {
            let mut hello = [0u8; 5];
            server.read_exact(&mut hello).await.unwrap();
            server.write_all(&hello).await.unwrap();
        });
        client.write_all(b"hello").await.unwrap();
        client.flush().await.unwrap();
        assert_eq!(writes.load(Ordering::Relaxed), 0, "the flush was deferred");
        let mut answer = [0u8; 5];
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.read_exact(&mut answer),
        );
        read.await
            .expect("the buffered bytes were never sent")
            .unwrap();
        assert_eq!(&answer, b"hello");
        echo.await.unwrap();
    }

    /// The buffer never holds more than its bound: writes past it drain it first, and a
    /// write as large as the bound goes straight through.
    #[tokio::test]
    async fn the_buffer_is_bounded() {
        let (mut client, _, mut server) = pair().await;
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            server.read_to_end(&mut all).await.unwrap();
            all
        });
        let mut sent = Vec::new();
        for (i, len) in [100_000, 100_000, 100_000, WRITE_BUFFER_BYTES, 10]
            .into_iter()
            .enumerate()
        {
            let chunk = vec![i as u8; len];
            client.write_all(&chunk).await.unwrap();
            sent.extend_from_slice(&chunk);
            assert!(client.pending() <= WRITE_BUFFER_BYTES);
        }
        client.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), sent, "every byte, in order");
    }

    /// Through h2 itself, as tonic drives it: a 1 MiB request body (64 frames of 16 KiB)
    /// arrives whole, the response comes back, and the frames went out in a few writes.
    #[tokio::test]
    async fn h2_requests_complete_in_few_writes() {
        let (client, writes, server) = pair().await;
        const BODY: usize = 1 << 20;
        let serve = tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .initial_window_size(8 << 20)
                .initial_connection_window_size(8 << 20)
                .handshake::<_, bytes::Bytes>(server)
                .await
                .unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let serving = tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut body = req.into_body();
            let mut received = 0;
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                received += chunk.len();
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            respond
                .send_response(http::Response::new(()), true)
                .unwrap();
            (received, serving)
        });

        let (h2c, conn) = h2::client::handshake(client).await.unwrap();
        let driving = tokio::spawn(conn);
        let mut h2c = h2c.ready().await.unwrap();
        let req = http::Request::post("http://localhost/").body(()).unwrap();
        let (response, mut send) = h2c.send_request(req, false).unwrap();
        send.reserve_capacity(BODY);
        send.send_data(bytes::Bytes::from(vec![42u8; BODY]), true)
            .unwrap();
        assert_eq!(response.await.unwrap().status(), 200);
        let (received, serving) = serve.await.unwrap();
        assert_eq!(received, BODY);
        let n = writes.load(Ordering::Relaxed);
        assert!((4..16).contains(&n), "{n} writes for 64 frames");
        serving.abort();
        driving.abort();
    }
}
