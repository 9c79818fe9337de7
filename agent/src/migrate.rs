//! Applying and reverting a database's schema migrations on this host's database, each in one
//! transaction that also records it in the schema history table (created when missing). The
//! credentials stay in this host's `[service.database]`; the scripts come from the coordinator's
//! registry with their checksum, which must match what the table recorded when it ran.

use crate::AgentError;
use crate::schema::DatabaseConfig;

/// A registered migration as the agent receives it.
#[derive(Clone, Debug)]
pub struct Migration {
    pub version: String,
    pub checksum: String,
    pub class: String,
    pub up_sql: String,
    pub down_sql: String,
    pub verify_sql: String,
}

/// The class name the history table records, from the wire's enum.
pub fn class_name(class: i32) -> &'static str {
    match rewind_proto::v1::MigrationClass::try_from(class) {
        Ok(rewind_proto::v1::MigrationClass::Expand) => "expand",
        Ok(rewind_proto::v1::MigrationClass::Contract) => "contract",
        Ok(rewind_proto::v1::MigrationClass::Data) => "data",
        _ => "unknown",
    }
}

pub(crate) fn refused(detail: String) -> AgentError {
    AgentError::refused("database", detail)
}

pub(crate) fn failed(what: &str) -> impl Fn(postgres::Error) -> AgentError + '_ {
    move |error| {
        let detail = error.as_db_error().map_or_else(
            || error.to_string(),
            |db| format!("{}: {}", db.code().code(), db.message()),
        );
        AgentError::refused("database", format!("{what}: {detail}"))
    }
}

/// Key space of rewind's advisory locks (the first of the two keys), so they never collide with
/// the application's own single-key locks.
const LOCK_SPACE: i32 = 0x7265_7764; // "rewd"

/// Takes the database's migration lock (one migration at a time, whatever else runs), bounds
/// how long a statement may wait for a table lock, then creates the schema history table if it
/// is missing.
pub(crate) fn lock_history(
    transaction: &mut impl postgres::GenericClient,
    table: &str,
) -> Result<(), AgentError> {
    // Before any lock: an ALTER waiting behind a long transaction would queue every query on
    // its table, and a wait for the migration lock (held by another migration, or by a
    // prepared transaction not yet resolved) must end too.
    transaction
        .batch_execute("SET LOCAL lock_timeout = '10s'")
        .map_err(failed("set lock_timeout"))?;
    transaction
        .execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&LOCK_SPACE, &table],
        )
        .map_err(failed(
            "take the migration lock (another migration, or a prepared transaction not yet \
             resolved, holds it)",
        ))?;
    let table = crate::schema::quoted_table(table);
    transaction
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (version text PRIMARY KEY, checksum text NOT NULL, \
             class text NOT NULL, applied_at timestamptz NOT NULL, applied_by text NOT NULL, \
             reverted_at timestamptz, reverted_by text)"
        ))
        .map_err(failed("create the schema history table"))
}

/// Where a migration stands in the history table: never run, applied, or applied then reverted.
pub(crate) enum Recorded {
    Never,
    Applied,
    Reverted,
}

pub(crate) fn recorded(
    transaction: &mut impl postgres::GenericClient,
    table: &str,
    migration: &Migration,
) -> Result<Recorded, AgentError> {
    let row = transaction
        .query_opt(
            &format!("SELECT checksum, reverted_at IS NOT NULL FROM {table} WHERE version = $1"),
            &[&migration.version],
        )
        .map_err(failed("read the schema history"))?;
    let Some(row) = row else {
        return Ok(Recorded::Never);
    };
    let checksum: String = row.get(0);
    if checksum != migration.checksum {
        return Err(edited_after_it_ran(migration, &checksum));
    }
    Ok(if row.get::<_, bool>(1) {
        Recorded::Reverted
    } else {
        Recorded::Applied
    })
}

/// The history recorded `checksum` for a migration whose registered scripts hash otherwise.
pub(crate) fn edited_after_it_ran(migration: &Migration, checksum: &str) -> AgentError {
    refused(format!(
        "migration {} ran here with checksum {checksum}, but its registered scripts have {}: \
         they were edited after it ran",
        migration.version, migration.checksum
    ))
}

/// Refuses scripts that are not the registered ones: their checksum is computed here again.
pub(crate) fn check_scripts(migration: &Migration) -> Result<(), AgentError> {
    let actual = rewind_shared::digest::migration_checksum(
        &migration.up_sql,
        &migration.down_sql,
        &migration.verify_sql,
    );
    if actual != migration.checksum {
        return Err(refused(format!(
            "migration {}: its scripts hash to {actual}, not to the registered {}",
            migration.version, migration.checksum
        )));
    }
    Ok(())
}

/// Runs a script inside the migration's transaction and checks it did not end that transaction
/// itself (a COMMIT or ROLLBACK in the script would leave part of it applied on its own).
fn run_script(
    transaction: &mut impl postgres::GenericClient,
    what: &str,
    script: &str,
) -> Result<(), AgentError> {
    let before = txid(transaction, what)?;
    transaction.batch_execute(script).map_err(failed(what))?;
    if txid(transaction, what)? != before {
        return Err(refused(format!(
            "{what} ended the migration's transaction itself (COMMIT or ROLLBACK in the script): \
             what ran before that is applied; check the database by hand"
        )));
    }
    Ok(())
}

/// The current transaction's id: a script that ended the transaction leaves another one.
pub(crate) fn txid(
    transaction: &mut impl postgres::GenericClient,
    what: &str,
) -> Result<i64, AgentError> {
    Ok(transaction
        .query_one("SELECT txid_current()", &[])
        .map_err(failed(what))?
        .get(0))
}

pub(crate) fn connect(database: &DatabaseConfig) -> Result<postgres::Client, AgentError> {
    let postgres = database
        .postgres()
        .ok_or_else(|| refused("this database is SQLite, not PostgreSQL".into()))?;
    crate::schema::connect_within(postgres, crate::schema::HANDSHAKE_TIMEOUT)
        .map_err(|why| refused(format!("database: {why}")))
}

/// Runs `act` in one transaction on the database, after checking the scripts, taking the
/// migration lock and reading where the migration stands; commits when `act` succeeds.
fn in_history_transaction(
    database: &DatabaseConfig,
    migration: &Migration,
    act: impl FnOnce(&mut postgres::Transaction<'_>, &str, Recorded) -> Result<String, AgentError>,
) -> Result<String, AgentError> {
    check_scripts(migration)?;
    let table = crate::schema::quoted_table(&database.history_table);
    let mut client = connect(database)?;
    let mut transaction = client.transaction().map_err(failed("begin"))?;
    lock_history(&mut transaction, &database.history_table)?;
    let state = recorded(&mut transaction, &table, migration)?;
    let done = act(&mut transaction, &table, state)?;
    transaction.commit().map_err(failed("commit"))?;
    Ok(done)
}

/// Runs the up script and records it; a migration already applied answers so.
pub fn apply(
    database: &DatabaseConfig,
    migration: &Migration,
    by: &str,
) -> Result<String, AgentError> {
    in_history_transaction(database, migration, |transaction, table, state| {
        if let Recorded::Applied = state {
            return Ok(format!("{} already applied", migration.version));
        }
        let expand = migration.class == "expand";
        let catalog_before = if expand {
            crate::shard::postgres::catalog_lines(transaction, table)?
        } else {
            Vec::new()
        };
        run_script(
            transaction,
            &format!("up script of {}", migration.version),
            &migration.up_sql,
        )?;
        if expand {
            let catalog_after = crate::shard::postgres::catalog_lines(transaction, table)?;
            crate::shard::check_expand(
                migration,
                (&catalog_before, &catalog_before),
                &catalog_after,
                true,
            )?;
        }
        let recorded = match state {
            Recorded::Reverted => transaction.execute(
                &format!(
                    "UPDATE {table} SET applied_at = now(), applied_by = $2, reverted_at = NULL, \
                     reverted_by = NULL WHERE version = $1"
                ),
                &[&migration.version, &by],
            ),
            _ => transaction.execute(
                &format!(
                    "INSERT INTO {table} (version, applied_by, checksum, class, applied_at) \
                     VALUES ($1, $2, $3, $4, now())"
                ),
                &[
                    &migration.version,
                    &by,
                    &migration.checksum,
                    &migration.class,
                ],
            ),
        };
        recorded.map_err(failed("record the migration"))?;
        Ok(format!("applied {}", migration.version))
    })
}

/// Runs the down script, then the verify script (which checks the database is consistent once
/// reverted), and records the revert; refused when the migration never ran here, answered so
/// when it was already reverted. Nothing is kept if any of it fails.
pub fn revert(
    database: &DatabaseConfig,
    migration: &Migration,
    by: &str,
) -> Result<String, AgentError> {
    in_history_transaction(database, migration, |transaction, table, state| {
        match state {
            Recorded::Never => {
                return Err(refused(format!(
                    "migration {} never ran on this database: there is nothing to revert",
                    migration.version
                )));
            }
            Recorded::Reverted => return Ok(format!("{} already reverted", migration.version)),
            Recorded::Applied => {}
        }
        // Newest first: a migration applied after this one and still applied must go first.
        let later: Option<String> = transaction
            .query_opt(
                &format!(
                    "SELECT version FROM {table} WHERE reverted_at IS NULL AND version <> $1 AND \
                     applied_at > (SELECT applied_at FROM {table} WHERE version = $1) \
                     ORDER BY applied_at LIMIT 1"
                ),
                &[&migration.version],
            )
            .map_err(failed("read the schema history"))?
            .map(|row| row.get(0));
        if let Some(later) = later {
            return Err(refused(format!(
                "migration {later} was applied after {} and is still applied: revert it first",
                migration.version
            )));
        }
        run_script(
            transaction,
            &format!("down script of {}", migration.version),
            &migration.down_sql,
        )?;
        if !migration.verify_sql.trim().is_empty() {
            run_script(
                transaction,
                &format!("verify script of {} after down", migration.version),
                &migration.verify_sql,
            )?;
        }
        transaction
            .execute(
                &format!(
                    "UPDATE {table} SET reverted_at = now(), reverted_by = $2 WHERE version = $1"
                ),
                &[&migration.version, &by],
            )
            .map_err(failed("record the revert"))?;
        Ok(format!("reverted {}", migration.version))
    })
}
