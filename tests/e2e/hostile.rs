//! Hostile requests at the edge: one Host, protected headers, forwarded
//! addresses, path normalisation, admin tokens, secrets in URLs, and
//! request smuggling framings.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::edge::with_proxy;
use super::support::{get, metric, route_config, Upstream, Veer};

/// Sends raw bytes on a fresh connection; returns the connection, still
/// open, and the response's status code (0 if none came).
pub(super) async fn send(addr: std::net::SocketAddr, bytes: &[u8]) -> (TcpStream, u16) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let _ = c.write_all(bytes).await;
    let mut buf = vec![0u8; 4096];
    let n = match tokio::time::timeout(Duration::from_secs(20), c.read(&mut buf)).await {
        Ok(Ok(n)) => n,
        _ => 0,
    };
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (c, code)
}

/// Sends raw bytes on a fresh connection; returns the response's status code.
pub(super) async fn status_of(addr: std::net::SocketAddr, bytes: &[u8]) -> u16 {
    send(addr, bytes).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_routes_and_the_upstream_gets_that_host() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    let two = b"GET / HTTP/1.1\r\nhost: a.test\r\nhost: b.test\r\n\r\n";
    assert_eq!(status_of(veer.addr, two).await, 400);
    let mismatch = b"GET http://a.test/ HTTP/1.1\r\nhost: b.test\r\n\r\n";
    assert_eq!(status_of(veer.addr, mismatch).await, 400);
    let before = s.requests.load(std::sync::atomic::Ordering::SeqCst);
    let absolute = b"GET http://a.test/x HTTP/1.1\r\nhost: A.test\r\n\r\n";
    assert_eq!(status_of(veer.addr, absolute).await, 200);
    assert_eq!(s.last_headers.lock().unwrap()["host"], "A.test");
    assert_eq!(
        s.requests.load(std::sync::atomic::Ordering::SeqCst),
        before + 1
    );
}

/// An HTTP/1.1 request without a `Host` is 400 (RFC 9112, section 3.2;
/// nginx, HAProxy and Envoy refuse it too) and reaches no upstream; it was
/// forwarded without one. An HTTP/1.0 request may have none (a load
/// balancer's health check, HAProxy's `OPTIONS / HTTP/1.0`): it goes with
/// the endpoint's address as its `Host`, as nginx's `proxy_pass` sends
/// it, on veer's own client and hyper's, with a body or without; it went
/// as an HTTP/1.1 request without one, which servers refuse (Go's
/// net/http answers 400).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_host_is_refused_on_http11_and_named_for_its_endpoint_on_http10() {
    for setting in ["", "upstream_http1 = \"hyper\""] {
        let s = Upstream::start("stable").await;
        let veer = Veer::start(&with_proxy(route_config(&[s.addr], &[], 0.0, ""), setting)).await;
        let count = || s.requests.load(std::sync::atomic::Ordering::SeqCst);
        let before = count();
        let hostless = b"GET /none HTTP/1.1\r\nuser-agent: probe\r\n\r\n";
        assert_eq!(status_of(veer.addr, hostless).await, 400, "{setting}");
        assert_eq!(count(), before, "{setting}: the upstream got it");
        for old in [
            &b"OPTIONS / HTTP/1.0\r\n\r\n"[..],
            b"POST /up HTTP/1.0\r\ncontent-length: 2\r\n\r\nhi",
        ] {
            assert_eq!(status_of(veer.addr, old).await, 200, "{setting}");
            let host = s.last_headers.lock().unwrap()["host"].clone();
            assert_eq!(host, s.addr.to_string(), "{setting}");
        }
        assert_eq!(count(), before + 2, "{setting}");
        let m = veer.metrics().await;
        let refused = r#"veer_proxy_errors_total{kind="bad_request"}"#;
        assert_eq!(metric(&m, refused), Some(1.0), "{setting}: {m}");
    }
}

/// A `Host` nginx refuses (a `/`, a `\`, a space, `..`) and a path with an
/// encoded NUL are 400 and reach no upstream, as with nginx: they went on
/// as they came, to services that build links from their host or read a
/// path as ending at its NUL. With trusted hops (where the forwarding
/// fields are made for each request) too; a host that comes again on
/// its connection after a good one is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_or_path_nginx_refuses_gets_400_and_reaches_no_upstream() {
    for setting in ["", "trusted_hops = 1"] {
        let s = Upstream::start("stable").await;
        let veer = Veer::start(&with_proxy(route_config(&[s.addr], &[], 0.0, ""), setting)).await;
        let count = || s.requests.load(std::sync::atomic::Ordering::SeqCst);
        let head = |host: &str, path: &str| format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n");
        for (host, path) in [
            ("x/y", "/a"),
            ("x\\y", "/a"),
            ("x y", "/a"),
            ("x..y", "/a"),
            ("x.test", "/a%00b"),
        ] {
            let bytes = head(host, path);
            assert_eq!(
                status_of(veer.addr, bytes.as_bytes()).await,
                400,
                "{setting}: {host} {path}"
            );
        }
        assert_eq!(count(), 0, "{setting}");
        // A good host, then a bad one on the same connection.
        let both = format!("{}{}", head("x.test", "/a"), head("x/y", "/a"));
        let mut c = TcpStream::connect(veer.addr).await.unwrap();
        c.write_all(both.as_bytes()).await.unwrap();
        let (mut got, mut buf) = (String::new(), [0u8; 4096]);
        while got.matches("HTTP/1.1 ").count() < 2 {
            let read = tokio::time::timeout(Duration::from_secs(20), c.read(&mut buf)).await;
            let n = read.expect("two answers").unwrap();
            assert!(n > 0, "{setting}: closed after {got}");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(got.starts_with("HTTP/1.1 200 "), "{setting}: {got}");
        assert!(got.contains("HTTP/1.1 400 "), "{setting}: {got}");
        assert_eq!(count(), 1, "{setting}");
        let m = veer.metrics().await;
        let refused = r#"veer_proxy_errors_total{kind="bad_request"}"#;
        assert_eq!(metric(&m, refused), Some(6.0), "{setting}: {m}");
    }
}

/// `TRACE` (and IIS's `TRACK`) get 405 and reach no upstream, as nginx
/// answers them: they echo the request, cookies included, and security
/// scans flag an edge that passes them on. Other methods, unknown ones
/// too, go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_gets_405_and_reaches_no_upstream() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    for method in ["TRACE", "TRACK"] {
        let head = format!("{method} / HTTP/1.1\r\nhost: a\r\ncookie: session=secret\r\n\r\n");
        assert_eq!(status_of(veer.addr, head.as_bytes()).await, 405, "{method}");
    }
    assert_eq!(s.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    for method in ["OPTIONS", "PATCH", "PROPFIND"] {
        let head = format!("{method} / HTTP/1.1\r\nhost: a\r\n\r\n");
        assert_eq!(status_of(veer.addr, head.as_bytes()).await, 200, "{method}");
    }
    let m = veer.metrics().await;
    let refused = r#"veer_proxy_errors_total{kind="method_not_allowed"}"#;
    assert_eq!(metric(&m, refused), Some(2.0), "{m}");
}

/// A client's look-alikes of the forwarding fields veer writes, with `_`
/// for `-` (`X_Forwarded_For`), never reach the upstream: CGI, WSGI and
/// Rack servers read both spellings as one variable, and some let the
/// client's stand in for veer's. Other names with an underscore go on.
/// Fields only a proxy writes, from which services build links and
/// redirects (`X-Forwarded-Port`, `-Prefix`, `-Scheme`, `-Ssl`), reach it
/// only from proxies `trusted_hops` trusts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookalikes_of_the_forwarding_fields_never_reach_the_upstream() {
    const PROXIES_ONLY: [(&str, &str); 4] = [
        ("x-forwarded-port", "1337"),
        ("x-forwarded-prefix", "//evil.test"),
        ("x-forwarded-scheme", "https"),
        ("x-forwarded-ssl", "on"),
    ];
    for setting in ["", "trusted_hops = 1"] {
        let s = Upstream::start("stable").await;
        let veer = Veer::start(&with_proxy(route_config(&[s.addr], &[], 0.0, ""), setting)).await;
        let mut head = b"GET / HTTP/1.1\r\nhost: a\r\nx_forwarded_for: 6.6.6.6\r\nx-real_ip: 6.6.6.6\r\nX_Forwarded_Proto: https\r\nx-forwarded_host: evil.test\r\nx_forwarded_client_cert: Hash=evil\r\nx_tenant: 42\r\nx_forwarded_port: 6\r\n".to_vec();
        for (name, value) in PROXIES_ONLY {
            head.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        assert_eq!(status_of(veer.addr, &head).await, 200, "{setting}");
        let h = s.last_headers.lock().unwrap().clone();
        for (name, value) in PROXIES_ONLY {
            let want = (!setting.is_empty()).then_some(value);
            let got = h.get(name).map(|v| v.to_str().unwrap());
            assert_eq!(got, want, "{setting}: {name}");
        }
        let names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        assert!(
            !names.iter().any(|n| n.contains('_') && *n != "x_tenant"),
            "{setting}: {names:?}"
        );
        assert_eq!(h["x_tenant"], "42", "{setting}");
        assert_eq!(h["x-real-ip"], "127.0.0.1", "{setting}");
        assert!(!format!("{h:?}").contains("6.6.6.6"), "{setting}: {h:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_make_veer_drop_authorization_or_forwarding_headers() {
    for setting in ["", "upstream_http1 = \"hyper\""] {
        let s = Upstream::start("stable").await;
        let veer = Veer::start(&with_proxy(route_config(&[s.addr], &[], 0.0, ""), setting)).await;
        let req = b"GET / HTTP/1.1\r\nhost: a\r\nconnection: host, authorization, x-forwarded-for, x-gone\r\nauthorization: Bearer t\r\nx-forwarded-for: 6.6.6.6\r\nx-forwarded-for: 7.7.7.7\r\nx-gone: 1\r\nx-real-ip: 9.9.9.9\r\nforwarded: for=9.9.9.9\r\nx-forwarded-proto: gopher\r\nx-forwarded-host: evil.test\r\n\r\n";
        assert_eq!(status_of(veer.addr, req).await, 200);
        let h = s.last_headers.lock().unwrap().clone();
        assert_eq!(h["authorization"], "Bearer t");
        assert_eq!(h["host"], "a");
        assert_eq!(h["x-forwarded-for"], "6.6.6.6, 7.7.7.7, 127.0.0.1");
        assert!(!h.contains_key("x-gone"));
        // A client's own X-Real-IP and Forwarded do not pass (no trusted hops).
        assert_eq!(h["x-real-ip"], "127.0.0.1");
        assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http;host=\"a\"");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "a");
        // This hop's fields replace the client's: one line each, on veer's own
        // HTTP/1.1 writer (a GET) as on hyper's client (upstream_http1 = "hyper").
        for name in [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-real-ip",
            "forwarded",
        ] {
            assert_eq!(h.get_all(name).iter().count(), 1, "{setting} {name}: {h:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_client_ip_stickiness_uses_the_forwarded_address() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let config = with_proxy(
        route_config(&[s.addr], &[c.addr], 50.0, ""),
        "trusted_hops = 1",
    )
    .replace(
        "sticky = [\"header:x-user-id\", \"client-ip\"]",
        "sticky = [\"client-ip\"]",
    );
    let veer = Veer::start(&config).await;
    // Every request comes from 127.0.0.1 (the "proxy"); the client address
    // it vouches for decides the version, and always the same one.
    let mut seen = std::collections::HashMap::new();
    for i in 0..200u32 {
        let ip = format!("198.51.{}.{}", i / 250, i % 250 + 1);
        for _ in 0..2 {
            let req = format!(
                "GET / HTTP/1.1\r\nhost: a\r\nx-forwarded-for: 6.6.6.6, {ip}\r\nconnection: close\r\n\r\n"
            );
            let mut conn = TcpStream::connect(veer.addr).await.unwrap();
            conn.write_all(req.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            let _ = conn.read_to_end(&mut out).await;
            let text = String::from_utf8_lossy(&out).to_lowercase();
            let up = if text.contains("x-upstream: canary") {
                "canary"
            } else {
                "stable"
            };
            let first = seen.entry(ip.clone()).or_insert(up);
            assert_eq!(*first, up, "{ip} moved between versions");
        }
    }
    let canary = seen.values().filter(|v| **v == "canary").count();
    assert!(
        (50..=150).contains(&canary),
        "{canary} of 200 addresses on the canary"
    );
    assert!(s.last_headers.lock().unwrap().get("x-real-ip").is_some());
}

/// A config of two routes: `web` on `/` and `internal` on `/admin`
/// (`internal_extra` in its section), with `proxy_extra` in `[proxy]`.
fn web_and_internal(
    web: &Upstream,
    admin: &Upstream,
    proxy_extra: &str,
    internal_extra: &str,
) -> String {
    format!(
        r#"[proxy]
listen = ["127.0.0.1:0"]
{proxy_extra}
[admin]
listen = "127.0.0.1:0"
[state]
dir = "@STATE@"

[[route]]
name = "web"
path_prefix = "/"
[route.stable]
version = "w1"
endpoints = ["{}"]

[[route]]
name = "internal"
path_prefix = "/admin"
{internal_extra}
[route.stable]
version = "a1"
endpoints = ["{}"]
"#,
        web.addr, admin.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalised_before_prefix_routing() {
    let admin = Upstream::start("admin").await;
    let web = Upstream::start("web").await;
    let veer = Veer::start(&web_and_internal(&web, &admin, "", "")).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n");
    assert_eq!(
        status_of(veer.addr, get("/t/%2e%2e/admin/x?q=1").as_bytes()).await,
        200
    );
    assert_eq!(*admin.last_uri.lock().unwrap(), "/admin/x?q=1");
    assert_eq!(
        status_of(veer.addr, get("/t/../admin").as_bytes()).await,
        200
    );
    assert_eq!(*admin.last_uri.lock().unwrap(), "/admin");
    let before = (
        admin.requests.load(std::sync::atomic::Ordering::SeqCst),
        web.requests.load(std::sync::atomic::Ordering::SeqCst),
    );
    assert_eq!(
        status_of(veer.addr, get("/t/../../admin/%2e%2e/x").as_bytes()).await,
        400
    );
    // A servlet container reads `/t/..;/admin` as `/admin` (it drops a
    // segment's `;` parameters before its dots): refused, not sent to
    // `/`'s route past `/admin`'s.
    for tricked in ["/t/..;/admin", "/t/%2e%2e;jsessionid=1/admin", "/t/.;/x"] {
        assert_eq!(
            status_of(veer.addr, get(tricked).as_bytes()).await,
            400,
            "{tricked}"
        );
    }
    assert_eq!(
        (
            admin.requests.load(std::sync::atomic::Ordering::SeqCst),
            web.requests.load(std::sync::atomic::Ordering::SeqCst),
        ),
        before,
        "an escaping path reached an upstream"
    );
}

/// A doubled slash cannot step round a route's `allow_from`: `//admin`
/// routes, and reaches the upstream, as `/admin` (nginx's `merge_slashes`,
/// on by default). It went to the open `/` route as `//admin`, which
/// servers that merge slashes themselves (Tomcat, Apache) serve as the
/// admin page. `merge_slashes = false` keeps them (a reload applies it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_doubled_slash_cannot_step_round_a_routes_allow_from() {
    let admin = Upstream::start("admin").await;
    let web = Upstream::start("web").await;
    let internal = "allow_from = [\"10.0.0.0/8\"]";
    let config = |setting: &str| web_and_internal(&web, &admin, setting, internal);
    let veer = Veer::start(&config("")).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n");
    for path in [
        "/admin/users",
        "//admin/users",
        "///admin//users",
        "/x/..//admin/users",
    ] {
        assert_eq!(
            status_of(veer.addr, get(path).as_bytes()).await,
            403,
            "{path}"
        );
    }
    assert_eq!(status_of(veer.addr, get("/a//b/").as_bytes()).await, 200);
    assert_eq!(*web.last_uri.lock().unwrap(), "/a/b/");
    assert_eq!(admin.requests.load(std::sync::atomic::Ordering::SeqCst), 0);

    veer.write_config(&config("merge_slashes = false"));
    veer.wait_generation(2).await;
    assert_eq!(
        status_of(veer.addr, get("//admin/users").as_bytes()).await,
        200
    );
    assert_eq!(*web.last_uri.lock().unwrap(), "//admin/users");
    assert_eq!(
        status_of(veer.addr, get("/admin/users").as_bytes()).await,
        403
    );
}

/// A `Host` whose port is no number still names its host: everything from
/// the first `:` is the port, as nginx and Express read it. It was the
/// whole name, which matched no route, so `admin.test:80x` went to the
/// default route, past the admin host's `allow_from`, to a service that
/// read it as `admin.test`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_a_port_that_is_no_number_routes_by_its_name() {
    let admin = Upstream::start("admin").await;
    let web = Upstream::start("web").await;
    let config = web_and_internal(&web, &admin, "", "").replace(
        "path_prefix = \"/admin\"",
        "hosts = [\"admin.test\"]\nallow_from = [\"10.0.0.0/8\"]",
    );
    let veer = Veer::start(&config).await;
    for host in [
        "admin.test",
        "ADMIN.test:8080",
        "admin.test:80x",
        "admin.test:",
    ] {
        let head = format!("GET /users HTTP/1.1\r\nhost: {host}\r\n\r\n");
        assert_eq!(status_of(veer.addr, head.as_bytes()).await, 403, "{host}");
    }
    assert_eq!(web.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    let other = b"GET /users HTTP/1.1\r\nhost: www.test:80x\r\n\r\n";
    assert_eq!(status_of(veer.addr, other).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_always_need_a_token_generated_when_none_is_configured() {
    use super::support::{admin_post, admin_request};
    use std::os::unix::fs::PermissionsExt;
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let veer = Veer::start(&route_config(&[s.addr], &[c.addr], 10.0, "")).await;
    assert_eq!(
        admin_request(veer.admin, "POST", "/routes/web/promote", None).await,
        401,
        "no token_file must not mean no token"
    );
    let path = veer.dir.path().join("state/admin.token");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        admin_request(veer.admin, "POST", "/routes/web/pause", Some(token.trim())).await,
        200
    );
    // The scheme is case-insensitive.
    let lower = format!("bearer {}", token.trim());
    let status = {
        let stream = TcpStream::connect(veer.admin).await.unwrap();
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = http::Request::post("/routes/web/resume")
            .header("host", "admin")
            .header("authorization", lower)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        tx.send_request(req).await.unwrap().status()
    };
    assert_eq!(status, 200);
    assert_eq!(admin_post(&veer, "/routes/web/revert").await, 200);
    // Probes and reads need none by default.
    assert_eq!(admin_request(veer.admin, "GET", "/status", None).await, 200);
    assert_eq!(
        admin_request(veer.admin, "GET", "/healthz", None).await,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_token_guards_status_and_metrics_but_not_probes() {
    use super::support::admin_request;
    let s = Upstream::start("stable").await;
    let veer = Veer::start(
        &route_config(&[s.addr], &[], 0.0, "").replace("[admin]\n", "[admin]\nread_token = true\n"),
    )
    .await;
    let token = std::fs::read_to_string(veer.dir.path().join("state/admin.token")).unwrap();
    // `/status` and `/metrics` asked with `token` (or none): their statuses.
    let reads = |token: Option<&str>| {
        let (admin, token) = (veer.admin, token.map(str::to_string));
        async move {
            let t = token.as_deref();
            (
                admin_request(admin, "GET", "/status", t).await,
                admin_request(admin, "GET", "/metrics", t).await,
            )
        }
    };
    // Until the reads without a token get `want` (a reload applied).
    let until = |want: (u16, u16)| async move {
        let start = Instant::now();
        loop {
            let got = reads(None).await;
            if got == want {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{got:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert_eq!(reads(None).await, (401, 401));
    assert_eq!(reads(Some(token.trim())).await, (200, 200));
    assert_eq!(admin_request(veer.admin, "GET", "/readyz", None).await, 200);
    // Turned off and on again by reloads, without a restart.
    let open = route_config(&[s.addr], &[], 0.0, "");
    veer.write_config(&open);
    until((200, 200)).await;
    let st = veer.status().await;
    assert_eq!(
        st["config"]["restart_required"],
        serde_json::json!([]),
        "{st}"
    );
    veer.write_config(&open.replace("[admin]\n", "[admin]\nread_token = true\n"));
    until((401, 401)).await;
    assert_eq!(reads(Some(token.trim())).await, (200, 200));
}

/// A rotated admin token (its file replaced, as a Kubernetes Secret's is)
/// is the one taken from then on, without a restart; a replacement that
/// gives no token (empty, readable by others) keeps the one before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_admin_token_is_taken_live_and_a_bad_file_keeps_the_last() {
    use super::support::{admin_request, write_with_mode};
    let s = Upstream::start("stable").await;
    let dir = tempfile::tempdir().unwrap();
    let (first, second, third) = (
        "first-0123456789abcdef",
        "second-0123456789abcdef",
        "third-0123456789abcdef",
    );
    write_with_mode(&dir.path().join("admin.token"), first, 0o600);
    let config = route_config(&[s.addr], &[], 0.0, "").replace(
        "[admin]\n",
        "[admin]\ntoken_file = \"admin.token\"\nread_token = true\n",
    );
    let veer = Veer::start_in_dir(dir, &config).await;
    let status = |t: &'static str| admin_request(veer.admin, "GET", "/status", Some(t));
    assert_eq!(status(first).await, 200);
    assert_eq!(status(second).await, 401);
    let replace = |text: &str, mode: u32| {
        let new = veer.dir.path().join("admin.token.new");
        write_with_mode(&new, text, mode);
        std::fs::rename(new, veer.dir.path().join("admin.token")).unwrap();
    };
    replace(&format!("{second}\n"), 0o600);
    let start = Instant::now();
    while status(second).await != 200 {
        assert!(start.elapsed() < Duration::from_secs(30), "never taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(first).await, 401);
    let reloaded = veer
        .logs_with_at_least("admin token reloaded: actions need the new one", 1)
        .await;
    assert_eq!(reloaded.len(), 1, "{reloaded:?}");
    // An empty file, then one others can read: the token before stays.
    replace("", 0o600);
    let kept = veer
        .logs_with_at_least("admin token not reloaded; the previous one stays", 1)
        .await;
    assert!(!kept.is_empty(), "the empty file was never read");
    assert_eq!(status(second).await, 200);
    replace(third, 0o644);
    let start = Instant::now();
    loop {
        let lines = veer
            .logs_with_at_least("admin token not reloaded; the previous one stays", 1)
            .await;
        if lines
            .iter()
            .any(|l| l["error"].as_str().is_some_and(|e| e.contains("chmod 600")))
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{lines:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(second).await, 200);
    assert_eq!(status(third).await, 401);
}

#[test]
fn a_token_file_others_can_read_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    super::support::write_with_mode(&dir.path().join("token"), "s3cret\n", 0o644);
    let config = route_config(&["127.0.0.1:9".parse().unwrap()], &[], 0.0, "")
        .replace("[admin]\n", "[admin]\ntoken_file = \"token\"\n")
        .replace("@STATE@", &dir.path().join("state").display().to_string());
    let path = dir.path().join("veer.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_veer"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_webhook_url_never_shows_its_secret() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let good = route_config(&[s.addr], &[c.addr], 10.0, "");
    let veer = Veer::start(&good).await;
    veer.write_config(
        &(good.clone()
            + "[route.judge]\nwebhook = \"https://user:SECRET1@hooks.test/services/SECRET2 x\"\n"),
    );
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let st = veer.status().await;
        if st["config"]["last_reload"]["result"] == "failure" {
            break st;
        }
        assert!(Instant::now() < until, "the bad file was never rejected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = status.to_string();
    assert!(text.contains("webhook"), "{text}");
    assert!(!text.contains("SECRET"), "{text}");
    let logs = format!(
        "{:?}",
        veer.logs_with_at_least("reload rejected; the running config stays", 1)
            .await
    );
    assert!(!logs.contains("SECRET"), "{logs}");
}

/// HTTP/1.1 framing attacks: each case on a fresh connection. Whatever veer
/// answers, the upstream never receives the smuggled second request, and
/// veer keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_smuggling_framings_never_reach_the_upstream_as_a_second_request() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n";
    let cases: Vec<(&str, String)> = vec![
        (
            "CL and TE",
            format!("POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "TE and CL",
            format!("POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 40\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "two different Content-Length",
            format!("POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\ncontent-length: 40\r\n\r\n{smuggled}"),
        ),
        (
            "a signed Content-Length",
            format!("POST / HTTP/1.1\r\nhost: a\r\ncontent-length: +40\r\n\r\n{smuggled}"),
        ),
        (
            "a Content-Length list",
            format!("POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 40, 0\r\n\r\n{smuggled}"),
        ),
        (
            "obs-fold",
            format!("POST / HTTP/1.1\r\nhost: a\r\nx-a: b\r\n content-length: 40\r\n\r\n{smuggled}"),
        ),
        (
            "space before the colon",
            format!("POST / HTTP/1.1\r\nhost: a\r\ncontent-length : 40\r\n\r\n{smuggled}"),
        ),
        (
            "chunked not last",
            format!("POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "bare LF",
            format!("POST / HTTP/1.1\nhost: a\ncontent-length: 40\n\n{smuggled}"),
        ),
        (
            "a coding before chunked",
            format!("POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
    ];
    for (name, bytes) in cases {
        let (before, after) = upstream_requests_around(&s, &veer, bytes.as_bytes()).await;
        assert!(
            after - before <= 1,
            "{name}: the upstream got {} requests",
            after - before
        );
        assert_ne!(*s.last_uri.lock().unwrap(), "/smuggled", "{name}: smuggled");
        let r = get(veer.addr, "/after", &[]).await.unwrap();
        assert_eq!(r.status(), 200, "{name}: veer stopped serving");
    }
}

/// A request whose `Transfer-Encoding` names a coding besides one `chunked`
/// gets 501 and its connection closed, and nothing of it reaches the
/// upstream: veer decodes only the chunking, and passed the rest on as
/// the body (`gzip, chunked`: the upstream got gzip bytes as a plain body,
/// and served the request pipelined behind it). One `chunked`, in any
/// case or after an empty list element, is served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_a_transfer_coding_veer_cannot_pass_on_gets_501_and_reaches_no_upstream() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    let behind = "GET /behind HTTP/1.1\r\nhost: a\r\n\r\n";
    let refused = [
        "transfer-encoding: gzip, chunked\r\n",
        "transfer-encoding: chunked, chunked\r\n",
        "transfer-encoding: deflate\r\ntransfer-encoding: chunked\r\n",
    ];
    for te in refused {
        let before = s.requests.load(std::sync::atomic::Ordering::SeqCst);
        let bytes =
            format!("POST /coded HTTP/1.1\r\nhost: a\r\n{te}\r\n2\r\nhi\r\n0\r\n\r\n{behind}");
        let mut c = TcpStream::connect(veer.addr).await.unwrap();
        c.write_all(bytes.as_bytes()).await.unwrap();
        // The answer, then the close: the request behind it is not read.
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut answer))
            .await
            .expect("the connection was not closed")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer).to_lowercase();
        assert!(answer.starts_with("http/1.1 501 "), "{te}: {answer}");
        assert!(answer.contains("connection: close"), "{te}: {answer}");
        assert_eq!(answer.matches("http/1.1 ").count(), 1, "{te}: {answer}");
        let after = s.requests.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(after, before, "{te}: the upstream was sent something");
    }
    let m = veer.metrics().await;
    let series = r#"veer_proxy_errors_total{kind="transfer_coding"}"#;
    assert_eq!(metric(&m, series), Some(3.0), "{m}");
    // Never a version's request (no series yet: the version has none).
    let version = r#"veer_requests_total{code="5xx",route="web",version="v1"}"#;
    assert_eq!(metric(&m, version).unwrap_or(0.0), 0.0, "{m}");
    for te in ["Chunked", ", chunked"] {
        let bytes =
            format!("POST /plain HTTP/1.1\r\nhost: a\r\ntransfer-encoding: {te}\r\n\r\n2\r\nhi\r\n0\r\n\r\n");
        assert_eq!(status_of(veer.addr, bytes.as_bytes()).await, 200, "{te}");
        assert_eq!(*s.last_uri.lock().unwrap(), "/plain", "{te}");
    }
}

/// Sends `bytes` on a new connection, reads whatever veer answers until it
/// closes or goes quiet, and returns the upstream's request count before
/// and after.
async fn upstream_requests_around(s: &Upstream, veer: &Veer, bytes: &[u8]) -> (u64, u64) {
    let before = s.requests.load(std::sync::atomic::Ordering::SeqCst);
    let mut c = TcpStream::connect(veer.addr).await.unwrap();
    let _ = c.write_all(bytes).await;
    let mut buf = vec![0u8; 8192];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), c.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
    drop(c);
    (before, s.requests.load(std::sync::atomic::Ordering::SeqCst))
}

/// An HPACK header block of literal fields without indexing (no Huffman).
pub(super) fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        assert!(name.len() < 127 && value.len() < 127);
        out.push(0x00);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// HTTP/2 frame types and flags (RFC 9113 §6), for hand-made frames.
pub(super) mod h2 {
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const GOAWAY: u8 = 7;
    pub const CONTINUATION: u8 = 9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
}

/// One HTTP/2 frame.
pub(super) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_framings_that_must_be_refused_never_reach_the_upstream() {
    use h2::{DATA, END_HEADERS, END_STREAM, HEADERS};
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    let base = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "a"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut f: Vec<(&str, &str)> = base.to_vec();
        f.extend_from_slice(extra);
        hpack(&f)
    };
    let smuggled = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n";
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            // A body shorter than its content-length: the request must not
            // reach the upstream whole, and its bytes never as a request.
            "h2 content-length longer than the body",
            [
                frame(HEADERS, END_HEADERS, 1, &with(&[("content-length", "100")])),
                frame(DATA, END_STREAM, 1, smuggled),
            ]
            .concat(),
            false,
        ),
        (
            "h2 content-length shorter than the body",
            [
                frame(HEADERS, END_HEADERS, 1, &with(&[("content-length", "1")])),
                frame(DATA, END_STREAM, 1, smuggled),
            ]
            .concat(),
            false,
        ),
        (
            "h2 te: gzip",
            frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &with(&[("te", "gzip")]),
            ),
            true,
        ),
        (
            "h2 transfer-encoding: chunked",
            [
                frame(
                    HEADERS,
                    END_HEADERS,
                    1,
                    &with(&[("transfer-encoding", "chunked")]),
                ),
                frame(DATA, END_STREAM, 1, smuggled),
            ]
            .concat(),
            true,
        ),
        (
            "h2 connection header",
            frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &with(&[("connection", "keep-alive")]),
            ),
            true,
        ),
    ];
    // The control: the same hand-made frames, valid, do reach the upstream
    // (so the refusals below are veer's, not a broken test client's).
    let valid: Vec<(&str, Vec<u8>, bool)> = vec![(
        "a valid h2 POST",
        [
            frame(HEADERS, END_HEADERS, 1, &with(&[("content-length", "2")])),
            frame(DATA, END_STREAM, 1, b"ok"),
        ]
        .concat(),
        false,
    )];
    for (i, (name, frames, never_upstream)) in valid.into_iter().chain(cases).enumerate() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(h2::SETTINGS, 0, 0, &[]));
        bytes.extend(frames);
        let (before, after) = upstream_requests_around(&s, &veer, &bytes).await;
        if i == 0 {
            assert_eq!(
                after - before,
                1,
                "{name}: the control request did not arrive"
            );
        } else if never_upstream {
            assert_eq!(after, before, "{name}: the upstream got a request");
        } else {
            assert!(
                after - before <= 1,
                "{name}: the upstream got {} requests",
                after - before
            );
        }
        assert_ne!(*s.last_uri.lock().unwrap(), "/smuggled", "{name}: smuggled");
        let r = get(veer.addr, "/after", &[]).await.unwrap();
        assert_eq!(r.status(), 200, "{name}: veer stopped serving");
    }
}

/// What veer logs when its admin port is full.
const ADMIN_FULL: &str = "admin port full: probes and scrapes may fail meanwhile";

/// Why veer said its admin port was full (empty if it did not within
/// 10 s).
async fn admin_full_why(veer: &Veer) -> String {
    let said = veer.logs_with_at_least(ADMIN_FULL, 1).await;
    said.first()
        .map(|l| l["why"].to_string())
        .unwrap_or_default()
}

/// `GET /healthz` on the admin port from `from`; the answer's status line
/// (empty if the connection was closed first).
async fn healthz_from(admin: std::net::SocketAddr, from: std::net::IpAddr) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::new(from, 0)).unwrap();
    let mut c = socket.connect(admin).await.unwrap();
    let _ = c
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_the_admin_port() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    // Sixteen connections from one address that send nothing (each may
    // wait up to 10 s for its head).
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(TcpStream::connect(veer.admin).await.unwrap());
    }
    // A seventeenth is closed as it is accepted, long before a head's 10 s.
    let mut extra = TcpStream::connect(veer.admin).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
        .await
        .expect("a 17th connection from one address was kept");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let why = admin_full_why(&veer).await;
    assert!(why.contains("16 connections from one address"), "{why}");
    // Probes and Prometheus come from other addresses: served.
    let other = "127.0.0.2".parse().unwrap();
    assert_eq!(healthz_from(veer.admin, other).await, "HTTP/1.1 200 OK");
    // So is client traffic.
    let r = get(veer.addr, "/", &[]).await.unwrap();
    assert_eq!(r.status(), 200);
    // Once the address's connections close, it is served again.
    drop(held);
    let start = Instant::now();
    loop {
        if healthz_from(veer.admin, local).await == "HTTP/1.1 200 OK" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the address was not served again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Counted (at least the 17th).
    let m = veer.metrics().await;
    let refused = metric(&m, r#"veer_admin_refused_total{why="per_address"}"#);
    assert!(refused >= Some(1.0), "{refused:?}");
    assert_eq!(
        metric(&m, r#"veer_admin_refused_total{why="all"}"#),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_holds_at_most_128_connections() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    // 128 connections, 16 from each of eight addresses, that send nothing
    // (each is closed 10 s after it was accepted: the rest of the test
    // takes a fraction of that).
    let mut held = Vec::new();
    for a in 2..10 {
        let from: std::net::IpAddr = format!("127.0.0.{a}").parse().unwrap();
        for _ in 0..16 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(std::net::SocketAddr::new(from, 0)).unwrap();
            held.push(socket.connect(veer.admin).await.unwrap());
        }
    }
    // The 129th waits in the backlog, unanswered: veer does not accept it.
    let admin = veer.admin;
    let waiting =
        tokio::spawn(async move { healthz_from(admin, "127.0.0.10".parse().unwrap()).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a 129th connection was served");
    let why = admin_full_why(&veer).await;
    assert!(why.contains("128 connections open"), "{why}");
    // Client traffic goes on meanwhile.
    let r = get(veer.addr, "/", &[]).await.unwrap();
    assert_eq!(r.status(), 200);
    // One closes: the waiting one is accepted and answered.
    drop(held.pop());
    let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting connection was not served once one closed")
        .unwrap();
    assert_eq!(answer, "HTTP/1.1 200 OK");
    let m = veer.metrics().await;
    let full = metric(&m, r#"veer_admin_refused_total{why="all"}"#);
    assert!(full >= Some(1.0), "{full:?}");
}

/// The frames of an HTTP/2 byte stream, as (type, stream, payload).
pub(super) fn frames_of(bytes: &[u8]) -> Vec<(u8, u32, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() >= at + 9 {
        let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
        let stream =
            u32::from_be_bytes([bytes[at + 5], bytes[at + 6], bytes[at + 7], bytes[at + 8]])
                & 0x7fff_ffff;
        let Some(payload) = bytes.get(at + 9..at + 9 + len) else {
            break;
        };
        out.push((bytes[at + 3], stream, payload));
        at += 9 + len;
    }
    out
}

/// Sends `flood` after an HTTP/2 preface and SETTINGS on one connection
/// to veer; the code of the GOAWAY veer sent, if any, once it closed the
/// connection (panics if it did not within 20 s).
async fn h2_flood_goaway(veer: &Veer, flood: &[u8]) -> Option<u32> {
    use h2::GOAWAY;
    let c = TcpStream::connect(veer.addr).await.unwrap();
    let (mut r, mut w) = c.into_split();
    // Everything veer writes, until it closes (or 20 s).
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut got))
            .await
            .is_ok();
        (got, closed)
    });
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(h2::SETTINGS, 0, 0, &[]));
    bytes.extend_from_slice(flood);
    // veer may close before taking it all.
    let _ = w.write_all(&bytes).await;
    let (got, closed) = reader.await.unwrap();
    assert!(closed, "veer kept the flooding connection open");
    frames_of(&got)
        .into_iter()
        .find(|(kind, stream, _)| *kind == GOAWAY && *stream == 0)
        .map(|(_, _, p)| u32::from_be_bytes([p[4], p[5], p[6], p[7]]))
}

/// The header block of an HTTP/2 `GET path` (HPACK, literal fields).
pub(super) fn h2_get_block(path: &str) -> Vec<u8> {
    hpack(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "a"),
    ])
}

/// HTTP/2 GOAWAY's ENHANCE_YOUR_CALM.
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// HTTP/2 "rapid reset" (CVE-2023-44487): a client that opens streams
/// and resets each at once is not bounded by the 128 streams a
/// connection may have open; veer (the h2 crate's limit on streams reset
/// before they are taken up) ends its connection with GOAWAY
/// ENHANCE_YOUR_CALM, and its requests barely reach the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_rapid_reset_flood_ends_its_connection() {
    use h2::{END_HEADERS, END_STREAM, HEADERS, RST_STREAM};
    const PAIRS: u32 = 5_000;
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    let block = h2_get_block("/");
    let mut flood = Vec::new();
    for i in 0..PAIRS {
        let id = 1 + 2 * i;
        flood.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
        flood.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes())); // CANCEL
    }
    assert_eq!(
        h2_flood_goaway(&veer, &flood).await,
        Some(ENHANCE_YOUR_CALM),
        "no GOAWAY ENHANCE_YOUR_CALM"
    );
    let reached = s.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        reached < u64::from(PAIRS) / 10,
        "{reached} of {PAIRS} reset requests reached the upstream"
    );
    // Others are served as before.
    let r = get(veer.addr, "/after", &[]).await.unwrap();
    assert_eq!(r.status(), 200);
}

/// HTTP/2 "CONTINUATION flood" (CVE-2024-27316 and its kin): a header
/// block that never ends, in CONTINUATION frames that each look small.
/// veer ends the connection once the block passes `max_header_bytes`
/// (the h2 crate's count of its frames), without a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_continuation_flood_ends_its_connection() {
    use h2::{CONTINUATION, HEADERS};
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    let block = h2_get_block("/");
    // HEADERS without END_HEADERS, then 20 000 CONTINUATION frames of one
    // 100-byte field each (2 MB of header block), none ending it.
    let field = hpack(&[("x-flood", &"f".repeat(90))]);
    let mut flood = frame(HEADERS, 0, 1, &block);
    for _ in 0..20_000 {
        flood.extend(frame(CONTINUATION, 0, 1, &field));
    }
    assert_eq!(
        h2_flood_goaway(&veer, &flood).await,
        Some(ENHANCE_YOUR_CALM),
        "no GOAWAY ENHANCE_YOUR_CALM"
    );
    assert_eq!(s.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    let r = get(veer.addr, "/after", &[]).await.unwrap();
    assert_eq!(r.status(), 200);
}

/// How a test client stalls its upload after the first byte of its body.
#[derive(Clone, Copy, Debug)]
enum Stall {
    /// HTTP/1.1, `content-length: 8`.
    Length,
    /// HTTP/2, `content-length: 8`.
    H2Length,
    /// HTTP/1.1, chunked.
    Chunked,
}

/// Sends a `POST` that stalls its body after one byte; the answer's status
/// (0 if none came within 30 s).
async fn stalled_upload(addr: std::net::SocketAddr, how: Stall) -> u16 {
    let head: &[u8] = match how {
        Stall::Length => b"POST /up HTTP/1.1\r\nhost: a\r\ncontent-length: 8\r\n\r\nd",
        Stall::Chunked => {
            b"POST /up HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n1\r\nd\r\n"
        }
        Stall::H2Length => {
            use futures_util::StreamExt;
            let first = http_body::Frame::data(bytes::Bytes::from_static(b"d"));
            let body = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(first)])
                .chain(futures_util::stream::pending());
            let mut h2 = super::support::h2c(addr).await;
            let req = http::Request::post(format!("http://{addr}/up"))
                .header("content-length", "8")
                .body(http_body_util::StreamBody::new(body))
                .unwrap();
            let answer = tokio::time::timeout(Duration::from_secs(30), h2.send_request(req)).await;
            return answer.map_or(0, |r| r.map_or(0, |r| r.status().as_u16()));
        }
    };
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(head).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(30), c.read(&mut buf))
        .await
        .map_or(0, |r| r.unwrap_or(0));
    String::from_utf8_lossy(&buf[..n])
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .unwrap_or(0)
}

/// Stalls an upload of each kind given, and meanwhile sends GETs (one
/// every 50 ms) until all are answered: the stalled uploads' statuses,
/// sorted, and the GETs'.
async fn gets_beside_stalls(addr: std::net::SocketAddr, stalls: &[Stall]) -> (Vec<u16>, Vec<u16>) {
    let stalls: Vec<_> = stalls
        .iter()
        .map(|&how| tokio::spawn(stalled_upload(addr, how)))
        .collect();
    let mut codes = Vec::new();
    while !stalls.iter().all(|t| t.is_finished()) {
        let code = get(addr, "/", &[]).await.map_or(0, |r| r.status().as_u16());
        codes.push(code);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut stalled = Vec::new();
    for t in stalls {
        stalled.push(t.await.unwrap());
    }
    stalled.sort_unstable();
    (stalled, codes)
}

/// Slow-drip uploads: a request body announced no longer than `[proxy]
/// request_buffer` is read whole before the request takes an upstream
/// connection. Clients that send a byte of theirs and stall (on HTTP/1.1
/// and HTTP/2) hold none of an endpoint's two connections: requests
/// beside them are all served until the stalled ones end (408, the
/// clients' fault), and none of them reaches the upstream. One dripped to
/// its end reaches it whole. With `request_buffer = 0` (reloaded) the same
/// bodies stream as they come: one of them takes the endpoint's one
/// upload slot (half its connections) and reaches the upstream, the
/// others find none (503), and the requests beside are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_uploads_sent_slowly_hold_no_upstream_connection() {
    use std::sync::atomic::Ordering::SeqCst;
    use Stall::*;
    let s = Upstream::start("stable").await;
    let base = route_config(
        &[s.addr],
        &[],
        0.0,
        "max_upstream_connections = 2\nconnect_timeout = \"500ms\"",
    );
    let config = |buffer: &str| {
        with_proxy(
            base.clone(),
            &format!("body_timeout = \"2s\"\nrequest_buffer = {buffer}"),
        )
    };
    let veer = Veer::start(&config("16384")).await;
    let stalls = [Length, H2Length, Length, H2Length];

    let (stalled, codes) = gets_beside_stalls(veer.addr, &stalls).await;
    assert_eq!(stalled, [408; 4], "the stalled uploads' answers");
    assert!(codes.len() >= 5, "too few requests beside: {codes:?}");
    assert!(
        codes.iter().all(|&c| c == 200),
        "beside the stalls: {codes:?}"
    );
    assert_eq!(
        s.requests.load(SeqCst),
        codes.len() as u64,
        "a stalled upload reached the upstream"
    );
    let m = veer.metrics().await;
    assert_eq!(
        metric(&m, "veer_proxy_errors_total{kind=\"client_timeout\"}"),
        Some(4.0)
    );
    assert_eq!(metric(&m, "veer_request_buffer_full_total"), Some(0.0));

    // Dripped to its end, a body arrives whole.
    let mut c = TcpStream::connect(veer.addr).await.unwrap();
    c.write_all(b"POST /up HTTP/1.1\r\nhost: a\r\ncontent-length: 8\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    for b in b"dripping" {
        c.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\ndripping"), "{answer}");

    // Streamed as they come: one upload slot of the two connections.
    veer.write_config(&config("0"));
    veer.wait_generation(2).await;
    let before = s.requests.load(SeqCst);
    let (stalled, codes) = gets_beside_stalls(veer.addr, &stalls).await;
    assert_eq!(
        stalled,
        [408, 503, 503, 503],
        "the streamed stalls' answers"
    );
    assert!(
        codes.iter().all(|&c| c == 200),
        "beside the streamed stalls: {codes:?}"
    );
    assert_eq!(s.requests.load(SeqCst), before + codes.len() as u64 + 1);
}

/// Uploads that stream (here chunked, which is never read whole) hold at
/// most half an endpoint's connections: four clients stall theirs on an
/// endpoint of four connections; two hold the two upload slots until
/// `body_timeout` (408), the other two find none within `connect_timeout`
/// (503 `overloaded`, not the version's fault), and the requests beside
/// them are all served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_uploads_hold_at_most_half_an_endpoints_connections() {
    use std::sync::atomic::Ordering::SeqCst;
    let s = Upstream::start("stable").await;
    let config = with_proxy(
        route_config(
            &[s.addr],
            &[],
            0.0,
            "max_upstream_connections = 4\nconnect_timeout = \"500ms\"",
        ),
        "body_timeout = \"2s\"",
    );
    let veer = Veer::start(&config).await;
    let (stalled, codes) = gets_beside_stalls(veer.addr, &[Stall::Chunked; 4]).await;
    assert_eq!(
        stalled,
        [408, 408, 503, 503],
        "the stalled uploads' answers"
    );
    assert!(codes.len() >= 5, "too few requests beside: {codes:?}");
    assert!(
        codes.iter().all(|&c| c == 200),
        "beside the stalls: {codes:?}"
    );
    assert_eq!(s.requests.load(SeqCst), codes.len() as u64 + 2);
    let m = veer.metrics().await;
    assert_eq!(
        metric(&m, "veer_proxy_errors_total{kind=\"overloaded\"}"),
        Some(2.0)
    );
    let v1_errors = r#"veer_upstream_errors_total{kind="timeout",route="web",version="v1"}"#;
    assert_eq!(metric(&m, v1_errors).unwrap_or(0.0), 0.0, "{m}");
}

/// The bytes held for bodies read whole are bounded (64 MiB over the
/// process, counted as they come): 65 clients each send all but the last
/// byte of a 1 MiB body (`request_buffer` at its largest). The bodies
/// read whole take the budget; those it had no room for go upstream
/// with the part read and stream the rest, counted; the last bytes sent,
/// every body reaches the upstream whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_read_whole_hold_at_most_64_mib_at_once() {
    use std::sync::atomic::Ordering::SeqCst;
    const MIB: usize = 1 << 20;
    let s = Upstream::start("stable").await;
    let config = with_proxy(
        route_config(&[s.addr], &[], 0.0, ""),
        "body_timeout = \"60s\"\nrequest_buffer = 1048576",
    );
    let veer = Veer::start(&config).await;
    let head = format!(
        "POST /up HTTP/1.1\r\nhost: a\r\ncontent-length: {MIB}\r\nconnection: close\r\n\r\n"
    );
    let mut clients = Vec::new();
    for _ in 0..65 {
        let mut c = TcpStream::connect(veer.addr).await.unwrap();
        c.write_all(head.as_bytes()).await.unwrap();
        c.write_all(&vec![b'x'; MIB - 1]).await.unwrap();
        clients.push(c);
    }
    // 65 MiB less 65 bytes were sent: at least one body found the budget
    // spent, and only those reached the upstream.
    super::support::wait_metric(
        &veer,
        "veer_request_buffer_full_total",
        "a body over the budget",
        |v| v >= 1.0,
    )
    .await;
    let m = veer.metrics().await;
    let streamed = metric(&m, "veer_request_buffer_full_total").unwrap_or(0.0);
    assert!(streamed < 65.0, "{streamed} of 65 streamed");
    super::support::wait_until(
        "the streamed requests reached the upstream",
        Duration::from_secs(30),
        || s.requests.load(SeqCst),
        |&n| n as f64 >= streamed,
    )
    .await;
    assert_eq!(s.requests.load(SeqCst) as f64, streamed);
    let mut answers = Vec::new();
    for mut c in clients {
        answers.push(tokio::spawn(async move {
            c.write_all(b"y").await.unwrap();
            let mut answer = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut answer));
            read.await.unwrap().unwrap();
            answer
        }));
    }
    for a in answers {
        let answer = a.await.unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&answer[..64.min(answer.len())])
        );
        let body = &answer[answer.len() - MIB..];
        assert!(body[..MIB - 1].iter().all(|&b| b == b'x') && body[MIB - 1] == b'y');
    }
    assert_eq!(s.requests.load(SeqCst), 65);
    assert_eq!(s.body_bytes.load(SeqCst), 65 * MIB as u64);
}
