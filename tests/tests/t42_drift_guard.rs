//! A rollback does not silently undo a hotfix made by hand: on three real agents, a config
//! edited after the deploy is named in the plan, a manual rollback is refused for it, a host
//! left out stays exactly as it was, an agent refuses a restore that would wipe drift the
//! coordinator had not heard of (and the paused rollback goes on once the change is adopted),
//! a later rollback reverts the host left out when told to overwrite its drift, and adoption
//! and overwriting are both audited.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::*;

const HOTFIX: &str = "workers = 1 # hotfix by hand\n";

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Restarts the host's agent checking drift every `interval_s` (0: never).
fn must_check_drift_every(host: &mut TestHost, interval_s: u32) {
    host.agent = None;
    let config = std::fs::read_to_string(&host.config_path).unwrap().replace(
        "[tls]\n",
        &format!("drift-check-interval-s = {interval_s}\n[tls]\n"),
    );
    std::fs::write(&host.config_path, config).unwrap();
    host.must_start_agent();
}

async fn must_start(
    client: &mut pb::control_service_client::ControlServiceClient<tonic::transport::Channel>,
    options: pb::PlanOptions,
) -> String {
    client
        .start_rollback(pb::StartRollbackRequest {
            request_id: String::new(),
            change_id: "ch-2".into(),
            reason: "v2 is bad".into(),
            options: Some(pb::PlanOptions {
                max_parallel: 1,
                ..options
            }),
            ..Default::default()
        })
        .await
        .expect("start the rollback")
        .into_inner()
        .rollback
        .expect("started, not filed for approval")
        .rollback_id
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hotfix_by_hand_is_not_wiped_without_a_word() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let (mut hosts, mut client) =
        must_start_hosts(dir.path(), &coordinator, &["web-1", "web-2", "web-3"]).await;
    // web-2 reports its drift every 5 s; web-3 never does, so only its agent can catch it.
    must_check_drift_every(&mut hosts[1], 5);
    must_check_drift_every(&mut hosts[2], 0);
    must_agents_connected(&client, 3).await;
    must_deploy_v1_then_v2(&mut client, &hosts).await;

    // Hotfixes by hand on web-2 and web-3, after rewind put v2 there.
    for host in &hosts[1..] {
        std::fs::write(host.root.join("config/app.toml"), HOTFIX).unwrap();
    }
    let plan = must_wait(
        Duration::from_secs(60),
        "the plan to name web-2's drift",
        || {
            let output = coordinator.rewindctl(&["rollback", "plan", "--change", "ch-2"]);
            let shown = stdout(&output);
            shown
                .contains("web-2: web: config/app.toml")
                .then_some(shown)
        },
    );
    assert!(
        plan.contains("changed by hand since rewind put them there (refused unless")
            && !plan.contains("web-3: web:"),
        "web-3 never reported its drift: {plan}"
    );

    // A manual rollback is refused, naming the host, what changed and the ways on.
    let refused = coordinator.rewindctl(&["rollback", "start", "ch-2", "--reason", "v2 is bad"]);
    assert!(!refused.status.success(), "{}", stdout(&refused));
    let said = stderr(&refused);
    assert!(
        said.contains("web-2: web: config/app.toml")
            && said.contains("--exclude-host web-2")
            && said.contains("--overwrite-drift")
            && said.contains("host adopt"),
        "{said}"
    );
    assert!(
        hosts
            .iter()
            .all(|host| host.current_link() == "releases/v2"),
        "nothing was touched"
    );

    // Web-2 left out. Web-3's agent finds the drift the coordinator never heard of and
    // refuses its restore, changing nothing: the rollback pauses there.
    let first = must_start(
        &mut client,
        pb::PlanOptions {
            exclude_hosts: vec!["web-2".into()],
            ..Default::default()
        },
    )
    .await;
    let paused = must_rollback_where(
        &client,
        &first,
        "the rollback to pause on web-3",
        |rollback| rollback.state == pb::RollbackState::Paused as i32,
    )
    .await;
    let refused_step = paused
        .steps
        .iter()
        .find(|step| step.host_id == "web-3" && step.kind == "restore")
        .expect("web-3's restore");
    assert!(
        refused_step
            .detail
            .contains("changed since rewind last put it there")
            && refused_step.detail.contains("config/app.toml")
            && refused_step.detail.contains("Nothing was restored"),
        "{refused_step:?}"
    );
    assert!(paused.steps.iter().all(|step| step.host_id != "web-2"));
    hosts[0].must_be_restored_to_v1();
    for host in &hosts[1..] {
        assert_eq!(host.current_link(), "releases/v2", "{}", host.id);
        assert_eq!(
            std::fs::read_to_string(host.root.join("config/app.toml")).unwrap(),
            HOTFIX,
            "{}",
            host.id
        );
    }

    // Someone decides web-3's hotfix may go: adopting it makes it no drift, and the rollback,
    // resumed, reverts web-3 too.
    run_ok(&coordinator.rewindctl(&[
        "host",
        "adopt",
        "web-3",
        "--service",
        "web",
        "--reason",
        "the hotfix goes with v2",
    ]));
    client
        .resume_rollback(pb::RollbackActionRequest {
            rollback_id: first.clone(),
            reason: "web-3's hotfix adopted".into(),
            ..Default::default()
        })
        .await
        .expect("resume");
    let done = must_rollback_end(&client, &first).await;
    assert_eq!(done.state, pb::RollbackState::Succeeded as i32, "{done:?}");
    assert!(
        done.outcome_detail
            .contains("left out by its plan, as they were: web-2"),
        "{}",
        done.outcome_detail
    );
    hosts[2].must_be_restored_to_v1();
    assert_eq!(hosts[1].current_link(), "releases/v2");
    assert_eq!(
        std::fs::read_to_string(hosts[1].root.join("config/app.toml")).unwrap(),
        HOTFIX
    );

    // A later rollback of the same change reverts what the first left out, and only that,
    // once told to wipe its drift.
    let second = must_start(
        &mut client,
        pb::PlanOptions {
            overwrite_drift: true,
            ..Default::default()
        },
    )
    .await;
    let done = must_rollback_end(&client, &second).await;
    assert_eq!(done.state, pb::RollbackState::Succeeded as i32, "{done:?}");
    assert!(
        done.steps.iter().all(|step| step.host_id == "web-2"),
        "{done:?}"
    );
    hosts[1].must_be_restored_to_v1();

    let audit = must_list_audit(&client).await;
    let adopted = audit
        .iter()
        .find(|entry| {
            entry.action == "host.adopt"
                && entry.target == "web-3"
                && entry.reason == "the hotfix goes with v2"
        })
        .expect("the adoption is audited");
    assert!(
        adopted.outcome.contains("web: config/app.toml"),
        "{adopted:?}"
    );
    let overwritten = audit
        .iter()
        .filter(|entry| entry.action == "rollback.start")
        .map(|entry| entry.outcome.as_str())
        .collect::<Vec<_>>();
    assert!(
        overwritten
            .iter()
            .any(|outcome| outcome.contains("left out: web-2"))
            && overwritten
                .iter()
                .any(|outcome| outcome.contains("drift overwritten")),
        "{overwritten:?}"
    );
    must_verify_audit(&client).await;
}
