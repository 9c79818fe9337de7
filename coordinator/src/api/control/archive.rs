//! Reading the archive (cluster version 8): changes and rollbacks that left the state once
//! their audit entries were pruned. Lists page through it with `--archived`; a change, rollback
//! or incident asked for by id is found there when the state no longer holds it, read only, and
//! allowed to whoever may see its changes (`targets` looks in the archive too).

use rewind_proto::v1 as pb;
use tonic::Status;

use super::audit::store_unreadable;
use crate::api::convert;
use crate::state_machine::archive::{
    ArchiveKind, ArchivedChange, ArchivedRecord, ArchivedRollback,
};
use crate::state_machine::*;

/// Records read from the store at a time while scanning.
const ARCHIVE_READ_BATCH: usize = 256;
/// Most archived records one page (or runbook) reads under the state's lock: a page that
/// reaches it ends early, with a page token to go on from.
pub(super) const MAX_ARCHIVE_SCAN: usize = 10_000;

/// What a scan of the archive kept, newest first with its numbers, and where to go on from
/// (None: the archive below was read to its end).
pub(super) struct Scanned<T> {
    pub items: Vec<(u64, T)>,
    pub resume: Option<u64>,
}

/// Scans archived records of `kind` numbered below `before`, newest first, until `want` were
/// kept, [`MAX_ARCHIVE_SCAN`] read or none are left. Skips what the state still holds: a member
/// that installed a snapshot bundle holds records archived after the snapshot in both until it
/// applies the log after it.
pub(super) fn scan<T>(
    state: &State,
    kind: ArchiveKind,
    before: u64,
    want: usize,
    mut keep: impl FnMut(ArchivedRecord) -> Result<Option<T>, Status>,
) -> Result<Scanned<T>, Status> {
    let mut items = Vec::new();
    let mut cursor = before;
    let mut read = 0;
    loop {
        let page = state
            .archived_before(kind, cursor, ARCHIVE_READ_BATCH)
            .map_err(store_unreadable)?;
        if page.is_empty() {
            return Ok(Scanned {
                items,
                resume: None,
            });
        }
        for record in page {
            let number = record.number();
            cursor = number;
            read += 1;
            if !state.holds(kind, number)
                && let Some(item) = keep(record)?
            {
                items.push((number, item));
            }
            if items.len() >= want || read >= MAX_ARCHIVE_SCAN {
                return Ok(Scanned {
                    items,
                    resume: Some(number),
                });
            }
        }
    }
}

/// One page of a scan asked for `limit + 1`: at most `limit` items, and the token of the next
/// page (`<prefix>-<n>`, empty when there is none).
pub(super) fn page<T>(scanned: Scanned<T>, limit: usize, prefix: &str) -> (Vec<T>, String) {
    let mut items = scanned.items;
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|(number, _)| *number)
    } else {
        scanned.resume
    };
    let token = next.map_or_else(String::new, |number| format!("{prefix}-{number}"));
    (items.into_iter().map(|(_, item)| item).collect(), token)
}

/// Refuses to act on a change or rollback that the archive holds and the state does not:
/// archived records are read only. An archive that cannot be read is an internal error.
pub(in crate::api) fn refuse_archived(
    state: &State,
    kind: ArchiveKind,
    number: u64,
) -> Result<(), Status> {
    let (archived, id, noun) = match kind {
        ArchiveKind::Change => (
            change(state, number)?.is_some(),
            change_id(number),
            "change",
        ),
        ArchiveKind::Rollback => (
            rollback(state, number)?.is_some(),
            rollback_id(number),
            "rollback",
        ),
    };
    if archived {
        return Err(Status::failed_precondition(format!(
            "{id} is archived: it ended before the audit retention and left the cluster's \
             state, so it is read only (rewindctl {noun} show {id} reads it)"
        )));
    }
    Ok(())
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

pub(super) fn change_view(archived: &ArchivedChange) -> pb::Change {
    pb::Change {
        archived_at_ms: archived.archived_at_ms,
        ..convert::change(&archived.change)
    }
}

/// An archived rollback with the page of its steps from `from`, at most `page_size` of them.
pub(super) fn rollback_view(
    state: &State,
    archived: &ArchivedRollback,
    from: usize,
    page_size: usize,
) -> pb::Rollback {
    pb::Rollback {
        archived_at_ms: archived.archived_at_ms,
        ..convert::rollback_page(state, &archived.rollback, from, page_size)
    }
}
