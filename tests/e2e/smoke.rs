//! Smoke checks before traffic (`[[route.smoke]]`): a new canary, or the
//! colour a blue-green flip goes to, gets traffic only once every check
//! passed on every endpoint.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::support::{admin_post, all_on, metric, route_config, wait_route, Upstream, Veer};

const SMOKE: &str = "[[route.smoke]]\npath = \"/healthz\"\nexpect_status = 200\ntimeout = \"2s\"\n";

/// The route's `/status` entry once its verdict is `smoke_failed` (at
/// most 10 s).
async fn smoke_failed(veer: &Veer) -> serde_json::Value {
    wait_route(veer, "smoke_failed", Duration::from_secs(10), |r| {
        r["verdict"] == "smoke_failed"
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_smoke_check_keeps_the_canary_out_until_a_reset_after_the_fix() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.status.store(503, Ordering::SeqCst);
    let veer = Veer::start(&(route_config(&[s.addr], &[c.addr], 50.0, "") + SMOKE)).await;
    let route = smoke_failed(&veer).await;
    let reason = route["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "smoke check 1 (GET /healthz) on {}: got 503, expected 200",
            c.addr
        )),
        "{route}"
    );
    assert_eq!(route["weight"]["effective"], 0.0, "{route}");
    // The smoke request carried its marker; then no user reached the canary.
    assert_eq!(c.last_headers.lock().unwrap()["x-veer-smoke"], "1");
    assert_eq!(*c.last_uri.lock().unwrap(), "/healthz");
    let before = c.requests.load(Ordering::SeqCst);
    all_on(&veer, "stable", 200).await;
    assert_eq!(c.requests.load(Ordering::SeqCst), before);
    let m = veer.metrics().await;
    assert_eq!(
        metric(
            &m,
            "veer_smoke_checks_total{result=\"failed\",route=\"web\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "veer_verdict{route=\"web\",verdict=\"smoke_failed\"}"),
        Some(1.0),
        "{m}"
    );

    // Fixed, then reset: the checks run again and the canary gets its share.
    c.status.store(200, Ordering::SeqCst);
    assert_eq!(admin_post(&veer, "/routes/web/reset").await, 200);
    let route = wait_route(&veer, "in traffic", Duration::from_secs(10), |r| {
        r["weight"]["effective"] == 50.0
    })
    .await;
    assert_ne!(route["verdict"], "smoke_failed", "{route}");
    let m = veer.metrics().await;
    assert_eq!(
        metric(
            &m,
            "veer_smoke_checks_total{result=\"passed\",route=\"web\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_edit_runs_the_checks_again_and_every_endpoint_is_checked() {
    let s = Upstream::start("stable").await;
    let c1 = Upstream::start("canary").await;
    let c2 = Upstream::start("canary").await;
    c2.status.store(500, Ordering::SeqCst);
    let config = route_config(&[s.addr], &[c1.addr, c2.addr], 20.0, "") + SMOKE;
    let veer = Veer::start(&config).await;
    let route = wait_route(&veer, "smoke_failed", Duration::from_secs(10), |r| {
        r["verdict"] == "smoke_failed"
    })
    .await;
    assert!(
        route["reason"]
            .as_str()
            .unwrap()
            .contains(&c2.addr.to_string()),
        "{route}"
    );
    // The second endpoint is fixed; an edit of the checks runs them again.
    c2.status.store(200, Ordering::SeqCst);
    veer.write_config(&(config.clone() + "expect_body = \"canary\"\n"));
    veer.wait_generation(2).await;
    wait_route(&veer, "in traffic", Duration::from_secs(10), |r| {
        r["weight"]["effective"] == 20.0
    })
    .await;
    // A body check that fails names what it looked for.
    veer.write_config(&(config + "expect_body = \"v9\"\n"));
    veer.wait_generation(3).await;
    let route = wait_route(&veer, "smoke_failed again", Duration::from_secs(10), |r| {
        r["verdict"] == "smoke_failed"
    })
    .await;
    assert!(
        route["reason"]
            .as_str()
            .unwrap()
            .contains("does not contain \"v9\""),
        "{route}"
    );
    assert_eq!(route["weight"]["effective"], 0.0, "{route}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_smoke_check_keeps_a_blue_green_flip_from_happening() {
    let blue = Upstream::start("stable").await;
    let green = Upstream::start("canary").await;
    let config = |w: f64| {
        route_config(
            &[blue.addr],
            &[green.addr],
            w,
            "strategy = \"blue-green\"\n",
        ) + SMOKE
    };
    let veer = Veer::start(&config(0.0)).await;
    // Green checked once deployed (blue live).
    wait_route(&veer, "smoke passed", Duration::from_secs(10), |r| {
        r["reason"]
            != "smoke checks running against the new canary: it gets no traffic until they pass"
    })
    .await;
    // Green breaks before the flip: the flip is checked again and held.
    green.status.store(503, Ordering::SeqCst);
    veer.write_config(&config(100.0));
    veer.wait_generation(2).await;
    let route = wait_route(&veer, "flip held", Duration::from_secs(10), |r| {
        r["verdict"] == "smoke_failed"
    })
    .await;
    assert_eq!(route["weight"]["configured"], 100.0, "{route}");
    assert_eq!(route["weight"]["effective"], 0.0, "{route}");
    all_on(&veer, "stable", 100).await;
    // Fixed, and reset: the flip happens.
    green.status.store(200, Ordering::SeqCst);
    assert_eq!(admin_post(&veer, "/routes/web/reset").await, 200);
    wait_route(&veer, "flipped", Duration::from_secs(10), |r| {
        r["weight"]["effective"] == 100.0
    })
    .await;
    all_on(&veer, "canary", 100).await;
}

/// A canary named by a host name of several addresses (a headless
/// Service's pods) is checked on each: one pod failing keeps the canary
/// out, and the reason names that pod's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_address_of_a_canarys_host_name_is_checked() {
    let s = Upstream::start("stable").await;
    let good = Upstream::start_at("good", "127.0.0.2:0").await;
    let port = good.addr.port();
    let bad = Upstream::start_at("bad", &format!("127.0.0.3:{port}")).await;
    bad.status.store(503, Ordering::SeqCst);
    let config = route_config(&[s.addr], &[good.addr], 50.0, "").replace(
        &format!("\"{}\"", good.addr),
        &format!("\"pods.test:{port}\""),
    ) + SMOKE;
    let hosts = "127.0.0.1 localhost\n127.0.0.2 pods.test\n127.0.0.3 pods.test\n";
    let veer = Veer::start_with_hosts(&config, hosts).await;
    let route = smoke_failed(&veer).await;
    let reason = route["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "on pods.test:{port} (127.0.0.3:{port}): got 503, expected 200"
        )),
        "{route}"
    );
    assert_eq!(*good.last_uri.lock().unwrap(), "/healthz");
    assert_eq!(route["weight"]["effective"], 0.0, "{route}");
}
