//! The cluster version: shown with what each member's binary supports, and raised only when
//! every member answers and supports the version (real processes, real mTLS).

use rewind_tests::{ClusterHarness, run_ok};

/// The cluster version this release's binaries apply (`state_machine::version::CURRENT`).
const CURRENT: u32 = 13;

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_version_rises_only_when_every_member_answers_and_supports_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ClusterHarness::must_start(dir.path(), 3);
    let (leader, _client) = cluster.must_leader().await;

    // A new cluster starts at its binary's version; every member says what it supports.
    let shown = run_ok(&cluster.rewindctl(leader, &["cluster", "version"]));
    assert!(
        shown.contains(&format!("cluster version {CURRENT}")),
        "{shown}"
    );
    assert_eq!(
        shown.matches(&format!("1..{CURRENT}")).count(),
        3,
        "{shown}"
    );
    assert!(
        shown.contains("no member supports a higher version"),
        "{shown}"
    );
    let json = run_ok(&cluster.rewindctl(leader, &["--output", "json", "cluster", "version"]));
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed["clusterVersion"], CURRENT, "{json}");
    assert_eq!(parsed["members"].as_array().unwrap().len(), 3);

    // Nothing to raise; a version no member supports is refused naming a member.
    let nothing = cluster.rewindctl(leader, &["cluster", "upgrade-finalize", "--reason", "try"]);
    assert!(!nothing.status.success());
    assert!(
        stderr_of(&nothing).contains(&format!("already runs version {CURRENT}")),
        "{}",
        stderr_of(&nothing)
    );
    let next = (CURRENT + 1).to_string();
    let too_new = cluster.rewindctl(
        leader,
        &[
            "cluster",
            "upgrade-finalize",
            "--to",
            &next,
            "--reason",
            "try",
        ],
    );
    assert!(!too_new.status.success());
    assert!(
        stderr_of(&too_new).contains(&format!(
            "applies cluster versions 1 to {CURRENT}: upgrade it"
        )),
        "{}",
        stderr_of(&too_new)
    );
    let no_reason = cluster.rewindctl(leader, &["cluster", "upgrade-finalize", "--reason", ""]);
    assert!(
        stderr_of(&no_reason).contains("reason"),
        "{}",
        stderr_of(&no_reason)
    );

    // A member that does not answer holds the version where it is.
    let silent = (1..=3).find(|&id| id != leader).unwrap();
    cluster.kill(silent);
    let shown = run_ok(&cluster.rewindctl(leader, &["cluster", "version"]));
    assert!(shown.contains("no answer"), "{shown}");
    assert!(shown.contains("a member did not answer"), "{shown}");
    let refused = cluster.rewindctl(leader, &["cluster", "upgrade-finalize", "--reason", "try"]);
    assert!(
        stderr_of(&refused).contains(&format!("member {silent} ("))
            && stderr_of(&refused).contains("did not answer"),
        "{}",
        stderr_of(&refused)
    );
}
