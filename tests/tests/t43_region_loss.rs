//! A five-member cluster across three regions (2 + 2 + 1), with agents in each region, loses a
//! whole region (both its members and its agents) in the middle of a rollback: the rollback of
//! the other regions completes, nothing acknowledged before is lost, and the lost region's
//! hosts are reverted once they return. Members and agents run in network namespaces; the
//! region is lost by taking its switch ports down.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::{
    ClusterHarness, ClusterOptions, TestHost, must_agents_connected, must_deploy_v1_then_v2,
    must_rollback_end, must_rollback_where, must_start_rollback_of_v2, must_wait_async,
};

/// Regions, their members and their hosts; each region's agents share one spare namespace.
const REGIONS: [(&str, &[u64], &[&str]); 3] = [
    ("r1", &[1, 2], &["a-1", "a-2"]),
    ("r2", &[3, 4], &["b-1", "b-2"]),
    ("r3", &[5], &["c-1"]),
];

#[tokio::test(flavor = "multi_thread")]
async fn losing_a_region_mid_rollback_finishes_the_others_and_reverts_it_on_return() {
    let dir = tempfile::tempdir().unwrap();
    let options = ClusterOptions {
        member_regions: ["r1", "r1", "r2", "r2", "r3"].map(String::from).to_vec(),
        spare_namespaces: REGIONS.len() as u64,
        ..ClusterOptions::default()
    };
    let mut cluster = ClusterHarness::must_start_partitionable_with(dir.path(), 5, options);
    let (_, mut client) = cluster.must_leader().await;
    let mut hosts: Vec<TestHost> = Vec::new();
    for (index, (region, _, ids)) in REGIONS.iter().enumerate() {
        for id in *ids {
            let mut host = TestHost::must_prepare_services(
                dir.path(),
                id,
                &cluster.ca,
                &cluster.tls_dir,
                &cluster.addresses,
                region,
                &["web"],
            );
            host.must_start_agent_in(&cluster.spare_namespace(index as u64 + 1));
            hosts.push(host);
        }
    }
    must_agents_connected(&client, hosts.len()).await;
    must_deploy_v1_then_v2(&mut client, &hosts).await;

    let rollback_id = must_start_rollback_of_v2(&mut client).await;
    let begun = client
        .get_rollback(pb::GetRollbackRequest {
            rollback_id: rollback_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap();
    // The two-member region whose wave comes last (one host at a time: not begun yet) is
    // lost before its turn.
    let last_wave_of = |region: &str| {
        begun
            .waves
            .iter()
            .rposition(|wave| wave.region == region)
            .unwrap()
    };
    let (lost_index, (lost_region, lost_members, lost_hosts)) = REGIONS
        .iter()
        .enumerate()
        .filter(|(_, (_, members, _))| members.len() == 2)
        .max_by_key(|(_, (region, _, _))| last_wave_of(region))
        .unwrap();
    assert_ne!(last_wave_of(lost_region), 0, "{begun:?}");
    let acknowledged = audit(&mut client).await;

    let lost_at = std::time::Instant::now();
    for member in *lost_members {
        cluster.cut(*member);
    }
    cluster.cut_spare(lost_index as u64 + 1);

    // The other regions finish; the lost one's hosts wait, deferred.
    let (_, client) = cluster.must_leader().await;
    let waiting = must_rollback_where(
        &client,
        &rollback_id,
        "the other regions reverted and the lost one deferred",
        |rollback| {
            rollback.current_wave as usize == rollback.waves.len()
                && lost_hosts
                    .iter()
                    .all(|host| rollback.deferred_hosts.contains(&host.to_string()))
        },
    )
    .await;
    // What the README's failure table shows, measured on this run.
    eprintln!(
        "region {lost_region} lost: the other regions reverted and it was deferred {:.1} s later",
        lost_at.elapsed().as_secs_f64()
    );
    assert_eq!(
        waiting.state,
        pb::RollbackState::Running as i32,
        "it waits for the lost hosts: {waiting:?}"
    );
    for host in &hosts {
        if lost_hosts.contains(&host.id.as_str()) {
            assert_eq!(host.current_link(), "releases/v2", "{} untouched", host.id);
        } else {
            host.must_be_restored_to_v1();
        }
    }
    for wave in waiting
        .waves
        .iter()
        .filter(|wave| &wave.region == lost_region)
    {
        assert!(
            wave.gate_detail.contains("lost"),
            "a lost region's gate is skipped, saying why: {wave:?}"
        );
    }
    let (leader, _) = cluster.must_leader().await;
    let shown = cluster.rewindctl(leader, &["rollback", "show", &rollback_id]);
    let shown = String::from_utf8_lossy(&shown.stdout).to_string();
    assert!(shown.contains("deferred (their region was lost"), "{shown}");

    // Nothing acknowledged before the loss is gone.
    let (_, mut client) = cluster.must_leader().await;
    let after = audit(&mut client).await;
    let missing: Vec<&(u64, String, String)> = acknowledged
        .iter()
        .filter(|entry| !after.contains(entry))
        .collect();
    assert!(
        missing.is_empty(),
        "every audit entry acknowledged before the loss is still there, unchanged; \
         missing: {missing:?}"
    );

    // The region returns: its hosts are reverted and the rollback ends.
    for member in *lost_members {
        cluster.heal(*member);
    }
    cluster.heal_spare(lost_index as u64 + 1);
    let returned_at = std::time::Instant::now();
    let (_, client) = cluster.must_leader().await;
    let ended = must_rollback_end(&client, &rollback_id).await;
    eprintln!(
        "region {lost_region} returned: its hosts reverted and the rollback ended {:.1} s later",
        returned_at.elapsed().as_secs_f64()
    );
    assert_eq!(
        ended.state,
        pb::RollbackState::Succeeded as i32,
        "{ended:?}"
    );
    assert!(
        ended
            .outcome_detail
            .contains("reverted after their region returned"),
        "{}",
        ended.outcome_detail
    );
    for host in &hosts {
        host.must_be_restored_to_v1();
        assert_eq!(
            host.restarts(),
            3,
            "{}: two activations and one rollback restart, none twice",
            host.id
        );
    }
    let (_, mut client) = cluster.must_leader().await;
    let verified = client
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    let deferral = audit(&mut client)
        .await
        .into_iter()
        .find(|(_, action, _)| action == "rollback.defer-region")
        .expect("the deferral is audited");
    assert!(deferral.2.contains(lost_region), "{deferral:?}");
}

/// (index, action, then target, outcome and hash) of every audit entry.
async fn audit(
    client: &mut rewind_proto::v1::control_service_client::ControlServiceClient<
        tonic::transport::Channel,
    >,
) -> Vec<(u64, String, String)> {
    let entries = must_wait_async(Duration::from_secs(30), "the audit log", || {
        let mut client = client.clone();
        async move {
            client
                .list_audit(pb::ListAuditRequest {
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .ok()
                .map(|response| response.into_inner().entries)
        }
    })
    .await;
    entries
        .into_iter()
        .map(|entry| {
            (
                entry.index,
                entry.action,
                format!("{} {} {}", entry.target, entry.outcome, entry.hash),
            )
        })
        .collect()
}
