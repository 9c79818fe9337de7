//! The one place coordinator errors become gRPC statuses.

use tonic::{Code, Status};

use crate::errors::CoordinatorError;

/// Metadata key carrying the stable error code, for clients that branch on it.
pub const ERROR_CODE_KEY: &str = "rewind-error-code";

pub fn to_status(error: CoordinatorError) -> Status {
    let code = match &error {
        CoordinatorError::InvalidArgument { .. }
        | CoordinatorError::DependencyCycle { .. }
        | CoordinatorError::HostWithoutService { .. } => Code::InvalidArgument,
        CoordinatorError::UnknownService { .. }
        | CoordinatorError::UnknownRelease { .. }
        | CoordinatorError::UnknownChange { .. }
        | CoordinatorError::UnknownRollback { .. }
        | CoordinatorError::UnknownIncident { .. }
        | CoordinatorError::UnknownHost { .. }
        | CoordinatorError::UnknownStep { .. }
        | CoordinatorError::UnknownRequest { .. }
        | CoordinatorError::UnknownJoinToken { .. }
        | CoordinatorError::UnknownFireDrill { .. } => Code::NotFound,
        CoordinatorError::JoinRefused { .. } => Code::PermissionDenied,
        CoordinatorError::ReleaseConflict { .. }
        | CoordinatorError::AlreadyRolledBack { .. }
        | CoordinatorError::AlreadyRequested { .. } => Code::AlreadyExists,
        CoordinatorError::NoHosts { .. }
        | CoordinatorError::ChangeInProgress { .. }
        | CoordinatorError::ServiceFrozen { .. }
        | CoordinatorError::HostInUse { .. }
        | CoordinatorError::RollbackInProgress { .. }
        | CoordinatorError::NothingToRevert { .. }
        | CoordinatorError::NotLatestChange { .. }
        | CoordinatorError::RollbackNotControllable { .. }
        | CoordinatorError::PlanChanged { .. }
        | CoordinatorError::PolicyChanged { .. }
        | CoordinatorError::Incompatible { .. }
        | CoordinatorError::RequestRefused { .. }
        | CoordinatorError::AuditRefused { .. }
        | CoordinatorError::IncidentRefused { .. }
        | CoordinatorError::DrillRefused { .. }
        | CoordinatorError::StepNotRunning { .. }
        | CoordinatorError::StepNotStartable { .. }
        | CoordinatorError::NeedsClusterVersion { .. }
        | CoordinatorError::MembershipConflict(_) => Code::FailedPrecondition,
        CoordinatorError::Storage(_)
        | CoordinatorError::Raft(_)
        | CoordinatorError::Internal(_)
        | CoordinatorError::CannotApply { .. } => Code::Internal,
        CoordinatorError::StaleDecision { .. } => Code::Aborted,
        CoordinatorError::ShuttingDown
        | CoordinatorError::Overloaded(_)
        | CoordinatorError::NotLeader { .. } => Code::Unavailable,
    };
    let mut status = Status::new(code, error.to_string());
    if let Ok(value) = error.code().parse() {
        status.metadata_mut().insert(ERROR_CODE_KEY, value);
    }
    status
}

pub fn invalid(field: &str, message: impl Into<String>) -> Status {
    to_status(CoordinatorError::invalid(field, message))
}
