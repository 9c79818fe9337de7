//! Durable storage: the Raft log, hard state, membership and snapshots of the replicated state,
//! in sled behind raft-rs's `Storage` trait; the audit entries (cluster version 7) in a tree beside.

mod audit_tree;
mod raft_store;
pub mod snapshot_codec;

pub use audit_tree::SledAuditStore;
pub use raft_store::{RaftStore, SnapshotFiles};
