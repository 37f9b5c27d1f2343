use std::path::Path;
use std::time::Duration;

use veer_control::config::Config;

use super::*;

fn corpus(name: &str) -> (String, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/ingress-nginx")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    (name.to_string(), text)
}

fn import(names: &[&str]) -> Imported {
    let files: Vec<(String, String)> = names.iter().map(|n| corpus(n)).collect();
    ingress_nginx(&files, &Options::default()).unwrap_or_else(|e| panic!("{names:?}: {e}"))
}

fn parsed(i: &Imported) -> Config {
    Config::parse(&i.config, Path::new("/etc/veer"))
        .unwrap_or_else(|e| panic!("veer check fails:\n{e}\n{}", i.config))
}

/// Asserts that each of `wants` is in a note and a comment of the
/// output; the notes, joined.
fn noted(i: &Imported, wants: &[&str]) -> String {
    let text = i.notes.join("\n");
    for want in wants {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
        assert!(
            i.config.contains(want),
            "not a comment in the output: {want:?}"
        );
    }
    text
}

#[test]
fn a_weighted_canary_becomes_a_route_with_service_endpoints() {
    let i = import(&["weight.yaml"]);
    let c = parsed(&i);
    assert_eq!(c.routes.len(), 1);
    let r = &c.routes[0];
    assert_eq!(r.name, "checkout-example-com");
    assert_eq!(r.hosts, ["checkout.example.com"]);
    assert_eq!(r.path_prefix, "/");
    assert_eq!(r.stable.name, "checkout-v41");
    assert_eq!(r.stable.endpoints[0].addr, "checkout-v41.shop.svc:8000");
    let canary = r.canary.as_ref().expect("canary");
    assert_eq!(canary.endpoints[0].addr, "checkout-v42.shop.svc:8000");
    assert_eq!(r.canary_weight_bp, 2000);
    assert!(i.notes.is_empty(), "{:?}", i.notes);
}

#[test]
fn header_and_cookie_become_forcing_and_their_differences_are_reported() {
    let i = import(&["header.yaml", "header-value.yaml", "cookie.yaml"]);
    let c = parsed(&i);
    let by_name = |n: &str| {
        c.routes
            .iter()
            .find(|r| r.name == n)
            .unwrap_or_else(|| panic!("no route {n}: {}", i.config))
    };
    let search = by_name("search-example-com-api");
    assert_eq!(search.canary_weight_bp, 0);
    let force = search.force.as_ref().expect("force");
    assert_eq!(force.header.as_deref(), Some("x-canary"));
    let cart = by_name("cart-example-com");
    assert_eq!(cart.canary_weight_bp, 500);
    let profile = by_name("profile-example-com");
    assert_eq!(profile.canary_weight_bp, 500, "50 of a total of 1000");
    assert_eq!(
        profile.force.as_ref().and_then(|f| f.cookie.as_deref()),
        Some("canary_user")
    );
    // ingress-nginx's values force as they did: always / never, or the
    // header's own value.
    let values = |r: &veer_control::config::Route| {
        let f = r.force.as_ref().expect("force");
        (f.canary_values.clone(), f.stable_values.clone())
    };
    let always = (vec!["always".to_string()], vec!["never".to_string()]);
    assert_eq!(values(search), always);
    assert_eq!(values(profile), always);
    assert_eq!(values(cart), (vec!["on".to_string()], vec![]));
    noted(
        &i,
        &["canary-by-header-pattern \"^(on|yes)$\" is ignored beside canary-by-header-value"],
    );
}

#[test]
fn what_veer_cannot_express_is_reported_never_dropped() {
    let i = import(&["multi.yaml", "orphan.yaml"]);
    let c = parsed(&i);
    let names: Vec<&str> = c.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "www-example-com",
            "api-example-com-v1-orders",
            "legacy-example-com",
            "www-example-com-static"
        ]
    );
    assert_eq!(c.routes[0].canary_weight_bp, 1250);
    // The main Ingress's proxy-body-size (8m) and timeouts (120 s to an
    // answer, 3 s to connect) are each of its routes'.
    for r in [&c.routes[0], &c.routes[1], &c.routes[3]] {
        assert_eq!(r.max_request_body, Some(8 << 20), "{}", r.name);
        assert_eq!(r.timeout, Duration::from_secs(120), "{}", r.name);
        assert_eq!(r.connect_timeout, Duration::from_secs(3), "{}", r.name);
        let l = r.rate_limit.clone().expect("limit-rps");
        assert_eq!((l.per_second_milli, l.burst), (20_000, 100), "{}", r.name);
        let nets = |v: &[ipnet::IpNet]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            nets(&r.allow_from),
            ["10.0.0.0/8", "192.168.0.1/32"],
            "{}",
            r.name
        );
        assert_eq!(nets(&r.deny_from), ["10.13.0.0/16"], "{}", r.name);
    }
    // The main Ingress has TLS for www and api (and says ssl-redirect).
    let redirects: Vec<bool> = c.routes.iter().map(|r| r.https_redirect).collect();
    assert_eq!(redirects, [true, true, false, true]);
    // Those hosts' answers carry ingress-nginx's default HSTS (no
    // ConfigMap here); legacy's host has no TLS, and no HSTS.
    let hsts = |r: &veer_control::config::Route| r.response_headers.set.clone();
    let default = [(
        "strict-transport-security".to_string(),
        "max-age=31536000; includeSubDomains".to_string(),
    )];
    for r in [&c.routes[0], &c.routes[1], &c.routes[3]] {
        assert_eq!(hsts(r), default, "{}", r.name);
    }
    assert!(hsts(&c.routes[2]).is_empty());
    // legacy's are not written: a size nginx does not read, a connect
    // timeout longer than veer's default route timeout (15 s).
    let legacy = &c.routes[2];
    assert_eq!(legacy.max_request_body, None);
    assert_eq!(legacy.connect_timeout, Duration::from_secs(1));
    assert_eq!(legacy.rate_limit, None);
    // An allowlist of nothing valid serves no one, rather than everyone.
    assert_eq!(
        legacy.allow_from,
        ["0.0.0.0/32".parse::<ipnet::IpNet>().unwrap()]
    );
    assert_eq!(
        c.routes[2].stable.endpoints[0].addr,
        "legacy-v1.old.svc:8080"
    );
    assert_eq!(c.routes[2].canary_weight_bp, 3000);
    // /static has no canary but shares a host with one: imported without a
    // canary, so that "/" does not take its traffic to another Service.
    assert!(c.routes[3].canary.is_none());
    assert_eq!(c.routes[3].stable.endpoints[0].addr, "static.web.svc:80");
    assert_eq!(
        i.notes
            .iter()
            .filter(|n| n.contains("TLS from Secret"))
            .count(),
        2,
        "one TLS note per route: {:?}",
        i.notes
    );
    let text = i.notes.join("\n");
    for want in [
        "affinity: \"cookie\" is not expressible",
        "proxy-body-size \"1.5m\" is not an nginx size",
        "proxy-connect-timeout 30s is longer than the route's timeout (15s)",
        "limit-burst-multiplier without limit-rps does nothing",
        "whitelist-source-range entry \"office-network\" is not an address or a CIDR range",
        "TLS from Secret \"web-tls\"",
        "names its port \"http\"",
        "pathType Exact",
        "has no canary for this path: imported without one",
        "lonely.example.com\" path \"/\" has no main Ingress",
        "Service skipped",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // Non-ingress-nginx annotations are not ingress-nginx's to report.
    assert!(!text.contains("example.com/owner"), "{text}");
    for line in text.lines() {
        let first = line.split(": ").last().unwrap_or(line);
        assert!(i.config.contains(first), "note not in the output: {line}");
    }
}

#[test]
fn nothing_to_import_is_an_error_that_says_why() {
    let only_orphan = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: c\n  annotations:\n    nginx.ingress.kubernetes.io/canary: \"true\"\nspec:\n  rules:\n    - host: a.example\n      http:\n        paths:\n          - path: /\n            backend:\n              service: { name: a, port: { number: 80 } }\n";
    let e = ingress_nginx(
        &[("c.yaml".into(), only_orphan.into())],
        &Options::default(),
    )
    .expect_err("nothing");
    assert!(e.to_string().contains("has no main Ingress"), "{e}");
    let e = ingress_nginx(
        &[("x.yaml".into(), "kind: Service\n".into())],
        &Options::default(),
    )
    .expect_err("none");
    assert!(e.to_string().contains("no Ingress"), "{e}");
    let e = ingress_nginx(&[("bad.yaml".into(), "a: [\n".into())], &Options::default())
        .expect_err("yaml");
    assert!(e.to_string().starts_with("bad.yaml: not YAML"), "{e}");
}

#[test]
fn route_names_are_valid_and_unique() {
    assert_eq!(route_name("", "/"), "default");
    assert_eq!(
        route_name("A.Example.com", "/v1/Orders/"),
        "a-example-com-v1-orders"
    );
    let mut used = std::collections::HashSet::new();
    assert_eq!(unique("x".into(), &mut used), "x");
    assert_eq!(unique("x".into(), &mut used), "x-2");
}

#[test]
fn proxy_body_size_is_read_as_nginx_reads_sizes() {
    for (v, want) in [
        ("8m", Some(8 << 20)),
        ("8M", Some(8 << 20)),
        ("512k", Some(512 << 10)),
        ("1g", Some(1 << 30)),
        ("1000", Some(1000)),
        ("0", Some(0)),
        (" 2m ", Some(2 << 20)),
        ("", None),
        ("m", None),
        ("1.5m", None),
        ("-1", None),
        ("8mb", None),
        ("10t", None),
        ("99999999999999999999g", None),
    ] {
        assert_eq!(super::nginx_size(v), want, "{v:?}");
    }
}

#[test]
fn rewrites_hosts_and_protocols_are_carried_where_veer_has_their_form() {
    let i = import(&["rewrite.yaml"]);
    let c = parsed(&i);
    let r: Vec<(&str, &str, Option<&str>)> = c
        .routes
        .iter()
        .map(|r| {
            (
                r.name.as_str(),
                r.path_prefix.as_str(),
                r.rewrite_prefix.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        r,
        [
            ("shop-example-com-api", "/api", Some("/")),
            ("store-example-com-store", "/store/", Some("/shop/")),
            ("legacy-example-com-legacy", "/legacy", None),
        ]
    );
    let mut set = c.routes[0].request_headers.set.clone();
    set.sort();
    assert_eq!(
        set,
        [
            ("host".to_string(), "api.internal".to_string()),
            ("x-forwarded-prefix".to_string(), "/api".to_string())
        ]
    );
    let cors = c.routes[0].cors.clone().expect("enable-cors");
    assert_eq!(
        cors.allow_origins,
        ["https://shop.example.com", "https://admin.shop.example.com"]
    );
    assert!(!cors.allow_credentials);
    assert_eq!(cors.max_age, Duration::from_secs(600));
    assert_eq!(
        cors.allow_methods.len(),
        6,
        "ingress-nginx's default methods"
    );
    assert!(c.routes[1].cors.is_none());
    let protocols = |r: usize| {
        let v = &c.routes[r];
        [&v.stable, v.canary.as_ref().expect("canary")].map(|v| v.protocol)
    };
    use veer_control::config::UpstreamProtocol as P;
    assert_eq!(protocols(0), [P::Http1, P::Http1]);
    let redirects: Vec<bool> = c.routes.iter().map(|r| r.https_redirect).collect();
    assert_eq!(
        redirects,
        [false, false, true],
        "force-ssl-redirect, no TLS"
    );
    assert_eq!(protocols(1), [P::Https, P::Https], "backend-protocol HTTPS");
    assert_eq!(protocols(2), [P::H2c, P::H2c], "backend-protocol GRPC");
    let text = noted(
        &i,
        &[
            "\"/user/([0-9]+)/orders\" is a regex that is no prefix veer can match",
            "nginx rewrites the whole path",
            "so /apix (not only /api/x) is this route's too",
            "veer verifies the upstream's certificate",
        ],
    );
    assert!(
        !text.contains("rewrite-target: \"/$2\" is not expressible"),
        "{text}"
    );
}

#[test]
fn kubectls_lists_are_read_item_by_item() {
    // `kubectl get ingress -A -o yaml` writes one `kind: List`.
    let (_, weight) = corpus("weight.yaml");
    let items: Vec<serde_yaml_ng::Value> = serde_yaml_ng::Deserializer::from_str(&weight)
        .map(|d| serde_yaml_ng::Value::deserialize(d).expect("yaml"))
        .collect();
    let mut list = serde_yaml_ng::Mapping::new();
    list.insert("apiVersion".into(), "v1".into());
    list.insert("kind".into(), "List".into());
    let mut with_service = items.clone();
    with_service
        .push(serde_yaml_ng::from_str("kind: Service\nmetadata: {name: s}\n").expect("yaml"));
    list.insert("items".into(), serde_yaml_ng::Value::Sequence(with_service));
    let text = serde_yaml_ng::to_string(&list).expect("yaml");
    let from_list =
        ingress_nginx(&[("all.yaml".into(), text)], &Options::default()).expect("imported");
    let from_docs = import(&["weight.yaml"]);
    assert_eq!(from_list.routes, 1);
    let service = "# NOTE: all.yaml: Service skipped (only Ingress objects are imported)\n";
    assert!(from_list.config.contains(service), "{}", from_list.config);
    assert_eq!(
        from_list.config.replace(service, ""),
        from_docs.config,
        "the same config as from the documents"
    );
    assert!(from_list
        .notes
        .iter()
        .any(|n| n.contains("Service skipped")));
    // The API's own list kind too.
    let text = serde_yaml_ng::to_string(&list)
        .expect("yaml")
        .replace("kind: List", "kind: IngressList");
    assert_eq!(
        ingress_nginx(&[("all.yaml".into(), text)], &Options::default())
            .expect("imported")
            .routes,
        1
    );
}

#[test]
fn the_controllers_configmap_is_every_ingresss_default_and_the_proxys_body_limit() {
    let i = import(&["configmap.yaml"]);
    let c = parsed(&i);
    assert_eq!(c.proxy.max_request_body, 16 << 20, "proxy-body-size: 16m");
    let (billing, reports) = (&c.routes[0], &c.routes[1]);
    // billing's own read timeout wins; the rest is the ConfigMap's.
    assert_eq!(billing.timeout, Duration::from_secs(30));
    assert_eq!(billing.connect_timeout, Duration::from_secs(4));
    assert_eq!(reports.timeout, Duration::from_secs(90));
    let nets = |v: &[ipnet::IpNet]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(nets(&billing.allow_from), ["10.0.0.0/8", "172.16.0.0/12"]);
    assert_eq!(
        nets(&reports.allow_from),
        ["192.168.7.0/24"],
        "its own list"
    );
    // upstream-hash-by a header: that header, else the address.
    use veer_control::config::StickySource;
    assert_eq!(
        billing.sticky,
        [
            StickySource::Header("x-tenant-id".into()),
            StickySource::ClientIp
        ]
    );
    assert_eq!(reports.sticky, [StickySource::ClientIp]);
    // ssl-redirect off for all: billing's TLS does not redirect; reports
    // forces it.
    assert!(!billing.https_redirect);
    assert!(reports.https_redirect);
    // HSTS as the ConfigMap says, where the Ingress has TLS (billing).
    assert_eq!(
        billing.response_headers.set,
        [(
            "strict-transport-security".to_string(),
            "max-age=600; includeSubDomains; preload".to_string()
        )]
    );
    assert!(reports.response_headers.set.is_empty());
    assert!(!i.notes.join("\n").contains("hsts"), "{:?}", i.notes);
    noted(
        &i,
        &[
            "ConfigMap billing/app-settings skipped",
            "use-forwarded-headers: \"true\": set [proxy] trusted_hops",
            "use-gzip: \"true\": not read",
            "use-proxy-protocol: \"true\": set [proxy] proxy_protocol = true",
            "proxy-real-ip-cidr: \"10.0.0.0/16\": with proxy_protocol, set [proxy] proxy_protocol_from",
            "ssl-session-tickets: \"false\": set [proxy.tls] session_tickets = false",
            "ssl-session-cache-size: \"20m\": set [proxy.tls] session_cache = 80000 (sessions;",
            "ssl-protocols: \"TLSv1.3\": set [proxy.tls] min_version = \"1.3\"",
            "ssl-session-ticket-key: (value not shown): [proxy.tls] ticket_keys",
        ],
    );
    // The ticket key is a secret: not in the notes, nor in the output.
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4v";
    assert!(!i.config.contains(key) && !i.notes.join("\n").contains(key));
    // Without the ConfigMap, ingress-nginx's 1m is a line to uncomment.
    let without = import(&["weight.yaml"]);
    assert!(without.config.contains("# max_request_body = 1048576"));
    assert_eq!(parsed(&without).proxy.max_request_body, 0);
}

#[test]
fn cookie_affinity_becomes_a_sticky_cookie_veer_makes() {
    let i = import(&["list.yaml"]);
    let r = &parsed(&i).routes[0];
    assert_eq!(
        r.sticky,
        [veer_control::config::StickySource::Cookie(
            "PAYSESSION".into()
        )]
    );
    let s = r.sticky_cookie.clone().expect("sticky_cookie");
    assert_eq!(s.name, "PAYSESSION");
    assert_eq!(s.max_age, Some(Duration::from_secs(172_800)));
    assert_eq!(s.path, "/");
    // The pay page is framed by other sites: SameSite=None, so Secure.
    assert_eq!(s.domain.as_deref(), Some("example.com"));
    assert_eq!(s.same_site, veer_control::config::SameSite::None);
    assert!(s.secure);
    noted(
        &i,
        &[
            "affinity cookie PAYSESSION: veer makes it",
            "session-cookie-conditional-samesite-none: veer sends SameSite=None",
        ],
    );
    assert!(!i
        .notes
        .iter()
        .any(|n| n.contains("session-cookie-samesite")));
}

/// With `--tls-dir`, the TLS Secrets of the imported hosts become the
/// TLS listener's certificates (the first also the default), each with a
/// note on where to mount it, instead of a note per route.
#[test]
fn tls_secrets_become_certificates_under_the_tls_dir() {
    let files = [corpus("multi.yaml"), corpus("configmap.yaml")];
    let options = Options {
        tls_dir: Some("/etc/veer/tls/".into()),
    };
    let i = ingress_nginx(&files, &options).expect("imported");
    let c = parsed(&i);
    let tls = c.proxy.tls.as_ref().expect("[proxy.tls]");
    assert_eq!(
        tls.cert,
        Path::new("/etc/veer/tls/web/web-tls/tls.crt"),
        "{}",
        i.config
    );
    assert_eq!(tls.key, Path::new("/etc/veer/tls/web/web-tls/tls.key"));
    assert_eq!(tls.public_port, Some(443));
    assert_eq!(
        tls.certificates,
        [(
            "/etc/veer/tls/billing/billing-tls/tls.crt".into(),
            "/etc/veer/tls/billing/billing-tls/tls.key".into()
        )]
    );
    assert!(!i.notes.iter().any(|n| n.contains("TLS from Secret")));
    noted(
        &i,
        &[
            "TLS Secret web/web-tls: mount it at /etc/veer/tls/web/web-tls/",
            "TLS Secret billing/billing-tls: mount it at /etc/veer/tls/billing/billing-tls/",
        ],
    );
    // Without it, a note per route, and no TLS listener.
    let i = ingress_nginx(&files, &Options::default()).expect("imported");
    assert!(parsed(&i).proxy.tls.is_none());
    assert!(i.notes.iter().any(|n| n.contains("TLS from Secret")));
}

/// `auth-tls-verify-client: "on"` with its `auth-tls-secret` becomes
/// `require_client_cert` on its route and the Secret's `ca.crt` the TLS
/// listener's `client_ca` (with `client_auth = "optional"` for the other
/// routes), given `--tls-dir`; other values, and no `--tls-dir`, are notes.
#[test]
fn client_certificate_authentication_becomes_require_client_cert() {
    let files = [corpus("mtls.yaml")];
    let options = Options {
        tls_dir: Some("/etc/veer/tls".into()),
    };
    let i = ingress_nginx(&files, &options).expect("imported");
    let c = parsed(&i);
    let tls = c.proxy.tls.as_ref().expect("[proxy.tls]");
    assert_eq!(
        tls.client_ca.as_deref(),
        Some(Path::new("/etc/veer/tls/payments/clients-ca/ca.crt"))
    );
    assert!(tls.client_auth_optional);
    assert!(tls.forward_client_cert);
    let requires: Vec<(&str, bool)> = c
        .routes
        .iter()
        .map(|r| (r.name.as_str(), r.require_client_cert))
        .collect();
    assert_eq!(
        requires,
        [("payments-example-net", true), ("store-example-net", false)]
    );
    noted(
        &i,
        &[
            "auth-tls-secret payments/clients-ca: its ca.crt verifies client certificates",
            "auth-tls-verify-client \"optional_no_ca\"",
            "auth-tls-verify-depth",
            "the upstream gets the client's certificate in X-Forwarded-Client-Cert's Cert=",
        ],
    );
    let i = ingress_nginx(&files, &Options::default()).expect("imported");
    let c = parsed(&i);
    assert!(c.routes.iter().all(|r| !r.require_client_cert));
    noted(&i, &["auth-tls-verify-client \"on\": not written"]);
}

#[test]
fn proxy_next_upstream_becomes_retries_for_what_veer_retries_on() {
    let i = import(&["next-upstream.yaml"]);
    let c = parsed(&i);
    let retry = |name: &str| {
        c.routes
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("{name}"))
            .retry
            .clone()
    };
    // The ConfigMap's "error http_503 http_500", 5 tries: a reset and a
    // 503, two retries (veer's most); the 500 noted.
    let orders = retry("orders-example-com").expect("orders retries");
    assert!(orders.on_reset && !orders.on_timeout);
    assert_eq!(orders.on_status, [503]);
    assert_eq!(orders.retries, 2);
    // "off", and conditions veer has no form for: no table.
    assert_eq!(retry("search-example-com"), None);
    assert_eq!(retry("uploads-example-com"), None);
    // Its own: one retry on a reset or a 502.
    let ledger = retry("ledger-example-com").expect("ledger retries");
    assert!(ledger.on_reset);
    assert_eq!(ledger.on_status, [502]);
    assert_eq!(ledger.retries, 1);
    noted(
        &i,
        &[
            "proxy-next-upstream http_500: veer retries a 502, 503 or 504",
            "proxy-next-upstream-tries 5: veer tries at most 3 times",
            "proxy-next-upstream timeout: veer's route timeout bounds every try together",
            "proxy-next-upstream non_idempotent: veer never sends a POST or PATCH again",
            "proxy-next-upstream: no condition veer retries on",
            "proxy-next-upstream-timeout \"10\"",
        ],
    );
    // Without anything set, ingress-nginx's "error timeout" and 3 tries:
    // a reset, twice, and no note (its "timeout" is the header's comment).
    let default = import(&["weight.yaml"]);
    let r = parsed(&default).routes[0]
        .retry
        .clone()
        .expect("the default");
    assert!(r.on_reset && !r.on_timeout && r.on_status.is_empty());
    assert_eq!(r.retries, 2);
    assert!(default.notes.is_empty(), "{:?}", default.notes);
    assert!(default
        .config
        .contains("A try that\n# times out is not sent again"));
}

#[test]
fn hsts_is_ingress_nginxs_unless_its_configmap_turns_it_off() {
    use std::collections::BTreeMap;
    let of = |pairs: &[(&str, &str)]| {
        let data: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut notes = Vec::new();
        (super::configmap::hsts(Some(&data), &mut notes), notes)
    };
    let mut notes = Vec::new();
    assert_eq!(
        super::configmap::hsts(None, &mut notes).as_deref(),
        Some("max-age=31536000; includeSubDomains")
    );
    assert_eq!(of(&[("hsts", "false")]).0, None);
    assert_eq!(
        of(&[("hsts-include-subdomains", "false")]).0.as_deref(),
        Some("max-age=31536000")
    );
    let (v, notes) = of(&[("hsts-max-age", "1y")]);
    assert_eq!(v.as_deref(), Some("max-age=31536000; includeSubDomains"));
    assert!(
        notes[0].contains("hsts-max-age \"1y\" is not a number of seconds"),
        "{notes:?}"
    );
}

#[test]
fn large_client_header_buffers_become_max_header_bytes() {
    use std::collections::BTreeMap;
    let of = |v: &str| {
        let data = BTreeMap::from([("large-client-header-buffers".to_string(), v.to_string())]);
        let mut notes = Vec::new();
        (super::configmap::head_line(Some(&data), &mut notes), notes)
    };
    let mut notes = Vec::new();
    let default = super::configmap::head_line(None, &mut notes);
    assert!(
        default.starts_with(
            "max_header_bytes = 32768  # ingress-nginx's default large-client-header-buffers, 4 8k"
        ),
        "{default}"
    );
    assert!(notes.is_empty(), "{notes:?}");
    assert!(of("8 16k").0.starts_with("max_header_bytes = 131072  #"));
    let (line, notes) = of("1 4k");
    assert!(line.starts_with("max_header_bytes = 8192  #"), "{line}");
    assert!(notes[0].contains("4096 bytes of request head"), "{notes:?}");
    let (line, notes) = of("lots");
    assert!(line.starts_with("max_header_bytes = 32768  #"), "{line}");
    assert!(
        notes[0].contains("is not a count and an nginx size"),
        "{notes:?}"
    );
    // The whole import writes it, and veer takes it.
    let i = import(&["weight.yaml"]);
    assert_eq!(parsed(&i).proxy.max_header_bytes, 32 << 10, "{}", i.config);
}
