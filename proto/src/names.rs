//! Short lower-case names for enum values, as tables and logs show them.

use crate::v1::{ChangeState, HealthFigure, RollbackState, StepState};

impl HealthFigure {
    /// As rewindctl conditions name it: `probe_failure_ratio`, `error_ratio`, `p99_latency_ms`.
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Unspecified => "unknown",
            Self::ProbeFailureRatio => "probe_failure_ratio",
            Self::ErrorRatio => "error_ratio",
            Self::P99LatencyMs => "p99_latency_ms",
        }
    }

    pub fn from_short_name(name: &str) -> Option<Self> {
        [
            Self::ProbeFailureRatio,
            Self::ErrorRatio,
            Self::P99LatencyMs,
        ]
        .into_iter()
        .find(|figure| figure.short_name() == name)
    }
}

impl RollbackState {
    /// `running`, `paused`, `succeeded`, `failed`, `aborted`.
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Unspecified => "unknown",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Aborted => "aborted",
        }
    }

    /// True once the rollback can no longer change.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Aborted)
    }
}

impl ChangeState {
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Unspecified => "unknown",
            Self::Capturing => "capturing",
            Self::Deploying => "deploying",
            Self::Deployed => "deployed",
            Self::Failed => "failed",
            Self::RolledBack => "rolled-back",
        }
    }
}

impl StepState {
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Unspecified => "unknown",
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}
