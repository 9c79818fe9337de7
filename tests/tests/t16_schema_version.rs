//! The schema version of a service's database in its snapshots: read from the schema history
//! table of a real PostgreSQL server, and shown by `rewindctl host drift` when a migration ran
//! after the latest capture.

use rewind_tests::*;

fn psql(server: &Postgres, sql: &str) {
    let output = std::process::Command::new("psql")
        .arg(server.url())
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .expect("run psql");
    assert!(
        output.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_record_the_schema_version_and_drift_shows_a_later_migration() {
    let dir = tempfile::tempdir().unwrap();
    let server = Postgres::must_start(&dir.path().join("pg"));
    psql(
        &server,
        "CREATE TABLE rewind_schema_history (version text PRIMARY KEY, checksum text NOT NULL, \
         class text NOT NULL, applied_at timestamptz NOT NULL, applied_by text NOT NULL, \
         reverted_at timestamptz, reverted_by text); \
         INSERT INTO rewind_schema_history VALUES \
         ('001', 'sha256:aaaa', 'expand', now() - interval '2 days', 'deploy', NULL, NULL), \
         ('002', 'sha256:bbbb', 'contract', now() - interval '1 day', 'deploy', now(), 'rewind')",
    );
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let mut host = TestHost::must_prepare(dir.path(), "db-1", &coordinator);
    let config = std::fs::read_to_string(&host.config_path).unwrap()
        + &format!("[service.database]\npostgres = \"{}\"\n", server.url());
    std::fs::write(&host.config_path, config).unwrap();
    host.must_start_agent();
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, 1).await;
    must_deploy_v1_then_v2(&mut client, std::slice::from_ref(&host)).await;

    // 002 was reverted, so the snapshots say 001.
    let captured = coordinator.rewindctl(&["host", "diff", "db-1", "db-1"]);
    assert!(captured.status.success());
    psql(
        &server,
        "INSERT INTO rewind_schema_history VALUES \
         ('003', 'sha256:cccc', 'expand', now(), 'deploy', NULL, NULL)",
    );
    let drift = coordinator.rewindctl(&["host", "drift", "db-1"]);
    let shown = String::from_utf8_lossy(&drift.stdout);
    assert_eq!(drift.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains("schema version: 001 (sha256:aaaa) -> 003 (sha256:cccc)"),
        "{shown}"
    );

    // A database that cannot be reached is recorded as such; the capture still succeeds.
    drop(server);
    let drift = coordinator.rewindctl(&["host", "drift", "db-1"]);
    let shown = String::from_utf8_lossy(&drift.stdout);
    assert!(
        shown.contains("schema version: 001 (sha256:aaaa) -> cannot connect"),
        "{shown}"
    );
}
