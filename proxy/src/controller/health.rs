//! Active health checks (`[route.health_check]`): every endpoint of a
//! route's versions is sent the check's request every `interval`, by a task
//! of its own; `unhealthy` failures in a row take it out of its version's
//! choices (its keys go to the next endpoint, as for one that refuses
//! connections), `healthy` passes in a row bring it back. When every
//! endpoint of a version is out, requests go to each key's first choice
//! all the same (as with back-offs): a version is never emptied by its
//! checks, so a canary that fails them everywhere still meets the judge.
//!
//! One check per endpoint: an endpoint named by several routes is checked
//! by the first of them (in the config's order) that has a check. A
//! checker lives while its endpoint is in the routing snapshot with a
//! check; a changed check takes over the endpoint's state as it is, and an
//! endpoint no longer checked is brought back in.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::IntGauge;
use veer_control::config::HealthCheck;

use super::smoke::{check_once, Probe};
use super::Controller;
use crate::snapshot::Snapshot;
use crate::upstream::Upstream;

/// The checkers running, by endpoint (the address of its [`Upstream`],
/// which the entry holds, so no other takes it while it runs).
#[derive(Default)]
pub(super) struct Checkers {
    running: HashMap<usize, Checker>,
}

/// What an endpoint is checked with, and for which route and version (its
/// labels in the log and the gauge).
#[derive(Clone, PartialEq)]
struct Target {
    check: HealthCheck,
    route: String,
    version: String,
    endpoint: String,
}

impl Target {
    fn labels(&self) -> [&str; 3] {
        [&self.route, &self.version, &self.endpoint]
    }
}

/// One endpoint's checker.
struct Checker {
    upstream: Arc<Upstream>,
    target: Target,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Controller {
    /// Starts, changes and stops checkers to match the routing snapshot in
    /// effect (cheap when no route has a check).
    pub(super) fn sync_health_checks(&mut self) {
        let snap = self.shared.snapshot.load_full();
        let wanted = self.wanted(&snap);
        let metrics = &self.shared.metrics.health_check_failing;
        // Gone: brought back in, their series dropped.
        self.checkers.running.retain(|key, c| {
            let keep = wanted.contains_key(key);
            if !keep {
                c.upstream.set_checked_out(None);
                let _ = metrics.remove_label_values(&c.target.labels());
            }
            keep
        });
        for (key, (upstream, target)) in wanted {
            let fresh = match self.checkers.running.get(&key) {
                Some(c) if c.target == target => continue,
                Some(c) => {
                    let _ = metrics.remove_label_values(&c.target.labels());
                    false
                }
                None => true,
            };
            // A check that starts out (`start_out`) keeps a new endpoint out
            // until its first pass; a changed check takes the state over
            // (one still waiting for its first pass keeps waiting for it).
            let start_out = (fresh && target.check.start_out)
                || upstream.check_failure().as_deref() == Some(NOT_PASSED_YET);
            if start_out {
                upstream.set_checked_out(Some(NOT_PASSED_YET.into()));
            }
            let gauge = metrics.with_label_values(&target.labels());
            gauge.set(i64::from(!upstream.is_checked_in()));
            let task = tokio::spawn(check_loop(
                upstream.clone(),
                target.clone(),
                gauge,
                start_out,
            ));
            // (Replacing an entry drops, and so stops, the one before.)
            self.checkers.running.insert(
                key,
                Checker {
                    upstream,
                    target,
                    task,
                },
            );
        }
    }

    /// Every endpoint of the snapshot's routes with a check: its checker's
    /// target (the first route to name it wins).
    fn wanted(&self, snap: &Snapshot) -> HashMap<usize, (Arc<Upstream>, Target)> {
        let mut out = HashMap::new();
        if self.config.routes.iter().all(|r| r.health_check.is_none()) {
            return out;
        }
        for target in snap.routes.iter() {
            let Some(check) = super::route_named(&self.config, &self.index, &target.name)
                .and_then(|r| r.health_check.as_ref())
            else {
                continue;
            };
            for v in std::iter::once(&target.stable).chain(target.canary.as_ref()) {
                for (name, _, u) in v.balancer.members() {
                    out.entry(Arc::as_ptr(u) as usize).or_insert_with(|| {
                        let t = Target {
                            check: check.clone(),
                            route: target.name.to_string(),
                            version: v.name.to_string(),
                            endpoint: name.to_string(),
                        };
                        (u.clone(), t)
                    });
                }
            }
        }
        out
    }
}

/// Why an endpoint whose check starts out is out before its first check.
const NOT_PASSED_YET: &str = "not passed its first health check yet (start_out)";

/// Checks `upstream` every `t.check.interval` until aborted. `start_out`:
/// it starts out, and its first pass brings it in.
async fn check_loop(upstream: Arc<Upstream>, t: Target, gauge: IntGauge, start_out: bool) {
    let check = &t.check;
    let (probe, what) = match &check.grpc_service {
        Some(service) => (
            Probe::GrpcHealth(service),
            format!("gRPC Check({service:?})"),
        ),
        None => (
            Probe::Health,
            format!("{} {}", check.check.method, check.check.path),
        ),
    };
    // Spread: checkers started together (a reload) do not all send at
    // once; the first check comes within a tenth of the interval.
    let spread = check.interval.mul_f64(fastrand::f64() / 10.0);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + spread, check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut failed, mut passed) = (0u32, 0u32);
    let mut unproven = start_out;
    loop {
        tick.tick().await;
        // Boxed: the exchange's future (a connect, a TLS handshake, the
        // request) is made for each check and dropped after, so that a
        // checker waiting for its next tick holds only its own few
        // fields, not room for an exchange (~11 KiB a checker otherwise,
        // `CHECKS=5s ENDPOINTS=own benches/routes.sh`).
        let result = Box::pin(check_once(
            &check.check,
            &t.endpoint,
            upstream.addr(),
            upstream.connector(),
            probe,
        ))
        .await;
        match result {
            Err(why) => {
                passed = 0;
                failed = failed.saturating_add(1);
                let why = format!("{what}: {why}");
                if !upstream.is_checked_in() {
                    // Still out: the latest reason.
                    if unproven && failed == check.unhealthy {
                        tracing::warn!(route = %t.route, version = %t.version, endpoint = %t.endpoint, failed, reason = %why, "health check failed: a new endpoint stays out of its version's choices");
                    }
                    upstream.set_checked_out(Some(why));
                } else if failed >= check.unhealthy {
                    tracing::warn!(route = %t.route, version = %t.version, endpoint = %t.endpoint, failed, reason = %why, "health check failed: endpoint taken out of its version's choices");
                    upstream.set_checked_out(Some(why));
                    gauge.set(1);
                } else {
                    tracing::debug!(route = %t.route, endpoint = %t.endpoint, failed, reason = %why, "health check failed");
                }
            }
            Ok(()) => {
                failed = 0;
                passed = passed.saturating_add(1);
                if !upstream.is_checked_in() && (passed >= check.healthy || unproven) {
                    if unproven {
                        tracing::info!(route = %t.route, version = %t.version, endpoint = %t.endpoint, "health check passed: a new endpoint in its version's choices");
                    } else {
                        tracing::info!(route = %t.route, version = %t.version, endpoint = %t.endpoint, passed, "health check passed: endpoint back in its version's choices");
                    }
                    upstream.set_checked_out(None);
                    gauge.set(0);
                }
                unproven = false;
            }
        }
    }
}
