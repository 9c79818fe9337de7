//! What a call acts on, as access targets: the environments and services of a change, a
//! rollback, a drill, a schema transaction, a host. Something unknown has no targets: handlers
//! answer `NOT_FOUND` for it before anything is proposed (an empty list would allow anything).

use crate::access::Target;
use crate::state_machine::{HostRecord, SchemaOwner, State};

pub use crate::plan::host_environment as environment_of;

/// A change's service in every environment it touches (see [`crate::plan::change_environments`]),
/// in the state or (cluster version 8) archived.
pub fn change(state: &State, number: u64) -> Vec<Target> {
    match state.change_or_archived(number) {
        Ok(Some(change)) => of_change(state, &change),
        Ok(None) => Vec::new(),
        // An archive that cannot be read: only whoever may act on the whole cluster sees it.
        Err(_) => vec![Target::Cluster],
    }
}

/// A change's service in every environment it touches, for a record the state need not hold
/// (an archived one).
pub fn of_change(state: &State, change: &crate::state_machine::ChangeRecord) -> Vec<Target> {
    crate::plan::change_environments(state, change)
        .into_iter()
        .map(|environment| Target::scoped(environment, &change.service))
        .collect()
}

/// Every change a rollback reverts, in the state or archived.
pub fn rollback(state: &State, number: u64) -> Vec<Target> {
    if let Some(record) = state.rollbacks.get(&number) {
        return changes(state, &record.changes);
    }
    match state.archived_rollback(number) {
        Ok(Some(archived)) => changes(state, &archived.rollback.changes),
        Ok(None) => Vec::new(),
        Err(_) => vec![Target::Cluster],
    }
}

pub fn changes(state: &State, numbers: &[u64]) -> Vec<Target> {
    numbers
        .iter()
        .flat_map(|&number| change(state, number))
        .collect()
}

/// What a request for approval acts on: its deploy's service in its hosts' environments, or the
/// environments and services of the changes it rolls back.
pub fn request(state: &State, record: &crate::state_machine::ApprovalRequest) -> Vec<Target> {
    match &record.deploy {
        // The environments it was filed for, and those its hosts are in now: neither a
        // relabelled nor a removed host widens who may see or approve it.
        Some(spec) => {
            let mut targets: Vec<Target> = record
                .environments
                .iter()
                .map(|environment| Target::scoped(environment, &spec.service))
                .collect();
            targets.extend(
                new_change(state, &spec.service, &spec.hosts)
                    .into_iter()
                    .filter(|target| !matches!(target, Target::Service(_))),
            );
            targets
        }
        None => changes(state, &record.changes),
    }
}

/// A drill's change, and its service in the environment drilled.
pub fn drill(state: &State, number: u64) -> Vec<Target> {
    let Some(drill) = state.drills.get(&number) else {
        return Vec::new();
    };
    drill_of(state, drill.change, &drill.environment)
}

/// Drilling `change`'s migrations in `environment`.
pub fn drill_of(state: &State, change: u64, environment: &str) -> Vec<Target> {
    let mut targets = self::change(state, change);
    match state.change_or_archived(change) {
        Ok(Some(record)) => targets.push(Target::scoped(environment, &record.service)),
        Ok(None) => {}
        Err(_) => targets.push(Target::Cluster),
    }
    targets
}

/// What a schema transaction belongs to.
pub fn schema_txn(state: &State, number: u64) -> Vec<Target> {
    match state.schema_txns.get(&number).map(|txn| txn.owner) {
        Some(SchemaOwner::Change { change, .. }) => self::change(state, change),
        Some(SchemaOwner::Rollback { rollback, .. }) => self::rollback(state, rollback),
        Some(SchemaOwner::Drill { drill, .. }) => self::drill(state, drill),
        None => Vec::new(),
    }
}

/// A host's services in its environment; a host that runs none, its whole environment.
pub fn host(host: &HostRecord) -> Vec<Target> {
    let environment = environment_of(host);
    if host.services.is_empty() {
        return vec![Target::scoped(
            environment,
            crate::access::policy::ScopePattern::ANY,
        )];
    }
    host.services
        .iter()
        .map(|service| Target::scoped(environment, service))
        .collect()
}

/// Where a change of `service` to `host_ids` (empty: every host of the service) would run.
/// With no such host, the service everywhere: the change will be refused anyway.
pub fn new_change(state: &State, service: &str, host_ids: &[String]) -> Vec<Target> {
    let mut environments: Vec<&str> = state
        .hosts
        .values()
        .filter(|host| {
            if host_ids.is_empty() {
                host.services.iter().any(|name| name == service)
            } else {
                host_ids.contains(&host.host_id)
            }
        })
        .map(environment_of)
        .collect();
    environments.sort_unstable();
    environments.dedup();
    if environments.is_empty() {
        return vec![Target::Service(service.to_string())];
    }
    environments
        .into_iter()
        .map(|environment| Target::scoped(environment, service))
        .collect()
}

/// What a rollback fire drill acts on: its service in its environment.
pub fn fire_drill(state: &State, number: u64) -> Vec<Target> {
    state
        .fire_drills
        .get(&number)
        .map(|drill| vec![Target::scoped(&drill.environment, &drill.service)])
        .unwrap_or_default()
}
