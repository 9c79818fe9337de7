//! Who may do what, over real mutual TLS against a real coordinator: every RPC of the protocol
//! against every kind of certificate and every role, scoped reads and writes, refusals audited.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_shared::dev_ca::Subject;
use rewind_shared::identity::Kind;
use rewind_tests::{Coordinator, tls_channel};
use tonic::Code;
use tonic::transport::Channel;

/// Calls `method` with an empty request (every field at its default; a stream of one empty
/// message for streaming methods) and returns the status code it ends with.
async fn call(channel: Channel, method: &str) -> Code {
    let path: http::uri::PathAndQuery = method.parse().unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("the channel is ready");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let streaming = method.ends_with("/Session")
        || method.ends_with("/SendSnapshot")
        || method.ends_with("/DeliverStream")
        || method.ends_with("/WatchRollback")
        || method.ends_with("/Watch")
        || method.ends_with("/ServerReflectionInfo");
    let result = if streaming {
        let request = tonic::Request::new(tokio_stream::iter(vec![()]));
        grpc.streaming(request, path, codec).await.map(|_| ())
    } else {
        grpc.unary(tonic::Request::new(()), path, codec)
            .await
            .map(|_| ())
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Who calls, and what it should be allowed.
struct Caller {
    label: &'static str,
    /// `None`: no certificate at all (as a host before it joins).
    subject: Option<Subject>,
    /// Which service's methods it may call at all.
    service: &'static str,
    /// For people: the levels its role grants.
    levels: &'static [&'static str],
    /// May renew its own certificate (agents, people and automation, whatever their role).
    renews: bool,
}

const READ: &str = "read";
const OPERATE: &str = "operate";
const APPROVE: &str = "approve";
const ADMINISTER: &str = "administer";

const POLICY: &str = r#"
[[binding]]
name = "operator-admin"
role = "admin"
identities = ["user:operator"]
scopes = ["*"]

[[binding]]
name = "admins"
role = "admin"
identities = ["user:ada"]
scopes = ["*"]

[[binding]]
name = "operators"
role = "operator"
identities = ["user:otto", "automation:ci"]
scopes = ["*"]

[[binding]]
name = "approvers"
role = "approver"
identities = ["user:apu"]
scopes = ["*"]

[[binding]]
name = "viewers"
role = "viewer"
groups = ["auditors"]
scopes = ["*"]

[[binding]]
name = "staging-viewers"
role = "viewer"
identities = ["user:stan"]
scopes = ["staging/*"]

[[binding]]
name = "staging-operators"
role = "operator"
identities = ["user:sol"]
scopes = ["staging/*"]
"#;

async fn must_apply_policy(client: &mut pb::control_service_client::ControlServiceClient<Channel>) {
    client
        .apply_policy(pb::ApplyPolicyRequest {
            toml: POLICY.into(),
            reason: "the test's roles".into(),
            ..Default::default()
        })
        .await
        .expect("apply the test policy");
}

async fn channel_as(coordinator: &Coordinator, subject: &Subject) -> Channel {
    let files = coordinator
        .ca()
        .write_identity(&coordinator.tls_dir(), subject, &[])
        .unwrap();
    tls_channel(&files, &coordinator.address).await.unwrap()
}

/// The level each method needs, written here from its name rather than read from the
/// coordinator's table, so the test checks the table too.
fn level_of(method: &str) -> &'static str {
    let name = method.rsplit('/').next().unwrap();
    let administer = [
        "CreateJoinToken",
        "ListJoinTokens",
        "RevokeJoinToken",
        "ForgetHost",
        "FinalizeUpgrade",
        "ResolvedByHand",
        "ResetBreaker",
        "TransferLeader",
        "AddMember",
        "RemoveMember",
        "ApplyPolicy",
        "ConfirmAuditArchive",
        "RedactAudit",
    ];
    let approvals = ["ApproveRequest", "DenyRequest", "ReviewRequest"];
    let reads = [
        "List", "Get", "Plan", "Watch", "Explain", "Verify", "Inspect", "Check", "Export",
    ];
    if administer.contains(&name) {
        ADMINISTER
    } else if approvals.contains(&name) {
        APPROVE
    } else if reads.iter().any(|prefix| name.starts_with(prefix)) {
        READ
    } else {
        OPERATE
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_admits_only_its_kind_and_the_roles_that_grant_its_level() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    let mut admin = coordinator.must_client().await;
    must_apply_policy(&mut admin).await;

    let people = "ControlService";
    let callers = [
        Caller {
            label: "member",
            subject: Some(Subject::member(1, "coordinator")),
            service: "MemberService|RaftService",
            levels: &[],
            renews: false,
        },
        Caller {
            label: "agent",
            subject: Some(Subject::new(Kind::Agent, "web-1")),
            service: "AgentService",
            levels: &[],
            renews: true,
        },
        Caller {
            label: "viewer (by group)",
            subject: Some(Subject::new(Kind::User, "vic").with_groups(&["auditors"])),
            service: people,
            levels: &[READ],
            renews: true,
        },
        Caller {
            label: "operator",
            subject: Some(Subject::new(Kind::User, "otto")),
            service: people,
            levels: &[READ, OPERATE],
            renews: true,
        },
        Caller {
            label: "automation operator",
            subject: Some(Subject::new(Kind::Automation, "ci")),
            service: people,
            levels: &[READ, OPERATE],
            renews: true,
        },
        Caller {
            label: "approver",
            subject: Some(Subject::new(Kind::User, "apu")),
            service: people,
            levels: &[READ, APPROVE],
            renews: true,
        },
        Caller {
            label: "admin",
            subject: Some(Subject::new(Kind::User, "ada")),
            service: people,
            levels: &[READ, OPERATE, ADMINISTER],
            renews: true,
        },
        Caller {
            label: "user without a binding",
            subject: Some(Subject::new(Kind::User, "nobody")),
            service: people,
            levels: &[],
            renews: true,
        },
        Caller {
            label: "certificate without a kind",
            subject: Some(Subject::legacy("old-operator")),
            service: "none",
            levels: &[],
            renews: false,
        },
        Caller {
            label: "no certificate",
            subject: None,
            service: "none",
            levels: &[],
            renews: false,
        },
    ];
    // Every method of the protocol and of the standard services served beside it, from the
    // generated descriptors: a new RPC is covered without anyone adding it here.
    let methods: Vec<String> = [
        rewind_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]
    .iter()
    .flat_map(|set| rewind_proto::methods_in(set))
    .collect();
    assert!(methods.len() > 40, "the descriptors list {}", methods.len());
    let mut wrong = Vec::new();
    for caller in &callers {
        let channel = match &caller.subject {
            Some(subject) => channel_as(&coordinator, subject).await,
            None => rewind_tests::anonymous_channel(
                &coordinator.tls_dir().join("ca.pem"),
                &coordinator.address,
            )
            .await
            .unwrap(),
        };
        for method in &methods {
            let service = method
                .split('/')
                .nth(1)
                .unwrap()
                .rsplit('.')
                .next()
                .unwrap();
            let kind_fits = caller.service.split('|').any(|fits| fits == service);
            // Joining needs no certificate (the token is the credential); renewing needs one's
            // own, and no role. Health checks need none; reflection any certificate with a
            // kind, and no role.
            let allowed = match service {
                "JoinService" if method.ends_with("/Join") => true,
                "JoinService" => caller.renews,
                "Health" => true,
                "ServerReflection" => caller.service != "none",
                _ => {
                    kind_fits
                        && (service != "ControlService"
                            || caller.levels.contains(&level_of(method)))
                }
            };
            let code = tokio::time::timeout(Duration::from_secs(20), call(channel.clone(), method))
                .await
                .unwrap_or(Code::DeadlineExceeded);
            let denied = matches!(code, Code::PermissionDenied | Code::Unauthenticated);
            if allowed == denied {
                wrong.push(format!(
                    "{}: {method}: expected {}, got {code:?}",
                    caller.label,
                    if allowed { "allowed" } else { "denied" }
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong answers:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scoped_role_acts_and_reads_only_in_its_environment_and_refusals_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    let mut admin = coordinator.must_client().await;
    must_apply_policy(&mut admin).await;
    admin
        .put_service(pb::PutServiceRequest {
            request_id: String::new(),
            service: Some(rewind_tests::plain_service("web")),
        })
        .await
        .unwrap();
    for environment in ["staging", "prod"] {
        admin
            .set_flag(pb::SetFlagRequest {
                environment: environment.into(),
                service: "web".into(),
                name: "new-checkout".into(),
                enabled: true,
                reason: "seed".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let sol = channel_as(&coordinator, &Subject::new(Kind::User, "sol")).await;
    let mut sol = pb::control_service_client::ControlServiceClient::new(sol);
    let kill = |environment: &str| pb::SetFlagRequest {
        environment: environment.into(),
        service: "web".into(),
        name: "new-checkout".into(),
        enabled: false,
        kill: true,
        reason: "test".into(),
        ..Default::default()
    };
    sol.set_flag(kill("staging"))
        .await
        .expect("staging is sol's");
    let refused = sol.set_flag(kill("prod")).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(
        refused.message(),
        "user:sol may not flag.set on prod/web: no binding allows user:sol to operate prod/web"
    );

    let stan = channel_as(&coordinator, &Subject::new(Kind::User, "stan")).await;
    let mut stan = pb::control_service_client::ControlServiceClient::new(stan);
    let flags = stan
        .list_flags(pb::ListFlagsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .flags;
    let environments: Vec<&str> = flags.iter().map(|flag| flag.environment.as_str()).collect();
    assert_eq!(
        environments,
        ["staging"],
        "a staging viewer sees staging's flags only"
    );
    let audit = stan
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap_err();
    assert_eq!(audit.code(), Code::PermissionDenied, "{audit:?}");
    assert!(
        audit
            .message()
            .contains("no binding allows user:stan to read the cluster")
    );
    let write = stan.set_flag(kill("staging")).await.unwrap_err();
    assert_eq!(
        write.code(),
        Code::PermissionDenied,
        "a viewer does not write"
    );

    // Each refusal is in the audit log, with who, what and why.
    rewind_tests::must_wait_async(
        Duration::from_secs(10),
        "the refusals in the audit log",
        || {
            let mut admin = admin.clone();
            async move {
                let entries = admin
                    .list_audit(pb::ListAuditRequest {
                        page_size: 1000,
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .entries;
                let refused: Vec<_> = entries
                    .iter()
                    .filter(|entry| entry.action == "access.refused")
                    .map(|entry| (entry.identity.clone(), entry.target.clone()))
                    .collect();
                let expected = [
                    ("user:sol".to_string(), "prod/web".to_string()),
                    ("user:stan".to_string(), "the cluster".to_string()),
                    // A viewer asking to write is refused at the gate: no binding lets it operate
                    // anywhere.
                    ("user:stan".to_string(), "any scope".to_string()),
                ];
                expected
                    .iter()
                    .all(|entry| refused.contains(entry))
                    .then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_that_leaves_no_admin_or_has_changed_since_it_was_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    let mut admin = coordinator.must_client().await;
    let before = admin
        .get_policy(pb::GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.version, 1, "the bootstrap policy is in force");
    let no_admin = POLICY.replace("role = \"admin\"", "role = \"viewer\"");
    let refused = admin
        .apply_policy(pb::ApplyPolicyRequest {
            toml: no_admin,
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("no binding gives anyone admin"),
        "{refused:?}"
    );

    // A diff (a dry run) changes and audits nothing: it needs no reason, and applies nothing.
    let diff = admin
        .apply_policy(pb::ApplyPolicyRequest {
            toml: POLICY.into(),
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(diff.summary.contains("bindings added: admins"), "{diff:?}");
    let unapplied = admin
        .get_policy(pb::GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unapplied.version, 1, "a diff applies nothing");
    let unexplained = admin
        .apply_policy(pb::ApplyPolicyRequest {
            toml: POLICY.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        unexplained
            .message()
            .starts_with("reason: say why the policy changes"),
        "{unexplained:?}"
    );

    let applied = admin
        .apply_policy(pb::ApplyPolicyRequest {
            toml: POLICY.into(),
            expected_hash: before.hash.clone(),
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.version, 2);
    assert!(
        applied.summary.contains("bindings added: admins"),
        "{}",
        applied.summary
    );
    let stale = admin
        .apply_policy(pb::ApplyPolicyRequest {
            toml: POLICY.into(),
            expected_hash: before.hash,
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");

    // Which binding decides is named.
    let answer = admin
        .check_access(pb::CheckAccessRequest {
            identity: "user:sol".into(),
            groups: vec![],
            action: "rollback.start".into(),
            target: "staging/web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.allowed);
    assert_eq!(answer.binding, "staging-operators");
}

/// The takeover seen before kinds: an agent's key added itself as learner 7, then spoke Raft as
/// member 7. Both steps are refused, and so is a member certificate speaking for another member
/// or for one outside the configuration.
#[tokio::test(flavor = "multi_thread")]
async fn only_a_member_in_the_configuration_speaks_raft_and_only_as_itself() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    let mut admin = coordinator.must_client().await;
    let cluster_id = admin
        .list_members(pb::ListMembersRequest {})
        .await
        .unwrap()
        .into_inner()
        .cluster_id;

    let agent = channel_as(&coordinator, &Subject::new(Kind::Agent, "web-2")).await;
    let add = pb::AddMemberRequest {
        member_id: 7,
        address: "127.0.0.1:1".into(),
        name: "web-2".into(),
        learner_only: true,
        reason: "test".into(),
        ..Default::default()
    };
    let refused = pb::control_service_client::ControlServiceClient::new(agent.clone())
        .add_member(add)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused
            .message()
            .contains("agent:web-2 may not cluster.add"),
        "{refused:?}"
    );

    // Batch by batch (Deliver) and on a stream (DeliverStream), the same checks.
    for streamed in [false, true] {
        let deliver = |channel: Channel, from_member: u64| {
            let batch = pb::RaftBatch {
                cluster_id: cluster_id.clone(),
                from_member,
                messages: vec![],
            };
            async move {
                let mut client = pb::raft_service_client::RaftServiceClient::new(channel);
                if !streamed {
                    return client.deliver(batch).await.map(|_| ());
                }
                // A refused batch ends the stream's answer with the refusal.
                let mut answer = client
                    .deliver_stream(tokio_stream::iter(vec![batch]))
                    .await?
                    .into_inner();
                while answer.message().await?.is_some() {}
                Ok(())
            }
        };
        let as_agent = deliver(agent.clone(), 7).await.unwrap_err();
        assert_eq!(as_agent.code(), Code::PermissionDenied);
        assert!(
            as_agent
                .message()
                .contains("RaftService takes member certificates only"),
            "{as_agent:?}"
        );
        let seven = channel_as(&coordinator, &Subject::member(7, "member-7")).await;
        let outside = deliver(seven.clone(), 7).await.unwrap_err();
        assert_eq!(outside.code(), Code::PermissionDenied);
        assert!(
            outside
                .message()
                .contains("member 7 is not in this cluster's configuration"),
            "{outside:?}"
        );
        let posing = deliver(seven, 1).await.unwrap_err();
        assert_eq!(posing.code(), Code::PermissionDenied);
        assert!(
            posing.message().contains("member:7 is not member 1's"),
            "{posing:?}"
        );
        let itself = channel_as(&coordinator, &Subject::member(1, "coordinator-copy")).await;
        deliver(itself.clone(), 1)
            .await
            .expect("member 1's certificate speaks for member 1");
        if streamed {
            // A snapshot never travels on the stream, even from a member as itself.
            let mut snapshot = raft_proto::eraftpb::Message::default();
            snapshot.set_msg_type(raft_proto::eraftpb::MessageType::MsgSnapshot);
            snapshot.from = 1;
            let batch = pb::RaftBatch {
                cluster_id: cluster_id.clone(),
                from_member: 1,
                messages: vec![protobuf::Message::write_to_bytes(&snapshot).unwrap()],
            };
            let mut answer = pb::raft_service_client::RaftServiceClient::new(itself)
                .deliver_stream(tokio_stream::iter(vec![batch]))
                .await
                .unwrap()
                .into_inner();
            let refused = answer.message().await.unwrap_err();
            assert_eq!(refused.code(), Code::InvalidArgument);
            assert!(
                refused
                    .message()
                    .contains("snapshots travel by SendSnapshot"),
                "{refused:?}"
            );
        }
    }

    // A stream outlives the gate's check at its start: a member the policy denies meanwhile is
    // refused at its next batch.
    let itself = channel_as(&coordinator, &Subject::member(1, "coordinator-copy")).await;
    let (batches, queued) = tokio::sync::mpsc::channel(4);
    let batch = pb::RaftBatch {
        cluster_id: cluster_id.clone(),
        from_member: 1,
        messages: vec![],
    };
    batches.send(batch.clone()).await.unwrap();
    let mut answer = pb::raft_service_client::RaftServiceClient::new(itself)
        .deliver_stream(tokio_stream::wrappers::ReceiverStream::new(queued))
        .await
        .unwrap()
        .into_inner();
    let (policy, _) =
        rewind_tests::must_deny(&mut admin, "member:1", "member 1's key leaked").await;
    batches.send(batch).await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), answer.message())
        .await
        .expect("the denied member's stream is ended at its next batch")
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("deny list"), "{refused:?}");
    admin
        .apply_policy(pb::ApplyPolicyRequest {
            toml: policy,
            reason: "a new key for member 1".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // Even an admin cannot add a member whose address does not answer with that member's
    // certificate: here an address that leads to member 1 (a proxy to it, since member 1's own
    // address is refused as taken before anything is dialled).
    let mut admin = coordinator.must_client().await;
    let to_member_1 = rewind_tests::proxy::CuttingProxy::must_start(&coordinator.address).await;
    let refused = admin
        .add_member(pb::AddMemberRequest {
            member_id: 7,
            address: to_member_1.address.clone(),
            learner_only: true,
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("must be running and present a certificate rewind://member/7")
            && refused
                .message()
                .contains("member:1's certificate, not member 7's"),
        "{refused:?}"
    );
}

/// A signed webhook acts as its automation identity, held to its binding like a person.
#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_acts_as_its_automation_identity_and_only_where_bound() {
    const SECRET: &str = "webhook secret of t27";
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("webhook.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let coordinator = Coordinator::must_start_with(
        &dir.path().join("coordinator"),
        &format!(
            "[http]\nlisten = \"127.0.0.1:0\"\nwebhook-secret-file = \"{}\"\n[access]\nwebhook-identity = \"pager\"\n",
            secret.display()
        ),
    );
    let mut admin = coordinator.must_client().await;
    let policy = format!(
        "{POLICY}\n[[binding]]\nname = \"pager\"\nrole = \"operator\"\nidentities = [\"automation:pager\"]\nscopes = [\"staging/*\"]\n"
    );
    admin
        .apply_policy(pb::ApplyPolicyRequest {
            toml: policy,
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .put_service(pb::PutServiceRequest {
            request_id: String::new(),
            service: Some(rewind_tests::plain_service("web")),
        })
        .await
        .unwrap();
    let http = format!("http://{}", coordinator.http_address);
    let ask = |environment: &'static str| {
        let body =
            serde_json::json!({"service": "web", "environment": environment, "reason": "burning"})
                .to_string();
        rewind_tests::post_signed_webhook(&http, SECRET.as_bytes(), body)
    };
    let (status, answer) = ask("prod").await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer.contains("automation:pager may not trigger a rollback of prod/web: no binding allows automation:pager to operate prod/web"),
        "{answer}"
    );
    let (status, answer) = ask("staging").await;
    assert_eq!(status, 200, "{answer}");
    let triggers = admin
        .list_triggers(pb::ListTriggersRequest {
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .triggers;
    assert_eq!(
        triggers.len(),
        1,
        "only staging's request was recorded: {triggers:?}"
    );
    let audit = rewind_tests::must_list_audit(&admin).await;
    assert!(
        audit
            .iter()
            .any(|entry| entry.identity == "automation:pager"
                && entry.action == "access.refused"
                && entry.target == "prod/web"),
        "the refusal is audited"
    );
}

/// Revocation is immediate: an agent the deny list names loses its open session, and its
/// reconnects are refused (and audited).
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_agent_is_cut_off_at_once_and_cannot_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let (_hosts, mut admin) =
        rewind_tests::must_start_hosts(dir.path(), &coordinator, &["web-1", "web-2"]).await;
    let (_, applied) =
        rewind_tests::must_deny(&mut admin, "agent:web-1", "web-1's key leaked").await;
    assert_eq!(applied.summary, "deny added: agent:web-1");
    rewind_tests::must_wait_async(Duration::from_secs(30), "web-1 to be cut off", || {
        let mut admin = admin.clone();
        async move {
            let hosts = admin
                .list_hosts(pb::ListHostsRequest::default())
                .await
                .ok()?
                .into_inner()
                .hosts;
            let connected: Vec<&str> = hosts
                .iter()
                .filter(|host| host.connected)
                .map(|host| host.host_id.as_str())
                .collect();
            (connected == ["web-2"]).then_some(())
        }
    })
    .await;
    // Its agent keeps trying; every try is refused at the gate.
    rewind_tests::must_wait_async(Duration::from_secs(30), "web-1's reconnect refused", || {
        let admin = admin.clone();
        async move {
            let audit = rewind_tests::must_list_audit(&admin).await;
            audit
                .iter()
                .any(|entry| {
                    entry.identity == "agent:web-1"
                        && entry.action == "access.refused"
                        && rewind_tests::readable_outcome(entry).contains("deny list")
                })
                .then_some(())
        }
    })
    .await;
}

/// With real hosts in staging and prod: a staging operator sees and changes staging only, a
/// change that spans both environments is out of its reach, and guessing the id of something
/// that does not exist yet gets `NOT_FOUND`, not a pass.
#[tokio::test(flavor = "multi_thread")]
async fn a_staging_operator_neither_sees_nor_reverts_prod_changes() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let mut hosts: Vec<rewind_tests::TestHost> = [("web-1", "staging"), ("web-2", "prod")]
        .into_iter()
        .map(|(id, environment)| {
            let host = rewind_tests::TestHost::must_prepare(dir.path(), id, &coordinator);
            let config = std::fs::read_to_string(&host.config_path).unwrap();
            let labelled = config.replace(
                "[labels]\n",
                &format!("[labels]\nenvironment = \"{environment}\"\n"),
            );
            std::fs::write(&host.config_path, labelled).unwrap();
            host
        })
        .collect();
    for host in &mut hosts {
        host.must_start_agent();
    }
    let mut admin = coordinator.must_client().await;
    rewind_tests::must_agents_connected(&admin, 2).await;
    must_apply_policy(&mut admin).await;
    rewind_tests::must_register_web(&mut admin, &hosts[0], false).await;
    let staging = rewind_tests::must_deploy_web(&admin, "v1", &["web-1"]).await;
    let prod = rewind_tests::must_deploy_web(&admin, "v1", &["web-2"]).await;

    let sol = channel_as(&coordinator, &Subject::new(Kind::User, "sol")).await;
    let mut sol = pb::control_service_client::ControlServiceClient::new(sol);
    let get = |change_id: &str| pb::GetChangeRequest {
        change_id: change_id.into(),
    };
    sol.get_change(get(&staging))
        .await
        .expect("staging's change");
    let denied = sol.get_change(get(&prod)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let listed: Vec<String> = sol
        .list_changes(pb::ListChangesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .changes
        .into_iter()
        .map(|change| change.change_id)
        .collect();
    assert_eq!(listed, std::slice::from_ref(&staging));
    let hosts_seen: Vec<String> = sol
        .list_hosts(pb::ListHostsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .hosts
        .into_iter()
        .map(|host| host.host_id)
        .collect();
    assert_eq!(hosts_seen, ["web-1"]);
    let inspect = sol
        .inspect_host(pb::InspectHostRequest {
            host_id: "web-2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(inspect.code(), Code::PermissionDenied, "{inspect:?}");
    let rollback = |change_id: &str| pb::StartRollbackRequest {
        change_id: change_id.into(),
        reason: "test".into(),
        ..Default::default()
    };
    let refused = sol.start_rollback(rollback(&prod)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("prod/web"), "{refused:?}");

    // A change to every host of web spans both environments: staging's operator may neither
    // start one nor see or revert the one an admin starts.
    let everywhere = pb::StartChangeRequest {
        service: "web".into(),
        version: "v2".into(),
        reason: "test".into(),
        ..Default::default()
    };
    let refused = sol.start_change(everywhere.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let spanning = rewind_tests::must_deploy_web(&admin, "v2", &[]).await;
    let hidden = sol.get_change(get(&spanning)).await.unwrap_err();
    assert_eq!(hidden.code(), Code::PermissionDenied, "{hidden:?}");

    // An id that does not exist yet is not found, whoever asks.
    let ahead = sol
        .abort_rollback(pb::RollbackActionRequest {
            rollback_id: "rb-99".into(),
            reason: "guess".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(ahead.code(), Code::NotFound, "{ahead:?}");

    // A watch started while allowed ends when the watcher is revoked. web-1's agent is stopped
    // first, so the rollback waits for it and is still running when the policy changes.
    drop(hosts[0].agent.take());
    let rollback = admin
        .clone()
        .start_rollback(pb::StartRollbackRequest {
            change_id: spanning.clone(),
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap()
        .rollback_id;
    let vic = channel_as(
        &coordinator,
        &Subject::new(Kind::User, "vic").with_groups(&["auditors"]),
    )
    .await;
    let mut watch = pb::control_service_client::ControlServiceClient::new(vic)
        .watch_rollback(pb::GetRollbackRequest {
            rollback_id: rollback,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().expect("the first state");
    let policy = format!("deny = [\"user:vic\"]\n{POLICY}");
    admin
        .clone()
        .apply_policy(pb::ApplyPolicyRequest {
            toml: policy,
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the watch ends");
    let status = ended.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("deny list"), "{status:?}");
}
