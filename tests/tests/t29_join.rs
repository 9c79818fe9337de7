//! Joining without the CA key, over real mutual TLS against a real coordinator: one-time tokens
//! scoped to a kind, a name pattern and an environment; certificates signed by the members'
//! issuing CA for keys made by their holders; bounded lifetimes renewed without a restart, on
//! agents, people and the coordinator itself.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_proto::v1::join_service_client::JoinServiceClient;
use rewind_shared::identity::{Kind, PeerIdentity, certificate_identity};
use rewind_shared::member_tls::pem_certificates;
use rewind_shared::pki::{Subject, make_csr};
use rewind_shared::tls::TlsFiles;
use rewind_tests::{
    Coordinator, TestHost, anonymous_channel, must_agents_connected, must_wait, run_ok,
};
use tonic::Code;

/// The identity of the certificate in `path`, and how many certificates the file chains.
fn certificate_in(path: &Path) -> (PeerIdentity, usize) {
    let chain = pem_certificates(path).unwrap();
    (
        certificate_identity(chain[0].as_ref()).unwrap(),
        chain.len(),
    )
}

async fn create_token(
    admin: &mut pb::control_service_client::ControlServiceClient<tonic::transport::Channel>,
    request: pb::CreateJoinTokenRequest,
) -> String {
    admin
        .create_join_token(pb::CreateJoinTokenRequest {
            reason: "t29".into(),
            ..request
        })
        .await
        .expect("create a join token")
        .into_inner()
        .token
}

/// Joins as `subject` with `token` over a connection without a certificate.
async fn join_as(
    coordinator: &Coordinator,
    token: &str,
    subject: &Subject,
) -> Result<pb::IssuedCertificate, tonic::Status> {
    let channel = anonymous_channel(&coordinator.tls_dir().join("ca.pem"), &coordinator.address)
        .await
        .unwrap();
    let (csr_pem, _key) = make_csr(subject, &[]).unwrap();
    JoinServiceClient::new(channel)
        .join(pb::JoinRequest {
            token: token.to_string(),
            csr_pem,
        })
        .await
        .map(tonic::Response::into_inner)
}

fn must_refuse(result: Result<pb::IssuedCertificate, tonic::Status>, code: Code, why: &str) {
    match result {
        Ok(issued) => panic!(
            "expected {code:?} ({why}), got a certificate for {}",
            issued.identity
        ),
        Err(status) => {
            assert_eq!(status.code(), code, "{}", status.message());
            assert!(
                status.message().contains(why),
                "{:?} does not say {why:?}",
                status.message()
            );
        }
    }
}

/// Makes `host`'s agent start without a certificate: it must join with `token` for `environment`.
fn must_join_on_first_start(host: &TestHost, tls_dir: &Path, token: &str, environment: &str) {
    let files = TlsFiles::in_dir(tls_dir, &host.id);
    let _ = std::fs::remove_file(&files.cert);
    let _ = std::fs::remove_file(&files.key);
    let token_file = host.config_path.with_file_name("join-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let config = std::fs::read_to_string(&host.config_path).unwrap();
    let config = format!(
        "join-token-file = \"{}\"\n{}",
        token_file.display(),
        config.replace(
            "[labels]\n",
            &format!("[labels]\nenvironment = \"{environment}\"\n")
        )
    );
    std::fs::write(&host.config_path, config).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_joins_with_a_token_and_renews_before_expiry_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator =
        Coordinator::must_start_with(dir.path(), "[issuer]\nagent-lifetime = \"45s\"\n");
    let mut admin = coordinator.must_client().await;
    let token = create_token(
        &mut admin,
        pb::CreateJoinTokenRequest {
            kind: "agent".into(),
            name_pattern: "web-*".into(),
            environment: "prod".into(),
            ttl_s: 600,
            reason: "test".into(),
            ..Default::default()
        },
    )
    .await;
    let mut host = TestHost::must_prepare(dir.path(), "web-1", &coordinator);
    must_join_on_first_start(&host, &coordinator.tls_dir(), &token, "prod");
    host.must_start_agent();
    must_agents_connected(&admin, 1).await;

    // Its key was made on the host; the cluster's issuing CA signed it, for 45 s.
    let files = TlsFiles::in_dir(&coordinator.tls_dir(), "web-1");
    let (first, chain) = certificate_in(&files.cert);
    assert_eq!(first.principal(), "agent:web-1");
    assert_eq!(chain, 2, "the leaf and the issuing CA");
    assert!(first.not_after_s - first.not_before_s <= 45 + 300 + 5);
    let hosts = admin
        .list_hosts(pb::ListHostsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert_eq!(
        hosts[0]
            .labels
            .as_ref()
            .map(|labels| labels.environment.as_str()),
        Some("prod"),
        "{hosts:?}"
    );

    // One use: the token is spent.
    must_refuse(
        join_as(&coordinator, &token, &Subject::new(Kind::Agent, "web-2")).await,
        Code::PermissionDenied,
        "the token is used",
    );
    let listed = admin
        .list_join_tokens(pb::ListJoinTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(listed[0].used_by, ["agent:web-1"]);
    assert_eq!(listed[0].status, "used");

    // With a third of its life left the agent renews, still running.
    let renewed = must_wait(Duration::from_secs(60), "the agent to renew", || {
        let (identity, _) = certificate_in(&files.cert);
        (identity.not_after_s > first.not_after_s).then_some(identity)
    });
    assert_eq!(renewed.principal(), "agent:web-1");
    // Not before two thirds of its life: both are back-dated alike, so their starts differ by
    // how long the first one served.
    assert!(
        renewed.not_before_s - first.not_before_s >= 29,
        "renewed after {} s of a 45 s life",
        renewed.not_before_s - first.not_before_s
    );
    // Once the first certificate has expired, only the renewed one can connect: restart the
    // coordinator so the agent must, and it comes back without having been restarted.
    must_wait(
        Duration::from_secs(60),
        "the first certificate to expire",
        || (rewind_shared::time::now_s() > first.not_after_s + 1).then_some(()),
    );
    coordinator.must_restart();
    let admin = coordinator.must_client().await;
    must_agents_connected(&admin, 1).await;
    assert!(
        host.agent
            .as_mut()
            .unwrap()
            .child
            .try_wait()
            .unwrap()
            .is_none(),
        "the agent kept running"
    );
    let audit = rewind_tests::must_list_audit(&admin).await;
    assert!(
        audit
            .iter()
            .any(|entry| entry.action == "certificate.renew" && entry.identity == "agent:web-1"),
        "the renewal is audited"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn joins_outside_a_tokens_scope_or_life_are_refused_naming_why() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    let mut admin = coordinator.must_client().await;
    let alice_token = create_token(
        &mut admin,
        pb::CreateJoinTokenRequest {
            kind: "user".into(),
            name_pattern: "alice".into(),
            groups: vec!["sre".into()],
            reason: "test".into(),
            ..Default::default()
        },
    )
    .await;
    let alice = Subject::new(Kind::User, "alice");

    must_refuse(
        join_as(&coordinator, "nonsense", &alice).await,
        Code::InvalidArgument,
        "token",
    );
    let (id, _) = alice_token.split_once('.').unwrap();
    must_refuse(
        join_as(&coordinator, &format!("{id}.{}", "0".repeat(64)), &alice).await,
        Code::PermissionDenied,
        "the secret does not match",
    );
    must_refuse(
        join_as(
            &coordinator,
            &alice_token,
            &Subject::new(Kind::Agent, "alice"),
        )
        .await,
        Code::PermissionDenied,
        "for user certificates, not agent",
    );
    must_refuse(
        join_as(&coordinator, &alice_token, &Subject::new(Kind::User, "bob")).await,
        Code::PermissionDenied,
        "allows names \"alice\", not \"bob\"",
    );
    let channel = anonymous_channel(&coordinator.tls_dir().join("ca.pem"), &coordinator.address)
        .await
        .unwrap();
    let garbage = JoinServiceClient::new(channel.clone())
        .join(pb::JoinRequest {
            token: alice_token.clone(),
            csr_pem:
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
        })
        .await
        .map(tonic::Response::into_inner);
    must_refuse(garbage, Code::InvalidArgument, "csr_pem");

    // None of that used it up: alice joins, with the token's groups, not her CSR's.
    let issued = join_as(
        &coordinator,
        &alice_token,
        &alice.clone().with_groups(&["admins"]),
    )
    .await
    .expect("alice joins");
    assert_eq!(issued.identity, "user:alice");
    let leaf = rustls::pki_types::CertificateDer::from(
        pem_certificates_of(&issued.certificate_chain_pem)[0].clone(),
    );
    assert_eq!(certificate_identity(leaf.as_ref()).unwrap().groups, ["sre"]);
    must_refuse(
        join_as(&coordinator, &alice_token, &alice).await,
        Code::PermissionDenied,
        "the token is used",
    );

    // A pattern does not reach names already taken: web-1 joined (with a token for it), so a
    // token for web-* cannot mint another web-1.
    let exact = create_token(
        &mut admin,
        pb::CreateJoinTokenRequest {
            kind: "agent".into(),
            name_pattern: "web-1".into(),
            reason: "test".into(),
            ..Default::default()
        },
    )
    .await;
    join_as(&coordinator, &exact, &Subject::new(Kind::Agent, "web-1"))
        .await
        .expect("web-1 joins");
    let pattern = create_token(
        &mut admin,
        pb::CreateJoinTokenRequest {
            kind: "agent".into(),
            name_pattern: "web-*".into(),
            environment: "staging".into(),
            uses: 5,
            reason: "test".into(),
            ..Default::default()
        },
    )
    .await;
    must_refuse(
        join_as(&coordinator, &pattern, &Subject::new(Kind::Agent, "web-1")).await,
        Code::PermissionDenied,
        "agent web-1 exists already",
    );
    join_as(&coordinator, &pattern, &Subject::new(Kind::Agent, "web-2"))
        .await
        .expect("a new name joins with the pattern");

    // Past its life, or revoked, a token admits nobody.
    let short = create_token(
        &mut admin,
        pb::CreateJoinTokenRequest {
            kind: "agent".into(),
            name_pattern: "web-*".into(),
            ttl_s: 1,
            reason: "test".into(),
            ..Default::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    must_refuse(
        join_as(&coordinator, &short, &Subject::new(Kind::Agent, "web-1")).await,
        Code::PermissionDenied,
        "the token is expired",
    );
    let revoked = create_token(
        &mut admin,
        pb::CreateJoinTokenRequest {
            kind: "agent".into(),
            name_pattern: "web-*".into(),
            reason: "test".into(),
            ..Default::default()
        },
    )
    .await;
    admin
        .revoke_join_token(pb::RevokeJoinTokenRequest {
            token_id: revoked.split_once('.').unwrap().0.into(),
            reason: "leaked in a chat".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    must_refuse(
        join_as(&coordinator, &revoked, &Subject::new(Kind::Agent, "web-1")).await,
        Code::PermissionDenied,
        "the token is revoked",
    );

    // A token's scope is checked when it is made, too.
    for (request, field) in [
        (("robot", "x", ""), "kind"),
        (("agent", "", ""), "name_pattern"),
        (("agent", "Web!", ""), "name_pattern"),
        (("user", "alice", "prod"), "environment"),
        (("member", "4", ""), "kind"),
        (("user", "a*", ""), "exactly one identity"),
    ] {
        let ((kind, name_pattern, environment), field) = (request, field);
        let status = admin
            .create_join_token(pb::CreateJoinTokenRequest {
                kind: kind.into(),
                name_pattern: name_pattern.into(),
                environment: environment.into(),
                reason: "test".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(status.message().contains(field), "{}", status.message());
    }
}

fn pem_certificates_of(pem: &str) -> Vec<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|der| der.unwrap().to_vec())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_that_joined_for_prod_cannot_register_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    let mut admin = coordinator.must_client().await;
    let token = create_token(
        &mut admin,
        pb::CreateJoinTokenRequest {
            kind: "agent".into(),
            name_pattern: "db-1".into(),
            environment: "prod".into(),
            reason: "test".into(),
            ..Default::default()
        },
    )
    .await;
    let mut host = TestHost::must_prepare(dir.path(), "db-1", &coordinator);
    must_join_on_first_start(&host, &coordinator.tls_dir(), &token, "staging");
    host.must_start_agent();
    let log = host.config_path.with_file_name("agent.log");
    must_wait(
        Duration::from_secs(30),
        "the registration to be refused",
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("joined for environment")
                .then_some(())
        },
    );
    let hosts = admin
        .list_hosts(pb::ListHostsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert!(hosts.is_empty(), "{hosts:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_person_joins_and_renews_with_rewindctl_and_a_revoked_one_cannot_renew() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    let created = run_ok(&coordinator.rewindctl(&[
        "join-token",
        "create",
        "--kind",
        "user",
        "--name",
        "carol",
        "--ttl",
        "5m",
        "--reason",
        "carol joins",
    ]));
    let zero = coordinator.rewindctl(&[
        "join-token",
        "create",
        "--kind",
        "user",
        "--name",
        "carol",
        "--ttl",
        "0s",
        "--reason",
        "carol joins",
    ]);
    assert!(
        !zero.status.success()
            && String::from_utf8_lossy(&zero.stderr).contains("at least a second"),
        "{zero:?}"
    );
    let token_file = dir.path().join("carol-token");
    std::fs::write(&token_file, created.trim()).unwrap();
    // Carol's own directory: the cluster's CA (public) and nothing else.
    let home = dir.path().join("carol");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::copy(coordinator.tls_dir().join("ca.pem"), home.join("ca.pem")).unwrap();
    let as_carol = |args: &[&str]| {
        std::process::Command::new(rewind_tests::must_binary("rewindctl"))
            .args(["--coordinator", &coordinator.address, "--identity", "carol"])
            .args(["--tls-dir", home.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    };
    run_ok(&as_carol(&[
        "cert",
        "join",
        "--token-file",
        token_file.to_str().unwrap(),
    ]));
    let files = TlsFiles::in_dir(&home, "carol");
    let (joined, _) = certificate_in(&files.cert);
    assert_eq!(joined.principal(), "user:carol");
    // Her certificate names her: with no binding she is refused, by name.
    let refused = as_carol(&["fleet", "list"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("user:carol"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    run_ok(&as_carol(&["cert", "renew"]));
    let (renewed, _) = certificate_in(&files.cert);
    assert_eq!(renewed.principal(), "user:carol");
    assert!(renewed.not_after_s > joined.not_after_s);

    // A certificate renews only itself.
    let channel = rewind_tests::tls_channel(&files, &coordinator.address)
        .await
        .unwrap();
    let (csr_pem, _) = make_csr(&Subject::new(Kind::User, "operator"), &[]).unwrap();
    let status = JoinServiceClient::new(channel.clone())
        .renew(pb::RenewRequest { csr_pem })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("only its own"),
        "{}",
        status.message()
    );

    // Revoked through the policy's deny list: no renewal.
    let mut admin = coordinator.must_client().await;
    rewind_tests::must_deny(&mut admin, "user:carol", "carol left").await;
    let refused = as_carol(&["cert", "renew"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("deny list"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_coordinator_serves_its_renewed_certificate_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    let mut admin = coordinator.must_client().await;
    let served = || async {
        let mut roots = rustls::RootCertStore::empty();
        for ca in pem_certificates(&coordinator.tls_dir().join("ca.pem")).unwrap() {
            roots.add(ca).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(&coordinator.address)
            .await
            .unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        certificate_identity(leaf.as_ref()).unwrap().not_after_s
    };
    let before = served().await;
    // Renewed in place, as an operator's PKI tooling would: a shorter life tells them apart.
    let files = coordinator
        .ca()
        .write_identity_for(
            &coordinator.tls_dir(),
            &Subject::member(1, "coordinator"),
            &["localhost", "127.0.0.1"],
            3 * 86_400,
        )
        .unwrap();
    let (renewed, _) = certificate_in(&files.cert);
    assert_ne!(renewed.not_after_s, before);
    let mut now_served = 0;
    for _ in 0..40 {
        now_served = served().await;
        if now_served == renewed.not_after_s {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        now_served, renewed.not_after_s,
        "the new certificate is served"
    );
    admin
        .list_hosts(pb::ListHostsRequest::default())
        .await
        .expect("calls keep working");
}
