//! The judge's side of the controller loop: which routes are due (or have
//! crossed between ticks), one tick of each, and what its verdict decides.

use tokio::time::Instant;
use veer_control::config::{JudgeMode, Route};
use veer_control::judge::Status;
use veer_control::rollout::RouteControl;

use super::{Controller, HEALTH_SHOWN};

/// The longest the routes go unvisited without a bad canary event (a
/// bound on the schedule, should a route's tick time be missed).
const NEXT_DUE_AT_MOST: std::time::Duration = std::time::Duration::from_secs(1);
use crate::runtime::RouteRuntime;

impl Controller {
    pub(super) fn judge_due(&mut self) {
        let now = Instant::now();
        let mut judged = Vec::new();
        let mut changed = false;
        // The routes are visited when one is due, or when a canary has
        // recorded a bad event that a look between ticks could act on;
        // otherwise (most calls, and every call while all is idle) not.
        self.pool_due(now);
        let look = crate::record::take_canary_events() || std::mem::take(&mut self.pool_look);
        // Sleeping routes that took a request since the last call (read
        // after the bad-event flag, which a request raises after it rang).
        let woke = self.wake_rung(now);
        let visit = look || woke || now >= self.next_due;
        let mut next_due = now + NEXT_DUE_AT_MOST;
        // Only the routes awake: a sleeping one has nothing to judge.
        let awake: Vec<usize> = if visit {
            self.awake.iter().copied().collect()
        } else {
            Vec::new()
        };
        for i in awake {
            let Some(route) = self.config.routes.get(i) else {
                continue;
            };
            if route.judge.mode == JudgeMode::Off {
                continue;
            }
            let (Some(rt), Some(control)) =
                (self.routes.get(&route.name), self.controls.get(&route.name))
            else {
                continue;
            };
            let due = now.duration_since(rt.last_tick) >= route.judge.interval;
            // After this pass the route is due an interval after its last
            // tick (now, if it is judged now), unless it sleeps.
            let last = if due { now } else { rt.last_tick };
            let due_next = last + route.judge.interval;
            if !(due || look && early_look(route, rt, control)) {
                next_due = next_due.min(due_next);
                continue;
            }
            // Cloned only when judged: most routes are not due on a tick.
            let route = route.clone();
            if let Some(rt) = self.routes.get_mut(&route.name) {
                rt.early = !due;
            }
            match self.judge_route(&route, now) {
                Some(true) => {
                    // Act first: the new weight is in effect before the
                    // decision is written down (a revert must not wait for
                    // a disk).
                    self.rebuild();
                    changed = true;
                    judged.push(route.name.clone());
                }
                Some(false) => {
                    next_due = next_due.min(due_next);
                    judged.push(route.name.clone());
                }
                None => {
                    // Idle: nothing to judge, nothing new to show; and if
                    // idle ticks can change nothing more, none until a
                    // request comes.
                    let pool_settled = self.pool_settled(&route.name);
                    let asleep = self
                        .routes
                        .get_mut(&route.name)
                        .is_some_and(|rt| rt.sleep(pool_settled));
                    if asleep {
                        self.awake.remove(&i);
                    } else {
                        next_due = next_due.min(due_next);
                    }
                }
            }
        }
        self.show_awake();
        if visit {
            // After a new snapshot every route woke: the next tick finds
            // when each is due.
            self.next_due = if changed { now } else { next_due };
        }
        // Endpoint health changes between verdicts show in `/status` too: at
        // the next tick after a failure or recovery, and within a second
        // when a back-off runs out (looked for only while one may have).
        let ups = &self.shared.upstreams;
        let changes = ups.health_changes();
        if changes != self.health_changes
            || now.duration_since(self.health_shown) >= HEALTH_SHOWN
                && ups.backoff_ended_since(self.health_checked_ms)
        {
            self.health_shown = now;
            self.health_checked_ms = ups.health_clock_ms();
            self.health_changes = changes;
            let snap = self.shared.snapshot.load_full();
            for name in crate::publish::health_changed(&snap, &self.statuses) {
                if !judged.contains(&name) {
                    judged.push(name);
                }
            }
        }
        if !judged.is_empty() {
            self.publish(&judged, false);
        }
        if changed {
            self.persist();
        }
    }

    /// Wakes the sleeping routes whose recorders rang since the last
    /// call; returns whether any woke.
    fn wake_rung(&mut self, now: Instant) -> bool {
        let mut woke = false;
        for name in self.wakes.take() {
            let Some(&i) = self.index.get(&*name) else {
                continue; // a route no longer configured
            };
            if let Some(rt) = self.routes.get_mut(&*name).filter(|rt| rt.asleep) {
                rt.wake(now);
                woke |= self.awake.insert(i);
            }
        }
        woke
    }

    /// Whether every endpoint of the route's canary is failing connects,
    /// read from the upstreams (the data plane's own health marks).
    fn canary_down(&self, route: &Route) -> bool {
        let Some(c) = &route.canary else {
            return false;
        };
        // (Every address a host name stands for.)
        c.endpoints.iter().all(|e| {
            self.addrs.get(&e.addr).is_none_or(|all| {
                all.iter().all(|a| {
                    self.shared
                        .upstreams
                        .healthy(*a)
                        .is_none_or(|healthy| !healthy)
                })
            })
        })
    }

    /// One verdict for one route: whether a decision changed, or None when
    /// the route was idle and its tick skipped.
    fn judge_route(&mut self, route: &Route, now: Instant) -> Option<bool> {
        let name = route.name.as_str();
        let w_bp = self.controls.get(name).map(|c| c.effective_bp(route))?;
        let canary_down = self.canary_down(route);
        let at = self.at(now);
        let verdict = self
            .routes
            .get_mut(name)?
            .tick(route, w_bp, canary_down, now)?;
        let control = self.controls.get_mut(name)?;
        let out = control.on_verdict(route, verdict, w_bp, at);
        self.record_deployments(name, &out);
        self.announce(name, &out);
        self.fleet_after_verdict(route, &out);
        for e in &out.events {
            if let veer_control::rollout::Event::StepDue { epoch, from } = e {
                self.step_due(route, *epoch, *from);
            }
        }
        Some(out.changed)
    }
}

/// Between two ticks: whether the route's tests have already crossed (see
/// [`RouteRuntime::crossed_early`]).
fn early_look(route: &Route, rt: &RouteRuntime, control: &RouteControl) -> bool {
    let breached = control.last().is_some_and(|v| v.status == Status::Breach);
    if !breached && rt.judge.pool_crossed() {
        tracing::debug!(route = %route.name, "a pooled test crossed; judging now");
        return true;
    }
    let crossed = rt.crossed_early(control.effective_bp(route), breached);
    if crossed {
        tracing::debug!(route = %route.name, "sequential test crossed between ticks; judging now");
    }
    crossed
}
