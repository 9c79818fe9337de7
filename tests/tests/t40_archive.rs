//! Finished changes and rollbacks move to the archive once their audit entries are pruned
//! (cluster version 8), on a real coordinator with real agents, read through the real
//! `rewindctl`: listed with `--archived` and no longer without, shown by id, their incident
//! read but not noted, the service's latest change kept, and all of it still there after a
//! restart (the archive is on disk, not in the state). A member that was down while records
//! moved gets the archive with the snapshot that catches it up.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_proto::v1::control_service_client::ControlServiceClient;
use rewind_tests::{
    ClusterHarness, ClusterOptions, Coordinator, must_agents_connected, must_deploy_v1_then_v2,
    must_deploy_web, must_rollback_end, must_start_hosts, must_start_rollback_of_v2,
    must_verify_audit,
};
use tonic::transport::Channel;

use rewind_tests::output_text as text;

fn must_ctl(coordinator: &Coordinator, args: &[&str]) -> String {
    must_succeed(args, coordinator.rewindctl(args))
}

fn must_succeed(args: &[&str], output: std::process::Output) -> String {
    assert!(output.status.success(), "{args:?}: {}", text(&output));
    text(&output)
}

/// Exports the whole audit log through `ctl` (rewindctl against one coordinator), confirms it
/// archived, and waits until the cluster pruned it.
async fn must_archive_and_prune(
    ctl: impl Fn(&[&str]) -> std::process::Output,
    client: &ControlServiceClient<Channel>,
    dir: &std::path::Path,
) {
    let before = must_verify_audit(client).await.first_index;
    let export = dir.join(format!("export-{before}.jsonl"));
    let args = ["audit", "export", "--out", export.to_str().unwrap()];
    must_succeed(&args, ctl(&args));
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{}.manifest.json", export.display())).unwrap(),
    )
    .unwrap();
    let through = manifest["last_index"].to_string();
    let args = [
        "audit",
        "archived",
        "--through",
        &through,
        "--manifest-hash",
        manifest["manifest_hash"].as_str().unwrap(),
        "--reason",
        "s3://audit/2026",
    ];
    must_succeed(&args, ctl(&args));
    for _ in 0..120 {
        if must_verify_audit(client).await.first_index > before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("the audit was never pruned past {before}");
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_changes_and_rollbacks_move_to_the_archive_and_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = Coordinator::must_start_with(
        &dir.path().join("coordinator"),
        "[audit]\nretain-entries = 3\n",
    );
    let (hosts, mut client) = must_start_hosts(dir.path(), &coordinator, &["web-1", "web-2"]).await;
    must_deploy_v1_then_v2(&mut client, &hosts).await;
    let rollback_id = must_start_rollback_of_v2(&mut client).await;
    assert_eq!(rollback_id, "rb-1");
    must_rollback_end(&client, &rollback_id).await;
    // v2 again, fixed: the service's latest change from now on.
    let latest = must_deploy_web(&client, "v2", &[]).await;
    assert_eq!(latest, "ch-3");

    must_archive_and_prune(|args| coordinator.rewindctl(args), &client, dir.path()).await;

    // Not in the state any more: the default listings hold only the latest change.
    let listed = must_ctl(&coordinator, &["change", "list"]);
    assert!(listed.contains("ch-3"), "{listed}");
    assert!(
        !listed.contains("ch-1") && !listed.contains("ch-2"),
        "{listed}"
    );
    let listed = must_ctl(&coordinator, &["rollback", "list"]);
    assert!(!listed.contains("rb-1"), "{listed}");
    for restarted in [false, true] {
        if restarted {
            // The archive is on disk: a restart (replaying its log) finds it whole.
            coordinator.must_restart();
        }
        let archived = must_ctl(&coordinator, &["change", "list", "--archived"]);
        assert!(archived.contains("ARCHIVED"), "{archived}");
        let rows: Vec<&str> = archived
            .lines()
            .filter(|line| line.contains("ch-"))
            .collect();
        assert_eq!(rows.len(), 2, "{archived}");
        assert!(
            rows[0].contains("ch-2") && rows[1].contains("ch-1"),
            "{archived}"
        );
        // Paged: one at a time, the next page's command given.
        let paged = must_ctl(
            &coordinator,
            &["change", "list", "--archived", "--page-size", "1"],
        );
        assert!(
            paged.contains("ch-2") && paged.contains("--archived --page-size 1 --page-token ch-2"),
            "{paged}"
        );
        let archived = must_ctl(&coordinator, &["rollback", "list", "--archived"]);
        assert!(archived.contains("rb-1"), "{archived}");
        let shown = must_ctl(&coordinator, &["rollback", "show", "rb-1"]);
        assert!(shown.contains("archived at"), "{shown}");
        let shown = must_ctl(&coordinator, &["change", "show", "ch-1"]);
        assert!(shown.contains("archived at"), "{shown}");
        let shown = must_ctl(&coordinator, &["change", "show", "ch-3"]);
        assert!(!shown.contains("archived at"), "{shown}");
        // Its incident is still listed and shown, read only.
        let incidents = must_ctl(&coordinator, &["incident", "list"]);
        assert!(incidents.contains("in-1"), "{incidents}");
        let incident = must_ctl(&coordinator, &["incident", "show", "in-1"]);
        assert!(incident.contains("- Archived: "), "{incident}");
        assert!(incident.contains("- Services: web"), "{incident}");
        let noted = coordinator.rewindctl(&["incident", "note", "in-1", "late thought"]);
        let said = text(&noted);
        assert!(
            !noted.status.success() && said.contains("in-1 is archived"),
            "{said}"
        );
    }
    // Archived records are read only: acting on one is refused, naming it.
    for args in [
        &["rollback", "abort", "rb-1", "--reason", "late"][..],
        &["rollback", "start", "--change", "ch-1", "--reason", "again"][..],
    ] {
        let refused = coordinator.rewindctl(args);
        let said = text(&refused);
        assert!(
            !refused.status.success() && said.contains(" is archived: "),
            "{args:?}: {said}"
        );
    }
    // An id that never existed is still not found.
    let missing = coordinator.rewindctl(&["rollback", "show", "rb-9"]);
    assert!(!missing.status.success(), "{}", text(&missing));
    // The pruning said what moved.
    let audit = must_ctl(&coordinator, &["audit", "list", "--page-size", "1000"]);
    assert!(
        audit.contains("2 changes and 1 rollbacks that ended by then moved to the archive"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_behind_a_compaction_gets_the_archive_with_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let options = ClusterOptions {
        extra_config: "[audit]\nretain-entries = 3\n".into(),
        ..ClusterOptions::default()
    };
    let mut cluster = ClusterHarness::must_start_with_options(dir.path(), 3, options);
    let (leader, mut client) = cluster.must_leader().await;
    let behind = (1..=3).find(|&id| id != leader).unwrap();
    let mut hosts = cluster.must_prepare_hosts(dir.path(), &["web-1"]);
    hosts[0].must_start_agent();
    must_agents_connected(&client, 1).await;
    // ch-1 ends superseded by ch-2: it may move once pruned.
    must_deploy_v1_then_v2(&mut client, &hosts).await;
    cluster.kill(behind);
    let (leader, client) = cluster.must_leader().await;
    must_archive_and_prune(|args| cluster.rewindctl(leader, args), &client, dir.path()).await;
    let archived = must_succeed(
        &[],
        cluster.rewindctl(leader, &["change", "list", "--archived"]),
    );
    assert!(archived.contains("ch-1"), "{archived}");
    // The leader compacts its log past where the member stopped.
    let (compacted_before, _) = cluster.latest_snapshot(leader).unwrap_or_default();
    let mut writer = client.clone();
    for number in 0..120 {
        writer
            .put_service(pb::PutServiceRequest {
                request_id: format!("filler-{number}"),
                service: Some(rewind_tests::plain_service(&format!("filler-{number}"))),
            })
            .await
            .unwrap();
    }
    let (compacted, _) = cluster.latest_snapshot(leader).unwrap();
    assert!(compacted > compacted_before, "the leader compacted its log");

    cluster.must_start_member(behind);
    cluster
        .must_catch_up(behind, leader, Duration::from_secs(120))
        .await;
    // Caught up with the same state and the same archive as stored: both digests agree.
    let (ahead, caught) = (
        cluster.member_status(leader, false).await.unwrap(),
        cluster.member_status(behind, false).await.unwrap(),
    );
    assert!(
        !caught.archive_digest.is_empty() && caught.archive_digest == ahead.archive_digest,
        "member {behind}: {caught:?}, the leader: {ahead:?}"
    );
    let log = std::fs::read_to_string(dir.path().join(format!("member-{behind}.log"))).unwrap();
    assert!(
        log.contains("Installed a snapshot from the leader"),
        "{log}"
    );
    // Read from its own store: the archive came with the snapshot.
    let archived = must_succeed(
        &[],
        cluster.rewindctl(behind, &["change", "list", "--archived"]),
    );
    assert!(archived.contains("ch-1"), "member {behind}: {archived}");
    let shown = must_succeed(&[], cluster.rewindctl(behind, &["change", "show", "ch-1"]));
    assert!(shown.contains("archived at"), "member {behind}: {shown}");
}
