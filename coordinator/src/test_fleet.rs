//! The one state-machine test fixture: a fleet built through `apply()` as the coordinator
//! would hold it, each command proposed as the leader proposes it (decided first, see
//! `state_machine::decision`) and kept as the log would hold it (golden logs are written from
//! it).

use crate::errors::CoordinatorError;
use crate::plan;
use crate::state_machine::*;

pub struct Fleet {
    pub state: State,
    pub index: u64,
    /// Every command that reached the log, as the log holds it.
    pub log: Vec<(u64, Vec<u8>)>,
}

impl Fleet {
    /// A new cluster, at this binary's cluster version, as a bootstrapped one starts.
    pub fn new() -> Self {
        let mut state = State {
            cluster_version: version::CURRENT,
            ..State::default()
        };
        if version::CURRENT >= version::AUDIT_STORE {
            state.audit.move_to_store();
        }
        Self {
            state,
            index: 0,
            log: Vec::new(),
        }
    }

    /// Proposes `kind` for `identity` at `at_ms` as the leader does: decided first (refused
    /// there, it never reaches the log), then logged and applied.
    pub fn propose(
        &mut self,
        identity: &str,
        request_id: &str,
        at_ms: u64,
        kind: CommandKind,
    ) -> Result<Outcome, CoordinatorError> {
        let mut command = Command {
            at_ms,
            identity: identity.into(),
            request_id: request_id.into(),
            audit_seed: String::new(),
            kind,
        };
        if self.state.cluster_version() >= version::SALTED_AUDIT {
            // As a leader chooses it, but the same on every run: fleets built twice compare.
            let seed = rewind_shared::digest::sha256_hex(&(self.index + 1).to_be_bytes());
            command.audit_seed = seed;
        }
        decision::prepare(&self.state, &mut command)?;
        self.index += 1;
        self.record(&command)
    }

    /// Logs and applies `command` as it is at the next index.
    /// Logs `command` and applies it as a member would: decoded from the entry's bytes.
    fn record(&mut self, command: &Command) -> Result<Outcome, CoordinatorError> {
        let entry =
            version::encode_entry(command, self.state.cluster_version()).expect("commands encode");
        let decoded = match version::decode_entry(self.index, &entry) {
            Ok(version::Decoded::Command(decoded)) => decoded,
            other => panic!("entry {} does not decode as written: {other:?}", self.index),
        };
        self.log.push((self.index, entry));
        apply_checked(&mut self.state, self.index, &decoded)
    }

    /// The time of the next command: a second per index.
    fn next_at_ms(&self) -> u64 {
        1_000 * (self.index + 1)
    }

    pub fn run_as(
        &mut self,
        identity: &str,
        request_id: &str,
        kind: CommandKind,
    ) -> Result<Outcome, CoordinatorError> {
        self.propose(identity, request_id, self.next_at_ms(), kind)
    }

    pub fn run(&mut self, kind: CommandKind) -> Result<Outcome, CoordinatorError> {
        self.run_as("operator", "", kind)
    }

    /// Applies `kind`, which must be accepted.
    pub fn apply(&mut self, kind: CommandKind) -> Outcome {
        self.run(kind).expect("command applies")
    }

    /// Applies at a chosen time; the error when it is refused.
    pub fn apply_at(&mut self, at_ms: u64, kind: CommandKind) -> Result<Outcome, CoordinatorError> {
        self.propose("operator", "", at_ms, kind)
    }

    /// Applies as `identity` at a chosen time.
    pub fn apply_as(
        &mut self,
        identity: &str,
        at_ms: u64,
        kind: CommandKind,
    ) -> Result<Outcome, CoordinatorError> {
        self.propose(identity, "", at_ms, kind)
    }

    /// Logs and applies `kind` as it is, undecided by a leader (as an entry proposed before the
    /// version was raised).
    pub fn run_raw(&mut self, kind: CommandKind) -> Result<Outcome, CoordinatorError> {
        let command = Command {
            at_ms: self.next_at_ms(),
            identity: "operator".into(),
            request_id: String::new(),
            audit_seed: String::new(),
            kind,
        };
        self.index += 1;
        self.record(&command)
    }

    /// Logs and applies `command` as it is, at the time it carries (one a test decided with
    /// `decision::prepare` and perhaps altered, or decided on a state that has moved since).
    pub fn run_prepared(&mut self, command: Command) -> Result<Outcome, CoordinatorError> {
        self.index += 1;
        self.record(&command)
    }

    /// Registers (or re-registers) `host` running one service, with no labels.
    pub fn register_host(&mut self, host: &str, service: &str) {
        self.apply(CommandKind::RegisterHost {
            host_id: host.into(),
            labels: Labels::default(),
            services: vec![service.into()],
            agent_version: "test".into(),
        });
    }

    /// A service `web` with a release v1 and v2 and hosts web-1, web-2.
    pub fn with_web() -> Self {
        Self::new().web()
    }

    /// A cluster from before versions (its state has none).
    pub fn legacy() -> Self {
        let mut fleet = Self::new();
        fleet.state.cluster_version = 0;
        fleet
    }

    /// This cluster with the fleet of [`Fleet::with_web`].
    pub fn web(self) -> Self {
        let mut fleet = self;
        for host in ["web-1", "web-2"] {
            fleet.register_host(host, "web");
        }
        fleet.apply(CommandKind::PutService {
            service: ServiceRecord {
                rto_s: 0,
                freeze: Vec::new(),
                drift_policy: Default::default(),
                isolate_after_failures: 0,
                name: "web".into(),
                depends_on: vec![],
                policy: HealthPolicy::default(),
                synthetics: vec![],
                rollback_steps: Vec::new(),
            },
        });
        for version in ["v1", "v2"] {
            fleet.apply(CommandKind::RegisterRelease {
                release: release(version, 'a'),
            });
        }
        fleet
    }

    /// Runs `step` to its end: starts it unless it runs already (from cluster version 13 a
    /// rollback step's success starts its host's next one), then finishes it.
    pub fn finish(&mut self, step: StepTarget, ok: bool) {
        if !self.running(&step) {
            self.apply(CommandKind::StepStarted { step: step.clone() });
        }
        self.apply(CommandKind::StepFinished {
            step,
            ok,
            detail: if ok { "done".into() } else { "boom".into() },
            snapshot_id: "snap-1".into(),
        });
    }

    /// Whether `step`, a rollback's step of a host, is running.
    pub fn running(&self, step: &StepTarget) -> bool {
        let StepTarget::Rollback {
            rollback,
            service,
            host_id,
            kind,
        } = step
        else {
            return false;
        };
        self.state.rollbacks.get(rollback).is_some_and(|record| {
            // The first match, as `apply()` finds a step.
            record
                .steps
                .iter()
                .find(|candidate| {
                    &candidate.service == service
                        && &candidate.host_id == host_id
                        && candidate.kind == *kind
                })
                .is_some_and(|found| found.progress.status == StepStatus::Running)
        })
    }

    /// The status and attempts of `host`'s first step of `kind` in `rollback`.
    pub fn rollback_step_progress(
        &self,
        rollback: u64,
        host: &str,
        kind: RollbackStepKind,
    ) -> (StepStatus, u32) {
        let step = self.state.rollbacks[&rollback]
            .steps
            .iter()
            .find(|step| step.host_id == host && step.kind == kind)
            .expect("the rollback has that step");
        (step.progress.status, step.progress.attempts)
    }

    /// Starts a change to `version` and runs it to Deployed.
    pub fn deploy_web(&mut self, version: &str) -> u64 {
        let Outcome::Change(change) = self.apply(start_change(version)) else {
            panic!("change outcome")
        };
        let hosts: Vec<String> = self.state.changes[&change]
            .hosts
            .iter()
            .map(|host| host.host_id.clone())
            .collect();
        for host in &hosts {
            self.finish(
                StepTarget::Capture {
                    change,
                    host_id: host.into(),
                },
                true,
            );
        }
        for host in &hosts {
            self.finish(
                StepTarget::Activate {
                    change,
                    host_id: host.into(),
                },
                true,
            );
        }
        change
    }

    /// Deploys `from` to web-1, web-2 and web-3 (registered), then `to` half way: every host
    /// captured, web-1 activated, web-2's activation `started` or not, web-3's not. The `to`
    /// change.
    pub fn deploy_web_half_way(&mut self, from: &str, to: &str, started: bool) -> u64 {
        let hosts = ["web-1", "web-2", "web-3"];
        let activation = |change, host: &str| StepTarget::Activate {
            change,
            host_id: host.into(),
        };
        let mut change = 0;
        for version in [from, to] {
            let Outcome::Change(started) = self.apply(start_change(version)) else {
                panic!("change outcome")
            };
            change = started;
            for host in hosts {
                let host_id = host.to_string();
                self.finish(StepTarget::Capture { change, host_id }, true);
            }
            let activated = if version == from {
                &hosts[..]
            } else {
                &hosts[..1]
            };
            for host in activated {
                self.finish(activation(change, host), true);
            }
        }
        if started {
            self.apply(CommandKind::StepStarted {
                step: activation(change, "web-2"),
            });
        }
        change
    }

    /// Confirms every audit entry but the newest archived, as an admin does after an export;
    /// the last entry confirmed.
    pub fn confirm_archive_all(&mut self) -> u64 {
        let audit = &self.state.audit;
        let through = audit.next_index() - 1;
        let first = audit.first_index().max(audit.archived_through() + 1);
        // The hash the export's first entry links to: the one before, or where the log starts.
        let anchor = match audit.get(first - 1).unwrap() {
            Some(before) => before.hash.clone(),
            None => audit.verify().anchor_hash,
        };
        let last = audit.get(through).unwrap().unwrap().hash.clone();
        self.apply(CommandKind::ConfirmAuditArchive {
            first,
            through,
            manifest_hash: rewind_shared::audit::manifest_hash(first, through, &anchor, &last),
            reason: "archive".into(),
        });
        through
    }

    pub fn must_start_rollback(&mut self, change: u64, trigger: Trigger) -> u64 {
        let kind = rollback_of(change, trigger);
        let Outcome::Rollback(rollback) = self.apply(kind) else {
            panic!("rollback outcome")
        };
        rollback
    }

    pub fn service(&mut self, name: &str, depends_on: &[&str]) {
        self.apply(CommandKind::PutService {
            service: ServiceRecord {
                rto_s: 0,
                freeze: Vec::new(),
                drift_policy: Default::default(),
                isolate_after_failures: 0,
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
                produces: Default::default(),
                consumes: Default::default(),
            },
        });
    }

    /// Deploys `version` of `service` on all its hosts; returns the change number.
    pub fn deploy(&mut self, service: &str, version: &str) -> u64 {
        let Outcome::Change(change) = self.apply(CommandKind::StartChange(StartChange {
            break_glass: false,
            service: service.into(),
            version: version.into(),
            host_ids: vec![],
            reason: String::new(),
            baseline: HealthAggregate::default(),
            flags_on: vec![],
            migrations: vec![],
        })) else {
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

    /// Runs schema transaction `txn` through its four phases on `shards`, committing: each
    /// checks at `before` and prepares and verifies at `after`.
    pub fn commit_schema_txn(&mut self, txn: u64, shards: &[&str], (before, after): (&str, &str)) {
        let report = |host: &str, fingerprint: &str| ShardReportRecord {
            database_identity: host.into(),
            fingerprint: fingerprint.into(),
            ..ShardReportRecord::default()
        };
        let phase = |fleet: &mut Self, phase: ShardPhase, fingerprint: &str| {
            for host in shards {
                let step = StepTarget::Schema {
                    txn,
                    phase,
                    host_id: host.to_string(),
                };
                fleet.apply(CommandKind::StepStarted { step: step.clone() });
                fleet.apply(CommandKind::SchemaStepFinished {
                    step,
                    ok: true,
                    detail: "done".into(),
                    report: report(host, fingerprint),
                });
            }
        };
        phase(self, ShardPhase::Check, before);
        phase(self, ShardPhase::Prepare, after);
        self.apply(CommandKind::DecideSchemaTxn {
            txn,
            commit: true,
            reason: "every shard prepared alike".into(),
        });
        phase(self, ShardPhase::Resolve, "");
        phase(self, ShardPhase::Verify, after);
        let record = &self.state.schema_txns[&txn];
        assert!(record.ok(), "{record:?}");
    }

    pub fn plan(
        &self,
        changes: &[u64],
        options: &PlanOptions,
    ) -> Result<plan::Plan, CoordinatorError> {
        plan::build(&self.state, changes, options, Trigger::Manual)
    }
}

pub fn release(version: &str, digit: char) -> ReleaseRecord {
    ReleaseRecord {
        service: "web".into(),
        version: version.into(),
        artifact_digest: format!("sha256:{}", digit.to_string().repeat(64)),
        commit: "abc".into(),
        registered_at_ms: 0,
        api_version: 0,
        requires: Default::default(),
        produces: Default::default(),
        consumes: Default::default(),
    }
}

pub fn rollback_of(change: u64, trigger: Trigger) -> CommandKind {
    CommandKind::StartRollback(StartRollback {
        changes: vec![change],
        options: PlanOptions::default(),
        plan_hash: String::new(),
        reason: "bad".into(),
        trigger,
        break_glass: false,
        planned: None,
    })
}

pub fn start_change(version: &str) -> CommandKind {
    CommandKind::StartChange(StartChange {
        break_glass: false,
        service: "web".into(),
        version: version.into(),
        host_ids: vec![],
        reason: "release".into(),
        baseline: HealthAggregate::default(),
        flags_on: vec![],
        migrations: vec![],
    })
}
