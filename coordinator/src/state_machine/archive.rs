//! Finished changes and rollbacks past the audit's retention (cluster version 8): they leave the
//! replicated state for the archive, a store beside it on every member (the `archive` tree
//! next to the audit entries), so the state no longer grows with every deploy ever made.
//!
//! A record moves when the audit entries up to its end have been pruned (an export that covers
//! them was confirmed, and they are past retention): `apply()` moves it as part of the
//! `PruneAudit` command, so every member moves the same records at the same log index. What the
//! cluster still acts on stays: a service's newest change overall, in each environment, on each
//! host, and the newest deployed or rolled back (what rollbacks, alerts and the version it runs
//! are read from); a change or rollback that has not ended, or with a step still running; one a
//! request waiting for approval or review names, one a schema transaction or a drill still runs
//! for; an incident someone is writing up (notes, not closed), or whose webhook events are still
//! being delivered; and the changes and rollbacks these name. `apply()` never reads the
//! archive: what it holds cannot change what it records. The trigger throttles, judged on the
//! leader, count archived rollbacks too ([`State::rollbacks_started_since`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::approvals::RequestStatus;
use super::schema::{DrillStatus, SchemaOwner, SchemaTxnStatus};
use super::state::{
    ChangeRecord, ChangeStatus, IncidentRecord, NoticeEvent, RollbackRecord, RollbackStatus, State,
    StepStatus,
};

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

/// How long an incident system's events keep their rollback in the state after its last
/// delivery attempt (or its end, for the resolve a success sends): past the engine's retries
/// (20 attempts backing off to an hour, about 11 hours), so a webhook switched off never keeps
/// one for good.
const NOTICE_HOLD_MS: u64 = 12 * 60 * 60 * 1000;

/// The records that may move at `at_ms`, given that the audit entries up to `ended_by_ms` are
/// pruned.
fn movable(state: &State, ended_by_ms: u64, at_ms: u64) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let mut kept_changes = BTreeSet::new();
    let mut kept_rollbacks = BTreeSet::new();
    // A service's newest change by every way the cluster looks one up: per service, per
    // environment (what an alert there rolls back), per host (a revert must never undo a newer
    // change on the same host), and the newest deployed or rolled back (the version it runs).
    let mut newest: BTreeMap<(Newest, &str, String), u64> = BTreeMap::new();
    for change in state.changes.values() {
        let service = change.service.as_str();
        let mut latest = |by: Newest, key: &str| {
            newest.insert((by, service, key.to_string()), change.number);
        };
        latest(Newest::OfService, "");
        latest(
            Newest::InEnvironment,
            &crate::plan::environment_of(state, change),
        );
        for host in &change.hosts {
            latest(Newest::OnHost, &host.host_id);
        }
        if matches!(
            change.status,
            ChangeStatus::Deployed | ChangeStatus::RolledBack
        ) {
            latest(Newest::Running, "");
        }
        // A step still running: the engine times it out.
        let running = change.hosts.iter().any(|host| {
            [&host.capture, &host.activate]
                .iter()
                .any(|step| step.status == StepStatus::Running)
        });
        if running {
            kept_changes.insert(change.number);
        }
    }
    kept_changes.extend(newest.values());
    for drill in state.drills.values() {
        if drill.status == DrillStatus::Running {
            kept_changes.insert(drill.change);
        }
    }
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
            // Told to an incident system, which has yet to hear all it will: an event still
            // being delivered, or the resolve a success sends.
            let recent = |since_ms: u64| since_ms.saturating_add(NOTICE_HOLD_MS) >= at_ms;
            let delivering = incident.is_some_and(|noted| {
                let retrying = noted
                    .notices
                    .iter()
                    .any(|notice| !notice.settled() && recent(notice.last_attempt_at_ms));
                let resolve_due = rollback.status == RollbackStatus::Succeeded
                    && !noted.notices.is_empty()
                    && !noted
                        .notices
                        .iter()
                        .any(|notice| notice.event == NoticeEvent::Resolve)
                    && recent(rollback.finished_at_ms);
                retrying || resolve_due
            });
            rollback.status.is_terminal()
                && rollback.finished_at_ms <= ended_by_ms
                && !being_written_up
                && !delivering
                && !kept_rollbacks.contains(&rollback.number)
        })
        .map(|rollback| rollback.number)
        .collect();
    // A rollback goes with the changes it reverted, and a change with every rollback that names
    // it: neither leaves while the other must stay.
    loop {
        let before = (changes.len(), rollbacks.len());
        rollbacks.retain(|number| {
            state.rollbacks[number]
                .changes
                .iter()
                .all(|change| changes.contains(change) || !state.changes.contains_key(change))
        });
        let named_by_staying: BTreeSet<u64> = state
            .rollbacks
            .values()
            .filter(|rollback| !rollbacks.contains(&rollback.number))
            .flat_map(|rollback| rollback.changes.iter().copied())
            .collect();
        changes.retain(|number| {
            let rollback = state.changes[number].rollback;
            !named_by_staying.contains(number)
                && (rollback == 0
                    || rollbacks.contains(&rollback)
                    || !state.rollbacks.contains_key(&rollback))
        });
        if (changes.len(), rollbacks.len()) == before {
            return (changes, rollbacks);
        }
    }
}

/// The ways a service's newest change is looked up (see `movable`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Newest {
    OfService,
    InEnvironment,
    OnHost,
    Running,
}

/// Moves to the archive the finished changes and rollbacks whose audit entries up to their end
/// were pruned (the last pruned entry's time is `ended_by_ms`), stamped `at_ms`. Returns how
/// many changes and rollbacks moved. A store that fails stops the member (see
/// [`super::AuditLog::failure`]) as a failed audit write does.
pub fn archive_finished(state: &mut State, ended_by_ms: u64, at_ms: u64) -> (u64, u64) {
    let (changes, rollbacks) = movable(state, ended_by_ms, at_ms);
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

/// What a digest of the archive needs of a state, copied so that the archive is read off the
/// state's lock.
pub struct ArchiveSnapshot {
    store: super::StoreHandle,
    counts: ArchiveCounts,
    held_changes: BTreeSet<u64>,
    held_rollbacks: BTreeSet<u64>,
}

impl ArchiveSnapshot {
    /// sha256 over the archived records (changes then rollbacks, newest first, as stored) that
    /// the state counts: records a member holds in its state too (archived after the snapshot
    /// bundle it installed, before it applied the log after it) are left out. Empty while none
    /// are archived, as on members of earlier releases.
    pub fn digest(&self) -> Result<String, String> {
        if self.counts.is_empty() {
            return Ok(String::new());
        }
        let mut records = Vec::new();
        for (kind, held) in [
            (ArchiveKind::Change, &self.held_changes),
            (ArchiveKind::Rollback, &self.held_rollbacks),
        ] {
            records.extend(
                self.store
                    .archived_before(kind, u64::MAX, usize::MAX)?
                    .into_iter()
                    .filter(|record| !held.contains(&record.number())),
            );
        }
        let bytes = serde_json::to_vec(&records)
            .map_err(|error| format!("encode the archive for its digest: {error}"))?;
        Ok(rewind_shared::digest::sha256_digest(&bytes))
    }
}

/// How much earlier than a newer rollback an older one may have started (a leader's clock
/// stepping back): archived rollbacks are read newest first until one started this long before
/// the time asked for.
const START_SLACK_MS: u64 = 60 * 60 * 1000;

/// Archived records read from the store at a time, when scanning.
const SCAN_BATCH: usize = 256;

impl State {
    /// Whether the state (not the archive) holds the change or rollback `number`.
    pub fn holds(&self, kind: ArchiveKind, number: u64) -> bool {
        match kind {
            ArchiveKind::Change => self.changes.contains_key(&number),
            ArchiveKind::Rollback => self.rollbacks.contains_key(&number),
        }
    }

    /// What [`ArchiveSnapshot::digest`] reads, copied.
    pub fn archive_snapshot(&self) -> ArchiveSnapshot {
        ArchiveSnapshot {
            store: self.audit.store().clone(),
            counts: self.archived.clone(),
            held_changes: self.changes.keys().copied().collect(),
            held_rollbacks: self.rollbacks.keys().copied().collect(),
        }
    }

    /// The rollbacks started at or after `since_ms`: the state's, and (cluster version 8) the
    /// archived ones it does not hold. For the trigger throttles, judged on the leader.
    pub fn rollbacks_started_since(
        &self,
        since_ms: u64,
    ) -> Result<Vec<Cow<'_, RollbackRecord>>, String> {
        let mut found: Vec<Cow<'_, RollbackRecord>> = self
            .rollbacks
            .values()
            .filter(|rollback| rollback.started_at_ms >= since_ms)
            .map(Cow::Borrowed)
            .collect();
        let mut before = u64::MAX;
        loop {
            let page = self.archived_before(ArchiveKind::Rollback, before, SCAN_BATCH)?;
            let Some(last) = page.last() else {
                return Ok(found);
            };
            before = last.number();
            for record in page {
                let ArchivedRecord::Rollback(archived) = record else {
                    continue;
                };
                let rollback = archived.rollback;
                if rollback.started_at_ms.saturating_add(START_SLACK_MS) < since_ms {
                    return Ok(found);
                }
                if rollback.started_at_ms >= since_ms
                    && !self.rollbacks.contains_key(&rollback.number)
                {
                    found.push(Cow::Owned(rollback));
                }
            }
        }
    }

    /// A change from the state, or else from the archive.
    pub fn change_or_archived(&self, number: u64) -> Result<Option<Cow<'_, ChangeRecord>>, String> {
        if let Some(change) = self.changes.get(&number) {
            return Ok(Some(Cow::Borrowed(change)));
        }
        Ok(self
            .archived_change(number)?
            .map(|archived| Cow::Owned(archived.change)))
    }

    /// An archived change, if the archive holds it (the store is not read while it holds none).
    pub fn archived_change(&self, number: u64) -> Result<Option<ArchivedChange>, String> {
        if self.archived.changes == 0 {
            return Ok(None);
        }
        Ok(
            match self.audit.store().archived(ArchiveKind::Change, number)? {
                Some(ArchivedRecord::Change(archived)) => Some(*archived),
                _ => None,
            },
        )
    }

    /// An archived rollback, with its incident's record.
    pub fn archived_rollback(&self, number: u64) -> Result<Option<ArchivedRollback>, String> {
        if self.archived.rollbacks == 0 {
            return Ok(None);
        }
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
    use crate::state_machine::{CommandKind, Outcome, RollbackAction, StepTarget, Trigger};
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
    fn what_decisions_read_stays_the_newest_deployed_and_changes_a_staying_rollback_names() {
        let mut fleet = web_fleet(Fleet::new());
        let first = fleet.deploy_web("v1");
        let deployed = fleet.deploy_web("v2");
        // v3 fails its capture on web-1: the newest change, but web runs v2.
        let Outcome::Change(failed) = fleet.apply(crate::test_fleet::start_change("v3")) else {
            panic!("a change")
        };
        fleet.finish(
            StepTarget::Capture {
                change: failed,
                host_id: "web-1".into(),
            },
            false,
        );
        assert_eq!(fleet.state.changes[&failed].status, ChangeStatus::Failed);
        prune_all(&mut fleet);
        assert!(!fleet.state.changes.contains_key(&first));
        assert!(
            fleet.state.changes.contains_key(&deployed),
            "the version web runs"
        );
        assert!(fleet.state.changes.contains_key(&failed));
        assert_eq!(
            crate::state_machine::current_version(&fleet.state, "web"),
            "v2"
        );

        // v4 reverted twice: an aborted rollback someone is writing up, then another. The
        // change (whose `rollback` names only the second) stays with the first, and so does the
        // second, which names it.
        let reverted = fleet.deploy_web("v4");
        let written_up = fleet.must_start_rollback(reverted, Trigger::Manual);
        abort(&mut fleet, written_up);
        fleet.apply(CommandKind::NoteIncident {
            incident: written_up,
            text: "why did the canary pass?".into(),
        });
        let again = fleet.must_start_rollback(reverted, Trigger::Manual);
        abort(&mut fleet, again);
        assert_eq!(fleet.state.changes[&reverted].rollback, again);
        fleet.deploy_web("v1");
        prune_all(&mut fleet);
        for number in [written_up, again] {
            assert!(fleet.state.rollbacks.contains_key(&number), "rb-{number}");
        }
        assert!(fleet.state.changes.contains_key(&reverted));

        // The throttles still count archived rollbacks, within their window.
        fleet.apply(CommandKind::CloseIncident {
            incident: written_up,
            rca_markdown: "# RCA".into(),
            action_items: vec![],
            lessons: vec![],
        });
        prune_all(&mut fleet);
        assert!(!fleet.state.rollbacks.contains_key(&written_up));
        let started = fleet
            .state
            .archived_rollback(written_up)
            .unwrap()
            .unwrap()
            .rollback
            .started_at_ms;
        let counted = |since_ms: u64| -> Vec<u64> {
            let mut numbers: Vec<u64> = fleet
                .state
                .rollbacks_started_since(since_ms)
                .unwrap()
                .iter()
                .map(|rollback| rollback.number)
                .collect();
            numbers.sort();
            numbers
        };
        assert_eq!(counted(started), [written_up, again]);
        assert_eq!(counted(started + 1), [again]);
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
