//! The agent's migration executor against a real PostgreSQL: apply and revert in one
//! transaction each, recorded in the schema history table; idempotent; scripts that are not the
//! registered ones, or were edited after they ran, are refused; newest first; a failing down
//! script leaves everything as it was.

use rewind_agent::migrate::{self, Migration};
use rewind_agent::schema;
use rewind_shared::digest::migration_checksum;
use rewind_tests::*;

fn columns(database: &schema::DatabaseConfig) -> Vec<String> {
    let mut client = database
        .postgres()
        .unwrap()
        .connect(postgres::NoTls)
        .unwrap();
    client
        .query(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_name = 'orders' ORDER BY ordinal_position",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn migration(version: &str, up: &str, down: &str, verify: &str) -> Migration {
    Migration {
        version: version.into(),
        checksum: migration_checksum(up, down, verify),
        class: "expand".into(),
        up_sql: up.into(),
        down_sql: down.into(),
        verify_sql: verify.into(),
    }
}

#[test]
fn migrations_apply_and_revert_once_each_and_edited_scripts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Postgres::must_start(&dir.path().join("pg"));
    // A history table whose name is also a keyword still works (names are quoted).
    let database = schema::validate(&server.url(), Some("order")).unwrap();
    let mut client = database
        .postgres()
        .unwrap()
        .connect(postgres::NoTls)
        .unwrap();
    client
        .batch_execute("CREATE TABLE orders (id int PRIMARY KEY)")
        .unwrap();
    let first = migration(
        "0001",
        "ALTER TABLE orders ADD COLUMN note text",
        "ALTER TABLE orders DROP COLUMN note",
        "SELECT id FROM orders",
    );
    let second = migration(
        "0002",
        "ALTER TABLE orders ADD COLUMN total int",
        "ALTER TABLE orders DROP COLUMN total",
        "",
    );

    assert_eq!(
        migrate::apply(&database, &first, "rb-test").unwrap(),
        "applied 0001"
    );
    assert_eq!(columns(&database), ["id", "note"]);
    assert_eq!(
        migrate::apply(&database, &first, "rb-test").unwrap(),
        "0001 already applied"
    );
    assert_eq!(
        schema::schema_version(&database),
        format!("0001 ({})", first.checksum)
    );
    // An "expand" migration that drops what the release before it reads is refused, and
    // nothing it did is kept.
    let dropping = migration(
        "0004",
        "ALTER TABLE orders DROP COLUMN note",
        "ALTER TABLE orders ADD COLUMN note text",
        "",
    );
    let refused = migrate::apply(&database, &dropping, "rb-test")
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("0004 is declared expand")
            && refused.contains("drops column public.orders.note text"),
        "{refused}"
    );
    assert_eq!(columns(&database), ["id", "note"]);

    // Scripts that are not what their checksum says are refused before anything runs.
    let forged = Migration {
        down_sql: "DROP TABLE orders".into(),
        ..first.clone()
    };
    let refused = migrate::revert(&database, &forged, "rb-test")
        .unwrap_err()
        .to_string();
    assert!(refused.contains("not to the registered"), "{refused}");
    // Scripts registered anew under a version that already ran here are refused too.
    let edited = migration("0001", &first.up_sql, "DROP TABLE orders", "");
    let refused = migrate::revert(&database, &edited, "rb-test")
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("they were edited after it ran"),
        "{refused}"
    );

    // Newest first.
    migrate::apply(&database, &second, "rb-test").unwrap();
    let refused = migrate::revert(&database, &first, "rb-test")
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("0002 was applied after 0001 and is still applied"),
        "{refused}"
    );
    assert_eq!(
        migrate::revert(&database, &second, "rb-test").unwrap(),
        "reverted 0002"
    );

    // A down script that fails changes nothing: not the schema, not the history.
    let broken = migration(
        "0001",
        &first.up_sql,
        "ALTER TABLE orders DROP COLUMN note; SELECT 1/0",
        "",
    );
    let mut client = database
        .postgres()
        .unwrap()
        .connect(postgres::NoTls)
        .unwrap();
    client
        .execute(
            "UPDATE \"order\" SET checksum = $1 WHERE version = '0001'",
            &[&broken.checksum],
        )
        .unwrap();
    let failed = migrate::revert(&database, &broken, "rb-test")
        .unwrap_err()
        .to_string();
    assert!(
        failed.contains("down script of 0001") && failed.contains("22012"),
        "{failed}"
    );
    assert_eq!(columns(&database), ["id", "note"]);
    client
        .execute(
            "UPDATE \"order\" SET checksum = $1 WHERE version = '0001'",
            &[&first.checksum],
        )
        .unwrap();

    assert_eq!(
        migrate::revert(&database, &first, "rb-test").unwrap(),
        "reverted 0001"
    );
    assert_eq!(columns(&database), ["id"]);
    assert_eq!(
        migrate::revert(&database, &first, "rb-test").unwrap(),
        "0001 already reverted"
    );
    assert_eq!(schema::schema_version(&database), "no migration applied");
    let never = migration("0003", "SELECT 1", "SELECT 1", "");
    let error = migrate::revert(&database, &never, "rb-test")
        .unwrap_err()
        .to_string();
    assert!(error.contains("0003 never ran on this database"), "{error}");

    // A script that ends the transaction itself is caught and named.
    let committing = migration(
        "0004",
        "ALTER TABLE orders ADD COLUMN x int; COMMIT; ALTER TABLE orders ADD COLUMN y int",
        "SELECT 1",
        "",
    );
    let error = migrate::apply(&database, &committing, "rb-test")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("ended the migration's transaction itself"),
        "{error}"
    );

    // Applied again after a revert: the same row, applied once more.
    assert_eq!(
        migrate::apply(&database, &first, "rb-test").unwrap(),
        "applied 0001"
    );
}
