//! The fleet's pooled evidence in the controller loop (`[fleet]` with
//! `pool = true`, see `veer_control::pool`): this replica's bad events
//! published as batches, the fleet's log applied to each route's pooled
//! tests in the store's order, seats for the local tests, checkpoints for
//! replicas that join late.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use veer_control::pool::{Pool, PoolBatch, PoolView};

use super::Controller;
use crate::fleet::{FromAgent, PoolKey};

/// How often a pool that changed gets a checkpoint: the first member
/// writes it this long after the last one seen, the `k`-th member in name
/// order `k × CHECKPOINT_STAGGER` later (so a first member that cannot
/// write one, having joined late itself, is stood in for).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
const CHECKPOINT_STAGGER: Duration = Duration::from_secs(2);
/// How long after a failed read of a pool's history it is tried again.
const REPLAY_RETRY: Duration = Duration::from_secs(10);
/// How long after a failed attempt a seat is asked for again.
const SEAT_RETRY: Duration = Duration::from_secs(1);
/// Batches kept for a pool this replica does not judge yet (its config
/// has not reached it), and pools kept so: a few seconds' worth (at most
/// ~2 KB a batch); a longer wait reads the log back from the store's
/// history instead.
const MAX_ORPHANS: usize = 1_024;
const MAX_ORPHAN_POOLS: usize = 16;

/// A read of a pool's history: from which revision, after which
/// checkpoint (None: from the log's beginning), and what came back.
pub(super) struct Replay {
    key: PoolKey,
    start: i64,
    cp: Option<Pool>,
    result: crate::fleet::Replayed,
}

/// Batches of a pool no route here judges yet.
#[derive(Default)]
struct Orphans {
    batches: Vec<(i64, PoolBatch)>,
    /// Batches up to this revision were not kept.
    lost_until: i64,
}

/// The pools' side of the fleet link.
pub(super) struct PoolLink {
    /// The first revision the watch delivers in full (after the last
    /// read of the store).
    watch_from: i64,
    /// Per pool, the latest revision a read (not the watch) found a batch
    /// at: its log began before the watch.
    before: HashMap<PoolKey, i64>,
    orphans: HashMap<PoolKey, Orphans>,
    /// The latest checkpoint of each pool.
    checkpoints: HashMap<PoolKey, Pool>,
    /// The revision of the checkpoint last written from here.
    written: HashMap<PoolKey, i64>,
    /// When a checkpoint of each pool was last seen (or this replica
    /// started following it).
    cp_seen: HashMap<PoolKey, Instant>,
    /// This replica's place among the members, by name (refreshed once a
    /// second).
    rank: u32,
    last_rank: Instant,
    /// Reads of pools' histories asked for (and when).
    replaying: HashMap<PoolKey, Instant>,
    replay_tx: mpsc::UnboundedSender<Replay>,
    pub(super) replay_rx: mpsc::UnboundedReceiver<Replay>,
    /// Seats asked for (and when).
    asking: HashMap<PoolKey, Instant>,
    seat_tx: mpsc::UnboundedSender<(PoolKey, Result<u32, String>)>,
    pub(super) seat_rx: mpsc::UnboundedReceiver<(PoolKey, Result<u32, String>)>,
    /// Routes that took a seat since the last tick: their canaries are
    /// let in (one rebuild for all of them).
    seated: Vec<String>,
    /// Per route: the snapshot rebuilds counted when its log was last
    /// empty or taken (a batch whose interval saw a rebuild is dropped:
    /// its events may straddle two shares).
    sent: HashMap<String, u64>,
    /// Routes whose pooled tests changed since `/status` last showed them
    /// (shown once a second: an idle route has no verdicts to show them).
    dirty: HashSet<String>,
    shown: Instant,
    /// When the maps above were last rid of pools no route follows, and
    /// the snapshot rebuilds counted then.
    swept: Instant,
    swept_rebuilds: u64,
    /// When every pooled route was last looked at, and the snapshot
    /// rebuilds counted then (see `pool_due`); `full`: news came since.
    full_at: Instant,
    full_rebuilds: u64,
    full: bool,
}

impl PoolLink {
    /// Nothing for the tick to do here while every route sleeps: no seat
    /// to let in, no pool's tests to show.
    pub(super) fn quiet(&self) -> bool {
        self.seated.is_empty() && self.dirty.is_empty()
    }

    /// The latest revision of `key`'s pool a checkpoint is known for (seen
    /// in the store, or written from here).
    fn checkpointed(&self, key: &PoolKey) -> i64 {
        self.checkpoints
            .get(key)
            .map_or(0, Pool::revision)
            .max(self.written.get(key).copied().unwrap_or(0))
    }

    pub(super) fn new() -> PoolLink {
        let (seat_tx, seat_rx) = mpsc::unbounded_channel();
        let (replay_tx, replay_rx) = mpsc::unbounded_channel();
        PoolLink {
            watch_from: 0,
            before: HashMap::new(),
            orphans: HashMap::new(),
            checkpoints: HashMap::new(),
            written: HashMap::new(),
            cp_seen: HashMap::new(),
            rank: 0,
            last_rank: Instant::now(),
            replaying: HashMap::new(),
            replay_tx,
            replay_rx,
            asking: HashMap::new(),
            seat_tx,
            seat_rx,
            seated: Vec::new(),
            sent: HashMap::new(),
            dirty: HashSet::new(),
            shown: Instant::now(),
            swept: Instant::now(),
            swept_rebuilds: u64::MAX,
            full_at: Instant::now(),
            full_rebuilds: u64::MAX,
            full: true,
        }
    }
}

impl Controller {
    /// The pool key of a route's current canary (None: no canary, or the
    /// fleet does not pool its evidence).
    pub(super) fn pool_key(&self, name: &str) -> Option<PoolKey> {
        let rt = self.routes.get(name)?;
        let control = self.controls.get(name)?;
        (rt.judge.pooling() && rt.identity != 0).then(|| PoolKey {
            route: name.to_string(),
            identity: rt.identity,
            epoch: control.decision().epoch,
        })
    }

    /// What the agent says about pools.
    pub(super) fn on_pool_news(&mut self, news: FromAgent) {
        let Some(l) = self.fleet.as_mut() else {
            return;
        };
        l.pool.full = true;
        match news {
            FromAgent::Synced(watch_from) => {
                l.pool.watch_from = watch_from;
                let keys: Vec<String> = self.routes.keys().cloned().collect();
                for name in keys {
                    let Some(key) = self.pool_key(&name) else {
                        continue;
                    };
                    let Some(l) = self.fleet.as_ref() else { return };
                    let before = l.pool.before.get(&key).copied().unwrap_or(0);
                    if let Some(v) = self
                        .routes
                        .get_mut(&name)
                        .and_then(|rt| rt.judge.pool_mut())
                    {
                        let was = v.is_complete();
                        v.resync(before, watch_from);
                        if was && !v.is_complete() {
                            tracing::warn!(route = %name, "pooled evidence: batches were written while this replica could not see them; it waits for a checkpoint");
                        }
                    }
                }
            }
            FromAgent::EvidenceBefore(key, revision) => {
                let b = l.pool.before.entry(key).or_insert(0);
                *b = (*b).max(revision);
            }
            FromAgent::Checkpoint(key, pool) => {
                l.pool.cp_seen.insert(key.clone(), Instant::now());
                let newer = l
                    .pool
                    .checkpoints
                    .get(&key)
                    .is_none_or(|p| p.revision() < pool.revision());
                if !newer {
                    return;
                }
                if self.pool_key(&key.route).as_ref() == Some(&key) {
                    if let Some(v) = self
                        .routes
                        .get_mut(&key.route)
                        .and_then(|rt| rt.judge.pool_mut())
                    {
                        if v.checkpoint(&pool) {
                            tracing::info!(route = %key.route, revision = pool.revision(), "pooled evidence: caught up from a checkpoint");
                            self.wakes.ring(key.route.as_str().into());
                            if let Some(l) = self.fleet.as_mut() {
                                l.pool.dirty.insert(key.route.clone());
                            }
                        }
                    }
                }
                if let Some(l) = self.fleet.as_mut() {
                    l.pool.checkpoints.insert(key, pool);
                }
            }
            FromAgent::Evidence(key, batch, revision) => {
                if self.pool_key(&key.route).as_ref() == Some(&key) {
                    if let Some(rt) = self.routes.get_mut(&key.route) {
                        if let Some(v) = rt.judge.pool_mut() {
                            v.apply(revision, batch);
                            if rt.judge.pool_crossed() {
                                self.pool_look = true;
                            }
                            if rt.asleep {
                                self.wakes.ring(key.route.as_str().into());
                            }
                            if let Some(l) = self.fleet.as_mut() {
                                l.pool.dirty.insert(key.route);
                            }
                            return;
                        }
                    }
                }
                let Some(l) = self.fleet.as_mut() else { return };
                if !l.pool.orphans.contains_key(&key) && l.pool.orphans.len() >= MAX_ORPHAN_POOLS {
                    return;
                }
                let o = l.pool.orphans.entry(key).or_default();
                if o.batches.len() < MAX_ORPHANS {
                    o.batches.push((revision, batch));
                } else {
                    o.batches.clear();
                    o.lost_until = revision;
                }
            }
            _ => {}
        }
    }

    /// The store is another one (rebuilt, or restored from an older
    /// backup): its revisions are not the log's. The pooled tests of the
    /// canaries in traffic stop (a fresh pool of the same canary would be
    /// a second test spending α again); their local tests and guards go on,
    /// and a new canary (or a reset) pools again.
    pub(super) fn pools_lost(&mut self) {
        if let Some(l) = self.fleet.as_mut() {
            l.pool.full = true;
        }
        for (name, rt) in &mut self.routes {
            if let Some(v) = rt.judge.pool_mut() {
                v.resync(i64::MAX, i64::MAX);
                tracing::warn!(route = %name, "the fleet store was replaced: this canary's pooled tests stop (local tests and guards go on)");
            }
        }
        if let Some(l) = self.fleet.as_mut() {
            l.pool.before.clear();
            l.pool.orphans.clear();
            l.pool.checkpoints.clear();
            l.pool.written.clear();
        }
        self.wake_all();
    }

    /// A pool's history, read back: an incomplete view of it becomes
    /// complete when the history reaches where its watch began.
    pub(super) fn pool_replayed(&mut self, r: Replay) {
        if let Some(l) = self.fleet.as_mut() {
            l.pool.full = true;
        }
        let Replay {
            key,
            start,
            cp,
            result,
        } = r;
        match result {
            Ok(batches) => {
                if let Some(l) = self.fleet.as_mut() {
                    l.pool.replaying.remove(&key);
                }
                if self.pool_key(&key.route).as_ref() != Some(&key) {
                    return;
                }
                let n = batches.len();
                let Some(v) = self
                    .routes
                    .get_mut(&key.route)
                    .and_then(|rt| rt.judge.pool_mut())
                else {
                    return;
                };
                if v.replayed(start, cp.as_ref(), batches) {
                    tracing::info!(route = %key.route, from = start, batches = n, "pooled evidence: caught up from the store's history");
                    self.wakes.ring(key.route.as_str().into());
                    if let Some(l) = self.fleet.as_mut() {
                        l.pool.dirty.insert(key.route.clone());
                    }
                }
            }
            Err(e) => {
                tracing::warn!(route = %key.route, error = %e, "pooled evidence: could not read the log back; waiting for a checkpoint");
                if let Some(l) = self.fleet.as_mut() {
                    l.pool.replaying.insert(key, Instant::now());
                }
            }
        }
    }

    /// Holds out of traffic the canaries of pooling routes (judged in
    /// enforce mode, neither reverted nor promoted) that nothing here
    /// could take out but the guards: whose local tests have no seat yet,
    /// or found every seat taken while the store cannot be reached (the
    /// pooled tests hear nothing then); lets in the others
    /// (`RouteControl::set_unseated`). True if any changed (the caller
    /// rebuilds the snapshot).
    pub(super) fn hold_unseated(&mut self) -> bool {
        self.hold_unseated_of(None)
    }

    /// [`Controller::hold_unseated`] for the routes named in `only` (an
    /// event about a few routes looks at those, not at every route).
    pub(super) fn hold_unseated_of(&mut self, only: Option<&[String]>) -> bool {
        let Some(l) = self.fleet.as_ref() else {
            return false;
        };
        let connected = l.fleet.status().connected;
        let (config, index, routes) = (&self.config, &self.index, &self.routes);
        let mut changed = false;
        let (mut held, mut seated) = (Vec::new(), Vec::new());
        let mut look = |name: &str, c: &mut veer_control::rollout::RouteControl| {
            let Some(route) = super::route_named(config, index, name) else {
                return;
            };
            // A reverted canary is out anyway; a promoted one is judged no
            // more.
            let d = c.decision();
            let hold = route.canary.is_some()
                && d.reverted.is_none()
                && !d.promoted
                && route.strategy == veer_control::config::Strategy::Canary
                && route.judge.mode == veer_control::config::JudgeMode::Enforce
                && routes.get(name).is_some_and(|rt| {
                    rt.judge.pooling()
                        && (rt.judge.seat().is_none() || (!connected && !rt.judge.local_may_act()))
                });
            if !c.set_unseated(hold) {
                return;
            }
            changed = true;
            // Held with a seat number: every seat was taken.
            let all_taken = routes.get(name).is_some_and(|rt| rt.judge.seat().is_some());
            match (hold, all_taken) {
                (true, false) => held.push(name.to_string()),
                (true, true) => {
                    tracing::warn!(route = %name, "canary held out of traffic here while the fleet store cannot be reached: every seat of its local tests is taken, and the pooled tests hear nothing, so only the guards could take it out")
                }
                (false, _) => seated.push(name.to_string()),
            }
        };
        match only {
            None => {
                for (name, c) in self.controls.iter_mut() {
                    look(name, c);
                }
            }
            Some(names) => {
                for name in names {
                    if let Some(c) = self.controls.get_mut(name) {
                        look(name, c);
                    }
                }
            }
        }
        held.sort_unstable();
        seated.sort_unstable();
        crate::fleet::log_routes(
            &held,
            "canary held out of traffic here until its local tests have a seat (a number from the fleet store)",
        );
        crate::fleet::log_routes(&seated, "canary seated: it takes its share of traffic here");
        changed
    }

    /// Whether the fleet's side of a route pooling evidence has nothing
    /// to do while the route has no traffic of its own, so that it may
    /// sleep (see [`crate::runtime::RouteRuntime::sleep`]): the fleet's
    /// decisions read, its pool followed with the whole log, a seat for
    /// its local tests (or no canary to seat), no events of its own to
    /// publish, and a checkpoint (written or seen) of all it applied.
    /// What changes that (the fleet's evidence for it, a checkpoint or a
    /// replay caught up from, a rebuild) wakes it. True for a route that
    /// does not pool.
    pub(super) fn pool_settled(&self, name: &str) -> bool {
        let Some(rt) = self.routes.get(name) else {
            return true;
        };
        if !rt.judge.pooling() {
            return true;
        }
        let Some(l) = self.fleet.as_ref() else {
            return true;
        };
        let Some(key) = self.pool_key(name) else {
            return true;
        };
        let Some(view) = rt.judge.pool() else {
            return false; // not followed yet
        };
        let known = l.pool.checkpointed(&key);
        l.synced
            && view.is_complete()
            && view.pool().is_none_or(|p| p.revision() <= known)
            && (rt.judge.seat().is_some() || rt.canary.is_none())
            && !rt.stable.keys().pool_log().is_some_and(|p| p.pending())
    }

    /// A seat's answer (its canary is let in at the next tick).
    pub(super) fn pool_seat(&mut self, key: PoolKey, seat: Result<u32, String>) {
        if let Some(l) = self.fleet.as_mut() {
            l.pool.full = true;
        }
        let seats = self
            .fleet
            .as_ref()
            .map_or(0, |_| self.config.fleet.as_ref().map_or(0, |f| f.seats));
        match seat {
            Ok(n) => {
                if let Some(l) = self.fleet.as_mut() {
                    l.pool.asking.remove(&key);
                }
                if self.pool_key(&key.route).as_ref() != Some(&key) {
                    return;
                }
                if let Some(rt) = self.routes.get_mut(&key.route) {
                    rt.judge.set_seat(n);
                }
                // Let in at the next tick, with every seat answered
                // meanwhile: a replica joining with many routes gets
                // their seats in a burst, and a snapshot rebuilt for each
                // (every route's ring) was quadratic in the routes.
                if let Some(l) = self.fleet.as_mut() {
                    l.pool.seated.push(key.route.clone());
                }
                if n < seats {
                    // At debug: "canary seated" follows at the next tick
                    // (one line for many routes when a replica joins).
                    tracing::debug!(route = %key.route, seat = n, seats, "local tests take a seat: they act at their share of false_revert_rate");
                } else {
                    tracing::warn!(route = %key.route, seat = n, seats, "every seat of this canary's local tests is taken (replicas started during its rollout): this replica judges it on the fleet's pooled tests and its guards only");
                }
            }
            Err(e) => {
                tracing::debug!(route = %key.route, error = %e, "no seat yet for the local tests; asking again");
                if let Some(l) = self.fleet.as_mut() {
                    l.pool.asking.insert(key, Instant::now());
                }
            }
        }
    }

    /// Every tick (100 ms): the canaries of routes seated since the last
    /// tick let in, each pooled route's events since the last tick
    /// published as a batch, pools started for new canaries, seats asked
    /// for, checkpoints written.
    pub(super) fn pool_due(&mut self, now: Instant) {
        let Some(l) = self.fleet.as_mut() else {
            return;
        };
        if !l.pool.seated.is_empty() {
            let mut seated = std::mem::take(&mut l.pool.seated);
            seated.sort();
            seated.dedup();
            if self.hold_unseated_of(Some(&seated)) {
                self.rebuild();
            }
            self.publish(&seated, false);
        }
        let Some(l) = self.fleet.as_mut() else {
            return;
        };
        let rebuilds = self.rebuilds.load(std::sync::atomic::Ordering::Relaxed);
        let synced = l.synced;
        if now.duration_since(l.pool.last_rank) >= Duration::from_secs(1) {
            l.pool.last_rank = now;
            let s = l.status();
            let mut members = s.members;
            members.sort();
            l.pool.rank = members
                .iter()
                .position(|m| *m == l.fleet.replica)
                .unwrap_or(members.len()) as u32;
        }
        let cp_after = CHECKPOINT_EVERY + CHECKPOINT_STAGGER * l.pool.rank;
        // Every pooled route is looked at once a second, after a new
        // snapshot and after news of the fleet's pools (seats, checkpoints
        // and replays are retried on a scale of seconds; a new canary's
        // pool starts after its snapshot); in between, only the routes
        // with events to publish, on the 100 ms clock. An idle route's
        // batch state is brought up to date at each full look, and a full
        // look follows every rebuild, so a batch is dropped exactly when
        // its interval saw a rebuild, as before.
        let full = l.pool.full
            || l.pool.full_rebuilds != rebuilds
            || now.duration_since(l.pool.full_at) >= Duration::from_secs(1);
        if full {
            l.pool.full = false;
            l.pool.full_rebuilds = rebuilds;
            l.pool.full_at = now;
        }
        // Only the routes awake: a sleeping one fell asleep with its side
        // of the pool settled, and wakes with a request of its own (its
        // events go in the batch of the tick after), with the fleet's
        // evidence for it and with every rebuild.
        let names: Vec<String> = self
            .awake
            .iter()
            .filter_map(|&i| self.config.routes.get(i))
            .filter(|r| {
                self.routes.get(&r.name).is_some_and(|rt| {
                    rt.judge.pooling()
                        && (full || rt.stable.keys().pool_log().is_some_and(|p| p.pending()))
                })
            })
            .map(|r| r.name.clone())
            .collect();
        let mut started = Vec::new();
        for name in names {
            let Some(key) = self.pool_key(&name) else {
                continue;
            };
            let w_bp = match (self.route_named(&name), self.controls.get(&name)) {
                (Some(r), Some(c)) => c.effective_bp(r),
                _ => continue,
            };
            let (Some(l), Some(rt)) = (self.fleet.as_mut(), self.routes.get_mut(&name)) else {
                continue;
            };
            // Publish this replica's events of the last tick (100 ms).
            // On a clock, never on what the events are: a batch sent
            // sooner because it holds a canary event would put canary
            // events ahead of stable events that came first, and the
            // pooled test, read after every batch, would peak higher than
            // it may (see `veer_control::pool`).
            let sent = l.pool.sent.entry(name.clone()).or_insert(rebuilds);
            let log = rt.stable.keys().pool_log();
            if let Some(taken) = log.and_then(|p| p.take()) {
                let overflow = taken.overflow;
                let clean = *sent == rebuilds;
                *sent = rebuilds;
                if overflow > 0 {
                    tracing::debug!(route = %name, overflow, "pooled evidence: a batch was full; later events of the interval stay local");
                }
                if synced && clean && w_bp > 0 && w_bp < 10_000 {
                    let keys = rt.stable.keys();
                    let batch = PoolBatch {
                        fp: rt.judge.pool_fingerprint(),
                        w: f64::from(w_bp) / 10_000.0,
                        round: if taken.addr.is_empty() {
                            0
                        } else {
                            keys.round_votes()
                        },
                        ev: taken.ev,
                        addr: taken.addr,
                    };
                    l.fleet.evidence(key.clone(), &batch);
                }
            } else {
                // Nothing recorded: the next batch starts clean.
                *sent = rebuilds;
            }
            if !synced {
                continue;
            }
            // Follow the fleet's pool of this canary.
            if rt.judge.pool().is_none() {
                if let Some(fresh) = rt.judge.fresh_pool() {
                    let orphans = l.pool.orphans.remove(&key).unwrap_or_default();
                    let gap = l
                        .pool
                        .before
                        .get(&key)
                        .copied()
                        .unwrap_or(0)
                        .max(orphans.lost_until);
                    let mut view = if gap == 0 {
                        PoolView::complete(fresh)
                    } else {
                        PoolView::incomplete(fresh, gap + 1)
                    };
                    for (rev, b) in orphans.batches {
                        view.apply(rev, b);
                    }
                    if let Some(cp) = l.pool.checkpoints.get(&key) {
                        view.checkpoint(cp);
                    }
                    if !view.is_complete() {
                        tracing::info!(route = %name, "pooled evidence: the fleet's log of this canary began before this replica saw it; waiting for a checkpoint (the others' pooled verdicts apply meanwhile)");
                    }
                    rt.judge.set_pool(view);
                    if rt.judge.pool_crossed() {
                        self.pool_look = true;
                    }
                    started.push(name.clone());
                }
            }
            // A seat for the local tests.
            if rt.judge.seat().is_none() && rt.canary.is_some() {
                let due = l
                    .pool
                    .asking
                    .get(&key)
                    .is_none_or(|at| now.duration_since(*at) >= SEAT_RETRY);
                if due {
                    // Marked as asked far ahead: the answer clears it.
                    l.pool
                        .asking
                        .insert(key.clone(), now + Duration::from_secs(3600));
                    let rx = l.fleet.seat(key.clone());
                    let tx = l.pool.seat_tx.clone();
                    let k = key.clone();
                    tokio::spawn(async move {
                        let r = rx
                            .await
                            .unwrap_or_else(|_| Err("the fleet agent stopped".into()));
                        let _ = tx.send((k, r));
                    });
                }
            }
            // A checkpoint when none was seen for a while (the first
            // member's turn comes first).
            if let Some(p) = rt.judge.pool().and_then(|v| v.pool()) {
                let seen = *l.pool.cp_seen.entry(key.clone()).or_insert(now);
                let known = l.pool.checkpointed(&key);
                if p.revision() > known && now.duration_since(seen) >= cp_after {
                    l.fleet.checkpoint(key.clone(), p);
                    l.pool.written.insert(key.clone(), p.revision());
                    l.pool.cp_seen.insert(key.clone(), now);
                }
            }
            // An incomplete view reads the log back from the store's
            // history: after the latest checkpoint, or from its beginning.
            if let Some(v) = rt.judge.pool().filter(|v| !v.is_complete()) {
                let until = v.covers_from().saturating_sub(1);
                let due = l
                    .pool
                    .replaying
                    .get(&key)
                    .is_none_or(|at| now.duration_since(*at) >= REPLAY_RETRY);
                let cp = l.pool.checkpoints.get(&key).cloned();
                let start = cp.as_ref().map_or(1, |c| c.revision() + 1);
                if due && start <= until && v.covers_from() < i64::MAX {
                    // Marked far ahead while the read runs; its answer
                    // clears or re-arms it.
                    l.pool
                        .replaying
                        .insert(key.clone(), now + Duration::from_secs(3600));
                    let rx = l.fleet.replay(key.clone(), start, until);
                    let tx = l.pool.replay_tx.clone();
                    let k = key.clone();
                    tokio::spawn(async move {
                        let result = rx
                            .await
                            .unwrap_or_else(|_| Err("the fleet agent stopped".into()));
                        let _ = tx.send(Replay {
                            key: k,
                            start,
                            cp,
                            result,
                        });
                    });
                }
            }
        }
        if let Some(l) = self.fleet.as_mut().filter(|l| {
            l.pool.swept_rebuilds != rebuilds
                && now.duration_since(l.pool.swept) >= Duration::from_secs(1)
        }) {
            // Pools no route follows any more (at most once a second, and
            // only after a rebuild: the maps gain keys of live pools only,
            // and lose them with a new config or epoch, each of which
            // rebuilds; a second later is soon enough).
            l.pool.swept = now;
            l.pool.swept_rebuilds = rebuilds;
            let live: HashSet<PoolKey> = self
                .routes
                .keys()
                .filter_map(|n| {
                    let rt = self.routes.get(n)?;
                    let c = self.controls.get(n)?;
                    Some(PoolKey {
                        route: n.clone(),
                        identity: rt.identity,
                        epoch: c.decision().epoch,
                    })
                })
                .collect();
            l.pool.written.retain(|k, _| live.contains(k));
            l.pool.cp_seen.retain(|k, _| live.contains(k));
            l.pool.replaying.retain(|k, _| live.contains(k));
            l.pool.sent.retain(|n, _| self.routes.contains_key(n));
            l.pool.asking.retain(|k, _| live.contains(k));
            if l.pool.checkpoints.len() > MAX_ORPHAN_POOLS {
                l.pool.checkpoints.retain(|k, _| live.contains(k));
            }
        }
        if let Some(l) = self.fleet.as_mut() {
            if now.duration_since(l.pool.shown) >= Duration::from_secs(1) {
                l.pool.shown = now;
                started.extend(l.pool.dirty.drain());
            }
        }
        if !started.is_empty() {
            started.sort();
            started.dedup();
            self.publish(&started, false);
        }
    }
}
