//! The client's side of a request body: whose time it is, and whose fault a
//! failed upload is.
//!
//! A version is judged on what it does once it has the request, never on
//! how the client sends it. Two rules follow:
//!
//! - **The route `timeout` counts the upstream's time only.** While veer is
//!   waiting for the client's next body frame, the clock is the client's
//!   (bounded by `body_timeout`); the route's deadline moves out by that
//!   long. So a slow upload to a fast upstream succeeds, and a stalled one
//!   ends as the client's 408, not the version's 504.
//! - **A body the client breaks is the client's failure**: stalled (408),
//!   aborted (the client left), or malformed (400). The request then counts
//!   in `veer_proxy_errors_total` under its client kind and is never
//!   recorded for a version.
//!
//! [`ClientBody`] wraps the incoming body and writes what it sees into an
//! [`Upload`] that the request path reads: lock-free atomics, written by the
//! connection task that polls the body.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::{BodyTimeout, BoxError, IdleTimeout};
use crate::error::ProxyError;

const NO_FAULT: u8 = 0;
const NOT_WAITING: u64 = u64::MAX;

/// What a request's body has done so far, shared by the body (which writes)
/// and the request path (which reads).
#[derive(Debug)]
pub struct Upload {
    base: Instant,
    /// Microseconds after `base` since which the body waits for the client,
    /// or [`NOT_WAITING`].
    waiting_since_us: AtomicU64,
    /// Microseconds spent waiting for the client in waits that ended.
    waited_us: AtomicU64,
    fault: AtomicU8,
}

impl Upload {
    /// A fresh record, its clock starting now.
    pub fn new() -> Arc<Upload> {
        Arc::new(Upload {
            base: Instant::now(),
            waiting_since_us: AtomicU64::new(NOT_WAITING),
            waited_us: AtomicU64::new(0),
            fault: AtomicU8::new(NO_FAULT),
        })
    }

    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_micros() as u64
    }

    /// Time spent waiting for the client's body up to `now`, the wait under
    /// way included.
    pub fn client_time(&self, now: Instant) -> Duration {
        let mut us = self.waited_us.load(Ordering::Relaxed);
        let since = self.waiting_since_us.load(Ordering::Relaxed);
        if since != NOT_WAITING {
            us += self.micros(now).saturating_sub(since);
        }
        Duration::from_micros(us)
    }

    /// The client's fault, if its body failed.
    pub fn fault(&self) -> Option<ProxyError> {
        match self.fault.load(Ordering::Relaxed) {
            1 => Some(ProxyError::ClientTimeout),
            2 => Some(ProxyError::ClientAborted),
            3 => Some(ProxyError::ClientBadBody),
            _ => None,
        }
    }

    fn set_fault(&self, e: ProxyError) {
        let code = match e {
            ProxyError::ClientTimeout => 1,
            ProxyError::ClientAborted => 2,
            _ => 3,
        };
        let _ = self
            .fault
            .compare_exchange(NO_FAULT, code, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn start_wait(&self) {
        if self.waiting_since_us.load(Ordering::Relaxed) == NOT_WAITING {
            self.waiting_since_us
                .store(self.micros(Instant::now()), Ordering::Relaxed);
        }
    }

    fn end_wait(&self) {
        let since = self.waiting_since_us.swap(NOT_WAITING, Ordering::Relaxed);
        if since != NOT_WAITING {
            let waited = self.micros(Instant::now()).saturating_sub(since);
            self.waited_us.fetch_add(waited, Ordering::Relaxed);
        }
    }
}

/// Whose failure a request-body error is: always the client's; which kind.
fn client_fault(e: &BoxError) -> ProxyError {
    if e.is::<BodyTimeout>() {
        return ProxyError::ClientTimeout;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return match io.kind() {
                InvalidData | InvalidInput => ProxyError::ClientBadBody,
                _ => ProxyError::ClientAborted,
            };
        }
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_parse() {
                return ProxyError::ClientBadBody;
            }
        }
        source = err.source();
    }
    ProxyError::ClientAborted
}

/// A request body on its way to the upstream: fails if the client sends
/// nothing for `body_timeout`, and tells its [`Upload`] when it waits for
/// the client and how it failed.
pub struct ClientBody {
    inner: IdleTimeout<Incoming>,
    upload: Arc<Upload>,
}

impl ClientBody {
    /// Wraps `body`.
    pub fn new(body: Incoming, idle: Duration, upload: Arc<Upload>) -> ClientBody {
        ClientBody {
            inner: IdleTimeout::new(body, idle),
            upload,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Pending => this.upload.start_wait(),
            Poll::Ready(Some(Err(e))) => {
                this.upload.end_wait();
                this.upload.set_fault(client_fault(e));
            }
            Poll::Ready(_) => this.upload.end_wait(),
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn only_the_time_spent_waiting_for_the_client_is_the_clients() {
        let u = Upload::new();
        tokio::time::advance(Duration::from_secs(1)).await;
        u.start_wait();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(u.client_time(Instant::now()), Duration::from_secs(3));
        u.start_wait(); // a second Pending does not restart the wait
        tokio::time::advance(Duration::from_secs(2)).await;
        u.end_wait();
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(u.client_time(Instant::now()), Duration::from_secs(5));
    }

    #[test]
    fn the_first_fault_is_kept_and_each_kind_is_a_client_status() {
        let u = Upload::new();
        assert_eq!(u.fault(), None);
        u.set_fault(ProxyError::ClientBadBody);
        u.set_fault(ProxyError::ClientAborted);
        assert_eq!(u.fault(), Some(ProxyError::ClientBadBody));
        let stalled: BoxError = Box::new(BodyTimeout(Duration::from_secs(1)));
        assert_eq!(client_fault(&stalled), ProxyError::ClientTimeout);
        let eof: BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        assert_eq!(client_fault(&eof), ProxyError::ClientAborted);
        let bad: BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::InvalidData));
        assert_eq!(client_fault(&bad), ProxyError::ClientBadBody);
        for e in [
            ProxyError::ClientTimeout,
            ProxyError::ClientAborted,
            ProxyError::ClientBadBody,
        ] {
            assert!(e.upstream_index().is_none());
            assert!(e.status().is_client_error(), "{e:?}");
        }
    }
}
