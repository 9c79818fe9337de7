//! The incident webhook against a receiver that holds it to PagerDuty's Events API v2 rules and
//! checks its signature, over HTTPS: a person's rollback on real agents is triggered (retried
//! past a 503), acknowledged and resolved under one dedup key, and `incident show` says how each
//! went.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_shared::pagerduty::Receiver;
use rewind_tests::{
    Coordinator, must_deploy_v1_then_v2, must_rollback_end, must_start_hosts,
    must_start_rollback_of_v2, must_wait, output_text,
};

const SECRET: &str = "a-shared-secret-for-the-incident-hook";
const ROUTING_KEY: &str = "R0UT1NGKEY0123456789abcdefABCDEF";

#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_is_triggered_acknowledged_and_resolved_with_one_dedup_key() {
    let dir = tempfile::tempdir().unwrap();
    // Over HTTPS, as PagerDuty's own endpoint is, with a CA the coordinator is told of.
    let receiver = Receiver::start_tls(SECRET.as_bytes().to_vec())
        .await
        .unwrap();
    let ca = dir.path().join("pager-ca.pem");
    std::fs::write(&ca, receiver.ca_pem.as_deref().unwrap()).unwrap();
    // The first delivery meets an outage: the trigger must be retried, not lost.
    receiver.fail_next(&[503]);
    let secret = dir.path().join("incident.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let routing_key = dir.path().join("pagerduty.key");
    std::fs::write(&routing_key, format!("{ROUTING_KEY}\n")).unwrap();
    let coordinator = Coordinator::must_start_with(
        &dir.path().join("coordinator"),
        &format!(
            "[incidents]\nwebhook-url = \"https://{}/v2/enqueue\"\nsecret-file = \"{}\"\n\
             format = \"pagerduty\"\nrouting-key-file = \"{}\"\nca-file = \"{}\"\n\
             [incidents.severity]\ndefault = \"error\"\n", // test hosts' environment
            receiver.address,
            secret.display(),
            routing_key.display(),
            ca.display()
        ),
    );
    let (hosts, mut client) = must_start_hosts(dir.path(), &coordinator, &["web-1", "web-2"]).await;
    must_deploy_v1_then_v2(&mut client, &hosts).await;
    // Started by the operator, a person: that acknowledges it too.
    let rollback_id = must_start_rollback_of_v2(&mut client).await;
    let incident_id = rollback_id.replacen("rb-", "in-", 1);
    let rollback = must_rollback_end(&client, &rollback_id).await;
    assert_eq!(rollback.state, pb::RollbackState::Succeeded as i32);

    let events = must_wait(
        Duration::from_secs(60),
        "trigger, acknowledge, resolve",
        || {
            let events = receiver.events();
            (events.len() >= 3).then_some(events)
        },
    );
    let actions: Vec<&str> = events.iter().map(|event| event.action.as_str()).collect();
    assert_eq!(actions, ["trigger", "acknowledge", "resolve"], "{events:?}");
    // One dedup key: the incident's id at this cluster's.
    let key = &events[0].dedup_key;
    assert!(key.starts_with(&format!("{incident_id}@")), "{key}");
    assert!(
        events.iter().all(|event| &event.dedup_key == key),
        "{events:?}"
    );
    let trigger = &events[0];
    assert_eq!(trigger.severity, "error", "the environment's severity");
    assert!(
        trigger.summary.contains(&rollback_id) && trigger.summary.contains("bad release"),
        "{trigger:?}"
    );
    assert_eq!(receiver.refusals(), Vec::<String>::new());

    // The receiver answers before the coordinator records the delivery (a replicated command
    // after the answer): the resolve shows once that has applied.
    let said = must_wait(
        Duration::from_secs(30),
        "the resolve's delivery recorded",
        || {
            let shown = coordinator.rewindctl(&["incident", "show", &incident_id]);
            let said = output_text(&shown);
            assert!(shown.status.success(), "{said}");
            said.contains("resolve delivered at").then_some(said)
        },
    );
    assert!(said.contains("trigger delivered at"), "{said}");
    assert!(said.contains("(2 attempts)"), "the retried trigger: {said}");
    // Each attempt is audited, the failed one with what the receiver answered.
    let audit = coordinator.rewindctl(&["audit", "list", "--page-size", "1000"]);
    let said = output_text(&audit);
    let failed = said
        .lines()
        .find(|line| line.contains("incident.notify") && line.contains("not delivered"));
    assert!(failed.is_some_and(|line| line.contains("503")), "{said}");
}
