//! The whole loop: capture, deploy, bad health, automatic rollback, exact restore, audit.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::{
    Coordinator, TestHost, must_agents_connected, must_change, must_change_where,
    must_register_web, must_rollback_end, must_write_v2_config, run_ok,
};

async fn must_setup(
    dir: &std::path::Path,
    host_ids: &[&str],
    auto_rollback: bool,
) -> (
    Coordinator,
    Vec<TestHost>,
    pb::control_service_client::ControlServiceClient<tonic::transport::Channel>,
) {
    let coordinator = Coordinator::must_start(&dir.join("coordinator"));
    let mut hosts: Vec<TestHost> = host_ids
        .iter()
        .map(|id| TestHost::must_prepare(dir, id, &coordinator))
        .collect();
    for host in &mut hosts {
        host.must_start_agent();
    }
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, host_ids.len()).await;
    must_register_web(&mut client, &hosts[0], auto_rollback).await;
    (coordinator, hosts, client)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_health_after_a_change_rolls_every_host_back_to_its_exact_state() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, hosts, mut client) = must_setup(dir.path(), &["web-1", "web-2"], true).await;

    let first = must_change(&mut client, "v1").await;
    must_change_where(&client, &first, "v1 deployed", |change| {
        change.state == pb::ChangeState::Deployed as i32
    })
    .await;
    let second = must_change(&mut client, "v2").await;
    must_change_where(&client, &second, "captures done", |change| {
        change.state != pb::ChangeState::Capturing as i32
    })
    .await;
    must_write_v2_config(&mut client, &hosts).await;
    let change = must_change_where(&client, &second, "the automatic rollback", |change| {
        !change.rollback_id.is_empty()
    })
    .await;
    assert!(
        change
            .hosts
            .iter()
            .all(|host| host.snapshot_id.starts_with("snap-")),
        "{change:?}"
    );

    let rollback = must_rollback_end(&client, &change.rollback_id).await;
    assert_eq!(
        rollback.state,
        pb::RollbackState::Succeeded as i32,
        "{rollback:?}"
    );
    assert_eq!(rollback.trigger, "automatic");
    assert!(
        rollback
            .reason
            .starts_with("probe_failure_ratio 1.000 breached"),
        "{}",
        rollback.reason
    );
    assert_eq!(
        rollback.steps.len(),
        10,
        "drain, restore, restart, verify, undrain on each host"
    );
    assert!(
        rollback
            .waves
            .iter()
            .all(|wave| wave.gate == pb::StepState::Succeeded as i32),
        "every wave passed its health gate: {:?}",
        rollback.waves
    );
    assert!(
        rollback.steps.iter().all(|step| step.attempts == 1),
        "no step needed a retry: {rollback:?}"
    );
    for host in &hosts {
        host.must_be_restored_to_v1();
        assert_eq!(
            host.restarts(),
            3,
            "{}: v1 and v2 activations and one rollback restart",
            host.id
        );
    }
    let change = client
        .get_change(pb::GetChangeRequest {
            change_id: second.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .change
        .unwrap();
    assert_eq!(change.state, pb::ChangeState::RolledBack as i32);

    // Only one automatic rollback per change, and a finished one is not repeated.
    let again = pb::StartRollbackRequest {
        request_id: "again".into(),
        change_id: second.clone(),
        reason: "again".into(),
        max_parallel: 0,
        ..Default::default()
    };
    let refused = client.start_rollback(again).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");

    // Lists go newest first, a page at a time; a listed rollback comes without its steps.
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_changes(pb::ListChangesRequest {
                service: "web".into(),
                page_size: 1,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages.extend(page.changes.into_iter().map(|change| change.change_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(pages, vec![second.clone(), first.clone()]);
    // rewindctl pages alike and says how to ask for the next page.
    let page =
        run_ok(&coordinator.rewindctl(&["change", "list", "--service", "web", "--page-size", "1"]));
    let more =
        format!("(more: rewindctl change list --service web --page-size 1 --page-token {second})");
    assert!(page.contains(&second) && page.contains(&more), "{page}");
    let last = run_ok(&coordinator.rewindctl(&[
        "change",
        "list",
        "--service",
        "web",
        "--page-size",
        "1",
        "--page-token",
        &second,
    ]));
    assert!(last.contains(&first) && !last.contains("(more:"), "{last}");
    let listed = client
        .list_rollbacks(pb::ListRollbacksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.rollbacks.len(), 1);
    assert!(listed.rollbacks[0].steps.is_empty() && listed.next_page_token.is_empty());

    let verification = client
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verification.ok, "{verification:?}");
    let audit = client
        .list_audit(pb::ListAuditRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    // The audit log pages oldest first; a page's token is the index it starts at.
    let mut paged = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_audit(pb::ListAuditRequest {
                page_size: 7,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 7);
        paged.extend(page.entries);
        if page.next_page_token.is_empty() {
            break;
        }
        assert_eq!(page.next_page_token, (paged.len() + 1).to_string());
        page_token = page.next_page_token;
    }
    // (Entries appended since the first read may follow.)
    assert_eq!(
        paged[..audit.len()],
        audit[..],
        "the pages hold the whole log once, in order"
    );
    for action in [
        "change.start",
        "rollback.start",
        "step.finish",
        "host.register",
    ] {
        assert!(
            audit.iter().any(|entry| entry.action == action),
            "no {action} in the audit log"
        );
    }
    assert!(
        audit
            .iter()
            .any(|entry| entry.action == "change.start" && entry.identity == "user:operator")
    );
    assert!(
        audit
            .iter()
            .any(|entry| entry.action == "step.finish" && entry.identity == "agent:web-1")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_rollback_can_be_paused_resumed_and_runs_one_host_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let (_coordinator, mut hosts, mut client) =
        must_setup(dir.path(), &["web-1", "web-2"], false).await;
    let first = must_change(&mut client, "v1").await;
    must_change_where(&client, &first, "v1 deployed", |change| {
        change.state == pb::ChangeState::Deployed as i32
    })
    .await;
    let second = must_change(&mut client, "v2").await;
    must_change_where(&client, &second, "v2 deployed", |change| {
        change.state == pb::ChangeState::Deployed as i32
    })
    .await;

    // With web-1's agent down the rollback cannot get past web-1's restore, so the pause below
    // lands while it runs, and web-2 must not begin (max_parallel 1).
    hosts[0].agent = None;
    let start = pb::StartRollbackRequest {
        request_id: "rb".into(),
        change_id: second.clone(),
        reason: "bad release".into(),
        max_parallel: 1,
        ..Default::default()
    };
    let rollback = client
        .start_rollback(start.clone())
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap();
    // The same request id again returns the same rollback rather than starting another.
    let retried = client
        .start_rollback(start)
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap();
    assert_eq!(retried.rollback_id, rollback.rollback_id);

    let action = |request_id: &str| pb::RollbackActionRequest {
        request_id: request_id.into(),
        rollback_id: rollback.rollback_id.clone(),
        reason: "look first".into(),
        ..Default::default()
    };
    let paused = client
        .pause_rollback(action("pause"))
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap();
    assert_eq!(paused.state, pb::RollbackState::Paused as i32);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = client
        .get_rollback(pb::GetRollbackRequest {
            rollback_id: rollback.rollback_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap();
    let running_hosts: std::collections::BTreeSet<_> = still
        .steps
        .iter()
        .filter(|step| step.attempts > 0)
        .map(|step| step.host_id.clone())
        .collect();
    assert_eq!(
        running_hosts.into_iter().collect::<Vec<_>>(),
        vec!["web-1".to_string()],
        "max_parallel 1: {still:?}"
    );
    assert_eq!(still.state, pb::RollbackState::Paused as i32);
    hosts[0].must_start_agent();
    client.resume_rollback(action("resume")).await.unwrap();

    let ended = must_rollback_end(&client, &rollback.rollback_id).await;
    assert_eq!(
        ended.state,
        pb::RollbackState::Succeeded as i32,
        "{ended:?}"
    );
    assert_eq!(ended.trigger, "manual");
    assert_eq!(ended.started_by, "user:operator");
    // One host at a time: each host's restore starts after the previous host's verify ended.
    let verify_web1 = ended
        .steps
        .iter()
        .find(|step| step.host_id == "web-1" && step.kind == "verify")
        .unwrap();
    let restore_web2 = ended
        .steps
        .iter()
        .find(|step| step.host_id == "web-2" && step.kind == "restore")
        .unwrap();
    assert!(
        restore_web2.started_at_ms >= verify_web1.finished_at_ms,
        "{ended:?}"
    );
    for host in &hosts {
        assert_eq!(host.current_link(), "releases/v1");
    }
    let aborted = client.abort_rollback(action("abort")).await.unwrap_err();
    assert_eq!(
        aborted.code(),
        tonic::Code::FailedPrecondition,
        "{aborted:?}"
    );
}
