//! The blue-green watch: after a flip, the new colour against the old
//! colour's window from before it (see the module docs of [`super`]).

use std::time::Duration;

use super::{count_above, Judge, Status, Verdict};
use crate::config::Quantile;
use crate::guard::Guard;
use crate::limits::MIN_CANARY_EVENTS;
use crate::onesample::{quantile_upper_bound, rate_upper_bound, OneSample};
use crate::window::Slice;

/// Ticks after a blue-green flip that are not tested: the new colour's
/// connection pools and caches are cold for its first requests.
const WATCH_WARMUP_TICKS: usize = 2;
/// blue-green latency: how much slower than the old colour's quantile the
/// new colour's may be. A baseline from the past cannot tell a small
/// slowdown from drift in load since the flip, so only large shifts are
/// tested, and tails (p99 and above), which drift most with load and CPU
/// contention, need larger ones (in CI a 20 ms service's p99 moved 1.14x
/// with nothing changed but the machine's load).
fn watch_tolerance(q: Quantile) -> f64 {
    if q.fraction() >= 0.99 {
        1.5
    } else {
        1.2
    }
}

/// blue-green after a flip: the new colour against the old one's baseline.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct Watch {
    warmup: usize,
    pub(super) ticks_left: usize,
    pub(super) errors: OneSample,
    /// (threshold µs, test) per quantile.
    pub(super) slow: Vec<(u64, OneSample)>,
}

impl Watch {
    /// Counts one tick of the new colour (after the watch's warm-up).
    pub(super) fn update(&mut self, canary: &Slice) {
        if self.warmup > 0 {
            self.warmup -= 1;
        } else if self.ticks_left > 0 {
            self.ticks_left -= 1;
            let n = canary.requests;
            self.errors.update(canary.errors, n);
            for (t, test) in &mut self.slow {
                test.update(count_above(&canary.latency, *t), n);
            }
        }
    }
}

impl Judge {
    /// blue-green: the canary colour just took all traffic. Starts testing it
    /// against stable's window from before the flip, for the `watch` period.
    /// Returns false (and tests nothing) when that window has fewer than
    /// `min_requests`: there is no baseline to compare with.
    pub fn start_watch(&mut self) -> bool {
        let st = self.stable.stats();
        if st.requests < self.settings.min_requests {
            self.watch = None;
            return false;
        }
        // Each watch test spends one α/k share on its baseline's bound and
        // one on its sequential test (see `threshold`); the latency bounds
        // split theirs between the quantiles.
        let delta = 1.0 / self.threshold();
        let quantiles = self.latency_quantiles();
        let per_quantile = delta / quantiles.len().max(1) as f64;
        let slow = quantiles
            .iter()
            .filter_map(|q| {
                let bound = quantile_upper_bound(&st.latency, q.fraction(), per_quantile)?;
                let t = (bound as f64 * watch_tolerance(*q).max(self.settings.margin)) as u64;
                Some((t, OneSample::at(1.0 - q.fraction())))
            })
            .collect();
        let null = rate_upper_bound(st.errors, st.requests, delta) * self.settings.margin.max(1.0);
        let interval = self.settings.interval.max(Duration::from_millis(1));
        self.watch = Some(Watch {
            warmup: WATCH_WARMUP_TICKS,
            ticks_left: (self.settings.watch.as_secs_f64() / interval.as_secs_f64()).ceil()
                as usize,
            errors: OneSample::at(null),
            slow,
        });
        true
    }

    /// Whether a blue-green watch is running.
    pub fn watching(&self) -> bool {
        self.watch.as_ref().is_some_and(|w| w.ticks_left > 0)
    }

    /// The watch's breach, if it has one.
    pub(super) fn watch_test(&self) -> Option<Verdict> {
        let w = self.watch.as_ref()?;
        let threshold = self.threshold();
        if w.errors.e_value() >= threshold && w.errors.bad() >= MIN_CANARY_EVENTS {
            return Some(Verdict {
                status: Status::Breach,
                guard: Some(Guard::BluegreenErrorTest),
                reason: format!(
                    "after the flip: {} errors in {} requests, over {:.3}% (the old colour's rate at most, with the margin); E = {:.1} ≥ {threshold:.0}",
                    w.errors.bad(),
                    w.errors.requests(),
                    w.errors.null_rate() * 100.0,
                    w.errors.e_value()
                ),
            });
        }
        if w.slow.is_empty() {
            return None;
        }
        let e = w.slow.iter().map(|(_, t)| t.e_value()).sum::<f64>() / w.slow.len() as f64;
        let bad: u64 = w.slow.iter().map(|(_, t)| t.bad()).sum();
        let threshold = self.threshold();
        if e >= threshold && bad >= MIN_CANARY_EVENTS {
            let detail: Vec<String> = w
                .slow
                .iter()
                .map(|(t, s)| {
                    format!(
                        "{} of {} over {:.1} ms ({:.1}% allowed)",
                        s.bad(),
                        s.requests(),
                        *t as f64 / 1000.0,
                        s.null_rate() * 100.0
                    )
                })
                .collect();
            return Some(Verdict {
                status: Status::Breach,
                guard: Some(Guard::BluegreenLatencyTest),
                reason: format!(
                    "after the flip: {}; E = {e:.1} ≥ {threshold:.0}",
                    detail.join(", ")
                ),
            });
        }
        None
    }
}
