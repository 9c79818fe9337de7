//! Invariant: a rollback survives members crashing or being cut off at any moment.
//!
//! One three-member cluster and two agents. Each round deploys a bad release, starts its
//! rollback and, after a seeded delay, injects a seeded fault: kill -9 the leader, kill -9 a
//! follower, kill -9 every member at once, or (on a private network) cut the leader off from
//! every peer and agent and heal it after a seeded time. It waits for the rollback to end (under
//! a new leader where there is one) and brings the killed members back. The run ends by checking
//! that every rollback succeeded and every host is exactly restored, that no step ran twice
//! (restart counts), and that all members hold the same state with an intact audit chain.
//!
//! Every member brought back must reach the leader's applied index within [`CATCH_UP_BOUND`].
//! In the large-state mode ([`StateSize::Large`]) the state first grows until the leader's
//! snapshot is over 16 MiB, and each member kept down is left behind a compaction before it
//! comes back, so it can only catch up by being sent the large snapshot.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rewind_proto::v1 as pb;
use rewind_tests::{
    ClusterHarness, TestHost, config_for, must_agents_connected, must_grow_state_past,
    must_register_web, must_wait_async,
};
use tonic::transport::Channel;
use tracing::info;

use crate::{FaultOutcome, invariants};

type Client = pb::control_service_client::ControlServiceClient<Channel>;

const WAIT: Duration = Duration::from_secs(60);
/// A member brought back must reach the leader's applied index within this.
pub const CATCH_UP_BOUND: Duration = Duration::from_secs(60);
/// The large-state mode grows the state until the leader's snapshot is larger than this.
pub const LARGE_STATE_BYTES: u64 = 16 << 20;
/// Writes that carry the log past a compaction (the harness snapshots every 50 entries).
const WRITES_PAST_A_COMPACTION: usize = 60;

/// How much state the cluster holds when the faults begin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateSize {
    /// Only what the rounds write.
    Small,
    /// Grown past [`LARGE_STATE_BYTES`] of snapshot first; killed members return behind a
    /// compaction.
    Large,
}

/// What a round does to the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    KillLeader,
    KillFollower,
    KillAll,
    /// Cut the leader off from everyone, then heal.
    PartitionLeader,
}

/// Where the members run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// Loopback: no root needed, no partitions.
    Loopback,
    /// Each member in its own network namespace, so the leader can be partitioned. Needs root.
    Private,
}

#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub rounds: usize,
    pub faults: Vec<(Fault, FaultOutcome)>,
    /// Snapshots members installed from a leader (from their logs).
    pub snapshots_installed: usize,
}

pub async fn run(
    seed: u64,
    rounds: usize,
    dir: &Path,
    network: Network,
    size: StateSize,
) -> anyhow::Result<Report> {
    let mut random = StdRng::seed_from_u64(seed);
    let (mut cluster, possible) = match network {
        Network::Loopback => (
            ClusterHarness::must_start(dir, 3),
            &[Fault::KillLeader, Fault::KillFollower, Fault::KillAll][..],
        ),
        Network::Private => (
            ClusterHarness::must_start_partitionable(dir, 3),
            &[
                Fault::KillLeader,
                Fault::KillFollower,
                Fault::KillAll,
                Fault::PartitionLeader,
            ][..],
        ),
    };
    let mut hosts = cluster.must_prepare_hosts(dir, &["web-1", "web-2"]);
    for host in &mut hosts {
        host.must_start_agent();
    }
    let (_, mut client) = cluster.must_leader().await;
    setup(&mut client, &hosts).await?;
    deploy(&cluster, "v1", "first").await?;
    if size == StateSize::Large {
        let writes = must_grow_state_past(&cluster, LARGE_STATE_BYTES).await;
        info!(seed, writes, "The state is large.");
    }

    let mut faults = Vec::with_capacity(rounds);
    // Changes and rollbacks whose start was acknowledged: each must survive on every member.
    let mut acknowledged: Vec<(String, String)> = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let delay = Duration::from_millis(random.random_range(0..300));
        let fault = possible[random.random_range(0..possible.len())];
        let heal_after = Duration::from_millis(random.random_range(500..3000));
        let change_id = deploy(&cluster, "v2", &format!("round-{round}")).await?;
        // The deploy tool's config, told to rewind (else the rollback refuses to wipe it).
        for host in &hosts {
            std::fs::write(host.root.join("config/app.toml"), config_for("v2"))
                .context("rewrite config")?;
            let adopt = pb::AdoptHostStateRequest {
                host_id: host.id.clone(),
                service: "web".into(),
                reason: "the deploy tool wrote v2's config".into(),
            };
            on_leader(
                &cluster,
                "adopt the config the deploy wrote",
                |mut client| {
                    let adopt = adopt.clone();
                    async move { client.adopt_host_state(adopt).await }
                },
            )
            .await?;
        }
        let start = pb::StartRollbackRequest {
            request_id: format!("rollback-{round}"),
            change_id: change_id.clone(),
            reason: "chaos".into(),
            max_parallel: 2,
            ..Default::default()
        };
        let started = on_leader(&cluster, "start the rollback", |mut client| {
            let start = start.clone();
            async move { client.start_rollback(start).await }
        })
        .await?;
        let rollback_id = started.rollback.context("no rollback")?.rollback_id;
        acknowledged.push((change_id.clone(), rollback_id.clone()));
        tokio::time::sleep(delay).await;
        let (leader, mut client) = cluster.must_leader().await;
        // Read on the member about to be killed; if it just lost leadership, count it as unknown.
        let rollback = client
            .get_rollback(pb::GetRollbackRequest {
                rollback_id: rollback_id.clone(),
                ..Default::default()
            })
            .await
            .ok()
            .and_then(|response| response.into_inner().rollback);
        let outcome = match rollback {
            None => FaultOutcome::Indeterminate,
            Some(rollback)
                if pb::RollbackState::try_from(rollback.state)
                    .is_ok_and(|state| state.is_terminal()) =>
            {
                FaultOutcome::Skipped
            }
            Some(_) => FaultOutcome::Installed,
        };
        let killed: Vec<u64> = match fault {
            Fault::KillLeader => vec![leader],
            Fault::KillFollower => vec![(1..=3).find(|&id| id != leader).unwrap_or(1)],
            Fault::KillAll => vec![1, 2, 3],
            Fault::PartitionLeader => vec![],
        };
        for &id in &killed {
            cluster.kill(id);
        }
        if fault == Fault::PartitionLeader {
            cluster.cut(leader);
        }
        faults.push((fault, outcome));
        info!(
            seed,
            round,
            ?fault,
            ?killed,
            delay_ms = delay.as_millis() as u64,
            ?outcome,
            "Fault injected."
        );
        if fault == Fault::PartitionLeader {
            // The others elect a leader and the agents move to it meanwhile; the rollback may
            // end before or after the heal.
            tokio::time::sleep(heal_after).await;
            cluster.heal(leader);
            info!(
                seed,
                round,
                leader,
                heal_after_ms = heal_after.as_millis() as u64,
                "Partition healed."
            );
        }
        if fault == Fault::KillAll {
            for &id in &killed {
                cluster.must_start_member(id);
            }
        }
        let restarted_at_once = fault == Fault::KillAll;

        let ended = wait_rollback(&cluster, &rollback_id).await?;
        ensure!(
            ended.state == pb::RollbackState::Succeeded as i32,
            "round {round}: {rollback_id} ended {:?}: {}",
            ended.state,
            ended.outcome_detail
        );
        for host in &hosts {
            ensure!(
                host.current_link() == "releases/v1",
                "round {round}: {} points at {}",
                host.id,
                host.current_link()
            );
            ensure!(
                host.config_bytes() == config_for("v1").as_bytes(),
                "round {round}: {} config not restored",
                host.id
            );
        }
        if !restarted_at_once && !killed.is_empty() {
            if size == StateSize::Large {
                write_past_a_compaction(&cluster, round).await?;
            }
            for &id in &killed {
                cluster.must_start_member(id);
            }
        }
        for &id in &killed {
            invariants::catches_up(&cluster, id, CATCH_UP_BOUND)
                .await
                .with_context(|| format!("round {round}: member {id} after its restart"))?;
        }
    }

    // v1, then per round one activation and one rollback restart: anything more ran twice.
    invariants::restarts_exact(&hosts, 1 + 2 * rounds)?;
    let live = cluster.live_members();
    let settled = invariants::members_agree(&cluster, &live).await?;
    let (_, mut client) = cluster.must_leader().await;
    invariants::acknowledged_present(&mut client, &acknowledged).await?;
    // Per host: capture + activate for v1, then per round capture + activate + drain + restore
    // + restart + undrain (verify and the wave's gate run on the coordinator).
    invariants::journals_show_each_step_once(&mut hosts, 2 + 6 * rounds)?;
    info!(
        seed,
        rounds,
        applied_index = settled.applied_index,
        "All members agree."
    );
    Ok(Report {
        seed,
        rounds,
        faults,
        snapshots_installed: snapshots_installed(&cluster),
    })
}

/// Registers small releases until the leader's log has passed a compaction, so a member that
/// was down meanwhile can only catch up by being sent a snapshot.
async fn write_past_a_compaction(cluster: &ClusterHarness, round: usize) -> anyhow::Result<()> {
    for number in 0..WRITES_PAST_A_COMPACTION {
        let release = pb::Release {
            service: "web".into(),
            version: format!("filler-{round}-{number}"),
            artifact_digest: format!(
                "sha256:{}",
                rewind_shared::digest::sha256_hex(format!("{round}/{number}").as_bytes())
            ),
            commit: "c0ffee".into(),
            ..Default::default()
        };
        let request = pb::RegisterReleaseRequest {
            request_id: format!("filler-{round}-{number}"),
            release: Some(release),
        };
        on_leader(cluster, "register a filler release", |mut client| {
            let request = request.clone();
            async move { client.register_release(request).await }
        })
        .await?;
    }
    Ok(())
}

/// Snapshots the members installed from a leader, counted in their logs.
fn snapshots_installed(cluster: &ClusterHarness) -> usize {
    (1..=3)
        .map(|id| {
            std::fs::read_to_string(cluster.dir.join(format!("member-{id}.log")))
                .unwrap_or_default()
                .matches("Installed a snapshot from the leader")
                .count()
        })
        .sum()
}

async fn setup(client: &mut Client, hosts: &[TestHost]) -> anyhow::Result<()> {
    must_agents_connected(client, hosts.len()).await;
    must_register_web(client, &hosts[0], false).await;
    Ok(())
}

/// Starts a change on the current leader and waits until it is deployed.
async fn deploy(cluster: &ClusterHarness, version: &str, tag: &str) -> anyhow::Result<String> {
    let request = pb::StartChangeRequest {
        request_id: format!("change-{tag}"),
        service: "web".into(),
        version: version.into(),
        host_ids: vec![],
        reason: tag.into(),
        flags_on: vec![],
        migrations: vec![],
        break_glass: false,
    };
    let started = on_leader(cluster, "start the change", |mut client| {
        let request = request.clone();
        async move { client.start_change(request).await }
    })
    .await?;
    let change_id = started.change.context("no change")?.change_id;
    let change = must_wait_async(WAIT, "the change to deploy", || {
        let change_id = change_id.clone();
        async move {
            let (_, mut client) = cluster.must_leader().await;
            let change = client
                .get_change(pb::GetChangeRequest { change_id })
                .await
                .ok()?
                .into_inner()
                .change?;
            (change.state != pb::ChangeState::Capturing as i32
                && change.state != pb::ChangeState::Deploying as i32)
                .then_some(change)
        }
    })
    .await;
    if change.state != pb::ChangeState::Deployed as i32 {
        bail!(
            "change {change_id} ended {:?}: {}",
            change.state,
            change.reason
        );
    }
    Ok(change_id)
}

async fn wait_rollback(
    cluster: &ClusterHarness,
    rollback_id: &str,
) -> anyhow::Result<pb::Rollback> {
    Ok(must_wait_async(WAIT, "the rollback to end", || async {
        let (_, mut client) = cluster.must_leader().await;
        let rollback = client
            .get_rollback(pb::GetRollbackRequest {
                rollback_id: rollback_id.to_string(),
                ..Default::default()
            })
            .await
            .ok()?
            .into_inner()
            .rollback?;
        pb::RollbackState::try_from(rollback.state)
            .ok()?
            .is_terminal()
            .then_some(rollback)
    })
    .await)
}

/// Calls the leader, finding it again while leadership moves (`UNAVAILABLE`); the requests carry
/// fixed request ids, so a retry of one that did land acts once.
async fn on_leader<T, F, Fut>(cluster: &ClusterHarness, what: &str, call: F) -> anyhow::Result<T>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut last = None;
    for _ in 0..50 {
        let (_, client) = cluster.must_leader().await;
        match call(client).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                last = Some(status);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => bail!("{what}: {status}"),
        }
    }
    bail!("{what}: no leader answered: {last:?}")
}
