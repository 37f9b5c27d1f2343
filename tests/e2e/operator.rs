//! Operator actions and the rollout through the real binary.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::support::{
    admin_post, all_on, get, metric, route_config, send_keyed, stuck_state_dir, unstick_state_dir,
    veer_cli, Load, Upstream, Veer, FAST_JUDGE as JUDGE,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_need_the_token_and_persist() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let config = route_config(&[s.addr], &[c.addr], 30.0, "")
        .replace("[admin]\n", "[admin]\ntoken_file = \"admin.token\"\n");
    let dir = tempfile::tempdir().unwrap();
    super::support::write_with_mode(&dir.path().join("admin.token"), "s3cret\n", 0o600);
    let veer = Veer::start_in_dir(dir, &config).await;

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
    assert_eq!(veer.logs_with_at_least("operator action", 5).await.len(), 5);
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
    assert_eq!(
        veer.logs_with_at_least("rollout advanced", 2).await.len(),
        2
    );
    // `veer status` counts steps from 1 (`/status`'s `step` is the index).
    let admin = veer.admin.to_string();
    let out = tokio::task::spawn_blocking(move || veer_cli(&["status", "--admin", &admin]))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("  rollout step 3 of 3 (10%, 50%, 100%)\n"),
        "{text}"
    );
}

/// DORA figures: each canary identity is a deployment that ends promoted,
/// reverted or replaced; the 30-day history survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_are_counted_by_how_they_ended_and_survive_a_restart() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let config = route_config(&[s.addr], &[c.addr], 10.0, "");
    let mut veer = Veer::start(&config).await;
    let doc = |v: serde_json::Value| v["routes"][0]["deployments"].clone();
    // v2: sent some traffic, then reverted by an operator.
    send_keyed(veer.addr, 100).await;
    assert_eq!(
        super::support::admin_post(&veer, "/routes/web/revert").await,
        200
    );
    // v3 replaces it, then is promoted; v4 replaces v3 (already ended).
    for (version, generation) in [("v3", 2), ("v4", 3)] {
        veer.write_config(&config.replace("version = \"v2\"", &format!("version = \"{version}\"")));
        veer.wait_generation(generation).await;
        if version == "v3" {
            assert_eq!(
                super::support::admin_post(&veer, "/routes/web/promote").await,
                200
            );
        }
    }
    // v5 replaces v4, which had not ended.
    veer.write_config(&config.replace("version = \"v2\"", "version = \"v5\""));
    veer.wait_generation(4).await;
    let d = doc(veer.status().await);
    assert_eq!(
        (
            d["promoted"].as_u64(),
            d["reverted"].as_u64(),
            d["replaced"].as_u64()
        ),
        (Some(1), Some(1), Some(1)),
        "{d}"
    );
    assert!(
        (d["change_failure_ratio"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9,
        "{d}"
    );
    let m = veer.metrics().await;
    for (result, n) in [("promoted", 1.0), ("reverted", 1.0), ("replaced", 1.0)] {
        assert_eq!(
            metric(
                &m,
                &format!(r#"veer_deployments_total{{result="{result}",route="web"}}"#)
            ),
            Some(n),
            "{m}"
        );
    }
    assert_eq!(
        metric(&m, r#"veer_time_to_revert_seconds_count{route="web"}"#),
        Some(1.0),
        "{m}"
    );
    // The history is in the state dir: a restart keeps the figures.
    veer.terminate();
    assert!(veer.wait_exit(Duration::from_secs(10)).await.success());
    let dir = std::mem::replace(&mut veer.dir, tempfile::tempdir().unwrap());
    let restarted = Veer::start_in(dir, veer.config.clone()).await;
    assert_eq!(doc(restarted.status().await), d);
    let m = restarted.metrics().await;
    assert!(
        (metric(&m, r#"veer_change_failure_ratio{route="web"}"#).unwrap() - 1.0 / 3.0).abs() < 1e-9,
        "{m}"
    );
}

/// A state dir whose write never returns (a FIFO where the state file's
/// temporary goes; a network volume that stopped answering in life): an
/// operator's revert is carried out all the same (refusing it for want of
/// a disk would leave the canary in traffic), `/status` says the state is
/// not written, an action toward the canary is refused, and the judge's
/// loop goes on; once the write returns, the revert is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_holds_when_the_state_dir_does_not_answer() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let veer = Veer::start(&route_config(&[s.addr], &[c.addr], 100.0, "")).await;
    let state = veer.dir.path().join("state");
    let fifo = stuck_state_dir(&veer);

    // The revert takes the canary out of traffic at once; its answer
    // comes once its write returned (here after the write's 5 s bound).
    let answered = AtomicBool::new(false);
    let revert = async {
        let status = admin_post(&veer, "/routes/web/revert").await;
        answered.store(true, Ordering::SeqCst);
        status
    };
    let moved = async {
        let start = Instant::now();
        loop {
            let r = get(veer.addr, "/", &[("x-user-id", "k")]).await.unwrap();
            if r.headers()["x-upstream"] == "stable" {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the revert never took the canary out of traffic"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Before the write's bound (no state error yet), unanswered.
        let st = veer.status().await;
        assert!(
            st["state_error"].is_null(),
            "the revert waited for its write ({:?}): {st}",
            start.elapsed()
        );
        assert!(!answered.load(Ordering::SeqCst));
    };
    let (status, ()) = tokio::join!(revert, moved);
    assert_eq!(status, 200);
    // The revert's write had no answer (or, when the 10 s evidence save
    // came right after it, that one found the stuck write not returned).
    let st = veer.status().await;
    let error = st["state_error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains("no answer within") || error.contains("has not returned"),
        "{st}"
    );
    // Back toward the canary needs the disk: refused, without waiting
    // for the write under way again.
    assert_eq!(admin_post(&veer, "/routes/web/reset").await, 500);
    let st = veer.status().await;
    let error = st["state_error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("has not returned"), "{st}");
    let r = get(veer.addr, "/", &[("x-user-id", "k")]).await.unwrap();
    assert_eq!(r.headers()["x-upstream"], "stable");

    // The disk answers again (the stuck write fails). The next write,
    // tried again on its own, puts the revert on disk.
    unstick_state_dir(fifo).await;
    let start = Instant::now();
    loop {
        let saved = std::fs::read_to_string(state.join("state.json")).unwrap_or_default();
        if saved.contains("\"reverted\"") && saved.contains("operator") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "revert never on disk: {saved}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
