//! A schema transaction's steps on an SQLite database file, for small setups and the demo.
//!
//! SQLite has no two-phase commit, so the phases mean a little less than on PostgreSQL (see
//! the parent module): **prepare** runs everything (scripts, verify, `PRAGMA foreign_key_check`, history)
//! in one transaction and rolls it back, a trial that must pass on every shard before the
//! decision; **resolve** with commit runs it again in one `BEGIN IMMEDIATE` transaction and
//! commits (answering "already committed" when the history says so); abort has nothing to undo.
//! Nothing is ever in doubt, and a crash anywhere leaves the file as it was or fully changed.
//! Across several SQLite shards a commit could still fail on one after the trial passed (a full
//! disk): verify then reports the shards that disagree. For one database it is all or nothing.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use rewind_proto::v1::{ShardReport, StatementLog};
use rewind_shared::names::truncate;
use rusqlite::{Connection, OptionalExtension, params};

use super::{ShardEngine, ShardStep, Unprepared, all_taken_effect, expect_standing};
use super::{file_safe, refuse_unaccepted_loss, script_statements, unique_path};
use crate::AgentError;
use crate::migrate::Migration;
use crate::migrate::Recorded;
use crate::schema::quoted_table;

/// How long a statement waits for another writer of the file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

fn refused(detail: String) -> AgentError {
    AgentError::refused("database", detail)
}

fn failed(what: &str) -> impl Fn(rusqlite::Error) -> AgentError + '_ {
    move |error| AgentError::refused("database", format!("{what}: {error}"))
}

/// Opens the database file, which must exist (a wrong path must not create an empty database
/// that every migration then "succeeds" on). Foreign keys stay off, as SQLite's own table
/// rebuild procedure needs (a `DROP TABLE` would otherwise cascade into child rows); the
/// foreign-key check compares violations before and after instead.
fn open(path: &Path) -> Result<Connection, AgentError> {
    let connection = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|error| refused(format!("cannot open {}: {error}", path.display())))?;
    connection
        .busy_timeout(BUSY_TIMEOUT)
        .map_err(failed("set the busy timeout"))?;
    connection
        .execute_batch("PRAGMA foreign_keys = OFF")
        .map_err(failed("turn foreign keys off"))?;
    Ok(connection)
}

/// Rows that reference a missing row, over the whole database.
fn foreign_key_violations(connection: &Connection) -> Result<i64, AgentError> {
    connection
        .query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |row| {
            row.get(0)
        })
        .map_err(failed("check foreign keys"))
}

fn create_history(connection: &Connection, table: &str) -> Result<(), AgentError> {
    connection
        .execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (version TEXT PRIMARY KEY, checksum TEXT NOT NULL, \
             class TEXT NOT NULL, applied_at TEXT NOT NULL, applied_by TEXT NOT NULL, \
             reverted_at TEXT, reverted_by TEXT)"
        ))
        .map_err(failed("create the schema history table"))
}

/// Where a migration stands: never run, applied, or reverted; refused if its checksum differs.
fn standing(
    connection: &Connection,
    table: &str,
    migration: &Migration,
) -> Result<Recorded, AgentError> {
    let row: Option<(String, bool)> = connection
        .query_row(
            &format!("SELECT checksum, reverted_at IS NOT NULL FROM {table} WHERE version = ?1"),
            params![migration.version],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
        .map_err(failed("read the schema history"))?;
    match row {
        None => Ok(Recorded::Never),
        Some((checksum, _)) if checksum != migration.checksum => {
            Err(crate::migrate::edited_after_it_ran(migration, &checksum))
        }
        Some((_, true)) => Ok(Recorded::Reverted),
        Some((_, false)) => Ok(Recorded::Applied),
    }
}

/// Refuses unless every migration stands where the step expects (the rules are the shared ones).
fn check_standing(
    connection: &Connection,
    table: &str,
    step: &ShardStep,
) -> Result<(), AgentError> {
    let recorded = |connection: &mut &Connection, migration: &Migration| {
        standing(connection, table, migration)
    };
    expect_standing(
        &mut &*connection,
        step,
        recorded,
        |connection, oldest, reverted| {
            let mut statement = connection
                .prepare(&format!(
                    "SELECT version FROM {table} WHERE reverted_at IS NULL AND \
                     applied_at > (SELECT applied_at FROM {table} WHERE version = ?1) \
                     ORDER BY applied_at"
                ))
                .map_err(failed("read the schema history"))?;
            let later: Vec<String> = statement
                .query_map(params![oldest], |row| row.get(0))
                .map_err(failed("read the schema history"))?
                .collect::<Result<_, _>>()
                .map_err(failed("read the schema history"))?;
            Ok(later
                .into_iter()
                .find(|version| !reverted.contains(&version.as_str())))
        },
    )
}

fn has_taken_effect(
    connection: &Connection,
    table: &str,
    step: &ShardStep,
) -> Result<bool, AgentError> {
    all_taken_effect(step, |migration| standing(connection, table, migration))
}

/// Columns of every table but the history: (table, column) -> (position, declared type).
type Columns = std::collections::BTreeMap<(String, String), (i64, String)>;

/// The history table's own name, without its schema and quotes.
fn unqualified(table: &str) -> String {
    table
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .trim_matches('"')
        .to_string()
}

fn columns(connection: &Connection, table: &str) -> Result<Columns, AgentError> {
    let own = unqualified(table);
    let mut statement = connection
        .prepare(
            "SELECT m.name, c.name, c.cid, c.type FROM sqlite_master m, pragma_table_info(m.name) c \
             WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND m.name <> ?1",
        )
        .map_err(failed("read the catalog"))?;
    let rows = statement
        .query_map(params![own], |row| {
            Ok(((row.get(0)?, row.get(1)?), (row.get(2)?, row.get(3)?)))
        })
        .map_err(failed("read the catalog"))?
        .collect::<Result<Columns, _>>()
        .map_err(failed("read the catalog"))?;
    Ok(rows)
}

/// `sha256:` over tables with their columns (by name: type, not null, default, primary key),
/// indexes, views and triggers, leaving out the history table and SQLite's own.
fn fingerprint(connection: &Connection, table: &str) -> Result<String, AgentError> {
    Ok(super::fingerprint_of(&catalog_lines(connection, table)?))
}

/// The catalog lines [`fingerprint`] hashes, sorted.
fn catalog_lines(connection: &Connection, table: &str) -> Result<Vec<String>, AgentError> {
    let own = unqualified(table);
    let mut lines: Vec<String> = Vec::new();
    let mut statement = connection
        .prepare(
            "SELECT 'column ' || m.name || '.' || c.name || ' ' || c.type || \
                    CASE WHEN c.\"notnull\" THEN ' not null' ELSE '' END || \
                    coalesce(' default ' || c.dflt_value, '') || \
                    CASE WHEN c.pk > 0 THEN ' pk ' || c.pk ELSE '' END \
               FROM sqlite_master m, pragma_table_info(m.name) c \
              WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND m.name <> ?1 \
             UNION ALL \
             SELECT m.type || ' ' || m.name || ' on ' || m.tbl_name || ' ' || coalesce(m.sql, '') \
               FROM sqlite_master m \
              WHERE m.type IN ('index', 'view', 'trigger') AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
                AND m.tbl_name <> ?1",
        )
        .map_err(failed("read the catalog for the fingerprint"))?;
    for line in statement
        .query_map(params![own], |row| row.get::<_, String>(0))
        .map_err(failed("read the catalog for the fingerprint"))?
    {
        lines.push(line.map_err(failed("read the catalog for the fingerprint"))?);
    }
    lines.sort();
    Ok(lines)
}

fn version(connection: &Connection, table: &str) -> Result<String, AgentError> {
    let exists: bool = connection
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            params![unqualified(table)],
            |row| row.get(0),
        )
        .map_err(failed("read the catalog"))?;
    if !exists {
        return Ok(String::new());
    }
    Ok(connection
        .query_row(
            &format!(
                "SELECT version FROM {table} WHERE reverted_at IS NULL \
                 ORDER BY applied_at DESC, version DESC LIMIT 1"
            ),
            [],
            |row| row.get::<_, String>(0),
        )
        .optional()
        .map_err(failed("read the schema history"))?
        .unwrap_or_default())
}

fn describe(connection: &Connection, table: &str) -> Result<ShardReport, AgentError> {
    Ok(ShardReport {
        version: version(connection, table)?,
        fingerprint: fingerprint(connection, table)?,
        ..ShardReport::default()
    })
}

/// Runs a script statement by statement, logging each with the rows it changed.
fn run_logged(
    connection: &Connection,
    label: &str,
    script: &str,
    log: &mut Vec<StatementLog>,
) -> Result<(), AgentError> {
    for statement in script_statements(label, script)? {
        let what = format!("{label}: {}", truncate(&statement, 80));
        let mut prepared = connection.prepare(&statement).map_err(failed(&what))?;
        let rows = if prepared.column_count() == 0 {
            prepared.execute([]).map_err(failed(&what))? as u64
        } else {
            let mut rows = prepared.query([]).map_err(failed(&what))?;
            let mut count = 0;
            while rows.next().map_err(failed(&what))?.is_some() {
                count += 1;
            }
            count
        };
        drop(prepared);
        if connection.is_autocommit() {
            return Err(refused(format!(
                "{what} ended the transaction itself: what ran before it is kept; check the \
                 database by hand"
            )));
        }
        if log.len() < 64 {
            log.push(StatementLog {
                script: label.to_string(),
                statement: truncate(&statement, 200).to_string(),
                rows,
            });
        }
    }
    Ok(())
}

/// What a revert would destroy: columns or tables its down scripts drop, found by a trial run
/// under a savepoint (a column renamed keeps its position and type, so it is not counted).
fn data_at_risk(
    connection: &Connection,
    table: &str,
    step: &ShardStep,
) -> Result<Vec<(String, Option<String>, i64)>, AgentError> {
    let before = columns(connection, table)?;
    connection
        .execute_batch("SAVEPOINT rewind_probe")
        .map_err(failed("probe the revert"))?;
    let trial = (|| {
        let mut ignored = Vec::new();
        for migration in &step.migrations {
            let label = format!("down {} (trial run)", migration.version);
            run_logged(connection, &label, &migration.down_sql, &mut ignored)?;
        }
        columns(connection, table)
    })();
    connection
        .execute_batch("ROLLBACK TO rewind_probe; RELEASE rewind_probe")
        .map_err(failed("undo the trial run"))?;
    let after = trial?;
    let tables_after: std::collections::BTreeSet<&str> =
        after.keys().map(|(table, _)| table.as_str()).collect();
    let mut at_risk = Vec::new();
    let mut dropped = std::collections::BTreeSet::new();
    for ((table_name, column), (position, kind)) in &before {
        let quoted = format!("\"{}\"", table_name.replace('"', "\"\""));
        if !tables_after.contains(table_name.as_str()) {
            if dropped.insert(table_name.clone()) {
                let rows: i64 = connection
                    .query_row(&format!("SELECT count(*) FROM {quoted}"), [], |row| {
                        row.get(0)
                    })
                    .map_err(failed(&format!("count rows at risk in {table_name}")))?;
                at_risk.push((table_name.clone(), None, rows));
            }
            continue;
        }
        if after.contains_key(&(table_name.clone(), column.clone())) {
            continue;
        }
        // A renamed column keeps its position and type, under a name it did not have before.
        let renamed = after.iter().any(|((other, name), (at, other_kind))| {
            other == table_name
                && at == position
                && other_kind == kind
                && !before.contains_key(&(other.clone(), name.clone()))
        });
        if renamed {
            continue;
        }
        let column_sql = format!("\"{}\"", column.replace('"', "\"\""));
        let rows: i64 = connection
            .query_row(
                &format!("SELECT count(*) FROM {quoted} WHERE {column_sql} IS NOT NULL"),
                [],
                |row| row.get(0),
            )
            .map_err(failed(&format!("count rows at risk in {table_name}")))?;
        at_risk.push((table_name.clone(), Some(column.clone()), rows));
    }
    at_risk.retain(|(_, _, rows)| *rows > 0);
    Ok(at_risk)
}

fn describe_loss(at_risk: &[(String, Option<String>, i64)]) -> Vec<String> {
    at_risk
        .iter()
        .map(|(table, column, rows)| match column {
            None => format!("table {table}: {rows} rows"),
            Some(column) => format!("{table}.{column}: {rows} non-null values"),
        })
        .collect()
}

/// Writes the rows at risk as JSON lines, one object per row, fsynced; their paths.
fn export(
    connection: &Connection,
    at_risk: &[(String, Option<String>, i64)],
    dir: &Path,
) -> Result<Vec<String>, AgentError> {
    std::fs::create_dir_all(dir).map_err(AgentError::io("create", dir))?;
    let mut files = Vec::new();
    for (table, column, _) in at_risk {
        let quoted = format!("\"{}\"", table.replace('"', "\"\""));
        let (name, condition) = match column {
            None => (table.clone(), "1".to_string()),
            Some(column) => (
                format!("{table}.{column}"),
                format!("\"{}\" IS NOT NULL", column.replace('"', "\"\"")),
            ),
        };
        let path = unique_path(dir, &file_safe(&name), "jsonl");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(AgentError::io("create", &path))?;
        let what = format!("export the rows at risk in {table}");
        let mut statement = connection
            .prepare(&format!("SELECT * FROM {quoted} WHERE {condition}"))
            .map_err(failed(&what))?;
        let names: Vec<String> = statement
            .column_names()
            .iter()
            .map(|name| name.to_string())
            .collect();
        let mut rows = statement.query([]).map_err(failed(&what))?;
        while let Some(row) = rows.next().map_err(failed(&what))? {
            let mut object = serde_json::Map::new();
            for (index, name) in names.iter().enumerate() {
                use rusqlite::types::ValueRef;
                let value = match row.get_ref(index).map_err(failed(&what))? {
                    ValueRef::Null => serde_json::Value::Null,
                    ValueRef::Integer(number) => number.into(),
                    ValueRef::Real(number) => number.into(),
                    ValueRef::Text(text) => String::from_utf8_lossy(text).into_owned().into(),
                    ValueRef::Blob(bytes) => hex::encode(bytes).into(),
                };
                object.insert(name.clone(), value);
            }
            writeln!(file, "{}", serde_json::Value::Object(object))
                .map_err(AgentError::io("write", &path))?;
        }
        file.sync_all().map_err(AgentError::io("sync", &path))?;
        files.push(path.display().to_string());
    }
    Ok(files)
}

fn record_history(
    connection: &Connection,
    table: &str,
    step: &ShardStep,
    migration: &Migration,
) -> Result<(), AgentError> {
    let now = "strftime('%Y-%m-%dT%H:%M:%f', 'now')";
    let result = if step.down {
        connection.execute(
            &format!("UPDATE {table} SET reverted_at = {now}, reverted_by = ?2 WHERE version = ?1"),
            params![migration.version, step.by],
        )
    } else {
        connection.execute(
            &format!(
                "INSERT INTO {table} (version, applied_by, checksum, class, applied_at) \
                 VALUES (?1, ?2, ?3, ?4, {now}) ON CONFLICT (version) DO UPDATE SET \
                 applied_at = {now}, applied_by = ?2, reverted_at = NULL, reverted_by = NULL"
            ),
            params![
                migration.version,
                step.by,
                migration.checksum,
                migration.class
            ],
        )
    };
    result.map_err(failed("record the migration in the schema history"))?;
    Ok(())
}

/// Runs the transaction's scripts inside the connection's open transaction; its report.
fn run(
    connection: &Connection,
    table: &str,
    step: &ShardStep,
    export_dir: Option<&Path>,
) -> Result<ShardReport, AgentError> {
    create_history(connection, table)?;
    check_standing(connection, table, step)?;
    // Orphans that were there before are the app's business; new ones are the scripts'.
    let violations_before = foreign_key_violations(connection)?;
    let mut report = ShardReport::default();
    if step.down {
        let at_risk = data_at_risk(connection, table, step)?;
        report.data_loss = describe_loss(&at_risk);
        refuse_unaccepted_loss(step, &report.data_loss)?;
        if let (Some(dir), false) = (export_dir, at_risk.is_empty()) {
            report.exported = export(connection, &at_risk, dir)?;
        }
    }
    // The schema the release before knows: each expand migration is checked against it, so
    // what an earlier one in the same transaction added is the new release's to change.
    let old_release_schema = if super::checks_expand(step) {
        Some(catalog_lines(connection, table)?)
    } else {
        None
    };
    // The catalog before each migration, so a migration answers only for what it changed.
    let mut catalog_now = old_release_schema.clone();
    for migration in &step.migrations {
        let (label, script) = if step.down {
            ("down", &migration.down_sql)
        } else {
            ("up", &migration.up_sql)
        };
        let expand = !step.down && migration.class == "expand";
        run_logged(
            connection,
            &format!("{label} {}", migration.version),
            script,
            &mut report.statements,
        )?;
        if let (Some(old_release), Some(before_this)) = (&old_release_schema, &catalog_now) {
            let after = catalog_lines(connection, table)?;
            if expand {
                super::check_expand(migration, (old_release, before_this), &after, false)?;
            }
            catalog_now = Some(after);
        }
        if step.down && !migration.verify_sql.trim().is_empty() {
            let label = format!("verify {}", migration.version);
            run_logged(
                connection,
                &label,
                &migration.verify_sql,
                &mut report.statements,
            )?;
        }
        record_history(connection, table, step, migration)?;
    }
    let broken = foreign_key_violations(connection)? - violations_before;
    if broken > 0 {
        return Err(refused(format!(
            "foreign keys do not hold afterwards: {broken} rows reference missing rows"
        )));
    }
    let described = describe(connection, table)?;
    report.version = described.version;
    report.fingerprint = described.fingerprint;
    Ok(report)
}

/// One connection to a shard's SQLite file.
pub struct Sqlite {
    connection: Connection,
    /// The schema history table, quoted.
    table: String,
}

impl Sqlite {
    pub fn open(path: &Path, history: &str) -> Result<Self, AgentError> {
        Ok(Self {
            connection: open(path)?,
            table: quoted_table(history),
        })
    }

    /// Runs `work` in a `BEGIN IMMEDIATE` transaction (a revert's trial writes, and must wait
    /// for the app's writers, not fail) and rolls it back whatever happened.
    fn trial<T>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        self.connection
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(failed("begin"))?;
        let result = work(&self.connection);
        let _ = self.connection.execute_batch("ROLLBACK");
        result
    }
}

impl ShardEngine for Sqlite {
    fn holds_prepared(&self) -> bool {
        false
    }

    fn check(&mut self, step: &ShardStep) -> Result<ShardReport, AgentError> {
        let table = &self.table;
        // No identity: every host names its own file, usually by the same path, so a path would
        // look like one database shared by every shard.
        self.trial(|connection| {
            create_history(connection, table)?;
            check_standing(connection, table, step)?;
            let mut report = describe(connection, table)?;
            if step.down {
                report.data_loss = describe_loss(&data_at_risk(connection, table, step)?);
            }
            Ok(report)
        })
    }

    fn is_prepared(&mut self, _prepared: &str) -> Result<bool, AgentError> {
        Ok(false)
    }

    /// The trial run: everything in one transaction, rolled back; nothing is exported, as
    /// nothing is destroyed until the commit runs it again.
    fn prepare(
        &mut self,
        step: &ShardStep,
        _prepared: &str,
        _exports: &Path,
        keep: &mut dyn FnMut(&ShardReport) -> Result<(), AgentError>,
    ) -> Result<ShardReport, AgentError> {
        let table = &self.table;
        let report = self.trial(|connection| run(connection, table, step, None))?;
        keep(&report)?;
        Ok(report)
    }

    fn finish_prepared(&mut self, prepared: &str, _commit: bool) -> Result<(), AgentError> {
        Err(refused(format!(
            "SQLite holds no prepared transaction, yet {prepared} was found prepared"
        )))
    }

    /// Runs it again for real, in one transaction, unless the history shows it done.
    fn commit_unprepared(
        &mut self,
        step: &ShardStep,
        exports: &Path,
    ) -> Result<Unprepared, AgentError> {
        let (connection, table) = (&self.connection, &self.table);
        connection
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(failed("begin"))?;
        let result = (|| {
            create_history(connection, table)?;
            if has_taken_effect(connection, table, step)? {
                return Ok(None);
            }
            run(connection, table, step, Some(exports)).map(Some)
        })();
        match result {
            Ok(Some(report)) => {
                connection
                    .execute_batch("COMMIT")
                    .map_err(failed("commit"))?;
                Ok(Unprepared::Committed(report))
            }
            Ok(None) => {
                let _ = connection.execute_batch("ROLLBACK");
                Ok(Unprepared::AlreadyDone(self.describe()?))
            }
            Err(error) => {
                let _ = connection.execute_batch("ROLLBACK");
                Err(error)
            }
        }
    }

    fn describe(&mut self) -> Result<ShardReport, AgentError> {
        describe(&self.connection, &self.table)
    }

    fn in_doubt(&mut self, _prefix: &str) -> Result<Vec<String>, AgentError> {
        Ok(Vec::new())
    }
}

/// The schema version fact for snapshots: `version (checksum)` or why there is none.
pub fn schema_version(path: &Path, history: &str) -> Result<String, String> {
    let connection = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|error| format!("cannot open {}: {error}", path.display()))?;
    let table = quoted_table(history);
    connection
        .query_row(
            &format!(
                "SELECT version || ' (' || checksum || ')' FROM {table} WHERE reverted_at IS NULL \
                 ORDER BY applied_at DESC, version DESC LIMIT 1"
            ),
            [],
            |row| row.get::<_, String>(0),
        )
        .optional()
        .map(|latest| latest.unwrap_or_else(|| "no migration applied".into()))
        .map_err(|error| format!("cannot read the schema history: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(version: &str, up: &str) -> ShardStep {
        let down = "SELECT 1";
        ShardStep {
            txn_id: "st-1".into(),
            down: false,
            migrations: vec![Migration {
                version: version.into(),
                checksum: rewind_shared::digest::migration_checksum(up, down, ""),
                class: "expand".into(),
                up_sql: up.into(),
                down_sql: down.into(),
                verify_sql: String::new(),
            }],
            commit: false,
            accept_data_loss: false,
            by: "test".into(),
        }
    }

    /// The expand check holds for SQLite's catalog too: a column added passes, a dropped one is
    /// refused by name.
    #[test]
    fn an_expand_migration_may_only_add() {
        let connection = Connection::open_in_memory().unwrap();
        connection
            .execute_batch("CREATE TABLE orders (id INTEGER PRIMARY KEY, total NUMERIC)")
            .unwrap();
        let table = "\"rewind_schema_history\"";
        let adds = step(
            "0001",
            "ALTER TABLE orders ADD COLUMN currency TEXT NOT NULL DEFAULT 'EUR'",
        );
        // `run` works inside the caller's transaction.
        connection.execute_batch("BEGIN").unwrap();
        run(&connection, table, &adds, None).unwrap();
        connection.execute_batch("COMMIT; BEGIN").unwrap();
        let drops = step("0002", "ALTER TABLE orders DROP COLUMN total");
        let refused = run(&connection, table, &drops, None)
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("0002 is declared expand")
                && refused.contains("drops column orders.total NUMERIC"),
            "{refused}"
        );
    }
}
