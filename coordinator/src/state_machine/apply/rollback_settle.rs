//! Settling a rollback after each step and gate: the next wave, a pause for a person, the end.

use super::*;

/// Ends a rollback once every wave passed its gate; pauses it for a person when a host failed
/// in the current wave and no other host of that wave is still on its way.
pub(super) fn settle_rollback(state: &mut State, number: u64, at_ms: u64) {
    // From version 10 an isolation takes out some hosts only: the outcome names them.
    let isolation_names_hosts = state.cluster_version() >= version::ISOLATION_WITHIN_BUDGET;
    // A revert the waves wait for (cluster version 9) that failed: no host has been reverted.
    let before_waves_failed = state.rollbacks.get(&number).and_then(|rollback| {
        let before_waves = rollback
            .schema_stages()
            .filter(|(_, stage)| !stage.after_activation);
        match super::super::schema::stages_state(state, before_waves) {
            super::super::schema::StagesState::Failed { detail, .. }
            | super::super::schema::StagesState::Stuck { detail, .. } => Some(detail),
            _ => None,
        }
    });
    let Some(rollback) = state.rollbacks.get_mut(&number) else {
        return;
    };
    if rollback.status.is_terminal() {
        return;
    }
    let Some(wave) = rollback.current_wave() else {
        // Every wave is done: then the schema reverts, one database at a time.
        let own: Vec<(usize, SchemaStage)> = rollback
            .schema_stages()
            .map(|(index, stage)| (index, stage.clone()))
            .collect();
        let last_wave = rollback.waves.len().saturating_sub(1) as u32;
        let running = rollback.status == RollbackStatus::Running;
        let stages = super::super::schema::stages_state(
            state,
            own.iter().map(|(index, stage)| (*index, stage)),
        );
        match stages {
            super::super::schema::StagesState::Done => {}
            super::super::schema::StagesState::Waiting { .. } => return,
            super::super::schema::StagesState::Failed { detail, .. }
            | super::super::schema::StagesState::Stuck { detail, .. } => {
                if running {
                    let evidence = format!(
                        "schema revert failed, the app is reverted: {detail}; resume retries it"
                    );
                    pause_for_a_person(state, number, last_wave, evidence, at_ms);
                }
                return;
            }
        }
        // Hosts of a lost region (cluster version 11) are reverted once they return: a failure
        // there calls a person when no other of them is on its way; until then it waits.
        if settle_deferred(state, number, at_ms) {
            return;
        }
        let Some(rollback) = state.rollbacks.get_mut(&number) else {
            return;
        };
        let schema_detail: Vec<String> = rollback
            .schema
            .iter()
            .map(|stage| {
                if rollback.isolated.contains(&stage.service) {
                    format!(
                        "{} not reverted ({}): {} was isolated",
                        stage.database,
                        stage.versions.join(", "),
                        stage.service
                    )
                } else {
                    format!(
                        "{} reverted on every shard ({})",
                        stage.database,
                        stage.versions.join(", ")
                    )
                }
            })
            .collect();
        let hosts: std::collections::BTreeSet<&str> = rollback
            .steps
            .iter()
            .filter(|step| step.progress.status == StepStatus::Succeeded)
            .map(|step| step.host_id.as_str())
            .collect();
        let mut detail = format!(
            "{} reverted and verified healthy in {} waves",
            crate::plan::plural(hosts.len(), "host"),
            rollback.waves.len()
        );
        if !rollback.skipped_hosts.is_empty() {
            detail += &format!(
                "; left unreverted by an operator: {}",
                rollback.skipped_hosts.join(", ")
            );
        }
        if !rollback.deferred_hosts.is_empty() {
            detail += &format!(
                "; reverted after their region returned: {}",
                rollback.deferred_hosts.join(", ")
            );
        }
        if !rollback.options.exclude_hosts.is_empty() {
            detail += &format!(
                "; left out by its plan, as they were: {}",
                rollback.options.exclude_hosts.join(", ")
            );
        }
        if !rollback.isolated.is_empty() {
            let isolated: Vec<String> = rollback
                .isolated
                .iter()
                .map(|service| {
                    if !isolation_names_hosts {
                        return service.clone();
                    }
                    let hosts: Vec<&str> = rollback
                        .waves
                        .iter()
                        .filter(|wave| wave.isolation && &wave.service == service)
                        .flat_map(|wave| wave.hosts.iter().map(String::as_str))
                        .collect();
                    format!("{service} ({})", hosts.join(", "))
                })
                .collect();
            detail += &format!(
                "; isolated (drained, not reverted): {}",
                isolated.join(", ")
            );
            let paused: Vec<String> = left_open(rollback)
                .into_iter()
                .filter(|host| host.ends_with("(jobs paused)"))
                .collect();
            if !paused.is_empty() {
                detail += &format!("; left with jobs paused: {}", paused.join(", "));
            }
        }
        if !schema_detail.is_empty() {
            detail += &format!("; {}", schema_detail.join("; "));
        }
        rollback.status = RollbackStatus::Succeeded;
        rollback.finished_at_ms = at_ms;
        rollback.outcome_detail = detail;
        let isolated = rollback.isolated.clone();
        let id = rollback.id();
        for number in rollback.changes.clone() {
            if let Some(change) = state.changes.get_mut(&number) {
                if isolated.contains(&change.service) {
                    change.reason = format!("isolated by {id}: drained, not reverted");
                } else {
                    change.status = ChangeStatus::RolledBack;
                }
            }
        }
        return;
    };
    if let Some(detail) = before_waves_failed {
        if rollback.status == RollbackStatus::Running {
            let evidence = format!(
                "schema revert before the app waves failed, no host is reverted yet: {detail}; \
                 resume retries it"
            );
            pause_for_a_person(state, number, wave, evidence, at_ms);
        }
        return;
    }
    let failed: Vec<&RollbackStepRecord> = rollback
        .wave_steps(wave)
        .filter(|step| step.progress.status == StepStatus::Failed && !rollback.is_deferred(step))
        .collect();
    if failed.is_empty()
        || hosts_in_progress(rollback, wave)
        || rollback.status != RollbackStatus::Running
    {
        return;
    }
    let mut failed_hosts: Vec<String> = failed.iter().map(|step| step.host_id.clone()).collect();
    failed_hosts.dedup();
    let evidence = format!(
        "{} {} on {} failed: {}",
        failed[0].service,
        failed[0].kind.name(),
        failed[0].host_id,
        failed[0].progress.detail
    );
    rollback.failed_hosts = failed_hosts;
    pause_for_a_person(state, number, wave, evidence, at_ms);
}

/// Whether deferred hosts still hold the rollback open once every wave is done (one has steps
/// left, or one failed); pauses it for a person when one failed after its return and no other
/// deferred host is on its way (a step runs, or it began and has steps left).
fn settle_deferred(state: &mut State, number: u64, at_ms: u64) -> bool {
    let Some(rollback) = state.rollbacks.get_mut(&number) else {
        return true;
    };
    let failed: Option<&RollbackStepRecord> = rollback
        .steps
        .iter()
        .find(|step| rollback.is_deferred(step) && step.progress.status == StepStatus::Failed);
    if rollback.deferred_unfinished().is_empty() && failed.is_none() {
        return false;
    }
    let on_their_way = rollback.deferred_hosts.iter().any(|host| {
        let of_host = || {
            rollback
                .steps
                .iter()
                .filter(move |step| &step.host_id == host)
        };
        let status = |wanted| of_host().any(|step| step.progress.status == wanted);
        status(StepStatus::Running)
            || (!status(StepStatus::Failed)
                && of_host().any(|step| step.progress.attempts > 0)
                && status(StepStatus::Pending))
    });
    if let Some(failed) = failed
        && !on_their_way
        && rollback.status == RollbackStatus::Running
    {
        let evidence = format!(
            "{} {} on {} failed after its region returned: {}",
            failed.service,
            failed.kind.name(),
            failed.host_id,
            failed.progress.detail
        );
        let (host, wave) = (failed.host_id.clone(), failed.wave);
        if !rollback.failed_hosts.contains(&host) {
            rollback.failed_hosts.push(host);
        }
        pause_for_a_person(state, number, wave, evidence, at_ms);
    }
    true
}

/// Pauses the rollback and opens an escalation; the engine delivers it by webhook.
pub(super) fn pause_for_a_person(
    state: &mut State,
    number: u64,
    wave: u32,
    evidence: String,
    at_ms: u64,
) {
    let Some(service) = state
        .rollbacks
        .get(&number)
        .and_then(|rollback| rollback.waves.get(wave as usize))
        .map(|wave| wave.service.clone())
    else {
        return;
    };
    let escalation = state.escalate(at_ms, number, wave, &service, evidence.clone());
    if let Some(rollback) = state.rollbacks.get_mut(&number) {
        rollback.status = RollbackStatus::Paused;
        rollback.paused_reason = evidence;
        rollback.escalations.push(escalation);
    }
}

/// Whether a step of the wave runs, or a host of it that began and has not failed still has
/// steps to take (the engine finishes such hosts even after another host failed).
pub(super) fn hosts_in_progress(rollback: &RollbackRecord, wave: u32) -> bool {
    // A deferred host waits for its region: it is not on its way.
    let steps: Vec<&RollbackStepRecord> = rollback
        .wave_steps(wave)
        .filter(|step| !rollback.is_deferred(step))
        .collect();
    if steps
        .iter()
        .any(|step| step.progress.status == StepStatus::Running)
    {
        return true;
    }
    let mut hosts: Vec<(&str, &str)> = steps
        .iter()
        .map(|step| (step.service.as_str(), step.host_id.as_str()))
        .collect();
    hosts.dedup();
    hosts.into_iter().any(|(service, host_id)| {
        let of_host = || {
            steps
                .iter()
                .filter(move |step| step.service == service && step.host_id == host_id)
        };
        let began = of_host().any(|step| step.progress.attempts > 0);
        let failed = of_host().any(|step| step.progress.status == StepStatus::Failed);
        began && !failed && of_host().any(|step| step.progress.status == StepStatus::Pending)
    })
}

/// Hosts the rollback drained or paused the job processors of (a step that opens something was
/// attempted) and did not put back, as `service/host (drained)` or `service/host (jobs
/// paused)`.
pub(super) fn left_open(rollback: &RollbackRecord) -> Vec<String> {
    attempted_openings(rollback)
        .filter(|(opened, closing)| {
            !rollback.steps.iter().any(|step| {
                step.kind == *closing
                    && step.wave == opened.wave
                    && step.host_id == opened.host_id
                    && step.service == opened.service
                    && step.progress.status == StepStatus::Succeeded
            })
        })
        .map(|(opened, _)| {
            let what = if opened.kind == RollbackStepKind::PauseJobs {
                "jobs paused"
            } else {
                "drained"
            };
            format!("{}/{} ({what})", opened.service, opened.host_id)
        })
        .collect()
}

/// Steps that opened something (a drain, a pause) and were attempted, with the step closing
/// each. Attempted, not only succeeded: one that failed half-way may have acted anyway, and
/// putting back is idempotent.
pub(super) fn attempted_openings(
    rollback: &RollbackRecord,
) -> impl Iterator<Item = (&RollbackStepRecord, RollbackStepKind)> {
    rollback
        .steps
        .iter()
        .filter(|opened| opened.progress.attempts > 0)
        .filter_map(|opened| Some((opened, opened.kind.closed_by()?)))
}

pub(super) fn skip_pending(rollback: &mut RollbackRecord) {
    for step in &mut rollback.steps {
        if step.progress.status == StepStatus::Pending {
            step.progress.status = StepStatus::Skipped;
        }
    }
    for wave in &mut rollback.waves {
        if wave.gate.status == StepStatus::Pending {
            wave.gate.status = StepStatus::Skipped;
        }
    }
}
