//! The gross-failure guards: no statistics, each with a floor.

use std::time::Duration;

use super::{Judge, Status, Verdict};
use crate::guard::Guard;

/// Canary requests over the burst guard's 10 s before it may act.
const BURST_MIN_REQUESTS: u64 = 20;
/// Failure share that trips the burst guard.
const BURST_FAILURE_SHARE: f64 = 0.5;
/// Span of the burst guard.
pub(super) const BURST_SPAN: Duration = Duration::from_secs(10);
/// Fewest canary users of a span that trip the burst guard when every one
/// of them failed and stable did not (routes whose keys are few).
const BURST_FEW_USERS: u64 = 5;
/// How much larger than stable's the canary's failure share of the span
/// must be for the few-users floor.
const BURST_FEW_USERS_VS_STABLE: f64 = 10.0;

impl Judge {
    /// A gross failure of the canary, if any.
    pub(super) fn guards(&self, unreachable: bool, burst_keys: (u64, u64)) -> Option<Verdict> {
        let breach = |guard: Guard, reason: String| {
            Some(Verdict {
                status: Status::Breach,
                guard: Some(guard),
                reason,
            })
        };
        if unreachable {
            return breach(
                Guard::Unreachable,
                "canary unreachable: every endpoint is failing connects".into(),
            );
        }
        let (requests, errors) = self.canary.recent(self.burst_slices);
        let (failing_keys, keys) = burst_keys;
        if requests < BURST_MIN_REQUESTS || (errors as f64) < BURST_FAILURE_SHARE * requests as f64
        {
            return None;
        }
        let share = errors as f64 / requests as f64;
        let many_users =
            keys >= BURST_MIN_REQUESTS && failing_keys as f64 >= BURST_FAILURE_SHARE * keys as f64;
        // A route whose keys are few (`client-ip` behind a hundred callers:
        // about ten on the canary) never has 20 canary users in a span.
        // There every one of at least five failed, while stable, with as
        // many requests, failed at a tenth of the canary's share: a few
        // broken clients on both versions, or an outage both share, do not
        // look like that.
        let (stable_requests, stable_errors) = self.stable.recent(self.burst_slices);
        let stable_share = stable_errors as f64 / stable_requests.max(1) as f64;
        let few_users = (BURST_FEW_USERS..BURST_MIN_REQUESTS).contains(&keys)
            && failing_keys >= keys
            && stable_requests >= BURST_MIN_REQUESTS
            && stable_share * BURST_FEW_USERS_VS_STABLE < share;
        if !(many_users || few_users) {
            return None;
        }
        let stable_part = if many_users {
            String::new()
        } else {
            format!(
                " (every canary user of the span; stable {:.1}%)",
                stable_share * 100.0
            )
        };
        breach(
            Guard::FailureBurst,
            format!(
                "{errors} of the last {requests} canary requests failed ({:.0}%) within 10 s, for {failing_keys} of {keys} users{stable_part}",
                share * 100.0
            ),
        )
    }
}
