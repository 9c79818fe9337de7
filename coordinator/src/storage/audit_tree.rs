//! The audit entries of a member from cluster version 7, in the `audit` tree of its Raft store's
//! sled database: big-endian index -> the entry's JSON; and from version 8 the archived changes
//! and rollbacks in its `archive` tree: a kind byte (`c`, `r`) and the big-endian number -> the
//! record's JSON. Written as commands are applied, flushed with the Raft store (before the log
//! is compacted past them, so a replay can always rebuild what a crash lost).

use std::sync::{Arc, RwLock};

use rewind_shared::audit::AuditEntry;

use crate::state_machine::AuditStore;
use crate::state_machine::archive::{ArchiveKind, ArchivedRecord};

/// Clones share the tree, and [`SledAuditStore::close`] closes it for all: the state and the
/// transport hold one, and a stopped member must not keep its database open.
#[derive(Clone)]
pub struct SledAuditStore {
    trees: Arc<RwLock<Option<Trees>>>,
}

#[derive(Clone)]
pub(super) struct Trees {
    pub audit: sled::Tree,
    pub archive: sled::Tree,
}

/// The trees' names in the Raft store's database.
const AUDIT_TREE: &str = "audit";
const ARCHIVE_TREE: &str = "archive";

impl SledAuditStore {
    pub fn open(db: &sled::Db) -> Result<Self, String> {
        let open = |name: &str| {
            db.open_tree(name)
                .map_err(|error| format!("open the {name} tree: {error}"))
        };
        let trees = Trees {
            audit: open(AUDIT_TREE)?,
            archive: open(ARCHIVE_TREE)?,
        };
        Ok(Self {
            trees: Arc::new(RwLock::new(Some(trees))),
        })
    }

    /// The trees, unless the member stopped.
    pub(super) fn trees(&self) -> Result<Trees, String> {
        self.trees
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .ok_or_else(|| "the member stopped: its audit store is closed".to_string())
    }

    fn tree(&self) -> Result<sled::Tree, String> {
        Ok(self.trees()?.audit)
    }

    /// Whether it holds no entry and no archived record: so until the cluster runs version 7.
    pub fn is_empty(&self) -> Result<bool, String> {
        let trees = self.trees()?;
        Ok(trees.audit.is_empty() && trees.archive.is_empty())
    }

    /// Every archived record, oldest of each kind first (for a snapshot bundle).
    pub fn all_archived(&self) -> Result<Vec<ArchivedRecord>, String> {
        self.trees()?
            .archive
            .iter()
            .map(|item| {
                let (key, bytes) = item.map_err(|error| format!("read the archive: {error}"))?;
                decode_archived(&key, &bytes)
            })
            .collect()
    }

    /// Lets go of the trees, for every clone: the member stopped.
    pub fn close(&self) {
        *self
            .trees
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }
}

fn kind_byte(kind: ArchiveKind) -> u8 {
    match kind {
        ArchiveKind::Change => b'c',
        ArchiveKind::Rollback => b'r',
    }
}

fn archive_key(kind: ArchiveKind, number: u64) -> [u8; 9] {
    let mut key = [kind_byte(kind); 9];
    key[1..].copy_from_slice(&number.to_be_bytes());
    key
}

/// An archived record as the tree keeps it: its key and value.
pub(super) fn encoded_archived(record: &ArchivedRecord) -> Result<([u8; 9], Vec<u8>), String> {
    let bytes = serde_json::to_vec(record)
        .map_err(|error| format!("encode archived record {}: {error}", record.number()))?;
    Ok((archive_key(record.kind(), record.number()), bytes))
}

fn decode_archived(key: &[u8], bytes: &[u8]) -> Result<ArchivedRecord, String> {
    serde_json::from_slice(bytes).map_err(|error| {
        format!(
            "the archived record at key {} does not decode: {error}",
            String::from_utf8_lossy(key).escape_debug()
        )
    })
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

    fn put_archived(&self, record: &ArchivedRecord) -> Result<(), String> {
        let (key, bytes) = encoded_archived(record)?;
        self.trees()?
            .archive
            .insert(key, bytes)
            .map(|_| ())
            .map_err(|error| format!("write to the archive tree: {error}"))
    }

    fn archived(&self, kind: ArchiveKind, number: u64) -> Result<Option<ArchivedRecord>, String> {
        let key = archive_key(kind, number);
        self.trees()?
            .archive
            .get(key)
            .map_err(|error| format!("read the archive: {error}"))?
            .map(|bytes| decode_archived(&key, &bytes))
            .transpose()
    }

    fn archived_before(
        &self,
        kind: ArchiveKind,
        before: u64,
        limit: usize,
    ) -> Result<Vec<ArchivedRecord>, String> {
        self.trees()?
            .archive
            .range(archive_key(kind, 0)..archive_key(kind, before))
            .rev()
            .take(limit)
            .map(|item| {
                let (key, bytes) = item.map_err(|error| format!("read the archive: {error}"))?;
                decode_archived(&key, &bytes)
            })
            .collect()
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
