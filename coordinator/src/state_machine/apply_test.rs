//! Tests of `apply()`: feed commands, assert the state.
//!
//! Kept in one file (a little over 700 lines): the common paths of changes, steps and
//! rollbacks, whose helpers (`pass_gate`, `rollback_step`) the golden scenario shares; schema,
//! decision, refusal and approval tests live in files of their own.

use super::*;
use crate::errors::CoordinatorError;
use crate::test_fleet::{Fleet, release, rollback_of, start_change};

/// Passes the gate of `wave` (started and finished healthy).
pub(super) fn pass_gate(harness: &mut Fleet, rollback: u64, wave: u32) {
    harness.finish(StepTarget::Gate { rollback, wave }, true);
}

pub(super) fn rollback_step(rollback: u64, host: &str, kind: RollbackStepKind) -> StepTarget {
    StepTarget::Rollback {
        rollback,
        service: "web".into(),
        host_id: host.into(),
        kind,
    }
}

#[test]
fn a_change_moves_from_capture_to_deployed_and_records_snapshots() {
    let mut harness = Fleet::with_web();
    let first = harness.deploy_web("v1");
    let second = harness.deploy_web("v2");
    let change = &harness.state.changes[&second];
    assert_eq!(change.status, ChangeStatus::Deployed);
    assert_eq!(change.previous_version, "v1");
    assert!(change.hosts.iter().all(|host| host.snapshot_id == "snap-1"));
    assert_eq!(harness.state.changes[&first].previous_version, "");
    assert_eq!(current_version(&harness.state, "web"), "v2");
}

#[test]
fn a_failed_capture_fails_the_change_and_nothing_is_activated() {
    let mut harness = Fleet::with_web();
    let Outcome::Change(change) = harness.apply(start_change("v1")) else {
        panic!()
    };
    harness.finish(
        StepTarget::Capture {
            change,
            host_id: "web-1".into(),
        },
        false,
    );
    let record = &harness.state.changes[&change];
    assert_eq!(record.status, ChangeStatus::Failed);
    assert!(
        record.reason.contains("capture failed on web-1"),
        "{}",
        record.reason
    );
    let activate = StepTarget::Activate {
        change,
        host_id: "web-2".into(),
    };
    assert!(matches!(
        harness.run(CommandKind::StepStarted { step: activate }),
        Err(CoordinatorError::StepNotStartable { .. })
    ));
}

#[test]
fn a_rollback_that_verifies_every_host_succeeds_and_marks_the_change_rolled_back() {
    let mut harness = Fleet::with_web();
    harness.deploy_web("v1");
    let change = harness.deploy_web("v2");
    let rollback = harness.must_start_rollback(change, Trigger::Manual);
    for host in ["web-1", "web-2"] {
        for kind in RollbackStepKind::ALL {
            assert_eq!(
                harness.state.rollbacks[&rollback].status,
                RollbackStatus::Running
            );
            harness.finish(rollback_step(rollback, host, kind), true);
        }
    }
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Running,
        "the wave's gate has not passed yet"
    );
    pass_gate(&mut harness, rollback, 0);
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Succeeded
    );
    assert_eq!(
        harness.state.changes[&change].status,
        ChangeStatus::RolledBack
    );
    assert_eq!(current_version(&harness.state, "web"), "v1");
}

#[test]
fn a_failed_step_pauses_the_rollback_once_nothing_runs_and_names_the_host() {
    let mut harness = Fleet::with_web();
    let change = harness.deploy_web("v2");
    let rollback = harness.must_start_rollback(change, Trigger::Manual);
    for host in ["web-1", "web-2"] {
        harness.finish(rollback_step(rollback, host, RollbackStepKind::Drain), true);
    }
    harness.apply(CommandKind::StepStarted {
        step: rollback_step(rollback, "web-1", RollbackStepKind::Restore),
    });
    harness.apply(CommandKind::StepStarted {
        step: rollback_step(rollback, "web-2", RollbackStepKind::Restore),
    });
    harness.apply(CommandKind::StepFinished {
        step: rollback_step(rollback, "web-1", RollbackStepKind::Restore),
        ok: false,
        detail: "disk full".into(),
        snapshot_id: String::new(),
    });
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Running,
        "web-2 is still running"
    );
    harness.apply(CommandKind::StepFinished {
        step: rollback_step(rollback, "web-2", RollbackStepKind::Restore),
        ok: true,
        detail: String::new(),
        snapshot_id: String::new(),
    });
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Running,
        "web-2 began, so it is taken to the end of its steps"
    );
    harness.finish(
        rollback_step(rollback, "web-2", RollbackStepKind::Restart),
        true,
    );
    harness.finish(
        rollback_step(rollback, "web-2", RollbackStepKind::Verify),
        true,
    );
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Running,
        "web-2 still has to be undrained"
    );
    harness.finish(
        rollback_step(rollback, "web-2", RollbackStepKind::Undrain),
        true,
    );
    let record = &harness.state.rollbacks[&rollback];
    assert_eq!(record.status, RollbackStatus::Paused);
    assert_eq!(record.failed_hosts, vec!["web-1".to_string()]);
    assert!(record.paused_reason.contains("disk full"));
    assert_eq!(record.escalations.len(), 1);
    assert_eq!(
        harness.state.changes[&change].status,
        ChangeStatus::Deployed
    );
    // A person retries web-1: its failed step starts over with fresh attempts.
    harness.apply(CommandKind::ControlRollback {
        rollback,
        action: RollbackAction::Resume,
        reason: "disk cleaned".into(),
    });
    let record = &harness.state.rollbacks[&rollback];
    assert_eq!(record.status, RollbackStatus::Running);
    assert!(record.failed_hosts.is_empty());
    let restore = record
        .steps
        .iter()
        .find(|step| step.host_id == "web-1" && step.kind == RollbackStepKind::Restore)
        .unwrap();
    assert_eq!(
        (restore.progress.status, restore.progress.attempts),
        (StepStatus::Pending, 0)
    );
}

#[test]
fn skipping_every_host_of_a_wave_skips_its_gate_and_ends_the_rollback() {
    let mut harness = Fleet::with_web();
    let change = harness.deploy_web("v2");
    let rollback = harness.must_start_rollback(change, Trigger::Manual);
    for host in ["web-1", "web-2"] {
        harness.apply(CommandKind::SkipHost {
            rollback,
            host_id: host.into(),
            reason: "keep v2 there".into(),
        });
    }
    let record = &harness.state.rollbacks[&rollback];
    assert_eq!(record.status, RollbackStatus::Succeeded);
    assert_eq!(record.waves[0].gate.status, StepStatus::Skipped);
    assert!(
        record.outcome_detail.contains("web-1, web-2"),
        "{}",
        record.outcome_detail
    );
    let error = harness
        .run(CommandKind::SkipHost {
            rollback,
            host_id: "web-1".into(),
            reason: "again".into(),
        })
        .unwrap_err();
    assert!(
        matches!(error, CoordinatorError::RollbackNotControllable { .. }),
        "{error}"
    );
}

#[test]
fn a_rollback_refuses_a_plan_that_changed_since_it_was_shown() {
    let mut harness = Fleet::with_web();
    let change = harness.deploy_web("v2");
    let CommandKind::StartRollback(StartRollback {
        changes, options, ..
    }) = rollback_of(change, Trigger::Manual)
    else {
        unreachable!()
    };
    let shown = crate::plan::build(&harness.state, &changes, &options, Trigger::Manual)
        .unwrap()
        .hash;
    let wider = PlanOptions {
        max_parallel: 2,
        max_unavailable: 2,
        ..options.clone()
    };
    let error = harness
        .run(CommandKind::StartRollback(StartRollback {
            changes: changes.clone(),
            options: wider,
            plan_hash: shown.clone(),
            reason: "r".into(),
            trigger: Trigger::Manual,
            break_glass: false,
            planned: None,
        }))
        .unwrap_err();
    assert!(
        matches!(error, CoordinatorError::PlanChanged { .. }),
        "{error}"
    );
    harness.apply(CommandKind::StartRollback(StartRollback {
        changes,
        options,
        plan_hash: shown.clone(),
        reason: "r".into(),
        trigger: Trigger::Manual,
        break_glass: false,
        planned: None,
    }));
    assert_eq!(harness.state.rollbacks[&1].plan_hash, shown);
}

#[test]
fn only_one_automatic_rollback_per_change_and_none_while_one_runs() {
    let mut harness = Fleet::with_web();
    let change = harness.deploy_web("v2");
    let rollback = harness.must_start_rollback(change, Trigger::Automatic);
    let again = rollback_of(change, Trigger::Manual);
    assert!(matches!(
        harness.run(again.clone()),
        Err(CoordinatorError::RollbackInProgress { .. })
    ));
    harness.apply(CommandKind::ControlRollback {
        rollback,
        action: RollbackAction::Abort,
        reason: "operator".into(),
    });
    let automatic = rollback_of(change, Trigger::Automatic);
    assert!(matches!(
        harness.run(automatic),
        Err(CoordinatorError::AlreadyRolledBack { .. })
    ));
    // A person may retry after an abort.
    assert!(matches!(harness.run(again), Ok(Outcome::Rollback(2))));
}

#[test]
fn pause_resume_and_abort_follow_the_allowed_transitions() {
    let mut harness = Fleet::with_web();
    let change = harness.deploy_web("v2");
    let rollback = harness.must_start_rollback(change, Trigger::Manual);
    let control = |action| CommandKind::ControlRollback {
        rollback,
        action,
        reason: "r".into(),
    };
    assert!(harness.run(control(RollbackAction::Resume)).is_err());
    harness.apply(control(RollbackAction::Pause));
    let start = CommandKind::StepStarted {
        step: rollback_step(rollback, "web-1", RollbackStepKind::Restore),
    };
    assert!(
        harness.run(start).is_err(),
        "a paused rollback starts no step"
    );
    harness.apply(control(RollbackAction::Resume));
    harness.apply(control(RollbackAction::Abort));
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Aborted
    );
    assert!(matches!(
        harness.run(control(RollbackAction::Pause)),
        Err(CoordinatorError::RollbackNotControllable { .. })
    ));
}

#[test]
fn rejected_commands_change_nothing_but_the_applied_index() {
    let mut harness = Fleet::with_web();
    let change = harness.deploy_web("v2");
    let rejected = [
        start_change("v9"),
        CommandKind::StartChange(StartChange {
            break_glass: false,
            service: "nope".into(),
            version: "v1".into(),
            host_ids: vec![],
            reason: String::new(),
            baseline: HealthAggregate::default(),
            flags_on: vec![],
            migrations: vec![],
        }),
        CommandKind::StartChange(StartChange {
            break_glass: false,
            service: "web".into(),
            version: "v1".into(),
            host_ids: vec!["ghost".into()],
            reason: String::new(),
            baseline: HealthAggregate::default(),
            flags_on: vec![],
            migrations: vec![],
        }),
        CommandKind::RegisterRelease {
            release: release("v1", 'b'),
        },
        rollback_of(99, Trigger::Manual),
        CommandKind::StepFinished {
            step: StepTarget::Capture {
                change,
                host_id: "web-1".into(),
            },
            ok: true,
            detail: String::new(),
            snapshot_id: String::new(),
        },
        CommandKind::PutService {
            service: ServiceRecord {
                rto_s: 0,
                freeze: Vec::new(),
                drift_policy: Default::default(),
                isolate_after_failures: 0,
                name: "db".into(),
                depends_on: vec!["db".into()],
                policy: HealthPolicy::default(),
                synthetics: vec![],
                rollback_steps: Vec::new(),
            },
        },
    ];
    for kind in rejected {
        let before = harness.state.clone();
        let error = harness.run(kind.clone()).expect_err("rejected");
        let mut after = harness.state.clone();
        after.applied_index = before.applied_index;
        assert_eq!(after, before, "{kind:?} changed state ({error})");
    }
}

#[test]
fn errors_name_what_is_known() {
    let mut harness = Fleet::with_web();
    let error = harness.run(start_change("v9")).unwrap_err().to_string();
    assert_eq!(
        error,
        "no release v9 of service web: known versions are v1, v2"
    );
    let rollback = rollback_of(7, Trigger::Manual);
    assert_eq!(
        harness.run(rollback).unwrap_err().to_string(),
        "no change ch-7: known changes are none"
    );
}

#[test]
fn a_repeated_request_id_returns_the_first_outcome_and_acts_once() {
    let mut harness = Fleet::with_web();
    let first = harness
        .run_as("operator", "req-1", start_change("v1"))
        .unwrap();
    let audit_len = harness.state.audit.len();
    let second = harness
        .run_as("operator", "req-1", start_change("v1"))
        .unwrap();
    assert_eq!(first, second);
    assert_eq!(harness.state.changes.len(), 1);
    assert_eq!(harness.state.audit.len(), audit_len);
    // Another client's request id does not collide.
    let other = harness.run_as("someone-else", "req-1", start_change("v1"));
    assert!(matches!(
        other,
        Err(CoordinatorError::ChangeInProgress { .. })
    ));
}

#[test]
fn every_applied_command_is_audited_with_identity_and_the_chain_verifies() {
    let mut harness = Fleet::with_web();
    harness.deploy_web("v1");
    let entries = harness.state.audit.entries();
    assert_eq!(entries.len() as u64, harness.index);
    assert!(entries.iter().any(|entry| entry.action == "change.start"
        && entry.identity == "operator"
        && entry.target == "ch-1"));
    assert_eq!(harness.state.audit.verify().first_broken, None);
}

#[test]
fn dependency_cycles_are_refused_with_the_path() {
    let mut harness = Fleet::new();
    let service = |name: &str, depends_on: &[&str]| CommandKind::PutService {
        service: ServiceRecord {
            rto_s: 0,
            freeze: Vec::new(),
            drift_policy: Default::default(),
            isolate_after_failures: 0,
            name: name.into(),
            depends_on: depends_on.iter().map(|name| name.to_string()).collect(),
            policy: HealthPolicy::default(),
            synthetics: vec![],
            rollback_steps: Vec::new(),
        },
    };
    harness.apply(service("api", &["db"]));
    harness.apply(service("web", &["api"]));
    let error = harness
        .run(service("db", &["web"]))
        .unwrap_err()
        .to_string();
    assert_eq!(
        error,
        "service db would depend on itself through db -> web -> api -> db"
    );
}

#[test]
fn only_the_latest_change_may_be_rolled_back_and_no_change_starts_during_a_rollback() {
    let mut harness = Fleet::with_web();
    let first = harness.deploy_web("v1");
    let second = harness.deploy_web("v2");
    let older = rollback_of(first, Trigger::Manual);
    let error = harness.run(older).unwrap_err().to_string();
    assert_eq!(
        error,
        "change ch-1 is not the latest change of web (ch-2 is): roll back ch-2 first"
    );
    harness.must_start_rollback(second, Trigger::Manual);
    let error = harness.run(start_change("v1")).unwrap_err();
    assert!(
        matches!(error, CoordinatorError::RollbackInProgress { .. }),
        "{error}"
    );
}

#[test]
fn an_offline_self_revert_is_recorded_on_its_change_once_and_audited() {
    let mut harness = Fleet::with_web();
    harness.deploy_web("v1");
    let change = harness.deploy_web("v2");
    let note = SelfRevertNote {
        id: "sr-5000".into(),
        service: "web".into(),
        change_id: change_id(change),
        snapshot_id: "snap-1".into(),
        at_ms: 5_000,
        offline_since_ms: 1_000,
        ok: true,
        detail: "restore: restored snap-1".into(),
        evidence: "probes failing in 3 reports over 60 s".into(),
    };
    let report = || CommandKind::RecordSelfRevert {
        host_id: "web-1".into(),
        report: note.clone(),
    };
    harness
        .run_as("web-1", "self-revert/sr-5000", report())
        .unwrap();
    let host = &harness.state.changes[&change].hosts[0];
    assert_eq!(host.self_reverted.as_ref(), Some(&note));
    assert!(
        harness.state.changes[&change].hosts[1]
            .self_reverted
            .is_none()
    );
    // Sent again after a lost acknowledgement: the request log answers, nothing changes.
    let audited = harness.state.audit.len();
    harness
        .run_as("web-1", "self-revert/sr-5000", report())
        .unwrap();
    assert_eq!(harness.state.audit.len(), audited);
    let entry = harness.state.audit.entries().last().unwrap().clone();
    assert_eq!(entry.action, "host.self-revert");
    assert!(
        entry
            .readable_outcome()
            .contains("web-1 reverted ch-2 of web to snap-1 on its own"),
        "{}",
        entry.outcome
    );
    // The plan of a later fleet rollback says so.
    let plan = crate::plan::build(
        &harness.state,
        &[change],
        &PlanOptions::default(),
        Trigger::Manual,
    )
    .unwrap();
    assert!(
        plan.notes
            .iter()
            .any(|note| note.contains("already reverted by 1 host on their own")),
        "{:?}",
        plan.notes
    );
    // A host that is not registered cannot report one.
    let stranger = CommandKind::RecordSelfRevert {
        host_id: "db-9".into(),
        report: note,
    };
    assert!(harness.run_as("db-9", "", stranger).is_err());
}

#[test]
fn a_host_is_forgotten_only_when_nothing_can_still_act_on_it_by_name() {
    let forget = |host: &str| CommandKind::ForgetHost {
        host_id: host.into(),
        release_name: false,
        reason: "retired".into(),
    };
    let mut harness = Fleet::with_web();
    harness.deploy_web("v1");
    // The latest change of web could still be rolled back on web-2.
    let busy = harness.run(forget("web-2")).unwrap_err();
    assert!(
        busy.to_string()
            .contains("change ch-1 of web, which a rollback would still restore there"),
        "{busy}"
    );
    // A change leaving web-2 out: in progress, it holds web-1 only.
    let mut only_web_1 = start_change("v2");
    if let CommandKind::StartChange(StartChange { host_ids, .. }) = &mut only_web_1 {
        *host_ids = vec!["web-1".into()];
    }
    let Outcome::Change(change) = harness.apply(only_web_1) else {
        panic!("change outcome")
    };
    let busy = harness.run(forget("web-1")).unwrap_err();
    assert!(busy.to_string().contains("still in progress"), "{busy}");
    for target in [
        StepTarget::Capture {
            change,
            host_id: "web-1".into(),
        },
        StepTarget::Activate {
            change,
            host_id: "web-1".into(),
        },
    ] {
        harness.finish(target, true);
    }
    // Deployed, ch-2 could be rolled back on web-1.
    let busy = harness.run(forget("web-1")).unwrap_err();
    assert!(
        busy.to_string().contains(&format!(
            "change {} of web, which a rollback would still restore",
            change_id(change)
        )),
        "{busy}"
    );
    let rollback = harness.must_start_rollback(change, Trigger::Manual);
    let busy = harness.run(forget("web-1")).unwrap_err();
    assert!(busy.to_string().contains(&rollback_id(rollback)), "{busy}");
    // ch-1 can no longer be rolled back (ch-2 is the latest on its hosts), so nothing would act
    // on web-2, which died before ch-2: it is forgotten.
    harness.apply(forget("web-2"));
    harness.apply(CommandKind::ControlRollback {
        rollback,
        action: RollbackAction::Abort,
        reason: "enough".into(),
    });

    // A host only the earlier, rolled-back history names is forgotten.
    let mut harness = Fleet::with_web();
    let first = harness.deploy_web("v1");
    let rollback = harness.must_start_rollback(first, Trigger::Manual);
    for host in ["web-1", "web-2"] {
        for kind in RollbackStepKind::ALL {
            harness.finish(rollback_step(rollback, host, kind), true);
        }
    }
    pass_gate(&mut harness, rollback, 0);
    assert_eq!(
        harness.state.changes[&first].status,
        ChangeStatus::RolledBack
    );
    harness.state.enrollments.insert(
        "web-2".into(),
        Enrollment {
            environment: "prod".into(),
            token: 1,
            at_ms: 1,
        },
    );
    let Outcome::HostForgotten {
        services,
        name_released,
    } = harness.apply(forget("web-2"))
    else {
        panic!("forgotten")
    };
    assert_eq!((services, name_released), (vec!["web".to_string()], false));
    assert!(!harness.state.hosts.contains_key("web-2"));
    assert!(
        harness.state.enrollments.contains_key("web-2"),
        "the name stays pinned unless released"
    );
    let entries = harness.state.audit.entries();
    let last = entries.last().unwrap();
    assert_eq!(last.action, "host.forget");
    let outcome = last.readable_outcome();
    assert!(outcome.contains("services web") && outcome.contains("retired"));
    // Finished changes keep their record of the host.
    assert!(
        harness.state.changes[&first]
            .hosts
            .iter()
            .any(|host| host.host_id == "web-2")
    );
    // Only the enrollment is left: released on request.
    assert!(matches!(
        harness.run(forget("web-2")),
        Err(CoordinatorError::UnknownHost { .. })
    ));
    let released = harness.apply(CommandKind::ForgetHost {
        host_id: "web-2".into(),
        release_name: true,
        reason: "retired".into(),
    });
    assert!(matches!(
        released,
        Outcome::HostForgotten {
            name_released: true,
            ..
        }
    ));
    assert!(!harness.state.enrollments.contains_key("web-2"));
}

#[test]
fn version_2_commands_are_refused_at_version_1_and_applied_after_it_is_raised() {
    let mut harness = Fleet::with_web();
    harness.state.cluster_version = 0; // a cluster from before versions
    let forget = CommandKind::ForgetHost {
        host_id: "web-1".into(),
        release_name: false,
        reason: "retired".into(),
    };
    let refused = harness.run(forget.clone()).unwrap_err();
    assert!(
        matches!(
            refused,
            CoordinatorError::NeedsClusterVersion {
                needed: 2,
                running: 1,
                ..
            }
        ),
        "{refused}"
    );
    // At version 1 a host may still register new services (as that release allowed).
    harness.apply(CommandKind::RegisterHost {
        host_id: "web-1".into(),
        labels: Labels::default(),
        services: vec!["web".into(), "payments".into()],
        agent_version: "test".into(),
    });
    let raise = |version| CommandKind::SetClusterVersion {
        version,
        members: vec![],
        reason: "upgraded".into(),
    };
    // Refused if the members asked are not the registry's (one joined in between).
    let stale = harness
        .run(CommandKind::SetClusterVersion {
            version: 2,
            members: vec![4],
            reason: "upgraded".into(),
        })
        .unwrap_err();
    assert!(stale.to_string().contains("the members changed"), "{stale}");
    assert_eq!(harness.state.cluster_version(), 1);
    harness.apply(raise(2));
    assert_eq!(harness.state.cluster_version(), 2);
    let entries = harness.state.audit.entries();
    let last = entries.last().unwrap();
    assert_eq!(last.action, "cluster.upgrade-finalize");
    assert!(last.outcome.contains("1 -> 2"), "{}", last.outcome);
    assert!(harness.run(raise(2)).is_err(), "a version is only raised");
    // At version 2 the pin holds in apply() too.
    let pinned = harness
        .run(CommandKind::RegisterHost {
            host_id: "web-2".into(),
            labels: Labels::default(),
            services: vec!["web".into(), "payments".into()],
            agent_version: "test".into(),
        })
        .unwrap_err();
    assert!(
        pinned.to_string().contains("may not add payments"),
        "{pinned}"
    );
}
