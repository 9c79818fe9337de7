//! A verify does not wait for the host's next periodic health report: the coordinator asks the
//! agent for one as the verify begins, and the agent, finding the service not healthy yet (it
//! is still starting), reports again every 200 ms until it is. With reports every 60 s, both
//! hosts are verified within seconds of their restart.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::*;

/// Has `host`'s restart take 1.5 s to come up: the restart command leaves a `starting` marker
/// that a background job removes, and a second probe fails while it is there.
fn must_start_slowly(host: &TestHost) {
    let root = host.root.display();
    let config = std::fs::read_to_string(&host.config_path).unwrap();
    let restart = format!(r#"restart-command = ["sh", "-c", "echo restarted >> {root}/restarts"]"#);
    let slow_restart = format!(
        r#"restart-command = ["sh", "-c", "echo restarted >> {root}/restarts; touch {root}/starting; (sleep 1.5; rm -f {root}/starting) >/dev/null 2>&1 &"]"#
    );
    assert!(config.contains(&restart), "{config}");
    let config = config.replace(&restart, &slow_restart)
        + &format!(
            r#"[[service.probe]]
name = "started"
command = ["sh", "-c", "test ! -e {root}/starting"]
timeout-ms = 2000
"#
        );
    std::fs::write(&host.config_path, config).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_verify_asks_for_a_report_and_ends_once_the_restarted_host_is_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start_with(
        &dir.path().join("coordinator"),
        "[health]\nreport-interval-ms = 60000\n",
    );
    let mut hosts: Vec<TestHost> = ["web-1", "web-2"]
        .iter()
        .map(|id| TestHost::must_prepare(dir.path(), id, &coordinator))
        .collect();
    for host in &mut hosts {
        must_start_slowly(host);
        host.must_start_agent();
    }
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, hosts.len()).await;
    must_deploy_v1_then_v2(&mut client, &hosts).await;

    let rollback_id = must_start_rollback_of_v2(&mut client).await;
    // Well inside the 60 s report interval: only reports asked for can end these verifies.
    let verifies = |rollback: &pb::Rollback| -> Vec<pb::RollbackStep> {
        rollback
            .steps
            .iter()
            .filter(|step| step.kind == "verify")
            .cloned()
            .collect()
    };
    let rollback = must_wait_async(Duration::from_secs(25), "both verifies to pass", || {
        let mut client = client.clone();
        let rollback_id = rollback_id.clone();
        async move {
            let rollback = client
                .get_rollback(pb::GetRollbackRequest {
                    rollback_id,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .rollback?;
            let verifies = verifies(&rollback);
            (verifies.len() == 2
                && verifies
                    .iter()
                    .all(|step| step.state == pb::StepState::Succeeded as i32))
            .then_some(rollback)
        }
    })
    .await;
    for step in verifies(&rollback) {
        assert!(step.detail.contains("2 probes pass"), "{step:?}");
    }
    for host in &hosts {
        host.must_be_restored_to_v1();
    }
}
