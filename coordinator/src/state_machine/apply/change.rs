//! Changes: starting one (or filing it for approval) and the hosts it selects.

use super::*;

pub(super) fn start_change(
    state: &mut State,
    command: &Command,
    start: &StartChange,
) -> Result<(u64, String, String)> {
    let StartChange {
        service,
        version,
        host_ids: requested_hosts,
        reason,
        baseline,
        flags_on,
        migrations,
        break_glass: _,
    } = start;
    let (service, version, baseline) = (service.as_str(), version.as_str(), *baseline);
    require_release(state, service, version)?;
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
    if let Some(rollback) = state.rollbacks.values().find(|rollback| {
        rollback.services.iter().any(|name| name == service) && !rollback.status.is_terminal()
    }) {
        let change = rollback
            .waves
            .iter()
            .find(|wave| wave.service == service)
            .map_or(0, |wave| wave.change);
        return Err(CoordinatorError::RollbackInProgress {
            rollback_id: rollback.id(),
            change_id: change_id(change),
            status: rollback.status,
        });
    }
    let host_ids = select_hosts(state, service, requested_hosts)?;
    let environment = crate::plan::environment_of_hosts(state, &host_ids);
    let schema = change_schema_stages(
        state,
        migrations,
        (state.next_change + 1, service),
        &environment,
    )?;
    let previous_version = current_version(state, service);
    state.next_change += 1;
    let number = state.next_change;
    let mut flags = Vec::with_capacity(flags_on.len());
    for name in flags_on {
        let before = state
            .flag(&environment, service, name)
            .map(|flag| flag.enabled);
        flags.push(FlagChangeRecord {
            name: name.clone(),
            before,
        });
        state.put_flag(
            [&environment, service, name],
            FlagRecord {
                enabled: true,
                killed: false,
                updated_at_ms: command.at_ms,
                updated_by: command.identity.clone(),
                reason: format!("turned on by {}", change_id(number)),
                changed_at_index: 0,
                by_change: number,
            },
        );
    }
    let hosts = host_ids
        .iter()
        .map(|host_id| ChangeHostRecord {
            host_id: host_id.clone(),
            snapshot_id: String::new(),
            capture: StepProgress::default(),
            activate: StepProgress::default(),
            self_reverted: None,
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
            environment,
            flags,
            auto_refused: false,
            schema,
            approved_by: Vec::new(),
            request: 0,
            break_glass: false,
            drill: 0,
        },
    );
    let mut audit = format!(
        "ok: {service} {previous_version} -> {version} on {}",
        host_ids.join(",")
    );
    if !migrations.is_empty() {
        let named: Vec<String> = migrations
            .iter()
            .map(|(database, version)| format!("{database}@{version}"))
            .collect();
        audit += &format!("; migrations {}", named.join(", "));
    }
    Ok((number, change_id(number), audit))
}

/// A deploy: started at once where the hosts' environments ask for no approvals; otherwise
/// filed as a request bound to its plan, or run at once by break-glass where allowed.
pub(super) fn request_change(
    state: &mut State,
    command: &Command,
    start: &StartChange,
) -> Result<(Outcome, String, String)> {
    let StartChange {
        service,
        version,
        host_ids: requested_hosts,
        reason,
        baseline,
        flags_on,
        migrations,
        break_glass,
    } = start;
    require_release(state, service, version)?;
    let spec = approvals::DeploySpec {
        service: service.clone(),
        version: version.clone(),
        previous_version: current_version(state, service),
        requested_hosts: requested_hosts.clone(),
        hosts: select_hosts(state, service, requested_hosts)?,
        flags_on: flags_on.clone(),
        migrations: migrations.clone(),
        baseline: *baseline,
    };
    let requirement = approvals::deploy_requirement(state, &spec);
    let frozen = freeze_of(state, service, command.at_ms);
    if let Some((window, until_ms)) = &frozen {
        if !break_glass {
            return Err(frozen_error(service, window, *until_ms));
        }
        if let Some(environment) = spec
            .environments(state)
            .into_iter()
            .find(|environment| !break_glass_allowed(state, environment))
        {
            return Err(CoordinatorError::invalid(
                "break_glass",
                format!(
                    "the policy of {environment} does not allow break-glass: {service} is frozen \
                     ({window}) until {}",
                    rfc3339(*until_ms)
                ),
            ));
        }
    }
    if requirement.approvals == 0 && frozen.is_none() {
        let (number, target, audit) = start_change(state, command, start)?;
        return Ok((Outcome::Change(number), target, audit));
    }
    if !break_glass {
        // What start_change would refuse about its migrations is refused now, not after the
        // approvals (a change or rollback in progress only makes it wait).
        let environment = crate::plan::environment_of_hosts(state, &spec.hosts);
        change_schema_stages(
            state,
            migrations,
            (state.next_change + 1, service),
            &environment,
        )?;
        return approvals::file_deploy(state, command, spec, &requirement, reason);
    }
    if requirement.approvals > 0 && !requirement.break_glass {
        return Err(no_break_glass(&requirement));
    }
    let (number, target, audit) = start_change(state, command, start)?;
    let request =
        approvals::record_break_glass_deploy(state, command, spec, &requirement, reason, number);
    if let Some(change) = state.changes.get_mut(&number) {
        change.break_glass = true;
        change.request = request;
    }
    let mut bypassed = Vec::new();
    if requirement.approvals > 0 {
        bypassed.push(without_approvals(&requirement));
    }
    if let Some((window, _)) = &frozen {
        bypassed.push(format!("inside {service}'s freeze window ({window})"));
        if let Some(record) = state.approval_requests.get_mut(&request) {
            record.detail = format!(
                "ran at once {}: {}",
                bypassed.join(" and "),
                change_id(number)
            );
        }
    }
    escalate_break_glass(
        state,
        command,
        &bypassed.join(" and "),
        request,
        approvals::Started::Change(number),
        service,
        reason,
    );
    Ok((
        Outcome::Change(number),
        target,
        break_glass_audit(request, &audit),
    ))
}

/// Opens the escalation of a break-glass start (`started`, recorded as `request`); answers the
/// escalation's id.
pub(super) fn escalate_break_glass(
    state: &mut State,
    command: &Command,
    bypassed: &str,
    request: u64,
    started: approvals::Started,
    service: &str,
    reason: &str,
) -> u64 {
    let review = approvals::request_id(request);
    let evidence = format!(
        "break-glass: {} started {} {bypassed} ({review} to review: rewindctl request review {review}): {reason}",
        command.identity,
        started.id(),
    );
    let rollback = match started {
        approvals::Started::Rollback(rollback) => rollback,
        approvals::Started::Change(_) => 0,
    };
    state.escalate(command.at_ms, rollback, 0, service, evidence)
}

/// What a break-glass start went without: `without the 2 approvals prod requires`.
pub(super) fn without_approvals(requirement: &approvals::Requirement) -> String {
    format!(
        "without the {} approvals {} requires",
        requirement.approvals,
        requirement.environments.join(", ")
    )
}

/// The freeze window `service` is in at `at_ms` (from version 6), and when it ends.
pub(super) fn freeze_of(state: &State, service: &str, at_ms: u64) -> Option<(String, u64)> {
    if state.cluster_version() < version::SERVICE_OBJECTIVES {
        return None;
    }
    let (window, until_ms) = state.services.get(service)?.frozen_at(at_ms)?;
    Some((window.to_string(), until_ms))
}

pub(super) fn frozen_error(service: &str, window: &str, until_ms: u64) -> CoordinatorError {
    CoordinatorError::ServiceFrozen {
        service: service.to_string(),
        window: window.to_string(),
        until: rfc3339(until_ms),
    }
}

/// When a freeze ends, for people: RFC 3339, or that it does not.
fn rfc3339(at_ms: u64) -> String {
    if at_ms == rewind_shared::freeze::NO_END {
        return "further notice (its windows leave no gap)".into();
    }
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at_ms);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Whether the policy lets an operator run without approvals in `environment` (no policy: yes).
fn break_glass_allowed(state: &State, environment: &str) -> bool {
    state
        .access
        .policy
        .as_deref()
        .is_none_or(|policy| policy.environment(environment).break_glass)
}

/// The audit outcome of a break-glass start.
pub(super) fn break_glass_audit(request: u64, audit: &str) -> String {
    format!(
        "break-glass ({} to review): {audit}",
        approvals::request_id(request)
    )
}

pub(super) fn no_break_glass(requirement: &approvals::Requirement) -> CoordinatorError {
    CoordinatorError::invalid(
        "break_glass",
        format!(
            "the policy of {} does not allow break-glass: ask for the {} approvals it requires",
            requirement.environments.join(", "),
            requirement.approvals
        ),
    )
}

pub(in crate::state_machine) fn select_hosts(
    state: &State,
    service: &str,
    requested: &[String],
) -> Result<Vec<String>> {
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

pub(super) fn change_step_mut<'a>(
    state: &'a mut State,
    step: &StepTarget,
) -> Result<&'a mut StepProgress> {
    let (change, host_id, capture) = match step {
        StepTarget::Capture { change, host_id } => (*change, host_id, true),
        StepTarget::Activate { change, host_id } => (*change, host_id, false),
        StepTarget::Rollback { .. } | StepTarget::Gate { .. } | StepTarget::Schema { .. } => {
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

pub(super) fn change_host_mut<'a>(
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
