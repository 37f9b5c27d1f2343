//! Table (c) of `judge-sim`: a mirrored canary (`[route.mirror]`, weight 0)
//! judged on its pairs by the real judge, beside the routed canary of
//! table (b) with the same traffic.
//!
//! Each tick (the judge's interval) stable answers all `rate` requests a
//! second; `percent` of them are copied to the canary. A pair's two
//! answers share the request: its cost (one latency draw `x` from the base
//! model, which the canary's regression transforms as in table (b)) and,
//! for half of stable's base error rate, its failure (a request both
//! versions fail: a client's bad request, a dependency both call). On top
//! each side has its own noise (a log-normal factor of σ 0.2 on latency)
//! and its own failures. So stable fails 0.1 % of pairs and the copy its
//! scenario's rate, with the shared half in common. In the A/A rows the
//! same rollouts carry the load drift, two error bursts an hour (5 % on
//! each side, independently), three users whose every request fails (on
//! both sides) and a canary twice as slow for its first 20 s.

use super::*;
use veer_control::judge::PairTick;
use veer_control::limits::PairBatch;

/// What one mirrored rollout showed: the first breach (ms, guard) of the
/// judge on the pairs, and of a judge given the same answers as two
/// independent samples (each pair split into a canary and a stable answer:
/// what an unpaired comparison of the same requests would see).
pub fn mirrored_rollout(
    sc: Scenario,
    seed: u64,
    seconds: u32,
    rate: f64,
    percent: f64,
    onset: u32,
) -> [Option<(u64, &'static str)>; 2] {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut s = settings();
    s.mirrored = true;
    let mut judge = Judge::new(&s);
    let mut unpaired = Judge::new(&s);
    let mut out = [None, None];
    let nq = judge.slots();
    let tps = ticks_per_second();
    let tick_s = 1.0 / f64::from(tps);
    let bursts: Vec<u32> = if sc.aa {
        (0..2).map(|_| rng.u32(0..seconds * tps)).collect()
    } else {
        vec![]
    };
    let shared_p = BASE_ERRORS / 2.0;
    for t in 0..seconds * tps {
        let t_s = f64::from(t) * tick_s;
        let (load, scale) = if sc.aa {
            (drift(t_s), drift(t_s))
        } else {
            (1.0, 1.0)
        };
        let burst = bursts.iter().any(|&b| t >= b && t < b + 30 * tps);
        let regressed = sc.aa || t >= onset * tps;
        let canary_p = if regressed {
            sc.canary_errors
        } else {
            BASE_ERRORS
        };
        let canary_lat = if regressed {
            sc.canary_latency
        } else {
            Latency::Base
        };
        let canary_scale = if sc.aa && t_s < AA_WARMUP_S {
            2.0 * scale
        } else {
            scale
        };
        let ts: Vec<Option<u64>> = judge.stable_thresholds_us().to_vec();
        let tc: Vec<Option<u64>> = judge.canary_thresholds_us().to_vec();

        // Stable's routed requests (all of them: the canary's weight is 0).
        let n = poisson(&mut rng, load * rate * tick_s);
        let mut stable = VersionTick {
            slow_events: vec![0; nq],
            ..VersionTick::default()
        };
        let p = if burst { 0.05 } else { BASE_ERRORS };
        stable.slice.requests = n;
        stable.slice.errors = binomial(&mut rng, n, p);
        stable.error_events = stable.slice.errors;
        stable.burst_keys = stable.slice.errors;
        if n > 0 {
            let (per, extra) = (n / SAMPLES, n % SAMPLES);
            for i in 0..SAMPLES {
                let c = per + u64::from(i < extra);
                if c > 0 {
                    let v = (Latency::Base.sample(&mut rng) * scale).clamp(1.0, 3.0e9);
                    let _ = stable.slice.latency.record_n(v as u64, c);
                }
            }
        }

        // The pairs.
        let mut pairs = PairTick {
            pairs: 0,
            errors: PairBatch::default(),
            slow: vec![PairBatch::default(); nq],
        };
        let copies = binomial(&mut rng, n, percent / 100.0);
        let add = |b: &mut PairBatch, c: bool, s: bool| match (c, s) {
            (true, false) => b.canary_only += 1,
            (false, true) => b.stable_only += 1,
            (true, true) => b.both += 1,
            (false, false) => {}
        };
        for _ in 0..copies {
            // Three always-failing users among the copies of an A/A run:
            // their share of requests (Zipf top users, about 3 %) fails on
            // both sides.
            let poison = sc.aa && rng.f64() < 0.03;
            let shared = poison || rng.f64() < shared_p;
            let (ps, pc) = if burst {
                (0.05, 0.05)
            } else {
                (BASE_ERRORS - shared_p, canary_p - shared_p)
            };
            let s_bad = shared || rng.f64() < ps;
            let c_bad = shared || rng.f64() < pc.max(0.0);
            add(&mut pairs.errors, c_bad, s_bad);
            let x = Latency::Base.sample(&mut rng);
            let ls = x * scale * (0.2 * normal(&mut rng)).exp();
            let lc =
                canary_lat.transform(x, &mut rng) * canary_scale * (0.2 * normal(&mut rng)).exp();
            for (q, b) in pairs.slow.iter_mut().enumerate() {
                if let (Some(Some(s)), Some(Some(c))) = (ts.get(q), tc.get(q)) {
                    add(b, lc > *c as f64, ls > *s as f64);
                }
            }
            pairs.pairs += 1;
        }
        for b in pairs.slow.iter_mut() {
            b.pairs = pairs.pairs;
        }
        pairs.errors.pairs = pairs.pairs;
        let split = |b: &PairBatch| PairBatch {
            canary_only: b.canary_only + b.both,
            stable_only: b.stable_only + b.both,
            both: 0,
            pairs: b.pairs,
        };
        let apart = PairTick {
            pairs: pairs.pairs,
            errors: split(&pairs.errors),
            slow: pairs.slow.iter().map(split).collect(),
        };
        let at = u64::from(t + 1) * 1000 / u64::from(tps);
        for (i, (j, p)) in [(&mut judge, pairs), (&mut unpaired, apart)]
            .into_iter()
            .enumerate()
        {
            if out[i].is_some() {
                continue;
            }
            let v = j.tick(TickInput {
                w: 0.0,
                weight_changed: false,
                elapsed: Duration::from_secs_f64(tick_s),
                stable: stable.clone(),
                canary: VersionTick {
                    slow_events: vec![0; nq],
                    ..VersionTick::default()
                },
                pairs: p,
                key_rounds: Vec::new(),
            });
            if v.status == Status::Breach {
                out[i] = Some((at, v.guard.map_or("unknown", |g| g.as_str())));
            }
        }
        if out.iter().all(|o| o.is_some()) {
            break;
        }
    }
    out
}

impl Latency {
    /// The latency of a request whose base cost is `x` µs, under this model.
    fn transform(self, x: f64, rng: &mut fastrand::Rng) -> f64 {
        match self {
            Latency::Base => x,
            Latency::Scaled(f) => x * f,
            Latency::Extra { share, extra_us } => {
                x + if rng.f64() < share { extra_us } else { 0.0 }
            }
            Latency::TailScaled { above_us, factor } => x * if x > above_us { factor } else { 1.0 },
        }
    }
}

/// Prints table (c).
pub fn mirrored_table(rows: &[Scenario], aa_runs: u64, detect_runs: u64, rate: f64, percent: f64) {
    println!("(c) mirrored canary (weight 0, [route.mirror] percent = {percent}): {rate} req/s to stable, a copy of {percent} %");
    println!("    of them to the canary, judged on the pairs by the paired twins of the limit tests (the canary's traffic");
    println!("    is that of table (b)'s 5 % routed canary). Pairs share half of stable's errors and the request's cost.");
    println!();
    println!("| canary | runs | reverted | median s | p95 s | 95 % Clopper-Pearson upper (A/A) | tests that tripped | same answers unpaired: reverted, median / p95 s |");
    println!("|---|---|---|---|---|---|---|---|");
    for (n, sc) in rows.iter().enumerate() {
        let (runs, seconds) = if sc.aa {
            (aa_runs, HOUR)
        } else {
            (detect_runs, 600)
        };
        if runs == 0 {
            continue;
        }
        let res = parallel(runs, |i| {
            mirrored_rollout(
                *sc,
                0x3155_0000 + (n as u64) * 1_000_000 + i,
                seconds,
                rate,
                percent,
                0,
            )
        });
        let apart: Vec<f64> = {
            let mut d: Vec<f64> = res
                .iter()
                .filter_map(|r| r[1])
                .map(|(t, _)| t as f64 / 1000.0)
                .collect();
            d.sort_by(f64::total_cmp);
            d
        };
        let hits: Vec<(u64, &str)> = res.iter().filter_map(|r| r[0]).collect();
        let mut delays: Vec<f64> = hits.iter().map(|(t, _)| *t as f64 / 1000.0).collect();
        delays.sort_by(f64::total_cmp);
        let mut guards: Vec<&str> = hits.iter().map(|(_, g)| *g).collect();
        guards.sort_unstable();
        let layers: Vec<String> = guards
            .chunk_by(|a, b| a == b)
            .filter_map(|c| c.first().map(|g| format!("{g} x{}", c.len())))
            .collect();
        let k = hits.len() as u64;
        println!(
            "| {} | {runs} | {k} | {} | {} | {} | {} | {}{} |",
            sc.name,
            if sc.aa {
                "-".into()
            } else {
                format!("{:.2}", percentile(&delays, 0.5))
            },
            if sc.aa {
                "-".into()
            } else {
                format!("{:.2}", percentile(&delays, 0.95))
            },
            if sc.aa {
                format!("{:.4}", clopper_pearson_upper(k, runs))
            } else {
                "-".into()
            },
            if layers.is_empty() {
                "-".into()
            } else {
                layers.join(", ")
            },
            apart.len(),
            if sc.aa || apart.is_empty() {
                String::new()
            } else {
                format!(
                    ", {:.2} / {:.2}",
                    percentile(&apart, 0.5),
                    percentile(&apart, 0.95)
                )
            }
        );
    }
    println!();
}
