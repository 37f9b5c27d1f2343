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

use super::validate::Diagnostic;

/// Unknown keys reported before the parse gives up.
const MAX_UNKNOWN_KEYS: usize = 50;

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
    /// `[fleet]`.
    pub fleet: Option<Spanned<RawFleet>>,
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
    pub max_header_fields: Option<Spanned<i64>>,
    pub header_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub max_connections_per_ip: Option<Spanned<i64>>,
    pub trusted_hops: Option<Spanned<i64>>,
    pub body_timeout: Option<Spanned<String>>,
    pub request_buffer: Option<Spanned<i64>>,
    pub max_request_body: Option<Spanned<i64>>,
    pub request_id: Option<bool>,
    pub merge_slashes: Option<bool>,
    pub proxy_protocol: Option<bool>,
    pub proxy_protocol_from: Option<Vec<Spanned<String>>>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub access_log: Option<Spanned<String>>,
    pub upstream_http1: Option<Spanned<String>>,
}

/// `[proxy.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub listen: Spanned<Vec<Spanned<String>>>,
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub certificates: Option<Spanned<Vec<RawCertificate>>>,
    pub client_ca: Option<Spanned<String>>,
    pub client_auth: Option<Spanned<String>>,
    pub client_crl: Option<Spanned<String>>,
    pub public_port: Option<Spanned<i64>>,
    pub forward_client_cert: Option<Spanned<bool>>,
    pub ticket_keys: Option<Spanned<Vec<Spanned<String>>>>,
    pub min_version: Option<Spanned<String>>,
    pub session_tickets: Option<Spanned<bool>>,
    pub session_cache: Option<Spanned<i64>>,
}

/// `[[proxy.tls.certificates]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<Spanned<String>>,
    pub token_file: Option<Spanned<String>>,
    pub read_token: Option<Spanned<bool>>,
    pub operators_file: Option<Spanned<String>>,
    pub public_url: Option<Spanned<String>>,
}

/// `[state]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub dir: Option<Spanned<String>>,
}

/// `[fleet]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    pub store: Option<Spanned<String>>,
    pub endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    pub name: Option<Spanned<String>>,
    pub replica: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<String>>,
    pub cert_file: Option<Spanned<String>>,
    pub key_file: Option<Spanned<String>>,
    pub pool: Option<Spanned<bool>>,
    pub seats: Option<Spanned<i64>>,
    pub keep_evidence: Option<Spanned<String>>,
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
    pub max_upstream_connections: Option<Spanned<i64>>,
    pub max_request_body: Option<Spanned<i64>>,
    pub allow_from: Option<Vec<Spanned<String>>>,
    pub deny_from: Option<Vec<Spanned<String>>>,
    pub rewrite_prefix: Option<Spanned<String>>,
    pub https_redirect: Option<Spanned<bool>>,
    pub require_client_cert: Option<Spanned<bool>>,
    pub request_headers: Option<Spanned<RawHeaderEdits>>,
    pub response_headers: Option<Spanned<RawHeaderEdits>>,
    pub stable: Spanned<RawVersion>,
    pub canary: Option<Spanned<RawCanary>>,
    pub judge: Option<RawJudge>,
    pub rollout: Option<Spanned<RawRollout>>,
    pub force: Option<Spanned<RawForce>>,
    pub mirror: Option<Spanned<RawMirror>>,
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    pub sticky_cookie: Option<Spanned<RawStickyCookie>>,
    pub cors: Option<Spanned<RawCors>>,
    pub smoke: Option<Vec<Spanned<RawSmoke>>>,
    pub health_check: Option<Spanned<RawSmoke>>,
    pub outlier_detection: Option<Spanned<RawOutlierDetection>>,
    pub retry: Option<Spanned<RawRetry>>,
    pub grpc_error_codes: Option<Spanned<Vec<Spanned<i64>>>>,
}

/// `[[route.smoke]]`, and `[route.health_check]` (the same request keys,
/// and how often: `interval`, `unhealthy`, `healthy` are a health check's
/// only, refused in a smoke check).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmoke {
    pub path: Option<Spanned<String>>,
    pub grpc_service: Option<Spanned<String>>,
    pub method: Option<Spanned<String>>,
    pub headers: Option<Spanned<BTreeMap<String, String>>>,
    pub expect_status: Option<Spanned<i64>>,
    pub expect_body: Option<String>,
    pub timeout: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub unhealthy: Option<Spanned<i64>>,
    pub healthy: Option<Spanned<i64>>,
    pub start_out: Option<Spanned<bool>>,
}

/// `[route.outlier_detection]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlierDetection {
    pub consecutive_errors: Option<Spanned<i64>>,
    pub ejection_time: Option<Spanned<String>>,
    pub max_ejected_percent: Option<Spanned<i64>>,
}

/// `[route.retry]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub on: Option<Spanned<Vec<Spanned<String>>>>,
    pub retries: Option<Spanned<i64>>,
    pub try_timeout: Option<Spanned<String>>,
    pub budget_percent: Option<Spanned<i64>>,
}

/// `[route.mirror]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMirror {
    pub percent: Spanned<f64>,
    pub max_body: Option<Spanned<i64>>,
    pub max_concurrent: Option<Spanned<i64>>,
    pub methods: Option<Vec<Spanned<String>>>,
}

/// `[route.cors]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    pub allow_origins: Vec<Spanned<String>>,
    pub allow_methods: Option<Vec<Spanned<String>>>,
    pub allow_headers: Option<Vec<Spanned<String>>>,
    pub expose_headers: Option<Vec<Spanned<String>>>,
    pub allow_credentials: Option<bool>,
    pub max_age: Option<Spanned<String>>,
}

/// `[route.sticky_cookie]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStickyCookie {
    pub name: Spanned<String>,
    pub max_age: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub domain: Option<Spanned<String>>,
    pub same_site: Option<Spanned<String>>,
    pub secure: Option<bool>,
}

/// `[route.rate_limit]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests_per_second: Spanned<f64>,
    pub burst: Option<Spanned<i64>>,
    pub key: Option<Spanned<String>>,
}

/// `[route.request_headers]` / `[route.response_headers]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderEdits {
    pub set: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    pub remove: Option<Vec<Spanned<String>>>,
}

/// `[route.force]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawForce {
    pub header: Option<Spanned<String>>,
    pub cookie: Option<Spanned<String>>,
    pub allow_when_reverted: Option<bool>,
    pub canary_values: Option<Vec<Spanned<String>>>,
    pub stable_values: Option<Vec<Spanned<String>>>,
}

/// `[route.stable]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVersion {
    pub version: Spanned<String>,
    pub endpoints: Spanned<Vec<Spanned<RawEndpoint>>>,
    pub tls: Option<Spanned<RawUpstreamTls>>,
}

/// `[route.stable.tls]` / `[route.canary.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub ca_file: Option<Spanned<String>>,
    pub server_name: Option<Spanned<String>>,
    pub cert_file: Option<Spanned<String>>,
    pub key_file: Option<Spanned<String>>,
}

/// `[route.canary]`: a version plus its weight.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCanary {
    pub version: Spanned<String>,
    pub endpoints: Spanned<Vec<Spanned<RawEndpoint>>>,
    pub weight: Option<Spanned<f64>>,
    pub tls: Option<Spanned<RawUpstreamTls>>,
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
    pub warmup: Option<Spanned<String>>,
    pub webhook: Option<Spanned<String>>,
    pub webhook_ca_file: Option<Spanned<String>>,
    pub webhook_format: Option<Spanned<String>>,
    pub slo: Option<Spanned<f64>>,
    pub one_vote_per_client: Option<Spanned<bool>>,
}

/// `[route.rollout]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    pub steps: Spanned<Vec<Spanned<f64>>>,
    pub hold: Spanned<String>,
    pub confirm: Option<Spanned<String>>,
    pub confirm_ca_file: Option<Spanned<String>>,
}

/// A parser's message in the config's words: serde names Rust types
/// (`invalid type: string "5", expected f64`), a person writing TOML
/// thinks of a number or a list.
fn plain(message: &str) -> String {
    let mut out = message.to_string();
    for (rust, toml) in [
        ("expected f64", "expected a number"),
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u16", "expected a whole number"),
        ("expected u8", "expected a whole number"),
        ("expected usize", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected a sequence", "expected a list ([...])"),
        ("expected a map", "expected a table ({...} or [section])"),
    ] {
        if let Some(at) = out.find(rust) {
            // (Only a whole word: `expected u8` is not `expected u80`.)
            let end = at + rust.len();
            if !out[end..].starts_with(|c: char| c.is_ascii_alphanumeric()) {
                out.replace_range(at..end, toml);
            }
        }
    }
    out
}

impl RawConfig {
    /// Parses TOML text. Returns the config if it could be read, and the
    /// problems found on the way.
    ///
    /// The toml parser stops at the first problem. An unknown key on a line
    /// of its own is recorded, commented out (its first character becomes
    /// `#`, so every offset stays the same), and the parse tried again; so
    /// every such typo is reported at once, and stage two still runs.
    /// Syntax and type errors stop the parse: after them nothing reliable
    /// can be said about the rest of the file.
    pub fn parse(text: &str) -> (Option<RawConfig>, Vec<Diagnostic>) {
        let mut work = text.to_string();
        let mut found = Vec::new();
        for _ in 0..MAX_UNKNOWN_KEYS {
            let e = match toml::from_str::<RawConfig>(&work) {
                Ok(raw) => return (Some(raw), found),
                Err(e) => e,
            };
            let offset = e.span().map_or(0, |s| s.start);
            let message = plain(&e.message().trim().replace('\n', " "));
            found.push(Diagnostic::at(text, offset, message.clone()));
            let line_start = work
                .get(..offset)
                .and_then(|b| b.rfind('\n'))
                .map_or(0, |i| i + 1);
            let key_alone = work
                .get(line_start..offset)
                .is_some_and(|p| p.trim().is_empty());
            let ascii = work.as_bytes().get(offset).is_some_and(u8::is_ascii);
            if !(message.starts_with("unknown field") && key_alone && ascii && e.span().is_some()) {
                return (None, found);
            }
            work.replace_range(offset..offset + 1, "#");
        }
        (None, found)
    }
}
