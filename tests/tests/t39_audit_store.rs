//! The audit log in its own store (cluster version 7) on a real coordinator: entries are
//! written as their commands apply, and a coordinator that cannot write one fails closed: it
//! stops before anything sees the command applied, and once it can write again it applies the
//! command with its entry, losing nothing.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::{Coordinator, must_list_audit, must_verify_audit, output_text, plain_service};

fn put(name: &str) -> pb::PutServiceRequest {
    pb::PutServiceRequest {
        request_id: format!("put-{name}"),
        service: Some(plain_service(name)),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_entry_that_cannot_be_written_stops_the_member_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let mut client = coordinator.must_client().await;
    client.put_service(put("web")).await.unwrap();
    let versions = output_text(&coordinator.rewindctl(&["cluster", "version"]));
    // A new cluster starts at this release's version, which keeps the audit in its store.
    let running: u32 = versions
        .split_whitespace()
        .nth(2)
        .and_then(|number| number.parse().ok())
        .unwrap_or_default();
    assert!(running >= 7, "{versions}");

    // The disk refuses the audit (of entries about `audit-fails`): the command that needs an
    // entry is not acted on.
    coordinator.must_restart_with_failpoints("coordinator.audit-write-fails");
    let mut client = coordinator.must_client().await;
    let refused = client.put_service(put("audit-fails")).await;
    assert!(refused.is_err(), "{refused:?}");
    coordinator.must_exit_within(Duration::from_secs(30));
    let log = std::fs::read_to_string(dir.path().join("coordinator/coordinator.log")).unwrap();
    assert!(
        log.contains("cannot be audited") && log.contains("injected by REWIND_FAILPOINTS"),
        "{log}"
    );

    // Written again: the command committed before the stop applies now, with its entry.
    coordinator.must_restart();
    let mut client = coordinator.must_client().await;
    let services = client
        .list_services(pb::ListServicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = services
        .services
        .iter()
        .map(|service| service.name.as_str())
        .collect();
    assert!(names.contains(&"audit-fails"), "{names:?}");
    let entries = must_list_audit(&client).await;
    let puts = entries
        .iter()
        .filter(|entry| entry.action == "service.put" && entry.target == "audit-fails")
        .count();
    assert_eq!(puts, 1, "{entries:?}");
    let verification = must_verify_audit(&client).await;
    assert_eq!(verification.entries, entries.len() as u64);
}
