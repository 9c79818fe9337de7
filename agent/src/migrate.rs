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

fn refused(detail: String) -> AgentError {
    AgentError::Refused(detail)
}

fn failed(what: &str) -> impl Fn(postgres::Error) -> AgentError + '_ {
    move |error| {
        let detail = error.as_db_error().map_or_else(
            || error.to_string(),
            |db| format!("{}: {}", db.code().code(), db.message()),
        );
        AgentError::Refused(format!("{what}: {detail}"))
    }
}

/// Creates the schema history table if it is missing.
fn ensure_history(
    transaction: &mut postgres::Transaction<'_>,
    table: &str,
) -> Result<(), AgentError> {
    // The table name was checked to be a plain identifier when the config was loaded.
    transaction
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (version text PRIMARY KEY, checksum text NOT NULL, \
             class text NOT NULL, applied_at timestamptz NOT NULL, applied_by text NOT NULL, \
             reverted_at timestamptz, reverted_by text)"
        ))
        .map_err(failed("create the schema history table"))
}

/// Where a migration stands in the history table: never run, applied, or applied then reverted.
enum Recorded {
    Never,
    Applied,
    Reverted,
}

fn recorded(
    transaction: &mut postgres::Transaction<'_>,
    table: &str,
    migration: &Migration,
) -> Result<Recorded, AgentError> {
    // One migration at a time per database, whatever else runs against it.
    transaction
        .execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&table])
        .map_err(failed("lock the schema history"))?;
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
        return Err(refused(format!(
            "migration {} ran here with checksum {checksum}, but its registered scripts have {}: \
             they were edited after it ran",
            migration.version, migration.checksum
        )));
    }
    Ok(if row.get::<_, bool>(1) {
        Recorded::Reverted
    } else {
        Recorded::Applied
    })
}

fn connect(database: &DatabaseConfig) -> Result<postgres::Client, AgentError> {
    database
        .postgres
        .connect(postgres::NoTls)
        .map_err(|error| refused(format!("cannot connect to the database: {error}")))
}

/// Runs the up script and records it; a migration already applied answers so.
pub fn apply(
    database: &DatabaseConfig,
    migration: &Migration,
    by: &str,
) -> Result<String, AgentError> {
    let table = &database.history_table;
    let mut client = connect(database)?;
    let mut transaction = client.transaction().map_err(failed("begin"))?;
    ensure_history(&mut transaction, table)?;
    let state = recorded(&mut transaction, table, migration)?;
    if let Recorded::Applied = state {
        return Ok(format!("{} already applied", migration.version));
    }
    transaction
        .batch_execute(&migration.up_sql)
        .map_err(failed(&format!("up script of {}", migration.version)))?;
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
    transaction.commit().map_err(failed("commit"))?;
    Ok(format!("applied {}", migration.version))
}

/// Runs the down script, then the verify script (which checks the database is consistent once
/// reverted), and records the revert; refused when the migration never ran here, answered so
/// when it was already reverted. Nothing is kept if any of it fails.
pub fn revert(
    database: &DatabaseConfig,
    migration: &Migration,
    by: &str,
) -> Result<String, AgentError> {
    let table = &database.history_table;
    let mut client = connect(database)?;
    let mut transaction = client.transaction().map_err(failed("begin"))?;
    ensure_history(&mut transaction, table)?;
    match recorded(&mut transaction, table, migration)? {
        Recorded::Never => {
            return Err(refused(format!(
                "migration {} never ran on this database: there is nothing to revert",
                migration.version
            )));
        }
        Recorded::Reverted => return Ok(format!("{} already reverted", migration.version)),
        Recorded::Applied => {}
    }
    transaction
        .batch_execute(&migration.down_sql)
        .map_err(failed(&format!("down script of {}", migration.version)))?;
    if !migration.verify_sql.trim().is_empty() {
        transaction
            .batch_execute(&migration.verify_sql)
            .map_err(failed(&format!(
                "verify script of {} after down",
                migration.version
            )))?;
    }
    transaction
        .execute(
            &format!("UPDATE {table} SET reverted_at = now(), reverted_by = $2 WHERE version = $1"),
            &[&migration.version, &by],
        )
        .map_err(failed("record the revert"))?;
    transaction.commit().map_err(failed("commit"))?;
    Ok(format!("reverted {}", migration.version))
}
