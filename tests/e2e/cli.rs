//! The command line: `check`, `--version`, `status`, and the admin endpoints.

use std::process::Command;

use super::support::{get, metric, route_config, veer_cli as veer, Upstream, Veer};

/// `veer revert`, `promote`, `reset` ask a running proxy through its
/// admin endpoint. Who asked and why are kept in a revert's reason and
/// written in the log's audit line with the client's address; a refused
/// action exits 1 saying why; a body that is not what an action takes is
/// a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_actions_from_the_command_line_say_who_and_why() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let proxy = Veer::start(&route_config(&[s.addr], &[c.addr], 20.0, "")).await;
    let token_file = proxy.dir.path().join("state/admin.token");
    let admin = proxy.admin.to_string();
    let run = |action: &'static str, more: &[&str]| {
        let mut args: Vec<String> = vec![
            action.into(),
            "web".into(),
            "--admin".into(),
            admin.clone(),
            "--token-file".into(),
            token_file.display().to_string(),
        ];
        args.extend(more.iter().map(|s| s.to_string()));
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                veer(&args)
            })
            .await
            .unwrap()
        }
    };
    let out = run("revert", &["--by", "alice", "--reason", "p99 doubled"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim(),
        "web: revert: reverted (revert requested by alice: p99 doubled); canary weight 0% (configured 20%)"
    );
    let status = proxy.status().await;
    assert_eq!(
        status["routes"][0]["reverted"]["reason"], "revert requested by alice: p99 doubled",
        "{status}"
    );
    let audit = proxy.logs_with_at_least("admin action", 1).await;
    let line = &audit[0];
    assert_eq!(
        (
            &line["route"],
            &line["action"],
            &line["by"],
            &line["reason"],
            &line["status"]
        ),
        (
            &serde_json::json!("web"),
            &serde_json::json!("revert"),
            &serde_json::json!("alice"),
            &serde_json::json!("p99 doubled"),
            &serde_json::json!(200)
        ),
        "{line}"
    );
    assert!(
        line["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );
    // A promotion of a reverted canary is refused: exit 1, saying why
    // (the admin endpoint's own words, not called a malformed answer).
    let out = run("promote", &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.starts_with("veer: promote web: HTTP 409: ")
            && !stderr.contains("unexpected"),
        "{stderr}"
    );
    let out = run("reset", &[]).await;
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("canary weight 20%"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The token found through the proxy's config (its state dir's).
    let out = tokio::task::spawn_blocking({
        let (admin, config) = (admin.clone(), proxy.config.display().to_string());
        move || veer(&["pause", "web", "--admin", &admin, "--config", &config])
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("paused"),
        "{stdout}"
    );
    // Without the right token: exit 1, HTTP 401.
    let wrong = proxy.dir.path().join("wrong.token");
    super::support::write_with_mode(&wrong, "not-the-token", 0o600);
    let out = tokio::task::spawn_blocking({
        let (admin, wrong) = (admin.clone(), wrong.display().to_string());
        move || veer(&["pause", "web", "--admin", &admin, "--token-file", &wrong])
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("HTTP 401"),
        "{stderr}"
    );
    // Bodies an action does not take: 400, and nothing done.
    let token = std::fs::read_to_string(&token_file).unwrap();
    let long = format!("{{\"reason\": \"{}\"}}", "x".repeat(1001));
    for body in [
        "{\"by\": 5}",
        "{\"who\": \"alice\"}",
        "{\"reason\": \"a\\nforged log line\"}",
        long.as_str(),
        "not json",
    ] {
        let code = super::support::admin_request_with(
            proxy.admin,
            "POST",
            "/routes/web/revert",
            Some(token.trim()),
            body,
        )
        .await;
        assert_eq!(code, 400, "{body}");
    }
    assert!(proxy.status().await["routes"][0]["reverted"].is_null());

    // Named operators' tokens: the name is who acted, whatever the body
    // says; one removed from the file acts no more.
    drop(proxy);
    let fresh = tempfile::tempdir().unwrap();
    let alice_token = "alice-0123456789abcdef";
    super::support::write_with_mode(
        &fresh.path().join("operators"),
        &format!("# name token\nalice {alice_token}\nbob bob-0123456789abcdef\n"),
        0o600,
    );
    super::support::write_with_mode(&fresh.path().join("alice.token"), alice_token, 0o600);
    let with_operators = route_config(&[s.addr], &[c.addr], 20.0, "")
        .replace("[admin]\n", "[admin]\noperators_file = \"operators\"\n");
    let proxy = Veer::start_in_dir(fresh, &with_operators).await;
    let dir = proxy.dir.path().to_path_buf();
    let alice_file = dir.join("alice.token").display().to_string();
    let admin = proxy.admin.to_string();
    let as_alice = |action: &'static str, by: &'static str| {
        let (admin, alice_file) = (admin.clone(), alice_file.clone());
        tokio::task::spawn_blocking(move || {
            veer(&[
                action,
                "web",
                "--admin",
                &admin,
                "--token-file",
                &alice_file,
                "--by",
                by,
                "--reason",
                "canary errors",
            ])
        })
    };
    let out = as_alice("revert", "mallory").await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        proxy.status().await["routes"][0]["reverted"]["reason"],
        "revert requested by alice: canary errors"
    );
    let audit = proxy.logs_with_at_least("admin action", 1).await;
    assert_eq!(
        (
            &audit[0]["operator"],
            &audit[0]["by"],
            &audit[0]["declared"]
        ),
        (
            &serde_json::json!("alice"),
            &serde_json::json!("alice"),
            &serde_json::json!("mallory")
        ),
        "{}",
        audit[0]
    );
    // alice removed: her token is refused once the file is read again.
    super::support::write_with_mode(
        &dir.join("operators.new"),
        "bob bob-0123456789abcdef\n",
        0o600,
    );
    std::fs::rename(dir.join("operators.new"), dir.join("operators")).unwrap();
    let start = std::time::Instant::now();
    loop {
        let out = as_alice("reset", "alice").await.unwrap();
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("HTTP 401"), "{stderr}");
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "alice's token still taken"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[test]
fn check_accepts_the_reference_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config.example.toml");
    let out = veer(&["check", "--config", example]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("OK, 1 route(s)")
            && summary.contains("route checkout")
            && summary.contains("strategy canary"),
        "{summary}"
    );
}

#[test]
fn check_prints_every_error_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[route]]\nname = \"Bad\"\ntimeout = \"5\"\n[route.stable]\nversion = \"v1\"\nendpoints = [\"nohost\"]\n",
    )
    .unwrap();
    let out = veer(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let p = path.display().to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(
        lines[0].starts_with(&format!("{p}:2:8: route name")),
        "{err}"
    );
    assert!(
        lines[1].starts_with(&format!("{p}:3:11: invalid duration")),
        "{err}"
    );
    assert!(
        lines[2].starts_with(&format!("{p}:6:14: endpoint \"nohost\"")),
        "{err}"
    );
}

#[test]
fn version_prints_the_version() {
    let out = veer(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout)
        .starts_with(concat!("veer ", env!("CARGO_PKG_VERSION"))));
}

#[test]
fn run_refuses_an_invalid_config_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("veer.toml");
    std::fs::write(&path, "[proxy]\nlisten = [\"nope\"]\n").unwrap();
    let out = veer(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("veer.toml:2:11: invalid listen address"));
}

/// One veer a state dir: a second given the same `[state] dir` (two
/// services on one host, both on the default /var/lib/veer) stops at
/// start with exit 1, saying which process holds it, and the first runs
/// on. Two writing one `state.json` each overwrote the other's decisions
/// at every write, a revert among them, and wrote its temporary file
/// under the other. Once the first has stopped, the dir is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_another_veer_holds_stops_the_start() {
    let up = Upstream::start("v1").await;
    let mut first = Veer::start(&route_config(&[up.addr], &[], 0.0, "")).await;
    let state = first.dir.path().join("state");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("veer.toml");
    let config = route_config(&[up.addr], &[], 0.0, "");
    std::fs::write(
        &path,
        config.replace("@STATE@", &state.display().to_string()),
    )
    .unwrap();
    // Bounded: a second veer that started would run on.
    let mut second = Command::new(env!("CARGO_BIN_EXE_veer"))
        .args(["run", "--config", path.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let _ = second.kill();
            panic!("a second veer on the same state dir started");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(1));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "veer: the state dir {} is in use by another veer (process {}): ",
            state.display(),
            first.pid()
        )),
        "{err}"
    );
    let r = get(first.addr, "/", &[]).await.unwrap();
    assert_eq!(r.status(), 200);

    first.terminate();
    assert!(first
        .wait_exit(std::time::Duration::from_secs(60))
        .await
        .success());
    let second = Veer::start_in(dir, path).await;
    let r = get(second.addr, "/", &[]).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        std::fs::read_to_string(state.join("lock")).unwrap().trim(),
        second.pid().to_string()
    );
}

/// A listen address another process holds stops the start with exit 1,
/// saying why once (the bind's error was said twice: in veer's message
/// and again as its cause).
#[test]
fn a_listen_address_in_use_stops_the_start_saying_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = super::support::route_config(&["127.0.0.1:9".parse().unwrap()], &[], 0.0, "")
        .replacen("127.0.0.1:0", &addr.to_string(), 1)
        .replace("@STATE@", &dir.path().join("state").display().to_string());
    let path = dir.path().join("veer.toml");
    std::fs::write(&path, config).unwrap();
    let out = veer(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("veer: binding {addr}: ")),
        "{err}"
    );
    assert_eq!(last.matches("Address already in use").count(), 1, "{err}");
    drop(taken);
    // The same for `veer status` against an address where nothing listens
    // (bound, never listening: refused, and no one else's).
    let closed = tokio::net::TcpSocket::new_v4().unwrap();
    closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let at = closed.local_addr().unwrap().to_string();
    let out = veer(&["status", "--admin", &at]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
    assert!(err.contains("is veer running"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_status_command() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let veer_proc = Veer::start(&route_config(&[s.addr], &[c.addr], 12.5, "")).await;
    assert_eq!(
        get(veer_proc.admin, "/healthz", &[])
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        get(veer_proc.admin, "/readyz", &[]).await.unwrap().status(),
        200
    );
    assert_eq!(
        get(veer_proc.admin, "/nope", &[]).await.unwrap().status(),
        404
    );
    get(veer_proc.addr, "/", &[]).await.unwrap();

    let m = veer_proc.metrics().await;
    for name in [
        "veer_requests_total",
        "veer_upstream_errors_total",
        "veer_request_duration_seconds_bucket",
        "veer_config_reloads_total",
        "veer_config_generation",
        "veer_build_info",
        "veer_canary_weight_percent",
    ] {
        assert!(m.contains(&format!("\n{name}")), "missing {name}");
    }
    assert_eq!(
        metric(
            &m,
            r#"veer_canary_weight_percent{route="web",source="effective"}"#
        ),
        Some(12.5)
    );

    let st = veer_proc.status().await;
    assert_eq!(st["routes"][0]["name"], "web");
    assert_eq!(st["routes"][0]["weight"]["configured"], 12.5);
    assert_eq!(st["routes"][0]["canary"]["version"], "v2");

    let admin = veer_proc.admin.to_string();
    let out = tokio::task::spawn_blocking(move || veer(&["status", "--admin", &admin]))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("route web (canary, enforce)"), "{table}");
    assert!(
        table.contains("weight 12.5% configured / 12.5% in effect"),
        "{table}"
    );
    assert!(
        table.contains("verdict insufficient_data") && table.contains("v2"),
        "{table}"
    );
}

#[test]
fn a_corrupt_state_file_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("state.json"), "{ not json").unwrap();
    let path = dir.path().join("veer.toml");
    let config = super::support::route_config(&["127.0.0.1:9".parse().unwrap()], &[], 0.0, "")
        .replace("@STATE@", &state.display().to_string());
    std::fs::write(&path, config).unwrap();
    let out = veer(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("state.json") && err.contains("not a veer state file"),
        "{err}"
    );
}

#[test]
fn the_demo_reverts_the_canary_that_turns_bad_and_ends_by_itself() {
    let out = veer(&["demo", "--duration", "15s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("demo done:"), "{text}");
    assert!(text.contains("veer reverted it by itself"), "{text}");
    assert!(text.contains("judge: reverted"), "{text}");
}

#[test]
fn ingress_nginx_manifests_import_to_configs_that_veer_check_accepts() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/ingress-nginx");
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "the corpus: {files:?}");
    let out_dir = tempfile::tempdir().unwrap();
    // Each file alone, then all together.
    let mut runs: Vec<Vec<std::path::PathBuf>> = files.iter().map(|f| vec![f.clone()]).collect();
    runs.push(files.clone());
    for (n, run) in runs.iter().enumerate() {
        let mut args = vec!["import".to_string(), "ingress-nginx".to_string()];
        args.extend(run.iter().map(|p| p.display().to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = veer(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{run:?}: {stderr}");
        assert!(stderr.contains("route(s) written"), "{stderr}");
        let path = out_dir.path().join(format!("imported-{n}.toml"));
        std::fs::write(&path, &out.stdout).unwrap();
        let check = veer(&["check", "--config", path.to_str().unwrap()]);
        assert!(
            check.status.success(),
            "{run:?}: veer check refused the import:\n{}\n{}",
            String::from_utf8_lossy(&check.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        // Every note on stderr is also a comment in the config.
        let config = String::from_utf8_lossy(&out.stdout);
        for line in stderr
            .lines()
            .filter(|l| l.starts_with("veer import: ") && !l.contains("route(s) written"))
        {
            let note = line.trim_start_matches("veer import: ");
            let tail = note.rsplit(": ").next().unwrap_or(note);
            assert!(config.contains(tail), "{note:?} is not in the output");
        }
    }
    // With --tls-dir, the Secrets are the TLS listener's certificates:
    // once there, `veer check` loads them.
    let tls_dir = out_dir.path().join("tls");
    let mut args = vec![
        "import".to_string(),
        "ingress-nginx".to_string(),
        "--tls-dir".to_string(),
        tls_dir.display().to_string(),
    ];
    args.extend(files.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = veer(&args);
    assert!(out.status.success());
    let config = String::from_utf8_lossy(&out.stdout).into_owned();
    let certs: Vec<&str> = config
        .lines()
        .filter_map(|l| l.strip_prefix("cert = \""))
        .map(|l| l.trim_end_matches('"'))
        .collect();
    let client_ca = config
        .lines()
        .find_map(|l| l.strip_prefix("client_ca = \""))
        .and_then(|l| l.split('"').next())
        .expect("mtls.yaml's auth-tls-secret as client_ca");
    assert!(certs.len() >= 2, "{config}");
    let path = out_dir.path().join("imported-tls.toml");
    std::fs::write(&path, &config).unwrap();
    let check = veer(&["check", "--config", path.to_str().unwrap()]);
    assert!(!check.status.success(), "checked without the certificates");
    for cert in certs {
        let secret = std::path::Path::new(cert).parent().unwrap();
        assert!(secret.starts_with(&tls_dir), "{cert}");
        std::fs::create_dir_all(secret).unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["www.example.com".into()]).unwrap();
        std::fs::write(secret.join("tls.crt"), made.cert.pem()).unwrap();
        std::fs::write(secret.join("tls.key"), made.key_pair.serialize_pem()).unwrap();
    }
    let ca = std::path::Path::new(client_ca);
    assert!(ca.starts_with(&tls_dir), "{client_ca}");
    std::fs::create_dir_all(ca.parent().unwrap()).unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["clients-ca".into()]).unwrap();
    std::fs::write(ca, made.cert.pem()).unwrap();
    let check = veer(&["check", "--config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "{err}\n{config}");
    let summary = String::from_utf8_lossy(&check.stdout);
    assert!(
        summary.contains("more certificates, picked by name"),
        "{summary}"
    );

    // A canary without its main Ingress imports nothing: an error that says why.
    let orphan = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: c\n  annotations:\n    nginx.ingress.kubernetes.io/canary: \"true\"\nspec:\n  rules:\n    - host: a.example\n      http:\n        paths:\n          - path: /\n            backend:\n              service: { name: a, port: { number: 80 } }\n";
    let mut child = Command::new(env!("CARGO_BIN_EXE_veer"))
        .args(["import", "ingress-nginx", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(orphan.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no main Ingress"));
    assert!(out.stdout.is_empty());
}

/// `veer run` with its stderr read line by line on a thread of its own;
/// killed when dropped.
struct Starting {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Starting {
    fn run(config: &std::path::Path) -> Starting {
        Starting::run_with(config, &[])
    }

    /// Runs with each variable of `env` set to its value, or unset.
    fn run_with(config: &std::path::Path, env: &[(&str, Option<&str>)]) -> Starting {
        let mut command = Command::new(env!("CARGO_BIN_EXE_veer"));
        for (name, value) in env {
            match value {
                Some(v) => command.env(name, v),
                None => command.env_remove(name),
            };
        }
        let mut child = command
            .args(["run", "--config", config.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run veer");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Starting {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (at most 30 s) for a line with every one of `words`.
    fn wait_line(&mut self, words: &[&str]) -> String {
        let limit = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let left = limit.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if words.iter().all(|w| line.contains(w)) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {words:?}; seen:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Every line up to the end of stderr (at most 30 s).
    fn drain(&mut self) {
        while let Ok(line) = self.lines.recv_timeout(std::time::Duration::from_secs(30)) {
            self.seen.push(line);
        }
    }

    /// Waits (at most 30 s) for the exit.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let start = std::time::Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "veer did not exit"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `text` into the FIFO at `path` (its open waits for the reader).
fn feed(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).expect("write the FIFO");
}

#[test]
fn a_start_held_by_a_state_dir_that_does_not_answer_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    super::support::mkfifo(&state.join("state.json"));
    let path = dir.path().join("veer.toml");
    let config = route_config(&["127.0.0.1:9".parse().unwrap()], &[], 0.0, "")
        .replace("@STATE@", &state.display().to_string());
    std::fs::write(&path, config).unwrap();
    let mut veer = Starting::run(&path);
    let line = veer.wait_line(&["start-up is still waiting", "the state dir"]);
    assert!(line.contains("5s"), "{line}");
    // The disk answers (with a file that is not a state file): the start
    // goes on, and stops with the file's error.
    feed(&state.join("state.json"), "{ not json");
    assert_eq!(veer.wait_exit().code(), Some(1));
    veer.wait_line(&["not a veer state file"]);
}

#[test]
fn a_start_held_by_a_config_file_that_does_not_answer_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("veer.toml");
    super::support::mkfifo(&path);
    let mut veer = Starting::run(&path);
    veer.wait_line(&["start-up is still waiting", "veer.toml"]);
    feed(&path, "[proxy]\nlisten = 1\n");
    assert_eq!(veer.wait_exit().code(), Some(1));
    veer.wait_line(&["veer.toml"]);
}

/// A running veer gives the pages its allocator empties back to the kernel
/// at once (mimalloc's purge delay 0, which it sets by executing itself
/// again: the same process, the same arguments), unless its environment
/// names a delay, which it keeps.
#[test]
fn a_running_proxy_gives_emptied_pages_back_unless_told_otherwise() {
    for (given, want) in [(None, "0"), (Some("250"), "250")] {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let path = dir.path().join("veer.toml");
        let config = route_config(&["127.0.0.1:9".parse().unwrap()], &[], 0.0, "")
            .replace("@STATE@", &state.display().to_string());
        std::fs::write(&path, config).unwrap();
        let mut veer = Starting::run_with(&path, &[("MIMALLOC_PURGE_DELAY", given)]);
        veer.wait_line(&["veer ready"]);
        let pid = veer.child.id();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let delays: Vec<String> = environ
            .split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .filter(|v| v.starts_with("MIMALLOC_PURGE_DELAY="))
            .collect();
        assert_eq!(
            delays,
            [format!("MIMALLOC_PURGE_DELAY={want}")],
            "given {given:?}"
        );
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        assert_eq!(
            args[1..4],
            [&b"run"[..], b"--config", path.to_str().unwrap().as_bytes()]
        );
        assert!(
            !veer.seen.iter().any(|l| l.contains("could not restart")),
            "{:?}",
            veer.seen
        );
    }
}

/// The access log's lines in the text format (`veer run` without
/// `--log-format`, stderr not a terminal) look as tracing's other lines do,
/// fields in order, strings quoted as Rust quotes them; `RUST_LOG` can
/// still turn them off.
#[test]
fn access_log_lines_in_text_are_shaped_as_every_other_line() {
    use std::io::{Read as _, Write as _};
    // An upstream answering every request on its connection with "ok".
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in upstream.incoming() {
            let Ok(mut conn) = conn else { break };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if conn.write_all(answer).is_err() {
                        break;
                    }
                }
            });
        }
    });
    for (rust_log, logged) in [(None, true), (Some("info,veer::access=off"), false)] {
        let dir = tempfile::tempdir().unwrap();
        let config = route_config(&[up_addr], &[], 0.0, "")
            .replace("@STATE@", &dir.path().join("state").display().to_string())
            .replacen(
                "[proxy]\n",
                "[proxy]\naccess_log = \"all\"\nrequest_id = true\n",
                1,
            );
        let path = dir.path().join("veer.toml");
        std::fs::write(&path, config).unwrap();
        let mut veer = Starting::run_with(&path, &[("RUST_LOG", rust_log)]);
        let listening = veer.wait_line(&["listening", "kind=\"proxy\""]);
        let addr = listening
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .unwrap()
            .to_string();
        veer.wait_line(&["veer ready"]);
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.write_all(
            b"GET /a%22b/c?secret=1 HTTP/1.1\r\nhost: x\r\nx-request-id: q\"u\\ote\r\nuser-agent: t \"1\"\r\n\r\n",
        )
        .unwrap();
        let mut answer = [0u8; 1024];
        let n = c.read(&mut answer).unwrap();
        assert!(
            answer[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&answer[..n])
        );
        // Written in batches, and what waits is written at exit.
        let _ = std::process::Command::new("kill")
            .arg(veer.child.id().to_string())
            .status();
        assert!(veer.wait_exit().success());
        veer.drain();
        let access: Vec<&String> = veer
            .seen
            .iter()
            .filter(|l| l.contains("veer::access"))
            .collect();
        if !logged {
            assert!(access.is_empty(), "{access:?}");
            continue;
        }
        assert_eq!(access.len(), 1, "{:?}", veer.seen);
        let line = access[0];
        let (stamp, rest) = line.split_once("  INFO veer::access: request ").unwrap();
        assert_eq!(stamp.len(), 27, "{line}");
        assert!(
            stamp.ends_with('Z') && stamp.as_bytes()[19] == b'.',
            "{line}"
        );
        let (fields, id) = rest.split_once(" request_id=").unwrap();
        // Then the answer's body bytes and the whole time (at its end).
        let (id, end) = id.split_once(" bytes=").unwrap();
        assert_eq!(id, "\"q\\\"u\\\\ote\"", "{line}");
        let (bytes, total) = end.split_once(" total_ms=").unwrap();
        assert_eq!(bytes, "2", "{line}");
        // Then how the request came.
        let (total, about) = total.split_once(' ').unwrap();
        assert_eq!(
            about, "protocol=HTTP/1.1 host=\"x\" user_agent=\"t \\\"1\\\"\"",
            "{line}"
        );
        assert!(
            total.parse::<f64>().is_ok() && total.contains('.'),
            "{line}"
        );
        let fields = fields.replace(&up_addr.to_string(), "UP");
        let (before, after) = fields.split_once(" ms=").unwrap();
        assert_eq!(
            before,
            "route=\"web\" version=\"v1\" role=\"stable\" method=GET path=\"/a%22b/c\" status=200"
        );
        let (ms, after) = after.split_once(' ').unwrap();
        assert!(ms.parse::<f64>().is_ok() && ms.contains('.'), "{line}");
        assert!(after.starts_with("client=127.0.0.1:"), "{line}");
        assert!(after.ends_with(" upstream=\"UP\" error=\"\""), "{line}");
    }
}
