//! The admin listener: `/healthz`, `/readyz`, `/status`, `/metrics`.
//!
//! It runs on its own address (loopback by default) so that operators and
//! Prometheus never share a port, or a limit, with client traffic.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::ProxyBody;
use crate::shared::Shared;
use crate::snapshot::{RouteTarget, VersionTarget};

/// Serves admin requests until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
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
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(&shared, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn answer(shared: &Shared, req: &Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path();
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
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
            let body = serde_json::to_vec_pretty(&status(shared)).unwrap_or_default();
            with_type(StatusCode::OK, body, "application/json")
        }
        "/metrics" => with_type(
            StatusCode::OK,
            shared.metrics.encode().into_bytes(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
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

/// The `/status` document.
pub fn status(shared: &Shared) -> Value {
    let snap = shared.snapshot.load();
    let reload = shared.reload_status().clone();
    let at = reload
        .last_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    json!({
        "veer_version": env!("CARGO_PKG_VERSION"),
        "config": {
            "path": reload.path.display().to_string(),
            "generation": snap.generation,
            "last_reload": {
                "result": reload.last_result,
                "error": reload.last_error,
                "at_unix": at,
            },
            "restart_required": reload.restart_required,
        },
        "routes": snap.routes.iter().map(|r| route_status(r)).collect::<Vec<_>>(),
    })
}

fn route_status(r: &RouteTarget) -> Value {
    let c = &r.config;
    json!({
        "name": &*r.name,
        "hosts": c.hosts,
        "path_prefix": c.path_prefix,
        "strategy": c.strategy.as_str(),
        "weight": {
            "configured": c.canary_weight_percent(),
            "effective": f64::from(r.weight_bp) / 100.0,
        },
        "stable": version_status(&r.stable),
        "canary": r.canary.as_ref().map_or(Value::Null, version_status),
    })
}

fn version_status(v: &VersionTarget) -> Value {
    json!({
        "version": &*v.name,
        "endpoints": v.balancer.members().map(|(name, weight, u)| json!({
            "addr": name,
            "resolved": u.addr().to_string(),
            "weight": weight,
            "healthy": u.is_healthy(),
        })).collect::<Vec<_>>(),
    })
}
