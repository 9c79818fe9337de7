//! The agent hands back the code pages it no longer runs (`agent/src/resident.rs`) and keeps
//! working: its resident file pages shrink after the first release, and a change and an
//! automatic rollback later run through every step, on code read back from the page cache.

use std::time::{Duration, Instant};

use rewind_proto::v1 as pb;
use rewind_tests::{
    Coordinator, TestHost, must_agents_connected, must_change, must_change_where,
    must_register_web, must_rollback_end,
};

/// The agent's resident pages of mapped files (`RssFile`), in KiB.
fn resident_file_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent runs");
    status
        .lines()
        .find_map(|line| line.strip_prefix("RssFile:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssFile in /proc/PID/status")
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
    let pid = host.agent.as_ref().expect("started").child.id();
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, 1).await;
    must_register_web(&mut client, &host, true).await;

    // Everything startup ran is resident now; the first release comes 20 s after the start.
    let after_startup = resident_file_kib(pid);
    let deadline = Instant::now() + Duration::from_secs(90);
    let released = loop {
        let now = resident_file_kib(pid);
        if now < after_startup * 3 / 4 {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "resident file pages stayed at {now} KiB (after startup: {after_startup} KiB)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("resident file pages: {after_startup} KiB after startup, {released} KiB released");

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
