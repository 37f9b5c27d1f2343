//! Outlier detection (`[route.outlier_detection]`): an endpoint whose
//! requests fail in a row (5xx answers, no answer in time) is taken out of
//! its version's choices for a while, its keys going to the others; never
//! more than the version's share of its endpoints, never a version's only
//! one.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::support::{
    metric, route_config, upstream_of_keys, veer_status_table, wait_route, Client, Upstream, Veer,
};

fn endpoint<'a>(route: &'a serde_json::Value, addr: &str) -> &'a serde_json::Value {
    route["stable"]["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["addr"] == addr))
        .expect("the endpoint in /status")
}

/// The keys of `keys` that `name` serves.
pub(super) async fn keys_of(veer: &Veer, keys: &[String], name: &str) -> Vec<String> {
    let served = upstream_of_keys(veer.addr, keys, 4).await;
    let mine: Vec<String> = keys
        .iter()
        .filter(|k| served[*k] == name)
        .cloned()
        .collect();
    assert!(mine.len() >= 3, "{name} serves {mine:?}: {served:?}");
    mine
}

/// The statuses of one request for each of `keys`, one after another on
/// one connection, and who answered each (`x-upstream`; veer's own answer
/// has none).
pub(super) async fn statuses(veer: &Veer, keys: &[String]) -> Vec<(u16, String)> {
    let mut c = Client::connect(veer.addr).await.expect("connect");
    let mut out = Vec::new();
    for k in keys {
        let r = c.get("/", &[("x-user-id", k)]).await.expect("answered");
        let by = r
            .headers()
            .get("x-upstream")
            .map_or("veer", |v| v.to_str().unwrap());
        out.push((r.status().as_u16(), by.to_string()));
    }
    out
}

/// The log line of an ejection.
pub const EJECTED: &str =
    "outlier detection: endpoint ejected; its keys go to the next endpoint of its version";

/// The log line of an ejected endpoint's first success after its time.
const BACK_IN: &str =
    "outlier detection: endpoint back in; a request succeeded after its ejection ran out";

const EJECTIONS: &str = "veer_outlier_ejections_total{route=\"web\",version=\"v1\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_requests_in_a_row_is_ejected_and_its_keys_go_to_the_others() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    let plain = route_config(&[a.addr, b.addr, c.addr], &[], 0.0, "");
    let detect = plain.clone()
        + "[route.outlier_detection]\nconsecutive_errors = 3\nejection_time = \"1h\"\nmax_ejected_percent = 50\n";
    let veer = Veer::start(&detect).await;
    let keys: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let of_b = keys_of(&veer, &keys, "b").await;
    let of_c = keys_of(&veer, &keys, "c").await;
    let b_addr = b.addr.to_string();
    let c_addr = c.addr.to_string();

    // 4xx answers are not failures; b's 503s are, and the third in a row
    // takes it out: its keys go to the next endpoint of v1.
    b.status.store(404, Ordering::SeqCst);
    let seen = statuses(&veer, &of_b[..3]).await;
    assert!(
        seen.iter().all(|(s, by)| *s == 404 && by == "b"),
        "{seen:?}"
    );
    b.status.store(503, Ordering::SeqCst);
    let seen = statuses(&veer, &of_b).await;
    assert!(
        seen[..3].iter().all(|(s, by)| *s == 503 && by == "b"),
        "{seen:?}"
    );
    assert!(
        seen[3..].iter().all(|(s, by)| *s == 200 && by != "b"),
        "{seen:?}"
    );
    let line = &veer.logs_with_at_least(EJECTED, 1).await[0];
    assert_eq!(line["endpoint"], b_addr.as_str(), "{line}");
    assert_eq!(line["last"], "503", "{line}");
    assert_eq!(line["in_a_row"], 1, "{line}");
    assert_eq!(line["for_s"], 3600, "{line}");
    let route = wait_route(&veer, "b shown out", Duration::from_secs(10), |r| {
        endpoint(r, &b_addr)["healthy"] == false
    })
    .await;
    let why = "3 failed requests in a row (the last: 503): out for 3600s";
    assert_eq!(endpoint(&route, &b_addr)["ejected"], why, "{route}");
    let table = veer_status_table(&veer).await;
    assert!(
        table.contains(&format!(
            "endpoint {b_addr} of v1 ejected by outlier detection: {why}"
        )),
        "{table}"
    );
    assert_eq!(metric(&veer.metrics().await, EJECTIONS), Some(1.0));

    // c fails too, but half of v1's three endpoints (at least one) is out
    // already: c stays in and its own clients get its answers.
    c.status.store(500, Ordering::SeqCst);
    let seen = statuses(&veer, &of_c).await;
    assert!(
        seen.iter().all(|(s, by)| *s == 500 && by == "c"),
        "{seen:?}"
    );
    let route = veer.status().await["routes"][0].clone();
    assert_eq!(endpoint(&route, &c_addr)["healthy"], true, "{route}");
    assert_eq!(metric(&veer.metrics().await, EJECTIONS), Some(1.0));

    // The detection removed by a reload: b is in again at once (its hour
    // not over), and answers its keys.
    b.status.store(200, Ordering::SeqCst);
    c.status.store(200, Ordering::SeqCst);
    veer.write_config(&plain);
    veer.wait_generation(2).await;
    let route = wait_route(&veer, "b back in", Duration::from_secs(10), |r| {
        endpoint(r, &b_addr)["healthy"] == true
    })
    .await;
    assert!(endpoint(&route, &b_addr)["ejected"].is_null(), "{route}");
    let seen = statuses(&veer, &of_b).await;
    assert!(
        seen.iter().all(|(s, by)| *s == 200 && by == "b"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_does_not_answer_is_ejected_again_for_longer_and_a_lone_endpoint_never() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let lone = Upstream::start("lone").await;
    let c1 = Upstream::start("c1").await;
    let c2 = Upstream::start("c2").await;
    let mut config = route_config(&[a.addr, b.addr], &[], 0.0, "timeout = \"300ms\"\n");
    config += "[route.outlier_detection]\nconsecutive_errors = 2\nejection_time = \"2s\"\n";
    // A second route whose stable version has one endpoint, and whose
    // canary has two (the judge off: nothing reverts it here).
    config += &format!(
        "[[route]]\nname = \"lone\"\npath_prefix = \"/lone\"\nsticky = [\"header:x-user-id\"]\n\
         [route.stable]\nversion = \"v1\"\nendpoints = [\"{}\"]\n\
         [route.canary]\nversion = \"v2\"\nendpoints = [\"{}\", \"{}\"]\nweight = 50\n\
         [route.judge]\nmode = \"off\"\n\
         [route.outlier_detection]\nconsecutive_errors = 2\n",
        lone.addr, c1.addr, c2.addr
    );
    let veer = Veer::start(&config).await;
    let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let of_b = keys_of(&veer, &keys, "b").await;
    let b_addr = b.addr.to_string();

    // b accepts and never answers in time: two 504s, then a takes its keys.
    b.delay_ms.store(5_000, Ordering::SeqCst);
    let seen = statuses(&veer, &of_b[..3]).await;
    assert_eq!(
        seen,
        [
            (504, "veer".into()),
            (504, "veer".into()),
            (200, "a".into())
        ]
    );
    let line = &veer.logs_with_at_least(EJECTED, 1).await[0];
    assert_eq!(line["endpoint"], b_addr.as_str(), "{line}");
    assert_eq!(
        line["last"], "no answer within the route's timeout",
        "{line}"
    );
    assert_eq!(line["for_s"], 2, "{line}");

    // Back after its two seconds (its keys' requests meanwhile go to a);
    // still hanging, it is out again, for twice as long.
    let key = &of_b[..1];
    let start = std::time::Instant::now();
    loop {
        let seen = statuses(&veer, key).await;
        if seen[0].0 == 504 {
            break;
        }
        assert_eq!(seen, [(200, "a".into())]);
        assert!(start.elapsed() < Duration::from_secs(30), "b never back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = statuses(&veer, &of_b[..2]).await;
    assert_eq!(seen, [(504, "veer".into()), (200, "a".into())]);
    let line = &veer.logs_with_at_least(EJECTED, 2).await[1];
    assert_eq!(line["in_a_row"], 2, "{line}");
    assert_eq!(line["for_s"], 4, "{line}");
    let route = wait_route(&veer, "b shown out again", Duration::from_secs(10), |r| {
        endpoint(r, &b_addr)["healthy"] == false
    })
    .await;
    assert_eq!(
        endpoint(&route, &b_addr)["ejected"],
        "2 failed requests in a row (the last: no answer within the route's timeout): out for 4s, ejection 2 in a row",
        "{route}"
    );
    assert!(
        veer.logs_with(BACK_IN).is_empty(),
        "back in without a success"
    );

    // Answering again: once its four seconds are over its keys are its
    // own, and the log says it is back.
    b.delay_ms.store(0, Ordering::SeqCst);
    let start = std::time::Instant::now();
    while statuses(&veer, key).await != [(200, "b".into())] {
        assert!(start.elapsed() < Duration::from_secs(30), "b never back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let line = &veer.logs_with_at_least(BACK_IN, 1).await[0];
    assert_eq!(line["endpoint"], b_addr.as_str(), "{line}");
    assert_eq!(line["version"], "v1", "{line}");

    // A version's only endpoint is never ejected, nor is a canary's (its
    // failures are the judge's evidence): their clients get their answers,
    // each key from the same endpoint every time.
    lone.status.store(503, Ordering::SeqCst);
    c1.status.store(503, Ordering::SeqCst);
    let mut c = Client::connect(veer.addr).await.expect("connect");
    let mut first = std::collections::HashMap::new();
    let mut answers = std::collections::HashMap::<String, u32>::new();
    for _ in 0..3 {
        for i in 0..30 {
            let key = format!("user-{i}");
            let r = c
                .get("/lone", &[("x-user-id", &key)])
                .await
                .expect("answered");
            let up = r.headers()["x-upstream"].to_str().unwrap().to_string();
            let want = if up == "c2" { 200 } else { 503 };
            assert_eq!(r.status(), want, "{key} by {up}");
            assert_eq!(*first.entry(key.clone()).or_insert(up.clone()), up, "{key}");
            *answers.entry(up).or_default() += 1;
        }
    }
    let failed = |u: &str| answers.get(u).copied().unwrap_or(0);
    assert!(failed("lone") >= 6 && failed("c1") >= 6, "{answers:?}");
    assert_eq!(veer.logs_with(EJECTED).len(), 2);
    assert_eq!(veer.logs_with(BACK_IN).len(), 1);
}

#[test]
fn veer_check_says_what_a_routes_health_checks_and_outlier_detection_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("veer.toml");
    std::fs::write(
        &path,
        "[[route]]\nname = \"web\"\n[route.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:9000\", \"127.0.0.1:9001\"]\n\
         [route.health_check]\npath = \"/healthz\"\nstart_out = true\n\
         [route.outlier_detection]\nconsecutive_errors = 4\n",
    )
    .unwrap();
    let out = super::support::veer_cli(&["check", "--config", path.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for line in [
        "    health check GET /healthz every 5s: out after 3 failures in a row, back after 2 passes; a new endpoint out until its first pass\n",
        "    outlier detection: a stable endpoint out for 30s after 4 failed requests in a row (at most 50% of them at once)\n",
    ] {
        assert!(text.contains(line), "{text}");
    }
}
