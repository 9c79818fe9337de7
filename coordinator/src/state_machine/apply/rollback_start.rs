//! Starting rollbacks: from a person, a trigger or an approved request, with the plan checked.

use super::*;
use crate::state_machine::decision::{self, LeaderPlan};

/// A person's rollback: at once where the policy asks for no approvals, as a request for them
/// where it does, or at once anyway by break-glass (escalated, and left for a review).
pub(super) fn request_rollback(
    state: &mut State,
    command: &Command,
    start: &StartRollback,
) -> Result<(Outcome, String, String)> {
    let StartRollback {
        changes,
        options,
        plan_hash,
        reason,
        trigger,
        break_glass,
        planned,
    } = start;
    let planned = planned.as_deref();
    let (trigger, break_glass) = (*trigger, *break_glass);
    if let Some(planned) = planned {
        decision::given_basis(state, planned, changes)?;
    }
    let requirement = approvals::requirement(state, changes);
    if requirement.approvals == 0 {
        let plan = plan_of(state, planned, changes, options, plan_hash, trigger)?;
        let (number, target, audit) = start_planned(state, command, &plan, reason, trigger);
        return Ok((Outcome::Rollback(number), target, audit));
    }
    let drift = planned.map(|planned| &planned.drifted);
    if !break_glass {
        let plan = plan_of(state, planned, changes, options, plan_hash, trigger)?;
        let (number, target, audit) =
            approvals::file(state, command, &plan, &requirement, reason, trigger, drift)?;
        return Ok((Outcome::Request(number), target, audit));
    }
    if !requirement.break_glass {
        return Err(no_break_glass(&requirement));
    }
    let plan = plan_of(state, planned, changes, options, plan_hash, trigger)?;
    let (number, target, audit) = start_planned(state, command, &plan, reason, trigger);
    let request =
        approvals::record_break_glass(state, command, &plan, &requirement, reason, number);
    let service = plan.services.first().cloned().unwrap_or_default();
    if let Some(rollback) = state.rollbacks.get_mut(&number) {
        rollback.break_glass = true;
        rollback.request = request;
    }
    let escalation = escalate_break_glass(
        state,
        command,
        &without_approvals(&requirement),
        request,
        approvals::Started::Rollback(number),
        &service,
        reason,
    );
    if let Some(rollback) = state.rollbacks.get_mut(&number) {
        rollback.escalations.push(escalation);
    }
    Ok((
        Outcome::Rollback(number),
        target,
        break_glass_audit(request, &audit),
    ))
}

/// A person's decision on a request; the last approval needed starts its rollback, run as the
/// requester's with the approvers named.
pub(super) fn decide_request(
    state: &mut State,
    command: &Command,
    decide: &DecideRequest,
) -> Result<(Outcome, String, String)> {
    let DecideRequest {
        request: number,
        decision,
        plan_hash,
        reason,
        baseline,
        planned,
    } = decide;
    let (number, decision, baseline) = (*number, *decision, *baseline);
    let planned = planned.as_deref();
    let target = approvals::request_id(number);
    // From version 3 the approval of a rollback request carries the leader's plan of it.
    let plan_now = match state.approval_requests.get(&number) {
        Some(request) if decision == approvals::Decision::Approve && request.deploy.is_none() => {
            match planned {
                Some(planned) => {
                    decision::given_basis(state, planned, &request.changes)?;
                    Some(&planned.plan)
                }
                None => {
                    decision::require_decided(state, "plan of the approved rollback")?;
                    None
                }
            }
        }
        _ => None,
    };
    match approvals::decide(
        state, command, number, decision, plan_hash, reason, plan_now,
    )? {
        approvals::Decided::Recorded(text) => {
            Ok((Outcome::Request(number), target, format!("ok: {text}")))
        }
        approvals::Decided::Refused(why) => Ok((
            Outcome::RequestRefused {
                request: number,
                why: why.clone(),
            },
            target,
            format!("refused: {why}"),
        )),
        approvals::Decided::Approved => {
            let request = state.approval_requests[&number].clone();
            if let Some(spec) = &request.deploy {
                return approve_deploy(state, command, &request, spec, baseline, reason);
            }
            // Starting it lapses every pending request over its changes, this one too; it is
            // recorded as approved just after.
            let plan = plan_of(
                state,
                planned,
                &request.changes,
                &request.options,
                &request.plan_hash,
                request.trigger,
            )?;
            let (rollback, rollback_target, started) =
                start_planned(state, command, &plan, &request.reason, request.trigger);
            let approved_by = approvals::record_approved(
                state,
                command,
                number,
                reason,
                approvals::Started::Rollback(rollback),
            );
            if let Some(record) = state.rollbacks.get_mut(&rollback) {
                record.started_by = request.requester.clone();
                record.approved_by = approved_by.clone();
                record.request = number;
            }
            Ok(audit_approved_start(
                state,
                command,
                &request,
                ("rollback.start", &rollback_target, &started),
                &approved_by,
                approvals::Started::Rollback(rollback),
            ))
        }
    }
}

/// The last approval of a deploy request: the deploy starts as the requester's, with the
/// baseline measured now (when given), and the request records who approved it.
pub(super) fn approve_deploy(
    state: &mut State,
    command: &Command,
    request: &approvals::ApprovalRequest,
    spec: &approvals::DeploySpec,
    baseline: Option<HealthAggregate>,
    reason: &str,
) -> Result<(Outcome, String, String)> {
    let number = request.number;
    // Approved or not, a change waits out its service's freeze window.
    if let Some((window, until_ms)) = freeze_of(state, &spec.service, command.at_ms) {
        return Err(frozen_error(&spec.service, &window, until_ms));
    }
    let deploy = StartChange {
        service: spec.service.clone(),
        version: spec.version.clone(),
        // The hosts approved (the drift check above found them unchanged).
        host_ids: spec.hosts.clone(),
        reason: request.reason.clone(),
        baseline: baseline.unwrap_or(spec.baseline),
        flags_on: spec.flags_on.clone(),
        migrations: spec.migrations.clone(),
        break_glass: false,
    };
    let as_requester = Command {
        at_ms: command.at_ms,
        identity: request.requester.clone(),
        request_id: String::new(),
        audit_seed: command.audit_seed.clone(),
        kind: CommandKind::StartChange(deploy.clone()),
    };
    let (change, change_target, started) = start_change(state, &as_requester, &deploy)?;
    let approved_by = approvals::record_approved(
        state,
        command,
        number,
        reason,
        approvals::Started::Change(change),
    );
    if let Some(record) = state.changes.get_mut(&change) {
        record.approved_by = approved_by.clone();
        record.request = number;
    }
    Ok(audit_approved_start(
        state,
        command,
        request,
        ("change.start", &change_target, &started),
        &approved_by,
        approvals::Started::Change(change),
    ))
}

/// The audit of what a last approval started: its own entry (`action` on `target`, with the
/// `started` outcome) in the requester's name, naming the approvers; the approval's entry
/// (the answer) follows.
pub(super) fn audit_approved_start(
    state: &mut State,
    command: &Command,
    request: &approvals::ApprovalRequest,
    (action, target, started): (&str, &str, &str),
    approved_by: &[String],
    what: approvals::Started,
) -> (Outcome, String, String) {
    super::append_audit(
        state,
        command,
        (&request.requester, action, target),
        // The requester's entry: the requester's reason, which `started` gives.
        (
            &format!("{started}; approved by {}", approved_by.join(", ")),
            &request.reason,
        ),
    );
    (
        Outcome::Request(request.number),
        request.id(),
        format!(
            "ok: approval {} of {}: started {}",
            approved_by.len(),
            request.needed,
            what.id()
        ),
    )
}

/// The plan of `changes`: the leader's (from cluster version 3; its basis checked by the
/// caller), or planned here on the state as it is (before); refused if it is not the one shown
/// (`plan_hash`, when given) or would break consumers without `force`.
pub(super) fn plan_of(
    state: &State,
    planned: Option<&LeaderPlan>,
    changes: &[u64],
    options: &PlanOptions,
    plan_hash: &str,
    trigger: Trigger,
) -> Result<crate::plan::Plan> {
    let (needed, what) = options.required_version();
    version::require(state, needed, what)?;
    let plan = match planned {
        Some(planned) => decision::matching_plan(planned, changes, options)?.clone(),
        None => {
            decision::require_decided(state, "rollback plan")?;
            crate::plan::build(state, changes, options, trigger)?
        }
    };
    decision::check_shown(&plan, plan_hash, options)?;
    Ok(plan)
}

/// Starts the rollback of a plan [`plan_of`] accepted: its number, audit target and outcome.
pub(super) fn start_planned(
    state: &mut State,
    command: &Command,
    plan: &crate::plan::Plan,
    reason: &str,
    trigger: Trigger,
) -> (u64, String, String) {
    let options = &plan.options;
    let forced: Vec<String> = plan
        .incompatibilities
        .iter()
        .map(|problem| problem.detail.clone())
        .collect();
    state.next_rollback += 1;
    let number = state.next_rollback;
    let mut steps = Vec::new();
    let mut waves = Vec::with_capacity(plan.waves.len());
    for (index, wave) in plan.waves.iter().enumerate() {
        let hosts = wave.hosts();
        let kinds: Vec<RollbackStepKind> = match plan.recipes.get(&wave.service) {
            Some(recipe) => recipe.iter().map(|step| step.kind).collect(),
            None => RollbackStepKind::ALL.to_vec(),
        };
        for host_id in &hosts {
            for &kind in &kinds {
                steps.push(RollbackStepRecord {
                    wave: index as u32,
                    service: wave.service.clone(),
                    host_id: host_id.clone(),
                    kind,
                    progress: StepProgress::default(),
                });
            }
        }
        waves.push(WaveRecord {
            service: wave.service.clone(),
            change: wave.change,
            region: wave.region.clone(),
            canary: wave.canary,
            hosts,
            gate: StepProgress::default(),
            isolation: false,
        });
    }
    let host_count: std::collections::BTreeSet<&str> =
        steps.iter().map(|step| step.host_id.as_str()).collect();
    let mut audit = format!(
        "ok: {trigger} rollback of {} in {} waves on {} (plan {}): {reason}",
        crate::plan::change_list(&plan.changes),
        waves.len(),
        crate::plan::plural(host_count.len(), "host"),
        plan.hash
    );
    if !forced.is_empty() {
        audit += &format!("; forced past: {}", forced.join("; "));
    }
    for stage in &plan.schema {
        audit += &format!(
            "; then reverts {} on {}",
            stage.versions.join(", "),
            stage.database
        );
    }
    if !options.accept_data_loss.is_empty() {
        audit += &format!("; data loss accepted: {}", options.accept_data_loss);
    }
    if !options.exclude_hosts.is_empty() {
        audit += &format!("; left out: {}", options.exclude_hosts.join(", "));
    }
    if options.overwrite_drift {
        audit += "; drift overwritten";
    }
    let rollback = RollbackRecord {
        number,
        changes: plan.changes.clone(),
        services: plan.services.clone(),
        status: RollbackStatus::Running,
        trigger,
        reason: reason.to_string(),
        started_by: command.identity.clone(),
        started_at_ms: command.at_ms,
        finished_at_ms: 0,
        options: plan.options.clone(),
        plan_hash: plan.hash.clone(),
        waves,
        steps,
        forced,
        paused_reason: String::new(),
        escalations: Vec::new(),
        outcome_detail: String::new(),
        failed_hosts: Vec::new(),
        skipped_hosts: Vec::new(),
        deferred_hosts: Vec::new(),
        step_lookup: Default::default(),
        flags_reverted: Vec::new(),
        isolated: Vec::new(),
        recipes: plan.recipes.clone(),
        schema: plan.schema.clone(),
        approved_by: Vec::new(),
        request: 0,
        break_glass: false,
    };
    state.rollbacks.insert(number, rollback);
    if trigger == Trigger::Automatic && !options.exclude_hosts.is_empty() {
        // The service's drift policy left hosts a person changed by hand as they are: someone
        // decides what becomes of them.
        let service = plan.services.first().cloned().unwrap_or_default();
        let evidence = format!(
            "{} left {} untouched on the release it reverts: they changed since rewind last put \
             them there (see `rewindctl service drift {service}`). Look, then revert them too \
             once the rest is done (`rewindctl rollback start --change {} --overwrite-drift`), \
             or leave them as they are",
            rollback_id(number),
            options.exclude_hosts.join(", "),
            crate::plan::change_list(&plan.changes),
        );
        let escalation = state.escalate(command.at_ms, number, 0, &service, evidence);
        if let Some(rollback) = state.rollbacks.get_mut(&number) {
            rollback.escalations.push(escalation);
        }
    }
    approvals::supersede(state, &plan.changes, number, command.at_ms);
    // A change's migrations not yet decided are aborted: the plan reverts only what was decided
    // to commit, so nothing may commit underneath the rollback.
    let change_txns: Vec<u64> = plan
        .changes
        .iter()
        .filter_map(|number| state.changes.get(number))
        .flat_map(|change| change.schema.iter().map(|stage| stage.txn))
        .collect();
    super::super::schema::abort_undecided(
        state,
        change_txns,
        &format!("{} began before it was decided", rollback_id(number)),
        command.at_ms,
    );
    // Flags first: a kill switch takes effect before any host is touched.
    let mut flags_reverted = Vec::new();
    for change_number in &plan.changes {
        let Some(change) = state.changes.get(change_number).cloned() else {
            continue;
        };
        for flag in &change.flags {
            // Only a flag the change still owns: a kill switch or a person's later choice stays.
            let owned = state
                .flag(&change.environment, &change.service, &flag.name)
                .is_some_and(|current| current.by_change == change.number);
            if !owned {
                continue;
            }
            let value = flag.before.unwrap_or(false);
            state.put_flag(
                [&change.environment, &change.service, &flag.name],
                FlagRecord {
                    enabled: value,
                    killed: false,
                    updated_at_ms: command.at_ms,
                    updated_by: command.identity.clone(),
                    reason: format!("turned back by {} before any wave", rollback_id(number)),
                    changed_at_index: 0,
                    by_change: 0,
                },
            );
            flags_reverted.push(format!(
                "{}/{}/{} -> {}",
                change.environment,
                change.service,
                flag.name,
                if value { "on" } else { "off" }
            ));
        }
    }
    if let Some(rollback) = state.rollbacks.get_mut(&number) {
        rollback.flags_reverted = flags_reverted;
    }
    for change_number in &plan.changes {
        if let Some(change) = state.changes.get_mut(change_number) {
            change.rollback = number;
            if matches!(
                change.status,
                ChangeStatus::Capturing | ChangeStatus::Deploying
            ) {
                change.status = ChangeStatus::Failed;
                change.reason = format!("interrupted by rollback {}", rollback_id(number));
            }
        }
    }
    (number, rollback_id(number), audit)
}
