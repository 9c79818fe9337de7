//! Tests of automatic rollback requests: what starts, what is ignored, and each throttle
//! (cooldown, flapping, budget per environment, global breaker), with the escalations they open.

use crate::errors::CoordinatorError;
use crate::state_machine::*;
use crate::test_fleet::Fleet;

/// Throttles tight enough to reach in a few commands.
fn throttle() -> ThrottleLimits {
    ThrottleLimits {
        budget: 2,
        budget_window_s: 3600,
        cooldown_s: 600,
        flap_rollbacks: 3,
        flap_window_s: 86_400,
        breaker_services: 3,
        breaker_window_s: 60,
    }
}

/// Services `a`..`e`, one host each; `a`..`c` in prod, `d`, `e` in staging; each deployed v1.
fn fleet() -> Fleet {
    let mut fleet = Fleet::new();
    for (service, environment) in [
        ("a", "prod"),
        ("b", "prod"),
        ("c", "prod"),
        ("d", "staging"),
        ("e", "staging"),
    ] {
        fleet.service(service, &[]);
        fleet.host_in(&format!("{service}-1"), "eu", environment, &[service]);
        fleet.release(service, "v1", 0, &[]);
        fleet.release(service, "v2", 0, &[]);
        fleet.deploy(service, "v1");
    }
    fleet
}

fn ask(fleet: &mut Fleet, at_ms: u64, service: &str) -> (TriggerOutcome, String) {
    let environment = match service {
        "d" | "e" => "staging",
        _ => "prod",
    };
    let outcome = fleet
        .apply_at(
            at_ms,
            CommandKind::AutoTrigger(AutoTrigger {
                service: service.into(),
                environment: environment.into(),
                source: TriggerSource::Alertmanager,
                reason: "HighErrorRate".into(),
                options: PlanOptions::default(),
                throttle: throttle(),
                decided: None,
            }),
        )
        .expect("a trigger of a known service applies");
    let Outcome::Triggered {
        outcome, detail, ..
    } = outcome
    else {
        panic!("a trigger outcome")
    };
    (outcome, detail)
}

/// Ends the service's running rollback as aborted so its change may be redeployed.
fn abort_running(fleet: &mut Fleet) {
    let running: Vec<u64> = fleet
        .state
        .rollbacks
        .values()
        .filter(|rollback| !rollback.status.is_terminal())
        .map(|rollback| rollback.number)
        .collect();
    for rollback in running {
        fleet.apply(CommandKind::ControlRollback {
            rollback,
            action: RollbackAction::Abort,
            reason: "test".into(),
        });
    }
}

#[test]
fn a_trigger_starts_a_rollback_once_and_repeats_are_ignored() {
    let mut fleet = fleet();
    fleet.deploy("a", "v2");
    let (outcome, detail) = ask(&mut fleet, 1_000_000, "a");
    assert_eq!(
        (outcome, detail.as_str()),
        (TriggerOutcome::Started, "started rb-1")
    );
    let rollback = &fleet.state.rollbacks[&1];
    assert_eq!(rollback.trigger, Trigger::Automatic);
    assert_eq!(rollback.reason, "HighErrorRate");
    let (outcome, detail) = ask(&mut fleet, 1_001_000, "a");
    assert_eq!(outcome, TriggerOutcome::Ignored);
    assert!(
        detail.contains("already being or was rolled back by rb-1"),
        "{detail}"
    );
    assert_eq!(fleet.state.trigger_totals["alertmanager/started"], 1);
    assert_eq!(fleet.state.trigger_totals["alertmanager/ignored"], 1);
    assert!(fleet.state.escalations.is_empty());
}

#[test]
fn an_unknown_service_is_refused_and_nothing_is_recorded() {
    let mut fleet = fleet();
    let error = fleet
        .apply_at(
            1_000,
            CommandKind::AutoTrigger(AutoTrigger {
                service: "nope".into(),
                environment: "prod".into(),
                source: TriggerSource::Webhook,
                reason: "x".into(),
                options: PlanOptions::default(),
                throttle: throttle(),
                decided: None,
            }),
        )
        .unwrap_err();
    assert!(
        matches!(error, CoordinatorError::UnknownService { .. }),
        "{error}"
    );
    assert!(fleet.state.triggers.is_empty());
}

#[test]
fn a_second_automatic_rollback_within_the_cooldown_is_throttled_and_escalated_once() {
    let mut fleet = fleet();
    fleet.deploy("a", "v2");
    assert_eq!(ask(&mut fleet, 1_000_000, "a").0, TriggerOutcome::Started);
    abort_running(&mut fleet);
    fleet.deploy("a", "v2");
    let (outcome, detail) = ask(&mut fleet, 1_100_000, "a");
    assert_eq!(outcome, TriggerOutcome::Throttled);
    assert!(detail.contains("within its 600 s cooldown"), "{detail}");
    assert_eq!(fleet.state.escalations.len(), 1);
    let escalation = fleet.state.escalations.values().next().unwrap();
    assert_eq!((escalation.rollback, escalation.service.as_str()), (0, "a"));
    // The same change asked about again: already refused, no second escalation.
    let (outcome, detail) = ask(&mut fleet, 1_200_000, "a");
    assert_eq!(outcome, TriggerOutcome::Ignored);
    assert!(detail.contains("already refused"), "{detail}");
    assert_eq!(fleet.state.escalations.len(), 1);
}

/// Rolls `a` back automatically three times, each past the cooldown and the budget window, and
/// deploys it again; the time of the next alert.
fn rolled_back_three_times(fleet: &mut Fleet) -> u64 {
    let mut at = 1_000_000;
    for _ in 0..3 {
        fleet.deploy("a", "v2");
        assert_eq!(ask(fleet, at, "a").0, TriggerOutcome::Started);
        abort_running(fleet);
        at += 4_000_000;
    }
    fleet.deploy("a", "v2");
    at
}

#[test]
fn a_service_rolled_back_again_and_again_is_flapping() {
    let mut fleet = fleet();
    let at = rolled_back_three_times(&mut fleet);
    let (outcome, detail) = ask(&mut fleet, at, "a");
    assert_eq!(outcome, TriggerOutcome::Throttled);
    assert!(
        detail.contains("a is flapping: rolled back 3 times"),
        "{detail}"
    );
}

#[test]
fn archived_rollbacks_still_count_towards_flapping() {
    let mut fleet = fleet();
    let at = rolled_back_three_times(&mut fleet);
    // The audit archived and pruned (cluster version 8): the ended rollbacks leave the state.
    let through = fleet.confirm_archive_all();
    fleet.apply(CommandKind::PruneAudit { through });
    assert_eq!(
        fleet.state.archived.rollbacks, 3,
        "{:?}",
        fleet.state.archived
    );
    let (outcome, detail) = ask(&mut fleet, at, "a");
    assert_eq!(outcome, TriggerOutcome::Throttled, "{detail}");
    assert!(
        detail.contains("a is flapping: rolled back 3 times"),
        "{detail}"
    );
}

#[test]
fn the_budget_is_per_environment() {
    let mut fleet = fleet();
    for service in ["a", "b", "c", "d"] {
        fleet.deploy(service, "v2");
    }
    // Spread out so the breaker does not trip.
    assert_eq!(ask(&mut fleet, 1_000_000, "a").0, TriggerOutcome::Started);
    assert_eq!(ask(&mut fleet, 1_100_000, "b").0, TriggerOutcome::Started);
    let (outcome, detail) = ask(&mut fleet, 1_200_000, "c");
    assert_eq!(outcome, TriggerOutcome::Throttled);
    assert!(
        detail.contains("budget of 2 automatic rollbacks per 3600 s in environment prod"),
        "{detail}"
    );
    assert_eq!(
        ask(&mut fleet, 1_300_000, "d").0,
        TriggerOutcome::Started,
        "staging has its own budget"
    );
}

#[test]
fn many_services_at_once_trip_the_breaker_until_a_person_resets_it() {
    let mut fleet = fleet();
    for service in ["a", "b", "d", "e"] {
        fleet.deploy(service, "v2");
    }
    assert_eq!(ask(&mut fleet, 1_000_000, "a").0, TriggerOutcome::Started);
    assert_eq!(ask(&mut fleet, 1_010_000, "d").0, TriggerOutcome::Started);
    let (outcome, detail) = ask(&mut fleet, 1_020_000, "e");
    assert_eq!(outcome, TriggerOutcome::Throttled);
    assert!(
        detail.contains("3 services asked for an automatic rollback within 60 s"),
        "{detail}"
    );
    assert_eq!(
        fleet.state.breaker.as_ref().unwrap().services,
        vec!["a", "d", "e"]
    );
    // Long after, still closed to automation: a person decides.
    let (outcome, detail) = ask(&mut fleet, 9_000_000, "b");
    assert_eq!(outcome, TriggerOutcome::Throttled);
    assert!(detail.contains("global breaker is open"), "{detail}");
    fleet.apply(CommandKind::ResetBreaker {
        reason: "Prometheus fixed".into(),
    });
    assert!(fleet.state.breaker.is_none());
    assert!(
        fleet
            .apply_at(
                9_100_000,
                CommandKind::ResetBreaker {
                    reason: "again".into()
                }
            )
            .is_err(),
        "a closed breaker cannot be reset"
    );
    assert_eq!(
        ask(&mut fleet, 9_200_000, "b").0,
        TriggerOutcome::Ignored,
        "a change refused once is left to a person"
    );
    fleet.deploy("b", "v1");
    assert_eq!(ask(&mut fleet, 9_300_000, "b").0, TriggerOutcome::Started);
}

#[test]
fn a_change_turns_its_flags_on_and_its_rollback_turns_them_back_first() {
    let mut fleet = fleet();
    fleet.apply(CommandKind::SetFlag {
        environment: "prod".into(),
        service: "a".into(),
        name: "old-ui".into(),
        enabled: false,
        kill: false,
        reason: "retired".into(),
    });
    fleet.apply(CommandKind::StartChange(StartChange {
        break_glass: false,
        service: "a".into(),
        version: "v2".into(),
        host_ids: vec![],
        reason: "new checkout".into(),
        baseline: HealthAggregate::default(),
        flags_on: vec!["new-checkout".into(), "old-ui".into()],
        migrations: vec![],
    }));
    let change = *fleet.state.changes.keys().last().unwrap();
    let record = &fleet.state.changes[&change];
    assert_eq!(record.environment, "prod");
    assert_eq!(
        record.flags,
        vec![
            FlagChangeRecord {
                name: "new-checkout".into(),
                before: None
            },
            FlagChangeRecord {
                name: "old-ui".into(),
                before: Some(false)
            },
        ]
    );
    assert!(
        fleet
            .state
            .flag("prod", "a", "new-checkout")
            .unwrap()
            .enabled
    );
    // Capture and activate so there is something to revert.
    fleet.capture_and_activate(change, &[("a-1", "snap-1")]);
    assert_eq!(
        fleet
            .plan(&[change], &PlanOptions::default())
            .unwrap()
            .flags,
        vec!["prod/a/new-checkout -> off", "prod/a/old-ui -> off"]
    );
    // A kill switch thrown after the change is the operator's: the rollback leaves it alone.
    fleet.apply(CommandKind::SetFlag {
        environment: "prod".into(),
        service: "a".into(),
        name: "old-ui".into(),
        enabled: false,
        kill: true,
        reason: "incident".into(),
    });
    let plan = fleet.plan(&[change], &PlanOptions::default()).unwrap();
    assert_eq!(plan.flags, vec!["prod/a/new-checkout -> off"]);
    let index_before = fleet.state.applied_index;
    fleet.apply(CommandKind::StartRollback(StartRollback {
        changes: vec![change],
        options: PlanOptions::default(),
        plan_hash: String::new(),
        reason: "bad".into(),
        trigger: Trigger::Manual,
        break_glass: false,
        planned: None,
    }));
    let rollback = fleet.state.rollbacks.values().last().unwrap();
    assert_eq!(rollback.flags_reverted, vec!["prod/a/new-checkout -> off"]);
    assert!(fleet.state.flag("prod", "a", "old-ui").unwrap().killed);
    assert!(
        rollback
            .steps
            .iter()
            .all(|step| step.progress.attempts == 0),
        "flags go back before any host is touched"
    );
    let reverted = fleet.state.flag("prod", "a", "new-checkout").unwrap();
    assert!(!reverted.enabled);
    assert!(reverted.changed_at_index > index_before);
    // Pushed to the hosts of that service and environment only.
    let updates = crate::flags::updates_since(&fleet.state, index_before);
    let hosts: Vec<&str> = updates.iter().map(|(host, _)| host.as_str()).collect();
    assert_eq!(hosts, vec!["a-1"]);
}

#[test]
fn a_kill_switch_turns_off_and_cannot_turn_on() {
    let mut fleet = fleet();
    let kill = |enabled| CommandKind::SetFlag {
        environment: "staging".into(),
        service: "d".into(),
        name: "payments".into(),
        enabled,
        kill: true,
        reason: "incident 42".into(),
    };
    assert!(fleet.apply_at(1, kill(true)).is_err());
    fleet.apply(kill(false));
    let flag = fleet.state.flag("staging", "d", "payments").unwrap();
    assert!(!flag.enabled && flag.killed);
    assert_eq!(
        fleet.state.audit.entries().last().unwrap().action,
        "flag.kill"
    );
    let snapshots = crate::flags::snapshots_for(&fleet.state, "d-1");
    assert_eq!(snapshots.len(), 1);
    assert_eq!(snapshots[0].flags.get("payments"), Some(&false));
    assert!(
        crate::flags::snapshots_for(&fleet.state, "a-1").is_empty(),
        "another environment's flags are not sent"
    );
}
