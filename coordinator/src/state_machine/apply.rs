//! `apply()`: the pure transition function of the replicated state.
//!
//! No clock, no randomness, no I/O: everything comes from the command. A rejected command changes
//! nothing (each handler checks before it mutates) except `applied_index`.

use super::approvals;
use super::command::{Command, CommandKind, MembershipChange, Outcome, RollbackAction, StepTarget};
use super::state::*;
use super::version;
use crate::errors::{CoordinatorError, known_list};

type Result<T> = std::result::Result<T, CoordinatorError>;

/// Identity used for the engine's own commands.
pub const COORDINATOR_IDENTITY: &str = "coordinator";

/// Applies the command at log position `index`.
pub fn apply(state: &mut State, index: u64, command: &Command) -> Result<Outcome> {
    if let CommandKind::ChangeMembership { .. } = command.kind {
        state.applied_index = index;
        return Err(CoordinatorError::invalid(
            "command",
            "a membership change travels only as a Raft configuration change",
        ));
    }
    record(state, index, command, apply_kind)
}

/// Applies the membership command carried by the Raft conf change at `index` (Raft has changed
/// its own voters already): the member registry follows, and the audit log records who asked.
pub fn apply_membership(state: &mut State, index: u64, command: &Command) -> Result<Outcome> {
    record(state, index, command, |state, command| {
        let CommandKind::ChangeMembership {
            change,
            member,
            reason,
        } = &command.kind
        else {
            return Err(CoordinatorError::invalid(
                "command",
                format!("a conf change carried {:?}", command.kind.action()),
            ));
        };
        match change {
            MembershipChange::AddLearner | MembershipChange::Promote => {
                state.members.insert(member.id, member.clone());
            }
            MembershipChange::Remove => {
                state.members.remove(&member.id);
            }
        }
        Ok((
            Outcome::Done,
            format!("member-{}", member.id),
            format!(
                "ok: {} in {} ({}): {reason}",
                member.address, member.region, member.name
            ),
        ))
    })
}

/// Runs `kind_apply` unless the request was seen before, then audits and remembers it.
fn record(
    state: &mut State,
    index: u64,
    command: &Command,
    kind_apply: impl FnOnce(&mut State, &Command) -> Result<(Outcome, String, String)>,
) -> Result<Outcome> {
    state.applied_index = index;
    let request_key = request_key(command);
    if let Some(outcome) = request_key
        .as_deref()
        .and_then(|key| state.requests.get(key))
    {
        return Ok(outcome.clone());
    }
    let (outcome, target, audit_outcome) = kind_apply(state, command)?;
    state.audit.append(
        command.at_ms,
        &command.identity,
        command.kind.action(),
        &target,
        &audit_outcome,
    );
    if let Some(key) = request_key {
        let fair = state.cluster_version() >= 2;
        state.requests.remember(&key, outcome.clone(), fair);
    }
    Ok(outcome)
}

/// Request ids are the client's own, so they are scoped by who sent them.
fn request_key(command: &Command) -> Option<String> {
    (!command.request_id.is_empty()).then(|| format!("{}/{}", command.identity, command.request_id))
}

/// Returns the outcome, the audit target and the audit outcome text.
fn apply_kind(state: &mut State, command: &Command) -> Result<(Outcome, String, String)> {
    let at_ms = command.at_ms;
    match &command.kind {
        CommandKind::RegisterHost {
            host_id,
            labels,
            services,
            agent_version,
        } => {
            super::join_tokens::check_enrollment(&state.enrollments, host_id, &labels.environment)?;
            if state.cluster_version() >= 2 {
                check_service_pin(state, host_id, services)?;
            }
            let host = HostRecord {
                host_id: host_id.clone(),
                labels: labels.clone(),
                services: services.clone(),
                agent_version: agent_version.clone(),
                identity: command.identity.clone(),
                registered_at_ms: at_ms,
                last_offline: state
                    .hosts
                    .get(host_id)
                    .and_then(|known| known.last_offline.clone()),
            };
            state.hosts.insert(host_id.clone(), host);
            Ok((
                Outcome::Done,
                host_id.clone(),
                format!("ok: services {}", services.join(",")),
            ))
        }
        CommandKind::ForgetHost {
            host_id,
            release_name,
            reason,
        } => {
            version::require(state, 2, "host.forget")?;
            forget_host(state, host_id, *release_name, reason)
        }
        CommandKind::PutService { service } => {
            check_no_cycle(state, service)?;
            state.services.insert(service.name.clone(), service.clone());
            Ok((Outcome::Done, service.name.clone(), "ok".into()))
        }
        CommandKind::RegisterRelease { release } => register_release(state, release, at_ms),
        CommandKind::RegisterMigration { migration } => {
            register_migration(state, migration, &command.identity, at_ms)
        }
        CommandKind::StartChange { .. } => request_change(state, command),
        CommandKind::SetFlag {
            environment,
            service,
            name,
            enabled,
            kill,
            reason,
        } => {
            require_service(state, service)?;
            if *kill && *enabled {
                return Err(CoordinatorError::invalid(
                    "enabled",
                    "a kill switch turns a flag off",
                ));
            }
            state.put_flag(
                [environment, service, name],
                FlagRecord {
                    enabled: *enabled,
                    killed: *kill,
                    updated_at_ms: at_ms,
                    updated_by: command.identity.clone(),
                    reason: reason.to_string(),
                    changed_at_index: 0,
                    by_change: 0,
                },
            );
            Ok((
                Outcome::Done,
                format!("{environment}/{service}/{name}"),
                format!("ok: {}: {reason}", if *enabled { "on" } else { "off" }),
            ))
        }
        CommandKind::StepStarted { step } => start_step(state, step, at_ms),
        CommandKind::StartSchemaTxn { owner } => start_schema_txn(state, command, *owner),
        CommandKind::StartDrill {
            change,
            environment,
        } => {
            let (number, summary) =
                super::schema::start_drill(state, *change, environment, &command.identity, at_ms)?;
            Ok((
                Outcome::Drill(number),
                drill_id(number),
                format!("ok: {} on {environment}: {summary}", change_id(*change)),
            ))
        }
        CommandKind::DecideSchemaTxn {
            txn,
            commit,
            reason,
        } => {
            let outcome = super::schema::decide(state, *txn, *commit, reason, at_ms)?;
            settle_schema_owner(state, *txn, at_ms);
            Ok((Outcome::Done, schema_txn_id(*txn), format!("ok: {outcome}")))
        }
        CommandKind::SchemaStepFinished {
            step,
            ok,
            detail,
            report,
        } => finish_schema_step(state, step, *ok, detail, report.clone(), at_ms),
        CommandKind::StepFinished {
            step,
            ok,
            detail,
            snapshot_id,
        } => finish_step(state, step, *ok, detail, snapshot_id, at_ms),
        CommandKind::StartRollback {
            changes,
            options,
            plan_hash,
            reason,
            trigger,
            break_glass,
        } => request_rollback(
            state,
            command,
            changes,
            options,
            plan_hash,
            reason,
            *trigger,
            *break_glass,
        ),
        CommandKind::DecideRequest {
            request,
            decision,
            plan_hash,
            reason,
            baseline,
        } => decide_request(
            state, command, *request, *decision, plan_hash, reason, *baseline,
        ),
        CommandKind::SkipHost {
            rollback,
            host_id,
            reason,
        } => skip_host(state, *rollback, host_id, reason, at_ms),
        CommandKind::ResolvedByHand {
            txn,
            host_id,
            reason,
        } => {
            super::schema::resolved_by_hand(state, *txn, host_id, reason, &command.identity)?;
            super::schema::settle(state, *txn, at_ms);
            settle_schema_owner(state, *txn, at_ms);
            Ok((
                Outcome::Done,
                format!("{}/resolve/{host_id}", schema_txn_id(*txn)),
                format!("ok: {reason}"),
            ))
        }
        CommandKind::RecordSelfRevert { host_id, report } => {
            record_self_revert(state, host_id, report)
        }
        CommandKind::RecordOfflineHealth { host_id, summary } => {
            let host =
                state
                    .hosts
                    .get_mut(host_id)
                    .ok_or_else(|| CoordinatorError::UnknownHost {
                        host_id: host_id.clone(),
                    })?;
            host.last_offline = Some(summary.clone());
            Ok((Outcome::Done, host_id.clone(), format!("ok: {summary}")))
        }
        CommandKind::IsolateService {
            rollback,
            service,
            reason,
        } => isolate_service(state, *rollback, service, reason, at_ms),
        CommandKind::Stall { rollback, evidence } => {
            let record = live_rollback_mut(state, *rollback, "stall")?;
            if record.status != RollbackStatus::Running {
                return Err(CoordinatorError::RollbackNotControllable {
                    rollback_id: record.id(),
                    status: record.status,
                    action: "stall".into(),
                });
            }
            let wave = record.current_wave().unwrap_or(0);
            let id = record.id();
            pause_for_a_person(state, *rollback, wave, evidence.clone(), at_ms);
            Ok((
                Outcome::Rollback(*rollback),
                id,
                format!("paused: {evidence}"),
            ))
        }
        CommandKind::EscalationDelivered {
            escalation,
            ok,
            detail,
        } => escalation_delivered(state, *escalation, *ok, detail),
        CommandKind::AutoTrigger { .. } => auto_trigger(state, command),
        CommandKind::ResetBreaker { reason } => {
            let Some(breaker) = state.breaker.take() else {
                return Err(CoordinatorError::invalid(
                    "breaker",
                    "the global breaker is not open",
                ));
            };
            Ok((
                Outcome::Done,
                "breaker".into(),
                format!(
                    "ok: closed (open since {} ms for {}): {reason}",
                    breaker.tripped_at_ms,
                    breaker.services.join(", ")
                ),
            ))
        }
        CommandKind::ControlRollback {
            rollback,
            action,
            reason,
        } => control_rollback(state, command, *rollback, *action, reason),
        CommandKind::TransferLeader { to, reason } => Ok((
            Outcome::Done,
            format!("member-{to}"),
            format!("ok: {reason}"),
        )),
        CommandKind::ApplyPolicy {
            policy,
            bootstrap,
            expected_hash,
            reason,
        } => {
            if !policy.host_rules.is_empty() {
                version::require(state, 2, "[[hosts]] rules in the access policy")?;
            }
            apply_policy(state, policy, *bootstrap, expected_hash, reason)
        }
        CommandKind::SetClusterVersion {
            version,
            members,
            reason,
        } => set_cluster_version(state, *version, members, reason),
        CommandKind::RecordRefusal {
            action,
            target,
            reason,
        } => Ok((
            Outcome::Done,
            target.clone(),
            format!("refused: {action}: {reason}"),
        )),
        CommandKind::CreateJoinToken {
            secret_sha256,
            scope,
            reason,
        } => super::join_tokens::create(
            state,
            &command.identity,
            secret_sha256,
            scope,
            reason,
            at_ms,
        ),
        CommandKind::UseJoinToken {
            token,
            secret_sha256,
            kind,
            name,
            key_sha256,
        } => super::join_tokens::use_token(
            state,
            *token,
            secret_sha256,
            kind,
            name,
            key_sha256,
            at_ms,
        ),
        CommandKind::RevokeJoinToken { token, reason } => {
            super::join_tokens::revoke(state, *token, reason)
        }
        CommandKind::CertificateRenewed { not_after_s } => Ok((
            Outcome::Done,
            command.identity.clone(),
            format!("ok: valid until {not_after_s} s"),
        )),
        // Refused by apply(); kept exhaustive so a new kind is not forgotten here.
        CommandKind::ChangeMembership { .. } => Err(CoordinatorError::invalid(
            "command",
            "a membership change travels only as a Raft configuration change",
        )),
    }
}

/// Puts `policy` in force, audited with the hashes before and after and what changed.
fn apply_policy(
    state: &mut State,
    policy: &crate::access::Policy,
    bootstrap: bool,
    expected_hash: &str,
    reason: &str,
) -> Result<(Outcome, String, String)> {
    let before = state.access.policy.clone();
    if bootstrap && before.is_some() {
        // Every member proposes its bootstrap policy when it first leads; the first one wins.
        return Ok((
            Outcome::Done,
            "access-policy".into(),
            "ignored: the cluster has a policy already".into(),
        ));
    }
    let before_hash = before
        .as_ref()
        .map(|policy| policy.hash())
        .unwrap_or_default();
    if !expected_hash.is_empty() && expected_hash != before_hash {
        return Err(CoordinatorError::PolicyChanged {
            expected: expected_hash.to_string(),
            actual: before_hash,
        });
    }
    // Checked again here so no log entry can leave the cluster without an administrator.
    if let Err(problems) = policy.validate() {
        return Err(CoordinatorError::invalid("policy", problems.join("; ")));
    }
    let summary = match &before {
        Some(before) => crate::access::policy::summarize_change(before, policy),
        None => "the first policy".to_string(),
    };
    state.access.policy = Some(std::sync::Arc::new(policy.clone()));
    state.access.version += 1;
    Ok((
        Outcome::Done,
        "access-policy".into(),
        format!(
            "ok: version {}, sha256 {} -> {}: {summary}: {reason}",
            state.access.version,
            if before_hash.is_empty() {
                "none"
            } else {
                &before_hash[..12]
            },
            &policy.hash()[..12],
        ),
    ))
}

fn check_no_cycle(state: &State, service: &ServiceRecord) -> Result<()> {
    // Depth-first walk from the new edges; bounded by the number of services.
    let mut stack: Vec<(String, String)> = service
        .depends_on
        .iter()
        .map(|provider| (provider.clone(), format!("{} -> {provider}", service.name)))
        .collect();
    let mut visited = std::collections::BTreeSet::new();
    while let Some((current, path)) = stack.pop() {
        if current == service.name {
            return Err(CoordinatorError::DependencyCycle {
                service: service.name.clone(),
                path,
            });
        }
        if !visited.insert(current.clone()) {
            continue;
        }
        if let Some(provider) = state.services.get(&current) {
            for next in &provider.depends_on {
                stack.push((next.clone(), format!("{path} -> {next}")));
            }
        }
    }
    Ok(())
}

/// Registers a migration once; the same one again is a no-op, a different one under a version
/// already taken is refused (registered migrations are immutable: give it a new version).
fn register_migration(
    state: &mut State,
    migration: &MigrationRecord,
    identity: &str,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    let target = format!("{}@{}", migration.database, migration.version);
    if migration.down_sql.trim().is_empty() {
        return Err(CoordinatorError::invalid(
            "migration.down_sql",
            format!("{target} has no down script: a migration that cannot be undone is refused"),
        ));
    }
    let checksum = migration_checksum(
        &migration.up_sql,
        &migration.down_sql,
        &migration.verify_sql,
    );
    if migration.checksum != checksum {
        return Err(CoordinatorError::invalid(
            "migration.checksum",
            format!(
                "{target}: {} does not match its scripts ({checksum})",
                migration.checksum
            ),
        ));
    }
    let script_bytes = |record: &MigrationRecord| {
        record.up_sql.len() + record.down_sql.len() + record.verify_sql.len()
    };
    let held: usize = state
        .migrations
        .values()
        .flat_map(|versions| versions.values())
        .map(|record| script_bytes(record))
        .sum();
    let already = state
        .migrations
        .get(&migration.database)
        .is_some_and(|versions| versions.contains_key(&migration.version));
    if !already && held + script_bytes(migration) > MAX_REGISTRY_SCRIPT_BYTES {
        return Err(CoordinatorError::invalid(
            "migration",
            format!(
                "{target}: the registry already holds {held} bytes of scripts and takes at most \
                 {MAX_REGISTRY_SCRIPT_BYTES} (it is replicated state)"
            ),
        ));
    }
    let versions = state
        .migrations
        .entry(migration.database.clone())
        .or_default();
    if let Some(existing) = versions.get(&migration.version) {
        if existing.checksum == migration.checksum && existing.class == migration.class {
            return Ok((Outcome::Done, target, "ok: already registered".into()));
        }
        return Err(CoordinatorError::invalid(
            "migration.version",
            format!(
                "{target} is already registered with checksum {} ({}): a registered migration \
                 never changes; register the new scripts under a new version",
                existing.checksum,
                existing.class.name()
            ),
        ));
    }
    versions.insert(
        migration.version.clone(),
        std::sync::Arc::new(MigrationRecord {
            registered_at_ms: at_ms,
            registered_by: identity.to_string(),
            ..migration.clone()
        }),
    );
    Ok((
        Outcome::Done,
        target,
        format!("ok: {} {}", migration.class.name(), migration.checksum),
    ))
}

fn register_release(
    state: &mut State,
    release: &ReleaseRecord,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    require_service(state, &release.service)?;
    let target = format!("{}@{}", release.service, release.version);
    let versions = state.releases.entry(release.service.clone()).or_default();
    if let Some(existing) = versions.get(&release.version) {
        if existing.artifact_digest == release.artifact_digest && existing.commit == release.commit
        {
            return Ok((Outcome::Done, target, "ok: already registered".into()));
        }
        return Err(CoordinatorError::ReleaseConflict {
            service: release.service.clone(),
            version: release.version.clone(),
            existing: existing.artifact_digest.clone(),
        });
    }
    versions.insert(
        release.version.clone(),
        std::sync::Arc::new(ReleaseRecord {
            registered_at_ms: at_ms,
            ..release.clone()
        }),
    );
    Ok((
        Outcome::Done,
        target,
        format!("ok: {}", release.artifact_digest),
    ))
}

fn start_change(state: &mut State, command: &Command) -> Result<(Outcome, String, String)> {
    let CommandKind::StartChange {
        service,
        version,
        host_ids: requested_hosts,
        reason,
        baseline,
        flags_on,
        migrations,
        break_glass: _,
    } = &command.kind
    else {
        unreachable!("called for StartChange commands only");
    };
    let (service, version, baseline) = (service.as_str(), version.as_str(), *baseline);
    require_release(state, service, version)?;
    if let Some(active) = state.changes.values().find(|change| {
        change.service == service
            && matches!(
                change.status,
                ChangeStatus::Capturing | ChangeStatus::Deploying
            )
    }) {
        return Err(CoordinatorError::ChangeInProgress {
            change_id: active.id(),
            service: service.into(),
            status: active.status,
        });
    }
    if let Some(rollback) = state.rollbacks.values().find(|rollback| {
        rollback.services.iter().any(|name| name == service) && !rollback.status.is_terminal()
    }) {
        let change = rollback
            .waves
            .iter()
            .find(|wave| wave.service == service)
            .map_or(0, |wave| wave.change);
        return Err(CoordinatorError::RollbackInProgress {
            rollback_id: rollback.id(),
            change_id: change_id(change),
            status: rollback.status,
        });
    }
    let host_ids = select_hosts(state, service, requested_hosts)?;
    let environment = crate::plan::environment_of_hosts(state, &host_ids);
    let schema = change_schema_stages(
        state,
        migrations,
        (state.next_change + 1, service),
        &environment,
    )?;
    let previous_version = current_version(state, service);
    state.next_change += 1;
    let number = state.next_change;
    let mut flags = Vec::with_capacity(flags_on.len());
    for name in flags_on {
        let before = state
            .flag(&environment, service, name)
            .map(|flag| flag.enabled);
        flags.push(FlagChangeRecord {
            name: name.clone(),
            before,
        });
        state.put_flag(
            [&environment, service, name],
            FlagRecord {
                enabled: true,
                killed: false,
                updated_at_ms: command.at_ms,
                updated_by: command.identity.clone(),
                reason: format!("turned on by {}", change_id(number)),
                changed_at_index: 0,
                by_change: number,
            },
        );
    }
    let hosts = host_ids
        .iter()
        .map(|host_id| ChangeHostRecord {
            host_id: host_id.clone(),
            snapshot_id: String::new(),
            capture: StepProgress::default(),
            activate: StepProgress::default(),
            self_reverted: None,
        })
        .collect();
    state.changes.insert(
        number,
        ChangeRecord {
            number,
            service: service.to_string(),
            version: version.to_string(),
            previous_version: previous_version.clone(),
            status: ChangeStatus::Capturing,
            hosts,
            baseline,
            started_at_ms: command.at_ms,
            deployed_at_ms: 0,
            started_by: command.identity.clone(),
            reason: reason.to_string(),
            rollback: 0,
            environment,
            flags,
            auto_refused: false,
            schema,
            approved_by: Vec::new(),
            request: 0,
            break_glass: false,
        },
    );
    let mut audit = format!(
        "ok: {service} {previous_version} -> {version} on {}",
        host_ids.join(",")
    );
    if !migrations.is_empty() {
        let named: Vec<String> = migrations
            .iter()
            .map(|(database, version)| format!("{database}@{version}"))
            .collect();
        audit += &format!("; migrations {}", named.join(", "));
    }
    Ok((Outcome::Change(number), change_id(number), audit))
}

/// The service and its release `version` are registered.
fn require_release(state: &State, service: &str, version: &str) -> Result<()> {
    require_service(state, service)?;
    let versions = state.releases.get(service);
    if !versions.is_some_and(|versions| versions.contains_key(version)) {
        return Err(CoordinatorError::UnknownRelease {
            service: service.to_string(),
            version: version.to_string(),
            known: known_list(
                versions
                    .into_iter()
                    .flat_map(|versions| versions.keys().cloned()),
            ),
        });
    }
    Ok(())
}

/// A deploy: started at once where the hosts' environments ask for no approvals; otherwise
/// filed as a request bound to its plan, or run at once by break-glass where allowed.
fn request_change(state: &mut State, command: &Command) -> Result<(Outcome, String, String)> {
    let CommandKind::StartChange {
        service,
        version,
        host_ids: requested_hosts,
        reason,
        baseline,
        flags_on,
        migrations,
        break_glass,
    } = &command.kind
    else {
        unreachable!("called for StartChange commands only");
    };
    require_release(state, service, version)?;
    let spec = approvals::DeploySpec {
        service: service.clone(),
        version: version.clone(),
        previous_version: current_version(state, service),
        requested_hosts: requested_hosts.clone(),
        hosts: select_hosts(state, service, requested_hosts)?,
        flags_on: flags_on.clone(),
        migrations: migrations.clone(),
        baseline: *baseline,
    };
    let requirement = approvals::deploy_requirement(state, &spec);
    if requirement.approvals == 0 {
        return start_change(state, command);
    }
    if !break_glass {
        // What start_change would refuse about its migrations is refused now, not after the
        // approvals (a change or rollback in progress only makes it wait).
        let environment = crate::plan::environment_of_hosts(state, &spec.hosts);
        change_schema_stages(
            state,
            migrations,
            (state.next_change + 1, service),
            &environment,
        )?;
        return approvals::file_deploy(state, command, spec, &requirement, reason);
    }
    if !requirement.break_glass {
        return Err(no_break_glass(&requirement));
    }
    let (outcome, target, audit) = start_change(state, command)?;
    let Outcome::Change(number) = outcome else {
        unreachable!("start_change answers with a change");
    };
    let request =
        approvals::record_break_glass_deploy(state, command, spec, &requirement, reason, number);
    if let Some(change) = state.changes.get_mut(&number) {
        change.break_glass = true;
        change.request = request;
    }
    escalate_break_glass(
        state,
        command,
        &requirement,
        request,
        approvals::Started::Change(number),
        service,
        reason,
    );
    Ok((outcome, target, break_glass_audit(request, &audit)))
}

/// Opens the escalation of a break-glass start (`started`, recorded as `request`); answers the
/// escalation's id.
fn escalate_break_glass(
    state: &mut State,
    command: &Command,
    requirement: &approvals::Requirement,
    request: u64,
    started: approvals::Started,
    service: &str,
    reason: &str,
) -> u64 {
    let review = approvals::request_id(request);
    let evidence = format!(
        "break-glass: {} started {} without the {} approvals {} requires ({review} to review: rewindctl request review {review}): {reason}",
        command.identity,
        started.id(),
        requirement.approvals,
        requirement.environments.join(", "),
    );
    let rollback = match started {
        approvals::Started::Rollback(rollback) => rollback,
        approvals::Started::Change(_) => 0,
    };
    state.escalate(command.at_ms, rollback, 0, service, evidence)
}

/// The audit outcome of a break-glass start.
fn break_glass_audit(request: u64, audit: &str) -> String {
    format!(
        "break-glass ({} to review): {audit}",
        approvals::request_id(request)
    )
}

fn no_break_glass(requirement: &approvals::Requirement) -> CoordinatorError {
    CoordinatorError::invalid(
        "break_glass",
        format!(
            "the policy of {} does not allow break-glass: ask for the {} approvals it requires",
            requirement.environments.join(", "),
            requirement.approvals
        ),
    )
}

pub(super) fn select_hosts(
    state: &State,
    service: &str,
    requested: &[String],
) -> Result<Vec<String>> {
    if requested.is_empty() {
        let hosts: Vec<String> = state
            .hosts
            .values()
            .filter(|host| host.services.iter().any(|name| name == service))
            .map(|host| host.host_id.clone())
            .collect();
        if hosts.is_empty() {
            return Err(CoordinatorError::NoHosts {
                service: service.to_string(),
            });
        }
        return Ok(hosts);
    }
    let mut hosts = Vec::with_capacity(requested.len());
    for host_id in requested {
        let host = state
            .hosts
            .get(host_id)
            .ok_or_else(|| CoordinatorError::UnknownHost {
                host_id: host_id.clone(),
            })?;
        if !host.services.iter().any(|name| name == service) {
            return Err(CoordinatorError::HostWithoutService {
                host_id: host_id.clone(),
                service: service.to_string(),
            });
        }
        if !hosts.contains(host_id) {
            hosts.push(host_id.clone());
        }
    }
    Ok(hosts)
}

/// The version the coordinator believes the service runs: that of its latest deployed change, or
/// what that change replaced if it was rolled back. Empty when unknown.
pub fn current_version(state: &State, service: &str) -> String {
    state
        .changes
        .values()
        .rev()
        .filter(|change| change.service == service)
        .find_map(|change| match change.status {
            ChangeStatus::Deployed => Some(change.version.clone()),
            ChangeStatus::RolledBack => Some(change.previous_version.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn start_step(
    state: &mut State,
    step: &StepTarget,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    let step_id = step.step_id();
    let not_startable = |reason: String| CoordinatorError::StepNotStartable {
        step_id: step_id.clone(),
        reason,
    };
    let progress = match step {
        StepTarget::Capture { change, .. } | StepTarget::Activate { change, .. } => {
            let record = state
                .changes
                .get(change)
                .ok_or_else(|| unknown_change(state, *change))?;
            let wanted = if matches!(step, StepTarget::Capture { .. }) {
                ChangeStatus::Capturing
            } else {
                ChangeStatus::Deploying
            };
            if record.status != wanted {
                return Err(not_startable(format!(
                    "change {} is {}",
                    record.id(),
                    record.status
                )));
            }
            change_step_mut(state, step)?
        }
        StepTarget::Rollback { rollback, .. } | StepTarget::Gate { rollback, .. } => {
            let record = state
                .rollbacks
                .get(rollback)
                .ok_or_else(|| unknown_rollback(state, *rollback))?;
            if record.status != RollbackStatus::Running {
                return Err(not_startable(format!(
                    "rollback {} is {}",
                    record.id(),
                    record.status
                )));
            }
            if let StepTarget::Gate { wave, .. } = step {
                if record.current_wave() != Some(*wave) {
                    return Err(not_startable(format!(
                        "wave {wave} is not the current wave of {}",
                        record.id()
                    )));
                }
                if let Some(unfinished) = record.wave_steps(*wave).find(|step| {
                    step.progress.status != StepStatus::Succeeded
                        && step.progress.status != StepStatus::Skipped
                }) {
                    return Err(not_startable(format!(
                        "{} {} on {} is {}",
                        unfinished.service,
                        unfinished.kind.name(),
                        unfinished.host_id,
                        unfinished.progress.status
                    )));
                }
            }
            rollback_step_mut(state, step)?
        }
        StepTarget::Schema {
            txn,
            phase,
            host_id,
        } => {
            super::schema::startable(state, *txn, *phase)?;
            let progress = super::schema::step_mut(state, *txn, *phase, host_id)?;
            // A resolve that failed is tried again (see `schema::RESOLVE_RETRY_MS`): the
            // shard holds its prepared transaction until one succeeds.
            if *phase == ShardPhase::Resolve && progress.status == StepStatus::Failed {
                progress.status = StepStatus::Pending;
            }
            progress
        }
    };
    if progress.status.is_terminal() {
        return Err(not_startable(format!(
            "it already ended {}",
            progress.status
        )));
    }
    progress.status = StepStatus::Running;
    progress.attempts += 1;
    progress.started_at_ms = at_ms;
    let attempt = progress.attempts;
    Ok((Outcome::Done, step_id, format!("ok: attempt {attempt}")))
}

fn finish_step(
    state: &mut State,
    step: &StepTarget,
    ok: bool,
    detail: &str,
    snapshot_id: &str,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    if let StepTarget::Schema { .. } = step {
        // The engine's timeout of a shard's step: no report.
        return finish_schema_step(state, step, ok, detail, ShardReportRecord::default(), at_ms);
    }
    let step_id = step.step_id();
    let progress = match step {
        StepTarget::Rollback { .. } | StepTarget::Gate { .. } => rollback_step_mut(state, step)?,
        _ => change_step_mut(state, step)?,
    };
    end_step(progress, &step_id, ok, detail, at_ms)?;
    match step {
        StepTarget::Capture { change, host_id } => {
            if let Some(host) = change_host_mut(state, *change, host_id) {
                host.snapshot_id = snapshot_id.to_string();
            }
            settle_change(state, *change, at_ms);
        }
        StepTarget::Activate { change, .. } => settle_change(state, *change, at_ms),
        StepTarget::Rollback { rollback, .. } => settle_rollback(state, *rollback, at_ms),
        StepTarget::Gate { rollback, wave } if !ok => {
            // A result that lands after an abort changes nothing more.
            if let Some(record) = state
                .rollbacks
                .get(rollback)
                .filter(|record| !record.status.is_terminal())
            {
                let wave_record = &record.waves[*wave as usize];
                // Waves are numbered from 1 for people, as `explain` and `watch` show them.
                let evidence = format!(
                    "gate after wave {} ({} in {}) failed: {detail}",
                    wave + 1,
                    wave_record.service,
                    wave_record.region
                );
                pause_for_a_person(state, *rollback, *wave, evidence, at_ms);
            }
        }
        StepTarget::Gate { rollback, .. } => settle_rollback(state, *rollback, at_ms),
        StepTarget::Schema { .. } => {}
    }
    let outcome = if ok {
        format!("ok: {detail}")
    } else {
        format!("failed: {detail}")
    };
    Ok((Outcome::Done, step_id, outcome))
}

/// Records how a running step ended; refused for a step that is not running (a late or
/// duplicate result).
fn end_step(
    progress: &mut StepProgress,
    step_id: &str,
    ok: bool,
    detail: &str,
    at_ms: u64,
) -> Result<()> {
    if progress.status != StepStatus::Running {
        return Err(CoordinatorError::StepNotRunning {
            step_id: step_id.to_string(),
            status: progress.status.to_string(),
        });
    }
    progress.status = if ok {
        StepStatus::Succeeded
    } else {
        StepStatus::Failed
    };
    progress.finished_at_ms = at_ms;
    progress.detail = detail.to_string();
    Ok(())
}

/// Moves a change on once its current phase has ended on every host.
fn settle_change(state: &mut State, number: u64, at_ms: u64) {
    let Some(change) = state.changes.get_mut(&number) else {
        return;
    };
    let phase = |host: &ChangeHostRecord| match change.status {
        ChangeStatus::Capturing => host.capture.clone(),
        _ => host.activate.clone(),
    };
    if !matches!(
        change.status,
        ChangeStatus::Capturing | ChangeStatus::Deploying
    ) {
        return;
    }
    if let Some(failed) = change
        .hosts
        .iter()
        .find(|host| phase(host).status == StepStatus::Failed)
    {
        let what = if change.status == ChangeStatus::Capturing {
            "capture"
        } else {
            "activation"
        };
        change.reason = format!(
            "{what} failed on {}: {}",
            failed.host_id,
            phase(failed).detail
        );
        change.status = ChangeStatus::Failed;
        return;
    }
    if change
        .hosts
        .iter()
        .all(|host| phase(host).status == StepStatus::Succeeded)
    {
        // The phase's migrations (expand ones after capture, the rest after activation) must
        // have committed too.
        let after_activation = change.status == ChangeStatus::Deploying;
        let own = change.schema.clone();
        let stages = own
            .iter()
            .enumerate()
            .filter(|(_, stage)| stage.after_activation == after_activation);
        let stages = super::schema::stages_state(state, stages);
        let Some(change) = state.changes.get_mut(&number) else {
            return;
        };
        match stages {
            // A stuck resolve is retried until it succeeds; the change waits for it.
            super::schema::StagesState::Waiting { .. }
            | super::schema::StagesState::Stuck { .. } => {}
            super::schema::StagesState::Failed { detail, .. } => {
                change.reason = format!("migrations failed: {detail}");
                change.status = ChangeStatus::Failed;
            }
            super::schema::StagesState::Done if change.status == ChangeStatus::Capturing => {
                change.status = ChangeStatus::Deploying;
            }
            super::schema::StagesState::Done => {
                change.status = ChangeStatus::Deployed;
                change.deployed_at_ms = at_ms;
            }
        }
    }
}

/// Ends a rollback once every wave passed its gate; pauses it for a person when a host failed
/// in the current wave and no other host of that wave is still on its way.
fn settle_rollback(state: &mut State, number: u64, at_ms: u64) {
    let Some(rollback) = state.rollbacks.get_mut(&number) else {
        return;
    };
    if rollback.status.is_terminal() {
        return;
    }
    let Some(wave) = rollback.current_wave() else {
        // Every wave is done: then the schema reverts, one database at a time.
        let own: Vec<(usize, SchemaStage)> = rollback
            .schema_stages()
            .map(|(index, stage)| (index, stage.clone()))
            .collect();
        let last_wave = rollback.waves.len().saturating_sub(1) as u32;
        let running = rollback.status == RollbackStatus::Running;
        let stages =
            super::schema::stages_state(state, own.iter().map(|(index, stage)| (*index, stage)));
        match stages {
            super::schema::StagesState::Done => {}
            super::schema::StagesState::Waiting { .. } => return,
            super::schema::StagesState::Failed { detail, .. }
            | super::schema::StagesState::Stuck { detail, .. } => {
                if running {
                    let evidence = format!(
                        "schema revert failed, the app is reverted: {detail}; resume retries it"
                    );
                    pause_for_a_person(state, number, last_wave, evidence, at_ms);
                }
                return;
            }
        }
        let Some(rollback) = state.rollbacks.get_mut(&number) else {
            return;
        };
        let schema_detail: Vec<String> = rollback
            .schema
            .iter()
            .map(|stage| {
                if rollback.isolated.contains(&stage.service) {
                    format!(
                        "{} not reverted ({}): {} was isolated",
                        stage.database,
                        stage.versions.join(", "),
                        stage.service
                    )
                } else {
                    format!(
                        "{} reverted on every shard ({})",
                        stage.database,
                        stage.versions.join(", ")
                    )
                }
            })
            .collect();
        let hosts: std::collections::BTreeSet<&str> = rollback
            .steps
            .iter()
            .filter(|step| step.progress.status == StepStatus::Succeeded)
            .map(|step| step.host_id.as_str())
            .collect();
        let mut detail = format!(
            "{} reverted and verified healthy in {} waves",
            crate::plan::plural(hosts.len(), "host"),
            rollback.waves.len()
        );
        if !rollback.skipped_hosts.is_empty() {
            detail += &format!(
                "; left unreverted by an operator: {}",
                rollback.skipped_hosts.join(", ")
            );
        }
        if !rollback.isolated.is_empty() {
            detail += &format!(
                "; isolated (drained, not reverted): {}",
                rollback.isolated.join(", ")
            );
            let paused: Vec<String> = left_open(rollback)
                .into_iter()
                .filter(|host| host.ends_with("(jobs paused)"))
                .collect();
            if !paused.is_empty() {
                detail += &format!("; left with jobs paused: {}", paused.join(", "));
            }
        }
        if !schema_detail.is_empty() {
            detail += &format!("; {}", schema_detail.join("; "));
        }
        rollback.status = RollbackStatus::Succeeded;
        rollback.finished_at_ms = at_ms;
        rollback.outcome_detail = detail;
        let isolated = rollback.isolated.clone();
        let id = rollback.id();
        for number in rollback.changes.clone() {
            if let Some(change) = state.changes.get_mut(&number) {
                if isolated.contains(&change.service) {
                    change.reason = format!("isolated by {id}: drained, not reverted");
                } else {
                    change.status = ChangeStatus::RolledBack;
                }
            }
        }
        return;
    };
    let failed: Vec<&RollbackStepRecord> = rollback
        .wave_steps(wave)
        .filter(|step| step.progress.status == StepStatus::Failed)
        .collect();
    if failed.is_empty()
        || hosts_in_progress(rollback, wave)
        || rollback.status != RollbackStatus::Running
    {
        return;
    }
    let mut failed_hosts: Vec<String> = failed.iter().map(|step| step.host_id.clone()).collect();
    failed_hosts.dedup();
    let evidence = format!(
        "{} {} on {} failed: {}",
        failed[0].service,
        failed[0].kind.name(),
        failed[0].host_id,
        failed[0].progress.detail
    );
    rollback.failed_hosts = failed_hosts;
    pause_for_a_person(state, number, wave, evidence, at_ms);
}

/// Pauses the rollback and opens an escalation; the engine delivers it by webhook.
fn pause_for_a_person(state: &mut State, number: u64, wave: u32, evidence: String, at_ms: u64) {
    let Some(service) = state
        .rollbacks
        .get(&number)
        .and_then(|rollback| rollback.waves.get(wave as usize))
        .map(|wave| wave.service.clone())
    else {
        return;
    };
    let escalation = state.escalate(at_ms, number, wave, &service, evidence.clone());
    if let Some(rollback) = state.rollbacks.get_mut(&number) {
        rollback.status = RollbackStatus::Paused;
        rollback.paused_reason = evidence;
        rollback.escalations.push(escalation);
    }
}

/// Whether a step of the wave runs, or a host of it that began and has not failed still has
/// steps to take (the engine finishes such hosts even after another host failed).
fn hosts_in_progress(rollback: &RollbackRecord, wave: u32) -> bool {
    let steps: Vec<&RollbackStepRecord> = rollback.wave_steps(wave).collect();
    if steps
        .iter()
        .any(|step| step.progress.status == StepStatus::Running)
    {
        return true;
    }
    let mut hosts: Vec<(&str, &str)> = steps
        .iter()
        .map(|step| (step.service.as_str(), step.host_id.as_str()))
        .collect();
    hosts.dedup();
    hosts.into_iter().any(|(service, host_id)| {
        let of_host = || {
            steps
                .iter()
                .filter(move |step| step.service == service && step.host_id == host_id)
        };
        let began = of_host().any(|step| step.progress.attempts > 0);
        let failed = of_host().any(|step| step.progress.status == StepStatus::Failed);
        began && !failed && of_host().any(|step| step.progress.status == StepStatus::Pending)
    })
}

/// Hosts the rollback drained or paused the job processors of (a step that opens something was
/// attempted) and did not put back, as `service/host (drained)` or `service/host (jobs
/// paused)`.
fn left_open(rollback: &RollbackRecord) -> Vec<String> {
    attempted_openings(rollback)
        .filter(|(opened, closing)| {
            !rollback.steps.iter().any(|step| {
                step.kind == *closing
                    && step.wave == opened.wave
                    && step.host_id == opened.host_id
                    && step.service == opened.service
                    && step.progress.status == StepStatus::Succeeded
            })
        })
        .map(|(opened, _)| {
            let what = if opened.kind == RollbackStepKind::PauseJobs {
                "jobs paused"
            } else {
                "drained"
            };
            format!("{}/{} ({what})", opened.service, opened.host_id)
        })
        .collect()
}

/// Steps that opened something (a drain, a pause) and were attempted, with the step closing
/// each. Attempted, not only succeeded: one that failed half-way may have acted anyway, and
/// putting back is idempotent.
fn attempted_openings(
    rollback: &RollbackRecord,
) -> impl Iterator<Item = (&RollbackStepRecord, RollbackStepKind)> {
    rollback
        .steps
        .iter()
        .filter(|opened| opened.progress.attempts > 0)
        .filter_map(|opened| Some((opened, opened.kind.closed_by()?)))
}

fn skip_pending(rollback: &mut RollbackRecord) {
    for step in &mut rollback.steps {
        if step.progress.status == StepStatus::Pending {
            step.progress.status = StepStatus::Skipped;
        }
    }
    for wave in &mut rollback.waves {
        if wave.gate.status == StepStatus::Pending {
            wave.gate.status = StepStatus::Skipped;
        }
    }
}

/// A person's rollback: at once where the policy asks for no approvals, as a request for them
/// where it does, or at once anyway by break-glass (escalated, and left for a review).
#[allow(clippy::too_many_arguments)]
fn request_rollback(
    state: &mut State,
    command: &Command,
    changes: &[u64],
    options: &PlanOptions,
    plan_hash: &str,
    reason: &str,
    trigger: Trigger,
    break_glass: bool,
) -> Result<(Outcome, String, String)> {
    let requirement = approvals::requirement(state, changes);
    if requirement.approvals == 0 {
        return start_rollback(state, command, changes, options, plan_hash, reason, trigger);
    }
    if !break_glass {
        let plan = checked_plan(state, changes, options, plan_hash, trigger)?;
        return approvals::file(state, command, &plan, &requirement, reason, trigger);
    }
    if !requirement.break_glass {
        return Err(no_break_glass(&requirement));
    }
    let plan = checked_plan(state, changes, options, plan_hash, trigger)?;
    let (outcome, target, audit) = start_planned(state, command, &plan, reason, trigger);
    let Outcome::Rollback(number) = outcome else {
        unreachable!("start_rollback answers with a rollback");
    };
    let request =
        approvals::record_break_glass(state, command, &plan, &requirement, reason, number);
    let service = plan.services.first().cloned().unwrap_or_default();
    if let Some(rollback) = state.rollbacks.get_mut(&number) {
        rollback.break_glass = true;
        rollback.request = request;
    }
    let escalation = escalate_break_glass(
        state,
        command,
        &requirement,
        request,
        approvals::Started::Rollback(number),
        &service,
        reason,
    );
    if let Some(rollback) = state.rollbacks.get_mut(&number) {
        rollback.escalations.push(escalation);
    }
    Ok((outcome, target, break_glass_audit(request, &audit)))
}

/// A person's decision on a request; the last approval needed starts its rollback, run as the
/// requester's with the approvers named.
fn decide_request(
    state: &mut State,
    command: &Command,
    number: u64,
    decision: approvals::Decision,
    plan_hash: &str,
    reason: &str,
    baseline: Option<HealthAggregate>,
) -> Result<(Outcome, String, String)> {
    let target = approvals::request_id(number);
    match approvals::decide(state, command, number, decision, plan_hash, reason)? {
        approvals::Decided::Recorded(text) => {
            Ok((Outcome::Request(number), target, format!("ok: {text}")))
        }
        approvals::Decided::Refused(why) => Ok((
            Outcome::RequestRefused {
                request: number,
                why: why.clone(),
            },
            target,
            format!("refused: {why}"),
        )),
        approvals::Decided::Approved if state.approval_requests[&number].deploy.is_some() => {
            approve_deploy(state, command, number, baseline, reason)
        }
        approvals::Decided::Approved => {
            let request = state.approval_requests[&number].clone();
            // Starting it lapses every pending request over its changes, this one too; it is
            // recorded as approved just after.
            let (Outcome::Rollback(rollback), rollback_target, started) = start_rollback(
                state,
                command,
                &request.changes,
                &request.options,
                &request.plan_hash,
                &request.reason,
                request.trigger,
            )?
            else {
                unreachable!("start_rollback answers with a rollback");
            };
            let approved_by = approvals::record_approved(
                state,
                command,
                number,
                reason,
                approvals::Started::Rollback(rollback),
            );
            if let Some(record) = state.rollbacks.get_mut(&rollback) {
                record.started_by = request.requester.clone();
                record.approved_by = approved_by.clone();
                record.request = number;
            }
            Ok(audit_approved_start(
                state,
                command,
                &request,
                ("rollback.start", &rollback_target, &started),
                &approved_by,
                approvals::Started::Rollback(rollback),
            ))
        }
    }
}

/// The last approval of a deploy request: the deploy starts as the requester's, with the
/// baseline measured now (when given), and the request records who approved it.
fn approve_deploy(
    state: &mut State,
    command: &Command,
    number: u64,
    baseline: Option<HealthAggregate>,
    reason: &str,
) -> Result<(Outcome, String, String)> {
    let request = state.approval_requests[&number].clone();
    let Some(spec) = &request.deploy else {
        unreachable!("called for deploy requests only");
    };
    let start = Command {
        at_ms: command.at_ms,
        identity: request.requester.clone(),
        request_id: String::new(),
        kind: CommandKind::StartChange {
            service: spec.service.clone(),
            version: spec.version.clone(),
            // The hosts approved (the drift check above found them unchanged).
            host_ids: spec.hosts.clone(),
            reason: request.reason.clone(),
            baseline: baseline.unwrap_or(spec.baseline),
            flags_on: spec.flags_on.clone(),
            migrations: spec.migrations.clone(),
            break_glass: false,
        },
    };
    let (Outcome::Change(change), change_target, started) = start_change(state, &start)? else {
        unreachable!("start_change answers with a change");
    };
    let approved_by = approvals::record_approved(
        state,
        command,
        number,
        reason,
        approvals::Started::Change(change),
    );
    if let Some(record) = state.changes.get_mut(&change) {
        record.approved_by = approved_by.clone();
        record.request = number;
    }
    Ok(audit_approved_start(
        state,
        command,
        &request,
        ("change.start", &change_target, &started),
        &approved_by,
        approvals::Started::Change(change),
    ))
}

/// The audit of what a last approval started: its own entry (`action` on `target`, with the
/// `started` outcome) in the requester's name, naming the approvers; the approval's entry
/// (the answer) follows.
fn audit_approved_start(
    state: &mut State,
    command: &Command,
    request: &approvals::ApprovalRequest,
    (action, target, started): (&str, &str, &str),
    approved_by: &[String],
    what: approvals::Started,
) -> (Outcome, String, String) {
    state.audit.append(
        command.at_ms,
        &request.requester,
        action,
        target,
        &format!("{started}; approved by {}", approved_by.join(", ")),
    );
    (
        Outcome::Request(request.number),
        request.id(),
        format!(
            "ok: approval {} of {}: started {}",
            approved_by.len(),
            request.needed,
            what.id()
        ),
    )
}

/// The plan of `changes` as it is now, refused if it is not the one shown (`plan_hash`, when
/// given) or would break consumers without `force`.
fn checked_plan(
    state: &State,
    changes: &[u64],
    options: &PlanOptions,
    plan_hash: &str,
    trigger: Trigger,
) -> Result<crate::plan::Plan> {
    let plan = crate::plan::build(state, changes, options, trigger)?;
    if !plan_hash.is_empty() && plan.hash != plan_hash {
        return Err(CoordinatorError::PlanChanged {
            shown: plan_hash.to_string(),
            now: plan.hash,
        });
    }
    if !plan.incompatibilities.is_empty() && !options.force {
        return Err(CoordinatorError::Incompatible {
            problems: plan
                .incompatibilities
                .iter()
                .map(|problem| problem.detail.clone())
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    Ok(plan)
}

fn start_rollback(
    state: &mut State,
    command: &Command,
    changes: &[u64],
    options: &PlanOptions,
    plan_hash: &str,
    reason: &str,
    trigger: Trigger,
) -> Result<(Outcome, String, String)> {
    let plan = checked_plan(state, changes, options, plan_hash, trigger)?;
    Ok(start_planned(state, command, &plan, reason, trigger))
}

/// Starts the rollback of a plan [`checked_plan`] accepted.
fn start_planned(
    state: &mut State,
    command: &Command,
    plan: &crate::plan::Plan,
    reason: &str,
    trigger: Trigger,
) -> (Outcome, String, String) {
    let options = &plan.options;
    let forced: Vec<String> = plan
        .incompatibilities
        .iter()
        .map(|problem| problem.detail.clone())
        .collect();
    state.next_rollback += 1;
    let number = state.next_rollback;
    let mut steps = Vec::new();
    let mut waves = Vec::with_capacity(plan.waves.len());
    for (index, wave) in plan.waves.iter().enumerate() {
        let hosts = wave.hosts();
        let kinds: Vec<RollbackStepKind> = match plan.recipes.get(&wave.service) {
            Some(recipe) => recipe.iter().map(|step| step.kind).collect(),
            None => RollbackStepKind::ALL.to_vec(),
        };
        for host_id in &hosts {
            for &kind in &kinds {
                steps.push(RollbackStepRecord {
                    wave: index as u32,
                    service: wave.service.clone(),
                    host_id: host_id.clone(),
                    kind,
                    progress: StepProgress::default(),
                });
            }
        }
        waves.push(WaveRecord {
            service: wave.service.clone(),
            change: wave.change,
            region: wave.region.clone(),
            canary: wave.canary,
            hosts,
            gate: StepProgress::default(),
            isolation: false,
        });
    }
    let host_count: std::collections::BTreeSet<&str> =
        steps.iter().map(|step| step.host_id.as_str()).collect();
    let mut audit = format!(
        "ok: {trigger} rollback of {} in {} waves on {} (plan {}): {reason}",
        crate::plan::change_list(&plan.changes),
        waves.len(),
        crate::plan::plural(host_count.len(), "host"),
        plan.hash
    );
    if !forced.is_empty() {
        audit += &format!("; forced past: {}", forced.join("; "));
    }
    for stage in &plan.schema {
        audit += &format!(
            "; then reverts {} on {}",
            stage.versions.join(", "),
            stage.database
        );
    }
    if !options.accept_data_loss.is_empty() {
        audit += &format!("; data loss accepted: {}", options.accept_data_loss);
    }
    let rollback = RollbackRecord {
        number,
        changes: plan.changes.clone(),
        services: plan.services.clone(),
        status: RollbackStatus::Running,
        trigger,
        reason: reason.to_string(),
        started_by: command.identity.clone(),
        started_at_ms: command.at_ms,
        finished_at_ms: 0,
        options: plan.options.clone(),
        plan_hash: plan.hash.clone(),
        waves,
        steps,
        forced,
        paused_reason: String::new(),
        escalations: Vec::new(),
        outcome_detail: String::new(),
        failed_hosts: Vec::new(),
        skipped_hosts: Vec::new(),
        flags_reverted: Vec::new(),
        isolated: Vec::new(),
        recipes: plan.recipes.clone(),
        schema: plan.schema.clone(),
        approved_by: Vec::new(),
        request: 0,
        break_glass: false,
    };
    state.rollbacks.insert(number, rollback);
    approvals::supersede(state, &plan.changes, number, command.at_ms);
    // A change's migrations not yet decided are aborted: the plan reverts only what was decided
    // to commit, so nothing may commit underneath the rollback.
    let change_txns: Vec<u64> = plan
        .changes
        .iter()
        .filter_map(|number| state.changes.get(number))
        .flat_map(|change| change.schema.iter().map(|stage| stage.txn))
        .collect();
    super::schema::abort_undecided(
        state,
        change_txns,
        &format!("{} began before it was decided", rollback_id(number)),
        command.at_ms,
    );
    // Flags first: a kill switch takes effect before any host is touched.
    let mut flags_reverted = Vec::new();
    for change_number in &plan.changes {
        let Some(change) = state.changes.get(change_number).cloned() else {
            continue;
        };
        for flag in &change.flags {
            // Only a flag the change still owns: a kill switch or a person's later choice stays.
            let owned = state
                .flag(&change.environment, &change.service, &flag.name)
                .is_some_and(|current| current.by_change == change.number);
            if !owned {
                continue;
            }
            let value = flag.before.unwrap_or(false);
            state.put_flag(
                [&change.environment, &change.service, &flag.name],
                FlagRecord {
                    enabled: value,
                    killed: false,
                    updated_at_ms: command.at_ms,
                    updated_by: command.identity.clone(),
                    reason: format!("turned back by {} before any wave", rollback_id(number)),
                    changed_at_index: 0,
                    by_change: 0,
                },
            );
            flags_reverted.push(format!(
                "{}/{}/{} -> {}",
                change.environment,
                change.service,
                flag.name,
                if value { "on" } else { "off" }
            ));
        }
    }
    if let Some(rollback) = state.rollbacks.get_mut(&number) {
        rollback.flags_reverted = flags_reverted;
    }
    for change_number in &plan.changes {
        if let Some(change) = state.changes.get_mut(change_number) {
            change.rollback = number;
            if matches!(
                change.status,
                ChangeStatus::Capturing | ChangeStatus::Deploying
            ) {
                change.status = ChangeStatus::Failed;
                change.reason = format!("interrupted by rollback {}", rollback_id(number));
            }
        }
    }
    (Outcome::Rollback(number), rollback_id(number), audit)
}

fn control_rollback(
    state: &mut State,
    command: &Command,
    number: u64,
    action: RollbackAction,
    reason: &str,
) -> Result<(Outcome, String, String)> {
    let rollback = live_rollback_mut(state, number, action.name())?;
    match (action, rollback.status) {
        (RollbackAction::Pause, RollbackStatus::Running) => {
            rollback.status = RollbackStatus::Paused;
            rollback.paused_reason = format!("paused by {}: {reason}", command.identity);
        }
        (RollbackAction::Resume, RollbackStatus::Paused) => {
            // A person looked at what failed: the current wave's failed steps and gate get a
            // fresh set of attempts. Only a person can do this, so it cannot loop on its own.
            if let Some(wave) = rollback.current_wave() {
                let mut retried = Vec::new();
                for step in rollback.steps.iter_mut().filter(|step| step.wave == wave) {
                    if step.progress.status == StepStatus::Failed {
                        retried.push(step.host_id.clone());
                        step.progress = StepProgress::default();
                    }
                }
                rollback.failed_hosts.retain(|host| !retried.contains(host));
                let gate = &mut rollback.waves[wave as usize].gate;
                if gate.status == StepStatus::Failed {
                    *gate = StepProgress::default();
                }
            }
            rollback.status = RollbackStatus::Running;
            rollback.paused_reason.clear();
            if rollback.current_wave().is_none() {
                let mut stages = std::mem::take(&mut rollback.schema);
                for stage in &mut stages {
                    super::schema::retry_stage(state, stage);
                }
                if let Some(rollback) = state.rollbacks.get_mut(&number) {
                    rollback.schema = stages;
                }
            }
        }
        (RollbackAction::Abort, RollbackStatus::Running | RollbackStatus::Paused) => {
            rollback.status = RollbackStatus::Aborted;
            rollback.finished_at_ms = command.at_ms;
            let open = left_open(rollback);
            rollback.outcome_detail = if open.is_empty() {
                format!("aborted: {reason}")
            } else {
                format!(
                    "aborted: {reason}; left drained or with jobs paused (not put back): {}",
                    open.join(", ")
                )
            };
            skip_pending(rollback);
            // A schema transaction not yet decided is aborted with it (one decided finishes).
            let stage_txns: Vec<u64> = rollback.schema.iter().map(|stage| stage.txn).collect();
            super::schema::abort_undecided(
                state,
                stage_txns,
                "the rollback was aborted",
                command.at_ms,
            );
        }
        (_, status) => {
            return Err(CoordinatorError::RollbackNotControllable {
                rollback_id: rollback.id(),
                status,
                action: action.name().into(),
            });
        }
    }
    Ok((
        Outcome::Rollback(number),
        rollback_id(number),
        format!("ok: {reason}"),
    ))
}

/// The rollback, if it has not ended.
fn live_rollback_mut<'a>(
    state: &'a mut State,
    number: u64,
    action: &str,
) -> Result<&'a mut RollbackRecord> {
    let known = known_list(state.rollbacks.keys().map(|&number| rollback_id(number)));
    let rollback =
        state
            .rollbacks
            .get_mut(&number)
            .ok_or_else(|| CoordinatorError::UnknownRollback {
                rollback_id: rollback_id(number),
                known,
            })?;
    if rollback.status.is_terminal() {
        return Err(CoordinatorError::RollbackNotControllable {
            rollback_id: rollback.id(),
            status: rollback.status,
            action: action.into(),
        });
    }
    Ok(rollback)
}

/// The services a host may register: with `[[hosts]]` rules, those they assign; without, those
/// it registered with before. The leader says so first, with the way out; this holds it on
/// every member, whatever state the leader read.
fn check_service_pin(state: &State, host_id: &str, services: &[String]) -> Result<()> {
    if let Some(policy) = state
        .access
        .policy
        .as_ref()
        .filter(|policy| !policy.host_rules.is_empty())
    {
        return match services
            .iter()
            .find(|service| !policy.may_run(host_id, service))
        {
            Some(service) => Err(CoordinatorError::invalid(
                "services",
                format!(
                    "host {host_id} may not run service {service}: no [[hosts]] rule of the \
                     access policy assigns it"
                ),
            )),
            None => Ok(()),
        };
    }
    let Some(known) = state.hosts.get(host_id) else {
        return Ok(());
    };
    match services
        .iter()
        .find(|service| !known.services.contains(service))
    {
        Some(service) => Err(CoordinatorError::invalid(
            "services",
            format!(
                "host {host_id} is registered with services {} and may not add {service}: an \
                 admin forgets the host first (rewindctl host forget {host_id} --reason ...)",
                known.services.join(",")
            ),
        )),
        None => Ok(()),
    }
}

/// Raises the cluster version. A version this binary cannot apply never gets here: the member
/// stops before applying the entry (`version::check_command`).
fn set_cluster_version(
    state: &mut State,
    to: u32,
    asked: &[u64],
    reason: &str,
) -> Result<(Outcome, String, String)> {
    let members: Vec<u64> = state.members.keys().copied().collect();
    if asked != members {
        return Err(CoordinatorError::invalid(
            "members",
            format!(
                "the members changed since they were asked (asked {asked:?}, now {members:?}): \
                 ask again"
            ),
        ));
    }
    let running = state.cluster_version();
    if to <= running {
        return Err(CoordinatorError::invalid(
            "version",
            format!("the cluster already runs version {running}; a version is only raised"),
        ));
    }
    state.cluster_version = to;
    Ok((
        Outcome::Done,
        "cluster".into(),
        format!("ok: cluster version {running} -> {to}: {reason}"),
    ))
}

/// Removes `host_id` from the fleet's record (and, with `release_name`, its enrollment), unless
/// something could still act on it by name: a change in progress or the latest change of one of
/// its services while that can still be rolled back (a rollback would restore it, judged
/// without its environment), a rollback in progress, or a schema transaction or drill on it.
fn forget_host(
    state: &mut State,
    host_id: &str,
    release_name: bool,
    reason: &str,
) -> Result<(Outcome, String, String)> {
    let record = state.hosts.get(host_id);
    let enrolled = state.enrollments.contains_key(host_id);
    if record.is_none() && !(release_name && enrolled) {
        return Err(CoordinatorError::UnknownHost {
            host_id: host_id.to_string(),
        });
    }
    let in_use = |by: String| CoordinatorError::HostInUse {
        host_id: host_id.to_string(),
        by,
    };
    for change in state.changes.values() {
        if !change.hosts.iter().any(|host| host.host_id == host_id) {
            continue;
        }
        if matches!(
            change.status,
            ChangeStatus::Capturing | ChangeStatus::Deploying
        ) {
            return Err(in_use(format!(
                "change {}, still in progress: let it finish",
                change_id(change.number)
            )));
        }
        // As the planner judges it: a rollback of this change could start now and would act
        // on the host.
        if crate::plan::revertible_change(state, change.number, Trigger::Manual).is_ok()
            && crate::plan::revertible_hosts(change).any(|host| host == host_id)
        {
            return Err(in_use(format!(
                "change {} of {}, which a rollback would still restore there: roll it back, or \
                 deploy a newer change of {} to its other hosts",
                change_id(change.number),
                change.service,
                change.service
            )));
        }
    }
    let in_rollback = state.rollbacks.values().find(|rollback| {
        !rollback.status.is_terminal()
            && rollback
                .waves
                .iter()
                .any(|wave| wave.hosts.iter().any(|host| host == host_id))
    });
    if let Some(rollback) = in_rollback {
        return Err(in_use(format!(
            "rollback {}, still in progress: let it finish or abort it",
            rollback_id(rollback.number)
        )));
    }
    let in_schema = state.schema_txns.values().find(|txn| {
        txn.status != SchemaTxnStatus::Done
            && txn.shards.iter().any(|shard| shard.host_id == host_id)
    });
    if let Some(txn) = in_schema {
        return Err(in_use(format!(
            "schema transaction {}, still in progress: let it finish or resolve it by hand",
            schema_txn_id(txn.number)
        )));
    }
    let services = record.map(|host| host.services.clone()).unwrap_or_default();
    state.hosts.remove(host_id);
    let released = release_name && state.enrollments.remove(host_id).is_some();
    let listed = if services.is_empty() {
        "none".to_string()
    } else {
        services.join(",")
    };
    let name = if released {
        "; its name released for joining anew"
    } else {
        ""
    };
    Ok((
        Outcome::HostForgotten {
            services,
            name_released: released,
        },
        host_id.to_string(),
        format!("ok: forgotten (services {listed}){name}: {reason}"),
    ))
}

/// Records a host's offline self-revert on the change it reverted (once per report id) and
/// audits it. A report of a change this cluster does not know is audited all the same.
fn record_self_revert(
    state: &mut State,
    host_id: &str,
    report: &SelfRevertNote,
) -> Result<(Outcome, String, String)> {
    if !state.hosts.contains_key(host_id) {
        return Err(CoordinatorError::UnknownHost {
            host_id: host_id.to_string(),
        });
    }
    let outcome = if report.ok {
        "reverted"
    } else {
        "tried to revert"
    };
    let mut message = format!(
        "ok: {host_id} {outcome} {} of {} to {} on its own ({}); {}",
        report.change_id, report.service, report.snapshot_id, report.evidence, report.detail
    );
    let change = parse_numbered_id("ch", &report.change_id)
        .and_then(|number| state.changes.get_mut(&number))
        .filter(|change| change.service == report.service);
    match change.and_then(|change| change.hosts.iter_mut().find(|host| host.host_id == host_id)) {
        Some(host)
            if host
                .self_reverted
                .as_ref()
                .is_some_and(|known| known.id == report.id) =>
        {
            message += " (already recorded)";
        }
        Some(host) => host.self_reverted = Some(report.clone()),
        None => message += "; this cluster has no such change on that host",
    }
    Ok((Outcome::Done, format!("{host_id}/{}", report.id), message))
}

fn skip_host(
    state: &mut State,
    number: u64,
    host_id: &str,
    reason: &str,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    let rollback = live_rollback_mut(state, number, "skip a host")?;
    let first_open_wave = rollback.current_wave().unwrap_or(u32::MAX);
    let mut skipped = 0;
    // A host taken out of rotation is put back, and job processors paused are resumed: the
    // step closing each one attempted stays to be run.
    let keep_closing: Vec<(u32, String, RollbackStepKind)> = attempted_openings(rollback)
        .filter(|(opened, _)| opened.host_id == host_id)
        .map(|(opened, closing)| (opened.wave, opened.service.clone(), closing))
        .collect();
    for step in rollback
        .steps
        .iter_mut()
        .filter(|step| step.host_id == host_id && step.wave >= first_open_wave)
    {
        let closing = keep_closing.contains(&(step.wave, step.service.clone(), step.kind));
        if closing {
            if step.progress.status == StepStatus::Failed {
                step.progress = StepProgress::default();
            }
            continue;
        }
        if step.progress.status != StepStatus::Succeeded {
            step.progress.status = StepStatus::Skipped;
            step.progress.detail = format!("skipped by an operator: {reason}");
            skipped += 1;
        }
    }
    if skipped == 0 {
        let hosts: std::collections::BTreeSet<String> = rollback
            .steps
            .iter()
            .map(|step| step.host_id.clone())
            .collect();
        return Err(CoordinatorError::invalid(
            "host_id",
            format!(
                "{host_id} has nothing left to skip in {}: its hosts are {}",
                rollback.id(),
                known_list(hosts)
            ),
        ));
    }
    rollback.failed_hosts.retain(|host| host != host_id);
    if !rollback.skipped_hosts.iter().any(|host| host == host_id) {
        rollback.skipped_hosts.push(host_id.to_string());
    }
    // A wave left with no host to revert has nothing for its gate to judge.
    for (index, wave) in rollback.waves.iter_mut().enumerate() {
        let all_skipped = rollback
            .steps
            .iter()
            .filter(|step| step.wave == index as u32)
            .all(|step| step.progress.status == StepStatus::Skipped);
        if all_skipped && !wave.gate.status.is_terminal() {
            wave.gate.status = StepStatus::Skipped;
        }
    }
    let id = rollback.id();
    settle_rollback(state, number, at_ms);
    Ok((
        Outcome::Rollback(number),
        id,
        format!("ok: {host_id} left unreverted ({skipped} steps skipped): {reason}"),
    ))
}

fn isolate_service(
    state: &mut State,
    number: u64,
    service: &str,
    reason: &str,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    let hosts: Vec<String> = state
        .hosts
        .values()
        .filter(|host| host.services.iter().any(|name| name == service))
        .map(|host| host.host_id.clone())
        .collect();
    let rollback = live_rollback_mut(state, number, "isolate a service")?;
    let id = rollback.id();
    if !rollback.services.iter().any(|name| name == service) {
        return Err(CoordinatorError::invalid(
            "service",
            format!(
                "{id} does not revert {service}: it reverts {}",
                rollback.services.join(", ")
            ),
        ));
    }
    if rollback.isolated.iter().any(|name| name == service) {
        return Err(CoordinatorError::invalid(
            "service",
            format!("{service} is already isolated in {id}"),
        ));
    }
    let Some(first_open) = rollback.current_wave() else {
        return Err(CoordinatorError::invalid(
            "service",
            format!("every wave of {id} is done: there is nothing left to isolate"),
        ));
    };
    let change = rollback
        .waves
        .iter()
        .find(|wave| wave.service == service)
        .map_or(0, |wave| wave.change);
    // Stop reverting the service: its steps and gates not yet done are skipped.
    for step in rollback
        .steps
        .iter_mut()
        .filter(|step| step.service == service && step.wave >= first_open)
    {
        if !step.progress.status.is_terminal() || step.progress.status == StepStatus::Failed {
            step.progress.status = StepStatus::Skipped;
            step.progress.detail = format!("isolated instead: {reason}");
        }
    }
    for wave in rollback
        .waves
        .iter_mut()
        .skip(first_open as usize)
        .filter(|wave| wave.service == service)
    {
        if !wave.gate.status.is_terminal() || wave.gate.status == StepStatus::Failed {
            wave.gate.status = StepStatus::Skipped;
            wave.gate.detail = format!("isolated instead: {reason}");
        }
    }
    // Then drain all its hosts, before anything else the rollback still has to do.
    for step in rollback
        .steps
        .iter_mut()
        .filter(|step| step.wave >= first_open)
    {
        step.wave += 1;
    }
    let skipped_gate = StepProgress {
        status: StepStatus::Skipped,
        detail: "an isolation is not gated".into(),
        ..StepProgress::default()
    };
    rollback.waves.insert(
        first_open as usize,
        WaveRecord {
            service: service.to_string(),
            change,
            region: "all".into(),
            canary: false,
            hosts: hosts.clone(),
            gate: skipped_gate,
            isolation: true,
        },
    );
    rollback
        .steps
        .extend(hosts.iter().map(|host_id| RollbackStepRecord {
            wave: first_open,
            service: service.to_string(),
            host_id: host_id.clone(),
            kind: RollbackStepKind::Isolate,
            progress: StepProgress::default(),
        }));
    rollback.isolated.push(service.to_string());
    rollback.failed_hosts.clear();
    rollback.paused_reason.clear();
    rollback.status = RollbackStatus::Running;
    settle_rollback(state, number, at_ms);
    Ok((
        Outcome::Rollback(number),
        id,
        format!(
            "ok: {service} isolated: {} drained instead of reverted: {reason}",
            crate::plan::plural(hosts.len(), "host")
        ),
    ))
}

fn escalation_delivered(
    state: &mut State,
    id: u64,
    ok: bool,
    detail: &str,
) -> Result<(Outcome, String, String)> {
    let record = state.escalations.get_mut(&id).ok_or_else(|| {
        CoordinatorError::invalid("escalation", format!("no escalation {id} is kept"))
    })?;
    record.attempts += 1;
    record.delivered = ok;
    record.delivery_detail = detail.to_string();
    let outcome = if ok { "delivered" } else { "not delivered" };
    Ok((
        Outcome::Done,
        format!("escalation-{id}"),
        format!("{outcome}: {detail}"),
    ))
}

/// Judges a request for an automatic rollback: start it, or record why not. Refuses (as an
/// error, recording nothing) only a service that does not exist.
fn auto_trigger(state: &mut State, command: &Command) -> Result<(Outcome, String, String)> {
    let CommandKind::AutoTrigger {
        service,
        environment,
        source,
        reason,
        options,
        throttle,
    } = &command.kind
    else {
        unreachable!("called for AutoTrigger commands only");
    };
    let (service, environment, source) = (service.as_str(), environment.as_str(), *source);
    require_service(state, service)?;
    let at_ms = command.at_ms;
    // The latest change of the service in the alert's environment (any, when it names none).
    let latest = state
        .changes
        .values()
        .rev()
        .find(|change| {
            change.service == service
                && (environment.is_empty()
                    || crate::plan::environment_of(state, change) == environment)
        })
        .map(|change| change.number);
    let environment = match latest {
        Some(number) if environment.is_empty() => {
            crate::plan::environment_of(state, &state.changes[&number])
        }
        _ => environment.to_string(),
    };
    let environment = environment.as_str();
    let verdict = match latest {
        None => Verdict::Ignored(format!(
            "{service} has had no change{} to roll back",
            if environment.is_empty() {
                String::new()
            } else {
                format!(" in environment {environment}")
            }
        )),
        Some(change) => judge_trigger(
            state,
            at_ms,
            service,
            environment,
            change,
            options,
            throttle,
        ),
    };
    let change = latest.unwrap_or(0);
    let (outcome, detail, rollback) = match verdict {
        Verdict::Ignored(why) => (TriggerOutcome::Ignored, why, 0),
        Verdict::Throttled { why, call_a_person } => {
            if let Some(refused) = state.changes.get_mut(&change) {
                refused.auto_refused = true;
            }
            if call_a_person {
                let evidence = format!(
                    "automatic rollback of {service} ({}) refused: {why}. Asked by {}: {reason}",
                    change_id(change),
                    source.name()
                );
                state.escalate(at_ms, 0, 0, service, evidence);
            }
            (TriggerOutcome::Throttled, why, 0)
        }
        Verdict::Start => {
            let requirement = approvals::requirement(state, &[change]);
            approvals::expire(state, at_ms);
            let waits = requirement.approvals > 0 && !requirement.automatic_at_once;
            // Where automatic rollbacks wait, a repeated alert does not ask twice; where they
            // run at once, they run, and a person's pending request lapses.
            if let Some(pending) = approvals::pending_for(state, change).filter(|_| waits) {
                (
                    TriggerOutcome::Ignored,
                    format!(
                        "{} already waits for approval to roll it back",
                        approvals::request_id(pending)
                    ),
                    0,
                )
            } else if waits {
                let plan = checked_plan(state, &[change], options, "", Trigger::Automatic)?;
                let (Outcome::Request(number), target, filed) = approvals::file(
                    state,
                    command,
                    &plan,
                    &requirement,
                    reason,
                    Trigger::Automatic,
                )?
                else {
                    unreachable!("approvals::file answers with a request");
                };
                state
                    .audit
                    .append(at_ms, &command.identity, "rollback.start", &target, &filed);
                (
                    TriggerOutcome::AwaitingApproval,
                    format!(
                        "waits for approval as {} ({} requires {} approvals for automatic rollbacks)",
                        approvals::request_id(number),
                        requirement.environments.join(", "),
                        requirement.approvals
                    ),
                    0,
                )
            } else {
                let (Outcome::Rollback(number), target, mut started) = start_rollback(
                    state,
                    command,
                    &[change],
                    options,
                    "",
                    reason,
                    Trigger::Automatic,
                )?
                else {
                    unreachable!("start_rollback answers with a rollback");
                };
                if requirement.approvals > 0 {
                    // Mitigation does not wait for a meeting: the policy approved it.
                    let by_policy = format!(
                        "policy: automatic rollbacks run at once in {}",
                        requirement.environments.join(", ")
                    );
                    started += &format!("; approved by {by_policy}");
                    if let Some(record) = state.rollbacks.get_mut(&number) {
                        record.approved_by = vec![by_policy];
                    }
                }
                // The rollback's own entry, as for one a person starts; the trigger's follows.
                state.audit.append(
                    at_ms,
                    &command.identity,
                    "rollback.start",
                    &target,
                    &started,
                );
                (
                    TriggerOutcome::Started,
                    format!("started {}", rollback_id(number)),
                    number,
                )
            }
        }
    };
    state.triggers.push_back(TriggerRecord {
        at_ms,
        service: service.to_string(),
        environment: environment.to_string(),
        source,
        reason: reason.to_string(),
        outcome,
        detail: detail.clone(),
        rollback,
        change,
    });
    while state.triggers.len() > MAX_TRIGGERS {
        state.triggers.pop_front();
    }
    *state
        .trigger_totals
        .entry(format!("{}/{}", source.name(), outcome.name()))
        .or_default() += 1;
    Ok((
        Outcome::Triggered {
            outcome,
            rollback,
            detail: detail.clone(),
        },
        service.to_string(),
        format!(
            "{}: {detail} (asked by {}: {reason})",
            outcome.name(),
            source.name()
        ),
    ))
}

enum Verdict {
    Start,
    Ignored(String),
    Throttled { why: String, call_a_person: bool },
}

/// The throttles, cheapest first. Trips the breaker as a side effect.
fn judge_trigger(
    state: &mut State,
    at_ms: u64,
    service: &str,
    environment: &str,
    change_number: u64,
    options: &PlanOptions,
    throttle: &ThrottleLimits,
) -> Verdict {
    let change = &state.changes[&change_number];
    if let Some(rollback) = state.rollbacks.get(&change.rollback) {
        return Verdict::Ignored(format!(
            "{} is already being or was rolled back by {} ({})",
            change.id(),
            rollback.id(),
            rollback.status
        ));
    }
    if change.auto_refused {
        return Verdict::Ignored(format!(
            "an automatic rollback of {} was already refused; a person decides",
            change.id()
        ));
    }
    if let Some(breaker) = &state.breaker {
        return Verdict::Throttled {
            why: format!(
                "the global breaker is open since {} ms ({} triggered together); reset it with `rewindctl trigger reset-breaker` once monitoring is trusted",
                breaker.tripped_at_ms,
                breaker.services.join(", ")
            ),
            call_a_person: false,
        };
    }
    let within = |since_s: u32| at_ms.saturating_sub(u64::from(since_s) * 1000);
    let mut recent: std::collections::BTreeSet<String> = state
        .triggers
        .iter()
        .filter(|old| old.at_ms >= within(throttle.breaker_window_s))
        .map(|old| old.service.clone())
        .collect();
    recent.insert(service.to_string());
    if recent.len() as u32 >= throttle.breaker_services {
        let services: Vec<String> = recent.into_iter().collect();
        let why = format!(
            "{} services asked for an automatic rollback within {} s ({}): that smells like a monitoring fault, so the global breaker is now open",
            services.len(),
            throttle.breaker_window_s,
            services.join(", ")
        );
        state.breaker = Some(BreakerRecord {
            tripped_at_ms: at_ms,
            services,
        });
        return Verdict::Throttled {
            why,
            call_a_person: true,
        };
    }
    let rollbacks_of_service = state
        .rollbacks
        .values()
        .filter(|old| old.services.iter().any(|name| name == service));
    let flaps = rollbacks_of_service
        .clone()
        .filter(|old| old.started_at_ms >= within(throttle.flap_window_s))
        .count() as u32;
    if flaps >= throttle.flap_rollbacks {
        return Verdict::Throttled {
            why: format!(
                "{service} is flapping: rolled back {flaps} times within {} s; it is no longer rolled back automatically",
                throttle.flap_window_s
            ),
            call_a_person: true,
        };
    }
    if let Some(last) = rollbacks_of_service
        .filter(|old| old.trigger == Trigger::Automatic)
        .map(|old| old.started_at_ms)
        .max()
        && last >= within(throttle.cooldown_s)
    {
        return Verdict::Throttled {
            why: format!(
                "{service} was rolled back automatically {} s ago, within its {} s cooldown",
                at_ms.saturating_sub(last) / 1000,
                throttle.cooldown_s
            ),
            call_a_person: true,
        };
    }
    // Counted from the rollbacks themselves, which are never forgotten.
    let spent = state
        .rollbacks
        .values()
        .filter(|old| {
            old.trigger == Trigger::Automatic
                && old.started_at_ms >= within(throttle.budget_window_s)
                && old
                    .changes
                    .first()
                    .and_then(|number| state.changes.get(number))
                    .is_some_and(|change| crate::plan::environment_of(state, change) == environment)
        })
        .count() as u32;
    if spent >= throttle.budget {
        return Verdict::Throttled {
            why: format!(
                "the budget of {} automatic rollbacks per {} s in environment {environment} is spent",
                throttle.budget, throttle.budget_window_s
            ),
            call_a_person: true,
        };
    }
    match crate::plan::build(state, &[change_number], options, Trigger::Automatic) {
        Err(error) => Verdict::Ignored(error.to_string()),
        Ok(plan) if !plan.incompatibilities.is_empty() => Verdict::Throttled {
            why: plan
                .incompatibilities
                .iter()
                .map(|problem| problem.detail.clone())
                .collect::<Vec<_>>()
                .join("; "),
            call_a_person: true,
        },
        Ok(_) => Verdict::Start,
    }
}

/// A change's schema stages from the migrations it names: per database, its expand migrations
/// in one stage before activation, its contract and data ones in one after.
fn change_schema_stages(
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
        if super::schema::shards_of(state, database, environment).is_empty() {
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
fn start_schema_txn(
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
            let waiting = super::schema::stages_state(state, stages);
            if !phase_done
                || waiting
                    != (super::schema::StagesState::Waiting {
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
            let waiting = super::schema::stages_state(state, record.schema_stages());
            if record.status != RollbackStatus::Running
                || record.current_wave().is_some()
                || waiting
                    != (super::schema::StagesState::Waiting {
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
            let waiting = super::schema::stages_state(state, record.stages.iter().enumerate());
            if record.status != DrillStatus::Running
                || waiting
                    != (super::schema::StagesState::Waiting {
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
            planned.expected_fingerprint = super::schema::drill_expectation(state, record, stage);
            (planned, record.environment.clone(), String::new())
        }
    };
    let by = match owner {
        SchemaOwner::Change { change, .. } => change_id(change),
        SchemaOwner::Rollback { rollback, .. } => rollback_id(rollback),
        SchemaOwner::Drill { drill, .. } => drill_id(drill),
    };
    let number = super::schema::begin(
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
fn finish_schema_step(
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
    let progress = super::schema::step_mut(state, *txn, *phase, host_id)?;
    end_step(progress, &step_id, ok, detail, at_ms)?;
    let statements = report.statements.len();
    let rows: u64 = report.statements.iter().map(|log| log.rows).sum();
    super::schema::record_report(state, *txn, *phase, host_id, report);
    super::schema::settle(state, *txn, at_ms);
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

fn settle_schema_owner(state: &mut State, txn: u64, at_ms: u64) {
    match state.schema_txns.get(&txn).map(|txn| txn.owner) {
        Some(SchemaOwner::Change { change, .. }) => settle_change(state, change, at_ms),
        Some(SchemaOwner::Rollback { rollback, .. }) => settle_rollback(state, rollback, at_ms),
        Some(SchemaOwner::Drill { drill, .. }) => super::schema::settle_drill(state, drill, at_ms),
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
                    super::schema::RESOLVE_RETRY_MS / 1000,
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

fn change_step_mut<'a>(state: &'a mut State, step: &StepTarget) -> Result<&'a mut StepProgress> {
    let (change, host_id, capture) = match step {
        StepTarget::Capture { change, host_id } => (*change, host_id, true),
        StepTarget::Activate { change, host_id } => (*change, host_id, false),
        StepTarget::Rollback { .. } | StepTarget::Gate { .. } | StepTarget::Schema { .. } => {
            return Err(CoordinatorError::UnknownStep {
                step_id: step.step_id(),
            });
        }
    };
    let host =
        change_host_mut(state, change, host_id).ok_or_else(|| CoordinatorError::UnknownStep {
            step_id: step.step_id(),
        })?;
    Ok(if capture {
        &mut host.capture
    } else {
        &mut host.activate
    })
}

fn change_host_mut<'a>(
    state: &'a mut State,
    change: u64,
    host_id: &str,
) -> Option<&'a mut ChangeHostRecord> {
    state
        .changes
        .get_mut(&change)?
        .hosts
        .iter_mut()
        .find(|host| host.host_id == host_id)
}

fn rollback_step_mut<'a>(state: &'a mut State, step: &StepTarget) -> Result<&'a mut StepProgress> {
    let unknown = || CoordinatorError::UnknownStep {
        step_id: step.step_id(),
    };
    match step {
        StepTarget::Rollback {
            rollback,
            service,
            host_id,
            kind,
        } => state
            .rollbacks
            .get_mut(rollback)
            .and_then(|record| {
                record.steps.iter_mut().find(|candidate| {
                    &candidate.service == service
                        && &candidate.host_id == host_id
                        && candidate.kind == *kind
                })
            })
            .map(|record| &mut record.progress)
            .ok_or_else(unknown),
        StepTarget::Gate { rollback, wave } => state
            .rollbacks
            .get_mut(rollback)
            .and_then(|record| record.waves.get_mut(*wave as usize))
            .map(|wave| &mut wave.gate)
            .ok_or_else(unknown),
        _ => Err(unknown()),
    }
}

fn require_service(state: &State, service: &str) -> Result<()> {
    if state.services.contains_key(service) {
        return Ok(());
    }
    Err(CoordinatorError::UnknownService {
        service: service.to_string(),
        known: known_list(state.services.keys().cloned()),
    })
}

pub fn unknown_change(state: &State, number: u64) -> CoordinatorError {
    CoordinatorError::UnknownChange {
        change_id: change_id(number),
        known: known_list(state.changes.keys().map(|&number| change_id(number))),
    }
}

pub fn unknown_rollback(state: &State, number: u64) -> CoordinatorError {
    CoordinatorError::UnknownRollback {
        rollback_id: rollback_id(number),
        known: known_list(state.rollbacks.keys().map(|&number| rollback_id(number))),
    }
}
