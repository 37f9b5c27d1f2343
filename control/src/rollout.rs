//! The decisions of one route as a pure state machine: what a verdict, an
//! operator action or a config change does to the route's persisted
//! decision ([`RouteDecision`]), its rollout clock and its verdict label,
//! and which events that emits.
//!
//! No I/O, no clock: the caller passes the time in ([`Now`]), persists
//! [`RouteControl::decision`] when [`Output::changed`] says so, and turns
//! the events into logs, metrics and webhooks. The rules, in one place:
//!
//! - A breach reverts only in `enforce` mode, not paused, with the canary
//!   in traffic, and only a canary not reverted already.
//! - A revert holds for the canary identity it was made for; only `reset`
//!   (or a new identity) lifts it, and a reverted identity named again
//!   later is found reverted ([`RouteDecision::for_identity`]).
//! - The rollout advances one step after `hold` of uninterrupted healthy
//!   verdicts since the later of the last step and the start of the healthy
//!   run; any other verdict restarts the run. Reverted, promoted or paused
//!   routes do not advance.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{JudgeMode, Route};
use crate::fleet::{self, Change, FleetRecord, Merged};
use crate::guard::Guard;
use crate::judge::{Status, Verdict};
use crate::state::{canary_identity, OperatorNote, Revert, RouteDecision};

/// The time of an input: monotonic (for holds) and wall clock (for records).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Now {
    /// Since a fixed point of the caller's choosing (e.g. its start).
    pub mono: Duration,
    /// Unix seconds.
    pub unix: u64,
    /// Unix milliseconds (the fleet's records and step clocks).
    pub unix_ms: u64,
}

impl Now {
    /// The time `mono` after the caller's origin and `unix_ms` on the wall.
    pub fn new(mono: Duration, unix_ms: u64) -> Now {
        Now {
            mono,
            unix: unix_ms / 1000,
            unix_ms,
        }
    }
}

/// Whether a route's decisions are shared with a fleet ([`crate::fleet`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sharing {
    /// No `[fleet]`: the replica decides alone.
    #[default]
    Alone,
    /// In a fleet whose decisions this replica has not read yet: the
    /// canary gets no traffic (a replica starts safe).
    Waiting,
    /// In a fleet, its decisions read: steps and operator actions other
    /// than `revert` are proposed to the store, not taken here.
    Synced,
}

/// An operator action on a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Take the canary out of traffic now.
    Revert,
    /// Forget the revert/promotion, restart the tests and the rollout.
    Reset,
    /// Keep judging and reporting, but do not act or advance the rollout.
    Pause,
    /// Undo `pause`.
    Resume,
    /// Send all traffic to the canary.
    Promote,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 5] = [
        Action::Revert,
        Action::Reset,
        Action::Pause,
        Action::Resume,
        Action::Promote,
    ];

    /// Parses the action of `POST /routes/{name}/{action}`.
    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Its name in the admin API, logs and webhooks.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Revert => "revert",
            Action::Reset => "reset",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Promote => "promote",
        }
    }
}

/// A route's verdict as shown in `/status`, `veer_verdict` and webhooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    /// Enough data, no breach.
    Healthy,
    /// Too little data, no canary, or no verdict yet.
    InsufficientData,
    /// A breach in `observe` mode: reported, not acted on.
    ObserveBreach,
    /// A breach in `enforce` mode that could not act (paused, or the
    /// canary at weight 0).
    Breach,
    /// The canary is out of traffic.
    Reverted,
    /// The new canary failed its smoke checks: it gets no traffic.
    SmokeFailed,
}

impl Label {
    /// Every label (the values of `veer_verdict`'s `verdict` label).
    pub const ALL: [Label; 6] = [
        Label::Healthy,
        Label::InsufficientData,
        Label::ObserveBreach,
        Label::Breach,
        Label::Reverted,
        Label::SmokeFailed,
    ];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Healthy => "healthy",
            Label::InsufficientData => "insufficient_data",
            Label::ObserveBreach => "observe_breach",
            Label::Breach => "breach",
            Label::Reverted => "reverted",
            Label::SmokeFailed => "smoke_failed",
        }
    }
}

/// How a deployment (one canary identity, or one run of it after a
/// `reset`) ended: the DORA outcomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentResult {
    /// Promoted by an operator to all traffic.
    Promoted,
    /// Taken out of traffic (by the judge or an operator): a change failure.
    Reverted,
    /// Replaced by another canary before either.
    Replaced,
}

impl DeploymentResult {
    /// Every result.
    pub const ALL: [DeploymentResult; 3] = [
        DeploymentResult::Promoted,
        DeploymentResult::Reverted,
        DeploymentResult::Replaced,
    ];

    /// Its name (the `result` label of `veer_deployments_total`).
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentResult::Promoted => "promoted",
            DeploymentResult::Reverted => "reverted",
            DeploymentResult::Replaced => "replaced",
        }
    }
}

/// What the caller must announce.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The judge took the canary out of traffic.
    Reverted {
        /// The guard or test.
        guard: Guard,
        /// Why, with numbers.
        reason: String,
        /// The canary's share before, in basis points.
        weight_before_bp: u16,
    },
    /// The rollout moved to its next step.
    RolloutAdvanced {
        /// The new step's index.
        step: usize,
        /// Its weight, in basis points.
        weight_bp: u16,
        /// How long the route was healthy on the step before.
        held: Duration,
    },
    /// An operator acted.
    OperatorAction {
        /// What they did.
        action: Action,
        /// Whether it changed anything (a second `revert` does not).
        effective: bool,
        /// Who asked and why, as they said it (through this replica's
        /// admin endpoint, or through the fleet's record of it).
        said: Option<String>,
    },
    /// The route's label changed.
    VerdictChanged {
        /// Before.
        from: Label,
        /// After.
        to: Label,
        /// The verdict's or the revert's reason.
        reason: String,
    },
    /// A deployment ended (the first of revert, promotion or replacement
    /// of a canary; a `reset` starts a new one).
    DeploymentEnded {
        /// How.
        result: DeploymentResult,
    },
    /// The rollout's hold was met, in a fleet (propose the next step to the
    /// store; it is taken when committed) or with a confirmation gate (ask
    /// it; the step is taken on a yes).
    StepDue {
        /// The decision's epoch.
        epoch: u64,
        /// The step held.
        from: usize,
    },
    /// A decision made by another replica was applied here.
    FleetApplied {
        /// What it did.
        change: Change,
        /// The replica that made it.
        by: String,
        /// When it made it (unix ms).
        at_ms: u64,
        /// It was a reset (a newer epoch): the judge's tests start over.
        reset: bool,
        /// Who asked and why, when an operator's action it was and they
        /// said.
        said: Option<String>,
    },
    /// The route's smoke checks ran.
    SmokeChecked {
        /// All passed.
        passed: bool,
        /// The first failure, or a summary.
        reason: String,
    },
    /// The config names another canary than the decision's.
    NewIdentity {
        /// The new identity was reverted before (a tombstone names it).
        reverted_before: bool,
        /// The decision was about another canary (not a first config).
        replaced: bool,
    },
}

/// What one input did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Output {
    /// The decision changed: persist it.
    pub changed: bool,
    /// To announce, in order.
    pub events: Vec<Event>,
}

/// Why an action was refused; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The route has no canary to act on.
    #[error("route {0:?} has no canary")]
    NoCanary(String),
    /// A reverted canary cannot be promoted.
    #[error("route {0:?}: the canary is reverted; reset it before promoting")]
    PromoteReverted(String),
}

/// The decisions of one route, with the volatile state around them.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteControl {
    decision: RouteDecision,
    /// What the verdicts are judged against: stable's version and the
    /// judge's settings. Another basis restarts the rollout's hold.
    basis: (String, crate::config::JudgeSettings),
    healthy_since: Option<Duration>,
    step_since: Duration,
    /// When the step began on the wall clock (unix ms): a fleet's shared
    /// step clock.
    step_started_ms: u64,
    label: Label,
    last: Option<Verdict>,
    sharing: Sharing,
    /// Held out of traffic until this replica's local tests have a seat
    /// (see [`RouteControl::set_unseated`]).
    unseated: bool,
}

impl RouteControl {
    /// The machine for `route`, from its persisted decision (if any), at
    /// `now`. A decision about another canary identity is moved to the
    /// route's ([`RouteDecision::for_identity`]).
    pub fn new(route: &Route, decision: Option<RouteDecision>, now: Now) -> (RouteControl, Output) {
        let mut c = RouteControl {
            decision: RouteDecision::default(),
            basis: (route.stable.name.clone(), route.judge.clone()),
            healthy_since: None,
            step_since: now.mono,
            step_started_ms: now.unix_ms,
            label: Label::InsufficientData,
            last: None,
            sharing: Sharing::Alone,
            unseated: false,
        };
        let known = decision.is_some();
        c.decision = decision.unwrap_or_default();
        let mut out = c.on_config(route, now);
        if !known {
            out.changed = true;
        }
        c.relabel(route, &mut out);
        (c, out)
    }

    /// The persisted decision.
    pub fn decision(&self) -> &RouteDecision {
        &self.decision
    }

    /// Replaces the decision's saved evidence (not a decision: the caller
    /// persists it on its own schedule). Returns whether it changed.
    pub fn set_evidence(&mut self, evidence: Option<serde_json::Value>) -> bool {
        let changed = self.decision.evidence != evidence;
        self.decision.evidence = evidence;
        changed
    }

    /// The route's label.
    pub fn label(&self) -> Label {
        self.label
    }

    /// The last verdict, if any since the start or the last `reset`.
    pub fn last(&self) -> Option<&Verdict> {
        self.last.as_ref()
    }

    /// The reason behind the label: the revert's, else a failed smoke
    /// run's, else the last verdict's.
    pub fn reason(&self) -> Option<&str> {
        let smoke = self.decision.smoke.as_ref().filter(|s| !s.passed);
        match (&self.decision.reverted, smoke, &self.last) {
            (Some(r), _, _) => Some(&r.reason),
            (None, Some(s), _) => Some(&s.reason),
            (None, None, Some(v)) => Some(&v.reason),
            (None, None, None) => None,
        }
    }

    /// Where the route's smoke checks stand.
    pub fn smoke(&self, route: &Route) -> Smoke {
        smoke_state(route, &self.decision)
    }

    /// A run of the smoke checks named by `key` ended. A run for checks no
    /// longer configured (the config changed meanwhile) changes nothing.
    pub fn on_smoke(
        &mut self,
        route: &Route,
        key: u64,
        passed: bool,
        reason: String,
        now: Now,
    ) -> Output {
        let mut out = Output::default();
        if key == 0
            || key != smoke_key(route)
            || self.decision.canary_identity != canary_identity(route)
        {
            return out;
        }
        self.decision.smoke = Some(crate::state::SmokeResult {
            key,
            passed,
            reason: reason.clone(),
            at_unix: now.unix,
        });
        out.changed = true;
        out.events.push(Event::SmokeChecked { passed, reason });
        self.relabel(route, &mut out);
        out
    }

    /// The canary share in effect, in basis points (none while waiting
    /// for a fleet's decisions, or for smoke checks to pass).
    pub fn effective_bp(&self, route: &Route) -> u16 {
        if self.sharing == Sharing::Waiting || self.unseated {
            return 0;
        }
        effective_bp(route, &self.decision)
    }

    /// Whether the canary is closed to forced requests too: reverted, the
    /// fleet's decisions not read yet, or its smoke checks not passed.
    pub fn canary_closed(&self, route: &Route) -> bool {
        self.decision.reverted.is_some()
            || self.sharing == Sharing::Waiting
            || self.unseated
            || matches!(self.smoke(route), Smoke::Pending | Smoke::Failed)
    }

    /// Whether (and how) the decisions are shared with a fleet.
    pub fn sharing(&self) -> Sharing {
        self.sharing
    }

    /// In a fleet that pools its evidence, holds the canary out of traffic
    /// (`true`) until this replica's local tests have a seat, or lets it in
    /// (`false`); returns whether that changed. Without a seat the local
    /// tests may not act (see [`crate::pool`]), and while the store cannot
    /// be reached neither can the pooled tests: a canary this replica
    /// could not take out gets none of its traffic. Letting a canary in is
    /// a move toward it, which in a fleet needs the store.
    pub fn set_unseated(&mut self, held: bool) -> bool {
        let changed = self.unseated != held;
        self.unseated = held;
        changed
    }

    /// Whether the canary is held until a seat is taken.
    pub fn unseated(&self) -> bool {
        self.unseated
    }

    /// Joins a fleet (`Waiting` until its decisions are read), or marks
    /// them read (`Synced`).
    pub fn set_sharing(&mut self, sharing: Sharing) {
        self.sharing = sharing;
    }

    /// The decision as the fleet stores it, written by `by`.
    pub fn record(&self, by: &str, last: Change, now: Now) -> FleetRecord {
        FleetRecord::of(&self.decision, self.step_started_ms, by, last, now.unix_ms)
    }

    /// Takes the step a [`Event::StepDue`] asked for, once its gate said
    /// yes (a replica deciding alone): only if the route is still on that
    /// step of that epoch, not reverted, promoted or paused.
    pub fn take_step(&mut self, route: &Route, epoch: u64, from: usize, now: Now) -> Output {
        let mut out = Output::default();
        let Some(ro) = &route.rollout else {
            return out;
        };
        let d = &mut self.decision;
        if d.epoch != epoch
            || d.rollout_step != from
            || d.reverted.is_some()
            || d.promoted
            || d.paused
            || from + 1 >= ro.steps_bp.len()
        {
            return out;
        }
        let held = now
            .mono
            .saturating_sub(self.healthy_since.unwrap_or(now.mono).max(self.step_since));
        self.advance(ro, held, now, &mut out);
        self.relabel(route, &mut out);
        out
    }

    /// Moves the rollout one step on (its conditions checked by the
    /// caller), after `held` of health on the step before.
    fn advance(&mut self, ro: &crate::config::Rollout, held: Duration, now: Now, out: &mut Output) {
        let d = &mut self.decision;
        d.rollout_step += 1;
        self.step_since = now.mono;
        self.step_started_ms = now.unix_ms;
        out.changed = true;
        out.events.push(Event::RolloutAdvanced {
            step: d.rollout_step,
            weight_bp: ro.steps_bp.get(d.rollout_step).copied().unwrap_or(0),
            held,
        });
    }

    /// The fleet's record for the route's identity, as read from the store
    /// (`local`: this replica's own committed proposal). See
    /// [`crate::fleet::merge`] for the rules.
    pub fn on_fleet(&mut self, route: &Route, r: &FleetRecord, local: bool, now: Now) -> Output {
        let mut out = Output::default();
        let before = self.decision.clone();
        let merged = fleet::merge(&mut self.decision, r);
        if merged == Merged::Ignored {
            return out;
        }
        let held = now
            .mono
            .saturating_sub(self.healthy_since.unwrap_or(now.mono).max(self.step_since));
        if merged == Merged::Replaced {
            self.healthy_since = None;
            self.last = None;
        }
        // The step clock is the fleet's when the record speaks of the step
        // in force.
        if r.epoch == self.decision.epoch
            && r.rollout_step == self.decision.rollout_step
            && r.step_started_ms != 0
            && r.step_started_ms != self.step_started_ms
        {
            self.step_started_ms = r.step_started_ms;
            let age = Duration::from_millis(now.unix_ms.saturating_sub(r.step_started_ms));
            self.step_since = now.mono.saturating_sub(age);
        }
        let d = &self.decision;
        out.changed = *d != before;
        if !out.changed {
            // Seen already (the same write, by the watch and the commit).
            return out;
        }
        if !before.promoted && d.promoted && d.reverted.is_none() && local {
            out.events.push(Event::DeploymentEnded {
                result: DeploymentResult::Promoted,
            });
        }
        if local {
            let action = match r.last {
                Change::Reset => Some(Action::Reset),
                Change::Pause => Some(Action::Pause),
                Change::Resume => Some(Action::Resume),
                Change::Promote => Some(Action::Promote),
                _ => None,
            };
            if let Some(action) = action {
                out.events.push(Event::OperatorAction {
                    action,
                    effective: true,
                    said: said_of(r),
                });
            }
            if r.last == Change::Step && d.rollout_step > before.rollout_step {
                let weight_bp = route
                    .rollout
                    .as_ref()
                    .and_then(|ro| ro.steps_bp.get(d.rollout_step).copied())
                    .unwrap_or(0);
                out.events.push(Event::RolloutAdvanced {
                    step: d.rollout_step,
                    weight_bp,
                    held,
                });
            }
        } else {
            out.events.push(Event::FleetApplied {
                change: r.last,
                by: r.by.clone(),
                at_ms: r.at_ms,
                reset: merged == Merged::Replaced,
                said: said_of(r),
            });
        }
        self.relabel(route, &mut out);
        out
    }

    /// The config now in force for the route (reload, or start). A new
    /// canary identity gets its own decision; a new stable version or new
    /// judge settings keep the decision but restart the rollout's hold
    /// (verdicts from before judged something else).
    pub fn on_config(&mut self, route: &Route, now: Now) -> Output {
        let mut out = Output::default();
        let id = canary_identity(route);
        let basis = (route.stable.name.clone(), route.judge.clone());
        if self.basis != basis {
            self.basis = basis;
            self.healthy_since = None;
            self.step_since = now.mono;
            self.last = None;
        }
        if self.decision.canary_identity != id {
            let replaced = self.decision.canary_identity != 0 && id != 0;
            if self.decision.canary_identity != 0 && !self.ended() {
                out.events.push(Event::DeploymentEnded {
                    result: DeploymentResult::Replaced,
                });
            }
            self.decision = self.decision.for_identity(id);
            self.healthy_since = None;
            self.step_since = now.mono;
            self.step_started_ms = now.unix_ms;
            self.last = None;
            out.changed = true;
            out.events.push(Event::NewIdentity {
                reverted_before: self.decision.reverted.is_some(),
                replaced,
            });
        }
        self.relabel(route, &mut out);
        out
    }

    /// The judge's verdict of one tick, made with the canary at `w_bp`.
    pub fn on_verdict(&mut self, route: &Route, verdict: Verdict, w_bp: u16, now: Now) -> Output {
        let mut out = Output::default();
        let d = &mut self.decision;
        if route.canary.is_some()
            && d.reverted.is_none()
            && verdict.status == Status::Breach
            && route.judge.mode == JudgeMode::Enforce
            && !d.paused
            // A canary with no routed share is still judged on the copies
            // it gets (`[route.mirror]`): a breach stops the mirroring.
            && (w_bp > 0 || route.mirror.is_some())
        {
            // A breach always names its guard; were one missing, the
            // revert would still happen (toward stable), as `unknown`.
            let guard = verdict.guard.unwrap_or(Guard::Unknown);
            d.reverted = Some(Revert {
                guard,
                reason: verdict.reason.clone(),
                at_unix: now.unix,
            });
            out.changed = true;
            if !d.promoted {
                out.events.push(Event::DeploymentEnded {
                    result: DeploymentResult::Reverted,
                });
            }
            out.events.push(Event::Reverted {
                guard,
                reason: verdict.reason.clone(),
                weight_before_bp: w_bp,
            });
        }
        let mut step_now = None;
        if let Some(ro) = &route.rollout {
            if d.reverted.is_none() && !d.promoted && !d.paused && verdict.status == Status::Healthy
            {
                let since = *self.healthy_since.get_or_insert(now.mono);
                let held = now.mono.saturating_sub(since.max(self.step_since));
                if held >= ro.hold && d.rollout_step + 1 < ro.steps_bp.len() {
                    if self.sharing == Sharing::Alone && ro.confirm.is_none() {
                        step_now = Some(held);
                    } else {
                        // A fleet steps together: the store decides; a
                        // gate decides whether to step at all.
                        out.events.push(Event::StepDue {
                            epoch: d.epoch,
                            from: d.rollout_step,
                        });
                    }
                }
            } else if verdict.status != Status::Healthy {
                self.healthy_since = None;
            }
        }
        if let (Some(held), Some(ro)) = (step_now, &route.rollout) {
            self.advance(ro, held, now, &mut out);
        }
        self.last = Some(verdict);
        self.relabel(route, &mut out);
        out
    }

    /// An operator's action.
    pub fn on_action(
        &mut self,
        route: &Route,
        action: Action,
        now: Now,
    ) -> Result<Output, Refused> {
        self.on_action_said(route, action, None, now)
    }

    /// An operator's action, with who asked and why as they said it
    /// (`alice@laptop: p99 doubled`): a revert's reason carries it.
    pub fn on_action_said(
        &mut self,
        route: &Route,
        action: Action,
        said: Option<&str>,
        now: Now,
    ) -> Result<Output, Refused> {
        if route.canary.is_none() {
            return Err(Refused::NoCanary(route.name.clone()));
        }
        let mut out = Output::default();
        let before = self.decision.clone();
        let d = &mut self.decision;
        match action {
            Action::Revert => {
                if d.reverted.is_none() {
                    d.reverted = Some(Revert {
                        guard: Guard::Operator,
                        reason: format!("revert requested by {}", said.unwrap_or("an operator")),
                        at_unix: now.unix,
                    });
                }
            }
            Action::Reset => {
                *d = d.reset();
                self.healthy_since = None;
                self.step_since = now.mono;
                self.step_started_ms = now.unix_ms;
                self.last = None;
            }
            Action::Pause => d.paused = true,
            Action::Resume => d.paused = false,
            Action::Promote => {
                if d.reverted.is_some() {
                    return Err(Refused::PromoteReverted(route.name.clone()));
                }
                d.promoted = true;
            }
        }
        let ended = match action {
            Action::Revert if before.reverted.is_none() && !before.promoted => {
                Some(DeploymentResult::Reverted)
            }
            Action::Promote if !before.promoted => Some(DeploymentResult::Promoted),
            _ => None,
        };
        if let Some(result) = ended {
            out.events.push(Event::DeploymentEnded { result });
        }
        let effective = action == Action::Reset || self.decision != before;
        // Who did it last, and why, stays with the decision (`/status`,
        // and the fleet's record).
        self.decision.last_action = Some(OperatorNote {
            action,
            said: said.map(str::to_string),
            at_unix: now.unix,
        });
        // Every action is written down, even one that changed nothing: the
        // operator's answer then says the decision is on disk.
        out.changed = true;
        out.events.push(Event::OperatorAction {
            action,
            effective,
            said: said.map(str::to_string),
        });
        self.relabel(route, &mut out);
        Ok(out)
    }

    /// Whether the current deployment has ended (reverted or promoted).
    fn ended(&self) -> bool {
        self.decision.reverted.is_some() || self.decision.promoted
    }

    /// Recomputes the label; a change is an event.
    fn relabel(&mut self, route: &Route, out: &mut Output) {
        let label = if self.decision.reverted.is_some() {
            Label::Reverted
        } else if matches!(smoke_state(route, &self.decision), Smoke::Failed) {
            Label::SmokeFailed
        } else if route.canary.is_none() {
            Label::InsufficientData
        } else {
            match self.last.as_ref().map(|v| v.status) {
                Some(Status::Breach) if route.judge.mode == JudgeMode::Observe => {
                    Label::ObserveBreach
                }
                Some(Status::Breach) => Label::Breach,
                Some(Status::Healthy) => Label::Healthy,
                _ => Label::InsufficientData,
            }
        };
        if label != self.label {
            out.events.push(Event::VerdictChanged {
                from: self.label,
                to: label,
                reason: self.reason().unwrap_or_default().to_string(),
            });
            self.label = label;
        }
    }
}

/// Where a route's smoke checks stand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Smoke {
    /// No `[[route.smoke]]`, or nothing to check.
    None,
    /// Not run yet for the current canary and checks: no traffic yet.
    Pending,
    /// Passed: traffic as configured.
    Passed,
    /// Failed: no traffic until the config changes or `reset`.
    Failed,
}

/// What the operator said of the change `r` records, when it is an
/// operator's action the record's note is of.
fn said_of(r: &FleetRecord) -> Option<String> {
    r.last_action
        .as_ref()
        .filter(|n| n.action.as_str() == r.last.as_str())
        .and_then(|n| n.said.clone())
}

/// What a run of `route`'s smoke checks is for: the canary identity, the
/// checks, and for blue-green whether the canary colour is live (a flip to
/// it is checked again). 0: no checks.
pub fn smoke_key(route: &Route) -> u64 {
    if route.smoke.is_empty() || route.canary.is_none() {
        return 0;
    }
    let flip = route.strategy == crate::config::Strategy::BlueGreen && route.canary_weight_bp > 0;
    let text = format!("{}\n{:?}\n{flip}", canary_identity(route), route.smoke);
    xxhash_rust::xxh3::xxh3_64(text.as_bytes()).max(1)
}

/// Where `route`'s smoke checks stand for decision `d`.
pub fn smoke_state(route: &Route, d: &RouteDecision) -> Smoke {
    let key = smoke_key(route);
    if key == 0 {
        return Smoke::None;
    }
    match &d.smoke {
        Some(s) if s.key == key && s.passed => Smoke::Passed,
        Some(s) if s.key == key => Smoke::Failed,
        _ => Smoke::Pending,
    }
}

/// The canary share `d` puts in effect on `route`, in basis points.
pub fn effective_bp(route: &Route, d: &RouteDecision) -> u16 {
    if route.canary.is_none() || d.reverted.is_some() {
        return 0;
    }
    if matches!(smoke_state(route, d), Smoke::Pending | Smoke::Failed) {
        return 0;
    }
    if d.promoted {
        return 10_000;
    }
    match &route.rollout {
        Some(r) => r
            .steps_bp
            .get(d.rollout_step)
            .or(r.steps_bp.last())
            .copied()
            .unwrap_or(route.canary_weight_bp),
        None => route.canary_weight_bp,
    }
}

#[cfg(test)]
mod tests;
