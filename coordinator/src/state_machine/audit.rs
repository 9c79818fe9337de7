//! The hash-chained audit log, as the replicated state holds it. How entries are hashed,
//! verified and redacted is in [`rewind_shared::audit`], shared with `rewindctl audit verify
//! --file`. Every member holds the same chain and can verify it.
//!
//! Up to cluster version 6 the entries live inside the state, so every snapshot carries the
//! whole history. From version 7 they live in an [`AuditStore`] beside it (a sled tree on a
//! member) and the state keeps only the chain's head: where it starts, the hash it links to,
//! the next index and the last hash. `apply()` still appends every entry as part of applying its
//! command; a store that fails is recorded ([`AuditLog::failure`]) and the member stops
//! before anything sees the command applied (see `node::raft`).

use std::sync::Arc;

pub use super::audit_store::{AuditStore, MemoryAuditStore, StoreHandle};

use rewind_shared::audit::{ChainCheck, Field, GENESIS_HASH, Record};
use serde::{Deserialize, Serialize};

pub use rewind_shared::audit::AuditEntry;

/// Entries are immutable once appended, so they are shared (`Arc`): copying the state for a
/// snapshot then costs a pointer per entry, not a copy of the whole history. From cluster
/// version 7 (`stored`) none are held here: they are in `store`.
///
/// From cluster version 5 the oldest entries can leave the cluster, but only once an export
/// that covers them was confirmed (`archived_through`): the log then starts at `first_index`
/// and keeps the hash its first entry links to (`anchor_hash`), so the chain still verifies
/// from there, and an archive's last hash continues into it. Until then these fields are at
/// their defaults and not written, so older snapshots and digests are unchanged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditLog {
    entries: Vec<Arc<AuditEntry>>,
    /// The index of the first entry held.
    #[serde(default = "first", skip_serializing_if = "is_first")]
    first_index: u64,
    /// The hash the first entry held links to: the genesis hash, or the last pruned entry's.
    #[serde(default = "genesis", skip_serializing_if = "is_genesis")]
    anchor_hash: String,
    /// Every entry up to this index is in an export that an admin confirmed archived.
    #[serde(default, skip_serializing_if = "is_zero")]
    archived_through: u64,
    /// The manifest hash of the export that confirmed `archived_through`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    archived_manifest: String,
    /// From cluster version 7: the entries are in `store`, and this is the chain's head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stored: Option<StoredHead>,
    /// Where the entries are from version 7: never replicated nor snapshotted; a member
    /// attaches its own (`attach`), tests an in-memory one.
    #[serde(skip)]
    store: StoreHandle,
    /// A store operation that failed while applying: the member must stop (fail closed).
    #[serde(skip)]
    failure: Option<String>,
}

/// The chain's head when its entries are in the store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredHead {
    /// The index the next entry will have.
    pub next_index: u64,
    /// The last entry's hash (the anchor hash while there is none).
    pub head_hash: String,
}

fn first() -> u64 {
    1
}

fn is_first(index: &u64) -> bool {
    *index == 1
}

fn genesis() -> String {
    GENESIS_HASH.to_string()
}

fn is_genesis(hash: &String) -> bool {
    hash == GENESIS_HASH
}

fn is_zero(index: &u64) -> bool {
    *index == 0
}

impl Default for AuditLog {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            first_index: first(),
            anchor_hash: genesis(),
            archived_through: 0,
            archived_manifest: String::new(),
            stored: None,
            store: StoreHandle::default(),
            failure: None,
        }
    }
}

/// Most entries one read of the store returns; longer reads go in pages.
pub const MAX_ENTRIES_PER_READ: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditVerification {
    /// Entries held (and checked).
    pub entries: u64,
    /// First entry whose hash or link does not match, if any.
    pub first_broken: Option<u64>,
    pub detail: String,
    pub head_hash: String,
    /// Where the chain held starts: its first index and the hash it links to.
    pub first_index: u64,
    pub anchor_hash: String,
    pub archived_through: u64,
    /// sha256 over the entries held as stored (each one's JSON, in order): what members compare
    /// beyond the chain's hashes, which a redaction leaves as they were.
    pub content_digest: String,
}

/// How long audit entries stay in the cluster once archived (`[audit]` in the coordinator's
/// config; the leader's applies). Nothing is dropped that no confirmed export covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditRetention {
    /// Archived entries older than this many days may go.
    pub days: Option<u64>,
    /// The newest this many entries stay, archived or not.
    pub entries: Option<u64>,
}

impl AuditRetention {
    pub fn is_off(&self) -> bool {
        self.days.is_none() && self.entries.is_none()
    }
}

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

impl AuditLog {
    /// Links `record` into the chain: salted (redactable) when the proposer chose a seed for
    /// it, plain as before cluster version 5 otherwise.
    pub fn append(&mut self, record: &Record<'_>, seed: Option<&[u8]>) {
        let index = self.next_index();
        let prev_hash = self.head_hash();
        let entry = match seed {
            Some(seed) => AuditEntry::salted(index, prev_hash, record, seed),
            None => AuditEntry::plain(index, prev_hash, record),
        };
        match &mut self.stored {
            None => self.entries.push(Arc::new(entry)),
            Some(head) => {
                // The head moves whatever the store says: on a failure the member stops before
                // anything reads this state, and applies the entry again when it restarts.
                head.next_index = index + 1;
                head.head_hash = entry.hash.clone();
                if let Err(error) = self.store.put(&entry) {
                    self.fail(format!("append audit entry {index}: {error}"));
                }
            }
        }
    }

    /// Moves the entries held into `store`, from where they are read from now on (the cluster
    /// version rising to 7). Every member does it at the same entry of the log.
    pub fn move_to_store(&mut self) {
        if self.stored.is_some() {
            return;
        }
        let head = StoredHead {
            next_index: self.next_index(),
            head_hash: self.head_hash().to_string(),
        };
        for entry in std::mem::take(&mut self.entries) {
            if let Err(error) = self.store.put(&entry) {
                self.fail(format!(
                    "move audit entry {} to its store: {error}",
                    entry.index
                ));
                break;
            }
        }
        self.stored = Some(head);
    }

    /// Whether the entries are in the store (cluster version 7 and later).
    pub fn is_stored(&self) -> bool {
        self.stored.is_some()
    }

    /// Gives this log the store its entries are in: a member's own, once, when it loads or
    /// installs a state.
    pub fn attach(&mut self, store: StoreHandle) {
        self.store = store;
    }

    pub fn store(&self) -> &StoreHandle {
        &self.store
    }

    /// A store operation that failed while applying: nothing may act on this state any more
    /// (the member stops, and applies the log again with its audit when it restarts).
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Writes a change or rollback that leaves the state to the archive; a store that fails
    /// stops the member, as a failed audit write does.
    pub fn archive(&mut self, record: &super::archive::ArchivedRecord) {
        if let Err(error) = self.store.put_archived(record) {
            self.fail(format!("archive record {}: {error}", record.number()));
        }
    }

    fn fail(&mut self, why: String) {
        if self.failure.is_none() {
            self.failure = Some(why);
        }
    }

    /// The last entry's hash, or the anchor hash while the log holds none.
    pub fn head_hash(&self) -> &str {
        match &self.stored {
            Some(head) => &head.head_hash,
            None => self
                .entries
                .last()
                .map_or(self.anchor_hash.as_str(), |last| last.hash.as_str()),
        }
    }

    /// Every entry held, oldest first. For tests: a cluster's log can be long.
    #[cfg(test)]
    pub fn entries(&self) -> Vec<Arc<AuditEntry>> {
        self.range_all(self.first_index..self.next_index())
            .expect("the store reads")
    }

    /// Every entry held with an index in `indexes`, read a page at a time: for a caller that
    /// bounds the range itself.
    pub fn range_all(&self, indexes: std::ops::Range<u64>) -> Result<Vec<Arc<AuditEntry>>, String> {
        let mut all = Vec::new();
        self.for_each_page(indexes, |page| {
            all.extend_from_slice(page);
            std::ops::ControlFlow::Continue(())
        })?;
        Ok(all)
    }

    /// Calls `visit` with the entries held in `indexes`, a page ([`Self::range`]) at a time,
    /// until it breaks or they end: a long range without holding all of it.
    pub fn for_each_page(
        &self,
        indexes: std::ops::Range<u64>,
        mut visit: impl FnMut(&[Arc<AuditEntry>]) -> std::ops::ControlFlow<()>,
    ) -> Result<(), String> {
        let mut from = indexes.start;
        while from < indexes.end {
            let page = self.range(from..indexes.end)?;
            let Some(last) = page.last() else { break };
            from = last.index + 1;
            if visit(&page).is_break() {
                break;
            }
        }
        Ok(())
    }

    /// Entries held with indexes in `indexes` (those pruned are not), oldest first: at most
    /// [`MAX_ENTRIES_PER_READ`] of them from the store, so a caller wanting more reads on from
    /// the last one returned.
    pub fn range(&self, indexes: std::ops::Range<u64>) -> Result<Vec<Arc<AuditEntry>>, String> {
        let start = indexes.start.max(self.first_index);
        let end = indexes.end.min(self.next_index());
        if start >= end {
            return Ok(Vec::new());
        }
        if self.stored.is_some() {
            return Ok(self
                .store
                .range(start, end, MAX_ENTRIES_PER_READ)?
                .into_iter()
                .map(Arc::new)
                .collect());
        }
        let from = (start - self.first_index) as usize;
        let to = (end - self.first_index) as usize;
        Ok(self.entries[from..to].to_vec())
    }

    pub fn get(&self, index: u64) -> Result<Option<Arc<AuditEntry>>, String> {
        if index < self.first_index || index >= self.next_index() {
            return Ok(None);
        }
        if self.stored.is_some() {
            return match self.store.get(index)? {
                Some(entry) => Ok(Some(Arc::new(entry))),
                None => Err(format!("audit entry {index} is missing from its store")),
            };
        }
        Ok(self
            .entries
            .get((index - self.first_index) as usize)
            .cloned())
    }

    /// The first index from which `before` is false, over entries in index order (as
    /// `slice::partition_point`): a binary search, so a timeline finds its start in a long log
    /// by reading a few entries.
    pub fn partition_point(&self, before: impl Fn(&AuditEntry) -> bool) -> Result<u64, String> {
        let (mut low, mut high) = (self.first_index, self.next_index());
        while low < high {
            let middle = low + (high - low) / 2;
            let entry = self
                .get(middle)?
                .ok_or_else(|| format!("audit entry {middle} is missing"))?;
            if before(&entry) {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        Ok(low)
    }

    /// The hash the entry at `index` links to, if the cluster still knows it.
    fn hash_before(&self, index: u64) -> Result<Option<String>, String> {
        if index == self.first_index {
            return Ok(Some(self.anchor_hash.clone()));
        }
        let Some(previous) = index.checked_sub(1) else {
            return Ok(None);
        };
        Ok(self.get(previous)?.map(|entry| entry.hash.clone()))
    }

    pub fn first_index(&self) -> u64 {
        self.first_index
    }

    /// The index the next entry will have.
    pub fn next_index(&self) -> u64 {
        match &self.stored {
            Some(head) => head.next_index,
            None => self.first_index + self.entries.len() as u64,
        }
    }

    pub fn archived_through(&self) -> u64 {
        self.archived_through
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        usize::try_from(self.next_index() - self.first_index).unwrap_or(usize::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where an export that ends at `through` with `manifest_hash` starts, if it is one of this
    /// chain that continues what is archived already: the leader finds it before proposing the
    /// confirmation, which `apply()` then checks at once. Scans the entries that could start it.
    pub fn find_export_start(
        &self,
        through: u64,
        manifest_hash: &str,
    ) -> Result<Option<u64>, String> {
        let Some(last) = self.get(through)? else {
            return Ok(None);
        };
        let latest_start = (self.archived_through + 1).min(through);
        for first in self.first_index..=latest_start {
            if let Some(anchor) = self.hash_before(first)?
                && rewind_shared::audit::manifest_hash(first, through, &anchor, &last.hash)
                    == manifest_hash
            {
                return Ok(Some(first));
            }
        }
        Ok(None)
    }

    /// Records that the export of `first..=through` with `manifest_hash` is archived. Refused
    /// unless the manifest is of this chain's entries and the export leaves no gap after what
    /// was archived before.
    pub fn confirm_archive(
        &mut self,
        first: u64,
        through: u64,
        manifest_hash: &str,
    ) -> Result<(), String> {
        let last = self.next_index().saturating_sub(1);
        if through <= self.archived_through {
            return Err(format!(
                "entries up to {} are confirmed archived already",
                self.archived_through
            ));
        }
        if through > last {
            return Err(format!(
                "there is no audit entry {through} (the last is {last})"
            ));
        }
        if first > self.archived_through + 1 {
            return Err(format!(
                "the export starts at entry {first}, and entries {}..{} are in no confirmed \
                 export: confirm the export before it first",
                self.archived_through + 1,
                first - 1
            ));
        }
        let read = |result: Result<Option<String>, String>| {
            result.map_err(|error| format!("the audit store cannot be read: {error}"))
        };
        let anchor = read(self.hash_before(first));
        let last_hash = read(
            self.get(through)
                .map(|entry| entry.map(|entry| entry.hash.clone())),
        );
        let (anchor, last_hash) = match (anchor, last_hash) {
            (Ok(anchor), Ok(last_hash)) => (anchor, last_hash),
            (Err(error), _) | (_, Err(error)) => {
                self.fail(error.clone());
                return Err(error);
            }
        };
        let (Some(anchor), Some(last_hash)) = (anchor, last_hash) else {
            return Err(format!(
                "the export starts at entry {first}, which the cluster no longer holds (it \
                 starts at {}): confirm an export made since",
                self.first_index
            ));
        };
        let expected = rewind_shared::audit::manifest_hash(first, through, &anchor, &last_hash);
        if expected != manifest_hash {
            return Err(format!(
                "the manifest hash does not match this cluster's entries {first}..{through}: \
                 the export is of another chain, or was altered"
            ));
        }
        self.archived_through = through;
        self.archived_manifest = manifest_hash.to_string();
        Ok(())
    }

    /// The newest index that `retention` lets go at `now_ms`, if any entry may: only archived
    /// entries, oldest first, each older than the days and outside the newest entries kept.
    pub fn prunable_through(
        &self,
        retention: AuditRetention,
        now_ms: u64,
    ) -> Result<Option<u64>, String> {
        if retention.is_off() {
            return Ok(None);
        }
        let last = self.next_index().saturating_sub(1);
        // Archived and outside the newest kept: a prefix by index.
        let mut bound = self.archived_through.min(last);
        if let Some(keep) = retention.entries {
            bound = bound.min(last.saturating_sub(keep));
        }
        if bound < self.first_index {
            return Ok(None);
        }
        // Old enough: read in order (a leader's clock may have stepped back), a few at a time
        // so the common answer (the first is young) costs one small read, and at most
        // `MAX_ENTRIES_PER_READ` a call (the next pruning goes on from there).
        let young = |entry: &Arc<AuditEntry>| {
            retention.days.is_some_and(|days| {
                entry.at_ms.saturating_add(days.saturating_mul(DAY_MS)) > now_ms
            })
        };
        let limit = bound.min(self.first_index + MAX_ENTRIES_PER_READ as u64 - 1);
        if retention.days.is_none() {
            return Ok(Some(limit));
        }
        let mut through = None;
        let mut next = self.first_index;
        // The first entry alone, then 256 at a time.
        let mut step = 1;
        while next <= limit {
            let page = self.range(next..(next + step).min(limit + 1))?;
            step = 256;
            let Some(last) = page.last() else { break };
            next = last.index + 1;
            match page.iter().position(young) {
                Some(0) => break,
                Some(position) => {
                    through = Some(page[position - 1].index);
                    break;
                }
                None => through = Some(last.index),
            }
        }
        Ok(through)
    }

    /// Drops the entries up to `through`, all confirmed archived; the chain goes on from the
    /// last one's hash. Returns how many went, and the time of the last.
    pub fn prune_through(&mut self, through: u64) -> Result<(u64, u64), String> {
        if through > self.archived_through {
            return Err(format!(
                "entries after {} are in no confirmed export: nothing unexported is dropped",
                self.archived_through
            ));
        }
        if through < self.first_index {
            return Err(format!(
                "entries up to {through} are gone already (the log starts at {})",
                self.first_index
            ));
        }
        let count = through + 1 - self.first_index;
        let last_pruned = match self.get(through) {
            Ok(entry) => entry.map(|entry| (entry.hash.clone(), entry.at_ms)),
            Err(error) => {
                let error = format!("the audit store cannot be read: {error}");
                self.fail(error.clone());
                return Err(error);
            }
        };
        // In the store, the entries stay until a snapshot that starts after them is on disk
        // (`drop_pruned`): a member that restarts replays its log from its snapshot, and the
        // entries that log reads (the pruning itself) must still be there.
        if self.stored.is_none() {
            self.entries.drain(..count as usize);
        }
        let (anchor_hash, last_at_ms) = last_pruned.unwrap_or_default();
        self.anchor_hash = anchor_hash;
        self.first_index = through + 1;
        Ok((count, last_at_ms))
    }

    /// Drops from the store what this (snapshotted) log has pruned: called once a snapshot of
    /// it is durable, so no replay will read those entries again.
    pub fn drop_pruned(&self) -> Result<(), String> {
        match (&self.stored, self.first_index.checked_sub(1)) {
            (Some(_), Some(through)) if through > 0 => self.store.remove_through(through),
            _ => Ok(()),
        }
    }

    /// Erases `fields` of entry `index` (salted entries only): the chain still verifies.
    pub fn redact(&mut self, index: u64, fields: &[Field]) -> Result<(), String> {
        let first_index = self.first_index;
        if index < first_index || index >= self.next_index() {
            return Err(format!(
                "the cluster holds audit entries {first_index}..{}, not {index}",
                self.next_index().saturating_sub(1)
            ));
        }
        if self.stored.is_none() {
            let entry = Arc::make_mut(&mut self.entries[(index - first_index) as usize]);
            for field in fields {
                entry.redact(*field)?;
            }
            return Ok(());
        }
        let mut entry = match self.get(index) {
            Ok(Some(entry)) => Arc::unwrap_or_clone(entry),
            Ok(None) => return Err(format!("audit entry {index} is missing")),
            Err(error) => {
                let error = format!("the audit store cannot be read: {error}");
                self.fail(error.clone());
                return Err(error);
            }
        };
        for field in fields {
            entry.redact(*field)?;
        }
        if let Err(error) = self.store.put(&entry) {
            self.fail(format!("redact audit entry {index}: {error}"));
        }
        Ok(())
    }

    /// Recomputes the chain held and reports the first entry that does not match.
    pub fn verify(&self) -> AuditVerification {
        let mut check = ChainCheck::continuing(self.first_index, &self.anchor_hash);
        let mut content = <sha2::Sha256 as sha2::Digest>::new();
        let mut broken = None;
        // An entry missing from the store shows as the next one in its place, or as a chain
        // that ends before the head.
        let read = self.for_each_page(self.first_index..self.next_index(), |page| {
            for entry in page {
                if let Err(detail) = check.next(entry) {
                    broken = Some((check.next_index(), detail));
                    return std::ops::ControlFlow::Break(());
                }
                let stored = serde_json::to_vec(entry.as_ref()).unwrap_or_default();
                sha2::Digest::update(&mut content, &stored);
            }
            std::ops::ControlFlow::Continue(())
        });
        if let Err(error) = read {
            broken = Some((
                check.next_index(),
                format!("the store cannot be read: {error}"),
            ));
        }
        if broken.is_none() && check.head_hash() != self.head_hash() {
            broken = Some((
                self.next_index(),
                "the entries end before the head the cluster recorded".to_string(),
            ));
        }
        let held = self.len() as u64;
        let (first_broken, detail, head_hash) = match broken {
            Some((index, detail)) => (Some(index), detail, String::new()),
            None if self.first_index > 1 => (
                None,
                format!(
                    "{held} entries ({}..), chain intact from the archive's last hash",
                    self.first_index
                ),
                check.head_hash().to_string(),
            ),
            None => (
                None,
                format!("{held} entries, chain intact"),
                check.head_hash().to_string(),
            ),
        };
        AuditVerification {
            entries: held,
            first_broken,
            detail,
            head_hash,
            first_index: self.first_index,
            anchor_hash: self.anchor_hash.clone(),
            archived_through: self.archived_through,
            content_digest: hex::encode(sha2::Digest::finalize(content)),
        }
    }

    /// Test-only: the in-state entries (before version 7).
    #[cfg(test)]
    pub(crate) fn entries_mut(&mut self) -> &mut Vec<Arc<AuditEntry>> {
        &mut self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_log() -> AuditLog {
        let mut log = AuditLog::default();
        for index in 0..5u64 {
            let target = format!("ch-{index}");
            let record = Record {
                at_ms: 1_000 + index,
                identity: "operator",
                action: "change.start",
                target: &target,
                outcome: "ok",
                reason: "",
            };
            // The first entries as before version 5, the rest salted.
            let seed = [index as u8; 32];
            log.append(&record, (index >= 2).then_some(&seed[..]));
        }
        log
    }

    // The hashing itself is tested in `rewind_shared::audit`; this is the log around it.
    #[test]
    fn the_log_verifies_and_names_the_first_broken_entry() {
        let verification = sample_log().verify();
        assert_eq!(verification.first_broken, None);
        assert_eq!(verification.entries, 5);
        assert_eq!(verification.head_hash.len(), 64);

        for position in 0..5 {
            let mut log = sample_log();
            Arc::make_mut(&mut log.entries_mut()[position]).outcome = "forged".into();
            assert_eq!(log.verify().first_broken, Some(position as u64 + 1));
        }
        let mut removed = sample_log();
        removed.entries_mut().remove(2);
        assert_eq!(removed.verify().first_broken, Some(3));
    }

    /// Ten salted entries, a second apart from t=1 s.
    fn salted_log() -> AuditLog {
        let mut log = AuditLog::default();
        for index in 1..=10u64 {
            let record = Record {
                at_ms: 1_000 * index,
                identity: "user:ada",
                action: "flag.set",
                target: "web",
                outcome: "ok: {reason}",
                reason: "INC-9",
            };
            log.append(&record, Some(&[index as u8; 32]));
        }
        log
    }

    fn manifest_of(log: &AuditLog, first: u64, through: u64) -> String {
        let anchor = log.hash_before(first).unwrap().unwrap();
        rewind_shared::audit::manifest_hash(
            first,
            through,
            &anchor,
            &log.get(through).unwrap().unwrap().hash,
        )
    }

    #[test]
    fn nothing_unarchived_is_pruned_and_the_chain_goes_on_from_the_last_pruned_hash() {
        let mut log = salted_log();
        let retention = AuditRetention {
            days: None,
            entries: Some(2),
        };
        // Nothing archived: nothing may go, whatever the retention.
        assert_eq!(log.prunable_through(retention, u64::MAX), Ok(None));
        let error = log.prune_through(3).unwrap_err();
        assert!(error.contains("nothing unexported is dropped"), "{error}");

        // An export of 1..=6 confirmed: found from its hash, then the first four may go (the
        // newest two of ten stay anyway; 5 and 6 would too if more were kept).
        let hash = manifest_of(&log, 1, 6);
        assert_eq!(log.find_export_start(6, &hash), Ok(Some(1)));
        log.confirm_archive(1, 6, &hash).unwrap();
        assert_eq!(log.prunable_through(retention, u64::MAX), Ok(Some(6)));
        let keep_five = AuditRetention {
            entries: Some(5),
            ..retention
        };
        assert_eq!(log.prunable_through(keep_five, u64::MAX), Ok(Some(5)));
        let by_age = AuditRetention {
            days: Some(1),
            entries: None,
        };
        assert_eq!(log.prunable_through(by_age, 1_000), Ok(None), "too young");
        assert_eq!(log.prunable_through(by_age, DAY_MS + 3_000), Ok(Some(3)));

        let before = log.verify();
        let sixth = log.get(6).unwrap().unwrap().hash.clone();
        assert_eq!(log.prune_through(6).unwrap().0, 6);
        assert_eq!((log.first_index(), log.len()), (7, 4));
        let after = log.verify();
        assert_eq!(after.first_broken, None, "{}", after.detail);
        assert_eq!(after.head_hash, before.head_hash);
        assert_eq!(after.anchor_hash, sixth);
        assert!(log.get(6).unwrap().is_none() && log.get(7).unwrap().is_some());
        // The next entry continues the chain as if nothing had gone.
        log.append(&Record::default(), None);
        assert_eq!(log.get(11).unwrap().unwrap().prev_hash, before.head_hash);
        assert_eq!(log.verify().first_broken, None);
        // Gone is gone: pruning again, or confirming an export that starts before, is refused.
        assert!(log.prune_through(6).is_err());
        let error = log.confirm_archive(1, 8, &hash).unwrap_err();
        assert!(error.contains("no longer holds"), "{error}");
    }

    #[test]
    fn a_confirmation_must_match_this_chain_and_leave_no_gap() {
        let mut log = salted_log();
        // Another range's hash, an altered one, one past the end.
        assert_eq!(log.find_export_start(6, &manifest_of(&log, 1, 5)), Ok(None));
        let error = log.confirm_archive(1, 6, &"ab".repeat(32)).unwrap_err();
        assert!(error.contains("does not match"), "{error}");
        assert!(log.confirm_archive(1, 11, &"ab".repeat(32)).is_err());
        // An export of 4..=6 would leave 1..=3 in no archive.
        let later = manifest_of(&log, 4, 6);
        assert_eq!(log.find_export_start(6, &later), Ok(None));
        let error = log.confirm_archive(4, 6, &later).unwrap_err();
        assert!(
            error.contains("entries 1..3 are in no confirmed export"),
            "{error}"
        );
        // In order, consecutive exports are each confirmed.
        log.confirm_archive(1, 3, &manifest_of(&log, 1, 3)).unwrap();
        assert_eq!(log.find_export_start(6, &later), Ok(Some(4)));
        log.confirm_archive(4, 6, &later).unwrap();
        assert_eq!(log.archived_through(), 6);
        let error = log
            .confirm_archive(1, 5, &manifest_of(&log, 1, 5))
            .unwrap_err();
        assert!(error.contains("already"), "{error}");
    }

    /// The salted log moved to a store of its own, as the raise to version 7 does.
    fn stored_log() -> (AuditLog, Arc<MemoryAuditStore>) {
        let store = Arc::new(MemoryAuditStore::default());
        let mut log = salted_log();
        log.attach(StoreHandle(store.clone()));
        log.move_to_store();
        (log, store)
    }

    #[test]
    fn a_stored_log_reads_verifies_archives_and_prunes_as_one_held() {
        let held = salted_log();
        let (mut log, _) = stored_log();
        assert!(log.is_stored() && log.failure().is_none());
        assert_eq!(log.entries(), held.entries());
        assert_eq!(log.verify(), held.verify());
        let replicated = serde_json::to_string(&log).unwrap();
        assert!(!replicated.contains("user:ada"), "{replicated}");
        assert_eq!(log.partition_point(|entry| entry.at_ms < 4_500), Ok(5));
        let hash = manifest_of(&log, 1, 6);
        assert_eq!(log.find_export_start(6, &hash), Ok(Some(1)));
        log.confirm_archive(1, 6, &hash).unwrap();
        let retention = AuditRetention {
            days: None,
            entries: Some(2),
        };
        assert_eq!(log.prunable_through(retention, u64::MAX), Ok(Some(6)));
        // A snapshot taken before the pruning, as a member restarting would load it.
        let snapshot = serde_json::to_string(&log).unwrap();
        log.prune_through(4).unwrap();
        assert_eq!(log.get(4), Ok(None), "no longer held");
        assert_eq!(log.range(1..7).unwrap().len(), 2);
        // Restarted from that snapshot, the member applies the pruning again: the entries it
        // reads are still in the store until a snapshot after the pruning is on disk.
        let mut replayed: AuditLog = serde_json::from_str(&snapshot).unwrap();
        replayed.attach(log.store().clone());
        replayed.prune_through(4).unwrap();
        assert_eq!(replayed.failure(), None);
        assert_eq!(replayed.verify(), log.verify());
        assert!(log.store().get(4).unwrap().is_some());
        log.drop_pruned().unwrap();
        assert_eq!(log.store().get(4).unwrap(), None);
        assert!(log.store().get(5).unwrap().is_some());
        log.append(&Record::default(), Some(&[1; 32]));
        log.redact(8, &[Field::Identity]).unwrap();
        assert!(log.get(8).unwrap().unwrap().identity.is_empty());
        let verification = log.verify();
        assert_eq!(verification.first_broken, None, "{}", verification.detail);
        assert_eq!(verification.entries, 7);
    }

    #[test]
    fn a_store_that_fails_or_loses_an_entry_is_found() {
        let (mut log, store) = stored_log();
        store.fail_writes(Some("disk full"));
        log.append(&Record::default(), Some(&[1; 32]));
        assert!(
            log.failure().unwrap().contains("disk full"),
            "{:?}",
            log.failure()
        );
        // A store missing an entry the head counts does not verify.
        let (log, store) = stored_log();
        store.remove_through(3).unwrap();
        let verification = log.verify();
        assert_eq!(
            verification.first_broken,
            Some(1),
            "{}",
            verification.detail
        );
    }

    #[test]
    fn a_redaction_in_the_cluster_keeps_the_chain_and_refuses_what_it_cannot() {
        let mut log = salted_log();
        log.redact(4, &[Field::Identity, Field::Reason]).unwrap();
        let entry = log.get(4).unwrap().unwrap();
        assert!(entry.identity.is_empty() && entry.reason.is_empty());
        assert_eq!(entry.readable_outcome(), "ok: [redacted]");
        assert_eq!(log.verify().first_broken, None);
        assert!(
            log.redact(11, &[Field::Identity])
                .unwrap_err()
                .contains("1..10")
        );
        let mut plain = sample_log();
        assert!(
            plain
                .redact(1, &[Field::Identity])
                .unwrap_err()
                .contains("cluster version 5")
        );
    }
}
