//! The version split and endpoint choice, measured through the proxy.

use std::collections::HashMap;

use super::support::{route_config, upstream_of_keys, Upstream, Veer};

/// Route settings for tests that compare which endpoint each key reaches:
/// a connect that a starved machine (CI beside a CPU hog) takes over the
/// default second would rightly fail over to another endpoint and change
/// the very mapping they measure.
const PATIENT: &str = "connect_timeout = \"10s\"\n";

/// For tests that compare the split over several passes: the judge only
/// observes, since a revert (of these identical versions: a false one,
/// which the judge allows with probability `false_revert_rate`, and which
/// a run beside a CPU hog once produced mid-pass) would move the canary's
/// keys and change the very mapping measured. The judge has its own tests.
const OBSERVED: &str = "connect_timeout = \"10s\"\n[route.judge]\nmode = \"observe\"\n";

fn keys(n: usize, prefix: &str) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_10_over_20000_keys_is_within_half_a_point() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    // The judge only observes (see OBSERVED): beside a CPU hog a revert of
    // these identical versions once came early in the pass (a canary share
    // of 0.695 %, 2026-12-02) and measured the revert, not the split.
    let veer = Veer::start(&route_config(&[s.addr], &[c.addr], 10.0, OBSERVED)).await;
    let ks = keys(20_000, "acc");
    let seen = upstream_of_keys(veer.addr, &ks, 8).await;
    let canary = seen.values().filter(|u| *u == "canary").count();
    let share = canary as f64 * 100.0 / ks.len() as f64;
    assert!((share - 10.0).abs() <= 0.5, "canary share {share}%");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_stick_to_their_version_and_endpoint() {
    let stable: Vec<_> =
        futures_util::future::join_all(["s1", "s2", "s3"].map(Upstream::start)).await;
    let canary: Vec<_> = futures_util::future::join_all(["c1", "c2"].map(Upstream::start)).await;
    let sa: Vec<_> = stable.iter().map(|u| u.addr).collect();
    let ca: Vec<_> = canary.iter().map(|u| u.addr).collect();
    let veer = Veer::start(&route_config(&sa, &ca, 30.0, OBSERVED)).await;
    let ks = keys(2_000, "sticky");
    let first = upstream_of_keys(veer.addr, &ks, 4).await;
    let again = upstream_of_keys(veer.addr, &ks, 4).await;
    assert_eq!(first, again, "a key changed upstream between two passes");
    let used: std::collections::HashSet<_> = first.values().collect();
    assert_eq!(used.len(), 5, "every endpoint gets keys: {used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_weight_only_moves_keys_from_stable_to_canary() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let veer = Veer::start(&route_config(&[s.addr], &[c.addr], 10.0, OBSERVED)).await;
    let ks = keys(5_000, "mono");
    let at10 = upstream_of_keys(veer.addr, &ks, 4).await;
    veer.write_config(&route_config(&[s.addr], &[c.addr], 30.0, OBSERVED));
    veer.wait_generation(2).await;
    let at30 = upstream_of_keys(veer.addr, &ks, 4).await;
    for k in &ks {
        if at10[k] == "canary" {
            assert_eq!(
                at30[k], "canary",
                "{k} left the canary when the weight rose"
            );
        }
    }
    let n10 = at10.values().filter(|u| *u == "canary").count();
    let n30 = at30.values().filter(|u| *u == "canary").count();
    assert!(n30 > n10 * 2, "canary keys {n10} -> {n30}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_weights_are_honoured() {
    let light = Upstream::start("light").await;
    let heavy = Upstream::start("heavy").await;
    let config = route_config(&[light.addr], &[], 0.0, PATIENT).replace(
        &format!("endpoints = [\"{}\"]", light.addr),
        &format!(
            "endpoints = [\"{}\", {{ addr = \"{}\", weight = 3 }}]",
            light.addr, heavy.addr
        ),
    );
    let veer = Veer::start(&config).await;
    let ks = keys(8_000, "w");
    let seen = upstream_of_keys(veer.addr, &ks, 4).await;
    // The ring is ketama over the endpoints' addresses (160 points per
    // weight unit), and the test's ports are random: the share a weight-3
    // endpoint gets varies from run to run around 3/4. So every key is
    // checked against the ring veer must have built for these addresses,
    // and the weight against a bound the ring's geometry cannot miss.
    let ring = pingora_ketama::Continuum::new(&[
        pingora_ketama::Bucket::new(light.addr, 1),
        pingora_ketama::Bucket::new(heavy.addr, 3),
    ]);
    let mut heavy_keys = 0;
    for k in &ks {
        let want = if ring.node(k.as_bytes()) == Some(heavy.addr) {
            heavy_keys += 1;
            "heavy"
        } else {
            "light"
        };
        assert_eq!(seen[k], want, "key {k} left its ring endpoint");
    }
    let share = heavy_keys as f64 / ks.len() as f64;
    assert!(share > 0.6, "weight-3 endpoint's ring share {share}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_one_of_three_endpoints_moves_only_its_keys() {
    let ups: Vec<_> = futures_util::future::join_all(["e1", "e2", "e3"].map(Upstream::start)).await;
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let veer = Veer::start(&route_config(&addrs, &[], 0.0, PATIENT)).await;
    let ks = keys(6_000, "rm");
    let before = upstream_of_keys(veer.addr, &ks, 4).await;
    veer.write_config(&route_config(&addrs[..2], &[], 0.0, PATIENT));
    veer.wait_generation(2).await;
    let after = upstream_of_keys(veer.addr, &ks, 4).await;
    let mut moved = 0;
    let mut by_removed = 0;
    for k in &ks {
        if before[k] == "e3" {
            by_removed += 1;
        } else if before[k] != after[k] {
            moved += 1;
        }
    }
    assert!(by_removed > 1_000, "e3 had {by_removed} keys");
    let frac = moved as f64 / ks.len() as f64;
    assert!(frac < 0.02, "{moved} keys of the surviving endpoints moved");
    let counts: HashMap<&String, usize> = after.values().fold(HashMap::new(), |mut m, u| {
        *m.entry(u).or_default() += 1;
        m
    });
    assert_eq!(counts.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_sticky_cookie_gets_one_and_stays_on_its_version() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let config = route_config(
        &[s.addr],
        &[c.addr],
        50.0,
        &format!("{OBSERVED}[route.sticky_cookie]\nname = \"veer_key\"\nmax_age = \"1h\"\n"),
    )
    .replace(
        "sticky = [\"header:x-user-id\", \"client-ip\"]",
        "sticky = [\"header:x-user-id\", \"cookie:veer_key\"]",
    );
    let veer = Veer::start(&config).await;
    let mut seen = HashMap::new();
    for _ in 0..40 {
        // A new client each time (one connection, no cookie).
        let mut fresh = super::support::Client::connect(veer.addr).await.unwrap();
        let r = fresh.get("/", &[]).await.unwrap();
        let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
        let (pair, attributes) = set.split_once("; ").unwrap();
        assert_eq!(attributes, "Path=/; Max-Age=3600; HttpOnly; SameSite=Lax");
        let key = pair.strip_prefix("veer_key=").unwrap().to_string();
        assert!(
            key.len() == 16 && key.bytes().all(|b| b.is_ascii_hexdigit()),
            "{key}"
        );
        let version = r.headers()["x-upstream"].to_str().unwrap().to_string();
        // Back with the cookie: the same version every time, no new one.
        let cookie = format!("veer_key={key}");
        for _ in 0..5 {
            let again = fresh
                .get("/", &[("cookie", cookie.as_str())])
                .await
                .unwrap();
            assert_eq!(again.headers()["x-upstream"], version.as_str(), "{key}");
            assert!(!again.headers().contains_key("set-cookie"));
        }
        *seen.entry(version).or_insert(0) += 1;
    }
    // Made keys split like any others.
    assert!(seen.get("stable").copied().unwrap_or(0) >= 5, "{seen:?}");
    assert!(seen.get("canary").copied().unwrap_or(0) >= 5, "{seen:?}");
    // An earlier source present: no cookie made.
    let mut client = super::support::Client::connect(veer.addr).await.unwrap();
    let r = client.get("/", &[("x-user-id", "u-1")]).await.unwrap();
    assert!(!r.headers().contains_key("set-cookie"));
    // For an app framed by other sites, on every subdomain: its
    // attributes, Secure over plain HTTP as browsers ask of SameSite=None.
    veer.write_config(&config.replace(
        "max_age = \"1h\"\n",
        "domain = \"Example.com\"\nsame_site = \"none\"\n",
    ));
    veer.wait_generation(2).await;
    let mut fresh = super::support::Client::connect(veer.addr).await.unwrap();
    let r = fresh.get("/", &[]).await.unwrap();
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    let (_, attributes) = set.split_once("; ").unwrap();
    assert_eq!(
        attributes,
        "Path=/; Domain=example.com; HttpOnly; SameSite=None; Secure"
    );
}

/// A host name is every address it resolves to, each an endpoint of its
/// own (nginx's `server` and Envoy's strict DNS take them so; a
/// Kubernetes headless Service names its pods this way): keys spread over
/// them, `/status` lists each, and a reload (or the 30 s re-resolution)
/// follows the addresses as they change. It was the first address alone:
/// one pod took all of its version's traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_is_every_address_it_resolves_to() {
    let a = Upstream::start_at("a", "127.0.0.2:0").await;
    let port = a.addr.port();
    let _b = Upstream::start_at("b", &format!("127.0.0.3:{port}")).await;
    let name = format!("pods.test:{port}");
    let config = |connect: &str| {
        route_config(
            &[a.addr],
            &[],
            0.0,
            &format!("connect_timeout = \"{connect}\"\n"),
        )
        .replace(&format!("\"{}\"", a.addr), &format!("\"{name}\""))
    };
    let hosts = "127.0.0.1 localhost\n127.0.0.2 pods.test\n127.0.0.3 pods.test\n";
    let veer = Veer::start_with_hosts(&config("10s"), hosts).await;
    let users = keys(200, "user");
    let reached = upstream_of_keys(veer.addr, &users, 4).await;
    let (on_a, on_b) = (on_of(&reached, "a"), on_of(&reached, "b"));
    // Two endpoints of equal weight: about half each (a ring's spread
    // puts either's share well within 20-80 %).
    assert!(on_a >= 40 && on_b >= 40, "a {on_a} b {on_b}");
    let status = veer.status().await;
    let listed: Vec<String> = status["routes"][0]["stable"]["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| format!("{} = {}", e["addr"], e["resolved"]))
        .collect();
    assert_eq!(
        listed,
        [
            format!("\"{name} (127.0.0.2:{port})\" = \"127.0.0.2:{port}\""),
            format!("\"{name} (127.0.0.3:{port})\" = \"127.0.0.3:{port}\""),
        ]
    );
    // The name now stands for b alone (written in place: the bind mount
    // shows the file's new contents); a reload resolves it again.
    std::fs::write(
        veer.dir.path().join("hosts"),
        "127.0.0.1 localhost\n127.0.0.3 pods.test\n",
    )
    .expect("rewrite hosts");
    veer.write_config(&config("9s"));
    veer.wait_generation(2).await;
    let reached = upstream_of_keys(veer.addr, &users, 4).await;
    assert_eq!(on_of(&reached, "b"), users.len(), "{reached:?}");
}

fn on_of(reached: &HashMap<String, String>, who: &str) -> usize {
    reached.values().filter(|u| u.as_str() == who).count()
}
