//! Where the audit entries live from cluster version 7, and from version 8 the archived changes
//! and rollbacks (see `archive`): beside the replicated state, not in it, so snapshots stay the
//! same size however long the history grows. A member keeps them in a
//! sled tree of its Raft store ([`crate::storage::SledAuditStore`]); tests and the golden log
//! keep them in memory ([`MemoryAuditStore`]). Every member's store holds the same entries at the
//! same applied index: `apply()` writes each entry as it applies its command, and a member
//! whose store fails stops before anything acts on that command.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rewind_shared::audit::AuditEntry;

use super::archive::{ArchiveKind, ArchivedRecord};

/// Audit entries by index. Errors are the store's own (a disk), named for the operator.
pub trait AuditStore: Send + Sync {
    /// Writes `entry` at its index, replacing what is there (a member replaying its log after a
    /// restart writes the same entry again; a redaction writes the entry redacted).
    fn put(&self, entry: &AuditEntry) -> Result<(), String>;
    fn get(&self, index: u64) -> Result<Option<AuditEntry>, String>;
    /// Entries with indexes in `from..to`, oldest first, at most `limit`.
    fn range(&self, from: u64, to: u64, limit: usize) -> Result<Vec<AuditEntry>, String>;
    /// Drops every entry up to `through` (pruned after their archive was confirmed).
    fn remove_through(&self, through: u64) -> Result<(), String>;

    /// Writes an archived change or rollback, replacing one of the same kind and number (a
    /// member replaying its log writes the same record again).
    fn put_archived(&self, record: &ArchivedRecord) -> Result<(), String>;
    fn archived(&self, kind: ArchiveKind, number: u64) -> Result<Option<ArchivedRecord>, String>;
    /// Archived records of `kind` numbered below `before`, newest first, at most `limit`.
    fn archived_before(
        &self,
        kind: ArchiveKind,
        before: u64,
        limit: usize,
    ) -> Result<Vec<ArchivedRecord>, String>;
}

/// A shared handle to a store: what the state carries (never serialised). Two handles are
/// equal whatever they point to, so comparing states compares what is replicated only.
#[derive(Clone)]
pub struct StoreHandle(pub Arc<dyn AuditStore>);

impl Default for StoreHandle {
    fn default() -> Self {
        Self(Arc::new(MemoryAuditStore::default()))
    }
}

impl std::ops::Deref for StoreHandle {
    type Target = dyn AuditStore;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref()
    }
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("StoreHandle")
    }
}

impl PartialEq for StoreHandle {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

/// Entries in memory: tests, the golden log, and a state no member has attached a store to.
#[derive(Default)]
pub struct MemoryAuditStore {
    entries: Mutex<BTreeMap<u64, AuditEntry>>,
    archive: Mutex<BTreeMap<(ArchiveKind, u64), ArchivedRecord>>,
    /// Test-only: every write fails with this, as a full or broken disk would.
    failing: Mutex<Option<String>>,
}

impl MemoryAuditStore {
    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, AuditEntry>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn archive(&self) -> std::sync::MutexGuard<'_, BTreeMap<(ArchiveKind, u64), ArchivedRecord>> {
        self.archive
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn check_writable(&self) -> Result<(), String> {
        match self
            .failing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
        {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }

    /// Makes every later write fail with `why` (None: work again).
    pub fn fail_writes(&self, why: Option<&str>) {
        *self
            .failing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = why.map(str::to_string);
    }
}

impl AuditStore for MemoryAuditStore {
    fn put(&self, entry: &AuditEntry) -> Result<(), String> {
        self.check_writable()?;
        self.entries().insert(entry.index, entry.clone());
        Ok(())
    }

    fn get(&self, index: u64) -> Result<Option<AuditEntry>, String> {
        Ok(self.entries().get(&index).cloned())
    }

    fn range(&self, from: u64, to: u64, limit: usize) -> Result<Vec<AuditEntry>, String> {
        if from >= to {
            return Ok(Vec::new());
        }
        Ok(self
            .entries()
            .range(from..to)
            .take(limit)
            .map(|(_, entry)| entry.clone())
            .collect())
    }

    fn remove_through(&self, through: u64) -> Result<(), String> {
        self.check_writable()?;
        let mut entries = self.entries();
        let kept = entries.split_off(&through.saturating_add(1));
        *entries = kept;
        Ok(())
    }

    fn put_archived(&self, record: &ArchivedRecord) -> Result<(), String> {
        self.check_writable()?;
        self.archive()
            .insert((record.kind(), record.number()), record.clone());
        Ok(())
    }

    fn archived(&self, kind: ArchiveKind, number: u64) -> Result<Option<ArchivedRecord>, String> {
        Ok(self.archive().get(&(kind, number)).cloned())
    }

    fn archived_before(
        &self,
        kind: ArchiveKind,
        before: u64,
        limit: usize,
    ) -> Result<Vec<ArchivedRecord>, String> {
        Ok(self
            .archive()
            .range((kind, 0)..(kind, before))
            .rev()
            .take(limit)
            .map(|(_, record)| record.clone())
            .collect())
    }
}
