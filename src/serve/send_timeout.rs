//! A send timeout for one connection (nginx's `send_timeout`): a client that
//! stops reading its answers is disconnected.
//!
//! Rules:
//! - A write (or flush, or shutdown) that the socket cannot take, because the
//!   client's receive window is full, arms a timer; any byte the socket takes
//!   disarms it. When the timer ends while the write still waits, the write
//!   fails with `TimedOut` and the connection is dropped, its slot freed.
//! - Only a write with no progress at all counts: a slow reader that takes
//!   some bytes within every period is served. The period is the server's
//!   `--request-timeout`.
//! - Wraps the TCP stream, under TLS: the handshake's writes and the
//!   encrypted answers are bounded alike. Reads are never timed here (hyper's
//!   header timeout and the request timeout bound them).
//! - [`SendTimeout::blocked`] tells whether the last write waits for the
//!   client: bytes of an answer are then held in hyper's (or TLS's) buffer,
//!   and dropping the connection would lose them (the server does not evict
//!   such a connection; review 29).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `S` with a send timeout (see the module rules).
pub struct SendTimeout<S> {
    inner: S,
    period: Duration,
    /// Armed at a write that could not proceed; `None` after any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the last write (or flush) waits for the client.
    blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<S> SendTimeout<S> {
    pub fn new(inner: S, period: Duration) -> SendTimeout<S> {
        SendTimeout { inner, period, stalled: None, blocked: Default::default() }
    }

    /// Set while the last write waits for the client (shared with the server's list of connections).
    pub fn blocked(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.blocked.clone()
    }

    /// The inner write returned `r`: disarm on progress; on `Pending`, arm
    /// the timer (or poll it, registering the waker) and fail once it ends.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        self.blocked.store(r.is_pending(), std::sync::atomic::Ordering::SeqCst);
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let period = self.period;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(period)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, format!("the client read nothing for {} s", period.as_secs_f64())))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, r)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::SendTimeout;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer that reads nothing: the write fails after the period; a peer
    /// that reads a little each period keeps the writer going.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_write_without_progress_fails_after_the_period_and_progress_resets_it() {
        let (a, _peer_reads_nothing) = tokio::io::duplex(64);
        let mut w = SendTimeout::new(a, Duration::from_secs(5));
        let t0 = tokio::time::Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(60), w.write_all(&[0u8; 1000])).await.expect("the stalled write never ended").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(t0.elapsed() >= Duration::from_secs(5) && t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());

        let (a, mut c) = tokio::io::duplex(64);
        let mut w = SendTimeout::new(a, Duration::from_secs(5));
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 16];
            while got < 1000 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                got += c.read(&mut buf).await.unwrap();
            }
            got
        });
        w.write_all(&[0u8; 1000]).await.expect("a slow reader that makes progress is served");
        drop(w);
        assert_eq!(reader.await.unwrap(), 1000);
    }
}
