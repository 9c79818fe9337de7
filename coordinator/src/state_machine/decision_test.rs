//! Tests of decisions made on the leader and recorded by `apply()` (cluster versions 3 and 4).

use super::decision::{self, TriggerVerdict};
use super::*;
use crate::errors::CoordinatorError;
use crate::test_fleet::{Fleet, rollback_of};

/// A fleet at this binary's version with `web` deployed v1 then v2; the v2 change.
fn deployed() -> (Fleet, u64) {
    let mut harness = Fleet::with_web();
    harness.deploy_web("v1");
    let change = harness.deploy_web("v2");
    (harness, change)
}

/// A command as the harness would stamp its next one.
fn command(harness: &Fleet, kind: CommandKind) -> Command {
    Command {
        at_ms: 1_000 * (harness.index + 1),
        identity: "operator".into(),
        request_id: String::new(),
        audit_seed: String::new(),
        kind,
    }
}

fn trigger() -> CommandKind {
    CommandKind::AutoTrigger(AutoTrigger {
        service: "web".into(),
        environment: String::new(),
        source: TriggerSource::Alertmanager,
        reason: "error rate".into(),
        options: PlanOptions::default(),
        throttle: ThrottleLimits::default(),
        decided: None,
    })
}

/// Registers web-2 again, in region `us`.
fn move_web_2_to_us(fleet: &mut Fleet) {
    fleet.apply(CommandKind::RegisterHost {
        host_id: "web-2".into(),
        labels: Labels {
            region: "us".into(),
            ..Labels::default()
        },
        services: vec!["web".into()],
        agent_version: "test".into(),
    });
}

fn digest(state: &State) -> String {
    let mut state = state.clone();
    state.applied_index = 0;
    rewind_shared::digest::sha256_digest(&serde_json::to_vec(&state).unwrap())
}

#[test]
fn apply_records_the_leaders_plan_and_never_plans_again() {
    let (mut harness, change) = deployed();
    let mut start = command(&harness, rollback_of(change, Trigger::Manual));
    decision::prepare(&harness.state, &mut start).unwrap();
    // A plan the planner would not make (it reverts both hosts): apply must take it as given.
    let CommandKind::StartRollback(StartRollback {
        planned: Some(planned),
        ..
    }) = &mut start.kind
    else {
        panic!("the leader plans a rollback")
    };
    let plan = planned.plan.as_mut().unwrap();
    assert_eq!(plan.waves[0].hosts(), vec!["web-1", "web-2"]);
    plan.waves[0].batches = vec![vec!["web-1".into()]];
    plan.hash = crate::plan::plan_hash(plan);
    let Outcome::Rollback(number) = harness.run_prepared(start).unwrap() else {
        panic!("a rollback")
    };
    let hosts: std::collections::BTreeSet<&str> = harness.state.rollbacks[&number]
        .steps
        .iter()
        .map(|step| step.host_id.as_str())
        .collect();
    assert_eq!(hosts.into_iter().collect::<Vec<_>>(), vec!["web-1"]);
}

#[test]
fn a_decision_on_a_state_that_moved_is_refused_and_changes_nothing() {
    let (mut harness, change) = deployed();
    let mut start = command(&harness, rollback_of(change, Trigger::Manual));
    decision::prepare(&harness.state, &mut start).unwrap();
    let mut judged = command(&harness, trigger());
    decision::prepare(&harness.state, &mut judged).unwrap();
    // A host of the change moves region: the plan's waves would differ.
    move_web_2_to_us(&mut harness);
    let before = digest(&harness.state);
    for stale in [start, judged] {
        let refused = harness.run_prepared(stale).unwrap_err();
        assert!(
            matches!(refused, CoordinatorError::StaleDecision { .. }) && refused.is_retriable(),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("changed before it applied"),
            "{refused}"
        );
    }
    assert_eq!(digest(&harness.state), before);
    // Decided again on the state as it is, it applies.
    harness.must_start_rollback(change, Trigger::Manual);
}

#[test]
fn from_version_three_an_undecided_rollback_or_trigger_is_refused() {
    let (mut harness, change) = deployed();
    let before = digest(&harness.state);
    for undecided in [rollback_of(change, Trigger::Manual), trigger()] {
        let refused = harness.run_raw(undecided).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("the entry carries no decision"),
            "{refused}"
        );
    }
    assert_eq!(digest(&harness.state), before);
}

#[test]
fn before_version_three_a_decided_entry_is_refused_and_apply_plans_itself() {
    let mut harness = Fleet::legacy().web();
    harness.deploy_web("v1");
    let change = harness.deploy_web("v2");
    let mut start = command(&harness, rollback_of(change, Trigger::Manual));
    harness.state.cluster_version = 3;
    decision::prepare(&harness.state, &mut start).unwrap();
    harness.state.cluster_version = 0;
    let refused = harness.run_prepared(start).unwrap_err();
    assert!(
        matches!(
            refused,
            CoordinatorError::NeedsClusterVersion { needed: 3, .. }
        ),
        "{refused}"
    );
    // Undecided, as every member of a version-1 cluster proposes it, apply() plans it.
    harness.must_start_rollback(change, Trigger::Manual);
}

#[test]
fn the_leaders_trigger_verdict_is_recorded_as_given() {
    let (mut harness, _) = deployed();
    let mut judged = command(&harness, trigger());
    decision::prepare(&harness.state, &mut judged).unwrap();
    let CommandKind::AutoTrigger(AutoTrigger {
        decided: Some(decided),
        ..
    }) = &mut judged.kind
    else {
        panic!("the leader judges a trigger")
    };
    assert_eq!(decided.verdict, TriggerVerdict::Start);
    decided.verdict = TriggerVerdict::Ignored {
        why: "the leader saw no reason".into(),
    };
    let outcome = harness.run_prepared(judged).unwrap();
    assert!(
        matches!(&outcome, Outcome::Triggered { outcome: TriggerOutcome::Ignored, detail, .. }
            if detail == "the leader saw no reason"),
        "{outcome:?}"
    );
    assert!(harness.state.rollbacks.is_empty());
}

#[test]
fn the_leader_refuses_what_the_planner_refuses_and_nothing_reaches_the_log() {
    let (mut harness, change) = deployed();
    let logged = harness.log.len();
    let mut start = rollback_of(change, Trigger::Manual);
    if let CommandKind::StartRollback(StartRollback { plan_hash, .. }) = &mut start {
        *plan_hash = "sha256:not-the-plan".into();
    }
    let refused = harness.run(start).unwrap_err();
    assert!(
        matches!(refused, CoordinatorError::PlanChanged { .. }),
        "{refused}"
    );
    assert_eq!(harness.log.len(), logged);
}

#[test]
fn a_plan_that_does_not_match_its_own_hash_is_refused() {
    let (mut harness, change) = deployed();
    let mut start = command(&harness, rollback_of(change, Trigger::Manual));
    decision::prepare(&harness.state, &mut start).unwrap();
    if let CommandKind::StartRollback(StartRollback {
        planned: Some(planned),
        ..
    }) = &mut start.kind
    {
        planned.plan.as_mut().unwrap().waves[0].batches = vec![vec!["web-1".into()]];
    }
    let refused = harness.run_prepared(start).unwrap_err();
    assert!(refused.to_string().contains("its own hash"), "{refused}");
    assert!(harness.state.rollbacks.is_empty());
}

#[test]
fn an_approval_decided_on_a_state_that_moved_is_refused_and_the_request_stands() {
    let (mut harness, change) = deployed();
    harness.state.access.policy = Some(std::sync::Arc::new(
        crate::access::Policy::from_toml(
            "[[binding]]\nname = \"admins\"\nrole = \"admin\"\nidentities = [\"user:ada\"]\n\
             scopes = [\"*\"]\n\n[environment.default]\napprovals = 1\n",
        )
        .unwrap(),
    ));
    let Outcome::Request(request) = harness.apply(rollback_of(change, Trigger::Manual)) else {
        panic!("a request for approval")
    };
    let plan_hash = harness.state.approval_requests[&request].plan_hash.clone();
    let approve = CommandKind::DecideRequest(DecideRequest {
        request,
        decision: RequestDecision::Approve,
        plan_hash,
        reason: "looked at it".into(),
        baseline: None,
        planned: None,
    });
    let mut approval = Command {
        identity: "user:ada".into(),
        ..command(&harness, approve.clone())
    };
    decision::prepare(&harness.state, &mut approval).unwrap();
    // A host of the change moves region: the plan's waves would differ.
    move_web_2_to_us(&mut harness);
    let before = digest(&harness.state);
    let refused = harness.run_prepared(approval).unwrap_err();
    assert!(
        matches!(refused, CoordinatorError::StaleDecision { .. }),
        "{refused}"
    );
    assert_eq!(digest(&harness.state), before);
    assert_eq!(
        harness.state.approval_requests[&request].status,
        RequestStatus::Pending
    );
    // Decided again on the state as it is, the approval finds the plan changed: it lapses.
    let lapsed = harness.run_as("user:ada", "", approve).unwrap();
    assert!(
        matches!(&lapsed, Outcome::RequestRefused { why, .. } if why.contains("the plan changed")),
        "{lapsed:?}"
    );
    assert!(harness.state.rollbacks.is_empty());
}

/// A fleet at cluster `version` with web on three hosts, v1 deployed and v2 half way (see
/// [`Fleet::deploy_web_half_way`]); the v2 change.
fn half_deployed_at(version: u32, started: bool) -> (Fleet, u64) {
    let mut harness = Fleet::legacy().web();
    for step in 2..=version {
        harness.apply(CommandKind::SetClusterVersion {
            version: step,
            members: vec![],
            reason: "every member on this release".into(),
        });
    }
    harness.register_host("web-3", "web");
    let change = harness.deploy_web_half_way("v1", "v2", started);
    (harness, change)
}

fn activation(change: u64, host: &str) -> StepTarget {
    StepTarget::Activate {
        change,
        host_id: host.into(),
    }
}

#[test]
fn from_version_four_a_deploys_step_progress_does_not_stale_a_rollback_or_a_trigger() {
    for (version, stale, automatic) in [
        (3, true, false),
        (4, false, false),
        (3, true, true),
        (4, false, true),
    ] {
        let (mut harness, change) = half_deployed_at(version, true);
        let kind = if automatic {
            trigger()
        } else {
            rollback_of(change, Trigger::Manual)
        };
        let mut start = command(&harness, kind);
        decision::prepare(&harness.state, &mut start).unwrap();
        // The deploy goes on: web-2's activation, already under way, finishes (web-3's has not
        // begun, so the change is still deploying). The plan reverts web-2 either way.
        harness.apply(CommandKind::StepFinished {
            step: activation(change, "web-2"),
            ok: true,
            detail: "done".into(),
            snapshot_id: String::new(),
        });
        let outcome = harness.run_prepared(start);
        if stale {
            assert!(
                matches!(outcome, Err(CoordinatorError::StaleDecision { .. })),
                "version {version}: {outcome:?}"
            );
        } else if automatic {
            assert!(
                matches!(
                    outcome,
                    Ok(Outcome::Triggered {
                        outcome: TriggerOutcome::Started,
                        ..
                    })
                ),
                "version {version}: {outcome:?}"
            );
        } else {
            assert!(
                matches!(outcome, Ok(Outcome::Rollback(_))),
                "version {version}: {outcome:?}"
            );
        }
    }
}

#[test]
fn from_version_four_what_the_planner_reads_still_stales_a_decision() {
    let (mut harness, change) = half_deployed_at(4, false);
    let mut start = command(&harness, rollback_of(change, Trigger::Manual));
    decision::prepare(&harness.state, &mut start).unwrap();
    // web-2 begins to take the release: the plan would now revert it too.
    harness.apply(CommandKind::StepStarted {
        step: activation(change, "web-2"),
    });
    let refused = harness.run_prepared(start).unwrap_err();
    assert!(
        matches!(refused, CoordinatorError::StaleDecision { .. }),
        "{refused}"
    );
}

#[test]
fn a_plan_whose_options_change_on_their_way_through_the_log_still_starts() {
    // 0.9277233515696905 decodes as ...904 (serde_json's parser without float_roundtrip): the
    // leader decides on the decoded value, so the plan's hash holds on every member.
    let (mut harness, change) = deployed();
    let mut kind = rollback_of(change, Trigger::Manual);
    if let CommandKind::StartRollback(StartRollback { options, .. }) = &mut kind {
        options.gate.tolerance = 0.927_723_351_569_690_5;
    }
    let mut start = command(&harness, kind);
    decision::prepare(&harness.state, &mut start).unwrap();
    let outcome = harness.run_prepared(start);
    assert!(matches!(outcome, Ok(Outcome::Rollback(_))), "{outcome:?}");
}

#[test]
fn a_value_that_went_through_the_log_once_goes_through_again_unchanged() {
    // Deciding on the decoded command helps only if decoding what was decoded once gives it
    // back exactly.
    let mut value = 0.1_f64;
    for _ in 0..200_000 {
        value = (value * 1.618_033_988_749_895 + 0.000_123_456_789) % 1.0;
        let once: f64 = serde_json::from_str(&serde_json::to_string(&value).unwrap()).unwrap();
        let twice: f64 = serde_json::from_str(&serde_json::to_string(&once).unwrap()).unwrap();
        assert_eq!(once.to_bits(), twice.to_bits(), "{value:e}");
    }
}
