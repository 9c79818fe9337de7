//! `AgentService`: the stream each agent keeps open.
//!
//! The first message must be `Register`, for the host named by the agent's certificate. Then
//! health reports go to the health book (soft state, no disk write) and step results become
//! `StepFinished` commands.

use std::pin::Pin;
use std::time::Duration;

use rewind_proto::v1::{
    self as pb, agent_message, agent_service_server::AgentService, coordinator_message,
};
use rewind_shared::names::{self, truncate};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use super::gate::caller;
use super::status::invalid;
use super::{Context, convert};
use crate::state_machine::{
    CommandKind, RollbackStepKind, ShardReportRecord, StatementRecord, StepTarget,
};

/// How long an agent has to send `Register` after opening the stream.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most services one host may declare.
const MAX_SERVICES_PER_HOST: usize = 256;
/// Longest step detail kept; longer ones are cut.
const MAX_DETAIL_BYTES: usize = 4096;

pub struct Agents {
    pub context: Context,
}

type OutStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Agents {
    type SessionStream = OutStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<OutStream>, Status> {
        let caller = caller(&request)?;
        let identity = caller.id();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.next())
            .await
            .map_err(|_| {
                Status::deadline_exceeded("no Register message within 10 s of opening the session")
            })?
            .ok_or_else(|| {
                Status::cancelled("the agent closed the session before registering")
            })??;
        let Some(agent_message::Body::Register(register)) = first.body else {
            return Err(invalid(
                "body",
                "the first message of a session must be Register",
            ));
        };
        validate_register(&register, &caller.principal.name)?;
        let host_id = register.host_id.clone();
        let kind = CommandKind::RegisterHost {
            host_id: host_id.clone(),
            labels: convert::labels_from(register.labels),
            services: register.services,
            agent_version: register.agent_version,
        };
        self.context.propose(&identity, "", kind).await?;

        let (generation, outbound) = self.context.sessions.open(&host_id);
        let registered = pb::CoordinatorMessage {
            body: Some(coordinator_message::Body::Registered(pb::Registered {
                host_id: host_id.clone(),
                health_interval_ms: self.context.health_interval_ms,
            })),
        };
        // The channel is new and empty, so this cannot be full.
        let _ = self.context.sessions.send(&host_id, registered);
        // Then every flag of its services, so a reconnecting agent converges; changes after
        // this are pushed by the flag broadcaster.
        for snapshot in self
            .context
            .node
            .read(|state| crate::flags::snapshots_for(state, &host_id))
        {
            let message = pb::CoordinatorMessage {
                body: Some(coordinator_message::Body::Flags(snapshot)),
            };
            if self.context.sessions.send(&host_id, message).is_err() {
                warn!(
                    host_id,
                    "Could not queue the flag snapshot; the agent keeps its file."
                );
            }
        }
        info!(host_id, identity, generation, "Agent connected.");

        let context = self.context.clone();
        let span = info_span!("agent_session", host_id = %host_id, generation);
        tokio::spawn(
            async move {
                read_session(&context, &host_id, generation, inbound).await;
                context.sessions.close(&host_id, generation);
                info!("Agent disconnected.");
            }
            .instrument(span),
        );
        let stream = tokio_stream::wrappers::ReceiverStream::new(outbound).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// How a host's agent is named in commands and the audit log (as its certificate names it).
fn agent_identity(host_id: &str) -> String {
    format!("{}:{host_id}", rewind_shared::identity::Kind::Agent)
}

/// `host_name`: the host the agent's certificate names.
fn validate_register(register: &pb::Register, host_name: &str) -> Result<(), Status> {
    names::validate_name("register.host_id", &register.host_id)
        .map_err(|error| invalid("register.host_id", error.to_string()))?;
    if register.host_id != host_name {
        return Err(Status::permission_denied(format!(
            "certificate agent:{host_name} may not register host {:?}: an agent registers the host its certificate names",
            register.host_id
        )));
    }
    // The environment label decides who may see and change this host.
    if let Some(labels) = &register.labels
        && !labels.environment.is_empty()
    {
        names::validate_name("register.labels.environment", &labels.environment)
            .map_err(|error| invalid("register.labels.environment", error.to_string()))?;
    }
    if register.services.len() > MAX_SERVICES_PER_HOST {
        return Err(invalid(
            "register.services",
            format!("names more than {MAX_SERVICES_PER_HOST} services"),
        ));
    }
    for service in &register.services {
        names::validate_name("register.services", service)
            .map_err(|error| invalid("register.services", error.to_string()))?;
    }
    Ok(())
}

/// Reads what an agent sends while its session is the host's current one: once it is replaced
/// (the agent reconnected) or closed (its identity was revoked), nothing more it sends counts.
async fn read_session(
    context: &Context,
    host_id: &str,
    generation: u64,
    mut inbound: Streaming<pb::AgentMessage>,
) {
    while let Some(message) = inbound.next().await {
        let message = match message {
            Ok(message) => message,
            Err(status) => {
                debug!(%status, "Agent stream ended with an error.");
                return;
            }
        };
        if context.sessions.generation(host_id) != Some(generation) {
            debug!("The session was replaced or closed; ending it.");
            return;
        }
        match message.body {
            Some(agent_message::Body::Health(report)) => match check_report(&report) {
                Ok(()) => context
                    .health
                    .record(host_id, report, rewind_shared::time::now_ms()),
                Err(problem) => warn!(problem, "Dropped a health report."),
            },
            Some(agent_message::Body::StepResult(result)) => {
                record_step_result(context, host_id, result).await
            }
            Some(agent_message::Body::Inspected(answer)) => {
                context.sessions.answered(host_id, answer)
            }
            Some(agent_message::Body::OfflineHealth(summary)) => {
                record_offline_health(context, host_id, summary).await
            }
            Some(agent_message::Body::SelfRevert(report)) => {
                record_self_revert(context, host_id, report).await
            }
            Some(agent_message::Body::Register(_)) => {
                warn!("Ignored a second Register on the same session.")
            }
            None => warn!("Ignored an empty agent message."),
        }
    }
}

async fn record_step_result(context: &Context, host_id: &str, result: pb::StepResult) {
    let Some(step) = StepTarget::parse(&result.step_id) else {
        warn!(step_id = %result.step_id, "Ignored a result for a step id this coordinator never issues.");
        return;
    };
    if step.host_id() != host_id {
        warn!(step_id = %result.step_id, "Ignored a result for a step of another host.");
        return;
    }
    if matches!(
        step,
        StepTarget::Rollback {
            kind: RollbackStepKind::Verify,
            ..
        }
    ) {
        warn!(step_id = %result.step_id, "Ignored a result for a verify step: the coordinator verifies, not the agent.");
        return;
    }
    let mut ok = result.ok;
    let mut detail = truncate(&result.detail, MAX_DETAIL_BYTES).to_string();
    let capture_ok = ok && matches!(step, StepTarget::Capture { .. });
    if capture_ok && names::validate_name("snapshot_id", &result.snapshot_id).is_err() {
        // Without a usable snapshot id the host could not be rolled back: fail the capture.
        ok = false;
        detail = format!(
            "the agent reported a capture without a valid snapshot id ({:?})",
            truncate(&result.snapshot_id, 64).to_string()
        );
    }
    if result.replayed {
        detail = format!("{detail} (answered from the agent's journal)");
    }
    let snapshot_id = if ok {
        result.snapshot_id
    } else {
        String::new()
    };
    let kind = if let StepTarget::Schema { .. } = step {
        CommandKind::SchemaStepFinished {
            step,
            ok,
            detail,
            report: shard_report(result.schema.unwrap_or_default()),
        }
    } else {
        CommandKind::StepFinished {
            step,
            ok,
            detail,
            snapshot_id,
        }
    };
    let rollback_id = match &kind {
        CommandKind::StepFinished {
            step: StepTarget::Rollback { rollback, .. },
            ..
        } => Some(crate::state_machine::rollback_id(*rollback)),
        _ => None,
    };
    match context.propose(&agent_identity(host_id), "", kind).await {
        Ok(_) => info!(step_id = %result.step_id, ok, rollback_id, "Step result recorded."),
        // A duplicate result (the step already ended) is expected after redelivery.
        Err(status) => debug!(%status, step_id = %result.step_id, "Step result not recorded."),
    }
}

/// A shard's report as the log keeps it: every list and text bounded, so a report cannot
/// bloat the replicated state (the agent already cuts statements at 64 and 200 bytes).
fn shard_report(report: pb::ShardReport) -> ShardReportRecord {
    const MAX_ITEMS: usize = 65;
    let texts = |items: Vec<String>| -> Vec<String> {
        items
            .into_iter()
            .take(MAX_ITEMS)
            .map(|item| truncate(&item, 512).to_string())
            .collect()
    };
    ShardReportRecord {
        database_identity: truncate(&report.database_identity, 128).to_string(),
        version: truncate(&report.version, 128).to_string(),
        fingerprint: truncate(&report.fingerprint, 80).to_string(),
        data_loss: texts(report.data_loss),
        statements: report
            .statements
            .into_iter()
            .take(MAX_ITEMS)
            .map(|log| StatementRecord {
                script: truncate(&log.script, 128).to_string(),
                statement: truncate(&log.statement, 256).to_string(),
                rows: log.rows,
            })
            .collect(),
        exported: texts(report.exported),
        in_doubt: texts(report.in_doubt),
    }
}

/// Records (audits) a self-revert the agent did offline, then tells the agent so it stops
/// reporting it. A report that is malformed is refused by name and never acknowledged.
async fn record_self_revert(context: &Context, host_id: &str, report: pb::SelfRevert) {
    let checked = check_self_revert(&report);
    if let Err(problem) = checked {
        warn!(problem, "Refused a self-revert report.");
        return;
    }
    let id = report.id.clone();
    let note = crate::state_machine::SelfRevertNote {
        id: report.id,
        service: report.service,
        change_id: report.change_id,
        snapshot_id: report.snapshot_id,
        at_ms: report.at_ms,
        offline_since_ms: report.offline_since_ms,
        ok: report.ok,
        detail: truncate(&report.detail, MAX_DETAIL_BYTES).to_string(),
        evidence: truncate(&report.evidence, MAX_DETAIL_BYTES).to_string(),
    };
    let kind = CommandKind::RecordSelfRevert {
        host_id: host_id.to_string(),
        report: note,
    };
    // The request id makes a report sent again (the acknowledgement was lost) a no-op.
    let request_id = format!("self-revert/{id}");
    match context
        .propose(&agent_identity(host_id), &request_id, kind)
        .await
    {
        Ok(_) => {
            info!(id, "Self-revert recorded.");
            let recorded = pb::CoordinatorMessage {
                body: Some(coordinator_message::Body::SelfRevertRecorded(
                    pb::SelfRevertRecorded { id },
                )),
            };
            let _ = context.sessions.send(host_id, recorded);
        }
        Err(status) => {
            warn!(%status, id, "Self-revert not recorded; the agent will report it again.")
        }
    }
}

/// Most probes named in an offline summary.
const MAX_OFFLINE_PROBES: usize = 64;

/// Audits what an agent recorded while it had no coordinator, and keeps it on the host.
async fn record_offline_health(context: &Context, host_id: &str, summary: pb::OfflineHealth) {
    if let Err(problem) = check_offline_summary(&summary) {
        warn!(problem, "Refused an offline health summary.");
        return;
    }
    let mut text = format!(
        "offline {} s from {} ms: {} reports, {} with a failing probe",
        (summary.to_ms - summary.from_ms) / 1000,
        summary.from_ms,
        summary.reports,
        summary.failing_reports
    );
    for outage in &summary.probes {
        text += &format!(
            "; {}/{} failed {} times ({} s to {} s into the window), last: {}",
            truncate(&outage.service, 64),
            truncate(&outage.probe, 64),
            outage.failed,
            outage.first_failed_at_ms.saturating_sub(summary.from_ms) / 1000,
            outage.last_failed_at_ms.saturating_sub(summary.from_ms) / 1000,
            truncate(&outage.last_detail, 256)
        );
    }
    let kind = CommandKind::RecordOfflineHealth {
        host_id: host_id.to_string(),
        summary: truncate(&text, MAX_DETAIL_BYTES).to_string(),
    };
    match context.propose(&agent_identity(host_id), "", kind).await {
        Ok(_) => info!(
            reports = summary.reports,
            "Offline health summary recorded."
        ),
        Err(status) => warn!(%status, "Offline health summary not recorded."),
    }
}

fn check_offline_summary(summary: &pb::OfflineHealth) -> Result<(), String> {
    if summary.probes.len() > MAX_OFFLINE_PROBES {
        return Err(format!(
            "{} probes, at most {MAX_OFFLINE_PROBES}",
            summary.probes.len()
        ));
    }
    if summary.to_ms < summary.from_ms {
        return Err(format!(
            "the window ends ({}) before it starts ({})",
            summary.to_ms, summary.from_ms
        ));
    }
    Ok(())
}

fn check_self_revert(report: &pb::SelfRevert) -> Result<(), String> {
    let numbered = report.id.strip_prefix("sr-").is_some_and(|digits| {
        !digits.is_empty() && digits.len() <= 20 && digits.bytes().all(|b| b.is_ascii_digit())
    });
    if !numbered {
        return Err(format!(
            "id {:?} is not sr-<digits>",
            truncate(&report.id, 64)
        ));
    }
    for (field, value) in [
        ("service", &report.service),
        ("change_id", &report.change_id),
        ("snapshot_id", &report.snapshot_id),
    ] {
        names::validate_name(field, value).map_err(|error| error.to_string())?;
    }
    Ok(())
}

/// Most probe results one report may carry.
const MAX_PROBES_PER_REPORT: usize = 256;

/// Health reports are kept in memory, so their size is bounded before they are.
fn check_report(report: &pb::HealthReport) -> Result<(), String> {
    if report.probes.len() > MAX_PROBES_PER_REPORT {
        return Err(format!(
            "{} probe results, at most {MAX_PROBES_PER_REPORT} are kept",
            report.probes.len()
        ));
    }
    let oversize = report.probes.iter().find(|probe| {
        probe.service.len() + probe.probe.len() + probe.detail.len() > MAX_DETAIL_BYTES
    });
    match oversize {
        Some(probe) => Err(format!(
            "probe {:?} carries more than {MAX_DETAIL_BYTES} bytes of text",
            truncate(&probe.probe, 64).to_string()
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_self_revert_reports_and_offline_summaries_are_refused_by_name() {
        let good = pb::SelfRevert {
            id: "sr-1700".into(),
            service: "web".into(),
            change_id: "ch-2".into(),
            snapshot_id: "snap-1".into(),
            ..Default::default()
        };
        assert_eq!(check_self_revert(&good), Ok(()));
        for (report, why) in [
            (
                pb::SelfRevert {
                    id: "sr-x".into(),
                    ..good.clone()
                },
                "is not sr-<digits>",
            ),
            (
                pb::SelfRevert {
                    id: "rb-1".into(),
                    ..good.clone()
                },
                "is not sr-<digits>",
            ),
            (
                pb::SelfRevert {
                    service: "Web!".into(),
                    ..good.clone()
                },
                "service",
            ),
            (
                pb::SelfRevert {
                    change_id: String::new(),
                    ..good.clone()
                },
                "change_id",
            ),
        ] {
            let problem = check_self_revert(&report).unwrap_err();
            assert!(problem.contains(why), "{problem}");
        }
        let backwards = pb::OfflineHealth {
            from_ms: 10,
            to_ms: 5,
            ..Default::default()
        };
        assert!(
            check_offline_summary(&backwards)
                .unwrap_err()
                .contains("ends (5) before it starts (10)")
        );
        let crowded = pb::OfflineHealth {
            probes: vec![pb::ProbeOutage::default(); MAX_OFFLINE_PROBES + 1],
            ..Default::default()
        };
        assert!(
            check_offline_summary(&crowded)
                .unwrap_err()
                .contains("65 probes, at most 64")
        );
    }
}
