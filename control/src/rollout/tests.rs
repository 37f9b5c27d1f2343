use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::config::Config;

/// A route from config text: `mode`, an optional rollout, canary `version`
/// (None: no canary).
fn route(mode: &str, rollout: bool, version: Option<&str>) -> Route {
    let mut text = String::from(
        "[[route]]\nname = \"web\"\n[route.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n",
    );
    if let Some(v) = version {
        text.push_str(&format!(
            "[route.canary]\nversion = \"{v}\"\nendpoints = [\"127.0.0.1:2\"]\nweight = 10\n"
        ));
    }
    text.push_str(&format!("[route.judge]\nmode = \"{mode}\"\n"));
    if rollout {
        text.push_str("[route.rollout]\nsteps = [1, 5, 25, 100]\nhold = \"60s\"\n");
    }
    let config = Config::parse(&text, Path::new(".")).expect("valid config");
    (*config.routes[0]).clone()
}

fn at(secs: u64) -> Now {
    Now::new(Duration::from_secs(secs), (1_700_000_000 + secs) * 1000)
}

fn verdict(status: Status) -> Verdict {
    Verdict {
        status,
        guard: (status == Status::Breach).then_some(Guard::ErrorRateRatio),
        reason: format!("{status:?}"),
    }
}

fn fresh(r: &Route) -> RouteControl {
    RouteControl::new(r, None, at(0)).0
}

#[test]
fn a_breach_reverts_only_when_enforcing_unpaused_and_in_traffic() {
    // (mode, paused, weight bp, reverts)
    let table = [
        ("enforce", false, 1000, true),
        ("enforce", true, 1000, false),
        ("enforce", false, 0, false),
        ("observe", false, 1000, false),
        ("off", false, 1000, false),
    ];
    for (mode, paused, w, reverts) in table {
        let r = route(mode, false, Some("v2"));
        let mut c = fresh(&r);
        if paused {
            c.on_action(&r, Action::Pause, at(1)).expect("pause");
        }
        let out = c.on_verdict(&r, verdict(Status::Breach), w, at(2));
        let reverted = out
            .events
            .iter()
            .any(|e| matches!(e, Event::Reverted { .. }));
        assert_eq!(reverted, reverts, "{mode} paused={paused} w={w}");
        assert_eq!(c.decision().reverted.is_some(), reverts);
        assert_eq!(out.changed, reverts);
        let label = match (reverts, mode) {
            (true, _) => Label::Reverted,
            (false, "observe") => Label::ObserveBreach,
            _ => Label::Breach,
        };
        assert_eq!(c.label(), label, "{mode} paused={paused} w={w}");
        assert_eq!(c.effective_bp(&r), if reverts { 0 } else { 1000 });
    }
}

#[test]
fn a_revert_records_its_guard_reason_and_time_once() {
    let r = route("enforce", false, Some("v2"));
    let mut c = fresh(&r);
    let out = c.on_verdict(&r, verdict(Status::Breach), 1000, at(5));
    assert_eq!(
        out.events,
        vec![
            Event::DeploymentEnded {
                result: DeploymentResult::Reverted,
            },
            Event::Reverted {
                guard: Guard::ErrorRateRatio,
                reason: "Breach".into(),
                weight_before_bp: 1000,
            },
            Event::VerdictChanged {
                from: Label::InsufficientData,
                to: Label::Reverted,
                reason: "Breach".into(),
            },
        ]
    );
    let rev = c.decision().reverted.clone().expect("reverted");
    assert_eq!(
        (rev.guard, rev.at_unix),
        (Guard::ErrorRateRatio, at(5).unix)
    );
    // A second breach, or healthy verdicts, change nothing.
    let again = c.on_verdict(&r, verdict(Status::Breach), 0, at(6));
    assert_eq!(again, Output::default());
    c.on_verdict(&r, verdict(Status::Healthy), 0, at(7));
    assert_eq!(c.decision().reverted, Some(rev));
    assert_eq!(c.label(), Label::Reverted);
}

#[test]
fn the_rollout_advances_after_an_unbroken_healthy_hold() {
    let r = route("enforce", true, Some("v2"));
    let mut c = fresh(&r);
    assert_eq!(c.effective_bp(&r), 100);
    let healthy = |c: &mut RouteControl, s| c.on_verdict(&r, verdict(Status::Healthy), 100, at(s));
    // Healthy from 10 s; at 69 s not yet held 60 s.
    for s in 10..70 {
        assert!(!healthy(&mut c, s).changed, "advanced at {s}");
    }
    let out = healthy(&mut c, 70);
    assert!(out.changed);
    assert!(out.events.contains(&Event::RolloutAdvanced {
        step: 1,
        weight_bp: 500,
        held: Duration::from_secs(60),
    }));
    assert_eq!(c.effective_bp(&r), 500);
    // The next step's hold counts from the step.
    assert!(!healthy(&mut c, 129).changed);
    // An insufficient_data tick restarts the run.
    c.on_verdict(&r, verdict(Status::InsufficientData), 500, at(130));
    assert!(!healthy(&mut c, 131).changed);
    assert!(!healthy(&mut c, 190).changed);
    assert!(healthy(&mut c, 191).changed);
    assert_eq!(c.effective_bp(&r), 2500);
}

#[test]
fn paused_promoted_or_reverted_routes_do_not_advance() {
    let r = route("enforce", true, Some("v2"));
    for action in [Action::Pause, Action::Promote, Action::Revert] {
        let mut c = fresh(&r);
        c.on_action(&r, action, at(0)).expect("action");
        for s in 0..200 {
            let out = c.on_verdict(&r, verdict(Status::Healthy), 100, at(s));
            assert!(!out
                .events
                .iter()
                .any(|e| matches!(e, Event::RolloutAdvanced { .. })));
        }
        assert_eq!(c.decision().rollout_step, 0, "{action:?}");
    }
}

#[test]
fn an_operators_revert_says_who_asked_and_why() {
    let r = route("enforce", false, Some("v2"));
    let mut c = fresh(&r);
    c.on_action_said(&r, Action::Revert, Some("alice: p99 doubled"), at(1))
        .expect("revert");
    assert_eq!(
        c.decision().reverted.as_ref().map(|r| r.reason.as_str()),
        Some("revert requested by alice: p99 doubled")
    );
    // A second revert keeps the first one's record.
    c.on_action_said(&r, Action::Revert, Some("bob"), at(2))
        .expect("revert");
    assert_eq!(
        c.decision().reverted.as_ref().map(|r| r.reason.as_str()),
        Some("revert requested by alice: p99 doubled")
    );
    let mut c = fresh(&r);
    c.on_action(&r, Action::Revert, at(1)).expect("revert");
    assert_eq!(
        c.decision().reverted.as_ref().map(|r| r.reason.as_str()),
        Some("revert requested by an operator")
    );
}

#[test]
fn the_last_operator_action_is_kept_with_who_and_why() {
    let r = route("enforce", false, Some("v2"));
    let mut c = fresh(&r);
    assert_eq!(c.decision().last_action, None);
    let out = c
        .on_action_said(&r, Action::Pause, Some("bob: load test at 14:00"), at(5))
        .expect("pause");
    assert!(matches!(
        out.events.last(),
        Some(Event::OperatorAction {
            effective: true,
            ..
        })
    ));
    let note = OperatorNote {
        action: Action::Pause,
        said: Some("bob: load test at 14:00".into()),
        at_unix: 1_700_000_005,
    };
    assert_eq!(c.decision().last_action.as_ref(), Some(&note));
    // A second pause changes nothing but who paused last; it is not
    // counted as effective.
    let out = c
        .on_action_said(&r, Action::Pause, Some("carol"), at(6))
        .expect("pause");
    assert!(matches!(
        out.events.last(),
        Some(Event::OperatorAction {
            effective: false,
            ..
        })
    ));
    assert_eq!(
        c.decision()
            .last_action
            .as_ref()
            .and_then(|n| n.said.as_deref()),
        Some("carol")
    );
    // Kept across a restart (the state file), gone with a new canary.
    let saved = serde_json::to_string(c.decision()).expect("json");
    let read: RouteDecision = serde_json::from_str(&saved).expect("read");
    assert_eq!(read.last_action, c.decision().last_action);
    let other = route("enforce", false, Some("v3"));
    c.on_config(&other, at(7));
    assert_eq!(c.decision().last_action, None);
}

#[test]
fn actions_and_their_refusals() {
    let r = route("enforce", false, Some("v2"));
    let mut c = fresh(&r);
    c.on_action(&r, Action::Promote, at(1)).expect("promote");
    assert_eq!(c.effective_bp(&r), 10_000);
    c.on_action(&r, Action::Revert, at(2)).expect("revert");
    assert_eq!(c.effective_bp(&r), 0);
    assert_eq!(
        c.decision().reverted.as_ref().map(|r| r.guard),
        Some(Guard::Operator)
    );
    let before = c.clone();
    assert_eq!(
        c.on_action(&r, Action::Promote, at(3)),
        Err(Refused::PromoteReverted("web".into()))
    );
    assert_eq!(c, before, "a refused action changes nothing");
    // A second revert is written down but is not a new revert.
    let out = c.on_action(&r, Action::Revert, at(4)).expect("revert");
    assert!(out.events.contains(&Event::OperatorAction {
        action: Action::Revert,
        effective: false,
        said: None,
    }));
    assert_eq!(c.decision().reverted, before.decision().reverted);
    c.on_action(&r, Action::Reset, at(5)).expect("reset");
    assert_eq!(c.effective_bp(&r), 1000);
    assert_eq!(c.label(), Label::InsufficientData);
    assert_eq!(c.last(), None);

    let plain = route("enforce", false, None);
    let mut c = fresh(&plain);
    assert_eq!(
        c.on_action(&plain, Action::Revert, at(1)),
        Err(Refused::NoCanary("web".into()))
    );
    assert_eq!(Action::parse("promote"), Some(Action::Promote));
    assert_eq!(Action::parse("delete"), None);
}

#[test]
fn a_new_canary_starts_afresh_and_a_reverted_one_named_again_stays_reverted() {
    let v2 = route("enforce", true, Some("v2"));
    let v3 = route("enforce", true, Some("v3"));
    let mut c = fresh(&v2);
    c.on_verdict(&v2, verdict(Status::Breach), 100, at(1));
    let out = c.on_config(&v3, at(2));
    assert!(out.changed);
    assert!(out.events.contains(&Event::NewIdentity {
        reverted_before: false,
        replaced: true
    }));
    assert_eq!(c.effective_bp(&v3), 100);
    assert_eq!(c.label(), Label::InsufficientData);
    let out = c.on_config(&v2, at(3));
    assert!(out.events.contains(&Event::NewIdentity {
        reverted_before: true,
        replaced: true
    }));
    assert_eq!(c.effective_bp(&v2), 0);
    assert_eq!(c.label(), Label::Reverted);
    // The same config again is no change at all.
    assert_eq!(c.on_config(&v2, at(4)), Output::default());
}

#[test]
fn a_persisted_decision_is_resumed() {
    let r = route("enforce", true, Some("v2"));
    let mut c = fresh(&r);
    c.on_action(&r, Action::Revert, at(1)).expect("revert");
    let saved = c.decision().clone();
    let (resumed, out) = RouteControl::new(&r, Some(saved.clone()), at(100));
    assert!(!out.changed);
    assert_eq!(resumed.decision(), &saved);
    assert_eq!(resumed.label(), Label::Reverted);
    assert!(out.events.iter().any(|e| matches!(
        e,
        Event::VerdictChanged {
            to: Label::Reverted,
            ..
        }
    )));
}

#[test]
fn each_deployment_ends_once_promoted_reverted_or_replaced() {
    let ended = |out: &Output| -> Vec<DeploymentResult> {
        out.events
            .iter()
            .filter_map(|e| match e {
                Event::DeploymentEnded { result } => Some(*result),
                _ => None,
            })
            .collect()
    };
    let v2 = route("enforce", false, Some("v2"));
    let v3 = route("enforce", false, Some("v3"));
    let v4 = route("enforce", false, Some("v4"));
    let mut c = fresh(&v2);
    // v2 promoted; a revert after that is not a second end.
    assert_eq!(
        ended(&c.on_action(&v2, Action::Promote, at(1)).expect("promote")),
        [DeploymentResult::Promoted]
    );
    assert!(ended(&c.on_action(&v2, Action::Revert, at(2)).expect("revert")).is_empty());
    // v3 replaces it: v2 had ended, nothing to report.
    assert!(ended(&c.on_config(&v3, at(3))).is_empty());
    // v4 replaces v3, which had not ended.
    assert_eq!(
        ended(&c.on_config(&v4, at(4))),
        [DeploymentResult::Replaced]
    );
    // v4 reverted by the judge, once.
    assert_eq!(
        ended(&c.on_verdict(&v4, verdict(Status::Breach), 1000, at(5))),
        [DeploymentResult::Reverted]
    );
    assert!(ended(&c.on_action(&v4, Action::Revert, at(6)).expect("revert")).is_empty());
    // A reset runs it again: a new deployment.
    c.on_action(&v4, Action::Reset, at(7)).expect("reset");
    assert_eq!(
        ended(&c.on_action(&v4, Action::Revert, at(8)).expect("revert")),
        [DeploymentResult::Reverted]
    );
}

#[test]
fn with_a_confirmation_gate_a_held_step_waits_for_a_yes() {
    let text = "[[route]]\nname = \"web\"\n[route.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n[route.canary]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:2\"]\nweight = 1\n[route.rollout]\nsteps = [1, 5, 100]\nhold = \"60s\"\nconfirm = \"http://127.0.0.1:9/gate\"\n";
    let r = Config::parse(text, Path::new("."))
        .expect("valid")
        .routes
        .remove(0);
    let mut c = fresh(&r);
    c.on_verdict(&r, verdict(Status::Healthy), 100, at(0));
    let out = c.on_verdict(&r, verdict(Status::Healthy), 100, at(60));
    assert!(out.events.contains(&Event::StepDue { epoch: 0, from: 0 }));
    assert_eq!(c.decision().rollout_step, 0, "not without the gate's yes");
    // A yes for another step, or after a revert, takes nothing.
    assert_eq!(c.take_step(&r, 0, 1, at(61)), Output::default());
    assert_eq!(c.take_step(&r, 1, 0, at(61)), Output::default());
    let out = c.take_step(&r, 0, 0, at(61));
    assert!(out.changed);
    assert!(matches!(
        out.events.first(),
        Some(Event::RolloutAdvanced {
            step: 1,
            weight_bp: 500,
            ..
        })
    ));
    assert_eq!(c.take_step(&r, 0, 0, at(62)), Output::default(), "once");
    c.on_action(&r, Action::Revert, at(63)).expect("revert");
    assert_eq!(c.take_step(&r, 0, 1, at(64)), Output::default());
}

#[test]
fn a_replica_waiting_for_its_fleet_sends_nothing_to_the_canary() {
    let r = route("enforce", false, Some("v2"));
    let mut c = fresh(&r);
    c.set_sharing(Sharing::Waiting);
    assert_eq!(c.effective_bp(&r), 0);
    assert!(c.canary_closed(&r));
    c.set_sharing(Sharing::Synced);
    assert_eq!(c.effective_bp(&r), 1000);
    assert!(!c.canary_closed(&r));
}

#[test]
fn a_canary_without_a_seat_gets_nothing_until_it_has_one() {
    let r = route("enforce", false, Some("v2"));
    let mut c = fresh(&r);
    c.set_sharing(Sharing::Synced);
    assert!(c.set_unseated(true));
    assert!(!c.set_unseated(true), "no change");
    assert_eq!(c.effective_bp(&r), 0);
    assert!(c.canary_closed(&r));
    assert!(c.set_unseated(false));
    assert_eq!(c.effective_bp(&r), 1000);
    assert!(!c.canary_closed(&r));
}

#[test]
fn in_a_fleet_a_held_step_is_proposed_and_taken_from_the_committed_record() {
    let r = route("enforce", true, Some("v2"));
    let mut c = fresh(&r);
    c.set_sharing(Sharing::Synced);
    c.on_verdict(&r, verdict(Status::Healthy), 100, at(0));
    let out = c.on_verdict(&r, verdict(Status::Healthy), 100, at(61));
    assert!(!out.changed, "a fleet replica does not step on its own");
    assert!(out.events.contains(&Event::StepDue { epoch: 0, from: 0 }));
    assert_eq!(c.decision().rollout_step, 0);

    // The committed step, as this replica wrote it: taken, announced.
    let mut rec = c.record("r1", Change::Step, at(61));
    rec.rollout_step = 1;
    rec.step_started_ms = at(61).unix_ms;
    let out = c.on_fleet(&r, &rec, true, at(61));
    assert!(out.changed);
    assert!(matches!(
        out.events.first(),
        Some(Event::RolloutAdvanced {
            step: 1,
            weight_bp: 500,
            ..
        })
    ));
    assert_eq!(c.effective_bp(&r), 500);
    // The same record again (the watch after the commit): nothing.
    assert_eq!(c.on_fleet(&r, &rec, true, at(62)), Output::default());

    // The fleet's step clock: a step another replica took 50 s ago needs
    // only 10 s more of health here (healthy here since 0).
    let mut rec2 = rec.clone();
    rec2.rollout_step = 2;
    rec2.step_started_ms = at(70).unix_ms;
    rec2.by = "r2".into();
    let out = c.on_fleet(&r, &rec2, false, at(120));
    assert!(matches!(
        out.events.first(),
        Some(Event::FleetApplied {
            change: Change::Step,
            ..
        })
    ));
    let due = |out: &Output| {
        out.events
            .iter()
            .any(|e| matches!(e, Event::StepDue { .. }))
    };
    assert!(!due(&c.on_verdict(
        &r,
        verdict(Status::Healthy),
        2500,
        at(121)
    )));
    assert!(!due(&c.on_verdict(
        &r,
        verdict(Status::Healthy),
        2500,
        at(129)
    )));
    let out = c.on_verdict(&r, verdict(Status::Healthy), 2500, at(130));
    assert!(out.events.contains(&Event::StepDue { epoch: 0, from: 2 }));
}

#[test]
fn a_fleet_reset_replaces_a_local_revert_and_a_fleet_revert_takes_the_canary_out() {
    let r = route("enforce", false, Some("v2"));
    let mut c = fresh(&r);
    c.set_sharing(Sharing::Synced);
    // Another replica's revert.
    let mut rec = c.record("r2", Change::Revert, at(1));
    rec.reverted = Some(crate::state::Revert {
        guard: Guard::ErrorRateTest,
        reason: "bad".into(),
        at_unix: 1,
    });
    let out = c.on_fleet(&r, &rec, false, at(2));
    assert!(out.changed);
    assert_eq!(c.effective_bp(&r), 0);
    assert_eq!(c.label(), Label::Reverted);
    // A reset from the fleet (a newer epoch): the canary is back, the
    // verdicts start over.
    let mut reset = rec.clone();
    reset.epoch = 1;
    reset.reverted = None;
    reset.last = Change::Reset;
    let out = c.on_fleet(&r, &reset, false, at(3));
    assert!(out
        .events
        .iter()
        .any(|e| matches!(e, Event::FleetApplied { reset: true, .. })));
    assert_eq!(c.effective_bp(&r), 1000);
    assert!(c.last().is_none());
    // A record of the old epoch arriving late changes nothing.
    assert_eq!(c.on_fleet(&r, &rec, false, at(4)), Output::default());
    assert_eq!(c.effective_bp(&r), 1000);
}

/// One input of the property tests.
#[derive(Clone, Debug)]
enum Input {
    Verdict(Status),
    Action(Action),
    /// The config names canary `c{0}` (0: no canary).
    Canary(u8),
    /// Time passes.
    Wait(u16),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        4 => prop_oneof![
            Just(Status::Healthy),
            Just(Status::InsufficientData),
            Just(Status::Breach)
        ]
        .prop_map(Input::Verdict),
        1 => prop::sample::select(Action::ALL.to_vec()).prop_map(Input::Action),
        1 => (0u8..4).prop_map(Input::Canary),
        2 => (0u16..120).prop_map(Input::Wait),
    ]
}

fn canary(n: u8, mode: &str) -> Route {
    route(mode, n > 0, (n > 0).then(|| format!("c{n}")).as_deref())
}

proptest! {
    /// No sequence of inputs sends traffic to a reverted canary identity
    /// without a `reset` of that identity.
    #[test]
    fn a_reverted_identity_gets_no_traffic_until_reset(inputs in prop::collection::vec(input(), 1..80)) {
        let mut r = canary(1, "enforce");
        let mut c = fresh(&r);
        let mut now = 0u64;
        let mut reverted: std::collections::HashSet<u64> = Default::default();
        for i in inputs {
            match i {
                Input::Verdict(s) => {
                    let w = c.effective_bp(&r);
                    c.on_verdict(&r, verdict(s), w, at(now));
                }
                Input::Action(a) => {
                    let _ = c.on_action(&r, a, at(now));
                    if a == Action::Reset {
                        reverted.remove(&canary_identity(&r));
                    }
                }
                Input::Canary(n) => {
                    r = canary(n, "enforce");
                    c.on_config(&r, at(now));
                }
                Input::Wait(s) => now += u64::from(s),
            }
            let id = canary_identity(&r);
            if c.decision().reverted.is_some() {
                reverted.insert(id);
            }
            if reverted.contains(&id) {
                prop_assert_eq!(c.effective_bp(&r), 0);
                prop_assert_eq!(c.label(), Label::Reverted);
            }
        }
    }

    /// A rollout step is taken only on a healthy verdict that ends an
    /// unbroken healthy run of at least `hold` on the current step.
    #[test]
    fn a_hold_never_completes_while_unhealthy(inputs in prop::collection::vec(input(), 1..120)) {
        let r = canary(1, "observe");
        let mut c = fresh(&r);
        let mut now = 0u64;
        // Start of the current healthy run on the current step.
        let mut run: Option<u64> = None;
        let mut step_at = 0u64;
        for i in inputs {
            let step = c.decision().rollout_step;
            match i {
                Input::Verdict(s) => {
                    let w = c.effective_bp(&r);
                    let out = c.on_verdict(&r, verdict(s), w, at(now));
                    let advanced = out.events.iter().any(|e| matches!(e, Event::RolloutAdvanced { .. }));
                    if s == Status::Healthy {
                        let start = *run.get_or_insert(now);
                        if advanced {
                            prop_assert!(now - start.max(step_at) >= 60);
                            step_at = now;
                        }
                    } else {
                        prop_assert!(!advanced);
                        run = None;
                    }
                }
                Input::Action(a) => {
                    if c.on_action(&r, a, at(now)).is_ok() && a == Action::Reset {
                        run = None;
                        step_at = now;
                    }
                }
                Input::Canary(_) => {}
                Input::Wait(s) => now += u64::from(s),
            }
            prop_assert!(c.decision().rollout_step <= step + 1);
        }
    }
}
