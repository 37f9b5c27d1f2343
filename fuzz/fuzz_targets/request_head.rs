//! Request-head handling on arbitrary heads: the routing host, path
//! normalisation, the client address behind proxies, sticky-key
//! extraction and the upstream head. None may panic, and what they return
//! keeps its promises: a normalised path has no dot-segment, the upstream
//! head has no hop-by-hop header and one Host.
#![no_main]

use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};
use libfuzzer_sys::fuzz_target;
use veer_control::config::StickySource;
use veer_proxy::headers::{client_addr, prepare_request, routing_host};
use veer_proxy::split::{sticky_key, KeyBuf, StickyKey};

fuzz_target!(|data: &[u8]| {
    // First line: the request target; then "name: value" lines.
    let mut lines = data.split(|b| *b == b'\n');
    let target = lines.next().unwrap_or_default();
    let Ok(target) = std::str::from_utf8(target) else { return };
    let Ok(mut uri) = target.parse::<Uri>() else { return };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value.trim_ascii())) {
            headers.append(n, v);
        }
    }
    let peer: SocketAddr = "192.0.2.7:40000".parse().unwrap();

    // The service refuses a head whose host is ambiguous before preparing
    // it for the upstream.
    let routed = routing_host(&uri, &headers).is_ok();
    if let Ok(p) = veer_proxy::path::normalize(uri.path()) {
        // Origin form, or `*` (OPTIONS), or empty (authority form).
        assert!(p.starts_with('/') || p.is_empty() || p == "*", "{p:?}");
        for seg in p.split('/') {
            assert!(seg != "." && seg != "..", "dot-segment left in {p:?} (from {:?})", uri.path());
        }
    }
    for hops in 0..3 {
        let _ = client_addr(&headers, peer, hops);
    }
    let sources: Vec<StickyKey> = [
        StickySource::Header("x-user-id".into()),
        StickySource::Cookie("session".into()),
        StickySource::ClientIp,
    ]
    .iter()
    .filter_map(StickyKey::from_config)
    .collect();
    let mut buf = KeyBuf::default();
    let _ = sticky_key(&sources, &headers, &peer, &mut buf);

    let mut version = Version::HTTP_11;
    let upgrade = veer_proxy::headers::is_upgrade(version, &headers);
    let client = client_addr(&headers, peer, 1);
    if routed
        && prepare_request(
        &Method::GET,
        &mut uri,
        &mut version,
        &mut headers,
        &veer_proxy::headers::Peer::new(peer),
        client,
        1,
        veer_proxy::headers::Scheme::Http,
        upgrade,
    )
    .is_ok()
    {
        for h in ["keep-alive", "proxy-connection", "transfer-encoding"] {
            assert!(!headers.contains_key(h), "{h} left in the upstream head");
        }
        // An upgrade keeps `Connection: upgrade`, and nothing else.
        for c in headers.get_all("connection") {
            assert!(upgrade && c.as_bytes().eq_ignore_ascii_case(b"upgrade"), "connection {c:?} left in the upstream head");
        }
        if !upgrade {
            assert!(!headers.contains_key("upgrade"), "upgrade left in the upstream head");
        }
        if let Some(te) = headers.get("te") {
            assert_eq!(te, "trailers", "te other than trailers left in the upstream head");
        }
        assert!(headers.get_all("host").iter().count() <= 1, "two Host headers upstream");
        assert!(uri.authority().is_none(), "the upstream target is not origin-form: {uri}");
    }
});
