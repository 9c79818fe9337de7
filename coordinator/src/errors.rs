//! The coordinator's errors. Each knows a stable `code()` and whether a retry can help; the API
//! layer turns them into `tonic::Status` in one place (`api::status`).

use crate::state_machine::{ChangeStatus, RollbackStatus};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoordinatorError {
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("no service {service}: known services are {known}")]
    UnknownService { service: String, known: String },
    #[error("no release {version} of service {service}: known versions are {known}")]
    UnknownRelease {
        service: String,
        version: String,
        known: String,
    },
    #[error("no change {change_id}: known changes are {known}")]
    UnknownChange { change_id: String, known: String },
    #[error("no rollback {rollback_id}: known rollbacks are {known}")]
    UnknownRollback { rollback_id: String, known: String },
    #[error("no incident {incident_id}: each rollback opens one (in-N for rb-N); known: {known}")]
    UnknownIncident { incident_id: String, known: String },
    #[error("incident {incident_id}: {why}")]
    IncidentRefused { incident_id: String, why: String },
    #[error("no fire drill {drill_id}: known drills are {known}")]
    UnknownFireDrill { drill_id: String, known: String },
    #[error("drill refused: {why}")]
    DrillRefused { why: String },
    #[error("no host {host_id} is registered")]
    UnknownHost { host_id: String },
    #[error("host {host_id} cannot be forgotten: it is in {by}")]
    HostInUse { host_id: String, by: String },
    #[error("host {host_id} does not run service {service}")]
    HostWithoutService { host_id: String, service: String },
    #[error("no registered host runs service {service}")]
    NoHosts { service: String },
    #[error(
        "release {service} {version} is already registered with digest {existing}; a version is immutable"
    )]
    ReleaseConflict {
        service: String,
        version: String,
        existing: String,
    },
    #[error("service {service} would depend on itself through {path}")]
    DependencyCycle { service: String, path: String },
    #[error(
        "change {change_id} of service {service} is still {status}; wait for it or roll it back"
    )]
    ChangeInProgress {
        change_id: String,
        service: String,
        status: ChangeStatus,
    },
    #[error(
        "service {service} is frozen ({window}) until {until}: changes wait, or run with \
         --break-glass --reason (rollbacks are never frozen)"
    )]
    ServiceFrozen {
        service: String,
        window: String,
        /// RFC 3339, UTC.
        until: String,
    },
    #[error("change {change_id} was already rolled back by {rollback_id}")]
    AlreadyRolledBack {
        change_id: String,
        rollback_id: String,
    },
    #[error("rollback {rollback_id} of change {change_id} is still {status}")]
    RollbackInProgress {
        rollback_id: String,
        change_id: String,
        status: RollbackStatus,
    },
    #[error(
        "change {change_id} is not the latest change of {service} ({latest} is): roll back {latest} first"
    )]
    NotLatestChange {
        change_id: String,
        service: String,
        latest: String,
    },
    #[error("change {change_id} touched no host yet: there is nothing to roll back")]
    NothingToRevert { change_id: String },
    #[error(
        "the plan changed since it was shown ({shown}, now {now}): look at `rewindctl rollback plan` again"
    )]
    PlanChanged { shown: String, now: String },
    #[error(
        "the access policy changed since you read it (expected sha256 {expected}, it is {actual}): show it again and reapply"
    )]
    PolicyChanged { expected: String, actual: String },
    #[error("no request {request_id} for approval")]
    UnknownRequest { request_id: String },
    #[error("{request_id}: {why}")]
    RequestRefused { request_id: String, why: String },
    #[error("audit {what} refused: {why}")]
    AuditRefused { what: String, why: String },
    #[error("join refused ({token_id}): {why}")]
    JoinRefused { token_id: String, why: String },
    #[error("no join token {token_id}")]
    UnknownJoinToken { token_id: String },
    #[error(
        "{request_id} already asks for {what}: approve or deny it (rewindctl request show {request_id})"
    )]
    AlreadyRequested { request_id: String, what: String },
    #[error("the plan would break consumers: {problems}")]
    Incompatible { problems: String },
    #[error("rollback {rollback_id} is {status} and cannot {action}")]
    RollbackNotControllable {
        rollback_id: String,
        status: RollbackStatus,
        action: String,
    },
    #[error("step {step_id} is not running (it is {status})")]
    StepNotRunning { step_id: String, status: String },
    #[error("step {step_id} cannot start: {reason}")]
    StepNotStartable { step_id: String, reason: String },
    #[error("no step {step_id}")]
    UnknownStep { step_id: String },
    #[error("this member is not the leader (the leader is member {leader_id}, 0 if unknown)")]
    NotLeader { leader_id: u64 },
    #[error("membership change refused: {0}")]
    MembershipConflict(String),
    // Everything above is a refusal: the request, or the state it meets, says no (see
    // `is_refusal`). Everything below is the infrastructure failing.
    /// The disk or the store under the Raft log and snapshots failed, or holds what does not
    /// decode.
    #[error("storage: {0}")]
    Storage(String),
    /// raft-rs refused to start or to take a configuration change.
    #[error("raft: {0}")]
    Raft(String),
    /// This process failed at something that does not depend on the request: a thread that did
    /// not start or panicked, a listener that would not serve, a value that would not encode.
    #[error("internal: {0}")]
    Internal(String),
    #[error("{what} cannot be applied by this member: {why}")]
    CannotApply { what: String, why: String },
    #[error(
        "{what} needs cluster version {needed}, and the cluster runs version {running}: once every member runs a release that supports it, an admin raises it with `rewindctl cluster upgrade-finalize`"
    )]
    NeedsClusterVersion {
        what: String,
        needed: u32,
        running: u32,
    },
    /// The state moved between the leader's decision (a rollback's plan, a trigger's verdict)
    /// and its entry applying; the leader decides again.
    #[error("the {what} is stale: {why}; retry")]
    StaleDecision { what: String, why: String },
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    #[error("the coordinator is overloaded: {0}")]
    Overloaded(String),
}

impl CoordinatorError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "invalid_argument",
            Self::UnknownService { .. } => "unknown_service",
            Self::UnknownRelease { .. } => "unknown_release",
            Self::UnknownChange { .. } => "unknown_change",
            Self::UnknownRollback { .. } => "unknown_rollback",
            Self::UnknownIncident { .. } => "unknown_incident",
            Self::IncidentRefused { .. } => "incident_refused",
            Self::UnknownFireDrill { .. } => "unknown_fire_drill",
            Self::DrillRefused { .. } => "drill_refused",
            Self::UnknownHost { .. } => "unknown_host",
            Self::HostWithoutService { .. } => "host_without_service",
            Self::HostInUse { .. } => "host_in_use",
            Self::NoHosts { .. } => "no_hosts",
            Self::ReleaseConflict { .. } => "release_conflict",
            Self::DependencyCycle { .. } => "dependency_cycle",
            Self::ChangeInProgress { .. } => "change_in_progress",
            Self::ServiceFrozen { .. } => "service_frozen",
            Self::AlreadyRolledBack { .. } => "already_rolled_back",
            Self::RollbackInProgress { .. } => "rollback_in_progress",
            Self::NothingToRevert { .. } => "nothing_to_revert",
            Self::NotLatestChange { .. } => "not_latest_change",
            Self::PlanChanged { .. } => "plan_changed",
            Self::PolicyChanged { .. } => "policy_changed",
            Self::Incompatible { .. } => "incompatible",
            Self::UnknownRequest { .. } => "unknown_request",
            Self::RequestRefused { .. } => "request_refused",
            Self::AuditRefused { .. } => "audit_refused",
            Self::JoinRefused { .. } => "join_refused",
            Self::UnknownJoinToken { .. } => "unknown_join_token",
            Self::AlreadyRequested { .. } => "already_requested",
            Self::RollbackNotControllable { .. } => "rollback_not_controllable",
            Self::StepNotRunning { .. } => "step_not_running",
            Self::StepNotStartable { .. } => "step_not_startable",
            Self::UnknownStep { .. } => "unknown_step",
            Self::NotLeader { .. } => "not_leader",
            Self::MembershipConflict(_) => "membership_conflict",
            Self::Storage(_) => "storage",
            Self::Raft(_) => "raft",
            Self::Internal(_) => "internal",
            Self::CannotApply { .. } => "cannot_apply",
            Self::NeedsClusterVersion { .. } => "needs_cluster_version",
            Self::StaleDecision { .. } => "stale_decision",
            Self::ShuttingDown => "shutting_down",
            Self::Overloaded(_) => "overloaded",
        }
    }

    /// True when the same request may succeed later without any change by the caller.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            Self::Storage(_)
                | Self::Raft(_)
                | Self::Internal(_)
                | Self::ShuttingDown
                | Self::Overloaded(_)
                | Self::ChangeInProgress { .. }
                | Self::StaleDecision { .. }
        )
    }

    /// True when the request (or the state it met) was refused, as opposed to the
    /// infrastructure failing: a refusal is the caller's to fix, and changed nothing.
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            Self::Storage(_)
                | Self::Raft(_)
                | Self::Internal(_)
                | Self::CannotApply { .. }
                | Self::NotLeader { .. }
                | Self::ShuttingDown
                | Self::Overloaded(_)
                | Self::StaleDecision { .. }
        )
    }

    /// True when something broke (storage, Raft, this process, an entry this binary cannot
    /// apply): worth an operator's attention, unlike a refusal or a member that is busy, not
    /// leading or stopping.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Self::Storage(_) | Self::Raft(_) | Self::Internal(_) | Self::CannotApply { .. }
        )
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

impl From<rewind_shared::SharedError> for CoordinatorError {
    fn from(error: rewind_shared::SharedError) -> Self {
        match error {
            rewind_shared::SharedError::Invalid { field, message } => {
                Self::InvalidArgument { field, message }
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

/// "a, b, c" or "none", at most ten names, for "known ones are ..." hints.
pub fn known_list<I: IntoIterator<Item = String>>(names: I) -> String {
    let names: Vec<String> = names.into_iter().collect();
    match names.len() {
        0 => "none".to_string(),
        1..=10 => names.join(", "),
        more => format!("{} and {} more", names[more - 10..].join(", "), more - 10),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_failures_and_a_busy_member_are_told_apart() {
        let refused = CoordinatorError::invalid("reason", "is required");
        assert!(refused.is_refusal() && !refused.is_failure());
        for failed in [
            CoordinatorError::Storage("disk".into()),
            CoordinatorError::Raft("config".into()),
            CoordinatorError::Internal("thread".into()),
        ] {
            assert!(!failed.is_refusal() && failed.is_failure(), "{failed}");
        }
        for busy in [
            CoordinatorError::NotLeader { leader_id: 2 },
            CoordinatorError::Overloaded("queue".into()),
            CoordinatorError::ShuttingDown,
        ] {
            assert!(!busy.is_refusal() && !busy.is_failure(), "{busy}");
        }
    }
}
