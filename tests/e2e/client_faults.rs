//! A client's fault is never a version's: stalled, aborted and malformed
//! uploads get the client's own status, count as proxy errors, and never
//! move the judge; the route timeout counts the upstream's time only.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::support::{metric, reference_judge, Upstream, Veer};

fn config(stable: std::net::SocketAddr, canary: std::net::SocketAddr, timeout: &str) -> String {
    format!(
        r#"[proxy]
listen = ["127.0.0.1:0"]
body_timeout = "1s"
[admin]
listen = "127.0.0.1:0"
[state]
dir = "@STATE@"

[[route]]
name = "web"
sticky = ["header:x-user-id"]
timeout = "{timeout}"
connect_timeout = "{timeout}"
[route.stable]
version = "v1"
endpoints = ["{stable}"]
[route.canary]
version = "v2"
endpoints = ["{canary}"]
weight = 100
"#
    ) + &reference_judge()
}

/// Sends `head` and `body` on a fresh connection, then (`close`) shuts the
/// write side or waits; returns the status line's code, if any came.
async fn raw(addr: std::net::SocketAddr, head: &str, body: &[u8], close: bool) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(head.as_bytes()).await.ok()?;
    s.write_all(body).await.ok()?;
    if close {
        // The client leaves mid-body.
        drop(s);
        return None;
    }
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let line = String::from_utf8_lossy(&buf[..n]).to_string();
    line.split(' ').nth(1)?.parse().ok()
}

/// Asserts that the metrics `m` count `n` refusals of `kind` as the
/// client's, and nothing against the canary.
fn only_the_clients(m: &str, kind: &str, n: f64) {
    let name = format!(r#"veer_proxy_errors_total{{kind="{kind}"}}"#);
    assert_eq!(metric(m, &name), Some(n), "{m}");
    no_upstream_error_for_the_canary(m);
}

/// Asserts that the metrics `m` count no upstream error of any kind for
/// the canary (`v2` of route `web`).
fn no_upstream_error_for_the_canary(m: &str) {
    for kind in ["connect", "timeout", "reset", "protocol"] {
        let v = metric(
            m,
            &format!(r#"veer_upstream_errors_total{{kind="{kind}",route="web",version="v2"}}"#),
        );
        assert!(
            v.unwrap_or(0.0) == 0.0,
            "{kind} counted for the canary: {v:?}"
        );
    }
}

fn post_head(user: &str, framing: &str) -> String {
    format!("POST /upload HTTP/1.1\r\nhost: app\r\nx-user-id: {user}\r\n{framing}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_aborted_and_malformed_uploads_never_count_against_a_version() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    // A route timeout shorter than body_timeout: a stall that the route
    // clock counted would be the canary's 504.
    let veer = Veer::start(&config(stable.addr, canary.addr, "300ms")).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let addr = veer.addr;
        tasks.push(tokio::spawn(async move {
            let stalled = raw(
                addr,
                &post_head(&format!("stall{i}"), "content-length: 100\r\n"),
                b"0123456789",
                false,
            )
            .await;
            let malformed = raw(
                addr,
                &post_head(&format!("bad{i}"), "transfer-encoding: chunked\r\n"),
                b"zz\r\nnot a chunk\r\n",
                false,
            )
            .await;
            raw(
                addr,
                &post_head(&format!("abort{i}"), "content-length: 100\r\n"),
                b"0123456789",
                true,
            )
            .await;
            (stalled, malformed)
        }));
    }
    for t in tasks {
        let (stalled, malformed) = t.await.unwrap();
        assert_eq!(stalled, Some(408), "a stalled upload is the client's 408");
        assert_eq!(malformed, Some(400), "a malformed body is the client's 400");
    }
    // Every aborted upload has reached the upstream and been given up on.
    let m = {
        let until = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let m = veer.metrics().await;
            if metric(&m, r#"veer_proxy_errors_total{kind="client_aborted"}"#) >= Some(20.0) {
                break m;
            }
            assert!(
                std::time::Instant::now() < until,
                "aborted uploads not all counted:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(
        metric(&m, r#"veer_proxy_errors_total{kind="client_timeout"}"#),
        Some(20.0)
    );
    assert_eq!(
        metric(&m, r#"veer_proxy_errors_total{kind="client_bad_body"}"#),
        Some(20.0)
    );
    no_upstream_error_for_the_canary(&m);
    assert_eq!(
        metric(
            &m,
            r#"veer_requests_total{code="5xx",route="web",version="v2"}"#
        )
        .unwrap_or(0.0),
        0.0
    );
    // Give the judge a few ticks over all of it: nothing to act on.
    let until = std::time::Instant::now() + Duration::from_millis(2500);
    while std::time::Instant::now() < until {
        let s = veer.status().await;
        let r = &s["routes"][0];
        assert_ne!(r["verdict"], "reverted", "{r}");
        assert_eq!(r["weight"]["effective"], 100.0, "{r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(veer.logs_with("canary reverted").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_to_a_fast_upstream_is_neither_timed_out_nor_slow() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let veer = Veer::start(&config(stable.addr, canary.addr, "1s")).await;
    let mut s = TcpStream::connect(veer.addr).await.unwrap();
    s.write_all(post_head("slow-uploader", "content-length: 40\r\n").as_bytes())
        .await
        .unwrap();
    // 2.5 s of upload, a frame every 500 ms (well inside body_timeout):
    // longer than the route's 1 s timeout, which counts the upstream only.
    for _ in 0..5 {
        s.write_all(b"01234567").await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&buf).contains("0123456701234567") {
        assert!(std::time::Instant::now() < until, "no full answer: {buf:?}");
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // Nor is the upload the version's latency: the judge records the
    // canary's answer at the time it took once it had the body, not at the
    // upload's 2 s (over the reference judge's 800 ms p99 limit: a client
    // with a canary key could slow-upload a good canary out). The window
    // shows the request once the judge has ticked.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    let window = loop {
        let w = veer.status().await["routes"][0]["window"]["canary"].clone();
        if w["requests"].as_u64() == Some(1) {
            break w;
        }
        assert!(
            std::time::Instant::now() < until,
            "never in the window: {w}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let p99 = window["p99_ms"].as_f64().unwrap();
    assert!(
        p99 < 1_000.0,
        "the upload's time was the version's: {window}"
    );
    // What the client waited for is still the request's duration.
    let m = veer.metrics().await;
    let sum = metric(
        &m,
        r#"veer_request_duration_seconds_sum{route="web",version="v2"}"#,
    )
    .unwrap();
    assert!(sum >= 1.9, "{sum}");
}

/// What a [`silent_upstream`] saw on one of its connections.
#[derive(Debug, PartialEq)]
enum Seen {
    /// A whole request head came.
    Head,
    /// The connection closed after one had.
    Closed,
}

/// An upstream that reads requests and never answers: it tells when a
/// head came on a connection, and when that connection closed.
async fn silent_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Seen>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if !super::support::read_head(&mut s).await {
                    return;
                }
                let _ = tx.send(Seen::Head);
                let mut buf = [0u8; 1024];
                // Bounded: a proxy that never gives up ends the wait too.
                let until = std::time::Instant::now() + Duration::from_secs(120);
                while std::time::Instant::now() < until {
                    let read = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf));
                    if let Ok(Ok(0) | Err(_)) = read.await {
                        break;
                    }
                }
                let _ = tx.send(Seen::Closed);
            });
        }
    });
    (addr, rx)
}

/// The next thing the upstream saw, waiting at most 20 s.
async fn next_seen(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>) -> Option<Seen> {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .ok()
        .flatten()
}

/// Sends `request` on `client`, waits for the upstream to have it, leaves,
/// and asserts that the upstream's connection closed: `what` says which
/// client it was.
async fn send_and_leave<S: tokio::io::AsyncWrite + Unpin>(
    mut client: S,
    request: &[u8],
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>,
    what: &str,
) {
    client.write_all(request).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(next_seen(seen).await, Some(Seen::Head), "{what}");
    drop(client);
    assert_eq!(
        next_seen(seen).await,
        Some(Seen::Closed),
        "the upstream request outlived its client: {what}"
    );
}

/// A client that closes its connection while its request waits for the
/// upstream gives the request up there too (veer closes the upstream
/// connection, as nginx and hyper do), long before the route's timeout:
/// over plain HTTP (veer watches the socket) and over TLS (hyper reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_request_gives_it_up_upstream() {
    let (upstream, mut seen) = silent_upstream().await;
    let config = super::support::route_config(&[upstream], &[], 0.0, "timeout = \"100s\"")
        .replace("[proxy]\n", "[proxy]\naccess_log = \"errors\"\n");
    let veer = Veer::start_tls(&config).await;
    let head = b"GET /slow HTTP/1.1\r\nhost: app\r\nx-user-id: leaver\r\n\r\n";

    // Plain HTTP: the request reaches the upstream, and the client leaves.
    let plain = TcpStream::connect(veer.addr).await.unwrap();
    send_and_leave(plain, head, &mut seen, "plain HTTP").await;
    // A request with a body, read whole: the client leaves while its
    // answer is awaited.
    let plain = TcpStream::connect(veer.addr).await.unwrap();
    let post = b"POST /slow HTTP/1.1\r\nhost: app\r\ncontent-length: 5\r\n\r\nhello";
    send_and_leave(plain, post, &mut seen, "after its body").await;
    // The same over TLS.
    let tls = super::protocols::tls_connect(veer.tls_addr.unwrap(), &[b"http/1.1"]).await;
    send_and_leave(tls, head, &mut seen, "TLS").await;
    // HTTP/2 (h2c): the client resets the request's stream, its
    // connection stays open.
    let tcp = TcpStream::connect(veer.addr).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/slow", veer.addr))
        .header("x-user-id", "leaver")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let call = tokio::spawn(h2.send_request(req));
    assert_eq!(next_seen(&mut seen).await, Some(Seen::Head), "h2");
    call.abort(); // the response future dropped: RST_STREAM(CANCEL)
    assert_eq!(
        next_seen(&mut seen).await,
        Some(Seen::Closed),
        "the upstream request outlived its stream"
    );
    assert!(!conn.is_finished(), "the h2 connection stays open");

    // The client's leaving is no version's failure: it is counted, and
    // logged as nginx logs it, with the endpoint it was waiting for.
    let m = veer.metrics().await;
    assert_eq!(
        metric(&m, r#"veer_proxy_errors_total{kind="client_closed"}"#),
        Some(4.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"veer_requests_given_up_total{route="web",version="v1"}"#
        ),
        Some(4.0),
        "{m}"
    );
    let lines = veer.logs_with_at_least("request", 4).await;
    assert!(
        lines.len() == 4
            && lines.iter().all(|l| l["status"] == 499
                && l["error"] == "client_closed"
                && l["version"] == "v1"
                && l["upstream"] == upstream.to_string()),
        "{lines:?}"
    );
    assert_eq!(
        metric(
            &m,
            r#"veer_requests_total{code="5xx",route="web",version="v1"}"#
        )
        .unwrap_or(0.0),
        0.0,
        "{m}"
    );
}

/// `config` with `[proxy] max_request_body = {max}` and a route `/files`
/// that lifts it (`max_request_body = 0`).
fn limited_config(stable: std::net::SocketAddr, canary: std::net::SocketAddr, max: u64) -> String {
    config(stable, canary, "5s").replacen(
        "body_timeout = \"1s\"\n",
        &format!("body_timeout = \"1s\"\nmax_request_body = {max}\n"),
        1,
    ) + &format!(
        r#"
[[route]]
name = "files"
path_prefix = "/files"
max_request_body = 0
[route.stable]
version = "v1"
endpoints = ["{stable}"]
"#
    )
}

/// The status of a POST of `len` bytes announced by `Content-Length`.
async fn post_of(addr: std::net::SocketAddr, user: &str, len: usize) -> Option<u16> {
    let head = post_head(user, &format!("content-length: {len}\r\n"));
    raw(addr, &head, &vec![b'p'; len], false).await
}

/// A chunked body of two 600-byte chunks, whole.
const TWO_CHUNKS_OF_600: &str = "258\r\n";

fn two_chunks() -> Vec<u8> {
    let mut body = Vec::new();
    for _ in 0..2 {
        body.extend_from_slice(TWO_CHUNKS_OF_600.as_bytes());
        body.extend_from_slice(&[b'c'; 600]);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    body
}

/// An HTTP/2 POST of two 600-byte DATA frames, with their length
/// announced (`content-length`) or not.
async fn h2_post(addr: std::net::SocketAddr, user: &str, announced: bool) -> u16 {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let frames = (0..2).map(|_| {
        Ok::<_, std::convert::Infallible>(Frame::data(bytes::Bytes::from(vec![b'h'; 600])))
    });
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let mut sender = super::support::h2c(addr).await;
    let mut req = http::Request::post(format!("http://{addr}/upload"))
        .header("x-user-id", user)
        .body(body)
        .unwrap();
    if announced {
        req.headers_mut()
            .insert("content-length", http::HeaderValue::from(1200));
    }
    sender.send_request(req).await.unwrap().status().as_u16()
}

/// A client's connection, plain or TLS.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send {}
impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send> Stream for S {}

/// What veer sends on `s` until it closes the connection, lower-cased.
async fn answer_to_close(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut answer))
        .await
        .expect("the connection is closed after the 413")
        .unwrap();
    String::from_utf8_lossy(&answer).to_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_a_body_too_long_reads_its_413_not_a_reset() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let veer = Veer::start_tls(&limited_config(stable.addr, canary.addr, 1000)).await;
    // As curl uploads a file (without `Expect: 100-continue`): the whole
    // body, announced or chunked, written before the answer is read. veer
    // answers 413 after the head, or once past the limit, and closes;
    // closing with the rest unread would make the kernel reset the
    // connection, and the client's writes (and its answer) would fail.
    // Over plain HTTP and over TLS.
    let body = vec![b'x'; 4 << 20];
    for i in 0..8 {
        let chunked = i % 2 == 1;
        let tls = i >= 4;
        let mut s: std::pin::Pin<Box<dyn Stream>> = if tls {
            Box::pin(super::protocols::tls_connect(veer.tls_addr.unwrap(), &[b"http/1.1"]).await)
        } else {
            Box::pin(TcpStream::connect(veer.addr).await.unwrap())
        };
        let framing = if chunked {
            "transfer-encoding: chunked\r\n".to_string()
        } else {
            format!("content-length: {}\r\n", body.len())
        };
        s.write_all(post_head(&format!("curl{i}"), &framing).as_bytes())
            .await
            .unwrap();
        let sent = async {
            if chunked {
                for piece in body.chunks(64 << 10) {
                    s.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                        .await?;
                    s.write_all(piece).await?;
                    s.write_all(b"\r\n").await?;
                }
                s.write_all(b"0\r\n\r\n").await
            } else {
                s.write_all(&body).await
            }
        };
        tokio::time::timeout(Duration::from_secs(20), sent)
            .await
            .expect("veer reads what it does not take")
            .unwrap_or_else(|e| panic!("upload {i} (chunked: {chunked}, TLS: {tls}) broken: {e}"));
        let answer = answer_to_close(&mut s).await;
        assert!(answer.starts_with("http/1.1 413"), "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_longer_than_the_route_takes_are_the_clients_413_never_the_versions() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let veer = Veer::start(&limited_config(stable.addr, canary.addr, 1000)).await;
    let addr = veer.addr;
    // Announced too long: answered at once, before any of the body is
    // sent (the client waits for `100 Continue`, which never comes) and
    // before the upstream hears of it; the connection is closed.
    for i in 0..10 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = post_head(
            &format!("announced{i}"),
            "content-length: 2000\r\nexpect: 100-continue\r\n",
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let answer = answer_to_close(&mut s).await;
        assert!(answer.starts_with("http/1.1 413"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
    }
    assert_eq!(canary.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Found too long as it streams: chunked over HTTP/1.1, DATA frames of
    // no announced length over HTTP/2 (whole, each would be served); and
    // announced too long over HTTP/2. A route's limit no longer than
    // `request_buffer` has such a body read before it goes: no upstream
    // hears of any of them.
    let heard = || {
        stable.requests.load(std::sync::atomic::Ordering::SeqCst)
            + canary.requests.load(std::sync::atomic::Ordering::SeqCst)
    };
    let before = heard();
    for i in 0..10 {
        let chunked = raw(
            addr,
            &post_head(&format!("chunked{i}"), "transfer-encoding: chunked\r\n"),
            &two_chunks(),
            false,
        )
        .await;
        assert_eq!(chunked, Some(413), "a chunked body over the limit");
        assert_eq!(h2_post(addr, &format!("h2-{i}"), false).await, 413);
        assert_eq!(h2_post(addr, &format!("h2-announced{i}"), true).await, 413);
    }
    // Its first chunk within the limit, the rest a moment later (time
    // enough for a streamed request's head to reach the upstream).
    for i in 0..3 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = post_head(&format!("later{i}"), "transfer-encoding: chunked\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        let body = two_chunks();
        let (first, rest) = body.split_at(TWO_CHUNKS_OF_600.len() + 602);
        s.write_all(first).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(rest).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }
    assert_eq!(
        heard(),
        before,
        "an over-limit body's head reached an upstream"
    );
    // Within the limit, and on a route that lifts it, bodies go through.
    assert_eq!(post_of(addr, "within", 1000).await, Some(200));
    let files = "POST /files/a HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\n";
    assert_eq!(raw(addr, files, &two_chunks(), false).await, Some(200));
    let m = veer.metrics().await;
    only_the_clients(&m, "body_too_large", 43.0);
    let s = veer.status().await;
    assert_ne!(s["routes"][0]["verdict"], "reverted", "{}", s["routes"][0]);
    assert!(veer.logs_with("canary reverted").is_empty());
    // The limit is reloaded with the file.
    veer.write_config(&limited_config(stable.addr, canary.addr, 3000));
    veer.wait_generation(2).await;
    assert_eq!(post_of(addr, "raised", 2000).await, Some(200));
}

/// `config` with a rate limit on route `web` (one request every 20 s
/// after a burst: no token comes back while the test runs) and the route
/// `timeout`.
fn rate_limited_config(
    stable: std::net::SocketAddr,
    canary: std::net::SocketAddr,
    burst: u32,
    timeout: &str,
) -> String {
    config(stable, canary, timeout)
        + &format!("[route.rate_limit]\nrequests_per_second = 0.05\nburst = {burst}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_gets_429_and_others_and_the_version_are_untouched() {
    use super::support::Client;
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let veer = Veer::start(&rate_limited_config(stable.addr, canary.addr, 3, "5s")).await;
    let mut c = Client::connect(veer.addr).await.unwrap();
    let status = |r: &http::Response<bytes::Bytes>| r.status().as_u16();
    for i in 0..3 {
        let r = c
            .get("/", &[("x-user-id", &format!("u{i}"))])
            .await
            .unwrap();
        assert_eq!(status(&r), 200, "within the burst");
    }
    // Another sticky key changes nothing: the bucket is the address's.
    let r = c.get("/", &[("x-user-id", "fresh-key")]).await.unwrap();
    assert_eq!(status(&r), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&wait), "retry-after {wait}");
    // Over HTTP/2 from the same address too.
    let mut h2 = super::support::h2c::<http_body_util::Empty<bytes::Bytes>>(veer.addr).await;
    let req = http::Request::get(format!("http://{}/", veer.addr))
        .body(http_body_util::Empty::new())
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 429);
    // Another client address has its own bucket.
    let other = "127.0.0.2".parse().unwrap();
    let mut o = Client::connect_from(veer.addr, other).await.unwrap();
    assert_eq!(status(&o.get("/", &[]).await.unwrap()), 200);
    let served = canary.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(served, 4, "refused requests never reach the version");
    let m = veer.metrics().await;
    only_the_clients(&m, "rate_limited", 2.0);
    assert_eq!(
        metric(
            &m,
            r#"veer_requests_total{code="4xx",route="web",version="v2"}"#
        )
        .unwrap_or(0.0),
        0.0,
        "{m}"
    );
    // A reload that leaves the limit as it was keeps the buckets; one that
    // changes it starts them afresh.
    veer.write_config(&rate_limited_config(stable.addr, canary.addr, 3, "6s"));
    veer.wait_generation(2).await;
    assert_eq!(status(&c.get("/", &[]).await.unwrap()), 429);
    veer.write_config(&rate_limited_config(stable.addr, canary.addr, 4, "6s"));
    veer.wait_generation(3).await;
    assert_eq!(status(&c.get("/", &[]).await.unwrap()), 200);
    let s = veer.status().await;
    assert_ne!(s["routes"][0]["verdict"], "reverted", "{}", s["routes"][0]);
}

/// The status of a GET with `key` as its `x-api-key` (none if empty).
async fn keyed(c: &mut super::support::Client, key: &str) -> u16 {
    let headers: &[(&str, &str)] = if key.is_empty() {
        &[]
    } else {
        &[("x-api-key", key)]
    };
    c.get("/", headers).await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_keyed_by_a_header_counts_each_key_whatever_its_address() {
    use super::support::Client;
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let config =
        rate_limited_config(stable.addr, canary.addr, 2, "5s") + "key = \"header:x-api-key\"\n";
    let veer = Veer::start(&config).await;
    let mut one = Client::connect(veer.addr).await.unwrap();
    let mut two = Client::connect_from(veer.addr, "127.0.0.2".parse().unwrap())
        .await
        .unwrap();
    // Team a's burst of 2 is spent from two addresses.
    assert_eq!(keyed(&mut one, "team-a").await, 200);
    assert_eq!(keyed(&mut two, "team-a").await, 200);
    assert_eq!(keyed(&mut one, "team-a").await, 429);
    // Team b, from the same address, has its own.
    assert_eq!(keyed(&mut one, "team-b").await, 200);
    // Without the header: the address's bucket.
    assert_eq!(keyed(&mut one, "").await, 200);
    assert_eq!(keyed(&mut one, "").await, 200);
    assert_eq!(keyed(&mut one, "").await, 429);
    let m = veer.metrics().await;
    only_the_clients(&m, "rate_limited", 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_serves_only_the_client_addresses_it_allows_and_never_those_it_denies() {
    use super::support::Client;
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let open = config(stable.addr, canary.addr, "5s").replacen(
        "[proxy]\n",
        "[proxy]\ntrusted_hops = 1\n",
        1,
    );
    // 127.0.0.2 and .3 allowed, .3 denied all the same.
    let closed = open.replacen(
        "name = \"web\"\n",
        "name = \"web\"\nallow_from = [\"127.0.0.2/31\"]\ndeny_from = [\"127.0.0.3\"]\n",
        1,
    );
    let veer = Veer::start(&closed).await;
    let from = |ip: &str| Client::connect_from(veer.addr, ip.parse().unwrap());
    let status = |r: http::Response<bytes::Bytes>| r.status().as_u16();
    let mut one = from("127.0.0.1").await.unwrap();
    assert_eq!(status(one.get("/", &[]).await.unwrap()), 403);
    let mut two = from("127.0.0.2").await.unwrap();
    assert_eq!(status(two.get("/", &[]).await.unwrap()), 200);
    let mut three = from("127.0.0.3").await.unwrap();
    assert_eq!(status(three.get("/", &[]).await.unwrap()), 403);
    // The address stickiness sees: the trusted proxy's client.
    let forwarded = one
        .get("/", &[("x-forwarded-for", "127.0.0.2")])
        .await
        .unwrap();
    assert_eq!(status(forwarded), 200);
    assert_eq!(canary.requests.load(std::sync::atomic::Ordering::SeqCst), 2);
    let m = veer.metrics().await;
    only_the_clients(&m, "forbidden", 2.0);
    // Reloaded without the ranges, the route serves everyone.
    veer.write_config(&open);
    veer.wait_generation(2).await;
    assert_eq!(status(one.get("/", &[]).await.unwrap()), 200);
}
