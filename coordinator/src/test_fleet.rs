//! A fleet built through `apply()` for planning and trigger tests.

use crate::errors::CoordinatorError;
use crate::plan;
use crate::state_machine::*;

/// A fleet built through `apply()`, as the coordinator would hold it.
pub struct Fleet {
    pub state: State,
    pub index: u64,
}

impl Fleet {
    /// A new cluster, at this binary's cluster version.
    pub fn new() -> Self {
        Self {
            state: State {
                cluster_version: version::CURRENT,
                ..State::default()
            },
            index: 0,
        }
    }

    pub fn apply(&mut self, kind: CommandKind) -> Outcome {
        self.index += 1;
        let command = Command {
            at_ms: 1_000 * self.index,
            identity: "operator".into(),
            request_id: String::new(),
            kind,
        };
        apply_as_leader(&mut self.state, self.index, command).expect("applies")
    }

    /// Applies at a chosen time; the error when it is refused.
    pub fn apply_at(&mut self, at_ms: u64, kind: CommandKind) -> Result<Outcome, CoordinatorError> {
        self.apply_as("operator", at_ms, kind)
    }

    /// Applies as `identity` at a chosen time.
    pub fn apply_as(
        &mut self,
        identity: &str,
        at_ms: u64,
        kind: CommandKind,
    ) -> Result<Outcome, CoordinatorError> {
        self.index += 1;
        let command = Command {
            at_ms,
            identity: identity.into(),
            request_id: String::new(),
            kind,
        };
        apply_as_leader(&mut self.state, self.index, command)
    }

    pub fn service(&mut self, name: &str, depends_on: &[&str]) {
        self.apply(CommandKind::PutService {
            service: ServiceRecord {
                name: name.into(),
                depends_on: depends_on.iter().map(|name| name.to_string()).collect(),
                policy: HealthPolicy::default(),
                synthetics: vec![],
                rollback_steps: Vec::new(),
            },
        });
    }

    pub fn host(&mut self, host_id: &str, region: &str, services: &[&str]) {
        self.host_in(host_id, region, "", services);
    }

    pub fn host_in(&mut self, host_id: &str, region: &str, environment: &str, services: &[&str]) {
        self.apply(CommandKind::RegisterHost {
            host_id: host_id.into(),
            labels: Labels {
                region: region.into(),
                environment: environment.into(),
                ..Labels::default()
            },
            services: services.iter().map(|name| name.to_string()).collect(),
            agent_version: String::new(),
        });
    }

    pub fn release(&mut self, service: &str, version: &str, api: u32, requires: &[(&str, u32)]) {
        self.apply(CommandKind::RegisterRelease {
            release: ReleaseRecord {
                service: service.into(),
                version: version.into(),
                artifact_digest: format!("sha256:{}", "a".repeat(64)),
                commit: String::new(),
                registered_at_ms: 0,
                api_version: api,
                requires: requires
                    .iter()
                    .map(|(provider, version)| (provider.to_string(), *version))
                    .collect(),
            },
        });
    }

    /// Deploys `version` of `service` on all its hosts; returns the change number.
    pub fn deploy(&mut self, service: &str, version: &str) -> u64 {
        let Outcome::Change(change) = self.apply(CommandKind::StartChange {
            break_glass: false,
            service: service.into(),
            version: version.into(),
            host_ids: vec![],
            reason: String::new(),
            baseline: HealthAggregate::default(),
            flags_on: vec![],
            migrations: vec![],
        }) else {
            panic!("a change")
        };
        let hosts: Vec<String> = self.state.changes[&change]
            .hosts
            .iter()
            .map(|host| host.host_id.clone())
            .collect();
        let snapshots: Vec<(&str, String)> = hosts
            .iter()
            .map(|host_id| (host_id.as_str(), format!("snap-{host_id}")))
            .collect();
        let snapshots: Vec<(&str, &str)> = snapshots
            .iter()
            .map(|(host, snapshot)| (*host, snapshot.as_str()))
            .collect();
        self.capture_and_activate(change, &snapshots);
        change
    }

    /// Captures on every host (recording its snapshot id, which may be empty), then activates
    /// everywhere, each step succeeding.
    pub fn capture_and_activate(&mut self, change: u64, snapshots: &[(&str, &str)]) {
        for capture in [true, false] {
            for (host_id, snapshot_id) in snapshots {
                let host_id = host_id.to_string();
                let step = if capture {
                    StepTarget::Capture { change, host_id }
                } else {
                    StepTarget::Activate { change, host_id }
                };
                self.apply(CommandKind::StepStarted { step: step.clone() });
                self.apply(CommandKind::StepFinished {
                    step,
                    ok: true,
                    detail: String::new(),
                    snapshot_id: snapshot_id.to_string(),
                });
            }
        }
    }

    pub fn plan(
        &self,
        changes: &[u64],
        options: &PlanOptions,
    ) -> Result<plan::Plan, CoordinatorError> {
        plan::build(&self.state, changes, options, Trigger::Manual)
    }
}
