//! Webhook events through the real binary, over HTTP and verified HTTPS.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::support::{
    metric, route_config, wait_verdict, Load, Upstream, Veer, FAST_JUDGE as JUDGE,
};

/// Collects the JSON bodies POSTed to it.
async fn webhook_receiver() -> (
    std::net::SocketAddr,
    Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    webhook_receiver_with(None).await
}

/// Collects the JSON events POSTed to it, over TLS when `tls` is given.
async fn webhook_receiver_with(
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (
    std::net::SocketAddr,
    Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let events: Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Arc::default();
    let sink = events.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let sink = sink.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let sink = sink.clone();
                        async move {
                            let body = http_body_util::BodyExt::collect(req.into_body())
                                .await
                                .unwrap()
                                .to_bytes();
                            sink.lock()
                                .unwrap()
                                .push(serde_json::from_slice(&body).unwrap_or_default());
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::new()),
                            ))
                        }
                    });
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                    }
                    None => {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                    }
                }
            });
        }
    });
    (addr, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_webhook_gets_events_only_from_a_verified_server() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.key_pair.serialize_der()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let (hook, events) = webhook_receiver_with(Some(acceptor)).await;
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = ca_dir.path().join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    // Another CA: the same server must then be refused.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let wrong = ca_dir.path().join("wrong.pem");
    std::fs::write(&wrong, other.cert.pem()).unwrap();

    for (ca_file, trusted) in [(&wrong, false), (&ca, true)] {
        let s = Upstream::start("stable").await;
        let c = Upstream::start("canary").await;
        c.status.store(500, Ordering::SeqCst);
        let before = events.lock().unwrap().len();
        let config = route_config(&[s.addr], &[c.addr], 20.0, "")
            + JUDGE
            + &format!(
                "webhook = \"https://{hook}/veer-events\"\nwebhook_ca_file = \"{}\"\n",
                ca_file.display()
            );
        let veer = Veer::start(&config).await;
        let load = Load::start(veer.addr, 4, Duration::ZERO);
        wait_verdict(&veer, "reverted", Duration::from_secs(10)).await;
        load.stop().await;
        let result = if trusted { "ok" } else { "failed" };
        let start = Instant::now();
        let m = loop {
            let m = veer.metrics().await;
            if metric(
                &m,
                &format!("veer_webhook_events_total{{result=\"{result}\"}}"),
            ) >= Some(1.0)
            {
                break m;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{m}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let got = events.lock().unwrap().len() - before;
        if trusted {
            assert!(got >= 1, "{m}");
        } else {
            assert_eq!(got, 0, "an unverified server got events");
            assert!(!veer
                .logs_with_at_least("webhook delivery failed", 1)
                .await
                .is_empty());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_is_announced_on_the_webhook() {
    let (veer, events, _upstreams) = reverted_with_hook("", "").await;
    let start = Instant::now();
    loop {
        let got = events.lock().unwrap().clone();
        let reverted = got.iter().find(|e| e["event"] == "reverted");
        let verdict = got
            .iter()
            .find(|e| e["event"] == "verdict_changed" && e["to"] == "reverted");
        if let (Some(r), Some(v)) = (reverted, verdict) {
            assert_eq!(r["route"], "web");
            assert_eq!(r["canary"], "v2");
            assert_eq!(r["effective_weight"], 0.0);
            assert!(r["reason"].as_str().unwrap().contains("canary"), "{r}");
            assert_ne!(v["from"], "reverted");
            assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "events: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The receiver has both events; veer counts a delivery once the
    // answer is back, a moment later on a busy machine.
    loop {
        let m = veer.metrics().await;
        if metric(&m, r#"veer_webhook_events_total{result="ok"}"#) >= Some(2.0) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `webhook_format = "slack"`: each event is one message for people, with
/// a link to `/status` when `[admin] public_url` is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_webhook_gets_a_message_people_read() {
    let (_veer, events, _upstreams) = reverted_with_hook(
        "public_url = \"https://veer.example.com/\"\n",
        "webhook_format = \"slack\"\n",
    )
    .await;
    let start = Instant::now();
    loop {
        let got = events.lock().unwrap().clone();
        let revert = got
            .iter()
            .filter_map(|e| e["text"].as_str())
            .find(|t| t.starts_with("veer reverted"));
        if let Some(text) = revert {
            assert!(text.contains("canary v2 of route web"), "{text}");
            assert!(
                text.ends_with("Status: https://veer.example.com/status"),
                "{text}"
            );
            // Nothing but the message: Slack rejects unknown shapes.
            assert!(
                got.iter()
                    .all(|e| e.as_object().is_some_and(|o| o.len() == 1)),
                "{got:?}"
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "events: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A veer whose failing canary has just been reverted, with a webhook
/// receiver; `admin` and `judge` are extra lines for those sections.
async fn reverted_with_hook(admin: &str, judge: &str) -> (Veer, Events, [Arc<Upstream>; 2]) {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.status.store(500, Ordering::SeqCst);
    let (hook, events) = webhook_receiver().await;
    let config = route_config(&[s.addr], &[c.addr], 20.0, "")
        .replace("[admin]\n", &format!("[admin]\n{admin}"))
        + JUDGE
        + &format!("webhook = \"http://{hook}/veer-events\"\n{judge}");
    let veer = Veer::start(&config).await;
    let load = Load::start(veer.addr, 4, Duration::ZERO);
    wait_verdict(&veer, "reverted", Duration::from_secs(10)).await;
    load.stop().await;
    (veer, events, [s, c])
}

/// What a webhook receiver got.
type Events = Arc<std::sync::Mutex<Vec<serde_json::Value>>>;
