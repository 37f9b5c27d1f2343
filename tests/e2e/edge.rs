//! The edge against hostile clients: connections that send nothing, half a
//! preface or half a head, or sit idle, are closed and give their slot
//! back; one address cannot take every slot.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::hostile::send;
use super::support::{get, metric, route_config, Upstream, Veer};

/// A plain keep-alive GET.
const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";

/// `route_config` with `[proxy]` settings added.
pub(super) fn with_proxy(base: String, proxy: &str) -> String {
    base.replace(
        "shutdown_grace = \"10s\"",
        &format!("shutdown_grace = \"10s\"\n{proxy}"),
    )
}

/// Reads the start of an answer on `c` (at most 20 s): 200.
async fn assert_answers_200<S: tokio::io::AsyncRead + Unpin>(c: &mut S) {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), c.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}

/// Waits (at most 20 s) for the peer to close `s`; true if it did.
async fn closed_by_veer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // a response or a GOAWAY frame; keep reading
            Err(_) => return false,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_half_preface_and_half_head_connections_are_closed_after_header_timeout() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&with_proxy(
        route_config(&[s.addr], &[], 0.0, ""),
        "header_timeout = \"1s\"\nidle_timeout = \"60s\"",
    ))
    .await;
    let sends: [&[u8]; 3] = [
        b"",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nx-slow: ",
    ];
    for bytes in sends {
        let mut c = TcpStream::connect(veer.addr).await.unwrap();
        c.write_all(bytes).await.unwrap();
        assert!(
            closed_by_veer(&mut c).await,
            "a connection that sent {:?} stayed open",
            String::from_utf8_lossy(bytes)
        );
    }
    let m = veer.metrics().await;
    assert_eq!(metric(&m, HEADER_TIMEOUTS), Some(3.0), "{m}");
}

/// Connections closed for a head (or TLS handshake) not complete in time.
const HEADER_TIMEOUTS: &str = r#"veer_proxy_errors_total{kind="header_timeout"}"#;

/// A keep-alive connection's later request heads get `header_timeout`
/// too, from their first byte; a connection that sends nothing between
/// requests gets `idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_head_must_complete_within_header_timeout_an_idle_connection_gets_idle_timeout() {
    let (_s, veer) = veer_with("header_timeout = \"1s\"\nidle_timeout = \"60s\"").await;
    // Half a second head after a first request.
    let (mut c, code) = send(veer.addr, GET).await;
    assert_eq!(code, 200);
    c.write_all(b"GET / HTTP/1.1\r\nhost: a\r\nx-slow: ")
        .await
        .unwrap();
    let start = Instant::now();
    assert!(
        closed_by_veer(&mut c).await,
        "half a later head stayed open"
    );
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "closed after {:?}, not after header_timeout",
        start.elapsed()
    );
    let m = veer.metrics().await;
    assert_eq!(metric(&m, HEADER_TIMEOUTS), Some(1.0), "{m}");
    // Nothing at all after a first request, for twice header_timeout: the
    // connection is idle, not slow, and serves the next request.
    let (mut c, code) = send(veer.addr, GET).await;
    assert_eq!(code, 200);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    c.write_all(GET).await.unwrap();
    assert_answers_200(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_that_never_handshakes_is_closed() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start_tls(&with_proxy(
        route_config(&[s.addr], &[], 0.0, ""),
        "header_timeout = \"1s\"",
    ))
    .await;
    let mut c = TcpStream::connect(veer.tls_addr.unwrap()).await.unwrap();
    // Half a ClientHello record header, then nothing.
    c.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    assert!(closed_by_veer(&mut c).await);
    let m = veer.metrics().await;
    assert_eq!(metric(&m, HEADER_TIMEOUTS), Some(1.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&with_proxy(
        route_config(&[s.addr], &[], 0.0, ""),
        "idle_timeout = \"1s\"",
    ))
    .await;
    let (mut c, code) = send(veer.addr, GET).await;
    assert_eq!(code, 200);
    assert!(closed_by_veer(&mut c).await, "idle keep-alive stayed open");
    // Idle is not slow: no header timeout counted.
    let m = veer.metrics().await;
    assert_eq!(metric(&m, HEADER_TIMEOUTS), Some(0.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_give_their_slot_back() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&with_proxy(
        route_config(&[s.addr], &[], 0.0, ""),
        "max_connections = 4\nheader_timeout = \"1s\"",
    ))
    .await;
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(veer.addr).await.unwrap());
    }
    // Every slot is held by a silent client; a real request gets one once
    // they are closed.
    let r = tokio::time::timeout(Duration::from_secs(20), get(veer.addr, "/", &[]))
        .await
        .expect("served within 20 s")
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_at_most_max_connections_per_ip() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&with_proxy(
        route_config(&[s.addr], &[], 0.0, ""),
        "max_connections_per_ip = 2",
    ))
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (c, code) = send(veer.addr, GET).await;
        assert_eq!(code, 200);
        held.push(c);
    }
    let mut third = TcpStream::connect(veer.addr).await.unwrap();
    let _ = third.write_all(GET).await;
    assert!(
        closed_by_veer(&mut third).await,
        "a third connection was served"
    );
    let m = veer.metrics().await;
    assert!(
        metric(
            &m,
            r#"veer_proxy_errors_total{kind="too_many_connections"}"#
        ) >= Some(1.0),
        "{m}"
    );
    // Its place comes back when one closes.
    drop(held.pop());
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if send(veer.addr, GET).await.1 == 200 {
            break;
        }
        assert!(Instant::now() < until, "the freed place never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The connection limits apply on reload to the connections accepted from
/// then on, without a restart: those open keep being served; a lowered
/// `max_connections` takes no new connection until fewer are open (none is
/// closed for it); a shorter `header_timeout` closes a silent new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_apply_on_reload_to_new_connections() {
    let s = Upstream::start("stable").await;
    let base = route_config(&[s.addr], &[], 0.0, "");
    let proxy = |more: &str| with_proxy(base.clone(), &format!("header_timeout = \"60s\"\n{more}"));
    let veer = Veer::start(&proxy("max_connections_per_ip = 2")).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (c, code) = send(veer.addr, GET).await;
        assert_eq!(code, 200);
        held.push(c);
    }
    // Raised: a third from the same address is served.
    veer.write_config(&proxy("max_connections_per_ip = 4"));
    veer.wait_generation(2).await;
    let (c, code) = send(veer.addr, GET).await;
    assert_eq!(code, 200);
    held.push(c);
    // Lowered below the three open: they are served on; a new one is not.
    veer.write_config(&proxy("max_connections_per_ip = 1"));
    veer.wait_generation(3).await;
    for c in &mut held {
        c.write_all(GET).await.unwrap();
        assert_answers_200(c).await;
    }
    let mut refused = TcpStream::connect(veer.addr).await.unwrap();
    let _ = refused.write_all(GET).await;
    assert!(
        closed_by_veer(&mut refused).await,
        "served over the lowered cap"
    );

    // max_connections lowered below the three open: a new connection
    // waits (none of the three is closed for it) until fewer than two are
    // open.
    veer.write_config(&proxy("max_connections = 2"));
    veer.wait_generation(4).await;
    let mut waiting = TcpStream::connect(veer.addr).await.unwrap();
    waiting.write_all(GET).await.unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut buf)).await;
    assert!(early.is_err(), "answered over max_connections: {early:?}");
    for c in &mut held {
        c.write_all(GET).await.unwrap();
        assert_answers_200(c).await;
    }
    held.truncate(1);
    assert_answers_200(&mut waiting).await;
    // Raised again: more at once.
    veer.write_config(&proxy("max_connections = 10"));
    veer.wait_generation(5).await;
    for _ in 0..3 {
        let (c, code) = send(veer.addr, GET).await;
        assert_eq!(code, 200);
        held.push(c);
    }

    // header_timeout from 60 s to 1 s: a new silent connection is closed.
    veer.write_config(&with_proxy(
        base.clone(),
        "header_timeout = \"1s\"\nmax_connections = 10",
    ));
    veer.wait_generation(6).await;
    let mut silent = TcpStream::connect(veer.addr).await.unwrap();
    assert!(
        closed_by_veer(&mut silent).await,
        "a silent connection stayed open"
    );
    let st = veer.status().await;
    assert_eq!(
        st["config"]["restart_required"],
        serde_json::json!([]),
        "{st}"
    );
}

/// An upstream and a veer routing to it, with `proxy` settings.
async fn veer_with(proxy: &str) -> (std::sync::Arc<Upstream>, Veer) {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&with_proxy(route_config(&[s.addr], &[], 0.0, ""), proxy)).await;
    (s, veer)
}

/// A GET on an HTTP/2 connection, answered 200, its body read.
async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    addr: std::net::SocketAddr,
) {
    use http_body_util::{BodyExt, Full};
    let req = http::Request::get(format!("http://{addr}/"))
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_connection_is_closed_after_idle_timeout() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let (_s, veer) = veer_with("idle_timeout = \"1s\"").await;
    let stream = TcpStream::connect(veer.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    h2_get(&mut sender, veer.addr).await;
    // No open stream from here on: veer sends GOAWAY and closes.
    let ended = tokio::time::timeout(Duration::from_secs(20), conn).await;
    assert!(ended.is_ok(), "the idle h2 connection stayed open");
}

/// An HTTP/2 connection's frames between requests (settings, pings,
/// window updates) are not a request head: a connection idle for longer
/// than `header_timeout`, pinging all the while, serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_connection_idle_past_header_timeout_serves_the_next_request() {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let (_s, veer) = veer_with("header_timeout = \"1s\"\nidle_timeout = \"60s\"").await;
    let stream = TcpStream::connect(veer.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(300))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    h2_get(&mut sender, veer.addr).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    h2_get(&mut sender, veer.addr).await;
}

/// `n` GETs of `/` sent at once, each on its own connection; their
/// statuses when awaited.
fn gets_at_once(
    addr: std::net::SocketAddr,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Result<u16, Box<dyn std::error::Error + Send + Sync>>>> {
    (0..n)
        .map(|_| {
            tokio::spawn(async move { get(addr, "/", &[]).await.map(|r| r.status().as_u16()) })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_capped_and_the_excess_gets_503_overloaded() {
    let s = Upstream::start("stable").await;
    // Long enough that, however slowly a busy machine starts the 24
    // clients, at most a few can be served before the others' wait ends.
    s.delay_ms.store(2_000, std::sync::atomic::Ordering::SeqCst);
    let veer = Veer::start(&route_config(
        &[s.addr],
        &[],
        0.0,
        "max_upstream_connections = 2\nconnect_timeout = \"500ms\"",
    ))
    .await;
    let tasks = gets_at_once(veer.addr, 24);
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap().unwrap());
    }
    let ok = codes.iter().filter(|c| **c == 200).count();
    let overloaded = codes.iter().filter(|c| **c == 503).count();
    assert_eq!(ok + overloaded, 24, "{codes:?}");
    assert!(ok >= 2, "{codes:?}");
    assert!(overloaded >= 1, "{codes:?}");
    assert!(
        s.connections.load(std::sync::atomic::Ordering::SeqCst) <= 2,
        "{} upstream connections",
        s.connections.load(std::sync::atomic::Ordering::SeqCst)
    );
    let m = veer.metrics().await;
    assert_eq!(
        metric(&m, r#"veer_proxy_errors_total{kind="overloaded"}"#),
        Some(overloaded as f64)
    );
    // Not the version's failure.
    assert!(!m.contains(r#"veer_upstream_errors_total{kind="connect",route="web",version="v1"} 1"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_an_endpoints_busy_idle_and_waiting_connections_against_its_cap() {
    let s = Upstream::start("stable").await;
    s.delay_ms.store(3_000, std::sync::atomic::Ordering::SeqCst);
    let veer = Veer::start(&route_config(
        &[s.addr],
        &[],
        0.0,
        "max_upstream_connections = 2\nconnect_timeout = \"10s\"",
    ))
    .await;
    let series = |name: &str, state: Option<&str>| {
        let state = state.map_or(String::new(), |s| format!(",state=\"{s}\""));
        format!(
            "{name}{{endpoint=\"{}\",route=\"web\"{state},version=\"v1\"}}",
            s.addr
        )
    };
    // No connection yet: no series (idle routes add nothing to a scrape).
    assert!(!veer.metrics().await.contains("veer_upstream_connections{"));
    // Three requests: two on the cap's two connections, one waiting.
    let tasks = gets_at_once(veer.addr, 3);
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let m = veer.metrics().await;
        let busy = metric(&m, &series("veer_upstream_connections", Some("busy")));
        let waiting = metric(&m, &series("veer_upstream_waiting", None));
        if busy == Some(2.0) && waiting == Some(1.0) {
            assert_eq!(
                metric(&m, &series("veer_upstream_connection_limit", None)),
                Some(2.0)
            );
            assert_eq!(
                metric(&m, &series("veer_upstream_connections", Some("idle"))),
                Some(0.0)
            );
            break;
        }
        assert!(
            Instant::now() < until,
            "busy {busy:?}, waiting {waiting:?}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
    // All answered: two connections kept idle, nothing busy or waiting
    // (once veer has put them back, just after the answers' ends).
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let m = veer.metrics().await;
        let now = [
            metric(&m, &series("veer_upstream_connections", Some("idle"))),
            metric(&m, &series("veer_upstream_connections", Some("busy"))),
            metric(&m, &series("veer_upstream_waiting", None)),
        ];
        if now == [Some(2.0), Some(0.0), Some(0.0)] {
            break;
        }
        assert!(Instant::now() < until, "idle, busy, waiting {now:?}:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Two uploads whose bodies stream (longer than request_buffer): the
    // cap's one upload slot holds the first, the second waits for it.
    let uploads: Vec<_> = (0..2)
        .map(|_| {
            let addr = veer.addr;
            tokio::spawn(async move {
                let mut c = super::support::Client::connect(addr).await.unwrap();
                let body = bytes::Bytes::from(vec![b'u'; 20_000]);
                c.send(http::Method::POST, "/", &[], body)
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let m = veer.metrics().await;
        let now = [
            metric(&m, &series("veer_upstream_connections", Some("busy"))),
            metric(&m, &series("veer_upstream_waiting", None)),
        ];
        if now == [Some(1.0), Some(1.0)] {
            break;
        }
        assert!(Instant::now() < until, "busy, waiting {now:?}:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for u in uploads {
        assert_eq!(u.await.unwrap().unwrap(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cap_lowered_while_every_connection_is_busy_holds_once_they_finish() {
    let s = Upstream::start("stable").await;
    s.delay_ms.store(1_000, std::sync::atomic::Ordering::SeqCst);
    let config = |cap: usize| {
        route_config(
            &[s.addr],
            &[],
            0.0,
            &format!("max_upstream_connections = {cap}\nconnect_timeout = \"500ms\""),
        )
    };
    let veer = Veer::start(&config(6)).await;
    let open = || s.open.load(std::sync::atomic::Ordering::SeqCst);
    // Six requests on six connections, all busy when the cap drops to 2.
    let busy = gets_at_once(veer.addr, 6);
    let until = Instant::now() + Duration::from_secs(20);
    while open() < 6 {
        assert!(Instant::now() < until, "{} connections open", open());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    veer.write_config(&config(2));
    veer.wait_generation(2).await;
    for t in busy {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
    // Four of the six are closed as they come back, not kept idle.
    let until = Instant::now() + Duration::from_secs(20);
    while open() > 2 {
        assert!(
            Instant::now() < until,
            "{} upstream connections open under a cap of 2",
            open()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // And no more than two are opened again for the next burst: the
    // others wait their turn, then are answered 503 overloaded.
    s.delay_ms.store(3_000, std::sync::atomic::Ordering::SeqCst);
    s.peak_open
        .store(open(), std::sync::atomic::Ordering::SeqCst);
    let mut codes = Vec::new();
    for t in gets_at_once(veer.addr, 8) {
        codes.push(t.await.unwrap().unwrap());
    }
    assert!(codes.iter().all(|c| *c == 200 || *c == 503), "{codes:?}");
    let peak = s.peak_open.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        peak <= 2,
        "{peak} upstream connections at once under a cap of 2: {codes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_tunnels_hold_their_slot_are_counted_and_close_when_idle() {
    use futures_util::{SinkExt, StreamExt};
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&with_proxy(
        route_config(&[s.addr], &[], 0.0, ""),
        "max_connections = 2\nidle_timeout = \"2s\"",
    ))
    .await;
    let mut tunnels = Vec::new();
    for _ in 0..2 {
        let stream = TcpStream::connect(veer.addr).await.unwrap();
        let (mut ws, resp) =
            tokio_tungstenite::client_async(format!("ws://{}/ws", veer.addr), stream)
                .await
                .expect("websocket through veer");
        assert_eq!(resp.status(), 101);
        ws.send("hi".into()).await.unwrap();
        assert_eq!(
            ws.next()
                .await
                .unwrap()
                .unwrap()
                .into_text()
                .unwrap()
                .as_str(),
            "hi"
        );
        tunnels.push(ws);
    }
    // Both slots are the tunnels': they are counted as open connections.
    let m = veer.metrics().await;
    assert_eq!(metric(&m, "veer_open_connections"), Some(2.0), "{m}");
    // Idle tunnels are closed by veer, and their slots come back.
    for mut ws in tunnels {
        let end = tokio::time::timeout(Duration::from_secs(20), ws.next()).await;
        assert!(
            matches!(
                end,
                Ok(None)
                    | Ok(Some(Err(_)))
                    | Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))))
            ),
            "the idle tunnel stayed open: {end:?}"
        );
    }
    let r = tokio::time::timeout(Duration::from_secs(20), get(veer.addr, "/", &[]))
        .await
        .expect("served once the tunnels closed")
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_slot_is_usable_whatever_the_number_of_listeners() {
    let s = Upstream::start("stable").await;
    let config = with_proxy(route_config(&[s.addr], &[], 0.0, ""), "max_connections = 2").replace(
        "listen = [\"127.0.0.1:0\"]",
        "listen = [\"127.0.0.1:0\", \"127.0.0.1:0\"]",
    );
    let veer = Veer::start(&config).await;
    let proxies: Vec<String> = veer
        .logs_with("listening")
        .iter()
        .filter(|l| l["kind"] == "proxy")
        .map(|l| l["addr"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(proxies.len(), 2, "two listeners: {proxies:?}");
    // Both slots on the first listener, kept open: the second listener must
    // not hold one of them while it waits for a connection of its own.
    let mut held = Vec::new();
    for n in 0..2 {
        let mut c = TcpStream::connect(&proxies[0]).await.unwrap();
        c.write_all(GET).await.unwrap();
        let mut buf = [0u8; 1024];
        let got = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!("connection {n} was never served: a slot is held by an idle listener")
            })
            .unwrap();
        assert!(
            buf[..got].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&buf[..got])
        );
        held.push(c);
    }
}

/// Reads from `c` until what came ends with `body` (at most 20 s); returns
/// it all.
async fn read_answer<S: tokio::io::AsyncRead + Unpin>(c: &mut S, body: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let until = Instant::now() + Duration::from_secs(20);
    while !got.ends_with(body.as_bytes()) {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, c.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!(
                "no answer ending in {body:?} ({other:?}); got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Waits (at most 20 s) for `veer_parked_connections` to be `n`.
async fn wait_parked(veer: &Veer, n: f64) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let m = veer.metrics().await;
        if metric(&m, "veer_parked_connections") == Some(n) {
            return;
        }
        assert!(Instant::now() < until, "never {n} parked connections: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An idle keep-alive connection is parked (hyper's connection and its
/// buffers dropped; `veer_parked_connections`) and serves its next request
/// as before: one whose first bytes came with the request before it (read
/// before the connection was parked, and given back), one over TLS; a
/// parked connection its client closes is no longer counted, and one left
/// idle still gets `idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_parked_and_serve_their_next_request() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start_tls(&with_proxy(
        route_config(&[s.addr], &[], 0.0, ""),
        "header_timeout = \"1s\"\nidle_timeout = \"8s\"",
    ))
    .await;
    let mut c = TcpStream::connect(veer.addr).await.unwrap();
    c.write_all(
        b"GET /first HTTP/1.1\r\nhost: a\r\n\r\nPOST /second HTTP/1.1\r\nhost: a\r\ncontent-le",
    )
    .await
    .unwrap();
    let a = read_answer(&mut c, "stable").await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    wait_parked(&veer, 1.0).await;
    c.write_all(b"ngth: 5\r\n\r\nhello").await.unwrap();
    let a = read_answer(&mut c, "hello").await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert_eq!(*s.last_uri.lock().unwrap(), "/second");
    // Taken out of parking for that request, parked again after it: one
    // parked connection, not two. (Not read as 0 between the two: the
    // connection parks again 1 s after its answer, sooner than a scrape
    // comes on a loaded machine.)
    wait_parked(&veer, 1.0).await;

    // Over TLS.
    let mut tls = super::protocols::tls_connect(veer.tls_addr.unwrap(), &[b"http/1.1"]).await;
    for _ in 0..2 {
        tls.write_all(b"GET /tls HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let a = read_answer(&mut tls, "stable").await;
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
        wait_parked(&veer, 2.0).await;
    }
    // The client closes its parked connection.
    drop(tls);
    wait_parked(&veer, 1.0).await;
    // The plain one, left idle, is closed after idle_timeout.
    assert!(
        closed_by_veer(&mut c).await,
        "a parked connection stayed open"
    );
    wait_parked(&veer, 0.0).await;
    let m = veer.metrics().await;
    assert_eq!(metric(&m, "veer_open_connections"), Some(0.0), "{m}");
}

/// Asserts that the metrics `m` count no upstream error for route `web`'s
/// `v1` (what a client did was not the version's failure).
fn no_upstream_errors(m: &str) {
    for kind in ["connect", "protocol", "reset", "timeout"] {
        let name =
            format!(r#"veer_upstream_errors_total{{kind="{kind}",route="web",version="v1"}}"#);
        assert_eq!(metric(m, &name), Some(0.0), "{name}");
    }
}

/// Waits (at most 30 s) for `veer_proxy_errors_total{kind}` to reach `n`.
async fn proxy_errors_reach(veer: &Veer, kind: &str, n: f64) {
    let name = format!("veer_proxy_errors_total{{kind=\"{kind}\"}}");
    super::support::wait_metric(veer, &name, &format!("{n} {kind}"), |v| v >= n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_takes_nothing_of_its_answer_is_closed_after_body_timeout_one_reading_slowly_is_not(
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let s = Upstream::start("stable").await;
    let config = |t: &str| {
        with_proxy(
            route_config(&[s.addr], &[], 0.0, ""),
            &format!("body_timeout = \"{t}\""),
        )
    };
    let veer = Veer::start(&config("60s")).await;
    // A first connection (the listener's timeout set from the config it
    // started with), then `body_timeout` reloaded: later connections get
    // the new one.
    assert_eq!(get(veer.addr, "/", &[]).await.unwrap().status(), 200);
    veer.write_config(&config("2s"));
    veer.wait_generation(2).await;
    // 32 MiB: more than a slow reader takes in the test, and than the
    // sockets' buffers hold.
    let request = b"GET /bytes/33554432 HTTP/1.1\r\nhost: a\r\n\r\n";
    let mut stalled = TcpStream::connect(veer.addr).await.unwrap();
    stalled.write_all(request).await.unwrap();
    let stalled_at = Instant::now();
    // Reads 16 KiB every 50 ms (320 KiB/s) until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (addr, stop) = (veer.addr, stop.clone());
        tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(request).await.unwrap();
            let mut buf = vec![0u8; 16 * 1024];
            let mut read = 0usize;
            while !stop.load(Ordering::SeqCst) {
                match tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await {
                    Ok(Ok(0)) => return Err(format!("closed by veer after {read} bytes")),
                    Ok(Ok(n)) => read += n,
                    Ok(Err(e)) => return Err(format!("{e} after {read} bytes")),
                    Err(_) => return Err(format!("nothing for 10 s after {read} bytes")),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(read)
        })
    };
    proxy_errors_reach(&veer, "send_timeout", 1.0).await;
    let closed_after = stalled_at.elapsed();
    assert!(
        closed_after >= Duration::from_millis(1900),
        "closed {closed_after:?} after its request, before body_timeout"
    );
    // Its upstream connection was given up with it: only the slow
    // reader's is still open.
    super::support::wait_until(
        "only the slow reader's upstream connection open",
        Duration::from_secs(20),
        || s.open.load(Ordering::SeqCst),
        |n| *n == 1,
    )
    .await;
    // The stalled client finds its connection closed once it reads what
    // was already on its way.
    let mut buf = vec![0u8; 64 * 1024];
    let mut ended = false;
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(20), stalled.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                ended = true;
                break;
            }
            Ok(Ok(_)) => continue,
            Err(_) => break,
        }
    }
    assert!(ended, "the stalled client's connection is still open");
    // The slow reader has read for at least three times body_timeout.
    while stalled_at.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let read = reader.await.unwrap().expect("the slow reader was served");
    assert!(read >= 512 * 1024, "the slow reader read only {read} bytes");
    let m = veer.metrics().await;
    assert_eq!(
        metric(&m, r#"veer_proxy_errors_total{kind="send_timeout"}"#),
        Some(1.0)
    );
    // The client's doing, not the version's.
    no_upstream_errors(&m);
    assert_eq!(
        metric(
            &m,
            r#"veer_requests_total{code="5xx",route="web",version="v1"}"#
        )
        .unwrap_or(0.0),
        0.0
    );
}

/// An HTTP/2 connection to `addr` whose client reads everything veer sends
/// (its connection is alive) and gives its streams `window` bytes of
/// flow-control window (`SETTINGS_INITIAL_WINDOW_SIZE`), and never more:
/// the writing half, preface and settings sent, the reader, and what it
/// has read.
async fn h2_client_with_window(
    addr: std::net::SocketAddr,
    window: u32,
) -> (
    tokio::net::tcp::OwnedWriteHalf,
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    let c = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = c.into_split();
    let read = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = read.clone();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                return;
            }
            kept.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let mut setting = vec![0, 4]; // SETTINGS_INITIAL_WINDOW_SIZE
    setting.extend(window.to_be_bytes());
    bytes.extend(super::hostile::frame(
        super::hostile::h2::SETTINGS,
        0,
        0,
        &setting,
    ));
    w.write_all(&bytes).await.unwrap();
    (w, reader, read)
}

/// An HTTP/2 client that keeps its connection alive but never opens its
/// streams' flow-control windows: each answer's upstream connection is
/// given up after `body_timeout` (it was held for ever: 128 streams a
/// connection, a few connections took an endpoint's whole
/// `max_upstream_connections`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_answers_whose_window_stays_shut_are_given_up_after_body_timeout() {
    use super::hostile::h2::{END_HEADERS, END_STREAM, HEADERS};
    use std::sync::atomic::Ordering;
    const STREAMS: u32 = 10;
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&with_proxy(
        route_config(&[s.addr], &[], 0.0, ""),
        "body_timeout = \"2s\"",
    ))
    .await;
    let block = super::hostile::h2_get_block("/bytes/1000000");
    // No stream may get data.
    let (mut w, reader, _) = h2_client_with_window(veer.addr, 0).await;
    let mut bytes = Vec::new();
    for i in 0..STREAMS {
        bytes.extend(super::hostile::frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1 + 2 * i,
            &block,
        ));
    }
    let sent = Instant::now();
    w.write_all(&bytes).await.unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while s.requests.load(Ordering::SeqCst) < u64::from(STREAMS) {
        assert!(
            Instant::now() < until,
            "the requests did not reach the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy_errors_reach(&veer, "send_timeout", f64::from(STREAMS)).await;
    let given_up_after = sent.elapsed();
    assert!(
        given_up_after >= Duration::from_millis(1900),
        "given up {given_up_after:?} after the requests, before body_timeout"
    );
    // Their upstream connections are closed.
    super::support::wait_until(
        "every upstream connection closed",
        Duration::from_secs(20),
        || s.open.load(Ordering::SeqCst),
        |n| *n == 0,
    )
    .await;
    let m = veer.metrics().await;
    no_upstream_errors(&m);
    // HTTP/2 is served as before.
    drop(w);
    reader.abort();
    let mut h2 = super::support::h2c::<http_body_util::Full<bytes::Bytes>>(veer.addr).await;
    let resp = h2
        .send_request(
            http::Request::get(format!("http://{}/", veer.addr))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// As above, with the connection's window spent instead: the client opens
/// its streams' windows wide but never the connection's, and one stream's
/// answer takes the connection's whole window while another's upstream
/// has sent its head and not yet its body. Both answers are given up
/// after `body_timeout`: the waiting one was asked for its body with a
/// byte of window already reserved for it, and so handed it over and
/// waited for the client as the other did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_answers_starved_of_the_connections_window_are_given_up_after_body_timeout() {
    use super::hostile::h2::{END_HEADERS, END_STREAM, HEADERS};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    // An upstream that answers `/late` with its head at once and its body
    // 1.5 s later, and `/big` with 1 MB at once.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let open = Arc::new(AtomicU64::new(0));
    let counted = open.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let open = counted.clone();
            open.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if super::support::read_head(&mut c).await {
                    // `read_head` keeps no head: the two paths differ in
                    // length, and `/late` is the one asked first.
                    let _ = answer(&mut c).await;
                }
                // Held until veer closes it.
                let mut buf = [0u8; 1024];
                while matches!(c.read(&mut buf).await, Ok(n) if n > 0) {}
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    static ASKED: AtomicU64 = AtomicU64::new(0);
    async fn answer(c: &mut TcpStream) -> std::io::Result<()> {
        if ASKED.fetch_add(1, Ordering::SeqCst) == 0 {
            c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n")
                .await?;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            c.write_all(&[b'l'; 100_000]).await
        } else {
            c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
                .await?;
            c.write_all(&[b'b'; 1_000_000]).await
        }
    }
    let veer = Veer::start(&with_proxy(
        route_config(&[up], &[], 0.0, ""),
        "body_timeout = \"2s\"",
    ))
    .await;
    let get = super::hostile::h2_get_block;
    // Streams' windows wide open; the connection's stays at its first
    // 65 535 bytes.
    let (mut w, reader, read) = h2_client_with_window(veer.addr, 16 << 20).await;
    let late = super::hostile::frame(HEADERS, END_HEADERS | END_STREAM, 1, &get("/late"));
    w.write_all(&late).await.unwrap();
    // The late answer's head is through to the client before the big one
    // is asked.
    super::support::wait_until(
        "the late answer's head at the client",
        Duration::from_secs(20),
        || {
            let read = read.lock().unwrap();
            super::hostile::frames_of(&read)
                .iter()
                .any(|&(kind, stream, _)| kind == HEADERS && stream == 1)
        },
        |headed| *headed,
    )
    .await;
    w.write_all(&super::hostile::frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &get("/big"),
    ))
    .await
    .unwrap();
    proxy_errors_reach(&veer, "send_timeout", 2.0).await;
    super::support::wait_until(
        "every upstream connection closed",
        Duration::from_secs(20),
        || open.load(Ordering::SeqCst),
        |n| *n == 0,
    )
    .await;
    drop(w);
    reader.abort();
}

/// A version 2 PROXY header: `client` (or `LOCAL`, a load balancer's own
/// check, when `None`) to veer's `server`; `tls`: the balancer ended the
/// client's TLS (`PP2_TYPE_SSL`, `PP2_CLIENT_SSL`).
fn proxy_v2(client: Option<&str>, server: std::net::SocketAddr, tls: bool) -> Vec<u8> {
    use ppp::v2;
    let (command, client) = match client {
        Some(c) => (
            v2::Command::Proxy,
            c.parse::<std::net::SocketAddr>().unwrap(),
        ),
        None => (v2::Command::Local, server),
    };
    // One family for both (the balancer's side of an IPv6 client is IPv6).
    let server = match client {
        std::net::SocketAddr::V6(_) => "[2001:db8::1]:443".parse().unwrap(),
        std::net::SocketAddr::V4(_) => server,
    };
    let b = v2::Builder::with_addresses(
        v2::Version::Two | command,
        v2::Protocol::Stream,
        (client, server),
    );
    let b = if tls {
        b.write_tlv(v2::Type::SSL, &[0x01, 0, 0, 0, 0]).unwrap()
    } else {
        b
    };
    b.build().unwrap()
}

/// A route `secure` for host `secure.example` with `https_redirect`.
fn redirecting_route(endpoint: std::net::SocketAddr) -> String {
    format!(
        "[[route]]\nname = \"secure\"\nhosts = [\"secure.example\"]\nhttps_redirect = true\n[route.stable]\nversion = \"v1\"\nendpoints = [\"{endpoint}\"]\n"
    )
}

/// With `proxy_protocol_from`, only the balancers listed name the client:
/// a header from another address is read, and the client is whoever
/// connected (its TLS flag is not believed either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_balancers_listed_name_the_client() {
    let s = Upstream::start("stable").await;
    let secure = redirecting_route(s.addr);
    let seen = |name: &str| {
        s.last_headers.lock().unwrap()[name]
            .to_str()
            .unwrap()
            .to_string()
    };
    for (from, believed) in [
        ("[\"10.9.9.9\", \"192.0.2.0/24\"]", false),
        ("[\"127.0.0.0/8\"]", true),
    ] {
        let veer = Veer::start(&with_proxy(
            route_config(&[s.addr], &[], 0.0, "") + &secure,
            &format!("proxy_protocol = true\nproxy_protocol_from = {from}"),
        ))
        .await;
        let mut head = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n".to_vec();
        head.extend_from_slice(GET);
        let (_c, code) = send(veer.addr, &head).await;
        assert_eq!(code, 200, "{from}");
        let want = if believed { "203.0.113.7" } else { "127.0.0.1" };
        assert_eq!(seen("x-real-ip"), want, "{from}");
        assert_eq!(seen("x-forwarded-for"), want, "{from}");
        // The balancer's TLS flag, for a redirecting route.
        let mut head = proxy_v2(Some("198.51.100.5:6001"), veer.addr, true);
        head.extend_from_slice(b"GET / HTTP/1.1\r\nhost: secure.example\r\n\r\n");
        let (_c, code) = send(veer.addr, &head).await;
        assert_eq!(code, if believed { 200 } else { 308 }, "{from}");
        // Still required from everyone: no header, closed unanswered.
        let (_c, code) = send(veer.addr, GET).await;
        assert_eq!(code, 0, "{from}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_protocol_balancer_the_header_names_the_client() {
    let s = Upstream::start("stable").await;
    let secure = redirecting_route(s.addr);
    let base = route_config(&[s.addr], &[], 0.0, "")
        .replace("[proxy]\n", "[proxy]\naccess_log = \"all\"\n")
        + &secure;
    let veer = Veer::start_tls(&with_proxy(
        base,
        "proxy_protocol = true\nmax_connections_per_ip = 1\nheader_timeout = \"2s\"",
    ))
    .await;
    let seen = |name: &str| {
        s.last_headers.lock().unwrap()[name]
            .to_str()
            .unwrap()
            .to_string()
    };
    // Version 1, the header and the request in one write.
    let mut head = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n".to_vec();
    head.extend_from_slice(GET);
    let (held, code) = send(veer.addr, &head).await;
    assert_eq!(code, 200);
    assert_eq!(seen("x-real-ip"), "203.0.113.7");
    assert_eq!(seen("x-forwarded-for"), "203.0.113.7");
    // max_connections_per_ip counts that client, not the balancer: a
    // second connection of 203.0.113.7 is refused while the first is
    // open, another client's is served.
    let (mut second, code) = send(veer.addr, &head).await;
    assert_eq!(code, 0, "refused");
    assert!(closed_by_veer(&mut second).await);
    let mut other = proxy_v2(Some("[2001:db8::9]:4000"), veer.addr, false);
    other.extend_from_slice(GET);
    let (_other, code) = send(veer.addr, &other).await;
    assert_eq!(code, 200);
    assert_eq!(seen("x-real-ip"), "2001:db8::9");
    drop(held);
    // A header that comes in pieces (against the protocol's advice).
    let mut c = TcpStream::connect(veer.addr).await.unwrap();
    let v2 = proxy_v2(Some("198.51.100.4:6000"), veer.addr, false);
    c.write_all(&v2[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.write_all(&v2[10..]).await.unwrap();
    c.write_all(GET).await.unwrap();
    assert_answers_200(&mut c).await;
    assert_eq!(seen("x-real-ip"), "198.51.100.4");
    // The balancer's own check (LOCAL): the connection's address.
    let mut local = proxy_v2(None, veer.addr, false);
    local.extend_from_slice(GET);
    let (_local, code) = send(veer.addr, &local).await;
    assert_eq!(code, 200);
    assert_eq!(seen("x-real-ip"), "127.0.0.1");
    // TLS the balancer ended: the request is https (no redirect, and
    // the upstream is told); without the flag it is plain HTTP.
    let secure = b"GET / HTTP/1.1\r\nhost: secure.example\r\n\r\n";
    // (A client address each: a connection's close reaches veer's count
    // of its address a moment after the client closes it.)
    for (tls, want, client) in [
        (true, 200, "198.51.100.5:6001"),
        (false, 308, "198.51.100.6:6001"),
    ] {
        let mut head = proxy_v2(Some(client), veer.addr, tls);
        head.extend_from_slice(secure);
        let (_c, code) = send(veer.addr, &head).await;
        assert_eq!(code, want, "tls {tls}");
    }
    assert_eq!(seen("x-forwarded-proto"), "https");
    // Over TLS: the header, then the handshake.
    let tls_addr = veer.tls_addr.unwrap();
    let mut tcp = TcpStream::connect(tls_addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 192.0.2.33 10.0.0.1 7000 443\r\n")
        .await
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(
            super::protocols::AcceptAny::default(),
        ))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(GET).await.unwrap();
    assert_answers_200(&mut tls).await;
    assert_eq!(seen("x-real-ip"), "192.0.2.33");
    // A balancer's TCP health check (connect, close, no header): nothing
    // to count.
    drop(TcpStream::connect(veer.addr).await.unwrap());
    // A client that connects directly, with no header: closed unanswered.
    let before = s.requests.load(std::sync::atomic::Ordering::SeqCst);
    let (mut direct, code) = send(veer.addr, GET).await;
    assert_eq!(code, 0);
    assert!(closed_by_veer(&mut direct).await);
    // A header that never completes: closed at header_timeout.
    let mut slow = TcpStream::connect(veer.addr).await.unwrap();
    slow.write_all(b"PROXY TCP4 203.0.113.").await.unwrap();
    assert!(closed_by_veer(&mut slow).await);
    assert_eq!(s.requests.load(std::sync::atomic::Ordering::SeqCst), before);
    let m = veer.metrics().await;
    assert_eq!(
        metric(&m, r#"veer_proxy_errors_total{kind="bad_proxy_header"}"#),
        Some(1.0),
        "{m}"
    );
    assert_eq!(metric(&m, HEADER_TIMEOUTS), Some(1.0), "{m}");
    assert_eq!(
        metric(
            &m,
            r#"veer_proxy_errors_total{kind="too_many_connections"}"#
        ),
        Some(1.0)
    );
    // The access log names the client the header named.
    let lines = veer.logs_with_at_least("request", 5).await;
    assert!(
        lines.iter().any(|l| l["target"] == "veer::access"
            && l["client"]
                .as_str()
                .is_some_and(|c| c.starts_with("203.0.113.7:"))),
        "{lines:?}"
    );
}

/// An HTTP/1.1 upstream for [`more_fields_than_a_hundred_pass_where_max_header_fields_allows`]:
/// `/many` is answered with 150 `set-cookie` fields; anything else with
/// the number of fields its request came with.
async fn counting_upstream() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cookies: String = (0..150)
        .map(|i| format!("set-cookie: c{i}=v\r\n"))
        .collect();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let cookies = cookies.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        let head = String::from_utf8_lossy(&head).to_string();
                        let answer = if head.starts_with("GET /many ") {
                            format!("HTTP/1.1 200 OK\r\n{cookies}content-length: 2\r\n\r\nok")
                        } else {
                            let fields = head.trim_end().lines().count() - 1;
                            let body = fields.to_string();
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            )
                        };
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// The number of fields the counting upstream said its request had.
fn fields_seen(r: &hyper::Response<bytes::Bytes>) -> usize {
    std::str::from_utf8(r.body()).unwrap().parse().unwrap()
}

/// A head may have 100 fields (hyper's, Envoy's and HAProxy's limit): a
/// request with more gets 431 and an answer with more is a 502. `[proxy]
/// max_header_fields` raises it for both (nginx counts none), applied on
/// reload to new connections; an answer is read with it on veer's own
/// HTTP/1.1 reads and hyper's client alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_fields_than_a_hundred_pass_where_max_header_fields_allows() {
    let up = counting_upstream().await;
    let fields: Vec<(String, String)> = (0..150)
        .map(|i| (format!("x-f{i}"), "v".to_string()))
        .collect();
    let fields: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for setting in ["", "upstream_http1 = \"hyper\""] {
        let config = |more: &str| {
            with_proxy(
                route_config(&[up], &[], 0.0, ""),
                &format!("{setting}\n{more}"),
            )
        };
        let veer = Veer::start(&config("")).await;
        let mut c = super::support::Client::connect(veer.addr).await.unwrap();
        let r = c.get("/few", &fields[..90]).await.unwrap();
        assert_eq!(r.status(), 200, "{setting}");
        assert!(fields_seen(&r) > 90, "{setting}");
        let r = c.get("/many", &[]).await.unwrap();
        assert_eq!(r.status(), 502, "{setting}");
        // The log says which endpoint and why (the access log only
        // `protocol`): veer's own reads name the setting.
        let why = match setting {
            "" => "more fields than [proxy] max_header_fields allows",
            _ => "message head is too large",
        };
        let lines = veer
            .logs_with_at_least(
                "an upstream's answer was not HTTP veer reads: 502 (kind protocol)",
                1,
            )
            .await;
        assert_eq!(lines.len(), 1, "{setting}: {}", veer.all_logs());
        assert!(
            lines[0]["why"].as_str().unwrap().contains(why),
            "{setting}: {}",
            lines[0]
        );
        assert_eq!(lines[0]["upstream"], up.to_string(), "{}", lines[0]);
        let r = c.get("/more", &fields).await.unwrap();
        assert_eq!(r.status(), 431, "{setting}");

        veer.write_config(&config("max_header_fields = 200"));
        veer.wait_generation(2).await;
        let mut c = super::support::Client::connect(veer.addr).await.unwrap();
        let r = c.get("/more", &fields).await.unwrap();
        assert_eq!(r.status(), 200, "{setting}");
        assert!(fields_seen(&r) > 150, "{setting}");
        for _ in 0..2 {
            let r = c.get("/many", &[]).await.unwrap();
            assert_eq!(r.status(), 200, "{setting}");
            assert_eq!(r.headers().get_all("set-cookie").iter().count(), 150);
            assert_eq!(r.body().as_ref(), b"ok", "{setting}");
        }
    }
}
