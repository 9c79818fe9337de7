//! The agent hands back the code pages it no longer runs (`agent/src/resident.rs`) and keeps
//! working: its resident file pages shrink after the first release, and a change and an
//! automatic rollback later run through every step, on code read back from the page cache.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::{
    Coordinator, TestHost, must_agents_connected, must_change, must_change_where,
    must_register_web, must_rollback_end,
};

/// `name=123` in a log line, as a number.
fn field(line: &str, name: &str) -> Option<u64> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    let digits: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_released_its_code_pages_still_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let mut host = TestHost::must_prepare(dir.path(), "web-1", &coordinator);
    let config = std::fs::read_to_string(&host.config_path).unwrap();
    let config = config.replacen(
        "health-interval-ms = 300\n",
        "health-interval-ms = 300\ncode-release-interval-s = 10\n",
        1,
    );
    std::fs::write(&host.config_path, config).unwrap();
    host.must_start_agent();
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, 1).await;
    must_register_web(&mut client, &host, true).await;

    // The first release, 20 s after the start, says what the resident file pages were before
    // and after it.
    let log = host.config_path.with_file_name("agent.log");
    let (before, after) = rewind_tests::must_wait(
        Duration::from_secs(90),
        "the agent to release its code pages",
        || {
            let text = std::fs::read_to_string(&log).ok()?;
            let line = text
                .lines()
                .find(|line| line.contains("Released the code pages not in use."))?;
            Some((field(line, "before_kib")?, field(line, "after_kib")?))
        },
    );
    assert!(
        after < before * 3 / 4,
        "resident file pages went from {before} KiB to {after} KiB"
    );

    // A change, and another whose bad health rolls it back, span further releases.
    let first = must_change(&mut client, "v1").await;
    must_change_where(&client, &first, "v1 deployed", |change| {
        change.state == pb::ChangeState::Deployed as i32
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let second = must_change(&mut client, "v2").await;
    let change = must_change_where(&client, &second, "the automatic rollback", |change| {
        !change.rollback_id.is_empty()
    })
    .await;
    let rollback = must_rollback_end(&client, &change.rollback_id).await;
    assert_eq!(
        rollback.state,
        pb::RollbackState::Succeeded as i32,
        "{rollback:?}"
    );
    assert_eq!(
        std::fs::read_to_string(host.root.join("current/VERSION")).unwrap(),
        "v1"
    );
    let agent = host.agent.as_mut().expect("started");
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent is still running"
    );
}
