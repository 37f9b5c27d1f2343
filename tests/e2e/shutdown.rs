//! Graceful shutdown: in-flight requests finish, new connections are refused,
//! and the process exits 0.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::support::{get, route_config, Client, Upstream, Veer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_in_flight_slow_request_then_exits_0() {
    let slow = Upstream::start("slow").await;
    slow.delay_ms.store(1_500, Ordering::SeqCst);
    let mut veer = Veer::start(&route_config(&[slow.addr], &[], 0.0, "")).await;
    let addr = veer.addr;
    let in_flight = tokio::spawn(async move { get(addr, "/slow", &[]).await });
    let start = Instant::now();
    while slow.requests.load(Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    veer.terminate();
    let r = in_flight
        .await
        .unwrap()
        .expect("in-flight request completes");
    assert_eq!(r.status(), 200);
    assert_eq!(&r.body()[..], b"slow");
    let status = veer.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status}");
    assert!(
        get(addr, "/", &[]).await.is_err(),
        "no new connections after shutdown"
    );
}

/// veer with `proxy` settings (its `shutdown_grace` first) and a request in
/// flight to an upstream that takes 30 s to answer (the route waits 60 s).
async fn with_a_request_in_flight(proxy: &str) -> (Veer, Arc<Upstream>) {
    let slow = Upstream::start("slow").await;
    slow.delay_ms.store(30_000, Ordering::SeqCst);
    let config = route_config(&[slow.addr], &[], 0.0, "timeout = \"60s\"")
        .replace("shutdown_grace = \"10s\"", proxy);
    let veer = Veer::start(&config).await;
    let addr = veer.addr;
    tokio::spawn(async move { get(addr, "/slow", &[]).await });
    while slow.requests.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (veer, slow)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_bounds_the_wait() {
    let (mut veer, _slow) =
        with_a_request_in_flight("shutdown_grace = \"500ms\"\naccess_log = \"errors\"").await;
    veer.terminate();
    let status = veer.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success());
    assert_eq!(
        veer.logs_with_at_least("grace period over; closing the remaining connections", 1)
            .await
            .len(),
        1
    );
    // The request cut by the end of the grace was given up by veer, not
    // by its client: no client_closed line (nor count, nor judge record).
    assert!(
        !veer.all_logs().contains("client_closed"),
        "{}",
        veer.all_logs()
    );
}

/// A second SIGTERM during the grace (an operator's second Ctrl-C) stops
/// waiting for the in-flight requests: veer exits 0 at once, saying so,
/// with its state written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_cuts_the_grace_short() {
    let (mut veer, _slow) = with_a_request_in_flight("shutdown_grace = \"120s\"").await;
    veer.terminate();
    veer.logs_with_at_least(
        "shutting down: no new connections; finishing in-flight requests",
        1,
    )
    .await;
    veer.terminate();
    // (Far less than the grace of 120 s and the request's 30 s.)
    let status = veer.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");
    let cut = veer
        .logs_with_at_least(
            "stop signalled again: closing the remaining connections now",
            1,
        )
        .await;
    assert_eq!(cut.len(), 1, "{}", veer.all_logs());
    assert!(veer.dir.path().join("state/state.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_kept_alive_connections_idle_at_once_and_busy_after_their_answer() {
    let slow = Upstream::start("slow").await;
    // Neither the grace nor the idle timeout ends these connections in the
    // test's time: only being told of the shutdown does.
    let config = route_config(&[slow.addr], &[], 0.0, "").replace(
        "shutdown_grace = \"10s\"",
        "shutdown_grace = \"120s\"\nidle_timeout = \"120s\"",
    );
    let mut veer = Veer::start(&config).await;
    let mut idle = Client::connect(veer.addr).await.expect("connect");
    for _ in 0..3 {
        assert_eq!(idle.get("/", &[]).await.expect("answer").status(), 200);
    }
    let mut busy = Client::connect(veer.addr).await.expect("connect");
    assert_eq!(busy.get("/", &[]).await.expect("answer").status(), 200);
    slow.delay_ms.store(1_500, Ordering::SeqCst);
    let before = slow.requests.load(Ordering::SeqCst);
    let in_flight = tokio::spawn(async move {
        let r = busy.get("/slow", &[]).await;
        (r, busy)
    });
    let start = Instant::now();
    while slow.requests.load(Ordering::SeqCst) == before {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    veer.terminate();
    wait_closed(&idle, "an idle kept-alive connection").await;
    let (r, busy) = in_flight.await.unwrap();
    let r = r.expect("the in-flight request completes");
    assert_eq!(r.status(), 200);
    assert_eq!(&r.body()[..], b"slow");
    wait_closed(&busy, "a connection busy at shutdown, once answered,").await;
    let status = veer.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "exit status {status}");
}

/// Waits (at most 30 s: far less than the test's grace and idle timeout)
/// for veer to close `client`'s connection.
async fn wait_closed(client: &Client, what: &str) {
    let start = Instant::now();
    while !client.is_closed() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} was not closed at shutdown"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
