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
        if requests >= BURST_MIN_REQUESTS
            && errors as f64 >= BURST_FAILURE_SHARE * requests as f64
            && keys >= BURST_MIN_REQUESTS
            && failing_keys as f64 >= BURST_FAILURE_SHARE * keys as f64
        {
            return breach(
                Guard::FailureBurst,
                format!(
                    "{errors} of the last {requests} canary requests failed ({:.0}%) within 10 s, for {failing_keys} of {keys} users",
                    errors as f64 * 100.0 / requests as f64
                ),
            );
        }
        None
    }
}
