//! Domain values to and from `rewind.v1` messages.
//!
//! These live with the API rather than in `proto/` because the domain types are the
//! coordinator's own; nothing outside the coordinator needs them.
//!
//! Kept in one file (over 700 lines) on purpose: every mapping between the domain and the wire
//! types sits together, so a field added to either is mapped here, or visibly not.

use rewind_proto::v1 as pb;

use crate::state_machine::*;

use super::validate::{DEFAULT_STEPS_PAGE, MAX_ROLLBACK_BYTES, repeated_bytes};

pub fn labels(labels: &Labels) -> pb::HostLabels {
    pb::HostLabels {
        region: labels.region.clone(),
        zone: labels.zone.clone(),
        environment: labels.environment.clone(),
    }
}

pub fn labels_from(labels: Option<pb::HostLabels>) -> Labels {
    let labels = labels.unwrap_or_default();
    Labels {
        region: labels.region,
        zone: labels.zone,
        environment: labels.environment,
    }
}

pub fn host(host: &HostRecord, connected: bool, last_health: Option<pb::HealthReport>) -> pb::Host {
    pb::Host {
        host_id: host.host_id.clone(),
        labels: Some(labels(&host.labels)),
        services: host.services.clone(),
        agent_version: host.agent_version.clone(),
        connected,
        registered_at_ms: host.registered_at_ms,
        last_health,
        identity: host.identity.clone(),
        last_offline: host.last_offline.clone().unwrap_or_default(),
    }
}

pub fn policy(policy: &HealthPolicy) -> pb::HealthPolicy {
    pb::HealthPolicy {
        max_probe_failure_ratio: policy.max_probe_failure_ratio,
        for_s: policy.for_s,
        watch_s: policy.watch_s,
        auto_rollback: policy.auto_rollback,
        conditions: policy.conditions.iter().map(condition).collect(),
    }
}

pub fn condition(condition: &PolicyCondition) -> pb::PolicyCondition {
    pb::PolicyCondition {
        figure: pb::HealthFigure::from(condition.figure).into(),
        threshold: condition.threshold,
        relative_to_baseline: condition.relative_to_baseline,
        for_s: condition.for_s,
    }
}

pub fn service(service: &ServiceRecord) -> pb::Service {
    pb::Service {
        name: service.name.clone(),
        depends_on: service.depends_on.clone(),
        policy: Some(policy(&service.policy)),
        synthetics: service
            .synthetics
            .iter()
            .map(|check| pb::SyntheticCheck {
                name: check.name.clone(),
                url: check.url.clone(),
                method: check.method.clone(),
                body: check.body.clone(),
                expect_status: u32::from(check.expect_status),
                body_contains: check.body_contains.clone(),
                max_latency_ms: check.max_latency_ms,
            })
            .collect(),
        rollback_steps: recipe_texts(&service.rollback_steps),
        rto_s: service.rto_s,
        freeze_windows: service
            .freeze
            .iter()
            .map(|window| window.text.clone())
            .collect(),
        drift_policy: service.drift_policy.name().to_string(),
        isolate_after_failures: service.isolate_after_failures,
    }
}

fn recipe_texts(recipe: &[crate::recipe::RecipeStep]) -> Vec<String> {
    recipe.iter().map(ToString::to_string).collect()
}

pub fn migration(migration: &MigrationRecord, with_scripts: bool) -> pb::Migration {
    let script = |text: &String| {
        if with_scripts {
            text.clone()
        } else {
            String::new()
        }
    };
    pb::Migration {
        database: migration.database.clone(),
        version: migration.version.clone(),
        class: match migration.class {
            MigrationClass::Expand => pb::MigrationClass::Expand,
            MigrationClass::Contract => pb::MigrationClass::Contract,
            MigrationClass::Data => pb::MigrationClass::Data,
        }
        .into(),
        up_sql: script(&migration.up_sql),
        down_sql: script(&migration.down_sql),
        verify_sql: script(&migration.verify_sql),
        checksum: migration.checksum.clone(),
        registered_at_ms: migration.registered_at_ms,
        registered_by: migration.registered_by.clone(),
    }
}

pub fn release(release: &ReleaseRecord) -> pb::Release {
    pb::Release {
        service: release.service.clone(),
        version: release.version.clone(),
        artifact_digest: release.artifact_digest.clone(),
        commit: release.commit.clone(),
        registered_at_ms: release.registered_at_ms,
        api_version: release.api_version,
        requires: release
            .requires
            .iter()
            .map(|(service, version)| (service.clone(), *version))
            .collect(),
        produces: release.produces.clone().into_iter().collect(),
        consumes: release.consumes.clone().into_iter().collect(),
    }
}

pub fn aggregate(aggregate: &HealthAggregate) -> pb::HealthAggregate {
    pb::HealthAggregate {
        probe_failure_ratio: aggregate.probe_failure_ratio,
        samples: aggregate.samples,
        hosts_reporting: aggregate.hosts_reporting,
        error_ratio: aggregate.error_ratio,
        p99_latency_ms: aggregate.p99_latency_ms,
        requests: aggregate.requests,
        scrape_failures: aggregate.scrape_failures,
    }
}

pub fn step_state(status: StepStatus) -> pb::StepState {
    match status {
        StepStatus::Pending => pb::StepState::Pending,
        StepStatus::Running => pb::StepState::Running,
        StepStatus::Succeeded => pb::StepState::Succeeded,
        StepStatus::Failed => pb::StepState::Failed,
        StepStatus::Skipped => pb::StepState::Skipped,
    }
}

pub fn change(change: &ChangeRecord) -> pb::Change {
    let state = match change.status {
        ChangeStatus::Capturing => pb::ChangeState::Capturing,
        ChangeStatus::Deploying => pb::ChangeState::Deploying,
        ChangeStatus::Deployed => pb::ChangeState::Deployed,
        ChangeStatus::Failed => pb::ChangeState::Failed,
        ChangeStatus::RolledBack => pb::ChangeState::RolledBack,
    };
    pb::Change {
        schema: change
            .schema
            .iter()
            .map(|stage| {
                let when = if stage.after_activation {
                    "after activation"
                } else {
                    "before activation"
                };
                let txn = if stage.txn == 0 {
                    "not begun".to_string()
                } else {
                    schema_txn_id(stage.txn)
                };
                format!(
                    "{}: {} ({when}) -> {txn}",
                    stage.database,
                    stage.versions.join(", ")
                )
            })
            .collect(),
        change_id: change.id(),
        archived_at_ms: 0,
        drill_id: if change.drill == 0 {
            String::new()
        } else {
            fire_drill_id(change.drill)
        },
        service: change.service.clone(),
        version: change.version.clone(),
        previous_version: change.previous_version.clone(),
        state: state.into(),
        hosts: change
            .hosts
            .iter()
            .map(|host| pb::ChangeHost {
                host_id: host.host_id.clone(),
                snapshot_id: host.snapshot_id.clone(),
                capture: step_state(host.capture.status).into(),
                activate: step_state(host.activate.status).into(),
                self_reverted: host
                    .self_reverted
                    .as_ref()
                    .map(|note| {
                        format!(
                            "{} at {} ms: {}: {}; {}",
                            note.id,
                            note.at_ms,
                            if note.ok { "reverted" } else { "failed" },
                            note.evidence,
                            note.detail
                        )
                    })
                    .unwrap_or_default(),
            })
            .collect(),
        baseline: Some(aggregate(&change.baseline)),
        started_at_ms: change.started_at_ms,
        deployed_at_ms: change.deployed_at_ms,
        started_by: change.started_by.clone(),
        reason: change.reason.clone(),
        rollback_id: if change.rollback == 0 {
            String::new()
        } else {
            rollback_id(change.rollback)
        },
        environment: change.environment.clone(),
        approved_by: change.approved_by.clone(),
        request_id: if change.request == 0 {
            String::new()
        } else {
            crate::state_machine::request_id(change.request)
        },
        break_glass: change.break_glass,
        flags: change
            .flags
            .iter()
            .map(|flag| pb::FlagChange {
                name: flag.name.clone(),
                before: match flag.before {
                    Some(true) => "on",
                    Some(false) => "off",
                    None => "unset",
                }
                .into(),
            })
            .collect(),
    }
}

pub fn flag(key: [&str; 3], record: &FlagRecord) -> pb::Flag {
    let [environment, service, name] = key;
    pb::Flag {
        environment: environment.to_string(),
        service: service.to_string(),
        name: name.to_string(),
        enabled: record.enabled,
        killed: record.killed,
        updated_at_ms: record.updated_at_ms,
        updated_by: record.updated_by.clone(),
        reason: record.reason.clone(),
    }
}

pub fn plan_options(options: &PlanOptions) -> pb::PlanOptions {
    pb::PlanOptions {
        max_parallel: options.max_parallel,
        max_unavailable: options.max_unavailable,
        canary_region: options.canary_region.clone(),
        force: options.force,
        revert_expand: options.revert_expand,
        accept_data_loss: options.accept_data_loss.clone(),
        schema_after_waves: options.schema_after_waves,
        overwrite_drift: options.overwrite_drift,
        exclude_hosts: options.exclude_hosts.clone(),
        gate: Some(pb::GateOptions {
            settle_s: options.gate.settle_s,
            settle_ms: options.gate.settle_ms,
            timeout_s: options.gate.timeout_s,
            tolerance: options.gate.tolerance,
            zero_tolerance: options.gate.tolerance == 0.0,
            latency_tolerance: options.gate.latency_tolerance,
            zero_latency_tolerance: options.gate.latency_tolerance == 0.0,
        }),
    }
}

/// Rollback as the API shows it, with the first page of its steps (see [`rollback_page`]).
pub fn rollback(state: &State, rollback: &RollbackRecord) -> pb::Rollback {
    rollback_page(state, rollback, 0, DEFAULT_STEPS_PAGE)
}

/// Rollback as the API shows it with its steps from index `from` on: at most `page_size` of
/// them, cut where the whole message passes [`MAX_ROLLBACK_BYTES`] (one step always fits:
/// each is bounded). `steps_total` tells whether more follow. Only the page is converted, so
/// an answer costs its page, not the fleet.
pub fn rollback_page(
    state: &State,
    rollback: &RollbackRecord,
    from: usize,
    page_size: usize,
) -> pb::Rollback {
    let mut view = rollback_without_steps(state, rollback);
    let mut bytes = prost::Message::encoded_len(&view);
    for step in rollback.steps.iter().skip(from).take(page_size) {
        let step = rollback_step(rollback, step);
        bytes += repeated_bytes(std::slice::from_ref(&step));
        if bytes > MAX_ROLLBACK_BYTES && !view.steps.is_empty() {
            break;
        }
        view.steps.push(step);
    }
    view
}

/// One of `rollback`'s steps as the API shows it.
pub fn rollback_step(rollback: &RollbackRecord, step: &RollbackStepRecord) -> pb::RollbackStep {
    pb::RollbackStep {
        step_id: StepTarget::Rollback {
            rollback: rollback.number,
            service: step.service.clone(),
            host_id: step.host_id.clone(),
            kind: step.kind,
        }
        .step_id(),
        host_id: step.host_id.clone(),
        kind: step.kind.name().into(),
        state: step_state(step.progress.status).into(),
        attempts: step.progress.attempts,
        started_at_ms: step.progress.started_at_ms,
        finished_at_ms: step.progress.finished_at_ms,
        detail: step.progress.detail.clone(),
        wave: step.wave,
        service: step.service.clone(),
    }
}

/// Rollback as the API shows it with no steps (`steps_total` still counts them).
pub fn rollback_without_steps(state: &State, rollback: &RollbackRecord) -> pb::Rollback {
    let status = match rollback.status {
        RollbackStatus::Running => pb::RollbackState::Running,
        RollbackStatus::Paused => pb::RollbackState::Paused,
        RollbackStatus::Succeeded => pb::RollbackState::Succeeded,
        RollbackStatus::Failed => pb::RollbackState::Failed,
        RollbackStatus::Aborted => pb::RollbackState::Aborted,
    };
    let change_ids: Vec<String> = rollback.changes.iter().map(|&n| change_id(n)).collect();
    pb::Rollback {
        rollback_id: rollback.id(),
        change_id: change_ids.first().cloned().unwrap_or_default(),
        service: rollback.services.first().cloned().unwrap_or_default(),
        state: status.into(),
        trigger: match rollback.trigger {
            Trigger::Manual => "manual".into(),
            Trigger::Automatic => "automatic".into(),
        },
        reason: rollback.reason.clone(),
        started_by: rollback.started_by.clone(),
        started_at_ms: rollback.started_at_ms,
        finished_at_ms: rollback.finished_at_ms,
        max_parallel: rollback.options.max_parallel,
        steps: Vec::new(),
        steps_total: rollback.steps.len() as u32,
        outcome_detail: rollback.outcome_detail.clone(),
        failed_hosts: rollback.failed_hosts.clone(),
        archived_at_ms: 0,
        change_ids,
        services: rollback.services.clone(),
        options: Some(plan_options(&rollback.options)),
        plan_hash: rollback.plan_hash.clone(),
        waves: rollback
            .waves
            .iter()
            .map(|wave| pb::RollbackWave {
                service: wave.service.clone(),
                change_id: change_id(wave.change),
                region: wave.region.clone(),
                canary: wave.canary,
                hosts: wave.hosts.clone(),
                gate: step_state(wave.gate.status).into(),
                gate_detail: wave.gate.detail.clone(),
                gate_started_at_ms: wave.gate.started_at_ms,
                gate_finished_at_ms: wave.gate.finished_at_ms,
                isolation: wave.isolation,
            })
            .collect(),
        forced: rollback.forced.clone(),
        paused_reason: rollback.paused_reason.clone(),
        escalations: rollback
            .escalations
            .iter()
            .filter_map(|id| state.escalations.get(id))
            .map(|escalation| pb::Escalation {
                opened_at_ms: escalation.opened_at_ms,
                wave: escalation.wave,
                evidence: escalation.evidence.clone(),
                delivery_attempts: escalation.attempts,
                delivered: escalation.delivered,
                delivery_detail: escalation.delivery_detail.clone(),
            })
            .collect(),
        skipped_hosts: rollback.skipped_hosts.clone(),
        deferred_hosts: rollback.deferred_hosts.clone(),
        drill_id: rollback
            .changes
            .iter()
            .filter_map(|number| state.changes.get(number))
            .find(|change| change.drill != 0)
            .map(|change| fire_drill_id(change.drill))
            .unwrap_or_default(),
        current_wave: rollback
            .current_wave()
            .unwrap_or(rollback.waves.len() as u32),
        flags_reverted: rollback.flags_reverted.clone(),
        isolated: rollback.isolated.clone(),
        schema: rollback
            .schema
            .iter()
            .map(|stage| schema_stage(state, stage))
            .collect(),
        approved_by: rollback.approved_by.clone(),
        request_id: if rollback.request == 0 {
            String::new()
        } else {
            request_id(rollback.request)
        },
        break_glass: rollback.break_glass,
    }
}

/// Pending past its time: it reads as expired (the log records that at the next decision).
pub fn is_overdue(request: &ApprovalRequest) -> bool {
    request.status == RequestStatus::Pending
        && rewind_shared::time::now_ms() > request.expires_at_ms
}

fn approval(approval: &Approval) -> pb::Approval {
    pb::Approval {
        identity: approval.identity.clone(),
        at_ms: approval.at_ms,
        reason: approval.reason.clone(),
    }
}

/// A request for approval. A pending one past its time reads as expired (the log records that
/// at the next decision), and says whether its plan is still the one requested.
/// `plan_now` is filled only when `check_plan` (it builds the plan: one request at a time, not
/// under a list).
pub fn approval_request(
    state: &State,
    request: &ApprovalRequest,
    check_plan: bool,
) -> pb::ApprovalRequest {
    let overdue = is_overdue(request);
    let (status, detail) = if overdue {
        (
            RequestStatus::Expired.name(),
            format!(
                "expired with {} of {} approvals",
                request.approvals.len(),
                request.needed
            ),
        )
    } else {
        (request.status.name(), request.detail.clone())
    };
    let plan_now = if check_plan && request.status == RequestStatus::Pending && !overdue {
        crate::state_machine::approvals::plan_drift(state, request).unwrap_or_default()
    } else {
        String::new()
    };
    pb::ApprovalRequest {
        request_id: request.id(),
        status: status.into(),
        detail,
        requester: request.requester.clone(),
        trigger: match request.trigger {
            Trigger::Manual => "manual".into(),
            Trigger::Automatic => "automatic".into(),
        },
        reason: request.reason.clone(),
        change_ids: request.changes.iter().map(|&n| change_id(n)).collect(),
        services: request.services.clone(),
        environments: request.environments.clone(),
        plan_hash: request.plan_hash.clone(),
        plan: request.plan.clone(),
        approvals_needed: request.needed,
        approvals: request.approvals.iter().map(approval).collect(),
        created_at_ms: request.created_at_ms,
        expires_at_ms: request.expires_at_ms,
        decided_at_ms: request.decided_at_ms,
        rollback_id: if request.rollback == 0 {
            String::new()
        } else {
            rollback_id(request.rollback)
        },
        break_glass: request.break_glass,
        review: request.review.as_ref().map(approval),
        plan_now,
        kind: if request.deploy.is_some() {
            "deploy".into()
        } else {
            "rollback".into()
        },
        change_id: if request.change == 0 {
            String::new()
        } else {
            change_id(request.change)
        },
    }
}

/// "orders-db: 0003, 0002 (revert) -> st-4 done, committed and verified".
fn schema_stage(state: &State, stage: &SchemaStage) -> String {
    let direction = match (stage.down, stage.after_activation) {
        (true, false) => "revert, before the app waves",
        (true, true) => "revert",
        (false, _) => "apply",
    };
    let mut text = format!(
        "{}: {} ({direction})",
        stage.database,
        stage.versions.join(", ")
    );
    match state.schema_txns.get(&stage.txn) {
        None => text += ": not begun",
        Some(txn) => {
            text += &format!(" -> {} {}", txn.id(), schema_status(txn));
            if !txn.detail.is_empty() {
                text += &format!(": {}", txn.detail);
            }
        }
    }
    text
}

fn schema_status(txn: &SchemaTxnRecord) -> &'static str {
    match txn.status {
        SchemaTxnStatus::Checking => "checking",
        SchemaTxnStatus::Preparing => "preparing",
        SchemaTxnStatus::Resolving => "resolving",
        SchemaTxnStatus::Verifying => "verifying",
        SchemaTxnStatus::Done => "done",
    }
}

pub fn schema_txn(txn: &SchemaTxnRecord, detailed: bool) -> pb::SchemaTxn {
    let owner = match txn.owner {
        SchemaOwner::Change { change, .. } => change_id(change),
        SchemaOwner::Rollback { rollback, .. } => rollback_id(rollback),
        SchemaOwner::Drill { drill, .. } => drill_id(drill),
    };
    let (decision, decision_reason) = match &txn.decision {
        None => (String::new(), String::new()),
        Some(decision) => (
            if decision.commit { "commit" } else { "abort" }.to_string(),
            decision.reason.clone(),
        ),
    };
    pb::SchemaTxn {
        txn_id: txn.id(),
        database: txn.database.clone(),
        environment: txn.environment.clone(),
        direction: if txn.down { "revert" } else { "apply" }.into(),
        versions: txn.migrations.clone(),
        owner,
        status: schema_status(txn).into(),
        decision,
        decision_reason,
        committed: txn.committed,
        verified: txn.verified,
        detail: txn.detail.clone(),
        fingerprint_before: txn.fingerprint_before.clone(),
        expected_fingerprint: txn.expected_fingerprint.clone(),
        accept_data_loss: txn.accept_data_loss.clone(),
        started_at_ms: txn.started_at_ms,
        finished_at_ms: txn.finished_at_ms,
        shards: txn
            .shards
            .iter()
            .map(|shard| pb::SchemaShard {
                host_id: shard.host_id.clone(),
                steps: ShardPhase::ALL
                    .into_iter()
                    .map(|phase| {
                        let progress = shard.step(phase);
                        pb::RollbackStep {
                            step_id: StepTarget::Schema {
                                txn: txn.number,
                                phase,
                                host_id: shard.host_id.clone(),
                            }
                            .step_id(),
                            host_id: shard.host_id.clone(),
                            kind: phase.name().into(),
                            state: step_state(progress.status).into(),
                            attempts: progress.attempts,
                            started_at_ms: progress.started_at_ms,
                            finished_at_ms: progress.finished_at_ms,
                            detail: progress.detail.clone(),
                            wave: 0,
                            service: txn.database.clone(),
                        }
                    })
                    .collect(),
                version_before: shard.before.version.clone(),
                fingerprint_before: shard.before.fingerprint.clone(),
                version_after: shard.after.version.clone(),
                fingerprint_after: shard.after.fingerprint.clone(),
                data_loss: shard.before.data_loss.clone(),
                exported: shard.prepared.exported.clone(),
                statements: if detailed {
                    shard
                        .prepared
                        .statements
                        .iter()
                        .map(|log| pb::StatementLog {
                            script: log.script.clone(),
                            statement: log.statement.clone(),
                            rows: log.rows,
                        })
                        .collect()
                } else {
                    Vec::new()
                },
                in_doubt: shard.after.in_doubt.clone(),
            })
            .collect(),
    }
}

/// Why a rollback's schema revert runs before or after its app waves.
fn placement(state: &State, stage: &SchemaStage) -> String {
    if !stage.after_activation {
        return "before the app waves: contract or data migrations, and the release the waves \
                restore needs what they removed"
            .into();
    }
    let all_expand = stage.versions.iter().all(|version| {
        state
            .migrations
            .get(&stage.database)
            .and_then(|versions| versions.get(version))
            .is_some_and(|migration| migration.class == MigrationClass::Expand)
    });
    if all_expand {
        "after the app waves: expand migrations, and the release being reverted needs what they \
         added until its hosts are reverted"
            .into()
    } else if state.cluster_version() < crate::state_machine::version::SCHEMA_ORDER_BY_CLASS {
        format!(
            "after the app waves: at cluster version {} every revert runs after them (9 reverts \
             contract and data migrations first)",
            state.cluster_version()
        )
    } else {
        "after the app waves: a migration applied after it on this database is reverted only \
         then or stays, or --schema-after-waves was asked (see the notes)"
            .into()
    }
}

pub fn plan(
    state: &State,
    plan: &crate::plan::Plan,
    readiness: &crate::plan::Readiness,
) -> pb::RollbackPlan {
    pb::RollbackPlan {
        change_ids: plan.changes.iter().map(|&n| change_id(n)).collect(),
        services: plan.services.clone(),
        options: Some(plan_options(&plan.options)),
        waves: plan
            .waves
            .iter()
            .map(|wave| pb::PlannedWave {
                service: wave.service.clone(),
                change_id: change_id(wave.change),
                region: wave.region.clone(),
                canary: wave.canary,
                batches: wave
                    .batches
                    .iter()
                    .map(|hosts| pb::HostBatch {
                        hosts: hosts.clone(),
                    })
                    .collect(),
            })
            .collect(),
        steps_per_host: plan
            .steps_per_host
            .iter()
            .map(|kind| kind.name().to_string())
            .collect(),
        recipes: plan
            .recipes
            .iter()
            .map(|(service, recipe)| pb::ServiceRecipe {
                service: service.clone(),
                steps: recipe_texts(recipe),
            })
            .collect(),
        incompatibilities: plan
            .incompatibilities
            .iter()
            .map(|problem| problem.detail.clone())
            .collect(),
        notes: plan.notes.clone(),
        schema: plan
            .schema
            .iter()
            .map(|stage| pb::PlannedSchemaRevert {
                database: stage.database.clone(),
                // Each stage names the change whose migrations it reverts (two changes' stages
                // on one database may alternate) and that change's environment.
                change_id: change_id(stage.change),
                versions: stage.versions.clone(),
                expected_fingerprint: stage.expected_fingerprint.clone(),
                shards: crate::state_machine::schema::shards_of(
                    state,
                    &stage.database,
                    &stage.environment,
                ),
                before_app_waves: !stage.after_activation,
                placement: placement(state, stage),
            })
            .collect(),
        plan_hash: plan.hash.clone(),
        disconnected_hosts: readiness.disconnected_hosts.clone(),
        missing_releases: readiness.missing_releases.clone(),
        missing_artifacts: readiness.missing_artifacts.clone(),
        drifted_hosts: readiness.drifted_hosts.clone(),
        expected_duration_ms: readiness.expected_duration_ms,
        estimate: Some(pb::DurationEstimate {
            p50_ms: readiness.estimate.p50_ms,
            p90_ms: readiness.estimate.p90_ms,
            rto_ms: readiness.estimate.rto_ms,
            rto_service: readiness.estimate.rto_service.clone(),
            fits: readiness.estimate.fits(),
            suggested_max_parallel: readiness.estimate.suggested_max_parallel,
            basis: readiness.estimate.basis.clone(),
            verdict: readiness.estimate.verdict.clone(),
        }),
        runnable: plan.incompatibilities.is_empty() || plan.options.force,
        flags: plan.flags.clone(),
    }
}

pub fn audit_entry(entry: &AuditEntry) -> pb::AuditEntry {
    entry.into()
}

/// The newest `limit` trigger records of services (environment, service) that `visible`
/// admits, oldest first, and the breaker.
pub fn triggers(
    state: &State,
    limit: usize,
    visible: impl Fn(&str, &str) -> bool,
) -> pb::ListTriggersResponse {
    let mut newest: Vec<_> = state
        .triggers
        .iter()
        .rev()
        .filter(|record| visible(&record.environment, &record.service))
        .take(limit)
        .collect();
    newest.reverse();
    pb::ListTriggersResponse {
        triggers: newest
            .into_iter()
            .map(|record| pb::TriggerEvent {
                at_ms: record.at_ms,
                service: record.service.clone(),
                environment: record.environment.clone(),
                source: record.source.name().into(),
                reason: record.reason.clone(),
                outcome: record.outcome.name().into(),
                detail: record.detail.clone(),
                rollback_id: if record.rollback == 0 {
                    String::new()
                } else {
                    rollback_id(record.rollback)
                },
                change_id: if record.change == 0 {
                    String::new()
                } else {
                    change_id(record.change)
                },
            })
            .collect(),
        breaker_open: state.breaker.is_some(),
        breaker_tripped_at_ms: state
            .breaker
            .as_ref()
            .map_or(0, |breaker| breaker.tripped_at_ms),
        breaker_services: state
            .breaker
            .as_ref()
            .map(|breaker| breaker.services.clone())
            .unwrap_or_default(),
    }
}

pub fn drill(state: &State, drill: &DrillRecord) -> pb::Drill {
    pb::Drill {
        drill_id: drill.id(),
        change_id: change_id(drill.change),
        environment: drill.environment.clone(),
        status: match drill.status {
            DrillStatus::Running => "running",
            DrillStatus::Passed => "passed",
            DrillStatus::Failed => "failed",
        }
        .into(),
        detail: drill.detail.clone(),
        started_by: drill.started_by.clone(),
        started_at_ms: drill.started_at_ms,
        finished_at_ms: drill.finished_at_ms,
        steps: drill
            .stages
            .iter()
            .filter_map(|stage| state.schema_txns.get(&stage.txn))
            .map(|txn| schema_txn(txn, false))
            .collect(),
    }
}

/// A rollback fire drill, with its service's previous scored drill in the same environment.
pub fn fire_drill(state: &State, drill: &FireDrillRecord) -> pb::RollbackDrill {
    let rollback = state
        .changes
        .get(&drill.change)
        .map_or(0, |change| change.rollback);
    let rollback = drill
        .scorecard
        .as_ref()
        .map_or(rollback, |card| card.rollback.max(rollback));
    let previous = drill
        .scorecard
        .as_ref()
        .map(|card| card.previous)
        .filter(|&number| number != 0)
        .and_then(|number| state.fire_drills.get(&number));
    pb::RollbackDrill {
        drill_id: drill.id(),
        service: drill.service.clone(),
        environment: drill.environment.clone(),
        version: drill.version.clone(),
        previous_version: drill.previous_version.clone(),
        change_id: change_id(drill.change),
        rollback_id: if rollback == 0 {
            String::new()
        } else {
            rollback_id(rollback)
        },
        state: drill.status.name().to_string(),
        reason: drill.reason.clone(),
        started_by: drill.started_by.clone(),
        started_at_ms: drill.started_at_ms,
        finished_at_ms: drill.finished_at_ms,
        outcome: drill.outcome.clone(),
        aborted_by: drill.aborted_by.clone(),
        scorecard: drill.scorecard.as_ref().map(scorecard),
        previous_drill_id: previous.map(FireDrillRecord::id).unwrap_or_default(),
        previous_scorecard: previous
            .and_then(|previous| previous.scorecard.as_ref())
            .map(scorecard),
    }
}

fn scorecard(card: &Scorecard) -> pb::DrillScorecard {
    pb::DrillScorecard {
        detected: card.detected,
        live_at_ms: card.live_at_ms,
        detect_ms: card.detect_ms,
        first_reverted_ms: card.first_reverted_ms,
        all_verified_ms: card.all_verified_ms,
        gates_passed: card.gates_passed,
        gates: card.gates,
        steps_retried: card.steps_retried,
        escalations: card.escalations,
        rto_s: card.rto_s,
    }
}
