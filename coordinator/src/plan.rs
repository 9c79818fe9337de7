//! Rollback planning: which changes are reverted, in which order, on which hosts, gated how.
//!
//! A plan is a pure function of the replicated state and the request. The leader computes it
//! when it proposes a rollback, and the entry carries it (`state_machine/decision.rs`; before
//! cluster version 3 `apply()` built it again on every member). `rollback start` carries the hash
//! of the plan the operator saw, and a different one is refused.
//!
//! Order: services in reverse dependency order (a consumer is reverted before the provider it
//! calls, so nothing still running needs an API that has gone), then per service region by
//! region (a canary region first), then per region host batches bounded by `max_parallel` and
//! `max_unavailable`.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::errors::{CoordinatorError, known_list};
use crate::recipe::RecipeStep;
use crate::state_machine::{
    ChangeRecord, HostRecord, MigrationClass, PlanOptions, ReleaseRecord, RollbackStatus,
    RollbackStepKind, SchemaOwner, SchemaStage, SchemaTxnRecord, State, StepStatus, Trigger,
    change_id, current_version, unknown_change,
};

type Result<T> = std::result::Result<T, CoordinatorError>;

/// Region name used for hosts that carry none.
pub const DEFAULT_REGION: &str = "default";
/// Environment name used for hosts that carry none.
pub const DEFAULT_ENVIRONMENT: &str = "default";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedWave {
    pub service: String,
    pub change: u64,
    pub region: String,
    pub canary: bool,
    /// Hosts in the order they are reverted, cut into batches reverted together.
    pub batches: Vec<Vec<String>>,
}

impl PlannedWave {
    pub fn hosts(&self) -> Vec<String> {
        self.batches.iter().flatten().cloned().collect()
    }
}

/// A consumer that the plan would leave needing an API its provider no longer offers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Incompatibility {
    pub provider: String,
    pub consumer: String,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Changes in the order their services are reverted.
    pub changes: Vec<u64>,
    pub services: Vec<String>,
    pub options: PlanOptions,
    pub waves: Vec<PlannedWave>,
    /// Flags turned back before any wave: `environment/service/flag -> on|off`.
    pub flags: Vec<String>,
    /// The default recipe's steps.
    pub steps_per_host: Vec<RollbackStepKind>,
    /// Services of the plan with their own recipe.
    pub recipes: BTreeMap<String, Vec<RecipeStep>>,
    /// Refuses the plan unless `options.force`.
    pub incompatibilities: Vec<Incompatibility>,
    /// Things the operator should know that do not stop the plan.
    pub notes: Vec<String>,
    /// Schema reverts after every wave, one database at a time (see `schema_reverts`).
    pub schema: Vec<SchemaStage>,
    pub hash: String,
}

#[cfg(test)]
thread_local! {
    /// How often this thread planned: tests check `apply()` never does from cluster version 3.
    pub static BUILDS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Plans the rollback of `changes` (in any order). Refuses unknown or superseded changes, two
/// changes of one service, changes already being or having been rolled back, and dependency
/// cycles. Incompatibilities are returned in the plan, not as an error: the caller decides.
pub fn build(
    state: &State,
    changes: &[u64],
    options: &PlanOptions,
    trigger: Trigger,
) -> Result<Plan> {
    #[cfg(test)]
    BUILDS.with(|builds| builds.set(builds.get() + 1));
    if changes.is_empty() {
        return Err(CoordinatorError::invalid(
            "change_ids",
            "name at least one change to roll back",
        ));
    }
    let mut by_service: BTreeMap<String, &ChangeRecord> = BTreeMap::new();
    for &number in changes {
        let change = revertible_change(state, number, trigger)?;
        if let Some(other) = by_service.insert(change.service.clone(), change)
            && other.number != number
        {
            return Err(CoordinatorError::invalid(
                "change_ids",
                format!(
                    "{} and {} both change service {}: a plan reverts one change per service",
                    other.id(),
                    change.id(),
                    change.service
                ),
            ));
        }
    }
    let graph: BTreeMap<String, Vec<String>> = state
        .services
        .values()
        .map(|service| (service.name.clone(), service.depends_on.clone()))
        .collect();
    let planned: Vec<String> = by_service.keys().cloned().collect();
    let order =
        revert_order(&graph, &planned).map_err(|cycle| CoordinatorError::DependencyCycle {
            service: cycle[0].clone(),
            path: cycle.join(" -> "),
        })?;
    let canary = options.canary_region.as_str();
    if !canary.is_empty() {
        let regions: BTreeSet<String> = by_service
            .values()
            .flat_map(|change| revertible_hosts(change))
            .map(|host| region_of(state, host))
            .collect();
        if !regions.contains(canary) {
            return Err(CoordinatorError::invalid(
                "canary_region",
                format!(
                    "no host of the plan is in region {canary}: its regions are {}",
                    known_list(regions)
                ),
            ));
        }
    }
    let batch = options.max_parallel.min(options.max_unavailable).max(1) as usize;
    let mut waves = Vec::new();
    let mut notes = Vec::new();
    for service in &order {
        let change = by_service[service];
        let skipped: Vec<&str> = change
            .hosts
            .iter()
            .filter(|host| host.activate.status == StepStatus::Pending)
            .map(|host| host.host_id.as_str())
            .collect();
        let unrestorable: Vec<&str> = change
            .hosts
            .iter()
            .filter(|host| {
                host.activate.status != StepStatus::Pending && host.snapshot_id.is_empty()
            })
            .map(|host| host.host_id.as_str())
            .collect();
        if !unrestorable.is_empty() {
            notes.push(format!(
                "{} has no usable snapshot on {} (its capture did not finish), so they cannot be \
                 restored and are left out: {}",
                change.id(),
                plural(unrestorable.len(), "host"),
                unrestorable.join(", ")
            ));
        }
        if !skipped.is_empty() {
            notes.push(format!(
                "{} never reached {} (they still run the old release): {}",
                change.id(),
                plural(skipped.len(), "host"),
                skipped.join(", ")
            ));
        }
        let self_reverted: Vec<String> = change
            .hosts
            .iter()
            .filter_map(|host| {
                let note = host.self_reverted.as_ref()?;
                Some(format!("{} ({})", host.host_id, note.id))
            })
            .collect();
        if !self_reverted.is_empty() {
            notes.push(format!(
                "{} was already reverted by {} on their own while offline; their restore \
                 repeats it (idempotent): {}",
                change.id(),
                plural(self_reverted.len(), "host"),
                self_reverted.join(", ")
            ));
        }
        for (region, hosts, is_canary) in regions_in_order(state, change, canary) {
            waves.push(PlannedWave {
                service: service.clone(),
                change: change.number,
                region,
                canary: is_canary,
                batches: hosts.chunks(batch).map(<[String]>::to_vec).collect(),
            });
        }
    }
    let incompatibilities = incompatibilities(state, &by_service, &mut notes);
    let applied: Vec<Applied<'_>> = order
        .iter()
        .flat_map(|service| applied_migrations(state, by_service[service], options, &mut notes))
        .collect();
    let schema = schema_reverts(state, &applied, &mut notes);
    let recipes: BTreeMap<String, Vec<RecipeStep>> = order
        .iter()
        .filter_map(|service| {
            let recipe = &state.services.get(service)?.rollback_steps;
            (!recipe.is_empty()).then(|| (service.clone(), recipe.clone()))
        })
        .collect();
    let flags = order
        .iter()
        .flat_map(|service| {
            let change = by_service[service];
            // Only flags the change still owns: a later kill switch or person's choice stays.
            let owned = move |name: &str| {
                state
                    .flag(&change.environment, &change.service, name)
                    .is_some_and(|current| current.by_change == change.number)
            };
            change
                .flags
                .iter()
                .filter(move |flag| owned(&flag.name))
                .map(move |flag| {
                    format!(
                        "{}/{}/{} -> {}",
                        change.environment,
                        change.service,
                        flag.name,
                        if flag.before.unwrap_or(false) {
                            "on"
                        } else {
                            "off"
                        }
                    )
                })
        })
        .collect();
    let mut plan = Plan {
        changes: order
            .iter()
            .map(|service| by_service[service].number)
            .collect(),
        services: order,
        options: options.clone(),
        waves,
        flags,
        steps_per_host: RollbackStepKind::ALL.to_vec(),
        recipes,
        incompatibilities,
        notes,
        schema,
        hash: String::new(),
    };
    plan.hash = plan_hash(&plan);
    Ok(plan)
}

/// What one change applied on one database and its rollback may revert: its committed stages
/// there in the order they ran, what each reverts, and what the plan notes.
struct Applied<'a> {
    change: &'a ChangeRecord,
    database: &'a str,
    /// The change's stages on this database that decided to commit (done, or still resolving:
    /// the revert waits for it), oldest first, with their transactions.
    stages: Vec<(&'a SchemaStage, &'a SchemaTxnRecord)>,
    /// The versions to revert (expand ones kept unless asked, and none an earlier rollback of
    /// the change already reverted).
    reverted: BTreeSet<&'a str>,
}

/// The migrations a change applied that its rollback reverts, per database. Expand migrations
/// stay unless `revert_expand`: the old app works with them, and the plan says so.
fn applied_migrations<'a>(
    state: &'a State,
    change: &'a ChangeRecord,
    options: &PlanOptions,
    notes: &mut Vec<String>,
) -> Vec<Applied<'a>> {
    let mut databases: Vec<&str> = Vec::new();
    for stage in &change.schema {
        if !databases.contains(&stage.database.as_str()) {
            databases.push(&stage.database);
        }
    }
    let mut found = Vec::new();
    for database in databases {
        let mut stages: Vec<(&SchemaStage, &SchemaTxnRecord)> = change
            .schema
            .iter()
            .filter(|stage| stage.database == database)
            .filter_map(|stage| Some((stage, state.schema_txns.get(&stage.txn)?)))
            .filter(|(_, txn)| {
                txn.decision
                    .as_ref()
                    .is_some_and(|decision| decision.commit)
            })
            .collect();
        // In the order they ran (a change's stages are kept in the order its migrations were
        // named, and an expand stage runs before a contract one named earlier).
        stages.sort_by_key(|(_, txn)| txn.number);
        // What an earlier rollback of this change (aborted after its schema revert committed)
        // already reverted is not reverted again.
        let already: BTreeSet<&str> = state
            .schema_txns
            .values()
            .filter(|txn| txn.down && txn.database == database)
            .filter(|txn| {
                txn.decision
                    .as_ref()
                    .is_some_and(|decision| decision.commit)
            })
            .filter(|txn| match txn.owner {
                SchemaOwner::Rollback { rollback, .. } => state
                    .rollbacks
                    .get(&rollback)
                    .is_some_and(|record| record.changes.contains(&change.number)),
                _ => false,
            })
            .flat_map(|txn| txn.migrations.iter().map(String::as_str))
            .collect();
        let is_expand = |version: &str| {
            state
                .migrations
                .get(database)
                .and_then(|versions| versions.get(version))
                .is_some_and(|migration| migration.class == MigrationClass::Expand)
        };
        let all = stages.iter().flat_map(|(stage, _)| stage.versions.iter());
        let reverted: BTreeSet<&str> = all
            .clone()
            .filter(|version| options.revert_expand || !is_expand(version))
            .filter(|version| !already.contains(version.as_str()))
            .map(String::as_str)
            .collect();
        let kept: Vec<&str> = all
            .filter(|version| !options.revert_expand && is_expand(version))
            .map(String::as_str)
            .collect();
        if !kept.is_empty() {
            notes.push(format!(
                "expand migration{} {} of {database} ({}) stay{}: the old app works with them, so \
                 reverting the app is enough (--revert-expand reverts them too)",
                if kept.len() == 1 { "" } else { "s" },
                kept.join(", "),
                change.id(),
                if kept.len() == 1 { "s" } else { "" },
            ));
        }
        found.push(Applied {
            change,
            database,
            stages,
            reverted,
        });
    }
    found
}

/// The schema stages of a rollback, after every app wave (an app version that needs a contract
/// migration is gone by then): per database, what was applied last is reverted first. Usually
/// that is one stage per change and database, newer changes first, each reverting the change's
/// migrations there newest first in one transaction. When changes' migrations on a database
/// interleaved (one change's contract ran after another change's migrations), each change's
/// stages are cut where another change's ran, so the reverts still go newest first.
fn schema_reverts(
    state: &State,
    applied: &[Applied<'_>],
    notes: &mut Vec<String>,
) -> Vec<SchemaStage> {
    // Runs of stages to revert together: (position of the change and database, stages).
    let mut runs: Vec<(usize, Vec<(&SchemaStage, &SchemaTxnRecord)>)> = Vec::new();
    // Databases whose reverts do not simply follow change order.
    let mut reordered: BTreeSet<&str> = BTreeSet::new();
    let mut databases: Vec<&str> = applied.iter().map(|each| each.database).collect();
    databases.sort_unstable();
    databases.dedup();
    for database in databases {
        let here: Vec<(usize, &Applied<'_>)> = applied
            .iter()
            .enumerate()
            .filter(|(_, each)| each.database == database)
            .collect();
        let span = |each: &Applied<'_>| {
            let numbers = each.stages.iter().map(|(_, txn)| txn.number);
            (numbers.clone().min(), numbers.max())
        };
        // Two changes' transactions overlap (interleaved), or an older change's all ran after a
        // newer one's (out of order): either way, change order is not the order to revert in.
        let (mut interleaved, mut out_of_order) = (false, false);
        for (i, (_, one)) in here.iter().enumerate() {
            for (_, other) in &here[i + 1..] {
                let ((Some(a0), Some(a1)), (Some(b0), Some(b1))) = (span(one), span(other)) else {
                    continue;
                };
                if a0 <= b1 && b0 <= a1 {
                    interleaved = true;
                } else if (one.change.number > other.change.number) != (a0 > b1) {
                    out_of_order = true;
                }
            }
        }
        if interleaved || out_of_order {
            reordered.insert(database);
        }
        if !interleaved {
            runs.extend(here.iter().map(|(at, each)| (*at, each.stages.clone())));
            continue;
        }
        // Newest first across the changes, cut wherever the change differs.
        let mut stages: Vec<(usize, (&SchemaStage, &SchemaTxnRecord))> = here
            .iter()
            .flat_map(|(at, each)| each.stages.iter().map(move |stage| (*at, *stage)))
            .collect();
        stages.sort_by_key(|(_, (_, txn))| std::cmp::Reverse(txn.number));
        let mut cut: Vec<(usize, Vec<(&SchemaStage, &SchemaTxnRecord)>)> = Vec::new();
        for (at, stage) in stages {
            match cut.last_mut() {
                Some((last, run)) if *last == at => run.insert(0, stage),
                _ => cut.push((at, vec![stage])),
            }
        }
        runs.extend(cut);
    }
    let mut reverts: Vec<(usize, u64, SchemaStage)> = runs
        .into_iter()
        .filter_map(|(at, run)| {
            let newest = run.iter().map(|(_, txn)| txn.number).max()?;
            // Everything this plan reverts on the run's database, whichever change applied it.
            let planned: BTreeSet<&str> = applied
                .iter()
                .filter(|each| each.database == applied[at].database)
                .flat_map(|each| each.reverted.iter().copied())
                .collect();
            let stage = revert_stage(state, &applied[at], &run, &planned, notes)?;
            Some((at, newest, stage))
        })
        .collect();
    // Newer changes first (each change's databases in the order it used them), as plans always
    // were; then, within each reordered database, whatever was applied last goes first.
    reverts.sort_by_key(|(at, _, _)| (std::cmp::Reverse(applied[*at].change.number), *at));
    let mut by_database: BTreeMap<String, Vec<(u64, SchemaStage)>> = BTreeMap::new();
    let mut slots = Vec::new();
    for (_, newest, stage) in reverts {
        slots.push(stage.database.clone());
        by_database
            .entry(stage.database.clone())
            .or_default()
            .push((newest, stage));
    }
    for (database, stages) in by_database.iter_mut() {
        if reordered.contains(database.as_str()) {
            // Popping takes the newest first.
            stages.sort_by_key(|(newest, _)| *newest);
        } else {
            // Popping keeps the change order.
            stages.reverse();
        }
    }
    slots
        .into_iter()
        .filter_map(|database| Some(by_database.get_mut(&database)?.pop()?.1))
        .collect()
}

/// One revert of `run`, some of a change's stages on a database (oldest first): their versions
/// newest first, less those kept. It expects the fingerprint recorded before the first stage it
/// undoes in full; it only checks agreement when it undoes part of one.
fn revert_stage(
    state: &State,
    applied: &Applied<'_>,
    run: &[(&SchemaStage, &SchemaTxnRecord)],
    planned: &BTreeSet<&str>,
    notes: &mut Vec<String>,
) -> Option<SchemaStage> {
    let versions: Vec<String> = run
        .iter()
        .flat_map(|(stage, _)| stage.versions.iter())
        .rev()
        .filter(|version| applied.reverted.contains(version.as_str()))
        .cloned()
        .collect();
    if versions.is_empty() {
        return None;
    }
    let reverted: BTreeSet<&str> = versions.iter().map(String::as_str).collect();
    let first_undone = (0..run.len()).find(|&first| {
        let undone: BTreeSet<&str> = run[first..]
            .iter()
            .flat_map(|(stage, _)| stage.versions.iter().map(String::as_str))
            .collect();
        undone == reverted
    });
    let expected_fingerprint = first_undone
        .map(|first| run[first].1.fingerprint_before.clone())
        .unwrap_or_default();
    let change = applied.change;
    // A migration applied after the oldest one reverted here that this plan leaves applied
    // (another change's, not rolled back, or an expand kept) makes every shard refuse the
    // revert at check: say so in the plan, before anyone starts it.
    let oldest = run
        .iter()
        .find(|(stage, _)| {
            stage
                .versions
                .iter()
                .any(|version| reverted.contains(version.as_str()))
        })
        .map(|(_, txn)| txn.number);
    if let (Some(oldest), Some((_, last))) = (oldest, run.last()) {
        // Version -> the transaction that applied it, as it stands after `oldest`.
        let mut staying: BTreeMap<&str, String> = BTreeMap::new();
        let after = (Bound::Excluded(oldest), Bound::Unbounded);
        for (_, txn) in state.schema_txns.range(after) {
            let committed = txn
                .decision
                .as_ref()
                .is_some_and(|decision| decision.commit);
            if !committed || txn.database != applied.database || txn.environment != last.environment
            {
                continue;
            }
            for version in &txn.migrations {
                if txn.down {
                    staying.remove(version.as_str());
                } else {
                    staying.insert(version, txn.id());
                }
            }
        }
        staying.retain(|version, _| !planned.contains(version));
        if !staying.is_empty() {
            let named: Vec<String> = staying
                .iter()
                .map(|(version, txn)| format!("{version} ({txn})"))
                .collect();
            notes.push(format!(
                "{} of {} {} applied after {}'s {} and stay{}: every shard will refuse that \
                 revert until {} reverted first",
                named.join(", "),
                applied.database,
                if named.len() == 1 { "was" } else { "were" },
                change.id(),
                versions.join(", "),
                if named.len() == 1 { "s" } else { "" },
                if named.len() == 1 {
                    "it is"
                } else {
                    "they are"
                },
            ));
        }
    }
    Some(SchemaStage {
        database: applied.database.to_string(),
        change: change.number,
        service: change.service.clone(),
        environment: environment_of(state, change),
        versions,
        down: true,
        after_activation: true,
        txn: 0,
        expected_fingerprint,
    })
}

/// The change, if a rollback of it may start now.
pub(crate) fn revertible_change(
    state: &State,
    number: u64,
    trigger: Trigger,
) -> Result<&ChangeRecord> {
    let change = state
        .changes
        .get(&number)
        .ok_or_else(|| unknown_change(state, number))?;
    // A snapshot taken before an older change would also undo every newer one on the same
    // hosts, silently. (A newer change elsewhere, say in another environment, does not count.)
    let hosts: BTreeSet<&str> = change
        .hosts
        .iter()
        .map(|host| host.host_id.as_str())
        .collect();
    if let Some(latest) = state.changes.values().rev().find(|other| {
        other.service == change.service
            && other
                .hosts
                .iter()
                .any(|host| hosts.contains(host.host_id.as_str()))
    }) && latest.number != number
    {
        return Err(CoordinatorError::NotLatestChange {
            change_id: change.id(),
            service: change.service.clone(),
            latest: latest.id(),
        });
    }
    if let Some(previous) = state.rollbacks.get(&change.rollback) {
        if !previous.status.is_terminal() {
            return Err(CoordinatorError::RollbackInProgress {
                rollback_id: previous.id(),
                change_id: change.id(),
                status: previous.status,
            });
        }
        // One automatic rollback per change: after that a person decides.
        if previous.status == RollbackStatus::Succeeded || trigger == Trigger::Automatic {
            return Err(CoordinatorError::AlreadyRolledBack {
                change_id: change.id(),
                rollback_id: previous.id(),
            });
        }
    }
    if revertible_hosts(change).next().is_none() {
        return Err(CoordinatorError::NothingToRevert {
            change_id: change.id(),
        });
    }
    Ok(change)
}

/// Hosts a change may have altered: activation was attempted there, after a snapshot.
pub(crate) fn revertible_hosts(change: &ChangeRecord) -> impl Iterator<Item = &str> {
    change
        .hosts
        .iter()
        .filter(|host| host.activate.status != StepStatus::Pending && !host.snapshot_id.is_empty())
        .map(|host| host.host_id.as_str())
}

/// The environment a change ran in: that of its first host that names one, else `default`.
/// The environment a host's label names; a host without one is in `default`, as plans and
/// flags count it.
pub fn host_environment(host: &HostRecord) -> &str {
    if host.labels.environment.is_empty() {
        DEFAULT_ENVIRONMENT
    } else {
        &host.labels.environment
    }
}

/// Every environment a change touches, sorted: its hosts' (a change may span several; its
/// recorded environment is only the first) and its recorded one. Access is judged on all.
pub fn change_environments<'a>(state: &'a State, change: &'a ChangeRecord) -> Vec<&'a str> {
    let mut environments: Vec<&str> = change
        .hosts
        .iter()
        .filter_map(|host| state.hosts.get(&host.host_id))
        .map(host_environment)
        .collect();
    environments.push(if change.environment.is_empty() {
        DEFAULT_ENVIRONMENT
    } else {
        &change.environment
    });
    environments.sort_unstable();
    environments.dedup();
    environments
}

pub fn environment_of(state: &State, change: &ChangeRecord) -> String {
    if !change.environment.is_empty() {
        return change.environment.clone();
    }
    let hosts: Vec<String> = change
        .hosts
        .iter()
        .map(|host| host.host_id.clone())
        .collect();
    environment_of_hosts(state, &hosts)
}

/// The environment of the first of `hosts` that names one, else `default`.
pub fn environment_of_hosts(state: &State, hosts: &[String]) -> String {
    hosts
        .iter()
        .filter_map(|host_id| state.hosts.get(host_id))
        .map(|host| host.labels.environment.clone())
        .find(|environment| !environment.is_empty())
        .unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_string())
}

pub fn region_of(state: &State, host_id: &str) -> String {
    state
        .hosts
        .get(host_id)
        .map(|host| host.labels.region.clone())
        .filter(|region| !region.is_empty())
        .unwrap_or_else(|| DEFAULT_REGION.to_string())
}

/// The change's revertible hosts by region: the canary region first (the requested one when the
/// service has hosts there, else its smallest region), then the others by name.
fn regions_in_order(
    state: &State,
    change: &ChangeRecord,
    requested_canary: &str,
) -> Vec<(String, Vec<String>, bool)> {
    let mut regions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for host in revertible_hosts(change) {
        regions
            .entry(region_of(state, host))
            .or_default()
            .push(host.to_string());
    }
    for hosts in regions.values_mut() {
        hosts.sort();
    }
    let canary = if regions.contains_key(requested_canary) {
        requested_canary.to_string()
    } else {
        // Smallest blast radius first; ties by name (BTreeMap order, min_by_key keeps the first).
        regions
            .iter()
            .min_by_key(|(_, hosts)| hosts.len())
            .map(|(region, _)| region.clone())
            .unwrap_or_default()
    };
    let mut ordered = Vec::with_capacity(regions.len());
    if let Some(hosts) = regions.remove(&canary) {
        ordered.push((canary, hosts, true));
    }
    ordered.extend(
        regions
            .into_iter()
            .map(|(region, hosts)| (region, hosts, false)),
    );
    ordered
}

/// Services of `planned` ordered so that every consumer comes before each provider it depends
/// on, directly or through services outside the plan; ties by name. A cycle reachable from the
/// plan is returned as the path that closes it (`[a, b, a]`).
pub fn revert_order(
    graph: &BTreeMap<String, Vec<String>>,
    planned: &[String],
) -> std::result::Result<Vec<String>, Vec<String>> {
    if let Some(cycle) = find_cycle(graph, planned) {
        return Err(cycle);
    }
    let planned: BTreeSet<&String> = planned.iter().collect();
    // provider -> planned consumers that must go before it.
    let mut must_wait_for: BTreeMap<&String, BTreeSet<&String>> = planned
        .iter()
        .map(|&service| (service, BTreeSet::new()))
        .collect();
    for &consumer in &planned {
        for provider in reachable(graph, consumer) {
            if let Some(waits) = must_wait_for.get_mut(&provider) {
                waits.insert(consumer);
            }
        }
    }
    let mut order = Vec::with_capacity(planned.len());
    while !must_wait_for.is_empty() {
        // Acyclic, so some service waits for nobody left; take the first by name.
        let next = *must_wait_for
            .iter()
            .find(|(_, waits)| waits.is_empty())
            .map(|(service, _)| service)
            .expect("an acyclic graph always has a service with no pending consumer");
        must_wait_for.remove(next);
        for waits in must_wait_for.values_mut() {
            waits.remove(next);
        }
        order.push(next.clone());
    }
    Ok(order)
}

/// Every service `from` depends on, directly or not (not `from` itself unless in a cycle).
fn reachable<'a>(graph: &'a BTreeMap<String, Vec<String>>, from: &str) -> BTreeSet<&'a String> {
    let mut seen = BTreeSet::new();
    let mut stack: Vec<&String> = graph.get(from).into_iter().flatten().collect();
    while let Some(service) = stack.pop() {
        if seen.insert(service) {
            stack.extend(graph.get(service).into_iter().flatten());
        }
    }
    seen
}

/// A dependency cycle reachable from `starts`, as the path that closes it.
fn find_cycle(graph: &BTreeMap<String, Vec<String>>, starts: &[String]) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        OnPath,
        Done,
    }
    let mut marks: BTreeMap<&str, Mark> = BTreeMap::new();
    for start in starts {
        if marks.contains_key(start.as_str()) {
            continue;
        }
        // Iterative depth-first walk: (service, index of its next dependency).
        let mut path: Vec<(&str, usize)> = vec![(start.as_str(), 0)];
        marks.insert(start, Mark::OnPath);
        while let Some(&(service, next)) = path.last() {
            let deps = graph.get(service).map(Vec::as_slice).unwrap_or_default();
            let Some(dep) = deps.get(next) else {
                marks.insert(service, Mark::Done);
                path.pop();
                continue;
            };
            if let Some(top) = path.last_mut() {
                top.1 += 1;
            }
            match marks.get(dep.as_str()) {
                Some(Mark::OnPath) => {
                    let from = path.iter().position(|(name, _)| name == dep)?;
                    let mut cycle: Vec<String> = path[from..]
                        .iter()
                        .map(|(name, _)| name.to_string())
                        .collect();
                    cycle.push(dep.clone());
                    return Some(cycle);
                }
                Some(Mark::Done) => {}
                None => {
                    marks.insert(dep, Mark::OnPath);
                    path.push((dep, 0));
                }
            }
        }
    }
    None
}

/// Consumers the plan would break: after it, a consumer's release needs a higher API version of
/// a reverted provider than the provider's release then offers. Unknown API versions are noted.
fn incompatibilities(
    state: &State,
    planned: &BTreeMap<String, &ChangeRecord>,
    notes: &mut Vec<String>,
) -> Vec<Incompatibility> {
    let version_after = |service: &str| match planned.get(service) {
        Some(change) => change.previous_version.clone(),
        None => current_version(state, service),
    };
    let release = |service: &str, version: &str| -> Option<&ReleaseRecord> {
        state
            .releases
            .get(service)?
            .get(version)
            .map(|r| r.as_ref())
    };
    let mut found = Vec::new();
    for consumer in state.services.keys() {
        let consumer_version = version_after(consumer);
        let Some(consumer_release) = release(consumer, &consumer_version) else {
            continue;
        };
        for (provider, &needed) in &consumer_release.requires {
            if !planned.contains_key(provider) {
                continue;
            }
            let provider_version = version_after(provider);
            let offered = release(provider, &provider_version)
                .map(|release| release.api_version)
                .unwrap_or(0);
            if offered == 0 {
                notes.push(format!(
                    "cannot check {consumer} {consumer_version} against {provider}: \
                     {provider} {} declares no API version",
                    if provider_version.is_empty() {
                        "(unknown version)"
                    } else {
                        &provider_version
                    }
                ));
                continue;
            }
            if offered < needed {
                found.push(Incompatibility {
                    provider: provider.clone(),
                    consumer: consumer.clone(),
                    detail: format!(
                        "reverting {provider} to {provider_version} (API {offered}) breaks \
                         {consumer} {consumer_version}, which needs {provider} API {needed} or \
                         later: add {consumer}'s change to the plan, or force it"
                    ),
                });
            }
        }
    }
    found
}

/// sha256 over what the plan does (changes, options, waves, flags) and the problems it would be
/// forced past, not over notes or readiness.
pub fn plan_hash(plan: &Plan) -> String {
    #[derive(Serialize)]
    struct Hashed<'a> {
        changes: &'a [u64],
        options: &'a PlanOptions,
        waves: &'a [PlannedWave],
        flags: &'a [String],
        steps_per_host: &'a [RollbackStepKind],
        /// Left out when empty, so plans of services on the default recipe hash as before
        /// recipes existed (rollbacks replayed from the log must hash the same).
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        recipes: &'a BTreeMap<String, Vec<RecipeStep>>,
        /// So `--force` overrides only the problems the operator was shown.
        incompatibilities: &'a [Incompatibility],
        /// Left out when empty, as recipes are.
        #[serde(skip_serializing_if = "<[SchemaStage]>::is_empty")]
        schema: &'a [SchemaStage],
    }
    let bytes = serde_json::to_vec(&Hashed {
        changes: &plan.changes,
        options: &plan.options,
        waves: &plan.waves,
        flags: &plan.flags,
        steps_per_host: &plan.steps_per_host,
        recipes: &plan.recipes,
        incompatibilities: &plan.incompatibilities,
        schema: &plan.schema,
    })
    .expect("a plan always serialises");
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// What a change advisory review wants to know before the plan runs; needs the leader's view
/// of which agents are connected, so it is not part of the replicated plan.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Readiness {
    pub disconnected_hosts: Vec<String>,
    /// "service version" whose release record is unknown: its artifact may not be retained.
    pub missing_releases: Vec<String>,
    /// "host: service release V is gone": the release a host's restore would point `current`
    /// at, which the host's agent last reported it no longer holds.
    pub missing_artifacts: Vec<String>,
    pub expected_duration_ms: u64,
}

/// Per-step durations assumed when the history has none.
const DEFAULT_STEP_MS: [(RollbackStepKind, u64); 5] = [
    (RollbackStepKind::Drain, 2_000),
    (RollbackStepKind::Restore, 2_000),
    (RollbackStepKind::Restart, 5_000),
    (RollbackStepKind::Verify, 10_000),
    (RollbackStepKind::Undrain, 1_000),
];

/// What the answering member knows of a host beyond the replicated state.
pub trait HostView {
    fn connected(&self, host_id: &str) -> bool;
    /// Release versions the host last reported holding for `service`; `None` without a report.
    fn retained(&self, host_id: &str, service: &str) -> Option<Vec<String>>;
}

pub fn readiness(state: &State, plan: &Plan, view: &impl HostView) -> Readiness {
    let connected = |host: &str| view.connected(host);
    let mut disconnected: Vec<String> = plan
        .waves
        .iter()
        .flat_map(PlannedWave::hosts)
        .filter(|host| !connected(host))
        .collect();
    disconnected.sort();
    disconnected.dedup();
    let missing_releases = plan
        .changes
        .iter()
        .filter_map(|number| state.changes.get(number))
        .filter(|change| {
            change.previous_version.is_empty()
                || !state
                    .releases
                    .get(&change.service)
                    .is_some_and(|versions| versions.contains_key(&change.previous_version))
        })
        .map(|change| {
            let version = if change.previous_version.is_empty() {
                "(unknown version)"
            } else {
                &change.previous_version
            };
            format!("{} {version}", change.service)
        })
        .collect();
    let mut missing_artifacts = Vec::new();
    for wave in &plan.waves {
        let Some(change) = state.changes.get(&wave.change) else {
            continue;
        };
        if change.previous_version.is_empty() {
            continue;
        }
        for host in wave.hosts() {
            let gone = view
                .retained(&host, &wave.service)
                .is_some_and(|versions| !versions.contains(&change.previous_version));
            if gone {
                missing_artifacts.push(format!(
                    "{host}: {} release {} is gone",
                    wave.service, change.previous_version
                ));
            }
        }
    }
    let per_host: u64 = DEFAULT_STEP_MS
        .iter()
        .map(|&(kind, default)| typical_step_ms(state, kind).unwrap_or(default))
        .sum();
    let gate_ms = u64::from(plan.options.gate.settle_s) * 1000;
    let expected_duration_ms = plan
        .waves
        .iter()
        .map(|wave| wave.batches.len() as u64 * per_host + gate_ms)
        .sum();
    Readiness {
        disconnected_hosts: disconnected,
        missing_releases,
        missing_artifacts,
        expected_duration_ms,
    }
}

/// Median duration of the last 100 succeeded steps of this kind, if any ran.
fn typical_step_ms(state: &State, kind: RollbackStepKind) -> Option<u64> {
    let mut durations: Vec<u64> = state
        .rollbacks
        .values()
        .rev()
        .flat_map(|rollback| rollback.steps.iter())
        .filter(|step| step.kind == kind && step.progress.status == StepStatus::Succeeded)
        .map(|step| {
            step.progress
                .finished_at_ms
                .saturating_sub(step.progress.started_at_ms)
        })
        .take(100)
        .collect();
    if durations.is_empty() {
        return None;
    }
    durations.sort_unstable();
    Some(durations[durations.len() / 2])
}

/// "1 host", "3 hosts".
pub fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// `ch-1, ch-2` for messages.
pub fn change_list(changes: &[u64]) -> String {
    changes
        .iter()
        .map(|&number| change_id(number))
        .collect::<Vec<_>>()
        .join(", ")
}
