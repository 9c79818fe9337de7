//! `rewindctl host diff` and `host drift` through the coordinator to real agents: captured
//! state matches across replicas, live state shows a hand-edited config, drift shows what
//! changed since rewind last put a service there (from `host drift`, and from the agents' own
//! checks in `service drift` and `host list`), and a host that is unknown or not connected is
//! named in the error.

use rewind_proto::v1 as pb;
use rewind_tests::*;

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn host_diff_and_drift_compare_real_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let (mut hosts, mut client) =
        must_start_hosts(dir.path(), &coordinator, &["web-1", "web-2"]).await;
    must_deploy_v1_then_v2(&mut client, &hosts).await;

    let same = coordinator.rewindctl(&["host", "diff", "web-1", "web-2"]);
    assert!(
        same.status.success(),
        "{}{}",
        stdout(&same),
        String::from_utf8_lossy(&same.stderr)
    );
    assert!(
        stdout(&same).contains("web-1 and web-2 match (latest snapshots)"),
        "{}",
        stdout(&same)
    );

    // Someone edits web-2's config by hand.
    std::fs::write(hosts[1].root.join("config/app.toml"), "workers = 1\n").unwrap();
    let live = coordinator.rewindctl(&["host", "diff", "web-1", "web-2", "--live"]);
    assert_eq!(live.status.code(), Some(1), "{}", stdout(&live));
    assert!(
        stdout(&live).contains("web: config/app.toml: content differs"),
        "{}",
        stdout(&live)
    );

    // Drift is measured against what rewind last put there (the v2 activation, then the
    // config the deploy tool wrote and adopted), not against the snapshot from before it: the
    // deploy itself is no drift, the hand edit after it is.
    let clean = coordinator.rewindctl(&["host", "drift", "web-1", "--service", "web"]);
    assert!(clean.status.success(), "{}", stdout(&clean));
    assert!(
        stdout(&clean).contains("web: no drift since the state rewind last set (host adopt)"),
        "{}",
        stdout(&clean)
    );
    let drift = coordinator.rewindctl(&["host", "drift", "web-2", "--service", "web"]);
    assert_eq!(drift.status.code(), Some(1), "{}", stdout(&drift));
    let shown = stdout(&drift);
    assert!(
        shown.contains("web: drifted since the state rewind last set (host adopt)"),
        "{shown}"
    );
    assert!(shown.contains("config/app.toml"), "{shown}");
    assert!(
        !shown.contains("releases/v1"),
        "the deploy is not drift: {shown}"
    );

    // The agents check on their own and report with health: web-2 restarts checking every 5 s
    // and its hand edit shows per service, then a later edit too.
    hosts[1].agent = None;
    let config = std::fs::read_to_string(&hosts[1].config_path)
        .unwrap()
        .replace("[tls]\n", "drift-check-interval-s = 5\n[tls]\n");
    std::fs::write(&hosts[1].config_path, config).unwrap();
    hosts[1].must_start_agent();
    must_agents_connected(&client, 2).await;
    let service_drift = |wanted: &'static str| {
        let coordinator = &coordinator;
        must_wait(
            std::time::Duration::from_secs(60),
            "web-2's drift to be reported",
            move || {
                let output = coordinator.rewindctl(&["service", "drift", "web"]);
                let shown = stdout(&output);
                (output.status.code() == Some(1) && shown.contains(wanted)).then_some(shown)
            },
        )
    };
    let shown = service_drift("config/app.toml");
    assert!(
        shown.contains("web-2: 1 change since the state rewind last set (host adopt)")
            && shown.contains("config/app.toml"),
        "{shown}"
    );
    let unknown = coordinator.rewindctl(&["service", "drift", "api"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no host runs service \"api\""),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    let listed = stdout(&coordinator.rewindctl(&["host", "list"]));
    assert!(
        listed.contains("DRIFT") && listed.contains("web (1)"),
        "{listed}"
    );
    std::fs::remove_file(hosts[1].root.join("config/app.toml")).unwrap();
    let shown = service_drift("-> absent");
    assert!(shown.contains("config/app.toml"), "{shown}");

    // A rollback's restore is what rewind put there last: no drift after it, the hand edit and
    // the deleted file undone with the rest (it is told to: a hand edit is not wiped without a
    // word, see t42).
    let rollback_id = client
        .start_rollback(pb::StartRollbackRequest {
            change_id: "ch-2".into(),
            reason: "bad release".into(),
            options: Some(pb::PlanOptions {
                max_parallel: 1,
                overwrite_drift: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("start the rollback")
        .into_inner()
        .rollback
        .expect("started")
        .rollback_id;
    let rollback = must_rollback_end(&client, &rollback_id).await;
    assert_eq!(
        rollback.state,
        pb::RollbackState::Succeeded as i32,
        "{rollback:?}"
    );
    for host in ["web-1", "web-2"] {
        let drift = coordinator.rewindctl(&["host", "drift", host, "--service", "web"]);
        let shown = stdout(&drift);
        assert!(drift.status.success(), "{shown}");
        assert!(
            shown.contains(&format!(
                "web: no drift since the state rewind last set ({rollback_id}/web/restore/{host})"
            )),
            "{shown}"
        );
    }

    for (request, why) in [
        (
            pb::InspectHostRequest {
                host_id: "web-1".into(),
                mode: 7,
                ..Default::default()
            },
            "7 is not an inspect mode",
        ),
        (
            pb::InspectHostRequest {
                host_id: "web-1".into(),
                compare_token: vec![0; 65],
                ..Default::default()
            },
            "compare_token: is longer than 64 bytes",
        ),
        (
            pb::InspectHostRequest {
                host_id: "web-1".into(),
                service: "api".into(),
                ..Default::default()
            },
            "managed services are web",
        ),
    ] {
        let status = client.inspect_host(request).await.unwrap_err();
        assert!(status.message().contains(why), "{why}: {status:?}");
    }
    let unknown = coordinator.rewindctl(&["host", "drift", "db-9"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("host db-9 is not registered"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    hosts[1].agent = None;
    must_agents_connected(&client, 1).await;
    let gone = coordinator.rewindctl(&["host", "diff", "web-1", "web-2"]);
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(!gone.status.success());
    assert!(stderr.contains("agent web-2 is not connected"), "{stderr}");
}
