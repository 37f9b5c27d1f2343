//! `veer status`: a running proxy's routes, weights and health, for people.

use std::fmt::Write;

use veer_control::status::StatusDoc;

use crate::client::{self, ClientError};

/// Why the status could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The admin endpoint did not answer.
    #[error("{0} (is veer running, and is --admin its [admin] listen address?)")]
    Client(#[from] ClientError),
    /// The admin endpoint answered with an error (its status and why).
    #[error("{0}")]
    Refused(String),
    /// The answer was not the expected JSON.
    #[error("unexpected answer from the admin endpoint ({0})")]
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
        return Err(StatusError::Refused(
            "/status: HTTP 401: this proxy needs its admin token for /status (read_token); pass --token-file (the token_file, or [state] dir/admin.token)".into(),
        ));
    }
    if !resp.status().is_success() {
        return Err(StatusError::Refused(format!(
            "/status: HTTP {}",
            resp.status()
        )));
    }
    let v: StatusDoc =
        serde_json::from_slice(resp.body()).map_err(|e| StatusError::Format(e.to_string()))?;
    print!("{}", render(&v));
    Ok(())
}

/// Asks the proxy at `admin` for `action` (`revert`, `reset`, `pause`,
/// `resume`, `promote`) on `route`, with the admin `token`, saying `by`
/// whom and why (`reason`); returns the route's state after, in a line.
pub async fn act(
    admin: &str,
    token: &str,
    (route, action): (&str, &str),
    by: Option<&str>,
    reason: Option<&str>,
) -> Result<String, StatusError> {
    let auth = format!("Bearer {token}");
    let body = serde_json::json!({ "by": by, "reason": reason }).to_string();
    // (Route names are a-z, 0-9, '-' and '_': a path segment as they are.)
    let path = format!("/routes/{route}/{action}");
    let resp = client::Conn::open(admin)
        .await?
        .send(
            http::Method::POST,
            admin,
            &path,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            bytes::Bytes::from(body),
        )
        .await?;
    if !resp.status().is_success() {
        let why = serde_json::from_slice::<serde_json::Value>(resp.body())
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(resp.body()).trim().to_string());
        return Err(StatusError::Refused(format!(
            "{action} {route}: HTTP {}: {why}",
            resp.status().as_u16()
        )));
    }
    let r: veer_control::status::RouteStatus =
        serde_json::from_slice(resp.body()).map_err(|e| StatusError::Format(e.to_string()))?;
    let state = if let Some(rev) = &r.reverted {
        format!("reverted ({})", rev.reason)
    } else if r.promoted {
        "promoted".into()
    } else if r.paused {
        "paused".into()
    } else {
        format!("judging ({})", r.verdict.as_str())
    };
    Ok(format!(
        "{}: {action}: {state}; canary weight {}% (configured {}%)",
        r.name, r.weight.effective, r.weight.configured
    ))
}

/// Checks `/healthz`.
pub async fn health(admin: &str) -> Result<(), StatusError> {
    let resp = client::get(admin, "/healthz").await?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(StatusError::Refused(format!(
            "/healthz answered HTTP {}",
            resp.status()
        )))
    }
}

/// Renders a `/status` document.
pub fn render(v: &StatusDoc) -> String {
    let mut out = String::new();
    let cfg = &v.config;
    let _ = writeln!(
        out,
        "veer {}  config {} generation {}  last reload: {}{}",
        v.veer_version,
        cfg.path,
        cfg.generation,
        cfg.last_reload.result,
        cfg.last_reload
            .error
            .as_deref()
            .map(|e| format!(" ({})", e.lines().next().unwrap_or("")))
            .unwrap_or_default(),
    );
    if !cfg.restart_required.is_empty() {
        let _ = writeln!(
            out,
            "restart required for: {}",
            cfg.restart_required.join(", ")
        );
    }
    if let Some(e) = &v.state_error {
        let _ = writeln!(out, "decisions NOT persisted: {e}");
    }
    if let Some(t) = &v.tls {
        // The first to expire, in days from now.
        let soonest = t
            .certificates
            .iter()
            .filter_map(|c| Some((c.not_after_unix?, &c.file)))
            .min();
        let _ = write!(out, "tls: {} certificate(s)", t.certificates.len());
        if let Some((at, file)) = soonest {
            let days = (at - crate::clock::unix_now() as i64) as f64 / 86_400.0;
            let _ = write!(out, ", the first to expire {file} in {days:.1} days");
        }
        if let Some(ca) = &t.client_ca {
            let _ = write!(out, "; client certificates verified against {ca}");
        }
        out.push('\n');
    }
    if let Some(f) = &v.fleet {
        let _ = writeln!(
            out,
            "fleet {} ({}) as {}: {}, {}, revision {}; members: {}",
            f.name,
            f.store,
            f.replica,
            if f.connected {
                "connected"
            } else if f.kept_out {
                "KEPT OUT (another veer holds this replica's name)"
            } else {
                "NOT connected"
            },
            if f.synced {
                "decisions read"
            } else {
                "decisions NOT read yet (canaries get no traffic here)"
            },
            f.revision,
            f.members.join(", "),
        );
        if let Some(e) = &f.last_error {
            let _ = writeln!(out, "  last store error: {e}");
        }
    }
    for r in &v.routes {
        let _ = writeln!(
            out,
            "\nroute {} ({}, {})  weight {}% configured / {}% in effect",
            r.name, r.strategy, r.mode, r.weight.configured, r.weight.effective,
        );
        let mut flags = Vec::new();
        if r.paused {
            flags.push("paused");
        }
        if r.promoted {
            flags.push("promoted");
        }
        let _ = writeln!(
            out,
            "  verdict {}{}: {}",
            r.verdict.as_str(),
            if flags.is_empty() {
                String::new()
            } else {
                format!(" ({})", flags.join(", "))
            },
            r.reason
        );
        if let Some(n) = &r.last_action {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(n.at_unix);
            let _ = writeln!(
                out,
                "  last operator action: {}{} at {}",
                n.action.as_str(),
                n.said
                    .as_deref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default(),
                humantime::format_rfc3339_seconds(at),
            );
        }
        if let Some(ro) = &r.rollout {
            // (Counted from 1 for people; `/status` has the index.)
            let steps: Vec<String> = ro.steps.iter().map(|w| format!("{w}%")).collect();
            let _ = writeln!(
                out,
                "  rollout step {} of {} ({}){}",
                ro.step + 1,
                ro.steps.len(),
                steps.join(", "),
                if ro.waiting_confirmation {
                    format!(
                        "; waiting for confirmation (last answer: {})",
                        ro.confirmation.as_deref().unwrap_or("none yet")
                    )
                } else {
                    String::new()
                }
            );
        }
        if let Some(m) = &r.mirror {
            let _ = writeln!(
                out,
                "  mirror {}% of stable's requests to the canary: {}, {} pairs in the window",
                m.percent,
                if m.active {
                    "active"
                } else {
                    "stopped (canary reverted or not open yet)"
                },
                m.pairs_in_window
            );
        }
        if let Some(f) = &r.fleet {
            let _ = writeln!(
                out,
                "  decision: {}{}{}, epoch {}{}",
                f.source,
                f.change
                    .as_deref()
                    .map(|c| format!(" {c}"))
                    .unwrap_or_default(),
                f.by.as_deref()
                    .map(|b| format!(" by {b}"))
                    .unwrap_or_default(),
                f.epoch,
                if f.unpublished {
                    " (a revert taken here, NOT in the store yet)"
                } else {
                    ""
                },
            );
        }
        if let Some(p) = &r.evidence.pool {
            let tests: Vec<String> = p
                .tests
                .iter()
                .map(|t| format!("{} E {:.2} ({}/{})", t.guard, t.e, t.events.0, t.events.1))
                .collect();
            let _ = writeln!(
                out,
                "  pooled over the fleet: {}; {}; {} batches; {} (of {:.0})",
                if p.complete {
                    "whole log applied"
                } else {
                    "waiting for a checkpoint (joined after the log began)"
                },
                match p.seat {
                    Some(s) if s < p.seats => format!("local tests at seat {s} of {}", p.seats),
                    Some(_) => format!("every one of {} seats taken: no local tests", p.seats),
                    None => "local tests wait for a seat".to_string(),
                },
                p.batches.0,
                if tests.is_empty() {
                    "-".to_string()
                } else {
                    tests.join(", ")
                },
                p.threshold
            );
        }
        let dep = &r.deployments;
        if dep.promoted + dep.reverted + dep.replaced > 0 {
            let _ = writeln!(
                out,
                "  deployments (30 days): {} promoted, {} reverted, {} replaced; change failure ratio {:.0}%",
                dep.promoted,
                dep.reverted,
                dep.replaced,
                dep.change_failure_ratio.unwrap_or(0.0) * 100.0
            );
        }
        let ev = &r.evidence;
        let _ = writeln!(
            out,
            "  evidence E(errors) {:.3} E(latency) {:.3}, revert at {:.0}; error events canary/stable {}/{}, slow events {}/{}",
            ev.e_errors,
            ev.e_latency,
            ev.threshold,
            ev.error_events.canary,
            ev.error_events.stable,
            ev.slow_events.canary,
            ev.slow_events.stable,
        );
        for t in &ev.tests {
            let _ = writeln!(
                out,
                "    test {:<17} {:<24} E {:>10.3}  events canary/stable {}/{}{}",
                t.guard,
                t.limit,
                t.e,
                t.events.0,
                t.events.1,
                if t.warming_up { "  (warming up)" } else { "" }
            );
        }
        let _ = writeln!(
            out,
            "  {:<8} {:<16} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "ROLE",
            "VERSION",
            "ENDPOINTS",
            "REQUESTS",
            "ERRORS",
            "P50 ms",
            "P99 ms",
            "P999 ms",
            "GIVEN UP"
        );
        let roles = [
            ("stable", Some(&r.stable), Some(&r.window.stable)),
            ("canary", r.canary.as_ref(), r.window.canary.as_ref()),
        ];
        for (role, ver, w) in roles {
            let Some(ver) = ver else { continue };
            let w = w.copied().unwrap_or_default();
            let healthy = ver.endpoints.iter().filter(|e| e.healthy).count();
            let _ = writeln!(
                out,
                "  {:<8} {:<16} {:>9} {:>9} {:>7.2}% {:>9.1} {:>9.1} {:>9.1} {:>9}",
                role,
                ver.version,
                format!("{healthy}/{}", ver.endpoints.len()),
                w.requests,
                w.error_rate * 100.0,
                w.p50_ms,
                w.p99_ms,
                w.p999_ms,
                w.given_up,
            );
        }
        for ver in std::iter::once(&r.stable).chain(r.canary.as_ref()) {
            for e in &ver.endpoints {
                if let Some(why) = &e.health_check {
                    let _ = writeln!(
                        out,
                        "  endpoint {} of {} out by its health check: {why}",
                        e.addr, ver.version
                    );
                }
                if let Some(why) = &e.ejected {
                    let _ = writeln!(
                        out,
                        "  endpoint {} of {} ejected by outlier detection: {why}",
                        e.addr, ver.version
                    );
                }
                if let Some(why) = &e.connect_error {
                    let _ = writeln!(
                        out,
                        "  endpoint {} of {} failing connects: {why}",
                        e.addr, ver.version
                    );
                }
                if let Some(why) = &e.back_off {
                    let _ = writeln!(
                        out,
                        "  endpoint {} of {} backing off: {why}",
                        e.addr, ver.version
                    );
                }
            }
        }
    }
    out
}
