//! Errors from the shared helpers.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

impl SharedError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read_failed",
            Self::Write { .. } => "write_failed",
            Self::Parse { .. } => "parse_failed",
            Self::Certificate(_) => "bad_certificate",
            Self::Invalid { .. } => "invalid_argument",
        }
    }
}

/// An error and its sources, `a: b: c` (repeats dropped), for a message that names the TLS
/// reason under "transport error".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(next) = source {
        parts.push(next.to_string());
        source = next.source();
    }
    parts.dedup();
    parts.join(": ")
}
