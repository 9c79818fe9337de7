//! Readiness: what a change advisory review wants to know before a plan runs (which hosts are
//! connected and healthy, how long it should take), from the leader's view.

use super::*;

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
    /// "host: service: what changed" for each host of the plan whose service changed since
    /// rewind last put it there (its restore would wipe that), as its agent last reported.
    pub drifted_hosts: Vec<String>,
    /// The estimate's p50.
    pub expected_duration_ms: u64,
    pub estimate: super::Estimate,
}

/// What the answering member knows of a host beyond the replicated state.
pub trait HostView {
    fn connected(&self, host_id: &str) -> bool;
    /// Release versions the host last reported holding for `service`; `None` without a report.
    fn retained(&self, host_id: &str, service: &str) -> Option<Vec<String>>;
    /// What the host last reported changed on `service` since rewind last put it there.
    fn drift(&self, host_id: &str, service: &str) -> Vec<String>;
}

/// Each host of the plan whose service drifted, with what changed (hosts left out are not in
/// the plan's waves).
pub fn drifted_hosts(plan: &Plan, view: &impl HostView) -> Vec<(String, String, Vec<String>)> {
    let mut drifted = Vec::new();
    for wave in &plan.waves {
        for host in wave.hosts() {
            let lines = view.drift(&host, &wave.service);
            if !lines.is_empty() {
                drifted.push((host, wave.service.clone(), lines));
            }
        }
    }
    drifted
}

/// One line per drifted host: "web-2: web: config/app.toml: content differs; ...".
pub fn drift_lines(drifted: &[(String, String, Vec<String>)]) -> Vec<String> {
    drifted
        .iter()
        .map(|(host, service, lines)| format!("{host}: {service}: {}", lines.join("; ")))
        .collect()
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
    let estimate = super::estimate::estimate(state, plan);
    Readiness {
        drifted_hosts: drift_lines(&drifted_hosts(plan, view)),
        disconnected_hosts: disconnected,
        missing_releases,
        missing_artifacts,
        expected_duration_ms: estimate.p50_ms,
        estimate,
    }
}

/// The options of an automatic rollback of `service` (its latest change in `environment`), as
/// the service's drift policy says what to do with hosts whose service drifted (`drift` gives
/// what a host last reported changed): `skip` leaves them out, unless every host of the change
/// drifted or the change migrated a schema (their agents then refuse each restore, and the
/// paused rollback calls a person);
/// `overwrite` reverts them anyway. Below cluster version 10, or with no drift, unchanged.
pub fn with_drift_policy(
    state: &State,
    service: &str,
    environment: &str,
    mut options: PlanOptions,
    drift: impl Fn(&str, &str) -> Vec<String>,
) -> PlanOptions {
    if state.cluster_version() < crate::state_machine::version::DRIFT_GUARD {
        return options;
    }
    let Some(change) = crate::state_machine::latest_change(state, service, environment) else {
        return options;
    };
    let hosts: Vec<&str> = revertible_hosts(change).collect();
    let drifted: Vec<String> = hosts
        .iter()
        .filter(|host| !drift(host, service).is_empty())
        .map(|host| host.to_string())
        .collect();
    if drifted.is_empty() {
        return options;
    }
    match policy_of(state, service) {
        DriftPolicy::Overwrite => options.overwrite_drift = true,
        // Hosts left out would run the new release against the reverted schema, and leaving
        // every host out reverts nothing: none is left out, so each drifted host's agent
        // refuses its restore and the paused rollback calls a person.
        DriftPolicy::Skip if drifted.len() < hosts.len() && change.schema.is_empty() => {
            options.exclude_hosts = drifted
        }
        DriftPolicy::Skip => {}
    }
    options
}

fn policy_of(state: &State, service: &str) -> DriftPolicy {
    state
        .services
        .get(service)
        .map(|record| record.drift_policy)
        .unwrap_or_default()
}
