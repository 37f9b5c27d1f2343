//! Table (d) of `judge-sim` (`--replicas 1,2,4,8,16`): one route's traffic
//! spread over N replicas by a load balancer. Each replica runs the real
//! judge on the requests it serves (its local tests at its seat's share of
//! α, as `[fleet]` with `pool = true` sets them), and publishes its bad
//! events, after its own distinct-key filter, as one batch per 100 ms look;
//! the batches of a look are applied in a random order (the store's) to
//! the fleet's pooled tests, the real `veer_control::pool` code, followed
//! by one judge (every replica holds the same state). The fleet reverts at
//! the first breach of any replica's local tests or of the pooled tests.
//!
//! Users are sticky to a replica (the balancer hashes their key), or not
//! (each request goes to any replica). In the A/A rows three heavy users
//! fail every request; without stickiness each of them reaches every
//! replica, the case that breaks naive pooling. The rest is as table (a)
//! (Zipf activity, load drift, bursts, a slow start, weight steps 1 → 5 →
//! 10 %) and table (b) (weight 5 %, equal activity, bad from the first
//! request), with 1000 req/s over the whole fleet.

use super::*;
use veer_control::pool::{self, PoolBatch, PoolView};

/// One replica of the simulated fleet.
struct Replica {
    judge: Judge,
    error_keys: KeyFilter,
    slow_keys: Vec<KeyFilter>,
    burst_filter: KeyFilter,
    burst_users: KeyFilter,
    stable: VersionTick,
    canary: VersionTick,
    batch: Vec<(u32, u8, bool)>,
}

/// The replica a user's requests go to when the balancer is sticky.
fn replica_of(hash: u64, n: usize) -> usize {
    (xxhash_rust::xxh3::xxh3_64(&hash.to_le_bytes()) % n as u64) as usize
}

/// The fleet of a row: its size, its balancer, its seats (0: no pooling).
#[derive(Clone, Copy)]
pub struct Fleet {
    replicas: usize,
    sticky: bool,
    seats: u32,
}

/// The first breach of a fleet rollout: (ms, guard, by the pooled tests).
fn fleet_rollout(
    pop: &Population,
    sc: Scenario,
    seed: u64,
    ticks: u32,
    rate: f64,
    fleet: Fleet,
) -> Option<(u64, &'static str, bool)> {
    let Fleet {
        replicas,
        sticky,
        seats,
    } = fleet;
    let mut rng = fastrand::Rng::with_seed(seed);
    let key_seed = rng.u64(..);
    let tps = ticks_per_second();
    let interval_ms = interval_ms();
    let steps = match look_ms() {
        0 => 1,
        l => (interval_ms / l.min(interval_ms)).max(1),
    };
    let step_ms = interval_ms / steps;
    let samples = (SAMPLES / steps).max(4);
    let mut s = settings();
    s.fleet_seats = seats;
    let mut reps: Vec<Replica> = (0..replicas)
        .map(|i| {
            let mut judge = Judge::new(&s);
            judge.set_seat(i as u32);
            let nq = judge.slots();
            Replica {
                judge,
                error_keys: KeyFilter::new(),
                slow_keys: (0..nq).map(|_| KeyFilter::new()).collect(),
                burst_filter: KeyFilter::new(),
                burst_users: KeyFilter::new(),
                stable: VersionTick::default(),
                canary: VersionTick::default(),
                batch: Vec::new(),
            }
        })
        .collect();
    let nq = reps.first().map_or(0, |r| r.judge.slots());
    let empty = || VersionTick {
        slow_events: vec![0; nq],
        ..VersionTick::default()
    };
    for r in &mut reps {
        r.stable = empty();
        r.canary = empty();
    }
    let pooling = seats > 0;
    if let Some(first) = reps.first_mut() {
        if let Some(fresh) = first.judge.fresh_pool() {
            first.judge.set_pool(PoolView::complete(fresh));
        }
    }
    let fp = reps.first().map_or(0, |r| r.judge.pool_fingerprint());
    let mut revision = 0i64;
    let (failing, bursts, weights) = aa_extras(sc, &mut rng, ticks);
    // Behind a sticky balancer each replica serves its own users: its
    // load is their activity, its canary share theirs (a heavy user puts
    // a replica's share above the weight); otherwise every replica serves
    // an equal part of everyone's requests.
    let splits: Vec<Split> = if sticky {
        (0..replicas)
            .map(|r| Split::of(pop, key_seed, &weights, |h| replica_of(h, replicas) == r))
            .collect()
    } else {
        vec![Split::new(pop, key_seed, &weights)]
    };
    let mut last_w = Some(weights[0]);
    // A key of `canary`'s users at weight index `wi` served by replica `r`.
    let draw = |wi: usize, canary: bool, r: usize, rng: &mut fastrand::Rng| -> Option<u64> {
        splits
            .get(if sticky { r } else { 0 })?
            .draw(wi, canary, rng)
    };
    // (load share, canary share) of replica `r` at weight index `wi`.
    let part = |wi: usize, r: usize| -> (f64, f64) {
        if !sticky {
            let (s, c) = splits.first().map_or((1.0, 0.0), |sp| sp.activity(wi));
            return (1.0 / replicas as f64, c / (s + c).max(1e-12));
        }
        let (s, c) = splits.get(r).map_or((0.0, 0.0), |sp| sp.activity(wi));
        (s + c, c / (s + c).max(1e-12))
    };
    for t in 0..ticks {
        let w_bp = weight_at(sc, t / tps);
        let weight_changed = last_w != Some(w_bp);
        last_w = Some(w_bp);
        let w = f64::from(w_bp) / 10_000.0;
        let wi = weights.iter().position(|x| *x == w_bp).unwrap_or(0);
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
        let canary_p = if sc.aa && burst {
            base_p
        } else {
            sc.canary_errors
        };
        let canary_lat = sc.canary_latency;
        for step in 0..steps {
            let mut n_total = 0;
            for (r, rep) in reps.iter_mut().enumerate() {
                let (load_share, share) = part(wi, r);
                let n = poisson(&mut rng, load * rate * load_share * step_ms as f64 / 1000.0);
                n_total += n;
                let n_c = binomial(&mut rng, n, share);
                for (canary, count, p, lat, sc_) in [
                    (false, n - n_c, base_p, Latency::Base, scale),
                    (true, n_c, canary_p, canary_lat, canary_scale),
                ] {
                    let thresholds: Vec<Option<u64>> = if canary {
                        rep.judge.canary_thresholds_us().to_vec()
                    } else {
                        rep.judge.stable_thresholds_us().to_vec()
                    };
                    let acc = if canary {
                        &mut rep.canary
                    } else {
                        &mut rep.stable
                    };
                    acc.slice.requests += count;
                    let errors = binomial(&mut rng, count, p);
                    acc.slice.errors += errors;
                    for _ in 0..errors {
                        if let Some(h) = draw(wi, canary, r, &mut rng) {
                            if rep.error_keys.first_time(h) {
                                acc.error_events += 1;
                                rep.batch
                                    .push((pool::key_bits(h), pool::ERROR_KIND, canary));
                            }
                            acc.burst_keys += u64::from(rep.burst_filter.first_time(h));
                        }
                    }
                    for (q, th) in thresholds.iter().enumerate() {
                        let Some(th) = th else { continue };
                        let k = binomial(&mut rng, count, lat.survival(*th as f64 / sc_));
                        for _ in 0..k {
                            if let Some(h) = draw(wi, canary, r, &mut rng) {
                                if rep.slow_keys[q].first_time(h) {
                                    if let Some(n) = acc.slow_events.get_mut(q) {
                                        *n += 1;
                                    }
                                    rep.batch
                                        .push((pool::key_bits(h), pool::slow_kind(q), canary));
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
                                let v = (lat.sample(&mut rng) * sc_).clamp(1.0, 3.0e9);
                                let _ = acc.slice.latency.record_n(v as u64, c);
                            }
                        }
                    }
                    if canary {
                        for _ in 0..count.min(64) {
                            if let Some(h) = draw(wi, canary, r, &mut rng) {
                                acc.burst_users += u64::from(rep.burst_users.first_time(h));
                            }
                        }
                    }
                }
            }
            // Heavy users who fail every request.
            for &f in &failing {
                let h = key_hash(f, key_seed);
                let k = poisson(&mut rng, n_total as f64 * pop.share(f));
                let canary = on_canary(h, w_bp);
                for _ in 0..k {
                    let r = if sticky {
                        replica_of(h, replicas)
                    } else {
                        rng.usize(0..replicas)
                    };
                    let Some(rep) = reps.get_mut(r) else { continue };
                    let side = if canary {
                        &mut rep.canary
                    } else {
                        &mut rep.stable
                    };
                    side.slice.errors += 1;
                    side.slice.requests += 1;
                    if rep.error_keys.first_time(h) {
                        side.error_events += 1;
                        rep.batch
                            .push((pool::key_bits(h), pool::ERROR_KIND, canary));
                    }
                    side.burst_keys += u64::from(rep.burst_filter.first_time(h));
                    side.burst_users += u64::from(rep.burst_users.first_time(h));
                }
            }
            let now_ms = u64::from(t) * interval_ms + (step + 1) * step_ms;
            // The look's batches, in the store's (random) order.
            let mut order: Vec<usize> = (0..replicas).collect();
            rng.shuffle(&mut order);
            let mut batches = Vec::new();
            for r in order {
                if let Some(rep) = reps.get_mut(r) {
                    let mut ev = std::mem::take(&mut rep.batch);
                    ev.truncate(pool::MAX_BATCH);
                    if pooling && !ev.is_empty() && !weight_changed {
                        batches.push(PoolBatch {
                            fp,
                            w,
                            ev,
                            ..PoolBatch::default()
                        });
                    }
                }
            }
            if let Some(view) = reps.first_mut().and_then(|r| r.judge.pool_mut()) {
                for b in batches {
                    revision += 1;
                    view.apply(revision, b);
                }
            }
            if let Some(v) = reps.first().and_then(|r| r.judge.pool_verdict()) {
                return Some((now_ms, v.guard.map_or("", |g| g.as_str()), true));
            }
            for rep in &mut reps {
                let due = step + 1 == steps
                    || (!weight_changed
                        && rep
                            .judge
                            .crossed(w, &pending(&rep.stable), &pending(&rep.canary)));
                if !due {
                    continue;
                }
                let v = rep.judge.tick(TickInput {
                    w,
                    weight_changed,
                    elapsed: Duration::from_millis((step + 1) * step_ms),
                    stable: std::mem::replace(&mut rep.stable, empty()),
                    canary: std::mem::replace(&mut rep.canary, empty()),
                    pairs: Default::default(),
                    key_rounds: Vec::new(),
                });
                if rep.judge.burst_span_ended() {
                    rep.burst_filter.clear();
                    rep.burst_users.clear();
                }
                if v.status == Status::Breach {
                    let pooled = v.reason.starts_with("pooled");
                    if sc.aa && std::env::args().any(|a| a == "--show-reverts") {
                        eprintln!(
                            "fleet A/A revert ({}): seed {seed:#x}, {:.1} s in, w {w}: {}",
                            sc.name,
                            now_ms as f64 / 1000.0,
                            v.reason
                        );
                    }
                    return Some((now_ms, v.guard.map_or("", |g| g.as_str()), pooled));
                }
            }
        }
    }
    None
}

/// Table (d): false reverts and detection per fleet size, users sticky to
/// a replica and not; `[aa, detection rows...]`, and for A/A
/// (`runs`, seconds) and for detection `detect_runs`.
pub fn fleet_table(
    pops: [&Population; 2],
    rows: &[Scenario],
    sizes: &[usize],
    (runs, aa_seconds): (u64, u32),
    detect_runs: u64,
    rate: f64,
) {
    let [pop_aa, pop_detect] = pops;
    let seats = arg("--seats", 16) as u32;
    // `--first-run K` numbers the A/A rollouts from K, so that a second
    // batch of runs (K = the first batch's count) adds new rollouts
    // rather than repeating the first batch's seeds.
    let first = arg("--first-run", 0);
    println!("(d) a fleet: {rate} req/s over N replicas, each judging its share (local tests at a seat of {seats}),");
    println!("    pooled tests on every replica's batches (one per 100 ms look, applied in a random order);");
    println!("    A/A: {aa_seconds} s rollouts as table (a); detection: weight 5 %, bad from the first request, as table (b).");
    println!(
        "    `pooled off` is today's fleet: every replica alone with the whole false_revert_rate."
    );
    println!();
    println!("| replicas | users | pooled | A/A reverts | 95 % upper | errors 0.1 -> 5 %: median / p95 s (detected) | p99 x3: median / p95 s (detected) | by pooled tests |");
    println!("|---|---|---|---|---|---|---|---|");
    let limit = 900;
    let tps = ticks_per_second();
    for &n in sizes {
        for sticky in [true, false] {
            for seats in [seats, 0] {
                if seats == 0 && (!sticky || std::env::args().all(|a| a != "--compare")) {
                    continue;
                }
                let aa = rows.first().copied();
                let (k, upper) = match aa.filter(|_| runs > 0) {
                    Some(sc) => {
                        let res = parallel(runs, |i| {
                            fleet_rollout(
                                pop_aa,
                                sc,
                                0xF1EE_0000 + (n as u64) * 1_000_000 + first + i,
                                aa_seconds * tps,
                                rate,
                                Fleet {
                                    replicas: n,
                                    sticky,
                                    seats,
                                },
                            )
                        });
                        let k = res.iter().flatten().count() as u64;
                        (
                            format!("{k} / {runs}"),
                            format!("{:.4}", clopper_pearson_upper(k, runs)),
                        )
                    }
                    None => ("-".into(), "-".into()),
                };
                let mut cells = Vec::new();
                let mut by_pool = 0;
                let mut detected_total = 0;
                for (j, sc) in rows.iter().skip(1).enumerate() {
                    let res = parallel(detect_runs, |i| {
                        fleet_rollout(
                            pop_detect,
                            *sc,
                            0xD37F_0000 + (j as u64) * 100_000 + (n as u64) * 1000 + i,
                            limit * tps,
                            rate,
                            Fleet {
                                replicas: n,
                                sticky,
                                seats,
                            },
                        )
                    });
                    let mut d: Vec<f64> = res
                        .iter()
                        .flatten()
                        .map(|(t, _, _)| *t as f64 / 1000.0)
                        .collect();
                    by_pool += res.iter().flatten().filter(|r| r.2).count();
                    detected_total += d.len();
                    d.sort_by(f64::total_cmp);
                    cells.push(format!(
                        "{:.2} / {:.2} ({}/{})",
                        percentile(&d, 0.5),
                        percentile(&d, 0.95),
                        d.len(),
                        detect_runs
                    ));
                }
                println!(
                    "| {n} | {} | {} | {k} | {upper} | {} | {} | {by_pool} of {detected_total} |",
                    if sticky { "sticky" } else { "any replica" },
                    if seats > 0 { "on" } else { "off" },
                    cells.first().cloned().unwrap_or_default(),
                    cells.get(1).cloned().unwrap_or_default(),
                );
            }
        }
    }
    println!();
}
