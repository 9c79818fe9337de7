//! Rollback of a data migration across 8 PostgreSQL shards, all or nothing, reporting how long
//! each phase of the schema transaction took (from its first shard's start to its last shard's
//! end): check, prepare (the down script on every row), resolve (COMMIT PREPARED), verify.
//!
//! `cargo bench -p rewind-tests --bench schema_rollback`; `REWIND_BENCH_SHARDS`,
//! `REWIND_BENCH_ROWS` (per shard) and `REWIND_BENCH_ROUNDS` change the size.

use std::time::Instant;

use rewind_proto::v1 as pb;
use rewind_tests::shards::{Migration, Shards};

const MIGRATIONS: [Migration; 1] = [(
    "0001",
    pb::MigrationClass::Data,
    "UPDATE orders SET total = total * 2;",
    "UPDATE orders SET total = total / 2;",
    "DO $$ BEGIN IF EXISTS (SELECT 1 FROM orders WHERE total > 100) THEN \
     RAISE EXCEPTION 'totals not halved'; END IF; END $$;",
)];

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Wall time of each phase, in ms: (check, prepare, resolve, verify).
fn phase_times(txn: &pb::SchemaTxn) -> [u64; 4] {
    let mut times = [0; 4];
    for (phase, time) in times.iter_mut().enumerate() {
        let steps = txn.shards.iter().filter_map(|shard| shard.steps.get(phase));
        let begun = steps
            .clone()
            .map(|step| step.started_at_ms)
            .min()
            .unwrap_or(0);
        let ended = steps.map(|step| step.finished_at_ms).max().unwrap_or(0);
        *time = ended.saturating_sub(begun);
    }
    times
}

/// One round: each phase's time, the schema transaction's and the whole rollback's, in ms.
type Round = ([u64; 4], u64, u64);

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let shard_count = setting("REWIND_BENCH_SHARDS", 8);
    let rows = setting("REWIND_BENCH_ROWS", 100_000);
    let rounds = setting("REWIND_BENCH_ROUNDS", 3);
    let mut shards = Shards::must_start(shard_count, &MIGRATIONS).await;
    for server in &shards.servers {
        server.must_sql(&format!(
            "INSERT INTO orders SELECT g, 1 + g % 2, (g % 1000) / 20.0 \
             FROM generate_series(3, {rows}) g"
        ));
        server.must_sql("VACUUM ANALYZE orders");
    }
    shards.must_change("v1", &[]).await;
    println!(
        "Rollback of a data migration (UPDATE of {rows} rows) on {shard_count} shards, all or \
         nothing; per phase, first shard's start to last shard's end:"
    );
    println!(
        "{:>5} {:>9} {:>9} {:>9} {:>9} {:>12} {:>14}",
        "round", "check", "prepare", "resolve", "verify", "schema txn", "whole rollback"
    );
    let mut results: Vec<Round> = Vec::new();
    for round in 1..=rounds {
        let change = shards.must_change("v2", &["0001"]).await;
        assert_eq!(change.state, pb::ChangeState::Deployed as i32, "{change:?}");
        let started = Instant::now();
        let options = pb::PlanOptions {
            gate: Some(pb::GateOptions {
                settle_s: 1,
                timeout_s: 60,
                ..Default::default()
            }),
            ..Default::default()
        };
        let rollback_id = shards.must_start_rollback(&change.change_id, options).await;
        shards.must_succeed(&rollback_id).await;
        let whole = started.elapsed().as_millis() as u64;
        let txn = shards
            .client
            .list_schema_txns(pb::ListSchemaTxnsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .txns
            .remove(0);
        assert!(txn.direction == "revert" && txn.verified, "{txn:?}");
        let times = phase_times(&txn);
        let total = txn.finished_at_ms - txn.started_at_ms;
        println!(
            "{round:>5} {:>6} ms {:>6} ms {:>6} ms {:>6} ms {:>9} ms {:>11} ms",
            times[0], times[1], times[2], times[3], total, whole
        );
        results.push((times, total, whole));
    }
    let column = |pick: &dyn Fn(&Round) -> u64| median(results.iter().map(pick).collect());
    println!(
        "{:>5} {:>6} ms {:>6} ms {:>6} ms {:>6} ms {:>9} ms {:>11} ms",
        "p50",
        column(&|r| r.0[0]),
        column(&|r| r.0[1]),
        column(&|r| r.0[2]),
        column(&|r| r.0[3]),
        column(&|r| r.1),
        column(&|r| r.2)
    );
}
