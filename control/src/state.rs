//! Decisions that must outlive a restart: reverts, promotions, pauses and
//! rollout progress, per route, in `[state] dir`/`state.json`.
//!
//! Writes are atomic (write a temporary file, fsync, rename, fsync the
//! directory), so a crash leaves the old file or the new one, never half.
//! A decision belongs to one canary *identity* (its version and endpoints):
//! when the config names a different canary, the decision is dropped.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::config::Route;
use crate::guard::Guard;
use crate::rollout::{Action, DeploymentResult};

/// File name inside the state dir.
pub const FILE: &str = "state.json";

/// Why state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// I/O on the state dir failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid state.
    #[error("{path}: not a veer state file: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The error.
        source: serde_json::Error,
    },
}

/// A revert, with why and when.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Revert {
    /// The guard or test that tripped, or `operator`.
    pub guard: Guard,
    /// The reason with its numbers.
    pub reason: String,
    /// Unix seconds.
    pub at_unix: u64,
}

/// What has been decided for one route's current canary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteDecision {
    /// Identity of the canary this applies to (see [`canary_identity`]).
    pub canary_identity: u64,
    /// Set when the canary was taken out of traffic.
    #[serde(default)]
    pub reverted: Option<Revert>,
    /// Set when an operator promoted the canary to all traffic.
    #[serde(default)]
    pub promoted: bool,
    /// The judge reports but does not act, and the rollout does not advance.
    #[serde(default)]
    pub paused: bool,
    /// Index of the current rollout step.
    #[serde(default)]
    pub rollout_step: usize,
    /// How many times this identity was `reset` (a fleet's records with a
    /// higher epoch win over older reverts of the same identity).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    /// The last smoke run of this canary ([`crate::rollout::smoke_key`]
    /// names which checks, and which flip, it was for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoke: Option<SmokeResult>,
    /// The last operator action on this canary, with who and why: a
    /// pause or a promotion says who made it, on every replica of a fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_action: Option<OperatorNote>,
    /// The judge's sequential tests, saved every few seconds and at
    /// shutdown ([`crate::judge::SavedTests`]). Kept as raw JSON so that a
    /// part that no longer parses costs only the evidence, never the
    /// decisions above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<serde_json::Value>,
    /// Earlier canary identities of this route that were reverted, newest
    /// last, at most [`MAX_TOMBSTONES`]: a config that names one of them
    /// again (after a torn write, or a ConfigMap briefly without the
    /// canary) finds it still reverted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tombstones: Vec<Tombstone>,
}

/// An operator's action on a canary, with who asked and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorNote {
    /// What they did.
    pub action: Action,
    /// Who asked and why, as they said it (`alice: p99 doubled`); none
    /// when nothing was said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub said: Option<String>,
    /// When, unix seconds.
    pub at_unix: u64,
}

impl OperatorNote {
    /// Of two notes, the later (ties: `theirs`, the store's).
    pub fn later(
        ours: Option<&OperatorNote>,
        theirs: Option<&OperatorNote>,
    ) -> Option<OperatorNote> {
        match (ours, theirs) {
            (Some(o), Some(t)) if o.at_unix > t.at_unix => Some(o.clone()),
            (o, None) => o.cloned(),
            (_, t) => t.cloned(),
        }
    }
}

/// The outcome of one run of a route's smoke checks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SmokeResult {
    /// What was checked ([`crate::rollout::smoke_key`]).
    pub key: u64,
    /// Every check passed on every endpoint.
    pub passed: bool,
    /// The first failure (check and endpoint), or a summary.
    pub reason: String,
    /// When, unix seconds.
    pub at_unix: u64,
}

/// A reverted canary identity that is no longer the route's current one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tombstone {
    /// The identity ([`canary_identity`]).
    pub identity: u64,
    /// Its revert.
    pub revert: Revert,
}

/// Reverted identities remembered per route. A route that cycles through
/// more distinct canaries than this forgets the oldest revert; sixteen
/// covers any torn-write or rollback sequence seen in practice, and keeps
/// the state file small.
pub const MAX_TOMBSTONES: usize = 16;

impl RouteDecision {
    /// The decision for canary identity `id`, given this one (the route's
    /// current decision). The same identity keeps everything. Another one
    /// starts afresh, except that a reverted identity stays reverted: the
    /// current one, if reverted, is remembered in a tombstone, and `id` is
    /// reverted again if a tombstone names it. Only `reset` (see
    /// [`RouteDecision::reset`]) clears a revert.
    pub fn for_identity(&self, id: u64) -> RouteDecision {
        if self.canary_identity == id {
            return self.clone();
        }
        let mut tombstones = self.tombstones.clone();
        if let Some(r) = &self.reverted {
            if self.canary_identity != 0 {
                tombstones.retain(|t| t.identity != self.canary_identity);
                tombstones.push(Tombstone {
                    identity: self.canary_identity,
                    revert: r.clone(),
                });
            }
        }
        if tombstones.len() > MAX_TOMBSTONES {
            tombstones.drain(..tombstones.len() - MAX_TOMBSTONES);
        }
        let reverted = tombstones
            .iter()
            .find(|t| t.identity == id)
            .map(|t| t.revert.clone());
        RouteDecision {
            canary_identity: id,
            reverted,
            tombstones,
            ..RouteDecision::default()
        }
    }

    /// The operator's `reset`: a fresh decision for the current identity,
    /// its own tombstone cleared; the others stay.
    pub fn reset(&self) -> RouteDecision {
        let mut tombstones = self.tombstones.clone();
        tombstones.retain(|t| t.identity != self.canary_identity);
        RouteDecision {
            canary_identity: self.canary_identity,
            tombstones,
            epoch: self.epoch + 1,
            ..RouteDecision::default()
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Every route's decision.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// By route name.
    pub routes: BTreeMap<String, RouteDecision>,
    /// Deployments that ended in the last [`HISTORY_SECS`], oldest first
    /// (the DORA figures: change failure ratio, deployments by result).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Ended>,
}

/// How long ended deployments are remembered: 30 days.
pub const HISTORY_SECS: u64 = 30 * 86_400;
/// Most ended deployments remembered (about one every 4 minutes for 30
/// days, over all routes); older ones are forgotten first.
pub const MAX_HISTORY: usize = 10_000;

/// One ended deployment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ended {
    /// The route.
    pub route: String,
    /// How it ended.
    pub result: DeploymentResult,
    /// When, Unix seconds.
    pub at_unix: u64,
}

/// A route's deployments that ended in the last 30 days.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Deployments {
    /// Promoted to all traffic.
    pub promoted: u64,
    /// Reverted: change failures.
    pub reverted: u64,
    /// Replaced by another canary first.
    pub replaced: u64,
}

impl Deployments {
    /// Reverted over all ended; None before any ended.
    pub fn change_failure_ratio(&self) -> Option<f64> {
        let n = self.promoted + self.reverted + self.replaced;
        (n > 0).then(|| self.reverted as f64 / n as f64)
    }
}

/// A fingerprint of a route's canary: version name and endpoints (with
/// weights). A new value means a new canary, which is judged afresh.
pub fn canary_identity(route: &Route) -> u64 {
    let Some(c) = &route.canary else { return 0 };
    let mut eps: Vec<String> = c
        .endpoints
        .iter()
        .map(|e| format!("{}*{}", e.addr, e.weight))
        .collect();
    eps.sort();
    // HTTP/1.1 adds nothing, so identities from before schemes existed hold.
    let proto = match c.protocol {
        crate::config::UpstreamProtocol::Http1 => String::new(),
        p => format!("\n{}", p.scheme()),
    };
    xxh3_64(format!("{}\n{}{proto}", c.name, eps.join(",")).as_bytes())
}

impl State {
    /// Remembers that a deployment of `route` ended at `at_unix`, and
    /// forgets those older than 30 days (and the oldest beyond
    /// [`MAX_HISTORY`]).
    pub fn record_end(&mut self, route: &str, result: DeploymentResult, at_unix: u64) {
        self.history.push(Ended {
            route: route.to_string(),
            result,
            at_unix,
        });
        let cutoff = at_unix.saturating_sub(HISTORY_SECS);
        self.history.retain(|e| e.at_unix >= cutoff);
        if self.history.len() > MAX_HISTORY {
            self.history.drain(..self.history.len() - MAX_HISTORY);
        }
    }

    /// `route`'s deployments that ended in the 30 days before `now_unix`.
    pub fn deployments(&self, route: &str, now_unix: u64) -> Deployments {
        self.deployments_by_route(now_unix)
            .remove(route)
            .unwrap_or_default()
    }

    /// Every route's deployments that ended in the 30 days before
    /// `now_unix` (one pass over the history).
    pub fn deployments_by_route(&self, now_unix: u64) -> BTreeMap<String, Deployments> {
        let cutoff = now_unix.saturating_sub(HISTORY_SECS);
        let mut by_route: BTreeMap<String, Deployments> = BTreeMap::new();
        for e in self.history.iter().filter(|e| e.at_unix >= cutoff) {
            let d = by_route.entry(e.route.clone()).or_default();
            match e.result {
                DeploymentResult::Promoted => d.promoted += 1,
                DeploymentResult::Reverted => d.reverted += 1,
                DeploymentResult::Replaced => d.replaced += 1,
            }
        }
        by_route
    }

    /// Reads `dir/state.json`; a missing file is an empty state. Blocking.
    pub fn load(dir: &Path) -> Result<State, StateError> {
        let path = dir.join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| StateError::Format { path, source })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Writes `dir/state.json` atomically, creating `dir`. Blocking.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let tmp = dir.join(format!(".{FILE}.tmp"));
        let path = dir.join(FILE);
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| StateError::Format {
            path: path.clone(),
            source,
        })?;
        {
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&bytes).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn revert(at: u64) -> Revert {
        Revert {
            guard: Guard::ErrorRateTest,
            reason: "E = 300".into(),
            at_unix: at,
        }
    }

    #[test]
    fn a_torn_write_without_the_canary_does_not_re_expose_it() {
        let reverted = RouteDecision {
            canary_identity: 7,
            reverted: Some(revert(1)),
            ..RouteDecision::default()
        };
        // The file briefly names no canary (identity 0), then the full file again.
        let without = reverted.for_identity(0);
        assert_eq!(without.reverted, None);
        let back = without.for_identity(7);
        assert_eq!(back.reverted, Some(revert(1)));
        // Another canary is judged afresh, and the first stays remembered.
        let other = back.for_identity(8);
        assert_eq!(other.reverted, None);
        assert_eq!(other.for_identity(7).reverted, Some(revert(1)));
    }

    #[test]
    fn reset_clears_only_the_current_identitys_revert() {
        let mut d = RouteDecision {
            canary_identity: 1,
            reverted: Some(revert(1)),
            ..RouteDecision::default()
        }
        .for_identity(2);
        d.reverted = Some(revert(2));
        let d = d.reset();
        assert_eq!(d.reverted, None);
        assert_eq!(d.for_identity(1).reverted, Some(revert(1)));
        assert_eq!(d.for_identity(1).for_identity(2).reverted, None);
    }

    proptest! {
        /// Whatever sequence of config identities comes, a reverted identity
        /// is reverted whenever it is current again, until a reset (among
        /// the most recent MAX_TOMBSTONES reverted ones).
        #[test]
        fn no_sequence_of_configs_re_exposes_a_reverted_identity(
            ids in proptest::collection::vec(0u64..6, 1..60),
            revert_at in proptest::collection::vec(any::<bool>(), 60),
        ) {
            let mut d = RouteDecision::default();
            let mut reverted = std::collections::HashSet::new();
            for (i, id) in ids.iter().enumerate() {
                d = d.for_identity(*id);
                if reverted.contains(id) {
                    prop_assert!(d.reverted.is_some(), "identity {} re-exposed at step {}", id, i);
                }
                if *id != 0 && revert_at.get(i).copied().unwrap_or(false) && d.reverted.is_none() {
                    d.reverted = Some(revert(i as u64));
                    reverted.insert(*id);
                }
            }
        }
    }

    #[test]
    fn save_then_load_round_trips_and_missing_is_empty() {
        let dir = std::env::temp_dir().join(format!("veer-state-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(State::load(&dir).expect("empty"), State::default());
        let mut s = State::default();
        s.routes.insert(
            "web".into(),
            RouteDecision {
                canary_identity: 42,
                reverted: Some(Revert {
                    guard: Guard::ErrorRateTest,
                    reason: "E = 300".into(),
                    at_unix: 1,
                }),
                ..RouteDecision::default()
            },
        );
        s.save(&dir).expect("save");
        assert_eq!(State::load(&dir).expect("load"), s);
        std::fs::write(dir.join(FILE), b"{nope").expect("write");
        assert!(matches!(State::load(&dir), Err(StateError::Format { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ended_deployments_are_kept_thirty_days_and_give_the_change_failure_ratio() {
        let mut st = State::default();
        let day = 86_400;
        st.record_end("web", DeploymentResult::Reverted, day);
        st.record_end("web", DeploymentResult::Promoted, 10 * day);
        st.record_end("web", DeploymentResult::Promoted, 20 * day);
        st.record_end("api", DeploymentResult::Replaced, 20 * day);
        let d = st.deployments("web", 25 * day);
        assert_eq!((d.promoted, d.reverted, d.replaced), (2, 1, 0));
        assert_eq!(d.change_failure_ratio(), Some(1.0 / 3.0));
        // 32 days on, the revert is forgotten.
        st.record_end("web", DeploymentResult::Promoted, 32 * day);
        let d = st.deployments("web", 32 * day);
        assert_eq!((d.promoted, d.reverted), (3, 0));
        assert_eq!(
            st.deployments("none", 32 * day).change_failure_ratio(),
            None
        );
        // The history survives a round trip, and old files without it load.
        let back: State = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        assert_eq!(back, st);
        let old: State = serde_json::from_str(r#"{"routes":{}}"#).unwrap();
        assert!(old.history.is_empty());
    }
}
