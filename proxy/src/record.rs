//! Inline recording of every request's outcome and latency, per version.
//!
//! Each version's recorder is split into shards, one per worker thread: a
//! request records into the shard of the thread it runs on, with relaxed
//! atomic increments only (no lock, no allocation) on cache lines that no
//! other worker writes. Latency is counted in hdrhistogram's own bucket
//! layout for 3 significant digits (microseconds), so the judge's tick turns
//! each shard's counts into `hdrhistogram::Histogram` values exactly and
//! merges the shards into one slice of its window. (With more threads than
//! shards, threads share a shard: still exact, merely contended.)
//!
//! The only state shared across workers is the route's distinct-key filters
//! ([`KeyFilter`]), which both versions must share to stay unbiased:
//! lock-free, and written only the first time a key is seen.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use veer_control::judge::{Pending, VersionTick};
use veer_control::keyfilter::{KeyFilter, SHORT_BITS};
use veer_control::pool;
use veer_control::window::{Slice, MAX_LATENCY_US, SIGNIFICANT_DIGITS};

/// Slow thresholds the proxy can apply at once: one per latency test, so
/// a ratio and an absolute limit on each of the five quantiles.
pub const MAX_THRESHOLDS: usize = 10;
const OFF: u64 = u64::MAX;

/// Shards per recorder; 0 until [`set_shards`] (then the core count).
static SHARDS: AtomicUsize = AtomicUsize::new(0);
/// Hands out thread indices, in the order threads first record.
static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD: usize = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
}

/// Sets the number of shards of recorders created from now on: the number
/// of worker threads of the runtime.
pub fn set_shards(n: usize) {
    SHARDS.store(n.max(1), Ordering::Relaxed);
}

fn shard_count() -> usize {
    match SHARDS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Distinct client addresses a route must have seen before a client
/// address, like a sticky key, has one vote per bad-event kind (see
/// [`RouteKeys`]).
pub const CLIENTS_FOR_ONE_VOTE: u64 = 64;

/// How often the count of a route's recent client addresses starts afresh
/// (see [`RouteKeys::renew_votes`]).
pub const RECENT_CLIENTS_SPAN: std::time::Duration = std::time::Duration::from_secs(60);

/// Bad-event key filters shared by both versions of one route's canary
/// identity, so a filter collision biases neither version.
///
/// # One vote per client address, where clients are many
///
/// A sticky key counts once per kind of bad event, so one user cannot
/// outweigh the rest. A client that sets its own key (a header or cookie
/// value) can mint keys, though, and send requests that fail on every
/// version with only the keys the canary gets: each counts, and the
/// tests, which assume a failing key is on the canary with the canary's
/// share of probability, would take them for a failing canary
/// (`benches/chosen-keys.py` reverted an identical canary with five). So
/// once the route has seen [`CLIENTS_FOR_ONE_VOTE`] distinct client
/// addresses (the address `client-ip` stickiness uses: the peer, or the
/// `trusted_hops`-th forwarded one; IPv6 by /64), a bad event counts only
/// if its key *and* its client address are new for that kind. Which events
/// count still depends only on keys, addresses and order, never on the
/// version, so under no regression each counted event is the canary's with
/// the canary's share of probability, as before: the bound on false reverts
/// stands. Below that many addresses (a sidecar whose only peers are a few
/// ingress pods) every event would share a handful of addresses, and keys
/// alone count, as before.
///
/// # Rounds
///
/// A key votes once per canary (its version is fixed by its hash, so a
/// second vote would repeat the first). An address need not: a new key
/// from it is a fresh draw of the split. And it must not: where a route's
/// addresses are many but bounded (a sidecar whose callers are a hundred
/// pods), every address soon spends its vote on failures both versions
/// share, after which no event counts at all and a canary that regresses
/// later is never reverted. So address votes come in rounds: once the
/// votes of a kind since its round began reach half the addresses seen in
/// the last minute or two (at least `CLIENTS_FOR_ONE_VOTE / 2`), every
/// address may vote again for that kind ([`RouteKeys::renew_votes`]). A
/// round's end depends on counts, never on versions, so the bound stands;
/// a client holding `A` addresses has at most `A` votes of each round's
/// `M`, however many keys it mints: against honest failures on both
/// versions its share stays `A / M`, which a route with many addresses
/// makes small.
#[derive(Debug)]
pub struct RouteKeys {
    errors: KeyFilter,
    slow: Vec<KeyFilter>,
    burst: KeyFilter,
    burst_users: KeyFilter,
    /// The same, by client address.
    error_clients: KeyFilter,
    slow_clients: Vec<KeyFilter>,
    burst_clients: KeyFilter,
    burst_user_clients: KeyFilter,
    /// Client addresses seen, counted up to [`CLIENTS_FOR_ONE_VOTE`].
    clients: KeyFilter,
    distinct_clients: AtomicU64,
    /// Client addresses seen in this span of [`RECENT_CLIENTS_SPAN`], and
    /// how many: the count, and the last span's, size a round of votes.
    recent_clients: KeyFilter,
    recent_count: AtomicU64,
    last_recent_count: AtomicU64,
    /// Address votes counted in the current round: errors, then each slow
    /// threshold.
    error_votes: AtomicU64,
    slow_votes: Vec<AtomicU64>,
    /// `[route.judge] one_vote_per_client` (false: keys alone).
    client_votes: bool,
    /// In a fleet that pools its evidence: the bad events to publish.
    pool: Option<PoolLog>,
    /// Key rounds (see "Key rounds"): errors, then each slow threshold.
    rounds: Vec<KeyRound>,
    /// What the rounds' clocks count from.
    epoch: tokio::time::Instant,
}

/// Repeated events (of keys that voted in the round) beyond its votes
/// that end a key round (see [`RouteKeys`], "Key rounds").
pub const ROUND_SPENT_REPEATS: u64 = 32;
/// Distinct keys whose repeated events a key round's end needs, so that
/// one or a few always-failing keys cannot end rounds.
pub const ROUND_SPENT_KEYS: u64 = 4;
/// The shortest key round.
pub const MIN_KEY_ROUND: std::time::Duration = std::time::Duration::from_secs(10);

const _: () = assert!(MAX_THRESHOLDS < 16, "every kind's bits must fit the mask");

/// The bits of [`Recorder::record_from`]'s key-round mask for `kind`
/// counted in a round of `parity` (none when it did not count).
#[inline]
fn round_bits(kind: usize, parity: Option<u64>) -> u32 {
    parity.map_or(0, |p| (1 << kind) | ((p as u32 & 1) << (16 + kind)))
}

/// One kind's key round: which keys (and, where addresses have one vote,
/// which addresses) voted since it began, and how often keys that had
/// voted were bad again.
#[derive(Debug)]
struct KeyRound {
    keys: KeyFilter,
    clients: KeyFilter,
    /// Keys counted in `repeat_keys`: those bad again after their vote.
    again: KeyFilter,
    votes: AtomicU64,
    repeats: AtomicU64,
    repeat_keys: AtomicU64,
    /// The round's id; its parity picks the shard counter its events go
    /// to, so that a tick's drain never hands one round's events to the
    /// next round's test.
    id: AtomicU64,
    /// When the round began, in ms since the route keys' epoch.
    began_ms: AtomicU64,
}

impl KeyRound {
    fn new(id: u64) -> KeyRound {
        KeyRound {
            keys: KeyFilter::with_bits(SHORT_BITS),
            clients: KeyFilter::with_bits(CLIENT_BITS),
            again: KeyFilter::with_bits(SHORT_BITS),
            votes: AtomicU64::new(0),
            repeats: AtomicU64::new(0),
            repeat_keys: AtomicU64::new(0),
            id: AtomicU64::new(id),
            began_ms: AtomicU64::new(0),
        }
    }

    /// Counts one bad event of this kind from `key_hash` (None: its own
    /// key) and `client` (with `one_vote`: addresses have one vote);
    /// returns the parity of the round it counted in, if it counted.
    #[inline]
    fn count(&self, key_hash: Option<u64>, client: Option<u64>, one_vote: bool) -> Option<u64> {
        let parity = self.id.load(Ordering::Relaxed) & 1;
        let new_key = key_hash.is_none_or(|h| self.keys.first_time(h));
        if !new_key {
            self.repeats.fetch_add(1, Ordering::Relaxed);
            if key_hash.is_some_and(|h| self.again.first_time(h)) {
                self.repeat_keys.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        }
        if one_vote && client.is_some_and(|c| !self.clients.first_time(c)) {
            return None;
        }
        self.votes.fetch_add(1, Ordering::Relaxed);
        Some(parity)
    }

    /// Whether the round's votes are spent (it ends once old enough).
    fn spent(&self) -> bool {
        let votes = self.votes.load(Ordering::Relaxed);
        self.repeats.load(Ordering::Relaxed) >= votes + ROUND_SPENT_REPEATS
            && self.repeat_keys.load(Ordering::Relaxed) >= ROUND_SPENT_KEYS
    }

    /// Ends the round if its votes are spent and it is old enough.
    fn end_if_spent(&self, now_ms: u64) {
        let old = now_ms.saturating_sub(self.began_ms.load(Ordering::Relaxed))
            >= MIN_KEY_ROUND.as_millis() as u64;
        if !old || !self.spent() {
            return;
        }
        // The filters first, then the id: an event that read the old id
        // after the clear counts for the old round (dropped with it), not
        // twice in the new one.
        self.keys.clear();
        self.clients.clear();
        self.again.clear();
        self.votes.store(0, Ordering::Relaxed);
        self.repeats.store(0, Ordering::Relaxed);
        self.repeat_keys.store(0, Ordering::Relaxed);
        self.began_ms.store(now_ms, Ordering::Relaxed);
        self.id.fetch_add(1, Ordering::Relaxed);
    }
}

/// The bad events of a route (both versions) recorded since the last
/// batch was taken, for the fleet's pooled tests (see
/// `veer_control::pool`): at most `MAX_BATCH` per batch, the first ones.
#[derive(Debug, Default)]
pub struct PoolLog {
    events: Mutex<Taken>,
    any: AtomicBool,
    /// Events left out of a full batch.
    overflow: AtomicU64,
}

/// Events taken from a [`PoolLog`], for one batch.
#[derive(Debug, Default)]
pub struct Taken {
    /// (key bits, kind, canary), in the order recorded.
    pub ev: Vec<pool::PoolEvent>,
    /// Per event, the client address's bits where it had one vote (0:
    /// none); empty when no event had one.
    pub addr: Vec<u32>,
    /// Events left out of the full batch.
    pub overflow: u64,
}

impl PoolLog {
    #[cold]
    fn push(&self, key: u32, addr: u32, canary: bool, error: bool, slow: &[bool]) {
        let mut taken = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let Taken {
            ev, addr: addrs, ..
        } = &mut *taken;
        let kinds = error.then_some(pool::ERROR_KIND).into_iter().chain(
            slow.iter()
                .enumerate()
                .filter(|(_, s)| **s)
                .map(|(i, _)| pool::slow_kind(i)),
        );
        for kind in kinds {
            if ev.len() < pool::MAX_BATCH {
                ev.push((key, kind, canary));
                if addr != 0 || !addrs.is_empty() {
                    addrs.resize(ev.len() - 1, 0);
                    addrs.push(addr);
                }
            } else {
                self.overflow.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.any.store(true, Ordering::Relaxed);
    }

    /// Whether events were recorded since the last [`PoolLog::take`].
    pub fn pending(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// Takes the events recorded since the last call (None: none).
    pub fn take(&self) -> Option<Taken> {
        if !self.any.swap(false, Ordering::Relaxed) {
            return None;
        }
        let mut taken = std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()));
        taken.overflow = self.overflow.swap(0, Ordering::Relaxed);
        (!taken.ev.is_empty()).then_some(taken)
    }
}

/// Bits of the bad-event client filters (2¹⁸ = 32 KiB each, allocated at
/// their first bad event): client addresses are fewer than keys.
const CLIENT_BITS: u64 = 1 << 18;
/// Bits of the filter that counts client addresses up to
/// [`CLIENTS_FOR_ONE_VOTE`] (2¹⁶ = 8 KiB: with 64 addresses in it, a
/// collision, which leaves one address uncounted, has a chance of 3 %).
const SEEN_CLIENT_BITS: u64 = 1 << 16;

/// The hash a client address is counted by: IPv4 whole, IPv6 by its /64
/// (one host's share of a network), IPv4-mapped IPv6 as IPv4.
pub fn client_hash(ip: std::net::IpAddr) -> u64 {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => xxhash_rust::xxh3::xxh3_64(&v4.octets()),
        std::net::IpAddr::V6(v6) => {
            let o = v6.octets();
            xxhash_rust::xxh3::xxh3_64(&o[..8])
        }
    }
}

/// A key for a request without one: its own, unlike any other replica's.
fn unique_key() -> u32 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static SEED: OnceLock<u64> = OnceLock::new();
    let seed = *SEED.get_or_init(|| fastrand::u64(..));
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    pool::key_bits(xxhash_rust::xxh3::xxh3_64_with_seed(&n.to_le_bytes(), seed))
}

impl RouteKeys {
    /// Filters for errors and for `thresholds` slow thresholds.
    pub fn new(thresholds: usize) -> RouteKeys {
        let thresholds = thresholds.min(MAX_THRESHOLDS);
        RouteKeys {
            errors: KeyFilter::new(),
            slow: (0..thresholds).map(|_| KeyFilter::new()).collect(),
            burst: KeyFilter::with_bits(SHORT_BITS),
            burst_users: KeyFilter::with_bits(SHORT_BITS),
            error_clients: KeyFilter::with_bits(CLIENT_BITS),
            slow_clients: (0..thresholds)
                .map(|_| KeyFilter::with_bits(CLIENT_BITS))
                .collect(),
            burst_clients: KeyFilter::with_bits(SHORT_BITS),
            burst_user_clients: KeyFilter::with_bits(SHORT_BITS),
            clients: KeyFilter::with_bits(SEEN_CLIENT_BITS),
            distinct_clients: AtomicU64::new(0),
            recent_clients: KeyFilter::with_bits(SEEN_CLIENT_BITS),
            recent_count: AtomicU64::new(0),
            last_recent_count: AtomicU64::new(0),
            error_votes: AtomicU64::new(0),
            slow_votes: (0..thresholds).map(|_| AtomicU64::new(0)).collect(),
            client_votes: true,
            pool: None,
            // Ids start at random, so that a judge that resumes its tests
            // after a restart never takes the new process's rounds for
            // the one it was in (a resumed round would count its keys
            // twice).
            rounds: (0..=thresholds)
                .map(|_| KeyRound::new(fastrand::u64(..u64::MAX / 2)))
                .collect(),
            epoch: tokio::time::Instant::now(),
        }
    }

    /// The current key round ids: errors, then each of `thresholds` slow
    /// thresholds (see [`veer_control::judge::TickInput::key_rounds`]).
    pub fn key_rounds(&self, thresholds: usize) -> Vec<u64> {
        self.rounds
            .iter()
            .take(thresholds + 1)
            .map(|r| r.id.load(Ordering::Relaxed))
            .collect()
    }

    /// Ends each kind's key round whose votes are spent (see "Key
    /// rounds"). Called by the controller after each tick's judgement.
    pub fn end_key_rounds(&self) {
        self.end_key_rounds_at(self.epoch.elapsed().as_millis() as u64);
    }

    fn end_key_rounds_at(&self, now_ms: u64) {
        for r in &self.rounds {
            r.end_if_spent(now_ms);
        }
    }

    /// The current round id's parity of kind `kind` (0 errors, 1 + slot).
    fn round_parity(&self, kind: usize) -> usize {
        self.rounds
            .get(kind)
            .map_or(0, |r| (r.id.load(Ordering::Relaxed) & 1) as usize)
    }

    /// Whether the controller's calls between requests can change nothing
    /// more until the next request: no count of recent addresses left for
    /// [`RouteKeys::renew_votes`] to move (so a round's size stays what it
    /// is), and no spent key round that only its age keeps from ending
    /// ([`RouteKeys::end_key_rounds`]). A route whose keys are settled may
    /// sleep through its idle ticks.
    pub fn settled(&self) -> bool {
        self.recent_count.load(Ordering::Relaxed) == 0
            && self.last_recent_count.load(Ordering::Relaxed) == 0
            && !self.rounds.iter().any(KeyRound::spent)
    }

    /// Keys alone count, however many client addresses the route has
    /// (`[route.judge] one_vote_per_client = false`).
    pub fn without_client_votes(self) -> RouteKeys {
        RouteKeys {
            client_votes: false,
            ..self
        }
    }

    /// Whether client addresses have one vote each (see [`RouteKeys`]).
    pub fn one_vote(&self) -> bool {
        self.client_votes && self.distinct_clients.load(Ordering::Relaxed) >= CLIENTS_FOR_ONE_VOTE
    }

    /// Whether client addresses have one vote each: the route has seen
    /// enough distinct ones (counting `client`, a request's address hash).
    #[inline]
    fn one_vote_per_client(&self, client: Option<u64>) -> bool {
        if !self.client_votes {
            return false;
        }
        if client.is_some_and(|c| self.recent_clients.first_time(c)) {
            self.recent_count.fetch_add(1, Ordering::Relaxed);
        }
        let seen = self.distinct_clients.load(Ordering::Relaxed);
        if seen >= CLIENTS_FOR_ONE_VOTE {
            return true;
        }
        if client.is_some_and(|c| self.clients.first_time(c)) {
            return self.distinct_clients.fetch_add(1, Ordering::Relaxed) + 1
                >= CLIENTS_FOR_ONE_VOTE;
        }
        false
    }

    /// Where addresses have one vote: the round size and the votes each
    /// kind's current round has had (errors, then each slow threshold).
    pub fn address_rounds(&self) -> Option<veer_control::status::AddressRounds> {
        self.one_vote()
            .then(|| veer_control::status::AddressRounds {
                size: self.round_votes(),
                errors: self.error_votes.load(Ordering::Relaxed),
                slow: self
                    .slow_votes
                    .iter()
                    .map(|v| v.load(Ordering::Relaxed))
                    .collect(),
            })
    }

    /// The votes a round holds: half the addresses seen in the last span
    /// or this one, at least half of [`CLIENTS_FOR_ONE_VOTE`].
    pub fn round_votes(&self) -> u64 {
        let recent = self
            .recent_count
            .load(Ordering::Relaxed)
            .max(self.last_recent_count.load(Ordering::Relaxed));
        (recent / 2).max(CLIENTS_FOR_ONE_VOTE / 2)
    }

    /// Ends the round of each kind whose address votes reached
    /// [`RouteKeys::round_votes`]: its addresses may vote again (see
    /// [`RouteKeys`], "Rounds"); with `new_span`, the count of recent
    /// addresses starts afresh as well (every [`RECENT_CLIENTS_SPAN`]).
    /// Called by the controller on each tick; the request path only counts.
    pub fn renew_votes(&self, new_span: bool) {
        if new_span {
            let n = self.recent_count.swap(0, Ordering::Relaxed);
            self.last_recent_count.store(n, Ordering::Relaxed);
            self.recent_clients.clear();
        }
        let round = self.round_votes();
        let kinds = std::iter::once((&self.error_votes, &self.error_clients))
            .chain(self.slow_votes.iter().zip(&self.slow_clients));
        for (votes, clients) in kinds {
            if votes.load(Ordering::Relaxed) >= round {
                votes.store(0, Ordering::Relaxed);
                clients.clear();
            }
        }
    }

    /// Filters, and a log of bad events for the fleet's pooled tests.
    pub fn pooled(thresholds: usize) -> RouteKeys {
        RouteKeys {
            pool: Some(PoolLog::default()),
            ..RouteKeys::new(thresholds)
        }
    }

    /// The log of bad events to publish (a pooling fleet only).
    pub fn pool_log(&self) -> Option<&PoolLog> {
        self.pool.as_ref()
    }

    /// Starts a new burst span: failing keys count afresh.
    pub fn clear_burst(&self) {
        self.burst.clear();
        self.burst_users.clear();
        self.burst_clients.clear();
        self.burst_user_clients.clear();
    }
}

// hdrhistogram's layout for a lowest value of 1 and 3 significant digits:
// 2 048 sub-buckets (2·10³ rounded up to a power of two), so each power of
// two above 2 048 µs is split into 1 024 equal steps (≤ 0.1 %).
const HALF_MAGNITUDE: u32 = 10;
const HALF: u64 = 1 << HALF_MAGNITUDE;
const LOW_MASK: u64 = 2 * HALF - 1;
const _: () = assert!(SIGNIFICANT_DIGITS == 3, "the layout below is for 3 digits");

/// hdrhistogram's bucket index of `us`.
#[inline]
fn index_of(us: u64) -> usize {
    let v = us.clamp(1, MAX_LATENCY_US);
    // Powers of two by which `v` exceeds the exact range [0, 2 048).
    let bucket = 64 - (HALF_MAGNITUDE + 1) - (v | LOW_MASK).leading_zeros();
    let sub = v >> bucket;
    ((u64::from(bucket + 1) << HALF_MAGNITUDE) + sub - HALF) as usize
}

/// A value in bucket `index`, which hdrhistogram records back into it.
fn value_of(index: usize) -> u64 {
    let i = index as u64;
    let (bucket, sub) = match (i >> HALF_MAGNITUDE).checked_sub(1) {
        Some(b) => (b, (i & (HALF - 1)) + HALF),
        None => (0, i & (HALF - 1)),
    };
    sub << bucket
}

/// Buckets per shard histogram.
fn buckets() -> usize {
    index_of(MAX_LATENCY_US) + 1
}

/// One worker's shard, alone on its cache lines.
#[repr(align(128))]
struct Shard {
    requests: AtomicU64,
    errors: AtomicU64,
    connect_errors: AtomicU64,
    error_events: AtomicU64,
    burst_keys: AtomicU64,
    burst_users: AtomicU64,
    /// Requests given up by their client, not recorded (see
    /// [`Recorder::given_up`]).
    given_up: AtomicU64,
    slow_events: [AtomicU64; MAX_THRESHOLDS],
    /// Key-round events per kind (errors, then each slow threshold), by
    /// the parity of the round's id.
    round_events: [[AtomicU64; 2]; MAX_THRESHOLDS + 1],
    sum_us: AtomicU64,
    /// Counts per hdrhistogram bucket since the last drain (a tick cannot
    /// hold 2³² requests of one shard), allocated at the shard's first
    /// request: a route without traffic costs no buckets.
    latency: OnceLock<Box<[AtomicU32]>>,
    /// The last drain took requests from this shard, so its buckets may
    /// still hold a straggler (recorded after that drain's scan): the next
    /// drain scans them even if it takes no request.
    scan_next: AtomicBool,
}

impl Shard {
    fn new() -> Shard {
        Shard {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            error_events: AtomicU64::new(0),
            burst_keys: AtomicU64::new(0),
            burst_users: AtomicU64::new(0),
            given_up: AtomicU64::new(0),
            slow_events: std::array::from_fn(|_| AtomicU64::new(0)),
            round_events: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            sum_us: AtomicU64::new(0),
            latency: OnceLock::new(),
            scan_next: AtomicBool::new(false),
        }
    }
}

fn add(counter: &AtomicU64, n: u64) {
    if n > 0 {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

fn take(counter: &AtomicU64) -> u64 {
    counter.swap(0, Ordering::Relaxed)
}

/// The routes whose recorders took a request while the route slept (see
/// [`Recorder::sleep`]), by name, for the controller to wake.
#[derive(Debug, Default)]
pub struct Wakes {
    woken: Mutex<Vec<Arc<str>>>,
    /// Wakes a controller that rests (every route asleep).
    rung: tokio::sync::Notify,
}

impl Wakes {
    /// Asks the controller to wake `route` at its next tick (a request
    /// found it asleep, or the fleet's evidence for it came).
    pub fn ring(&self, route: Arc<str>) {
        self.woken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(route);
        self.rung.notify_one();
    }

    /// Completes once a route rang (at once if one rang since the last
    /// time this completed).
    pub async fn rung(&self) {
        self.rung.notified().await;
    }

    /// The routes woken since the last call (most calls: none, and no
    /// allocation).
    pub fn take(&self) -> Vec<Arc<str>> {
        std::mem::take(&mut *self.woken.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The recorder of one version of one route.
pub struct Recorder {
    shards: Box<[Shard]>,
    /// The controller stopped visiting the route (see [`Recorder::sleep`]):
    /// the next request tells it, through `alarm`.
    asleep: AtomicBool,
    /// The route's name and where to say that it woke; None: a recorder
    /// no controller drains (it never sleeps).
    alarm: Option<(Arc<str>, Arc<Wakes>)>,
    thresholds_us: [AtomicU64; MAX_THRESHOLDS],
    total_count: AtomicU64,
    total_sum_us: AtomicU64,
    keys: Arc<RouteKeys>,
    /// When the first request (since start or `restart_first`) ended, in
    /// milliseconds since `created` plus one; 0 before it.
    first_ms: AtomicU64,
    created: tokio::time::Instant,
    /// A canary's recorder: its bad events raise [`CANARY_EVENTS`].
    canary: bool,
}

/// Raised when any canary records a bad event (a key's first error or
/// slow request), lowered by the controller's look between ticks
/// ([`take_canary_events`]): the look visits the routes only when there is
/// something to look at, so idle routes cost it nothing.
static CANARY_EVENTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Raises the flag [`take_canary_events`] lowers: a canary's bad event
/// (also a mirrored copy's) that a look between ticks may act on.
pub fn raise_canary_events() {
    if !CANARY_EVENTS.load(Ordering::Relaxed) {
        CANARY_EVENTS.store(true, Ordering::Relaxed);
    }
}

/// Whether a canary recorded a bad event since the last call.
pub fn take_canary_events() -> bool {
    CANARY_EVENTS.swap(false, Ordering::Relaxed)
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("shards", &self.shards.len())
            .field("requests", &self.total_count.load(Ordering::Relaxed))
            .finish()
    }
}

/// How a request ended, as far as judging goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not an error.
    Ok,
    /// An upstream 5xx (or 4xx when the route counts them), or a reset or protocol failure.
    Error,
    /// The connect failed on every endpoint tried.
    ConnectError,
    /// No answer within the route's timeout: an error, and slow.
    Timeout,
}

impl Recorder {
    /// A recorder sharing `keys` with the other version of the route.
    pub fn new(keys: Arc<RouteKeys>) -> Recorder {
        Recorder {
            shards: (0..shard_count()).map(|_| Shard::new()).collect(),
            asleep: AtomicBool::new(false),
            alarm: None,
            thresholds_us: std::array::from_fn(|_| AtomicU64::new(OFF)),
            total_count: AtomicU64::new(0),
            total_sum_us: AtomicU64::new(0),
            keys,
            first_ms: AtomicU64::new(0),
            created: tokio::time::Instant::now(),
            canary: false,
        }
    }

    /// A canary's recorder (see [`take_canary_events`]).
    pub fn for_canary(keys: Arc<RouteKeys>) -> Recorder {
        Recorder {
            canary: true,
            ..Recorder::new(keys)
        }
    }

    /// The same recorder, for route `route` of a controller that wakes
    /// the routes in `wakes` (see [`Recorder::sleep`]).
    pub fn with_alarm(self, route: Arc<str>, wakes: Arc<Wakes>) -> Recorder {
        Recorder {
            alarm: Some((route, wakes)),
            ..self
        }
    }

    /// Puts the recorder to sleep, right after a drain: from now on its
    /// first request (recorded or given up) puts the route in the
    /// controller's [`Wakes`]. Returns whether nothing was recorded since
    /// that drain; if something was, the caller must not let the route
    /// sleep (and wakes the recorder with [`Recorder::wake_up`]).
    ///
    /// Why no request is lost: a request counts itself, then reads the
    /// flag; this sets the flag, then reads the counts. Both sides in
    /// sequentially consistent order, one of the two sees the other: the
    /// request sees the flag and rings, or this sees the request and the
    /// route stays awake. (On x86 neither side pays for the ordering: the
    /// count is a locked add either way, and the read a plain load.)
    pub fn sleep(&self) -> bool {
        self.asleep.store(true, Ordering::SeqCst);
        self.shards.iter().all(|s| {
            s.requests.load(Ordering::SeqCst) == 0 && s.given_up.load(Ordering::SeqCst) == 0
        })
    }

    /// Wakes the recorder (the controller visits the route again): its
    /// requests no longer ring.
    pub fn wake_up(&self) {
        self.asleep.store(false, Ordering::SeqCst);
    }

    /// After a request was counted: rings if the route sleeps.
    #[inline]
    pub(crate) fn ring_if_asleep(&self) {
        if self.asleep.load(Ordering::SeqCst) {
            self.ring();
        }
    }

    #[cold]
    fn ring(&self) {
        // The first request to see the flag rings; the others find it down.
        if self.asleep.swap(false, Ordering::SeqCst) {
            if let Some((route, wakes)) = &self.alarm {
                wakes.ring(route.clone());
            }
        }
    }

    /// When the first request recorded (since start or the last
    /// [`Recorder::restart_first`]) ended; None before one.
    pub fn first_request(&self) -> Option<tokio::time::Instant> {
        match self.first_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.created + std::time::Duration::from_millis(ms - 1)),
        }
    }

    /// Forgets the first request (a `reset` starts a new deployment).
    pub fn restart_first(&self) {
        self.first_ms.store(0, Ordering::Relaxed);
    }

    /// Notes that a request ended, if it is the first.
    #[inline]
    fn first_ended(&self) {
        if self.first_ms.load(Ordering::Relaxed) == 0 {
            // Once per deployment: the clock is read only here.
            let ms = self.created.elapsed().as_millis() as u64 + 1;
            let _ = self
                .first_ms
                .compare_exchange(0, ms, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// A request whose client left (or whose caller's own deadline passed)
    /// before the answer came, after the version had had the whole request
    /// for `waited_us`.
    ///
    /// Its answer would have taken longer than `waited_us`, and nothing
    /// else is known of it. So once `waited_us` is over a slow threshold
    /// in force, the request would have been slow for that test whatever
    /// it took, and it is recorded as a request answered in `waited_us`
    /// (not an error): slow for those tests, in the window at that lower
    /// bound. Under it, it tells nothing and is only counted (the judge's
    /// clock of the canary's age starts with it). Recording it never makes
    /// a version look slower than it is, so the bound on false reverts
    /// stands; a client that leaves can only take away evidence, as it
    /// always could by leaving. Without this, a canary that hangs behind
    /// clients more impatient than the route's `timeout` would leave no
    /// trace (session 24's finding). Returns whether it was recorded.
    pub fn given_up(&self, waited_us: u64, key_hash: Option<u64>, client: Option<u64>) -> bool {
        let slow = self.thresholds_us.iter().any(|t| {
            let t = t.load(Ordering::Relaxed);
            t != OFF && waited_us > t
        });
        if slow {
            self.record_from(waited_us, Outcome::Ok, key_hash, client);
        } else {
            self.first_ended();
            let shard = THREAD.with(|t| *t) % self.shards.len();
            if let Some(shard) = self.shards.get(shard) {
                // Counted before the flag is read (see `sleep`).
                shard.given_up.fetch_add(1, Ordering::SeqCst);
                self.ring_if_asleep();
            }
        }
        slow
    }

    /// Records one request. `key_hash` is the sticky key's hash (None: the
    /// request had no key, so it counts as its own key).
    #[inline]
    pub fn record(&self, latency_us: u64, outcome: Outcome, key_hash: Option<u64>) {
        self.record_from(latency_us, outcome, key_hash, None);
    }

    /// Records one request from the client address whose [`client_hash`]
    /// is `client` (see [`RouteKeys`]: one vote per address where
    /// addresses are many).
    #[inline]
    pub fn record_from(
        &self,
        latency_us: u64,
        outcome: Outcome,
        key_hash: Option<u64>,
        client: Option<u64>,
    ) {
        self.first_ended();
        let one_vote = self.keys.one_vote_per_client(client);
        // A key new to `keys`, from an address new to `clients` (which is
        // marked whenever the key is new, so that addresses that voted
        // before one vote applied keep their vote spent; not at all where
        // the route turned the vote off).
        let votes = self.keys.client_votes;
        let first = |keys: &KeyFilter, clients: &KeyFilter| {
            key_hash.is_none_or(|h| keys.first_time(h))
                && (!votes || client.is_none_or(|c| clients.first_time(c)) || !one_vote)
        };
        // An address's vote counted in its kind's round (see "Rounds").
        let voted = |counted: bool, round: &AtomicU64| {
            if counted && one_vote && client.is_some() {
                round.fetch_add(1, Ordering::Relaxed);
            }
            counted
        };
        let bad = outcome != Outcome::Ok;
        // Key-round events (see "Key rounds"): bit `k` for a kind counted
        // (0 errors, 1 + slot), bit `16 + k` the parity of its round.
        let mut in_rounds: u32 = 0;
        let new_user = first(&self.keys.burst_users, &self.keys.burst_user_clients);
        let (error_event, burst_key) = if bad {
            if let Some(r) = self.keys.rounds.first() {
                in_rounds |= round_bits(0, r.count(key_hash, client, votes && one_vote));
            }
            (
                voted(
                    first(&self.keys.errors, &self.keys.error_clients),
                    &self.keys.error_votes,
                ),
                first(&self.keys.burst, &self.keys.burst_clients),
            )
        } else {
            (false, false)
        };
        let mut slow = [false; MAX_THRESHOLDS];
        for (kind, (((flag, threshold), ((keys, clients), round)), key_round)) in slow
            .iter_mut()
            .zip(&self.thresholds_us)
            .zip(
                self.keys
                    .slow
                    .iter()
                    .zip(&self.keys.slow_clients)
                    .zip(&self.keys.slow_votes),
            )
            .zip(self.keys.rounds.iter().skip(1))
            .enumerate()
        {
            let t = threshold.load(Ordering::Relaxed);
            let slow = t != OFF && (latency_us > t || outcome == Outcome::Timeout);
            if slow {
                in_rounds |= round_bits(
                    kind + 1,
                    key_round.count(key_hash, client, votes && one_vote),
                );
            }
            *flag = slow && voted(first(keys, clients), round);
        }
        let shard = THREAD.with(|t| *t) % self.shards.len();
        let Some(shard) = self.shards.get(shard) else {
            return;
        };
        // Counted before the flag is read (see `sleep`).
        shard.requests.fetch_add(1, Ordering::SeqCst);
        self.ring_if_asleep();
        add(&shard.sum_us, latency_us);
        let buckets = shard
            .latency
            .get_or_init(|| (0..buckets()).map(|_| AtomicU32::new(0)).collect());
        if let Some(b) = buckets.get(index_of(latency_us)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        add(&shard.burst_users, u64::from(new_user));
        if bad {
            add(&shard.errors, 1);
            add(
                &shard.connect_errors,
                u64::from(outcome == Outcome::ConnectError),
            );
            add(&shard.error_events, u64::from(error_event));
            add(&shard.burst_keys, u64::from(burst_key));
        }
        for (n, flag) in shard.slow_events.iter().zip(slow) {
            add(n, u64::from(flag));
        }
        if in_rounds != 0 {
            for (kind, n) in shard.round_events.iter().enumerate() {
                if in_rounds & (1 << kind) != 0 {
                    let parity = (in_rounds >> (16 + kind)) & 1;
                    if let Some(c) = n.get(parity as usize) {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if let Some(log) = &self.keys.pool {
            if error_event || slow.iter().any(|f| *f) {
                // The fleet counts each key once; where an address has one
                // vote, the address once a round too, so that an address is
                // one vote across the fleet, not one per replica.
                let key = key_hash.map_or_else(unique_key, pool::key_bits);
                let addr = client.filter(|_| one_vote).map_or(0, pool::key_bits);
                log.push(key, addr, self.canary, error_event, &slow);
            }
        }
        if self.canary
            && (error_event || slow.iter().any(|f| *f))
            && !CANARY_EVENTS.load(Ordering::Relaxed)
        {
            CANARY_EVENTS.store(true, Ordering::Relaxed);
        }
    }

    /// The slow threshold (µs) of `slot` in force; None when off.
    pub fn threshold_us(&self, slot: usize) -> Option<u64> {
        self.thresholds_us
            .get(slot)
            .map(|t| t.load(Ordering::Relaxed))
            .filter(|t| *t != OFF)
    }

    /// Sets the slow thresholds (µs) for the requests to come.
    pub fn set_thresholds(&self, thresholds: &[Option<u64>]) {
        for (i, slot) in self.thresholds_us.iter().enumerate() {
            slot.store(
                thresholds.get(i).copied().flatten().unwrap_or(OFF),
                Ordering::Relaxed,
            );
        }
    }

    /// Takes everything recorded since the last drain, merged over the
    /// shards; also returns the connect failures among the errors.
    pub fn drain(&self, thresholds: usize) -> (VersionTick, u64) {
        let thresholds = thresholds.min(MAX_THRESHOLDS);
        // Every field spelled out: `..VersionTick::default()` would build
        // (and drop) a default slice's histogram on every tick.
        let mut tick = VersionTick {
            slice: Slice::empty(),
            error_events: 0,
            slow_events: vec![0; thresholds],
            burst_keys: 0,
            burst_users: 0,
            unreachable: false,
            round_error_events: 0,
            round_slow_events: vec![0; thresholds],
            given_up: 0,
        };
        // Each kind's events of its current round; those of the round
        // before (recorded after the last drain, as it ended) are dropped
        // with its test.
        let parities: [usize; MAX_THRESHOLDS + 1] =
            std::array::from_fn(|k| self.keys.round_parity(k));
        let mut connect = 0;
        let mut sum_us = 0;
        let mut sized = false;
        for shard in self.shards.iter() {
            let requests = take(&shard.requests);
            tick.slice.requests += requests;
            let scan = requests > 0 || shard.scan_next.load(Ordering::Relaxed);
            shard.scan_next.store(requests > 0, Ordering::Relaxed);
            tick.slice.errors += take(&shard.errors);
            tick.error_events += take(&shard.error_events);
            tick.burst_keys += take(&shard.burst_keys);
            tick.burst_users += take(&shard.burst_users);
            tick.given_up += take(&shard.given_up);
            for (n, m) in tick.slow_events.iter_mut().zip(&shard.slow_events) {
                *n += take(m);
            }
            for (kind, (counters, parity)) in shard.round_events.iter().zip(&parities).enumerate() {
                let mut n = 0;
                for (p, c) in counters.iter().enumerate() {
                    let taken = take(c);
                    if p == *parity {
                        n = taken;
                    }
                }
                match kind {
                    0 => tick.round_error_events += n,
                    k => {
                        if let Some(slot) = tick.round_slow_events.get_mut(k - 1) {
                            *slot += n;
                        }
                    }
                }
            }
            connect += take(&shard.connect_errors);
            sum_us += take(&shard.sum_us);
            let Some(buckets) = shard.latency.get().filter(|_| scan) else {
                continue;
            };
            if !sized {
                // Sized for service latencies at once (an empty tick's
                // histogram stays the small one it started as).
                tick.slice.latency = veer_control::window::histogram();
                sized = true;
            }
            for (i, b) in buckets.iter().enumerate() {
                // Most buckets are empty: read before taking.
                if b.load(Ordering::Relaxed) != 0 {
                    let n = b.swap(0, Ordering::Relaxed);
                    // Cannot fail: `value_of` stays inside the histogram's range.
                    let _ = tick.slice.latency.record_n(value_of(i), u64::from(n));
                }
            }
        }
        self.total_count
            .fetch_add(tick.slice.requests, Ordering::Relaxed);
        self.total_sum_us.fetch_add(sum_us, Ordering::Relaxed);
        (tick, connect)
    }

    /// Whether any bad event was recorded since the last drain (what
    /// [`Recorder::pending`] would count, without counting it).
    pub fn has_pending(&self) -> bool {
        self.shards.iter().any(|s| {
            s.error_events.load(Ordering::Relaxed) > 0
                || s.slow_events.iter().any(|n| n.load(Ordering::Relaxed) > 0)
        })
    }

    /// The bad events recorded since the last drain, without taking them:
    /// what the judge's look between ticks adds to its tests.
    pub fn pending(&self, thresholds: usize) -> Pending {
        let mut p = Pending {
            error_events: 0,
            slow_events: vec![0; thresholds.min(MAX_THRESHOLDS)],
        };
        for shard in self.shards.iter() {
            p.error_events += shard.error_events.load(Ordering::Relaxed);
            for (n, m) in p.slow_events.iter_mut().zip(&shard.slow_events) {
                *n += m.load(Ordering::Relaxed);
            }
        }
        p
    }

    /// The route's key filters.
    pub fn keys(&self) -> &RouteKeys {
        &self.keys
    }

    /// Requests and latency sum (seconds) since start, as of the last
    /// drain, for the summary metric.
    pub fn totals(&self) -> (u64, f64) {
        (
            self.total_count.load(Ordering::Relaxed),
            self.total_sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }
}

/// The threshold slots of a judge, capped to what the recorder holds
/// (validation allows no more).
pub fn threshold_count(slots: usize) -> usize {
    slots.min(MAX_THRESHOLDS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use veer_control::window::histogram;

    #[test]
    fn buckets_are_hdrhistograms_own() {
        let h =
            hdrhistogram::Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, SIGNIFICANT_DIGITS)
                .unwrap();
        let mut values = vec![1, 2, 1_023, 1_024, 2_047, 2_048, 2_049, 4_095, 4_096, 4_097];
        values.extend([
            12_345,
            1_000_000,
            123_456_789,
            MAX_LATENCY_US - 1,
            MAX_LATENCY_US,
        ]);
        let mut v = 1u64;
        while v < MAX_LATENCY_US {
            values.push(v);
            v = v * 17 / 16 + 1;
        }
        for v in values {
            let back = value_of(index_of(v));
            assert!(
                h.equivalent(v, back),
                "{v} -> bucket {} -> {back}",
                index_of(v)
            );
            assert_eq!(index_of(back), index_of(v), "{v}");
        }
        // Neighbouring buckets hold different values.
        assert!(!h.equivalent(value_of(5_000), value_of(5_001)));
        assert!(buckets() <= h.distinct_values());
    }

    fn alarmed(wakes: &Arc<Wakes>) -> Recorder {
        Recorder::new(Arc::new(RouteKeys::new(1))).with_alarm("web".into(), wakes.clone())
    }

    #[test]
    fn a_sleeping_recorder_rings_once_at_its_first_request() {
        let wakes = Arc::new(Wakes::default());
        let r = alarmed(&wakes);
        r.record(2_000, Outcome::Ok, None);
        // Something recorded since the drain: it may not sleep.
        assert!(!r.sleep());
        r.wake_up();
        assert_eq!(r.drain(1).0.slice.requests, 1);
        assert!(r.sleep());
        assert!(wakes.take().is_empty());
        r.record(2_000, Outcome::Ok, None);
        r.record(2_000, Outcome::Error, None);
        let woken = wakes.take();
        assert_eq!(woken.len(), 1, "{woken:?}");
        assert_eq!(&*woken[0], "web");
        assert_eq!(r.drain(1).0.slice.requests, 2);
        // A request given up wakes it too.
        r.set_thresholds(&[Some(10_000)]);
        assert!(r.sleep());
        assert!(!r.given_up(5, None, None));
        assert_eq!(wakes.take().len(), 1);
        assert_eq!(r.drain(1).0.given_up, 1);
        // Awake, it never rings.
        r.wake_up();
        r.record(2_000, Outcome::Ok, None);
        assert!(wakes.take().is_empty());
    }

    /// A recording thread against the controller's drain, sleep and wake:
    /// whatever the interleaving, a request is drained, or the recorder is
    /// awake, or it rang; never asleep with a request in it unannounced.
    #[test]
    fn no_request_is_left_in_a_sleeping_recorder() {
        const REQUESTS: u64 = 200_000;
        let wakes = Arc::new(Wakes::default());
        let r = Arc::new(alarmed(&wakes));
        let writer = {
            let r = r.clone();
            std::thread::spawn(move || {
                for i in 0..REQUESTS {
                    r.record(1_000, Outcome::Ok, None);
                    if i % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        };
        let (mut drained, mut asleep) = (0, false);
        loop {
            // Read first: once it is true, every request has rung if it
            // was to ring.
            let done = writer.is_finished();
            if asleep {
                if wakes.take().is_empty() {
                    if done {
                        break;
                    }
                    std::thread::yield_now();
                    continue;
                }
                r.wake_up();
                asleep = false;
            }
            drained += r.drain(1).0.slice.requests;
            if r.sleep() {
                asleep = true;
            } else {
                r.wake_up();
            }
        }
        writer.join().expect("writer");
        // Asleep with no wake pending, and every request drained by the
        // controller's own loop: none was left behind unannounced.
        assert_eq!(drained, REQUESTS);
    }

    #[test]
    fn record_then_drain() {
        let keys = Arc::new(RouteKeys::new(1));
        let r = Recorder::new(keys.clone());
        let other = Recorder::new(keys);
        r.set_thresholds(&[Some(10_000)]);
        other.set_thresholds(&[Some(10_000)]);
        r.record(2_000, Outcome::Ok, Some(1 << 40));
        r.record(20_000, Outcome::Error, Some(2 << 40));
        r.record(20_000, Outcome::Error, Some(2 << 40)); // same key: one event
        other.record(20_000, Outcome::Error, Some(2 << 40)); // shared filter
        r.record(5_000, Outcome::Timeout, None);
        let (t, connect) = r.drain(1);
        assert_eq!((t.slice.requests, t.slice.errors, connect), (4, 3, 0));
        assert_eq!(t.error_events, 2);
        assert_eq!(t.slow_events, vec![2]);
        assert_eq!(t.slice.latency.len(), 4);
        assert_eq!(r.drain(1).0.slice.requests, 0);
        assert_eq!(r.totals().0, 4);
    }

    #[test]
    fn a_given_up_request_counts_as_slow_only_past_a_threshold_and_never_as_an_error() {
        let keys = Arc::new(RouteKeys::new(2));
        let r = Recorder::for_canary(keys);
        // No threshold in force (judge warming up): counted, not recorded.
        assert!(!r.given_up(60_000_000, Some(1 << 40), None));
        assert!(
            r.first_request().is_some(),
            "its end starts the canary's clock"
        );
        let (t, _) = r.drain(2);
        assert_eq!((t.slice.requests, t.given_up), (0, 1));
        r.set_thresholds(&[Some(10_000), Some(800_000)]);
        // Under every threshold: tells nothing.
        assert!(!r.given_up(9_000, Some(2 << 40), None));
        // Past the first threshold only: slow for it, not for the second.
        assert!(r.given_up(20_000, Some(3 << 40), None));
        // Past both.
        assert!(r.given_up(1_000_000, Some(4 << 40), None));
        let (t, _) = r.drain(2);
        assert_eq!((t.slice.requests, t.slice.errors, t.given_up), (2, 0, 1));
        assert_eq!(t.slow_events, vec![2, 1]);
        assert_eq!(t.error_events, 0);
        // In the window at the time the version had had it.
        assert_eq!(
            t.slice.latency.max(),
            t.slice.latency.highest_equivalent(1_000_000)
        );
        assert_eq!(
            t.slice.latency.min(),
            t.slice.latency.lowest_equivalent(20_000)
        );
    }

    /// A route's keys and its two recorders, one slow threshold of 10 ms.
    fn route() -> (Arc<RouteKeys>, Recorder, Recorder) {
        let keys = Arc::new(RouteKeys::new(1));
        let stable = Recorder::new(keys.clone());
        let canary = Recorder::for_canary(keys.clone());
        stable.set_thresholds(&[Some(10_000)]);
        canary.set_thresholds(&[Some(10_000)]);
        (keys, stable, canary)
    }

    /// The address hash of client 127.0.0.0 + `i`.
    fn addr(i: u32) -> u64 {
        client_hash(std::net::Ipv4Addr::from(0x7f00_0000 + i).into())
    }

    /// The key hash of user `i`.
    fn key(i: u64) -> Option<u64> {
        Some(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()))
    }

    /// One good request from each of twice `CLIENTS_FOR_ONE_VOTE`
    /// addresses (the count is a filter's: a collision misses one).
    fn from_many_clients(r: &Recorder) {
        for i in 0..2 * CLIENTS_FOR_ONE_VOTE {
            r.record_from(
                2_000,
                Outcome::Ok,
                key(1_000 + i),
                Some(addr(100 + i as u32)),
            );
        }
    }

    /// `n` slow failures, each with a new key, all from one address.
    fn minted_failures(r: &Recorder, n: u64) {
        for i in 0..n {
            r.record_from(20_000, Outcome::Error, key(2_000 + i), Some(addr(7)));
        }
    }

    #[test]
    fn keys_vote_again_in_a_new_key_round_once_the_last_ones_votes_are_spent() {
        let (keys, stable, canary) = route();
        let ids = keys.key_rounds(1);
        assert_eq!(ids.len(), 2);
        // Ten keys, each one error: ten votes, in the round and in the
        // canary's lifetime filter alike.
        for k in 0..10 {
            canary.record(2_000, Outcome::Error, key(k));
        }
        let t = canary.drain(1).0;
        assert_eq!((t.error_events, t.round_error_events), (10, 10));
        // Repeats of three keys (one always-failing user, or three) never
        // end a round, however many.
        for i in 0..200 {
            canary.record(2_000, Outcome::Error, key(i % 3));
        }
        keys.end_key_rounds_at(60_000);
        assert_eq!(keys.key_rounds(1), ids);
        let t = canary.drain(1).0;
        assert_eq!((t.error_events, t.round_error_events), (0, 0));
        // A fourth repeating key: 201 repeats against 11 votes + 32, and
        // the round is old enough. Not before its 10 s, though.
        canary.record(2_000, Outcome::Error, key(3));
        // And a new key's vote in this round, not drained before it ends.
        canary.record(2_000, Outcome::Error, key(99));
        keys.end_key_rounds_at(MIN_KEY_ROUND.as_millis() as u64 - 1);
        assert_eq!(keys.key_rounds(1), ids);
        keys.end_key_rounds_at(60_000);
        let after = keys.key_rounds(1);
        assert_ne!(after[0], ids[0], "the error round ended");
        assert_eq!(after[1], ids[1], "the slow round had no event");
        // Events recorded in the old round after the last drain are
        // dropped with it; the same keys now vote in the new round, and
        // only there (the lifetime filter remembers them).
        for k in 0..10 {
            canary.record(2_000, Outcome::Error, key(k));
        }
        let t = canary.drain(1).0;
        assert_eq!((t.error_events, t.round_error_events), (1, 10));
        // The next round may not end for 10 s from its start.
        for i in 0..200 {
            canary.record(2_000, Outcome::Error, key(i % 10));
        }
        keys.end_key_rounds_at(60_000 + 9_000);
        assert_eq!(keys.key_rounds(1), after);
        keys.end_key_rounds_at(60_000 + 10_000);
        assert_ne!(keys.key_rounds(1), after);
        // Slow events have rounds of their own.
        stable.record(20_000, Outcome::Ok, key(50));
        let t = stable.drain(1).0;
        assert_eq!((t.slow_events[0], t.round_slow_events[0]), (1, 1));
    }

    #[test]
    fn an_address_votes_once_a_key_round_where_addresses_have_one_vote() {
        let (keys, stable, canary) = route();
        from_many_clients(&stable);
        stable.drain(1);
        assert!(keys.one_vote());
        // One address minting keys: one vote in the round as in the
        // canary's lifetime.
        minted_failures(&canary, 50);
        let t = canary.drain(1).0;
        assert_eq!((t.error_events, t.round_error_events), (1, 1));
    }

    #[test]
    fn addresses_vote_again_once_half_the_recent_ones_voted() {
        let (keys, stable, canary) = route();
        // 128 addresses: a round is 64 votes (63 here: the filter that
        // counts recent addresses takes two of these for one).
        from_many_clients(&stable);
        stable.drain(1);
        assert!(keys.one_vote());
        let round = keys.round_votes();
        assert!((62..=64).contains(&round), "{round}");
        // Failures both versions share spend all but one of a round's
        // votes: the round is not over, and a spent address does not vote
        // again.
        let fail = |r: &Recorder, user: u64, a: u64| {
            r.record_from(
                20_000,
                Outcome::Error,
                key(user),
                Some(addr(100 + a as u32)),
            )
        };
        for a in 0..round - 1 {
            fail(&stable, 5_000 + a, a);
        }
        keys.renew_votes(false);
        fail(&canary, 6_000, 0);
        assert_eq!(canary.drain(1).0.error_events, 0);
        // The last vote ends the round (at the controller's next tick):
        // every address votes again, once, with a key new to the canary.
        fail(&stable, 5_000 + round - 1, round - 1);
        assert_eq!(stable.drain(1).0.error_events, round);
        keys.renew_votes(false);
        fail(&canary, 6_001, 0);
        fail(&canary, 6_002, 0);
        fail(&canary, 5_001, 1); // a key that voted before: never again
        let t = canary.drain(1).0;
        assert_eq!((t.error_events, t.slow_events[0]), (1, 1));
        // A minting client has one vote a round, however many keys.
        minted_failures(&canary, 50);
        assert_eq!(canary.drain(1).0.error_events, 1);
        // Rounds follow the addresses seen lately: after two quiet spans
        // (no address seen) a round is the floor, half of 64.
        keys.renew_votes(true);
        keys.renew_votes(true);
        assert_eq!(keys.round_votes(), CLIENTS_FOR_ONE_VOTE / 2);
    }

    #[test]
    fn one_client_with_many_keys_votes_once_where_clients_are_many() {
        let keys = Arc::new(RouteKeys::new(1));
        let stable = Recorder::new(keys.clone());
        let canary = Recorder::for_canary(keys);
        canary.set_thresholds(&[Some(10_000)]);
        // Few addresses (a sidecar behind two ingress pods): every new
        // key counts, as before.
        for i in 0..5 {
            canary.record_from(20_000, Outcome::Error, key(i), Some(addr(1 + i as u32 % 2)));
        }
        let t = canary.drain(1).0;
        assert_eq!((t.error_events, t.slow_events[0]), (5, 5));
        // Traffic from many addresses, to either version.
        from_many_clients(&stable);
        // Now one address minting keys gets one vote per kind...
        minted_failures(&canary, 20);
        assert!(stable.keys().one_vote());
        let t = canary.drain(1).0;
        assert_eq!((t.error_events, t.slow_events[0], t.burst_keys), (1, 1, 1));
        // ... and addresses that voted before it applied have voted.
        canary.record_from(20_000, Outcome::Error, key(3_000), Some(addr(1)));
        assert_eq!(canary.drain(1).0.error_events, 0);
        // Failures of new users from new addresses count on either version.
        for i in 0..10 {
            let r = if i % 2 == 0 { &canary } else { &stable };
            r.record_from(
                20_000,
                Outcome::Error,
                key(4_000 + i),
                Some(addr(500 + i as u32)),
            );
        }
        assert_eq!(canary.drain(1).0.error_events, 5);
        assert_eq!(stable.drain(1).0.error_events, 5);
    }

    #[test]
    fn a_pooling_fleet_counts_an_address_once_where_it_has_one_vote() {
        let keys = Arc::new(RouteKeys::pooled(0));
        let canary = Recorder::for_canary(keys.clone());
        let log = |keys: &RouteKeys| {
            keys.pool_log()
                .and_then(PoolLog::take)
                .map(|t| (t.ev.iter().map(|e| e.0).collect::<Vec<_>>(), t.addr))
        };
        canary.record_from(20_000, Outcome::Error, key(1), Some(addr(7)));
        let bits = |h: Option<u64>| pool::key_bits(h.unwrap());
        assert_eq!(log(&keys), Some((vec![bits(key(1))], vec![])));
        from_many_clients(&canary);
        minted_failures(&canary, 3);
        // addr(7) voted above; a new address's failure is logged with it.
        assert_eq!(log(&keys), None);
        canary.record_from(20_000, Outcome::Error, key(9), Some(addr(8)));
        canary.record_from(20_000, Outcome::Error, key(10), None);
        assert_eq!(
            log(&keys),
            Some((
                vec![bits(key(9)), bits(key(10))],
                vec![bits(Some(addr(8))), 0]
            ))
        );
    }

    #[test]
    fn without_client_votes_keys_alone_count() {
        let keys = Arc::new(RouteKeys::new(0).without_client_votes());
        let canary = Recorder::for_canary(keys.clone());
        from_many_clients(&canary);
        minted_failures(&canary, 20);
        assert!(!keys.one_vote());
        assert_eq!(canary.drain(0).0.error_events, 20);
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64() {
        let a: std::net::IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: std::net::IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: std::net::IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_hash(a), client_hash(b));
        assert_ne!(client_hash(a), client_hash(c));
        let v4: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: std::net::IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_hash(v4), client_hash(mapped));
    }

    #[test]
    fn an_idle_recorder_holds_no_buckets_and_a_late_bucket_is_drained_next_tick() {
        let r = Recorder::new(Arc::new(RouteKeys::new(1)));
        let (t, _) = r.drain(1);
        assert_eq!(t.slice.requests, 0);
        assert!(r.shards.iter().all(|s| s.latency.get().is_none()));
        r.record(2_000, Outcome::Ok, Some(1 << 40));
        assert_eq!(r.drain(1).0.slice.latency.len(), 1);
        // A bucket counted after the drain took its request (a worker
        // between its two increments) is taken by the next drain.
        let shard = r
            .shards
            .iter()
            .find(|s| s.latency.get().is_some())
            .expect("the shard that recorded");
        let late = shard.latency.get().and_then(|b| b.get(index_of(3_000)));
        late.expect("bucket").fetch_add(1, Ordering::Relaxed);
        assert_eq!(r.drain(1).0.slice.latency.len(), 1);
        // After a drain with nothing, an idle shard is not scanned again.
        assert!(!shard.scan_next.load(Ordering::Relaxed));
    }

    #[test]
    fn workers_record_into_their_own_shards_and_the_drain_merges_them() {
        let r = Arc::new(Recorder::new(Arc::new(RouteKeys::new(1))));
        r.set_thresholds(&[Some(50_000)]);
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..1_000u64 {
                        let outcome = if i % 100 == 0 {
                            Outcome::Error
                        } else {
                            Outcome::Ok
                        };
                        r.record(1_000 * (t + 1) + i, outcome, Some((t * 1_000 + i) << 32));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("recording thread");
        }
        let (tick, _) = r.drain(1);
        assert_eq!(tick.slice.requests, 4_000);
        assert_eq!(tick.slice.errors, 40);
        assert_eq!(tick.slice.latency.len(), 4_000);
        assert_eq!(tick.slice.latency.max(), r_max(4_999));
        assert_eq!(r.drain(1).0.slice.requests, 0);
    }

    /// The histogram's highest equivalent value of `v`.
    fn r_max(v: u64) -> u64 {
        let mut h = histogram();
        let _ = h.record(v);
        h.max()
    }
}
