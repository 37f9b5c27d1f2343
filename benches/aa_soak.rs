//! A/A soak of the real binary: `runs` one-minute runs of `veer run` with
//! the judge settings of `config.example.toml`, unchanged, in front of two
//! identical loopback upstreams, under keyed load; prints how many runs
//! reverted the canary (the goal is none). `benches/aa-soak.sh` runs it
//! beside a CPU hog, as users' busy machines are.
//!
//! usage: aa-soak VEER_BINARY [--runs N] [--seconds S] [--rate R] [--mirror PERCENT]
//!        [--tail N] [--tail-ms MS] [--patience MS]
//!
//! `--mirror`: the route also copies that share of stable's requests to
//! the canary (`[route.mirror]`), so its paired tests are soaked too.
//!
//! `--tail N`: one request in N (of each version alike) takes `--tail-ms`
//! (default 1500) instead; `--patience MS`: clients leave (close the
//! connection) when an answer has not come in that long, so veer's
//! recording of requests given up is soaked too.
//!
//! Only 127.0.0.1 is targeted; every run is bounded by `--seconds`.

// A tool run from outside, timing real work: the wall clock is what it
// measures (clippy.toml bans it in the proxy's own code).
#![allow(clippy::disallowed_methods)]
// A benchmark driver: a failure to set up should abort it loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "args.rs"]
mod args;
use args::arg;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// An upstream answering 200 after 2 ms plus up to 3 ms of jitter, one
/// request in `--tail` after `--tail-ms` (both versions alike).
async fn upstream(name: &'static str) -> SocketAddr {
    let (tail, tail_ms) = (arg("--tail", 0), arg("--tail-ms", 1_500));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    let jitter = fastrand::u64(0..3_000);
                    let us = if tail > 0 && fastrand::u64(0..tail) == 0 {
                        tail_ms * 1_000
                    } else {
                        2_000 + jitter
                    };
                    tokio::time::sleep(Duration::from_micros(us)).await;
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(name))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Two loopback ports free when picked, distinct (both held while picked).
fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    let port = |l: &std::net::TcpListener| l.local_addr().expect("free port").port();
    (port(&a), port(&b))
}

/// config.example.toml with its listeners, state dir and endpoints moved
/// to this run's; every judge setting as it is.
fn config(dir: &std::path::Path, proxy: u16, admin: u16, s: SocketAddr, c: SocketAddr) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.example.toml");
    let mut text = std::fs::read_to_string(path).expect("config.example.toml");
    let mirror = arg("--mirror", 0);
    if mirror > 0 {
        text += &format!("\n[route.mirror]\npercent = {mirror}\n");
    }
    text.replace("127.0.0.1:8080", &format!("127.0.0.1:{proxy}"))
        .replace("127.0.0.1:9901", &format!("127.0.0.1:{admin}"))
        .replace(
            "\".veer-state\"",
            &format!("{:?}", dir.join("state").display().to_string()),
        )
        .replace("127.0.0.1:18001", &s.to_string())
        .replace("127.0.0.1:18002", &c.to_string())
}

async fn get(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let s = TcpStream::connect(addr).await.ok()?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "admin")
        .body(Empty::<Bytes>::new())
        .ok()?;
    let resp = tx.send_request(req).await.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body)
        .ok()
        .or(Some(serde_json::Value::Null))
}

/// Keyed GETs at about `rate` a second over 8 connections until `until`;
/// with `--patience`, a client whose answer has not come in that long
/// closes its connection and opens another. Returns (answered, given up).
async fn load(addr: SocketAddr, rate: u64, until: Instant) -> (u64, u64) {
    let per_conn = Duration::from_micros(8_000_000 / rate.max(1));
    let patience = match arg("--patience", 0) {
        0 => Duration::from_secs(3_600),
        ms => Duration::from_millis(ms),
    };
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let (mut sent, mut given_up) = (0u64, 0u64);
                let mut tx: Option<(_, tokio::task::JoinHandle<_>)> = None;
                let mut tick = tokio::time::interval(per_conn);
                while Instant::now() < until {
                    tick.tick().await;
                    if tx.is_none() {
                        let Ok(s) = TcpStream::connect(addr).await else {
                            continue;
                        };
                        let Ok((t, conn)) =
                            hyper::client::conn::http1::handshake(TokioIo::new(s)).await
                        else {
                            continue;
                        };
                        tx = Some((t, tokio::spawn(conn)));
                    }
                    let Some((t, _)) = tx.as_mut() else { continue };
                    // 20 000 users, a few of them much more active.
                    let user = (fastrand::f64().powi(3) * 20_000.0) as u32;
                    let Ok(req) = hyper::Request::get("/")
                        .header("host", "app")
                        .header("x-user-id", format!("u{user}"))
                        .body(Empty::<Bytes>::new())
                    else {
                        continue;
                    };
                    match tokio::time::timeout(patience, t.send_request(req)).await {
                        Ok(Ok(r)) => {
                            let _ = r.into_body().collect().await;
                            sent += 1;
                        }
                        Ok(Err(_)) => tx = None,
                        Err(_) => {
                            // The client leaves: its connection closes.
                            if let Some((_, conn)) = tx.take() {
                                conn.abort();
                            }
                            given_up += 1;
                        }
                    }
                }
                (sent, given_up)
            })
        })
        .collect();
    let (mut sent, mut given_up) = (0, 0);
    for t in tasks {
        let (s, g) = t.await.unwrap_or((0, 0));
        sent += s;
        given_up += g;
    }
    (sent, given_up)
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    let Some(veer) = std::env::args().nth(1).filter(|a| !a.starts_with("--")) else {
        eprintln!(
            "usage: aa-soak VEER_BINARY [--runs N] [--seconds S] [--rate R] [--mirror PERCENT] [--tail N] [--tail-ms MS] [--patience MS]"
        );
        std::process::exit(2);
    };
    let (runs, seconds, rate) = (arg("--runs", 10), arg("--seconds", 60), arg("--rate", 800));
    let mut reverted = 0;
    println!(
        "| run | requests | given up | canary requests | mirrored pairs (window) | verdict | E(errors) | E(latency) | revert at |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for run in 1..=runs {
        let dir = std::env::temp_dir().join(format!("veer-aa-soak-{}-{run}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (s, c) = (upstream("v1").await, upstream("v2").await);
        let (proxy, admin) = free_ports();
        let path = dir.join("veer.toml");
        std::fs::write(&path, config(&dir, proxy, admin, s, c)).expect("config");
        let _veer = Proc(
            Command::new(&veer)
                .args(["run", "--config"])
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn veer"),
        );
        let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
        let ready = Instant::now() + Duration::from_secs(20);
        while get(admin, "/readyz").await.is_none() {
            assert!(Instant::now() < ready, "veer did not become ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (sent, given_up) = load(
            ([127, 0, 0, 1], proxy).into(),
            rate,
            Instant::now() + Duration::from_secs(seconds),
        )
        .await;
        let st = get(admin, "/status").await.unwrap_or_default();
        let r = &st["routes"][0];
        let verdict = r["verdict"].as_str().unwrap_or("?").to_string();
        if verdict == "reverted" || !r["reverted"].is_null() {
            reverted += 1;
            eprintln!("run {run} reverted: {}", r["reason"]);
        }
        let ev = &r["evidence"];
        println!(
            "| {run} | {sent} | {given_up} | {} | {} | {verdict} | {:.3} | {:.3} | {:.0} |",
            r["window"]["canary"]["requests"],
            r["mirror"]["pairs_in_window"],
            ev["e_errors"].as_f64().unwrap_or(0.0),
            ev["e_latency"].as_f64().unwrap_or(0.0),
            ev["threshold"].as_f64().unwrap_or(0.0)
        );
        drop(_veer);
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!();
    println!("{reverted} of {runs} A/A runs of {seconds} s reverted the canary (goal: 0)");
}
