//! `veer status`: a running proxy's routes, weights and health, for people.

use std::fmt::Write;

use serde_json::Value;

use crate::client::{self, ClientError};

/// Why the status could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The admin endpoint did not answer.
    #[error("{0} (is veer running, and is --admin its [admin] listen address?)")]
    Client(#[from] ClientError),
    /// The answer was not the expected JSON.
    #[error("unexpected /status answer ({0})")]
    Format(String),
}

/// Fetches `/status` from `admin` and prints it as a table; `token` is
/// sent as a bearer token (needed with `[admin] read_token = true`).
pub async fn print(admin: &str, token: Option<&str>) -> Result<(), StatusError> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&'static str, &str)> = auth
        .as_deref()
        .map(|a| ("authorization", a))
        .into_iter()
        .collect();
    let resp = client::Conn::open(admin)
        .await?
        .get(admin, "/status", &headers)
        .await?;
    if resp.status() == http::StatusCode::UNAUTHORIZED {
        return Err(StatusError::Format(
            "HTTP 401: this proxy needs its admin token for /status (read_token); pass --token-file (the token_file, or [state] dir/admin.token)".into(),
        ));
    }
    if !resp.status().is_success() {
        return Err(StatusError::Format(format!("HTTP {}", resp.status())));
    }
    let v: Value =
        serde_json::from_slice(resp.body()).map_err(|e| StatusError::Format(e.to_string()))?;
    print!("{}", render(&v));
    Ok(())
}

/// Checks `/healthz`.
pub async fn health(admin: &str) -> Result<(), StatusError> {
    let resp = client::get(admin, "/healthz").await?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(StatusError::Format(format!(
            "/healthz answered HTTP {}",
            resp.status()
        )))
    }
}

/// Renders a `/status` document.
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    let cfg = &v["config"];
    let _ = writeln!(
        out,
        "veer {}  config {} generation {}  last reload: {}{}",
        v["veer_version"].as_str().unwrap_or("?"),
        cfg["path"].as_str().unwrap_or("?"),
        cfg["generation"],
        cfg["last_reload"]["result"].as_str().unwrap_or("?"),
        cfg["last_reload"]["error"]
            .as_str()
            .map(|e| format!(" ({})", e.lines().next().unwrap_or("")))
            .unwrap_or_default(),
    );
    if let Some(list) = cfg["restart_required"].as_array().filter(|l| !l.is_empty()) {
        let names: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
        let _ = writeln!(out, "restart required for: {}", names.join(", "));
    }
    for r in v["routes"].as_array().into_iter().flatten() {
        let name = r["name"].as_str().unwrap_or("?");
        let _ = writeln!(
            out,
            "\nroute {name} ({}, {})  weight {}% configured / {}% in effect",
            r["strategy"].as_str().unwrap_or("?"),
            r["mode"].as_str().unwrap_or("?"),
            r["weight"]["configured"],
            r["weight"]["effective"],
        );
        let mut flags = Vec::new();
        if r["paused"] == true {
            flags.push("paused");
        }
        if r["promoted"] == true {
            flags.push("promoted");
        }
        let _ = writeln!(
            out,
            "  verdict {}{}: {}",
            r["verdict"].as_str().unwrap_or("?"),
            if flags.is_empty() {
                String::new()
            } else {
                format!(" ({})", flags.join(", "))
            },
            r["reason"].as_str().unwrap_or("")
        );
        if let Some(ro) = r["rollout"].as_object() {
            let _ = writeln!(out, "  rollout step {} of {}", ro["step"], ro["steps"]);
        }
        let ev = &r["evidence"];
        if ev.is_object() {
            let _ = writeln!(
                out,
                "  evidence E(errors) {:.3} E(latency) {:.3}, revert at {:.0}; error events canary/stable {}/{}, slow events {}/{}",
                ev["e_errors"].as_f64().unwrap_or(0.0),
                ev["e_latency"].as_f64().unwrap_or(0.0),
                ev["threshold"].as_f64().unwrap_or(0.0),
                ev["error_events"]["canary"],
                ev["error_events"]["stable"],
                ev["slow_events"]["canary"],
                ev["slow_events"]["stable"],
            );
            for t in ev["tests"].as_array().map_or(&[][..], |a| a.as_slice()) {
                let _ = writeln!(
                    out,
                    "    test {:<17} {:<24} E {:>10.3}  events canary/stable {}/{}{}",
                    t["guard"].as_str().unwrap_or("?"),
                    t["limit"].as_str().unwrap_or(""),
                    t["e"].as_f64().unwrap_or(0.0),
                    t["events"][0],
                    t["events"][1],
                    if t["warming_up"].as_bool() == Some(true) {
                        "  (warming up)"
                    } else {
                        ""
                    }
                );
            }
        }
        let _ = writeln!(
            out,
            "  {:<8} {:<16} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9}",
            "ROLE", "VERSION", "ENDPOINTS", "REQUESTS", "ERRORS", "P50 ms", "P99 ms", "P999 ms"
        );
        for role in ["stable", "canary"] {
            let ver = &r[role];
            if ver.is_null() {
                continue;
            }
            let eps = ver["endpoints"]
                .as_array()
                .map_or(&[][..], |a| a.as_slice());
            let healthy = eps
                .iter()
                .filter(|e| e["healthy"].as_bool() == Some(true))
                .count();
            let w = &r["window"][role];
            let _ = writeln!(
                out,
                "  {:<8} {:<16} {:>9} {:>9} {:>7.2}% {:>9.1} {:>9.1} {:>9.1}",
                role,
                ver["version"].as_str().unwrap_or("?"),
                format!("{healthy}/{}", eps.len()),
                w["requests"].as_u64().unwrap_or(0),
                w["error_rate"].as_f64().unwrap_or(0.0) * 100.0,
                w["p50_ms"].as_f64().unwrap_or(0.0),
                w["p99_ms"].as_f64().unwrap_or(0.0),
                w["p999_ms"].as_f64().unwrap_or(0.0),
            );
        }
    }
    out
}
