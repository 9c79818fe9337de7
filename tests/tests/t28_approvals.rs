//! Approvals in a regulated environment, over real mutual TLS with real agents: a prod rollback
//! waits for two approvers other than its requester, each approving the exact plan; refusals
//! say why; a denied or lapsed request never runs; break-glass runs at once, escalates by the
//! signed webhook, is marked wherever the rollback is listed, and is reviewed afterwards.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use rewind_proto::v1 as pb;
use rewind_shared::dev_ca::Subject;
use rewind_shared::identity::Kind;
use rewind_tests::*;
use tonic::Code;

const POLICY: &str = r#"
[[binding]]
name = "operator-admin"
role = "admin"
identities = ["user:operator"]
scopes = ["*"]

[[binding]]
name = "prod-operators"
role = "operator"
identities = ["user:alice"]
scopes = ["prod/*"]

# alice approves too, to show a requester cannot approve their own request.
[[binding]]
name = "prod-approvers"
role = "approver"
identities = ["user:alice", "user:bob", "user:carol"]
scopes = ["prod/web"]

[[binding]]
name = "staging-approvers"
role = "approver"
identities = ["user:sam"]
scopes = ["staging/*"]

[environment.prod]
approvals = 2
"#;

/// Collects what the escalation webhook receives.
async fn start_receiver() -> (String, Arc<Mutex<Vec<Bytes>>>) {
    let received: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let store = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/hooks/rewind",
        axum::routing::post(move |body: Bytes| {
            let store = Arc::clone(&store);
            async move {
                store.lock().unwrap().push(body);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, received)
}

/// Deploys `version` of web to prod as alice: the deploy waits as a request bound to its plan,
/// bob and carol approve that plan (after alice's own approval is refused, with
/// `check_refusals`), and it runs as alice's, naming them. Returns the change's id once deployed.
async fn must_deploy_approved(
    coordinator: &Coordinator,
    admin: &pb::control_service_client::ControlServiceClient<tonic::transport::Channel>,
    version: &str,
    check_refusals: bool,
) -> String {
    let filed: serde_json::Value = serde_json::from_str(&run_ok(&rewindctl_as(
        coordinator,
        "alice",
        &[
            "--output", "json", "change", "start", "web", version, "--reason", "ship it",
        ],
    )))
    .unwrap();
    assert!(filed["change"].is_null(), "a prod deploy waits: {filed}");
    let request = &filed["request"];
    assert_eq!(request["kind"], "deploy", "{filed}");
    let id = request["requestId"].as_str().unwrap().to_string();
    let hash = request["planHash"].as_str().unwrap().to_string();
    if check_refusals {
        let own = rewindctl_as(
            coordinator,
            "alice",
            &[
                "request",
                "approve",
                &id,
                "--plan-hash",
                &hash,
                "--reason",
                "ok",
            ],
        );
        must_fail_with(&own, "the requester cannot approve");
    }
    for approver in ["bob", "carol"] {
        run_ok(&rewindctl_as(
            coordinator,
            approver,
            &[
                "request",
                "approve",
                &id,
                "--plan-hash",
                &hash,
                "--reason",
                "ok",
            ],
        ));
    }
    let change_id = request_json(coordinator, "bob", &id)["changeId"]
        .as_str()
        .unwrap()
        .to_string();
    must_change_where(
        admin,
        &change_id,
        "the approved deploy to finish",
        |change| change.state == pb::ChangeState::Deployed as i32,
    )
    .await;
    if check_refusals {
        let shown = run_ok(&rewindctl_as(
            coordinator,
            "alice",
            &["change", "show", &change_id],
        ));
        assert!(
            shown.contains("started by user:alice")
                && shown.contains("approved by user:bob, user:carol"),
            "{shown}"
        );
    }
    change_id
}

/// `rewindctl` as `who` (whose certificate the test issued into the coordinator's TLS dir).
fn rewindctl_as(coordinator: &Coordinator, who: &str, args: &[&str]) -> std::process::Output {
    coordinator.rewindctl(&[&["--identity", who][..], args].concat())
}

fn must_fail_with(output: &std::process::Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains(expected),
        "expected a failure saying {expected:?}: {output:?}"
    );
}

fn request_json(coordinator: &Coordinator, who: &str, id: &str) -> serde_json::Value {
    serde_json::from_str(&run_ok(&rewindctl_as(
        coordinator,
        who,
        &["--output", "json", "request", "show", id],
    )))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prod_rollback_waits_for_two_other_approvers_and_break_glass_escalates() {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, received) = start_receiver().await;
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, "a-shared-secret-for-the-test-hook").unwrap();
    let coordinator = Coordinator::must_start_with(
        &dir.path().join("coordinator"),
        &format!(
            "[escalation]\nwebhook-url = \"http://{receiver}/hooks/rewind\"\nsecret-file = \"{}\"\n",
            secret.display()
        ),
    );
    let mut hosts: Vec<TestHost> = ["web-1", "web-2"]
        .into_iter()
        .map(|id| {
            let host = TestHost::must_prepare(dir.path(), id, &coordinator);
            let config = std::fs::read_to_string(&host.config_path).unwrap();
            let labelled = config.replace("[labels]\n", "[labels]\nenvironment = \"prod\"\n");
            std::fs::write(&host.config_path, labelled).unwrap();
            host
        })
        .collect();
    for host in &mut hosts {
        host.must_start_agent();
    }
    let mut admin = coordinator.must_client().await;
    must_agents_connected(&admin, 2).await;
    for name in ["alice", "bob", "carol", "sam"] {
        coordinator
            .ca()
            .write_identity(&coordinator.tls_dir(), &Subject::new(Kind::User, name), &[])
            .unwrap();
    }
    must_register_web(&mut admin, &hosts[0], false).await;
    must_deploy_web(&admin, "v1", &[]).await;
    // From here prod's deploys and rollbacks wait for two approvals.
    admin
        .apply_policy(pb::ApplyPolicyRequest {
            toml: POLICY.into(),
            reason: "prod needs two approvals".into(),
            ..Default::default()
        })
        .await
        .expect("apply the policy");
    // Break-glass needs a reason: it goes into the escalation and the audit log.
    must_fail_with(
        &rewindctl_as(
            &coordinator,
            "alice",
            &["change", "start", "web", "v2", "--break-glass"],
        ),
        "--reason",
    );
    let bad = must_deploy_approved(&coordinator, &admin, "v2", true).await;

    // alice asks: nothing runs, a request waits.
    let filed = run_ok(&rewindctl_as(
        &coordinator,
        "alice",
        &["rollback", "start", &bad, "--reason", "v2 breaks checkout"],
    ));
    assert!(
        filed.contains("req-2 waits for 2 approvals (prod requires them)"),
        "{filed}"
    );
    let listed = admin
        .list_rollbacks(pb::ListRollbacksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.rollbacks.is_empty(), "{listed:?}");
    let request = request_json(&coordinator, "bob", "req-2");
    let hash = request["planHash"].as_str().unwrap().to_string();
    assert_eq!(request["status"], "pending");
    assert_eq!(request["requester"], "user:alice");

    // Refused, each with its reason: the requester, an approver of another environment, a
    // stale plan hash, a second approval by the same person.
    let approve = |who: &str, plan_hash: &str| {
        rewindctl_as(
            &coordinator,
            who,
            &[
                "request",
                "approve",
                "req-2",
                "--plan-hash",
                plan_hash,
                "--reason",
                "ok",
            ],
        )
    };
    must_fail_with(
        &approve("alice", &hash),
        "the requester cannot approve their own request",
    );
    must_fail_with(
        &approve("sam", &hash),
        "no binding allows user:sam to approve prod/web",
    );
    let stale = format!("sha256:{}", "0".repeat(64));
    must_fail_with(&approve("bob", &stale), "the approval names plan");
    let first = run_ok(&approve("bob", &hash));
    assert!(first.contains("approvals: 1 of 2"), "{first}");
    must_fail_with(&approve("bob", &hash), "user:bob approved it already");
    assert!(
        admin
            .list_rollbacks(pb::ListRollbacksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .rollbacks
            .is_empty(),
        "one approval of two starts nothing"
    );

    // The second approval starts it, as alice's, naming both approvers.
    let second = run_ok(&approve("carol", &hash));
    assert!(
        second.contains("approved by user:bob, user:carol: started rb-1"),
        "{second}"
    );
    let rollback = must_rollback_end(&admin, "rb-1").await;
    assert_eq!(
        rollback.state,
        pb::RollbackState::Succeeded as i32,
        "{rollback:?}"
    );
    assert_eq!(rollback.started_by, "user:alice");
    assert_eq!(rollback.approved_by, ["user:bob", "user:carol"]);
    assert_eq!(
        (rollback.request_id.as_str(), rollback.plan_hash.as_str()),
        ("req-2", hash.as_str())
    );
    let audit = must_list_audit(&admin).await;
    for (who, action) in [
        ("user:bob", "request.approve"),
        ("user:carol", "request.approve"),
    ] {
        assert!(
            audit
                .iter()
                .any(|entry| entry.identity == who && entry.action == action),
            "{who} {action} in the audit log"
        );
    }
    assert!(
        audit.iter().any(|entry| entry.identity == "user:alice"
            && entry.action == "rollback.start"
            && entry.target == "rb-1"
            && rewind_tests::readable_outcome(entry).contains("approved by user:bob, user:carol")),
        "the start of rb-1, as alice's, naming its approvers"
    );

    // A request whose plan changes before it is approved lapses, and says why.
    let again = must_deploy_approved(&coordinator, &admin, "v2", false).await;
    run_ok(&rewindctl_as(
        &coordinator,
        "alice",
        &["rollback", "start", &again, "--reason", "v2 again"],
    ));
    let hash = request_json(&coordinator, "bob", "req-4")["planHash"]
        .as_str()
        .unwrap()
        .to_string();
    must_deploy_approved(&coordinator, &admin, "v1", false).await;
    let shown = run_ok(&rewindctl_as(
        &coordinator,
        "bob",
        &["request", "show", "req-4"],
    ));
    assert!(
        shown.contains("NOT APPROVABLE: it can no longer be planned"),
        "{shown}"
    );
    let lapsed = rewindctl_as(
        &coordinator,
        "bob",
        &[
            "request",
            "approve",
            "req-4",
            "--plan-hash",
            &hash,
            "--reason",
            "ok",
        ],
    );
    must_fail_with(&lapsed, "lapsed with 0 of 2 approvals");
    assert_eq!(
        request_json(&coordinator, "bob", "req-4")["status"],
        "lapsed"
    );

    // A denied request never runs.
    let latest = must_deploy_approved(&coordinator, &admin, "v2", false).await;
    run_ok(&rewindctl_as(
        &coordinator,
        "alice",
        &["rollback", "start", &latest, "--reason", "v2 misbehaves"],
    ));
    let hash = request_json(&coordinator, "carol", "req-7")["planHash"]
        .as_str()
        .unwrap()
        .to_string();
    run_ok(&rewindctl_as(
        &coordinator,
        "carol",
        &[
            "request",
            "deny",
            "req-7",
            "--reason",
            "v1 is fine, look at the database",
        ],
    ));
    must_fail_with(
        &rewindctl_as(
            &coordinator,
            "bob",
            &[
                "request",
                "approve",
                "req-7",
                "--plan-hash",
                &hash,
                "--reason",
                "ok",
            ],
        ),
        "it is denied: denied by user:carol",
    );

    // Break-glass: at once, escalated, marked, and reviewed by someone else afterwards.
    must_fail_with(
        &rewindctl_as(
            &coordinator,
            "alice",
            &["rollback", "start", &latest, "--break-glass"],
        ),
        "--reason",
    );
    let blank = coordinator
        .client_with(&rewind_shared::tls::TlsFiles::in_dir(
            &coordinator.tls_dir(),
            "alice",
        ))
        .await
        .unwrap()
        .start_rollback(pb::StartRollbackRequest {
            change_id: latest.clone(),
            reason: " ".into(),
            break_glass: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(blank.code(), Code::InvalidArgument, "{blank:?}");
    assert!(
        blank.message().contains("say why you roll back"),
        "{blank:?}"
    );
    let started = run_ok(&rewindctl_as(
        &coordinator,
        "alice",
        &[
            "rollback",
            "start",
            &latest,
            "--break-glass",
            "--reason",
            "checkout is down",
        ],
    ));
    assert!(started.contains("BREAK-GLASS"), "{started}");
    let rollback = must_rollback_end(&admin, "rb-2").await;
    assert!(
        rollback.break_glass && rollback.request_id == "req-8",
        "{rollback:?}"
    );
    let escalation = must_wait(
        Duration::from_secs(30),
        "the break-glass escalation",
        || received.lock().unwrap().first().cloned(),
    );
    let escalation: serde_json::Value = serde_json::from_slice(&escalation).unwrap();
    assert_eq!(escalation["rollback_id"], "rb-2");
    assert!(
        escalation["evidence"].as_str().unwrap().starts_with(
            "break-glass: user:alice started rb-2 without the 2 approvals prod requires"
        ),
        "{escalation}"
    );
    let listing = run_ok(&coordinator.rewindctl(&["rollback", "list"]));
    assert!(listing.contains("manual, BREAK-GLASS"), "{listing}");
    let open = run_ok(&rewindctl_as(
        &coordinator,
        "bob",
        &["request", "list", "--open"],
    ));
    assert!(
        open.contains("req-8") && open.contains("NOT REVIEWED"),
        "{open}"
    );
    let review = |who: &str| {
        rewindctl_as(
            &coordinator,
            who,
            &[
                "request",
                "review",
                "req-8",
                "--reason",
                "checkout was down; right call",
            ],
        )
    };
    must_fail_with(
        &review("alice"),
        "cannot review their own break-glass rollback",
    );
    run_ok(&review("bob"));
    let open = run_ok(&rewindctl_as(
        &coordinator,
        "bob",
        &["request", "list", "--open"],
    ));
    assert!(!open.contains("req-8"), "{open}");

    // An approver of another environment cannot even read a prod request.
    let sam = coordinator
        .client_with(&rewind_shared::tls::TlsFiles::in_dir(
            &coordinator.tls_dir(),
            "sam",
        ))
        .await
        .unwrap()
        .get_request(pb::GetRequestRequest {
            request_id: "req-2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(sam.code(), Code::PermissionDenied, "{sam:?}");

    // Bad input is refused naming the field, before anything is proposed.
    let mut bob = coordinator
        .client_with(&rewind_shared::tls::TlsFiles::in_dir(
            &coordinator.tls_dir(),
            "bob",
        ))
        .await
        .unwrap();
    let decision = |request_id: &str, plan_hash: &str, reason: &str| pb::RequestDecision {
        request_id: request_id.into(),
        plan_hash: plan_hash.into(),
        reason: reason.into(),
        ..Default::default()
    };
    let cases = [
        (
            bob.approve_request(decision("req-2", "", "ok")).await,
            Code::InvalidArgument,
            "plan_hash",
        ),
        (
            bob.approve_request(decision("req-2", "not-a-hash", "ok"))
                .await,
            Code::InvalidArgument,
            "plan_hash",
        ),
        (
            bob.deny_request(decision("req-2", "", " ")).await,
            Code::InvalidArgument,
            "reason",
        ),
        (
            bob.deny_request(decision("req-2", "", "two\nlines")).await,
            Code::InvalidArgument,
            "control characters",
        ),
        (
            bob.review_request(decision("request-one", "", "ok")).await,
            Code::InvalidArgument,
            "request_id",
        ),
        (
            bob.get_request(pb::GetRequestRequest {
                request_id: "req-99".into(),
            })
            .await,
            Code::NotFound,
            "req-99",
        ),
    ];
    for (answer, code, named) in cases {
        let refused = answer.unwrap_err();
        assert_eq!(refused.code(), code, "{refused:?}");
        assert!(refused.message().contains(named), "{named}: {refused:?}");
    }
}
