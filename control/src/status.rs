//! The `/status` document: one typed value, written by the proxy's
//! controller and read back through the same type by `veer status`, the
//! demo and the tests.
//!
//! Numbers that the judge may drive to infinity (e-values) are published
//! finite ([`finite`]): JSON has no infinity, and a document that does not
//! parse back would blind `veer status` exactly when evidence is largest.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::judge::{Evidence, TestEvidence};
use crate::rollout::Label;
use crate::state::{Deployments, OperatorNote, Revert};
use crate::window::Stats;

/// The whole document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusDoc {
    /// The proxy's version.
    pub veer_version: String,
    /// The config in force and the last reload.
    pub config: ConfigStatus,
    /// Why the last write of persisted decisions failed, if it did.
    pub state_error: Option<String>,
    /// The fleet this replica shares decisions with (`[fleet]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetStatus>,
    /// The TLS listeners' certificates (`[proxy.tls]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Arc<TlsStatus>>,
    /// Every route, in config order.
    pub routes: Vec<Arc<RouteStatus>>,
}

/// The fleet, as one replica sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// `etcd`.
    pub store: String,
    /// The fleet's name.
    pub name: String,
    /// This replica's name.
    pub replica: String,
    /// Connected to the store, with a watch running.
    pub connected: bool,
    /// The fleet's decisions were read at least once (until then the
    /// canaries get no traffic here).
    pub synced: bool,
    /// Replicas with a live member key.
    pub members: Vec<String>,
    /// The store's revision last seen.
    pub revision: i64,
    /// The last error talking to the store.
    pub last_error: Option<String>,
    /// Kept out of the fleet: another process holds this replica's name
    /// (`[fleet] replica`); its member key stays the other's until that
    /// one's lease runs out. Set when a try to join ended so, cleared when
    /// a try ends otherwise or joins.
    #[serde(default)]
    pub kept_out: bool,
}

/// The TLS listeners' certificates and client verification.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TlsStatus {
    /// The default certificate first, then those picked by name.
    pub certificates: Vec<CertificateStatus>,
    /// `client_ca`'s file, when clients' certificates are verified.
    pub client_ca: Option<String>,
    /// `client_crl`'s file, when clients' certificates are checked for
    /// revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_crl: Option<String>,
    /// `ticket_keys`' files, the sealing one first (none: each replica's
    /// own key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ticket_keys: Vec<String>,
    /// The oldest TLS version served: "1.2" or "1.3".
    #[serde(default)]
    pub min_version: String,
    /// Whether returning clients are given session tickets.
    #[serde(default)]
    pub session_tickets: bool,
    /// How many sessions are held for clients resuming by session ID.
    #[serde(default)]
    pub session_cache: usize,
}

/// One certificate in use.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CertificateStatus {
    /// Its file.
    pub file: String,
    /// The DNS names it covers (its subjectAltName's).
    pub names: Vec<String>,
    /// When it expires, Unix seconds.
    pub not_after_unix: Option<i64>,
}

/// Where a route's decision came from (fleet only).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteFleetStatus {
    /// `waiting` (the fleet's decisions not read yet: stable only),
    /// `local` (taken here), `fleet` (applied from another replica).
    pub source: String,
    /// The replica that made it.
    pub by: Option<String>,
    /// What it did (`revert`, `reset`, `step`, ...).
    pub change: Option<String>,
    /// The identity's epoch (resets so far).
    pub epoch: u64,
    /// A decision taken here is not in the store yet (a revert waiting
    /// for the store to come back).
    pub unpublished: bool,
}

/// The config in force.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigStatus {
    /// The config file.
    pub path: String,
    /// Increments with every applied config.
    pub generation: u64,
    /// The last load.
    pub last_reload: LastReload,
    /// Settings changed in the file that only a restart applies.
    pub restart_required: Vec<String>,
    /// Valid settings that are often mistakes (`LINE:COL: message`).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// The outcome of the last config load.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LastReload {
    /// `success` or `failure`.
    pub result: String,
    /// Why it failed.
    pub error: Option<String>,
    /// When it was attempted, Unix seconds.
    pub at_unix: u64,
}

/// One route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteStatus {
    /// Its name.
    pub name: String,
    /// Host patterns (empty: the default route).
    pub hosts: Vec<String>,
    /// Path prefix.
    pub path_prefix: String,
    /// `canary` or `blue-green`.
    pub strategy: String,
    /// The canary's share.
    pub weight: WeightStatus,
    /// The stable version.
    pub stable: VersionStatus,
    /// The canary, if deployed.
    pub canary: Option<VersionStatus>,
    /// The judge's label.
    pub verdict: Label,
    /// Why, with numbers.
    pub reason: String,
    /// `enforce`, `observe` or `off`.
    pub mode: String,
    /// Paused by an operator.
    pub paused: bool,
    /// Promoted by an operator.
    pub promoted: bool,
    /// The revert in force, if any.
    pub reverted: Option<Revert>,
    /// The last operator action on this canary: what, who and why, when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_action: Option<OperatorNote>,
    /// The rollout, if configured.
    pub rollout: Option<RolloutStatus>,
    /// The sequential tests.
    pub evidence: EvidenceStatus,
    /// Per-version statistics over the judge's window.
    pub window: WindowStatus,
    /// Deployments that ended in the last 30 days (DORA).
    #[serde(default)]
    pub deployments: DeploymentStatus,
    /// Where the decision came from, in a fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<RouteFleetStatus>,
    /// Mirroring, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorStatus>,
}

/// A route's `[route.mirror]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MirrorStatus {
    /// Share of stable's requests copied, percent.
    pub percent: f64,
    /// Copies are being sent (false while the canary is reverted or its
    /// smoke checks have not passed).
    pub active: bool,
    /// Pairs judged in the judge's window.
    pub pairs_in_window: u64,
}

/// A route's deployments that ended in the last 30 days.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeploymentStatus {
    /// Promoted to all traffic.
    pub promoted: u64,
    /// Reverted (change failures).
    pub reverted: u64,
    /// Replaced by another canary first.
    pub replaced: u64,
    /// Reverted over all ended; None before any ended.
    pub change_failure_ratio: Option<f64>,
}

impl From<Deployments> for DeploymentStatus {
    fn from(d: Deployments) -> DeploymentStatus {
        DeploymentStatus {
            promoted: d.promoted,
            reverted: d.reverted,
            replaced: d.replaced,
            change_failure_ratio: d.change_failure_ratio(),
        }
    }
}

/// The canary's share, in percent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WeightStatus {
    /// As configured.
    pub configured: f64,
    /// In effect (0 once reverted, 100 once promoted, the step's in a rollout).
    pub effective: f64,
}

/// One version's endpoints.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionStatus {
    /// The version's name.
    pub version: String,
    /// Its endpoints.
    pub endpoints: Vec<EndpointStatus>,
}

/// One endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// As configured; for a host name that resolved to several
    /// addresses, followed by the address in parentheses.
    pub addr: String,
    /// The address it resolved to.
    pub resolved: String,
    /// Its weight within the version.
    pub weight: u32,
    /// Not failing connects, nor taken out by a health check.
    pub healthy: bool,
    /// Why the route's health check took it out, while it is out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
    /// Why outlier detection took it out, and for how long, while it is
    /// out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejected: Option<String>,
    /// Why its last connect failed (refused, a timeout, a TLS handshake),
    /// until a request to it is answered again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_error: Option<String>,
    /// Why it is in back-off after failed tries (connects, resets in a
    /// row), and for how long, while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub back_off: Option<String>,
}

/// A rollout's progress.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// The current step's index.
    pub step: usize,
    /// Every step's weight, in percent.
    pub steps: Vec<f64>,
    /// Healthy time needed per step, seconds.
    pub hold_s: f64,
    /// The step's hold is met and the confirmation gate has not said yes
    /// (yet): the rollout waits.
    #[serde(default)]
    pub waiting_confirmation: bool,
    /// The gate's last answer (`HTTP 403`, an error), if asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmation: Option<String>,
}

/// Distinct-key bad events per version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Events {
    /// The canary's.
    pub canary: u64,
    /// Stable's.
    pub stable: u64,
}

/// The judge's evidence.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvidenceStatus {
    /// Largest e-value of the error tests.
    pub e_errors: f64,
    /// Largest e-value of the latency tests.
    pub e_latency: f64,
    /// What each test's e-value must reach.
    pub threshold: f64,
    /// Error events of the first error test.
    pub error_events: Events,
    /// Slow events, summed over the latency tests.
    pub slow_events: Events,
    /// Stable's slow threshold (ms) of each latency ratio test, by quantile.
    pub slow_thresholds_ms: BTreeMap<String, Option<f64>>,
    /// Every test.
    pub tests: Vec<TestStatus>,
    /// In a fleet that pools its evidence: the pooled tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<crate::judge::PoolEvidence>,
    /// The route's clients are many (64 distinct addresses or more since
    /// this canary started), so a client address, like a sticky key, has
    /// one vote per kind of bad event (see the README, "Security").
    #[serde(default)]
    pub one_vote_per_client: bool,
    /// Where client addresses have one vote: their rounds now (see the
    /// README, "Security"): an operator sees a round fill and end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_rounds: Option<AddressRounds>,
}

/// The rounds of address votes of a route whose client addresses have one
/// vote each.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AddressRounds {
    /// The votes a round holds: half the client addresses seen in the last
    /// minute or two, at least 32. A kind's round ends on the tick after
    /// its votes reach it, and every address may vote again.
    pub size: u64,
    /// The votes the current round of errors has had.
    pub errors: u64,
    /// The votes the current round of each latency test's slow events has
    /// had, in the order of the latency tests in `tests`.
    pub slow: Vec<u64>,
}

/// One test, as the judge reports it.
pub type TestStatus = TestEvidence;

/// Window statistics of both versions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowStatus {
    /// Stable's.
    pub stable: WindowStats,
    /// The canary's, if deployed.
    pub canary: Option<WindowStats>,
}

/// One version's window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowStats {
    /// Requests.
    pub requests: u64,
    /// Errors.
    pub errors: u64,
    /// Errors over requests.
    pub error_rate: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Requests given up by their clients (they left after sending the
    /// whole request, before the answer) under every latency threshold in
    /// force: counted here, not in `requests` (a request given up past a
    /// threshold is in `requests`, at the time it had waited).
    #[serde(default)]
    pub given_up: u64,
}

/// `x` as a finite number: infinity as the largest finite, NaN as 0.
pub fn finite(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(f64::MIN, f64::MAX)
    }
}

impl From<&Stats> for WindowStats {
    fn from(s: &Stats) -> WindowStats {
        WindowStats {
            requests: s.requests,
            errors: s.errors,
            error_rate: finite(s.error_rate()),
            p50_ms: s.quantile_ms(0.5),
            p95_ms: s.quantile_ms(0.95),
            p99_ms: s.quantile_ms(0.99),
            p999_ms: s.quantile_ms(0.999),
            given_up: 0,
        }
    }
}

fn test_status(t: &TestEvidence) -> TestStatus {
    let mut status = TestStatus {
        e: finite(t.e),
        ..t.clone()
    };
    if let Some(r) = &mut status.key_round {
        r.e = finite(r.e);
    }
    status
}

impl From<&Evidence> for EvidenceStatus {
    fn from(ev: &Evidence) -> EvidenceStatus {
        EvidenceStatus {
            e_errors: finite(ev.e_errors),
            e_latency: finite(ev.e_latency),
            threshold: finite(ev.threshold),
            error_events: Events {
                canary: ev.error_events.0,
                stable: ev.error_events.1,
            },
            slow_events: Events {
                canary: ev.slow_events.0,
                stable: ev.slow_events.1,
            },
            slow_thresholds_ms: ev
                .thresholds_ms
                .iter()
                .map(|(q, t)| (q.key().to_string(), *t))
                .collect(),
            tests: ev.tests.iter().map(test_status).collect(),
            pool: ev.pool.as_ref().map(|p| crate::judge::PoolEvidence {
                threshold: finite(p.threshold),
                tests: p.tests.iter().map(test_status).collect(),
                ..p.clone()
            }),
            one_vote_per_client: false,
            address_rounds: None,
        }
    }
}

impl StatusDoc {
    /// The route named `name`.
    pub fn route(&self, name: &str) -> Option<&RouteStatus> {
        self.routes.iter().map(|r| &**r).find(|r| r.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_infinite_e_value_survives_a_round_trip() {
        let doc = StatusDoc {
            routes: vec![Arc::new(RouteStatus {
                name: "web".into(),
                hosts: vec![],
                path_prefix: "/".into(),
                strategy: "canary".into(),
                weight: WeightStatus::default(),
                stable: VersionStatus::default(),
                canary: None,
                verdict: Label::Reverted,
                reason: String::new(),
                mode: "enforce".into(),
                paused: false,
                promoted: false,
                reverted: None,
                last_action: None,
                rollout: None,
                evidence: EvidenceStatus {
                    e_errors: finite(f64::INFINITY),
                    e_latency: finite(f64::NAN),
                    ..EvidenceStatus::default()
                },
                window: WindowStatus::default(),
                deployments: DeploymentStatus::default(),
                fleet: None,
                mirror: None,
            })],
            ..StatusDoc::default()
        };
        let text = serde_json::to_string(&doc).expect("serialize");
        let back: StatusDoc = serde_json::from_str(&text).expect("parse back");
        assert_eq!(back, doc);
        assert_eq!(back.route("web").map(|r| r.verdict), Some(Label::Reverted));
        assert!(text.contains("\"verdict\":\"reverted\""));
    }
}
