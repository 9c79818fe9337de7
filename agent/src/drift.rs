//! Drift: what changed on a service since rewind last put it there. After an activation or a
//! restore succeeds the agent records the service's state as its *desired state*
//! ([`record_desired`]); anything that differs from it later (a config edited by hand, a hotfix,
//! a link switched outside rewind) is drift, named file by file. Before any such record exists
//! (a host that has not been deployed to since this agent), drift is measured against the
//! latest snapshot, and the answer says so.
//!
//! Left out: the flags file (rewind writes it whenever a flag changes, and a flag's state is
//! shown by the coordinator) and whether the unit is running now (that is health). The schema
//! version is rewind's too: a schema step that succeeds here moves the desired one with it
//! ([`record_schema_version`]), so only a migration run by hand reads as drift.

use rewind_proto::v1 as pb;
use rewind_shared::names::truncate;

use crate::AgentError;
use crate::config::ServiceConfig;
use crate::facts::ServiceFacts;
use crate::snapshot::{self, Manifest, SnapshotRecord};
use crate::store::{DesiredState, Store};

/// Records the service's live state as what rewind put there, by the step `set_by`.
pub fn record_desired(
    store: &Store,
    service: &ServiceConfig,
    set_by: &str,
    now_ms: u64,
) -> Result<(), AgentError> {
    let manifest = snapshot::live_manifest(service, Some(store))?;
    store.put_desired(
        &service.name,
        &DesiredState {
            manifest,
            facts: crate::facts::collect(service),
            set_at_ms: now_ms,
            set_by: set_by.to_string(),
        },
    )
}

/// After a schema step succeeded on this host's database: the desired state's schema version
/// is whatever the database now says (nothing to do before a desired state exists).
pub fn record_schema_version(store: &Store, service: &ServiceConfig) -> Result<(), AgentError> {
    let (Some(database), Some(mut desired)) = (&service.database, store.desired(&service.name)?)
    else {
        return Ok(());
    };
    desired.facts.schema_version = Some(crate::schema::schema_version(database));
    store.put_desired(&service.name, &desired)
}

/// What changed on `service` since rewind last put it there; empty when nothing did, or when
/// no desired state is recorded (the latest snapshot is the state *before* a change: against
/// it every deploy would read as a hand-made change).
pub fn since_desired(store: &Store, service: &ServiceConfig) -> Result<Vec<String>, AgentError> {
    let measured = measure(store, service, || Ok(None))?;
    Ok(measured
        .map(|measured| measured.wiped_since_desired().to_vec())
        .unwrap_or_default())
}

/// What drift is measured against: the desired state, or the latest snapshot before one
/// exists.
pub struct Baseline {
    pub manifest: Manifest,
    pub facts: ServiceFacts,
    /// "the state rewind last set (ch-3/activate/web-1)" or "the latest snapshot ...".
    pub described: String,
    /// When that state was set, or the snapshot captured.
    pub at_ms: u64,
    /// The snapshot compared against, when that is what it is.
    pub snapshot_id: Option<String>,
}

/// A service's drift as measured now: against what, the live state, and what differs.
pub struct Measured {
    pub baseline: Baseline,
    pub live: Manifest,
    pub live_facts: ServiceFacts,
    pub lines: Vec<String>,
    /// Of `lines`, the files and release link: what a restore would wipe (facts such as
    /// package versions it does not touch).
    pub wiped_by_restore: Vec<String>,
}

impl Measured {
    /// What a restore would wipe of a change made since rewind last put the service there;
    /// empty when measured against a snapshot (the state before a change: against it every
    /// deploy would read as a hand-made change).
    pub fn wiped_since_desired(&self) -> &[String] {
        if self.baseline.snapshot_id.is_some() {
            &[]
        } else {
            &self.wiped_by_restore
        }
    }
}

/// Measures `service`'s drift: `None` when there is nothing to measure against. `latest`
/// gives the service's latest snapshot, asked only when no desired state is recorded (a caller
/// that already read the snapshots passes what it found).
pub fn measure(
    store: &Store,
    service: &ServiceConfig,
    latest: impl FnOnce() -> Result<Option<SnapshotRecord>, AgentError>,
) -> Result<Option<Measured>, AgentError> {
    let baseline = match store.desired(&service.name)? {
        Some(desired) => Baseline {
            manifest: desired.manifest,
            facts: desired.facts,
            described: format!("the state rewind last set ({})", desired.set_by),
            at_ms: desired.set_at_ms,
            snapshot_id: None,
        },
        None => {
            let Some(record) = latest()? else {
                return Ok(None);
            };
            Baseline {
                described: format!(
                    "the latest snapshot {} (no activation or restore recorded here since this \
                     agent began recording them)",
                    record.id
                ),
                at_ms: record.captured_at_ms,
                snapshot_id: Some(record.id),
                manifest: record.manifest,
                facts: record.facts,
            }
        }
    };
    let live = snapshot::live_manifest(service, Some(store))?;
    let live_facts = crate::facts::collect(service);
    let wiped_by_restore = file_lines(service, &baseline.manifest, &live);
    let mut lines = wiped_by_restore.clone();
    lines.extend(crate::facts::diff(
        &comparable(&baseline.facts),
        &comparable(&live_facts),
    ));
    Ok(Some(Measured {
        baseline,
        live,
        live_facts,
        lines,
        wiped_by_restore,
    }))
}

/// The service's latest snapshot in the store.
fn latest_snapshot(
    store: &Store,
    service: &ServiceConfig,
) -> Result<Option<SnapshotRecord>, AgentError> {
    Ok(store
        .snapshots()?
        .into_iter()
        .filter(|record| record.manifest.service == service.name)
        .max_by_key(|record| record.captured_at_ms))
}

/// One line per difference in files and release link between `baseline` and what is live,
/// leaving out the files the agent or the service itself writes: the flags file, the jobs
/// checkpoint, `drift-ignore`.
fn file_lines(service: &ServiceConfig, baseline: &Manifest, live: &Manifest) -> Vec<String> {
    let same_path = |a: &str, b: &str| {
        std::path::Path::new(a)
            .components()
            .eq(std::path::Path::new(b).components())
    };
    let checkpoint = service
        .catalogue
        .jobs
        .as_ref()
        .and_then(|jobs| jobs.checkpoint_file.as_deref());
    let left_out = |path: &str| {
        service
            .flags_file
            .iter()
            .map(String::as_str)
            .chain(checkpoint)
            .chain(service.drift_ignore.iter().map(String::as_str))
            .any(|ignored| same_path(ignored, path))
    };
    let compared = |manifest: &Manifest| {
        let mut manifest = manifest.clone();
        manifest.files.retain(|file| !left_out(&file.path));
        // Whether the container runs is health, not drift (a crashed release must not block
        // its own rollback).
        if let Some(container) = &mut manifest.container {
            container.running = false;
        }
        manifest
    };
    snapshot::diff(&compared(baseline), &compared(live))
}

/// The facts drift compares: not the flags (rewind's own), not whether the unit is running
/// now (health, not drift: a restore is recorded before its restart).
fn comparable(facts: &ServiceFacts) -> ServiceFacts {
    ServiceFacts {
        flags: None,
        unit: facts.unit.clone().map(|unit| crate::facts::UnitFacts {
            active: String::new(),
            ..unit
        }),
        ..facts.clone()
    }
}

/// One service's drift as the health report carries it, its lines cut to the bounds.
pub fn summary(store: &Store, service: &ServiceConfig, now_ms: u64) -> pb::ServiceDrift {
    use rewind_shared::bounds::{MAX_DRIFT_LINE_BYTES, MAX_DRIFT_LINES_PER_SERVICE};
    let mut summary = pb::ServiceDrift {
        service: service.name.clone(),
        checked_at_ms: now_ms,
        ..Default::default()
    };
    let found = measure(store, service, || latest_snapshot(store, service));
    match found {
        Ok(None) => summary.against = "nothing yet (no snapshot, activation or restore)".into(),
        Ok(Some(measured)) => {
            let bounded = |lines: &[String]| -> Vec<String> {
                lines
                    .iter()
                    .take(MAX_DRIFT_LINES_PER_SERVICE)
                    .map(|line| truncate(line, MAX_DRIFT_LINE_BYTES).to_string())
                    .collect()
            };
            summary.wiped_by_restore = bounded(measured.wiped_since_desired());
            let Measured {
                lines, baseline, ..
            } = measured;
            summary.against = truncate(&baseline.described, MAX_DRIFT_LINE_BYTES).into();
            summary.against_at_ms = baseline.at_ms;
            summary.more = lines.len().saturating_sub(MAX_DRIFT_LINES_PER_SERVICE) as u32;
            summary.changes = bounded(&lines);
        }
        Err(error) => summary.error = truncate(&error.to_string(), MAX_DRIFT_LINE_BYTES).into(),
    }
    summary
}
