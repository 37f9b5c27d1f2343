//! Micro benchmarks of the per-request hot path: the routing decision
//! (sticky-key extraction, bucket hash, version choice, endpoint choice on
//! the ring) and the judge's inline recording.
//!
//! Run: `cargo bench -p veer-benches --bench routing`. Goals: routing
//! decision ≤ 100 ns, recording ≤ 50 ns.

// criterion_group! generates an undocumented pub function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue};
use veer_proxy::balance::Balancer;
use veer_proxy::record::{Outcome, Recorder, RouteKeys};
use veer_proxy::split::{bucket, is_canary, sticky_key, KeyBuf, StickyKey};
use veer_proxy::upstream::Upstreams;

fn balancer(reg: &Upstreams, base: u16, n: u16) -> Balancer {
    Balancer::new(
        (0..n)
            .map(|i| {
                let a = SocketAddr::from(([127, 0, 0, 1], base + i));
                (
                    reg.get(a, veer_proxy::upstream::Connector::H1, 1024),
                    1,
                    a.to_string(),
                )
            })
            .collect(),
        &reg.rings,
    )
}

fn routing(c: &mut Criterion) {
    let reg = Upstreams::new();
    let stable = balancer(&reg, 20_000, 3);
    let canary = balancer(&reg, 21_000, 2);
    let sources = [
        StickyKey::Header(HeaderName::from_static("x-user-id")),
        StickyKey::Cookie("session".into()),
        StickyKey::ClientIp,
    ];
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("checkout.example.com"));
    headers.insert("accept", HeaderValue::from_static("*/*"));
    headers.insert("x-user-id", HeaderValue::from_static("user-123456"));
    let peer: SocketAddr = "10.1.2.3:45678"
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([0; 4], 0)));
    let no_key = HeaderMap::new();

    c.bench_function("route decision (header key)", |b| {
        b.iter(|| {
            let mut buf = KeyBuf::default();
            let key = sticky_key(&sources, black_box(&headers), &peer, &mut buf).unwrap_or(b"");
            let version = if is_canary(bucket(key), 2_000) {
                &canary
            } else {
                &stable
            };
            black_box(version.pick(key))
        })
    });
    c.bench_function("route decision (client-ip key)", |b| {
        b.iter(|| {
            let mut buf = KeyBuf::default();
            let key = sticky_key(&sources, black_box(&no_key), &peer, &mut buf).unwrap_or(b"");
            let version = if is_canary(bucket(key), 2_000) {
                &canary
            } else {
                &stable
            };
            black_box(version.pick(key))
        })
    });
    c.bench_function("bucket hash only", |b| {
        b.iter(|| bucket(black_box(b"user-123456")))
    });

    // Inline recording of one request's outcome and latency for the judge.
    let keys = std::sync::Arc::new(RouteKeys::new(2));
    let rec = Recorder::new(keys);
    rec.set_thresholds(&[Some(20_000), Some(150_000)]);
    let mut i = 0u64;
    c.bench_function("record (success)", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919);
            let hash = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            rec.record(black_box(1_000 + i % 30_000), Outcome::Ok, Some(hash))
        })
    });
    c.bench_function("record (error)", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919);
            let hash = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            rec.record(black_box(1_000 + i % 30_000), Outcome::Error, Some(hash))
        })
    });
}

criterion_group!(benches, routing);
criterion_main!(benches);
