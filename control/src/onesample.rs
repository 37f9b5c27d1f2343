//! The one-sample sequential test: is a stream's rate of bad requests
//! above a fixed null rate? Used for absolute limits (`max_error_rate`,
//! `max_latency_ms`, `slo`) and for blue-green's watch after a flip.
//!
//! # Method
//!
//! Each request is a coin with null probability `p₀` of being bad. For
//! relative risks `r_j` on the same grid as [`crate::eprocess`] (those with
//! `p₀·r_j < 1`), each batch of `n` requests with `k` bad multiplies `L_j` by
//! `r_j^k · ((1 − p₀r_j)/(1 − p₀))^(n−k)`; the mean of the `L_j` is a test
//! martingale under the null (Ville's inequality bounds its crossing
//! probability by α). This is the Bernoulli case of the mixture sequential
//! probability ratio test (Johari, Pekelis & Walsh, "Always Valid
//! Inference").
//!
//! A null taken from a finite baseline (the old colour's window before a
//! blue-green flip) is not known exactly: [`rate_upper_bound`] and
//! [`quantile_upper_bound`] turn the baseline into a bound that holds with
//! probability `1 − δ` (Chernoff's bound on the binomial), and the caller
//! spends `δ` from its share of α, so the pair stays valid.
//!
//! Caveat: requests of one sticky user are not independent coins. A
//! heavy user who always fails was part of the baseline too, so the test is
//! unbiased, but its variance is larger than assumed.

use crate::eprocess::{log_mean_exp, Counts, GRID};

/// `KL(a ‖ p)` between Bernoulli rates.
fn kl(a: f64, p: f64) -> f64 {
    let term = |x: f64, y: f64| if x <= 0.0 { 0.0 } else { x * (x / y).ln() };
    term(a, p) + term(1.0 - a, 1.0 - p)
}

/// An upper bound on a rate seen as `bad` of `n`, exceeded with probability
/// at most `delta`: the largest `p` with `n·KL(bad/n ‖ p) ≤ ln(1/δ)`.
pub fn rate_upper_bound(bad: u64, n: u64, delta: f64) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let a = (bad.min(n) as f64) / n as f64;
    let budget = (1.0 / delta.clamp(1e-300, 1.0)).ln() / n as f64;
    let (mut lo, mut hi) = (a, 1.0);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if kl(a, mid) <= budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// How many of `n` samples may lie above an upper bound on the `q`
/// quantile that fails with probability at most `delta`: the largest `c`
/// with `n·KL(c/n ‖ 1 − q) ≥ ln(1/δ)` (if the true quantile were above the
/// value with `c` samples over it, more than `1 − q` of the population
/// would be, and seeing `c` or fewer has probability ≤ δ). None when `n`
/// is too small for any bound.
pub fn quantile_upper_rank(n: u64, q: f64, delta: f64) -> Option<u64> {
    let tail = (1.0 - q).clamp(1e-9, 1.0);
    let need = (1.0 / delta.clamp(1e-300, 1.0)).ln();
    let ok = |c: u64| {
        let a = c as f64 / n as f64;
        a < tail && n as f64 * kl(a, tail) >= need
    };
    if n == 0 || !ok(0) {
        return None;
    }
    // n·KL(c/n ‖ tail) falls as c rises towards n·tail.
    let (mut lo, mut hi) = (0, (n as f64 * tail).ceil() as u64);
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if ok(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// An upper bound (µs) on the `q` quantile of the latencies in `h`,
/// exceeded with probability at most `delta`; None when `h` holds too few
/// requests for one (see [`quantile_upper_rank`]).
pub fn quantile_upper_bound(h: &hdrhistogram::Histogram<u64>, q: f64, delta: f64) -> Option<u64> {
    let n = h.len();
    let c = quantile_upper_rank(n, q, delta)?;
    // The smallest recorded value with at most c samples above it.
    let mut below = 0;
    for v in h.iter_recorded() {
        below += v.count_at_value();
        if n - below <= c {
            return Some(h.highest_equivalent(v.value_iterated_to()));
        }
    }
    Some(h.max())
}

/// One running one-sample test.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OneSample {
    null: f64,
    log_l: Vec<(f64, f64)>,
    bad: u64,
    requests: u64,
}

impl OneSample {
    /// A test of "the rate of bad requests is at most `null`" (an absolute
    /// limit: `max_error_rate`, or `1 − q` for a latency limit on the `q`
    /// quantile), alternatives `null·r_j` on the grid.
    pub fn at(null: f64) -> OneSample {
        let null = null.clamp(1e-9, 0.999);
        OneSample {
            null,
            log_l: GRID
                .iter()
                .filter(|&&r| null * r < 1.0)
                .map(|&r| (r, 0.0))
                .collect(),
            bad: 0,
            requests: 0,
        }
    }

    /// The null rate being tested against.
    pub fn null_rate(&self) -> f64 {
        self.null
    }

    /// Adds `bad` bad requests out of `requests`.
    pub fn update(&mut self, bad: u64, requests: u64) {
        let bad = bad.min(requests);
        if requests == 0 {
            return;
        }
        let (k, good) = (bad as f64, (requests - bad) as f64);
        for (r, log_l) in &mut self.log_l {
            let alt = self.null * *r;
            *log_l += k * r.ln() + good * ((1.0 - alt) / (1.0 - self.null)).ln();
        }
        self.bad += bad;
        self.requests += requests;
    }

    /// `ln L_j` after `bad` of `requests`, per grid point.
    fn log_l_after(&self, bad: u64, requests: u64) -> impl Iterator<Item = f64> + Clone + '_ {
        let bad = bad.min(requests);
        let (k, good) = (bad as f64, (requests - bad) as f64);
        self.log_l.iter().map(move |(r, log_l)| {
            let alt = self.null * *r;
            log_l + k * r.ln() + good * ((1.0 - alt) / (1.0 - self.null)).ln()
        })
    }

    /// The e-value.
    pub fn e_value(&self) -> f64 {
        if self.log_l.is_empty() {
            return 1.0;
        }
        log_mean_exp(self.log_l.iter().map(|(_, l)| *l)).exp()
    }

    /// Bad requests seen since the flip.
    pub fn bad(&self) -> u64 {
        self.bad
    }

    /// Requests seen since the flip.
    pub fn requests(&self) -> u64 {
        self.requests
    }
}

/// As a [`crate::eprocess::Detector`] component: batches of `(bad, good)`
/// canary requests, informative whenever the canary gets traffic.
impl crate::eprocess::Component for OneSample {
    type Steps = ();
    fn steps(&self, w: f64) -> Option<()> {
        (w > 0.0).then_some(())
    }
    /// `n.canary` bad and `n.stable` good requests (`n.both` is for pairs,
    /// which a one-sample test does not take).
    fn update_with(&mut self, _: &(), n: Counts) {
        self.update(n.canary, n.canary + n.stable);
    }
    fn log_e_with(&self, _: &(), n: Counts) -> f64 {
        if self.log_l.is_empty() {
            return 0.0;
        }
        log_mean_exp(self.log_l_after(n.canary, n.canary + n.stable))
    }
    fn e_value(&self) -> f64 {
        OneSample::e_value(self)
    }
    fn grid(&self) -> &[(f64, f64)] {
        &self.log_l
    }
    fn deltas(&self, _: &(), n: Counts) -> Vec<f64> {
        self.log_l_after(n.canary, n.canary + n.stable)
            .zip(&self.log_l)
            .map(|(after, (_, before))| after - before)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_rate_stays_low_and_a_worse_one_grows() {
        let mut same = OneSample::at(0.001);
        let mut worse = OneSample::at(0.001);
        for _ in 0..60 {
            same.update(1, 1000);
            worse.update(20, 1000);
        }
        assert!(same.e_value() < 10.0, "{}", same.e_value());
        assert!(worse.e_value() > 1e6, "{}", worse.e_value());
    }

    #[test]
    fn an_error_free_baseline_does_not_make_one_error_a_revert() {
        let mut t = OneSample::at(rate_upper_bound(0, 5_000, 0.001));
        t.update(1, 1000);
        assert!(t.e_value() < 2.0, "{}", t.e_value());
    }

    #[test]
    fn the_rate_bound_covers_the_true_rate() {
        // 1 % over 2000 requests: 20 expected. The bound at δ = 0.1 %
        // lies above the estimate, by less than a factor of 3.
        let ub = rate_upper_bound(20, 2_000, 0.001);
        assert!(ub > 0.01 && ub < 0.03, "{ub}");
        assert!(rate_upper_bound(0, 1_000, 0.001) > 0.005);
        assert_eq!(rate_upper_bound(0, 0, 0.001), 1.0);
        // Coverage by simulation: seen k of n at p = 2 %, the bound at
        // δ = 5 % falls below p in at most about 5 % of 4000 draws.
        let mut rng = xorshift(99);
        let misses = (0..4000)
            .filter(|_| {
                let k = (0..500).filter(|_| rng() < 0.02).count() as u64;
                rate_upper_bound(k, 500, 0.05) < 0.02
            })
            .count();
        assert!(misses <= 260, "{misses} of 4000");
    }

    #[test]
    fn the_quantile_bound_lies_above_the_quantile_with_room_for_few_samples() {
        // 1000 samples 1..=1000: p99 is 990; at δ = 0.1 % the bound keeps
        // at most a few samples above it, and p99 needs 688 samples at all.
        let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        for v in 1..=1000 {
            h.record(v).unwrap();
        }
        let c = quantile_upper_rank(1000, 0.99, 0.001).expect("rank");
        assert!(c < 5, "{c}");
        let t = quantile_upper_bound(&h, 0.99, 0.001).expect("bound");
        assert!((995..=1000).contains(&t), "{t}");
        assert_eq!(quantile_upper_rank(500, 0.99, 0.001), None);
        // p50 of the same: well above 500, well below 600.
        let t = quantile_upper_bound(&h, 0.5, 0.001).expect("bound");
        assert!((540..=600).contains(&t), "{t}");
        // Coverage by simulation: uniform samples of 0..10000 (p90 9000),
        // the bound at δ = 5 % is below 9000 in at most about 5 % of draws.
        let mut rng = xorshift(7);
        let misses = (0..2000)
            .filter(|_| {
                let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
                for _ in 0..300 {
                    h.record((rng() * 10_000.0) as u64).unwrap();
                }
                quantile_upper_bound(&h, 0.9, 0.05).is_some_and(|t| t < 9_000)
            })
            .count();
        assert!(misses <= 130, "{misses} of 2000");
    }

    fn xorshift(mut s: u64) -> impl FnMut() -> f64 {
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn valid_under_the_null_by_simulation() {
        // Null 1 %: 2000 runs of 300 batches of 100 requests.
        let mut rng = xorshift(12345);
        let mut crossed = 0;
        for _ in 0..2000 {
            let mut t = OneSample::at(0.01);
            let p = t.null_rate();
            for _ in 0..300 {
                let bad = (0..100).filter(|_| rng() < p).count() as u64;
                t.update(bad, 100);
                if t.e_value() >= 100.0 {
                    crossed += 1;
                    break;
                }
            }
        }
        assert!(crossed <= 20, "{crossed} of 2000 crossed 1/alpha = 100");
    }
}
