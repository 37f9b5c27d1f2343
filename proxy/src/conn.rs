//! What a client connection is doing, so that one that does nothing useful
//! can be closed: no complete request head within `header_timeout` of
//! accepting it (whatever it sent: nothing, part of a TLS handshake, part
//! of an HTTP/2 preface, half a head), a later HTTP/1.1 head not complete
//! within `header_timeout` of its first bytes, or nothing in flight for
//! `idle_timeout` (an idle HTTP/1.1 keep-alive connection, or an HTTP/2
//! connection with no open stream).
//!
//! The service marks each request's start ([`Activity::begin`]) and the
//! response body's end (the [`InFlight`] guard, dropped by hyper when it has
//! written the body or given up on it); the stream ([`HeadWatch`]) notes
//! bytes that come while nothing is in flight; the connection's task asks
//! [`Activity::deadline`] when to look again. Atomics only: no timer per
//! request.
//!
//! It also gives up an HTTP/2 answer whose client takes nothing of it for
//! `body_timeout` while the connection lives (a stream window left shut:
//! [`Activity::give_up_stalled_answers`]); a client that takes nothing on
//! the whole connection is the kernel's to close (`crate::server`).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::body::{BoxError, ProxyBody};
use crate::protocol::{GiveBack, Replay};

/// A client connection's place: its `max_connections` permit, its count in
/// its address's `max_connections_per_ip`, and its `veer_open_connections`
/// count. Shared by the connection and any tunnel upgraded from it, so an
/// upgraded WebSocket keeps holding the slot until the tunnel ends.
///
/// It also keeps the route timeout's timer between the connection's
/// requests ([`Slot::take_timer`]).
pub struct Slot {
    _parts: Box<dyn Send + Sync>,
    _counted: GaugeHeld,
    activity: Arc<Activity>,
    timer: std::sync::Mutex<Option<Pin<Box<tokio::time::Sleep>>>>,
}

impl Slot {
    /// Takes the place (the gauge counts it until the last holder drops).
    pub fn new(
        parts: Box<dyn Send + Sync>,
        gauge: &prometheus::IntGauge,
        activity: Arc<Activity>,
    ) -> Arc<Slot> {
        Arc::new(Slot {
            _parts: parts,
            _counted: GaugeHeld::new(gauge),
            activity,
            timer: std::sync::Mutex::new(None),
        })
    }

    /// A timer for a request's upstream deadline, set to `deadline`: the
    /// one the connection's last request gave back, or a new one (the
    /// first request, or one of several HTTP/2 streams at once).
    ///
    /// Why kept: a new timer is registered in the runtime's timer wheel
    /// under its lock and removed again when the request is done, for
    /// every request; a kept one moved to a later deadline only notes the
    /// new time (tokio moves it in the wheel when the old time comes), so
    /// back-to-back requests on a keep-alive connection touch the wheel
    /// about once per timeout instead of twice per request.
    pub fn take_timer(&self, deadline: Instant) -> Pin<Box<tokio::time::Sleep>> {
        let kept = self.timer.lock().ok().and_then(|mut t| t.take());
        match kept {
            Some(mut t) => {
                t.as_mut().reset(deadline);
                t
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    /// The connection's activity.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// Keeps `timer` for the connection's next request.
    pub fn give_timer(&self, timer: Pin<Box<tokio::time::Sleep>>) {
        if let Ok(mut t) = self.timer.lock() {
            *t = Some(timer);
        }
    }
}

/// One count in a gauge (`veer_open_connections`,
/// `veer_parked_connections`), held until dropped.
pub struct GaugeHeld(prometheus::IntGauge);

impl GaugeHeld {
    /// Counts one in `gauge`.
    pub fn new(gauge: &prometheus::IntGauge) -> GaugeHeld {
        gauge.inc();
        GaugeHeld(gauge.clone())
    }
}

impl Drop for GaugeHeld {
    fn drop(&mut self) {
        self.0.dec();
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
        moved(&self.last, self.base);
    }
}

/// Notes in `last` that bytes moved now (ms after `base`).
fn moved(last: &AtomicU64, base: Instant) {
    last.fetch_max(base.elapsed().as_millis() as u64, Ordering::Relaxed);
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let (last, base) = (&this.last, this.base);
        read_noting(&mut this.inner, cx, buf, |_| moved(last, base))
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
    /// Bytes of a request head came with nothing in flight, and the head
    /// is not complete yet (set by [`HeadWatch`], taken by
    /// [`Activity::head_began`], cleared by [`Activity::begin`]).
    head_bytes: AtomicBool,
    /// Milliseconds after `accepted` when the incomplete head's
    /// `header_timeout` began ([`NO_HEAD`]: none).
    head_since_ms: AtomicU64,
    /// The HTTP/1.1 request in flight has a body hyper is still reading
    /// (and sees the client close by that read): [`HeadWatch`] does not
    /// look meanwhile.
    body_open: AtomicBool,
    /// The connection's task, woken when the body has been read (the body
    /// is read by another task) so that [`HeadWatch`] looks then.
    body_waiter: std::sync::Mutex<Option<std::task::Waker>>,
    /// Bytes were written to the client and not flushed yet (set by
    /// [`HeadWatch`]'s writes, cleared by its flush: hyper flushes the
    /// stream only once its own buffer is empty).
    unflushed: AtomicBool,
    /// An HTTP/2 connection's answers streaming from upstreams (see
    /// [`Answers`]); empty for HTTP/1.1.
    answers: std::sync::Mutex<Answers>,
    /// An answer was added to `answers` since the connection's task last
    /// asked ([`Activity::answer_began`]).
    answer_began: AtomicBool,
    /// The client speaks HTTP/2 (set by [`HeadWatch`] when it knows).
    h2: AtomicBool,
    /// The connection is closing: not to be parked. Set by [`HeadWatch`]
    /// as it lingers (see its `poll_shutdown`), or before, by
    /// [`Activity::close_at_once`].
    closing: AtomicBool,
}

/// [`Activity`]'s `head_since_ms` when no head is being read.
const NO_HEAD: u64 = u64::MAX;

impl Activity {
    /// A connection accepted at `accepted`.
    pub fn new(accepted: Instant) -> Arc<Activity> {
        Arc::new(Activity {
            accepted,
            inflight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_bytes: AtomicBool::new(false),
            head_since_ms: AtomicU64::new(NO_HEAD),
            body_open: AtomicBool::new(false),
            body_waiter: std::sync::Mutex::new(None),
            unflushed: AtomicBool::new(false),
            answers: std::sync::Mutex::new(Answers::default()),
            answer_began: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        })
    }

    /// veer closes the connection between requests (idle, a head not
    /// whole in time, shutting down): nothing the client sent is left
    /// unread, and the close does not linger (see [`HeadWatch`]'s
    /// `poll_shutdown`).
    pub fn close_at_once(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    /// Whether an HTTP/2 answer began to stream since the last call:
    /// asked by the connection's task after each poll of the connection,
    /// to look at it within `body_timeout`.
    pub fn answer_began(&self) -> bool {
        self.answer_began.load(Ordering::Relaxed)
            && self.answer_began.swap(false, Ordering::Relaxed)
    }

    /// Gives up every HTTP/2 answer whose client has taken nothing of it
    /// for `limit` by `now` (see `Answers`): how many were given up, and
    /// when the next one waiting will have waited `limit` (`None` if none
    /// waits).
    pub fn give_up_stalled_answers(
        &self,
        limit: Duration,
        now: Instant,
    ) -> (usize, Option<Instant>) {
        let Ok(mut answers) = self.answers.lock() else {
            return (0, None);
        };
        let mut cut = 0;
        let mut next: Option<Instant> = None;
        answers.live.retain(|w| {
            let Some(a) = w.upgrade() else {
                return false;
            };
            let handed = a.handed_ms.load(Ordering::Relaxed);
            if handed == NOT_WAITING {
                return true;
            }
            let due = self.accepted + Duration::from_millis(handed) + limit;
            if due > now {
                next = Some(next.map_or(due, |n| n.min(due)));
                return true;
            }
            // Dropped here: its upstream connection is closed and its
            // request recorded as it stood (the client's doing).
            let body = a.body.lock().ok().and_then(|mut b| b.take());
            cut += usize::from(body.is_some());
            drop(body);
            false
        });
        answers.kept_after_sweep = answers.live.len();
        (cut, next)
    }

    /// Whether an HTTP/2 answer streams from an upstream on this connection.
    pub fn has_answers(&self) -> bool {
        self.answers.lock().is_ok_and(|a| !a.live.is_empty())
    }

    /// A request head was read completely: it is in flight until the guard
    /// drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.inflight.fetch_add(1, Ordering::AcqRel);
        self.body_open.store(false, Ordering::Relaxed);
        self.head_bytes.store(false, Ordering::Relaxed);
        self.head_since_ms.store(NO_HEAD, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Bytes came from an HTTP/1.1 client (see [`HeadWatch`]): with
    /// nothing in flight they begin a request head, unless one has begun.
    #[inline]
    fn bytes_arrived(&self) {
        if self.inflight.load(Ordering::Relaxed) == 0
            && self.head_since_ms.load(Ordering::Relaxed) == NO_HEAD
        {
            self.head_bytes.store(true, Ordering::Relaxed);
        }
    }

    /// Whether a request head began since the last call and is still not
    /// complete; its `header_timeout` then runs from now. Asked by the
    /// connection's task after each poll of the connection (the head's
    /// bytes and, when it is complete, [`Activity::begin`] come within
    /// that poll, so a complete head costs no clock read).
    pub fn head_began(&self) -> bool {
        // A plain load first: asked after every poll, and nearly always
        // false (the swap's locked exchange only when it is not).
        if !self.head_bytes.load(Ordering::Relaxed)
            || !self.head_bytes.swap(false, Ordering::Relaxed)
            || self.inflight.load(Ordering::Acquire) > 0
        {
            return false;
        }
        let now = self.accepted.elapsed().as_millis() as u64;
        self.head_since_ms.store(now, Ordering::Relaxed);
        true
    }

    /// Whether a later request head has begun and is not complete.
    pub fn reading_head(&self) -> bool {
        self.head_since_ms.load(Ordering::Relaxed) != NO_HEAD
    }

    /// When the connection is due to be closed if nothing changes: `None`
    /// while a request is in flight. Before its first request, the
    /// connection has `header_timeout` from being accepted; after, it may
    /// sit idle for `idle_timeout`, until a request head begins (see
    /// [`Activity::head_began`]), which must then be complete within
    /// `header_timeout` of its first bytes.
    pub fn deadline(&self, header_timeout: Duration, idle_timeout: Duration) -> Option<Instant> {
        if self.inflight.load(Ordering::Acquire) > 0 {
            return None;
        }
        if self.requests.load(Ordering::Relaxed) == 0 {
            return Some(self.accepted + header_timeout);
        }
        // A head that has begun ends the idle time (as nginx's
        // keepalive_timeout gives way to client_header_timeout).
        match self.head_since_ms.load(Ordering::Relaxed) {
            NO_HEAD => {
                let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
                Some(self.accepted + since + idle_timeout)
            }
            head => Some(self.accepted + Duration::from_millis(head) + header_timeout),
        }
    }

    /// The request in flight has a body to read, until
    /// [`Activity::body_read`]. Said on the request's first poll, which
    /// hyper makes before it flushes (so before [`HeadWatch`] looks).
    pub fn body_opened(&self) {
        self.body_open.store(true, Ordering::Release);
    }

    /// The request's body has been read to its end (or given up).
    pub fn body_read(&self) {
        self.body_open.store(false, Ordering::Release);
        let waiter = self.body_waiter.lock().ok().and_then(|mut w| w.take());
        if let Some(w) = waiter {
            w.wake();
        }
    }

    /// Whether a request is in flight and none of its body is left to read:
    /// its client's close is then [`HeadWatch`]'s to see. While a body is
    /// read, `cx`'s task is woken when it has been.
    #[inline]
    fn awaiting_answer(&self, cx: &Context<'_>) -> bool {
        if self.inflight.load(Ordering::Relaxed) == 0 {
            return false;
        }
        if !self.body_open.load(Ordering::Acquire) {
            return true;
        }
        if let Ok(mut w) = self.body_waiter.lock() {
            match &*w {
                Some(old) if old.will_wake(cx.waker()) => {}
                _ => *w = Some(cx.waker().clone()),
            }
        }
        // Read meanwhile: its wake may have come before the waker was kept.
        !self.body_open.load(Ordering::Acquire)
    }

    /// Whether the connection is between requests, with nothing of the
    /// last one left (its answer written and flushed, its body read) and
    /// nothing of the next one read: an HTTP/1.1 connection may then be
    /// parked (`crate::protocol::Served::park`).
    pub fn between_requests(&self) -> bool {
        self.requests.load(Ordering::Relaxed) > 0
            && !self.closing.load(Ordering::Relaxed)
            && self.inflight.load(Ordering::Acquire) == 0
            && !self.body_open.load(Ordering::Acquire)
            && !self.head_bytes.load(Ordering::Relaxed)
            && self.head_since_ms.load(Ordering::Relaxed) == NO_HEAD
            && !self.unflushed.load(Ordering::Relaxed)
    }

    /// When the last request in flight ended.
    pub fn idle_since(&self) -> Instant {
        self.accepted + Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed))
    }

    /// Requests this connection has begun.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// A client connection's stream, which tells its [`Activity`] when bytes
/// of a request head come on an idle HTTP/1.1 connection, so that every
/// head, not only the first, must be complete within `header_timeout`
/// (hyper's own header timer, a boxed sleep armed for every request, cost
/// about 1 700 instructions a request, and did not always bound later
/// heads). An HTTP/2 connection (its first bytes are the preface's `PRI`)
/// is left alone: its frames between requests (pings, window updates) are
/// not heads, and it has no head to stall on outside a stream.
///
/// It also watches a plain HTTP/1.1 client for closing its connection while
/// a request is in flight (see [`ClientClose`]), so that the request is
/// given up upstream too, as hyper would see it by reading.
pub struct HeadWatch<S> {
    inner: S,
    activity: Arc<Activity>,
    /// How many bytes of [`H2_PREFACE_START`] the client's first bytes
    /// matched: below its length, undecided; [`HTTP1`] and [`HTTP2`]
    /// once decided.
    matched: u8,
    /// The client sent bytes hyper has not read yet (a pipelined request):
    /// its closing cannot be seen behind them, and it is not looked for
    /// again until hyper reads.
    unread: bool,
    /// The first bytes, read to tell HTTP/1.1 from HTTP/2 and given back
    /// (`crate::protocol`): hyper reads them before the socket's.
    replay: Replay,
    /// Once veer closes the connection: how long it goes on reading what
    /// the client still sends (see `poll_shutdown`).
    linger: Option<Box<Linger>>,
}

/// The longest a closing HTTP/1.1 connection reads what its client still
/// sends, in all (nginx's `lingering_time` is 30 s) ...
pub(crate) const LINGER_FOR: Duration = Duration::from_secs(10);
/// ... and with nothing coming (nginx's `lingering_timeout`, 5 s).
pub(crate) const LINGER_QUIET: Duration = Duration::from_secs(2);

/// A lingering close under way (see [`HeadWatch`]'s `poll_shutdown`).
struct Linger {
    /// When it ends whatever the client sends.
    until: Instant,
    /// Fires after [`LINGER_QUIET`]; ends the close unless bytes came
    /// meanwhile (`came`), when it is set again.
    quiet: Pin<Box<tokio::time::Sleep>>,
    came: bool,
}

/// Reads and drops what the client behind `inner` still sends after veer
/// shut its side (`Ready` once the client closes or resets, or `linger`
/// says the close has waited long enough).
fn poll_linger<S: tokio::io::AsyncRead + Unpin>(
    inner: &mut S,
    linger: &mut Linger,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let mut scrap = [0u8; 16 * 1024];
    let mut reads = 0u32;
    loop {
        let mut buf = tokio::io::ReadBuf::new(&mut scrap);
        match Pin::new(&mut *inner).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(()),
            Poll::Ready(Ok(())) => {
                linger.came = true;
                reads += 1;
                if reads % 32 == 0 {
                    // A client sending without pause: the clock read, and
                    // the worker given to other tasks meanwhile.
                    if Instant::now() >= linger.until {
                        return Poll::Ready(());
                    }
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                continue;
            }
            Poll::Ready(Err(_)) => return Poll::Ready(()),
            Poll::Pending => {}
        }
        if Instant::now() >= linger.until {
            return Poll::Ready(());
        }
        if std::future::Future::poll(linger.quiet.as_mut(), cx).is_pending() {
            return Poll::Pending;
        }
        if !std::mem::take(&mut linger.came) {
            return Poll::Ready(());
        }
        let next = Instant::now() + LINGER_QUIET;
        linger.quiet.as_mut().reset(next);
    }
}

/// The first bytes of the HTTP/2 connection preface (RFC 9113 §3.4): no
/// HTTP/1.1 request starts with them (`PRI` is reserved for the preface).
const H2_PREFACE_START: &[u8] = b"PRI ";
/// [`HeadWatch::matched`] once the client is known to speak HTTP/1.1.
const HTTP1: u8 = u8::MAX;
/// [`HeadWatch::matched`] once the client is known to speak HTTP/2.
const HTTP2: u8 = u8::MAX - 1;

impl<S> HeadWatch<S> {
    /// Wraps a client connection's stream.
    pub fn new(inner: S, activity: Arc<Activity>) -> HeadWatch<S> {
        HeadWatch {
            inner,
            activity,
            matched: 0,
            unread: false,
            replay: Replay::default(),
            linger: None,
        }
    }

    /// Notes `new`, bytes just read.
    #[cfg(test)]
    fn read(&mut self, new: &[u8]) {
        note_read(&mut self.matched, &self.activity, new);
    }
}

/// Notes `new`, bytes just read from a client whose first bytes matched
/// `matched` of the HTTP/2 preface (see [`HeadWatch`]).
#[inline]
fn note_read(matched: &mut u8, activity: &Activity, new: &[u8]) {
    if *matched == HTTP1 {
        activity.bytes_arrived();
        return;
    }
    if *matched == HTTP2 {
        return;
    }
    for &b in new {
        if H2_PREFACE_START[usize::from(*matched)] != b {
            *matched = HTTP1;
            activity.bytes_arrived();
            return;
        }
        *matched += 1;
        if usize::from(*matched) == H2_PREFACE_START.len() {
            *matched = HTTP2;
            activity.h2.store(true, Ordering::Relaxed);
            return;
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for HeadWatch<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        // Noted when they were first read.
        if this.replay.read_into(buf) {
            return Poll::Ready(Ok(()));
        }
        this.unread = false;
        let (inner, matched, activity) = (&mut this.inner, &mut this.matched, &this.activity);
        read_noting(inner, cx, buf, |new| note_read(matched, activity, new))
    }
}

impl<S> GiveBack for HeadWatch<S> {
    fn give_back(&mut self, bytes: Bytes) {
        self.replay.give_back(bytes);
    }
}

/// A client's stream whose TCP socket [`HeadWatch`] may look at for the
/// client closing its connection with a request in flight.
///
/// Why veer looks rather than hyper: hyper's HTTP/1.1 server reads from
/// the client while a request is in flight to see it close, and that
/// read first makes room in its read buffer, which the request's head
/// still shares: a new 8 KiB buffer for every request (`half_close`
/// off). Together with the read it cost ~1 200 instructions a request
/// (`benches/request-cost.sh`, benches/RESULTS.md). Peeking at the socket
/// (one byte, `MSG_PEEK`, only once the kernel says it is readable) sees
/// the same close without touching hyper's buffer. Plain TCP only: a TLS
/// client's close comes as a record (`close_notify`) that only a read can
/// see, so hyper keeps reading there.
pub trait ClientClose {
    /// The socket to peek at; `None`: not watched.
    fn watched(&self) -> Option<&tokio::net::TcpStream>;
}

impl ClientClose for tokio::net::TcpStream {
    fn watched(&self) -> Option<&tokio::net::TcpStream> {
        Some(self)
    }
}

impl<S> ClientClose for tokio_rustls::server::TlsStream<S> {
    fn watched(&self) -> Option<&tokio::net::TcpStream> {
        None
    }
}

/// Whether the client behind `tcp` closed its connection (or reset it):
/// `Pending` (woken when bytes or the close come) while it has neither
/// sent anything nor closed, `Ready(Ok(true))` once it has sent bytes not
/// read yet (nothing can be seen behind them).
fn poll_client_gone(
    tcp: &tokio::net::TcpStream,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<bool>> {
    let mut byte = [0u8; 1];
    let mut peeked = tokio::io::ReadBuf::new(&mut byte);
    match std::task::ready!(tcp.poll_peek(cx, &mut peeked)) {
        Ok(0) => Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "the client closed its connection with a request in flight",
        ))),
        Ok(_) => Poll::Ready(Ok(true)),
        Err(e) => Poll::Ready(Err(e)),
    }
}

/// Reads from `inner` into `buf`, and hands `note` the bytes it read, if
/// any.
fn read_noting<S: tokio::io::AsyncRead + Unpin>(
    inner: &mut S,
    cx: &mut Context<'_>,
    buf: &mut tokio::io::ReadBuf<'_>,
    note: impl FnOnce(&[u8]),
) -> Poll<std::io::Result<()>> {
    let before = buf.filled().len();
    let r = Pin::new(inner).poll_read(cx, buf);
    if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
        note(&buf.filled()[before..]);
    }
    r
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + ClientClose + Unpin> tokio::io::AsyncWrite
    for HeadWatch<S>
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.activity.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.activity.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// Flushes, and then looks whether the client closed its connection
    /// with a request in flight whose body has been read (see
    /// [`ClientClose`]; while hyper reads a body, it sees the close and
    /// fails the body, the client's fault): an error then, which
    /// ends the connection and gives the request up. hyper flushes after
    /// every poll of the connection (with nothing to write, a flush of the
    /// stream only), so this is looked at whenever the connection's task
    /// runs, and the peek wakes the task when the client closes.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        // A load first: nearly always already clear (hyper flushes after
        // every poll), and a store would dirty the line every time.
        if this.activity.unflushed.load(Ordering::Relaxed) {
            this.activity.unflushed.store(false, Ordering::Relaxed);
        }
        if this.matched == HTTP1 && !this.unread && this.activity.awaiting_answer(cx) {
            if let Some(tcp) = this.inner.watched() {
                if let Poll::Ready(r) = poll_client_gone(tcp, cx) {
                    this.unread = r?;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Shuts veer's side, and then (HTTP/1.1, plain or over TLS, unless
    /// [`Activity::close_at_once`] was said) reads and drops what the
    /// client still sends until it closes, for up to `LINGER_FOR` (10 s)
    /// and while bytes keep coming within `LINGER_QUIET` (2 s): nginx's
    /// lingering close. A client still sending a body veer did not read
    /// (a 413, an answer that came before the body's end) then reads its
    /// answer, where closing with its bytes unread would make the kernel
    /// reset the connection under it, and the client would see a broken
    /// connection instead.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            std::task::ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            if this.matched != HTTP1 || this.activity.closing.swap(true, Ordering::Relaxed) {
                return Poll::Ready(Ok(()));
            }
            this.linger = Some(Box::new(Linger {
                until: Instant::now() + LINGER_FOR,
                quiet: Box::pin(tokio::time::sleep(LINGER_QUIET)),
                came: false,
            }));
        }
        if let Some(linger) = this.linger.as_deref_mut() {
            std::task::ready!(poll_linger(&mut this.inner, linger, cx));
        }
        Poll::Ready(Ok(()))
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

/// An HTTP/2 connection's answers that stream from upstreams, for its task
/// to give up those whose client takes nothing of them for `body_timeout`.
///
/// Why: hyper asks an HTTP/2 answer's body for its next frame only once
/// the client's flow-control window for the stream has room. A client
/// that never opens it (`SETTINGS_INITIAL_WINDOW_SIZE` 0, or no
/// `WINDOW_UPDATE` for the stream) while it keeps the connection alive
/// (it reads, and answers pings) held each such stream's upstream
/// connection for ever: 128 streams a connection, so a few connections
/// took an endpoint's whole `max_upstream_connections`. The kernel's send
/// timeout ([`crate::server`]) sees only a connection that takes nothing;
/// this sees a stream that does. nginx resets such a stream after
/// `send_timeout`.
#[derive(Debug, Default)]
struct Answers {
    live: Vec<std::sync::Weak<Answer>>,
    /// `live`'s length after the last sweep: dead entries are swept out
    /// when it has doubled since (a busy connection's finished answers
    /// do not pile up between its task's looks).
    kept_after_sweep: usize,
}

impl Answers {
    /// Notes `answer`.
    fn add(&mut self, answer: &Arc<Answer>) {
        if self.live.len() >= (2 * self.kept_after_sweep).max(64) {
            self.live.retain(|w| w.strong_count() > 0);
            self.kept_after_sweep = self.live.len();
        }
        self.live.push(Arc::downgrade(answer));
    }
}

/// An HTTP/2 answer's body, shared by hyper's stream (which polls it) and
/// the connection's task (which may give it up, see [`Answers`]).
struct Answer {
    /// Milliseconds after the connection was accepted when the answer
    /// last handed hyper something (its head, then a frame) and was not
    /// asked for the next frame since ([`NOT_WAITING`]: asked, and waiting
    /// for the upstream, or ended).
    handed_ms: AtomicU64,
    /// `None` once given up.
    body: std::sync::Mutex<Option<ProxyBody>>,
}

/// [`Answer`]'s `handed_ms` while the body is not waiting for the client.
const NOT_WAITING: u64 = u64::MAX;

/// A response body that keeps its request in flight until it is dropped.
pub struct Tracked {
    body: Held,
    inflight: InFlight,
}

/// A [`Tracked`] body: its own, or (an HTTP/2 answer streaming from an
/// upstream) shared with its connection's task.
enum Held {
    Own(ProxyBody),
    Shared(Arc<Answer>),
}

impl Tracked {
    /// Wraps `body` (noted in its connection's `Answers` if it streams
    /// from an upstream to an HTTP/2 client).
    #[inline]
    pub fn new(body: ProxyBody, inflight: InFlight) -> Tracked {
        if matches!(body, ProxyBody::Upstream(_))
            && inflight.0.h2.load(Ordering::Relaxed)
            && !body.is_end_stream()
        {
            return Tracked::shared(body, inflight);
        }
        Tracked {
            body: Held::Own(body),
            inflight,
        }
    }

    /// An HTTP/2 answer streaming from an upstream, noted in its
    /// connection's `Answers`. Out of line: HTTP/1.1 answers (most) pay
    /// nothing for it.
    #[inline(never)]
    fn shared(body: ProxyBody, inflight: InFlight) -> Tracked {
        // Its head is handed now: hyper asks for the body once the
        // client's window has room.
        let now = inflight.0.accepted.elapsed().as_millis() as u64;
        let answer = Arc::new(Answer {
            handed_ms: AtomicU64::new(now),
            body: std::sync::Mutex::new(Some(body)),
        });
        if let Ok(mut answers) = inflight.0.answers.lock() {
            answers.add(&answer);
        }
        inflight.0.answer_began.store(true, Ordering::Relaxed);
        Tracked {
            body: Held::Shared(answer),
            inflight,
        }
    }
}

/// The error a given-up HTTP/2 answer ends with (hyper resets its stream).
#[derive(Debug, thiserror::Error)]
#[error("the client took nothing of this answer for body_timeout")]
pub struct AnswerGivenUp;

impl Answer {
    /// The body's next frame, noting whether it waits for the client after
    /// it (the connection's accepted at `accepted`).
    #[inline(never)]
    fn poll_frame(
        &self,
        accepted: Instant,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Ok(mut held) = self.body.lock() else {
            return Poll::Ready(Some(Err(Box::new(AnswerGivenUp))));
        };
        let Some(body) = held.as_mut() else {
            return Poll::Ready(Some(Err(Box::new(AnswerGivenUp))));
        };
        let r = Pin::new(&mut *body).poll_frame(cx);
        let handed = match &r {
            Poll::Ready(Some(Ok(_))) if !body.is_end_stream() => {
                accepted.elapsed().as_millis() as u64
            }
            _ => NOT_WAITING,
        };
        self.handed_ms.store(handed, Ordering::Relaxed);
        r
    }

    /// Whether the body has ended (a given-up one has not: its next poll
    /// fails it).
    #[inline(never)]
    fn is_end_stream(&self) -> bool {
        self.body
            .lock()
            .is_ok_and(|b| b.as_ref().is_some_and(|b| b.is_end_stream()))
    }

    #[inline(never)]
    fn size_hint(&self) -> SizeHint {
        self.body
            .lock()
            .ok()
            .and_then(|b| b.as_ref().map(|b| b.size_hint()))
            .unwrap_or_default()
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.body {
            Held::Own(b) => Pin::new(b).poll_frame(cx),
            Held::Shared(a) => a.poll_frame(this.inflight.0.accepted, cx),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.body {
            Held::Own(b) => b.is_end_stream(),
            Held::Shared(a) => a.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Held::Own(b) => b.size_hint(),
            Held::Shared(a) => a.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts its wakes.
    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_close_is_looked_for_once_the_request_body_is_read_and_the_task_is_woken_then() {
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let cx = Context::from_waker(&waker);
        let a = Activity::new(Instant::now());
        // Nothing in flight: nothing to look for.
        assert!(!a.awaiting_answer(&cx));
        // A bodiless request: looked for at once.
        let r = a.begin();
        assert!(a.awaiting_answer(&cx));
        drop(r);
        assert!(!a.awaiting_answer(&cx));
        // A body being read: not yet, and the task is woken once it is read.
        let r = a.begin();
        a.body_opened();
        assert!(!a.awaiting_answer(&cx));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        a.body_read();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(a.awaiting_answer(&cx));
        // Read twice (its end, then the body dropped): no second wake.
        a.body_read();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        drop(r);
    }

    #[test]
    fn a_connection_is_between_requests_only_with_nothing_of_either_left() {
        let a = Activity::new(Instant::now());
        // Before its first request: not parked (it has header_timeout).
        assert!(!a.between_requests());
        let r = a.begin();
        assert!(!a.between_requests());
        a.body_opened();
        drop(r);
        // Answered, but its body is still being read.
        assert!(!a.between_requests());
        a.body_read();
        assert!(a.between_requests());
        // Written, not flushed; then flushed.
        a.unflushed.store(true, Ordering::Relaxed);
        assert!(!a.between_requests());
        a.unflushed.store(false, Ordering::Relaxed);
        assert!(a.between_requests());
        // The next head's first bytes.
        a.bytes_arrived();
        assert!(!a.between_requests());
        assert!(a.head_began());
        assert!(!a.between_requests());
        drop(a.begin());
        assert!(a.between_requests());
    }

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

    #[tokio::test(start_paused = true)]
    async fn a_later_head_has_header_timeout_from_its_first_bytes() {
        let (ht, it) = (Duration::from_secs(10), Duration::from_secs(30));
        let a = Activity::new(Instant::now());
        let mut io = HeadWatch::new((), a.clone());
        // A complete head: read, then begun within the same poll of the
        // connection, before the task asks.
        io.read(b"GET / HTTP/1.1\r\n\r\n");
        let first = a.begin();
        assert!(!a.head_began(), "a complete head");
        drop(first);
        tokio::time::advance(Duration::from_secs(5)).await;
        // Half a head, with nothing in flight.
        io.read(b"GET / HT");
        io.read(b"TP/1.1\r\n");
        assert!(a.head_began());
        assert!(!a.head_began(), "once a head");
        assert!(a.reading_head());
        let head = Instant::now();
        assert_eq!(a.deadline(ht, it), Some(head + ht));
        // Begun 25 s into the idle time: its full header_timeout, past the
        // idle deadline.
        let idle = a.begin();
        drop(idle);
        let idle_since = Instant::now();
        tokio::time::advance(Duration::from_secs(25)).await;
        io.read(b"GET");
        assert!(a.head_began());
        assert_eq!(a.deadline(ht, it), Some(Instant::now() + ht));
        assert!(Instant::now() + ht > idle_since + it);
        // Complete: idle again afterwards, with idle_timeout.
        drop(a.begin());
        assert!(!a.reading_head());
        assert_eq!(a.deadline(ht, it), Some(Instant::now() + it));
        // A request body's bytes, read while the request is in flight, are
        // not a head.
        let r = a.begin();
        io.read(b"body");
        assert!(!a.head_began());
        drop(r);
        assert_eq!(a.deadline(ht, it), Some(Instant::now() + it));
    }

    #[test]
    fn an_h2_client_is_told_from_its_first_bytes_however_they_are_split() {
        let a = Activity::new(Instant::now());
        drop(a.begin());
        for (reads, h2) in [
            (&[&b"PRI * HTTP/2.0\r\n"[..]][..], true),
            (&[&b"P"[..], b"R", b"I * HTTP/2.0"][..], true),
            (&[&b"PUT / HTTP/1.1\r\n"[..]][..], false),
            (&[&b"PR"[..], b"OPFIND / HTTP/1.1"][..], false),
            (&[&b"GET"[..]][..], false),
        ] {
            let mut io = HeadWatch::new((), a.clone());
            for r in reads {
                io.read(r);
            }
            assert_eq!(io.matched == HTTP2, h2, "{reads:?}");
            assert_eq!(io.matched == HTTP1, !h2, "{reads:?}");
            // Bytes of an HTTP/1.1 client with nothing in flight begin a
            // head; an HTTP/2 client's never do.
            io.read(b"more");
            assert_eq!(a.head_began(), !h2, "{reads:?}");
            drop(a.begin());
        }
    }
}
