//! Finished changes and rollbacks past the audit's retention (cluster version 8): they leave the
//! replicated state for the archive, a store beside it on every member (the `archive` tree
//! next to the audit entries), so the state no longer grows with every deploy ever made.
//!
//! A record moves when the audit entries up to its end have been pruned (an export that covers
//! them was confirmed, and they are past retention): `apply()` moves it as part of the
//! `PruneAudit` command, so every member moves the same records at the same log index. What the
//! cluster still acts on stays: a service's latest change (the one a rollback would revert), a
//! change or rollback that has not ended, one a request waiting for approval or review names, one
//! a schema transaction still runs for, an incident someone is writing up (notes, not closed),
//! an incident whose webhook events are still being delivered, and the changes and rollbacks
//! these name. `apply()` never reads the archive: what it holds cannot change a decision.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::approvals::RequestStatus;
use super::schema::{SchemaOwner, SchemaTxnStatus};
use super::state::{ChangeRecord, ChangeStatus, IncidentRecord, RollbackRecord, State};

/// What the archive holds: a change, or a rollback with its incident's notes and analysis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ArchivedRecord {
    Change(Box<ArchivedChange>),
    Rollback(Box<ArchivedRollback>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArchivedChange {
    /// When it moved: the time of the command that pruned its audit entries.
    pub archived_at_ms: u64,
    pub change: ChangeRecord,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArchivedRollback {
    pub archived_at_ms: u64,
    pub rollback: RollbackRecord,
    /// Its incident's notes and root-cause analysis, if anyone wrote any.
    pub incident: Option<IncidentRecord>,
}

/// The two kinds of archived record, each numbered as in the state (`ch-<n>`, `rb-<n>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ArchiveKind {
    Change,
    Rollback,
}

impl ArchivedRecord {
    pub fn kind(&self) -> ArchiveKind {
        match self {
            Self::Change(_) => ArchiveKind::Change,
            Self::Rollback(_) => ArchiveKind::Rollback,
        }
    }

    pub fn number(&self) -> u64 {
        match self {
            Self::Change(archived) => archived.change.number,
            Self::Rollback(archived) => archived.rollback.number,
        }
    }
}

/// How many records the archive holds, counted by `apply()`: a snapshot sent to a member that
/// is behind must carry at least these (see `snapshot_codec::check_received`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ArchiveCounts {
    pub changes: u64,
    pub rollbacks: u64,
}

impl ArchiveCounts {
    pub fn is_empty(&self) -> bool {
        self.changes == 0 && self.rollbacks == 0
    }

    pub fn of(&self, kind: ArchiveKind) -> u64 {
        match kind {
            ArchiveKind::Change => self.changes,
            ArchiveKind::Rollback => self.rollbacks,
        }
    }
}

/// When a change last did anything: its deploy's end, or its hosts' last step.
fn change_ended_at_ms(change: &ChangeRecord) -> u64 {
    change
        .hosts
        .iter()
        .flat_map(|host| {
            [
                host.capture.finished_at_ms,
                host.activate.finished_at_ms,
                host.self_reverted.as_ref().map_or(0, |note| note.at_ms),
            ]
        })
        .chain([change.started_at_ms, change.deployed_at_ms])
        .max()
        .unwrap_or(0)
}

/// The records that may move, given that the audit entries up to `ended_by_ms` are pruned.
fn movable(state: &State, ended_by_ms: u64) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let mut kept_changes = BTreeSet::new();
    let mut kept_rollbacks = BTreeSet::new();
    // Each service's latest change: what a rollback of the service reverts.
    let mut latest = std::collections::BTreeMap::new();
    for change in state.changes.values() {
        latest.insert(change.service.as_str(), change.number);
    }
    kept_changes.extend(latest.values());
    for request in state.approval_requests.values() {
        let waiting = request.status == RequestStatus::Pending
            || (request.status == RequestStatus::BreakGlass && request.review.is_none());
        if waiting {
            kept_changes.extend(request.changes.iter().copied().chain([request.change]));
            kept_rollbacks.insert(request.rollback);
        }
    }
    for txn in state.schema_txns.values() {
        if txn.status == SchemaTxnStatus::Done {
            continue;
        }
        match txn.owner {
            SchemaOwner::Change { change, .. } => {
                kept_changes.insert(change);
            }
            SchemaOwner::Rollback { rollback, .. } => {
                kept_rollbacks.insert(rollback);
            }
            SchemaOwner::Drill { .. } => {}
        }
    }
    let mut changes: BTreeSet<u64> = state
        .changes
        .values()
        .filter(|change| {
            matches!(
                change.status,
                ChangeStatus::Deployed | ChangeStatus::Failed | ChangeStatus::RolledBack
            ) && change_ended_at_ms(change) <= ended_by_ms
                && !kept_changes.contains(&change.number)
        })
        .map(|change| change.number)
        .collect();
    let mut rollbacks: BTreeSet<u64> = state
        .rollbacks
        .values()
        .filter(|rollback| {
            let incident = state.incidents.get(&rollback.number);
            let being_written_up =
                incident.is_some_and(|noted| noted.closed_at_ms == 0 && !noted.notes.is_empty());
            let delivering =
                incident.is_some_and(|noted| noted.notices.iter().any(|notice| !notice.settled()));
            rollback.status.is_terminal()
                && rollback.finished_at_ms <= ended_by_ms
                && !being_written_up
                && !delivering
                && !kept_rollbacks.contains(&rollback.number)
        })
        .map(|rollback| rollback.number)
        .collect();
    // A rollback goes with the changes it reverted, and a change with the rollback that
    // reverted it: neither leaves while the other must stay.
    loop {
        let before = (changes.len(), rollbacks.len());
        rollbacks.retain(|number| {
            state.rollbacks[number]
                .changes
                .iter()
                .all(|change| changes.contains(change) || !state.changes.contains_key(change))
        });
        changes.retain(|number| {
            let rollback = state.changes[number].rollback;
            rollback == 0
                || rollbacks.contains(&rollback)
                || !state.rollbacks.contains_key(&rollback)
        });
        if (changes.len(), rollbacks.len()) == before {
            return (changes, rollbacks);
        }
    }
}

/// Moves to the archive the finished changes and rollbacks whose audit entries up to their end
/// were pruned (the last pruned entry's time is `ended_by_ms`), stamped `at_ms`. Returns how
/// many changes and rollbacks moved. A store that fails stops the member (see
/// [`super::AuditLog::failure`]) as a failed audit write does.
pub fn archive_finished(state: &mut State, ended_by_ms: u64, at_ms: u64) -> (u64, u64) {
    let (changes, rollbacks) = movable(state, ended_by_ms);
    for number in &changes {
        let Some(change) = state.changes.remove(number) else {
            continue;
        };
        state
            .audit
            .archive(&ArchivedRecord::Change(Box::new(ArchivedChange {
                archived_at_ms: at_ms,
                change,
            })));
        state.archived.changes += 1;
    }
    for number in &rollbacks {
        let Some(rollback) = state.rollbacks.remove(number) else {
            continue;
        };
        let incident = state.incidents.remove(number);
        state
            .audit
            .archive(&ArchivedRecord::Rollback(Box::new(ArchivedRollback {
                archived_at_ms: at_ms,
                rollback,
                incident,
            })));
        state.archived.rollbacks += 1;
    }
    (changes.len() as u64, rollbacks.len() as u64)
}

impl State {
    /// An archived change, if the archive holds it.
    pub fn archived_change(&self, number: u64) -> Result<Option<ArchivedChange>, String> {
        Ok(
            match self.audit.store().archived(ArchiveKind::Change, number)? {
                Some(ArchivedRecord::Change(archived)) => Some(*archived),
                _ => None,
            },
        )
    }

    /// An archived rollback, with its incident's record.
    pub fn archived_rollback(&self, number: u64) -> Result<Option<ArchivedRollback>, String> {
        Ok(
            match self.audit.store().archived(ArchiveKind::Rollback, number)? {
                Some(ArchivedRecord::Rollback(archived)) => Some(*archived),
                _ => None,
            },
        )
    }

    /// Archived records of `kind` numbered below `before`, newest first, at most `limit`.
    pub fn archived_before(
        &self,
        kind: ArchiveKind,
        before: u64,
        limit: usize,
    ) -> Result<Vec<ArchivedRecord>, String> {
        if self.archived.of(kind) == 0 {
            return Ok(Vec::new());
        }
        self.audit.store().archived_before(kind, before, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::{CommandKind, RollbackAction, Trigger};
    use crate::test_fleet::Fleet;

    /// Confirms the audit archived and prunes all of it: what ended by then may move.
    fn prune_all(fleet: &mut Fleet) {
        let through = fleet.confirm_archive_all();
        fleet.apply(CommandKind::PruneAudit { through });
    }

    /// A fleet of `web` with releases v1 to v4.
    fn web_fleet(fleet: Fleet) -> Fleet {
        let mut fleet = fleet.web();
        for (version, digit) in [("v3", 'c'), ("v4", 'd')] {
            fleet.apply(CommandKind::RegisterRelease {
                release: crate::test_fleet::release(version, digit),
            });
        }
        fleet
    }

    fn abort(fleet: &mut Fleet, rollback: u64) {
        fleet.apply(CommandKind::ControlRollback {
            rollback,
            action: RollbackAction::Abort,
            reason: "INC-7".into(),
        });
    }

    #[test]
    fn finished_records_move_once_pruned_and_what_the_cluster_acts_on_stays() {
        let mut fleet = web_fleet(Fleet::new());
        let first = fleet.deploy_web("v1");
        let second = fleet.deploy_web("v2");
        let latest = fleet.deploy_web("v3");
        let rollback = fleet.must_start_rollback(latest, Trigger::Manual);
        // Running: nothing about it moves, whatever the pruning.
        prune_all(&mut fleet);
        assert_eq!(
            fleet.state.archived,
            ArchiveCounts {
                changes: 2,
                rollbacks: 0
            }
        );
        assert!(!fleet.state.changes.contains_key(&first));
        assert!(!fleet.state.changes.contains_key(&second));
        let archived = fleet.state.archived_change(first).unwrap().unwrap();
        assert_eq!(archived.change.version, "v1");
        assert!(archived.archived_at_ms > 0);
        assert!(fleet.state.archived_change(latest).unwrap().is_none());

        // Ended, with notes being written: the incident and its change stay.
        abort(&mut fleet, rollback);
        fleet.apply(CommandKind::NoteIncident {
            incident: rollback,
            text: "looking at the canary's logs".into(),
        });
        let newer = fleet.deploy_web("v4");
        prune_all(&mut fleet);
        assert!(fleet.state.rollbacks.contains_key(&rollback));
        // The rollback still names it: the reverted change stays with it.
        assert!(fleet.state.changes.contains_key(&latest));

        // Closed: the rollback goes with its incident's record and the change it reverted; the
        // service's latest change stays.
        fleet.apply(CommandKind::CloseIncident {
            incident: rollback,
            rca_markdown: "# RCA".into(),
            action_items: vec!["canary longer".into()],
            lessons: vec![],
        });
        prune_all(&mut fleet);
        assert_eq!(
            fleet.state.archived,
            ArchiveCounts {
                changes: 3,
                rollbacks: 1
            }
        );
        assert!(!fleet.state.rollbacks.contains_key(&rollback));
        assert!(!fleet.state.incidents.contains_key(&rollback));
        assert_eq!(fleet.state.changes.keys().collect::<Vec<_>>(), [&newer]);
        let archived = fleet.state.archived_rollback(rollback).unwrap().unwrap();
        assert_eq!(archived.rollback.changes, [latest]);
        assert_eq!(
            archived.incident.unwrap().action_items,
            ["canary longer".to_string()]
        );
        let listed: Vec<u64> = fleet
            .state
            .archived_before(ArchiveKind::Change, u64::MAX, 10)
            .unwrap()
            .iter()
            .map(ArchivedRecord::number)
            .collect();
        assert_eq!(listed, [latest, second, first]);
        // The outcome says what moved; the pruning's audit entry records it.
        let pruning = fleet
            .state
            .audit
            .get(fleet.state.audit.next_index() - 1)
            .unwrap()
            .unwrap();
        assert!(
            pruning.outcome.contains("1 changes and 1 rollbacks"),
            "{}",
            pruning.outcome
        );
    }

    #[test]
    fn a_failing_archive_stops_the_member() {
        let store = std::sync::Arc::new(crate::state_machine::MemoryAuditStore::default());
        let mut fleet = Fleet::new();
        fleet
            .state
            .audit
            .attach(crate::state_machine::StoreHandle(store.clone()));
        let mut fleet = web_fleet(fleet);
        fleet.deploy_web("v1");
        fleet.deploy_web("v2");
        let through = fleet.confirm_archive_all();
        store.fail_writes(Some("disk full"));
        let _ = fleet.run(CommandKind::PruneAudit { through });
        // The archive's write failed first (the pruning's own entry is written after it).
        let failure = fleet.state.audit.failure().unwrap_or_default();
        assert!(
            failure.starts_with("archive record 1: disk full"),
            "{failure}"
        );
    }
}
