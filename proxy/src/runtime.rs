//! What the controller keeps per route besides its decisions: the judge,
//! the recorders the data plane writes into, and the tick clock; and how
//! runtimes and decisions carry over a new config.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::time::Instant;
use veer_control::config::{Config, JudgeSettings, Route, Strategy};
use veer_control::judge::{Judge, SavedTests, TickInput, Verdict, VersionTick};
use veer_control::rollout::{Now, Output, RouteControl};
use veer_control::state::{canary_identity, RouteDecision, State};

use crate::record::{threshold_count, Recorder, RouteKeys, Wakes};
use crate::snapshot::{RouteInputs, Snapshot};

/// Live judging state of one route.
pub struct RouteRuntime {
    /// The canary identity it judges.
    pub identity: u64,
    /// Stable's version name.
    pub stable_version: String,
    /// The settings its judge was built with.
    pub judge_settings: JudgeSettings,
    /// The judge.
    pub judge: Judge,
    /// Slow-threshold slots the recorders keep.
    pub thresholds: usize,
    /// Stable's recorder (the data plane writes, the controller drains).
    pub stable: Arc<Recorder>,
    /// The canary's recorder.
    pub canary: Option<Arc<Recorder>>,
    /// When the judge last ticked.
    pub last_tick: Instant,
    /// The last tick came early, at a look: no other until the next due one.
    pub early: bool,
    /// The canary share of the last tick, basis points.
    pub last_w_bp: Option<u16>,
    /// A tick with traffic since the evidence was last saved.
    pub unsaved: bool,
    /// The canary's mirrored pairs (`[route.mirror]`).
    pub pairs: Option<Arc<crate::mirror::Pairs>>,
    /// When the count of recent client addresses last started afresh.
    pub clients_span: Instant,
    /// The controller does not visit the route until a request wakes it
    /// (see [`RouteRuntime::sleep`]).
    pub asleep: bool,
}

impl RouteRuntime {
    /// A fresh runtime for `route`, whose recorders start counting under
    /// canary share `w_bp` (the share its first snapshot routes with, so
    /// the first tick's events are attributable).
    /// Their requests wake the route through `wakes` when it sleeps.
    pub fn new(route: &Route, w_bp: u16, wakes: &Arc<Wakes>) -> RouteRuntime {
        let judge = Judge::new(&route.judge);
        let thresholds = threshold_count(judge.slots());
        let keys = if judge.pooling() {
            RouteKeys::pooled(thresholds)
        } else {
            RouteKeys::new(thresholds)
        };
        let keys = Arc::new(if route.judge.one_vote_per_client {
            keys
        } else {
            keys.without_client_votes()
        });
        let name: Arc<str> = route.name.as_str().into();
        let rt = RouteRuntime {
            identity: canary_identity(route),
            stable_version: route.stable.name.clone(),
            judge_settings: route.judge.clone(),
            judge,
            thresholds,
            stable: Arc::new(Recorder::new(keys.clone()).with_alarm(name.clone(), wakes.clone())),
            canary: route
                .canary
                .as_ref()
                .map(|_| Arc::new(Recorder::for_canary(keys).with_alarm(name, wakes.clone()))),
            last_tick: Instant::now(),
            clients_span: Instant::now(),
            early: false,
            last_w_bp: Some(w_bp),
            unsaved: false,
            asleep: false,
            pairs: route
                .mirror
                .as_ref()
                .filter(|_| route.canary.is_some())
                .map(|m| Arc::new(crate::mirror::Pairs::new(m.max_concurrent))),
        };
        rt.set_thresholds();
        rt
    }

    /// Puts the judge's slow thresholds in force on both recorders.
    pub fn set_thresholds(&self) {
        self.stable
            .set_thresholds(self.judge.stable_thresholds_us());
        if let Some(c) = &self.canary {
            c.set_thresholds(self.judge.canary_thresholds_us());
        }
    }

    /// Continues the sequential tests from `saved` (from the state dir, or
    /// from the runtime this one replaces) when they belong to this canary.
    pub fn resume(&mut self, route: &str, saved: Option<SavedTests>) {
        let Some(saved) = saved else { return };
        if self.judge.restore_tests(saved) {
            tracing::info!(route, "judge resumes its evidence about this canary");
        } else {
            tracing::info!(route, "judge settings changed: its tests start afresh");
        }
    }

    /// Keeps the window of the same stable version from the runtime this
    /// one replaces (a new canary, or new judge settings), with its slow
    /// thresholds in force at once.
    pub fn keep_stable_window(&mut self, earlier: &RouteRuntime) {
        if self.judge.keep_stable_window(&earlier.judge) {
            self.set_thresholds();
        }
    }

    /// Between two ticks: whether the route's sequential tests have already
    /// crossed with the bad events recorded since the last one, the canary
    /// at `w_bp` (then the route is judged at once, not at the end of its
    /// interval). Never twice an interval, nor after a breach (`breached`)
    /// that changed nothing (observe mode, paused): looking again would
    /// only shorten the window's slices.
    pub fn crossed_early(&self, w_bp: u16, breached: bool) -> bool {
        let Some(canary) = &self.canary else {
            return false;
        };
        if self.early || breached {
            return false;
        }
        // Mirrored pairs: no share involved, so a weight change does not
        // stop the look.
        if let Some(p) = self.pairs.as_ref().filter(|p| p.has_pending()) {
            if self.judge.crossed_pairs(&p.pending(self.thresholds)) {
                return true;
            }
        }
        if self.last_w_bp != Some(w_bp) {
            // The share changed since the last tick: those events are
            // not attributable to one share (the tick skips them too).
            return false;
        }
        if !canary.has_pending() {
            // Only canary events can raise the evidence (most looks, and
            // every look at an idle route, end here).
            return false;
        }
        let canary = canary.pending(self.thresholds);
        self.judge.crossed(
            f64::from(w_bp) / 10_000.0,
            &self.stable.pending(self.thresholds),
            &canary,
        )
    }

    /// One tick of the judge at `now`, the canary at `w_bp`: drains both
    /// recorders, starts a blue-green watch on a flip, and returns the
    /// verdict; None when the tick was idle ([`Judge::quiet`]) and skipped.
    pub fn tick(
        &mut self,
        route: &Route,
        w_bp: u16,
        canary_down: bool,
        now: Instant,
    ) -> Option<Verdict> {
        let name = route.name.as_str();
        let elapsed = now.duration_since(self.last_tick);
        self.last_tick = now;
        let new_span = now.duration_since(self.clients_span) >= crate::record::RECENT_CLIENTS_SPAN;
        if new_span {
            self.clients_span = now;
        }
        self.stable.keys().renew_votes(new_span);
        let (stable, _) = self.stable.drain(self.thresholds);
        let (mut canary, canary_connect) = match &self.canary {
            Some(c) => c.drain(self.thresholds),
            None => (
                VersionTick {
                    slow_events: vec![0; self.thresholds],
                    ..VersionTick::default()
                },
                0,
            ),
        };
        canary.unreachable = w_bp > 0 && canary_connect > 0 && canary_down;
        let flipped = route.strategy == Strategy::BlueGreen
            && w_bp == 10_000
            && self.last_w_bp.is_some_and(|before| before != 10_000);
        if flipped {
            let stats = self.judge.stable_stats();
            let (requests, rate) = (stats.requests, stats.error_rate());
            if self.judge.start_watch() {
                tracing::info!(route = %name, baseline_requests = requests, baseline_error_rate = rate, watch = ?route.judge.watch, "blue-green flip: judging the new colour against the old one's last window");
            } else {
                tracing::warn!(route = %name, baseline_requests = requests, "blue-green flip without enough traffic before it: only the absolute guards apply");
            }
        }
        let pairs = self
            .pairs
            .as_ref()
            .map(|p| p.drain(self.thresholds))
            .unwrap_or_default();
        let key_rounds = self.stable.keys().key_rounds(self.thresholds);
        if !flipped && pairs.pairs == 0 && self.judge.quiet(&stable, &canary) {
            // (A share changed while idle is not a share change for the
            // requests to come: all of them are routed with the new one.)
            self.last_w_bp = Some(w_bp);
            self.stable.keys().end_key_rounds();
            return None;
        }
        self.unsaved |= stable.slice.requests > 0 || canary.slice.requests > 0 || flipped;
        let weight_changed = self.last_w_bp != Some(w_bp);
        self.last_w_bp = Some(w_bp);
        let verdict = self.judge.tick(TickInput {
            w: f64::from(w_bp) / 10_000.0,
            weight_changed,
            elapsed,
            stable,
            canary,
            pairs,
            key_rounds,
        });
        // After the judgement: a round that ends now has had all its
        // events drained into its test.
        self.stable.keys().end_key_rounds();
        if self.judge.burst_span_ended() {
            self.stable.keys().clear_burst();
        }
        self.set_thresholds();
        Some(verdict)
    }

    /// After an idle tick ([`RouteRuntime::tick`] gave None): lets the
    /// route sleep if more idle ticks could change nothing, and returns
    /// whether it sleeps. A sleeping route is not visited by the
    /// controller (no drain, no tick) until its first request, recorded,
    /// given up or mirrored, wakes it; so the controller's work grows with
    /// the routes that carry traffic, not with the routes configured.
    ///
    /// An idle tick changes nothing once the judge is quiet (its window
    /// empty, no watch or warm-up running) and the route's keys are
    /// settled ([`RouteKeys::settled`]); a route pooling evidence with a
    /// fleet also needs its side of the pool settled (`pool_settled`: a
    /// seat, the whole log, a checkpoint of what it holds), and the
    /// controller wakes it when the fleet's evidence for it comes. The
    /// controller wakes every route whenever it builds a new routing
    /// snapshot (a share or decision may have changed) and on a new config.
    pub fn sleep(&mut self, pool_settled: bool) -> bool {
        if (self.judge.pooling() && !pool_settled) || !self.stable.keys().settled() {
            return false;
        }
        let recorders = std::iter::once(&self.stable).chain(self.canary.as_ref());
        // Each recorder's flag goes up before its counts are read, and
        // stable's before the mirrored pairs' count (a pair rings stable's).
        let mut quiet = true;
        for r in recorders.clone() {
            quiet &= r.sleep();
        }
        quiet &= self.pairs.as_ref().is_none_or(|p| p.none_since_drain());
        if !quiet {
            for r in recorders {
                r.wake_up();
            }
            return false;
        }
        self.asleep = true;
        true
    }

    /// Wakes the route at `now`, as if it had been ticked idle at each
    /// interval while it slept: its next tick is due on the same beat,
    /// and measures one interval.
    pub fn wake(&mut self, now: Instant) {
        if !self.asleep {
            return;
        }
        self.asleep = false;
        for r in std::iter::once(&self.stable).chain(self.canary.as_ref()) {
            r.wake_up();
        }
        let interval = self.judge_settings.interval;
        let slept = now.saturating_duration_since(self.last_tick);
        if interval.is_zero() || slept < interval {
            return;
        }
        let beats = (slept.as_nanos() / interval.as_nanos()).min(u128::from(u32::MAX)) as u32;
        self.last_tick += interval * beats;
        self.early = false;
        // Idle ticks would have started a new span of recent addresses
        // (with nothing in it) once one had run out.
        if self.last_tick.saturating_duration_since(self.clients_span)
            >= crate::record::RECENT_CLIENTS_SPAN
        {
            self.clients_span = self.last_tick;
        }
    }

    /// Whether `route` is judged as this runtime judges (same canary,
    /// stable version and judge settings).
    pub fn same_as(&self, route: &Route) -> bool {
        self.identity == canary_identity(route)
            && self.stable_version == route.stable.name
            && self.judge_settings == route.judge
    }
}

/// The evidence a decision holds, if it still parses.
pub fn saved_evidence(route: &str, d: Option<&RouteDecision>) -> Option<SavedTests> {
    let v = d?.evidence.clone()?;
    serde_json::from_value(v)
        .inspect_err(|e| {
            tracing::warn!(route, error = %e, "saved evidence unreadable: the judge's tests start afresh")
        })
        .ok()
}

/// Every configured route's runtime and control, and what each control
/// said about the config.
pub struct Reconciled {
    /// Runtimes by route name.
    pub routes: HashMap<String, Box<RouteRuntime>>,
    /// Controls by route name.
    pub controls: HashMap<String, Box<RouteControl>>,
    /// Each control's output, to announce.
    pub outputs: Vec<(String, Output)>,
}

/// Each configured route's runtime and control for `config`: the ones in
/// `routes` and `controls` carried over (a runtime only if it judges the
/// same way), the others built from their decision in `state`, if any. The
/// decisions of routes no longer configured go back into `state`.
pub fn reconcile(
    config: &Config,
    mut routes: HashMap<String, Box<RouteRuntime>>,
    mut controls: HashMap<String, Box<RouteControl>>,
    state: &mut State,
    now: Now,
    wakes: &Arc<Wakes>,
) -> Reconciled {
    let (mut new_routes, mut new_controls, mut outputs) =
        (HashMap::new(), HashMap::new(), Vec::new());
    for r in &config.routes {
        let (control, out) = match controls.remove(&r.name) {
            Some(mut c) => {
                let out = c.on_config(r, now);
                (c, out)
            }
            None => {
                let d = state.routes.remove(&r.name);
                if let Some(rev) = d
                    .as_ref()
                    .filter(|d| d.canary_identity == canary_identity(r))
                    .and_then(|d| d.reverted.as_ref())
                {
                    tracing::warn!(route = %r.name, guard = %rev.guard, reason = %rev.reason, "canary stays reverted (persisted decision)");
                }
                let (c, out) = RouteControl::new(r, d, now);
                (Box::new(c), out)
            }
        };
        let rt = match routes.remove(&r.name) {
            Some(rt) if rt.same_as(r) => rt,
            old => {
                let mut rt = Box::new(RouteRuntime::new(r, control.effective_bp(r), wakes));
                let saved = match &old {
                    // Same canary, other settings: carry the live tests over.
                    Some(old) if old.identity == rt.identity => Some(old.judge.save_tests()),
                    Some(_) => None,
                    None => saved_evidence(&r.name, Some(control.decision())),
                };
                rt.resume(&r.name, saved);
                if let Some(old) = old.filter(|o| o.stable_version == rt.stable_version) {
                    rt.keep_stable_window(&old);
                }
                rt
            }
        };
        new_routes.insert(r.name.clone(), rt);
        new_controls.insert(r.name.clone(), control);
        outputs.push((r.name.clone(), out));
    }
    for (name, c) in controls {
        // A route no longer configured keeps its decision on disk, and
        // finds it again if it comes back.
        state.routes.insert(name, c.decision().clone());
    }
    Reconciled {
        routes: new_routes,
        controls: new_controls,
        outputs,
    }
}

/// The routing snapshot of `config` with each route's recorders and the
/// canary share its decision puts in effect.
pub fn build_snapshot(
    config: &Config,
    generation: u64,
    addrs: &crate::snapshot::Addresses,
    routes: &HashMap<String, Box<RouteRuntime>>,
    controls: &HashMap<String, Box<RouteControl>>,
    metrics: &crate::metrics::Metrics,
    upstreams: &crate::upstream::Upstreams,
) -> Snapshot {
    Snapshot::build(config, generation, addrs, upstreams, metrics, |r| {
        let rt = routes.get(&r.name);
        let control = controls.get(&r.name);
        RouteInputs {
            // Every configured route has a control; were one missing, the
            // route would fail toward stable.
            weight_bp: control.map_or(0, |c| c.effective_bp(r)),
            canary_reverted: control.is_none_or(|c| c.canary_closed(r)),
            stable: rt.map(|rt| rt.stable.clone()),
            canary: rt.and_then(|rt| rt.canary.clone()),
            pairs: rt.and_then(|rt| rt.pairs.clone()),
        }
    })
}
