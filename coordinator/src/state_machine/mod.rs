//! The replicated state machine: [`State`], the [`Command`]s that change it, and the pure
//! [`apply`] that every member runs on the same log to reach the same state.

mod apply;
pub mod approvals;
mod audit;
mod command;
pub mod join_tokens;
pub mod schema;
mod state;
pub mod version;

#[cfg(test)]
mod apply_test;
#[cfg(test)]
mod golden_test;

pub use apply::{
    COORDINATOR_IDENTITY, apply, apply_membership, current_version, unknown_change,
    unknown_rollback,
};
pub use audit::{AuditEntry, AuditLog, AuditVerification, GENESIS_HASH};
pub use command::{Command, CommandKind, MembershipChange, Outcome, RollbackAction, StepTarget};
pub use state::*;
