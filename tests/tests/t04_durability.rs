//! What was acknowledged survives a kill -9 of the coordinator.

use rewind_proto::v1 as pb;
use rewind_tests::Coordinator;

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_writes_survive_kill_9_and_the_audit_chain_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = Coordinator::must_start(dir.path());
    let mut client = coordinator.must_client().await;
    for index in 0..20 {
        let service = pb::Service {
            rto_s: 0,
            freeze_windows: vec![],
            drift_policy: String::new(),
            isolate_after_failures: 0,
            name: format!("svc-{index}"),
            depends_on: vec![],
            policy: None,
            synthetics: vec![],
            rollback_steps: Vec::new(),
        };
        client
            .put_service(pb::PutServiceRequest {
                request_id: format!("put-{index}"),
                service: Some(service),
            })
            .await
            .unwrap();
    }
    let before = client
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    coordinator.process.kill();

    let coordinator = Coordinator::must_start(dir.path());
    let mut client = coordinator.must_client().await;
    let services = client
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .services;
    assert_eq!(services.len(), 20, "every acknowledged write is back");
    let after = client
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(after.ok, "{after:?}");
    assert_eq!(after.head_hash, before.head_hash);

    // A retried request id from before the crash still does not act twice.
    let service = pb::Service {
        rto_s: 0,
        freeze_windows: vec![],
        drift_policy: String::new(),
        isolate_after_failures: 0,
        name: "svc-0".into(),
        depends_on: vec!["svc-1".into()],
        policy: None,
        synthetics: vec![],
        rollback_steps: Vec::new(),
    };
    client
        .put_service(pb::PutServiceRequest {
            request_id: "put-0".into(),
            service: Some(service),
        })
        .await
        .unwrap();
    let services = client
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .services;
    assert!(
        services
            .iter()
            .find(|service| service.name == "svc-0")
            .unwrap()
            .depends_on
            .is_empty()
    );
}
