//! Tests of `apply()`: feed commands, assert the state.

use super::*;
use crate::errors::CoordinatorError;

pub(super) struct Harness {
    pub(super) state: State,
    pub(super) index: u64,
    /// Every command run, as the log would hold it: the golden log is written from this.
    pub(super) log: Vec<(u64, Vec<u8>)>,
}

impl Harness {
    /// A new cluster: at this binary's cluster version, as a bootstrapped one starts.
    fn new() -> Self {
        Self {
            state: State {
                cluster_version: version::CURRENT,
                ..State::default()
            },
            index: 0,
            log: Vec::new(),
        }
    }

    pub(super) fn run_as(
        &mut self,
        identity: &str,
        request_id: &str,
        kind: CommandKind,
    ) -> Result<Outcome, CoordinatorError> {
        let index = self.index + 1;
        let mut command = Command {
            at_ms: 1_000 * index,
            identity: identity.into(),
            request_id: request_id.into(),
            kind,
        };
        // As the leader proposes: decided first; refused there, it never reaches the log.
        super::decision::prepare(&self.state, &mut command)?;
        self.index = index;
        let entry =
            version::encode_entry(&command, self.state.cluster_version()).expect("commands encode");
        self.log.push((self.index, entry));
        super::apply_checked(&mut self.state, self.index, &command)
    }

    /// Logs and applies `kind` as it is, undecided by a leader (as an entry proposed before the
    /// version was raised, or decided on a state that has moved since).
    pub(super) fn run_raw(&mut self, kind: CommandKind) -> Result<Outcome, CoordinatorError> {
        self.index += 1;
        let command = Command {
            at_ms: 1_000 * self.index,
            identity: "operator".into(),
            request_id: String::new(),
            kind,
        };
        let entry =
            version::encode_entry(&command, self.state.cluster_version()).expect("commands encode");
        self.log.push((self.index, entry));
        super::apply_checked(&mut self.state, self.index, &command)
    }

    /// Logs and applies `command` as it is, at the time it carries (one a test decided with
    /// `decision::prepare` and perhaps altered).
    pub(super) fn run_prepared(&mut self, command: Command) -> Result<Outcome, CoordinatorError> {
        self.index += 1;
        let entry =
            version::encode_entry(&command, self.state.cluster_version()).expect("commands encode");
        self.log.push((self.index, entry));
        super::apply_checked(&mut self.state, self.index, &command)
    }

    pub(super) fn run(&mut self, kind: CommandKind) -> Result<Outcome, CoordinatorError> {
        self.run_as("operator", "", kind)
    }

    pub(super) fn must(&mut self, kind: CommandKind) -> Outcome {
        self.run(kind).expect("command applies")
    }

    /// Registers (or re-registers) `host` running one service, with no labels.
    pub(super) fn register_host(&mut self, host: &str, service: &str) {
        self.must(CommandKind::RegisterHost {
            host_id: host.into(),
            labels: Labels::default(),
            services: vec![service.into()],
            agent_version: "test".into(),
        });
    }

    /// A service `web` with a release v1 and v2 and hosts web-1, web-2.
    pub(super) fn with_fleet() -> Self {
        Self::new().fleet()
    }

    /// A cluster from before versions (its state has none).
    pub(super) fn legacy() -> Self {
        let mut harness = Self::new();
        harness.state.cluster_version = 0;
        harness
    }

    /// This cluster with the fleet of [`Harness::with_fleet`].
    pub(super) fn fleet(self) -> Self {
        let mut harness = self;
        for host in ["web-1", "web-2"] {
            harness.register_host(host, "web");
        }
        harness.must(CommandKind::PutService {
            service: ServiceRecord {
                name: "web".into(),
                depends_on: vec![],
                policy: HealthPolicy::default(),
                synthetics: vec![],
                rollback_steps: Vec::new(),
            },
        });
        for version in ["v1", "v2"] {
            harness.must(CommandKind::RegisterRelease {
                release: release(version, 'a'),
            });
        }
        harness
    }

    pub(super) fn finish(&mut self, step: StepTarget, ok: bool) {
        self.must(CommandKind::StepStarted { step: step.clone() });
        self.must(CommandKind::StepFinished {
            step,
            ok,
            detail: if ok { "done".into() } else { "boom".into() },
            snapshot_id: "snap-1".into(),
        });
    }

    /// Starts a change to `version` and runs it to Deployed.
    pub(super) fn deploy(&mut self, version: &str) -> u64 {
        let Outcome::Change(change) = self.must(start_change(version)) else {
            panic!("change outcome")
        };
        for host in ["web-1", "web-2"] {
            self.finish(
                StepTarget::Capture {
                    change,
                    host_id: host.into(),
                },
                true,
            );
        }
        for host in ["web-1", "web-2"] {
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

    pub(super) fn must_start_rollback(&mut self, change: u64, trigger: Trigger) -> u64 {
        let kind = rollback_of(change, trigger);
        let Outcome::Rollback(rollback) = self.must(kind) else {
            panic!("rollback outcome")
        };
        rollback
    }
}

pub(super) fn release(version: &str, digit: char) -> ReleaseRecord {
    ReleaseRecord {
        service: "web".into(),
        version: version.into(),
        artifact_digest: format!("sha256:{}", digit.to_string().repeat(64)),
        commit: "abc".into(),
        registered_at_ms: 0,
        api_version: 0,
        requires: Default::default(),
    }
}

pub(super) fn rollback_of(change: u64, trigger: Trigger) -> CommandKind {
    CommandKind::StartRollback {
        changes: vec![change],
        options: PlanOptions::default(),
        plan_hash: String::new(),
        reason: "bad".into(),
        trigger,
        break_glass: false,
        planned: None,
    }
}

/// Passes the gate of `wave` (started and finished healthy).
pub(super) fn pass_gate(harness: &mut Harness, rollback: u64, wave: u32) {
    harness.finish(StepTarget::Gate { rollback, wave }, true);
}

pub(super) fn start_change(version: &str) -> CommandKind {
    CommandKind::StartChange {
        break_glass: false,
        service: "web".into(),
        version: version.into(),
        host_ids: vec![],
        reason: "release".into(),
        baseline: HealthAggregate::default(),
        flags_on: vec![],
        migrations: vec![],
    }
}

pub(super) fn rollback_step(rollback: u64, host: &str, kind: RollbackStepKind) -> StepTarget {
    StepTarget::Rollback {
        rollback,
        service: "web".into(),
        host_id: host.into(),
        kind,
    }
}

#[test]
fn a_change_moves_from_capture_to_deployed_and_records_snapshots() {
    let mut harness = Harness::with_fleet();
    let first = harness.deploy("v1");
    let second = harness.deploy("v2");
    let change = &harness.state.changes[&second];
    assert_eq!(change.status, ChangeStatus::Deployed);
    assert_eq!(change.previous_version, "v1");
    assert!(change.hosts.iter().all(|host| host.snapshot_id == "snap-1"));
    assert_eq!(harness.state.changes[&first].previous_version, "");
    assert_eq!(current_version(&harness.state, "web"), "v2");
}

#[test]
fn a_failed_capture_fails_the_change_and_nothing_is_activated() {
    let mut harness = Harness::with_fleet();
    let Outcome::Change(change) = harness.must(start_change("v1")) else {
        panic!()
    };
    harness.finish(
        StepTarget::Capture {
            change,
            host_id: "web-1".into(),
        },
        false,
    );
    let record = &harness.state.changes[&change];
    assert_eq!(record.status, ChangeStatus::Failed);
    assert!(
        record.reason.contains("capture failed on web-1"),
        "{}",
        record.reason
    );
    let activate = StepTarget::Activate {
        change,
        host_id: "web-2".into(),
    };
    assert!(matches!(
        harness.run(CommandKind::StepStarted { step: activate }),
        Err(CoordinatorError::StepNotStartable { .. })
    ));
}

#[test]
fn a_rollback_that_verifies_every_host_succeeds_and_marks_the_change_rolled_back() {
    let mut harness = Harness::with_fleet();
    harness.deploy("v1");
    let change = harness.deploy("v2");
    let rollback = harness.must_start_rollback(change, Trigger::Manual);
    for host in ["web-1", "web-2"] {
        for kind in RollbackStepKind::ALL {
            assert_eq!(
                harness.state.rollbacks[&rollback].status,
                RollbackStatus::Running
            );
            harness.finish(rollback_step(rollback, host, kind), true);
        }
    }
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Running,
        "the wave's gate has not passed yet"
    );
    pass_gate(&mut harness, rollback, 0);
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Succeeded
    );
    assert_eq!(
        harness.state.changes[&change].status,
        ChangeStatus::RolledBack
    );
    assert_eq!(current_version(&harness.state, "web"), "v1");
}

#[test]
fn a_failed_step_pauses_the_rollback_once_nothing_runs_and_names_the_host() {
    let mut harness = Harness::with_fleet();
    let change = harness.deploy("v2");
    let rollback = harness.must_start_rollback(change, Trigger::Manual);
    for host in ["web-1", "web-2"] {
        harness.finish(rollback_step(rollback, host, RollbackStepKind::Drain), true);
    }
    harness.must(CommandKind::StepStarted {
        step: rollback_step(rollback, "web-1", RollbackStepKind::Restore),
    });
    harness.must(CommandKind::StepStarted {
        step: rollback_step(rollback, "web-2", RollbackStepKind::Restore),
    });
    harness.must(CommandKind::StepFinished {
        step: rollback_step(rollback, "web-1", RollbackStepKind::Restore),
        ok: false,
        detail: "disk full".into(),
        snapshot_id: String::new(),
    });
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Running,
        "web-2 is still running"
    );
    harness.must(CommandKind::StepFinished {
        step: rollback_step(rollback, "web-2", RollbackStepKind::Restore),
        ok: true,
        detail: String::new(),
        snapshot_id: String::new(),
    });
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Running,
        "web-2 began, so it is taken to the end of its steps"
    );
    harness.finish(
        rollback_step(rollback, "web-2", RollbackStepKind::Restart),
        true,
    );
    harness.finish(
        rollback_step(rollback, "web-2", RollbackStepKind::Verify),
        true,
    );
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Running,
        "web-2 still has to be undrained"
    );
    harness.finish(
        rollback_step(rollback, "web-2", RollbackStepKind::Undrain),
        true,
    );
    let record = &harness.state.rollbacks[&rollback];
    assert_eq!(record.status, RollbackStatus::Paused);
    assert_eq!(record.failed_hosts, vec!["web-1".to_string()]);
    assert!(record.paused_reason.contains("disk full"));
    assert_eq!(record.escalations.len(), 1);
    assert_eq!(
        harness.state.changes[&change].status,
        ChangeStatus::Deployed
    );
    // A person retries web-1: its failed step starts over with fresh attempts.
    harness.must(CommandKind::ControlRollback {
        rollback,
        action: RollbackAction::Resume,
        reason: "disk cleaned".into(),
    });
    let record = &harness.state.rollbacks[&rollback];
    assert_eq!(record.status, RollbackStatus::Running);
    assert!(record.failed_hosts.is_empty());
    let restore = record
        .steps
        .iter()
        .find(|step| step.host_id == "web-1" && step.kind == RollbackStepKind::Restore)
        .unwrap();
    assert_eq!(
        (restore.progress.status, restore.progress.attempts),
        (StepStatus::Pending, 0)
    );
}

#[test]
fn skipping_every_host_of_a_wave_skips_its_gate_and_ends_the_rollback() {
    let mut harness = Harness::with_fleet();
    let change = harness.deploy("v2");
    let rollback = harness.must_start_rollback(change, Trigger::Manual);
    for host in ["web-1", "web-2"] {
        harness.must(CommandKind::SkipHost {
            rollback,
            host_id: host.into(),
            reason: "keep v2 there".into(),
        });
    }
    let record = &harness.state.rollbacks[&rollback];
    assert_eq!(record.status, RollbackStatus::Succeeded);
    assert_eq!(record.waves[0].gate.status, StepStatus::Skipped);
    assert!(
        record.outcome_detail.contains("web-1, web-2"),
        "{}",
        record.outcome_detail
    );
    let error = harness
        .run(CommandKind::SkipHost {
            rollback,
            host_id: "web-1".into(),
            reason: "again".into(),
        })
        .unwrap_err();
    assert!(
        matches!(error, CoordinatorError::RollbackNotControllable { .. }),
        "{error}"
    );
}

#[test]
fn a_rollback_refuses_a_plan_that_changed_since_it_was_shown() {
    let mut harness = Harness::with_fleet();
    let change = harness.deploy("v2");
    let CommandKind::StartRollback {
        changes, options, ..
    } = rollback_of(change, Trigger::Manual)
    else {
        unreachable!()
    };
    let shown = crate::plan::build(&harness.state, &changes, &options, Trigger::Manual)
        .unwrap()
        .hash;
    let wider = PlanOptions {
        max_parallel: 2,
        max_unavailable: 2,
        ..options.clone()
    };
    let error = harness
        .run(CommandKind::StartRollback {
            changes: changes.clone(),
            options: wider,
            plan_hash: shown.clone(),
            reason: "r".into(),
            trigger: Trigger::Manual,
            break_glass: false,
            planned: None,
        })
        .unwrap_err();
    assert!(
        matches!(error, CoordinatorError::PlanChanged { .. }),
        "{error}"
    );
    harness.must(CommandKind::StartRollback {
        changes,
        options,
        plan_hash: shown.clone(),
        reason: "r".into(),
        trigger: Trigger::Manual,
        break_glass: false,
        planned: None,
    });
    assert_eq!(harness.state.rollbacks[&1].plan_hash, shown);
}

#[test]
fn only_one_automatic_rollback_per_change_and_none_while_one_runs() {
    let mut harness = Harness::with_fleet();
    let change = harness.deploy("v2");
    let rollback = harness.must_start_rollback(change, Trigger::Automatic);
    let again = rollback_of(change, Trigger::Manual);
    assert!(matches!(
        harness.run(again.clone()),
        Err(CoordinatorError::RollbackInProgress { .. })
    ));
    harness.must(CommandKind::ControlRollback {
        rollback,
        action: RollbackAction::Abort,
        reason: "operator".into(),
    });
    let automatic = rollback_of(change, Trigger::Automatic);
    assert!(matches!(
        harness.run(automatic),
        Err(CoordinatorError::AlreadyRolledBack { .. })
    ));
    // A person may retry after an abort.
    assert!(matches!(harness.run(again), Ok(Outcome::Rollback(2))));
}

#[test]
fn pause_resume_and_abort_follow_the_allowed_transitions() {
    let mut harness = Harness::with_fleet();
    let change = harness.deploy("v2");
    let rollback = harness.must_start_rollback(change, Trigger::Manual);
    let control = |action| CommandKind::ControlRollback {
        rollback,
        action,
        reason: "r".into(),
    };
    assert!(harness.run(control(RollbackAction::Resume)).is_err());
    harness.must(control(RollbackAction::Pause));
    let start = CommandKind::StepStarted {
        step: rollback_step(rollback, "web-1", RollbackStepKind::Restore),
    };
    assert!(
        harness.run(start).is_err(),
        "a paused rollback starts no step"
    );
    harness.must(control(RollbackAction::Resume));
    harness.must(control(RollbackAction::Abort));
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Aborted
    );
    assert!(matches!(
        harness.run(control(RollbackAction::Pause)),
        Err(CoordinatorError::RollbackNotControllable { .. })
    ));
}

#[test]
fn rejected_commands_change_nothing_but_the_applied_index() {
    let mut harness = Harness::with_fleet();
    let change = harness.deploy("v2");
    let rejected = [
        start_change("v9"),
        CommandKind::StartChange {
            break_glass: false,
            service: "nope".into(),
            version: "v1".into(),
            host_ids: vec![],
            reason: String::new(),
            baseline: HealthAggregate::default(),
            flags_on: vec![],
            migrations: vec![],
        },
        CommandKind::StartChange {
            break_glass: false,
            service: "web".into(),
            version: "v1".into(),
            host_ids: vec!["ghost".into()],
            reason: String::new(),
            baseline: HealthAggregate::default(),
            flags_on: vec![],
            migrations: vec![],
        },
        CommandKind::RegisterRelease {
            release: release("v1", 'b'),
        },
        rollback_of(99, Trigger::Manual),
        CommandKind::StepFinished {
            step: StepTarget::Capture {
                change,
                host_id: "web-1".into(),
            },
            ok: true,
            detail: String::new(),
            snapshot_id: String::new(),
        },
        CommandKind::PutService {
            service: ServiceRecord {
                name: "db".into(),
                depends_on: vec!["db".into()],
                policy: HealthPolicy::default(),
                synthetics: vec![],
                rollback_steps: Vec::new(),
            },
        },
    ];
    for kind in rejected {
        let before = harness.state.clone();
        let error = harness.run(kind.clone()).expect_err("rejected");
        let mut after = harness.state.clone();
        after.applied_index = before.applied_index;
        assert_eq!(after, before, "{kind:?} changed state ({error})");
    }
}

#[test]
fn errors_name_what_is_known() {
    let mut harness = Harness::with_fleet();
    let error = harness.run(start_change("v9")).unwrap_err().to_string();
    assert_eq!(
        error,
        "no release v9 of service web: known versions are v1, v2"
    );
    let rollback = rollback_of(7, Trigger::Manual);
    assert_eq!(
        harness.run(rollback).unwrap_err().to_string(),
        "no change ch-7: known changes are none"
    );
}

#[test]
fn a_repeated_request_id_returns_the_first_outcome_and_acts_once() {
    let mut harness = Harness::with_fleet();
    let first = harness
        .run_as("operator", "req-1", start_change("v1"))
        .unwrap();
    let audit_len = harness.state.audit.len();
    let second = harness
        .run_as("operator", "req-1", start_change("v1"))
        .unwrap();
    assert_eq!(first, second);
    assert_eq!(harness.state.changes.len(), 1);
    assert_eq!(harness.state.audit.len(), audit_len);
    // Another client's request id does not collide.
    let other = harness.run_as("someone-else", "req-1", start_change("v1"));
    assert!(matches!(
        other,
        Err(CoordinatorError::ChangeInProgress { .. })
    ));
}

#[test]
fn every_applied_command_is_audited_with_identity_and_the_chain_verifies() {
    let mut harness = Harness::with_fleet();
    harness.deploy("v1");
    let entries = harness.state.audit.entries();
    assert_eq!(entries.len() as u64, harness.index);
    assert!(entries.iter().any(|entry| entry.action == "change.start"
        && entry.identity == "operator"
        && entry.target == "ch-1"));
    assert_eq!(harness.state.audit.verify().first_broken, None);
}

#[test]
fn dependency_cycles_are_refused_with_the_path() {
    let mut harness = Harness::new();
    let service = |name: &str, depends_on: &[&str]| CommandKind::PutService {
        service: ServiceRecord {
            name: name.into(),
            depends_on: depends_on.iter().map(|name| name.to_string()).collect(),
            policy: HealthPolicy::default(),
            synthetics: vec![],
            rollback_steps: Vec::new(),
        },
    };
    harness.must(service("api", &["db"]));
    harness.must(service("web", &["api"]));
    let error = harness
        .run(service("db", &["web"]))
        .unwrap_err()
        .to_string();
    assert_eq!(
        error,
        "service db would depend on itself through db -> web -> api -> db"
    );
}

#[test]
fn only_the_latest_change_may_be_rolled_back_and_no_change_starts_during_a_rollback() {
    let mut harness = Harness::with_fleet();
    let first = harness.deploy("v1");
    let second = harness.deploy("v2");
    let older = rollback_of(first, Trigger::Manual);
    let error = harness.run(older).unwrap_err().to_string();
    assert_eq!(
        error,
        "change ch-1 is not the latest change of web (ch-2 is): roll back ch-2 first"
    );
    harness.must_start_rollback(second, Trigger::Manual);
    let error = harness.run(start_change("v1")).unwrap_err();
    assert!(
        matches!(error, CoordinatorError::RollbackInProgress { .. }),
        "{error}"
    );
}

#[test]
fn an_offline_self_revert_is_recorded_on_its_change_once_and_audited() {
    let mut harness = Harness::with_fleet();
    harness.deploy("v1");
    let change = harness.deploy("v2");
    let note = SelfRevertNote {
        id: "sr-5000".into(),
        service: "web".into(),
        change_id: change_id(change),
        snapshot_id: "snap-1".into(),
        at_ms: 5_000,
        offline_since_ms: 1_000,
        ok: true,
        detail: "restore: restored snap-1".into(),
        evidence: "probes failing in 3 reports over 60 s".into(),
    };
    let report = || CommandKind::RecordSelfRevert {
        host_id: "web-1".into(),
        report: note.clone(),
    };
    harness
        .run_as("web-1", "self-revert/sr-5000", report())
        .unwrap();
    let host = &harness.state.changes[&change].hosts[0];
    assert_eq!(host.self_reverted.as_ref(), Some(&note));
    assert!(
        harness.state.changes[&change].hosts[1]
            .self_reverted
            .is_none()
    );
    // Sent again after a lost acknowledgement: the request log answers, nothing changes.
    let audited = harness.state.audit.len();
    harness
        .run_as("web-1", "self-revert/sr-5000", report())
        .unwrap();
    assert_eq!(harness.state.audit.len(), audited);
    let entry = harness.state.audit.entries().last().unwrap().clone();
    assert_eq!(entry.action, "host.self-revert");
    assert!(
        entry
            .outcome
            .contains("web-1 reverted ch-2 of web to snap-1 on its own"),
        "{}",
        entry.outcome
    );
    // The plan of a later fleet rollback says so.
    let plan = crate::plan::build(
        &harness.state,
        &[change],
        &PlanOptions::default(),
        Trigger::Manual,
    )
    .unwrap();
    assert!(
        plan.notes
            .iter()
            .any(|note| note.contains("already reverted by 1 host on their own")),
        "{:?}",
        plan.notes
    );
    // A host that is not registered cannot report one.
    let stranger = CommandKind::RecordSelfRevert {
        host_id: "db-9".into(),
        report: note,
    };
    assert!(harness.run_as("db-9", "", stranger).is_err());
}

#[test]
fn migrations_are_registered_once_immutable_and_never_without_a_down_script() {
    let mut harness = Harness::new();
    let migration = |down: &str| {
        let (up, verify) = ("ALTER TABLE t ADD COLUMN c int", "");
        MigrationRecord {
            database: "orders".into(),
            version: "0042".into(),
            class: MigrationClass::Expand,
            up_sql: up.into(),
            down_sql: down.into(),
            verify_sql: verify.into(),
            checksum: migration_checksum(up, down, verify),
            registered_at_ms: 0,
            registered_by: String::new(),
        }
    };
    let down = "ALTER TABLE t DROP COLUMN c";
    harness.must(CommandKind::RegisterMigration {
        migration: migration(down),
    });
    let kept = &harness.state.migrations["orders"]["0042"];
    assert_eq!(
        (kept.registered_by.as_str(), kept.registered_at_ms),
        ("operator", 1_000)
    );
    // The same again is a no-op; other scripts under the same version are refused.
    harness.must(CommandKind::RegisterMigration {
        migration: migration(down),
    });
    let changed = harness
        .run(CommandKind::RegisterMigration {
            migration: migration("DROP TABLE t"),
        })
        .unwrap_err()
        .to_string();
    assert!(
        changed.contains("orders@0042 is already registered"),
        "{changed}"
    );
    let no_down = harness
        .run(CommandKind::RegisterMigration {
            migration: MigrationRecord {
                version: "0043".into(),
                ..migration("  ")
            },
        })
        .unwrap_err()
        .to_string();
    assert!(no_down.contains("has no down script"), "{no_down}");
    let mut forged = migration(down);
    forged.version = "0044".into();
    forged.checksum = "sha256:00".into();
    let error = harness
        .run(CommandKind::RegisterMigration { migration: forged })
        .unwrap_err()
        .to_string();
    assert!(error.contains("does not match its scripts"), "{error}");
    // The checksum separates the scripts: moving text from one to the next changes it.
    assert_ne!(
        migration_checksum("ab", "c", ""),
        migration_checksum("a", "bc", "")
    );
}

/// Hosts db-1 and db-2 running orders-db (the shards), its releases, a contract migration, and
/// a change applying it; returns the change's number once it waits for its migration.
fn activated_sharded_change() -> (Harness, u64) {
    let mut harness = Harness::new();
    for host in ["db-1", "db-2"] {
        harness.register_host(host, "orders-db");
    }
    harness.must(CommandKind::PutService {
        service: ServiceRecord {
            name: "orders-db".into(),
            depends_on: vec![],
            policy: HealthPolicy::default(),
            synthetics: vec![],
            rollback_steps: Vec::new(),
        },
    });
    harness.must(CommandKind::RegisterRelease {
        release: ReleaseRecord {
            service: "orders-db".into(),
            ..release("v2", 'a')
        },
    });
    let (up, down) = ("ALTER TABLE t RENAME a TO b", "ALTER TABLE t RENAME b TO a");
    harness.must(CommandKind::RegisterMigration {
        migration: MigrationRecord {
            database: "orders-db".into(),
            version: "0002".into(),
            class: MigrationClass::Contract,
            up_sql: up.into(),
            down_sql: down.into(),
            verify_sql: String::new(),
            checksum: migration_checksum(up, down, ""),
            registered_at_ms: 0,
            registered_by: String::new(),
        },
    });
    let Outcome::Change(change) = harness.must(CommandKind::StartChange {
        break_glass: false,
        service: "orders-db".into(),
        version: "v2".into(),
        host_ids: vec![],
        reason: "test".into(),
        baseline: HealthAggregate::default(),
        flags_on: vec![],
        migrations: vec![("orders-db".into(), "0002".into())],
    }) else {
        panic!("no change");
    };
    for capture in [true, false] {
        for host in ["db-1", "db-2"] {
            let host_id = host.to_string();
            harness.finish(
                if capture {
                    StepTarget::Capture { change, host_id }
                } else {
                    StepTarget::Activate { change, host_id }
                },
                true,
            );
        }
    }
    // A contract migration runs after activation: the change waits for it.
    assert_eq!(
        harness.state.changes[&change].status,
        ChangeStatus::Deploying
    );
    (harness, change)
}

fn sharded_change() -> (Harness, u64) {
    let (mut harness, change) = activated_sharded_change();
    harness.must(CommandKind::StartSchemaTxn {
        owner: SchemaOwner::Change { change, stage: 0 },
    });
    (harness, change)
}

#[test]
fn a_change_whose_database_lost_its_shards_fails_its_stage_instead_of_asking_again() {
    let (mut harness, change) = activated_sharded_change();
    // Both hosts came back without the database (a config change): nothing to migrate.
    for host in ["db-1", "db-2"] {
        harness.must(CommandKind::RegisterHost {
            host_id: host.into(),
            labels: Labels::default(),
            services: vec![],
            agent_version: "test".into(),
        });
    }
    harness.must(CommandKind::StartSchemaTxn {
        owner: SchemaOwner::Change { change, stage: 0 },
    });
    let txn = &harness.state.schema_txns[&1];
    assert_eq!(txn.status, SchemaTxnStatus::Done);
    assert!(txn.shards.is_empty() && !txn.committed);
    let record = &harness.state.changes[&change];
    assert_eq!(record.status, ChangeStatus::Failed);
    assert!(
        record
            .reason
            .contains("st-1 of orders-db: no host in environment \"default\" runs orders-db"),
        "{}",
        record.reason
    );
    // Nothing is due any more: the engine has nothing to ask again.
    let refused = harness
        .run(CommandKind::StartSchemaTxn {
            owner: SchemaOwner::Change { change, stage: 0 },
        })
        .unwrap_err()
        .to_string();
    assert!(refused.contains("is Failed"), "{refused}");
}

impl Harness {
    /// Both shards check at `sha256:before` and prepare to `sha256:after`.
    fn check_and_prepare_both(&mut self) {
        for phase in [ShardPhase::Check, ShardPhase::Prepare] {
            for host in ["db-1", "db-2"] {
                let fingerprint = if phase == ShardPhase::Check {
                    "sha256:before"
                } else {
                    "sha256:after"
                };
                self.shard_step(phase, host, true, report(host, fingerprint));
            }
        }
    }

    fn shard_step(&mut self, phase: ShardPhase, host: &str, ok: bool, report: ShardReportRecord) {
        let step = StepTarget::Schema {
            txn: 1,
            phase,
            host_id: host.into(),
        };
        self.must(CommandKind::StepStarted { step: step.clone() });
        self.must(CommandKind::SchemaStepFinished {
            step,
            ok,
            detail: if ok { "done".into() } else { "boom".into() },
            report,
        });
    }
}

fn report(identity: &str, fingerprint: &str) -> ShardReportRecord {
    ShardReportRecord {
        database_identity: identity.into(),
        fingerprint: fingerprint.into(),
        version: "0002".into(),
        ..ShardReportRecord::default()
    }
}

#[test]
fn a_schema_transaction_commits_only_when_every_shard_prepared_alike() {
    let (mut harness, change) = sharded_change();
    // One transaction at a time per database and environment.
    let busy = harness
        .run(CommandKind::StartSchemaTxn {
            owner: SchemaOwner::Change { change, stage: 0 },
        })
        .unwrap_err()
        .to_string();
    assert!(busy.contains("not due"), "{busy}");
    for host in ["db-1", "db-2"] {
        harness.shard_step(ShardPhase::Check, host, true, report(host, "sha256:before"));
    }
    assert_eq!(
        harness.state.schema_txns[&1].status,
        SchemaTxnStatus::Preparing
    );
    let commit = CommandKind::DecideSchemaTxn {
        txn: 1,
        commit: true,
        reason: "too early".into(),
    };
    let refused = harness.run(commit.clone()).unwrap_err().to_string();
    assert!(refused.contains("db-1 is not prepared"), "{refused}");
    harness.shard_step(
        ShardPhase::Prepare,
        "db-1",
        true,
        report("db-1", "sha256:after"),
    );
    harness.shard_step(
        ShardPhase::Prepare,
        "db-2",
        true,
        report("db-2", "sha256:other"),
    );
    let problem = schema::prepared_problems(&harness.state.schema_txns[&1]).unwrap();
    assert!(
        problem.contains(
            "shards would disagree after it: db-1 has sha256:after, db-2 has sha256:other"
        ),
        "{problem}"
    );
    harness.must(CommandKind::DecideSchemaTxn {
        txn: 1,
        commit: false,
        reason: problem,
    });
    // A resolve that fails is tried again (the shard holds its prepared transaction); the
    // change waits meanwhile instead of failing.
    harness.shard_step(
        ShardPhase::Resolve,
        "db-1",
        false,
        ShardReportRecord::default(),
    );
    assert!(harness.state.schema_txns[&1].stuck_resolving().is_some());
    assert_eq!(
        harness.state.changes[&change].status,
        ChangeStatus::Deploying
    );
    // A person is called once: the shard holds its locks until a resolve succeeds.
    let called: Vec<&str> = harness
        .state
        .escalations
        .values()
        .map(|escalation| escalation.evidence.as_str())
        .collect();
    assert_eq!(called.len(), 1, "{called:?}");
    assert!(
        called[0]
            .contains("st-1 of orders-db cannot resolve its prepared transaction (abort) on db-1"),
        "{called:?}"
    );
    harness.shard_step(
        ShardPhase::Resolve,
        "db-1",
        true,
        ShardReportRecord::default(),
    );
    harness.shard_step(
        ShardPhase::Resolve,
        "db-2",
        true,
        ShardReportRecord::default(),
    );
    let txn = &harness.state.schema_txns[&1];
    assert_eq!(txn.status, SchemaTxnStatus::Done);
    assert!(!txn.committed && txn.detail.contains("aborted, every shard rolled back"));
    let record = &harness.state.changes[&change];
    assert_eq!(record.status, ChangeStatus::Failed);
    assert!(
        record.reason.contains("migrations failed: st-1"),
        "{}",
        record.reason
    );
}

#[test]
fn a_shard_resolved_by_hand_is_no_longer_retried_and_verify_judges_it() {
    let (mut harness, change) = sharded_change();
    let by_hand = |host: &str| CommandKind::ResolvedByHand {
        txn: 1,
        host_id: host.into(),
        reason: "COMMIT PREPARED run from psql by ana".into(),
    };
    let refused = harness.run(by_hand("db-2")).unwrap_err().to_string();
    assert!(
        refused.contains("st-1 is Checking: a shard is resolved by hand only while"),
        "{refused}"
    );
    harness.check_and_prepare_both();
    harness.must(CommandKind::DecideSchemaTxn {
        txn: 1,
        commit: true,
        reason: "all 2 shards prepared".into(),
    });
    harness.shard_step(
        ShardPhase::Resolve,
        "db-1",
        true,
        ShardReportRecord::default(),
    );
    harness.shard_step(
        ShardPhase::Resolve,
        "db-2",
        false,
        ShardReportRecord::default(),
    );
    for (host, expected) in [
        (
            "db-9",
            "db-9 is not a shard of st-1: its shards are db-1, db-2",
        ),
        (
            "db-1",
            "the resolve of st-1 on db-1 has not failed (Succeeded)",
        ),
    ] {
        let refused = harness.run(by_hand(host)).unwrap_err().to_string();
        assert!(refused.contains(expected), "{refused}");
    }
    harness.must(by_hand("db-2"));
    let txn = &harness.state.schema_txns[&1];
    assert_eq!(txn.status, SchemaTxnStatus::Verifying);
    let resolve = &txn.shards[1].resolve;
    assert_eq!(resolve.status, StepStatus::Skipped);
    assert!(
        resolve.detail.starts_with(
            "resolved by hand by operator: COMMIT PREPARED run from psql by ana (the last attempt: boom)"
        ),
        "{}",
        resolve.detail
    );
    // Never retried: the engine restarts failed resolves only.
    let refused = harness.run(by_hand("db-2")).unwrap_err().to_string();
    assert!(refused.contains("st-1 is Verifying"), "{refused}");
    for host in ["db-1", "db-2"] {
        harness.shard_step(ShardPhase::Verify, host, true, report(host, "sha256:after"));
    }
    let txn = &harness.state.schema_txns[&1];
    assert!(txn.ok(), "{txn:?}");
    assert_eq!(
        harness.state.changes[&change].status,
        ChangeStatus::Deployed
    );
}

#[test]
fn an_abort_with_a_shard_resolved_by_hand_is_verified_too() {
    let (mut harness, change) = sharded_change();
    harness.check_and_prepare_both();
    harness.must(CommandKind::DecideSchemaTxn {
        txn: 1,
        commit: false,
        reason: "an operator aborted".into(),
    });
    harness.shard_step(
        ShardPhase::Resolve,
        "db-1",
        false,
        ShardReportRecord::default(),
    );
    harness.shard_step(
        ShardPhase::Resolve,
        "db-2",
        true,
        ShardReportRecord::default(),
    );
    harness.must(CommandKind::ResolvedByHand {
        txn: 1,
        host_id: "db-1".into(),
        reason: "said ROLLBACK PREPARED, but did not".into(),
    });
    assert_eq!(
        harness.state.schema_txns[&1].status,
        SchemaTxnStatus::Verifying
    );
    let mut left = report("db-1", "sha256:before");
    left.in_doubt = vec!["rewind-abc-st-1".into()];
    harness.shard_step(ShardPhase::Verify, "db-1", true, left);
    harness.shard_step(
        ShardPhase::Verify,
        "db-2",
        true,
        report("db-2", "sha256:before"),
    );
    let txn = &harness.state.schema_txns[&1];
    assert_eq!(txn.status, SchemaTxnStatus::Done);
    assert!(!txn.committed);
    assert_eq!(
        txn.detail,
        "aborted, but after db-1 resolved by hand verification found: db-1 still holds a \
         prepared transaction of st-1"
    );
    assert_eq!(harness.state.changes[&change].status, ChangeStatus::Failed);
}

#[test]
fn two_shards_on_one_database_are_refused_at_check() {
    let (mut harness, _) = sharded_change();
    harness.shard_step(
        ShardPhase::Check,
        "db-1",
        true,
        report("7123/orders", "sha256:x"),
    );
    harness.shard_step(
        ShardPhase::Check,
        "db-2",
        true,
        report("7123/orders", "sha256:x"),
    );
    let txn = &harness.state.schema_txns[&1];
    assert_eq!(txn.status, SchemaTxnStatus::Done);
    assert!(
        txn.detail
            .contains("db-1 and db-2 are the same database (7123/orders)"),
        "{}",
        txn.detail
    );
}

#[test]
fn a_host_is_forgotten_only_when_nothing_can_still_act_on_it_by_name() {
    let forget = |host: &str| CommandKind::ForgetHost {
        host_id: host.into(),
        release_name: false,
        reason: "retired".into(),
    };
    let mut harness = Harness::with_fleet();
    harness.deploy("v1");
    // The latest change of web could still be rolled back on web-2.
    let busy = harness.run(forget("web-2")).unwrap_err();
    assert!(
        busy.to_string()
            .contains("change ch-1 of web, which a rollback would still restore there"),
        "{busy}"
    );
    // A change leaving web-2 out: in progress, it holds web-1 only.
    let mut only_web_1 = start_change("v2");
    if let CommandKind::StartChange { host_ids, .. } = &mut only_web_1 {
        *host_ids = vec!["web-1".into()];
    }
    let Outcome::Change(change) = harness.must(only_web_1) else {
        panic!("change outcome")
    };
    let busy = harness.run(forget("web-1")).unwrap_err();
    assert!(busy.to_string().contains("still in progress"), "{busy}");
    for target in [
        StepTarget::Capture {
            change,
            host_id: "web-1".into(),
        },
        StepTarget::Activate {
            change,
            host_id: "web-1".into(),
        },
    ] {
        harness.finish(target, true);
    }
    // Deployed, ch-2 could be rolled back on web-1.
    let busy = harness.run(forget("web-1")).unwrap_err();
    assert!(
        busy.to_string().contains(&format!(
            "change {} of web, which a rollback would still restore",
            change_id(change)
        )),
        "{busy}"
    );
    let rollback = harness.must_start_rollback(change, Trigger::Manual);
    let busy = harness.run(forget("web-1")).unwrap_err();
    assert!(busy.to_string().contains(&rollback_id(rollback)), "{busy}");
    // ch-1 can no longer be rolled back (ch-2 is the latest on its hosts), so nothing would act
    // on web-2, which died before ch-2: it is forgotten.
    harness.must(forget("web-2"));
    harness.must(CommandKind::ControlRollback {
        rollback,
        action: RollbackAction::Abort,
        reason: "enough".into(),
    });

    // A host only the earlier, rolled-back history names is forgotten.
    let mut harness = Harness::with_fleet();
    let first = harness.deploy("v1");
    let rollback = harness.must_start_rollback(first, Trigger::Manual);
    for host in ["web-1", "web-2"] {
        for kind in RollbackStepKind::ALL {
            harness.finish(rollback_step(rollback, host, kind), true);
        }
    }
    pass_gate(&mut harness, rollback, 0);
    assert_eq!(
        harness.state.changes[&first].status,
        ChangeStatus::RolledBack
    );
    harness.state.enrollments.insert(
        "web-2".into(),
        Enrollment {
            environment: "prod".into(),
            token: 1,
            at_ms: 1,
        },
    );
    let Outcome::HostForgotten {
        services,
        name_released,
    } = harness.must(forget("web-2"))
    else {
        panic!("forgotten")
    };
    assert_eq!((services, name_released), (vec!["web".to_string()], false));
    assert!(!harness.state.hosts.contains_key("web-2"));
    assert!(
        harness.state.enrollments.contains_key("web-2"),
        "the name stays pinned unless released"
    );
    let last = harness.state.audit.entries().last().unwrap();
    assert_eq!(last.action, "host.forget");
    assert!(last.outcome.contains("services web") && last.outcome.contains("retired"));
    // Finished changes keep their record of the host.
    assert!(
        harness.state.changes[&first]
            .hosts
            .iter()
            .any(|host| host.host_id == "web-2")
    );
    // Only the enrollment is left: released on request.
    assert!(matches!(
        harness.run(forget("web-2")),
        Err(CoordinatorError::UnknownHost { .. })
    ));
    let released = harness.must(CommandKind::ForgetHost {
        host_id: "web-2".into(),
        release_name: true,
        reason: "retired".into(),
    });
    assert!(matches!(
        released,
        Outcome::HostForgotten {
            name_released: true,
            ..
        }
    ));
    assert!(!harness.state.enrollments.contains_key("web-2"));
}

#[test]
fn version_2_commands_are_refused_at_version_1_and_applied_after_it_is_raised() {
    let mut harness = Harness::with_fleet();
    harness.state.cluster_version = 0; // a cluster from before versions
    let forget = CommandKind::ForgetHost {
        host_id: "web-1".into(),
        release_name: false,
        reason: "retired".into(),
    };
    let refused = harness.run(forget.clone()).unwrap_err();
    assert!(
        matches!(
            refused,
            CoordinatorError::NeedsClusterVersion {
                needed: 2,
                running: 1,
                ..
            }
        ),
        "{refused}"
    );
    // At version 1 a host may still register new services (as that release allowed).
    harness.must(CommandKind::RegisterHost {
        host_id: "web-1".into(),
        labels: Labels::default(),
        services: vec!["web".into(), "payments".into()],
        agent_version: "test".into(),
    });
    let raise = |version| CommandKind::SetClusterVersion {
        version,
        members: vec![],
        reason: "upgraded".into(),
    };
    // Refused if the members asked are not the registry's (one joined in between).
    let stale = harness
        .run(CommandKind::SetClusterVersion {
            version: 2,
            members: vec![4],
            reason: "upgraded".into(),
        })
        .unwrap_err();
    assert!(stale.to_string().contains("the members changed"), "{stale}");
    assert_eq!(harness.state.cluster_version(), 1);
    harness.must(raise(2));
    assert_eq!(harness.state.cluster_version(), 2);
    let last = harness.state.audit.entries().last().unwrap();
    assert_eq!(last.action, "cluster.upgrade-finalize");
    assert!(last.outcome.contains("1 -> 2"), "{}", last.outcome);
    assert!(harness.run(raise(2)).is_err(), "a version is only raised");
    // At version 2 the pin holds in apply() too.
    let pinned = harness
        .run(CommandKind::RegisterHost {
            host_id: "web-2".into(),
            labels: Labels::default(),
            services: vec!["web".into(), "payments".into()],
            agent_version: "test".into(),
        })
        .unwrap_err();
    assert!(
        pinned.to_string().contains("may not add payments"),
        "{pinned}"
    );
}
