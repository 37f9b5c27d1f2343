//! What the controller shows: each route's `/status` entry and gauges,
//! built from the snapshot it put in effect, the judge and the decisions.

use std::collections::HashMap;
use std::sync::Arc;

use veer_control::config::{Config, JudgeMode};
use veer_control::rollout::{RouteControl, Sharing};
use veer_control::state::Deployments;
use veer_control::status::{
    ConfigStatus, EndpointStatus, EvidenceStatus, LastReload, RolloutStatus, RouteStatus,
    StatusDoc, VersionStatus, WeightStatus, WindowStats, WindowStatus,
};

use crate::metrics::Metrics;
use crate::runtime::RouteRuntime;
use crate::shared::Shared;
use crate::snapshot::{RouteTarget, Snapshot, VersionTarget};
use crate::window_metrics::{WindowLatency, QUANTILES};

/// The `/status` entry of the route `target` routes, judged by `rt`, with
/// its `deployments` of the last 30 days.
pub fn route_status(
    target: &RouteTarget,
    rt: &RouteRuntime,
    control: &RouteControl,
    deployments: Deployments,
) -> RouteStatus {
    let c = &target.config;
    let d = control.decision();
    RouteStatus {
        name: target.name.to_string(),
        hosts: c.hosts.clone(),
        path_prefix: c.path_prefix.clone(),
        strategy: c.strategy.as_str().to_string(),
        weight: WeightStatus {
            configured: c.canary_weight_percent(),
            effective: f64::from(target.weight_bp) / 100.0,
        },
        stable: version_status(&target.stable),
        canary: target.canary.as_ref().map(version_status),
        verdict: control.label(),
        reason: match control.reason() {
            // (Not "0 canary requests, 50 each are needed": nothing waits.)
            _ if target.canary.is_none() => {
                "no canary: stable takes every request ([route.canary] starts a rollout)".into()
            }
            _ if control.sharing() == Sharing::Waiting => {
                "waiting for the fleet's decisions: the canary gets no traffic here until they are read".into()
            }
            _ if control.unseated() && rt.judge.seat().is_some() => {
                "every seat of this canary's local tests is taken and the fleet store cannot be reached: only the guards could take it out here, so it gets no traffic here until the store is back".into()
            }
            _ if control.unseated() => {
                "waiting for a seat for this replica's local tests (a number from the fleet store): the canary gets no traffic here until it has one".into()
            }
            None if control.smoke(c) == veer_control::rollout::Smoke::Pending => {
                "smoke checks running against the new canary: it gets no traffic until they pass".into()
            }
            Some(r) => r.to_string(),
            None if c.judge.mode == JudgeMode::Off => "the judge is off for this route".into(),
            None => "no verdict yet".into(),
        },
        mode: c.judge.mode.as_str().to_string(),
        paused: d.paused,
        promoted: d.promoted,
        reverted: d.reverted.clone(),
        last_action: d.last_action.clone(),
        rollout: c.rollout.as_ref().map(|ro| RolloutStatus {
            step: d.rollout_step,
            steps: ro.steps_bp.iter().map(|s| f64::from(*s) / 100.0).collect(),
            hold_s: ro.hold.as_secs_f64(),
            waiting_confirmation: false,
            confirmation: None,
        }),
        evidence: EvidenceStatus {
            one_vote_per_client: target.stable.recorder.keys().one_vote(),
            address_rounds: target.stable.recorder.keys().address_rounds(),
            ..EvidenceStatus::from(&rt.judge.evidence())
        },
        window: {
            let (stable_given_up, canary_given_up) = rt.judge.given_up_in_window();
            WindowStatus {
                stable: WindowStats {
                    given_up: stable_given_up,
                    ..WindowStats::from(rt.judge.stable_stats())
                },
                canary: c.canary.as_ref().map(|_| WindowStats {
                    given_up: canary_given_up,
                    ..WindowStats::from(rt.judge.canary_stats())
                }),
            }
        },
        deployments: deployments.into(),
        fleet: None,
        mirror: c.mirror.as_ref().map(|m| veer_control::status::MirrorStatus {
            percent: f64::from(m.percent_bp) / 100.0,
            active: target.mirror.is_some(),
            pairs_in_window: rt.judge.pairs_in_window(),
        }),
    }
}

fn version_status(v: &VersionTarget) -> VersionStatus {
    VersionStatus {
        version: v.name.to_string(),
        endpoints: v
            .balancer
            .members()
            .map(|(name, weight, u)| EndpointStatus {
                addr: name.to_string(),
                resolved: u.addr().to_string(),
                weight,
                healthy: u.is_healthy(),
                health_check: u.check_failure(),
                ejected: u.ejection(),
                connect_error: u.connect_failure(),
                back_off: u.back_off(),
            })
            .collect(),
    }
}

/// The routes of `snap` whose endpoint health (whether it is healthy, and
/// why its health check keeps it out) differs from what their published
/// entry in `shown` says.
pub fn health_changed(snap: &Snapshot, shown: &HashMap<String, Arc<RouteStatus>>) -> Vec<String> {
    let differs = |shown: &VersionStatus, v: &VersionTarget| {
        shown.endpoints.len() != v.balancer.endpoints().len()
            || shown
                .endpoints
                .iter()
                .zip(v.balancer.endpoints())
                .any(|(s, u)| {
                    s.healthy != u.is_healthy()
                        || s.health_check != u.check_failure()
                        || s.connect_error != u.connect_failure()
                        || s.back_off != u.back_off()
                })
    };
    snap.routes
        .iter()
        .filter(|t| {
            shown.get(&*t.name).is_some_and(|s| {
                differs(&s.stable, &t.stable)
                    || match (&s.canary, &t.canary) {
                        (Some(s), Some(v)) => differs(s, v),
                        (None, None) => false,
                        _ => true,
                    }
            })
        })
        .map(|t| t.name.to_string())
        .collect()
}

/// Sets the route's gauges.
pub fn gauges(
    m: &Metrics,
    target: &RouteTarget,
    rt: &RouteRuntime,
    control: &RouteControl,
    deployments: Deployments,
) {
    let name = &*target.name;
    if let Some(r) = deployments.change_failure_ratio() {
        m.change_failure_ratio.with_label_values(&[name]).set(r);
    }
    let route = &target.config;
    m.set_verdict(name, control.label());
    let ev = rt.judge.evidence();
    m.e_value
        .with_label_values(&[name, "errors"])
        .set(ev.e_errors);
    m.e_value
        .with_label_values(&[name, "latency"])
        .set(ev.e_latency);
    m.rollout_step
        .with_label_values(&[name])
        .set(control.decision().rollout_step as i64);
    let mut versions = vec![(&route.stable.name, rt.judge.stable_stats(), &rt.stable)];
    if let (Some(c), Some(rec)) = (&route.canary, &rt.canary) {
        versions.push((&c.name, rt.judge.canary_stats(), rec));
    }
    let mut lat = Vec::new();
    for (v, stats, rec) in versions {
        m.window_requests
            .with_label_values(&[name, v])
            .set(stats.requests as i64);
        m.window_error_ratio
            .with_label_values(&[name, v])
            .set(stats.error_rate());
        let (count, sum) = rec.totals();
        lat.push((
            v.clone(),
            WindowLatency {
                quantiles: QUANTILES.map(|q| stats.quantile_ms(q) / 1000.0),
                count,
                sum,
            },
        ));
    }
    m.window_latency.publish(name, lat);
}

/// Puts a new `/status` document in effect: the config and reload parts
/// from `shared`, `routes` in config order.
pub fn document(
    shared: &Shared,
    config: &Config,
    generation: u64,
    fleet: Option<veer_control::status::FleetStatus>,
    routes: Vec<Arc<RouteStatus>>,
) {
    let reload = shared.reload_status().clone();
    let doc = StatusDoc {
        veer_version: env!("CARGO_PKG_VERSION").to_string(),
        config: ConfigStatus {
            path: reload.path.display().to_string(),
            generation,
            last_reload: LastReload {
                result: reload.last_result.to_string(),
                error: reload.last_error,
                at_unix: reload
                    .last_at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            },
            restart_required: reload.restart_required,
            warnings: config
                .warnings
                .iter()
                .map(|w| format!("{}:{}: {}", w.line, w.col, w.message))
                .collect(),
        },
        state_error: shared.state_error_now(),
        fleet,
        tls: shared.certs.as_ref().map(|c| c.status()),
        routes,
    };
    shared.status.store(Arc::new(doc));
}
