//! The controller: the one task that changes what requests see.
//!
//! It owns the running config, the judge of every route ([`RouteRuntime`]),
//! and every route's decisions ([`RouteControl`], the pure state machine in
//! `control/src/rollout.rs`), and it is the only writer of the routing
//! snapshot and of the `/status` document. Three things wake it: a file
//! change (reload), an operator action (admin endpoint), and the judge
//! tick. Because they are handled one at a time, a reload can never race a
//! revert. Decisions reach the disk behind the loop, one write at a time,
//! each of the whole state as it then is (the judge does not wait for a
//! slow disk); an operator's action is answered once it is written.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use veer_control::config::Config;
pub use veer_control::rollout::Action;
use veer_control::rollout::{DeploymentResult, Event, Now, Output, Refused, RouteControl};
use veer_control::state::{State, StateError};
use veer_control::status::RouteStatus;

mod fleet;
mod gates;
mod health;
mod judging;
mod pool;
mod smoke;
#[cfg(test)]
mod tests;

use crate::announce::Announcer;
use crate::reload::{self, Applied, Reload, Triggers};
use crate::reresolve::{self, Resolving};
use crate::runtime::{build_snapshot, reconcile, Reconciled, RouteRuntime};
use crate::shared::Shared;

/// How often the controller checks which routes are due for a verdict.
const TICK: Duration = Duration::from_millis(100);
/// How often, at least, `/status` is brought up to date with endpoint
/// health (at once after a failure or recovery).
const HEALTH_SHOWN: Duration = Duration::from_secs(1);
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
    /// The fleet's store could not commit it; nothing changed.
    #[error("{0}")]
    Fleet(String),
    /// The fleet's decision moved on meanwhile; nothing changed.
    #[error("{0}; look at /status and try again")]
    Conflict(String),
}

/// An action sent by the admin endpoint, with where to send the answer.
pub struct Command {
    /// Route name.
    pub route: String,
    /// What to do.
    pub action: Action,
    /// Who asked and why, as they said it (`alice: p99 doubled`).
    pub said: Option<String>,
    /// The route's new status, or why not.
    pub reply: oneshot::Sender<Result<Arc<RouteStatus>, ActionError>>,
}

/// The controller.
pub struct Controller {
    shared: Arc<Shared>,
    reload: Reload,
    config: Config,
    addrs: crate::snapshot::Addresses,
    generation: u64,
    /// The judging state of the configured routes. Boxed (as are the
    /// controls): a table keeps up to twice its entries' room free, and a
    /// runtime is ~2 KB, a control ~0.6 KB.
    routes: HashMap<String, Box<RouteRuntime>>,
    /// The decisions of the configured routes.
    controls: HashMap<String, Box<RouteControl>>,
    /// The decisions as loaded, for routes no longer configured.
    state: State,
    /// Each route's `/status` entry as last published.
    statuses: HashMap<String, Arc<RouteStatus>>,
    announcer: Announcer,
    /// The controls' monotonic time is measured from here.
    origin: Instant,
    /// When endpoint health was last compared with `/status`, and the
    /// upstreams' health change count then.
    health_shown: Instant,
    health_changes: u64,
    /// [`crate::upstream::Upstreams::health_clock_ms`] at that comparison.
    health_checked_ms: u64,
    /// When the next route is due a tick (see `judge_due`).
    next_due: Instant,
    /// The fleet (`[fleet]`), if any.
    fleet: Option<fleet::FleetLink>,
    /// Confirmation gates of rollout steps.
    gates: gates::Gates,
    /// Smoke checks running.
    smokes: smoke::Smokes,
    /// Active health checks' tasks, by endpoint.
    checkers: health::Checkers,
    /// Routing snapshots built so far (a batch of pooled evidence whose
    /// interval saw one is not published).
    rebuilds: std::sync::atomic::AtomicU64,
    /// A pooled test crossed: the routes are visited at the next tick.
    pool_look: bool,
    /// Where sleeping routes' recorders say a request came.
    wakes: Arc<crate::record::Wakes>,
    /// The routes the judge visits (indices into the config's routes, in
    /// its order): every judged route that does not sleep (see
    /// [`RouteRuntime::sleep`]).
    awake: std::collections::BTreeSet<usize>,
    /// Each configured route's index.
    index: HashMap<String, usize>,
    /// A new snapshot since smoke checks were last looked for: a route's
    /// checks become due only with a new config or decision.
    smoke_look: bool,
    /// Nothing for the 100 ms tick to do until a route rings or an
    /// upstream's health changes (see [`Controller::may_rest`]).
    resting: bool,
    /// The write of the decisions under way behind the loop, if any (see
    /// [`Controller::persist`]).
    saving: Option<crate::persist::Saving>,
    /// Decisions changed while that write was under way: written again
    /// when it returns.
    save_again: bool,
}

impl Controller {
    /// Loads persisted decisions and builds the first snapshot. The
    /// returned controller is started with [`Controller::run`].
    pub async fn start(
        applied: Applied,
        path: PathBuf,
        certs: Option<Arc<crate::tls::Certs>>,
        metrics: Arc<crate::metrics::Metrics>,
        upstreams: crate::upstream::Upstreams,
    ) -> Result<(Controller, Arc<Shared>), StateError> {
        let Applied {
            config,
            addrs,
            text,
            certs: _,
        } = applied;
        let dir = config.state.dir.clone();
        let load = tokio::task::spawn_blocking(move || State::load(&dir));
        let state = match crate::run::start_step("the state dir", load).await {
            Ok(r) => r?,
            Err(e) => {
                return Err(StateError::Io {
                    path: config.state.dir.clone(),
                    source: std::io::Error::other(e),
                })
            }
        };
        let now = Now::new(Duration::ZERO, crate::clock::unix_ms());
        let mut state = state;
        let wakes = Arc::new(crate::record::Wakes::default());
        let Reconciled {
            routes,
            mut controls,
            outputs,
        } = reconcile(
            &config,
            HashMap::new(),
            HashMap::new(),
            &mut state,
            now,
            &wakes,
        );
        // In a fleet, canaries get no traffic until the fleet's decisions
        // are read (a replica starts safe).
        let fleet = match &config.fleet {
            Some(f) => match crate::fleet::Fleet::start(f, &metrics) {
                Ok((fleet, news)) => {
                    tracing::info!(fleet = %f.name, replica = %fleet.replica, endpoints = ?f.endpoints, "joining the fleet; canaries get no traffic here until its decisions are read");
                    for c in controls.values_mut() {
                        c.set_sharing(veer_control::rollout::Sharing::Waiting);
                    }
                    Some(fleet::FleetLink::new(fleet, news))
                }
                Err(e) => {
                    return Err(StateError::Io {
                        path: config.state.dir.clone(),
                        source: std::io::Error::other(format!("fleet metrics: {e}")),
                    })
                }
            },
            None => None,
        };
        let snap = build_snapshot(&config, 1, &addrs, &routes, &controls, &metrics, &upstreams);
        snap.publish(None, &metrics);
        let shared = Arc::new(Shared::new(
            snap,
            metrics,
            upstreams,
            path.clone(),
            certs.clone(),
        ));
        shared.read_token.store(
            config.admin.read_token,
            std::sync::atomic::Ordering::Relaxed,
        );
        let reload = Reload::new(shared.clone(), path, &text, &config, certs);
        let mut announcer = Announcer::new(shared.metrics.clone());
        if let Some(l) = &fleet {
            announcer = announcer.with_fleet(l.metrics());
        }
        let mut c = Controller {
            announcer,
            fleet,
            gates: gates::Gates::new(),
            smokes: smoke::Smokes::new(),
            checkers: health::Checkers::default(),
            shared: shared.clone(),
            reload,
            config,
            addrs,
            generation: 1,
            routes,
            controls,
            state,
            statuses: HashMap::new(),
            origin: Instant::now(),
            health_shown: Instant::now(),
            health_changes: 0,
            health_checked_ms: 0,
            next_due: Instant::now(),
            rebuilds: std::sync::atomic::AtomicU64::new(0),
            pool_look: false,
            wakes,
            awake: Default::default(),
            index: HashMap::new(),
            smoke_look: true,
            resting: false,
            saving: None,
            save_again: false,
        };
        c.index_routes();
        c.wake_all();
        let changed = c.announce_all(&outputs);
        if changed {
            c.persist_now().await;
        }
        c.publish(&c.route_names(), true);
        Ok((c, shared))
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(
        mut self,
        mut actions: mpsc::Receiver<Command>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut triggers = Triggers::new(&self.reload.watched());
        // The config's health checks start with the loop (and follow each
        // routing rebuild after).
        self.sync_health_checks();
        let every = |period| {
            let mut i = tokio::time::interval(period);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        };
        let mut tick = every(TICK);
        let mut resolve = every(RESOLVE);
        resolve.reset();
        let mut save = every(SAVE_EVIDENCE);
        save.reset();
        // In a fleet: decisions taken here that the store lacks are
        // published again (the agent also retries on its own).
        let mut sweep = every(Duration::from_secs(5));
        // A re-resolution's result is applied when it comes, if the config
        // it was made for is still the one in force.
        let mut resolving: Option<Resolving> = None;
        let mut checking = None;
        let (wakes, shared) = (self.wakes.clone(), self.shared.clone());
        loop {
            tokio::select! {
                _ = resolve.tick(), if resolving.is_none() => {
                    resolving = reresolve::start(&self.config, self.generation);
                }
                (generation, r) = reresolve::finished(&mut resolving) => {
                    resolving = None;
                    self.resolved(generation, r);
                }
                // One check at a time; the loop (and so the judge) goes
                // on while it reads, parses and resolves.
                _ = triggers.next(), if checking.is_none() => {
                    checking = Some(self.reload.start());
                }
                r = reload::checked(&mut checking) => {
                    checking = None;
                    if let Some(applied) = self.reload.finish(r) {
                        self.apply(applied);
                        triggers.watch(&self.reload.watched());
                    } else {
                        self.publish(&[], false);
                    }
                }
                Some(cmd) = actions.recv() => {
                    // In a fleet, actions other than revert wait for the
                    // store (their answer comes when it commits).
                    if let Some(reply) = self.fleet_command(&cmd.route, cmd.action, cmd.said.as_deref(), cmd.reply) {
                        let result = self.act(&cmd.route, cmd.action, cmd.said.as_deref()).await;
                        let _ = reply.send(result);
                    }
                }
                Some(news) = fleet::next(&mut self.fleet) => {
                    // The tick looks again (a seat to let in, a pool's
                    // tests to show); it rests again if nothing is left.
                    self.resting = false;
                    self.on_fleet_news(news).await
                }
                Some(answer) = self.gates.next() => self.gate_answered(answer),
                Some(run) = self.smokes.next() => self.smoke_done(run),
                _ = sweep.tick(), if self.fleet.is_some() => self.fleet_sweep(),
                _ = tick.tick(), if !self.resting => {
                    // A new canary's smoke checks start within a tick of
                    // its config (or of a reset).
                    self.smoke_due();
                    self.judge_due();
                    self.resting = self.may_rest();
                }
                // Resting, the tick starts again (at once) when a route
                // rings or an upstream fails or recovers.
                _ = wakes.rung(), if self.resting => self.resting = false,
                _ = shared.upstreams.health_changed(), if self.resting => self.resting = false,
                written = crate::persist::saved(&mut self.saving) => self.saved(written),
                _ = save.tick() => self.save_evidence(),
                _ = shutdown.changed() => {
                    self.save_evidence();
                    self.flush().await;
                    if let Some(l) = self.fleet.take() {
                        l.leave().await;
                    }
                    return;
                }
            }
        }
    }

    fn route_names(&self) -> Vec<String> {
        self.config.routes.iter().map(|r| r.name.clone()).collect()
    }

    /// The time, for the route controls.
    fn now(&self) -> Now {
        self.at(Instant::now())
    }

    fn at(&self, t: Instant) -> Now {
        Now::new(t.duration_since(self.origin), crate::clock::unix_ms())
    }

    /// Records and announces each route's output; returns whether any
    /// decision changed.
    fn announce_all(&mut self, outputs: &[(String, Output)]) -> bool {
        let mut changed = false;
        for (name, out) in outputs {
            changed |= out.changed;
            self.record_deployments(name, out);
            self.announce(name, out);
        }
        changed
    }

    /// Remembers the deployments that `out` ended (history in the state
    /// dir, `veer_deployments_total`, time to revert); returns how many.
    fn record_deployments(&mut self, name: &str, out: &Output) -> usize {
        let now = crate::clock::unix_now();
        let mut n = 0;
        for e in &out.events {
            let Event::DeploymentEnded { result } = e else {
                continue;
            };
            n += 1;
            self.state.record_end(name, *result, now);
            let m = &self.shared.metrics;
            m.deployments.inc(name, result.as_str());
            if *result == DeploymentResult::Reverted {
                let first = self
                    .routes
                    .get(name)
                    .and_then(|rt| rt.canary.as_ref())
                    .and_then(|c| c.first_request());
                if let Some(first) = first {
                    m.time_to_revert
                        .with_label_values(&[name])
                        .observe(first.elapsed().as_secs_f64());
                }
            }
        }
        n
    }

    fn announce(&self, name: &str, out: &Output) {
        if out.events.is_empty() {
            return;
        }
        if let (Some(route), Some(c)) = (self.route_named(name), self.controls.get(name)) {
            self.announcer.announce(route, c.effective_bp(route), out);
        }
    }

    /// Whether the 100 ms tick has nothing to do until a route rings or
    /// an upstream fails or recovers: every route asleep, no smoke checks
    /// or pooled test to look at, no back-off that may yet run out, and in
    /// a fleet no seat to let in or pool to show (the fleet's news ends a
    /// rest; its evidence for a route rings it). An idle veer then wakes
    /// only for its other timers, instead of ten times a second.
    fn may_rest(&self) -> bool {
        self.awake.is_empty()
            && self.fleet.as_ref().is_none_or(|l| l.pool.quiet())
            && !self.smoke_look
            && !self.pool_look
            && !self
                .shared
                .upstreams
                .backoff_ended_since(self.health_checked_ms)
    }

    /// The configured route named `name`, found by its index (the
    /// config's own lookup walks the list: with many routes, a walk per
    /// route per tick adds up).
    fn route_named(&self, name: &str) -> Option<&veer_control::config::Route> {
        route_named(&self.config, &self.index, name)
    }

    /// Shows how many routes are awake (`veer_judge_routes_awake`).
    fn show_awake(&self) {
        self.shared
            .metrics
            .routes_awake
            .set(self.awake.len() as i64);
    }

    /// Finds each configured route's index (after a new config).
    fn index_routes(&mut self) {
        self.index = self
            .config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.clone(), i))
            .collect();
    }

    /// Wakes every route (see [`RouteRuntime::sleep`]): after a new
    /// config or routing snapshot, whatever changed is seen at each route's
    /// next tick, as if it had never slept. Costs one idle tick a route.
    fn wake_all(&mut self) {
        let now = Instant::now();
        self.awake.clear();
        for (i, r) in self.config.routes.iter().enumerate() {
            if let Some(rt) = self.routes.get_mut(&r.name) {
                rt.wake(now);
            }
            if r.judge.mode != veer_control::config::JudgeMode::Off {
                self.awake.insert(i);
            }
        }
        self.show_awake();
        // Visited at the next tick, which finds when each is due.
        self.next_due = now;
        self.smoke_look = true;
        self.resting = false;
    }

    /// Puts a new routing snapshot in effect, built from the decisions,
    /// and wakes every route (a share or decision may have changed).
    fn rebuild(&mut self) {
        self.wake_all();
        self.rebuilds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
        let snap = Arc::new(snap);
        self.shared.snapshot.store(snap.clone());
        self.shared.metrics.routing_rebuilds.inc();
        self.sync_health_checks();
        clear_ejections(&previous, &snap);
    }

    /// Rebuilds the `/status` entries and gauges of `names` from the
    /// snapshot in effect, then publishes the document (`all`: `names` are
    /// every route, and entries of others are dropped).
    fn publish(&mut self, names: &[String], all: bool) {
        let snap = self.shared.snapshot.load();
        let wanted: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
        let deployments = self.state.deployments_by_route(crate::clock::unix_now());
        if all {
            self.statuses.retain(|k, _| wanted.contains(k.as_str()));
        }
        // A few names are found through the index (the snapshot lists the
        // routes in the config's order): an event about one route does
        // not walk every route.
        let targets: Vec<&Arc<crate::snapshot::RouteTarget>> = if all {
            snap.routes
                .iter()
                .filter(|t| wanted.contains(&*t.name))
                .collect()
        } else {
            wanted
                .iter()
                .filter_map(|&name| {
                    self.index
                        .get(name)
                        .and_then(|&i| snap.routes.get(i))
                        .filter(|t| &*t.name == name)
                        .or_else(|| snap.routes.iter().find(|t| &*t.name == name))
                })
                .collect()
        };
        for target in targets {
            let (Some(rt), Some(c)) = (
                self.routes.get(&*target.name),
                self.controls.get(&*target.name),
            ) else {
                continue;
            };
            let d = deployments.get(&*target.name).copied().unwrap_or_default();
            crate::publish::gauges(&self.shared.metrics, target, rt, c, d);
            let mut status = crate::publish::route_status(target, rt, c, d);
            status.fleet = self.route_fleet_status(&target.name);
            if let Some(ro) = status.rollout.as_mut() {
                let dec = c.decision();
                (ro.waiting_confirmation, ro.confirmation) =
                    self.gates
                        .waiting(&target.name, dec.epoch, dec.rollout_step);
            }
            self.statuses
                .insert(target.name.to_string(), Arc::new(status));
        }
        let routes = self
            .config
            .routes
            .iter()
            .filter_map(|r| self.statuses.get(&r.name).cloned())
            .collect();
        let fleet = self.fleet.as_ref().map(|l| l.status());
        crate::publish::document(&self.shared, &self.config, self.generation, fleet, routes);
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

    /// Writes the decisions to the state dir behind the loop: the judge,
    /// reloads and the fleet's news go on while the disk answers (a busy
    /// disk's fsync can take a second). One write at a time: decisions
    /// that change meanwhile are written, all of them, when it returns.
    fn persist(&mut self) {
        if self.saving.is_some() {
            self.save_again = true;
            return;
        }
        self.save_again = false;
        self.saving = Some(crate::persist::start(
            self.shared.clone(),
            self.decisions(),
            self.config.state.dir.clone(),
        ));
    }

    /// The write behind the loop returned (`/status` shows whether it
    /// failed): the decisions are written again if they changed since.
    fn saved(&mut self, _written: bool) {
        self.saving = None;
        if self.save_again {
            self.persist();
        }
        self.publish(&[], false);
    }

    /// Writes the decisions to the state dir now, after the write behind
    /// the loop if one is under way (each returns within 5 s, see
    /// [`crate::persist::save`]); whether this one reached the disk. For
    /// what must be on disk before it is answered: an operator's action.
    async fn persist_now(&mut self) -> bool {
        if self.saving.is_some() {
            let _ = crate::persist::saved(&mut self.saving).await;
            self.saving = None;
        }
        self.save_again = false;
        crate::persist::save(
            &self.shared,
            self.decisions(),
            self.config.state.dir.clone(),
        )
        .await
    }

    /// Puts on disk what the writes behind the loop have not yet: at
    /// shutdown, and before a fleet's commit of an operator's action is
    /// answered.
    async fn flush(&mut self) {
        if self.save_again {
            self.persist_now().await;
        } else if self.saving.is_some() {
            let _ = crate::persist::saved(&mut self.saving).await;
            self.saving = None;
        }
    }

    /// Writes every judge's tests to the state dir, so that a restart
    /// continues them.
    fn save_evidence(&mut self) {
        let mut changed = false;
        // Only judges that saw traffic since their last save: an idle
        // route's tests did not move.
        for (name, rt) in self.routes.iter_mut().filter(|(_, rt)| rt.unsaved) {
            let Some(c) = self.controls.get_mut(name) else {
                continue;
            };
            if c.decision().canary_identity == rt.identity {
                changed |= c.set_evidence(serde_json::to_value(rt.judge.save_tests()).ok());
                rt.unsaved = false;
            }
        }
        // A write that failed is tried again (a decision kept unwritten,
        // a revert, must reach the disk once it answers again).
        if changed || self.shared.state_error_now().is_some() {
            self.persist();
        }
    }

    /// Applies a re-resolution made for config `generation`: a changed
    /// address is a new snapshot (the same config generation); a failure
    /// keeps the old addresses.
    fn resolved(&mut self, generation: u64, r: reresolve::Resolved) {
        if generation != self.generation {
            return; // made for a config no longer in force
        }
        match r {
            Ok(addrs) if addrs != self.addrs => {
                self.reload.said().clear("resolve");
                let changed: Vec<String> = addrs
                    .iter()
                    .filter(|(name, a)| self.addrs.get(*name) != Some(*a))
                    .map(|(name, a)| format!("{name} -> {a:?}"))
                    .collect();
                tracing::info!(endpoints = ?changed, "endpoint addresses changed");
                self.addrs = addrs;
                self.rebuild();
                self.publish(&self.route_names(), true);
            }
            Ok(_) => self.reload.said().clear("resolve"),
            // (Every 30 s while a name does not resolve: said once a minute.)
            Err(e) => {
                if self
                    .reload
                    .said()
                    .fresh("resolve", &e.to_string(), crate::sparse::REPEAT)
                {
                    tracing::warn!(error = %e, "re-resolving endpoints failed; the previous addresses stay")
                }
            }
        }
    }

    fn apply(&mut self, applied: Applied) {
        self.generation += 1;
        self.config = applied.config.clone();
        self.addrs = applied.addrs.clone();
        // New routes and intervals: visit them all at the next look.
        self.next_due = Instant::now();
        let now = self.now();
        let Reconciled {
            routes,
            controls,
            outputs,
        } = reconcile(
            &self.config,
            std::mem::take(&mut self.routes),
            std::mem::take(&mut self.controls),
            &mut self.state,
            now,
            &self.wakes,
        );
        self.controls = controls;
        self.routes = routes;
        self.index_routes();
        self.fleet_join();
        self.hold_unseated();
        let changed = self.announce_all(&outputs);
        let names = self.route_names();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        self.shared.metrics.window_latency.retain_routes(&refs);
        self.rebuild();
        self.reload.accepted(&applied, self.generation);
        self.publish(&names, true);
        if changed {
            self.persist();
        }
    }

    async fn act(
        &mut self,
        name: &str,
        action: Action,
        said: Option<&str>,
    ) -> Result<Arc<RouteStatus>, ActionError> {
        let now = self.now();
        let (Some(route), Some(control)) = (
            route_named(&self.config, &self.index, name),
            self.controls.get_mut(name),
        ) else {
            return Err(ActionError::NoRoute(name.into()));
        };
        let before = control.clone();
        let out = control.on_action_said(route, action, said, now)?;
        let history = self.state.history.clone();
        self.record_deployments(name, &out);
        if action == Action::Revert {
            // Out of traffic at once, as a revert of the judge's is, and
            // written after: it is kept whether or not the write succeeds
            // (refusing it for want of a disk would leave the canary in
            // traffic), so it need not wait for a slow disk.
            self.announce(name, &out);
            self.rebuild();
            self.publish(&[name.to_string()], false);
            // In a fleet, published to the store at once too.
            self.fleet_sweep();
            if !self.persist_now().await {
                // A restart before the next write succeeds forgets it
                // (`/status` shows the state error).
                tracing::error!(route = %name, "canary reverted here, but the decision could not be written to the state dir: a restart before a write succeeds would forget it");
            }
            self.publish(&[], false);
            return self
                .statuses
                .get(name)
                .cloned()
                .ok_or_else(|| ActionError::NoRoute(name.into()));
        }
        if !self.persist_now().await {
            // Other actions move toward the canary or change its
            // rollout: refused unless they outlive a restart.
            self.controls.insert(name.to_string(), before);
            self.state.history = history;
            self.publish(&[], false);
            let e = self.shared.state_error_now().unwrap_or_default();
            return Err(ActionError::State(e));
        }
        if action == Action::Reset {
            if let Some(rt) = self.routes.get_mut(name) {
                // (The decision written above no longer holds evidence.)
                rt.judge.reset_tests();
                // A new run of the canary: its time to revert counts anew.
                if let Some(c) = &rt.canary {
                    c.restart_first();
                }
            }
            // A new epoch: held until its seat is taken.
            self.hold_unseated();
        }
        self.announce(name, &out);
        self.rebuild();
        self.publish(&[name.to_string()], false);
        self.statuses
            .get(name)
            .cloned()
            .ok_or_else(|| ActionError::NoRoute(name.into()))
    }
}

/// The route of `config` named `name`, found through `index` (see
/// [`Controller::route_named`]).
fn route_named<'c>(
    config: &'c Config,
    index: &HashMap<String, usize>,
    name: &str,
) -> Option<&'c veer_control::config::Route> {
    index
        .get(name)
        .and_then(|&i| config.routes.get(i))
        .map(|r| &**r)
        .filter(|r| r.name == name)
        .or_else(|| config.route(name))
}

/// Endpoints outlier detection may have ejected under `before` (stable's
/// of routes that detect) that no route of `after` detects outliers on
/// any more (its `[route.outlier_detection]` removed, or the endpoint
/// moved to a route without one) are brought back at once. Cheap when no
/// route detects outliers.
fn clear_ejections(before: &crate::snapshot::Snapshot, after: &crate::snapshot::Snapshot) {
    let detected = |s: &crate::snapshot::Snapshot| {
        s.routes
            .iter()
            .filter(|r| r.outlier.is_some())
            .flat_map(|r| r.stable.balancer.endpoints().iter().cloned())
            .collect::<Vec<_>>()
    };
    let was = detected(before);
    if was.is_empty() {
        return;
    }
    let still: std::collections::HashSet<*const crate::upstream::Upstream> =
        detected(after).iter().map(Arc::as_ptr).collect();
    for u in was {
        if !still.contains(&Arc::as_ptr(&u)) {
            u.clear_ejection();
        }
    }
}
