//! Fleets that agree: three real `veer` processes sharing decisions through
//! a real etcd (Debian's `etcd-server`, started here on free loopback
//! ports).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::support::etcd::{etcd_tls, Etcd};
use super::support::{
    admin_post, admin_request_with, all_on, metric, route_config, veer_status_table, Load,
    Upstream, Veer, FAST_JUDGE,
};

/// A replica's config: one route with a canary at `weight`, the fast
/// judge, and `[fleet]` on `endpoints`.
fn replica_config(
    stable: &Upstream,
    canary: &Upstream,
    weight: f64,
    endpoints: &str,
    replica: &str,
    extra_fleet: &str,
) -> String {
    route_config(&[stable.addr], &[canary.addr], weight, "")
        + FAST_JUDGE
        + &format!(
            "[fleet]\nstore = \"etcd\"\nendpoints = [{endpoints}]\nname = \"checkout\"\nreplica = \"{replica}\"\n{extra_fleet}"
        )
}

/// The first route's `/status` entry and the fleet object, polled until
/// `ready` holds (panics after `limit`, naming `what`).
async fn wait_for(
    v: &Veer,
    what: &str,
    limit: Duration,
    ready: impl Fn(&serde_json::Value, &serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let s = v.status().await;
        let route = s["routes"][0].clone();
        if ready(&route, &s["fleet"]) {
            return route;
        }
        assert!(
            start.elapsed() < limit,
            "never {what}: {s}\nlogs:\n{}",
            v.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The route's `/status` reason says `says`.
fn assert_reason(route: &serde_json::Value, says: &str) {
    assert!(
        route["reason"].as_str().is_some_and(|r| r.contains(says)),
        "{route}"
    );
}

async fn wait_synced(v: &Veer) {
    wait_for(v, "synced", Duration::from_secs(10), |_, f| {
        f["synced"] == true && f["connected"] == true
    })
    .await;
}

fn reverted(r: &serde_json::Value) -> bool {
    r["verdict"] == "reverted" && r["weight"]["effective"] == 0.0
}

/// Every observation of `veer_fleet_propagation_seconds` on `v` was at
/// most a second.
async fn propagated_within_a_second(v: &Veer) -> f64 {
    let m = v.metrics().await;
    let count = metric(&m, "veer_fleet_propagation_seconds_count").unwrap_or(0.0);
    let within = metric(&m, "veer_fleet_propagation_seconds_bucket{le=\"1\"}").unwrap_or(0.0);
    assert!(count >= 1.0, "no fleet decision applied: {m}");
    assert_eq!(within, count, "a decision took over 1 s to arrive");
    metric(&m, "veer_fleet_propagation_seconds_sum").unwrap_or(0.0) / count
}

/// Two synced replicas r1 and r2 of one fleet, with their upstreams.
struct Pair {
    s: std::sync::Arc<Upstream>,
    c: std::sync::Arc<Upstream>,
    r1: Veer,
    r2: Veer,
}

impl Pair {
    async fn start(etcd: &Etcd) -> Pair {
        let s = Upstream::start("stable").await;
        let c = Upstream::start("canary").await;
        let ep = etcd.endpoints();
        let r1 = Veer::start(&replica_config(&s, &c, 20.0, &ep, "r1", "")).await;
        let r2 = Veer::start(&replica_config(&s, &c, 20.0, &ep, "r2", "")).await;
        // Synced, and seated: a canary gets traffic on a replica only once
        // its local tests have a seat from the store.
        for r in [&r1, &r2] {
            wait_synced(r).await;
            wait_for(r, "seated", Duration::from_secs(15), |r, _| {
                r["weight"]["effective"] == 20.0
            })
            .await;
        }
        Pair { s, c, r1, r2 }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_judges_revert_reaches_every_replica_and_a_reset_elsewhere_brings_the_canary_back() {
    let etcd = Etcd::single().await;
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let ep = etcd.endpoints();
    // Each replica judging alone: the revert is r1's judge's, and the
    // others apply it from the store. (Pooling, where every replica
    // reaches the same verdict at once, is tests/e2e/pool.rs.)
    let alone = "pool = false\n";
    let r1 = Veer::start(&replica_config(&s, &c, 20.0, &ep, "r1", alone)).await;
    let r2 = Veer::start(&replica_config(&s, &c, 20.0, &ep, "r2", alone)).await;
    let r3 = Veer::start(&replica_config(&s, &c, 20.0, &ep, "r3", alone)).await;
    for r in [&r1, &r2, &r3] {
        wait_synced(r).await;
    }
    wait_for(&r1, "three members", Duration::from_secs(10), |_, f| {
        f["members"].as_array().is_some_and(|m| m.len() == 3)
    })
    .await;

    // The canary fails; traffic goes through r1 only.
    c.status.store(500, Ordering::SeqCst);
    let load = Load::start(r1.addr, 4, Duration::ZERO);
    wait_for(
        &r1,
        "reverted by r1's judge",
        Duration::from_secs(15),
        |r, _| reverted(r),
    )
    .await;
    load.stop().await;
    for r in [&r2, &r3] {
        let route = wait_for(
            r,
            "reverted by the fleet",
            Duration::from_secs(5),
            |r, _| reverted(r),
        )
        .await;
        assert_eq!(route["fleet"]["source"], "fleet", "{route}");
        assert_eq!(route["fleet"]["by"], "r1", "{route}");
        let lag = propagated_within_a_second(r).await;
        eprintln!("revert propagated in {:.1} ms on average", lag * 1e3);
    }
    // `veer status` says where the decision came from.
    let table = veer_status_table(&r2).await;
    assert!(
        table.contains("fleet checkout (etcd) as r2: connected, decisions read"),
        "{table}"
    );
    assert!(table.contains("members: r1, r2, r3"), "{table}");
    assert!(
        table.contains("decision: fleet revert by r1, epoch 0"),
        "{table}"
    );

    // From then on r2 and r3 never route to the canary.
    let before = c.requests.load(Ordering::SeqCst);
    all_on(&r2, "stable", 200).await;
    all_on(&r3, "stable", 200).await;
    assert_eq!(c.requests.load(Ordering::SeqCst), before);
    let m = r2.metrics().await;
    assert_eq!(
        metric(
            &m,
            "veer_fleet_decisions_total{action=\"revert\",route=\"web\",source=\"fleet\"}"
        ),
        Some(1.0),
        "{m}"
    );

    // Fixed; an operator resets on r2, saying who and why: every replica
    // takes the canary back, and knows who reset it and why.
    c.status.store(200, Ordering::SeqCst);
    let token = std::fs::read_to_string(r2.dir.path().join("state/admin.token")).unwrap();
    let reset = admin_request_with(
        r2.admin,
        "POST",
        "/routes/web/reset",
        Some(token.trim()),
        r#"{"by": "alice", "reason": "v2.1 fixes the 500s"}"#,
    )
    .await;
    assert_eq!(reset, 200);
    for r in [&r1, &r2, &r3] {
        let route = wait_for(r, "reset everywhere", Duration::from_secs(5), |r, _| {
            r["reverted"].is_null() && r["weight"]["effective"] == 20.0
        })
        .await;
        assert_eq!(route["fleet"]["epoch"], 1, "{route}");
        assert_eq!(route["last_action"]["action"], "reset", "{route}");
        assert_eq!(
            route["last_action"]["said"], "alice: v2.1 fixes the 500s",
            "{route}"
        );
    }
    let r1_route = r1.status().await["routes"][0].clone();
    assert_eq!(r1_route["fleet"]["by"], "r2", "{r1_route}");
    assert_eq!(r1_route["fleet"]["change"], "reset", "{r1_route}");
    // The replica asked announces the action with who and why (its webhook
    // event's `said`); the others log it as the fleet's, with them too.
    let asked = r2.logs_with_at_least("operator action", 1).await;
    assert_eq!(
        asked[0]["said"], "alice: v2.1 fixes the 500s",
        "{}",
        asked[0]
    );
    let said_on_r1 = |l: &serde_json::Value| {
        l["message"] == "fleet decision applied"
            && l["change"] == "reset"
            && l["said"] == "alice: v2.1 fixes the 500s"
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !r1
        .logs_with("fleet decision applied")
        .iter()
        .any(said_on_r1)
    {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            r1.logs_with("fleet decision applied")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let table = veer_status_table(&r3).await;
    assert!(
        table.contains("last operator action: reset (alice: v2.1 fixes the 500s) at "),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_after_a_revert_never_routes_to_the_canary() {
    let etcd = Etcd::single().await;
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let ep = etcd.endpoints();
    let r1 = Veer::start(&replica_config(&s, &c, 50.0, &ep, "r1", "")).await;
    wait_synced(&r1).await;
    assert_eq!(admin_post(&r1, "/routes/web/revert").await, 200);
    wait_for(
        &r1,
        "the revert published",
        Duration::from_secs(5),
        |r, _| reverted(r) && r["fleet"]["unpublished"] == false,
    )
    .await;

    // A new replica with an empty state dir (a rescheduled pod's
    // emptyDir): traffic from its first ready moment.
    let before = c.requests.load(Ordering::SeqCst);
    let r2 = Veer::start(&replica_config(&s, &c, 50.0, &ep, "r2", "")).await;
    let load = Load::start(r2.addr, 4, Duration::ZERO);
    wait_for(
        &r2,
        "reverted from the fleet",
        Duration::from_secs(5),
        |r, _| reverted(r),
    )
    .await;
    all_on(&r2, "stable", 300).await;
    let sent = load.stop().await;
    assert!(sent > 0);
    assert_eq!(
        c.requests.load(Ordering::SeqCst),
        before,
        "a new replica routed to a canary the fleet had reverted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_a_replica_still_reverts_refuses_reset_and_publishes_when_it_is_back() {
    let mut etcd = Etcd::single().await;
    let Pair { s: _s, c, r1, r2 } = Pair::start(&etcd).await;

    etcd.members[0].kill();
    wait_for(&r1, "disconnected", Duration::from_secs(10), |_, f| {
        f["connected"] == false
    })
    .await;
    let m = r1.metrics().await;
    assert_eq!(metric(&m, "veer_fleet_connected"), Some(0.0), "{m}");

    // Toward stable is never blocked: r1's judge reverts on its own.
    c.status.store(500, Ordering::SeqCst);
    let load = Load::start(r1.addr, 4, Duration::ZERO);
    let route = wait_for(&r1, "reverted locally", Duration::from_secs(15), |r, _| {
        reverted(r)
    })
    .await;
    load.stop().await;
    assert_eq!(route["fleet"]["unpublished"], true, "{route}");
    // Away from stable needs the store: refused, nothing changed.
    assert_eq!(admin_post(&r1, "/routes/web/reset").await, 503);
    assert_eq!(admin_post(&r2, "/routes/web/promote").await, 503);
    assert!(reverted(&r1.status().await["routes"][0]));
    assert_eq!(r2.status().await["routes"][0]["promoted"], false);

    // etcd is back: the revert reaches r2.
    etcd.members[0].restart().await;
    let route = wait_for(
        &r2,
        "reverted after etcd came back",
        Duration::from_secs(15),
        |r, _| reverted(r),
    )
    .await;
    assert_eq!(route["fleet"]["by"], "r1", "{route}");
    wait_for(&r1, "published", Duration::from_secs(10), |r, _| {
        r["fleet"]["unpublished"] == false
    })
    .await;
    c.status.store(200, Ordering::SeqCst);
    assert_eq!(admin_post(&r1, "/routes/web/reset").await, 200);
    wait_for(&r2, "reset from r1", Duration::from_secs(5), |r, _| {
        r["reverted"].is_null()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_reach_the_store_serves_stable_only_and_says_so() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let dead = super::support::dead_addr().await;
    let config = replica_config(&s, &c, 50.0, &format!("\"http://{dead}\""), "lonely", "")
        .replacen(
            "[route.stable]",
            "[route.force]\nheader = \"x-veer-version\"\n[route.stable]",
            1,
        );
    let v = Veer::start(&config).await;
    let route = v.status().await["routes"][0].clone();
    assert_eq!(route["weight"]["effective"], 0.0, "{route}");
    assert_eq!(route["fleet"]["source"], "waiting", "{route}");
    assert!(
        route["reason"]
            .as_str()
            .unwrap_or("")
            .contains("waiting for the fleet"),
        "{route}"
    );
    all_on(&v, "stable", 200).await;
    assert_eq!(c.requests.load(Ordering::SeqCst), 0);
    // Forced requests do not reach the canary either.
    let r = super::support::get(v.addr, "/", &[("x-veer-version", "canary")])
        .await
        .unwrap();
    assert_eq!(r.headers()["x-upstream"], "stable");
    assert_eq!(admin_post(&v, "/routes/web/reset").await, 503);
    // A revert is never refused.
    assert_eq!(admin_post(&v, "/routes/web/revert").await, 200);
    let s = v.status().await;
    assert_eq!(s["fleet"]["synced"], false, "{s}");
    assert!(s["fleet"]["last_error"].is_string(), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_etcd_with_its_leader_killed_keeps_the_fleet_deciding() {
    let mut etcd = Etcd::cluster().await;
    let Pair { r1, r2, .. } = Pair::start(&etcd).await;

    let leader = etcd.leader().await;
    etcd.members[leader].kill();
    let t = Instant::now();
    assert_eq!(admin_post(&r1, "/routes/web/revert").await, 200);
    wait_for(
        &r2,
        "reverted through a new leader",
        Duration::from_secs(10),
        |r, _| reverted(r),
    )
    .await;
    eprintln!(
        "revert reached r2 {:?} after the leader was killed",
        t.elapsed()
    );
    // Actions that need a commit work again once a new leader is elected.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match admin_post(&r2, "/routes/web/reset").await {
            200 => break,
            503 if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            code => panic!("reset answered {code}"),
        }
    }
    wait_for(&r1, "reset from r2", Duration::from_secs(5), |r, _| {
        r["reverted"].is_null() && r["weight"]["effective"] == 20.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_decisions_over_mutual_tls_and_a_replica_without_a_client_certificate_stays_safe(
) {
    let dir = tempfile::tempdir().unwrap();
    let tls = etcd_tls(dir.path());
    let etcd = Etcd::with_tls(&tls).await;
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let ep = etcd.endpoints();
    let files = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        tls.ca.display(),
        tls.client_cert.display(),
        tls.client_key.display()
    );
    let r1 = Veer::start(&replica_config(&s, &c, 20.0, &ep, "r1", &files)).await;
    let r2 = Veer::start(&replica_config(&s, &c, 20.0, &ep, "r2", &files)).await;
    let no_cert = format!("ca_file = \"{}\"\n", tls.ca.display());
    let r3 = Veer::start(&replica_config(&s, &c, 20.0, &ep, "r3", &no_cert)).await;
    wait_synced(&r1).await;
    wait_synced(&r2).await;
    assert_eq!(admin_post(&r1, "/routes/web/revert").await, 200);
    wait_for(&r2, "reverted over TLS", Duration::from_secs(5), |r, _| {
        reverted(r)
    })
    .await;
    // etcd refuses r3 (no client certificate): it never reads the
    // fleet's decisions, so its canary gets nothing.
    let s3 = r3.status().await;
    assert_eq!(s3["fleet"]["synced"], false, "{s3}");
    assert_eq!(s3["routes"][0]["weight"]["effective"], 0.0, "{s3}");
    // The client certificate's expiry is exported (its alert covers it).
    let pem = std::fs::read(&tls.client_cert).unwrap();
    let (_, leaf) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let not_after = leaf.parse_x509().unwrap().validity().not_after.timestamp();
    let series = format!(
        "veer_tls_certificate_expiry_timestamp_seconds{{certificate=\"{}\"}}",
        tls.client_cert.display()
    );
    assert_eq!(metric(&r1.metrics().await, &series), Some(not_after as f64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_steps_its_rollout_once_and_together() {
    let etcd = Etcd::single().await;
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let ep = etcd.endpoints();
    let rollout = "[route.rollout]\nsteps = [10, 50, 100]\nhold = \"2s\"\n";
    let r1 = Veer::start(&(replica_config(&s, &c, 10.0, &ep, "r1", "") + rollout)).await;
    let r2 = Veer::start(&(replica_config(&s, &c, 10.0, &ep, "r2", "") + rollout)).await;
    wait_synced(&r1).await;
    wait_synced(&r2).await;
    let l1 = Load::start(r1.addr, 2, Duration::from_millis(2));
    let l2 = Load::start(r2.addr, 2, Duration::from_millis(2));
    for r in [&r1, &r2] {
        wait_for(r, "stepped to 50 %", Duration::from_secs(30), |r, _| {
            r["weight"]["effective"].as_f64() >= Some(50.0)
        })
        .await;
    }
    l1.stop().await;
    l2.stop().await;
    // Without traffic no step is due: both replicas settle on one step.
    let step = wait_for(&r1, "one step", Duration::from_secs(5), |r, _| {
        r["rollout"]["step"].as_u64().is_some()
    })
    .await["rollout"]["step"]
        .as_u64()
        .unwrap();
    wait_for(&r2, "the same step", Duration::from_secs(5), |r, _| {
        r["rollout"]["step"].as_u64() == Some(step)
    })
    .await;
    // Each step was taken once in the fleet (by whichever replica's
    // proposal committed first) and applied by the other.
    let count = |m: &str, source: &str| {
        metric(
            m,
            &format!(
                "veer_fleet_decisions_total{{action=\"step\",route=\"web\",source=\"{source}\"}}"
            ),
        )
        .unwrap_or(0.0) as u64
    };
    let (m1, m2) = (r1.metrics().await, r2.metrics().await);
    assert_eq!(
        count(&m1, "local") + count(&m2, "local"),
        step,
        "{m1}\n{m2}"
    );
    assert_eq!(count(&m1, "local") + count(&m1, "fleet"), step, "{m1}");
    assert_eq!(count(&m2, "local") + count(&m2, "fleet"), step, "{m2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_watch_history_was_compacted_reads_every_decision_again() {
    let mut etcd = Etcd::single().await;
    let Pair { r1, r2, .. } = Pair::start(&etcd).await;
    // r2 stops (a long GC pause, a frozen node); its connection to the
    // store breaks; r1 reverts and the store compacts its history before
    // r2 runs again.
    let signal = |sig: &str, pid: u32| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP", r2.pid());
    etcd.members[0].kill();
    etcd.members[0].restart().await;
    // Several writes, so that the compaction passes the revision r2 would
    // resume from.
    for action in ["revert", "reset", "revert"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while admin_post(&r1, &format!("/routes/web/{action}")).await != 200 {
            assert!(Instant::now() < deadline, "{action} never committed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    wait_for(
        &r1,
        "the revert published",
        Duration::from_secs(10),
        |r, _| reverted(r) && r["fleet"]["unpublished"] == false && r["fleet"]["epoch"] == 1,
    )
    .await;
    etcd.compact().await;
    signal("-CONT", r2.pid());
    let route = wait_for(
        &r2,
        "reverted after a re-read",
        Duration::from_secs(15),
        |r, _| reverted(r),
    )
    .await;
    assert_eq!(route["fleet"]["by"], "r1", "{route}");
    assert_eq!(route["fleet"]["epoch"], 1, "{route}");
    assert!(
        r2.logs_containing("compacted").await.contains("compacted"),
        "the watch did not report the compaction:\n{}",
        r2.all_logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_canary_gets_no_traffic_until_its_seat_is_taken_and_etcd_being_down_delays_it() {
    let mut etcd = Etcd::single().await;
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let c2 = Upstream::start("canary2").await;
    let ep = etcd.endpoints();
    let r1 = Veer::start(&replica_config(&s, &c, 50.0, &ep, "r1", "")).await;
    wait_synced(&r1).await;
    wait_for(&r1, "seated", Duration::from_secs(10), |r, _| {
        r["evidence"]["pool"]["seat"].is_u64() && r["weight"]["effective"] == 50.0
    })
    .await;

    etcd.members[0].kill();
    wait_for(&r1, "disconnected", Duration::from_secs(10), |_, f| {
        f["connected"] == false
    })
    .await;
    // A new canary (other endpoints: a new identity) while the store is
    // down: its local tests cannot take a seat, and the pooled tests
    // cannot hear the fleet, so nothing here could take it out. It gets
    // no traffic, and /status says why.
    r1.write_config(&replica_config(&s, &c2, 50.0, &ep, "r1", ""));
    let c2_addr = c2.addr.to_string();
    let route = wait_for(
        &r1,
        "the new canary held",
        Duration::from_secs(10),
        |r, _| r["canary"]["endpoints"][0]["addr"] == c2_addr.as_str(),
    )
    .await;
    assert_eq!(route["weight"]["effective"], 0.0, "{route}");
    assert_reason(&route, "waiting for a seat");
    all_on(&r1, "stable", 200).await;

    // The store is back: the seat is taken and the canary gets its share.
    etcd.members[0].restart().await;
    let route = wait_for(
        &r1,
        "seated once etcd is back",
        Duration::from_secs(30),
        |r, _| r["weight"]["effective"] == 50.0,
    )
    .await;
    assert!(route["evidence"]["pool"]["seat"].is_u64(), "{route}");
    let mut client = super::support::Client::connect(r1.addr).await.unwrap();
    let mut on_canary = 0;
    for i in 0..200 {
        let r = client
            .get("/", &[("x-user-id", &format!("after-{i}"))])
            .await
            .unwrap();
        on_canary += usize::from(r.headers()["x-upstream"] == "canary2");
    }
    assert!(
        on_canary > 50,
        "{on_canary} of 200 keys on the canary at 50 %"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_found_every_seat_taken_holds_the_canary_while_etcd_is_down() {
    let mut etcd = Etcd::single().await;
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let ep = etcd.endpoints();
    // One seat: r1 takes it, r2 finds it taken and judges on the pooled
    // tests and its guards only.
    let r1 = Veer::start(&replica_config(&s, &c, 50.0, &ep, "r1", "seats = 1\n")).await;
    wait_for(&r1, "seated", Duration::from_secs(10), |r, _| {
        r["evidence"]["pool"]["seat"] == 0 && r["weight"]["effective"] == 50.0
    })
    .await;
    let r2 = Veer::start(&replica_config(&s, &c, 50.0, &ep, "r2", "seats = 1\n")).await;
    wait_for(
        &r2,
        "told every seat is taken",
        Duration::from_secs(10),
        |r, _| r["evidence"]["pool"]["seat"] == 1 && r["weight"]["effective"] == 50.0,
    )
    .await;

    // The store goes: r2's pooled tests hear nothing, its local tests may
    // not act, so nothing but the guards could take the canary out there.
    // It gets no traffic on r2, and /status says why; r1, seated, keeps
    // its share and its local tests.
    etcd.members[0].kill();
    let route = wait_for(&r2, "the canary held", Duration::from_secs(10), |r, f| {
        f["connected"] == false && r["weight"]["effective"] == 0.0
    })
    .await;
    assert_reason(&route, "every seat");
    all_on(&r2, "stable", 200).await;
    let route = wait_for(&r1, "disconnected", Duration::from_secs(10), |_, f| {
        f["connected"] == false
    })
    .await;
    assert_eq!(route["weight"]["effective"], 50.0, "{route}");

    // The store is back: the canary gets its share on r2 again.
    etcd.members[0].restart().await;
    wait_for(
        &r2,
        "let in once etcd is back",
        Duration::from_secs(30),
        |r, f| f["connected"] == true && r["weight"]["effective"] == 50.0,
    )
    .await;
}

/// Two replicas given one name (`[fleet] replica`: two veers on one host
/// both on the host name): the second stays out of the fleet, saying why,
/// instead of writing one evidence log and taking seats under the first's
/// name; a revert it takes still reaches the fleet. Once the first has
/// left (its member key revoked as it stops), the second joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_of_one_name_stays_out_until_the_first_has_left() {
    let etcd = Etcd::single().await;
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let ep = etcd.endpoints();
    let mut first = Veer::start(&replica_config(&s, &c, 50.0, &ep, "r1", "")).await;
    wait_synced(&first).await;
    let second = Veer::start(&replica_config(&s, &c, 50.0, &ep, "r1", "")).await;
    wait_for(&second, "kept out", Duration::from_secs(20), |_, f| {
        f["last_error"].as_str().is_some_and(|e| {
            e.starts_with("another veer is in the fleet as replica \"r1\" (instance ")
        })
    })
    .await;
    let fleet = second.status().await["fleet"].clone();
    assert_eq!(fleet["connected"], false, "{fleet}");
    assert_eq!(fleet["kept_out"], true, "{fleet}");
    let m = second.metrics().await;
    assert_eq!(metric(&m, "veer_fleet_kept_out"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "veer_fleet_connected"), Some(0.0), "{m}");
    let text = veer_status_table(&second).await;
    assert!(
        text.contains(
            "fleet checkout (etcd) as r1: KEPT OUT (another veer holds this replica's name)"
        ),
        "{text}"
    );
    let said = second
        .logs_with_at_least(
            "kept out of the fleet: another veer holds this replica's name; its reverts are published, other actions are refused",
            1,
        )
        .await;
    assert_eq!(said[0]["replica"], "r1", "{}", said[0]);
    let fleet = first.status().await["fleet"].clone();
    assert_eq!(fleet["connected"], true, "{fleet}");
    assert_eq!(fleet["kept_out"], false, "{fleet}");
    assert_eq!(fleet["members"], serde_json::json!(["r1"]), "{fleet}");
    let m = first.metrics().await;
    assert_eq!(metric(&m, "veer_fleet_kept_out"), Some(0.0), "{m}");

    // Toward stable is never blocked: its revert reaches the first.
    assert_eq!(admin_post(&second, "/routes/web/revert").await, 200);
    wait_for(
        &first,
        "the kept-out replica's revert",
        Duration::from_secs(20),
        |r, _| reverted(r),
    )
    .await;

    let held_by = second.status().await["fleet"]["last_error"]
        .as_str()
        .expect("kept out, saying why")
        .to_string();
    let first_instance = held_by
        .split("(instance ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .expect("the holder's instance")
        .to_string();
    first.terminate();
    assert!(first.wait_exit(Duration::from_secs(60)).await.success());
    // It left as it stopped (its lease revoked), not 10 s later when its
    // lease ran out: its member key is gone, or already the second's.
    if let Some(v) = etcd.value("/veer/v1/checkout/members/r1").await {
        let v: serde_json::Value = serde_json::from_slice(&v).expect("a member's JSON");
        assert_ne!(v["instance"], first_instance.as_str(), "{v}");
    }
    wait_for(&second, "joined", Duration::from_secs(30), |_, f| {
        f["connected"] == true && f["members"] == serde_json::json!(["r1"])
    })
    .await;
    assert_eq!(second.status().await["fleet"]["kept_out"], false);
    let m = second.metrics().await;
    assert_eq!(metric(&m, "veer_fleet_kept_out"), Some(0.0), "{m}");
}
