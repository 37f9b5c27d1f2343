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
//!   aborted (the client left), malformed (400), or longer than its route
//!   takes (`max_request_body`, 413). The request then counts
//!   in `veer_proxy_errors_total` under its client kind and is never
//!   recorded for a version.
//!
//! [`ClientBody`] wraps the incoming body and writes what it sees into an
//! [`Upload`] that the request path reads: lock-free atomics, written by the
//! connection task that polls the body.
//!
//! A body announced small enough (`[proxy] request_buffer`) is read whole
//! before its request takes an upstream connection
//! ([`ClientBody::read_whole`]): a client that sends it slowly, on purpose
//! or not, then holds only its own connection (nginx's request buffering,
//! without its spill to disk). The bodies being read so, or read and not
//! yet sent, hold at most [`HELD_BUDGET`] bytes in all, counted as they
//! come: past that, a body's read part goes first and its rest streams.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::{BodyTimeout, BoxError, IdleTimeout};
use crate::error::ProxyError;

/// The most bytes of request bodies read whole and not yet sent upstream,
/// over the whole process: 64 MiB, 4 096 bodies of the default 16 KiB.
pub const HELD_BUDGET: usize = 64 << 20;

/// Bytes of request bodies granted to be read whole, not yet given back.
static HELD: AtomicUsize = AtomicUsize::new(0);

/// A body's share of [`HELD_BUDGET`]: the bytes of it read so far, given
/// back when dropped (with the body, once sent or given up).
#[derive(Debug, Default)]
pub struct Grant(usize);

impl Grant {
    /// Counts `n` more bytes, if the budget has room.
    pub fn grow(&mut self, n: usize) -> bool {
        let before = HELD.fetch_add(n, Ordering::Relaxed);
        if before + n > HELD_BUDGET {
            HELD.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        self.0 += n;
        true
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        HELD.fetch_sub(self.0, Ordering::Relaxed);
    }
}

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
    /// The whole body has been read (or there was none).
    whole: AtomicBool,
}

impl Upload {
    /// A fresh record, its clock starting now.
    pub fn new() -> Arc<Upload> {
        Upload::since(Instant::now())
    }

    /// A fresh record, its clock starting at `base` (the request's arrival:
    /// one clock read a request fewer).
    pub fn since(base: Instant) -> Arc<Upload> {
        Arc::new(Upload {
            base,
            waiting_since_us: AtomicU64::new(NOT_WAITING),
            waited_us: AtomicU64::new(0),
            fault: AtomicU8::new(NO_FAULT),
            whole: AtomicBool::new(false),
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

    /// The version's time up to `now`, in µs: since the request came
    /// (`base`), less the time its body waited for the client. What the
    /// judge records as a request's latency: a slow upload is the
    /// client's time, never the version's.
    pub fn version_us(&self, now: Instant) -> u64 {
        let client = self.client_time(now).as_micros() as u64;
        self.micros(now).saturating_sub(client)
    }

    /// The time since the request came, in µs (the client's waits
    /// included).
    pub fn elapsed_us(&self, now: Instant) -> u64 {
        self.micros(now)
    }

    /// Whether the client sent its whole request: the body was read to its
    /// end (or there was none) and did not fail.
    pub fn sent(&self) -> bool {
        self.whole.load(Ordering::Relaxed) && self.fault().is_none()
    }

    fn set_whole(&self) {
        self.whole.store(true, Ordering::Relaxed);
    }

    /// The client's fault, if its body failed.
    pub fn fault(&self) -> Option<ProxyError> {
        match self.fault.load(Ordering::Relaxed) {
            1 => Some(ProxyError::ClientTimeout),
            2 => Some(ProxyError::ClientAborted),
            3 => Some(ProxyError::ClientBadBody),
            4 => Some(ProxyError::BodyTooLarge),
            _ => None,
        }
    }

    fn set_fault(&self, e: ProxyError) {
        let code = match e {
            ProxyError::ClientTimeout => 1,
            ProxyError::ClientAborted => 2,
            ProxyError::BodyTooLarge => 4,
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
/// the client and how it failed. (Or a mirrored copy's body, already
/// whole: [`ClientBody::copy`].)
pub struct ClientBody {
    inner: Inner,
    upload: Arc<Upload>,
    /// Keeps a copy of the body for a mirrored request.
    tee: Option<Box<Tee>>,
    /// The client connection's activity, told when the body has been read
    /// (see [`crate::conn::ClientClose`]).
    reading: Option<Arc<crate::conn::Activity>>,
    /// Bytes the body may still bring (`max_request_body`; `u64::MAX`: no
    /// limit): past it, it fails as [`ProxyError::BodyTooLarge`].
    left: u64,
    /// Read on when dropped before its end (see [`ClientBody::linger`]).
    linger: bool,
}

/// How many bytes of an HTTP/2 client's body are read on and dropped, at
/// most, once its request no longer needs it (see [`ClientBody::linger`]).
const LINGER_BYTES: u64 = 16 << 20;

/// A request body that grew past its route's `max_request_body`.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than the route takes")]
pub struct TooLarge;

enum Inner {
    Client(IdleTimeout<Incoming>),
    Copy(Option<Bytes>),
    /// Read whole before the request went upstream.
    Held(Box<Held>),
}

/// A body read whole ([`ClientBody::read_whole`]), and its bytes' share
/// of the budget (given back when it is sent or dropped).
struct Held {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
    /// The rest of a body whose reading stopped at the budget: it streams
    /// after `data`.
    rest: Option<IdleTimeout<Incoming>>,
    grant: Grant,
}

/// A copy of a request body being kept for its mirrored twin, up to a
/// limit; the copy goes out when the body ends (`None` if it grew past the
/// limit; nothing if the body failed or was dropped before its end).
struct Tee {
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    /// The copy's share of [`HELD_BUDGET`], when it counts there.
    grant: Option<Grant>,
    done: tokio::sync::oneshot::Sender<Option<Teed>>,
}

/// A body's copy ([`ClientBody::tee`]), and its share of the held bytes'
/// budget (none unless counted).
#[derive(Debug, Default)]
pub struct Teed {
    /// The body's bytes.
    pub bytes: Bytes,
    /// Their share of [`HELD_BUDGET`].
    pub grant: Grant,
}

impl Tee {
    /// Keeps `data`; false when the copy is over the limit (then it is
    /// abandoned and said so).
    fn keep(&mut self, data: &Bytes) -> bool {
        self.len += data.len();
        if self.len > self.limit {
            return false;
        }
        if let Some(g) = &mut self.grant {
            if !g.grow(data.len()) {
                return false;
            }
        }
        if !data.is_empty() {
            self.chunks.push(data.clone());
        }
        true
    }

    fn finish(self) {
        let whole = match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.into_iter().next().unwrap_or_default(),
            _ => {
                let mut all = bytes::BytesMut::with_capacity(self.len);
                for c in &self.chunks {
                    all.extend_from_slice(c);
                }
                all.freeze()
            }
        };
        let _ = self.done.send(Some(Teed {
            bytes: whole,
            grant: self.grant.unwrap_or_default(),
        }));
    }
}

impl ClientBody {
    /// Wraps `body`.
    pub fn new(body: Incoming, idle: Duration, upload: Arc<Upload>) -> ClientBody {
        if body.is_end_stream() {
            upload.set_whole();
        }
        ClientBody {
            inner: Inner::Client(IdleTimeout::new(body, idle)),
            upload,
            tee: None,
            reading: None,
            left: u64::MAX,
            linger: false,
        }
    }

    /// When dropped before its end, because the upstream answered without
    /// reading it all (a 413, a 401), the rest of the client's body is read
    /// and dropped, for up to 10 s and 16 MiB (as an HTTP/1.1 connection's
    /// lingering close, [`crate::conn`]), before
    /// its stream is let go. For HTTP/2, where letting it go at once sends
    /// the client RST_STREAM (NO_ERROR) while it still uploads: the RFC
    /// allows that after a whole answer, but clients that go on sending
    /// before they read (curl 7.88, Debian 12's) fail on it and lose the
    /// answer. nginx reads such a body before it answers (request
    /// buffering) or after (lingering close). A body the client broke is
    /// not read on.
    pub fn linger(&mut self) {
        self.linger = true;
    }

    /// The client's stream still to be read, taken out (see
    /// [`ClientBody::linger`]).
    fn unread(&mut self) -> Option<IdleTimeout<Incoming>> {
        match std::mem::replace(&mut self.inner, Inner::Copy(None)) {
            Inner::Client(body) => Some(body),
            Inner::Held(mut held) => held.rest.take(),
            Inner::Copy(_) => None,
        }
    }

    /// Tells `activity` that a body is being read, and when it has been
    /// read to its end or was dropped before (hyper then stops reading
    /// it); a body that fails tells nothing more (see `poll_frame`).
    pub fn tell_when_read(&mut self, activity: Arc<crate::conn::Activity>) {
        activity.body_opened();
        self.reading = Some(activity);
    }

    fn read(&mut self) {
        if let Some(a) = self.reading.take() {
            a.body_read();
        }
    }

    /// A whole body (a mirrored copy).
    pub fn copy(data: Bytes) -> ClientBody {
        ClientBody {
            inner: Inner::Copy((!data.is_empty()).then_some(data)),
            upload: Upload::new(),
            tee: None,
            reading: None,
            left: u64::MAX,
            linger: false,
        }
    }

    /// Fails the body as [`ProxyError::BodyTooLarge`] once more than
    /// `max` bytes of it have come (for a body whose length was not
    /// announced: one announced longer is refused before it is read).
    pub fn limit(&mut self, max: u64) {
        self.left = max;
    }

    /// Reads the rest of the body before its request goes upstream. Waits for the client are the client's
    /// time and its faults its own, as when the body streams ([`Upload`]);
    /// a failed read is the client's fault, returned. The bytes read count
    /// against [`HELD_BUDGET`] until sent (or dropped); should it run out,
    /// the part read goes first and the rest streams as it comes: false
    /// then. hyper fails a body longer than it announced.
    pub async fn read_whole(&mut self) -> Result<bool, ProxyError> {
        use http_body_util::BodyExt;
        if !matches!(self.inner, Inner::Client(_)) {
            return Ok(true);
        }
        let mut grant = Grant::default();
        // Copied as they come unless the first is the whole: a body
        // dripped a byte at a time would otherwise keep a read buffer
        // alive for each byte. The copy grows with what came (never to
        // what the client announced, which it may never send).
        let mut first: Option<Bytes> = None;
        let mut rest = bytes::BytesMut::new();
        let mut trailers = None;
        let mut whole = true;
        while !self.is_end_stream() {
            let frame = match self.frame().await {
                None => break,
                Some(Ok(frame)) => frame,
                Some(Err(_)) => {
                    return Err(self.upload.fault().unwrap_or(ProxyError::ClientAborted))
                }
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    trailers = frame.into_trailers().ok();
                    continue;
                }
            };
            // Kept, whether or not the budget has room for it: it has
            // been read.
            let room = grant.grow(data.len());
            if first.is_none() && rest.is_empty() {
                first = (!data.is_empty()).then_some(data);
            } else {
                if let Some(f) = first.take() {
                    rest.extend_from_slice(&f);
                }
                rest.extend_from_slice(&data);
            }
            if !room && !self.is_end_stream() {
                whole = false;
                break;
            }
        }
        let client = match std::mem::replace(&mut self.inner, Inner::Copy(None)) {
            Inner::Client(client) => client,
            _ => return Ok(true), // checked above
        };
        let rest_to_come = if whole {
            self.upload.set_whole();
            // All of it read: the client's close can be looked for meanwhile.
            self.read();
            None
        } else {
            Some(client)
        };
        self.inner = Inner::Held(Box::new(Held {
            data: first.or_else(|| (!rest.is_empty()).then(|| rest.freeze())),
            trailers,
            rest: rest_to_come,
            grant,
        }));
        Ok(whole)
    }

    /// The body, when it was read whole before the request went upstream
    /// ([`ClientBody::read_whole`]: all of it, no trailers): a copy
    /// (shared bytes) to send again (`[route.retry]`, a refused HTTP/2
    /// stream), with the bytes' share of the budget, which the copy keeps
    /// from then on (the bytes are shared: counted once, until the copy is
    /// dropped rather than until the body is sent). Asked a second time,
    /// the share is counted anew (`None` when the budget has no room).
    /// Asked before the body is sent (its bytes go with the first poll).
    pub fn keep_whole(&mut self) -> Option<(Bytes, Grant)> {
        let Inner::Held(held) = &mut self.inner else {
            return None;
        };
        if held.rest.is_some() || held.trailers.is_some() {
            return None;
        }
        let data = held.data.clone().unwrap_or_default();
        let mut grant = std::mem::take(&mut held.grant);
        if grant.0 < data.len() && !grant.grow(data.len() - grant.0) {
            held.grant = grant;
            return None;
        }
        Some((data, grant))
    }

    /// Whether some of the body is still to come from the client (it was
    /// not read whole before the request went upstream).
    pub fn streams(&self) -> bool {
        match &self.inner {
            Inner::Client(inner) => !inner.is_end_stream(),
            Inner::Copy(_) => false,
            Inner::Held(held) => held.rest.is_some(),
        }
    }

    /// Keeps a copy of the body, up to `limit` bytes, sent on `done` when
    /// the body ends (`None` once it is over the limit, or, `counted` in
    /// the held bytes' budget as it grows, once that is spent).
    pub fn tee(
        &mut self,
        limit: usize,
        counted: bool,
        done: tokio::sync::oneshot::Sender<Option<Teed>>,
    ) {
        self.tee = Some(Box::new(Tee {
            chunks: Vec::new(),
            len: 0,
            limit,
            grant: counted.then(Grant::default),
            done,
        }));
    }

    fn teed(&mut self, frame: &Frame<Bytes>) {
        let Some(tee) = &mut self.tee else { return };
        if let Some(data) = frame.data_ref() {
            if !tee.keep(data) {
                if let Some(t) = self.tee.take() {
                    let _ = t.done.send(None);
                }
                return;
            }
        }
        if self.is_end_stream() {
            if let Some(t) = self.tee.take() {
                (*t).finish();
            }
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        self.read();
        if self.linger && self.upload.fault().is_none() && !self.is_end_stream() {
            if let (Some(rest), Ok(rt)) = (self.unread(), tokio::runtime::Handle::try_current()) {
                rt.spawn(linger(rest));
            }
        }
    }
}

/// Reads an HTTP/2 request's `body` that veer answered without reading
/// on, and drops it, as [`ClientBody::linger`] (for a request veer
/// answered itself).
pub fn linger_unread(body: Incoming) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(linger(body));
    }
}

/// Reads `body` to its end and drops what comes, for at most
/// [`crate::conn::LINGER_FOR`] and [`LINGER_BYTES`], while the client
/// sends something every [`crate::conn::LINGER_QUIET`] (2 s), as an
/// HTTP/1.1 lingering close: a client that stops sending but leaves its
/// stream open holds one of its connection's stream slots 2 s, not 10.
async fn linger<B>(mut body: B)
where
    B: Body<Data = Bytes> + Unpin,
{
    use http_body_util::BodyExt;
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(crate::conn::LINGER_FOR, async {
        while let Ok(Some(Ok(frame))) =
            tokio::time::timeout(crate::conn::LINGER_QUIET, body.frame()).await
        {
            let len = frame.data_ref().map_or(0, |d| d.len() as u64);
            match left.checked_sub(len) {
                Some(l) => left = l,
                None => return,
            }
        }
    })
    .await;
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let inner = match &mut this.inner {
            Inner::Client(inner) => inner,
            Inner::Copy(data) => return Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Inner::Held(held) => {
                if let Some(d) = held.data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                let Some(rest) = held.rest.take() else {
                    return Poll::Ready(held.trailers.take().map(|t| Ok(Frame::trailers(t))));
                };
                // The part read has gone: the rest streams.
                this.inner = Inner::Client(rest);
                match &mut this.inner {
                    Inner::Client(inner) => inner,
                    _ => return Poll::Ready(None),
                }
            }
        };
        let r = Pin::new(inner).poll_frame(cx);
        match &r {
            Poll::Pending => this.upload.start_wait(),
            Poll::Ready(Some(Err(e))) => {
                this.upload.end_wait();
                this.upload.set_fault(client_fault(e));
                this.tee = None;
                // Not "read": the request now fails by the client's fault
                // and ends by itself, counted as such. Were veer to look for
                // the client's close from here (`Activity::body_read`), a
                // client that left mid-body (the usual cause) would have its
                // request dropped before it was counted (a race with the
                // upstream side noticing the broken body). The connection
                // serves no other request: its framing is lost.
                this.reading = None;
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.upload.end_wait();
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                match this.left.checked_sub(len) {
                    Some(left) => this.left = left,
                    None => {
                        // As any body the client breaks: the client's
                        // fault, the upstream's request broken off, the
                        // connection not used again.
                        this.upload.set_fault(ProxyError::BodyTooLarge);
                        this.tee = None;
                        this.reading = None;
                        return Poll::Ready(Some(Err(Box::new(TooLarge))));
                    }
                }
                this.teed(frame);
                if this.is_end_stream() {
                    this.upload.set_whole();
                }
            }
            Poll::Ready(None) => {
                this.upload.end_wait();
                this.upload.set_whole();
                if let Some(t) = this.tee.take() {
                    (*t).finish();
                }
                this.read();
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Client(inner) => inner.is_end_stream(),
            Inner::Copy(data) => data.is_none(),
            Inner::Held(held) => {
                held.data.is_none()
                    && held.trailers.is_none()
                    && held.rest.as_ref().is_none_or(|r| r.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Client(inner) => inner.size_hint(),
            Inner::Copy(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Inner::Held(held) => {
                let read = held.data.as_ref().map_or(0, |d| d.len() as u64);
                let rest = held.rest.as_ref().map(|r| r.size_hint());
                let mut hint = SizeHint::new();
                if let Some(upper) = rest.as_ref().map_or(Some(0), |r| r.upper()) {
                    hint.set_upper(read + upper);
                }
                hint.set_lower(read + rest.map_or(0, |r| r.lower()));
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn only_the_time_spent_waiting_for_the_client_is_the_clients_and_the_rest_the_versions() {
        let u = Upload::new();
        tokio::time::advance(Duration::from_secs(1)).await;
        u.start_wait();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(u.client_time(Instant::now()), Duration::from_secs(3));
        // The version's time leaves out the wait, the one under way too.
        assert_eq!(u.version_us(Instant::now()), 1_000_000);
        u.start_wait(); // a second Pending does not restart the wait
        tokio::time::advance(Duration::from_secs(2)).await;
        u.end_wait();
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(u.client_time(Instant::now()), Duration::from_secs(5));
        assert_eq!(u.version_us(Instant::now()), 8_000_000);
    }

    #[test]
    fn a_tee_keeps_the_whole_body_up_to_its_limit_and_says_when_it_gave_up() {
        let tee = |limit| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (
                Tee {
                    chunks: Vec::new(),
                    len: 0,
                    limit,
                    // (Not counted: the budget is the process's, and a
                    // test of it runs beside this one.)
                    grant: None,
                    done: tx,
                },
                rx,
            )
        };
        let (mut t, mut rx) = tee(10);
        assert!(t.keep(&Bytes::from_static(b"hello ")));
        assert!(t.keep(&Bytes::new()));
        assert!(t.keep(&Bytes::from_static(b"tee")));
        t.finish();
        assert_eq!(
            rx.try_recv().ok().flatten().map(|t| t.bytes),
            Some(Bytes::from_static(b"hello tee"))
        );
        let (mut t, _rx) = tee(4);
        assert!(!t.keep(&Bytes::from_static(b"hello")));
        // A body copy is a plain full body.
        let copy = ClientBody::copy(Bytes::from_static(b"abc"));
        assert_eq!(copy.size_hint().exact(), Some(3));
        assert!(!copy.is_end_stream());
        assert!(ClientBody::copy(Bytes::new()).is_end_stream());
    }

    #[test]
    fn the_bytes_granted_to_bodies_read_whole_stay_within_the_budget() {
        let mut all = Grant::default();
        assert!(all.grow(HELD_BUDGET - 10), "most of the budget");
        let mut more = Grant::default();
        assert!(!more.grow(11), "over the budget");
        assert!(more.grow(10));
        assert!(!more.grow(1));
        drop(all);
        assert!(more.grow(HELD_BUDGET - 10), "given back when dropped");
        drop(more);
        assert!(Grant::default().grow(HELD_BUDGET), "all given back");
    }

    #[test]
    fn a_request_is_sent_once_its_body_ended_without_a_fault() {
        let u = Upload::new();
        assert!(!u.sent());
        u.set_whole();
        assert!(u.sent());
        let u = Upload::new();
        u.set_whole();
        u.set_fault(ProxyError::ClientAborted);
        assert!(!u.sent());
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
