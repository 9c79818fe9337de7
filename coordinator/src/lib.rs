//! The rewind coordinator: holds the fleet's replicated state, plans and drives rollbacks, and
//! serves the `rewind.v1` API to agents and people.
//!
//! Every state change is a [`state_machine::Command`] proposed to the [`node`], written to the
//! log on disk and flushed, applied by the pure [`state_machine::apply`], and only then
//! acknowledged. The [`engine`] reads that state and turns intent into steps sent to agents.
//!
//! # Layout
//! - [`state_machine`]: replicated state, commands, `apply()`, the audit chain. Pure.
//! - [`storage`]: the log and snapshots on disk (sled), behind the [`storage::LogStore`] trait.
//! - [`node`]: the task that owns the state: orders proposals, persists, applies, answers.
//! - [`health`]: soft state on the leader: recent agent reports and per-service aggregates.
//! - [`sessions`]: connected agents and the channels to them.
//! - [`engine`]: the leader loop that dispatches steps, verifies hosts and fires triggers.
//! - [`api`]: tonic services; the only place `tonic::Status` appears.
//! - [`config`], [`errors`]: configuration and the error type.

pub mod api;
pub mod config;
pub mod engine;
pub mod errors;
pub mod health;
pub mod node;
pub mod sessions;
pub mod state_machine;
pub mod storage;
