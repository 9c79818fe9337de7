//! Bad input over gRPC gets a clear status naming what is wrong, and changes nothing: one table
//! of (case, request, expected code, expected start of the message, which names the field).

use std::future::Future;
use std::pin::Pin;

use rewind_proto::v1 as pb;
use rewind_tests::Coordinator;
use tonic::Code;

type Call = Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>;

/// One row: what is sent, and how it must be refused.
struct Case {
    name: &'static str,
    call: Call,
    code: Code,
    message_start: String,
}

/// `client.$method(request)` as a row's call, on a clone of the client.
macro_rules! call {
    ($client:expr, $method:ident, $request:expr) => {{
        let mut client = $client.clone();
        let request = $request;
        Box::pin(async move { client.$method(request).await.map(|_| ()) }) as Call
    }};
}

fn case(name: &'static str, call: Call, code: Code, message_start: impl Into<String>) -> Case {
    Case {
        name,
        call,
        code,
        message_start: message_start.into(),
    }
}

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

fn service(
    name: &str,
    policy: Option<pb::HealthPolicy>,
    synthetics: Vec<pb::SyntheticCheck>,
) -> pb::PutServiceRequest {
    pb::PutServiceRequest {
        request_id: String::new(),
        service: Some(pb::Service {
            rto_s: 0,
            freeze_windows: vec![],
            drift_policy: String::new(),
            isolate_after_failures: 0,
            name: name.into(),
            depends_on: vec![],
            policy,
            synthetics,
            rollback_steps: Vec::new(),
        }),
    }
}

/// Service `api` with a recovery time objective and freeze windows.
fn objectives(rto_s: u64, freeze: &[&str]) -> pb::PutServiceRequest {
    let mut request = service("api", None, vec![]);
    let service = request.service.as_mut().unwrap();
    service.rto_s = rto_s;
    service.freeze_windows = freeze.iter().map(|window| window.to_string()).collect();
    request
}

fn with_condition(condition: pb::PolicyCondition) -> pb::PutServiceRequest {
    let policy = pb::HealthPolicy {
        max_probe_failure_ratio: 0.5,
        for_s: 1,
        watch_s: 60,
        auto_rollback: true,
        conditions: vec![condition],
    };
    service("api", Some(policy), vec![])
}

fn with_synthetic(check: pb::SyntheticCheck) -> pb::PutServiceRequest {
    service("api", None, vec![check])
}

fn change(service: &str, version: &str) -> pb::StartChangeRequest {
    pb::StartChangeRequest {
        break_glass: false,
        request_id: String::new(),
        service: service.into(),
        version: version.into(),
        host_ids: vec![],
        reason: "test".into(),
        flags_on: vec![],
        migrations: vec![],
    }
}

fn rollback(change_id: &str, reason: String) -> pb::StartRollbackRequest {
    pb::StartRollbackRequest {
        request_id: String::new(),
        change_id: change_id.into(),
        reason,
        max_parallel: 0,
        ..Default::default()
    }
}

fn by_hand(txn_id: &str, host_id: &str, reason: &str) -> pb::ResolvedByHandRequest {
    pb::ResolvedByHandRequest {
        request_id: String::new(),
        txn_id: txn_id.into(),
        host_id: host_id.into(),
        reason: reason.into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_with_the_field_named_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    let mut client = coordinator.must_client().await;
    let digest = format!("sha256:{}", "ab".repeat(32));
    client
        .put_service(service("web", None, vec![]))
        .await
        .unwrap();
    client
        .register_release(release("web", "v1", &digest))
        .await
        .unwrap();
    let audit_before = client
        .list_audit(pb::ListAuditRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let error_ratio = pb::HealthFigure::ErrorRatio as i32;
    let condition = |condition: pb::PolicyCondition| with_condition(condition);
    let login = |check: pb::SyntheticCheck| {
        with_synthetic(pb::SyntheticCheck {
            name: "login".into(),
            ..check
        })
    };
    let mut needs_bad_provider = release("web", "v9", &digest);
    if let Some(release) = needs_bad_provider.release.as_mut() {
        release.requires.insert("Not A Name".into(), 2);
    }
    let mut with_ghost = change("web", "v1");
    with_ghost.host_ids = vec!["ghost".into()];
    let mut bad_gate = rollback("ch-1", "test".into());
    bad_gate.options = Some(pb::PlanOptions {
        gate: Some(pb::GateOptions {
            tolerance: 2.0,
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut unexplained_loss = rollback("ch-1", "test".into());
    unexplained_loss.options = Some(pb::PlanOptions {
        accept_data_loss: " x ".into(),
        ..Default::default()
    });
    let mut bad_migration = change("web", "v1");
    bad_migration.migrations = vec!["orders-0042".into()];
    let mut bad_hash = rollback("ch-1", "test".into());
    bad_hash.plan_hash = "md5:abc".into();
    let mut spaced_rollback = rollback("ch-1", "test".into());
    spaced_rollback.request_id = "has space".into();
    let mut spaced_change = change("web", "v1");
    spaced_change.request_id = "has space".into();
    // What cluster version 10 brought: hand-made changes, topics, the breaker.
    let with_service = |edit: fn(&mut pb::Service)| {
        let mut request = service("web", None, vec![]);
        edit(request.service.as_mut().unwrap());
        request
    };
    let with_release = |edit: fn(&mut pb::Release)| {
        let mut request = release("web", "v9", &digest);
        edit(request.release.as_mut().unwrap());
        request
    };
    let excluding = |hosts: Vec<String>| pb::StartRollbackRequest {
        options: Some(pb::PlanOptions {
            exclude_hosts: hosts,
            ..Default::default()
        }),
        ..rollback("ch-1", "test".into())
    };
    let isolate_in = |region: &str| pb::RollbackActionRequest {
        rollback_id: "rb-1".into(),
        service: "web".into(),
        region: region.into(),
        reason: "test".into(),
        ..Default::default()
    };
    let adopt = |host_id: &str, reason: &str| pb::AdoptHostStateRequest {
        host_id: host_id.into(),
        service: String::new(),
        reason: reason.into(),
    };
    let get_change = |change_id: &str| pb::GetChangeRequest {
        change_id: change_id.into(),
    };

    use Code::{AlreadyExists, FailedPrecondition, InvalidArgument, NotFound};
    let c = &client;
    // One row per case, kept on one line each so the table reads as one.
    // Clients before 0.3 name the page by its old fields, still read for one release.
    #[allow(deprecated)]
    let (legacy_changes, legacy_rollbacks) = (
        pb::ListChangesRequest {
            limit: 1001,
            ..Default::default()
        },
        pb::ListRollbacksRequest {
            before: "ch-3".into(),
            ..Default::default()
        },
    );
    #[rustfmt::skip]
    let cases = vec![
        case("a service is required", call!(c, put_service, pb::PutServiceRequest { request_id: String::new(), service: None }), InvalidArgument, "service: is required"),
        case("a service has a name", call!(c, put_service, service("", None, vec![])), InvalidArgument, "service.name: must not be empty"),
        case("a probe failure ratio is a ratio", call!(c, put_service, service("api", Some(pb::HealthPolicy { max_probe_failure_ratio: 3.0, for_s: 1, watch_s: 1, auto_rollback: true, ..Default::default() }), vec![])), InvalidArgument, "service.policy.max_probe_failure_ratio"),
        case("a condition names a figure", call!(c, put_service, condition(pb::PolicyCondition { figure: 0, threshold: 0.1, for_s: 5, ..Default::default() })), InvalidArgument, "service.policy.conditions[0].figure"),
        case("a ratio threshold is within 0..=1", call!(c, put_service, condition(pb::PolicyCondition { figure: error_ratio, threshold: 1.5, for_s: 5, ..Default::default() })), InvalidArgument, "service.policy.conditions[0].threshold: is 1.5; as a ratio it must be within 0..=1"),
        case("a baseline multiple is positive", call!(c, put_service, condition(pb::PolicyCondition { figure: error_ratio, threshold: 0.0, relative_to_baseline: true, for_s: 5 })), InvalidArgument, "service.policy.conditions[0].threshold: is 0; as a multiple of the baseline"),
        case("a condition holds for a while", call!(c, put_service, condition(pb::PolicyCondition { figure: error_ratio, threshold: 0.1, for_s: 0, ..Default::default() })), InvalidArgument, "service.policy.conditions[0].for_s: is 0, must be within 1..=3600 s"),
        case("a synthetic check is plain HTTP", call!(c, put_service, login(pb::SyntheticCheck { url: "https://x".into(), ..Default::default() })), InvalidArgument, "service.synthetics[login].url"),
        case("a synthetic check GETs or POSTs", call!(c, put_service, login(pb::SyntheticCheck { url: "http://x".into(), method: "DELETE".into(), ..Default::default() })), InvalidArgument, "service.synthetics[login].method: \"DELETE\" is not GET or POST"),
        case("a synthetic check expects an HTTP status", call!(c, put_service, login(pb::SyntheticCheck { url: "http://x".into(), expect_status: 99, ..Default::default() })), InvalidArgument, "service.synthetics[login].expect_status: 99 is not an HTTP status"),
        case("a synthetic check's latency is bounded", call!(c, put_service, login(pb::SyntheticCheck { url: "http://x".into(), max_latency_ms: 70_000, ..Default::default() })), InvalidArgument, "service.synthetics[login].max_latency_ms: is 70000"),
        case("an RTO is bounded", call!(c, put_service, objectives(31 * 86_400, &[])), InvalidArgument, "service.rto_s: is 2678400 s, at most 2592000 s"),
        case("a freeze window is UTC", call!(c, put_service, objectives(600, &["Sat 00:00-06:00 CET"])), InvalidArgument, "service.freeze_windows: \"Sat 00:00-06:00 CET\" must end in UTC"),
        case("a freeze window names days", call!(c, put_service, objectives(600, &["Caturday 00:00-06:00 UTC"])), InvalidArgument, "service.freeze_windows: \"Caturday 00:00-06:00 UTC\": \"Caturday\" is not a day"),
        case("a freeze window's text is bounded", call!(c, put_service, objectives(600, &[&format!("Sat 00:00-06:00 UTC{}", " ".repeat(10) + &"x".repeat(70))])), InvalidArgument, "service.freeze_windows: \"Sat 00:00-06:00 UTC xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\" is longer than 64 bytes"),
        case("freeze windows are counted", call!(c, put_service, objectives(600, &["Sat 00:00-06:00 UTC"; 17])), InvalidArgument, "service.freeze_windows: names more than 16 windows"),
        case("a freeze window's control characters are escaped", call!(c, put_service, objectives(600, &["Sat\u{1b}[31m 00:00-06:00 UTC"])), InvalidArgument, "service.freeze_windows: \"Sat\\u{1b}[31m 00:00-06:00 UTC\""),
        case("a release requires providers by name", call!(c, register_release, needs_bad_provider), InvalidArgument, "release.requires:"),
        case("a release version is a name", call!(c, register_release, release("web", "v 2", &digest)), InvalidArgument, "release.version:"),
        case("a release digest is sha256", call!(c, register_release, release("web", "v2", "md5:abc")), InvalidArgument, "release.artifact_digest:"),
        case("a release is of a known service", call!(c, register_release, release("nope", "v2", &digest)), NotFound, "no service nope: known services are web"),
        case("a release is registered once", call!(c, register_release, release("web", "v1", &format!("sha256:{}", "cd".repeat(32)))), AlreadyExists, "release web v1 is already registered"),
        case("a change is of a known release", call!(c, start_change, change("web", "v9")), NotFound, "no release v9 of service web: known versions are v1"),
        case("a change names its service", call!(c, start_change, change("", "v1")), InvalidArgument, "service: must not be empty"),
        case("a change needs hosts", call!(c, start_change, change("web", "v1")), FailedPrecondition, "no registered host runs service web"),
        case("a change names registered hosts", call!(c, start_change, with_ghost), NotFound, "no host ghost is registered"),
        case("a change migration is database@version", call!(c, start_change, bad_migration), InvalidArgument, "migrations: \"orders-0042\" is not database@version"),
        case("a change's request id is a name", call!(c, start_change, spaced_change), InvalidArgument, "request_id:"),
        case("a change id is given", call!(c, get_change, get_change("")), InvalidArgument, "change_id: must not be empty"),
        case("a change id looks like one", call!(c, get_change, get_change("banana")), InvalidArgument, "change_id: \"banana\" is not an id like ch-12"),
        case("a change id names a change", call!(c, get_change, get_change("ch-99")), NotFound, "no change ch-99: known changes are none"),
        case("a rollback id names a rollback", call!(c, get_rollback, pb::GetRollbackRequest { rollback_id: "rb-4".into(), ..Default::default() }), NotFound, "no rollback rb-4"),
        case("a rollback selects changes by change id", call!(c, start_rollback, rollback("rb-1", "test".into())), InvalidArgument, "selection.change_ids: \"rb-1\" is not an id like ch-12"),
        case("a gate tolerance is within 0..=1", call!(c, start_rollback, bad_gate), InvalidArgument, "options.gate.tolerance: is 2, must be within 0..=1"),
        case("accepting data loss says why", call!(c, start_rollback, unexplained_loss), InvalidArgument, "options.accept_data_loss: say why losing that data is acceptable"),
        case("a plan hash is sha256", call!(c, start_rollback, bad_hash), InvalidArgument, "plan_hash:"),
        case("a reason is bounded", call!(c, start_rollback, rollback("ch-1", "x".repeat(2000))), InvalidArgument, "reason: is 2000 bytes, at most 1024"),
        case("a change says why", call!(c, start_change, pb::StartChangeRequest { reason: " ".into(), ..change("web", "v1") }), InvalidArgument, "reason: say why this change"),
        case("a rollback says why", call!(c, start_rollback, rollback("ch-1", String::new())), InvalidArgument, "reason: say why you roll back"),
        case("a rollback's request id is a name", call!(c, start_rollback, spaced_rollback), InvalidArgument, "request_id: \"has space\" contains ' '"),
        case("a plan names known services", call!(c, plan_rollback, pb::PlanRollbackRequest { selection: Some(pb::RollbackSelection { services: vec!["nope".into()], ..Default::default() }), options: None }), NotFound, "no service nope"),
        case("skipping a host says why", call!(c, skip_host, pb::RollbackActionRequest { rollback_id: "rb-1".into(), host_id: "web-1".into(), ..Default::default() }), InvalidArgument, "reason: say why the host is left unreverted"),
        case("aborting says why", call!(c, abort_rollback, pb::RollbackActionRequest { rollback_id: "rb-1".into(), ..Default::default() }), InvalidArgument, "reason: say why you abort it"),
        case("a schema transaction id looks like one", call!(c, list_schema_txns, pb::ListSchemaTxnsRequest { txn_id: "tx-1".into(), ..Default::default() }), InvalidArgument, "txn_id: \"tx-1\" is not an id like st-12"),
        case("a schema transaction id names one", call!(c, list_schema_txns, pb::ListSchemaTxnsRequest { txn_id: "st-9".into(), detailed: true, ..Default::default() }), NotFound, "no schema transaction st-9"),
        case("a resolved shard names its transaction", call!(c, resolved_by_hand, by_hand("tx-1", "db-1", "done")), InvalidArgument, "txn_id: \"tx-1\" is not an id like st-12"),
        case("a resolved shard is a host name", call!(c, resolved_by_hand, by_hand("st-1", "bad host", "done")), InvalidArgument, "host_id:"),
        case("a resolved shard says what was done", call!(c, resolved_by_hand, by_hand("st-1", "db-1", " ")), InvalidArgument, "reason: say what was done to the shard"),
        case("a resolved shard's transaction exists", call!(c, resolved_by_hand, by_hand("st-9", "db-1", "done")), InvalidArgument, "txn_id: no schema transaction st-9"),
        case("a drill id names a drill", call!(c, get_drill, pb::GetDrillRequest { drill_id: "dr-9".into() }), NotFound, "no drill dr-9"),
        case("a drill is of a known change", call!(c, start_drill, pb::StartDrillRequest { request_id: String::new(), change_id: "ch-9".into(), environment: "staging".into(), reason: "test".into() }), InvalidArgument, "change_id: no change ch-9"),
        case("a drill's environment is a name", call!(c, start_drill, pb::StartDrillRequest { request_id: String::new(), change_id: "ch-1".into(), environment: "bad env".into(), reason: "test".into() }), InvalidArgument, "environment:"),
        case("a fire drill id looks like one", call!(c, get_rollback_drill, pb::GetRollbackDrillRequest { drill_id: "dr-1".into() }), InvalidArgument, "drill_id: \"dr-1\" is not an id like rd-12"),
        case("a fire drill id names a drill", call!(c, get_rollback_drill, pb::GetRollbackDrillRequest { drill_id: "rd-9".into() }), NotFound, "no fire drill rd-9"),
        case("a fire drill says why", call!(c, start_rollback_drill, pb::StartRollbackDrillRequest { service: "web".into(), environment: "staging".into(), version: "v2".into(), reason: " ".into(), ..Default::default() }), InvalidArgument, "reason: say why you drill it"),
        case("a fire drill's service is a name", call!(c, start_rollback_drill, pb::StartRollbackDrillRequest { service: "bad svc".into(), environment: "staging".into(), version: "v2".into(), reason: "test".into(), ..Default::default() }), InvalidArgument, "service:"),
        case("a fire drill's environment is a name", call!(c, start_rollback_drill, pb::StartRollbackDrillRequest { service: "web".into(), environment: "bad env".into(), version: "v2".into(), reason: "test".into(), ..Default::default() }), InvalidArgument, "environment:"),
        case("a fire drill's release is a version", call!(c, start_rollback_drill, pb::StartRollbackDrillRequest { service: "web".into(), environment: "staging".into(), version: "v 2".into(), reason: "test".into(), ..Default::default() }), InvalidArgument, "version:"),
        case("a fire drill's release is registered", call!(c, start_rollback_drill, pb::StartRollbackDrillRequest { service: "web".into(), environment: "staging".into(), version: "v9".into(), reason: "test".into(), ..Default::default() }), NotFound, "no release v9 of service web"),
        case("a fire drill's abort says why", call!(c, abort_rollback_drill, pb::AbortRollbackDrillRequest { drill_id: "rd-1".into(), ..Default::default() }), InvalidArgument, "reason: say why you stop the drill"),
        case("a fire drill list is bounded", call!(c, list_rollback_drills, pb::ListRollbackDrillsRequest { page_size: 1001, ..Default::default() }), InvalidArgument, "page_size: is 1001, at most 1000 are returned at once"),
        case("a fire drill list pages by drill id", call!(c, list_rollback_drills, pb::ListRollbackDrillsRequest { page_token: "dr-3".into(), ..Default::default() }), InvalidArgument, "page_token: \"dr-3\" is not an id like rd-12"),
        case("a flag says why", call!(c, set_flag, pb::SetFlagRequest { service: "web".into(), name: "new-ui".into(), enabled: true, ..Default::default() }), InvalidArgument, "reason: say why you set the flag"),
        case("a policy change says why", call!(c, apply_policy, pb::ApplyPolicyRequest { toml: "x".into(), ..Default::default() }), InvalidArgument, "reason: say why the policy changes"),
        case("a token revocation says why", call!(c, revoke_join_token, pb::RevokeJoinTokenRequest { token_id: "jt-1".into(), ..Default::default() }), InvalidArgument, "reason: say why the token is revoked"),
        case("a leadership transfer says why", call!(c, transfer_leader, pb::TransferLeaderRequest { member_id: 2, ..Default::default() }), InvalidArgument, "reason: say why leadership moves"),
        case("a member's removal says why", call!(c, remove_member, pb::RemoveMemberRequest { member_id: 9, reason: " ".into() }), InvalidArgument, "reason: say why the member leaves"),
        case("a member's addition says why", call!(c, add_member, pb::AddMemberRequest { member_id: 5, address: "127.0.0.1:1".into(), ..Default::default() }), InvalidArgument, "reason: say why the member joins"),
        case("a drill says why", call!(c, start_drill, pb::StartDrillRequest { request_id: String::new(), change_id: "ch-1".into(), environment: "staging".into(), reason: " ".into() }), InvalidArgument, "reason: say why you drill it"),
        case("a change list is bounded", call!(c, list_changes, pb::ListChangesRequest { page_size: 1001, ..Default::default() }), InvalidArgument, "page_size: is 1001, at most 1000 are returned at once"),
        case("a change list reads its old page size", call!(c, list_changes, legacy_changes), InvalidArgument, "limit: is 1001, at most 1000 are returned at once"),
        case("a rollback list pages by rollback id", call!(c, list_rollbacks, pb::ListRollbacksRequest { page_token: "ch-3".into(), ..Default::default() }), InvalidArgument, "page_token: \"ch-3\" is not an id like rb-12"),
        case("a rollback list reads its old page token", call!(c, list_rollbacks, legacy_rollbacks), InvalidArgument, "before: \"ch-3\" is not an id like rb-12"),
        case("an audit page is bounded", call!(c, list_audit, pb::ListAuditRequest { page_size: 5000, ..Default::default() }), InvalidArgument, "page_size: is 5000"),
        case("an audit page token is an index", call!(c, list_audit, pb::ListAuditRequest { page_token: "x".into(), ..Default::default() }), InvalidArgument, "page_token: \"x\" is not an audit index"),
        case("a host page is bounded", call!(c, list_hosts, pb::ListHostsRequest { page_size: 5000, page_token: String::new() }), InvalidArgument, "page_size: is 5000"),
        case("a trigger list is bounded", call!(c, list_triggers, pb::ListTriggersRequest { page_size: 1001, ..Default::default() }), InvalidArgument, "page_size: is 1001"),
        case("a schema transaction page token is one", call!(c, list_schema_txns, pb::ListSchemaTxnsRequest { page_token: "rb-1".into(), ..Default::default() }), InvalidArgument, "page_token: \"rb-1\" is not an id like st-12"),
        case("a join token page is bounded", call!(c, list_join_tokens, pb::ListJoinTokensRequest { page_size: 1001, page_token: String::new() }), InvalidArgument, "page_size: is 1001"),
        case("a request page token is one", call!(c, list_requests, pb::ListRequestsRequest { page_token: "req-x".into(), ..Default::default() }), InvalidArgument, "page_token: \"req-x\" is not an id like req-12"),
        case("a host page token is a host id", call!(c, list_hosts, pb::ListHostsRequest { page_token: "Web 1!".into(), page_size: 0 }), InvalidArgument, "page_token"),
        case("an archive confirmation says where it is kept", call!(c, confirm_audit_archive, pb::ConfirmAuditArchiveRequest { through_index: 1, manifest_hash: "ab".repeat(32), ..Default::default() }), InvalidArgument, "reason: say where the archive is kept"),
        case("an archive confirmation names a manifest hash", call!(c, confirm_audit_archive, pb::ConfirmAuditArchiveRequest { through_index: 1, manifest_hash: "not-hex".into(), reason: "s3".into(), ..Default::default() }), InvalidArgument, "manifest_hash: not a manifest hash"),
        case("a redaction says why", call!(c, redact_audit, pb::RedactAuditRequest { index: 1, fields: vec!["identity".into()], ..Default::default() }), InvalidArgument, "reason: say why"),
        case("a redaction names real fields", call!(c, redact_audit, pb::RedactAuditRequest { index: 1, fields: vec!["salary".into()], reason: "gdpr".into(), ..Default::default() }), InvalidArgument, "fields: \"salary\" is not something that can be redacted"),
        case("an export's range is not empty", call!(c, export_audit, pb::ExportAuditRequest { since_ms: 50, until_ms: 40, ..Default::default() }), InvalidArgument, "until_ms: 40 is not after since_ms 50"),
        case("an export redacts what it knows", call!(c, export_audit, pb::ExportAuditRequest { redact: vec!["salaries".into()], ..Default::default() }), InvalidArgument, "redact: \"salaries\" is not something that can be redacted"),
        case("a note names an incident", call!(c, note_incident, pb::NoteIncidentRequest { incident_id: "rb-1".into(), text: "hi".into(), ..Default::default() }), InvalidArgument, "incident_id: \"rb-1\" is not an id like in-12"),
        case("a note says something", call!(c, note_incident, pb::NoteIncidentRequest { incident_id: "in-1".into(), text: " \n ".into(), ..Default::default() }), InvalidArgument, "text: is 0 bytes: a note says something"),
        case("a note is bounded", call!(c, note_incident, pb::NoteIncidentRequest { incident_id: "in-1".into(), text: "n".repeat(5000), ..Default::default() }), InvalidArgument, "text: is 5000 bytes"),
        case("a note cannot steer a terminal", call!(c, note_incident, pb::NoteIncidentRequest { incident_id: "in-1".into(), text: "ok\u{1b}[2J".into(), ..Default::default() }), InvalidArgument, "text: holds control characters"),
        case("an incident closes with an analysis", call!(c, close_incident, pb::CloseIncidentRequest { incident_id: "in-1".into(), rca_markdown: "  ".into(), ..Default::default() }), InvalidArgument, "rca_markdown: is 0 bytes"),
        case("an analysis is bounded", call!(c, close_incident, pb::CloseIncidentRequest { incident_id: "in-1".into(), rca_markdown: "r".repeat(64 * 1024 + 1), ..Default::default() }), InvalidArgument, "rca_markdown: is 65537 bytes"),
        case("an incident id names an incident", call!(c, get_incident, pb::GetIncidentRequest { incident_id: "in-99".into() }), NotFound, "no incident in-99"),
        case("a drift policy is skip or overwrite", call!(c, put_service, with_service(|service| service.drift_policy = "ignore".into())), InvalidArgument, "service.drift_policy: is \"ignore\"; it may be skip (the default) or overwrite"),
        case("a breaker trips after at most 10 failures", call!(c, put_service, with_service(|service| service.isolate_after_failures = 11)), InvalidArgument, "service.isolate_after_failures: is 11, at most 10"),
        case("a topic is a name", call!(c, register_release, with_release(|release| { release.produces.insert("Orders Created".into(), 1); })), InvalidArgument, "release.produces:"),
        case("a message schema version is 1 or more", call!(c, register_release, with_release(|release| { release.consumes.insert("orders.created".into(), 0); })), InvalidArgument, "release.consumes: topic orders.created: a message schema version is 1 or more"),
        case("topics are counted", call!(c, register_release, with_release(|release| { release.produces = (0..257).map(|n| (format!("t{n}"), 1)).collect(); })), InvalidArgument, "release.produces: names more than 256 topics"),
        case("a host left out is a name", call!(c, start_rollback, excluding(vec!["bad host".into()])), InvalidArgument, "options.exclude_hosts:"),
        case("hosts left out are counted", call!(c, start_rollback, excluding((0..1025).map(|n| format!("h{n}")).collect())), InvalidArgument, "options.exclude_hosts: names 1025 hosts, at most 1024"),
        case("an isolated region is a name", call!(c, isolate_service, isolate_in("Bad Region")), InvalidArgument, "region:"),
        case("an isolated region is bounded", call!(c, isolate_service, isolate_in(&"r".repeat(64))), InvalidArgument, "region: is 64 bytes, at most 63"),
        case("an adoption says why", call!(c, adopt_host_state, adopt("web-1", " ")), InvalidArgument, "reason: say why the host's state is accepted"),
        case("an adoption names a registered host", call!(c, adopt_host_state, adopt("ghost", "hotfix stays")), NotFound, "host ghost is not registered"),
    ];
    let mut wrong = Vec::new();
    for case in cases {
        match case.call.await {
            Ok(()) => wrong.push(format!("{}: accepted", case.name)),
            Err(status) => {
                if status.code() != case.code || !status.message().starts_with(&case.message_start)
                {
                    wrong.push(format!(
                        "{}: expected {:?} starting {:?}, got {:?} {:?}",
                        case.name,
                        case.code,
                        case.message_start,
                        status.code(),
                        status.message()
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // A message over the 4 MiB limit is refused before any handler sees it.
    let oversize = client
        .start_rollback(rollback("ch-1", "x".repeat(5 * 1024 * 1024)))
        .await
        .expect_err("oversize");
    assert!(
        matches!(oversize.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{oversize:?}"
    );

    // The stable code travels beside the message.
    let error_code = client.get_change(get_change("ch-99")).await.unwrap_err();
    assert_eq!(
        error_code
            .metadata()
            .get("rewind-error-code")
            .and_then(|value| value.to_str().ok()),
        Some("unknown_change")
    );

    let audit_after = client
        .list_audit(pb::ListAuditRequest {
            page_size: 1000,
            ..Default::default()
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
