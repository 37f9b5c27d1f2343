//! What the judge says: its evidence for `/status`, and the reason of a
//! breach, with the numbers behind it.

use super::{Evidence, Judge, RoundEvidence, Status, TestEvidence, Verdict, PAIRED_SHARE};
use crate::guard::Guard;
use crate::limits::{Limit, LimitTest, Spec};

/// The guard of a limit's paired test.
fn paired_guard(limit: Limit) -> Guard {
    if limit.is_latency() {
        Guard::MirrorLatencyTest
    } else {
        Guard::MirrorErrorTest
    }
}

impl Judge {
    /// The evidence so far.
    pub fn evidence(&self) -> Evidence {
        let warm = self.warming_up();
        let paired = self
            .specs
            .iter()
            .zip(&self.paired)
            .map(|(s, t)| (s, t, paired_guard(s.limit), PAIRED_SHARE));
        let tests: Vec<TestEvidence> = self
            .specs
            .iter()
            .zip(&self.tests)
            .map(|(s, t)| (s, t, s.guard, self.w))
            .chain(paired)
            .map(|(s, t, guard, w)| TestEvidence {
                guard,
                limit: describe(s.limit),
                e: t.e_value(w),
                events: t.events(),
                warming_up: warm && s.limit.is_latency(),
                thresholds_ms: s.limit.slot().map(|slot| {
                    let ms = |t: &[Option<u64>]| {
                        t.get(slot).copied().flatten().map(|us| us as f64 / 1000.0)
                    };
                    (ms(&self.stable_thresholds), ms(&self.canary_thresholds))
                }),
                key_round: t.round().and_then(|r| {
                    Some(RoundEvidence {
                        number: r.number(),
                        e: t.round_e_value(w)?.0,
                        events: r.events(),
                    })
                }),
            })
            .collect();
        let specs = || {
            self.specs
                .iter()
                .chain(self.specs.iter().take(self.paired.len()))
        };
        let max_e = |latency: bool| {
            specs()
                .zip(&tests)
                .filter(|(s, _)| s.limit.is_latency() == latency)
                .map(|(_, t)| t.e)
                .fold(0.0, f64::max)
        };
        let (mut e_errors, mut e_latency) = (max_e(false), max_e(true));
        if let Some(w) = &self.watch {
            e_errors = w.errors.e_value();
            e_latency = if w.slow.is_empty() {
                0.0
            } else {
                w.slow.iter().map(|(_, t)| t.e_value()).sum::<f64>() / w.slow.len() as f64
            };
        }
        let slow_events = self
            .specs
            .iter()
            .zip(&tests)
            .filter(|(s, _)| s.limit.is_latency())
            .fold((0, 0), |(c, s), (_, t)| (c + t.events.0, s + t.events.1));
        Evidence {
            e_errors,
            e_latency,
            threshold: self.threshold(),
            error_events: self
                .specs
                .iter()
                .zip(&tests)
                .find(|(s, _)| !s.limit.is_latency())
                .map_or((0, 0), |(_, t)| t.events),
            slow_events,
            thresholds_ms: self
                .specs
                .iter()
                .filter_map(|s| match s.limit {
                    Limit::LatencyRatio { q, slot, .. } => {
                        let t = self.stable_thresholds.get(slot).copied().flatten();
                        Some((q, t.map(|us| us as f64 / 1000.0)))
                    }
                    _ => None,
                })
                .collect(),
            pool: self.pool_evidence(&tests),
            tests,
        }
    }

    fn pool_evidence(&self, local: &[TestEvidence]) -> Option<super::PoolEvidence> {
        if !self.pooling() {
            return None;
        }
        let view = self.pool.as_ref();
        let pool = view.and_then(|v| v.pool());
        Some(super::PoolEvidence {
            complete: view.is_some_and(|v| v.is_complete()),
            threshold: self.pool_threshold(),
            seat: self.seat,
            seats: self.settings.fleet_seats,
            revision: pool.map_or(0, |p| p.revision()),
            batches: pool.map_or((0, 0), |p| p.batches()),
            tests: pool
                .map(|p| {
                    p.tests()
                        .filter_map(|(i, e, events)| {
                            let t = local.get(i)?;
                            // The pooled tests have no key rounds.
                            Some(TestEvidence {
                                e,
                                events,
                                key_round: None,
                                ..t.clone()
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// The breach verdict of the paired test `test` of `spec` at e-value
    /// `e`.
    pub(super) fn paired_breach(&self, spec: &Spec, test: &LimitTest, e: f64) -> Verdict {
        let threshold = self.threshold();
        let (c, s) = test.events();
        let copies = test.requests().map_or(String::new(), |(bad, n)| {
            format!(
                "; {bad} of {n} copies bad ({:.2}%)",
                bad as f64 * 100.0 / n.max(1) as f64
            )
        });
        let what = if spec.limit.is_latency() {
            "slower than its threshold"
        } else {
            "failed"
        };
        Verdict {
            status: Status::Breach,
            guard: Some(paired_guard(spec.limit)),
            reason: format!(
                "mirrored requests: the canary's copy {what} where stable's answer did not in {c} pairs, the reverse in {s}{copies}; more than a canary within \"{}\" would have; E = {e:.1} ≥ {threshold:.0}",
                describe(spec.limit)
            ),
        }
    }

    /// The breach verdict of `test` at e-value `e`, with `pending`
    /// (canary, stable) events of a look added to its counts.
    pub(super) fn breach(
        &self,
        spec: &Spec,
        test: &LimitTest,
        e: f64,
        pending: (u64, u64),
    ) -> Verdict {
        let (c, s) = test.events();
        self.breach_on(spec, test, e, (c + pending.0, s + pending.1), "")
    }

    /// A breach of `test`'s current key round (see [`crate::limits`], "Key
    /// rounds"), its e-value `e` weighted by the round's share.
    pub(super) fn round_breach(&self, spec: &Spec, test: &LimitTest, e: f64) -> Verdict {
        let Some(round) = test.round() else {
            return self.breach(spec, test, e, (0, 0));
        };
        let note = format!(
            " (key round {}: each key counted again once the last round's votes were spent; the round's e-value times its share 1/{:.0} of the test's α)",
            round.number(),
            1.0 / round.share()
        );
        self.breach_on(spec, test, e, round.events(), &note)
    }

    fn breach_on(
        &self,
        spec: &Spec,
        test: &LimitTest,
        e: f64,
        (c, s): (u64, u64),
        note: &str,
    ) -> Verdict {
        let threshold = self.threshold();
        let w = self.w * 100.0;
        let requests = test.requests().map_or(String::new(), |(bad, n)| {
            format!(
                "{bad} of {n} canary requests ({:.2}%); ",
                bad as f64 * 100.0 / n.max(1) as f64
            )
        });
        let ms = |slot: usize, t: &[Option<u64>]| {
            t.get(slot)
                .copied()
                .flatten()
                .map_or("-".to_string(), |us| {
                    format!("{:.1} ms", us as f64 / 1000.0)
                })
        };
        let what = match spec.limit {
            Limit::ErrorRatio { r0 } => format!(
                "errors: the canary has {c} of {} distinct-key error events at a {w:.2}% share, more than a canary with at most {r0}× stable's error rate would have",
                c + s
            ),
            Limit::ErrorRate { limit, r0 } => format!(
                "errors: {requests}over {} = {:.2}%, and worse than {r0}× stable's ({c} canary against {s} stable distinct-key error events at a {w:.2}% share)",
                spec.guard,
                limit * 100.0
            ),
            Limit::LatencyRatio { q, ratio, slot, .. } => format!(
                "latency: {c} canary requests over {ratio}× stable's {} ({}) against {s} stable requests over {} (distinct keys, canary share {w:.2}%), more than a canary within {ratio}× of stable would have",
                q.key(),
                ms(slot, &self.canary_thresholds),
                ms(slot, &self.stable_thresholds)
            ),
            Limit::LatencyAbove {
                q,
                limit_us,
                ratio,
                slot,
                ..
            } => format!(
                "latency: {requests}over max_latency_ms.{} = {:.1} ms where at most {:.1}% may be, and worse than {ratio}× stable ({c} canary requests over it against {s} stable over {}, distinct keys)",
                q.key(),
                limit_us as f64 / 1000.0,
                (1.0 - q.fraction()) * 100.0,
                ms(slot, &self.stable_thresholds)
            ),
        };
        Verdict {
            status: Status::Breach,
            guard: Some(spec.guard),
            reason: format!("{what}{note}; E = {e:.1} ≥ {threshold:.0}"),
        }
    }
}

/// A limit as the operator wrote it.
pub(super) fn describe(limit: Limit) -> String {
    match limit {
        Limit::ErrorRatio { r0 } => format!("error rate ≤ {r0}× stable's"),
        Limit::ErrorRate { limit, .. } => format!("error rate ≤ {}%", limit * 100.0),
        Limit::LatencyRatio { q, ratio, .. } => format!("{} ≤ {ratio}× stable's", q.key()),
        Limit::LatencyAbove { q, limit_us, .. } => {
            format!("{} ≤ {} ms", q.key(), limit_us as f64 / 1000.0)
        }
    }
}
