//! A refused command changes nothing: a property over random command sequences, every kind a
//! person, a host or the engine sends, on a small fleet where most of them are refused.

use proptest::prelude::*;

use super::*;
use crate::test_fleet::{Fleet, release, rollback_of, start_change};

const HOSTS: [&str; 3] = ["web-1", "web-2", "web-3"];
const VERSIONS: [&str; 3] = ["v1", "v2", "v9"];

fn host(n: usize) -> String {
    HOSTS[n % HOSTS.len()].to_string()
}

/// One command from a small universe: numbers and names often name nothing that exists.
fn command() -> impl Strategy<Value = CommandKind> {
    let step_kind = prop::sample::select(RollbackStepKind::ALL.to_vec());
    prop_oneof![
        (0usize..3).prop_map(|n| start_change(VERSIONS[n])),
        (0u64..4, any::<bool>()).prop_map(|(change, manual)| rollback_of(
            change,
            if manual {
                Trigger::Manual
            } else {
                Trigger::Automatic
            }
        )),
        (0u64..4, 0usize..3, any::<bool>(), any::<bool>()).prop_map(|(change, n, capture, ok)| {
            let host_id = host(n);
            let step = if capture {
                StepTarget::Capture { change, host_id }
            } else {
                StepTarget::Activate { change, host_id }
            };
            CommandKind::StepFinished {
                step,
                ok,
                detail: String::new(),
                snapshot_id: "snap".into(),
            }
        }),
        (0u64..4, 0usize..3, any::<bool>()).prop_map(|(change, n, capture)| {
            let host_id = host(n);
            let step = if capture {
                StepTarget::Capture { change, host_id }
            } else {
                StepTarget::Activate { change, host_id }
            };
            CommandKind::StepStarted { step }
        }),
        (0u64..3, 0usize..3, step_kind, any::<bool>()).prop_map(|(rollback, n, kind, ok)| {
            let step = StepTarget::Rollback {
                rollback,
                service: "web".into(),
                host_id: host(n),
                kind,
            };
            CommandKind::StepFinished {
                step,
                ok,
                detail: String::new(),
                snapshot_id: String::new(),
            }
        }),
        (0u64..3, 0u32..2).prop_map(|(rollback, wave)| CommandKind::StepStarted {
            step: StepTarget::Gate { rollback, wave },
        }),
        (0u64..3, 0usize..3).prop_map(|(rollback, action)| CommandKind::ControlRollback {
            rollback,
            action: [
                RollbackAction::Pause,
                RollbackAction::Resume,
                RollbackAction::Abort
            ][action],
            reason: "test".into(),
        }),
        (0u64..3, 0usize..3).prop_map(|(rollback, n)| CommandKind::SkipHost {
            rollback,
            host_id: host(n),
            reason: "test".into(),
        }),
        (0usize..3, 1u32..5).prop_map(|(n, breaker_services)| {
            CommandKind::AutoTrigger(AutoTrigger {
                service: ["web", "api", "nope"][n].into(),
                environment: String::new(),
                source: TriggerSource::Alertmanager,
                reason: "alert".into(),
                options: PlanOptions::default(),
                throttle: ThrottleLimits {
                    breaker_services,
                    ..ThrottleLimits::default()
                },
                decided: None,
            })
        }),
        Just(CommandKind::ResetBreaker {
            reason: "test".into()
        }),
        (0usize..3).prop_map(|n| CommandKind::RegisterRelease {
            release: release(VERSIONS[n], 'b'),
        }),
        (0usize..3, any::<bool>()).prop_map(|(n, both)| CommandKind::RegisterHost {
            host_id: host(n),
            labels: Labels::default(),
            services: if both {
                vec!["web".into(), "api".into()]
            } else {
                vec!["web".into()]
            },
            agent_version: "test".into(),
        }),
        (0usize..3).prop_map(|n| CommandKind::ForgetHost {
            host_id: host(n),
            release_name: false,
            reason: "test".into(),
        }),
        (any::<bool>(), any::<bool>()).prop_map(|(enabled, kill)| CommandKind::SetFlag {
            environment: "default".into(),
            service: "web".into(),
            name: "f".into(),
            enabled,
            kill,
            reason: "test".into(),
        }),
        (0u64..3, any::<bool>()).prop_map(|(request, approve)| {
            CommandKind::DecideRequest(DecideRequest {
                request,
                decision: if approve {
                    RequestDecision::Approve
                } else {
                    RequestDecision::Deny
                },
                plan_hash: String::new(),
                reason: "test".into(),
                baseline: None,
                planned: None,
            })
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_refused_command_changes_nothing_but_the_applied_index(
        commands in proptest::collection::vec(command(), 1..60),
        approvals in any::<bool>(),
    ) {
        let mut fleet = Fleet::with_web();
        fleet.register_host("web-3", "web");
        if approvals {
            fleet.state.access.policy = Some(std::sync::Arc::new(
                crate::access::Policy::from_toml(
                    "[[binding]]\nname = \"admins\"\nrole = \"admin\"\nidentities = [\"user:ada\"]\n\
                     scopes = [\"*\"]\n\n[environment.default]\napprovals = 1\n",
                )
                .unwrap(),
            ));
        }
        for (n, kind) in commands.into_iter().enumerate() {
            // Half of them from another identity, so approvals can be given.
            let identity = if n % 2 == 0 { "operator" } else { "user:ada" };
            let mut command = Command {
                at_ms: 1_000 * (fleet.index + 1),
                identity: identity.into(),
                request_id: String::new(),
                kind,
            };
            // What the leader refuses never reaches the log.
            if decision::prepare(&fleet.state, &mut command).is_err() {
                continue;
            }
            let before = fleet.state.clone();
            if let Err(error) = fleet.run_prepared(command.clone()) {
                let mut after = fleet.state.clone();
                after.applied_index = before.applied_index;
                prop_assert!(
                    after == before,
                    "{} was refused ({error}) but changed the state",
                    command.kind.action()
                );
            }
        }
    }
}
