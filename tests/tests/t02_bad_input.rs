//! Bad input over gRPC gets a clear status naming what is wrong, and changes nothing.

use rewind_proto::v1 as pb;
use rewind_tests::Coordinator;
use tonic::Code;

fn release(service: &str, version: &str, digest: &str) -> pb::RegisterReleaseRequest {
    pb::RegisterReleaseRequest {
        request_id: String::new(),
        release: Some(pb::Release {
            service: service.into(),
            version: version.into(),
            artifact_digest: digest.into(),
            commit: String::new(),
            registered_at_ms: 0,
            ..Default::default()
        }),
    }
}

fn assert_status<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    message_start: &str,
) {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().starts_with(message_start),
        "expected a message starting {message_start:?}, got {:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_with_the_field_named_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    let mut client = coordinator.must_client().await;
    let digest = format!("sha256:{}", "ab".repeat(32));
    let service = pb::Service {
        name: "web".into(),
        depends_on: vec![],
        policy: None,
        synthetics: vec![],
        rollback_steps: Vec::new(),
    };
    client
        .put_service(pb::PutServiceRequest {
            request_id: String::new(),
            service: Some(service),
        })
        .await
        .unwrap();
    client
        .register_release(release("web", "v1", &digest))
        .await
        .unwrap();
    let audit_before = client
        .list_audit(pb::ListAuditRequest {
            from_index: 1,
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner();

    assert_status(
        client
            .put_service(pb::PutServiceRequest {
                request_id: String::new(),
                service: None,
            })
            .await,
        Code::InvalidArgument,
        "service: is required",
    );
    let unnamed = pb::Service {
        name: String::new(),
        depends_on: vec![],
        policy: None,
        synthetics: vec![],
        rollback_steps: Vec::new(),
    };
    assert_status(
        client
            .put_service(pb::PutServiceRequest {
                request_id: String::new(),
                service: Some(unnamed),
            })
            .await,
        Code::InvalidArgument,
        "service.name: must not be empty",
    );
    let bad_policy = pb::Service {
        name: "api".into(),
        depends_on: vec![],
        policy: Some(pb::HealthPolicy {
            max_probe_failure_ratio: 3.0,
            for_s: 1,
            watch_s: 1,
            auto_rollback: true,
            ..Default::default()
        }),
        synthetics: vec![],
        rollback_steps: Vec::new(),
    };
    assert_status(
        client
            .put_service(pb::PutServiceRequest {
                request_id: String::new(),
                service: Some(bad_policy),
            })
            .await,
        Code::InvalidArgument,
        "service.policy.max_probe_failure_ratio",
    );
    let condition = |condition: pb::PolicyCondition| pb::PutServiceRequest {
        request_id: String::new(),
        service: Some(pb::Service {
            name: "api".into(),
            depends_on: vec![],
            policy: Some(pb::HealthPolicy {
                max_probe_failure_ratio: 0.5,
                for_s: 1,
                watch_s: 60,
                auto_rollback: true,
                conditions: vec![condition],
            }),
            synthetics: vec![],
            rollback_steps: Vec::new(),
        }),
    };
    let error_ratio = pb::HealthFigure::ErrorRatio as i32;
    for (bad, expected) in [
        (
            pb::PolicyCondition {
                figure: 0,
                threshold: 0.1,
                for_s: 5,
                ..Default::default()
            },
            "service.policy.conditions[0].figure",
        ),
        (
            pb::PolicyCondition {
                figure: error_ratio,
                threshold: 1.5,
                for_s: 5,
                ..Default::default()
            },
            "service.policy.conditions[0].threshold: is 1.5; as a ratio it must be within 0..=1",
        ),
        (
            pb::PolicyCondition {
                figure: error_ratio,
                threshold: 0.0,
                relative_to_baseline: true,
                for_s: 5,
            },
            "service.policy.conditions[0].threshold: is 0; as a multiple of the baseline",
        ),
        (
            pb::PolicyCondition {
                figure: error_ratio,
                threshold: 0.1,
                for_s: 0,
                ..Default::default()
            },
            "service.policy.conditions[0].for_s: is 0, must be within 1..=3600 s",
        ),
    ] {
        assert_status(
            client.put_service(condition(bad)).await,
            Code::InvalidArgument,
            expected,
        );
    }
    let synthetic = |check: pb::SyntheticCheck| pb::PutServiceRequest {
        request_id: String::new(),
        service: Some(pb::Service {
            name: "api".into(),
            depends_on: vec![],
            policy: None,
            synthetics: vec![check],
            rollback_steps: Vec::new(),
        }),
    };
    for (check, expected) in [
        (
            pb::SyntheticCheck {
                name: "login".into(),
                url: "https://x".into(),
                ..Default::default()
            },
            "service.synthetics[login].url",
        ),
        (
            pb::SyntheticCheck {
                name: "login".into(),
                url: "http://x".into(),
                method: "DELETE".into(),
                ..Default::default()
            },
            "service.synthetics[login].method: \"DELETE\" is not GET or POST",
        ),
        (
            pb::SyntheticCheck {
                name: "login".into(),
                url: "http://x".into(),
                expect_status: 99,
                ..Default::default()
            },
            "service.synthetics[login].expect_status: 99 is not an HTTP status",
        ),
        (
            pb::SyntheticCheck {
                name: "login".into(),
                url: "http://x".into(),
                max_latency_ms: 70_000,
                ..Default::default()
            },
            "service.synthetics[login].max_latency_ms: is 70000",
        ),
    ] {
        assert_status(
            client.put_service(synthetic(check)).await,
            Code::InvalidArgument,
            expected,
        );
    }
    let mut needs_bad_provider = release("web", "v9", &digest);
    if let Some(release) = needs_bad_provider.release.as_mut() {
        release.requires.insert("Not A Name".into(), 2);
    }
    assert_status(
        client.register_release(needs_bad_provider).await,
        Code::InvalidArgument,
        "release.requires:",
    );

    assert_status(
        client
            .register_release(release("web", "v 2", &digest))
            .await,
        Code::InvalidArgument,
        "release.version:",
    );
    assert_status(
        client
            .register_release(release("web", "v2", "md5:abc"))
            .await,
        Code::InvalidArgument,
        "release.artifact_digest:",
    );
    assert_status(
        client
            .register_release(release("nope", "v2", &digest))
            .await,
        Code::NotFound,
        "no service nope: known services are web",
    );
    assert_status(
        client
            .register_release(release("web", "v1", &format!("sha256:{}", "cd".repeat(32))))
            .await,
        Code::AlreadyExists,
        "release web v1 is already registered",
    );

    let change = |service: &str, version: &str| pb::StartChangeRequest {
        break_glass: false,
        request_id: String::new(),
        service: service.into(),
        version: version.into(),
        host_ids: vec![],
        reason: String::new(),
        flags_on: vec![],
        migrations: vec![],
    };
    assert_status(
        client.start_change(change("web", "v9")).await,
        Code::NotFound,
        "no release v9 of service web: known versions are v1",
    );
    assert_status(
        client.start_change(change("", "v1")).await,
        Code::InvalidArgument,
        "service: must not be empty",
    );
    assert_status(
        client.start_change(change("web", "v1")).await,
        Code::FailedPrecondition,
        "no registered host runs service web",
    );
    let mut with_ghost = change("web", "v1");
    with_ghost.host_ids = vec!["ghost".into()];
    assert_status(
        client.start_change(with_ghost).await,
        Code::NotFound,
        "no host ghost is registered",
    );

    assert_status(
        client
            .get_change(pb::GetChangeRequest {
                change_id: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "change_id: must not be empty",
    );
    assert_status(
        client
            .get_change(pb::GetChangeRequest {
                change_id: "banana".into(),
            })
            .await,
        Code::InvalidArgument,
        "change_id: \"banana\" is not an id like ch-12",
    );
    assert_status(
        client
            .get_change(pb::GetChangeRequest {
                change_id: "ch-99".into(),
            })
            .await,
        Code::NotFound,
        "no change ch-99: known changes are none",
    );
    assert_status(
        client
            .get_rollback(pb::GetRollbackRequest {
                rollback_id: "rb-4".into(),
            })
            .await,
        Code::NotFound,
        "no rollback rb-4",
    );

    let rollback = |change_id: &str, reason: String| pb::StartRollbackRequest {
        request_id: String::new(),
        change_id: change_id.into(),
        reason,
        max_parallel: 0,
        ..Default::default()
    };
    assert_status(
        client.start_rollback(rollback("rb-1", String::new())).await,
        Code::InvalidArgument,
        "selection.change_ids: \"rb-1\" is not an id like ch-12",
    );
    let mut bad_options = rollback("ch-1", String::new());
    bad_options.options = Some(pb::PlanOptions {
        gate: Some(pb::GateOptions {
            tolerance: 2.0,
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_status(
        client.start_rollback(bad_options).await,
        Code::InvalidArgument,
        "options.gate.tolerance: is 2, must be within 0..=1",
    );
    let mut unexplained = rollback("ch-1", String::new());
    unexplained.options = Some(pb::PlanOptions {
        accept_data_loss: " x ".into(),
        ..Default::default()
    });
    assert_status(
        client.start_rollback(unexplained).await,
        Code::InvalidArgument,
        "options.accept_data_loss: say why losing that data is acceptable",
    );
    let mut bad_migration = change("web", "v1");
    bad_migration.migrations = vec!["orders-0042".into()];
    assert_status(
        client.start_change(bad_migration).await,
        Code::InvalidArgument,
        "migrations: \"orders-0042\" is not database@version",
    );
    assert_status(
        client
            .list_schema_txns(pb::ListSchemaTxnsRequest {
                txn_id: "tx-1".into(),
                detailed: false,
            })
            .await,
        Code::InvalidArgument,
        "txn_id: \"tx-1\" is not an id like st-12",
    );
    assert_status(
        client
            .list_schema_txns(pb::ListSchemaTxnsRequest {
                txn_id: "st-9".into(),
                detailed: true,
            })
            .await,
        Code::NotFound,
        "no schema transaction st-9",
    );
    assert_status(
        client
            .list_changes(pb::ListChangesRequest {
                limit: 1001,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "limit: is 1001, at most 1000 are returned at once",
    );
    assert_status(
        client
            .list_rollbacks(pb::ListRollbacksRequest {
                limit: 0,
                before: "ch-3".into(),
            })
            .await,
        Code::InvalidArgument,
        "before: \"ch-3\" is not an id like rb-12",
    );
    let by_hand = |txn_id: &str, host_id: &str, reason: &str| pb::ResolvedByHandRequest {
        request_id: String::new(),
        txn_id: txn_id.into(),
        host_id: host_id.into(),
        reason: reason.into(),
    };
    for (request, expected) in [
        (
            by_hand("tx-1", "db-1", "done"),
            "txn_id: \"tx-1\" is not an id like st-12",
        ),
        (by_hand("st-1", "bad host", "done"), "host_id:"),
        (
            by_hand("st-1", "db-1", " "),
            "reason: say what was done to the shard",
        ),
        (
            by_hand("st-9", "db-1", "done"),
            "txn_id: no schema transaction st-9",
        ),
    ] {
        assert_status(
            client.resolved_by_hand(request).await,
            Code::InvalidArgument,
            expected,
        );
    }
    assert_status(
        client
            .get_drill(pb::GetDrillRequest {
                drill_id: "dr-9".into(),
            })
            .await,
        Code::NotFound,
        "no drill dr-9",
    );
    assert_status(
        client
            .start_drill(pb::StartDrillRequest {
                request_id: String::new(),
                change_id: "ch-9".into(),
                environment: "staging".into(),
            })
            .await,
        Code::InvalidArgument,
        "change_id: no change ch-9",
    );
    assert_status(
        client
            .start_drill(pb::StartDrillRequest {
                request_id: String::new(),
                change_id: "ch-1".into(),
                environment: "bad env".into(),
            })
            .await,
        Code::InvalidArgument,
        "environment:",
    );
    let mut bad_hash = rollback("ch-1", String::new());
    bad_hash.plan_hash = "md5:abc".into();
    assert_status(
        client.start_rollback(bad_hash).await,
        Code::InvalidArgument,
        "plan_hash:",
    );
    assert_status(
        client
            .plan_rollback(pb::PlanRollbackRequest {
                selection: Some(pb::RollbackSelection {
                    services: vec!["nope".into()],
                    ..Default::default()
                }),
                options: None,
            })
            .await,
        Code::NotFound,
        "no service nope",
    );
    assert_status(
        client
            .skip_host(pb::RollbackActionRequest {
                rollback_id: "rb-1".into(),
                host_id: "web-1".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "reason: say why the host is left unreverted",
    );
    assert_status(
        client
            .start_rollback(rollback("ch-1", "x".repeat(2000)))
            .await,
        Code::InvalidArgument,
        "reason: is 2000 bytes, at most 1024",
    );
    let mut spaced = rollback("ch-1", String::new());
    spaced.request_id = "has space".into();
    assert_status(
        client.start_rollback(spaced).await,
        Code::InvalidArgument,
        "request_id: \"has space\" contains ' '",
    );
    let mut spaced = change("web", "v1");
    spaced.request_id = "has space".into();
    assert_status(
        client.start_change(spaced).await,
        Code::InvalidArgument,
        "request_id:",
    );
    assert_status(
        client
            .list_audit(pb::ListAuditRequest {
                from_index: 1,
                limit: 5000,
            })
            .await,
        Code::InvalidArgument,
        "limit: is 5000",
    );

    // A message over the 4 MiB limit is refused before any handler sees it.
    let oversize = client
        .start_rollback(rollback("ch-1", "x".repeat(5 * 1024 * 1024)))
        .await
        .expect_err("oversize");
    assert!(
        matches!(oversize.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{oversize:?}"
    );

    let error_code = client
        .get_change(pb::GetChangeRequest {
            change_id: "ch-99".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        error_code
            .metadata()
            .get("rewind-error-code")
            .and_then(|value| value.to_str().ok()),
        Some("unknown_change")
    );

    // A page token is the last host id of the previous page: anything else is named.
    assert_status(
        client
            .list_hosts(pb::ListHostsRequest {
                page_token: "Web 1!".into(),
                page_size: 0,
            })
            .await,
        Code::InvalidArgument,
        "page_token",
    );

    let audit_after = client
        .list_audit(pb::ListAuditRequest {
            from_index: 1,
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        audit_before, audit_after,
        "rejected requests must not change the state or its audit log"
    );
    let services = client
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .services;
    assert_eq!(services.len(), 1);
}
