//! The one-sample sequential test of blue-green: is the new colour's rate of
//! bad requests higher than the old colour's was before the flip?
//!
//! # Method
//!
//! After a flip there is no concurrent baseline, so each request of the new
//! colour is a coin with null probability `p₀·r₀` of being bad, `p₀` being
//! the old colour's rate over the window before the flip (smoothed as
//! `(bad + 1) / (requests + 2)`, so an error-free baseline does not make one
//! error infinite evidence) and `r₀` the margin. For relative risks `r_j`
//! on the same grid as [`crate::eprocess`] (those with `p₀·r_j < 1`), each
//! batch of `n` requests with `k` bad multiplies `L_j` by
//! `r_j^k · ((1 − p₀r_j)/(1 − p₀))^(n−k)`; the mean of the `L_j` is a test
//! martingale under the null (Ville's inequality bounds its crossing
//! probability by α). This is the Bernoulli case of the mixture sequential
//! probability ratio test (Johari, Pekelis & Walsh, "Always Valid
//! Inference").
//!
//! Caveat: requests of one sticky user are not independent coins. A
//! heavy user who always fails was part of the baseline too, so the test is
//! unbiased, but its variance is larger than assumed.

use crate::eprocess::{log_mean_exp, GRID};

/// One running one-sample test.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OneSample {
    null: f64,
    log_l: Vec<(f64, f64)>,
    bad: u64,
    requests: u64,
}

impl OneSample {
    /// A test against a baseline of `bad` out of `requests`, with margin `r₀`.
    pub fn new(bad: u64, requests: u64, margin: f64) -> OneSample {
        let p0 = (bad as f64 + 1.0) / (requests as f64 + 2.0);
        let null = (p0 * margin.max(1.0)).min(0.999);
        let log_l = GRID
            .iter()
            .filter(|&&r| null * r < 1.0)
            .map(|&r| (r, 0.0))
            .collect();
        OneSample {
            null,
            log_l,
            bad: 0,
            requests: 0,
        }
    }

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
    fn update_with(&mut self, _: &(), bad: u64, good: u64) {
        self.update(bad, bad + good);
    }
    fn log_e_with(&self, _: &(), bad: u64, good: u64) -> f64 {
        if self.log_l.is_empty() {
            return 0.0;
        }
        log_mean_exp(self.log_l_after(bad, bad + good))
    }
    fn e_value(&self) -> f64 {
        OneSample::e_value(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_rate_stays_low_and_a_worse_one_grows() {
        let mut same = OneSample::new(10, 10_000, 1.0);
        let mut worse = OneSample::new(10, 10_000, 1.0);
        for _ in 0..60 {
            same.update(1, 1000);
            worse.update(20, 1000);
        }
        assert!(same.e_value() < 10.0, "{}", same.e_value());
        assert!(worse.e_value() > 1e6, "{}", worse.e_value());
    }

    #[test]
    fn an_error_free_baseline_does_not_make_one_error_a_revert() {
        let mut t = OneSample::new(0, 5_000, 1.0);
        t.update(1, 1000);
        assert!(t.e_value() < 200.0, "{}", t.e_value());
    }

    #[test]
    fn valid_under_the_null_by_simulation() {
        // Baseline 1 %: 2000 runs of 300 batches of 100 requests.
        let mut s = 12345u64;
        let mut rng = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut crossed = 0;
        for _ in 0..2000 {
            let mut t = OneSample::new(100, 10_000, 1.0);
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
