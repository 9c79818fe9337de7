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
    let now = fleet.state.rollbacks[&rollback].started_at_ms + 1_000;
    assert_eq!(asked(&fleet, &mut memory, now), [NoticeEvent::Trigger]);
    // Not again before the retry interval, even undelivered.
    assert_eq!(asked(&fleet, &mut memory, now + 1), []);
    notified(&mut fleet, rollback, NoticeEvent::Trigger, false, false);
    assert_eq!(
        asked(&fleet, &mut memory, now + NOTICE_RETRY_MS),
        [NoticeEvent::Trigger]
    );
    notified(&mut fleet, rollback, NoticeEvent::Trigger, true, false);
    // Nobody has acted and the rollback runs: nothing to say.
    assert_eq!(asked(&fleet, &mut memory, now + 3 * NOTICE_RETRY_MS), []);
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
        asked(&fleet, &mut memory, now + 4 * NOTICE_RETRY_MS),
        [NoticeEvent::Acknowledge]
    );
    notified(&mut fleet, rollback, NoticeEvent::Acknowledge, true, false);
    succeed(&mut fleet, rollback);
    assert_eq!(
        asked(&fleet, &mut memory, now + 5 * NOTICE_RETRY_MS),
        [NoticeEvent::Resolve]
    );
    notified(&mut fleet, rollback, NoticeEvent::Resolve, true, false);
    assert_eq!(asked(&fleet, &mut memory, now + 6 * NOTICE_RETRY_MS), []);
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
    let now = fleet.state.rollbacks[&rollback].finished_at_ms;
    assert_eq!(asked(&fleet, &mut memory, now), [NoticeEvent::Trigger]);
    notified(&mut fleet, rollback, NoticeEvent::Trigger, true, false);
    assert_eq!(asked(&fleet, &mut memory, now + 1), [NoticeEvent::Resolve]);
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
        asked(&fleet, &mut memory, now + NOTICE_RETRY_MS + 1),
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
    let now = fleet.state.rollbacks[&rollback].finished_at_ms;
    // The trigger was given up: the resolve still goes.
    assert_eq!(asked(&fleet, &mut memory, now), [NoticeEvent::Resolve]);
    for _ in 0..MAX_NOTICE_ATTEMPTS {
        notified(&mut fleet, rollback, NoticeEvent::Resolve, false, false);
    }
    let resolve = &fleet.state.incidents[&rollback].notices[1];
    assert!(resolve.given_up, "{resolve:?}");
    assert_eq!(asked(&fleet, &mut memory, now + MAX_NOTICE_RETRY_MS), []);
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
    let now = fleet.state.rollbacks[&rollback].started_at_ms;
    assert_eq!(asked(&fleet, &mut memory, now), [NoticeEvent::Acknowledge]);
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
        ca_pem: None,
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
        ca_pem: None,
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
        assert_eq!(checked.dedup_key, format!("in-{rollback}@c-1"));
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
fn automation_does_not_acknowledge_and_retries_back_off() {
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
    fleet
        .run_as(
            "automation:pager",
            "",
            CommandKind::NoteIncident {
                incident: rollback,
                text: "a bot wrote this".into(),
            },
        )
        .unwrap();
    let mut memory = NoticeMemory::default();
    let now = fleet.state.rollbacks[&rollback].started_at_ms;
    assert_eq!(asked(&fleet, &mut memory, now), [NoticeEvent::Trigger]);
    for _ in 0..3 {
        notified(&mut fleet, rollback, NoticeEvent::Trigger, false, false);
    }
    // Three failures: the next waits 40 s, not 10.
    assert_eq!(retry_after_ms(3), 40_000);
    assert_eq!(asked(&fleet, &mut memory, now + 39_999), []);
    assert_eq!(
        asked(&fleet, &mut memory, now + 40_000),
        [NoticeEvent::Trigger]
    );
    assert_eq!(retry_after_ms(MAX_NOTICE_ATTEMPTS), MAX_NOTICE_RETRY_MS);
    notified(&mut fleet, rollback, NoticeEvent::Trigger, true, false);
    assert_eq!(
        asked(&fleet, &mut memory, now + 100_000),
        [],
        "no person acted"
    );
    // A person's note acknowledges it; read from where the last look stopped.
    fleet
        .run_as(
            "user:ada",
            "",
            CommandKind::NoteIncident {
                incident: rollback,
                text: "on it".into(),
            },
        )
        .unwrap();
    assert_eq!(
        asked(&fleet, &mut memory, now + 100_001),
        [NoticeEvent::Acknowledge]
    );
}

#[test]
fn a_delivery_under_way_goes_on_after_the_window() {
    let (mut fleet, rollback) = rolling_back();
    notified(&mut fleet, rollback, NoticeEvent::Trigger, true, false);
    succeed(&mut fleet, rollback);
    notified(&mut fleet, rollback, NoticeEvent::Resolve, false, false);
    let mut memory = NoticeMemory::default();
    let late = fleet.state.rollbacks[&rollback].finished_at_ms + NOTICE_WINDOW_MS + 1;
    assert_eq!(asked(&fleet, &mut memory, late), [NoticeEvent::Resolve]);
    notified(&mut fleet, rollback, NoticeEvent::Resolve, true, false);
    assert_eq!(asked(&fleet, &mut memory, late + MAX_NOTICE_RETRY_MS), []);
    assert!(
        memory.scanned.is_empty(),
        "nothing kept of an incident told in full"
    );
}
