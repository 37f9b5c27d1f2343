//! Forcing a version (`[route.force]`) through the real binary: precedence,
//! a weight-0 canary reached by testers, a reverted canary closed to forced
//! requests, and forced requests kept out of the judge.

use std::time::Duration;

use super::support::{
    admin_post, route_config, wait_route, Client, Load, Upstream, Veer, FAST_JUDGE as JUDGE,
};

const FORCE: &str = "[route.force]\nheader = \"x-veer-version\"\ncookie = \"veer_version\"\n";

/// Which upstream answered a GET of `/` with `headers`.
async fn who(veer: &Veer, headers: &[(&str, &str)]) -> String {
    let mut c = Client::connect(veer.addr).await.unwrap();
    let r = c.get("/", headers).await.unwrap();
    assert_eq!(r.status(), 200);
    r.headers()["x-upstream"].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_beats_a_cookie_beats_the_split_and_reaches_a_weight_0_canary() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let veer = Veer::start(&(route_config(&[s.addr], &[c.addr], 0.0, "") + FORCE)).await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "stable"),
        (&[("x-veer-version", "canary")], "canary"),
        (&[("x-veer-version", "v2")], "canary"),
        (&[("x-veer-version", "v1")], "stable"),
        (&[("cookie", "a=1; veer_version=canary")], "canary"),
        (
            &[("x-veer-version", "stable"), ("cookie", "veer_version=v2")],
            "stable",
        ),
        // A header naming nothing leaves the choice to the cookie...
        (
            &[("x-veer-version", "v9"), ("cookie", "veer_version=v2")],
            "canary",
        ),
        // ...and with no cookie either, to the split (weight 0: stable).
        (&[("x-veer-version", "nonsense")], "stable"),
    ];
    for (headers, want) in cases {
        assert_eq!(who(&veer, headers).await, *want, "{headers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_of_a_migrated_setup_force_as_the_names_do() {
    // ingress-nginx's testers send `always` and `never`.
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let values = "canary_values = [\"always\", \"on\"]\nstable_values = [\"never\"]\n";
    let veer = Veer::start(&(route_config(&[s.addr], &[c.addr], 0.0, "") + FORCE + values)).await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("x-veer-version", "always")], "canary"),
        (&[("x-veer-version", "on")], "canary"),
        (&[("x-veer-version", "canary")], "canary"),
        (&[("cookie", "veer_version=always")], "canary"),
        (
            &[
                ("x-veer-version", "never"),
                ("cookie", "veer_version=always"),
            ],
            "stable",
        ),
        (&[("x-veer-version", "Always")], "stable"),
    ];
    for (headers, want) in cases {
        assert_eq!(who(&veer, headers).await, *want, "{headers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reverted_canary_gets_no_forced_requests_unless_allowed() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let config = route_config(&[s.addr], &[c.addr], 10.0, "") + FORCE;
    let veer = Veer::start(&config).await;
    assert_eq!(admin_post(&veer, "/routes/web/revert").await, 200);
    let forced = [("x-veer-version", "canary")];
    assert_eq!(who(&veer, &forced).await, "stable");
    veer.write_config(&config.replace(
        "cookie = \"veer_version\"\n",
        "cookie = \"veer_version\"\nallow_when_reverted = true\n",
    ));
    veer.wait_generation(2).await;
    assert_eq!(who(&veer, &forced).await, "canary");
    // Everyone else still gets stable.
    assert_eq!(who(&veer, &[("x-user-id", "anyone")]).await, "stable");
}

/// Testers hammering a broken page of an otherwise identical canary do not
/// revert it: forced requests are not in the judge's window or tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_flood_of_failures_does_not_revert_an_identical_canary() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let config = route_config(&[s.addr], &[c.addr], 10.0, "") + FORCE + JUDGE;
    let veer = Veer::start(&config).await;
    let load = Load::start(veer.addr, 2, Duration::from_millis(2));
    let mut client = Client::connect(veer.addr).await.unwrap();
    for i in 0..300 {
        let key = format!("tester-{i}");
        let r = client
            .get(
                "/fail",
                &[("x-veer-version", "canary"), ("x-user-id", &key)],
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 500);
        assert_eq!(r.headers()["x-upstream"], "canary");
    }
    // Judged with plenty of the canary's own (split) traffic since.
    let route = wait_route(
        &veer,
        "canary traffic judged",
        Duration::from_secs(20),
        |r| r["window"]["canary"]["requests"].as_u64() >= Some(100),
    )
    .await;
    load.stop().await;
    assert_eq!(route["window"]["canary"]["errors"], 0, "{route}");
    assert!(route["reverted"].is_null(), "{route}");
    assert_ne!(route["verdict"], "reverted", "{route}");
    // The metrics still count them, per version.
    let m = veer.metrics().await;
    let canary_5xx = super::support::metric(
        &m,
        r#"veer_requests_total{code="5xx",route="web",version="v2"}"#,
    );
    assert_eq!(canary_5xx, Some(300.0), "{m}");
}
