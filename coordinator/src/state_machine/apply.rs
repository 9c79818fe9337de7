//! `apply()`: the pure transition function of the replicated state.
//!
//! No clock, no randomness, no I/O: everything comes from the command. A rejected command changes
//! nothing (each handler checks before it mutates) except `applied_index`.

use super::command::{Command, CommandKind, MembershipChange, Outcome, RollbackAction, StepTarget};
use super::state::*;
use crate::errors::{CoordinatorError, known_list};

type Result<T> = std::result::Result<T, CoordinatorError>;

/// Identity used for the engine's own commands.
pub const COORDINATOR_IDENTITY: &str = "coordinator";

/// Applies the command at log position `index`.
pub fn apply(state: &mut State, index: u64, command: &Command) -> Result<Outcome> {
    if let CommandKind::ChangeMembership { .. } = command.kind {
        state.applied_index = index;
        return Err(CoordinatorError::invalid(
            "command",
            "a membership change travels only as a Raft configuration change",
        ));
    }
    record(state, index, command, apply_kind)
}

/// Applies the membership command carried by the Raft conf change at `index` (Raft has changed
/// its own voters already): the member registry follows, and the audit log records who asked.
pub fn apply_membership(state: &mut State, index: u64, command: &Command) -> Result<Outcome> {
    record(state, index, command, |state, command| {
        let CommandKind::ChangeMembership {
            change,
            member,
            reason,
        } = &command.kind
        else {
            return Err(CoordinatorError::invalid(
                "command",
                format!("a conf change carried {:?}", command.kind.action()),
            ));
        };
        match change {
            MembershipChange::AddLearner | MembershipChange::Promote => {
                state.members.insert(member.id, member.clone());
            }
            MembershipChange::Remove => {
                state.members.remove(&member.id);
            }
        }
        Ok((
            Outcome::Done,
            format!("member-{}", member.id),
            format!(
                "ok: {} in {} ({}): {reason}",
                member.address, member.region, member.name
            ),
        ))
    })
}

/// Runs `kind_apply` unless the request was seen before, then audits and remembers it.
fn record(
    state: &mut State,
    index: u64,
    command: &Command,
    kind_apply: impl FnOnce(&mut State, &Command) -> Result<(Outcome, String, String)>,
) -> Result<Outcome> {
    state.applied_index = index;
    let request_key = request_key(command);
    if let Some(outcome) = request_key
        .as_deref()
        .and_then(|key| state.requests.get(key))
    {
        return Ok(outcome.clone());
    }
    let (outcome, target, audit_outcome) = kind_apply(state, command)?;
    state.audit.append(
        command.at_ms,
        &command.identity,
        command.kind.action(),
        &target,
        &audit_outcome,
    );
    if let Some(key) = request_key {
        state.requests.remember(&key, outcome.clone());
    }
    Ok(outcome)
}

/// Request ids are the client's own, so they are scoped by who sent them.
fn request_key(command: &Command) -> Option<String> {
    (!command.request_id.is_empty()).then(|| format!("{}/{}", command.identity, command.request_id))
}

/// Returns the outcome, the audit target and the audit outcome text.
fn apply_kind(state: &mut State, command: &Command) -> Result<(Outcome, String, String)> {
    let at_ms = command.at_ms;
    match &command.kind {
        CommandKind::RegisterHost {
            host_id,
            labels,
            services,
            agent_version,
        } => {
            let host = HostRecord {
                host_id: host_id.clone(),
                labels: labels.clone(),
                services: services.clone(),
                agent_version: agent_version.clone(),
                identity: command.identity.clone(),
                registered_at_ms: at_ms,
            };
            state.hosts.insert(host_id.clone(), host);
            Ok((
                Outcome::Done,
                host_id.clone(),
                format!("ok: services {}", services.join(",")),
            ))
        }
        CommandKind::PutService { service } => {
            check_no_cycle(state, service)?;
            state.services.insert(service.name.clone(), service.clone());
            Ok((Outcome::Done, service.name.clone(), "ok".into()))
        }
        CommandKind::RegisterRelease { release } => register_release(state, release, at_ms),
        CommandKind::StartChange {
            service,
            version,
            host_ids,
            reason,
            baseline,
        } => start_change(
            state, command, service, version, host_ids, reason, *baseline,
        ),
        CommandKind::StepStarted { step } => start_step(state, step, at_ms),
        CommandKind::StepFinished {
            step,
            ok,
            detail,
            snapshot_id,
        } => finish_step(state, step, *ok, detail, snapshot_id, at_ms),
        CommandKind::StartRollback {
            change,
            reason,
            trigger,
            max_parallel,
        } => start_rollback(state, command, *change, reason, *trigger, *max_parallel),
        CommandKind::ControlRollback {
            rollback,
            action,
            reason,
        } => control_rollback(state, *rollback, *action, reason, at_ms),
        CommandKind::TransferLeader { to, reason } => Ok((
            Outcome::Done,
            format!("member-{to}"),
            format!("ok: {reason}"),
        )),
        // Refused by apply(); kept exhaustive so a new kind is not forgotten here.
        CommandKind::ChangeMembership { .. } => Err(CoordinatorError::invalid(
            "command",
            "a membership change travels only as a Raft configuration change",
        )),
    }
}

fn check_no_cycle(state: &State, service: &ServiceRecord) -> Result<()> {
    // Depth-first walk from the new edges; bounded by the number of services.
    let mut stack: Vec<(String, String)> = service
        .depends_on
        .iter()
        .map(|provider| (provider.clone(), format!("{} -> {provider}", service.name)))
        .collect();
    let mut visited = std::collections::BTreeSet::new();
    while let Some((current, path)) = stack.pop() {
        if current == service.name {
            return Err(CoordinatorError::DependencyCycle {
                service: service.name.clone(),
                path,
            });
        }
        if !visited.insert(current.clone()) {
            continue;
        }
        if let Some(provider) = state.services.get(&current) {
            for next in &provider.depends_on {
                stack.push((next.clone(), format!("{path} -> {next}")));
            }
        }
    }
    Ok(())
}

fn register_release(
    state: &mut State,
    release: &ReleaseRecord,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    require_service(state, &release.service)?;
    let target = format!("{}@{}", release.service, release.version);
    let versions = state.releases.entry(release.service.clone()).or_default();
    if let Some(existing) = versions.get(&release.version) {
        if existing.artifact_digest == release.artifact_digest && existing.commit == release.commit
        {
            return Ok((Outcome::Done, target, "ok: already registered".into()));
        }
        return Err(CoordinatorError::ReleaseConflict {
            service: release.service.clone(),
            version: release.version.clone(),
            existing: existing.artifact_digest.clone(),
        });
    }
    versions.insert(
        release.version.clone(),
        std::sync::Arc::new(ReleaseRecord {
            registered_at_ms: at_ms,
            ..release.clone()
        }),
    );
    Ok((
        Outcome::Done,
        target,
        format!("ok: {}", release.artifact_digest),
    ))
}

fn start_change(
    state: &mut State,
    command: &Command,
    service: &str,
    version: &str,
    requested_hosts: &[String],
    reason: &str,
    baseline: HealthAggregate,
) -> Result<(Outcome, String, String)> {
    require_service(state, service)?;
    let versions = state.releases.get(service);
    if !versions.is_some_and(|versions| versions.contains_key(version)) {
        return Err(CoordinatorError::UnknownRelease {
            service: service.to_string(),
            version: version.to_string(),
            known: known_list(
                versions
                    .into_iter()
                    .flat_map(|versions| versions.keys().cloned()),
            ),
        });
    }
    if let Some(active) = state.changes.values().find(|change| {
        change.service == service
            && matches!(
                change.status,
                ChangeStatus::Capturing | ChangeStatus::Deploying
            )
    }) {
        return Err(CoordinatorError::ChangeInProgress {
            change_id: active.id(),
            service: service.into(),
            status: active.status,
        });
    }
    if let Some(rollback) = state
        .rollbacks
        .values()
        .find(|rollback| rollback.service == service && !rollback.status.is_terminal())
    {
        return Err(CoordinatorError::RollbackInProgress {
            rollback_id: rollback.id(),
            change_id: change_id(rollback.change),
            status: rollback.status,
        });
    }
    let host_ids = select_hosts(state, service, requested_hosts)?;
    let previous_version = current_version(state, service);
    state.next_change += 1;
    let number = state.next_change;
    let hosts = host_ids
        .iter()
        .map(|host_id| ChangeHostRecord {
            host_id: host_id.clone(),
            snapshot_id: String::new(),
            capture: StepProgress::default(),
            activate: StepProgress::default(),
        })
        .collect();
    state.changes.insert(
        number,
        ChangeRecord {
            number,
            service: service.to_string(),
            version: version.to_string(),
            previous_version: previous_version.clone(),
            status: ChangeStatus::Capturing,
            hosts,
            baseline,
            started_at_ms: command.at_ms,
            deployed_at_ms: 0,
            started_by: command.identity.clone(),
            reason: reason.to_string(),
            rollback: 0,
        },
    );
    let audit = format!(
        "ok: {service} {previous_version} -> {version} on {}",
        host_ids.join(",")
    );
    Ok((Outcome::Change(number), change_id(number), audit))
}

fn select_hosts(state: &State, service: &str, requested: &[String]) -> Result<Vec<String>> {
    if requested.is_empty() {
        let hosts: Vec<String> = state
            .hosts
            .values()
            .filter(|host| host.services.iter().any(|name| name == service))
            .map(|host| host.host_id.clone())
            .collect();
        if hosts.is_empty() {
            return Err(CoordinatorError::NoHosts {
                service: service.to_string(),
            });
        }
        return Ok(hosts);
    }
    let mut hosts = Vec::with_capacity(requested.len());
    for host_id in requested {
        let host = state
            .hosts
            .get(host_id)
            .ok_or_else(|| CoordinatorError::UnknownHost {
                host_id: host_id.clone(),
            })?;
        if !host.services.iter().any(|name| name == service) {
            return Err(CoordinatorError::HostWithoutService {
                host_id: host_id.clone(),
                service: service.to_string(),
            });
        }
        if !hosts.contains(host_id) {
            hosts.push(host_id.clone());
        }
    }
    Ok(hosts)
}

/// The version the coordinator believes the service runs: that of its latest deployed change, or
/// what that change replaced if it was rolled back. Empty when unknown.
pub fn current_version(state: &State, service: &str) -> String {
    state
        .changes
        .values()
        .rev()
        .filter(|change| change.service == service)
        .find_map(|change| match change.status {
            ChangeStatus::Deployed => Some(change.version.clone()),
            ChangeStatus::RolledBack => Some(change.previous_version.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn start_step(
    state: &mut State,
    step: &StepTarget,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    let step_id = step.step_id();
    let not_startable = |reason: String| CoordinatorError::StepNotStartable {
        step_id: step_id.clone(),
        reason,
    };
    let progress = match step {
        StepTarget::Capture { change, .. } | StepTarget::Activate { change, .. } => {
            let record = state
                .changes
                .get(change)
                .ok_or_else(|| unknown_change(state, *change))?;
            let wanted = if matches!(step, StepTarget::Capture { .. }) {
                ChangeStatus::Capturing
            } else {
                ChangeStatus::Deploying
            };
            if record.status != wanted {
                return Err(not_startable(format!(
                    "change {} is {:?}",
                    record.id(),
                    record.status
                )));
            }
            change_step_mut(state, step)?
        }
        StepTarget::Rollback { rollback, .. } => {
            let record = state
                .rollbacks
                .get(rollback)
                .ok_or_else(|| unknown_rollback(state, *rollback))?;
            if record.status != RollbackStatus::Running {
                return Err(not_startable(format!(
                    "rollback {} is {:?}",
                    record.id(),
                    record.status
                )));
            }
            rollback_step_mut(state, step)?
        }
    };
    if progress.status.is_terminal() {
        return Err(not_startable(format!(
            "it already ended {:?}",
            progress.status
        )));
    }
    progress.status = StepStatus::Running;
    progress.attempts += 1;
    progress.started_at_ms = at_ms;
    let attempt = progress.attempts;
    Ok((Outcome::Done, step_id, format!("ok: attempt {attempt}")))
}

fn finish_step(
    state: &mut State,
    step: &StepTarget,
    ok: bool,
    detail: &str,
    snapshot_id: &str,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    let step_id = step.step_id();
    let progress = match step {
        StepTarget::Rollback { .. } => rollback_step_mut(state, step)?,
        _ => change_step_mut(state, step)?,
    };
    if progress.status != StepStatus::Running {
        return Err(CoordinatorError::StepNotRunning {
            step_id,
            status: format!("{:?}", progress.status),
        });
    }
    progress.status = if ok {
        StepStatus::Succeeded
    } else {
        StepStatus::Failed
    };
    progress.finished_at_ms = at_ms;
    progress.detail = detail.to_string();
    match step {
        StepTarget::Capture { change, host_id } => {
            if let Some(host) = change_host_mut(state, *change, host_id) {
                host.snapshot_id = snapshot_id.to_string();
            }
            settle_change(state, *change, at_ms);
        }
        StepTarget::Activate { change, .. } => settle_change(state, *change, at_ms),
        StepTarget::Rollback { rollback, .. } => settle_rollback(state, *rollback, at_ms),
    }
    let outcome = if ok {
        format!("ok: {detail}")
    } else {
        format!("failed: {detail}")
    };
    Ok((Outcome::Done, step_id, outcome))
}

/// Moves a change on once its current phase has ended on every host.
fn settle_change(state: &mut State, number: u64, at_ms: u64) {
    let Some(change) = state.changes.get_mut(&number) else {
        return;
    };
    let phase = |host: &ChangeHostRecord| match change.status {
        ChangeStatus::Capturing => host.capture.clone(),
        _ => host.activate.clone(),
    };
    if !matches!(
        change.status,
        ChangeStatus::Capturing | ChangeStatus::Deploying
    ) {
        return;
    }
    if let Some(failed) = change
        .hosts
        .iter()
        .find(|host| phase(host).status == StepStatus::Failed)
    {
        let what = if change.status == ChangeStatus::Capturing {
            "capture"
        } else {
            "activation"
        };
        change.reason = format!(
            "{what} failed on {}: {}",
            failed.host_id,
            phase(failed).detail
        );
        change.status = ChangeStatus::Failed;
        return;
    }
    if change
        .hosts
        .iter()
        .all(|host| phase(host).status == StepStatus::Succeeded)
    {
        if change.status == ChangeStatus::Capturing {
            change.status = ChangeStatus::Deploying;
        } else {
            change.status = ChangeStatus::Deployed;
            change.deployed_at_ms = at_ms;
        }
    }
}

/// Ends a rollback when every step succeeded, or when a step failed and nothing is running.
fn settle_rollback(state: &mut State, number: u64, at_ms: u64) {
    let Some(rollback) = state.rollbacks.get_mut(&number) else {
        return;
    };
    if rollback.status.is_terminal() {
        return;
    }
    let steps = &rollback.steps;
    if steps
        .iter()
        .all(|step| step.progress.status == StepStatus::Succeeded)
    {
        rollback.status = RollbackStatus::Succeeded;
        rollback.finished_at_ms = at_ms;
        rollback.outcome_detail = format!(
            "{} hosts reverted and verified healthy",
            rollback.host_order().len()
        );
        if let Some(change) = state.changes.get_mut(&rollback.change) {
            change.status = ChangeStatus::RolledBack;
        }
        return;
    }
    let failed: Vec<&RollbackStepRecord> = steps
        .iter()
        .filter(|step| step.progress.status == StepStatus::Failed)
        .collect();
    if failed.is_empty() || hosts_in_progress(rollback) {
        return;
    }
    let mut failed_hosts: Vec<String> = failed.iter().map(|step| step.host_id.clone()).collect();
    failed_hosts.dedup();
    rollback.outcome_detail = format!(
        "{} on {} failed: {}",
        failed[0].kind.name(),
        failed[0].host_id,
        failed[0].progress.detail
    );
    rollback.failed_hosts = failed_hosts;
    rollback.status = RollbackStatus::Failed;
    rollback.finished_at_ms = at_ms;
    skip_pending(rollback);
}

/// Whether a step runs, or a host that began and has not failed still has steps to take (the
/// engine finishes such hosts even after another host failed).
fn hosts_in_progress(rollback: &RollbackRecord) -> bool {
    rollback
        .steps
        .iter()
        .any(|step| step.progress.status == StepStatus::Running)
        || rollback.host_order().into_iter().any(|host_id| {
            let steps = || {
                rollback
                    .steps
                    .iter()
                    .filter(move |step| step.host_id == host_id)
            };
            let began = steps().any(|step| step.progress.attempts > 0);
            let failed = steps().any(|step| step.progress.status == StepStatus::Failed);
            began && !failed && steps().any(|step| step.progress.status == StepStatus::Pending)
        })
}

fn skip_pending(rollback: &mut RollbackRecord) {
    for step in &mut rollback.steps {
        if step.progress.status == StepStatus::Pending {
            step.progress.status = StepStatus::Skipped;
        }
    }
}

fn start_rollback(
    state: &mut State,
    command: &Command,
    change_number: u64,
    reason: &str,
    trigger: Trigger,
    max_parallel: u32,
) -> Result<(Outcome, String, String)> {
    let change = state
        .changes
        .get(&change_number)
        .ok_or_else(|| unknown_change(state, change_number))?;
    // A snapshot taken before an older change would also undo every newer one, silently.
    if let Some(latest) = state
        .changes
        .values()
        .rev()
        .find(|other| other.service == change.service)
        && latest.number != change_number
    {
        return Err(CoordinatorError::NotLatestChange {
            change_id: change.id(),
            service: change.service.clone(),
            latest: latest.id(),
        });
    }
    if let Some(previous) = state.rollbacks.get(&change.rollback) {
        let in_progress = !previous.status.is_terminal();
        if in_progress {
            return Err(CoordinatorError::RollbackInProgress {
                rollback_id: previous.id(),
                change_id: change.id(),
                status: previous.status,
            });
        }
        // One automatic rollback per change: after that a person decides.
        if previous.status == RollbackStatus::Succeeded || trigger == Trigger::Automatic {
            return Err(CoordinatorError::AlreadyRolledBack {
                change_id: change.id(),
                rollback_id: previous.id(),
            });
        }
    }
    // Only hosts where activation was attempted changed; the others still run the old release.
    let hosts: Vec<String> = change
        .hosts
        .iter()
        .filter(|host| host.activate.status != StepStatus::Pending && !host.snapshot_id.is_empty())
        .map(|host| host.host_id.clone())
        .collect();
    if hosts.is_empty() {
        return Err(CoordinatorError::NothingToRevert {
            change_id: change.id(),
        });
    }
    let service = change.service.clone();
    state.next_rollback += 1;
    let number = state.next_rollback;
    let steps = hosts
        .iter()
        .flat_map(|host_id| {
            RollbackStepKind::ALL
                .into_iter()
                .map(|kind| RollbackStepRecord {
                    host_id: host_id.clone(),
                    kind,
                    progress: StepProgress::default(),
                })
        })
        .collect();
    let rollback = RollbackRecord {
        number,
        change: change_number,
        service,
        status: RollbackStatus::Running,
        trigger,
        reason: reason.to_string(),
        started_by: command.identity.clone(),
        started_at_ms: command.at_ms,
        finished_at_ms: 0,
        max_parallel: max_parallel.max(1),
        steps,
        outcome_detail: String::new(),
        failed_hosts: Vec::new(),
    };
    state.rollbacks.insert(number, rollback);
    if let Some(change) = state.changes.get_mut(&change_number) {
        change.rollback = number;
        if matches!(
            change.status,
            ChangeStatus::Capturing | ChangeStatus::Deploying
        ) {
            change.status = ChangeStatus::Failed;
            change.reason = format!("interrupted by rollback {}", rollback_id(number));
        }
    }
    let audit = format!(
        "ok: {trigger:?} rollback of {} on {}: {reason}",
        change_id(change_number),
        hosts.join(",")
    );
    Ok((Outcome::Rollback(number), rollback_id(number), audit))
}

fn control_rollback(
    state: &mut State,
    number: u64,
    action: RollbackAction,
    reason: &str,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    let known = known_list(state.rollbacks.keys().map(|&number| rollback_id(number)));
    let rollback =
        state
            .rollbacks
            .get_mut(&number)
            .ok_or_else(|| CoordinatorError::UnknownRollback {
                rollback_id: rollback_id(number),
                known,
            })?;
    let next = match (action, rollback.status) {
        (RollbackAction::Pause, RollbackStatus::Running) => RollbackStatus::Paused,
        (RollbackAction::Resume, RollbackStatus::Paused) => RollbackStatus::Running,
        (RollbackAction::Abort, RollbackStatus::Running | RollbackStatus::Paused) => {
            RollbackStatus::Aborted
        }
        (_, status) => {
            return Err(CoordinatorError::RollbackNotControllable {
                rollback_id: rollback.id(),
                status,
                action: action.name().into(),
            });
        }
    };
    rollback.status = next;
    if next == RollbackStatus::Aborted {
        rollback.finished_at_ms = at_ms;
        rollback.outcome_detail = format!("aborted: {reason}");
        skip_pending(rollback);
    }
    Ok((
        Outcome::Rollback(number),
        rollback.id(),
        format!("ok: {reason}"),
    ))
}

fn change_step_mut<'a>(state: &'a mut State, step: &StepTarget) -> Result<&'a mut StepProgress> {
    let (change, host_id, capture) = match step {
        StepTarget::Capture { change, host_id } => (*change, host_id, true),
        StepTarget::Activate { change, host_id } => (*change, host_id, false),
        StepTarget::Rollback { .. } => {
            return Err(CoordinatorError::UnknownStep {
                step_id: step.step_id(),
            });
        }
    };
    let host =
        change_host_mut(state, change, host_id).ok_or_else(|| CoordinatorError::UnknownStep {
            step_id: step.step_id(),
        })?;
    Ok(if capture {
        &mut host.capture
    } else {
        &mut host.activate
    })
}

fn change_host_mut<'a>(
    state: &'a mut State,
    change: u64,
    host_id: &str,
) -> Option<&'a mut ChangeHostRecord> {
    state
        .changes
        .get_mut(&change)?
        .hosts
        .iter_mut()
        .find(|host| host.host_id == host_id)
}

fn rollback_step_mut<'a>(state: &'a mut State, step: &StepTarget) -> Result<&'a mut StepProgress> {
    let StepTarget::Rollback {
        rollback,
        host_id,
        kind,
    } = step
    else {
        return Err(CoordinatorError::UnknownStep {
            step_id: step.step_id(),
        });
    };
    state
        .rollbacks
        .get_mut(rollback)
        .and_then(|record| {
            record
                .steps
                .iter_mut()
                .find(|candidate| &candidate.host_id == host_id && candidate.kind == *kind)
        })
        .map(|record| &mut record.progress)
        .ok_or_else(|| CoordinatorError::UnknownStep {
            step_id: step.step_id(),
        })
}

fn require_service(state: &State, service: &str) -> Result<()> {
    if state.services.contains_key(service) {
        return Ok(());
    }
    Err(CoordinatorError::UnknownService {
        service: service.to_string(),
        known: known_list(state.services.keys().cloned()),
    })
}

pub fn unknown_change(state: &State, number: u64) -> CoordinatorError {
    CoordinatorError::UnknownChange {
        change_id: change_id(number),
        known: known_list(state.changes.keys().map(|&number| change_id(number))),
    }
}

pub fn unknown_rollback(state: &State, number: u64) -> CoordinatorError {
    CoordinatorError::UnknownRollback {
        rollback_id: rollback_id(number),
        known: known_list(state.rollbacks.keys().map(|&number| rollback_id(number))),
    }
}
