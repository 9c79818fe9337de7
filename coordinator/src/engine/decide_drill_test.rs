//! Rollback fire drills (cluster version 11) through `apply()` and `decide()`: started as a
//! marked change, scored when their rollback ends, reverted by the engine when nothing else
//! reverts them, refused where they may not run.

use std::sync::Arc;

use super::decide::*;
use super::decide_test::{HOSTS, World, revert_every_host};
use crate::state_machine::*;

fn start_drill(version: &str) -> CommandKind {
    CommandKind::StartFireDrill {
        environment: crate::plan::DEFAULT_ENVIRONMENT.into(),
        start: StartChange {
            service: "web".into(),
            version: version.into(),
            host_ids: HOSTS.map(String::from).to_vec(),
            reason: "game day".into(),
            baseline: HealthAggregate::default(),
            flags_on: vec![],
            migrations: vec![],
            break_glass: false,
        },
    }
}

/// web runs v2 (change 1); v3 is registered, the known-bad release.
fn world_with_v3() -> World {
    let mut world = World::new();
    world.deployed();
    world.apply(CommandKind::RegisterRelease {
        release: crate::test_fleet::release("v3", 'c'),
    });
    world
}

/// Starts drill rd-1 of v3 (change 2) and deploys it on every host.
fn drill_deployed(world: &mut World) {
    world.apply(start_drill("v3"));
    for capture in [true, false] {
        for host in HOSTS {
            let host_id = host.to_string();
            let step = if capture {
                StepTarget::Capture { change: 2, host_id }
            } else {
                StepTarget::Activate { change: 2, host_id }
            };
            world.fleet.finish(step, true);
        }
    }
    assert_eq!(world.fleet.state.changes[&2].status, ChangeStatus::Deployed);
}

fn refusal(world: &mut World, kind: CommandKind) -> String {
    world
        .fleet
        .apply_at(1_000, kind)
        .expect_err("refused")
        .to_string()
}

#[test]
fn a_drill_detected_and_rolled_back_passes_with_its_scorecard() {
    let mut world = world_with_v3();
    drill_deployed(&mut world);
    let change = &world.fleet.state.changes[&2];
    assert_eq!(change.drill, 1, "the change is marked as the drill's");
    assert!(
        change.reason.starts_with("rd-1 (drill)"),
        "{}",
        change.reason
    );
    assert_eq!(
        refusal(&mut world, CommandKind::FinishFireDrill { drill: 1 }),
        "drill refused: rd-1 has not ended: its rollback has not"
    );

    // The health policy's trigger starts the automatic rollback; it reverts every host.
    world.apply(crate::test_fleet::rollback_of(2, Trigger::Automatic));
    revert_every_host(&mut world);
    world.fleet.finish(
        StepTarget::Gate {
            rollback: 1,
            wave: 0,
        },
        true,
    );
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Succeeded
    );
    world.run_tick(2_000);
    let drill = &world.fleet.state.fire_drills[&1];
    assert_eq!(drill.status, FireDrillStatus::Passed, "{}", drill.outcome);
    let card = drill.scorecard.as_ref().unwrap();
    assert!(card.detected);
    assert_eq!(card.rollback, 1);
    assert_eq!((card.gates_passed, card.gates), (1, 1));
    assert_eq!((card.steps_retried, card.escalations), (0, 0));
    assert!(card.all_verified_ms.is_some() && card.first_reverted_ms.is_some());
    assert_eq!(card.previous, 0, "the first drill of web");
}

#[test]
fn an_undetected_drill_is_reverted_by_the_engine_and_fails() {
    let mut world = world_with_v3();
    drill_deployed(&mut world);
    let deployed = world.fleet.state.changes[&2].deployed_at_ms;
    let within_watch = world.decide(deployed + 30_000);
    assert!(
        !within_watch
            .iter()
            .any(|action| matches!(action, Action::Propose(CommandKind::AutoTrigger(_)))),
        "within the policy's watch the policy decides"
    );
    let after_watch = world.decide(deployed + 61_000);
    let reverts: Vec<&str> = after_watch
        .iter()
        .filter_map(|action| match action {
            Action::Propose(CommandKind::AutoTrigger(trigger)) => Some(trigger.reason.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(reverts.len(), 1, "{after_watch:?}");
    assert!(
        reverts[0].contains("rd-1: web v3 was not detected within the policy's watch of 60 s"),
        "{}",
        reverts[0]
    );
    // Its revert starts after the watch: the scorecard says not detected.
    world
        .fleet
        .apply_at(
            deployed + 61_000,
            crate::test_fleet::rollback_of(2, Trigger::Automatic),
        )
        .unwrap();
    revert_every_host(&mut world);
    world.fleet.finish(
        StepTarget::Gate {
            rollback: 1,
            wave: 0,
        },
        true,
    );
    world.run_tick(deployed + 70_000);
    let drill = &world.fleet.state.fire_drills[&1];
    assert_eq!(drill.status, FireDrillStatus::Failed);
    assert!(
        drill.outcome.starts_with("not detected"),
        "{}",
        drill.outcome
    );
    assert!(!drill.scorecard.as_ref().unwrap().detected);
}

#[test]
fn an_aborted_drill_stops_at_once_and_what_it_deployed_is_reverted() {
    let mut world = world_with_v3();
    drill_deployed(&mut world);
    world.apply(CommandKind::AbortFireDrill {
        drill: 1,
        reason: "a real incident".into(),
    });
    let drill = &world.fleet.state.fire_drills[&1];
    assert_eq!(drill.status, FireDrillStatus::Aborted);
    assert!(
        drill.outcome.contains("a real incident"),
        "{}",
        drill.outcome
    );
    let actions = world.decide(2_000);
    assert!(
        actions.iter().any(|action| matches!(
            action,
            Action::Propose(CommandKind::AutoTrigger(trigger))
                if trigger.reason.contains("rd-1 was aborted")
        )),
        "{actions:?}"
    );
    assert!(
        refusal(
            &mut world,
            CommandKind::AbortFireDrill {
                drill: 1,
                reason: "again".into()
            }
        )
        .contains("rd-1 is aborted already")
    );
}

#[test]
fn drills_are_refused_where_they_may_not_run() {
    let mut world = world_with_v3();
    assert!(
        refusal(&mut world, start_drill("v2")).contains("already runs v2"),
        "the running release is no drill"
    );
    let mut hosts_missing = start_drill("v3");
    if let CommandKind::StartFireDrill { start, .. } = &mut hosts_missing {
        start.host_ids.pop();
    }
    assert!(refusal(&mut world, hosts_missing).contains("every host of web in default"));

    let mut policy = crate::access::Policy::dev("ada");
    policy.environments.insert(
        crate::plan::DEFAULT_ENVIRONMENT.into(),
        crate::access::policy::EnvironmentRules {
            drills: false,
            ..Default::default()
        },
    );
    world.fleet.state.access.policy = Some(Arc::new(policy.clone()));
    assert!(refusal(&mut world, start_drill("v3")).contains("forbids drills"));
    policy.environments.insert(
        crate::plan::DEFAULT_ENVIRONMENT.into(),
        crate::access::policy::EnvironmentRules {
            approvals: 1,
            ..Default::default()
        },
    );
    world.fleet.state.access.policy = Some(Arc::new(policy));
    assert!(refusal(&mut world, start_drill("v3")).contains("never a way around them"));
    world.fleet.state.access.policy = None;

    let mut service = world.fleet.state.services["web"].clone();
    service.policy.auto_rollback = false;
    world.apply(CommandKind::PutService { service });
    assert!(refusal(&mut world, start_drill("v3")).contains("auto_rollback is off"));

    world.fleet.state.cluster_version = 10;
    assert!(refusal(&mut world, start_drill("v3")).contains("needs cluster version 11"));
    assert!(
        world.fleet.state.fire_drills.is_empty(),
        "nothing was started"
    );
}

/// A person deploys v2 again, over the drill.
fn back_to_v2() -> CommandKind {
    CommandKind::StartChange(StartChange {
        service: "web".into(),
        version: "v2".into(),
        host_ids: vec![],
        reason: "back to v2".into(),
        baseline: HealthAggregate::default(),
        flags_on: vec![],
        migrations: vec![],
        break_glass: false,
    })
}

#[test]
fn a_drill_deployed_over_ends_failed_and_the_later_change_is_never_reverted() {
    let mut world = world_with_v3();
    drill_deployed(&mut world);
    world.apply(CommandKind::AbortFireDrill {
        drill: 1,
        reason: "fixing by hand".into(),
    });
    // A person deploys v2 again over the drill before its revert.
    world.apply(back_to_v2());
    let actions = world.decide(200_000);
    assert!(
        !actions
            .iter()
            .any(|action| matches!(action, Action::Propose(CommandKind::AutoTrigger(_)))),
        "{actions:?}"
    );

    // A running drill deployed over ends failed, naming the later change.
    let mut world = world_with_v3();
    drill_deployed(&mut world);
    world.apply(back_to_v2());
    world.run_tick(2_000);
    let drill = &world.fleet.state.fire_drills[&1];
    assert_eq!(drill.status, FireDrillStatus::Failed);
    assert!(
        drill.outcome.starts_with("superseded by ch-3"),
        "{}",
        drill.outcome
    );
}

#[test]
fn a_drill_whose_automatic_rollback_was_not_started_ends_failed_and_is_asked_once() {
    let mut world = world_with_v3();
    drill_deployed(&mut world);
    let deployed = world.fleet.state.changes[&2].deployed_at_ms;
    // An alert before the release was deployed does not count; one after that waits for
    // approvals does.
    world.fleet.state.triggers.push_back(TriggerRecord {
        at_ms: 1_000,
        service: "web".into(),
        environment: crate::plan::DEFAULT_ENVIRONMENT.into(),
        source: TriggerSource::Policy,
        reason: "early".into(),
        outcome: TriggerOutcome::Ignored,
        detail: "nothing to revert yet".into(),
        rollback: 0,
        change: 2,
    });
    world.run_tick(deployed + 1_000);
    assert_eq!(
        world.fleet.state.fire_drills[&1].status,
        FireDrillStatus::Running
    );
    world.fleet.state.triggers.push_back(TriggerRecord {
        at_ms: deployed + 2_000,
        service: "web".into(),
        environment: crate::plan::DEFAULT_ENVIRONMENT.into(),
        source: TriggerSource::Policy,
        reason: "probe failure ratio".into(),
        outcome: TriggerOutcome::AwaitingApproval,
        detail: "waits for approval".into(),
        rollback: 0,
        change: 2,
    });
    let actions = world.run_tick(deployed + 61_000);
    assert!(
        !actions
            .iter()
            .any(|action| matches!(action, Action::Propose(CommandKind::AutoTrigger(_)))),
        "{actions:?}"
    );
    let drill = &world.fleet.state.fire_drills[&1];
    assert_eq!(drill.status, FireDrillStatus::Failed);
    assert!(
        drill.outcome.contains("not started (waits for approval)")
            && drill.outcome.contains("rewindctl rollback start ch-2"),
        "{}",
        drill.outcome
    );
}

#[test]
fn a_drill_is_refused_inside_a_freeze_window() {
    let mut world = world_with_v3();
    let mut service = world.fleet.state.services["web"].clone();
    service.freeze =
        vec![rewind_shared::freeze::FreezeWindow::parse("daily 00:00-00:00 UTC").unwrap()];
    world.apply(CommandKind::PutService { service });
    let refused = refusal(&mut world, start_drill("v3"));
    assert!(refused.contains("frozen"), "{refused}");
}
