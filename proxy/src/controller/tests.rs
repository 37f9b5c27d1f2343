//! The controller loop in paused time: hold, interval and early-look
//! rules through the real loop, judge and recorders, in milliseconds of
//! real time instead of minutes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use veer_control::config::Config;
use veer_control::rollout::Label;

use super::Controller;
use crate::metrics::Metrics;
use crate::record::Outcome;
use crate::reload::Applied;
use crate::shared::Shared;
use crate::upstream::Upstreams;

/// A controller for `text` (state in a temp dir), running.
async fn running(text: &str) -> (Arc<Shared>, watch::Sender<bool>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!("[state]\ndir = \"{}\"\n{text}", dir.path().display());
    let path = dir.path().join("veer.toml");
    std::fs::write(&path, &text).expect("config");
    let config = Config::parse(&text, dir.path()).expect("valid config");
    let addrs = crate::snapshot::resolve(&config).expect("addresses");
    let applied = Applied {
        config,
        addrs,
        text,
        certs: None,
    };
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let (c, shared) = Controller::start(applied, path, None, metrics, Upstreams::new())
        .await
        .expect("controller");
    let (_actions, rx) = mpsc::channel(1);
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        let _actions = _actions; // kept open: the loop also waits on actions
        c.run(rx, shutdown).await;
    });
    (shared, stop, dir)
}

/// One second of identical traffic on both versions (10 % canary), with
/// user keys from `*next`; then the second passes.
async fn second_of_traffic(shared: &Shared, next: &mut u64) {
    let snap = shared.snapshot.load_full();
    let route = &snap.routes[0];
    for _ in 0..200 {
        *next += 1;
        let key = Some(*next << 32);
        let target = if *next % 10 == 0 {
            route.canary.as_ref().expect("canary")
        } else {
            &route.stable
        };
        target.recorder.record(2_000, Outcome::Ok, key);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

fn step(shared: &Shared) -> usize {
    let doc = shared.status.load();
    doc.route("web")
        .and_then(|r| r.rollout.as_ref())
        .map_or(usize::MAX, |r| r.step)
}

const ROLLOUT: &str = r#"
[[route]]
name = "web"
[route.stable]
version = "v1"
endpoints = ["127.0.0.1:1"]
[route.canary]
version = "v2"
endpoints = ["127.0.0.1:2"]
[route.judge]
interval = "1s"
window = "10s"
min_requests = 20
[route.rollout]
steps = [10, 50, 100]
hold = "60s"
"#;

// Paused time advances by itself whenever the runtime is idle, also while
// the controller waits on a blocking write of its state file: the
// controller can then fall behind the test's clock. So the test waits for
// what it can observe (a verdict in `/status`) and asserts only what such
// delays cannot break: a step never comes early, and it does come.
#[tokio::test(start_paused = true)]
async fn a_rollout_step_waits_for_a_full_hold_and_a_gap_in_traffic_restarts_it() {
    let (shared, stop, _dir) = running(ROLLOUT).await;
    let mut next = 0;
    // 30 s of healthy traffic, then none until the window has emptied and
    // the verdict says so: the hold starts over.
    for _ in 0..30 {
        second_of_traffic(&shared, &mut next).await;
    }
    assert_eq!(step(&shared), 0);
    let mut waited = 0;
    while verdict(&shared) != Label::InsufficientData {
        tokio::time::sleep(Duration::from_secs(1)).await;
        waited += 1;
        assert!(waited < 120, "the gap never showed: {:?}", verdict(&shared));
    }
    assert_eq!(step(&shared), 0);
    // Healthy again: the hold counts from the first healthy verdict after
    // the gap, so 50 s of traffic cannot step, however late the controller.
    for _ in 0..50 {
        second_of_traffic(&shared, &mut next).await;
        assert_eq!(step(&shared), 0, "stepped before a whole hold of health");
    }
    let mut more = 0;
    while step(&shared) == 0 {
        second_of_traffic(&shared, &mut next).await;
        more += 1;
        assert!(more < 120, "no step after a whole hold of health");
    }
    assert_eq!(step(&shared), 1);
    let _ = stop.send(true);
}

/// A tenth of a second of traffic on `route`: 20 requests on stable, all
/// fine, and one on the canary, failing (each of a new user from `*next`).
async fn failing_canary_tenth_of_a_second(route: &crate::snapshot::RouteTarget, next: &mut u64) {
    for _ in 0..20 {
        *next += 1;
        route
            .stable
            .recorder
            .record(2_000, Outcome::Ok, Some(*next << 32));
    }
    *next += 1;
    route.canary.as_ref().expect("canary").recorder.record(
        2_000,
        Outcome::Error,
        Some(*next << 32),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn verdict(shared: &Shared) -> Label {
    shared
        .status
        .load()
        .route("web")
        .map_or(Label::InsufficientData, |r| r.verdict)
}

/// [`ROLLOUT`]'s route without its rollout, the canary at 10 %.
fn canary_at_ten_percent() -> String {
    ROLLOUT
        .replace(
            "[route.rollout]\nsteps = [10, 50, 100]\nhold = \"60s\"\n",
            "",
        )
        .replace(
            "endpoints = [\"127.0.0.1:2\"]",
            "endpoints = [\"127.0.0.1:2\"]\nweight = 10",
        )
}

#[tokio::test(start_paused = true)]
async fn canary_errors_are_reverted_between_ticks_not_at_the_interval() {
    let text = canary_at_ten_percent()
        .replace("interval = \"1s\"", "interval = \"10m\"")
        .replace("window = \"10s\"", "window = \"20m\"");
    let (shared, stop, _dir) = running(&text).await;
    let snap = shared.snapshot.load_full();
    let route = &snap.routes[0];
    let mut next = 0u64;
    let start = tokio::time::Instant::now();
    // Every canary request of a distinct user fails; stable is fine.
    while shared
        .status
        .load()
        .route("web")
        .map(|r| r.weight.effective)
        != Some(0.0)
    {
        failing_canary_tenth_of_a_second(route, &mut next).await;
        assert!(start.elapsed() < Duration::from_secs(120), "never reverted");
    }
    // Judged at a look between ticks, long before the 10 min interval.
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    let doc = shared.status.load();
    let reverted = doc.route("web").and_then(|r| r.reverted.clone());
    assert!(reverted.is_some(), "{doc:?}");
    let _ = stop.send(true);
}

fn routes_awake(shared: &Shared) -> i64 {
    shared.metrics.routes_awake.get()
}

/// Waits (in paused time) until no route is awake; panics after `limit`.
async fn all_asleep_within(shared: &Shared, limit: Duration) {
    let start = tokio::time::Instant::now();
    while routes_awake(shared) != 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            start.elapsed() < limit,
            "routes still awake: {}",
            routes_awake(shared)
        );
    }
}

/// Idle routes sleep (the controller stops visiting them); a request wakes
/// its route, and a bad canary there is reverted as quickly as ever.
#[tokio::test(start_paused = true)]
async fn idle_routes_sleep_until_a_request_and_a_bad_canary_is_still_reverted() {
    let one = canary_at_ten_percent();
    let text = format!(
        "{one}{}{}",
        one.replace("name = \"web\"", "name = \"api\"")
            .replace("[[route]]", "[[route]]\nhosts = [\"api\"]"),
        one.replace("name = \"web\"", "name = \"img\"")
            .replace("[[route]]", "[[route]]\nhosts = [\"img\"]"),
    );
    let (shared, stop, _dir) = running(&text).await;
    all_asleep_within(&shared, Duration::from_secs(30)).await;
    let snap = shared.snapshot.load_full();
    let route = snap
        .routes
        .iter()
        .find(|r| &*r.name == "web")
        .expect("route web");
    let start = tokio::time::Instant::now();
    let mut next = 0u64;
    let mut most = 0;
    while verdict_of(&shared, "web").1 != Some(0.0) {
        failing_canary_tenth_of_a_second(route, &mut next).await;
        if verdict_of(&shared, "web").1 != Some(0.0) {
            most = most.max(routes_awake(&shared));
        }
        assert!(start.elapsed() < Duration::from_secs(120), "never reverted");
    }
    // Only the route with traffic was visited; the other two slept on.
    assert_eq!(most, 1, "routes awake while one had traffic");
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    let doc = shared.status.load();
    assert!(doc.route("web").and_then(|r| r.reverted.clone()).is_some());
    assert!(doc.route("api").and_then(|r| r.reverted.clone()).is_none());
    // The revert's new snapshot woke them all; idle again, all sleep once
    // the reverted route's window has emptied.
    all_asleep_within(&shared, Duration::from_secs(120)).await;
    let _ = stop.send(true);
}

/// A route's (verdict, effective canary weight) in `/status`.
fn verdict_of(shared: &Shared, name: &str) -> (Label, Option<f64>) {
    let doc = shared.status.load();
    let r = doc.route(name);
    (
        r.map_or(Label::InsufficientData, |r| r.verdict),
        r.map(|r| r.weight.effective),
    )
}

/// The stable endpoint's health as `/status` shows it.
fn stable_healthy(shared: &Shared) -> Option<bool> {
    let doc = shared.status.load();
    let r = doc.route("web")?;
    r.stable.endpoints.first().map(|e| e.healthy)
}

/// With every route asleep the controller rests (no 100 ms tick); an
/// upstream that fails, or recovers, still shows in `/status` at once.
#[tokio::test(start_paused = true)]
async fn a_resting_controller_still_shows_an_endpoint_failing_and_recovering() {
    let (shared, stop, _dir) = running(&canary_at_ten_percent()).await;
    all_asleep_within(&shared, Duration::from_secs(30)).await;
    // Long enough for the last health comparison to have been made.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(stable_healthy(&shared), Some(true));
    let snap = shared.snapshot.load_full();
    let (_, _, upstream) = snap.routes[0]
        .stable
        .balancer
        .members()
        .next()
        .expect("an endpoint");
    upstream.mark_failed(crate::error::ProxyError::UpstreamConnect);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stable_healthy(&shared), Some(false));
    upstream.mark_ok();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stable_healthy(&shared), Some(true));
    let _ = stop.send(true);
}
