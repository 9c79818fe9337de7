//! The engine's decisions, as a pure function of the replicated state, what the leader observes
//! (connected agents, health) and the engine's own memory of what it already sent.
//!
//! `decide()` returns actions; `engine::run` carries them out. Tests feed states and observations
//! and assert the actions.
//!
//! Kept in one file (over 700 lines): `decide()` is one pure function with its helpers, and one
//! read shows every action the engine can take.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::state_machine::schema::{self, StagesState};
use crate::state_machine::{
    ChangeRecord, ChangeStatus, CommandKind, DrillStatus, FireDrillStatus, GateOptions,
    HealthAggregate, MigrationRecord, PlanOptions, RollbackRecord, RollbackStatus,
    RollbackStepKind, RollbackStepRecord, SchemaOwner, SchemaStage, SchemaTxnRecord,
    SchemaTxnStatus, ShardPhase, State, StepProgress, StepStatus, StepTarget, SyntheticCheck,
    ThrottleLimits, TriggerSource, WaveRecord,
};

pub use crate::state_machine::MAX_ESCALATION_ATTEMPTS;
/// Wait between two deliveries of one escalation.
pub const ESCALATION_RETRY_MS: u64 = 10_000;

/// Timing and retry bounds for steps.
#[derive(Clone, Debug)]
pub struct EngineLimits {
    pub step_timeout_ms: u64,
    pub max_attempts: u32,
    pub verify_timeout_ms: u64,
    /// How often agents report health (`health.report-interval-ms`): a verify waits at least
    /// two of these for a returning agent's first report.
    pub report_interval_ms: u64,
    /// Hosts reverted at once by rollbacks that do not say.
    pub default_max_parallel: u32,
    /// Gate used by automatic rollbacks.
    pub default_gate: GateOptions,
    /// Whether escalations are delivered by webhook (one is configured).
    pub escalation_webhook: bool,
    /// Whether incidents are told to an incident system by webhook (one is configured).
    pub incident_webhook: bool,
    /// Bounds on automatic rollbacks.
    pub throttle: ThrottleLimits,
    /// How long archived audit entries stay (`[audit]`).
    pub audit_retention: crate::state_machine::AuditRetention,
}

impl EngineLimits {
    /// Plan options of an automatic rollback.
    pub fn automatic_plan(&self) -> PlanOptions {
        PlanOptions {
            max_parallel: self.default_max_parallel,
            max_unavailable: self.default_max_parallel,
            canary_region: String::new(),
            force: false,
            gate: self.default_gate.clone(),
            revert_expand: false,
            accept_data_loss: String::new(),
            schema_after_waves: false,
            overwrite_drift: false,
            exclude_hosts: Vec::new(),
        }
    }
}

/// What the leader sees outside the replicated state.
pub trait Observations {
    /// Generation of the host's current session, if it is connected.
    fn session(&self, host_id: &str) -> Option<u64>;
    /// First report after `since_ms`: do all of the service's probes pass, and why.
    fn verdict_since(&self, host_id: &str, service: &str, since_ms: u64) -> Option<(bool, String)>;
    fn aggregate(&self, service: &str, hosts: &[String], since_ms: u64) -> HealthAggregate;
    /// What the host last reported changed on `service` since rewind last put it there.
    fn drift(&self, host_id: &str, service: &str) -> Vec<String>;
    /// The latest result of the synthetic checks run for this gate since `since_ms`.
    fn synthetics(&self, rollback: u64, wave: u32, since_ms: u64) -> Option<SyntheticVerdict>;
    /// When the host's latest health report arrived, if this member has one (reports go to the leader).
    fn last_heard_ms(&self, host_id: &str) -> Option<u64>;
    /// Whether the host was asked for a report (`Action::AskReport`), its agent answers asks,
    /// and it has not reported its service healthy since.
    fn awaiting_report(&self, host_id: &str, now_ms: u64) -> bool;
}

/// How long a gate whose settle time has passed waits for the reports it asked its hosts for.
pub const GATE_ANSWER_WAIT_MS: u64 = 1_000;

/// Report intervals without a report after which a connected agent counts as gone when
/// judging a lost region: a session whose network vanished lives on until its keepalives give
/// up (tens of seconds), its reports stop at once.
pub const SILENT_REPORTS: u64 = 5;

/// Step timeouts a region must stay gone before its hosts are deferred: agents reconnecting to
/// a new leader, or a blip, do not move a healthy region behind the last wave.
pub const LOST_REGION_AFTER_STEP_TIMEOUTS: u64 = 2;

/// Step timeouts the rollback waits, every wave done, for deferred hosts none of which is back,
/// before it calls a person (30 minutes at the default step timeout).
pub const DEFERRED_WAIT_STEP_TIMEOUTS: u64 = 30;

/// How a run of a service's synthetic checks went.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticVerdict {
    pub ok: bool,
    /// One phrase per check.
    pub detail: String,
    /// When the run began.
    pub at_ms: u64,
}

/// Wait before proposing a policy trigger again when the last proposal did not commit.
pub const TRIGGER_RETRY_MS: u64 = 30_000;

/// Wait before running failing synthetic checks again, and before giving a run up as lost.
pub const SYNTHETIC_RETRY_MS: u64 = 2_000;
pub const SYNTHETIC_LOST_MS: u64 = 60_000;

/// The engine's memory: not replicated, rebuilt empty by a new leader (which then resends
/// running steps; agents answer those from their journals).
#[derive(Default)]
pub struct EngineMemory {
    /// step id -> (attempt, session generation) it was last sent on.
    pub sent: HashMap<String, (u32, u64)>,
    /// (service, condition as written) -> since when that condition of its policy has been
    /// breached. Keyed by the condition itself, so editing a policy never moves a running timer
    /// onto another condition.
    pub breaches: HashMap<(String, String), u64>,
    /// escalation id -> when its delivery was last tried.
    pub escalations: HashMap<u64, u64>,
    /// change -> when its policy breach was proposed as a trigger (one per change).
    pub triggered: HashMap<u64, u64>,
    /// (rollback, wave) -> when its gate last asked for the synthetic checks.
    pub synthetics: HashMap<(u64, u32), u64>,
    /// Schema transactions this leader saw being checked. One found preparing that is not here
    /// began its prepare under another leader (or before a restart): without a recorded
    /// decision it is aborted, never committed.
    pub schema_checked: HashSet<u64>,
    /// What this leader tried of the incident webhook's deliveries.
    pub notices: super::incident_webhook::NoticeMemory,
    /// When this leader last proposed to prune the audit log (0: not yet).
    pub audit_pruned_at_ms: u64,
    /// Verify step id -> what this leader saw of its host's agent.
    pub verify_watch: HashMap<String, VerifyWatch>,
    /// Gates (rollback, wave) whose hosts this leader asked for a report as their settle time
    /// ended, and when.
    pub gates_asked: HashMap<(u64, u32), u64>,
    /// (rollback, region) -> since when this leader has seen every agent of the region gone
    /// while other regions' were connected.
    pub lost_since: HashMap<(u64, String), u64>,
    /// Rollback -> since when it has waited, every wave done, for deferred hosts none of which
    /// is back.
    pub deferred_since: HashMap<u64, u64>,
}

/// What a leader saw of a verify's host: when it first looked (a new leader knows nothing of
/// before), and when it last found the host's agent offline.
#[derive(Clone, Copy, Debug)]
pub struct VerifyWatch {
    pub first_seen_ms: u64,
    pub offline_at_ms: Option<u64>,
}

/// A verify whose host's agent is away (a leader change, a network cut) waits past its timeout
/// for the agent to come back and report live, at most this much longer: an agent reconnects
/// within its backoff cap (10 s), and only reports received count.
pub const VERIFY_OFFLINE_GRACE_MS: u64 = 60_000;
/// After the agent is back (or a new leader first looks), the least wait for its first report
/// before judging the host; two report intervals if those are longer.
pub const VERIFY_REPORT_AFTER_RECONNECT_MS: u64 = 5_000;

/// Archived audit entries are dropped in batches: at once when this many may go, else at most
/// once an interval. Each pruning is an audit entry itself, so pruning whatever just aged out
/// at every tick would fill the log with prunes of one entry.
pub const AUDIT_PRUNE_BATCH: u64 = 1000;
pub const AUDIT_PRUNE_INTERVAL_MS: u64 = 60 * 60 * 1000;

/// What an agent is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentAction {
    Capture,
    Activate {
        version: String,
        artifact_digest: String,
    },
    /// Restore a snapshot; the agent then refuses any further step of the change it
    /// `supersedes`, so a delayed activation can never land after the restore.
    Restore {
        snapshot_id: String,
        supersedes: String,
        /// The agent refuses when the host drifted since rewind last put it there.
        refuse_drift: bool,
    },
    Restart,
    Drain,
    Undrain,
    Reload,
    PauseJobs,
    ResumeJobs,
    PurgeCache,
    ScaleUp,
    Checks,
    Reconcile,
    ClearClientCaches,
    /// A command of the agent's allow-list, by name, with argument values.
    Run {
        command: String,
        args: BTreeMap<String, String>,
    },
    /// A shard's step of a schema transaction, with the migrations' scripts.
    Schema {
        txn_id: String,
        phase: ShardPhase,
        down: bool,
        migrations: Vec<std::sync::Arc<MigrationRecord>>,
        commit: bool,
        accept_data_loss: bool,
        by: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Propose(CommandKind),
    Send {
        step: StepTarget,
        attempt: u32,
        service: String,
        action: AgentAction,
    },
    /// Tell the incident webhook of an incident's event.
    NotifyIncident {
        incident: u64,
        event: crate::state_machine::NoticeEvent,
    },
    /// Deliver an escalation by webhook.
    Escalate {
        escalation: u64,
    },
    /// Ask a host's agent for a health report now: a verify began there or a gate's settle time
    /// ended, and waiting for its next periodic report would cost up to a report interval.
    AskReport {
        host_id: String,
        service: String,
    },
    /// Run a gate's synthetic checks; the result comes back through `Observations::synthetics`.
    RunSynthetics {
        rollback: u64,
        wave: u32,
        checks: Vec<SyntheticCheck>,
    },
}

pub fn decide(
    state: &State,
    seen: &impl Observations,
    memory: &mut EngineMemory,
    limits: &EngineLimits,
    now_ms: u64,
) -> Vec<Action> {
    let mut driver = Driver {
        seen,
        memory: &mut *memory,
        limits,
        now_ms,
        actions: Vec::new(),
        running: HashSet::new(),
    };
    for change in state.changes.values() {
        drive_change(state, change, &mut driver);
    }
    for rollback in state
        .rollbacks
        .values()
        .filter(|rollback| !rollback.status.is_terminal())
    {
        drive_rollback(state, rollback, &mut driver);
        trip_breaker(state, rollback, &mut driver);
    }
    for drill in state
        .drills
        .values()
        .filter(|drill| drill.status == DrillStatus::Running)
    {
        if let StagesState::Waiting {
            stage,
            begun: false,
        } = schema::stages_state(state, drill.stages.iter().enumerate())
            && may_begin(state, &drill.stages[stage])
        {
            driver.propose(CommandKind::StartSchemaTxn {
                owner: SchemaOwner::Drill {
                    drill: drill.number,
                    stage,
                },
            });
        }
    }
    // Schema transactions run to their end whatever their owner does (an abort decides them).
    for txn in state
        .schema_txns
        .values()
        .filter(|txn| txn.status != SchemaTxnStatus::Done)
    {
        drive_schema_txn(state, txn, &mut driver);
    }
    driver.memory.schema_checked.retain(|number| {
        state
            .schema_txns
            .get(number)
            .is_some_and(|txn| txn.status != SchemaTxnStatus::Done)
    });
    // Forget synthetic runs of gates that are no longer running.
    driver.memory.synthetics.retain(|(rollback, wave), _| {
        state.rollbacks.get(rollback).is_some_and(|record| {
            record
                .waves
                .get(*wave as usize)
                .is_some_and(|gate| gate.gate.status == StepStatus::Running)
        })
    });
    // Archived audit entries past retention leave the cluster (never one no export covers).
    let prunable = if state.cluster_version() >= crate::state_machine::version::AUDIT_ARCHIVE {
        state
            .audit
            .prunable_through(limits.audit_retention, now_ms)
            .unwrap_or_else(|error| {
                tracing::warn!(%error, "The audit store cannot be read; nothing is pruned.");
                None
            })
    } else {
        None
    };
    if let Some(through) = prunable {
        let batch = through + 1 - state.audit.first_index() >= AUDIT_PRUNE_BATCH;
        let last = driver.memory.audit_pruned_at_ms;
        if batch || last == 0 || now_ms.saturating_sub(last) >= AUDIT_PRUNE_INTERVAL_MS {
            driver.memory.audit_pruned_at_ms = now_ms;
            driver.propose(CommandKind::PruneAudit { through });
        }
    }
    // Forget sends and absences of steps that are no longer running, so the memory stays bounded.
    let running = std::mem::take(&mut driver.running);
    driver
        .memory
        .sent
        .retain(|step_id, _| running.contains(step_id));
    driver
        .memory
        .verify_watch
        .retain(|step_id, _| running.contains(step_id));
    let live = |rollback: &u64| {
        state
            .rollbacks
            .get(rollback)
            .is_some_and(|record| !record.status.is_terminal())
    };
    driver
        .memory
        .lost_since
        .retain(|(rollback, _), _| live(rollback));
    // A gate asks again each time it runs (a resumed rollback retries a failed one).
    driver.memory.gates_asked.retain(|(rollback, wave), _| {
        state
            .rollbacks
            .get(rollback)
            .and_then(|record| record.waves.get(*wave as usize))
            .is_some_and(|wave| wave.gate.status == StepStatus::Running)
    });
    driver
        .memory
        .deferred_since
        .retain(|rollback, _| live(rollback));
    let mut actions = driver.actions;
    if limits.escalation_webhook {
        escalate(state, memory, now_ms, &mut actions);
    }
    if limits.incident_webhook {
        super::incident_webhook::due(state, &mut memory.notices, now_ms, &mut actions);
    }
    check_triggers(state, seen, memory, limits, now_ms, &mut actions);
    drive_fire_drills(state, seen, memory, limits, now_ms, &mut actions);
    actions
}

/// Rollback fire drills: scores each whose end came (its rollback ended, was refused, or its
/// change failed), and reverts what a drill deployed when nothing else will: the bad release
/// went undetected through the policy's watch, or a person aborted the drill. That revert is an
/// automatic rollback like any other, so the throttles judge it too.
fn drive_fire_drills(
    state: &State,
    seen: &impl Observations,
    memory: &mut EngineMemory,
    limits: &EngineLimits,
    now_ms: u64,
    actions: &mut Vec<Action>,
) {
    for drill in state.fire_drills.values() {
        let running = drill.status == FireDrillStatus::Running;
        if running && crate::state_machine::drill_end(state, drill).is_some() {
            actions.push(Action::Propose(CommandKind::FinishFireDrill {
                drill: drill.number,
            }));
            continue;
        }
        if !running && drill.status != FireDrillStatus::Aborted {
            continue;
        }
        if !crate::state_machine::revert_pending(state, drill) {
            continue;
        }
        let Some(change) = state.changes.get(&drill.change) else {
            continue;
        };
        let watch_ms = state
            .services
            .get(&drill.service)
            .map_or(0, |service| u64::from(service.policy.watch_s) * 1000);
        let undetected = now_ms > change.deployed_at_ms + watch_ms;
        let why = if !running {
            format!("{} was aborted by {}", drill.id(), drill.aborted_by)
        } else if undetected {
            format!(
                "{}: {} {} was not detected within the policy's watch of {} s",
                drill.id(),
                drill.service,
                drill.version,
                watch_ms / 1000
            )
        } else {
            continue;
        };
        let asked_lately = memory
            .triggered
            .get(&change.number)
            .is_some_and(|&asked| now_ms.saturating_sub(asked) < TRIGGER_RETRY_MS);
        if asked_lately {
            continue;
        }
        memory.triggered.insert(change.number, now_ms);
        actions.push(Action::Propose(CommandKind::AutoTrigger(
            crate::state_machine::AutoTrigger {
                service: drill.service.clone(),
                environment: drill.environment.clone(),
                source: TriggerSource::Policy,
                reason: format!("{why}; the drill reverts the release it deployed"),
                options: crate::plan::with_drift_policy(
                    state,
                    &drill.service,
                    &drill.environment,
                    limits.automatic_plan(),
                    |host, service| seen.drift(host, service),
                ),
                throttle: limits.throttle.clone(),
                decided: None,
            },
        )));
    }
}

/// Asks for delivery of every escalation not yet delivered, at most
/// [`MAX_ESCALATION_ATTEMPTS`] times each, [`ESCALATION_RETRY_MS`] apart.
fn escalate(state: &State, memory: &mut EngineMemory, now_ms: u64, actions: &mut Vec<Action>) {
    let mut pending = HashSet::new();
    for escalation in state.escalations.values() {
        if escalation.delivered || escalation.attempts >= MAX_ESCALATION_ATTEMPTS {
            continue;
        }
        pending.insert(escalation.id);
        let due = memory
            .escalations
            .get(&escalation.id)
            .is_none_or(|&last| now_ms.saturating_sub(last) >= ESCALATION_RETRY_MS);
        if due {
            memory.escalations.insert(escalation.id, now_ms);
            actions.push(Action::Escalate {
                escalation: escalation.id,
            });
        }
    }
    memory.escalations.retain(|id, _| pending.contains(id));
}

/// What to do with a running agent step whose result is overdue.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnTimeout {
    /// Start another attempt, up to `max_attempts`, then fail it.
    Retry,
    /// Fail it: its change has ended, so it must not be sent again.
    Fail,
    /// Leave it: its rollback is paused; a resume retries it.
    Wait,
}

struct Driver<'a, O: Observations> {
    seen: &'a O,
    memory: &'a mut EngineMemory,
    limits: &'a EngineLimits,
    now_ms: u64,
    actions: Vec<Action>,
    /// Step ids seen running this tick (a set: the memory is filtered by it every tick).
    running: HashSet<String>,
}

impl<O: Observations> Driver<'_, O> {
    fn propose(&mut self, kind: CommandKind) {
        self.actions.push(Action::Propose(kind));
    }

    /// Sends a running step to the host's current session if that session has not seen this
    /// attempt, and handles its timeout. Pending steps are started by the callers, whether or not
    /// the host is connected: a host that never answers fails the step after its attempts,
    /// instead of holding the change or rollback forever.
    fn drive_running(
        &mut self,
        step: StepTarget,
        progress: &StepProgress,
        service: &str,
        action: AgentAction,
        on_timeout: OnTimeout,
    ) {
        let step_id = step.step_id();
        self.running.insert(step_id.clone());
        if self.now_ms.saturating_sub(progress.started_at_ms) > self.limits.step_timeout_ms {
            match on_timeout {
                OnTimeout::Wait => {}
                OnTimeout::Retry if progress.attempts < self.limits.max_attempts => {
                    self.propose(CommandKind::StepStarted { step });
                }
                OnTimeout::Retry | OnTimeout::Fail => {
                    let detail = format!(
                        "no result after {} attempts of {} ms",
                        progress.attempts, self.limits.step_timeout_ms
                    );
                    self.propose(CommandKind::StepFinished {
                        step,
                        ok: false,
                        detail,
                        snapshot_id: String::new(),
                    });
                }
            }
            return;
        }
        if on_timeout == OnTimeout::Fail {
            return;
        }
        let Some(generation) = self.seen.session(step.host_id()) else {
            return;
        };
        if self.memory.sent.get(&step_id) != Some(&(progress.attempts, generation)) {
            self.memory
                .sent
                .insert(step_id, (progress.attempts, generation));
            let service = service.to_string();
            self.actions.push(Action::Send {
                step,
                attempt: progress.attempts,
                service,
                action,
            });
        }
    }
}

fn drive_change(state: &State, change: &ChangeRecord, driver: &mut Driver<'_, impl Observations>) {
    let active = matches!(
        change.status,
        ChangeStatus::Capturing | ChangeStatus::Deploying
    );
    // Every change ever made is walked on every tick: a host with nothing pending or running
    // costs two comparisons, not the allocations below.
    let needs_driving = |progress: &StepProgress, phase: ChangeStatus| {
        progress.status == StepStatus::Running
            || (progress.status == StepStatus::Pending && change.status == phase)
    };
    for host in &change.hosts {
        if !needs_driving(&host.capture, ChangeStatus::Capturing)
            && !needs_driving(&host.activate, ChangeStatus::Deploying)
        {
            continue;
        }
        let capture = StepTarget::Capture {
            change: change.number,
            host_id: host.host_id.clone(),
        };
        let activate = StepTarget::Activate {
            change: change.number,
            host_id: host.host_id.clone(),
        };
        let artifact_digest = state
            .releases
            .get(&change.service)
            .and_then(|versions| versions.get(&change.version))
            .map(|release| release.artifact_digest.clone())
            .unwrap_or_default();
        let activate_action = AgentAction::Activate {
            version: change.version.clone(),
            artifact_digest,
        };
        let phases = [
            (capture, &host.capture, AgentAction::Capture),
            (activate, &host.activate, activate_action),
        ];
        for (step, progress, action) in phases {
            match progress.status {
                StepStatus::Pending if active && is_current_phase(change, &step) => {
                    driver.propose(CommandKind::StepStarted { step });
                }
                StepStatus::Running => {
                    // A step left running by a change that ended (failed, or interrupted by a
                    // rollback) is never resent, only timed out, so nothing waits on it forever.
                    let on_timeout = if active {
                        OnTimeout::Retry
                    } else {
                        OnTimeout::Fail
                    };
                    driver.drive_running(step, progress, &change.service, action, on_timeout);
                }
                _ => {}
            }
        }
    }
    if active {
        begin_change_schema(state, change, driver);
    }
}

/// Begins the schema stage a change waits for: its expand migrations once every host is
/// captured, the rest once every host is activated.
fn begin_change_schema(
    state: &State,
    change: &ChangeRecord,
    driver: &mut Driver<'_, impl Observations>,
) {
    let after_activation = match change.status {
        ChangeStatus::Capturing => false,
        ChangeStatus::Deploying => true,
        _ => return,
    };
    let phase_done = change.hosts.iter().all(|host| {
        let step = if after_activation {
            &host.activate
        } else {
            &host.capture
        };
        step.status == StepStatus::Succeeded
    });
    if !phase_done {
        return;
    }
    let stages = change
        .schema
        .iter()
        .enumerate()
        .filter(|(_, stage)| stage.after_activation == after_activation);
    if let StagesState::Waiting {
        stage,
        begun: false,
    } = schema::stages_state(state, stages)
        && may_begin(state, &change.schema[stage])
    {
        driver.propose(CommandKind::StartSchemaTxn {
            owner: SchemaOwner::Change {
                change: change.number,
                stage,
            },
        });
    }
}

/// Whether a stage's transaction may begin now: no other runs on its database and environment
/// (it waits for that one to end).
fn may_begin(state: &State, stage: &SchemaStage) -> bool {
    schema::busy(state, &stage.database, &stage.environment).is_none()
}

/// Drives a schema transaction through its phases (see `state_machine::schema`).
fn drive_schema_txn(
    state: &State,
    txn: &SchemaTxnRecord,
    driver: &mut Driver<'_, impl Observations>,
) {
    let current = match txn.status {
        SchemaTxnStatus::Checking => {
            driver.memory.schema_checked.insert(txn.number);
            ShardPhase::Check
        }
        SchemaTxnStatus::Preparing => {
            if !driver.memory.schema_checked.contains(&txn.number) {
                driver.propose(CommandKind::DecideSchemaTxn {
                    txn: txn.number,
                    commit: false,
                    reason: "the coordinator restarted or changed leader while shards were \
                             preparing, before a decision was recorded"
                        .into(),
                });
                return;
            }
            if let Some(failed) = txn
                .shards
                .iter()
                .find(|shard| shard.prepare.status == StepStatus::Failed)
            {
                driver.propose(CommandKind::DecideSchemaTxn {
                    txn: txn.number,
                    commit: false,
                    reason: format!(
                        "prepare failed on {}: {}",
                        failed.host_id, failed.prepare.detail
                    ),
                });
                return;
            }
            if txn
                .shards
                .iter()
                .all(|shard| shard.prepare.status == StepStatus::Succeeded)
            {
                let (commit, reason) = match schema::prepared_problems(txn) {
                    None => (true, format!("all {} shards prepared", txn.shards.len())),
                    Some(problem) => (false, format!("every shard prepared, but {problem}")),
                };
                driver.propose(CommandKind::DecideSchemaTxn {
                    txn: txn.number,
                    commit,
                    reason,
                });
                return;
            }
            ShardPhase::Prepare
        }
        SchemaTxnStatus::Resolving => ShardPhase::Resolve,
        SchemaTxnStatus::Verifying => ShardPhase::Verify,
        SchemaTxnStatus::Done => return,
    };
    let migrations: Vec<std::sync::Arc<MigrationRecord>> = txn
        .migrations
        .iter()
        .filter_map(|version| {
            state
                .migrations
                .get(&txn.database)
                .and_then(|versions| versions.get(version))
                .cloned()
        })
        .collect();
    for shard in &txn.shards {
        for phase in ShardPhase::ALL {
            let progress = shard.step(phase);
            let step = StepTarget::Schema {
                txn: txn.number,
                phase,
                host_id: shard.host_id.clone(),
            };
            let retry_resolve = phase == ShardPhase::Resolve
                && current == ShardPhase::Resolve
                && progress.status == StepStatus::Failed
                && driver.now_ms.saturating_sub(progress.finished_at_ms)
                    >= schema::RESOLVE_RETRY_MS;
            match progress.status {
                StepStatus::Pending if phase == current => {
                    driver.propose(CommandKind::StepStarted { step });
                }
                StepStatus::Failed if retry_resolve => {
                    driver.propose(CommandKind::StepStarted { step });
                }
                StepStatus::Running => {
                    // A step of a phase that is over (a prepare still out when the decision was
                    // taken) is never resent, only timed out.
                    let on_timeout = if phase == current {
                        OnTimeout::Retry
                    } else {
                        OnTimeout::Fail
                    };
                    let action = AgentAction::Schema {
                        txn_id: txn.id(),
                        phase,
                        down: txn.down,
                        migrations: migrations.clone(),
                        commit: txn
                            .decision
                            .as_ref()
                            .is_some_and(|decision| decision.commit),
                        accept_data_loss: !txn.accept_data_loss.is_empty(),
                        by: txn.by.clone(),
                    };
                    driver.drive_running(step, progress, &txn.database, action, on_timeout);
                }
                _ => {}
            }
        }
    }
}

/// Begins a running rollback's schema stage that is due, once its database is free.
fn begin_rollback_schema(
    state: &State,
    rollback: &RollbackRecord,
    stage: usize,
    driver: &mut Driver<'_, impl Observations>,
) {
    let planned = &rollback.schema[stage];
    if rollback.status != RollbackStatus::Running || !may_begin(state, planned) {
        return;
    }
    if schema::shards_of(state, &planned.database, &planned.environment).is_empty() {
        // Proposing again would be refused again: a person must look.
        driver.propose(CommandKind::Stall {
            rollback: rollback.number,
            evidence: format!(
                "no host in environment {:?} runs {} any more: its schema revert ({}) has no \
                 shard to run on",
                planned.environment,
                planned.database,
                planned.versions.join(", ")
            ),
        });
    } else {
        driver.propose(CommandKind::StartSchemaTxn {
            owner: SchemaOwner::Rollback {
                rollback: rollback.number,
                stage,
            },
        });
    }
}

fn is_current_phase(change: &ChangeRecord, step: &StepTarget) -> bool {
    match step {
        StepTarget::Capture { .. } => change.status == ChangeStatus::Capturing,
        StepTarget::Activate { .. } => change.status == ChangeStatus::Deploying,
        StepTarget::Rollback { .. } | StepTarget::Gate { .. } | StepTarget::Schema { .. } => false,
    }
}

/// A rollback paused on a wave of a service whose policy trips the circuit breaker after that
/// many failures (`isolate_after_failures`, counted by the escalations each failure opened):
/// the service is isolated (its failing hosts, within max_unavailable) and the rollback goes
/// on with the rest, instead of waiting for a person again.
fn trip_breaker(
    state: &State,
    rollback: &RollbackRecord,
    driver: &mut Driver<'_, impl Observations>,
) {
    if rollback.status != RollbackStatus::Paused
        || state.cluster_version() < crate::state_machine::version::ISOLATION_WITHIN_BUDGET
    {
        return;
    }
    let Some(wave) = rollback.current_wave() else {
        return;
    };
    let service = &rollback.waves[wave as usize].service;
    let Some(limit) = state
        .services
        .get(service)
        .map(|record| record.isolate_after_failures)
        .filter(|&limit| limit > 0)
    else {
        return;
    };
    if rollback.isolated.contains(service) {
        return;
    }
    // Only a pause on a failure of this wave (a host's step or its gate), which the isolation
    // takes out; not a person's pause, a stall or a schema revert's.
    let wave_record = &rollback.waves[wave as usize];
    let failed = wave_record.gate.status == StepStatus::Failed
        || rollback
            .failed_hosts
            .iter()
            .any(|host| wave_record.hosts.contains(host));
    if !failed {
        return;
    }
    let failures = rollback
        .escalations
        .iter()
        .filter_map(|id| state.escalations.get(id))
        .filter(|escalation| escalation.wave == wave && &escalation.service == service)
        .count();
    if failures >= limit as usize {
        driver.propose(CommandKind::IsolateService {
            rollback: rollback.number,
            service: service.clone(),
            reason: format!(
                "tripped by {service}'s policy: wave {} failed {failures} times (isolate after \
                 {limit})",
                wave + 1
            ),
            region: String::new(),
        });
    }
}

/// Drives the rollback's current wave: hosts start within `max_parallel` and `max_unavailable`,
/// each goes through its steps, and once all are done the wave's health gate runs.
fn drive_rollback(
    state: &State,
    rollback: &RollbackRecord,
    driver: &mut Driver<'_, impl Observations>,
) {
    // A region whose every agent is gone while others' are there is lost (cluster version
    // 11): its hosts do not count against max_unavailable, and once gone for two step timeouts
    // they are deferred until they return.
    let lost = if state.cluster_version() >= crate::state_machine::version::REGION_LOSS {
        lost_regions(rollback, driver)
    } else {
        BTreeMap::new()
    };
    defer_lost_regions(rollback, &lost, driver);
    // Contract and data migrations are reverted before any wave (cluster version 9): the waves
    // wait for them, one database at a time.
    let before_waves = rollback
        .schema_stages()
        .filter(|(_, stage)| !stage.after_activation);
    match schema::stages_state(state, before_waves) {
        StagesState::Done => {}
        StagesState::Waiting {
            stage,
            begun: false,
        } => return begin_rollback_schema(state, rollback, stage, driver),
        _ => return,
    }
    let Some(wave_index) = rollback.current_wave() else {
        // Every wave is done: hosts of a lost region are reverted as they return, and the
        // other schema reverts follow, one database at a time.
        drive_deferred_hosts(state, rollback, &lost, driver);
        if let StagesState::Waiting {
            stage,
            begun: false,
        } = schema::stages_state(state, rollback.schema_stages())
        {
            begin_rollback_schema(state, rollback, stage, driver);
        }
        return;
    };
    let wave = &rollback.waves[wave_index as usize];
    if lost.contains_key(&wave.region) {
        // Its agents are gone: nothing can be sent, and no attempt is spent timing out while
        // the region is deferred.
        return;
    }
    let Some(change) = state.changes.get(&wave.change) else {
        return;
    };
    let running = rollback.status == RollbackStatus::Running;
    // A deferred host waits for its region, after the last wave: it holds no wave up.
    let steps: Vec<_> = rollback
        .wave_steps(wave_index)
        .filter(|step| !rollback.is_deferred(step))
        .collect();
    let any_failed = steps
        .iter()
        .any(|step| step.progress.status == StepStatus::Failed);
    // Each host's steps, in the plan's order: looked up per host below, so a tick costs the
    // wave's steps once, not once per host (a 1,000-host wave was a million comparisons).
    let mut steps_of: HashMap<&str, Vec<&RollbackStepRecord>> = HashMap::new();
    for &step in &steps {
        steps_of
            .entry(step.host_id.as_str())
            .or_default()
            .push(step);
    }
    // Hosts of the service already out of service: those of the plan that are not connected
    // (a registered host outside the plan may be long gone; it does not hold the plan up).
    let disconnected: BTreeSet<&str> = rollback
        .waves
        .iter()
        .filter(|other| other.service == wave.service)
        .filter(|other| !lost.contains_key(&other.region))
        .flat_map(|other| other.hosts.iter().map(String::as_str))
        .filter(|host_id| {
            !rollback
                .deferred_hosts
                .iter()
                .any(|deferred| deferred == host_id)
        })
        .filter(|host_id| driver.seen.session(host_id).is_none())
        .collect();
    let mut in_progress: BTreeSet<&str> = BTreeSet::new();
    // |in_progress ∪ disconnected|, kept as hosts begin rather than counted for every host.
    let mut unavailable_count = disconnected.len();
    let activating: HashSet<&str> = change
        .hosts
        .iter()
        .filter(|host| host.activate.status == StepStatus::Running)
        .map(|host| host.host_id.as_str())
        .collect();
    let mut held_by_unavailable = false;
    for host_id in &wave.hosts {
        let host_steps = steps_of
            .get(host_id.as_str())
            .into_iter()
            .flatten()
            .copied();
        let Some((next, started)) = next_step(host_steps, host_id) else {
            continue;
        };
        if !started {
            // A host not yet begun starts only within the bounds, never after a failure, and
            // never while the change's own activation may still run there.
            let activating = activating.contains(host_id.as_str());
            // With this host: |in_progress ∪ disconnected ∪ {host}|.
            let counted =
                disconnected.contains(host_id.as_str()) || in_progress.contains(host_id.as_str());
            let unavailable = unavailable_count + usize::from(!counted);
            // An isolation's hosts were chosen within max_unavailable when it was recorded
            // (before cluster version 10: the whole service, at once, by design).
            let bounded = !wave.isolation;
            let over_unavailable =
                bounded && unavailable > rollback.options.max_unavailable as usize;
            let over_parallel =
                bounded && in_progress.len() >= rollback.options.max_parallel as usize;
            if !running || any_failed || activating || over_parallel || over_unavailable {
                held_by_unavailable |= over_unavailable && running && !any_failed && !activating;
                continue;
            }
        }
        // A host already begun is taken to the end of its steps even after another host failed,
        // so no host is left drained or restored but not restarted.
        if in_progress.insert(host_id) && !disconnected.contains(host_id.as_str()) {
            unavailable_count += 1;
        }
        drive_host_step(state, rollback, (change, wave), next, driver);
    }
    if held_by_unavailable && in_progress.is_empty() {
        // Nothing runs and nothing may start: hosts of the plan that are down already use the
        // whole max_unavailable. Waiting would wait forever, so a person is called instead.
        let down: Vec<&str> = disconnected.iter().copied().collect();
        driver.propose(CommandKind::Stall {
            rollback: rollback.number,
            evidence: format!(
                "wave {} ({} in {}) cannot begin another host: {} of the plan's hosts of {} are \
                 down ({}) and max_unavailable is {}",
                wave_index + 1,
                wave.service,
                wave.region,
                down.len(),
                wave.service,
                down.join(", "),
                rollback.options.max_unavailable
            ),
        });
        return;
    }
    let wave_done = steps.iter().all(|step| {
        matches!(
            step.progress.status,
            StepStatus::Succeeded | StepStatus::Skipped
        )
    });
    if !running || !wave_done {
        return;
    }
    let gate = StepTarget::Gate {
        rollback: rollback.number,
        wave: wave_index,
    };
    match wave.gate.status {
        StepStatus::Pending => driver.propose(CommandKind::StepStarted { step: gate }),
        StepStatus::Running => {
            // Judged on the hosts that were reverted, not on ones an operator skipped.
            let reverted: Vec<String> = wave
                .hosts
                .iter()
                .filter(|host_id| !rollback.skipped_hosts.contains(host_id))
                .filter(|host_id| !rollback.deferred_hosts.contains(host_id))
                .filter(|host_id| {
                    steps_of.get(host_id.as_str()).is_some_and(|host_steps| {
                        host_steps.iter().any(|step| {
                            step.kind == RollbackStepKind::Restore
                                && step.progress.status == StepStatus::Succeeded
                        })
                    })
                })
                .cloned()
                .collect();
            let checks = state
                .services
                .get(&wave.service)
                .map(|service| service.synthetics.as_slice())
                .unwrap_or_default();
            let gate = GateTarget {
                wave: wave_index,
                hosts: &reverted,
                checks,
            };
            judge_gate(rollback, change, gate, driver);
        }
        _ => {}
    }
}

/// Regions of the rollback whose every host's agent is gone (no session, or silent for
/// [`SILENT_REPORTS`] report intervals) while another region's are there, each with when this
/// leader first saw it so (a new leader starts counting anew, so agents reconnecting to it are
/// not taken for a lost region).
fn lost_regions(
    rollback: &RollbackRecord,
    driver: &mut Driver<'_, impl Observations>,
) -> BTreeMap<String, u64> {
    let silent_ms = SILENT_REPORTS * driver.limits.report_interval_ms;
    let there = |host_id: &str| {
        driver.seen.session(host_id).is_some()
            && driver
                .seen
                .last_heard_ms(host_id)
                .is_none_or(|heard| driver.now_ms.saturating_sub(heard) <= silent_ms)
    };
    let mut connected: BTreeMap<&str, bool> = BTreeMap::new();
    for wave in &rollback.waves {
        let any = wave.hosts.iter().any(|host_id| there(host_id));
        *connected.entry(wave.region.as_str()).or_default() |= any;
    }
    let mut lost = BTreeMap::new();
    for (region, any_connected) in &connected {
        let others_there = connected
            .iter()
            .any(|(other, there)| other != region && *there);
        let key = (rollback.number, region.to_string());
        if !any_connected && others_there {
            let since = *driver.memory.lost_since.entry(key).or_insert(driver.now_ms);
            lost.insert(region.to_string(), since);
        } else {
            driver.memory.lost_since.remove(&key);
        }
    }
    lost
}

/// Defers the unfinished hosts of each region lost for two step timeouts (and skips its gates
/// that cannot be judged), so the rollback goes on with the other regions.
fn defer_lost_regions(
    rollback: &RollbackRecord,
    lost: &BTreeMap<String, u64>,
    driver: &mut Driver<'_, impl Observations>,
) {
    if rollback.status != RollbackStatus::Running {
        return;
    }
    for (region, since) in lost {
        let gone_ms = driver.now_ms.saturating_sub(*since);
        if gone_ms < LOST_REGION_AFTER_STEP_TIMEOUTS * driver.limits.step_timeout_ms {
            continue;
        }
        let in_region: BTreeSet<&str> = rollback
            .waves
            .iter()
            .filter(|wave| &wave.region == region)
            .flat_map(|wave| wave.hosts.iter().map(String::as_str))
            .collect();
        let hosts: BTreeSet<&str> = rollback
            .steps
            .iter()
            .filter(|step| in_region.contains(step.host_id.as_str()))
            .filter(|step| !step.progress.status.is_terminal() && !rollback.is_deferred(step))
            .map(|step| step.host_id.as_str())
            .collect();
        let gate_waiting = rollback.waves.iter().enumerate().any(|(index, wave)| {
            &wave.region == region
                && !wave.gate.status.is_terminal()
                && rollback.wave_steps(index as u32).all(|step| {
                    step.progress.status.is_terminal()
                        || rollback.is_deferred(step)
                        || hosts.contains(step.host_id.as_str())
                })
        });
        if hosts.is_empty() && !gate_waiting {
            continue;
        }
        driver.propose(CommandKind::DeferRegion {
            rollback: rollback.number,
            region: region.clone(),
            hosts: hosts.iter().map(|host| host.to_string()).collect(),
            evidence: format!(
                "no agent of region {region} in this rollback ({}) has been connected for {} s, \
                 while other regions' are",
                in_region.iter().copied().collect::<Vec<_>>().join(", "),
                gone_ms / 1000
            ),
        });
    }
}

/// Once every wave is done, reverts the deferred hosts that are back (their region no longer
/// lost), a wave's after the earlier waves' of their region, at most max_parallel begun at
/// once, none begun after one of them failed; the others wait. A person is called once they
/// have waited [`DEFERRED_WAIT_STEP_TIMEOUTS`] step timeouts with none of them back.
fn drive_deferred_hosts(
    state: &State,
    rollback: &RollbackRecord,
    lost: &BTreeMap<String, u64>,
    driver: &mut Driver<'_, impl Observations>,
) {
    if rollback.deferred_unfinished().is_empty() {
        return;
    }
    let running = rollback.status == RollbackStatus::Running;
    let any_failed = rollback
        .steps
        .iter()
        .any(|step| rollback.is_deferred(step) && step.progress.status == StepStatus::Failed);
    let mut driven = false;
    let unfinished = |host_id: &str, wave: u32| {
        rollback
            .wave_steps(wave)
            .any(|step| step.host_id == host_id && !step.progress.status.is_terminal())
    };
    let mut begun = rollback
        .deferred_unfinished()
        .into_iter()
        .filter(|host_id| {
            rollback
                .steps
                .iter()
                .any(|step| &step.host_id == host_id && step.progress.attempts > 0)
        })
        .count();
    let mut regions_held: BTreeSet<&str> = BTreeSet::new();
    for (index, wave) in rollback.waves.iter().enumerate() {
        let index = index as u32;
        let Some(change) = state.changes.get(&wave.change) else {
            continue;
        };
        let deferred: Vec<&String> = wave
            .hosts
            .iter()
            .filter(|host_id| rollback.deferred_hosts.contains(host_id))
            .filter(|host_id| unfinished(host_id, index))
            .collect();
        if deferred.is_empty()
            || regions_held.contains(wave.region.as_str())
            || lost.contains_key(&wave.region)
        {
            continue;
        }
        // A later wave of this region (another service, in the plan's order) waits for it.
        regions_held.insert(wave.region.as_str());
        for host_id in deferred {
            let Some((next, started)) = next_step(rollback.wave_steps(index), host_id) else {
                continue;
            };
            // While its agent is away nothing is sent and nothing times out: it waits.
            if driver.seen.session(host_id).is_none() {
                continue;
            }
            if !started {
                if !running || any_failed || begun >= rollback.options.max_parallel as usize {
                    continue;
                }
                begun += 1;
            }
            driven = true;
            drive_host_step(state, rollback, (change, wave), next, driver);
        }
    }
    // Waiting with none of them back: bounded, then a person decides (resume waits again,
    // skip-host leaves one unreverted).
    let key = rollback.number;
    if driven || !running {
        driver.memory.deferred_since.remove(&key);
        return;
    }
    let since = *driver
        .memory
        .deferred_since
        .entry(key)
        .or_insert(driver.now_ms);
    let waited_ms = driver.now_ms.saturating_sub(since);
    if waited_ms >= DEFERRED_WAIT_STEP_TIMEOUTS * driver.limits.step_timeout_ms {
        driver.memory.deferred_since.remove(&key);
        driver.propose(CommandKind::Stall {
            rollback: rollback.number,
            evidence: format!(
                "every wave is done, but {} of a lost region have not returned for {} s: resume \
                 to wait again, or leave each unreverted with rollback skip-host",
                rollback.deferred_unfinished().join(", "),
                waited_ms / 1000
            ),
        });
    }
}

/// A host's next step among a wave's `steps`, and whether it began any: `None` when one of its
/// steps failed (a person decides) or all ended.
fn next_step<'a>(
    steps: impl Iterator<Item = &'a RollbackStepRecord>,
    host_id: &str,
) -> Option<(&'a RollbackStepRecord, bool)> {
    let host_steps: Vec<&RollbackStepRecord> =
        steps.filter(|step| step.host_id == host_id).collect();
    if host_steps
        .iter()
        .any(|step| step.progress.status == StepStatus::Failed)
    {
        return None;
    }
    let next = host_steps
        .iter()
        .find(|step| !step.progress.status.is_terminal())?;
    let started = host_steps.iter().any(|step| step.progress.attempts > 0);
    Some((next, started))
}

/// Takes a host's next rollback step: starts it, (re)sends it to the host's agent, or judges
/// it (a verify).
fn drive_host_step(
    state: &State,
    rollback: &RollbackRecord,
    (change, wave): (&ChangeRecord, &WaveRecord),
    next: &RollbackStepRecord,
    driver: &mut Driver<'_, impl Observations>,
) {
    let running = rollback.status == RollbackStatus::Running;
    let host_id = &next.host_id;
    let target = StepTarget::Rollback {
        rollback: rollback.number,
        service: wave.service.clone(),
        host_id: host_id.clone(),
        kind: next.kind,
    };
    if next.progress.status == StepStatus::Pending {
        if running {
            driver.propose(CommandKind::StepStarted { step: target });
        }
        return;
    }
    let on_timeout = if running {
        OnTimeout::Retry
    } else {
        OnTimeout::Wait
    };
    let action = match next.kind {
        RollbackStepKind::Verify => {
            verify_host(&wave.service, target, &next.progress, driver);
            return;
        }
        RollbackStepKind::Restore => {
            let snapshot_id = change
                .hosts
                .iter()
                .find(|host| &host.host_id == host_id)
                .map(|host| host.snapshot_id.clone())
                .unwrap_or_default();
            AgentAction::Restore {
                snapshot_id,
                supersedes: change.id(),
                // From version 10 a hand-made change is not wiped unless the rollback
                // was told to overwrite drift.
                refuse_drift: state.cluster_version() >= crate::state_machine::version::DRIFT_GUARD
                    && !rollback.options.overwrite_drift,
            }
        }
        RollbackStepKind::Restart => AgentAction::Restart,
        RollbackStepKind::Drain | RollbackStepKind::Isolate => AgentAction::Drain,
        RollbackStepKind::Undrain => AgentAction::Undrain,
        RollbackStepKind::Reload => AgentAction::Reload,
        RollbackStepKind::PauseJobs => AgentAction::PauseJobs,
        RollbackStepKind::ResumeJobs => AgentAction::ResumeJobs,
        RollbackStepKind::PurgeCache => AgentAction::PurgeCache,
        RollbackStepKind::ScaleUp => AgentAction::ScaleUp,
        RollbackStepKind::Check => AgentAction::Checks,
        RollbackStepKind::Reconcile => AgentAction::Reconcile,
        RollbackStepKind::ClearClientCaches => AgentAction::ClearClientCaches,
        RollbackStepKind::Run(_) => {
            let run = rollback
                .recipes
                .get(&wave.service)
                .and_then(|recipe| recipe.iter().find(|step| step.kind == next.kind))
                .and_then(|step| step.run.clone())
                .unwrap_or_else(|| crate::recipe::RunSpec {
                    // Cannot happen: run steps are made from the recipe. The agent refuses
                    // an empty name, so the step fails visibly rather than hanging.
                    command: String::new(),
                    args: BTreeMap::new(),
                });
            AgentAction::Run {
                command: run.command,
                args: run.args,
            }
        }
    };
    driver.drive_running(target, &next.progress, &wave.service, action, on_timeout);
}

/// The gate after a wave: the wave's reverted hosts must report a probe failure ratio within
/// the tolerance of the change's baseline over the last settle time, and the service's synthetic
/// checks (if any) must pass after that, before `timeout_s` passes.
fn judge_gate(
    rollback: &RollbackRecord,
    change: &ChangeRecord,
    gate: GateTarget<'_>,
    driver: &mut Driver<'_, impl Observations>,
) {
    let GateTarget {
        wave,
        hosts,
        checks,
    } = gate;
    let options = &rollback.options.gate;
    let progress = &rollback.waves[wave as usize].gate;
    let service = &rollback.waves[wave as usize].service;
    let waited_ms = driver.now_ms.saturating_sub(progress.started_at_ms);
    let settle_ms = options.settle_ms();
    if waited_ms < settle_ms {
        return;
    }
    // Evidence from the end of the settle time, however short it is and however long the
    // hosts' report interval: ask each host, and judge when they have answered (or
    // GATE_ANSWER_WAIT_MS later: an unhealthy or silent host is judged on what there is).
    let asked_at = match driver.memory.gates_asked.entry((rollback.number, wave)) {
        Entry::Occupied(asked) => *asked.get(),
        Entry::Vacant(first) => {
            first.insert(driver.now_ms);
            ask_for_reports(driver, hosts, service);
            return;
        }
    };
    let answering = hosts
        .iter()
        .any(|host_id| driver.seen.awaiting_report(host_id, driver.now_ms));
    if answering && driver.now_ms.saturating_sub(asked_at) < GATE_ANSWER_WAIT_MS {
        return;
    }
    // The settle time before now, and the answers to the latest ask however long they took: a
    // gate that has not passed asks again every GATE_ANSWER_WAIT_MS (below), so the window
    // moves on and what it saw unhealthy then does not hold it for ever.
    let window_start = driver
        .now_ms
        .saturating_sub(settle_ms)
        .min(asked_at)
        .max(progress.started_at_ms);
    let health = driver.seen.aggregate(service, hosts, window_start);
    let comparison = crate::health::compare(&health, &change.baseline, options);
    let figures = format!(
        "over the last {} from {} of {} hosts: {}; tolerance {:.2}, latency {:.0} %",
        options.settle_text(),
        health.hosts_reporting,
        hosts.len(),
        comparison.figures,
        options.tolerance,
        options.latency_tolerance * 100.0
    );
    let healthy = comparison.within();
    // Synthetic checks run once health has settled, and again while they fail.
    let synthetic = if checks.is_empty() {
        Some(SyntheticVerdict {
            ok: true,
            detail: String::new(),
            at_ms: driver.now_ms,
        })
    } else {
        driver
            .seen
            .synthetics(rollback.number, wave, progress.started_at_ms)
    };
    if healthy && !synthetic.as_ref().is_some_and(|verdict| verdict.ok) {
        let key = (rollback.number, wave);
        let due = match driver.memory.synthetics.get(&key) {
            None => true,
            Some(&asked) => {
                let since = driver.now_ms.saturating_sub(asked);
                // One run at a time: a finished, failed run is tried again after a pause; one
                // that never reported, after a long one.
                let finished = synthetic
                    .as_ref()
                    .is_some_and(|verdict| verdict.at_ms >= asked);
                if finished {
                    since >= SYNTHETIC_RETRY_MS
                } else {
                    since >= SYNTHETIC_LOST_MS
                }
            }
        };
        if due {
            driver.memory.synthetics.insert(key, driver.now_ms);
            driver.actions.push(Action::RunSynthetics {
                rollback: rollback.number,
                wave,
                checks: checks.to_vec(),
            });
        }
    }
    let (ok, detail) = match &synthetic {
        Some(verdict) if healthy && verdict.ok => {
            let synthetic = if verdict.detail.is_empty() {
                String::new()
            } else {
                format!("; synthetic checks pass: {}", verdict.detail)
            };
            (true, format!("healthy: {figures}{synthetic}"))
        }
        _ if waited_ms > u64::from(options.timeout_s) * 1000 => {
            let why = if !healthy {
                format!(
                    "not within tolerance of the baseline ({}): {figures}",
                    comparison.outside.join(", ")
                )
            } else {
                match &synthetic {
                    Some(verdict) => format!("synthetic checks fail: {}", verdict.detail),
                    None => "the synthetic checks gave no result".to_string(),
                }
            };
            (false, format!("after {} s, {why}", options.timeout_s))
        }
        _ => {
            // Not passing yet: fresh answers for the next look.
            if driver.now_ms.saturating_sub(asked_at) >= GATE_ANSWER_WAIT_MS {
                driver
                    .memory
                    .gates_asked
                    .insert((rollback.number, wave), driver.now_ms);
                ask_for_reports(driver, hosts, service);
            }
            return;
        }
    };
    driver.propose(CommandKind::StepFinished {
        step: StepTarget::Gate {
            rollback: rollback.number,
            wave,
        },
        ok,
        detail,
        snapshot_id: String::new(),
    });
}

/// What a gate judges: the wave, its reverted hosts, the service's synthetic checks.
struct GateTarget<'a> {
    wave: u32,
    hosts: &'a [String],
    checks: &'a [SyntheticCheck],
}

/// Asks each of `hosts` for a report on `service` now (`Action::AskReport`).
fn ask_for_reports(driver: &mut Driver<'_, impl Observations>, hosts: &[String], service: &str) {
    for host_id in hosts {
        driver.actions.push(Action::AskReport {
            host_id: host_id.clone(),
            service: service.to_string(),
        });
    }
}

fn verify_host(
    service: &str,
    step: StepTarget,
    progress: &StepProgress,
    driver: &mut Driver<'_, impl Observations>,
) {
    let step_id = step.step_id();
    driver.running.insert(step_id.clone());
    let now_ms = driver.now_ms;
    let watch = match driver.memory.verify_watch.entry(step_id) {
        Entry::Occupied(seen) => seen.into_mut(),
        Entry::Vacant(first) => {
            driver.actions.push(Action::AskReport {
                host_id: step.host_id().to_string(),
                service: service.to_string(),
            });
            first.insert(VerifyWatch {
                first_seen_ms: now_ms,
                offline_at_ms: None,
            })
        }
    };
    if driver.seen.session(step.host_id()).is_none() {
        watch.offline_at_ms = Some(now_ms);
    }
    let watch = *watch;
    let verdict = driver
        .seen
        .verdict_since(step.host_id(), service, progress.started_at_ms);
    let waited_ms = now_ms.saturating_sub(progress.started_at_ms);
    // No report from an agent that was away, or that this leader has not watched long enough
    // to have heard from, is no evidence: give it time to report.
    let allowance = VERIFY_REPORT_AFTER_RECONNECT_MS.max(2 * driver.limits.report_interval_ms);
    let recently = |at_ms: u64| now_ms.saturating_sub(at_ms) <= allowance;
    let offline_at = watch.offline_at_ms;
    // A leader gives every verify it first sees the allowance (however late it was elected);
    // an agent seen away, up to the grace past the timeout. Both end: `first_seen_ms` and
    // `started_at_ms` do not move.
    let awaiting_agent = verdict.is_none()
        && (recently(watch.first_seen_ms)
            || (offline_at.is_some_and(recently)
                && waited_ms <= driver.limits.verify_timeout_ms + VERIFY_OFFLINE_GRACE_MS));
    let (ok, detail) = match verdict {
        Some((true, why)) => (true, why),
        _ if waited_ms > driver.limits.verify_timeout_ms && !awaiting_agent => {
            let why = verdict.map_or_else(
                || match offline_at {
                    Some(_) => "no health report arrived (its agent was offline)".to_string(),
                    None => "no health report arrived".to_string(),
                },
                |(_, why)| why,
            );
            (
                false,
                format!("not healthy {waited_ms} ms after the restart: {why}"),
            )
        }
        _ => return,
    };
    driver.propose(CommandKind::StepFinished {
        step,
        ok,
        detail,
        snapshot_id: String::new(),
    });
}

/// Fires a service's automatic rollback when a condition of its policy has been breached for its
/// window after its latest change was deployed. At most one automatic rollback per change (apply
/// refuses more).
fn check_triggers(
    state: &State,
    seen: &impl Observations,
    memory: &mut EngineMemory,
    limits: &EngineLimits,
    now_ms: u64,
    actions: &mut Vec<Action>,
) {
    for service in state.services.values() {
        let policy = &service.policy;
        let latest = state
            .changes
            .values()
            .rev()
            .find(|change| change.service == service.name);
        let watched = latest.filter(|change| {
            policy.auto_rollback
                && change.status == ChangeStatus::Deployed
                && change.rollback == 0
                && now_ms <= change.deployed_at_ms + u64::from(policy.watch_s) * 1000
        });
        let Some(change) = watched else {
            memory.breaches.retain(|(name, _), _| name != &service.name);
            continue;
        };
        let hosts: Vec<String> = change
            .hosts
            .iter()
            .map(|host| host.host_id.clone())
            .collect();
        let mut fired = None;
        for condition in policy.all_conditions() {
            let key = (service.name.clone(), condition.to_string());
            let window_ms = u64::from(condition.for_s) * 1000;
            let window_start = now_ms.saturating_sub(window_ms).max(change.deployed_at_ms);
            let health = seen.aggregate(&service.name, &hosts, window_start);
            // Breached means over the limit and worse than before the change: a service that
            // was already this unhealthy is not rolled back for it.
            if !condition.breached(&health, &change.baseline) {
                memory.breaches.remove(&key);
                continue;
            }
            let since = *memory.breaches.entry(key).or_insert(now_ms);
            if now_ms.saturating_sub(since) >= window_ms && fired.is_none() {
                fired = Some((condition, health));
            }
        }
        let Some((condition, health)) = fired else {
            continue;
        };
        let figure = condition.figure;
        let reason = format!(
            "{} {} breached `{condition}` (limit {}) after {} deployed {} (baseline {}; {} hosts reporting)",
            figure.name(),
            figure.format_option(figure.of(&health)),
            figure.format_option(condition.limit(&change.baseline)),
            change.id(),
            change.version,
            figure.format_option(figure.of(&change.baseline)),
            health.hosts_reporting,
        );
        memory.breaches.retain(|(name, _), _| name != &service.name);
        // One request per change: what became of it (started, throttled) is recorded, and a
        // throttled change is not asked about again. A request that did not commit (its
        // proposal failed) is made again after a while.
        let recorded = state
            .triggers
            .iter()
            .any(|trigger| trigger.change == change.number)
            || change.auto_refused;
        let asked_lately = memory
            .triggered
            .get(&change.number)
            .is_some_and(|&asked| now_ms.saturating_sub(asked) < TRIGGER_RETRY_MS);
        if recorded || asked_lately {
            continue;
        }
        memory.triggered.insert(change.number, now_ms);
        let environment = crate::plan::environment_of(state, change);
        actions.push(Action::Propose(CommandKind::AutoTrigger(
            crate::state_machine::AutoTrigger {
                service: service.name.clone(),
                environment: environment.clone(),
                source: TriggerSource::Policy,
                reason,
                options: crate::plan::with_drift_policy(
                    state,
                    &service.name,
                    &environment,
                    limits.automatic_plan(),
                    |host, service| seen.drift(host, service),
                ),
                throttle: limits.throttle.clone(),
                decided: None,
            },
        )));
    }
    memory.triggered.retain(|number, _| {
        state
            .changes
            .get(number)
            .is_some_and(|change| change.rollback == 0)
    });
}
