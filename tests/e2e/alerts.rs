//! The alert rules fire on what the binary exports: a real Prometheus
//! (Debian's `prometheus`, which `.ci/run` installs) scrapes a real veer
//! every second with `deploy/prometheus/veer-alerts.yaml` through a revert
//! and a rejected reload, and both alerts fire; and through a canary that
//! hangs behind impatient clients, which fires the page for it. Others
//! hold their alert's condition on the state they are about (an endpoint
//! out, a state dir unwritable, a fleet replica kept out).

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::support::{
    get, reference_judge, route_config, wait_verdict, HangingCanary, Load, Upstream, Veer,
    FAST_JUDGE as JUDGE,
};

/// A Prometheus server, killed on drop.
struct Prometheus {
    child: Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts one scraping `target` every second with veer's alert rules.
    async fn start(target: std::net::SocketAddr) -> Prometheus {
        let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/prometheus/veer-alerts.yaml")
            .canonicalize()
            .expect("deploy/prometheus/veer-alerts.yaml");
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: veer\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .expect("prometheus.yml");
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().expect("addr")
        };
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian's prometheus package; .ci/run installs it)");
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        p.wait_for("ready", |p| async move {
            get(p, "/-/ready", &[])
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        p
    }

    /// The `data` of an API answer (`/api/v1/...`).
    async fn api(&self, path_and_query: &str) -> serde_json::Value {
        match get(self.addr, path_and_query, &[]).await {
            Ok(r) => serde_json::from_slice::<serde_json::Value>(r.body())
                .map(|v| v["data"].clone())
                .unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        }
    }

    /// Polls the expression of the shipped alert `alert` (without its
    /// `for`) until its result holds series (`held`) or none, and returns
    /// that result; panics after 60 s, saying the condition never `what`.
    async fn condition(&self, alert: &str, held: bool, what: &str) -> serde_json::Value {
        let query = format!("/api/v1/query?query={}", url_encoded(&alert_expr(alert)));
        let start = Instant::now();
        loop {
            let data = self.api(&query).await;
            if data["result"]
                .as_array()
                .is_some_and(|r| r.is_empty() != held)
            {
                return data["result"].clone();
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{alert}'s condition never {what}: {data}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls until `query` has `n` series (scraped), for 60 s.
    async fn wait_series(&self, query: &str, n: usize) {
        self.wait_for(&format!("scraped {n} series of {query}"), |_| async {
            let query = format!("/api/v1/query?query={}", url_encoded(query));
            let data = self.api(&query).await;
            data["result"].as_array().is_some_and(|r| r.len() == n)
        })
        .await;
    }

    /// Polls `check` every 200 ms for 60 s.
    async fn wait_for<F, Fut>(&self, what: &str, check: F)
    where
        F: Fn(std::net::SocketAddr) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        while !check(self.addr).await {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "prometheus never {what}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The names of the alerts firing now.
    async fn firing(&self) -> Vec<String> {
        let data = self.api("/api/v1/alerts").await;
        data["alerts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["state"] == "firing")
                    .filter_map(|x| x["labels"]["alertname"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Polls every 200 ms until every alert of `names` fires; fails after
    /// `limit` with what Prometheus had.
    async fn wait_firing(&self, names: &[&str], limit: Duration) {
        let start = Instant::now();
        loop {
            let firing = self.firing().await;
            if names.iter().all(|n| firing.iter().any(|a| a == n)) {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "firing: {firing:?}, not all of {names:?}; alerts: {}",
                self.api("/api/v1/alerts").await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alerts_fire_on_real_scrapes_of_a_revert_and_a_rejected_reload() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.status.store(500, Ordering::SeqCst);
    let config = route_config(&[s.addr], &[c.addr], 20.0, "") + JUDGE;
    let veer = Veer::start(&config).await;
    let prom = Prometheus::start(veer.admin).await;
    // Scraped at least twice before anything happens: the counters' zeros
    // are what `increase()` needs.
    let scrapes = "/api/v1/query?query=count_over_time(veer_reverts_total%7Breason%3D%22failure_burst%22%7D%5B1m%5D)";
    let start = Instant::now();
    loop {
        let data = prom.api(scrapes).await;
        let n = data["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if n >= 2.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never scraped twice: {data}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(prom.firing().await.is_empty(), "{:?}", prom.firing().await);

    let load = Load::start(veer.addr, 4, Duration::ZERO);
    wait_verdict(&veer, "reverted", Duration::from_secs(20)).await;
    load.stop().await;
    veer.write_config("this is not [toml");
    prom.wait_firing(
        &["VeerCanaryReverted", "VeerConfigReloadFailing"],
        Duration::from_secs(60),
    )
    .await;
}

/// A canary that never answers, behind clients that leave after 300 ms,
/// on a route whose judge only observes (as a cautious first rollout
/// runs): nothing takes it out, and its clients' given-up requests page
/// (`VeerCanaryRequestsGivenUp`) once that has lasted a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_giving_up_on_a_hanging_canary_page_on_real_scrapes() {
    let judge = reference_judge().replace("mode = \"enforce\"", "mode = \"observe\"");
    assert!(judge.contains("mode = \"observe\""), "{judge}");
    let pair = HangingCanary::start(&judge).await;
    let veer = &pair.veer;
    let prom = Prometheus::start(veer.admin).await;
    let load = Load::impatient(veer.addr, 8, Duration::from_millis(300));
    // Pending for its minute, then firing.
    prom.wait_firing(&["VeerCanaryRequestsGivenUp"], Duration::from_secs(120))
        .await;
    load.stop().await;
    let alerts = prom.api("/api/v1/alerts").await;
    let page = alerts["alerts"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|x| x["labels"]["alertname"] == "VeerCanaryRequestsGivenUp")
        })
        .cloned()
        .unwrap_or_default();
    assert_eq!(page["labels"]["route"], "web", "{page}");
    assert_eq!(page["labels"]["version"], "v2", "{page}");
    assert_eq!(page["labels"]["severity"], "page", "{page}");
}

/// The expression of the shipped alert `name`.
fn alert_expr(name: &str) -> String {
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/prometheus/veer-alerts.yaml");
    let text = std::fs::read_to_string(rules).expect("deploy/prometheus/veer-alerts.yaml");
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("YAML");
    doc["groups"][0]["rules"]
        .as_sequence()
        .and_then(|rules| rules.iter().find(|r| r["alert"].as_str() == Some(name)))
        .and_then(|r| r["expr"].as_str())
        .map(String::from)
        .unwrap_or_else(|| panic!("no alert {name}"))
}

/// `query` as a URL query's value: every byte but letters and digits
/// percent-encoded.
fn url_encoded(query: &str) -> String {
    query
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The latency alert's expression (its condition, without its `for`), run
/// by a real Prometheus on real scrapes: a canary answering in 1.2 s is
/// over 1 s by its window's p99 (the version's own time), stable is not,
/// and the client-side histogram's fallback adds no second series for a
/// route the judge records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latency_alert_reads_a_slow_versions_own_time_on_real_scrapes() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    c.delay_ms.store(1_200, Ordering::SeqCst);
    // Observed, not enforced: a slow canary stays in traffic.
    let config = route_config(&[s.addr], &[c.addr], 50.0, "") + JUDGE + "mode = \"observe\"\n";
    let veer = Veer::start(&config).await;
    let prom = Prometheus::start(veer.admin).await;
    let load = Load::start(veer.addr, 8, Duration::ZERO);
    let query = format!(
        "/api/v1/query?query={}",
        url_encoded(&alert_expr("VeerLatencyP99High"))
    );
    let start = Instant::now();
    let result = loop {
        let data = prom.api(&query).await;
        if data["result"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x["metric"]["version"] == "v2"))
        {
            break data["result"].clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the condition never held for the slow canary: {data}; veer: {}",
            veer.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    load.stop().await;
    let series = result.as_array().cloned().unwrap_or_default();
    assert_eq!(series.len(), 1, "only the canary, once: {result}");
    assert_eq!(series[0]["metric"]["route"], "web", "{result}");
    let p99 = series[0]["value"][1]
        .as_str()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!((1.0..2.0).contains(&p99), "{result}");
}

/// The certificate alert's expression (without its `for`), run by a real
/// Prometheus on real scrapes: veer serving a certificate that expires in
/// 3 days (and another with a year left) shows the first's expiry, the
/// condition holds for it alone, and no longer once its files are renewed.
/// The same for the revocation list alert: a client_crl list a day past
/// its nextUpdate, then a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_alert_reads_each_served_certificates_expiry_on_real_scrapes() {
    let s = Upstream::start("stable").await;
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_path_buf();
    let write = |file: &str, name: &str, days: i64| {
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        let not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
        params.not_after = not_after;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        // Written aside, then moved in: a reader never sees half a file.
        for (ext, text) in [("key", key.serialize_pem()), ("crt", cert.pem())] {
            let new = dir_path.join(format!("{file}.{ext}.new"));
            std::fs::write(&new, text).unwrap();
            std::fs::rename(&new, dir_path.join(format!("{file}.{ext}"))).unwrap();
        }
        not_after.unix_timestamp()
    };
    let soon = write("soon", "shop.example", 3);
    write("later", "pay.example", 365);
    let ca = super::upstreams::TestCa::new("clients");
    std::fs::write(dir_path.join("clients.pem"), ca.pem()).unwrap();
    let crl = |days: i64| {
        let list = ca.revoking(1, &[], time::Duration::days(days));
        let new = dir_path.join("clients.crl.new");
        std::fs::write(&new, list).unwrap();
        std::fs::rename(&new, dir_path.join("clients.crl")).unwrap();
    };
    crl(-1);
    let config = super::support::with_tls(
        &route_config(&[s.addr], &[], 0.0, ""),
        "cert = \"soon.crt\"\nkey = \"soon.key\"\nclient_ca = \"clients.pem\"\nclient_crl = \"clients.crl\"\n[[proxy.tls.certificates]]\ncert = \"later.crt\"\nkey = \"later.key\"\n",
    );
    let veer = Veer::start_in_dir(dir, &config).await;
    // `veer check` says so, and takes the config.
    let path = dir_path.join("veer.toml");
    let out = super::support::veer_cli(&["check", "--config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("soon.crt expires in ") && !err.contains("later.crt"),
        "{err}"
    );
    let m = veer.metrics().await;
    let soon_file = dir_path.join("soon.crt").display().to_string();
    assert!(
        m.contains(&format!(
            "veer_tls_certificate_expiry_timestamp_seconds{{certificate=\"{soon_file}\"}} {soon}"
        )),
        "{m}"
    );
    let prom = Prometheus::start(veer.admin).await;
    let result = prom
        .condition(
            "VeerTlsCertificateExpiresSoon",
            true,
            "held for the certificate expiring in 3 days",
        )
        .await;
    let series = result.as_array().cloned().unwrap_or_default();
    assert_eq!(series.len(), 1, "only the one expiring soon: {result}");
    assert_eq!(
        series[0]["metric"]["certificate"],
        soon_file.as_str(),
        "{result}"
    );
    let left = series[0]["value"][1]
        .as_str()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!((2.9 * 86_400.0..3.0 * 86_400.0).contains(&left), "{result}");

    // Renewed: the condition no longer holds.
    write("soon", "shop.example", 90);
    prom.condition(
        "VeerTlsCertificateExpiresSoon",
        false,
        "ended after renewal",
    )
    .await;

    // The revocation list, a day past its nextUpdate; then a fresh one.
    let crl_file = dir_path.join("clients.crl").display().to_string();
    let result = prom
        .condition("VeerTlsCrlStale", true, "held for the stale list")
        .await;
    assert_eq!(result[0]["metric"]["crl"], crl_file.as_str(), "{result}");
    crl(7);
    prom.condition("VeerTlsCrlStale", false, "ended with a fresh list")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_out_by_its_health_check_holds_the_health_check_alerts_condition() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let config = route_config(&[a.addr, b.addr], &[], 0.0, "")
        + "[route.health_check]\npath = \"/healthz\"\ninterval = \"500ms\"\ntimeout = \"400ms\"\nunhealthy = 2\n";
    let veer = Veer::start(&config).await;
    b.status.store(503, Ordering::SeqCst);
    let prom = Prometheus::start(veer.admin).await;
    let result = prom
        .condition(
            "VeerEndpointHealthCheckFailing",
            true,
            "held for the endpoint answering 503",
        )
        .await;
    let series = result.as_array().cloned().unwrap_or_default();
    assert_eq!(series.len(), 1, "only b: {result}");
    assert_eq!(
        series[0]["metric"]["endpoint"],
        b.addr.to_string().as_str(),
        "{result}"
    );
    b.status.store(200, Ordering::SeqCst);
    prom.condition(
        "VeerEndpointHealthCheckFailing",
        false,
        "ended once the endpoint passed again",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_ejected_by_outlier_detection_holds_the_ejection_alerts_condition() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let config = route_config(&[a.addr, b.addr], &[], 0.0, "")
        + "[route.outlier_detection]\nconsecutive_errors = 2\nejection_time = \"1h\"\n";
    let veer = Veer::start(&config).await;
    let prom = Prometheus::start(veer.admin).await;
    // Exported at 0 before any ejection: scraped once, the condition does
    // not hold.
    prom.wait_for("scraped the ejections' count at 0", |_| async {
        let data = prom
            .api("/api/v1/query?query=veer_outlier_ejections_total")
            .await;
        data["result"].as_array().is_some_and(|r| r.len() == 1)
    })
    .await;
    prom.condition(
        "VeerEndpointsEjected",
        false,
        "stayed off before any ejection",
    )
    .await;
    b.status.store(503, Ordering::SeqCst);
    let mut client = super::support::Client::connect(veer.addr)
        .await
        .expect("connect");
    // Forty keys, about half of them b's: its second 503 ejects it.
    for i in 0..40 {
        let key = format!("user-{i}");
        client
            .get("/", &[("x-user-id", &key)])
            .await
            .expect("answered");
    }
    let lines = veer.logs_with_at_least(super::outlier::EJECTED, 1).await;
    assert_eq!(lines.len(), 1, "b ejected once");
    let result = prom
        .condition("VeerEndpointsEjected", true, "held after the ejection")
        .await;
    assert_eq!(result[0]["metric"]["version"], "v1", "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_retry_budget_holds_the_retry_alerts_condition() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let config = route_config(&[a.addr, b.addr], &[], 0.0, "")
        + "[route.retry]\non = [\"503\"]\nbudget_percent = 1\n";
    let veer = Veer::start(&config).await;
    let prom = Prometheus::start(veer.admin).await;
    // Exported at 0 before any retry: scraped once, the condition does not
    // hold.
    prom.wait_series("veer_retries_total{result=\"budget_spent\"}", 1)
        .await;
    prom.condition(
        "VeerRetryBudgetSpent",
        false,
        "stayed off before the budget was spent",
    )
    .await;
    // Both endpoints fail: retries run until the budget (10 a second over
    // 10 s, plus 1 %) is spent.
    a.status.store(503, Ordering::SeqCst);
    b.status.store(503, Ordering::SeqCst);
    let mut client = super::support::Client::connect(veer.addr)
        .await
        .expect("connect");
    let mut sent = 0;
    let series = "veer_retries_total{result=\"budget_spent\",route=\"web\",version=\"v1\"}";
    while super::support::metric(&veer.metrics().await, series).unwrap_or(0.0) == 0.0 {
        for _ in 0..50 {
            let key = format!("user-{sent}");
            client
                .get("/", &[("x-user-id", &key)])
                .await
                .expect("answered");
            sent += 1;
        }
        assert!(sent < 5_000, "the budget never ran out");
    }
    let result = prom
        .condition(
            "VeerRetryBudgetSpent",
            true,
            "held once the budget was spent",
        )
        .await;
    assert_eq!(result[0]["metric"]["version"], "v1", "{result}");
}

/// A state dir veer cannot write (here its temporary file's name taken by
/// a directory) holds `VeerStateNotPersisted`'s condition on real scrapes
/// once a decision's write fails, and the write tried again once the
/// disk takes it ends it: a revert that would not outlive a restart had
/// only a log line and `/status` to say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_that_cannot_be_written_holds_the_state_alerts_condition() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let veer = Veer::start(&route_config(&[s.addr], &[c.addr], 20.0, "")).await;
    let prom = Prometheus::start(veer.admin).await;
    prom.wait_series("veer_state_persisted", 1).await;
    prom.condition(
        "VeerStateNotPersisted",
        false,
        "stayed off before a write failed",
    )
    .await;
    let blocker = veer.dir.path().join("state/.state.json.tmp");
    std::fs::create_dir(&blocker).expect("a directory where the write's file goes");
    // A revert is applied whether or not its write succeeds.
    assert_eq!(
        super::support::admin_post(&veer, "/routes/web/revert").await,
        200
    );
    prom.condition("VeerStateNotPersisted", true, "held after the write failed")
        .await;
    std::fs::remove_dir(&blocker).expect("the directory removed");
    prom.condition(
        "VeerStateNotPersisted",
        false,
        "ended once the write was tried again and reached the disk",
    )
    .await;
    let saved =
        std::fs::read_to_string(veer.dir.path().join("state/state.json")).expect("state.json");
    assert!(saved.contains("\"reverted\""), "{saved}");
}

/// Two replicas given one name (`[fleet] replica`): the second, kept out
/// of the fleet, holds `VeerFleetReplicaNameTaken`'s condition on real
/// scrapes and not `VeerFleetStoreUnreachable`'s (its etcd answers: that
/// alert would send an operator to a healthy store), until the first
/// leaves and it joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_kept_out_for_its_name_holds_the_name_alerts_condition_not_the_stores() {
    let etcd = super::support::etcd::Etcd::single().await;
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let config = route_config(&[s.addr], &[c.addr], 20.0, "")
        + &format!(
            "[fleet]\nstore = \"etcd\"\nendpoints = [{}]\nname = \"checkout\"\nreplica = \"r1\"\n",
            etcd.endpoints()
        );
    let mut first = Veer::start(&config).await;
    let start = Instant::now();
    while first.status().await["fleet"]["connected"] != true {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the first replica never joined: {}",
            first.status().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = Veer::start(&config).await;
    let prom = Prometheus::start(second.admin).await;
    prom.condition(
        "VeerFleetReplicaNameTaken",
        true,
        "held while another veer held the name",
    )
    .await;
    prom.condition(
        "VeerFleetStoreUnreachable",
        false,
        "stayed off while the store answered",
    )
    .await;
    first.terminate();
    assert!(first.wait_exit(Duration::from_secs(60)).await.success());
    prom.condition(
        "VeerFleetReplicaNameTaken",
        false,
        "ended once the name was free and the replica joined",
    )
    .await;
    assert_eq!(second.status().await["fleet"]["connected"], true);
}
