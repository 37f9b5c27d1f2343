//! The event-attribution e-process: is the canary over-represented among bad
//! events?
//!
//! # Method
//!
//! Lindon & Malek, "Anytime-Valid Inference for Multinomial Count Data"
//! (NeurIPS 2022); Netflix Tech Blog, "Sequential A/B Testing Keeps the World
//! Streaming Netflix", part 2 (2024). Under no regression each bad event
//! (an error, or a request slower than a threshold) comes from the canary
//! with probability `w`, the canary's routing share when it was routed,
//! whatever the traffic level or base rate. For relative risks `r_j` on a
//! fixed grid, the alternative is `θ_j = w·r_j / (w·r_j + 1 − w)`; each
//! event `x ∈ {0, 1}` (1 = canary) multiplies the likelihood ratio `L_j` by
//! `(θ_j/w₀)^x · ((1−θ_j)/(1−w₀))^(1−x)`. The mixture `E = mean_j L_j` is a
//! test martingale under the null (E₀ = 1, E ≥ 0, `E[E_t] = 1`), so by
//! Ville's inequality `P(sup_t E_t ≥ 1/α) ≤ α`: the judge may look after
//! every event, forever, and still reverts a good canary with probability at
//! most α.
//!
//! A margin `r₀ ≥ 1` tolerates harmless differences: the null becomes
//! "relative risk at most r₀" (`w₀ = w·r₀ / (w·r₀ + 1 − w)`) and only grid
//! points above `r₀` are used.
//!
//! Events arrive in batches (one per judge tick) with `w` fixed inside a
//! batch; the product over a batch does not depend on order, and evaluating
//! a martingale at batch ends keeps Ville's bound.
//!
//! # Paired events (mirrored requests)
//!
//! A mirrored request is seen by both versions: stable answers it and the
//! canary answers its copy. Each pair is a balanced experiment (`w = 1/2`)
//! whose two outcomes `X_c, X_s ∈ {0, 1}` (1 = bad) need not be independent.
//! With `a = θ_j/θ₀` and `b = (1−θ_j)/(1−θ₀)` the factors of one canary and
//! one stable event, a pair multiplies `L_j` by `a` (only the canary's copy
//! bad), `b` (only stable's), `a + b − 1` (both) or 1 (neither). Under the
//! null "the canary's bad rate is at most `r₀` × stable's" (`p_c ≤ r₀·p_s`,
//! on the same requests), with `z` the chance that both are bad:
//!
//! `E[factor] − 1 = (p_c − z)(a−1) + (p_s − z)(b−1) + z(a+b−2)
//!                = p_c(a−1) + p_s(b−1) ≤ p_s·(r₀(a−1) + b − 1) = 0`,
//!
//! because `a > 1` and, at `w = 1/2` where `θ₀ = r₀/(1+r₀)`,
//! `r₀(a−1) = 1−b` exactly. So `L_j` stays a test supermartingale whatever
//! the correlation between the versions' failures on one request. With no
//! margin (`r₀ = 1`) a pair where both failed weighs 1 and only discordant
//! pairs count (McNemar's test, made sequential); with a margin it weighs
//! `a + b − 1 < 1`, since "twice stable's errors" counts the shared ones too.
//! A request that fails on both (a client's bad request, a dependency both
//! call) is then no evidence against the canary, however often it repeats:
//! that is the pairing's gain over two independent samples.

/// Relative risks of the mixture grid.
pub const GRID: [f64; 9] = [1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0];

/// One running test.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EProcess {
    margin: f64,
    /// `(r_j, ln L_j)` for grid points above the margin.
    log_l: Vec<(f64, f64)>,
    canary_events: u64,
    stable_events: u64,
}

impl EProcess {
    /// A fresh test (E = 1) with margin `r₀` (1.0 = no margin).
    pub fn new(margin: f64) -> EProcess {
        let margin = if margin.is_finite() && margin >= 1.0 {
            margin
        } else {
            1.0
        };
        let mut log_l: Vec<(f64, f64)> = GRID
            .iter()
            .filter(|&&r| r > margin)
            .map(|&r| (r, 0.0))
            .collect();
        if log_l.is_empty() {
            log_l.push((margin * 2.0, 0.0));
        }
        EProcess {
            margin,
            log_l,
            canary_events: 0,
            stable_events: 0,
        }
    }

    /// What one canary event, one stable event and one pair with both bad
    /// (see the module docs; meaningful at `w = 1/2` only) add to each
    /// `ln L_j` at canary share `w` (None outside (0, 1), where events carry
    /// no information). The same for every test of one margin, so a
    /// [`Detector`] computes it once for all its components.
    fn steps(&self, w: f64) -> Option<Vec<Step>> {
        if !(w > 0.0 && w < 1.0) {
            return None;
        }
        let null = w * self.margin / (w * self.margin + 1.0 - w);
        Some(
            self.log_l
                .iter()
                .map(|(r, _)| {
                    let theta = w * *r / (w * *r + 1.0 - w);
                    let (a, b) = (theta / null, (1.0 - theta) / (1.0 - null));
                    Step {
                        up: a.ln(),
                        down: b.ln(),
                        both: (a + b - 1.0).max(f64::MIN_POSITIVE).ln(),
                    }
                })
                .collect(),
        )
    }

    fn update_with(&mut self, steps: &[Step], n: Counts) {
        for ((_, log_l), step) in self.log_l.iter_mut().zip(steps) {
            *log_l += step.apply(n);
        }
        self.canary_events += n.canary;
        self.stable_events += n.stable;
    }

    fn log_e_with(&self, steps: &[Step], n: Counts) -> f64 {
        log_mean_exp(
            self.log_l
                .iter()
                .zip(steps)
                .map(|((_, log_l), step)| log_l + step.apply(n)),
        )
    }

    /// Adds a batch of bad events routed at canary share `w` (0 < w < 1).
    /// Batches at `w` outside (0, 1) carry no information and are ignored.
    pub fn update(&mut self, w: f64, canary: u64, stable: u64) {
        if canary + stable == 0 {
            return;
        }
        if let Some(steps) = self.steps(w) {
            self.update_with(&steps, Counts::events(canary, stable));
        }
    }

    /// Adds a batch of mirrored pairs (see the module docs): `canary` with
    /// only the canary's copy bad, `stable` with only stable's, `both` with
    /// both. A pair is a balanced experiment, so no share is needed.
    pub fn update_pairs(&mut self, canary: u64, stable: u64, both: u64) {
        if let Some(steps) = self.steps(0.5) {
            self.update_with(
                &steps,
                Counts {
                    canary,
                    stable,
                    both,
                },
            );
        }
    }

    /// `ln E`, computed stably (log-sum-exp).
    pub fn log_e(&self) -> f64 {
        let max = self
            .log_l
            .iter()
            .map(|(_, l)| *l)
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = self.log_l.iter().map(|(_, l)| (l - max).exp()).sum();
        max + (sum / self.log_l.len() as f64).ln()
    }

    /// The e-value E.
    pub fn e_value(&self) -> f64 {
        self.log_e().exp()
    }

    /// Bad events attributed to the canary so far.
    pub fn canary_events(&self) -> u64 {
        self.canary_events
    }

    /// Bad events attributed to stable so far.
    pub fn stable_events(&self) -> u64 {
        self.stable_events
    }
}

/// What one event of each kind adds to one `ln L_j`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    up: f64,
    down: f64,
    both: f64,
}

impl Step {
    fn apply(self, n: Counts) -> f64 {
        let mut l = n.canary as f64 * self.up + n.stable as f64 * self.down;
        if n.both > 0 {
            l += n.both as f64 * self.both;
        }
        l
    }
}

/// A batch's events: the canary's, stable's, and (mirrored pairs only)
/// pairs where both were bad.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Canary events (pairs: only the canary's copy bad).
    pub canary: u64,
    /// Stable events (pairs: only stable's bad).
    pub stable: u64,
    /// Pairs where both were bad (0 for unpaired events).
    pub both: u64,
}

impl Counts {
    /// Unpaired events.
    pub fn events(canary: u64, stable: u64) -> Counts {
        Counts {
            canary,
            stable,
            both: 0,
        }
    }

    fn any(self) -> bool {
        self.canary + self.stable + self.both > 0
    }
}

/// `ln(mean(exp(x)))`, without overflow: the log of a uniform mixture of
/// likelihood ratios given their logs.
pub fn log_mean_exp(logs: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = logs.clone().fold(f64::NEG_INFINITY, f64::max);
    let (sum, n) = logs.fold((0.0, 0usize), |(s, n), l| (s + (l - max).exp(), n + 1));
    max + (sum / n.max(1) as f64).ln()
}

/// Expected number of bad events for the test to reach `1/alpha` against
/// relative risk `r` at share `w` (the reference's detection formula).
pub fn expected_events(w: f64, r: f64, alpha: f64) -> f64 {
    let theta = w * r / (w * r + 1.0 - w);
    let kl = theta * (theta / w).ln() + (1.0 - theta) * ((1.0 - theta) / (1.0 - w)).ln();
    ((1.0 / alpha).ln() + (GRID.len() as f64).ln()) / kl
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn starts_at_one() {
        assert!((EProcess::new(1.0).e_value() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn canary_heavy_events_grow_the_evidence_and_stable_ones_shrink_it() {
        let mut e = EProcess::new(1.0);
        e.update(0.05, 5, 0);
        assert!(e.e_value() > 200.0, "{}", e.e_value());
        let mut f = EProcess::new(1.0);
        f.update(0.05, 0, 100);
        assert!(f.e_value() < 1.0);
    }

    #[test]
    fn the_reference_example_needs_about_five_events() {
        // w = 5 %, stable 0.1 %, canary 5 %: r ≈ 50, alpha = 0.005 → ≈ 4.8 events.
        let n = expected_events(0.05, 50.0, 0.005);
        assert!((4.0..6.0).contains(&n), "{n}");
    }

    #[test]
    fn margin_makes_a_proportionate_canary_look_good() {
        let mut e = EProcess::new(2.0);
        // Canary at exactly twice its share: within the margin.
        for _ in 0..200 {
            e.update(0.1, 2, 9);
        }
        assert!(e.e_value() < 1.0);
    }

    /// Monte Carlo: under the null, E[E_t] = 1 and P(sup E ≥ 1/α) ≤ α.
    #[test]
    fn valid_under_the_null_by_simulation() {
        let mut rng = fastrand_like(7);
        let (runs, steps, w, alpha) = (4000, 300, 0.05, 0.05);
        let mut crossed = 0;
        let mut mean_final = 0.0;
        for _ in 0..runs {
            let mut e = EProcess::new(1.0);
            let mut hit = false;
            for _ in 0..steps {
                let canary = u64::from(rng() < w);
                e.update(w, canary, 1 - canary);
                hit |= e.e_value() >= 1.0 / alpha;
            }
            crossed += u32::from(hit);
            mean_final += e.e_value() / runs as f64;
        }
        let rate = f64::from(crossed) / f64::from(runs);
        assert!(rate <= alpha, "false alarm rate {rate}");
        assert!(
            mean_final < 1.0,
            "a long null run ends below 1 almost surely: {mean_final}"
        );

        // E[E_t] = 1: the sample mean is heavy-tailed, so check it after few
        // events, where its spread is small enough to see.
        let runs = 40_000;
        let mut mean = 0.0;
        for _ in 0..runs {
            let mut e = EProcess::new(1.0);
            for _ in 0..3 {
                let canary = u64::from(rng() < w);
                e.update(w, canary, 1 - canary);
            }
            mean += e.e_value() / f64::from(runs);
        }
        assert!((mean - 1.0).abs() < 0.15, "mean E after 3 events {mean}");
    }

    /// Mirrored pairs on the null's boundary, with failures strongly
    /// correlated between the versions (most of stable's failures fail the
    /// canary's copy too): the mean of E stays at most 1 and the crossing
    /// rate at most α, with and without a margin.
    #[test]
    fn paired_events_are_valid_under_the_null_whatever_the_correlation() {
        let mut rng = fastrand_like(11);
        for (r0, p_s, z) in [(1.0, 0.05, 0.04), (2.0, 0.05, 0.04), (2.0, 0.05, 0.0)] {
            // p_c = r0 · p_s: on the boundary.
            let p_c = r0 * p_s;
            let (runs, pairs, alpha) = (3000, 400, 0.05);
            let (mut crossed, mut mean) = (0u32, 0.0);
            for _ in 0..runs {
                let mut e = EProcess::new(r0);
                let mut hit = false;
                for _ in 0..pairs {
                    let u = rng();
                    // P(both) = z, P(canary only) = p_c - z, P(stable only) = p_s - z.
                    let (c, s, b) = if u < z {
                        (0, 0, 1)
                    } else if u < p_c {
                        (1, 0, 0)
                    } else if u < p_c + p_s - z {
                        (0, 1, 0)
                    } else {
                        (0, 0, 0)
                    };
                    e.update_pairs(c, s, b);
                    hit |= e.e_value() >= 1.0 / alpha;
                }
                crossed += u32::from(hit);
                mean += e.e_value() / f64::from(runs);
            }
            let rate = f64::from(crossed) / f64::from(runs);
            assert!(rate <= alpha, "r0 {r0} z {z}: false alarm rate {rate}");
            assert!(mean <= 1.1, "r0 {r0} z {z}: mean E {mean}");
        }
    }

    #[test]
    fn pairs_that_fail_on_both_are_no_evidence_and_discordant_ones_are() {
        let mut shared = EProcess::new(1.0);
        shared.update_pairs(0, 0, 1000);
        assert!(
            (shared.e_value() - 1.0).abs() < 1e-9,
            "{}",
            shared.e_value()
        );
        // With a margin, shared failures count toward stable's allowance.
        let mut margin = EProcess::new(2.0);
        margin.update_pairs(0, 0, 100);
        assert!(margin.e_value() < 1.0);
        // Only the canary's copies fail: a handful of pairs is enough.
        let mut bad = EProcess::new(1.0);
        bad.update_pairs(10, 0, 0);
        assert!(bad.e_value() > 100.0, "{}", bad.e_value());
    }

    fn fastrand_like(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed;
        move || {
            // splitmix64
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    proptest! {
        #[test]
        fn e_is_never_negative(w in 0.001f64..0.999, batches in proptest::collection::vec((0u64..50, 0u64..50), 0..40)) {
            let mut e = EProcess::new(1.0);
            for (c, s) in batches {
                e.update(w, c, s);
                prop_assert!(e.e_value() >= 0.0);
                prop_assert!(e.log_e().is_finite() || e.log_e() == f64::NEG_INFINITY);
            }
        }
    }
}

/// The share of a detector's prior weight held back for a test's key
/// rounds (see [`crate::limits`], "Key rounds"): a detector's own starts
/// sum to `1 − KEY_ROUNDS_SHARE`.
pub const KEY_ROUNDS_SHARE: f64 = 0.125;

/// Prior weight of the fresh start at batch `b`, for a coarse grid of `c`
/// batches (see [`Detector`]): `1/2` at `b = 0`; on every later batch
/// `(c+1) / (4 (b+c)(b+c+1))` (the fine grid); and on every `c`-th batch
/// `b = kc` another `1 / (4 (k+1)(k+2))` (the coarse grid). The fine
/// grid's weights telescope to `1/4`, the coarse grid's to `1/8`: all of
/// them sum to `1 − KEY_ROUNDS_SHARE`.
fn start_weight(b: u64, c: u64) -> f64 {
    if b == 0 {
        return 0.5;
    }
    let (bf, cf) = (b as f64, c as f64);
    let fine = (cf + 1.0) / (4.0 * (bf + cf) * (bf + cf + 1.0));
    let coarse = if b % c == 0 {
        let k = (b / c) as f64;
        2.0 * (0.25 - KEY_ROUNDS_SHARE) / ((k + 1.0) * (k + 2.0))
    } else {
        0.0
    };
    fine + coarse
}

/// Components whose weighted value falls below this are dropped.
const NEGLIGIBLE: f64 = 1e-12;
/// At most this many components are kept (the least valuable are dropped).
/// A regression is caught by the starts near its onset, whose value grows;
/// the ones dropped are old fine starts that healthy data has sunk. (Every
/// look evaluates every component, so this bounds the judge's work per
/// route.)
const MAX_COMPONENTS: usize = 32;

/// A test martingale fed in batches of two counts, that a [`Detector`]
/// can start afresh: the event-attribution [`EProcess`] (canary and stable
/// bad events at share `w`) and the one-sample
/// [`crate::onesample::OneSample`] (bad and good canary requests).
pub trait Component: Clone + PartialEq {
    /// What one batch adds, computed once per batch for every component
    /// of a detector (None: the batch carries no information).
    type Steps;
    /// The steps of a batch routed at canary share `w`.
    fn steps(&self, w: f64) -> Option<Self::Steps>;
    /// Adds a batch of counts.
    fn update_with(&mut self, steps: &Self::Steps, n: Counts);
    /// `ln E` after such a batch, without changing anything.
    fn log_e_with(&self, steps: &Self::Steps, n: Counts) -> f64;
    /// The e-value now.
    fn e_value(&self) -> f64;
    /// `(r_j, ln L_j)` of each grid point: E is the mean of the `L_j`.
    fn grid(&self) -> &[(f64, f64)];
    /// What such a batch adds to each `ln L_j` (the same for every copy of
    /// one template).
    fn deltas(&self, steps: &Self::Steps, n: Counts) -> Vec<f64>;
}

impl Component for EProcess {
    type Steps = Vec<Step>;
    fn steps(&self, w: f64) -> Option<Vec<Step>> {
        EProcess::steps(self, w)
    }
    fn update_with(&mut self, steps: &Vec<Step>, n: Counts) {
        EProcess::update_with(self, steps, n);
    }
    fn log_e_with(&self, steps: &Vec<Step>, n: Counts) -> f64 {
        EProcess::log_e_with(self, steps, n)
    }
    fn e_value(&self) -> f64 {
        EProcess::e_value(self)
    }
    fn grid(&self) -> &[(f64, f64)] {
        &self.log_l
    }
    fn deltas(&self, steps: &Vec<Step>, n: Counts) -> Vec<f64> {
        steps.iter().map(|s| s.apply(n)).collect()
    }
}

/// An e-process that stays quick to detect a regression that starts late.
///
/// # Why
///
/// A single test started with the canary sinks while the canary is as good
/// as the null allows (its log-evidence drifts down by the null's KL rate),
/// so a regression that begins an hour in must first climb out of that hole.
///
/// # Method
///
/// A mixture over start times (an e-detector in the sense of Shin, Ramdas
/// & Rinaldo, "E-detectors", 2023, with prior weights rather than a
/// horizon): a fresh component (a copy of the template) starts on every
/// batch. Each component is a test martingale (1 before its start), the
/// weights sum to at most 1, so the weighted sum is a test martingale and
/// Ville's inequality still bounds the probability of ever reaching `1/α`
/// by α, over the whole rollout, with no horizon. Dropping a component
/// only lowers the sum, so components whose weighted value is negligible
/// are dropped to bound memory, and fresh starts that have seen no event
/// yet are one component (they are equal, so their weights add).
///
/// The weights: half on the first batch (a canary bad from its first
/// request, the usual case), a quarter spread over every batch with a
/// density that falls as `c/(t+c)²` (`c` = `restart_every` batches, 30 s in
/// the judge), and an eighth on every `c`-th batch, the `k`-th with
/// `1/(4(k+1)(k+2))`; the last eighth ([`KEY_ROUNDS_SHARE`]) is left to
/// the test's key rounds (session 16; a quarter on the coarse grid before).
/// The price of a start is `ln(1/π)` nats of evidence.
/// A regression that begins between coarse starts either waits for the
/// next one or uses the fine start at its onset. With a coarse grid alone
/// (the detector until session 12), in `judge-sim` every request 3x
/// slower, beginning at a moment spread over 90-119 s, was caught in a
/// median of 6.0 s (p95 11.1); with both grids 3.7 s (p95 7.9), and 0.1 %
/// -> 5 % errors 4.7 -> 3.4 s. Fine starts cost more nats each (7.5 nats
/// 90 s in, 14 an hour in, against 3.7 and 10 for a coarse start the onset
/// happens to meet), which a strong regression earns in a second or two;
/// a weak one gathers evidence slowly and pays little for waiting, and
/// loses a few percent to the coarse grid's smaller share (0.1 -> 0.5 %
/// errors 158 -> 164 s).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Detector<C = EProcess> {
    template: C,
    restart_every: u64,
    batches: u64,
    started: u64,
    components: Vec<(f64, C)>,
    canary_events: u64,
    stable_events: u64,
    /// The components summed per grid point, for looks (derived from
    /// `components`: not saved, rebuilt by the next update).
    #[serde(skip)]
    agg: Option<Aggregate>,
}

/// `Σ_c π_c·L_{c,j}` per grid point `j`, as `e^shift · sums[j]` (so that
/// large evidence does not overflow). Every component has the template's
/// grid and a batch adds the same `δ_j` to every component's `ln L_j`, so
/// the detector after a batch is `Σ_j e^{δ_j}·Σ_c π_c L_{c,j} / J`: a look
/// costs `J` exponentials rather than one per grid point of every
/// component.
#[derive(Clone, Debug)]
struct Aggregate {
    shift: f64,
    sums: Vec<f64>,
    /// The component the next fresh start replaces (see
    /// [`Detector::evictee`]), left out of the sums.
    evict: Option<usize>,
}

/// Derived data: two detectors are equal when their components are.
impl PartialEq for Aggregate {
    fn eq(&self, _: &Aggregate) -> bool {
        true
    }
}

impl Aggregate {
    fn of<C: Component>(components: &[(f64, C)], points: usize, evict: Option<usize>) -> Aggregate {
        let components = components
            .iter()
            .enumerate()
            .filter(move |(i, _)| Some(*i) != evict)
            .map(|(_, c)| c);
        let shift = components
            .clone()
            .flat_map(|(pi, e)| e.grid().iter().map(move |(_, l)| pi.ln() + l))
            .fold(f64::NEG_INFINITY, f64::max);
        let shift = if shift.is_finite() { shift } else { 0.0 };
        let mut sums = vec![0.0; points];
        for (pi, e) in components {
            for (s, (_, l)) in sums.iter_mut().zip(e.grid()) {
                *s += (pi.ln() + l - shift).exp();
            }
        }
        Aggregate { shift, sums, evict }
    }
}

impl Detector<EProcess> {
    /// Adds a batch of mirrored pairs (see [`EProcess::update_pairs`]):
    /// `canary` pairs with only the canary's copy bad, `stable` with only
    /// stable's, `both` with both. Canary and stable events count the
    /// discordant pairs.
    pub fn update_pairs(&mut self, canary: u64, stable: u64, both: u64) {
        self.update_counts(
            0.5,
            Counts {
                canary,
                stable,
                both,
            },
        );
    }

    /// An attribution detector with margin `r₀`, starting a component every
    /// `restart_every` batches.
    pub fn new(margin: f64, restart_every: u64) -> Detector {
        Detector::with(EProcess::new(margin), restart_every)
    }
}

impl<C: Component> Detector<C> {
    /// A detector of fresh copies of `template` (which must be at E = 1),
    /// on a coarse grid of `restart_every` batches.
    pub fn with(template: C, restart_every: u64) -> Detector<C> {
        Detector {
            components: vec![(start_weight(0, 1), template.clone())],
            template,
            restart_every: restart_every.max(1),
            batches: 0,
            started: 1,
            canary_events: 0,
            stable_events: 0,
            agg: None,
        }
    }

    /// A fresh detector of the same template and grid (E = 1).
    pub fn restarted(&self) -> Detector<C> {
        Detector::with(self.template.clone(), self.restart_every)
    }

    /// Adds a batch (see [`EProcess::update`]; for a one-sample component,
    /// `canary` bad and `stable` good requests).
    pub fn update(&mut self, w: f64, canary: u64, stable: u64) {
        self.update_counts(w, Counts::events(canary, stable));
    }

    /// Adds a batch of counts at share `w`.
    fn update_counts(&mut self, w: f64, n: Counts) {
        if self.batches > 0 {
            let pi = start_weight(self.batches, self.restart_every);
            match self.fresh() {
                Some(i) => self.components[i].0 += pi,
                None => {
                    let evict = match &self.agg {
                        Some(a) => a.evict,
                        None => self.evictee(),
                    };
                    if let Some(i) = evict {
                        self.components.remove(i);
                    }
                    self.components.push((pi, self.template.clone()));
                }
            }
            self.started += 1;
        }
        self.batches += 1;
        let steps = self.template.steps(w);
        if let Some(steps) = &steps {
            if n.any() {
                for (_, e) in &mut self.components {
                    e.update_with(steps, n);
                }
            }
            self.canary_events += n.canary;
            self.stable_events += n.stable;
        }
        let mut values: Vec<f64> = self
            .components
            .iter()
            .map(|(pi, e)| pi * e.e_value())
            .collect();
        let mut i = 0;
        self.components.retain(|_| {
            i += 1;
            values[i - 1] >= NEGLIGIBLE
        });
        values.retain(|v| *v >= NEGLIGIBLE);
        // What a look adds the next batch to: the components but the one
        // the next fresh start will replace.
        self.agg = Some(Aggregate::of(
            &self.components,
            self.template.grid().len(),
            self.evictee_of(&values),
        ));
    }

    /// The component the next batch's fresh start replaces: the least
    /// valuable, when the detector is at its cap and the start will not
    /// join a fresh component.
    fn evictee(&self) -> Option<usize> {
        let values: Vec<f64> = self
            .components
            .iter()
            .map(|(pi, e)| pi * e.e_value())
            .collect();
        self.evictee_of(&values)
    }

    /// [`Detector::evictee`], given each component's weighted value.
    fn evictee_of(&self, values: &[f64]) -> Option<usize> {
        if self.components.len() < MAX_COMPONENTS || self.fresh().is_some() {
            return None;
        }
        values
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    }

    /// The component that has seen no event since it started, if any (all
    /// such starts are one component).
    fn fresh(&self) -> Option<usize> {
        self.components
            .iter()
            .position(|(_, e)| *e == self.template)
    }

    /// The e-value as it would be after [`Detector::update`] with this
    /// batch, without changing anything (a look between batches): the same
    /// fresh start, replacing the same least valuable component when the
    /// detector is at its cap. It counts the components
    /// that the update will then drop as negligible (each worth less than
    /// `1e-12`); a look costs a few exponentials per grid point (see
    /// the private `Aggregate`).
    pub fn e_value_after(&self, w: f64, canary: u64, stable: u64) -> f64 {
        self.e_value_after_counts(w, Counts::events(canary, stable))
    }

    /// [`Detector::e_value_after`] for a batch of any counts (mirrored
    /// pairs: at `w = 1/2`).
    pub fn e_value_after_counts(&self, w: f64, n: Counts) -> f64 {
        let steps = self.template.steps(w).filter(|_| n.any());
        // The fresh start this batch makes has `ln L_j = 0`.
        let pi = match self.batches {
            0 => 0.0,
            b => start_weight(b, self.restart_every),
        };
        let points = self.template.grid().len();
        let rebuilt;
        let agg = match &self.agg {
            Some(a) => a,
            None => {
                rebuilt = Aggregate::of(&self.components, points, self.evictee());
                &rebuilt
            }
        };
        let evict = agg.evict;
        if points > 0 {
            // A batch without information adds nothing to any `ln L_j`.
            let deltas = match &steps {
                Some(steps) => self.template.deltas(steps, n),
                None => vec![0.0; points],
            };
            let sum: f64 = deltas
                .iter()
                .zip(&agg.sums)
                .map(|(d, s)| (d + agg.shift).exp() * s + pi * d.exp())
                .sum();
            return sum / points as f64;
        }
        let value = |e: &C| match &steps {
            Some(steps) => e.log_e_with(steps, n).exp(),
            None => e.e_value(),
        };
        let fresh = self.fresh();
        let fresh_start = (self.batches > 0 && fresh.is_none()).then(|| pi * value(&self.template));
        self.components
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != evict)
            .map(|(i, (w, e))| match fresh {
                Some(f) if f == i => (w + pi) * value(e),
                _ => w * value(e),
            })
            .chain(fresh_start)
            .filter(|v| *v >= NEGLIGIBLE)
            .sum()
    }

    /// The e-value: the weighted sum of the components.
    pub fn e_value(&self) -> f64 {
        self.components.iter().map(|(pi, e)| pi * e.e_value()).sum()
    }

    /// Bad events attributed to the canary since the detector began (for a
    /// one-sample component: bad canary requests).
    pub fn canary_events(&self) -> u64 {
        self.canary_events
    }

    /// Bad events attributed to stable since the detector began (for a
    /// one-sample component: good canary requests).
    pub fn stable_events(&self) -> u64 {
        self.stable_events
    }
}

#[cfg(test)]
mod detector_tests {
    use super::*;

    #[test]
    fn a_late_regression_is_caught_about_as_fast_as_an_early_one() {
        // w = 5 %: null events are 1 canary in 20; a regression makes it 14 in 20.
        let run = |healthy: u32| {
            let mut d = Detector::new(1.0, 60);
            for t in 0..healthy {
                let c = u64::from(t % 20 == 0);
                d.update(0.05, c, 1 - c);
            }
            let mut n = 0;
            while d.e_value() < 200.0 && n < 10_000 {
                d.update(0.05, 2, 1);
                n += 1;
            }
            n
        };
        let early = run(0);
        let late = run(3600);
        assert!(early <= 3, "{early}");
        assert!(late <= early + 4, "late {late} vs early {early}");
        // A single e-process started at 0 would need far longer after an hour.
        let mut single = EProcess::new(1.0);
        for t in 0..3600u32 {
            let c = u64::from(t % 20 == 0);
            single.update(0.05, c, 1 - c);
        }
        let mut n = 0;
        while single.e_value() < 200.0 && n < 10_000 {
            single.update(0.05, 2, 1);
            n += 1;
        }
        assert!(n > late * 3, "single {n} vs detector {late}");
    }

    #[test]
    fn a_regression_between_coarse_starts_does_not_wait_for_the_next_one() {
        // w = 5 %, 20 bad events a batch: healthy, 1 on the canary; then
        // a regression of relative risk ~13, 8 on the canary. The coarse
        // grid is 30 batches; the onset falls on it, or 1, 20 or 29
        // batches past it.
        let batches_to_catch = |onset: u32| {
            let mut d = Detector::new(1.0, 30);
            for _ in 0..onset {
                d.update(0.05, 1, 19);
            }
            let mut n = 0;
            while d.e_value() < 400.0 && n < 1000 {
                d.update(0.05, 8, 12);
                n += 1;
            }
            n
        };
        let aligned = batches_to_catch(90);
        assert!(aligned <= 4, "{aligned}");
        for onset in [91, 100, 110] {
            let n = batches_to_catch(onset);
            // A coarse grid alone would wait for batch 120: 10 or more.
            assert!(n <= aligned + 2, "onset {onset}: {n} vs {aligned}");
        }
    }

    #[test]
    fn the_start_weights_sum_to_all_but_the_key_rounds_share() {
        for c in [1, 30, 300] {
            let sum: f64 = (0..10_000_000).map(|b| start_weight(b, c)).sum();
            let all = 1.0 - KEY_ROUNDS_SHARE;
            assert!(sum <= all && sum > all - 0.01, "c = {c}: {sum}");
        }
    }

    #[test]
    fn valid_under_the_null_by_simulation() {
        let mut s = 99u64;
        let mut rng = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let (runs, w, alpha) = (400, 0.1, 0.05);
        let mut crossed = 0;
        for _ in 0..runs {
            let mut d = Detector::new(1.0, 10);
            for _ in 0..300 {
                let c = u64::from(rng() < w);
                d.update(w, c, 1 - c);
                if d.e_value() >= 1.0 / alpha {
                    crossed += 1;
                    break;
                }
            }
        }
        assert!(
            f64::from(crossed) / f64::from(runs) <= alpha,
            "{crossed} of {runs}"
        );
    }

    proptest::proptest! {
        /// A look between batches sees exactly what the batch would make
        /// of the detector, at and between fresh starts, with or without
        /// events, and changes nothing.
        #[test]
        fn a_look_is_the_update_it_announces(
            w in 0.005f64..0.5,
            margin in 1.0f64..2.0,
            batches in proptest::collection::vec((0u64..6, 0u64..30), 1..40),
            look in (0u64..6, 0u64..30),
        ) {
            let mut d = Detector::new(margin, 4);
            for (c, s) in batches {
                d.update(w, c, s);
            }
            let before = d.clone();
            let seen = d.e_value_after(w, look.0, look.1);
            proptest::prop_assert_eq!(&d, &before);
            d.update(w, look.0, look.1);
            let after = d.e_value();
            // Up to the components the update drops as negligible.
            let slack = 1e-9 * after + MAX_COMPONENTS as f64 * NEGLIGIBLE;
            proptest::prop_assert!((seen - after).abs() <= slack, "{} vs {}", seen, after);
        }
    }
}
