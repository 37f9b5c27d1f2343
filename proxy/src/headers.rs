//! Header rewriting between client and upstream.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and every header it
//! names, `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`,
//! `Transfer-Encoding`, `Upgrade`) are removed both ways, except the
//! `Connection: upgrade` / `Upgrade` pair of a protocol upgrade. Requests get
//! `X-Forwarded-For` (the client IP appended), `X-Forwarded-Proto` and
//! `X-Forwarded-Host` (both replaced).

use std::io::Write;
use std::net::SocketAddr;

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri, Version};

use crate::error::ProxyError;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

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
        && headers.contains_key(header::UPGRADE)
        && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Removes hop-by-hop headers; `keep_upgrade` keeps the upgrade pair.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(keep_upgrade && n == header::UPGRADE))
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
    headers.remove(header::TRAILER);
    headers.remove(header::TRANSFER_ENCODING);
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// Turns a client's request head into the upstream's: origin-form URI,
/// HTTP/1.1, a `Host`, no hop-by-hop headers, forwarding headers set.
pub fn prepare_request(
    method: &Method,
    uri: &mut Uri,
    version: &mut Version,
    headers: &mut HeaderMap,
    peer: SocketAddr,
    scheme: Scheme,
    upgrade: bool,
) -> Result<(), ProxyError> {
    if method == Method::CONNECT {
        return Err(ProxyError::BadRequest);
    }
    if !headers.contains_key(header::HOST) {
        if let Some(a) = uri.authority() {
            let v = HeaderValue::from_str(a.as_str()).map_err(|_| ProxyError::BadRequest)?;
            headers.insert(header::HOST, v);
        }
    }
    if uri.scheme().is_some() || uri.authority().is_some() {
        let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
        *uri = Uri::try_from(pq).map_err(|_| ProxyError::BadRequest)?;
    }
    *version = Version::HTTP_11;
    strip_hop_by_hop(headers, upgrade);

    let mut xff = BytesMut::with_capacity(64);
    if let Some(prev) = headers.get(&X_FORWARDED_FOR) {
        xff.extend_from_slice(prev.as_bytes());
        xff.extend_from_slice(b", ");
    }
    let _ = write!(WriteBytes(&mut xff), "{}", peer.ip().to_canonical());
    let xff = HeaderValue::from_maybe_shared(xff.freeze()).map_err(|_| ProxyError::BadRequest)?;
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    headers.insert(X_FORWARDED_PROTO.clone(), scheme.value());
    if let Some(h) = headers.get(header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST.clone(), h);
    }
    Ok(())
}

struct WriteBytes<'a>(&'a mut BytesMut);

impl Write for WriteBytes<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let peer = "[::ffff:10.1.2.3]:4000".parse().expect("addr");
        prepare_request(
            &Method::GET,
            &mut uri,
            &mut v,
            &mut h,
            peer,
            Scheme::Https,
            false,
        )
        .expect("ok");
        assert_eq!(uri, "/a?b=1");
        assert_eq!(v, Version::HTTP_11);
        assert!(!h.contains_key("x-secret") && !h.contains_key("keep-alive"));
        assert!(!h.contains_key(header::CONNECTION));
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "shop.test");
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
}
