//! Header rewriting between client and upstream.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and every header it
//! names, `Keep-Alive`, `Proxy-Connection`, `TE`, `Transfer-Encoding`,
//! `Upgrade`) are removed both ways (`Trailer`, which names the fields an
//! answer's trailers will hold, is end-to-end and kept: hyper's HTTP/1.1
//! server sends a client trailers only when it asked with `TE: trailers`,
//! and only the fields the answer's `Trailer` names), except the
//! `Connection: upgrade` / `Upgrade` pair of a protocol upgrade, and except
//! the headers a client must not be able to make veer drop by naming them
//! in `Connection` ([`PROTECTED`]: `Host`, the framing headers,
//! `Authorization` and the forwarding headers).
//!
//! A request has one `Host`, and it agrees with the absolute-form URI or
//! HTTP/2 `:authority` when there is one (else 400): the host that routing
//! used is the one the upstream receives. Requests get `X-Forwarded-For`
//! (every incoming line merged in order, the peer appended),
//! `X-Forwarded-Proto`, `X-Forwarded-Host` and `X-Real-IP` (replaced), and a
//! `Forwarded` element (RFC 7239) for this hop: with `trusted_hops = 0` the
//! client's own `Forwarded` is dropped, behind trusted proxies it is kept
//! and this hop's element appended.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri, Version};

use crate::error::ProxyError;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// A verified client certificate's identity, sent upstream (Envoy's name
/// and shape; see [`crate::tls::forwarded_client_cert`]).
pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// `[proxy] request_id`'s header.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// W3C Trace Context's field: its trace id is the access log's `trace_id`.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The longest client `X-Request-Id` kept (ingress-nginx and Envoy keep
/// theirs well under it; a UUID is 36 bytes).
const MAX_REQUEST_ID: usize = 128;

/// The request's id (`[proxy] request_id`): the client's `X-Request-Id`
/// if it sent exactly one of 1 to 128 visible ASCII characters (as
/// ingress-nginx keeps it, so that a chain of proxies shares one id),
/// else a new one of 32 hex digits (128 random bits) put in its place.
pub fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    // One lookup of the name (it hashes in full: not a standard header).
    match headers.entry(&X_REQUEST_ID) {
        header::Entry::Occupied(mut sent) => {
            let mut all = sent.iter();
            if let (Some(v), None) = (all.next(), all.next()) {
                let b = v.as_bytes();
                if (1..=MAX_REQUEST_ID).contains(&b.len()) && b.iter().all(u8::is_ascii_graphic) {
                    return v.clone();
                }
            }
            let id = new_request_id();
            // Replaces every value the client sent.
            sent.insert(id.clone());
            id
        }
        header::Entry::Vacant(slot) => slot.insert(new_request_id()).clone(),
    }
}

/// 128 random bits as 32 lower-case hex digits.
fn new_request_id() -> HeaderValue {
    let mut hex = [0u8; 32];
    random_hex(&mut hex);
    HeaderValue::from_bytes(&hex).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Fills `out` with random lower-case hex digits (a request id, a sticky
/// key veer makes): 128 random bits for every 32 of them.
pub(crate) fn random_hex(out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for chunk in out.chunks_mut(32) {
        let bytes = fastrand::u128(..).to_le_bytes();
        for (digits, byte) in chunk.chunks_mut(2).zip(bytes) {
            digits[0] = HEX[usize::from(byte >> 4)];
            if let Some(low) = digits.get_mut(1) {
                *low = HEX[usize::from(byte & 0xf)];
            }
        }
    }
}

static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Headers that naming them in `Connection` does not remove.
pub const PROTECTED: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "authorization",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "forwarded",
];

/// Heads of at most this many names are scanned for a name rather than
/// looked up in: comparing a few names costs less than hashing one (a
/// `HeaderMap` lookup of a request's Host cost 138 instructions, a scan
/// 45; a custom name 202 and 134; benches/RESULTS.md, session 24).
/// Longer heads are looked up, and cost what they did.
pub const SCAN_UP_TO: usize = 8;

/// The first value of `name` in `headers` (as `HeaderMap::get`).
#[inline]
pub fn get<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    if headers.keys_len() <= SCAN_UP_TO {
        headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    } else {
        headers.get(name)
    }
}

/// Whether `headers` has `name` (as `HeaderMap::contains_key`; the names
/// alone are scanned, cheaper still than [`get`]'s walk over the values).
#[inline]
pub fn has(headers: &HeaderMap, name: &HeaderName) -> bool {
    if headers.keys_len() <= SCAN_UP_TO {
        headers.keys().any(|n| n == name)
    } else {
        headers.contains_key(name)
    }
}

/// The first value of `name` in `headers`, and whether there is another.
fn first_of<'a>(headers: &'a HeaderMap, name: &HeaderName) -> (Option<&'a HeaderValue>, bool) {
    if headers.keys_len() <= SCAN_UP_TO {
        let mut values = headers.iter().filter(|(n, _)| *n == name).map(|(_, v)| v);
        (values.next(), values.next().is_some())
    } else {
        let mut values = headers.get_all(name).iter();
        (values.next(), values.next().is_some())
    }
}

/// The host a request is routed by: its absolute-form URI's or HTTP/2
/// `:authority`'s, or else its one `Host` header's. Two `Host` headers, a
/// `Host` that is not text, or one that differs from the URI's authority,
/// are a bad request.
pub fn routing_host<'a>(
    uri: &'a Uri,
    headers: &'a HeaderMap,
) -> Result<Option<&'a str>, ProxyError> {
    let (host, more) = first_of(headers, &header::HOST);
    if more {
        return Err(ProxyError::BadRequest);
    }
    let host = match host {
        Some(h) => Some(h.to_str().map_err(|_| ProxyError::BadRequest)?),
        None => None,
    };
    match (uri.authority(), host) {
        (Some(a), Some(h)) if !a.as_str().eq_ignore_ascii_case(h) => Err(ProxyError::BadRequest),
        (Some(_), _) => Ok(uri.host()),
        (None, h) => Ok(h),
    }
}

/// The client's address for `client-ip` stickiness: the peer with
/// `trusted_hops` = 0, else the `trusted_hops`-th address from the right of
/// every `X-Forwarded-For` line merged, the peer appended (the peer when the
/// list is shorter, or that entry is not an address).
pub fn client_addr(headers: &HeaderMap, peer: SocketAddr, trusted_hops: usize) -> SocketAddr {
    if trusted_hops == 0 {
        return peer;
    }
    let mut entries: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let n = entries.len();
    // The peer is entry `n`; the trusted_hops-th from the right of n + 1
    // entries is index n - trusted_hops.
    let Some(i) = n.checked_sub(trusted_hops) else {
        return peer;
    };
    let Some(e) = entries.drain(..).nth(i) else {
        return peer;
    };
    e.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, 0))
        .or_else(|_| e.parse::<SocketAddr>())
        .unwrap_or(peer)
}

/// A client connection's peer and the text the forwarding headers carry
/// for it, made once per connection rather than once per request.
#[derive(Debug)]
pub struct Peer {
    /// The peer's address.
    pub addr: SocketAddr,
    /// Its IP (IPv4-mapped IPv6 as IPv4), as `X-Forwarded-For` and
    /// `X-Real-IP` carry it.
    ip: HeaderValue,
    /// This hop's `Forwarded` element without `host`, by scheme:
    /// `for=IP;proto=http`, `for=IP;proto=https` (an IPv6 quoted and
    /// bracketed, RFC 7239).
    forwarded: [Bytes; 2],
    /// The last `Forwarded` value made on this connection, by scheme and
    /// host (keep-alive requests mostly repeat their host), and this hop's
    /// forwarding fields written out for it (see [`Forwarding::written`]).
    last: std::sync::Mutex<Option<Last>>,
    /// The peer's [`crate::record::client_hash`].
    pub client_hash: u64,
    /// What veer learnt of the client's certificate (see [`ClientCert`]).
    pub client_cert: ClientCert,
}

/// What veer learnt of a connection's client certificate. With
/// `[proxy.tls] client_ca` set, a client's own `X-Forwarded-Client-Cert`
/// is never passed on, on any listener: only veer's.
#[derive(Clone, Debug, Default)]
pub enum ClientCert {
    /// No listener asks for one: the field passes as any other.
    #[default]
    NotAsked,
    /// None presented (`client_auth = "optional"`), or a plain connection
    /// while the TLS listeners ask for one: a client's field is dropped.
    Absent,
    /// Verified: its `X-Forwarded-Client-Cert`, sent upstream, and its
    /// subject (for the access log).
    Verified(HeaderValue, ClientSubject),
}

/// A verified client certificate's subject (RFC 4514), put in the
/// extensions of its connection's requests for their access log lines.
#[derive(Clone, Debug)]
pub struct ClientSubject(pub Arc<str>);

impl Peer {
    /// The texts for `addr`.
    pub fn new(addr: SocketAddr) -> Peer {
        let ip = addr.ip().to_canonical();
        let text = ip.to_string();
        let for_ = if ip.is_ipv6() {
            format!("for=\"[{text}]\"")
        } else {
            format!("for={text}")
        };
        Peer {
            addr,
            ip: HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("unknown")),
            forwarded: [
                Bytes::from(format!("{for_};proto=http")),
                Bytes::from(format!("{for_};proto=https")),
            ],
            last: std::sync::Mutex::new(None),
            client_hash: crate::record::client_hash(ip),
            client_cert: ClientCert::NotAsked,
        }
    }

    /// The forwarding fields last made for `scheme` and `host`, written
    /// out, if that is what the last request had (never waits on a lock).
    fn last_forwarded(
        &self,
        scheme: Scheme,
        host: Option<&HeaderValue>,
    ) -> Option<Arc<Forwarding>> {
        let last = self.last.try_lock().ok()?;
        match &*last {
            Some(l) if l.scheme == scheme && l.kept.host.as_ref() == host => Some(l.kept.clone()),
            _ => None,
        }
    }

    fn remember_forwarded(&self, scheme: Scheme, kept: &Arc<Forwarding>) {
        if let Ok(mut last) = self.last.try_lock() {
            *last = Some(Last {
                scheme,
                kept: kept.clone(),
            });
        }
    }
}

/// What [`Peer`] keeps of its connection's last request.
#[derive(Debug)]
struct Last {
    scheme: Scheme,
    /// Its fields, written (its host a copy: see [`prepare_request`]).
    kept: Arc<Forwarding>,
}

/// The scheme the client used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Plain listener.
    Http,
    /// TLS listener.
    Https,
}

impl Scheme {
    fn value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        })
    }
}

/// Whether an HTTP/1.1 request asks for a protocol upgrade (e.g. WebSocket).
pub fn is_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && has(headers, &header::UPGRADE)
        && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Whether `name` is a hop-by-hop header (not counting those `Connection` names).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Whether a head's `Transfer-Encoding` names anything but one `chunked`
/// (`gzip, chunked`, `chunked, chunked`, `gzip`, over one field or
/// several). veer decodes only the chunking: passed on, the other codings'
/// bytes would reach the next hop as if they were the body, with nothing
/// left to say they are not (nginx and Envoy refuse such messages too).
pub fn foreign_coding(headers: &HeaderMap) -> bool {
    let mut chunked = 0;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        for t in value
            .as_bytes()
            .split(|b| *b == b',')
            .map(<[u8]>::trim_ascii)
        {
            if t.is_empty() {
                continue; // a list may have empty elements (RFC 9110, 5.6.1)
            }
            if !t.eq_ignore_ascii_case(b"chunked") {
                return true;
            }
            chunked += 1;
        }
    }
    chunked > 1
}

/// [`strip_hop_by_hop`] for an upstream's answer: refused (a protocol
/// error) when its `Transfer-Encoding` names a coding veer cannot pass on
/// (see [`foreign_coding`]; veer never asks for one: a client's `TE` other
/// than `trailers` stays with veer). Returns whether it was framed twice.
pub fn strip_answer(headers: &mut HeaderMap) -> Result<bool, ProxyError> {
    if !headers.keys().any(is_hop_by_hop) {
        return Ok(false);
    }
    if foreign_coding(headers) {
        return Err(ProxyError::UpstreamProtocol);
    }
    Ok(strip_hop_by_hop(headers, false))
}

/// Whether a message's head has both `Transfer-Encoding` and
/// `Content-Length`: read by its transfer coding, and its connection not
/// used again (see [`strip_hop_by_hop`]).
pub fn framed_twice(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING) && headers.contains_key(header::CONTENT_LENGTH)
}

/// Removes hop-by-hop headers; `keep_upgrade` keeps the upgrade pair.
///
/// A head framed by `Transfer-Encoding` loses its `Content-Length` too:
/// the transfer coding overrides it, and an intermediary must remove it
/// before forwarding (RFC 9112, section 6.3); forwarded, it would frame
/// the body it no longer describes (an upstream's `Content-Length: 3`
/// beside a chunked body of 10 bytes cut the client's copy to 3). Returns
/// whether the head had both, a sign of a peer that cannot be trusted to
/// frame its next message either.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) -> bool {
    // Most heads have none: one pass over the names is cheaper than a
    // lookup for each hop-by-hop name.
    if !headers.keys().any(is_hop_by_hop) {
        return false;
    }
    let framed_twice = framed_twice(headers);
    if framed_twice {
        headers.remove(header::CONTENT_LENGTH);
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(keep_upgrade && n == header::UPGRADE))
            .filter(|n| !PROTECTED.contains(&n.as_str()))
            .collect();
        for n in named {
            headers.remove(n);
        }
        headers.remove(header::CONNECTION);
        if keep_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TE);
    headers.remove(header::TRANSFER_ENCODING);
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
    framed_twice
}

/// Removes from an upstream's trailer section the fields a trailer may
/// not carry (RFC 9110, section 6.5.1) that would break the client's
/// connection or mislead its reader: hop-by-hop ones (as
/// [`strip_hop_by_hop`]), `Content-Length`, `Host` and `Trailer`. HTTP/2 refuses
/// connection-specific fields outright: forwarded to an HTTP/2 client, a
/// `Connection` or `Transfer-Encoding` trailer from an HTTP/1.1 upstream
/// failed the whole answer (its stream reset) where an HTTP/1.1 client got
/// it. gRPC's trailers (`grpc-status`, ...) are untouched.
pub fn strip_trailers(trailers: &mut HeaderMap) {
    strip_hop_by_hop(trailers, false);
    trailers.remove(header::CONTENT_LENGTH);
    trailers.remove(header::HOST);
    trailers.remove(header::TRAILER);
}

/// What a head's `Content-Length` fields said, read as they come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Length {
    /// No such field.
    Absent,
    /// Every number in every field so far is this one.
    Is(u64),
    /// Not a number, or two numbers that differ (hyper's rule).
    Bad,
}

impl Length {
    /// Takes one more field's value (comma-separated numbers).
    pub(crate) fn and(self, value: &[u8]) -> Length {
        let mut seen = self;
        for part in value.split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || seen == Length::Bad {
                return Length::Bad;
            }
            let mut n: u64 = 0;
            for &b in part {
                if !b.is_ascii_digit() {
                    return Length::Bad;
                }
                match n
                    .checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(b - b'0')))
                {
                    Some(m) => n = m,
                    None => return Length::Bad,
                }
            }
            seen = match seen {
                Length::Is(l) if l != n => Length::Bad,
                _ => Length::Is(n),
            };
        }
        seen
    }
}

/// Makes a `Content-Length` given as a list of one repeated value (`5, 5`,
/// or two fields of `5`: what an upstream's clients read as one length)
/// the single value, as RFC 9110 (section 8.6) lets a recipient do: a
/// list forwarded as it came is refused by strict clients (Go's and
/// Node's HTTP clients take it for a bad length). Lists of values that
/// differ, or that are not numbers, are left alone (the upstream's reader
/// has refused them already: a protocol error). Veer's own HTTP/1.1
/// client does this as it reads a head (`crate::raw`); this is for
/// hyper's.
pub fn one_length(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return;
    };
    if !first.as_bytes().contains(&b',') && values.next().is_none() {
        return;
    }
    let length = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .fold(Length::Absent, |l, v| l.and(v.as_bytes()));
    if let Length::Is(n) = length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
}

/// This hop's forwarding headers for one request, made by
/// [`prepare_request`]: each replaces every header of its name the client
/// sent. They are put in the request's map ([`Forwarding::apply`]) for
/// hyper's client, or written after the map's other fields by veer's own
/// HTTP/1.1 writer ([`crate::raw`]), which skips the fields they replace
/// ([`Forwarding::replaces`]): five map insertions (and the map's growth)
/// were about a tenth of a proxied GET's instructions.
#[derive(Debug)]
pub struct Forwarding {
    xff: HeaderValue,
    proto: HeaderValue,
    host: Option<HeaderValue>,
    real: HeaderValue,
    forwarded: HeaderValue,
    /// [`Forwarding::fields`] as HTTP/1.1 field lines, when they depend
    /// only on the connection and the host (no trusted hops, nothing
    /// forwarded by the client): made once, and the whole `Forwarding`
    /// kept by the connection's [`Peer`] and shared with its requests
    /// for as long as they repeat their host.
    written: Option<Bytes>,
}

impl Forwarding {
    /// Sets the headers in `headers`, replacing the client's.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in self.fields() {
            headers.insert(name.clone(), value.clone());
        }
    }

    /// The headers, in the order [`Forwarding::apply`] sets them.
    pub fn fields(&self) -> impl Iterator<Item = (&'static HeaderName, &HeaderValue)> {
        [
            (&X_FORWARDED_FOR, Some(&self.xff)),
            (&X_FORWARDED_PROTO, Some(&self.proto)),
            (&X_FORWARDED_HOST, self.host.as_ref()),
            (&X_REAL_IP, Some(&self.real)),
            (&FORWARDED, Some(&self.forwarded)),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| (n, v)))
    }

    /// The fields as HTTP/1.1 field lines, when the connection keeps them
    /// written (see the field `written`); else write [`Forwarding::fields`].
    pub fn written(&self) -> Option<&[u8]> {
        self.written.as_deref()
    }

    /// Whether the request has a `Host` (its client named one).
    pub fn has_host(&self) -> bool {
        self.host.is_some()
    }

    /// Whether the client's fields of this name give way to this hop's:
    /// the names [`Forwarding::apply`] sets (`X-Forwarded-Host` only when
    /// the request has a host).
    pub fn replaces(&self, name: &HeaderName) -> bool {
        match name.as_str() {
            "x-forwarded-for" | "x-forwarded-proto" | "x-real-ip" | "forwarded" => true,
            "x-forwarded-host" => self.host.is_some(),
            _ => false,
        }
    }
}

/// Turns a client's request head into the upstream's: origin-form URI,
/// HTTP/1.1, a `Host`, no hop-by-hop headers; returns this hop's
/// forwarding headers, to be applied or written (see [`Forwarding`]).
/// `client` is the client's address as [`client_addr`] found it.
#[allow(clippy::too_many_arguments)] // the head's parts, as hyper hands them over
pub fn prepare_request(
    method: &Method,
    uri: &mut Uri,
    version: &mut Version,
    headers: &mut HeaderMap,
    peer: &Peer,
    client: SocketAddr,
    trusted_hops: usize,
    scheme: Scheme,
    upgrade: bool,
) -> Result<Arc<Forwarding>, ProxyError> {
    if method == Method::CONNECT {
        return Err(ProxyError::BadRequest);
    }
    if method == Method::TRACE || method.as_str() == "TRACK" {
        return Err(ProxyError::MethodNotAllowed);
    }
    // One pass over the names: hop-by-hop ones, whether the client
    // forwarded, whether it sent a `Host` (cheaper than hashing names to
    // look them up), and look-alikes of the fields veer writes.
    let (mut hop_by_hop, mut client_xff, mut has_host) = (false, false, false);
    let mut lookalike_seen = false;
    let trusted = trusted_hops > 0;
    for name in headers.keys() {
        hop_by_hop |= is_hop_by_hop(name);
        client_xff |= name == X_FORWARDED_FOR;
        has_host |= name == header::HOST;
        lookalike_seen |= dropped(name, trusted);
    }
    if lookalike_seen {
        drop_lookalikes(headers, trusted);
    }
    if !has_host {
        if let Some(a) = uri.authority() {
            let v = HeaderValue::from_str(a.as_str()).map_err(|_| ProxyError::BadRequest)?;
            headers.insert(header::HOST, v);
        } else if *version == Version::HTTP_11 {
            // RFC 9112, section 3.2: an HTTP/1.1 request without a host is
            // answered 400 (as nginx, HAProxy and Envoy do); HTTP/1.0 may
            // have none, and HTTP/2 says it in `:authority`.
            return Err(ProxyError::BadRequest);
        }
    }
    if uri.scheme().is_some() || uri.authority().is_some() {
        let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
        *uri = Uri::try_from(pq).map_err(|_| ProxyError::BadRequest)?;
    }
    if *version == Version::HTTP_2 {
        join_cookies(headers);
    }
    *version = Version::HTTP_11;
    // `TE: trailers` says the client takes trailers (gRPC needs it); any
    // other TE is this hop's business.
    if hop_by_hop {
        if foreign_coding(headers) {
            return Err(ProxyError::TransferCoding);
        }
        let te_trailers = headers.get_all(header::TE).iter().any(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
        });
        strip_hop_by_hop(headers, upgrade);
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    match &peer.client_cert {
        // (A connection from before a reload that set `client_ca`: veer
        // alone says who called from then on.)
        ClientCert::NotAsked if crate::tls::asks_clients_now() => {
            headers.remove(&X_FORWARDED_CLIENT_CERT);
        }
        ClientCert::NotAsked => {}
        ClientCert::Absent => {
            headers.remove(&X_FORWARDED_CLIENT_CERT);
        }
        ClientCert::Verified(v, _) => {
            headers.insert(X_FORWARDED_CLIENT_CERT.clone(), v.clone());
        }
    }

    let headers = &*headers;
    let host = get(headers, &header::HOST);
    let client_is_peer =
        client == peer.addr || client.ip().to_canonical() == peer.addr.ip().to_canonical();
    let proto = scheme.value();
    // This hop's Forwarded element (for= the peer, proto, host quoted)
    // depends only on the connection and the host, and so do all five
    // fields of a client that forwarded nothing: a keep-alive connection
    // shares the last ones it made with each request that repeats them.
    let kept = (trusted_hops == 0).then(|| match peer.last_forwarded(scheme, host) {
        Some(kept) => Ok(kept),
        None => {
            // A host is looked at once a connection (and again when it
            // changes), not every request.
            if host.is_some_and(|h| !plain_host(h)) {
                return Err(ProxyError::BadRequest);
            }
            // A copy, not a clone: a request's header value shares the read
            // buffer it was parsed from (8 KiB), which the connection would
            // keep alive beside its current one. (A parsed value is always
            // a valid copy; the clone only keeps the fields whole if not.)
            let host =
                host.map(|h| HeaderValue::from_bytes(h.as_bytes()).unwrap_or_else(|_| h.clone()));
            let mut plain = Forwarding {
                xff: peer.ip.clone(),
                proto: proto.clone(),
                real: peer.ip.clone(),
                forwarded: forwarded(None, peer, scheme, host.as_ref())?,
                host,
                written: None,
            };
            let mut lines = Vec::with_capacity(160);
            for (name, value) in plain.fields() {
                field_line(&mut lines, name, value);
            }
            plain.written = Some(Bytes::from(lines));
            let kept = Arc::new(plain);
            peer.remember_forwarded(scheme, &kept);
            Ok(kept)
        }
    });
    let kept = kept.transpose()?;
    match &kept {
        Some(kept) if !client_xff && client_is_peer => return Ok(kept.clone()),
        Some(_) => {}
        None if host.is_some_and(|h| !plain_host(h)) => return Err(ProxyError::BadRequest),
        None => {}
    }

    // X-Forwarded-For: every incoming line merged, the peer appended.
    let xff = if client_xff {
        let mut xff = BytesMut::with_capacity(64);
        for prev in headers.get_all(&X_FORWARDED_FOR) {
            xff.extend_from_slice(prev.as_bytes());
            xff.extend_from_slice(b", ");
        }
        xff.extend_from_slice(peer.ip.as_bytes());
        HeaderValue::from_maybe_shared(xff.freeze()).map_err(|_| ProxyError::BadRequest)?
    } else {
        peer.ip.clone()
    };
    let real = if client_is_peer {
        peer.ip.clone()
    } else {
        HeaderValue::from_str(&client.ip().to_canonical().to_string())
            .map_err(|_| ProxyError::BadRequest)?
    };
    let forwarded = match kept {
        Some(kept) => kept.forwarded.clone(),
        None => forwarded(Some(headers), peer, scheme, host)?,
    };
    Ok(Arc::new(Forwarding {
        xff,
        proto,
        host: host.cloned(),
        real,
        forwarded,
        written: None,
    }))
}

/// Joins an HTTP/2 request's `Cookie` crumbs into one field, as RFC 9113
/// (section 8.2.3) asks before a request leaves HTTP/2, and nginx and
/// Envoy do: browsers send each cookie as a field of its own over HTTP/2
/// (HPACK compresses them apart), and an HTTP/1.1 server may read only
/// one `Cookie` field, or join several with commas (a cookie string no
/// server parses).
fn join_cookies(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (crumbs.next(), crumbs.next()) else {
        return;
    };
    let mut joined = BytesMut::with_capacity(first.len() * 4);
    for (i, crumb) in headers.get_all(header::COOKIE).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    // (Crumbs that were valid values make a valid value.)
    if let Ok(v) = HeaderValue::from_maybe_shared(joined.freeze()) {
        headers.insert(header::COOKIE, v);
    }
}

/// The fields veer writes for this hop, which a client's look-alikes
/// must not stand in for (see [`drop_lookalikes`]).
const WRITTEN: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "x-forwarded-client-cert",
];

/// Fields only a proxy writes that veer does not, from which services
/// build their own links and redirects (Spring's `ForwardedHeaderFilter`
/// and Tomcat read the port and prefix, Werkzeug's `ProxyFix` the port and
/// prefix, Rack the scheme and `X-Forwarded-Ssl: on` before
/// `X-Forwarded-Proto`): a client's would stand for a proxy's, so they
/// are dropped unless `trusted_hops` says proxies in front write them.
const PROXIES_ONLY: [&str; 4] = [
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
];

/// Removes a client's fields that are one of the forwarding fields veer
/// writes with `_` for `-` (`X_Forwarded_For`, `X-Real_IP`): CGI, WSGI
/// and Rack servers read both spellings as one variable
/// (`HTTP_X_FORWARDED_FOR`), and some (uWSGI, older gunicorn) let the
/// client's spelling stand in for veer's, so a client named its own
/// address. nginx drops every name with an underscore for the same
/// reason (`underscores_in_headers off`); other such names go on.
/// A client's [`PROXIES_ONLY`] fields (unless `trusted`) and their
/// look-alikes go too. (Rare: out of the request path's code.)
#[inline(never)]
fn drop_lookalikes(headers: &mut HeaderMap, trusted: bool) {
    let lookalikes: Vec<HeaderName> = headers
        .keys()
        .filter(|n| dropped(n, trusted))
        .cloned()
        .collect();
    for n in lookalikes {
        headers.remove(n);
    }
}

/// Whether a client's field `name` is dropped: one of [`WRITTEN`] with
/// `_` for one `-` or more, one of [`PROXIES_ONLY`] so spelled, or one of
/// them as it is unless `trusted` (most names fail at their first byte or
/// their length).
fn dropped(name: &HeaderName, trusted: bool) -> bool {
    let n = name.as_str().as_bytes();
    if n.first() != Some(&b'x') {
        return false;
    }
    let like = |w: &&str| {
        w.len() == n.len()
            && w.bytes()
                .zip(n)
                .all(|(a, &b)| a == b || (a == b'-' && b == b'_'))
    };
    let underscored = || n.contains(&b'_');
    (WRITTEN.iter().any(like) && underscored())
        || (PROXIES_ONLY.iter().any(like) && (!trusted || underscored()))
}

/// Whether a `Host` value is one nginx takes: no `/` or `\`, no space or
/// control byte, no `..`. Passed on, `x/y` or `x..y` reach services that
/// build links from their host (a password-reset mail's), and nginx
/// answers them 400.
fn plain_host(host: &HeaderValue) -> bool {
    let b = host.as_bytes();
    !b.iter()
        .any(|&c| c <= b' ' || c == 0x7f || c == b'/' || c == b'\\')
        && !b.windows(2).any(|w| w == b"..")
}

/// Writes `name: value` and CRLF.
pub fn field_line(dst: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    dst.extend_from_slice(name.as_str().as_bytes());
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value.as_bytes());
    dst.extend_from_slice(b"\r\n");
}

/// This hop's `Forwarded` value: the `earlier` elements (kept behind
/// trusted proxies), then `for=` the peer, `proto` and `host` (quoted; left
/// out when it is not plain visible ASCII or holds a quote or backslash).
fn forwarded(
    earlier: Option<&HeaderMap>,
    peer: &Peer,
    scheme: Scheme,
    host: Option<&HeaderValue>,
) -> Result<HeaderValue, ProxyError> {
    let mut fwd = BytesMut::with_capacity(96);
    if let Some(headers) = earlier {
        for prev in headers.get_all(&FORWARDED) {
            fwd.extend_from_slice(prev.as_bytes());
            fwd.extend_from_slice(b", ");
        }
    }
    fwd.extend_from_slice(match scheme {
        Scheme::Http => &peer.forwarded[0],
        Scheme::Https => &peer.forwarded[1],
    });
    if let Some(h) = host {
        let h = h.as_bytes();
        if h.iter()
            .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        {
            fwd.extend_from_slice(b";host=\"");
            fwd.extend_from_slice(h);
            fwd.extend_from_slice(b"\"");
        }
    }
    HeaderValue::from_maybe_shared(fwd.freeze()).map_err(|_| ProxyError::BadRequest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head with one `name` field for each of `values`.
    fn fields(name: HeaderName, values: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name.clone(), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_one_chunked_coding_is_passed_on() {
        let coded =
            |values: &[&'static str]| foreign_coding(&fields(header::TRANSFER_ENCODING, values));
        assert!(!coded(&[]));
        for plain in [
            &["chunked"][..],
            &["Chunked"],
            &[" , chunked ,"],
            &["", "chunked"],
        ] {
            assert!(!coded(plain), "{plain:?}");
        }
        for foreign in [
            &["gzip, chunked"][..],
            &["gzip", "chunked"],
            &["chunked, chunked"],
            &["chunked", "chunked"],
            &["gzip"],
            &["chunked;x=1"],
        ] {
            assert!(coded(foreign), "{foreign:?}");
        }
        // An answer: refused with it, stripped without.
        let mut h = HeaderMap::new();
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("gzip, chunked"),
        );
        assert_eq!(strip_answer(&mut h), Err(ProxyError::UpstreamProtocol));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert_eq!(strip_answer(&mut h), Ok(true));
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn short_heads_scanned_and_long_ones_looked_up_give_the_same_values() {
        for names in [3, SCAN_UP_TO, SCAN_UP_TO + 1, 30] {
            let mut h = HeaderMap::new();
            for i in 0..names.saturating_sub(2) {
                h.append(
                    HeaderName::from_bytes(format!("x-f{i}").as_bytes()).unwrap(),
                    HeaderValue::from_static("v"),
                );
            }
            h.append(header::HOST, HeaderValue::from_static("one"));
            h.append("x-user-id", HeaderValue::from_static("u1"));
            h.append("x-user-id", HeaderValue::from_static("u2"));
            assert_eq!(h.keys_len(), names);
            let user = HeaderName::from_static("x-user-id");
            assert_eq!(get(&h, &user), h.get(&user), "{names} names");
            assert_eq!(get(&h, &header::HOST).unwrap(), "one");
            assert_eq!(get(&h, &header::UPGRADE), None);
            assert!(has(&h, &user) && has(&h, &header::HOST) && !has(&h, &header::UPGRADE));
            assert_eq!(first_of(&h, &header::HOST), (h.get(header::HOST), false));
            assert_eq!(first_of(&h, &user), (h.get(&user), true));
            assert_eq!(first_of(&h, &header::COOKIE), (None, false));
        }
    }

    /// [`prepare_request`] for a `GET /` from `addr` (no trusted hops).
    fn get_from(
        h: &mut HeaderMap,
        peer: &Peer,
        addr: SocketAddr,
        scheme: Scheme,
    ) -> Arc<Forwarding> {
        let mut uri: Uri = "/".parse().expect("uri");
        // (Only HTTP/1.0 may come without a host.)
        let mut v = if h.contains_key(header::HOST) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        prepare_request(
            &Method::GET,
            &mut uri,
            &mut v,
            h,
            peer,
            addr,
            0,
            scheme,
            false,
        )
        .expect("ok")
    }

    #[test]
    fn a_connection_shares_its_kept_fields_while_requests_repeat_them() {
        let addr: SocketAddr = "192.0.2.7:5000".parse().expect("addr");
        let peer = Peer::new(addr);
        let get = |host: &'static str, scheme: Scheme, xff: Option<&'static str>| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static(host));
            if let Some(xff) = xff {
                h.insert("x-forwarded-for", HeaderValue::from_static(xff));
            }
            get_from(&mut h, &peer, addr, scheme)
        };
        let first = get("a.test", Scheme::Http, None);
        assert!(Arc::ptr_eq(&first, &get("a.test", Scheme::Http, None)));
        // A client that forwarded gets fields of its own, and the kept ones
        // stay.
        let own = get("a.test", Scheme::Http, Some("198.51.100.1"));
        assert!(!Arc::ptr_eq(&first, &own) && own.written().is_none());
        assert!(Arc::ptr_eq(&first, &get("a.test", Scheme::Http, None)));
        // Another host or scheme: new ones, kept in turn.
        for (host, scheme) in [("b.test", Scheme::Http), ("b.test", Scheme::Https)] {
            let other = get(host, scheme, None);
            assert!(!Arc::ptr_eq(&first, &other));
            assert!(Arc::ptr_eq(&other, &get(host, scheme, None)));
        }
    }

    #[test]
    fn kept_written_fields_are_the_requests_own_fields() {
        let addr: SocketAddr = "192.0.2.7:5000".parse().expect("addr");
        let peer = Peer::new(addr);
        let lines = |f: &Forwarding| {
            let mut v = Vec::new();
            for (n, value) in f.fields() {
                field_line(&mut v, n, value);
            }
            v
        };
        let cases: [(Option<&'static str>, Option<&'static str>, Scheme); 7] = [
            (Some("a.test"), None, Scheme::Http),
            (Some("a.test"), None, Scheme::Http),
            (Some("b.test"), None, Scheme::Http),
            (Some("b.test"), None, Scheme::Https),
            (None, None, Scheme::Https),
            (Some("b.test"), Some("198.51.100.1"), Scheme::Https),
            (Some("b.test"), None, Scheme::Https),
        ];
        for (host, xff, scheme) in cases {
            let mut h = HeaderMap::new();
            if let Some(host) = host {
                h.insert(header::HOST, HeaderValue::from_static(host));
            }
            if let Some(xff) = xff {
                h.insert("x-forwarded-for", HeaderValue::from_static(xff));
            }
            let f = get_from(&mut h, &peer, addr, scheme);
            match f.written() {
                // Only a client that forwarded nothing gets the kept lines.
                Some(w) => {
                    assert!(xff.is_none());
                    assert_eq!(
                        String::from_utf8_lossy(w),
                        String::from_utf8_lossy(&lines(&f)),
                        "{host:?} {scheme:?}"
                    );
                }
                None => assert!(xff.is_some(), "{host:?} {scheme:?}"),
            }
        }
    }

    #[test]
    fn hop_by_hop_headers_go_and_forwarding_headers_come() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::HOST, HeaderValue::from_static("shop.test"));
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        let mut uri: Uri = "http://shop.test/a?b=1".parse().expect("uri");
        let mut v = Version::HTTP_2;
        let peer: SocketAddr = "[::ffff:10.1.2.3]:4000".parse().expect("addr");
        prepare_request(
            &Method::GET,
            &mut uri,
            &mut v,
            &mut h,
            &Peer::new(peer),
            peer,
            0,
            Scheme::Https,
            false,
        )
        .expect("ok")
        .apply(&mut h);
        assert_eq!(uri, "/a?b=1");
        assert_eq!(v, Version::HTTP_11);
        assert!(!h.contains_key("x-secret") && !h.contains_key("keep-alive"));
        assert!(!h.contains_key(header::CONNECTION));
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "shop.test");
        assert_eq!(h["x-real-ip"], "10.1.2.3");
        assert_eq!(
            h["forwarded"],
            "for=10.1.2.3;proto=https;host=\"shop.test\""
        );
    }

    #[test]
    fn forwarding_written_replaces_the_same_fields_as_forwarding_applied() {
        let peer: SocketAddr = "10.1.2.3:4000".parse().expect("addr");
        for host in [Some("shop.test"), None] {
            let mut h = HeaderMap::new();
            if let Some(host) = host {
                h.insert(header::HOST, HeaderValue::from_static(host));
            }
            for (n, v) in [
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-proto", "gopher"),
                ("x-forwarded-host", "evil.test"),
                ("x-real-ip", "9.9.9.9"),
                ("forwarded", "for=9.9.9.9"),
                ("x-keep", "yes"),
            ] {
                h.append(n, HeaderValue::from_static(v));
            }
            let f = get_from(&mut h, &Peer::new(peer), peer, Scheme::Http);
            // Written: the map's fields that are not replaced, then this hop's.
            let text = |(n, v): (&HeaderName, &HeaderValue)| {
                (n.to_string(), v.to_str().expect("text").to_string())
            };
            let mut written: Vec<(String, String)> = h
                .iter()
                .filter(|(n, _)| !f.replaces(n))
                .map(text)
                .chain(f.fields().map(text))
                .collect();
            f.apply(&mut h);
            let mut applied: Vec<(String, String)> = h.iter().map(text).collect();
            written.sort();
            applied.sort();
            assert_eq!(written, applied, "host {host:?}");
            let xfh = applied.iter().filter(|(n, _)| n == "x-forwarded-host");
            assert_eq!(xfh.count(), 1, "host {host:?}");
        }
    }

    #[test]
    fn connection_cannot_remove_protected_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("host, authorization, x-forwarded-for, x-drop"),
        );
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-drop", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h[header::HOST], "a");
        assert_eq!(h[header::AUTHORIZATION], "Bearer t");
        assert_eq!(h["x-forwarded-for"], "1.2.3.4");
        assert!(!h.contains_key("x-drop"));
    }

    #[test]
    fn a_transfer_coding_takes_the_content_length_with_it() {
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        assert!(strip_hop_by_hop(&mut h, false));
        assert!(h.is_empty(), "{h:?}");
        // A length alone stays; a transfer coding alone goes.
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(!strip_hop_by_hop(&mut h, false));
        assert_eq!(h[header::CONTENT_LENGTH], "3");
        let mut h = HeaderMap::new();
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        assert!(!strip_hop_by_hop(&mut h, false));
        assert!(h.is_empty());
    }

    #[test]
    fn a_repeated_length_is_forwarded_once() {
        let length = |values: &[&'static str]| {
            let mut h = fields(header::CONTENT_LENGTH, values);
            one_length(&mut h);
            h.get_all(header::CONTENT_LENGTH)
                .iter()
                .map(|v| v.to_str().expect("ascii").to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(length(&["5"]), ["5"]);
        assert_eq!(length(&["5, 5"]), ["5"]);
        assert_eq!(length(&["5", " 5 "]), ["5"]);
        assert_eq!(length(&["5,5", "5"]), ["5"]);
        // Not one value: left as it came.
        assert_eq!(length(&["5, 6"]), ["5, 6"]);
        assert_eq!(length(&["5", "+5"]), ["5", "+5"]);
        assert_eq!(length(&["5,"]), ["5,"]);
        assert!(length(&[]).is_empty());
    }

    #[test]
    fn one_host_that_agrees_with_the_authority() {
        let uri: Uri = "/x".parse().expect("uri");
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("A.test"));
        assert_eq!(routing_host(&uri, &h), Ok(Some("A.test")));
        h.append(header::HOST, HeaderValue::from_static("b.test"));
        assert_eq!(routing_host(&uri, &h), Err(ProxyError::BadRequest));
        let abs: Uri = "http://a.test/x".parse().expect("uri");
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("other.test"));
        assert_eq!(routing_host(&abs, &h), Err(ProxyError::BadRequest));
        h.insert(header::HOST, HeaderValue::from_static("A.TEST"));
        assert_eq!(routing_host(&abs, &h), Ok(Some("a.test")));
        assert_eq!(routing_host(&abs, &HeaderMap::new()), Ok(Some("a.test")));
    }

    #[test]
    fn xff_lines_merge_and_trusted_hops_pick_the_client() {
        let peer: SocketAddr = "10.0.0.9:5000".parse().expect("addr");
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 1.1.1.1"),
        );
        h.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2"));
        assert_eq!(client_addr(&h, peer, 0), peer);
        assert_eq!(client_addr(&h, peer, 1).ip().to_string(), "2.2.2.2");
        assert_eq!(client_addr(&h, peer, 2).ip().to_string(), "1.1.1.1");
        assert_eq!(client_addr(&h, peer, 9), peer, "shorter list: the peer");
        get_from(&mut h, &Peer::new(peer), peer, Scheme::Http).apply(&mut h);
        assert_eq!(h["x-forwarded-for"], "6.6.6.6, 1.1.1.1, 2.2.2.2, 10.0.0.9");
        // An IPv6 peer is quoted and bracketed in Forwarded (RFC 7239).
        let v6: SocketAddr = "[2001:db8::1]:443".parse().expect("addr");
        let mut h = HeaderMap::new();
        get_from(&mut h, &Peer::new(v6), v6, Scheme::Https).apply(&mut h);
        assert_eq!(h["x-real-ip"], "2001:db8::1");
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=https");
    }

    #[test]
    fn upgrade_pair_survives_for_upgrades() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(Version::HTTP_11, &h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key(header::UPGRADE));
    }

    #[test]
    fn a_connections_forwarded_value_follows_each_requests_host() {
        let addr: SocketAddr = "10.0.0.7:5000".parse().expect("addr");
        let peer = Peer::new(addr);
        let forwarded_of = |host: Option<&'static str>, scheme: Scheme| {
            let mut h = HeaderMap::new();
            if let Some(host) = host {
                h.insert(header::HOST, HeaderValue::from_static(host));
            }
            get_from(&mut h, &peer, addr, scheme).apply(&mut h);
            h["forwarded"].to_str().expect("text").to_string()
        };
        assert_eq!(
            forwarded_of(Some("a.test"), Scheme::Http),
            "for=10.0.0.7;proto=http;host=\"a.test\""
        );
        assert_eq!(
            forwarded_of(Some("a.test"), Scheme::Http),
            "for=10.0.0.7;proto=http;host=\"a.test\""
        );
        assert_eq!(
            forwarded_of(Some("b.test"), Scheme::Http),
            "for=10.0.0.7;proto=http;host=\"b.test\""
        );
        assert_eq!(forwarded_of(None, Scheme::Http), "for=10.0.0.7;proto=http");
        assert_eq!(
            forwarded_of(Some("b.test"), Scheme::Https),
            "for=10.0.0.7;proto=https;host=\"b.test\""
        );
    }

    #[test]
    fn a_request_keeps_one_plain_client_id_and_gets_a_new_one_otherwise() {
        let with = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(&X_REQUEST_ID, HeaderValue::from_str(v).expect("value"));
            }
            let id = request_id(&mut h);
            let sent: Vec<_> = h.get_all(&X_REQUEST_ID).iter().cloned().collect();
            (id, sent)
        };
        let (id, sent) = with(&["3f1c-checkout:42"]);
        assert_eq!(id, "3f1c-checkout:42");
        assert_eq!(sent, [id]);
        let long = "a".repeat(129);
        for bad in [
            &[][..],
            &["has space"],
            &["a", "b"],
            &[""],
            &[long.as_str()],
        ] {
            let (id, sent) = with(bad);
            let text = id.to_str().expect("ascii");
            assert_eq!(text.len(), 32, "{bad:?}: {text}");
            assert!(text.bytes().all(|b| b.is_ascii_hexdigit()), "{text}");
            assert_eq!(
                sent.as_slice(),
                std::slice::from_ref(&id),
                "{bad:?}: the new one replaces the client's"
            );
        }
        assert_ne!(with(&[]).0, with(&[]).0, "each new id is its own");
    }
}
