//! Every connection is mutual TLS; identities come from certificates.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_shared::dev_ca::{DevCa, Subject};
use rewind_shared::identity::Kind;
use rewind_shared::tls::TlsFiles;
use rewind_tests::Coordinator;

#[tokio::test(flavor = "multi_thread")]
async fn clients_without_a_certificate_or_from_another_ca_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("c"));

    // No client certificate: trust the CA but present nothing.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(coordinator.tls_dir().join("ca.pem")).unwrap(),
        ))
        .domain_name("localhost");
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("https://{}", coordinator.address))
            .unwrap()
            .tls_config(tls)
            .unwrap();
    let anonymous = match endpoint
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
    {
        Ok(channel) => pb::control_service_client::ControlServiceClient::new(channel)
            .list_hosts(pb::ListHostsRequest::default())
            .await
            .err(),
        Err(error) => Some(tonic::Status::unavailable(error.to_string())),
    };
    assert!(
        anonymous.is_some(),
        "a client without a certificate got an answer"
    );

    // A certificate from a CA the coordinator does not know.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other_ca = DevCa::generate("someone else's CA").unwrap();
    other_ca.save(&other_dir).unwrap();
    let forged = other_ca
        .write_identity(&other_dir, &Subject::new(Kind::User, "operator"), &[])
        .unwrap();
    let files = TlsFiles {
        ca: coordinator.tls_dir().join("ca.pem"),
        cert: forged.cert,
        key: forged.key,
    };
    let refused = match coordinator.client_with(&files).await {
        Ok(mut client) => client
            .list_hosts(pb::ListHostsRequest::default())
            .await
            .err(),
        Err(error) => Some(tonic::Status::unavailable(error)),
    };
    assert!(
        refused.is_some(),
        "a certificate from another CA was accepted"
    );

    // The real operator certificate works, and its kind and name are the identity in the audit
    // log.
    let mut client = coordinator.must_client().await;
    let service = pb::Service {
        rto_s: 0,
        freeze_windows: vec![],
        drift_policy: String::new(),
        isolate_after_failures: 0,
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
    let audit = client
        .list_audit(pb::ListAuditRequest {
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(
        audit.last().map(|entry| entry.identity.as_str()),
        Some("user:operator")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_may_only_register_the_host_its_certificate_names() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    let mut agents = coordinator.must_agent_client("web-1").await;
    let register = pb::AgentMessage {
        body: Some(pb::agent_message::Body::Register(pb::Register {
            host_id: "web-2".into(),
            labels: None,
            services: vec![],
            agent_version: "x".into(),
        })),
    };
    let status = agents
        .session(tokio_stream::iter(vec![register]))
        .await
        .expect_err("impersonation must fail");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("may not register host \"web-2\""),
        "{}",
        status.message()
    );
}
