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
//! unbounded fan-out of connections. Requests whose bodies still stream
//! from their clients may hold at most half of them
//! ([`Upstream::upload_slot_now`]).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use crossbeam_queue::ArrayQueue;
use http::{header, HeaderValue, Uri, Version};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::body::{BoxError, RequestBody};
use crate::error::ProxyError;
use crate::upstream_tls::ClientTls;
use veer_control::config::{OutlierDetection, MAX_EJECTION};

/// How many of an endpoint's `cap` connections may carry requests whose
/// bodies still stream from their clients: half, and at least one.
fn upload_slots(cap: usize) -> usize {
    (cap / 2).max(1)
}

/// A semaphore a reload may shrink while its permits are held: what it
/// cannot take back at once (permits in use) is owed, and the next
/// permits taken pay it off (each forgotten rather than used), so the new
/// size holds as the busy ones come back. (tokio's `forget_permits` takes
/// only free permits: without the debt, a cap lowered while every
/// connection was busy stayed at the old one for good.)
struct Capped {
    sem: Arc<Semaphore>,
    /// Permits to forget as they are taken.
    owed: AtomicUsize,
}

impl Capped {
    fn new(size: usize) -> Capped {
        Capped {
            sem: Arc::new(Semaphore::new(size)),
            owed: AtomicUsize::new(0),
        }
    }

    /// From `old` permits in all to `new`.
    fn resize(&self, old: usize, new: usize) {
        if new > old {
            // A debt still owed is forgiven before permits are added.
            let grow = new - old;
            let forgiven = match self
                .owed
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| {
                    Some(o - o.min(grow))
                }) {
                Ok(o) | Err(o) => o.min(grow),
            };
            self.sem.add_permits(grow - forgiven);
        } else if new < old {
            let shrink = old - new;
            let taken = self.sem.forget_permits(shrink);
            self.owed.fetch_add(shrink - taken, Ordering::Relaxed);
        }
    }

    /// Whether a permit just taken pays off the debt (the caller forgets
    /// it and takes another).
    fn pays(&self) -> bool {
        self.owed.load(Ordering::Relaxed) > 0
            && self
                .owed
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| o.checked_sub(1))
                .is_ok()
    }

    /// A free permit, if any.
    fn try_owned(&self) -> Option<OwnedSemaphorePermit> {
        loop {
            let p = self.sem.clone().try_acquire_owned().ok()?;
            if !self.pays() {
                return Some(p);
            }
            p.forget();
        }
    }

    /// A permit, waiting for one (`None`: the semaphore was closed).
    async fn owned(&self) -> Option<OwnedSemaphorePermit> {
        loop {
            let p = self.sem.clone().acquire_owned().await.ok()?;
            if !self.pays() {
                return Some(p);
            }
            p.forget();
        }
    }

    /// [`Capped::try_owned`], borrowed.
    fn try_borrowed(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        loop {
            let p = self.sem.try_acquire().ok()?;
            if !self.pays() {
                return Some(p);
            }
            p.forget();
        }
    }

    /// [`Capped::owned`], borrowed.
    async fn borrowed(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        loop {
            let p = self.sem.acquire().await.ok()?;
            if !self.pays() {
                return Some(p);
            }
            p.forget();
        }
    }

    /// `p`, unless it pays off the debt: then it is forgotten, and the
    /// connection holding it is to close.
    fn settle(&self, p: OwnedSemaphorePermit) -> Option<OwnedSemaphorePermit> {
        if self.pays() {
            p.forget();
            return None;
        }
        Some(p)
    }

    /// Whether permits are owed (the cap was lowered below those in use).
    fn owes(&self) -> bool {
        self.owed() > 0
    }

    /// How many.
    fn owed(&self) -> usize {
        self.owed.load(Ordering::Relaxed)
    }

    /// Permits taken and not yet given back (an estimate while they move).
    fn in_use(&self, size: usize) -> usize {
        (size + self.owed.load(Ordering::Relaxed)).saturating_sub(self.sem.available_permits())
    }
}

/// What an endpoint's connections are doing (read for `/metrics`, see
/// [`crate::pool_metrics`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Open with a request on them (an HTTP/2 connection with a stream),
    /// or being opened.
    pub busy: usize,
    /// Open and idle: pooled HTTP/1.1 connections, HTTP/2 ones without a
    /// stream.
    pub idle: usize,
    /// The connection cap.
    pub limit: usize,
    /// Requests waiting for a connection, or (those whose bodies stream)
    /// for an upload slot.
    pub waiting: usize,
}

/// Idle connections kept per endpoint.
const MAX_IDLE: usize = 256;
/// An idle pooled connection older than this is closed rather than reused.
const IDLE_TTL: Duration = Duration::from_secs(50);
/// An idle connection reused after lying idle this long may have been
/// closed by the server just as the request goes out (its keep-alive
/// timeout): an idempotent request on it keeps a copy of its head to be
/// sent again (see [`stale_keep_alive`]). Under load connections are idle
/// for microseconds and the copy (a header map's clone, ~4 % of a
/// request's instructions) is not made.
const STALE_AFTER: Duration = Duration::from_millis(100);
/// First back-off after an endpoint fails; doubles per consecutive failure.
const BACKOFF_BASE_MS: u64 = 1_000;
/// Longest back-off.
const BACKOFF_MAX_MS: u64 = 30_000;

/// The back-off after `before` failures in a row and one more.
fn backoff_ms(before: u32) -> u64 {
    (BACKOFF_BASE_MS << before.min(16)).min(BACKOFF_MAX_MS)
}
/// Streams veer runs at once on one HTTP/2 connection before it opens
/// another (under the endpoint's connection cap). The server's own
/// `SETTINGS_MAX_CONCURRENT_STREAMS` still applies below it.
pub const H2_STREAMS_PER_CONNECTION: usize = 100;

/// The scheme of absolute request URIs on HTTP/2, for a connection over
/// TLS or not.
fn scheme(tls: bool) -> http::uri::Scheme {
    if tls {
        http::uri::Scheme::HTTPS
    } else {
        http::uri::Scheme::HTTP
    }
}

/// How connections to an endpoint are made, from its scheme.
#[derive(Clone, Debug)]
pub enum Connector {
    /// `http://` or no scheme: HTTP/1.1 over TCP.
    H1,
    /// `h2c://`: HTTP/2 over TCP, prior knowledge.
    H2c,
    /// `https://`: TLS, then whatever ALPN chose.
    Tls {
        /// The client set-ups.
        tls: ClientTls,
        /// SNI and the name verified.
        name: ServerName<'static>,
        /// The endpoint's failed handshakes, said in the log at most
        /// every 10 s.
        said: Arc<crate::sparse::Sparse>,
    },
    /// The version's TLS material could not be loaded when the snapshot
    /// was built: every connect fails (a 502, counted for the version),
    /// said in the log at most every 10 s.
    Broken(Arc<str>, Arc<crate::sparse::Sparse>),
}

impl Connector {
    /// The connector for a version's protocol; `host` is the endpoint's
    /// host (the default `server_name`).
    pub fn new(
        protocol: veer_control::config::UpstreamProtocol,
        tls: Result<ClientTls, String>,
        server_name: Option<&str>,
        host: &str,
    ) -> Connector {
        use veer_control::config::UpstreamProtocol as P;
        match protocol {
            P::Http1 => Connector::H1,
            P::H2c => Connector::H2c,
            P::Https => {
                let tls = match tls {
                    Ok(t) => t,
                    Err(e) => return Connector::Broken(e.into(), Arc::default()),
                };
                let name = server_name.unwrap_or(host);
                let name = name.trim_start_matches('[').trim_end_matches(']');
                match ServerName::try_from(name.to_string()) {
                    Ok(name) => Connector::Tls {
                        tls,
                        name,
                        said: Arc::default(),
                    },
                    Err(e) => Connector::Broken(
                        format!("server name {name:?}: {e}").into(),
                        Arc::default(),
                    ),
                }
            }
        }
    }

    /// What keys an [`Upstream`] in the registry besides its address.
    fn key(&self) -> ProtoKey {
        match self {
            Connector::H1 => ProtoKey::H1,
            Connector::H2c => ProtoKey::H2c,
            Connector::Tls { tls, name, .. } => ProtoKey::Tls(tls.id, name.to_str().into_owned()),
            Connector::Broken(why, _) => ProtoKey::Broken(why.to_string()),
        }
    }

    /// The scheme of absolute request URIs on HTTP/2.
    pub fn scheme(&self) -> http::uri::Scheme {
        scheme(self.is_tls())
    }

    /// Whether its connections are over TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Connector::Tls { .. })
    }

    /// Opens a connection to `addr` within `timeout` (TCP, TLS and the
    /// HTTP handshake). `h1_only`: offer only HTTP/1.1 (an upgrade).
    /// `permit` goes with the connection: an HTTP/2 connection's driver
    /// holds it until the connection ends, an HTTP/1.1 one is handed back
    /// for the sender to hold. A failure is noted in `notes` (an
    /// endpoint's) when given: why, for `/status`, and a failed TCP
    /// connect or a timeout said in the log.
    pub async fn connect<B>(
        &self,
        addr: SocketAddr,
        timeout: Duration,
        h1_only: bool,
        permit: Option<OwnedSemaphorePermit>,
        notes: Option<&ConnectFailures>,
    ) -> Result<(Conn<B>, Option<OwnedSemaphorePermit>), ProxyError>
    where
        B: http_body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let opened = tokio::time::timeout(timeout, async {
            let stream = tcp(addr, notes).await?;
            match self {
                Connector::H1 => handshake(stream, addr, false, permit).await,
                Connector::H2c => {
                    if h1_only {
                        return Err(ProxyError::UpgradeUnsupported);
                    }
                    handshake(stream, addr, true, permit).await
                }
                Connector::Tls { tls, name, said } => {
                    let config = if h1_only { &tls.h1 } else { &tls.h2 };
                    let tls_stream = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name.clone(), stream)
                        .await
                        .map_err(|e| {
                            if let Some(skipped) = said.due(crate::sparse::EVERY) {
                                tracing::warn!(upstream = %addr, server_name = ?name, error = %e, skipped, "TLS handshake with the upstream failed");
                            }
                            if let Some(n) = notes {
                                n.note(&format_args!("TLS handshake: {e}"));
                            }
                            ProxyError::UpstreamConnect
                        })?;
                    let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    handshake(tls_stream, addr, h2, permit).await
                }
                Connector::Broken(why, said) => {
                    if let Some(skipped) = said.due(crate::sparse::EVERY) {
                        tracing::warn!(upstream = %addr, error = %why, skipped, "the upstream's TLS set-up did not load");
                    }
                    if let Some(n) = notes {
                        n.note(&format_args!("the TLS set-up did not load: {why}"));
                    }
                    Err(ProxyError::UpstreamConnect)
                }
            }
        })
        .await;
        opened.unwrap_or_else(|_| timed_out(addr, timeout, notes))
    }
}

/// An endpoint's failed connects: each said in the log (at most every
/// 10 s, see `connect_failed`), and the last one's reason kept for
/// `/status` until a request is answered again.
#[derive(Debug, Default)]
pub struct ConnectFailures {
    said: crate::sparse::Sparse,
    last: Mutex<Option<Box<str>>>,
}

impl ConnectFailures {
    /// Keeps `why` as the last failure's reason.
    #[cold]
    fn note(&self, why: &dyn std::fmt::Display) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string().into());
    }

    /// The last failure's reason, while it holds.
    fn last(&self) -> Option<String> {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            .map(str::to_string)
    }

    /// The endpoint answered again.
    #[cold]
    fn clear(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// A TCP connection to an upstream, without Nagle's delay; a failure is
/// said as [`connect_failed`] says it.
async fn tcp(addr: SocketAddr, notes: Option<&ConnectFailures>) -> Result<TcpStream, ProxyError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| connect_failed(addr, &e, notes))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A connect that did not finish within its `timeout`.
fn timed_out<T>(
    addr: SocketAddr,
    timeout: Duration,
    notes: Option<&ConnectFailures>,
) -> Result<T, ProxyError> {
    let why = format_args!("no connection within {timeout:?}");
    Err(connect_failed(addr, &why, notes))
}

/// Says in the log (with `notes`, an endpoint's: at most every 10 s, with
/// the count not said since; and kept there for `/status`) that a
/// connection to `addr` failed, and why: a refused connection, an
/// unreachable network, a timeout. The access log's `connect` and the
/// metrics said only that one had, and nginx's error log says each
/// ("connect() failed (111: Connection refused) while connecting to
/// upstream"). Without `notes` (a smoke check, which reports its own), at
/// debug level.
#[cold]
fn connect_failed(
    addr: SocketAddr,
    why: &dyn std::fmt::Display,
    notes: Option<&ConnectFailures>,
) -> ProxyError {
    if let Some(n) = notes {
        n.note(why);
    }
    match notes.map(|n| n.said.due(crate::sparse::EVERY)) {
        Some(Some(not_said)) => tracing::warn!(
            upstream = %addr,
            why = %why,
            not_said,
            "could not connect to an upstream endpoint (kind connect)"
        ),
        Some(None) => {}
        None => tracing::debug!(upstream = %addr, why = %why, "connect failed"),
    }
    ProxyError::UpstreamConnect
}

/// Registry key besides the address: two routes naming one address with
/// different protocols or TLS set-ups get different pools.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ProtoKey {
    H1,
    H2c,
    Tls(u64, String),
    Broken(String),
}

/// A freshly opened connection's sender.
pub enum Conn<B> {
    /// HTTP/1.1: one request at a time.
    H1(http1::SendRequest<B>),
    /// HTTP/2: multiplexed.
    H2(http2::SendRequest<B>),
}

async fn handshake<IO, B>(
    io: IO,
    addr: SocketAddr,
    h2: bool,
    permit: Option<OwnedSemaphorePermit>,
) -> Result<(Conn<B>, Option<OwnedSemaphorePermit>), ProxyError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| {
                tracing::debug!(upstream = %addr, error = %e, "HTTP/2 handshake failed");
                ProxyError::UpstreamConnect
            })?;
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %addr, error = %e, "upstream connection ended");
            }
        });
        Ok((Conn::H2(sender), None))
    } else {
        let (sender, conn) = h1_client()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|_| ProxyError::UpstreamConnect)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(upstream = %addr, error = %e, "upstream connection ended");
            }
        });
        Ok((Conn::H1(sender), permit))
    }
}

/// Rewrites a request head for the connection it goes out on: HTTP/1.1
/// takes an origin-form URI and `Host`; HTTP/2 an absolute URI (its
/// `:scheme` and `:authority`) and no `Host`.
pub fn fit_request<B>(req: &mut http::Request<B>, h2: bool, scheme: http::uri::Scheme) {
    if h2 {
        *req.version_mut() = Version::HTTP_2;
        if req.uri().scheme().is_some() {
            return;
        }
        let Some(host) = req.headers_mut().remove(header::HOST) else {
            return;
        };
        let authority = match http::uri::Authority::try_from(host.as_bytes()) {
            Ok(a) => a,
            Err(_) => {
                req.headers_mut().insert(header::HOST, host);
                return;
            }
        };
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(scheme);
        parts.authority = Some(authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(u) = Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    } else {
        *req.version_mut() = Version::HTTP_11;
        if req.uri().scheme().is_none() {
            return;
        }
        if !req.headers().contains_key(header::HOST) {
            if let Some(a) = req.uri().authority() {
                if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                    req.headers_mut().insert(header::HOST, v);
                }
            }
        }
        let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        if let Ok(u) = Uri::try_from(pq) {
            *req.uri_mut() = u;
        }
    }
}

/// One HTTP/2 connection of an endpoint and its streams in flight.
struct H2Conn {
    sender: http2::SendRequest<RequestBody>,
    state: Arc<H2State>,
    /// When a stream last started on it.
    last_used: Instant,
}

/// What the streams of one HTTP/2 connection share.
#[derive(Debug)]
pub struct H2State {
    /// Streams in flight.
    streams: AtomicUsize,
    /// Response heads received on it, ever.
    answered: AtomicU64,
    /// No new stream goes to it (see [`H2Watch::timed_out`]).
    retired: AtomicBool,
    /// The endpoint.
    addr: SocketAddr,
}

impl H2State {
    fn new(addr: SocketAddr) -> Arc<H2State> {
        Arc::new(H2State {
            streams: AtomicUsize::new(1),
            answered: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            addr,
        })
    }

    /// Counts a response head received on the connection, if `ok` (see
    /// [`H2Watch::timed_out`]).
    fn answered(&self, ok: bool) {
        if ok {
            self.answered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A request's view of the HTTP/2 connection it was sent on, taken when
/// it was sent (see [`Sender::h2_watch`]).
#[derive(Debug)]
pub struct H2Watch {
    state: Arc<H2State>,
    seen: u64,
}

impl H2Watch {
    /// The request timed out (the route's `timeout`). If no response at
    /// all came back on its connection meanwhile, the connection is taken
    /// to be dead (a peer that vanished without a FIN or RST, a NAT or
    /// firewall that forgot the flow: TCP keeps it open forever) and gets
    /// no new stream: later requests open a fresh connection, and the old
    /// one closes when its streams end. A connection that answers others
    /// while one request is slow is kept.
    ///
    /// Why not HTTP/2 PINGs: gRPC servers (grpc-go's default enforcement
    /// policy) close a connection with `too_many_pings` when a client pings
    /// it more often than every 5 minutes while they send nothing, which
    /// would end quiet long-lived streams (watches) every few pings.
    pub fn timed_out(&self) {
        if self.state.answered.load(Ordering::Relaxed) == self.seen
            && !self.state.retired.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(upstream = %self.state.addr, "an HTTP/2 connection answered nothing for a whole request timeout: new requests go to a fresh connection");
        }
    }
}

/// What [`Sender::try_send_request`] comes to: the response head, or the
/// failure (with the request, when it was never sent).
pub type TrySent = Result<
    http::Response<hyper::body::Incoming>,
    hyper::client::conn::TrySendError<http::Request<RequestBody>>,
>;

pin_project_lite::pin_project! {
    /// A request handed to its connection, waiting for the response head.
    // (pin_project_lite takes no doc comment on a variant's field.)
    #[allow(missing_docs)]
    #[project = SendingProj]
    pub enum Sending<A, B> {
        /// On an HTTP/1.1 connection (`f`: its answer).
        H1 { #[pin] f: A },
        /// On a stream of an HTTP/2 connection (`f`: its answer), whose
        /// response heads are counted in `state` (see
        /// [`H2Watch::timed_out`]).
        H2 { #[pin] f: B, state: Arc<H2State> },
    }
}

impl<A, B> Future for Sending<A, B>
where
    A: Future<Output = TrySent>,
    B: Future<Output = TrySent>,
{
    type Output = TrySent;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<TrySent> {
        match self.project() {
            SendingProj::H1 { f } => f.poll(cx),
            SendingProj::H2 { f, state } => {
                let r = std::task::ready!(f.poll(cx));
                state.answered(r.is_ok());
                Poll::Ready(r)
            }
        }
    }
}

/// A stream's place on an HTTP/2 connection, given back when its response
/// ends (or is dropped).
struct StreamSlot {
    state: Arc<H2State>,
    returned: Arc<Notify>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.state.streams.fetch_sub(1, Ordering::Relaxed);
        self.returned.notify_one();
    }
}

enum Inner {
    H1(http1::SendRequest<RequestBody>),
    /// A plain-TCP HTTP/1.1 connection the request's own task reads and
    /// writes ([`crate::raw`]); boxed, since a sender is moved in and out
    /// of its pool and through the response with every request.
    Raw(Box<crate::raw::RawConn>),
    H2(
        http2::SendRequest<RequestBody>,
        #[allow(dead_code)] StreamSlot,
    ),
}

/// A connection to an upstream, ready for one request (an HTTP/1.1
/// connection, holding its endpoint's connection permit while it is open;
/// or one stream of an HTTP/2 connection).
pub struct Sender {
    inner: Inner,
    /// Over TLS: absolute request URIs on HTTP/2 say `https` (a flag, not
    /// a [`http::uri::Scheme`]: the sender travels with every response).
    tls: bool,
    /// Its connection permit (HTTP/1.1), held while the connection is open.
    permit: Option<OwnedSemaphorePermit>,
    /// An HTTP/1.1 connection taken from the idle pool after lying idle
    /// for at least [`STALE_AFTER`] (see [`stale_keep_alive`]).
    lay_idle: bool,
    /// Taken from the idle pool (not opened for this request).
    pooled: bool,
}

impl Sender {
    /// The scheme of its absolute request URIs on HTTP/2.
    fn scheme(&self) -> http::uri::Scheme {
        scheme(self.tls)
    }

    /// Whether it can take a request now.
    pub fn is_ready(&self) -> bool {
        match &self.inner {
            Inner::H1(s) => s.is_ready(),
            Inner::H2(s, _) => s.is_ready(),
            Inner::Raw(_) => true,
        }
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        match &self.inner {
            Inner::H1(s) => s.is_closed(),
            Inner::H2(s, _) => s.is_closed(),
            Inner::Raw(_) => false,
        }
    }

    /// Whether it is an HTTP/1.1 connection that lay idle in the pool for
    /// at least `STALE_AFTER` (see [`stale_keep_alive`]).
    pub fn lay_idle(&self) -> bool {
        self.lay_idle
    }

    /// Whether it is a stream of an HTTP/2 connection.
    pub fn is_h2(&self) -> bool {
        matches!(self.inner, Inner::H2(..))
    }

    /// Whether it is a raw connection ([`crate::raw`]).
    pub fn is_raw(&self) -> bool {
        matches!(self.inner, Inner::Raw(_))
    }

    /// Whether it was taken from the idle pool.
    pub fn pooled(&self) -> bool {
        self.pooled
    }

    /// A raw connection's socket and buffer.
    pub fn raw_mut(&mut self) -> Option<&mut crate::raw::RawConn> {
        match &mut self.inner {
            Inner::Raw(c) => Some(&mut **c),
            _ => None,
        }
    }

    /// Sends a request; a connection that closed first gives it back.
    ///
    /// The request is handed to the connection here, not at the first
    /// poll, and the future holds only the connection's answer: a request
    /// moves once, and the request path's future stays small (it is kept
    /// per client connection, and moved on every request).
    ///
    /// A raw connection takes no request through hyper
    /// ([`Upstream::get`] hands such a connection to hyper first when the
    /// request is not for [`crate::raw`]): an error if one ever did.
    pub fn try_send_request(
        &mut self,
        mut req: http::Request<RequestBody>,
    ) -> Result<Sending<impl Future<Output = TrySent>, impl Future<Output = TrySent>>, ProxyError>
    {
        let scheme = self.scheme();
        match &mut self.inner {
            Inner::H1(s) => {
                fit_request(&mut req, false, scheme);
                Ok(Sending::H1 {
                    f: s.try_send_request(req),
                })
            }
            Inner::H2(s, slot) => {
                fit_request(&mut req, true, scheme);
                Ok(Sending::H2 {
                    f: s.try_send_request(req),
                    state: slot.state.clone(),
                })
            }
            Inner::Raw(_) => Err(ProxyError::UpstreamProtocol),
        }
    }

    /// For a stream of an HTTP/2 connection: what a timeout of its request
    /// tells about the connection (see [`H2Watch::timed_out`]).
    pub fn h2_watch(&self) -> Option<H2Watch> {
        match &self.inner {
            Inner::H1(_) | Inner::Raw(_) => None,
            Inner::H2(_, slot) => Some(H2Watch {
                state: slot.state.clone(),
                seen: slot.state.answered.load(Ordering::Relaxed),
            }),
        }
    }

    /// Sends a request (through hyper: see [`Sender::try_send_request`]
    /// for a raw connection).
    pub async fn send_request(
        &mut self,
        mut req: http::Request<RequestBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, ProxyError> {
        let scheme = self.scheme();
        match &mut self.inner {
            Inner::H1(s) => {
                fit_request(&mut req, false, scheme);
                s.send_request(req)
                    .await
                    .map_err(|e| ProxyError::from_hyper(&e))
            }
            Inner::H2(s, slot) => {
                fit_request(&mut req, true, scheme);
                let r = s.send_request(req).await;
                slot.state.answered(r.is_ok());
                r.map_err(|e| ProxyError::from_hyper(&e))
            }
            Inner::Raw(_) => Err(ProxyError::UpstreamProtocol),
        }
    }
}

/// hyper's HTTP/1.1 client as veer runs it: an answer's field with
/// whitespace between its name and colon (`X-Legacy : 1`) is taken, the
/// whitespace removed, as RFC 9112 section 5.1 has a proxy do (it was a
/// 502); a request's is refused (400), as the same section has a server
/// do. veer's own reads ([`crate::raw`]) take answers alike.
pub(crate) fn h1_client() -> http1::Builder {
    let mut b = http1::Builder::new();
    b.allow_spaces_after_header_name_in_responses(true);
    let fields = answer_fields();
    // hyper parses into a heap array for any other count (see
    // `crate::server`'s builders).
    if fields != DEFAULT_HEADER_FIELDS {
        b.max_headers(fields);
    }
    b
}

/// hyper's limit on a head's fields, `[proxy] max_header_fields`'s
/// default.
pub(crate) const DEFAULT_HEADER_FIELDS: usize = 100;

/// `[proxy] max_header_fields` as an upstream's answer is held to: set
/// when the edge's settings are (at start and on reload), read as each
/// answer is (veer's own reads) or each connection made (hyper's). A
/// process-wide setting: every route's upstreams take the same.
static ANSWER_FIELDS: AtomicUsize = AtomicUsize::new(DEFAULT_HEADER_FIELDS);

/// Puts `[proxy] max_header_fields` in force for upstream answers: those
/// read by veer from now on, and hyper's connections made from now on
/// (open ones keep theirs).
pub(crate) fn set_answer_fields(fields: usize) {
    ANSWER_FIELDS.store(fields, Ordering::Relaxed);
}

/// Most fields an upstream's answer may have.
pub(crate) fn answer_fields() -> usize {
    ANSWER_FIELDS.load(Ordering::Relaxed)
}

/// An idle raw connection handed to hyper's client (its connection task
/// spawned). hyper's HTTP/1.1 handshake does no I/O: it is ready at once.
fn h1_from_raw(
    conn: crate::raw::RawConn,
    addr: SocketAddr,
) -> Option<http1::SendRequest<RequestBody>> {
    let handshake = h1_client().handshake(TokioIo::new(conn.into_stream()));
    let mut handshake = std::pin::pin!(handshake);
    let noop = &mut std::task::Context::from_waker(std::task::Waker::noop());
    let Poll::Ready(Ok((sender, conn))) = handshake.as_mut().poll(noop) else {
        return None;
    };
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(upstream = %addr, error = %e, "upstream connection ended");
        }
    });
    Some(sender)
}

/// Whether an HTTP/2 stream failed without the server processing it
/// (RFC 9113 §8.7): reset with REFUSED_STREAM, or above the last stream of
/// a graceful GOAWAY from the server. Such a request may be sent again.
pub fn refused_unprocessed(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<h2::Error>() {
            return h.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h.is_go_away() && h.is_remote() && h.reason() == Some(h2::Reason::NO_ERROR));
        }
        source = err.source();
    }
    false
}

/// Whether an HTTP/1.1 exchange on a reused connection failed because the
/// connection closed (or was reset) before a response head came: the
/// keep-alive race, where the server closes a connection it found idle
/// (its own keep-alive timeout, often shorter than ours: Node.js's is
/// 5 s) just as a request is sent on it. The server may have read the
/// request, so only an idempotent one may be sent again (RFC 9110 §9.2.2,
/// as nginx's `proxy_next_upstream error` does). A head that did not parse
/// or a timeout is the upstream's answer, not a stale connection.
pub fn stale_keep_alive(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = err.source();
    }
    false
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// One upstream endpoint.
pub struct Upstream {
    addr: SocketAddr,
    /// `addr` as text, made once (the access log's `upstream`).
    label: Box<str>,
    connector: Connector,
    /// Idle HTTP/1.1 connections, oldest first: made at the first one
    /// returned (room for [`MAX_IDLE`] is 22 KiB, and an ingress has
    /// endpoints of many routes that carry no traffic).
    idle: OnceLock<ArrayQueue<Idle>>,
    /// Open HTTP/2 connections (h2c, or TLS where ALPN chose h2).
    h2: Mutex<Vec<H2Conn>>,
    /// The endpoint speaks h2 (h2c; or the last TLS handshake chose h2, as
    /// is first assumed): requests look for a stream first.
    speaks_h2: AtomicBool,
    /// `speaks_h2` is known, not assumed: h2c, or a TLS endpoint after
    /// its first handshake. Until then a request whose body streams takes
    /// an upload slot as on HTTP/1.1 (the safe side: an HTTP/1.1 endpoint
    /// would give it a connection of its own).
    h2_known: AtomicBool,
    /// Held while an HTTP/2 connection is being opened: requests that find
    /// no stream wait for it rather than each opening their own.
    h2_opening: tokio::sync::Mutex<()>,
    /// One permit per connection that may be open.
    permits: Capped,
    /// The cap the permits were sized for.
    cap: AtomicUsize,
    /// One permit per connection that may carry a request whose body
    /// still streams from its client: half the cap ([`upload_slots`]).
    uploads: Capped,
    /// Requests waiting for a connection.
    waiting: AtomicUsize,
    /// Requests whose bodies stream waiting for an upload slot.
    upload_waiting: AtomicUsize,
    /// Signalled when a connection comes back idle or a stream ends.
    returned: Arc<Notify>,
    /// Milliseconds since `epoch` before which the endpoint is skipped.
    down_until_ms: AtomicU64,
    /// Its answers veer would not read, said in the log at most every
    /// 10 s ([`Upstream::say_malformed`]).
    malformed: crate::sparse::Sparse,
    /// Its failed connects (see [`connect_failed`]).
    connect_failed: ConnectFailures,
    /// Its resets and timeouts, said sparsely ([`Upstream::say_failed`]).
    reset: crate::sparse::Sparse,
    timed_out: crate::sparse::Sparse,
    /// Failed tries in a row (connects, resets), each a longer back-off.
    failures: AtomicU32,
    /// How the last of them failed (a reset, else a connect).
    last_reset: AtomicBool,
    /// Taken out by its route's active health check ([`crate::health`]).
    checked_out: AtomicBool,
    /// Why, while it is.
    check_failure: Mutex<Option<String>>,
    /// Passive checks (`[route.outlier_detection]`), see [`Outlier`].
    outlier: Outlier,
    epoch: Instant,
    /// Health changes of every upstream of the registry.
    health: Arc<HealthLog>,
}

/// How a request failed on its endpoint, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failed {
    /// The endpoint answered with this 5xx status.
    Status(u16),
    /// A gRPC call ended with this grpc-status (one of the route's
    /// `grpc_error_codes`), in the head or in the trailers.
    Grpc(u8),
    /// No answer within the route's timeout.
    Timeout,
    /// The connection was reset.
    Reset,
    /// A malformed answer.
    Malformed,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Status(s) => write!(f, "{s}"),
            Failed::Grpc(c) => write!(f, "grpc-status {c}"),
            Failed::Timeout => f.write_str("no answer within the route's timeout"),
            Failed::Reset => f.write_str("the connection was reset"),
            Failed::Malformed => f.write_str("a malformed answer"),
        }
    }
}

/// What a request's outcome did to its endpoint's outlier detection
/// (see [`Upstream::outlier_answer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ejection {
    /// Ejected for this long, the n-th time in a row.
    Out(Duration, u32),
    /// The first success after an ejection ran out: back in.
    Back,
}

/// Taken by an ejection (see [`Upstream::outlier_answer`]).
static EJECTING: Mutex<()> = Mutex::new(());

/// An endpoint's outlier detection state: failed requests in a row, and
/// the ejection they led to.
#[derive(Debug, Default)]
struct Outlier {
    /// Requests in a row that failed (see [`Failed`]).
    errors: AtomicU32,
    /// Ms since the registry's epoch before which the endpoint is out (0:
    /// in; an ejection run out is set back to 0 by the next success, so
    /// that picks stop reading the clock for it).
    until_ms: AtomicU64,
    /// When the last ejection ended (or ends), ms since the epoch (0: none).
    ended_ms: AtomicU64,
    /// Ejections in a row (each within [`MAX_EJECTION`] of the last one's end).
    streak: AtomicU32,
    /// Why, while it is out.
    why: Mutex<Option<String>>,
}

/// What the registry's upstreams tell the controller about their health.
#[derive(Debug, Default)]
struct HealthLog {
    /// Moves whenever an upstream fails or recovers.
    changes: AtomicU64,
    /// The latest end of a back-off set, in ms since the registry's epoch.
    backoff_end_ms: AtomicU64,
    /// Wakes a controller that rests on a failure or recovery.
    changed: tokio::sync::Notify,
}

impl HealthLog {
    fn change(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Upstream {
    fn new(
        addr: SocketAddr,
        connector: Connector,
        epoch: Instant,
        cap: usize,
        health: Arc<HealthLog>,
    ) -> Upstream {
        let speaks_h2 = matches!(connector, Connector::H2c | Connector::Tls { .. });
        let h2_known = matches!(connector, Connector::H2c);
        Upstream {
            addr,
            label: addr.to_string().into(),
            connector,
            idle: OnceLock::new(),
            h2: Mutex::new(Vec::new()),
            speaks_h2: AtomicBool::new(speaks_h2),
            h2_known: AtomicBool::new(h2_known),
            h2_opening: tokio::sync::Mutex::new(()),
            permits: Capped::new(cap),
            cap: AtomicUsize::new(cap),
            uploads: Capped::new(upload_slots(cap)),
            waiting: AtomicUsize::new(0),
            upload_waiting: AtomicUsize::new(0),
            returned: Arc::new(Notify::new()),
            down_until_ms: AtomicU64::new(0),
            malformed: crate::sparse::Sparse::default(),
            connect_failed: ConnectFailures::default(),
            reset: crate::sparse::Sparse::default(),
            timed_out: crate::sparse::Sparse::default(),
            failures: AtomicU32::new(0),
            last_reset: AtomicBool::new(false),
            checked_out: AtomicBool::new(false),
            check_failure: Mutex::new(None),
            outlier: Outlier::default(),
            epoch,
            health,
        }
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint's address as text.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// How connections to it are made.
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether the endpoint is currently usable (not in back-off, not
    /// taken out by a health check, not ejected by outlier detection).
    pub fn is_healthy(&self) -> bool {
        if self.checked_out.load(Ordering::Relaxed) {
            return false;
        }
        let until = self
            .down_until_ms
            .load(Ordering::Relaxed)
            .max(self.outlier.until_ms.load(Ordering::Relaxed));
        until == 0 || self.now_ms() >= until
    }

    /// Outlier detection: a request this endpoint took, under `o`
    /// (`failed`: how it failed, if it did). `siblings`: its version's
    /// endpoints. The `o.consecutive_errors`-th failure in a row ejects it
    /// (see [`OutlierDetection`]) unless it is the version's only endpoint
    /// or `o.max_ejected_percent` of them are out already; then the
    /// ejection's length and how many in a row it makes. The first success
    /// after an ejection ran out says it is back.
    pub fn outlier_answer(
        &self,
        failed: Option<Failed>,
        o: &OutlierDetection,
        siblings: &[Arc<Upstream>],
    ) -> Option<Ejection> {
        let s = &self.outlier;
        let Some(last) = failed else {
            // (A success writes nothing unless a count is running: the
            // line stays shared between workers.)
            if s.errors.load(Ordering::Relaxed) != 0 {
                s.errors.store(0, Ordering::Relaxed);
            }
            let until = s.until_ms.load(Ordering::Relaxed);
            if until != 0 && self.now_ms() >= until {
                // (Once: one of several workers succeeding at once.)
                return s
                    .until_ms
                    .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
                    .ok()
                    .map(|_| Ejection::Back);
            }
            return None;
        };
        let n = s.errors.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if n < o.consecutive_errors || siblings.len() < 2 {
            return None;
        }
        // Held while the version's ejected share is counted and this one
        // added: two workers ejecting two endpoints of one version at once
        // would each count the share before the other's ejection. (Rare:
        // only an ejecting failure takes it.)
        let _one_at_a_time = EJECTING.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.now_ms();
        let before = s.until_ms.load(Ordering::Relaxed);
        if before > now {
            // Out already (requests sent before it was are still coming back).
            return None;
        }
        let cap = (siblings.len() * usize::from(o.max_ejected_percent) / 100)
            .clamp(1, siblings.len() - 1);
        let out = siblings.iter().filter(|u| u.ejected_at(now)).count();
        if out >= cap {
            return None;
        }
        let ended = s.ended_ms.load(Ordering::Relaxed);
        let streak = if ended != 0 && now.saturating_sub(ended) < MAX_EJECTION.as_millis() as u64 {
            s.streak.load(Ordering::Relaxed).saturating_add(1)
        } else {
            1
        };
        let longest = o.ejection_time.max(MAX_EJECTION);
        let time = o.ejection_time.saturating_mul(streak).min(longest);
        let until = now + time.as_millis() as u64;
        // One of several workers failing at once ejects it.
        if s.until_ms
            .compare_exchange(before, until, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        s.ended_ms.store(until, Ordering::Relaxed);
        s.streak.store(streak, Ordering::Relaxed);
        s.errors.store(0, Ordering::Relaxed);
        let times = if streak > 1 {
            format!(", ejection {streak} in a row")
        } else {
            String::new()
        };
        *s.why.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
            "{n} failed requests in a row (the last: {last}): out for {}s{times}",
            time.as_secs()
        ));
        // (`/status` shows it back when this runs out, as for a back-off.)
        self.health
            .backoff_end_ms
            .fetch_max(until, Ordering::Relaxed);
        self.health.change();
        Some(Ejection::Out(time, streak))
    }

    fn ejected_at(&self, now_ms: u64) -> bool {
        self.outlier.until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Why outlier detection took it out, while it is out.
    pub fn ejection(&self) -> Option<String> {
        if !self.ejected_at(self.now_ms()) {
            return None;
        }
        self.outlier
            .why
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Brings it back at once if outlier detection took it out (no route
    /// that uses it detects outliers any more), and forgets the count.
    pub fn clear_ejection(&self) {
        let s = &self.outlier;
        s.errors.store(0, Ordering::Relaxed);
        s.streak.store(0, Ordering::Relaxed);
        s.ended_ms.store(0, Ordering::Relaxed);
        if s.until_ms.swap(0, Ordering::Relaxed) > self.now_ms() {
            self.health.change();
        }
    }

    /// Takes the endpoint out of its version's choices (`Some(why)`: its
    /// health check failed), or brings it back (`None`).
    pub fn set_checked_out(&self, failure: Option<String>) {
        let out = failure.is_some();
        let reason_changed = {
            let mut why = self.check_failure.lock().unwrap_or_else(|p| p.into_inner());
            let changed = *why != failure;
            *why = failure;
            changed
        };
        // (A new reason while out shows in `/status` as a change does.)
        if self.checked_out.swap(out, Ordering::Relaxed) != out || reason_changed {
            self.health.change();
        }
    }

    /// Whether no health check keeps it out.
    pub fn is_checked_in(&self) -> bool {
        !self.checked_out.load(Ordering::Relaxed)
    }

    /// Why its health check took it out, while it is out.
    pub fn check_failure(&self) -> Option<String> {
        self.check_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Says in the log (at most every 10 s, with the count not said
    /// since) that an answer of this endpoint was refused as `why`: a 502
    /// whose access log line says only `protocol`, and nginx's error log
    /// says why ("upstream sent too big header"). The error to answer.
    #[cold]
    pub fn say_malformed(&self, why: &dyn std::fmt::Display) -> ProxyError {
        if let Some(not_said) = self.malformed.due(crate::sparse::EVERY) {
            tracing::warn!(
                upstream = %self.label,
                why = %why,
                not_said,
                "an upstream's answer was not HTTP veer reads: 502 (kind protocol)"
            );
        }
        ProxyError::UpstreamProtocol
    }

    /// Says in the log (at most every 10 s for each kind, with the count
    /// not said since) that a request's try was reset on a connection to
    /// this endpoint, or (`timeout`) had no answer within its route's
    /// timeout.
    #[cold]
    pub fn say_failed(&self, timeout: bool) {
        if timeout {
            if let Some(not_said) = self.timed_out.due(crate::sparse::EVERY) {
                tracing::warn!(
                    upstream = %self.label,
                    not_said,
                    "an upstream endpoint gave no answer within the route's timeout (kind timeout)"
                );
            }
        } else if let Some(not_said) = self.reset.due(crate::sparse::EVERY) {
            tracing::warn!(
                upstream = %self.label,
                not_said,
                "an upstream endpoint closed or reset the connection before its answer (kind reset)"
            );
        }
    }

    /// Says in the log that an answer's body broke off (`kind`, and `why`
    /// in words) after its head went to the client, whose answer is then
    /// cut off: not HTTP veer reads (`protocol`), the connection closed or
    /// reset (`reset`), nothing for `[proxy] body_timeout`
    /// (`timeout`). Within the budgets of [`Upstream::say_malformed`] and
    /// [`Upstream::say_failed`]: one line per 10 s an endpoint and kind.
    #[cold]
    pub fn say_body_failed(&self, kind: ProxyError, why: &dyn std::fmt::Display) {
        match kind {
            ProxyError::UpstreamProtocol => {
                if let Some(not_said) = self.malformed.due(crate::sparse::EVERY) {
                    tracing::warn!(
                        upstream = %self.label,
                        why = %why,
                        not_said,
                        "an upstream's answer's body was not HTTP veer reads: cut off (kind protocol)"
                    );
                }
            }
            ProxyError::UpstreamReset => {
                if let Some(not_said) = self.reset.due(crate::sparse::EVERY) {
                    tracing::warn!(
                        upstream = %self.label,
                        why = %why,
                        not_said,
                        "an upstream endpoint closed or reset the connection in its answer's body (kind reset)"
                    );
                }
            }
            ProxyError::UpstreamTimeout => {
                if let Some(not_said) = self.timed_out.due(crate::sparse::EVERY) {
                    tracing::warn!(
                        upstream = %self.label,
                        why = %why,
                        not_said,
                        "an upstream endpoint's answer's body stalled (kind timeout)"
                    );
                }
            }
            _ => {}
        }
    }

    /// Records a failed connect or a reset (`failed`, which says which):
    /// the endpoint is skipped for a back-off that doubles with each
    /// consecutive failure.
    pub fn mark_failed(&self, failed: ProxyError) {
        self.last_reset
            .store(failed == ProxyError::UpstreamReset, Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::Relaxed);
        let until = self.now_ms() + backoff_ms(n);
        self.down_until_ms.store(until, Ordering::Relaxed);
        self.health
            .backoff_end_ms
            .fetch_max(until, Ordering::Relaxed);
        self.health.change();
        // Idle connections to a failing endpoint are likely dead too.
        if let Some(idle) = self.idle.get() {
            while idle.pop().is_some() {}
        }
    }

    /// Records a success: the endpoint is healthy again.
    pub fn mark_ok(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.down_until_ms.store(0, Ordering::Relaxed);
            self.connect_failed.clear();
            self.health.change();
        }
    }

    /// Why it is in back-off after failed tries, while it is (`/status`):
    /// how many in a row, how the last failed, and for how long.
    pub fn back_off(&self) -> Option<String> {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        if until == 0 || self.now_ms() >= until {
            return None;
        }
        let n = self.failures.load(Ordering::Relaxed).max(1);
        let last = if self.last_reset.load(Ordering::Relaxed) {
            "closed or reset before its answer"
        } else {
            "a failed connect"
        };
        let tries = if n == 1 { "try" } else { "tries" };
        Some(format!(
            "{n} failed {tries} in a row (the last: {last}): out of picks for {}s, unless no other endpoint of its version is healthy",
            backoff_ms(n - 1) / 1_000
        ))
    }

    /// Why its last connect failed, until it answers again (`/status`).
    pub fn connect_failure(&self) -> Option<String> {
        self.connect_failed.last()
    }

    /// Takes an idle connection that is still open, if there is one (for
    /// an HTTP/2 endpoint: a stream on a connection with room). A raw
    /// connection ([`crate::raw`]) is handed to hyper unless `raw`.
    pub fn checkout(&self, raw: bool) -> Option<Sender> {
        if self.speaks_h2.load(Ordering::Relaxed) {
            if let Some(s) = self.h2_stream() {
                return Some(s);
            }
        }
        while let Some(idle) = self.idle.get().and_then(ArrayQueue::pop) {
            let idle_for = idle.since.elapsed();
            if idle_for >= IDLE_TTL {
                continue;
            }
            let s = idle.sender;
            // hyper's sender of a connection just handed to it takes its
            // first request before its task has run (it is not "ready" yet).
            let mut handed = false;
            let inner = match s.inner {
                Inner::Raw(mut conn) => {
                    if !conn.still_idle() {
                        continue;
                    }
                    if raw {
                        Inner::Raw(conn)
                    } else {
                        handed = true;
                        match h1_from_raw(*conn, self.addr) {
                            Some(h) => Inner::H1(h),
                            None => continue,
                        }
                    }
                }
                inner => inner,
            };
            let mut s = Sender { inner, ..s };
            if handed || s.is_ready() {
                s.lay_idle = idle_for >= STALE_AFTER;
                s.pooled = true;
                return Some(s);
            }
        }
        None
    }

    /// A stream on an open HTTP/2 connection with fewer than
    /// [`H2_STREAMS_PER_CONNECTION`] in flight.
    fn h2_stream(&self) -> Option<Sender> {
        let mut conns = match self.h2.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        // As for HTTP/1.1: a connection with nothing in flight for
        // IDLE_TTL is closed rather than reused (a NAT or load balancer
        // may have forgotten it, and a request sent on it would hang until
        // the route's timeout, counted against the version).
        // A connection retired as dead (see `H2Watch::timed_out`) is
        // forgotten; its streams still in flight hold it until they end.
        conns.retain(|c| {
            let idle =
                c.state.streams.load(Ordering::Relaxed) == 0 && c.last_used.elapsed() >= IDLE_TTL;
            !(c.sender.is_closed() || idle || c.state.retired.load(Ordering::Relaxed))
        });
        if self.permits.owes() {
            self.close_idle_h2(&mut conns);
        }
        let c = conns
            .iter_mut()
            .filter(|c| c.sender.is_ready())
            .find(|c| c.state.streams.load(Ordering::Relaxed) < H2_STREAMS_PER_CONNECTION)?;
        c.state.streams.fetch_add(1, Ordering::Relaxed);
        c.last_used = Instant::now();
        Some(Sender {
            inner: Inner::H2(
                c.sender.clone(),
                StreamSlot {
                    state: c.state.clone(),
                    returned: self.returned.clone(),
                },
            ),
            tls: self.connector.is_tls(),
            permit: None,
            lay_idle: false,
            pooled: false,
        })
    }

    /// What its connections are doing now.
    pub fn load(&self) -> Load {
        let limit = self.cap.load(Ordering::Relaxed);
        let open = self.permits.in_use(limit);
        let h2_idle = {
            let conns = match self.h2.lock() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            conns
                .iter()
                .filter(|c| !c.sender.is_closed() && c.state.streams.load(Ordering::Relaxed) == 0)
                .count()
        };
        let idle = (self.idle.get().map_or(0, ArrayQueue::len) + h2_idle).min(open);
        Load {
            busy: open - idle,
            idle,
            limit,
            waiting: self.waiting.load(Ordering::Relaxed)
                + self.upload_waiting.load(Ordering::Relaxed),
        }
    }

    /// Returns a connection whose last response was read to the end (an
    /// HTTP/2 stream just gives its place back).
    pub fn checkin(&self, mut sender: Sender) {
        if sender.is_closed() || sender.is_h2() {
            return;
        }
        // Over a cap a reload lowered: closed, its permit forgotten.
        if self.permits.owes() {
            match sender.permit.take().map(|p| self.permits.settle(p)) {
                Some(None) => return,
                kept => sender.permit = kept.flatten(),
            }
        }
        let idle = self.idle.get_or_init(|| ArrayQueue::new(MAX_IDLE));
        let _ = idle.push(Idle {
            sender,
            since: Instant::now(),
        });
        self.returned.notify_one();
    }

    /// Resizes the connection cap (a reload changed it). Below the
    /// connections open, idle ones are closed at once and busy ones as
    /// they come back (an HTTP/2 one when a request finds it without a
    /// stream); new ones wait until the endpoint is under the new cap.
    fn set_cap(&self, cap: usize) {
        let old = self.cap.swap(cap, Ordering::Relaxed);
        self.permits.resize(old, cap);
        self.uploads.resize(upload_slots(old), upload_slots(cap));
        while self.permits.owes() {
            let Some(idle) = self.idle.get().and_then(ArrayQueue::pop) else {
                break;
            };
            let mut sender = idle.sender;
            if let Some(p) = sender.permit.take() {
                if let Some(p) = self.permits.settle(p) {
                    sender.permit = Some(p);
                    self.checkin(sender);
                    break;
                }
            }
        }
        if self.permits.owes() {
            let mut conns = match self.h2.lock() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            self.close_idle_h2(&mut conns);
        }
    }

    /// Over a cap a reload lowered: HTTP/2 connections without a stream
    /// are dropped from `conns`, and close (their drivers end, and their
    /// permits pay the debt as the next are taken).
    fn close_idle_h2(&self, conns: &mut Vec<H2Conn>) {
        let mut over = self.permits.owed();
        conns.retain(|c| {
            let close = over > 0 && c.state.streams.load(Ordering::Relaxed) == 0;
            over -= usize::from(close);
            !close
        });
    }

    /// A slot for a request whose body still streams from its client, if
    /// one is free (`None`: wait with [`Upstream::wait_upload_slot`]).
    /// Held while the request is sent and until its answer's head: such
    /// requests hold at most half the endpoint's connections, so clients
    /// that send their bodies slowly (on purpose or not) leave the other
    /// half to everyone else. `Some(None)` for an HTTP/2 endpoint, whose
    /// requests share connections (known to be one: a TLS endpoint's
    /// first handshake tells).
    pub fn upload_slot_now(&self) -> Option<Option<tokio::sync::SemaphorePermit<'_>>> {
        if self.speaks_h2.load(Ordering::Relaxed) && self.h2_known.load(Ordering::Relaxed) {
            return Some(None);
        }
        self.uploads.try_borrowed().map(Some)
    }

    /// Waits at most `timeout` for an upload slot (see
    /// [`Upstream::upload_slot_now`]); overloaded past that.
    pub async fn wait_upload_slot(
        &self,
        timeout: Duration,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, ProxyError> {
        /// Counts a waiter for as long as it waits (also when its
        /// request is given up meanwhile).
        struct Waiter<'a>(&'a AtomicUsize);
        impl Drop for Waiter<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.upload_waiting.fetch_add(1, Ordering::Relaxed);
        let _waiter = Waiter(&self.upload_waiting);
        match tokio::time::timeout(timeout, self.uploads.borrowed()).await {
            Ok(Some(p)) => Ok(p),
            _ => Err(ProxyError::Overloaded),
        }
    }

    /// A connection for one request: an idle one (unless `fresh`, for an
    /// upgrade), else a new one under the cap, waiting at most `timeout`
    /// in the bounded queue for either. Overloaded past that.
    ///
    /// `raw`: the request may go over a raw connection ([`crate::raw`]):
    /// an idle one is taken as it is, and a new one to an `http://`
    /// endpoint is opened raw. Otherwise a raw idle connection is handed to
    /// hyper first.
    pub async fn get(
        &self,
        timeout: Duration,
        upgrade: bool,
        raw: bool,
    ) -> Result<Sender, ProxyError> {
        self.get_with(timeout, upgrade, upgrade, raw && !upgrade)
            .await
    }

    /// [`Upstream::get`]; `fresh`: a new connection; `h1_only`: HTTP/1.1
    /// (an upgrade).
    async fn get_with(
        &self,
        timeout: Duration,
        fresh: bool,
        h1_only: bool,
        raw: bool,
    ) -> Result<Sender, ProxyError> {
        if h1_only && matches!(self.connector, Connector::H2c) {
            return Err(ProxyError::UpgradeUnsupported);
        }
        if !fresh {
            if let Some(s) = self.checkout(raw) {
                return Ok(s);
            }
        }
        // HTTP/2: one request opens a connection, the others wait for it
        // and share it.
        let mut timeout = timeout;
        let _opening = if !fresh && self.speaks_h2.load(Ordering::Relaxed) {
            let start = Instant::now();
            // Waiting out another request's connect that never finished is
            // this endpoint failing to connect.
            let Ok(guard) = tokio::time::timeout(timeout, self.h2_opening.lock()).await else {
                return Err(ProxyError::UpstreamConnect);
            };
            if let Some(s) = self.checkout(raw) {
                return Ok(s);
            }
            timeout = timeout
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(1));
            Some(guard)
        } else {
            None
        };
        if let Some(p) = self.permits.try_owned() {
            return self.open(p, timeout, h1_only, raw).await;
        }
        let cap = self.cap.load(Ordering::Relaxed);
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= cap {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(ProxyError::Overloaded);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let got = loop {
            tokio::select! {
                p = self.permits.owned() => break p.ok_or(ProxyError::Overloaded).map(Ok),
                () = self.returned.notified(), if !fresh => {
                    if let Some(s) = self.checkout(raw) {
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
                self.open(permit, left.max(Duration::from_millis(1)), h1_only, raw)
                    .await
            }
            Err(idle) => Ok(idle),
        }
    }

    /// Opens a new connection within `timeout`, under the cap (waiting in
    /// the queue if it is reached).
    pub async fn connect(&self, timeout: Duration) -> Result<Sender, ProxyError> {
        self.get_with(timeout, true, false, false).await
    }

    /// [`Upstream::connect`], opened raw where the endpoint allows it
    /// ([`crate::raw`]).
    pub async fn connect_raw(&self, timeout: Duration) -> Result<Sender, ProxyError> {
        self.get_with(timeout, true, false, true).await
    }

    /// Opens a new connection holding `permit`. An HTTP/2 connection joins
    /// the endpoint's shared ones and the request gets a stream on it.
    async fn open(
        &self,
        permit: OwnedSemaphorePermit,
        timeout: Duration,
        h1_only: bool,
        raw: bool,
    ) -> Result<Sender, ProxyError> {
        if raw && !h1_only && matches!(self.connector, Connector::H1) {
            let said = Some(&self.connect_failed);
            let stream = tokio::time::timeout(timeout, tcp(self.addr, said))
                .await
                .unwrap_or_else(|_| timed_out(self.addr, timeout, said))?;
            return Ok(Sender {
                inner: Inner::Raw(Box::new(crate::raw::RawConn::new(stream))),
                tls: self.connector.is_tls(),
                permit: Some(permit),
                lay_idle: false,
                pooled: false,
            });
        }
        // Boxed: the TLS and HTTP/2 handshakes' state is large, and would
        // otherwise sit in (and be copied with) every request's future.
        let (conn, permit) = Box::pin(self.connector.connect::<RequestBody>(
            self.addr,
            timeout,
            h1_only,
            Some(permit),
            Some(&self.connect_failed),
        ))
        .await?;
        let tls = self.connector.is_tls();
        match conn {
            Conn::H1(sender) => {
                if !h1_only && tls {
                    self.speaks_h2.store(false, Ordering::Relaxed);
                    self.h2_known.store(true, Ordering::Relaxed);
                }
                Ok(Sender {
                    inner: Inner::H1(sender),
                    tls,
                    permit,
                    lay_idle: false,
                    pooled: false,
                })
            }
            Conn::H2(sender) => {
                self.speaks_h2.store(true, Ordering::Relaxed);
                self.h2_known.store(true, Ordering::Relaxed);
                let state = H2State::new(self.addr);
                {
                    let mut conns = match self.h2.lock() {
                        Ok(c) => c,
                        Err(p) => p.into_inner(),
                    };
                    conns.retain(|c| !c.sender.is_closed());
                    conns.push(H2Conn {
                        sender: sender.clone(),
                        state: state.clone(),
                        last_used: Instant::now(),
                    });
                }
                // Others waiting for this endpoint may share the new connection.
                self.returned.notify_waiters();
                Ok(Sender {
                    inner: Inner::H2(
                        sender,
                        StreamSlot {
                            state,
                            returned: self.returned.clone(),
                        },
                    ),
                    tls,
                    permit: None,
                    lay_idle: false,
                    pooled: false,
                })
            }
        }
    }
}

/// The upstreams of one address, by how each is reached.
type Ways = Vec<(ProtoKey, Weak<Upstream>)>;

/// Every live [`Upstream`], by address, so that snapshots share them.
pub struct Upstreams {
    /// By address, then by how it is reached (usually one way).
    by_addr: Mutex<HashMap<SocketAddr, Ways>>,
    /// Client TLS set-ups, shared by the endpoints that name the same files.
    pub tls: crate::upstream_tls::TlsCache,
    /// The versions' rings, shared by those of the same endpoints.
    pub rings: crate::balance::Rings,
    /// The routes' rate limiters, kept across snapshots.
    pub limiters: crate::limit::Limiters,
    /// The routes' retry budgets, kept across snapshots.
    pub retry_budgets: crate::limit::Kept<crate::retry::RetryBudget>,
    epoch: Instant,
    health: Arc<HealthLog>,
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
            tls: Default::default(),
            rings: Default::default(),
            limiters: Default::default(),
            retry_budgets: Default::default(),
            epoch: Instant::now(),
            health: Arc::default(),
        }
    }

    /// A count that moves whenever an upstream fails or recovers (a
    /// back-off that merely runs out does not move it).
    pub fn health_changes(&self) -> u64 {
        self.health.changes.load(Ordering::Relaxed)
    }

    /// Completes once an upstream failed or recovered (at once if one
    /// did since the last time this completed).
    pub async fn health_changed(&self) {
        self.health.changed.notified().await;
    }

    /// The registry's clock, in ms: when a health comparison is made.
    pub fn health_clock_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether a back-off may have run out since `checked_ms` (on
    /// [`Upstreams::health_clock_ms`]): one was set that ends after it.
    /// Without one, health changes only with [`Upstreams::health_changes`].
    pub fn backoff_ended_since(&self, checked_ms: u64) -> bool {
        self.health.backoff_end_ms.load(Ordering::Relaxed) >= checked_ms
    }

    /// The upstream for an address: the live one if any snapshot still holds
    /// it, else a new one; its connection cap becomes `cap`. Called when a
    /// snapshot is built, never per request. `connector` says how to reach
    /// it: the same address spoken to another way is another upstream.
    pub fn get(&self, addr: SocketAddr, connector: Connector, cap: usize) -> Arc<Upstream> {
        let epoch = self.epoch;
        let key = connector.key();
        let mut map = match self.by_addr.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let ways = map.entry(addr).or_default();
        ways.retain(|(_, w)| w.strong_count() > 0);
        if let Some(u) = ways
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, w)| w.upgrade())
        {
            u.set_cap(cap);
            return u;
        }
        let u = Arc::new(Upstream::new(
            addr,
            connector,
            epoch,
            cap,
            self.health.clone(),
        ));
        ways.push((key, Arc::downgrade(&u)));
        u
    }

    /// Forgets the addresses no snapshot holds an upstream of any more
    /// (once a build, before its [`Upstreams::get`]s: a sweep of the
    /// whole registry in each would be quadratic in the endpoints).
    pub fn sweep(&self) {
        let mut map = match self.by_addr.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.retain(|_, ways| {
            ways.retain(|(_, w)| w.strong_count() > 0);
            !ways.is_empty()
        });
    }

    /// Whether the live upstream at `addr` is healthy (not failing
    /// connects); None when no snapshot holds one.
    pub fn healthy(&self, addr: SocketAddr) -> Option<bool> {
        let map = match self.by_addr.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Healthy if any way of reaching it is.
        let mut found = None;
        for (_, w) in map.get(&addr)? {
            if let Some(u) = w.upgrade() {
                found = Some(found.unwrap_or(false) || u.is_healthy());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_retires_an_h2_connection_only_when_it_answered_nothing_meanwhile() {
        let state = H2State::new("127.0.0.1:1".parse().unwrap());
        let watch = |state: &Arc<H2State>| H2Watch {
            state: state.clone(),
            seen: state.answered.load(Ordering::Relaxed),
        };
        // Another stream's response came back while this one waited: the
        // connection lives, only this request was slow.
        let slow = watch(&state);
        state.answered.fetch_add(1, Ordering::Relaxed);
        slow.timed_out();
        assert!(!state.retired.load(Ordering::Relaxed));
        // Nothing came back for the whole timeout: retired.
        let silent = watch(&state);
        silent.timed_out();
        assert!(state.retired.load(Ordering::Relaxed));
    }

    #[test]
    fn a_cap_shrunk_while_its_connections_are_busy_holds_once_they_close() {
        let reg = Upstreams::new();
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let u = reg.get(addr, Connector::H1, 8);
        let taken = |u: &Upstream| {
            let mut held = Vec::new();
            while let Some(p) = u.permits.try_owned() {
                held.push(p);
            }
            held
        };
        fn slots(u: &Upstream) -> Vec<tokio::sync::SemaphorePermit<'_>> {
            let mut held = Vec::new();
            while let Some(Some(slot)) = u.upload_slot_now() {
                held.push(slot);
            }
            held
        }
        // Every connection and upload slot busy when a reload lowers the cap.
        let busy = taken(&u);
        let uploading = slots(&u);
        assert_eq!((busy.len(), uploading.len()), (8, 4));
        let u = reg.get(addr, Connector::H1, 3);
        assert!(taken(&u).is_empty(), "none free while 8 are busy");
        drop(uploading);
        drop(busy);
        // Once they closed: the new cap, not the old one.
        assert_eq!(taken(&u).len(), 3);
        assert_eq!(slots(&u).len(), 1);
        // Raised again before all came back: the debt is forgiven first.
        let busy = taken(&u);
        reg.get(addr, Connector::H1, 2);
        let u = reg.get(addr, Connector::H1, 6);
        drop(busy);
        assert_eq!(taken(&u).len(), 6);
        assert_eq!(slots(&u).len(), 3);
    }

    #[test]
    fn requests_whose_bodies_stream_get_half_the_cap_resized_with_it() {
        let reg = Upstreams::new();
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let free = |u: &Upstream| {
            let mut held = Vec::new();
            while let Some(Some(slot)) = u.upload_slot_now() {
                held.push(slot);
            }
            held.len()
        };
        let u = reg.get(addr, Connector::H1, 8);
        assert_eq!(free(&u), 4);
        // A reload that names the endpoint with another cap.
        let u = reg.get(addr, Connector::H1, 3);
        assert_eq!(free(&u), 1);
        let u = reg.get(addr, Connector::H1, 20);
        assert_eq!(free(&u), 10);
        let u = reg.get(addr, Connector::H1, 1);
        assert_eq!(free(&u), 1, "at least one");
        // An HTTP/2 endpoint's requests share connections: no slot needed.
        let h2 = reg.get("127.0.0.1:2".parse().expect("addr"), Connector::H2c, 8);
        assert!(matches!(h2.upload_slot_now(), Some(None)));
        // A TLS endpoint may turn out to speak HTTP/1.1 at its first
        // handshake: until then, slots as for HTTP/1.1.
        let tls = crate::upstream_tls::build(&Default::default()).expect("the built-in roots");
        let name = ServerName::try_from("localhost").expect("name");
        let unknown = reg.get(
            "127.0.0.1:3".parse().expect("addr"),
            Connector::Tls {
                tls,
                name,
                said: Default::default(),
            },
            8,
        );
        assert_eq!(free(&unknown), 4);
        unknown.h2_known.store(true, Ordering::Relaxed);
        assert!(matches!(unknown.upload_slot_now(), Some(None)));
    }

    #[test]
    fn registry_shares_live_upstreams_and_forgets_dropped_ones() {
        let reg = Upstreams::new();
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let a = reg.get(addr, Connector::H1, 8);
        let b = reg.get(addr, Connector::H1, 8);
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        let c = reg.get(addr, Connector::H1, 8);
        assert_eq!(Arc::strong_count(&c), 1);
        // An address no snapshot holds is forgotten at the next build's
        // sweep, not by another address's lookup.
        let other = reg.get("127.0.0.1:2".parse().expect("addr"), Connector::H1, 8);
        drop(c);
        let known = |reg: &Upstreams| reg.by_addr.lock().expect("lock").len();
        assert_eq!(known(&reg), 2);
        reg.sweep();
        assert_eq!(known(&reg), 1);
        drop(other);
        reg.sweep();
        assert_eq!(known(&reg), 0);
    }

    #[test]
    fn failures_back_off_and_success_restores() {
        let u = Upstream::new(
            "127.0.0.1:1".parse().expect("addr"),
            Connector::H1,
            Instant::now(),
            8,
            Arc::default(),
        );
        assert!(u.is_healthy());
        assert_eq!(u.back_off(), None);
        u.mark_failed(ProxyError::UpstreamConnect);
        assert!(!u.is_healthy());
        assert_eq!(
            u.back_off().as_deref(),
            Some("1 failed try in a row (the last: a failed connect): out of picks for 1s, unless no other endpoint of its version is healthy")
        );
        u.mark_failed(ProxyError::UpstreamReset);
        u.mark_failed(ProxyError::UpstreamReset);
        assert_eq!(
            u.back_off().as_deref(),
            Some("3 failed tries in a row (the last: closed or reset before its answer): out of picks for 4s, unless no other endpoint of its version is healthy")
        );
        for _ in 0..20 {
            u.mark_failed(ProxyError::UpstreamConnect);
        }
        assert!(u
            .back_off()
            .is_some_and(|why| why.starts_with("23 failed tries") && why.contains("for 30s")));
        u.mark_ok();
        assert!(u.is_healthy());
        assert_eq!(u.back_off(), None);
    }

    fn endpoints(n: u16) -> Vec<Arc<Upstream>> {
        let epoch = Instant::now();
        (1..=n)
            .map(|p| {
                let addr = SocketAddr::from(([127, 0, 0, 1], p));
                Arc::new(Upstream::new(addr, Connector::H1, epoch, 8, Arc::default()))
            })
            .collect()
    }

    fn detection(consecutive_errors: u32, max_ejected_percent: u8) -> OutlierDetection {
        OutlierDetection {
            consecutive_errors,
            ejection_time: Duration::from_secs(10),
            max_ejected_percent,
        }
    }

    /// Fails `u` until it is ejected (at most `limit` times): the ejection.
    fn fail(
        u: &Upstream,
        o: &OutlierDetection,
        all: &[Arc<Upstream>],
        limit: u32,
    ) -> Option<(Duration, u32)> {
        (0..limit).find_map(
            |_| match u.outlier_answer(Some(Failed::Status(503)), o, all) {
                Some(Ejection::Out(time, streak)) => Some((time, streak)),
                _ => None,
            },
        )
    }

    #[test]
    fn outlier_detection_ejects_after_errors_in_a_row_within_the_versions_share() {
        let all = endpoints(4);
        let o = detection(3, 50);
        // Two failures, a success, two more: no three in a row.
        for failed in [true, true, false, true, true] {
            let f = failed.then_some(Failed::Status(500));
            assert_eq!(all[0].outlier_answer(f, &o, &all), None);
        }
        assert!(all[0].is_healthy());
        assert_eq!(
            fail(&all[0], &o, &all, 1),
            Some((Duration::from_secs(10), 1))
        );
        assert!(!all[0].is_healthy());
        let why = all[0].ejection().expect("why");
        assert_eq!(
            why,
            "3 failed requests in a row (the last: 503): out for 10s"
        );
        // Half of four: a second may go, a third not.
        assert!(fail(&all[1], &o, &all, 3).is_some());
        assert_eq!(fail(&all[2], &o, &all, 20), None);
        assert!(all[2].is_healthy());
        // At least one of two, even at 10 %; never the last one.
        let two = endpoints(2);
        assert!(fail(&two[0], &detection(1, 10), &two, 1).is_some());
        assert_eq!(fail(&two[1], &detection(1, 100), &two, 20), None);
        // A version of one: never.
        let one = endpoints(1);
        assert_eq!(fail(&one[0], &detection(1, 100), &one, 20), None);
        // Brought back: in at once, its count and streak forgotten.
        all[0].clear_ejection();
        assert!(all[0].is_healthy() && all[0].ejection().is_none());
    }

    #[test]
    fn endpoints_failing_at_the_same_instant_on_two_workers_never_exceed_the_versions_share() {
        // Four endpoints, at most one out (25 %): two threads eject two of
        // them at the same instant, round after round (for at most 3 s);
        // never both. (Without the ejection's lock some rounds put both out:
        // ~0.3 % of them on this machine.)
        let all = endpoints(4);
        let o = detection(1, 25);
        let round = AtomicUsize::new(1);
        let done = AtomicUsize::new(0);
        let (mut rounds, mut both) = (0, 0);
        let until = Instant::now() + Duration::from_secs(3);
        std::thread::scope(|s| {
            s.spawn(|| {
                for r in 1.. {
                    // Waits for the round to start, then fails at once.
                    let now = loop {
                        match round.load(Ordering::Acquire) {
                            0 => return,
                            n if n >= r => break n,
                            _ => std::thread::yield_now(),
                        }
                    };
                    debug_assert_eq!(now, r);
                    let _ = all[1].outlier_answer(Some(Failed::Reset), &o, &all);
                    done.fetch_add(1, Ordering::AcqRel);
                }
            });
            for r in 1..=20_000 {
                let _ = all[0].outlier_answer(Some(Failed::Reset), &o, &all);
                while done.load(Ordering::Acquire) < r {
                    std::thread::yield_now();
                }
                rounds += 1;
                if !all[0].is_healthy() && !all[1].is_healthy() {
                    both += 1;
                }
                all[0].clear_ejection();
                all[1].clear_ejection();
                if Instant::now() > until {
                    break;
                }
                round.store(r + 1, Ordering::Release);
            }
            round.store(0, Ordering::Release);
        });
        assert_eq!(both, 0, "rounds with two out, of {rounds}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeated_ejection_lasts_longer_until_the_endpoint_has_kept_well_for_a_while() {
        let all = endpoints(2);
        let o = detection(2, 50);
        let length = |e: Option<(Duration, u32)>| e.map(|(d, _)| d.as_secs());
        assert_eq!(length(fail(&all[0], &o, &all, 2)), Some(10));
        // Failing while out changes nothing.
        assert_eq!(fail(&all[0], &o, &all, 5), None);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(all[0].is_healthy());
        // A success after it ran out says it is back (once): picks stop
        // reading the clock for it, and the streak is kept.
        assert_eq!(all[0].outlier_answer(None, &o, &all), Some(Ejection::Back));
        assert_eq!(all[0].outlier_answer(None, &o, &all), None);
        assert_eq!(all[0].outlier.until_ms.load(Ordering::Relaxed), 0);
        assert_eq!(
            fail(&all[0], &o, &all, 2),
            Some((Duration::from_secs(20), 2))
        );
        tokio::time::advance(Duration::from_secs(21)).await;
        assert_eq!(length(fail(&all[0], &o, &all, 2)), Some(30));
        // At most five minutes (or ejection_time if longer) ...
        for _ in 0..40 {
            tokio::time::advance(Duration::from_secs(301)).await;
            fail(&all[0], &o, &all, 2);
        }
        tokio::time::advance(Duration::from_secs(301)).await;
        assert_eq!(length(fail(&all[0], &o, &all, 2)), Some(300));
        // ... and back to the first length once it has kept well five minutes.
        tokio::time::advance(Duration::from_secs(300 + 301)).await;
        assert_eq!(
            fail(&all[0], &o, &all, 2),
            Some((Duration::from_secs(10), 1))
        );
    }

    #[tokio::test]
    async fn an_idle_h2_connection_is_not_reused_after_idle_ttl() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc),
                );
            }
        });
        let u = Upstream::new(addr, Connector::H2c, Instant::now(), 8, Arc::default());
        let first = u
            .get(Duration::from_secs(5), false, false)
            .await
            .expect("connect");
        drop(first);
        // Shared while fresh.
        let again = u.checkout(false).expect("a stream on the open connection");
        drop(again);
        tokio::time::pause();
        tokio::time::advance(IDLE_TTL).await;
        assert!(u.checkout(false).is_none(), "an idle connection was reused");
        assert!(u.h2.lock().expect("lock").is_empty());
    }
}
