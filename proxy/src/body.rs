//! Streaming bodies: idle timeouts, handing a connection back to its pool
//! once its response has been read to the end, and the judge's record of a
//! request, written when its response body ends (a canary that sends a
//! good head and then breaks off the body has failed that request).
//!
//! Nothing here buffers a whole message: frames pass through as they come.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::error::ProxyError;
use crate::record::Outcome;
use crate::snapshot::RouteTarget;
use crate::upstream::{Sender, Upstream};

/// The error type of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body that made no progress for its idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("body made no progress for {0:?}")]
pub struct BodyTimeout(pub(crate) Duration);

/// Wraps a body so that it fails if no frame arrives for `idle`. The timer is
/// only created the first time the body has to wait.
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<B> IdleTimeout<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, idle: Duration) -> IdleTimeout<B> {
        IdleTimeout {
            inner,
            idle,
            timer: None,
            armed: false,
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.armed = false;
                Poll::Ready(r.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if !this.armed {
                    let deadline = Instant::now() + this.idle;
                    this.armed = true;
                    match &mut this.timer {
                        Some(t) => t.as_mut().reset(deadline),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let expired = match &mut this.timer {
                    Some(t) => t.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if expired {
                    Poll::Ready(Some(Err(Box::new(BodyTimeout(this.idle)))))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body on its way to the upstream.
pub type RequestBody = crate::upload::ClientBody;

/// The judge's record of a request whose response body is still streaming.
///
/// Latency is the time to the response head (a body's length and the
/// client's speed are not the version's doing); the outcome is the status's,
/// unless the upstream fails the body (reset, truncation, stall), which makes
/// it an error. A client that goes away early does not fail the request.
pub struct Pending {
    /// Holds the route (and so the recorder) until the body ends.
    pub route: Arc<RouteTarget>,
    /// The request went to the canary.
    pub canary: bool,
    /// The version's time to the response head (less the request body's
    /// waits for the client: [`crate::upload::Upload::version_us`]).
    pub micros: u64,
    /// Outcome by status.
    pub outcome: Outcome,
    /// The sticky key's hash.
    pub key_hash: Option<u64>,
    /// The client address's [`crate::record::client_hash`].
    pub client: u64,
    /// The request body's record: a body the client broke is not the
    /// version's failure, even when the upstream then breaks off too.
    pub upload: Arc<crate::upload::Upload>,
    /// A mirrored request's copy waits for this answer to make its pair.
    pub pair: Option<crate::mirror::PairSender>,
}

impl Pending {
    /// Records the request; `failed`: how the upstream broke off the body.
    fn finish(self, failed: Option<ProxyError>) {
        let version = self.route.version(self.canary);
        let outcome = match failed {
            None => self.outcome,
            Some(_) if self.upload.fault().is_some() => return,
            Some(e) => {
                if let Some(kind) = e.upstream_index() {
                    version.metrics.upstream_error(kind);
                }
                if e == ProxyError::UpstreamTimeout {
                    Outcome::Timeout
                } else {
                    Outcome::Error
                }
            }
        };
        version
            .recorder
            .record_from(self.micros, outcome, self.key_hash, Some(self.client));
        if let Some(pair) = self.pair {
            pair.send(outcome);
        }
    }
}

/// The access log line of a response whose body is still streaming
/// (`[proxy] access_log` on): written when the body ends (or fails, or
/// its client leaves), with the bytes passed on and the whole time, as
/// nginx writes its line at a request's end.
pub struct BodyLine {
    /// `[proxy] request_id`'s.
    pub request_id: Option<http::HeaderValue>,
    /// The route.
    pub route: Arc<RouteTarget>,
    /// The request went to the canary.
    pub canary: bool,
    /// The request line and what the line says of the request.
    pub(crate) head: crate::service::RequestLine,
    /// The client.
    pub client: std::net::SocketAddr,
    /// The head's status.
    pub status: u16,
    /// The endpoint that answered.
    pub upstream: Option<Arc<Upstream>>,
    /// Until the response head.
    pub micros: u64,
    /// When the request came.
    pub start: Instant,
    /// `access_log = "all"`: a line whatever the outcome.
    pub all: bool,
    /// The outcome was a failure by the head (a 5xx, say): a line in
    /// `errors` too.
    pub failed: bool,
    /// A gRPC call's status, once known.
    pub grpc_status: Option<u8>,
    /// Tries sent again (`[route.retry]`).
    pub retries: u8,
    /// The body's bytes passed on so far.
    pub bytes: u64,
}

impl BodyLine {
    /// The request's line (message `request`), if its outcome asks for
    /// one: at the body's end, its failure, or its client leaving.
    pub(crate) fn request(&self) {
        if !(self.all || self.failed) {
            return;
        }
        let version = self.route.version(self.canary);
        crate::service::Logged {
            head: &self.head,
            request_id: self.request_id.as_ref(),
            route: &self.route.name,
            version: &version.name,
            canary: self.canary,
            client: self.client,
            upstream: self.upstream.as_deref().map(Upstream::label),
            micros: self.micros,
            bytes: self.bytes,
            total_micros: self.start.elapsed().as_micros() as u64,
            grpc_status: self.grpc_status,
            retries: self.retries,
        }
        .line(self.status, None, None);
    }

    /// The body broke off (`why`, in words): the request's line, then one
    /// of its own (message `response body failed`, in `errors` too).
    fn failed(&self, e: ProxyError, why: &str) {
        self.request();
        let version = self.route.version(self.canary);
        crate::access::line("response body failed", |f| {
            f.bare("route", &self.route.name)
                .bare("version", &version.name)
                .str("role", if self.canary { "canary" } else { "stable" })
                .bare("method", self.head.method.as_str())
                .str("path", self.head.uri.path())
                .u64("status", self.status.into())
                .addr("client", self.client)
                .opt_str("upstream", self.upstream.as_deref().map(Upstream::label))
                .str("error", e.kind())
                .str("why", why)
                .opt_str(
                    "request_id",
                    self.request_id.as_ref().and_then(|v| v.to_str().ok()),
                )
                .u64("bytes", self.bytes);
            self.head.about(f);
        });
    }
}

/// A gRPC call whose status comes in the trailers: counted
/// (`veer_grpc_responses_total`) and made the judge's outcome when they come.
pub struct GrpcCall {
    /// The route (its gRPC error codes and the version's metrics).
    pub route: Arc<RouteTarget>,
    /// The call went to the canary.
    pub canary: bool,
    /// The caller's deadline was shorter than the route's timeout.
    pub client_bound: bool,
    /// The endpoint that serves it, when outlier detection counts its
    /// status against it (stable's, on a route with
    /// `[route.outlier_detection]`).
    pub endpoint: Option<Arc<Upstream>>,
}

impl GrpcCall {
    /// The call ended with `code`: counts it and returns the judge's outcome.
    fn ended(&self, code: u8) -> Outcome {
        let version = self.route.version(self.canary);
        version.metrics.grpc(code);
        let outcome = crate::grpc::outcome(code, self.route.grpc_errors, self.client_bound);
        if let (Some(u), Some(o)) = (&self.endpoint, &self.route.outlier) {
            let failed = (outcome != Outcome::Ok).then_some(crate::upstream::Failed::Grpc(code));
            crate::service::outlier_counted(&self.route, version, o, u, failed);
        }
        outcome
    }
}

/// Whose fault a body error is: a stall is a timeout, anything else the
/// upstream breaking the message off.
fn body_failure(e: &BoxError) -> ProxyError {
    if e.is::<BodyTimeout>() {
        return ProxyError::UpstreamTimeout;
    }
    if let Some(f) = e.downcast_ref::<crate::raw::BodyFailed>() {
        return f.kind;
    }
    if let Some(kind) = e.downcast_ref::<ProxyError>() {
        return *kind;
    }
    let Some(h) = e.downcast_ref::<hyper::Error>() else {
        return ProxyError::UpstreamReset;
    };
    // A body hyper's HTTP/1.1 reader refused (a chunk size line that is
    // no number): its cause is an I/O error of invalid input, where veer's
    // own reads say `protocol` (a connection that broke is `reset`).
    let cause = std::error::Error::source(h).and_then(|c| c.downcast_ref::<std::io::Error>());
    match cause.map(std::io::Error::kind) {
        Some(std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData) => {
            ProxyError::UpstreamProtocol
        }
        _ => ProxyError::from_hyper(h),
    }
}

/// A body error in words, its causes' too (hyper's says "error reading a
/// body from connection", its cause what was wrong).
fn body_failure_why(e: &BoxError) -> String {
    if let Some(BodyTimeout(idle)) = e.downcast_ref::<BodyTimeout>() {
        return format!("nothing came for {idle:?} (body_timeout)");
    }
    let mut why = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        why.push_str(": ");
        why.push_str(&c.to_string());
        cause = c.source();
    }
    why
}

/// A response body as read from an upstream: by hyper's client (`Left`),
/// or by the request's own task from a raw connection, which it gives
/// back at its end (`Right`, [`crate::raw`]).
pub type UpBody = http_body_util::Either<Incoming, crate::raw::RawBody>;

/// An upstream response body; the connection goes back to its endpoint's
/// pool when the body ends, and is closed if the body is dropped early.
pub struct UpstreamBody {
    inner: IdleTimeout<UpBody>,
    conn: Option<(Sender, Arc<Upstream>)>,
    pending: Option<Pending>,
    grpc: Option<GrpcCall>,
    /// Logged if the upstream breaks the body off.
    log: Option<Box<BodyLine>>,
    /// A client's answer (see [`UpstreamBody::at_end`]), not a body veer
    /// reads for itself (a mirrored copy's, a retried answer's discarded).
    answering: bool,
}

impl UpstreamBody {
    /// Wraps a response body read from `conn` (None: do not pool).
    pub fn new(
        inner: UpBody,
        idle: Duration,
        conn: Option<(Sender, Arc<Upstream>)>,
    ) -> UpstreamBody {
        let mut b = UpstreamBody::wrap(inner, idle, conn);
        b.released_if_ended();
        b
    }

    /// [`UpstreamBody::new`], built on the heap: a response's body is
    /// boxed (see [`ProxyBody::Upstream`]), and boxing one built on the
    /// stack moved all its bytes once more a request.
    pub fn boxed(
        inner: UpBody,
        idle: Duration,
        conn: Option<(Sender, Arc<Upstream>)>,
    ) -> Box<UpstreamBody> {
        let mut b = Box::new(UpstreamBody::wrap(inner, idle, conn));
        b.released_if_ended();
        b
    }

    #[inline(always)]
    fn wrap(inner: UpBody, idle: Duration, conn: Option<(Sender, Arc<Upstream>)>) -> UpstreamBody {
        UpstreamBody {
            inner: IdleTimeout::new(inner, idle),
            conn,
            pending: None,
            grpc: None,
            log: None,
            answering: false,
        }
    }

    /// A body with nothing to read gives its connection back at once.
    fn released_if_ended(&mut self) {
        if self.inner.is_end_stream() {
            self.release();
        }
    }

    /// The trailers (or the end without them) of a watched gRPC call.
    fn grpc_ended(&mut self, trailers: Option<&http::HeaderMap>) {
        let Some(call) = self.grpc.take() else {
            return;
        };
        let code = trailers
            .and_then(crate::grpc::status)
            .unwrap_or(crate::grpc::UNKNOWN);
        let outcome = call.ended(code);
        if let Some(l) = &mut self.log {
            l.grpc_status = Some(code);
            l.failed |= outcome != Outcome::Ok;
        }
        if let Some(p) = &mut self.pending {
            if p.outcome == Outcome::Ok {
                p.outcome = outcome;
            }
        }
    }

    /// Records `pending` and writes the access log's `line` when the body
    /// ends (at once if it already has); for a gRPC `call`, reads its
    /// `grpc-status` from the trailers when they come (a body that ends
    /// without one ends the call as UNKNOWN).
    pub fn at_end(
        &mut self,
        pending: Option<Pending>,
        call: Option<GrpcCall>,
        line: Option<Box<BodyLine>>,
    ) {
        self.pending = pending;
        self.grpc = call;
        self.log = line;
        self.answering = true;
        if self.inner.is_end_stream() {
            self.grpc_ended(None);
            if let Some(p) = self.pending.take() {
                p.finish(None);
            }
            if let Some(l) = self.log.take() {
                l.request();
            }
        }
    }

    fn release(&mut self) {
        self.grpc_ended(None);
        if let Some((sender, upstream)) = self.conn.take() {
            upstream.checkin(sender);
        }
        if let Some(p) = self.pending.take() {
            p.finish(None);
        }
        if let Some(l) = self.log.take() {
            l.request();
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // The client went away before the end: not the upstream's failure.
        if let Some(p) = self.pending.take() {
            p.finish(None);
        }
        if let Some(l) = self.log.take() {
            l.request();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &mut r {
            if let (Some(l), Some(d)) = (&mut self.log, f.data_ref()) {
                l.bytes += d.len() as u64;
            }
            if let Some(t) = f.trailers_mut() {
                crate::headers::strip_trailers(t);
                self.grpc_ended(Some(t));
            }
        }
        match &r {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(e))) => {
                let conn = self.conn.take();
                let failure = body_failure(e);
                if let Some(p) = self.pending.take() {
                    p.finish(Some(failure));
                }
                // Said in the log with its endpoint: hyper's connection's,
                // or (a stall) the raw body's. (veer's own reads said
                // theirs, see `crate::raw`.)
                let endpoint = match (&conn, &self.inner.inner) {
                    _ if !self.answering => None,
                    (Some((_, u)), _) => Some(u.clone()),
                    (None, UpBody::Right(raw)) if e.is::<BodyTimeout>() => raw.upstream().cloned(),
                    _ => None,
                };
                if self.log.is_some() || endpoint.is_some() {
                    let why = body_failure_why(e);
                    if let Some(u) = endpoint {
                        u.say_body_failed(failure, &why);
                    }
                    if let Some(l) = self.log.take() {
                        l.failed(failure, &why);
                    }
                }
            }
            _ => {}
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

/// What veer sends to a client: an upstream's body, or a short one of its own.
pub enum ProxyBody {
    /// Streamed from the upstream. Boxed: the response is moved several
    /// times on its way to hyper's writer, and inline its 408 bytes made
    /// it a 520-byte `memcpy` each time; one allocation costs less (-817
    /// instructions a request, `benches/RESULTS.md`, session 19).
    Upstream(Box<UpstreamBody>),
    /// Generated by veer (errors, admin answers).
    Full(Option<Bytes>),
}

impl ProxyBody {
    /// A body of fixed bytes.
    pub fn full(b: impl Into<Bytes>) -> ProxyBody {
        let b = b.into();
        ProxyBody::Full(if b.is_empty() { None } else { Some(b) })
    }

    /// An empty body.
    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Upstream(b) => Pin::new(&mut **b).poll_frame(cx),
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
