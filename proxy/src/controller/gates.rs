//! Rollout steps that wait: a step whose hold is met is proposed to the
//! fleet's store (`[fleet]`) and, with `[route.rollout] confirm`, first
//! asked of the confirmation gate, which must answer 2xx. A gate is asked at
//! most once per judge `interval` per route; it never delays a revert (the
//! revert path does not go through here).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use veer_control::config::Route;

use super::Controller;

/// How long a gate may take to answer.
const GATE_TIMEOUT: Duration = Duration::from_secs(5);

/// A gate's answer, back in the controller loop.
pub(super) struct GateAnswer {
    route: String,
    epoch: u64,
    from: usize,
    answer: Result<http::StatusCode, String>,
}

/// One route's gate.
#[derive(Default)]
struct Gate {
    /// The step it was asked about (epoch, step).
    step: Option<(u64, usize)>,
    asked: Option<Instant>,
    in_flight: bool,
    /// Its last answer, for `/status`.
    last: Option<String>,
}

/// Every route's gate, and the channel their answers come back on.
pub(super) struct Gates {
    gates: HashMap<String, Gate>,
    tx: mpsc::UnboundedSender<GateAnswer>,
    rx: mpsc::UnboundedReceiver<GateAnswer>,
}

impl Gates {
    pub(super) fn new() -> Gates {
        let (tx, rx) = mpsc::unbounded_channel();
        Gates {
            gates: HashMap::new(),
            tx,
            rx,
        }
    }

    /// The next answer.
    pub(super) async fn next(&mut self) -> Option<GateAnswer> {
        self.rx.recv().await
    }

    /// `/status`: whether the route waits for its gate on (epoch, step),
    /// and the gate's last answer.
    pub(super) fn waiting(&self, route: &str, epoch: u64, step: usize) -> (bool, Option<String>) {
        match self.gates.get(route) {
            Some(g) if g.step == Some((epoch, step)) => (true, g.last.clone()),
            _ => (false, None),
        }
    }
}

impl Controller {
    /// The hold of `route`'s step `from` (of `epoch`) is met: ask its gate,
    /// or propose the step to the fleet, or both in that order.
    pub(super) fn step_due(&mut self, route: &Route, epoch: u64, from: usize) {
        let Some(ro) = &route.rollout else {
            return;
        };
        let Some(hook) = ro.confirm.clone() else {
            self.propose_step(route, epoch, from);
            return;
        };
        let now = Instant::now();
        let interval = route.judge.interval;
        let gate = self.gates.gates.entry(route.name.clone()).or_default();
        if gate.step != Some((epoch, from)) {
            *gate = Gate {
                step: Some((epoch, from)),
                ..Gate::default()
            };
        }
        if gate.in_flight || gate.asked.is_some_and(|t| now.duration_since(t) < interval) {
            return;
        }
        gate.in_flight = true;
        gate.asked = Some(now);
        let to = from + 1;
        let weight = |i: usize| ro.steps_bp.get(i).map(|bp| f64::from(*bp) / 100.0);
        let event = json!({
            "event": "confirm_step",
            "route": route.name,
            "stable": route.stable.name,
            "canary": route.canary.as_ref().map(|c| c.name.clone()),
            "from_step": from,
            "to_step": to,
            "from_weight": weight(from),
            "to_weight": weight(to),
            "promotion": weight(to) == Some(100.0),
            "status": self.statuses.get(&route.name).map(|s| serde_json::to_value(&**s).unwrap_or_default()),
        });
        tracing::info!(route = %route.name, from, to, gate = %hook.redacted(), "asking the confirmation gate");
        let tx = self.gates.tx.clone();
        let name = route.name.clone();
        tokio::spawn(async move {
            let answer = crate::notify::ask(&hook, &event, GATE_TIMEOUT).await;
            let _ = tx.send(GateAnswer {
                route: name,
                epoch,
                from,
                answer,
            });
        });
    }

    /// A gate answered: a 2xx takes the step (alone) or proposes it (fleet);
    /// anything else holds it until the gate is asked again.
    pub(super) fn gate_answered(&mut self, a: GateAnswer) {
        let Some(gate) = self.gates.gates.get_mut(&a.route) else {
            return;
        };
        gate.in_flight = false;
        let yes = matches!(&a.answer, Ok(s) if s.is_success());
        gate.last = Some(match &a.answer {
            Ok(s) => format!("HTTP {}", s.as_u16()),
            Err(e) => e.clone(),
        });
        let Some(route) = super::route_named(&self.config, &self.index, &a.route).cloned() else {
            return;
        };
        if !yes {
            tracing::warn!(route = %a.route, step = a.from, answer = ?gate.last, "the confirmation gate holds the rollout step");
            self.publish(std::slice::from_ref(&a.route), false);
            return;
        }
        tracing::info!(route = %a.route, step = a.from, "the confirmation gate confirmed the rollout step");
        if self.fleet.is_some() {
            self.propose_step(&route, a.epoch, a.from);
            return;
        }
        let now = self.now();
        let Some(control) = self.controls.get_mut(&a.route) else {
            return;
        };
        let out = control.take_step(&route, a.epoch, a.from, now);
        if out.changed {
            self.gates.gates.remove(&a.route);
            self.announce(&a.route, &out);
            self.rebuild();
            self.persist();
        }
        self.publish(std::slice::from_ref(&a.route), false);
    }
}
