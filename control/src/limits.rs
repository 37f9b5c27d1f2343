//! The judge's family of sequential tests: one per configured limit, all
//! sharing the route's `false_revert_rate`.
//!
//! # What "as good as stable" means
//!
//! The limits define it. A canary is *within its limits* when each of these
//! holds; each is the null hypothesis of one anytime-valid test, and the
//! canary is reverted only when a test has the evidence to reject its null:
//!
//! | limit | null hypothesis | test |
//! |---|---|---|
//! | `max_error_rate_ratio = r` | canary error rate ≤ r × stable's | event attribution, margin `r` |
//! | no error limit at all | canary error rate ≤ `margin` × stable's | event attribution, margin `margin` |
//! | `max_error_rate = p` (and `slo`, as `14.4 × (1 − slo)`) | canary error rate ≤ p, or within the tolerated ratio of stable's | one-sample and attribution, the smaller e-value |
//! | `max_latency_ratio.q = ρ` | canary latency ≤ ρ × stable's (in distribution) | attribution of requests over `ρ·T` (canary) and `T` (stable) |
//! | no latency limit at all | p50 and p99 as a ratio of 1, with `margin` | as above |
//! | `max_latency_ms.q = L` | share of canary requests over L ≤ 1 − q, or canary within the tolerated ratio of stable | one-sample and attribution (canary over `L`, stable over `L/ρ`), the smaller e-value |
//!
//! **Ratios.** Event attribution (Lindon & Malek 2022, see
//! [`crate::eprocess`]) needs no model of either version: under the null each
//! bad event is the canary's with probability at most its routing share `w`
//! (times the margin). For latency, a request is a bad event when it is
//! slower than a threshold: `T`, the stable version's `q` quantile over the
//! window *before* the tick (never from the data judged), for stable, and
//! `ρ·T` for the canary. If the canary is at most ρ times slower than stable
//! at every level (`P(canary > ρt) ≤ P(stable > t)` for every `t`, which is
//! what "its quantiles are within ρ of stable's" means for every quantile),
//! each event is the canary's with probability at most `w`, whatever `T` is.
//! So `T` only decides power, load drift that moves both versions alike
//! cannot make the test unfair, and no upper-confidence estimate of stable's
//! quantile is needed. A canary 10 % slower under `ρ = 1.3` has *fewer*
//! events per request than stable, and the test's evidence sinks.
//!
//! **Absolute limits.** A one-sample mixture test of "rate ≤ limit" on the
//! canary's requests ([`crate::onesample`], the Bernoulli mSPRT of Johari,
//! Pekelis & Walsh) answers whether the canary is over the limit. Requests
//! of one sticky user are not independent coins, though: one heavy user
//! whose every request fails (a poison request, a broken client) can put a
//! small canary over any limit. So the test's null is the union "within the
//! limit, *or* no worse than stable" and its e-value is the smaller of the
//! one-sample e-value and an attribution e-value on the same kind of event
//! counted once per distinct key (for latency: canary requests over the
//! limit `L`, stable requests over `L/ρ`). "Worse than stable" means beyond
//! what the route tolerates: the configured ratio of the same metric
//! (`max_error_rate_ratio`, `max_latency_ratio` of the same quantile), or
//! else `margin`. The minimum of two e-processes is bounded by each, so
//! under either null Ville's inequality holds. A canary is then reverted for
//! an absolute limit when it is over the limit *and* worse than stable: an
//! outage both versions share, or one user's requests, is not the canary's
//! fault (in `judge-sim`, always-failing heavy users put a canary with 1.5x
//! stable's errors over 5 % in some rollouts; they are within the ratio). When the canary has all traffic (`w = 1`: promoted, or a
//! blue-green colour that took over) there is no stable to compare with, and
//! the one-sample test alone decides.
//!
//! **Requests given up.** A request whose client left before the answer
//! (after sending it whole) is known only to have taken longer than the
//! time the version had had it, `t`. The proxy records it as a request of
//! latency `t` only when `t` is over a slow threshold in force (and as no
//! error): for each test whose threshold `t` passes it is a bad event it
//! would have been had the client stayed; for the others it is no event,
//! and in an absolute limit's one-sample leg it reads as a fast canary
//! request, which can only weaken evidence against the canary. So the events
//! a version gets are a subset of those it would get with patient clients,
//! never more, whatever the clients do; with clients whose patience does
//! not depend on the version, the canary's events under the null are at
//! most its share, as above (`P(canary > ρT, patience > ρT) ≤ P(stable >
//! T, patience > T)` for ρ ≥ 1). `veer_proxy::record::Recorder::given_up`.
//!
//! **Key rounds.** A sticky key counts once per canary: its version is
//! fixed by its hash, so its second bad event would repeat the first
//! draw. Where a route has few keys (callers keyed by `client-ip`, a few
//! dozen tenants), every key soon has had its event (stable's own errors,
//! an outage both versions share), and from then on a canary that starts
//! failing a quarter of its requests is never reverted (measured in
//! session 15: E = 0.28 after 13 329 canary requests, 25 % failing). So
//! the recorder also counts each kind of bad event in *key rounds*: the
//! first event of each key since the round began (and, where addresses
//! have one vote, of each address). A round ends when its votes are
//! spent: at least 32 more repeated events (of keys that already voted in
//! the round) than votes, from at least 4 distinct keys, and at least
//! 10 s in (see `veer_proxy::record::RouteKeys`); one always-failing key
//! cannot end rounds, a canary failing all of its few keys does in
//! seconds. Each round's events feed a fresh copy of the test's
//! attribution leg (with its own fresh starts). Within a round, each
//! counted event's key is new to the round, so under the null it is the
//! canary's with probability at most its share, as for the test itself;
//! across rounds the same keys' versions repeat, so rounds are not one
//! martingale and are combined by Bonferroni instead: round `n` has
//! `KEY_ROUNDS_SHARE / (n (n+1))` of the test's α (an eighth in all, taken
//! from the coarse grid of the test's fresh starts, see
//! [`crate::eprocess::Detector`]; the canary's first tick keeps its half,
//! so a canary bad from its first request is caught as before), and reverts
//! when its e-value times that share reaches the test's threshold. Round
//! ends depend on counts and keys, never on versions. For an absolute
//! limit the round's e-value is again the smaller of it and the one-sample
//! leg's. A round's test acts on ticks (not on looks between them). A
//! fleet's pooled tests have no rounds (they count a key once fleet-wide);
//! each replica's local tests do.
//!
//! **One α.** With `k` tests, each gets `α/k` and reverts at `E ≥ k/α`
//! (Bonferroni): a canary within every limit is reverted, over a whole
//! rollout, with probability at most `Σ α/k = α`, however often the judge
//! looks. Equal shares, because no limit is known in advance to matter more
//! than another; the cost of splitting is `ln k` nats for each test (1.4
//! for the four tests of `config.example.toml`, less than one canary error
//! event at the reference example's relative risk).

use crate::config::{JudgeSettings, Quantile};
use crate::eprocess::{Detector, KEY_ROUNDS_SHARE};
use crate::guard::Guard;
use crate::onesample::OneSample;

/// Burn rate that the `slo` key turns into an absolute error limit (the SRE
/// workbook's fast-burn factor).
pub const BURN_RATE: f64 = 14.4;
/// Canary bad events (distinct keys) a test needs before it may revert.
pub const MIN_CANARY_EVENTS: u64 = 3;

/// What one test checks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Limit {
    /// Canary error rate ≤ `r0` × stable's.
    ErrorRatio {
        /// The tolerated relative risk.
        r0: f64,
    },
    /// Canary error rate ≤ `limit` (or within `r0` × stable's).
    ErrorRate {
        /// The limit, 0..1.
        limit: f64,
        /// The relative risk tolerated against stable: the configured
        /// `max_error_rate_ratio`, else the margin.
        r0: f64,
    },
    /// Canary latency ≤ `ratio` × stable's, tested at stable's `q` quantile.
    LatencyRatio {
        /// The quantile whose threshold is used.
        q: Quantile,
        /// The tolerated latency ratio.
        ratio: f64,
        /// The tolerated relative risk of slow events (the margin when no
        /// ratio is configured, else 1).
        r0: f64,
        /// The recorder's threshold slot.
        slot: usize,
    },
    /// Canary `q` quantile ≤ `limit_us` (or within `ratio` × stable's:
    /// stable's requests are counted over `limit_us / ratio`).
    LatencyAbove {
        /// The quantile.
        q: Quantile,
        /// The limit in µs.
        limit_us: u64,
        /// The latency ratio tolerated against stable: the configured
        /// `max_latency_ratio` of the same quantile, else 1 (and then the
        /// margin as relative risk).
        ratio: f64,
        /// The tolerated relative risk of its events.
        r0: f64,
        /// The recorder's threshold slot.
        slot: usize,
    },
}

impl Limit {
    /// Whether this test is about latency.
    pub fn is_latency(self) -> bool {
        matches!(
            self,
            Limit::LatencyRatio { .. } | Limit::LatencyAbove { .. }
        )
    }

    /// The recorder threshold slot whose slow events this test reads.
    pub fn slot(self) -> Option<usize> {
        match self {
            Limit::LatencyRatio { slot, .. } | Limit::LatencyAbove { slot, .. } => Some(slot),
            _ => None,
        }
    }
}

/// One running test of the family.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LimitTest {
    /// The attribution leg (every test has one).
    rel: Detector,
    /// The one-sample leg of an absolute limit.
    abs: Option<Detector<OneSample>>,
    /// The attribution leg again, on the current key round's events (see
    /// the module docs, "Key rounds"); None before the first.
    #[serde(default)]
    round: Option<KeyRound>,
}

/// The attribution test of one key round.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KeyRound {
    /// The round's number for this test: 1, 2, ...
    n: u64,
    /// The recorder's id of the round.
    id: u64,
    rel: Detector,
}

impl KeyRound {
    /// The round's number for its test (1 for the first).
    pub fn number(&self) -> u64 {
        self.n
    }

    /// The round's share of its test's α: `KEY_ROUNDS_SHARE / (n (n+1))`,
    /// which sums to `KEY_ROUNDS_SHARE` over all rounds.
    pub fn share(&self) -> f64 {
        let n = self.n.max(1) as f64;
        KEY_ROUNDS_SHARE / (n * (n + 1.0))
    }

    /// Distinct-key (canary, stable) events of the round.
    pub fn events(&self) -> (u64, u64) {
        (self.rel.canary_events(), self.rel.stable_events())
    }
}

/// A tick's bad events of one key round (see the module docs, "Key
/// rounds"): the first of each key since the round began.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundBatch {
    /// The recorder's id of the round (a new id: a new round).
    pub id: u64,
    /// Canary events.
    pub canary_events: u64,
    /// Stable events.
    pub stable_events: u64,
}

/// A test's description: what it checks and its `reason` label.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    /// The limit.
    pub limit: Limit,
    /// Label of `veer_reverts_total{reason}` and the state file.
    pub guard: Guard,
}

/// The tests a route's judge settings call for, in a fixed order.
pub fn family(s: &JudgeSettings) -> Vec<Spec> {
    let mut specs = Vec::new();
    let margin = s.margin.max(1.0);
    let burn_limit = s.slo.map(|slo| (BURN_RATE * (1.0 - slo)).min(1.0));
    if let Some(r) = s.max_error_rate_ratio {
        specs.push(Spec {
            limit: Limit::ErrorRatio { r0: r.max(1.0) },
            guard: Guard::ErrorRateRatio,
        });
    }
    // `slo` and `max_error_rate` are both absolute error limits: the
    // stricter one implies the other, so it alone is tested.
    let absolute = match (s.max_error_rate, burn_limit) {
        (Some(m), Some(b)) if b < m => Some((b, Guard::SloBurnRate)),
        (Some(m), _) => Some((m, Guard::MaxErrorRate)),
        (None, Some(b)) => Some((b, Guard::SloBurnRate)),
        (None, None) => None,
    };
    if let Some((limit, guard)) = absolute {
        specs.push(Spec {
            limit: Limit::ErrorRate {
                limit,
                r0: s.max_error_rate_ratio.map_or(margin, |r| r.max(1.0)),
            },
            guard,
        });
    }
    if specs.is_empty() {
        specs.push(Spec {
            limit: Limit::ErrorRatio { r0: margin },
            guard: Guard::ErrorRateTest,
        });
    }
    let mut slot = 0;
    let latency_limits = !s.max_latency_ratio.is_empty() || !s.max_latency_ms.is_empty();
    let mut ratios: Vec<(Quantile, f64, f64, Guard)> = s
        .max_latency_ratio
        .iter()
        .map(|(q, r)| (*q, r.max(1.0), 1.0, Guard::LatencyRatio))
        .collect();
    if !latency_limits {
        ratios = vec![
            (Quantile::P50, 1.0, margin, Guard::LatencyTest),
            (Quantile::P99, 1.0, margin, Guard::LatencyTest),
        ];
    }
    for (q, ratio, r0, guard) in ratios {
        specs.push(Spec {
            limit: Limit::LatencyRatio { q, ratio, r0, slot },
            guard,
        });
        slot += 1;
    }
    for (q, ms) in &s.max_latency_ms {
        let ratio = s
            .max_latency_ratio
            .iter()
            .find(|(rq, _)| rq == q)
            .map(|(_, r)| r.max(1.0));
        specs.push(Spec {
            limit: Limit::LatencyAbove {
                q: *q,
                limit_us: (ms * 1000.0).round().max(1.0) as u64,
                ratio: ratio.unwrap_or(1.0),
                r0: if ratio.is_some() { 1.0 } else { margin },
                slot,
            },
            guard: Guard::MaxLatency,
        });
        slot += 1;
    }
    specs
}

/// What a tick gives one test: the canary share, and per version the
/// distinct-key bad events of the test's kind; for absolute limits also the
/// canary's requests and how many of them were bad.
#[derive(Clone, Copy, Debug, Default)]
pub struct Batch {
    /// Canary share.
    pub w: f64,
    /// Canary distinct-key events.
    pub canary_events: u64,
    /// Stable distinct-key events.
    pub stable_events: u64,
    /// Canary requests.
    pub canary_requests: u64,
    /// Canary requests that were bad (errors, or slower than the limit).
    pub canary_bad: u64,
    /// The key round's events (None where the recorder keeps no rounds).
    pub round: Option<RoundBatch>,
}

/// What a tick's mirrored pairs give one test (see
/// [`crate::eprocess::EProcess::update_pairs`]): for an error test, pairs
/// by which copies failed; for a latency test, by which copies were slower
/// than the test's thresholds (stable's copy against stable's, the canary's
/// against the canary's); for absolute limits also the canary's copies and
/// how many of them were bad.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairBatch {
    /// Pairs with only the canary's copy bad.
    pub canary_only: u64,
    /// Pairs with only stable's copy bad.
    pub stable_only: u64,
    /// Pairs with both bad.
    pub both: u64,
    /// Pairs in the batch.
    pub pairs: u64,
}

impl LimitTest {
    /// The e-value after the mirrored pairs of a look between ticks (see
    /// [`LimitTest::update_pairs`]; the one-sample leg as of the last tick).
    pub fn e_value_after_pairs(&self, b: &PairBatch) -> f64 {
        let rel = self.rel.e_value_after_counts(
            0.5,
            crate::eprocess::Counts {
                canary: b.canary_only,
                stable: b.stable_only,
                both: b.both,
            },
        );
        combine(rel, self.abs.as_ref().map(|a| a.e_value()), 0.5)
    }

    /// Adds a tick's mirrored pairs. The attribution leg takes them as
    /// pairs; an absolute limit's one-sample leg takes the canary's copies
    /// as the canary's requests (the copies are a sample of stable's
    /// traffic, chosen by key, not by outcome).
    pub fn update_pairs(&mut self, b: &PairBatch) {
        self.rel.update_pairs(b.canary_only, b.stable_only, b.both);
        if let Some(abs) = &mut self.abs {
            let bad = (b.canary_only + b.both).min(b.pairs);
            abs.update(1.0, bad, b.pairs - bad);
        }
    }

    /// A fresh test of `limit`, with a fresh start every `restart_every`
    /// batches.
    pub fn new(limit: Limit, restart_every: u64) -> LimitTest {
        let (r0, abs) = match limit {
            Limit::ErrorRatio { r0 } | Limit::LatencyRatio { r0, .. } => (r0, None),
            Limit::ErrorRate { limit, r0 } => (r0, Some(limit)),
            Limit::LatencyAbove { q, r0, .. } => (r0, Some(1.0 - q.fraction())),
        };
        LimitTest {
            rel: Detector::new(r0, restart_every),
            abs: abs.map(|p| Detector::with(OneSample::at(p), restart_every)),
            round: None,
        }
    }

    /// Adds a tick's batch. A round id other than the current round's
    /// starts the next round's test afresh.
    pub fn update(&mut self, b: &Batch) {
        self.rel.update(b.w, b.canary_events, b.stable_events);
        if let Some(abs) = &mut self.abs {
            let bad = b.canary_bad.min(b.canary_requests);
            abs.update(b.w, bad, b.canary_requests - bad);
        }
        if let Some(rb) = b.round {
            let round = match self.round.take() {
                Some(r) if r.id == rb.id => r,
                before => KeyRound {
                    n: before.map_or(1, |r| r.n + 1),
                    id: rb.id,
                    rel: self.rel.restarted(),
                },
            };
            let round = self.round.insert(round);
            round.rel.update(b.w, rb.canary_events, rb.stable_events);
        }
    }

    /// The current key round's test, if one began.
    pub fn round(&self) -> Option<&KeyRound> {
        self.round.as_ref()
    }

    /// The current key round's e-value, weighted by its share (so that it
    /// is compared with the test's own threshold), and its canary events;
    /// None before a round, and at `w = 1` (no stable to compare with: the
    /// one-sample leg alone decides, in the test itself).
    pub fn round_e_value(&self, w: f64) -> Option<(f64, u64)> {
        let r = self.round.as_ref().filter(|_| w < 1.0)?;
        let e = r.rel.e_value() * r.share();
        Some((
            combine(e, self.abs.as_ref().map(|a| a.e_value()), w),
            r.rel.canary_events(),
        ))
    }

    /// The test's e-value, with the canary at share `w` (see the module
    /// docs: at `w = 1` an absolute limit's one-sample leg decides alone).
    pub fn e_value(&self, w: f64) -> f64 {
        combine(
            self.rel.e_value(),
            self.abs.as_ref().map(|a| a.e_value()),
            w,
        )
    }

    /// The e-value after the distinct-key events of a look between ticks
    /// (the one-sample leg as of the last tick).
    pub fn e_value_after(&self, w: f64, canary: u64, stable: u64) -> f64 {
        combine(
            self.rel.e_value_after(w, canary, stable),
            self.abs.as_ref().map(|a| a.e_value()),
            w,
        )
    }

    /// Distinct-key (canary, stable) events so far.
    pub fn events(&self) -> (u64, u64) {
        (self.rel.canary_events(), self.rel.stable_events())
    }

    /// (bad, all) canary requests the one-sample leg has seen.
    pub fn requests(&self) -> Option<(u64, u64)> {
        self.abs
            .as_ref()
            .map(|a| (a.canary_events(), a.canary_events() + a.stable_events()))
    }

    /// Whether the test may act at e-value `e` against `threshold` with
    /// `canary` distinct-key canary events (at `w = 1`, bad requests).
    pub fn crossed(&self, e: f64, threshold: f64, canary: u64, w: f64) -> bool {
        let events = match (&self.abs, w >= 1.0) {
            (Some(a), true) => a.canary_events(),
            _ => canary,
        };
        e >= threshold && events >= MIN_CANARY_EVENTS
    }
}

fn combine(rel: f64, abs: Option<f64>, w: f64) -> f64 {
    match abs {
        Some(a) if w >= 1.0 => a,
        Some(a) => a.min(rel),
        None => rel,
    }
}

/// The judge section of `config.example.toml`, for tests.
#[cfg(test)]
pub(crate) fn reference() -> JudgeSettings {
    JudgeSettings {
        max_error_rate: Some(0.05),
        max_error_rate_ratio: Some(2.0),
        max_latency_ms: vec![(Quantile::P99, 800.0)],
        max_latency_ratio: vec![(Quantile::P99, 1.3)],
        ..JudgeSettings::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::JudgeSettings;

    #[test]
    fn the_reference_limits_make_four_tests_and_no_limits_make_the_default_three() {
        let f = family(&reference());
        let guards: Vec<&str> = f.iter().map(|s| s.guard.as_str()).collect();
        assert_eq!(
            guards,
            [
                "error_rate_ratio",
                "max_error_rate",
                "latency_ratio",
                "max_latency"
            ]
        );
        assert_eq!(f[3].limit.slot(), Some(1));
        let d = family(&JudgeSettings::default());
        let guards: Vec<&str> = d.iter().map(|s| s.guard.as_str()).collect();
        assert_eq!(guards, ["error_rate_test", "latency_test", "latency_test"]);
        // An slo stricter than max_error_rate replaces it.
        let slo = JudgeSettings {
            slo: Some(0.999),
            ..reference()
        };
        assert!(family(&slo).iter().any(|s| s.guard == Guard::SloBurnRate
            && matches!(s.limit, Limit::ErrorRate { limit, .. } if (limit - 0.0144).abs() < 1e-12)));
    }

    #[test]
    fn one_user_over_an_absolute_limit_is_not_the_canarys_fault() {
        // 10 % of the canary's requests fail, all from one key: the
        // one-sample leg is certain, the distinct-key leg has one event.
        let mut t = LimitTest::new(
            Limit::ErrorRate {
                limit: 0.05,
                r0: 1.0,
            },
            60,
        );
        for i in 0..600 {
            t.update(&Batch {
                w: 0.05,
                canary_events: u64::from(i == 0),
                stable_events: 1,
                canary_requests: 50,
                canary_bad: 5,
                round: None,
            });
        }
        assert!(t.abs.as_ref().map(|a| a.e_value()).unwrap_or(0.0) > 1e6);
        assert!(t.e_value(0.05) < 1.0, "{}", t.e_value(0.05));
        // With all traffic on the canary there is no stable to compare with.
        assert!(t.e_value(1.0) > 1e6);
    }

    #[test]
    fn a_canary_over_the_limit_and_worse_than_stable_crosses() {
        let mut t = LimitTest::new(
            Limit::ErrorRate {
                limit: 0.05,
                r0: 1.0,
            },
            60,
        );
        let mut ticks = 0;
        while !t.crossed(t.e_value(0.05), 400.0, t.events().0, 0.05) {
            // 10 % canary errors from fresh keys, stable 0.1 %.
            t.update(&Batch {
                w: 0.05,
                canary_events: 5,
                stable_events: 1,
                canary_requests: 50,
                canary_bad: 5,
                round: None,
            });
            ticks += 1;
            assert!(ticks < 100, "never crossed: {}", t.e_value(0.05));
        }
        assert!(ticks <= 10, "{ticks} ticks");
    }
}
