//! Steps of changes and rollbacks: started, finished, and what settles after them.

use super::*;

pub(super) fn start_step(
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
                    "change {} is {}",
                    record.id(),
                    record.status
                )));
            }
            change_step_mut(state, step)?
        }
        StepTarget::Rollback { rollback, .. } | StepTarget::Gate { rollback, .. } => {
            let record = state
                .rollbacks
                .get(rollback)
                .ok_or_else(|| unknown_rollback(state, *rollback))?;
            if record.status != RollbackStatus::Running {
                return Err(not_startable(format!(
                    "rollback {} is {}",
                    record.id(),
                    record.status
                )));
            }
            let before_waves = || {
                record
                    .schema_stages()
                    .filter(|(_, stage)| !stage.after_activation)
            };
            if state.cluster_version() >= version::SCHEMA_ORDER_BY_CLASS {
                let waiting = super::super::schema::stages_state(state, before_waves());
                if let super::super::schema::StagesState::Waiting { stage, .. }
                | super::super::schema::StagesState::Failed { stage, .. }
                | super::super::schema::StagesState::Stuck { stage, .. } = waiting
                {
                    let planned = &record.schema[stage];
                    let how = match &waiting {
                        super::super::schema::StagesState::Waiting { begun: false, .. } => {
                            "not begun".to_string()
                        }
                        super::super::schema::StagesState::Waiting { .. } => "running".into(),
                        super::super::schema::StagesState::Failed { detail, .. }
                        | super::super::schema::StagesState::Stuck { detail, .. } => detail.clone(),
                        super::super::schema::StagesState::Done => String::new(),
                    };
                    return Err(not_startable(format!(
                        "{} reverts {} of {} before its app waves, and that is not done ({how})",
                        record.id(),
                        planned.versions.join(", "),
                        planned.database
                    )));
                }
            }
            if let StepTarget::Gate { wave, .. } = step {
                if record.current_wave() != Some(*wave) {
                    return Err(not_startable(format!(
                        "wave {wave} is not the current wave of {}",
                        record.id()
                    )));
                }
                if let Some(unfinished) = record.wave_steps(*wave).find(|step| {
                    step.progress.status != StepStatus::Succeeded
                        && step.progress.status != StepStatus::Skipped
                }) {
                    return Err(not_startable(format!(
                        "{} {} on {} is {}",
                        unfinished.service,
                        unfinished.kind.name(),
                        unfinished.host_id,
                        unfinished.progress.status
                    )));
                }
            }
            rollback_step_mut(state, step)?
        }
        StepTarget::Schema {
            txn,
            phase,
            host_id,
        } => {
            super::super::schema::startable(state, *txn, *phase)?;
            let progress = super::super::schema::step_mut(state, *txn, *phase, host_id)?;
            // A resolve that failed is tried again (see `schema::RESOLVE_RETRY_MS`): the
            // shard holds its prepared transaction until one succeeds.
            if *phase == ShardPhase::Resolve && progress.status == StepStatus::Failed {
                progress.status = StepStatus::Pending;
            }
            progress
        }
    };
    if progress.status.is_terminal() {
        return Err(not_startable(format!(
            "it already ended {}",
            progress.status
        )));
    }
    progress.status = StepStatus::Running;
    progress.attempts += 1;
    progress.started_at_ms = at_ms;
    let attempt = progress.attempts;
    Ok((Outcome::Done, step_id, format!("ok: attempt {attempt}")))
}

pub(super) fn finish_step(
    state: &mut State,
    step: &StepTarget,
    ok: bool,
    detail: &str,
    snapshot_id: &str,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    if let StepTarget::Schema { .. } = step {
        // The engine's timeout of a shard's step: no report.
        return finish_schema_step(state, step, ok, detail, ShardReportRecord::default(), at_ms);
    }
    let step_id = step.step_id();
    let progress = match step {
        StepTarget::Rollback { .. } | StepTarget::Gate { .. } => rollback_step_mut(state, step)?,
        _ => change_step_mut(state, step)?,
    };
    end_step(progress, &step_id, ok, detail, at_ms)?;
    let mut started_next = None;
    match step {
        StepTarget::Capture { change, host_id } => {
            if let Some(host) = change_host_mut(state, *change, host_id) {
                host.snapshot_id = snapshot_id.to_string();
            }
            settle_change(state, *change, at_ms);
        }
        StepTarget::Activate { change, .. } => settle_change(state, *change, at_ms),
        StepTarget::Rollback { rollback, .. } => {
            settle_rollback(state, *rollback, at_ms);
            if ok && state.cluster_version() >= version::CHAINED_STEPS {
                started_next = start_next_of_host(state, step, at_ms);
            }
        }
        StepTarget::Gate { rollback, wave } if !ok => {
            // A result that lands after an abort changes nothing more.
            if let Some(record) = state
                .rollbacks
                .get(rollback)
                .filter(|record| !record.status.is_terminal())
            {
                let wave_record = &record.waves[*wave as usize];
                // Waves are numbered from 1 for people, as `explain` and `watch` show them.
                let evidence = format!(
                    "gate after wave {} ({} in {}) failed: {detail}",
                    wave + 1,
                    wave_record.service,
                    wave_record.region
                );
                pause_for_a_person(state, *rollback, *wave, evidence, at_ms);
            }
        }
        StepTarget::Gate { rollback, .. } => settle_rollback(state, *rollback, at_ms),
        StepTarget::Schema { .. } => {}
    }
    let outcome = if let Some(next) = started_next {
        format!("ok: {detail}; started {next}")
    } else if ok {
        format!("ok: {detail}")
    } else {
        format!("failed: {detail}")
    };
    Ok((Outcome::Done, step_id, outcome))
}

/// After a rollback step succeeded (cluster version 13): starts its host's next step of the
/// same wave in the same entry, as the engine would have decided on its next tick
/// (`engine::decide::next_step`: the host's first step not ended, none failed), and returns
/// that step's id. A host's steps of a wave lie together in the plan's order (steps are only
/// ever appended, an isolation's in waves of their own), so they are found next to the one
/// that ended, whatever a member's lookup holds. Nothing starts for a host deferred with its
/// lost region (the engine drives those after the last wave), nor where `start_step` refuses
/// (the rollback is not running).
fn start_next_of_host(state: &mut State, finished: &StepTarget, at_ms: u64) -> Option<String> {
    let StepTarget::Rollback {
        rollback,
        service,
        host_id,
        kind,
    } = finished
    else {
        return None;
    };
    let record = state.rollbacks.get_mut(rollback)?;
    let position = step_position(record, service, host_id, *kind)?;
    let steps = &record.steps;
    let this = &steps[position];
    if record.is_deferred(this) || !record.is_current_wave(this.wave) {
        return None;
    }
    let same_block = |other: &RollbackStepRecord| {
        other.wave == this.wave && other.host_id == this.host_id && other.service == this.service
    };
    let first = position
        - steps[..position]
            .iter()
            .rev()
            .take_while(|other| same_block(other))
            .count();
    let block = steps[first..].iter().take_while(|other| same_block(other));
    if block
        .clone()
        .any(|other| other.progress.status == StepStatus::Failed)
    {
        return None;
    }
    let next = block
        .clone()
        .find(|other| !other.progress.status.is_terminal())
        .filter(|next| next.progress.status == StepStatus::Pending)?;
    let target = StepTarget::Rollback {
        rollback: *rollback,
        service: next.service.clone(),
        host_id: next.host_id.clone(),
        kind: next.kind,
    };
    start_step(state, &target, at_ms).ok()?;
    Some(target.step_id())
}

/// Records how a running step ended; refused for a step that is not running (a late or
/// duplicate result).
pub(super) fn end_step(
    progress: &mut StepProgress,
    step_id: &str,
    ok: bool,
    detail: &str,
    at_ms: u64,
) -> Result<()> {
    if progress.status != StepStatus::Running {
        return Err(CoordinatorError::StepNotRunning {
            step_id: step_id.to_string(),
            status: progress.status.to_string(),
        });
    }
    progress.status = if ok {
        StepStatus::Succeeded
    } else {
        StepStatus::Failed
    };
    progress.finished_at_ms = at_ms;
    progress.detail = detail.to_string();
    Ok(())
}

/// Moves a change on once its current phase has ended on every host.
pub(super) fn settle_change(state: &mut State, number: u64, at_ms: u64) {
    let Some(change) = state.changes.get_mut(&number) else {
        return;
    };
    // Read in place: this runs for every result of a change, over all of its hosts (a copy of
    // each host's progress here cost a 10,000-host deploy seconds of apply per batch).
    let capturing = change.status == ChangeStatus::Capturing;
    fn phase_of(capturing: bool, host: &ChangeHostRecord) -> &StepProgress {
        if capturing {
            &host.capture
        } else {
            &host.activate
        }
    }
    let phase = |host| phase_of(capturing, host);
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
        let reason = format!(
            "{what} failed on {}: {}",
            failed.host_id,
            phase(failed).detail
        );
        change.reason = reason;
        change.status = ChangeStatus::Failed;
        return;
    }
    if change
        .hosts
        .iter()
        .all(|host| phase(host).status == StepStatus::Succeeded)
    {
        // The phase's migrations (expand ones after capture, the rest after activation) must
        // have committed too.
        let after_activation = change.status == ChangeStatus::Deploying;
        let own = change.schema.clone();
        let stages = own
            .iter()
            .enumerate()
            .filter(|(_, stage)| stage.after_activation == after_activation);
        let stages = super::super::schema::stages_state(state, stages);
        let Some(change) = state.changes.get_mut(&number) else {
            return;
        };
        match stages {
            // A stuck resolve is retried until it succeeds; the change waits for it.
            super::super::schema::StagesState::Waiting { .. }
            | super::super::schema::StagesState::Stuck { .. } => {}
            super::super::schema::StagesState::Failed { detail, .. } => {
                change.reason = format!("migrations failed: {detail}");
                change.status = ChangeStatus::Failed;
            }
            super::super::schema::StagesState::Done if change.status == ChangeStatus::Capturing => {
                change.status = ChangeStatus::Deploying;
            }
            super::super::schema::StagesState::Done => {
                change.status = ChangeStatus::Deployed;
                change.deployed_at_ms = at_ms;
            }
        }
    }
}

/// Where a rollback's step of `host_id` of that kind sits in its steps: the first match, as a
/// `StepTarget` names it.
fn step_position(
    record: &mut RollbackRecord,
    service: &str,
    host_id: &str,
    kind: RollbackStepKind,
) -> Option<usize> {
    record
        .step_lookup
        .find(&record.steps, host_id, |candidate| {
            candidate.service == service && candidate.host_id == host_id && candidate.kind == kind
        })
}

pub(super) fn rollback_step_mut<'a>(
    state: &'a mut State,
    step: &StepTarget,
) -> Result<&'a mut StepProgress> {
    let unknown = || CoordinatorError::UnknownStep {
        step_id: step.step_id(),
    };
    match step {
        StepTarget::Rollback {
            rollback,
            service,
            host_id,
            kind,
        } => state
            .rollbacks
            .get_mut(rollback)
            .and_then(|record| {
                let position = step_position(record, service, host_id, *kind)?;
                record.steps.get_mut(position)
            })
            .map(|record| &mut record.progress)
            .ok_or_else(unknown),
        StepTarget::Gate { rollback, wave } => state
            .rollbacks
            .get_mut(rollback)
            .and_then(|record| record.waves.get_mut(*wave as usize))
            .map(|wave| &mut wave.gate)
            .ok_or_else(unknown),
        _ => Err(unknown()),
    }
}
