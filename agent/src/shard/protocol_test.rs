//! The shard side of the two-phase protocol, on the fake engine: redelivery, late prepares,
//! crashes at every point of both phases, and all or nothing across shards. The store is the
//! agent's real one, in a temporary directory; the engines' SQL is tested on real databases.

use super::fake::{Crash, FakeShard};
use super::*;

const CLUSTER: &str = "c-test";

fn migration(version: &str) -> Migration {
    let up = format!("CREATE TABLE t{version} (id int)");
    let down = format!("DROP TABLE t{version}");
    Migration {
        version: version.into(),
        checksum: rewind_shared::digest::migration_checksum(&up, &down, ""),
        class: "expand".into(),
        up_sql: up,
        down_sql: down,
        verify_sql: String::new(),
    }
}

/// A shard at version 0001, with the agent store beside it.
struct Shard {
    engine: FakeShard,
    store: Store,
    _dir: tempfile::TempDir,
}

impl Shard {
    fn new(engine: fn(&[&Migration]) -> FakeShard) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            engine: engine(&[&migration("0001")]),
            store: Store::open(&dir.path().join("store")).unwrap(),
            _dir: dir,
        }
    }

    fn prepare(&mut self, step: &ShardStep) -> Result<(String, ShardReport), AgentError> {
        let name = prepared_name(CLUSTER, &step.txn_id);
        prepare(&mut self.engine, step, &name, &self.store)
    }

    fn resolve(&mut self, step: &ShardStep) -> Result<(String, ShardReport), AgentError> {
        let name = prepared_name(CLUSTER, &step.txn_id);
        resolve(&mut self.engine, step, &name, &self.store)
    }

    fn in_doubt(&mut self) -> Vec<String> {
        verify(&mut self.engine, &prepared_prefix(CLUSTER))
            .unwrap()
            .1
            .in_doubt
    }
}

/// Applies 0002 (`down` false) or reverts it; `commit` is the coordinator's decision.
fn step(txn: &str, down: bool, commit: bool) -> ShardStep {
    ShardStep {
        txn_id: txn.into(),
        down,
        migrations: vec![migration("0002")],
        commit,
        accept_data_loss: false,
        by: "ops".into(),
    }
}

fn both_engines() -> [fn(&[&Migration]) -> FakeShard; 2] {
    [FakeShard::two_phase, FakeShard::trial_only]
}

#[test]
fn a_committed_transaction_leaves_the_new_version_and_nothing_in_doubt() {
    for engine in both_engines() {
        let mut shard = Shard::new(engine);
        let (detail, report) = check(&mut shard.engine, &step("tx-1", false, true)).unwrap();
        assert!(
            detail.starts_with("ready to apply 0002 at version 0001"),
            "{detail}"
        );
        assert_eq!(report.version, "0001");
        let (_, prepared) = shard.prepare(&step("tx-1", false, true)).unwrap();
        assert_eq!(
            prepared.version, "0002",
            "the report says where it leaves the shard"
        );
        let (detail, report) = shard.resolve(&step("tx-1", false, true)).unwrap();
        assert_eq!(detail, "committed tx-1");
        assert_eq!(report.version, "0002");
        assert_eq!(shard.engine.applied(), ["0001", "0002"]);
        assert!(shard.in_doubt().is_empty());
    }
}

#[test]
fn an_aborted_transaction_leaves_the_shard_as_it_was() {
    for engine in both_engines() {
        let mut shard = Shard::new(engine);
        let holds = shard.engine.holds_prepared();
        shard.prepare(&step("tx-1", false, false)).unwrap();
        assert_eq!(
            shard.in_doubt().len(),
            usize::from(holds),
            "held until resolved where the engine holds"
        );
        let (detail, report) = shard.resolve(&step("tx-1", false, false)).unwrap();
        let expected = if holds {
            "rolled tx-1 back"
        } else {
            "nothing of tx-1 was kept here (its prepare was a trial run)"
        };
        assert_eq!(detail, expected);
        assert_eq!(report.version, "0001");
        assert_eq!(shard.engine.applied(), ["0001"]);
        assert!(shard.in_doubt().is_empty());
    }
}

#[test]
fn a_prepare_delivered_again_answers_with_the_kept_report_and_runs_nothing() {
    let mut shard = Shard::new(FakeShard::two_phase);
    let (_, first) = shard.prepare(&step("tx-1", false, true)).unwrap();
    let (detail, again) = shard.prepare(&step("tx-1", false, true)).unwrap();
    assert_eq!(detail, "tx-1 was already prepared here");
    assert_eq!(again, first, "the report kept before the prepare");
    assert_eq!(shard.engine.runs, 1, "the scripts ran once");
}

#[test]
fn a_prepare_arriving_after_its_resolve_is_refused_and_holds_nothing() {
    for engine in both_engines() {
        let mut shard = Shard::new(engine);
        // The coordinator gave up on this shard's prepare and aborted; the prepare arrives late.
        shard.resolve(&step("tx-1", false, false)).unwrap();
        let error = shard.prepare(&step("tx-1", false, false)).unwrap_err();
        assert!(
            error.to_string().contains("already resolved on this host"),
            "{error}"
        );
        assert_eq!(shard.engine.runs, 0, "nothing ran");
        assert!(shard.in_doubt().is_empty());
        assert_eq!(shard.engine.applied(), ["0001"]);
    }
}

#[test]
fn a_commit_delivered_again_answers_that_it_is_already_committed() {
    for engine in both_engines() {
        let mut shard = Shard::new(engine);
        shard.prepare(&step("tx-1", false, true)).unwrap();
        shard.resolve(&step("tx-1", false, true)).unwrap();
        let runs = shard.engine.runs;
        let (detail, report) = shard.resolve(&step("tx-1", false, true)).unwrap();
        assert_eq!(detail, "tx-1 was already committed");
        assert_eq!(report.version, "0002");
        assert_eq!(shard.engine.runs, runs, "nothing ran again");
        assert_eq!(shard.engine.applied(), ["0001", "0002"]);
    }
}

#[test]
fn a_commit_with_nothing_held_and_nothing_done_asks_for_a_person() {
    let mut shard = Shard::new(FakeShard::two_phase);
    let error = shard.resolve(&step("tx-1", false, true)).unwrap_err();
    assert!(
        error.to_string().contains("check this shard by hand"),
        "{error}"
    );
    assert_eq!(
        shard.engine.applied(),
        ["0001"],
        "nothing was run to fill the gap"
    );
}

#[test]
fn without_two_phase_commit_the_prepare_is_a_trial_and_the_commit_runs_it_again() {
    let mut shard = Shard::new(FakeShard::trial_only);
    let (detail, report) = shard.prepare(&step("tx-1", false, true)).unwrap();
    assert!(
        detail.starts_with("trial run passed and was rolled back"),
        "{detail}"
    );
    assert_eq!(report.version, "0002", "the trial's report");
    assert_eq!(shard.engine.applied(), ["0001"], "the trial kept nothing");
    let (detail, _) = shard.resolve(&step("tx-1", false, true)).unwrap();
    assert_eq!(detail, "committed tx-1");
    assert_eq!(shard.engine.runs, 2);
    assert_eq!(shard.engine.applied(), ["0001", "0002"]);
}

#[test]
fn a_failing_script_holds_nothing_and_keeps_no_report() {
    for engine in both_engines() {
        let mut shard = Shard::new(engine);
        shard.engine.scripts_fail = true;
        let error = shard.prepare(&step("tx-1", false, true)).unwrap_err();
        assert!(error.to_string().contains("syntax error"), "{error}");
        assert!(shard.in_doubt().is_empty());
        let name = prepared_name(CLUSTER, "tx-1");
        assert_eq!(shard.store.prepared_report(&name).unwrap(), None);
        assert_eq!(shard.engine.applied(), ["0001"]);
    }
}

#[test]
fn a_revert_that_destroys_data_is_refused_unless_the_loss_was_accepted() {
    for engine in both_engines() {
        let mut shard = Shard::new(engine);
        shard.prepare(&step("tx-1", false, true)).unwrap();
        shard.resolve(&step("tx-1", false, true)).unwrap();
        shard.engine.rows_at_risk = 3;
        let revert = step("tx-2", true, true);
        for error in [
            check(&mut shard.engine, &revert).unwrap_err(),
            shard.prepare(&revert).unwrap_err(),
        ] {
            assert!(
                error
                    .to_string()
                    .contains("would destroy data written under the new schema"),
                "{error}"
            );
        }
        let accepted = ShardStep {
            accept_data_loss: true,
            ..revert
        };
        let (detail, _) = check(&mut shard.engine, &accepted).unwrap();
        assert!(
            detail.ends_with("will destroy (accepted, exported first): table orders: 3 rows"),
            "{detail}"
        );
        let (_, report) = shard.prepare(&accepted).unwrap();
        assert_eq!(report.data_loss, ["table orders: 3 rows"]);
        shard.resolve(&accepted).unwrap();
        assert_eq!(shard.engine.applied(), ["0001"]);
    }
}

#[test]
fn verify_names_only_this_clusters_transactions_in_doubt() {
    let mut shard = Shard::new(FakeShard::two_phase);
    shard.prepare(&step("tx-1", false, true)).unwrap();
    assert_eq!(shard.in_doubt(), [prepared_name(CLUSTER, "tx-1")]);
    let mut shared = Shard::new(FakeShard::two_phase);
    let other = prepared_name("another-cluster", "tx-9");
    shared.engine.hold_for_another(&other);
    assert!(
        shared.in_doubt().is_empty(),
        "another cluster's is not ours"
    );
    let (_, theirs) = verify(&mut shared.engine, &prepared_prefix("another-cluster")).unwrap();
    assert_eq!(theirs.in_doubt, [other]);
}

#[test]
fn a_held_transaction_keeps_every_other_prepare_out_until_it_is_resolved() {
    let mut shard = Shard::new(FakeShard::two_phase);
    shard.prepare(&step("tx-1", false, false)).unwrap();
    let error = shard.prepare(&step("tx-2", false, true)).unwrap_err();
    assert!(error.to_string().contains("migration lock"), "{error}");
    shard.resolve(&step("tx-1", false, false)).unwrap();
    shard.prepare(&step("tx-2", false, true)).unwrap();
}

#[test]
fn a_resolve_is_recorded_even_when_the_real_database_cannot_be_opened() {
    // Through `open`, as the agent's step does: the SQLite file is missing, so the engine cannot
    // connect; the resolve must still have marked the transaction resolved.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let database = DatabaseConfig {
        engine: Engine::Sqlite(dir.path().join("missing.db")),
        history_table: crate::schema::DEFAULT_HISTORY_TABLE.into(),
    };
    let name = prepared_name(CLUSTER, "tx-1");
    let error = resolve(
        &mut open(&database),
        &step("tx-1", false, false),
        &name,
        &store,
    )
    .unwrap_err();
    assert!(error.to_string().contains("cannot open"), "{error}");
    assert!(store.is_resolved(&name).unwrap());
    let error = prepare(
        &mut open(&database),
        &step("tx-1", false, false),
        &name,
        &store,
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("already resolved on this host"),
        "{error}"
    );
}

#[test]
fn a_resolve_is_recorded_before_the_database_is_reached() {
    for engine in both_engines() {
        let mut shard = Shard::new(engine);
        shard.engine.unreachable = true;
        let error = shard.resolve(&step("tx-1", false, false)).unwrap_err();
        assert!(error.to_string().contains("connection refused"), "{error}");
        // The database is back; the prepare the coordinator gave up on arrives late.
        shard.engine.unreachable = false;
        let error = shard.prepare(&step("tx-1", false, false)).unwrap_err();
        assert!(
            error.to_string().contains("already resolved on this host"),
            "{error}"
        );
        assert!(shard.in_doubt().is_empty());
    }
}

/// Delivers a phase until it answers, as the coordinator does (a crash fails one delivery).
fn until_answered(
    mut deliver: impl FnMut() -> Result<(String, ShardReport), AgentError>,
) -> Result<(String, ShardReport), AgentError> {
    for _ in 0..3 {
        match deliver() {
            Err(AgentError::Command { reason, .. }) if reason.starts_with("crashed") => continue,
            answer => return answer,
        }
    }
    panic!("three deliveries crashed");
}

#[test]
fn whatever_the_crash_the_shard_ends_all_applied_or_untouched_and_nothing_in_doubt() {
    for engine in both_engines() {
        for crash in Crash::ALL {
            for commit in [true, false] {
                let trial_only = !engine(&[]).holds_prepared();
                let finishes = matches!(crash, Crash::BeforeFinish | Crash::AfterFinish);
                if trial_only && !commit && finishes {
                    // An abort of a trial holds nothing to finish: there is no such point.
                    continue;
                }
                let case = format!(
                    "{} engine, crash {crash:?}, decision {}",
                    if engine(&[]).holds_prepared() {
                        "two-phase"
                    } else {
                        "trial-only"
                    },
                    if commit { "commit" } else { "abort" }
                );
                let mut shard = Shard::new(engine);
                shard.engine.crash = Some(crash);
                let step = step("tx-1", false, commit);
                until_answered(|| shard.prepare(&step)).unwrap_or_else(|e| panic!("{case}: {e}"));
                until_answered(|| shard.resolve(&step)).unwrap_or_else(|e| panic!("{case}: {e}"));
                assert_eq!(shard.engine.crash, None, "{case}: the crash struck");
                let expected: &[&str] = if commit { &["0001", "0002"] } else { &["0001"] };
                assert_eq!(shard.engine.applied(), expected, "{case}");
                assert!(shard.in_doubt().is_empty(), "{case}");
                // However late a redelivered prepare arrives now, it holds nothing.
                assert!(shard.prepare(&step).is_err(), "{case}");
                assert!(shard.in_doubt().is_empty(), "{case}");
            }
        }
    }
}

#[test]
fn one_shard_refusing_its_prepare_leaves_every_shard_as_it_was() {
    for engine in both_engines() {
        let mut shards: Vec<Shard> = (0..3).map(|_| Shard::new(engine)).collect();
        shards[1].engine.scripts_fail = true;
        let prepared: Vec<bool> = shards
            .iter_mut()
            .map(|shard| shard.prepare(&step("tx-1", false, true)).is_ok())
            .collect();
        assert_eq!(prepared, [true, false, true]);
        // The coordinator commits only when every shard prepared.
        let commit = prepared.iter().all(|ok| *ok);
        for shard in &mut shards {
            shard.resolve(&step("tx-1", false, commit)).unwrap();
            assert_eq!(shard.engine.applied(), ["0001"]);
            assert!(shard.in_doubt().is_empty());
        }
    }
}
