//! The judge through the real binary: reverts that stick, no revert of a
//! good canary, observe mode, too little data, and operator actions.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::support::{
    all_on, get, metric, route_config, send_keyed, wait_verdict, Client, Load, Upstream, Veer,
};

const JUDGE: &str = "[route.judge]\ninterval = \"200ms\"\nwindow = \"10s\"\nmin_requests = 20\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_500s_are_reverted_and_traffic_returns_to_stable_and_stays_after_restart() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.status.store(500, Ordering::SeqCst);
    let config = route_config(&[s.addr], &[c.addr], 20.0, "") + JUDGE;
    let mut veer = Veer::start(&config).await;
    let load = Load::start(veer.addr, 4, Duration::ZERO);
    let route = wait_verdict(&veer, "reverted", Duration::from_secs(10)).await;
    load.stop().await;
    assert_eq!(route["weight"]["effective"], 0.0);
    assert_eq!(route["weight"]["configured"], 20.0);
    assert!(
        route["reason"].as_str().unwrap().contains("canary"),
        "{route}"
    );
    all_on(&veer, "stable", 300).await;
    let m = veer.metrics().await;
    assert_eq!(
        metric(&m, r#"veer_verdict{route="web",verdict="reverted"}"#),
        Some(1.0)
    );
    let reverts: f64 = m
        .lines()
        .filter(|l| l.starts_with("veer_reverts_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(reverts, 1.0);
    assert_eq!(veer.logs_with("canary reverted").len(), 1);

    // An unrelated reload does not re-expose the canary.
    veer.write_config(&config.replace("sticky = [", "timeout = \"20s\"\nsticky = ["));
    veer.wait_generation(2).await;
    all_on(&veer, "stable", 100).await;

    // Neither does a restart.
    veer.terminate();
    assert!(veer.wait_exit(Duration::from_secs(10)).await.success());
    let dir = std::mem::replace(&mut veer.dir, tempfile::tempdir().unwrap());
    let restarted = Veer::start_in(dir, veer.config.clone()).await;
    assert_eq!(restarted.status().await["routes"][0]["verdict"], "reverted");
    all_on(&restarted, "stable", 300).await;
    assert_eq!(
        restarted
            .logs_with("canary stays reverted (persisted decision)")
            .len(),
        1
    );

    // A new canary version brings canary traffic back.
    c.status.store(200, Ordering::SeqCst);
    let fixed = restarted.dir.path().join("veer.toml");
    let text = std::fs::read_to_string(&fixed)
        .unwrap()
        .replace("version = \"v2\"", "version = \"v3\"");
    let tmp = restarted.dir.path().join("new.toml");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &fixed).unwrap();
    restarted.wait_generation(2).await;
    let st = restarted.status().await;
    assert_eq!(
        st["routes"][0]["weight"]["effective"], 20.0,
        "{}",
        st["routes"][0]
    );
    let mut client = Client::connect(restarted.addr).await.unwrap();
    let mut canary = 0;
    for i in 0..500 {
        let r = client
            .get("/", &[("x-user-id", &format!("n{i}"))])
            .await
            .unwrap();
        canary += usize::from(r.headers()["x-upstream"] == "canary");
    }
    assert!(canary > 50, "canary got {canary} of 500");
}

/// A canary answering 500 under load, judged every ten minutes (so no
/// tick comes during a test: only the looks between ticks act), in `mode`.
/// The upstreams are returned to keep them serving.
async fn failing_canary_judged_every_ten_minutes(mode: &str) -> (Veer, Load, [Arc<Upstream>; 2]) {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.status.store(500, Ordering::SeqCst);
    let judge = format!("[route.judge]\nmode = \"{mode}\"\ninterval = \"10m\"\nwindow = \"1h\"\n");
    let veer = Veer::start(&(route_config(&[s.addr], &[c.addr], 20.0, "") + &judge)).await;
    let load = Load::start(veer.addr, 2, Duration::from_millis(5));
    (veer, load, [s, c])
}

/// The sequential tests are looked at between ticks: the canary is
/// reverted long before the first tick, as soon as its errors are evidence
/// enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breach_does_not_wait_for_the_end_of_the_interval() {
    let (veer, load, _upstreams) = failing_canary_judged_every_ten_minutes("enforce").await;
    let route = wait_verdict(&veer, "reverted", Duration::from_secs(20)).await;
    load.stop().await;
    assert_eq!(route["reverted"]["guard"], "error_rate_test", "{route}");
    assert_eq!(route["weight"]["effective"], 0.0);
    all_on(&veer, "stable", 100).await;
}

/// A breach that changes nothing (observe mode) is judged early once, not
/// at every look after it: the window keeps its slices of one interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observed_breach_does_not_make_every_look_a_tick() {
    let (veer, load, _upstreams) = failing_canary_judged_every_ten_minutes("observe").await;
    let route = wait_verdict(&veer, "observe_breach", Duration::from_secs(20)).await;
    let judged = route["window"]["stable"]["requests"].clone();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = load.stop().await;
    let later = veer.status().await["routes"][0].clone();
    assert_eq!(later["verdict"], "observe_breach", "{later}");
    // No tick since the early one: the window still holds what it judged.
    assert_eq!(later["window"]["stable"]["requests"], judged, "{later}");
    assert!(sent > 100, "the load kept going: {sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latency_regression_is_reverted() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    s.delay_ms.store(2, Ordering::SeqCst);
    c.delay_ms.store(40, Ordering::SeqCst);
    let veer = Veer::start(&(route_config(&[s.addr], &[c.addr], 20.0, "") + JUDGE)).await;
    let load = Load::start(veer.addr, 6, Duration::ZERO);
    let route = wait_verdict(&veer, "reverted", Duration::from_secs(20)).await;
    load.stop().await;
    assert!(
        route["reverted"]["guard"] == "latency_test"
            || route["reverted"]["guard"] == "latency_ratio",
        "{route}"
    );
    all_on(&veer, "stable", 200).await;
}

/// An upstream that sends a good head, part of the body, and hangs up.
async fn truncating_upstream() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nx-upstream: canary\r\ncontent-length: 1000\r\n\r\npartial")
                    .await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_breaks_off_its_bodies_is_reverted() {
    let s = Upstream::start("stable").await;
    let c = truncating_upstream().await;
    let veer = Veer::start(&(route_config(&[s.addr], &[c], 20.0, "") + JUDGE)).await;
    let load = Load::start(veer.addr, 4, Duration::ZERO);
    let route = wait_verdict(&veer, "reverted", Duration::from_secs(10)).await;
    load.stop().await;
    // Judged as failures (not merely as slow: without a pooled connection
    // to reuse, the canary is slower too).
    let guard = route["reverted"]["guard"].as_str().unwrap_or_default();
    assert!(
        ["failure_burst", "error_rate_test", "unreachable"].contains(&guard),
        "{route}"
    );
    all_on(&veer, "stable", 200).await;
    // The heads were 200s; the broken bodies count as upstream failures.
    let m = veer.metrics().await;
    let reset = metric(
        &m,
        r#"veer_upstream_errors_total{kind="reset",route="web",version="v2"}"#,
    )
    .unwrap_or(0.0);
    assert!(reset >= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_mode_reports_but_never_reverts() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.status.store(503, Ordering::SeqCst);
    let config = route_config(&[s.addr], &[c.addr], 20.0, "")
        + &JUDGE.replace("[route.judge]\n", "[route.judge]\nmode = \"observe\"\n");
    let veer = Veer::start(&config).await;
    let load = Load::start(veer.addr, 4, Duration::ZERO);
    let route = wait_verdict(&veer, "observe_breach", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.stop().await;
    assert_eq!(route["weight"]["effective"], 20.0);
    assert_eq!(
        veer.status().await["routes"][0]["weight"]["effective"],
        20.0
    );
    assert!(veer.logs_with("canary reverted").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_canary_version_keeps_stables_window() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let config = route_config(&[s.addr], &[c.addr], 20.0, "") + JUDGE;
    let veer = Veer::start(&config).await;
    send_keyed(veer.addr, 200).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stable = |st: &serde_json::Value| st["routes"][0]["window"]["stable"]["requests"].as_u64();
    let before = stable(&veer.status().await).unwrap();
    assert!(before > 100, "{before}");
    veer.write_config(&config.replace("version = \"v2\"", "version = \"v3\""));
    veer.wait_generation(2).await;
    let start = Instant::now();
    let st = loop {
        let st = veer.status().await;
        // The judge's view is published just after the new snapshot.
        let canary = st["routes"][0]["window"]["canary"]["requests"].as_u64();
        if st["routes"][0]["canary"]["version"] == "v3" && canary == Some(0) {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{st}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(stable(&st), Some(before), "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_evidence_survives_a_restart() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.fail_one_in.store(5, Ordering::SeqCst);
    let config = route_config(&[s.addr], &[c.addr], 20.0, "")
        + &JUDGE.replace("[route.judge]\n", "[route.judge]\nmode = \"observe\"\n");
    let mut veer = Veer::start(&config).await;
    send_keyed(veer.addr, 300).await;
    // Two judge ticks: every event is in the tests.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = veer.status().await["routes"][0]["evidence"]["e_errors"]
        .as_f64()
        .unwrap();
    assert!(before > 100.0, "{before}");

    veer.terminate();
    assert!(veer.wait_exit(Duration::from_secs(10)).await.success());
    let dir = std::mem::replace(&mut veer.dir, tempfile::tempdir().unwrap());
    let restarted = Veer::start_in(dir, veer.config.clone()).await;
    let after = restarted.status().await["routes"][0]["evidence"]["e_errors"]
        .as_f64()
        .unwrap();
    assert!(
        (after - before).abs() <= before * 0.01,
        "{before} -> {after}"
    );
    assert_eq!(
        restarted
            .logs_with("judge resumes its evidence about this canary")
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn little_traffic_is_insufficient_data_never_a_revert() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.status.store(500, Ordering::SeqCst);
    let config = route_config(&[s.addr], &[c.addr], 20.0, "")
        + &JUDGE.replace("min_requests = 20", "min_requests = 500");
    let veer = Veer::start(&config).await;
    // One canary user, two failing requests: not a burst, not a test result.
    let mut client = Client::connect(veer.addr).await.unwrap();
    let mut sent = 0;
    for i in 0..200 {
        let key = format!("few-{i}");
        let r = client.get("/", &[("x-user-id", &key)]).await.unwrap();
        if r.headers()["x-upstream"] == "canary" {
            sent += 1;
            if sent == 2 {
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let route = veer.status().await["routes"][0].clone();
    assert_eq!(route["verdict"], "insufficient_data", "{route}");
    assert_eq!(route["weight"]["effective"], 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_need_the_token_and_persist() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let config = route_config(&[s.addr], &[c.addr], 30.0, "")
        .replace("[admin]\n", "[admin]\ntoken_file = \"admin.token\"\n");
    let dir = tempfile::tempdir().unwrap();
    super::support::write_with_mode(&dir.path().join("admin.token"), "s3cret\n", 0o600);
    let path = dir.path().join("veer.toml");
    std::fs::write(
        &path,
        config.replace("@STATE@", &dir.path().join("state").display().to_string()),
    )
    .unwrap();
    let veer = Veer::start_in(dir, path).await;

    let post = |path: &'static str, token: Option<&'static str>| {
        let admin = veer.admin;
        async move {
            let stream = tokio::net::TcpStream::connect(admin).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut req = http::Request::post(path).header("host", "admin");
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let resp = sender
                .send_request(
                    req.body(http_body_util::Empty::<bytes::Bytes>::new())
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = resp.status();
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            (
                status,
                serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default(),
            )
        }
    };
    assert_eq!(post("/routes/web/revert", None).await.0, 401);
    assert_eq!(post("/routes/web/revert", Some("wrong")).await.0, 401);
    assert_eq!(
        veer.status().await["routes"][0]["weight"]["effective"],
        30.0
    );
    assert_eq!(post("/routes/nope/revert", Some("s3cret")).await.0, 404);
    assert_eq!(post("/routes/web/explode", Some("s3cret")).await.0, 404);

    let (status, body) = post("/routes/web/revert", Some("s3cret")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["verdict"], "reverted");
    assert_eq!(body["weight"]["effective"], 0.0);
    all_on(&veer, "stable", 100).await;
    let saved = std::fs::read_to_string(veer.dir.path().join("state/state.json")).unwrap();
    assert!(saved.contains("\"operator\""), "{saved}");
    assert_eq!(
        post("/routes/web/promote", Some("s3cret")).await.0,
        409,
        "a reverted canary must be reset before promotion"
    );

    let (status, body) = post("/routes/web/reset", Some("s3cret")).await;
    assert_eq!(status, 200);
    assert_eq!(body["weight"]["effective"], 30.0);
    let (_, body) = post("/routes/web/pause", Some("s3cret")).await;
    assert_eq!(body["paused"], true);
    let (_, body) = post("/routes/web/resume", Some("s3cret")).await;
    assert_eq!(body["paused"], false);
    let (status, body) = post("/routes/web/promote", Some("s3cret")).await;
    assert_eq!(status, 200);
    assert_eq!(body["weight"]["effective"], 100.0);
    all_on(&veer, "canary", 100).await;
    assert_eq!(veer.logs_with("operator action").len(), 5);
    assert_eq!(
        get(veer.admin, "/routes/web/revert", &[])
            .await
            .unwrap()
            .status(),
        405
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_walks_its_steps_while_healthy() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let config = route_config(&[s.addr], &[c.addr], 1.0, "")
        + JUDGE
        + "[route.rollout]\nsteps = [10, 50, 100]\nhold = \"1s\"\n";
    let veer = Veer::start(&config).await;
    let load = Load::start(veer.addr, 3, Duration::from_millis(1));
    let start = Instant::now();
    loop {
        let route = veer.status().await["routes"][0].clone();
        if route["weight"]["effective"] == 100.0 {
            assert_eq!(route["rollout"]["step"], 2);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "rollout stuck: {route}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.stop().await;
    assert_eq!(veer.logs_with("rollout advanced").len(), 2);
}

fn blue_green(stable: std::net::SocketAddr, canary: std::net::SocketAddr, weight: f64) -> String {
    route_config(&[stable], &[canary], weight, "strategy = \"blue-green\"") + JUDGE
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_flip_to_a_worse_colour_flips_back_by_itself() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.fail_one_in.store(10, Ordering::SeqCst);
    let veer = Veer::start(&blue_green(s.addr, c.addr, 0.0)).await;
    let load = Load::start(veer.addr, 3, Duration::from_millis(1));
    // Let the judge see the old colour for a few seconds, then flip.
    tokio::time::sleep(Duration::from_secs(3)).await;
    veer.write_config(&blue_green(s.addr, c.addr, 100.0));
    veer.wait_generation(2).await;
    let route = wait_verdict(&veer, "reverted", Duration::from_secs(15)).await;
    load.stop().await;
    assert_eq!(
        route["reverted"]["guard"], "bluegreen_error_test",
        "{route}"
    );
    assert_eq!(route["weight"]["effective"], 0.0);
    all_on(&veer, "stable", 100).await;
    assert_eq!(
        veer.logs_with("blue-green flip: judging the new colour against the old one's last window")
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_flip_to_a_good_colour_holds_and_flips_back_on_request() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    // Identical colours, with a service time that dwarfs loopback noise on
    // a busy machine (with 3 ms, a CPU hog alone moved the new colour's
    // share over 1.5x the old p99 from 0.14 % to 1.1 %: the watch compares
    // with the past, and cannot tell that drift from a regression).
    s.delay_ms.store(20, Ordering::SeqCst);
    c.delay_ms.store(20, Ordering::SeqCst);
    let veer = Veer::start(&blue_green(s.addr, c.addr, 0.0)).await;
    let load = Load::start(veer.addr, 6, Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(3)).await;
    veer.write_config(&blue_green(s.addr, c.addr, 100.0));
    veer.wait_generation(2).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let route = veer.status().await["routes"][0].clone();
    assert_eq!(route["verdict"], "healthy", "{route}");
    all_on(&veer, "canary", 100).await;
    veer.write_config(&blue_green(s.addr, c.addr, 0.0));
    veer.wait_generation(3).await;
    load.stop().await;
    all_on(&veer, "stable", 100).await;
}

/// Collects the JSON bodies POSTed to it.
async fn webhook_receiver() -> (
    std::net::SocketAddr,
    Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    webhook_receiver_with(None).await
}

/// Collects the JSON events POSTed to it, over TLS when `tls` is given.
async fn webhook_receiver_with(
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (
    std::net::SocketAddr,
    Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let events: Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Arc::default();
    let sink = events.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let sink = sink.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let sink = sink.clone();
                        async move {
                            let body = http_body_util::BodyExt::collect(req.into_body())
                                .await
                                .unwrap()
                                .to_bytes();
                            sink.lock()
                                .unwrap()
                                .push(serde_json::from_slice(&body).unwrap_or_default());
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::new()),
                            ))
                        }
                    });
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                    }
                    None => {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                    }
                }
            });
        }
    });
    (addr, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_webhook_gets_events_only_from_a_verified_server() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.key_pair.serialize_der()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let (hook, events) = webhook_receiver_with(Some(acceptor)).await;
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = ca_dir.path().join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    // Another CA: the same server must then be refused.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let wrong = ca_dir.path().join("wrong.pem");
    std::fs::write(&wrong, other.cert.pem()).unwrap();

    for (ca_file, trusted) in [(&wrong, false), (&ca, true)] {
        let s = Upstream::start("stable").await;
        let c = Upstream::start("canary").await;
        c.status.store(500, Ordering::SeqCst);
        let before = events.lock().unwrap().len();
        let config = route_config(&[s.addr], &[c.addr], 20.0, "")
            + JUDGE
            + &format!(
                "webhook = \"https://{hook}/veer-events\"\nwebhook_ca_file = \"{}\"\n",
                ca_file.display()
            );
        let veer = Veer::start(&config).await;
        let load = Load::start(veer.addr, 4, Duration::ZERO);
        wait_verdict(&veer, "reverted", Duration::from_secs(10)).await;
        load.stop().await;
        let result = if trusted { "ok" } else { "failed" };
        let start = Instant::now();
        let m = loop {
            let m = veer.metrics().await;
            if metric(
                &m,
                &format!("veer_webhook_events_total{{result=\"{result}\"}}"),
            ) >= Some(1.0)
            {
                break m;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{m}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let got = events.lock().unwrap().len() - before;
        if trusted {
            assert!(got >= 1, "{m}");
        } else {
            assert_eq!(got, 0, "an unverified server got events");
            assert!(!veer.logs_with("webhook delivery failed").is_empty());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_is_announced_on_the_webhook() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.status.store(500, Ordering::SeqCst);
    let (hook, events) = webhook_receiver().await;
    let config = route_config(&[s.addr], &[c.addr], 20.0, "")
        + JUDGE
        + &format!("webhook = \"http://{hook}/veer-events\"\n");
    let veer = Veer::start(&config).await;
    let load = Load::start(veer.addr, 4, Duration::ZERO);
    wait_verdict(&veer, "reverted", Duration::from_secs(10)).await;
    load.stop().await;
    let start = Instant::now();
    loop {
        let got = events.lock().unwrap().clone();
        let reverted = got.iter().find(|e| e["event"] == "reverted");
        let verdict = got
            .iter()
            .find(|e| e["event"] == "verdict_changed" && e["to"] == "reverted");
        if let (Some(r), Some(v)) = (reverted, verdict) {
            assert_eq!(r["route"], "web");
            assert_eq!(r["canary"], "v2");
            assert_eq!(r["effective_weight"], 0.0);
            assert!(r["reason"].as_str().unwrap().contains("canary"), "{r}");
            assert_ne!(v["from"], "reverted");
            assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "events: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = veer.metrics().await;
    assert!(
        metric(&m, r#"veer_webhook_events_total{result="ok"}"#) >= Some(2.0),
        "{m}"
    );
}
