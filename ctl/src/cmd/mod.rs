//! One file per noun of the command tree; `commands.rs` holds the tree's root and dispatch.

pub mod audit;
pub mod change;
pub mod cluster;
pub mod env;
pub mod fleet;
pub mod incident;
pub mod release;
pub mod report;
pub mod rollback;
pub mod runbook;
pub mod service;
pub mod trigger;
