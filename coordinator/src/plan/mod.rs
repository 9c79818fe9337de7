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

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::errors::{CoordinatorError, known_list};
use crate::recipe::RecipeStep;
use crate::state_machine::{
    ChangeRecord, DriftPolicy, HostRecord, MigrationClass, PlanOptions, ReleaseRecord,
    RollbackRecord, RollbackStatus, RollbackStepKind, SchemaOwner, SchemaStage, SchemaTxnRecord,
    State, StepStatus, Trigger, change_id, current_version, unknown_change,
};

mod estimate;
mod readiness;
mod schema;

pub use estimate::Estimate;
pub use readiness::*;
use schema::{Applied, applied_migrations, schema_reverts};

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
    /// Schema reverts, one database at a time, those before the app waves first (see
    /// `schema_reverts`).
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
    let graph = dependency_graph(state);
    let planned: Vec<String> = by_service.keys().cloned().collect();
    let order =
        revert_order(&graph, &planned).map_err(|cycle| CoordinatorError::DependencyCycle {
            service: cycle[0].clone(),
            path: cycle.join(" -> "),
        })?;
    // The hosts each change's waves may revert, then less those left out as asked: each left
    // out must be one of them (a typo, a host already reverted or never activated is named).
    let mut notes = Vec::new();
    let mut candidates: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for change in by_service.values() {
        candidates.insert(&change.service, hosts_to_revert(state, change, &mut notes)?);
    }
    let excluded: BTreeSet<&str> = options.exclude_hosts.iter().map(String::as_str).collect();
    let unknown: Vec<&str> = excluded
        .iter()
        .copied()
        .filter(|host| !candidates.values().any(|hosts| hosts.contains(host)))
        .collect();
    if !unknown.is_empty() {
        let hosts: BTreeSet<&str> = candidates.values().flatten().copied().collect();
        return Err(CoordinatorError::invalid(
            "options.exclude_hosts",
            format!(
                "{} {} not among the hosts this plan would revert: they are {}",
                unknown.join(", "),
                if unknown.len() == 1 { "is" } else { "are" },
                known_list(hosts.iter().map(|host| host.to_string()))
            ),
        ));
    }
    // The canary region must hold a host the plan reverts (not one left out).
    let canary = options.canary_region.as_str();
    if !canary.is_empty() {
        let regions: BTreeSet<String> = candidates
            .values()
            .flatten()
            .filter(|host| !excluded.contains(*host))
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
    // Changes some of whose hosts are left out: they keep running its release.
    let mut partial: BTreeSet<u64> = BTreeSet::new();
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
        let candidates = &candidates[service.as_str()];
        let reverted = less_excluded(change, candidates, &excluded, &mut notes)?;
        if reverted.len() < candidates.len() {
            partial.insert(change.number);
        }
        for (region, hosts, is_canary) in regions_in_order(state, &reverted, canary) {
            waves.push(PlannedWave {
                service: service.clone(),
                change: change.number,
                region,
                canary: is_canary,
                batches: hosts.chunks(batch).map(<[String]>::to_vec).collect(),
            });
        }
    }
    let mut incompatibilities = incompatibilities(state, &by_service, &mut notes);
    if !partial.is_empty() {
        // Hosts left out keep running the newer release: it must fit with the rest too, so
        // the checks run again with those services where they are now.
        let staying: BTreeMap<String, &ChangeRecord> = by_service
            .iter()
            .filter(|(_, change)| !partial.contains(&change.number))
            .map(|(service, change)| (service.clone(), *change))
            .collect();
        for problem in self::incompatibilities(state, &staying, &mut Vec::new()) {
            if !incompatibilities.contains(&problem) {
                incompatibilities.push(problem);
            }
        }
    }
    let applied: Vec<Applied<'_>> = order
        .iter()
        .flat_map(|service| applied_migrations(state, by_service[service], options, &mut notes))
        .collect();
    let schema = schema_reverts(state, &applied, options.schema_after_waves, &mut notes);
    if let Some(stage) = schema.iter().find(|stage| partial.contains(&stage.change)) {
        return Err(CoordinatorError::invalid(
            "options.exclude_hosts",
            format!(
                "{} reverts {} of {}, and the hosts left out would keep running {} on the new \
                 release against the reverted schema: leave them in (with --overwrite-drift)",
                change_id(stage.change),
                stage.versions.join(", "),
                stage.database,
                stage.service
            ),
        ));
    }
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
        // One automatic rollback per change: after that a person decides. A person may revert
        // the hosts a rollback that succeeded left out.
        let left_out =
            previous.status == RollbackStatus::Succeeded && left_out_of(state, change).is_some();
        if (previous.status == RollbackStatus::Succeeded && !left_out)
            || trigger == Trigger::Automatic
        {
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

/// The latest rollback of `change` that succeeded, and the hosts of the change it left out
/// (its `exclude_hosts`, and from cluster version 10 hosts a person skipped before their
/// restore, that it could have reverted), when it left any: a later rollback of the change
/// reverts only those.
fn left_out_of<'a>(
    state: &'a State,
    change: &'a ChangeRecord,
) -> Option<(&'a RollbackRecord, BTreeSet<&'a str>)> {
    let succeeded = state.rollbacks.values().rev().find(|rollback| {
        rollback.status == RollbackStatus::Succeeded && rollback.changes.contains(&change.number)
    })?;
    let revertible: BTreeSet<&str> = revertible_hosts(change).collect();
    let restored = |host: &str| {
        succeeded.steps.iter().any(|step| {
            step.host_id == host
                && step.service == change.service
                && step.kind == RollbackStepKind::Restore
                && step.progress.status == StepStatus::Succeeded
        })
    };
    let skipped = succeeded
        .skipped_hosts
        .iter()
        .filter(|_| state.cluster_version() >= crate::state_machine::version::DRIFT_GUARD)
        .filter(|host| !restored(host));
    let left_out: BTreeSet<&str> = succeeded
        .options
        .exclude_hosts
        .iter()
        .chain(skipped)
        .map(String::as_str)
        .filter(|host| revertible.contains(host))
        .collect();
    (!left_out.is_empty()).then_some((succeeded, left_out))
}

/// The hosts of `change` a plan may revert: those it may have altered; after a rollback of it
/// that succeeded and left hosts out, only those (`notes` says so).
fn hosts_to_revert<'a>(
    state: &'a State,
    change: &'a ChangeRecord,
    notes: &mut Vec<String>,
) -> Result<BTreeSet<&'a str>> {
    let Some((previous, left_out)) = left_out_of(state, change) else {
        return Ok(revertible_hosts(change).collect());
    };
    notes.push(format!(
        "{} left out {} of {}, which this reverts alone: {}",
        previous.id(),
        plural(left_out.len(), "host"),
        change.id(),
        known_list(left_out.iter().map(|host| host.to_string()))
    ));
    Ok(left_out)
}

/// `hosts` less those `excluded` (a note names them); refused when none is left.
fn less_excluded<'a>(
    change: &ChangeRecord,
    hosts: &BTreeSet<&'a str>,
    excluded: &BTreeSet<&str>,
    notes: &mut Vec<String>,
) -> Result<BTreeSet<&'a str>> {
    let (left_out, reverted): (BTreeSet<&str>, BTreeSet<&str>) =
        hosts.iter().partition(|host| excluded.contains(*host));
    if left_out.is_empty() {
        return Ok(reverted);
    }
    if reverted.is_empty() {
        return Err(CoordinatorError::invalid(
            "options.exclude_hosts",
            format!(
                "leaves no host of {} ({}) to revert: leave that change out of the plan instead",
                change.id(),
                change.service
            ),
        ));
    }
    notes.push(format!(
        "{} left out as asked: they stay as they are, on {} {}{}: {}",
        plural(left_out.len(), "host"),
        change.service,
        change.version,
        if change.schema.is_empty() && change.flags.is_empty() {
            ""
        } else {
            " (while the plan turns its flags and schema back under them)"
        },
        known_list(left_out.iter().map(|host| host.to_string()))
    ));
    Ok(reverted)
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

/// The hosts that run `service` in `environment`, by id.
pub fn hosts_in_environment(state: &State, service: &str, environment: &str) -> Vec<String> {
    state
        .hosts
        .values()
        .filter(|host| host.services.iter().any(|name| name == service))
        .filter(|host| host_environment(host) == environment)
        .map(|host| host.host_id.clone())
        .collect()
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
    hosts: &BTreeSet<&str>,
    requested_canary: &str,
) -> Vec<(String, Vec<String>, bool)> {
    let mut regions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for &host in hosts {
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

/// Every service's providers, by name.
pub fn dependency_graph(state: &State) -> BTreeMap<String, Vec<String>> {
    state
        .services
        .values()
        .map(|service| (service.name.clone(), service.depends_on.clone()))
        .collect()
}

/// The cycle a service closes when it can reach itself through its providers, as the path that
/// closes it (`[a, b, a]`); `None` when it cannot.
pub fn cycle_through(graph: &BTreeMap<String, Vec<String>>, service: &str) -> Option<Vec<String>> {
    if !reachable(graph, service)
        .iter()
        .any(|reached| *reached == service)
    {
        return None;
    }
    find_cycle(graph, &[service.to_string()])
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
    let release = |service: &str, version: &str| release_of(state, service, version);
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
        message_incompatibilities(
            state,
            planned,
            (consumer, &consumer_version, consumer_release),
            &mut found,
            notes,
        );
    }
    found
}

/// The release record of `service` at `version`, if registered.
fn release_of<'a>(state: &'a State, service: &str, version: &str) -> Option<&'a ReleaseRecord> {
    state
        .releases
        .get(service)?
        .get(version)
        .map(|release| release.as_ref())
}

/// Message topics: each topic `consumer` reads (as the plan leaves it) must not be written by a
/// producer (as the plan leaves it) in a newer schema than it reads, where the plan moves
/// either. Messages a producer the plan reverts already queued may carry its current release's
/// schema: noted, since the queue's contents are not known here.
fn message_incompatibilities(
    state: &State,
    planned: &BTreeMap<String, &ChangeRecord>,
    (consumer, consumer_version, consumer_release): (&str, &str, &ReleaseRecord),
    found: &mut Vec<Incompatibility>,
    notes: &mut Vec<String>,
) {
    for (topic, &reads) in &consumer_release.consumes {
        for producer in state
            .services
            .keys()
            .filter(|producer| *producer != consumer)
        {
            let reverted = planned.get(producer.as_str());
            if reverted.is_none() && !planned.contains_key(consumer) {
                continue;
            }
            let producer_version = match reverted {
                Some(change) => change.previous_version.clone(),
                None => current_version(state, producer),
            };
            if let Some(&writes) = release_of(state, producer, &producer_version)
                .and_then(|release| release.produces.get(topic))
                && writes > reads
            {
                found.push(Incompatibility {
                    provider: producer.clone(),
                    consumer: consumer.to_string(),
                    detail: format!(
                        "topic {topic}: {consumer} {consumer_version} reads message schema up \
                         to {reads}, but {producer} {producer_version} writes {writes}: add \
                         {producer}'s change to the plan (or {consumer}'s out of it), or force \
                         it"
                    ),
                });
            }
            // What the producer's reverted release wrote may still wait in the queue.
            if let Some(change) = reverted
                && let Some(&wrote) = release_of(state, producer, &change.version)
                    .and_then(|release| release.produces.get(topic))
                && wrote > reads
            {
                notes.push(format!(
                    "topic {topic}: messages {producer} {} already queued may carry schema \
                     {wrote}, which {consumer} {consumer_version} does not read (it reads up to \
                     {reads}): let the topic drain before its wave",
                    change.version
                ));
            }
        }
    }
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
