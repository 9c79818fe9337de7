//! W3C Trace Context: a caller's `traceparent` on a gRPC call or a webhook request names the
//! trace of every line the coordinator logs for it, so a tracing system's trace leads to
//! rewind's side of the request; a call without one gets a trace of its own.

use std::time::Duration;

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
