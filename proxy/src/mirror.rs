//! Mirroring (shadow traffic): a share of stable's requests, chosen by
//! sticky key, is copied to the canary, and each pair of answers is judged.
//!
//! The copy never waits on the client's exchange nor makes it wait: it is
//! sent from its own task once the request body is whole (kept, up to
//! `max_body`, as stable's upstream reads it), or, bodiless and with an
//! idle connection to take it, written from the client's task just before
//! or just after stable's request (see [`start`]). It carries
//! `x-veer-shadow: 1`, goes the way stable's request went (veer's own
//! HTTP/1.1 exchange for a bodiless GET or HEAD, else hyper's client), and
//! its answer is read to the end and dropped. It
//! is never retried on another endpoint, and at most `max_concurrent`
//! copies of a route are in flight, from the choice until their pair is
//! complete (a request that finds them all busy is not copied), so a slow
//! canary (or a long answer from stable) costs the proxy a bounded number
//! of tasks, buffers and connections, and the client nothing.
//!
//! Both answers of a pair are timed from the client's request's start to
//! their heads; on veer's own HTTP/1.1 exchange, to when the kernel
//! received the head ([`crate::raw::Arrival`]), so that the one read
//! second does not pay for the first one's reading.
//!
//! Once the copy has its answer and stable's answer to the original has
//! been recorded (at the end of its body), the pair is counted for the
//! judge's paired tests ([`veer_control::judge::PairTick`]): which of the
//! two failed, and, per latency test, which was slower than the test's
//! threshold (stable's against stable's, the copy against the canary's).
//! A request whose own exchange is not the version's doing (the client's
//! fault) makes no pair. Copies are not recorded as the canary's routed
//! requests: their share is not the canary's weight.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request};
use http_body_util::BodyExt;
use prometheus::IntCounter;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use veer_control::config::Mirror;
use veer_control::judge::PairTick;
use veer_control::limits::PairBatch;

use crate::body::{UpBody, UpstreamBody};
use crate::error::ProxyError;
use crate::record::{Outcome, Recorder, MAX_THRESHOLDS};
use crate::snapshot::RouteTarget;
use crate::split::{bucket_of_hash, random_bucket};
use crate::upload::ClientBody;

/// The header that marks a mirrored copy.
pub const SHADOW_HEADER: &str = "x-veer-shadow";

/// `veer_mirror_requests_total{result}` labels: the copy's answer (`ok`,
/// `error`), or why a chosen request made no pair (`too_large`: body over
/// `max_body`; `busy`: `max_concurrent` copies in flight; `unpaired`:
/// stable's exchange was not the version's doing, or its body never ended).
pub const RESULTS: [&str; 5] = ["ok", "error", "too_large", "busy", "unpaired"];

/// How long a copy's pair waits for stable's answer to end after the
/// copy's own did (a longer stream makes no pair).
const PAIR_WAIT: Duration = Duration::from_secs(60);

/// Stable's side of a pair: latency to the response head (µs) and outcome.
pub type StableAnswer = (u64, Outcome);

/// Stable's side of a pair as the copy's task gets it.
#[derive(Debug)]
pub struct StableSide {
    answer: StableAnswer,
    /// When stable's request was sent, in µs from the client's start (none
    /// off the raw way).
    sent_us: Option<u64>,
}

/// Where stable's answer to a mirrored request goes once it is recorded:
/// to its copy's task, to make their pair.
#[derive(Debug)]
pub struct PairSender {
    tx: oneshot::Sender<StableSide>,
    at: u64,
    sent_us: Option<u64>,
}

impl PairSender {
    /// Stable's answer came `at` µs after the client's start; its request
    /// was sent at `sent_us`.
    pub fn new(tx: oneshot::Sender<StableSide>, at: u64, sent_us: Option<u64>) -> PairSender {
        PairSender { tx, at, sent_us }
    }

    /// The answer's outcome, as recorded: the pair can be made.
    pub fn send(self, outcome: Outcome) {
        // A copy's task gone (it gave up, or its runtime is shutting down)
        // makes no pair.
        let _ = self.tx.send(StableSide {
            answer: (self.at, outcome),
            sent_us: self.sent_us,
        });
    }
}

/// The mirrored pairs of one canary identity, counted for the judge, and
/// the cap on copies in flight. Kept by the controller's runtime of the
/// route (across snapshots), written by the copies' tasks.
#[derive(Debug)]
pub struct Pairs {
    pairs: AtomicU64,
    /// Pairs with only the canary's copy, only stable's, both failed.
    errors: [AtomicU64; 3],
    /// The same per slow-threshold slot.
    slow: [[AtomicU64; 3]; MAX_THRESHOLDS],
    in_flight: Arc<Semaphore>,
    limit: AtomicUsize,
    /// A canary-only pair since the last drain.
    pending: std::sync::atomic::AtomicBool,
}

impl Pairs {
    /// Empty counts, `max_concurrent` copies at once.
    pub fn new(max_concurrent: usize) -> Pairs {
        Pairs {
            pairs: AtomicU64::new(0),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            slow: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            in_flight: Arc::new(Semaphore::new(max_concurrent)),
            limit: AtomicUsize::new(max_concurrent),
            pending: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Changes the cap on copies in flight (a reloaded `max_concurrent`).
    /// Copies already in flight finish; a lower cap is reached as they do.
    pub fn set_limit(&self, max_concurrent: usize) {
        let before = self.limit.swap(max_concurrent, Ordering::Relaxed);
        if max_concurrent > before {
            self.in_flight.add_permits(max_concurrent - before);
        } else if before > max_concurrent {
            let mut left = before - max_concurrent;
            left -= self.in_flight.forget_permits(left);
            // Permits in flight now are forgotten as they come back.
            if left > 0 {
                let sem = self.in_flight.clone();
                tokio::spawn(async move {
                    if let Ok(p) = sem.acquire_many_owned(left as u32).await {
                        p.forget();
                    }
                });
            }
        }
    }

    fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.in_flight.clone().try_acquire_owned().ok()
    }

    /// Counts one pair. `slots` thresholds are read from the recorders
    /// (the ones in force when the pair ends; a slot off on either side
    /// counts nothing).
    fn record(
        &self,
        stable: StableAnswer,
        shadow: StableAnswer,
        stable_rec: &Recorder,
        canary_rec: &Recorder,
    ) {
        let bad = |o: Outcome| o != Outcome::Ok;
        let which = |c: bool, s: bool| match (c, s) {
            (true, false) => Some(0),
            (false, true) => Some(1),
            (true, true) => Some(2),
            (false, false) => None,
        };
        let mut canary_only = false;
        if let Some(i) = which(bad(shadow.1), bad(stable.1)) {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
            canary_only |= i == 0;
        }
        for (slot, counts) in self.slow.iter().enumerate() {
            let (Some(ts), Some(tc)) =
                (stable_rec.threshold_us(slot), canary_rec.threshold_us(slot))
            else {
                continue;
            };
            let slow = |(us, o): StableAnswer, t: u64| us > t || o == Outcome::Timeout;
            if let Some(i) = which(slow(shadow, tc), slow(stable, ts)) {
                counts[i].fetch_add(1, Ordering::Relaxed);
                canary_only |= i == 0;
            }
        }
        // Counted before the route's sleep flag is read (see
        // `Recorder::sleep`).
        self.pairs.fetch_add(1, Ordering::SeqCst);
        stable_rec.ring_if_asleep();
        if canary_only {
            // The controller's look between ticks may act on it.
            self.pending.store(true, Ordering::Relaxed);
            crate::record::raise_canary_events();
        }
    }

    /// Whether no pair was counted since the last drain, read after the
    /// route's recorders were put to sleep (see `Recorder::sleep`).
    pub fn none_since_drain(&self) -> bool {
        self.pairs.load(Ordering::SeqCst) == 0
    }

    /// Whether a pair with the canary's copy alone bad was counted since
    /// the last drain.
    pub fn has_pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    /// The pairs counted since the last drain, without taking them.
    pub fn pending(&self, slots: usize) -> PairTick {
        self.read(slots, |c| c.load(Ordering::Relaxed))
    }

    /// Takes the pairs counted since the last drain, `slots` latency slots.
    pub fn drain(&self, slots: usize) -> PairTick {
        self.pending.store(false, Ordering::Relaxed);
        self.read(slots, |c| c.swap(0, Ordering::Relaxed))
    }

    /// The counts as `get` reads each counter (a load, or a take).
    fn read(&self, slots: usize, get: impl Fn(&AtomicU64) -> u64) -> PairTick {
        let pairs = get(&self.pairs);
        let batch = |c: &[AtomicU64; 3]| PairBatch {
            canary_only: get(&c[0]),
            stable_only: get(&c[1]),
            both: get(&c[2]),
            pairs,
        };
        PairTick {
            pairs,
            errors: batch(&self.errors),
            slow: self
                .slow
                .iter()
                .take(slots.min(MAX_THRESHOLDS))
                .map(batch)
                .collect(),
        }
    }
}

/// `[route.mirror]`, ready for requests: only while the canary may take
/// traffic (not reverted, smoke checks passed).
pub struct MirrorTarget {
    /// Share of stable's requests copied, basis points.
    bp: u16,
    max_body: usize,
    methods: Box<[Method]>,
    /// The route's pairs and cap.
    pub pairs: Arc<Pairs>,
    counters: [IntCounter; 5],
}

impl MirrorTarget {
    /// `mirror` with `pairs`, counting into `counters` (one per
    /// [`RESULTS`] label).
    pub fn new(mirror: &Mirror, pairs: Arc<Pairs>, counters: [IntCounter; 5]) -> MirrorTarget {
        MirrorTarget {
            bp: mirror.percent_bp,
            max_body: mirror.max_body,
            methods: mirror
                .methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect(),
            pairs,
            counters,
        }
    }

    /// Whether a request of `method` with sticky key hash `key_hash` is
    /// copied: by a bucket independent of the canary split's (so the copied
    /// share of stable's requests is `percent` whatever the weight), the
    /// same for a key every time; a request without a key by chance.
    pub fn wants(&self, method: &Method, key_hash: Option<u64>) -> bool {
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return false;
        }
        let bucket = match key_hash {
            // A different mix of the same hash: independent of its bucket.
            Some(h) => bucket_of_hash(h.rotate_left(32).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16),
            None => random_bucket(),
        };
        if bucket >= self.bp {
            return false;
        }
        // All copies busy: skipped before anything is made for it.
        if self.pairs.in_flight.available_permits() == 0 {
            self.count(3);
            return false;
        }
        true
    }

    fn count(&self, result: usize) {
        if let Some(c) = self.counters.get(result) {
            c.inc();
        }
    }
}

/// A request chosen for mirroring, before its copy starts.
pub struct Seed {
    /// The route (its canary, timeouts and pairs).
    pub route: Arc<RouteTarget>,
    /// Stable's answer, once recorded.
    pub stable: oneshot::Receiver<StableSide>,
    /// The sticky key's hash (the copy's endpoint pick).
    pub key_hash: Option<u64>,
    /// When the client's request began: both sides of the pair are timed
    /// from it.
    pub start: Instant,
}

/// Starts the copy of a request about to be sent to stable: `head` as
/// stable's upstream gets it, `body` teed when it has one. Nothing happens
/// (and the reason is counted) when the copies are all busy or the body is
/// known to be too large.
///
/// A bodiless copy that goes the raw way and finds an idle connection to
/// its endpoint is given back as [`Beside`], to be written from the
/// client's task right before stable's request or right after it (a coin
/// flip). Why: of two requests sent at once, the second is the one that
/// waits, on a busy machine, behind the first (in the upstreams' host, and
/// in veer's runtime, where its answer is read after the first's). Copies
/// always sent second, from their own task, were slower than stable's
/// answer in the tail far more often than the reverse (an identical
/// shadow canary was reverted by the paired latency test, 15 pairs to 0);
/// copies always sent first would hide a slower canary. Sent either way
/// as often, and next to stable's request either way (a copy written
/// first here, before stable's connection was even picked, had a head
/// start the one written second had not: in one run an identical copy
/// was the faster in 671 discordant pairs and the slower in 553), neither
/// version is the second one more often. A copy that
/// finds no idle connection is sent from its own task (the client's
/// request never waits on a connect to the canary), as is one with a body
/// (sent once the body is whole).
pub fn start(
    seed: Seed,
    head: &http::request::Parts,
    body: &mut ClientBody,
    body_timeout: Duration,
) -> Option<Box<Beside>> {
    let target = seed.route.mirror.as_ref()?;
    let Some(permit) = target.pairs.permit() else {
        target.count(3);
        return None;
    };
    use http_body::Body;
    let copy = if body.is_end_stream() {
        BodyCopy::Empty
    } else if body
        .size_hint()
        .exact()
        .is_some_and(|n| n > target.max_body as u64)
    {
        target.count(2);
        return None;
    } else {
        let (tx, rx) = oneshot::channel();
        // (Bounded by the mirror's own max_body and max_concurrent.)
        body.tee(target.max_body, false, tx);
        BodyCopy::Teed(rx)
    };
    let mut req = Request::new(());
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.version_mut() = head.version;
    *req.headers_mut() = head.headers.clone();
    req.headers_mut()
        .insert(SHADOW_HEADER, HeaderValue::from_static("1"));
    let mut req = Some(req);
    let sent = match copy {
        BodyCopy::Empty => HeadStart::prepare(&seed, &mut req),
        BodyCopy::Teed(_) => None,
    };
    let (copy, beside) = match (sent, req) {
        (Some(sent), _) => {
            let (tx, rx) = oneshot::channel();
            let beside = Beside {
                sent: Some((sent, tx)),
                before: fastrand::bool(),
            };
            (Copy::Beside(rx), Some(Box::new(beside)))
        }
        (None, Some(req)) => (Copy::Waiting(Box::new(req), copy), None),
        (None, None) => return None,
    };
    tokio::spawn(run(seed, copy, body_timeout, permit));
    beside
}

/// A copy to be written right before or right after stable's request
/// (see [`start`] and [`crate::raw::Arrival::then_write`]): it is written
/// when this is dropped.
pub struct Beside {
    sent: Option<(HeadStart, oneshot::Sender<HeadStart>)>,
    /// Right before stable's request.
    pub(crate) before: bool,
}

impl Drop for Beside {
    fn drop(&mut self) {
        if let Some((mut sent, tx)) = self.sent.take() {
            sent.write();
            // A copy task gone (its runtime shutting down) has nothing to read.
            let _ = tx.send(sent);
        }
    }
}

enum BodyCopy {
    Empty,
    Teed(oneshot::Receiver<Option<crate::upload::Teed>>),
}

/// A copy as its task gets it.
enum Copy {
    /// To be sent once its body (if any) is whole.
    Waiting(Box<Request<()>>, BodyCopy),
    /// To be written from the client's task beside stable's request.
    Beside(oneshot::Receiver<HeadStart>),
}

/// A bodiless copy for an idle raw connection of its canary endpoint,
/// written from the client's task (see [`start`]).
pub struct HeadStart {
    endpoint: Arc<crate::upstream::Upstream>,
    sender: crate::upstream::Sender,
    request: crate::raw::Encoded,
}

impl HeadStart {
    /// The copy (taken from `head`) ready to be written, when it has no
    /// body, goes the raw way and an idle connection to its endpoint is
    /// there.
    fn prepare(seed: &Seed, head: &mut Option<Request<()>>) -> Option<HeadStart> {
        let route = &seed.route;
        let canary = route.canary.as_ref()?;
        let h = head.as_ref()?;
        if !route.raw_http1 || !crate::raw::eligible_head(h.method(), h.headers()) {
            return None;
        }
        let endpoint = pick(canary, seed.key_hash)?;
        let sender = endpoint.checkout(true)?;
        if !sender.is_raw() {
            // An idle hyper connection (or an HTTP/2 stream): back it goes.
            endpoint.checkin(sender);
            return None;
        }
        let mut req = head.take()?;
        name_a_hostless_copy(req.headers_mut(), &endpoint);
        let req = req.map(|()| ClientBody::copy(Bytes::new()));
        Some(HeadStart {
            endpoint,
            sender,
            request: crate::raw::Encoded::new(req, None),
        })
    }

    /// Writes what of the request its connection takes now (the copy's
    /// task writes the rest).
    fn write(&mut self) {
        if let Some(conn) = self.sender.raw_mut() {
            conn.stamp();
            self.request.written = conn.write_now(self.request.bytes());
        }
    }
}

async fn run(seed: Seed, copy: Copy, body_timeout: Duration, permit: OwnedSemaphorePermit) {
    let route = &seed.route;
    let (Some(target), Some(canary)) = (route.mirror.as_ref(), route.canary.as_ref()) else {
        return;
    };
    // Sent from its own task: later than stable's request.
    let late = matches!(copy, Copy::Waiting(..));
    let (req, grpc) = match copy {
        Copy::Beside(rx) => match rx.await {
            Ok(sent) => (Err(sent), false),
            Err(_) => return target.count(4),
        },
        Copy::Waiting(head, copy) => {
            let body = match copy {
                BodyCopy::Empty => Bytes::new(),
                BodyCopy::Teed(rx) => match rx.await {
                    Ok(Some(t)) => t.bytes,
                    Ok(None) => return target.count(2),
                    Err(_) => return target.count(4),
                },
            };
            let grpc = crate::grpc::is_grpc(head.headers());
            (Ok((*head).map(|()| ClientBody::copy(body))), grpc)
        }
    };
    // Timed from the client's request's start, as stable's answer is, and
    // when the copy went the raw way, to when its head came.
    let start = seed.start;
    let arrival = crate::raw::Arrival::new(start);
    let call_bound = req
        .as_ref()
        .ok()
        .filter(|_| grpc)
        .and_then(|req| crate::grpc::timeout(req.headers()))
        .filter(|d| *d < route.timeout);
    let deadline = call_bound.unwrap_or(route.timeout);
    let shadow = match tokio::time::timeout(
        deadline,
        exchange(route, canary, req, seed.key_hash, &arrival),
    )
    .await
    {
        Err(_) => (start.elapsed().as_micros() as u64, Outcome::Timeout),
        Ok(Err(ProxyError::Overloaded)) => return target.count(3),
        Ok(Err(ProxyError::UpstreamConnect)) => {
            (start.elapsed().as_micros() as u64, Outcome::ConnectError)
        }
        Ok(Err(_)) => (start.elapsed().as_micros() as u64, Outcome::Error),
        Ok(Ok(resp)) => {
            let micros = arrival
                .head_us()
                .unwrap_or_else(|| start.elapsed().as_micros() as u64);
            let total = route.timeout.max(body_timeout);
            match answer(route, resp, grpc, call_bound.is_some(), body_timeout, total).await {
                Some(outcome) => (micros, outcome),
                None => return target.count(4),
            }
        }
    };
    target.count(usize::from(shadow.1 != Outcome::Ok));
    // The slot is held until the pair is complete: copies waiting for
    // long answers from stable count against the cap too, so they cannot
    // pile up.
    match tokio::time::timeout(PAIR_WAIT, seed.stable).await {
        Ok(Ok(stable)) => {
            let shadow = match late {
                true => as_if_sent_with_stable(
                    shadow,
                    arrival.head_us(),
                    arrival.sent_us(),
                    stable.sent_us,
                ),
                false => shadow,
            };
            target.pairs.record(
                stable.answer,
                shadow,
                &route.stable.recorder,
                &canary.recorder,
            )
        }
        _ => target.count(4),
    }
    drop(permit);
}

/// A copy sent from its own task, timed as if it had been sent when
/// stable's request was: stable's time to its send, plus the copy's own
/// from its send to its head. Why: a copy that finds no idle connection to
/// its canary is sent once connected and once its task runs, on a busy
/// machine milliseconds after stable's request; timed from the client's
/// start, that wait was counted as the canary's (identical copies sent so
/// came a median 0.7 ms and a p90 4 ms after stable's answer, beside CPU
/// hogs). Only when both went the raw way (else neither
/// send is timed), and only for a head's time (a timeout or an error is
/// left as it is). Copies written from the client's task, just before or
/// after stable's request, are timed from the client's start as it is:
/// their coin flip is what keeps either side from being the later one.
///
/// The times are µs from the client's start: the copy's head and send,
/// stable's send.
fn as_if_sent_with_stable(
    shadow: StableAnswer,
    head: Option<u64>,
    own: Option<u64>,
    theirs: Option<u64>,
) -> StableAnswer {
    match (head, own, theirs) {
        (Some(head), Some(own), Some(theirs)) if shadow.0 == head => {
            (head.saturating_sub(own) + theirs, shadow.1)
        }
        _ => shadow,
    }
}

/// A copy's answer head, the connection it came on when hyper read it (a
/// raw connection travels in the body), and the endpoint.
type Answered = (
    http::Response<UpBody>,
    Option<crate::upstream::Sender>,
    Arc<crate::upstream::Upstream>,
);

/// Sends the copy to the canary endpoint its key picks: one attempt, no
/// retry on another endpoint. It goes the way stable's request went: a
/// bodiless GET or HEAD over a raw connection ([`crate::raw`]) unless
/// `upstream_http1 = "hyper"` (else the pair would compare two HTTP
/// clients, not two versions: through hyper's client task a copy took
/// longer than stable's raw exchange on a busy machine, and an identical
/// shadow canary was reverted by the paired latency test). Like stable's,
/// a raw copy that a pooled connection dropped unanswered goes once more
/// on a fresh connection to the same endpoint.
async fn exchange(
    route: &RouteTarget,
    canary: &crate::snapshot::VersionTarget,
    req: Result<Request<ClientBody>, HeadStart>,
    key_hash: Option<u64>,
    arrival: &Arc<crate::raw::Arrival>,
) -> Result<Answered, ProxyError> {
    let req = match req {
        Ok(req) => req,
        Err(sent) => {
            let endpoint = sent.endpoint;
            let resp = crate::raw::send_encoded(
                sent.sender,
                endpoint.clone(),
                sent.request,
                route.connect_timeout,
                Some(arrival),
            )
            .await;
            return raw_answer(resp, endpoint);
        }
    };
    let endpoint = pick(canary, key_hash).ok_or(ProxyError::UpstreamConnect)?;
    let endpoint = &endpoint;
    let mut req = req;
    name_a_hostless_copy(req.headers_mut(), endpoint);
    let raw = route.raw_http1 && crate::raw::eligible(&req);
    let mut sender = endpoint
        .get(route.connect_timeout, false, raw)
        .await
        .inspect_err(|e| {
            if *e != ProxyError::Overloaded {
                endpoint.mark_failed(*e);
            }
        })?;
    if sender.is_raw() {
        let resp = crate::raw::send(
            sender,
            endpoint.clone(),
            req,
            None,
            route.connect_timeout,
            Some(arrival),
        );
        return raw_answer(resp.await, endpoint.clone());
    }
    let resp = sender.send_request(req).await?;
    endpoint.mark_ok();
    Ok((resp.map(UpBody::Left), Some(sender), endpoint.clone()))
}

/// A copy of a request whose client named no host (HTTP/1.0 may not)
/// goes with its endpoint's address as `Host`, as stable's request does
/// ([`crate::service::name_the_endpoint`]): it went without one, which
/// servers refuse (Go's net/http answers 400), so the copies of a load
/// balancer's HTTP/1.0 checks failed on a canary their originals passed on
/// stable.
fn name_a_hostless_copy(headers: &mut http::HeaderMap, endpoint: &crate::upstream::Upstream) {
    if !headers.contains_key(http::header::HOST) {
        crate::service::name_the_endpoint(headers, endpoint);
    }
}

/// The canary endpoint a copy goes to: its key's pick (a random key's
/// without one).
fn pick(
    canary: &crate::snapshot::VersionTarget,
    key_hash: Option<u64>,
) -> Option<Arc<crate::upstream::Upstream>> {
    let key = key_hash.unwrap_or_else(|| fastrand::u64(..)).to_le_bytes();
    let pick = canary.balancer.pick(&key)?;
    canary.balancer.endpoints().get(pick.first()).cloned()
}

/// A raw exchange's answer, the endpoint marked by how it went.
fn raw_answer(
    resp: Result<http::Response<crate::raw::RawBody>, ProxyError>,
    endpoint: Arc<crate::upstream::Upstream>,
) -> Result<Answered, ProxyError> {
    match resp {
        Ok(resp) => {
            endpoint.mark_ok();
            Ok((resp.map(UpBody::Right), None, endpoint))
        }
        Err(e) => {
            if matches!(e, ProxyError::UpstreamReset | ProxyError::UpstreamConnect) {
                endpoint.mark_failed(e);
            }
            Err(e)
        }
    }
}

/// The copy's outcome: its status (or grpc-status), or an error if its body
/// fails (an upstream stall is a timeout, as for routed requests). The body
/// is read and dropped; the connection goes back to the pool at its end.
/// None when the body has not ended within `total` (a long stream: no pair,
/// since stable's stream is not judged on its length either).
async fn answer(
    route: &RouteTarget,
    (resp, sender, upstream): Answered,
    grpc: bool,
    call_bound: bool,
    body_timeout: Duration,
    total: Duration,
) -> Option<Outcome> {
    let status = resp.status().as_u16();
    let error = status >= 500 || (route.count_4xx_as_errors && (400..500).contains(&status));
    let mut code = (grpc && status == 200)
        .then(|| crate::grpc::status(resp.headers()))
        .flatten();
    let mut body = UpstreamBody::new(
        resp.into_body(),
        body_timeout,
        sender.map(|s| (s, upstream)),
    );
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            if let Some(t) = frame.trailers_ref() {
                code = code.or_else(|| crate::grpc::status(t));
            }
        }
        Ok::<(), crate::body::BoxError>(())
    };
    let outcome = match tokio::time::timeout(total, read).await {
        Err(_) => return None,
        Ok(Err(e)) if e.is::<crate::body::BodyTimeout>() => Outcome::Timeout,
        Ok(Err(_)) => Outcome::Error,
        Ok(Ok(())) if error => Outcome::Error,
        Ok(Ok(())) if grpc && status == 200 => crate::grpc::outcome(
            code.unwrap_or(crate::grpc::UNKNOWN),
            route.grpc_errors,
            call_bound,
        ),
        Ok(Ok(())) => Outcome::Ok,
    };
    Some(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RouteKeys;
    use crate::split::is_canary;

    fn target(percent_bp: u16, methods: &[&str]) -> MirrorTarget {
        let m = Mirror {
            percent_bp,
            max_body: 1024,
            max_concurrent: 2,
            methods: methods.iter().map(|m| m.to_string()).collect(),
        };
        let c = || IntCounter::new("x", "x").expect("counter");
        MirrorTarget::new(&m, Arc::new(Pairs::new(2)), [c(), c(), c(), c(), c()])
    }

    #[test]
    fn the_copied_share_is_percent_of_stables_requests_whatever_the_weight() {
        let t = target(1000, &[]);
        let mut rng = fastrand::Rng::with_seed(3);
        let (mut stable, mut copied) = (0u32, 0u32);
        for _ in 0..200_000 {
            let h = rng.u64(..);
            // A 30 % canary takes its buckets; the copies come from the rest.
            if is_canary(bucket_of_hash(h), 3000) {
                continue;
            }
            stable += 1;
            copied += u32::from(t.wants(&Method::GET, Some(h)));
        }
        let share = f64::from(copied) / f64::from(stable);
        assert!((share - 0.10).abs() < 0.005, "{share}");
        // The same key, the same answer.
        let h = rng.u64(..);
        let first = t.wants(&Method::GET, Some(h));
        assert!((0..100).all(|_| t.wants(&Method::GET, Some(h)) == first));
        let only_get = target(10_000, &["GET"]);
        assert!(only_get.wants(&Method::GET, Some(h)));
        assert!(!only_get.wants(&Method::POST, Some(h)));
    }

    /// Whether a copy kept `before` stable's request reached its server
    /// while stable's request could not be written (its server reads
    /// nothing and its connection's buffers are full); and that it did by
    /// the time stable's exchange was dropped in any case.
    async fn copy_went_while_stables_request_waited(before: bool) -> bool {
        use crate::upstream::{Connector, Upstreams};
        use tokio::net::TcpListener;
        let (copy_l, stable_l) = (
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
        );
        let ups = Upstreams::new();
        let copy_up = ups.get(copy_l.local_addr().unwrap(), Connector::H1, 8);
        let stable_up = ups.get(stable_l.local_addr().unwrap(), Connector::H1, 8);
        let timeout = Duration::from_secs(5);
        let copy_sender = copy_up.get(timeout, false, true).await.unwrap();
        let (copy_server, _) = copy_l.accept().await.unwrap();
        let mut stable_sender = stable_up.get(timeout, false, true).await.unwrap();
        let (_stable_server, _) = stable_l.accept().await.unwrap();
        // Stable's server reads nothing: its connection fills up.
        let conn = stable_sender.raw_mut().unwrap();
        let junk = vec![b'x'; 1 << 16];
        let mut rounds = 0;
        while conn.write_now(&junk) == junk.len() {
            rounds += 1;
            assert!(rounds < 10_000, "the connection never filled");
        }
        let get = || {
            let mut req = Request::new(ClientBody::copy(Bytes::new()));
            *req.uri_mut() = "/".parse().unwrap();
            req.headers_mut()
                .insert(http::header::HOST, HeaderValue::from_static("svc.test"));
            req
        };
        let (tx, _rx) = oneshot::channel();
        let copy = HeadStart {
            endpoint: copy_up.clone(),
            sender: copy_sender,
            request: crate::raw::Encoded::new(get(), None),
        };
        let arrival = crate::raw::Arrival::new(Instant::now());
        arrival.then_write(Box::new(Beside {
            sent: Some((copy, tx)),
            before,
        }));
        let exchange = crate::raw::send(
            stable_sender,
            stable_up,
            get(),
            None,
            timeout,
            Some(&arrival),
        );
        let blocked = tokio::time::timeout(Duration::from_millis(200), exchange).await;
        assert!(blocked.is_err(), "stable's request could not be written");
        // A write on loopback is in the peer's receive queue when it returns.
        let mut buf = [0u8; 64];
        let went = match copy_server.try_read(&mut buf) {
            Ok(n) => n > 0,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("{e}"),
        };
        // Dropped with the exchange that never wrote: the copy goes now.
        drop(arrival);
        tokio::time::timeout(Duration::from_secs(10), copy_server.readable())
            .await
            .expect("the copy was written by the time its exchange was dropped")
            .unwrap();
        went
    }

    #[test]
    fn a_copy_sent_late_is_timed_as_if_sent_with_stables_request() {
        // Sent 4 ms after the client's start, answered 1 ms later; stable's
        // request went at 0.2 ms: 1.2 ms.
        let ok = (5_000, Outcome::Ok);
        assert_eq!(
            as_if_sent_with_stable(ok, Some(5_000), Some(4_000), Some(200)),
            (1_200, Outcome::Ok)
        );
        // Either send not timed (not the raw way): as it was.
        assert_eq!(as_if_sent_with_stable(ok, Some(5_000), None, Some(200)), ok);
        assert_eq!(
            as_if_sent_with_stable(ok, Some(5_000), Some(4_000), None),
            ok
        );
        // A time that is not the head's (a timeout): as it was.
        let timeout = (9_000, Outcome::Timeout);
        assert_eq!(
            as_if_sent_with_stable(timeout, Some(5_000), Some(4_000), Some(200)),
            timeout
        );
    }

    #[tokio::test]
    async fn a_copy_goes_right_before_or_right_after_stables_request_as_it_asks() {
        assert!(copy_went_while_stables_request_waited(true).await);
        assert!(!copy_went_while_stables_request_waited(false).await);
    }

    #[test]
    fn pairs_are_counted_by_which_side_was_bad_and_slow_against_each_sides_threshold() {
        let keys = Arc::new(RouteKeys::new(1));
        let (st, ca) = (Recorder::new(keys.clone()), Recorder::for_canary(keys));
        st.set_thresholds(&[Some(1_000)]);
        ca.set_thresholds(&[Some(1_300)]);
        let p = Pairs::new(1);
        // The copy failed alone; both failed; stable alone.
        p.record((100, Outcome::Ok), (100, Outcome::Error), &st, &ca);
        p.record((100, Outcome::Error), (100, Outcome::Error), &st, &ca);
        p.record((100, Outcome::ConnectError), (100, Outcome::Ok), &st, &ca);
        // 1 200 µs: slow for stable, not for the canary's 1.3x threshold.
        p.record((1_200, Outcome::Ok), (1_200, Outcome::Ok), &st, &ca);
        // The copy timed out: slow whatever its time.
        p.record((10, Outcome::Ok), (10, Outcome::Timeout), &st, &ca);
        let t = p.drain(1);
        assert_eq!(t.pairs, 5);
        assert_eq!(
            (t.errors.canary_only, t.errors.stable_only, t.errors.both),
            (2, 1, 1)
        );
        let slow = t.slow.first().copied().unwrap_or_default();
        assert_eq!((slow.canary_only, slow.stable_only, slow.both), (1, 1, 0));
        assert_eq!(p.drain(1).pairs, 0);
        // The cap: one copy at a time.
        let first = p.permit();
        assert!(first.is_some() && p.permit().is_none());
    }
}
