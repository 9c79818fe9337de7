//! Automatic triggers: judged against throttles, and the rollback they start.

use super::*;
use crate::state_machine::decision::{self, TriggerDecision, TriggerVerdict};

/// Acts on a request for an automatic rollback: starts it, or records why not. From cluster
/// version 3 the leader's verdict is recorded (see `decision.rs`); before, it is judged here.
/// Refuses (as an error, recording nothing) a service that does not exist and, from version
/// 3, a verdict that went stale or does not fit the entry (see `decision::given_verdict`).
pub(super) fn auto_trigger(
    state: &mut State,
    command: &Command,
    trigger: &AutoTrigger,
) -> Result<(Outcome, String, String)> {
    let AutoTrigger {
        service,
        environment,
        source,
        reason,
        options,
        throttle,
        decided,
    } = trigger;
    let decision = match decided {
        Some(decided) => {
            require_service(state, service)?;
            decision::given_verdict(state, decided)?.clone()
        }
        None => {
            decision::require_decided(state, "trigger verdict")?;
            judge_trigger(
                state,
                command.at_ms,
                service,
                environment,
                options,
                throttle,
            )?
        }
    };
    let (service, source) = (service.as_str(), *source);
    let at_ms = command.at_ms;
    let change = decision.change;
    let environment = decision.environment.as_str();
    let (outcome, detail, rollback) = match decision.verdict {
        TriggerVerdict::Ignored { why } => (TriggerOutcome::Ignored, why, 0),
        TriggerVerdict::Throttled {
            why,
            call_a_person,
            trip_breaker,
        } => {
            if trip_breaker.is_some() {
                state.breaker = trip_breaker;
            }
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
        TriggerVerdict::Start => {
            let Some(planned) = &decision.plan else {
                return Err(CoordinatorError::invalid(
                    "decided",
                    "a verdict to start carries the plan",
                ));
            };
            let plan = decision::matching_plan(planned, &[change], options)?;
            decision::check_shown(plan, "", options)?;
            // The leader's drift of pending requests; judged here before version 3.
            let drift = decided.as_ref().map(|_| &planned.drifted);
            let requirement = approvals::requirement(state, &[change]);
            approvals::expire(state, at_ms);
            // An automatic request of this change that expired just now refuses it, as a
            // person's no would: the verdict was judged before the expiry was recorded.
            // (Wherever it expired: the throttles treat an expiry noticed by any earlier command
            // alike, so the outcome does not depend on which command noticed it first.)
            let expired_just_now = state.cluster_version() >= version::EXPIRY_REFUSES_AT_ONCE
                && state
                    .changes
                    .get(&change)
                    .is_some_and(|record| record.auto_refused);
            let waits = requirement.approvals > 0 && !requirement.automatic_at_once;
            // Where automatic rollbacks wait, a repeated alert does not ask twice; where they
            // run at once, they run, and a person's pending request lapses.
            if expired_just_now {
                (
                    TriggerOutcome::Ignored,
                    format!(
                        "an automatic rollback of {} was already refused; a person decides",
                        change_id(change)
                    ),
                    0,
                )
            } else if let Some(pending) = approvals::pending_for(state, change).filter(|_| waits) {
                (
                    TriggerOutcome::Ignored,
                    format!(
                        "{} already waits for approval to roll it back",
                        approvals::request_id(pending)
                    ),
                    0,
                )
            } else if waits {
                let (number, target, filed) = approvals::file(
                    state,
                    command,
                    plan,
                    &requirement,
                    reason,
                    Trigger::Automatic,
                    drift,
                )?;
                super::append_audit(
                    state,
                    command,
                    (&command.identity, "rollback.start", &target),
                    (&filed, command.kind.reason()),
                );
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
                let (number, target, mut started) =
                    start_planned(state, command, plan, reason, Trigger::Automatic);
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
                super::append_audit(
                    state,
                    command,
                    (&command.identity, "rollback.start", &target),
                    (&started, command.kind.reason()),
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

/// Judges a request for an automatic rollback of `service`'s latest change (in `environment`,
/// or any when it names none) at `at_ms`: on the leader from cluster version 3, in `apply()`
/// before. Refuses only a service that does not exist.
/// The change an automatic rollback of `service` reverts: its latest in the alert's
/// `environment` (any, when it names none).
pub fn latest_change<'a>(
    state: &'a State,
    service: &str,
    environment: &str,
) -> Option<&'a crate::state_machine::ChangeRecord> {
    state.changes.values().rev().find(|change| {
        change.service == service
            && (environment.is_empty() || crate::plan::environment_of(state, change) == environment)
    })
}

pub(crate) fn judge_trigger(
    state: &State,
    at_ms: u64,
    service: &str,
    environment: &str,
    options: &PlanOptions,
    throttle: &ThrottleLimits,
) -> Result<TriggerDecision> {
    require_service(state, service)?;
    let latest = latest_change(state, service, environment).map(|change| change.number);
    let environment = match latest {
        Some(number) if environment.is_empty() => {
            crate::plan::environment_of(state, &state.changes[&number])
        }
        _ => environment.to_string(),
    };
    let (verdict, plan) = match latest {
        None => (
            TriggerVerdict::Ignored {
                why: format!(
                    "{service} has had no change{} to roll back",
                    if environment.is_empty() {
                        String::new()
                    } else {
                        format!(" in environment {environment}")
                    }
                ),
            },
            None,
        ),
        Some(change) => throttles(
            state,
            at_ms,
            service,
            &environment,
            change,
            options,
            throttle,
        ),
    };
    let change = latest.unwrap_or(0);
    let changes: Vec<u64> = latest.into_iter().collect();
    // What only the leader's decision needs is left out where apply() judges (before version 3).
    if state.cluster_version() < decision::DECIDED_ON_LEADER {
        let plan = plan.map(|plan| decision::LeaderPlan {
            plan: Ok(plan),
            drifted: Default::default(),
            basis: String::new(),
        });
        let basis = String::new();
        return Ok(TriggerDecision {
            change,
            environment,
            verdict,
            plan,
            basis,
        });
    }
    Ok(TriggerDecision {
        change,
        environment,
        verdict,
        plan: plan.map(|plan| decision::leader_plan(state, &changes, Ok(plan))),
        basis: decision::basis(state, &changes, true),
    })
}

/// The throttles, cheapest first, and the plan when they let it start. A verdict that opens the
/// global breaker says so; `apply()` opens it.
fn throttles(
    state: &State,
    at_ms: u64,
    service: &str,
    environment: &str,
    change_number: u64,
    options: &PlanOptions,
    throttle: &ThrottleLimits,
) -> (TriggerVerdict, Option<crate::plan::Plan>) {
    let ignored = |why: String| (TriggerVerdict::Ignored { why }, None);
    let throttled = |why: String, call_a_person: bool| {
        let verdict = TriggerVerdict::Throttled {
            why,
            call_a_person,
            trip_breaker: None,
        };
        (verdict, None)
    };
    let change = &state.changes[&change_number];
    if let Some(rollback) = state.rollbacks.get(&change.rollback) {
        return ignored(format!(
            "{} is already being or was rolled back by {} ({})",
            change.id(),
            rollback.id(),
            rollback.status
        ));
    }
    if change.auto_refused {
        return ignored(format!(
            "an automatic rollback of {} was already refused; a person decides",
            change.id()
        ));
    }
    if let Some(breaker) = &state.breaker {
        return throttled(
            format!(
                "the global breaker is open since {} ms ({} triggered together); reset it with `rewindctl trigger reset-breaker` once monitoring is trusted",
                breaker.tripped_at_ms,
                breaker.services.join(", ")
            ),
            false,
        );
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
        let verdict = TriggerVerdict::Throttled {
            why,
            call_a_person: true,
            trip_breaker: Some(BreakerRecord {
                tripped_at_ms: at_ms,
                services,
            }),
        };
        return (verdict, None);
    }
    // Counted from the rollbacks themselves: those in the state and (cluster version 8) the
    // archived ones, which still count within a window.
    let longest = throttle
        .flap_window_s
        .max(throttle.cooldown_s)
        .max(throttle.budget_window_s);
    let recent = match state.rollbacks_started_since(within(longest)) {
        Ok(recent) => recent,
        // Not judged (an alert that repeats is judged again), never refused for good.
        Err(error) => {
            return ignored(format!(
                "the archived rollbacks cannot be read ({error}), so the throttles cannot be counted"
            ));
        }
    };
    let rollbacks_of_service = recent
        .iter()
        .filter(|old| old.services.iter().any(|name| name == service));
    let flaps = rollbacks_of_service
        .clone()
        .filter(|old| old.started_at_ms >= within(throttle.flap_window_s))
        .count() as u32;
    if flaps >= throttle.flap_rollbacks {
        return throttled(
            format!(
                "{service} is flapping: rolled back {flaps} times within {} s; it is no longer rolled back automatically",
                throttle.flap_window_s
            ),
            true,
        );
    }
    if let Some(last) = rollbacks_of_service
        .filter(|old| old.trigger == Trigger::Automatic)
        .map(|old| old.started_at_ms)
        .max()
        && last >= within(throttle.cooldown_s)
    {
        return throttled(
            format!(
                "{service} was rolled back automatically {} s ago, within its {} s cooldown",
                at_ms.saturating_sub(last) / 1000,
                throttle.cooldown_s
            ),
            true,
        );
    }
    let mut spent = 0u32;
    for old in recent.iter().filter(|old| {
        old.trigger == Trigger::Automatic && old.started_at_ms >= within(throttle.budget_window_s)
    }) {
        let Some(&number) = old.changes.first() else {
            continue;
        };
        match state.change_or_archived(number) {
            Ok(Some(change)) if crate::plan::environment_of(state, &change) == environment => {
                spent += 1;
            }
            Ok(_) => {}
            Err(error) => {
                return ignored(format!(
                    "an archived change cannot be read ({error}), so the budget cannot be counted"
                ));
            }
        }
    }
    if spent >= throttle.budget {
        return throttled(
            format!(
                "the budget of {} automatic rollbacks per {} s in environment {environment} is spent",
                throttle.budget, throttle.budget_window_s
            ),
            true,
        );
    }
    match crate::plan::build(state, &[change_number], options, Trigger::Automatic) {
        Err(error) => ignored(error.to_string()),
        Ok(plan) if !plan.incompatibilities.is_empty() => throttled(
            plan.incompatibilities
                .iter()
                .map(|problem| problem.detail.clone())
                .collect::<Vec<_>>()
                .join("; "),
            true,
        ),
        Ok(plan) => (TriggerVerdict::Start, Some(plan)),
    }
}
