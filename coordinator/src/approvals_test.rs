//! Tests of requests for approval as `apply()` decides them: who may approve, the exact plan,
//! lapse, expiry, break-glass, and automatic rollbacks under each environment's rule.

use std::sync::Arc;

use crate::access::Policy;
use crate::errors::CoordinatorError;
use crate::state_machine::*;
use crate::test_fleet::Fleet;

const POLICY: &str = r#"
[[binding]]
name = "admins"
role = "admin"
identities = ["user:ada"]
scopes = ["*"]

[environment.prod]
approvals = 2
request-ttl-s = 600

[environment.locked]
approvals = 1
break-glass = false
automatic-rollbacks = "await-approval"
"#;

/// Service `web` on web-1 (prod, eu) and web-2 (prod, us), deployed v1 then v2 (ch-2); and
/// `api` on api-1 in `locked`, deployed v1 then v2 (ch-4).
fn fleet() -> Fleet {
    let mut fleet = Fleet::new();
    fleet.service("web", &[]);
    fleet.host_in("web-1", "eu", "prod", &["web"]);
    fleet.host_in("web-2", "us", "prod", &["web"]);
    fleet.service("api", &[]);
    fleet.host_in("api-1", "eu", "locked", &["api"]);
    for service in ["web", "api"] {
        fleet.release(service, "v1", 0, &[]);
        fleet.release(service, "v2", 0, &[]);
        fleet.deploy(service, "v1");
        fleet.deploy(service, "v2");
    }
    // In force from here: the deploys above ran before it.
    fleet.state.access.policy = Some(Arc::new(Policy::from_toml(POLICY).unwrap()));
    fleet
}

fn rollback_of(change: u64, break_glass: bool) -> CommandKind {
    CommandKind::StartRollback(StartRollback {
        changes: vec![change],
        options: PlanOptions::default(),
        plan_hash: String::new(),
        reason: "bad v2".into(),
        trigger: Trigger::Manual,
        break_glass,
        planned: None,
    })
}

fn decide(decision: RequestDecision, plan_hash: &str) -> CommandKind {
    CommandKind::DecideRequest(DecideRequest {
        baseline: None,
        request: 1,
        decision,
        plan_hash: plan_hash.into(),
        reason: "looked at it".into(),
        planned: None,
    })
}

fn refusal(result: Result<Outcome, CoordinatorError>) -> String {
    match result {
        Err(CoordinatorError::RequestRefused { why, .. }) => why,
        Ok(Outcome::RequestRefused { why, .. }) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

const AT: u64 = 1_000_000;

#[test]
fn a_prod_rollback_runs_only_after_two_approvers_other_than_the_requester_approve_its_plan() {
    let mut fleet = fleet();
    let filed = fleet.apply_as("user:alice", AT, rollback_of(2, false));
    assert!(matches!(filed, Ok(Outcome::Request(1))), "{filed:?}");
    assert!(fleet.state.rollbacks.is_empty(), "nothing runs yet");
    let request = fleet.state.approval_requests[&1].clone();
    assert_eq!(request.status, RequestStatus::Pending);
    assert_eq!(request.environments, ["prod"]);
    assert_eq!((request.needed, request.expires_at_ms), (2, AT + 600_000));
    let hash = request.plan_hash.clone();

    let again = fleet.apply_as("user:alice", AT, rollback_of(2, false));
    assert!(
        matches!(again, Err(CoordinatorError::AlreadyRequested { .. })),
        "{again:?}"
    );
    let own = refusal(fleet.apply_as(
        "user:alice",
        AT + 1,
        decide(RequestDecision::Approve, &hash),
    ));
    assert!(own.contains("requester cannot approve"), "{own}");
    let stale = format!("sha256:{}", "0".repeat(64));
    let stale =
        refusal(fleet.apply_as("user:bob", AT + 2, decide(RequestDecision::Approve, &stale)));
    assert!(stale.contains("the approval names plan"), "{stale}");

    let first = fleet.apply_as("user:bob", AT + 3, decide(RequestDecision::Approve, &hash));
    assert!(matches!(first, Ok(Outcome::Request(1))), "{first:?}");
    assert!(fleet.state.rollbacks.is_empty(), "one approval of two");
    let twice =
        refusal(fleet.apply_as("user:bob", AT + 4, decide(RequestDecision::Approve, &hash)));
    assert!(twice.contains("user:bob approved it already"), "{twice}");

    fleet
        .apply_as(
            "user:carol",
            AT + 5,
            decide(RequestDecision::Approve, &hash),
        )
        .expect("the second approval applies");
    let rollback = fleet.state.rollbacks.values().next().expect("it started");
    assert_eq!(rollback.started_by, "user:alice");
    assert_eq!(rollback.approved_by, ["user:bob", "user:carol"]);
    assert_eq!(
        (rollback.request, rollback.plan_hash.as_str()),
        (1, hash.as_str())
    );
    let request = &fleet.state.approval_requests[&1];
    assert_eq!(request.status, RequestStatus::Approved);
    assert_eq!(request.rollback, rollback.number);
    let late = refusal(fleet.apply_as("user:dan", AT + 6, decide(RequestDecision::Approve, &hash)));
    assert!(late.starts_with("it is approved"), "{late}");
    let audit: Vec<(String, String)> = fleet
        .state
        .audit
        .entries()
        .iter()
        .map(|entry| (entry.identity.clone(), entry.action.clone()))
        .filter(|(_, action)| action.starts_with("request.") || action == "rollback.start")
        .collect();
    let expected: Vec<(String, String)> = [
        ("user:alice", "rollback.start"),
        ("user:bob", "request.approve"),
        ("user:alice", "rollback.start"),
        ("user:carol", "request.approve"),
    ]
    .iter()
    .map(|(who, what)| (who.to_string(), what.to_string()))
    .collect();
    assert_eq!(audit, expected, "filed, approved, started, approved");
}

#[test]
fn a_request_lapses_when_its_plan_changes_and_expires_after_its_time() {
    let mut fleet = fleet();
    fleet
        .apply_as("user:alice", AT, rollback_of(2, false))
        .unwrap();
    let hash = fleet.state.approval_requests[&1].plan_hash.clone();
    fleet
        .apply_as("user:bob", AT + 1, decide(RequestDecision::Approve, &hash))
        .unwrap();
    // web-2 moves region: the waves differ, so the approvals given do not carry over.
    fleet.host_in("web-2", "ap", "prod", &["web"]);
    let why = refusal(fleet.apply_as(
        "user:carol",
        AT + 2,
        decide(RequestDecision::Approve, &hash),
    ));
    assert!(
        why.starts_with("lapsed with 1 of 2 approvals: the plan changed"),
        "{why}"
    );
    assert!(
        why.contains("in us: web-2") && why.contains("in ap: web-2"),
        "{why}"
    );
    assert_eq!(
        fleet.state.approval_requests[&1].status,
        RequestStatus::Lapsed
    );
    assert!(fleet.state.rollbacks.is_empty());

    // A new request for the new plan, left past its time.
    fleet
        .apply_as("user:alice", AT + 3, rollback_of(2, false))
        .unwrap();
    let hash = fleet.state.approval_requests[&2].plan_hash.clone();
    let late = CommandKind::DecideRequest(DecideRequest {
        baseline: None,
        request: 2,
        decision: RequestDecision::Approve,
        plan_hash: hash,
        reason: String::new(),
        planned: None,
    });
    let why = refusal(fleet.apply_as("user:bob", AT + 3 + 600_001, late));
    assert!(why.contains("expired with 0 of 2 approvals"), "{why}");
    // Refused, the approval takes back the expiry it found on its way (from cluster version 3
    // a refused command changes nothing): the request reads as expired, and the next command
    // that goes through records it.
    assert_eq!(
        fleet.state.approval_requests[&2].status,
        RequestStatus::Pending
    );
    assert!(crate::api::convert::is_overdue(
        &fleet.state.approval_requests[&2]
    ));
    fleet
        .apply_as("user:alice", AT + 3 + 600_002, rollback_of(2, false))
        .unwrap();
    assert_eq!(
        fleet.state.approval_requests[&2].status,
        RequestStatus::Expired
    );
}

#[test]
fn a_denied_request_never_runs_and_break_glass_runs_at_once_escalated_for_review() {
    let mut fleet = fleet();
    fleet
        .apply_as("user:alice", AT, rollback_of(2, false))
        .unwrap();
    let hash = fleet.state.approval_requests[&1].plan_hash.clone();
    fleet
        .apply_as("user:carol", AT + 1, decide(RequestDecision::Deny, ""))
        .unwrap();
    let why = refusal(fleet.apply_as("user:bob", AT + 2, decide(RequestDecision::Approve, &hash)));
    assert!(
        why.starts_with("it is denied: denied by user:carol"),
        "{why}"
    );

    let Outcome::Rollback(number) = fleet
        .apply_as("user:alice", AT + 3, rollback_of(2, true))
        .unwrap()
    else {
        panic!("break-glass starts a rollback")
    };
    let rollback = &fleet.state.rollbacks[&number];
    assert!(rollback.break_glass);
    assert_eq!(rollback.request, 2);
    let escalation = fleet.state.escalations.values().last().unwrap();
    assert_eq!(escalation.rollback, number);
    assert!(
        escalation
            .evidence
            .starts_with("break-glass: user:alice started"),
        "{}",
        escalation.evidence
    );
    let review = |request| {
        CommandKind::DecideRequest(DecideRequest {
            baseline: None,
            request,
            decision: RequestDecision::Review,
            plan_hash: String::new(),
            reason: "it was down".into(),
            planned: None,
        })
    };
    let own = refusal(fleet.apply_as("user:alice", AT + 4, review(2)));
    assert!(own.contains("cannot review their own"), "{own}");
    fleet.apply_as("user:bob", AT + 5, review(2)).unwrap();
    assert!(!fleet.state.approval_requests[&2].is_open());

    // Where the policy forbids it, break-glass is refused and nothing starts.
    let refused = fleet.apply_as("user:alice", AT + 6, rollback_of(4, true));
    assert!(
        matches!(&refused, Err(CoordinatorError::InvalidArgument { message, .. }) if message.contains("does not allow break-glass")),
        "{refused:?}"
    );
}

#[test]
fn automatic_rollbacks_run_at_once_approved_by_policy_unless_the_environment_says_wait() {
    let mut fleet = fleet();
    let ask = |service: &str, environment: &str| {
        CommandKind::AutoTrigger(AutoTrigger {
            service: service.into(),
            environment: environment.into(),
            source: TriggerSource::Alertmanager,
            reason: "HighErrorRate".into(),
            options: PlanOptions::default(),
            throttle: ThrottleLimits::default(),
            decided: None,
        })
    };
    let Ok(Outcome::Triggered {
        outcome, rollback, ..
    }) = fleet.apply_as("automation:alertmanager", AT, ask("web", "prod"))
    else {
        panic!("a trigger outcome")
    };
    assert_eq!(outcome, TriggerOutcome::Started);
    assert_eq!(
        fleet.state.rollbacks[&rollback].approved_by,
        ["policy: automatic rollbacks run at once in prod"]
    );

    let Ok(Outcome::Triggered {
        outcome, detail, ..
    }) = fleet.apply_as("automation:alertmanager", AT + 1, ask("api", "locked"))
    else {
        panic!("a trigger outcome")
    };
    assert_eq!(outcome, TriggerOutcome::AwaitingApproval, "{detail}");
    assert!(
        detail.starts_with("waits for approval as req-1"),
        "{detail}"
    );
    let request = &fleet.state.approval_requests[&1];
    assert_eq!(
        (request.trigger, request.requester.as_str()),
        (Trigger::Automatic, "automation:alertmanager")
    );
}

#[test]
fn an_automatic_request_that_expires_as_its_alert_repeats_refuses_the_rollback_from_version_4() {
    for (version, asks_again) in [(3, true), (4, false)] {
        let mut fleet = fleet();
        fleet.state.cluster_version = version;
        let ask = || {
            CommandKind::AutoTrigger(AutoTrigger {
                service: "api".into(),
                environment: "locked".into(),
                source: TriggerSource::Alertmanager,
                reason: "HighErrorRate".into(),
                options: PlanOptions::default(),
                throttle: ThrottleLimits::default(),
                decided: None,
            })
        };
        fleet
            .apply_as("automation:alertmanager", AT, ask())
            .unwrap();
        // Nobody approved within the request's time; the alert fires again after it.
        let after_expiry = AT + 3_600_000 + 1;
        let Ok(Outcome::Triggered {
            outcome, detail, ..
        }) = fleet.apply_as("automation:alertmanager", after_expiry, ask())
        else {
            panic!("a trigger outcome")
        };
        assert_eq!(
            fleet.state.approval_requests[&1].status,
            approvals::RequestStatus::Expired,
            "version {version}"
        );
        if asks_again {
            assert_eq!(outcome, TriggerOutcome::AwaitingApproval, "{detail}");
        } else {
            assert_eq!(outcome, TriggerOutcome::Ignored, "{detail}");
            assert!(detail.contains("was already refused"), "{detail}");
            assert_eq!(fleet.state.approval_requests.len(), 1, "no second request");
        }
    }
}

#[test]
fn a_pending_request_lapses_when_another_rollback_reverts_its_change_or_the_policy_tightens() {
    let mut fleet = fleet();
    fleet
        .apply_as("user:alice", AT, rollback_of(2, false))
        .unwrap();
    let hash = fleet.state.approval_requests[&1].plan_hash.clone();
    fleet
        .apply_as("user:bob", AT + 1, rollback_of(2, true))
        .expect("break-glass runs");
    let request = &fleet.state.approval_requests[&1];
    assert_eq!(request.status, RequestStatus::Lapsed);
    assert!(
        request.detail.contains("rb-1 reverts its changes"),
        "{}",
        request.detail
    );
    let late = refusal(fleet.apply_as(
        "user:carol",
        AT + 2,
        decide(RequestDecision::Approve, &hash),
    ));
    assert!(late.starts_with("it is lapsed"), "{late}");

    // Filed under approvals = 1, approved after prod asks for 3: judged by the rules in force.
    let mut fleet = self::fleet();
    let loose = POLICY.replace("approvals = 2", "approvals = 1");
    fleet.state.access.policy = Some(Arc::new(Policy::from_toml(&loose).unwrap()));
    fleet
        .apply_as("user:alice", AT, rollback_of(2, false))
        .unwrap();
    let hash = fleet.state.approval_requests[&1].plan_hash.clone();
    let strict = POLICY.replace("approvals = 2", "approvals = 3");
    fleet.state.access.policy = Some(Arc::new(Policy::from_toml(&strict).unwrap()));
    let why = refusal(fleet.apply_as("user:bob", AT + 1, decide(RequestDecision::Approve, &hash)));
    assert!(
        why.contains("the access policy changed since it was requested (1 approvals in prod then, 3 in prod now)"),
        "{why}"
    );
    assert!(fleet.state.rollbacks.is_empty());
}

fn deploy_of(service: &str, version: &str, break_glass: bool) -> CommandKind {
    CommandKind::StartChange(StartChange {
        service: service.into(),
        version: version.into(),
        host_ids: vec![],
        reason: "ship it".into(),
        baseline: HealthAggregate::default(),
        flags_on: vec![],
        migrations: vec![],
        break_glass,
    })
}

#[test]
fn a_prod_deploy_waits_for_two_approvals_of_its_exact_plan_and_lapses_when_its_hosts_change() {
    let mut fleet = fleet();
    fleet.release("web", "v3", 0, &[]);
    let changes_before = fleet.state.changes.len();
    let filed = fleet.apply_as("user:alice", AT, deploy_of("web", "v3", false));
    assert!(matches!(filed, Ok(Outcome::Request(1))), "{filed:?}");
    assert_eq!(
        fleet.state.changes.len(),
        changes_before,
        "nothing runs yet"
    );
    let request = fleet.state.approval_requests[&1].clone();
    assert_eq!(request.plan, ["deploy web v2 -> v3 on web-1, web-2"]);
    assert_eq!(
        (request.needed, request.environments.as_slice()),
        (2, &["prod".to_string()][..])
    );
    let hash = request.plan_hash.clone();
    let again = fleet.apply_as("user:alice", AT, deploy_of("web", "v3", false));
    assert!(
        matches!(again, Err(CoordinatorError::AlreadyRequested { .. })),
        "{again:?}"
    );

    let own = refusal(fleet.apply_as(
        "user:alice",
        AT + 1,
        decide(RequestDecision::Approve, &hash),
    ));
    assert!(own.contains("requester cannot approve"), "{own}");
    fleet
        .apply_as("user:bob", AT + 2, decide(RequestDecision::Approve, &hash))
        .unwrap();
    assert_eq!(
        fleet.state.changes.len(),
        changes_before,
        "one approval of two"
    );
    fleet
        .apply_as(
            "user:carol",
            AT + 3,
            decide(RequestDecision::Approve, &hash),
        )
        .unwrap();
    let change = fleet.state.changes.values().last().unwrap();
    assert_eq!(
        (change.version.as_str(), change.started_by.as_str()),
        ("v3", "user:alice")
    );
    assert_eq!(change.approved_by, ["user:bob", "user:carol"]);
    assert_eq!(change.request, 1);
    let request = &fleet.state.approval_requests[&1];
    assert_eq!(
        (request.status, request.change),
        (RequestStatus::Approved, change.number)
    );

    // Another deploy request, then a host joins the service: approvals of the old host list
    // do not carry over.
    fleet.release("web", "v4", 0, &[]);
    let number = fleet.state.changes.len() as u64;
    fleet.capture_and_activate(number, &[("web-1", "s1"), ("web-2", "s2")]);
    let Ok(Outcome::Request(second)) =
        fleet.apply_as("user:alice", AT + 10, deploy_of("web", "v4", false))
    else {
        panic!("a request");
    };
    let hash = fleet.state.approval_requests[&second].plan_hash.clone();
    fleet.host_in("web-3", "eu", "prod", &["web"]);
    let lapsed = refusal(fleet.apply_as(
        "user:bob",
        AT + 11,
        CommandKind::DecideRequest(DecideRequest {
            request: second,
            decision: RequestDecision::Approve,
            plan_hash: hash,
            reason: "ok".into(),
            baseline: None,
            planned: None,
        }),
    ));
    assert!(
        lapsed.contains("its hosts were web-1, web-2 and are now web-1, web-2, web-3"),
        "{lapsed}"
    );
}

#[test]
fn a_break_glass_deploy_runs_at_once_escalated_and_only_where_the_policy_allows() {
    let mut fleet = fleet();
    fleet.release("web", "v3", 0, &[]);
    fleet.release("api", "v3", 0, &[]);
    let started = fleet.apply_as("user:alice", AT, deploy_of("web", "v3", true));
    let Ok(Outcome::Change(number)) = started else {
        panic!("{started:?}");
    };
    let change = &fleet.state.changes[&number];
    assert!(change.break_glass);
    let request = &fleet.state.approval_requests[&change.request];
    assert_eq!(
        (request.status, request.change),
        (RequestStatus::BreakGlass, number)
    );
    let escalation = fleet.state.escalations.values().last().unwrap();
    assert!(
        escalation.evidence.contains("break-glass"),
        "{}",
        escalation.evidence
    );
    let refused = fleet.apply_as("user:alice", AT, deploy_of("api", "v3", true));
    assert!(
        refused
            .as_ref()
            .is_err_and(|error| error.to_string().contains("does not allow break-glass")),
        "{refused:?}"
    );
}

#[test]
fn approvals_by_identities_revoked_since_no_longer_count() {
    let mut fleet = fleet();
    fleet
        .apply_as("user:alice", AT, rollback_of(2, false))
        .unwrap();
    let hash = fleet.state.approval_requests[&1].plan_hash.clone();
    fleet
        .apply_as("user:bob", AT + 1, decide(RequestDecision::Approve, &hash))
        .unwrap();
    // bob is revoked: carol's approval is the first that counts, and nothing runs yet.
    let mut policy = (**fleet.state.access.policy.as_ref().unwrap()).clone();
    policy.deny.push("user:bob".into());
    fleet.state.access.policy = Some(Arc::new(policy.clone()));
    fleet
        .apply_as(
            "user:carol",
            AT + 2,
            decide(RequestDecision::Approve, &hash),
        )
        .unwrap();
    assert!(
        fleet.state.rollbacks.is_empty(),
        "bob's approval no longer counts"
    );
    let approvers: Vec<&str> = fleet.state.approval_requests[&1]
        .approvals
        .iter()
        .map(|approval| approval.identity.as_str())
        .collect();
    assert_eq!(approvers, ["user:carol"]);
    fleet
        .apply_as("user:dan", AT + 3, decide(RequestDecision::Approve, &hash))
        .unwrap();
    assert_eq!(
        fleet.state.rollbacks.values().next().unwrap().approved_by,
        ["user:carol", "user:dan"]
    );

    // A revoked requester loses a pending request.
    fleet.release("web", "v3", 0, &[]);
    let Ok(Outcome::Request(number)) =
        fleet.apply_as("user:eve", AT + 10, deploy_of("web", "v3", false))
    else {
        panic!("a request");
    };
    let hash = fleet.state.approval_requests[&number].plan_hash.clone();
    policy.deny.push("user:eve".into());
    fleet.state.access.policy = Some(Arc::new(policy));
    let lapsed = refusal(fleet.apply_as(
        "user:carol",
        AT + 11,
        CommandKind::DecideRequest(DecideRequest {
            request: number,
            decision: RequestDecision::Approve,
            plan_hash: hash,
            reason: "ok".into(),
            baseline: None,
            planned: None,
        }),
    ));
    assert!(
        lapsed.contains("user:eve is on the policy's deny list"),
        "{lapsed}"
    );
}

/// Freezes `service` on Thursdays, all day (AT falls on 1970-01-01, a Thursday).
fn freeze_thursdays(fleet: &mut Fleet, service: &str) {
    let mut record = fleet.state.services[service].clone();
    record.rto_s = 600;
    record.freeze =
        vec![rewind_shared::freeze::FreezeWindow::parse("Thu 00:00-24:00 UTC").unwrap()];
    fleet.apply(CommandKind::PutService { service: record });
}

#[test]
fn a_freeze_refuses_changes_and_approvals_to_start_them_but_never_a_rollback() {
    let mut fleet = fleet();
    fleet.release("web", "v3", 0, &[]);
    fleet.release("api", "v3", 0, &[]);
    // A deploy request filed before the freeze, approved once.
    fleet
        .apply_as("user:alice", AT, deploy_of("web", "v3", false))
        .unwrap();
    let hash = fleet.state.approval_requests[&1].plan_hash.clone();
    fleet
        .apply_as("user:bob", AT + 1, decide(RequestDecision::Approve, &hash))
        .unwrap();
    freeze_thursdays(&mut fleet, "web");
    freeze_thursdays(&mut fleet, "api");
    let changes_before = fleet.state.changes.len();
    // The last approval cannot start it inside the window.
    let approved = fleet.apply_as(
        "user:carol",
        AT + 2,
        decide(RequestDecision::Approve, &hash),
    );
    let said = format!("{approved:?}");
    assert!(
        said.contains("ServiceFrozen") && said.contains("Thu 00:00-24:00 UTC"),
        "{said}"
    );
    assert_eq!(fleet.state.changes.len(), changes_before);
    // api's environment does not allow break-glass: frozen for good until the window ends.
    let refused = fleet.apply_as("user:alice", AT + 3, deploy_of("api", "v3", true));
    assert!(
        refused.as_ref().is_err_and(|error| error
            .to_string()
            .contains("does not allow break-glass: api is frozen (Thu 00:00-24:00 UTC)")),
        "{refused:?}"
    );
    let refused = fleet.apply_as("user:alice", AT + 3, deploy_of("api", "v3", false));
    assert!(
        refused
            .as_ref()
            .is_err_and(|error| error.to_string().contains("until 1970-01-02T00:00:00Z")),
        "{refused:?}"
    );
    // A rollback is never frozen.
    let started = fleet.apply_as("user:alice", AT + 4, rollback_of(2, true));
    assert!(matches!(started, Ok(Outcome::Rollback(_))), "{started:?}");
    // Friday: the window is over.
    let friday = 86_400_000 + AT;
    let filed = fleet.apply_as("user:alice", friday, deploy_of("web", "v3", false));
    assert!(filed.is_ok(), "{filed:?}");
}
