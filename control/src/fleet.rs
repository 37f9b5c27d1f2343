//! A fleet's shared decisions: the record every replica reads and writes
//! in the store, and the rules that merge it with a replica's own decision.
//!
//! One record per route and canary identity
//! (`/veer/v1/<fleet>/decision/<route>/<identity>`), changed only by a
//! transaction on its revision, so the store orders every change. The
//! rules, pure and in one place:
//!
//! - **Epochs.** A `reset` starts a new epoch of the identity. A record of
//!   a newer epoch replaces the replica's decision whole (the reset wins
//!   over any older revert, even one not yet published); one of an older
//!   epoch is ignored.
//! - **Toward stable is never blocked.** Within an epoch a revert is
//!   sticky: whatever the replica reverted on its own stays reverted when
//!   the fleet's record comes in, and publishing it adds it to the record
//!   ([`merge_publish`]).
//! - **Away from stable needs the store.** `reset`, `pause`, `resume`,
//!   `promote` and rollout steps are proposals ([`propose`]) checked against
//!   the record read in the same transaction; a replica applies them only
//!   once committed, from the record.

use serde::{Deserialize, Serialize};

use crate::rollout::Action;
use crate::state::{OperatorNote, Revert, RouteDecision};

/// A route's decision as the fleet stores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetRecord {
    /// The canary identity this decides for.
    pub identity: u64,
    /// Resets of the identity so far.
    pub epoch: u64,
    /// Set when the canary was taken out of traffic.
    #[serde(default)]
    pub reverted: Option<Revert>,
    /// Promoted to all traffic.
    #[serde(default)]
    pub promoted: bool,
    /// Judged but not acted on; the rollout holds.
    #[serde(default)]
    pub paused: bool,
    /// The rollout step.
    #[serde(default)]
    pub rollout_step: usize,
    /// When the step began (unix ms): rollout holds are timed once, for
    /// the whole fleet, from here.
    #[serde(default)]
    pub step_started_ms: u64,
    /// What the last write did.
    pub last: Change,
    /// The last operator action on the canary, with who and why (a
    /// replica from before this field wrote none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_action: Option<OperatorNote>,
    /// The replica that wrote it.
    pub by: String,
    /// When that replica decided it (unix ms): the propagation time is
    /// measured from here.
    pub at_ms: u64,
}

/// What a write to a record did (the `action` label of
/// `veer_fleet_decisions_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// The canary was reverted (by a judge or an operator).
    Revert,
    /// An operator's `reset`.
    Reset,
    /// An operator's `pause`.
    Pause,
    /// An operator's `resume`.
    Resume,
    /// An operator's `promote`.
    Promote,
    /// The rollout moved a step.
    Step,
    /// A replica published a decision the store did not have (first
    /// write of a record, or a store that lost its data).
    Sync,
}

impl Change {
    /// Every change.
    pub const ALL: [Change; 7] = [
        Change::Revert,
        Change::Reset,
        Change::Pause,
        Change::Resume,
        Change::Promote,
        Change::Step,
        Change::Sync,
    ];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Revert => "revert",
            Change::Reset => "reset",
            Change::Pause => "pause",
            Change::Resume => "resume",
            Change::Promote => "promote",
            Change::Step => "step",
            Change::Sync => "sync",
        }
    }
}

impl FleetRecord {
    /// The record of a replica's decision.
    pub fn of(d: &RouteDecision, step_started_ms: u64, by: &str, last: Change, at_ms: u64) -> Self {
        FleetRecord {
            identity: d.canary_identity,
            epoch: d.epoch,
            reverted: d.reverted.clone(),
            promoted: d.promoted,
            paused: d.paused,
            rollout_step: d.rollout_step,
            step_started_ms,
            last,
            last_action: d.last_action.clone(),
            by: by.to_string(),
            at_ms,
        }
    }

    /// Whether the two records decide the same (who wrote them and when
    /// aside).
    pub fn same_decision(&self, other: &FleetRecord) -> bool {
        self.identity == other.identity
            && self.epoch == other.epoch
            && self.reverted.is_some() == other.reverted.is_some()
            && self.promoted == other.promoted
            && self.paused == other.paused
            && self.rollout_step == other.rollout_step
    }
}

/// What a replica proposes that moves traffic toward the canary (or stops
/// the judge from acting): committed to the store before it is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proposal {
    /// An operator's action other than `revert`.
    Operator(Action),
    /// The rollout's next step, from step `from` of epoch `epoch`, whose
    /// hold this replica saw healthy.
    Step {
        /// The epoch the replica judged in.
        epoch: u64,
        /// The step it judged on.
        from: usize,
        /// The step's weight list's length.
        steps: usize,
    },
}

/// Why a proposal was not written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The record moved on since the proposal was made (another replica
    /// stepped, reverted, reset or paused first): nothing to do.
    #[error("the fleet's decision changed meanwhile")]
    Stale,
    /// The canary is reverted: `promote` needs a `reset` first.
    #[error("the canary is reverted; reset it before promoting")]
    PromoteReverted,
    /// A revert is not a proposal (it never waits for the store).
    #[error("a revert is published, not proposed")]
    NotAProposal,
}

/// The record that `proposal` makes of `current` (the store's record, read
/// in the same transaction; `None` if there is none yet, then `local` is
/// the base), written by `by` at `now_ms`; `said`: who asked for an
/// operator's action and why, as they said it.
pub fn propose(
    current: Option<&FleetRecord>,
    local: &FleetRecord,
    proposal: Proposal,
    said: Option<&str>,
    by: &str,
    now_ms: u64,
) -> Result<FleetRecord, Rejected> {
    let base = match current {
        // A record of another epoch than the replica's own is still the
        // fleet's truth: operator actions apply to it.
        Some(c) => c.clone(),
        None => local.clone(),
    };
    let mut r = base.clone();
    r.by = by.to_string();
    r.at_ms = now_ms;
    match proposal {
        Proposal::Operator(Action::Revert) => return Err(Rejected::NotAProposal),
        Proposal::Operator(Action::Reset) => {
            r.epoch = base.epoch.max(local.epoch) + 1;
            r.reverted = None;
            r.promoted = false;
            r.paused = false;
            r.rollout_step = 0;
            r.step_started_ms = now_ms;
            r.last = Change::Reset;
        }
        Proposal::Operator(Action::Pause) => {
            r.paused = true;
            r.last = Change::Pause;
        }
        Proposal::Operator(Action::Resume) => {
            r.paused = false;
            r.last = Change::Resume;
        }
        Proposal::Operator(Action::Promote) => {
            if base.reverted.is_some() {
                return Err(Rejected::PromoteReverted);
            }
            r.promoted = true;
            r.last = Change::Promote;
        }
        Proposal::Step { epoch, from, steps } => {
            if base.epoch != epoch
                || base.rollout_step != from
                || base.reverted.is_some()
                || base.promoted
                || base.paused
                || from + 1 >= steps
            {
                return Err(Rejected::Stale);
            }
            r.rollout_step = from + 1;
            r.step_started_ms = now_ms;
            r.last = Change::Step;
            return Ok(r);
        }
    }
    if let Proposal::Operator(action) = proposal {
        r.last_action = Some(OperatorNote {
            action,
            said: said.map(str::to_string),
            at_unix: now_ms / 1000,
        });
    }
    Ok(r)
}

/// What publishing `local` (a replica's own decision, which may hold a
/// revert the store has not seen) writes over `current`; `None` when the
/// store already says as much, or knows better (a newer epoch).
pub fn merge_publish(current: Option<&FleetRecord>, local: &FleetRecord) -> Option<FleetRecord> {
    let Some(c) = current else {
        // No record yet (a first write, or a store that lost its data).
        let mut r = local.clone();
        if r.reverted.is_none() {
            r.last = Change::Sync;
        }
        return Some(r);
    };
    if c.identity != local.identity || c.epoch > local.epoch {
        return None; // a reset after the revert wins
    }
    if c.epoch < local.epoch {
        // The store lost a reset of ours (restored from an old backup):
        // the replica's newer decision is the truth.
        let mut r = local.clone();
        r.last = Change::Sync;
        return Some(r);
    }
    if c.reverted.is_some() || local.reverted.is_none() {
        return None;
    }
    let mut r = c.clone();
    r.reverted = local.reverted.clone();
    r.last_action = OperatorNote::later(local.last_action.as_ref(), c.last_action.as_ref());
    r.last = Change::Revert;
    r.by = local.by.clone();
    r.at_ms = local.at_ms;
    Some(r)
}

/// How a record changes a replica's decision ([`merge`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merged {
    /// Another identity, or an older epoch: nothing.
    Ignored,
    /// The same epoch: the record's operator decisions, the replica's
    /// revert kept.
    Merged,
    /// A newer epoch (a reset): the record replaces the decision.
    Replaced,
}

/// Merges the fleet's record into a replica's decision `d`.
pub fn merge(d: &mut RouteDecision, r: &FleetRecord) -> Merged {
    if r.identity != d.canary_identity || r.epoch < d.epoch {
        return Merged::Ignored;
    }
    if r.epoch > d.epoch {
        d.epoch = r.epoch;
        d.reverted = r.reverted.clone();
        d.promoted = r.promoted;
        d.paused = r.paused;
        d.rollout_step = r.rollout_step;
        d.last_action = r.last_action.clone();
        d.evidence = None;
        // A reset runs the smoke checks again, here too.
        d.smoke = None;
        return Merged::Replaced;
    }
    if d.reverted.is_none() {
        d.reverted = r.reverted.clone();
    }
    d.promoted = r.promoted;
    d.paused = r.paused;
    d.rollout_step = r.rollout_step;
    d.last_action = OperatorNote::later(d.last_action.as_ref(), r.last_action.as_ref());
    Merged::Merged
}

/// How long a finished pool's keys stay in the store by default
/// (`[fleet] keep_evidence`).
pub const KEEP_EVIDENCE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Whether the keys of a pool (`epoch` of the canary identity `record`
/// decides for: its log of batches, its checkpoint and its seat counter)
/// may be deleted from the store at `now_ms`.
///
/// Only when the fleet's record says that pool's judging is over (the
/// canary was reverted or promoted in that epoch, or reset to a later
/// one) and said so at least `keep` ago: a replica that has not applied
/// the record yet may still write a batch or take a seat meanwhile (its
/// clock may also differ from the decider's; `keep` covers both), and an
/// operator may want to read the log. A pool whose canary is still judged
/// keeps its keys whatever their age: a replica joining late reads its
/// checkpoint and seat counter, and finding none would start the pooled
/// tests afresh and spend their share of `false_revert_rate` again. The
/// record itself stays (a revert must stay, `decision/` is its memory).
pub fn pool_finished(
    record: &FleetRecord,
    epoch: u64,
    now_ms: u64,
    keep: std::time::Duration,
) -> bool {
    let over = record.epoch > epoch
        || (record.epoch == epoch && (record.reverted.is_some() || record.promoted));
    let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
    over && now_ms.saturating_sub(record.at_ms) >= keep_ms
}

#[cfg(test)]
mod tests;
