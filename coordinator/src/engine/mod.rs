//! The engine: a leader-only loop that makes the replicated intent true.
//!
//! Each tick it reads the state, asks [`decide`] what to do, proposes the resulting commands
//! (step started / finished, automatic rollbacks) and sends steps to agents. It wakes on every
//! applied command and at least every tick interval. Everything it decides is recorded through
//! the node before it acts, so a restarted coordinator resumes from the replicated state.

mod decide;
#[cfg(test)]
mod decide_drill_test;
#[cfg(test)]
mod decide_health_test;
#[cfg(test)]
mod decide_region_test;
#[cfg(test)]
mod decide_test;
mod escalation;
mod incident_webhook;
pub mod silences;
mod synthetics;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rewind_proto::v1::{self as pb, coordinator_message::Body, step_command};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, warn};

pub use decide::{
    Action, AgentAction, ESCALATION_RETRY_MS, EngineLimits, EngineMemory, MAX_ESCALATION_ATTEMPTS,
    Observations, SyntheticVerdict, decide,
};
pub use escalation::{SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, webhook_mac};

use crate::errors::CoordinatorError;
use crate::health::HealthBook;
use crate::node::NodeHandle;
use crate::node::raft::RaftStatus;
use crate::sessions::Sessions;
use crate::state_machine::{
    COORDINATOR_IDENTITY, Command, CommandKind, HealthAggregate, ShardPhase, StepTarget,
};

pub struct Engine {
    pub node: NodeHandle,
    /// Only the leader drives; a member that is not the leader waits for leadership.
    pub status: watch::Receiver<RaftStatus>,
    pub sessions: Arc<Sessions>,
    pub health: Arc<HealthBook>,
    pub limits: EngineLimits,
    pub tick: Duration,
    /// Where escalations go; None: they stay visible in `rollback explain` only.
    pub escalation: Option<crate::config::EscalationConfig>,
    /// Where incidents' events go; None: only `incident show` tells them.
    pub incidents: Option<crate::config::IncidentWebhookConfig>,
    /// How health gates' synthetic checks reach https:// URLs.
    pub synthetics_tls: rewind_shared::outbound::HttpsTrust,
}

/// Engine proposals sent to the Raft thread at once (see `Engine::propose_together`): under
/// `join_all`'s small-set size, so they keep their order, and a small share of the proposal
/// queue, which agents' step results share.
const PROPOSALS_TOGETHER: usize = 16;

/// Engine proposals the state machine refused, by their exact command. Losing a race is normal
/// and the next tick decides anew; but a decision the state keeps producing and refusing would
/// be proposed at every tick, each time a Raft log entry. So the same command refused again is
/// proposed less and less often (1 s, doubling, at most 10 s), and said once at warn. Only the
/// state machine's refusals count: a full queue, a lost leadership or a storage error says
/// nothing about the command.
#[derive(Default)]
struct RefusedProposals {
    by_command: HashMap<String, Refused>,
}

struct Refused {
    times: u32,
    next_at_ms: u64,
}

const REFUSED_BACKOFF: rewind_shared::backoff::Backoff = rewind_shared::backoff::Backoff {
    first: Duration::from_secs(1),
    max: Duration::from_secs(10),
    jitter: false,
};

impl RefusedProposals {
    fn key(kind: &CommandKind) -> String {
        serde_json::to_string(kind).unwrap_or_default()
    }

    fn due(&self, key: &str, now_ms: u64) -> bool {
        self.by_command
            .get(key)
            .is_none_or(|refused| now_ms >= refused.next_at_ms)
    }

    /// Records a refusal; returns how many times in a row this command was refused.
    fn refused(&mut self, key: String, now_ms: u64) -> u32 {
        let refused = self.by_command.entry(key).or_insert(Refused {
            times: 0,
            next_at_ms: 0,
        });
        refused.times += 1;
        // The first repeat goes at the next tick, as a lost race should.
        let backoff = match refused.times {
            1 => Duration::ZERO,
            times => REFUSED_BACKOFF.delay(times - 2),
        };
        refused.next_at_ms = now_ms + backoff.as_millis() as u64;
        refused.times
    }

    /// Forgets commands no longer decided (the state moved on) and accepted ones.
    fn keep_only(&mut self, decided: &HashSet<String>) {
        self.by_command.retain(|key, _| decided.contains(key));
    }
}

struct Live<'a> {
    sessions: &'a Sessions,
    health: &'a HealthBook,
    synthetics: &'a synthetics::SyntheticRuns,
}

impl Observations for Live<'_> {
    fn session(&self, host_id: &str) -> Option<u64> {
        self.sessions.generation(host_id)
    }

    fn verdict_since(&self, host_id: &str, service: &str, since_ms: u64) -> Option<(bool, String)> {
        self.health.verdict_since(host_id, service, since_ms)
    }

    fn aggregate(&self, service: &str, hosts: &[String], since_ms: u64) -> HealthAggregate {
        self.health.aggregate(service, hosts, since_ms)
    }

    fn drift(&self, host_id: &str, service: &str) -> Vec<String> {
        self.health.drift(host_id, service)
    }

    fn last_heard_ms(&self, host_id: &str) -> Option<u64> {
        self.health.last_heard_ms(host_id)
    }

    fn awaiting_report(&self, host_id: &str, now_ms: u64) -> bool {
        self.health.awaiting_answer(host_id, now_ms)
    }

    fn synthetics(&self, rollback: u64, wave: u32, since_ms: u64) -> Option<SyntheticVerdict> {
        self.synthetics.latest(rollback, wave, since_ms)
    }
}

impl Engine {
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let mut applied = self.node.subscribe();
        let mut status = self.status.clone();
        let mut memory = EngineMemory::default();
        let mut refusals = RefusedProposals::default();
        let synthetics = Arc::new(synthetics::SyntheticRuns::new(self.synthetics_tls.clone()));
        tokio::pin!(shutdown);
        info!("Engine started.");
        loop {
            if !status.borrow_and_update().is_leader {
                // A new leader starts with empty memory: it resends every running step (agents
                // answer from their journals) and re-observes health before any trigger fires.
                memory = EngineMemory::default();
                refusals = RefusedProposals::default();
                tokio::select! {
                    _ = &mut shutdown => break,
                    changed = status.changed() => if changed.is_err() { break },
                }
                if status.borrow().is_leader {
                    info!(
                        term = self.node.generation(),
                        "Leading: the engine drives rollbacks."
                    );
                }
                continue;
            }
            let refused = self
                .tick_once(&mut memory, &mut refusals, &synthetics)
                .await;
            if refused {
                // The same decision would be refused again at once: wait a whole tick rather
                // than spin on the log.
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(self.tick) => {}
                }
                continue;
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(self.tick) => {}
                changed = applied.changed() => if changed.is_err() { break },
                _ = self.health.asked_report_arrived() => {}
            }
        }
        info!("Engine stopped.");
    }

    /// Decides and acts once; returns whether any proposal was refused.
    async fn tick_once(
        &self,
        memory: &mut EngineMemory,
        refusals: &mut RefusedProposals,
        synthetics: &Arc<synthetics::SyntheticRuns>,
    ) -> bool {
        let now_ms = rewind_shared::time::now_ms();
        let seen = Live {
            sessions: &self.sessions,
            health: &self.health,
            synthetics,
        };
        let actions = self
            .node
            .read(|state| decide(state, &seen, memory, &self.limits, now_ms));
        let envelope = Envelope {
            cluster_id: self.node.cluster_id(),
            term: self.node.generation(),
            timeout_ms: self.limits.step_timeout_ms,
        };
        // Keep results only for gates the memory still tracks (those still running).
        synthetics.retain(|rollback, wave| memory.synthetics.contains_key(&(rollback, wave)));
        let mut refused = false;
        let mut decided = HashSet::new();
        // Proposals in a row go to the Raft thread together (see `propose_together`); anything
        // else the tick does waits until those before it are applied, as when they went one by
        // one.
        let mut proposals = Vec::new();
        for action in actions {
            crash_point(&action);
            if let Action::Propose(kind) = action {
                let key = RefusedProposals::key(&kind);
                if !refusals.due(&key, now_ms) {
                    decided.insert(key);
                    continue;
                }
                // A decision the leader prepares from the applied state (an automatic trigger)
                // goes alone, after those before it: prepared beside others it would be judged
                // against a state they are about to change, and go stale.
                if !crate::state_machine::decision::decided_on_leader(&kind) {
                    proposals.push((key, kind));
                    continue;
                }
                for run in [std::mem::take(&mut proposals), vec![(key, kind)]] {
                    refused |= self
                        .propose_together(run, refusals, &mut decided, now_ms)
                        .await;
                }
                continue;
            }
            let before = std::mem::take(&mut proposals);
            refused |= self
                .propose_together(before, refusals, &mut decided, now_ms)
                .await;
            match action {
                Action::Propose(_) => {}
                Action::AskReport { host_id, service } => {
                    let ask_id = self.health.ask(&host_id, &service, now_ms);
                    let ask = pb::CoordinatorMessage {
                        body: Some(Body::ReportNow(pb::ReportHealthNow {
                            service,
                            within_ms: u32::try_from(self.limits.verify_timeout_ms)
                                .unwrap_or(u32::MAX),
                            ask_id,
                        })),
                    };
                    // Not sent (no session, a full queue): nothing to wait for; its periodic
                    // reports still count, as before.
                    if let Err(error) = self.sessions.send(&host_id, ask) {
                        self.health.forget_ask(&host_id, ask_id);
                        debug!(%error, host_id, "Report not asked for.");
                    }
                }
                Action::RunSynthetics {
                    rollback,
                    wave,
                    checks,
                } => synthetics.spawn_run(rollback, wave, checks),
                Action::NotifyIncident { incident, event } => {
                    if let Some(config) = &self.incidents
                        && let Some(notice) =
                            incident_webhook::Notice::new(&self.node, config, incident, event)
                    {
                        tokio::spawn(notice.run(self.node.clone()));
                    }
                }
                Action::Escalate { escalation } => {
                    if let Some(config) = &self.escalation {
                        let delivery =
                            escalation::Delivery::new(&self.node, &self.health, config, escalation);
                        if let Some(delivery) = delivery {
                            tokio::spawn(delivery.run(self.node.clone()));
                        }
                    }
                }
                Action::Send {
                    step,
                    attempt,
                    service,
                    action,
                } => {
                    let step_id = step.step_id();
                    let trace = rewind_shared::trace::of_step(envelope.cluster_id, &step_id);
                    let span = rewind_shared::trace::step_span(&step_id, &trace);
                    let _entered = span.enter();
                    let trace = trace.with_parent_span(&span);
                    let message = step_message(&envelope, &step_id, &trace, &service, action);
                    match self.sessions.send(step.host_id(), message) {
                        Ok(_) => debug!(step_id, attempt, "Step sent."),
                        Err(error) => {
                            // Forget the send so the next tick tries again; the step timeout bounds it.
                            memory.sent.remove(&step_id);
                            debug!(%error, step_id, "Step not sent yet.");
                        }
                    }
                }
            }
        }
        refused |= self
            .propose_together(proposals, refusals, &mut decided, now_ms)
            .await;
        refusals.keep_only(&decided);
        refused
    }

    /// Proposes `proposals` (with their refusal keys) [`PROPOSALS_TOGETHER`] at a time without
    /// waiting for each to apply before the next, so one Raft round (one append, one flush)
    /// carries them, instead of one round each: a wave starting on a hundred hosts was a
    /// hundred rounds in a row. `join_all` first polls its futures in order (under its
    /// small-set size of 30), so they enter the Raft queue in the order `decide` chose. Returns
    /// whether any was refused; refusals by the state are recorded for backoff.
    async fn propose_together(
        &self,
        proposals: Vec<(String, CommandKind)>,
        refusals: &mut RefusedProposals,
        decided: &mut HashSet<String>,
        now_ms: u64,
    ) -> bool {
        let mut refused = false;
        let mut proposals = proposals.into_iter().peekable();
        while proposals.peek().is_some() {
            let together = proposals
                .by_ref()
                .take(PROPOSALS_TOGETHER)
                .map(|(key, kind)| {
                    let action = kind.action();
                    async move { (key, action, self.propose(kind).await) }
                });
            for (key, action, outcome) in futures::future::join_all(together).await {
                let Err(error) = outcome else { continue };
                refused = true;
                let by_the_state =
                    !error.is_retriable() && !matches!(error, CoordinatorError::NotLeader { .. });
                if !by_the_state {
                    continue;
                }
                if refusals.refused(key.clone(), now_ms) == 3 {
                    warn!(
                        %error,
                        action,
                        "The engine keeps deciding a command that is refused; \
                         it tries again less and less often."
                    );
                }
                decided.insert(key);
            }
        }
        refused
    }

    /// Proposes an engine decision; the refusal when it was not applied.
    async fn propose(&self, kind: CommandKind) -> Result<(), CoordinatorError> {
        let action = kind.action();
        // Every line about a step or a rollback carries its id and its trace, so one grep
        // follows it across members and hosts.
        let about = match &kind {
            CommandKind::StepStarted { step } | CommandKind::StepFinished { step, .. } => {
                Some(step.step_id())
            }
            CommandKind::Stall { rollback, .. } => {
                Some(crate::state_machine::rollback_id(*rollback))
            }
            _ => None,
        };
        let span = about.as_deref().map_or_else(tracing::Span::none, |id| {
            rewind_shared::trace::step_span(
                id,
                &rewind_shared::trace::of_step(self.node.cluster_id(), id),
            )
        });
        let said = rollback_of(&kind).and(describe(&kind));
        // A rollback the engine starts (a health policy's trigger) names its trace too.
        let starts_one = crate::api::starts_an_operation(&kind);
        let command = Command {
            at_ms: rewind_shared::time::now_ms(),
            identity: COORDINATOR_IDENTITY.to_string(),
            request_id: String::new(),
            audit_seed: String::new(),
            kind,
        };
        async move {
            match self.node.propose(command).await {
                Ok(outcome) => {
                    if starts_one {
                        crate::api::log_operation_trace(&self.node, &outcome);
                    }
                    if let Some(said) = said {
                        info!(action, "{said}");
                    }
                    Ok(())
                }
                Err(error) => {
                    // Losing a race with an agent's result or an operator's abort is normal.
                    debug!(%error, action, about, "Engine proposal refused.");
                    Err(error)
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// The rollback an engine decision is about, if any.
fn rollback_of(kind: &CommandKind) -> Option<u64> {
    match kind {
        CommandKind::StepStarted { step } | CommandKind::StepFinished { step, .. } => match step {
            StepTarget::Rollback { rollback, .. } | StepTarget::Gate { rollback, .. } => {
                Some(*rollback)
            }
            _ => None,
        },
        CommandKind::Stall { rollback, .. } => Some(*rollback),
        _ => None,
    }
}

/// A log line for the decisions worth one at info level.
fn describe(kind: &CommandKind) -> Option<String> {
    match kind {
        CommandKind::StepStarted { step } => Some(format!("Started {}.", step.step_id())),
        CommandKind::StepFinished {
            step, ok, detail, ..
        } => Some(format!(
            "{} {}: {detail}",
            step.step_id(),
            if *ok { "succeeded" } else { "FAILED" }
        )),
        CommandKind::Stall { evidence, .. } => Some(format!("Paused: {evidence}")),
        _ => None,
    }
}

/// Where and under which fencing token a step is sent.
struct Envelope<'a> {
    cluster_id: &'a str,
    term: u64,
    timeout_ms: u64,
}

fn step_message(
    envelope: &Envelope<'_>,
    step_id: &str,
    trace: &rewind_shared::trace::TraceParent,
    service: &str,
    action: AgentAction,
) -> pb::CoordinatorMessage {
    let action = match action {
        AgentAction::Capture => step_command::Action::Capture(pb::CaptureSnapshot {}),
        AgentAction::Activate {
            version,
            artifact_digest,
        } => step_command::Action::Activate(pb::ActivateRelease {
            version,
            artifact_digest,
        }),
        AgentAction::Restore {
            snapshot_id,
            supersedes,
            refuse_drift,
        } => step_command::Action::Restore(pb::RestoreSnapshot {
            snapshot_id,
            supersedes,
            refuse_drift,
        }),
        AgentAction::Restart => step_command::Action::Restart(pb::RestartService {}),
        AgentAction::Drain => step_command::Action::Drain(pb::Drain {}),
        AgentAction::Undrain => step_command::Action::Undrain(pb::Undrain {}),
        AgentAction::Reload => step_command::Action::Reload(pb::Reload {}),
        AgentAction::PauseJobs => step_command::Action::PauseJobs(pb::PauseJobs {}),
        AgentAction::ResumeJobs => step_command::Action::ResumeJobs(pb::ResumeJobs {}),
        AgentAction::PurgeCache => step_command::Action::PurgeCache(pb::PurgeCache {}),
        AgentAction::ScaleUp => step_command::Action::ScaleUp(pb::ScaleUp {}),
        AgentAction::Checks => step_command::Action::Checks(pb::RunChecks {}),
        AgentAction::Reconcile => step_command::Action::Reconcile(pb::Reconcile {}),
        AgentAction::ClearClientCaches => {
            step_command::Action::ClearClientCaches(pb::ClearClientCaches {})
        }
        AgentAction::Run { command, args } => step_command::Action::Run(pb::RunCommand {
            name: command,
            args: args.into_iter().collect(),
        }),
        AgentAction::Schema {
            txn_id,
            phase,
            down,
            migrations,
            commit,
            accept_data_loss,
            by,
        } => step_command::Action::Schema(pb::SchemaStep {
            txn_id,
            phase: match phase {
                ShardPhase::Check => pb::SchemaPhase::Check,
                ShardPhase::Prepare => pb::SchemaPhase::Prepare,
                ShardPhase::Resolve => pb::SchemaPhase::Resolve,
                ShardPhase::Verify => pb::SchemaPhase::Verify,
            }
            .into(),
            down,
            migrations: migrations
                .iter()
                .map(|migration| crate::api::convert::migration(migration, true))
                .collect(),
            commit,
            accept_data_loss,
            by,
        }),
    };
    pb::CoordinatorMessage {
        body: Some(Body::Step(pb::StepCommand {
            step_id: step_id.to_string(),
            term: envelope.term,
            service: service.to_string(),
            timeout_ms: envelope.timeout_ms,
            cluster_id: envelope.cluster_id.to_string(),
            traceparent: trace.to_string(),
            action: Some(action),
        })),
    }
}

/// Crash points for recovery tests (`REWIND_FAILPOINTS`, compiled in only with the `failpoints`
/// feature) at a schema transaction's phase boundaries, as the engine carries out what
/// `decide()` chose (kept out of the pure function): before a prepare starts, before a decision
/// is proposed, and once it is recorded, before a resolve starts.
fn crash_point(action: &Action) {
    match action {
        Action::Propose(CommandKind::DecideSchemaTxn { .. }) => {
            rewind_shared::crash_point!("coordinator.before-decision")
        }
        Action::Propose(CommandKind::StepStarted {
            step:
                StepTarget::Schema {
                    phase: ShardPhase::Prepare,
                    ..
                },
        }) => rewind_shared::crash_point!("coordinator.before-prepare"),
        Action::Propose(CommandKind::StepStarted {
            step:
                StepTarget::Schema {
                    phase: ShardPhase::Resolve,
                    ..
                },
        }) => rewind_shared::crash_point!("coordinator.after-decision"),
        // Between an archive's confirmation and the pruning it allows.
        Action::Propose(CommandKind::PruneAudit { .. }) => {
            rewind_shared::crash_point!("coordinator.before-audit-prune")
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_refused_again_and_again_is_proposed_less_and_less_often() {
        let mut refusals = RefusedProposals::default();
        let kind = CommandKind::Stall {
            rollback: 1,
            evidence: "x".into(),
        };
        let key = RefusedProposals::key(&kind);
        assert!(refusals.due(&key, 0));
        // A lost race: tried again at the next tick.
        assert_eq!(refusals.refused(key.clone(), 0), 1);
        assert!(refusals.due(&key, 0));
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..9 {
            refusals.refused(key.clone(), now);
            let next = refusals.by_command[&key].next_at_ms;
            assert!(!refusals.due(&key, next - 1) && refusals.due(&key, next));
            waits.push(next - now);
            now = next;
        }
        assert_eq!(
            waits,
            [
                1_000, 2_000, 4_000, 8_000, 10_000, 10_000, 10_000, 10_000, 10_000
            ]
        );
        // Once the state no longer leads to it, it is forgotten.
        refusals.keep_only(&HashSet::new());
        assert!(refusals.by_command.is_empty());
    }
}
