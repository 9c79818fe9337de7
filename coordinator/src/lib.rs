//! The rewind coordinator: holds the fleet's replicated state, plans and drives rollbacks, and
//! serves the `rewind.v1` API to agents and people.
//!
//! Every state change is a [`state_machine::Command`] proposed to the [`node`], a raft-rs member:
//! it becomes a Raft entry, is persisted by a majority of members, is applied by each of them
//! with the pure [`state_machine::apply`], and only then acknowledged. The [`engine`], on the
//! leader only, reads that state and turns intent into steps sent to agents.
//!
//! # Layout
//! - [`admission`]: bounds on connections before anyone is authenticated, on both ports.
//! - [`access`]: identities, the replicated access policy, and the table of every RPC's permission.
//! - [`state_machine`]: replicated state, commands, `apply()`, the audit chain. Pure.
//! - [`storage`]: the Raft log, hard state and snapshots in sled, behind raft-rs's `Storage`.
//! - [`node`]: the Raft member that owns the state, its handle, and the peer transport.
//! - [`membership`]: where members are (replicated registry), and keeping Raft routes to them.
//! - [`health`]: soft state on the leader: recent agent reports and per-service aggregates.
//! - [`sessions`]: connected agents and the channels to them.
//! - [`recipe`]: the steps each host of a service goes through in a rollback.
//! - [`engine`]: the leader loop that dispatches steps, verifies hosts and fires triggers.
//! - [`api`]: tonic services (control, agent, Raft peers, member status); the only place
//!   `tonic::Status` appears.
//! - [`config`], [`errors`]: configuration and the error type.

pub mod access;
pub mod admission;
pub mod api;
#[cfg(test)]
mod approvals_test;
pub mod audit_check;
pub mod config;
pub mod engine;
pub mod errors;
pub mod flags;
pub mod health;
pub mod http;
pub mod membership;
pub mod node;
pub mod plan;
#[cfg(test)]
mod plan_test;
pub mod recipe;
pub mod sessions;
pub mod state_machine;
pub mod storage;
#[cfg(test)]
mod test_fleet;
#[cfg(test)]
mod trigger_test;
