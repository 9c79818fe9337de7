//! `rewindctl host diff` and `host drift` through the coordinator to real agents: captured
//! state matches across replicas, live state shows a hand-edited config, drift shows what the
//! latest change did, and a host that is unknown or not connected is named in the error.

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

    let drift = coordinator.rewindctl(&["host", "drift", "web-1", "--service", "web"]);
    assert_eq!(drift.status.code(), Some(1), "{}", stdout(&drift));
    let shown = stdout(&drift);
    assert!(shown.contains("web: drifted since snap-"), "{shown}");
    assert!(
        shown.contains("releases/v1") && shown.contains("releases/v2"),
        "{shown}"
    );
    assert!(shown.contains("config/app.toml"), "{shown}");

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
