//! Invariants every scenario ends with, checked against every live member and host.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use rewind_proto::v1 as pb;
use rewind_tests::{ClusterHarness, TestHost};

/// Waits until every live member has applied the same index, then requires the same state
/// digest and an intact audit chain on each.
pub async fn members_agree(
    cluster: &ClusterHarness,
    live: &[u64],
) -> anyhow::Result<pb::MemberStatus> {
    let started = Instant::now();
    loop {
        let mut statuses = Vec::new();
        for &id in live {
            match member_status(cluster, id).await {
                Ok(status) => statuses.push(status),
                // A member just restarted may not listen yet.
                Err(error) if started.elapsed() < Duration::from_secs(60) => {
                    tracing::debug!(
                        id,
                        error = format!("{error:#}"),
                        "Member not answering yet."
                    );
                }
                Err(error) => return Err(error.context(format!("ask member {id}"))),
            }
        }
        if statuses.len() < live.len() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let first = statuses[0].clone();
        let settled = statuses
            .iter()
            .all(|status| status.applied_index == first.applied_index);
        if settled {
            for status in &statuses {
                ensure!(
                    status.audit_ok,
                    "member {}: the audit chain does not verify",
                    status.member_id
                );
                ensure!(
                    status.state_digest == first.state_digest,
                    "members {} and {} applied index {} but hold different states ({} vs {})",
                    first.member_id,
                    status.member_id,
                    first.applied_index,
                    first.state_digest,
                    status.state_digest
                );
            }
            return Ok(first);
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("members did not settle on one applied index: {statuses:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn member_status(cluster: &ClusterHarness, id: u64) -> anyhow::Result<pb::MemberStatus> {
    cluster
        .member_status(id, false)
        .await
        .map_err(anyhow::Error::msg)
}

/// Member `id`, just brought back, reaches within `bound` the index the leader had applied
/// when this was asked (right after the restart, or once the rollback after a restart of every
/// member ended).
pub async fn catches_up(cluster: &ClusterHarness, id: u64, bound: Duration) -> anyhow::Result<()> {
    let (leader, _) = cluster.must_leader().await;
    cluster
        .catch_up(id, leader, bound, false)
        .await
        .map(|_| ())
        .map_err(anyhow::Error::msg)
}

/// No step ran twice on any host, from the agents' own journals: each host journaled exactly
/// `expected_steps` steps, each run once and ended successfully. Stops the agents.
pub fn journals_show_each_step_once(
    hosts: &mut [TestHost],
    expected_steps: usize,
) -> anyhow::Result<()> {
    for host in hosts {
        let journal = host.must_stop_and_read_journal();
        for record in &journal {
            let step = record["step_id"].as_str().unwrap_or("?");
            ensure!(
                record["runs"] == 1,
                "{}: step {step} ran {} times",
                host.id,
                record["runs"]
            );
            ensure!(
                record["outcome"]["ok"] == true,
                "{}: step {step} did not end well: {}",
                host.id,
                record["outcome"]
            );
        }
        ensure!(
            journal.len() == expected_steps,
            "{}: journaled {} steps, expected {expected_steps}",
            host.id,
            journal.len()
        );
    }
    Ok(())
}

/// No step ran twice on any host: each host restarted exactly as often as changes and
/// rollbacks asked it to (the restart command appends a line per run).
pub fn restarts_exact(hosts: &[TestHost], expected: usize) -> anyhow::Result<()> {
    for host in hosts {
        ensure!(
            host.restarts() == expected,
            "{} restarted {} times, expected exactly {expected}",
            host.id,
            host.restarts()
        );
    }
    Ok(())
}

/// Every acknowledged change and rollback is in the leader's state, the rollback succeeded and
/// belongs to its change. With [`members_agree`] (equal state digests) that holds on every member.
pub async fn acknowledged_present(
    client: &mut pb::control_service_client::ControlServiceClient<tonic::transport::Channel>,
    acknowledged: &[(String, String)],
) -> anyhow::Result<()> {
    for (change_id, rollback_id) in acknowledged {
        let change = client
            .get_change(pb::GetChangeRequest {
                change_id: change_id.clone(),
            })
            .await?
            .into_inner()
            .change;
        ensure!(
            change.is_some(),
            "acknowledged change {change_id} is missing"
        );
        let rollback = client
            .get_rollback(pb::GetRollbackRequest {
                rollback_id: rollback_id.clone(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .rollback;
        let Some(rollback) = rollback else {
            bail!("acknowledged rollback {rollback_id} is missing");
        };
        ensure!(
            rollback.change_id == *change_id
                && rollback.state == pb::RollbackState::Succeeded as i32,
            "rollback {rollback_id}: of {} and {:?}, expected a succeeded rollback of {change_id}",
            rollback.change_id,
            rollback.state
        );
    }
    Ok(())
}
