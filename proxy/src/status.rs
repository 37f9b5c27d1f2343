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

/// Fetches `/status` from `admin` and prints it as a table.
pub async fn print(admin: &str) -> Result<(), StatusError> {
    let resp = client::get(admin, "/status").await?;
    if !resp.status().is_success() {
        return Err(StatusError::Format(format!("HTTP {}", resp.status())));
    }
    let v: Value =
        serde_json::from_slice(resp.body()).map_err(|e| StatusError::Format(e.to_string()))?;
    print!("{}", render(&v));
    Ok(())
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
    let _ = writeln!(
        out,
        "\n{:<16} {:<10} {:<8} {:<16} {:>14}  ENDPOINTS healthy/all",
        "ROUTE", "STRATEGY", "ROLE", "VERSION", "WEIGHT cfg/eff"
    );
    for r in v["routes"].as_array().into_iter().flatten() {
        let name = r["name"].as_str().unwrap_or("?");
        let strategy = r["strategy"].as_str().unwrap_or("?");
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
            let weight = if role == "canary" {
                format!(
                    "{}% / {}%",
                    r["weight"]["configured"], r["weight"]["effective"]
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{:<16} {:<10} {:<8} {:<16} {:>14}  {}/{}",
                name,
                strategy,
                role,
                ver["version"].as_str().unwrap_or("?"),
                weight,
                healthy,
                eps.len()
            );
        }
    }
    out
}
