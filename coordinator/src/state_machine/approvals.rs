//! Requests for approval. A rollback or a deploy in an environment whose policy requires
//! approvals starts as a request bound to its plan's hash; it runs once enough approvers other
//! than the requester approve that exact hash. If the plan changes meanwhile (hosts, health,
//! another change) the request lapses and says why; it expires after the environment's
//! `request-ttl-s`. Break-glass runs at once and leaves a request to review afterwards.
//!
//! Everything here runs inside `apply()` (the clock is the command's, the policy is the
//! replicated one, so every member decides alike), except, from cluster version 3, the plan an
//! approval starts and whether pending requests drifted: the leader works those out and the
//! entry carries them (`decision.rs`).
//!
//! Kept in one file (over 700 lines): a request's life (filed, approved, denied, lapsed, expired,
//! broken glass, reviewed) is one state machine whose steps refer to each other.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::command::{Command, Outcome};
use super::state::{HealthAggregate, PlanOptions, State, Trigger};
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
    /// A deploy, not a rollback: what it runs once approved.
    #[serde(default)]
    pub deploy: Option<DeploySpec>,
    /// The change a deploy request started.
    #[serde(default)]
    pub change: u64,
}

/// A deploy (`StartChange`) as requested, hosts resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeploySpec {
    pub service: String,
    pub version: String,
    /// What the service ran when requested: a deploy approved after another one is refused.
    pub previous_version: String,
    /// As asked: empty means every host that runs the service.
    pub requested_hosts: Vec<String>,
    /// As resolved when requested.
    pub hosts: Vec<String>,
    pub flags_on: Vec<String>,
    pub migrations: Vec<(String, String)>,
    pub baseline: HealthAggregate,
}

impl DeploySpec {
    /// What an approver approves: the service, the release (by digest), the hosts, the flags
    /// and the migrations (by checksum), as a hash.
    pub fn hash(&self, state: &State) -> String {
        use sha2::Digest;
        let release = state
            .releases
            .get(&self.service)
            .and_then(|versions| versions.get(&self.version))
            .map(|release| release.artifact_digest.clone())
            .unwrap_or_default();
        let migrations: Vec<String> = self
            .migrations
            .iter()
            .map(|(database, version)| {
                let checksum = state
                    .migrations
                    .get(database)
                    .and_then(|versions| versions.get(version))
                    .map(|migration| migration.checksum.clone())
                    .unwrap_or_default();
                // The shards it runs on are part of what is approved.
                let environment = crate::plan::environment_of_hosts(state, &self.hosts);
                let shards = super::schema::shards_of(state, database, &environment);
                format!("{database}@{version}={checksum} on {}", shards.join("+"))
            })
            .collect();
        let text = format!(
            "deploy\n{}\n{} -> {}\n{release}\n{}\n{}\n{}",
            self.service,
            self.previous_version,
            self.version,
            self.hosts.join(","),
            self.flags_on.join(","),
            migrations.join(",")
        );
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(text.as_bytes()))
        )
    }

    /// The plan's one line: `deploy web v1 -> v2 on web-1, web-2`, with flags and migrations.
    pub fn outline(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "deploy {} {} -> {} on {}",
            self.service,
            self.previous_version,
            self.version,
            self.hosts.join(", ")
        )];
        if !self.flags_on.is_empty() {
            lines.push(format!("turn on flags {}", self.flags_on.join(", ")));
        }
        for (database, version) in &self.migrations {
            lines.push(format!("migrate {database} to {version}"));
        }
        lines
    }

    /// The environments its hosts are in.
    pub fn environments<'a>(&self, state: &'a State) -> Vec<&'a str> {
        self.hosts
            .iter()
            .filter_map(|host| state.hosts.get(host))
            .map(|host| {
                if host.labels.environment.is_empty() {
                    crate::plan::DEFAULT_ENVIRONMENT
                } else {
                    host.labels.environment.as_str()
                }
            })
            .collect()
    }
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
        Self {
            changes: plan.changes.clone(),
            services: plan.services.clone(),
            options: plan.options.clone(),
            plan_hash: plan.hash.clone(),
            plan: outline(plan),
            ..Self::numbered(state, command, requirement, reason, trigger)
        }
    }

    /// A pending request by `command`'s caller under `requirement`, numbered next, its plan
    /// left for the caller to fill in.
    fn numbered(
        state: &mut State,
        command: &Command,
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
            changes: Vec::new(),
            services: Vec::new(),
            options: PlanOptions::default(),
            environments: requirement.environments.clone(),
            plan_hash: String::new(),
            plan: Vec::new(),
            needed: requirement.approvals,
            approvals: Vec::new(),
            created_at_ms: command.at_ms,
            expires_at_ms: command.at_ms.saturating_add(requirement.ttl_ms),
            decided_at_ms: 0,
            rollback: 0,
            break_glass: false,
            review: None,
            deploy: None,
            change: 0,
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
    let environments: Vec<&str> = changes
        .iter()
        .filter_map(|number| state.changes.get(number))
        .flat_map(|change| crate::plan::change_environments(state, change))
        .collect();
    requirement_in(state, environments)
}

/// The approvals a deploy of `spec` needs under the policy in force.
pub fn deploy_requirement(state: &State, spec: &DeploySpec) -> Requirement {
    requirement_in(state, spec.environments(state))
}

/// The strictest of the rules of `environments`.
fn requirement_in(state: &State, mut environments: Vec<&str>) -> Requirement {
    let Some(policy) = state.access.policy.as_deref() else {
        return Requirement::default();
    };
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

/// What a request needs now: its deploy's or its changes' rules.
fn requirement_of(state: &State, request: &ApprovalRequest) -> Requirement {
    match &request.deploy {
        Some(spec) => deploy_requirement(state, spec),
        None => requirement(state, &request.changes),
    }
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
    if let Some(spec) = &request.deploy {
        return deploy_drift(state, request, spec);
    }
    let plan = crate::plan::build(state, &request.changes, &request.options, request.trigger)
        .map_err(|error| error.to_string());
    drift_from(request, plan.as_ref().map_err(String::as_str))
}

/// How the plan of a rollback request differs from `plan`, its plan now (or why it can no
/// longer be planned), or `None`.
fn drift_from(request: &ApprovalRequest, plan: std::result::Result<&Plan, &str>) -> Option<String> {
    let plan = match plan {
        Ok(plan) => plan,
        Err(error) => return Some(format!("it can no longer be planned: {error}")),
    };
    if plan.hash == request.plan_hash {
        return None;
    }
    let now = outline(plan);
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
pub fn requirement_drift(state: &State, request: &ApprovalRequest) -> Option<String> {
    let now = requirement_of(state, request);
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

/// Why a deploy request's plan is no longer the one requested: its hosts (as selected now),
/// its release or migrations.
fn deploy_drift(state: &State, request: &ApprovalRequest, spec: &DeploySpec) -> Option<String> {
    let hosts = match super::apply::select_hosts(state, &spec.service, &spec.requested_hosts) {
        Ok(hosts) => hosts,
        Err(error) => return Some(format!("it can no longer be planned: {error}")),
    };
    let now = DeploySpec {
        hosts,
        previous_version: super::current_version(state, &spec.service),
        ..spec.clone()
    };
    let hash = now.hash(state);
    if hash == request.plan_hash {
        return None;
    }
    let why = if now.previous_version != spec.previous_version {
        format!(
            "{} ran {} when it was requested and runs {} now",
            spec.service, spec.previous_version, now.previous_version
        )
    } else if now.hosts != spec.hosts {
        format!(
            "its hosts were {} and are now {}",
            spec.hosts.join(", "),
            now.hosts.join(", ")
        )
    } else {
        "its release, its migrations or the shards they run on differ".into()
    };
    Some(format!(
        "the plan changed since it was requested (sha256 {} -> {}): {why}",
        short(&request.plan_hash),
        short(&hash)
    ))
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

/// Files a request for a rollback of `plan` that `requirement` says needs approvals: its
/// number, audit target and outcome.
pub fn file(
    state: &mut State,
    command: &Command,
    plan: &Plan,
    requirement: &Requirement,
    reason: &str,
    trigger: Trigger,
    drifted: Option<&BTreeMap<u64, String>>,
) -> Result<(u64, String, String)> {
    let at_ms = command.at_ms;
    expire(state, at_ms);
    for number in pending_over(state, &plan.changes) {
        let request = &state.approval_requests[&number];
        // One that can no longer be approved does not block a request for the plan as it is:
        // as the leader found (from cluster version 3), or judged here (before).
        let drift = match drifted {
            Some(drifted) => drifted.get(&number).cloned(),
            None => plan_drift(state, request).or_else(|| requirement_drift(state, request)),
        };
        if let Some(drift) = drift {
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
            what: format!("the rollback of {}", crate::plan::change_list(&shared)),
        });
    }
    check_pending_room(state)?;
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
    Ok((number, request_id(number), audit))
}

/// Files a request for a deploy that `requirement` says needs approvals; one pending request
/// per service at a time (a drifted one lapses instead of blocking).
pub fn file_deploy(
    state: &mut State,
    command: &Command,
    spec: DeploySpec,
    requirement: &Requirement,
    reason: &str,
) -> Result<(Outcome, String, String)> {
    let at_ms = command.at_ms;
    expire(state, at_ms);
    let pending: Vec<u64> = state
        .approval_requests
        .values()
        .filter(|request| {
            request.status == RequestStatus::Pending
                && request
                    .deploy
                    .as_ref()
                    .is_some_and(|other| other.service == spec.service)
        })
        .map(|request| request.number)
        .collect();
    for number in pending {
        let request = &state.approval_requests[&number];
        if let Some(drift) =
            plan_drift(state, request).or_else(|| requirement_drift(state, request))
        {
            lapse(state, number, at_ms, &drift);
            continue;
        }
        return Err(CoordinatorError::AlreadyRequested {
            request_id: request_id(number),
            what: format!("a deploy of {}", spec.service),
        });
    }
    check_pending_room(state)?;
    let request = deploy_request(state, command, spec, requirement, reason);
    let number = request.number;
    let audit = format!(
        "ok: {} waits for {} approvals in {} (plan {}): {reason}",
        request.plan.join("; "),
        requirement.approvals,
        requirement.environments.join(", "),
        request.plan_hash
    );
    state.approval_requests.insert(number, request);
    prune(state);
    Ok((Outcome::Request(number), request_id(number), audit))
}

/// A pending request for `spec`, numbered next.
fn deploy_request(
    state: &mut State,
    command: &Command,
    spec: DeploySpec,
    requirement: &Requirement,
    reason: &str,
) -> ApprovalRequest {
    ApprovalRequest {
        services: vec![spec.service.clone()],
        plan_hash: spec.hash(state),
        plan: spec.outline(),
        deploy: Some(spec),
        ..ApprovalRequest::numbered(state, command, requirement, reason, Trigger::Manual)
    }
}

/// Records a break-glass deploy, already started as `change`, as a request to review.
pub fn record_break_glass_deploy(
    state: &mut State,
    command: &Command,
    spec: DeploySpec,
    requirement: &Requirement,
    reason: &str,
    change: u64,
) -> u64 {
    let request = deploy_request(state, command, spec, requirement, reason);
    insert_break_glass(
        state,
        command,
        requirement,
        request,
        Started::Change(change),
    )
}

fn check_pending_room(state: &State) -> Result<()> {
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
    Ok(())
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
    let request = ApprovalRequest::new(state, command, plan, requirement, reason, Trigger::Manual);
    insert_break_glass(
        state,
        command,
        requirement,
        request,
        Started::Rollback(rollback),
    )
}

/// Keeps `request` as a break-glass one: it ran at once as `started`, and waits for a review.
fn insert_break_glass(
    state: &mut State,
    command: &Command,
    requirement: &Requirement,
    request: ApprovalRequest,
    started: Started,
) -> u64 {
    let (rollback, change) = match started {
        Started::Rollback(rollback) => (rollback, request.change),
        Started::Change(change) => (request.rollback, change),
    };
    let request = ApprovalRequest {
        status: RequestStatus::BreakGlass,
        detail: format!(
            "ran at once without the {} approvals {} requires: {}",
            requirement.approvals,
            requirement.environments.join(", "),
            started.id()
        ),
        expires_at_ms: command.at_ms,
        decided_at_ms: command.at_ms,
        rollback,
        change,
        break_glass: true,
        ..request
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

/// What an approved (or break-glass) request started.
#[derive(Clone, Copy, Debug)]
pub enum Started {
    Rollback(u64),
    Change(u64),
}

impl Started {
    /// `rb-3`, `ch-7`.
    pub fn id(self) -> String {
        match self {
            Self::Rollback(rollback) => super::rollback_id(rollback),
            Self::Change(change) => super::change_id(change),
        }
    }
}

/// Records the last approval of request `number` (by `command`'s caller), which started
/// `started`; answers everyone who approved it, in order.
pub fn record_approved(
    state: &mut State,
    command: &Command,
    number: u64,
    reason: &str,
    started: Started,
) -> Vec<String> {
    let revoked = revoked_identities(state);
    let Some(record) = state.approval_requests.get_mut(&number) else {
        return Vec::new();
    };
    record
        .approvals
        .retain(|approval| !revoked.contains(&approval.identity));
    record.approvals.push(Approval {
        identity: command.identity.clone(),
        at_ms: command.at_ms,
        reason: reason.to_string(),
    });
    let approved_by: Vec<String> = record
        .approvals
        .iter()
        .map(|approval| approval.identity.clone())
        .collect();
    record.status = RequestStatus::Approved;
    record.decided_at_ms = command.at_ms;
    match started {
        Started::Rollback(rollback) => record.rollback = rollback,
        Started::Change(change) => record.change = change,
    }
    record.detail = format!(
        "approved by {}: started {}",
        approved_by.join(", "),
        started.id()
    );
    approved_by
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
    plan_now: Option<&std::result::Result<Plan, String>>,
) -> Result<Decided> {
    let at_ms = command.at_ms;
    expire(state, at_ms);
    // A rollback request's plan now: the leader's (from cluster version 3), or planned here.
    let (drift, policy_drift) = match state.approval_requests.get(&number) {
        Some(request) if decision == Decision::Approve => (
            match plan_now {
                Some(plan) => drift_from(request, plan.as_ref().map_err(String::as_str)),
                None => plan_drift(state, request),
            },
            requirement_drift(state, request),
        ),
        _ => (None, None),
    };
    let revoked = revoked_identities(state);
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
    // Revoked since: a requester on the deny list loses the request; an approver on it, their
    // approval.
    if revoked.contains(&request.requester) {
        request.status = RequestStatus::Lapsed;
        request.decided_at_ms = at_ms;
        request.detail = format!(
            "lapsed: its requester {} is on the policy's deny list",
            request.requester
        );
        return Ok(Decided::Refused(request.detail.clone()));
    }
    let counted = request
        .approvals
        .iter()
        .filter(|approval| !revoked.contains(&approval.identity))
        .count();
    // The last approval is recorded by `apply()` once the rollback has started, so a start
    // that fails leaves the request as it was.
    if counted as u32 + 1 >= request.needed {
        return Ok(Decided::Approved);
    }
    let dropped = request.approvals.len() - counted;
    request
        .approvals
        .retain(|approval| !revoked.contains(&approval.identity));
    request.approvals.push(approval);
    Ok(Decided::Recorded(format!(
        "approval {} of {}{}",
        request.approvals.len(),
        request.needed,
        if dropped > 0 {
            format!(" ({dropped} by identities revoked since no longer count)")
        } else {
            String::new()
        }
    )))
}

/// What expiring and lapsing requests may change, saved before a command that may still be
/// refused afterwards, so that a refusal can take it back.
pub struct Housekeeping {
    requests: BTreeMap<u64, ApprovalRequest>,
    /// Changes not yet marked `auto_refused` (an expired or denied automatic request marks them).
    not_auto_refused: Vec<u64>,
}

impl Housekeeping {
    pub fn save(state: &State) -> Self {
        Self {
            requests: state.approval_requests.clone(),
            not_auto_refused: state
                .changes
                .values()
                .filter(|change| !change.auto_refused)
                .map(|change| change.number)
                .collect(),
        }
    }

    pub fn restore(self, state: &mut State) {
        state.approval_requests = self.requests;
        for number in self.not_auto_refused {
            if let Some(change) = state.changes.get_mut(&number) {
                change.auto_refused = false;
            }
        }
    }
}

/// Identities on the policy's deny list: their approvals no longer count.
fn revoked_identities(state: &State) -> Vec<String> {
    state
        .access
        .policy
        .as_ref()
        .map(|policy| policy.deny.clone())
        .unwrap_or_default()
}
