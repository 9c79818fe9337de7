//! Requests for approval. A rollback in an environment whose policy requires approvals starts as
//! a request bound to its plan's hash; it runs once enough approvers other than the requester
//! approve that exact hash. If the plan changes meanwhile (hosts, health, another change) the
//! request lapses and says why; it expires after the environment's `request-ttl-s`. Break-glass
//! runs at once and leaves a request to review afterwards.
//!
//! Everything here runs inside `apply()`: the clock is the command's, the policy is the
//! replicated one, so every member decides alike.

use serde::{Deserialize, Serialize};

use super::command::{Command, Outcome};
use super::state::{PlanOptions, State, Trigger};
use crate::access::policy::AutomaticRollbacks;
use crate::errors::CoordinatorError;
use crate::plan::Plan;

type Result<T> = std::result::Result<T, CoordinatorError>;

/// Requests kept, pending or not; the oldest settled ones go first.
pub const MAX_REQUESTS: usize = 1000;
/// Requests waiting at once: more is a queue nobody is working through.
pub const MAX_PENDING_REQUESTS: usize = 100;

pub fn request_id(number: u64) -> String {
    format!("req-{number}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestStatus {
    Pending,
    /// Approved by enough approvers: its rollback started.
    Approved,
    Denied,
    /// The plan changed after it was requested: approvals of the old plan do not carry over.
    Lapsed,
    Expired,
    /// Ran at once without approvals; waits for a review.
    BreakGlass,
}

impl RequestStatus {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Lapsed => "lapsed",
            Self::Expired => "expired",
            Self::BreakGlass => "break-glass",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub identity: String,
    pub at_ms: u64,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    pub number: u64,
    pub status: RequestStatus,
    /// Why it was denied, lapsed or expired, or what it started.
    pub detail: String,
    pub requester: String,
    pub trigger: Trigger,
    pub reason: String,
    /// What runs once approved.
    pub changes: Vec<u64>,
    pub services: Vec<String>,
    pub options: PlanOptions,
    /// Environments whose policy asks for approvals.
    pub environments: Vec<String>,
    pub plan_hash: String,
    /// The plan as requested, a line per wave, to say what changed if it lapses.
    pub plan: Vec<String>,
    pub needed: u32,
    pub approvals: Vec<Approval>,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub decided_at_ms: u64,
    /// The rollback it started.
    pub rollback: u64,
    pub break_glass: bool,
    pub review: Option<Approval>,
}

impl ApprovalRequest {
    /// A pending request by `command`'s caller for `plan`, numbered next.
    fn new(
        state: &mut State,
        command: &Command,
        plan: &Plan,
        requirement: &Requirement,
        reason: &str,
        trigger: Trigger,
    ) -> Self {
        state.next_request += 1;
        Self {
            number: state.next_request,
            status: RequestStatus::Pending,
            detail: String::new(),
            requester: command.identity.clone(),
            trigger,
            reason: reason.to_string(),
            changes: plan.changes.clone(),
            services: plan.services.clone(),
            options: plan.options.clone(),
            environments: requirement.environments.clone(),
            plan_hash: plan.hash.clone(),
            plan: outline(plan),
            needed: requirement.approvals,
            approvals: Vec::new(),
            created_at_ms: command.at_ms,
            expires_at_ms: command.at_ms.saturating_add(requirement.ttl_ms),
            decided_at_ms: 0,
            rollback: 0,
            break_glass: false,
            review: None,
        }
    }

    pub fn id(&self) -> String {
        request_id(self.number)
    }

    /// Pending, or a break-glass rollback nobody has reviewed yet.
    pub fn is_open(&self) -> bool {
        self.status == RequestStatus::Pending
            || (self.status == RequestStatus::BreakGlass && self.review.is_none())
    }
}

/// What the policy asks of a rollback of some changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requirement {
    /// The most any of its environments requires; 0 runs at once.
    pub approvals: u32,
    /// The environments that require approvals.
    pub environments: Vec<String>,
    /// Whether every one of them allows break-glass.
    pub break_glass: bool,
    /// Whether every one of them lets automatic rollbacks run at once.
    pub automatic_at_once: bool,
    /// The shortest wait any of them allows.
    pub ttl_ms: u64,
}

/// The approvals a rollback of `changes` needs under the policy in force.
pub fn requirement(state: &State, changes: &[u64]) -> Requirement {
    let Some(policy) = state.access.policy.as_deref() else {
        return Requirement::default();
    };
    let mut environments: Vec<&str> = changes
        .iter()
        .filter_map(|number| state.changes.get(number))
        .flat_map(|change| crate::plan::change_environments(state, change))
        .collect();
    environments.sort_unstable();
    environments.dedup();
    let mut requirement = Requirement {
        break_glass: true,
        automatic_at_once: true,
        ttl_ms: u64::MAX,
        ..Requirement::default()
    };
    for environment in environments {
        let rules = policy.environment(environment);
        if rules.approvals == 0 {
            continue;
        }
        requirement.approvals = requirement.approvals.max(rules.approvals);
        requirement.environments.push(environment.to_string());
        requirement.break_glass &= rules.break_glass;
        requirement.automatic_at_once &= rules.automatic_rollbacks == AutomaticRollbacks::AtOnce;
        requirement.ttl_ms = requirement
            .ttl_ms
            .min(u64::from(rules.request_ttl_s) * 1000);
    }
    requirement
}

/// One line per wave: `2. api in eu: web-1, web-2`.
pub fn outline(plan: &Plan) -> Vec<String> {
    plan.waves
        .iter()
        .enumerate()
        .map(|(index, wave)| {
            format!(
                "{}. {} ({}) in {}: {}",
                index + 1,
                wave.service,
                super::change_id(wave.change),
                wave.region,
                wave.hosts().join(", ")
            )
        })
        .collect()
}

/// Why the plan of `request` is not the plan it was requested with, or `None` if it still is.
pub fn plan_drift(state: &State, request: &ApprovalRequest) -> Option<String> {
    let plan = match crate::plan::build(state, &request.changes, &request.options, request.trigger)
    {
        Ok(plan) => plan,
        Err(error) => return Some(format!("it can no longer be planned: {error}")),
    };
    if plan.hash == request.plan_hash {
        return None;
    }
    let now = outline(&plan);
    let mut differences: Vec<String> = Vec::new();
    for line in &request.plan {
        if !now.contains(line) {
            differences.push(format!("was {line:?}"));
        }
    }
    for line in &now {
        if !request.plan.contains(line) {
            differences.push(format!("now {line:?}"));
        }
    }
    if differences.is_empty() {
        differences.push(
            "the waves are the same; its options, flags, recipes, schema steps or compatibility differ"
                .into(),
        );
    }
    Some(format!(
        "the plan changed since it was requested (sha256 {} -> {}): {}",
        short(&request.plan_hash),
        short(&plan.hash),
        differences.join("; ")
    ))
}

/// Why the policy's rules for a request's changes are no longer those it was filed under (more
/// or fewer approvals, other environments), or `None`. A request is judged by the rules in force
/// when it is approved, never by older, looser ones.
fn requirement_drift(state: &State, request: &ApprovalRequest) -> Option<String> {
    let now = requirement(state, &request.changes);
    (now.approvals != request.needed || now.environments != request.environments).then(|| {
        format!(
            "the access policy changed since it was requested ({} approvals in {} then, {} in {} now)",
            request.needed,
            request.environments.join(", "),
            now.approvals,
            if now.environments.is_empty() {
                "none".to_string()
            } else {
                now.environments.join(", ")
            }
        )
    })
}

fn short(hash: &str) -> &str {
    let digits = hash.strip_prefix("sha256:").unwrap_or(hash);
    &digits[..digits.len().min(12)]
}

/// A person said no to an automatic rollback of `changes` (or let it expire): the next alert
/// must not ask again, as after a throttle.
fn refuse_automatic(state: &mut State, changes: &[u64]) {
    for change in changes {
        if let Some(record) = state.changes.get_mut(change) {
            record.auto_refused = true;
        }
    }
}

/// The pending request that already asks to roll back `change`, if any.
pub fn pending_for(state: &State, change: u64) -> Option<u64> {
    pending_over(state, &[change]).first().copied()
}

/// Pending requests that ask to roll back any of `changes`, oldest first.
fn pending_over(state: &State, changes: &[u64]) -> Vec<u64> {
    state
        .approval_requests
        .values()
        .filter(|request| {
            request.status == RequestStatus::Pending
                && request
                    .changes
                    .iter()
                    .any(|change| changes.contains(change))
        })
        .map(|request| request.number)
        .collect()
}

/// Marks pending requests whose time ran out as expired (at `at_ms`, the command's time).
pub fn expire(state: &mut State, at_ms: u64) {
    let mut refused = Vec::new();
    for request in state.approval_requests.values_mut() {
        if request.status == RequestStatus::Pending && at_ms > request.expires_at_ms {
            if request.trigger == Trigger::Automatic {
                refused.extend(request.changes.iter().copied());
            }
            request.status = RequestStatus::Expired;
            request.decided_at_ms = request.expires_at_ms;
            request.detail = format!(
                "expired with {} of {} approvals",
                request.approvals.len(),
                request.needed
            );
        }
    }
    refuse_automatic(state, &refused);
}

/// Files a request for a rollback of `plan` that `requirement` says needs approvals.
pub fn file(
    state: &mut State,
    command: &Command,
    plan: &Plan,
    requirement: &Requirement,
    reason: &str,
    trigger: Trigger,
) -> Result<(Outcome, String, String)> {
    let at_ms = command.at_ms;
    expire(state, at_ms);
    for number in pending_over(state, &plan.changes) {
        let request = &state.approval_requests[&number];
        // One that can no longer be approved does not block a request for the plan as it is.
        if let Some(drift) =
            plan_drift(state, request).or_else(|| requirement_drift(state, request))
        {
            lapse(state, number, at_ms, &drift);
            continue;
        }
        let shared: Vec<u64> = request
            .changes
            .iter()
            .copied()
            .filter(|change| plan.changes.contains(change))
            .collect();
        return Err(CoordinatorError::AlreadyRequested {
            request_id: request_id(number),
            changes: crate::plan::change_list(&shared),
        });
    }
    let pending = state
        .approval_requests
        .values()
        .filter(|request| request.status == RequestStatus::Pending)
        .count();
    if pending >= MAX_PENDING_REQUESTS {
        return Err(CoordinatorError::Overloaded(format!(
            "{pending} requests wait for approval already (at most {MAX_PENDING_REQUESTS}): approve, deny or let some expire"
        )));
    }
    let request = ApprovalRequest::new(state, command, plan, requirement, reason, trigger);
    let number = request.number;
    let audit = format!(
        "ok: rollback of {} in {} waits for {} approvals (plan {}): {reason}",
        crate::plan::change_list(&plan.changes),
        requirement.environments.join(", "),
        requirement.approvals,
        plan.hash
    );
    state.approval_requests.insert(number, request);
    prune(state);
    Ok((Outcome::Request(number), request_id(number), audit))
}

/// Records a break-glass rollback, already started as `rollback`, as a request to review.
pub fn record_break_glass(
    state: &mut State,
    command: &Command,
    plan: &Plan,
    requirement: &Requirement,
    reason: &str,
    rollback: u64,
) -> u64 {
    let request = ApprovalRequest {
        status: RequestStatus::BreakGlass,
        detail: format!(
            "ran at once without the {} approvals {} requires: {}",
            requirement.approvals,
            requirement.environments.join(", "),
            super::rollback_id(rollback)
        ),
        expires_at_ms: command.at_ms,
        decided_at_ms: command.at_ms,
        rollback,
        break_glass: true,
        ..ApprovalRequest::new(state, command, plan, requirement, reason, Trigger::Manual)
    };
    let number = request.number;
    state.approval_requests.insert(number, request);
    prune(state);
    number
}

/// Records a pending request as lapsed: its approvals do not carry over to another plan.
fn lapse(state: &mut State, number: u64, at_ms: u64, why: &str) {
    if let Some(request) = state.approval_requests.get_mut(&number) {
        request.status = RequestStatus::Lapsed;
        request.decided_at_ms = at_ms;
        request.detail = format!(
            "lapsed with {} of {} approvals: {why}",
            request.approvals.len(),
            request.needed
        );
    }
}

/// A rollback started for some of a pending request's changes: the request can never run as
/// approved, so it lapses, naming the rollback.
pub fn supersede(state: &mut State, changes: &[u64], rollback: u64, at_ms: u64) {
    let why = format!("{} reverts its changes", super::rollback_id(rollback));
    for number in pending_over(state, changes) {
        lapse(state, number, at_ms, &why);
    }
}

/// Drops the oldest requests beyond [`MAX_REQUESTS`]: settled ones first, then break-glass
/// ones still unreviewed (their rollbacks keep the mark); pending ones are bounded apart.
fn prune(state: &mut State) {
    while state.approval_requests.len() > MAX_REQUESTS {
        let oldest = |settled: bool| {
            state
                .approval_requests
                .values()
                .find(|request| {
                    request.status != RequestStatus::Pending && (!settled || !request.is_open())
                })
                .map(|request| request.number)
        };
        let Some(number) = oldest(true).or_else(|| oldest(false)) else {
            break;
        };
        state.approval_requests.remove(&number);
    }
}

/// What a person decides about a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    Approve,
    Deny,
    /// A break-glass rollback looked at afterwards.
    Review,
}

impl Decision {
    pub fn action(self) -> &'static str {
        match self {
            Self::Approve => "request.approve",
            Self::Deny => "request.deny",
            Self::Review => "request.review",
        }
    }
}

/// What a decision came to, for `apply()` to act on.
pub enum Decided {
    /// Recorded; nothing more to do.
    Recorded(String),
    /// The last approval needed: start the rollback as requested.
    Approved,
    /// Recorded as lapsed or expired: the approver is told why, and nothing runs.
    Refused(String),
}

/// Checks and records `decision` by `command.identity` on request `number`.
pub fn decide(
    state: &mut State,
    command: &Command,
    number: u64,
    decision: Decision,
    plan_hash: &str,
    reason: &str,
) -> Result<Decided> {
    let at_ms = command.at_ms;
    expire(state, at_ms);
    let (drift, policy_drift) = match state.approval_requests.get(&number) {
        Some(request) if decision == Decision::Approve => (
            plan_drift(state, request),
            requirement_drift(state, request),
        ),
        _ => (None, None),
    };
    let Some(request) = state.approval_requests.get_mut(&number) else {
        return Err(CoordinatorError::UnknownRequest {
            request_id: request_id(number),
        });
    };
    let refuse = |why: String| {
        Err(CoordinatorError::RequestRefused {
            request_id: request_id(number),
            why,
        })
    };
    let identity = &command.identity;
    let approval = Approval {
        identity: identity.clone(),
        at_ms,
        reason: reason.to_string(),
    };
    if decision == Decision::Review {
        if request.status != RequestStatus::BreakGlass {
            return refuse(format!(
                "only break-glass rollbacks are reviewed; this request is {}",
                request.status.name()
            ));
        }
        if let Some(review) = &request.review {
            return refuse(format!("{} reviewed it already", review.identity));
        }
        if identity == &request.requester {
            return refuse("the requester cannot review their own break-glass rollback".into());
        }
        request.review = Some(approval);
        return Ok(Decided::Recorded(format!("reviewed: {reason}")));
    }
    if request.status != RequestStatus::Pending {
        return refuse(format!(
            "it is {}{}",
            request.status.name(),
            if request.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", request.detail)
            }
        ));
    }
    if decision == Decision::Deny {
        request.status = RequestStatus::Denied;
        request.decided_at_ms = at_ms;
        request.detail = format!("denied by {identity}: {reason}");
        let detail = request.detail.clone();
        if request.trigger == Trigger::Automatic {
            let changes = request.changes.clone();
            refuse_automatic(state, &changes);
        }
        return Ok(Decided::Recorded(detail));
    }
    if identity == &request.requester {
        return refuse("the requester cannot approve their own request".into());
    }
    if request
        .approvals
        .iter()
        .any(|approval| &approval.identity == identity)
    {
        return refuse(format!("{identity} approved it already"));
    }
    if plan_hash != request.plan_hash {
        return refuse(format!(
            "the approval names plan {plan_hash:?} but the request is for plan {}: show it again",
            request.plan_hash
        ));
    }
    if let Some(drift) = drift.or(policy_drift) {
        request.status = RequestStatus::Lapsed;
        request.decided_at_ms = at_ms;
        request.detail = format!(
            "lapsed with {} of {} approvals: {drift}",
            request.approvals.len(),
            request.needed
        );
        return Ok(Decided::Refused(request.detail.clone()));
    }
    // The last approval is recorded by `apply()` once the rollback has started, so a start
    // that fails leaves the request as it was.
    if request.approvals.len() as u32 + 1 >= request.needed {
        return Ok(Decided::Approved);
    }
    request.approvals.push(approval);
    Ok(Decided::Recorded(format!(
        "approval {} of {}",
        request.approvals.len(),
        request.needed
    )))
}
