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

/// Applies `command` as the log would; if it is refused, the state must be as before.
fn applies_or_changes_nothing(fleet: &mut Fleet, command: Command) -> Result<(), TestCaseError> {
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
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// From a fleet with two deployed changes (so rollbacks, gates and requests can happen):
    /// random commands from two identities, time jumping ahead (requests expire), some decided
    /// on the leader and applied only after the next command (so decisions go stale).
    #[test]
    fn a_refused_command_changes_nothing_but_the_applied_index(
        commands in proptest::collection::vec((command(), any::<bool>(), 0u64..900), 1..60),
        approvals in any::<bool>(),
    ) {
        let mut fleet = Fleet::with_web();
        fleet.deploy_web("v1");
        fleet.deploy_web("v2");
        if approvals {
            fleet.state.access.policy = Some(std::sync::Arc::new(
                crate::access::Policy::from_toml(
                    "[[binding]]\nname = \"admins\"\nrole = \"admin\"\nidentities = [\"user:ada\"]\n\
                     scopes = [\"*\"]\n\n[environment.default]\napprovals = 1\nrequest-ttl-s = 600\n",
                )
                .unwrap(),
            ));
        }
        let mut at_ms = 1_000 * fleet.index;
        let mut late: Option<Command> = None;
        for (n, (mut kind, defer, advance_s)) in commands.into_iter().enumerate() {
            at_ms += 1_000 + advance_s * 1_000;
            // An approval names the plan its request shows, as a person's would.
            if let CommandKind::DecideRequest(decide) = &mut kind
                && let Some(request) = fleet.state.approval_requests.get(&decide.request)
            {
                decide.plan_hash = request.plan_hash.clone();
            }
            // Half of them from another identity, so requests can be approved.
            let identity = if n % 2 == 0 { "operator" } else { "user:ada" };
            let mut command = Command {
                at_ms,
                identity: identity.into(),
                request_id: String::new(),
                audit_seed: String::new(),
                kind,
            };
            // What the leader refuses never reaches the log.
            if decision::prepare(&fleet.state, &mut command).is_err() {
                continue;
            }
            if defer && late.is_none() {
                late = Some(command);
                continue;
            }
            applies_or_changes_nothing(&mut fleet, command)?;
            if let Some(late) = late.take() {
                applies_or_changes_nothing(&mut fleet, late)?;
            }
        }
    }
}
