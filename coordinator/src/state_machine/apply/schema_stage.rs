//! Schema stages of changes: the transactions they start and settle.

use super::*;

/// A change's schema stages from the migrations it names: per database, its expand migrations
/// in one stage before activation, its contract and data ones in one after.
pub(super) fn change_schema_stages(
    state: &State,
    migrations: &[(String, String)],
    (change, service): (u64, &str),
    environment: &str,
) -> Result<Vec<SchemaStage>> {
    let mut stages: Vec<SchemaStage> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (database, version) in migrations {
        let field = "migrations";
        let registered = state.migrations.get(database);
        let migration = registered
            .and_then(|versions| versions.get(version))
            .ok_or_else(|| {
                CoordinatorError::invalid(
                    field,
                    format!(
                        "{database}@{version} is not registered (known for {database}: {})",
                        known_list(
                            registered
                                .into_iter()
                                .flat_map(|versions| versions.keys().cloned())
                        )
                    ),
                )
            })?;
        if !seen.insert((database, version)) {
            return Err(CoordinatorError::invalid(
                field,
                format!("{database}@{version} is named twice"),
            ));
        }
        if super::super::schema::shards_of(state, database, environment).is_empty() {
            return Err(CoordinatorError::invalid(
                field,
                format!(
                    "no host in environment {environment:?} runs {database}: it has no shard to \
                     migrate"
                ),
            ));
        }
        let after_activation = migration.class != MigrationClass::Expand;
        match stages
            .iter_mut()
            .find(|stage| &stage.database == database && stage.after_activation == after_activation)
        {
            Some(stage) => stage.versions.push(version.clone()),
            None => stages.push(SchemaStage {
                database: database.clone(),
                change,
                service: service.to_string(),
                environment: environment.to_string(),
                versions: vec![version.clone()],
                down: false,
                after_activation,
                txn: 0,
                expected_fingerprint: String::new(),
            }),
        }
    }
    Ok(stages)
}

/// Begins the transaction of the stage its owner is waiting for.
pub(super) fn start_schema_txn(
    state: &mut State,
    command: &Command,
    owner: SchemaOwner,
) -> Result<(Outcome, String, String)> {
    let not_due = |why: String| CoordinatorError::invalid("owner", why);
    let (stage, environment, accept_data_loss) = match owner {
        SchemaOwner::Change { change, stage } => {
            let record = state
                .changes
                .get(&change)
                .ok_or_else(|| unknown_change(state, change))?;
            let point = match record.status {
                ChangeStatus::Capturing => false,
                ChangeStatus::Deploying => true,
                status => return Err(not_due(format!("{} is {status}", record.id()))),
            };
            let phase_done = record.hosts.iter().all(|host| {
                let step = if point { &host.activate } else { &host.capture };
                step.status == StepStatus::Succeeded
            });
            let stages = record
                .schema
                .iter()
                .enumerate()
                .filter(|(_, stage)| stage.after_activation == point);
            let waiting = super::super::schema::stages_state(state, stages);
            if !phase_done
                || waiting
                    != (super::super::schema::StagesState::Waiting {
                        stage,
                        begun: false,
                    })
            {
                return Err(not_due(format!(
                    "stage {stage} of {} is not due ({waiting:?})",
                    record.id()
                )));
            }
            (
                record.schema[stage].clone(),
                record.environment.clone(),
                String::new(),
            )
        }
        SchemaOwner::Rollback { rollback, stage } => {
            let record = state
                .rollbacks
                .get(&rollback)
                .ok_or_else(|| unknown_rollback(state, rollback))?;
            let waiting = super::super::schema::stages_state(state, record.schema_stages());
            // Contract and data reverts run before the waves (cluster version 9), the rest after.
            let after_waves = state.cluster_version() < version::SCHEMA_ORDER_BY_CLASS
                || record
                    .schema
                    .get(stage)
                    .is_none_or(|planned| planned.after_activation);
            if record.status != RollbackStatus::Running
                || (after_waves && record.current_wave().is_some())
                || waiting
                    != (super::super::schema::StagesState::Waiting {
                        stage,
                        begun: false,
                    })
            {
                return Err(not_due(format!(
                    "stage {stage} of {} is not due ({}, {waiting:?})",
                    record.id(),
                    record.status
                )));
            }
            let environment = record.schema[stage].environment.clone();
            (
                record.schema[stage].clone(),
                environment,
                record.options.accept_data_loss.clone(),
            )
        }
        SchemaOwner::Drill { drill, stage } => {
            let record = state.drills.get(&drill).ok_or_else(|| {
                CoordinatorError::invalid("owner", format!("no drill {}", drill_id(drill)))
            })?;
            let waiting =
                super::super::schema::stages_state(state, record.stages.iter().enumerate());
            if record.status != DrillStatus::Running
                || waiting
                    != (super::super::schema::StagesState::Waiting {
                        stage,
                        begun: false,
                    })
            {
                return Err(not_due(format!(
                    "stage {stage} of {} is not due ({waiting:?})",
                    record.id()
                )));
            }
            let mut planned = record.stages[stage].clone();
            planned.expected_fingerprint =
                super::super::schema::drill_expectation(state, record, stage);
            (planned, record.environment.clone(), String::new())
        }
    };
    let by = match owner {
        SchemaOwner::Change { change, .. } => change_id(change),
        SchemaOwner::Rollback { rollback, .. } => rollback_id(rollback),
        SchemaOwner::Drill { drill, .. } => drill_id(drill),
    };
    let number = super::super::schema::begin(
        state,
        owner,
        &stage,
        &environment,
        &accept_data_loss,
        &format!("{by} ({})", command.identity),
        command.at_ms,
    )?;
    let slot = match owner {
        SchemaOwner::Change { change, stage } => state
            .changes
            .get_mut(&change)
            .and_then(|record| record.schema.get_mut(stage)),
        SchemaOwner::Rollback { rollback, stage } => state
            .rollbacks
            .get_mut(&rollback)
            .and_then(|record| record.schema.get_mut(stage)),
        SchemaOwner::Drill { drill, stage } => state
            .drills
            .get_mut(&drill)
            .and_then(|record| record.stages.get_mut(stage)),
    };
    if let Some(slot) = slot {
        slot.txn = number;
    }
    let txn = &state.schema_txns[&number];
    if txn.status == SchemaTxnStatus::Done {
        let outcome = (Outcome::Done, txn.id(), format!("failed: {}", txn.detail));
        settle_schema_owner(state, number, command.at_ms);
        return Ok(outcome);
    }
    Ok((
        Outcome::Done,
        txn.id(),
        format!(
            "ok: {} {} on {} shards of {} for {by}",
            if stage.down { "revert" } else { "apply" },
            stage.versions.join(", "),
            txn.shards.len(),
            stage.database
        ),
    ))
}

/// A shard's schema step ended: record it and what it reported, then move the transaction and
/// its owner on.
pub(super) fn finish_schema_step(
    state: &mut State,
    step: &StepTarget,
    ok: bool,
    detail: &str,
    report: ShardReportRecord,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    let StepTarget::Schema {
        txn,
        phase,
        host_id,
    } = step
    else {
        return Err(CoordinatorError::UnknownStep {
            step_id: step.step_id(),
        });
    };
    let step_id = step.step_id();
    let progress = super::super::schema::step_mut(state, *txn, *phase, host_id)?;
    end_step(progress, &step_id, ok, detail, at_ms)?;
    let statements = report.statements.len();
    let rows: u64 = report.statements.iter().map(|log| log.rows).sum();
    super::super::schema::record_report(state, *txn, *phase, host_id, report);
    super::super::schema::settle(state, *txn, at_ms);
    settle_schema_owner(state, *txn, at_ms);
    let mut outcome = if ok {
        format!("ok: {detail}")
    } else {
        format!("failed: {detail}")
    };
    if statements > 0 {
        outcome += &format!(" [{statements} statements, {rows} rows]");
    }
    Ok((Outcome::Done, step_id, outcome))
}

pub(super) fn settle_schema_owner(state: &mut State, txn: u64, at_ms: u64) {
    match state.schema_txns.get(&txn).map(|txn| txn.owner) {
        Some(SchemaOwner::Change { change, .. }) => settle_change(state, change, at_ms),
        Some(SchemaOwner::Rollback { rollback, .. }) => settle_rollback(state, rollback, at_ms),
        Some(SchemaOwner::Drill { drill, .. }) => {
            super::super::schema::settle_drill(state, drill, at_ms)
        }
        None => {}
    }
    // A rollback pauses (and escalates) on a stuck resolve; a change or a drill only waits, so
    // a person is called once: the shard holds its prepared transaction's locks until then.
    let stuck = state
        .schema_txns
        .get(&txn)
        .filter(|txn| !txn.escalated && !matches!(txn.owner, SchemaOwner::Rollback { .. }))
        .and_then(|txn| {
            let shard = txn.stuck_resolving()?;
            let decision = if txn.decision.as_ref().is_some_and(|d| d.commit) {
                "commit"
            } else {
                "abort"
            };
            Some((
                txn.database.clone(),
                format!(
                    "{} of {} cannot resolve its prepared transaction ({decision}) on {}: {}; \
                     tried again every {} s, and the shard holds its locks until it succeeds \
                     (once resolved by hand: rewindctl schema resolved {} --shard {} --reason ...)",
                    txn.id(),
                    txn.database,
                    shard.host_id,
                    shard.resolve.detail,
                    super::super::schema::RESOLVE_RETRY_MS / 1000,
                    txn.id(),
                    shard.host_id
                ),
            ))
        });
    if let Some((database, evidence)) = stuck {
        state.escalate(at_ms, 0, 0, &database, evidence);
        if let Some(record) = state.schema_txns.get_mut(&txn) {
            record.escalated = true;
        }
    }
}
