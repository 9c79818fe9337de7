//! Durable storage of the command log and state snapshots, behind [`LogStore`] so the node can be
//! tested without a disk and the log can later move to another engine.

mod raft_store;
mod sled_store;

pub use raft_store::RaftStore;
pub use sled_store::SledStore;

use crate::errors::CoordinatorError;
use crate::state_machine::{Command, State};

/// A command at its position in the log.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LogEntry {
    pub index: u64,
    pub command: Command,
}

pub trait LogStore: Send + 'static {
    /// Appends entries and returns only once they are durable (flushed to disk).
    fn append(&mut self, entries: &[LogEntry]) -> Result<(), CoordinatorError>;
    /// Entries after `index`, in order.
    fn entries_after(&self, index: u64) -> Result<Vec<LogEntry>, CoordinatorError>;
    /// Stores `state` durably and drops the log entries it covers.
    fn save_snapshot(&mut self, state: &State) -> Result<(), CoordinatorError>;
    fn load_snapshot(&self) -> Result<Option<State>, CoordinatorError>;
    /// This cluster's id, created on first use and kept: agents journal step ids per cluster.
    fn cluster_id(&mut self) -> Result<String, CoordinatorError>;
    /// Increments and returns the generation number that fences steps issued by earlier runs.
    fn next_generation(&mut self) -> Result<u64, CoordinatorError>;
}
