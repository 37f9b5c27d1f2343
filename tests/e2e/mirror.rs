//! Mirroring (`[route.mirror]`) through the real binary: copies carry the
//! shadow header, are chosen per key and take bodies up to `max_body`; a
//! failing shadow is reverted within seconds while clients see no error,
//! an identical one is not; a slow canary delays no client and its copies
//! stay under their cap.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;

use super::support::{
    metric, reference_judge, route_config, wait_route, Client, Upstream, Veer, FAST_JUDGE,
};

/// A weight-0 canary mirrored at `percent`, with `judge` and `extra`.
fn mirrored(s: &Upstream, c: &Upstream, percent: f64, judge: &str, extra: &str) -> String {
    route_config(&[s.addr], &[c.addr], 0.0, "")
        + judge
        + &format!("[route.mirror]\npercent = {percent}\n{extra}")
}

/// Polls `f` until it holds (panics naming `what` after `limit`).
async fn until(what: &str, limit: Duration, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "never {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `n` GETs with keys `{prefix}{i}`; every answer must be stable's 200.
async fn send_all(veer: &Veer, prefix: &str, n: usize) {
    let mut c = Client::connect(veer.addr).await.unwrap();
    for i in 0..n {
        let key = format!("{prefix}{i}");
        let r = c.get("/", &[("x-user-id", &key)]).await.unwrap();
        assert_eq!(r.status(), 200, "{key}");
        assert_eq!(r.headers()["x-upstream"], "stable", "{key}");
    }
}

/// Sends 50 keyed requests at a time (keys `{prefix}{n}-{i}`) until the
/// route's canary is reverted: its status, the requests sent, how long.
async fn until_reverted(
    veer: &Veer,
    prefix: &str,
    limit: Duration,
) -> (serde_json::Value, usize, Duration) {
    let start = Instant::now();
    let mut sent = 0;
    loop {
        send_all(veer, &format!("{prefix}{sent}-"), 50).await;
        sent += 50;
        let route = veer.status().await["routes"][0].clone();
        if !route["reverted"].is_null() {
            return (route, sent, start.elapsed());
        }
        assert!(
            start.elapsed() < limit,
            "never reverted: {route}\n{}",
            veer.all_logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_carry_the_header_are_chosen_per_key_and_take_bodies_up_to_max_body() {
    let s = Upstream::start_apart("stable").await;
    let c = Upstream::start_apart("canary").await;
    // The cap on copies in flight is not what this test is about (see
    // `a_slow_canary_delays_no_client_and_its_copies_stay_under_the_cap`): on a
    // busy machine a hundred copies can be in flight behind a stalled
    // runtime, and a skipped copy would look like a key copied 5 times.
    //
    // config.example.toml's judge (p99 within 1.3x stable's), looking every
    // 200 ms and with no warm-up, so that its paired tests run while the
    // copies go and must leave this identical canary alone. Not the
    // defaults (p50 and p99 within 1x stable's): with this test's client,
    // veer and both upstreams sharing two busy cores beside other tests, a
    // copy written right after stable's request waits in the tail behind
    // the work stable's answer sets off (veer relaying it, the client
    // reading it), ~0.8 ms that no copy written first makes stable wait;
    // a 1x limit read that as a slower canary (17 pairs to 1 in CI; 50 to
    // 17 over 8 runs with the upstreams on a runtime apart from the
    // client). See the README's mirroring section.
    let judge = reference_judge()
        .replace("interval = \"1s\"", "interval = \"200ms\"")
        .replace("warmup = \"30s\"", "warmup = \"0s\"");
    assert!(judge.contains("warmup = \"0s\""), "{judge}");
    let veer = Veer::start(&mirrored(
        &s,
        &c,
        25.0,
        &judge,
        "max_body = 4096\nmax_concurrent = 10000\n",
    ))
    .await;
    send_all(&veer, "key-", 2000).await;
    // About a quarter of the keys are copied (binomial sd ≈ 19 of 2000).
    let start = Instant::now();
    while !(400..=600).contains(&c.requests.load(Ordering::SeqCst)) {
        if start.elapsed() > Duration::from_secs(10) {
            let m = veer.metrics().await;
            let mirror: Vec<&str> = m.lines().filter(|l| l.starts_with("veer_mirror")).collect();
            panic!(
                "never copies settled: {} copies\n{mirror:#?}\n{}",
                c.requests.load(Ordering::SeqCst),
                veer.all_logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let copied = c.requests.load(Ordering::SeqCst);
    let shadow = c.last_headers.lock().unwrap().get("x-veer-shadow").cloned();
    assert_eq!(shadow.as_ref().map(|v| v.as_bytes()), Some(&b"1"[..]));
    assert!(
        !s.last_headers.lock().unwrap().contains_key("x-veer-shadow"),
        "stable's requests are not marked"
    );
    // A key is copied always or never: 5 more requests for 100 keys, and
    // every key ends with all 6 of its requests copied or none.
    for _ in 0..5 {
        send_all(&veer, "key-", 100).await;
    }
    let copies = |i: usize| {
        c.keys
            .lock()
            .unwrap()
            .get(&format!("key-{i}"))
            .copied()
            .unwrap_or(0)
    };
    let start = Instant::now();
    while !(0..100).all(|i| copies(i) == 0 || copies(i) == 6) {
        if start.elapsed() > Duration::from_secs(10) {
            let m = veer.metrics().await;
            let mirror: Vec<&str> = m.lines().filter(|l| l.starts_with("veer_mirror")).collect();
            let odd: Vec<(usize, u64)> = (0..100)
                .map(|i| (i, copies(i)))
                .filter(|(_, n)| *n != 0 && *n != 6)
                .collect();
            panic!("never every key copied 0 or 6 times: {odd:?}\n{mirror:#?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let always = (0..100).filter(|i| copies(*i) == 6).count();
    assert!((5..=50).contains(&always), "{always} of 100 keys copied");
    assert!(copied >= always as u64);

    // Bodies: find a copied key, then send it a small and a large body.
    let mut client = Client::connect(veer.addr).await.unwrap();
    let mut key = None;
    for i in 0..200 {
        let k = format!("body-{i}");
        let before = c.requests.load(Ordering::SeqCst);
        client.get("/", &[("x-user-id", &k)]).await.unwrap();
        let start = Instant::now();
        while c.requests.load(Ordering::SeqCst) == before
            && start.elapsed() < Duration::from_millis(300)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if c.requests.load(Ordering::SeqCst) > before {
            key = Some(k);
            break;
        }
    }
    let key = key.expect("a copied key among 200");
    let small = Bytes::from(vec![b'a'; 1000]);
    let bytes_before = c.body_bytes.load(Ordering::SeqCst);
    let r = client
        .send(Method::POST, "/", &[("x-user-id", &key)], small.clone())
        .await
        .unwrap();
    assert_eq!((r.status().as_u16(), r.body().len()), (200, 1000));
    until("the small body copied", Duration::from_secs(10), || {
        c.body_bytes.load(Ordering::SeqCst) == bytes_before + 1000
    })
    .await;
    let large = Bytes::from(vec![b'b'; 10_000]);
    let r = client
        .send(Method::POST, "/", &[("x-user-id", &key)], large)
        .await
        .unwrap();
    assert_eq!((r.status().as_u16(), r.body().len()), (200, 10_000));
    let m = veer.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"veer_mirror_requests_total{result="too_large",route="web"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(c.body_bytes.load(Ordering::SeqCst), bytes_before + 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_shadow_is_reverted_within_seconds_while_clients_see_no_error() {
    let s = Upstream::start_apart("stable").await;
    let c = Upstream::start_apart("canary").await;
    c.fail_one_in.store(2, Ordering::SeqCst);
    // The judge of config.example.toml as it is (1 s interval): the look
    // between ticks acts on the pairs.
    let veer = Veer::start(&mirrored(&s, &c, 100.0, &reference_judge(), "")).await;
    let (route, sent, took) = until_reverted(&veer, "r", Duration::from_secs(30)).await;
    assert_eq!(route["reverted"]["guard"], "mirror_error_test", "{route}");
    let route = wait_route(&veer, "mirroring stopped", Duration::from_secs(5), |r| {
        r["mirror"]["active"] == false
    })
    .await;
    assert_eq!(route["mirror"]["percent"], 100.0, "{route}");
    assert!(
        route["reverted"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("mirrored requests"),
        "{route}"
    );
    eprintln!("failing shadow reverted after {took:?} and {sent} requests");
    // The revert stops the mirroring: no request sent after it is copied
    // (copies chosen before it may still be on their way: other keys).
    send_all(&veer, "after-", 200).await;
    // Were copies still made, most of the 200 would have reached the
    // canary by now (each is sent alongside stable's exchange).
    let copied_after = c
        .keys
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("after-"))
        .count();
    assert_eq!(copied_after, 0);
    let m = veer.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"veer_reverts_total{reason="mirror_error_test",route="web"}"#
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_shadow_is_judged_healthy_and_never_reverted() {
    let s = Upstream::start_apart("stable").await;
    let c = Upstream::start_apart("canary").await;
    // Both fail the same requests: a path both versions get wrong.
    let judge = reference_judge().replace("interval = \"1s\"", "interval = \"200ms\"");
    let veer = Veer::start(&mirrored(&s, &c, 100.0, &judge, "")).await;
    let mut client = Client::connect(veer.addr).await.unwrap();
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(12) {
        i += 1;
        let path = if i % 10 == 0 { "/fail" } else { "/" };
        let key = format!("aa-{}", i % 300);
        let r = client.get(path, &[("x-user-id", &key)]).await.unwrap();
        assert_eq!(r.headers()["x-upstream"], "stable");
    }
    let route = wait_route(
        &veer,
        "healthy on its pairs",
        Duration::from_secs(10),
        |r| r["verdict"] == "healthy",
    )
    .await;
    assert!(route["reverted"].is_null(), "{route}");
    assert!(
        route["reason"]
            .as_str()
            .unwrap_or("")
            .contains("mirrored pairs"),
        "{route}"
    );
    assert_eq!(route["mirror"]["active"], true, "{route}");
    assert!(
        route["mirror"]["pairs_in_window"].as_u64() > Some(100),
        "{route}"
    );
    // The paired twins of the limit tests are in the evidence.
    let tests = route["evidence"]["tests"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        tests.iter().any(|t| t["guard"] == "mirror_error_test"),
        "{route}"
    );
    // Stable's failures were not the canary's (they failed on both).
    let m = veer.metrics().await;
    let errors = metric(
        &m,
        r#"veer_mirror_requests_total{result="error",route="web"}"#,
    );
    assert!(errors.unwrap_or(0.0) > 0.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_canary_delays_no_client_and_its_copies_stay_under_the_cap() {
    let s = Upstream::start_apart("stable").await;
    let c = Upstream::start_apart("canary").await;
    c.delay_ms.store(500, Ordering::SeqCst);
    let judge = FAST_JUDGE.to_string() + "mode = \"observe\"\n";
    let veer = Veer::start(&mirrored(&s, &c, 100.0, &judge, "max_concurrent = 4\n")).await;
    // 40 requests one after another: waiting for each copy would take at
    // least 40 × 500 ms = 20 s.
    let start = Instant::now();
    send_all(&veer, "slow-", 40).await;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
    let m = veer.metrics().await;
    let busy = metric(
        &m,
        r#"veer_mirror_requests_total{result="busy",route="web"}"#,
    );
    // Each of the 4 slots frees at most once per 500 ms: every other
    // request found them busy (however slow this machine is today).
    let rounds = 1 + took.as_millis() / 500;
    let at_most_copied = (4 * rounds) as f64;
    assert!(
        busy.unwrap_or(0.0) >= 40.0 - at_most_copied,
        "{took:?}: {m}"
    );
    assert!(
        c.connections.load(Ordering::SeqCst) <= 4,
        "{}",
        c.connections.load(Ordering::SeqCst)
    );
    // The copies in flight finish and are answered (counted ok).
    until("copies answered", Duration::from_secs(10), || {
        c.requests.load(Ordering::SeqCst) >= 4
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_reach_the_canary_beside_stables_request_not_after_it() {
    let s = Upstream::start_apart("stable").await;
    let c = Upstream::start_apart("canary").await;
    let judge = FAST_JUDGE.to_string() + "mode = \"observe\"\n";
    let veer = Veer::start(&mirrored(&s, &c, 100.0, &judge, "")).await;
    // One request per key, one after another: every copy but the first
    // finds an idle connection to the canary.
    send_all(&veer, "order-", 400).await;
    let seen = |u: &Upstream| u.first_seen.lock().unwrap().clone();
    let start = Instant::now();
    while seen(&c).len() < 400 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} copies",
            seen(&c).len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (stable, canary) = (seen(&s), seen(&c));
    let first = (0..400)
        .filter(|i| {
            let k = format!("order-{i}");
            canary[&k] < stable[&k]
        })
        .count();
    // Written from the client's task just before or just after stable's
    // request (a coin flip, see `mirror::start`), a copy reaches its
    // server about when stable's request reaches stable's: which of the
    // two test servers sees its request first is then the servers' own
    // scheduling, and does not show the coin (measured on an idle
    // machine: 277-308 of 400 copies first with the coin, 252-300 with
    // every copy written first, 318-324 with every copy written second).
    // What it does show is the flaw this guards against: sent from their
    // own task after stable's request, as copies were before, 57 of 400
    // came first (beside a CI run).
    eprintln!("{first} of 400 copies came first");
    assert!(first >= 100, "{first} of 400 copies came first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_slower_than_stable_is_reverted_by_its_pairs_latency() {
    let s = Upstream::start_apart("stable").await;
    let c = Upstream::start_apart("canary").await;
    // 30 ms on every copy: the next request comes before a copy's
    // connection is free, so copies go from their own task on connections
    // of their own (timed from their own send, see
    // `mirror::as_if_sent_with_stable`) until the canary's pool holds a
    // connection per copy in flight.
    c.delay_ms.store(30, Ordering::SeqCst);
    // config.example.toml's judge, looking every 200 ms and with a 3 s
    // warm-up instead of 30 s (the latency tests wait it out).
    let judge = reference_judge()
        .replace("interval = \"1s\"", "interval = \"200ms\"")
        .replace("warmup = \"30s\"", "warmup = \"3s\"");
    assert!(judge.contains("warmup = \"3s\""), "{judge}");
    let veer = Veer::start(&mirrored(&s, &c, 100.0, &judge, "")).await;
    let (route, sent, took) = until_reverted(&veer, "slow", Duration::from_secs(60)).await;
    assert_eq!(route["reverted"]["guard"], "mirror_latency_test", "{route}");
    eprintln!("slow shadow reverted after {took:?} and {sent} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_carry_the_routes_rewritten_path_and_header_fields() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let config = route_config(
        &[s.addr],
        &[c.addr],
        0.0,
        "path_prefix = \"/api\"\nrewrite_prefix = \"/\"\n",
    ) + "[route.judge]\nmode = \"observe\"\n[route.mirror]\npercent = 100\n"
        + "[route.request_headers]\nset = { x-env = \"prod\" }\nremove = [\"x-debug\"]\n";
    let veer = Veer::start(&config).await;
    let mut client = Client::connect(veer.addr).await.unwrap();
    let r = client
        .get(
            "/api/items?page=3",
            &[("x-user-id", "u-1"), ("x-debug", "1")],
        )
        .await
        .unwrap();
    assert_eq!(r.headers()["x-upstream"], "stable");
    until("the copy came", Duration::from_secs(20), || {
        c.requests.load(Ordering::SeqCst) == 1
    })
    .await;
    for (who, u) in [("stable", &s), ("copy", &c)] {
        assert_eq!(*u.last_uri.lock().unwrap(), "/items?page=3", "{who}");
        let h = u.last_headers.lock().unwrap();
        assert_eq!(h["x-env"], "prod", "{who}");
        assert!(!h.contains_key("x-debug"), "{who}");
    }
}

/// A copy of an HTTP/1.0 request without a `Host` (a load balancer's
/// check) goes with its canary endpoint's address as `Host`, as stable's
/// request goes with stable's: it went without one, which servers refuse
/// (Go's net/http answers 400), so a canary looked worse on copies its
/// stable twin passed. On veer's own client and hyper's, with a body and
/// without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_hostless_request_names_its_canary_endpoint() {
    for setting in ["", "upstream_http1 = \"hyper\"\n"] {
        let s = Upstream::start("stable").await;
        let c = Upstream::start("canary").await;
        let config = mirrored(&s, &c, 100.0, "[route.judge]\nmode = \"observe\"\n", "").replacen(
            "[proxy]\n",
            &format!("[proxy]\n{setting}"),
            1,
        );
        let veer = Veer::start(&config).await;
        for (n, old) in [
            &b"GET /check HTTP/1.0\r\nx-user-id: u-1\r\n\r\n"[..],
            b"POST /up HTTP/1.0\r\nx-user-id: u-2\r\ncontent-length: 2\r\n\r\nhi",
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(
                super::hostile::status_of(veer.addr, old).await,
                200,
                "{setting}"
            );
            until("the copy came", Duration::from_secs(20), || {
                c.requests.load(Ordering::SeqCst) == n as u64 + 1
            })
            .await;
            for (who, u) in [("stable", &s), ("copy", &c)] {
                let h = u.last_headers.lock().unwrap();
                assert_eq!(h["host"], u.addr.to_string(), "{setting}{who}");
            }
        }
    }
}
