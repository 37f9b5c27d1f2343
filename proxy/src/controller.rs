//! The controller: the one task that changes what requests see.
//!
//! It owns the running config, the judge of every route, and the persisted
//! decisions, and it is the only writer of the routing snapshot. Three things
//! wake it: a file change (reload), an operator action (admin endpoint), and
//! the judge tick. Because they are handled one at a time, a reload can never
//! race a revert, and every snapshot agrees with the decisions on disk.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use veer_control::config::{Config, JudgeMode, JudgeSettings, Route, Strategy};
use veer_control::judge::{Judge, SavedTests, Status, TickInput, VersionTick};
pub use veer_control::rollout::Action;
use veer_control::rollout::{Event, Now, Output, Refused, RouteControl};
use veer_control::state::{canary_identity, RouteDecision, State, StateError};
use veer_control::window::Stats;

use crate::notify::Notifier;
use crate::record::{threshold_count, Recorder, RouteKeys};
use crate::reload::{Applied, Reload, Triggers};
use crate::shared::Shared;
use crate::snapshot::{RouteInputs, Snapshot};
use crate::window_metrics::{WindowLatency, QUANTILES};

/// How often the controller checks which routes are due for a verdict.
const TICK: Duration = Duration::from_millis(100);
/// How often endpoint host names are resolved again.
const RESOLVE: Duration = Duration::from_secs(30);
/// How often the judges' evidence is written to the state dir (and once
/// more at shutdown).
const SAVE_EVIDENCE: Duration = Duration::from_secs(10);

/// Why an action was refused.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// No such route.
    #[error("no route named {0:?}")]
    NoRoute(String),
    /// The action does not apply to the route or its state.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The decision could not be persisted; nothing changed.
    #[error("could not persist the decision: {0}")]
    State(String),
}

/// An action sent by the admin endpoint, with where to send the answer.
pub struct Command {
    /// Route name.
    pub route: String,
    /// What to do.
    pub action: Action,
    /// The route's new status, or why not.
    pub reply: oneshot::Sender<Result<Value, ActionError>>,
}

/// Live judging state of one route.
struct RouteRuntime {
    identity: u64,
    stable_version: String,
    judge_settings: JudgeSettings,
    judge: Judge,
    thresholds: usize,
    stable: Arc<Recorder>,
    canary: Option<Arc<Recorder>>,
    last_tick: Instant,
    /// The last tick came early, at a look: no other until the next due one.
    early: bool,
    last_w_bp: Option<u16>,
}

impl RouteRuntime {
    /// A fresh runtime for `route`, whose recorders start counting under
    /// canary share `w_bp` (the share its first snapshot routes with, so
    /// the first tick's events are attributable).
    fn new(route: &Route, w_bp: u16) -> RouteRuntime {
        let judge = Judge::new(&route.judge);
        let thresholds = threshold_count(judge.slots());
        let keys = Arc::new(RouteKeys::new(thresholds));
        let rt = RouteRuntime {
            identity: canary_identity(route),
            stable_version: route.stable.name.clone(),
            judge_settings: route.judge.clone(),
            judge,
            thresholds,
            stable: Arc::new(Recorder::new(keys.clone())),
            canary: route.canary.as_ref().map(|_| Arc::new(Recorder::new(keys))),
            last_tick: Instant::now(),
            early: false,
            last_w_bp: Some(w_bp),
        };
        rt.set_thresholds();
        rt
    }

    /// Puts the judge's slow thresholds in force on both recorders.
    fn set_thresholds(&self) {
        self.stable
            .set_thresholds(self.judge.stable_thresholds_us());
        if let Some(c) = &self.canary {
            c.set_thresholds(self.judge.canary_thresholds_us());
        }
    }

    /// Continues the sequential tests from `saved` (from the state dir, or
    /// from the runtime this one replaces) when they belong to this canary.
    fn resume(&mut self, route: &str, saved: Option<SavedTests>) {
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
    fn keep_stable_window(&mut self, earlier: &RouteRuntime) {
        if self.judge.keep_stable_window(&earlier.judge) {
            self.set_thresholds();
        }
    }

    fn same_as(&self, route: &Route) -> bool {
        self.identity == canary_identity(route)
            && self.stable_version == route.stable.name
            && self.judge_settings == route.judge
    }
}

/// What a re-resolution gives: endpoint name to address, or why not.
type ResolveResult = Result<HashMap<String, SocketAddr>, String>;
/// A re-resolution under way.
type Resolving = tokio::task::JoinHandle<ResolveResult>;
/// Longest wait for a re-resolution's DNS answers.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The result of the re-resolution under way, if any (never ready when
/// there is none).
async fn wait_resolved(resolving: &mut Option<(u64, Resolving)>) -> ResolveResult {
    match resolving {
        Some((_, h)) => h.await.unwrap_or_else(|e| Err(e.to_string())),
        None => std::future::pending().await,
    }
}

/// The controller.
pub struct Controller {
    shared: Arc<Shared>,
    reload: Reload,
    config: Config,
    addrs: HashMap<String, SocketAddr>,
    generation: u64,
    routes: HashMap<String, RouteRuntime>,
    /// The decisions of the configured routes.
    controls: HashMap<String, RouteControl>,
    /// The decisions as loaded, for routes no longer configured.
    state: State,
    state_dir: PathBuf,
    notifier: Notifier,
    /// The controls' monotonic time is measured from here.
    origin: Instant,
}

/// The evidence a decision holds, if it still parses.
fn saved_evidence(route: &str, d: Option<&RouteDecision>) -> Option<SavedTests> {
    let v = d?.evidence.clone()?;
    serde_json::from_value(v)
        .inspect_err(|e| {
            tracing::warn!(route, error = %e, "saved evidence unreadable: the judge's tests start afresh")
        })
        .ok()
}

fn build_snapshot(
    config: &Config,
    generation: u64,
    addrs: &HashMap<String, SocketAddr>,
    routes: &HashMap<String, RouteRuntime>,
    controls: &HashMap<String, RouteControl>,
    metrics: &crate::metrics::Metrics,
    upstreams: &crate::upstream::Upstreams,
) -> Snapshot {
    Snapshot::build(config, generation, addrs, upstreams, metrics, |r| {
        let rt = routes.get(&r.name);
        RouteInputs {
            // Every configured route has a control; were one missing, the
            // route would fail toward stable.
            weight_bp: controls.get(&r.name).map_or(0, |c| c.effective_bp(r)),
            stable: rt.map(|rt| rt.stable.clone()),
            canary: rt.and_then(|rt| rt.canary.clone()),
        }
    })
}

impl Controller {
    /// Loads persisted decisions and builds the first snapshot. The
    /// returned controller is started with [`Controller::run`].
    pub async fn start(
        applied: Applied,
        path: PathBuf,
        certs: Option<Arc<crate::tls::CertStore>>,
        metrics: Arc<crate::metrics::Metrics>,
        upstreams: crate::upstream::Upstreams,
    ) -> Result<(Controller, Arc<Shared>), StateError> {
        let Applied {
            config,
            addrs,
            text,
        } = applied;
        let dir = config.state.dir.clone();
        let state = match tokio::task::spawn_blocking(move || State::load(&dir)).await {
            Ok(r) => r?,
            Err(e) => {
                return Err(StateError::Io {
                    path: config.state.dir.clone(),
                    source: std::io::Error::other(e),
                })
            }
        };
        let origin = Instant::now();
        let now = Now {
            mono: Duration::ZERO,
            unix: crate::clock::unix_now(),
        };
        let mut controls = HashMap::new();
        let mut outputs = Vec::new();
        let mut routes = HashMap::new();
        for r in &config.routes {
            let d = state.routes.get(&r.name);
            if let Some(rev) = d.and_then(|d| d.reverted.as_ref()) {
                if d.is_some_and(|d| d.canary_identity == canary_identity(r)) {
                    tracing::warn!(route = %r.name, guard = %rev.guard, reason = %rev.reason, "canary stays reverted (persisted decision)");
                }
            }
            let (control, out) = RouteControl::new(r, d.cloned(), now);
            let mut rt = RouteRuntime::new(r, control.effective_bp(r));
            rt.resume(&r.name, saved_evidence(&r.name, Some(control.decision())));
            routes.insert(r.name.clone(), rt);
            controls.insert(r.name.clone(), control);
            outputs.push((r.name.clone(), out));
        }
        let snap = build_snapshot(&config, 1, &addrs, &routes, &controls, &metrics, &upstreams);
        snap.publish(None, &metrics);
        let shared = Arc::new(Shared::new(snap, metrics, upstreams, path.clone()));
        let reload = Reload::new(shared.clone(), path, &text, config.clone(), certs);
        let notifier = Notifier::start(shared.metrics.webhook_events.clone());
        let c = Controller {
            notifier,
            shared: shared.clone(),
            reload,
            state_dir: config.state.dir.clone(),
            config,
            addrs,
            generation: 1,
            routes,
            controls,
            state,
            origin,
        };
        let mut changed = false;
        for (name, out) in &outputs {
            changed |= out.changed;
            c.announce(name, out);
        }
        if changed {
            c.persist().await;
        }
        c.publish_all();
        Ok((c, shared))
    }

    /// The time, for the route controls.
    fn now(&self) -> Now {
        Now {
            mono: self.origin.elapsed(),
            unix: crate::clock::unix_now(),
        }
    }

    fn rebuild(&self) {
        let snap = build_snapshot(
            &self.config,
            self.generation,
            &self.addrs,
            &self.routes,
            &self.controls,
            &self.shared.metrics,
            &self.shared.upstreams,
        );
        let previous = self.shared.snapshot.load_full();
        snap.publish(Some(&previous), &self.shared.metrics);
        self.shared.snapshot.store(Arc::new(snap));
    }

    /// Every decision: the configured routes' from their controls, and
    /// those of routes no longer configured as loaded (a route that comes
    /// back finds its decision).
    fn decisions(&self) -> State {
        let mut state = self.state.clone();
        for (name, c) in &self.controls {
            state.routes.insert(name.clone(), c.decision().clone());
        }
        state
    }

    async fn persist(&self) -> bool {
        let state = self.decisions();
        let dir = self.state_dir.clone();
        let result = tokio::task::spawn_blocking(move || state.save(&dir)).await;
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        let mut current = self
            .shared
            .state_error
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Logged once per distinct failure: evidence is saved every few
        // seconds, and a read-only state dir should not flood the log.
        if let Some(e) = error.as_ref().filter(|e| current.as_ref() != Some(*e)) {
            tracing::error!(error = %e, "could not persist decisions; they hold until restart only");
        }
        *current = error.clone();
        error.is_none()
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(
        mut self,
        mut actions: mpsc::Receiver<Command>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut triggers = Triggers::new(&self.reload.watched());
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resolve = tokio::time::interval(RESOLVE);
        resolve.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resolve.reset();
        let mut save = tokio::time::interval(SAVE_EVIDENCE);
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        save.reset();
        // Re-resolution runs beside the loop (DNS can take seconds), so the
        // judge keeps ticking meanwhile; its result is applied when it comes,
        // if the config it was made for is still the one in force.
        let mut resolving: Option<(u64, Resolving)> = None;
        loop {
            tokio::select! {
                _ = resolve.tick(), if resolving.is_none() => {
                    resolving = self.start_resolve().map(|h| (self.generation, h));
                }
                r = wait_resolved(&mut resolving) => {
                    let generation = resolving.take().map_or(0, |(g, _)| g);
                    self.finish_resolve(generation, r);
                }
                _ = triggers.next() => {
                    if let Some(applied) = self.reload.check().await {
                        self.apply(applied).await;
                    }
                }
                Some(cmd) = actions.recv() => {
                    let result = self.act(&cmd.route, cmd.action).await;
                    let _ = cmd.reply.send(result);
                }
                _ = tick.tick() => self.judge_due().await,
                _ = save.tick() => self.save_evidence().await,
                _ = shutdown.changed() => {
                    self.save_evidence().await;
                    return;
                }
            }
        }
    }

    /// Writes every judge's tests to the state dir, so that a restart
    /// continues them.
    async fn save_evidence(&mut self) {
        let mut changed = false;
        for (name, rt) in &self.routes {
            let Some(c) = self.controls.get_mut(name) else {
                continue;
            };
            if c.decision().canary_identity != rt.identity {
                continue;
            }
            changed |= c.set_evidence(serde_json::to_value(rt.judge.save_tests()).ok());
        }
        if changed {
            self.persist().await;
        }
    }

    /// Resolves endpoint host names again; a changed address is applied as a
    /// new snapshot (the same config generation). Failures keep the old
    /// addresses. Configs with only IP endpoints skip this.
    /// Starts re-resolving the config's host-name endpoints off the loop,
    /// bounded by [`RESOLVE_TIMEOUT`]; None when every endpoint is an address.
    fn start_resolve(&self) -> Option<Resolving> {
        let named = self
            .config
            .routes
            .iter()
            .flat_map(|r| std::iter::once(&r.stable).chain(r.canary.as_ref()));
        if named
            .flat_map(|v| &v.endpoints)
            .all(|e| e.addr.parse::<SocketAddr>().is_ok())
        {
            return None;
        }
        let config = self.config.clone();
        Some(tokio::spawn(async move {
            let lookup = tokio::task::spawn_blocking(move || crate::snapshot::resolve(&config));
            match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                Ok(Ok(r)) => r.map_err(|e| e.to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {RESOLVE_TIMEOUT:?}")),
            }
        }))
    }

    /// Applies a re-resolution made for config `generation`.
    fn finish_resolve(&mut self, generation: u64, r: ResolveResult) {
        if generation != self.generation {
            return; // made for a config no longer in force
        }
        match r {
            Ok(addrs) if addrs != self.addrs => {
                let changed: Vec<String> = addrs
                    .iter()
                    .filter(|(name, a)| self.addrs.get(*name) != Some(*a))
                    .map(|(name, a)| format!("{name} -> {a}"))
                    .collect();
                tracing::info!(endpoints = ?changed, "endpoint addresses changed");
                self.addrs = addrs;
                self.rebuild();
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "re-resolving endpoints failed; the previous addresses stay")
            }
        }
    }

    async fn apply(&mut self, applied: Applied) {
        self.generation += 1;
        self.config = applied.config.clone();
        self.addrs = applied.addrs.clone();
        let now = self.now();
        let mut controls = HashMap::new();
        let mut outputs = Vec::new();
        for r in &self.config.routes {
            let (control, out) = match self.controls.remove(&r.name) {
                Some(mut c) => {
                    let out = c.on_config(r, now);
                    (c, out)
                }
                None => RouteControl::new(r, self.state.routes.remove(&r.name), now),
            };
            controls.insert(r.name.clone(), control);
            outputs.push((r.name.clone(), out));
        }
        for (name, c) in self.controls.drain() {
            // A route no longer configured keeps its decision on disk, and
            // finds it again if it comes back.
            self.state.routes.insert(name, c.decision().clone());
        }
        self.controls = controls;
        let mut routes = HashMap::new();
        for r in &applied.config.routes {
            let d = self.controls.get(&r.name).map(RouteControl::decision);
            let w_bp = self.controls.get(&r.name).map_or(0, |c| c.effective_bp(r));
            let rt = match self.routes.remove(&r.name) {
                Some(rt) if rt.same_as(r) => rt,
                old => {
                    let mut rt = RouteRuntime::new(r, w_bp);
                    let saved = match &old {
                        // Same canary, other settings: carry the live tests over.
                        Some(old) if old.identity == rt.identity => Some(old.judge.save_tests()),
                        Some(_) => None,
                        None => saved_evidence(&r.name, d),
                    };
                    rt.resume(&r.name, saved);
                    if let Some(old) = old.filter(|o| o.stable_version == rt.stable_version) {
                        rt.keep_stable_window(&old);
                    }
                    rt
                }
            };
            routes.insert(r.name.clone(), rt);
        }
        self.routes = routes;
        let mut changed = false;
        for (name, out) in &outputs {
            changed |= out.changed;
            self.announce(name, out);
        }
        let names: Vec<String> = self.config.routes.iter().map(|r| r.name.clone()).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        self.shared.metrics.window_latency.retain_routes(&refs);
        self.swap(&names, true);
        self.reload.accepted(&applied, self.generation);
        if changed {
            self.persist().await;
        }
    }

    /// Puts a new routing snapshot in effect and publishes the `/status`
    /// views of `names` with it, under the views' lock, so `/status` (which
    /// takes that lock before it reads the snapshot) never shows one
    /// without the other. `only` drops the views of every other route.
    fn swap(&mut self, names: &[String], only: bool) {
        let shared = self.shared.clone();
        let mut views = shared.views.lock().unwrap_or_else(|p| p.into_inner());
        if only {
            views.retain(|k, _| names.contains(k));
        }
        self.rebuild();
        for n in names {
            self.publish_into(n, &mut views);
        }
    }

    async fn act(&mut self, name: &str, action: Action) -> Result<Value, ActionError> {
        let route = self
            .config
            .route(name)
            .cloned()
            .ok_or_else(|| ActionError::NoRoute(name.into()))?;
        let now = self.now();
        let control = self
            .controls
            .get_mut(name)
            .ok_or_else(|| ActionError::NoRoute(name.into()))?;
        let before = control.clone();
        let out = control.on_action(&route, action, now)?;
        if !self.persist().await {
            self.controls.insert(name.to_string(), before);
            let e = self
                .shared
                .state_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            return Err(ActionError::State(e.unwrap_or_default()));
        }
        if action == Action::Reset {
            if let Some(rt) = self.routes.get_mut(name) {
                // (The decision written above no longer holds evidence.)
                rt.judge.reset_tests();
            }
        }
        self.announce(name, &out);
        self.swap(&[name.to_string()], false);
        Ok(self.route_json(name))
    }

    /// Logs, counts and sends (webhook) what a control's input emitted.
    fn announce(&self, name: &str, out: &Output) {
        let Some(route) = self.config.route(name) else {
            return;
        };
        let weight = |bp: u16| f64::from(bp) / 100.0;
        for e in &out.events {
            match e {
                Event::Reverted {
                    guard,
                    reason,
                    weight_before_bp,
                } => {
                    self.shared
                        .metrics
                        .reverts
                        .with_label_values(&[name, guard])
                        .inc();
                    tracing::warn!(route = %name, guard = %guard, reason = %reason, weight_before = weight(*weight_before_bp), "canary reverted");
                    self.notify(
                        route,
                        "reverted",
                        json!({ "guard": guard, "reason": reason, "weight_before": weight(*weight_before_bp) }),
                    );
                }
                Event::RolloutAdvanced {
                    step,
                    weight_bp,
                    held,
                } => {
                    tracing::info!(route = %name, step, weight = weight(*weight_bp), held = ?held, "rollout advanced");
                    self.notify(
                        route,
                        "rollout_advanced",
                        json!({ "step": step, "weight": weight(*weight_bp) }),
                    );
                }
                Event::OperatorAction { action, effective } => {
                    if *action == Action::Revert && *effective {
                        self.shared
                            .metrics
                            .reverts
                            .with_label_values(&[name, "operator"])
                            .inc();
                    }
                    let w = self.controls.get(name).map_or(0, |c| c.effective_bp(route));
                    tracing::warn!(route = %name, action = action.as_str(), weight = weight(w), "operator action");
                    self.notify(
                        route,
                        "operator_action",
                        json!({ "action": action.as_str() }),
                    );
                }
                Event::VerdictChanged { from, to, reason } => {
                    tracing::info!(route = %name, from = from.as_str(), to = to.as_str(), reason = %reason, "verdict changed");
                    self.notify(
                        route,
                        "verdict_changed",
                        json!({ "from": from.as_str(), "to": to.as_str(), "reason": reason }),
                    );
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

    async fn judge_due(&mut self) {
        let now = Instant::now();
        let names: Vec<String> = self.config.routes.iter().map(|r| r.name.clone()).collect();
        let mut changed = false;
        for name in names {
            let Some(route) = self.config.route(&name).cloned() else {
                continue;
            };
            if route.judge.mode == JudgeMode::Off {
                continue;
            }
            let due = self
                .routes
                .get(&name)
                .is_some_and(|rt| now.duration_since(rt.last_tick) >= route.judge.interval);
            if !due && !self.crossed_early(&route) {
                continue;
            }
            if let Some(rt) = self.routes.get_mut(&name) {
                rt.early = !due;
            }
            if self.judge_route(&route, now) {
                // Act first: the new weight is in effect before the decision
                // is written down (a revert must not wait for a disk).
                self.swap(std::slice::from_ref(&name), false);
                changed = true;
            } else {
                self.publish(&name);
            }
        }
        if changed {
            self.persist().await;
        }
    }

    /// Between two ticks: whether the route's sequential tests have already
    /// crossed with the bad events recorded since the last one (then the
    /// route is judged at once, not at the end of its interval).
    fn crossed_early(&self, route: &Route) -> bool {
        let Some(rt) = self.routes.get(&route.name) else {
            return false;
        };
        let Some(canary) = &rt.canary else {
            return false;
        };
        let Some(control) = self.controls.get(&route.name) else {
            return false;
        };
        if rt.early || control.last().is_some_and(|v| v.status == Status::Breach) {
            // At most one early tick an interval, and none after a breach
            // that changed nothing (observe mode, paused): looking again
            // would only shorten the window's slices.
            return false;
        }
        let w_bp = control.effective_bp(route);
        if rt.last_w_bp != Some(w_bp) {
            // The share changed since the last tick: those events are
            // not attributable to one share (the tick skips them too).
            return false;
        }
        let crossed = rt.judge.crossed(
            f64::from(w_bp) / 10_000.0,
            &rt.stable.pending(rt.thresholds),
            &canary.pending(rt.thresholds),
        );
        if crossed {
            tracing::debug!(route = %route.name, "sequential test crossed between ticks; judging now");
        }
        crossed
    }

    /// One verdict for one route; returns whether a decision changed.
    fn judge_route(&mut self, route: &Route, now: Instant) -> bool {
        let name = route.name.as_str();
        let Some(w_bp) = self.controls.get(name).map(|c| c.effective_bp(route)) else {
            return false;
        };
        let snap = self.shared.snapshot.load();
        let canary_down = snap
            .routes
            .iter()
            .find(|r| &*r.name == name)
            .and_then(|r| r.canary.as_ref())
            .is_some_and(|c| c.balancer.endpoints().iter().all(|u| !u.is_healthy()));
        drop(snap);
        let Some(rt) = self.routes.get_mut(name) else {
            return false;
        };
        let elapsed = now.duration_since(rt.last_tick);
        rt.last_tick = now;
        let (stable, _) = rt.stable.drain(rt.thresholds);
        let (mut canary, canary_connect) = match &rt.canary {
            Some(c) => c.drain(rt.thresholds),
            None => (
                VersionTick {
                    slow_events: vec![0; rt.thresholds],
                    ..VersionTick::default()
                },
                0,
            ),
        };
        canary.unreachable = w_bp > 0 && canary_connect > 0 && canary_down;
        let flipped = route.strategy == Strategy::BlueGreen
            && w_bp == 10_000
            && rt.last_w_bp.is_some_and(|before| before != 10_000);
        if flipped {
            let stats = rt.judge.stable_stats();
            let (requests, rate) = (stats.requests, stats.error_rate());
            if rt.judge.start_watch() {
                tracing::info!(route = %name, baseline_requests = requests, baseline_error_rate = rate, watch = ?route.judge.watch, "blue-green flip: judging the new colour against the old one's last window");
            } else {
                tracing::warn!(route = %name, baseline_requests = requests, "blue-green flip without enough traffic before it: only the absolute guards apply");
            }
        }
        let weight_changed = rt.last_w_bp != Some(w_bp);
        rt.last_w_bp = Some(w_bp);
        let verdict = rt.judge.tick(TickInput {
            w: f64::from(w_bp) / 10_000.0,
            weight_changed,
            elapsed,
            stable,
            canary,
        });
        if rt.judge.burst_span_ended() {
            rt.stable.keys().clear_burst();
        }
        rt.set_thresholds();
        let at = Now {
            mono: now.duration_since(self.origin),
            unix: crate::clock::unix_now(),
        };
        let Some(control) = self.controls.get_mut(name) else {
            return false;
        };
        let out = control.on_verdict(route, verdict, w_bp, at);
        self.announce(name, &out);
        out.changed
    }

    /// Sends a webhook event for `route`, if it has a webhook.
    fn notify(&self, route: &Route, event: &str, mut details: Value) {
        let Some(hook) = &route.judge.webhook else {
            return;
        };
        let weight = self
            .controls
            .get(&route.name)
            .map_or(0, |c| c.effective_bp(route));
        if let Some(obj) = details.as_object_mut() {
            obj.insert("event".into(), json!(event));
            obj.insert("route".into(), json!(route.name));
            obj.insert("stable".into(), json!(route.stable.name));
            obj.insert(
                "canary".into(),
                json!(route.canary.as_ref().map(|c| c.name.clone())),
            );
            obj.insert("effective_weight".into(), json!(f64::from(weight) / 100.0));
            obj.insert("at_unix".into(), json!(crate::clock::unix_now()));
        }
        self.notifier.send(hook, details);
    }

    fn publish_all(&self) {
        for r in &self.config.routes {
            self.publish(&r.name);
        }
    }

    /// Updates the route's metrics and `/status` view.
    fn publish(&self, name: &str) {
        let mut views = self.shared.views.lock().unwrap_or_else(|p| p.into_inner());
        self.publish_into(name, &mut views);
    }

    /// Updates the route's metrics, and its view in `views`.
    fn publish_into(&self, name: &str, views: &mut HashMap<String, Value>) {
        let Some(rt) = self.routes.get(name) else {
            return;
        };
        let Some(route) = self.config.route(name) else {
            return;
        };
        let Some(control) = self.controls.get(name) else {
            return;
        };
        let m = &self.shared.metrics;
        m.set_verdict(name, control.label().as_str());
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
        let mut lat = Vec::new();
        let mut versions = vec![(
            route.stable.name.clone(),
            rt.judge.stable_stats(),
            &rt.stable,
        )];
        if let (Some(c), Some(rec)) = (&route.canary, &rt.canary) {
            versions.push((c.name.clone(), rt.judge.canary_stats(), rec));
        }
        for (v, stats, rec) in &versions {
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
        views.insert(name.to_string(), self.view(route, rt, control));
    }

    fn view(&self, route: &Route, rt: &RouteRuntime, control: &RouteControl) -> Value {
        let d = control.decision();
        let stats = |s: &Stats| {
            json!({
                "requests": s.requests,
                "errors": s.errors,
                "error_rate": s.error_rate(),
                "p50_ms": s.quantile_ms(0.5),
                "p95_ms": s.quantile_ms(0.95),
                "p99_ms": s.quantile_ms(0.99),
                "p999_ms": s.quantile_ms(0.999),
            })
        };
        let ev = rt.judge.evidence();
        let mode = route.judge.mode.as_str();
        json!({
            "verdict": control.label().as_str(),
            "reason": match control.reason() {
                Some(r) => r.to_string(),
                None if route.judge.mode == JudgeMode::Off => "the judge is off for this route".to_string(),
                None => "no verdict yet".to_string(),
            },
            "mode": mode,
            "paused": d.paused,
            "promoted": d.promoted,
            "reverted": d.reverted,
            "rollout": route.rollout.as_ref().map(|ro| json!({
                "step": d.rollout_step,
                "steps": ro.steps_bp.iter().map(|s| f64::from(*s) / 100.0).collect::<Vec<_>>(),
                "hold_s": ro.hold.as_secs_f64(),
            })),
            "evidence": {
                "e_errors": ev.e_errors,
                "e_latency": ev.e_latency,
                "threshold": ev.threshold,
                "error_events": { "canary": ev.error_events.0, "stable": ev.error_events.1 },
                "slow_events": { "canary": ev.slow_events.0, "stable": ev.slow_events.1 },
                "slow_thresholds_ms": ev.thresholds_ms.iter().map(|(q, t)| (q.key().to_string(), json!(t))).collect::<serde_json::Map<_, _>>(),
                "tests": ev.tests,
            },
            "window": {
                "stable": stats(rt.judge.stable_stats()),
                "canary": route.canary.as_ref().map(|_| stats(rt.judge.canary_stats())),
            },
        })
    }

    fn route_json(&self, name: &str) -> Value {
        // The views' lock first: a swap holds it while it publishes both.
        let views = self.shared.views.lock().unwrap_or_else(|p| p.into_inner());
        let snap = self.shared.snapshot.load();
        snap.routes
            .iter()
            .find(|r| &*r.name == name)
            .map_or(Value::Null, |r| {
                crate::admin::route_status(r, views.get(name))
            })
    }
}
