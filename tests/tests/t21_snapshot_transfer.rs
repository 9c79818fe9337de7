//! A member that was down while the leader compacted its log comes back and is sent the state
//! as a streamed snapshot, however large: three real members, a state whose snapshot is over
//! 16 MiB (four times what one gRPC message may carry), and a snapshot stream cut part-way by a
//! proxy, which the leader reports to raft-rs and sends again. And a member refuses snapshot
//! streams that are not a peer's, not whole or not a state, naming what is wrong.

use std::time::Duration;

use protobuf::Message as _;
use raft_proto::eraftpb::{Message, MessageType};
use rewind_proto::v1 as pb;
use rewind_proto::v1::raft_service_client::RaftServiceClient;
use rewind_shared::tls::TlsFiles;
use rewind_tests::proxy::CuttingProxy;
use rewind_tests::{ClusterHarness, ClusterOptions, ListenApart, free_port, must_grow_state_past};

const LARGE_SNAPSHOT_BYTES: u64 = 16 << 20;
const CATCH_UP: Duration = Duration::from_secs(180);
/// The member behind the proxy, the one kept down across compactions.
const BEHIND: u64 = 3;

/// A counter summed over the two members that may lead (leadership can move while a debug
/// build works through a large state on two cores).
async fn leaders_metric(cluster: &ClusterHarness, series: &str) -> f64 {
    let mut total = 0.0;
    for id in (1..=3).filter(|&id| id != BEHIND) {
        total += cluster.metric(id, series).await;
    }
    total
}

/// Snapshot sends of the members that may lead: (sent, failed).
async fn snapshot_sends(cluster: &ClusterHarness) -> (f64, f64) {
    (
        leaders_metric(
            cluster,
            r#"rewind_raft_snapshot_sends_total{outcome="sent"}"#,
        )
        .await,
        leaders_metric(
            cluster,
            r#"rewind_raft_snapshot_sends_total{outcome="failed"}"#,
        )
        .await,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_down_across_a_compaction_of_a_large_state_catches_up_by_a_streamed_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let proxy = CuttingProxy::must_start(&listen).await;
    let options = ClusterOptions {
        snapshot_every: 200,
        listen_apart: Some(ListenApart {
            member: BEHIND,
            listen,
            advertised: proxy.address.clone(),
        }),
        ..ClusterOptions::default()
    };
    let mut cluster = ClusterHarness::must_start_with_options(dir.path(), 3, options);
    cluster.must_leader().await;
    // Down across compactions of a state whose snapshot passes 16 MiB.
    cluster.kill(BEHIND);
    let writes = must_grow_state_past(&cluster, LARGE_SNAPSHOT_BYTES).await;
    // Whichever of the other two leads (it may have moved while the state grew).
    let (leader, _) = cluster.must_leader().await;
    let (snapshot_index, snapshot_bytes) = cluster.latest_snapshot(leader).unwrap();
    eprintln!(
        "{writes} writes: the leader's snapshot at {snapshot_index} is {snapshot_bytes} bytes"
    );
    cluster.must_start_member(BEHIND);
    let caught_up = cluster.must_catch_up(BEHIND, leader, CATCH_UP).await;
    assert!(caught_up >= snapshot_index);
    // The snapshot brought the audit entries too (cluster version 7: they are not in the
    // state): the member's own store holds the whole chain the leader has.
    let behind = cluster.member_status(BEHIND, false).await.unwrap();
    let ahead = cluster.member_status(leader, false).await.unwrap();
    assert!(
        behind.audit_ok && behind.audit_entries > 0 && behind.audit_entries == ahead.audit_entries,
        "member {BEHIND}: {behind:?}, the leader: {ahead:?}"
    );
    let (sent, _) = snapshot_sends(&cluster).await;
    let sent_bytes = leaders_metric(&cluster, "rewind_raft_snapshot_sent_bytes_total").await;
    assert!(sent >= 1.0, "the leader counts the snapshot it sent");
    assert!(
        sent_bytes > LARGE_SNAPSHOT_BYTES as f64,
        "{sent_bytes} bytes sent: the whole large snapshot"
    );
    let received = cluster
        .metric(
            BEHIND,
            r#"rewind_raft_snapshot_receives_total{outcome="received"}"#,
        )
        .await;
    assert!(
        received >= 1.0,
        "member {BEHIND} counts the snapshot it received"
    );

    // Down again across a compaction; on its return the snapshot stream is cut after 4 MiB.
    cluster.kill(BEHIND);
    let (before, _) = cluster.latest_snapshot(leader).unwrap();
    must_grow_state_past(&cluster, snapshot_bytes + (1 << 20)).await;
    let (leader, _) = cluster.must_leader().await;
    let (after, _) = cluster.latest_snapshot(leader).unwrap();
    assert!(
        after > before.max(caught_up),
        "the leader compacted past member {BEHIND}'s log"
    );
    let (sent_before, failed_before) = snapshot_sends(&cluster).await;
    let logs_before: Vec<usize> = leaders_logs(&cluster).iter().map(String::len).collect();
    proxy.cut_next_connection_after(4 << 20);
    cluster.must_start_member(BEHIND);
    cluster.must_catch_up(BEHIND, leader, CATCH_UP).await;
    assert_eq!(
        proxy.cuts(),
        1,
        "the proxy cut one snapshot stream part-way"
    );
    let (sent_again, failed) = snapshot_sends(&cluster).await;
    assert!(
        failed > failed_before,
        "the cut send is counted as failed ({failed})"
    );
    assert!(
        sent_again > sent_before,
        "and the snapshot was sent again, whole ({sent_again})"
    );
    let cut_short = cluster
        .metric(
            BEHIND,
            r#"rewind_raft_snapshot_receives_total{outcome="failed"}"#,
        )
        .await;
    assert!(
        cut_short >= 1.0,
        "the cut stream was the snapshot's: member {BEHIND} saw it end short"
    );
    let logs = leaders_logs(&cluster);
    assert!(
        logs.iter()
            .zip(&logs_before)
            .flat_map(|(log, &before)| log.get(before..).unwrap_or(log).lines())
            .any(|line| line.contains("WARN")
                && line.contains("Could not send a snapshot")
                && line.contains(&format!("peer={BEHIND}"))),
        "the failed send is logged at WARN with the peer"
    );
    let behind_log =
        std::fs::read_to_string(dir.path().join(format!("member-{BEHIND}.log"))).unwrap();
    assert!(
        behind_log
            .matches("Installed a snapshot from the leader")
            .count()
            >= 2
    );
    let incoming = dir
        .path()
        .join(format!("member-{BEHIND}/raft/incoming-snapshots"));
    assert_eq!(
        std::fs::read_dir(&incoming).unwrap().count(),
        0,
        "the cut stream left no file behind"
    );

    // Down again; on its return it crashes (abort, as kill -9) between the installed
    // snapshot's record and the log's removal, which live in two stores (sled, raft-engine).
    // Started again, it repairs the log against the record at open and catches up.
    let behind_at = cluster
        .member_status(BEHIND, true)
        .await
        .unwrap()
        .applied_index;
    cluster.kill(BEHIND);
    let (leader, _) = cluster.must_leader().await;
    let (_, before_bytes) = cluster.latest_snapshot(leader).unwrap();
    must_grow_state_past(&cluster, before_bytes + (1 << 20)).await;
    let (leader, _) = cluster.must_leader().await;
    let (after, _) = cluster.latest_snapshot(leader).unwrap();
    assert!(
        after > behind_at,
        "the leader compacted past member {BEHIND}'s log (at {behind_at}), so it is sent a \
         snapshot and reaches the crash point"
    );
    cluster.must_start_member_with_failpoints(BEHIND, "coordinator.snapshot-recorded");
    let crashed = rewind_tests::must_wait_async(CATCH_UP, "the crash point", || {
        let exited = cluster.exited(BEHIND);
        async move { exited }
    })
    .await;
    assert!(
        !crashed.success(),
        "member {BEHIND} aborted at the crash point"
    );
    cluster.must_start_member(BEHIND);
    cluster.must_catch_up(BEHIND, leader, CATCH_UP).await;
    let behind_log =
        std::fs::read_to_string(dir.path().join(format!("member-{BEHIND}.log"))).unwrap();
    assert!(
        behind_log.contains("failpoint coordinator.snapshot-recorded"),
        "it crashed where asked"
    );
    assert!(
        behind_log.contains("Repaired the Raft log against the snapshot after a crash"),
        "and repaired its log at open"
    );
    let behind = cluster.member_status(BEHIND, false).await.unwrap();
    assert!(behind.audit_ok, "member {BEHIND}: {behind:?}");
}

/// The logs of the members that may lead (each only grows).
fn leaders_logs(cluster: &ClusterHarness) -> Vec<String> {
    (1..=3)
        .filter(|&id| id != BEHIND)
        .map(|id| std::fs::read_to_string(cluster.dir.join(format!("member-{id}.log"))).unwrap())
        .collect()
}

/// A stream of snapshot chunks: `header` first (if any), then `data` in pieces.
fn chunks(
    header: Option<pb::SnapshotHeader>,
    data: &[&[u8]],
) -> impl tokio_stream::Stream<Item = pb::SnapshotChunk> + use<> {
    let mut chunks: Vec<pb::SnapshotChunk> = header
        .map(|header| pb::SnapshotChunk {
            header: Some(header),
            data: Vec::new(),
        })
        .into_iter()
        .collect();
    chunks.extend(data.iter().map(|piece| pb::SnapshotChunk {
        header: None,
        data: piece.to_vec(),
    }));
    tokio_stream::iter(chunks)
}

/// A raft-rs message of this type from member 1, encoded, with no snapshot data.
fn raft_message(kind: MessageType) -> Vec<u8> {
    let mut message = Message::default();
    message.set_msg_type(kind);
    message.from = 1;
    message.to = 1;
    message.mut_snapshot().mut_metadata().index = 5;
    message.write_to_bytes().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_snapshot_streams_are_refused_with_the_reason_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterHarness::must_start(dir.path(), 1);
    cluster.must_leader().await;
    let client_as = |identity: &str| {
        let files = TlsFiles::in_dir(&cluster.tls_dir, identity);
        let address = cluster.addresses[0].clone();
        async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("https://{address}"))
                .unwrap()
                .tls_config(files.client_config("localhost").unwrap())
                .unwrap()
                .connect()
                .await
                .unwrap();
            RaftServiceClient::new(channel)
        }
    };
    let data = b"not a state".as_slice();
    let header = |cluster_id: &str| pb::SnapshotHeader {
        cluster_id: cluster_id.into(),
        from_member: 1,
        message: raft_message(MessageType::MsgSnapshot),
        data_bytes: data.len() as u64,
        data_sha256: rewind_shared::digest::sha256_hex(data),
    };
    let refused = |answer: Result<tonic::Response<pb::RaftAck>, tonic::Status>| {
        let status = answer.expect_err("a hostile stream was accepted");
        (status.code(), status.message().to_string())
    };

    let mut operator = client_as(rewind_shared::dev_ca::OPERATOR).await;
    let (code, _) = refused(
        operator
            .send_snapshot(chunks(Some(header("test-cluster")), &[data]))
            .await,
    );
    assert_eq!(
        code,
        tonic::Code::PermissionDenied,
        "only a member sends snapshots"
    );

    let mut member = client_as("coordinator-1").await;
    // What is wrong, the stream, and the code and words it is refused with.
    type Case<'a> = (
        &'a str,
        pb::SnapshotHeader,
        Vec<&'a [u8]>,
        tonic::Code,
        &'a str,
    );
    let mut cases: Vec<Case> = vec![
        (
            "another cluster",
            header("other-cluster"),
            vec![data],
            tonic::Code::FailedPrecondition,
            "cluster_id",
        ),
        (
            "not a snapshot",
            pb::SnapshotHeader {
                message: raft_message(MessageType::MsgHeartbeat),
                ..header("test-cluster")
            },
            vec![data],
            tonic::Code::InvalidArgument,
            "header.message",
        ),
        (
            "too large",
            pb::SnapshotHeader {
                data_bytes: rewind_proto::MAX_SNAPSHOT_BYTES + 1,
                ..header("test-cluster")
            },
            vec![],
            tonic::Code::InvalidArgument,
            "header.data_bytes",
        ),
        (
            "no checksum",
            pb::SnapshotHeader {
                data_sha256: "abc".into(),
                ..header("test-cluster")
            },
            vec![data],
            tonic::Code::InvalidArgument,
            "header.data_sha256",
        ),
        (
            "more data than declared",
            header("test-cluster"),
            vec![data, b"more"],
            tonic::Code::InvalidArgument,
            "more than",
        ),
        (
            "less data than declared",
            header("test-cluster"),
            vec![&data[..4]],
            tonic::Code::Aborted,
            "of the 11 bytes",
        ),
        (
            "checksum mismatch",
            pb::SnapshotHeader {
                data_sha256: rewind_shared::digest::sha256_hex(b"other"),
                ..header("test-cluster")
            },
            vec![data],
            tonic::Code::DataLoss,
            "sha256",
        ),
        (
            "not a state",
            header("test-cluster"),
            vec![data],
            tonic::Code::InvalidArgument,
            "does not decode",
        ),
    ];
    for (case, header, data, code, names) in cases.drain(..) {
        let (got, message) = refused(member.send_snapshot(chunks(Some(header), &data)).await);
        assert_eq!(got, code, "{case}: {message}");
        assert!(message.contains(names), "{case}: {message} names {names}");
    }
    let (code, message) = refused(member.send_snapshot(chunks(None, &[data])).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(message.contains("header"), "{message}");
    let batch = pb::RaftBatch {
        cluster_id: "test-cluster".into(),
        from_member: 1,
        messages: vec![raft_message(MessageType::MsgSnapshot)],
    };
    // An earlier version's leader sends its snapshot inside a batch: taken only if it decodes.
    let (code, message) = refused(member.deliver(batch).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(message.contains("does not decode"), "{message}");

    let incoming = dir.path().join("member-1/raft/incoming-snapshots");
    assert_eq!(
        std::fs::read_dir(&incoming).unwrap().count(),
        0,
        "refused streams leave no file in {}",
        incoming.display()
    );
    cluster.must_leader().await;
}
