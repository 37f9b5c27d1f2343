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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use veer_control::config::{Config, JudgeMode, JudgeSettings, Route, Strategy};
use veer_control::judge::{Judge, SavedTests, Status, TickInput, Verdict, VersionTick};
use veer_control::state::{canary_identity, Revert, RouteDecision, State, StateError};
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

/// An operator action on a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// Parses the action of `POST /routes/{name}/{action}`.
    pub fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "revert" => Action::Revert,
            "reset" => Action::Reset,
            "pause" => Action::Pause,
            "resume" => Action::Resume,
            "promote" => Action::Promote,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Action::Revert => "revert",
            Action::Reset => "reset",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Promote => "promote",
        }
    }
}

/// Why an action was refused.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// No such route.
    #[error("no route named {0:?}")]
    NoRoute(String),
    /// The route has no canary to act on.
    #[error("route {0:?} has no canary")]
    NoCanary(String),
    /// The action does not apply in the route's state.
    #[error("{0}")]
    Conflict(String),
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
    verdict: &'static str,
    last: Option<Verdict>,
    healthy_since: Option<Instant>,
    step_since: Instant,
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
            verdict: "insufficient_data",
            last: None,
            healthy_since: None,
            step_since: Instant::now(),
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
    state: State,
    state_dir: PathBuf,
    notifier: Notifier,
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

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The canary share a route's decision puts in effect, in basis points.
pub fn effective_bp(route: &Route, d: Option<&RouteDecision>) -> u16 {
    if route.canary.is_none() {
        return 0;
    }
    let Some(d) = d else {
        return route.canary_weight_bp;
    };
    if d.reverted.is_some() {
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

/// Moves each route's decision to the canary identity the config names (see
/// [`RouteDecision::for_identity`]: a reverted identity stays reverted).
fn reconcile_state(config: &Config, state: &mut State) -> bool {
    let mut changed = false;
    for r in &config.routes {
        let id = canary_identity(r);
        let current = state.routes.get(&r.name).cloned().unwrap_or_default();
        if state.routes.contains_key(&r.name) && current.canary_identity == id {
            continue;
        }
        let next = current.for_identity(id);
        if next.reverted.is_some() {
            tracing::warn!(route = %r.name, "this canary was reverted before: it stays out of traffic until `reset`");
        } else if current.canary_identity != 0 && id != 0 {
            tracing::info!(route = %r.name, "new canary identity: earlier decisions no longer apply");
        }
        state.routes.insert(r.name.clone(), next);
        changed = true;
    }
    changed
}

fn build_snapshot(
    config: &Config,
    generation: u64,
    addrs: &HashMap<String, SocketAddr>,
    routes: &HashMap<String, RouteRuntime>,
    state: &State,
    metrics: &crate::metrics::Metrics,
    upstreams: &crate::upstream::Upstreams,
) -> Snapshot {
    Snapshot::build(config, generation, addrs, upstreams, metrics, |r| {
        let rt = routes.get(&r.name);
        RouteInputs {
            weight_bp: effective_bp(r, state.routes.get(&r.name)),
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
        let mut state = match tokio::task::spawn_blocking(move || State::load(&dir)).await {
            Ok(r) => r?,
            Err(e) => {
                return Err(StateError::Io {
                    path: config.state.dir.clone(),
                    source: std::io::Error::other(e),
                })
            }
        };
        let changed = reconcile_state(&config, &mut state);
        for r in &config.routes {
            if let Some(rev) = state.routes.get(&r.name).and_then(|d| d.reverted.as_ref()) {
                tracing::warn!(route = %r.name, guard = %rev.guard, reason = %rev.reason, "canary stays reverted (persisted decision)");
            }
        }
        let routes: HashMap<String, RouteRuntime> = config
            .routes
            .iter()
            .map(|r| {
                let d = state.routes.get(&r.name);
                let mut rt = RouteRuntime::new(r, effective_bp(r, d));
                rt.resume(&r.name, saved_evidence(&r.name, d));
                (r.name.clone(), rt)
            })
            .collect();
        let snap = build_snapshot(&config, 1, &addrs, &routes, &state, &metrics, &upstreams);
        snap.publish(None, &metrics);
        let shared = Arc::new(Shared::new(snap, metrics, upstreams, path.clone()));
        let reload = Reload::new(shared.clone(), path, &text, config.clone(), certs);
        let notifier = Notifier::start(shared.metrics.webhook_events.clone());
        let mut c = Controller {
            notifier,
            shared: shared.clone(),
            reload,
            state_dir: config.state.dir.clone(),
            config,
            addrs,
            generation: 1,
            routes,
            state,
        };
        if changed {
            c.persist().await;
        }
        c.publish_all();
        Ok((c, shared))
    }

    fn rebuild(&self) {
        let snap = build_snapshot(
            &self.config,
            self.generation,
            &self.addrs,
            &self.routes,
            &self.state,
            &self.shared.metrics,
            &self.shared.upstreams,
        );
        let previous = self.shared.snapshot.load_full();
        snap.publish(Some(&previous), &self.shared.metrics);
        self.shared.snapshot.store(Arc::new(snap));
    }

    async fn persist(&self) -> bool {
        let state = self.state.clone();
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
            let Some(d) = self.state.routes.get_mut(name) else {
                continue;
            };
            if d.canary_identity != rt.identity {
                continue;
            }
            let v = serde_json::to_value(rt.judge.save_tests()).ok();
            if d.evidence != v {
                d.evidence = v;
                changed = true;
            }
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
        let changed = reconcile_state(&self.config, &mut self.state);
        let mut routes = HashMap::new();
        for r in &applied.config.routes {
            let d = self.state.routes.get(&r.name);
            let rt = match self.routes.remove(&r.name) {
                Some(rt) if rt.same_as(r) => rt,
                old => {
                    let mut rt = RouteRuntime::new(r, effective_bp(r, d));
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
            self.update_verdict(n);
            self.publish_into(n, &mut views);
        }
    }

    async fn act(&mut self, name: &str, action: Action) -> Result<Value, ActionError> {
        let route = self
            .config
            .route(name)
            .cloned()
            .ok_or_else(|| ActionError::NoRoute(name.into()))?;
        if route.canary.is_none() {
            return Err(ActionError::NoCanary(name.into()));
        }
        let before = self.state.routes.get(name).cloned().unwrap_or_default();
        let mut d = before.clone();
        d.canary_identity = canary_identity(&route);
        match action {
            Action::Revert => {
                if d.reverted.is_none() {
                    d.reverted = Some(Revert {
                        guard: "operator".into(),
                        reason: "revert requested by an operator".into(),
                        at_unix: now_unix(),
                    });
                }
            }
            Action::Reset => d = d.reset(),
            Action::Pause => d.paused = true,
            Action::Resume => d.paused = false,
            Action::Promote => {
                if d.reverted.is_some() {
                    return Err(ActionError::Conflict(format!(
                        "route {name:?}: the canary is reverted; reset it before promoting"
                    )));
                }
                d.promoted = true;
            }
        }
        self.state.routes.insert(name.to_string(), d.clone());
        if !self.persist().await {
            self.state.routes.insert(name.to_string(), before);
            let e = self
                .shared
                .state_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            return Err(ActionError::State(e.unwrap_or_default()));
        }
        if let Some(rt) = self.routes.get_mut(name) {
            if action == Action::Reset {
                // (The decision written above no longer holds evidence.)
                rt.judge.reset_tests();
                rt.healthy_since = None;
                rt.step_since = Instant::now();
                rt.last = None;
            }
            if action == Action::Revert && before.reverted.is_none() {
                self.shared
                    .metrics
                    .reverts
                    .with_label_values(&[name, "operator"])
                    .inc();
            }
        }
        tracing::warn!(route = %name, action = action.as_str(), weight = f64::from(effective_bp(&route, Some(&d))) / 100.0, "operator action");
        self.notify(
            name,
            "operator_action",
            json!({ "action": action.as_str() }),
        );
        self.swap(&[name.to_string()], false);
        Ok(self.route_json(name))
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
        if rt.early || rt.last.as_ref().is_some_and(|v| v.status == Status::Breach) {
            // At most one early tick an interval, and none after a breach
            // that changed nothing (observe mode, paused): looking again
            // would only shorten the window's slices.
            return false;
        }
        let w_bp = effective_bp(route, self.state.routes.get(&route.name));
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
        let w_bp = effective_bp(route, self.state.routes.get(name));
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
        rt.last = Some(verdict.clone());

        let d = self.state.routes.entry(name.to_string()).or_default();
        let mut changed = false;
        let mut events: Vec<(&str, Value)> = Vec::new();
        if route.canary.is_some()
            && d.reverted.is_none()
            && verdict.status == Status::Breach
            && route.judge.mode == JudgeMode::Enforce
            && !d.paused
            && w_bp > 0
        {
            d.reverted = Some(Revert {
                guard: verdict.guard.to_string(),
                reason: verdict.reason.clone(),
                at_unix: now_unix(),
            });
            self.shared
                .metrics
                .reverts
                .with_label_values(&[name, verdict.guard])
                .inc();
            tracing::warn!(route = %name, guard = verdict.guard, reason = %verdict.reason, weight_before = f64::from(w_bp) / 100.0, "canary reverted");
            events.push(("reverted", json!({ "guard": verdict.guard, "reason": verdict.reason, "weight_before": f64::from(w_bp) / 100.0 })));
            changed = true;
        }
        if let Some(ro) = &route.rollout {
            if d.reverted.is_none() && !d.promoted && !d.paused && verdict.status == Status::Healthy
            {
                let since = *rt.healthy_since.get_or_insert(now);
                let held = now.duration_since(since.max(rt.step_since));
                if held >= ro.hold && d.rollout_step + 1 < ro.steps_bp.len() {
                    d.rollout_step += 1;
                    rt.step_since = now;
                    let to = ro.steps_bp.get(d.rollout_step).copied().unwrap_or(0);
                    tracing::info!(route = %name, step = d.rollout_step, weight = f64::from(to) / 100.0, held = ?held, "rollout advanced");
                    events.push((
                        "rollout_advanced",
                        json!({ "step": d.rollout_step, "weight": f64::from(to) / 100.0 }),
                    ));
                    changed = true;
                }
            } else if verdict.status != Status::Healthy {
                rt.healthy_since = None;
            }
        }
        for (event, details) in events {
            self.notify(name, event, details);
        }
        self.update_verdict(name);
        changed
    }

    /// Sends a webhook event for `route`, if it has a webhook.
    fn notify(&self, route: &str, event: &str, mut details: Value) {
        let Some(r) = self.config.route(route) else {
            return;
        };
        let Some(hook) = &r.judge.webhook else { return };
        let weight = effective_bp(r, self.state.routes.get(route));
        if let Some(obj) = details.as_object_mut() {
            obj.insert("event".into(), json!(event));
            obj.insert("route".into(), json!(route));
            obj.insert("stable".into(), json!(r.stable.name));
            obj.insert(
                "canary".into(),
                json!(r.canary.as_ref().map(|c| c.name.clone())),
            );
            obj.insert("effective_weight".into(), json!(f64::from(weight) / 100.0));
            obj.insert("at_unix".into(), json!(now_unix()));
        }
        self.notifier.send(hook, details);
    }

    fn update_verdict(&mut self, name: &str) {
        let has_canary = self.config.route(name).is_some_and(|r| r.canary.is_some());
        let observe = self
            .config
            .route(name)
            .is_some_and(|r| r.judge.mode == JudgeMode::Observe);
        let d = self.state.routes.get(name).cloned().unwrap_or_default();
        let Some(rt) = self.routes.get_mut(name) else {
            return;
        };
        let label = if d.reverted.is_some() {
            "reverted"
        } else if !has_canary {
            "insufficient_data"
        } else {
            match rt.last.as_ref().map(|v| v.status) {
                // enforce: a breach that did not revert (paused, weight 0).
                Some(Status::Breach) if observe => "observe_breach",
                Some(Status::Breach) => "breach",
                Some(Status::Healthy) => "healthy",
                _ => "insufficient_data",
            }
        };
        if label != rt.verdict {
            let reason = match (&d.reverted, &rt.last) {
                (Some(r), _) => r.reason.clone(),
                (None, Some(v)) => v.reason.clone(),
                (None, None) => String::new(),
            };
            let from = rt.verdict;
            tracing::info!(route = %name, from, to = label, reason = %reason, "verdict changed");
            rt.verdict = label;
            self.notify(
                name,
                "verdict_changed",
                json!({ "from": from, "to": label, "reason": reason }),
            );
        }
    }

    fn publish_all(&mut self) {
        let names: Vec<String> = self.config.routes.iter().map(|r| r.name.clone()).collect();
        for n in names {
            self.update_verdict(&n);
            self.publish(&n);
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
        let m = &self.shared.metrics;
        m.set_verdict(name, rt.verdict);
        let ev = rt.judge.evidence();
        m.e_value
            .with_label_values(&[name, "errors"])
            .set(ev.e_errors);
        m.e_value
            .with_label_values(&[name, "latency"])
            .set(ev.e_latency);
        let d = self.state.routes.get(name).cloned().unwrap_or_default();
        m.rollout_step
            .with_label_values(&[name])
            .set(d.rollout_step as i64);
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
        views.insert(name.to_string(), self.view(route, rt, &d));
    }

    fn view(&self, route: &Route, rt: &RouteRuntime, d: &RouteDecision) -> Value {
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
            "verdict": rt.verdict,
            "reason": match (&d.reverted, &rt.last) {
                (Some(r), _) => r.reason.clone(),
                (None, Some(v)) => v.reason.clone(),
                (None, None) if route.judge.mode == JudgeMode::Off => "the judge is off for this route".to_string(),
                (None, None) => "no verdict yet".to_string(),
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
