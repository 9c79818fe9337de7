//! Offline self-revert: when no coordinator has been reachable for a while and a service's
//! probes keep failing, a host whose config allows it reverts that service's latest change on
//! its own, then reports what it did at its next session (the coordinator audits it).
//!
//! ```toml
//! [service.self-revert]
//! failing-for-s = 60     # every report in this window had a failing probe of the service
//! offline-for-s = 120    # and no coordinator session for this long (default: failing-for-s)
//! ```
//!
//! What it reverts to is the **last known good** state: the snapshot the latest change captured
//! on this host before activating, provided every probe passed when it was captured. It acts at
//! most once per change (a self-revert closes the change on this host, like a rollback's
//! restore, so a delayed activation of it is refused), never for a change a rollback already
//! restored here, and it runs the default steps through the same journaled executor as
//! coordinator steps: drain, restore, restart, undrain.

use std::collections::HashMap;
use std::time::Duration;

use rewind_proto::v1::{self as pb, StepCommand, step_command::Action};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::AgentError;
use crate::config::ServiceConfig;
use crate::steps::Executor;

/// Fewest consecutive failing reports that can count as a failing window.
const MIN_FAILING_REPORTS: u32 = 3;
/// Longest evidence kept in a record.
const MAX_EVIDENCE_BYTES: usize = 1024;

#[derive(Clone, Debug, PartialEq)]
pub struct SelfRevertPolicy {
    pub failing_for: Duration,
    pub offline_for: Duration,
}

/// What a self-revert did, kept in the store until a coordinator has recorded it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelfRevertRecord {
    pub id: String,
    pub service: String,
    pub change_id: String,
    pub snapshot_id: String,
    pub at_ms: u64,
    pub offline_since_ms: u64,
    pub ok: bool,
    /// The steps and their outcomes.
    pub detail: String,
    /// Why: the failing probes and for how long.
    pub evidence: String,
}

impl SelfRevertRecord {
    pub fn to_proto(&self) -> pb::SelfRevert {
        pb::SelfRevert {
            id: self.id.clone(),
            service: self.service.clone(),
            change_id: self.change_id.clone(),
            snapshot_id: self.snapshot_id.clone(),
            at_ms: self.at_ms,
            offline_since_ms: self.offline_since_ms,
            ok: self.ok,
            detail: self.detail.clone(),
            evidence: self.evidence.clone(),
        }
    }
}

/// A service's current streak of failing reports.
#[derive(Clone, Debug)]
struct Streak {
    since_ms: u64,
    reports: u32,
    last_failure: String,
}

/// Watches each report while offline and decides when a service must revert itself.
#[derive(Default)]
pub struct Watch {
    streaks: HashMap<String, Streak>,
}

impl Watch {
    /// Records one report's verdict for a service (`failure`: the failing probes, or `None`
    /// when all passed) and returns the evidence when the policy says revert now.
    pub fn observe(
        &mut self,
        service: &ServiceConfig,
        failure: Option<String>,
        offline_since_ms: Option<u64>,
        now_ms: u64,
    ) -> Option<String> {
        let policy = service.self_revert.as_ref()?;
        let Some(failure) = failure else {
            self.streaks.remove(&service.name);
            return None;
        };
        let streak = self
            .streaks
            .entry(service.name.clone())
            .or_insert_with(|| Streak {
                since_ms: now_ms,
                reports: 0,
                last_failure: String::new(),
            });
        streak.reports += 1;
        streak.last_failure = failure;
        let failing_ms = now_ms.saturating_sub(streak.since_ms);
        let offline_ms = now_ms.saturating_sub(offline_since_ms?);
        let due = streak.reports >= MIN_FAILING_REPORTS
            && failing_ms >= policy.failing_for.as_millis() as u64
            && offline_ms >= policy.offline_for.as_millis() as u64;
        due.then(|| {
            let evidence = format!(
                "probes failing in {} reports over {} s ({}) with no coordinator for {} s",
                streak.reports,
                failing_ms / 1000,
                streak.last_failure,
                offline_ms / 1000
            );
            rewind_shared::names::truncate(&evidence, MAX_EVIDENCE_BYTES).to_string()
        })
    }

    /// Forgets a service's streak (after it reverted, or found nothing to revert).
    pub fn reset(&mut self, service: &str) {
        self.streaks.remove(service);
    }
}

/// The change a self-revert would undo: its capture's journal key and snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct LastChange {
    pub cluster_id: String,
    pub change_id: String,
    pub snapshot_id: String,
}

/// The latest change activated on this host for `service` whose capture was healthy and which
/// no restore (rollback or self-revert) has closed yet; `None` when there is nothing to revert.
pub fn last_revertible_change(
    executor: &Executor,
    service: &ServiceConfig,
    host_id: &str,
) -> Result<Option<LastChange>, AgentError> {
    let store = executor.store();
    let mut captures: Vec<(String, crate::store::JournalRecord)> = store
        .journal_with_keys()?
        .into_iter()
        .filter(|(_, record)| {
            record.step_id.ends_with(&format!("/capture/{host_id}"))
                && record.outcome.as_ref().is_some_and(|outcome| outcome.ok)
        })
        .collect();
    captures.sort_by_key(|(_, record)| record.started_at_ms);
    for (key, capture) in captures.into_iter().rev() {
        let outcome = capture.outcome.as_ref().expect("filtered on outcome");
        let Ok(snapshot) = store.snapshot(&outcome.snapshot_id) else {
            continue;
        };
        if snapshot.manifest.service != service.name {
            continue;
        }
        let (cluster_id, step_id) = key.split_once('/').unwrap_or(("-", key.as_str()));
        let change_id = step_id.split('/').next().unwrap_or_default().to_string();
        // The latest change of this service decides: if it cannot be reverted, no older one is.
        let activation = format!("{cluster_id}/{change_id}/activate/{host_id}");
        let activated = store
            .journal(&activation)?
            .and_then(|record| record.outcome)
            .is_some_and(|outcome| outcome.ok);
        let closed = store.fence(&format!("{cluster_id}/{change_id}"))? == u64::MAX;
        let healthy_capture = snapshot.probes.iter().all(|probe| probe.ok);
        if !activated || closed || !healthy_capture {
            info!(
                service = %service.name,
                change_id,
                activated,
                closed,
                healthy_capture,
                "Nothing to self-revert: the latest change is not activated here, already restored, or its capture was not healthy."
            );
            return Ok(None);
        }
        return Ok(Some(LastChange {
            cluster_id: if cluster_id == "-" {
                String::new()
            } else {
                cluster_id.to_string()
            },
            change_id,
            snapshot_id: outcome.snapshot_id.clone(),
        }));
    }
    Ok(None)
}

/// Reverts `service` to the snapshot of `change` through the executor (journaled, fenced) and
/// records what happened for the next session. Coordinator steps of the service wait while it
/// runs; if a session came back before it could begin (`still_offline` says no), it does
/// nothing and answers `None`. The change is closed on this host before the first step, so it
/// is tried once; a host it drained is undrained even when the restore fails.
#[allow(clippy::too_many_arguments)]
pub async fn revert(
    executor: &Executor,
    service: &ServiceConfig,
    host_id: &str,
    change: LastChange,
    evidence: String,
    offline_since_ms: u64,
    now_ms: u64,
    still_offline: &(dyn Fn() -> bool + Send + Sync),
) -> Result<Option<SelfRevertRecord>, AgentError> {
    let _exclusive = executor.exclude_coordinator_steps(&service.name).await;
    if !still_offline() {
        info!(service = %service.name, "A coordinator answered again: leaving the decision to it.");
        return Ok(None);
    }
    let store = executor.store();
    let cluster = if change.cluster_id.is_empty() {
        "-"
    } else {
        change.cluster_id.as_str()
    };
    store.raise_fence(&format!("{cluster}/{}", change.change_id), u64::MAX)?;
    // Ids are wall-clock based: step past any id already used (a clock stepped back, or two
    // services in the same millisecond), so no step is answered from an old journal entry.
    let known: Vec<String> = store
        .self_reverts()?
        .into_iter()
        .map(|record| record.id)
        .collect();
    let mut at = now_ms;
    let id = loop {
        let candidate = format!("sr-{at}");
        let journaled = store
            .journal(&format!(
                "{cluster}/{candidate}/{}/restore/{host_id}",
                service.name
            ))?
            .is_some();
        if !journaled && !known.contains(&candidate) {
            break candidate;
        }
        at += 1;
    };
    warn!(service = %service.name, change = %change.change_id, snapshot = %change.snapshot_id, %evidence, "Reverting this host on its own: the coordinator is unreachable and the service is failing.");
    let step = |name: &str, action: Action| StepCommand {
        step_id: format!("{id}/{}/{name}/{host_id}", service.name),
        term: 0,
        service: service.name.clone(),
        timeout_ms: 0,
        cluster_id: change.cluster_id.clone(),
        traceparent: String::new(),
        action: Some(action),
    };
    let mut done = Vec::new();
    let mut run = async |name: &str, action: Action| -> bool {
        match executor.execute_unguarded(step(name, action)).await {
            Some(result) => {
                done.push(format!("{name}: {}", result.detail));
                result.ok
            }
            None => {
                done.push(format!("{name}: already running"));
                false
            }
        }
    };
    let drained = run("drain", Action::Drain(pb::Drain {})).await;
    let mut ok = drained;
    if drained {
        let restore = Action::Restore(pb::RestoreSnapshot {
            snapshot_id: change.snapshot_id.clone(),
            supersedes: change.change_id.clone(),
            // The host's own policy allowed reverting it while cut off: what it restores is
            // what that policy names, drift or not.
            refuse_drift: false,
        });
        ok = run("restore", restore).await
            && run("restart", Action::Restart(pb::RestartService {})).await;
        // Back into rotation whatever happened: a drained host serves nobody.
        ok &= run("undrain", Action::Undrain(pb::Undrain {})).await;
    }
    let record = SelfRevertRecord {
        id,
        service: service.name.clone(),
        change_id: change.change_id,
        snapshot_id: change.snapshot_id,
        at_ms: now_ms,
        offline_since_ms,
        ok,
        detail: rewind_shared::names::truncate(&done.join("; "), 4096).to_string(),
        evidence,
    };
    store.put_self_revert(&record)?;
    info!(service = %record.service, ok, detail = %record.detail, "Self-revert done; it will be reported at the next session.");
    Ok(Some(record))
}

#[cfg(test)]
#[path = "self_revert_test.rs"]
mod tests;
