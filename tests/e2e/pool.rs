//! Fleets that judge together: three real `veer` processes pooling their
//! evidence through a real etcd, with the judge settings of
//! `config.example.toml`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::support::etcd::Etcd;
use super::support::{
    metric, reference_judge, route_config, veer_status_table, Client, Load, Upstream, Veer,
};

/// A replica of fleet `fleet`: one route with a canary at `weight` and the
/// reference judge; no `[fleet]` when `fleet` is empty.
fn config(
    s: &Upstream,
    c: &Upstream,
    weight: f64,
    etcd: &str,
    fleet: &str,
    replica: &str,
) -> String {
    let mut text = route_config(&[s.addr], &[c.addr], weight, "") + &reference_judge();
    if !fleet.is_empty() {
        text += &format!(
            "[fleet]\nstore = \"etcd\"\nendpoints = [{etcd}]\nname = \"{fleet}\"\nreplica = \"{replica}\"\n"
        );
    }
    text
}

/// Polls `/status` until `ready` holds of the first route (panics after
/// `limit`, naming `what`); returns the route and how long it took.
async fn wait_route(
    v: &Veer,
    what: &str,
    limit: Duration,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> (serde_json::Value, Duration) {
    let start = Instant::now();
    loop {
        let s = v.status().await;
        let route = s["routes"][0].clone();
        if ready(&route) {
            return (route, start.elapsed());
        }
        assert!(
            start.elapsed() < limit,
            "never {what}: {s}\nlogs:\n{}",
            v.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `v`'s pooled tests once its log has settled: the same revision on two
/// reads 1.5 s apart (no batch in between; the load has stopped).
async fn settled_pool(v: &Veer) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let start = Instant::now();
    loop {
        let now = v.status().await["routes"][0]["evidence"]["pool"].clone();
        if now["revision"] == last["revision"] {
            return now;
        }
        last = now;
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the log never settled"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
}

fn reverted(r: &serde_json::Value) -> bool {
    r["verdict"] == "reverted" && r["weight"]["effective"] == 0.0
}

/// Three synced replicas of one fleet, each with a seat for its local
/// tests and a complete view of the pooled tests.
async fn fleet(etcd: &Etcd, s: &Upstream, c: &Upstream, weight: f64) -> Vec<Veer> {
    let ep = etcd.endpoints();
    let mut replicas = Vec::new();
    for name in ["r1", "r2", "r3"] {
        replicas.push(Veer::start(&config(s, c, weight, &ep, "checkout", name)).await);
    }
    for r in &replicas {
        wait_route(
            r,
            "seated, with the whole log",
            Duration::from_secs(15),
            |route| {
                let pool = &route["evidence"]["pool"];
                pool["complete"] == true && pool["seat"].is_u64()
            },
        )
        .await;
    }
    replicas
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_reverted_on_the_fleets_pooled_evidence() {
    let etcd = Etcd::single().await;
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    // One request in ten fails on the canary.
    c.fail_one_in.store(10, Ordering::SeqCst);

    // One replica alone with all the traffic (three connections).
    let alone = Veer::start(&config(&s, &c, 20.0, "", "", "")).await;
    let load = Load::start(alone.addr, 3, Duration::ZERO);
    let (_, alone_took) =
        wait_route(&alone, "reverted alone", Duration::from_secs(60), reverted).await;
    let alone_sent = load.stop().await;
    drop(alone);

    // The same traffic spread over three replicas of a fleet.
    let replicas = fleet(&etcd, &s, &c, 20.0).await;
    let loads: Vec<Load> = replicas
        .iter()
        .map(|r| Load::start(r.addr, 1, Duration::ZERO))
        .collect();
    let start = Instant::now();
    let mut took = Vec::new();
    for r in &replicas {
        let (route, _) = wait_route(
            r,
            "reverted by the fleet",
            Duration::from_secs(60),
            reverted,
        )
        .await;
        took.push(start.elapsed());
        let reason = route["reverted"]["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with("pooled over the fleet"),
            "reverted on its pooled evidence: {route}"
        );
    }
    let mut sent = 0;
    for l in loads {
        sent += l.stop().await;
    }
    // Each replica's pooled test saw the others' events: more canary
    // events than its own test counted.
    let s1 = replicas[0].status().await;
    let ev = &s1["routes"][0]["evidence"];
    let pooled = ev["pool"]["tests"][0]["events"][0].as_u64().unwrap_or(0);
    let local = ev["tests"][0]["events"][0].as_u64().unwrap_or(0);
    assert!(
        pooled > local,
        "the pooled error test counted {pooled} canary events, r1's own {local}: {ev}"
    );
    eprintln!(
        "failing canary reverted: one replica with all the traffic in {:.2} s ({alone_sent} requests); \
         three replicas sharing it in {:.2} s ({sent} requests; last replica {:.2} s)",
        alone_took.as_secs_f64(),
        took.iter().min().copied().unwrap_or_default().as_secs_f64(),
        took.iter().max().copied().unwrap_or_default().as_secs_f64(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_canary_is_not_reverted_in_a_minute_even_by_a_user_failing_on_every_replica() {
    let etcd = Etcd::single().await;
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let replicas = fleet(&etcd, &s, &c, 10.0).await;
    // A user whose every request fails, on either version (a broken
    // client), sticky to the canary, sending to every replica in turn.
    let mut probe = Client::connect(replicas[0].addr).await.unwrap();
    let mut heavy = None;
    for i in 0..1000 {
        let key = format!("heavy-{i}");
        let r = probe.get("/", &[("x-user-id", &key)]).await.unwrap();
        if r.headers()["x-upstream"] == "canary" {
            heavy = Some(key);
            break;
        }
    }
    let heavy = heavy.expect("a key on the canary");
    let addrs: Vec<std::net::SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failing = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut clients = Vec::new();
            for a in &addrs {
                clients.push(Client::connect(*a).await.unwrap());
            }
            let mut n = 0u64;
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                for (c, a) in clients.iter_mut().zip(&addrs) {
                    if c.get("/fail", &[("x-user-id", &heavy)]).await.is_err() {
                        *c = Client::connect(*a).await.unwrap();
                    }
                    n += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    };
    let loads: Vec<Load> = replicas
        .iter()
        .map(|r| Load::start(r.addr, 1, Duration::from_millis(1)))
        .collect();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        for r in &replicas {
            let route = r.status().await["routes"][0].clone();
            assert!(
                route["reverted"].is_null(),
                "an identical canary was reverted: {route}\nlogs:\n{}",
                r.all_logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let heavy_sent = failing.await.unwrap();
    let mut sent = 0;
    for l in loads {
        sent += l.stop().await;
    }
    // The heavy user counted once for the whole fleet, whatever the
    // number of replicas it reached.
    let route = replicas[0].status().await["routes"][0].clone();
    let pool = &route["evidence"]["pool"];
    let canary_events = pool["tests"][0]["events"][0].as_u64().unwrap_or(0);
    assert!(canary_events <= 1, "{pool}");
    assert!(pool["batches"][0].as_u64().unwrap_or(0) >= 1, "{pool}");
    // `veer status` shows the pooled tests.
    let table = veer_status_table(&replicas[0]).await;
    assert!(
        table.contains("pooled over the fleet: whole log applied; local tests at seat"),
        "{table}"
    );
    assert!(table.contains("error_rate_ratio E "), "{table}");
    eprintln!("identical canary: {sent} requests and {heavy_sent} failing ones from one user over 60 s, no revert; pooled: {pool}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_joins_late_takes_the_fleets_pooled_tests_from_a_checkpoint() {
    let etcd = Etcd::single().await;
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    // The same few errors on both versions: batches flow, nothing reverts.
    s.fail_one_in.store(25, Ordering::SeqCst);
    c.fail_one_in.store(25, Ordering::SeqCst);
    let ep = etcd.endpoints();
    let mut replicas = Vec::new();
    for name in ["r1", "r2"] {
        replicas.push(Veer::start(&config(&s, &c, 20.0, &ep, "checkout", name)).await);
    }
    let loads: Vec<Load> = replicas
        .iter()
        .map(|r| Load::start(r.addr, 1, Duration::from_millis(1)))
        .collect();
    wait_route(
        &replicas[0],
        "batches in the log",
        Duration::from_secs(30),
        |r| r["evidence"]["pool"]["batches"][0].as_u64().unwrap_or(0) >= 5,
    )
    .await;
    // r3 starts after the log began: it catches up from r1's checkpoint
    // (r1 is the first member) and the batches after it.
    let r3 = Veer::start(&config(&s, &c, 20.0, &ep, "checkout", "r3")).await;
    let t = Instant::now();
    while r3.status().await["routes"][0]["evidence"]["pool"]["complete"] != true {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "r3 never complete from a checkpoint\nr1:\n{}\nr3:\n{}",
            replicas[0].all_logs(),
            r3.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        r3.logs_containing("waiting for a checkpoint")
            .await
            .contains("waiting for a checkpoint"),
        "r3 saw the log had begun: {}",
        r3.all_logs()
    );
    for l in loads {
        l.stop().await;
    }
    // Once the last batch is in, r1 and r3 hold the same pooled tests.
    let last = settled_pool(&replicas[0]).await;
    let (r3_route, _) = wait_route(&r3, "at r1's revision", Duration::from_secs(10), |r| {
        r["evidence"]["pool"]["revision"] == last["revision"]
    })
    .await;
    let theirs = &r3_route["evidence"]["pool"];
    assert_eq!(theirs["tests"], last["tests"], "r1 {last}\nr3 {theirs}");
    assert!(r3_route["reverted"].is_null(), "{r3_route}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_restarted_whole_reads_its_pooled_tests_back_from_the_stores_history() {
    let etcd = Etcd::single().await;
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    s.fail_one_in.store(25, Ordering::SeqCst);
    c.fail_one_in.store(25, Ordering::SeqCst);
    let ep = etcd.endpoints();
    let r1 = Veer::start(&config(&s, &c, 20.0, &ep, "checkout", "r1")).await;
    let r2 = Veer::start(&config(&s, &c, 20.0, &ep, "checkout", "r2")).await;
    let loads = [
        Load::start(r1.addr, 1, Duration::from_millis(1)),
        Load::start(r2.addr, 1, Duration::from_millis(1)),
    ];
    wait_route(&r1, "batches in the log", Duration::from_secs(30), |r| {
        r["evidence"]["pool"]["batches"][0].as_u64().unwrap_or(0) >= 5
    })
    .await;
    for l in loads {
        l.stop().await;
    }
    // The log settles; r1's pooled tests as they end.
    let last = settled_pool(&r1).await;
    // Every replica goes (a rolling restart gone wrong, a node pool
    // replaced); new ones start on the same store.
    drop(r1);
    drop(r2);
    let r3 = Veer::start(&config(&s, &c, 20.0, &ep, "checkout", "r3")).await;
    let (route, _) = wait_route(
        &r3,
        "complete from the history",
        Duration::from_secs(30),
        |r| r["evidence"]["pool"]["complete"] == true,
    )
    .await;
    let theirs = &route["evidence"]["pool"];
    assert_eq!(theirs["revision"], last["revision"], "{theirs}\n{last}");
    assert_eq!(theirs["tests"], last["tests"], "r1 {last}\nr3 {theirs}");
    // Which way depends on whether r1 wrote a checkpoint after the last
    // batch (one every 5 s): if not, from the history after the last one.
    let logs = r3.all_logs();
    eprintln!(
        "whole fleet restarted: r3 caught up {}",
        if logs.contains("caught up from the store's history") {
            "from the store's history"
        } else {
            "from the last checkpoint alone"
        }
    );
}

/// The keys of fleet `fleet`'s pools in the store (`ev/`, `pool/`,
/// `seats/`), after `/veer/v1/<fleet>/`.
async fn pool_keys(etcd: &Etcd, fleet: &str) -> Vec<String> {
    let mut c = store_client(etcd).await;
    let prefix = format!("/veer/v1/{fleet}/");
    let mut keys = Vec::new();
    for kind in ["ev/", "pool/", "seats/"] {
        let got = c
            .get(
                format!("{prefix}{kind}"),
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_keys_only(),
                ),
            )
            .await
            .expect("list keys");
        for kv in got.kvs() {
            let k = String::from_utf8_lossy(kv.key());
            keys.push(k.trim_start_matches(prefix.as_str()).to_string());
        }
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_pools_evidence_leaves_the_store_and_a_judged_ones_stays() {
    let etcd = Etcd::single().await;
    let ep = etcd.endpoints();
    let keep = "keep_evidence = \"1s\"\n";
    // r1 (the first member, so the collector) judges a failing canary;
    // r2 another canary of the same route, identical to its stable, both
    // with a few errors (batches flow, nothing reverts).
    let s = Upstream::start("stable").await;
    let bad = Upstream::start("bad").await;
    bad.fail_one_in.store(10, Ordering::SeqCst);
    let s2 = Upstream::start("stable2").await;
    let c2 = Upstream::start("canary2").await;
    s2.fail_one_in.store(25, Ordering::SeqCst);
    c2.fail_one_in.store(25, Ordering::SeqCst);
    let r1_config = config(&s, &bad, 20.0, &ep, "gc", "r1") + keep;
    let r1 = Veer::start(&r1_config).await;
    let r2 = Veer::start(&(config(&s2, &c2, 20.0, &ep, "gc", "r2") + keep)).await;
    let l2 = Load::start(r2.addr, 1, Duration::from_millis(1));
    wait_route(&r2, "batches in the log", Duration::from_secs(30), |r| {
        r["evidence"]["pool"]["batches"][0].as_u64().unwrap_or(0) >= 3
    })
    .await;
    let l1 = Load::start(r1.addr, 2, Duration::ZERO);
    wait_route(&r1, "reverted", Duration::from_secs(60), reverted).await;
    l1.stop().await;
    // r1's pool: the path its batches were written under.
    let keys = pool_keys(&etcd, "gc").await;
    let finished = keys
        .iter()
        .find_map(|k| k.strip_prefix("ev/")?.strip_suffix("/r1"))
        .map(str::to_string);
    let judged = keys
        .iter()
        .find_map(|k| k.strip_prefix("ev/")?.strip_suffix("/r2"))
        .map(str::to_string)
        .expect("r2's batches in the store");
    // The finished pool's keys go (batches, seat counter, checkpoint): 1 s
    // after the revert, at the collector's next look.
    let start = Instant::now();
    loop {
        let keys = pool_keys(&etcd, "gc").await;
        let left: Vec<_> = keys
            .iter()
            .filter(|k| finished.as_ref().is_some_and(|f| k.contains(f.as_str())))
            .collect();
        let collected =
            metric(&r1.metrics().await, "veer_fleet_collected_keys_total").unwrap_or(0.0);
        if left.is_empty() && collected > 0.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "r1's finished pool ({finished:?}) never left the store: {left:?}, {collected} collected\n{}",
            r1.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The pool still judged keeps its keys through more of the
    // collector's looks (one a second). (r1 may still write its finished
    // pool's last checkpoint once after the revert; the next look takes it.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    let keys = pool_keys(&etcd, "gc").await;
    assert!(
        keys.iter()
            .any(|k| k.starts_with("ev/") && k.contains(judged.as_str())),
        "r2's pool, still judged, lost its batches: {keys:?}"
    );
    assert!(
        keys.iter()
            .any(|k| k.starts_with("seats/") && k.contains(judged.as_str())),
        "r2's pool, still judged, lost its seat counter: {keys:?}"
    );
    l2.stop().await;
    assert!(r2.status().await["routes"][0]["reverted"].is_null());
    // The revert stays: r1 started again (with an empty state dir) takes
    // it from the fleet's record.
    drop(r1);
    let again = Veer::start(&r1_config).await;
    let (route, _) = wait_route(
        &again,
        "reverted from the record",
        Duration::from_secs(15),
        reverted,
    )
    .await;
    assert_eq!(route["weight"]["effective"], 0.0, "{route}");
    // r2's canary leaves its config without a decision (replaced or
    // removed, as when a rollout ends by editing the file): no member
    // judges its pool any more, and its keys go `keep_evidence` later.
    r2.write_config(
        &(route_config(&[s2.addr], &[], 0.0, "")
            + &reference_judge()
            + &format!(
                "[fleet]\nstore = \"etcd\"\nendpoints = [{ep}]\nname = \"gc\"\nreplica = \"r2\"\n{keep}"
            )),
    );
    r2.wait_generation(2).await;
    let start = Instant::now();
    loop {
        let keys = pool_keys(&etcd, "gc").await;
        let left: Vec<_> = keys
            .iter()
            .filter(|k| k.contains(judged.as_str()))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "r2's pool, no longer judged, never left the store: {left:?}\nmembers: {:?}\n{}",
            members(&etcd, "gc").await,
            again.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The values of a fleet's member keys.
async fn members(etcd: &Etcd, fleet: &str) -> Vec<String> {
    let mut c = store_client(etcd).await;
    let got = c
        .get(
            format!("/veer/v1/{fleet}/members/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("members");
    got.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.value()).to_string())
        .collect()
}

/// A client of the test's etcd (its first endpoint).
async fn store_client(etcd: &Etcd) -> etcd_client::Client {
    let ep = etcd.endpoints();
    let url = ep
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .trim_matches('"')
        .to_string();
    etcd_client::Client::connect([url], None)
        .await
        .expect("etcd client")
}

/// Users from `addresses` distinct addresses (127.0.10.1, ...), each
/// address with one connection to every replica and `per` requests for
/// `path` on each, every request a key of its own.
async fn users_on_every_replica(
    replicas: &[Veer],
    addresses: u8,
    per: usize,
    tag: &str,
    path: &str,
) {
    let targets: Vec<std::net::SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    let mut tasks = Vec::new();
    for a in 1..=addresses {
        let (targets, tag, path) = (targets.clone(), tag.to_string(), path.to_string());
        tasks.push(tokio::spawn(async move {
            let source = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 10, a));
            for (r, target) in targets.iter().enumerate() {
                let mut c = Client::connect_from(*target, source).await.unwrap();
                for i in 0..per {
                    let key = format!("{tag}-{a}-{r}-{i}");
                    c.get(&path, &[("x-user-id", &key)]).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// The pooled error test's events (canary, stable) on replica `v`.
async fn pooled_error_events(v: &Veer) -> (u64, u64) {
    let route = v.status().await["routes"][0].clone();
    let events = &route["evidence"]["pool"]["tests"][0]["events"];
    (
        events[0].as_u64().unwrap_or(0),
        events[1].as_u64().unwrap_or(0),
    )
}

/// A fleet behind which a hundred callers' addresses each have one vote:
/// once every address has spent it on failures both versions share, the
/// pooled tests still count a canary that regresses later (an address
/// votes again, fleet-wide, in the next round).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleets_pooled_tests_still_count_once_every_address_voted() {
    let etcd = Etcd::single().await;
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let replicas = fleet(&etcd, &s, &c, 10.0).await;
    users_on_every_replica(&replicas, 100, 3, "warm", "/").await;
    for r in &replicas {
        wait_route(r, "one vote per client", Duration::from_secs(30), |route| {
            route["evidence"]["one_vote_per_client"] == true
        })
        .await;
    }
    // Every address's users fail once on every replica, on both versions.
    users_on_every_replica(&replicas, 100, 1, "shared", "/fail").await;
    let (shared, _) = wait_route(
        &replicas[0],
        "the shared failures pooled",
        Duration::from_secs(30),
        |route| {
            let e = &route["evidence"]["pool"]["tests"][0]["events"];
            e[0].as_u64().unwrap_or(0) + e[1].as_u64().unwrap_or(0) >= 100
        },
    )
    .await;
    assert!(shared["reverted"].is_null(), "{shared}");
    let (canary_before, _) = pooled_error_events(&replicas[0]).await;

    // The canary now fails one request in four.
    c.fail_one_in.store(4, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut round = 0;
    loop {
        round += 1;
        users_on_every_replica(&replicas, 100, 2, &format!("after{round}"), "/").await;
        let mut all = true;
        for r in &replicas {
            all &= reverted(&r.status().await["routes"][0]);
        }
        if all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not reverted on every replica after {round} rounds: {}",
            replicas[0].status().await
        );
    }
    let (canary_after, stable_after) = pooled_error_events(&replicas[0]).await;
    assert!(
        canary_after > canary_before,
        "the pool counted no canary failure after the shared ones \
         ({canary_before} -> {canary_after}, stable {stable_after})"
    );
}

/// A replica of a fleet with many canaries: the route config (`r0`
/// takes any host, the others `rN.example`; users keyed by `x-user-id`,
/// as [`Load`] sends it) with `[fleet]` on `etcd`.
fn many_routes(routes: usize, s: &Upstream, c: &Upstream, etcd: &str, replica: &str) -> String {
    let mut text = format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[state]\ndir = \"@STATE@\"\n[fleet]\nstore = \"etcd\"\nendpoints = [{etcd}]\nname = \"many\"\nreplica = \"{replica}\"\n"
    );
    for i in 0..routes {
        let hosts = if i == 0 {
            String::new()
        } else {
            format!("hosts = [\"r{i}.example\"]\n")
        };
        text += &format!(
            "[[route]]\nname = \"r{i}\"\n{hosts}sticky = [\"header:x-user-id\"]\n[route.stable]\nversion = \"v1\"\nendpoints = [\"{}\"]\n[route.canary]\nversion = \"v2\"\nendpoints = [\"{}\"]\nweight = 10\n",
            s.addr, c.addr
        );
    }
    text
}

/// `veer_judge_routes_awake` of `v`, polled until `ready` holds (panics
/// after `limit`, naming `what`).
async fn awake_until(v: &Veer, what: &str, limit: Duration, ready: impl Fn(f64) -> bool) {
    let start = Instant::now();
    // What was seen, each change with when (for the failure's message).
    let mut seen: Vec<(u128, f64)> = Vec::new();
    loop {
        let awake = metric(&v.metrics().await, "veer_judge_routes_awake").unwrap_or(-1.0);
        if ready(awake) {
            return;
        }
        if seen.last().is_none_or(|&(_, a)| a != awake) {
            seen.push((start.elapsed().as_millis(), awake));
        }
        assert!(
            start.elapsed() < limit,
            "never {what}: {awake} routes awake (seen, ms: {seen:?})\nr0: {}\nlogs:\n{}",
            v.status().await["routes"][0],
            v.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A replica joining a fleet with many canaries lets each in once its
/// seat comes, with a handful of routing rebuilds for all of them, not
/// one each: a rebuild builds every route's ring, so one a seat was
/// quadratic in the routes (1 000 routes: ~8 s of a busy core, canaries
/// out of traffic all the while). Then, with no traffic, its pooled
/// routes sleep (the controller stops visiting them) until the fleet's
/// evidence for one comes from another replica, which wakes that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pooled_canaries_are_seated_with_few_rebuilds_and_sleep_until_the_fleets_evidence_comes(
) {
    const ROUTES: usize = 200;
    let etcd = Etcd::single().await;
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let v = Veer::start(&many_routes(ROUTES, &s, &c, &etcd.endpoints(), "r1")).await;
    let start = Instant::now();
    loop {
        let status = v.status().await;
        let routes = status["routes"].as_array().cloned().unwrap_or_default();
        let seated = routes
            .iter()
            .filter(|r| r["evidence"]["pool"]["seat"].is_u64() && r["weight"]["effective"] == 10.0)
            .count();
        if seated == ROUTES {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{seated} of {ROUTES} canaries seated and let in\nlogs:\n{}",
            v.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each rebuild lets in every canary seated since the last tick; one
    // a seat would be at least ROUTES. Half of that leaves ten seconds of
    // 100 ms ticks for a slow store on a busy machine.
    let rebuilds = metric(&v.metrics().await, "veer_routing_rebuilds_total").unwrap_or(-1.0);
    assert!(
        (1.0..(ROUTES / 2) as f64).contains(&rebuilds),
        "{rebuilds} routing rebuilds to seat {ROUTES} canaries"
    );
    // And the log tells of it in a few lines, not a few a route: each
    // line names the routes it stands for (`route`) or their number
    // (`routes`); they add up to every route, in as few lines as ticks.
    for msg in [
        "canary held out of traffic here until its local tests have a seat (a number from the fleet store)",
        "canary seated: it takes its share of traffic here",
    ] {
        let lines = v.logs_with_at_least(msg, 1).await;
        let told: u64 = lines
            .iter()
            .map(|l| l["routes"].as_u64().unwrap_or(u64::from(l["route"].is_string())))
            .sum();
        assert_eq!(told, ROUTES as u64, "{msg}: {lines:?}");
        assert!(lines.len() < ROUTES / 2, "{} lines for {msg}", lines.len());
    }

    // No traffic anywhere: every route sleeps.
    awake_until(
        &v,
        "every pooled route asleep",
        Duration::from_secs(60),
        |n| n == 0.0,
    )
    .await;

    // Another replica's traffic on r0 (a few errors on both versions,
    // from many users so that batches keep coming while it lasts: the
    // pool counts a user once a round, and one client address made two
    // batches and then none, and r0 here could sleep again before it was
    // looked at) wakes r0 here, and only what it wakes.
    s.fail_one_in.store(25, Ordering::SeqCst);
    c.fail_one_in.store(25, Ordering::SeqCst);
    let r2 = Veer::start(&many_routes(1, &s, &c, &etcd.endpoints(), "r2")).await;
    let load = Load::start(r2.addr, 2, Duration::from_millis(1));
    let (r0, _) = wait_route(&v, "following r2's batches", Duration::from_secs(60), |r| {
        r["evidence"]["pool"]["revision"].as_i64().unwrap_or(0) > 0
    })
    .await;
    assert_eq!(r0["name"], "r0");
    // r2's joining may wake every route here once (a new record is a
    // rebuild); the others fall asleep again, r0 stays awake while its
    // batches come.
    awake_until(&v, "r0 alone awake", Duration::from_secs(60), |n| n == 1.0).await;
    load.stop().await;
    // Once the batches stop (and a checkpoint of them is written or
    // seen), it sleeps again.
    awake_until(&v, "asleep again", Duration::from_secs(60), |n| n == 0.0).await;
}
