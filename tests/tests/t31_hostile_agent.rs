//! A host's agent, taken over: every field it sends is bounded and checked before it is logged
//! or kept (`rewind_shared::bounds`), it may speak only for the services it registered, a few
//! such hosts cannot make `fleet list` too large to answer, and what it says reaches an
//! operator's terminal without escape sequences.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::{Coordinator, must_wait, must_wait_async, run_ok};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// A session opened with `host`'s real certificate, speaking raw protocol.
struct HostileAgent {
    outbound: mpsc::Sender<pb::AgentMessage>,
    inbound: Streaming<pb::CoordinatorMessage>,
}

fn register(host: &str, services: &[&str]) -> pb::Register {
    pb::Register {
        host_id: host.into(),
        labels: Some(pb::HostLabels {
            region: "eu-west".into(),
            zone: "a".into(),
            environment: String::new(),
        }),
        services: services.iter().map(|service| service.to_string()).collect(),
        agent_version: "0.1.0".into(),
    }
}

fn message(body: pb::agent_message::Body) -> pb::AgentMessage {
    pb::AgentMessage { body: Some(body) }
}

async fn open(
    coordinator: &Coordinator,
    registered: pb::Register,
) -> Result<HostileAgent, tonic::Status> {
    let mut agents = coordinator.must_agent_client(&registered.host_id).await;
    let (outbound, receiver) = mpsc::channel(16);
    outbound
        .send(message(pb::agent_message::Body::Register(registered)))
        .await
        .unwrap();
    let inbound = agents
        .session(ReceiverStream::new(receiver))
        .await?
        .into_inner();
    Ok(HostileAgent { outbound, inbound })
}

impl HostileAgent {
    async fn send(&self, body: pb::agent_message::Body) {
        self.outbound.send(message(body)).await.unwrap();
    }
}

async fn host_listed(coordinator: &Coordinator, host: &str) -> Option<pb::Host> {
    let mut client = coordinator.must_client().await;
    let mut token = String::new();
    loop {
        let page = client
            .list_hosts(pb::ListHostsRequest {
                page_token: token,
                page_size: 0,
            })
            .await
            .unwrap()
            .into_inner();
        if let Some(found) = page.hosts.into_iter().find(|listed| listed.host_id == host) {
            return Some(found);
        }
        if page.next_page_token.is_empty() {
            return None;
        }
        token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn what_a_host_registers_is_bounded_before_it_reaches_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    let huge_version = pb::Register {
        agent_version: "1".repeat(3 << 20),
        ..register("web-1", &["web"])
    };
    let refused = open(&coordinator, huge_version).await.err().unwrap();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("register.agent_version")
            && refused.message().contains("at most 64"),
        "{}",
        refused.message()
    );
    let mut escaping_region = register("web-1", &["web"]);
    escaping_region.labels.as_mut().unwrap().region = "eu\u{1b}]0;owned\u{7}".into();
    let refused = open(&coordinator, escaping_region).await.err().unwrap();
    assert!(
        refused.message().contains("register.labels.region"),
        "{}",
        refused.message()
    );
    // Nothing of either reached the replicated state.
    assert!(host_listed(&coordinator, "web-1").await.is_none());
}

fn web_report(detail: &str) -> pb::HealthReport {
    pb::HealthReport {
        at_ms: rewind_shared::time::now_ms(),
        probes: vec![pb::ProbeResult {
            service: "web".into(),
            probe: "http".into(),
            ok: detail.is_empty(),
            detail: detail.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_are_bounded_and_speak_only_for_the_hosts_services() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    // 3.9 MB of scrape error (the message limit is 4 MiB): refused whole, never kept.
    let bloating = open(&coordinator, register("web-1", &["web"]))
        .await
        .unwrap();
    let mut oversized = web_report("");
    oversized.app = vec![pb::AppMetrics {
        service: "web".into(),
        error: "e".repeat(3_900_000),
        ..Default::default()
    }];
    bloating
        .send(pb::agent_message::Body::Health(oversized))
        .await;
    // A failing probe for a service this host never registered: it must not move that
    // service's figures (and with them its automatic rollbacks).
    let impostor = open(&coordinator, register("web-2", &["web"]))
        .await
        .unwrap();
    let mut claim = web_report("down");
    claim.probes[0].service = "payments".into();
    impostor.send(pb::agent_message::Body::Health(claim)).await;

    let log_path = dir.path().join("coordinator.log");
    must_wait(Duration::from_secs(20), "both refusals logged", || {
        let log = std::fs::read_to_string(&log_path).unwrap();
        (log.contains("health: 3900") && log.contains("is not one of this host's services"))
            .then_some(())
    });
    for host in ["web-1", "web-2"] {
        let listed = host_listed(&coordinator, host).await.unwrap();
        assert_eq!(listed.last_health, None, "{host}'s report was not kept");
    }
    let payments = coordinator
        .must_client()
        .await
        .get_service_health(pb::GetServiceHealthRequest {
            service: "payments".into(),
        })
        .await
        .map(|answer| answer.into_inner().latest_probes);
    if let Ok(probes) = payments {
        assert!(probes.is_empty(), "payments has no probes: {probes:?}");
    }

    // A report within bounds, from the same session, is kept.
    bloating
        .send(pb::agent_message::Body::Health(web_report("")))
        .await;
    must_wait_async(Duration::from_secs(20), "the good report kept", || async {
        let listed = host_listed(&coordinator, "web-1").await.unwrap();
        listed.last_health.map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_few_hosts_with_the_largest_reports_do_not_break_fleet_list() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    // 256 services with 256 retained releases each: about 0.9 MiB per report, five of them
    // more than one 4 MiB answer could hold.
    let services: Vec<String> = (0..256).map(|index| format!("s{index}")).collect();
    let names: Vec<&str> = services.iter().map(String::as_str).collect();
    let mut sessions = Vec::new();
    for index in 0..5 {
        let host = format!("big-{index}");
        let session = open(&coordinator, register(&host, &names)).await.unwrap();
        let report = pb::HealthReport {
            at_ms: rewind_shared::time::now_ms(),
            retained: services
                .iter()
                .map(|service| pb::RetainedReleases {
                    service: service.clone(),
                    versions: (0..256).map(|v| format!("1.0.0-r{v:05}")).collect(),
                })
                .collect(),
            ..Default::default()
        };
        assert!(prost::Message::encoded_len(&report) > 900_000);
        session.send(pb::agent_message::Body::Health(report)).await;
        sessions.push(session);
    }
    must_wait_async(Duration::from_secs(30), "every report kept", || async {
        for index in 0..5 {
            let host = host_listed(&coordinator, &format!("big-{index}")).await?;
            host.last_health.as_ref()?;
        }
        Some(())
    })
    .await;
    // Pages of about 2 MiB: the first cannot hold all five.
    let first = coordinator
        .must_client()
        .await
        .list_hosts(pb::ListHostsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty(), "the answer is paged");
    assert!(first.hosts.len() < 5);
    // rewindctl shows a page at a time and names the next; following it lists every host.
    let mut listed = String::new();
    let mut page_token = String::new();
    for _ in 0..5 {
        let page = run_ok(&coordinator.rewindctl(&["host", "list", "--page-token", &page_token]));
        listed += &page;
        match page.split_once("--page-token ") {
            Some((_, rest)) => page_token = rest.trim_end().trim_end_matches(')').to_string(),
            None => break,
        }
    }
    for index in 0..5 {
        assert!(listed.contains(&format!("big-{index}")), "{listed}");
    }
    drop(sessions);
}

#[tokio::test(flavor = "multi_thread")]
async fn what_a_host_says_reaches_a_terminal_without_escape_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    let hostile = "\u{1b}]0;owned\u{7}\u{1b}[2J\u{202e}txt.exe";
    let mut agent = open(&coordinator, register("web-1", &["web"]))
        .await
        .unwrap();
    // What the coordinator keeps: an offline summary, shown by `fleet list` and `audit list`.
    agent
        .send(pb::agent_message::Body::OfflineHealth(pb::OfflineHealth {
            from_ms: 1_000,
            to_ms: 61_000,
            reports: 30,
            failing_reports: 1,
            probes: vec![pb::ProbeOutage {
                service: "web".into(),
                probe: "http".into(),
                failed: 1,
                last_detail: hostile.into(),
                ..Default::default()
            }],
        }))
        .await;
    must_wait_async(Duration::from_secs(20), "the summary recorded", || async {
        let listed = host_listed(&coordinator, "web-1").await.unwrap();
        (!listed.last_offline.is_empty()).then_some(())
    })
    .await;
    // What the coordinator passes on as it is: an answer to an inspection, shown by
    // `host drift`.
    let answering = tokio::spawn(async move {
        while let Some(Ok(message)) = agent.inbound.next().await {
            if let Some(pb::coordinator_message::Body::Inspect(request)) = message.body {
                let answer = pb::InspectAnswer {
                    request_id: request.request_id,
                    services: vec![pb::ServiceState {
                        service: "web".into(),
                        snapshot_id: "snap-1".into(),
                        drift: vec![format!("config.toml changed {hostile}")],
                        ..Default::default()
                    }],
                    error: String::new(),
                };
                agent.send(pb::agent_message::Body::Inspected(answer)).await;
            }
        }
    });
    for args in [
        &["host", "list"][..],
        &["audit", "list"][..],
        &["host", "drift", "web-1", "--service", "web"][..],
    ] {
        let output = coordinator.rewindctl(args);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains("owned") && stdout.contains("txt.exe"),
            "{args:?} shows the text:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            !stdout.contains('\u{1b}') && !stdout.contains('\u{7}') && !stdout.contains('\u{202e}'),
            "{args:?} printed raw escapes: {stdout:?}"
        );
        assert!(stdout.contains("\\u{1b}"), "{args:?}: {stdout}");
    }
    answering.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_may_run_only_the_services_the_policy_assigns_it() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    let mut admin = coordinator.must_client().await;
    let policy = admin
        .get_policy(pb::GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    let assign = |rules: &str| pb::ApplyPolicyRequest {
        toml: format!("{}\n{rules}", policy.toml),
        reason: "assign services to hosts".into(),
        ..Default::default()
    };
    admin
        .apply_policy(assign(
            "[[hosts]]\nnames = [\"web-*\"]\nservices = [\"web\"]\n",
        ))
        .await
        .unwrap();
    // The gate follows the policy as it is applied: wait until it refuses.
    let refused = must_wait_async(Duration::from_secs(20), "the rule in force", || async {
        open(&coordinator, register("web-1", &["web", "payments"]))
            .await
            .err()
    })
    .await;
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("host web-1 may not run service payments"),
        "{}",
        refused.message()
    );
    let other = open(&coordinator, register("db-1", &["web"]))
        .await
        .err()
        .unwrap();
    assert!(
        other
            .message()
            .contains("host db-1 may not run service web")
    );
    let web = open(&coordinator, register("web-2", &["web"]))
        .await
        .unwrap();

    // Reassigned while connected: its reports for web are no longer kept.
    let mut latest = web_report("");
    latest.at_ms = 1;
    web.send(pb::agent_message::Body::Health(latest)).await;
    must_wait_async(Duration::from_secs(20), "the first report kept", || async {
        host_listed(&coordinator, "web-2")
            .await?
            .last_health
            .map(|_| ())
    })
    .await;
    admin
        .apply_policy(pb::ApplyPolicyRequest {
            expected_hash: String::new(),
            ..assign("[[hosts]]\nnames = [\"web-1\"]\nservices = [\"web\"]\n")
        })
        .await
        .unwrap();
    let log_path = dir.path().join("coordinator.log");
    must_wait_async(Duration::from_secs(20), "the report refused", || async {
        let mut report = web_report("");
        report.at_ms = 2;
        web.send(pb::agent_message::Body::Health(report)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::fs::read_to_string(&log_path)
            .unwrap()
            .contains("is not one of this host's services")
            .then_some(())
    })
    .await;
    let kept = host_listed(&coordinator, "web-2").await.unwrap();
    assert_eq!(kept.last_health.unwrap().at_ms, 1, "no later report kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_host_rules_a_host_keeps_its_services_until_an_admin_forgets_it() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    let first = open(&coordinator, register("web-1", &["web"]))
        .await
        .unwrap();
    drop(first);
    // Taken over, the host declares another service: refused, naming the way out.
    let refused = open(&coordinator, register("web-1", &["web", "payments"]))
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("host web-1 is registered with services web and may not add payments")
            && refused.message().contains("rewindctl host forget web-1"),
        "{}",
        refused.message()
    );
    assert_eq!(
        host_listed(&coordinator, "web-1").await.unwrap().services,
        ["web"]
    );

    // Forgetting needs a reason, names unknown hosts, and is audited.
    let no_reason = coordinator.rewindctl(&["host", "forget", "web-1", "--reason", " "]);
    assert!(!no_reason.status.success());
    assert!(
        String::from_utf8_lossy(&no_reason.stderr).contains("reason"),
        "{}",
        String::from_utf8_lossy(&no_reason.stderr)
    );
    let unknown = coordinator.rewindctl(&["host", "forget", "web-9", "--reason", "retired"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no host web-9 is registered"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    let forgotten = run_ok(&coordinator.rewindctl(&[
        "host",
        "forget",
        "web-1",
        "--reason",
        "rebuilt to run payments",
    ]));
    assert!(
        forgotten.contains("web-1 forgotten (it ran web)"),
        "{forgotten}"
    );
    assert!(host_listed(&coordinator, "web-1").await.is_none());
    let audit = run_ok(&coordinator.rewindctl(&["audit", "list"]));
    assert!(
        audit.contains("host.forget") && audit.contains("rebuilt to run payments"),
        "{audit}"
    );

    // Registered anew, it is judged as a new host.
    let _again = open(&coordinator, register("web-1", &["web", "payments"]))
        .await
        .unwrap();
    must_wait_async(Duration::from_secs(20), "web-1 registered anew", || async {
        host_listed(&coordinator, "web-1")
            .await
            .filter(|host| host.services == ["web", "payments"])
    })
    .await;
}
