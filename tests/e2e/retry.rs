//! Retries (`[route.retry]`) through the real binary: a failed try of a
//! request that can be sent again goes to the next endpoint of its
//! version (a 503, no head within `try_timeout`, a connection closed before
//! the answer), the judge hearing the request failed; a request's body
//! goes again only when veer read it whole first; the retry budget caps
//! retries.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use super::outlier::statuses as answers;
use super::support::{metric, route_config, wait_route, Client, Upstream, Veer};

const SENT: &str = "veer_retries_total{result=\"sent\",route=\"web\",version=\"v1\"}";
const SPENT: &str = "veer_retries_total{result=\"budget_spent\",route=\"web\",version=\"v1\"}";

/// veer before `upstreams` (stable's endpoints), the route's own keys
/// `route_keys`, its `[route.retry]` table's `retry` keys, and an
/// `errors` access log.
async fn retrying(upstreams: &[SocketAddr], route_keys: &str, retry: &str) -> Veer {
    let config = route_config(upstreams, &[], 0.0, route_keys) + "[route.retry]\n" + retry;
    let config = config.replacen("[proxy]\n", "[proxy]\naccess_log = \"errors\"\n", 1);
    Veer::start(&config).await
}

/// The keys (of 100) that `name` serves (at least 3).
async fn keys_of(veer: &Veer, name: &str) -> Vec<String> {
    let keys: Vec<String> = (0..100).map(|i| format!("user-{i}")).collect();
    super::outlier::keys_of(veer, &keys, name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_try_goes_to_the_next_endpoint_and_the_judge_hears_the_request_failed() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let retry = "on = [\"503\", \"timeout\"]\ntry_timeout = \"300ms\"\n";
    let veer = retrying(&[a.addr, b.addr], "timeout = \"5s\"\n", retry).await;
    let of_b = keys_of(&veer, "b").await;

    // b answers 503: each of its keys' requests is answered by a, after
    // one try at b.
    b.status.store(503, Ordering::SeqCst);
    let before = b.requests.load(Ordering::SeqCst);
    let seen = answers(&veer, &of_b).await;
    assert!(
        seen.iter().all(|(s, by)| *s == 200 && by == "a"),
        "{seen:?}"
    );
    let tried = b.requests.load(Ordering::SeqCst) - before;
    assert_eq!(tried, of_b.len() as u64);
    let m = veer.metrics().await;
    assert_eq!(metric(&m, SENT), Some(of_b.len() as f64), "{m}");
    // The version failed each of them once: the judge hears them failed,
    // the clients got their answers.
    let n = of_b.len() as u64;
    let route = wait_route(&veer, "failures heard", Duration::from_secs(10), |r| {
        r["window"]["stable"]["errors"].as_u64() >= Some(n)
    })
    .await;
    assert_eq!(route["window"]["stable"]["errors"], n, "{route}");
    // An `errors` access log has a line for each: answered by a, retried once.
    let lines = veer.logs_with_at_least("request", of_b.len()).await;
    let access: Vec<_> = lines
        .iter()
        .filter(|l| l["target"] == "veer::access")
        .collect();
    assert_eq!(access.len(), of_b.len(), "{access:?}");
    for l in access {
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["retries"], 1, "{l}");
        assert_eq!(l["upstream"], a.addr.to_string(), "{l}");
    }

    // b answers, too late for a try (300 ms): a answers within the
    // route's timeout.
    b.status.store(200, Ordering::SeqCst);
    b.delay_ms.store(3_000, Ordering::SeqCst);
    let start = std::time::Instant::now();
    let seen = answers(&veer, &of_b[..2]).await;
    assert_eq!(seen, [(200, "a".into()), (200, "a".into())]);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let m = veer.metrics().await;
    assert_eq!(metric(&m, SENT), Some(of_b.len() as f64 + 2.0), "{m}");

    // A PUT whose body veer read whole before it went (announced within
    // `request_buffer`) goes again with that body: a gets all of it, and
    // echoes it.
    b.delay_ms.store(0, Ordering::SeqCst);
    b.status.store(503, Ordering::SeqCst);
    let mut c = Client::connect(veer.addr).await.unwrap();
    let small: Bytes = (0..5_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let a_bytes = a.body_bytes.load(Ordering::SeqCst);
    let b_bytes = b.body_bytes.load(Ordering::SeqCst);
    let r = c
        .send(Method::PUT, "/", &[("x-user-id", &of_b[0])], small.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-upstream"], "a");
    assert!(r.body() == &small, "the body a echoed differs");
    assert_eq!(a.body_bytes.load(Ordering::SeqCst) - a_bytes, 5_000);
    assert_eq!(b.body_bytes.load(Ordering::SeqCst) - b_bytes, 5_000);
    let m = veer.metrics().await;
    assert_eq!(metric(&m, SENT), Some(of_b.len() as f64 + 3.0), "{m}");

    // A body that streams is never sent again (its bytes are gone once
    // sent): b's 503 is the client's. One announced longer than
    // `request_buffer` (16 KiB)...
    let large = Bytes::from(vec![b'x'; 20_000]);
    let r = c
        .send(Method::PUT, "/", &[("x-user-id", &of_b[0])], large)
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-upstream"], "b");
    // ...and a chunked one of unknown length, however short.
    let mut raw = tokio::net::TcpStream::connect(veer.addr).await.unwrap();
    let put = format!(
        "PUT / HTTP/1.1\r\nHost: {}\r\nx-user-id: {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n1\r\nx\r\n0\r\n\r\n",
        veer.addr, of_b[0]
    );
    tokio::io::AsyncWriteExt::write_all(&mut raw, put.as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_string(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("x-upstream: b"), "{answer}");
    // Nor a POST, even without one (not idempotent).
    let r = c
        .send(Method::POST, "/", &[("x-user-id", &of_b[0])], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let m = veer.metrics().await;
    assert_eq!(metric(&m, SENT), Some(of_b.len() as f64 + 3.0), "{m}");
}

/// A try's short failed answer that a retry replaces is read to its end
/// and its connection kept: an endpoint failing many requests is not also
/// made to take a new connection for each one retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_short_answers_connection_is_kept_not_closed() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let veer = retrying(&[a.addr, b.addr], "", "on = [\"503\"]\n").await;
    let of_b = keys_of(&veer, "b").await;
    b.status.store(503, Ordering::SeqCst);
    let (requests, connections) = (
        b.requests.load(Ordering::SeqCst),
        b.connections.load(Ordering::SeqCst),
    );
    // One after another: each takes b's idle connection, if it is back.
    let keys: Vec<String> = of_b.iter().cycle().take(20).cloned().collect();
    let mut c = Client::connect(veer.addr).await.unwrap();
    for k in &keys {
        let r = c.get("/", &[("x-user-id", k)]).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-upstream"], "a");
        // Its 503's connection is back in the pool (read by a task of
        // its own), or closed, before the next request takes one.
        super::support::wait_endpoint_not_busy(&veer, b.addr).await;
    }
    assert_eq!(b.requests.load(Ordering::SeqCst) - requests, 20);
    // (Closed after each, it would have taken 20.)
    let opened = b.connections.load(Ordering::SeqCst) - connections;
    assert!(opened <= 1, "b took {opened} new connections for 20 tries");
    let m = veer.metrics().await;
    assert_eq!(metric(&m, SENT), Some(20.0), "{m}");
}

/// A try's failed answer whose body trickles is not waited for: veer
/// closes its connection (within a quarter second) rather than hold it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_answer_that_trickles_has_its_connection_closed() {
    // An endpoint answering 503 with a 40-byte body, a byte every 100 ms;
    // says how its connections ended: when veer closed one, the bytes it
    // had written of that body.
    let slow = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_addr = slow.local_addr().unwrap();
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = slow.accept().await {
            let ended_tx = ended_tx.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut buf = [0u8; 4096];
                if !matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                    return;
                }
                let head = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 40\r\n\r\n";
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for written in 0..40u32 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    // (A write after veer closed may still succeed once:
                    // a read says so for sure.)
                    let closed = s.write_all(b"x").await.is_err()
                        || matches!(
                            tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await,
                            Ok(Ok(0) | Err(_))
                        );
                    if closed {
                        let _ = ended_tx.send(Some(written));
                        return;
                    }
                }
                let _ = ended_tx.send(None);
            });
        }
    });
    let a = Upstream::start("a").await;
    let veer = retrying(&[a.addr, slow_addr], "", "on = [\"503\"]\n").await;
    // Keys until one tries the slow endpoint first: answered by a.
    let mut c = Client::connect(veer.addr).await.unwrap();
    for i in 0..100 {
        let r = c
            .get("/", &[("x-user-id", &format!("user-{i}"))])
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-upstream"], "a");
        if let Ok(Some(end)) = ended.try_recv() {
            panic!("a connection ended before the slow one was tried: {end:?}");
        }
        let m = veer.metrics().await;
        if metric(&m, SENT) == Some(1.0) {
            break;
        }
    }
    let end = tokio::time::timeout(Duration::from_secs(20), ended.recv())
        .await
        .expect("the slow answer's connection ended in time");
    // Closed well before its 40 bytes (4 s), not read to the end.
    assert!(matches!(end, Some(Some(n)) if n < 40), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_before_the_answer_is_retried_and_the_budget_caps_retries() {
    // An endpoint that reads each request and closes without answering
    // (a pod killed mid-request), counting the requests it got.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    let got = Arc::new(AtomicU64::new(0));
    let counted = got.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = dead.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    let a = Upstream::start("a").await;
    let plain = route_config(&[a.addr, dead_addr], &[], 0.0, "");
    let veer = Veer::start(&(plain.clone() + "[route.retry]\n")).await;
    // Every key is answered by a, whichever endpoint its first try took.
    let keys: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
    let seen = answers(&veer, &keys).await;
    assert!(
        seen.iter().all(|(s, by)| *s == 200 && by == "a"),
        "{seen:?}"
    );
    let closed = got.load(Ordering::SeqCst);
    assert!(closed >= 1, "no request reached the closing endpoint");
    let m = veer.metrics().await;
    assert_eq!(metric(&m, SENT), Some(closed as f64), "{m}");

    // Without [route.retry], the same failure is the client's 502.
    veer.write_config(&plain);
    veer.wait_generation(2).await;
    let start = std::time::Instant::now();
    loop {
        let before = got.load(Ordering::SeqCst);
        // (Every key: which of them the closing endpoint serves depends
        // on its port, and ten of them may all be a's.)
        let seen = answers(&veer, &keys).await;
        if got.load(Ordering::SeqCst) > before {
            assert!(seen.iter().any(|(s, _)| *s == 502), "{seen:?}");
            break;
        }
        // (The closing endpoint in back-off: every key went to a.)
        assert!(start.elapsed() < Duration::from_secs(30), "never tried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client that leaves while its failed try is being sent again gets a
/// 499 line saying so (`retries`, and the endpoint the retry was out to),
/// and the judge hears the failure, not a request given up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_retry_leaves_the_failure_heard() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let veer = retrying(&[a.addr, b.addr], "timeout = \"30s\"\n", "on = [\"503\"]\n").await;
    let of_b = keys_of(&veer, "b").await;
    b.status.store(503, Ordering::SeqCst);
    a.delay_ms.store(20_000, Ordering::SeqCst);
    let before = a.requests.load(Ordering::SeqCst);
    let mut raw = tokio::net::TcpStream::connect(veer.addr).await.unwrap();
    let get = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nx-user-id: {}\r\n\r\n",
        veer.addr, of_b[0]
    );
    tokio::io::AsyncWriteExt::write_all(&mut raw, get.as_bytes())
        .await
        .unwrap();
    // The retry reached a (which holds it): the client leaves.
    let start = std::time::Instant::now();
    while a.requests.load(Ordering::SeqCst) == before {
        assert!(start.elapsed() < Duration::from_secs(10), "no retry");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(raw);
    let lines = veer.logs_with_at_least("request", 1).await;
    let l = lines
        .iter()
        .find(|l| l["target"] == "veer::access")
        .expect("an access log line");
    assert_eq!(l["status"], 499, "{l}");
    assert_eq!(l["retries"], 1, "{l}");
    assert_eq!(l["upstream"], a.addr.to_string(), "{l}");
    let route = wait_route(&veer, "the failure heard", Duration::from_secs(10), |r| {
        r["window"]["stable"]["errors"].as_u64() >= Some(1)
    })
    .await;
    assert_eq!(route["window"]["stable"]["errors"], 1, "{route}");
}

/// With two retries, each try goes to an endpoint not tried yet: of
/// three endpoints, two answering 503, every request ends at the third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_retry_goes_to_an_endpoint_not_tried_yet() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    let retry = "on = [\"503\"]\nretries = 2\nbudget_percent = 100\n";
    let veer = retrying(&[a.addr, b.addr, c.addr], "", retry).await;
    b.status.store(503, Ordering::SeqCst);
    c.status.store(503, Ordering::SeqCst);
    let keys: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
    let seen = answers(&veer, &keys).await;
    assert!(
        seen.iter().all(|(s, by)| *s == 200 && by == "a"),
        "{seen:?}"
    );
    // Neither failing endpoint was asked twice for one request: b and c
    // together got at most one try per key that did not start at a, and a
    // got each key once.
    assert_eq!(a.requests.load(Ordering::SeqCst), keys.len() as u64);
    let failing = b.requests.load(Ordering::SeqCst) + c.requests.load(Ordering::SeqCst);
    let m = veer.metrics().await;
    assert_eq!(metric(&m, SENT), Some(failing as f64), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_lets_a_failing_versions_requests_fail_rather_than_double() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let veer = retrying(
        &[a.addr, b.addr],
        "",
        "on = [\"503\"]\nbudget_percent = 1\n",
    )
    .await;
    // Both endpoints answer 503: every request is a retry candidate; the
    // budget (10 a second over 10 s, plus 1 %) runs out, and past it the
    // clients get the 503 without a second try.
    a.status.store(503, Ordering::SeqCst);
    b.status.store(503, Ordering::SeqCst);
    let mut c = Client::connect(veer.addr).await.unwrap();
    let mut sent = 0u64;
    let spent = loop {
        let key = format!("user-{sent}");
        let r = c.get("/", &[("x-user-id", &key)]).await.unwrap();
        assert_eq!(r.status(), 503);
        sent += 1;
        if sent % 50 == 0 {
            let spent = metric(&veer.metrics().await, SPENT).unwrap_or(0.0);
            if spent > 0.0 {
                break spent;
            }
        }
        assert!(sent < 5_000, "the budget never ran out");
    };
    let m = veer.metrics().await;
    let retried = metric(&m, SENT).unwrap_or(0.0);
    assert!(spent >= 1.0 && retried >= 100.0, "{m}");
    assert!(
        retried <= 100.0 + sent as f64 * 0.01 * 2.0 + 100.0,
        "{retried} retries of {sent}"
    );
}

#[test]
fn veer_check_says_what_a_routes_retries_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("veer.toml");
    std::fs::write(
        &path,
        "[[route]]\nname = \"web\"\ntimeout = \"5s\"\n[route.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:9000\", \"127.0.0.1:9001\"]\n\
         [route.retry]\non = [\"reset\", \"timeout\", \"503\"]\ntry_timeout = \"1s\"\n",
    )
    .unwrap();
    let out = super::support::veer_cli(&["check", "--config", path.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = "    retry (a request of an idempotent method, without a body or with one of at most 16384 bytes announced) on a connection closed before the answer, no answer within 1s, 503: up to 1 more time(s), to the next endpoint of its version, at most 20% of the route's requests\n";
    assert!(text.contains(line), "{text}");
}
