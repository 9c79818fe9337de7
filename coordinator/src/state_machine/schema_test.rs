//! Tests of `apply()` for schema migrations and their transactions across shards.

use super::*;
use crate::test_fleet::{Fleet, release};

#[test]
fn migrations_are_registered_once_immutable_and_never_without_a_down_script() {
    let mut harness = Fleet::new();
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
    harness.apply(CommandKind::RegisterMigration {
        migration: migration(down),
    });
    let kept = &harness.state.migrations["orders"]["0042"];
    assert_eq!(
        (kept.registered_by.as_str(), kept.registered_at_ms),
        ("operator", 1_000)
    );
    // The same again is a no-op; other scripts under the same version are refused.
    harness.apply(CommandKind::RegisterMigration {
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
fn activated_sharded_change() -> (Fleet, u64) {
    let mut harness = Fleet::new();
    for host in ["db-1", "db-2"] {
        harness.register_host(host, "orders-db");
    }
    harness.apply(CommandKind::PutService {
        service: ServiceRecord {
            rto_s: 0,
            freeze: Vec::new(),
            drift_policy: Default::default(),
            isolate_after_failures: 0,
            name: "orders-db".into(),
            depends_on: vec![],
            policy: HealthPolicy::default(),
            synthetics: vec![],
            rollback_steps: Vec::new(),
        },
    });
    harness.apply(CommandKind::RegisterRelease {
        release: ReleaseRecord {
            service: "orders-db".into(),
            ..release("v2", 'a')
        },
    });
    let (up, down) = ("ALTER TABLE t RENAME a TO b", "ALTER TABLE t RENAME b TO a");
    harness.apply(CommandKind::RegisterMigration {
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
    let Outcome::Change(change) = harness.apply(CommandKind::StartChange(StartChange {
        break_glass: false,
        service: "orders-db".into(),
        version: "v2".into(),
        host_ids: vec![],
        reason: "test".into(),
        baseline: HealthAggregate::default(),
        flags_on: vec![],
        migrations: vec![("orders-db".into(), "0002".into())],
    })) else {
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

fn sharded_change() -> (Fleet, u64) {
    let (mut harness, change) = activated_sharded_change();
    harness.apply(CommandKind::StartSchemaTxn {
        owner: SchemaOwner::Change { change, stage: 0 },
    });
    (harness, change)
}

#[test]
fn a_change_whose_database_lost_its_shards_fails_its_stage_instead_of_asking_again() {
    let (mut harness, change) = activated_sharded_change();
    // Both hosts came back without the database (a config change): nothing to migrate.
    for host in ["db-1", "db-2"] {
        harness.apply(CommandKind::RegisterHost {
            host_id: host.into(),
            labels: Labels::default(),
            services: vec![],
            agent_version: "test".into(),
        });
    }
    harness.apply(CommandKind::StartSchemaTxn {
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

impl Fleet {
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
        self.apply(CommandKind::StepStarted { step: step.clone() });
        self.apply(CommandKind::SchemaStepFinished {
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
    harness.apply(CommandKind::DecideSchemaTxn {
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
    harness.apply(CommandKind::DecideSchemaTxn {
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
    harness.apply(by_hand("db-2"));
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
    harness.apply(CommandKind::DecideSchemaTxn {
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
    harness.apply(CommandKind::ResolvedByHand {
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
