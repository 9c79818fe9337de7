//! Reading the archive (cluster version 8): changes and rollbacks that left the state once
//! their audit entries were pruned. Lists page through it with `--archived`; a change, rollback
//! or incident asked for by id is found there when the state no longer holds it, read only, and
//! allowed to whoever may see it as it was.

use rewind_proto::v1 as pb;
use tonic::Status;

use super::audit::store_unreadable;
use crate::access::Target;
use crate::api::{convert, targets};
use crate::state_machine::archive::{
    ArchiveKind, ArchivedChange, ArchivedRecord, ArchivedRollback,
};
use crate::state_machine::*;

/// Records read from the store at a time while paging.
const ARCHIVE_READ_BATCH: usize = 256;

/// Archived records of `kind` numbered below `before`, newest first, read in batches.
pub(super) fn newest_first(
    state: &State,
    kind: ArchiveKind,
    before: u64,
) -> impl Iterator<Item = Result<ArchivedRecord, Status>> + '_ {
    let mut cursor = before;
    let mut batch = std::collections::VecDeque::new();
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed {
            return None;
        }
        if batch.is_empty() && cursor > 1 {
            match state.archived_before(kind, cursor, ARCHIVE_READ_BATCH) {
                Ok(records) => {
                    cursor = records.last().map_or(0, ArchivedRecord::number);
                    batch.extend(records);
                }
                Err(error) => {
                    failed = true;
                    return Some(Err(store_unreadable(error)));
                }
            }
        }
        batch.pop_front().map(Ok)
    })
}

/// A change the archive holds, if the state does not.
pub(super) fn change(state: &State, number: u64) -> Result<Option<ArchivedChange>, Status> {
    if state.changes.contains_key(&number) {
        return Ok(None);
    }
    state.archived_change(number).map_err(store_unreadable)
}

/// A rollback the archive holds, if the state does not.
pub(super) fn rollback(state: &State, number: u64) -> Result<Option<ArchivedRollback>, Status> {
    if state.rollbacks.contains_key(&number) {
        return Ok(None);
    }
    state.archived_rollback(number).map_err(store_unreadable)
}

/// Who may see an archived change: as for the change when it was in the state.
pub(super) fn change_targets(state: &State, record: &ChangeRecord) -> Vec<Target> {
    targets::of_change(state, record)
}

/// Who may see an archived rollback: as for each change it reverted, in the state or archived.
pub(super) fn rollback_targets(
    state: &State,
    record: &RollbackRecord,
) -> Result<Vec<Target>, Status> {
    let mut found = Vec::new();
    for &number in &record.changes {
        match state.changes.get(&number) {
            Some(change) => found.extend(targets::of_change(state, change)),
            None => {
                if let Some(archived) = state.archived_change(number).map_err(store_unreadable)? {
                    found.extend(targets::of_change(state, &archived.change));
                }
            }
        }
    }
    Ok(found)
}

pub(super) fn change_view(archived: &ArchivedChange) -> pb::Change {
    pb::Change {
        archived_at_ms: archived.archived_at_ms,
        ..convert::change(&archived.change)
    }
}

pub(super) fn rollback_view(state: &State, archived: &ArchivedRollback) -> pb::Rollback {
    pb::Rollback {
        archived_at_ms: archived.archived_at_ms,
        ..convert::rollback(state, &archived.rollback)
    }
}
