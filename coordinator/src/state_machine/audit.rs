//! The hash-chained audit log.
//!
//! Each entry's hash is sha256 over the previous entry's hash and this entry's fields, so
//! changing, removing or reordering any entry breaks every hash after it. The log is part of the
//! replicated state: every member holds the same chain and can verify it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev_hash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// 1-based position in the chain.
    pub index: u64,
    pub at_ms: u64,
    pub identity: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditEntry {
    fn compute_hash(&self) -> String {
        let mut hasher = Sha256::new();
        // Length-prefixed fields: no two different entries can produce the same byte stream.
        for field in [
            self.prev_hash.as_str(),
            &self.index.to_string(),
            &self.at_ms.to_string(),
            &self.identity,
            &self.action,
            &self.target,
            &self.outcome,
        ] {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field.as_bytes());
        }
        hex::encode(hasher.finalize())
    }
}

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
    pub fn append(
        &mut self,
        at_ms: u64,
        identity: &str,
        action: &str,
        target: &str,
        outcome: &str,
    ) {
        let prev_hash = self
            .entries
            .last()
            .map_or_else(|| GENESIS_HASH.to_string(), |last| last.hash.clone());
        let mut entry = AuditEntry {
            index: self.entries.len() as u64 + 1,
            at_ms,
            identity: identity.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            outcome: outcome.to_string(),
            prev_hash,
            hash: String::new(),
        };
        entry.hash = entry.compute_hash();
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
        let mut expected_prev = GENESIS_HASH.to_string();
        for (position, entry) in self.entries.iter().enumerate() {
            let expected_index = position as u64 + 1;
            let problem = if entry.index != expected_index {
                Some(format!(
                    "entry at position {expected_index} claims index {}",
                    entry.index
                ))
            } else if entry.prev_hash != expected_prev {
                Some(format!(
                    "entry {expected_index} does not link to the hash of the entry before it"
                ))
            } else if entry.hash != entry.compute_hash() {
                Some(format!(
                    "entry {expected_index} ({}) does not match its hash: it was altered",
                    entry.action
                ))
            } else {
                None
            };
            if let Some(detail) = problem {
                return AuditVerification {
                    entries: self.entries.len() as u64,
                    first_broken: Some(expected_index),
                    detail,
                    head_hash: String::new(),
                };
            }
            expected_prev = entry.hash.clone();
        }
        AuditVerification {
            entries: self.entries.len() as u64,
            first_broken: None,
            detail: format!("{} entries, chain intact", self.entries.len()),
            head_hash: expected_prev,
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
        for index in 0..5 {
            log.append(
                1_000 + index,
                "operator",
                "change.start",
                &format!("ch-{index}"),
                "ok",
            );
        }
        log
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let verification = sample_log().verify();
        assert_eq!(verification.first_broken, None);
        assert_eq!(verification.entries, 5);
        assert_eq!(verification.head_hash.len(), 64);
    }

    #[test]
    fn tampering_with_any_field_of_any_entry_is_found_at_that_entry() {
        let tamperings: [fn(&mut AuditEntry); 5] = [
            |entry| entry.identity = "mallory".into(),
            |entry| entry.outcome = "rejected".into(),
            |entry| entry.at_ms += 1,
            |entry| entry.target.push('x'),
            |entry| entry.action = "rollback.abort".into(),
        ];
        for position in 0..5 {
            for tamper in tamperings {
                let mut log = sample_log();
                tamper(Arc::make_mut(&mut log.entries_mut()[position]));
                assert_eq!(log.verify().first_broken, Some(position as u64 + 1));
            }
        }
    }

    #[test]
    fn removing_or_reordering_entries_is_found() {
        let mut removed = sample_log();
        removed.entries_mut().remove(2);
        assert_eq!(removed.verify().first_broken, Some(3));

        let mut swapped = sample_log();
        swapped.entries_mut().swap(1, 3);
        assert_eq!(swapped.verify().first_broken, Some(2));

        // Rehashing a forged entry does not help: the next entry's link breaks.
        let mut forged = sample_log();
        Arc::make_mut(&mut forged.entries_mut()[1]).outcome = "forged".into();
        let rehashed = forged.entries()[1].compute_hash();
        Arc::make_mut(&mut forged.entries_mut()[1]).hash = rehashed;
        assert_eq!(forged.verify().first_broken, Some(3));
    }
}
