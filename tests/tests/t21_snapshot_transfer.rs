//! A member that was down while the leader compacted its log comes back and is sent the state
//! as a streamed snapshot, however large: three real members, a state whose snapshot is over
//! 16 MiB (four times what one gRPC message may carry), and a snapshot stream cut part-way by a
//! proxy, which the leader reports to raft-rs and sends again.

use std::time::Duration;

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
        total += metric(cluster, id, series).await;
    }
    total
}

/// A counter or gauge from member `id`'s `/metrics` (0 when the series is not there yet).
async fn metric(cluster: &ClusterHarness, id: u64, series: &str) -> f64 {
    let url = format!("http://{}/metrics", cluster.http_addresses[id as usize - 1]);
    let text = reqwest::get(&url)
        .await
        .and_then(reqwest::Response::error_for_status)
        .unwrap_or_else(|error| panic!("scrape {url}: {error}"))
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
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
    let sent = leaders_metric(
        &cluster,
        r#"rewind_raft_snapshot_sends_total{outcome="sent"}"#,
    )
    .await;
    let sent_bytes = leaders_metric(&cluster, "rewind_raft_snapshot_sent_bytes_total").await;
    assert!(sent >= 1.0, "the leader counts the snapshot it sent");
    assert!(
        sent_bytes > LARGE_SNAPSHOT_BYTES as f64,
        "{sent_bytes} bytes sent: the whole large snapshot"
    );
    let received = metric(
        &cluster,
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
    let failed_before = leaders_metric(
        &cluster,
        r#"rewind_raft_snapshot_sends_total{outcome="failed"}"#,
    )
    .await;
    let sent_before = leaders_metric(
        &cluster,
        r#"rewind_raft_snapshot_sends_total{outcome="sent"}"#,
    )
    .await;
    proxy.cut_next_connection_after(4 << 20);
    cluster.must_start_member(BEHIND);
    cluster.must_catch_up(BEHIND, leader, CATCH_UP).await;
    assert_eq!(
        proxy.cuts(),
        1,
        "the proxy cut one snapshot stream part-way"
    );
    let failed = leaders_metric(
        &cluster,
        r#"rewind_raft_snapshot_sends_total{outcome="failed"}"#,
    )
    .await;
    let sent_again = leaders_metric(
        &cluster,
        r#"rewind_raft_snapshot_sends_total{outcome="sent"}"#,
    )
    .await;
    assert!(
        failed > failed_before,
        "the cut send is counted as failed ({failed})"
    );
    assert!(
        sent_again > sent_before,
        "and the snapshot was sent again, whole ({sent_again})"
    );
    let leaders_logs: String = (1..=3)
        .filter(|&id| id != BEHIND)
        .map(|id| std::fs::read_to_string(dir.path().join(format!("member-{id}.log"))).unwrap())
        .collect();
    assert!(
        leaders_logs.lines().any(|line| line.contains("WARN")
            && line.contains("Could not send a snapshot")
            && line.contains(&format!("peer={BEHIND}"))),
        "the failed send is logged at WARN with the peer"
    );
    let behind_log =
        std::fs::read_to_string(dir.path().join(format!("member-{BEHIND}.log"))).unwrap();
    assert!(behind_log.contains("Installed a snapshot from the leader"));
}
