//! One upstream endpoint: its idle connection pool and passive health.
//!
//! An [`Upstream`] outlives routing snapshots: the [`Upstreams`] registry
//! hands the same one to every snapshot that names its address, so a reload
//! that keeps an endpoint keeps its warm connections (no reconnect storm).
//!
//! Connections to one endpoint are capped (`[[route]]
//! max_upstream_connections`, the largest of the routes that name it): each
//! open connection, idle or busy, holds a permit. A request that finds no
//! idle connection and no permit waits in a bounded queue (as many waiters
//! as the cap) for a connection to come back idle or close, at most the
//! route's `connect_timeout`, then gets 503 `kind="overloaded"`: never an
//! unbounded fan-out of connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crossbeam_queue::ArrayQueue;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::body::RequestBody;
use crate::error::ProxyError;

/// Idle connections kept per endpoint.
const MAX_IDLE: usize = 256;
/// An idle pooled connection older than this is closed rather than reused.
const IDLE_TTL: Duration = Duration::from_secs(50);
/// First back-off after an endpoint fails; doubles per consecutive failure.
const BACKOFF_BASE_MS: u64 = 1_000;
/// Longest back-off.
const BACKOFF_MAX_MS: u64 = 30_000;

/// A connection to an upstream, ready for one request at a time, holding
/// its endpoint's connection permit while it is open.
pub struct Sender {
    inner: http1::SendRequest<RequestBody>,
    _permit: OwnedSemaphorePermit,
}

impl Sender {
    /// Whether it can take a request now.
    pub fn is_ready(&self) -> bool {
        self.inner.is_ready()
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Sends a request; a connection that closed first gives it back.
    pub async fn try_send_request(
        &mut self,
        req: http::Request<RequestBody>,
    ) -> Result<
        http::Response<hyper::body::Incoming>,
        hyper::client::conn::TrySendError<http::Request<RequestBody>>,
    > {
        self.inner.try_send_request(req).await
    }

    /// Sends a request.
    pub async fn send_request(
        &mut self,
        req: http::Request<RequestBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
        self.inner.send_request(req).await
    }
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// One upstream endpoint.
pub struct Upstream {
    addr: SocketAddr,
    idle: ArrayQueue<Idle>,
    /// One permit per connection that may be open.
    permits: Arc<Semaphore>,
    /// The cap the permits were sized for.
    cap: AtomicUsize,
    /// Requests waiting for a connection.
    waiting: AtomicUsize,
    /// Signalled when a connection comes back idle.
    returned: Notify,
    /// Milliseconds since `epoch` before which the endpoint is skipped.
    down_until_ms: AtomicU64,
    failures: AtomicU32,
    epoch: Instant,
    /// Counts health changes of every upstream of the registry.
    changes: Arc<AtomicU64>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Upstream {
    fn new(addr: SocketAddr, epoch: Instant, cap: usize, changes: Arc<AtomicU64>) -> Upstream {
        Upstream {
            addr,
            idle: ArrayQueue::new(MAX_IDLE),
            permits: Arc::new(Semaphore::new(cap)),
            cap: AtomicUsize::new(cap),
            waiting: AtomicUsize::new(0),
            returned: Notify::new(),
            down_until_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            epoch,
            changes,
        }
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether the endpoint is currently usable (not in back-off).
    pub fn is_healthy(&self) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        until == 0 || self.now_ms() >= until
    }

    /// Records a failed connect or a reset: the endpoint is skipped for a
    /// back-off that doubles with each consecutive failure.
    pub fn mark_failed(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = (BACKOFF_BASE_MS << n).min(BACKOFF_MAX_MS);
        self.down_until_ms
            .store(self.now_ms() + backoff, Ordering::Relaxed);
        self.changes.fetch_add(1, Ordering::Relaxed);
        // Idle connections to a failing endpoint are likely dead too.
        while self.idle.pop().is_some() {}
    }

    /// Records a success: the endpoint is healthy again.
    pub fn mark_ok(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.down_until_ms.store(0, Ordering::Relaxed);
            self.changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes an idle connection that is still open, if there is one.
    pub fn checkout(&self) -> Option<Sender> {
        while let Some(idle) = self.idle.pop() {
            if idle.sender.is_ready() && idle.since.elapsed() < IDLE_TTL {
                return Some(idle.sender);
            }
        }
        None
    }

    /// Returns a connection whose last response was read to the end.
    pub fn checkin(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let _ = self.idle.push(Idle {
            sender,
            since: Instant::now(),
        });
        self.returned.notify_one();
    }

    /// Resizes the connection cap (a reload changed it). Permits in use are
    /// not taken back: shrinking takes effect as connections close.
    fn set_cap(&self, cap: usize) {
        let old = self.cap.swap(cap, Ordering::Relaxed);
        if cap > old {
            self.permits.add_permits(cap - old);
        } else if cap < old {
            let _ = self.permits.forget_permits(old - cap);
        }
    }

    /// A connection for one request: an idle one (unless `fresh`, for an
    /// upgrade), else a new one under the cap, waiting at most `timeout`
    /// in the bounded queue for either. Overloaded past that.
    pub async fn get(&self, timeout: Duration, fresh: bool) -> Result<Sender, ProxyError> {
        if !fresh {
            if let Some(s) = self.checkout() {
                return Ok(s);
            }
        }
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            return self.open(p, timeout).await;
        }
        let cap = self.cap.load(Ordering::Relaxed);
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= cap {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(ProxyError::Overloaded);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let got = loop {
            tokio::select! {
                p = self.permits.clone().acquire_owned() => break p.map_err(|_| ProxyError::Overloaded).map(Ok),
                () = self.returned.notified(), if !fresh => {
                    if let Some(s) = self.checkout() {
                        break Ok(Err(s));
                    }
                }
                () = tokio::time::sleep_until(deadline) => break Err(ProxyError::Overloaded),
            }
        };
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        match got? {
            Ok(permit) => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                self.open(permit, left.max(Duration::from_millis(1))).await
            }
            Err(idle) => Ok(idle),
        }
    }

    /// Opens a new connection within `timeout`, under the cap (waiting in
    /// the queue if it is reached).
    pub async fn connect(&self, timeout: Duration) -> Result<Sender, ProxyError> {
        self.get(timeout, true).await
    }

    /// Opens a new connection holding `permit`.
    async fn open(
        &self,
        permit: OwnedSemaphorePermit,
        timeout: Duration,
    ) -> Result<Sender, ProxyError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(self.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(upstream = %self.addr, error = %e, "connect failed");
                return Err(ProxyError::UpstreamConnect);
            }
            Err(_) => {
                tracing::debug!(upstream = %self.addr, "connect timed out");
                return Err(ProxyError::UpstreamConnect);
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|_| ProxyError::UpstreamConnect)?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(upstream = %addr, error = %e, "upstream connection ended");
            }
        });
        Ok(Sender {
            inner: sender,
            _permit: permit,
        })
    }
}

/// Every live [`Upstream`], by address, so that snapshots share them.
pub struct Upstreams {
    by_addr: Mutex<HashMap<SocketAddr, Weak<Upstream>>>,
    epoch: Instant,
    changes: Arc<AtomicU64>,
}

impl Default for Upstreams {
    fn default() -> Upstreams {
        Upstreams::new()
    }
}

impl Upstreams {
    /// An empty registry.
    pub fn new() -> Upstreams {
        Upstreams {
            by_addr: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            changes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A count that moves whenever an upstream fails or recovers (a
    /// back-off that merely runs out does not move it).
    pub fn health_changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// The upstream for an address: the live one if any snapshot still holds
    /// it, else a new one; its connection cap becomes `cap`. Called when a
    /// snapshot is built, never per request.
    pub fn get(&self, addr: SocketAddr, cap: usize) -> Arc<Upstream> {
        let epoch = self.epoch;
        let mut map = match self.by_addr.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(u) = map.get(&addr).and_then(Weak::upgrade) {
            u.set_cap(cap);
            return u;
        }
        let u = Arc::new(Upstream::new(addr, epoch, cap, self.changes.clone()));
        map.insert(addr, Arc::downgrade(&u));
        u
    }

    /// Whether the live upstream at `addr` is healthy (not failing
    /// connects); None when no snapshot holds one.
    pub fn healthy(&self, addr: SocketAddr) -> Option<bool> {
        let map = match self.by_addr.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.get(&addr)
            .and_then(Weak::upgrade)
            .map(|u| u.is_healthy())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_shares_live_upstreams_and_forgets_dropped_ones() {
        let reg = Upstreams::new();
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let a = reg.get(addr, 8);
        let b = reg.get(addr, 8);
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        let c = reg.get(addr, 8);
        assert_eq!(Arc::strong_count(&c), 1);
    }

    #[test]
    fn failures_back_off_and_success_restores() {
        let u = Upstream::new(
            "127.0.0.1:1".parse().expect("addr"),
            Instant::now(),
            8,
            Arc::default(),
        );
        assert!(u.is_healthy());
        u.mark_failed();
        assert!(!u.is_healthy());
        u.mark_ok();
        assert!(u.is_healthy());
    }
}
