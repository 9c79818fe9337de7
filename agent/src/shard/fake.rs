//! An in-memory database engine for the protocol's unit tests. It keeps what the protocol can
//! observe of a real one: a schema history (each version applied or reverted, in the order it
//! ran), the transactions held prepared, and how often scripts ran. Scripts are not SQL here: a
//! migration's effect is its history row. One crash can be armed at a point of a phase: the
//! engine then fails as a process killed there would, keeping what was durable by that point.

use std::collections::BTreeMap;
use std::path::Path;

use rewind_proto::v1::{ShardReport, StatementLog};

use super::refuse_unaccepted_loss;
use super::{ShardEngine, ShardStep, Unprepared, all_taken_effect, expect_standing};
use crate::AgentError;
use crate::migrate::{Migration, Recorded, edited_after_it_ran, refused};

/// Where an armed crash strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    /// In a prepare, after the report was kept and before the transaction is held.
    BeforeHold,
    /// In a prepare, once the transaction is held, before the answer.
    AfterHold,
    /// In a resolve, before the commit (or roll back) takes effect.
    BeforeFinish,
    /// In a resolve, once the commit (or roll back) took effect, before the answer.
    AfterFinish,
}

impl Crash {
    pub const ALL: [Crash; 4] = [
        Crash::BeforeHold,
        Crash::AfterHold,
        Crash::BeforeFinish,
        Crash::AfterFinish,
    ];
}

/// A history row: a version with its checksum, applied or reverted.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Row {
    version: String,
    checksum: String,
    applied: bool,
}

/// Rows in the order they were last applied (a reverted row keeps its place).
type History = Vec<Row>;

pub struct FakeShard {
    two_phase: bool,
    history: History,
    held: BTreeMap<String, History>,
    /// How many times the scripts ran, trials included.
    pub runs: usize,
    /// A crash to strike once, at its point.
    pub crash: Option<Crash>,
    /// Scripts fail (a syntax error, a constraint) when they run.
    pub scripts_fail: bool,
    /// Rows a revert of any migration would destroy.
    pub rows_at_risk: u64,
    /// The database cannot be reached: every call fails, as a connection would.
    pub unreachable: bool,
}

impl FakeShard {
    /// An engine that holds prepared transactions, as PostgreSQL does, with `applied` run.
    pub fn two_phase(applied: &[&Migration]) -> Self {
        Self::new(true, applied)
    }

    /// An engine whose prepare is a trial rolled back, as SQLite's is, with `applied` run.
    pub fn trial_only(applied: &[&Migration]) -> Self {
        Self::new(false, applied)
    }

    fn new(two_phase: bool, applied: &[&Migration]) -> Self {
        let history = applied
            .iter()
            .map(|migration| Row {
                version: migration.version.clone(),
                checksum: migration.checksum.clone(),
                applied: true,
            })
            .collect();
        Self {
            two_phase,
            history,
            held: BTreeMap::new(),
            runs: 0,
            crash: None,
            scripts_fail: false,
            rows_at_risk: 0,
            unreachable: false,
        }
    }

    /// Versions applied and not reverted, in the order they ran.
    pub fn applied(&self) -> Vec<String> {
        applied(&self.history)
    }

    /// Holds a transaction of another coordinator cluster, as a shared database might.
    pub fn hold_for_another(&mut self, prepared: &str) {
        self.held.insert(prepared.to_string(), self.history.clone());
    }

    fn reachable(&self) -> Result<(), AgentError> {
        if self.unreachable {
            return Err(AgentError::refused("database", "connection refused"));
        }
        Ok(())
    }

    /// Like rewind's advisory lock on PostgreSQL: a transaction held prepared keeps the
    /// migration lock until it is resolved, so nothing else can check or prepare meanwhile.
    fn migration_lock(&self) -> Result<(), AgentError> {
        match self.held.keys().next() {
            Some(holder) => Err(refused(format!(
                "take the migration lock: the prepared transaction {holder} holds it"
            ))),
            None => Ok(()),
        }
    }

    /// Strikes the armed crash if it is `point`.
    fn crash_at(&mut self, point: Crash) -> Result<(), AgentError> {
        if self.crash == Some(point) {
            self.crash = None;
            return Err(AgentError::Command {
                command: "fake shard".into(),
                reason: format!("crashed at {point:?}"),
            });
        }
        Ok(())
    }

    /// Runs the step's scripts against a copy of the history: the history they leave.
    fn run(&mut self, step: &ShardStep) -> Result<(History, ShardReport), AgentError> {
        self.migration_lock()?;
        let mut history = self.history.clone();
        expect_standing(&mut history, step, recorded, applied_later)?;
        let mut report = ShardReport::default();
        if step.down && self.rows_at_risk > 0 {
            report.data_loss = vec![format!("table orders: {} rows", self.rows_at_risk)];
            refuse_unaccepted_loss(step, &report.data_loss)?;
        }
        self.runs += 1;
        if self.scripts_fail {
            return Err(refused(format!(
                "{} {}: syntax error",
                if step.down { "down" } else { "up" },
                step.migrations[0].version
            )));
        }
        for migration in &step.migrations {
            history.retain(|row| row.version != migration.version || step.down);
            match history
                .iter_mut()
                .find(|row| row.version == migration.version)
            {
                Some(row) => row.applied = false,
                None => history.push(Row {
                    version: migration.version.clone(),
                    checksum: migration.checksum.clone(),
                    applied: true,
                }),
            }
            report.statements.push(StatementLog {
                script: format!(
                    "{} {}",
                    if step.down { "down" } else { "up" },
                    migration.version
                ),
                statement: "(fake)".into(),
                rows: 1,
            });
        }
        let described = describe(&history);
        report.version = described.version;
        report.fingerprint = described.fingerprint;
        Ok((history, report))
    }
}

impl ShardEngine for FakeShard {
    fn holds_prepared(&self) -> bool {
        self.two_phase
    }

    fn check(&mut self, step: &ShardStep) -> Result<ShardReport, AgentError> {
        self.reachable()?;
        self.migration_lock()?;
        let mut history = self.history.clone();
        expect_standing(&mut history, step, recorded, applied_later)?;
        let mut report = describe(&self.history);
        if step.down && self.rows_at_risk > 0 {
            report.data_loss = vec![format!("table orders: {} rows", self.rows_at_risk)];
        }
        Ok(report)
    }

    fn is_prepared(&mut self, prepared: &str) -> Result<bool, AgentError> {
        self.reachable()?;
        Ok(self.held.contains_key(prepared))
    }

    fn prepare(
        &mut self,
        step: &ShardStep,
        prepared: &str,
        _exports: &Path,
        keep: &mut dyn FnMut(&ShardReport) -> Result<(), AgentError>,
    ) -> Result<ShardReport, AgentError> {
        self.reachable()?;
        let (history, report) = self.run(step)?;
        keep(&report)?;
        self.crash_at(Crash::BeforeHold)?;
        if self.two_phase {
            self.held.insert(prepared.to_string(), history);
        }
        self.crash_at(Crash::AfterHold)?;
        Ok(report)
    }

    fn finish_prepared(&mut self, prepared: &str, commit: bool) -> Result<(), AgentError> {
        self.reachable()?;
        self.crash_at(Crash::BeforeFinish)?;
        let history = self
            .held
            .remove(prepared)
            .ok_or_else(|| refused(format!("no prepared transaction {prepared}")))?;
        if commit {
            self.history = history;
        }
        self.crash_at(Crash::AfterFinish)
    }

    fn commit_unprepared(
        &mut self,
        step: &ShardStep,
        _exports: &Path,
    ) -> Result<Unprepared, AgentError> {
        self.reachable()?;
        let mut history = self.history.clone();
        if all_taken_effect(step, |migration| recorded(&mut history, migration))? {
            return Ok(Unprepared::AlreadyDone(describe(&self.history)));
        }
        if self.two_phase {
            return Ok(Unprepared::Missing);
        }
        self.crash_at(Crash::BeforeFinish)?;
        let (history, report) = self.run(step)?;
        self.history = history;
        self.crash_at(Crash::AfterFinish)?;
        Ok(Unprepared::Committed(report))
    }

    fn describe(&mut self) -> Result<ShardReport, AgentError> {
        self.reachable()?;
        Ok(describe(&self.history))
    }

    fn in_doubt(&mut self, prefix: &str) -> Result<Vec<String>, AgentError> {
        self.reachable()?;
        Ok(self
            .held
            .keys()
            .filter(|name| name.starts_with(prefix))
            .cloned()
            .collect())
    }
}

fn applied(history: &History) -> Vec<String> {
    history
        .iter()
        .filter(|row| row.applied)
        .map(|row| row.version.clone())
        .collect()
}

fn describe(history: &History) -> ShardReport {
    let applied = applied(history);
    ShardReport {
        version: applied.last().cloned().unwrap_or_default(),
        fingerprint: format!(
            "sha256:{}",
            rewind_shared::digest::sha256_hex(applied.join(",").as_bytes())
        ),
        ..ShardReport::default()
    }
}

fn recorded(history: &mut History, migration: &Migration) -> Result<Recorded, AgentError> {
    match history.iter().find(|row| row.version == migration.version) {
        None => Ok(Recorded::Never),
        Some(row) if row.checksum != migration.checksum => {
            Err(edited_after_it_ran(migration, &row.checksum))
        }
        Some(row) if row.applied => Ok(Recorded::Applied),
        Some(_) => Ok(Recorded::Reverted),
    }
}

fn applied_later(
    history: &mut History,
    oldest: &str,
    reverted: Vec<&str>,
) -> Result<Option<String>, AgentError> {
    let Some(at) = history.iter().position(|row| row.version == oldest) else {
        return Ok(None);
    };
    Ok(history[at + 1..]
        .iter()
        .find(|row| row.applied && !reverted.contains(&row.version.as_str()))
        .map(|row| row.version.clone()))
}
