//! `apply()`: the pure transition function of the replicated state.
//!
//! No clock, no randomness, no I/O: everything comes from the command. A rejected command changes
//! nothing but `applied_index` (each handler checks before it mutates; from cluster version 3
//! what a refused command expired on its way is taken back too, see `REFUSAL_UNDOES_EXPIRY`).

use super::approvals;
use super::command::{
    AutoTrigger, Command, CommandKind, DecideRequest, MembershipChange, Outcome, RollbackAction,
    StartChange, StartRollback, StepTarget,
};
use super::state::*;
use super::version;
use crate::errors::{CoordinatorError, known_list};
use rewind_shared::audit::Record;

mod change;
mod fire_drill;
mod incident;
mod registry;
mod rollback_control;
mod rollback_settle;
mod rollback_start;
mod schema_stage;
mod step;
mod trigger;

use change::*;
use fire_drill::*;
use incident::*;
use registry::*;
use rollback_control::*;
use rollback_settle::*;
use rollback_start::*;
use schema_stage::*;
use step::*;
use trigger::*;

pub use change::current_version;
pub(super) use change::select_hosts;
pub use fire_drill::{drill_end, revert_pending};
pub(super) use trigger::judge_trigger;
pub use trigger::latest_change;

type Result<T> = std::result::Result<T, CoordinatorError>;

/// Identity used for the engine's own commands.
pub const COORDINATOR_IDENTITY: &str = "coordinator";

/// Longest line of an adoption's accepted drift: a service's name and its 32 changes of at
/// most 512 bytes each, with their separators and a count of the rest.
const MAX_ACCEPTED_LINE_BYTES: usize = 17 * 1024;

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
    // Requests for approval expire (and drifted ones lapse) as a side effect of the commands
    // that look at them, before those commands may still be refused. From version 3 a refused
    // command takes that housekeeping back with it, so that it changes nothing.
    let housekeeping = (state.cluster_version() >= version::REFUSAL_UNDOES_EXPIRY
        && touches_requests(&command.kind))
    .then(|| approvals::Housekeeping::save(state));
    let (outcome, target, audit_outcome) = match kind_apply(state, command) {
        Ok(applied) => applied,
        Err(error) => {
            if let Some(saved) = housekeeping {
                saved.restore(state);
            }
            return Err(error);
        }
    };
    append_audit(
        state,
        command,
        (&command.identity, command.kind.action(), &target),
        (&audit_outcome, command.kind.reason()),
    );
    if let Some(key) = request_key {
        let fair = state.cluster_version() >= 2;
        state.requests.remember(&key, outcome.clone(), fair);
    }
    Ok(outcome)
}

/// Appends `command`'s audit entry: `who` did `action` on `target`, with `outcome` given for
/// `reason`. From version 5 the entry is salted with the proposer's seed and keeps the reason in
/// a field of its own (the outcome names it and `who` by marks), so either can be redacted; a
/// command proposed just before the version was raised has no seed and is written plain.
pub(super) fn append_audit(
    state: &mut State,
    command: &Command,
    (who, action, target): (&str, &str, &str),
    (outcome, reason): (&str, &str),
) {
    let seed = (state.cluster_version() >= version::SALTED_AUDIT)
        .then(|| command.audit_seed_bytes())
        .flatten();
    let Some(seed) = seed else {
        let record = Record {
            at_ms: command.at_ms,
            identity: who,
            action,
            target,
            outcome,
            reason: "",
        };
        return state.audit.append(&record, None);
    };
    let outcome = rewind_shared::audit::outcome_template(outcome, who, reason);
    let record = Record {
        at_ms: command.at_ms,
        identity: who,
        action,
        target,
        outcome: &outcome,
        reason,
    };
    state.audit.append(&record, Some(&seed));
}

/// Whether the request log already answers `command` (a retry): its entry only repeats the
/// answer, so the leader decides nothing for it.
pub(super) fn answered(state: &State, command: &Command) -> bool {
    request_key(command).is_some_and(|key| state.requests.get(&key).is_some())
}

/// Commands whose handling may expire or lapse requests for approval before it refuses.
fn touches_requests(kind: &CommandKind) -> bool {
    matches!(
        kind,
        CommandKind::StartChange(_)
            | CommandKind::StartRollback(_)
            | CommandKind::DecideRequest(_)
            | CommandKind::AutoTrigger(_)
    )
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
            let objectives = service.rto_s != 0 || !service.freeze.is_empty();
            if objectives {
                version::require(state, version::SERVICE_OBJECTIVES, "RTO and freeze windows")?;
            }
            if service.from_version_ten() {
                version::require(
                    state,
                    version::DRIFT_GUARD,
                    "a service's drift policy, or its reconcile and clear-client-caches steps",
                )?;
            }
            check_no_cycle(state, service)?;
            state.services.insert(service.name.clone(), service.clone());
            let outcome = if objectives {
                let windows: Vec<&str> = service
                    .freeze
                    .iter()
                    .map(|window| window.text.as_str())
                    .collect();
                format!(
                    "ok: RTO {} s; freeze windows: {}",
                    service.rto_s,
                    if windows.is_empty() {
                        "none".to_string()
                    } else {
                        windows.join("; ")
                    }
                )
            } else {
                "ok".into()
            };
            let outcome = if service.drift_policy.is_default() {
                outcome
            } else {
                format!("{outcome}; drift policy {}", service.drift_policy.name())
            };
            Ok((Outcome::Done, service.name.clone(), outcome))
        }
        CommandKind::RegisterRelease { release } => register_release(state, release, at_ms),
        CommandKind::RegisterMigration { migration } => {
            register_migration(state, migration, &command.identity, at_ms)
        }
        CommandKind::StartChange(start) => request_change(state, command, start),
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
            reason,
        } => {
            let (number, summary) =
                super::schema::start_drill(state, *change, environment, &command.identity, at_ms)?;
            let change = change_id(*change);
            let detail =
                if state.cluster_version() >= version::DRILL_REASON_AUDITED && !reason.is_empty() {
                    format!("ok: {change} on {environment}: {reason}: {summary}")
                } else {
                    format!("ok: {change} on {environment}: {summary}")
                };
            Ok((Outcome::Drill(number), drill_id(number), detail))
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
        CommandKind::StartRollback(start) => request_rollback(state, command, start),
        CommandKind::DecideRequest(decide) => decide_request(state, command, decide),
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
            region,
        } => {
            if !region.is_empty() {
                version::require(
                    state,
                    version::ISOLATION_WITHIN_BUDGET,
                    "isolating a region's hosts",
                )?;
            }
            isolate_service(state, *rollback, (service, region), reason, at_ms)
        }
        CommandKind::Stall { rollback, evidence } => {
            let record = live_rollback_mut(state, *rollback, "stall")?;
            if record.status != RollbackStatus::Running {
                return Err(CoordinatorError::RollbackNotControllable {
                    rollback_id: record.id(),
                    status: record.status,
                    action: "stall".into(),
                });
            }
            // Every wave done, deferred hosts waiting (version 11): the first one's wave.
            let wave = record
                .current_wave()
                .or_else(|| {
                    record
                        .steps
                        .iter()
                        .find(|step| {
                            record.is_deferred(step) && !step.progress.status.is_terminal()
                        })
                        .map(|step| step.wave)
                })
                .unwrap_or(0);
            let id = record.id();
            pause_for_a_person(state, *rollback, wave, evidence.clone(), at_ms);
            Ok((
                Outcome::Rollback(*rollback),
                id,
                format!("paused: {evidence}"),
            ))
        }
        CommandKind::StartFireDrill { environment, start } => {
            version::require(state, version::FIRE_DRILLS, "rollback fire drills")?;
            start_fire_drill(state, command, environment, start)
        }
        CommandKind::FinishFireDrill { drill } => {
            version::require(state, version::FIRE_DRILLS, "rollback fire drills")?;
            finish_fire_drill(state, command, *drill)
        }
        CommandKind::AbortFireDrill { drill, reason } => {
            version::require(state, version::FIRE_DRILLS, "rollback fire drills")?;
            abort_fire_drill(state, command, *drill, reason)
        }
        CommandKind::DeferRegion {
            rollback,
            region,
            hosts,
            evidence,
        } => {
            version::require(
                state,
                version::REGION_LOSS,
                "deferring a lost region's hosts",
            )?;
            defer_region(state, *rollback, (region, hosts), evidence, at_ms)
        }
        CommandKind::EscalationDelivered {
            escalation,
            ok,
            detail,
        } => escalation_delivered(state, *escalation, *ok, detail),
        CommandKind::IncidentNotified {
            incident,
            event,
            ok,
            permanent,
            detail,
        } => {
            version::require(
                state,
                version::INCIDENT_NOTICES,
                "incident webhook deliveries",
            )?;
            let delivery = Delivery {
                ok: *ok,
                permanent: *permanent,
                detail,
            };
            incident_notified(state, *incident, *event, delivery, at_ms)
        }
        CommandKind::AutoTrigger(trigger) => auto_trigger(state, command, trigger),
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
        CommandKind::AdoptHostState {
            host_id, accepted, ..
        } => {
            version::require(state, version::DRIFT_GUARD, "host.adopt")?;
            // As the API bounds it: a service per line, 32 changes of 512 bytes each.
            let too_long = accepted
                .iter()
                .any(|line| line.len() > MAX_ACCEPTED_LINE_BYTES);
            if accepted.len() > rewind_shared::bounds::MAX_SERVICES_PER_HOST || too_long {
                return Err(CoordinatorError::invalid(
                    "accepted",
                    "an adoption names at most 256 services, each in at most 17 KiB",
                ));
            }
            if !state.hosts.contains_key(host_id) {
                return Err(CoordinatorError::UnknownHost {
                    host_id: host_id.clone(),
                });
            }
            let outcome = if accepted.is_empty() {
                "ok: no drift to accept".to_string()
            } else {
                format!("ok: accepted {}", accepted.join("; "))
            };
            Ok((Outcome::Done, host_id.clone(), outcome))
        }
        CommandKind::CertificateRenewed { not_after_s } => Ok((
            Outcome::Done,
            command.identity.clone(),
            format!("ok: valid until {not_after_s} s"),
        )),
        CommandKind::ConfirmAuditArchive {
            first,
            through,
            manifest_hash,
            reason,
        } => {
            version::require(state, version::AUDIT_ARCHIVE, "audit archive confirmations")?;
            state
                .audit
                .confirm_archive(*first, *through, manifest_hash)
                .map_err(|why| audit_refused("archive confirmation", why))?;
            Ok((
                Outcome::Done,
                format!("audit/{first}..{through}"),
                format!("ok: archived through {through}, manifest {manifest_hash}: {reason}"),
            ))
        }
        CommandKind::PruneAudit { through } => {
            version::require(state, version::AUDIT_ARCHIVE, "audit retention")?;
            let first = state.audit.first_index();
            let (pruned, last_at_ms) = state
                .audit
                .prune_through(*through)
                .map_err(|why| audit_refused("prune", why))?;
            let mut outcome = format!(
                "ok: {pruned} archived entries dropped; the chain goes on from entry {through}'s hash"
            );
            if state.cluster_version() >= version::ARCHIVE {
                let (changes, rollbacks) =
                    super::archive::archive_finished(state, last_at_ms, at_ms);
                if changes + rollbacks > 0 {
                    outcome.push_str(&format!(
                        "; {changes} changes and {rollbacks} rollbacks that ended by then moved to the archive"
                    ));
                }
            }
            Ok((Outcome::Done, format!("audit/{first}..{through}"), outcome))
        }
        CommandKind::RedactAudit {
            index,
            fields,
            reason,
        } => {
            version::require(state, version::AUDIT_ARCHIVE, "audit redaction")?;
            state
                .audit
                .redact(*index, fields)
                .map_err(|why| audit_refused("redaction", why))?;
            let names: Vec<&str> = fields.iter().map(|field| field.name()).collect();
            Ok((
                Outcome::Done,
                format!("audit/{index}"),
                format!("ok: {} erased: {reason}", names.join(", ")),
            ))
        }
        CommandKind::NoteIncident { incident, text } => {
            version::require(state, version::INCIDENTS, "incident notes")?;
            note_incident(state, *incident, &command.identity, text, at_ms)
        }
        CommandKind::CloseIncident {
            incident,
            rca_markdown,
            action_items,
            lessons,
        } => {
            version::require(state, version::INCIDENTS, "closing incidents")?;
            let closure = Closure {
                rca_markdown,
                action_items,
                lessons,
            };
            close_incident(state, *incident, &command.identity, closure, at_ms)
        }
        // Refused by apply(); kept exhaustive so a new kind is not forgotten here.
        CommandKind::ChangeMembership { .. } => Err(CoordinatorError::invalid(
            "command",
            "a membership change travels only as a Raft configuration change",
        )),
    }
}

fn audit_refused(what: &str, why: String) -> CoordinatorError {
    CoordinatorError::AuditRefused {
        what: what.to_string(),
        why,
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

pub fn unknown_incident(state: &State, number: u64) -> CoordinatorError {
    CoordinatorError::UnknownIncident {
        incident_id: incident_id(number),
        known: known_list(state.rollbacks.keys().map(|&number| incident_id(number))),
    }
}

pub fn unknown_rollback(state: &State, number: u64) -> CoordinatorError {
    CoordinatorError::UnknownRollback {
        rollback_id: rollback_id(number),
        known: known_list(state.rollbacks.keys().map(|&number| rollback_id(number))),
    }
}
