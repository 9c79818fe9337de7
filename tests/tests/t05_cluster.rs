//! A three-member cluster of real processes: a rollback survives kill -9 of the leader, and no
//! step runs twice on any host.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::{
    ClusterHarness, must_agents_connected, must_deploy_v1_then_v2, must_have_rolled_back_v2_once,
    must_start_rollback_of_v2, must_wait_async,
};

const LONG: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_survives_the_leader_being_killed_and_no_step_runs_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ClusterHarness::must_start(dir.path(), 3);
    let (_, mut client) = cluster.must_leader().await;

    // A follower refuses to serve and names the leader.
    let (leader, _) = cluster.must_leader().await;
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let mut follower_client = cluster
        .client_for(&cluster.addresses[follower as usize - 1])
        .await
        .unwrap();
    let refused = follower_client
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(
        refused
            .metadata()
            .get("rewind-leader")
            .and_then(|value| value.to_str().ok()),
        Some(cluster.addresses[leader as usize - 1].as_str())
    );

    let mut hosts = cluster.must_prepare_hosts(dir.path(), &["web-1", "web-2"]);
    for host in &mut hosts {
        host.must_start_agent();
    }
    must_agents_connected(&client, 2).await;
    must_deploy_v1_then_v2(&mut client, &hosts).await;
    let rollback_id = must_start_rollback_of_v2(&mut client).await;
    let (old_leader, _) = cluster.must_leader().await;
    cluster.kill(old_leader);

    let (new_leader, mut client) = cluster.must_leader().await;
    assert_ne!(new_leader, old_leader);
    must_have_rolled_back_v2_once(&mut client, &rollback_id, &hosts).await;

    let members = client
        .list_members(pb::ListMembersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(members.cluster_id, "test-cluster");
    let roles: Vec<(u64, String)> = members
        .members
        .iter()
        .map(|member| (member.id, member.role.clone()))
        .collect();
    assert_eq!(roles.len(), 3);
    assert!(
        roles.contains(&(new_leader, "leader".to_string())),
        "{roles:?}"
    );

    // The killed member comes back, catches up, and rejoins without disturbing the leader.
    cluster.must_start_member(old_leader);
    must_wait_async(LONG, "the returning member to catch up", || {
        let mut client = client.clone();
        async move {
            let members = client
                .list_members(pb::ListMembersRequest {})
                .await
                .ok()?
                .into_inner()
                .members;
            let returned = members.into_iter().find(|member| member.id == old_leader)?;
            (returned.role == "follower" && returned.lag == 0 && returned.recently_active)
                .then_some(())
        }
    })
    .await;
    let (leader_after, mut client) = cluster.must_leader().await;
    assert_eq!(
        leader_after, new_leader,
        "pre-vote keeps a rejoining member from deposing the leader"
    );
    // Members talk over long-lived streams, reopened when a peer comes back (the returning
    // member caught up over them); never batch by batch, which is for earlier releases.
    for id in [new_leader, old_leader] {
        let streamed = cluster
            .metric(id, "rewind_raft_message_batches_total{outcome=\"stream\"}")
            .await;
        let unary = cluster
            .metric(id, "rewind_raft_message_batches_total{outcome=\"unary\"}")
            .await;
        assert!(streamed > 0.0, "member {id} sent no batch on a stream");
        assert_eq!(unary, 0.0, "member {id} sent batches one call each");
    }

    // Leadership can be handed back on purpose, and the hand-over is audited.
    let transfer = pb::TransferLeaderRequest {
        request_id: "transfer".into(),
        member_id: old_leader,
        reason: "maintenance".into(),
    };
    client.transfer_leader(transfer).await.unwrap();
    let (handed_to, mut client) = must_wait_async(LONG, "the hand-over", || async {
        let (leader, client) = cluster.must_leader().await;
        (leader == old_leader).then_some((leader, client))
    })
    .await;
    assert_eq!(handed_to, old_leader);
    let audit = client
        .list_audit(pb::ListAuditRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        audit
            .iter()
            .any(|entry| entry.action == "cluster.transfer-leader"
                && entry.target == format!("member-{old_leader}"))
    );
    let bad = pb::TransferLeaderRequest {
        request_id: String::new(),
        member_id: 9,
        reason: String::new(),
    };
    assert_eq!(
        client.transfer_leader(bad).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    // SIGTERM stops a member cleanly and soon, its peers' streams and (on the leader) its
    // agents' sessions open: a follower, then the leader, which still has its quorum (so no
    // step-down closes the sessions for it).
    must_agents_connected(&client, 2).await;
    let follower = (1..=3).find(|&id| id != handed_to).unwrap();
    for id in [follower, handed_to] {
        let status = cluster
            .terminate(id, Duration::from_secs(20))
            .await
            .unwrap_or_else(|error| panic!("{error}"));
        assert!(status.success(), "member {id} stopped with {status}");
    }
}
