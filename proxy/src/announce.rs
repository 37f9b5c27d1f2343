//! What the controller says about its decisions: a log line, the revert
//! counter and a webhook event for each event of a route's control.

use std::sync::Arc;

use serde_json::{json, Value};
use veer_control::config::Route;
use veer_control::guard::Guard;
use veer_control::rollout::{Action, Event, Output};

use crate::metrics::Metrics;
use crate::notify::Notifier;

/// Logs, counts and sends the events of route controls.
pub struct Announcer {
    notifier: Notifier,
    metrics: Arc<Metrics>,
    fleet: Option<crate::fleet::FleetMetrics>,
}

fn percent(bp: u16) -> f64 {
    f64::from(bp) / 100.0
}

impl Announcer {
    /// An announcer sending webhooks through a new notifier.
    pub fn new(metrics: Arc<Metrics>) -> Announcer {
        Announcer {
            notifier: Notifier::start(metrics.webhook_events.clone()),
            metrics,
            fleet: None,
        }
    }

    /// Counts fleet decisions too (`[fleet]` configured).
    pub fn with_fleet(mut self, fleet: crate::fleet::FleetMetrics) -> Announcer {
        self.fleet = Some(fleet);
        self
    }

    /// Counts a decision in `veer_fleet_decisions_total` (fleet only).
    fn fleet_decision(&self, route: &str, action: &str, source: &str) {
        if let Some(f) = &self.fleet {
            f.decisions
                .with_label_values(&[route, action, source])
                .inc();
        }
    }

    /// Announces `out`, the output of one input of `route`'s control, whose
    /// canary share is now `weight_bp`.
    pub fn announce(&self, route: &Route, weight_bp: u16, out: &Output) {
        let name = route.name.as_str();
        let send = |event: &str, details: Value| self.notify(route, weight_bp, event, details);
        for e in &out.events {
            match e {
                Event::Reverted {
                    guard,
                    reason,
                    weight_before_bp,
                } => {
                    self.metrics.reverts.inc(name, guard.as_str());
                    self.fleet_decision(name, "revert", "local");
                    let before = percent(*weight_before_bp);
                    tracing::warn!(route = %name, guard = %guard, reason = %reason, weight_before = before, "canary reverted");
                    send(
                        "reverted",
                        json!({ "guard": guard, "reason": reason, "weight_before": before }),
                    );
                }
                Event::RolloutAdvanced {
                    step,
                    weight_bp,
                    held,
                } => {
                    self.fleet_decision(name, "step", "local");
                    let weight = percent(*weight_bp);
                    tracing::info!(route = %name, step, weight, held = ?held, "rollout advanced");
                    send(
                        "rollout_advanced",
                        json!({ "step": step, "weight": weight }),
                    );
                }
                Event::OperatorAction {
                    action,
                    effective,
                    said,
                } => {
                    self.fleet_decision(name, action.as_str(), "local");
                    if *action == Action::Revert && *effective {
                        self.metrics.reverts.inc(name, Guard::Operator.as_str());
                    }
                    tracing::warn!(route = %name, action = action.as_str(), said = said.as_deref(), weight = percent(weight_bp), "operator action");
                    send(
                        "operator_action",
                        json!({ "action": action.as_str(), "said": said }),
                    );
                }
                Event::VerdictChanged { from, to, reason } => {
                    tracing::info!(route = %name, from = from.as_str(), to = to.as_str(), reason = %reason, "verdict changed");
                    send(
                        "verdict_changed",
                        json!({ "from": from.as_str(), "to": to.as_str(), "reason": reason }),
                    );
                }
                Event::SmokeChecked { passed, reason } => {
                    let result = if *passed { "passed" } else { "failed" };
                    self.metrics.smoke_checks.inc(name, result);
                    if *passed {
                        tracing::info!(route = %name, reason = %reason, "smoke checks passed: the canary gets traffic as configured");
                    } else {
                        tracing::warn!(route = %name, reason = %reason, "smoke checks failed: the canary gets no traffic (a config change or reset runs them again)");
                    }
                    send(
                        "smoke_checked",
                        json!({ "passed": passed, "reason": reason }),
                    );
                }
                Event::StepDue { epoch, from } => {
                    tracing::debug!(route = %name, epoch, from, "rollout step due: proposed to the fleet");
                }
                Event::FleetApplied {
                    change,
                    by,
                    at_ms,
                    reset,
                    said,
                } => {
                    self.fleet_decision(name, change.as_str(), "fleet");
                    let lag_ms = crate::clock::unix_ms().saturating_sub(*at_ms);
                    if let Some(f) = &self.fleet {
                        f.propagation.observe(lag_ms as f64 / 1000.0);
                    }
                    tracing::warn!(route = %name, change = change.as_str(), by = %by, said = said.as_deref(), lag_ms, reset, weight = percent(weight_bp), "fleet decision applied");
                }
                Event::DeploymentEnded { result } => {
                    tracing::info!(route = %name, result = result.as_str(), "deployment ended");
                }
                Event::NewIdentity {
                    reverted_before,
                    replaced,
                } => {
                    if *reverted_before {
                        tracing::warn!(route = %name, "this canary was reverted before: it stays out of traffic until `reset`");
                    } else if *replaced {
                        tracing::info!(route = %name, "new canary identity: earlier decisions no longer apply");
                    }
                }
            }
        }
    }

    /// Sends a webhook event for `route`, if it has a webhook.
    fn notify(&self, route: &Route, weight_bp: u16, event: &str, mut details: Value) {
        let Some(hook) = &route.judge.webhook else {
            return;
        };
        if let Some(obj) = details.as_object_mut() {
            obj.insert("event".into(), json!(event));
            obj.insert("route".into(), json!(route.name));
            obj.insert("stable".into(), json!(route.stable.name));
            obj.insert(
                "canary".into(),
                json!(route.canary.as_ref().map(|c| c.name.clone())),
            );
            obj.insert("effective_weight".into(), json!(percent(weight_bp)));
            obj.insert("at_unix".into(), json!(crate::clock::unix_now()));
        }
        self.notifier.send(hook, details);
    }
}
