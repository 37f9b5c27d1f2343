//! The request path: route, split, choose an endpoint, forward, record.
//!
//! Per request: one snapshot load, one hash of the sticky key, one ring walk,
//! and atomic metric increments on handles resolved when the snapshot was
//! built. Nothing here locks, and nothing panics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;

use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::balance::Pick;
use crate::body::{BodyLine, GrpcCall, Pending, ProxyBody, RequestBody, UpBody, UpstreamBody};
use crate::error::ProxyError;
use crate::headers::{
    client_addr, is_upgrade, prepare_request, routing_host, Forwarding, Peer, Scheme,
};
use crate::record::Outcome;
use crate::shared::Shared;
use crate::snapshot::{Forced, RouteTarget, VersionTarget};
use crate::split::{bucket_of_hash, is_canary, key_hash, random_bucket, sticky_key, KeyBuf};
use crate::upload::{ClientBody, Upload};
use crate::upstream::{Ejection, Failed, Sender, Upstream};
use veer_control::config::AccessLog;

/// A client's request not (yet) forwarded: answered by veer itself (a
/// refusal, a redirect, a preflight), an HTTP/2 body still coming is read
/// on and dropped ([`crate::upload::linger_unread`]) rather than its
/// stream reset at once, which clients that go on sending before they
/// read (curl 7.88) take for a failure, losing veer's answer (a 413, a
/// 429, a 403). An HTTP/1.1 body is the connection's lingering close's.
struct Unforwarded(Option<Request<Incoming>>);

impl Unforwarded {
    /// The request, to be forwarded (its body then lingers as a
    /// [`crate::upload::ClientBody`]).
    fn take(&mut self) -> Request<Incoming> {
        match self.0.take() {
            Some(r) => r,
            None => unreachable!("a request is forwarded once"),
        }
    }
}

impl std::ops::Deref for Unforwarded {
    type Target = Request<Incoming>;

    fn deref(&self) -> &Request<Incoming> {
        match &self.0 {
            Some(r) => r,
            None => unreachable!("a forwarded request is not looked at again"),
        }
    }
}

impl std::ops::DerefMut for Unforwarded {
    fn deref_mut(&mut self) -> &mut Request<Incoming> {
        match &mut self.0 {
            Some(r) => r,
            None => unreachable!("a forwarded request is not looked at again"),
        }
    }
}

impl Drop for Unforwarded {
    fn drop(&mut self) {
        let Some(req) = self.0.take() else { return };
        if req.version() == http::Version::HTTP_2 && !http_body::Body::is_end_stream(req.body()) {
            crate::upload::linger_unread(req.into_body());
        }
    }
}

/// Handles one client request. Never fails: errors become responses.
///
/// (This and the futures it awaits are `async move` blocks, not `async
/// fn`s: an `async fn` keeps its arguments twice in its future, as
/// captured and as locals. The request path's future is kept per client
/// connection and moved on every request.)
#[allow(clippy::manual_async_fn)] // see above
pub fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: Arc<Peer>,
    scheme: Scheme,
    slot: Option<Arc<crate::conn::Slot>>,
) -> impl std::future::Future<Output = Result<Response<ProxyBody>, Infallible>> {
    async move {
        let start = Instant::now();
        let mut req = Unforwarded(Some(req));
        if let crate::headers::ClientCert::Verified(_, subject) = &peer.client_cert {
            // For its access log line (a mutual TLS connection only).
            req.extensions_mut().insert(subject.clone());
        }
        // gRPC needs HTTP/2: an HTTP/1.x request is never a gRPC call.
        let grpc = req.version() == http::Version::HTTP_2 && crate::grpc::is_grpc(req.headers());
        let snap = shared.snapshot.load();
        let access = snap.access_log;
        let request_id = snap
            .request_id
            .then(|| crate::headers::request_id(req.headers_mut()));
        let rid = request_id.as_ref();
        let reply = |e: ProxyError| {
            let r = if grpc {
                crate::grpc::error_response(e)
            } else {
                error_response(e)
            };
            with_request_id(r, rid)
        };
        // Routing sees the path as the upstream will: normalised.
        match crate::path::normalize(req.uri().path(), snap.merge_slashes) {
            Ok(std::borrow::Cow::Borrowed(_)) => {}
            Ok(std::borrow::Cow::Owned(p)) => {
                if crate::path::set_path(req.uri_mut(), &p).is_err() {
                    snap.proxy_errors.inc(ProxyError::BadRequest);
                    refused(access, &req, peer.addr, ProxyError::BadRequest, (None, rid));
                    return Ok(reply(ProxyError::BadRequest));
                }
            }
            Err(_) => {
                snap.proxy_errors.inc(ProxyError::BadRequest);
                refused(access, &req, peer.addr, ProxyError::BadRequest, (None, rid));
                return Ok(reply(ProxyError::BadRequest));
            }
        }
        let found = routing_host(req.uri(), req.headers()).map(|host| {
            snap.router
                .find(host, req.uri().path())
                .and_then(|i| snap.routes.get(i))
        });
        let (route, body_timeout, trusted_hops, idle_timeout, request_buffer) = match found {
            Ok(Some(r)) => (
                r.clone(),
                snap.body_timeout,
                snap.trusted_hops,
                snap.idle_timeout,
                snap.request_buffer,
            ),
            Ok(None) => {
                snap.proxy_errors.inc(ProxyError::NoRoute);
                refused(access, &req, peer.addr, ProxyError::NoRoute, (None, rid));
                return Ok(reply(ProxyError::NoRoute));
            }
            Err(e) => {
                snap.proxy_errors.inc(e);
                refused(access, &req, peer.addr, e, (None, rid));
                return Ok(reply(e));
            }
        };
        drop(snap);
        if route.https_redirect
            && scheme == Scheme::Http
            && !crate::edit::forwarded_https(req.headers(), trusted_hops)
            && !crate::edit::acme_challenge(req.uri().path())
        {
            let port = shared.https_port.load(std::sync::atomic::Ordering::Relaxed);
            let client = client_addr(req.headers(), peer.addr, trusted_hops);
            return Ok(https_redirect(
                &shared,
                &req,
                port,
                &route,
                rid,
                (access, client),
            ));
        }
        // A gRPC call's own deadline, when shorter, wins over the route's; the
        // upstream is told the deadline in force.
        let (timeout, client_bound) = match grpc.then(|| crate::grpc::timeout(req.headers())) {
            Some(Some(d)) if d < route.timeout => (d, true),
            _ => (route.timeout, false),
        };
        if grpc {
            req.headers_mut().insert(
                crate::grpc::GRPC_TIMEOUT,
                crate::grpc::encode_timeout(timeout),
            );
        }

        let client = client_addr(req.headers(), peer.addr, trusted_hops);
        let mut key_buf = KeyBuf::default();
        let mut minted_buf = [0u8; 16];
        let mut key = sticky_key(&route.sticky, req.headers(), &client, &mut key_buf);
        // A client without the route's sticky cookie gets one made.
        let mut minted = None;
        if let (None, Some(m)) = (key, &route.mint) {
            let k = m.mint(&mut minted_buf);
            let secure = scheme == Scheme::Https
                || crate::edit::forwarded_https(req.headers(), trusted_hops);
            minted = m.set_cookie(k, secure);
            key = Some(k);
        }
        let key_hash = key.map(key_hash);
        let client_hash = if client == peer.addr {
            peer.client_hash
        } else {
            crate::record::client_hash(client.ip())
        };
        // A browser on an allowed origin: its preflight is answered below
        // (after the route's refusals), its answers marked, refusals too.
        let cors = route
            .cors
            .as_deref()
            .and_then(|c| Some((c, c.allowed(req.headers())?)));
        // Made only for a refusal (a request served pays nothing for it).
        let on_route = || OnRoute {
            route: &route.name,
            edits: route.response_edits.as_deref(),
            cors: cors.clone(),
            client,
            request_id: rid,
            access,
            grpc,
        };
        if let Some(sources) = &route.sources {
            if !sources.admits(client.ip()) {
                let e = ProxyError::Forbidden;
                return Ok(refuse_on_route(&shared, &req, on_route(), e, None));
            }
        }
        if route.require_client_cert
            && !matches!(peer.client_cert, crate::headers::ClientCert::Verified(..))
        {
            let e = ProxyError::ClientCertRequired;
            return Ok(refuse_on_route(&shared, &req, on_route(), e, None));
        }
        if let Some(limiter) = &route.limiter {
            let cert = match &peer.client_cert {
                crate::headers::ClientCert::Verified(_, s) => Some(&*s.0),
                _ => None,
            };
            if let Err(wait) = limiter.admit(limiter.key(req.headers(), client_hash, cert), start) {
                let e = ProxyError::RateLimited;
                return Ok(refuse_on_route(&shared, &req, on_route(), e, Some(wait)));
            }
        }
        if let Some((c, allow)) = &cors {
            if crate::cors::is_preflight(req.method(), req.headers()) {
                let r = c.preflight(allow.clone());
                return Ok(answered_here(r, &req, &route, rid, (access, client)));
            }
        }
        // A body announced longer than the route takes is refused before
        // any of it is read (an HTTP/1.1 client waiting on `Expect:
        // 100-continue` is told at once and sends none of it).
        if route.max_body != u64::MAX && announced_over(req.body(), route.max_body) {
            let e = ProxyError::BodyTooLarge;
            return Ok(refuse_on_route(&shared, &req, on_route(), e, None));
        }
        let forced = route.forced(req.headers());
        let (version, pick) = {
            let random_key;
            let (b, key) = match (key, key_hash) {
                (Some(k), Some(h)) => (bucket_of_hash(h), k),
                _ => {
                    random_key = fastrand::u64(..).to_le_bytes();
                    (random_bucket(), &random_key[..])
                }
            };
            let version = match (&route.canary, forced) {
                (Some(c), Some(Forced::Canary)) => c,
                (_, Some(Forced::Stable)) => &route.stable,
                (Some(c), None) if is_canary(b, route.weight_bp) => c,
                _ => &route.stable,
            };
            (version, version.balancer.pick(key))
        };
        // A forced request's version is not the weighted split's choice: it is
        // kept out of the judge (its window and tests), not out of the metrics.
        let record = route.record && forced.is_none();
        let Some(pick) = pick else {
            // A version always has an endpoint; kept total rather than panicking.
            return Ok(reply(ProxyError::UpstreamConnect));
        };

        let canary = !std::ptr::eq(version, &route.stable);
        // A share of stable's split requests is copied to the canary; the copy
        // pairs with stable's answer once it is recorded.
        let (pair, shadow, arrival) = match &route.mirror {
            Some(m) if !canary && record && m.wants(req.method(), key_hash) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                // Both sides of the pair timed alike (see `raw::Arrival`).
                let arrival = crate::raw::Arrival::new(start);
                let seed = crate::mirror::Seed {
                    route: route.clone(),
                    stable: rx,
                    key_hash,
                    start,
                };
                (Some(tx), Some(Box::new(seed)), Some(arrival))
            }
            _ => (None, None, None),
        };
        // A small body is read whole before an upstream connection is
        // taken; a gRPC call's messages go as they come (a client stream is
        // long-lived by design).
        let read_whole = !grpc
            && !http_body::Body::is_end_stream(req.body())
            && read_first(req.body(), request_buffer, route.max_body);
        // The request line, kept for the access log.
        let head = (access != AccessLog::Off).then(|| RequestLine::of(&req));
        let upload = Upload::since(start);
        // A gRPC call's status may come in the trailers: outlier detection
        // counts it against the endpoint that served it then (see `GrpcCall`).
        let trailers_judged = grpc && !canary && route.outlier.is_some();
        let served_by = std::sync::OnceLock::new();
        let waiting = Waiting {
            shared: &shared,
            version,
            upload: &upload,
            record,
            key_hash,
            client: client_hash,
            log: head
                .as_ref()
                .map(|head| (head, &*route.name, client, canary, rid)),
            retried: Retried::default(),
            answered: false,
        };
        let result = forward(
            &route,
            version,
            pick,
            req.take(),
            Hop {
                peer,
                client,
                trusted_hops,
                scheme,
                slot,
                idle_timeout,
                read_whole,
                shadow,
                arrival: arrival.clone(),
                served_by: (access != AccessLog::Off || trailers_judged).then_some(&served_by),
                grpc,
                retried: &waiting.retried,
            },
            Deadlines {
                body: body_timeout,
                upstream: timeout,
                route_bound: !client_bound,
                start,
            },
            &upload,
        )
        .await;
        let retried = waiting.answered();
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(start);
        let micros = elapsed.as_micros() as u64;
        let seconds = elapsed.as_secs_f64();
        // The judge's latency: the version's time, not the client's upload.
        let judged_us = upload.version_us(now);
        let pair = pair.map(|tx| {
            let at = arrival.as_ref().and_then(|a| a.head_us());
            let sent = arrival.as_ref().and_then(|a| a.sent_us());
            crate::mirror::PairSender::new(tx, at.unwrap_or(micros), sent)
        });
        // The judge hears an outcome known now (veer's own answer, or a
        // failure), and a mirrored copy waiting for it.
        let record_now = |outcome: Outcome, pair: Option<crate::mirror::PairSender>| {
            if record {
                version
                    .recorder
                    .record_from(judged_us, outcome, key_hash, Some(client_hash));
                if let Some(pair) = pair {
                    pair.send(outcome);
                }
            }
        };
        Ok(match result {
            Ok(mut resp) => {
                if let Some(id) = rid {
                    // The upstream's own, if it sent one, stays.
                    resp.headers_mut()
                        .entry(&crate::headers::X_REQUEST_ID)
                        .or_insert_with(|| id.clone());
                }
                on_answer(resp.headers_mut(), cors, minted, &route);
                let status = resp.status().as_u16();
                version.metrics.record(status, seconds);
                let error =
                    status >= 500 || (route.count_4xx_as_errors && (400..500).contains(&status));
                let mut outcome = if error { Outcome::Error } else { Outcome::Ok };
                // A gRPC call's outcome is its grpc-status: in a trailers-only
                // head, or in the trailers at the end of the body.
                let mut call = None;
                let mut grpc_status = None;
                if grpc && status == 200 {
                    match crate::grpc::status(resp.headers()) {
                        Some(code) => {
                            grpc_status = Some(code);
                            version.metrics.grpc(code);
                            outcome = crate::grpc::outcome(code, route.grpc_errors, client_bound);
                        }
                        None => {
                            call = Some(GrpcCall {
                                route: route.clone(),
                                canary,
                                client_bound,
                                endpoint: served_by.get().filter(|_| trailers_judged).cloned(),
                            })
                        }
                    }
                }
                // A request one of whose tries failed (sent again by
                // `[route.retry]`) failed for the judge (the version failed it), and has a line
                // in an `errors` access log.
                if let (Outcome::Ok, Some(&failed)) = (outcome, retried.failed.get()) {
                    outcome = failed;
                }
                // Only with an access log (the request line was kept for
                // it): its line, written when the body ends, with the bytes
                // passed on and the whole time (a body the upstream breaks
                // off gets a line of its own too).
                let line = head.map(|head| {
                    Box::new(BodyLine {
                        request_id: rid.cloned(),
                        route: route.clone(),
                        canary,
                        head,
                        client,
                        status,
                        upstream: served_by.get().cloned(),
                        micros,
                        start,
                        all: access == AccessLog::All,
                        failed: outcome != Outcome::Ok,
                        grpc_status,
                        retries: retried.sent(),
                        bytes: 0,
                    })
                });
                match resp.body_mut() {
                    // Recorded when the body ends: it may still fail.
                    ProxyBody::Upstream(body) => body.at_end(
                        record.then_some(Pending {
                            route,
                            canary,
                            micros: judged_us,
                            outcome,
                            key_hash,
                            client: client_hash,
                            upload,
                            pair,
                        }),
                        call,
                        line,
                    ),
                    ProxyBody::Full(full) => {
                        record_now(outcome, pair);
                        if let Some(mut l) = line {
                            l.bytes = full.as_ref().map_or(0, |b| b.len() as u64);
                            l.request();
                        }
                    }
                }
                resp
            }
            Err(e) => {
                // The call's own, shorter deadline passed: the caller's choice.
                let e = match e {
                    ProxyError::UpstreamTimeout if client_bound => ProxyError::ClientDeadline,
                    e => e,
                };
                if let Some(kind) = e.upstream_index() {
                    version.metrics.upstream_error(kind);
                    version.metrics.record(e.status().as_u16(), seconds);
                    let outcome = match e {
                        ProxyError::UpstreamConnect => Outcome::ConnectError,
                        ProxyError::UpstreamTimeout => Outcome::Timeout,
                        _ => Outcome::Error,
                    };
                    record_now(outcome, pair);
                } else {
                    route_less_error(&shared, e);
                    if e == ProxyError::ClientDeadline && upload.sent() {
                        // As a client that left: the call's own deadline
                        // is its caller's patience.
                        given_up(version, record, judged_us, key_hash, client_hash);
                    }
                }
                let mut resp = reply(e);
                if e == ProxyError::TransferCoding {
                    // (HTTP/1.1 only.) The body's framing is one veer
                    // would not pass on: nothing after it on the
                    // connection is taken either, as nginx does.
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                on_answer(resp.headers_mut(), cors, minted, &route);
                if let Some(head) = &head {
                    // A failed connect's reason: its endpoint's last (said
                    // in the log and `/status` too); a timeout's: which
                    // deadline passed.
                    let why = match e {
                        ProxyError::UpstreamConnect => {
                            served_by.get().and_then(|u| u.connect_failure())
                        }
                        ProxyError::UpstreamTimeout => {
                            Some(timed_out_why(&route, timeout, elapsed))
                        }
                        _ => None,
                    };
                    Logged {
                        head,
                        request_id: rid,
                        route: &route.name,
                        version: &version.name,
                        canary,
                        client,
                        upstream: served_by.get().map(|u| u.label()),
                        micros,
                        bytes: http_body::Body::size_hint(resp.body()).exact().unwrap_or(0),
                        total_micros: micros,
                        grpc_status: None,
                        retries: retried.sent(),
                    }
                    .line(e.status().as_u16(), Some(e.kind()), why.as_deref());
                }
                resp
            }
        })
    }
}

/// What a route adds to the answer of a request that went to a version
/// (the upstream's or veer's own): CORS marks for an allowed origin, a
/// sticky cookie veer made, then the route's answer fields (last: they
/// may replace any of these).
fn on_answer(
    headers: &mut http::HeaderMap,
    cors: Option<(&crate::cors::CorsTarget, HeaderValue)>,
    minted: Option<HeaderValue>,
    route: &RouteTarget,
) {
    if let Some((c, allow)) = cors {
        c.mark(headers, allow);
    }
    if let Some(c) = minted {
        headers.append(header::SET_COOKIE, c);
    }
    if let Some(edits) = &route.response_edits {
        edits.apply(headers);
    }
}

/// A request as its access log line tells it, kept from its head when
/// there is an access log (the method, URI and fields share the bytes
/// they were parsed from: no text is copied).
pub(crate) struct RequestLine {
    pub method: http::Method,
    pub uri: http::Uri,
    pub version: http::Version,
    /// The `Host` field (an HTTP/2 request's authority is in `uri`).
    pub host: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    /// The W3C `traceparent` field, for the line's `trace_id`.
    pub traceparent: Option<HeaderValue>,
    /// A verified client certificate's subject (mutual TLS).
    pub client_cert: Option<crate::headers::ClientSubject>,
}

impl RequestLine {
    fn of<B>(req: &Request<B>) -> RequestLine {
        let named = Named::of(req.headers());
        RequestLine {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            host: named.host.cloned(),
            user_agent: named.user_agent.cloned(),
            traceparent: named.traceparent.cloned(),
            client_cert: req.extensions().get().cloned(),
        }
    }

    /// Its line's last fields (see [`about`]).
    pub(crate) fn about(&self, f: &mut crate::access::Fields<'_>) {
        let named = Named {
            host: self.host.as_ref(),
            user_agent: self.user_agent.as_ref(),
            traceparent: self.traceparent.as_ref(),
        };
        about(f, self.version, &self.uri, named);
        if let Some(s) = &self.client_cert {
            f.str("client_cert", &s.0);
        }
    }
}

/// The last fields of a request's access log line: `protocol` (as nginx's
/// `$server_protocol`: `HTTP/1.1`, `HTTP/2.0`), `host` (the authority the
/// request named, as sent: its URI's, else its `Host` field; absent when
/// it named none), `user_agent` (when sent) and `trace_id` (a valid W3C
/// `traceparent`'s, [`trace_id`]). A field's bytes that are not UTF-8 are
/// written as U+FFFD.
pub(crate) fn about(
    f: &mut crate::access::Fields<'_>,
    version: http::Version,
    uri: &http::Uri,
    named: Named<'_>,
) {
    let Named {
        host,
        user_agent,
        traceparent,
    } = named;
    let protocol = match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "",
    };
    f.bare("protocol", protocol);
    match uri.authority() {
        Some(a) => f.str("host", a.as_str()),
        None => f.opt_bytes("host", host.map(HeaderValue::as_bytes)),
    };
    f.opt_bytes("user_agent", user_agent.map(HeaderValue::as_bytes));
    f.opt_str("trace_id", traceparent.and_then(trace_id));
}

/// The trace id of a W3C Trace Context `traceparent` field
/// (`VERSION-TRACEID-PARENTID-FLAGS`: 2, 32, 16 and 2 lowercase hex
/// digits), when it is valid: not version `ff`, a version-00 field of
/// exactly those 55 bytes (a later version's may go on after a `-`), a
/// trace id and parent id not all zeros. Anything else has none: the
/// line carries no id a client made up in another shape.
fn trace_id(v: &HeaderValue) -> Option<&str> {
    let b = v.as_bytes();
    let hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let zeros = |s: &[u8]| s.iter().all(|c| *c == b'0');
    let ok = b.len() >= 55
        && hex(&b[..2])
        && &b[..2] != b"ff"
        && (b.len() == 55 || (&b[..2] != b"00" && b[55] == b'-'))
        && [b[2], b[35], b[52]] == [b'-'; 3]
        && hex(&b[3..35])
        && !zeros(&b[3..35])
        && hex(&b[36..52])
        && !zeros(&b[36..52])
        && hex(&b[53..55]);
    // (All ASCII once checked.)
    ok.then(|| std::str::from_utf8(&b[3..35]).ok()).flatten()
}

/// The fields of a request's head its access log line names.
#[derive(Clone, Copy, Default)]
pub(crate) struct Named<'a> {
    host: Option<&'a HeaderValue>,
    user_agent: Option<&'a HeaderValue>,
    traceparent: Option<&'a HeaderValue>,
}

impl<'a> Named<'a> {
    /// The first `Host`, `User-Agent` and `traceparent` fields of
    /// `headers`: a short head is scanned once for all three (see
    /// [`crate::headers::SCAN_UP_TO`]).
    fn of(headers: &'a http::HeaderMap) -> Named<'a> {
        if headers.keys_len() > crate::headers::SCAN_UP_TO {
            return Named {
                host: headers.get(header::HOST),
                user_agent: headers.get(header::USER_AGENT),
                traceparent: headers.get(&crate::headers::TRACEPARENT),
            };
        }
        let mut named = Named::default();
        for (name, value) in headers {
            let slot = if name == header::HOST {
                &mut named.host
            } else if name == header::USER_AGENT {
                &mut named.user_agent
            } else if name == crate::headers::TRACEPARENT {
                &mut named.traceparent
            } else {
                continue;
            };
            slot.get_or_insert(value);
        }
        named
    }
}

/// What a request's access log line says besides its outcome: the
/// request line, route, client, role (canary or not) and id.
type LogHead<'a> = (
    &'a RequestLine,
    &'a str,
    SocketAddr,
    bool,
    Option<&'a HeaderValue>,
);

/// A request in flight to its version, until its answer (or failure)
/// comes. Dropped before that, it was given up: hyper drops a request's
/// future when its client closes the connection or resets the stream. If
/// the client had sent the whole request, it then counts as
/// `client_closed` and the version's recorder hears how long the version
/// had had it
/// ([`crate::record::Recorder::given_up`]: a canary that hangs behind
/// impatient clients is seen as slow).
struct Waiting<'a> {
    shared: &'a Shared,
    version: &'a VersionTarget,
    upload: &'a Upload,
    /// The request is judged (not forced; the judge on).
    record: bool,
    key_hash: Option<u64>,
    client: u64,
    /// With an access log: what its line says.
    log: Option<LogHead<'a>>,
    /// Its tries sent again (`[route.retry]`) so far.
    retried: Retried,
    answered: bool,
}

impl Waiting<'_> {
    /// The answer (or a failure) came: the request goes on as usual.
    /// (Its retries' record goes on with the request.)
    fn answered(mut self) -> Retried {
        self.answered = true;
        std::mem::take(&mut self.retried)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.answered
            || self
                .shared
                .grace_over
                .load(std::sync::atomic::Ordering::Acquire)
        {
            // Answered, or cut by the end of shutdown's grace: veer's doing.
            return;
        }
        if !self.upload.sent() {
            // Left before its body was whole: the client's fault, as its
            // body's read would have said.
            let fault = self.upload.fault().unwrap_or(ProxyError::ClientAborted);
            route_less_error(self.shared, fault);
            return;
        }
        route_less_error(self.shared, ProxyError::ClientClosed);
        let waited = self.upload.version_us(Instant::now());
        if let Some((head, route, client, canary, request_id)) = self.log {
            // Logged as nginx logs a client that left: 499.
            Logged {
                head,
                request_id,
                route,
                version: &self.version.name,
                canary,
                client,
                upstream: endpoint_tried(self.version, &self.retried).map(|u| u.label()),
                micros: waited,
                bytes: 0,
                total_micros: self.upload.elapsed_us(Instant::now()),
                grpc_status: None,
                retries: self.retried.sent(),
            }
            .line(499, Some(ProxyError::ClientClosed.kind()), None);
        }
        match self.retried.failed.get() {
            // Left while a failed try was being sent again: the version
            // failed it, whether or not the client waited for the retry.
            Some(&failed) => {
                self.version.metrics.given_up();
                if self.record {
                    self.version.recorder.record_from(
                        waited,
                        failed,
                        self.key_hash,
                        Some(self.client),
                    );
                }
            }
            None => given_up(
                self.version,
                self.record,
                waited,
                self.key_hash,
                self.client,
            ),
        }
    }
}

/// A request given up after `waited_us` of the version's time: counted for
/// the version, and heard by its recorder when the request is judged
/// ([`crate::record::Recorder::given_up`]).
fn given_up(
    version: &VersionTarget,
    record: bool,
    waited_us: u64,
    key_hash: Option<u64>,
    client: u64,
) {
    version.metrics.given_up();
    if record {
        version.recorder.given_up(waited_us, key_hash, Some(client));
    }
}

/// What an access log line says of a request that went to a version
/// besides its status.
pub(crate) struct Logged<'a> {
    /// The request line and what the line says of the request.
    pub head: &'a RequestLine,
    /// `[proxy] request_id`'s.
    pub request_id: Option<&'a HeaderValue>,
    pub route: &'a str,
    pub version: &'a str,
    pub canary: bool,
    pub client: SocketAddr,
    /// The endpoint that answered (none when none did).
    pub upstream: Option<&'a str>,
    /// Until the response head (or the failure).
    pub micros: u64,
    /// The answer's body bytes passed on to the client.
    pub bytes: u64,
    /// Until the answer's end (or its failure, or the client leaving).
    pub total_micros: u64,
    /// A gRPC call's status, when known.
    pub grpc_status: Option<u8>,
    /// Tries sent again (`[route.retry]`).
    pub retries: u8,
}

impl Logged<'_> {
    /// One line (target `veer::access`), with the failure's kind
    /// (`error`) and `why` in words when known. The path only: a query
    /// string may carry credentials.
    pub(crate) fn line(&self, status: u16, error: Option<&'static str>, why: Option<&str>) {
        crate::access::line("request", |f| {
            f.str("route", self.route)
                .str("version", self.version)
                .str("role", if self.canary { "canary" } else { "stable" })
                .bare("method", self.head.method.as_str())
                .str("path", self.head.uri.path())
                .u64("status", status.into())
                .millis("ms", self.micros)
                .addr("client", self.client)
                .opt_str("upstream", self.upstream)
                .str("error", error.unwrap_or(""))
                .opt_str("why", why)
                .opt_str("request_id", self.request_id.and_then(|v| v.to_str().ok()))
                .u64("bytes", self.bytes)
                .millis("total_ms", self.total_micros);
            if let Some(code) = self.grpc_status {
                f.u64("grpc_status", code.into());
            }
            if self.retries > 0 {
                f.u64("retries", self.retries.into());
            }
            self.head.about(f);
        });
    }
}

/// The access log line of a request refused before it went to a version
/// (in both `errors` and `all`), with its route if it had one and its id.
fn refused(
    access: AccessLog,
    req: &Request<Incoming>,
    peer: SocketAddr,
    e: ProxyError,
    (route, request_id): (Option<&str>, Option<&HeaderValue>),
) {
    if access != AccessLog::Off {
        crate::access::line("request", |f| {
            f.bare("method", req.method().as_str())
                .str("path", req.uri().path())
                .u64("status", e.status().as_u16().into())
                .opt_str("route", route)
                .addr("client", peer)
                .str("error", e.kind())
                .opt_str("request_id", request_id.and_then(|v| v.to_str().ok()));
            about_request(f, req);
        });
    }
}

/// [`about`] `req`, straight from its head.
fn about_request<B>(f: &mut crate::access::Fields<'_>, req: &Request<B>) {
    about(f, req.version(), req.uri(), Named::of(req.headers()));
    if let Some(s) = req.extensions().get::<crate::headers::ClientSubject>() {
        f.str("client_cert", &s.0);
    }
}

/// `r` with the request's id (`[proxy] request_id`), if it has one.
fn with_request_id(mut r: Response<ProxyBody>, id: Option<&HeaderValue>) -> Response<ProxyBody> {
    if let Some(id) = id {
        r.headers_mut()
            .insert(crate::headers::X_REQUEST_ID.clone(), id.clone());
    }
    r
}

/// Whether `body` announces more than `limit` bytes (`max_request_body`).
#[inline(never)] // a route without a limit never calls it
fn announced_over(body: &Incoming, limit: u64) -> bool {
    http_body::Body::size_hint(body).lower() > limit
}

/// A request refused on its route before it went to a version: what its
/// answer and log line say.
struct OnRoute<'a> {
    route: &'a str,
    /// `[route.response_headers]`.
    edits: Option<&'a crate::edit::Edits>,
    /// `[route.cors]` and the origin it allows, if it does.
    cors: Option<(&'a crate::cors::CorsTarget, HeaderValue)>,
    /// As stickiness sees it.
    client: SocketAddr,
    request_id: Option<&'a HeaderValue>,
    access: AccessLog,
    grpc: bool,
}

/// The answer to a request its route refuses (`e`: the client's, never the
/// version's), counted, and logged with the route when an access log is
/// kept: a body announced longer than the route takes gets 413 (an
/// HTTP/1.x connection is closed after it: its body is left unread); a
/// client over its rate 429 with `Retry-After: retry_after`; a client
/// address the route does not serve 403.
#[cold]
fn refuse_on_route(
    shared: &Shared,
    req: &Request<Incoming>,
    on: OnRoute<'_>,
    e: ProxyError,
    retry_after: Option<u64>,
) -> Response<ProxyBody> {
    route_less_error(shared, e);
    refused(
        on.access,
        req,
        on.client,
        e,
        (Some(on.route), on.request_id),
    );
    let mut resp = if on.grpc {
        crate::grpc::error_response(e)
    } else {
        error_response(e)
    };
    let h = resp.headers_mut();
    if e == ProxyError::BodyTooLarge && !on.grpc && req.version() < http::Version::HTTP_2 {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(secs) = retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    let mut resp = with_request_id(resp, on.request_id);
    if let Some((c, allow)) = on.cors {
        c.mark(resp.headers_mut(), allow);
    }
    if let Some(edits) = on.edits {
        edits.apply(resp.headers_mut());
    }
    resp
}

/// `308 Permanent Redirect` to the URL of `req` over HTTPS (`port`, unless
/// 443), for a route with `https_redirect`: a request that came over
/// plain HTTP goes nowhere else (before any other check of its route,
/// as ingress-nginx's `ssl-redirect`). Logged with `access_log = "all"`.
#[cold]
fn https_redirect(
    shared: &Shared,
    req: &Request<Incoming>,
    port: u16,
    route: &RouteTarget,
    request_id: Option<&HeaderValue>,
    (access, peer): (AccessLog, SocketAddr),
) -> Response<ProxyBody> {
    let location = routing_host(req.uri(), req.headers())
        .ok()
        .flatten()
        .and_then(|host| crate::edit::https_location(host, port, req.uri()));
    let Some(location) = location else {
        // No host to send the client to.
        route_less_error(shared, ProxyError::BadRequest);
        refused(
            access,
            req,
            peer,
            ProxyError::BadRequest,
            (Some(&route.name), request_id),
        );
        return with_request_id(error_response(ProxyError::BadRequest), request_id);
    };
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    resp.headers_mut().insert(header::LOCATION, location);
    answered_here(resp, req, route, request_id, (access, peer))
}

/// An answer veer gives on a route without asking a version (an HTTPS
/// redirect, a CORS preflight): with the request's id and the route's
/// answer fields, logged with `access_log = "all"`; neither an error nor
/// the version's.
#[cold]
fn answered_here(
    resp: Response<ProxyBody>,
    req: &Request<Incoming>,
    route: &RouteTarget,
    request_id: Option<&HeaderValue>,
    (access, client): (AccessLog, SocketAddr),
) -> Response<ProxyBody> {
    if access == AccessLog::All {
        crate::access::line("request", |f| {
            f.bare("method", req.method().as_str())
                .str("path", req.uri().path())
                .u64("status", resp.status().as_u16().into())
                .str("route", &route.name)
                .addr("client", client)
                .opt_str("request_id", request_id.and_then(|v| v.to_str().ok()));
            about_request(f, req);
        });
    }
    let mut resp = with_request_id(resp, request_id);
    if let Some(edits) = &route.response_edits {
        edits.apply(resp.headers_mut());
    }
    resp
}

/// Counts a failure that is no version's (the client's, or a request veer
/// cannot forward).
fn route_less_error(shared: &Shared, e: ProxyError) {
    shared.snapshot.load().proxy_errors.inc(e);
}

/// A response veer writes itself.
pub fn error_response(e: ProxyError) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(e.body()));
    *r.status_mut() = e.status();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Who sent a request, and how.
struct Hop<'a> {
    peer: Arc<Peer>,
    client: SocketAddr,
    trusted_hops: usize,
    scheme: Scheme,
    /// The client connection's slot, held by a tunnel upgraded from it.
    slot: Option<Arc<crate::conn::Slot>>,
    /// How long a tunnel may move no byte either way.
    idle_timeout: std::time::Duration,
    /// The body is read whole before the request goes upstream (see
    /// [`read_first`]).
    read_whole: bool,
    /// A copy of the request goes to the canary (`[route.mirror]`).
    shadow: Option<Box<crate::mirror::Seed>>,
    /// When a mirrored request's answer came (its side of the pair).
    arrival: Option<Arc<crate::raw::Arrival>>,
    /// With an access log (or a gRPC call's outlier detection): where the
    /// endpoint that answered is put.
    served_by: Option<&'a std::sync::OnceLock<Arc<crate::upstream::Upstream>>>,
    /// A gRPC call.
    grpc: bool,
    /// Its tries sent again (`[route.retry]`), and how the first failed.
    retried: &'a Retried,
}

/// A request's tries: the endpoints they went to (for its access log
/// line, also one written when its client left while a try was out), and
/// with `[route.retry]` how its first try failed (the judge hears the
/// request failed so) and how many tries were sent again (its line says).
pub(crate) struct Retried {
    failed: std::sync::OnceLock<Outcome>,
    sent: std::sync::atomic::AtomicU8,
    /// The first try's endpoint: its exchange's `used` (see [`Lent`]),
    /// `usize::MAX` before it has one.
    first: std::sync::atomic::AtomicUsize,
    /// The try sent again last (or being sent)'s endpoint, the same way.
    last: std::sync::atomic::AtomicUsize,
}

impl Default for Retried {
    fn default() -> Self {
        Self {
            failed: std::sync::OnceLock::new(),
            sent: std::sync::atomic::AtomicU8::new(0),
            first: std::sync::atomic::AtomicUsize::new(usize::MAX),
            last: std::sync::atomic::AtomicUsize::new(usize::MAX),
        }
    }
}

impl Retried {
    /// Tries sent again.
    fn sent(&self) -> u8 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Marks a `used` endpoint (see [`Lent`]) that a try was connecting to
/// (or waiting for a connection of), not yet sending on: the endpoint
/// the access log names for a failure, but not one outlier detection
/// counts it against (a connection's failures are the endpoint's
/// back-off's).
const CONNECTING: usize = 1 << (usize::BITS - 2);

/// The endpoint a request's last try that had one went to, as
/// `retried` says: for the access log's `upstream` of a request that
/// failed upstream, or whose client left while it was out.
fn endpoint_tried<'v>(version: &'v VersionTarget, retried: &Retried) -> Option<&'v Arc<Upstream>> {
    use std::sync::atomic::Ordering::Relaxed;
    let used = match retried.last.load(Relaxed) {
        usize::MAX => retried.first.load(Relaxed),
        last => last,
    };
    version.balancer.endpoints().get(used & !CONNECTING)
}

/// How long a request may take.
struct Deadlines {
    /// A body that makes no progress for this long fails.
    body: std::time::Duration,
    /// The upstream's answer (the route's timeout, or a gRPC call's own
    /// shorter deadline).
    upstream: std::time::Duration,
    /// `upstream` is the route's timeout (not a call's own deadline).
    route_bound: bool,
    /// When the request came: `upstream` runs from here (the few
    /// microseconds of routing before the exchange count; a clock read
    /// fewer).
    start: Instant,
}

/// The request as it goes upstream (hop-by-hop headers dropped, its body
/// watched, a copy started for a mirror), this hop's forwarding headers
/// when they are not in its map yet (see [`Forwarding`]: set by
/// [`exchange`] once it knows who writes the request), and the client's
/// side of an upgrade. Outside [`forward`]'s future: nothing of this work
/// is kept there while the request is in flight.
fn outgoing(
    mut req: Request<Incoming>,
    hop: &mut Hop<'_>,
    body_timeout: std::time::Duration,
    upload: &Arc<Upload>,
    route: &RouteTarget,
) -> Result<Outgoing, ProxyError> {
    let upgrade = is_upgrade(req.version(), req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // An HTTP/1.x body being read keeps veer from looking for the client's
    // close until it has been (see `crate::conn::ClientClose`; HTTP/2 has
    // its own resets).
    let http1_body =
        parts.version < http::Version::HTTP_2 && !http_body::Body::is_end_stream(&body);
    let http2_body =
        parts.version == http::Version::HTTP_2 && !http_body::Body::is_end_stream(&body);
    let forwarding = prepare_request(
        &parts.method,
        &mut parts.uri,
        &mut parts.version,
        &mut parts.headers,
        &hop.peer,
        hop.client,
        hop.trusted_hops,
        hop.scheme,
        upgrade,
    )?;
    // The route's own changes, after the forwarding fields were made from
    // the request as it came (see `crate::edit`).
    if let Some(r) = &route.rewrite {
        r.apply(&mut parts.uri)?;
    }
    if let Some(e) = &route.request_edits {
        e.apply(&mut parts.headers);
    }
    // A body of no announced length is counted as it comes (one announced
    // longer than the route takes was refused by `handle`).
    let max_body = route.max_body;
    let unannounced = max_body != u64::MAX && http_body::Body::size_hint(&body).upper().is_none();
    let mut body = ClientBody::new(body, body_timeout, upload.clone());
    if unannounced {
        body.limit(max_body);
    }
    if let (true, Some(slot)) = (http1_body, &hop.slot) {
        body.tell_when_read(slot.activity().clone());
    }
    if http2_body {
        body.linger();
    }
    // An upgrade goes through hyper's client; a mirrored copy is made from
    // the head as it goes upstream.
    let shadow = hop.shadow.take().filter(|_| !upgrade);
    let forwarding = if upgrade || shadow.is_some() {
        forwarding.apply(&mut parts.headers);
        None
    } else {
        Some(forwarding)
    };
    if let Some(seed) = shadow {
        let copy = crate::mirror::start(*seed, &parts, &mut body, body_timeout);
        // Written beside the request (see `mirror::start`).
        if let (Some(copy), Some(arrival)) = (copy, &hop.arrival) {
            arrival.then_write(copy);
        }
    }
    Ok((
        Request::from_parts(parts, body),
        forwarding,
        downstream_upgrade,
    ))
}

/// What [`outgoing`] makes of a client's request: the request, its
/// forwarding headers, and the client's side of an upgrade.
type Outgoing = (
    Request<RequestBody>,
    Option<Arc<Forwarding>>,
    Option<hyper::upgrade::OnUpgrade>,
);

// Not an `async fn`: see `handle`.
#[allow(clippy::manual_async_fn)]
fn forward<'a>(
    route: &'a RouteTarget,
    version: &'a VersionTarget,
    pick: Pick,
    req: Request<Incoming>,
    mut hop: Hop<'a>,
    deadlines: Deadlines,
    upload: &'a Arc<Upload>,
) -> impl std::future::Future<Output = Result<Response<ProxyBody>, ProxyError>> + 'a {
    async move {
        let body_timeout = deadlines.body;
        let (mut req, forwarding, downstream_upgrade) =
            outgoing(req, &mut hop, body_timeout, upload, route)?;
        let upgrade = downstream_upgrade.is_some();
        // (false: the budget for such bodies was spent part-way.)
        if hop.read_whole && !upgrade && !req.body_mut().read_whole().await? {
            route.buffer_full.inc();
        }

        // Pinned here and lent to the deadline: a future passed by value into
        // another async fn is held twice (argument and pinned local).
        let watch = std::sync::OnceLock::new();
        let used = &hop.retried.first;
        let arrival = hop.arrival.as_ref();
        let due = deadlines.start + deadlines.upstream;
        // A request that can be sent again (`[route.retry]`) keeps its head
        // for it.
        let again = route.retry.as_deref().and_then(|r| {
            let plain = !upgrade && arrival.is_none();
            let how = (plain, hop.grpc);
            retriable(r, &mut req, &forwarding, pick, how, deadlines.start)
        });
        // (`move`: `due` not borrowed, so not kept in this future's state.)
        let start = deadlines.start;
        let try_due = again
            .as_ref()
            .map_or(due, move |(r, _)| r.try_due(start, due));
        // The answer is put here, not returned: a 300-byte value returned
        // through the deadline's select and loop was moved five times.
        let mut answer = None;
        let sent = {
            let exchange = exchange(
                route,
                version,
                pick,
                req,
                forwarding,
                upgrade,
                Lent {
                    watch: &watch,
                    arrival,
                    answer: &mut answer,
                    used,
                },
            );
            tokio::pin!(exchange);
            upstream_deadline(try_due, upload, exchange.as_mut(), hop.slot.as_deref()).await
        };
        let tried = Try {
            route,
            version,
            deadlines: &deadlines,
            grpc: hop.grpc,
            upload,
        };
        // (`exchange` is `Ok` only with an answer put.)
        let mut sent = match answer {
            Some(_) => sent,
            None => sent.and(Err(ProxyError::UpstreamProtocol)),
        };
        tried.settle(&mut sent, answer.as_ref(), &watch, used);
        if let Some((r, again)) = again {
            if r.wants(status_of(&sent, answer.as_ref(), hop.grpc), hop.grpc) {
                // The answer stays in place (not moved through this
                // future's state) unless a retry replaces it.
                let first = sent.and_then(|()| answer.take().ok_or(ProxyError::UpstreamProtocol));
                match boxed_retry(&tried, r, again, first, hop.retried).await {
                    Ok(last) => (sent, answer) = (Ok(()), Some(last)),
                    Err(e) => sent = Err(e),
                }
            }
        }
        let (resp, sender, upstream) = match sent {
            Ok(()) => answer.ok_or(ProxyError::UpstreamProtocol)?,
            Err(e) => {
                // The access log names the endpoint that failed it.
                if let Some(cell) = hop.served_by {
                    if let Some(u) = endpoint_tried(version, hop.retried) {
                        let _ = cell.set(u.clone());
                    }
                }
                return Err(e);
            }
        };
        if let Some(cell) = hop.served_by {
            let _ = cell.set(upstream.clone());
        }

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let tunnel = (upstream.addr(), hop.slot.clone(), hop.idle_timeout);
            return Ok(upgraded(resp, downstream_upgrade, tunnel));
        }
        let (mut parts, body) = resp.into_parts();
        // veer answers in its own version (RFC 9110, section 6.2: a proxy
        // sends its own): an HTTP/1.0 upstream's answer went out as
        // `HTTP/1.0 200`, and hyper's server then closed every client
        // connection after it. (The client's own HTTP/1.0 is still
        // answered in HTTP/1.0.)
        parts.version = http::Version::HTTP_11;
        // An answer framed twice (`Transfer-Encoding` and `Content-Length`)
        // is read by its transfer coding; its connection is not used again
        // (veer's own client closes it the same way, see `crate::raw`).
        let framed_twice = crate::headers::strip_answer(&mut parts.headers)?;
        if sender.is_some() {
            // Through hyper's client (veer's own makes a listed length one
            // as it reads the head, see `crate::raw`).
            crate::headers::one_length(&mut parts.headers);
        }
        let pooled = (!upgrade && !framed_twice)
            .then_some(sender)
            .flatten()
            .map(|s| (s, upstream));
        Ok(Response::from_parts(
            parts,
            ProxyBody::Upstream(UpstreamBody::boxed(body, body_timeout, pooled)),
        ))
    }
}

/// A request whose client named no host (HTTP/1.0 may not; HTTP/2 may
/// leave out `:authority`) goes with its endpoint's address as `Host`, as
/// nginx's `proxy_pass` names its upstream: an HTTP/1.1 request needs one,
/// and servers refuse it without (Go's net/http answers 400), so a load
/// balancer's HTTP/1.0 health check through veer failed on them. (Rare:
/// out of the request path's code.)
/// A mirrored copy of such a request names its canary endpoint the same
/// way (`crate::mirror`).
#[inline(never)]
pub(crate) fn name_the_endpoint(headers: &mut http::HeaderMap, upstream: &Upstream) {
    if let Ok(v) = HeaderValue::from_str(upstream.label()) {
        headers.insert(header::HOST, v);
    }
}

/// An upstream's 101 answer to an upgrade: the tunnel between the client
/// and the upstream (`addr`, holding the client connection's `slot`,
/// closed after `idle` with no byte either way) started, and the answer
/// to pass on. (Out of the request path's code: rare.)
#[inline(never)]
fn upgraded(
    mut resp: Response<UpBody>,
    downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    (addr, slot, idle): (
        SocketAddr,
        Option<Arc<crate::conn::Slot>>,
        std::time::Duration,
    ),
) -> Response<ProxyBody> {
    if let Some(down) = downstream_upgrade {
        let up = hyper::upgrade::on(&mut resp);
        tokio::spawn(tunnel(down, up, addr, slot, idle));
    }
    let (parts, _) = resp.into_parts();
    Response::from_parts(parts, ProxyBody::empty())
}

/// One try of a request to `version` of `route`: what settling it needs.
struct Try<'a> {
    route: &'a RouteTarget,
    version: &'a VersionTarget,
    deadlines: &'a Deadlines,
    grpc: bool,
    upload: &'a Upload,
}

impl Try<'_> {
    /// What a try's end (`sent`, and its `answer` when it is `Ok`) tells
    /// about its endpoint (back-off, outlier detection, an HTTP/2
    /// connection's health); a failure the client's broken body caused is
    /// made the client's. (In place: the answer, ~300 bytes, is not moved
    /// through it; inlined into the request path's future, as it was
    /// before retries called it too.)
    #[inline(always)]
    fn settle(
        &self,
        sent: &mut Result<(), ProxyError>,
        answer: Option<&Exchanged>,
        watch: &std::sync::OnceLock<crate::upstream::H2Watch>,
        used: &std::sync::atomic::AtomicUsize,
    ) {
        let (route, version) = (self.route, self.version);
        let outlier = route.outlier.as_ref().filter(|_| is_stable(route, version));
        let route_bound = self.deadlines.route_bound;
        match (sent, answer) {
            (Err(e), _) => {
                // A body the client broke fails the exchange: the client's fault.
                *e = self.upload.fault().unwrap_or(*e);
                let e = *e;
                // No answer in time on an HTTP/2 connection: is the
                // connection dead?
                if e == ProxyError::UpstreamTimeout && route_bound {
                    if let Some(w) = watch.get() {
                        w.timed_out();
                    }
                }
                let endpoint = used.load(std::sync::atomic::Ordering::Relaxed);
                if let Some(o) = outlier {
                    // (A try that had no connection yet, `CONNECTING`,
                    // names no endpoint here.)
                    outlier_failed(route, version, o, endpoint, e, route_bound);
                }
                say_failed(version, endpoint, e, route_bound);
            }
            (Ok(()), Some((resp, _, upstream))) => {
                upstream.mark_ok();
                if let Some(o) = outlier {
                    let bound = (route_bound, self.grpc);
                    outlier_answered(route, version, o, upstream, resp, bound);
                }
            }
            (Ok(()), None) => {}
        }
    }
}

/// What a request that `r` may send again keeps for it (its head, its
/// body when it was read whole or, for a `grpc` call, a copy of its
/// messages as they go, and the endpoint pick), counting it in the
/// route's budget; `None` for one that cannot go again (a method that is
/// not idempotent, unless a gRPC call on a route retrying UNAVAILABLE; a
/// body that streams, has trailers, or finds the held bytes' budget spent;
/// not `plain`: an upgrade, half of a mirrored pair). Out of the request
/// path's code.
#[inline(never)]
fn retriable<'r>(
    r: &'r crate::retry::RetryTarget,
    req: &mut Request<RequestBody>,
    forwarding: &Option<Arc<Forwarding>>,
    pick: Pick,
    (plain, grpc): (bool, bool),
    now: Instant,
) -> Option<(&'r crate::retry::RetryTarget, Box<crate::retry::Again>)> {
    if !plain {
        return None;
    }
    if grpc {
        if !r.settings.on_unavailable || r.keep_up_to == 0 {
            return None;
        }
        let again = crate::retry::Again::keep_call(req, r.keep_up_to, forwarding, pick);
        r.budget.request(now);
        return Some((r, again));
    }
    if !req.method().is_idempotent() {
        return None;
    }
    let body = kept_body(req)?;
    let again = crate::retry::Again::keep(req, body, forwarding, pick);
    r.budget.request(now);
    Some((r, again))
}

/// `req`'s body, to send again: none, or the bytes veer read whole before
/// the request went, with their share of what such bodies may hold
/// ([`crate::upload::HELD_BUDGET`]), kept with the copy (see
/// [`ClientBody::keep_whole`](crate::upload::ClientBody::keep_whole));
/// `None` for a body that streams.
fn kept_body(req: &mut Request<RequestBody>) -> Option<(bytes::Bytes, crate::upload::Grant)> {
    if http_body::Body::is_end_stream(req.body()) {
        return Some(Default::default());
    }
    req.body_mut().keep_whole()
}

/// [`retry`]'s future, boxed (out of the request path's code and future).
#[inline(never)]
fn boxed_retry<'a>(
    t: &'a Try<'a>,
    r: &'a crate::retry::RetryTarget,
    again: Box<crate::retry::Again>,
    answered: Result<Exchanged, ProxyError>,
    retried: &'a Retried,
) -> std::pin::Pin<Box<impl std::future::Future<Output = Result<Exchanged, ProxyError>> + 'a>> {
    Box::pin(retry(t, r, again, answered, retried))
}

/// A try's answer's status (and, for a `grpc` call, its head's
/// grpc-status), or how it failed.
fn status_of(
    sent: &Result<(), ProxyError>,
    answer: Option<&Exchanged>,
    grpc: bool,
) -> Result<(StatusCode, Option<u8>), ProxyError> {
    match (sent, answer) {
        (Ok(()), Some((resp, _, _))) => Ok((
            resp.status(),
            grpc.then(|| crate::grpc::status(resp.headers())).flatten(),
        )),
        (Ok(()), None) => Err(ProxyError::UpstreamProtocol),
        (Err(e), _) => Err(*e),
    }
}

/// Sends a request whose try failed (`answered`) again, as `r` allows: up
/// to `retries` times, each to the next endpoint of its version, while
/// the route's deadline and retry budget allow. The judge is told the
/// request failed (`retried`), whatever the last try's answer.
/// (Boxed by its caller: the request path's future holds none of this.)
async fn retry(
    t: &Try<'_>,
    r: &crate::retry::RetryTarget,
    mut again: Box<crate::retry::Again>,
    mut answered: Result<Exchanged, ProxyError>,
    retried: &Retried,
) -> Result<Exchanged, ProxyError> {
    let due = t.deadlines.start + t.deadlines.upstream;
    // How the judge hears a request sent again: failed as its first try
    // did (a gRPC call's UNAVAILABLE only if the route counts it).
    let failed = match answered {
        Err(ProxyError::UpstreamTimeout) => Some(Outcome::Timeout),
        _ if t.grpc => Some(crate::grpc::outcome(
            crate::grpc::UNAVAILABLE,
            t.route.grpc_errors,
            false,
        ))
        .filter(|o| *o != Outcome::Ok),
        _ => Some(Outcome::Error),
    };
    for _ in 0..r.settings.retries {
        let now = Instant::now();
        if now >= due {
            break;
        }
        // (None: a gRPC call's messages not all gone, or too many to keep.)
        let Some((req, forwarding)) = again.request() else {
            break;
        };
        if !r.budget.admit(now) {
            t.version.metrics.retried(false);
            break;
        }
        t.version.metrics.retried(true);
        if let Some(failed) = failed {
            let _ = retried.failed.set(failed);
        }
        retried
            .sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A failure sent again is still counted as the endpoint's (the
        // last try's, by `handle`).
        if let Some(kind) = answered.as_ref().err().and_then(|e| e.upstream_index()) {
            t.version.metrics.upstream_error(kind);
        }
        // The failed answer goes before the next try (its connection
        // back to the pool once its body is read, if short).
        if let Ok(failed) = answered {
            discard(failed);
        }
        again.pick = t.version.balancer.retry_pick(&again.pick, again.tried);
        again.tried |= 1u64 << (again.pick.first() % 64);
        let watch = std::sync::OnceLock::new();
        // (Where a client that leaves during the try finds its endpoint.)
        let used = &retried.last;
        used.store(usize::MAX, std::sync::atomic::Ordering::Relaxed);
        let mut answer = None;
        let lent = Lent {
            watch: &watch,
            arrival: None,
            answer: &mut answer,
            used,
        };
        // (A plain timeout: a request sent again has its body, if any, in
        // memory: no upload to wait for; and `upstream_deadline` called from here too would not
        // be inlined into the request path's own future any more.)
        let exchange = exchange(t.route, t.version, again.pick, req, forwarding, false, lent);
        let mut sent = tokio::time::timeout_at(r.try_due(now, due), exchange)
            .await
            .unwrap_or(Err(ProxyError::UpstreamTimeout));
        t.settle(&mut sent, answer.as_ref(), &watch, used);
        let wanted = r.wants(status_of(&sent, answer.as_ref(), t.grpc), t.grpc);
        answered = sent.and_then(|()| answer.ok_or(ProxyError::UpstreamProtocol));
        if !wanted {
            break;
        }
    }
    answered
}

/// The most of a failed try's answer's body that veer reads to keep its
/// connection (see [`discard`]): an error page is a few hundred bytes.
const DISCARD_BYTES: usize = 64 * 1024;

/// How long veer reads a failed try's answer's body to keep its
/// connection (see [`discard`]). An error page comes with its head, as
/// a rule; short, so that an endpoint whose failed answers trickle does
/// not hold many of its connections (its cap) for them.
const DISCARD_TIME: std::time::Duration = std::time::Duration::from_millis(250);

/// A failed try's answer that a retry replaces, not passed on. Its
/// HTTP/1.1 connection goes back to its endpoint's pool once its body is
/// read to the end, by a task of its own, as long as that takes at most
/// [`DISCARD_BYTES`] and [`DISCARD_TIME`] (a body already read whole, an
/// error page's as a rule, at once); otherwise the connection is closed.
/// An upstream failing many requests with short answers is not also
/// made to take a new connection (and a TLS handshake) for each one
/// retried. An HTTP/2 answer's stream is reset (its connection stays).
#[inline(never)]
fn discard((resp, sender, upstream): Exchanged) {
    use http_body::Body;
    if resp.version() == http::Version::HTTP_2 {
        return;
    }
    let (parts, body) = resp.into_parts();
    // Framed twice: read by its transfer coding, never used again (as
    // `forward` and veer's own client keep it).
    if crate::headers::framed_twice(&parts.headers)
        || body.size_hint().lower() > DISCARD_BYTES as u64
    {
        return;
    }
    // (veer's own client's body holds its connection: `sender` is None.)
    let pooled = sender.map(|s| (s, upstream));
    let mut body = UpstreamBody::boxed(body, DISCARD_TIME, pooled);
    if body.is_end_stream() {
        return; // given back already
    }
    tokio::spawn(async move {
        let read = async {
            let mut bytes = 0;
            while let Some(Ok(frame)) = http_body_util::BodyExt::frame(&mut body).await {
                bytes += frame.data_ref().map_or(0, |d| d.len());
                if bytes > DISCARD_BYTES {
                    break;
                }
            }
        };
        // At its end the body gave its connection back; dropped before
        // it, the body closes it.
        let _ = tokio::time::timeout(DISCARD_TIME, read).await;
    });
}

/// Whether `body` is read whole before its request takes an upstream
/// connection: it announces a length no longer than `limit` (`[proxy]
/// request_buffer`; 0: none is), or, announcing none (chunked, or HTTP/2
/// frames without `content-length`), its route takes no longer a body
/// than that (`max_body`), so that one over the route's limit is refused
/// before any upstream hears of it. See [`crate::upload`].
#[inline(never)] // a bodiless request never calls it
fn read_first(body: &Incoming, limit: usize, max_body: u64) -> bool {
    use http_body::Body;
    limit > 0
        && match body.size_hint().upper() {
            Some(n) => n <= limit as u64,
            None => max_body <= limit as u64,
        }
}

/// One of `upstream`'s upload slots (see [`Upstream::upload_slot_now`]),
/// waiting at most `timeout` (the clock read only then), and what is left
/// of it.
async fn upload_slot(
    upstream: &Upstream,
    timeout: std::time::Duration,
) -> Result<
    (
        Option<tokio::sync::SemaphorePermit<'_>>,
        std::time::Duration,
    ),
    ProxyError,
> {
    if let Some(slot) = upstream.upload_slot_now() {
        return Ok((slot, timeout));
    }
    let start = Instant::now();
    let slot = upstream.wait_upload_slot(timeout).await?;
    let left = timeout.saturating_sub(start.elapsed());
    Ok((Some(slot), left.max(std::time::Duration::from_millis(1))))
}

/// Runs `exchange` until `due` (the route's `timeout` after the request
/// came), counting only the upstream's time: the deadline moves out by
/// however long the request body waited for the client (see
/// [`crate::upload`]). The timer is the client
/// connection's kept one when there is one ([`Slot::take_timer`]), and is
/// given back when the exchange is done.
///
/// [`Slot::take_timer`]: crate::conn::Slot::take_timer
async fn upstream_deadline<T>(
    due: tokio::time::Instant,
    upload: &Upload,
    exchange: impl std::future::Future<Output = Result<T, ProxyError>>,
    slot: Option<&crate::conn::Slot>,
) -> Result<T, ProxyError> {
    let mut sleep = match slot {
        Some(s) => s.take_timer(due),
        None => Box::pin(tokio::time::sleep_until(due)),
    };
    tokio::pin!(exchange);
    let r = loop {
        tokio::select! {
            biased;
            r = &mut exchange => break r,
            () = sleep.as_mut() => {
                let now = tokio::time::Instant::now();
                let deadline = due + upload.client_time(now);
                if deadline <= now {
                    break Err(ProxyError::UpstreamTimeout);
                }
                sleep.as_mut().reset(deadline);
            }
        }
    };
    if let Some(s) = slot {
        s.give_timer(sleep);
    }
    r
}

/// An upstream's answer: the response, the connection it came on when
/// hyper read it (a raw connection travels in the body), and the endpoint.
type Exchanged = (Response<UpBody>, Option<Sender>, Arc<Upstream>);

/// What [`forward`] lends [`exchange`]: the HTTP/2 connection's watch, a
/// mirrored pair's timing, where the answer goes, and where the index of
/// the endpoint the request went to (among its version's) goes, marked
/// [`CONNECTING`] until it has a connection.
struct Lent<'a> {
    watch: &'a std::sync::OnceLock<crate::upstream::H2Watch>,
    arrival: Option<&'a Arc<crate::raw::Arrival>>,
    answer: &'a mut Option<Exchanged>,
    used: &'a std::sync::atomic::AtomicUsize,
}

/// Whether `version` is `route`'s stable one: outlier detection ejects
/// only stable's endpoints. A canary's failing endpoint is evidence
/// against the canary, for the judge to see (its revert moves every
/// canary user to stable), not to hide.
fn is_stable(route: &RouteTarget, version: &VersionTarget) -> bool {
    std::ptr::eq(version, &route.stable)
}

/// Outlier detection: `upstream` answered `resp`. A 5xx is a failure, and
/// so is a gRPC call that failed with one of the route's
/// `grpc_error_codes` (not a caller's own deadline: `route_bound` false),
/// told in the head (a trailers-only answer) or, for a `grpc` call, in
/// the trailers (counted at the body's end, [`outlier_counted`]); anything
/// else is not.
#[inline(never)] // out of the request path's code unless asked for
fn outlier_answered(
    route: &RouteTarget,
    version: &VersionTarget,
    o: &veer_control::config::OutlierDetection,
    upstream: &Upstream,
    resp: &Response<UpBody>,
    (route_bound, grpc): (bool, bool),
) {
    let status = resp.status().as_u16();
    let failed = match status {
        500.. => Some(Failed::Status(status)),
        200 => match crate::grpc::status(resp.headers()) {
            Some(c) => (crate::grpc::outcome(c, route.grpc_errors, !route_bound) != Outcome::Ok)
                .then_some(Failed::Grpc(c)),
            // Its status is in the trailers, to come.
            None if grpc => return,
            None => None,
        },
        _ => None,
    };
    outlier_counted(route, version, o, upstream, failed);
}

/// Outlier detection: a request `upstream` (one of `version`'s endpoints)
/// took ended, `failed` or not: logs and counts an ejection, or its end.
pub(crate) fn outlier_counted(
    route: &RouteTarget,
    version: &VersionTarget,
    o: &veer_control::config::OutlierDetection,
    upstream: &Upstream,
    failed: Option<Failed>,
) {
    match (
        upstream.outlier_answer(failed, o, version.balancer.endpoints()),
        failed,
    ) {
        (Some(Ejection::Out(time, streak)), Some(f)) => {
            ejected(route, version, upstream, o, f, (time, streak));
        }
        (Some(Ejection::Back), _) => back_in(route, version, upstream),
        _ => {}
    }
}

/// The access log's `why` of a request that had no answer's head in time
/// (a 504): the route's `timeout` (`timeout`, which ran `elapsed`), or, on
/// a route that sends a slow try again, its last try's `try_timeout` when
/// the route's had not passed (no try left, or the retry budget spent).
#[cold]
#[inline(never)]
fn timed_out_why(
    route: &RouteTarget,
    timeout: std::time::Duration,
    elapsed: std::time::Duration,
) -> String {
    match route.retry.as_ref().and_then(|r| r.settings.try_timeout) {
        Some(t) if elapsed < timeout => {
            format!("the last try had no answer within {t:?} ([route.retry] try_timeout)")
        }
        _ => format!("no answer within {timeout:?} ([route] timeout)"),
    }
}

/// Says in the log (at most every 10 s an endpoint, see
/// [`Upstream::say_failed`]) that a try on a connection to the endpoint
/// `used` (see [`Lent`]) was reset or got no answer within the route's
/// timeout: with the access log off (its default) nothing else named the
/// endpoint, where nginx's error log says each ("upstream prematurely
/// closed connection", "upstream timed out"). A failed connect and a
/// broken answer are said where they happen.
#[cold]
#[inline(never)]
fn say_failed(version: &VersionTarget, used: usize, e: ProxyError, route_bound: bool) {
    let timeout = match e {
        ProxyError::UpstreamReset => false,
        ProxyError::UpstreamTimeout if route_bound => true,
        _ => return,
    };
    if used & CONNECTING != 0 {
        return;
    }
    if let Some(u) = version.balancer.endpoints().get(used) {
        u.say_failed(timeout);
    }
}

/// Outlier detection: a request that failed with `e` after its endpoint
/// (`endpoint`, an index among `version`'s; `usize::MAX`: none was
/// reached) took it. A reset, a malformed answer, and the route's timeout
/// passing (`route_bound`: not a gRPC call's own shorter deadline) count
/// against the endpoint; a failed connect has its own back-off, and a
/// client's fault is never the endpoint's.
#[inline(never)]
fn outlier_failed(
    route: &RouteTarget,
    version: &VersionTarget,
    o: &veer_control::config::OutlierDetection,
    endpoint: usize,
    e: ProxyError,
    route_bound: bool,
) {
    let failed = match e {
        ProxyError::UpstreamTimeout if route_bound => Failed::Timeout,
        ProxyError::UpstreamReset => Failed::Reset,
        ProxyError::UpstreamProtocol => Failed::Malformed,
        _ => return,
    };
    if let Some(upstream) = version.balancer.endpoints().get(endpoint) {
        outlier_counted(route, version, o, upstream, Some(failed));
    }
}

/// How `version` names `upstream` (as configured: a name, or its address).
fn endpoint_name(version: &VersionTarget, upstream: &Upstream) -> String {
    version
        .balancer
        .members()
        .find(|(_, _, u)| std::ptr::eq(&***u, upstream))
        .map_or_else(|| upstream.label().to_string(), |(n, _, _)| n.to_string())
}

/// Logs an ejected endpoint's first success after its ejection ran out.
#[cold]
fn back_in(route: &RouteTarget, version: &VersionTarget, upstream: &Upstream) {
    tracing::info!(
        route = %route.name,
        version = %version.name,
        endpoint = %endpoint_name(version, upstream),
        "outlier detection: endpoint back in; a request succeeded after its ejection ran out"
    );
}

/// Logs and counts an ejection by outlier detection.
#[cold]
fn ejected(
    route: &RouteTarget,
    version: &VersionTarget,
    upstream: &Upstream,
    o: &veer_control::config::OutlierDetection,
    last: Failed,
    (time, streak): (std::time::Duration, u32),
) {
    let endpoint = endpoint_name(version, upstream);
    version.metrics.ejected();
    tracing::warn!(
        route = %route.name,
        version = %version.name,
        endpoint = %endpoint,
        errors = o.consecutive_errors,
        last = %last,
        for_s = time.as_secs(),
        in_a_row = streak,
        "outlier detection: endpoint ejected; its keys go to the next endpoint of its version"
    );
}

/// Gets a connection (retrying a failed connect once on the next endpoint)
/// and sends the request on it: over a raw connection ([`crate::raw`])
/// when the request allows it and the endpoint is `http://`. The answer
/// goes to `lent.answer`; `Ok` says it is there.
// Not an `async fn`: see `handle`.
#[allow(clippy::manual_async_fn)]
fn exchange<'a>(
    route: &'a RouteTarget,
    version: &'a VersionTarget,
    pick: Pick,
    mut req: Request<RequestBody>,
    forwarding: Option<Arc<Forwarding>>,
    upgrade: bool,
    lent: Lent<'a>,
) -> impl std::future::Future<Output = Result<(), ProxyError>> + 'a {
    async move {
        let Lent {
            watch,
            arrival,
            answer,
            used,
        } = lent;
        // A request with a body goes raw unless it is half of a mirrored
        // pair (whose timing, `arrival`, is hyper's path's for bodies).
        let bodied = !http_body::Body::is_end_stream(req.body());
        let raw = route.raw_http1
            && !upgrade
            && if bodied {
                arrival.is_none() && crate::raw::eligible_body(&req)
            } else {
                crate::raw::eligible_head(req.method(), req.headers())
            };
        let endpoints = version.balancer.endpoints();
        let Some(first) = endpoints.get(pick.first()) else {
            return Err(ProxyError::UpstreamConnect);
        };
        // A body still to come from the client holds one of the endpoint's
        // upload slots until the answer's head (see `Upstream::upload_slot_now`).
        let streams = bodied && req.body().streams();
        let mut slot = None;
        let mut timeout = route.connect_timeout;
        if streams {
            (slot, timeout) = upload_slot(first, timeout).await?;
        }
        used.store(
            pick.first() | CONNECTING,
            std::sync::atomic::Ordering::Relaxed,
        );
        let (mut sender, upstream, index) = match first.get(timeout, upgrade, raw).await {
            Ok(s) => (s, first, pick.first()),
            // The cap is not the endpoint failing: no back-off, no retry elsewhere.
            Err(e @ (ProxyError::Overloaded | ProxyError::UpgradeUnsupported)) => return Err(e),
            Err(e) => {
                first.mark_failed(e);
                version.metrics.upstream_error(0);
                let Some((index, second)) = version
                    .balancer
                    .fallback(&pick)
                    .and_then(|i| Some((i, endpoints.get(i)?)))
                else {
                    return Err(e);
                };
                timeout = route.connect_timeout;
                if streams {
                    drop(slot.take());
                    (slot, timeout) = upload_slot(second, timeout).await?;
                }
                used.store(index | CONNECTING, std::sync::atomic::Ordering::Relaxed);
                match second.get(timeout, upgrade, raw).await {
                    Ok(s) => (s, second, index),
                    Err(e @ (ProxyError::Overloaded | ProxyError::UpgradeUnsupported)) => {
                        return Err(e)
                    }
                    Err(e) => {
                        second.mark_failed(e);
                        return Err(e);
                    }
                }
            }
        };
        // Held until the answer's head, or the exchange's failure.
        let _slot = slot;
        used.store(index, std::sync::atomic::Ordering::Relaxed);
        let hostless = match &forwarding {
            Some(f) => !f.has_host(),
            None => !req.headers().contains_key(header::HOST),
        };
        if hostless {
            name_the_endpoint(req.headers_mut(), upstream);
        }
        if sender.is_raw() {
            // In the request path's future, not boxed on its own: boxing
            // (an allocation and a move of the whole exchange's state) cost
            // ~310 instructions a request; inline, the future hyper keeps
            // for each client connection is larger: 21.1 -> 21.6 KiB an
            // idle connection (`benches/idle-conns.py`, benches/RESULTS.md).
            let sent = if bodied {
                // Boxed: the bodiless request's future stays as small.
                Box::pin(crate::raw::send_body(
                    sender,
                    upstream.clone(),
                    req,
                    forwarding,
                ))
                .await
            } else {
                crate::raw::send(
                    sender,
                    upstream.clone(),
                    req,
                    forwarding,
                    route.connect_timeout,
                    arrival,
                )
                .await
            };
            return match sent {
                Ok(resp) => {
                    *answer = Some((resp.map(UpBody::Right), None, upstream.clone()));
                    Ok(())
                }
                Err(e) => {
                    // As on hyper's path: a reset, or the fresh connection
                    // for a second try not opening, is the endpoint failing.
                    if matches!(e, ProxyError::UpstreamReset | ProxyError::UpstreamConnect) {
                        upstream.mark_failed(e);
                    }
                    Err(e)
                }
            };
        }
        if let Some(f) = forwarding {
            f.apply(req.headers_mut());
        }
        if let Some(a) = arrival {
            // A copy waiting for this request goes now (hyper's client
            // task writes the request a moment later).
            a.written();
        }
        // A request sent as an HTTP/2 stream keeps its head, and its body
        // when it has none or veer read it whole first: a stream the server
        // refused unprocessed (a GOAWAY that crossed it, as on a graceful
        // shutdown; REFUSED_STREAM) is sent again. So does an idempotent
        // one on an HTTP/1.1 connection that lay idle (see `STALE_AFTER`)
        // and that the server closed under it (see `stale_keep_alive`).
        // (Boxed: it is rare on HTTP/1.1, and the request path's future
        // stays small.)
        let stale = sender.lay_idle() && req.method().is_idempotent();
        let again = (sender.is_h2() || stale)
            .then(|| resendable(&mut req))
            .flatten();
        if let Some(w) = sender.h2_watch() {
            let _ = watch.set(w);
        }
        let (resp, sender, upstream) = match sender.try_send_request(req)?.await {
            Ok(resp) => (resp, sender, upstream.clone()),
            // Rare: its own boxed future, out of the request path's.
            Err(e) => Box::pin(resend(route, upstream, sender, e, again, stale)).await?,
        };
        *answer = Some((resp.map(UpBody::Left), Some(sender), upstream));
        Ok(())
    }
}

/// `req`'s head and body, kept to send it again on a fresh connection
/// should its own refuse it unprocessed (see [`resend`]): a request
/// without a body, or one whose body veer read whole before it went (its
/// bytes shared, held until the answer's head and counted meanwhile in
/// what such bodies may hold, [`crate::upload::HELD_BUDGET`]); `None` for
/// one whose body streams.
fn resendable(req: &mut Request<RequestBody>) -> Option<Box<Resendable>> {
    let (body, grant) = kept_body(req)?;
    Some(Box::new(Resendable {
        req: crate::retry::copy_head(req, body),
        grant,
    }))
}

/// A request kept to be sent again ([`resendable`]), and its body's share
/// of the held bytes.
struct Resendable {
    req: Request<bytes::Bytes>,
    grant: crate::upload::Grant,
}

/// After [`exchange`]'s request failed on its connection: a request the
/// connection gave back (it closed before the request was written), or
/// one that may be sent again (see `again` there), goes on a fresh
/// connection; any other failure is the exchange's.
async fn resend(
    route: &RouteTarget,
    upstream: &Arc<Upstream>,
    sender: Sender,
    mut e: hyper::client::conn::TrySendError<Request<RequestBody>>,
    again: Option<Box<Resendable>>,
    stale: bool,
) -> Result<(Response<Incoming>, Sender, Arc<Upstream>), ProxyError> {
    // The kept body's bytes stay counted until the resent request's answer.
    let mut _held = None;
    let message = e.take_message().or_else(|| {
        let resend = if stale {
            crate::upstream::stale_keep_alive(e.error())
        } else {
            crate::upstream::refused_unprocessed(e.error())
        };
        again.filter(|_| resend).map(|kept| {
            let Resendable { req, grant } = *kept;
            _held = Some(grant);
            req.map(RequestBody::copy)
        })
    });
    let Some(req) = message else {
        let kind = ProxyError::from_hyper(e.error());
        if kind == ProxyError::UpstreamReset {
            upstream.mark_failed(kind);
        }
        if kind == ProxyError::UpstreamProtocol {
            return Err(upstream.say_malformed(e.error()));
        }
        return Err(kind);
    };
    // Its permit goes back before a fresh connection asks for one.
    drop(sender);
    let mut fresh = upstream
        .connect(route.connect_timeout)
        .await
        .inspect_err(|e| {
            if *e != ProxyError::Overloaded {
                upstream.mark_failed(*e)
            }
        })?;
    let resp = fresh.send_request(req).await?;
    Ok((resp, fresh, upstream.clone()))
}

/// Copies both ways between an upgraded client and upstream until either
/// side closes or no byte moves for `idle`; holds the client connection's
/// `slot` meanwhile.
async fn tunnel(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    addr: SocketAddr,
    slot: Option<Arc<crate::conn::Slot>>,
    idle: std::time::Duration,
) {
    let _slot = slot;
    match tokio::try_join!(down, up) {
        Ok((down, up)) => {
            let base = tokio::time::Instant::now();
            let last = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let mut down = crate::conn::Watched::new(TokioIo::new(down), last.clone(), base);
            let mut up = TokioIo::new(up);
            let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
            tokio::pin!(copy);
            let sleep = tokio::time::sleep(idle);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    r = &mut copy => {
                        if let Err(e) = r {
                            tracing::debug!(upstream = %addr, error = %e, "tunnel ended");
                        }
                        return;
                    }
                    () = &mut sleep => {
                        let last_ms = last.load(std::sync::atomic::Ordering::Relaxed);
                        let due = base + std::time::Duration::from_millis(last_ms) + idle;
                        if due <= tokio::time::Instant::now() {
                            tracing::debug!(upstream = %addr, "tunnel idle for idle_timeout: closed");
                            return;
                        }
                        sleep.as_mut().reset(due);
                    }
                }
            }
        }
        Err(e) => tracing::debug!(upstream = %addr, error = %e, "upgrade failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_id_is_taken_only_from_a_valid_traceparent() {
        let id = |v: &str| trace_id(&HeaderValue::from_str(v).unwrap()).map(str::to_string);
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            id(good).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        // A later version may carry more after a dash; version 00 not.
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        assert!(id(later).is_some());
        for bad in [
            &format!("{good}-x") as &str,
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736",
            "",
        ] {
            assert_eq!(id(bad), None, "{bad}");
        }
    }
}
