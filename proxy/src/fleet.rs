//! A fleet's shared decisions, through etcd v3.
//!
//! One task (the agent) owns the etcd client. The controller hands it
//! decisions to publish (a revert: taken here first, written when the store
//! can be reached) and proposals to commit (everything that moves traffic
//! toward the canary: written first, taken when committed), and hears back
//! every record of the fleet, in the store's order, from one watch.
//!
//! Keys, under `/veer/v1/<fleet>/`:
//!
//! - `decision/<route>/<identity>`: a [`FleetRecord`] (JSON), changed only by
//!   a transaction on its `mod_revision` (read, merge, compare-and-put);
//! - `members/<replica>`: the replica's name, version and the pools it
//!   judges (`<route>/<identity>`), under a 10 s lease;
//! - `ev/<route>/<identity>/<epoch>/<replica>`: the replica's latest batch
//!   of bad events for the fleet's pooled tests (`veer_control::pool`);
//!   every put is an entry of the log, which the watch delivers in order;
//! - `pool/<route>/<identity>/<epoch>`: a checkpoint of the pooled tests
//!   (a [`Pool`] as of its last batch), for replicas that join late;
//! - `seats/<route>/<identity>/<epoch>`: the counter that hands out seats
//!   for local tests, each number once.
//!
//! A pool's `ev/`, `pool/` and `seats/` keys are deleted once the fleet's
//! record says its judging is over, `[fleet] keep_evidence` later
//! ([`veer_control::fleet::pool_finished`]), or once no member has judged
//! it for `keep_evidence` (its canary left every replica's config), by one
//! replica (the member whose name sorts first); `decision/` records stay.
//!
//! The rules that merge records are pure and live in
//! `control/src/fleet.rs`; this is the I/O around them.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
use tokio::sync::{mpsc, oneshot};
use veer_control::config::FleetSettings;
use veer_control::fleet::{
    merge_publish, pool_finished, propose, Change, FleetRecord, Proposal, Rejected,
};
use veer_control::pool::{Pool, PoolBatch};
use veer_control::status::FleetStatus;

/// Lease of a member's key: a replica gone this long leaves the list.
const MEMBER_TTL: i64 = 10;
/// How often the lease is renewed.
const KEEP_ALIVE: Duration = Duration::from_secs(3);
/// Deadline of one call to the store; a slower store is unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Back-off between reconnections, doubling up to the second.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));
/// Compare-and-put attempts before a write is retried later.
const CAS_ATTEMPTS: usize = 8;

/// A route's record: which route, which canary identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RecordKey {
    /// The route.
    pub route: String,
    /// The canary identity.
    pub identity: u64,
}

/// A `decision/<route>/<identity>` key (the part after `decision/`) and
/// its value; `None` if either does not parse.
fn parse_record(path: &str, value: &[u8]) -> Option<(RecordKey, FleetRecord)> {
    let (route, id) = path.rsplit_once('/')?;
    let identity = u64::from_str_radix(id, 16).ok()?;
    let record = serde_json::from_slice::<FleetRecord>(value).ok()?;
    Some((
        RecordKey {
            route: route.to_string(),
            identity,
        },
        record,
    ))
}

/// A pool of evidence: route, canary identity and epoch.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The route.
    pub route: String,
    /// The canary identity.
    pub identity: u64,
    /// Resets of the identity so far.
    pub epoch: u64,
}

impl PoolKey {
    fn path(&self) -> String {
        format!("{}/{:016x}/{}", self.route, self.identity, self.epoch)
    }

    /// The canary it pools for, as members name the pools they judge
    /// (every epoch).
    fn judged(&self) -> String {
        format!("{}/{:016x}", self.route, self.identity)
    }

    fn parse(s: &str) -> Option<PoolKey> {
        let mut parts = s.rsplitn(3, '/');
        let epoch = parts.next()?.parse().ok()?;
        let identity = u64::from_str_radix(parts.next()?, 16).ok()?;
        let route = parts.next()?.to_string();
        Some(PoolKey {
            route,
            identity,
            epoch,
        })
    }
}

/// A pool's batches read back from the store's history, or why not.
pub type Replayed = Result<Vec<(i64, PoolBatch)>, String>;

/// An etcd client's error in words a person reads: a gRPC status's
/// message, code and causes, each once (tonic's own `Display` of a status
/// prints its cause's debug form: `source: tonic::transport::Error(Transport,
/// ConnectError(...))`); other errors as they say themselves.
fn said(e: &etcd_client::Error) -> String {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return e.to_string();
    };
    let mut out = format!(
        "{} ({})",
        status.message(),
        status.code().description().to_lowercase()
    );
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// How long reading a pool's history back may take.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the puts under `prefix` at revisions `from..=until` back with a
/// watch from `from` (the store's history; an error if compacted).
async fn replay(mut client: Client, prefix: String, from: i64, until: i64) -> Replayed {
    let mut stream = client
        .watch(
            prefix.as_str(),
            Some(WatchOptions::new().with_prefix().with_start_revision(from)),
        )
        .await
        .map_err(|e| format!("watching {prefix} from {from}: {}", said(&e)))?;
    let mut out = Vec::new();
    let read = async {
        while let Some(resp) = stream
            .message()
            .await
            .map_err(|e| format!("reading {prefix}'s history: {}", said(&e)))?
        {
            if resp.compact_revision() > 0 {
                return Err(format!(
                    "{prefix}'s history from {from} was compacted (up to {})",
                    resp.compact_revision()
                ));
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let rev = kv.mod_revision();
                if ev.event_type() == EventType::Put && rev <= until {
                    if let Ok(b) = serde_json::from_slice::<PoolBatch>(kv.value()) {
                        out.push((rev, b));
                    }
                }
                if rev >= until {
                    return Ok(());
                }
            }
        }
        Err("the history watch ended".to_string())
    };
    // Dropping the stream at the end cancels the watch.
    match tokio::time::timeout(REPLAY_TIMEOUT, read).await {
        Ok(Ok(())) => Ok(out),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("reading {prefix}'s history timed out")),
    }
}

/// How often, at most, the first member looks for finished pools.
const COLLECT_EVERY: Duration = Duration::from_secs(600);

/// Deletes the `ev/`, `pool/` and `seats/` keys of pools the fleet's
/// records say are finished (`pool_finished`), and of pools no member has
/// judged for `keep` (`unjudged`: since when each was seen so, kept from
/// one look to the next); returns how many. Keys that do not parse are
/// left alone, and so is every pool while a member does not say which
/// pools it judges (a veer from before members said so).
async fn collect_finished(
    mut client: Client,
    prefix: &str,
    keep: Duration,
    unjudged: Arc<Mutex<HashMap<String, u64>>>,
) -> Result<usize, String> {
    let now_ms = crate::clock::unix_ms();
    let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
    let mprefix = format!("{prefix}members/");
    let got = client
        .get(mprefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| format!("reading the fleet's members: {}", said(&e)))?;
    // The pools some member judges; None when a member does not say.
    let judged: Option<BTreeSet<String>> =
        got.kvs().iter().try_fold(BTreeSet::new(), |mut all, kv| {
            let v: serde_json::Value = serde_json::from_slice(kv.value()).ok()?;
            for p in v.get("pools")?.as_array()? {
                all.insert(p.as_str()?.to_string());
            }
            Some(all)
        });
    let dprefix = format!("{prefix}decision/");
    let got = client
        .get(dprefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| format!("reading the fleet's decisions: {}", said(&e)))?;
    let records: HashMap<RecordKey, FleetRecord> = got
        .kvs()
        .iter()
        .filter_map(|kv| {
            let path = std::str::from_utf8(kv.key())
                .ok()?
                .strip_prefix(dprefix.as_str())?;
            parse_record(path, kv.value())
        })
        .collect();
    let mut doomed = Vec::new();
    // Pools found unjudged in this look: the clocks of the others stop.
    let mut unjudged_now = BTreeSet::new();
    for kind in ["ev/", "pool/", "seats/"] {
        let kprefix = format!("{prefix}{kind}");
        let got = client
            .get(
                kprefix.as_str(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .map_err(|e| format!("listing {kprefix}: {}", said(&e)))?;
        for kv in got.kvs() {
            let Some(rest) = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| k.strip_prefix(kprefix.as_str()))
            else {
                continue;
            };
            // `ev/` keys end in the replica that wrote them.
            let pool = if kind == "ev/" {
                rest.rsplit_once('/').map(|(p, _)| p)
            } else {
                Some(rest)
            };
            let Some(k) = pool.and_then(PoolKey::parse) else {
                continue;
            };
            let judged_here = k.judged();
            let finished = records
                .get(&RecordKey {
                    route: k.route,
                    identity: k.identity,
                })
                .is_some_and(|r| pool_finished(r, k.epoch, now_ms, keep));
            // A pool nobody judges: its canary left the config (replaced,
            // removed) without a decision.
            let abandoned = match &judged {
                Some(j) if !j.contains(&judged_here) => {
                    let since = *lock(&unjudged).entry(judged_here.clone()).or_insert(now_ms);
                    unjudged_now.insert(judged_here);
                    now_ms.saturating_sub(since) >= keep_ms
                }
                _ => false,
            };
            if finished || abandoned {
                doomed.push(kv.key().to_vec());
            }
        }
    }
    lock(&unjudged).retain(|p, _| unjudged_now.contains(p));
    // A transaction takes at most 128 operations by default.
    for chunk in doomed.chunks(64) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|k| TxnOp::delete(k.clone(), None))
            .collect();
        client
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| format!("deleting finished pools' keys: {}", said(&e)))?;
    }
    Ok(doomed.len())
}

/// Why a proposal was not committed.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// The store could not be reached: nothing was written.
    #[error("the fleet store (etcd) cannot be reached: {0}; actions that move traffic toward the canary need it (a revert does not)")]
    Unreachable(String),
    /// The store's record refused it.
    #[error(transparent)]
    Rejected(#[from] Rejected),
}

/// What the agent tells the controller.
#[derive(Debug)]
pub enum FromAgent {
    /// A record, as read or watched, in the store's order, with the
    /// store's revision of the write.
    Record(RecordKey, FleetRecord, i64),
    /// Every record of the fleet has been read once (after the first read,
    /// and after each re-read of a compacted history); the watch delivers
    /// every write from this revision on.
    Synced(i64),
    /// A batch of a pool's log, from the watch, with the store's revision.
    Evidence(PoolKey, PoolBatch, i64),
    /// A read (not the watch) found a batch of a pool written at this
    /// revision: its log began before the watch.
    EvidenceBefore(PoolKey, i64),
    /// A checkpoint of a pool, read or watched.
    Checkpoint(PoolKey, Pool),
    /// The store is not the one read before (another cluster, or restored
    /// from an older backup): forget the revisions of records seen so far;
    /// every record follows again.
    StoreReplaced,
    /// Connection or membership changed (for `/status`).
    Status,
}

enum ToAgent {
    Publish(RecordKey, FleetRecord),
    /// A batch of this replica's bad events (dropped when the store cannot
    /// be reached: a batch never written is in nobody's log).
    Evidence(PoolKey, Vec<u8>),
    /// A checkpoint to write (dropped when the store cannot be reached).
    Checkpoint(PoolKey, Vec<u8>),
    /// A seat for the local tests.
    Seat(PoolKey, oneshot::Sender<Result<u32, String>>),
    /// A pool's batches from one revision up to another, from the store's
    /// history.
    Replay(PoolKey, i64, i64, oneshot::Sender<Replayed>),
    Propose {
        key: RecordKey,
        local: FleetRecord,
        proposal: Proposal,
        /// Who asked for an operator's action and why.
        said: Option<String>,
        reply: oneshot::Sender<Result<(FleetRecord, i64), ProposeError>>,
    },
    /// The pools this replica judges now (`PoolKey::judged`).
    Judging(BTreeSet<String>),
}

/// The fleet's metrics (registered only when `[fleet]` is configured).
#[derive(Clone)]
pub struct FleetMetrics {
    /// `veer_fleet_connected`.
    pub connected: IntGauge,
    /// `veer_fleet_members`.
    pub members: IntGauge,
    /// `veer_fleet_kept_out`.
    pub kept_out: IntGauge,
    /// `veer_fleet_decisions_total{route,action,source}`.
    pub decisions: IntCounterVec,
    /// `veer_fleet_propagation_seconds`.
    pub propagation: Histogram,
    /// `veer_fleet_collected_keys_total`.
    pub collected: IntCounter,
}

impl FleetMetrics {
    /// Creates and registers them.
    pub fn new(m: &crate::metrics::Metrics) -> Result<FleetMetrics, prometheus::Error> {
        let connected = IntGauge::new(
            "veer_fleet_connected",
            "1 while connected to the fleet's store (etcd) with a watch running.",
        )?;
        let members = IntGauge::new(
            "veer_fleet_members",
            "Replicas of the fleet with a live member key.",
        )?;
        let kept_out = IntGauge::new(
            "veer_fleet_kept_out",
            "1 while this replica is kept out of the fleet because another veer holds its name ([fleet] replica).",
        )?;
        let decisions = IntCounterVec::new(
            Opts::new(
                "veer_fleet_decisions_total",
                "Fleet decisions taken here (source=local) or applied from another replica (source=fleet).",
            ),
            &["route", "action", "source"],
        )?;
        let propagation = Histogram::with_opts(
            HistogramOpts::new(
                "veer_fleet_propagation_seconds",
                "From a decision on one replica to its application here.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        m.register(Box::new(connected.clone()))?;
        m.register(Box::new(members.clone()))?;
        m.register(Box::new(kept_out.clone()))?;
        m.register(Box::new(decisions.clone()))?;
        let collected = IntCounter::new(
            "veer_fleet_collected_keys_total",
            "Keys of finished pools (pooled evidence whose judging the fleet's record ended, keep_evidence ago) this replica deleted from the store.",
        )?;
        m.register(Box::new(propagation.clone()))?;
        m.register(Box::new(collected.clone()))?;
        Ok(FleetMetrics {
            connected,
            members,
            kept_out,
            decisions,
            propagation,
            collected,
        })
    }
}

/// The controller's side of the agent.
pub struct Fleet {
    /// This replica's name.
    pub replica: String,
    /// The fleet's metrics.
    pub metrics: FleetMetrics,
    status: Arc<Mutex<FleetStatus>>,
    to_agent: mpsc::UnboundedSender<ToAgent>,
    agent: tokio::task::JoinHandle<()>,
}

impl Fleet {
    /// Starts the agent. Its news arrive on the returned receiver.
    pub fn start(
        settings: &FleetSettings,
        metrics: &crate::metrics::Metrics,
    ) -> Result<(Fleet, mpsc::UnboundedReceiver<FromAgent>), prometheus::Error> {
        let replica = replica_name(settings);
        let fm = FleetMetrics::new(metrics)?;
        let status = Arc::new(Mutex::new(FleetStatus {
            store: "etcd".into(),
            name: settings.name.clone(),
            replica: replica.clone(),
            ..FleetStatus::default()
        }));
        let (to_agent, requests) = mpsc::unbounded_channel();
        let (news, from_agent) = mpsc::unbounded_channel();
        let agent = Agent {
            settings: settings.clone(),
            prefix: format!("/veer/v1/{}/", settings.name),
            replica: replica.clone(),
            status: status.clone(),
            metrics: fm.clone(),
            news,
            pending: HashMap::new(),
            revision: 0,
            cluster: 0,
            members: BTreeSet::new(),
            // Replicas start on different members.
            endpoint: xxhash_rust::xxh3::xxh3_64(replica.as_bytes()) as usize,
            judging: None,
            unjudged: Arc::new(Mutex::new(HashMap::new())),
            instance: format!("{:016x}", fastrand::u64(..)),
        };
        let agent = tokio::spawn(agent.run(requests));
        Ok((
            Fleet {
                replica,
                metrics: fm,
                status,
                to_agent,
                agent,
            },
            from_agent,
        ))
    }

    /// Leaves the fleet at shutdown, waiting at most `limit`: the agent
    /// writes what it was sent before (a revert taken in the last moment),
    /// revokes its member lease and ends. Returns whether it ended in
    /// time. Without the wait the process ended first, and its member key
    /// stayed until the lease ran out (10 s): a replica of the same name
    /// (a restart, a rolling update's pod) was kept out that long.
    pub async fn leave(self, limit: Duration) -> bool {
        let Fleet {
            to_agent, agent, ..
        } = self;
        drop(to_agent);
        tokio::time::timeout(limit, agent).await.is_ok()
    }

    /// Publishes a decision taken here (a revert): written when the store
    /// can be reached, merged with what it holds then.
    pub fn publish(&self, key: RecordKey, local: FleetRecord) {
        let _ = self.to_agent.send(ToAgent::Publish(key, local));
    }

    /// Publishes a batch of bad events to the pool's log.
    pub fn evidence(&self, key: PoolKey, batch: &PoolBatch) {
        if let Ok(v) = serde_json::to_vec(batch) {
            let _ = self.to_agent.send(ToAgent::Evidence(key, v));
        }
    }

    /// Writes a checkpoint of a pool.
    pub fn checkpoint(&self, key: PoolKey, pool: &Pool) {
        if let Ok(v) = serde_json::to_vec(pool) {
            let _ = self.to_agent.send(ToAgent::Checkpoint(key, v));
        }
    }

    /// Reads a pool's batches written at revisions `from..=until` back
    /// from the store's history (an error when it was compacted).
    pub fn replay(&self, key: PoolKey, from: i64, until: i64) -> oneshot::Receiver<Replayed> {
        let (reply, rx) = oneshot::channel();
        let _ = self.to_agent.send(ToAgent::Replay(key, from, until, reply));
        rx
    }

    /// Says which pools this replica judges (after each config applied):
    /// written in its member key, so that the keys of a pool nobody judges
    /// any more can be collected.
    pub fn judging(&self, pools: &[PoolKey]) {
        let set = pools.iter().map(PoolKey::judged).collect();
        let _ = self.to_agent.send(ToAgent::Judging(set));
    }

    /// Takes the next seat of a pool's local tests.
    pub fn seat(&self, key: PoolKey) -> oneshot::Receiver<Result<u32, String>> {
        let (reply, rx) = oneshot::channel();
        let _ = self.to_agent.send(ToAgent::Seat(key, reply));
        rx
    }

    /// Proposes a change away from stable (`said`: who asked for an
    /// operator's action and why); the answer comes once it is committed
    /// (or refused).
    pub fn propose(
        &self,
        key: RecordKey,
        local: FleetRecord,
        proposal: Proposal,
        said: Option<String>,
    ) -> oneshot::Receiver<Result<(FleetRecord, i64), ProposeError>> {
        let (reply, rx) = oneshot::channel();
        let _ = self.to_agent.send(ToAgent::Propose {
            key,
            local,
            proposal,
            said,
            reply,
        });
        rx
    }

    /// The fleet as `/status` shows it.
    pub fn status(&self) -> FleetStatus {
        lock(&self.status).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// This replica's name: configured, else `$POD_NAME`, else the host name.
pub fn replica_name(settings: &FleetSettings) -> String {
    if let Some(r) = &settings.replica {
        return r.clone();
    }
    let clean = |s: &str| {
        let s: String = s
            .trim()
            .to_ascii_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .take(63)
            .collect();
        (!s.is_empty()).then_some(s)
    };
    std::env::var("POD_NAME")
        .ok()
        .and_then(|p| clean(&p))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .and_then(|h| clean(&h))
        })
        .unwrap_or_else(|| format!("veer-{}", std::process::id()))
}

struct Agent {
    settings: FleetSettings,
    prefix: String,
    replica: String,
    status: Arc<Mutex<FleetStatus>>,
    metrics: FleetMetrics,
    news: mpsc::UnboundedSender<FromAgent>,
    /// Decisions to publish, by key: the latest of each.
    pending: HashMap<RecordKey, FleetRecord>,
    /// The store's revision last seen: a watch resumes after it (0: read
    /// everything first).
    revision: i64,
    members: BTreeSet<String>,
    /// The cluster id of the store read so far (0: none yet).
    cluster: u64,
    /// The endpoint to connect to next: one at a time, the next one after
    /// a failure (a dead member, or one without a leader, is left at once
    /// instead of being picked again by a balancer).
    endpoint: usize,
    /// The pools this replica judges (None until the controller says).
    judging: Option<BTreeSet<String>>,
    /// Pools the collector found judged by no member, and since when.
    unjudged: Arc<Mutex<HashMap<String, u64>>>,
    /// This process's own mark in its member key: a key of its name with
    /// another is another process's (see [`Agent::claim_membership`]).
    instance: String,
}

/// Why a session with the store ended.
enum Ended {
    /// The controller is gone: stop.
    Closed,
    /// An error: reconnect.
    Error(String),
    /// Another process holds this replica's name: try again later (see
    /// [`Agent::claim_membership`]).
    KeptOut(String),
    /// The watch's history was compacted: read everything again.
    Compacted,
}

impl Agent {
    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<ToAgent>) {
        let mut backoff = BACKOFF.0;
        loop {
            let ended = match self.connect().await {
                Ok(client) => self.session(client, &mut requests, &mut backoff).await,
                Err(e) => Ended::Error(e),
            };
            self.set_connected(false, None);
            self.set_kept_out(matches!(ended, Ended::KeptOut(_)));
            self.endpoint = self.endpoint.wrapping_add(1);
            match ended {
                Ended::Closed => return,
                Ended::Compacted => {
                    tracing::warn!(fleet = %self.settings.name, "the fleet's watch history was compacted: reading every decision again");
                    self.revision = 0;
                    continue;
                }
                Ended::Error(e) => {
                    tracing::warn!(fleet = %self.settings.name, error = %e, retry_in = ?backoff, "fleet store unreachable; reverts are taken here and published later, other actions are refused");
                    self.set_error(e);
                }
                Ended::KeptOut(e) => {
                    tracing::warn!(fleet = %self.settings.name, replica = %self.replica, error = %e, retry_in = ?backoff, "kept out of the fleet: another veer holds this replica's name; its reverts are published, other actions are refused");
                    self.set_error(e);
                }
            }
            // Requests that come while waiting: publishes are kept,
            // proposals refused at once.
            let wait = tokio::time::sleep(backoff);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    r = requests.recv() => match r {
                        None => return,
                        Some(r) => self.refuse_or_keep(r),
                    },
                }
            }
            // A full round of the endpoints failed before the back-off grows.
            if self.endpoint % self.settings.endpoints.len().max(1) == 0 {
                backoff = (backoff * 2).min(BACKOFF.1);
            }
        }
    }

    fn refuse_or_keep(&mut self, r: ToAgent) {
        match r {
            ToAgent::Publish(key, local) => {
                self.pending.insert(key, local);
            }
            ToAgent::Propose { reply, .. } => {
                let _ = reply.send(Err(ProposeError::Unreachable(self.unreachable())));
            }
            ToAgent::Seat(_, reply) => {
                let _ = reply.send(Err(self.unreachable()));
            }
            ToAgent::Replay(.., reply) => {
                let _ = reply.send(Err(self.unreachable()));
            }
            ToAgent::Evidence(..) | ToAgent::Checkpoint(..) => {}
            ToAgent::Judging(set) => self.judging = Some(set),
        }
    }

    /// The member key's value: who this replica is and, once the
    /// controller said, the pools it judges.
    fn member_value(&self) -> String {
        let mut m = serde_json::json!({
            "replica": self.replica,
            "version": env!("CARGO_PKG_VERSION"),
            "instance": self.instance,
        });
        if let Some(pools) = &self.judging {
            m["pools"] = serde_json::json!(pools);
        }
        m.to_string()
    }

    /// Writes this replica's member key under `lease`, unless another
    /// process holds a key of its name: two replicas of one name would
    /// write one evidence log under it (each batch's sequence the other's)
    /// and take each other's seats, and the fleet's pooled tests would
    /// count wrong. That replica stays out (as one that cannot reach the
    /// store: decisions it reads are applied, its reverts published, no
    /// evidence or seat of its own) until the key is gone: at once if the
    /// other leaves, or its lease's 10 s after a crash of this replica's
    /// previous process.
    async fn claim_membership(
        &self,
        client: &mut Client,
        member_key: &str,
        lease: i64,
    ) -> Result<(), Ended> {
        let e = |what: &str, e: etcd_client::Error| Ended::Error(format!("{what}: {}", said(&e)));
        let put = || {
            TxnOp::put(
                member_key,
                self.member_value(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        let claim = Txn::new()
            .when([Compare::create_revision(member_key, CompareOp::Equal, 0)])
            .and_then([put()])
            .or_else([TxnOp::get(member_key, None)]);
        let done = client
            .txn(claim)
            .await
            .map_err(|x| e("writing the member key", x))?;
        if done.succeeded() {
            return Ok(());
        }
        let held_by = done.op_responses().into_iter().find_map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                serde_json::from_slice::<serde_json::Value>(kv.value())
                    .ok()
                    .and_then(|v| v["instance"].as_str().map(str::to_string))
                    .unwrap_or_default()
            }),
            _ => None,
        });
        match held_by {
            // Gone meanwhile, or this process's own from a session before.
            None => Err(Ended::Error("the member key changed while it was claimed".into())),
            Some(i) if i == self.instance => client
                .put(member_key, self.member_value(), Some(PutOptions::new().with_lease(lease)))
                .await
                .map(drop)
                .map_err(|x| e("writing the member key", x)),
            Some(other) => Err(Ended::KeptOut(format!(
                "another veer is in the fleet as replica {:?} (instance {other}): each replica needs a name of its own ([fleet] replica); this one stays out until that member key is gone (its lease, 10 s, runs out after its process ends)",
                self.replica
            ))),
        }
    }

    fn unreachable(&self) -> String {
        lock(&self.status)
            .last_error
            .clone()
            .unwrap_or_else(|| "not connected".into())
    }

    async fn connect(&self) -> Result<Client, String> {
        let mut opts = ConnectOptions::new()
            .with_timeout(CALL_TIMEOUT)
            .with_connect_timeout(Duration::from_secs(1))
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if self.settings.tls() {
            opts = opts.with_tls(self.tls().await?);
        }
        let n = self.settings.endpoints.len().max(1);
        let endpoint = self
            .settings
            .endpoints
            .get(self.endpoint % n)
            .cloned()
            .unwrap_or_default();
        Client::connect([endpoint.as_str()], Some(opts))
            .await
            .map_err(|e| format!("connecting to {endpoint}: {}", said(&e)))
    }

    /// TLS to the store, read from the files at each connection (a rotated
    /// certificate is used from the next one).
    async fn tls(&self) -> Result<TlsOptions, String> {
        let read = |p: std::path::PathBuf| async move {
            tokio::fs::read(&p)
                .await
                .map_err(|e| format!("reading {}: {e}", p.display()))
        };
        let mut tls = TlsOptions::new();
        tls = match &self.settings.ca_file {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca.clone()).await?)),
            None => tls.with_webpki_roots(),
        };
        if let Some((cert, key)) = &self.settings.client_cert {
            let cert = read(cert.clone()).await?;
            let key = read(key.clone()).await?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Ok(tls)
    }

    async fn session(
        &mut self,
        mut client: Client,
        requests: &mut mpsc::UnboundedReceiver<ToAgent>,
        backoff: &mut Duration,
    ) -> Ended {
        let e = |what: &str, e: etcd_client::Error| Ended::Error(format!("{what}: {}", said(&e)));
        // A watch resumes from the last revision seen only on the same
        // store: a store rebuilt or restored from an older backup has
        // another cluster id, or a revision behind ours (a watch from a
        // future revision would wait silently for it).
        if self.revision != 0 {
            let head = match client
                .get(
                    self.prefix.as_str(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
            {
                Ok(g) => g,
                Err(x) => return e("reading the store's revision", x),
            };
            let (cluster, revision) = head
                .header()
                .map_or((0, 0), |h| (h.cluster_id(), h.revision()));
            if cluster != self.cluster || revision < self.revision {
                tracing::warn!(fleet = %self.settings.name, cluster, revision, known_revision = self.revision, "the fleet store is not the one read before (rebuilt or restored): reading every decision again");
                self.revision = 0;
                let _ = self.news.send(FromAgent::StoreReplaced);
            }
        }
        // Read every decision and member if the watch cannot resume.
        if self.revision == 0 {
            let got = match client
                .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))
                .await
            {
                Ok(g) => g,
                Err(x) => return e("reading the fleet's decisions", x),
            };
            self.members.clear();
            for kv in got.kvs() {
                self.on_put(kv.key(), kv.value(), kv.mod_revision(), false);
            }
            self.revision = got.header().map_or(0, |h| h.revision());
            self.cluster = got.header().map_or(0, |h| h.cluster_id());
            let _ = self.news.send(FromAgent::Synced(self.revision + 1));
            lock(&self.status).synced = true;
            tracing::info!(fleet = %self.settings.name, revision = self.revision, "read the fleet's decisions");
        }
        // One watch for the fleet's keys, from the revision after the last
        // one seen (nothing is missed across a disconnect).
        let mut watch = match client
            .watch(
                self.prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(self.revision + 1),
                ),
            )
            .await
        {
            Ok(w) => w,
            Err(x) => return e("watching the fleet's decisions", x),
        };
        self.members.insert(self.replica.clone());
        // Decisions first (a revert waiting for the store, published even
        // by a replica kept out below), then membership.
        if let Err(x) = self.flush(&mut client).await {
            return Ended::Error(x);
        }
        // Membership, under a lease.
        let lease = match client.lease_grant(MEMBER_TTL, None).await {
            Ok(l) => l.id(),
            Err(x) => return e("granting the member lease", x),
        };
        let member_key = format!("{}members/{}", self.prefix, self.replica);
        if let Err(ended) = self.claim_membership(&mut client, &member_key, lease).await {
            let _ = client.lease_revoke(lease).await;
            return ended;
        }
        // Connected once a member (a replica kept out retries as one that
        // cannot reach the store, its back-off growing).
        self.set_kept_out(false);
        self.set_connected(true, None);
        *backoff = BACKOFF.0;
        tracing::info!(fleet = %self.settings.name, replica = %self.replica, revision = self.revision, "connected to the fleet store");
        let (mut keeper, mut kept) = match client.lease_keep_alive(lease).await {
            Ok(k) => k,
            Err(x) => return e("keeping the member lease", x),
        };
        let mut renew = tokio::time::interval(KEEP_ALIVE);
        let mut retry = tokio::time::interval(Duration::from_millis(500));
        let keep = self.settings.keep_evidence;
        let mut collect =
            tokio::time::interval((keep / 2).clamp(Duration::from_secs(1), COLLECT_EVERY));
        collect.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut collecting: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            tokio::select! {
                m = watch.message() => match m {
                    Ok(Some(resp)) => {
                        if resp.compact_revision() > 0 {
                            return Ended::Compacted;
                        }
                        if resp.canceled() {
                            return Ended::Error(format!("the watch was canceled: {}", resp.cancel_reason()));
                        }
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            self.revision = self.revision.max(kv.mod_revision());
                            match ev.event_type() {
                                EventType::Put => self.on_put(kv.key(), kv.value(), kv.mod_revision(), true),
                                EventType::Delete => self.on_delete(kv.key()),
                            }
                        }
                        lock(&self.status).revision = self.revision;
                    }
                    Ok(None) => return Ended::Error("the watch stream ended".into()),
                    Err(x) => return e("watching", x),
                },
                r = requests.recv() => match r {
                    None => {
                        // Shutting down: leave the member list now rather
                        // than when the lease runs out.
                        let left = tokio::time::timeout(Duration::from_millis(1500), client.lease_revoke(lease)).await;
                        if !matches!(left, Ok(Ok(_))) {
                            tracing::warn!(fleet = %self.settings.name, replica = %self.replica, "leaving the fleet: the member lease was not revoked in time; this replica's name stays taken until the lease runs out (10 s)");
                        }
                        return Ended::Closed;
                    }
                    Some(ToAgent::Publish(key, local)) => {
                        self.pending.insert(key, local);
                        if let Err(x) = self.flush(&mut client).await {
                            return Ended::Error(x);
                        }
                    }
                    Some(ToAgent::Evidence(key, value)) => {
                        let k = format!("{}ev/{}/{}", self.prefix, key.path(), self.replica);
                        if let Err(x) = client.put(k, value, None).await {
                            return e("publishing evidence", x);
                        }
                    }
                    Some(ToAgent::Checkpoint(key, value)) => {
                        let k = format!("{}pool/{}", self.prefix, key.path());
                        if let Err(x) = client.put(k, value, None).await {
                            return e("writing a pool checkpoint", x);
                        }
                    }
                    Some(ToAgent::Replay(key, from, until, reply)) => {
                        // On its own task (a clone of the client shares the
                        // connection): decisions do not wait for it.
                        let prefix = format!("{}ev/{}/", self.prefix, key.path());
                        let c = client.clone();
                        tokio::spawn(async move {
                            let _ = reply.send(replay(c, prefix, from, until).await);
                        });
                    }
                    Some(ToAgent::Seat(key, reply)) => {
                        let r = self.seat(&mut client, &key).await;
                        let failed = r.is_err();
                        let _ = reply.send(r);
                        if failed {
                            return Ended::Error("taking a seat failed".into());
                        }
                    }
                    Some(ToAgent::Judging(set)) => {
                        if self.judging.as_ref() != Some(&set) {
                            self.judging = Some(set);
                            let put = client.put(
                                member_key.as_str(),
                                self.member_value(),
                                Some(PutOptions::new().with_lease(lease)),
                            );
                            if let Err(x) = put.await {
                                return e("writing the member key", x);
                            }
                        }
                    }
                    Some(ToAgent::Propose { key, local, proposal, said, reply }) => {
                        let r = self.propose(&mut client, &key, &local, proposal, said.as_deref()).await;
                        let failed = matches!(r, Err(ProposeError::Unreachable(_)));
                        let _ = reply.send(r);
                        if failed {
                            return Ended::Error("a proposal's write failed".into());
                        }
                    }
                },
                _ = renew.tick() => {
                    if let Err(x) = keeper.keep_alive().await {
                        return e("renewing the member lease", x);
                    }
                }
                k = kept.message() => match k {
                    Ok(Some(r)) if r.ttl() <= 0 => return Ended::Error("the member lease expired".into()),
                    Ok(Some(_)) => {}
                    Ok(None) => return Ended::Error("the lease stream ended".into()),
                    Err(x) => return e("renewing the member lease", x),
                },
                _ = collect.tick(), if self.settings.seats > 0 => {
                    // One collector at a time, on the first member.
                    let first = self.members.first() == Some(&self.replica);
                    if first && collecting.as_ref().is_none_or(|t| t.is_finished()) {
                        let (c, prefix, counter) = (client.clone(), self.prefix.clone(), self.metrics.collected.clone());
                        let unjudged = self.unjudged.clone();
                        collecting = Some(tokio::spawn(async move {
                            match tokio::time::timeout(REPLAY_TIMEOUT, collect_finished(c, &prefix, keep, unjudged)).await {
                                Ok(Ok(0)) => {}
                                Ok(Ok(n)) => {
                                    counter.inc_by(n as u64);
                                    tracing::info!(keys = n, "deleted the pooled evidence of finished rollouts from the fleet store");
                                }
                                Ok(Err(e)) => tracing::warn!(error = %e, "deleting finished pools' evidence from the fleet store failed; it is tried again"),
                                Err(_) => tracing::warn!("deleting finished pools' evidence from the fleet store timed out; it is tried again"),
                            }
                        }));
                    }
                }
                _ = retry.tick(), if !self.pending.is_empty() => {
                    if let Err(x) = self.flush(&mut client).await {
                        return Ended::Error(x);
                    }
                }
            }
        }
    }

    /// Writes the pending publishes; what fails stays pending (and the
    /// error ends the session: the next endpoint is tried).
    async fn flush(&mut self, client: &mut Client) -> Result<(), String> {
        let mut failed = None;
        let pending: Vec<(RecordKey, FleetRecord)> = self.pending.drain().collect();
        for (key, local) in pending {
            let k = self.key(&key);
            let mut first = false;
            let r = cas(client, &k, |current| {
                first = current.is_none();
                Ok(merge_publish(current, &local))
            })
            .await;
            match r {
                // A route's first record (every route of a new fleet, as
                // its first replica joins): at debug, not thousands of
                // info lines at a join. (A record the store lost is
                // written again the same way.)
                Ok(Some((w, revision))) if w.last == Change::Sync && first => {
                    tracing::debug!(route = %key.route, epoch = w.epoch, revision, "published a decision to the fleet");
                }
                Ok(Some((w, revision))) => {
                    tracing::info!(route = %key.route, change = w.last.as_str(), epoch = w.epoch, revision, "published a decision to the fleet");
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(route = %key.route, error = %e, "publishing a decision to the fleet failed; it is retried");
                    self.set_error(e.clone());
                    // Keep the newer one if the controller sent another meanwhile.
                    self.pending.entry(key).or_insert(local);
                    failed = Some(e);
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    async fn propose(
        &mut self,
        client: &mut Client,
        key: &RecordKey,
        local: &FleetRecord,
        proposal: Proposal,
        said: Option<&str>,
    ) -> Result<(FleetRecord, i64), ProposeError> {
        let k = self.key(key);
        let replica = self.replica.clone();
        let mut rejected = None;
        let r = cas(client, &k, |current| {
            match propose(
                current,
                local,
                proposal,
                said,
                &replica,
                crate::clock::unix_ms(),
            ) {
                Ok(w) => Ok(Some(w)),
                Err(e) => {
                    rejected = Some(e);
                    Ok(None)
                }
            }
        })
        .await;
        match (r, rejected) {
            (Ok(Some(w)), _) => Ok(w),
            (Ok(None), Some(e)) => Err(ProposeError::Rejected(e)),
            (Ok(None), None) => Err(ProposeError::Rejected(Rejected::Stale)),
            (Err(e), _) => {
                self.set_error(e.clone());
                Err(ProposeError::Unreachable(e))
            }
        }
    }

    /// The next number of a pool's seat counter (a transaction on the
    /// counter's revision: each number is handed out once).
    async fn seat(&mut self, client: &mut Client, key: &PoolKey) -> Result<u32, String> {
        let k = format!("{}seats/{}", self.prefix, key.path());
        for _ in 0..CAS_ATTEMPTS {
            let got = client
                .get(k.as_str(), None)
                .await
                .map_err(|e| format!("reading {k}: {}", said(&e)))?;
            let (n, revision) = match got.kvs().first() {
                Some(kv) => (
                    std::str::from_utf8(kv.value())
                        .ok()
                        .and_then(|v| v.trim().parse::<u32>().ok())
                        .unwrap_or(u32::MAX),
                    kv.mod_revision(),
                ),
                None => (0, 0),
            };
            if n == u32::MAX {
                return Ok(n);
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    k.as_str(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::put(k.as_str(), (n + 1).to_string(), None)]);
            let done = client
                .txn(txn)
                .await
                .map_err(|e| format!("writing {k}: {}", said(&e)))?;
            if done.succeeded() {
                return Ok(n);
            }
        }
        Err(format!(
            "writing {k}: {CAS_ATTEMPTS} attempts lost to concurrent writes"
        ))
    }

    fn key(&self, k: &RecordKey) -> String {
        format!("{}decision/{}/{:016x}", self.prefix, k.route, k.identity)
    }

    fn on_put(&mut self, key: &[u8], value: &[u8], revision: i64, watched: bool) {
        let Some(rest) = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(self.prefix.as_str()))
        else {
            return;
        };
        if let Some(ev) = rest.strip_prefix("ev/") {
            let Some(pool) = ev.rsplit_once('/').and_then(|(p, _)| PoolKey::parse(p)) else {
                return;
            };
            if !watched {
                let _ = self.news.send(FromAgent::EvidenceBefore(pool, revision));
                return;
            }
            match serde_json::from_slice::<PoolBatch>(value) {
                Ok(b) => {
                    let _ = self.news.send(FromAgent::Evidence(pool, b, revision));
                }
                Err(_) => {
                    tracing::warn!(key = %String::from_utf8_lossy(key), "ignoring a batch of evidence that does not parse");
                }
            }
            return;
        }
        if let Some(cp) = rest.strip_prefix("pool/") {
            match (PoolKey::parse(cp), serde_json::from_slice::<Pool>(value)) {
                (Some(k), Ok(p)) => {
                    let _ = self.news.send(FromAgent::Checkpoint(k, p));
                }
                _ => {
                    tracing::warn!(key = %String::from_utf8_lossy(key), "ignoring a pool checkpoint that does not parse");
                }
            }
            return;
        }
        if rest.starts_with("seats/") {
            return;
        }
        if let Some(name) = rest.strip_prefix("members/") {
            if self.members.insert(name.to_string()) {
                tracing::info!(replica = %name, "a replica joined the fleet");
                self.members_changed();
            }
            return;
        }
        let Some(path) = rest.strip_prefix("decision/") else {
            return;
        };
        let Some((key, record)) = parse_record(path, value) else {
            tracing::warn!(key = %String::from_utf8_lossy(key), "ignoring a fleet record that does not parse");
            return;
        };
        let _ = self.news.send(FromAgent::Record(key, record, revision));
    }

    fn on_delete(&mut self, key: &[u8]) {
        let name = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(self.prefix.as_str()))
            .and_then(|k| k.strip_prefix("members/"));
        if let Some(name) = name {
            if self.members.remove(name) {
                tracing::info!(replica = %name, "a replica left the fleet");
                self.members_changed();
            }
        }
    }

    fn members_changed(&self) {
        self.metrics.members.set(self.members.len() as i64);
        lock(&self.status).members = self.members.iter().cloned().collect();
        let _ = self.news.send(FromAgent::Status);
    }

    /// Whether the last try to join ended with this replica's name held
    /// by another process (`veer_fleet_kept_out`, `/status`
    /// `fleet.kept_out`).
    fn set_kept_out(&self, kept_out: bool) {
        self.metrics.kept_out.set(i64::from(kept_out));
        let was = std::mem::replace(&mut lock(&self.status).kept_out, kept_out);
        if was != kept_out {
            let _ = self.news.send(FromAgent::Status);
        }
    }

    /// Keeps `e` as the last error talking to the store (`/status`
    /// `fleet.last_error`) and, when it is new, tells the controller,
    /// which publishes `/status` again: `/status` showed a new error only
    /// at the controller's next publish, up to 5 s later (its fleet sweep).
    fn set_error(&self, e: String) {
        let new = {
            let mut s = lock(&self.status);
            let new = s.last_error.as_deref() != Some(e.as_str());
            s.last_error = Some(e);
            new
        };
        if new {
            let _ = self.news.send(FromAgent::Status);
        }
    }

    fn set_connected(&self, connected: bool, error: Option<String>) {
        self.metrics.connected.set(i64::from(connected));
        {
            let mut s = lock(&self.status);
            if s.connected == connected && error.is_none() {
                return;
            }
            s.connected = connected;
            if connected {
                s.last_error = None;
            }
            s.revision = self.revision;
        }
        self.members_changed();
    }
}

/// Read-modify-write of one key: `f` gets the record in the store (if any)
/// and says what to write (`None`: nothing); the write is a transaction on
/// the read's `mod_revision`, retried when another replica wrote between.
/// Returns what was written, and the store's revision of the write.
async fn cas(
    client: &mut Client,
    key: &str,
    mut f: impl FnMut(Option<&FleetRecord>) -> Result<Option<FleetRecord>, String>,
) -> Result<Option<(FleetRecord, i64)>, String> {
    for _ in 0..CAS_ATTEMPTS {
        let got = client
            .get(key, None)
            .await
            .map_err(|e| format!("reading {key}: {}", said(&e)))?;
        let (current, revision) = match got.kvs().first() {
            Some(kv) => (
                serde_json::from_slice::<FleetRecord>(kv.value()).ok(),
                kv.mod_revision(),
            ),
            None => (None, 0),
        };
        let Some(write) = f(current.as_ref())? else {
            return Ok(None);
        };
        let value = serde_json::to_vec(&write).map_err(|e| e.to_string())?;
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, revision)])
            .and_then([TxnOp::put(key, value, None)]);
        let done = client
            .txn(txn)
            .await
            .map_err(|e| format!("writing {key}: {}", said(&e)))?;
        if done.succeeded() {
            let revision = done.header().map_or(0, |h| h.revision());
            return Ok(Some((write, revision)));
        }
    }
    Err(format!(
        "writing {key}: {CAS_ATTEMPTS} attempts lost to concurrent writes"
    ))
}

/// Routes with more than this many alike events at once (a replica
/// joining with many routes) get one line for the lot.
const ROUTES_A_LINE: usize = 3;

/// Logs an event that happened to `routes` at once: a line a route when
/// they are few, else one line with their number and the first names
/// (and a line a route at debug): a replica joining a fleet with 1 000
/// routes says so in a few lines, not thousands.
pub(crate) fn log_routes(routes: &[String], message: &str) {
    if routes.len() <= ROUTES_A_LINE {
        for route in routes {
            tracing::info!(route = %route, "{message}");
        }
        return;
    }
    let first = &routes[..ROUTES_A_LINE];
    tracing::info!(routes = routes.len(), ?first, "{message}");
    for route in routes {
        tracing::debug!(route = %route, "{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::said;

    /// A store that cannot be reached is news for the controller (which
    /// publishes `/status` again on it) with the error in the status: the
    /// error was kept where `/status` is made from, but `/status` showed it
    /// only at the controller's next publish, up to 5 s later.
    #[tokio::test]
    async fn an_unreachable_store_is_news_with_its_error() {
        // A port nothing listens on: refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("its address")
            .port();
        let settings = veer_control::config::FleetSettings {
            endpoints: vec![format!("http://127.0.0.1:{port}")],
            name: "checkout".into(),
            replica: Some("r1".into()),
            ca_file: None,
            client_cert: None,
            seats: 0,
            keep_evidence: std::time::Duration::from_secs(60),
        };
        let metrics = crate::metrics::Metrics::new().expect("metrics");
        let (fleet, mut news) = super::Fleet::start(&settings, &metrics).expect("started");
        let status = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            loop {
                match news.recv().await {
                    Some(super::FromAgent::Status) => {
                        let s = fleet.status();
                        if s.last_error.is_some() {
                            return s;
                        }
                    }
                    Some(_) => {}
                    None => panic!("the agent stopped"),
                }
            }
        })
        .await
        .expect("news of the unreachable store, with its error");
        assert!(!status.connected, "{status:?}");
        assert!(!status.kept_out, "{status:?}");
    }

    /// A status is said by its message, code and causes, each once, and
    /// with no debug form in it.
    #[test]
    fn an_unreachable_store_is_said_in_words() {
        #[derive(Debug)]
        struct Connect(std::io::Error);
        impl std::fmt::Display for Connect {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("tcp connect error")
            }
        }
        impl std::error::Error for Connect {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let refused = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused (os error 111)",
        );
        let status = tonic::Status::from_error(Box::new(Connect(refused)));
        let text = said(&etcd_client::Error::GRpcStatus(status));
        assert_eq!(
            text,
            "tcp connect error (unknown error): refused (os error 111)"
        );
        assert!(!text.contains("Connect("), "{text}");
        let other = etcd_client::Error::InvalidArgs("no key".into());
        assert_eq!(said(&other), other.to_string());
    }
}
