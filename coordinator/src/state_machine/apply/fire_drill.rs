//! Rollback fire drills (cluster version 11): started as a change of a known-bad release,
//! scored once its rollback ends, stopped by a person at any time.

use super::*;

/// Starts a drill: the environment's policy must allow drills and need no approvals (a drill
/// is never a way around them), the service must roll back on its own (that is what is
/// drilled), and the release must be another than the one running. The change it starts is
/// marked as the drill's.
pub(super) fn start_fire_drill(
    state: &mut State,
    command: &Command,
    environment: &str,
    start: &StartChange,
) -> Result<(Outcome, String, String)> {
    let service = start.service.as_str();
    require_release(state, service, &start.version)?;
    let refuse = |why: String| Err(CoordinatorError::DrillRefused { why });
    let rules = state
        .access
        .policy
        .as_ref()
        .map(|policy| policy.environment(environment))
        .unwrap_or_default();
    if !rules.drills {
        return refuse(format!(
            "the policy of environment {environment} forbids drills (drills = false)"
        ));
    }
    if rules.approvals > 0 {
        return refuse(format!(
            "environment {environment} needs {} approvals for a change; a drill is never a way \
             around them: drill where changes need none (staging)",
            rules.approvals
        ));
    }
    if !state
        .services
        .get(service)
        .is_some_and(|record| record.policy.auto_rollback)
    {
        return refuse(format!(
            "service {service} does not roll back on its own (auto_rollback is off): a drill \
             rehearses the automatic rollback; turn it on with rewindctl service set {service} \
             --auto-rollback"
        ));
    }
    if let Some((window, until_ms)) = freeze_of(state, service, command.at_ms) {
        return Err(frozen_error(service, &window, until_ms));
    }
    let running = current_version(state, service);
    if running == start.version {
        return refuse(format!(
            "{service} already runs {}: name the known-bad release to deploy",
            start.version
        ));
    }
    if let Some(open) = state
        .fire_drills
        .values()
        .find(|drill| drill.service == service && drill.status == FireDrillStatus::Running)
    {
        return refuse(format!(
            "{} of {service} still runs: wait for it or abort it",
            open.id()
        ));
    }
    let in_environment = crate::plan::hosts_in_environment(state, service, environment);
    if in_environment.is_empty() {
        return refuse(format!(
            "no registered host runs {service} in environment {environment}"
        ));
    }
    let mut asked = start.host_ids.clone();
    asked.sort_unstable();
    if asked != in_environment {
        return Err(CoordinatorError::invalid(
            "host_ids",
            format!(
                "a drill deploys to every host of {service} in {environment}: {} (did a host \
                 register or leave meanwhile? start it again)",
                in_environment.join(", ")
            ),
        ));
    }
    let number = state.next_fire_drill + 1;
    let mut marked = start.clone();
    marked.reason = format!("{} ({}): {}", fire_drill_id(number), "drill", start.reason);
    let (change, change_id_text, _) = start_change(state, command, &marked)?;
    state.next_fire_drill = number;
    let previous_version = state
        .changes
        .get_mut(&change)
        .map(|record| {
            record.drill = number;
            record.previous_version.clone()
        })
        .unwrap_or_default();
    state.fire_drills.insert(
        number,
        FireDrillRecord {
            number,
            service: service.to_string(),
            environment: environment.to_string(),
            version: start.version.clone(),
            previous_version: previous_version.clone(),
            change,
            reason: start.reason.clone(),
            started_by: command.identity.clone(),
            started_at_ms: command.at_ms,
            status: FireDrillStatus::Running,
            finished_at_ms: 0,
            outcome: String::new(),
            aborted_by: String::new(),
            aborted_at_ms: 0,
            scorecard: None,
        },
    );
    forget_old_drills(state);
    Ok((
        Outcome::FireDrill(number),
        fire_drill_id(number),
        format!(
            "ok: drill of {service} in {environment}: {previous_version} -> {} (known bad) on \
             {} as {change_id_text}",
            start.version,
            in_environment.join(",")
        ),
    ))
}

/// Keeps at most [`MAX_FIRE_DRILLS`]: the oldest that ended go, never one whose release the
/// engine may still have to revert (running, or aborted before its revert began).
fn forget_old_drills(state: &mut State) {
    while state.fire_drills.len() > MAX_FIRE_DRILLS {
        let Some(oldest) = state
            .fire_drills
            .values()
            .find(|drill| match drill.status {
                FireDrillStatus::Running => false,
                FireDrillStatus::Aborted => !revert_pending(state, drill),
                FireDrillStatus::Passed | FireDrillStatus::Failed => true,
            })
            .map(|drill| drill.number)
        else {
            return;
        };
        state.fire_drills.remove(&oldest);
    }
}

/// Scores a drill whose end the engine saw: its rollback ended, its automatic rollback was
/// refused, or its change failed. Refused while none of that is so.
pub(super) fn finish_fire_drill(
    state: &mut State,
    command: &Command,
    number: u64,
) -> Result<(Outcome, String, String)> {
    let drill = known_drill(state, number)?;
    if drill.status != FireDrillStatus::Running {
        return Err(CoordinatorError::DrillRefused {
            why: format!("{} is {} already", drill.id(), drill.status.name()),
        });
    }
    let Some(ended) = drill_end(state, drill) else {
        return Err(CoordinatorError::DrillRefused {
            why: format!("{} has not ended: its rollback has not", drill.id()),
        });
    };
    let scorecard = score(state, drill);
    let rto_ms = scorecard.rto_s * 1000;
    let within_rto = rto_ms == 0 || scorecard.all_verified_ms.is_some_and(|ms| ms <= rto_ms);
    let unattended = scorecard.escalations == 0 && scorecard.gates_passed == scorecard.gates;
    let passed = ended.is_ok()
        && scorecard.detected
        && scorecard.all_verified_ms.is_some()
        && within_rto
        && unattended;
    let outcome = match ended {
        Err(why) => why,
        Ok(()) if !scorecard.detected => format!(
            "not detected: the service's health policy did not start a rollback within its \
             watch; {} reverted the release",
            rollback_id(scorecard.rollback)
        ),
        Ok(()) if !within_rto => format!(
            "verified after {} s, over the service's RTO of {} s",
            scorecard.all_verified_ms.unwrap_or_default() / 1000,
            scorecard.rto_s
        ),
        Ok(()) if !unattended => format!(
            "rolled back, but not on its own: {} of {} gates passed, {} escalations",
            scorecard.gates_passed, scorecard.gates, scorecard.escalations
        ),
        Ok(()) => format!(
            "detected after {:.1} s, every host verified after {:.1} s",
            scorecard.detect_ms.unwrap_or_default() as f64 / 1000.0,
            scorecard.all_verified_ms.unwrap_or_default() as f64 / 1000.0
        ),
    };
    let id = drill.id();
    let drill = state.fire_drills.get_mut(&number).expect("known above");
    drill.status = if passed {
        FireDrillStatus::Passed
    } else {
        FireDrillStatus::Failed
    };
    drill.finished_at_ms = command.at_ms;
    drill.outcome = outcome.clone();
    drill.scorecard = Some(scorecard);
    Ok((
        Outcome::FireDrill(number),
        id,
        format!("{}: {outcome}", drill.status.name()),
    ))
}

/// Stops a drill at once. What it deployed is reverted all the same: its rollback goes on if
/// it began, and if none did, the engine starts one once the change is deployed.
pub(super) fn abort_fire_drill(
    state: &mut State,
    command: &Command,
    number: u64,
    reason: &str,
) -> Result<(Outcome, String, String)> {
    let drill = known_drill(state, number)?;
    if drill.status != FireDrillStatus::Running {
        return Err(CoordinatorError::DrillRefused {
            why: format!("{} is {} already", drill.id(), drill.status.name()),
        });
    }
    let id = drill.id();
    let drill = state.fire_drills.get_mut(&number).expect("known above");
    drill.status = FireDrillStatus::Aborted;
    drill.finished_at_ms = command.at_ms;
    drill.aborted_by = command.identity.clone();
    drill.aborted_at_ms = command.at_ms;
    drill.outcome = format!("aborted by {}: {reason}", command.identity);
    Ok((
        Outcome::FireDrill(number),
        id,
        "ok: aborted; what it deployed is reverted".to_string(),
    ))
}

fn known_drill(state: &State, number: u64) -> Result<&FireDrillRecord> {
    state
        .fire_drills
        .get(&number)
        .ok_or_else(|| CoordinatorError::UnknownFireDrill {
            drill_id: fire_drill_id(number),
            known: known_list(state.fire_drills.values().map(FireDrillRecord::id)),
        })
}

/// Whether a running drill has ended, and if so whether its rollback succeeded (`Ok`) or
/// why it failed.
pub fn drill_end(
    state: &State,
    drill: &FireDrillRecord,
) -> Option<std::result::Result<(), String>> {
    let change = state.changes.get(&drill.change)?;
    if change.rollback != 0 {
        let rollback = state.rollbacks.get(&change.rollback)?;
        return match rollback.status {
            RollbackStatus::Succeeded => Some(Ok(())),
            RollbackStatus::Aborted => Some(Err(format!(
                "its rollback {} was aborted: {}",
                rollback.id(),
                rollback.outcome_detail
            ))),
            _ => None,
        };
    }
    if let Some(newer) = superseded_by(state, drill) {
        return Some(Err(format!(
            "superseded by {} ({} {}) before it was rolled back; a later change is never \
             reverted for a drill",
            newer.id(),
            newer.service,
            newer.version
        )));
    }
    if change.status == ChangeStatus::Failed {
        return Some(Err(format!(
            "its change {} failed before the release went live everywhere; where it did go \
             live it stays: roll it back: rewindctl rollback start {}",
            change.id(),
            change.id()
        )));
    }
    if let Some(why) = revert_refused(state, change) {
        return Some(Err(format!(
            "its automatic rollback was not started ({why}): {} is still on {} in {}; roll it \
             back: rewindctl rollback start {}",
            drill.service,
            drill.version,
            drill.environment,
            change.id()
        )));
    }
    None
}

/// A later change of the drill's service in its environment, deployed over the drill.
fn superseded_by<'a>(state: &'a State, drill: &FireDrillRecord) -> Option<&'a ChangeRecord> {
    super::trigger::latest_change(state, &drill.service, &drill.environment)
        .filter(|latest| latest.number != drill.change)
}

/// Why an automatic rollback of the deployed `change` will not start on its own: a throttle
/// refused it, or one asked after it was deployed waits for approvals. (An ignored request is
/// not final: asked again, it may start.)
fn revert_refused(state: &State, change: &ChangeRecord) -> Option<String> {
    if change.auto_refused {
        return Some("a throttle or the breaker refused it".to_string());
    }
    state
        .triggers
        .iter()
        .rev()
        .find(|trigger| {
            trigger.change == change.number
                && trigger.at_ms >= change.deployed_at_ms
                && matches!(
                    trigger.outcome,
                    TriggerOutcome::AwaitingApproval | TriggerOutcome::Throttled
                )
        })
        .map(|trigger| trigger.detail.clone())
}

/// Whether the engine still has to revert what a drill deployed itself (the policy's watch
/// passed undetected, or it was aborted): its release is live, nothing reverts it, no later
/// change went over it, and no request for it was refused.
pub fn revert_pending(state: &State, drill: &FireDrillRecord) -> bool {
    state.changes.get(&drill.change).is_some_and(|change| {
        change.status == ChangeStatus::Deployed
            && change.rollback == 0
            && superseded_by(state, drill).is_none()
            && revert_refused(state, change).is_none()
    })
}

/// The drill's scorecard from its change and rollback as they are.
fn score(state: &State, drill: &FireDrillRecord) -> Scorecard {
    let mut card = Scorecard {
        rto_s: state
            .services
            .get(&drill.service)
            .map_or(0, |service| service.rto_s),
        previous: state
            .fire_drills
            .values()
            .rev()
            .find(|other| {
                other.number < drill.number
                    && other.service == drill.service
                    && other.environment == drill.environment
                    && other.scorecard.is_some()
            })
            .map_or(0, |other| other.number),
        ..Scorecard::default()
    };
    let Some(change) = state.changes.get(&drill.change) else {
        return card;
    };
    card.live_at_ms = change
        .hosts
        .iter()
        .filter(|host| host.activate.status == StepStatus::Succeeded)
        .map(|host| host.activate.finished_at_ms)
        .min()
        .unwrap_or(change.deployed_at_ms);
    let Some(rollback) = state.rollbacks.get(&change.rollback) else {
        return card;
    };
    let since_live = |at_ms: u64| at_ms.saturating_sub(card.live_at_ms);
    let watch_ms = state
        .services
        .get(&drill.service)
        .map_or(0, |service| u64::from(service.policy.watch_s) * 1000);
    card.rollback = rollback.number;
    // Started automatically within the watch: the policy's (the drill's own revert of an
    // undetected release starts after the watch; an aborted drill is never scored).
    card.detected = rollback.trigger == Trigger::Automatic
        && rollback.started_at_ms <= change.deployed_at_ms + watch_ms;
    card.detect_ms = card.detected.then(|| since_live(rollback.started_at_ms));
    let finished = |kind: RollbackStepKind| {
        rollback
            .steps
            .iter()
            .filter(move |step| step.kind == kind && step.progress.status == StepStatus::Succeeded)
            .map(|step| step.progress.finished_at_ms)
    };
    card.first_reverted_ms = finished(RollbackStepKind::Restore).min().map(since_live);
    if rollback.status == RollbackStatus::Succeeded {
        card.all_verified_ms = finished(RollbackStepKind::Verify)
            .max()
            .or(Some(rollback.finished_at_ms))
            .map(since_live);
    }
    let gates: Vec<&WaveRecord> = rollback
        .waves
        .iter()
        .filter(|wave| !wave.isolation)
        .collect();
    card.gates = gates.len() as u32;
    card.gates_passed = gates
        .iter()
        .filter(|wave| wave.gate.status == StepStatus::Succeeded)
        .count() as u32;
    card.steps_retried = rollback
        .steps
        .iter()
        .filter(|step| step.progress.attempts > 1)
        .count() as u32;
    card.escalations = rollback.escalations.len() as u32;
    card
}
