//! One upstream endpoint: its idle connection pool and passive health.
//!
//! An [`Upstream`] outlives routing snapshots: the [`Upstreams`] registry
//! hands the same one to every snapshot that names its address, so a reload
//! that keeps an endpoint keeps its warm connections (no reconnect storm).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

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

/// A connection to an upstream, ready for one request at a time.
pub type Sender = http1::SendRequest<RequestBody>;

struct Idle {
    sender: Sender,
    since: Instant,
}

/// One upstream endpoint.
pub struct Upstream {
    addr: SocketAddr,
    idle: ArrayQueue<Idle>,
    /// Milliseconds since `epoch` before which the endpoint is skipped.
    down_until_ms: AtomicU64,
    failures: AtomicU32,
    epoch: Instant,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Upstream {
    fn new(addr: SocketAddr, epoch: Instant) -> Upstream {
        Upstream {
            addr,
            idle: ArrayQueue::new(MAX_IDLE),
            down_until_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            epoch,
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
        // Idle connections to a failing endpoint are likely dead too.
        while self.idle.pop().is_some() {}
    }

    /// Records a success: the endpoint is healthy again.
    pub fn mark_ok(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.down_until_ms.store(0, Ordering::Relaxed);
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
    }

    /// Opens a new connection within `timeout`.
    pub async fn connect(&self, timeout: Duration) -> Result<Sender, ProxyError> {
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
        Ok(sender)
    }
}

/// Every live [`Upstream`], by address, so that snapshots share them.
pub struct Upstreams {
    by_addr: Mutex<HashMap<SocketAddr, Weak<Upstream>>>,
    epoch: Instant,
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
        }
    }

    /// The upstream for an address: the live one if any snapshot still holds
    /// it, else a new one. Called when a snapshot is built, never per request.
    pub fn get(&self, addr: SocketAddr) -> Arc<Upstream> {
        let epoch = self.epoch;
        let mut map = match self.by_addr.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(u) = map.get(&addr).and_then(Weak::upgrade) {
            return u;
        }
        let u = Arc::new(Upstream::new(addr, epoch));
        map.insert(addr, Arc::downgrade(&u));
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_shares_live_upstreams_and_forgets_dropped_ones() {
        let reg = Upstreams::new();
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let a = reg.get(addr);
        let b = reg.get(addr);
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        let c = reg.get(addr);
        assert_eq!(Arc::strong_count(&c), 1);
    }

    #[test]
    fn failures_back_off_and_success_restores() {
        let u = Upstream::new("127.0.0.1:1".parse().expect("addr"), Instant::now());
        assert!(u.is_healthy());
        u.mark_failed();
        assert!(!u.is_healthy());
        u.mark_ok();
        assert!(u.is_healthy());
    }
}
