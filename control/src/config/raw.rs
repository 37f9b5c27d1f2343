//! Stage one of the config parse: a mirror of the TOML file.
//!
//! Every table denies unknown keys, so a typo is an error rather than a
//! setting silently ignored. Leaves carry their byte span so that stage two
//! can point at the exact line and column of a bad value.

// Fields mirror the keys of the config file, which config.example.toml documents.
#![allow(missing_docs)]

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::validate::{Diagnostic, Diagnostics};

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[proxy]`.
    #[serde(default)]
    pub proxy: RawProxy,
    /// `[admin]`.
    #[serde(default)]
    pub admin: RawAdmin,
    /// `[state]`.
    #[serde(default)]
    pub state: RawState,
    /// `[[route]]`.
    #[serde(default)]
    pub route: Vec<Spanned<RawRoute>>,
}

/// `[proxy]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    pub listen: Option<Spanned<Vec<Spanned<String>>>>,
    pub workers: Option<Spanned<i64>>,
    pub tls: Option<Spanned<RawTls>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_header_bytes: Option<Spanned<i64>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub body_timeout: Option<Spanned<String>>,
    pub shutdown_grace: Option<Spanned<String>>,
}

/// `[proxy.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub listen: Spanned<Vec<Spanned<String>>>,
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<Spanned<String>>,
    pub token_file: Option<Spanned<String>>,
}

/// `[state]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub dir: Option<Spanned<String>>,
}

/// `[[route]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Spanned<String>,
    pub hosts: Option<Vec<Spanned<String>>>,
    pub path_prefix: Option<Spanned<String>>,
    pub sticky: Option<Vec<Spanned<String>>>,
    pub strategy: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub count_4xx_as_errors: Option<bool>,
    pub stable: Spanned<RawVersion>,
    pub canary: Option<Spanned<RawCanary>>,
    pub judge: Option<RawJudge>,
    pub rollout: Option<Spanned<RawRollout>>,
}

/// `[route.stable]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVersion {
    pub version: Spanned<String>,
    pub endpoints: Spanned<Vec<Spanned<RawEndpoint>>>,
}

/// `[route.canary]`: a version plus its weight.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCanary {
    pub version: Spanned<String>,
    pub endpoints: Spanned<Vec<Spanned<RawEndpoint>>>,
    pub weight: Option<Spanned<f64>>,
}

/// An endpoint: `"host:port"` or `{ addr = "host:port", weight = 2 }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawEndpoint {
    /// Weight 1.
    Addr(String),
    /// With a weight.
    Weighted(RawWeightedEndpoint),
}

/// `{ addr = "host:port", weight = N }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeightedEndpoint {
    pub addr: String,
    #[serde(default = "one")]
    pub weight: i64,
}

fn one() -> i64 {
    1
}

/// `[route.judge]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJudge {
    pub mode: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub window: Option<Spanned<String>>,
    pub min_requests: Option<Spanned<i64>>,
    pub max_error_rate: Option<Spanned<f64>>,
    pub max_error_rate_ratio: Option<Spanned<f64>>,
    pub max_latency_ms: Option<Spanned<BTreeMap<String, Spanned<f64>>>>,
    pub max_latency_ratio: Option<Spanned<BTreeMap<String, Spanned<f64>>>>,
    pub false_revert_rate: Option<Spanned<f64>>,
    pub margin: Option<Spanned<f64>>,
    pub watch: Option<Spanned<String>>,
    pub webhook: Option<Spanned<String>>,
    pub slo: Option<Spanned<f64>>,
}

/// `[route.rollout]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    pub steps: Spanned<Vec<Spanned<f64>>>,
    pub hold: Spanned<String>,
}

impl RawConfig {
    /// Parses TOML text. Syntax, type and unknown-key errors stop the parse,
    /// so this stage reports one problem; stage two reports all of its own.
    pub fn parse(text: &str) -> Result<RawConfig, Diagnostics> {
        toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            let message = e.message().trim().replace('\n', " ");
            Diagnostics(vec![Diagnostic::at(text, offset, message)])
        })
    }
}
