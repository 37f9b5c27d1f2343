//! A client that mints its own sticky keys cannot revert a healthy canary
//! where the route's clients are many; a canary that fails its users still
//! is reverted there.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::support::{reference_judge, route_config, wait_route, Client, Upstream, Veer};

/// Users from `addresses` distinct addresses (127.0.9.1, ...), each one
/// connection and `per` requests with keys of its own; returns how many
/// answers were 5xx.
async fn users(addr: SocketAddr, addresses: u8, per: usize, tag: &str) -> usize {
    users_on(addr, addresses, per, tag, "/").await
}

/// [`users`], asking for `path`; a tag starting with `caller` sends no
/// key (the route then keys by the client's address).
async fn users_on(addr: SocketAddr, addresses: u8, per: usize, tag: &str, path: &str) -> usize {
    let mut tasks = Vec::new();
    for a in 1..=addresses {
        let (tag, path) = (tag.to_string(), path.to_string());
        tasks.push(tokio::spawn(async move {
            let source = IpAddr::V4(Ipv4Addr::new(127, 0, 9, a));
            let mut c = Client::connect_from(addr, source).await.unwrap();
            let mut failed = 0;
            for i in 0..per {
                let key = format!("{tag}-{a}-{i}");
                let headers = [("x-user-id", key.as_str())];
                let headers = if tag.starts_with("caller") {
                    &headers[..0]
                } else {
                    &headers[..]
                };
                let r = c.get(&path, headers).await.unwrap();
                failed += usize::from(r.status().is_server_error());
            }
            failed
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += t.await.unwrap();
    }
    failed
}

/// Users from 100 addresses: past min_requests, and more than the 64
/// distinct addresses from which an address has one vote; waits for a
/// healthy verdict with one vote per client.
async fn many_users(veer: &Veer) {
    assert_eq!(users(veer.addr, 100, 8, "user").await, 0);
    wait_route(
        veer,
        "healthy, one vote per client",
        Duration::from_secs(30),
        |r| r["verdict"] == "healthy" && r["evidence"]["one_vote_per_client"] == true,
    )
    .await;
}

async fn start(weight: f64) -> (Veer, std::sync::Arc<Upstream>, std::sync::Arc<Upstream>) {
    let (v1, v2) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let config = route_config(&[v1.addr], &[v2.addr], weight, "") + &reference_judge();
    (Veer::start(&config).await, v1, v2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_minting_sticky_keys_cannot_revert_a_healthy_canary() {
    let (veer, _v1, _v2) = start(10.0).await;
    let route = veer.status().await["routes"][0].clone();
    assert_eq!(route["evidence"]["one_vote_per_client"], false, "{route}");
    assert!(route["evidence"]["address_rounds"].is_null(), "{route}");
    many_users(&veer).await;

    // The attacker, from one address: probe fresh keys with harmless
    // requests, keep those the canary answers, send each a request that
    // fails on every version (a path under /fail answers 500 on both).
    let attacker = IpAddr::V4(Ipv4Addr::new(127, 0, 8, 1));
    let mut c = Client::connect_from(veer.addr, attacker).await.unwrap();
    let mut poisoned = 0;
    for i in 0..2_000 {
        let key = format!("mint-{i}");
        let r = c.get("/", &[("x-user-id", &key)]).await.unwrap();
        if r.headers()["x-upstream"] == "v2" {
            let r = c.get("/fail", &[("x-user-id", &key)]).await.unwrap();
            assert_eq!(r.status(), 500);
            poisoned += 1;
            if poisoned == 30 {
                break;
            }
        }
    }
    let route = veer.status().await["routes"][0].clone();
    assert!(
        route["reverted"].is_null(),
        "reverted after {poisoned} chosen-key failures: {route}"
    );
    assert_eq!(poisoned, 30, "the canary answered 30 of 2000 keys");

    // Six times the five such failures that reverted it before: the judge
    // looks every 100 ms and ticks every second; give it three ticks.
    let until = Instant::now() + Duration::from_secs(3);
    let mut route = veer.status().await["routes"][0].clone();
    while Instant::now() < until {
        route = veer.status().await["routes"][0].clone();
        assert!(route["reverted"].is_null(), "reverted: {route}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(route["verdict"], "healthy", "{route}");
    // One vote: the attacker's address counted once, whatever its keys.
    assert_eq!(route["evidence"]["error_events"]["canary"], 1, "{route}");
    // /status shows the round of address votes it went into: half of the
    // 101 addresses (a filter counts them, so one may be missed).
    let rounds = &route["evidence"]["address_rounds"];
    assert_eq!(rounds["errors"], 1, "{route}");
    assert!(
        (49..=50).contains(&rounds["size"].as_u64().unwrap_or(0)),
        "{route}"
    );
    assert_eq!(rounds["slow"].as_array().map(Vec::len), Some(2), "{route}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_reverted_when_its_users_come_from_many_addresses() {
    let (veer, _v1, v2) = start(10.0).await;
    assert_eq!(users(veer.addr, 100, 8, "warm").await, 0);
    wait_route(&veer, "healthy", Duration::from_secs(30), |r| {
        r["verdict"] == "healthy"
    })
    .await;
    v2.status.store(500, std::sync::atomic::Ordering::SeqCst);
    // Each address's users fail on the canary: one vote per address.
    let failed = users(veer.addr, 100, 6, "after").await;
    assert!(failed > 0, "the canary got none of 600 users");
    let route = wait_route(&veer, "reverted", Duration::from_secs(30), |r| {
        !r["reverted"].is_null()
    })
    .await;
    assert_eq!(route["weight"]["effective"], 0.0, "{route}");
}

/// A sidecar whose callers are a hundred pods: every address soon spends
/// its vote on failures both versions share (stable's own errors, an
/// outage of a dependency). A canary that regresses after that must still
/// be reverted: an address votes again once half of the route's recent
/// addresses have voted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_regresses_after_every_address_voted_is_still_reverted() {
    let (veer, _v1, v2) = start(10.0).await;
    many_users(&veer).await;
    shared_failure(&veer, "", 50).await;
    // Now the canary fails one request in four (below the failure-burst
    // guard's half): the same addresses' users must count again.
    v2.fail_one_in.store(4, std::sync::atomic::Ordering::SeqCst);
    until_reverted(&veer, "").await;
}

/// A failure both versions share, once for every address's user (`tag`
/// prefixes the users' tags); waits for `events` error events, no revert.
async fn shared_failure(veer: &Veer, tag: &str, events: u64) {
    let failed = users_on(veer.addr, 100, 1, &format!("{tag}shared"), "/fail").await;
    assert_eq!(failed, 100);
    users(veer.addr, 100, 4, &format!("{tag}calm")).await;
    let route = wait_route(
        veer,
        "the shared failures judged",
        Duration::from_secs(30),
        |r| {
            let e = &r["evidence"]["error_events"];
            e["canary"].as_u64().unwrap_or(0) + e["stable"].as_u64().unwrap_or(0) >= events
        },
    )
    .await;
    assert!(route["reverted"].is_null(), "{route}");
}

/// Rounds of users from 100 addresses until the canary is reverted (60 s
/// at most); the route then.
async fn until_reverted(veer: &Veer, tag: &str) -> serde_json::Value {
    until_reverted_within(veer, tag, Duration::from_secs(60)).await
}

/// [`until_reverted`], `limit` at most.
async fn until_reverted_within(veer: &Veer, tag: &str, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    let mut round = 0;
    loop {
        round += 1;
        users(veer.addr, 100, 4, &format!("{tag}after{round}")).await;
        let route = veer.status().await["routes"][0].clone();
        if !route["reverted"].is_null() {
            assert_eq!(route["weight"]["effective"], 0.0, "{route}");
            return route;
        }
        assert!(
            Instant::now() < deadline,
            "not reverted after {round} rounds: {route}"
        );
    }
}

/// The route below, keyed by 100 callers' addresses, healthy, after one
/// failure of each caller that both versions share.
async fn few_callers_each_failed_once() -> (Veer, std::sync::Arc<Upstream>, std::sync::Arc<Upstream>)
{
    let (veer, v1, v2) = start(10.0).await;
    assert_eq!(users(veer.addr, 100, 8, "caller-warm").await, 0);
    wait_route(&veer, "healthy", Duration::from_secs(30), |r| {
        r["verdict"] == "healthy"
    })
    .await;
    shared_failure(&veer, "caller-", 90).await;
    (veer, v1, v2)
}

/// A route keyed by its callers' addresses (no header: `client-ip`), a
/// hundred of them: about ten on the canary. Once each caller has had an
/// error, the tests count nothing of theirs (a key votes once), and the
/// canary never has the 20 users a span needs for the usual burst floor.
/// A canary that fails every caller it has is still reverted: every one
/// of its users in the span failed, and stable did not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_all_of_a_few_callers_is_reverted_after_each_had_an_error() {
    let (veer, _v1, v2) = few_callers_each_failed_once().await;
    v2.status.store(500, std::sync::atomic::Ordering::SeqCst);
    let route = until_reverted(&veer, "caller-").await;
    assert_eq!(route["reverted"]["guard"], "failure_burst", "{route}");
}

/// The same route, the canary failing a quarter of its requests (below
/// the burst guard's half): once each caller has had an error, only key
/// rounds count their errors again. The round ends once its votes are
/// spent (the canary's callers failing again and again), and in the next
/// one the canary's callers are the ones failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_a_quarter_of_a_few_callers_is_reverted_after_each_had_an_error() {
    let (veer, _v1, v2) = few_callers_each_failed_once().await;
    v2.fail_one_in.store(4, std::sync::atomic::Ordering::SeqCst);
    let route = until_reverted(&veer, "caller-").await;
    let reason = route["reverted"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("key round"), "{route}");
    assert!(
        ["error_rate_ratio", "max_error_rate"]
            .contains(&route["reverted"]["guard"].as_str().unwrap_or_default()),
        "{route}"
    );
}

/// The same route, slow instead of failing. Each caller first has one
/// slow request that both versions share (a slow dependency), which
/// spends its vote in the latency ratio test; the canary then makes a
/// quarter of its requests far slower than stable's p99 allows. Only key
/// rounds count the callers' slow requests again, as they do errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_slow_on_a_quarter_of_a_few_callers_requests_is_reverted_after_each_was_slow() {
    use std::sync::atomic::Ordering::SeqCst;
    let (veer, v1, v2) = start(10.0).await;
    for u in [&v1, &v2] {
        u.slow_ms.store(150, SeqCst);
    }
    let latency_test = |r: &serde_json::Value| {
        r["evidence"]["tests"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["guard"] == "latency_ratio"))
            .cloned()
            .unwrap_or_default()
    };
    // Past the canary's warm-up (the latency tests count nothing in it),
    // with stable's threshold known; the callers keep coming meanwhile.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut warm = 0;
    loop {
        warm += 1;
        assert_eq!(
            users(veer.addr, 100, 2, &format!("caller-warm{warm}")).await,
            0
        );
        let route = veer.status().await["routes"][0].clone();
        let t = latency_test(&route);
        if t["warming_up"] == false && t["thresholds_ms"][0].is_number() {
            break;
        }
        assert!(Instant::now() < deadline, "still warming up: {route}");
    }
    users_on(veer.addr, 100, 1, "caller-shared", "/slow").await;
    users(veer.addr, 100, 2, "caller-calm").await;
    let route = wait_route(
        &veer,
        "the shared slow requests judged",
        Duration::from_secs(30),
        |r| {
            let e = &r["evidence"]["slow_events"];
            e["canary"].as_u64().unwrap_or(0) + e["stable"].as_u64().unwrap_or(0) >= 80
        },
    )
    .await;
    assert!(route["reverted"].is_null(), "{route}");
    // A quarter of the canary's requests 600 ms slower: over 1.3x stable's
    // p99 (150 ms at most, while the shared slow requests are in its
    // window).
    v2.slow_ms.store(600, SeqCst);
    v2.slow_one_in.store(4, SeqCst);
    // About ten canary callers give a round at most ten votes, and a round
    // lasts 10 s or more: rounds 2 and 3 took 17-36 s in three runs beside
    // a loaded CPU; allow twice the usual time.
    let route = until_reverted_within(&veer, "caller-", Duration::from_secs(120)).await;
    let reason = route["reverted"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("key round"), "{route}");
    assert_eq!(route["reverted"]["guard"], "latency_ratio", "{route}");
}
