//! Whole flows the tests share: register web, deploy v1 then v2, roll back, audit.

use crate::*;

/// Starts a change of `web` to `version` on `host_ids` (empty: every host of web) and waits
/// until it is deployed.
pub async fn must_deploy_web(
    admin: &ControlServiceClient<Channel>,
    version: &str,
    host_ids: &[&str],
) -> String {
    let request = rewind_proto::v1::StartChangeRequest {
        service: "web".into(),
        version: version.into(),
        host_ids: host_ids.iter().map(|id| id.to_string()).collect(),
        reason: "test".into(),
        ..Default::default()
    };
    let change_id = admin
        .clone()
        .start_change(request)
        .await
        .unwrap()
        .into_inner()
        .change
        .unwrap()
        .change_id;
    must_change_where(admin, &change_id, "the change deployed", |change| {
        change.state == rewind_proto::v1::ChangeState::Deployed as i32
    })
    .await;
    change_id
}

/// A service with no hosts' hooks and no automatic rollback: enough to register releases of it.
pub fn plain_service(name: &str) -> rewind_proto::v1::Service {
    rewind_proto::v1::Service {
        name: name.into(),
        policy: Some(rewind_proto::v1::HealthPolicy {
            max_probe_failure_ratio: 0.5,
            for_s: 1,
            watch_s: 60,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An audit entry's outcome as a person reads it (from cluster version 5 the outcome names its
/// reason and identity by marks, each kept in its own field).
pub fn readable_outcome(entry: &rewind_proto::v1::AuditEntry) -> String {
    rewind_shared::audit::AuditEntry::try_from(entry.clone())
        .expect("an audit entry as the coordinator sends it")
        .readable_outcome()
}

/// The audit log's first 1000 entries.
pub async fn must_list_audit(
    client: &ControlServiceClient<Channel>,
) -> Vec<rewind_proto::v1::AuditEntry> {
    client
        .clone()
        .list_audit(rewind_proto::v1::ListAuditRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list the audit log")
        .into_inner()
        .entries
}

/// The cluster's own check of its audit chain, which must hold.
pub async fn must_verify_audit(
    client: &ControlServiceClient<Channel>,
) -> rewind_proto::v1::VerifyAuditResponse {
    let verification = client
        .clone()
        .verify_audit(rewind_proto::v1::VerifyAuditRequest {})
        .await
        .expect("verify the audit log")
        .into_inner();
    assert!(verification.ok, "{verification:?}");
    verification
}

/// Registers service `web` (rolled back automatically when more than half its probes fail for
/// 1 s, if `auto_rollback`) and its releases v1 and v2, digested from `host`'s release dirs.
pub async fn must_register_web(
    client: &mut ControlServiceClient<Channel>,
    host: &TestHost,
    auto_rollback: bool,
) {
    use rewind_proto::v1 as pb;
    let policy = pb::HealthPolicy {
        max_probe_failure_ratio: 0.5,
        for_s: 1,
        watch_s: 120,
        auto_rollback,
        conditions: vec![],
    };
    let service = pb::Service {
        rto_s: 0,
        freeze_windows: vec![],
        drift_policy: String::new(),
        isolate_after_failures: 0,
        name: "web".into(),
        depends_on: vec![],
        policy: Some(policy),
        synthetics: vec![],
        rollback_steps: vec![],
    };
    client
        .put_service(pb::PutServiceRequest {
            request_id: "svc".into(),
            service: Some(service),
        })
        .await
        .expect("put service");
    for version in ["v1", "v2"] {
        let artifact_digest =
            rewind_shared::digest::tree_digest(&host.root.join("releases").join(version))
                .expect("digest");
        let release = pb::Release {
            service: "web".into(),
            version: version.into(),
            artifact_digest,
            commit: "c0ffee".into(),
            registered_at_ms: 0,
            ..Default::default()
        };
        let request = pb::RegisterReleaseRequest {
            request_id: format!("release-{version}"),
            release: Some(release),
        };
        client
            .register_release(request)
            .await
            .expect("register release");
    }
}

/// Starts a change of `web` to `version` (request id `change-<version>`) and returns its id.
pub async fn must_change(client: &mut ControlServiceClient<Channel>, version: &str) -> String {
    let request = rewind_proto::v1::StartChangeRequest {
        request_id: format!("change-{version}"),
        service: "web".into(),
        version: version.into(),
        host_ids: vec![],
        reason: "test".into(),
        flags_on: vec![],
        migrations: vec![],
        break_glass: false,
    };
    client
        .start_change(request)
        .await
        .unwrap()
        .into_inner()
        .change
        .unwrap()
        .change_id
}

/// Waits until the change satisfies `done`: up to 180 s, as a loaded CI machine runs four
/// integration tests at once on two cores (60 s was once too short for an automatic rollback).
pub async fn must_change_where(
    client: &ControlServiceClient<Channel>,
    change_id: &str,
    what: &str,
    done: impl Fn(&rewind_proto::v1::Change) -> bool,
) -> rewind_proto::v1::Change {
    must_wait_async(Duration::from_secs(180), what, || {
        let mut client = client.clone();
        let change_id = change_id.to_string();
        let done = &done;
        async move {
            let change = client
                .get_change(rewind_proto::v1::GetChangeRequest { change_id })
                .await
                .ok()?
                .into_inner()
                .change?;
            done(&change).then_some(change)
        }
    })
    .await
}

/// Waits until the rollback has ended and returns it.
pub async fn must_rollback_end(
    client: &ControlServiceClient<Channel>,
    rollback_id: &str,
) -> rewind_proto::v1::Rollback {
    must_rollback_where(client, rollback_id, "the rollback to end", |rollback| {
        rewind_proto::v1::RollbackState::try_from(rollback.state)
            .is_ok_and(|state| state.is_terminal())
    })
    .await
}

/// Waits until the rollback is as `done` wants it (`what` names that), and returns it.
pub async fn must_rollback_where(
    client: &ControlServiceClient<Channel>,
    rollback_id: &str,
    what: &str,
    done: impl Fn(&rewind_proto::v1::Rollback) -> bool,
) -> rewind_proto::v1::Rollback {
    // Generous: rollbacks pass a health gate per wave, and CI is loaded.
    must_wait_async(Duration::from_secs(180), what, || {
        let mut client = client.clone();
        let rollback_id = rollback_id.to_string();
        let done = &done;
        async move {
            let rollback = client
                .get_rollback(rewind_proto::v1::GetRollbackRequest {
                    rollback_id,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .rollback?;
            done(&rollback).then_some(rollback)
        }
    })
    .await
}

/// Registers `web`, deploys v1 then v2 (ch-1, ch-2) on every host, and has the "deploy tool"
/// write v2's config on each host: the state a rollback of ch-2 must undo.
pub async fn must_deploy_v1_then_v2(
    client: &mut ControlServiceClient<Channel>,
    hosts: &[TestHost],
) {
    must_register_web(client, &hosts[0], false).await;
    for version in ["v1", "v2"] {
        let change_id = must_change(client, version).await;
        must_change_where(client, &change_id, "the change to deploy", |change| {
            change.state == rewind_proto::v1::ChangeState::Deployed as i32
        })
        .await;
    }
    must_write_v2_config(client, hosts).await;
}

/// What a deploy tool does beside the release: rewrites each host's config to v2's, and tells
/// rewind that is how the hosts should be (`host adopt`), so a rollback does not take it for a
/// hand-made change.
pub async fn must_write_v2_config(client: &mut ControlServiceClient<Channel>, hosts: &[TestHost]) {
    for host in hosts {
        std::fs::write(host.root.join("config/app.toml"), config_for("v2")).unwrap();
        let adopted = client
            .adopt_host_state(rewind_proto::v1::AdoptHostStateRequest {
                host_id: host.id.clone(),
                service: "web".into(),
                reason: "the deploy tool wrote v2's config".into(),
            })
            .await;
        match adopted {
            Ok(_) => {}
            // A coordinator of an earlier release (the mixed-version run), or a cluster below
            // version 10: no drift guard either, so nothing to tell.
            Err(status)
                if status.code() == tonic::Code::Unimplemented
                    || status.message().contains("needs cluster version") => {}
            Err(status) => panic!("adopt the config the deploy wrote: {status}"),
        }
    }
}

/// Starts a rollback of ch-2 one host at a time and waits until a step has been attempted:
/// the moment to inject a fault. Returns the rollback id.
pub async fn must_start_rollback_of_v2(client: &mut ControlServiceClient<Channel>) -> String {
    use rewind_proto::v1 as pb;
    let start = pb::StartRollbackRequest {
        request_id: "rb".into(),
        change_id: "ch-2".into(),
        reason: "bad release".into(),
        max_parallel: 1,
        ..Default::default()
    };
    let rollback_id = client
        .start_rollback(start)
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap()
        .rollback_id;
    must_wait_async(Duration::from_secs(90), "the rollback to begin", || {
        let mut client = client.clone();
        let rollback_id = rollback_id.clone();
        async move {
            let rollback = client
                .get_rollback(pb::GetRollbackRequest {
                    rollback_id,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .rollback?;
            rollback
                .steps
                .iter()
                .any(|step| step.attempts > 0)
                .then_some(())
        }
    })
    .await;
    rollback_id
}

/// After a failover: the rollback of v2 ended succeeded, every host is back on v1 having
/// restarted exactly three times (two activations, one rollback: nothing twice), and the audit
/// chain verifies.
pub async fn must_have_rolled_back_v2_once(
    client: &mut ControlServiceClient<Channel>,
    rollback_id: &str,
    hosts: &[TestHost],
) {
    use rewind_proto::v1 as pb;
    let rollback = must_rollback_end(client, rollback_id).await;
    assert_eq!(
        rollback.state,
        pb::RollbackState::Succeeded as i32,
        "{rollback:?}"
    );
    for host in hosts {
        host.must_be_restored_to_v1();
        assert_eq!(
            host.restarts(),
            3,
            "{}: two activations and one rollback restart, none twice",
            host.id
        );
    }
    let audit = client
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(audit.ok, "{audit:?}");
}

/// Puts `identity` (`agent:web-1`, `member:1`) on the access policy's deny list, as an operator
/// revoking a leaked key does; returns the policy as it was (to apply again) and the answer.
pub async fn must_deny(
    admin: &mut ControlServiceClient<Channel>,
    identity: &str,
    reason: &str,
) -> (String, rewind_proto::v1::Policy) {
    let policy = admin
        .get_policy(rewind_proto::v1::GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    let applied = admin
        .apply_policy(rewind_proto::v1::ApplyPolicyRequest {
            toml: format!("deny = [\"{identity}\"]\n{}", policy.toml),
            reason: reason.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("deny {identity}: {status}"))
        .into_inner();
    (policy.toml, applied)
}
