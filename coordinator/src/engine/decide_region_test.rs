//! Tests of `decide()` when a rollback loses a whole region (cluster version 11): the other
//! regions go on, the lost hosts wait and are reverted when they return.

use super::decide_test::{World, two_region_world};
use crate::state_machine::*;

/// The steps of the default recipe, in order.
const RECIPE: [RollbackStepKind; 5] = [
    RollbackStepKind::Drain,
    RollbackStepKind::Restore,
    RollbackStepKind::Restart,
    RollbackStepKind::Verify,
    RollbackStepKind::Undrain,
];

fn revert(world: &mut World, host: &str) {
    for kind in RECIPE {
        world.step(host, kind, true);
    }
}

fn pass_gate(world: &mut World, wave: u32) {
    world
        .fleet
        .finish(StepTarget::Gate { rollback: 1, wave }, true);
}

fn attempts(world: &World, host: &str) -> u32 {
    world.fleet.state.rollbacks[&1]
        .steps
        .iter()
        .filter(|step| step.host_id == host)
        .map(|step| step.progress.attempts)
        .sum()
}

/// web-1 in region `aa` (wave 1), web-2 and web-3 in the other region (wave 2), which loses
/// both agents as the rollback starts, one host at a time.
fn second_region_lost() -> World {
    let mut world = two_region_world();
    world.start_rollback(1);
    world.seen.sessions.remove("web-2");
    world.seen.sessions.remove("web-3");
    world
}

#[test]
fn a_lost_region_neither_stalls_nor_holds_up_the_others_and_is_reverted_on_return() {
    let mut world = second_region_lost();
    world.run_tick(1_000);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(
        rollback.status,
        RollbackStatus::Running,
        "two hosts down would use up max_unavailable 1, but a lost region does not count: {}",
        rollback.paused_reason
    );
    assert_eq!(attempts(&world, "web-1"), 1, "web-1 (region aa) begins");
    world.run_tick(1_500);
    assert!(
        world.fleet.state.rollbacks[&1].deferred_hosts.is_empty(),
        "not deferred before a step timeout has passed (a new leader's agents reconnect)"
    );

    revert(&mut world, "web-1");
    pass_gate(&mut world, 0);
    world.run_tick(2_500);
    assert!(
        world.fleet.state.rollbacks[&1].deferred_hosts.is_empty(),
        "gone for less than two step timeouts"
    );
    world.run_tick(3_000);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.deferred_hosts, ["web-2", "web-3"]);
    assert_eq!(rollback.waves[1].gate.status, StepStatus::Skipped);
    assert!(
        rollback.waves[1].gate.detail.contains("region")
            && rollback.waves[1].gate.detail.contains("lost"),
        "{}",
        rollback.waves[1].gate.detail
    );
    assert_eq!(rollback.current_wave(), None, "every wave is done");
    assert_eq!(rollback.status, RollbackStatus::Running, "but it waits");

    // While they are away nothing is sent, nothing times out, nobody is called.
    for now_ms in [10_000, 20_000, 35_000] {
        let actions = world.run_tick(now_ms);
        assert!(actions.is_empty(), "{actions:?}");
    }
    assert_eq!(attempts(&world, "web-2") + attempts(&world, "web-3"), 0);
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Running
    );

    // They return: reverted one at a time (max_parallel 1), then the rollback ends.
    world.seen.sessions.insert("web-2".into(), 2);
    world.seen.sessions.insert("web-3".into(), 2);
    world.run_tick(36_000);
    assert_eq!(attempts(&world, "web-2"), 1);
    assert_eq!(
        attempts(&world, "web-3"),
        0,
        "max_parallel holds for the returning hosts"
    );
    revert(&mut world, "web-2");
    world.run_tick(37_000);
    assert_eq!(attempts(&world, "web-3"), 1);
    revert(&mut world, "web-3");
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.status, RollbackStatus::Succeeded);
    assert!(
        rollback
            .outcome_detail
            .contains("reverted after their region returned: web-2, web-3"),
        "{}",
        rollback.outcome_detail
    );
}

#[test]
fn a_host_lost_mid_step_resumes_that_step_when_it_returns() {
    let mut world = two_region_world();
    world.start_rollback(1);
    revert(&mut world, "web-1");
    pass_gate(&mut world, 0);
    world.run_tick(1_000);
    world.step("web-2", RollbackStepKind::Drain, true);
    world.run_tick(1_100);
    // The region goes while web-2's restore runs.
    world.seen.sessions.remove("web-2");
    world.seen.sessions.remove("web-3");
    world.run_tick(1_200);
    world.run_tick(3_300);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.deferred_hosts, ["web-2", "web-3"]);
    let restore = |world: &World| {
        world.fleet.state.rollbacks[&1]
            .steps
            .iter()
            .find(|step| step.host_id == "web-2" && step.kind == RollbackStepKind::Restore)
            .unwrap()
            .progress
            .clone()
    };
    assert_eq!(restore(&world).status, StepStatus::Running);
    world.run_tick(100_000);
    assert_eq!(
        restore(&world).status,
        StepStatus::Running,
        "no timeout while away"
    );

    world.seen.sessions.insert("web-2".into(), 5);
    world.seen.sessions.insert("web-3".into(), 5);
    world.run_tick(101_000);
    let restore = restore(&world);
    assert_eq!(
        (restore.status, restore.attempts),
        (StepStatus::Running, 2),
        "a fresh attempt on its return, none spent while it was away"
    );
}

#[test]
fn a_returning_host_that_fails_pauses_for_a_person_and_resume_retries_it() {
    let mut world = second_region_lost();
    world.run_tick(1_000);
    revert(&mut world, "web-1");
    pass_gate(&mut world, 0);
    world.run_tick(3_000);
    world.seen.sessions.insert("web-2".into(), 2);
    world.seen.sessions.insert("web-3".into(), 2);
    world.run_tick(3_000);
    world.step("web-2", RollbackStepKind::Drain, true);
    world.step("web-2", RollbackStepKind::Restore, false);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.status, RollbackStatus::Paused);
    assert!(
        rollback.paused_reason.contains("after its region returned"),
        "{}",
        rollback.paused_reason
    );
    world.apply(CommandKind::ControlRollback {
        rollback: 1,
        action: RollbackAction::Resume,
        reason: String::new(),
    });
    world.run_tick(4_000);
    let restore = world.fleet.state.rollbacks[&1]
        .steps
        .iter()
        .find(|step| step.host_id == "web-2" && step.kind == RollbackStepKind::Restore)
        .unwrap();
    assert_eq!(restore.progress.status, StepStatus::Running, "retried");
}

#[test]
fn below_version_eleven_a_lost_region_still_stalls_the_rollback() {
    let mut world = second_region_lost();
    world.fleet.state.cluster_version = 10;
    world.run_tick(1_000);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.status, RollbackStatus::Paused);
    assert!(rollback.deferred_hosts.is_empty());
}

#[test]
fn when_every_region_is_gone_nothing_is_deferred() {
    // All agents gone at once looks like the coordinator's own trouble, not a region's.
    let mut world = two_region_world();
    world.start_rollback(3);
    world.seen.sessions.clear();
    world.run_tick(1_000);
    world.run_tick(5_000);
    assert!(world.fleet.state.rollbacks[&1].deferred_hosts.is_empty());
}

#[test]
fn agents_that_stopped_reporting_count_as_gone_before_their_sessions_end() {
    // A region's network vanished: its sessions live on until keepalives give up, but its
    // reports stopped. The other region keeps reporting.
    let mut world = two_region_world();
    world.start_rollback(1);
    world.seen.heard.insert("web-1".into(), 10_000);
    world.seen.heard.insert("web-2".into(), 1_000);
    world.seen.heard.insert("web-3".into(), 1_000);
    world.run_tick(10_000);
    world.run_tick(12_000);
    assert_eq!(
        world.fleet.state.rollbacks[&1].deferred_hosts,
        ["web-2", "web-3"],
        "silent for more than five report intervals, for two step timeouts"
    );
}

/// The south (web-2, web-3) deferred and every wave done; both agents back.
fn deferred_and_back() -> World {
    let mut world = second_region_lost();
    world.run_tick(1_000);
    revert(&mut world, "web-1");
    pass_gate(&mut world, 0);
    world.run_tick(3_000);
    assert_eq!(
        world.fleet.state.rollbacks[&1].deferred_hosts,
        ["web-2", "web-3"]
    );
    world.seen.sessions.insert("web-2".into(), 2);
    world.seen.sessions.insert("web-3".into(), 2);
    world
}

#[test]
fn a_returning_host_whose_last_step_fails_never_lets_the_rollback_succeed() {
    let mut world = deferred_and_back();
    revert(&mut world, "web-3");
    for kind in &RECIPE[..4] {
        world.step("web-2", *kind, true);
    }
    world.step("web-2", RollbackStepKind::Undrain, false);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(
        rollback.status,
        RollbackStatus::Paused,
        "{}",
        rollback.outcome_detail
    );
    assert!(
        rollback.paused_reason.contains("undrain on web-2"),
        "{}",
        rollback.paused_reason
    );
}

#[test]
fn a_returning_hosts_next_step_is_started_by_the_engine_not_by_apply() {
    let mut world = deferred_and_back();
    world.run_tick(36_000);
    world.step("web-2", RollbackStepKind::Drain, true);
    let restore = |world: &World| world.progress("web-2", RollbackStepKind::Restore);
    assert_eq!(
        restore(&world),
        (StepStatus::Pending, 0),
        "a deferred host's success starts nothing in apply() (cluster version 13 chains only \
         the current wave's hosts): the engine drives returning hosts, region by region"
    );
    world.run_tick(36_100);
    assert_eq!(restore(&world), (StepStatus::Running, 1));
}

/// Lets the rollback revert two hosts at once.
fn two_at_a_time(world: &mut World) {
    let rollback = world.fleet.state.rollbacks.get_mut(&1).unwrap();
    rollback.options.max_parallel = 2;
}

#[test]
fn a_failure_waits_for_another_returning_host_between_its_steps() {
    let mut world = deferred_and_back();
    two_at_a_time(&mut world);
    world.step("web-3", RollbackStepKind::Drain, true);
    world.step("web-3", RollbackStepKind::Restore, true);
    // web-3 is between its restore and its restart when web-2 fails.
    world.step("web-2", RollbackStepKind::Drain, true);
    world.step("web-2", RollbackStepKind::Restore, false);
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Running,
        "web-3 is taken to the end of its steps first"
    );
    for kind in &RECIPE[2..] {
        world.step("web-3", *kind, true);
    }
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Paused
    );
}

#[test]
fn a_returning_session_that_stays_silent_is_not_driven() {
    let mut world = second_region_lost();
    world.run_tick(1_000);
    revert(&mut world, "web-1");
    pass_gate(&mut world, 0);
    world.run_tick(3_000);
    // Sessions that outlived their network: connected, silent since long before.
    world.seen.heard.insert("web-1".into(), 10_000);
    for host in ["web-2", "web-3"] {
        world.seen.sessions.insert(host.into(), 1);
        world.seen.heard.insert(host.into(), 1_000);
    }
    world.run_tick(10_000);
    assert_eq!(attempts(&world, "web-2") + attempts(&world, "web-3"), 0);
}

#[test]
fn a_deferred_host_that_never_returns_calls_a_person_and_can_be_skipped() {
    let mut world = second_region_lost();
    world.run_tick(1_000);
    revert(&mut world, "web-1");
    pass_gate(&mut world, 0);
    world.run_tick(3_000);
    world.run_tick(4_000);
    // LIMITS: 1 s step timeouts, so 30 s with none of them back.
    world.run_tick(4_000 + 30_000);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.status, RollbackStatus::Paused);
    assert!(
        rollback
            .paused_reason
            .contains("web-2, web-3 of a lost region have not returned"),
        "{}",
        rollback.paused_reason
    );
    for host in ["web-2", "web-3"] {
        world.apply(CommandKind::SkipHost {
            rollback: 1,
            host_id: host.into(),
            reason: "the region is gone for good".into(),
        });
    }
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(
        rollback.status,
        RollbackStatus::Succeeded,
        "{}",
        rollback.paused_reason
    );
    assert!(
        rollback
            .outcome_detail
            .contains("left unreverted by an operator: web-2, web-3"),
        "{}",
        rollback.outcome_detail
    );
}

#[test]
fn no_returning_host_begins_after_another_failed_and_a_resume_waits_the_full_time_again() {
    let mut world = deferred_and_back();
    two_at_a_time(&mut world);
    world.step("web-2", RollbackStepKind::Drain, true);
    world.step("web-2", RollbackStepKind::Restore, false);
    world.run_tick(40_000);
    assert_eq!(
        attempts(&world, "web-3"),
        0,
        "web-3 is not begun after web-2 failed"
    );
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Paused
    );

    // The region goes again; a person resumes: the wait starts afresh, no stall at once.
    world.seen.sessions.remove("web-2");
    world.seen.sessions.remove("web-3");
    world.apply(CommandKind::ControlRollback {
        rollback: 1,
        action: RollbackAction::Resume,
        reason: String::new(),
    });
    world.run_tick(41_000);
    world.run_tick(42_000);
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Running,
        "{}",
        world.fleet.state.rollbacks[&1].paused_reason
    );
    world.run_tick(42_000 + 30_000);
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Paused,
        "called again after the full wait"
    );
}
