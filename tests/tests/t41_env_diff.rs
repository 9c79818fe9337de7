//! `rewindctl env diff`: environment parity on real agents. A staging host and two production
//! hosts run `web`; staging is on v2 with a flag on, production on v1 with one host's config
//! edited by hand: each difference is named with the hosts holding each value, and an
//! environment compared with itself is the same.

use rewind_proto::v1 as pb;
use rewind_tests::*;

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn env_diff_names_what_differs_between_staging_and_prod() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let mut hosts: Vec<TestHost> = [("stg-1", "staging"), ("prod-1", "prod"), ("prod-2", "prod")]
        .iter()
        .map(|(id, environment)| {
            let host = TestHost::must_prepare(dir.path(), id, &coordinator);
            let config = std::fs::read_to_string(&host.config_path).unwrap().replace(
                "[labels]\n",
                &format!("[labels]\nenvironment = \"{environment}\"\n"),
            );
            std::fs::write(&host.config_path, config).unwrap();
            host
        })
        .collect();
    for host in &mut hosts {
        host.must_start_agent();
    }
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, 3).await;
    must_register_web(&mut client, &hosts[0], false).await;
    for (version, host_ids) in [
        ("v1", vec!["stg-1", "prod-1", "prod-2"]),
        ("v2", vec!["stg-1"]),
    ] {
        must_deploy_web(&client, version, &host_ids).await;
    }
    client
        .set_flag(pb::SetFlagRequest {
            environment: "staging".into(),
            service: "web".into(),
            name: "new-checkout".into(),
            enabled: true,
            reason: "trying it in staging".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    std::fs::write(hosts[2].root.join("config/app.toml"), "workers = 1\n").unwrap();

    let diff = coordinator.rewindctl(&["env", "diff", "staging", "prod"]);
    let shown = stdout(&diff);
    assert_eq!(diff.status.code(), Some(1), "{shown}");
    for expected in [
        "web: differs (staging 1 of 1 hosts, prod 2 of 2 hosts):",
        "release: staging releases/v2 (1 host) | prod releases/v1 (2 hosts)",
        "flag new-checkout: staging on | prod unset",
    ] {
        assert!(shown.contains(expected), "{expected}:\n{shown}");
    }
    // The hand edit makes production disagree with itself too: both values are named.
    let config = shown
        .lines()
        .find(|line| line.trim_start().starts_with("config/app.toml:"))
        .unwrap_or_else(|| panic!("no config line:\n{shown}"));
    assert_eq!(config.matches("(1 host)").count(), 3, "{config}");

    let json = coordinator.rewindctl(&["--output", "json", "env", "diff", "staging", "prod"]);
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(parsed[0]["service"], "web", "{parsed}");
    assert!(
        parsed[0]["differences"].as_array().unwrap().len() >= 3,
        "{parsed}"
    );
    assert_eq!(parsed[0]["environments"][1]["asked"], 2, "{parsed}");

    let same = coordinator.rewindctl(&["env", "diff", "prod", "prod", "--service", "web"]);
    // prod-2's edit still splits prod, so it differs from itself; staging does not.
    assert_eq!(same.status.code(), Some(1), "{}", stdout(&same));
    let same = coordinator.rewindctl(&["env", "diff", "staging", "staging"]);
    assert!(same.status.success(), "{}", stdout(&same));
    assert!(
        stdout(&same).contains("web: same in both"),
        "{}",
        stdout(&same)
    );

    let unknown = coordinator.rewindctl(&["env", "diff", "staging", "qa", "--service", "api"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr)
            .contains("no host of environment \"staging\" or \"qa\" runs service \"api\""),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
}
