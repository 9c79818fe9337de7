//! The hash-chained audit log, as the replicated state holds it. How entries are hashed,
//! verified and redacted is in [`rewind_shared::audit`], shared with `rewindctl audit verify
//! --file`. Every member holds the same chain and can verify it.

use std::sync::Arc;

use rewind_shared::audit::{ChainCheck, GENESIS_HASH, Record};
use serde::{Deserialize, Serialize};

pub use rewind_shared::audit::AuditEntry;

/// Entries are immutable once appended, so they are shared (`Arc`): copying the state for a
/// snapshot then costs a pointer per entry, not a copy of the whole history. Serialised as the
/// plain list of entries.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditLog {
    entries: Vec<Arc<AuditEntry>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditVerification {
    pub entries: u64,
    /// First entry whose hash or link does not match, if any.
    pub first_broken: Option<u64>,
    pub detail: String,
    pub head_hash: String,
}

impl AuditLog {
    /// Links `record` into the chain: salted (redactable) when the proposer chose a seed for
    /// it, plain as before cluster version 5 otherwise.
    pub fn append(&mut self, record: &Record<'_>, seed: Option<&[u8]>) {
        let prev_hash = self
            .entries
            .last()
            .map_or(GENESIS_HASH, |last| last.hash.as_str());
        let index = self.entries.len() as u64 + 1;
        let entry = match seed {
            Some(seed) => AuditEntry::salted(index, prev_hash, record, seed),
            None => AuditEntry::plain(index, prev_hash, record),
        };
        self.entries.push(Arc::new(entry));
    }

    pub fn entries(&self) -> &[Arc<AuditEntry>] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Recomputes the whole chain and reports the first entry that does not match.
    pub fn verify(&self) -> AuditVerification {
        let mut check = ChainCheck::from_genesis();
        for entry in &self.entries {
            if let Err(detail) = check.next(entry) {
                return AuditVerification {
                    entries: self.entries.len() as u64,
                    first_broken: Some(check.next_index()),
                    detail,
                    head_hash: String::new(),
                };
            }
        }
        AuditVerification {
            entries: self.entries.len() as u64,
            first_broken: None,
            detail: format!("{} entries, chain intact", self.entries.len()),
            head_hash: check.head_hash().to_string(),
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
}
