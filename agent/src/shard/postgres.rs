//! The PostgreSQL engine of a schema transaction's shard side (the protocol is the parent
//! module's): the prepare ends in `PREPARE TRANSACTION`, the resolve is `COMMIT PREPARED` or
//! `ROLLBACK PREPARED`, and rows a revert destroys are exported as CSV first.

use std::io::Write;
use std::path::Path;

use postgres::{Client, GenericClient, SimpleQueryMessage};
use rewind_proto::v1::{ShardReport, StatementLog};
use rewind_shared::names::truncate;

use super::{ShardEngine, ShardStep, Unprepared, all_taken_effect, expect_standing};
use super::{file_safe, refuse_unaccepted_loss, script_statements, unique_path};
use crate::AgentError;
use crate::migrate::{self, Migration, failed, refused};
use crate::schema::{DatabaseConfig, quoted_table};

/// Statements logged per prepare; the rest are counted.
const MAX_LOGGED_STATEMENTS: usize = 64;
/// Longest statement text kept in a log entry.
const MAX_STATEMENT_BYTES: usize = 200;

/// One connection to a shard's PostgreSQL database.
pub struct Postgres {
    client: Client,
    database: DatabaseConfig,
    /// The schema history table, quoted.
    table: String,
}

impl Postgres {
    pub fn connect(database: &DatabaseConfig) -> Result<Self, AgentError> {
        Ok(Self {
            client: migrate::connect(database)?,
            table: quoted_table(&database.history_table),
            database: database.clone(),
        })
    }
}

impl ShardEngine for Postgres {
    fn holds_prepared(&self) -> bool {
        true
    }

    fn check(&mut self, step: &ShardStep) -> Result<ShardReport, AgentError> {
        let identity = database_identity(&mut self.client);
        check_prepare_capacity(&mut self.client)?;
        let table = &self.table;
        let mut transaction = self.client.transaction().map_err(failed("begin"))?;
        migrate::lock_history(&mut transaction, &self.database.history_table)?;
        check_standing(&mut transaction, table, step)?;
        let mut report = describe(&mut transaction, table)?;
        if step.down {
            let at_risk = data_at_risk(&mut transaction, table, step)?;
            report.data_loss = at_risk.iter().map(Finding::describe).collect();
        }
        transaction.rollback().map_err(failed("end the check"))?;
        report.database_identity = identity;
        Ok(report)
    }

    fn is_prepared(&mut self, prepared: &str) -> Result<bool, AgentError> {
        Ok(self
            .client
            .query_opt(
                "SELECT 1 FROM pg_prepared_xacts WHERE gid = $1 AND database = current_database()",
                &[&prepared],
            )
            .map_err(failed("list prepared transactions"))?
            .is_some())
    }

    fn prepare(
        &mut self,
        step: &ShardStep,
        prepared: &str,
        exports: &Path,
        keep: &mut dyn FnMut(&ShardReport) -> Result<(), AgentError>,
    ) -> Result<ShardReport, AgentError> {
        let client = &mut self.client;
        client.batch_execute("BEGIN").map_err(failed("begin"))?;
        let report = run_in_open_transaction(client, &self.database, step, exports)
            .and_then(|report| keep(&report).map(|()| report));
        let report = match report {
            Ok(report) => report,
            Err(error) => {
                // Whatever ran is undone; the connection closes right after anyway.
                let _ = client.batch_execute("ROLLBACK");
                return Err(error);
            }
        };
        client
            .batch_execute(&format!("PREPARE TRANSACTION '{prepared}'"))
            .map_err(failed("prepare the transaction"))?;
        Ok(report)
    }

    fn finish_prepared(&mut self, prepared: &str, commit: bool) -> Result<(), AgentError> {
        let statement = if commit { "COMMIT" } else { "ROLLBACK" };
        self.client
            .batch_execute(&format!("{statement} PREPARED '{prepared}'"))
            .map_err(failed("resolve the prepared transaction"))
    }

    fn commit_unprepared(
        &mut self,
        step: &ShardStep,
        _exports: &Path,
    ) -> Result<Unprepared, AgentError> {
        // Committed by an earlier delivery, or never prepared here: the history tells.
        if has_taken_effect(&mut self.client, &self.table, step)? {
            Ok(Unprepared::AlreadyDone(self.describe()?))
        } else {
            Ok(Unprepared::Missing)
        }
    }

    fn describe(&mut self) -> Result<ShardReport, AgentError> {
        describe(&mut self.client, &self.table)
    }

    fn in_doubt(&mut self, prefix: &str) -> Result<Vec<String>, AgentError> {
        Ok(self
            .client
            .query(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() \
                 AND starts_with(gid, $1) ORDER BY gid",
                &[&prefix],
            )
            .map_err(failed("list prepared transactions"))?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }
}

fn run_in_open_transaction(
    client: &mut Client,
    database: &DatabaseConfig,
    step: &ShardStep,
    exports: &Path,
) -> Result<ShardReport, AgentError> {
    migrate::lock_history(client, &database.history_table)?;
    let table = quoted_table(&database.history_table);
    check_standing(client, &table, step)?;
    let mut report = ShardReport::default();
    if step.down {
        let at_risk = data_at_risk(client, &table, step)?;
        report.data_loss = at_risk.iter().map(Finding::describe).collect();
        refuse_unaccepted_loss(step, &report.data_loss)?;
        if !at_risk.is_empty() {
            report.exported = export(client, &at_risk, exports)?;
        }
    }
    let mut unlogged = 0;
    // The schema the release before knows: each expand migration is checked against it, so
    // what an earlier one in the same transaction added is the new release's to change.
    let old_release_schema = if super::checks_expand(step) {
        Some(catalog_lines(client, &table)?)
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
        let label = format!("{label} {}", migration.version);
        let expand = !step.down && migration.class == "expand";
        run_logged(
            client,
            &label,
            script,
            &mut report.statements,
            &mut unlogged,
        )?;
        if let (Some(old_release), Some(before_this)) = (&old_release_schema, &catalog_now) {
            let after = catalog_lines(client, &table)?;
            if expand {
                super::check_expand(migration, (old_release, before_this), &after, true)?;
            }
            catalog_now = Some(after);
        }
        if step.down && !migration.verify_sql.trim().is_empty() {
            let label = format!("verify {}", migration.version);
            run_logged(
                client,
                &label,
                &migration.verify_sql,
                &mut report.statements,
                &mut unlogged,
            )?;
        }
        record_history(client, &table, step, migration)?;
    }
    if unlogged > 0 {
        report.statements.push(StatementLog {
            script: "...".into(),
            statement: format!("{unlogged} more statements, not logged"),
            rows: 0,
        });
    }
    if step.down {
        let broken = foreign_key_violations(client)?;
        if !broken.is_empty() {
            return Err(refused(format!(
                "after the revert, foreign keys do not hold: {}",
                broken.join("; ")
            )));
        }
    }
    let described = describe(client, &table)?;
    report.version = described.version;
    report.fingerprint = described.fingerprint;
    Ok(report)
}

/// Which database this is, whatever the host calls it: `<system identifier>/<database>`, so
/// two shards configured with the same database are caught. Empty when the server does not let
/// this user read its control data.
fn database_identity(client: &mut Client) -> String {
    client
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()) || '/' || \
             current_database()",
            &[],
        )
        .ok()
        .and_then(|row| row.get::<_, Option<String>>(0))
        .unwrap_or_default()
}

/// Refuses, before anything runs, a server that cannot prepare one more transaction.
fn check_prepare_capacity(client: &mut Client) -> Result<(), AgentError> {
    let row = client
        .query_one(
            "SELECT current_setting('max_prepared_transactions')::int, \
             (SELECT count(*) FROM pg_prepared_xacts)::int",
            &[],
        )
        .map_err(failed("read max_prepared_transactions"))?;
    let (slots, taken): (i32, i32) = (row.get(0), row.get(1));
    if slots == 0 {
        return Err(refused(
            "prepared transactions are disabled on this shard (max_prepared_transactions = 0): \
             set it above 0 and restart PostgreSQL"
                .into(),
        ));
    }
    if taken >= slots {
        return Err(refused(format!(
            "all {slots} prepared transaction slots of this shard are taken (see \
             pg_prepared_xacts): resolve them or raise max_prepared_transactions"
        )));
    }
    Ok(())
}

/// Refuses unless every migration stands where the transaction expects.
fn check_standing(
    client: &mut impl GenericClient,
    table: &str,
    step: &ShardStep,
) -> Result<(), AgentError> {
    let recorded =
        |client: &mut _, migration: &Migration| migrate::recorded(client, table, migration);
    expect_standing(client, step, recorded, |client, oldest, reverted| {
        Ok(client
            .query_opt(
                &format!(
                    "SELECT version FROM {table} WHERE reverted_at IS NULL AND NOT version = ANY($2) \
                     AND applied_at > (SELECT applied_at FROM {table} WHERE version = $1) \
                     ORDER BY applied_at LIMIT 1"
                ),
                &[&oldest, &reverted],
            )
            .map_err(failed("read the schema history"))?
            .map(|row| row.get(0)))
    })
}

/// Whether the transaction's migrations all stand as it leaves them.
fn has_taken_effect(
    client: &mut impl GenericClient,
    table: &str,
    step: &ShardStep,
) -> Result<bool, AgentError> {
    all_taken_effect(step, |migration| {
        migrate::recorded(client, table, migration)
    })
}

fn record_history(
    client: &mut impl GenericClient,
    table: &str,
    step: &ShardStep,
    migration: &Migration,
) -> Result<(), AgentError> {
    // clock_timestamp, not now(): several migrations in one transaction keep their order.
    let statement = if step.down {
        format!(
            "UPDATE {table} SET reverted_at = clock_timestamp(), reverted_by = $2 WHERE version = $1"
        )
    } else {
        format!(
            "INSERT INTO {table} (version, applied_by, checksum, class, applied_at) \
             VALUES ($1, $2, $3, $4, clock_timestamp()) ON CONFLICT (version) DO UPDATE SET \
             applied_at = clock_timestamp(), applied_by = $2, reverted_at = NULL, reverted_by = NULL"
        )
    };
    let result = if step.down {
        client.execute(&statement, &[&migration.version, &step.by])
    } else {
        client.execute(
            &statement,
            &[
                &migration.version,
                &step.by,
                &migration.checksum,
                &migration.class,
            ],
        )
    };
    result.map_err(failed("record the migration in the schema history"))?;
    Ok(())
}

/// Runs a script one statement at a time, logging each with the rows it affected, and refuses a
/// script that ended the transaction itself.
fn run_logged(
    client: &mut impl GenericClient,
    label: &str,
    script: &str,
    log: &mut Vec<StatementLog>,
    unlogged: &mut usize,
) -> Result<(), AgentError> {
    let before = migrate::txid(client, label)?;
    for statement in script_statements(label, script)? {
        let what = format!("{label}: {}", truncate(&statement, 80));
        let messages = client.simple_query(&statement).map_err(failed(&what))?;
        let rows = messages
            .iter()
            .map(|message| match message {
                SimpleQueryMessage::CommandComplete(rows) => *rows,
                _ => 0,
            })
            .sum();
        if log.len() < MAX_LOGGED_STATEMENTS {
            log.push(StatementLog {
                script: label.to_string(),
                statement: truncate(&statement, MAX_STATEMENT_BYTES).to_string(),
                rows,
            });
        } else {
            *unlogged += 1;
        }
    }
    if migrate::txid(client, label)? != before {
        return Err(refused(format!(
            "{label} ended the transaction itself (COMMIT or ROLLBACK in the script)"
        )));
    }
    Ok(())
}

/// Schemas that hold the database's own objects, not PostgreSQL's.
const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') \
    AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";

/// The latest applied, not reverted version and the schema fingerprint.
fn describe(client: &mut impl GenericClient, table: &str) -> Result<ShardReport, AgentError> {
    let version = client
        .query_opt(
            &format!(
                "SELECT version FROM {table} WHERE reverted_at IS NULL \
                 ORDER BY applied_at DESC, version DESC LIMIT 1"
            ),
            &[],
        )
        .map_err(failed("read the schema history"))?
        .map(|row| row.get(0))
        .unwrap_or_default();
    Ok(ShardReport {
        version,
        fingerprint: fingerprint(client, table)?,
        ..ShardReport::default()
    })
}

/// `sha256:` over the catalog's description of the database's own objects: tables, views and
/// sequences; columns (by name, not position, so a column dropped and added again fingerprints
/// the same) with type, nullability, identity and default; indexes; constraints; triggers;
/// functions and procedures (by signature and source); enum types with their labels; row
/// security policies. Leaves out the schema history table, PostgreSQL's own schemas and what
/// extensions own. Names print schema-qualified whatever the session's search_path.
pub fn fingerprint(client: &mut impl GenericClient, table: &str) -> Result<String, AgentError> {
    Ok(super::fingerprint_of(&catalog_lines(client, table)?))
}

/// The catalog lines [`fingerprint`] hashes, sorted.
pub fn catalog_lines(
    client: &mut impl GenericClient,
    table: &str,
) -> Result<Vec<String>, AgentError> {
    // The history table's oid, looked up before search_path is pinned below (its name resolves
    // only under the session's own path).
    let own = "c.oid::int8 IS DISTINCT FROM $1";
    let not_extension = |catalog: &str, oid: &str| {
        format!(
            "NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = '{catalog}'::regclass \
             AND e.objid = {oid} AND e.deptype = 'e')"
        )
    };
    let relation = not_extension("pg_class", "c.oid");
    let function = not_extension("pg_proc", "p.oid");
    let enum_type = not_extension("pg_type", "t.oid");
    let query = format!(
        "SELECT 'relation ' || c.oid::regclass::text || ' ' || c.relkind::text \
                || ' ' || c.relpersistence::text \
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
           WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND {USER_SCHEMAS} AND {own} \
             AND {relation} \
         UNION ALL \
         SELECT 'column ' || c.oid::regclass::text || '.' || quote_ident(a.attname) || ' ' \
                || format_type(a.atttypid, a.atttypmod) \
                || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END \
                || CASE WHEN a.attidentity <> '' THEN ' identity' ELSE '' END \
                || CASE WHEN a.attgenerated <> '' THEN ' generated' ELSE '' END \
                || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '') \
           FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
           JOIN pg_namespace n ON n.oid = c.relnamespace \
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
           WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND a.attnum > 0 AND NOT a.attisdropped \
             AND {USER_SCHEMAS} AND {own} AND {relation} \
         UNION ALL \
         SELECT 'index ' || pg_get_indexdef(i.indexrelid) \
           FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
           JOIN pg_namespace n ON n.oid = c.relnamespace \
           WHERE {USER_SCHEMAS} AND {own} AND {relation} \
         UNION ALL \
         SELECT 'constraint ' || c.oid::regclass::text || ' ' || quote_ident(con.conname) || ' ' \
                || pg_get_constraintdef(con.oid) \
           FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid \
           JOIN pg_namespace n ON n.oid = c.relnamespace \
           WHERE {USER_SCHEMAS} AND {own} AND {relation} \
         UNION ALL \
         SELECT 'view ' || c.oid::regclass::text || ' ' || pg_get_viewdef(c.oid) \
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
           WHERE c.relkind IN ('v', 'm') AND {USER_SCHEMAS} AND {relation} \
         UNION ALL \
         SELECT 'trigger ' || pg_get_triggerdef(t.oid) \
           FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
           JOIN pg_namespace n ON n.oid = c.relnamespace \
           WHERE NOT t.tgisinternal AND {USER_SCHEMAS} AND {relation} \
         UNION ALL \
         SELECT 'function ' || quote_ident(n.nspname) || '.' || quote_ident(p.proname) || '(' \
                || pg_get_function_identity_arguments(p.oid) || ') ' || p.prokind::text || ' ' \
                || md5(coalesce(p.prosrc, '') || coalesce(pg_get_function_result(p.oid), '')) \
           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
           WHERE {USER_SCHEMAS} AND {function} \
         UNION ALL \
         SELECT 'enum ' || t.oid::regtype::text || ' ' \
                || string_agg(quote_literal(e.enumlabel), ',' ORDER BY e.enumsortorder) \
           FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid \
           JOIN pg_namespace n ON n.oid = t.typnamespace \
           WHERE {USER_SCHEMAS} AND {enum_type} GROUP BY t.oid \
         UNION ALL \
         SELECT 'policy ' || c.oid::regclass::text || ' ' || quote_ident(pol.polname) || ' ' \
                || pol.polcmd::text || ' ' || coalesce(pg_get_expr(pol.polqual, pol.polrelid), '') \
                || ' ' || coalesce(pg_get_expr(pol.polwithcheck, pol.polrelid), '') \
           FROM pg_policy pol JOIN pg_class c ON c.oid = pol.polrelid \
           JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_SCHEMAS}"
    );
    // Names print schema-qualified under this search_path, so shards whose sessions differ
    // fingerprint alike; the session's own is put back for whatever runs next.
    let history: Option<i64> = client
        .query_one("SELECT to_regclass($1)::oid::int8", &[&table])
        .map_err(failed("find the schema history table"))?
        .get(0);
    let search_path: String = client
        .query_one("SELECT current_setting('search_path')", &[])
        .map_err(failed("read search_path"))?
        .get(0);
    client
        .execute("SELECT set_config('search_path', 'pg_catalog', false)", &[])
        .map_err(failed("pin search_path"))?;
    let lines = client
        .query(&query, &[&history])
        .map_err(failed("read the catalog for the fingerprint"))?;
    client
        .execute(
            "SELECT set_config('search_path', $1, false)",
            &[&search_path],
        )
        .map_err(failed("restore search_path"))?;
    let mut lines: Vec<String> = lines.iter().map(|row| row.get(0)).collect();
    lines.sort();
    Ok(lines)
}

/// Data a revert would destroy, found by running its down scripts under a savepoint and
/// comparing the columns before and after.
struct Finding {
    table: String,
    /// `None`: the whole table is dropped.
    column: Option<String>,
    /// Selects the rows at risk.
    condition: String,
    rows: i64,
    what: &'static str,
}

impl Finding {
    fn describe(&self) -> String {
        match &self.column {
            None => format!("table {}: {} rows", self.table, self.rows),
            Some(column) => format!("{}.{column}: {} {}", self.table, self.rows, self.what),
        }
    }
}

/// A column as the catalog names it, keyed by (table oid, column number): a rename keeps both,
/// so a renamed column is not mistaken for a dropped one.
struct Column {
    table: String,
    name: String,
    kind: String,
}

type Columns = std::collections::BTreeMap<(i64, i32), Column>;

/// Every column of the database's own tables, but the history table's.
fn columns(client: &mut impl GenericClient, table: &str) -> Result<Columns, AgentError> {
    let query = format!(
        "SELECT c.oid::int8, a.attnum::int4, c.oid::regclass::text, quote_ident(a.attname), \
                format_type(a.atttypid, a.atttypmod) \
           FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
           JOIN pg_namespace n ON n.oid = c.relnamespace \
           WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped \
             AND {USER_SCHEMAS} AND c.oid IS DISTINCT FROM to_regclass($1)"
    );
    Ok(client
        .query(&query, &[&table])
        .map_err(failed("read the catalog"))?
        .iter()
        .map(|row| {
            let column = Column {
                table: row.get(2),
                name: row.get(3),
                kind: row.get(4),
            };
            ((row.get(0), row.get(1)), column)
        })
        .collect())
}

fn data_at_risk(
    client: &mut impl GenericClient,
    table: &str,
    step: &ShardStep,
) -> Result<Vec<Finding>, AgentError> {
    let before = columns(client, table)?;
    client
        .batch_execute("SAVEPOINT rewind_probe")
        .map_err(failed("probe the revert"))?;
    let mut probe = || {
        let (mut ignored, mut unlogged) = (Vec::new(), 0);
        for migration in &step.migrations {
            let label = format!("down {} (trial run)", migration.version);
            run_logged(
                client,
                &label,
                &migration.down_sql,
                &mut ignored,
                &mut unlogged,
            )?;
        }
        columns(client, table)
    };
    let after = probe();
    client
        .batch_execute("ROLLBACK TO SAVEPOINT rewind_probe")
        .map_err(failed("undo the trial run"))?;
    let after = after?;
    let tables_after: std::collections::BTreeSet<i64> = after.keys().map(|(oid, _)| *oid).collect();
    let mut findings = Vec::new();
    let mut dropped_tables = std::collections::BTreeSet::new();
    for ((oid, attnum), column) in &before {
        let finding = if !tables_after.contains(oid) {
            if !dropped_tables.insert(*oid) {
                continue;
            }
            Finding {
                table: column.table.clone(),
                column: None,
                condition: "true".into(),
                rows: 0,
                what: "rows",
            }
        } else {
            let name = &column.name;
            match after.get(&(*oid, *attnum)) {
                None => Finding {
                    table: column.table.clone(),
                    column: Some(name.clone()),
                    condition: format!("{name} IS NOT NULL"),
                    rows: 0,
                    what: "non-null values",
                },
                Some(narrower) if narrower.kind != column.kind => Finding {
                    table: column.table.clone(),
                    column: Some(name.clone()),
                    condition: format!(
                        "{name} IS NOT NULL AND {name} IS DISTINCT FROM ({name})::{}",
                        narrower.kind
                    ),
                    rows: 0,
                    what: "values that change or do not fit as the old type",
                },
                Some(_) => continue,
            }
        };
        findings.push(finding);
    }
    // The trial run's locks went with its savepoint: hold writers off the tables at risk until
    // the end of the transaction, so no row lands between the count (and export) and the drop.
    let at_risk: std::collections::BTreeSet<String> = findings
        .iter()
        .map(|finding| finding.table.clone())
        .collect();
    for table in at_risk {
        client
            .batch_execute(&format!("LOCK TABLE {table} IN SHARE MODE"))
            .map_err(failed(&format!("lock {table} against writes")))?;
    }
    for finding in &mut findings {
        finding.rows = count_rows(client, finding)?;
    }
    findings.retain(|finding| finding.rows > 0);
    Ok(findings)
}

/// Rows matching a finding; a cast that fails for some value counts every non-null value.
fn count_rows(client: &mut impl GenericClient, finding: &mut Finding) -> Result<i64, AgentError> {
    match count_where(client, &finding.table, &finding.condition) {
        Ok(rows) => Ok(rows),
        Err(_) if finding.column.is_some() => {
            // The old type cannot hold some value at all.
            let column = finding.column.clone().unwrap_or_default();
            finding.condition = format!("{column} IS NOT NULL");
            finding.what = "values, some of which do not fit the old type";
            count_where(client, &finding.table, &finding.condition)
                .map_err(failed(&format!("count rows at risk in {}", finding.table)))
        }
        Err(error) => Err(failed(&format!("count rows at risk in {}", finding.table))(
            error,
        )),
    }
}

/// `count(*)` under a savepoint, so a failing cast leaves the transaction usable.
fn count_where(
    client: &mut impl GenericClient,
    table: &str,
    condition: &str,
) -> Result<i64, postgres::Error> {
    client.batch_execute("SAVEPOINT rewind_count")?;
    let result = client
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE {condition}"),
            &[],
        )
        .map(|row| row.get::<_, i64>(0));
    client.batch_execute(if result.is_ok() {
        "RELEASE SAVEPOINT rewind_count"
    } else {
        "ROLLBACK TO SAVEPOINT rewind_count"
    })?;
    result
}

/// Writes the rows at risk as CSV files (with a header) under `dir`, fsynced; their paths.
fn export(
    client: &mut impl GenericClient,
    findings: &[Finding],
    dir: &Path,
) -> Result<Vec<String>, AgentError> {
    std::fs::create_dir_all(dir).map_err(AgentError::io("create", dir))?;
    let mut files = Vec::new();
    for finding in findings {
        let mut name = file_safe(&finding.table);
        if let Some(column) = &finding.column {
            name += &format!(".{}", file_safe(column));
        }
        let path = unique_path(dir, &name, "csv");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(AgentError::io("create", &path))?;
        let mut rows = client
            .copy_out(&format!(
                "COPY (SELECT * FROM {} WHERE {}) TO STDOUT WITH (FORMAT csv, HEADER)",
                finding.table, finding.condition
            ))
            .map_err(failed(&format!(
                "export the rows at risk in {}",
                finding.table
            )))?;
        std::io::copy(&mut rows, &mut file).map_err(AgentError::io("write", &path))?;
        drop(rows);
        file.flush().map_err(AgentError::io("write", &path))?;
        file.sync_all().map_err(AgentError::io("sync", &path))?;
        files.push(path.display().to_string());
    }
    std::fs::File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(AgentError::io("sync", dir))?;
    Ok(files)
}

/// Foreign keys whose rows reference nothing (PostgreSQL keeps them, but a script can disable
/// triggers or add a key `NOT VALID`): `name on table: n rows`.
fn foreign_key_violations(client: &mut impl GenericClient) -> Result<Vec<String>, AgentError> {
    let keys = client
        .query(
            "SELECT quote_ident(con.conname), con.conrelid::regclass::text, \
                    con.confrelid::regclass::text, \
                    ARRAY(SELECT quote_ident(a.attname) FROM unnest(con.conkey) WITH ORDINALITY \
                          AS k(attnum, n) JOIN pg_attribute a ON a.attrelid = con.conrelid \
                          AND a.attnum = k.attnum ORDER BY k.n), \
                    ARRAY(SELECT quote_ident(a.attname) FROM unnest(con.confkey) WITH ORDINALITY \
                          AS k(attnum, n) JOIN pg_attribute a ON a.attrelid = con.confrelid \
                          AND a.attnum = k.attnum ORDER BY k.n) \
               FROM pg_constraint con WHERE con.contype = 'f' ORDER BY 1",
            &[],
        )
        .map_err(failed("read the foreign keys"))?;
    let mut broken = Vec::new();
    for key in keys {
        let (name, child, parent): (String, String, String) = (key.get(0), key.get(1), key.get(2));
        let (from, to): (Vec<String>, Vec<String>) = (key.get(3), key.get(4));
        let present: Vec<String> = from
            .iter()
            .map(|column| format!("c.{column} IS NOT NULL"))
            .collect();
        let matches: Vec<String> = from
            .iter()
            .zip(&to)
            .map(|(from, to)| format!("p.{to} = c.{from}"))
            .collect();
        let orphans: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {child} c WHERE {} AND NOT EXISTS \
                     (SELECT 1 FROM {parent} p WHERE {})",
                    present.join(" AND "),
                    matches.join(" AND ")
                ),
                &[],
            )
            .map_err(failed(&format!("check foreign key {name} on {child}")))?
            .get(0);
        if orphans > 0 {
            broken.push(format!(
                "{name} on {child}: {orphans} rows reference missing {parent} rows"
            ));
        }
    }
    Ok(broken)
}
