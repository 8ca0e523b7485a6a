//! Closes a caller's connection once it has taken none of its answer for the idle timeout: a
//! caller that stops reading would otherwise hold the upstream connection feeding it, and that
//! connection's place among the upstream requests in flight, for as long as it stays open.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::lazy_deadline::{LazyDeadline, StallWatch};

/// A caller's stream whose writes fail with `TimedOut` once one has waited `limit` for the
/// caller to take bytes. Writes that go straight through cost no clock reading and no timer.
pub struct StallLimited<S> {
    inner: S,
    limit: Duration,
    /// Made at the first stall, and moved for each one after it.
    deadline: Option<LazyDeadline>,
    stall: StallWatch,
}

impl<S> StallLimited<S> {
    pub fn new(inner: S, limit: Duration) -> StallLimited<S> {
        StallLimited {
            inner,
            limit,
            deadline: None,
            stall: StallWatch::default(),
        }
    }

    /// Passes a write's outcome on; a write that waits starts the deadline (unless the one
    /// before it waited too), and one that waits past it fails.
    fn limit<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stall.progressed();
            return polled;
        }
        ready!(self.stall.poll_stalled(&mut self.deadline, self.limit, cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the caller took none of its answer for {:?}", self.limit),
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallLimited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallLimited<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.limit(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.limit(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.limit(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.limit(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;

    const LIMIT: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_takes_nothing_fails_the_write_after_the_limit() {
        let (ours, _caller) = tokio::io::duplex(16);
        let mut stream = StallLimited::new(ours, LIMIT);
        let started = Instant::now();
        let error = tokio::time::timeout(LIMIT * 2, stream.write_all(&[7; 64]))
            .await
            .expect("cut off")
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_caller_that_keeps_taking_bytes_is_never_cut_off() {
        let (ours, mut caller) = tokio::io::duplex(16);
        let reading = tokio::spawn(async move {
            let mut taken = Vec::new();
            let mut buf = [0; 16];
            loop {
                // Each wait is well under the limit, and all of them together well over it.
                tokio::time::sleep(LIMIT * 6 / 10).await;
                match caller.read(&mut buf).await.unwrap() {
                    0 => return taken,
                    n => taken.extend_from_slice(&buf[..n]),
                }
            }
        });
        let mut stream = StallLimited::new(ours, LIMIT);
        let sent: Vec<u8> = (0..80).collect();
        let started = Instant::now();
        tokio::time::timeout(LIMIT * 10, stream.write_all(&sent))
            .await
            .expect("all written")
            .unwrap();
        stream.shutdown().await.unwrap();
        drop(stream);
        assert!(started.elapsed() > LIMIT * 2, "{:?}", started.elapsed());
        assert_eq!(reading.await.unwrap(), sent);
    }

    #[tokio::test(start_paused = true)]
    async fn reads_pass_through_untouched() {
        let (ours, mut caller) = tokio::io::duplex(64);
        let mut stream = StallLimited::new(ours, LIMIT);
        caller.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0; 18];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET / HTTP/1.1\r\n\r\n");
    }
}
