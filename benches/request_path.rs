//! The whole request path in one process: a keep-alive client → veer (the
//! real `run::run`, one current-thread runtime as `workers = 1` has) → an
//! upstream answering `ok\n`, all over loopback. The same request sent
//! straight to the upstream is measured beside it, so the difference is
//! what veer adds (the client's and the upstream's share cancel out).
//!
//! Before criterion measures, each path serves a fixed number of requests
//! under a counting allocator (`stats_alloc`) and prints the heap allocations (and bytes)
//! per request: the figure that a change to the request path moves in
//! isolation, whatever the machine's load.
//!
//! Run: `cargo bench -p veer-benches --bench request_path`.

// criterion_group! generates an undocumented pub function; a bench's set-up
// has nothing to do on failure but stop.
#![allow(missing_docs, clippy::expect_used)]

use std::alloc::System;
use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;

/// The system allocator, counted (`stats_alloc`): allocation counts do
/// not depend on the allocator, times do a little (the binary uses
/// mimalloc).
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// An upstream answering every request with `ok\n`, like the peers' nginx.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A keep-alive client connection to `addr`.
async fn client(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send
}

/// One GET with a sticky key; the body read to its end.
async fn get(send: &mut SendRequest<Empty<Bytes>>, user: u64) {
    send.ready().await.expect("connection ready");
    let req = Request::get("/")
        .header("host", "bench.test")
        .header("x-user-id", format!("user-{}", user % 1000))
        .body(Empty::new())
        .expect("request");
    let res = send.send_request(req).await.expect("response");
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"ok\n");
}

/// veer with one route, a canary at 10 % and the judge on (as
/// `benches/request-cost.sh` runs it); its proxy address.
async fn veer(dir: &std::path::Path, stable: SocketAddr, canary: SocketAddr) -> SocketAddr {
    let path = dir.join("veer.toml");
    std::fs::write(
        &path,
        format!(
            r#"[proxy]
listen = ["127.0.0.1:0"]
workers = 1
[admin]
listen = "127.0.0.1:0"
[state]
dir = "{}"
[[route]]
name = "web"
sticky = ["header:x-user-id"]
[route.stable]
version = "v1"
endpoints = ["{stable}"]
[route.canary]
version = "v2"
endpoints = ["{canary}"]
weight = 10
"#,
            dir.join("state").display()
        ),
    )
    .expect("write config");
    let loaded = veer_proxy::run::load(&path).expect("config");
    let (ready_tx, ready_rx) = oneshot::channel();
    tokio::spawn(veer_proxy::run::run(
        loaded,
        std::future::pending::<()>(),
        Some(ready_tx),
    ));
    let bound = ready_rx.await.expect("veer ready");
    *bound.proxy.first().expect("a proxy listener")
}

/// Allocations and bytes per request over `n` requests.
fn allocations(rt: &Runtime, send: &mut SendRequest<Empty<Bytes>>, n: u64) -> (f64, f64) {
    rt.block_on(async {
        for i in 0..1000 {
            get(send, i).await;
        }
        let before = GLOBAL.stats();
        for i in 0..n {
            get(send, i).await;
        }
        let d = GLOBAL.stats() - before;
        (
            (d.allocations + d.reallocations) as f64 / n as f64,
            (d.bytes_allocated as f64 + d.bytes_reallocated.max(0) as f64) / n as f64,
        )
    })
}

fn request_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut through, mut direct) = rt.block_on(async {
        let (stable, canary) = (upstream().await, upstream().await);
        let proxy = veer(dir.path(), stable, canary).await;
        (client(proxy).await, client(stable).await)
    });
    let n = 20_000;
    let (va, vb) = allocations(&rt, &mut through, n);
    let (da, db) = allocations(&rt, &mut direct, n);
    println!(
        "allocations per request: through veer {va:.1} ({vb:.0} B), direct {da:.1} ({db:.0} B); veer adds {:.1} ({:.0} B)",
        va - da,
        vb - db
    );

    let mut user = 0u64;
    c.bench_function("GET through veer (keep-alive, judge on)", |b| {
        b.iter(|| {
            user += 1;
            rt.block_on(get(&mut through, user))
        })
    });
    c.bench_function("GET straight to the upstream (the baseline)", |b| {
        b.iter(|| {
            user += 1;
            rt.block_on(get(&mut direct, user))
        })
    });
}

criterion_group!(benches, request_path);
criterion_main!(benches);
