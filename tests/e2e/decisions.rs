//! Decisions that stay: a revert belongs to a canary identity and survives
//! a config that briefly lacks the canary; a breach that cannot act is
//! reported as `breach`; the judge's decisions reach the disk behind the
//! controller's loop, which a disk that does not answer holds up in
//! nothing.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::support::{
    admin_post, all_on, metric, route_config, stuck_state_dir, unstick_state_dir, wait_verdict,
    Load, Upstream, Veer,
};

const JUDGE: &str = "[route.judge]\ninterval = \"200ms\"\nwindow = \"10s\"\nmin_requests = 20\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_write_without_the_canary_does_not_re_expose_a_reverted_canary() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.status.store(500, Ordering::SeqCst);
    let full = route_config(&[s.addr], &[c.addr], 20.0, "") + JUDGE;
    let veer = Veer::start(&full).await;
    let load = Load::start(veer.addr, 4, Duration::ZERO);
    wait_verdict(&veer, "reverted", Duration::from_secs(10)).await;
    load.stop().await;

    // A valid file without [route.canary] (a torn write, a ConfigMap being
    // replaced), then the full file again.
    veer.write_config(&(route_config(&[s.addr], &[], 0.0, "") + JUDGE));
    veer.wait_generation(2).await;
    veer.write_config(&full);
    veer.wait_generation(3).await;
    let route = veer.status().await["routes"][0].clone();
    assert_eq!(route["verdict"], "reverted", "{route}");
    assert_eq!(route["weight"]["effective"], 0.0, "{route}");
    let before = c.requests.load(Ordering::SeqCst);
    all_on(&veer, "stable", 400).await;
    assert_eq!(c.requests.load(Ordering::SeqCst), before);
    // The decision is on disk: the state file names the reverted identity.
    let state = std::fs::read_to_string(veer.dir.path().join("state/state.json")).unwrap();
    assert!(state.contains("\"reverted\""), "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breach_while_paused_is_reported_as_breach_and_changes_nothing() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.status.store(500, Ordering::SeqCst);
    let veer = Veer::start(&(route_config(&[s.addr], &[c.addr], 20.0, "") + JUDGE)).await;
    assert_eq!(admin_post(&veer, "/routes/web/pause").await, 200);
    let load = Load::start(veer.addr, 4, Duration::ZERO);
    let route = wait_verdict(&veer, "breach", Duration::from_secs(10)).await;
    load.stop().await;
    assert_eq!(route["weight"]["effective"], 20.0, "{route}");
    assert!(veer.logs_with("canary reverted").is_empty());
    let m = veer.metrics().await;
    assert!(
        m.contains(r#"veer_verdict{route="web",verdict="breach"} 1"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_judges_revert_is_written_behind_the_loop() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.status.store(500, Ordering::SeqCst);
    let config = route_config(&[s.addr], &[c.addr], 20.0, "") + JUDGE;
    let veer = Veer::start(&config).await;
    let state = veer.dir.path().join("state");
    let fifo = stuck_state_dir(&veer);

    let load = Load::start(veer.addr, 4, Duration::ZERO);
    wait_verdict(&veer, "reverted", Duration::from_secs(10)).await;
    let reverted = Instant::now();
    load.stop().await;
    // The revert's write waits on the FIFO; a reload is applied meanwhile,
    // before that write's bound (no state error shown yet). A loop that
    // awaited the write would take the reload only after it failed.
    veer.write_config(&config.replace("sticky = [", "timeout = \"20s\"\nsticky = ["));
    let st = loop {
        let st = veer.status().await;
        if st["config"]["generation"].as_u64() >= Some(2) {
            break st;
        }
        assert!(
            reverted.elapsed() < Duration::from_secs(30),
            "generation 2 never reached:\n{}",
            veer.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        st["state_error"].is_null(),
        "the reload waited for the write's bound ({:?} after the revert): {st}",
        reverted.elapsed()
    );
    assert_eq!(st["routes"][0]["verdict"], "reverted", "{st}");
    all_on(&veer, "stable", 100).await;

    // The write's bound passes: `/status` says why nothing is on disk.
    let st = loop {
        let st = veer.status().await;
        if !st["state_error"].is_null() {
            break st;
        }
        assert!(
            reverted.elapsed() < Duration::from_secs(30),
            "the stuck write was never reported: {st}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // (Or, when a write was asked for meanwhile, the evidence save's,
    // tried at once after it: that the stuck one has not returned.)
    let error = st["state_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("no answer within") || error.contains("has not returned"),
        "{st}"
    );
    // And the metric an alert reads.
    let m = veer.metrics().await;
    assert_eq!(metric(&m, "veer_state_persisted"), Some(0.0), "{m}");

    // The disk answers again (the stuck write fails): the next write, at
    // the 10 s evidence save, puts the revert on disk and clears the error.
    unstick_state_dir(fifo).await;
    let start = Instant::now();
    loop {
        let saved = std::fs::read_to_string(state.join("state.json")).unwrap_or_default();
        let st = veer.status().await;
        if saved.contains("\"reverted\"") && st["state_error"].is_null() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "revert never on disk: {saved}\n{st}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = veer.metrics().await;
    assert_eq!(metric(&m, "veer_state_persisted"), Some(1.0), "{m}");
}
