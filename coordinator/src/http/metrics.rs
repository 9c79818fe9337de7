//! `/metrics` in the OpenMetrics text format. Rollback figures are computed from the replicated
//! state at each scrape, so every member reports the same history and a new leader loses none.
//! Series stay few: a rollback's id is a label only while it is active; in the step and gate
//! duration histograms it rides as each bucket's exemplar (the latest rollback that landed
//! there), so a slow bucket leads to the rollback that filled it.

use axum::extract::State as Extract;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::HttpState;
use crate::node::transport::SnapshotStats;
use crate::state_machine::{State, StepProgress, StepStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RollbackLabels {
    outcome: String,
    trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActiveStepLabels {
    rollback_id: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActiveLabels {
    rollback_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabels {
    source: String,
    outcome: String,
}

/// Bucket bounds in seconds for step and gate durations: 0.1 s to about 27 minutes.
fn duration_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.1, 2.0, 15)
}

pub async fn serve(Extract(http): Extract<HttpState>) -> impl IntoResponse {
    let status = http.status.borrow().clone();
    let connected = http.sessions.connected() as i64;
    let text = http.node.read(|state| {
        render(
            state,
            &status,
            connected,
            http.node.queue_full_total(),
            &http.snapshots,
            &http.connections,
            &http.audit_check,
        )
    });
    match text {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {error}\n"),
        )
            .into_response(),
    }
}

fn render(
    state: &State,
    status: &crate::node::raft::RaftStatus,
    agents_connected: i64,
    proposal_queue_full: u64,
    snapshots: &SnapshotStats,
    connections: &crate::admission::ConnectionStats,
    audit_check: &crate::audit_check::AuditCheck,
) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("rewind");
    register_audit_check(&mut registry, audit_check);
    registry.register(
        "connections_refused",
        "Connections closed before they were served, by port (grpc, http) and reason",
        connections.refused.clone(),
    );

    let rollbacks = Family::<RollbackLabels, Counter>::default();
    let active = Family::<RollbackLabels, Gauge<i64>>::default();
    let steps = Family::<StepLabels, Durations>::new_with_constructor(|| {
        HistogramWithExemplars::new(duration_buckets())
    });
    let gates = Family::<StepLabels, Durations>::new_with_constructor(|| {
        HistogramWithExemplars::new(duration_buckets())
    });
    for rollback in state.rollbacks.values() {
        let labels = RollbackLabels {
            outcome: format!("{:?}", rollback.status).to_lowercase(),
            trigger: format!("{:?}", rollback.trigger).to_lowercase(),
        };
        // A counter only counts what cannot change again; running and paused are a gauge.
        if rollback.status.is_terminal() {
            rollbacks.get_or_create(&labels).inc();
        } else {
            active.get_or_create(&labels).inc();
        }
        let id = ActiveLabels {
            rollback_id: rollback.id(),
        };
        for step in &rollback.steps {
            observe(&steps, &step.kind.name(), &step.progress, &id);
        }
        for wave in &rollback.waves {
            observe(&gates, "gate", &wave.gate, &id);
        }
    }
    registry.register(
        "rollbacks",
        "Rollbacks that ended, by outcome and what started them",
        rollbacks,
    );
    registry.register(
        "rollbacks_active",
        "Rollbacks running or paused (outcome label: running or paused)",
        active,
    );
    // Per rollback, only while it runs or is paused, so the series stay few.
    let active_steps = Family::<ActiveStepLabels, Gauge<i64>>::default();
    let active_wave = Family::<ActiveLabels, Gauge<i64>>::default();
    for rollback in state
        .rollbacks
        .values()
        .filter(|rollback| !rollback.status.is_terminal())
    {
        for step in &rollback.steps {
            active_steps
                .get_or_create(&ActiveStepLabels {
                    rollback_id: rollback.id(),
                    state: format!("{:?}", step.progress.status).to_lowercase(),
                })
                .inc();
        }
        active_wave
            .get_or_create(&ActiveLabels {
                rollback_id: rollback.id(),
            })
            .set(i64::from(
                rollback.current_wave().map_or(0, |wave| wave + 1),
            ));
    }
    registry.register(
        "rollback_steps",
        "Steps of each running or paused rollback, by state",
        active_steps,
    );
    registry.register(
        "rollback_current_wave",
        "Wave (from 1) each running or paused rollback is on",
        active_wave,
    );
    registry.register(
        "rollback_step_duration_seconds",
        "Time from a rollback step's last start to its result",
        steps,
    );
    registry.register(
        "gate_wait_seconds",
        "Time a wave waited at its health gate",
        gates,
    );

    let triggers = Family::<TriggerLabels, Counter>::default();
    for (key, count) in &state.trigger_totals {
        let (source, outcome) = key.split_once('/').unwrap_or((key, ""));
        triggers
            .get_or_create(&TriggerLabels {
                source: source.to_string(),
                outcome: outcome.to_string(),
            })
            .inc_by(*count);
    }
    registry.register(
        "triggers",
        "Requests for an automatic rollback, by source and outcome",
        triggers,
    );
    let open = Gauge::<i64>::default();
    open.set(
        state
            .escalations
            .values()
            .filter(|escalation| !escalation.delivered)
            .count() as i64,
    );
    registry.register(
        "escalations_undelivered",
        "Escalations whose webhook has not been delivered",
        open,
    );
    let breaker = Gauge::<i64>::default();
    breaker.set(i64::from(state.breaker.is_some()));
    registry.register(
        "breaker_open",
        "1 while the global breaker stops automatic rollbacks",
        breaker,
    );
    let leader = Gauge::<i64>::default();
    leader.set(i64::from(status.is_leader));
    registry.register("is_leader", "1 on the member that leads", leader);
    let term = Gauge::<i64>::default();
    term.set(status.term as i64);
    registry.register("raft_term", "Raft term", term);
    let applied = Gauge::<i64>::default();
    applied.set(status.applied_index as i64);
    registry.register("raft_applied_index", "Last applied log index", applied);
    let agents = Gauge::<i64>::default();
    agents.set(agents_connected);
    registry.register(
        "agents_connected",
        "Agents with a session on this member",
        agents,
    );
    let queue_full = Counter::<u64>::default();
    queue_full.inc_by(proposal_queue_full);
    registry.register(
        "proposal_queue_full",
        "Requests refused because the queue to the Raft thread was full (step results wait \
         for room instead)",
        queue_full,
    );
    register_replication(&mut registry, status, snapshots);

    let mut text = String::new();
    encode(&mut text, &registry)?;
    Ok(text)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MemberLabels {
    member: String,
}

/// This member's latest verification of its audit chain (`crate::audit_check`); the chain's
/// state is not exported before the first one ends.
fn register_audit_check(registry: &mut Registry, check: &crate::audit_check::AuditCheck) {
    if let Some(intact) = check.intact() {
        let ok = Gauge::<i64>::default();
        ok.set(i64::from(intact));
        registry.register(
            "audit_chain_ok",
            "1 when this member's audit chain verified at its last check, 0 when it did not",
            ok,
        );
    }
    let entries = Gauge::<i64>::default();
    entries.set(check.entries() as i64);
    registry.register(
        "audit_verified_entries",
        "Audit entries this member checked at its last verification",
        entries,
    );
    let at = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    at.set(check.at_ms() as f64 / 1000.0);
    registry.register(
        "audit_last_verified_timestamp_seconds",
        "When this member last verified its audit chain (0: not yet)",
        at,
    );
}

/// Followers' progress (on the leader) and the snapshots this member sent and received.
fn register_replication(
    registry: &mut Registry,
    status: &crate::node::raft::RaftStatus,
    snapshots: &SnapshotStats,
) {
    let lag = Family::<MemberLabels, Gauge<i64>>::default();
    let in_flight = Family::<MemberLabels, Gauge<i64>>::default();
    for peer in status.peers.iter().filter(|peer| peer.id != status.id) {
        let labels = MemberLabels {
            member: peer.id.to_string(),
        };
        lag.get_or_create(&labels)
            .set(status.last_index.saturating_sub(peer.matched_index) as i64);
        in_flight
            .get_or_create(&labels)
            .set(i64::from(peer.snapshot_in_flight));
    }
    registry.register(
        "raft_follower_lag_entries",
        "Log entries each follower is behind the leader's log (on the leader only)",
        lag,
    );
    registry.register(
        "raft_snapshot_in_flight",
        "1 while the leader is sending a follower a snapshot (on the leader only)",
        in_flight,
    );
    registry.register(
        "raft_message_batches",
        "Batches of Raft messages this member sent to peers, by how (stream: queued on the \
         peer's long-lived stream; unary: one call each, delivered, to a member of an earlier \
         release) or failed (a failed call or stream; batches queued on a failed stream are lost \
         with it)",
        snapshots.message_batches.clone(),
    );
    registry.register(
        "raft_snapshot_sends",
        "Snapshots this member streamed to a follower, by outcome (sent, failed)",
        snapshots.sends.clone(),
    );
    registry.register(
        "raft_snapshot_sent_bytes",
        "Bytes of snapshots this member streamed to followers that received them whole",
        snapshots.sent_bytes.clone(),
    );
    registry.register(
        "raft_snapshot_send_seconds",
        "Time each snapshot send took, successful or not",
        snapshots.send_seconds.clone(),
    );
    registry.register(
        "raft_snapshot_receives",
        "Snapshots this member received from a leader, by outcome (received, failed)",
        snapshots.receives.clone(),
    );
    registry.register(
        "raft_snapshot_received_bytes",
        "Bytes of snapshots this member received whole",
        snapshots.received_bytes.clone(),
    );
}

/// Durations with the rollback id as exemplar.
type Durations = HistogramWithExemplars<ActiveLabels>;

fn observe(
    family: &Family<StepLabels, Durations>,
    kind: &str,
    progress: &StepProgress,
    rollback: &ActiveLabels,
) {
    if !matches!(progress.status, StepStatus::Succeeded | StepStatus::Failed) {
        return;
    }
    let seconds = progress
        .finished_at_ms
        .saturating_sub(progress.started_at_ms) as f64
        / 1000.0;
    family
        .get_or_create(&StepLabels {
            kind: kind.to_string(),
            outcome: format!("{:?}", progress.status).to_lowercase(),
        })
        .observe(
            seconds,
            Some(rollback.clone()),
            Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(progress.finished_at_ms)),
        );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::{CommandKind, PlanOptions, Trigger};
    use crate::test_fleet::Fleet;

    fn start_rollback(fleet: &mut Fleet, change: u64) {
        fleet.apply(CommandKind::StartRollback(
            crate::state_machine::StartRollback {
                changes: vec![change],
                options: PlanOptions::default(),
                plan_hash: String::new(),
                reason: "test".into(),
                trigger: Trigger::Manual,
                break_glass: false,
                planned: None,
            },
        ));
    }

    fn finish_drain(fleet: &mut Fleet, rollback: u64) {
        let drain = crate::state_machine::StepTarget::Rollback {
            rollback,
            service: "web".into(),
            host_id: "web-1".into(),
            kind: crate::state_machine::RollbackStepKind::Drain,
        };
        fleet.apply(CommandKind::StepStarted {
            step: drain.clone(),
        });
        fleet.apply(CommandKind::StepFinished {
            step: drain,
            ok: true,
            detail: String::new(),
            snapshot_id: String::new(),
        });
    }

    /// Every name in `text` that looks like one of the coordinator's series (`rewind_...`).
    fn series_named(text: &str) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        let mut rest = text;
        while let Some(at) = rest.find("rewind_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `rewind_` inside another word (`x_rewind_y`) is not a name.
            let inside = at > 0 && rest.as_bytes()[at - 1].is_ascii_alphanumeric();
            if !inside {
                names.insert(name.clone());
            }
            rest = &rest[at + name.len()..];
        }
        names
    }

    #[test]
    fn every_metric_the_shipped_rules_and_dashboard_name_is_exported() {
        // A state with every family populated: an ended rollback whose drain and gate were
        // timed, a running one, a trigger, and a leader with a follower.
        let mut fleet = Fleet::new();
        fleet.service("web", &[]);
        fleet.host("web-1", "eu", &["web"]);
        for version in ["v1", "v2", "v3"] {
            fleet.release("web", version, 0, &[]);
        }
        fleet.deploy("web", "v1");
        let second = fleet.deploy("web", "v2");
        start_rollback(&mut fleet, second);
        finish_drain(&mut fleet, 1);
        let gate = &mut fleet.state.rollbacks.get_mut(&1).unwrap().waves[0].gate;
        gate.status = StepStatus::Succeeded;
        gate.finished_at_ms = gate.started_at_ms + 5_000;
        fleet.apply(CommandKind::ControlRollback {
            rollback: 1,
            action: crate::state_machine::RollbackAction::Abort,
            reason: "test".into(),
        });
        let third = fleet.deploy("web", "v3");
        start_rollback(&mut fleet, third);
        fleet
            .state
            .trigger_totals
            .insert("alertmanager/started".into(), 1);
        let status = crate::node::raft::RaftStatus {
            id: 1,
            is_leader: true,
            peers: vec![crate::node::raft::PeerProgress {
                id: 2,
                ..Default::default()
            }],
            ..Default::default()
        };
        let connections = crate::admission::ConnectionStats::default();
        connections
            .refused
            .get_or_create(&crate::admission::RefusedLabels {
                port: "grpc".into(),
                reason: "handshake_failed".into(),
            })
            .inc();
        let audit_check = crate::audit_check::AuditCheck::default();
        audit_check.record(true, 10, 1);
        let text = render(
            &fleet.state,
            &status,
            1,
            0,
            &SnapshotStats::default(),
            &connections,
            &audit_check,
        )
        .unwrap();
        let exported: std::collections::BTreeSet<String> = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split(['{', ' ']).next())
            .map(str::to_string)
            .collect();

        let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let rules = std::fs::read_to_string(deploy.join("prometheus/rewind.rules.yml")).unwrap();
        let dashboard = std::fs::read_to_string(deploy.join("grafana/rewind.json")).unwrap();
        let dashboard_json: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
        let exprs: Vec<String> = dashboard_json["panels"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|panel| panel["targets"].as_array().unwrap().clone())
            .map(|target| target["expr"].as_str().unwrap().to_string())
            .collect();
        assert!(exprs.len() > 10, "{exprs:?}");
        let named = series_named(&rules)
            .into_iter()
            .chain(exprs.iter().flat_map(|expr| series_named(expr)));
        for name in named {
            assert!(
                exported.contains(&name),
                "{name} is named by deploy/prometheus or deploy/grafana but not exported:\n{text}"
            );
        }
        // The dashboard's recording-rule names are rules of the shipped file.
        for expr in &exprs {
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
                if word.starts_with("rewind:") {
                    assert!(
                        rules.contains(&format!("record: {word}\n")),
                        "{word} is not a recording rule of rewind.rules.yml"
                    );
                }
            }
        }
    }

    #[test]
    fn a_running_rollback_has_series_of_its_own_and_an_ended_one_is_counted() {
        let mut fleet = Fleet::new();
        fleet.service("web", &[]);
        fleet.host("web-1", "eu", &["web"]);
        fleet.release("web", "v1", 0, &[]);
        fleet.release("web", "v2", 0, &[]);
        fleet.deploy("web", "v1");
        let change = fleet.deploy("web", "v2");
        start_rollback(&mut fleet, change);
        finish_drain(&mut fleet, 1);
        let status = crate::node::raft::RaftStatus::default();
        let rendered = |state: &State| {
            render(
                state,
                &status,
                1,
                7,
                &SnapshotStats::default(),
                &Default::default(),
                &Default::default(),
            )
            .unwrap()
        };
        let text = rendered(&fleet.state);
        for expected in [
            // The drain's success started the restore (cluster version 13).
            r#"rewind_rollback_steps{rollback_id="rb-1",state="pending"} 3"#,
            r#"rewind_rollback_steps{rollback_id="rb-1",state="running"} 1"#,
            "rewind_proposal_queue_full_total 7",
            r#"rewind_rollback_steps{rollback_id="rb-1",state="succeeded"} 1"#,
            r#"rewind_rollback_current_wave{rollback_id="rb-1"} 1"#,
            r#"rewind_rollbacks_active{outcome="running",trigger="manual"} 1"#,
            "rewind_agents_connected 1",
        ] {
            assert!(text.contains(expected), "{expected} in:\n{text}");
        }
        fleet.apply(CommandKind::ControlRollback {
            rollback: 1,
            action: crate::state_machine::RollbackAction::Abort,
            reason: "test".into(),
        });
        let text = rendered(&fleet.state);
        assert!(
            text.contains(r#"rewind_rollbacks_total{outcome="aborted",trigger="manual"} 1"#),
            "{text}"
        );
        // Its id stays only as the exemplar of the bucket its drain landed in (1 s here).
        let exemplar = r#"rewind_rollback_step_duration_seconds_bucket{le="1.6",kind="drain",outcome="succeeded"} 1 # {rollback_id="rb-1"} 1.0"#;
        assert!(text.contains(exemplar), "{exemplar} in:\n{text}");
        assert_eq!(
            text.matches("rb-1").count(),
            1,
            "an ended rollback has no series of its own:\n{text}"
        );
    }
}
