//! `[route.retry]`: a request that can be sent again (an idempotent
//! method; no body, or one read whole before it went upstream, kept for
//! it; or a gRPC call whose messages, copied as they went, ended within
//! `[proxy] request_buffer`, answered UNAVAILABLE before any message; not
//! an upgrade nor half of a mirrored pair) whose
//! try failed in one of the ways the route names (the connection reset or
//! closed before the answer's head, no head within `try_timeout`, a 502,
//! 503 or 504) is sent again to the next endpoint of its version, within
//! the route's `timeout` (nginx's `proxy_next_upstream`, Envoy's
//! `retry_policy`).
//!
//! A retry never goes to the other version: the split is the judge's
//! experiment. The judge hears a request one of whose tries failed as
//! failed (the version failed it once; see `crate::service::handle`),
//! whatever the client got in the end, so retries hide a bad version's
//! failures from its users, never from the judge.
//!
//! Retries are budgeted as linkerd's are: a route retries at most
//! `budget_percent` of its requests, plus [`RETRY_FLOOR_PER_S`] a second,
//! counted over windows of [`RETRY_BUDGET_WINDOW`]: a version failing
//! everything is not sent twice the traffic. The budget lives as long as
//! the route's settings, across snapshots ([`crate::limit::Kept`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use tokio::time::Instant;
use veer_control::config::{Retry, RETRY_BUDGET_WINDOW, RETRY_FLOOR_PER_S};

use crate::balance::Pick;
use crate::body::RequestBody;
use crate::error::ProxyError;
use crate::headers::Forwarding;
use crate::upload::Grant;

/// A route's retry settings and budget.
#[derive(Debug)]
pub struct RetryTarget {
    /// `[route.retry]`.
    pub settings: Retry,
    /// Its requests and retries in the current window.
    pub budget: Arc<RetryBudget>,
    /// The most bytes of a gRPC call's messages copied to send again
    /// (`[proxy] request_buffer`).
    pub keep_up_to: usize,
}

impl RetryTarget {
    /// Whether a try that ended with `answered` (an answer's status and,
    /// for a gRPC call, its head's grpc-status; or how it failed) is one
    /// the route retries. A gRPC call (a POST) goes again only when its
    /// server said, before any message, that it did not take it
    /// (UNAVAILABLE).
    pub fn wants(
        &self,
        answered: Result<(StatusCode, Option<u8>), ProxyError>,
        grpc: bool,
    ) -> bool {
        if grpc {
            return self.settings.on_unavailable
                && matches!(
                    answered,
                    Ok((StatusCode::OK, Some(crate::grpc::UNAVAILABLE)))
                );
        }
        match answered {
            Ok((status, _)) => self.settings.on_status.contains(&status.as_u16()),
            Err(ProxyError::UpstreamReset | ProxyError::UpstreamProtocol) => self.settings.on_reset,
            Err(ProxyError::UpstreamTimeout) => self.settings.on_timeout,
            Err(_) => false,
        }
    }

    /// When a try started at `now` gives up waiting for its answer's
    /// head: `try_timeout` later, or the route's deadline `due` if sooner.
    pub fn try_due(&self, now: Instant, due: Instant) -> Instant {
        match self.settings.try_timeout {
            Some(t) => (now + t).min(due),
            None => due,
        }
    }
}

/// What a request that may be retried keeps of itself: its head as it
/// went upstream, its body, its forwarding fields, and the endpoint pick
/// of its last try.
pub struct Again {
    head: Request<()>,
    body: Kept,
    /// The body's bytes counted against the bytes held for bodies read
    /// whole ([`crate::upload::HELD_BUDGET`]) while the copy is kept.
    grant: Grant,
    forwarding: Option<Arc<Forwarding>>,
    /// The last try's pick: the next goes to the endpoint after it.
    pub pick: Pick,
    /// The endpoints tried so far (one bit each, by index).
    pub tried: u64,
}

impl Again {
    /// Keeps `req`'s head (a copy of its header fields: made only on a
    /// route with `[route.retry]`) and `body` (shared bytes, counted in
    /// the held bytes' budget by `grant`).
    pub fn keep(
        req: &Request<RequestBody>,
        (body, grant): (Bytes, Grant),
        forwarding: &Option<Arc<Forwarding>>,
        pick: Pick,
    ) -> Box<Again> {
        Again::of(req, Kept::Bytes(body), grant, forwarding, pick)
    }

    /// Keeps a gRPC call's head, and a copy of its messages as they go
    /// upstream, up to `limit` bytes: it can go again once they have all
    /// gone (see [`Again::request`]).
    pub fn keep_call(
        req: &mut Request<RequestBody>,
        limit: usize,
        forwarding: &Option<Arc<Forwarding>>,
        pick: Pick,
    ) -> Box<Again> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        req.body_mut().tee(limit, true, tx);
        Again::of(req, Kept::Teed(rx), Grant::default(), forwarding, pick)
    }

    fn of(
        req: &Request<RequestBody>,
        body: Kept,
        grant: Grant,
        forwarding: &Option<Arc<Forwarding>>,
        pick: Pick,
    ) -> Box<Again> {
        Box::new(Again {
            head: copy_head(req, ()),
            body,
            grant,
            forwarding: forwarding.clone(),
            pick,
            tried: 1u64 << (pick.first() % 64),
        })
    }

    /// The request to send again, and its forwarding fields; `None` when
    /// its body is not at hand: a gRPC call's messages had not all gone
    /// (or were more than the copy keeps), or the held bytes' budget has
    /// no room for them.
    pub fn request(&mut self) -> Option<(Request<RequestBody>, Option<Arc<Forwarding>>)> {
        if let Kept::Teed(rx) = &mut self.body {
            let teed = rx.try_recv().ok().flatten()?;
            self.grant = teed.grant;
            self.body = Kept::Bytes(teed.bytes);
        }
        let Kept::Bytes(body) = &self.body else {
            return None;
        };
        let req = copy_head(&self.head, RequestBody::copy(body.clone()));
        Some((req, self.forwarding.clone()))
    }
}

/// A request with `req`'s method, target, version and header fields (a
/// copy of them), and `body`.
pub fn copy_head<A, B>(req: &Request<A>, body: B) -> Request<B> {
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// A request's body as kept to send again.
enum Kept {
    /// Known when the request went: none, or read whole before.
    Bytes(Bytes),
    /// A gRPC call's messages, copied as they go: the whole, once they
    /// have all gone (`None`: more than the copy keeps, or than the held
    /// bytes' budget had room for).
    Teed(tokio::sync::oneshot::Receiver<Option<crate::upload::Teed>>),
}

/// A route's retry budget: requests and retries counted in windows of
/// [`RETRY_BUDGET_WINDOW`].
#[derive(Debug)]
pub struct RetryBudget {
    percent: u64,
    epoch: Instant,
    /// The window the counts are of (its index since `epoch`).
    window: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl RetryBudget {
    /// A budget of `percent` of the requests (plus the floor).
    pub fn new(percent: u8) -> RetryBudget {
        RetryBudget {
            percent: u64::from(percent),
            epoch: Instant::now(),
            window: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }

    /// The share of the requests it allows, percent.
    pub fn percent(&self) -> u8 {
        self.percent as u8
    }

    /// Starts a new window when `now` is past the current one's.
    fn roll(&self, now: Instant) {
        let w = now.saturating_duration_since(self.epoch).as_secs() / RETRY_BUDGET_WINDOW.as_secs();
        let current = self.window.load(Ordering::Relaxed);
        if w > current
            && self
                .window
                .compare_exchange(current, w, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // (A count made by another worker at this instant may be lost:
            // a budget, not a ledger.)
            self.requests.store(0, Ordering::Relaxed);
            self.retries.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a request of the route (one that may be retried) at `now`.
    pub fn request(&self, now: Instant) {
        self.roll(now);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a retry may go now; if so it is counted.
    pub fn admit(&self, now: Instant) -> bool {
        self.roll(now);
        let floor = RETRY_FLOOR_PER_S * RETRY_BUDGET_WINDOW.as_secs();
        let allowed = floor + self.requests.load(Ordering::Relaxed) * self.percent / 100;
        if self.retries.load(Ordering::Relaxed) >= allowed {
            return false;
        }
        self.retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_budget_allows_its_share_of_the_requests_plus_a_floor_per_window() {
        let b = RetryBudget::new(20);
        let now = Instant::now();
        for _ in 0..1000 {
            b.request(now);
        }
        // 10 s x 10 a second, plus 20 % of 1 000.
        let admitted = (0..1000).filter(|_| b.admit(now)).count();
        assert_eq!(admitted, 300);
        // A new window starts from nothing: the floor only.
        let later = now + RETRY_BUDGET_WINDOW + Duration::from_millis(1);
        let admitted = (0..1000).filter(|_| b.admit(later)).count();
        assert_eq!(admitted, 100);
    }
}
