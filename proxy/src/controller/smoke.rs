//! Smoke checks before traffic (`[[route.smoke]]`): every check is sent to
//! every endpoint of a new canary (or of the colour a blue-green flip goes
//! to) before it gets any traffic; the canary's share stays 0 until all
//! pass (`control/src/rollout.rs`: `smoke_state`). A failed run holds until
//! the config changes or an operator resets the route.

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use veer_control::config::SmokeCheck;
use veer_control::rollout::{smoke_key, Smoke};

use super::Controller;
use crate::upstream::{fit_request, Conn, Connector};

/// Most of a response body read to look for `expect_body`.
const MAX_BODY: usize = 64 * 1024;

/// A finished run, back in the controller loop.
pub(super) struct SmokeRun {
    route: String,
    key: u64,
    result: Result<String, String>,
}

/// Runs in flight, by route (the key they check).
pub(super) struct Smokes {
    running: HashMap<String, u64>,
    tx: mpsc::UnboundedSender<SmokeRun>,
    rx: mpsc::UnboundedReceiver<SmokeRun>,
}

impl Smokes {
    pub(super) fn new() -> Smokes {
        let (tx, rx) = mpsc::unbounded_channel();
        Smokes {
            running: HashMap::new(),
            tx,
            rx,
        }
    }

    pub(super) async fn next(&mut self) -> Option<SmokeRun> {
        self.rx.recv().await
    }
}

impl Controller {
    /// Starts a run for every route whose checks are pending and not
    /// running already (cheap: only routes with checks are looked at).
    pub(super) fn smoke_due(&mut self) {
        // A route's checks come due only with a new config or decision,
        // each of which builds a new snapshot (and raises the flag).
        if !std::mem::take(&mut self.smoke_look) {
            return;
        }
        for route in self.config.routes.iter().filter(|r| !r.smoke.is_empty()) {
            let Some(control) = self.controls.get(&route.name) else {
                continue;
            };
            if control.smoke(route) != Smoke::Pending {
                continue;
            }
            let key = smoke_key(route);
            if self.smokes.running.get(&route.name) == Some(&key) {
                continue;
            }
            self.smokes.running.insert(route.name.clone(), key);
            let Some(canary) = &route.canary else {
                continue;
            };
            // The snapshot's endpoints know how to reach them (scheme, TLS).
            let snap = self.shared.snapshot.load();
            let target = snap
                .routes
                .iter()
                .find(|t| *t.name == *route.name)
                .and_then(|t| t.canary.as_ref());
            // Every address of each (a host name may stand for several);
            // one that did not resolve fails the run (an address another
            // name gave already, or past a version's 64, is not run again).
            let mut endpoints: Vec<(String, Option<(SocketAddr, Connector)>)> = Vec::new();
            for e in &canary.endpoints {
                let before = endpoints.len();
                if let Some(t) = target {
                    endpoints.extend(
                        t.balancer
                            .members()
                            .filter(|(n, _, _)| crate::snapshot::member_of(n, &e.addr))
                            .map(|(n, _, u)| {
                                (n.to_string(), Some((u.addr(), u.connector().clone())))
                            }),
                    );
                }
                if endpoints.len() == before && !self.addrs.contains_key(&e.addr) {
                    endpoints.push((e.addr.clone(), None));
                }
            }
            drop(snap);
            let checks = route.smoke.clone();
            let tx = self.smokes.tx.clone();
            let name = route.name.clone();
            tracing::info!(route = %name, version = %canary.name, checks = checks.len(), endpoints = endpoints.len(), "running smoke checks before the canary gets traffic");
            tokio::spawn(async move {
                let result = run(&checks, &endpoints).await;
                let _ = tx.send(SmokeRun {
                    route: name,
                    key,
                    result,
                });
            });
        }
    }

    /// A run ended: its result goes to the route's control.
    pub(super) fn smoke_done(&mut self, r: SmokeRun) {
        if self.smokes.running.get(&r.route) == Some(&r.key) {
            self.smokes.running.remove(&r.route);
        }
        let Some(route) = self.route_named(&r.route).cloned() else {
            return;
        };
        let now = self.now();
        let Some(control) = self.controls.get_mut(&r.route) else {
            return;
        };
        let (passed, reason) = match r.result {
            Ok(summary) => (true, summary),
            Err(why) => (false, why),
        };
        let out = control.on_smoke(&route, r.key, passed, reason, now);
        if !out.changed {
            return; // made for checks or a canary no longer configured
        }
        self.announce(&r.route, &out);
        self.rebuild();
        self.persist();
        self.publish(std::slice::from_ref(&r.route), false);
    }
}

/// Every check against every endpoint, in order; the first failure ends
/// the run and names the check and the endpoint.
async fn run(
    checks: &[SmokeCheck],
    endpoints: &[(String, Option<(SocketAddr, Connector)>)],
) -> Result<String, String> {
    for (name, up) in endpoints {
        let Some((addr, connector)) = up else {
            return Err(format!("endpoint {name}: its address is not resolved"));
        };
        for (i, c) in checks.iter().enumerate() {
            if let Err(e) = check_once(c, name, *addr, connector, Probe::Smoke).await {
                let what = format!("smoke check {} ({} {}) on {name}", i + 1, c.method, c.path);
                return Err(format!("{what}: {e}"));
            }
        }
    }
    Ok(format!(
        "{} check(s) passed on {} endpoint(s)",
        checks.len(),
        endpoints.len()
    ))
}

/// What a check's request is for (its `User-Agent` says; a smoke check's
/// carries `x-veer-smoke: 1` too).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Probe<'a> {
    /// `[[route.smoke]]`.
    Smoke,
    /// `[route.health_check]`.
    Health,
    /// `[route.health_check] grpc_service`: the standard health service's
    /// `Check` call about this service, which must answer SERVING.
    GrpcHealth(&'a str),
}

/// `c` sent once to the endpoint at `addr` (`host`: its configured name),
/// within `c.timeout`: whether its answer is the one expected, and if not
/// why (a smoke check's, and a health check's).
pub(super) async fn check_once(
    c: &SmokeCheck,
    host: &str,
    addr: SocketAddr,
    connector: &Connector,
    probe: Probe<'_>,
) -> Result<(), String> {
    match tokio::time::timeout(c.timeout, exchange(c, host, addr, connector, probe)).await {
        Err(_) => Err(format!("no answer within {:?}", c.timeout)),
        Ok(Err(e)) => Err(e),
        Ok(Ok((status, body, grpc_status))) => {
            if status != c.expect_status {
                return Err(format!("got {status}, expected {}", c.expect_status));
            }
            if let Probe::GrpcHealth(_) = probe {
                return match grpc_status {
                    Some(0) => match crate::grpc::health_check_status(&body)? {
                        1 => Ok(()),
                        s => Err(format!(
                            "the health service says {}",
                            crate::grpc::serving_status(s)
                        )),
                    },
                    Some(code) => Err(format!("grpc-status {code}")),
                    None => Err("no grpc-status in the answer".into()),
                };
            }
            if let Some(want) = &c.expect_body {
                if !String::from_utf8_lossy(&body).contains(want.as_str()) {
                    return Err(format!("the body does not contain {want:?}"));
                }
            }
            Ok(())
        }
    }
}

/// One request over a fresh connection, spoken the way the endpoint is
/// (HTTP/1.1, h2c, TLS): the status, up to [`MAX_BODY`] of the body, and
/// the gRPC status (its trailers', or its head's) if it has one.
async fn exchange(
    c: &SmokeCheck,
    host: &str,
    addr: SocketAddr,
    connector: &Connector,
    probe: Probe<'_>,
) -> Result<(u16, Bytes, Option<u8>), String> {
    let (conn, _) = connector
        .connect::<Full<Bytes>>(addr, c.timeout, false, None, None)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    // A `host` among the check's headers is the one sent (a virtual host
    // behind the endpoint), not a second field beside the endpoint's.
    let host = c
        .headers
        .iter()
        .find(|(k, _)| k == "host")
        .map_or_else(|| host.strip_suffix(":443").unwrap_or(host), |(_, v)| v);
    let mut req = http::Request::builder()
        .method(c.method.as_str())
        .uri(c.path.as_str())
        .header(http::header::HOST, host)
        .header(
            http::header::USER_AGENT,
            match probe {
                Probe::Smoke => concat!("veer-smoke/", env!("CARGO_PKG_VERSION")),
                Probe::Health | Probe::GrpcHealth(_) => {
                    concat!("veer-health/", env!("CARGO_PKG_VERSION"))
                }
            },
        );
    let mut body = Bytes::new();
    match probe {
        Probe::Smoke => req = req.header("x-veer-smoke", "1"),
        Probe::Health => {}
        Probe::GrpcHealth(service) => {
            req = req
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header(http::header::TE, "trailers");
            body = crate::grpc::health_check_request(service);
        }
    }
    for (k, v) in c.headers.iter().filter(|(k, _)| k != "host") {
        req = req.header(k.as_str(), v.as_str());
    }
    let mut req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = match conn {
        Conn::H1(mut s) => {
            fit_request(&mut req, false, connector.scheme());
            s.send_request(req).await
        }
        Conn::H2(mut s) => {
            fit_request(&mut req, true, connector.scheme());
            s.send_request(req).await
        }
    }
    .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let mut grpc_status = crate::grpc::status(resp.headers());
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while got.len() < MAX_BODY {
        match body.frame().await {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    got.extend_from_slice(d);
                }
                if let Some(t) = f.trailers_ref() {
                    grpc_status = crate::grpc::status(t).or(grpc_status);
                }
            }
            Some(Err(e)) => return Err(format!("reading the body: {e}")),
            None => break,
        }
    }
    got.truncate(MAX_BODY);
    Ok((status, Bytes::from(got), grpc_status))
}
