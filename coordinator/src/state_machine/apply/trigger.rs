//! Automatic triggers: judged against throttles, and the rollback they start.

use super::*;

/// Judges a request for an automatic rollback: start it, or record why not. Refuses (as an
/// error, recording nothing) only a service that does not exist.
pub(super) fn auto_trigger(
    state: &mut State,
    command: &Command,
) -> Result<(Outcome, String, String)> {
    let CommandKind::AutoTrigger {
        service,
        environment,
        source,
        reason,
        options,
        throttle,
    } = &command.kind
    else {
        unreachable!("called for AutoTrigger commands only");
    };
    let (service, environment, source) = (service.as_str(), environment.as_str(), *source);
    require_service(state, service)?;
    let at_ms = command.at_ms;
    // The latest change of the service in the alert's environment (any, when it names none).
    let latest = state
        .changes
        .values()
        .rev()
        .find(|change| {
            change.service == service
                && (environment.is_empty()
                    || crate::plan::environment_of(state, change) == environment)
        })
        .map(|change| change.number);
    let environment = match latest {
        Some(number) if environment.is_empty() => {
            crate::plan::environment_of(state, &state.changes[&number])
        }
        _ => environment.to_string(),
    };
    let environment = environment.as_str();
    let verdict = match latest {
        None => Verdict::Ignored(format!(
            "{service} has had no change{} to roll back",
            if environment.is_empty() {
                String::new()
            } else {
                format!(" in environment {environment}")
            }
        )),
        Some(change) => judge_trigger(
            state,
            at_ms,
            service,
            environment,
            change,
            options,
            throttle,
        ),
    };
    let change = latest.unwrap_or(0);
    let (outcome, detail, rollback) = match verdict {
        Verdict::Ignored(why) => (TriggerOutcome::Ignored, why, 0),
        Verdict::Throttled { why, call_a_person } => {
            if let Some(refused) = state.changes.get_mut(&change) {
                refused.auto_refused = true;
            }
            if call_a_person {
                let evidence = format!(
                    "automatic rollback of {service} ({}) refused: {why}. Asked by {}: {reason}",
                    change_id(change),
                    source.name()
                );
                state.escalate(at_ms, 0, 0, service, evidence);
            }
            (TriggerOutcome::Throttled, why, 0)
        }
        Verdict::Start => {
            let requirement = approvals::requirement(state, &[change]);
            approvals::expire(state, at_ms);
            let waits = requirement.approvals > 0 && !requirement.automatic_at_once;
            // Where automatic rollbacks wait, a repeated alert does not ask twice; where they
            // run at once, they run, and a person's pending request lapses.
            if let Some(pending) = approvals::pending_for(state, change).filter(|_| waits) {
                (
                    TriggerOutcome::Ignored,
                    format!(
                        "{} already waits for approval to roll it back",
                        approvals::request_id(pending)
                    ),
                    0,
                )
            } else if waits {
                let plan = checked_plan(state, &[change], options, "", Trigger::Automatic)?;
                let (Outcome::Request(number), target, filed) = approvals::file(
                    state,
                    command,
                    &plan,
                    &requirement,
                    reason,
                    Trigger::Automatic,
                )?
                else {
                    unreachable!("approvals::file answers with a request");
                };
                state
                    .audit
                    .append(at_ms, &command.identity, "rollback.start", &target, &filed);
                (
                    TriggerOutcome::AwaitingApproval,
                    format!(
                        "waits for approval as {} ({} requires {} approvals for automatic rollbacks)",
                        approvals::request_id(number),
                        requirement.environments.join(", "),
                        requirement.approvals
                    ),
                    0,
                )
            } else {
                let (Outcome::Rollback(number), target, mut started) = start_rollback(
                    state,
                    command,
                    &[change],
                    options,
                    "",
                    reason,
                    Trigger::Automatic,
                )?
                else {
                    unreachable!("start_rollback answers with a rollback");
                };
                if requirement.approvals > 0 {
                    // Mitigation does not wait for a meeting: the policy approved it.
                    let by_policy = format!(
                        "policy: automatic rollbacks run at once in {}",
                        requirement.environments.join(", ")
                    );
                    started += &format!("; approved by {by_policy}");
                    if let Some(record) = state.rollbacks.get_mut(&number) {
                        record.approved_by = vec![by_policy];
                    }
                }
                // The rollback's own entry, as for one a person starts; the trigger's follows.
                state.audit.append(
                    at_ms,
                    &command.identity,
                    "rollback.start",
                    &target,
                    &started,
                );
                (
                    TriggerOutcome::Started,
                    format!("started {}", rollback_id(number)),
                    number,
                )
            }
        }
    };
    state.triggers.push_back(TriggerRecord {
        at_ms,
        service: service.to_string(),
        environment: environment.to_string(),
        source,
        reason: reason.to_string(),
        outcome,
        detail: detail.clone(),
        rollback,
        change,
    });
    while state.triggers.len() > MAX_TRIGGERS {
        state.triggers.pop_front();
    }
    *state
        .trigger_totals
        .entry(format!("{}/{}", source.name(), outcome.name()))
        .or_default() += 1;
    Ok((
        Outcome::Triggered {
            outcome,
            rollback,
            detail: detail.clone(),
        },
        service.to_string(),
        format!(
            "{}: {detail} (asked by {}: {reason})",
            outcome.name(),
            source.name()
        ),
    ))
}

pub(super) enum Verdict {
    Start,
    Ignored(String),
    Throttled { why: String, call_a_person: bool },
}

/// The throttles, cheapest first. Trips the breaker as a side effect.
pub(super) fn judge_trigger(
    state: &mut State,
    at_ms: u64,
    service: &str,
    environment: &str,
    change_number: u64,
    options: &PlanOptions,
    throttle: &ThrottleLimits,
) -> Verdict {
    let change = &state.changes[&change_number];
    if let Some(rollback) = state.rollbacks.get(&change.rollback) {
        return Verdict::Ignored(format!(
            "{} is already being or was rolled back by {} ({})",
            change.id(),
            rollback.id(),
            rollback.status
        ));
    }
    if change.auto_refused {
        return Verdict::Ignored(format!(
            "an automatic rollback of {} was already refused; a person decides",
            change.id()
        ));
    }
    if let Some(breaker) = &state.breaker {
        return Verdict::Throttled {
            why: format!(
                "the global breaker is open since {} ms ({} triggered together); reset it with `rewindctl trigger reset-breaker` once monitoring is trusted",
                breaker.tripped_at_ms,
                breaker.services.join(", ")
            ),
            call_a_person: false,
        };
    }
    let within = |since_s: u32| at_ms.saturating_sub(u64::from(since_s) * 1000);
    let mut recent: std::collections::BTreeSet<String> = state
        .triggers
        .iter()
        .filter(|old| old.at_ms >= within(throttle.breaker_window_s))
        .map(|old| old.service.clone())
        .collect();
    recent.insert(service.to_string());
    if recent.len() as u32 >= throttle.breaker_services {
        let services: Vec<String> = recent.into_iter().collect();
        let why = format!(
            "{} services asked for an automatic rollback within {} s ({}): that smells like a monitoring fault, so the global breaker is now open",
            services.len(),
            throttle.breaker_window_s,
            services.join(", ")
        );
        state.breaker = Some(BreakerRecord {
            tripped_at_ms: at_ms,
            services,
        });
        return Verdict::Throttled {
            why,
            call_a_person: true,
        };
    }
    let rollbacks_of_service = state
        .rollbacks
        .values()
        .filter(|old| old.services.iter().any(|name| name == service));
    let flaps = rollbacks_of_service
        .clone()
        .filter(|old| old.started_at_ms >= within(throttle.flap_window_s))
        .count() as u32;
    if flaps >= throttle.flap_rollbacks {
        return Verdict::Throttled {
            why: format!(
                "{service} is flapping: rolled back {flaps} times within {} s; it is no longer rolled back automatically",
                throttle.flap_window_s
            ),
            call_a_person: true,
        };
    }
    if let Some(last) = rollbacks_of_service
        .filter(|old| old.trigger == Trigger::Automatic)
        .map(|old| old.started_at_ms)
        .max()
        && last >= within(throttle.cooldown_s)
    {
        return Verdict::Throttled {
            why: format!(
                "{service} was rolled back automatically {} s ago, within its {} s cooldown",
                at_ms.saturating_sub(last) / 1000,
                throttle.cooldown_s
            ),
            call_a_person: true,
        };
    }
    // Counted from the rollbacks themselves, which are never forgotten.
    let spent = state
        .rollbacks
        .values()
        .filter(|old| {
            old.trigger == Trigger::Automatic
                && old.started_at_ms >= within(throttle.budget_window_s)
                && old
                    .changes
                    .first()
                    .and_then(|number| state.changes.get(number))
                    .is_some_and(|change| crate::plan::environment_of(state, change) == environment)
        })
        .count() as u32;
    if spent >= throttle.budget {
        return Verdict::Throttled {
            why: format!(
                "the budget of {} automatic rollbacks per {} s in environment {environment} is spent",
                throttle.budget, throttle.budget_window_s
            ),
            call_a_person: true,
        };
    }
    match crate::plan::build(state, &[change_number], options, Trigger::Automatic) {
        Err(error) => Verdict::Ignored(error.to_string()),
        Ok(plan) if !plan.incompatibilities.is_empty() => Verdict::Throttled {
            why: plan
                .incompatibilities
                .iter()
                .map(|problem| problem.detail.clone())
                .collect::<Vec<_>>()
                .join("; "),
            call_a_person: true,
        },
        Ok(_) => Verdict::Start,
    }
}
