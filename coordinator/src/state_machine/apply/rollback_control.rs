//! Controlling a running rollback: pause, resume, abort, skip a host, isolate a service.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

pub(super) fn control_rollback(
    state: &mut State,
    command: &Command,
    number: u64,
    action: RollbackAction,
    reason: &str,
) -> Result<(Outcome, String, String)> {
    let rollback = live_rollback_mut(state, number, action.name())?;
    match (action, rollback.status) {
        (RollbackAction::Pause, RollbackStatus::Running) => {
            rollback.status = RollbackStatus::Paused;
            rollback.paused_reason = format!("paused by {}: {reason}", command.identity);
        }
        (RollbackAction::Resume, RollbackStatus::Paused) => {
            // A person looked at what failed: the current wave's failed steps and gate get a
            // fresh set of attempts. Only a person can do this, so it cannot loop on its own.
            if let Some(wave) = rollback.current_wave() {
                let mut retried = Vec::new();
                for step in rollback.steps.iter_mut().filter(|step| step.wave == wave) {
                    if step.progress.status == StepStatus::Failed {
                        retried.push(step.host_id.clone());
                        step.progress = StepProgress::default();
                    }
                }
                rollback.failed_hosts.retain(|host| !retried.contains(host));
                let gate = &mut rollback.waves[wave as usize].gate;
                if gate.status == StepStatus::Failed {
                    *gate = StepProgress::default();
                }
            } else {
                // Every wave is done: what failed is a deferred host's step after its return.
                let deferred = rollback.deferred_hosts.clone();
                for step in &mut rollback.steps {
                    if deferred.contains(&step.host_id)
                        && step.progress.status == StepStatus::Failed
                    {
                        step.progress = StepProgress::default();
                    }
                }
                rollback
                    .failed_hosts
                    .retain(|host| !deferred.contains(host));
            }
            rollback.status = RollbackStatus::Running;
            rollback.paused_reason.clear();
            let waves_done = rollback.current_wave().is_none();
            // Reverts before the app waves (cluster version 9) are retried while waves wait.
            let before_waves = |stage: &SchemaStage| !stage.after_activation;
            if waves_done || rollback.schema.iter().any(before_waves) {
                let mut stages = std::mem::take(&mut rollback.schema);
                for stage in &mut stages {
                    if waves_done || before_waves(stage) {
                        super::super::schema::retry_stage(state, stage);
                    }
                }
                if let Some(rollback) = state.rollbacks.get_mut(&number) {
                    rollback.schema = stages;
                }
            }
        }
        (RollbackAction::Abort, RollbackStatus::Running | RollbackStatus::Paused) => {
            rollback.status = RollbackStatus::Aborted;
            rollback.finished_at_ms = command.at_ms;
            let open = left_open(rollback);
            rollback.outcome_detail = if open.is_empty() {
                format!("aborted: {reason}")
            } else {
                format!(
                    "aborted: {reason}; left drained or with jobs paused (not put back): {}",
                    open.join(", ")
                )
            };
            skip_pending(rollback);
            // A schema transaction not yet decided is aborted with it (one decided finishes).
            let stage_txns: Vec<u64> = rollback.schema.iter().map(|stage| stage.txn).collect();
            super::super::schema::abort_undecided(
                state,
                stage_txns,
                "the rollback was aborted",
                command.at_ms,
            );
        }
        (_, status) => {
            return Err(CoordinatorError::RollbackNotControllable {
                rollback_id: rollback.id(),
                status,
                action: action.name().into(),
            });
        }
    }
    Ok((
        Outcome::Rollback(number),
        rollback_id(number),
        format!("ok: {reason}"),
    ))
}

/// The rollback, if it has not ended.
pub(super) fn live_rollback_mut<'a>(
    state: &'a mut State,
    number: u64,
    action: &str,
) -> Result<&'a mut RollbackRecord> {
    let known = known_list(state.rollbacks.keys().map(|&number| rollback_id(number)));
    let rollback =
        state
            .rollbacks
            .get_mut(&number)
            .ok_or_else(|| CoordinatorError::UnknownRollback {
                rollback_id: rollback_id(number),
                known,
            })?;
    if rollback.status.is_terminal() {
        return Err(CoordinatorError::RollbackNotControllable {
            rollback_id: rollback.id(),
            status: rollback.status,
            action: action.into(),
        });
    }
    Ok(rollback)
}

pub(super) fn skip_host(
    state: &mut State,
    number: u64,
    host_id: &str,
    reason: &str,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    let rollback = live_rollback_mut(state, number, "skip a host")?;
    let first_open_wave = rollback.current_wave().unwrap_or(u32::MAX);
    // A host deferred with its lost region (version 11) waits in a wave already passed, and
    // may never return: all it has left is skipped, closing steps too (undrain it by hand if
    // it comes back drained).
    let deferred = rollback.deferred_hosts.iter().any(|host| host == host_id);
    let mut skipped = 0;
    // A host taken out of rotation is put back, and job processors paused are resumed: the
    // step closing each one attempted stays to be run.
    let keep_closing: Vec<(u32, String, RollbackStepKind)> = attempted_openings(rollback)
        .filter(|(opened, _)| opened.host_id == host_id && !deferred)
        .map(|(opened, closing)| (opened.wave, opened.service.clone(), closing))
        .collect();
    for step in rollback
        .steps
        .iter_mut()
        .filter(|step| step.host_id == host_id && (deferred || step.wave >= first_open_wave))
    {
        let closing = keep_closing.contains(&(step.wave, step.service.clone(), step.kind));
        if closing {
            if step.progress.status == StepStatus::Failed {
                step.progress = StepProgress::default();
            }
            continue;
        }
        if step.progress.status != StepStatus::Succeeded {
            step.progress.status = StepStatus::Skipped;
            step.progress.detail = format!("skipped by an operator: {reason}");
            skipped += 1;
        }
    }
    if skipped == 0 {
        let hosts: std::collections::BTreeSet<String> = rollback
            .steps
            .iter()
            .map(|step| step.host_id.clone())
            .collect();
        return Err(CoordinatorError::invalid(
            "host_id",
            format!(
                "{host_id} has nothing left to skip in {}: its hosts are {}",
                rollback.id(),
                known_list(hosts)
            ),
        ));
    }
    rollback.failed_hosts.retain(|host| host != host_id);
    if !rollback.skipped_hosts.iter().any(|host| host == host_id) {
        rollback.skipped_hosts.push(host_id.to_string());
    }
    // A wave left with no host to revert has nothing for its gate to judge.
    for (index, wave) in rollback.waves.iter_mut().enumerate() {
        let all_skipped = rollback
            .steps
            .iter()
            .filter(|step| step.wave == index as u32)
            .all(|step| step.progress.status == StepStatus::Skipped);
        if all_skipped && !wave.gate.status.is_terminal() {
            wave.gate.status = StepStatus::Skipped;
        }
    }
    let id = rollback.id();
    settle_rollback(state, number, at_ms);
    Ok((
        Outcome::Rollback(number),
        id,
        format!("ok: {host_id} left unreverted ({skipped} steps skipped): {reason}"),
    ))
}

/// Defers the unfinished hosts of a region lost during the rollback: their steps wait for
/// their return (after the last wave), and the region's gates not yet passed are skipped, as
/// nothing there can be judged. Only ever the engine's proposal; checked all the same.
pub(super) fn defer_region(
    state: &mut State,
    number: u64,
    (region, hosts): (&str, &[String]),
    evidence: &str,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    let rollback = live_rollback_mut(state, number, "defer a region of")?;
    let in_region: BTreeSet<&str> = rollback
        .waves
        .iter()
        .filter(|wave| wave.region == region)
        .flat_map(|wave| wave.hosts.iter().map(String::as_str))
        .collect();
    if in_region.is_empty() {
        return Err(CoordinatorError::invalid(
            "region",
            format!("{} has no wave in region {region:?}", rollback.id()),
        ));
    }
    if let Some(stranger) = hosts.iter().find(|host| !in_region.contains(host.as_str())) {
        return Err(CoordinatorError::invalid(
            "hosts",
            format!(
                "{stranger} is not a host of {} in region {region}: its hosts there are {}",
                rollback.id(),
                known_list(in_region.iter().map(|host| host.to_string()))
            ),
        ));
    }
    let mut changed = false;
    for host in hosts {
        if !rollback.deferred_hosts.contains(host) {
            rollback.deferred_hosts.push(host.clone());
            changed = true;
        }
    }
    // The region's gates not yet passed whose hosts are all done or deferred: even one whose
    // hosts finished before the loss cannot be judged on hosts that report nothing.
    for index in 0..rollback.waves.len() {
        let wave = &rollback.waves[index];
        if wave.region != region || wave.gate.status.is_terminal() {
            continue;
        }
        let rest_done = rollback
            .wave_steps(index as u32)
            .all(|step| rollback.is_deferred(step) || step.progress.status.is_terminal());
        // A failure there is a person's to judge (the wave pauses), not a gate to skip.
        let failed = rollback
            .wave_steps(index as u32)
            .any(|step| !rollback.is_deferred(step) && step.progress.status == StepStatus::Failed);
        if rest_done && !failed {
            let gate = &mut rollback.waves[index].gate;
            gate.status = StepStatus::Skipped;
            gate.detail = format!("region {region} lost: {evidence}");
            changed = true;
        }
    }
    if !changed {
        return Err(CoordinatorError::invalid(
            "hosts",
            format!(
                "nothing of {} in region {region} is left to defer",
                rollback.id()
            ),
        ));
    }
    let id = rollback.id();
    settle_rollback(state, number, at_ms);
    Ok((
        Outcome::Rollback(number),
        id,
        format!(
            "ok: region {region} lost; {} wait for their return: {evidence}",
            if hosts.is_empty() {
                "no hosts".to_string()
            } else {
                hosts.join(", ")
            }
        ),
    ))
}

pub(super) fn isolate_service(
    state: &mut State,
    number: u64,
    (service, region): (&str, &str),
    reason: &str,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    let hosts: Vec<String> = state
        .hosts
        .values()
        .filter(|host| host.services.iter().any(|name| name == service))
        .map(|host| host.host_id.clone())
        .collect();
    // From version 10 only the failing hosts, or a region's, within max_unavailable.
    let within_budget = state.cluster_version() >= version::ISOLATION_WITHIN_BUDGET;
    let regions: BTreeMap<String, String> = if within_budget {
        hosts
            .iter()
            .map(|host| (host.clone(), crate::plan::region_of(state, host)))
            .collect()
    } else {
        BTreeMap::new()
    };
    let rollback = live_rollback_mut(state, number, "isolate a service")?;
    let id = rollback.id();
    if !rollback.services.iter().any(|name| name == service) {
        return Err(CoordinatorError::invalid(
            "service",
            format!(
                "{id} does not revert {service}: it reverts {}",
                rollback.services.join(", ")
            ),
        ));
    }
    if rollback.isolated.iter().any(|name| name == service) {
        return Err(CoordinatorError::invalid(
            "service",
            format!("{service} is already isolated in {id}"),
        ));
    }
    let Some(first_open) = rollback.current_wave() else {
        return Err(CoordinatorError::invalid(
            "service",
            format!("every wave of {id} is done: there is nothing left to isolate"),
        ));
    };
    let (hosts, left_serving) = if within_budget {
        // Only hosts this rollback reverts: one it left out is not its to take out.
        let mut regions = regions;
        regions.retain(|host, _| {
            rollback
                .steps
                .iter()
                .any(|step| step.service == service && &step.host_id == host)
        });
        isolation_hosts(rollback, service, region, &regions)?
    } else {
        (hosts, Vec::new())
    };
    let change = rollback
        .waves
        .iter()
        .find(|wave| wave.service == service)
        .map_or(0, |wave| wave.change);
    // Stop reverting the service: its steps and gates not yet done are skipped.
    for step in rollback
        .steps
        .iter_mut()
        .filter(|step| step.service == service && step.wave >= first_open)
    {
        if !step.progress.status.is_terminal() || step.progress.status == StepStatus::Failed {
            step.progress.status = StepStatus::Skipped;
            step.progress.detail = format!("isolated instead: {reason}");
        }
    }
    for wave in rollback
        .waves
        .iter_mut()
        .skip(first_open as usize)
        .filter(|wave| wave.service == service)
    {
        if !wave.gate.status.is_terminal() || wave.gate.status == StepStatus::Failed {
            wave.gate.status = StepStatus::Skipped;
            wave.gate.detail = format!("isolated instead: {reason}");
        }
    }
    // Then drain all its hosts, before anything else the rollback still has to do.
    for step in rollback
        .steps
        .iter_mut()
        .filter(|step| step.wave >= first_open)
    {
        step.wave += 1;
    }
    let skipped_gate = StepProgress {
        status: StepStatus::Skipped,
        detail: "an isolation is not gated".into(),
        ..StepProgress::default()
    };
    rollback.waves.insert(
        first_open as usize,
        WaveRecord {
            service: service.to_string(),
            change,
            region: if !within_budget {
                "all".into()
            } else if region.is_empty() {
                "failing".into()
            } else {
                region.to_string()
            },
            canary: false,
            hosts: hosts.clone(),
            gate: skipped_gate,
            isolation: true,
        },
    );
    rollback
        .steps
        .extend(hosts.iter().map(|host_id| RollbackStepRecord {
            wave: first_open,
            service: service.to_string(),
            host_id: host_id.clone(),
            kind: RollbackStepKind::Isolate,
            progress: StepProgress::default(),
        }));
    rollback.isolated.push(service.to_string());
    rollback.failed_hosts.clear();
    rollback.paused_reason.clear();
    rollback.status = RollbackStatus::Running;
    settle_rollback(state, number, at_ms);
    let outcome = if within_budget {
        let serving = if left_serving.is_empty() {
            String::new()
        } else {
            format!(
                "; left serving, past max_unavailable: {}",
                left_serving.join(", ")
            )
        };
        format!(
            "ok: {service} isolated: {} drained instead of reverted ({}){serving}: {reason}",
            crate::plan::plural(hosts.len(), "host"),
            hosts.join(", ")
        )
    } else {
        format!(
            "ok: {service} isolated: {} drained instead of reverted: {reason}",
            crate::plan::plural(hosts.len(), "host")
        )
    };
    Ok((Outcome::Rollback(number), id, outcome))
}

/// The hosts an isolation takes out (from version 10), and those left serving past the
/// budget. Hosts of `service` the rollback began and has not finished (drained, or stopped
/// half-way through their revert) stay out whatever the budget: putting one back could serve
/// a half-reverted host. Then, up to `max_unavailable` more, failing ones first (of the current
/// wave, when it is the service's: a failed step's host, or every host of a failed gate), then
/// those of `region` when one is named.
fn isolation_hosts(
    rollback: &RollbackRecord,
    service: &str,
    region: &str,
    of_service: &BTreeMap<String, String>,
) -> Result<(Vec<String>, Vec<String>)> {
    let begun_unfinished: Vec<String> = of_service
        .keys()
        .filter(|host| {
            let steps = || {
                rollback
                    .steps
                    .iter()
                    .filter(|step| step.service == service && &&step.host_id == host)
            };
            steps().any(|step| step.progress.attempts > 0)
                && steps().any(|step| !step.progress.status.is_terminal())
        })
        .cloned()
        .collect();
    let mut wanted: Vec<String> = Vec::new();
    if let Some(wave) = rollback
        .current_wave()
        .and_then(|wave| rollback.waves.get(wave as usize))
        && wave.service == service
    {
        wanted.extend(
            rollback
                .failed_hosts
                .iter()
                .filter(|host| of_service.contains_key(*host))
                .cloned(),
        );
        if wave.gate.status == StepStatus::Failed {
            wanted.extend(wave.hosts.iter().cloned());
        }
    }
    if !region.is_empty() {
        let in_region: Vec<&String> = of_service
            .iter()
            .filter(|(_, host_region)| *host_region == region)
            .map(|(host, _)| host)
            .collect();
        if in_region.is_empty() {
            let regions: std::collections::BTreeSet<String> =
                of_service.values().cloned().collect();
            return Err(CoordinatorError::invalid(
                "region",
                format!(
                    "no host of {service} is in region {region}: its regions are {}",
                    known_list(regions)
                ),
            ));
        }
        wanted.extend(in_region.into_iter().cloned());
    }
    let mut fresh: Vec<String> = Vec::new();
    for host in wanted {
        if !begun_unfinished.contains(&host) && !fresh.contains(&host) {
            fresh.push(host);
        }
    }
    if fresh.is_empty() && begun_unfinished.is_empty() {
        return Err(CoordinatorError::invalid(
            "region",
            format!(
                "no host of {service} has failed in {}: name a region to take out, whose hosts \
                 go within max_unavailable ({})",
                rollback.id(),
                rollback.options.max_unavailable.max(1)
            ),
        ));
    }
    let budget = rollback.options.max_unavailable.max(1) as usize;
    let left_serving = fresh.split_off(budget.min(fresh.len()));
    let mut hosts = begun_unfinished;
    hosts.extend(fresh);
    Ok((hosts, left_serving))
}

pub(super) fn escalation_delivered(
    state: &mut State,
    id: u64,
    ok: bool,
    detail: &str,
) -> Result<(Outcome, String, String)> {
    let record = state.escalations.get_mut(&id).ok_or_else(|| {
        CoordinatorError::invalid("escalation", format!("no escalation {id} is kept"))
    })?;
    record.attempts += 1;
    record.delivered = ok;
    record.delivery_detail = detail.to_string();
    let outcome = if ok { "delivered" } else { "not delivered" };
    Ok((
        Outcome::Done,
        format!("escalation-{id}"),
        format!("{outcome}: {detail}"),
    ))
}
