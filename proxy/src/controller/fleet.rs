//! The fleet's side of the controller loop (`[fleet]`): records read from
//! the store applied to the routes' controls, reverts published, and every
//! change away from stable proposed to the store and taken once committed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use veer_control::config::Route;
use veer_control::fleet::{merge_publish, Change, FleetRecord, Proposal, Rejected};
use veer_control::rollout::{Action, Event, Output, Sharing};
use veer_control::status::{RouteFleetStatus, RouteStatus};

use super::{ActionError, Controller};
use crate::fleet::{Fleet, FromAgent, ProposeError, RecordKey};

/// How long an operator waits for the store to commit an action.
const COMMIT_WAIT: Duration = Duration::from_secs(5);

/// A proposal's answer, back in the controller loop.
pub(super) struct Committed {
    route: String,
    result: Result<(FleetRecord, i64), ProposeError>,
    /// The operator waiting for it (none for a rollout step).
    reply: Option<oneshot::Sender<Result<Arc<RouteStatus>, ActionError>>>,
}

/// How long a stopping replica waits to leave the fleet.
const LEAVE: std::time::Duration = std::time::Duration::from_secs(2);

/// The controller's link to the fleet agent.
pub(super) struct FleetLink {
    pub(super) fleet: Fleet,
    news: mpsc::UnboundedReceiver<FromAgent>,
    /// Every record read, watched or committed, the latest of each key,
    /// with the store's revision of its write (a record is applied once,
    /// in the store's order, whichever way it comes first).
    records: HashMap<RecordKey, (i64, FleetRecord)>,
    /// The fleet's decisions were read once.
    pub(super) synced: bool,
    /// Routes with a step proposal in flight.
    stepping: HashSet<String>,
    committed_tx: mpsc::UnboundedSender<Committed>,
    committed_rx: mpsc::UnboundedReceiver<Committed>,
    /// Where each route's decision last came from.
    sources: HashMap<String, (String, Option<String>, Option<Change>)>,
    /// Pooled evidence.
    pub(super) pool: super::pool::PoolLink,
}

impl FleetLink {
    /// Leaves the fleet at shutdown (after the state is written): at most
    /// [`LEAVE`], within the 5 s the controller has to stop.
    pub(super) async fn leave(self) {
        if !self.fleet.leave(LEAVE).await {
            tracing::warn!(limit = ?LEAVE, "the fleet store did not answer in time at shutdown: this replica's name stays taken until its lease runs out (10 s)");
        }
    }

    /// The link around a started agent.
    pub(super) fn new(fleet: Fleet, news: mpsc::UnboundedReceiver<FromAgent>) -> FleetLink {
        let (committed_tx, committed_rx) = mpsc::unbounded_channel();
        FleetLink {
            fleet,
            news,
            records: HashMap::new(),
            synced: false,
            stepping: HashSet::new(),
            committed_tx,
            committed_rx,
            sources: HashMap::new(),
            pool: super::pool::PoolLink::new(),
        }
    }

    /// How new controls join: waiting until the first read.
    pub(super) fn sharing(&self) -> Sharing {
        if self.synced {
            Sharing::Synced
        } else {
            Sharing::Waiting
        }
    }

    /// Keeps `record` if it is newer than the one known for `k`; returns
    /// whether it was.
    fn remember(&mut self, k: &RecordKey, record: &FleetRecord, revision: i64) -> bool {
        match self.records.get(k) {
            Some((known, _)) if *known >= revision => false,
            _ => {
                self.records.insert(k.clone(), (revision, record.clone()));
                true
            }
        }
    }

    /// The fleet's metrics.
    pub(super) fn metrics(&self) -> crate::fleet::FleetMetrics {
        self.fleet.metrics.clone()
    }

    /// The fleet for `/status`.
    pub(super) fn status(&self) -> veer_control::status::FleetStatus {
        self.fleet.status()
    }
}

/// What the fleet has for the controller next (pending forever without
/// a fleet).
pub(super) enum News {
    Agent(FromAgent),
    Committed(Committed),
    Seat(crate::fleet::PoolKey, Result<u32, String>),
    Replay(super::pool::Replay),
}

pub(super) async fn next(link: &mut Option<FleetLink>) -> Option<News> {
    match link {
        Some(l) => tokio::select! {
            n = l.news.recv() => n.map(News::Agent),
            c = l.committed_rx.recv() => c.map(News::Committed),
            s = l.pool.seat_rx.recv() => s.map(|(k, r)| News::Seat(k, r)),
            r = l.pool.replay_rx.recv() => r.map(News::Replay),
        },
        None => std::future::pending().await,
    }
}

fn key(route: &str, identity: u64) -> RecordKey {
    RecordKey {
        route: route.to_string(),
        identity,
    }
}

impl Controller {
    /// Applies what the fleet agent or a commit says.
    pub(super) async fn on_fleet_news(&mut self, news: News) {
        match news {
            News::Agent(FromAgent::Record(k, record, revision)) => {
                let Some(l) = self.fleet.as_mut() else {
                    return;
                };
                if !l.remember(&k, &record, revision) {
                    return;
                }
                if l.synced {
                    let local = record.by == l.fleet.replica;
                    self.apply_record(&k, &record, local);
                }
            }
            News::Agent(FromAgent::Synced(from)) => {
                self.on_pool_news(FromAgent::Synced(from));
                self.fleet_synced()
            }
            News::Agent(
                n @ (FromAgent::Evidence(..)
                | FromAgent::EvidenceBefore(..)
                | FromAgent::Checkpoint(..)),
            ) => self.on_pool_news(n),
            News::Seat(k, r) => self.pool_seat(k, r),
            News::Replay(r) => self.pool_replayed(r),
            News::Agent(FromAgent::StoreReplaced) => {
                if let Some(l) = self.fleet.as_mut() {
                    l.records.clear();
                }
                self.pools_lost();
            }
            News::Agent(FromAgent::Status) => {
                // The store came or went: a canary that only the pooled
                // tests could take out here is held while it is gone.
                if self.hold_unseated() {
                    self.rebuild();
                    let names = self.route_names();
                    self.publish(&names, false);
                } else {
                    self.publish(&[], false);
                }
            }
            News::Committed(c) => self.committed(c).await,
        }
    }

    /// Applies `record` to its route if it decides for the route's current
    /// canary; persists and announces what changed.
    fn apply_record(&mut self, k: &RecordKey, record: &FleetRecord, local: bool) {
        let changed = self.apply_record_quiet(k, record, local);
        // A reset from the fleet starts a new epoch, which needs its seat.
        let held = self.hold_unseated_of(Some(std::slice::from_ref(&k.route)));
        if changed || held {
            self.rebuild();
        }
        if changed {
            self.persist();
        }
        // Shown even when nothing changed: a revert of ours is now in the
        // store (no longer `unpublished`).
        if self.route_named(&k.route).is_some() {
            self.publish(std::slice::from_ref(&k.route), false);
        }
    }

    /// [`Controller::apply_record`] without the rebuild and the write;
    /// returns whether the decision changed.
    fn apply_record_quiet(&mut self, k: &RecordKey, record: &FleetRecord, local: bool) -> bool {
        let now = self.now();
        let Some(route) = self.route_named(&k.route).cloned() else {
            return false;
        };
        let Some(control) = self.controls.get_mut(&k.route) else {
            return false;
        };
        if control.decision().canary_identity != k.identity {
            return false;
        }
        let out = control.on_fleet(&route, record, local, now);
        if !out.changed && out.events.is_empty() {
            return false;
        }
        if out
            .events
            .iter()
            .any(|e| matches!(e, Event::FleetApplied { reset: true, .. }))
            || (local && record.last == Change::Reset)
        {
            if let Some(rt) = self.routes.get_mut(&k.route) {
                rt.judge.reset_tests();
                if let Some(c) = &rt.canary {
                    c.restart_first();
                }
            }
        }
        if out.changed {
            if let Some(l) = self.fleet.as_mut() {
                let source = if local { "local" } else { "fleet" };
                l.sources.insert(
                    k.route.clone(),
                    (source.into(), Some(record.by.clone()), Some(record.last)),
                );
            }
        }
        self.record_deployments(&k.route, &out);
        self.announce(&k.route, &out);
        out.changed
    }

    /// Tells the agent which pools are judged here (written in this
    /// replica's member key, for the collector of pools nobody judges).
    fn fleet_judging(&self) {
        if let Some(l) = &self.fleet {
            let judging: Vec<_> = self
                .controls
                .keys()
                .filter_map(|name| self.pool_key(name))
                .collect();
            l.fleet.judging(&judging);
        }
    }

    /// The fleet's decisions were read: every route takes the record of
    /// its canary, canaries come back into traffic, and decisions taken
    /// here that the store lacks are published.
    fn fleet_synced(&mut self) {
        let Some(l) = self.fleet.as_mut() else {
            return;
        };
        let first = !l.synced;
        l.synced = true;
        let records: Vec<(RecordKey, FleetRecord)> = l
            .records
            .iter()
            .map(|(k, (_, r))| (k.clone(), r.clone()))
            .collect();
        for c in self.controls.values_mut() {
            c.set_sharing(Sharing::Synced);
        }
        let mut changed = false;
        for (k, r) in &records {
            changed |= self.apply_record_quiet(k, r, false);
        }
        if first {
            tracing::info!(
                "fleet decisions read: this replica now routes to canaries as the fleet decided"
            );
        }
        self.fleet_sweep();
        self.fleet_judging();
        self.hold_unseated();
        self.rebuild();
        if changed {
            self.persist();
        }
        self.publish(&self.route_names(), true);
    }

    /// After a reload or a start: routes new to the controller join the
    /// fleet and take the records of their canaries.
    pub(super) fn fleet_join(&mut self) {
        let Some(l) = self.fleet.as_ref() else {
            return;
        };
        self.fleet_judging();
        let sharing = l.sharing();
        let records: Vec<(RecordKey, FleetRecord)> = self
            .controls
            .iter_mut()
            .filter_map(|(name, c)| {
                c.set_sharing(sharing);
                let k = key(name, c.decision().canary_identity);
                l.records.get(&k).map(|(_, r)| (k, r.clone()))
            })
            .collect();
        if sharing == Sharing::Synced {
            for (k, r) in &records {
                self.apply_record_quiet(k, r, false);
            }
            self.fleet_sweep();
        }
    }

    /// Publishes every decision taken here that the store does not have
    /// yet (a revert; a record the store lacks). The agent keeps the
    /// latest per key and retries until the store takes it.
    pub(super) fn fleet_sweep(&mut self) {
        let Some(l) = self.fleet.as_ref() else {
            return;
        };
        if !l.synced {
            return;
        }
        let now = self.now();
        for (name, c) in &self.controls {
            let id = c.decision().canary_identity;
            if id == 0 {
                continue;
            }
            let last = if c.decision().reverted.is_some() {
                Change::Revert
            } else {
                Change::Sync
            };
            let local = c.record(&l.fleet.replica, last, now);
            let k = key(name, id);
            if merge_publish(l.records.get(&k).map(|(_, r)| r), &local).is_some() {
                l.fleet.publish(k, local);
            }
        }
    }

    /// After a verdict: a revert is published (a due step goes through
    /// [`Controller::step_due`]).
    pub(super) fn fleet_after_verdict(&mut self, route: &Route, out: &Output) {
        let now = self.now();
        let Some(l) = self.fleet.as_mut() else {
            return;
        };
        if !out
            .events
            .iter()
            .any(|e| matches!(e, Event::Reverted { .. }))
        {
            return;
        }
        if let Some(c) = self.controls.get(&route.name) {
            let id = c.decision().canary_identity;
            let local = c.record(&l.fleet.replica, Change::Revert, now);
            l.fleet.publish(key(&route.name, id), local);
        }
    }

    /// Proposes the step after `from` (of `epoch`) to the fleet's store
    /// (one proposal in flight per route); taken when committed.
    pub(super) fn propose_step(&mut self, route: &Route, epoch: u64, from: usize) {
        let now = self.now();
        let Some(l) = self.fleet.as_mut() else {
            return;
        };
        if !l.synced || !l.stepping.insert(route.name.clone()) {
            return;
        }
        let steps = route.rollout.as_ref().map_or(0, |r| r.steps_bp.len());
        let Some(c) = self.controls.get(&route.name) else {
            l.stepping.remove(&route.name);
            return;
        };
        let id = c.decision().canary_identity;
        let local = c.record(&l.fleet.replica, Change::Sync, now);
        let proposal = Proposal::Step { epoch, from, steps };
        let rx = l.fleet.propose(key(&route.name, id), local, proposal, None);
        spawn_wait(l.committed_tx.clone(), route.name.clone(), rx, None);
    }

    /// An operator's action in a fleet: `revert` is taken here and
    /// published; every other action is proposed to the store and taken
    /// once committed (refused with 503 while the store is unreachable).
    /// Returns the reply sender back when the action is not the fleet's.
    pub(super) fn fleet_command(
        &mut self,
        name: &str,
        action: Action,
        said: Option<&str>,
        reply: oneshot::Sender<Result<Arc<RouteStatus>, ActionError>>,
    ) -> Option<oneshot::Sender<Result<Arc<RouteStatus>, ActionError>>> {
        let now = self.now();
        let Some(l) = self.fleet.as_mut() else {
            return Some(reply);
        };
        if action == Action::Revert {
            return Some(reply);
        }
        let Some(route) = super::route_named(&self.config, &self.index, name) else {
            let _ = reply.send(Err(ActionError::NoRoute(name.into())));
            return None;
        };
        let Some(c) = self.controls.get(name) else {
            let _ = reply.send(Err(ActionError::NoRoute(name.into())));
            return None;
        };
        if route.canary.is_none() {
            let _ = reply.send(Err(ActionError::Refused(
                veer_control::rollout::Refused::NoCanary(name.into()),
            )));
            return None;
        }
        if !l.synced {
            let _ = reply.send(Err(ActionError::Fleet(
                "the fleet's decisions have not been read yet (the store is unreachable since this replica started); actions other than revert need them".into(),
            )));
            return None;
        }
        let id = c.decision().canary_identity;
        let local = c.record(&l.fleet.replica, Change::Sync, now);
        let rx = l.fleet.propose(
            key(name, id),
            local,
            Proposal::Operator(action),
            said.map(str::to_string),
        );
        spawn_wait(l.committed_tx.clone(), name.to_string(), rx, Some(reply));
        None
    }

    async fn committed(&mut self, c: Committed) {
        if let Some(l) = self.fleet.as_mut() {
            if c.reply.is_none() {
                l.stepping.remove(&c.route);
            }
        }
        let (record, revision) = match c.result {
            Ok(r) => r,
            Err(e) => {
                if c.reply.is_none() {
                    tracing::debug!(route = %c.route, error = %e, "rollout step not taken by the fleet");
                }
                if let Some(reply) = c.reply {
                    let _ = reply.send(Err(match e {
                        ProposeError::Unreachable(_) => ActionError::Fleet(e.to_string()),
                        ProposeError::Rejected(Rejected::PromoteReverted) => ActionError::Refused(
                            veer_control::rollout::Refused::PromoteReverted(c.route.clone()),
                        ),
                        ProposeError::Rejected(r) => ActionError::Conflict(r.to_string()),
                    }));
                }
                return;
            }
        };
        let Some(id) = self
            .controls
            .get(&c.route)
            .map(|ctl| ctl.decision().canary_identity)
        else {
            if let Some(reply) = c.reply {
                let _ = reply.send(Err(ActionError::NoRoute(c.route)));
            }
            return;
        };
        let k = key(&c.route, id);
        // Applied now unless the watch brought it (or a later write) first.
        let fresh = self
            .fleet
            .as_mut()
            .is_some_and(|l| l.remember(&k, &record, revision));
        if record.identity == id && fresh {
            self.apply_record(&k, &record, true);
        }
        if let Some(reply) = c.reply {
            // An operator's action is answered once it is on disk here
            // too, as without a fleet.
            self.flush().await;
            let status = self
                .statuses
                .get(&c.route)
                .cloned()
                .ok_or_else(|| ActionError::NoRoute(c.route.clone()));
            let _ = reply.send(status);
        }
    }

    /// `/status`: where each route's decision came from.
    pub(super) fn route_fleet_status(&self, name: &str) -> Option<RouteFleetStatus> {
        let l = self.fleet.as_ref()?;
        let c = self.controls.get(name)?;
        let d = c.decision();
        let k = key(name, d.canary_identity);
        let (source, by, change) = match (l.synced, l.sources.get(name)) {
            (false, _) => ("waiting".to_string(), None, None),
            (true, Some((s, by, ch))) => (s.clone(), by.clone(), *ch),
            (true, None) => match l.records.get(&k) {
                Some((_, r)) => ("fleet".into(), Some(r.by.clone()), Some(r.last)),
                None => ("local".into(), None, None),
            },
        };
        let local = c.record(&l.fleet.replica, Change::Sync, self.now());
        Some(RouteFleetStatus {
            source,
            by,
            change: change.map(|c| c.as_str().to_string()),
            epoch: d.epoch,
            unpublished: d.canary_identity != 0
                && local.reverted.is_some()
                && merge_publish(l.records.get(&k).map(|(_, r)| r), &local).is_some(),
        })
    }
}

/// Waits for a proposal's answer (at most [`COMMIT_WAIT`]) and hands it to
/// the controller loop.
fn spawn_wait(
    tx: mpsc::UnboundedSender<Committed>,
    route: String,
    rx: oneshot::Receiver<Result<(FleetRecord, i64), ProposeError>>,
    reply: Option<oneshot::Sender<Result<Arc<RouteStatus>, ActionError>>>,
) {
    tokio::spawn(async move {
        let result = match tokio::time::timeout(COMMIT_WAIT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ProposeError::Unreachable("the fleet agent stopped".into())),
            Err(_) => Err(ProposeError::Unreachable(format!(
                "no answer from the store within {COMMIT_WAIT:?}"
            ))),
        };
        let _ = tx.send(Committed {
            route,
            result,
            reply,
        });
    });
}
