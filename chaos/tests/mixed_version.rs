//! A rolling upgrade with members of two releases sharing one log: a 3-member cluster of the
//! previous release (built from its commit by `chaos/build-previous-release`, or taken from
//! `REWIND_PREVIOUS_RELEASE_BIN`) is upgraded one member at a time, leader last, while a
//! rollback runs; the cluster version stays 1 until every member runs this release, is raised,
//! a rollback the leader plans runs, and every member ends at one applied index with one state
//! digest.
//!
//! A long mode, not in CI's default run (the previous release's build takes about 10 minutes):
//! `cargo test -p rewind-chaos --test mixed_version -- --ignored`.

use std::path::PathBuf;
use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::{
    ClusterHarness, ClusterOptions, must_agents_connected, must_binary, must_change_where,
    must_deploy_v1_then_v2, must_have_rolled_back_v2_once, must_rollback_end,
    must_start_rollback_of_v2, must_wait_async, run_ok,
};

const LONG: Duration = Duration::from_secs(120);

/// The cluster version this release's binaries apply (`state_machine::version::CURRENT`).
const CURRENT: u32 = 13;

/// The directory holding the previous release's binaries.
fn previous_release() -> PathBuf {
    if let Some(dir) = std::env::var_os("REWIND_PREVIOUS_RELEASE_BIN") {
        return PathBuf::from(dir);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("build-previous-release");
    let output = std::process::Command::new(&script)
        .output()
        .unwrap_or_else(|error| panic!("run {}: {error}", script.display()));
    assert!(
        output.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "long mode: builds the previous release; run with --ignored"]
async fn a_cluster_upgraded_member_by_member_during_a_rollback_ends_with_one_state() {
    rewind_shared::tls::install_crypto_provider();
    let previous = previous_release();
    let old_coordinator = previous.join("rewind-coordinator");
    assert!(
        old_coordinator.exists(),
        "{} is missing",
        old_coordinator.display()
    );
    let new_coordinator = must_binary("rewind-coordinator");
    let dir = tempfile::tempdir().unwrap();
    let options = ClusterOptions {
        coordinator_binary: Some(old_coordinator),
        ..ClusterOptions::default()
    };
    let mut cluster = ClusterHarness::must_start_with_options(dir.path(), 3, options);
    let (_, mut client) = cluster.must_leader().await;

    // The previous release's agents too: agents are upgraded on their own schedule.
    let mut hosts = cluster.must_prepare_hosts(dir.path(), &["web-1", "web-2"]);
    for host in &mut hosts {
        host.must_start_agent_from(&previous.join("rewind-agent"));
    }
    must_agents_connected(&client, 2).await;
    must_deploy_v1_then_v2(&mut client, &hosts).await;
    let rollback_id = must_start_rollback_of_v2(&mut client).await;

    // Followers first: each is stopped and started from this release on its own data.
    let (old_leader, _) = cluster.must_leader().await;
    let followers: Vec<u64> = (1..=3).filter(|&id| id != old_leader).collect();
    for &id in &followers {
        cluster.kill(id);
        cluster.must_start_member_from(id, &new_coordinator);
        cluster
            .catch_up(id, old_leader, LONG, false)
            .await
            .unwrap_or_else(|error| panic!("upgraded member {id} did not catch up: {error}"));
        // The previous release kept the Raft log in sled: this one moved it at open.
        let log = std::fs::read_to_string(cluster.dir.join(format!("member-{id}.log"))).unwrap();
        assert!(
            log.contains("Moved the Raft log from sled to raft-engine"),
            "member {id} converted its log"
        );
        eprintln!("member {id} upgraded and caught up");
    }
    // Leadership to an upgraded member; it refuses to raise the version past the old one.
    let transfer = pb::TransferLeaderRequest {
        request_id: "upgrade".into(),
        member_id: followers[0],
        reason: "upgrade the leader's host".into(),
    };
    client.transfer_leader(transfer).await.unwrap();
    let (leader, mut client) = must_wait_async(LONG, "the hand-over", || async {
        let (leader, client) = cluster.must_leader().await;
        (leader == followers[0]).then_some((leader, client))
    })
    .await;
    let shown = run_ok(&cluster.rewindctl(leader, &["cluster", "version"]));
    assert!(shown.contains("cluster version 1"), "{shown}");
    let refused = cluster.rewindctl(
        leader,
        &["cluster", "upgrade-finalize", "--reason", "too soon"],
    );
    assert!(
        stderr_of(&refused).contains(&format!("member {old_leader} (",))
            && stderr_of(&refused).contains("before cluster versions"),
        "{}",
        stderr_of(&refused)
    );
    // What needs version 2 is refused meanwhile, naming it.
    let forget = cluster.rewindctl(
        leader,
        &["host", "forget", "web-9", "--reason", "mid-upgrade"],
    );
    assert!(
        stderr_of(&forget).contains("needs cluster version 2"),
        "{}",
        stderr_of(&forget)
    );
    // What the upgraded leader writes now, the previous release's member applies alike.
    client
        .put_service(pb::PutServiceRequest {
            request_id: "mid-upgrade".into(),
            service: Some(rewind_tests::plain_service("mid-upgrade")),
        })
        .await
        .unwrap();
    let index = cluster
        .catch_up(old_leader, leader, LONG, true)
        .await
        .unwrap_or_else(|error| {
            panic!("the previous release's member differs from the upgraded leader: {error}")
        });
    eprintln!("mixed versions: the previous release's member has the leader's state at {index}");
    // The upgraded leader reaches the previous release's member batch by batch (it answers
    // DeliverStream with UNIMPLEMENTED) and its upgraded peer on a stream.
    for outcome in ["unary", "stream"] {
        let series = format!("rewind_raft_message_batches_total{{outcome=\"{outcome}\"}}");
        let sent = cluster.metric(leader, &series).await;
        assert!(sent > 0.0, "the upgraded leader sent no {outcome} batch");
    }

    cluster.kill(old_leader);
    cluster.must_start_member_from(old_leader, &new_coordinator);
    cluster
        .catch_up(old_leader, leader, LONG, false)
        .await
        .unwrap_or_else(|error| panic!("the old leader did not catch up: {error}"));
    must_have_rolled_back_v2_once(&mut client, &rollback_id, &hosts).await;

    let raised = run_ok(&cluster.rewindctl(
        leader,
        &[
            "cluster",
            "upgrade-finalize",
            "--reason",
            "every member on this release",
        ],
    ));
    assert!(
        raised.contains(&format!("cluster version 1 -> {CURRENT}")),
        "{raised}"
    );
    // Entries written at the new version reach every member, a rollback the leader planned
    // (version 3) among them.
    client
        .put_service(pb::PutServiceRequest {
            request_id: "after-upgrade".into(),
            service: Some(rewind_tests::plain_service("after-upgrade")),
        })
        .await
        .unwrap();
    // Fresh request ids: the ones used before the upgrade are answered from the request log.
    let redeploy = pb::StartChangeRequest {
        request_id: "redeploy-v2".into(),
        service: "web".into(),
        version: "v2".into(),
        reason: "v2 again, after the upgrade".into(),
        ..Default::default()
    };
    let change_id = client
        .start_change(redeploy)
        .await
        .unwrap()
        .into_inner()
        .change
        .unwrap()
        .change_id;
    must_change_where(&client, &change_id, "the change to deploy", |change| {
        change.state == pb::ChangeState::Deployed as i32
    })
    .await;
    let start = pb::StartRollbackRequest {
        request_id: "rollback-after-upgrade".into(),
        change_id: change_id.clone(),
        reason: "bad release again".into(),
        ..Default::default()
    };
    let planned = client
        .start_rollback(start)
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap();
    let ended = must_rollback_end(&client, &planned.rollback_id).await;
    assert_eq!(
        ended.state,
        pb::RollbackState::Succeeded as i32,
        "{ended:?}"
    );
    let mut digests = Vec::new();
    for id in 1..=3 {
        if id == leader {
            continue;
        }
        let index = cluster
            .catch_up(id, leader, LONG, true)
            .await
            .unwrap_or_else(|error| panic!("member {id} differs from the leader: {error}"));
        let status = cluster.member_status(id, false).await.unwrap();
        assert_eq!(status.cluster_version, CURRENT);
        digests.push((id, index, status.state_digest));
    }
    eprintln!("after the upgrade, members at one index and digest: {digests:?}");

    // A member of the previous release can no longer be added: it would skip what it is sent.
    let joining = cluster.must_start_joining_from(&previous.join("rewind-coordinator"));
    let address = cluster.addresses[joining as usize - 1].clone();
    let refused = cluster.rewindctl(
        leader,
        &[
            "cluster",
            "add",
            &joining.to_string(),
            "--address",
            &address,
            "--reason",
            "grow",
        ],
    );
    assert!(
        stderr_of(&refused).contains(&format!(
            "applies cluster versions up to 1, and the cluster runs version {CURRENT}"
        )),
        "{}",
        stderr_of(&refused)
    );
}
