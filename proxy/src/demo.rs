//! `veer demo`: the whole story on loopback. Traffic splits, the canary turns
//! bad part-way, the judge's evidence grows, the canary is reverted, and
//! traffic is back on stable.
//!
//! Everything runs in this process: two upstream servers ("stable" v1 and
//! "canary" v2) on 127.0.0.1, the real proxy (`run::run`, the same code as
//! `veer run`) configured by a generated file, and a load generator with
//! thousands of user keys. A third of the way in, v2 starts failing 10 % of
//! its requests and answering four times slower. Only loopback addresses are
//! used; the load is paced and ends with the demo.

use std::convert::Infallible;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::client::Conn;
use crate::run::{self, RunError};

/// Address of the demo's stable upstream in `--upstreams-only` mode (and in
/// `config.example.toml`).
pub const STABLE_ADDR: &str = "127.0.0.1:18001";
/// Address of the demo's canary upstream in `--upstreams-only` mode.
pub const CANARY_ADDR: &str = "127.0.0.1:18002";

/// Concurrent simulated clients.
const CLIENTS: usize = 32;
/// Requests per second of each client.
const CLIENT_RATE: u64 = 12;
/// Distinct user keys.
const USERS: u32 = 5_000;
/// Canary weight of the demo route, percent.
const CANARY_WEIGHT: u32 = 20;

/// Why the demo stopped early.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// I/O on loopback or the temp dir failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The proxy did not start.
    #[error("{0}")]
    Run(#[from] RunError),
    /// The proxy stopped before it was ready.
    #[error("the proxy stopped before it was ready")]
    NotReady,
}

/// How an upstream of the demo behaves.
pub struct Behaviour {
    version: &'static str,
    base_latency: Duration,
    bad: AtomicBool,
}

impl Behaviour {
    /// Makes the upstream fail 10 % of requests and answer 4× slower.
    pub fn turn_bad(&self) {
        self.bad.store(true, Ordering::Relaxed);
    }
}

/// Starts one upstream server; it runs until the process ends.
pub async fn upstream(
    addr: &str,
    version: &'static str,
    base_latency: Duration,
) -> std::io::Result<(SocketAddr, Arc<Behaviour>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let b = Arc::new(Behaviour {
        version,
        base_latency,
        bad: AtomicBool::new(false),
    });
    let handle = b.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let b = b.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let b = b.clone();
                    async move {
                        let bad = b.bad.load(Ordering::Relaxed);
                        let base = if bad {
                            b.base_latency * 4
                        } else {
                            b.base_latency
                        };
                        let jitter =
                            Duration::from_micros(fastrand::u64(0..base.as_micros() as u64 + 1));
                        tokio::time::sleep(base + jitter).await;
                        let body = format!("hello from {} ({})\n", b.version, req.uri().path());
                        let mut resp = Response::new(Full::new(Bytes::from(body)));
                        if bad && fastrand::u8(0..10) == 0 {
                            *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        resp.headers_mut()
                            .insert("x-demo-version", http::HeaderValue::from_static(b.version));
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((local, handle))
}

#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    latency: Option<Histogram<u64>>,
}

impl Tally {
    fn record(&mut self, ok: bool, micros: u64) {
        if ok {
            self.ok += 1;
        } else {
            self.errors += 1;
        }
        if self.latency.is_none() {
            self.latency = Histogram::new_with_bounds(1, 60_000_000, 3).ok();
        }
        if let Some(h) = &mut self.latency {
            let _ = h.record(micros.max(1));
        }
    }

    fn quantile_ms(&self, q: f64) -> f64 {
        self.latency
            .as_ref()
            .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
    }
}

/// Per-version tallies of the last second: [stable, canary].
type Tallies = Arc<Mutex<[Tally; 2]>>;

/// Runs the demo for `duration`; with `upstreams_only`, only serves the two
/// upstreams on their fixed addresses until interrupted.
pub async fn demo(duration: Duration, upstreams_only: bool) -> Result<(), DemoError> {
    if upstreams_only {
        let (s, _) = upstream(STABLE_ADDR, "v1", Duration::from_millis(2)).await?;
        let (c, _) = upstream(CANARY_ADDR, "v2", Duration::from_millis(2)).await?;
        println!("demo upstreams: stable v1 on {s}, canary v2 on {c}; Ctrl-C to stop");
        let _ = tokio::signal::ctrl_c().await;
        return Ok(());
    }
    let (stable, _) = upstream("127.0.0.1:0", "v1", Duration::from_millis(2)).await?;
    let (canary, canary_behaviour) =
        upstream("127.0.0.1:0", "v2", Duration::from_millis(2)).await?;
    let dir = std::env::temp_dir().join(format!("veer-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("veer.toml");
    std::fs::write(&path, demo_config(stable, canary, &dir))?;
    let loaded = run::load(&path)?;

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (ready_tx, ready_rx) = oneshot::channel();
    let proxy = tokio::spawn(run::run(
        loaded,
        async {
            let _ = stop_rx.await;
        },
        Some(ready_tx),
    ));
    let bound = match ready_rx.await {
        Ok(b) => b,
        Err(_) => {
            return Err(match proxy.await {
                Ok(Err(e)) => e.into(),
                _ => DemoError::NotReady,
            });
        }
    };
    let Some(addr) = bound.proxy.first().copied() else {
        return Err(DemoError::NotReady);
    };

    let tallies: Tallies = Arc::default();
    let (done_tx, done_rx) = watch::channel(false);
    let deadline = Instant::now() + duration;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(tokio::spawn(client(
            addr,
            tallies.clone(),
            done_rx.clone(),
            i,
        )));
    }

    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    let bad_at = duration / 3;
    let mut went_bad: Option<Instant> = None;
    let mut reverted: Option<Duration> = None;
    let mut totals = [0u64; 2];
    // Look every 100 ms (to time the revert), show every second.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.tick().await;
    let mut looks = 0u64;
    while Instant::now() < deadline {
        tick.tick().await;
        looks += 1;
        if went_bad.is_none() && start.elapsed() >= bad_at {
            canary_behaviour.turn_bad();
            went_bad = Some(Instant::now());
        }
        if let (Some(t), None) = (went_bad, reverted) {
            if judge_view(bound.admin).await.verdict == "reverted" {
                reverted = Some(t.elapsed());
            }
        }
        if looks % 10 != 0 {
            continue;
        }
        let snapshot = {
            let mut t = tallies.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *t)
        };
        totals[0] += snapshot[0].ok + snapshot[0].errors;
        totals[1] += snapshot[1].ok + snapshot[1].errors;
        let judge = judge_view(bound.admin).await;
        print!(
            "{}",
            view(&snapshot, start.elapsed(), duration, bound.admin, tty)
        );
        print!("{}", judge.render(went_bad.is_some(), tty, start.elapsed()));
    }
    let _ = done_tx.send(true);
    for c in clients {
        let _ = c.await;
    }
    let _ = stop_tx.send(());
    let _ = proxy.await;
    let all = (totals[0] + totals[1]).max(1);
    println!(
        "\ndemo done: {} requests, {:.1}% on the canary (configured {CANARY_WEIGHT}%)",
        all,
        totals[1] as f64 * 100.0 / all as f64
    );
    match (went_bad, reverted) {
        (Some(_), Some(d)) => println!(
            "v2 turned bad at {:.0}s; veer reverted it by itself {:.1}s later (timed to 0.1 s); traffic is back on v1",
            bad_at.as_secs_f64(),
            d.as_secs_f64()
        ),
        (Some(_), None) => println!("v2 turned bad at {:.0}s and was not reverted before the demo ended", bad_at.as_secs_f64()),
        _ => println!("the demo ended before v2 turned bad (use a longer --duration)"),
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn demo_config(stable: SocketAddr, canary: SocketAddr, dir: &std::path::Path) -> String {
    format!(
        r#"# generated by `veer demo`
[proxy]
listen = ["127.0.0.1:0"]
[admin]
listen = "127.0.0.1:0"
[state]
dir = "{state}"

[[route]]
name = "demo"
sticky = ["header:x-user-id", "client-ip"]
[route.stable]
version = "v1"
endpoints = ["{stable}"]
[route.canary]
version = "v2"
endpoints = ["{canary}"]
weight = {CANARY_WEIGHT}
[route.judge]
mode = "enforce"
interval = "1s"
window = "30s"
min_requests = 50
false_revert_rate = 0.01
"#,
        state = dir.join("state").display()
    )
}

async fn client(addr: SocketAddr, tallies: Tallies, done: watch::Receiver<bool>, seed: usize) {
    let mut rng = fastrand::Rng::with_seed(seed as u64 + 1);
    let host = addr.to_string();
    let mut conn: Option<Conn> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / CLIENT_RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !*done.borrow() {
        tick.tick().await;
        let user = format!("user-{}", rng.u32(0..USERS));
        if conn.is_none() {
            conn = Conn::open(&host).await.ok();
        }
        let Some(c) = conn.as_mut() else { continue };
        let t0 = Instant::now();
        let r = c.get(&host, "/", &[("x-user-id", &user)]).await;
        let micros = t0.elapsed().as_micros() as u64;
        let (slot, ok) = match &r {
            Ok(resp) => {
                let v = resp.headers().get("x-demo-version").map(|v| v.as_bytes());
                (usize::from(v == Some(b"v2")), resp.status().is_success())
            }
            Err(_) => {
                conn = None;
                (0, false)
            }
        };
        let mut t = tallies.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = t.get_mut(slot) {
            t.record(ok, micros);
        }
    }
}

fn view(
    t: &[Tally; 2],
    elapsed: Duration,
    total: Duration,
    admin: SocketAddr,
    tty: bool,
) -> String {
    let all = (t[0].ok + t[0].errors + t[1].ok + t[1].errors).max(1) as f64;
    let mut s = String::new();
    if tty {
        s.push_str("\x1b[2J\x1b[H");
        s.push_str(&format!(
            "veer demo  {:>3.0}s / {:.0}s   admin http://{admin}/status\n\n",
            elapsed.as_secs_f64(),
            total.as_secs_f64()
        ));
        s.push_str(&format!(
            "{:<8} {:<8} {:>8} {:>8} {:>8} {:>9} {:>9}\n",
            "role", "version", "req/s", "share", "errors", "p50 ms", "p99 ms"
        ));
    }
    for (i, (role, version)) in [("stable", "v1"), ("canary", "v2")].iter().enumerate() {
        let n = t[i].ok + t[i].errors;
        let line = format!(
            "{:<8} {:<8} {:>8} {:>7.1}% {:>8} {:>9.2} {:>9.2}",
            role,
            version,
            n,
            n as f64 * 100.0 / all,
            t[i].errors,
            t[i].quantile_ms(0.5),
            t[i].quantile_ms(0.99)
        );
        if tty {
            s.push_str(&line);
            s.push('\n');
        } else {
            s.push_str(&format!("[{:>3.0}s] {line}\n", elapsed.as_secs_f64()));
        }
    }
    s
}

/// What the demo shows of the judge, read from the admin `/status`.
#[derive(Default)]
struct JudgeView {
    verdict: String,
    reason: String,
    effective: f64,
    e_errors: f64,
    e_latency: f64,
    threshold: f64,
}

async fn judge_view(admin: SocketAddr) -> JudgeView {
    let Ok(resp) = crate::client::get(&admin.to_string(), "/status").await else {
        return JudgeView::default();
    };
    let Ok(v) = serde_json::from_slice::<veer_control::status::StatusDoc>(resp.body()) else {
        return JudgeView::default();
    };
    let Some(r) = v.routes.first() else {
        return JudgeView::default();
    };
    JudgeView {
        verdict: r.verdict.as_str().to_string(),
        reason: r.reason.clone(),
        effective: r.weight.effective,
        e_errors: r.evidence.e_errors,
        e_latency: r.evidence.e_latency,
        threshold: r.evidence.threshold,
    }
}

impl JudgeView {
    fn render(&self, bad: bool, tty: bool, elapsed: Duration) -> String {
        let state = if bad {
            "v2 is BAD (10 % errors, 4x latency)"
        } else {
            "v2 is healthy"
        };
        let line = format!(
            "judge: {:<17} canary weight {:>5.1}%   evidence E(errors) {:>9}  E(latency) {:>9}  (revert at {:.0})   {state}",
            self.verdict,
            self.effective,
            e_fmt(self.e_errors),
            e_fmt(self.e_latency),
            self.threshold
        );
        if tty {
            format!("\n{line}\n  {}\n", self.reason)
        } else {
            format!("[{:>3.0}s] {line}\n", elapsed.as_secs_f64())
        }
    }
}

/// An e-value for people: fixed point while small, scientific once large.
fn e_fmt(e: f64) -> String {
    if e >= 1e4 {
        format!("{e:.1e}")
    } else {
        format!("{e:.2}")
    }
}
