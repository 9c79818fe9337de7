//! The hash-chained audit log, as the replicated state holds it. How entries are hashed,
//! verified and redacted is in [`rewind_shared::audit`], shared with `rewindctl audit verify
//! --file`. Every member holds the same chain and can verify it.

use std::sync::Arc;

use rewind_shared::audit::{ChainCheck, Field, GENESIS_HASH, Record};
use serde::{Deserialize, Serialize};

pub use rewind_shared::audit::AuditEntry;

/// Entries are immutable once appended, so they are shared (`Arc`): copying the state for a
/// snapshot then costs a pointer per entry, not a copy of the whole history.
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
        }
    }
}

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
        let prev_hash = self
            .entries
            .last()
            .map_or(self.anchor_hash.as_str(), |last| last.hash.as_str());
        let index = self.next_index();
        let entry = match seed {
            Some(seed) => AuditEntry::salted(index, prev_hash, record, seed),
            None => AuditEntry::plain(index, prev_hash, record),
        };
        self.entries.push(Arc::new(entry));
    }

    /// The entries held, oldest first (the first is `first_index`).
    pub fn entries(&self) -> &[Arc<AuditEntry>] {
        &self.entries
    }

    /// Entries held from index `from` on (all held if `from` was pruned).
    pub fn from_index(&self, from: u64) -> &[Arc<AuditEntry>] {
        let skip = usize::try_from(from.saturating_sub(self.first_index)).unwrap_or(usize::MAX);
        &self.entries[skip.min(self.entries.len())..]
    }

    /// Entries held with indexes in `indexes` (those pruned are not).
    pub fn range(&self, indexes: std::ops::Range<u64>) -> &[Arc<AuditEntry>] {
        let held = self.from_index(indexes.start);
        let wanted = indexes
            .end
            .saturating_sub(indexes.start.max(self.first_index));
        &held[..held
            .len()
            .min(usize::try_from(wanted).unwrap_or(usize::MAX))]
    }

    pub fn get(&self, index: u64) -> Option<&Arc<AuditEntry>> {
        let position = usize::try_from(index.checked_sub(self.first_index)?).ok()?;
        self.entries.get(position)
    }

    /// The hash the entry at `index` links to, if the cluster still knows it.
    fn hash_before(&self, index: u64) -> Option<&str> {
        if index == self.first_index {
            return Some(&self.anchor_hash);
        }
        self.get(index.checked_sub(1)?)
            .map(|entry| entry.hash.as_str())
    }

    pub fn first_index(&self) -> u64 {
        self.first_index
    }

    /// The index the next entry will have.
    pub fn next_index(&self) -> u64 {
        self.first_index + self.entries.len() as u64
    }

    pub fn archived_through(&self) -> u64 {
        self.archived_through
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Where an export that ends at `through` with `manifest_hash` starts, if it is one of this
    /// chain that continues what is archived already: the leader finds it before proposing the
    /// confirmation, which `apply()` then checks at once. Scans the entries that could start it.
    pub fn find_export_start(&self, through: u64, manifest_hash: &str) -> Option<u64> {
        let last_hash = &self.get(through)?.hash;
        let latest_start = (self.archived_through + 1).min(through);
        (self.first_index..=latest_start).find(|&first| {
            self.hash_before(first).is_some_and(|anchor| {
                rewind_shared::audit::manifest_hash(first, through, anchor, last_hash)
                    == manifest_hash
            })
        })
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
        let (Some(anchor), Some(last_entry)) = (self.hash_before(first), self.get(through)) else {
            return Err(format!(
                "the export starts at entry {first}, which the cluster no longer holds (it \
                 starts at {}): confirm an export made since",
                self.first_index
            ));
        };
        let expected =
            rewind_shared::audit::manifest_hash(first, through, anchor, &last_entry.hash);
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
    pub fn prunable_through(&self, retention: AuditRetention, now_ms: u64) -> Option<u64> {
        if retention.is_off() {
            return None;
        }
        let last = self.next_index().saturating_sub(1);
        let mut through = None;
        for entry in &self.entries {
            let archived = entry.index <= self.archived_through;
            let old = retention.days.is_none_or(|days| {
                entry.at_ms.saturating_add(days.saturating_mul(DAY_MS)) <= now_ms
            });
            let outside_newest = retention
                .entries
                .is_none_or(|keep| entry.index.saturating_add(keep) <= last);
            if !(archived && old && outside_newest) {
                break;
            }
            through = Some(entry.index);
        }
        through
    }

    /// Drops the entries up to `through`, all confirmed archived; the chain goes on from the
    /// last one's hash. Returns how many went.
    pub fn prune_through(&mut self, through: u64) -> Result<u64, String> {
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
        let last_pruned = self.get(through).map(|entry| entry.hash.clone());
        self.entries.drain(..count as usize);
        self.anchor_hash = last_pruned.unwrap_or_default();
        self.first_index = through + 1;
        Ok(count)
    }

    /// Erases `fields` of entry `index` (salted entries only): the chain still verifies.
    pub fn redact(&mut self, index: u64, fields: &[Field]) -> Result<(), String> {
        let first_index = self.first_index;
        let position = index
            .checked_sub(first_index)
            .and_then(|position| usize::try_from(position).ok())
            .filter(|&position| position < self.entries.len())
            .ok_or_else(|| {
                format!(
                    "the cluster holds audit entries {first_index}..{}, not {index}",
                    self.next_index().saturating_sub(1)
                )
            })?;
        let entry = Arc::make_mut(&mut self.entries[position]);
        for field in fields {
            entry.redact(*field)?;
        }
        Ok(())
    }

    /// Recomputes the chain held and reports the first entry that does not match.
    pub fn verify(&self) -> AuditVerification {
        let mut check = ChainCheck::continuing(self.first_index, &self.anchor_hash);
        let mut broken = None;
        for entry in &self.entries {
            if let Err(detail) = check.next(entry) {
                broken = Some((check.next_index(), detail));
                break;
            }
        }
        let held = self.entries.len() as u64;
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
        }
    }

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
        let anchor = log.hash_before(first).unwrap().to_string();
        rewind_shared::audit::manifest_hash(
            first,
            through,
            &anchor,
            &log.get(through).unwrap().hash,
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
        assert_eq!(log.prunable_through(retention, u64::MAX), None);
        let error = log.prune_through(3).unwrap_err();
        assert!(error.contains("nothing unexported is dropped"), "{error}");

        // An export of 1..=6 confirmed: found from its hash, then the first four may go (the
        // newest two of ten stay anyway; 5 and 6 would too if more were kept).
        let hash = manifest_of(&log, 1, 6);
        assert_eq!(log.find_export_start(6, &hash), Some(1));
        log.confirm_archive(1, 6, &hash).unwrap();
        assert_eq!(log.prunable_through(retention, u64::MAX), Some(6));
        let keep_five = AuditRetention {
            entries: Some(5),
            ..retention
        };
        assert_eq!(log.prunable_through(keep_five, u64::MAX), Some(5));
        let by_age = AuditRetention {
            days: Some(1),
            entries: None,
        };
        assert_eq!(log.prunable_through(by_age, 1_000), None, "too young");
        assert_eq!(log.prunable_through(by_age, DAY_MS + 3_000), Some(3));

        let before = log.verify();
        let sixth = log.get(6).unwrap().hash.clone();
        assert_eq!(log.prune_through(6).unwrap(), 6);
        assert_eq!((log.first_index(), log.len()), (7, 4));
        let after = log.verify();
        assert_eq!(after.first_broken, None, "{}", after.detail);
        assert_eq!(after.head_hash, before.head_hash);
        assert_eq!(after.anchor_hash, sixth);
        assert!(log.get(6).is_none() && log.get(7).is_some());
        // The next entry continues the chain as if nothing had gone.
        log.append(&Record::default(), None);
        assert_eq!(log.get(11).unwrap().prev_hash, before.head_hash);
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
        assert_eq!(log.find_export_start(6, &manifest_of(&log, 1, 5)), None);
        let error = log.confirm_archive(1, 6, &"ab".repeat(32)).unwrap_err();
        assert!(error.contains("does not match"), "{error}");
        assert!(log.confirm_archive(1, 11, &"ab".repeat(32)).is_err());
        // An export of 4..=6 would leave 1..=3 in no archive.
        let later = manifest_of(&log, 4, 6);
        assert_eq!(log.find_export_start(6, &later), None);
        let error = log.confirm_archive(4, 6, &later).unwrap_err();
        assert!(
            error.contains("entries 1..3 are in no confirmed export"),
            "{error}"
        );
        // In order, consecutive exports are each confirmed.
        log.confirm_archive(1, 3, &manifest_of(&log, 1, 3)).unwrap();
        assert_eq!(log.find_export_start(6, &later), Some(4));
        log.confirm_archive(4, 6, &later).unwrap();
        assert_eq!(log.archived_through(), 6);
        let error = log
            .confirm_archive(1, 5, &manifest_of(&log, 1, 5))
            .unwrap_err();
        assert!(error.contains("already"), "{error}");
    }

    #[test]
    fn a_redaction_in_the_cluster_keeps_the_chain_and_refuses_what_it_cannot() {
        let mut log = salted_log();
        log.redact(4, &[Field::Identity, Field::Reason]).unwrap();
        let entry = log.get(4).unwrap();
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
