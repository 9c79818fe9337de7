//! A five-member cluster keeps serving when two members are lost, the leader among them:
//! every write acknowledged before is still there, writes go on under a new leader, and the
//! lost members come back to the same state. A third loss takes the quorum: writes are refused,
//! never acknowledged without a majority.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::{ClusterHarness, must_wait_async, plain_service};

const LONG: Duration = Duration::from_secs(90);

fn release(number: u32) -> pb::RegisterReleaseRequest {
    pb::RegisterReleaseRequest {
        request_id: format!("release-{number}"),
        release: Some(pb::Release {
            service: "web".into(),
            version: format!("v{number}"),
            artifact_digest: format!(
                "sha256:{}",
                rewind_shared::digest::sha256_hex(&number.to_be_bytes())
            ),
            commit: "c0ffee".into(),
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn five_members_lose_two_including_the_leader_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ClusterHarness::must_start(dir.path(), 5);
    let (leader, mut client) = cluster.must_leader().await;
    let service = plain_service("web");
    client
        .put_service(pb::PutServiceRequest {
            request_id: "web".into(),
            service: Some(service),
        })
        .await
        .unwrap();
    for number in 1..=20 {
        client.register_release(release(number)).await.unwrap();
    }

    // Two members lost at once, the leader one of them.
    let other = (1..=5).find(|&id| id != leader).unwrap();
    cluster.kill(leader);
    cluster.kill(other);
    let (new_leader, _) = cluster.must_leader().await;
    assert!(new_leader != leader && new_leader != other);
    for number in 21..=40 {
        let request = release(number);
        must_wait_async(LONG, "a write under the new leader", || {
            let request = request.clone();
            let cluster = &cluster;
            async move {
                // Leadership may move among the three left: write through whoever leads.
                let (_, mut client) = cluster.must_leader().await;
                client.register_release(request).await.ok()
            }
        })
        .await;
    }
    let (_, mut client) = cluster.must_leader().await;
    let listed = client
        .list_releases(pb::ListReleasesRequest {
            service: "web".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .releases;
    assert_eq!(listed.len(), 40, "every acknowledged write is there");

    // A third loss takes the majority: a write is refused, not acknowledged.
    let third = (1..=5)
        .find(|&id| ![leader, other, new_leader].contains(&id))
        .unwrap();
    cluster.kill(third);
    let refused = tokio::time::timeout(
        Duration::from_secs(20),
        client.register_release(release(41)),
    )
    .await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "a write was acknowledged by two of five members"
    );

    // All back: every member reaches the leader's index and state.
    for id in [leader, other, third] {
        cluster.must_start_member(id);
    }
    let (leader, _) = cluster.must_leader().await;
    for id in (1..=5).filter(|&id| id != leader) {
        cluster.must_catch_up(id, leader, LONG).await;
    }
}
