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
    /// The estimate's p50.
    pub expected_duration_ms: u64,
    pub estimate: super::Estimate,
}

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
    let estimate = super::estimate::estimate(state, plan);
    Readiness {
        disconnected_hosts: disconnected,
        missing_releases,
        missing_artifacts,
        expected_duration_ms: estimate.p50_ms,
        estimate,
    }
}
