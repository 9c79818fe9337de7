use std::fs;
use std::sync::atomic::{AtomicUsize, Ordering};

use rewind_proto::v1::{ActivateRelease, CaptureSnapshot, RestartService, RestoreSnapshot};

use super::*;

#[derive(Default)]
struct CountingHost {
    runs: AtomicUsize,
}

#[tonic::async_trait]
impl Host for CountingHost {
    async fn run(&self, _argv: &[String], _timeout: Duration) -> Result<(), AgentError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Fixture {
    root: tempfile::TempDir,
    _data: tempfile::TempDir,
    host: Arc<CountingHost>,
    executor: Executor,
}

fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    for version in ["v1", "v2"] {
        fs::create_dir_all(root.path().join("releases").join(version)).unwrap();
        fs::write(
            root.path().join("releases").join(version).join("VERSION"),
            version,
        )
        .unwrap();
    }
    fs::write(root.path().join("app.toml"), b"mode = 'v1'").unwrap();
    snapshot::switch_link(root.path(), "releases/v1").unwrap();
    let service = ServiceConfig {
        config_files: vec!["app.toml".into()],
        flags_file: Some("flags.json".into()),
        restart_command: vec!["restart-web".into()],
        ..ServiceConfig::bare("web", root.path())
    };
    let host = Arc::new(CountingHost::default());
    let store = Store::open(&data.path().join("store")).unwrap();
    let executor = Executor::new(store, vec![service], host.clone());
    Fixture {
        root,
        _data: data,
        host,
        executor,
    }
}

fn step(step_id: &str, term: u64, action: Action) -> StepCommand {
    StepCommand {
        cluster_id: "rw-test".into(),
        traceparent: String::new(),
        step_id: step_id.into(),
        term,
        service: "web".into(),
        timeout_ms: 10_000,
        action: Some(action),
    }
}

fn link(fixture: &Fixture) -> String {
    fs::read_link(fixture.root.path().join("current"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[tokio::test]
async fn a_step_delivered_twice_acts_once_and_answers_the_same() {
    let fixture = fixture();
    let restart = step("rb-1/restart/web-1", 1, Action::Restart(RestartService {}));
    let first = fixture.executor.execute(restart.clone()).await.unwrap();
    let second = fixture.executor.execute(restart).await.unwrap();
    assert!(first.ok && second.ok);
    assert!(!first.replayed && second.replayed);
    assert_eq!(first.detail, second.detail);
    assert_eq!(fixture.host.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_step_from_an_older_term_is_fenced_and_does_nothing() {
    let fixture = fixture();
    fixture
        .executor
        .execute(step(
            "rb-1/restore/web-1",
            5,
            Action::Restart(RestartService {}),
        ))
        .await
        .unwrap();
    let stale = fixture
        .executor
        .execute(step(
            "rb-1/restart/web-1",
            4,
            Action::Restart(RestartService {}),
        ))
        .await
        .unwrap();
    assert!(!stale.ok);
    assert!(stale.detail.contains("fenced"), "{}", stale.detail);
    assert_eq!(fixture.host.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn capture_activate_restore_round_trip() {
    let fixture = fixture();
    let captured = must_capture_then_activate_v2(&fixture).await;
    assert!(captured.snapshot_id.starts_with("snap-"));
    assert_eq!(link(&fixture), "releases/v2");
    fs::write(fixture.root.path().join("app.toml"), b"mode = 'v2'").unwrap();

    let restore = RestoreSnapshot {
        supersedes: "ch-2".into(),
        snapshot_id: captured.snapshot_id.clone(),
        refuse_drift: false,
    };
    let restored = fixture
        .executor
        .execute(step("rb-1/restore/web-1", 1, Action::Restore(restore)))
        .await
        .unwrap();
    assert!(restored.ok, "{}", restored.detail);
    assert_eq!(link(&fixture), "releases/v1");
    assert_eq!(
        fs::read(fixture.root.path().join("app.toml")).unwrap(),
        b"mode = 'v1'"
    );
}

/// Captures web (ch-2) then activates v2, both succeeding: the capture's result.
async fn must_capture_then_activate_v2(fixture: &Fixture) -> StepResult {
    let captured = fixture
        .executor
        .execute(step(
            "ch-2/capture/web-1",
            1,
            Action::Capture(CaptureSnapshot {}),
        ))
        .await
        .unwrap();
    assert!(captured.ok, "{}", captured.detail);
    let digest =
        rewind_shared::digest::tree_digest(&fixture.root.path().join("releases/v2")).unwrap();
    let activate = ActivateRelease {
        version: "v2".into(),
        artifact_digest: digest,
    };
    let activated = fixture
        .executor
        .execute(step("ch-2/activate/web-1", 1, Action::Activate(activate)))
        .await
        .unwrap();
    assert!(activated.ok, "{}", activated.detail);
    captured
}

#[tokio::test]
async fn a_restore_told_to_refuse_drift_leaves_a_hand_made_change_alone() {
    let fixture = fixture();
    let captured = must_capture_then_activate_v2(&fixture).await;
    // The activation recorded the desired state. Now a hotfix by hand.
    fs::write(fixture.root.path().join("app.toml"), b"hotfix = true").unwrap();
    let restore = |refuse_drift| {
        Action::Restore(RestoreSnapshot {
            supersedes: "ch-2".into(),
            snapshot_id: captured.snapshot_id.clone(),
            refuse_drift,
        })
    };
    // Refused, and refused again when delivered again: a refusal journals nothing.
    for _delivery in 0..2 {
        let refused = fixture
            .executor
            .execute(step("rb-1/restore/web-1", 1, restore(true)))
            .await
            .unwrap();
        assert!(!refused.ok);
        assert!(
            refused
                .detail
                .contains("changed since rewind last put it there")
                && refused.detail.contains("app.toml")
                && refused.detail.contains("Nothing was restored"),
            "{}",
            refused.detail
        );
        assert_eq!(link(&fixture), "releases/v2");
        assert_eq!(
            fs::read(fixture.root.path().join("app.toml")).unwrap(),
            b"hotfix = true"
        );
    }

    // A restore that began before (the agent stopped half-way) is finished, not refused: the
    // drift it would see may be its own half-done work.
    let begun = step("rb-2/restore/web-1", 1, restore(true));
    fixture
        .executor
        .store
        .put_journal(
            &journal_key(&begun).unwrap(),
            &JournalRecord {
                step_id: begun.step_id.clone(),
                term: 1,
                started_at_ms: 1,
                outcome: None,
                runs: 1,
            },
        )
        .unwrap();
    let finished = fixture.executor.execute(begun).await.unwrap();
    assert!(finished.ok, "{}", finished.detail);
    assert_eq!(link(&fixture), "releases/v1");
    assert_eq!(
        fs::read(fixture.root.path().join("app.toml")).unwrap(),
        b"mode = 'v1'"
    );
}

#[tokio::test]
async fn activation_refuses_a_release_whose_digest_differs() {
    let fixture = fixture();
    let activate = ActivateRelease {
        version: "v2".into(),
        artifact_digest: format!("sha256:{}", "0".repeat(64)),
    };
    let result = fixture
        .executor
        .execute(step("ch-1/activate/web-1", 1, Action::Activate(activate)))
        .await
        .unwrap();
    assert!(!result.ok);
    assert!(
        result.detail.contains("has digest sha256:"),
        "{}",
        result.detail
    );
    assert_eq!(link(&fixture), "releases/v1");
    assert_eq!(fixture.host.runs.load(Ordering::SeqCst), 0);

    let missing = ActivateRelease {
        version: "v9".into(),
        artifact_digest: String::new(),
    };
    let result = fixture
        .executor
        .execute(step("ch-3/activate/web-1", 1, Action::Activate(missing)))
        .await
        .unwrap();
    assert!(
        result
            .detail
            .contains("release v9 of web is not on this host"),
        "{}",
        result.detail
    );
}

#[tokio::test]
async fn bad_commands_fail_with_a_reason_and_change_nothing() {
    let fixture = fixture();
    let mut unknown = step("rb-1/restart/web-1", 1, Action::Restart(RestartService {}));
    unknown.service = "db".into();
    let result = fixture.executor.execute(unknown).await.unwrap();
    assert!(
        result
            .detail
            .contains("service db is not managed by this agent: managed services are web"),
        "{}",
        result.detail
    );

    let no_snapshot = step(
        "rb-2/restore/web-1",
        1,
        Action::Restore(RestoreSnapshot {
            supersedes: String::new(),
            snapshot_id: "snap-nope".into(),
            refuse_drift: false,
        }),
    );
    let result = fixture.executor.execute(no_snapshot).await.unwrap();
    assert!(
        result.detail.contains("no snapshot snap-nope"),
        "{}",
        result.detail
    );

    let empty = step("", 1, Action::Restart(RestartService {}));
    assert!(!fixture.executor.execute(empty).await.unwrap().ok);
    assert_eq!(fixture.host.runs.load(Ordering::SeqCst), 0);
    assert_eq!(link(&fixture), "releases/v1");
}

#[test]
fn flag_updates_rewrite_the_flags_file() {
    let fixture = fixture();
    let update = |flag: &str, enabled| FlagUpdate {
        service: "web".into(),
        flag: flag.into(),
        enabled,
        index: 0,
    };
    fixture
        .executor
        .set_flag(&update("new-checkout", true))
        .unwrap();
    fixture
        .executor
        .set_flag(&update("kill-switch", false))
        .unwrap();
    let flags: BTreeMap<String, bool> =
        serde_json::from_slice(&fs::read(fixture.root.path().join("flags.json")).unwrap()).unwrap();
    assert_eq!(
        flags,
        BTreeMap::from([("kill-switch".into(), false), ("new-checkout".into(), true)])
    );
    assert!(
        fixture
            .executor
            .set_flag(&update("Bad Flag", true))
            .is_err()
    );
}

#[tokio::test]
async fn a_restore_closes_its_change_so_a_late_activation_is_refused() {
    let fixture = fixture();
    let captured = fixture
        .executor
        .execute(step(
            "ch-2/capture/web-1",
            1,
            Action::Capture(CaptureSnapshot {}),
        ))
        .await
        .unwrap();
    let restore = RestoreSnapshot {
        snapshot_id: captured.snapshot_id,
        supersedes: "ch-2".into(),
        refuse_drift: false,
    };
    assert!(
        fixture
            .executor
            .execute(step("rb-1/restore/web-1", 1, Action::Restore(restore)))
            .await
            .unwrap()
            .ok
    );
    let late = ActivateRelease {
        version: "v2".into(),
        artifact_digest: String::new(),
    };
    let refused = fixture
        .executor
        .execute(step("ch-2/activate/web-1", 1, Action::Activate(late)))
        .await
        .unwrap();
    assert!(!refused.ok);
    assert!(
        refused.detail.contains("ch-2 was superseded by a rollback"),
        "{}",
        refused.detail
    );
    assert_eq!(link(&fixture), "releases/v1");
}

#[tokio::test]
async fn two_deliveries_racing_each_other_act_once() {
    let fixture = fixture();
    let restart = step("rb-1/restart/web-1", 1, Action::Restart(RestartService {}));
    let (first, second) = tokio::join!(
        fixture.executor.execute(restart.clone()),
        fixture.executor.execute(restart)
    );
    assert_eq!(fixture.host.runs.load(Ordering::SeqCst), 1);
    // Whichever came second either waited for the first (no answer) or answered from its journal.
    let acted = [first, second]
        .into_iter()
        .flatten()
        .filter(|result| !result.replayed)
        .count();
    assert_eq!(acted, 1);
}

#[tokio::test]
async fn the_same_step_id_from_another_cluster_is_a_different_step() {
    let fixture = fixture();
    let restart = step("rb-1/restart/web-1", 1, Action::Restart(RestartService {}));
    fixture.executor.execute(restart.clone()).await.unwrap();
    let other_cluster = StepCommand {
        cluster_id: "rw-other".into(),
        ..restart
    };
    let result = fixture.executor.execute(other_cluster).await.unwrap();
    assert!(result.ok && !result.replayed);
    assert_eq!(fixture.host.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_journal_counts_runs_and_a_step_cut_off_mid_way_runs_again() {
    let fixture = fixture();
    let restart = step("rb-1/restart/web-1", 1, Action::Restart(RestartService {}));
    let key = journal_key(&restart).unwrap();
    fixture.executor.execute(restart.clone()).await.unwrap();
    fixture.executor.execute(restart).await.unwrap();
    assert_eq!(
        fixture.executor.store.journal(&key).unwrap().unwrap().runs,
        1
    );

    // As if the agent died after journaling "started": the redelivery acts again, and says so.
    let cut_off = step("rb-1/restore/web-1", 1, Action::Restart(RestartService {}));
    let key = journal_key(&cut_off).unwrap();
    let unfinished = JournalRecord {
        step_id: cut_off.step_id.clone(),
        term: 1,
        started_at_ms: 1,
        outcome: None,
        runs: 1,
    };
    fixture
        .executor
        .store
        .put_journal(&key, &unfinished)
        .unwrap();
    let result = fixture.executor.execute(cut_off).await.unwrap();
    assert!(result.ok && !result.replayed);
    let record = fixture.executor.store.journal(&key).unwrap().unwrap();
    assert_eq!(record.runs, 2);
    assert!(record.outcome.is_some());
    assert_eq!(fixture.host.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn drain_and_undrain_run_their_hooks_and_a_service_without_hooks_has_nothing_to_drain() {
    use crate::config::{Hook, HookKind};
    let fixture = fixture();
    let none = fixture
        .executor
        .execute(step(
            "rb-1/web/drain/h",
            1,
            Action::Drain(Default::default()),
        ))
        .await
        .unwrap();
    assert!(none.ok, "{}", none.detail);
    assert!(none.detail.contains("nothing to drain"), "{}", none.detail);

    // A real command for drain; an HTTP undrain to a port nobody listens on.
    let marker = fixture.root.path().join("drained");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let service = ServiceConfig {
        drain: Some(Hook {
            kind: HookKind::Command {
                argv: vec!["touch".into(), marker.display().to_string()],
            },
            timeout: Duration::from_secs(5),
            grace: Duration::from_millis(50),
            sessions: None,
        }),
        undrain: Some(Hook {
            kind: HookKind::HttpPost {
                url: format!("http://127.0.0.1:{closed_port}/undrain"),
            },
            timeout: Duration::from_secs(2),
            grace: Duration::ZERO,
            sessions: None,
        }),
        ..ServiceConfig::bare("web", fixture.root.path())
    };
    let data = tempfile::tempdir().unwrap();
    let executor = Executor::new(
        Store::open(&data.path().join("store")).unwrap(),
        vec![service],
        Arc::new(crate::host::LocalHost),
    );
    let drained = executor
        .execute(step(
            "rb-2/web/drain/h",
            1,
            Action::Drain(Default::default()),
        ))
        .await
        .unwrap();
    assert!(drained.ok, "{}", drained.detail);
    assert!(marker.exists(), "the drain command ran");
    assert!(
        drained.detail.contains("waited 50 ms"),
        "{}",
        drained.detail
    );
    let undrained = executor
        .execute(step(
            "rb-2/web/undrain/h",
            1,
            Action::Undrain(Default::default()),
        ))
        .await
        .unwrap();
    assert!(!undrained.ok);
    assert!(
        undrained.detail.contains("undrain hook of web failed"),
        "{}",
        undrained.detail
    );
}
