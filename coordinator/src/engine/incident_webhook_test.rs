//! Which incident events are due, in what order and how often; and how deliveries are recorded.

use super::*;
use crate::test_fleet::{Fleet, rollback_of};

/// A fleet with web at v2 and an automatic rollback of it running; the rollback's number.
fn rolling_back() -> (Fleet, u64) {
    let mut fleet = Fleet::with_web();
    fleet.deploy_web("v1");
    let change = fleet.deploy_web("v2");
    let rollback = fleet.must_start_rollback(change, Trigger::Automatic);
    (fleet, rollback)
}

fn succeed(fleet: &mut Fleet, rollback: u64) {
    for host in ["web-1", "web-2"] {
        for kind in RollbackStepKind::ALL {
            let step = StepTarget::Rollback {
                rollback,
                service: "web".into(),
                host_id: host.into(),
                kind,
            };
            fleet.finish(step, true);
        }
    }
    fleet.finish(StepTarget::Gate { rollback, wave: 0 }, true);
    assert_eq!(
        fleet.state.rollbacks[&rollback].status,
        RollbackStatus::Succeeded
    );
}

fn notified(fleet: &mut Fleet, incident: u64, event: NoticeEvent, ok: bool, permanent: bool) {
    fleet.apply(CommandKind::IncidentNotified {
        incident,
        event,
        ok,
        permanent,
        detail: format!("receiver answered {}", if ok { 202 } else { 500 }),
    });
}

/// `ms` after the fleet's last command (the fleet's clock runs a second per command).
fn after(fleet: &Fleet, ms: u64) -> u64 {
    1_000 * fleet.index + ms
}

/// The events `due` asks for at `now_ms`.
fn asked(fleet: &Fleet, memory: &mut NoticeMemory, now_ms: u64) -> Vec<NoticeEvent> {
    let mut actions = Vec::new();
    due(&fleet.state, memory, now_ms, &mut actions);
    actions
        .into_iter()
        .map(|action| match action {
            Action::NotifyIncident { event, .. } => event,
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn an_automatic_rollback_triggers_then_resolves_and_a_person_acknowledges_between() {
    let (mut fleet, rollback) = rolling_back();
    let mut memory = NoticeMemory::default();
    let now = after(&fleet, 0);
    assert_eq!(asked(&fleet, &mut memory, now), [NoticeEvent::Trigger]);
    // Not again while it is in flight.
    assert_eq!(asked(&fleet, &mut memory, now + 1), []);
    notified(&mut fleet, rollback, NoticeEvent::Trigger, false, false);
    // Not before the backoff after the failure either, then again.
    assert_eq!(
        asked(&fleet, &mut memory, after(&fleet, NOTICE_RETRY_MS - 1)),
        []
    );
    assert_eq!(
        asked(&fleet, &mut memory, after(&fleet, NOTICE_RETRY_MS)),
        [NoticeEvent::Trigger]
    );
    notified(&mut fleet, rollback, NoticeEvent::Trigger, true, false);
    // Nobody has acted and the rollback runs: nothing to say.
    assert_eq!(
        asked(&fleet, &mut memory, after(&fleet, 3 * NOTICE_RETRY_MS)),
        []
    );
    fleet
        .run_as(
            "user:ada",
            "",
            CommandKind::NoteIncident {
                incident: rollback,
                text: "looking".into(),
            },
        )
        .unwrap();
    assert_eq!(
        asked(&fleet, &mut memory, after(&fleet, 1)),
        [NoticeEvent::Acknowledge]
    );
    notified(&mut fleet, rollback, NoticeEvent::Acknowledge, true, false);
    succeed(&mut fleet, rollback);
    assert_eq!(
        asked(&fleet, &mut memory, after(&fleet, 1)),
        [NoticeEvent::Resolve]
    );
    notified(&mut fleet, rollback, NoticeEvent::Resolve, true, false);
    assert_eq!(
        asked(&fleet, &mut memory, after(&fleet, NOTICE_RETRY_MS)),
        []
    );
    assert!(memory.tried.is_empty(), "settled events are forgotten");
    let notices = &fleet.state.incidents[&rollback].notices;
    let attempts: Vec<(NoticeEvent, u32)> = notices
        .iter()
        .map(|notice| (notice.event, notice.attempts))
        .collect();
    assert_eq!(
        attempts,
        [
            (NoticeEvent::Trigger, 2),
            (NoticeEvent::Acknowledge, 1),
            (NoticeEvent::Resolve, 1)
        ]
    );
    assert!(notices.iter().all(|notice| notice.delivered_at_ms != 0));
}

#[test]
fn a_resolve_waits_for_the_trigger_and_no_acknowledge_follows_it() {
    let (mut fleet, rollback) = rolling_back();
    succeed(&mut fleet, rollback);
    let mut memory = NoticeMemory::default();
    assert_eq!(
        asked(&fleet, &mut memory, after(&fleet, 0)),
        [NoticeEvent::Trigger]
    );
    notified(&mut fleet, rollback, NoticeEvent::Trigger, true, false);
    assert_eq!(
        asked(&fleet, &mut memory, after(&fleet, 1)),
        [NoticeEvent::Resolve]
    );
    notified(&mut fleet, rollback, NoticeEvent::Resolve, false, false);
    // A person acts once the resolve went out: no acknowledge of a resolved incident.
    fleet
        .run_as(
            "user:ada",
            "",
            CommandKind::NoteIncident {
                incident: rollback,
                text: "after the fact".into(),
            },
        )
        .unwrap();
    assert_eq!(
        asked(&fleet, &mut memory, after(&fleet, NOTICE_RETRY_MS)),
        [NoticeEvent::Resolve]
    );
}

#[test]
fn a_refused_event_is_given_up_at_once_and_a_failing_one_after_its_attempts() {
    let (mut fleet, rollback) = rolling_back();
    notified(&mut fleet, rollback, NoticeEvent::Trigger, false, true);
    let trigger = &fleet.state.incidents[&rollback].notices[0];
    assert!(trigger.given_up && trigger.attempts == 1, "{trigger:?}");
    succeed(&mut fleet, rollback);
    let mut memory = NoticeMemory::default();
    // The trigger was given up: the resolve still goes.
    assert_eq!(
        asked(&fleet, &mut memory, after(&fleet, 0)),
        [NoticeEvent::Resolve]
    );
    for _ in 0..MAX_NOTICE_ATTEMPTS {
        notified(&mut fleet, rollback, NoticeEvent::Resolve, false, false);
    }
    let resolve = &fleet.state.incidents[&rollback].notices[1];
    assert!(resolve.given_up, "{resolve:?}");
    assert_eq!(
        asked(&fleet, &mut memory, after(&fleet, MAX_NOTICE_RETRY_MS)),
        []
    );
    // A late success of a settled event changes nothing.
    notified(&mut fleet, rollback, NoticeEvent::Resolve, true, false);
    let resolve = &fleet.state.incidents[&rollback].notices[1];
    assert_eq!(
        (resolve.attempts, resolve.delivered_at_ms),
        (MAX_NOTICE_ATTEMPTS, 0)
    );
}

#[test]
fn a_manual_rollback_is_acknowledged_by_the_person_who_started_it() {
    let mut fleet = Fleet::with_web();
    fleet.deploy_web("v1");
    let change = fleet.deploy_web("v2");
    let Outcome::Rollback(rollback) = fleet
        .run_as("user:ada", "", rollback_of(change, Trigger::Manual))
        .unwrap()
    else {
        panic!("rollback outcome")
    };
    notified(&mut fleet, rollback, NoticeEvent::Trigger, true, false);
    let mut memory = NoticeMemory::default();
    assert_eq!(
        asked(&fleet, &mut memory, after(&fleet, 1)),
        [NoticeEvent::Acknowledge]
    );
}

#[test]
fn nothing_is_told_below_version_6_or_of_a_rollback_that_ended_long_ago() {
    let (mut fleet, rollback) = rolling_back();
    let mut memory = NoticeMemory::default();
    let now = fleet.state.rollbacks[&rollback].started_at_ms;
    fleet.state.cluster_version = version::INCIDENT_NOTICES - 1;
    assert_eq!(asked(&fleet, &mut memory, now), []);
    assert!(matches!(
        fleet.run(CommandKind::IncidentNotified {
            incident: rollback,
            event: NoticeEvent::Trigger,
            ok: true,
            permanent: false,
            detail: String::new(),
        }),
        Err(crate::errors::CoordinatorError::NeedsClusterVersion { .. })
    ));
    fleet.state.cluster_version = version::CURRENT;
    succeed(&mut fleet, rollback);
    let finished = fleet.state.rollbacks[&rollback].finished_at_ms;
    assert_eq!(
        asked(&fleet, &mut memory, finished + NOTICE_WINDOW_MS + 1),
        []
    );
}

#[test]
fn severity_is_the_gravest_of_the_environments() {
    let config = IncidentWebhookConfig {
        url: "http://127.0.0.1:1/".into(),
        secret: vec![0; 16],
        tls: rewind_shared::outbound::HttpsTrust::default(),
        format: IncidentFormat::Json,
        severity: [("staging".to_string(), "info".to_string())].into(),
    };
    let severity = |environments: &[&str]| {
        let environments: Vec<String> = environments.iter().map(|e| e.to_string()).collect();
        config.severity_of(&environments)
    };
    assert_eq!(severity(&["staging"]), "info");
    assert_eq!(severity(&["staging", "dev"]), "warning");
    assert_eq!(severity(&["staging", "prod"]), "critical");
    assert_eq!(severity(&[]), "warning");
}

#[test]
fn each_format_says_what_its_receiver_needs() {
    let (fleet, rollback) = rolling_back();
    let record = &fleet.state.rollbacks[&rollback];
    let mut config = IncidentWebhookConfig {
        url: "http://127.0.0.1:1/".into(),
        secret: vec![0; 16],
        tls: rewind_shared::outbound::HttpsTrust::default(),
        format: IncidentFormat::PagerDuty {
            routing_key: "k".repeat(32),
        },
        severity: Default::default(),
    };
    for event in NoticeEvent::ALL {
        let sent = body(&fleet.state, record, &config, event, "c-1");
        let checked = rewind_shared::pagerduty::check_event(sent.to_string().as_bytes())
            .unwrap_or_else(|errors| panic!("{event}: {errors:?}"));
        assert_eq!(checked.action, event.name());
        assert_eq!(
            checked.dedup_key,
            format!("in-{rollback}@c-1/{}", record.started_at_ms)
        );
        assert_eq!(sent.get("payload").is_some(), event == NoticeEvent::Trigger);
    }
    config.format = IncidentFormat::Json;
    let sent = body(&fleet.state, record, &config, NoticeEvent::Resolve, "c-1");
    assert_eq!(sent["kind"], "rewind.incident");
    assert_eq!(sent["event"], "resolve");
    assert_eq!(sent["incident_id"], incident_id(rollback));
    assert_eq!(sent["rollback_id"], record.id());
    assert_eq!(sent["services"], serde_json::json!(["web"]));
    assert_eq!(
        sent["show"],
        format!("rewindctl incident show {}", incident_id(rollback))
    );
}

#[test]
fn automation_does_not_acknowledge_and_retries_back_off_on_any_leader() {
    let mut fleet = Fleet::with_web();
    fleet.deploy_web("v1");
    let change = fleet.deploy_web("v2");
    // Asked for by an alert: automation, not a person.
    let Outcome::Rollback(rollback) = fleet
        .run_as(
            "automation:alertmanager",
            "",
            rollback_of(change, Trigger::Automatic),
        )
        .unwrap()
    else {
        panic!("rollback outcome")
    };
    let note = |text: &str| CommandKind::NoteIncident {
        incident: rollback,
        text: text.into(),
    };
    fleet
        .run_as("automation:pager", "", note("a bot wrote this"))
        .unwrap();
    let mut memory = NoticeMemory::default();
    assert_eq!(
        asked(&fleet, &mut memory, after(&fleet, 0)),
        [NoticeEvent::Trigger]
    );
    for _ in 0..3 {
        notified(&mut fleet, rollback, NoticeEvent::Trigger, false, false);
    }
    // Three failures: the next waits 40 s, not 10, on this leader or a new one.
    assert_eq!(retry_after_ms(3), 40_000);
    assert_eq!(asked(&fleet, &mut memory, after(&fleet, 39_999)), []);
    let mut new_leader = NoticeMemory::default();
    assert_eq!(asked(&fleet, &mut new_leader, after(&fleet, 39_999)), []);
    assert_eq!(
        asked(&fleet, &mut new_leader, after(&fleet, 40_000)),
        [NoticeEvent::Trigger]
    );
    assert_eq!(retry_after_ms(MAX_NOTICE_ATTEMPTS), MAX_NOTICE_RETRY_MS);
    notified(&mut fleet, rollback, NoticeEvent::Trigger, true, false);
    assert_eq!(
        asked(&fleet, &mut memory, after(&fleet, 1)),
        [],
        "no person acted"
    );
    // A person's note acknowledges it; found reading on from where the last look stopped.
    assert!(memory.scanned.contains_key(&rollback));
    fleet.run_as("user:ada", "", note("on it")).unwrap();
    assert_eq!(
        asked(&fleet, &mut memory, after(&fleet, 1)),
        [NoticeEvent::Acknowledge]
    );
}

#[test]
fn a_trigger_that_got_through_late_is_still_resolved() {
    let (mut fleet, rollback) = rolling_back();
    succeed(&mut fleet, rollback);
    // The receiver was down until long after the rollback ended.
    let late = fleet.state.rollbacks[&rollback].finished_at_ms + 2 * NOTICE_WINDOW_MS;
    fleet
        .apply_at(
            late,
            CommandKind::IncidentNotified {
                incident: rollback,
                event: NoticeEvent::Trigger,
                ok: true,
                permanent: false,
                detail: "answered 202".into(),
            },
        )
        .unwrap();
    let mut memory = NoticeMemory::default();
    assert_eq!(asked(&fleet, &mut memory, late + 1), [NoticeEvent::Resolve]);
    // Once everything is settled and the window has passed, the incident is left alone.
    notified(&mut fleet, rollback, NoticeEvent::Resolve, true, false);
    assert_eq!(asked(&fleet, &mut memory, late + NOTICE_WINDOW_MS + 1), []);
    assert!(memory.tried.is_empty());
}

#[tokio::test]
async fn https_receivers_must_chain_to_a_trusted_root() {
    let secret = b"a-shared-secret-for-the-test".to_vec();
    let receiver = rewind_shared::pagerduty::Receiver::start_tls(secret.clone())
        .await
        .unwrap();
    let url = format!("https://{}/v2/enqueue", receiver.address);
    let event = serde_json::json!({
        "routing_key": "k".repeat(32),
        "event_action": "resolve",
        "dedup_key": "in-1@c-1/1",
    });
    // Its CA is not among the Mozilla roots: refused, nothing delivered.
    let untrusted = super::super::escalation::post_signed(
        &url,
        &secret,
        &rewind_shared::outbound::HttpsTrust::default(),
        &event,
    )
    .await;
    let error = untrusted.unwrap_err();
    assert!(error.contains(&url), "{error}");
    assert!(receiver.events().is_empty());
    // Trusting it through ca-file: delivered and accepted.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), receiver.ca_pem.clone().unwrap()).unwrap();
    let tls = rewind_shared::outbound::HttpsFiles {
        ca_file: Some(dir.path().join("ca.pem")),
        ..Default::default()
    }
    .load("incidents")
    .unwrap();
    let trusted = super::super::escalation::post_signed(&url, &secret, &tls, &event).await;
    assert_eq!(trusted.unwrap(), reqwest::StatusCode::ACCEPTED);
    assert_eq!(receiver.events().len(), 1);
}
