//! The agent's migration executor against a real PostgreSQL: apply and revert in one
//! transaction each, recorded in the schema history table; idempotent; a script edited after it
//! ran is refused; a failing down script leaves everything as it was.

use rewind_agent::migrate::{self, Migration};
use rewind_agent::schema;
use rewind_tests::*;

fn columns(database: &schema::DatabaseConfig) -> Vec<String> {
    let mut client = database.postgres.connect(postgres::NoTls).unwrap();
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

#[test]
fn migrations_apply_and_revert_once_each_and_edited_scripts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Postgres::must_start(&dir.path().join("pg"));
    let database = schema::validate(&server.url(), None).unwrap();
    let mut client = database.postgres.connect(postgres::NoTls).unwrap();
    client
        .batch_execute("CREATE TABLE orders (id int PRIMARY KEY)")
        .unwrap();
    let (up, down, verify) = (
        "ALTER TABLE orders ADD COLUMN note text",
        "ALTER TABLE orders DROP COLUMN note",
        "SELECT id FROM orders",
    );
    let migration = Migration {
        version: "0001".into(),
        checksum: "sha256:1111".into(),
        class: "expand".into(),
        up_sql: up.into(),
        down_sql: down.into(),
        verify_sql: verify.into(),
    };

    assert_eq!(
        migrate::apply(&database, &migration, "rb-test").unwrap(),
        "applied 0001"
    );
    assert_eq!(columns(&database), ["id", "note"]);
    assert_eq!(
        migrate::apply(&database, &migration, "rb-test").unwrap(),
        "0001 already applied"
    );
    assert_eq!(schema::schema_version(&database), "0001 (sha256:1111)");

    let edited = Migration {
        checksum: "sha256:2222".into(),
        ..migration.clone()
    };
    let refused = migrate::revert(&database, &edited, "rb-test")
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("they were edited after it ran"),
        "{refused}"
    );

    // A down script that fails changes nothing: not the schema, not the history.
    let broken = Migration {
        down_sql: "ALTER TABLE orders DROP COLUMN note; SELECT 1/0".into(),
        ..migration.clone()
    };
    let failed = migrate::revert(&database, &broken, "rb-test")
        .unwrap_err()
        .to_string();
    assert!(
        failed.contains("down script of 0001") && failed.contains("22012"),
        "{failed}"
    );
    assert_eq!(columns(&database), ["id", "note"]);
    assert_eq!(schema::schema_version(&database), "0001 (sha256:1111)");

    assert_eq!(
        migrate::revert(&database, &migration, "rb-test").unwrap(),
        "reverted 0001"
    );
    assert_eq!(columns(&database), ["id"]);
    assert_eq!(
        migrate::revert(&database, &migration, "rb-test").unwrap(),
        "0001 already reverted"
    );
    assert_eq!(schema::schema_version(&database), "no migration applied");
    let never = Migration {
        version: "0002".into(),
        ..migration.clone()
    };
    let error = migrate::revert(&database, &never, "rb-test")
        .unwrap_err()
        .to_string();
    assert!(error.contains("0002 never ran on this database"), "{error}");

    // Applied again after a revert: the same row, applied once more.
    assert_eq!(
        migrate::apply(&database, &migration, "rb-test").unwrap(),
        "applied 0001"
    );
    assert_eq!(columns(&database), ["id", "note"]);
}
