//! Tests of `decide()`: a state built through `apply()`, fake observations, asserted actions.
//!
//! Over 700 lines: the shared fixture and the step and wave tests; what health decides is in
//! `decide_health_test.rs`.

use std::collections::{HashMap, HashSet};

use super::decide::*;
use crate::state_machine::*;
use crate::test_fleet::Fleet;

#[derive(Default)]
pub(super) struct Seen {
    pub(super) sessions: HashMap<String, u64>,
    pub(super) verdicts: HashMap<String, (bool, String)>,
    pub(super) failure_ratio: f64,
    pub(super) error_ratio: Option<f64>,
    pub(super) p99_latency_ms: Option<f64>,
    pub(super) synthetic: Option<SyntheticVerdict>,
    /// What each host reported changed by hand (any service).
    pub(super) drift: HashMap<String, Vec<String>>,
    /// When each host last reported (none: not since this leader began).
    pub(super) heard: HashMap<String, u64>,
    /// Hosts asked for a report that have not answered healthy.
    pub(super) awaiting: HashSet<String>,
}

impl Observations for Seen {
    fn drift(&self, host_id: &str, _service: &str) -> Vec<String> {
        self.drift.get(host_id).cloned().unwrap_or_default()
    }
    fn session(&self, host_id: &str) -> Option<u64> {
        self.sessions.get(host_id).copied()
    }
    fn last_heard_ms(&self, host_id: &str) -> Option<u64> {
        self.heard.get(host_id).copied()
    }
    fn awaiting_report(&self, host_id: &str, _now_ms: u64) -> bool {
        self.awaiting.contains(host_id)
    }
    fn verdict_since(
        &self,
        host_id: &str,
        _service: &str,
        _since_ms: u64,
    ) -> Option<(bool, String)> {
        self.verdicts.get(host_id).cloned()
    }
    fn aggregate(&self, _service: &str, hosts: &[String], _since_ms: u64) -> HealthAggregate {
        HealthAggregate {
            probe_failure_ratio: self.failure_ratio,
            samples: 10,
            hosts_reporting: hosts.len() as u32,
            error_ratio: self.error_ratio,
            p99_latency_ms: self.p99_latency_ms,
            requests: if self.error_ratio.is_some() {
                100.0
            } else {
                0.0
            },
            scrape_failures: 0,
        }
    }
    fn synthetics(&self, _rollback: u64, _wave: u32, since_ms: u64) -> Option<SyntheticVerdict> {
        self.synthetic
            .clone()
            .filter(|verdict| verdict.at_ms >= since_ms)
    }
}

pub(super) const LIMITS: EngineLimits = EngineLimits {
    step_timeout_ms: 1_000,
    max_attempts: 2,
    verify_timeout_ms: 5_000,
    report_interval_ms: 500,
    default_max_parallel: 1,
    default_gate: GateOptions {
        settle_s: 2,
        settle_ms: 0,
        timeout_s: 10,
        tolerance: 0.05,
        latency_tolerance: 0.25,
    },
    escalation_webhook: true,
    incident_webhook: false,
    throttle: ThrottleLimits {
        budget: 5,
        budget_window_s: 3600,
        cooldown_s: 600,
        flap_rollbacks: 3,
        flap_window_s: 86_400,
        breaker_services: 4,
        breaker_window_s: 120,
    },
    audit_retention: AuditRetention {
        days: None,
        entries: None,
    },
};
pub(super) const HOSTS: [&str; 3] = ["web-1", "web-2", "web-3"];

pub(super) struct World {
    pub(super) fleet: Fleet,
    pub(super) seen: Seen,
    pub(super) memory: EngineMemory,
}

impl World {
    pub(super) fn new() -> Self {
        let mut world = Self {
            fleet: Fleet::new(),
            seen: Seen::default(),
            memory: EngineMemory::default(),
        };
        for host in HOSTS {
            world.apply(CommandKind::RegisterHost {
                host_id: host.into(),
                labels: Labels::default(),
                services: vec!["web".into()],
                agent_version: String::new(),
            });
            world.seen.sessions.insert(host.into(), 1);
        }
        let policy = HealthPolicy {
            max_probe_failure_ratio: 0.5,
            for_s: 2,
            watch_s: 60,
            auto_rollback: true,
            conditions: vec![],
        };
        world.apply(CommandKind::PutService {
            service: ServiceRecord {
                rto_s: 0,
                freeze: Vec::new(),
                drift_policy: Default::default(),
                isolate_after_failures: 0,
                name: "web".into(),
                depends_on: vec![],
                policy,
                synthetics: vec![],
                rollback_steps: Vec::new(),
            },
        });
        world.apply(CommandKind::RegisterRelease {
            release: ReleaseRecord {
                service: "web".into(),
                version: "v2".into(),
                artifact_digest: format!("sha256:{}", "b".repeat(64)),
                commit: String::new(),
                registered_at_ms: 0,
                api_version: 0,
                requires: Default::default(),
                produces: Default::default(),
                consumes: Default::default(),
            },
        });
        world
    }

    pub(super) fn apply(&mut self, kind: CommandKind) {
        self.fleet.apply_at(1_000, kind).expect("applies");
    }

    /// Starts the rollback of change 1 with `max_parallel` hosts at a time.
    pub(super) fn start_rollback(&mut self, max_parallel: u32) {
        self.apply(CommandKind::StartRollback(StartRollback {
            changes: vec![1],
            options: PlanOptions {
                max_parallel,
                max_unavailable: max_parallel,
                gate: LIMITS.default_gate,
                ..PlanOptions::default()
            },
            plan_hash: String::new(),
            reason: String::new(),
            trigger: Trigger::Manual,
            break_glass: false,
            planned: None,
        }));
    }

    /// Runs one rollback step of `host` through start and a result.
    pub(super) fn step(&mut self, host: &str, kind: RollbackStepKind, ok: bool) {
        let step = StepTarget::Rollback {
            rollback: 1,
            service: "web".into(),
            host_id: host.into(),
            kind,
        };
        if self.fleet.state.rollbacks[&1].steps.iter().any(|s| {
            s.host_id == host && s.kind == kind && s.progress.status == StepStatus::Pending
        }) {
            self.apply(CommandKind::StepStarted { step: step.clone() });
        }
        self.apply(CommandKind::StepFinished {
            step,
            ok,
            detail: if ok {
                String::new()
            } else {
                "http: status 500".into()
            },
            snapshot_id: String::new(),
        });
    }

    /// The status and attempts of `host`'s step of that kind in rollback 1.
    pub(super) fn progress(&self, host: &str, kind: RollbackStepKind) -> (StepStatus, u32) {
        self.fleet.rollback_step_progress(1, host, kind)
    }

    pub(super) fn decide(&mut self, now_ms: u64) -> Vec<Action> {
        decide(
            &self.fleet.state,
            &self.seen,
            &mut self.memory,
            &LIMITS,
            now_ms,
        )
    }

    /// Applies every proposal and returns the sends, the way the runtime would.
    pub(super) fn run_tick(&mut self, now_ms: u64) -> Vec<Action> {
        let actions = self.decide(now_ms);
        let mut sends = Vec::new();
        for action in actions {
            match action {
                Action::Propose(kind) => self.apply(kind),
                send => sends.push(send),
            }
        }
        sends
    }

    /// A deployed change of v2 on every host.
    pub(super) fn deployed(&mut self) -> u64 {
        self.deployed_from(HealthAggregate::default())
    }

    /// A deployed change of v2 on every host, whose service had `baseline` before it.
    pub(super) fn deployed_from(&mut self, baseline: HealthAggregate) -> u64 {
        self.apply(CommandKind::StartChange(StartChange {
            break_glass: false,
            service: "web".into(),
            version: "v2".into(),
            host_ids: vec![],
            reason: String::new(),
            baseline,
            flags_on: vec![],
            migrations: vec![],
        }));
        for phase in ["capture", "activate"] {
            for host in HOSTS {
                let step = match phase {
                    "capture" => StepTarget::Capture {
                        change: 1,
                        host_id: host.into(),
                    },
                    _ => StepTarget::Activate {
                        change: 1,
                        host_id: host.into(),
                    },
                };
                self.apply(CommandKind::StepStarted { step: step.clone() });
                self.apply(CommandKind::StepFinished {
                    step,
                    ok: true,
                    detail: String::new(),
                    snapshot_id: format!("snap-{host}"),
                });
            }
        }
        1
    }
}

pub(super) fn sends_of(actions: &[Action]) -> Vec<(String, AgentAction)> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Send { step, action, .. } => Some((step.step_id(), action.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_new_change_starts_every_capture_and_sends_each_to_connected_hosts_once() {
    let mut world = World::new();
    world.seen.sessions.remove("web-3");
    world.apply(CommandKind::StartChange(StartChange {
        break_glass: false,
        service: "web".into(),
        version: "v2".into(),
        host_ids: vec![],
        reason: String::new(),
        baseline: HealthAggregate::default(),
        flags_on: vec![],
        migrations: vec![],
    }));
    assert!(
        world.run_tick(1_000).is_empty(),
        "the first tick only records the starts"
    );
    let sends = sends_of(&world.run_tick(1_000));
    assert_eq!(
        sends,
        vec![
            ("ch-1/capture/web-1".into(), AgentAction::Capture),
            ("ch-1/capture/web-2".into(), AgentAction::Capture)
        ]
    );
    assert!(
        world.run_tick(1_000).is_empty(),
        "nothing is sent twice on the same session"
    );
    world.seen.sessions.insert("web-1".into(), 2);
    assert_eq!(
        sends_of(&world.run_tick(1_000)).len(),
        1,
        "a reconnected agent gets its running step again"
    );
    world.seen.sessions.insert("web-3".into(), 1);
    assert_eq!(
        sends_of(&world.run_tick(1_000)),
        vec![("ch-1/capture/web-3".into(), AgentAction::Capture)]
    );
}

#[test]
fn a_timed_out_step_is_retried_within_bounds_then_failed() {
    let mut world = World::new();
    world.apply(CommandKind::StartChange(StartChange {
        break_glass: false,
        service: "web".into(),
        version: "v2".into(),
        host_ids: vec!["web-1".into()],
        reason: String::new(),
        baseline: HealthAggregate::default(),
        flags_on: vec![],
        migrations: vec![],
    }));
    world.run_tick(1_000);
    world.run_tick(1_000);
    world.run_tick(2_500); // attempt 2 (started_at_ms is the command's 1_000)
    assert_eq!(world.fleet.state.changes[&1].hosts[0].capture.attempts, 2);
    world.run_tick(2_500);
    assert_eq!(
        world.fleet.state.changes[&1].hosts[0].capture.status,
        StepStatus::Failed
    );
    assert_eq!(world.fleet.state.changes[&1].status, ChangeStatus::Failed);
}

#[test]
fn a_rollback_reverts_hosts_one_batch_at_a_time_drain_to_undrain() {
    let mut world = World::new();
    world.deployed();
    world.start_rollback(2);
    world.run_tick(1_000);
    let sends = sends_of(&world.run_tick(1_000));
    assert_eq!(
        sends,
        vec![
            ("rb-1/web/drain/web-1".into(), AgentAction::Drain),
            ("rb-1/web/drain/web-2".into(), AgentAction::Drain),
        ],
        "two hosts at a time, drained first"
    );
    for host in ["web-1", "web-2"] {
        world.step(host, RollbackStepKind::Drain, true);
    }
    // Each drain's success started its host's restore in the same entry (cluster version 13):
    // the next tick sends it.
    assert_eq!(
        sends_of(&world.run_tick(1_000)),
        vec![
            (
                "rb-1/web/restore/web-1".into(),
                AgentAction::Restore {
                    snapshot_id: "snap-web-1".into(),
                    supersedes: "ch-1".into(),
                    refuse_drift: true,
                }
            ),
            (
                "rb-1/web/restore/web-2".into(),
                AgentAction::Restore {
                    snapshot_id: "snap-web-2".into(),
                    supersedes: "ch-1".into(),
                    refuse_drift: true,
                }
            ),
        ],
        "each restored from its own snapshot"
    );
    for host in ["web-1", "web-2"] {
        world.step(host, RollbackStepKind::Restore, true);
        world.step(host, RollbackStepKind::Restart, true);
    }
    // Each restart's success started its host's verify.
    world
        .seen
        .verdicts
        .insert("web-1".into(), (true, "1 probes pass".into()));
    world.run_tick(1_000); // web-1 verified
    world.step("web-1", RollbackStepKind::Undrain, true);
    assert!(
        world.fleet.state.rollbacks[&1]
            .steps
            .iter()
            .filter(|step| step.host_id == "web-3")
            .all(|step| step.progress.attempts == 0),
        "web-3 waits while two hosts are out"
    );
    world.run_tick(1_000); // web-1 is done, so web-3 may begin
    let web3_drain = world.fleet.state.rollbacks[&1]
        .steps
        .iter()
        .find(|step| step.host_id == "web-3" && step.kind == RollbackStepKind::Drain)
        .unwrap();
    assert_eq!(web3_drain.progress.status, StepStatus::Running);
}

#[test]
fn max_unavailable_counts_hosts_that_are_already_down() {
    let mut world = World::new();
    world.deployed();
    world.apply(CommandKind::StartRollback(StartRollback {
        changes: vec![1],
        options: PlanOptions {
            max_parallel: 3,
            max_unavailable: 2,
            ..PlanOptions::default()
        },
        plan_hash: String::new(),
        reason: String::new(),
        trigger: Trigger::Manual,
        break_glass: false,
        planned: None,
    }));
    world.seen.sessions.remove("web-3");
    world.run_tick(1_000);
    let started: Vec<&str> = world.fleet.state.rollbacks[&1]
        .steps
        .iter()
        .filter(|step| step.progress.attempts > 0)
        .map(|step| step.host_id.as_str())
        .collect();
    assert_eq!(
        started,
        vec!["web-1", "web-3"],
        "web-3 is down already, so besides it only one more host may go out; \
         it is started anyway so that it fails within its attempts instead of holding the wave"
    );
}

/// Takes every host of the single wave through its steps.
pub(super) fn revert_every_host(world: &mut World) {
    for host in HOSTS {
        world.step(host, RollbackStepKind::Drain, true);
        world.step(host, RollbackStepKind::Restore, true);
        world.step(host, RollbackStepKind::Restart, true);
        world.step(host, RollbackStepKind::Verify, true);
        world.step(host, RollbackStepKind::Undrain, true);
    }
}

/// A rollback whose web-1 has been drained, restored and restarted, its verify started at
/// 1 000 ms by the restart's success.
fn verifying_web1() -> World {
    let mut world = World::new();
    world.deployed();
    world.start_rollback(1);
    for kind in [
        RollbackStepKind::Drain,
        RollbackStepKind::Restore,
        RollbackStepKind::Restart,
    ] {
        world.step("web-1", kind, true);
    }
    world
}

#[test]
fn a_verify_asks_its_host_for_a_report_once() {
    let mut world = verifying_web1();
    let asks = |actions: &[Action]| {
        actions
            .iter()
            .filter(|action| {
                matches!(action, Action::AskReport { host_id, service }
                    if host_id == "web-1" && service == "web")
            })
            .count()
    };
    let first = world.run_tick(1_100);
    assert_eq!(asks(&first), 1, "the verify's first look asks: {first:?}");
    let later = world.run_tick(1_200);
    assert_eq!(asks(&later), 0, "and only once: {later:?}");
}

#[test]
fn a_host_that_stays_unhealthy_pauses_the_rollback_and_can_be_skipped() {
    let mut world = verifying_web1();
    world
        .seen
        .verdicts
        .insert("web-1".into(), (false, "http: status 500".into()));
    world.run_tick(3_000);
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Running,
        "still within the verify timeout"
    );
    world.run_tick(7_000);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.status, RollbackStatus::Paused);
    assert_eq!(rollback.failed_hosts, vec!["web-1".to_string()]);
    assert!(
        rollback.paused_reason.contains("status 500"),
        "{}",
        rollback.paused_reason
    );
    world.apply(CommandKind::SkipHost {
        rollback: 1,
        host_id: "web-1".into(),
        reason: "broken disk, replaced later".into(),
    });
    world.apply(CommandKind::ControlRollback {
        rollback: 1,
        action: RollbackAction::Resume,
        reason: String::new(),
    });
    world.run_tick(7_000);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.skipped_hosts, vec!["web-1".to_string()]);
    let undrain = rollback
        .steps
        .iter()
        .find(|step| step.host_id == "web-1" && step.kind == RollbackStepKind::Undrain)
        .unwrap();
    assert_eq!(
        undrain.progress.status,
        StepStatus::Running,
        "web-1 was drained, so it is put back into rotation first"
    );
    world.step("web-1", RollbackStepKind::Undrain, true);
    world.run_tick(7_000);
    let rollback = &world.fleet.state.rollbacks[&1];
    let web2 = rollback
        .steps
        .iter()
        .find(|step| step.host_id == "web-2" && step.kind == RollbackStepKind::Drain)
        .unwrap();
    assert_eq!(web2.progress.status, StepStatus::Running, "web-2 goes on");
}

/// A rollback whose web-1 has been restarted and is being verified (started at 1 000 ms, with
/// the 5 000 ms verify timeout), its agent gone since 3 000 ms.
fn verifying_web1_with_its_agent_away() -> World {
    let mut world = verifying_web1();
    world.seen.sessions.remove("web-1");
    world.run_tick(3_000);
    world
}

fn web1_verify(world: &World) -> StepProgress {
    world.fleet.state.rollbacks[&1]
        .steps
        .iter()
        .find(|step| step.host_id == "web-1" && step.kind == RollbackStepKind::Verify)
        .unwrap()
        .progress
        .clone()
}

#[test]
fn a_verify_waits_past_its_timeout_for_an_agent_that_was_away_to_report() {
    let mut world = verifying_web1_with_its_agent_away();
    world.run_tick(7_000);
    assert_eq!(
        web1_verify(&world).status,
        StepStatus::Running,
        "past the timeout, but the agent is away: no report is no evidence"
    );
    // Back (a new leader, a healed network), not yet reported: it gets a moment.
    world.seen.sessions.insert("web-1".into(), 2);
    world.run_tick(9_000);
    assert_eq!(web1_verify(&world).status, StepStatus::Running);
    world
        .seen
        .verdicts
        .insert("web-1".into(), (true, "1 probes pass".into()));
    world.run_tick(10_000);
    assert_eq!(web1_verify(&world).status, StepStatus::Succeeded);
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Running
    );
}

#[test]
fn a_verify_fails_when_its_agent_returns_without_a_report_or_stays_away() {
    let mut world = verifying_web1_with_its_agent_away();
    world.seen.sessions.insert("web-1".into(), 2);
    world.run_tick(8_000);
    assert_eq!(web1_verify(&world).status, StepStatus::Running);
    world.run_tick(9_000);
    let progress = web1_verify(&world);
    assert_eq!(
        progress.status,
        StepStatus::Failed,
        "back for more than the reconnect allowance and still silent"
    );
    assert!(
        progress.detail.contains("its agent was offline"),
        "{}",
        progress.detail
    );

    let mut world = verifying_web1_with_its_agent_away();
    let limit = 1_000 + LIMITS.verify_timeout_ms + VERIFY_OFFLINE_GRACE_MS;
    world.run_tick(limit);
    assert_eq!(web1_verify(&world).status, StepStatus::Running);
    world.run_tick(limit + 1);
    assert_eq!(
        web1_verify(&world).status,
        StepStatus::Failed,
        "the grace for an absent agent is bounded"
    );
}

#[test]
fn a_new_leader_gives_a_verify_time_to_hear_from_its_host() {
    let mut world = verifying_web1_with_its_agent_away();
    world.seen.sessions.insert("web-1".into(), 2);
    // Elected after the timeout, with the agent already back: this leader has heard nothing
    // yet, which is no evidence.
    world.memory = EngineMemory::default();
    world.run_tick(20_000);
    assert_eq!(web1_verify(&world).status, StepStatus::Running);
    world.run_tick(20_000 + VERIFY_REPORT_AFTER_RECONNECT_MS + 1);
    assert_eq!(web1_verify(&world).status, StepStatus::Failed);
}

#[test]
fn a_paused_rollback_leaves_an_overdue_step_alone_until_resumed() {
    let mut world = World::new();
    let change = world.deployed();
    assert_eq!(change, 1);
    world.start_rollback(1);
    world.run_tick(1_000);
    world.apply(CommandKind::ControlRollback {
        rollback: 1,
        action: RollbackAction::Pause,
        reason: String::new(),
    });
    let overdue = world.decide(9_000);
    assert!(
        !overdue
            .iter()
            .any(|action| matches!(action, Action::Propose(_))),
        "{overdue:?}"
    );
    world.apply(CommandKind::ControlRollback {
        rollback: 1,
        action: RollbackAction::Resume,
        reason: String::new(),
    });
    world.run_tick(9_000);
    let first = &world.fleet.state.rollbacks[&1].steps[0];
    assert_eq!(
        (first.progress.status, first.progress.attempts),
        (StepStatus::Running, 2),
        "resumed: retried"
    );
}

#[test]
fn an_activation_left_running_by_an_interrupted_change_is_timed_out_not_resent() {
    let mut world = World::new();
    world.apply(CommandKind::StartChange(StartChange {
        break_glass: false,
        service: "web".into(),
        version: "v2".into(),
        host_ids: vec!["web-1".into()],
        reason: String::new(),
        baseline: HealthAggregate::default(),
        flags_on: vec![],
        migrations: vec![],
    }));
    let capture = StepTarget::Capture {
        change: 1,
        host_id: "web-1".into(),
    };
    world.apply(CommandKind::StepStarted {
        step: capture.clone(),
    });
    world.apply(CommandKind::StepFinished {
        step: capture,
        ok: true,
        detail: String::new(),
        snapshot_id: "snap-1".into(),
    });
    world.apply(CommandKind::StepStarted {
        step: StepTarget::Activate {
            change: 1,
            host_id: "web-1".into(),
        },
    });
    world.start_rollback(1);
    assert!(
        sends_of(&world.run_tick(1_500)).is_empty(),
        "neither the activation nor the restore is sent yet"
    );
    assert!(
        world.fleet.state.rollbacks[&1]
            .steps
            .iter()
            .all(|step| step.progress.attempts == 0),
        "the restore waits for the activation"
    );
    world.run_tick(2_500);
    assert_eq!(
        world.fleet.state.changes[&1].hosts[0].activate.status,
        StepStatus::Failed
    );
    world.run_tick(2_500);
    world.run_tick(2_500);
    assert_eq!(
        world.fleet.state.rollbacks[&1].steps[0].progress.status,
        StepStatus::Running,
        "then the restore goes ahead"
    );
}

/// web-1 alone in region `aa`, so the plan is wave 0 = web-1, wave 1 = web-2 and web-3.
pub(super) fn two_region_world() -> World {
    let mut world = World::new();
    world.apply(CommandKind::RegisterHost {
        host_id: "web-1".into(),
        labels: Labels {
            region: "aa".into(),
            ..Labels::default()
        },
        services: vec!["web".into()],
        agent_version: String::new(),
    });
    world.deployed();
    world
}

#[test]
fn a_wave_that_can_never_start_a_host_pauses_instead_of_waiting_forever() {
    let mut world = two_region_world();
    world.start_rollback(1);
    world.seen.sessions.remove("web-3"); // down, in the second wave
    world.run_tick(1_000);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.status, RollbackStatus::Paused);
    assert!(
        rollback
            .paused_reason
            .contains("1 of the plan's hosts of web are down (web-3) and max_unavailable is 1"),
        "{}",
        rollback.paused_reason
    );
    assert!(
        rollback
            .steps
            .iter()
            .all(|step| step.progress.attempts == 0),
        "nothing was started"
    );
    assert!(
        world
            .run_tick(2_000)
            .iter()
            .all(|action| matches!(action, Action::Escalate { .. })),
        "and it waits for a person"
    );
}

#[test]
fn skipping_a_drained_host_still_puts_it_back_into_rotation() {
    let mut world = World::new();
    world.deployed();
    world.start_rollback(1);
    world.step("web-1", RollbackStepKind::Drain, true);
    world.step("web-1", RollbackStepKind::Restore, false);
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Paused
    );
    world.apply(CommandKind::SkipHost {
        rollback: 1,
        host_id: "web-1".into(),
        reason: "disk gone".into(),
    });
    world.apply(CommandKind::ControlRollback {
        rollback: 1,
        action: RollbackAction::Resume,
        reason: String::new(),
    });
    world.run_tick(1_000);
    let undrain = world.fleet.state.rollbacks[&1]
        .steps
        .iter()
        .find(|step| step.host_id == "web-1" && step.kind == RollbackStepKind::Undrain)
        .unwrap();
    assert_eq!(
        undrain.progress.status,
        StepStatus::Running,
        "web-1 is undrained"
    );
}

#[test]
fn isolating_a_failing_service_takes_out_only_its_failing_hosts() {
    let mut world = two_region_world();
    world.start_rollback(1);
    world.step("web-1", RollbackStepKind::Drain, true);
    world.step("web-1", RollbackStepKind::Restore, false);
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Paused
    );
    world.apply(CommandKind::IsolateService {
        rollback: 1,
        service: "web".into(),
        reason: "v1 cannot start either: take web-1 out".into(),
        region: String::new(),
    });
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.status, RollbackStatus::Running);
    assert!(rollback.waves[0].isolation, "the isolation comes first");
    assert_eq!(
        rollback.waves[0].hosts,
        vec!["web-1"],
        "only the failing host"
    );
    assert_eq!(rollback.waves.len(), 3);
    world.run_tick(1_000);
    let sends = sends_of(&world.run_tick(1_000));
    assert_eq!(
        sends,
        vec![("rb-1/web/isolate/web-1".to_string(), AgentAction::Drain)],
        "the others keep serving"
    );
    world.step("web-1", RollbackStepKind::Isolate, true);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.status, RollbackStatus::Succeeded, "{rollback:?}");
    assert!(
        rollback
            .outcome_detail
            .contains("isolated (drained, not reverted): web"),
        "{}",
        rollback.outcome_detail
    );
    assert_eq!(
        world.fleet.state.changes[&1].status,
        ChangeStatus::Deployed,
        "an isolated change is not rolled back"
    );
}

#[test]
fn a_step_that_ends_while_an_isolation_runs_first_leaves_its_hosts_next_step_to_the_engine() {
    let mut world = two_region_world();
    world.start_rollback(1);
    world.run_tick(1_000); // web-1 (wave 1, region aa) begins its drain
    // An isolation of another service put before the open waves, as `isolate_service` puts
    // it: its gate skipped, its step not yet run.
    let rollback = world.fleet.state.rollbacks.get_mut(&1).unwrap();
    for step in &mut rollback.steps {
        step.wave += 1;
    }
    let mut isolation = rollback.waves[1].clone();
    isolation.isolation = true;
    isolation.hosts = vec!["web-2".into()];
    isolation.gate.status = StepStatus::Skipped;
    rollback.waves.insert(0, isolation);
    rollback.steps.push(RollbackStepRecord {
        wave: 0,
        service: "web".into(),
        host_id: "web-2".into(),
        kind: RollbackStepKind::Isolate,
        progress: StepProgress::default(),
    });
    world.step("web-1", RollbackStepKind::Drain, true);
    let restore = |world: &World| world.progress("web-1", RollbackStepKind::Restore);
    assert_eq!(
        restore(&world),
        (StepStatus::Pending, 0),
        "web-1's wave is not the current one: apply() starts nothing the engine would not send"
    );
    world.step("web-2", RollbackStepKind::Isolate, true);
    world.run_tick(1_000);
    assert_eq!(restore(&world), (StepStatus::Running, 1));
}

#[test]
fn a_services_policy_trips_the_breaker_once_its_wave_failed_that_often() {
    let mut world = two_region_world();
    let mut service = world.fleet.state.services["web"].clone();
    service.isolate_after_failures = 2;
    world.apply(CommandKind::PutService { service });
    world.start_rollback(1);
    world.step("web-1", RollbackStepKind::Drain, true);
    world.step("web-1", RollbackStepKind::Restore, false);
    world.run_tick(1_000);
    assert_eq!(
        world.fleet.state.rollbacks[&1].status,
        RollbackStatus::Paused,
        "one failure: a person is called, the breaker holds"
    );
    world.apply(CommandKind::ControlRollback {
        rollback: 1,
        action: RollbackAction::Resume,
        reason: "try again".into(),
    });
    world.step("web-1", RollbackStepKind::Restore, false);
    world.run_tick(2_000);
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(rollback.isolated, vec!["web"], "{rollback:?}");
    assert_eq!(rollback.status, RollbackStatus::Running);
    assert_eq!(rollback.waves[0].hosts, vec!["web-1"]);

    // A region (here web-2's and web-3's) is taken out within max_unavailable: one more host.
    // web-1, drained by the rollback and not finished, stays out (it may be half-reverted).
    let mut world = two_region_world();
    world.start_rollback(1);
    world.step("web-1", RollbackStepKind::Drain, true);
    world.apply(CommandKind::ControlRollback {
        rollback: 1,
        action: RollbackAction::Pause,
        reason: "look".into(),
    });
    let region = crate::plan::region_of(&world.fleet.state, "web-2");
    // (With nothing failed and no host begun, an isolation must name a region.)
    let mut idle = two_region_world();
    idle.start_rollback(1);
    idle.apply(CommandKind::ControlRollback {
        rollback: 1,
        action: RollbackAction::Pause,
        reason: "look".into(),
    });
    let refused = idle
        .fleet
        .run(CommandKind::IsolateService {
            rollback: 1,
            service: "web".into(),
            reason: "nothing failed".into(),
            region: String::new(),
        })
        .unwrap_err()
        .to_string();
    assert!(refused.contains("no host of web has failed"), "{refused}");
    world.apply(CommandKind::IsolateService {
        rollback: 1,
        service: "web".into(),
        reason: "take that region out".into(),
        region: region.clone(),
    });
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(
        rollback.waves[0].hosts,
        vec!["web-1", "web-2"],
        "web-1 already out, and max_unavailable (1) more"
    );
    assert_eq!(rollback.waves[0].region, region);
    assert!(
        rollback
            .steps
            .iter()
            .filter(|step| step.host_id == "web-1" && step.kind == RollbackStepKind::Undrain)
            .all(|step| step.progress.status == StepStatus::Skipped),
        "web-1 is not put back half-reverted"
    );
    world.run_tick(1_000);
    assert_eq!(
        sends_of(&world.run_tick(1_000)),
        vec![
            ("rb-1/web/isolate/web-1".to_string(), AgentAction::Drain),
            ("rb-1/web/isolate/web-2".to_string(), AgentAction::Drain)
        ]
    );
}

#[test]
fn plan_options_at_the_default_latency_tolerance_serialize_as_before_it_existed() {
    // Plan hashes cover the options' JSON: rollbacks started before the field existed must
    // hash the same when their entries are replayed.
    let json = serde_json::to_string(&PlanOptions::default()).unwrap();
    assert!(!json.contains("latency_tolerance"), "{json}");
    let old: GateOptions =
        serde_json::from_str(r#"{"settle_s":5,"timeout_s":120,"tolerance":0.05}"#).unwrap();
    assert_eq!(old, GateOptions::default());
    let strict = GateOptions {
        latency_tolerance: 0.0,
        ..GateOptions::default()
    };
    assert!(
        serde_json::to_string(&strict)
            .unwrap()
            .contains("latency_tolerance")
    );
}

#[test]
fn a_service_recipe_sets_each_hosts_steps_and_a_run_step_carries_its_command() {
    let mut world = World::new();
    let recipe = crate::recipe::parse(&[
        "pause-jobs".to_string(),
        "restore".into(),
        "reload".into(),
        "run:warm-cache region=eu-west".into(),
        "resume-jobs".into(),
    ])
    .unwrap();
    let mut service = world.fleet.state.services["web"].clone();
    service.rollback_steps = recipe;
    world.apply(CommandKind::PutService { service });
    world.deployed();
    world.start_rollback(1);
    let kinds: Vec<RollbackStepKind> = world.fleet.state.rollbacks[&1]
        .steps
        .iter()
        .filter(|step| step.host_id == "web-1")
        .map(|step| step.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            RollbackStepKind::PauseJobs,
            RollbackStepKind::Restore,
            RollbackStepKind::Reload,
            RollbackStepKind::Run(1),
            RollbackStepKind::ResumeJobs
        ]
    );
    let mut sent = Vec::new();
    world.run_tick(1_000); // web-1 begins; each step's success starts the next
    for kind in kinds {
        let sends = sends_of(&world.run_tick(1_000));
        assert_eq!(sends.len(), 1, "one host at a time, one step at a time");
        let (step_id, action) = sends[0].clone();
        assert_eq!(
            StepTarget::parse(&step_id).map(|target| target.step_id()),
            Some(step_id.clone()),
            "{step_id} round-trips"
        );
        sent.push((step_id, action));
        world.step("web-1", kind, true);
    }
    assert_eq!(
        sent[3],
        (
            "rb-1/web/run-1/web-1".to_string(),
            AgentAction::Run {
                command: "warm-cache".into(),
                args: [("region".to_string(), "eu-west".to_string())].into()
            }
        )
    );
    assert_eq!(sent[0].1, AgentAction::PauseJobs);
    assert_eq!(sent[2].1, AgentAction::Reload);
    assert_eq!(sent[4].1, AgentAction::ResumeJobs);
}

#[test]
fn archived_audit_entries_are_pruned_in_batches_never_past_the_archive() {
    let mut world = World::new();
    let limits = EngineLimits {
        audit_retention: AuditRetention {
            days: None,
            entries: Some(1),
        },
        ..LIMITS
    };
    let prunes = |world: &mut World, now_ms: u64| -> Vec<u64> {
        decide(
            &world.fleet.state,
            &world.seen,
            &mut world.memory,
            &limits,
            now_ms,
        )
        .into_iter()
        .filter_map(|action| match action {
            Action::Propose(CommandKind::PruneAudit { through }) => Some(through),
            _ => None,
        })
        .collect()
    };
    // Retention is on, nothing is archived: nothing goes.
    assert!(prunes(&mut world, 10_000).is_empty());
    let confirm = |world: &mut World| world.fleet.confirm_archive_all();
    let archived = confirm(&mut world);
    // The first pruning goes at once, up to the archive (the newest entry, the confirmation's
    // own, is not archived).
    assert_eq!(prunes(&mut world, 20_000), [archived]);
    world.apply(CommandKind::PruneAudit { through: archived });
    // Entries archived a little later wait for the interval, not the next tick.
    let archived = confirm(&mut world);
    assert!(prunes(&mut world, 30_000).is_empty());
    assert_eq!(
        prunes(&mut world, 20_000 + AUDIT_PRUNE_INTERVAL_MS),
        [archived]
    );
}

#[test]
fn below_version_ten_an_isolation_drains_every_host_and_no_policy_trips_it() {
    let mut world = two_region_world();
    let mut service = world.fleet.state.services["web"].clone();
    service.isolate_after_failures = 1;
    world.apply(CommandKind::PutService { service });
    // A cluster still at 9 (the policy came from a member already at 10 in this test only).
    world.fleet.state.cluster_version = 9;
    world.start_rollback(1);
    world.step("web-1", RollbackStepKind::Drain, true);
    world.step("web-1", RollbackStepKind::Restore, false);
    world.run_tick(1_000);
    assert!(world.fleet.state.rollbacks[&1].isolated.is_empty());
    world.apply(CommandKind::IsolateService {
        rollback: 1,
        service: "web".into(),
        reason: "take web out".into(),
        region: String::new(),
    });
    let rollback = &world.fleet.state.rollbacks[&1];
    assert_eq!(
        rollback.waves[0].hosts,
        HOSTS.to_vec(),
        "every host, as before"
    );
    assert_eq!(rollback.waves[0].region, "all");
}
