//! Blue-green through the real binary: the watch after a flip.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::support::{
    all_on, route_config, wait_route, wait_verdict, Load, Upstream, Veer, FAST_JUDGE as JUDGE,
};

/// Waits until the old colour's window holds a baseline (200 requests,
/// ten times `min_requests`) for the watch after a flip.
async fn old_colour_judged(veer: &Veer) {
    wait_route(
        veer,
        "a baseline of 200 requests",
        Duration::from_secs(20),
        |r| r["window"]["stable"]["requests"].as_u64() >= Some(200),
    )
    .await;
}

fn blue_green(stable: std::net::SocketAddr, canary: std::net::SocketAddr, weight: f64) -> String {
    route_config(&[stable], &[canary], weight, "strategy = \"blue-green\"") + JUDGE
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_flip_to_a_worse_colour_flips_back_by_itself() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.fail_one_in.store(10, Ordering::SeqCst);
    let veer = Veer::start(&blue_green(s.addr, c.addr, 0.0)).await;
    let load = Load::start(veer.addr, 3, Duration::from_millis(1));
    // Let the judge see enough of the old colour, then flip.
    old_colour_judged(&veer).await;
    veer.write_config(&blue_green(s.addr, c.addr, 100.0));
    veer.wait_generation(2).await;
    let route = wait_verdict(&veer, "reverted", Duration::from_secs(15)).await;
    load.stop().await;
    assert_eq!(
        route["reverted"]["guard"], "bluegreen_error_test",
        "{route}"
    );
    assert_eq!(route["weight"]["effective"], 0.0);
    all_on(&veer, "stable", 100).await;
    assert_eq!(
        veer.logs_with_at_least(
            "blue-green flip: judging the new colour against the old one's last window",
            1
        )
        .await
        .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_flip_to_a_good_colour_holds_and_flips_back_on_request() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    // Identical colours, with a service time that dwarfs loopback noise on
    // a busy machine (with 3 ms, a CPU hog alone moved the new colour's
    // share over 1.5x the old p99 from 0.14 % to 1.1 %: the watch compares
    // with the past, and cannot tell that drift from a regression).
    s.delay_ms.store(20, Ordering::SeqCst);
    c.delay_ms.store(20, Ordering::SeqCst);
    let veer = Veer::start(&blue_green(s.addr, c.addr, 0.0)).await;
    let load = Load::start(veer.addr, 6, Duration::ZERO);
    old_colour_judged(&veer).await;
    veer.write_config(&blue_green(s.addr, c.addr, 100.0));
    veer.wait_generation(2).await;
    // A good colour must hold: only waiting can show that it is not
    // flipped back (8 s of watch, some 2000 requests).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let route = veer.status().await["routes"][0].clone();
    assert_eq!(route["verdict"], "healthy", "{route}");
    all_on(&veer, "canary", 100).await;
    veer.write_config(&blue_green(s.addr, c.addr, 0.0));
    veer.wait_generation(3).await;
    load.stop().await;
    all_on(&veer, "stable", 100).await;
}
