//! The engine's decisions, as a pure function of the replicated state, what the leader observes
//! (connected agents, health) and the engine's own memory of what it already sent.
//!
//! `decide()` returns actions; `engine::run` carries them out. Tests feed states and observations
//! and assert the actions.

use std::collections::HashMap;

use crate::state_machine::{
    ChangeRecord, ChangeStatus, CommandKind, HealthAggregate, RollbackRecord, RollbackStatus,
    RollbackStepKind, State, StepProgress, StepStatus, StepTarget, Trigger,
};

/// Timing and retry bounds for steps.
#[derive(Clone, Debug)]
pub struct EngineLimits {
    pub step_timeout_ms: u64,
    pub max_attempts: u32,
    pub verify_timeout_ms: u64,
    /// Hosts reverted at once by rollbacks that do not say.
    pub default_max_parallel: u32,
}

/// What the leader sees outside the replicated state.
pub trait Observations {
    /// Generation of the host's current session, if it is connected.
    fn session(&self, host_id: &str) -> Option<u64>;
    /// First report after `since_ms`: do all of the service's probes pass, and why.
    fn verdict_since(&self, host_id: &str, service: &str, since_ms: u64) -> Option<(bool, String)>;
    fn aggregate(&self, service: &str, hosts: &[String], since_ms: u64) -> HealthAggregate;
}

/// The engine's memory: not replicated, rebuilt empty by a new leader (which then resends
/// running steps; agents answer those from their journals).
#[derive(Default)]
pub struct EngineMemory {
    /// step id -> (attempt, session generation) it was last sent on.
    pub sent: HashMap<String, (u32, u64)>,
    /// service -> since when its health policy has been breached.
    pub breaches: HashMap<String, u64>,
}

/// What an agent is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentAction {
    Capture,
    Activate {
        version: String,
        artifact_digest: String,
    },
    Restore {
        snapshot_id: String,
    },
    Restart,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Propose(CommandKind),
    Send {
        step: StepTarget,
        attempt: u32,
        service: String,
        action: AgentAction,
    },
}

pub fn decide(
    state: &State,
    seen: &impl Observations,
    memory: &mut EngineMemory,
    limits: &EngineLimits,
    now_ms: u64,
) -> Vec<Action> {
    let mut actions = Vec::new();
    for change in state.changes.values() {
        drive_change(state, change, seen, memory, limits, now_ms, &mut actions);
    }
    for rollback in state
        .rollbacks
        .values()
        .filter(|rollback| !rollback.status.is_terminal())
    {
        drive_rollback(state, rollback, seen, memory, limits, now_ms, &mut actions);
    }
    check_triggers(state, seen, memory, limits, now_ms, &mut actions);
    actions
}

fn drive_change(
    state: &State,
    change: &ChangeRecord,
    seen: &impl Observations,
    memory: &mut EngineMemory,
    limits: &EngineLimits,
    now_ms: u64,
    actions: &mut Vec<Action>,
) {
    let capturing = match change.status {
        ChangeStatus::Capturing => true,
        ChangeStatus::Deploying => false,
        _ => return,
    };
    for host in &change.hosts {
        let (step, progress, action) = if capturing {
            (
                StepTarget::Capture {
                    change: change.number,
                    host_id: host.host_id.clone(),
                },
                &host.capture,
                AgentAction::Capture,
            )
        } else {
            let artifact_digest = state
                .releases
                .get(&change.service)
                .and_then(|versions| versions.get(&change.version))
                .map(|release| release.artifact_digest.clone())
                .unwrap_or_default();
            let action = AgentAction::Activate {
                version: change.version.clone(),
                artifact_digest,
            };
            (
                StepTarget::Activate {
                    change: change.number,
                    host_id: host.host_id.clone(),
                },
                &host.activate,
                action,
            )
        };
        drive_agent_step(
            step,
            progress,
            &change.service,
            action,
            seen,
            memory,
            limits,
            now_ms,
            actions,
        );
    }
}

/// Starts a pending step; sends a running one to the host's current session if that session has
/// not seen this attempt; retries or fails it when it times out. A step whose host stays
/// disconnected therefore fails after `max_attempts` timeouts instead of waiting forever.
#[allow(clippy::too_many_arguments)]
fn drive_agent_step(
    step: StepTarget,
    progress: &StepProgress,
    service: &str,
    action: AgentAction,
    seen: &impl Observations,
    memory: &mut EngineMemory,
    limits: &EngineLimits,
    now_ms: u64,
    actions: &mut Vec<Action>,
) {
    let session = seen.session(step.host_id());
    match progress.status {
        StepStatus::Pending => actions.push(Action::Propose(CommandKind::StepStarted { step })),
        StepStatus::Running => {
            if now_ms.saturating_sub(progress.started_at_ms) > limits.step_timeout_ms {
                actions.push(Action::Propose(retry_or_fail(step, progress, limits)));
                return;
            }
            let Some(generation) = session else { return };
            let step_id = step.step_id();
            if memory.sent.get(&step_id) != Some(&(progress.attempts, generation)) {
                memory.sent.insert(step_id, (progress.attempts, generation));
                actions.push(Action::Send {
                    step,
                    attempt: progress.attempts,
                    service: service.to_string(),
                    action,
                });
            }
        }
        _ => {}
    }
}

fn retry_or_fail(step: StepTarget, progress: &StepProgress, limits: &EngineLimits) -> CommandKind {
    if progress.attempts < limits.max_attempts {
        return CommandKind::StepStarted { step };
    }
    CommandKind::StepFinished {
        step,
        ok: false,
        detail: format!(
            "no result after {} attempts of {} ms",
            progress.attempts, limits.step_timeout_ms
        ),
        snapshot_id: String::new(),
    }
}

fn drive_rollback(
    state: &State,
    rollback: &RollbackRecord,
    seen: &impl Observations,
    memory: &mut EngineMemory,
    limits: &EngineLimits,
    now_ms: u64,
    actions: &mut Vec<Action>,
) {
    let Some(change) = state.changes.get(&rollback.change) else {
        return;
    };
    let any_failed = rollback
        .steps
        .iter()
        .any(|step| step.progress.status == StepStatus::Failed);
    let may_start = rollback.status == RollbackStatus::Running && !any_failed;
    let mut active_hosts = 0u32;
    for host_id in rollback.host_order() {
        let steps: Vec<_> = rollback
            .steps
            .iter()
            .filter(|step| step.host_id == host_id)
            .collect();
        let started = steps.iter().any(|step| step.progress.attempts > 0);
        let Some(next) = steps
            .iter()
            .find(|step| !step.progress.status.is_terminal())
        else {
            continue;
        };
        if !started {
            // A host not yet begun: begin it only within the parallelism bound, and never while
            // the change's own activation may still be running there.
            let activating = change
                .hosts
                .iter()
                .any(|host| host.host_id == host_id && host.activate.status == StepStatus::Running);
            if !may_start || active_hosts >= rollback.max_parallel || activating {
                continue;
            }
        }
        active_hosts += 1;
        let target = StepTarget::Rollback {
            rollback: rollback.number,
            host_id: host_id.to_string(),
            kind: next.kind,
        };
        if next.progress.status == StepStatus::Pending {
            if may_start {
                actions.push(Action::Propose(CommandKind::StepStarted { step: target }));
            }
            continue;
        }
        match next.kind {
            RollbackStepKind::Verify => {
                verify_host(
                    rollback,
                    target,
                    &next.progress,
                    seen,
                    limits,
                    now_ms,
                    actions,
                );
            }
            RollbackStepKind::Restore => {
                let snapshot_id = change
                    .hosts
                    .iter()
                    .find(|host| host.host_id == host_id)
                    .map(|host| host.snapshot_id.clone())
                    .unwrap_or_default();
                let action = AgentAction::Restore { snapshot_id };
                drive_agent_step(
                    target,
                    &next.progress,
                    &rollback.service,
                    action,
                    seen,
                    memory,
                    limits,
                    now_ms,
                    actions,
                );
            }
            RollbackStepKind::Restart => {
                let action = AgentAction::Restart;
                drive_agent_step(
                    target,
                    &next.progress,
                    &rollback.service,
                    action,
                    seen,
                    memory,
                    limits,
                    now_ms,
                    actions,
                );
            }
        }
    }
}

fn verify_host(
    rollback: &RollbackRecord,
    step: StepTarget,
    progress: &StepProgress,
    seen: &impl Observations,
    limits: &EngineLimits,
    now_ms: u64,
    actions: &mut Vec<Action>,
) {
    let verdict = seen.verdict_since(step.host_id(), &rollback.service, progress.started_at_ms);
    let finished = |ok: bool, detail: String| {
        Action::Propose(CommandKind::StepFinished {
            step: step.clone(),
            ok,
            detail,
            snapshot_id: String::new(),
        })
    };
    match verdict {
        Some((true, why)) => actions.push(finished(true, why)),
        _ if now_ms.saturating_sub(progress.started_at_ms) > limits.verify_timeout_ms => {
            let why =
                verdict.map_or_else(|| "no health report arrived".to_string(), |(_, why)| why);
            actions.push(finished(
                false,
                format!(
                    "not healthy {} ms after the restart: {why}",
                    limits.verify_timeout_ms
                ),
            ));
        }
        _ => {}
    }
}

/// Fires a service's automatic rollback when its policy has been breached for long enough after
/// its latest change was deployed. At most one automatic rollback per change (apply refuses more).
fn check_triggers(
    state: &State,
    seen: &impl Observations,
    memory: &mut EngineMemory,
    limits: &EngineLimits,
    now_ms: u64,
    actions: &mut Vec<Action>,
) {
    for service in state.services.values() {
        let policy = &service.policy;
        let latest = state
            .changes
            .values()
            .rev()
            .find(|change| change.service == service.name);
        let watched = latest.filter(|change| {
            policy.auto_rollback
                && change.status == ChangeStatus::Deployed
                && change.rollback == 0
                && now_ms <= change.deployed_at_ms + u64::from(policy.watch_s) * 1000
        });
        let Some(change) = watched else {
            memory.breaches.remove(&service.name);
            continue;
        };
        let hosts: Vec<String> = change
            .hosts
            .iter()
            .map(|host| host.host_id.clone())
            .collect();
        let window_start = now_ms
            .saturating_sub(u64::from(policy.for_s) * 1000)
            .max(change.deployed_at_ms);
        let health = seen.aggregate(&service.name, &hosts, window_start);
        if health.samples == 0 || health.probe_failure_ratio <= policy.max_probe_failure_ratio {
            memory.breaches.remove(&service.name);
            continue;
        }
        let since = *memory
            .breaches
            .entry(service.name.clone())
            .or_insert(now_ms);
        if now_ms - since < u64::from(policy.for_s) * 1000 {
            continue;
        }
        let reason = format!(
            "probe failure ratio {:.2} > {:.2} for {} s after {} deployed {} (baseline {:.2}; {} samples from {} hosts)",
            health.probe_failure_ratio,
            policy.max_probe_failure_ratio,
            policy.for_s,
            change.id(),
            change.version,
            change.baseline.probe_failure_ratio,
            health.samples,
            health.hosts_reporting,
        );
        memory.breaches.remove(&service.name);
        actions.push(Action::Propose(CommandKind::StartRollback {
            change: change.number,
            reason,
            trigger: Trigger::Automatic,
            max_parallel: limits.default_max_parallel,
        }));
    }
}
