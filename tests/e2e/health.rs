//! Active health checks (`[route.health_check]`): an endpoint that answers
//! its check wrongly is taken out of its version's choices (its keys go to
//! the others) though it still accepts connections, and comes back once it
//! passes again.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::support::{metric, route_config, upstream_of_keys, wait_route, Upstream, Veer};

const CHECK: &str = "[route.health_check]\npath = \"/healthz\"\ninterval = \"500ms\"\ntimeout = \"400ms\"\nunhealthy = 2\nhealthy = 2\nheaders = { Host = \"shop.internal\" }\n";

/// Requests that came with a user key (the checks carry none).
fn keyed(u: &Upstream) -> u64 {
    u.keys.lock().unwrap().values().sum()
}

fn endpoint<'a>(route: &'a serde_json::Value, addr: &str) -> &'a serde_json::Value {
    route["stable"]["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["addr"] == addr))
        .expect("the endpoint in /status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_its_health_check_gets_no_requests_until_it_passes_again() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let config = route_config(&[a.addr, b.addr], &[], 0.0, "") + CHECK;
    let veer = Veer::start(&config).await;
    let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let served = upstream_of_keys(veer.addr, &keys, 4).await;
    assert!(served.values().any(|u| u == "b"), "{served:?}");
    let b_addr = b.addr.to_string();
    let gauge =
        format!("veer_health_check_failing{{endpoint=\"{b_addr}\",route=\"web\",version=\"v1\"}}");
    assert_eq!(metric(&veer.metrics().await, &gauge), Some(0.0));
    // The check's request (the next one b gets, 500 ms apart): its path,
    // veer's health user agent.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while *b.last_uri.lock().unwrap() != "/healthz" {
        assert!(std::time::Instant::now() < deadline, "no check reached b");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    {
        let h = b.last_headers.lock().unwrap();
        assert!(h["user-agent"]
            .to_str()
            .unwrap()
            .starts_with("veer-health/"));
        // The check's own Host, once (not beside the endpoint's).
        let hosts: Vec<_> = h.get_all("host").iter().collect();
        assert_eq!(hosts, ["shop.internal"], "{h:?}");
    }

    // b answers 503 to everything (its check too), but still accepts
    // connections: only the check can take it out.
    b.status.store(503, Ordering::SeqCst);
    let route = wait_route(&veer, "b taken out", Duration::from_secs(10), |r| {
        endpoint(r, &b_addr)["healthy"] == false
    })
    .await;
    let why = endpoint(&route, &b_addr)["health_check"].as_str().unwrap();
    assert_eq!(why, "GET /healthz: got 503, expected 200", "{route}");
    let table = super::support::veer_status_table(&veer).await;
    assert!(
        table.contains(&format!(
            "endpoint {b_addr} of v1 out by its health check: GET /healthz: got 503, expected 200"
        )),
        "{table}"
    );
    assert_eq!(metric(&veer.metrics().await, &gauge), Some(1.0));
    let out = veer
        .logs_with_at_least(
            "health check failed: endpoint taken out of its version's choices",
            1,
        )
        .await;
    assert_eq!(out[0]["endpoint"], b_addr.as_str(), "{}", out[0]);
    let before = keyed(&b);
    let served = upstream_of_keys(veer.addr, &keys, 4).await;
    assert!(served.values().all(|u| u == "a"), "{served:?}");
    assert_eq!(keyed(&b), before, "no user request reached b");

    // Fixed: back in once it passed twice, and its keys come back to it.
    b.status.store(200, Ordering::SeqCst);
    let route = wait_route(&veer, "b back in", Duration::from_secs(10), |r| {
        endpoint(r, &b_addr)["healthy"] == true
    })
    .await;
    assert!(
        endpoint(&route, &b_addr)["health_check"].is_null(),
        "{route}"
    );
    assert_eq!(metric(&veer.metrics().await, &gauge), Some(0.0));
    let served = upstream_of_keys(veer.addr, &keys, 4).await;
    assert!(served.values().any(|u| u == "b"), "{served:?}");

    // Every endpoint failing: the version is not emptied (each key goes to
    // its first choice, and the client gets the upstream's own answer).
    a.status.store(503, Ordering::SeqCst);
    b.status.store(503, Ordering::SeqCst);
    let a_addr = a.addr.to_string();
    wait_route(&veer, "both out", Duration::from_secs(10), |r| {
        endpoint(r, &a_addr)["healthy"] == false && endpoint(r, &b_addr)["healthy"] == false
    })
    .await;
    let r = super::support::get(veer.addr, "/", &[("x-user-id", "u")])
        .await
        .expect("answered");
    assert_eq!(r.status(), 503);
    assert!(
        r.headers().contains_key("x-upstream"),
        "the upstream's answer"
    );

    // The check removed by a reload: b is in again, its series gone.
    a.status.store(200, Ordering::SeqCst);
    b.status.store(200, Ordering::SeqCst);
    veer.write_config(&route_config(&[a.addr, b.addr], &[], 0.0, ""));
    veer.wait_generation(2).await;
    let route = veer.status().await["routes"][0].clone();
    assert_eq!(endpoint(&route, &b_addr)["healthy"], true, "{route}");
    assert_eq!(metric(&veer.metrics().await, &gauge), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_that_cannot_work_is_refused_and_the_running_config_stays() {
    let a = Upstream::start("a").await;
    let veer = Veer::start(&route_config(&[a.addr], &[], 0.0, "")).await;
    let bad = route_config(&[a.addr], &[], 0.0, "")
        + "[route.health_check]\npath = \"healthz\"\ninterval = \"100ms\"\ntimeout = \"1s\"\n";
    veer.write_config(&bad);
    let start = std::time::Instant::now();
    let error = loop {
        let st = veer.status().await;
        if st["config"]["last_reload"]["result"] == "failure" {
            break st["config"]["last_reload"]["error"]
                .as_str()
                .unwrap()
                .to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never rejected: {st}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        error.contains("health check path \"healthz\" must start with '/'"),
        "{error}"
    );
    assert!(
        error.contains("a health check's interval must be between 500ms and 300s"),
        "{error}"
    );
    assert!(error.contains("must be at most its interval"), "{error}");
    // The running config stays.
    let r = super::support::get(veer.addr, "/", &[])
        .await
        .expect("answered");
    assert_eq!(r.status(), 200);
    assert_eq!(veer.status().await["config"]["generation"], 1);
}

/// `u`, out by its check, answers 200 again: it is shown in, and some of
/// `keys` reach it.
async fn comes_in_when_fixed(veer: &Veer, u: &Upstream, keys: &[String]) {
    u.status.store(200, Ordering::SeqCst);
    let addr = u.addr.to_string();
    wait_route(
        veer,
        "in after its first pass",
        Duration::from_secs(10),
        |r| endpoint(r, &addr)["healthy"] == true,
    )
    .await;
    let served = upstream_of_keys(veer.addr, keys, 4).await;
    assert!(served.values().any(|s| s == u.name), "{served:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_start_out_an_endpoint_gets_requests_only_once_it_passed_its_first_check() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    // b is broken from the start: it never gets a user request.
    b.status.store(503, Ordering::SeqCst);
    let out = CHECK.to_string() + "start_out = true\n";
    let veer = Veer::start(&(route_config(&[a.addr, b.addr], &[], 0.0, "") + &out)).await;
    let (a_addr, b_addr, c_addr) = (a.addr.to_string(), b.addr.to_string(), c.addr.to_string());
    let route = wait_route(
        &veer,
        "a in after its first pass",
        Duration::from_secs(10),
        |r| {
            endpoint(r, &a_addr)["healthy"] == true
                && endpoint(r, &b_addr)["health_check"]
                    != "not passed its first health check yet (start_out)"
        },
    )
    .await;
    assert_eq!(endpoint(&route, &b_addr)["healthy"], false, "{route}");
    assert_eq!(
        endpoint(&route, &b_addr)["health_check"],
        "GET /healthz: got 503, expected 200",
        "{route}"
    );
    let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let served = upstream_of_keys(veer.addr, &keys, 4).await;
    assert!(served.values().all(|u| u == "a"), "{served:?}");
    assert_eq!(keyed(&b), 0, "no user request reached b");
    let line = &veer
        .logs_with_at_least(
            "health check failed: a new endpoint stays out of its version's choices",
            1,
        )
        .await[0];
    assert_eq!(line["endpoint"], b_addr.as_str(), "{line}");

    // One pass brings it in (not `healthy` passes: it was never out for
    // failing).
    comes_in_when_fixed(&veer, &b, &keys).await;

    // An endpoint a reload adds starts out too: c, broken, gets no user
    // request from the moment it is in the config; fixed, it comes in with
    // its first pass. a and b keep their state (and their keys).
    c.status.store(503, Ordering::SeqCst);
    veer.write_config(&(route_config(&[a.addr, b.addr, c.addr], &[], 0.0, "") + &out));
    veer.wait_generation(2).await;
    let served = upstream_of_keys(veer.addr, &keys, 4).await;
    assert!(served.values().all(|u| u != "c"), "{served:?}");
    assert_eq!(keyed(&c), 0, "no user request reached c");
    comes_in_when_fixed(&veer, &c, &keys).await;
    let passed = veer
        .logs_with_at_least(
            "health check passed: a new endpoint in its version's choices",
            3,
        )
        .await;
    let named: Vec<&str> = passed
        .iter()
        .filter_map(|l| l["endpoint"].as_str())
        .collect();
    assert!(
        named.contains(&c_addr.as_str()) && named.contains(&b_addr.as_str()),
        "{named:?}"
    );
}
