//! A rollback on real agents as an incident, through the real `rewindctl`: its times and
//! timeline, a note, closing refused while the rollback runs, the RCA template, closing with an
//! analysis whose action items and lessons are kept, the markdown export, and the service's
//! runbook that carries those lessons.

use rewind_proto::v1 as pb;
use rewind_tests::{
    Coordinator, must_deploy_v1_then_v2, must_rollback_end, must_start_hosts,
    must_start_rollback_of_v2,
};

use rewind_tests::output_text as text;

#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_is_an_incident_with_its_times_timeline_notes_and_analysis() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let (hosts, mut client) = must_start_hosts(dir.path(), &coordinator, &["web-1", "web-2"]).await;
    must_deploy_v1_then_v2(&mut client, &hosts).await;
    let rollback_id = must_start_rollback_of_v2(&mut client).await;
    let incident_id = rollback_id.replacen("rb-", "in-", 1);

    // While the rollback is paused (so it cannot end under the check): a note is taken, and
    // closing is refused.
    let action = |request_id: &str| pb::RollbackActionRequest {
        rollback_id: rollback_id.clone(),
        request_id: request_id.into(),
        reason: "look before it goes on".into(),
        ..Default::default()
    };
    client.pause_rollback(action("pause")).await.unwrap();
    let noted = coordinator.rewindctl(&["incident", "note", &incident_id, "paged db team"]);
    assert!(noted.status.success(), "{}", text(&noted));
    let rca = dir.path().join("rca.md");
    std::fs::write(&rca, "## Summary\nbad v2\n").unwrap();
    let early = coordinator.rewindctl(&[
        "incident",
        "close",
        &incident_id,
        "--rca",
        rca.to_str().unwrap(),
    ]);
    let said = text(&early);
    assert!(!early.status.success() && said.contains("still"), "{said}");

    client.resume_rollback(action("resume")).await.unwrap();
    let rollback = must_rollback_end(&client, &rollback_id).await;
    assert_eq!(
        rollback.state,
        pb::RollbackState::Succeeded as i32,
        "{rollback:?}"
    );
    let incident = client
        .get_incident(pb::GetIncidentRequest {
            incident_id: incident_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(incident.status, "open");
    assert_eq!(incident.trigger, "manual");
    assert_eq!(incident.services, ["web"]);
    assert_eq!(incident.change_ids, ["ch-2"]);
    assert_eq!(incident.hosts, ["web-1", "web-2"]);
    assert_eq!(incident.evidence, "bad release");
    // Impact from ch-2's start; detected when the rollback was asked for; mitigated when the
    // first host was restored; recovered when the rollback succeeded.
    let change = client
        .get_change(pb::GetChangeRequest {
            change_id: "ch-2".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .change
        .unwrap();
    assert_eq!(incident.impact_started_at_ms, change.started_at_ms);
    assert_eq!(incident.detected_at_ms, rollback.started_at_ms);
    let first_restore = rollback
        .steps
        .iter()
        .filter(|step| step.kind == "restore")
        .map(|step| step.finished_at_ms)
        .min()
        .unwrap();
    assert_eq!(incident.mitigated_at_ms, first_restore, "{incident:?}");
    assert!(
        incident.mitigated_by.contains("restored on web-"),
        "{incident:?}"
    );
    assert_eq!(incident.recovered_at_ms, rollback.finished_at_ms);
    assert_eq!(incident.operators, ["user:operator"], "{incident:?}");
    // The timeline: the change's start, the rollback's start and steps, the note, in order.
    let actions: Vec<&str> = incident
        .timeline
        .iter()
        .map(|event| event.action.as_str())
        .collect();
    let position = |action: &str| {
        actions
            .iter()
            .position(|listed| *listed == action)
            .unwrap_or_else(|| panic!("{action} not in {actions:?}"))
    };
    assert!(
        position("change.start") < position("rollback.start"),
        "{actions:?}"
    );
    assert!(
        position("rollback.start") < position("incident.note"),
        "{actions:?}"
    );
    assert!(actions.contains(&"step.finish"), "{actions:?}");
    assert!(
        incident
            .timeline
            .windows(2)
            .all(|pair| pair[0].audit_index < pair[1].audit_index),
        "in audit order"
    );
    assert_eq!(incident.notes[0].text, "paged db team");

    let template = coordinator.rewindctl(&["incident", "rca-template", &incident_id]);
    let template = text(&template);
    for section in [
        "## Summary",
        "## Timeline",
        "## Action items",
        "## Lessons",
        "rollback.start",
    ] {
        assert!(template.contains(section), "{section} in {template}");
    }
    let analysis = template
        .replace(
            "- [ ] <action, owner>",
            "- [ ] canary gate on web (owner: sre)",
        )
        .replace(
            "- <what the next on-call should know about this service>",
            "- web's v2 config is not backward compatible",
        );
    std::fs::write(&rca, analysis).unwrap();
    let closed = coordinator.rewindctl(&[
        "incident",
        "close",
        &incident_id,
        "--rca",
        rca.to_str().unwrap(),
    ]);
    assert!(closed.status.success(), "{}", text(&closed));
    assert!(
        text(&closed).contains("1 action items and 1 lessons"),
        "{}",
        text(&closed)
    );
    let again = coordinator.rewindctl(&[
        "incident",
        "close",
        &incident_id,
        "--rca",
        rca.to_str().unwrap(),
    ]);
    assert!(
        !again.status.success() && text(&again).contains("closed"),
        "{}",
        text(&again)
    );

    let listed = text(&coordinator.rewindctl(&["incident", "list"]));
    assert!(
        listed.contains(&incident_id) && listed.contains("closed"),
        "{listed}"
    );
    let exported =
        coordinator.rewindctl(&["incident", "export", &incident_id, "--format", "markdown"]);
    let exported = text(&exported);
    for expected in [
        format!("# Incident {incident_id} (closed)"),
        "Time to recover:".to_string(),
        "paged db team".to_string(),
        "canary gate on web".to_string(),
    ] {
        assert!(exported.contains(&expected), "{expected} in {exported}");
    }
    let json = coordinator.rewindctl(&[
        "--output",
        "json",
        "incident",
        "export",
        &incident_id,
        "--format",
        "json",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        json["lessons"][0], "web's v2 config is not backward compatible",
        "{json}"
    );

    // The service's runbook carries what the incident taught, beside its recipe and policy.
    let runbook = text(&coordinator.rewindctl(&["runbook", "show", "web"]));
    for expected in [
        "# Rollback runbook: web".to_string(),
        "drain → restore → restart → verify → undrain".to_string(),
        format!("web's v2 config is not backward compatible ({incident_id}"),
        format!("canary gate on web (owner: sre) ({incident_id})"),
    ] {
        assert!(runbook.contains(&expected), "{expected} in {runbook}");
    }
    let written = dir.path().join("runbook.md");
    let exported = coordinator.rewindctl(&[
        "runbook",
        "export",
        "web",
        "--out",
        written.to_str().unwrap(),
    ]);
    assert!(exported.status.success(), "{}", text(&exported));
    assert!(
        std::fs::read_to_string(&written)
            .unwrap()
            .contains("## Lessons from past incidents")
    );
    let unknown = coordinator.rewindctl(&["runbook", "show", "nope"]);
    assert!(
        !unknown.status.success() && text(&unknown).contains("nope"),
        "{}",
        text(&unknown)
    );

    // Bad input names what is wrong.
    let unknown = coordinator.rewindctl(&["incident", "show", "in-99"]);
    assert!(
        !unknown.status.success() && text(&unknown).contains("no incident in-99"),
        "{}",
        text(&unknown)
    );
    let empty = coordinator.rewindctl(&["incident", "note", &incident_id, "  "]);
    assert!(
        !empty.status.success() && text(&empty).contains("text"),
        "{}",
        text(&empty)
    );

    // Someone who may read only staging does not see the incident in the list.
    coordinator
        .ca()
        .write_identity(
            &coordinator.tls_dir(),
            &rewind_shared::dev_ca::Subject::new(rewind_shared::identity::Kind::User, "sam"),
            &[],
        )
        .unwrap();
    client
        .apply_policy(pb::ApplyPolicyRequest {
            toml: STAGING_VIEWER_POLICY.into(),
            reason: "sam reads staging".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let as_sam =
        |args: &[&str]| coordinator.rewindctl(&[&["--identity", "sam"][..], args].concat());
    let listed = as_sam(&["incident", "list"]);
    assert!(listed.status.success(), "{}", text(&listed));
    assert!(!text(&listed).contains(&incident_id), "{}", text(&listed));
    // Asked for by id, it is refused as any rollback of that scope is.
    let shown = as_sam(&["incident", "show", &incident_id]);
    assert!(
        !shown.status.success() && text(&shown).contains("user:sam may not incident.show"),
        "{}",
        text(&shown)
    );
    let noted = as_sam(&["incident", "note", &incident_id, "me too"]);
    assert!(!noted.status.success(), "{}", text(&noted));
}

/// The operator administers everything; sam may read staging only (the test's hosts are in
/// `default`).
const STAGING_VIEWER_POLICY: &str = r#"
[[binding]]
name = "operator-admin"
role = "admin"
identities = ["user:operator"]
scopes = ["*"]

[[binding]]
name = "staging-viewers"
role = "viewer"
identities = ["user:sam"]
scopes = ["staging/*"]
"#;
