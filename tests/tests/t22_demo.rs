//! The README's first command: `rewindctl demo` runs the whole loop (three agents, a bad
//! release, an automatic rollback wave by wave, health back to baseline, the audit chain) and
//! exits 0 only if all of it happened. Run here with `REWIND_LOG_FORMAT=json`, which the
//! coordinator and agents it starts inherit: every line they log is a JSON object, and the
//! engine's lines about the rollback carry its id.

use rewind_tests::must_binary;

#[test]
fn the_demo_rolls_back_for_real_and_its_processes_log_json_with_the_rollback_id() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    let output = std::process::Command::new(must_binary("rewindctl"))
        .args(["demo", "--dir"])
        .arg(&demo_dir)
        .env("REWIND_LOG_FORMAT", "json")
        .env("REWIND_LOG", "info")
        .output()
        .expect("run rewindctl demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "bad health detected, rollback started",
        "web-1 reverted and verified healthy",
        "rollback rb-1 succeeded",
        "service health back to baseline",
        "hash chain intact",
        // The demo checks the incident's times and timeline against the rollback itself.
        "Incident in-1: detected after",
        "rewindctl incident export in-1",
        // And that the PagerDuty stand-in accepted a trigger then a resolve of in-1.
        "PagerDuty stand-in: trigger for in-1 (severity warning), then resolve",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in:\n{stdout}");
    }

    let coordinator_log = std::fs::read_to_string(demo_dir.join("logs/coordinator.log")).unwrap();
    let lines: Vec<serde_json::Value> = coordinator_log
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("not a JSON line ({error}): {line}"))
        })
        .collect();
    assert!(lines.len() > 10, "{} lines", lines.len());
    let about_the_rollback = lines
        .iter()
        .filter(|line| {
            line["fields"]["rollback_id"] == "rb-1"
                || line["span"]["rollback_id"] == "rb-1"
                || line["spans"]
                    .as_array()
                    .is_some_and(|spans| spans.iter().any(|span| span["rollback_id"] == "rb-1"))
        })
        .count();
    assert!(
        about_the_rollback >= 3,
        "only {about_the_rollback} coordinator lines carry rollback_id rb-1 (the engine logs one per step):\n{coordinator_log}"
    );
    for line in &lines {
        assert!(
            line["level"].is_string() && line["timestamp"].is_string(),
            "{line}"
        );
    }
    // Every process the demo started logged JSON, and something.
    for log in std::fs::read_dir(demo_dir.join("logs")).unwrap() {
        let path = log.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.trim().is_empty(), "{} is empty", path.display());
        for line in text.lines() {
            serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|error| {
                panic!("{}: not a JSON line ({error}): {line}", path.display())
            });
        }
    }
}
