//! Evidence pooled over a fleet: the ratio tests run on every replica's bad
//! events at once, each sticky key counted once fleet-wide.
//!
//! # The problem
//!
//! With `N` replicas behind a load balancer each judge sees `1/N` of the
//! traffic, and a sequential test needs a fixed number of bad events, so
//! detection time grows about `N`-fold. Pooling the evidence naively is not
//! valid: summing the replicas' distinct-key counts counts a sticky user who
//! reaches `k` replicas `k` times (one always-failing user on the canary
//! seen by three replicas is three "independent" canary events, worth
//! `(1/w)³` at share `w`); multiplying the replicas' e-values needs
//! independence that sticky users break.
//!
//! # The protocol
//!
//! 1. Each replica publishes, every 100 ms (on a clock: never sooner
//!    because a batch holds a canary event, which would put canary events
//!    ahead of stable events recorded before them and let the test, read
//!    after every batch, peak higher than it may), a batch of the bad
//!    events it recorded since the last one: per event the
//!    key's hash (32 high bits, as the distinct-key filter reads them), the
//!    event's kind (an error, or slower than a latency test's thresholds)
//!    and the version; and, where the replica gives client addresses one
//!    vote each (a route with many clients, see the proxy's `record`), the
//!    address's 32 bits and the replica's round size. A batch carries the canary share `w` at which every
//!    one of its requests was routed and the judge's fingerprint; a replica
//!    whose weight changed since its last batch publishes nothing for that
//!    interval, and a batch holds at most [`MAX_BATCH`] events (the first
//!    ones recorded). The store orders the batches: they are puts under
//!    `/veer/v1/<fleet>/ev/<route>/<identity>/<epoch>/<replica>`, and the
//!    watched sequence of puts is the fleet's log.
//! 2. Every replica applies the log in the store's order ([`Pool::apply`]):
//!    a batch of another fingerprint is dropped, an event whose key was
//!    already counted for its kind (by any replica) is dropped (keys are
//!    kept per kind in a one-hash bitmap of 2²⁰ slots, [`KeySet`]: a new
//!    key whose slot is taken is dropped too, whichever its version), so is
//!    an event whose address already voted for its kind in the current
//!    round (a round of a kind ends once its address votes reach the
//!    round size of the batch that brought the last of them: every
//!    address may vote again, with a key not counted before), and each
//!    pooled test takes the batch's remaining events at the batch's own
//!    `w`. The state is a function of the log, so every replica holds the
//!    same test and reaches the same verdict at the same batch.
//!
//! # Why it stays a test martingale
//!
//! Under the null (the canary within the ratio), a key's version is fixed
//! by its hash alone, so the first bad event of a key not counted before
//! is the canary's with probability at most `w₀(w)` whatever happened
//! before it in the log, exactly the condition the single-replica test
//! rests on ([`crate::keyfilter`]); a key counted once can never be counted
//! again, however many replicas it reaches. Which events are kept depends
//! on their order, their keys, fingerprints and weights, never on their
//! version: dropping them is choosing a subsequence without looking at the
//! outcome, which keeps the product a supermartingale. Nor does the log's
//! order: batches go out on each replica's clock and the store orders them
//! as they arrive, whatever versions they hold, and a batch keeps its
//! events in the order recorded. Each event's slow
//! threshold was fixed by its replica before the request (from stable's
//! past window there), and attribution is valid whatever the threshold
//! ([`crate::limits`]). So Ville's inequality bounds the fleet test's
//! chance of ever crossing under the null as it does a local one's.
//!
//! Only the ratio tests (`max_error_rate_ratio`, `max_latency_ratio`, and
//! the `margin` tests with no limit) are pooled: an absolute limit's
//! one-sample leg needs every canary request's outcome, whose publication
//! would cost a write per look at zero errors. Absolute limits, the
//! gross-failure guards, mirrored pairs and the blue-green watch stay local.
//!
//! # One α for the fleet
//!
//! The pooled tests take half of `false_revert_rate` (each of a route's
//! `k` tests `α/(2k)`), the local tests the other half, shared by at most
//! `seats` replicas per canary identity and epoch: a replica takes a seat
//! (a number handed out by a counter in the store) before its local tests
//! may act, each seat's tests at `α/(2k·seats)`. A seat is never handed
//! out twice, so pod churn cannot spend more than the budget: a replica
//! that finds every seat taken judges on the pooled tests (and its guards)
//! only. Union bound: `α/2 + seats · α/(2·seats) = α`.
//!
//! # Joining late
//!
//! A replica that starts after batches of an identity were published has
//! not seen the beginning of its log, and a fresh test of its own would be
//! a second test that spends α again. Its pool is *incomplete*: it keeps
//! the batches it sees and adopts the next checkpoint (a pool's state with
//! the revision of the last batch in it, written to
//! `/veer/v1/<fleet>/pool/<route>/<identity>/<epoch>`) whose revision its
//! watch covers, then applies the batches after it ([`PoolView`]). Until
//! then it applies the pooled verdicts of the others only.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::eprocess::Detector;
use crate::limits::{Limit, Spec, MIN_CANARY_EVENTS};

/// The kind of an error event.
pub const ERROR_KIND: u8 = 0;
/// Events one batch holds at most (the first ones recorded are kept).
pub const MAX_BATCH: usize = 256;
/// Slots of a kind's key set: a key's low 20 bits.
const KEY_SLOTS: usize = 1 << 20;
/// Batches an incomplete pool keeps while it waits for a checkpoint.
pub const MAX_TAIL: usize = 4_096;

/// The kind of a slow event of threshold slot `slot`.
pub fn slow_kind(slot: usize) -> u8 {
    u8::try_from(slot + 1).unwrap_or(u8::MAX)
}

/// The 32 bits of a key's hash the fleet counts keys by (the high bits,
/// which the split does not use).
pub fn key_bits(hash: u64) -> u32 {
    (hash >> 32) as u32
}

/// The event kind a limit's test is pooled on; None for tests that stay
/// local (absolute limits).
pub fn pooled_kind(limit: Limit) -> Option<u8> {
    match limit {
        Limit::ErrorRatio { .. } => Some(ERROR_KIND),
        Limit::LatencyRatio { slot, .. } => Some(slow_kind(slot)),
        Limit::ErrorRate { .. } | Limit::LatencyAbove { .. } => None,
    }
}

/// One bad event: the key's 32 bits, its kind, and whether the canary
/// served it.
pub type PoolEvent = (u32, u8, bool);

/// One replica's batch of bad events.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolBatch {
    /// The judge's fingerprint (limits, margin, restart cadence).
    pub fp: u64,
    /// The canary share every event's request was routed at.
    pub w: f64,
    /// Events, in the order recorded: (key bits, kind, canary).
    pub ev: Vec<PoolEvent>,
    /// Per event of `ev`, in its order: the client address's 32 bits
    /// where the replica gives addresses one vote (0: no vote). Empty when
    /// no event has one (and from replicas that predate it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addr: Vec<u32>,
    /// The votes a round of address votes holds on the publishing replica
    /// (0: addresses have no vote there).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub round: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One pooled test.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct PooledTest {
    /// Its index in the route's family of tests.
    spec: usize,
    kind: u8,
    test: Detector,
}

/// The fleet's pooled tests of one route, canary identity and epoch: a
/// function of the log applied so far.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pool {
    fp: u64,
    tests: Vec<PooledTest>,
    /// Keys counted, per kind.
    seen: BTreeMap<u8, KeySet>,
    /// Client addresses that voted in the current round, per kind, and
    /// the round's votes so far.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    voters: BTreeMap<u8, KeySet>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    votes: BTreeMap<u8, u64>,
    /// The store's revision of the last batch applied (0: none).
    revision: i64,
    /// Batches applied, and those dropped (foreign fingerprint, share
    /// outside (0, 1)).
    applied: u64,
    dropped: u64,
}

impl Pool {
    /// A fresh pool of the ratio tests among `specs`, for a judge of
    /// fingerprint `fp`; None when no test is pooled.
    pub fn new(specs: &[Spec], fp: u64, restart_every: u64) -> Option<Pool> {
        let tests: Vec<PooledTest> = specs
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let kind = pooled_kind(s.limit)?;
                let r0 = match s.limit {
                    Limit::ErrorRatio { r0 } | Limit::LatencyRatio { r0, .. } => r0,
                    _ => return None,
                };
                Some(PooledTest {
                    spec: i,
                    kind,
                    test: Detector::new(r0, restart_every),
                })
            })
            .collect();
        (!tests.is_empty()).then(|| Pool::start(fp, tests))
    }

    /// A pool of `tests` (each at its start) before any batch.
    fn start(fp: u64, tests: Vec<PooledTest>) -> Pool {
        Pool {
            fp,
            seen: tests.iter().map(|t| (t.kind, KeySet::default())).collect(),
            voters: BTreeMap::new(),
            votes: BTreeMap::new(),
            tests,
            revision: 0,
            applied: 0,
            dropped: 0,
        }
    }

    /// The store's revision of the last batch applied.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Batches (applied, dropped).
    pub fn batches(&self) -> (u64, u64) {
        (self.applied, self.dropped)
    }

    /// The same tests at their start: no batch applied, no key counted
    /// (what `Pool::new` gave for this judge).
    pub fn fresh(&self) -> Pool {
        let tests = self
            .tests
            .iter()
            .map(|t| PooledTest {
                spec: t.spec,
                kind: t.kind,
                test: t.test.restarted(),
            })
            .collect();
        Pool::start(self.fp, tests)
    }

    /// Whether a checkpoint is of this pool's tests (same fingerprint).
    pub fn same_tests(&self, other: &Pool) -> bool {
        self.fp == other.fp && self.tests.len() == other.tests.len()
    }

    /// Applies the batch the store wrote at `revision`; false when it was
    /// not applied (already applied: a revision not after the last one;
    /// or dropped).
    pub fn apply(&mut self, revision: i64, b: &PoolBatch) -> bool {
        if revision <= self.revision {
            return false;
        }
        self.revision = revision;
        if b.fp != self.fp || !(b.w > 0.0 && b.w < 1.0) {
            self.dropped += 1;
            return false;
        }
        self.applied += 1;
        // (canary, stable) new keys per kind.
        let mut counts: BTreeMap<u8, (u64, u64)> = BTreeMap::new();
        for (i, &(key, kind, canary)) in b.ev.iter().take(MAX_BATCH).enumerate() {
            let Some(seen) = self.seen.get_mut(&kind) else {
                continue;
            };
            if !seen.insert(key) {
                continue;
            }
            if let Some(&a) = b.addr.get(i).filter(|a| **a != 0) {
                if !self.voters.entry(kind).or_default().insert(a) {
                    continue;
                }
                *self.votes.entry(kind).or_default() += 1;
            }
            let c = counts.entry(kind).or_default();
            if canary {
                c.0 += 1;
            } else {
                c.1 += 1;
            }
        }
        for t in &mut self.tests {
            let (c, s) = counts.get(&t.kind).copied().unwrap_or_default();
            t.test.update(b.w, c, s);
        }
        if b.round > 0 {
            for (kind, votes) in &mut self.votes {
                if *votes >= b.round {
                    *votes = 0;
                    self.voters.remove(kind);
                }
            }
        }
        true
    }

    /// Each pooled test: (index in the family, e-value, distinct-key
    /// (canary, stable) events).
    pub fn tests(&self) -> impl Iterator<Item = (usize, f64, (u64, u64))> + '_ {
        self.tests.iter().map(|t| {
            (
                t.spec,
                t.test.e_value(),
                (t.test.canary_events(), t.test.stable_events()),
            )
        })
    }

    /// The first pooled test at `threshold` or above with enough canary
    /// events: (index in the family, e-value).
    pub fn crossed(&self, threshold: f64) -> Option<(usize, f64)> {
        self.tests().find_map(|(spec, e, (c, _))| {
            (e >= threshold && c >= MIN_CANARY_EVENTS).then_some((spec, e))
        })
    }
}

/// The keys of one kind counted so far, fleet-wide: a one-hash bitmap of
/// 2²⁰ slots, a key's slot its low 20 bits (bits 32-51 of its hash; the
/// split's bucket, the hash modulo 10 000, is independent of them to within
/// 10 000 / 2³², as for the exact set this replaces).
///
/// A new key whose slot is already taken is not counted, for either
/// version alike: as with the local filter ([`crate::keyfilter`]), that
/// costs a little power as the set fills and biases nothing, so the pool
/// keeps counting however many keys a long or busy rollout brings (an
/// exact set had to stop at a cap; at 10 000 req/s its latency test ran
/// out of keys within minutes). The bitmap exists from the first key
/// (128 KiB); a checkpoint carries the taken slots, sorted, as
/// varint-encoded gaps in base64 (1-3 bytes a key).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeySet {
    words: Vec<u64>,
    len: u64,
}

impl KeySet {
    fn slot(key: u32) -> usize {
        key as usize & (KEY_SLOTS - 1)
    }

    /// Marks `key`'s slot; false when it was taken already.
    pub fn insert(&mut self, key: u32) -> bool {
        self.mark(Self::slot(key))
    }

    fn mark(&mut self, slot: usize) -> bool {
        if slot >= KEY_SLOTS {
            return false;
        }
        if self.words.is_empty() {
            self.words = vec![0; KEY_SLOTS / 64];
        }
        let (w, bit) = (slot / 64, 1u64 << (slot % 64));
        match self.words.get_mut(w) {
            Some(word) if *word & bit == 0 => {
                *word |= bit;
                self.len += 1;
                true
            }
            _ => false,
        }
    }

    /// Slots taken.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no key was counted.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.words
            .iter()
            .enumerate()
            .filter(|(_, w)| **w != 0)
            .flat_map(|(i, &w)| {
                (0..64)
                    .filter(move |b| w & (1 << b) != 0)
                    .map(move |b| i * 64 + b)
            })
    }

    fn encode(&self) -> String {
        let mut out = Vec::with_capacity(self.len as usize * 2);
        let mut last = 0usize;
        for slot in self.slots() {
            let mut gap = slot - last;
            last = slot;
            loop {
                let byte = (gap & 0x7f) as u8;
                gap >>= 7;
                if gap == 0 {
                    out.push(byte);
                    break;
                }
                out.push(byte | 0x80);
            }
        }
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(out)
    }

    fn decode(text: &str) -> Option<KeySet> {
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(text)
            .ok()?;
        let mut set = KeySet::default();
        let (mut slot, mut gap, mut shift) = (0usize, 0usize, 0u32);
        for b in bytes {
            gap |= usize::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 != 0 {
                shift += 7;
                if shift > 21 {
                    return None;
                }
                continue;
            }
            slot = slot.checked_add(gap)?;
            if slot >= KEY_SLOTS || !set.mark(slot) {
                return None;
            }
            (gap, shift) = (0, 0);
        }
        (shift == 0).then_some(set)
    }
}

/// As the store keeps it: the encoded slots; a checkpoint written before
/// the bitmap (a list of full 32-bit keys) is read into slots too.
impl Serialize for KeySet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.encode())
    }
}

impl<'de> Deserialize<'de> for KeySet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KeySet, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Slots(String),
            Keys(Vec<u32>),
        }
        match Stored::deserialize(d)? {
            Stored::Slots(text) => KeySet::decode(&text)
                .ok_or_else(|| serde::de::Error::custom("a pool's key set is not valid")),
            Stored::Keys(keys) => {
                let mut set = KeySet::default();
                for k in keys {
                    set.insert(k);
                }
                Ok(set)
            }
        }
    }
}

/// A replica's view of one pool: the state when complete (every batch of
/// the log applied), else the batches seen while it waits for a
/// checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolView {
    /// The state as of the last batch applied (None: incomplete).
    pool: Option<Pool>,
    /// Incomplete: the fresh state it starts from when its log turns out
    /// to be complete after all (None while complete: a pool a route
    /// follows is kept once, not twice).
    fresh: Option<Pool>,
    /// Incomplete: the first revision this replica has seen every batch
    /// from, and the batches seen since.
    from: i64,
    tail: Vec<(i64, PoolBatch)>,
}

impl PoolView {
    /// A view that has seen the whole log (the pool is new: no batch of it
    /// was ever written).
    pub fn complete(fresh: Pool) -> PoolView {
        PoolView {
            pool: Some(fresh),
            fresh: None,
            from: 0,
            tail: Vec::new(),
        }
    }

    /// A view that has seen every batch from revision `from` on, but not
    /// necessarily those before.
    pub fn incomplete(fresh: Pool, from: i64) -> PoolView {
        PoolView {
            pool: None,
            fresh: Some(fresh),
            from,
            tail: Vec::new(),
        }
    }

    /// The pooled state, when complete.
    pub fn pool(&self) -> Option<&Pool> {
        self.pool.as_ref()
    }

    /// Whether it has seen the whole log.
    pub fn is_complete(&self) -> bool {
        self.pool.is_some()
    }

    /// A batch from the log.
    pub fn apply(&mut self, revision: i64, b: PoolBatch) -> bool {
        match &mut self.pool {
            Some(p) => p.apply(revision, &b),
            None => {
                if revision < self.from {
                    // Before what this view covers (or a view that never
                    // completes again: see `resync`).
                } else if self.tail.len() < MAX_TAIL {
                    self.tail.push((revision, b));
                } else {
                    // Too far behind to catch up from the tail: wait for
                    // a checkpoint written after this point.
                    self.tail.clear();
                    self.from = revision + 1;
                }
                false
            }
        }
    }

    /// What the store said when this replica (re)read it: the latest
    /// revision any replica wrote a batch of this pool at (0: none) and the
    /// revision the watch delivers everything after. A complete view stays
    /// complete if it already has that batch; otherwise it waits for a
    /// checkpoint. `resync(i64::MAX, i64::MAX)` gives up for good (the
    /// store was replaced: its revisions are not this log's).
    pub fn resync(&mut self, latest_batch: i64, watch_from: i64) {
        let have = match &self.pool {
            Some(p) => p.revision(),
            None => self.tail.last().map_or(self.from - 1, |(rev, _)| *rev),
        };
        if latest_batch > have {
            if let Some(p) = self.pool.take() {
                self.fresh = Some(p.fresh());
            }
            self.tail.clear();
            self.from = watch_from;
        }
    }

    /// The first revision from which this view has every batch (an
    /// incomplete view's; a complete one has them all).
    pub fn covers_from(&self) -> i64 {
        if self.pool.is_some() {
            0
        } else {
            self.from
        }
    }

    /// The batches of the log from revision `start` up to where this view
    /// covers it, read back from the store's history: with `cp` (a
    /// checkpoint at `start - 1`), or from the log's beginning (`start` 1
    /// and no checkpoint), the view is complete. Returns whether it became
    /// complete.
    pub fn replayed(
        &mut self,
        start: i64,
        cp: Option<&Pool>,
        batches: Vec<(i64, PoolBatch)>,
    ) -> bool {
        if self.pool.is_some() || start > self.from || self.from == i64::MAX {
            return false;
        }
        let mut tail: Vec<(i64, PoolBatch)> = batches
            .into_iter()
            .filter(|(rev, _)| *rev >= start && *rev < self.from)
            .collect();
        tail.append(&mut self.tail);
        self.tail = tail;
        self.from = start;
        match cp {
            Some(cp) if cp.revision() + 1 >= start => self.checkpoint(cp),
            Some(_) => false,
            None if start <= 1 => {
                let Some(mut p) = self.fresh.take() else {
                    return false;
                };
                for (rev, b) in std::mem::take(&mut self.tail) {
                    p.apply(rev, &b);
                }
                self.pool = Some(p);
                true
            }
            None => false,
        }
    }

    /// A checkpoint: adopted by an incomplete view whose batches since it
    /// are all at hand, with them applied after it. Returns whether the
    /// view became complete.
    pub fn checkpoint(&mut self, cp: &Pool) -> bool {
        let Some(fresh) = self.fresh.as_ref().filter(|_| self.pool.is_none()) else {
            return false;
        };
        if !fresh.same_tests(cp) || cp.revision() + 1 < self.from {
            return false;
        }
        let mut p = cp.clone();
        for (rev, b) in std::mem::take(&mut self.tail) {
            p.apply(rev, &b);
        }
        self.pool = Some(p);
        self.fresh = None;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::JudgeSettings;
    use crate::limits::family;
    use std::collections::BTreeSet;

    /// A batch of judge fingerprint 7 at a 5 % canary.
    fn batch_at_5_percent(ev: Vec<PoolEvent>) -> PoolBatch {
        PoolBatch {
            fp: 7,
            w: 0.05,
            ev,
            ..PoolBatch::default()
        }
    }

    fn pool(margin: f64) -> Pool {
        let s = JudgeSettings {
            margin,
            ..JudgeSettings::default()
        };
        Pool::new(&family(&s), 7, 30).expect("the default family is pooled")
    }

    fn splitmix(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn a_key_counts_once_whichever_replica_saw_it() {
        let mut p = pool(1.0);
        // One always-failing canary user seen by three replicas.
        for rev in 1..=3 {
            p.apply(
                rev,
                &PoolBatch {
                    fp: 7,
                    w: 0.05,
                    ev: vec![(42, ERROR_KIND, true)],
                    ..PoolBatch::default()
                },
            );
        }
        let (_, e, (c, s)) = p.tests().next().expect("an error test");
        assert_eq!((c, s), (1, 0));
        assert!(e < 20.0, "{e}");
        // The same revision twice is applied once.
        assert!(!p.apply(
            3,
            &PoolBatch {
                fp: 7,
                w: 0.05,
                ev: vec![(43, ERROR_KIND, true)],
                ..PoolBatch::default()
            }
        ));
    }

    #[test]
    fn an_address_votes_once_a_round_fleet_wide_and_a_key_once_ever() {
        let mut p = pool(1.0);
        let counted = |p: &Pool| p.tests().next().expect("an error test").2;
        let batch = |ev: Vec<(u32, u8, bool)>, addr: Vec<u32>, round| PoolBatch {
            fp: 7,
            w: 0.05,
            ev,
            addr,
            round,
        };
        // Two replicas publish address 9's failures with new keys: one vote
        // for the fleet; an event without an address counts by its key.
        p.apply(1, &batch(vec![(1, ERROR_KIND, true)], vec![9], 3));
        p.apply(
            2,
            &batch(
                vec![(2, ERROR_KIND, true), (3, ERROR_KIND, false)],
                vec![9, 0],
                3,
            ),
        );
        assert_eq!(counted(&p), (1, 1));
        // Two more addresses end the round of three votes: address 9 votes
        // again, with a key not counted before (key 1 never again).
        p.apply(
            3,
            &batch(
                vec![(4, ERROR_KIND, false), (5, ERROR_KIND, false)],
                vec![10, 11],
                3,
            ),
        );
        assert_eq!(counted(&p), (1, 3));
        p.apply(
            4,
            &batch(
                vec![(1, ERROR_KIND, true), (6, ERROR_KIND, true)],
                vec![9, 9],
                3,
            ),
        );
        assert_eq!(counted(&p), (2, 3));
        // The state (the round's voters too) survives a checkpoint, and a
        // batch of a replica that predates addresses reads as keys alone.
        let cp: Pool = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(
            (&cp.voters, &cp.votes, &cp.seen),
            (&p.voters, &p.votes, &p.seen)
        );
        let old: PoolBatch =
            serde_json::from_str(r#"{"fp":7,"w":0.05,"ev":[[7,0,true]]}"#).unwrap();
        assert!(p.apply(5, &old));
        assert_eq!(counted(&p), (3, 3));
    }

    #[test]
    fn key_sets_survive_the_store_at_every_fill_and_read_the_old_form() {
        let mut rng = splitmix(11);
        for n in [0usize, 1, 100, 20_000, 300_000] {
            let mut set = KeySet::default();
            for _ in 0..n {
                set.insert(rng() as u32);
            }
            let text = serde_json::to_string(&set).expect("serialise");
            let back: KeySet = serde_json::from_str(&text).expect("read back");
            assert_eq!(back, set, "{n} keys");
            // 1-3 bytes a key, base64: a checkpoint stays far below the
            // store's 1.5 MiB request limit.
            assert!(
                text.len() as u64 <= 4 + set.len() * 4,
                "{n}: {}",
                text.len()
            );
        }
        // A checkpoint written before the bitmap: a list of keys.
        let old: KeySet = serde_json::from_str("[1, 2, 1048577]").expect("old form");
        assert_eq!(old.len(), 2, "1 and 2^20 + 1 share a slot");
        for bad in ["\"!!\"", "\"/w\"", "\"gICAgA\""] {
            assert!(serde_json::from_str::<KeySet>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_keep_counting_past_what_an_exact_set_held() {
        // 60 000 distinct stable keys (more than the 20 000 the exact set
        // stopped at), then canary keys: still counted, still crossing.
        let mut p = pool(1.0);
        let mut rng = splitmix(13);
        let mut rev = 0;
        for _ in 0..(60_000 / MAX_BATCH + 1) {
            rev += 1;
            let ev = (0..MAX_BATCH)
                .map(|_| (rng() as u32, ERROR_KIND, false))
                .collect();
            p.apply(rev, &batch_at_5_percent(ev));
        }
        let (_, _, (_, stable)) = p.tests().next().expect("an error test");
        assert!(stable > 58_000, "{stable} of ~60 000 keys counted");
        for _ in 0..40 {
            rev += 1;
            let ev = (0..5).map(|_| (rng() as u32, ERROR_KIND, true)).collect();
            p.apply(rev, &batch_at_5_percent(ev));
        }
        let (_, _, (canary, _)) = p.tests().next().expect("an error test");
        assert!(canary > 180, "{canary} of 200 canary keys counted");
        assert!(p.crossed(400.0).is_some());
    }

    #[test]
    fn foreign_fingerprints_and_shares_outside_the_interval_are_dropped() {
        let mut p = pool(1.0);
        let b = |fp, w| PoolBatch {
            fp,
            w,
            ev: vec![(1, ERROR_KIND, true), (2, ERROR_KIND, true)],
            ..PoolBatch::default()
        };
        assert!(!p.apply(1, &b(8, 0.05)));
        assert!(!p.apply(2, &b(7, 1.0)));
        assert!(!p.apply(3, &b(7, 0.0)));
        assert_eq!(p.batches(), (0, 3));
        assert!(p.apply(4, &b(7, 0.05)));
        assert_eq!(p.tests().next().map(|t| t.2), Some((2, 0)));
    }

    /// Monte Carlo of the fleet under the null: eight replicas, users sticky
    /// to a version by hash, one of them heavy, always failing and
    /// reaching every replica, the rest failing now and then, each replica
    /// publishing what its own filter lets through, batches interleaved in
    /// a random order. The pooled error test crosses `1/α` at most α of the
    /// time; summing the replicas' counts instead crosses far more often.
    #[test]
    fn pooling_is_valid_with_heavy_users_on_several_replicas_and_summing_is_not() {
        let mut rng = splitmix(3);
        let mut unit = move || (rng() >> 11) as f64 / (1u64 << 53) as f64;
        let (runs, alpha, w, replicas) = (1500, 0.05, 0.2, 8);
        let (mut pooled_hits, mut summed_hits) = (0u32, 0u32);
        for run in 0..runs {
            let mut p = pool(1.0);
            let mut summed = crate::eprocess::EProcess::new(1.0);
            let mut local: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); replicas];
            let (mut hit_p, mut hit_s) = (false, false);
            let mut rev = 0;
            for step in 0..200u32 {
                let r = (unit() * replicas as f64) as usize % replicas;
                // A heavy user, always failing, on every replica.
                let key = if unit() < 0.5 {
                    0
                } else {
                    1000 + step + run * 1000
                };
                let canary = (u64::from(key) ^ u64::from(run)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    >> 40
                    < (w * (1u64 << 24) as f64) as u64;
                let Some(set) = local.get_mut(r) else {
                    continue;
                };
                if !set.insert(key) {
                    continue;
                }
                rev += 1;
                p.apply(
                    rev,
                    &PoolBatch {
                        fp: 7,
                        w,
                        ev: vec![(key, ERROR_KIND, canary)],
                        ..PoolBatch::default()
                    },
                );
                summed.update(w, u64::from(canary), u64::from(!canary));
                hit_p |= p.tests().next().is_some_and(|t| t.1 >= 1.0 / alpha);
                hit_s |= summed.e_value() >= 1.0 / alpha;
            }
            pooled_hits += u32::from(hit_p);
            summed_hits += u32::from(hit_s);
        }
        let pooled = f64::from(pooled_hits) / f64::from(runs);
        let summed = f64::from(summed_hits) / f64::from(runs);
        assert!(pooled <= alpha, "pooled false alarms {pooled}");
        assert!(
            summed > 2.0 * alpha,
            "summing per-replica events should break the bound: {summed}"
        );
    }

    #[test]
    fn two_replicas_applying_one_log_hold_the_same_state() {
        let mut rng = splitmix(5);
        let log: Vec<(i64, PoolBatch)> = (1..=300)
            .map(|rev| {
                let n = (rng() % 4) as usize;
                let ev = (0..n)
                    .map(|_| ((rng() % 500) as u32, (rng() % 3) as u8, rng() % 10 == 0))
                    .collect();
                (
                    rev,
                    PoolBatch {
                        fp: if rng() % 20 == 0 { 9 } else { 7 },
                        w: 0.1,
                        ev,
                        ..PoolBatch::default()
                    },
                )
            })
            .collect();
        let mut a = pool(1.0);
        for (rev, b) in &log {
            a.apply(*rev, b);
        }
        // A replica that joins at revision 150 with a checkpoint written
        // at 100, having seen every batch from 120 on: incomplete until the
        // checkpoint, then the same state.
        let mut cp = pool(1.0);
        for (rev, b) in log.iter().take(100) {
            cp.apply(*rev, b);
        }
        let mut late = PoolView::incomplete(pool(1.0), 101);
        for (rev, b) in log.iter().skip(100).take(50) {
            late.apply(*rev, b.clone());
        }
        assert!(!late.is_complete());
        assert!(late.checkpoint(&cp));
        for (rev, b) in log.iter().skip(150) {
            late.apply(*rev, b.clone());
        }
        assert_eq!(late.pool(), Some(&a));
        // One whose watch began after the checkpoint's revision cannot use it.
        let mut too_late = PoolView::incomplete(pool(1.0), 120);
        assert!(!too_late.checkpoint(&cp));
        assert!(!too_late.is_complete());
    }

    #[test]
    fn a_view_replayed_from_the_stores_history_is_complete() {
        let log: Vec<(i64, PoolBatch)> = (1..=40)
            .map(|r| {
                (
                    r,
                    batch_at_5_percent(vec![(r as u32, ERROR_KIND, r % 3 == 0)]),
                )
            })
            .collect();
        let mut whole = pool(1.0);
        for (r, x) in &log {
            whole.apply(*r, x);
        }
        // Everything restarted: no replica has the log; the store has a
        // checkpoint at 20 and every put since.
        let mut cp = pool(1.0);
        for (r, x) in log.iter().take(20) {
            cp.apply(*r, x);
        }
        let mut v = PoolView::incomplete(pool(1.0), 36);
        for (r, x) in log.iter().skip(35) {
            v.apply(*r, x.clone());
        }
        let history: Vec<(i64, PoolBatch)> = log.iter().skip(20).take(15).cloned().collect();
        assert!(v.replayed(21, Some(&cp), history));
        assert_eq!(v.pool(), Some(&whole));
        // No checkpoint: from the beginning of the log.
        let mut v = PoolView::incomplete(pool(1.0), 31);
        for (r, x) in log.iter().skip(30) {
            v.apply(*r, x.clone());
        }
        assert!(!v.replayed(5, None, log.iter().skip(4).take(26).cloned().collect()));
        let mut v = PoolView::incomplete(pool(1.0), 31);
        for (r, x) in log.iter().skip(30) {
            v.apply(*r, x.clone());
        }
        assert!(v.replayed(1, None, log.iter().take(30).cloned().collect()));
        assert_eq!(v.pool(), Some(&whole));
    }

    #[test]
    fn a_view_given_up_never_completes() {
        let mut v = PoolView::complete(pool(1.0));
        v.resync(i64::MAX, i64::MAX);
        let b = PoolBatch {
            fp: 7,
            w: 0.05,
            ev: vec![(1, ERROR_KIND, true)],
            ..PoolBatch::default()
        };
        for rev in 1..10 {
            v.apply(rev, b.clone());
        }
        let mut cp = pool(1.0);
        cp.apply(100, &b);
        assert!(!v.checkpoint(&cp));
        assert!(!v.is_complete());
    }

    #[test]
    fn a_view_that_missed_batches_is_incomplete_until_a_checkpoint() {
        let mut v = PoolView::complete(pool(1.0));
        let b = PoolBatch {
            fp: 7,
            w: 0.05,
            ev: vec![(1, ERROR_KIND, true)],
            ..PoolBatch::default()
        };
        v.apply(5, b.clone());
        // Re-read: the store's latest batch is ours: still complete.
        v.resync(5, 10);
        assert!(v.is_complete());
        // A batch at 8 was written while we were away.
        v.resync(8, 12);
        assert!(!v.is_complete());
        let mut cp = pool(1.0);
        cp.apply(5, &b);
        assert!(!v.checkpoint(&cp), "revisions 6..12 are missing");
        let mut cp2 = cp.clone();
        cp2.apply(
            11,
            &PoolBatch {
                ev: vec![(2, ERROR_KIND, false)],
                ..b.clone()
            },
        );
        v.apply(12, b.clone());
        assert!(v.checkpoint(&cp2));
        assert_eq!(v.pool().map(Pool::revision), Some(12));
    }

    #[test]
    fn a_view_that_fell_behind_replays_the_log_from_the_pools_start() {
        let log: Vec<(i64, PoolBatch)> = (1..=12)
            .map(|r| {
                (
                    r,
                    batch_at_5_percent(vec![(r as u32, ERROR_KIND, r % 2 == 0)]),
                )
            })
            .collect();
        let mut whole = pool(1.0);
        for (r, x) in &log {
            whole.apply(*r, x);
        }
        // What a complete view keeps to start again from is the pool at
        // its start, whatever it applied since.
        assert_eq!(whole.fresh(), pool(1.0));
        let mut v = PoolView::complete(pool(1.0));
        for (r, x) in log.iter().take(5) {
            v.apply(*r, x.clone());
        }
        // Batches 6..=11 were written while it was away.
        v.resync(11, 12);
        assert!(!v.is_complete());
        v.apply(12, log[11].1.clone());
        assert!(v.replayed(1, None, log.iter().take(11).cloned().collect()));
        assert_eq!(v.pool(), Some(&whole));
    }
}
