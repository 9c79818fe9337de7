//! How fast a command is committed: the Raft member, sled with a flush before every
//! acknowledgement, and `apply()`, with 1 and 3 members on an in-process network (so the
//! figures are the storage and consensus path, not TLS or the network).
//!
//! Run: `cargo bench -p rewind-coordinator --bench commit`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raft::eraftpb::{Message, MessageType};
use rewind_coordinator::node::raft::{RaftMember, RaftSettings, Transport, start_member};
use rewind_coordinator::state_machine::{Command, CommandKind, Labels, MemberRecord};
use rewind_coordinator::storage::{RaftStore, SnapshotFiles};
use tokio::sync::mpsc;

/// Members' inboxes, and their snapshot files: raft-rs's `MsgSnapshot` carries metadata only,
/// and a follower that falls behind a compaction is sent the data from the leader's file.
#[derive(Clone, Default)]
struct LocalNet {
    peers: Arc<Mutex<HashMap<u64, mpsc::Sender<Message>>>>,
    files: Arc<Mutex<HashMap<u64, SnapshotFiles>>>,
}

impl Transport for LocalNet {
    fn send(&self, messages: Vec<Message>) {
        let peers = self.peers.lock().unwrap();
        for mut message in messages {
            if message.get_msg_type() == MessageType::MsgSnapshot {
                let index = message.get_snapshot().get_metadata().index;
                let mut data = Vec::new();
                let files = self.files.lock().unwrap()[&message.from].clone();
                std::io::Read::read_to_end(&mut files.open(index).unwrap(), &mut data).unwrap();
                message.mut_snapshot().set_data(data.into());
            }
            if let Some(peer) = peers.get(&message.to) {
                let _ = peer.try_send(message);
            }
        }
    }
}

fn command(index: usize) -> Command {
    Command {
        at_ms: index as u64,
        identity: "bench".into(),
        request_id: String::new(),
        audit_seed: String::new(),
        kind: CommandKind::RegisterHost {
            host_id: format!("host-{}", index % 10_000),
            labels: Labels::default(),
            services: vec!["web".into()],
            agent_version: "bench".into(),
        },
    }
}

async fn leader(members: &[RaftMember]) -> usize {
    loop {
        if let Some(position) = members
            .iter()
            .position(|member| member.status.borrow().is_leader)
        {
            return position;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn run(size: u64, sequential: usize, concurrent: usize, in_flight: usize) {
    let dirs: Vec<tempfile::TempDir> = (0..size).map(|_| tempfile::tempdir().unwrap()).collect();
    let voters: Vec<MemberRecord> = (1..=size)
        .map(|id| MemberRecord {
            id,
            address: format!("member-{id}:0"),
            region: "bench".into(),
            name: format!("coordinator-{id}"),
        })
        .collect();
    let net = LocalNet::default();
    let mut members = Vec::new();
    for (position, id) in voters.iter().map(|member| member.id).enumerate() {
        let store = RaftStore::open(dirs[position].path()).unwrap();
        net.files.lock().unwrap().insert(id, store.snapshot_files());
        let mut settings = RaftSettings::new(id);
        settings.tick = Duration::from_millis(20);
        let (_, reports) = rewind_coordinator::node::peer_report_channel();
        let member = start_member(
            settings,
            store,
            &voters,
            net.clone(),
            reports,
            Arc::from("bench"),
        )
        .unwrap();
        net.peers
            .lock()
            .unwrap()
            .insert(id, member.peer_messages.clone());
        members.push(member);
    }
    let node = members[leader(&members).await].node.clone();

    let mut latencies = Vec::with_capacity(sequential);
    for index in 0..sequential {
        let started = Instant::now();
        node.propose(command(index)).await.unwrap();
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let percentile = |share: f64| {
        latencies[((latencies.len() as f64 * share) as usize).min(latencies.len() - 1)]
    };

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..in_flight {
        let node = node.clone();
        tasks.spawn(async move {
            for index in (worker..concurrent).step_by(in_flight) {
                node.propose(command(index)).await.unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    println!(
        "{size} member(s): one at a time p50 {:.2} ms, p99 {:.2} ms; {in_flight} in flight {:.0} commits/s ({concurrent} in {:.2} s)",
        percentile(0.5).as_secs_f64() * 1000.0,
        percentile(0.99).as_secs_f64() * 1000.0,
        concurrent as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
    );
    for member in members {
        member.stop();
    }
}

fn main() {
    // REWIND_LOG=rewind_coordinator=debug shows each snapshot's size and cost.
    rewind_shared::logging::init("warn");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        run(1, 500, 5_000, 64).await;
        run(3, 500, 5_000, 64).await;
        // A longer history: snapshots carry the whole state, audit log included.
        run(3, 500, 60_000, 64).await;
    });
}
