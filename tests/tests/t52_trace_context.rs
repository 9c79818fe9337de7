//! W3C Trace Context: a caller's `traceparent` on a gRPC call or a webhook request names the
//! trace of every line the coordinator logs for it, so a tracing system's trace leads to
//! rewind's side of the request; a call without one gets a trace of its own. A rollback's steps
//! run in the rollback's own trace, carried to the agents with each step, and every member and
//! host names it and the rollback id on its lines; spans go to an OTLP collector when asked.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

use rewind_proto::v1 as pb;
use rewind_shared::dev_ca::Subject;
use rewind_shared::identity::Kind;
use rewind_tests::*;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "multi_thread")]
async fn a_callers_trace_id_is_on_the_log_lines_of_its_call_and_webhook() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator =
        Coordinator::must_start_with(dir.path(), "[http]\nlisten = \"127.0.0.1:0\"\n");
    let log = dir.path().join("coordinator.log");
    let logged = |needle: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };

    // A person no binding allows: refused, and the refusal's line names the caller's trace.
    let files = coordinator
        .ca()
        .write_identity(
            &coordinator.tls_dir(),
            &Subject::new(Kind::User, "nobody"),
            &[],
        )
        .unwrap();
    let channel = tls_channel(&files, &coordinator.address).await.unwrap();
    let mut client = pb::control_service_client::ControlServiceClient::new(channel);
    let mut request = tonic::Request::new(pb::ListMembersRequest {});
    request
        .metadata_mut()
        .insert("traceparent", TRACEPARENT.parse().unwrap());
    let refused = client.list_members(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    must_wait(Duration::from_secs(10), "the refusal logged", || {
        logged("Refused.")
            .iter()
            .any(|line| line.contains(TRACE_ID) && line.contains("ListMembers"))
            .then_some(())
    });
    // Without a traceparent (or with one that does not parse), a trace of its own.
    let mut request = tonic::Request::new(pb::ListMembersRequest {});
    request
        .metadata_mut()
        .insert("traceparent", "not-a-traceparent".parse().unwrap());
    assert_eq!(
        client.list_members(request).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    must_wait(Duration::from_secs(10), "the second refusal logged", || {
        (logged("Refused.").len() >= 2).then_some(())
    });
    let second = logged("Refused.").pop().unwrap();
    assert!(
        second.contains("trace_id=") && !second.contains(TRACE_ID),
        "{second}"
    );

    // A webhook request: the receiver is off here, and says so in the request's trace.
    let answer = reqwest::Client::new()
        .post(format!(
            "http://{}/v1/alertmanager",
            coordinator.http_address
        ))
        .header("traceparent", TRACEPARENT)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 404);
    must_wait(
        Duration::from_secs(10),
        "the webhook refusal logged",
        || {
            logged("Webhook refused.")
                .iter()
                .any(|line| line.contains(TRACE_ID))
                .then_some(())
        },
    );
}

/// A span an OTLP collector received, with the service that sent it.
#[derive(Clone, Debug)]
struct ReceivedSpan {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    /// The span's string attributes (`code.module.name`: where it was made).
    attributes: std::collections::BTreeMap<String, String>,
}

/// A small OTLP/gRPC trace collector: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .and_then(
                    |attribute| match attribute.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(name) => Some(name.clone()),
                        _ => None,
                    },
                )
                .unwrap_or_default();
            for span in resource_spans
                .scope_spans
                .into_iter()
                .flat_map(|scope| scope.spans)
            {
                spans.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex::encode(span.trace_id),
                    span_id: hex::encode(span.span_id),
                    parent_span_id: hex::encode(span.parent_span_id),
                    attributes: span
                        .attributes
                        .iter()
                        .filter_map(
                            |attribute| match attribute.value.as_ref()?.value.as_ref()? {
                                Value::StringValue(text) => {
                                    Some((attribute.key.clone(), text.clone()))
                                }
                                _ => None,
                            },
                        )
                        .collect(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves on a loopback port; returns its `http://` endpoint.
    async fn must_start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        endpoint
    }

    fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }
}

/// The JSON log lines in `path` (the process ran with `REWIND_LOG_FORMAT=json`).
fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// The value of `field` on the line or on any span it was logged in.
fn field_of<'a>(line: &'a serde_json::Value, field: &str) -> Vec<&'a str> {
    let mut values: Vec<&str> = line["fields"][field].as_str().into_iter().collect();
    for span in line["spans"].as_array().into_iter().flatten() {
        values.extend(span[field].as_str());
    }
    values
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollbacks_trace_reaches_the_agents_logs_and_an_otlp_collector() {
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::default();
    let endpoint = collector.must_start().await;
    let environment = [
        ("REWIND_LOG_FORMAT", "json"),
        ("REWIND_OTLP_ENDPOINT", endpoint.as_str()),
    ];
    // The libraries' own spans logged too, so the export's filter is what keeps them out.
    let noisy = [
        environment[0],
        environment[1],
        (
            "REWIND_LOG",
            "info,sled=warn,h2=trace,hyper=trace,tonic=trace,tower=trace",
        ),
    ];
    let coordinator =
        Coordinator::must_start_with_environment(&dir.path().join("coordinator"), "", &noisy);
    let mut hosts: Vec<TestHost> = ["web-1", "web-2"]
        .iter()
        .map(|id| TestHost::must_prepare(dir.path(), id, &coordinator))
        .collect();
    for host in &mut hosts {
        host.must_start_agent_with_environment(&environment);
    }
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, hosts.len()).await;
    must_deploy_v1_then_v2(&mut client, &hosts).await;

    // The operator's rollback call carries the operator's trace.
    let mut start = tonic::Request::new(pb::StartRollbackRequest {
        request_id: "rb".into(),
        change_id: "ch-2".into(),
        reason: "bad release".into(),
        ..Default::default()
    });
    start
        .metadata_mut()
        .insert("traceparent", TRACEPARENT.parse().unwrap());
    let rollback_id = client
        .start_rollback(start)
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap()
        .rollback_id;
    let rollback = must_rollback_end(&client, &rollback_id).await;
    assert_eq!(rollback.state, pb::RollbackState::Succeeded as i32);

    // The call's line, in the caller's trace, names the rollback's trace.
    let coordinator_log = coordinator.dir.join("coordinator.log");
    let started = json_lines(&coordinator_log)
        .into_iter()
        .find(|line| field_of(line, "operation").contains(&rollback_id.as_str()))
        .expect("the line tying the call to the rollback's trace");
    assert_eq!(field_of(&started, "trace_id"), [TRACE_ID], "{started}");
    let rollback_trace = field_of(&started, "operation_trace_id")[0].to_string();
    assert_ne!(rollback_trace, TRACE_ID);

    // Every line about one of the rollback's steps, on the coordinator and on both agents,
    // is made in the step's span, naming the rollback and its trace (the call's own lines name
    // the caller's).
    let step_prefix = format!("{rollback_id}/");
    for log in std::iter::once(coordinator_log.clone()).chain(
        hosts
            .iter()
            .map(|host| host.config_path.with_file_name("agent.log")),
    ) {
        let about_rollback: Vec<serde_json::Value> = json_lines(&log)
            .into_iter()
            .filter(|line| {
                field_of(line, "step_id")
                    .iter()
                    .any(|step| step.starts_with(&step_prefix))
            })
            .collect();
        assert!(
            !about_rollback.is_empty(),
            "no line of {} names {rollback_id}",
            log.display()
        );
        for line in &about_rollback {
            let span = &line["span"];
            assert_eq!(span["name"], "step", "{}: {line}", log.display());
            assert_eq!(span["rollback_id"], rollback_id.as_str(), "{line}");
            assert_eq!(span["trace_id"], rollback_trace.as_str(), "{line}");
        }
        if log != coordinator_log {
            assert!(
                about_rollback
                    .iter()
                    .any(|line| line["fields"]["message"] == "Step ended."),
                "the agent's step lines in {}",
                log.display()
            );
        }
    }

    // The collector has the call in the caller's trace, under the caller's span, and the
    // rollback's steps from the coordinator and from the agents in the rollback's trace, each
    // agent's step a child of the coordinator's span that sent it.
    // Each process exports on its own schedule: wait until every agent step's parent is in.
    let spans = must_wait(Duration::from_secs(30), "the spans exported", || {
        let spans = collector.spans();
        let in_trace = |service: &str| {
            spans
                .iter()
                .filter(|span| span.service == service && span.trace_id == rollback_trace)
                .collect::<Vec<_>>()
        };
        let (agents, coordinators) = (in_trace("rewind-agent"), in_trace("rewind-coordinator"));
        let parents_in = agents.iter().all(|agents| {
            coordinators
                .iter()
                .any(|span| span.span_id == agents.parent_span_id)
        });
        (agents.len() >= hosts.len() && parents_in).then(|| spans.clone())
    });
    let call = spans
        .iter()
        .find(|span| span.service == "rewind-coordinator" && span.trace_id == TRACE_ID)
        .expect("the call's span in the caller's trace");
    assert_eq!(call.name, "call");
    assert_eq!(call.parent_span_id, "00f067aa0ba902b7");
    // Calls that came without a traceparent (the deploy's) are exported too, in traces of
    // their own.
    assert!(
        spans.iter().any(|span| span.service == "rewind-coordinator"
            && span.name == "call"
            && span.trace_id != TRACE_ID
            && span.trace_id != rollback_trace),
        "{spans:#?}"
    );
    let sent: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|span| span.service == "rewind-coordinator" && span.trace_id == rollback_trace)
        .collect();
    assert!(!sent.is_empty(), "the coordinator's step spans: {spans:#?}");
    for agents in spans
        .iter()
        .filter(|span| span.service == "rewind-agent" && span.trace_id == rollback_trace)
    {
        assert_eq!(agents.name, "step");
        assert!(
            sent.iter()
                .any(|span| span.name == "step" && span.span_id == agents.parent_span_id),
            "{agents:?} under no step span of the coordinator's: {sent:#?}"
        );
    }
    // rewind's own spans only: not the gRPC libraries' beneath them.
    for span in &spans {
        let module = span
            .attributes
            .get("code.module.name")
            .or_else(|| span.attributes.get("code.namespace"))
            .unwrap_or_else(|| panic!("where {span:?} was made"));
        assert!(module.starts_with("rewind_"), "{span:?}");
    }
}

/// An OTLP endpoint that is not `http://host:port` stops the process at start, naming the
/// variable and what is wrong, with the exit code of a bad configuration.
#[test]
fn a_bad_otlp_endpoint_stops_the_process_naming_it() {
    for (endpoint, wrong) in [
        ("https://collector:4317", "only http://"),
        ("http://collector", "names no host and port"),
        ("not a url", "is not a URL"),
    ] {
        let output = std::process::Command::new(must_binary("rewind-coordinator"))
            .args(["check-config", "/nonexistent.toml"])
            .env("REWIND_OTLP_ENDPOINT", endpoint)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{endpoint}: {stderr}");
        assert!(
            stderr.contains("REWIND_OTLP_ENDPOINT") && stderr.contains(wrong),
            "{endpoint}: {stderr}"
        );
    }
}
