//! Sharded database rollbacks against real PostgreSQL servers, one per shard, each with its own
//! agent: a change applies migrations on every shard (expand before activation, contract after),
//! and its rollback reverts the contract ones before the app and expand ones after, all or
//! nothing: check, PREPARE TRANSACTION on every shard, the decision in the Raft log, COMMIT or
//! ROLLBACK PREPARED, verify fingerprints.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::shards::{self, Migration, Shards};
use rewind_tests::*;

/// 0003's down does not undo its up: a drill catches that.
const MIGRATIONS: [Migration; 3] = [
    (
        "0001",
        pb::MigrationClass::Expand,
        "ALTER TABLE orders ADD COLUMN discount numeric(10, 2); \
         CREATE INDEX orders_discount ON orders (discount);",
        "DROP INDEX orders_discount; ALTER TABLE orders DROP COLUMN discount;",
        "",
    ),
    (
        "0002",
        pb::MigrationClass::Contract,
        "ALTER TABLE orders RENAME COLUMN total TO amount;",
        "ALTER TABLE orders RENAME COLUMN amount TO total;",
        // Run after the down script on each shard: no order may be left with a negative total.
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM orders WHERE total < 0) THEN \
         RAISE EXCEPTION 'negative totals'; END IF; END $$;",
    ),
    (
        "0003",
        pb::MigrationClass::Expand,
        "CREATE TABLE audit_log (id int PRIMARY KEY, entry text);",
        "ALTER TABLE audit_log RENAME TO audit_log_old;",
        "",
    ),
];

fn audit_position(audit: &[pb::AuditEntry], action: &str, target: &str) -> usize {
    audit
        .iter()
        .position(|entry| entry.action == action && entry.target == target)
        .unwrap_or_else(|| panic!("no audit entry {action} {target}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_applies_migrations_on_four_shards_and_its_rollback_reverts_them_all() {
    let mut shards = Shards::must_start(4, &MIGRATIONS).await;
    let first = shards.must_change("v1", &[]).await;
    assert_eq!(first.state, pb::ChangeState::Deployed as i32, "{first:?}");
    let change = shards.must_change("v2", &["0001", "0002"]).await;
    assert_eq!(change.state, pb::ChangeState::Deployed as i32, "{change:?}");
    assert_eq!(
        change.schema,
        [
            "orders-db: 0001 (before activation) -> st-1",
            "orders-db: 0002 (after activation) -> st-2"
        ]
    );
    for columns in shards.columns() {
        assert_eq!(columns, "amount,customer_id,discount,id");
    }
    // Expand before the hosts run the new release, contract after.
    let audit = shards
        .client
        .list_audit(pb::ListAuditRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let expand_committed = audit_position(&audit, "schema.commit", "st-1");
    let contract_started = audit_position(&audit, "schema.start", "st-2");
    for host in ["db-1", "db-2", "db-3", "db-4"] {
        let activated = audit_position(&audit, "step.finish", &format!("ch-2/activate/{host}"));
        assert!(expand_committed < activated && activated < contract_started);
    }

    let plan = shards.rewindctl(&["rollback", "plan", "--change", "ch-2"]);
    // 0002 is a contract migration: the release the waves restore needs the column it renamed,
    // so its revert runs before them.
    assert!(
        plan.contains("first revert 0002 on orders-db (migration of ch-2), all or nothing")
            && plan.contains("before the app waves: contract or data migrations"),
        "{plan}"
    );
    assert!(plan.find("first revert 0002") < plan.find("WAVE"), "{plan}");
    assert!(
        plan.contains("expand migration 0001 of orders-db (ch-2) stays"),
        "{plan}"
    );
    let rollback_id = shards
        .must_start_rollback("ch-2", pb::PlanOptions::default())
        .await;
    let rollback = shards.must_succeed(&rollback_id).await;
    assert!(
        rollback
            .outcome_detail
            .contains("orders-db reverted on every shard (0002)"),
        "{rollback:?}"
    );
    // The contract migration is undone everywhere; the expand one stays, as planned.
    for columns in shards.columns() {
        assert_eq!(columns, "customer_id,discount,id,total");
    }
    for shard in 0..4 {
        assert_eq!(shards.history(shard, "0002"), "reverted");
        assert_eq!(shards.history(shard, "0001"), "applied");
    }
    shards.must_have_nothing_prepared();

    let txn = shards.must_schema_txn("st-3").await;
    assert_eq!(
        (txn.direction.as_str(), txn.decision.as_str()),
        ("revert", "commit")
    );
    // Committed before any host of the rollback took a step.
    let audit = must_list_audit(&shards.client).await;
    let revert_committed = audit_position(&audit, "schema.commit", "st-3");
    let first_host_step = audit
        .iter()
        .position(|entry| {
            entry.action == "step.start"
                && entry
                    .target
                    .starts_with(&format!("{rollback_id}/orders-db/"))
        })
        .expect("the rollback's host steps are audited");
    assert!(revert_committed < first_host_step, "{audit:#?}");
    assert!(txn.committed && txn.verified, "{txn:#?}");
    // The fingerprint every shard has now is the one recorded before the contract migration.
    let before_contract = shards.must_schema_txn("st-2").await.fingerprint_before;
    assert_eq!(txn.expected_fingerprint, before_contract);
    for shard in &txn.shards {
        assert_eq!(shard.fingerprint_after, before_contract);
        assert_eq!(shard.version_after, "0001");
    }
    let shown = shards.rewindctl(&["schema", "show", "st-3"]);
    for expected in [
        "decision: commit: all 4 shards prepared",
        "db-3 down 0002: ALTER TABLE orders RENAME COLUMN amount TO total (0 rows)",
        "db-3 verify 0002: DO $$ BEGIN IF EXISTS",
        "committed on 4 shards; all at version 0001",
    ] {
        assert!(shown.contains(expected), "{expected}:\n{shown}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shard_failing_to_prepare_leaves_every_shard_unchanged() {
    let mut shards = Shards::must_start(3, &MIGRATIONS).await;
    shards.must_change("v1", &[]).await;
    shards.must_change("v2", &["0002"]).await;
    // db-3 holds an order the verify script refuses: its prepare fails after its down script
    // ran, while the other shards have prepared.
    shards.servers[2].must_sql("INSERT INTO orders VALUES (3, 1, -1.00)");
    let rollback_id = shards
        .must_start_rollback("ch-2", pb::PlanOptions::default())
        .await;
    let paused = shards.must_pause(&rollback_id).await;
    assert!(
        paused.paused_reason.contains("prepare failed on db-3")
            && paused.paused_reason.contains("negative totals"),
        "{}",
        paused.paused_reason
    );
    // The shards that had prepared rolled back: none changed, nothing is left prepared.
    for columns in shards.columns() {
        assert_eq!(columns, "amount,customer_id,id");
    }
    for shard in 0..3 {
        assert_eq!(shards.history(shard, "0002"), "applied");
    }
    shards.must_have_nothing_prepared();
    let txn = shards.must_schema_txn("st-2").await;
    assert_eq!(txn.decision, "abort", "{txn:#?}");
    assert!(!txn.committed);
    assert_eq!(
        txn.shards
            .iter()
            .map(|shard| pb::StepState::try_from(shard.steps[1].state).unwrap())
            .collect::<Vec<_>>(),
        [
            pb::StepState::Succeeded,
            pb::StepState::Succeeded,
            pb::StepState::Failed
        ],
        "db-1 and db-2 prepared, db-3 did not"
    );

    // A shard that cannot prepare at all is caught by the check, before anything runs.
    shards.servers[2].must_sql("DELETE FROM orders WHERE id = 3");
    shards.servers[2].must_restart_with("-c max_prepared_transactions=0");
    shards.must_control(&rollback_id, "resume").await;
    let paused = shards
        .must_rollback_where(&rollback_id, "the check to refuse db-3", |rollback| {
            rollback.paused_reason.contains("st-3")
        })
        .await;
    assert!(
        paused.paused_reason.contains("check failed on db-3")
            && paused
                .paused_reason
                .contains("prepared transactions are disabled"),
        "{}",
        paused.paused_reason
    );

    // Fixed, a resume begins a new transaction, which commits everywhere.
    shards.servers[2].must_restart_with("");
    shards.must_control(&rollback_id, "resume").await;
    shards.must_succeed(&rollback_id).await;
    for columns in shards.columns() {
        assert_eq!(columns, "customer_id,id,total");
    }
    shards.must_have_nothing_prepared();
}

#[tokio::test(flavor = "multi_thread")]
async fn edited_scripts_and_data_loss_are_refused_before_anything_changes() {
    let mut shards = Shards::must_start(2, &MIGRATIONS).await;
    shards.must_change("v1", &[]).await;
    shards.must_change("v2", &["0001", "0002"]).await;
    // 0002 as db-2 recorded it is not the registered script: it was edited after it ran.
    let registered = shards.servers[1]
        .must_sql("SELECT checksum FROM rewind_schema_history WHERE version = '0002'");
    shards.servers[1].must_sql(
        "UPDATE rewind_schema_history SET checksum = 'sha256:edited' WHERE version = '0002'",
    );
    let revert_all = pb::PlanOptions {
        revert_expand: true,
        ..Default::default()
    };
    let rollback_id = shards.must_start_rollback("ch-2", revert_all.clone()).await;
    let paused = shards.must_pause(&rollback_id).await;
    assert!(
        paused.paused_reason.contains("check failed on db-2")
            && paused.paused_reason.contains("edited after it ran"),
        "{}",
        paused.paused_reason
    );

    // Put right; now db-1 holds data in the column the expand migration's revert drops.
    shards.servers[1].must_sql(&format!(
        "UPDATE rewind_schema_history SET checksum = '{registered}' WHERE version = '0002'"
    ));
    shards.servers[0].must_sql("UPDATE orders SET discount = 1.25 WHERE id = 2");
    shards.must_control(&rollback_id, "resume").await;
    let paused = shards
        .must_rollback_where(&rollback_id, "the data-loss refusal", |rollback| {
            rollback.paused_reason.contains("would destroy data")
        })
        .await;
    assert!(
        paused.paused_reason.contains("check failed on db-1")
            && paused
                .paused_reason
                .contains("orders.discount: 1 non-null values")
            && paused.paused_reason.contains("--accept-data-loss"),
        "{}",
        paused.paused_reason
    );
    // The contract migration was reverted before the app waves (st-4); the expand one, after
    // them, is what refused.
    for columns in shards.columns() {
        assert_eq!(columns, "customer_id,discount,id,total");
    }
    shards.must_have_nothing_prepared();
    shards.must_control(&rollback_id, "abort").await;

    // Accepted (with a reason, audited): the rows are exported first, then the revert runs.
    let accepted = pb::PlanOptions {
        accept_data_loss: "discounts were a test campaign".into(),
        ..revert_all
    };
    let rollback_id = shards.must_start_rollback("ch-2", accepted).await;
    shards.must_succeed(&rollback_id).await;
    for columns in shards.columns() {
        assert_eq!(columns, "customer_id,id,total");
    }
    let exported = shards
        .dir
        .path()
        .join("db-1/agent/exports")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("orders.discount.csv");
    let rows = std::fs::read_to_string(&exported).unwrap();
    assert_eq!(
        rows, "id,customer_id,total,discount\n2,2,20.00,1.25\n",
        "{rows}"
    );
    let audit = shards.rewindctl(&["audit", "list", "--page-size", "1000"]);
    assert!(
        audit.contains("data loss accepted: discounts were a test campaign"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn crashes_at_each_phase_boundary_leave_no_transaction_in_doubt() {
    let mut shards = Shards::must_start(2, &MIGRATIONS).await;
    shards.must_change("v1", &[]).await;

    // The coordinator dies at a boundary; restarted, it resolves what is in doubt from the log.
    for (round, (failpoint, committed)) in [
        ("coordinator.before-prepare", false),
        ("coordinator.before-decision", false),
        ("coordinator.after-decision", true),
    ]
    .into_iter()
    .enumerate()
    {
        let change = shards.must_change("v2", &["0002"]).await;
        assert_eq!(change.state, pb::ChangeState::Deployed as i32, "{change:?}");
        shards.coordinator.must_restart_with_failpoints(failpoint);
        shards.client = shards.coordinator.must_client().await;
        must_agents_connected(&shards.client, 2).await;
        let rollback_id = shards
            .must_start_rollback(&change.change_id, pb::PlanOptions::default())
            .await;
        shards
            .coordinator
            .must_exit_within(Duration::from_secs(120));
        shards.coordinator.must_restart();
        shards.client = shards.coordinator.must_client().await;
        if committed {
            shards.must_succeed(&rollback_id).await;
        } else {
            // No decision was recorded: the new leader aborts, and nothing changed.
            let paused = shards.must_pause(&rollback_id).await;
            assert!(
                paused.paused_reason.contains("restarted or changed leader"),
                "round {round}: {}",
                paused.paused_reason
            );
            for columns in shards.columns() {
                assert_eq!(columns, "amount,customer_id,id", "round {round}");
            }
            shards.must_have_nothing_prepared();
            shards.must_control(&rollback_id, "resume").await;
            shards.must_succeed(&rollback_id).await;
        }
        for columns in shards.columns() {
            assert_eq!(columns, "customer_id,id,total", "round {round}");
        }
        shards.must_have_nothing_prepared();
    }

    // A shard's agent dies right after PREPARE TRANSACTION; restarted, it answers the
    // redelivered prepare from what it kept, and the transaction commits.
    let change = shards.must_change("v2", &["0002"]).await;
    shards.hosts[1].must_start_agent_with_failpoints("agent.after-prepare");
    must_agents_connected(&shards.client, 2).await;
    let rollback_id = shards
        .must_start_rollback(&change.change_id, pb::PlanOptions::default())
        .await;
    must_wait(
        Duration::from_secs(120),
        "the agent to crash after PREPARE",
        || {
            let agent = shards.hosts[1].agent.as_mut()?;
            agent.child.try_wait().ok().flatten()
        },
    );
    assert_eq!(
        shards.servers[1].must_sql("SELECT count(*) FROM pg_prepared_xacts"),
        "1",
        "the crashed agent's shard holds its prepared transaction"
    );
    shards.hosts[1].must_start_agent();
    shards.must_succeed(&rollback_id).await;
    for columns in shards.columns() {
        assert_eq!(columns, "customer_id,id,total");
    }
    shards.must_have_nothing_prepared();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shard_that_cannot_resolve_is_resolved_by_hand_and_then_verified() {
    let mut shards = Shards::must_start(2, &MIGRATIONS).await;
    shards.must_change("v1", &[]).await;
    let change = shards.must_change("v2", &["0002"]).await;
    assert_eq!(change.state, pb::ChangeState::Deployed as i32, "{change:?}");

    // The revert is decided (commit), the coordinator dies before any shard resolves, and
    // db-2's server goes away: its resolve fails, and keeps failing.
    shards
        .coordinator
        .must_restart_with_failpoints("coordinator.after-decision");
    shards.client = shards.coordinator.must_client().await;
    must_agents_connected(&shards.client, 2).await;
    let rollback_id = shards
        .must_start_rollback(&change.change_id, pb::PlanOptions::default())
        .await;
    shards
        .coordinator
        .must_exit_within(Duration::from_secs(120));
    shards.servers[1].must_stop();
    shards.coordinator.must_restart();
    shards.client = shards.coordinator.must_client().await;
    let paused = shards.must_pause(&rollback_id).await;
    let txn_id = shards
        .must_schema_txns()
        .await
        .into_iter()
        .next()
        .expect("the revert's transaction")
        .txn_id;
    assert!(
        paused.paused_reason.contains(&format!(
            "once resolved by hand: rewindctl schema resolved {txn_id} --shard db-2"
        )),
        "{}",
        paused.paused_reason
    );

    // A person takes the host out of rotation (its agent stops, so no automatic attempt
    // runs meanwhile), brings the server back and commits the prepared transaction from psql,
    // as decided, then says so: the resolve is taken over, failed or running, as the agent is
    // away.
    shards.hosts[1].agent = None;
    shards.servers[1].must_start_again();
    let gid = shards.servers[1].must_sql("SELECT gid FROM pg_prepared_xacts");
    assert!(gid.starts_with("rewind-"), "{gid}");
    shards.servers[1].must_sql(&format!("COMMIT PREPARED '{gid}'"));
    let refused = shards.rewindctl(&[
        "schema", "resolved", &txn_id, "--shard", "db-9", "--reason", "x",
    ]);
    assert!(refused.contains("db-9 is not a shard of"), "{refused}");
    let shown = shards.rewindctl(&[
        "schema",
        "resolved",
        &txn_id,
        "--shard",
        "db-2",
        "--reason",
        "COMMIT PREPARED from psql by the test",
    ]);
    assert!(
        shown.contains("resolved by hand by") && shown.contains("COMMIT PREPARED from psql"),
        "{shown}"
    );

    // Back in rotation, verify judges both shards as they are. The revert (of a contract
    // migration) ran before the app waves, so the rollback, paused for the stuck shard, still
    // has its hosts to revert: a person's resume lets it go on.
    shards.hosts[1].must_start_agent();
    must_agents_connected(&shards.client, 2).await;
    shards
        .must_rollback_where(&rollback_id, "the revert to be verified", |rollback| {
            rollback
                .schema
                .iter()
                .any(|stage| stage.contains(" done: committed"))
        })
        .await;
    shards.must_control(&rollback_id, "resume").await;
    shards.must_succeed(&rollback_id).await;
    let txn = shards.must_schema_txn(&txn_id).await;
    assert_eq!(txn.status, "done", "{txn:?}");
    assert!(txn.detail.starts_with("committed on 2 shards"), "{txn:?}");
    for columns in shards.columns() {
        assert_eq!(columns, "customer_id,id,total");
    }
    shards.must_have_nothing_prepared();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drill_applies_reverts_and_applies_again_on_staging_and_catches_a_bad_down_script() {
    let mut shards = Shards::must_start(2, &MIGRATIONS).await;
    shards.must_change("v1", &[]).await;
    let change = shards.must_change("v2", &["0001", "0002"]).await;
    assert_eq!(change.state, pb::ChangeState::Deployed as i32, "{change:?}");
    shards.must_add_shard("staging");
    shards.must_add_shard("staging");
    must_agents_connected(&shards.client, 4).await;
    shards.change_hosts = vec!["db-1".into(), "db-2".into()];

    let output = shards.coordinator.rewindctl(&[
        "drill", "start", "--change", "ch-2", "--env", "staging", "--reason", "rehearse",
    ]);
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(shown.contains("dr-1  passed of ch-2 on staging"), "{shown}");
    // Audited with its reason (cluster version 4).
    let audit = must_list_audit(&shards.client).await;
    assert!(
        audit.iter().any(|entry| entry.action == "drill.start"
            && rewind_tests::readable_outcome(entry).contains(": rehearse: ")),
        "{audit:?}"
    );
    for step in ["apply 0001, 0002", "revert 0002, 0001"] {
        assert!(shown.contains(step), "{step}: {shown}");
    }
    // Staging ends as production: both applied (the second time), and production untouched.
    for shard in [2, 3] {
        assert_eq!(shards.history(shard, "0001"), "applied");
        assert_eq!(
            shards.servers[shard]
                .must_sql("SELECT count(*) FROM rewind_schema_history WHERE reverted_at IS NULL"),
            "2"
        );
    }
    for columns in shards.columns() {
        assert_eq!(columns, "amount,customer_id,discount,id");
    }
    shards.must_have_nothing_prepared();

    // 0003's down leaves a renamed table behind: the revert step's fingerprint gives it away.
    let change = shards.must_change("v1", &["0003"]).await;
    assert_eq!(change.state, pb::ChangeState::Deployed as i32, "{change:?}");
    let output = shards.coordinator.rewindctl(&[
        "drill",
        "start",
        "--change",
        &change.change_id,
        "--env",
        "staging",
        "--reason",
        "rehearse",
    ]);
    let shown = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains("failed of ch-3 on staging: revert failed") && shown.contains("not sha256:"),
        "{shown}"
    );
    // A drill is refused where there is no shard, and for a change without migrations.
    let refused = shards.rewindctl(&[
        "drill", "start", "--change", "ch-2", "--env", "nowhere", "--reason", "rehearse",
    ]);
    assert!(
        refused.contains("no host in environment \"nowhere\" runs orders-db"),
        "{refused}"
    );
    let refused = shards.rewindctl(&[
        "drill", "start", "--change", "ch-1", "--env", "staging", "--reason", "rehearse",
    ]);
    assert!(refused.contains("ch-1 applies no migrations"), "{refused}");
}

/// The same migrations in SQLite's dialect.
const SQLITE_MIGRATIONS: [Migration; 2] = [
    (
        "0001",
        pb::MigrationClass::Expand,
        "ALTER TABLE orders ADD COLUMN discount NUMERIC; \
         CREATE INDEX orders_discount ON orders (discount);",
        "DROP INDEX orders_discount; ALTER TABLE orders DROP COLUMN discount;",
        "",
    ),
    (
        "0002",
        pb::MigrationClass::Contract,
        "ALTER TABLE orders RENAME COLUMN total TO amount;",
        "ALTER TABLE orders RENAME COLUMN amount TO total;",
        "SELECT total FROM orders LIMIT 1;",
    ),
];

#[tokio::test(flavor = "multi_thread")]
async fn an_sqlite_database_is_migrated_and_reverted_with_the_same_guards() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let file = dir.path().join("orders.db");
    let database = rusqlite::Connection::open(&file).unwrap();
    database
        .execute_batch(
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL); \
             CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers (id), \
             total NUMERIC); \
             INSERT INTO customers VALUES (1, 'ada'), (2, 'bob'); \
             INSERT INTO orders VALUES (1, 1, 10.5), (2, 2, 20);",
        )
        .unwrap();
    let columns = || -> String {
        let mut names: Vec<String> = database
            .prepare("SELECT name FROM pragma_table_info('orders')")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        names.sort();
        names.join(",")
    };
    let mut host = TestHost::must_prepare_services(
        dir.path(),
        "db-1",
        &coordinator.ca(),
        &coordinator.tls_dir(),
        std::slice::from_ref(&coordinator.address),
        "test-1",
        &[shards::DB],
    );
    let config = std::fs::read_to_string(&host.config_path).unwrap()
        + &format!("[service.database]\nsqlite = \"{}\"\n", file.display());
    std::fs::write(&host.config_path, config).unwrap();
    host.must_start_agent();
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, 1).await;
    shards::must_register(&mut client, &host, &SQLITE_MIGRATIONS).await;
    let mut shards = Shards {
        dir,
        coordinator,
        servers: Vec::new(),
        hosts: vec![host],
        client,
        change_hosts: Vec::new(),
    };
    shards.must_change("v1", &[]).await;
    let change = shards.must_change("v2", &["0001", "0002"]).await;
    assert_eq!(change.state, pb::ChangeState::Deployed as i32, "{change:?}");
    assert_eq!(columns(), "amount,customer_id,discount,id");

    // Data in the column the expand migration's revert drops: refused, then accepted.
    database
        .execute("UPDATE orders SET discount = 1.25 WHERE id = 2", [])
        .unwrap();
    let revert_all = pb::PlanOptions {
        revert_expand: true,
        ..Default::default()
    };
    let rollback_id = shards.must_start_rollback("ch-2", revert_all.clone()).await;
    let paused = shards.must_pause(&rollback_id).await;
    assert!(
        paused
            .paused_reason
            .contains("orders.discount: 1 non-null values"),
        "{}",
        paused.paused_reason
    );
    // The contract migration was reverted before the app waves; the expand one, after them,
    // is what refused.
    assert_eq!(columns(), "customer_id,discount,id,total");
    shards.must_control(&rollback_id, "abort").await;
    let accepted = pb::PlanOptions {
        accept_data_loss: "test discounts".into(),
        ..revert_all
    };
    let rollback_id = shards.must_start_rollback("ch-2", accepted).await;
    shards.must_succeed(&rollback_id).await;
    assert_eq!(columns(), "customer_id,id,total");
    let reverted: i64 = database
        .query_row(
            "SELECT count(*) FROM rewind_schema_history WHERE reverted_at IS NOT NULL",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(reverted, 2);
    let export_dir = shards
        .dir
        .path()
        .join("db-1/agent/exports")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let rows = std::fs::read_to_string(export_dir.join("orders.discount.jsonl")).unwrap();
    assert!(
        rows.contains("\"discount\":1.25") && rows.contains("\"id\":2"),
        "{rows}"
    );
    // st-3 reverted the contract migration before the waves, st-4 was the refused revert of
    // the expand one after them, st-5 the accepted one.
    let txn = shards.must_schema_txn("st-3").await;
    assert!(txn.committed && txn.verified, "{txn:#?}");
    let txn = shards.must_schema_txn("st-4").await;
    assert!(!txn.committed, "{txn:#?}");
    let txn = shards.must_schema_txn("st-5").await;
    assert!(txn.committed && txn.verified, "{txn:#?}");
}

/// The app and its database are different services: `web` runs on its own hosts, and its
/// change carries migrations of `orders-db`, whose hosts are the shards. The rollback reverts
/// the contract migration on every shard, all or nothing, then the app's hosts.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_of_an_app_migrates_another_services_database_and_its_rollback_reverts_both() {
    let mut shards = Shards::must_start(2, &MIGRATIONS).await;
    let mut web_hosts: Vec<TestHost> = ["web-1", "web-2"]
        .iter()
        .map(|id| TestHost::must_prepare(shards.dir.path(), id, &shards.coordinator))
        .collect();
    for host in &mut web_hosts {
        host.must_start_agent();
    }
    must_agents_connected(&shards.client, 4).await;
    must_register_web(&mut shards.client, &web_hosts[0], false).await;
    let first = must_change(&mut shards.client, "v1").await;
    must_change_where(&shards.client, &first, "web v1", |change| {
        change.state == pb::ChangeState::Deployed as i32
    })
    .await;
    let change = shards
        .client
        .start_change(pb::StartChangeRequest {
            break_glass: false,
            request_id: "web-v2-with-schema".into(),
            service: "web".into(),
            version: "v2".into(),
            reason: "v2 needs 0001 and 0002".into(),
            migrations: vec![
                format!("{}@0001", shards::DB),
                format!("{}@0002", shards::DB),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .change
        .unwrap();
    let change = must_change_where(&shards.client, &change.change_id, "web v2", |change| {
        change.state == pb::ChangeState::Deployed as i32
            || change.state == pb::ChangeState::Failed as i32
    })
    .await;
    assert_eq!(change.state, pb::ChangeState::Deployed as i32, "{change:?}");
    for columns in shards.columns() {
        assert_eq!(columns, "amount,customer_id,discount,id");
    }
    for host in &web_hosts {
        assert_eq!(host.current_link(), "releases/v2");
    }

    let rollback_id = shards
        .must_start_rollback(&change.change_id, pb::PlanOptions::default())
        .await;
    let ended = shards.must_succeed(&rollback_id).await;
    for host in &web_hosts {
        host.must_be_restored_to_v1();
    }
    for columns in shards.columns() {
        assert_eq!(
            columns, "customer_id,discount,id,total",
            "0002 reverted, 0001 kept"
        );
    }
    for shard in 0..2 {
        assert_eq!(shards.history(shard, "0002"), "reverted");
    }
    shards.must_have_nothing_prepared();
    assert!(
        ended.schema.iter().any(|line| line.contains("0002")
            && line.contains(shards::DB)
            && line.contains("committed")),
        "{:?}",
        ended.schema
    );
    // 0002 is a contract migration: the database was reverted before the app's hosts, whose
    // old release needs what it renamed.
    let audit = must_list_audit(&shards.client).await;
    // The rollback's schema transaction is the last one committed.
    let schema_committed = audit
        .iter()
        .rposition(|entry| entry.action == "schema.commit")
        .unwrap();
    for host in ["web-1", "web-2"] {
        let restored = audit
            .iter()
            .position(|entry| {
                entry.action == "step.finish"
                    && entry.target.contains(&rollback_id)
                    && entry.target.contains("/restore/")
                    && entry.target.ends_with(host)
            })
            .unwrap_or_else(|| panic!("no restore of {host} audited"));
        assert!(
            schema_committed < restored,
            "the schema revert committed before {host} was restored"
        );
    }
}

/// A down script that leaves rows pointing at nothing (it re-adds a foreign key `NOT VALID`,
/// over rows written while the key was gone) is refused in prepare by the foreign-key check:
/// the rollback pauses naming the key, and no shard changed.
#[tokio::test(flavor = "multi_thread")]
async fn a_revert_that_breaks_a_foreign_key_is_refused_in_prepare_and_changes_nothing() {
    const LOOSEN: [Migration; 1] = [(
        "0004",
        pb::MigrationClass::Contract,
        "ALTER TABLE orders DROP CONSTRAINT orders_customer_id_fkey;",
        "ALTER TABLE orders ADD CONSTRAINT orders_customer_id_fkey \
         FOREIGN KEY (customer_id) REFERENCES customers (id) NOT VALID;",
        "",
    )];
    let mut shards = Shards::must_start(2, &LOOSEN).await;
    shards.must_change("v1", &[]).await;
    let change = shards.must_change("v2", &["0004"]).await;
    assert_eq!(change.state, pb::ChangeState::Deployed as i32, "{change:?}");
    // Written under the new schema: an order of a customer that does not exist.
    shards.servers[1].must_sql("INSERT INTO orders VALUES (9, 99, 1.00)");
    let rollback_id = shards
        .must_start_rollback(&change.change_id, pb::PlanOptions::default())
        .await;
    let paused = shards.must_pause(&rollback_id).await;
    assert!(
        paused.paused_reason.contains("foreign keys do not hold")
            && paused.paused_reason.contains("orders_customer_id_fkey")
            && paused.paused_reason.contains("db-2"),
        "{}",
        paused.paused_reason
    );
    for shard in 0..2 {
        assert_eq!(shards.history(shard, "0004"), "applied", "db-{}", shard + 1);
        assert_eq!(
            shards.servers[shard].must_sql(
                "SELECT count(*) FROM pg_constraint WHERE conname = 'orders_customer_id_fkey'"
            ),
            "0",
            "db-{}: the key is still gone",
            shard + 1
        );
    }
    shards.must_have_nothing_prepared();
}

/// A migration registered as expand that drops a column is not one: the shards refuse it in
/// prepare (the catalog before and after its up script differ by more than additions), the
/// change fails naming the dropped column, and no shard changed. A real expand one runs: a
/// column with a default, new tables (one with a quoted name and a required column of its own),
/// and a `NOT NULL` dropped.
#[tokio::test(flavor = "multi_thread")]
async fn an_expand_migration_that_drops_a_column_is_refused_where_it_first_runs() {
    const MISCLASSED: [Migration; 2] = [
        (
            "0005",
            pb::MigrationClass::Expand,
            "ALTER TABLE orders ADD COLUMN currency text NOT NULL DEFAULT 'EUR'; \
             CREATE TABLE refunds (id int PRIMARY KEY); \
             CREATE TABLE \"order items\" (id int PRIMARY KEY); \
             ALTER TABLE \"order items\" ADD COLUMN \"due at\" date NOT NULL; \
             ALTER TABLE customers ALTER COLUMN name DROP NOT NULL;",
            "ALTER TABLE customers ALTER COLUMN name SET NOT NULL; \
             DROP TABLE \"order items\"; DROP TABLE refunds; \
             ALTER TABLE orders DROP COLUMN currency;",
            "",
        ),
        (
            "0006",
            pb::MigrationClass::Expand,
            "ALTER TABLE orders DROP COLUMN total;",
            "ALTER TABLE orders ADD COLUMN total numeric(10, 2);",
            "",
        ),
    ];
    let mut shards = Shards::must_start(2, &MISCLASSED).await;
    shards.must_change("v1", &[]).await;
    let change = shards.must_change("v2", &["0005"]).await;
    assert_eq!(change.state, pb::ChangeState::Deployed as i32, "{change:?}");

    let change = shards.must_change("v1", &["0006"]).await;
    assert_eq!(change.state, pb::ChangeState::Failed as i32, "{change:?}");
    let txn = shards.must_schema_txn("st-2").await;
    assert_eq!(txn.decision, "abort", "{txn:#?}");
    let told = format!("{txn:?}");
    assert!(
        told.contains("0006 is declared expand but does more than add")
            && told.contains("drops column public.orders.total numeric(10,2)")
            && told.contains("register it as contract"),
        "{told}"
    );
    for columns in shards.columns() {
        assert_eq!(columns, "currency,customer_id,id,total");
    }
    for shard in 0..2 {
        assert_eq!(shards.history(shard, "0006"), "", "db-{}", shard + 1);
    }
    shards.must_have_nothing_prepared();
}
