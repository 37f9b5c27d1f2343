//! What a client connection is doing, so that one that does nothing useful
//! can be closed: no complete request head within `header_timeout` of
//! accepting it (whatever it sent: nothing, part of a TLS handshake, part
//! of an HTTP/2 preface, half a head), or nothing in flight for
//! `idle_timeout` (an idle HTTP/1.1 keep-alive connection, or an HTTP/2
//! connection with no open stream).
//!
//! The service marks each request's start ([`Activity::begin`]) and the
//! response body's end (the [`InFlight`] guard, dropped by hyper when it has
//! written the body or given up on it); the connection's task asks
//! [`Activity::deadline`] when to look again. Atomics only.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::body::{BoxError, ProxyBody};

/// A client connection's place: its `max_connections` permit, its count in
/// its address's `max_connections_per_ip`, and its `veer_open_connections`
/// count. Shared by the connection and any tunnel upgraded from it, so an
/// upgraded WebSocket keeps holding the slot until the tunnel ends.
pub struct Slot {
    _parts: Box<dyn Send + Sync>,
    gauge: prometheus::IntGauge,
}

impl Slot {
    /// Takes the place (the gauge counts it until the last holder drops).
    pub fn new(parts: Box<dyn Send + Sync>, gauge: prometheus::IntGauge) -> Arc<Slot> {
        gauge.inc();
        Arc::new(Slot {
            _parts: parts,
            gauge,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// An upgraded stream that notes when bytes last moved, for the tunnel's
/// idle timeout.
pub struct Watched<T> {
    inner: T,
    last: Arc<AtomicU64>,
    base: Instant,
}

impl<T> Watched<T> {
    /// Wraps `inner`; moves are noted in `last` (ms after `base`).
    pub fn new(inner: T, last: Arc<AtomicU64>, base: Instant) -> Watched<T> {
        Watched { inner, last, base }
    }

    fn moved(&self) {
        self.last
            .fetch_max(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.moved();
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The request activity of one client connection.
#[derive(Debug)]
pub struct Activity {
    accepted: Instant,
    inflight: AtomicUsize,
    requests: AtomicU64,
    /// Milliseconds after `accepted` when the last request in flight ended.
    idle_since_ms: AtomicU64,
}

impl Activity {
    /// A connection accepted at `accepted`.
    pub fn new(accepted: Instant) -> Arc<Activity> {
        Arc::new(Activity {
            accepted,
            inflight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    /// A request head was read completely: it is in flight until the guard
    /// drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.inflight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// When the connection is due to be closed if nothing changes: `None`
    /// while a request is in flight. Before its first request, the
    /// connection has `header_timeout` from being accepted; after, it may
    /// sit idle for `idle_timeout`.
    pub fn deadline(&self, header_timeout: Duration, idle_timeout: Duration) -> Option<Instant> {
        if self.inflight.load(Ordering::Acquire) > 0 {
            return None;
        }
        if self.requests.load(Ordering::Relaxed) == 0 {
            return Some(self.accepted + header_timeout);
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
        Some(self.accepted + since + idle_timeout)
    }

    /// Requests this connection has begun.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// A request in flight on its connection; dropping it ends it.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = a.accepted.elapsed().as_millis() as u64;
        a.idle_since_ms.fetch_max(ms, Ordering::Relaxed);
        a.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// A request's handling, whose response body is [`Tracked`] (a future
    /// of its own rather than an `async` block around the handling: the
    /// block would hold the handling's future twice).
    pub struct Tracking<F> {
        #[pin]
        handling: F,
        inflight: Option<InFlight>,
    }
}

impl<F> Tracking<F> {
    /// Tracks `handling` (a request's future), in flight as `inflight`.
    pub fn new(handling: F, inflight: InFlight) -> Tracking<F> {
        Tracking {
            handling,
            inflight: Some(inflight),
        }
    }
}

impl<F, E> std::future::Future for Tracking<F>
where
    F: std::future::Future<Output = Result<http::Response<ProxyBody>, E>>,
{
    type Output = Result<http::Response<Tracked>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.handling.poll(cx))?;
        let Some(inflight) = this.inflight.take() else {
            // Polled again after it was ready: a caller's bug; kept total.
            return Poll::Pending;
        };
        Poll::Ready(Ok(resp.map(|b| Tracked::new(b, inflight))))
    }
}

/// A response body that keeps its request in flight until it is dropped.
pub struct Tracked {
    body: ProxyBody,
    _inflight: InFlight,
}

impl Tracked {
    /// Wraps `body`.
    pub fn new(body: ProxyBody, inflight: InFlight) -> Tracked {
        Tracked {
            body,
            _inflight: inflight,
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_gets_header_timeout_then_idle_timeout_between_requests() {
        let (ht, it) = (Duration::from_secs(10), Duration::from_secs(30));
        let a = Activity::new(Instant::now());
        assert_eq!(a.deadline(ht, it), Some(a.accepted + ht));
        tokio::time::advance(Duration::from_secs(2)).await;
        let r = a.begin();
        assert_eq!(a.deadline(ht, it), None, "busy: never closed");
        tokio::time::advance(Duration::from_secs(100)).await;
        let second = a.begin();
        drop(r);
        assert_eq!(a.deadline(ht, it), None, "one still in flight");
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(second);
        let idle_since = Instant::now();
        assert_eq!(a.deadline(ht, it), Some(idle_since + it));
        assert_eq!(a.requests(), 2);
    }
}
