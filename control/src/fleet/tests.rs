use proptest::prelude::*;

use super::*;
use crate::guard::Guard;

fn revert(at: u64) -> Revert {
    Revert {
        guard: Guard::ErrorRateRatio,
        reason: "bad".into(),
        at_unix: at,
    }
}

fn decision(epoch: u64) -> RouteDecision {
    RouteDecision {
        canary_identity: 7,
        epoch,
        ..RouteDecision::default()
    }
}

fn record(d: &RouteDecision, by: &str) -> FleetRecord {
    FleetRecord::of(d, 0, by, Change::Sync, 0)
}

#[test]
fn a_reset_wins_over_an_older_revert_not_yet_published() {
    let mut local = decision(0);
    local.reverted = Some(revert(1));
    let mut reset = decision(1);
    reset.rollout_step = 0;
    let store = FleetRecord {
        last: Change::Reset,
        ..record(&reset, "b")
    };
    // Publishing the old revert writes nothing over the reset...
    assert_eq!(merge_publish(Some(&store), &record(&local, "a")), None);
    // ...and the reset replaces the replica's decision.
    assert_eq!(merge(&mut local, &store), Merged::Replaced);
    assert!(local.reverted.is_none());
    assert_eq!(local.epoch, 1);
}

#[test]
fn a_revert_stays_when_an_older_record_of_the_same_epoch_arrives() {
    let mut local = decision(2);
    local.rollout_step = 1;
    local.reverted = Some(revert(1));
    let mut fleet = decision(2);
    fleet.rollout_step = 2;
    assert_eq!(merge(&mut local, &record(&fleet, "b")), Merged::Merged);
    assert!(local.reverted.is_some(), "the replica's own revert is kept");
    assert_eq!(local.rollout_step, 2, "the fleet's step");
    let w = merge_publish(Some(&record(&fleet, "b")), &record(&local, "a"));
    let w = w.expect("the revert is added to the record");
    assert!(w.reverted.is_some());
    assert_eq!(w.last, Change::Revert);
    assert_eq!(w.rollout_step, 2);
}

#[test]
fn concurrent_reverts_write_once() {
    let base = record(&decision(0), "x");
    let mut a = decision(0);
    a.reverted = Some(revert(1));
    let mut b = decision(0);
    b.reverted = Some(revert(2));
    let first = merge_publish(Some(&base), &record(&a, "a")).expect("first revert written");
    assert_eq!(merge_publish(Some(&first), &record(&b, "b")), None);
}

#[test]
fn older_epochs_and_other_identities_are_ignored() {
    let mut local = decision(3);
    let old = record(&decision(2), "b");
    assert_eq!(merge(&mut local, &old), Merged::Ignored);
    let mut other = decision(9);
    other.canary_identity = 8;
    assert_eq!(merge(&mut local, &record(&other, "b")), Merged::Ignored);
    // A store behind the replica (restored from a backup) is told.
    let w = merge_publish(Some(&old), &record(&local, "a")).expect("newer epoch published");
    assert_eq!(w.epoch, 3);
}

#[test]
fn proposals_check_the_record_they_are_written_over() {
    let local = record(&decision(0), "a");
    let mut reverted = local.clone();
    reverted.reverted = Some(revert(1));
    assert_eq!(
        propose(
            Some(&reverted),
            &local,
            Proposal::Operator(Action::Promote),
            None,
            "a",
            5
        ),
        Err(Rejected::PromoteReverted)
    );
    let step = Proposal::Step {
        epoch: 0,
        from: 0,
        steps: 3,
    };
    assert_eq!(
        propose(Some(&reverted), &local, step, None, "a", 5),
        Err(Rejected::Stale)
    );
    let stepped = propose(Some(&local), &local, step, None, "a", 5).expect("step");
    assert_eq!((stepped.rollout_step, stepped.step_started_ms), (1, 5));
    // A second replica's proposal of the same step is stale.
    assert_eq!(
        propose(Some(&stepped), &local, step, None, "b", 6),
        Err(Rejected::Stale)
    );
    let reset = propose(
        Some(&reverted),
        &local,
        Proposal::Operator(Action::Reset),
        Some("alice: v2 fixed"),
        "b",
        7_000,
    )
    .expect("reset");
    assert_eq!((reset.epoch, reset.reverted.is_none()), (1, true));
    // The record says who reset it and why, for every replica.
    assert_eq!(
        reset.last_action,
        Some(OperatorNote {
            action: Action::Reset,
            said: Some("alice: v2 fixed".into()),
            at_unix: 7,
        })
    );
    // A step keeps the last operator's note; it is no action of theirs.
    let after = propose(
        Some(&reset),
        &local,
        Proposal::Step {
            epoch: 1,
            from: 0,
            steps: 3,
        },
        None,
        "a",
        8_000,
    )
    .expect("step after the reset");
    assert_eq!(after.last_action, reset.last_action);
    assert_eq!(
        propose(
            None,
            &local,
            Proposal::Operator(Action::Revert),
            None,
            "a",
            1
        ),
        Err(Rejected::NotAProposal)
    );
}

/// One step of a fleet of three replicas sharing a store.
#[derive(Clone, Debug)]
enum Op {
    /// Replica `i`'s judge reverts (only if not reverted already).
    Revert(usize),
    /// Replica `i` publishes its decision.
    Publish(usize),
    /// Replica `i` proposes an operator action or a step.
    Propose(usize, u8),
    /// Replica `i` applies the next store write it has not seen.
    Deliver(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3usize).prop_map(Op::Revert),
        (0..3usize).prop_map(Op::Publish),
        (0..3usize, 0..5u8).prop_map(|(i, a)| Op::Propose(i, a)),
        (0..3usize).prop_map(Op::Deliver),
    ]
}

struct Fleet {
    replicas: Vec<RouteDecision>,
    seen: Vec<usize>,
    log: Vec<FleetRecord>,
}

impl Fleet {
    fn store(&self) -> Option<&FleetRecord> {
        self.log.last()
    }

    fn write(&mut self, r: FleetRecord) {
        // Within an epoch, a revert is never undone by a write.
        if let Some(c) = self.store() {
            if c.epoch == r.epoch && c.reverted.is_some() {
                assert!(
                    r.reverted.is_some(),
                    "a write undid a revert: {c:?} -> {r:?}"
                );
            }
            assert!(r.epoch >= c.epoch, "epochs only grow");
        }
        self.log.push(r);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Revert(i) => {
                let d = &mut self.replicas[i];
                if d.reverted.is_none() {
                    d.reverted = Some(revert(1));
                }
            }
            Op::Publish(i) => {
                let local = record(&self.replicas[i], &i.to_string());
                if let Some(w) = merge_publish(self.store(), &local) {
                    self.write(w);
                }
            }
            Op::Propose(i, a) => {
                let d = &self.replicas[i];
                let p = match a {
                    0 => Proposal::Operator(Action::Reset),
                    1 => Proposal::Operator(Action::Pause),
                    2 => Proposal::Operator(Action::Resume),
                    3 => Proposal::Operator(Action::Promote),
                    _ => Proposal::Step {
                        epoch: d.epoch,
                        from: d.rollout_step,
                        steps: 4,
                    },
                };
                let local = record(d, &i.to_string());
                if let Ok(w) = propose(self.store(), &local, p, None, &i.to_string(), 0) {
                    self.write(w);
                }
            }
            Op::Deliver(i) => {
                if let Some(r) = self.log.get(self.seen[i]).cloned() {
                    self.seen[i] += 1;
                    merge(&mut self.replicas[i], &r);
                }
            }
        }
    }
}

proptest! {
    /// Whatever the interleaving of local reverts, publishes, proposals
    /// and deliveries, once every replica has published and read every
    /// write, all replicas decide what the store says; a replica's revert
    /// is lost only to a reset that came after it.
    #[test]
    fn the_fleet_converges_and_keeps_reverts(ops in proptest::collection::vec(op(), 0..60)) {
        let mut f = Fleet {
            replicas: vec![decision(0); 3],
            seen: vec![0; 3],
            log: Vec::new(),
        };
        for op in &ops {
            f.apply(op);
        }
        let reverted_at: Vec<Option<u64>> = f
            .replicas
            .iter()
            .map(|d| d.reverted.as_ref().map(|_| d.epoch))
            .collect();
        for _ in 0..2 {
            for i in 0..3 {
                f.apply(&Op::Publish(i));
                while f.seen[i] < f.log.len() {
                    f.apply(&Op::Deliver(i));
                }
            }
        }
        let store = f.store().cloned();
        for (i, d) in f.replicas.iter().enumerate() {
            let mine = record(d, "");
            match &store {
                Some(s) => prop_assert!(s.same_decision(&mine), "replica {i}: {d:?} vs {s:?}"),
                None => prop_assert_eq!(d, &decision(0)),
            }
            if let (Some(epoch), Some(s)) = (reverted_at[i], &store) {
                prop_assert!(
                    s.reverted.is_some() || s.epoch > epoch,
                    "replica {}'s revert at epoch {} was lost: {:?}", i, epoch, s
                );
            }
        }
    }
}

#[test]
fn a_pool_is_collected_only_when_its_judging_is_over_and_was_long_enough_ago() {
    let keep = std::time::Duration::from_secs(3600);
    let hour = 3_600_000;
    let at = |d: &RouteDecision, ms: u64| FleetRecord::of(d, 0, "r1", Change::Sync, ms);
    let live = at(&decision(0), 1_000);
    // A canary still judged keeps its pool however old the record.
    assert!(!pool_finished(&live, 0, 1_000 + 100 * hour, keep));
    let mut d = decision(0);
    d.reverted = Some(revert(1));
    let rev = at(&d, 1_000);
    assert!(!pool_finished(&rev, 0, 1_000 + hour - 1, keep), "too soon");
    assert!(pool_finished(&rev, 0, 1_000 + hour, keep));
    // A later epoch's pool (after a reset) is not the reverted one.
    assert!(!pool_finished(&rev, 1, 1_000 + 2 * hour, keep));
    let mut p = decision(0);
    p.promoted = true;
    assert!(pool_finished(&at(&p, 0), 0, hour, keep));
    // Reset to epoch 2: the pools of epochs 0 and 1 are over, epoch 2's
    // is live.
    let reset = at(&decision(2), 5);
    assert!(pool_finished(&reset, 0, 5 + hour, keep));
    assert!(pool_finished(&reset, 1, 5 + hour, keep));
    assert!(!pool_finished(&reset, 2, 5 + 100 * hour, keep));
    // A decider's clock ahead of ours counts as "not yet".
    assert!(!pool_finished(&rev, 0, 0, keep));
}

#[test]
fn the_later_operator_note_wins_whichever_side_has_it() {
    let note = |action, at_unix| OperatorNote {
        action,
        said: Some(format!("{action:?} at {at_unix}")),
        at_unix,
    };
    // A replica's own revert (at 20), not yet in the store, against the
    // store's older pause (at 10): the revert's note stays, and goes out
    // with the revert.
    let mut local = decision(0);
    local.reverted = Some(revert(20));
    local.last_action = Some(note(Action::Revert, 20));
    let mut store = record(&decision(0), "b");
    store.paused = true;
    store.last_action = Some(note(Action::Pause, 10));
    let published = merge_publish(Some(&store), &record(&local, "a")).expect("the revert");
    assert_eq!(published.last_action, local.last_action);
    assert_eq!(merge(&mut local, &store), Merged::Merged);
    assert_eq!(local.last_action, Some(note(Action::Revert, 20)));
    // A newer action in the store replaces the replica's older note.
    store.last_action = Some(note(Action::Resume, 30));
    assert_eq!(merge(&mut local, &store), Merged::Merged);
    assert_eq!(local.last_action, Some(note(Action::Resume, 30)));
}
