//! Schema transactions (`st-<n>`): a set of migrations applied or reverted on every shard of a
//! database, all or nothing, in four phases whose every transition is a log entry.
//!
//! 1. **Check** on every shard (read only). A shard whose migrations do not stand as expected,
//!    whose scripts do not match their checksums, or whose revert would destroy data the operator
//!    did not accept losing, fails its check: the transaction ends aborted, nothing changed.
//!    Shards whose fingerprints disagree end it the same way.
//! 2. **Prepare** on every shard: the scripts run in one transaction per shard, which is then
//!    `PREPARE TRANSACTION`ed. Each shard's report (statements with rows affected, exported
//!    files, fingerprint after) is recorded with its step.
//! 3. **Decide**: the engine proposes `DecideSchemaTxn`, commit only once every shard is
//!    prepared with the same fingerprint and version, abort as soon as one failed or they
//!    disagree. A leader that finds a transaction preparing which it
//!    did not see being checked (it took over, or the cluster restarted) decides abort: without
//!    a recorded decision, nobody may commit. Then every shard that may hold a prepared
//!    transaction resolves it as decided: a resolve that fails is tried again every
//!    [`RESOLVE_RETRY_MS`] for as long as it takes (its owner calls a person meanwhile), since a
//!    prepared transaction holds its locks until it is resolved.
//!
//! One transaction at a time per database and environment: a second waits for the first.
//! 4. **Verify** (after a commit): every shard reports version and fingerprint; all must agree,
//!    and equal the fingerprint the transaction expects (for a revert, the one recorded before
//!    the change it undoes), with no prepared transaction of it left.
//!
//! Kept in one file (over 700 lines): the four phases are one state machine whose transitions refer
//! to each other.

use serde::{Deserialize, Serialize};

use super::state::{State, StepProgress, StepStatus};
use crate::errors::CoordinatorError;

type Result<T> = std::result::Result<T, CoordinatorError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ShardPhase {
    Check,
    Prepare,
    Resolve,
    Verify,
}

impl ShardPhase {
    pub const ALL: [Self; 4] = [Self::Check, Self::Prepare, Self::Resolve, Self::Verify];

    pub fn name(self) -> &'static str {
        match self {
            Self::Check => "check",
            Self::Prepare => "prepare",
            Self::Resolve => "resolve",
            Self::Verify => "verify",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|phase| phase.name() == name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchemaTxnStatus {
    Checking,
    Preparing,
    Resolving,
    Verifying,
    Done,
}

super::state::stable_names!(SchemaTxnStatus {
    Checking => "Checking",
    Preparing => "Preparing",
    Resolving => "Resolving",
    Verifying => "Verifying",
    Done => "Done",
});

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchemaDecision {
    pub commit: bool,
    pub at_ms: u64,
    pub reason: String,
}

/// A statement a shard ran, with the rows it affected: what a person needs to finish by hand.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatementRecord {
    pub script: String,
    pub statement: String,
    pub rows: u64,
}

/// What a shard's step reported (see the agent's `shard` module).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardReportRecord {
    #[serde(default)]
    pub database_identity: String,
    pub version: String,
    pub fingerprint: String,
    pub data_loss: Vec<String>,
    pub statements: Vec<StatementRecord>,
    pub exported: Vec<String>,
    pub in_doubt: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub host_id: String,
    pub check: StepProgress,
    pub prepare: StepProgress,
    pub resolve: StepProgress,
    pub verify: StepProgress,
    /// As checked, before anything ran.
    pub before: ShardReportRecord,
    /// As prepared: the statements and exports, and the fingerprint inside the transaction.
    pub prepared: ShardReportRecord,
    /// As verified after the commit.
    pub after: ShardReportRecord,
    /// A person resolved its prepared transaction by hand (`resolved_by_hand`).
    #[serde(default)]
    pub resolved_by_hand: bool,
}

impl ShardRecord {
    pub fn step(&self, phase: ShardPhase) -> &StepProgress {
        match phase {
            ShardPhase::Check => &self.check,
            ShardPhase::Prepare => &self.prepare,
            ShardPhase::Resolve => &self.resolve,
            ShardPhase::Verify => &self.verify,
        }
    }

    fn step_mut(&mut self, phase: ShardPhase) -> &mut StepProgress {
        match phase {
            ShardPhase::Check => &mut self.check,
            ShardPhase::Prepare => &mut self.prepare,
            ShardPhase::Resolve => &mut self.resolve,
            ShardPhase::Verify => &mut self.verify,
        }
    }
}

/// Who a schema transaction belongs to: a stage of a change (applying), of a rollback
/// (reverting) or of a drill (both, on another environment's shards).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchemaOwner {
    Change { change: u64, stage: usize },
    Rollback { rollback: u64, stage: usize },
    Drill { drill: u64, stage: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DrillStatus {
    Running,
    Passed,
    Failed,
}

/// `dr-<n>`: a change's migrations applied, reverted and applied again on the shards of
/// another environment (staging), each step one schema transaction whose verify checks the
/// fingerprint: after the revert it must be the one before the first apply, after the second
/// apply the one after the first (Liquibase's update-testing-rollback, across shards).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrillRecord {
    pub number: u64,
    pub change: u64,
    pub environment: String,
    /// Per database: up, down, up.
    pub stages: Vec<SchemaStage>,
    pub status: DrillStatus,
    pub started_by: String,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    pub detail: String,
}

impl DrillRecord {
    pub fn id(&self) -> String {
        drill_id(self.number)
    }
}

pub fn drill_id(number: u64) -> String {
    format!("dr-{number}")
}

/// Begins a drill of `change`'s migrations on `environment`'s shards.
pub fn start_drill(
    state: &mut State,
    change: u64,
    environment: &str,
    by: &str,
    at_ms: u64,
) -> Result<(u64, String)> {
    let record = state.changes.get(&change).ok_or_else(|| {
        CoordinatorError::invalid(
            "change_id",
            format!("no change {}", super::state::change_id(change)),
        )
    })?;
    let mut databases: Vec<(String, Vec<String>)> = Vec::new();
    for stage in &record.schema {
        match databases
            .iter_mut()
            .find(|(database, _)| *database == stage.database)
        {
            Some((_, versions)) => versions.extend(stage.versions.iter().cloned()),
            None => databases.push((stage.database.clone(), stage.versions.clone())),
        }
    }
    if databases.is_empty() {
        return Err(CoordinatorError::invalid(
            "change_id",
            format!(
                "{} applies no migrations: there is nothing to drill",
                record.id()
            ),
        ));
    }
    let mut stages = Vec::new();
    for (database, versions) in databases {
        if shards_of(state, &database, environment).is_empty() {
            return Err(CoordinatorError::invalid(
                "environment",
                format!(
                    "no host in environment {environment:?} runs {database}: no shard to drill on"
                ),
            ));
        }
        if let Some(busy) = state.schema_txns.values().find(|txn| {
            txn.database == database
                && txn.environment == environment
                && txn.status != SchemaTxnStatus::Done
        }) {
            return Err(CoordinatorError::invalid(
                "environment",
                format!(
                    "{} is still running on {database} in {environment}",
                    busy.id()
                ),
            ));
        }
        let reversed: Vec<String> = versions.iter().rev().cloned().collect();
        for (down, versions) in [
            (false, versions.clone()),
            (true, reversed),
            (false, versions),
        ] {
            stages.push(SchemaStage {
                database: database.clone(),
                change,
                service: String::new(),
                environment: environment.to_string(),
                versions,
                down,
                after_activation: false,
                txn: 0,
                expected_fingerprint: String::new(),
            });
        }
    }
    let number = state.next_drill.max(1);
    state.next_drill = number + 1;
    let summary = stages
        .iter()
        .step_by(3)
        .map(|stage| format!("{} ({})", stage.database, stage.versions.join(", ")))
        .collect::<Vec<_>>()
        .join("; ");
    state.drills.insert(
        number,
        DrillRecord {
            number,
            change,
            environment: environment.to_string(),
            stages,
            status: DrillStatus::Running,
            started_by: by.to_string(),
            started_at_ms: at_ms,
            finished_at_ms: 0,
            detail: String::new(),
        },
    );
    Ok((number, summary))
}

/// The fingerprint a drill's stage must leave: after the revert, the one before the first
/// apply; after the second apply, the one the revert began from.
pub fn drill_expectation(state: &State, drill: &DrillRecord, stage: usize) -> String {
    if stage.is_multiple_of(3) {
        return String::new();
    }
    drill
        .stages
        .get(stage - 1)
        .and_then(|previous| state.schema_txns.get(&previous.txn))
        .map(|txn| txn.fingerprint_before.clone())
        .unwrap_or_default()
}

/// Ends a drill once its stages are done, or one failed.
pub fn settle_drill(state: &mut State, number: u64, at_ms: u64) {
    let Some(drill) = state.drills.get(&number) else {
        return;
    };
    if drill.status != DrillStatus::Running {
        return;
    }
    let outcome = stages_state(state, drill.stages.iter().enumerate());
    let shards: usize = drill
        .stages
        .iter()
        .filter_map(|stage| state.schema_txns.get(&stage.txn))
        .map(|txn| txn.shards.len())
        .max()
        .unwrap_or(0);
    let Some(drill) = state.drills.get_mut(&number) else {
        return;
    };
    match outcome {
        StagesState::Waiting { .. } | StagesState::Stuck { .. } => return,
        StagesState::Done => {
            drill.status = DrillStatus::Passed;
            drill.detail = format!(
                "up, down and up again on {shards} shards in {}: the fingerprint after the \
                 revert matched the one before, and after the second apply the first's",
                drill.environment
            );
        }
        StagesState::Failed { stage, detail } => {
            drill.status = DrillStatus::Failed;
            let step = ["first apply", "revert", "second apply"][stage % 3];
            drill.detail = format!("{step} failed: {detail}");
        }
    }
    drill.finished_at_ms = at_ms;
}

/// One database's migrations a change applies or a rollback reverts, and the transaction that
/// does it (0 until it begins; a resumed rollback begins a new one after an abort).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchemaStage {
    pub database: String,
    /// The change whose migrations these are, and its service and environment (a rollback's
    /// stage runs on the shards of the change's environment; an isolated service's is skipped).
    #[serde(default)]
    pub change: u64,
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub environment: String,
    /// In the order they run: a revert's newest first.
    pub versions: Vec<String>,
    pub down: bool,
    /// A change's contract and data migrations run after its hosts are activated; expand ones
    /// before. A rollback's reverts run after its app waves, except, from cluster version 9
    /// (`version::SCHEMA_ORDER_BY_CLASS`), those of contract and data migrations, which run
    /// before any wave (false here): the release the waves restore needs what they removed.
    pub after_activation: bool,
    pub txn: u64,
    /// The fingerprint every shard must have afterwards; empty: they must only agree.
    #[serde(default)]
    pub expected_fingerprint: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchemaTxnRecord {
    pub number: u64,
    pub database: String,
    pub environment: String,
    pub down: bool,
    pub migrations: Vec<String>,
    pub owner: SchemaOwner,
    /// Who asked (recorded in each shard's history table).
    pub by: String,
    /// Why the operator accepted losing data a revert destroys; empty: not accepted.
    pub accept_data_loss: String,
    pub expected_fingerprint: String,
    pub status: SchemaTxnStatus,
    pub decision: Option<SchemaDecision>,
    pub shards: Vec<ShardRecord>,
    /// The fingerprint every shard agreed on at check.
    pub fingerprint_before: String,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    pub committed: bool,
    /// Committed and every shard verified as expected.
    pub verified: bool,
    /// Committed, did not verify, and a person resumed its owner: accepted as it is.
    #[serde(default)]
    pub accepted: bool,
    /// A person was called about a resolve that keeps failing (changes and drills; a
    /// rollback pauses instead).
    #[serde(default)]
    pub escalated: bool,
    pub detail: String,
}

impl SchemaTxnRecord {
    pub fn id(&self) -> String {
        schema_txn_id(self.number)
    }

    pub fn ok(&self) -> bool {
        self.status == SchemaTxnStatus::Done && self.committed && (self.verified || self.accepted)
    }

    /// A resolve that ran out of attempts: prepared transactions may hold locks on that shard
    /// until a person resumes (which retries it).
    pub fn stuck_resolving(&self) -> Option<&ShardRecord> {
        (self.status == SchemaTxnStatus::Resolving)
            .then(|| {
                self.shards
                    .iter()
                    .find(|shard| shard.resolve.status == StepStatus::Failed)
            })
            .flatten()
    }
}

pub fn schema_txn_id(number: u64) -> String {
    format!("st-{number}")
}

/// How long after a failed resolve it is tried again.
pub const RESOLVE_RETRY_MS: u64 = 30_000;

/// Done transactions whose statement logs are kept; older ones keep the rest of their record.
const KEEP_STATEMENTS_OF: usize = 64;

/// The transaction not yet done on this database and environment, if any: one runs at a time.
pub fn busy<'a>(
    state: &'a State,
    database: &str,
    environment: &str,
) -> Option<&'a SchemaTxnRecord> {
    state.schema_txns.values().find(|txn| {
        txn.database == database
            && txn.environment == environment
            && txn.status != SchemaTxnStatus::Done
    })
}

/// Why every shard prepared but the transaction must not commit: their fingerprints or
/// versions as prepared disagree. Checked before the decision, while it can still be rolled
/// back. (A schema that agrees everywhere but differs from the one recorded before the change,
/// say an index someone added by hand since, is committed and then reported by verify, for a
/// person to accept on resume: refusing it would leave no way to revert at all.)
pub fn prepared_problems(txn: &SchemaTxnRecord) -> Option<String> {
    if let Some(odd) = disagreement(&txn.shards, |shard| &shard.prepared.fingerprint) {
        return Some(format!("shards would disagree after it: {odd}"));
    }
    disagreement(&txn.shards, |shard| &shard.prepared.version)
        .map(|odd| format!("shards would be at different versions: {odd}"))
}

/// Begins the transaction of a stage: a check step per shard (the hosts of `environment` that
/// run the database's service).
pub fn begin(
    state: &mut State,
    owner: SchemaOwner,
    stage: &SchemaStage,
    environment: &str,
    accept_data_loss: &str,
    by: &str,
    at_ms: u64,
) -> Result<u64> {
    if let Some(other) = busy(state, &stage.database, environment) {
        return Err(CoordinatorError::invalid(
            "database",
            format!(
                "{} still runs on {} in {environment}: one schema transaction at a time",
                other.id(),
                stage.database
            ),
        ));
    }
    let shards = shards_of(state, &stage.database, environment);
    let no_shard = format!(
        "no host in environment {environment:?} runs {}: it has no shard to migrate",
        stage.database
    );
    // A rollback stalls before asking (the engine checks): a person must look, and resuming
    // asks again. A change's or drill's stage ends failed with the reason, rather than being
    // asked for and refused again at every engine tick.
    if shards.is_empty() && matches!(owner, SchemaOwner::Rollback { .. }) {
        return Err(CoordinatorError::invalid("database", no_shard));
    }
    let number = state.next_schema_txn.max(1);
    state.next_schema_txn = number + 1;
    // Statement logs are for a manual recovery soon after; old ones go, the records stay.
    let done: Vec<u64> = state
        .schema_txns
        .values()
        .filter(|txn| txn.status == SchemaTxnStatus::Done)
        .map(|txn| txn.number)
        .collect();
    for old in done.iter().rev().skip(KEEP_STATEMENTS_OF) {
        if let Some(txn) = state.schema_txns.get_mut(old) {
            for shard in &mut txn.shards {
                shard.prepared.statements.clear();
            }
        }
    }
    state.schema_txns.insert(
        number,
        SchemaTxnRecord {
            number,
            database: stage.database.clone(),
            environment: environment.to_string(),
            down: stage.down,
            migrations: stage.versions.clone(),
            owner,
            by: by.to_string(),
            accept_data_loss: accept_data_loss.to_string(),
            expected_fingerprint: stage.expected_fingerprint.clone(),
            status: SchemaTxnStatus::Checking,
            decision: None,
            shards: shards
                .into_iter()
                .map(|host_id| ShardRecord {
                    host_id,
                    ..ShardRecord::default()
                })
                .collect(),
            fingerprint_before: String::new(),
            started_at_ms: at_ms,
            finished_at_ms: 0,
            committed: false,
            verified: false,
            accepted: false,
            escalated: false,
            detail: String::new(),
        },
    );
    if let Some(txn) = state.schema_txns.get_mut(&number)
        && txn.shards.is_empty()
    {
        finish(txn, false, no_shard, at_ms);
    }
    Ok(number)
}

/// Hosts of `environment` that run `database` (its shards), in id order.
pub fn shards_of(state: &State, database: &str, environment: &str) -> Vec<String> {
    state
        .hosts
        .values()
        .filter(|host| {
            crate::plan::environment_of_hosts(state, std::slice::from_ref(&host.host_id))
                == environment
        })
        .filter(|host| host.services.iter().any(|service| service == database))
        .map(|host| host.host_id.clone())
        .collect()
}

fn unknown(number: u64) -> CoordinatorError {
    CoordinatorError::invalid(
        "step",
        format!("no schema transaction {}", schema_txn_id(number)),
    )
}

/// The progress of one shard's step, for start and finish.
pub fn step_mut<'a>(
    state: &'a mut State,
    number: u64,
    phase: ShardPhase,
    host_id: &str,
) -> Result<&'a mut StepProgress> {
    let txn = state
        .schema_txns
        .get_mut(&number)
        .ok_or_else(|| unknown(number))?;
    let id = txn.id();
    let shard = txn
        .shards
        .iter_mut()
        .find(|shard| shard.host_id == host_id)
        .ok_or_else(|| {
            CoordinatorError::invalid("step", format!("{host_id} is not a shard of {id}"))
        })?;
    Ok(shard.step_mut(phase))
}

/// Whether a shard's step of this phase may start now.
pub fn startable(state: &State, number: u64, phase: ShardPhase) -> Result<()> {
    let txn = state
        .schema_txns
        .get(&number)
        .ok_or_else(|| unknown(number))?;
    let current = match txn.status {
        SchemaTxnStatus::Checking => Some(ShardPhase::Check),
        SchemaTxnStatus::Preparing => Some(ShardPhase::Prepare),
        SchemaTxnStatus::Resolving => Some(ShardPhase::Resolve),
        SchemaTxnStatus::Verifying => Some(ShardPhase::Verify),
        SchemaTxnStatus::Done => None,
    };
    if current != Some(phase) {
        return Err(CoordinatorError::StepNotStartable {
            step_id: format!("{}/{}", txn.id(), phase.name()),
            reason: format!("{} is {}", txn.id(), txn.status),
        });
    }
    Ok(())
}

/// A person says they resolved a shard's prepared transaction by hand, its resolve having
/// failed (the database was restored, the transaction finished from psql, the host is being
/// rebuilt): the resolve is marked skipped and no longer retried, and the transaction moves on
/// to verify, which judges every shard as it is, so a shard left wrong still fails the check.
pub fn resolved_by_hand(
    state: &mut State,
    number: u64,
    host_id: &str,
    reason: &str,
    by: &str,
) -> Result<()> {
    let txn = state.schema_txns.get_mut(&number).ok_or_else(|| {
        CoordinatorError::invalid(
            "txn_id",
            format!("no schema transaction {}", schema_txn_id(number)),
        )
    })?;
    let id = txn.id();
    if txn.status != SchemaTxnStatus::Resolving {
        return Err(CoordinatorError::invalid(
            "txn_id",
            format!(
                "{id} is {}: a shard is resolved by hand only while its transaction is resolving",
                txn.status
            ),
        ));
    }
    let shards: Vec<String> = txn
        .shards
        .iter()
        .map(|shard| shard.host_id.clone())
        .collect();
    let shard = txn
        .shards
        .iter_mut()
        .find(|shard| shard.host_id == host_id)
        .ok_or_else(|| {
            CoordinatorError::invalid(
                "host_id",
                format!(
                    "{host_id} is not a shard of {id}: its shards are {}",
                    shards.join(", ")
                ),
            )
        })?;
    // A running resolve is taken over only when its agent is away (the API checks the session);
    // its late report is refused, as the step is no longer running, and verify judges anyway.
    if !matches!(
        shard.resolve.status,
        StepStatus::Failed | StepStatus::Running
    ) {
        return Err(CoordinatorError::invalid(
            "host_id",
            format!(
                "the resolve of {id} on {host_id} has not failed ({}): only a failed one is \
                 resolved by hand",
                shard.resolve.status
            ),
        ));
    }
    shard.resolved_by_hand = true;
    shard.resolve.status = StepStatus::Skipped;
    shard.resolve.detail = format!(
        "resolved by hand by {by}: {reason} (the last attempt: {})",
        shard.resolve.detail
    );
    Ok(())
}

/// Keeps what a shard reported with its step.
pub fn record_report(
    state: &mut State,
    number: u64,
    phase: ShardPhase,
    host_id: &str,
    report: ShardReportRecord,
) {
    let Some(shard) = state
        .schema_txns
        .get_mut(&number)
        .and_then(|txn| txn.shards.iter_mut().find(|shard| shard.host_id == host_id))
    else {
        return;
    };
    match phase {
        ShardPhase::Check => shard.before = report,
        ShardPhase::Prepare => shard.prepared = report,
        ShardPhase::Resolve => {}
        ShardPhase::Verify => shard.after = report,
    }
}

/// Records the decision (see the module docs). Commit only when every shard is prepared.
pub fn decide(
    state: &mut State,
    number: u64,
    commit: bool,
    reason: &str,
    at_ms: u64,
) -> Result<String> {
    let txn = state
        .schema_txns
        .get_mut(&number)
        .ok_or_else(|| unknown(number))?;
    if txn.decision.is_some()
        || !matches!(
            txn.status,
            SchemaTxnStatus::Checking | SchemaTxnStatus::Preparing
        )
    {
        return Err(CoordinatorError::invalid(
            "decision",
            format!("{} is {} and decided already", txn.id(), txn.status),
        ));
    }
    if commit
        && let Some(shard) = txn
            .shards
            .iter()
            .find(|shard| shard.prepare.status != StepStatus::Succeeded)
    {
        return Err(CoordinatorError::invalid(
            "decision",
            format!(
                "{} cannot commit: {} is not prepared ({})",
                txn.id(),
                shard.host_id,
                shard.prepare.status
            ),
        ));
    }
    txn.decision = Some(SchemaDecision {
        commit,
        at_ms,
        reason: reason.to_string(),
    });
    // Every shard that may hold a prepared transaction resolves it; one whose prepare never
    // began holds none.
    let mut resolving = 0;
    for shard in &mut txn.shards {
        if shard.prepare.attempts > 0 {
            shard.resolve = StepProgress::default();
            resolving += 1;
        } else {
            shard.resolve.status = StepStatus::Skipped;
        }
    }
    if resolving == 0 {
        finish(
            txn,
            false,
            format!("aborted before any shard prepared: {reason}"),
            at_ms,
        );
    } else {
        txn.status = SchemaTxnStatus::Resolving;
    }
    let word = if commit { "commit" } else { "abort" };
    Ok(format!("{word}: {reason}"))
}

/// Records abort for each of `txns` not yet decided (one decided runs to its end).
pub fn abort_undecided(
    state: &mut State,
    txns: impl IntoIterator<Item = u64>,
    reason: &str,
    at_ms: u64,
) {
    for number in txns {
        let undecided = state
            .schema_txns
            .get(&number)
            .is_some_and(|txn| txn.decision.is_none() && txn.status != SchemaTxnStatus::Done);
        if undecided {
            // Cannot fail: the transaction exists and is undecided.
            let _ = decide(state, number, false, reason, at_ms);
        }
    }
}

fn finish(txn: &mut SchemaTxnRecord, committed: bool, detail: String, at_ms: u64) {
    txn.status = SchemaTxnStatus::Done;
    txn.committed = committed;
    txn.finished_at_ms = at_ms;
    txn.detail = detail;
}

/// Ends a transaction that the check refused: aborted, with nothing prepared anywhere.
fn abort_at_check(txn: &mut SchemaTxnRecord, detail: String, at_ms: u64) {
    txn.decision = Some(SchemaDecision {
        commit: false,
        at_ms,
        reason: detail.clone(),
    });
    finish(txn, false, detail, at_ms);
}

/// Moves a transaction on after one of its steps ended.
pub fn settle(state: &mut State, number: u64, at_ms: u64) {
    let Some(txn) = state.schema_txns.get_mut(&number) else {
        return;
    };
    let all = |txn: &SchemaTxnRecord, phase: ShardPhase, status: StepStatus| {
        txn.shards
            .iter()
            .all(|shard| shard.step(phase).status == status)
    };
    match txn.status {
        SchemaTxnStatus::Checking => {
            if let Some(failed) = txn
                .shards
                .iter()
                .find(|shard| shard.check.status == StepStatus::Failed)
            {
                let detail = format!(
                    "check failed on {}, nothing changed: {}",
                    failed.host_id, failed.check.detail
                );
                abort_at_check(txn, detail, at_ms);
                return;
            }
            if !all(txn, ShardPhase::Check, StepStatus::Succeeded) {
                return;
            }
            if let Some(odd) = disagreement(&txn.shards, |shard| &shard.before.fingerprint) {
                let detail = format!("shards disagree before anything changed: {odd}");
                abort_at_check(txn, detail, at_ms);
                return;
            }
            if let Some(detail) = same_database(&txn.shards) {
                abort_at_check(txn, detail, at_ms);
                return;
            }
            txn.fingerprint_before = txn.shards[0].before.fingerprint.clone();
            txn.status = SchemaTxnStatus::Preparing;
        }
        // The engine decides; see `decide`.
        SchemaTxnStatus::Preparing | SchemaTxnStatus::Done => {}
        SchemaTxnStatus::Resolving => {
            let resolved = txn.shards.iter().all(|shard| {
                matches!(
                    shard.resolve.status,
                    StepStatus::Succeeded | StepStatus::Skipped
                )
            });
            if !resolved {
                return;
            }
            let decision = txn.decision.clone().unwrap_or(SchemaDecision {
                commit: false,
                at_ms,
                reason: String::new(),
            });
            // An abort is checked too when a person resolved a shard: their word is not proof
            // that nothing is left prepared or changed.
            if decision.commit || txn.shards.iter().any(|shard| shard.resolved_by_hand) {
                txn.status = SchemaTxnStatus::Verifying;
            } else {
                finish(
                    txn,
                    false,
                    format!("aborted, every shard rolled back: {}", decision.reason),
                    at_ms,
                );
            }
        }
        SchemaTxnStatus::Verifying => {
            if txn
                .shards
                .iter()
                .any(|shard| !shard.verify.status.is_terminal())
            {
                return;
            }
            if !txn
                .decision
                .as_ref()
                .is_some_and(|decision| decision.commit)
            {
                let problems = abort_problems(txn);
                let by_hand: Vec<&str> = txn
                    .shards
                    .iter()
                    .filter(|shard| shard.resolved_by_hand)
                    .map(|shard| shard.host_id.as_str())
                    .collect();
                let detail = if problems.is_empty() {
                    format!(
                        "aborted, every shard rolled back and checked unchanged ({} resolved by \
                         hand)",
                        by_hand.join(", ")
                    )
                } else {
                    format!(
                        "aborted, but after {} resolved by hand verification found: {}",
                        by_hand.join(", "),
                        problems.join("; ")
                    )
                };
                finish(txn, false, detail, at_ms);
                return;
            }
            let problems = verification_problems(txn);
            txn.verified = problems.is_empty();
            let detail = if problems.is_empty() {
                format!(
                    "committed on {} shards; all at version {} with fingerprint {}",
                    txn.shards.len(),
                    display(&txn.shards[0].after.version),
                    short(&txn.shards[0].after.fingerprint)
                )
            } else {
                format!(
                    "committed, but verification failed: {}",
                    problems.join("; ")
                )
            };
            finish(txn, true, detail, at_ms);
        }
    }
}

/// Two shards that are one database (as their servers identify it): each would prepare the
/// same change, the second waiting on the first's lock.
fn same_database(shards: &[ShardRecord]) -> Option<String> {
    let mut seen: std::collections::BTreeMap<&str, &str> = std::collections::BTreeMap::new();
    for shard in shards {
        let identity = shard.before.database_identity.as_str();
        if identity.is_empty() {
            continue;
        }
        if let Some(first) = seen.insert(identity, &shard.host_id) {
            return Some(format!(
                "{first} and {} are the same database ({identity}): each shard must be its own",
                shard.host_id
            ));
        }
    }
    None
}

/// Whether a shard did not verify, or still holds this transaction prepared.
fn leftovers(txn: &SchemaTxnRecord, shard: &ShardRecord) -> Vec<String> {
    let mut problems = Vec::new();
    if shard.verify.status != StepStatus::Succeeded {
        problems.push(format!(
            "{} did not verify: {}",
            shard.host_id, shard.verify.detail
        ));
    }
    let own = format!("-{}", txn.id());
    if shard.after.in_doubt.iter().any(|gid| gid.ends_with(&own)) {
        problems.push(format!(
            "{} still holds a prepared transaction of {}",
            shard.host_id,
            txn.id()
        ));
    }
    problems
}

fn verification_problems(txn: &SchemaTxnRecord) -> Vec<String> {
    let mut problems: Vec<String> = txn
        .shards
        .iter()
        .flat_map(|shard| leftovers(txn, shard))
        .collect();
    if !problems.is_empty() {
        return problems;
    }
    if let Some(odd) = disagreement(&txn.shards, |shard| &shard.after.fingerprint) {
        problems.push(format!("fingerprints disagree: {odd}"));
    }
    if let Some(odd) = disagreement(&txn.shards, |shard| &shard.after.version) {
        problems.push(format!("versions disagree: {odd}"));
    }
    let after = &txn.shards[0].after.fingerprint;
    if problems.is_empty()
        && !txn.expected_fingerprint.is_empty()
        && after != &txn.expected_fingerprint
    {
        problems.push(format!(
            "every shard has fingerprint {}, not {} as recorded before the change",
            short(after),
            short(&txn.expected_fingerprint)
        ));
    }
    problems
}

/// What an aborted transaction left behind: a shard that did not verify, still holds its
/// prepared transaction, or whose schema is not the one checked before.
fn abort_problems(txn: &SchemaTxnRecord) -> Vec<String> {
    let mut problems = Vec::new();
    for shard in &txn.shards {
        let left = leftovers(txn, shard);
        if !left.is_empty() {
            problems.extend(left);
        } else if !txn.fingerprint_before.is_empty()
            && shard.after.fingerprint != txn.fingerprint_before
        {
            problems.push(format!(
                "{} has fingerprint {}, not {} as checked before",
                shard.host_id,
                short(&shard.after.fingerprint),
                short(&txn.fingerprint_before)
            ));
        }
    }
    problems
}

/// `None` when every shard has the same value, else who has what.
fn disagreement(shards: &[ShardRecord], value: impl Fn(&ShardRecord) -> &String) -> Option<String> {
    let first = value(&shards[0]);
    if shards.iter().all(|shard| value(shard) == first) {
        return None;
    }
    Some(
        shards
            .iter()
            .map(|shard| format!("{} has {}", shard.host_id, short(value(shard))))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

fn display(version: &str) -> &str {
    if version.is_empty() {
        "(none)"
    } else {
        version
    }
}

pub fn short(fingerprint: &str) -> &str {
    rewind_shared::names::truncate(fingerprint, 19)
}

/// Restarts what a person's resume can retry: an aborted transaction's stage begins afresh
/// (its `txn` goes back to 0), a resolve that keeps failing is tried again now, and a committed
/// transaction that did not verify is accepted as it is.
pub fn retry_stage(state: &mut State, stage: &mut SchemaStage) {
    let Some(txn) = state.schema_txns.get_mut(&stage.txn) else {
        return;
    };
    if txn.stuck_resolving().is_some() {
        for shard in &mut txn.shards {
            if shard.resolve.status == StepStatus::Failed {
                shard.resolve = StepProgress::default();
            }
        }
    } else if txn.status == SchemaTxnStatus::Done && !txn.committed {
        stage.txn = 0;
    } else if txn.status == SchemaTxnStatus::Done && !txn.verified {
        // Committed, so it cannot be undone: the person resuming has looked at what verify
        // found and accepts it (audited with the resume).
        txn.accepted = true;
        txn.detail += "; accepted as it is by the resume";
    }
}

/// Where the stages of one point (a change's before or after activation, a rollback's) stand.
#[derive(Debug, PartialEq)]
pub enum StagesState {
    /// Every stage's transaction committed and verified.
    Done,
    /// The first stage not yet done, and whether its transaction began.
    Waiting { stage: usize, begun: bool },
    /// A transaction ended without committing, or committed but did not verify: why.
    Failed { stage: usize, detail: String },
    /// A resolve keeps failing: the shard holds its prepared transaction (and its locks) until
    /// one succeeds; it is tried again meanwhile.
    Stuck { stage: usize, detail: String },
}

pub fn stages_state<'a>(
    state: &State,
    stages: impl Iterator<Item = (usize, &'a SchemaStage)>,
) -> StagesState {
    for (index, stage) in stages {
        let Some(txn) = state.schema_txns.get(&stage.txn) else {
            return StagesState::Waiting {
                stage: index,
                begun: false,
            };
        };
        if txn.ok() {
            continue;
        }
        if let Some(shard) = txn.stuck_resolving() {
            return StagesState::Stuck {
                stage: index,
                detail: format!(
                    "{} of {} could not yet resolve its prepared transaction ({}) on {}, \
                     tried again every {} s: {} (once resolved by hand: rewindctl schema \
                     resolved {} --shard {} --reason ...)",
                    txn.id(),
                    stage.database,
                    if txn.decision.as_ref().is_some_and(|d| d.commit) {
                        "commit"
                    } else {
                        "abort"
                    },
                    shard.host_id,
                    RESOLVE_RETRY_MS / 1000,
                    shard.resolve.detail,
                    txn.id(),
                    shard.host_id
                ),
            };
        }
        if txn.status == SchemaTxnStatus::Done {
            return StagesState::Failed {
                stage: index,
                detail: format!("{} of {}: {}", txn.id(), stage.database, txn.detail),
            };
        }
        return StagesState::Waiting {
            stage: index,
            begun: true,
        };
    }
    StagesState::Done
}
