//! Membership changes on real processes: a fourth member joins through `rewindctl cluster add`
//! (learner, caught up, promoted), a founding member is removed, and the cluster then depends on
//! the new member's vote.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_proto::v1::member_service_client::MemberServiceClient;
use rewind_tests::{ClusterHarness, must_wait_async};

const LONG: Duration = Duration::from_secs(60);

fn put_service(name: &str) -> pb::PutServiceRequest {
    pb::PutServiceRequest {
        request_id: format!("put-{name}"),
        service: Some(pb::Service {
            rto_s: 0,
            freeze_windows: vec![],
            drift_policy: String::new(),
            isolate_after_failures: 0,
            name: name.into(),
            depends_on: vec![],
            policy: None,
            synthetics: vec![],
            rollback_steps: Vec::new(),
        }),
    }
}

fn must_succeed(output: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "rewindctl failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_joins_is_promoted_and_a_founder_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ClusterHarness::must_start(dir.path(), 3);
    let (leader, mut client) = cluster.must_leader().await;
    for index in 0..5 {
        client
            .put_service(put_service(&format!("svc-{index}")))
            .await
            .unwrap();
    }

    // Member 4 starts with cluster.join and waits; a follower is asked to add it, and rewindctl
    // follows the redirect to the leader.
    let joining = cluster.must_start_joining();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let address = cluster.addresses[joining as usize - 1].clone();
    let id = joining.to_string();
    let added = must_succeed(cluster.rewindctl(
        follower,
        &[
            "cluster",
            "add",
            &id,
            "--address",
            &address,
            "--region",
            "region-4",
            "--reason",
            "grow to four",
        ],
    ));
    assert!(added.contains("member 4 added as a voter"), "{added}");
    must_wait_async(LONG, "member 4 to follow with no lag", || {
        let mut client = client.clone();
        async move {
            let members = client
                .list_members(pb::ListMembersRequest {})
                .await
                .ok()?
                .into_inner()
                .members;
            let joined = members.into_iter().find(|member| member.id == joining)?;
            (joined.role == "follower"
                && joined.lag == 0
                && joined.region == "region-4"
                && joined.answered
                && joined.applied_index > 0)
                .then_some(())
        }
    })
    .await;

    // Bad requests are refused, naming what is wrong, and change nothing.
    let refusals = [
        (
            vec!["cluster", "add", "5", "--address", "no-port"],
            "address",
        ),
        (
            vec!["cluster", "add", "4", "--address", "127.0.0.1:1"],
            "already in the cluster",
        ),
        (vec!["cluster", "remove", "9"], "9 is not a member"),
        (
            vec![
                "cluster",
                "add",
                "5",
                "--address",
                "127.0.0.1:2",
                "--catch-up-timeout-s",
                "601",
            ],
            "catch_up_timeout_s: is 601",
        ),
        (
            vec![
                "cluster",
                "add",
                "5",
                "--address",
                "127.0.0.1:2",
                "--region",
                "EU West",
            ],
            "region",
        ),
    ];
    for (mut args, expected) in refusals {
        args.extend(["--reason", "test"]);
        let output = cluster.rewindctl(leader, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let leader_id = leader.to_string();
    let output = cluster.rewindctl(
        leader,
        &["cluster", "remove", &leader_id, "--reason", "test"],
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("transfer-leader"),
        "{output:?}"
    );

    // Remove a founding follower and stop it. Voters are now the leader, one founder and member
    // 4; with that founder killed too, writes still commit, so member 4 votes.
    let removed = follower;
    let remaining = (1..=3).find(|&id| id != leader && id != removed).unwrap();
    let removed_id = removed.to_string();
    must_succeed(cluster.rewindctl(
        leader,
        &["cluster", "remove", &removed_id, "--reason", "retire"],
    ));
    cluster.kill(removed);
    cluster.kill(remaining);
    let (leader_now, mut client) = cluster.must_leader().await;
    assert_eq!(leader_now, leader);
    client.put_service(put_service("after")).await.unwrap();

    let members = client
        .list_members(pb::ListMembersRequest {})
        .await
        .unwrap()
        .into_inner()
        .members;
    let ids: Vec<u64> = members.iter().map(|member| member.id).collect();
    let mut expected = vec![leader, remaining, joining];
    expected.sort();
    assert_eq!(ids, expected);
    // The killed member cannot say what it applied; the others can.
    for member in &members {
        assert_eq!(member.answered, member.id != remaining, "{member:?}");
    }

    // Member 4 holds exactly the leader's state, and the audit log names every change.
    must_wait_async(LONG, "member 4 to hold the leader's state", || async {
        let mut digests = Vec::new();
        for id in [leader, joining] {
            let channel = cluster
                .member_channel_for(&cluster.addresses[id as usize - 1])
                .await
                .ok()?;
            let status = MemberServiceClient::new(channel)
                .get_member_status(pb::GetMemberStatusRequest { brief: false })
                .await
                .ok()?
                .into_inner();
            digests.push((status.applied_index, status.state_digest, status.audit_ok));
        }
        (digests[0] == digests[1] && digests[0].2).then_some(())
    })
    .await;
    let audit = client
        .list_audit(pb::ListAuditRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let membership: Vec<(String, String)> = audit
        .into_iter()
        .filter(|entry| entry.action.starts_with("cluster."))
        .map(|entry| (entry.action, entry.target))
        .collect();
    assert_eq!(
        membership,
        [
            ("cluster.add-learner".to_string(), "member-4".to_string()),
            ("cluster.promote".to_string(), "member-4".to_string()),
            ("cluster.remove".to_string(), format!("member-{removed}")),
        ]
    );
}
