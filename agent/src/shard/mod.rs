//! This host's part of a schema transaction: the coordinator applies or reverts a set of
//! migrations on every shard of a database, all or nothing, in four phases, and each phase is one
//! step here.
//!
//! - **check** (read only): every migration stands where the transaction expects (applied, for a
//!   revert, with the checksum its scripts hash to; nothing later still applied), the schema
//!   fingerprint before, and for a revert what data it would destroy. A revert that would destroy
//!   data is refused unless the operator accepted the loss.
//! - **prepare**: in one transaction, run every script statement by statement (each logged with
//!   the rows it affected), each verify script after its down script, a foreign-key check, and
//!   the history rows; then hold the transaction prepared. Rows a revert destroys are first
//!   exported to `<data-dir>/exports/` (by the engine that holds them: PostgreSQL in its
//!   prepare, SQLite, whose prepare is only a trial, in its commit). The report is kept in the store before the transaction is
//!   held, so a prepare redelivered after a crash answers with it.
//! - **resolve**: commit or roll back what is held, as the coordinator recorded. The transaction
//!   is marked resolved first, and steps of one service run one at a time, so a prepare arriving
//!   late can never leave a transaction prepared after its resolution.
//! - **verify** (read only): version, fingerprint, and any of rewind's prepared transactions
//!   still open on this database.
//!
//! That protocol is written once, here, over [`ShardEngine`]: what one database engine does for
//! each phase. [`postgres`] holds the transaction with `PREPARE TRANSACTION`; [`sqlite`] has no
//! two-phase commit, so its prepare is a trial rolled back and its commit runs it again. The
//! protocol's unit tests drive a fake engine through every crash and redelivery
//! (`protocol_test.rs`); the engines themselves are tested on real databases (t19, t22).

use std::path::{Path, PathBuf};

use rewind_proto::v1::ShardReport;
use rewind_shared::names::truncate;

use crate::AgentError;
use crate::migrate::{self, Migration, Recorded, refused};
use crate::schema::{DatabaseConfig, Engine};
use crate::store::Store;

mod expand_check;
#[cfg(test)]
mod fake;
pub(crate) mod postgres;
#[cfg(test)]
mod protocol_test;
mod sqlite;

pub use sqlite::schema_version as sqlite_schema_version;

/// A schema transaction as this shard sees it.
#[derive(Clone, Debug)]
pub struct ShardStep {
    pub txn_id: String,
    pub down: bool,
    /// In the order they run: newest first for a revert.
    pub migrations: Vec<Migration>,
    pub commit: bool,
    pub accept_data_loss: bool,
    pub by: String,
}

/// What a commit finds when nothing is held prepared.
pub enum Unprepared {
    /// The history shows the transaction done: an earlier delivery committed it.
    AlreadyDone(ShardReport),
    /// Run again and committed now (engines that hold nothing prepared).
    Committed(ShardReport),
    /// Neither held nor done: a person must look at this shard.
    Missing,
}

/// What one database engine does in each phase of a schema transaction; the protocol around it
/// (the functions of this module) is the same for every engine.
pub trait ShardEngine {
    /// Whether a prepare holds the transaction prepared until it is resolved (PostgreSQL), or
    /// only runs it as a trial that is rolled back, the commit running it again (SQLite).
    fn holds_prepared(&self) -> bool;

    /// Read only: where the migrations stand, the fingerprint, what a revert would destroy and
    /// which database this is. Refuses a transaction that cannot run here.
    fn check(&mut self, step: &ShardStep) -> Result<ShardReport, AgentError>;

    /// Whether the transaction named `prepared` is held prepared on this database.
    fn is_prepared(&mut self, prepared: &str) -> Result<bool, AgentError>;

    /// Runs the scripts in one transaction, hands the report to `keep`, and only then holds the
    /// transaction prepared as `prepared` (or rolls the trial back). Rows a revert would destroy
    /// are exported under `exports` before anything is dropped.
    fn prepare(
        &mut self,
        step: &ShardStep,
        prepared: &str,
        exports: &Path,
        keep: &mut dyn FnMut(&ShardReport) -> Result<(), AgentError>,
    ) -> Result<ShardReport, AgentError>;

    /// Commits (or rolls back) the transaction held prepared as `prepared`.
    fn finish_prepared(&mut self, prepared: &str, commit: bool) -> Result<(), AgentError>;

    /// A commit when nothing is held prepared: done already, run now, or missing.
    fn commit_unprepared(
        &mut self,
        step: &ShardStep,
        exports: &Path,
    ) -> Result<Unprepared, AgentError>;

    /// The version and fingerprint now.
    fn describe(&mut self) -> Result<ShardReport, AgentError>;

    /// Names of the transactions held prepared here that start with `prefix`.
    fn in_doubt(&mut self, prefix: &str) -> Result<Vec<String>, AgentError>;
}

/// The service's database with the engine it is configured with, connected on first use: so
/// what the protocol does first (a resolve marks its transaction resolved, a late prepare is
/// refused) holds even when the database cannot be reached.
pub fn open(database: &DatabaseConfig) -> OnFirstUse {
    OnFirstUse {
        database: database.clone(),
        engine: None,
    }
}

/// See [`open`].
pub struct OnFirstUse {
    database: DatabaseConfig,
    engine: Option<Box<dyn ShardEngine>>,
}

impl OnFirstUse {
    fn engine(&mut self) -> Result<&mut dyn ShardEngine, AgentError> {
        if self.engine.is_none() {
            let database = &self.database;
            self.engine = Some(match &database.engine {
                Engine::Postgres(_) => Box::new(postgres::Postgres::connect(database)?),
                Engine::Sqlite(file) => {
                    Box::new(sqlite::Sqlite::open(file, &database.history_table)?)
                }
            });
        }
        Ok(self.engine.as_deref_mut().expect("connected just now"))
    }
}

impl ShardEngine for OnFirstUse {
    fn holds_prepared(&self) -> bool {
        matches!(self.database.engine, Engine::Postgres(_))
    }

    fn check(&mut self, step: &ShardStep) -> Result<ShardReport, AgentError> {
        self.engine()?.check(step)
    }

    fn is_prepared(&mut self, prepared: &str) -> Result<bool, AgentError> {
        self.engine()?.is_prepared(prepared)
    }

    fn prepare(
        &mut self,
        step: &ShardStep,
        prepared: &str,
        exports: &Path,
        keep: &mut dyn FnMut(&ShardReport) -> Result<(), AgentError>,
    ) -> Result<ShardReport, AgentError> {
        self.engine()?.prepare(step, prepared, exports, keep)
    }

    fn finish_prepared(&mut self, prepared: &str, commit: bool) -> Result<(), AgentError> {
        self.engine()?.finish_prepared(prepared, commit)
    }

    fn commit_unprepared(
        &mut self,
        step: &ShardStep,
        exports: &Path,
    ) -> Result<Unprepared, AgentError> {
        self.engine()?.commit_unprepared(step, exports)
    }

    fn describe(&mut self) -> Result<ShardReport, AgentError> {
        self.engine()?.describe()
    }

    fn in_doubt(&mut self, prefix: &str) -> Result<Vec<String>, AgentError> {
        self.engine()?.in_doubt(prefix)
    }
}

/// The prepared transaction's name: unique per coordinator cluster and transaction, made only of
/// characters that need no quoting.
pub fn prepared_name(cluster_id: &str, txn_id: &str) -> String {
    format!("{}{txn_id}", prepared_prefix(cluster_id))
}

/// The start of every prepared transaction name of one coordinator cluster.
pub fn prepared_prefix(cluster_id: &str) -> String {
    let cluster = rewind_shared::digest::sha256_hex(cluster_id.as_bytes());
    format!("rewind-{}-", &cluster[..12])
}

/// Read only: where the migrations stand, the fingerprint, and what a revert would destroy.
pub fn check(
    engine: &mut dyn ShardEngine,
    step: &ShardStep,
) -> Result<(String, ShardReport), AgentError> {
    let report = engine.check(step)?;
    refuse_unaccepted_loss(step, &report.data_loss)?;
    let mut detail = format!(
        "ready to {} {} at version {}; fingerprint {}",
        if step.down { "revert" } else { "apply" },
        versions(step),
        display_version(&report.version),
        short(&report.fingerprint)
    );
    if !report.data_loss.is_empty() {
        detail += &format!(
            "; will destroy (accepted, exported first): {}",
            report.data_loss.join("; ")
        );
    }
    Ok((detail, report))
}

/// Runs the scripts in one transaction and holds it prepared (see the module docs).
pub fn prepare(
    engine: &mut dyn ShardEngine,
    step: &ShardStep,
    prepared: &str,
    store: &Store,
) -> Result<(String, ShardReport), AgentError> {
    refuse_if_resolved(store, prepared, step)?;
    if engine.is_prepared(prepared)? {
        // Prepared before a crash or a lost answer: the report was kept before the prepare.
        let report = store.prepared_report(prepared)?.unwrap_or_default();
        return Ok((format!("{} was already prepared here", step.txn_id), report));
    }
    let exports = exports_dir(store, prepared);
    let report = engine.prepare(step, prepared, &exports, &mut |report| {
        store.put_prepared_report(prepared, report)
    })?;
    rewind_shared::crash_point!("agent.after-prepare");
    let statements = report.statements.len();
    let detail = if engine.holds_prepared() {
        format!(
            "prepared {} of {} ({statements} statements, {} rows); fingerprint after {}",
            if step.down { "the revert" } else { "the apply" },
            versions(step),
            report.statements.iter().map(|log| log.rows).sum::<u64>(),
            short(&report.fingerprint)
        )
    } else {
        format!(
            "trial run passed and was rolled back ({statements} statements; this engine has no \
             two-phase commit: the commit runs it again); fingerprint after {}",
            short(&report.fingerprint)
        )
    };
    Ok((detail, report))
}

/// Commits or rolls back what the prepare left, as recorded. Idempotent.
pub fn resolve(
    engine: &mut dyn ShardEngine,
    step: &ShardStep,
    prepared: &str,
    store: &Store,
) -> Result<(String, ShardReport), AgentError> {
    // First, so a prepare of this transaction that arrives later is refused.
    store.mark_resolved(prepared)?;
    let txn = &step.txn_id;
    if engine.is_prepared(prepared)? {
        engine.finish_prepared(prepared, step.commit)?;
        let detail = if step.commit {
            format!("committed {txn}")
        } else {
            format!("rolled {txn} back")
        };
        return Ok((detail, engine.describe()?));
    }
    if !step.commit {
        let detail = if engine.holds_prepared() {
            format!("nothing of {txn} was prepared here")
        } else {
            format!("nothing of {txn} was kept here (its prepare was a trial run)")
        };
        return Ok((detail, engine.describe()?));
    }
    match engine.commit_unprepared(step, &exports_dir(store, prepared))? {
        Unprepared::AlreadyDone(report) => Ok((format!("{txn} was already committed"), report)),
        Unprepared::Committed(report) => Ok((format!("committed {txn}"), report)),
        Unprepared::Missing => Err(refused(format!(
            "no prepared transaction {prepared} on this database, and the schema history does \
             not show {txn} done: check this shard by hand"
        ))),
    }
}

/// Read only: the version and fingerprint now, and this cluster's prepared transactions still
/// open (`prefix` is the start of their names, see [`prepared_name`]).
pub fn verify(
    engine: &mut dyn ShardEngine,
    prefix: &str,
) -> Result<(String, ShardReport), AgentError> {
    let mut report = engine.describe()?;
    report.in_doubt = engine.in_doubt(prefix)?;
    let mut detail = format!(
        "at version {}; fingerprint {}",
        display_version(&report.version),
        short(&report.fingerprint)
    );
    if !report.in_doubt.is_empty() {
        detail += &format!(
            "; prepared transactions open: {}",
            report.in_doubt.join(", ")
        );
    }
    Ok((detail, report))
}

/// Where one delivery of a transaction exports the rows it destroys: named by the prepared
/// transaction (cluster and transaction) and the time, so no export ever overwrites another:
/// each may be the only copy of those rows.
fn exports_dir(store: &Store, prepared: &str) -> PathBuf {
    store
        .exports_dir()
        .join(format!("{prepared}-{}", rewind_shared::time::now_ms()))
}

fn versions(step: &ShardStep) -> String {
    step.migrations
        .iter()
        .map(|migration| migration.version.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn display_version(version: &str) -> &str {
    if version.is_empty() {
        "(none)"
    } else {
        version
    }
}

pub(crate) fn short(fingerprint: &str) -> &str {
    truncate(fingerprint, 19)
}

/// `sha256:` over a shard's sorted catalog lines: its schema fingerprint.
fn fingerprint_of(lines: &[String]) -> String {
    format!(
        "sha256:{}",
        rewind_shared::digest::sha256_hex(lines.join("\n").as_bytes())
    )
}

/// Whether a step applies an expand migration, so its engine reads the catalog before the
/// first migration and after each (see [`check_expand`]).
fn checks_expand(step: &ShardStep) -> bool {
    !step.down
        && step
            .migrations
            .iter()
            .any(|migration| migration.class == "expand")
}

/// Refuses an "expand" migration whose up script did more than add (see [`expand_check`]).
pub(crate) fn check_expand(
    migration: &Migration,
    (old_release, before_this): (&[String], &[String]),
    catalog_after: &[String],
    views_have_columns: bool,
) -> Result<(), AgentError> {
    let findings = expand_check::breaks_of_migration(
        old_release,
        before_this,
        catalog_after,
        views_have_columns,
    );
    if findings.is_empty() {
        return Ok(());
    }
    Err(refused(expand_check::describe(
        &migration.version,
        &findings,
    )))
}

pub(crate) fn refuse_unaccepted_loss(
    step: &ShardStep,
    data_loss: &[String],
) -> Result<(), AgentError> {
    if data_loss.is_empty() || step.accept_data_loss {
        return Ok(());
    }
    Err(refused(format!(
        "reverting {} would destroy data written under the new schema: {}; rerun with \
         --accept-data-loss and a reason to export those rows to the agent's store and proceed",
        versions(step),
        data_loss.join("; ")
    )))
}

/// A transaction resolved here is never prepared again (a prepare delivered late).
fn refuse_if_resolved(store: &Store, prepared: &str, step: &ShardStep) -> Result<(), AgentError> {
    if store.is_resolved(prepared)? {
        return Err(refused(format!(
            "{} was already resolved on this host: it is never prepared again",
            step.txn_id
        )));
    }
    Ok(())
}

/// The standing rules, whatever the database: each migration's scripts hash to their checksum
/// and it is applied (for a revert) or not (for an apply), and, newest first, nothing applied
/// after the oldest one reverted may stay applied. `recorded` reads where a migration stands;
/// `applied_later` names a migration applied after `oldest` that is not among `reverted`.
pub(crate) fn expect_standing<C>(
    connection: &mut C,
    step: &ShardStep,
    mut recorded: impl FnMut(&mut C, &Migration) -> Result<Recorded, AgentError>,
    applied_later: impl FnOnce(&mut C, &str, Vec<&str>) -> Result<Option<String>, AgentError>,
) -> Result<(), AgentError> {
    if step.migrations.is_empty() {
        return Err(refused(format!("{} names no migration", step.txn_id)));
    }
    for migration in &step.migrations {
        migrate::check_scripts(migration)?;
        let version = &migration.version;
        match (step.down, recorded(connection, migration)?) {
            (true, Recorded::Applied) | (false, Recorded::Never | Recorded::Reverted) => {}
            (true, Recorded::Never) => {
                return Err(refused(format!("{version} never ran on this shard")));
            }
            (true, Recorded::Reverted) => {
                return Err(refused(format!(
                    "{version} is already reverted on this shard"
                )));
            }
            (false, Recorded::Applied) => {
                return Err(refused(format!(
                    "{version} is already applied on this shard"
                )));
            }
        }
    }
    if step.down {
        let oldest = &step.migrations[step.migrations.len() - 1].version;
        let reverted: Vec<&str> = step.migrations.iter().map(|m| m.version.as_str()).collect();
        if let Some(later) = applied_later(connection, oldest, reverted)? {
            return Err(refused(format!(
                "{later} was applied after {oldest} and is not part of this rollback: it would \
                 have to be reverted first"
            )));
        }
    }
    Ok(())
}

/// Whether `recorded` shows every migration of the step as it leaves them.
pub(crate) fn all_taken_effect(
    step: &ShardStep,
    mut recorded: impl FnMut(&Migration) -> Result<Recorded, AgentError>,
) -> Result<bool, AgentError> {
    for migration in &step.migrations {
        let done = match recorded(migration)? {
            Recorded::Reverted => step.down,
            Recorded::Applied => !step.down,
            Recorded::Never => false,
        };
        if !done {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A script's statements, refusing one that ends or begins a transaction itself: rewind runs
/// every script inside its own transaction, all or nothing.
pub(crate) fn script_statements(label: &str, script: &str) -> Result<Vec<String>, AgentError> {
    let statements = rewind_shared::sql::statements(script);
    if let Some(statement) = statements
        .iter()
        .find(|statement| rewind_shared::sql::transaction_control(statement).is_some())
    {
        return Err(refused(format!(
            "{label} ends or begins a transaction itself ({}): rewind runs it inside its own",
            truncate(statement, 80)
        )));
    }
    Ok(statements)
}

/// `dir/name.ext`, or `dir/name-2.ext`... when two tables or columns map to one file name.
pub(crate) fn unique_path(dir: &Path, name: &str, extension: &str) -> PathBuf {
    let mut path = dir.join(format!("{name}.{extension}"));
    let mut n = 2;
    while path.exists() {
        path = dir.join(format!("{name}-{n}.{extension}"));
        n += 1;
    }
    path
}

pub(crate) fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
