//! Durable storage: the Raft log, hard state, membership and snapshots of the replicated state,
//! in sled behind raft-rs's `Storage` trait.

mod raft_store;
pub mod snapshot_codec;

pub use raft_store::{RaftStore, SnapshotFiles};
