//! What reverted a canary: one name per guard and test, the same in the
//! state file, `veer_reverts_total{reason}`, `/status`, logs and webhooks.

use serde::{Deserialize, Serialize};

/// A guard or test that can revert a canary, or the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guard {
    /// Every canary endpoint failing connects.
    Unreachable,
    /// Half of at least 20 requests from at least 20 users failed in 10 s
    /// (with fewer canary users: every one of at least 5, stable not).
    FailureBurst,
    /// `max_error_rate_ratio`.
    ErrorRateRatio,
    /// `max_error_rate`.
    MaxErrorRate,
    /// `slo` (14.4x its error budget).
    SloBurnRate,
    /// No error limit: errors no worse than stable's beyond the margin.
    ErrorRateTest,
    /// `max_latency_ratio`.
    LatencyRatio,
    /// `max_latency_ms`.
    MaxLatency,
    /// No latency limit: p50 and p99 no worse than stable's beyond the margin.
    LatencyTest,
    /// Blue-green watch: errors against the old colour's.
    BluegreenErrorTest,
    /// Blue-green watch: latency against the old colour's.
    BluegreenLatencyTest,
    /// Mirrored pairs: the canary's copies fail where stable's do not,
    /// beyond an error limit.
    MirrorErrorTest,
    /// Mirrored pairs: the canary's copies are slower than stable's, beyond
    /// a latency limit.
    MirrorLatencyTest,
    /// `POST /routes/NAME/revert`.
    Operator,
    /// A name this version does not know (a state file written by a newer
    /// one): the revert it records still holds.
    #[serde(other)]
    Unknown,
}

impl Guard {
    /// Every guard.
    pub const ALL: [Guard; 15] = [
        Guard::Unreachable,
        Guard::FailureBurst,
        Guard::ErrorRateRatio,
        Guard::MaxErrorRate,
        Guard::SloBurnRate,
        Guard::ErrorRateTest,
        Guard::LatencyRatio,
        Guard::MaxLatency,
        Guard::LatencyTest,
        Guard::BluegreenErrorTest,
        Guard::BluegreenLatencyTest,
        Guard::MirrorErrorTest,
        Guard::MirrorLatencyTest,
        Guard::Operator,
        Guard::Unknown,
    ];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Guard::Unreachable => "unreachable",
            Guard::FailureBurst => "failure_burst",
            Guard::ErrorRateRatio => "error_rate_ratio",
            Guard::MaxErrorRate => "max_error_rate",
            Guard::SloBurnRate => "slo_burn_rate",
            Guard::ErrorRateTest => "error_rate_test",
            Guard::LatencyRatio => "latency_ratio",
            Guard::MaxLatency => "max_latency",
            Guard::LatencyTest => "latency_test",
            Guard::BluegreenErrorTest => "bluegreen_error_test",
            Guard::BluegreenLatencyTest => "bluegreen_latency_test",
            Guard::MirrorErrorTest => "mirror_error_test",
            Guard::MirrorLatencyTest => "mirror_latency_test",
            Guard::Operator => "operator",
            Guard::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_and_labels_use_one_name_and_unknown_names_still_parse() {
        for g in Guard::ALL {
            let json = serde_json::to_string(&g).expect("serialize");
            assert_eq!(json, format!("\"{}\"", g.as_str()));
            if g != Guard::Unknown {
                assert_eq!(serde_json::from_str::<Guard>(&json).expect("parse"), g);
            }
        }
        let future: Guard = serde_json::from_str("\"p9999_cosmic_ray\"").expect("parse");
        assert_eq!(future, Guard::Unknown);
    }
}
