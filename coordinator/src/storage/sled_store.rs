//! [`LogStore`] on sled.
//!
//! Trees: `log` (big-endian index -> JSON entry) and `meta` (`snapshot`, `generation`).
//! Durability: every append ends with `Db::flush()`, which returns after sled has written and
//! synced its log. Caveat: sled syncs with `sync_file_range` plus `fsync` of its segment files,
//! which survives a process kill; on power loss it is as good as the disk's write cache honesty.

use std::path::Path;

use super::{LogEntry, LogStore};
use crate::errors::CoordinatorError;
use crate::state_machine::State;

pub struct SledStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

const SNAPSHOT_KEY: &[u8] = b"snapshot";
const GENERATION_KEY: &[u8] = b"generation";
const CLUSTER_ID_KEY: &[u8] = b"cluster-id";

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, CoordinatorError> {
        let db = sled::open(dir).map_err(|error| storage_error("open", dir.display(), error))?;
        let log = db
            .open_tree("log")
            .map_err(|error| storage_error("open tree", "log", error))?;
        let meta = db
            .open_tree("meta")
            .map_err(|error| storage_error("open tree", "meta", error))?;
        Ok(Self { db, log, meta })
    }

    fn flush(&self) -> Result<(), CoordinatorError> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|error| storage_error("flush", "db", error))
    }
}

impl LogStore for SledStore {
    fn append(&mut self, entries: &[LogEntry]) -> Result<(), CoordinatorError> {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = serde_json::to_vec(entry)
                .map_err(|error| storage_error("encode entry", entry.index, error))?;
            batch.insert(&entry.index.to_be_bytes(), bytes);
        }
        self.log
            .apply_batch(batch)
            .map_err(|error| storage_error("append", "log", error))?;
        self.flush()
    }

    fn entries_after(&self, index: u64) -> Result<Vec<LogEntry>, CoordinatorError> {
        let start = index.saturating_add(1).to_be_bytes();
        self.log
            .range(start..)
            .map(|item| {
                let (key, value) = item.map_err(|error| storage_error("read", "log", error))?;
                serde_json::from_slice(&value)
                    .map_err(|error| storage_error("decode entry", hex_key(&key), error))
            })
            .collect()
    }

    fn save_snapshot(&mut self, state: &State) -> Result<(), CoordinatorError> {
        let bytes = serde_json::to_vec(state)
            .map_err(|error| storage_error("encode", "snapshot", error))?;
        self.meta
            .insert(SNAPSHOT_KEY, bytes)
            .map_err(|error| storage_error("write", "snapshot", error))?;
        self.flush()?;
        // Only after the snapshot is durable may the entries it covers go.
        let covered = state.applied_index.saturating_add(1).to_be_bytes();
        let mut batch = sled::Batch::default();
        for key in self.log.range(..covered).keys() {
            batch.remove(key.map_err(|error| storage_error("read", "log", error))?);
        }
        self.log
            .apply_batch(batch)
            .map_err(|error| storage_error("compact", "log", error))?;
        self.flush()
    }

    fn load_snapshot(&self) -> Result<Option<State>, CoordinatorError> {
        let Some(bytes) = self
            .meta
            .get(SNAPSHOT_KEY)
            .map_err(|error| storage_error("read", "snapshot", error))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|error| storage_error("decode", "snapshot", error))
    }

    fn cluster_id(&mut self) -> Result<String, CoordinatorError> {
        if let Some(bytes) = self
            .meta
            .get(CLUSTER_ID_KEY)
            .map_err(|error| storage_error("read", "cluster id", error))?
        {
            return Ok(String::from_utf8_lossy(&bytes).into_owned());
        }
        // Unique enough without a random source: the moment, the process and the place.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or(0);
        let seed = format!("{nanos}/{}/{:?}", std::process::id(), self.db.generate_id());
        let id = format!(
            "rw-{}",
            &rewind_shared::digest::sha256_hex(seed.as_bytes())[..16]
        );
        self.meta
            .insert(CLUSTER_ID_KEY, id.as_bytes())
            .map_err(|error| storage_error("write", "cluster id", error))?;
        self.flush()?;
        Ok(id)
    }

    fn next_generation(&mut self) -> Result<u64, CoordinatorError> {
        let current = self
            .meta
            .get(GENERATION_KEY)
            .map_err(|error| storage_error("read", "generation", error))?
            .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        let next = current + 1;
        self.meta
            .insert(GENERATION_KEY, &next.to_be_bytes())
            .map_err(|error| storage_error("write", "generation", error))?;
        self.flush()?;
        Ok(next)
    }
}

fn hex_key(key: &[u8]) -> String {
    <[u8; 8]>::try_from(key).map_or_else(
        |_| format!("{key:?}"),
        |bytes| u64::from_be_bytes(bytes).to_string(),
    )
}

fn storage_error(
    action: &str,
    what: impl std::fmt::Display,
    error: impl std::fmt::Display,
) -> CoordinatorError {
    CoordinatorError::Storage(format!("{action} {what}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::{Command, CommandKind, Labels};

    fn entry(index: u64) -> LogEntry {
        LogEntry {
            index,
            command: Command {
                at_ms: index,
                identity: "t".into(),
                request_id: String::new(),
                kind: CommandKind::RegisterHost {
                    host_id: format!("h{index}"),
                    labels: Labels::default(),
                    services: vec![],
                    agent_version: String::new(),
                },
            },
        }
    }

    #[test]
    fn entries_survive_a_reopen_and_a_snapshot_compacts_what_it_covers() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = SledStore::open(dir.path()).unwrap();
            store
                .append(&(1..=5).map(entry).collect::<Vec<_>>())
                .unwrap();
            assert_eq!(store.next_generation().unwrap(), 1);
            assert!(store.cluster_id().unwrap().starts_with("rw-"));
        }
        let mut store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.entries_after(0).unwrap().len(), 5);
        assert_eq!(store.next_generation().unwrap(), 2);
        let cluster_id = store.cluster_id().unwrap();
        assert_eq!(
            store.cluster_id().unwrap(),
            cluster_id,
            "the cluster id is kept"
        );
        let state = State {
            applied_index: 3,
            ..State::default()
        };
        store.save_snapshot(&state).unwrap();
        assert_eq!(store.load_snapshot().unwrap().unwrap().applied_index, 3);
        let remaining: Vec<u64> = store
            .entries_after(0)
            .unwrap()
            .iter()
            .map(|entry| entry.index)
            .collect();
        assert_eq!(remaining, vec![4, 5]);
    }
}
