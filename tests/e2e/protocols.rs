//! Protocol handling: malformed input, limits, headers, streaming bodies,
//! WebSocket, HTTPS with HTTP/2 by ALPN, and h2c.

use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::support::{get, route_config, with_tls, Client, Upstream, Veer};

/// The access log's lines as (path, `field`) pairs ("" when absent).
fn access_pairs<'a>(lines: &'a [serde_json::Value], field: &str) -> Vec<(&'a str, &'a str)> {
    lines
        .iter()
        .filter(|l| l["target"] == "veer::access")
        .map(|l| {
            (
                l["path"].as_str().unwrap_or(""),
                l[field].as_str().unwrap_or(""),
            )
        })
        .collect()
}

async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP/2 client's cookie crumbs (browsers send each cookie as a field
/// of its own over HTTP/2) reach an HTTP/1.1 upstream as one `Cookie`
/// field, joined with "; " as RFC 9113 (8.2.3) asks: they went as several
/// `Cookie` lines, which servers may read one of, or join with commas.
/// The sticky cookie is still found among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_clients_cookie_crumbs_reach_an_http1_upstream_as_one_field() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let config = route_config(&[s.addr], &[c.addr], 50.0, "").replace(
        r#"sticky = ["header:x-user-id", "client-ip"]"#,
        r#"sticky = ["cookie:session"]"#,
    );
    let veer = Veer::start(&config).await;
    let mut h2 = super::support::h2c(veer.addr).await;
    let mut seen = std::collections::HashSet::new();
    for i in 0..40 {
        let req = Request::get(format!("http://app.test/crumbs-{i}"))
            .header("cookie", "a=1")
            .header("cookie", format!("session=u{i}"))
            .header("cookie", "z=26")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = h2.send_request(req).await.unwrap();
        assert_eq!(r.status(), 200);
        let who = r.headers()["x-upstream"].to_str().unwrap().to_string();
        let up = if who == "stable" { &s } else { &c };
        let headers = up.last_headers.lock().unwrap().clone();
        let cookies: Vec<_> = headers.get_all("cookie").iter().collect();
        assert_eq!(cookies.len(), 1, "{headers:?}");
        assert_eq!(cookies[0], format!("a=1; session=u{i}; z=26").as_str());
        // Each session keeps its version.
        let again = Request::get("http://app.test/again")
            .header("cookie", "a=1")
            .header("cookie", format!("session=u{i}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = h2.send_request(again).await.unwrap();
        assert_eq!(r.headers()["x-upstream"].to_str().unwrap(), who, "u{i}");
        seen.insert(who);
    }
    assert_eq!(seen.len(), 2, "40 sessions at 50 % all went to {seen:?}");
    // One field stays as it came.
    let one = Request::get("http://app.test/one")
        .header("cookie", "session=solo; b=2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = h2.send_request(one).await.unwrap();
    let who = r.headers()["x-upstream"].to_str().unwrap().to_string();
    let up = if who == "stable" { &s } else { &c };
    assert_eq!(
        up.last_headers.lock().unwrap()["cookie"],
        "session=solo; b=2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_gets_400_and_the_proxy_keeps_serving() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    let answer = raw(
        veer.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = raw(veer.addr, b"\x16\x03\x01garbage\r\n\r\n").await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    assert_eq!(get(veer.addr, "/", &[]).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    let big = "a".repeat(40_000);
    let req = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let answer = raw(veer.addr, req.as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "{}",
        &answer[..answer.len().min(80)]
    );
    assert_eq!(get(veer.addr, "/", &[]).await.unwrap().status(), 200);
}

/// Request bodies are read in pieces of up to 64 KiB, more than the head cap
/// (`max_header_bytes`, 16 KiB by default): a connection whose reads grew
/// that large for bodies still takes no head over the cap, even one that
/// comes whole in one read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_cap_holds_on_a_connection_that_carried_large_bodies() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    let mut c = Client::connect(veer.addr).await.unwrap();
    for _ in 0..3 {
        let r = c
            .send(
                http::Method::POST,
                "/",
                &[],
                Bytes::from(vec![b'x'; 256 * 1024]),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let under = "a".repeat(15_000);
    let r = c.get("/", &[("x-big", &under)]).await.unwrap();
    assert_eq!(r.status(), 200);
    let over = "a".repeat(20_000);
    let r = c.get("/", &[("x-big", &over)]).await.unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(get(veer.addr, "/", &[]).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_set_and_hop_by_hop_removed() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    let mut c = Client::connect(veer.addr).await.unwrap();
    let r = c
        .get(
            "/",
            &[
                ("host", "shop.test"),
                ("x-forwarded-for", "203.0.113.1"),
                ("connection", "x-private"),
                ("x-private", "secret"),
                ("keep-alive", "timeout=5"),
                ("x-kept", "1"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = s.last_headers.lock().unwrap().clone();
    assert_eq!(h["x-forwarded-for"], "203.0.113.1, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.test");
    assert_eq!(h["host"], "shop.test");
    assert_eq!(h["x-kept"], "1");
    assert!(
        !h.contains_key("x-private") && !h.contains_key("keep-alive"),
        "{h:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_request_id_on_every_request_carries_one_upstream_back_and_in_the_log() {
    let s = Upstream::start("stable").await;
    let off = route_config(&[s.addr], &[], 0.0, "");
    let veer = Veer::start(&off).await;
    let mut c = Client::connect(veer.addr).await.unwrap();
    let r = c.get("/", &[]).await.unwrap();
    assert!(!r.headers().contains_key("x-request-id"), "off by default");
    assert!(!s.last_headers.lock().unwrap().contains_key("x-request-id"));

    veer.write_config(&off.replacen(
        "[proxy]\n",
        "[proxy]\nrequest_id = true\naccess_log = \"all\"\n",
        1,
    ));
    veer.wait_generation(2).await;
    let upstream_id = || s.last_headers.lock().unwrap()["x-request-id"].clone();
    // A new one, through veer's own HTTP/1.1 client (a bodiless GET) and
    // hyper's (a chunked POST).
    let r = c.get("/new", &[]).await.unwrap();
    let id = r.headers()["x-request-id"].clone();
    let text = id.to_str().unwrap().to_string();
    assert!(
        text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit()),
        "{text}"
    );
    assert_eq!(upstream_id(), id);
    let chunked = Bytes::from_static(b"3\r\nabc\r\n0\r\n\r\n");
    let r = c
        .send(
            http::Method::POST,
            "/chunked",
            &[("transfer-encoding", "chunked")],
            chunked,
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let posted = r.headers()["x-request-id"].clone();
    assert_eq!(upstream_id(), posted);
    assert_ne!(posted, id);
    // The client's own, kept (one plain one).
    let r = c
        .get("/kept", &[("x-request-id", "client-7")])
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-7");
    assert_eq!(upstream_id(), "client-7");
    // veer's own answers carry it too (two Host fields: 400).
    let mut raw = TcpStream::connect(veer.addr).await.unwrap();
    raw.write_all(b"GET /bad HTTP/1.1\r\nhost: a\r\nhost: b\r\nx-request-id: bad-1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 1024];
    let n = raw.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_lowercase();
    assert!(answer.starts_with("http/1.1 400"), "{answer}");
    assert!(answer.contains("x-request-id: bad-1"), "{answer}");
    let lines = veer.logs_with_at_least("request", 4).await;
    let logged = access_pairs(&lines, "request_id");
    for want in [
        ("/new", text.as_str()),
        ("/chunked", posted.to_str().unwrap()),
        ("/kept", "client-7"),
        ("/bad", "bad-1"),
    ] {
        assert!(logged.contains(&want), "{want:?} not in {logged:?}");
    }
}

/// Each access log line says how its request came: the protocol, the host
/// it named, its user agent and the trace id of a valid W3C
/// `traceparent`, for requests served and refused alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_says_each_requests_protocol_host_user_agent_and_trace() {
    let s = Upstream::start("stable").await;
    let config = route_config(&[s.addr], &[], 0.0, "hosts = [\"shop.test\"]").replacen(
        "[proxy]\n",
        "[proxy]\naccess_log = \"all\"\n",
        1,
    );
    let veer = Veer::start(&config).await;
    // HTTP/1.1, a user agent with quotes and a byte that is not UTF-8.
    let a = raw(
        veer.addr,
        b"GET /one HTTP/1.1\r\nhost: shop.test:8080\r\nuser-agent: curl/8.0 \"x\" \xe9\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    // Refused: another host (no route), and HTTP/1.0 naming none.
    let a = raw(
        veer.addr,
        b"GET /two HTTP/1.1\r\nhost: elsewhere.test\r\ntraceparent: 01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-later\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(a.starts_with("HTTP/1.1 404"), "{a}");
    let a = raw(
        veer.addr,
        b"GET /three HTTP/1.0\r\nuser-agent: probe/1\r\ntraceparent: 00-00000000000000000000000000000000-00f067aa0ba902b7-01\r\n\r\n",
    )
    .await;
    assert!(a.starts_with("HTTP/1.0 404"), "{a}");
    // HTTP/2: the host is the request's authority.
    let mut h2 = super::support::h2c(veer.addr).await;
    let req = Request::get("http://shop.test/four")
        .header("user-agent", "grpc-go/1.60")
        .header(
            "traceparent",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);

    let lines = veer.logs_with_at_least("request", 4).await;
    let line = |path: &str| {
        lines
            .iter()
            .find(|l| l["target"] == "veer::access" && l["path"] == path)
            .unwrap_or_else(|| panic!("no line for {path}: {lines:?}"))
    };
    let about = |path: &str| {
        let l = line(path);
        (
            l["protocol"].as_str(),
            l["host"].as_str(),
            l["user_agent"].as_str(),
        )
    };
    assert_eq!(
        about("/one"),
        (
            Some("HTTP/1.1"),
            Some("shop.test:8080"),
            Some("curl/8.0 \"x\" \u{fffd}")
        )
    );
    assert_eq!(line("/one")["status"], 200);
    assert_eq!(
        about("/two"),
        (Some("HTTP/1.1"), Some("elsewhere.test"), None)
    );
    assert_eq!(line("/two")["error"], "no_route");
    assert_eq!(about("/three"), (Some("HTTP/1.0"), None, Some("probe/1")));
    assert_eq!(
        about("/four"),
        (Some("HTTP/2.0"), Some("shop.test"), Some("grpc-go/1.60"))
    );
    // The trace id of a valid traceparent (a later version's too); none
    // for an all-zero id or upper-case digits (not W3C's form).
    let trace = |path: &str| line(path)["trace_id"].as_str();
    assert_eq!(trace("/one"), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    assert_eq!(trace("/two"), Some("0af7651916cd43dd8448eb211c80319c"));
    assert_eq!(trace("/three"), None);
    assert_eq!(trace("/four"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_rewrites_its_prefix_and_edits_the_fields_it_names_both_ways() {
    let s = Upstream::start("stable").await;
    let api = format!(
        r#"
[[route]]
name = "api"
path_prefix = "/api"
rewrite_prefix = "/"
max_request_body = 64
[route.request_headers]
set = {{ host = "api.internal", x-env = "prod", x-forwarded-prefix = "/api" }}
remove = ["x-debug"]
[route.response_headers]
set = {{ strict-transport-security = "max-age=31536000" }}
remove = ["x-upstream"]
[route.stable]
version = "v1"
endpoints = ["{}"]
"#,
        s.addr
    );
    let plain = route_config(&[s.addr], &[], 0.0, "")
        .replace("[proxy]\n", "[proxy]\naccess_log = \"all\"\n");
    let veer = Veer::start(&format!("{plain}{api}")).await;
    let seen = || {
        (
            s.last_uri.lock().unwrap().clone(),
            s.last_headers.lock().unwrap().clone(),
        )
    };
    let mut c = Client::connect(veer.addr).await.unwrap();
    let hsts = |r: &http::Response<Bytes>| {
        r.headers()
            .get("strict-transport-security")
            .map(|v| v.to_str().unwrap().to_string())
    };
    // Through veer's own HTTP/1.1 client (a bodiless GET).
    let r = c
        .get(
            "/api/users?page=2",
            &[
                ("host", "shop.example"),
                ("x-debug", "1"),
                ("x-env", "dev"),
                ("x-forwarded-prefix", "/evil"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hsts(&r).as_deref(), Some("max-age=31536000"));
    assert!(!r.headers().contains_key("x-upstream"), "{:?}", r.headers());
    let (uri, h) = seen();
    assert_eq!(uri, "/users?page=2");
    assert_eq!(h["host"], "api.internal");
    assert_eq!(h["x-forwarded-host"], "shop.example", "the client's host");
    assert_eq!(h.get_all("x-env").iter().collect::<Vec<_>>(), ["prod"]);
    // A client's X-Forwarded-Prefix is dropped; the route's is set.
    let prefixes: Vec<_> = h.get_all("x-forwarded-prefix").iter().collect();
    assert_eq!(prefixes, ["/api"]);
    assert!(!h.contains_key("x-debug"));
    // Through hyper's client (a chunked POST), and the prefix alone.
    let chunked = Bytes::from_static(b"3\r\nabc\r\n0\r\n\r\n");
    let r = c
        .send(
            http::Method::POST,
            "/api",
            &[("transfer-encoding", "chunked"), ("x-debug", "1")],
            chunked,
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hsts(&r).as_deref(), Some("max-age=31536000"));
    let (uri, h) = seen();
    assert_eq!(uri, "/");
    assert!(!h.contains_key("x-debug"));
    assert_eq!(h["host"], "api.internal");
    // An HTTP/2 client; a path that normalises onto the route first.
    let mut h2 = super::support::h2c(veer.addr).await;
    let req = Request::get(format!("http://{}/api/a/../b", veer.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = h2.send_request(req).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("strict-transport-security"));
    assert_eq!(seen().0, "/b");
    // A rest that would climb above the root once rewritten: veer's own
    // 400, with the route's answer fields, and nothing upstream.
    let before = s.requests.load(std::sync::atomic::Ordering::SeqCst);
    let r = c.get("/api..", &[]).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(hsts(&r).as_deref(), Some("max-age=31536000"));
    assert_eq!(s.requests.load(std::sync::atomic::Ordering::SeqCst), before);
    // A refusal on the route carries them too.
    let r = c
        .send(
            http::Method::POST,
            "/api/big",
            &[],
            Bytes::from(vec![b'x'; 100]),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(hsts(&r).as_deref(), Some("max-age=31536000"));
    let mut c = Client::connect(veer.addr).await.unwrap();
    // Another route is untouched.
    let r = c.get("/web/x", &[("x-debug", "1")]).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hsts(&r), None);
    assert_eq!(r.headers()["x-upstream"], "stable");
    let (uri, h) = seen();
    assert_eq!(uri, "/web/x");
    assert_eq!(h["x-debug"], "1");
    // The access log says what the client asked for, and which endpoint
    // answered (none for veer's own 400).
    let lines = veer.logs_with_at_least("request", 4).await;
    let logged = access_pairs(&lines, "upstream");
    let endpoint = s.addr.to_string();
    assert!(
        logged.contains(&("/api/users", endpoint.as_str())),
        "{logged:?}"
    );
    assert!(logged.contains(&("/api..", "")), "{logged:?}");
    // A reload without them sends paths and fields as they come.
    let bare = api
        .replace("rewrite_prefix = \"/\"\n", "")
        .replace("[route.request_headers]\n", "")
        .replace("[route.response_headers]\n", "")
        .lines()
        .filter(|l| !l.starts_with("set =") && !l.starts_with("remove ="))
        .collect::<Vec<_>>()
        .join("\n");
    veer.write_config(&format!("{plain}{bare}\n"));
    veer.wait_generation(2).await;
    let r = c.get("/api/users", &[("x-debug", "1")]).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hsts(&r), None);
    let (uri, h) = seen();
    assert_eq!(uri, "/api/users");
    assert_eq!(h["x-debug"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_requests_to_a_redirecting_route_are_sent_to_https() {
    let s = Upstream::start("stable").await;
    let config = route_config(
        &[s.addr],
        &[],
        0.0,
        "https_redirect = true\n[route.response_headers]\nset = { strict-transport-security = \"max-age=600\" }",
    )
    .replace("[proxy]\n", "[proxy]\naccess_log = \"all\"\n");
    let veer = Veer::start_tls(&config).await;
    let tls_port = veer.tls_addr.expect("tls listener").port();
    let mut c = Client::connect(veer.addr).await.unwrap();
    let r = c
        .send(
            http::Method::POST,
            "/cart/add?item=7",
            &[("host", "shop.example:8080")],
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 308, "the method and body kept: 308, not 301");
    assert_eq!(
        r.headers()["location"],
        format!("https://shop.example:{tls_port}/cart/add?item=7").as_str()
    );
    assert_eq!(r.headers()["strict-transport-security"], "max-age=600");
    assert_eq!(s.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    // An ACME HTTP-01 challenge is served over plain HTTP.
    let r = c
        .get(
            "/.well-known/acme-challenge/token-1",
            &[("host", "shop.example")],
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    // HTTP/2 in clear too.
    let mut h2 = super::support::h2c(veer.addr).await;
    let req = Request::get(format!("http://{}/h2", veer.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = h2.send_request(req).await.unwrap();
    assert_eq!(r.status(), 308);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(
        location,
        format!("https://{}:{tls_port}/h2", veer.addr.ip())
    );
    // Over TLS the route serves.
    let mut tls = tls_connect(veer.tls_addr.unwrap(), &[b"http/1.1"]).await;
    tls.write_all(b"GET /cart HTTP/1.1\r\nhost: shop.example\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 2048];
    let n = tls.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(
        answer.contains("strict-transport-security: max-age=600"),
        "{answer}"
    );
    assert_eq!(s.requests.load(std::sync::atomic::Ordering::SeqCst), 2);
    // Behind a trusted proxy that took the request over HTTPS: served;
    // over plain HTTP, or said by a client nobody trusts: redirected.
    veer.write_config(&config.replace("[proxy]\n", "[proxy]\ntrusted_hops = 1\n"));
    veer.wait_generation(2).await;
    let r = c
        .get(
            "/lb",
            &[
                ("x-forwarded-proto", "https"),
                ("x-forwarded-for", "203.0.113.9"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get("/lb", &[("x-forwarded-proto", "http")])
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    veer.write_config(&config);
    veer.wait_generation(3).await;
    let r = c
        .get("/lb", &[("x-forwarded-proto", "https")])
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        308,
        "nobody is trusted to say it came over HTTPS"
    );
    let lines = veer.logs_with_at_least("request", 5).await;
    assert!(
        lines.iter().any(|l| l["target"] == "veer::access"
            && l["status"] == 308
            && l["path"] == "/cart/add"
            && l["route"] == "web"),
        "{lines:?}"
    );
    // Behind a balancer that maps 443 (or another port) to the listener's:
    // `public_port` is where clients are sent, applied by a reload.
    for (generation, port, want) in [
        (4, "443", "https://shop.example/p"),
        (5, "8443", "https://shop.example:8443/p"),
    ] {
        veer.write_config(&with_tls(
            &config,
            &format!("cert = \"tls.crt\"\nkey = \"tls.key\"\npublic_port = {port}\n"),
        ));
        veer.wait_generation(generation).await;
        let r = c.get("/p", &[("host", "shop.example")]).await.unwrap();
        assert_eq!(r.status(), 308);
        assert_eq!(r.headers()["location"], want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_on_allowed_origins_get_preflights_answered_and_answers_marked() {
    let s = Upstream::start("stable").await;
    let config = route_config(
        &[s.addr],
        &[],
        0.0,
        "max_request_body = 10\n[route.cors]\nallow_origins = [\"https://app.example.com\"]\nexpose_headers = [\"X-Upstream\"]",
    );
    let veer = Veer::start(&config).await;
    let served = || s.requests.load(std::sync::atomic::Ordering::SeqCst);
    let mut c = Client::connect(veer.addr).await.unwrap();
    let app = ("origin", "https://app.example.com");
    // The preflight: veer's own 204, the upstream never asked.
    let r = c
        .send(
            http::Method::OPTIONS,
            "/cart",
            &[app, ("access-control-request-method", "PUT")],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(
        h["access-control-allow-methods"],
        "GET, PUT, POST, DELETE, PATCH, OPTIONS"
    );
    assert!(h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("Authorization"));
    assert_eq!(h["access-control-max-age"], "1728000");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["vary"], "Origin");
    assert_eq!(served(), 0);
    // The request itself: the upstream's answer, marked.
    let r = c.get("/cart", &[app]).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r.headers()["access-control-expose-headers"], "X-Upstream");
    // A failure too: the page can read why.
    s.status.store(503, std::sync::atomic::Ordering::SeqCst);
    let r = c.get("/cart", &[app]).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    s.status.store(200, std::sync::atomic::Ordering::SeqCst);
    // And a refusal on the route (a body over its limit).
    let r = c
        .send(
            http::Method::POST,
            "/cart",
            &[app],
            Bytes::from(vec![b'x'; 100]),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let mut c = Client::connect(veer.addr).await.unwrap();
    // Another origin: nothing allows its page to read the answer, and its
    // preflight is the upstream's business.
    let evil = ("origin", "https://evil.example");
    let r = c.get("/cart", &[evil]).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    let before = served();
    let r = c
        .send(
            http::Method::OPTIONS,
            "/cart",
            &[evil, ("access-control-request-method", "PUT")],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    assert_eq!(served(), before + 1);
    // The preflight was nobody's request: the version counted what it served.
    let m = veer.metrics().await;
    let total: f64 = m
        .lines()
        .filter(|l| l.starts_with("veer_requests_total{") && l.contains("version=\"v1\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(total, served() as f64, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    let stream = TcpStream::connect(veer.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    // 8 MiB sent as a stream of 64 KiB chunks; the upstream echoes it back.
    let chunks = (0..128u8).map(|i| {
        Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from(vec![i; 64 * 1024])))
    });
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let req = Request::post("/echo")
        .header("host", "x")
        .body(body)
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let echoed = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed.len(), 128 * 64 * 1024);
    assert!(echoed
        .chunks(64 * 1024)
        .enumerate()
        .all(|(i, c)| c.iter().all(|&b| b == i as u8)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_proxy() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    super::support::websocket_round_trips(veer.addr, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    let mut sender = super::support::h2c(veer.addr).await;
    for _ in 0..3 {
        let req = Request::get(format!("http://{}/h2c", veer.addr))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(
            &resp.into_body().collect().await.unwrap().to_bytes()[..],
            b"stable"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_negotiates_h2_by_alpn_and_reloads_its_certificate() {
    let s = Upstream::start("stable").await;
    let dir = tempfile::tempdir().unwrap();
    let write_cert = |name: &str| {
        let cert =
            rcgen::generate_simple_self_signed(vec!["localhost".into(), name.into()]).unwrap();
        std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), cert.key_pair.serialize_pem()).unwrap();
        cert.cert.der().clone()
    };
    let first = write_cert("first.test");
    let config = with_tls(
        &route_config(&[s.addr], &[], 0.0, ""),
        "cert = \"tls.crt\"\nkey = \"tls.key\"\n",
    );
    // The fixture owns `dir` from here on.
    let dir_path = dir.path().to_path_buf();
    let veer = Veer::start_in_dir(dir, &config).await;
    let tls_addr = veer.tls_addr.expect("tls listener");

    let (version, body, served) = h2_get(tls_addr, &first).await;
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(&body[..], b"stable");
    assert_eq!(served, first);

    // Rotate the certificate: new handshakes get the new one.
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "second.test".into()]).unwrap();
    std::fs::write(dir_path.join("tls.crt.new"), cert.cert.pem()).unwrap();
    std::fs::write(dir_path.join("tls.key.new"), cert.key_pair.serialize_pem()).unwrap();
    std::fs::rename(dir_path.join("tls.key.new"), dir_path.join("tls.key")).unwrap();
    std::fs::rename(dir_path.join("tls.crt.new"), dir_path.join("tls.crt")).unwrap();
    let second = cert.cert.der().clone();
    let start = std::time::Instant::now();
    loop {
        let (_, _, served) = h2_get(tls_addr, &second).await;
        if served == second {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "certificate never reloaded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // A broken certificate file, written again and again (each write a
    // check): the one in force stays, and the failure is logged once, not
    // once a check.
    const NOT_RELOADED: &str = "TLS certificate not reloaded; the previous one stays";
    for i in 0..6 {
        std::fs::write(dir_path.join("tls.crt"), format!("garbage {i}\n")).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let said = veer.logs_with_at_least(NOT_RELOADED, 1).await;
    assert_eq!(said.len(), 1, "{said:?}");
    let (_, _, served) = h2_get(tls_addr, &second).await;
    assert_eq!(served, second, "the certificate in force stays");
}

/// Two certificates for one name with keys of two kinds (nginx's RSA and
/// ECDSA `ssl_certificate`s): a client gets the first listed whose key it
/// can take (the signature schemes it offers), the default last; one that
/// takes none of them gets the first, and fails its handshake, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gets_the_first_certificate_for_its_name_whose_key_it_takes() {
    use rustls::SignatureScheme::{ECDSA_NISTP256_SHA256, ED25519, RSA_PSS_SHA256};
    let s = Upstream::start("stable").await;
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_path_buf();
    // ECDSA P-256 (rcgen's default kind) and Ed25519 pairs.
    let ecdsa = |file: &str, names: &[&str]| self_signed(&dir_path, file, names);
    let ed25519 = |file: &str, names: &[&str]| {
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir_path.join(format!("{file}.crt")), cert.pem()).unwrap();
        std::fs::write(dir_path.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        cert.der().clone()
    };
    let default = ecdsa("default", &["localhost", "shop.example"]);
    let shop_ed = ed25519("shop-ed", &["shop.example"]);
    let pay_ed = ed25519("pay-ed", &["api.pay.example"]);
    let pay_ec = ecdsa("pay-ec", &["*.pay.example"]);
    let pair =
        |f: &str| format!("[[proxy.tls.certificates]]\ncert = \"{f}.crt\"\nkey = \"{f}.key\"\n");
    let config = with_tls(
        &route_config(&[s.addr], &[], 0.0, ""),
        &format!(
            "cert = \"default.crt\"\nkey = \"default.key\"\n{}{}{}",
            pair("shop-ed"),
            pair("pay-ed"),
            pair("pay-ec")
        ),
    );
    let veer = Veer::start_in_dir(dir, &config).await;
    let addr = veer.tls_addr.expect("tls listener");
    let both = [ED25519, ECDSA_NISTP256_SHA256];
    for (name, schemes, want) in [
        // Listed first, and taken.
        ("shop.example", &both[..], &shop_ed),
        ("api.pay.example", &both[..], &pay_ed),
        // Not taken: the next for the name, a wildcard one, or the default.
        ("api.pay.example", &[ECDSA_NISTP256_SHA256][..], &pay_ec),
        ("shop.example", &[ECDSA_NISTP256_SHA256][..], &default),
        ("localhost", &both[..], &default),
    ] {
        let served = served_with_schemes(addr, name, schemes).await;
        assert_eq!(served.as_ref(), Ok(want), "{name} offering {schemes:?}");
    }
    // Nothing it takes: the first, and the handshake fails.
    let refused = served_with_schemes(addr, "api.pay.example", &[RSA_PSS_SHA256]).await;
    assert!(refused.is_err(), "{refused:?}");
}

/// A certificate file holding a leaf alone that a CA issued (`cert.pem`
/// given for `fullchain.pem`: most clients but browsers then refuse it) is
/// warned of by `veer check` and in the log at start; the full chain and
/// a self-signed certificate are not.
#[tokio::test]
async fn a_certificate_file_without_its_issuer_is_warned_of() {
    let s = Upstream::start("stable").await;
    let ca = super::upstreams::TestCa::new("Issuing CA");
    let dir = tempfile::tempdir().unwrap();
    let at = |f: &str| dir.path().join(f);
    let (leaf, key) = ca.server("localhost");
    std::fs::write(at("leaf.crt"), &leaf).unwrap();
    std::fs::write(at("leaf.key"), &key).unwrap();
    let (shop, shop_key) = ca.server("shop.example");
    std::fs::write(at("full.crt"), shop + &ca.pem()).unwrap();
    std::fs::write(at("full.key"), shop_key).unwrap();
    self_signed(dir.path(), "own", &["own.example"]);
    let pairs = "cert = \"leaf.crt\"\nkey = \"leaf.key\"\n[[proxy.tls.certificates]]\ncert = \"full.crt\"\nkey = \"full.key\"\n[[proxy.tls.certificates]]\ncert = \"own.crt\"\nkey = \"own.key\"\n";
    let config = with_tls(&route_config(&[s.addr], &[], 0.0, ""), pairs);
    let path = at("veer.toml");
    let veer = Veer::start_in_dir(dir, &config).await;
    let out = super::support::veer_cli(&["check", "--config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let said: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("holds no certificate of its issuer"))
        .collect();
    assert_eq!(said.len(), 1, "{err}");
    assert!(
        said[0].contains("leaf.crt holds no certificate of its issuer (CN=Issuing CA)"),
        "{err}"
    );
    let logs = veer
        .logs_containing("holds no certificate of its issuer")
        .await;
    let logged: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("holds no certificate of its issuer"))
        .collect();
    assert_eq!(logged.len(), 1, "{logs}");
    assert!(
        logged[0].contains("leaf.crt") && logged[0].contains("CN=Issuing CA"),
        "{logs}"
    );
}

/// An upstream that answers before it has read an HTTP/2 client's whole
/// body (a 413, a 401), or veer itself (a 413 for a length over
/// `max_request_body`): the client, still uploading, gets the whole answer
/// and may go on sending the rest, which veer reads and drops. It reset
/// the stream (RST_STREAM, NO_ERROR) as soon as the answer was sent, which
/// the RFC allows, but clients that go on sending before they read (curl
/// 7.88, Debian 12's) failed on it and lost the answer: about one upload
/// in two for an upstream's answer, every one for veer's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_still_uploading_gets_an_early_answer_and_may_finish() {
    let answer: &'static [u8] =
        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large";
    let (up, _, _) = super::support::scripted_upstream(move |_, _| Some((answer, true))).await;
    let veer = Veer::start(&route_config(&[up], &[], 0.0, "")).await;
    assert_eq!(upload_answered_early(veer.addr).await, b"too large");
    let limited = route_config(&[up], &[], 0.0, "").replacen(
        "[proxy]\n",
        "[proxy]\nmax_request_body = 1000\n",
        1,
    );
    let veer = Veer::start(&limited).await;
    let own = upload_answered_early(veer.addr).await;
    assert_eq!(String::from_utf8_lossy(&own), "content too large\n");
    // A client that sends nothing more but leaves its stream open has it
    // let go after 2 s without a byte (an HTTP/1.1 lingering close's
    // quiet limit), not the 10 s a lingering read may last in all.
    let start = std::time::Instant::now();
    let reset = upload_then_silence(veer.addr).await;
    let waited = start.elapsed();
    assert_eq!(reset, h2::Reason::NO_ERROR);
    assert!(
        waited < std::time::Duration::from_secs(8),
        "let go after {waited:?}"
    );
}

/// An HTTP/2 upload to `addr` of 64 KiB, announced (longer than
/// `request_buffer`: it streams), its first 16 KiB sent and its answer's
/// head read (a 413): the stream to send the rest on, the answer's body,
/// the connection's pings, and a 16 KiB chunk.
async fn upload_to_413(
    addr: std::net::SocketAddr,
) -> (h2::SendStream<Bytes>, h2::RecvStream, h2::PingPong, Bytes) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut client, mut conn) = h2::client::handshake(tcp).await.unwrap();
    let ping_pong = conn.ping_pong().unwrap();
    tokio::spawn(conn);
    let chunk = Bytes::from(vec![b'x'; 16 << 10]);
    let req = Request::post(format!("http://{addr}/upload"))
        .header("content-length", (4 * chunk.len()).to_string())
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(req, false).unwrap();
    send.send_data(chunk.clone(), false).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 413);
    (send, response.into_body(), ping_pong, chunk)
}

/// As [`upload_answered_early`], but the client sends nothing after the
/// answer and keeps its stream open: how veer let it go, once it did (at
/// most 20 s).
async fn upload_then_silence(addr: std::net::SocketAddr) -> h2::Reason {
    let (mut send, mut body, _pings, _) = upload_to_413(addr).await;
    while let Some(d) = body.data().await {
        let _ = body.flow_control().release_capacity(d.unwrap().len());
    }
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        std::future::poll_fn(|cx| send.poll_reset(cx)),
    )
    .await
    .expect("the stream was never let go")
    .unwrap()
}

/// An HTTP/2 upload to `addr` of 64 KiB, announced, whose first 16 KiB
/// are sent before the answer (413) is read whole and the rest after:
/// the answer's body. Panics if the stream was reset before the upload's
/// end, or the answer is not a 413.
async fn upload_answered_early(addr: std::net::SocketAddr) -> Vec<u8> {
    use futures_util::FutureExt;
    let (mut send, mut body, mut ping_pong, chunk) = upload_to_413(addr).await;
    let mut got = Vec::new();
    while let Some(d) = body.data().await {
        let d = d.unwrap();
        let _ = body.flow_control().release_capacity(d.len());
        got.extend_from_slice(&d);
    }
    // A ping's answer comes after every frame veer sent before it.
    ping_pong.ping(h2::Ping::opaque()).await.unwrap();
    let reset = std::future::poll_fn(|cx| send.poll_reset(cx)).now_or_never();
    assert!(reset.is_none(), "the stream was reset: {reset:?}");
    for last in [false, false, true] {
        send.send_data(chunk.clone(), last).unwrap();
    }
    ping_pong.ping(h2::Ping::opaque()).await.unwrap();
    let reset = std::future::poll_fn(|cx| send.poll_reset(cx)).now_or_never();
    assert!(reset.is_none(), "the stream was reset: {reset:?}");
    got
}

/// A TLS client offering `http/1.0` alone by ALPN (`curl --http1.0`) is
/// served, as nginx serves it (it was refused the handshake:
/// no_application_protocol); one offering only protocols veer does not
/// speak is still refused, as nginx refuses it.
#[tokio::test]
async fn an_http10_client_over_tls_is_served() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start_tls(&route_config(&[s.addr], &[], 0.0, "")).await;
    let addr = veer.tls_addr.expect("tls listener");
    let mut tls = tls_connect(addr, &[b"http/1.0"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.0"[..]));
    tls.write_all(b"GET / HTTP/1.0\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert!(answer.ends_with("stable"), "{answer}");

    let cfg = any_cert_client(&[b"spdy/3"], AcceptAny::default());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let refused = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(
        refused.to_string().contains("NoApplicationProtocol"),
        "{refused}"
    );
}

/// The certificate `addr` shows a client asking for `name` that offers
/// only `schemes` (any certificate accepted), or why the handshake failed.
async fn served_with_schemes(
    addr: std::net::SocketAddr,
    name: &str,
    schemes: &[rustls::SignatureScheme],
) -> Result<rustls::pki_types::CertificateDer<'static>, String> {
    let offering = Some(schemes.to_vec());
    let cfg = any_cert_client(&[], AcceptAny { offering });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let tls = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].clone())
}

/// With `[[proxy.tls.certificates]]`, a client asking (SNI) for a name
/// one of them covers gets it (an exact name before a wildcard, the first
/// listed of two alike), any other client the default; each is re-read
/// when its files change; one that names no DNS name is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_the_certificate_of_the_name_a_client_asks_for() {
    let s = Upstream::start("stable").await;
    let dir = tempfile::tempdir().unwrap();
    // The fixture owns `dir` once it starts.
    let dir_path = dir.path().to_path_buf();
    let write = |file: &str, names: &[&str]| self_signed(&dir_path, file, names);
    let default = write("default", &["localhost"]);
    let shop = write("shop", &["shop.example", "*.api.example"]);
    let pay = write("pay", &["pay.api.example"]);
    let shop_too = write("shop-too", &["shop.example", "other.example"]);
    let pair =
        |f: &str| format!("[[proxy.tls.certificates]]\ncert = \"{f}.crt\"\nkey = \"{f}.key\"\n");
    let config = with_tls(
        &route_config(&[s.addr], &[], 0.0, ""),
        &format!(
            "cert = \"default.crt\"\nkey = \"default.key\"\n{}{}{}",
            pair("shop"),
            pair("pay"),
            pair("shop-too")
        ),
    );
    let path = dir_path.join("veer.toml");
    let veer = Veer::start_in_dir(dir, &config).await;
    let addr = veer.tls_addr.expect("tls listener");
    // `/status` lists them, with their names and expiry.
    let tls = &veer.status().await["tls"];
    let files: Vec<&str> = tls["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["file"].as_str().unwrap())
        .collect();
    assert_eq!(files.len(), 4, "{tls}");
    assert!(files[1].ends_with("shop.crt"), "{tls}");
    assert_eq!(
        tls["certificates"][1]["names"],
        serde_json::json!(["shop.example", "*.api.example"])
    );
    assert!(tls["certificates"][0]["not_after_unix"].as_i64().unwrap() > 1_700_000_000);
    assert!(tls["client_ca"].is_null(), "{tls}");
    let admin = veer.admin.to_string();
    let out = tokio::task::spawn_blocking(move || {
        super::support::veer_cli(&["status", "--admin", &admin])
    })
    .await
    .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("tls: 4 certificate(s), the first to expire "),
        "{table}"
    );
    for (name, want) in [
        ("shop.example", &shop),
        ("SHOP.example", &shop),
        ("x.api.example", &shop),
        ("pay.api.example", &pay),
        ("other.example", &shop_too),
        ("deep.x.api.example", &default),
        ("unknown.test", &default),
        ("localhost", &default),
        // An address: no name asked for.
        ("127.0.0.1", &default),
    ] {
        let (served, answer) = served_to(addr, name).await;
        assert!(served == *want, "{name}: another certificate served");
        assert!(answer.starts_with("HTTP/1.1 200"), "{name}: {answer}");
    }

    // A connection closed before its handshake (a balancer's TCP check)
    // is not counted; plain HTTP on the TLS port is a failed handshake.
    drop(TcpStream::connect(addr).await.unwrap());
    let _ = raw(addr, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let start = std::time::Instant::now();
    loop {
        let m = veer.metrics().await;
        let n = super::support::metric(&m, r#"veer_proxy_errors_total{kind="tls_handshake"}"#);
        if n == Some(1.0) {
            break;
        }
        assert!(
            n == Some(0.0) && start.elapsed() < std::time::Duration::from_secs(10),
            "{n:?}: {m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // A renewed certificate is served from its next handshake.
    let renewed = write("pay.new", &["pay.api.example"]);
    std::fs::rename(dir_path.join("pay.new.key"), dir_path.join("pay.key")).unwrap();
    std::fs::rename(dir_path.join("pay.new.crt"), dir_path.join("pay.crt")).unwrap();
    let start = std::time::Instant::now();
    while served_to(addr, "pay.api.example").await.0 != renewed {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "certificate never reloaded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(served_to(addr, "shop.example").await.0 == shop);
    // Long after the closed connection: it was never counted.
    let m = veer.metrics().await;
    assert_eq!(
        super::support::metric(&m, r#"veer_proxy_errors_total{kind="tls_handshake"}"#),
        Some(1.0),
        "{m}"
    );

    // `veer check` says which routes' hosts no certificate names.
    let hosts = std::fs::read_to_string(&path).unwrap().replacen(
        "name = \"web\"\n",
        "name = \"web\"\nhosts = [\"shop.example\", \"x.api.example\", \"nope.example\"]\n",
        1,
    );
    assert!(hosts.contains("nope.example"));
    let hosts_path = dir_path.join("hosts.toml");
    std::fs::write(&hosts_path, hosts).unwrap();
    let out = super::support::veer_cli(&["check", "--config", hosts_path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let warned: Vec<&str> = err.lines().filter(|l| l.contains("names host")).collect();
    assert_eq!(warned.len(), 1, "{err}");
    assert!(
        warned[0].contains("route web") && warned[0].contains("nope.example"),
        "{err}"
    );

    // One that names no DNS name could never be served: refused.
    let bad = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    std::fs::write(dir_path.join("ip.crt"), bad.cert.pem()).unwrap();
    std::fs::write(dir_path.join("ip.key"), bad.key_pair.serialize_pem()).unwrap();
    let text = std::fs::read_to_string(&path).unwrap() + &pair("ip");
    let bad_path = dir_path.join("bad.toml");
    std::fs::write(&bad_path, text).unwrap();
    let out = super::support::veer_cli(&["check", "--config", bad_path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("ip.crt") && err.contains("names no DNS name"),
        "{err}"
    );
}

/// A GET over TLS to `addr` (asking for `localhost`) presenting `client`
/// (a certificate and key) if given, with `headers`: the answer's text,
/// or why there was none (the handshake or the connection failed).
async fn mtls_get(
    addr: std::net::SocketAddr,
    client: Option<&ClientKeys>,
    headers: &str,
) -> Result<String, String> {
    mtls_get_path(addr, client, "/", headers).await
}

/// [`mtls_get`] of `path`.
async fn mtls_get_path(
    addr: std::net::SocketAddr,
    client: Option<&ClientKeys>,
    path: &str,
    headers: &str,
) -> Result<String, String> {
    let (_, answer) = tls_get(&connector(client), addr, path, headers).await?;
    Ok(answer)
}

/// A GET of `path` with `headers` over TLS to `addr` (as `localhost`) by
/// `connector`: how the handshake went and the answer's text, or why
/// there was none (the handshake or the connection failed).
async fn tls_get(
    connector: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
    path: &str,
    headers: &str,
) -> Result<(Option<rustls::HandshakeKind>, String), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let kind = tls.get_ref().1.handshake_kind();
    let request =
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{headers}connection: close\r\n\r\n");
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tls.read_to_end(&mut answer),
    )
    .await
    {
        Ok(Err(e)) if answer.is_empty() => Err(format!("read: {e}")),
        _ if answer.is_empty() => Err("no answer".into()),
        _ => Ok((kind, String::from_utf8_lossy(&answer).into_owned())),
    }
}

/// `[proxy.tls] client_ca`: only clients with a certificate its CAs
/// signed are served (none, or another CA's, fail the handshake, counted
/// as `client_cert`), and the upstream is told who called in
/// `X-Forwarded-Client-Cert` (a client's own is never passed on, by the
/// plain listener either). With
/// `client_auth = "optional"` a client without one is served, and a
/// forged field is dropped. The CA file is re-read when it changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_with_client_ca_serves_verified_clients_and_tells_upstream_who() {
    use rcgen::{DnType, SanType};
    let s = Upstream::start("stable").await;
    let ours = super::upstreams::TestCa::new("clients");
    let theirs = super::upstreams::TestCa::new("strangers");
    let pay = ours.client(
        &[
            (DnType::OrganizationName, "Example, Inc."),
            (DnType::CommonName, "pay-api"),
        ],
        vec![
            SanType::URI("spiffe://example.org/pay".try_into().unwrap()),
            SanType::DnsName("pay-api.example".try_into().unwrap()),
        ],
    );
    let stranger = theirs.client(&[(DnType::CommonName, "pay-api")], vec![]);
    let hash: String = ring::digest::digest(&ring::digest::SHA256, &pay.0)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let want = format!(
        "Hash={hash};Subject=\"CN=pay-api,O=Example\\\\, Inc.\";URI=spiffe://example.org/pay;DNS=pay-api.example"
    );
    let forged = "x-forwarded-client-cert: Hash=00;Subject=\"CN=admin\"\r\n";
    let xfcc = || {
        s.last_headers
            .lock()
            .unwrap()
            .get("x-forwarded-client-cert")
            .map(|v| v.to_str().unwrap().to_string())
    };
    let start_with = |auth: &'static str| {
        let dir = tls_dir(&localhost_cert());
        std::fs::write(dir.path().join("clients.pem"), ours.pem()).unwrap();
        let config = with_tls(
            &route_config(&[s.addr], &[], 0.0, "").replacen(
                "[proxy]\n",
                "[proxy]\naccess_log = \"all\"\n",
                1,
            ),
            &format!("cert = \"tls.crt\"\nkey = \"tls.key\"\nclient_ca = \"clients.pem\"\n{auth}"),
        );
        (dir, config)
    };

    // Required (the default).
    let (dir, config) = start_with("");
    let dir_path = dir.path().to_path_buf();
    let veer = Veer::start_in_dir(dir, &config).await;
    let addr = veer.tls_addr.expect("tls listener");
    for client in [None, Some(&stranger)] {
        let r = mtls_get(addr, client, "").await;
        assert!(r.is_err(), "served without a valid certificate: {r:?}");
    }
    let answer = mtls_get(addr, Some(&pay), forged).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(xfcc().as_deref(), Some(want.as_str()));
    // Nor does the plain listener pass a client's own on.
    let answer = raw(
        veer.addr,
        format!("GET / HTTP/1.1\r\nhost: localhost\r\n{forged}connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(xfcc(), None);
    // Its access log line names the caller.
    let lines = veer.logs_with_at_least("request", 1).await;
    let subjects: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["client_cert"].as_str())
        .collect();
    assert_eq!(subjects, ["CN=pay-api,O=Example\\, Inc."], "{lines:?}");
    let start = std::time::Instant::now();
    loop {
        let m = veer.metrics().await;
        if super::support::metric(&m, r#"veer_proxy_errors_total{kind="client_cert"}"#) == Some(2.0)
        {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "two refused handshakes not counted: {m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Another CA in the file: its clients are served from then on, and the
    // first's are not.
    replace_file(&dir_path.join("clients.pem"), theirs.pem());
    wait_served(addr, &stranger, true, "the new CA never taken").await;
    assert!(mtls_get(addr, Some(&pay), "").await.is_err());
    drop(veer);

    // Optional: no certificate is served, and a forged field dropped.
    let (dir, config) = start_with("client_auth = \"optional\"\n");
    let veer = Veer::start_in_dir(dir, &config).await;
    let addr = veer.tls_addr.expect("tls listener");
    let answer = mtls_get(addr, None, forged).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(xfcc(), None);
    assert!(mtls_get(addr, Some(&stranger), "").await.is_err());
    let answer = mtls_get(addr, Some(&pay), "").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(xfcc().as_deref(), Some(want.as_str()));

    // forward_client_cert: the certificate itself too, its PEM URL-encoded.
    let (dir, config) = start_with("forward_client_cert = true\n");
    let veer = Veer::start_in_dir(dir, &config).await;
    let addr = veer.tls_addr.expect("tls listener");
    let answer = mtls_get(addr, Some(&pay), "").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let field = xfcc().unwrap();
    let cert = field
        .strip_prefix(&format!("{want};Cert=\""))
        .and_then(|c| c.strip_suffix('"'))
        .unwrap_or_else(|| panic!("{field}"));
    assert!(
        cert.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"%-._~".contains(&b)),
        "{cert}"
    );
    let mut pem = Vec::new();
    let mut bytes = cert.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex: String = bytes.by_ref().take(2).map(char::from).collect();
            pem.push(u8::from_str_radix(&hex, 16).unwrap());
        } else {
            pem.push(b);
        }
    }
    let der =
        <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
            &pem,
        )
        .unwrap();
    assert_eq!(der, pay.0);
}

/// With `client_auth = "optional"`, a route with `require_client_cert`
/// serves only requests over a connection whose client certificate
/// verified: others get 403 (counted as `client_cert_required`), over
/// TLS without one or over the plain listener; the other routes serve
/// everyone. Its rate limit keyed by `client-cert` gives each verified
/// subject a bucket, whatever connection it comes on.
#[tokio::test]
async fn a_route_that_requires_a_client_certificate_refuses_requests_without_one() {
    use rcgen::DnType;
    let s = Upstream::start("stable").await;
    let ca = super::upstreams::TestCa::new("clients");
    let alice = ca.client(&[(DnType::CommonName, "alice")], vec![]);
    let bob = ca.client(&[(DnType::CommonName, "bob")], vec![]);
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_path_buf();
    self_signed(&dir_path, "tls", &["localhost"]);
    std::fs::write(dir_path.join("clients.pem"), ca.pem()).unwrap();
    let pay = format!(
        "[[route]]\nname = \"pay\"\npath_prefix = \"/pay\"\nrequire_client_cert = true\n[route.rate_limit]\nrequests_per_second = 0.001\nburst = 1\nkey = \"client-cert\"\n[route.stable]\nversion = \"v1\"\nendpoints = [\"{}\"]\n",
        s.addr
    );
    let config = with_tls(
        &(route_config(&[s.addr], &[], 0.0, "") + &pay),
        "cert = \"tls.crt\"\nkey = \"tls.key\"\nclient_ca = \"clients.pem\"\nclient_auth = \"optional\"\n",
    );
    let veer = Veer::start_in_dir(dir, &config).await;
    let addr = veer.tls_addr.expect("tls listener");
    let served = || s.requests.load(std::sync::atomic::Ordering::SeqCst);
    let answer = mtls_get_path(addr, None, "/pay/charge", "").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.ends_with("client certificate required\n"),
        "{answer}"
    );
    let answer = raw(
        veer.addr,
        b"GET /pay/charge HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert_eq!(served(), 0);
    let answer = mtls_get_path(addr, Some(&alice), "/pay/charge", "")
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = mtls_get_path(addr, None, "/shop", "").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(served(), 2);
    // alice's bucket is spent (another connection, the same subject);
    // bob's is his own.
    let answer = mtls_get_path(addr, Some(&alice), "/pay/charge", "")
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    let answer = mtls_get_path(addr, Some(&bob), "/pay/charge", "")
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    super::support::wait_metric(
        &veer,
        r#"veer_proxy_errors_total{kind="client_cert_required"}"#,
        "two refusals counted",
        |v| v == 2.0,
    )
    .await;
}

/// With `client_crl`, a client whose certificate a list revokes is
/// refused at the handshake (counted as `client_cert`), others are
/// served; a new list in the file is used from then on, a file that is no
/// list keeps the one before; a client of a CA the lists say nothing of
/// is refused too (its status is unknown). The lists' nextUpdate is
/// exported, and `/status` names the file.
#[tokio::test]
async fn a_tls_listener_with_client_crl_refuses_revoked_client_certificates() {
    use rcgen::DnType;
    let s = Upstream::start("stable").await;
    let ours = super::upstreams::TestCa::new("clients");
    let other = super::upstreams::TestCa::new("partners");
    let alice = ours.client(&[(DnType::CommonName, "alice")], vec![]);
    let bob = ours.client(&[(DnType::CommonName, "bob")], vec![]);
    let carol = other.client(&[(DnType::CommonName, "carol")], vec![]);
    let week = time::Duration::days(7);
    let crl = ours.revoking(1, &[&bob.0], week);
    let (veer, addr, dir_path) = start_with_crl(&s, ours.pem() + &other.pem(), &crl, None).await;

    let answer = mtls_get(addr, Some(&alice), "").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let refused = mtls_get(addr, Some(&bob), "").await.unwrap_err();
    assert!(
        refused.contains("Revoked"),
        "bob refused, but not as revoked: {refused}"
    );
    let refused = mtls_get(addr, Some(&carol), "").await.unwrap_err();
    assert!(!refused.contains("Revoked"), "{refused}");
    super::support::wait_metric(
        &veer,
        r#"veer_proxy_errors_total{kind="client_cert"}"#,
        "two refused handshakes counted",
        |v| v == 2.0,
    )
    .await;
    let (_, parsed) = x509_parser::pem::parse_x509_pem(crl.as_bytes()).unwrap();
    let (_, list) = x509_parser::parse_x509_crl(&parsed.contents).unwrap();
    let due = list.next_update().unwrap().timestamp() as f64;
    let file = dir_path.join("revoked.pem").display().to_string();
    let series = format!("veer_tls_crl_next_update_timestamp_seconds{{crl=\"{file}\"}}");
    assert_eq!(
        super::support::metric(&veer.metrics().await, &series),
        Some(due)
    );
    let status = veer.status().await;
    assert_eq!(status["tls"]["client_crl"], file.as_str(), "{status}");

    // A file that holds no list: the one before stays.
    let replace = |text: String| replace_file(&dir_path.join("revoked.pem"), text);
    replace("not a list\n".into());
    let logs = veer.logs_containing("no X509 CRL block").await;
    assert!(logs.contains("no X509 CRL block"), "{logs}");
    assert!(mtls_get(addr, Some(&alice), "").await.is_ok());
    assert!(mtls_get(addr, Some(&bob), "").await.is_err());

    // A new list revoking alice too, and due sooner: used from then on.
    replace(ours.revoking(2, &[&bob.0, &alice.0], time::Duration::days(1)));
    wait_served(addr, &alice, false, "the new list never taken").await;
    assert!(mtls_get(addr, Some(&bob), "").await.is_err());
    let sooner = super::support::metric(&veer.metrics().await, &series).unwrap();
    assert!(sooner < due - 5.0 * 86_400.0, "{sooner} vs {due}");

    // The CA without a list is logged at start, and said by `veer check`.
    let logs = veer.all_logs();
    assert!(
        logs.contains("client_crl holds no revocation list") && logs.contains("CN=partners"),
        "{logs}"
    );
    let check = super::support::veer_cli(&[
        "check",
        "--config",
        dir_path.join("veer.toml").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(
        check.status.success()
            && err.contains("no revocation list from the client_ca CA CN=partners"),
        "{err}"
    );

    // `veer check` refuses a client_crl without client_ca.
    let lone = dir_path.join("lone.toml");
    std::fs::write(
        &lone,
        with_tls(
            &route_config(&[s.addr], &[], 0.0, ""),
            "cert = \"tls.crt\"\nkey = \"tls.key\"\nclient_crl = \"revoked.pem\"\n",
        ),
    )
    .unwrap();
    let out = super::support::veer_cli(&["check", "--config", lone.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("client_crl needs client_ca"),
        "{err}"
    );
}

/// TLS sessions resume (by tickets, nginx's default) for every client
/// that comes back, however many: rustls's session cache alone holds 256
/// sessions, two a TLS 1.3 handshake, so of 300 clients coming back none
/// resumed and each paid a full handshake again. TLS 1.3 and 1.2 alike,
/// each handshake counted by its kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_resume_for_more_clients_than_a_session_cache_holds() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start_tls(&route_config(&[s.addr], &[], 0.0, "")).await;
    let addr = veer.tls_addr.expect("tls listener");
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let clients: Vec<_> = (0..300)
            .map(|_| resuming_connector(version, None))
            .collect();
        let resumed = come_back(&clients, addr).await;
        assert_eq!(resumed, 300, "{:?}: clients that resumed", version.version);
    }
    let m = veer.metrics().await;
    for kind in ["full", "resumed"] {
        let series = format!("veer_tls_handshakes_total{{kind=\"{kind}\"}}");
        assert_eq!(super::support::metric(&m, &series), Some(600.0), "{kind}");
    }
}

/// A resumed session carries its client certificate (the upstream still
/// hears who called), but a client that new revocation lists revoke is
/// refused at its next connection even with a session to resume: the
/// lists' change ends every session made before it, with veer's own
/// ticket key and with `ticket_keys` files (which outlive the change).
#[tokio::test]
async fn a_resumed_tls_session_is_no_way_round_a_new_revocation_list() {
    revocation_ends_sessions(None).await;
    revocation_ends_sessions(Some(ticket_key(1))).await;
}

/// [`a_resumed_tls_session_is_no_way_round_a_new_revocation_list`], with
/// `key` as the listener's one `ticket_keys` file if given.
async fn revocation_ends_sessions(key: Option<[u8; 80]>) {
    use rcgen::DnType;
    use rustls::HandshakeKind::{Full, Resumed};
    let s = Upstream::start("stable").await;
    let ours = super::upstreams::TestCa::new("clients");
    let alice = ours.client(&[(DnType::CommonName, "alice")], vec![]);
    let bob = ours.client(&[(DnType::CommonName, "bob")], vec![]);
    let week = time::Duration::days(7);
    let crl = ours.revoking(1, &[&bob.0], week);
    let (_veer, addr, dir_path) = start_with_crl(&s, ours.pem(), &crl, key).await;
    let subject = |s: &Upstream| {
        s.last_headers
            .lock()
            .unwrap()
            .get("x-forwarded-client-cert")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };

    let client = resuming_connector(&rustls::version::TLS13, Some(&alice));
    let (kind, answer) = resumable_get(&client, addr).await.unwrap();
    assert_eq!(kind, Some(Full));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (kind, answer) = resumable_get(&client, addr).await.unwrap();
    assert_eq!(kind, Some(Resumed));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(subject(&s).contains("CN=alice"), "{}", subject(&s));

    replace_file(
        &dir_path.join("revoked.pem"),
        ours.revoking(2, &[&bob.0, &alice.0], week),
    );
    wait_served(addr, &alice, false, "the new list never taken").await;
    let refused = resumable_get(&client, addr).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("Revoked")),
        "a revoked client with a session to resume: {refused:?}"
    );
}

/// Replicas given the same `ticket_keys` files resume each other's
/// clients (a balancer in front sends a client to any of them), and a
/// replica with other keys does not. Rotating (a new key listed first,
/// the old second) keeps the old key's tickets good while new ones are
/// sealed with the new key; a replica still on the old key alone cannot
/// open those. A file that is not 80 bytes is refused by `veer check`
/// and keeps the keys before when it appears in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_the_same_ticket_keys_resume_each_others_clients() {
    use rustls::HandshakeKind::{Full, Resumed};
    let s = Upstream::start("stable").await;
    let server = localhost_cert();
    let start = |keys: Vec<[u8; 80]>| {
        let dir = tls_dir(&server);
        let mut names = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            std::fs::write(dir.path().join(format!("t{i}.key")), k).unwrap();
            names.push(format!("\"t{i}.key\""));
        }
        let config = with_tls(
            &route_config(&[s.addr], &[], 0.0, ""),
            &format!(
                "cert = \"tls.crt\"\nkey = \"tls.key\"\nticket_keys = [{}]\n",
                names.join(", ")
            ),
        );
        let path = dir.path().to_path_buf();
        async move {
            let veer = Veer::start_in_dir(dir, &config).await;
            let addr = veer.tls_addr.expect("tls listener");
            (veer, addr, path)
        }
    };
    let (k0, k1, k2) = (ticket_key(10), ticket_key(11), ticket_key(12));
    let (a_veer, a, a_dir) = start(vec![k1, k0]).await;
    let files = a_veer.status().await["tls"]["ticket_keys"].clone();
    let file = |name: &str| a_dir.join(name).display().to_string();
    assert_eq!(files, serde_json::json!([file("t0.key"), file("t1.key")]));
    let (_b, b, _) = start(vec![k1]).await;
    let (_c, c, _) = start(vec![k2]).await;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let v = version.version;
        let client = resuming_connector(version, None);
        assert_eq!(served_kind(&client, a).await, Full, "{v:?}");
        assert_eq!(
            served_kind(&client, b).await,
            Resumed,
            "{v:?}: a's ticket at b"
        );
        assert_eq!(
            served_kind(&client, a).await,
            Resumed,
            "{v:?}: b's ticket at a"
        );
        let other = resuming_connector(version, None);
        assert_eq!(served_kind(&other, c).await, Full, "{v:?}");
        assert_eq!(served_kind(&other, a).await, Full, "{v:?}: c's ticket at a");
    }

    // Rotation at a: k2 seals, k1 still opens.
    let client = resuming_connector(&rustls::version::TLS13, None);
    assert_eq!(served_kind(&client, b).await, Full);
    replace_file(&a_dir.join("t1.key"), k1);
    replace_file(&a_dir.join("t0.key"), k2);
    // c's tickets (k2) open at a once a has read the new key: each try a
    // new client with a ticket of c's.
    let since = std::time::Instant::now();
    let other = loop {
        let other = resuming_connector(&rustls::version::TLS13, None);
        assert_eq!(served_kind(&other, c).await, Full);
        if served_kind(&other, a).await == Resumed {
            break other;
        }
        assert!(
            since.elapsed() < std::time::Duration::from_secs(10),
            "a never took k2"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        served_kind(&client, a).await,
        Resumed,
        "b's k1 ticket at a after the rotation"
    );
    assert_eq!(
        served_kind(&client, b).await,
        Full,
        "a's k2 ticket at b, which has only k1"
    );

    // A file of another size: refused by `veer check`, and in place it
    // keeps the keys before (logged).
    std::fs::write(a_dir.join("short.key"), [7u8; 48]).unwrap();
    let bad = a_dir.join("bad.toml");
    let config = std::fs::read_to_string(a_dir.join("veer.toml")).unwrap();
    std::fs::write(&bad, config.replace("\"t0.key\"", "\"short.key\"")).unwrap();
    let out = super::support::veer_cli(&["check", "--config", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("80 random bytes"),
        "{err}"
    );
    replace_file(&a_dir.join("t0.key"), [7u8; 48]);
    // Waited for by the size error's own words: the rotation above may
    // have logged a refusal of its own (for a moment both files held k1).
    let logs = a_veer.logs_containing("this one 48").await;
    let line = logs
        .lines()
        .find(|l| l.contains("this one 48"))
        .unwrap_or_default();
    assert!(
        line.contains("ticket keys not reloaded") && line.contains("t0.key"),
        "{logs}"
    );
    assert_eq!(served_kind(&other, c).await, Resumed);
    assert_eq!(served_kind(&other, a).await, Resumed, "k2 kept at a");
}

/// How a GET by `connector` to `addr` shook hands (it was served).
async fn served_kind(
    connector: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
) -> rustls::HandshakeKind {
    let (kind, answer) = resumable_get(connector, addr).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    kind.unwrap()
}

/// `min_version = "1.3"` refuses TLS 1.2 clients at the handshake
/// (counted as `tls_handshake`) and serves TLS 1.3 ones; a reload back to
/// "1.2" serves both again.
#[tokio::test]
async fn min_version_13_refuses_tls12_clients_until_a_reload_says_12() {
    let s = Upstream::start("stable").await;
    let dir = tls_dir(&localhost_cert());
    let config = |v: &str| localhost_tls(&s, &format!("min_version = \"{v}\"\n"));
    let veer = Veer::start_in_dir(dir, &config("1.3")).await;
    let addr = veer.tls_addr.expect("tls listener");
    assert_eq!(veer.status().await["tls"]["min_version"], "1.3");
    let tls12 = connector_of(&[&rustls::version::TLS12], None);
    let tls13 = connector_of(&[&rustls::version::TLS13], None);
    let refused = tls_get(&tls12, addr, "/", "").await.unwrap_err();
    assert!(refused.contains("handshake"), "{refused}");
    let (_, answer) = tls_get(&tls13, addr, "/", "").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    super::support::wait_metric(
        &veer,
        r#"veer_proxy_errors_total{kind="tls_handshake"}"#,
        "the refused handshake counted",
        |v| v == 1.0,
    )
    .await;
    veer.write_config(&config("1.2"));
    veer.wait_generation(2).await;
    assert_eq!(veer.status().await["tls"]["min_version"], "1.2");
    for c in [&tls12, &tls13] {
        let (_, answer) = tls_get(c, addr, "/", "").await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}

/// TLS 1.2 clients that resume by session ID alone (no ticket extension,
/// as Java's before JDK 13) resume however many there are: the listeners
/// hold 20 000 sessions by default (rustls's cache of 256 resumed none of
/// 300). With `session_tickets = false` no client gets a ticket: with
/// `session_cache = 0` none resumes (nginx's `ssl_session_tickets off`
/// without a cache), with a cache each resumes from it, TLS 1.3 and 1.2.
/// Each setting applies on reload and shows in `/status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_from_the_cache_and_tickets_can_be_turned_off() {
    let s = Upstream::start("stable").await;
    let dir = tls_dir(&localhost_cert());
    let config = |keys: &str| localhost_tls(&s, keys);
    let veer = Veer::start_in_dir(dir, &config("")).await;
    let addr = veer.tls_addr.expect("tls listener");
    let tls = veer.status().await["tls"].clone();
    assert_eq!(
        (&tls["session_tickets"], &tls["session_cache"]),
        (&true.into(), &20_000.into())
    );
    let id_only: Vec<_> = (0..300).map(|_| session_id_connector()).collect();
    assert_eq!(
        come_back(&id_only, addr).await,
        300,
        "TLS 1.2 clients without tickets that resumed"
    );

    // Tickets off and no cache: nothing resumes.
    veer.write_config(&config("session_tickets = false\nsession_cache = 0\n"));
    veer.wait_generation(2).await;
    let tls = veer.status().await["tls"].clone();
    assert_eq!(
        (&tls["session_tickets"], &tls["session_cache"]),
        (&false.into(), &0.into())
    );
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let clients: Vec<_> = (0..20).map(|_| resuming_connector(version, None)).collect();
        assert_eq!(
            come_back(&clients, addr).await,
            0,
            "{:?}: no tickets, no cache",
            version.version
        );
    }

    // Tickets off, a cache for 300 clients' sessions (two a TLS 1.3 one).
    veer.write_config(&config("session_tickets = false\nsession_cache = 700\n"));
    veer.wait_generation(3).await;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let clients: Vec<_> = (0..300)
            .map(|_| resuming_connector(version, None))
            .collect();
        assert_eq!(
            come_back(&clients, addr).await,
            300,
            "{:?}: from the cache",
            version.version
        );
    }
}

/// Each of `clients` connects to `addr` and GETs `/`, ten at a time, all
/// of them once (each a full handshake) and then again: how many resumed
/// their session the second time.
async fn come_back(clients: &[tokio_rustls::TlsConnector], addr: std::net::SocketAddr) -> usize {
    use rustls::HandshakeKind::{Full, Resumed};
    let mut kinds = Vec::new();
    for _ in 0..2 {
        for some in clients.chunks(10) {
            let gets = some.iter().map(|c| resumable_get(c, addr));
            for got in futures_util::future::join_all(gets).await {
                let (kind, answer) = got.unwrap();
                assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
                kinds.push(kind);
            }
        }
    }
    let (first, again) = kinds.split_at(clients.len());
    assert!(first.iter().all(|k| *k == Some(Full)), "{first:?}");
    again.iter().filter(|k| **k == Some(Resumed)).count()
}

/// A TLS 1.2 client that resumes by session ID only (it offers no ticket
/// extension and takes no ticket).
fn session_id_connector() -> tokio_rustls::TlsConnector {
    let mut cfg = client_config(&[&rustls::version::TLS12], None);
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(16)
        .tls12_resumption(rustls::client::Tls12Resumption::SessionIdOnly);
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A ticket key file's 80 bytes, from `seed`.
fn ticket_key(seed: u8) -> [u8; 80] {
    std::array::from_fn(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
}

/// A client connector speaking only `version` (it keeps its sessions,
/// as one client does), presenting `client` if given.
fn resuming_connector(
    version: &'static rustls::SupportedProtocolVersion,
    client: Option<&ClientKeys>,
) -> tokio_rustls::TlsConnector {
    connector_of(&[version], client)
}

/// [`tls_get`] of `/` by `connector` (resuming a session it holds if it
/// can).
async fn resumable_get(
    connector: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
) -> Result<(Option<rustls::HandshakeKind>, String), String> {
    tls_get(connector, addr, "/", "").await
}

/// Starts veer with a TLS listener (a new certificate for `localhost`)
/// that checks client certificates against `clients` (CA PEM) and `crl`
/// (`client_ca = "clients.pem"`, `client_crl = "revoked.pem"` in its
/// directory), sealing tickets with `ticket_key` if given, its route to
/// `upstream`: veer, the listener's address and the directory.
async fn start_with_crl(
    upstream: &Upstream,
    clients: String,
    crl: &str,
    ticket_key: Option<[u8; 80]>,
) -> (Veer, std::net::SocketAddr, std::path::PathBuf) {
    let dir = tls_dir(&localhost_cert());
    let dir_path = dir.path().to_path_buf();
    std::fs::write(dir_path.join("clients.pem"), clients).unwrap();
    std::fs::write(dir_path.join("revoked.pem"), crl).unwrap();
    let mut keys = "cert = \"tls.crt\"\nkey = \"tls.key\"\nclient_ca = \"clients.pem\"\nclient_crl = \"revoked.pem\"\n".to_string();
    if let Some(k) = ticket_key {
        std::fs::write(dir_path.join("ticket.key"), k).unwrap();
        keys.push_str("ticket_keys = [\"ticket.key\"]\n");
    }
    let config = with_tls(&route_config(&[upstream.addr], &[], 0.0, ""), &keys);
    let veer = Veer::start_in_dir(dir, &config).await;
    let addr = veer.tls_addr.expect("tls listener");
    (veer, addr, dir_path)
}

/// A config routing to `upstream`, its TLS listener serving [`tls_dir`]'s
/// `tls.crt` and `tls.key`, with `keys` (more `[proxy.tls]` lines).
fn localhost_tls(upstream: &Upstream, keys: &str) -> String {
    with_tls(
        &route_config(&[upstream.addr], &[], 0.0, ""),
        &format!("cert = \"tls.crt\"\nkey = \"tls.key\"\n{keys}"),
    )
}

/// A self-signed certificate for `localhost`.
fn localhost_cert() -> rcgen::CertifiedKey {
    rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap()
}

/// A new directory holding `server`'s certificate and key as `tls.crt`
/// and `tls.key`.
fn tls_dir(server: &rcgen::CertifiedKey) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), server.cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), server.key_pair.serialize_pem()).unwrap();
    dir
}

/// Replaces the file at `path` with `text` at once (a new file renamed
/// over it), as a job updating a mounted file does.
fn replace_file(path: &std::path::Path, text: impl AsRef<[u8]>) {
    let new = path.with_extension("new");
    std::fs::write(&new, text).unwrap();
    std::fs::rename(&new, path).unwrap();
}

/// Waits (at most 10 s) until a GET presenting `client` is served
/// (`served`) or refused (not): a changed file taken.
async fn wait_served(addr: std::net::SocketAddr, client: &ClientKeys, served: bool, what: &str) {
    let start = std::time::Instant::now();
    while mtls_get(addr, Some(client), "").await.is_ok() != served {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A reload that adds a certificate pair, sets `client_ca`, or takes
/// them away applies to the next handshakes without a restart; one naming
/// a file that does not load is rejected and the certificates in force
/// stay. A certificate no longer served leaves the expiry metric; only a
/// change of the TLS listener's addresses is a restart.
#[tokio::test]
async fn a_reload_changes_the_tls_certificates_and_client_verification_live() {
    use rcgen::DnType;
    let s = Upstream::start("stable").await;
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_path_buf();
    std::fs::create_dir(dir_path.join("shop")).unwrap();
    let default = self_signed(&dir_path, "default", &["localhost"]);
    let shop = self_signed(&dir_path, "shop/tls", &["shop.example"]);
    let ca = super::upstreams::TestCa::new("clients");
    std::fs::write(dir_path.join("clients.pem"), ca.pem()).unwrap();
    let alice = ca.client(&[(DnType::CommonName, "alice")], vec![]);
    let config = |keys: &str| {
        with_tls(
            &route_config(&[s.addr], &[], 0.0, ""),
            &format!("cert = \"default.crt\"\nkey = \"default.key\"\n{keys}"),
        )
    };
    let shop_pair = "[[proxy.tls.certificates]]\ncert = \"shop/tls.crt\"\nkey = \"shop/tls.key\"\n";
    let veer = Veer::start_in_dir(dir, &config("")).await;
    let addr = veer.tls_addr.expect("tls listener");
    assert_eq!(served_to(addr, "shop.example").await.0, default);
    let shop_file = dir_path.join("shop/tls.crt").display().to_string();
    let shop_expiry =
        format!("veer_tls_certificate_expiry_timestamp_seconds{{certificate=\"{shop_file}\"}}");

    // A pair added: served to clients asking for its name.
    veer.write_config(&config(shop_pair));
    veer.wait_generation(2).await;
    assert_eq!(served_to(addr, "shop.example").await.0, shop);
    assert_eq!(served_to(addr, "localhost").await.0, default);
    let status = veer.status().await;
    assert_eq!(
        status["tls"]["certificates"].as_array().unwrap().len(),
        2,
        "{status}"
    );
    assert_eq!(
        status["config"]["restart_required"],
        serde_json::json!([]),
        "{status}"
    );
    assert!(super::support::metric(&veer.metrics().await, &shop_expiry).is_some());

    // A pair whose files are not there: the config is rejected, and what
    // is served stays.
    veer.write_config(&config(&format!(
        "{shop_pair}[[proxy.tls.certificates]]\ncert = \"gone.crt\"\nkey = \"gone.key\"\n"
    )));
    let start = std::time::Instant::now();
    loop {
        let st = veer.status().await;
        if st["config"]["last_reload"]["result"] == "failure" {
            let err = st["config"]["last_reload"]["error"].as_str().unwrap();
            assert!(
                err.contains("[proxy.tls]") && err.contains("gone.crt"),
                "{err}"
            );
            assert_eq!(st["config"]["generation"], 2);
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "never rejected: {st}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(served_to(addr, "shop.example").await.0, shop);

    // client_ca set, the pair taken away: clients need a certificate, the
    // shop's leaves the metrics, and the plain listener drops a client's
    // own X-Forwarded-Client-Cert, on a connection from before too.
    let mut before = Client::connect(veer.addr).await.unwrap();
    assert_eq!(before.get("/", &[]).await.unwrap().status(), 200);
    veer.write_config(&config("client_ca = \"clients.pem\"\n"));
    veer.wait_generation(3).await;
    let forged = [("x-forwarded-client-cert", "Hash=00;Subject=\"CN=admin\"")];
    assert_eq!(before.get("/", &forged).await.unwrap().status(), 200);
    assert_eq!(
        s.last_headers
            .lock()
            .unwrap()
            .get("x-forwarded-client-cert"),
        None
    );
    assert!(mtls_get(addr, None, "").await.is_err());
    let answer = mtls_get(addr, Some(&alice), "").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        served_to_client(addr, &alice, "shop.example").await,
        default
    );
    assert_eq!(
        super::support::metric(&veer.metrics().await, &shop_expiry),
        None
    );
    let header = |h: &http::HeaderMap| {
        h.get("x-forwarded-client-cert")
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert!(
        header(&s.last_headers.lock().unwrap()).is_some_and(|v| v.contains("Subject=\"CN=alice\""))
    );
    let answer = raw(
        veer.addr,
        b"GET / HTTP/1.1\r\nhost: localhost\r\nx-forwarded-client-cert: Hash=00\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(header(&s.last_headers.lock().unwrap()), None);
    assert_eq!(
        veer.status().await["tls"]["client_ca"],
        dir_path.join("clients.pem").display().to_string().as_str()
    );

    // client_ca taken away: served without a certificate again.
    veer.write_config(&config(""));
    veer.wait_generation(4).await;
    let answer = mtls_get(addr, None, "").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Another address for the TLS listener: a restart, said so.
    veer.write_config(&config("").replace(
        "[proxy.tls]\nlisten = [\"127.0.0.1:0\"]",
        "[proxy.tls]\nlisten = [\"127.0.0.2:0\"]",
    ));
    veer.wait_generation(5).await;
    let status = veer.status().await;
    assert_eq!(
        status["config"]["restart_required"],
        serde_json::json!(["proxy.tls.listen"]),
        "{status}"
    );
}

/// A client certificate and its key.
type ClientKeys = (
    rustls::pki_types::CertificateDer<'static>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// A TLS client that takes any server certificate, presenting `client`'s
/// if given.
fn connector(client: Option<&ClientKeys>) -> tokio_rustls::TlsConnector {
    connector_of(rustls::DEFAULT_VERSIONS, client)
}

/// [`connector`], speaking only `versions`.
fn connector_of(
    versions: &[&'static rustls::SupportedProtocolVersion],
    client: Option<&ClientKeys>,
) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(Arc::new(client_config(versions, client)))
}

/// [`connector_of`]'s client set-up.
fn client_config(
    versions: &[&'static rustls::SupportedProtocolVersion],
    client: Option<&ClientKeys>,
) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny::default()));
    match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(vec![cert.clone()], key.clone_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    }
}

/// Writes a self-signed certificate for `names` and its key to
/// `dir`/`file`.crt and .key; returns the certificate.
fn self_signed(
    dir: &std::path::Path,
    file: &str,
    names: &[&str],
) -> rustls::pki_types::CertificateDer<'static> {
    let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let cert = rcgen::generate_simple_self_signed(names).unwrap();
    std::fs::write(dir.join(format!("{file}.crt")), cert.cert.pem()).unwrap();
    std::fs::write(
        dir.join(format!("{file}.key")),
        cert.key_pair.serialize_pem(),
    )
    .unwrap();
    cert.cert.der().clone()
}

/// The certificate `addr` serves to a client presenting `client` and
/// asking for `name`.
async fn served_to_client(
    addr: std::net::SocketAddr,
    client: &(
        rustls::pki_types::CertificateDer<'static>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    name: &str,
) -> rustls::pki_types::CertificateDer<'static> {
    let connector = connector(Some(client));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let tls = connector.connect(server_name, tcp).await.unwrap();
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    served
}

/// The certificate `addr` shows a client asking for `name` (no name
/// asked for when it is an address), and the head of its answer to a GET.
async fn served_to(
    addr: std::net::SocketAddr,
    name: &str,
) -> (rustls::pki_types::CertificateDer<'static>, String) {
    let connector = connector(None);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut tls = connector.connect(server_name, tcp).await.unwrap();
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    tls.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tls.read_to_end(&mut answer),
    )
    .await;
    (served, String::from_utf8_lossy(&answer).into_owned())
}

/// GET over TLS with ALPN h2 and http/1.1 offered; trusts any of `root`.
/// Returns the HTTP version, the body and the certificate the server showed.
async fn h2_get(
    addr: std::net::SocketAddr,
    root: &rustls::pki_types::CertificateDer<'static>,
) -> (
    http::Version,
    Bytes,
    rustls::pki_types::CertificateDer<'static>,
) {
    let mut roots = rustls::RootCertStore::empty();
    let _ = roots.add(root.clone());
    let tls = tls_connect(addr, &[b"h2", b"http/1.1"]).await;
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("https://localhost:{}/tls", addr.port()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let version = resp.version();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (version, body, served)
}

/// The test inspects which certificate was served rather than trusting one.
/// It offers `offering`'s signature schemes (None: all ring verifies).
#[derive(Debug, Default)]
pub(super) struct AcceptAny {
    pub(super) offering: Option<Vec<rustls::SignatureScheme>>,
}

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.offering.clone().unwrap_or_else(|| {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        })
    }
}

/// A TLS connection to veer at `addr` (as `localhost`, any certificate
/// accepted), offering `alpn`.
pub(super) async fn tls_connect(
    addr: std::net::SocketAddr,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let cfg = any_cert_client(alpn, AcceptAny::default());
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// A client set-up taking any certificate (`verifier`'s signature schemes
/// offered), offering `alpn`.
fn any_cert_client(alpn: &[&[u8]], verifier: AcceptAny) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}
