//! Tests of `decide()` for what health decides: wave gates, synthetic checks, policy
//! conditions and the automatic trigger.

use super::decide::*;
use super::decide_test::*;
use crate::state_machine::*;

#[test]
fn a_wave_passes_its_gate_once_health_settles_near_the_baseline() {
    let mut world = World::new();
    world.deployed();
    world.start_rollback(3);
    revert_every_host(&mut world);
    world.seen.failure_ratio = 0.04;
    world.run_tick(1_000);
    assert_eq!(
        world.fleet.state.rollbacks[&1].waves[0].gate.status,
        StepStatus::Running
    );
    world.run_tick(2_000);
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Running,
        "the gate waits settle_s before judging"
    );
    world.run_tick(3_000); // settled: asks its hosts for a report
    world.run_tick(3_500);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.status, RollbackStatus::Succeeded);
    assert!(
        rollback.waves[0].gate.detail.contains("healthy"),
        "{}",
        rollback.waves[0].gate.detail
    );
    assert_eq!(
        world.fleet.state.changes[&1].status,
        ChangeStatus::RolledBack
    );
}

#[test]
fn a_gate_settles_in_milliseconds_then_asks_its_hosts_and_judges_on_their_answers() {
    let mut world = World::new();
    world.deployed();
    world.start_rollback(3);
    if let Some(rollback) = world.fleet.state.rollbacks.get_mut(&1) {
        rollback.options.gate.settle_ms = 300;
    }
    revert_every_host(&mut world);
    world.seen.failure_ratio = 0.0;
    world.run_tick(1_000);
    assert_eq!(
        world.fleet.state.rollbacks[&1].waves[0].gate.status,
        StepStatus::Running
    );
    let asked = |actions: &[Action]| -> Vec<String> {
        let mut hosts: Vec<String> = actions
            .iter()
            .filter_map(|action| match action {
                Action::AskReport { host_id, .. } => Some(host_id.clone()),
                _ => None,
            })
            .collect();
        hosts.sort();
        hosts
    };
    let gate = |world: &World| world.fleet.state.rollbacks[&1].waves[0].gate.status;
    assert!(asked(&world.run_tick(1_100)).is_empty(), "settling");
    let at_settle = world.run_tick(1_300);
    assert_eq!(asked(&at_settle), HOSTS.map(String::from).to_vec());
    assert_eq!(gate(&world), StepStatus::Running, "judged on the answers");
    world.seen.awaiting.insert("web-2".into());
    assert!(asked(&world.run_tick(1_400)).is_empty(), "once per gate");
    assert_eq!(gate(&world), StepStatus::Running, "web-2 has not answered");
    world.run_tick(2_300);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(
        rollback.status,
        RollbackStatus::Succeeded,
        "judged on what there is after GATE_ANSWER_WAIT_MS"
    );
    assert!(
        rollback.waves[0]
            .gate
            .detail
            .contains("over the last 300 ms"),
        "{}",
        rollback.waves[0].gate.detail
    );
}

#[test]
fn a_gate_that_is_not_passing_asks_its_hosts_again_every_second() {
    let mut world = World::new();
    world.deployed();
    world.start_rollback(3);
    revert_every_host(&mut world);
    world.seen.failure_ratio = 0.9;
    world.run_tick(1_000); // the gate starts
    let asks = |actions: &[Action]| {
        actions
            .iter()
            .filter(|action| matches!(action, Action::AskReport { .. }))
            .count()
    };
    assert_eq!(asks(&world.run_tick(3_000)), 3, "settled: asks");
    assert_eq!(
        asks(&world.run_tick(3_500)),
        0,
        "unhealthy, within the answer wait"
    );
    assert_eq!(
        asks(&world.run_tick(4_000)),
        3,
        "still unhealthy: asks again"
    );
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Running
    );
}

#[test]
fn a_gate_judges_as_soon_as_every_asked_host_has_answered() {
    let mut world = World::new();
    world.deployed();
    world.start_rollback(3);
    revert_every_host(&mut world);
    world.run_tick(1_000);
    world.seen.awaiting.insert("web-1".into());
    world.run_tick(3_000); // settled (2 s): asks
    world.run_tick(3_100);
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Running
    );
    world.seen.awaiting.clear();
    world.run_tick(3_150);
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Succeeded
    );
}

#[test]
fn a_gate_with_synthetic_checks_runs_them_after_health_settles_and_needs_them_to_pass() {
    let mut world = World::new();
    let mut service = world.fleet.state.services["web"].clone();
    service.synthetics = vec![SyntheticCheck {
        name: "checkout".into(),
        url: "http://127.0.0.1:1/checkout".into(),
        method: "GET".into(),
        body: String::new(),
        expect_status: 200,
        body_contains: "ok".into(),
        max_latency_ms: 500,
    }];
    world.apply(CommandKind::PutService { service });
    world.deployed();
    world.start_rollback(3);
    revert_every_host(&mut world);
    world.run_tick(1_000); // the gate starts
    world.run_tick(3_000); // settled: asks its hosts for a report
    let runs = |actions: &[Action]| {
        actions
            .iter()
            .filter(|action| matches!(action, Action::RunSynthetics { .. }))
            .count()
    };
    assert_eq!(runs(&world.run_tick(3_500)), 1, "asked once health settled");
    assert_eq!(
        runs(&world.run_tick(4_000)),
        0,
        "not again while the run is under way"
    );
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Running
    );
    world.seen.synthetic = Some(SyntheticVerdict {
        ok: false,
        detail: "checkout: status 503, expected 200".into(),
        at_ms: 3_500,
    });
    assert_eq!(
        runs(&world.run_tick(5_000)),
        0,
        "a failed run waits before the next"
    );
    assert_eq!(runs(&world.run_tick(5_600)), 1, "then runs again");
    world.seen.synthetic = Some(SyntheticVerdict {
        ok: true,
        detail: "checkout: 200 in 12 ms".into(),
        at_ms: 5_600,
    });
    world.run_tick(6_000);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.status, RollbackStatus::Succeeded);
    assert!(
        rollback.waves[0]
            .gate
            .detail
            .contains("synthetic checks pass: checkout: 200 in 12 ms"),
        "{}",
        rollback.waves[0].gate.detail
    );
}

#[test]
fn failing_synthetic_checks_fail_the_gate_at_its_timeout() {
    let mut world = World::new();
    let mut service = world.fleet.state.services["web"].clone();
    service.synthetics = vec![SyntheticCheck {
        name: "login".into(),
        url: "http://127.0.0.1:1/login".into(),
        method: "POST".into(),
        body: "{}".into(),
        expect_status: 200,
        body_contains: String::new(),
        max_latency_ms: 500,
    }];
    world.apply(CommandKind::PutService { service });
    world.deployed();
    world.start_rollback(3);
    revert_every_host(&mut world);
    world.run_tick(1_000);
    world.seen.synthetic = Some(SyntheticVerdict {
        ok: false,
        detail: "login: status 500, expected 200".into(),
        at_ms: 3_000,
    });
    world.run_tick(5_000);
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Running
    );
    world.run_tick(12_000);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.status, RollbackStatus::Paused);
    assert!(
        rollback
            .paused_reason
            .contains("synthetic checks fail: login: status 500, expected 200"),
        "{}",
        rollback.paused_reason
    );
}

#[test]
fn a_failing_gate_pauses_escalates_once_and_never_loops() {
    let mut world = World::new();
    world.deployed();
    world.start_rollback(3);
    revert_every_host(&mut world);
    world.seen.failure_ratio = 0.5;
    world.run_tick(1_000);
    world.run_tick(5_000);
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Running
    );
    world.run_tick(12_000);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.status, RollbackStatus::Paused);
    assert!(
        rollback.paused_reason.contains("not within tolerance"),
        "{}",
        rollback.paused_reason
    );
    assert_eq!(rollback.escalations.len(), 1);
    let escalate = |actions: &[Action]| {
        actions
            .iter()
            .filter(|action| matches!(action, Action::Escalate { .. }))
            .count()
    };
    assert_eq!(escalate(&world.run_tick(12_000)), 1);
    assert_eq!(
        escalate(&world.run_tick(13_000)),
        0,
        "not again before the retry interval"
    );
    world.apply(CommandKind::EscalationDelivered {
        escalation: 1,
        ok: true,
        detail: "200 OK".into(),
    });
    for now in [30_000, 60_000, 120_000] {
        let actions = world.run_tick(now);
        assert_eq!(escalate(&actions), 0);
        assert!(actions.is_empty(), "a paused rollback waits: {actions:?}");
    }
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Paused
    );
}

#[test]
fn the_trigger_fires_once_after_the_breach_lasts_its_window() {
    let mut world = World::new();
    world.deployed();
    world.seen.failure_ratio = 1.0;
    world.run_tick(1_500);
    assert!(
        world.fleet.state.rollbacks.is_empty(),
        "the breach must last for_s"
    );
    world.run_tick(3_600);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.trigger, Trigger::Automatic);
    assert!(
        rollback.reason.contains(
            "probe_failure_ratio 1.000 breached `probe_failure_ratio > 0.5 for 2s` (limit 0.500)"
        ),
        "{}",
        rollback.reason
    );
    world.run_tick(9_000);
    assert_eq!(world.fleet.state.rollbacks.len(), 1);
}

#[test]
fn a_healthy_or_unwatched_service_does_not_trigger() {
    let mut world = World::new();
    world.deployed();
    world.seen.failure_ratio = 0.2;
    world.run_tick(1_500);
    world.run_tick(9_000);
    assert!(world.fleet.state.rollbacks.is_empty());
    world.seen.failure_ratio = 1.0;
    world.run_tick(70_000);
    world.run_tick(75_000);
    assert!(
        world.fleet.state.rollbacks.is_empty(),
        "past watch_s the policy no longer applies"
    );
}

/// A baseline measured before the change: healthy probes, 1 % errors, p99 200 ms.
fn app_baseline() -> HealthAggregate {
    HealthAggregate {
        probe_failure_ratio: 0.0,
        samples: 10,
        hosts_reporting: 3,
        error_ratio: Some(0.01),
        p99_latency_ms: Some(200.0),
        requests: 1000.0,
        scrape_failures: 0,
    }
}

fn with_conditions(world: &mut World, conditions: Vec<PolicyCondition>) {
    let mut service = world.fleet.state.services["web"].clone();
    service.policy.conditions = conditions;
    world.apply(CommandKind::PutService { service });
}

#[test]
fn an_error_ratio_condition_relative_to_the_baseline_fires_only_above_its_multiple() {
    let mut world = World::new();
    with_conditions(
        &mut world,
        vec![PolicyCondition {
            figure: HealthFigure::ErrorRatio,
            threshold: 3.0,
            relative_to_baseline: true,
            for_s: 2,
        }],
    );
    world.deployed_from(app_baseline());
    // Probes pass; errors at 2x the baseline are under the 3x limit.
    world.seen.error_ratio = Some(0.02);
    world.run_tick(1_500);
    world.run_tick(5_000);
    assert!(world.fleet.state.rollbacks.is_empty(), "2x is within 3x");
    world.seen.error_ratio = Some(0.08);
    world.run_tick(6_000);
    assert!(
        world.fleet.state.rollbacks.is_empty(),
        "the breach must last for_s"
    );
    world.run_tick(8_100);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.trigger, Trigger::Automatic);
    assert!(
        rollback.reason.contains(
            "error_ratio 0.080 breached `error_ratio > 3x baseline for 2s` (limit 0.030)"
        ) && rollback.reason.contains("baseline 0.010"),
        "{}",
        rollback.reason
    );
}

#[test]
fn a_p99_latency_condition_fires_and_is_not_judged_without_figures() {
    let mut world = World::new();
    with_conditions(
        &mut world,
        vec![PolicyCondition {
            figure: HealthFigure::P99LatencyMs,
            threshold: 300.0,
            relative_to_baseline: false,
            for_s: 2,
        }],
    );
    world.deployed_from(app_baseline());
    // No histogram reported: nothing to judge, nothing fires.
    world.run_tick(1_500);
    world.run_tick(5_000);
    assert!(world.fleet.state.rollbacks.is_empty());
    world.seen.p99_latency_ms = Some(450.0);
    world.run_tick(6_000);
    world.run_tick(8_100);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert!(
        rollback
            .reason
            .contains("p99_latency_ms 450 ms breached `p99_latency_ms > 300 for 2s`"),
        "{}",
        rollback.reason
    );
}

#[test]
fn a_gate_holds_error_ratio_and_p99_latency_to_the_baseline() {
    for (error_ratio, p99, expected) in [
        (Some(0.2), Some(210.0), "error ratio 0.200 > 0.060"),
        (Some(0.01), Some(400.0), "p99 latency 400 ms > 250 ms"),
    ] {
        let mut world = World::new();
        world.deployed_from(app_baseline());
        world.start_rollback(3);
        revert_every_host(&mut world);
        world.seen.error_ratio = error_ratio;
        world.seen.p99_latency_ms = p99;
        world.run_tick(1_000); // the gate starts
        world.run_tick(4_000);
        assert_eq!(
            world.fleet.state.rollbacks[&1].status,
            RollbackStatus::Running,
            "probes pass, but {expected}"
        );
        world.run_tick(12_000);
        let rollback = &world.fleet.state.rollbacks[&1];
        assert_eq!(rollback.status, RollbackStatus::Paused);
        let detail = &rollback.waves[0].gate.detail;
        assert!(detail.contains(expected), "{detail}");
    }
    // Within both tolerances, the gate passes.
    let mut world = World::new();
    world.deployed_from(app_baseline());
    world.start_rollback(3);
    revert_every_host(&mut world);
    (world.seen.error_ratio, world.seen.p99_latency_ms) = (Some(0.03), Some(240.0));
    world.run_tick(1_000);
    world.run_tick(3_000);
    world.run_tick(3_500);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.status, RollbackStatus::Succeeded);
    assert!(
        rollback.waves[0].gate.detail.contains(
            "error ratio 0.030 (baseline 0.010, 100 requests); p99 latency 240 ms (baseline 200 ms)"
        ),
        "{}",
        rollback.waves[0].gate.detail
    );
}

#[test]
fn a_relative_condition_over_a_zero_baseline_needs_a_real_margin() {
    let mut world = World::new();
    with_conditions(
        &mut world,
        vec![PolicyCondition {
            figure: HealthFigure::ErrorRatio,
            threshold: 5.0,
            relative_to_baseline: true,
            for_s: 2,
        }],
    );
    world.deployed_from(HealthAggregate {
        error_ratio: Some(0.0),
        ..app_baseline()
    });
    // 5x zero is zero, but the limit is at least the baseline plus one point of ratio.
    world.seen.error_ratio = Some(0.005);
    world.run_tick(1_500);
    world.run_tick(5_000);
    assert!(
        world.fleet.state.rollbacks.is_empty(),
        "0.5 % errors over a 0 % baseline"
    );
    world.seen.error_ratio = Some(0.03);
    world.run_tick(6_000);
    world.run_tick(8_100);
    assert!(
        world.fleet.state.rollbacks[&1]
            .reason
            .contains("(limit 0.010)"),
        "{}",
        world.fleet.state.rollbacks[&1].reason
    );
}

/// A deployed world where `drifted` hosts reported a hand edit and health then breached long
/// enough for the automatic rollback, under `policy`: the rollback it started.
fn rolled_back_with_drift(policy: DriftPolicy, drifted: &[&str]) -> World {
    let mut world = World::new();
    let mut service = world.fleet.state.services["web"].clone();
    service.drift_policy = policy;
    world.apply(CommandKind::PutService { service });
    world.deployed();
    for host in drifted {
        world.seen.drift.insert(
            host.to_string(),
            vec!["config/app.toml: content differs".into()],
        );
    }
    world.seen.failure_ratio = 1.0;
    world.run_tick(1_500);
    world.run_tick(3_600);
    world
}

#[test]
fn an_automatic_rollback_follows_the_services_drift_policy() {
    // Skip (the default): the drifted host is left out and a person called.
    let world = rolled_back_with_drift(DriftPolicy::Skip, &["web-2"]);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.options.exclude_hosts, vec!["web-2"]);
    assert!(rollback.steps.iter().all(|step| step.host_id != "web-2"));
    assert!(!rollback.options.overwrite_drift);
    let escalation = &world.fleet.state.escalations[&rollback.escalations[0]];
    assert!(
        escalation.evidence.contains("left web-2 untouched"),
        "{}",
        escalation.evidence
    );

    // Overwrite: every host is reverted, told to wipe the drift.
    let world = rolled_back_with_drift(DriftPolicy::Overwrite, &["web-2"]);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert!(rollback.options.exclude_hosts.is_empty());
    assert!(rollback.options.overwrite_drift);
    assert!(rollback.steps.iter().any(|step| step.host_id == "web-2"));

    // Every host drifted: none is left out (the rollback would revert nothing), so each
    // agent refuses its restore and the paused rollback calls a person.
    let world = rolled_back_with_drift(DriftPolicy::Skip, &["web-1", "web-2", "web-3"]);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert!(rollback.options.exclude_hosts.is_empty());
    assert!(!rollback.options.overwrite_drift);
    assert_eq!(rollback.steps.len(), 15, "every host's five steps");
}
