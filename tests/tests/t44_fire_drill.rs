//! Rollback fire drills on real agents: `rewindctl drill rollback` deploys a known-bad release
//! (v2, whose health file says 500) to every staging host of web, the service's health policy
//! detects it, the automatic rollback reverts it, and the scorecard is printed as a JUnit report
//! a pipeline gates on; `drill show` and `drill list` read it back, the drill is marked on its
//! change and rollback, the second drill compares with the first, an abort stops a third and its
//! release is reverted all the same, and each is audited.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::{
    Coordinator, TestHost, must_agents_connected, must_change, must_change_where, must_list_audit,
    must_register_web, must_wait, output_text,
};

const HOSTS: [&str; 2] = ["web-1", "web-2"];

/// `rewindctl drill rollback` of web in staging to `release`, with `extra` arguments.
fn drill_rollback(
    coordinator: &Coordinator,
    release: &str,
    reason: &str,
    extra: &[&str],
) -> std::process::Output {
    let args = [
        "drill",
        "rollback",
        "--service",
        "web",
        "--env",
        "staging",
        "--release",
        release,
        "--reason",
        reason,
    ];
    coordinator.rewindctl(&[&args[..], extra].concat())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drill_deploys_a_bad_release_is_detected_rolled_back_and_scored() {
    let dir = tempfile::tempdir().unwrap();
    // Drills back to back: no cooldown or flap throttle between their automatic rollbacks.
    let coordinator = Coordinator::must_start_with(
        dir.path(),
        "[throttle]\ncooldown-s = 0\nflap-rollbacks = 100\n",
    );
    let mut hosts: Vec<TestHost> = HOSTS
        .iter()
        .map(|id| TestHost::must_prepare(dir.path(), id, &coordinator))
        .collect();
    for host in &mut hosts {
        let config = std::fs::read_to_string(&host.config_path).unwrap();
        let staging = config.replace("[labels]\n", "[labels]\nenvironment = \"staging\"\n");
        std::fs::write(&host.config_path, staging).unwrap();
        host.must_start_agent();
    }
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, HOSTS.len()).await;
    must_register_web(&mut client, &hosts[0], true).await;
    let v1 = must_change(&mut client, "v1").await;
    must_change_where(&client, &v1, "v1 deployed", |change| {
        change.state == pb::ChangeState::Deployed as i32
    })
    .await;

    // The release that runs is no drill.
    let refused = drill_rollback(&coordinator, "v1", "game day", &[]);
    assert!(!refused.status.success());
    assert!(
        output_text(&refused).contains("web already runs v1: name the known-bad release"),
        "{}",
        output_text(&refused)
    );

    // The drill: deploy v2, detected, rolled back, scored; JUnit for the pipeline.
    let drilled = drill_rollback(&coordinator, "v2", "game day", &["--output", "junit"]);
    let junit = String::from_utf8_lossy(&drilled.stdout).to_string();
    assert!(drilled.status.success(), "{}", output_text(&drilled));
    assert!(junit.starts_with("<?xml"), "{junit}");
    assert!(
        junit.contains(r#"<testsuites name="rewind drills" tests="7" failures="0">"#),
        "{junit}"
    );
    assert!(
        junit.contains(r#"name="detected by its health policy""#),
        "{junit}"
    );
    for host in &hosts {
        host.must_be_restored_to_v1();
    }

    let shown = coordinator.rewindctl(&["drill", "show", "rd-1", "--output", "json"]);
    assert!(shown.status.success(), "{}", output_text(&shown));
    let drill: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(drill["state"], "passed", "{drill}");
    assert_eq!(drill["version"], "v2");
    let card = &drill["scorecard"];
    assert_eq!(card["detected"], true, "{drill}");
    assert_eq!(card["gates"], card["gatesPassed"], "{drill}");
    // 64-bit numbers are strings in protobuf's JSON.
    let ms = |field: &str| -> u64 { card[field].as_str().unwrap().parse().unwrap() };
    let (detect, first, all) = (ms("detectMs"), ms("firstRevertedMs"), ms("allVerifiedMs"));
    assert!(detect <= first && first <= all, "{drill}");
    let rollback_id = drill["rollbackId"].as_str().unwrap().to_string();

    // Marked as a drill where the change and the rollback appear.
    let changes = output_text(&coordinator.rewindctl(&["change", "list"]));
    assert!(changes.contains("v1 -> v2 (DRILL rd-1)"), "{changes}");
    let rollbacks = output_text(&coordinator.rewindctl(&["rollback", "list"]));
    assert!(rollbacks.contains("automatic, DRILL rd-1"), "{rollbacks}");
    let rollback_shown = output_text(&coordinator.rewindctl(&["rollback", "show", &rollback_id]));
    assert!(rollback_shown.contains("DRILL rd-1"), "{rollback_shown}");

    // A second drill compares with the first.
    let second = drill_rollback(&coordinator, "v2", "again", &[]);
    let scorecard = output_text(&second);
    // The README shows this output.
    eprintln!("{scorecard}");
    assert!(second.status.success(), "{scorecard}");
    assert!(
        scorecard.contains("rd-2  PASSED  DRILL of web in staging"),
        "{scorecard}"
    );
    assert!(scorecard.contains("PREVIOUS (rd-1)"), "{scorecard}");
    assert!(
        scorecard.contains("time to every host verified"),
        "{scorecard}"
    );

    // A third, aborted at once: it ends aborted (exit 1) and v2 is reverted all the same.
    let started = drill_rollback(&coordinator, "v2", "abort me", &["--no-wait"]);
    assert!(started.status.success(), "{}", output_text(&started));
    let aborted = coordinator.rewindctl(&["drill", "abort", "rd-3", "--reason", "a real incident"]);
    assert!(aborted.status.success(), "{}", output_text(&aborted));
    let shown = coordinator.rewindctl(&["drill", "show", "rd-3"]);
    assert_eq!(shown.status.code(), Some(1), "{}", output_text(&shown));
    assert!(
        output_text(&shown).contains("ABORTED") && output_text(&shown).contains("a real incident"),
        "{}",
        output_text(&shown)
    );
    let drill_change = must_wait(
        Duration::from_secs(180),
        "the aborted drill's release reverted",
        || {
            let listed = coordinator.rewindctl(&["drill", "show", "rd-3", "--output", "json"]);
            let drill: serde_json::Value = serde_json::from_slice(&listed.stdout).ok()?;
            let change = drill["changeId"].as_str()?.to_string();
            let shown = output_text(&coordinator.rewindctl(&["change", "show", &change]));
            shown.contains("rolled-back").then_some(change)
        },
    );
    assert_eq!(drill_change, "ch-4");
    for host in &hosts {
        host.must_be_restored_to_v1();
    }

    let listed = output_text(&coordinator.rewindctl(&["drill", "list"]));
    for expected in ["rd-1", "rd-2", "rd-3", "PASSED", "ABORTED"] {
        assert!(listed.contains(expected), "{listed}");
    }
    let junit_elsewhere = coordinator.rewindctl(&["change", "list", "--output", "junit"]);
    assert!(!junit_elsewhere.status.success());
    assert!(
        output_text(&junit_elsewhere).contains("--output junit is for rollback fire drills only")
    );

    let audit = must_list_audit(&client).await;
    for action in ["drill.rollback", "drill.finish", "drill.abort"] {
        assert!(
            audit.iter().any(|entry| entry.action == action),
            "{action} is audited"
        );
    }
}
