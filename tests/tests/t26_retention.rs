//! Release retention on a real agent: with `keep-releases = 1`, each activation prunes the
//! releases beyond the live one, but never the last known good (the release a rollback of the
//! latest change restores), which the rollback then does restore.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::{
    Coordinator, TestHost, must_agents_connected, must_change, must_change_where,
    must_register_web, must_rollback_end, must_wait,
};

#[tokio::test(flavor = "multi_thread")]
async fn an_activation_prunes_old_releases_but_keeps_the_last_known_good() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let mut host = TestHost::must_prepare(dir.path(), "web-1", &coordinator);
    let config = std::fs::read_to_string(&host.config_path)
        .unwrap()
        .replacen(
            "flags-file = \"config/flags.json\"\n",
            "flags-file = \"config/flags.json\"\nkeep-releases = 1\n",
            1,
        );
    std::fs::write(&host.config_path, config).unwrap();
    // Here v2 is a good release (the rollback of v3 returns to it and must find it healthy).
    std::fs::write(host.root.join("releases/v2/health_status"), "200").unwrap();
    let v3 = host.root.join("releases/v3");
    std::fs::create_dir_all(&v3).unwrap();
    std::fs::write(v3.join("VERSION"), "v3").unwrap();
    std::fs::write(v3.join("health_status"), "200").unwrap();
    host.must_start_agent();
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, 1).await;
    must_register_web(&mut client, &host, false).await;
    client
        .register_release(pb::RegisterReleaseRequest {
            request_id: "release-v3".into(),
            release: Some(pb::Release {
                service: "web".into(),
                version: "v3".into(),
                artifact_digest: rewind_shared::digest::tree_digest(&v3).unwrap(),
                commit: "c0ffee".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let releases = |host: &TestHost| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(host.root.join("releases"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let mut last = String::new();
    for version in ["v1", "v2", "v3"] {
        last = must_change(&mut client, version).await;
        must_change_where(&client, &last, "the change to deploy", |change| {
            change.state == pb::ChangeState::Deployed as i32
        })
        .await;
    }
    // Live v3, last known good v2 (the latest snapshot's): v1 goes.
    must_wait(Duration::from_secs(30), "v1 to be pruned", || {
        (releases(&host) == ["v2", "v3"]).then_some(())
    });

    let rollback = client
        .start_rollback(pb::StartRollbackRequest {
            request_id: "rollback-v3".into(),
            change_id: last,
            reason: "v3 misbehaves".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap();
    let ended = must_rollback_end(&client, &rollback.rollback_id).await;
    assert_eq!(
        ended.state,
        pb::RollbackState::Succeeded as i32,
        "{ended:?}"
    );
    assert_eq!(host.current_link(), "releases/v2");
}
