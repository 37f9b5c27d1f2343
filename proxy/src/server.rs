//! Client-facing listeners: accept, TLS, HTTP/1.1 + HTTP/2, limits, and
//! graceful shutdown.
//!
//! Every connection holds a permit of one semaphore sized `max_connections`;
//! when none is free, veer stops accepting (new clients wait in the kernel
//! backlog) instead of failing. One IP address holds at most
//! `max_connections_per_ip` of them; a connection over that is closed as it
//! is accepted. A connection must send a complete request head within
//! `header_timeout` of being accepted (its TLS handshake and HTTP/2 preface
//! included), and is closed after `idle_timeout` with nothing in flight
//! ([`crate::conn`]); a later request's head must be complete within
//! `header_timeout` of its first byte ([`crate::conn::HeadWatch`]). On
//! shutdown the accept loops stop, every connection is asked to finish its
//! in-flight requests and close, and the caller waits for all permits to
//! come back, at most the grace period.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use veer_control::config::ProxySettings;

use crate::conn::{Activity, ClientClose, GaugeHeld, HeadWatch, Slot, Tracking};
use crate::error::ProxyError;
use crate::headers::Scheme;
use crate::protocol::{Builders, BODY_READ};
use crate::service::handle;
use crate::shared::Shared;

/// Streams one HTTP/2 client connection may have open at once.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 128;
/// Streams an HTTP/2 client may reset before veer takes them up, before
/// its connection is ended (the h2 crate's default).
const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams veer may reset for a client's errors before its connection is
/// ended (hyper's default).
const H2_MAX_LOCAL_RESETS: usize = 1024;

/// Connection-level settings, as a connection is given them when accepted
/// (see [`Edge`]).
#[derive(Clone)]
pub struct Limits {
    /// See [`ProxySettings::max_header_bytes`].
    pub max_header_bytes: usize,
    /// See [`ProxySettings::max_header_fields`].
    pub max_header_fields: usize,
    /// See [`ProxySettings::header_timeout`].
    pub header_timeout: Duration,
    /// See [`ProxySettings::idle_timeout`].
    pub idle_timeout: Duration,
    /// Open connections per client IP (at most
    /// [`ProxySettings::max_connections_per_ip`]), shared by every listener.
    pub per_ip: PerIpLimit,
    /// See [`ProxySettings::proxy_protocol`].
    pub proxy_protocol: bool,
    /// See [`ProxySettings::proxy_protocol_from`] (shared by every
    /// connection's task).
    pub proxy_protocol_from: Arc<[ipnet::IpNet]>,
}

impl Limits {
    /// From the proxy settings.
    pub fn from_settings(p: &ProxySettings) -> Limits {
        Limits {
            max_header_bytes: p.max_header_bytes,
            max_header_fields: p.max_header_fields,
            header_timeout: p.header_timeout,
            idle_timeout: p.idle_timeout,
            per_ip: PerIpLimit::new(p.max_connections_per_ip),
            proxy_protocol: p.proxy_protocol,
            proxy_protocol_from: p.proxy_protocol_from.clone().into(),
        }
    }
}

/// `[proxy]`'s connection-level settings, in force for the connections
/// accepted from now on. A reload that changes them ([`Edge::apply`])
/// applies them to new connections (those open keep theirs, as nginx's
/// old workers do): `header_timeout`, `idle_timeout`,
/// `max_header_bytes`, `max_connections_per_ip` (connections open
/// counted as before), `proxy_protocol_from`, `shutdown_grace`, and
/// `max_connections`: raised, more are accepted at once; lowered below
/// the connections open, none is accepted until fewer are open. Bound
/// listeners, `workers` and `proxy_protocol` (what a connection's first
/// bytes are) need a restart.
pub struct Edge {
    current: arc_swap::ArcSwap<EdgeSettings>,
    /// A connection slot each.
    permits: Arc<Semaphore>,
    /// `max_connections` as configured now.
    wanted: AtomicUsize,
    /// The slots there are (free or held): `max_connections` once the
    /// accept loop has settled a change (a lowered cap's slots go as
    /// connections close). Only the accept loop changes it.
    total: AtomicUsize,
    /// Told when `max_connections` changes.
    changed: tokio::sync::Notify,
}

/// What [`Edge`] gives a connection accepted now.
pub struct EdgeSettings {
    /// Its limits.
    pub limits: Limits,
    /// hyper's builders for a plain connection.
    plain: Arc<Builders>,
    /// ... and for a TLS one.
    tls: Arc<Builders>,
    /// See [`ProxySettings::shutdown_grace`].
    pub shutdown_grace: Duration,
}

impl Edge {
    /// The settings of `p`.
    pub fn new(p: &ProxySettings) -> Edge {
        crate::upstream::set_answer_fields(p.max_header_fields);
        let limits = Limits::from_settings(p);
        Edge {
            current: arc_swap::ArcSwap::from_pointee(EdgeSettings::new(limits, p)),
            permits: Arc::new(Semaphore::new(p.max_connections)),
            wanted: AtomicUsize::new(p.max_connections),
            total: AtomicUsize::new(p.max_connections),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// The settings a connection accepted now gets.
    pub fn now(&self) -> Arc<EdgeSettings> {
        self.current.load_full()
    }

    /// The connection slots.
    pub fn permits(&self) -> &Arc<Semaphore> {
        &self.permits
    }

    /// The connection slots there are, free or held (for a shutdown,
    /// once the accept loop has returned: every one free means no
    /// connection open).
    pub fn slots(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Puts `p`'s settings in force for the connections accepted from now
    /// on (`proxy_protocol` stays as started: a restart's);
    /// `max_connections` is settled by the accept loop ([`serve`]).
    pub fn apply(&self, p: &ProxySettings) {
        crate::upstream::set_answer_fields(p.max_header_fields);
        let before = self.now();
        let mut limits = Limits::from_settings(p);
        limits.proxy_protocol = before.limits.proxy_protocol;
        // The connections open stay counted.
        limits.per_ip = before.limits.per_ip.with_max(p.max_connections_per_ip);
        self.current.store(Arc::new(EdgeSettings::new(limits, p)));
        if self.wanted.swap(p.max_connections, Ordering::AcqRel) != p.max_connections {
            self.changed.notify_one();
        }
    }

    /// Makes the slots there are `max_connections` as configured now, as
    /// far as it can at once: slots added, or free ones taken away.
    /// Returns how many more must go (held now: they go as their
    /// connections close, see [`serve`]).
    fn settle(&self) -> usize {
        let (want, mut have) = (
            self.wanted.load(Ordering::Acquire),
            self.total.load(Ordering::Acquire),
        );
        if want > have {
            self.permits.add_permits(want - have);
            have = want;
        } else if want < have {
            have -= self.permits.forget_permits(have - want);
        }
        self.total.store(have, Ordering::Release);
        have - want.min(have)
    }

    /// `owed` slots, held by connections now, taken away as they close
    /// (before any new connection takes one: the semaphore is fair).
    fn paid(&self, owed: usize, taken: OwnedSemaphorePermit) {
        taken.forget();
        self.total.fetch_sub(owed, Ordering::AcqRel);
    }
}

impl EdgeSettings {
    fn new(limits: Limits, p: &ProxySettings) -> EdgeSettings {
        let (plain, tls) = builders(&limits);
        EdgeSettings {
            limits,
            plain,
            tls,
            shutdown_grace: p.shutdown_grace,
        }
    }
}

/// hyper's connection builders for `limits`: for plain connections, and
/// for TLS ones.
fn builders(limits: &Limits) -> (Arc<Builders>, Arc<Builders>) {
    let mut h1 = http1::Builder::new();
    h1
        // veer times every request head itself (`crate::conn::HeadWatch`):
        // hyper's timer is a boxed sleep armed for every request.
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        // The head is capped; the read buffer may grow past the cap for
        // bodies (see `crate::protocol`).
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(BODY_READ))
        .keep_alive(true);
    // Any other count than hyper's own 100 makes hyper parse each head
    // into a heap array (its stack one is 100 long): only when asked for.
    if limits.max_header_fields != crate::upstream::DEFAULT_HEADER_FIELDS {
        h1.max_headers(limits.max_header_fields);
    }
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.idle_timeout / 2))
        .keep_alive_timeout(Duration::from_secs(20))
        // As nginx's http2_max_concurrent_streams: one connection cannot
        // start an unbounded number of requests at once.
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(limits.max_header_bytes as u32)
        // Said, not left to the crates' defaults (the same today): a
        // connection whose client resets more than 20 streams before they
        // are taken up ("rapid reset", CVE-2023-44487), or makes veer reset
        // more than 1 024 for its errors (RUSTSEC-2024-0003), gets
        // GOAWAY ENHANCE_YOUR_CALM: resets free their stream slots at
        // once, so `max_concurrent_streams` alone would not bound the
        // requests such a client starts.
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS);
    // A TLS client's close is seen by hyper reading; a plain one's by
    // veer peeking at its socket (`crate::conn::ClientClose`), and hyper
    // does not read while a request is in flight (its `half_close`: its
    // read there cost a new read buffer for every request).
    let tls = Arc::new(Builders {
        h1: h1.clone(),
        h2: h2.clone(),
    });
    h1.half_close(true);
    (Arc::new(Builders { h1, h2 }), tls)
}

/// Whether a PROXY protocol header from `peer` names the client: from
/// anyone when `from` is empty, else from its ranges only.
fn believed(from: &[ipnet::IpNet], peer: SocketAddr) -> bool {
    let ip = peer.ip().to_canonical();
    from.is_empty() || from.iter().any(|net| net.contains(&ip))
}

/// Open connections counted by client IP address, at most `max` an
/// address.
#[derive(Clone, Debug)]
pub struct PerIpLimit {
    /// The most one address may hold.
    pub max: usize,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerIpLimit {
    /// No connection counted yet.
    pub fn new(max: usize) -> PerIpLimit {
        PerIpLimit {
            max,
            counts: Arc::default(),
        }
    }

    /// The same counts, at most `max` an address from now on.
    fn with_max(&self, max: usize) -> PerIpLimit {
        PerIpLimit {
            max,
            counts: self.counts.clone(),
        }
    }

    /// Counts a connection from `ip`; None (and nothing counted) when the
    /// address already has `max`.
    pub fn admit(&self, ip: IpAddr) -> Option<PerIp> {
        let ip = ip.to_canonical();
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PerIp {
            ip,
            map: self.counts.clone(),
        })
    }
}

/// One connection's place in its IP address's count, given back when
/// dropped.
#[derive(Debug)]
pub struct PerIp {
    ip: IpAddr,
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for PerIp {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Accepts connections on every listener (each with its TLS acceptor, if
/// any) until `shutdown` turns true.
///
/// One loop for all listeners: it takes a connection slot, then accepts
/// from whichever listener has a connection waiting. A loop per listener
/// would each hold a slot while waiting, so with N listeners N - 1 slots
/// of `max_connections` would sit reserved and unusable.
pub async fn serve(
    listeners: Vec<(TcpListener, Option<Arc<crate::tls::Certs>>)>,
    shared: Arc<Shared>,
    edge: Arc<Edge>,
    mut shutdown: watch::Receiver<bool>,
) {
    if listeners.is_empty() {
        return;
    }
    // The TLS listeners' certificates (one set, shared by them all).
    let certs = listeners.iter().find_map(|(_, c)| c.clone());
    let permits = edge.permits().clone();
    let mut next = 0usize;
    // The send timeout the listeners give the connections they accept.
    let mut send_timeout = None;
    loop {
        // A changed `max_connections` first: its slots added, or taken
        // away (free ones at once, the rest as connections close, before
        // any new connection takes one).
        let owed = edge.settle();
        if owed > 0 {
            let n = u32::try_from(owed).unwrap_or(u32::MAX);
            tokio::select! {
                p = permits.clone().acquire_many_owned(n) => match p {
                    Ok(p) => edge.paid(n as usize, p),
                    Err(_) => return,
                },
                // (Changed again meanwhile: settled anew.)
                _ = edge.changed.notified() => {}
                _ = shutdown.changed() => return,
            }
            continue;
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = edge.changed.notified() => continue,
            _ = shutdown.changed() => return,
        };
        // Whichever listener has a connection, starting after the last one
        // served (no listener starves the others).
        let any = std::future::poll_fn(|cx| {
            let n = listeners.len();
            for k in 0..n {
                let i = (next + k) % n;
                if let Some((l, _)) = listeners.get(i) {
                    if let std::task::Poll::Ready(r) = l.poll_accept(cx) {
                        return std::task::Poll::Ready((i, r));
                    }
                }
            }
            std::task::Poll::Pending
        });
        let (i, (stream, peer)) = tokio::select! {
            (i, r) = any => match r {
                Ok(x) => (i, x),
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // (The slot held for it goes back: settled first.)
            _ = edge.changed.notified() => continue,
            _ = shutdown.changed() => return,
        };
        let accepted = tokio::time::Instant::now();
        // This connection's settings: those in force now.
        let settings = edge.now();
        let limits = &settings.limits;
        // Behind a load balancer that speaks the PROXY protocol every
        // connection comes from it: the client's address, and its count,
        // are known once the header is read (in the connection's task).
        let per_ip = if limits.proxy_protocol {
            None
        } else {
            let Some(per_ip) = admit(limits, peer, &shared) else {
                drop(stream);
                continue;
            };
            Some(per_ip)
        };
        next = i + 1;
        let _ = stream.set_nodelay(true);
        // The current `body_timeout`, for connections from now on (the
        // listeners' setting is inherited by what they accept; this one
        // was accepted with the one before).
        let body_timeout = shared.snapshot.load().body_timeout;
        if send_timeout != Some(body_timeout) {
            send_timeout = Some(body_timeout);
            for (l, _) in &listeners {
                set_send_timeout(l, body_timeout);
            }
            set_send_timeout(&stream, body_timeout);
        }
        let shared = shared.clone();
        let tls = listeners.get(i).and_then(|(_, t)| t.clone());
        // With mutual TLS on, veer alone says who a client is: a client's
        // own `X-Forwarded-Client-Cert` is dropped on every listener,
        // plain ones too.
        let client_certs = certs.as_ref().is_some_and(|c| c.asks_clients());
        let scheme = if tls.is_some() {
            Scheme::Https
        } else {
            Scheme::Http
        };
        let builder = if tls.is_some() {
            settings.tls.clone()
        } else {
            settings.plain.clone()
        };
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let limits = &settings.limits;
            let mut stream = stream;
            let mut scheme = scheme;
            let (peer, per_ip) = match per_ip {
                Some(p) => (peer, p),
                None => {
                    let deadline = accepted + limits.header_timeout;
                    let read = crate::proxy_header::read(&mut stream);
                    let client = match tokio::time::timeout_at(deadline, read).await {
                        Ok(Ok(said)) if !believed(&limits.proxy_protocol_from, peer) => {
                            // Not from a balancer: whatever it says, the
                            // client is who connected.
                            tracing::debug!(%peer, said = ?said.client, "PROXY protocol header from an address not in proxy_protocol_from: its address and TLS flag ignored");
                            peer
                        }
                        Ok(Ok(said)) => {
                            if said.tls {
                                scheme = Scheme::Https;
                            }
                            said.client.unwrap_or(peer)
                        }
                        Ok(Err(crate::proxy_header::Refused::Silent)) => return,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "connection closed: no PROXY protocol header");
                            shared
                                .metrics
                                .proxy_errors()
                                .inc(ProxyError::BadProxyHeader);
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "PROXY protocol header not whole within header_timeout");
                            shared.metrics.proxy_errors().inc(ProxyError::HeaderTimeout);
                            return;
                        }
                    };
                    let Some(p) = admit(limits, client, &shared) else {
                        return;
                    };
                    (client, p)
                }
            };
            let activity = Activity::new(accepted);
            let slot = Slot::new(
                Box::new((permit, per_ip)),
                &shared.metrics.open_connections,
                activity.clone(),
            );
            // The TLS handshake's state (a rustls connection) and the
            // serving below are boxed on their own: inline, the largest
            // phase of each would stay in this task's allocation for the
            // connection's whole life (an idle keep-alive connection cost
            // 26 KiB, see benches/idle-conns.py).
            let (acceptor, asks_clients, forward_cert) = match &tls {
                Some(c) => {
                    let h = c.handshake();
                    (Some(h.acceptor), h.asks_clients, h.forward_cert)
                }
                None => (None, false, false),
            };
            let handshake = tokio::time::timeout_at(accepted + limits.header_timeout, async {
                match acceptor {
                    None => Ok(Stream::Plain(stream)),
                    Some(acceptor) => Box::pin(acceptor.accept(stream))
                        .await
                        .map(|s| Stream::Tls(Box::new(s))),
                }
            });
            // Awaited in a statement of its own: in the `match`, the
            // handshake's future would live (and take room in this task)
            // for the whole serving.
            let shaken = handshake.await;
            match shaken {
                Ok(Ok(s)) => {
                    if let Stream::Tls(t) = &s {
                        let counter = match t.get_ref().1.handshake_kind() {
                            Some(rustls::HandshakeKind::Resumed) => {
                                &shared.metrics.tls_handshakes.resumed
                            }
                            _ => &shared.metrics.tls_handshakes.full,
                        };
                        counter.inc();
                    }
                    let client_cert = match &s {
                        Stream::Tls(t) if asks_clients => client_cert(t, forward_cert),
                        _ if client_certs => crate::headers::ClientCert::Absent,
                        _ => crate::headers::ClientCert::NotAsked,
                    };
                    let c = Conn {
                        peer,
                        shared: shared.clone(),
                        scheme,
                        activity,
                        limits,
                        slot,
                        client_cert,
                    };
                    match s {
                        Stream::Plain(s) => Box::pin(c.serve(s, &builder, shutdown)).await,
                        Stream::Tls(s) => Box::pin(c.serve(*s, &builder, shutdown)).await,
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    if let Some(kind) = handshake_failure(&e) {
                        shared.metrics.proxy_errors().inc(kind);
                    }
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake not done within header_timeout");
                    shared.metrics.proxy_errors().inc(ProxyError::HeaderTimeout);
                }
            }
        });
    }
}

/// A connection from `peer` counted against its address's limit (`None`:
/// refused, counted as `too_many_connections`).
fn admit(limits: &Limits, peer: SocketAddr, shared: &Shared) -> Option<PerIp> {
    let guard = limits.per_ip.admit(peer.ip());
    if guard.is_none() {
        tracing::debug!(%peer, limit = limits.per_ip.max, "connection refused: too many from this address");
        shared
            .metrics
            .proxy_errors()
            .inc(ProxyError::TooManyConnections);
    }
    guard
}

/// What a handshake that asked for a client certificate learnt of it
/// (rustls verified any the client presented).
fn client_cert(
    tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    with_cert: bool,
) -> crate::headers::ClientCert {
    match tls.get_ref().1.peer_certificates() {
        Some(chain) if !chain.is_empty() => {
            match crate::tls::forwarded_client_cert(chain, with_cert) {
                Some((v, subject)) => crate::headers::ClientCert::Verified(
                    v,
                    crate::headers::ClientSubject(subject.into()),
                ),
                None => crate::headers::ClientCert::Absent,
            }
        }
        _ => crate::headers::ClientCert::Absent,
    }
}

/// How a failed handshake is counted: `client_cert` when it failed on
/// the client's certificate (none where one is required, or one that does
/// not verify), `tls_handshake` when it failed otherwise in the protocol;
/// not at all when the connection closed or broke (a balancer's TCP check,
/// a scanner, a client that went away).
fn handshake_failure(e: &std::io::Error) -> Option<ProxyError> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            Some(ProxyError::ClientCert)
        }
        _ => Some(ProxyError::TlsHandshake),
    }
}

/// An accepted stream, before or after TLS.
enum Stream {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

/// How long an HTTP/1.1 client connection lies idle before it is parked
/// (`crate::protocol::Served::park`: hyper's connection and its buffers,
/// 16 KiB or more, dropped until the client's next bytes). Looked at when
/// the connection's timer fires, which it does at least every
/// `min(header_timeout, idle_timeout)` while the connection is in use: a
/// connection is parked within about that long of its last request, and
/// one in steady use is never parked (a new hyper connection for each
/// request would cost more than it saves).
const PARK_AFTER: Duration = Duration::from_secs(1);

/// One client connection being served.
struct Conn<'a> {
    peer: SocketAddr,
    shared: Arc<Shared>,
    scheme: Scheme,
    activity: Arc<Activity>,
    limits: &'a Limits,
    slot: Arc<Slot>,
    /// What the TLS handshake learnt of the client's certificate.
    client_cert: crate::headers::ClientCert,
}

impl Conn<'_> {
    async fn serve<S>(self, stream: S, builders: &Builders, mut shutdown: watch::Receiver<bool>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + ClientClose + Unpin + Send + 'static,
    {
        let Conn {
            peer,
            shared,
            scheme,
            activity,
            limits,
            slot,
            client_cert,
        } = self;
        let tracked = activity.clone();
        let on_close = shared.clone();
        // The peer's forwarding-header texts, made once for the connection.
        let mut client = crate::headers::Peer::new(peer);
        client.client_cert = client_cert;
        let client = Arc::new(client);
        let svc = service_fn(move |req| {
            let inflight = tracked.begin();
            let handling = handle(
                shared.clone(),
                req,
                client.clone(),
                scheme,
                Some(slot.clone()),
            );
            Tracking::new(handling, inflight)
        });
        let stream = HeadWatch::new(stream, activity.clone());
        let conn = crate::protocol::serve(stream, svc, builders);
        tokio::pin!(conn);
        let (ht, it) = (limits.header_timeout, limits.idle_timeout);
        // While requests are in flight, look again this often (also for
        // HTTP/2 answers the client takes nothing of, see
        // `Activity::give_up_stalled_answers`).
        let busy_recheck = ht.min(it).min(on_close.snapshot.load().body_timeout);
        // `parks`: an HTTP/1.1 connection that can be parked, looked at
        // again when it has been idle for `PARK_AFTER`.
        let next = |a: &Activity, parks: bool| match a.deadline(ht, it) {
            None => tokio::time::Instant::now() + busy_recheck,
            Some(due) if parks && a.between_requests() => due.min(a.idle_since() + PARK_AFTER),
            Some(due) => due,
        };
        let sleep = tokio::time::sleep_until(next(&activity, false));
        tokio::pin!(sleep);
        // The timer is polled when it was set (to register this task's
        // waker with it) and then only once it fired: a poll of a pending
        // timer costs ~120 instructions, and this task is woken a few times
        // a request.
        let mut armed = false;
        // Parked by this loop, and not seen taking up a request since (its
        // count in `veer_parked_connections`, given back when dropped).
        let mut parked: Option<GaugeHeld> = None;
        // The shutdown signal, waited for once for the connection's whole
        // life. Once its waiter is registered (its first poll), later
        // wakes of this task look at the signal's version (an atomic load)
        // and poll the waiter only when it moved: polling it takes the
        // lock of a waiter list all connections share, and a waiter made
        // anew for every request cost ~320 instructions a request
        // (`benches/request-cost.sh`). This task's waker is the one the
        // waiter keeps: the connection is served in this task only.
        let seen = shutdown.clone();
        let stop = shutdown.changed();
        tokio::pin!(stop);
        let mut waiting = false;
        let mut stopped = std::future::poll_fn(|cx| {
            let moved = !matches!(seen.has_changed(), Ok(false));
            poll_registered(stop.as_mut(), &mut waiting, moved, cx)
        });
        loop {
            tokio::select! {
                // After each poll of the connection: did a request head
                // begin on it, and is it still not complete?
                // Or did a parked connection take up a request?
                r = std::future::poll_fn(|cx| match std::future::Future::poll(conn.as_mut(), cx) {
                    Poll::Ready(r) => Poll::Ready(Some(r)),
                    Poll::Pending if activity.head_began() => Poll::Ready(None),
                    Poll::Pending if activity.answer_began() => Poll::Ready(None),
                    Poll::Pending if parked.is_some() && !conn.is_parked() => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }) => match r {
                    Some(r) => {
                        if let Err(e) = r {
                            if timed_out_sending(e.as_ref()) {
                                tracing::debug!(%peer, "client connection closed: it took nothing of its answer for body_timeout");
                                on_close.metrics.proxy_errors().inc(ProxyError::SendTimeout);
                            } else {
                                tracing::debug!(%peer, error = %e, "client connection ended with an error");
                            }
                        }
                        return;
                    }
                    // The head has `header_timeout` from now; a connection
                    // taken out of parking is looked at again as one in use
                    // (to be parked again when it next lies idle).
                    None => {
                        parked = None;
                        let due = next(&activity, conn.may_park());
                        if due < sleep.deadline() {
                            sleep.as_mut().reset(due);
                            armed = false;
                        }
                    }
                },
                _ = &mut stopped => {
                    activity.close_at_once();
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                    return;
                }
                () = std::future::poll_fn(|cx| {
                    let fired = sleep.is_elapsed();
                    poll_registered(sleep.as_mut(), &mut armed, fired, cx)
                }) => {
                    let now = tokio::time::Instant::now();
                    match activity.deadline(ht, it) {
                        Some(due) if due <= now => {
                            let why = if activity.requests() == 0 {
                                "no complete request head within header_timeout"
                            } else if activity.reading_head() {
                                "a later request head not complete within header_timeout"
                            } else {
                                "idle for idle_timeout"
                            };
                            tracing::debug!(%peer, why, "closing client connection");
                            if activity.requests() == 0 || activity.reading_head() {
                                on_close.metrics.proxy_errors().inc(ProxyError::HeaderTimeout);
                            }
                            // Closes an idle HTTP/1.1 connection at once and
                            // sends GOAWAY on HTTP/2; a half-read head does
                            // not get more than a second.
                            activity.close_at_once();
                            conn.as_mut().graceful_shutdown();
                            let _ = tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await;
                            return;
                        }
                        _ => {
                            let mut parks = conn.may_park();
                            if parks
                                && activity.between_requests()
                                && activity.idle_since() + PARK_AFTER <= now
                            {
                                // Parked, or (never expected) not: either
                                // way not looked at again for it.
                                parks = false;
                                if conn.as_mut().park() {
                                    tracing::trace!(%peer, "idle connection parked");
                                    parked = Some(GaugeHeld::new(&on_close.metrics.parked_connections));
                                }
                            }
                            let mut due = next(&activity, parks);
                            if activity.has_answers() {
                                let limit = on_close.snapshot.load().body_timeout;
                                let (cut, waiting) = activity.give_up_stalled_answers(limit, now);
                                for _ in 0..cut {
                                    tracing::debug!(%peer, "HTTP/2 answer given up: the client took nothing of it for body_timeout");
                                    on_close.metrics.proxy_errors().inc(ProxyError::SendTimeout);
                                }
                                if let Some(w) = waiting {
                                    due = due.min(w);
                                }
                            }
                            sleep.as_mut().reset(due);
                            armed = false;
                        }
                    }
                }
            }
        }
    }
}

/// Polls `fut` if it has not been polled since `registered` was last
/// cleared (that poll leaves this task's waker with it), and after that
/// only when `maybe_ready` (a cheap look at its state) says its wake may
/// have come: for a future whose poll costs more than the look, polled
/// again on every wake of a task it shares with others.
fn poll_registered<F: Future>(
    fut: std::pin::Pin<&mut F>,
    registered: &mut bool,
    maybe_ready: bool,
    cx: &mut std::task::Context<'_>,
) -> Poll<F::Output> {
    if *registered && !maybe_ready {
        return Poll::Pending;
    }
    *registered = true;
    fut.poll(cx)
}

/// Makes the kernel close a connection (of `socket`, or accepted by it
/// from now on) whose client has taken nothing of what veer sent for
/// `limit`: its receive window stayed shut (it stopped reading), or what
/// was sent stayed unacknowledged (it vanished). `TCP_USER_TIMEOUT` (which
/// current Linux applies to a shut window too: seen on 6.18, where a
/// client reading 8 KiB/s was not cut and one reading nothing was, within
/// the limit), nginx's `send_timeout`: without
/// it such a client held its connection, and the upstream connection its
/// answer streams from, for ever. Reading slowly is not taking nothing. A
/// write then fails with `ETIMEDOUT` ([`timed_out_sending`]). A socket that
/// refuses it (never on Linux) goes without, logged.
fn set_send_timeout(socket: &impl std::os::fd::AsFd, limit: Duration) {
    use nix::sys::socket::{setsockopt, sockopt};
    // 0 would be the kernel's default (no limit).
    let ms = u32::try_from(limit.as_millis()).unwrap_or(u32::MAX).max(1);
    if let Err(e) = setsockopt(socket, sockopt::TcpUserTimeout, &ms) {
        tracing::warn!(error = %e, "could not set the client send timeout (TCP_USER_TIMEOUT)");
    }
}

/// Whether a client connection ended because the kernel's send timeout
/// closed it (see [`set_send_timeout`]).
fn timed_out_sending(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(nix::errno::Errno::ETIMEDOUT as i32) {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// Binds every address, or none: a failure names the address.
pub fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, (SocketAddr, std::io::Error)> {
    let mut out = Vec::with_capacity(addrs.len());
    for a in addrs {
        let l = bind(*a).map_err(|e| (*a, e))?;
        out.push(l);
    }
    Ok(out)
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy_settings(max_connections: usize) -> ProxySettings {
        let text = format!(
            "[proxy]\nmax_connections = {max_connections}\n[[route]]\nname = \"r\"\n[route.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:9\"]\n"
        );
        veer_control::config::Config::parse(&text, std::path::Path::new("."))
            .unwrap()
            .proxy
    }

    /// A lowered `max_connections` takes free slots away at once and owes
    /// the held ones until their connections close; raised again, it
    /// adds slots; the count of slots there are follows.
    #[tokio::test]
    async fn a_changed_connection_cap_is_settled_slot_by_slot() {
        let edge = Edge::new(&proxy_settings(10));
        let permits = edge.permits().clone();
        let held = permits.clone().acquire_many_owned(6).await.unwrap();
        edge.apply(&proxy_settings(4));
        // 4 free slots taken away; 2 of the 6 held still owed.
        assert_eq!(edge.settle(), 2);
        assert_eq!((edge.slots(), permits.available_permits()), (6, 0));
        // Three connections close: two pay the debt, one is free.
        let mut held = held;
        let closed = held.split(3).unwrap();
        let paying = permits.clone().acquire_many_owned(2);
        drop(closed);
        edge.paid(2, paying.await.unwrap());
        assert_eq!((edge.slots(), permits.available_permits()), (4, 1));
        assert_eq!(edge.settle(), 0);
        // Raised: the difference added at once.
        edge.apply(&proxy_settings(12));
        assert_eq!(edge.settle(), 0);
        assert_eq!((edge.slots(), permits.available_permits()), (12, 9));
        drop(held);
        assert_eq!(permits.available_permits(), 12);
    }

    #[test]
    fn headers_are_believed_from_the_listed_balancers_only() {
        let from: Vec<ipnet::IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert!(believed(&[], at("192.0.2.1:1")));
        assert!(believed(&from, at("10.1.2.3:1")));
        // An IPv4 balancer seen on a dual-stack socket.
        assert!(believed(&from, at("[::ffff:10.1.2.3]:1")));
        assert!(believed(&from, at("[2001:db8::5]:1")));
        assert!(!believed(&from, at("192.0.2.1:1")));
        assert!(!believed(&from, at("[2001:db9::5]:1")));
    }
}
