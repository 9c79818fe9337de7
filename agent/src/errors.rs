//! The agent's errors.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("path {path:?} of service {service}: {reason}")]
    UnsafePath {
        service: String,
        path: String,
        reason: String,
    },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(String),
    #[error("no snapshot {0} in the local store")]
    UnknownSnapshot(String),
    #[error("service {service} is not managed by this agent: managed services are {known}")]
    UnknownService { service: String, known: String },
    #[error("release {version} of {service} is not on this host (looked in {path})")]
    MissingRelease {
        service: String,
        version: String,
        path: PathBuf,
    },
    #[error("release {version} of {service} has digest {actual}, expected {expected}")]
    DigestMismatch {
        service: String,
        version: String,
        expected: String,
        actual: String,
    },
    #[error("command {command} failed: {reason}")]
    Command { command: String, reason: String },
    #[error("{what} hook of {service} failed: {detail}")]
    Hook {
        what: String,
        service: String,
        detail: String,
    },
    #[error(
        "step {step_id} is fenced: it carries term {term}, but term {seen} was already seen for {owner}"
    )]
    Fenced {
        step_id: String,
        owner: String,
        term: u64,
        seen: u64,
    },
    #[error("step {step_id} is refused: {owner} was superseded by a rollback on this host")]
    Superseded { step_id: String, owner: String },
    #[error("restore of {service} did not take: {detail}")]
    RestoreMismatch { service: String, detail: String },
    /// Input the agent cannot use (a step, a file, a value), naming the field at fault.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// A step the host's config does not allow, or one that found the service unwell, naming
    /// what refused it.
    #[error("{field}: {message}")]
    Refused { field: String, message: String },
}

impl AgentError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnsafePath { .. } => "unsafe_path",
            Self::Io { .. } => "io",
            Self::Store(_) => "store",
            Self::UnknownSnapshot(_) => "unknown_snapshot",
            Self::UnknownService { .. } => "unknown_service",
            Self::MissingRelease { .. } => "missing_release",
            Self::DigestMismatch { .. } => "digest_mismatch",
            Self::Command { .. } => "command_failed",
            Self::Hook { .. } => "hook_failed",
            Self::Fenced { .. } => "fenced",
            Self::Superseded { .. } => "superseded",
            Self::RestoreMismatch { .. } => "restore_mismatch",
            Self::Invalid { .. } => "invalid",
            Self::Refused { .. } => "refused",
        }
    }

    /// Whether the same step may succeed if tried again.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            Self::Io { .. } | Self::Store(_) | Self::Command { .. }
        )
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub fn refused(field: &str, message: impl Into<String>) -> Self {
        Self::Refused {
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

impl From<rewind_shared::SharedError> for AgentError {
    fn from(error: rewind_shared::SharedError) -> Self {
        match error {
            rewind_shared::SharedError::Invalid { field, message } => {
                Self::Invalid { field, message }
            }
            other => Self::invalid("input", other.to_string()),
        }
    }
}
