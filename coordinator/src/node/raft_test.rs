//! Members on an in-memory network: election, replication through `apply()`, failover, a
//! member that was down across a compaction catching up by snapshot, and membership changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::state_machine::{Command, CommandKind, Labels, MemberRecord, MembershipChange};

/// Members' inboxes, and what a snapshot send needs: each member's snapshot files (raft-rs's
/// `MsgSnapshot` carries metadata only, as over gRPC) and its report channel. Messages to a
/// member not running, or whose inbox is full, are dropped.
#[derive(Clone, Default)]
struct LocalNet {
    peers: Arc<Mutex<HashMap<u64, mpsc::Sender<Message>>>>,
    files: Arc<Mutex<HashMap<u64, crate::storage::SnapshotFiles>>>,
    reports: Arc<Mutex<HashMap<u64, mpsc::Sender<PeerReport>>>>,
    /// Snapshot sends still to lose (reported as failed), as a cut connection would.
    snapshots_to_lose: Arc<std::sync::atomic::AtomicUsize>,
    snapshots_lost: Arc<std::sync::atomic::AtomicUsize>,
}

impl Transport for LocalNet {
    fn send(&self, messages: Vec<Message>) {
        let peers = self.peers.lock().unwrap();
        for mut message in messages {
            if message.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                let index = message.get_snapshot().get_metadata().index;
                let delivered = self.fill_snapshot(&mut message) && peers.contains_key(&message.to);
                if let Some(reports) = self.reports.lock().unwrap().get(&message.from) {
                    let report = PeerReport::Snapshot {
                        peer: message.to,
                        index,
                        delivered,
                    };
                    reports.try_send(report).unwrap();
                }
                if !delivered {
                    continue;
                }
            }
            if let Some(peer) = peers.get(&message.to) {
                let _ = peer.try_send(message);
            }
        }
    }
}

impl LocalNet {
    /// Puts the sender's snapshot data into a `MsgSnapshot`; false when it is lost instead.
    fn fill_snapshot(&self, message: &mut Message) -> bool {
        use std::sync::atomic::Ordering;
        let lose =
            self.snapshots_to_lose
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                    left.checked_sub(1)
                });
        if lose.is_ok() {
            self.snapshots_lost.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        let index = message.get_snapshot().get_metadata().index;
        let files = self.files.lock().unwrap()[&message.from].clone();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut files.open(index).unwrap(), &mut data).unwrap();
        message.mut_snapshot().set_data(data.into());
        true
    }
}

struct Cluster {
    net: LocalNet,
    dirs: HashMap<u64, tempfile::TempDir>,
    members: HashMap<u64, RaftMember>,
    /// Members that bootstrap the cluster; any other member joins.
    founding: Vec<u64>,
}

const VOTERS: [u64; 3] = [1, 2, 3];

fn settings(id: u64) -> RaftSettings {
    RaftSettings {
        id,
        tick: Duration::from_millis(20),
        election_ticks: 10,
        heartbeat_ticks: 2,
        snapshot_every: 5,
        initial_cluster_version: crate::state_machine::version::CURRENT,
    }
}

impl Cluster {
    fn start() -> Self {
        Self::start_with(&VOTERS)
    }

    fn start_with(founding: &[u64]) -> Self {
        rewind_shared::logging::init("warn");
        let mut cluster = Self {
            net: LocalNet::default(),
            dirs: HashMap::new(),
            members: HashMap::new(),
            founding: founding.to_vec(),
        };
        for &id in founding {
            cluster.start_member(id);
        }
        cluster
    }

    fn start_member(&mut self, id: u64) {
        let dir = self
            .dirs
            .entry(id)
            .or_insert_with(|| tempfile::tempdir().unwrap());
        let store = RaftStore::open(dir.path()).unwrap();
        self.net
            .files
            .lock()
            .unwrap()
            .insert(id, store.snapshot_files());
        let (reports, report_receiver) = crate::node::peer_report_channel();
        self.net.reports.lock().unwrap().insert(id, reports);
        let founding: Vec<MemberRecord> = if self.founding.contains(&id) {
            self.founding.iter().map(|&id| record(id)).collect()
        } else {
            Vec::new()
        };
        let member = start_member(
            settings(id),
            store,
            &founding,
            self.net.clone(),
            report_receiver,
            Arc::from("rw-test"),
        )
        .unwrap();
        self.net
            .peers
            .lock()
            .unwrap()
            .insert(id, member.peer_messages.clone());
        self.members.insert(id, member);
    }

    fn stop_member(&mut self, id: u64) {
        self.net.peers.lock().unwrap().remove(&id);
        // Its snapshot files hold its database open (the audit tree), as its process would.
        self.net.files.lock().unwrap().remove(&id);
        self.members.remove(&id).unwrap().stop();
    }

    async fn leader(&self) -> u64 {
        let started = Instant::now();
        loop {
            let statuses: Vec<RaftStatus> = self
                .members
                .values()
                .map(|member| member.status.borrow().clone())
                .collect();
            if let Some(leader) = statuses.iter().find(|status| status.is_leader)
                && statuses.iter().all(|status| status.leader_id == leader.id)
            {
                return leader.id;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no leader: {statuses:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn propose(&self, id: u64, host: &str) -> Result<Outcome, CoordinatorError> {
        let command = Command {
            at_ms: 1,
            identity: "test".into(),
            request_id: String::new(),
            audit_seed: String::new(),
            kind: CommandKind::RegisterHost {
                host_id: host.into(),
                labels: Labels::default(),
                services: vec![],
                agent_version: String::new(),
            },
        };
        self.members[&id].node.propose(command).await
    }

    async fn change(
        &self,
        via: u64,
        change: MembershipChange,
        id: u64,
    ) -> Result<Outcome, CoordinatorError> {
        let command = Command {
            at_ms: 1,
            identity: "test".into(),
            request_id: String::new(),
            audit_seed: String::new(),
            kind: CommandKind::ChangeMembership {
                change,
                member: record(id),
                reason: "test".into(),
            },
        };
        self.members[&via].node.change_membership(command).await
    }

    /// Waits until every running member holds the same state with at least `hosts` hosts.
    async fn converged(&self, hosts: usize) -> State {
        let started = Instant::now();
        loop {
            let states: Vec<State> = self
                .members
                .values()
                .map(|member| member.node.read(State::clone))
                .collect();
            if states[0].hosts.len() >= hosts && states.iter().all(|state| *state == states[0]) {
                return states[0].clone();
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "members did not converge on {hosts} hosts"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn record(id: u64) -> MemberRecord {
    MemberRecord {
        id,
        address: format!("127.0.0.1:{}", 7000 + id),
        region: "test".into(),
        name: format!("coordinator-{id}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_three_member_cluster_replicates_fails_over_and_catches_up_by_snapshot() {
    let mut cluster = Cluster::start();
    let leader = cluster.leader().await;
    cluster.propose(leader, "host-1").await.unwrap();
    let state = cluster.converged(1).await;
    assert_eq!(state.audit.len(), 1);

    let follower = VOTERS.into_iter().find(|&id| id != leader).unwrap();
    let refused = cluster.propose(follower, "host-x").await.unwrap_err();
    assert_eq!(refused, CoordinatorError::NotLeader { leader_id: leader });

    // A read barrier passes on the leader at or after the write, and not on a follower.
    let leader_node = &cluster.members[&leader].node;
    let read_index = leader_node.read_barrier().await.unwrap();
    assert!(
        read_index >= state.applied_index
            && leader_node.read(|state| state.applied_index) >= read_index
    );
    let refused = cluster.members[&follower]
        .node
        .read_barrier()
        .await
        .unwrap_err();
    assert_eq!(refused, CoordinatorError::NotLeader { leader_id: leader });

    // Lose the leader: the other two elect a new one and keep serving writes; enough of them to
    // compact the log past everything the old leader has.
    cluster.stop_member(leader);
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, leader);
    for index in 2..=12 {
        cluster
            .propose(new_leader, &format!("host-{index}"))
            .await
            .unwrap();
    }
    cluster.converged(12).await;

    // The old leader comes back from its disk and catches up (by snapshot: its log is behind the
    // compaction) to exactly the same state.
    // Its first snapshot is lost on the way: the leader is told, and sends it again.
    cluster
        .net
        .snapshots_to_lose
        .store(1, std::sync::atomic::Ordering::SeqCst);
    cluster.start_member(leader);
    let state = cluster.converged(12).await;
    assert_eq!(
        cluster.members[&leader].status.borrow().installed_snapshots,
        1,
        "it caught up by snapshot"
    );
    assert_eq!(
        cluster
            .net
            .snapshots_lost
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a snapshot was lost and sent again"
    );
    assert_eq!(state.audit.verify().first_broken, None);
    assert_eq!(state.audit.len(), 12);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_cluster_recovers_every_acknowledged_write_from_disk() {
    let mut cluster = Cluster::start();
    let leader = cluster.leader().await;
    for index in 1..=7 {
        cluster
            .propose(leader, &format!("host-{index}"))
            .await
            .unwrap();
    }
    let before = cluster.converged(7).await;
    for id in VOTERS {
        cluster.stop_member(id);
    }
    for id in VOTERS {
        cluster.start_member(id);
    }
    let leader = cluster.leader().await;
    let after = cluster.converged(7).await;
    assert_eq!(after.hosts, before.hosts);
    assert_eq!(after.audit, before.audit);
    cluster.propose(leader, "host-8").await.unwrap();
    cluster.converged(8).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_joins_as_learner_is_promoted_and_removed_with_registry_and_audit() {
    let mut cluster = Cluster::start_with(&[1]);
    assert_eq!(cluster.leader().await, 1);
    cluster.propose(1, "host-1").await.unwrap();
    assert_eq!(
        cluster.members[&1].node.read(|state| state.members.clone()),
        [(1, record(1))].into(),
        "the founding registry is the bootstrap state"
    );

    // Member 2 starts with an empty store and waits; the cluster adds it, it catches up by a
    // snapshot that already counts it, and is promoted.
    cluster.start_member(2);
    cluster
        .change(1, MembershipChange::AddLearner, 2)
        .await
        .unwrap();
    cluster
        .change(1, MembershipChange::Promote, 2)
        .await
        .unwrap();
    for index in 2..=8 {
        cluster.propose(1, &format!("host-{index}")).await.unwrap();
    }
    let state = cluster.converged(8).await;
    assert_eq!(state.members.keys().copied().collect::<Vec<_>>(), [1, 2]);
    assert!(cluster.members[&2].status.borrow().installed_snapshots >= 1);
    // Two voters now: a write needs both, so member 2 really votes (alone, member 1 loses
    // check-quorum and steps down, or the write waits).
    cluster.stop_member(2);
    let alone = tokio::time::timeout(Duration::from_millis(500), cluster.propose(1, "host-x"));
    assert!(
        !matches!(alone.await, Ok(Ok(_))),
        "a write committed without member 2"
    );
    cluster.start_member(2);
    let leader = cluster.leader().await;
    cluster.propose(leader, "host-9").await.unwrap();
    cluster.converged(9).await;

    // The leader cannot remove itself; removing the other leaves it committing alone.
    let other = 3 - leader;
    let refused = cluster
        .change(leader, MembershipChange::Remove, leader)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("transfer-leader"), "{refused}");
    cluster
        .change(leader, MembershipChange::Remove, other)
        .await
        .unwrap();
    cluster.stop_member(other);
    cluster.propose(leader, "host-10").await.unwrap();
    let state = cluster.members[&leader].node.read(State::clone);
    assert_eq!(state.members.keys().copied().collect::<Vec<_>>(), [leader]);
    let entries = state.audit.entries();
    let actions: Vec<&str> = entries
        .iter()
        .map(|entry| entry.action.as_str())
        .filter(|action| action.starts_with("cluster."))
        .collect();
    assert_eq!(
        actions,
        ["cluster.add-learner", "cluster.promote", "cluster.remove"]
    );
    assert_eq!(state.audit.verify().first_broken, None);
}
