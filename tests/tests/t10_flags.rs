//! Feature flags end to end: set and kill through rewindctl reach every agent's flags file, an
//! agent that was down converges when it reconnects, and a change's flags are turned back
//! first by its rollback.

use std::collections::BTreeMap;
use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::*;

fn must_see_flags(hosts: &[TestHost], expected: &[(&str, bool)], what: &str) {
    let expected: BTreeMap<String, bool> = expected
        .iter()
        .map(|(name, on)| (name.to_string(), *on))
        .collect();
    must_wait(Duration::from_secs(90), what, || {
        hosts
            .iter()
            .all(|host| host.flags() == expected)
            .then_some(())
    });
}

fn must_run(coordinator: &Coordinator, args: &[&str]) {
    let output = coordinator.rewindctl(args);
    assert!(
        output.status.success(),
        "rewindctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn flags_reach_every_agent_and_a_rollback_turns_a_changes_flags_back_first() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let (mut hosts, mut client) =
        must_start_hosts(dir.path(), &coordinator, &["web-1", "web-2"]).await;
    must_register_web(&mut client, &hosts[0], false).await;

    must_run(
        &coordinator,
        &["flag", "set", "web", "new-ui", "on", "--reason", "launch"],
    );
    must_see_flags(&hosts, &[("new-ui", true)], "new-ui on everywhere");

    // web-2 is down when the kill switch is thrown; it converges when it comes back.
    hosts[1].agent = None;
    must_agents_connected(&client, 1).await;
    must_run(
        &coordinator,
        &["flag", "kill", "web", "new-ui", "--reason", "incident 7"],
    );
    must_see_flags(&hosts[..1], &[("new-ui", false)], "the kill on web-1");
    assert_eq!(
        hosts[1].flags().get("new-ui"),
        Some(&true),
        "web-2 was down"
    );
    hosts[1].must_start_agent();
    must_see_flags(
        &hosts,
        &[("new-ui", false)],
        "web-2 to catch up on reconnect",
    );
    let listed =
        String::from_utf8_lossy(&coordinator.rewindctl(&["flag", "list"]).stdout).to_string();
    assert!(
        listed.contains("off (killed)") && listed.contains("incident 7"),
        "{listed}"
    );

    // A change that turns a flag on; its rollback turns it back before touching any host.
    let first = must_change(&mut client, "v1").await;
    must_change_where(&client, &first, "v1 deployed", |change| {
        change.state == pb::ChangeState::Deployed as i32
    })
    .await;
    let second = client
        .start_change(pb::StartChangeRequest {
            break_glass: false,
            request_id: "v2-with-flag".into(),
            service: "web".into(),
            version: "v2".into(),
            host_ids: vec![],
            reason: "new checkout".into(),
            flags_on: vec!["checkout-v2".into()],
            migrations: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .change
        .unwrap();
    assert_eq!(second.flags[0].name, "checkout-v2");
    assert_eq!(second.flags[0].before, "unset");
    must_change_where(&client, &second.change_id, "v2 deployed", |change| {
        change.state == pb::ChangeState::Deployed as i32
    })
    .await;
    must_see_flags(
        &hosts,
        &[("new-ui", false), ("checkout-v2", true)],
        "checkout-v2 on with the change",
    );
    let rollback = client
        .start_rollback(pb::StartRollbackRequest {
            request_id: "rb".into(),
            change_id: second.change_id.clone(),
            reason: "checkout broken".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap();
    assert_eq!(
        rollback.flags_reverted,
        vec!["default/web/checkout-v2 -> off"]
    );
    must_see_flags(
        &hosts,
        &[("new-ui", false), ("checkout-v2", false)],
        "checkout-v2 off with the rollback",
    );
    let ended = must_rollback_end(&client, &rollback.rollback_id).await;
    assert_eq!(
        ended.state,
        pb::RollbackState::Succeeded as i32,
        "{ended:?}"
    );

    // "Before touching any host": the flag was turned back, and every agent had written it to
    // its flags file, before the rollback's first step began on that host (its own journal).
    let flag = client
        .list_flags(pb::ListFlagsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .flags
        .into_iter()
        .find(|flag| flag.name == "checkout-v2")
        .unwrap();
    assert!(!flag.enabled);
    for host in &mut hosts {
        let flags_written_ms = std::fs::metadata(host.root.join("config/flags.json"))
            .unwrap()
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let first_step_ms = host
            .must_stop_and_read_journal()
            .iter()
            .filter(|record| {
                record["step_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with(&format!("{}/", rollback.rollback_id)))
            })
            .filter_map(|record| record["started_at_ms"].as_u64())
            .min()
            .unwrap_or_else(|| panic!("{}: no step of the rollback journaled", host.id));
        assert!(
            flag.updated_at_ms <= first_step_ms,
            "{}: the flag turned back at {} ms, after the first step began at {first_step_ms} ms",
            host.id,
            flag.updated_at_ms
        );
        assert!(
            flags_written_ms <= first_step_ms,
            "{}: the flags file was written at {flags_written_ms} ms, after the first step began at {first_step_ms} ms",
            host.id
        );
    }
}
