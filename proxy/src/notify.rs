//! Webhook notifications: one JSON event per verdict change, revert, rollout
//! step and operator action, POSTed to the route's `[route.judge] webhook`.
//!
//! Delivery never blocks the judge or the data plane: the controller hands
//! events to a bounded queue (a full queue drops the event and counts it),
//! and one background task delivers them in order, each with a 2 s timeout
//! and up to 3 attempts with back-off.
//!
//! `webhook_format = "slack"` or `"teams"` turns each event into one short
//! message for people (what happened to which route, the evidence in one
//! line, a link to `/status` when `[admin] public_url` is set) in the chat
//! tool's incoming-webhook format; `"json"` (the default) posts the event.
//!
//! `https://` webhooks are verified against the Mozilla roots built into
//! veer (`webpki-roots`, so a distroless image needs no CA store), or
//! against the route's `webhook_ca_file` instead.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request};
use http_body_util::Full;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus::IntCounterVec;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use veer_control::config::{Webhook, WebhookFormat};

/// Any delivery failure.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
            tracing::warn!(webhook = %hook.redacted(), "webhook queue full; event dropped");
        }
    }
}

/// The body POSTed for `event` to `hook`.
fn render(hook: &Webhook, event: &Value) -> Value {
    let text = || message(event, hook.status_url.as_deref());
    match hook.format {
        WebhookFormat::Json => event.clone(),
        // Slack's incoming webhooks take `text` (mrkdwn).
        WebhookFormat::Slack => serde_json::json!({ "text": text() }),
        // Teams Workflows ("post to a channel when a webhook request is
        // received") take a message with an Adaptive Card attachment.
        WebhookFormat::Teams => serde_json::json!({
            "type": "message",
            "attachments": [{
                "contentType": "application/vnd.microsoft.card.adaptive",
                "content": {
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard",
                    "version": "1.4",
                    "body": [{ "type": "TextBlock", "text": text(), "wrap": true }],
                },
            }],
        }),
    }
}

/// One event as a sentence or two for people.
fn message(event: &Value, status_url: Option<&str>) -> String {
    let s = |k: &str| event.get(k).and_then(Value::as_str).unwrap_or("?");
    let n = |k: &str| event.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let route = s("route");
    let canary = s("canary");
    let what = match s("event") {
        "reverted" => format!(
            "veer reverted canary {canary} of route {route} (it had {}% of traffic): {}: {}",
            n("weight_before"),
            s("guard"),
            s("reason")
        ),
        "rollout_advanced" => format!(
            "veer advanced the rollout of route {route}: canary {canary} now gets {}% (step {})",
            n("weight"),
            n("step")
        ),
        "operator_action" => match event.get("said").and_then(Value::as_str) {
            Some(said) => format!(
                "An operator ({said}) ran {} on route {route}: canary {canary} now gets {}%",
                s("action"),
                n("effective_weight")
            ),
            None => format!(
                "An operator ran {} on route {route}: canary {canary} now gets {}%",
                s("action"),
                n("effective_weight")
            ),
        },
        "verdict_changed" => format!(
            "Route {route}: verdict {} -> {} (canary {canary} at {}%): {}",
            s("from"),
            s("to"),
            n("effective_weight"),
            s("reason")
        ),
        "smoke_checked" if event.get("passed").and_then(Value::as_bool) == Some(true) => format!(
            "Smoke checks passed for canary {canary} of route {route}: it gets traffic as configured"
        ),
        "smoke_checked" => format!(
            "Smoke checks FAILED for canary {canary} of route {route}: it gets no traffic. {}",
            s("reason")
        ),
        other => format!("veer event {other} on route {route}"),
    };
    match status_url {
        Some(url) => format!("{what}\nStatus: {url}"),
        None => what,
    }
}

async fn deliver_all(mut rx: mpsc::Receiver<(Webhook, Value)>, results: IntCounterVec) {
    while let Some((hook, event)) = rx.recv().await {
        let body = Bytes::from(serde_json::to_vec(&render(&hook, &event)).unwrap_or_default());
        let tls = match hook.tls.then(|| tls_config(&hook)).transpose() {
            Ok(tls) => tls,
            Err(e) => {
                tracing::warn!(webhook = %hook.redacted(), error = %e, "webhook TLS set-up failed; event not delivered");
                results.with_label_values(&["failed"]).inc();
                continue;
            }
        };
        let mut delivered = false;
        for attempt in 0..ATTEMPTS {
            let sent = post(&hook, tls.clone(), body.clone());
            match tokio::time::timeout(ATTEMPT_TIMEOUT, sent).await {
                Ok(Ok(status)) if status.is_success() => {
                    delivered = true;
                    break;
                }
                Ok(Ok(status)) => {
                    tracing::warn!(webhook = %hook.redacted(), %status, attempt, "webhook refused the event")
                }
                Ok(Err(e)) => {
                    tracing::warn!(webhook = %hook.redacted(), error = %e, attempt, "webhook delivery failed")
                }
                Err(_) => {
                    tracing::warn!(webhook = %hook.redacted(), attempt, "webhook delivery timed out")
                }
            }
            tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
        }
        let result = if delivered { "ok" } else { "failed" };
        results.with_label_values(&[result]).inc();
    }
}

/// The TLS client set-up of an https webhook: its CA file's certificates,
/// or the built-in roots.
fn tls_config(hook: &Webhook) -> Result<Arc<ClientConfig>, BoxError> {
    let mut roots = RootCertStore::empty();
    match &hook.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                roots.add(cert.map_err(|e| format!("{}: {e}", path.display()))?)?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The URL's authority as written (no default port added).
fn host_header(hook: &Webhook) -> &str {
    let rest = hook
        .url
        .split_once("://")
        .map_or(hook.url.as_str(), |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// An HTTP/1.1 client connection over `io`, driven by its own task.
async fn handshake<T>(io: T) -> Result<http1::SendRequest<Full<Bytes>>, BoxError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// POSTs `body` (JSON) to `hook` once and returns the answer's status
/// (confirmation gates: the answer matters, so no queue and no retries).
pub async fn ask(
    hook: &Webhook,
    body: &Value,
    limit: Duration,
) -> Result<http::StatusCode, String> {
    let tls = hook
        .tls
        .then(|| tls_config(hook))
        .transpose()
        .map_err(|e| format!("TLS set-up: {e}"))?;
    let body = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
    match tokio::time::timeout(limit, post(hook, tls, body)).await {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

async fn post(
    hook: &Webhook,
    tls: Option<Arc<ClientConfig>>,
    body: Bytes,
) -> Result<http::StatusCode, BoxError> {
    let stream = TcpStream::connect(&hook.authority).await?;
    let mut sender = match tls {
        Some(config) => {
            let name = ServerName::try_from(hook.host.clone())?;
            handshake(TlsConnector::from(config).connect(name, stream).await?).await?
        }
        None => handshake(stream).await?,
    };
    let req = Request::post(&hook.path)
        .header(header::HOST, host_header(hook))
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("veer/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(body))?;
    let resp = sender.send_request(req).await?;
    Ok(resp.status())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(format: WebhookFormat, status_url: Option<&str>) -> Webhook {
        let mut h = Webhook::parse("http://127.0.0.1:9/hook").expect("url");
        h.format = format;
        h.status_url = status_url.map(str::to_string);
        h
    }

    fn revert() -> Value {
        serde_json::json!({
            "event": "reverted", "route": "checkout", "stable": "v1", "canary": "v2",
            "effective_weight": 0.0, "at_unix": 1, "guard": "error_rate_ratio",
            "reason": "errors: 12 canary against 3 stable events; E = 412.0 ≥ 400",
            "weight_before": 5.0,
        })
    }

    #[test]
    fn json_posts_the_event_and_chat_formats_post_one_message() {
        let e = revert();
        assert_eq!(render(&hook(WebhookFormat::Json, None), &e), e);
        let slack = render(
            &hook(WebhookFormat::Slack, Some("https://veer.example/status")),
            &e,
        );
        let text = slack["text"].as_str().expect("slack text");
        assert!(text.starts_with("veer reverted canary v2 of route checkout (it had 5% of traffic): error_rate_ratio: errors: 12"), "{text}");
        assert!(
            text.ends_with("\nStatus: https://veer.example/status"),
            "{text}"
        );
        let teams = render(&hook(WebhookFormat::Teams, None), &e);
        let card = &teams["attachments"][0];
        assert_eq!(
            card["contentType"],
            "application/vnd.microsoft.card.adaptive"
        );
        assert_eq!(card["content"]["type"], "AdaptiveCard");
        let block = card["content"]["body"][0]["text"]
            .as_str()
            .expect("text block");
        assert!(
            block.contains("route checkout") && !block.contains("Status:"),
            "{block}"
        );
    }

    #[test]
    fn an_operators_action_says_who_and_why_when_they_said() {
        let mut e = serde_json::json!({
            "event": "operator_action", "route": "checkout", "stable": "v1", "canary": "v2",
            "effective_weight": 0.0, "at_unix": 1, "action": "revert",
            "said": "alice: p99 doubled",
        });
        assert_eq!(
            message(&e, None),
            "An operator (alice: p99 doubled) ran revert on route checkout: canary v2 now gets 0%"
        );
        e["said"] = Value::Null;
        assert_eq!(
            message(&e, None),
            "An operator ran revert on route checkout: canary v2 now gets 0%"
        );
    }
}
