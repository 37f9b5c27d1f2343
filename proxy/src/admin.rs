//! The admin listener: `/healthz`, `/readyz`, `/status`, `/metrics`, and the
//! operator actions `POST /routes/{name}/{revert|reset|pause|resume|promote}`.
//!
//! It runs on its own address (loopback by default) so that operators and
//! Prometheus never share a port, or a limit, with client traffic. Actions
//! always need `Authorization: Bearer <token>` (see [`crate::token`]);
//! with `[admin] read_token = true`, so do `/status` and `/metrics`.
//! `/healthz` and `/readyz` never do: probes carry no secrets.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::body::ProxyBody;
use crate::controller::{Action, ActionError, Command};
use crate::shared::Shared;

/// What the admin endpoint needs besides the shared state.
#[derive(Clone)]
pub struct Admin {
    /// Where operator actions go.
    pub actions: mpsc::Sender<Command>,
    /// One `/metrics` or `/status` document made at a time, off the
    /// workers.
    pub renders: Arc<tokio::sync::Semaphore>,
}

/// Admin connections open at once. Prometheus, probes and operators need
/// a few; past this, veer stops accepting on the admin port (connections
/// wait in the kernel's backlog) rather than spend the file descriptors
/// the proxy's clients and upstreams need.
const MAX_CONNECTIONS: usize = 128;

/// Admin connections one IP address may hold; one more is closed as it is
/// accepted, so that one client cannot take the port from the probes and
/// Prometheus. (Every connection must also send a complete request head
/// within 10 s of being accepted or of its last answer.)
const MAX_PER_IP: usize = 16;

/// How long a write of an admin answer may make no progress (a client
/// that stopped reading it) before the connection is closed, as nginx's
/// `send_timeout`: an answer is held until it is written, and `/metrics`
/// with many routes is megabytes.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A stream whose writes fail once one has waited `limit` with nothing
/// taken by the peer (reads pass through).
struct SendTimeout<T> {
    io: T,
    limit: std::time::Duration,
    /// Since the write now waiting began to wait.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> SendTimeout<T> {
    fn new(io: T, limit: std::time::Duration) -> SendTimeout<T> {
        SendTimeout {
            io,
            limit,
            stalled: None,
        }
    }

    /// `r`, a write's (or flush's) result, or an error once it has waited
    /// `limit`.
    fn bounded<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took nothing of the answer for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.bounded(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.bounded(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.bounded(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves admin requests until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    admin: Admin,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_ip = crate::server::PerIpLimit::new(MAX_PER_IP);
    // A full port is said in the log (a scrape of /metrics cannot get
    // through to say it), at most every 10 s.
    let mut said: Option<tokio::time::Instant> = None;
    let mut say = |why: &str, peer: Option<std::net::SocketAddr>| {
        let now = tokio::time::Instant::now();
        if said.is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(10)) {
            said = Some(now);
            tracing::warn!(
                ?peer,
                why,
                "admin port full: probes and scrapes may fail meanwhile"
            );
        }
    };
    loop {
        if permits.available_permits() == 0 {
            shared
                .metrics
                .admin_refused
                .with_label_values(&["all"])
                .inc();
            say(
                &format!("{MAX_CONNECTIONS} connections open, no more accepted until one closes"),
                None,
            );
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Some(place) = per_ip.admit(peer.ip()) else {
            shared
                .metrics
                .admin_refused
                .with_label_values(&["per_address"])
                .inc();
            say(
                &format!(
                    "{MAX_PER_IP} connections from one address, more from it closed as accepted"
                ),
                Some(peer),
            );
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        let admin = admin.clone();
        tokio::spawn(async move {
            // Held for the connection's life.
            let _held = (permit, place);
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(answer(&shared, &admin, req, peer).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(SendTimeout::new(stream, SEND_TIMEOUT)), svc)
                .await;
        });
    }
}

/// Who a request's bearer token says it is (None: nobody, see
/// [`unauthorized`]).
fn authorized(shared: &Shared, req: &Request<Incoming>) -> Option<Caller> {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = shared.admin_token.load();
    if token
        .as_deref()
        .is_some_and(|t| crate::token::bearer_matches(given, t))
    {
        return Some(Caller::Admin);
    }
    let operators = shared.operators.load();
    operators
        .who(given)
        .map(|name| Caller::Operator(name.to_string()))
}

/// Whose token a request carried.
enum Caller {
    /// The admin token's holder.
    Admin,
    /// An operator of `[admin] operators_file`, by name.
    Operator(String),
}

/// The 401 for a request without a token veer takes.
fn unauthorized() -> Response<ProxyBody> {
    let mut r = json_error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

async fn answer(
    shared: &Shared,
    admin: &Admin,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<ProxyBody> {
    if let Some(rest) = req.uri().path().strip_prefix("/routes/") {
        let rest = rest.to_string();
        return action(shared, admin, req, &rest, peer).await;
    }
    let req = &req;
    let path = req.uri().path();
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    if shared.read_token.load(Ordering::Relaxed)
        && matches!(path, "/status" | "/metrics")
        && authorized(shared, req).is_none()
    {
        return unauthorized();
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if shared.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/status" => {
            let status = shared.status.load_full();
            render(admin, "application/json", move || {
                serde_json::to_vec_pretty(&*status).unwrap_or_default()
            })
            .await
        }
        "/metrics" => {
            let metrics = shared.metrics.clone();
            let snap = shared.snapshot.load_full();
            render(
                admin,
                "text/plain; version=0.0.4; charset=utf-8",
                move || {
                    let pools = crate::pool_metrics::families(&snap);
                    metrics.encode(pools).into_bytes()
                },
            )
            .await
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Makes a document on the blocking pool, one at a time: with many
/// routes carrying traffic, `/metrics` is megabytes (7 MB and ~50 ms of
/// CPU for 1 000 routes), and made on a worker it held up that worker's
/// requests for as long (with `workers = 1`, every request); scrapes
/// that come together wait their turn rather than take every core.
async fn render(
    admin: &Admin,
    content_type: &'static str,
    make: impl FnOnce() -> Vec<u8> + Send + 'static,
) -> Response<ProxyBody> {
    let Ok(_turn) = admin.renders.acquire().await else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    };
    match tokio::task::spawn_blocking(make).await {
        Ok(body) => with_type(StatusCode::OK, body, content_type),
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not make the document\n",
        ),
    }
}

async fn action(
    shared: &Shared,
    admin: &Admin,
    req: Request<Incoming>,
    rest: &str,
    peer: std::net::SocketAddr,
) -> Response<ProxyBody> {
    let Some((route, action)) = rest.split_once('/') else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let Some(action) = Action::parse(action) else {
        return json_error(
            StatusCode::NOT_FOUND,
            "unknown action: use revert, reset, pause, resume or promote",
        );
    };
    if req.method() != Method::POST {
        return json_error(StatusCode::METHOD_NOT_ALLOWED, "actions are POST requests");
    }
    let operator = match authorized(shared, &req) {
        Some(Caller::Admin) => None,
        Some(Caller::Operator(name)) => Some(name),
        None => {
            tracing::warn!(route, client = %peer, "admin action refused: missing or wrong token");
            return unauthorized();
        }
    };
    let mut said = match Said::read(req).await {
        Ok(said) => said,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
    };
    // An operator's token says who: what the body says is not asked.
    let declared = match &operator {
        Some(name) => said.by.replace(name.clone()),
        None => None,
    };
    let answer = act(admin, route, action, said.text()).await;
    // The audit trail: who asked for what, from where, and the answer.
    tracing::warn!(
        route,
        action = action.as_str(),
        operator = operator.as_deref(),
        by = said.by.as_deref(),
        declared = declared.as_deref(),
        reason = said.reason.as_deref(),
        client = %peer,
        status = answer.status().as_u16(),
        "admin action"
    );
    answer
}

/// Who asks for an action and why, as the request's body says
/// (`{"by": "alice@laptop", "reason": "p99 doubled"}`; both optional, the
/// body too).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Said {
    by: Option<String>,
    reason: Option<String>,
}

/// Longest action body read.
const MAX_SAID_BYTES: usize = 4096;
/// Longest `by` and `reason`, in characters.
const MAX_BY: usize = 200;
const MAX_REASON: usize = 1000;

impl Said {
    /// Reads the body (at most [`MAX_SAID_BYTES`], within 10 s); an empty
    /// one says nothing.
    async fn read(req: Request<Incoming>) -> Result<Said, String> {
        use http_body_util::BodyExt;
        let limited = http_body_util::Limited::new(req.into_body(), MAX_SAID_BYTES);
        let body = match tokio::time::timeout(std::time::Duration::from_secs(10), limited.collect())
            .await
        {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => {
                return Err(format!(
                    "reading the body: {e} (at most {MAX_SAID_BYTES} bytes)"
                ))
            }
            Err(_) => return Err("the body did not come within 10 s".into()),
        };
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Said::default());
        }
        let said: Said = serde_json::from_slice(&body).map_err(|e| {
            format!("the body must be JSON like {{\"by\": \"alice\", \"reason\": \"p99 doubled\"}}: {e}")
        })?;
        for (name, v, max) in [
            ("by", &said.by, MAX_BY),
            ("reason", &said.reason, MAX_REASON),
        ] {
            let Some(v) = v else { continue };
            if v.chars().count() > max {
                return Err(format!("{name} is longer than {max} characters"));
            }
            if v.chars().any(char::is_control) {
                return Err(format!("{name} holds a control character"));
            }
        }
        Ok(said)
    }

    /// `by: reason`, as a revert's reason says it (None: nothing said).
    fn text(&self) -> Option<String> {
        let by = self.by.as_deref().filter(|b| !b.trim().is_empty());
        let reason = self.reason.as_deref().filter(|r| !r.trim().is_empty());
        match (by, reason) {
            (None, None) => None,
            (by, None) => by.map(str::to_string),
            (by, Some(r)) => Some(format!("{}: {r}", by.unwrap_or("an operator"))),
        }
    }
}

/// Sends `action` on `route` to the controller and answers with the
/// route's new status, or why not.
async fn act(
    admin: &Admin,
    route: &str,
    action: Action,
    said: Option<String>,
) -> Response<ProxyBody> {
    let (reply, answer) = oneshot::channel();
    let cmd = Command {
        route: route.to_string(),
        action,
        said,
        reply,
    };
    if admin.actions.send(cmd).await.is_err() {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    match answer.await {
        Ok(Ok(v)) => with_type(
            StatusCode::OK,
            serde_json::to_vec_pretty(&v).unwrap_or_default(),
            "application/json",
        ),
        Ok(Err(e @ ActionError::NoRoute(_))) => json_error(StatusCode::NOT_FOUND, &e.to_string()),
        Ok(Err(e @ (ActionError::Refused(_) | ActionError::Conflict(_)))) => {
            json_error(StatusCode::CONFLICT, &e.to_string())
        }
        Ok(Err(e @ ActionError::Fleet(_))) => {
            json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
        Ok(Err(e @ ActionError::State(_))) => {
            json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
        }
        Err(_) => json_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
    }
}

fn json_error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = serde_json::to_vec(&json!({ "error": message })).unwrap_or_default();
    with_type(status, body, "application/json")
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    with_type(
        status,
        body.as_bytes().to_vec(),
        "text/plain; charset=utf-8",
    )
}

fn with_type(status: StatusCode, body: Vec<u8>, ctype: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::SendTimeout;

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_takes_nothing_of_fails_after_the_limit() {
        let (ours, mut peer) = tokio::io::duplex(64);
        let mut ours = SendTimeout::new(ours, Duration::from_secs(30));
        let answer = vec![b'x'; 1024];
        // The peer reads a little, then stops: each read starts the wait
        // anew, so the write goes on past 30 s in all.
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                peer.read_exact(&mut buf).await.unwrap();
            }
            peer
        });
        let started = tokio::time::Instant::now();
        let e = ours.write_all(&answer).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        // Three reads 20 s apart, then 30 s with none.
        assert_eq!(started.elapsed(), Duration::from_secs(90));
        drop(reading.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_takes_goes_through() {
        let (ours, mut peer) = tokio::io::duplex(64);
        let mut ours = SendTimeout::new(ours, Duration::from_secs(30));
        let reading = tokio::spawn(async move {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).await.unwrap();
            all.len()
        });
        ours.write_all(&vec![b'x'; 100_000]).await.unwrap();
        ours.shutdown().await.unwrap();
        assert_eq!(reading.await.unwrap(), 100_000);
    }
}
