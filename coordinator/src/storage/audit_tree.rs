//! The audit entries of a member from cluster version 7, in the `audit` tree of its Raft store's
//! sled database: big-endian index -> the entry's JSON. Written as entries are applied, flushed
//! with the Raft store (before the log is compacted past them, so a replay can always rebuild
//! what a crash lost).

use std::sync::{Arc, RwLock};

use rewind_shared::audit::AuditEntry;

use crate::state_machine::AuditStore;

/// Clones share the tree, and [`SledAuditStore::close`] closes it for all: the state and the
/// transport hold one, and a stopped member must not keep its database open.
#[derive(Clone)]
pub struct SledAuditStore {
    tree: Arc<RwLock<Option<sled::Tree>>>,
}

/// The tree's name in the Raft store's database.
const AUDIT_TREE: &str = "audit";

impl SledAuditStore {
    pub fn open(db: &sled::Db) -> Result<Self, String> {
        let tree = db
            .open_tree(AUDIT_TREE)
            .map_err(|error| format!("open the audit tree: {error}"))?;
        Ok(Self {
            tree: Arc::new(RwLock::new(Some(tree))),
        })
    }

    /// The tree, unless the member stopped.
    pub(super) fn tree(&self) -> Result<sled::Tree, String> {
        self.tree
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .ok_or_else(|| "the member stopped: its audit store is closed".to_string())
    }

    /// Whether it holds any entry: none until the cluster runs version 7.
    pub fn is_empty(&self) -> Result<bool, String> {
        Ok(self.tree()?.is_empty())
    }

    /// Lets go of the tree, for every clone: the member stopped.
    pub fn close(&self) {
        *self
            .tree
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }
}

/// An entry as the tree keeps it: its key and value.
pub(super) fn encoded(entry: &AuditEntry) -> Result<([u8; 8], Vec<u8>), String> {
    let bytes = serde_json::to_vec(entry)
        .map_err(|error| format!("encode audit entry {}: {error}", entry.index))?;
    Ok((entry.index.to_be_bytes(), bytes))
}

fn decode(index: u64, bytes: &[u8]) -> Result<AuditEntry, String> {
    serde_json::from_slice(bytes)
        .map_err(|error| format!("audit entry {index} does not decode: {error}"))
}

fn index_of(key: &[u8]) -> Result<u64, String> {
    key.try_into().map(u64::from_be_bytes).map_err(|_| {
        format!(
            "the audit tree holds a key of {} bytes, not an index",
            key.len()
        )
    })
}

impl AuditStore for SledAuditStore {
    fn put(&self, entry: &AuditEntry) -> Result<(), String> {
        let tree = self.tree()?;
        let (key, bytes) = encoded(entry)?;
        // A disk that refuses the write, for the fail-closed test: of entries about the target
        // `audit-fails` only, so that the member starts (and replays its log) before it fails.
        rewind_shared::failpoint::fail::fail_point!(
            "coordinator.audit-write-fails",
            entry.target == "audit-fails",
            |_| Err("injected by REWIND_FAILPOINTS".to_string())
        );
        tree.insert(key, bytes)
            .map(|_| ())
            .map_err(|error| format!("write audit entry {}: {error}", entry.index))
    }

    fn get(&self, index: u64) -> Result<Option<AuditEntry>, String> {
        self.tree()?
            .get(index.to_be_bytes())
            .map_err(|error| format!("read audit entry {index}: {error}"))?
            .map(|bytes| decode(index, &bytes))
            .transpose()
    }

    fn range(&self, from: u64, to: u64, limit: usize) -> Result<Vec<AuditEntry>, String> {
        if from >= to {
            return Ok(Vec::new());
        }
        self.tree()?
            .range(from.to_be_bytes()..to.to_be_bytes())
            .take(limit)
            .map(|item| {
                let (key, bytes) =
                    item.map_err(|error| format!("read audit entries from {from}: {error}"))?;
                decode(index_of(&key)?, &bytes)
            })
            .collect()
    }

    fn remove_through(&self, through: u64) -> Result<(), String> {
        let tree = self.tree()?;
        let mut batch = sled::Batch::default();
        for key in tree.range(..=through.to_be_bytes()).keys() {
            batch.remove(key.map_err(|error| format!("read the audit tree: {error}"))?);
        }
        tree.apply_batch(batch)
            .map_err(|error| format!("drop audit entries through {through}: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_shared::audit::Record;

    #[test]
    fn entries_round_trip_page_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let store = SledAuditStore::open(&db).unwrap();
        let mut prev = rewind_shared::audit::GENESIS_HASH.to_string();
        let mut written = Vec::new();
        for index in 1..=300u64 {
            let record = Record {
                at_ms: index,
                identity: "user:ada",
                action: "flag.set",
                target: "web",
                outcome: "ok",
                reason: "",
            };
            let entry = AuditEntry::salted(index, &prev, &record, &[7; 32]);
            prev = entry.hash.clone();
            store.put(&entry).unwrap();
            written.push(entry);
        }
        // 256 and 257 straddle a byte of the big-endian key: order is by index.
        let page = store.range(250, 301, 20).unwrap();
        let indexes: Vec<u64> = page.iter().map(|entry| entry.index).collect();
        assert_eq!(indexes, (250..270).collect::<Vec<_>>());
        assert_eq!(store.get(257).unwrap().unwrap(), written[256]);
        store.remove_through(100).unwrap();
        assert!(store.get(100).unwrap().is_none());
        assert_eq!(store.range(0, 1000, 1).unwrap()[0].index, 101);
    }
}
