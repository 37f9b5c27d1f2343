//! Upstream failures: each fails only its own requests, with the right status
//! and `kind`, and a dead endpoint is skipped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::support::{
    dead_addr, get, metric, route_config, truncating_upstream, Client, Upstream, Veer,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_skipped_without_client_errors() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let dead = dead_addr().await;
    // No judge: its verdicts would publish `/status` anyway, and the end
    // of the back-off below must show without them.
    let config =
        route_config(&[a.addr, b.addr, dead], &[], 0.0, "") + "[route.judge]\nmode = \"off\"\n";
    let veer = Veer::start(&config).await;
    let mut c = Client::connect(veer.addr).await.unwrap();
    let mut failures = 0;
    for i in 0..600 {
        let r = c
            .get("/", &[("x-user-id", &format!("u{i}"))])
            .await
            .unwrap();
        if r.status() != 200 {
            failures += 1;
        }
    }
    assert_eq!(
        failures, 0,
        "the connect retry on the next endpoint must hide the dead one"
    );
    let m = veer.metrics().await;
    let connect_errors = metric(
        &m,
        r#"veer_upstream_errors_total{kind="connect",route="web",version="v1"}"#,
    )
    .unwrap();
    assert!(
        connect_errors >= 1.0,
        "the dead endpoint was tried and counted"
    );
    // After the first failure the endpoint is in back-off: far fewer than
    // its ~200 keys' worth of connect attempts.
    assert!(
        connect_errors < 20.0,
        "dead endpoint retried {connect_errors} times"
    );
    // `/status` shows it unhealthy. Its back-off is time-bound (it may have
    // run out on a slow machine since the loop above), so keep sending keys
    // — one of them lands on it and fails again — while polling.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut i = 0;
    loop {
        let status = veer.status().await;
        let eps = status["routes"][0]["stable"]["endpoints"]
            .as_array()
            .unwrap()
            .clone();
        let dead_state = eps.iter().find(|e| e["addr"] == dead.to_string()).unwrap();
        if dead_state["healthy"] == false {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dead endpoint never showed unhealthy: {dead_state}"
        );
        for _ in 0..20 {
            i += 1;
            let r = c
                .get("/", &[("x-user-id", &format!("again{i}"))])
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    // No more traffic: nothing but time moves the endpoint's health now.
    // Its back-off runs out (at most 30 s), and `/status` shows that within
    // about a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(45);
    loop {
        let status = veer.status().await;
        let eps = status["routes"][0]["stable"]["endpoints"].clone();
        let dead_state = eps
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["addr"] == dead.to_string())
            .unwrap()
            .clone();
        if dead_state["healthy"] == true {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the end of the back-off never showed: {dead_state}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_gives_502_and_counts_connect() {
    let dead = dead_addr().await;
    let veer = Veer::start(&route_config(&[dead], &[], 0.0, "")).await;
    let r = get(veer.addr, "/", &[]).await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(&r.body()[..], b"bad gateway\n");
    let m = veer.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"veer_requests_total{code="5xx",route="web",version="v1"}"#
        ),
        Some(1.0)
    );
    assert!(
        metric(
            &m,
            r#"veer_upstream_errors_total{kind="connect",route="web",version="v1"}"#
        ) >= Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_gives_504_and_fast_requests_still_pass() {
    let slow = Upstream::start("slow").await;
    slow.delay_ms.store(3_000, Ordering::SeqCst);
    let veer = Veer::start(&route_config(
        &[slow.addr],
        &[],
        0.0,
        "timeout = \"300ms\"\nconnect_timeout = \"100ms\"",
    ))
    .await;
    let r = get(veer.addr, "/", &[]).await.unwrap();
    assert_eq!(r.status(), 504);
    slow.delay_ms.store(0, Ordering::SeqCst);
    let r = get(veer.addr, "/", &[]).await.unwrap();
    assert_eq!(r.status(), 200);
    let m = veer.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"veer_upstream_errors_total{kind="timeout",route="web",version="v1"}"#
        ),
        Some(1.0)
    );
}

/// The route timeout's timer is kept by the client connection from one
/// request to the next and moved to each request's own deadline: a request
/// gets its whole timeout however long ago the last one began (a timer that
/// goes off early is checked against the request's own start), and a timer
/// that fired for one request fires again for a later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_on_a_kept_alive_connection_gets_its_own_whole_timeout() {
    let up = Upstream::start("up").await;
    let veer = Veer::start(&route_config(
        &[up.addr],
        &[],
        0.0,
        "timeout = \"2s\"\nconnect_timeout = \"500ms\"",
    ))
    .await;
    let mut c = Client::connect(veer.addr).await.unwrap();
    for _ in 0..20 {
        assert_eq!(c.get("/", &[]).await.unwrap().status(), 200);
    }
    // The last request's deadline comes 0.4 s into the next one, which
    // takes 0.8 s: a deadline left over from it would give a 504.
    tokio::time::sleep(std::time::Duration::from_millis(1_600)).await;
    up.delay_ms.store(800, Ordering::SeqCst);
    let r = c.get("/", &[]).await.unwrap();
    assert_eq!(r.status(), 200, "a stale deadline cut a request short");
    for round in 0..2 {
        up.delay_ms.store(10_000, Ordering::SeqCst);
        let began = std::time::Instant::now();
        let r = c.get("/", &[]).await.unwrap();
        let took = began.elapsed();
        assert_eq!(r.status(), 504, "round {round}");
        assert!(
            took >= std::time::Duration::from_millis(1_900),
            "round {round}: 504 after {took:?}, before the 2 s timeout"
        );
        up.delay_ms.store(0, Ordering::SeqCst);
        assert_eq!(c.get("/", &[]).await.unwrap().status(), 200);
    }
    let m = veer.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"veer_upstream_errors_total{kind="timeout",route="web",version="v1"}"#
        ),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_5xx_passes_through_and_is_counted_per_version() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.status.store(503, Ordering::SeqCst);
    let veer = Veer::start(&route_config(&[s.addr], &[c.addr], 100.0, "")).await;
    let r = get(veer.addr, "/", &[("x-user-id", "u1")]).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(&r.body()[..], b"canary");
    let m = veer.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"veer_requests_total{code="5xx",route="web",version="v2"}"#
        ),
        Some(1.0)
    );
    // A version's first response makes all its classes, at 0 but one.
    assert_eq!(
        metric(
            &m,
            r#"veer_requests_total{code="2xx",route="web",version="v2"}"#
        ),
        Some(0.0)
    );
    // A version that has answered nothing has no request series yet.
    assert_eq!(
        metric(
            &m,
            r#"veer_requests_total{code="2xx",route="web",version="v1"}"#
        ),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_gives_404_naming_no_internals() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&route_config(
        &[s.addr],
        &[],
        0.0,
        "hosts = [\"shop.test\"]",
    ))
    .await;
    let r = get(veer.addr, "/", &[]).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(&r.body()[..], b"not found\n");
    let mut c = Client::connect(veer.addr).await.unwrap();
    let r = c.get("/", &[("host", "SHOP.test:8080")]).await.unwrap();
    assert_eq!(r.status(), 200, "host match ignores case and port");
    let m = veer.metrics().await;
    assert_eq!(
        metric(&m, r#"veer_proxy_errors_total{kind="no_route"}"#),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_may_be_host_names() {
    let s = Upstream::start("stable").await;
    let named = format!("localhost:{}", s.addr.port());
    let config = route_config(&[s.addr], &[], 0.0, "").replace(&s.addr.to_string(), &named);
    let veer = Veer::start(&config).await;
    let r = get(veer.addr, "/", &[]).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        veer.status().await["routes"][0]["stable"]["endpoints"][0]["addr"],
        named
    );
}

/// An HTTP/1.1 upstream that answers the first request on each connection
/// and closes the connection, unanswered, when a second request arrives on
/// it: what a server whose keep-alive timeout ends just as a reused
/// connection carries a request looks like from the proxy (Node.js closes
/// idle connections after 5 s). Counts the requests it answered and the
/// connections it accepted.
async fn closes_reused_connections() -> (std::net::SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>) {
    let answered = Arc::new(AtomicU64::new(0));
    let a = answered.clone();
    let (addr, _, accepted) = super::support::scripted_upstream(move |_, before| {
        if before == 1 {
            return None; // closed, unanswered
        }
        a.fetch_add(1, Ordering::SeqCst);
        Some((
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-upstream: racy\r\n\r\nok\n",
            false,
        ))
    })
    .await;
    (addr, answered, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_closed_under_a_get_is_retried_on_a_fresh_one() {
    let (addr, answered, accepted) = closes_reused_connections().await;
    let veer = Veer::start(&route_config(&[addr], &[], 0.0, "")).await;
    let mut c = Client::connect(veer.addr).await.unwrap();
    for i in 0..8 {
        // Idle long enough for a server's keep-alive timeout to be in play
        // (veer keeps a copy of the head after 100 ms idle).
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        let r = c
            .get("/", &[("x-user-id", &format!("u{i}"))])
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}:\n{}", veer.all_logs());
    }
    assert_eq!(answered.load(Ordering::SeqCst), 8);
    assert!(accepted.load(Ordering::SeqCst) >= 8);
    let m = veer.metrics().await;
    let errors: f64 = m
        .lines()
        .filter(|l| l.starts_with("veer_upstream_errors_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(errors, 0.0, "no upstream error counted:\n{m}");
    // A POST is not idempotent: the server may have acted on it before it
    // closed, so it is not sent again (a 502, as from nginx).
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let r = c
        .send(
            hyper::Method::POST,
            "/",
            &[("x-user-id", "u0")],
            bytes::Bytes::from_static(b"pay"),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(
        answered.load(Ordering::SeqCst),
        8,
        "the POST was not sent again"
    );
}

/// `n` GETs of `path`, each with its own sticky key (`prefix` and a
/// number), each answered `status`.
async fn get_keyed(c: &mut Client, path: &str, prefix: &str, n: usize, status: u16) {
    for i in 0..n {
        let r = c
            .get(path, &[("x-user-id", &format!("{prefix}{i}"))])
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{path} #{i}");
    }
}

/// `veer`'s access log lines, once at least `n` have come.
async fn access_lines(veer: &Veer, n: usize) -> Vec<serde_json::Value> {
    let lines = veer.logs_with_at_least("request", n).await;
    lines
        .into_iter()
        .filter(|l| l["target"] == "veer::access")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_failure_or_per_request_as_configured() {
    let s = Upstream::start("stable").await;
    let config = |log: &str| {
        route_config(&[s.addr], &[], 0.0, "").replacen(
            "[proxy]\n",
            &format!("[proxy]\naccess_log = \"{log}\"\n"),
            1,
        )
    };
    let veer = Veer::start(&route_config(&[s.addr], &[], 0.0, "")).await;
    let mut c = Client::connect(veer.addr).await.unwrap();
    // Off by default.
    get_keyed(&mut c, "/off", "u", 5, 200).await;

    // `errors`: a line for each failed request, none for the others.
    veer.write_config(&config("errors"));
    veer.wait_generation(2).await;
    s.status.store(503, Ordering::SeqCst);
    get_keyed(&mut c, "/pay?card=4111", "e", 3, 503).await;
    s.status.store(200, Ordering::SeqCst);
    get_keyed(&mut c, "/ok", "k", 5, 200).await;
    let lines = access_lines(&veer, 3).await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        assert_eq!(l["status"], 503, "{l}");
        assert_eq!(l["route"], "web", "{l}");
        assert_eq!(l["version"], "v1", "{l}");
        assert_eq!(l["role"], "stable", "{l}");
        assert_eq!(l["method"], "GET", "{l}");
        // The path only: a query may carry credentials.
        assert_eq!(l["path"], "/pay", "{l}");
        assert!(l["ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{l}");
        assert!(
            l["client"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "{l}"
        );
    }

    // `all`: a line for every request.
    veer.write_config(&config("all"));
    veer.wait_generation(3).await;
    get_keyed(&mut c, "/all", "a", 4, 200).await;
    let lines = access_lines(&veer, 7).await;
    assert_eq!(lines.len(), 7, "{lines:?}");
    // None was dropped on the way to stderr, and the metric says so.
    let m = veer.metrics().await;
    assert_eq!(metric(&m, "veer_log_lines_dropped_total"), Some(0.0), "{m}");
    assert!(
        lines[3..]
            .iter()
            .all(|l| l["path"] == "/all" && l["status"] == 200),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_the_upstream_breaks_off_after_a_good_head_has_its_own_access_log_line() {
    // The head (200) is not a failure, so `errors` writes no line for it;
    // the body broken off after it is one.
    let u = truncating_upstream().await;
    let veer = Veer::start(&route_config(&[u], &[], 0.0, "").replacen(
        "[proxy]\n",
        "[proxy]\naccess_log = \"errors\"\n",
        1,
    ))
    .await;
    let mut c = Client::connect(veer.addr).await.unwrap();
    // The client sees the head, then the body fails.
    assert!(c.get("/download", &[]).await.is_err());
    let lines = veer.logs_with_at_least("response body failed", 1).await;
    let l = &lines[0];
    assert_eq!(l["target"], "veer::access", "{l}");
    assert_eq!(l["status"], 200, "{l}");
    assert_eq!(l["path"], "/download", "{l}");
    assert_eq!(l["version"], "v1", "{l}");
    assert!(
        ["reset", "protocol"].contains(&l["error"].as_str().unwrap_or_default()),
        "{l}"
    );
    assert!(veer.logs_with("request").is_empty(), "{}", veer.all_logs());
}

/// An HTTP/1.1 upstream whose every answer is 3 000 bytes, sent in three
/// pieces 200 ms apart.
async fn dripping_upstream() -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                while super::support::read_head(&mut stream).await {
                    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 3000\r\n\r\n";
                    if stream.write_all(head).await.is_err() {
                        return;
                    }
                    for i in 0..3 {
                        if i > 0 {
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        }
                        if stream.write_all(&[b'x'; 1000]).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_line_comes_at_the_answers_end_with_its_bytes_and_whole_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let u = dripping_upstream().await;
    let veer = Veer::start(&route_config(&[u], &[], 0.0, "").replacen(
        "[proxy]\n",
        "[proxy]\naccess_log = \"all\"\n",
        1,
    ))
    .await;
    // A client that reads the whole answer.
    let mut c = Client::connect(veer.addr).await.unwrap();
    let r = c.get("/whole", &[]).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.body().len(), 3000);
    // One that leaves after the head and the first piece.
    let mut s = tokio::net::TcpStream::connect(veer.addr).await.unwrap();
    s.write_all(b"GET /left HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let body_len = |got: &[u8]| {
        got.windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(0, |end| got.len() - end - 4)
    };
    while body_len(&got) < 1000 {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "{:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    drop(s);
    let lines = access_lines(&veer, 2).await;
    let line = |path: &str| {
        lines
            .iter()
            .find(|l| l["path"] == path)
            .unwrap_or_else(|| panic!("no line for {path}: {lines:?}"))
    };
    let whole = line("/whole");
    assert_eq!(whole["status"], 200, "{whole}");
    assert_eq!(whole["bytes"], 3000, "{whole}");
    assert_eq!(whole["upstream"], u.to_string(), "{whole}");
    let (ms, total) = (
        whole["ms"].as_f64().unwrap(),
        whole["total_ms"].as_f64().unwrap(),
    );
    // `ms` is to the head; the body took two 200 ms waits more.
    assert!(total >= ms + 390.0, "{whole}");
    let left = line("/left");
    assert_eq!(left["status"], 200, "{left}");
    let bytes = left["bytes"].as_u64().unwrap();
    assert!((1000..3000).contains(&bytes), "{left}");
    assert!(
        left["total_ms"].as_f64().unwrap() >= left["ms"].as_f64().unwrap(),
        "{left}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_of_the_log_never_stalls_the_proxy() {
    use std::io::{BufRead, BufReader};
    let s = Upstream::start("stable").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("veer.toml");
    let config = route_config(&[s.addr], &[], 0.0, "")
        .replacen("[proxy]\n", "[proxy]\naccess_log = \"all\"\n", 1)
        .replace("@STATE@", &dir.path().join("state").display().to_string());
    std::fs::write(&path, config).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_veer"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read stderr up to the proxy's and the admin's addresses, then never
    // again: the pipe (64 KiB) fills after a few hundred access log lines,
    // the log's queue (16 384 lines) after that.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let addrs = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let (mut proxy, mut admin) = (None, None);
        while proxy.is_none() || admin.is_none() {
            line.clear();
            if stderr.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == "listening" {
                let a = v["addr"]
                    .as_str()
                    .and_then(|a| a.parse::<std::net::SocketAddr>().ok());
                match v["kind"].as_str() {
                    Some("proxy") => proxy = a,
                    Some("admin") => admin = a,
                    _ => {}
                }
            }
        }
        (
            proxy.expect("veer's proxy address"),
            admin.expect("veer's admin address"),
            stderr,
        )
    })
    .await
    .unwrap();
    let (addr, admin, _unread) = addrs;
    // 20 000 requests on 4 connections.
    let served = tokio::time::timeout(std::time::Duration::from_secs(120), async {
        let clients = (0..4).map(|w| async move {
            let mut c = Client::connect(addr).await.unwrap();
            for i in 0..5_000 {
                let r = c
                    .get("/", &[("x-user-id", &format!("u{w}-{i}"))])
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        });
        for h in clients.map(tokio::spawn).collect::<Vec<_>>() {
            h.await.unwrap();
        }
    })
    .await;
    // The lines past the queue were dropped, and counted.
    let m = get(admin, "/metrics", &[]).await.map(|r| r.body().clone());
    let _ = child.kill();
    let _ = child.wait();
    assert!(served.is_ok(), "requests stalled behind the log's pipe");
    let m = String::from_utf8_lossy(&m.expect("metrics")).into_owned();
    let dropped = metric(&m, "veer_log_lines_dropped_total").unwrap_or(0.0);
    assert!(
        dropped >= 1000.0,
        "20 000 access log lines behind a stalled reader, {dropped} dropped"
    );
}

/// Three times: a GET answered 200 (on a fresh connection if need be),
/// then at once a second GET on the connection it left in the pool (with
/// [`closes_reused_connections`], closed under it unanswered); the second
/// GETs' statuses. veer's own exchange sends such a GET again whatever
/// the idle time (200); hyper's client answers 502 unless the connection
/// lay idle 100 ms (a stall of a loaded machine), so one 502 in three
/// tells hyper's client.
async fn second_statuses(c: &mut Client) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..3 {
        for _ in 0..3 {
            let s = c.get("/", &[("x-user-id", "u1")]).await.unwrap().status();
            if s == 200 {
                break;
            }
        }
        let again = c.get("/", &[("x-user-id", "u1")]).await.unwrap().status();
        out.push(again.as_u16());
    }
    out
}

/// `[proxy] upstream_http1 = "hyper"` puts GET and HEAD back on hyper's
/// client (the way back if an upstream misbehaves with veer's own reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_http1_hyper_puts_gets_back_on_hypers_client() {
    for setting in ["", "upstream_http1 = \"hyper\"\n"] {
        let (addr, _, _) = closes_reused_connections().await;
        let config = route_config(&[addr], &[], 0.0, "").replacen(
            "[proxy]\n",
            &format!("[proxy]\n{setting}"),
            1,
        );
        let veer = Veer::start(&config).await;
        let mut c = Client::connect(veer.addr).await.unwrap();
        let seconds = second_statuses(&mut c).await;
        if setting.is_empty() {
            assert_eq!(seconds, [200, 200, 200], "veer's own:\n{}", veer.all_logs());
        } else {
            assert!(seconds.contains(&502), "hyper's client: {seconds:?}");
        }
    }
}

/// `upstream_http1` changes on reload, with no restart: the running
/// routes' GETs move to hyper's client and back (told apart by
/// [`second_statuses`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_http1_changes_on_reload() {
    let (addr, _, _) = closes_reused_connections().await;
    let config = |setting: &str| {
        route_config(&[addr], &[], 0.0, "").replacen("[proxy]\n", &format!("[proxy]\n{setting}"), 1)
    };
    let veer = Veer::start(&config("")).await;
    let mut c = Client::connect(veer.addr).await.unwrap();
    assert_eq!(
        second_statuses(&mut c).await,
        [200, 200, 200],
        "veer's own: sent again"
    );
    veer.write_config(&config("upstream_http1 = \"hyper\"\n"));
    veer.wait_generation(2).await;
    let hyper = second_statuses(&mut c).await;
    assert!(
        hyper.contains(&502),
        "hyper's client after the reload: {hyper:?}"
    );
    veer.write_config(&config(""));
    veer.wait_generation(3).await;
    assert_eq!(
        second_statuses(&mut c).await,
        [200, 200, 200],
        "veer's own again:\n{}",
        veer.all_logs()
    );
}

/// An answer with whitespace between a field's name and its colon
/// (`X-Legacy : yes`, from some old servers) is served with the field as
/// `x-legacy: yes`, framed by its `Content-Length :` (RFC 9112, section
/// 5.1: a proxy removes the whitespace), on veer's own HTTP/1.1 reads and
/// on hyper's client alike; it was a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answers_space_before_a_colon_is_removed_not_refused() {
    let answer: &'static [u8] =
        b"HTTP/1.1 200 OK\r\nx-legacy : yes\r\ncontent-length : 2\r\n\r\nok";
    let (up, _, _) = super::support::scripted_upstream(move |_, _| Some((answer, false))).await;
    for setting in ["", "upstream_http1 = \"hyper\"\n"] {
        let config = route_config(&[up], &[], 0.0, "").replacen(
            "[proxy]\n",
            &format!("[proxy]\n{setting}"),
            1,
        );
        let veer = Veer::start(&config).await;
        let mut c = Client::connect(veer.addr).await.unwrap();
        for _ in 0..2 {
            let r = c.get("/", &[]).await.unwrap();
            assert_eq!(r.status(), 200, "{setting}");
            assert_eq!(r.headers()["x-legacy"], "yes", "{setting}");
            assert_eq!(&r.body()[..], b"ok", "{setting}");
        }
    }
}

/// A request that failed upstream has the endpoint its try went to in its
/// access log line's `upstream` (nginx's `$upstream_addr`), as one that
/// was answered has the one that answered: a broken answer (on veer's own
/// reads and hyper's), a refused connection, a timeout. It was absent,
/// and an operator could not tell which of a version's endpoints failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_requests_access_log_line_names_the_endpoint_it_went_to() {
    let broken: &'static [u8] = b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n";
    let (broken, _, _) = super::support::scripted_upstream(move |_, _| Some((broken, true))).await;
    // Takes the request, answers nothing, keeps the connection.
    let (silent, _, _) = super::support::scripted_upstream(|_, _| Some((b"", false))).await;
    let refusing = dead_addr().await;
    use hyper::Method;
    for (up, method, status, error) in [
        (broken, Method::GET, 502, "protocol"),
        (broken, Method::POST, 502, "protocol"),
        (refusing, Method::GET, 502, "connect"),
        (silent, Method::GET, 504, "timeout"),
    ] {
        let veer = Veer::start(
            &route_config(&[up], &[], 0.0, "timeout = \"300ms\"\n").replacen(
                "[proxy]\n",
                "[proxy]\naccess_log = \"errors\"\n",
                1,
            ),
        )
        .await;
        let mut c = Client::connect(veer.addr).await.unwrap();
        let body = if method == Method::POST { "x" } else { "" };
        let r = c
            .send(
                method.clone(),
                "/",
                &[],
                bytes::Bytes::from_static(body.as_bytes()),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{up} {method}");
        let lines = access_lines(&veer, 1).await;
        assert_eq!(lines.len(), 1, "{lines:?}");
        let l = &lines[0];
        assert_eq!(l["error"], error, "{l}");
        assert_eq!(l["upstream"], up.to_string(), "{l}");
        if status == 504 {
            // Which deadline passed, with its setting.
            assert_eq!(l["why"], "no answer within 300ms ([route] timeout)", "{l}");
        }
    }
    // A route that sends a slow try again: its last try's deadline passed
    // before the route's (two tries of 100 ms within 5 s).
    let veer = Veer::start(
        &route_config(
            &[silent],
            &[],
            0.0,
            "timeout = \"5s\"\n[route.retry]\non = [\"timeout\"]\nretries = 1\ntry_timeout = \"100ms\"\n",
        )
        .replacen("[proxy]\n", "[proxy]\naccess_log = \"errors\"\n", 1),
    )
    .await;
    let r = get(veer.addr, "/", &[]).await.unwrap();
    assert_eq!(r.status(), 504);
    let lines = access_lines(&veer, 1).await;
    let l = &lines[0];
    assert_eq!(l["retries"], 1, "{l}");
    assert_eq!(
        l["why"], "the last try had no answer within 100ms ([route.retry] try_timeout)",
        "{l}"
    );
}

/// Two endpoint names of one address (`localhost:P` and `127.0.0.1:P`),
/// the address refusing connections: each request gets its 502 and veer
/// goes on serving. The failed connect's fallback looked for the other
/// endpoint on the ring for ever, the worker thread with it: the first
/// request never got an answer, and with one worker nothing else did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_names_of_one_dead_address_fail_their_requests_and_nothing_else() {
    let dead = dead_addr().await;
    let config = route_config(&[dead], &[], 0.0, "")
        .replace(
            &format!("[\"{dead}\"]"),
            &format!("[\"localhost:{}\", \"{dead}\"]", dead.port()),
        )
        .replacen("[proxy]\n", "[proxy]\nworkers = 1\n", 1);
    let veer = Veer::start(&config).await;
    for i in 0..3 {
        let user = format!("user-{i}");
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            get(veer.addr, "/", &[("x-user-id", &user)]),
        )
        .await
        .expect("answered")
        .unwrap();
        assert_eq!(r.status(), 502);
    }
    // One endpoint an address (`localhost` may be [::1] too).
    let status = veer.status().await;
    let mut resolved: Vec<&str> = status["routes"][0]["stable"]["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(|e| e["resolved"].as_str())
        .collect();
    let listed = resolved.len();
    resolved.dedup();
    assert_eq!(resolved.len(), listed, "{status}");
    assert!(resolved.contains(&dead.to_string().as_str()), "{status}");
}

/// A body the upstream breaks after a good head (a chunk size line that is
/// no number, a body cut short of its length, a body gone silent) has its
/// endpoint and why in its `response body failed` line, on veer's own
/// reads and hyper's; and each is said in the log at the default level,
/// as a broken head, a reset or a timeout before the head are (the kind
/// alone said nothing of what was wrong, nor which endpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_bodys_line_says_why_and_which_endpoint() {
    let bad_chunk: &'static [u8] =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n\r\n";
    let (bad_chunk, _, _) =
        super::support::scripted_upstream(move |_, _| Some((bad_chunk, false))).await;
    let short: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc";
    let (short, _, _) = super::support::scripted_upstream(move |_, _| Some((short, true))).await;
    // Its body's first bytes, then nothing (the connection kept).
    let stall: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc";
    let (stall, _, _) = super::support::scripted_upstream(move |_, _| Some((stall, false))).await;
    let warnings = [
        "an upstream's answer's body was not HTTP veer reads: cut off (kind protocol)",
        "an upstream endpoint closed or reset the connection in its answer's body (kind reset)",
        "an upstream endpoint's answer's body stalled (kind timeout)",
    ];
    for setting in ["", "upstream_http1 = \"hyper\"\n"] {
        for (up, error, why, warning) in [
            (bad_chunk, "protocol", "chunk size", warnings[0]),
            (short, "reset", "", warnings[1]),
            (
                stall,
                "timeout",
                "nothing came for 300ms (body_timeout)",
                warnings[2],
            ),
        ] {
            let config = route_config(&[up], &[], 0.0, "").replacen(
                "[proxy]\n",
                &format!("[proxy]\naccess_log = \"errors\"\nbody_timeout = \"300ms\"\n{setting}"),
                1,
            );
            let veer = Veer::start(&config).await;
            let mut c = Client::connect(veer.addr).await.unwrap();
            assert!(c.get("/", &[]).await.is_err(), "{setting} {error}");
            let lines = veer.logs_with_at_least("response body failed", 1).await;
            let l = &lines[0];
            assert_eq!(l["error"], error, "{setting} {l}");
            assert_eq!(l["upstream"], up.to_string(), "{setting} {l}");
            let said = l["why"].as_str().unwrap_or_default().to_lowercase();
            assert!(!said.is_empty() && said.contains(why), "{setting} {l}");
            // Said at the default level too, with the endpoint and why.
            let warned = veer.logs_with_at_least(warning, 1).await;
            assert_eq!(warned.len(), 1, "{setting} {}", veer.all_logs());
            assert_eq!(warned[0]["level"], "WARN", "{}", warned[0]);
            assert_eq!(warned[0]["upstream"], up.to_string(), "{}", warned[0]);
            assert_eq!(warned[0]["why"], l["why"], "{}", warned[0]);
            for other in warnings.iter().filter(|w| **w != warning) {
                assert!(
                    veer.logs_with(other).is_empty(),
                    "{setting} {}",
                    veer.all_logs()
                );
            }
        }
    }
}

/// A connect that fails is said in the log with its endpoint and why, as
/// nginx's error log says each ("connect() failed (111: Connection
/// refused)"), and its access log line has the why too: the access log's
/// `connect` and the metrics said only that one had, and at the default
/// level nothing said which endpoint or why.
/// `/status` and `veer status` say why too, until the endpoint answers
/// again (an unhealthy endpoint had a reason there only when a health
/// check or outlier detection took it out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connect_is_said_with_its_endpoint_and_why() {
    // Bound, not listening (refused) until `listen` below.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = socket.local_addr().unwrap();
    let config = route_config(&[dead], &[], 0.0, "").replacen(
        "[proxy]\n",
        "[proxy]\naccess_log = \"errors\"\n",
        1,
    );
    let veer = Veer::start(&config).await;
    let r = get(veer.addr, "/", &[("x-user-id", "u")]).await.unwrap();
    assert_eq!(r.status(), 502);
    // The access log's line says why too.
    let lines = veer.logs_with_at_least("request", 1).await;
    let l = &lines[0];
    assert_eq!(l["error"], "connect", "{l}");
    assert_eq!(l["upstream"], dead.to_string(), "{l}");
    let why = l["why"].as_str().unwrap_or_default().to_lowercase();
    assert!(why.contains("refused"), "{l}");
    let lines = veer
        .logs_with_at_least(
            "could not connect to an upstream endpoint (kind connect)",
            1,
        )
        .await;
    let l = &lines[0];
    assert_eq!(l["level"], "WARN", "{l}");
    assert_eq!(l["upstream"], dead.to_string(), "{l}");
    let why = l["why"].as_str().unwrap_or_default().to_lowercase();
    assert!(why.contains("refused"), "{l}");

    let connect_error = |st: &serde_json::Value| {
        st["routes"][0]["stable"]["endpoints"][0]["connect_error"]
            .as_str()
            .map(str::to_lowercase)
    };
    let start = std::time::Instant::now();
    let st = loop {
        let st = veer.status().await;
        if connect_error(&st).is_some() {
            break st;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "{st}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(
        connect_error(&st).unwrap_or_default().contains("refused"),
        "{st}"
    );
    let admin = veer.admin.to_string();
    let out = tokio::task::spawn_blocking(move || {
        super::support::veer_cli(&["status", "--admin", &admin])
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        text.contains(&format!("endpoint {dead} of v1 failing connects:"))
            && text.contains("refused"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The endpoint listens: once a request is answered, no reason is left.
    let listener = socket.listen(64).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                while super::support::read_head(&mut s).await {
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let start = std::time::Instant::now();
    loop {
        let r = get(veer.addr, "/", &[("x-user-id", "u")]).await.unwrap();
        let st = veer.status().await;
        if r.status() == 200 && connect_error(&st).is_none() {
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "{st}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A try reset on its connection, or without an answer within the route's
/// timeout, is said in the log with its endpoint (nginx's error log says
/// each: "upstream prematurely closed connection", "upstream timed out"),
/// with the access log off: nothing else named the endpoint then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_or_a_timeout_is_said_with_its_endpoint() {
    // Closes each connection unanswered.
    let (closing, _, _) = super::support::scripted_upstream(|_, _| None).await;
    // Takes the request, answers nothing, keeps the connection.
    let (silent, _, _) = super::support::scripted_upstream(|_, _| Some((b"", false))).await;
    for (up, status, said) in [
        (
            closing,
            502,
            "an upstream endpoint closed or reset the connection before its answer (kind reset)",
        ),
        (
            silent,
            504,
            "an upstream endpoint gave no answer within the route's timeout (kind timeout)",
        ),
    ] {
        let veer = Veer::start(&route_config(&[up], &[], 0.0, "timeout = \"300ms\"\n")).await;
        let r = get(veer.addr, "/", &[("x-user-id", "u")]).await.unwrap();
        assert_eq!(r.status(), status, "{up}");
        let lines = veer.logs_with_at_least(said, 1).await;
        let l = &lines[0];
        assert_eq!(l["level"], "WARN", "{l}");
        assert_eq!(l["upstream"], up.to_string(), "{l}");
    }
}

/// An endpoint in back-off after failed tries (here resets: it closes each
/// connection unanswered) says why in `/status` and `veer status`: how
/// many in a row, how the last failed, for how long. It showed `healthy:
/// false` and nothing else. An answer ends it.
#[tokio::test]
async fn an_endpoint_in_back_off_says_why() {
    let (up, _, _) = super::support::scripted_upstream(|line, _| {
        line.contains("/ok")
            .then_some((b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false))
    })
    .await;
    let veer = Veer::start(&route_config(&[up], &[], 0.0, "")).await;
    // Five in a row: a back-off of 16 s, which a busy machine's
    // publishing cannot outlast.
    for _ in 0..5 {
        let r = get(veer.addr, "/fail", &[("x-user-id", "u")])
            .await
            .unwrap();
        assert_eq!(r.status(), 502);
    }
    let endpoint = |st: &serde_json::Value| st["routes"][0]["stable"]["endpoints"][0].clone();
    let want = "5 failed tries in a row (the last: closed or reset before its answer): out of picks for 16s";
    let start = std::time::Instant::now();
    loop {
        let st = veer.status().await;
        let e = endpoint(&st);
        if e["back_off"]
            .as_str()
            .is_some_and(|why| why.starts_with(want))
        {
            assert_eq!(e["healthy"], false, "{st}");
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "{st}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let admin = veer.admin.to_string();
    let out = tokio::task::spawn_blocking(move || {
        super::support::veer_cli(&["status", "--admin", &admin])
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("endpoint {up} of v1 backing off: {want}")),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Still its version's only endpoint, it is tried; its answer ends it.
    let r = get(veer.addr, "/ok", &[("x-user-id", "u")]).await.unwrap();
    assert_eq!(r.status(), 200);
    let start = std::time::Instant::now();
    loop {
        let st = veer.status().await;
        let e = endpoint(&st);
        if e["back_off"].is_null() && e["healthy"] == true {
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "{st}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
