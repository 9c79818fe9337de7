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
use rewind_shared::bounds::{self, MAX_DETAIL_BYTES, MAX_OFFLINE_PROBES};
use rewind_shared::names::{self, truncate};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use super::gate::caller;
use super::status::invalid;
use super::{Context, convert};
use crate::health::AskedReport;
use crate::state_machine::{
    CommandKind, RollbackStepKind, ShardReportRecord, StatementRecord, StepTarget,
};

/// How long an agent has to send `Register` after opening the stream.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// After the first refused health report of a session, only every this many is logged.
const LOG_REFUSED_REPORT_EVERY: u64 = 100;
/// The gap kept between reports of a host the engine asked for them after the first (the agent
/// sends one every 200 ms until its service is healthy): bounded for as long as the ask lasts.
const ASKED_MIN_GAP: Duration = Duration::from_millis(150);

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
        if !self.context.sessions.may_open(&register.host_id) {
            return Err(Status::resource_exhausted(format!(
                "host {} opened more than {} sessions in the last minute: wait before reconnecting",
                register.host_id,
                bounds::MAX_SESSIONS_PER_HOST_PER_MINUTE
            )));
        }
        if let Some(refused) = self.unassigned(&register.host_id, &register.services) {
            warn!(host_id = %register.host_id, "Refused a registration: {refused}");
            return Err(Status::permission_denied(refused));
        }
        let host_id = register.host_id.clone();
        // Health reports of this session may speak only for the services it registered.
        let services = register.services.clone();
        let labels = convert::labels_from(register.labels);
        // A reconnect that changes nothing writes nothing: the log and the audit record a
        // host's registration when it is new or different.
        let unchanged = self.context.node.read(|state| {
            state.hosts.get(&host_id).is_some_and(|known| {
                known.labels == labels
                    && known.services == register.services
                    && known.agent_version == register.agent_version
                    && known.identity == identity
            })
        });
        if !unchanged {
            let kind = CommandKind::RegisterHost {
                host_id: host_id.clone(),
                labels,
                services: register.services,
                agent_version: register.agent_version,
            };
            self.context.propose(&identity, "", kind).await?;
        }

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
                read_session(&context, &host_id, &services, generation, inbound).await;
                context.sessions.close(&host_id, generation);
                info!("Agent disconnected.");
            }
            .instrument(span),
        );
        let stream = tokio_stream::wrappers::ReceiverStream::new(outbound).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}

impl Agents {
    /// Why `host` may not run one of `services`, if so. With `[[hosts]]` rules in the access
    /// policy, the rules assign services; without, a host keeps the services it registered
    /// with: a taken-over host cannot claim another service's health figures by declaring it.
    fn unassigned(&self, host: &str, services: &[String]) -> Option<String> {
        if let Some(policy) = self
            .context
            .gate
            .current_policy()
            .filter(|policy| !policy.host_rules.is_empty())
        {
            let service = services
                .iter()
                .find(|service| !policy.may_run(host, service))?;
            return Some(format!(
                "host {host} may not run service {service}: no [[hosts]] rule of the access \
                 policy assigns it (an admin adds one, or the agent's config drops the service)"
            ));
        }
        // At cluster version 1 hosts still declare services freely, as the release before
        // versions let them (and the ways to change a pinned host need version 2).
        let registered = self.context.node.read(|state| {
            (state.cluster_version() >= 2)
                .then(|| state.hosts.get(host).map(|record| record.services.clone()))
                .flatten()
        })?;
        let service = services
            .iter()
            .find(|service| !registered.contains(service))?;
        Some(format!(
            "host {host} is registered with services {} and may not add {service}: an admin \
             forgets the host so it registers anew (rewindctl host forget {host} --reason ...) \
             or assigns services with [[hosts]] rules in the access policy",
            if registered.is_empty() {
                "none".to_string()
            } else {
                registered.join(",")
            }
        ))
    }
}

/// How a host's agent is named in commands and the audit log (as its certificate names it).
fn agent_identity(host_id: &str) -> String {
    format!("{}:{host_id}", rewind_shared::identity::Kind::Agent)
}

/// `host_name`: the host the agent's certificate names. Every field within its bound
/// ([`rewind_shared::bounds`]): what is registered goes into the replicated log.
fn validate_register(register: &pb::Register, host_name: &str) -> Result<(), Status> {
    bounds::check_register(register).map_err(|refused| invalid(&refused.field, refused.problem))?;
    if register.host_id != host_name {
        return Err(Status::permission_denied(format!(
            "certificate agent:{host_name} may not register host {:?}: an agent registers the host its certificate names",
            register.host_id
        )));
    }
    Ok(())
}

/// Reads what an agent sends while its session is the host's current one: once it is replaced
/// (the agent reconnected) or closed (its identity was revoked), nothing more it sends counts.
async fn read_session(
    context: &Context,
    host_id: &str,
    services: &[String],
    generation: u64,
    mut inbound: Streaming<pb::AgentMessage>,
) {
    let mut refused_reports = 0u64;
    // A host's reports are weighed by how many it sends: no faster than half the interval it
    // was asked for, or one host could outweigh the fleet in its services' figures.
    let min_gap = Duration::from_millis(context.health_interval_ms / 2);
    let mut last_kept: Option<tokio::time::Instant> = None;
    let (mut offline_summaries, mut self_reverts) = (0u32, 0u32);
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
        // Forgotten while connected (even in a race with its registration): it registers anew.
        if !context.node.read(|state| state.hosts.contains_key(host_id)) {
            info!("The host was forgotten; ending its session.");
            return;
        }
        match message.body {
            Some(agent_message::Body::Health(report)) => {
                // The policy may have changed since the host registered: a service it no longer
                // assigns to this host is not this host's to report on.
                let assigned: Vec<String> = match context.gate.current_policy() {
                    Some(policy) => services
                        .iter()
                        .filter(|service| policy.may_run(host_id, service))
                        .cloned()
                        .collect(),
                    None => services.to_vec(),
                };
                // A host the engine asked (a verify, a gate) is heard at once, then every
                // ASKED_MIN_GAP until it says it is healthy.
                let now_ms = rewind_shared::time::now_ms();
                let since_kept = last_kept.map(|kept| kept.elapsed());
                let gap = match context
                    .health
                    .asked_report(host_id, report.answers_ask, now_ms)
                {
                    AskedReport::FirstAnswer => Duration::ZERO,
                    AskedReport::LaterAnswer => ASKED_MIN_GAP.min(min_gap),
                    AskedReport::No => min_gap,
                };
                if since_kept.is_some_and(|since| since < gap) {
                    debug!(
                        min_gap_ms = gap.as_millis() as u64,
                        "Dropped a health report sent too soon after the last one."
                    );
                    continue;
                }
                match bounds::check_health_report(&report, &assigned) {
                    Ok(()) => {
                        last_kept = Some(tokio::time::Instant::now());
                        // Kept inside the usual gap only as an answer: weighed as one report.
                        let quick = since_kept.is_some_and(|since| since < min_gap);
                        context.health.record_report(host_id, report, now_ms, quick)
                    }
                    Err(refused) => {
                        if refused_reports.is_multiple_of(LOG_REFUSED_REPORT_EVERY) {
                            warn!(
                                problem = %refused,
                                refused_in_session = refused_reports + 1,
                                "Dropped a health report that does not fit its bounds."
                            );
                        }
                        refused_reports += 1;
                    }
                }
            }
            Some(agent_message::Body::StepResult(result)) => {
                // Under the step's trace only once the id parsed as one this cluster issues.
                let span = match StepTarget::parse(&result.step_id) {
                    Some(step) => {
                        let step_id = step.step_id();
                        let trace =
                            rewind_shared::trace::of_step(context.node.cluster_id(), &step_id);
                        rewind_shared::trace::step_span(&step_id, &trace)
                    }
                    None => tracing::Span::none(),
                };
                record_step_result(context, host_id, result)
                    .instrument(span)
                    .await
            }
            Some(agent_message::Body::Inspected(answer)) => {
                context.sessions.answered(host_id, answer)
            }
            // Both go into the replicated log: a few per session, no more.
            Some(agent_message::Body::OfflineHealth(summary)) => {
                offline_summaries += 1;
                if offline_summaries > bounds::MAX_OFFLINE_SUMMARIES_PER_SESSION {
                    warn!(
                        "Refused an offline summary: more than {} in one session.",
                        bounds::MAX_OFFLINE_SUMMARIES_PER_SESSION
                    );
                } else {
                    record_offline_health(context, host_id, summary).await
                }
            }
            Some(agent_message::Body::SelfRevert(report)) => {
                self_reverts += 1;
                if self_reverts > bounds::MAX_SELF_REVERTS_PER_SESSION {
                    warn!(
                        "Refused a self-revert report: more than {} in one session.",
                        bounds::MAX_SELF_REVERTS_PER_SESSION
                    );
                } else if !services.contains(&report.service) {
                    warn!(service = %bounds::kept(&report.service, 64), "Refused a self-revert report for a service this host did not register.");
                } else {
                    record_self_revert(context, host_id, report).await
                }
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
    let mut detail = bounds::kept(&result.detail, MAX_DETAIL_BYTES);
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
    // Rewind just put the service there: the drift the agent last reported is gone (its own
    // next check, which runs at once, says so too).
    // (Not for an answer from the agent's journal: that step ran long ago.)
    let put_there = match &step {
        _ if result.replayed => None,
        StepTarget::Activate { change, .. } if ok => context.node.read(|state| {
            state
                .changes
                .get(change)
                .map(|change| change.service.clone())
        }),
        StepTarget::Rollback {
            service,
            kind: RollbackStepKind::Restore,
            ..
        } if ok => Some(service.clone()),
        _ => None,
    };
    if let Some(service) = put_there {
        context.health.clear_drift(host_id, &service);
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
    let identity = agent_identity(host_id);
    // A full proposal queue is waited out, not a reason to drop the result: the session reads
    // nothing more from this agent meanwhile (backpressure on its stream).
    let proposed = with_patience(STEP_RESULT_PATIENCE, || {
        context.propose(&identity, "", kind.clone())
    })
    .await;
    match proposed {
        Ok(_) => info!(step_id = %result.step_id, ok, rollback_id, "Step result recorded."),
        Err(status) if is_overloaded(&status) => warn!(
            %status,
            step_id = %result.step_id,
            patience_s = STEP_RESULT_PATIENCE.as_secs(),
            "Step result not recorded: the proposal queue stayed full; the step times out and \
             is sent again, and the agent answers from its journal."
        ),
        // A duplicate result (the step already ended) is expected after redelivery.
        Err(status) => debug!(%status, step_id = %result.step_id, "Step result not recorded."),
    }
}

/// How long a step result waits for room in a full proposal queue before it is given up.
const STEP_RESULT_PATIENCE: Duration = Duration::from_secs(30);

/// Whether a refusal says the member is overloaded (its proposal queue is full).
fn is_overloaded(status: &Status) -> bool {
    status
        .metadata()
        .get(super::status::ERROR_CODE_KEY)
        .is_some_and(|code| code == "overloaded")
}

/// Runs `attempt` again while it is refused as overloaded, waiting 20 ms, doubling to 1 s, for
/// at most `patience` in all; any other answer is returned at once.
async fn with_patience<T, F, Fut>(patience: Duration, mut attempt: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let started = tokio::time::Instant::now();
    let mut wait = Duration::from_millis(20);
    loop {
        match attempt().await {
            Err(status) if is_overloaded(&status) && started.elapsed() + wait <= patience => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
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
            .map(|item| bounds::kept(&item, 512))
            .collect()
    };
    ShardReportRecord {
        database_identity: bounds::kept(&report.database_identity, 128),
        version: bounds::kept(&report.version, 128),
        fingerprint: bounds::kept(&report.fingerprint, 80),
        data_loss: texts(report.data_loss),
        statements: report
            .statements
            .into_iter()
            .take(MAX_ITEMS)
            .map(|log| StatementRecord {
                script: bounds::kept(&log.script, 128),
                statement: bounds::kept(&log.statement, 256),
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
        detail: bounds::kept(&report.detail, MAX_DETAIL_BYTES),
        evidence: bounds::kept(&report.evidence, MAX_DETAIL_BYTES),
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
            bounds::kept(&outage.service, 64),
            bounds::kept(&outage.probe, 64),
            outage.failed,
            outage.first_failed_at_ms.saturating_sub(summary.from_ms) / 1000,
            outage.last_failed_at_ms.saturating_sub(summary.from_ms) / 1000,
            bounds::kept(&outage.last_detail, 256)
        );
    }
    let kind = CommandKind::RecordOfflineHealth {
        host_id: host_id.to_string(),
        summary: bounds::kept(&text, MAX_DETAIL_BYTES),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_step_result_waits_out_a_full_queue_within_its_patience_and_no_longer() {
        let overloaded = || {
            super::super::status::to_status(crate::errors::CoordinatorError::Overloaded(
                "1024 requests are queued".into(),
            ))
        };
        // Full three times, then room: recorded.
        let mut tries = 0;
        let recorded = with_patience(Duration::from_secs(30), || {
            tries += 1;
            let answer = if tries <= 3 {
                Err(overloaded())
            } else {
                Ok(tries)
            };
            async move { answer }
        })
        .await;
        assert_eq!(recorded.unwrap(), 4);
        // Full for good: given up after the patience, not before, and not in a tight loop.
        let started = tokio::time::Instant::now();
        let mut tries = 0;
        let given_up: Result<(), Status> = with_patience(Duration::from_secs(30), || {
            tries += 1;
            let answer = Err(overloaded());
            async move { answer }
        })
        .await;
        assert!(is_overloaded(&given_up.unwrap_err()));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(29) && waited <= Duration::from_secs(30),
            "{waited:?}"
        );
        assert!(tries < 40, "{tries} tries");
        // Another refusal (a duplicate result) is not waited on.
        let mut tries = 0;
        let refused: Result<(), Status> = with_patience(Duration::from_secs(30), || {
            tries += 1;
            async { Err(Status::failed_precondition("step not running")) }
        })
        .await;
        assert!(refused.is_err());
        assert_eq!(tries, 1);
    }

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
