//! The replicated state machine: [`State`], the [`Command`]s that change it, and the pure
//! [`apply`] that every member runs on the same log to reach the same state.

mod apply;
pub mod approvals;
pub mod archive;
mod audit;
mod audit_store;
mod command;
pub mod decision;
pub mod join_tokens;
pub mod schema;
mod state;
pub mod version;

#[cfg(test)]
mod apply_test;
#[cfg(test)]
mod decision_test;
#[cfg(test)]
mod golden_test;
#[cfg(test)]
mod refusal_test;
#[cfg(test)]
mod schema_test;

pub use apply::{
    COORDINATOR_IDENTITY, apply, apply_membership, current_version, drill_end, latest_change,
    revert_pending, unknown_change, unknown_incident, unknown_rollback,
};
/// `apply()`, checking that from cluster version 3 it never plans (the leader has).
#[cfg(test)]
pub fn apply_checked(
    state: &mut State,
    index: u64,
    command: &Command,
) -> Result<Outcome, crate::errors::CoordinatorError> {
    let decided = state.cluster_version() >= decision::DECIDED_ON_LEADER;
    let planned_before = crate::plan::BUILDS.with(std::cell::Cell::get);
    let outcome = apply(state, index, command);
    if decided {
        assert_eq!(
            crate::plan::BUILDS.with(std::cell::Cell::get),
            planned_before,
            "apply() planned {} at cluster version {}",
            command.kind.action(),
            state.cluster_version()
        );
    }
    outcome
}

pub use audit::{
    AuditEntry, AuditLog, AuditRetention, AuditStore, AuditVerification, MemoryAuditStore,
    StoreHandle,
};
pub use command::{
    AutoTrigger, Command, CommandKind, DecideRequest, MembershipChange, Outcome, RollbackAction,
    StartChange, StartRollback, StepTarget,
};
pub use state::*;
