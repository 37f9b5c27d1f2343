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
    pub guard: String,
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
    /// The judge's sequential tests, saved every few seconds and at
    /// shutdown ([`crate::judge::SavedTests`]). Kept as raw JSON so that a
    /// part that no longer parses costs only the evidence, never the
    /// decisions above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<serde_json::Value>,
}

/// Every route's decision.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// By route name.
    pub routes: BTreeMap<String, RouteDecision>,
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
    xxh3_64(format!("{}\n{}", c.name, eps.join(",")).as_bytes())
}

impl State {
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
                    guard: "error_rate_test".into(),
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
}
