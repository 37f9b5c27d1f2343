use super::*;

fn parse(text: &str) -> Result<Config, Diagnostics> {
    Config::parse(text, Path::new("/etc/veer"))
}

const MINIMAL: &str = r#"
[[route]]
name = "web"
[route.stable]
version = "v1"
endpoints = ["127.0.0.1:9000"]
"#;

#[test]
fn webhooks_take_http_and_https_urls() {
    let h = Webhook::parse("https://hooks.example.com/services/T0").expect("https");
    assert_eq!(
        (
            h.authority.as_str(),
            h.host.as_str(),
            h.path.as_str(),
            h.tls
        ),
        (
            "hooks.example.com:443",
            "hooks.example.com",
            "/services/T0",
            true
        )
    );
    let h = Webhook::parse("http://127.0.0.1:8080").expect("http");
    assert_eq!(
        (h.authority.as_str(), h.path.as_str(), h.tls),
        ("127.0.0.1:8080", "/", false)
    );
    let h = Webhook::parse("https://[::1]:8443/x").expect("ipv6");
    assert_eq!(
        (h.authority.as_str(), h.host.as_str()),
        ("[::1]:8443", "::1")
    );
    let h = Webhook::parse("https://[::1]/x").expect("ipv6 without port");
    assert_eq!(
        (h.authority.as_str(), h.host.as_str()),
        ("[::1]:443", "::1")
    );
    for bad in ["ftp://x", "https://", "http://user@host/", "https:///path"] {
        assert!(Webhook::parse(bad).is_none(), "{bad}");
    }
}

#[test]
fn webhook_ca_file_must_hold_certificates_and_go_with_https() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let judge = |hook: &str, ca_file: &str| {
        format!("{MINIMAL}[route.judge]\nwebhook = \"{hook}\"\nwebhook_ca_file = \"{ca_file}\"\n")
    };
    let c = Config::parse(&judge("https://127.0.0.1:9/e", "ca.pem"), dir.path()).expect("valid");
    let hook = c.routes[0].judge.webhook.clone().expect("hook");
    assert_eq!(hook.ca_file.as_deref(), Some(ca.as_path()));

    let e = Config::parse(&judge("http://127.0.0.1:9/e", "ca.pem"), dir.path()).unwrap_err();
    assert!(e.0[0].message.contains("only to an https"), "{e}");
    let e = Config::parse(&judge("https://127.0.0.1:9/e", "missing.pem"), dir.path()).unwrap_err();
    assert!(e.0[0].message.contains("missing.pem"), "{e}");
    std::fs::write(&ca, "not a certificate").expect("write");
    let e = Config::parse(&judge("https://127.0.0.1:9/e", "ca.pem"), dir.path()).unwrap_err();
    assert!(e.0[0].message.contains("no PEM certificate"), "{e}");
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = parse(MINIMAL).expect("valid");
    assert_eq!(
        c.proxy.listen,
        vec![defaults::LISTEN.parse::<SocketAddr>().expect("addr")]
    );
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9901");
    let r = &c.routes[0];
    assert_eq!(r.path_prefix, "/");
    assert_eq!(r.sticky, vec![StickySource::ClientIp]);
    assert_eq!(r.timeout, defaults::TIMEOUT);
    assert_eq!(r.canary, None);
    assert_eq!(r.canary_weight_bp, 0);
    assert_eq!(r.judge.false_revert_rate, defaults::FALSE_REVERT_RATE);
}

#[test]
fn unknown_key_is_an_error_with_its_location() {
    let text = "[proxy]\nlisten = [\"127.0.0.1:1\"]\nlisen = 3\n";
    let e = parse(text).expect_err("unknown key");
    let d =
        e.0.iter()
            .find(|d| d.message.contains("lisen"))
            .expect("reported");
    assert_eq!((d.line, d.col), (3, 1));
}

#[test]
fn every_unknown_key_is_reported_with_the_semantic_errors() {
    let text = "[proxy]\nlisen = 1\nworkers = 2\nmax_conections = 5\n[[route]]\nname = \"Bad\"\ntimout = \"1s\"\n[route.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n";
    let e = parse(text).expect_err("invalid");
    let at: Vec<(usize, usize)> = e.0.iter().map(|d| (d.line, d.col)).collect();
    assert_eq!(at, vec![(2, 1), (4, 1), (6, 8), (7, 1)], "{e}");
    assert!(
        e.0[0].message.contains("lisen") && e.0[1].message.contains("max_conections"),
        "{e}"
    );
    assert!(e.0[3].message.contains("timout"), "{e}");
    // A syntax error still stops the parse: nothing after it is reliable.
    let e = parse("[proxy]\nlisen = 1\nworkers = = 2\n").expect_err("invalid");
    assert_eq!(e.0.len(), 1, "{e}");
    assert!(e.0[0].message.contains("extra"), "{e}");
}

#[test]
fn every_semantic_error_is_reported_not_just_the_first() {
    let text = r#"
[[route]]
name = "Bad Name"
timeout = "15"
sticky = ["header:", "client-ip"]
[route.stable]
version = "v1"
endpoints = ["nope", "127.0.0.1:1"]
[route.canary]
version = "v1"
endpoints = ["127.0.0.1:1"]
weight = 5.001
"#;
    let e = parse(text).expect_err("invalid");
    let lines: Vec<usize> = e.0.iter().map(|d| d.line).collect();
    // name, timeout, sticky, endpoint, version clash, weight (the
    // endpoint in both versions, line 11, is a warning only)
    for want in [3, 4, 5, 8, 10, 12] {
        assert!(lines.contains(&want), "no error on line {want}: {e}");
    }
    assert!(!lines.contains(&11), "{e}");
}

#[test]
fn weight_has_a_step_of_one_hundredth() {
    let ok = MINIMAL.to_string()
        + "[route.canary]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:9001\"]\nweight = 12.34\n";
    assert_eq!(parse(&ok).expect("valid").routes[0].canary_weight_bp, 1234);
    let whole = ok.replace("12.34", "5");
    assert_eq!(
        parse(&whole).expect("valid").routes[0].canary_weight_bp,
        500
    );
    for bad in ["100.5", "-1", "0.001"] {
        assert!(parse(&ok.replace("12.34", bad)).is_err(), "{bad} accepted");
    }
}

#[test]
fn non_loopback_admin_needs_a_token() {
    let text = MINIMAL.to_string() + "[admin]\nlisten = \"0.0.0.0:9901\"\n";
    let e = parse(&text).expect_err("needs token");
    assert!(e.0[0].message.contains("token_file"));
    let ok = text.replace("[admin]\n", "[admin]\ntoken_file = \"t\"\n");
    let c = parse(&ok).expect("valid with token");
    assert_eq!(
        c.admin.token_file.as_deref(),
        Some(Path::new("/etc/veer/t"))
    );
}

#[test]
fn two_routes_claiming_the_same_requests_are_rejected() {
    let text = MINIMAL.to_string() + &MINIMAL.replace("\"web\"", "\"web2\"");
    let e = parse(&text).expect_err("duplicate default route");
    assert!(e.to_string().contains("already claimed"), "{e}");
}

#[test]
fn blue_green_weight_is_all_or_nothing() {
    let base = MINIMAL.replace(
        "name = \"web\"",
        "name = \"web\"\nstrategy = \"blue-green\"",
    )
        + "[route.canary]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:9001\"]\nweight = 50\n";
    assert!(parse(&base).is_err());
    assert!(parse(&base.replace("weight = 50", "weight = 100")).is_ok());
}

#[test]
fn line_and_column_count_characters() {
    let d = Diagnostic::at("ab\ncdé f", 8, "x");
    assert_eq!((d.line, d.col), (2, 5));
}

#[test]
fn a_short_timeout_alone_shrinks_the_default_connect_timeout() {
    let c = parse(&MINIMAL.replace("name = \"web\"", "name = \"web\"\ntimeout = \"300ms\""))
        .expect("a 300ms timeout alone is valid");
    let r = &c.routes[0];
    assert_eq!(r.connect_timeout, Duration::from_millis(300));
    let explicit = MINIMAL.replace(
        "name = \"web\"",
        "name = \"web\"\ntimeout = \"300ms\"\nconnect_timeout = \"1s\"",
    );
    assert!(
        parse(&explicit).is_err(),
        "an explicit one above timeout is a mistake"
    );
}

#[test]
fn an_endpoint_on_veers_own_listener_is_a_warning() {
    let config = |listen: &str, admin: &str, canary: &str| {
        format!("[proxy]\nlisten = [\"{listen}\"]\n[admin]\nlisten = \"{admin}\"\n[[route]]\nname = \"web\"\n[route.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:8081\"]\n[route.canary]\nversion = \"v2\"\nendpoints = [\"{canary}\"]\nweight = 5\n")
    };
    let warned = [
        (
            "0.0.0.0:8080",
            "127.0.0.1:9901",
            "127.0.0.1:8080",
            "[proxy] listen (0.0.0.0:8080)",
        ),
        (
            "127.0.0.1:8080",
            "127.0.0.1:9901",
            "localhost:8080",
            "[proxy] listen",
        ),
        (
            "[::]:8080",
            "127.0.0.1:9901",
            "[::1]:8080",
            "[proxy] listen",
        ),
        (
            "0.0.0.0:8080",
            "127.0.0.1:9901",
            "127.0.0.1:9901",
            "[admin] listen",
        ),
        (
            "0.0.0.0:8080",
            "127.0.0.1:9901",
            "http://127.0.0.1:8080",
            "[proxy] listen",
        ),
    ];
    for (listen, admin, canary, said) in warned {
        let c = parse(&config(listen, admin, canary)).expect("valid: a warning");
        assert_eq!(c.warnings.len(), 1, "{canary}: {:?}", c.warnings);
        assert_eq!(c.warnings[0].line, 12, "{canary}");
        let m = &c.warnings[0].message;
        assert!(
            m.contains("is veer's own") && m.contains(said),
            "{canary}: {m}"
        );
    }
    let apart = [
        ("0.0.0.0:8080", "127.0.0.1:9901", "127.0.0.1:8082"),
        ("127.0.0.1:8080", "127.0.0.1:9901", "127.0.0.2:8080"),
        ("0.0.0.0:8080", "127.0.0.1:9901", "10.0.0.7:8080"),
        ("0.0.0.0:8080", "127.0.0.1:9901", "app.internal:8080"),
    ];
    for (listen, admin, canary) in apart {
        let c = parse(&config(listen, admin, canary)).expect("valid");
        assert!(c.warnings.is_empty(), "{canary}: {:?}", c.warnings);
    }
}

#[test]
fn the_same_endpoint_in_both_versions_is_a_warning_not_an_error() {
    let text = "[[route]]\nname = \"web\"\n[route.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:9\"]\n[route.canary]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:9\"]\nweight = 50\n";
    let c = parse(text).expect("an A/A rehearsal is valid");
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert_eq!(c.warnings[0].line, 8);
    assert!(c.warnings[0].message.contains("127.0.0.1:9 is in both"));
    assert!(parse(MINIMAL).expect("valid").warnings.is_empty());
}

#[test]
fn webhook_format_and_public_url_are_checked_and_reach_the_webhook() {
    let hook = "[route.judge]\nwebhook = \"http://127.0.0.1:9/h\"\n";
    let ok = format!(
        "[admin]\npublic_url = \"https://veer.example.com/\"\n{MINIMAL}{hook}webhook_format = \"teams\"\n"
    );
    let c = parse(&ok).expect("valid");
    let w = c.routes[0].judge.webhook.clone().expect("webhook");
    assert_eq!(w.format, WebhookFormat::Teams);
    assert_eq!(
        w.status_url.as_deref(),
        Some("https://veer.example.com/status")
    );
    let bad = format!("{MINIMAL}{hook}webhook_format = \"xml\"\n");
    assert!(parse(&bad)
        .expect_err("invalid")
        .to_string()
        .contains("\"json\", \"slack\" or \"teams\""));
    let orphan = format!("{MINIMAL}[route.judge]\nwebhook_format = \"slack\"\n");
    assert!(parse(&orphan)
        .expect_err("invalid")
        .to_string()
        .contains("no webhook"));
    let url = format!("[admin]\npublic_url = \"ftp://x\"\n{MINIMAL}");
    assert!(parse(&url)
        .expect_err("invalid")
        .to_string()
        .contains("public_url"));
}

#[test]
fn force_needs_a_valid_header_or_cookie() {
    let ok = format!("{MINIMAL}[route.force]\nheader = \"X-Veer-Version\"\n");
    let f = parse(&ok).expect("valid").routes[0]
        .force
        .clone()
        .expect("force");
    assert_eq!(f.header.as_deref(), Some("x-veer-version"));
    assert!(!f.allow_when_reverted);
    let empty = format!("{MINIMAL}[route.force]\nallow_when_reverted = true\n");
    assert!(parse(&empty)
        .expect_err("invalid")
        .to_string()
        .contains("needs a header or a cookie"));
    let bad = format!("{MINIMAL}[route.force]\nheader = \"x veer\"\ncookie = \"a;b\"\n");
    let e = parse(&bad).expect_err("invalid").to_string();
    assert!(
        e.contains("not a header name") && e.contains("not a cookie name"),
        "{e}"
    );
}

#[test]
fn a_fleet_needs_etcd_endpoints_of_one_scheme_and_a_name() {
    let ok = format!(
        "[fleet]\nstore = \"etcd\"\nendpoints = [\"https://etcd-0.etcd:2379\", \"https://10.0.0.6:2379/\"]\nname = \"checkout\"\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n{MINIMAL}"
    );
    let f = parse(&ok).expect("valid").fleet.expect("fleet");
    assert_eq!(
        f.endpoints,
        ["https://etcd-0.etcd:2379", "https://10.0.0.6:2379"]
    );
    assert!(f.tls());
    assert_eq!(f.replica, None);
    assert_eq!(f.ca_file, Some(PathBuf::from("/etc/veer/ca.pem")));
    assert!(parse(MINIMAL).expect("valid").fleet.is_none());
    // Pooled by default, at 16 seats, and every route's judge knows it.
    assert_eq!(f.seats, 16);
    let c = parse(&ok).expect("valid");
    assert!(c.routes.iter().all(|r| r.judge.fleet_seats == 16));
    assert!(parse(MINIMAL)
        .expect("valid")
        .routes
        .iter()
        .all(|r| r.judge.fleet_seats == 0));
    let seats = |extra: &str| {
        format!("[fleet]\nstore = \"etcd\"\nendpoints = [\"http://a:1\"]\nname = \"x\"\n{extra}\n{MINIMAL}")
    };
    let c = parse(&seats("seats = 4")).expect("valid");
    assert!(c.routes.iter().all(|r| r.judge.fleet_seats == 4));
    let off = parse(&seats("pool = false\nseats = 4")).expect("valid");
    assert!(off.routes.iter().all(|r| r.judge.fleet_seats == 0));
    assert!(
        off.warnings
            .iter()
            .any(|w| w.message.contains("only matters")),
        "{:?}",
        off.warnings
    );
    let e = parse(&seats("seats = 0")).expect_err("no seats");
    assert!(
        e.to_string().contains("seats must be between 1 and 1000"),
        "{e}"
    );
    // A finished pool's keys stay an hour by default.
    let keep = |c: &Config| c.fleet.as_ref().map(|f| f.keep_evidence);
    assert_eq!(keep(&c), Some(Duration::from_secs(3600)));
    let c = parse(&seats("keep_evidence = \"24h\"")).expect("valid");
    assert_eq!(keep(&c), Some(Duration::from_secs(86_400)));
    let e = parse(&seats("keep_evidence = \"soon\"")).expect_err("not a duration");
    assert!(e.to_string().contains("invalid duration"), "{e}");
    let off = parse(&seats("pool = false\nkeep_evidence = \"1h\"")).expect("valid");
    assert!(
        off.warnings
            .iter()
            .any(|w| w.message.contains("keep_evidence only matters")),
        "{:?}",
        off.warnings
    );

    for (fleet, want) in [
        (
            "store = \"consul\"\nendpoints = [\"http://a:1\"]\nname = \"x\"",
            "the only store is \"etcd\"",
        ),
        ("store = \"etcd\"\nname = \"x\"", "needs endpoints"),
        (
            "store = \"etcd\"\nendpoints = []\nname = \"x\"",
            "endpoints is empty",
        ),
        (
            "store = \"etcd\"\nendpoints = [\"http://a:1\", \"https://b:2\"]\nname = \"x\"",
            "mix http:// and https://",
        ),
        (
            "store = \"etcd\"\nendpoints = [\"a:1\"]\nname = \"x\"",
            "is not http://host:port",
        ),
        (
            "store = \"etcd\"\nendpoints = [\"http://a:1\"]",
            "needs a name",
        ),
        (
            "store = \"etcd\"\nendpoints = [\"http://a:1\"]\nname = \"Check/out\"",
            "must be 1-63 of",
        ),
        (
            "store = \"etcd\"\nendpoints = [\"http://a:1\"]\nname = \"x\"\nreplica = \"a b\"",
            "replica",
        ),
        (
            "store = \"etcd\"\nendpoints = [\"http://a:1\"]\nname = \"x\"\nca_file = \"ca.pem\"",
            "endpoints are http://",
        ),
        (
            "store = \"etcd\"\nendpoints = [\"https://a:1\"]\nname = \"x\"\ncert_file = \"c.pem\"",
            "needs key_file",
        ),
        (
            "store = \"etcd\"\nendpoints = [\"http://a:1\"]\nname = \"x\"\nlease = 3",
            "unknown field",
        ),
    ] {
        let e = parse(&format!("[fleet]\n{fleet}\n{MINIMAL}")).expect_err(fleet);
        assert!(e.to_string().contains(want), "{fleet}: {e}");
    }
}

#[test]
fn health_checks_have_defaults_and_bounds() {
    let c = parse(&format!(
        "{MINIMAL}[route.health_check]\npath = \"/healthz\"\n"
    ))
    .expect("valid");
    let h = c.routes[0].health_check.as_ref().expect("a check");
    assert_eq!(
        (
            h.check.method.as_str(),
            h.check.expect_status,
            h.check.timeout,
            h.interval,
            h.unhealthy,
            h.healthy
        ),
        (
            "GET",
            200,
            Duration::from_secs(1),
            Duration::from_secs(5),
            3,
            2
        )
    );
    assert!(!h.start_out, "in from the start unless asked");
    let c = parse(&format!(
        "{MINIMAL}[route.health_check]\npath = \"/healthz\"\nstart_out = true\n"
    ))
    .expect("valid");
    assert!(
        c.routes[0]
            .health_check
            .as_ref()
            .expect("a check")
            .start_out
    );
    assert!(parse(MINIMAL).expect("valid").routes[0]
        .health_check
        .is_none());
    for (check, want) in [
        (
            "path = \"healthz\"",
            "health check path \"healthz\" must start with '/'",
        ),
        (
            "path = \"/\"\ninterval = \"100ms\"",
            "between 500ms and 300s",
        ),
        ("path = \"/\"\ninterval = \"1h\"", "between 500ms and 300s"),
        (
            "path = \"/\"\ninterval = \"1s\"\ntimeout = \"2s\"",
            "must be at most its interval",
        ),
        ("path = \"/\"\nunhealthy = 0", "unhealthy"),
        ("path = \"/\"\nhealthy = 101", "healthy"),
        (
            "path = \"/\"\nmethod = \"BREW\"",
            "health check method \"BREW\"",
        ),
        ("path = \"/\"\nrise = 2", "unknown field"),
        ("interval = \"5s\"", "a health check needs a path"),
        (
            "grpc_service = \"checkout\"",
            "a gRPC health check needs HTTP/2: version v1's endpoints are HTTP/1.1",
        ),
    ] {
        let text = format!("{MINIMAL}[route.health_check]\n{check}\n");
        let e = parse(&text).expect_err(check);
        assert!(e.to_string().contains(want), "{check}: {e}");
    }
    // gRPC: the health service's Check, over h2c or https endpoints only.
    let h2c = |check: &str| {
        format!("[[route]]\nname = \"web\"\n[route.stable]\nversion = \"v1\"\nendpoints = [\"h2c://127.0.0.1:9000\"]\n[route.health_check]\n{check}\n")
    };
    let c = parse(&h2c("grpc_service = \"\"")).expect("valid");
    let h = c.routes[0].health_check.as_ref().expect("a check");
    assert_eq!(h.grpc_service.as_deref(), Some(""));
    assert_eq!(
        (h.check.method.as_str(), h.check.path.as_str()),
        ("POST", "/grpc.health.v1.Health/Check")
    );
    let e = parse(&h2c("grpc_service = \"a\"\npath = \"/x\"")).expect_err("path");
    assert!(e.to_string().contains("`path` does not go with it"), "{e}");
    let e = parse(&format!(
        "{MINIMAL}[route.canary]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:9001\"]\nweight = 5\n[[route.smoke]]\npath = \"/\"\ngrpc_service = \"a\"\n"
    ))
    .expect_err("a smoke check's grpc_service");
    assert!(
        e.to_string()
            .contains("`grpc_service` is a [route.health_check] key"),
        "{e}"
    );
}

#[test]
fn an_endpoint_checked_differently_by_two_routes_is_a_warning() {
    let route = |name: &str, prefix: &str, check: &str| {
        format!("[[route]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\n[route.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:9000\"]\n{check}")
    };
    let check = |path: &str| format!("[route.health_check]\npath = \"{path}\"\n");
    let same =
        route("api", "/api", &check("/healthz")) + &route("admin", "/admin", &check("/healthz"));
    assert!(parse(&same).expect("valid").warnings.is_empty());
    let unchecked = route("api", "/api", &check("/healthz")) + &route("admin", "/admin", "");
    assert!(parse(&unchecked).expect("valid").warnings.is_empty());
    let differ =
        route("api", "/api", &check("/healthz")) + &route("admin", "/admin", &check("/admin/ok"));
    let c = parse(&differ).expect("valid, with a warning");
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0]
            .message
            .contains("endpoint 127.0.0.1:9000 is checked by route \"api\"'s health check"),
        "{:?}",
        c.warnings
    );
}

#[test]
fn smoke_checks_need_a_canary_and_valid_requests() {
    let with = |smoke: &str| {
        format!("{MINIMAL}[route.canary]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:9001\"]\nweight = 5\n{smoke}")
    };
    let c = parse(&with(
        "[[route.smoke]]\npath = \"/healthz?deep=1\"\nmethod = \"head\"\nheaders = { \"X-Token\" = \"t\" }\nexpect_status = 204\nexpect_body = \"ok\"\ntimeout = \"2s\"\n[[route.smoke]]\npath = \"/\"\n",
    ))
    .expect("valid");
    let s = &c.routes[0].smoke;
    assert_eq!(s.len(), 2);
    assert_eq!(
        (s[0].method.as_str(), s[0].expect_status, s[0].timeout),
        ("HEAD", 204, Duration::from_secs(2))
    );
    assert_eq!(s[0].headers, [("x-token".to_string(), "t".to_string())]);
    assert_eq!((s[1].method.as_str(), s[1].expect_status), ("GET", 200));
    for (smoke, want) in [
        (
            "[[route.smoke]]\npath = \"healthz\"\n",
            "must start with '/'",
        ),
        (
            "[[route.smoke]]\npath = \"/\"\nmethod = \"BREW\"\n",
            "is not GET",
        ),
        (
            "[[route.smoke]]\npath = \"/\"\nexpect_status = 700\n",
            "expect_status",
        ),
        (
            "[[route.smoke]]\npath = \"/\"\ntimeout = \"5m\"\n",
            "at most 60s",
        ),
        (
            "[[route.smoke]]\npath = \"/\"\nheaders = { \"a b\" = \"x\" }\n",
            "not a valid header",
        ),
        (
            "[[route.smoke]]\npath = \"/\"\nbody = \"x\"\n",
            "unknown field",
        ),
        (
            "[[route.smoke]]\npath = \"/\"\ninterval = \"5s\"\n",
            "`interval` is a [route.health_check] key",
        ),
        (
            "[[route.smoke]]\npath = \"/\"\nstart_out = true\n",
            "`start_out` is a [route.health_check] key",
        ),
    ] {
        let e = parse(&with(smoke)).expect_err(smoke);
        assert!(e.to_string().contains(want), "{smoke}: {e}");
    }
    let e = parse(&format!("{MINIMAL}[[route.smoke]]\npath = \"/\"\n")).expect_err("no canary");
    assert!(e.to_string().contains("needs a [route.canary]"), "{e}");
}

#[test]
fn endpoint_schemes_choose_the_protocol_and_one_version_shares_one() {
    let with = |eps: &str, extra: &str| {
        MINIMAL.replace(
            "endpoints = [\"127.0.0.1:9000\"]",
            &format!("endpoints = [{eps}]\n{extra}"),
        )
    };
    let c = parse(&with(
        "\"h2c://10.0.0.1:50051\", \"h2c://10.0.0.2:50051\"",
        "",
    ))
    .expect("h2c");
    assert_eq!(c.routes[0].stable.protocol, UpstreamProtocol::H2c);
    assert_eq!(c.routes[0].stable.endpoints[0].addr, "10.0.0.1:50051");
    let c = parse(&with("\"https://api.internal\", \"https://[::1]\"", "")).expect("https");
    assert_eq!(c.routes[0].stable.protocol, UpstreamProtocol::Https);
    assert_eq!(c.routes[0].stable.endpoints[0].addr, "api.internal:443");
    assert_eq!(c.routes[0].stable.endpoints[1].addr, "[::1]:443");
    let c = parse(&with("\"http://10.0.0.1:80/\"", "")).expect("http");
    assert_eq!(c.routes[0].stable.protocol, UpstreamProtocol::Http1);
    assert_eq!(c.routes[0].stable.endpoints[0].addr, "10.0.0.1:80");
    assert_eq!(c.routes[0].grpc_error_codes, vec![2, 4, 13, 14, 15]);

    let err = parse(&with("\"10.0.0.1:80\", \"h2c://10.0.0.2:80\"", ""))
        .expect_err("a mix")
        .to_string();
    assert!(
        err.contains("one version's endpoints share one scheme"),
        "{err}"
    );
    let err = parse(&with("\"grpc://10.0.0.1:80\"", ""))
        .expect_err("unknown scheme")
        .to_string();
    assert!(err.contains("has scheme \"grpc\""), "{err}");
    let err = parse(&with("\"https://api.internal:8443/v1\"", ""))
        .expect_err("a path")
        .to_string();
    assert!(err.contains("no path"), "{err}");
}

#[test]
fn upstream_tls_goes_with_https_and_names_real_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let with = |eps: &str, tls: &str| {
        MINIMAL.replace(
            "endpoints = [\"127.0.0.1:9000\"]",
            &format!("endpoints = [{eps}]\n[route.stable.tls]\n{tls}"),
        )
    };
    let c = parse(&with(
        "\"https://10.0.0.1:8443\"",
        &format!(
            "ca_file = \"{}\"\nserver_name = \"API.internal\"\ncert_file = \"c.pem\"\nkey_file = \"c.key\"",
            ca.display()
        ),
    ))
    .expect("tls");
    let tls = c.routes[0].stable.tls.clone().expect("tls settings");
    assert_eq!(tls.server_name.as_deref(), Some("api.internal"));
    assert_eq!(
        tls.client_cert,
        Some(("/etc/veer/c.pem".into(), "/etc/veer/c.key".into()))
    );
    let err = parse(&with("\"h2c://10.0.0.1:80\"", "server_name = \"x\""))
        .expect_err("tls without https")
        .to_string();
    assert!(err.contains("use https:// endpoints"), "{err}");
    let err = parse(&with(
        "\"https://10.0.0.1:80\"",
        "ca_file = \"/nonexistent/ca.pem\"",
    ))
    .expect_err("missing ca")
    .to_string();
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    let err = parse(&with("\"https://10.0.0.1:80\"", "cert_file = \"c.pem\""))
        .expect_err("cert without key")
        .to_string();
    assert!(err.contains("cert_file needs key_file"), "{err}");
    let err = parse(&with("\"https://10.0.0.1:80\"", "verify = false"))
        .expect_err("no switch turns verification off")
        .to_string();
    assert!(err.contains("verify"), "{err}");
}

#[test]
fn grpc_error_codes_are_codes_listed_once() {
    let with = |codes: &str| {
        MINIMAL.replace(
            "name = \"web\"",
            &format!("name = \"web\"\ngrpc_error_codes = {codes}"),
        )
    };
    let c = parse(&with("[14, 13]")).expect("codes");
    assert_eq!(c.routes[0].grpc_error_codes, vec![13, 14]);
    for (bad, why) in [
        ("[0]", "0 is OK"),
        ("[17]", "not a gRPC status code"),
        ("[13, 13]", "listed twice"),
    ] {
        let err = parse(&with(bad)).expect_err(bad).to_string();
        assert!(err.contains(why), "{bad}: {err}");
    }
}

#[test]
fn mirroring_needs_a_canary_a_share_and_sane_caps() {
    let canary = "[route.canary]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:9001\"]\nweight = 0\n";
    let ok = format!(
        "{MINIMAL}{canary}[route.mirror]\npercent = 12.5\nmethods = [\"get\", \"HEAD\", \"GET\"]\n"
    );
    let c = parse(&ok).expect("valid");
    let m = c.routes[0].mirror.clone().expect("mirror");
    assert_eq!(
        (m.percent_bp, m.max_body, m.max_concurrent, m.methods),
        (
            1250,
            64 * 1024,
            100,
            vec!["GET".to_string(), "HEAD".to_string()]
        )
    );
    assert!(c.routes[0].judge.mirrored);
    let no_canary = format!("{MINIMAL}[route.mirror]\npercent = 10\n");
    assert!(parse(&no_canary)
        .expect_err("invalid")
        .to_string()
        .contains("needs a [route.canary]"));
    let bad = format!(
        "{MINIMAL}{canary}[route.mirror]\npercent = 0\nmax_body = -1\nmax_concurrent = 0\nmethods = [\"G T\"]\n"
    );
    let e = parse(&bad).expect_err("invalid").to_string();
    for want in [
        "percent must be greater than 0",
        "max_body",
        "max_concurrent",
        "not an HTTP method",
    ] {
        assert!(e.contains(want), "{want}: {e}");
    }
}

#[test]
fn the_access_log_is_off_unless_asked_for() {
    assert_eq!(
        parse(MINIMAL).expect("valid").proxy.access_log,
        AccessLog::Off
    );
    for (v, want) in [
        ("off", AccessLog::Off),
        ("errors", AccessLog::Errors),
        ("all", AccessLog::All),
    ] {
        let c = parse(&format!("[proxy]\naccess_log = \"{v}\"\n{MINIMAL}")).expect("valid");
        assert_eq!(c.proxy.access_log, want);
        assert_eq!(want.as_str(), v);
    }
    let e = parse(&format!("[proxy]\naccess_log = \"yes\"\n{MINIMAL}")).expect_err("not a mode");
    assert!(
        e.to_string().contains("access_log \"yes\" is not one of"),
        "{e}"
    );
}

#[test]
fn veer_speaks_http1_to_upstreams_unless_hyper_is_asked_for() {
    assert_eq!(
        parse(MINIMAL).expect("valid").proxy.upstream_http1,
        UpstreamHttp1::Veer
    );
    for (v, want) in [
        ("veer", UpstreamHttp1::Veer),
        ("hyper", UpstreamHttp1::Hyper),
    ] {
        let c = parse(&format!("[proxy]\nupstream_http1 = \"{v}\"\n{MINIMAL}")).expect("valid");
        assert_eq!(c.proxy.upstream_http1, want);
        assert_eq!(want.as_str(), v);
    }
    let e = parse(&format!("[proxy]\nupstream_http1 = \"raw\"\n{MINIMAL}")).expect_err("not one");
    assert!(
        e.to_string()
            .contains("upstream_http1 \"raw\" is not one of"),
        "{e}"
    );
}

#[test]
fn one_vote_per_client_is_on_unless_turned_off_and_must_be_a_bool() {
    let c = parse(MINIMAL).expect("minimal");
    assert!(c.routes[0].judge.one_vote_per_client);
    let off = parse(&format!(
        "{MINIMAL}[route.judge]\none_vote_per_client = false\n"
    ))
    .expect("off");
    assert!(!off.routes[0].judge.one_vote_per_client);
    let e = parse(&format!(
        "{MINIMAL}[route.judge]\none_vote_per_client = \"no\"\n"
    ))
    .expect_err("a string");
    assert!(format!("{e}").contains("expected a boolean"), "{e}");
}

#[test]
fn max_request_body_is_proxy_wide_or_a_routes_own_and_never_negative() {
    let c = parse(MINIMAL).expect("valid");
    assert_eq!(c.proxy.max_request_body, 0, "no limit unless one is set");
    assert_eq!(c.routes[0].max_request_body, None);
    let text = format!(
        "[proxy]\nmax_request_body = 1048576\n{}",
        MINIMAL.replace("name = \"web\"", "name = \"web\"\nmax_request_body = 0")
    );
    let c = parse(&text).expect("valid");
    assert_eq!(c.proxy.max_request_body, 1 << 20);
    assert_eq!(c.routes[0].max_request_body, Some(0), "a route may lift it");
    for bad in [
        "[proxy]\nmax_request_body = -1\n".to_string() + MINIMAL,
        MINIMAL.replace("name = \"web\"", "name = \"web\"\nmax_request_body = -5"),
    ] {
        let e = parse(&bad).expect_err("rejected");
        assert!(
            e.0.iter().any(|d| d.message.contains("max_request_body")),
            "{bad}: {e:?}"
        );
    }
    // Bytes, as every size in the file: a unit is a type error at the key.
    let text = MINIMAL.replace(
        "name = \"web\"",
        "name = \"web\"\nmax_request_body = \"8m\"",
    );
    let e = parse(&text).expect_err("rejected");
    assert!(e.0.iter().any(|d| (d.line, d.col) == (4, 20)), "{e:?}");
}

#[test]
fn a_rate_limit_needs_a_positive_rate_and_bursts_at_least_one() {
    let with = |table: &str| parse(&format!("{MINIMAL}[route.rate_limit]\n{table}"));
    let c = with("requests_per_second = 2.5\n").expect("valid");
    let l = c.routes[0].rate_limit.clone().expect("set");
    assert_eq!(
        (l.per_second_milli, l.burst),
        (2500, 3),
        "burst defaults to the rate, rounded up"
    );
    let l = with("requests_per_second = 0.05\nburst = 10\n")
        .expect("valid")
        .routes[0]
        .rate_limit
        .clone()
        .expect("set");
    assert_eq!((l.per_second_milli, l.burst), (50, 10));
    assert_eq!(parse(MINIMAL).expect("valid").routes[0].rate_limit, None);
    let l = with("requests_per_second = 5\nkey = \"header:X-Api-Key\"\n")
        .expect("valid")
        .routes[0]
        .rate_limit
        .clone()
        .expect("set");
    assert_eq!(l.key_header.as_deref(), Some("x-api-key"));
    let l = with("requests_per_second = 5\nkey = \"client-ip\"\n")
        .expect("valid")
        .routes[0]
        .rate_limit
        .clone()
        .expect("set");
    assert_eq!(l.key_header, None);
    for (bad, word) in [
        ("requests_per_second = 0\n", "requests_per_second"),
        ("requests_per_second = -1\n", "requests_per_second"),
        ("requests_per_second = 5\nburst = 0\n", "burst"),
        ("burst = 5\n", "requests_per_second"),
        ("requests_per_second = 5\nper_ip = true\n", "per_ip"),
        (
            "requests_per_second = 5\nkey = \"cookie:session\"\n",
            "rate_limit key",
        ),
    ] {
        let e = with(bad).expect_err(bad);
        assert!(e.0.iter().any(|d| d.message.contains(word)), "{bad}: {e:?}");
    }
}

#[test]
fn allow_and_deny_ranges_are_addresses_or_cidr_ranges() {
    let with =
        |keys: &str| parse(&MINIMAL.replace("name = \"web\"", &format!("name = \"web\"\n{keys}")));
    let c =
        with("allow_from = [\"10.0.0.0/8\", \"2001:db8::1\"]\ndeny_from = [\" 10.13.0.0/16 \"]")
            .expect("valid");
    let text = |v: &[ipnet::IpNet]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(
        text(&c.routes[0].allow_from),
        ["10.0.0.0/8", "2001:db8::1/128"]
    );
    assert_eq!(text(&c.routes[0].deny_from), ["10.13.0.0/16"]);
    assert!(parse(MINIMAL).expect("valid").routes[0]
        .allow_from
        .is_empty());
    for bad in ["allow_from = [\"10.0.0.0/33\"]", "deny_from = [\"office\"]"] {
        let e = with(bad).expect_err(bad);
        assert!(
            e.0.iter().any(|d| d.message.contains("CIDR")),
            "{bad}: {e:?}"
        );
    }
    // Host bits set: taken as the network, with a warning.
    let c = with("allow_from = [\"10.1.2.3/8\"]").expect("a warning, not an error");
    assert_eq!(text(&c.routes[0].allow_from), ["10.0.0.0/8"]);
}

#[test]
fn a_route_may_rewrite_its_prefix_but_only_to_a_plain_path() {
    let with = |line: &str| {
        parse(&MINIMAL.replace(
            "name = \"web\"",
            &format!("name = \"web\"\npath_prefix = \"/api\"\n{line}"),
        ))
    };
    let c = with("rewrite_prefix = \"/\"").expect("valid");
    assert_eq!(c.routes[0].rewrite_prefix.as_deref(), Some("/"));
    assert_eq!(
        parse(MINIMAL).expect("valid").routes[0].rewrite_prefix,
        None
    );
    for bad in ["v2/", "/v2?x=1", "/v2#a", "/a b", "/a/../b", "/./b", ""] {
        let e = with(&format!("rewrite_prefix = {bad:?}")).expect_err(bad);
        assert!(
            e.0.iter()
                .any(|d| d.message.contains("rewrite_prefix") && d.line == 5),
            "{bad}: {e:?}"
        );
    }
}

#[test]
fn header_tables_set_and_remove_fields_but_never_those_veer_keeps() {
    let with = |table: &str| parse(&format!("{MINIMAL}{table}"));
    let c = with(concat!(
        "[route.request_headers]\n",
        "set = { \"X-Env\" = \"prod\", host = \"api.internal\" }\n",
        "remove = [\"X-Debug\", \"x-debug\"]\n",
        "[route.response_headers]\n",
        "set = { strict-transport-security = \"max-age=31536000\" }\n",
        "remove = [\"server\"]\n",
    ))
    .expect("valid");
    let r = &c.routes[0];
    let mut set = r.request_headers.set.clone();
    set.sort();
    assert_eq!(
        set,
        [
            ("host".to_string(), "api.internal".to_string()),
            ("x-env".to_string(), "prod".to_string())
        ]
    );
    assert_eq!(r.request_headers.remove, ["x-debug"]);
    assert_eq!(r.response_headers.remove, ["server"]);
    assert!(parse(MINIMAL).expect("valid").routes[0]
        .request_headers
        .is_empty());
    for (bad, word) in [
        (
            "[route.request_headers]\nset = { \"x-forwarded-for\" = \"1.2.3.4\" }\n",
            "forwarding",
        ),
        (
            "[route.request_headers]\nremove = [\"forwarded\"]\n",
            "forwarding",
        ),
        (
            "[route.request_headers]\nset = { connection = \"close\" }\n",
            "one hop",
        ),
        (
            "[route.request_headers]\nremove = [\"content-length\"]\n",
            "frames",
        ),
        ("[route.request_headers]\nremove = [\"host\"]\n", "\"host\""),
        (
            "[route.request_headers]\nset = { grpc-timeout = \"1S\" }\n",
            "deadline",
        ),
        (
            "[route.response_headers]\nset = { host = \"x\" }\n",
            "\"host\"",
        ),
        (
            "[route.response_headers]\nremove = [\"grpc-status\"]\n",
            "gRPC",
        ),
        (
            "[route.response_headers]\nremove = [\"transfer-encoding\"]\n",
            "frames",
        ),
        (
            "[route.request_headers]\nset = { \"x y\" = \"1\" }\n",
            "not a header name",
        ),
        (
            "[route.request_headers]\nset = { x-a = \" padded\" }\n",
            "visible ASCII",
        ),
        (
            "[route.request_headers]\nset = { x-a = \"caf\u{e9}\" }\n",
            "visible ASCII",
        ),
        (
            "[route.request_headers]\nset = { X-A = \"1\", x-a = \"2\" }\n",
            "twice",
        ),
        (
            "[route.request_headers]\nset = { x-a = \"1\" }\nremove = [\"X-A\"]\n",
            "both sets and removes",
        ),
        (
            "[route.request_headers]\nappend = { x-a = \"1\" }\n",
            "append",
        ),
    ] {
        let e = with(bad).expect_err(bad);
        assert!(e.0.iter().any(|d| d.message.contains(word)), "{bad}: {e:?}");
    }
    // With request ids on, veer keeps the request's `X-Request-Id`; the
    // answers' may be edited.
    let ids = "[proxy]\nrequest_id = true\n";
    let e = parse(&format!(
        "{ids}{MINIMAL}[route.request_headers]\nremove = [\"X-Request-Id\"]\n"
    ))
    .expect_err("veer's");
    assert!(
        e.0.iter().any(|d| d.message.contains("request_id")),
        "{e:?}"
    );
    parse(&format!(
        "{ids}{MINIMAL}[route.response_headers]\nremove = [\"x-request-id\"]\n"
    ))
    .expect("answers may lose it");
    parse(&format!(
        "{MINIMAL}[route.request_headers]\nset = {{ x-request-id = \"fixed\" }}\n"
    ))
    .expect("without request ids it is a field like another");
}

#[test]
fn force_takes_more_values_for_each_version_but_never_one_for_both() {
    let with = |extra: &str| {
        parse(&format!(
            "{MINIMAL}[route.canary]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:9001\"]\n[route.force]\nheader = \"x-canary\"\n{extra}"
        ))
    };
    let c = with("canary_values = [\"always\", \"on\", \"always\"]\nstable_values = [\"never\"]\n")
        .expect("valid");
    let f = c.routes[0].force.as_ref().expect("force");
    assert_eq!(f.canary_values, ["always", "on"]);
    assert_eq!(f.stable_values, ["never"]);
    let f = with("").expect("valid").routes[0]
        .force
        .clone()
        .expect("force");
    assert!(f.canary_values.is_empty() && f.stable_values.is_empty());
    for (bad, word) in [
        (
            "canary_values = [\"on\"]\nstable_values = [\"on\"]\n",
            "in both",
        ),
        ("canary_values = [\"a b\"]\n", "visible ASCII"),
        ("stable_values = [\"\"]\n", "visible ASCII"),
    ] {
        let e = with(bad).expect_err(bad);
        assert!(e.0.iter().any(|d| d.message.contains(word)), "{bad}: {e:?}");
    }
}

#[test]
fn proxy_protocol_from_takes_ranges_and_needs_the_protocol() {
    let with = |proxy: &str| parse(&format!("[proxy]\n{proxy}\n{MINIMAL}"));
    let c = with("proxy_protocol = true\nproxy_protocol_from = [\"10.0.0.0/8\", \"192.0.2.7\"]")
        .expect("valid");
    let from: Vec<String> = c
        .proxy
        .proxy_protocol_from
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(from, ["10.0.0.0/8", "192.0.2.7/32"]);
    assert!(with("proxy_protocol = true")
        .expect("valid")
        .proxy
        .proxy_protocol_from
        .is_empty());
    for (bad, word) in [
        (
            "proxy_protocol_from = [\"10.0.0.0/8\"]",
            "set proxy_protocol = true",
        ),
        (
            "proxy_protocol = true\nproxy_protocol_from = [\"lb.example\"]",
            "not an address",
        ),
    ] {
        let e = with(bad).expect_err(bad);
        assert!(e.0.iter().any(|d| d.message.contains(word)), "{bad}: {e:?}");
    }
}

#[test]
fn a_sticky_cookie_is_the_last_source_and_only_its_own() {
    let with = |sticky: &str, table: &str| {
        parse(&format!(
            "{}[route.sticky_cookie]\n{table}",
            MINIMAL.replace(
                "name = \"web\"",
                &format!("name = \"web\"\nsticky = {sticky}")
            )
        ))
    };
    let c = with(
        "[\"header:x-user\", \"cookie:k\"]",
        "name = \"k\"\nmax_age = \"2d\"\n",
    )
    .expect("valid");
    let s = c.routes[0].sticky_cookie.clone().expect("set");
    assert_eq!((s.name.as_str(), s.path.as_str()), ("k", "/"));
    assert_eq!(s.max_age, Some(std::time::Duration::from_secs(2 * 86_400)));
    assert_eq!(
        (s.domain, s.same_site, s.secure),
        (None, SameSite::Lax, false)
    );
    let s = with(
        "[\"cookie:k\"]",
        "name = \"k\"\ndomain = \".Shop.Example.com\"\nsame_site = \"None\"\n",
    )
    .expect("valid")
    .routes[0]
        .sticky_cookie
        .clone()
        .expect("set");
    // SameSite=None is refused by browsers without Secure.
    assert_eq!(
        (s.domain.as_deref(), s.same_site, s.secure),
        (Some("shop.example.com"), SameSite::None, true)
    );
    let s = with(
        "[\"cookie:k\"]",
        "name = \"k\"\nsame_site = \"strict\"\nsecure = true\n",
    )
    .expect("valid")
    .routes[0]
        .sticky_cookie
        .clone()
        .expect("set");
    assert_eq!((s.same_site, s.secure), (SameSite::Strict, true));
    for (sticky, table, word) in [
        (
            "[\"cookie:k\", \"client-ip\"]",
            "name = \"k\"\n",
            "last sticky source",
        ),
        (
            "[\"client-ip\"]",
            "name = \"k\"\n",
            "not one of the route's sticky sources",
        ),
        ("[\"cookie:k\"]", "name = \"k\"\npath = \"app\"\n", "path"),
        (
            "[\"cookie:k\"]",
            "name = \"k\"\nmax_age = \"soon\"\n",
            "invalid duration",
        ),
        (
            "[\"cookie:k\"]",
            "name = \"k\"\nhttp_only = false\n",
            "http_only",
        ),
        (
            "[\"cookie:k\"]",
            "name = \"k\"\ndomain = \"exa mple.com\"\n",
            "DNS name",
        ),
        (
            "[\"cookie:k\"]",
            "name = \"k\"\ndomain = \"-a.com\"\n",
            "DNS name",
        ),
        (
            "[\"cookie:k\"]",
            "name = \"k\"\nsame_site = \"sometimes\"\n",
            "same_site",
        ),
    ] {
        let e = with(sticky, table).expect_err(table);
        assert!(
            e.0.iter().any(|d| d.message.contains(word)),
            "{table}: {e:?}"
        );
    }
}

#[test]
fn cors_takes_origins_and_ingress_nginxs_defaults() {
    let with = |table: &str| parse(&format!("{MINIMAL}[route.cors]\n{table}"));
    with("allow_origins = [\"https://*.example.com\"]\n").expect("a subdomain wildcard");
    let c = with("allow_origins = [\"https://App.example.com\", \"*\"]\n").expect("valid");
    let cors = c.routes[0].cors.clone().expect("set");
    assert_eq!(cors.allow_origins, ["https://app.example.com", "*"]);
    assert_eq!(
        cors.allow_methods,
        ["GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"]
    );
    assert_eq!(cors.allow_headers.len(), 9);
    assert!(cors.expose_headers.is_empty());
    assert!(cors.allow_credentials);
    assert_eq!(cors.max_age, std::time::Duration::from_secs(1_728_000));
    for (bad, word) in [
        ("allow_origins = []\n", "needs allow_origins"),
        (
            "allow_origins = [\"app.example.com\"]\n",
            "is not \"*\" or an origin",
        ),
        (
            "allow_origins = [\"https://app.example.com/\"]\n",
            "is not \"*\" or an origin",
        ),
        (
            "allow_origins = [\"https://app.*.com\"]\n",
            "is not \"*\" or an origin",
        ),
        (
            "allow_origins = [\"https://*\"]\n",
            "is not \"*\" or an origin",
        ),
        (
            "allow_origins = [\"*\"]\nallow_methods = [\"GET POST\"]\n",
            "is not a name",
        ),
        (
            "allow_origins = [\"*\"]\nmax_age = \"forever\"\n",
            "invalid duration",
        ),
        ("allow_origins = [\"*\"]\norigins = [\"*\"]\n", "origins"),
    ] {
        let e = with(bad).expect_err(bad);
        assert!(e.0.iter().any(|d| d.message.contains(word)), "{bad}: {e:?}");
    }
}

#[test]
fn a_per_address_cap_left_at_its_default_behind_trusted_proxies_is_warned_about() {
    let warned = |proxy: &str| {
        let c = parse(&format!("[proxy]\n{proxy}\n{MINIMAL}")).expect("valid");
        c.warnings
            .iter()
            .any(|w| w.message.contains("caps each proxy's connections"))
    };
    assert!(warned("trusted_hops = 1"));
    for quiet in [
        "trusted_hops = 0",
        "trusted_hops = 1\nmax_connections_per_ip = 5000",
        "trusted_hops = 1\nproxy_protocol = true",
    ] {
        assert!(!warned(quiet), "{quiet}");
    }
}

#[test]
fn an_https_redirect_nobody_can_satisfy_is_warned_about() {
    let route = MINIMAL.replace("name = \"web\"", "name = \"web\"\nhttps_redirect = true");
    let warned = |c: &Config| {
        c.warnings
            .iter()
            .any(|w| w.message.contains("https_redirect"))
    };
    let c = parse(&route).expect("valid");
    assert!(c.routes[0].https_redirect);
    assert!(
        warned(&c),
        "no TLS, no trusted proxy: every request redirected"
    );
    for proxy in ["trusted_hops = 1", "proxy_protocol = true"] {
        let c = parse(&format!("[proxy]\n{proxy}\n{route}")).expect("valid");
        assert!(!warned(&c), "{proxy}");
    }
}

#[test]
fn the_tls_listeners_client_settings_need_client_ca_and_public_port_is_a_port() {
    let with = |keys: &str| {
        parse(&format!(
            "[proxy.tls]\nlisten = [\"0.0.0.0:8443\"]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n{keys}\n{MINIMAL}"
        ))
    };
    let c = with("client_ca = \"/ca.pem\"\nclient_crl = \"/crl.pem\"\npublic_port = 443")
        .expect("valid");
    let tls = c.proxy.tls.expect("tls");
    assert_eq!(tls.client_crl.as_deref(), Some(Path::new("/crl.pem")));
    assert!(tls.ticket_keys.is_empty());
    assert!(!tls.tls13_only);
    assert!(tls.session_tickets);
    assert_eq!(tls.session_cache, 20_000);
    let c = with("session_tickets = false\nsession_cache = 0").expect("valid");
    let off = c.proxy.tls.expect("tls");
    assert!(!off.session_tickets);
    assert_eq!(off.session_cache, 0);
    for (v, only) in [("1.2", false), ("1.3", true)] {
        let c = with(&format!("min_version = \"{v}\"")).expect("valid");
        assert_eq!(c.proxy.tls.expect("tls").tls13_only, only, "{v}");
    }
    let c = with("ticket_keys = [\"/t/now.key\", \"/t/before.key\"]").expect("valid");
    assert_eq!(
        c.proxy.tls.expect("tls").ticket_keys,
        [Path::new("/t/now.key"), Path::new("/t/before.key")]
    );
    assert_eq!(tls.public_port, Some(443));
    assert_eq!(
        with("").expect("valid").proxy.tls.expect("tls").public_port,
        None
    );
    for (keys, want) in [
        ("client_crl = \"/crl.pem\"", "client_crl needs client_ca"),
        ("client_auth = \"optional\"", "client_auth needs client_ca"),
        (
            "forward_client_cert = true",
            "forward_client_cert needs client_ca",
        ),
        ("public_port = 0", "public_port must be between 1 and 65535"),
        ("ticket_keys = []", "ticket_keys: 1 to 4 files"),
        (
            "session_tickets = false\nticket_keys = [\"/t/now.key\"]",
            "session_tickets = false leaves no use for ticket_keys",
        ),
        (
            "session_cache = -1",
            "session_cache (sessions held; 0: none) must be between 0 and 1000000",
        ),
        (
            "session_cache = 1000001",
            "session_cache (sessions held; 0: none) must be between 0 and 1000000",
        ),
        (
            "min_version = \"1.1\"",
            "min_version must be \"1.2\" or \"1.3\"",
        ),
        (
            "ticket_keys = [\"/a\", \"/b\", \"/c\", \"/d\", \"/e\"]",
            "ticket_keys: 1 to 4 files",
        ),
        (
            "public_port = 70000",
            "public_port must be between 1 and 65535",
        ),
    ] {
        let e = with(keys).expect_err(keys).to_string();
        assert!(e.contains(want), "{keys}: {e}");
    }
}

#[test]
fn a_route_requiring_a_client_certificate_needs_client_ca() {
    let route = MINIMAL.replace(
        "name = \"web\"\n",
        "name = \"web\"\nrequire_client_cert = true\n",
    );
    let e = parse(&route).expect_err("no TLS").to_string();
    assert!(
        e.contains("require_client_cert needs [proxy.tls] client_ca"),
        "{e}"
    );
    let tls = "[proxy.tls]\nlisten = [\"0.0.0.0:8443\"]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n";
    let e = parse(&format!("{tls}{route}"))
        .expect_err("no client_ca")
        .to_string();
    assert!(
        e.contains("require_client_cert needs [proxy.tls] client_ca"),
        "{e}"
    );
    let c = parse(&format!(
        "{tls}client_ca = \"/ca.pem\"\nclient_auth = \"optional\"\n{route}"
    ))
    .expect("valid");
    assert!(c.routes[0].require_client_cert);
    // So does a rate limit keyed by the client certificate.
    let keyed =
        format!("{MINIMAL}[route.rate_limit]\nrequests_per_second = 5\nkey = \"client-cert\"\n");
    let e = parse(&format!("{tls}{keyed}"))
        .expect_err("no client_ca")
        .to_string();
    assert!(
        e.contains("rate_limit key \"client-cert\" needs [proxy.tls] client_ca"),
        "{e}"
    );
    let c = parse(&format!("{tls}client_ca = \"/ca.pem\"\n{keyed}")).expect("valid");
    let limit = c.routes[0].rate_limit.as_ref().expect("rate limit");
    assert!(limit.key_client_cert && limit.key_header.is_none());
}

#[test]
fn outlier_detection_has_defaults_and_bounds() {
    let c = parse(&format!("{MINIMAL}[route.outlier_detection]\n")).expect("valid");
    let o = c.routes[0].outlier_detection.as_ref().expect("detection");
    assert_eq!(
        (o.consecutive_errors, o.ejection_time, o.max_ejected_percent),
        (5, Duration::from_secs(30), 50)
    );
    assert!(parse(MINIMAL).expect("valid").routes[0]
        .outlier_detection
        .is_none());
    let c = parse(&format!(
        "{MINIMAL}[route.outlier_detection]\nconsecutive_errors = 3\nejection_time = \"10s\"\nmax_ejected_percent = 100\n"
    ))
    .expect("valid");
    let o = c.routes[0].outlier_detection.as_ref().expect("detection");
    assert_eq!(
        (o.consecutive_errors, o.ejection_time, o.max_ejected_percent),
        (3, Duration::from_secs(10), 100)
    );
    for (keys, want) in [
        ("consecutive_errors = 0", "consecutive_errors"),
        ("consecutive_errors = 1001", "consecutive_errors"),
        ("ejection_time = \"500ms\"", "between 1s and 1h"),
        ("ejection_time = \"2h\"", "between 1s and 1h"),
        ("ejection_time = \"soon\"", "invalid duration \"soon\""),
        ("max_ejected_percent = 0", "max_ejected_percent"),
        ("max_ejected_percent = 101", "max_ejected_percent"),
        ("consecutive_5xx = 5", "unknown field"),
    ] {
        let text = format!("{MINIMAL}[route.outlier_detection]\n{keys}\n");
        let e = parse(&text).expect_err(keys);
        assert!(e.to_string().contains(want), "{keys}: {e}");
    }
}

#[test]
fn retry_has_defaults_and_bounds() {
    let c = parse(&format!("{MINIMAL}[route.retry]\n")).expect("valid");
    let r = c.routes[0].retry.as_ref().expect("retry");
    assert!(r.on_reset && !r.on_timeout && r.on_status.is_empty());
    assert_eq!((r.retries, r.try_timeout, r.budget_percent), (1, None, 20));
    assert!(parse(MINIMAL).expect("valid").routes[0].retry.is_none());
    let timed = MINIMAL.replace("name = \"web\"\n", "name = \"web\"\ntimeout = \"5s\"\n");
    let c = parse(&format!(
        "{timed}[route.retry]\non = [\"timeout\", \"503\", \"504\", \"503\"]\nretries = 2\ntry_timeout = \"1s\"\nbudget_percent = 50\n"
    ))
    .expect("valid");
    let r = c.routes[0].retry.as_ref().expect("retry");
    assert!(!r.on_reset && r.on_timeout && !r.on_unavailable);
    assert_eq!(r.on_status, [503, 504]);
    let cu = parse(&format!("{MINIMAL}[route.retry]\non = [\"unavailable\"]\n")).expect("valid");
    let u = cu.routes[0].retry.as_ref().expect("retry");
    assert!(u.on_unavailable && !u.on_reset && u.on_status.is_empty());
    assert!(cu.warnings.is_empty(), "{:?}", cu.warnings);
    // With no request body kept, no gRPC call can go again: said.
    let unkept = parse(&format!(
        "[proxy]\nrequest_buffer = 0\n{MINIMAL}[route.retry]\non = [\"reset\", \"unavailable\"]\n"
    ))
    .expect("valid");
    assert_eq!(unkept.warnings.len(), 1, "{:?}", unkept.warnings);
    assert!(unkept.warnings[0]
        .message
        .contains("no gRPC call's messages are kept"));
    assert_eq!(
        (r.retries, r.try_timeout, r.budget_percent),
        (2, Some(Duration::from_secs(1)), 50)
    );
    for (keys, want) in [
        ("on = []", "at least one"),
        ("on = [\"500\"]", "retry on \"500\" is not one of"),
        ("on = [\"timeout\"]", "needs try_timeout"),
        (
            "on = [\"timeout\"]\ntry_timeout = \"15s\"",
            "must be shorter than the route's timeout",
        ),
        ("try_timeout = \"soon\"", "invalid duration \"soon\""),
        ("try_timeout = \"1s\"", "needs \"timeout\" in on"),
        ("retries = 0", "retry retries"),
        ("retries = 3", "retry retries"),
        ("budget_percent = 0", "retry budget_percent"),
        ("budget_percent = 101", "retry budget_percent"),
        ("attempts = 2", "unknown field"),
    ] {
        let text = format!("{MINIMAL}[route.retry]\n{keys}\n");
        let e = parse(&text).expect_err(keys);
        assert!(e.to_string().contains(want), "{keys}: {e}");
    }
}

/// A value of the wrong type is said in TOML's words, not Rust's.
#[test]
fn a_value_of_the_wrong_type_is_said_in_tomls_words() {
    for (text, want) in [
        (
            format!("{MINIMAL}[route.canary]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:9001\"]\nweight = \"5\"\n"),
            "invalid type: string \"5\", expected a number",
        ),
        (
            format!("[proxy]\nworkers = \"2\"\n{MINIMAL}"),
            "invalid type: string \"2\", expected a whole number",
        ),
        (
            MINIMAL.replace("endpoints = [\"127.0.0.1:9000\"]", "endpoints = \"127.0.0.1:9000\""),
            "expected a list ([...])",
        ),
    ] {
        let e = parse(&text).expect_err(&text).to_string();
        assert!(e.contains(want), "{text}: {e}");
        assert!(!e.contains("f64") && !e.contains("i64"), "{e}");
    }
}

#[test]
fn max_header_fields_is_a_hundred_unless_set_between_16_and_1000() {
    assert_eq!(parse(MINIMAL).expect("valid").proxy.max_header_fields, 100);
    let with = |v: i64| parse(&format!("[proxy]\nmax_header_fields = {v}\n{MINIMAL}"));
    for v in [16, 250, 1000] {
        assert_eq!(with(v).expect("valid").proxy.max_header_fields, v as usize);
    }
    for v in [15, 1001] {
        let e = with(v).expect_err("out of range").to_string();
        assert!(
            e.contains("max_header_fields must be between 16 and 1000"),
            "{e}"
        );
    }
}
