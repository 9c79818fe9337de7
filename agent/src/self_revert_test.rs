use std::fs;
use std::sync::Arc;

use rewind_proto::v1::{ActivateRelease, CaptureSnapshot};

use super::*;
use crate::config::{Probe, ProbeKind};
use crate::store::Store;

const MINUTE_MS: u64 = 60_000;

fn policy_service(root: &std::path::Path) -> ServiceConfig {
    ServiceConfig {
        config_files: vec!["app.toml".into()],
        self_revert: Some(SelfRevertPolicy {
            failing_for: Duration::from_secs(60),
            offline_for: Duration::from_secs(120),
        }),
        ..ServiceConfig::bare("web", root)
    }
}

#[test]
fn the_watch_waits_for_a_whole_failing_window_while_offline() {
    let root = tempfile::tempdir().unwrap();
    let service = policy_service(root.path());
    let failing = || Some("health: status 500".to_string());
    let offline_since = Some(0);

    let mut watch = Watch::default();
    // Online: never, however long it fails.
    for minute in 0..10 {
        assert!(
            watch
                .observe(&service, failing(), None, minute * MINUTE_MS)
                .is_none()
        );
    }
    let mut watch = Watch::default();
    // Offline long enough, but the failing window is only 50 s old.
    for second in [130, 150, 180] {
        assert!(
            watch
                .observe(&service, failing(), offline_since, second * 1000)
                .is_none()
        );
    }
    // A passing report ends the streak: the window starts again.
    assert!(
        watch
            .observe(&service, None, offline_since, 185_000)
            .is_none()
    );
    for second in [190, 220] {
        assert!(
            watch
                .observe(&service, failing(), offline_since, second * 1000)
                .is_none()
        );
    }
    let evidence = watch
        .observe(&service, failing(), offline_since, 250_000)
        .expect("failing for 60 s, offline for 250 s");
    assert!(
        evidence.contains("3 reports over 60 s (health: status 500)")
            && evidence.contains("no coordinator for 250 s"),
        "{evidence}"
    );
    // A service without a policy never reverts itself.
    let plain = ServiceConfig::bare("api", root.path());
    let mut watch = Watch::default();
    for minute in 0..10 {
        assert!(
            watch
                .observe(&plain, failing(), offline_since, minute * MINUTE_MS)
                .is_none()
        );
    }
}

struct Host1 {
    root: tempfile::TempDir,
    _data: tempfile::TempDir,
    executor: Executor,
}

/// web on v1 with its config, then change ch-1 captured and activated v2 through the executor.
async fn host_after_change(service: impl Fn(&std::path::Path) -> ServiceConfig) -> Host1 {
    let root = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    for version in ["v1", "v2"] {
        fs::create_dir_all(root.path().join("releases").join(version)).unwrap();
    }
    fs::write(root.path().join("app.toml"), "v1 config").unwrap();
    crate::snapshot::switch_link(root.path(), "releases/v1").unwrap();
    let executor = Executor::new(
        Store::open(&data.path().join("store")).unwrap(),
        vec![service(root.path())],
        Arc::new(crate::host::LocalHost),
    );
    for (step_id, action) in [
        ("ch-1/capture/web-1", Action::Capture(CaptureSnapshot {})),
        (
            "ch-1/activate/web-1",
            Action::Activate(ActivateRelease {
                version: "v2".into(),
                artifact_digest: String::new(),
            }),
        ),
    ] {
        let result = executor
            .execute(StepCommand {
                step_id: step_id.into(),
                term: 3,
                service: "web".into(),
                timeout_ms: 10_000,
                cluster_id: "rw-test".into(),
                traceparent: String::new(),
                action: Some(action),
            })
            .await
            .unwrap();
        assert!(result.ok, "{step_id}: {}", result.detail);
    }
    fs::write(root.path().join("app.toml"), "v2 config").unwrap();
    Host1 {
        root,
        _data: data,
        executor,
    }
}

#[tokio::test]
async fn a_self_revert_restores_the_last_known_good_state_once_and_closes_the_change() {
    let host = host_after_change(policy_service).await;
    let service = host.executor.services().next().unwrap().clone();
    let change = last_revertible_change(&host.executor, &service, "web-1")
        .unwrap()
        .expect("ch-1 is activated here and its capture was healthy");
    assert_eq!(change.change_id, "ch-1");
    assert_eq!(change.cluster_id, "rw-test");

    let record = revert(
        &host.executor,
        &service,
        "web-1",
        change,
        "probes failing".into(),
        1_000,
        2_000,
        &|| true,
    )
    .await
    .unwrap()
    .expect("offline: it reverts");
    assert!(record.ok, "{}", record.detail);
    assert_eq!(
        fs::read_link(host.root.path().join("current")).unwrap(),
        std::path::Path::new("releases/v1")
    );
    assert_eq!(
        fs::read_to_string(host.root.path().join("app.toml")).unwrap(),
        "v1 config"
    );
    assert_eq!(
        host.executor.store().self_reverts().unwrap(),
        vec![record.clone()]
    );

    // Once: the change is closed, so there is nothing left to revert, and a late activation
    // of it from a coordinator is refused.
    assert_eq!(
        last_revertible_change(&host.executor, &service, "web-1").unwrap(),
        None
    );
    let late = host
        .executor
        .execute(StepCommand {
            step_id: "ch-1/activate/web-1".into(),
            term: 4,
            service: "web".into(),
            timeout_ms: 10_000,
            cluster_id: "rw-test".into(),
            traceparent: String::new(),
            action: Some(Action::Activate(ActivateRelease {
                version: "v2".into(),
                artifact_digest: String::new(),
            })),
        })
        .await
        .unwrap();
    assert!(
        !late.ok && late.detail.contains("superseded"),
        "{}",
        late.detail
    );

    // Reported and recorded: forgotten.
    host.executor
        .store()
        .forget_self_revert(&record.id)
        .unwrap();
    assert!(host.executor.store().self_reverts().unwrap().is_empty());
}

#[tokio::test]
async fn no_self_revert_to_a_state_that_was_not_healthy_when_captured() {
    let host = host_after_change(|root| ServiceConfig {
        probes: vec![Probe {
            name: "always-down".into(),
            kind: ProbeKind::Command {
                argv: vec!["false".into()],
            },
            timeout: Duration::from_secs(2),
        }],
        ..policy_service(root)
    })
    .await;
    let service = host.executor.services().next().unwrap().clone();
    assert_eq!(
        last_revertible_change(&host.executor, &service, "web-1").unwrap(),
        None,
        "the snapshot before ch-1 had a failing probe: not a last known good state"
    );
}

#[tokio::test]
async fn a_self_revert_that_finds_the_coordinator_back_does_nothing() {
    let host = host_after_change(policy_service).await;
    let service = host.executor.services().next().unwrap().clone();
    let change = last_revertible_change(&host.executor, &service, "web-1")
        .unwrap()
        .unwrap();
    let outcome = revert(
        &host.executor,
        &service,
        "web-1",
        change,
        "probes failing".into(),
        1_000,
        2_000,
        &|| false,
    )
    .await
    .unwrap();
    assert_eq!(outcome, None);
    assert_eq!(
        fs::read_link(host.root.path().join("current")).unwrap(),
        std::path::Path::new("releases/v2"),
        "left to the coordinator"
    );
    assert!(
        last_revertible_change(&host.executor, &service, "web-1")
            .unwrap()
            .is_some(),
        "the change stays open"
    );
}
