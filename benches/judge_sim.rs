//! Judge simulator: the real judge (`veer_control::judge`, with the real
//! distinct-key filter) on synthetic per-tick request streams.
//!
//! Run: `cargo run --release -p veer-benches --bin judge-sim` (about 30
//! minutes on two cores; `--runs N` and `--detect-runs N` change the sizes,
//! `--scenario N` and `--onset S` pick one row of table (b),
//! `--interval-ms N` shortens the judge interval, `--look-ms N` sets the
//! look between ticks (0: none), `--aa-uniform` gives table (a) users of
//! equal activity, `--show-reverts` prints each A/A revert's reason,
//! `--iid-null N` (with `--iid-rate R`) runs the e-detector alone on i.i.d.
//! events as the reference for table (a); `--replicas 1,2,4,8,16` runs
//! only table (d), a fleet pooling its evidence, see `judge_sim_fleet.rs`);
//! `--no-key-rounds` leaves the tests' key rounds out, as before session 16
//! (the proxy's rule for ending a round is modelled, addresses are not),
//! `--show-rounds` prints how many rounds each A/A rollout's kinds ended.
//!
//! It prints two tables:
//!
//! (a) **A/A false reverts**: one-hour rollouts at 1000 req/s where canary
//!     and stable are the same version, with heavy-tailed latency (log-normal
//!     body, 1 % Pareto tail), two error bursts an hour hitting both versions,
//!     weight steps (1 % → 5 % → 10 %), and heterogeneous sticky users (Zipf
//!     activity over 200 000 users, three heavy users who fail every
//!     request). The share of rollouts the judge would have reverted, with a
//!     95 % Clopper–Pearson upper bound, must stay within `false_revert_rate`.
//! (b) **Detection delay**: weight 5 %, 1000 req/s, stable at 0.1 % errors,
//!     200 000 users of equal activity, for error-rate and latency
//!     regressions of the canary: once bad from its first request, once
//!     turning bad 90-119 s in. Every row also shows an oracle SPRT on the
//!     same events, told the onset and the true alternative, for what the
//!     data allow at all; late-onset rows a window oracle besides, told the
//!     alternative and the onset's 30 s window but not the onset (see
//!     `WINDOW_STARTS`): what a test that is not told the onset can reach.
//!
//! Method: each step of 100 ms (the proxy's look between ticks) draws the
//! request count, the canary's share of it, the per-version counts of
//! errors and of requests slower than the judge's current thresholds
//! (binomial, from the latency distributions' survival functions), and a
//! key for every bad event (a user drawn by activity among that version's
//! users, users being assigned to versions by the hash of their key, as the
//! proxy does). After each step the judge looks, as the proxy's controller
//! does, and ticks early when its sequential tests have crossed; otherwise
//! it ticks at the end of its interval (1 s). Window latency histograms are
//! fed from 64 sampled latencies per version and tick, weighted to the
//! request counts; thresholds therefore come from estimated stable
//! quantiles, as in the proxy. Only the judge's
//! statistical layers and its failure-burst guard are active (no absolute
//! limits are configured), so table (a) measures exactly what the
//! `false_revert_rate` bound promises.

// A tool run from outside, timing real work: the wall clock is what it
// measures (clippy.toml bans it in the proxy's own code).
#![allow(clippy::disallowed_methods)]

#[path = "args.rs"]
mod args;
#[path = "judge_sim_fleet.rs"]
mod fleet;
#[path = "judge_sim_mirror.rs"]
mod mirror;
use args::{arg, str_arg};

use std::cell::Cell;
use std::time::{Duration, Instant};

use veer_control::config::JudgeSettings;
use veer_control::eprocess::Detector;
use veer_control::judge::{Judge, Pending, Status, TickInput, VersionTick};
use veer_control::keyfilter::{KeyFilter, SHORT_BITS};
use veer_control::limits::Limit;

const USERS: usize = 200_000;
const HOUR: u32 = 3600;
const BASE_ERRORS: f64 = 0.001;
const SAMPLES: u64 = 64;
/// Onsets of table (b): seconds of a healthy canary before its regression
/// starts. 0 is the usual case (the new version is bad from its first
/// request); 90 s is a version that turns bad later, 90-119 s in (spread
/// evenly over the runs: a regression does not line up with the detector's
/// fresh starts; until session 12 every run began at 90 s, on a coarse
/// start, which flattered the judge).
const ONSETS: [u32; 2] = [0, 90];

/// Latency model, in microseconds.
#[derive(Clone, Copy, Debug)]
enum Latency {
    /// Log-normal body (median 20 ms, σ 0.6) with a 1 % Pareto tail (from 100 ms, α 1.5).
    Base,
    /// Every request `factor` times slower.
    Scaled(f64),
    /// `share` of requests take `extra_us` longer.
    Extra { share: f64, extra_us: f64 },
    /// Requests slower than `above_us` take `factor` times longer: with
    /// `above_us` the base p98, every quantile above p98 (p99 among them)
    /// is `factor` times higher.
    TailScaled { above_us: f64, factor: f64 },
}

const MEDIAN_US: f64 = 20_000.0;
const SIGMA: f64 = 0.6;
const TAIL: f64 = 0.01;
const TAIL_XM_US: f64 = 100_000.0;
const TAIL_ALPHA: f64 = 1.5;

fn erfc(x: f64) -> f64 {
    // Abramowitz & Stegun 7.1.26 on |x|; absolute error below 1.5e-7.
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let r = poly * (-z * z).exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// P(latency > t) of the base model.
fn base_survival(t: f64) -> f64 {
    if t <= 0.0 {
        return 1.0;
    }
    let ln = 0.5 * erfc((t.ln() - MEDIAN_US.ln()) / (SIGMA * std::f64::consts::SQRT_2));
    let tail = if t <= TAIL_XM_US {
        1.0
    } else {
        (TAIL_XM_US / t).powf(TAIL_ALPHA)
    };
    (1.0 - TAIL) * ln + TAIL * tail
}

/// The base model's `p` quantile, by bisection on its survival function.
fn base_quantile(p: f64) -> f64 {
    let (mut lo, mut hi) = (1.0f64, 3.0e9f64);
    for _ in 0..200 {
        let mid = (lo * hi).sqrt();
        if base_survival(mid) > 1.0 - p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

impl Latency {
    fn survival(self, t: f64) -> f64 {
        match self {
            Latency::Base => base_survival(t),
            Latency::Scaled(f) => base_survival(t / f),
            Latency::Extra { share, extra_us } => {
                (1.0 - share) * base_survival(t) + share * base_survival(t - extra_us)
            }
            Latency::TailScaled { above_us, factor } => {
                (base_survival(t) - base_survival(above_us)).max(0.0)
                    + base_survival(above_us.max(t / factor))
            }
        }
    }

    fn sample(self, rng: &mut fastrand::Rng) -> f64 {
        let base = if rng.f64() < TAIL {
            TAIL_XM_US / (1.0 - rng.f64()).powf(1.0 / TAIL_ALPHA)
        } else {
            MEDIAN_US * (SIGMA * normal(rng)).exp()
        };
        let v = match self {
            Latency::Base => base,
            Latency::Scaled(f) => base * f,
            Latency::Extra { share, extra_us } => {
                base + if rng.f64() < share { extra_us } else { 0.0 }
            }
            Latency::TailScaled { above_us, factor } => {
                base * if base > above_us { factor } else { 1.0 }
            }
        };
        v.clamp(1.0, 3.0e9)
    }
}

fn normal(rng: &mut fastrand::Rng) -> f64 {
    let (u1, u2) = (rng.f64().max(1e-300), rng.f64());
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn poisson(rng: &mut fastrand::Rng, mean: f64) -> u64 {
    if mean <= 0.0 {
        return 0;
    }
    if mean > 50.0 {
        return (mean + mean.sqrt() * normal(rng)).round().max(0.0) as u64;
    }
    let limit = (-mean).exp();
    let (mut k, mut p) = (0u64, 1.0);
    loop {
        p *= rng.f64();
        if p <= limit {
            return k;
        }
        k += 1;
    }
}

/// How many of `n` requests, each bad with probability `p`, are bad.
///
/// Binomial, not Poisson: the canary's bad events in a tick must vary as
/// much as independent requests make them vary and no more. A Poisson
/// count given the tick's request count over-disperses common events (half
/// the requests are slower than p50), which makes the canary's share of
/// them clump from tick to tick and breaks the very independence the judge
/// relies on: an earlier version of this simulator did that and reported
/// latency-test false reverts at twice their bound.
fn binomial(rng: &mut fastrand::Rng, n: u64, p: f64) -> u64 {
    let p = p.clamp(0.0, 1.0);
    if p > 0.5 {
        return n - binomial(rng, n, 1.0 - p);
    }
    let mean = n as f64 * p;
    let var = mean * (1.0 - p);
    if p < 0.01 {
        // Rare events: Poisson's variance is the binomial's to within 1 %.
        poisson(rng, mean).min(n)
    } else if var >= 30.0 {
        (mean + var.sqrt() * normal(rng))
            .round()
            .clamp(0.0, n as f64) as u64
    } else {
        // Here n < 30 / (p (1 - p)) ≤ 3 031.
        (0..n).filter(|_| rng.f64() < p).count() as u64
    }
}

/// Users with Zipf(1.1) or equal activity; a run assigns them keys and so
/// versions.
struct Population {
    cdf: Vec<f64>,
}

impl Population {
    fn new(zipf: bool) -> Population {
        let mut cdf = Vec::with_capacity(USERS);
        let mut acc = 0.0;
        for i in 0..USERS {
            acc += if zipf {
                1.0 / ((i + 1) as f64).powf(1.1)
            } else {
                1.0
            };
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Population { cdf }
    }

    /// Activity share of user `i`.
    fn share(&self, i: usize) -> f64 {
        self.cdf[i] - if i == 0 { 0.0 } else { self.cdf[i - 1] }
    }
}

fn key_hash(user: usize, seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(&(user as u64).to_le_bytes(), seed)
}

fn on_canary(hash: u64, w_bp: u16) -> bool {
    ((hash % 10_000) as u16) < w_bp
}

/// One version's users under one weight: their key hashes and cumulative
/// activity, to draw a user of the version by activity in one search.
struct Side {
    hashes: Vec<u64>,
    cdf: Vec<f64>,
}

impl Side {
    fn draw(&self, rng: &mut fastrand::Rng) -> Option<u64> {
        let total = *self.cdf.last()?;
        let u = rng.f64() * total;
        let i = self.cdf.partition_point(|&c| c < u);
        self.hashes.get(i.min(self.hashes.len() - 1)).copied()
    }
}

/// The run's users split by version at each of its weights: `[stable,
/// canary]` per weight, and the canary's real share of traffic (the
/// activity of the users whose keys hash below the weight, not the weight
/// itself).
struct Split {
    sides: Vec<[Side; 2]>,
    traffic_share: Vec<f64>,
}

impl Split {
    fn new(pop: &Population, seed: u64, weights: &[u16]) -> Split {
        Split::of(pop, seed, weights, |_| true)
    }

    /// The split of the users whose key hash `keep` accepts (a replica's,
    /// behind a sticky balancer); `traffic_share` stays the canary's share
    /// of all users' activity (see [`Split::activity`] for theirs).
    fn of(pop: &Population, seed: u64, weights: &[u16], keep: impl Fn(u64) -> bool) -> Split {
        let mut sides: Vec<[Side; 2]> = weights
            .iter()
            .map(|_| {
                std::array::from_fn(|_| Side {
                    hashes: Vec::new(),
                    cdf: Vec::new(),
                })
            })
            .collect();
        for u in 0..USERS {
            let h = key_hash(u, seed);
            if !keep(h) {
                continue;
            }
            for (i, w) in weights.iter().enumerate() {
                if let Some(side) = sides
                    .get_mut(i)
                    .and_then(|s| s.get_mut(usize::from(on_canary(h, *w))))
                {
                    let acc = side.cdf.last().copied().unwrap_or(0.0) + pop.share(u);
                    side.hashes.push(h);
                    side.cdf.push(acc);
                }
            }
        }
        let traffic_share = sides
            .iter()
            .map(|[_, c]| c.cdf.last().copied().unwrap_or(0.0))
            .collect();
        Split {
            sides,
            traffic_share,
        }
    }

    /// The activity of the split's users (1 for all users) at weight
    /// index `i`: (stable's, the canary's).
    fn activity(&self, i: usize) -> (f64, f64) {
        let total = |s: &Side| s.cdf.last().copied().unwrap_or(0.0);
        self.sides
            .get(i)
            .map_or((0.0, 0.0), |[s, c]| (total(s), total(c)))
    }

    /// A user of the version at weight index `i`, by activity.
    fn draw(&self, i: usize, canary: bool, rng: &mut fastrand::Rng) -> Option<u64> {
        self.sides.get(i)?.get(usize::from(canary))?.draw(rng)
    }
}

/// Which test's events the oracle SPRT of a detection row watches.
#[derive(Clone, Copy, PartialEq)]
enum Oracle {
    /// The error-rate ratio (or default error) test.
    Errors,
    /// The latency ratio test of this recorder slot.
    Slot(usize),
    /// The absolute latency limit of this slot: a one-sample SPRT on the
    /// canary's requests over the limit, the leg that bounds how fast the
    /// judge's test can be (its e-value is the smaller of its two legs).
    Above(usize),
}

#[derive(Clone, Copy)]
struct Scenario {
    name: &'static str,
    canary_errors: f64,
    canary_latency: Latency,
    /// An A/A-style rollout (weight steps, bursts, failing users, load
    /// drift, a slow start): the canary differs from stable only by
    /// `canary_errors / BASE_ERRORS` and `canary_latency`, all along.
    aa: bool,
    oracle: Oracle,
}

/// The judge settings users run: the first route's `[route.judge]` of
/// `config.example.toml` (read from the file, so the two cannot drift), or
/// of `--settings FILE`. `--interval-ms N` overrides the interval (and the
/// simulated tick).
fn settings() -> JudgeSettings {
    static SETTINGS: std::sync::OnceLock<JudgeSettings> = std::sync::OnceLock::new();
    SETTINGS
        .get_or_init(|| {
            let path = str_arg("--settings").map_or_else(
                || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.example.toml"),
                std::path::PathBuf::from,
            );
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let base = path.parent().unwrap_or(std::path::Path::new("."));
            let config = veer_control::config::Config::parse(&text, base)
                .unwrap_or_else(|e| panic!("{}", e.render(&path)));
            let mut s = config
                .routes
                .first()
                .map(|r| r.judge.clone())
                .unwrap_or_default();
            if let Some(ms) = str_arg("--interval-ms").and_then(|v| v.parse().ok()) {
                s.interval = Duration::from_millis(ms);
            }
            s
        })
        .clone()
}

/// The judge interval in ms.
fn interval_ms() -> u64 {
    (settings().interval.as_millis() as u64).clamp(1, 1000)
}

/// Ticks per second of simulated time.
fn ticks_per_second() -> u32 {
    (1000 / interval_ms()) as u32
}

/// An A/A rollout's extras: three heavy users who fail every request, two
/// error bursts, and its weights (detection runs: none, and 5 %).
fn aa_extras(
    sc: Scenario,
    rng: &mut fastrand::Rng,
    ticks: u32,
) -> (Vec<usize>, Vec<u32>, [u16; 3]) {
    if sc.aa {
        (
            (0..3).map(|_| rng.usize(0..200)).collect(),
            (0..2).map(|_| rng.u32(0..ticks)).collect(),
            [100, 500, 1000],
        )
    } else {
        (vec![], vec![], [500, 500, 500])
    }
}

/// The canary's weight (basis points) `s` seconds into a rollout: A/A
/// rollouts step 1 % -> 5 % -> 10 %, detection runs stay at 5 %.
fn weight_at(sc: Scenario, s: u32) -> u16 {
    match s {
        _ if !sc.aa => 500,
        0..300 => 100,
        300..2400 => 500,
        _ => 1000,
    }
}

/// The proxy's key rounds of one kind (`veer_proxy::record::RouteKeys`,
/// "Key rounds"), with its constants: a round ends after the tick at
/// which its repeated events exceed its votes by 32, from at least 4
/// distinct keys, 10 s or more after it began.
struct SimRound {
    keys: KeyFilter,
    again: KeyFilter,
    votes: Cell<u64>,
    repeats: Cell<u64>,
    repeat_keys: Cell<u64>,
    id: Cell<u64>,
    began_ms: Cell<u64>,
}

impl SimRound {
    fn new() -> SimRound {
        SimRound {
            keys: KeyFilter::with_bits(SHORT_BITS),
            again: KeyFilter::with_bits(SHORT_BITS),
            votes: Cell::new(0),
            repeats: Cell::new(0),
            repeat_keys: Cell::new(0),
            id: Cell::new(0),
            began_ms: Cell::new(0),
        }
    }

    /// `n` bad events of key `h`: 1 if the first of them is the key's vote
    /// in the round.
    fn count(&self, h: u64, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let vote = self.keys.first_time(h);
        let repeats = n - u64::from(vote);
        if repeats > 0 {
            self.repeats.set(self.repeats.get() + repeats);
            if self.again.first_time(h) {
                self.repeat_keys.set(self.repeat_keys.get() + 1);
            }
        }
        if vote {
            self.votes.set(self.votes.get() + 1);
        }
        u64::from(vote)
    }

    fn end_if_spent(&self, now_ms: u64) {
        if now_ms.saturating_sub(self.began_ms.get()) < 10_000
            || self.repeats.get() < self.votes.get() + 32
            || self.repeat_keys.get() < 4
        {
            return;
        }
        self.keys.clear();
        self.again.clear();
        self.votes.set(0);
        self.repeats.set(0);
        self.repeat_keys.set(0);
        self.began_ms.set(now_ms);
        self.id.set(self.id.get() + 1);
    }
}

/// What one rollout showed.
struct Run {
    /// Time (ms since the canary's first request) of the judge's first
    /// breach, and its guard.
    breach: Option<(u64, &'static str)>,
    /// Detection rows: time (ms) at which the oracle test crossed its
    /// bound (see [`detection_row`]).
    oracle: Option<u64>,
    /// Late-onset rows: time (ms) at which the window oracle crossed its
    /// bound (see [`WINDOW_STARTS`]).
    window: Option<u64>,
}

/// The window oracle of a late-onset row: the oracle's SPRT (the true
/// alternative, the same events, the same share of α), but told only that
/// the onset falls within the row's 30 s window, not when. It is a mixture
/// of SPRTs started on each tick of the window, each with `1/30` of the
/// weight (a Shiryaev-Roberts procedure with a uniform prior on the
/// window): by Ville's inequality it crosses `1/α` under the null with
/// probability at most `α`. It knows far more than the judge (the
/// alternative, and a window of 30 s within an unbounded rollout), so
/// where it, too, is slower than the onset-told oracle, no test that is
/// not told the onset can match that oracle.
const WINDOW_STARTS: u32 = 30;

/// The proxy's look between ticks, in ms (`--look-ms N`, 0 = none).
fn look_ms() -> u64 {
    arg("--look-ms", 100)
}

fn pending(t: &VersionTick) -> Pending {
    Pending {
        error_events: t.error_events,
        slow_events: t.slow_events.clone(),
    }
}

/// A/A load drift: request rate and latency of both versions rise and fall
/// by 30 % over ten minutes.
fn drift(t_s: f64) -> f64 {
    1.0 + 0.3 * (std::f64::consts::TAU * t_s / 600.0).sin()
}

/// A/A warm-up: the canary is twice as slow for its first 20 s.
const AA_WARMUP_S: f64 = 20.0;

/// The relative risk `r₀` the judge's test of the oracle's events
/// tolerates, and for latency its slot's canary and stable thresholds.
fn oracle_null(judge: &Judge, o: Oracle) -> f64 {
    judge
        .specs()
        .iter()
        .find_map(|s| match (s.limit, o) {
            (Limit::ErrorRatio { r0 }, Oracle::Errors) => Some(r0),
            (Limit::LatencyRatio { slot, r0, .. }, Oracle::Slot(i)) if slot == i => Some(r0),
            (Limit::LatencyAbove { q, slot, .. }, Oracle::Above(i)) if slot == i => {
                Some(1.0 - q.fraction())
            }
            _ => None,
        })
        .unwrap_or(1.0)
}

/// One rollout.
/// One rollout; `window`: for a late onset, the start (s) of the window
/// it falls in (0: none), for the window oracle.
fn rollout(
    pop: &Population,
    sc: Scenario,
    seed: u64,
    ticks: u32,
    rate: f64,
    onset: u32,
    window: u32,
) -> Run {
    let mut rng = fastrand::Rng::with_seed(seed);
    let key_seed = rng.u64(..);
    let tps = ticks_per_second();
    let interval_ms = interval_ms();
    // Steps per tick: the proxy's looks between ticks.
    let steps = match look_ms() {
        0 => 1,
        l => (interval_ms / l.min(interval_ms)).max(1),
    };
    let step_ms = interval_ms / steps;
    let samples = (SAMPLES / steps).max(4);
    let mut judge = Judge::new(&settings());
    let nq = judge.slots();
    let error_keys = KeyFilter::new();
    let burst_filter = KeyFilter::new();
    let burst_users = KeyFilter::new();
    let slow_keys: Vec<KeyFilter> = (0..nq).map(|_| KeyFilter::new()).collect();
    // Key rounds: errors, then each slow slot (`--no-key-rounds`: none,
    // as before session 16).
    let key_rounds = !std::env::args().any(|a| a == "--no-key-rounds");
    let rounds: Vec<SimRound> = (0..=nq).map(|_| SimRound::new()).collect();
    let (failing, bursts, weights) = aa_extras(sc, &mut rng, ticks);
    let split = Split::new(pop, key_seed, &weights);
    // The judge starts with the canary's first request, under the first
    // weight (as the proxy's does when a canary identity appears).
    let mut last_w = Some(weights[0]);
    // The oracle: Wald's SPRT on the same distinct-key events as the judge's
    // test of the row's limit, knowing the onset and the true relative
    // risk, at that test's share of α.
    let oracle_r0 = oracle_null(&judge, sc.oracle);
    let mut oracle_log = 0.0;
    let oracle_bound = judge.threshold().ln();
    let mut run = Run {
        breach: None,
        oracle: None,
        window: None,
    };
    // The window oracle's log-likelihood ratio per start (one a tick).
    let mut window_logs: Vec<f64> = Vec::new();
    let window_bound = judge.threshold() * f64::from(WINDOW_STARTS);
    let empty = || VersionTick {
        slow_events: vec![0; nq],
        round_slow_events: vec![0; nq],
        ..VersionTick::default()
    };
    for t in 0..ticks {
        let w_bp = weight_at(sc, t / tps);
        let weight_changed = last_w != Some(w_bp);
        last_w = Some(w_bp);
        let w = f64::from(w_bp) / 10_000.0;
        let wi = weights.iter().position(|x| *x == w_bp).unwrap_or(0);
        let share = split.traffic_share[wi];
        let burst = bursts.iter().any(|&b| t >= b && t < b + 30 * tps);
        let base_p = if burst { 0.05 } else { BASE_ERRORS };
        let t_s = f64::from(t) / f64::from(tps);
        let (load, scale) = if sc.aa {
            (drift(t_s), drift(t_s))
        } else {
            (1.0, 1.0)
        };
        let canary_scale = if sc.aa && t_s < AA_WARMUP_S {
            2.0 * scale
        } else {
            scale
        };
        // Detection runs are healthy until the onset; A/A-style runs are
        // what they are all along.
        let regressed = sc.aa || t >= onset * tps;
        // A burst is an outage both versions share: the canary has it as
        // stable does, on top of nothing of its own.
        let canary_p = match (regressed, sc.aa) {
            (false, _) => base_p,
            (true, true) if burst => base_p,
            (true, true) => sc.canary_errors,
            (true, false) => sc.canary_errors,
        };
        let canary_lat = if regressed {
            sc.canary_latency
        } else {
            Latency::Base
        };
        let stable_thresholds: Vec<Option<u64>> = judge.stable_thresholds_us().to_vec();
        let canary_thresholds: Vec<Option<u64>> = judge.canary_thresholds_us().to_vec();

        // Adds `count` requests of one version to its tick.
        let version = |acc: &mut VersionTick,
                       over: &mut Vec<u64>,
                       canary: bool,
                       count: u64,
                       p: f64,
                       lat: Latency,
                       scale: f64,
                       rng: &mut fastrand::Rng| {
            acc.slice.requests += count;
            let errors = binomial(rng, count, p);
            acc.slice.errors += errors;
            for _ in 0..errors {
                if let Some(h) = split.draw(wi, canary, rng) {
                    acc.error_events += u64::from(error_keys.first_time(h));
                    acc.burst_keys += u64::from(burst_filter.first_time(h));
                    acc.round_error_events += rounds[0].count(h, 1);
                }
            }
            let thresholds = if canary {
                &canary_thresholds
            } else {
                &stable_thresholds
            };
            for (q, t) in thresholds.iter().enumerate() {
                let Some(t) = t else { continue };
                let k = binomial(rng, count, lat.survival(*t as f64 / scale));
                if canary {
                    if let Some(n) = over.get_mut(q) {
                        *n += k;
                    }
                }
                for _ in 0..k {
                    if let Some(h) = split.draw(wi, canary, rng) {
                        if let Some(n) = acc.slow_events.get_mut(q) {
                            *n += u64::from(slow_keys[q].first_time(h));
                        }
                        if let Some(n) = acc.round_slow_events.get_mut(q) {
                            *n += rounds[q + 1].count(h, 1);
                        }
                    }
                }
            }
            if count > 0 {
                let per = count / samples;
                let extra = count % samples;
                for i in 0..samples {
                    let c = per + u64::from(i < extra);
                    if c > 0 {
                        let v = (lat.sample(rng) * scale).clamp(1.0, 3.0e9);
                        let _ = acc.slice.latency.record_n(v as u64, c);
                    }
                }
            }
            // Distinct requesting users (the burst guard only looks at the canary's).
            if canary {
                for _ in 0..count {
                    if let Some(h) = split.draw(wi, canary, rng) {
                        acc.burst_users += u64::from(burst_users.first_time(h));
                    }
                }
            }
        };
        // The oracle's true relative risk of its events at this tick's thresholds.
        let oracle_r = match sc.oracle {
            Oracle::Errors => canary_p / base_p,
            Oracle::Slot(i) => match (
                stable_thresholds.get(i).copied().flatten(),
                canary_thresholds.get(i).copied().flatten(),
            ) {
                (Some(ts), Some(tc)) => {
                    canary_lat.survival(tc as f64) / Latency::Base.survival(ts as f64).max(1e-12)
                }
                _ => 0.0,
            },
            // For the one-sample oracle: the canary's true share over the limit.
            Oracle::Above(i) => canary_thresholds
                .get(i)
                .copied()
                .flatten()
                .map_or(0.0, |t| canary_lat.survival(t as f64)),
        };
        // The same, had the canary regressed (the window oracle's
        // alternative, before the onset too).
        let alt_r = match sc.oracle {
            Oracle::Errors => sc.canary_errors / base_p,
            Oracle::Slot(i) => match (
                stable_thresholds.get(i).copied().flatten(),
                canary_thresholds.get(i).copied().flatten(),
            ) {
                (Some(ts), Some(tc)) => {
                    sc.canary_latency.survival(tc as f64)
                        / Latency::Base.survival(ts as f64).max(1e-12)
                }
                _ => 0.0,
            },
            Oracle::Above(i) => canary_thresholds
                .get(i)
                .copied()
                .flatten()
                .map_or(0.0, |t| sc.canary_latency.survival(t as f64)),
        };
        let windowed = window > 0 && !sc.aa && run.window.is_none();
        if windowed && t % tps == 0 && (window..window + WINDOW_STARTS).contains(&(t / tps)) {
            window_logs.push(0.0);
        }
        let (mut tick_stable, mut tick_canary) = (empty(), empty());
        for step in 0..steps {
            let n = poisson(&mut rng, load * rate * step_ms as f64 / 1000.0);
            let n_c = binomial(&mut rng, n, share);
            let n_s = n - n_c;
            let before = (
                tick_canary.error_events,
                tick_stable.error_events,
                tick_canary.slow_events.clone(),
                tick_stable.slow_events.clone(),
            );
            let mut over = vec![0u64; nq];
            version(
                &mut tick_stable,
                &mut over,
                false,
                n_s,
                base_p,
                Latency::Base,
                scale,
                &mut rng,
            );
            version(
                &mut tick_canary,
                &mut over,
                true,
                n_c,
                canary_p,
                canary_lat,
                canary_scale,
                &mut rng,
            );
            for &f in &failing {
                let h = key_hash(f, key_seed);
                let k = poisson(&mut rng, n as f64 * pop.share(f));
                if k == 0 {
                    continue;
                }
                let side = if on_canary(h, w_bp) {
                    &mut tick_canary
                } else {
                    &mut tick_stable
                };
                side.slice.errors += k;
                side.slice.requests += k;
                side.error_events += u64::from(error_keys.first_time(h));
                side.burst_keys += u64::from(burst_filter.first_time(h));
                side.burst_users += u64::from(burst_users.first_time(h));
                side.round_error_events += rounds[0].count(h, k);
            }
            let now_ms = u64::from(t) * interval_ms + (step + 1) * step_ms;
            // The log-likelihood ratio of this step's events, for an
            // alternative of relative risk `r` (one-sample: share `r`).
            let theta = |r: f64| w * r / (w * r + 1.0 - w);
            let llr = |r: f64, (c, st): (u64, u64)| {
                let (t1, t0) = match sc.oracle {
                    Oracle::Above(_) => (r, oracle_r0),
                    _ => (theta(r), theta(oracle_r0)),
                };
                c as f64 * (t1 / t0).ln() + st as f64 * ((1.0 - t1) / (1.0 - t0)).ln()
            };
            let events = || match sc.oracle {
                Oracle::Above(i) => {
                    let bad = over.get(i).copied().unwrap_or(0);
                    (bad, n_c.saturating_sub(bad))
                }
                Oracle::Errors => (
                    tick_canary.error_events - before.0,
                    tick_stable.error_events - before.1,
                ),
                Oracle::Slot(i) => {
                    let at = |v: &[u64]| v.get(i).copied().unwrap_or(0);
                    (
                        at(&tick_canary.slow_events) - at(&before.2),
                        at(&tick_stable.slow_events) - at(&before.3),
                    )
                }
            };
            if !sc.aa && regressed && run.oracle.is_none() && oracle_r > oracle_r0 {
                oracle_log += llr(oracle_r, events());
                if oracle_log >= oracle_bound {
                    run.oracle = Some(now_ms);
                }
            }
            if windowed && !window_logs.is_empty() && alt_r > oracle_r0 {
                let l = llr(alt_r, events());
                let mut sum = 0.0;
                for x in &mut window_logs {
                    *x += l;
                    sum += x.exp();
                }
                if sum >= window_bound && run.window.is_none() {
                    run.window = Some(now_ms);
                }
            }
            if run.breach.is_some() {
                continue;
            }
            // The tick at the end of its interval, or earlier when the
            // proxy's look finds the sequential tests already crossed.
            let due = step + 1 == steps
                || (!weight_changed
                    && judge.crossed(w, &pending(&tick_stable), &pending(&tick_canary)));
            if !due {
                continue;
            }
            let v = judge.tick(TickInput {
                w,
                weight_changed,
                elapsed: Duration::from_millis((step + 1) * step_ms),
                stable: std::mem::replace(&mut tick_stable, empty()),
                canary: std::mem::replace(&mut tick_canary, empty()),
                pairs: Default::default(),
                key_rounds: if key_rounds {
                    rounds.iter().map(|r| r.id.get()).collect()
                } else {
                    Vec::new()
                },
            });
            for r in &rounds {
                r.end_if_spent(now_ms);
            }
            if judge.burst_span_ended() {
                burst_filter.clear();
                burst_users.clear();
            }
            if v.status == Status::Breach {
                if sc.aa && std::env::args().any(|a| a == "--show-reverts") {
                    eprintln!(
                        "A/A revert ({}): seed {seed:#x}, {:.1} s in, w {w}: {}",
                        sc.name,
                        now_ms as f64 / 1000.0,
                        v.reason
                    );
                }
                run.breach = Some((now_ms, v.guard.map_or("", |g| g.as_str())));
            }
        }
        if run.breach.is_some()
            && (run.oracle.is_some() || sc.aa || oracle_r <= oracle_r0)
            && (window == 0 || run.window.is_some())
        {
            break;
        }
    }
    if sc.aa && std::env::args().any(|a| a == "--show-rounds") {
        let ids: Vec<u64> = rounds.iter().map(|r| r.id.get()).collect();
        eprintln!("key rounds ended ({}), per kind: {ids:?}", sc.name);
    }
    run
}

/// Upper end of the two-sided 95 % Clopper–Pearson interval for k of n.
fn clopper_pearson_upper(k: u64, n: u64) -> f64 {
    if k >= n {
        return 1.0;
    }
    // Find p with P(X <= k; n, p) = 0.025 by bisection.
    let cdf = |p: f64| {
        let mut sum = 0.0;
        let mut log_term = (n as f64) * (1.0 - p).ln(); // i = 0
        for i in 0..=k {
            if i > 0 {
                log_term += ((n - i + 1) as f64).ln() - (i as f64).ln() + p.ln() - (1.0 - p).ln();
            }
            sum += log_term.exp();
        }
        sum
    };
    let (mut lo, mut hi) = (k as f64 / n as f64, 1.0);
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if cdf(mid) > 0.025 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

fn parallel<T: Send>(runs: u64, f: impl Fn(u64) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || {
                    (t..runs)
                        .step_by(threads as usize)
                        .map(f)
                        .collect::<Vec<T>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// One row of table (b).
fn detection_row(
    pop: &Population,
    n: usize,
    sc: Scenario,
    detect_runs: u64,
    rate: f64,
    onset: u32,
    limit: u32,
) {
    let tps = ticks_per_second();
    // A late onset falls at a moment spread evenly over 30 s (the judge's
    // coarse grid of fresh starts), run by run: a regression does not wait
    // for the detector's schedule.
    let onset_of = |i: u64| {
        if onset == 0 {
            0
        } else {
            onset + (i % 30) as u32
        }
    };
    let window = onset;
    let res = parallel(detect_runs, |i| {
        let onset = onset_of(i);
        let run = rollout(
            pop,
            sc,
            0xD37E_C700 + (n as u64) * 100_000 + i,
            (limit + onset) * tps,
            rate,
            onset,
            window,
        );
        (run, u64::from(onset) * 1000)
    });
    let mut oracle: Vec<f64> = res
        .iter()
        .filter_map(|(r, onset_ms)| Some(r.oracle?.saturating_sub(*onset_ms) as f64 / 1000.0))
        .collect();
    oracle.sort_by(f64::total_cmp);
    let oracle_q =
        (!oracle.is_empty()).then(|| (percentile(&oracle, 0.5), percentile(&oracle, 0.95)));
    let oracle_text = oracle_q.map_or("-".to_string(), |(m, p)| format!("{m:.2} / {p:.2}"));
    let mut windowed: Vec<f64> = res
        .iter()
        .filter_map(|(r, onset_ms)| Some(r.window?.saturating_sub(*onset_ms) as f64 / 1000.0))
        .collect();
    windowed.sort_by(f64::total_cmp);
    let window_q =
        (!windowed.is_empty()).then(|| (percentile(&windowed, 0.5), percentile(&windowed, 0.95)));
    let early = res
        .iter()
        .filter(|(r, onset_ms)| r.breach.is_some_and(|(t, _)| t <= *onset_ms))
        .count();
    let res: Vec<Option<(u64, &str)>> = res
        .into_iter()
        .map(|(r, onset_ms)| {
            r.breach
                .filter(|(t, _)| *t > onset_ms)
                .map(|(t, g)| (t - onset_ms, g))
        })
        .collect();
    let mut delays: Vec<f64> = res
        .iter()
        .flatten()
        .map(|(t, _)| *t as f64 / 1000.0)
        .collect();
    delays.sort_by(f64::total_cmp);
    let mut guards: Vec<&str> = res.iter().flatten().map(|(_, g)| *g).collect();
    guards.sort_unstable();
    let top = guards
        .chunk_by(|a, b| a == b)
        .max_by_key(|c| c.len())
        .and_then(|c| c.first())
        .copied()
        .unwrap_or("-");
    let ratio = |q: Option<(f64, f64)>| match q {
        Some((m, p)) if !delays.is_empty() => format!(
            "{:.2} / {:.2}",
            percentile(&delays, 0.5) / m,
            percentile(&delays, 0.95) / p
        ),
        _ => "-".to_string(),
    };
    // Late onsets: the window oracle, and the onset-told oracle against it.
    let window_cols = match (window_q, oracle_q) {
        _ if onset == 0 => String::new(),
        (Some((wm, wp)), Some((m, p))) => format!(
            " {wm:.2} / {wp:.2} ({}/{}) | {:.2} / {:.2} | {} |",
            windowed.len(),
            detect_runs,
            wm / m,
            wp / p,
            ratio(window_q)
        ),
        _ => " - | - | - |".to_string(),
    };
    println!(
        "| {} | {}/{}{} | {:.2} | {:.2} | {:.1} | {} | {} | {} |{window_cols}",
        sc.name,
        delays.len(),
        detect_runs,
        if early > 0 {
            format!(" ({early} reverted before the onset)")
        } else {
            String::new()
        },
        percentile(&delays, 0.5),
        percentile(&delays, 0.95),
        delays.last().copied().unwrap_or(f64::NAN),
        top,
        oracle_text,
        ratio(oracle_q)
    );
}

fn main() {
    let runs = arg("--runs", 2000);
    let detect_runs = arg("--detect-runs", 200);
    // Requests per second seen by this judge (a replica of a fleet sees its share).
    let rate = arg("--rate", 1000) as f64;
    let zipf = Population::new(true);
    let uniform = Population::new(false);
    // `--aa-uniform`: the A/A table with users of equal activity instead of Zipf.
    let aa_population = if std::env::args().any(|a| a == "--aa-uniform") {
        &uniform
    } else {
        &zipf
    };
    let started = Instant::now();

    // `--iid-null N`: the reference for table (a). The real e-detector alone
    // on exactly i.i.d. events (Poisson(1) bad events a second, each on the
    // canary with probability w), one hour, restarts every 60 s, crossing
    // 2/α with at least 3 canary events: its false-alarm rate must stay
    // below α/2 = 0.005. Compare with the A/A table's per-test rates.
    if let Some(n) = std::env::args()
        .position(|a| a == "--iid-null")
        .and_then(|i| std::env::args().nth(i + 1))
        .and_then(|v| v.parse::<u64>().ok())
    {
        // `--iid-rate R`: bad events a second (default 1, the error test's
        // rate; latency tests see tens to hundreds).
        let iid_rate = arg("--iid-rate", 1) as f64;
        for w in [0.01, 0.05, 0.10] {
            let hits = parallel(n, |i| {
                let mut rng = fastrand::Rng::with_seed(0x11D0_0000 + i);
                let mut d = Detector::new(1.0, 60);
                for _ in 0..HOUR {
                    let events = poisson(&mut rng, iid_rate);
                    let canary = (0..events).filter(|_| rng.f64() < w).count() as u64;
                    d.update(w, canary, events - canary);
                    if d.e_value() >= 2.0 / 0.01 && d.canary_events() >= 3 {
                        return 1u64;
                    }
                }
                0
            });
            let k: u64 = hits.iter().sum();
            println!(
                "i.i.d. null, w {w}: {k} of {n} one-hour runs crossed ({:.4}, 95 % Clopper-Pearson upper {:.4}; bound 0.005)",
                k as f64 / n as f64,
                clopper_pearson_upper(k, n)
            );
        }
        return;
    }

    let probe = Judge::new(&settings());
    let slot_of = |ratio: bool| {
        probe.specs().iter().find_map(|s| match s.limit {
            Limit::LatencyRatio { slot, .. } if ratio => Some(Oracle::Slot(slot)),
            Limit::LatencyAbove { slot, .. } if !ratio => Some(Oracle::Above(slot)),
            _ => None,
        })
    };
    let ratio_slot = slot_of(true).unwrap_or(Oracle::Errors);
    let above_slot = slot_of(false).unwrap_or(ratio_slot);
    let s = settings();
    println!(
        "judge settings ({}): interval {:?}, window {:?}, min_requests {}, max_error_rate {:?}, max_error_rate_ratio {:?}, max_latency_ms {:?}, max_latency_ratio {:?}, margin {}, warmup {:?}, false_revert_rate {}; {} tests, each reverting at E >= {:.0}",
        str_arg("--settings").unwrap_or_else(|| "config.example.toml".into()),
        s.interval,
        s.window,
        s.min_requests,
        s.max_error_rate,
        s.max_error_rate_ratio,
        s.max_latency_ms,
        s.max_latency_ratio,
        s.margin,
        s.warmup,
        s.false_revert_rate,
        probe.specs().len(),
        probe.threshold()
    );
    println!();

    let errors = |name, canary_errors| Scenario {
        name,
        canary_errors,
        canary_latency: Latency::Base,
        aa: false,
        oracle: Oracle::Errors,
    };
    let latency = |name, canary_latency, oracle| Scenario {
        name,
        canary_errors: BASE_ERRORS,
        canary_latency,
        aa: false,
        oracle,
    };
    // `--mirrored-only`: only table (c); `--mirror-percent P` (default 5).
    let percent = arg("--mirror-percent", 5) as f64;
    let mirrored_rows = [
        Scenario {
            name: "A/A (identical versions)",
            canary_errors: BASE_ERRORS,
            canary_latency: Latency::Base,
            aa: true,
            oracle: Oracle::Errors,
        },
        errors("errors 0.1 % -> 1 %", 0.01),
        errors("errors 0.1 % -> 5 %", 0.05),
        latency(
            "every request 1.5x slower",
            Latency::Scaled(1.5),
            ratio_slot,
        ),
        latency(
            "the slowest 2 % 3x slower (p99 x3)",
            Latency::TailScaled {
                above_us: base_quantile(0.98),
                factor: 3.0,
            },
            ratio_slot,
        ),
    ];
    // `--replicas 1,2,4,8,16`: only table (d), the fleet (`--aa-seconds S`
    // the A/A rollouts' length, `--seats N`, `--compare` adds today's
    // unpooled fleet, `--first-run K` numbers the A/A rollouts from K).
    if let Some(sizes) = str_arg("--replicas") {
        let sizes: Vec<usize> = sizes
            .split(',')
            .filter_map(|v| v.trim().parse().ok())
            .filter(|n| *n >= 1)
            .collect();
        // A/A, errors 0.1 -> 5 %, p99 x3: rows of table (c).
        let rows = [mirrored_rows[0], mirrored_rows[2], mirrored_rows[4]];
        let aa_seconds = arg("--aa-seconds", 3600) as u32;
        fleet::fleet_table(
            [aa_population, &uniform],
            &rows,
            &sizes,
            (runs, aa_seconds),
            detect_runs,
            rate,
        );
        println!("Took {:.0} s.", started.elapsed().as_secs_f64());
        return;
    }
    if std::env::args().any(|a| a == "--mirrored-only") {
        mirror::mirrored_table(&mirrored_rows, runs, detect_runs, rate, percent);
        println!("Took {:.0} s.", started.elapsed().as_secs_f64());
        return;
    }
    if runs > 0 {
        let rows = [
            Scenario {
                name: "A/A (identical versions)",
                canary_errors: BASE_ERRORS,
                canary_latency: Latency::Base,
                aa: true,
                oracle: Oracle::Errors,
            },
            Scenario {
                name: "canary 10 % slower, 1.5x the errors (within every limit)",
                canary_errors: 1.5 * BASE_ERRORS,
                canary_latency: Latency::Scaled(1.1),
                aa: true,
                oracle: Oracle::Errors,
            },
        ];
        println!("(a) false reverts: {runs} one-hour rollouts at {rate} req/s, weight 1 % -> 5 % -> 10 %, heavy-tailed latency,");
        println!(
            "    load and latency drifting +-30 % over 10 min (both versions), canary 2x slower for its first 20 s,"
        );
        println!(
            "    2 error bursts/h (5 % on both versions, 30 s), {} users with 3 always-failing users; looks every {} ms",
            if std::ptr::eq(aa_population, &uniform) { "equal-activity" } else { "Zipf" },
            look_ms()
        );
        println!();
        println!("| canary | rollouts | reverts | rate | 95 % Clopper-Pearson upper | bound | tests that tripped |");
        println!("|---|---|---|---|---|---|---|");
        let only = str_arg("--aa-row").and_then(|v| v.parse::<usize>().ok());
        for (n, row) in rows.iter().enumerate() {
            if only.is_some_and(|o| o != n) {
                continue;
            }
            let results = parallel(runs, |i| {
                rollout(
                    aa_population,
                    *row,
                    0x5EED_0000 + (n as u64) * 1_000_000 + i,
                    HOUR * ticks_per_second(),
                    rate,
                    0,
                    0,
                )
                .breach
            });
            let reverted: Vec<&(u64, &str)> = results.iter().flatten().collect();
            let k = reverted.len() as u64;
            let mut all: Vec<&str> = reverted.iter().map(|(_, g)| *g).collect();
            all.sort_unstable();
            let layers: Vec<String> = all
                .chunk_by(|a, b| a == b)
                .filter_map(|c| c.first().map(|g| format!("{g} x{}", c.len())))
                .collect();
            let upper = clopper_pearson_upper(k, runs);
            let bound = settings().false_revert_rate;
            println!(
                "| {} | {runs} | {k} | {:.4} | {:.4} | {bound} {} | {} |",
                row.name,
                k as f64 / runs as f64,
                upper,
                if upper <= bound { "(met)" } else { "(NOT met)" },
                if layers.is_empty() {
                    "-".to_string()
                } else {
                    layers.join(", ")
                }
            );
        }
        println!();
    }

    let scenarios = [
        errors("errors 0.1 % -> 0.2 %", 0.002),
        errors("errors 0.1 % -> 0.3 %", 0.003),
        errors("errors 0.1 % -> 0.5 %", 0.005),
        errors("errors 0.1 % -> 1 %", 0.01),
        errors("errors 0.1 % -> 5 %", 0.05),
        errors("errors 0.1 % -> 10 % (max_error_rate 5 %)", 0.10),
        errors("errors 0.1 % -> 50 %", 0.5),
        latency(
            "every request 1.5x slower",
            Latency::Scaled(1.5),
            ratio_slot,
        ),
        latency("every request 3x slower", Latency::Scaled(3.0), ratio_slot),
        latency(
            "the slowest 2 % 3x slower (p99 x3)",
            Latency::TailScaled {
                above_us: base_quantile(0.98),
                factor: 3.0,
            },
            ratio_slot,
        ),
        latency(
            "2 % of requests +1 s (p99 over max_latency_ms 800)",
            Latency::Extra {
                share: 0.02,
                extra_us: 1_000_000.0,
            },
            above_slot,
        ),
        latency(
            "latency +20 % (whole distribution)",
            Latency::Scaled(1.2),
            ratio_slot,
        ),
        latency(
            "latency +100 ms on 1 % of requests",
            Latency::Extra {
                share: 0.01,
                extra_us: 100_000.0,
            },
            ratio_slot,
        ),
    ];
    let limit = 1800;
    // `--scenario N`: only the N-th row of table (b) (0-based); `--onset S`:
    // only that onset.
    let only = std::env::args()
        .position(|a| a == "--scenario")
        .and_then(|i| std::env::args().nth(i + 1))
        .and_then(|v| v.parse::<usize>().ok());
    let onsets: Vec<u32> = match std::env::args().position(|a| a == "--onset") {
        _ if detect_runs == 0 => Vec::new(),
        Some(_) => vec![arg("--onset", 0) as u32],
        None => ONSETS.to_vec(),
    };
    for onset in onsets {
        println!("(b) detection delay: weight 5 %, {rate} req/s, stable 0.1 % errors, 200 000 users of equal activity,");
        println!(
            "    {detect_runs} runs each, judge interval {} ms; {}; give up {limit} s after it",
            interval_ms(),
            if onset == 0 {
                "the canary is bad from its first request".to_string()
            } else {
                format!("the canary is healthy for {onset}-{} s (spread evenly over the runs), then regresses", onset + 29)
            }
        );
        println!();
        if onset == 0 {
            println!("| canary regression | detected | median s | p95 s | max s | test (most runs) | oracle SPRT median / p95 s | judge / oracle (median, p95) |");
            println!("|---|---|---|---|---|---|---|---|");
        } else {
            println!("| canary regression | detected | median s | p95 s | max s | test (most runs) | oracle SPRT median / p95 s | judge / oracle (median, p95) | window oracle median / p95 s | window oracle / oracle | judge / window oracle |");
            println!("|---|---|---|---|---|---|---|---|---|---|---|");
        }
        for (n, sc) in scenarios.iter().enumerate() {
            if only.is_some_and(|o| o != n) {
                continue;
            }
            detection_row(&uniform, n, *sc, detect_runs, rate, onset, limit);
        }
        println!();
    }
    // `--skip-mirrored`: tables (a) and (b) only.
    if !std::env::args().any(|a| a == "--skip-mirrored") {
        mirror::mirrored_table(&mirrored_rows, runs, detect_runs, rate, percent);
    }
    println!(
        "delays are in seconds from the onset to the tick that breached ({} ms interval; looks between ticks every {} ms, 0 = none).\n\
         The oracle column is a reference for what the data allow: Wald's SPRT on the same distinct-key events as the\n\
         judge's test of that limit (errors; requests over the latency thresholds), told the onset and the true relative\n\
         risk, at that test's share of alpha (the fastest valid test on average, Wald-Wolfowitz); the judge pays for not\n\
         knowing them. For a late onset, the window oracle is that SPRT told the alternative and the onset's 30 s window\n\
         but not the onset: a mixture of 30 SPRTs, one started on each second of the window, at the same alpha\n\
         (a Shiryaev-Roberts procedure with a uniform prior on the window). Took {:.0} s.",
        interval_ms(),
        look_ms(),
        started.elapsed().as_secs_f64()
    );
}
