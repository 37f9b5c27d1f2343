//! Webhook notifications: one JSON event per verdict change, revert, rollout
//! step and operator action, POSTed to the route's `[route.judge] webhook`.
//!
//! Delivery never blocks the judge or the data plane: the controller hands
//! events to a bounded queue (a full queue drops the event and counts it),
//! and one background task delivers them in order, each with a 2 s timeout
//! and up to 3 attempts with back-off.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request};
use http_body_util::Full;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus::IntCounterVec;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use veer_control::config::Webhook;

/// Events waiting for delivery before new ones are dropped.
const QUEUE: usize = 256;
/// Attempts per event.
const ATTEMPTS: u32 = 3;
/// Time allowed for one attempt (connect, send, response head).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Hands events to the delivery task.
#[derive(Clone)]
pub struct Notifier {
    tx: mpsc::Sender<(Webhook, Value)>,
    results: IntCounterVec,
}

impl Notifier {
    /// Starts the delivery task; `results` counts outcomes by `result`.
    pub fn start(results: IntCounterVec) -> Notifier {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(deliver_all(rx, results.clone()));
        Notifier { tx, results }
    }

    /// Queues an event for `hook`; drops it (and counts it) if the queue is full.
    pub fn send(&self, hook: &Webhook, event: Value) {
        if self.tx.try_send((hook.clone(), event)).is_err() {
            self.results.with_label_values(&["dropped"]).inc();
            tracing::warn!(webhook = %hook.url, "webhook queue full; event dropped");
        }
    }
}

async fn deliver_all(mut rx: mpsc::Receiver<(Webhook, Value)>, results: IntCounterVec) {
    while let Some((hook, event)) = rx.recv().await {
        let body = Bytes::from(serde_json::to_vec(&event).unwrap_or_default());
        let mut delivered = false;
        for attempt in 0..ATTEMPTS {
            match tokio::time::timeout(ATTEMPT_TIMEOUT, post(&hook, body.clone())).await {
                Ok(Ok(status)) if status.is_success() => {
                    delivered = true;
                    break;
                }
                Ok(Ok(status)) => {
                    tracing::warn!(webhook = %hook.url, %status, attempt, "webhook refused the event")
                }
                Ok(Err(e)) => {
                    tracing::warn!(webhook = %hook.url, error = %e, attempt, "webhook delivery failed")
                }
                Err(_) => {
                    tracing::warn!(webhook = %hook.url, attempt, "webhook delivery timed out")
                }
            }
            tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
        }
        let result = if delivered { "ok" } else { "failed" };
        results.with_label_values(&[result]).inc();
    }
}

async fn post(
    hook: &Webhook,
    body: Bytes,
) -> Result<http::StatusCode, Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(&hook.authority).await?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::post(&hook.path)
        .header(header::HOST, &hook.authority)
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("veer/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(body))?;
    let resp = sender.send_request(req).await?;
    Ok(resp.status())
}
