//! The judge through the real binary: reverts that stick, no revert of a
//! good canary, observe mode, too little data, evidence across restarts.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::support::{
    all_on, metric, reference_judge, route_config, send_keyed, truncating_upstream, wait_route,
    wait_verdict, Client, Load, Upstream, Veer, FAST_JUDGE as JUDGE,
};

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
    assert_eq!(veer.logs_with_at_least("canary reverted", 1).await.len(), 1);

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
            .logs_with_at_least("canary stays reverted (persisted decision)", 1)
            .await
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
    // Nothing may happen for a while: only waiting can show that.
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
    // Nothing may happen for a while: only waiting can show that.
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
    let stable = |st: &serde_json::Value| st["routes"][0]["window"]["stable"]["requests"].as_u64();
    // Every request judged: stable's and the canary's windows hold all 200.
    let judged = all_judged(&veer, 200).await;
    let before = judged["window"]["stable"]["requests"].as_u64().unwrap();
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
    // Every request judged: every event is in the tests.
    let judged = all_judged(&veer, 300).await;
    let before = judged["evidence"]["e_errors"].as_f64().unwrap();
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
            .logs_with_at_least("judge resumes its evidence about this canary", 1)
            .await
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
    // A verdict made with those two failures in the window (before the
    // judge's first tick, `insufficient_data` is only the starting label).
    let route = wait_route(&veer, "the failures judged", Duration::from_secs(5), |r| {
        r["window"]["canary"]["errors"] == 2
    })
    .await;
    assert_eq!(route["verdict"], "insufficient_data", "{route}");
    assert!(
        route["reason"]
            .as_str()
            .is_some_and(|r| r.contains("2 canary") && r.contains("500 each are needed")),
        "{route}"
    );
    assert_eq!(route["weight"]["effective"], 20.0);
    assert!(route["reverted"].is_null(), "{route}");
}

/// Waits until the judge's windows hold all `n` requests sent, and returns
/// the route's status then.
async fn all_judged(veer: &Veer, n: u64) -> serde_json::Value {
    wait_route(
        veer,
        &format!("{n} requests judged"),
        Duration::from_secs(5),
        |r| {
            let w = &r["window"];
            w["stable"]["requests"].as_u64().unwrap_or(0)
                + w["canary"]["requests"].as_u64().unwrap_or(0)
                == n
        },
    )
    .await
}

/// Alerts on `increase(veer_reverts_total[...])` need the 0 before the
/// first revert: every route exports its revert counters from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_counters_exist_at_zero_before_any_revert() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let veer = Veer::start(&(route_config(&[s.addr], &[c.addr], 20.0, "") + JUDGE)).await;
    let m = veer.metrics().await;
    for reason in [
        "error_rate_test",
        "latency_test",
        "failure_burst",
        "operator",
    ] {
        assert_eq!(
            metric(
                &m,
                &format!(r#"veer_reverts_total{{reason="{reason}",route="web"}}"#)
            ),
            Some(0.0),
            "{reason}: {m}"
        );
    }
    assert_eq!(
        metric(&m, r#"veer_webhook_events_total{result="ok"}"#),
        Some(0.0)
    );
}

/// Polls `veer_judge_routes_awake` until `ready` holds of it.
async fn wait_awake(veer: &Veer, what: &str, ready: impl Fn(f64) -> bool) {
    super::support::wait_metric(veer, "veer_judge_routes_awake", what, ready).await;
}

/// With config.example.toml's judge: a hundred routes without traffic
/// sleep (the controller stops visiting them); a failing canary on the one
/// route that gets traffic wakes it and is reverted in seconds, and the
/// idle ones go back to sleep after the revert's new snapshot woke them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_routes_sleep_and_a_failing_canary_beside_them_is_reverted_in_seconds() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.status.store(500, Ordering::SeqCst);
    let judge = reference_judge();
    let mut config = route_config(&[s.addr], &[c.addr], 20.0, "") + &judge;
    for i in 0..100 {
        config += &format!(
            "\n[[route]]\nname = \"idle{i}\"\nhosts = [\"idle{i}.test\"]\n\
             [route.stable]\nversion = \"v1\"\nendpoints = [\"{s}\"]\n\
             [route.canary]\nversion = \"v2\"\nendpoints = [\"{c}\"]\nweight = 20\n{judge}",
            s = s.addr,
            c = c.addr
        );
    }
    let veer = Veer::start(&config).await;
    wait_awake(&veer, "every route asleep", |n| n == 0.0).await;
    let load = Load::start(veer.addr, 4, Duration::ZERO);
    let start = Instant::now();
    let route = wait_verdict(&veer, "reverted", Duration::from_secs(20)).await;
    let took = start.elapsed();
    load.stop().await;
    assert_eq!(route["name"], "web");
    assert_eq!(route["weight"]["effective"], 0.0);
    // The route with traffic stays awake while its window holds it; the
    // others sleep again.
    wait_awake(&veer, "only the route with traffic awake", |n| n == 1.0).await;
    let st = veer.status().await;
    let reverted = st["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .filter(|r| r["verdict"] == "reverted")
        .count();
    assert_eq!(reverted, 1, "took {took:?}");
}

/// A route without a canary says so in `/status`: its reason was the
/// judge's "window has 0 canary and N stable requests; 50 each are
/// needed", as if a canary were waiting for traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_without_a_canary_says_so() {
    let s = Upstream::start("stable").await;
    let veer = Veer::start(&(route_config(&[s.addr], &[], 0.0, "") + JUDGE)).await;
    for i in 0..5 {
        let r = super::support::get(veer.addr, "/", &[("x-user-id", &format!("u{i}"))])
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Past a judge interval (200 ms) with requests in its window.
    let route = wait_route(&veer, "judged", Duration::from_secs(10), |r| {
        r["window"]["stable"]["requests"].as_u64() >= Some(5)
    })
    .await;
    let reason = route["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("no canary: stable takes every request"),
        "{route}"
    );
    assert!(route["canary"].is_null(), "{route}");
}
