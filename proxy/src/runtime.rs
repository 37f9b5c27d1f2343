//! What the controller keeps per route besides its decisions: the judge,
//! the recorders the data plane writes into, and the tick clock.

use std::sync::Arc;

use tokio::time::Instant;
use veer_control::config::{JudgeSettings, Route};
use veer_control::judge::{Judge, SavedTests};
use veer_control::state::{canary_identity, RouteDecision};

use crate::record::{threshold_count, Recorder, RouteKeys};

/// Live judging state of one route.
pub struct RouteRuntime {
    /// The canary identity it judges.
    pub identity: u64,
    /// Stable's version name.
    pub stable_version: String,
    /// The settings its judge was built with.
    pub judge_settings: JudgeSettings,
    /// The judge.
    pub judge: Judge,
    /// Slow-threshold slots the recorders keep.
    pub thresholds: usize,
    /// Stable's recorder (the data plane writes, the controller drains).
    pub stable: Arc<Recorder>,
    /// The canary's recorder.
    pub canary: Option<Arc<Recorder>>,
    /// When the judge last ticked.
    pub last_tick: Instant,
    /// The last tick came early, at a look: no other until the next due one.
    pub early: bool,
    /// The canary share of the last tick, basis points.
    pub last_w_bp: Option<u16>,
}

impl RouteRuntime {
    /// A fresh runtime for `route`, whose recorders start counting under
    /// canary share `w_bp` (the share its first snapshot routes with, so
    /// the first tick's events are attributable).
    pub fn new(route: &Route, w_bp: u16) -> RouteRuntime {
        let judge = Judge::new(&route.judge);
        let thresholds = threshold_count(judge.slots());
        let keys = Arc::new(RouteKeys::new(thresholds));
        let rt = RouteRuntime {
            identity: canary_identity(route),
            stable_version: route.stable.name.clone(),
            judge_settings: route.judge.clone(),
            judge,
            thresholds,
            stable: Arc::new(Recorder::new(keys.clone())),
            canary: route.canary.as_ref().map(|_| Arc::new(Recorder::new(keys))),
            last_tick: Instant::now(),
            early: false,
            last_w_bp: Some(w_bp),
        };
        rt.set_thresholds();
        rt
    }

    /// Puts the judge's slow thresholds in force on both recorders.
    pub fn set_thresholds(&self) {
        self.stable
            .set_thresholds(self.judge.stable_thresholds_us());
        if let Some(c) = &self.canary {
            c.set_thresholds(self.judge.canary_thresholds_us());
        }
    }

    /// Continues the sequential tests from `saved` (from the state dir, or
    /// from the runtime this one replaces) when they belong to this canary.
    pub fn resume(&mut self, route: &str, saved: Option<SavedTests>) {
        let Some(saved) = saved else { return };
        if self.judge.restore_tests(saved) {
            tracing::info!(route, "judge resumes its evidence about this canary");
        } else {
            tracing::info!(route, "judge settings changed: its tests start afresh");
        }
    }

    /// Keeps the window of the same stable version from the runtime this
    /// one replaces (a new canary, or new judge settings), with its slow
    /// thresholds in force at once.
    pub fn keep_stable_window(&mut self, earlier: &RouteRuntime) {
        if self.judge.keep_stable_window(&earlier.judge) {
            self.set_thresholds();
        }
    }

    /// Whether `route` is judged as this runtime judges (same canary,
    /// stable version and judge settings).
    pub fn same_as(&self, route: &Route) -> bool {
        self.identity == canary_identity(route)
            && self.stable_version == route.stable.name
            && self.judge_settings == route.judge
    }
}

/// The evidence a decision holds, if it still parses.
pub fn saved_evidence(route: &str, d: Option<&RouteDecision>) -> Option<SavedTests> {
    let v = d?.evidence.clone()?;
    serde_json::from_value(v)
        .inspect_err(|e| {
            tracing::warn!(route, error = %e, "saved evidence unreadable: the judge's tests start afresh")
        })
        .ok()
}
