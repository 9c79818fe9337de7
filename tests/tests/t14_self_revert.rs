//! Offline self-revert end to end: an agent whose config allows it reverts a failing change on
//! its own once its coordinator has been gone long enough, keeps the record across the outage,
//! and reports it when the coordinator is back, which records it on the change and audits it.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_cut_off_from_its_coordinator_reverts_a_failing_change_and_reports_it_later() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let mut host = TestHost::must_prepare(dir.path(), "web-1", &coordinator);
    let policy = "[service.self-revert]\nfailing-for-s = 2\noffline-for-s = 3\n";
    let config = std::fs::read_to_string(&host.config_path).unwrap() + policy;
    std::fs::write(&host.config_path, config).unwrap();
    host.must_start_agent();
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, 1).await;
    // v2's probe fails, and automatic rollback is off: only the agent can revert it.
    must_deploy_v1_then_v2(&mut client, std::slice::from_ref(&host)).await;

    // Connected, the agent leaves it to the coordinator however long v2 fails.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        host.current_link(),
        "releases/v2",
        "no self-revert while connected"
    );

    coordinator.process.kill();
    must_wait(
        Duration::from_secs(60),
        "the agent to revert itself",
        || (host.current_link() == "releases/v1").then_some(()),
    );
    host.must_be_restored_to_v1();

    coordinator.must_restart();
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, 1).await;
    let change = must_wait_async(
        Duration::from_secs(60),
        "the self-revert to be recorded on ch-2",
        || {
            let mut client = client.clone();
            async move {
                let change = client
                    .get_change(pb::GetChangeRequest {
                        change_id: "ch-2".into(),
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .change?;
                (!change.hosts[0].self_reverted.is_empty()).then_some(change)
            }
        },
    )
    .await;
    let note = &change.hosts[0].self_reverted;
    assert!(
        note.contains("reverted")
            && note.contains("health-file")
            && note.contains("no coordinator for"),
        "{note}"
    );
    let audit = client
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    let entries: Vec<&pb::AuditEntry> = audit
        .entries
        .iter()
        .filter(|entry| entry.action == "host.self-revert")
        .collect();
    assert_eq!(entries.len(), 1, "{:?}", audit.entries);
    assert!(
        rewind_tests::readable_outcome(entries[0]).contains("web-1 reverted ch-2 of web"),
        "{:?}",
        entries[0]
    );
    // And what its health history recorded meanwhile: v2's failing probe, until the revert.
    let offline = must_wait(Duration::from_secs(30), "the offline summary", || {
        let fleet = coordinator.rewindctl(&["fleet", "list"]);
        let shown = String::from_utf8_lossy(&fleet.stdout).into_owned();
        shown.contains("web-1 was offline").then_some(shown)
    });
    assert!(offline.contains("web/health-file failed"), "{offline}");
    let audit = client
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        audit
            .entries
            .iter()
            .any(|entry| entry.action == "host.offline-health"),
        "{:?}",
        audit.entries
    );

    // Once recorded, the agent stops reporting it; and it did not revert twice.
    let plan = coordinator.rewindctl(&["rollback", "plan", "--change", "ch-2"]);
    let shown = String::from_utf8_lossy(&plan.stdout);
    assert!(
        shown.contains("already reverted by 1 host on their own"),
        "{shown}"
    );
    let journal = host.must_stop_and_read_journal();
    let restores = journal
        .iter()
        .filter(|record| {
            record["step_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("sr-") && id.contains("/restore/"))
        })
        .count();
    assert_eq!(restores, 1);
    assert_eq!(
        host.restarts(),
        3,
        "two activations and the self-revert's restart"
    );
    let pending = std::process::Command::new(must_binary("rewind-agent"))
        .arg("--config")
        .arg(&host.config_path)
        .args(["self-reverts"])
        .output()
        .unwrap();
    assert!(
        pending.status.success(),
        "{}",
        String::from_utf8_lossy(&pending.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&pending.stdout).trim(),
        "no self-revert waiting to be reported"
    );
}
