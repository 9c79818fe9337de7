//! Decided on the leader, replicated as data: from cluster version 3 the leader plans a
//! rollback and judges an automatic trigger, and the log carries the result.
//!
//! Before version 3 every member re-ran the planner and the throttles inside `apply()`, so how an
//! entry applied depended on the binary applying it: during a rolling upgrade a member with a
//! newer planner could refuse a rollback that older members started. Now, as nomad's scheduler
//! hands its plan to the plan applier, the leader computes the plan ([`prepare`]) and `apply()`
//! only checks that the state it was computed from has not changed in the parts the planner
//! reads (the [`basis`]) before recording it. A stale decision is refused without a trace and
//! the leader decides again ([`DECISION_RETRIES`] times at most, after a short backoff).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::approvals::{self, Decision, RequestStatus};
use super::command::{AutoTrigger, Command, CommandKind, DecideRequest, StartRollback};
use super::state::{BreakerRecord, ChangeRecord, PlanOptions, State, StepProgress, StepStatus};
use super::version;
use crate::errors::CoordinatorError;
use crate::plan::Plan;

type Result<T> = std::result::Result<T, CoordinatorError>;

/// The cluster version from which the leader decides and `apply()` only checks.
pub const DECIDED_ON_LEADER: u32 = 3;

/// How often a member proposes a command again whose decision went stale in flight.
pub const DECISION_RETRIES: u32 = 5;

/// The wait before each of those retries: 20 ms doubling to 320 ms, jittered (at most about
/// 0.6 s in all).
pub const DECISION_BACKOFF: rewind_shared::backoff::Backoff = rewind_shared::backoff::Backoff {
    first: std::time::Duration::from_millis(20),
    max: std::time::Duration::from_millis(320),
    jitter: true,
};

/// A rollback plan as the leader computed it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaderPlan {
    /// The plan, or why the planner refused (an approval records that its request lapsed).
    pub plan: std::result::Result<Plan, String>,
    /// Why each pending request over the same changes can no longer be approved (its plan or
    /// the policy drifted); one missing here still stands.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub drifted: BTreeMap<u64, String>,
    /// The [`basis`] the plan was computed from.
    pub basis: String,
}

/// What the leader made of a request for an automatic rollback.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TriggerDecision {
    /// The change judged (the service's latest in the environment), 0 when there is none.
    pub change: u64,
    /// The environment judged: the alert's, or the change's when the alert names none.
    pub environment: String,
    pub verdict: TriggerVerdict,
    /// The plan, and the pending requests it lapses, when the verdict is to start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<LeaderPlan>,
    /// The [`basis`] the verdict was judged on.
    pub basis: String,
}

/// The throttles' verdict on an automatic rollback.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TriggerVerdict {
    Start,
    Ignored {
        why: String,
    },
    Throttled {
        why: String,
        /// Escalated to a person (every throttle but an open breaker).
        call_a_person: bool,
        /// Set when this trigger opens the global breaker.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trip_breaker: Option<BreakerRecord>,
    },
}

/// Whether `kind` carries a decision the leader makes before proposing it.
pub fn decided_on_leader(kind: &CommandKind) -> bool {
    matches!(
        kind,
        CommandKind::StartRollback(StartRollback { .. })
            | CommandKind::DecideRequest(DecideRequest {
                decision: Decision::Approve,
                ..
            })
            | CommandKind::AutoTrigger(AutoTrigger { .. })
    )
}

/// The leader's half: plans the rollback or judges the trigger `command` asks for, on the
/// leader's `state`, and puts the result in the command. Refuses what the planner refuses, as
/// `apply()` did before version 3. Changes nothing below version 3, or for a request id the
/// request log already answers (the entry only repeats the answer).
pub fn prepare(state: &State, command: &mut Command) -> Result<()> {
    if state.cluster_version() < DECIDED_ON_LEADER || super::apply::answered(state, command) {
        return Ok(());
    }
    if decided_on_leader(&command.kind) {
        // Decide on the command as the members will read it from the log: a value that does
        // not survive encoding exactly (a tolerance's last digit) would otherwise make a plan
        // whose hash no member can reproduce.
        *command = as_replicated(command)?;
    }
    let at_ms = command.at_ms;
    match &mut command.kind {
        CommandKind::StartRollback(StartRollback {
            changes,
            options,
            plan_hash,
            trigger,
            planned,
            ..
        }) => {
            let plan = crate::plan::build(state, changes, options, *trigger)?;
            check_shown(&plan, plan_hash, options)?;
            *planned = Some(Box::new(leader_plan(state, changes, Ok(plan))));
        }
        CommandKind::DecideRequest(DecideRequest {
            request,
            decision: Decision::Approve,
            planned,
            ..
        }) => {
            // A deploy request carries its own spec; only a rollback's plan is decided here.
            if let Some(request) = state.approval_requests.get(request)
                && request.deploy.is_none()
            {
                let plan =
                    crate::plan::build(state, &request.changes, &request.options, request.trigger)
                        .map_err(|error| error.to_string());
                *planned = Some(Box::new(leader_plan(state, &request.changes, plan)));
            }
        }
        CommandKind::AutoTrigger(AutoTrigger {
            service,
            environment,
            options,
            throttle,
            decided,
            ..
        }) => {
            let decision =
                super::apply::judge_trigger(state, at_ms, service, environment, options, throttle)?;
            *decided = Some(Box::new(decision));
        }
        _ => {}
    }
    Ok(())
}

/// A plan (or the planner's refusal) with what it lapses and the basis it was computed on.
pub(super) fn leader_plan(
    state: &State,
    changes: &[u64],
    plan: std::result::Result<Plan, String>,
) -> LeaderPlan {
    let drifted = pending_requests_over(state, changes)
        .filter_map(|request| {
            let drift = approvals::plan_drift(state, request)
                .or_else(|| approvals::requirement_drift(state, request))?;
            Some((request.number, drift))
        })
        .collect();
    LeaderPlan {
        plan,
        drifted,
        basis: basis(state, changes, false),
    }
}

/// Refuses a plan other than the one the operator was shown (`plan_hash`, when given), or one
/// that would break consumers without `force`.
pub(super) fn check_shown(plan: &Plan, plan_hash: &str, options: &PlanOptions) -> Result<()> {
    if !plan_hash.is_empty() && plan.hash != plan_hash {
        return Err(CoordinatorError::PlanChanged {
            shown: plan_hash.to_string(),
            now: plan.hash.clone(),
        });
    }
    if !plan.incompatibilities.is_empty() && !options.force {
        return Err(CoordinatorError::Incompatible {
            problems: plan
                .incompatibilities
                .iter()
                .map(|problem| problem.detail.clone())
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    Ok(())
}

/// `apply()`'s first check of the leader's plan of `changes`: this cluster version takes one,
/// and the state is still the one it was computed from. Checked before anything changes.
pub(super) fn given_basis(state: &State, planned: &LeaderPlan, changes: &[u64]) -> Result<()> {
    version::require(state, DECIDED_ON_LEADER, "a rollback planned on the leader")?;
    check_basis(state, &planned.basis, changes, false, "rollback plan")
}

/// The leader's plan, which must be of exactly `changes` with `options`.
pub(super) fn matching_plan<'a>(
    planned: &'a LeaderPlan,
    changes: &[u64],
    options: &PlanOptions,
) -> Result<&'a Plan> {
    let plan = planned
        .plan
        .as_ref()
        .map_err(|why| CoordinatorError::invalid("plan", why.clone()))?;
    let mut asked = changes.to_vec();
    asked.sort_unstable();
    let mut covered = plan.changes.clone();
    covered.sort_unstable();
    if asked != covered || &plan.options != options {
        return Err(CoordinatorError::invalid(
            "plan",
            "the leader's plan is not of the rollback this entry asks for",
        ));
    }
    // The hash an operator approves or names must be of the plan that runs.
    if crate::plan::plan_hash(plan) != plan.hash {
        return Err(CoordinatorError::invalid(
            "plan",
            "the leader's plan does not match its own hash",
        ));
    }
    Ok(plan)
}

/// `apply()`'s half for a trigger: the leader's verdict, judged on the state as it still is.
pub(super) fn given_verdict<'a>(
    state: &State,
    decided: &'a TriggerDecision,
) -> Result<&'a TriggerDecision> {
    version::require(state, DECIDED_ON_LEADER, "a trigger judged on the leader")?;
    let changes: Vec<u64> = (decided.change != 0)
        .then_some(decided.change)
        .into_iter()
        .collect();
    // The trigger's basis covers all its plan's does, so the plan needs no check of its own.
    check_basis(state, &decided.basis, &changes, true, "trigger verdict")?;
    Ok(decided)
}

/// From version 3 on an entry that asks for a rollback or judges a trigger must carry the
/// leader's decision: one without it was proposed before the version was raised, and is
/// proposed again, decided.
pub(super) fn require_decided(state: &State, what: &str) -> Result<()> {
    if state.cluster_version() < DECIDED_ON_LEADER {
        return Ok(());
    }
    Err(CoordinatorError::StaleDecision {
        what: what.to_string(),
        why: format!(
            "from cluster version {DECIDED_ON_LEADER} the leader decides it and the entry carries \
             no decision"
        ),
    })
}

fn check_basis(
    state: &State,
    expected: &str,
    changes: &[u64],
    trigger: bool,
    what: &str,
) -> Result<()> {
    let now = basis(state, changes, trigger);
    if now == expected {
        return Ok(());
    }
    Err(CoordinatorError::StaleDecision {
        what: what.to_string(),
        why: format!(
            "the state it was decided on changed before it applied (basis {} -> {})",
            expected.chars().take(19).collect::<String>(),
            now.chars().take(19).collect::<String>()
        ),
    })
}

/// Pending requests for approval that ask to roll back any of `changes`.
fn pending_requests_over<'a>(
    state: &'a State,
    changes: &'a [u64],
) -> impl Iterator<Item = &'a approvals::ApprovalRequest> {
    state.approval_requests.values().filter(|request| {
        request.status == RequestStatus::Pending
            && request.deploy.is_none()
            && request
                .changes
                .iter()
                .any(|change| changes.contains(change))
    })
}

/// A digest of what the planner (and, with `trigger`, the throttles) read about `changes`, by
/// aggregate: a version per aggregate where one exists (counters of what only grows, statuses
/// of what moves), the records themselves where they are small. Equal bases mean the planner
/// would decide the same, so `apply()` records the leader's decision without re-making it.
///
/// What it covers is part of how entries apply: changing it needs a new cluster version. It
/// hashes some records whole (the services, the policy, a change as [`plan_inputs`] leaves it),
/// so a field added to them changes it too; such a field already changes the state digest, and
/// needs a version anyway.
pub fn basis(state: &State, changes: &[u64], trigger: bool) -> String {
    let mut hasher = Sha256::new();
    // New changes, rollbacks, schema transactions and requests; registries that only grow.
    put(
        &mut hasher,
        "counters",
        &(
            state.next_change,
            state.next_rollback,
            state.next_schema_txn,
            state.next_request,
        ),
    );
    put(
        &mut hasher,
        "registries",
        &(
            state.releases.values().map(BTreeMap::len).sum::<usize>(),
            state.migrations.values().map(BTreeMap::len).sum::<usize>(),
        ),
    );
    // Dependencies, recipes and contracts.
    put(&mut hasher, "services", &state.services);
    // Which version each service runs (the planner's compatibility check) and what is reverted.
    let changes_now: Vec<(u64, &str)> = state
        .changes
        .values()
        .map(|change| (change.number, change.status.name()))
        .collect();
    put(&mut hasher, "changes", &changes_now);
    let rollbacks_now: Vec<(u64, &str)> = state
        .rollbacks
        .values()
        .map(|rollback| (rollback.number, rollback.status.name()))
        .collect();
    put(&mut hasher, "rollbacks", &rollbacks_now);
    let schema_now: Vec<(u64, &str)> = state
        .schema_txns
        .values()
        .map(|txn| (txn.number, txn.status.name()))
        .collect();
    put(&mut hasher, "schema", &schema_now);
    // The named changes, and those of pending requests over them (their drift is judged too).
    let mut covered: Vec<u64> = changes.to_vec();
    for request in pending_requests_over(state, changes) {
        covered.extend(&request.changes);
    }
    covered.sort_unstable();
    covered.dedup();
    // From version 4 a decision hashes a change as the planner (and a trigger's throttles)
    // read it, so that its deploy's step progress elsewhere does not make the decision stale.
    let of_inputs = state.cluster_version() >= version::PLAN_BASIS_OF_INPUTS;
    for number in &covered {
        let change = state.changes.get(number);
        if of_inputs {
            put(
                &mut hasher,
                "change",
                &change.map(|change| plan_inputs(change, trigger)),
            );
        } else {
            put(&mut hasher, "change", &change);
        }
        let Some(change) = change else { continue };
        for host in &change.hosts {
            put(
                &mut hasher,
                "host",
                &state.hosts.get(&host.host_id).map(|known| &known.labels),
            );
        }
        for flag in &change.flags {
            put(
                &mut hasher,
                "flag",
                &state
                    .flag(&change.environment, &change.service, &flag.name)
                    .map(|current| current.by_change),
            );
        }
    }
    let pending: Vec<(u64, &str)> = pending_requests_over(state, changes)
        .map(|request| (request.number, request.plan_hash.as_str()))
        .collect();
    put(&mut hasher, "requests", &pending);
    put(&mut hasher, "policy", &state.access.policy);
    if trigger {
        put(&mut hasher, "breaker", &state.breaker);
        put(
            &mut hasher,
            "triggers",
            &state.trigger_totals.values().sum::<u64>(),
        );
    }
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// A change as the rollback planner reads it: of each host's steps only whether its activation
/// is still pending (it never reached the release) and the snapshot it left, not its attempts,
/// times or details; not its times or health baseline; whether an automatic rollback of it was
/// refused only for a `trigger`, whose throttles read that.
fn plan_inputs(change: &ChangeRecord, trigger: bool) -> ChangeRecord {
    let mut inputs = change.clone();
    inputs.baseline = Default::default();
    inputs.started_at_ms = 0;
    inputs.deployed_at_ms = 0;
    if !trigger {
        inputs.auto_refused = false;
    }
    for host in &mut inputs.hosts {
        let pending = host.activate.status == StepStatus::Pending;
        host.capture = StepProgress::default();
        host.activate = StepProgress {
            status: if pending {
                StepStatus::Pending
            } else {
                StepStatus::Succeeded
            },
            ..StepProgress::default()
        };
    }
    inputs
}

/// `value` (a command, its options) as members decode it from the log: a float's last digit
/// may change on the way (serde_json parses without `float_roundtrip`, and turning that on would
/// change how old entries decode).
pub fn as_replicated<T: Serialize + serde::de::DeserializeOwned>(value: &T) -> Result<T> {
    let failed = |error: serde_json::Error| {
        CoordinatorError::Internal(format!("encode for the log: {error}"))
    };
    serde_json::from_slice(&serde_json::to_vec(value).map_err(failed)?).map_err(failed)
}

/// Adds `value` to a basis under `label`, as JSON (the state's own types serialise infallibly:
/// they are in every snapshot).
fn put(hasher: &mut Sha256, label: &str, value: &impl Serialize) {
    hasher.update(label.as_bytes());
    hasher.update(serde_json::to_vec(value).unwrap_or_default());
    hasher.update([0]);
}
