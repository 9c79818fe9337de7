//! A service's RTO and freeze windows through the real `rewindctl` on real agents: a change
//! inside a freeze is refused naming the window, a break-glass one runs and waits for review, a
//! rollback is never frozen, `rollback plan` measures its estimate against the RTO, and `report
//! sla` counts the incident against it.

use rewind_proto::v1 as pb;
use rewind_tests::{
    Coordinator, must_change_where, must_deploy_v1_then_v2, must_rollback_end, must_start_hosts,
    output_text, run_ok,
};

#[tokio::test(flavor = "multi_thread")]
async fn a_freeze_holds_changes_but_not_rollbacks_and_plans_and_reports_use_the_rto() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let (hosts, mut client) = must_start_hosts(dir.path(), &coordinator, &["web-1", "web-2"]).await;
    must_deploy_v1_then_v2(&mut client, &hosts).await;

    let set = |rto: &str| {
        run_ok(&coordinator.rewindctl(&[
            "service",
            "set",
            "web",
            "--no-auto-rollback",
            "--rto",
            rto,
            "--freeze",
            "daily 00:00-24:00 UTC",
            "--freeze",
            "2026-12-24 00:00 - 2027-01-02 00:00 UTC",
        ]))
    };
    let shown = set("10m");
    assert!(
        shown.contains("10m") && shown.contains("daily 00:00-24:00 UTC"),
        "{shown}"
    );
    // A typo is named before anything is sent.
    let typo = coordinator.rewindctl(&["service", "set", "web", "--freeze", "Sat 00:00-06:00 CET"]);
    assert!(
        !typo.status.success() && output_text(&typo).contains("must end in UTC"),
        "{}",
        output_text(&typo)
    );

    // Frozen all day: a change is refused, naming the window and the way out.
    let refused = coordinator.rewindctl(&["change", "start", "web", "v1", "--reason", "redeploy"]);
    let said = output_text(&refused);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("service web is frozen (daily 00:00-24:00 UTC) until further notice")
            && said.contains("--break-glass"),
        "{said}"
    );

    // The plan measures its estimate against the RTO, and says so when it cannot fit.
    let plan = run_ok(&coordinator.rewindctl(&["rollback", "plan", "--change", "ch-2"]));
    assert!(plan.contains("fits web's RTO of 10m"), "{plan}");
    assert!(plan.contains("web restore: p50"), "{plan}");
    set("1s");
    let plan = run_ok(&coordinator.rewindctl(&["rollback", "plan", "--change", "ch-2"]));
    assert!(plan.contains("does NOT fit web's RTO of 1s"), "{plan}");

    // A rollback is never frozen.
    let started =
        run_ok(&coordinator.rewindctl(&["rollback", "start", "ch-2", "--reason", "v2 is bad"]));
    assert!(started.contains("rb-1"), "{started}");
    let rollback = must_rollback_end(&client, "rb-1").await;
    assert_eq!(rollback.state, pb::RollbackState::Succeeded as i32);

    // One incident, recovered, and over an RTO of one second.
    let report =
        run_ok(&coordinator.rewindctl(&["--output", "json", "report", "sla", "--since", "1h"]));
    let rows: serde_json::Value = serde_json::from_str(&report).unwrap();
    let web = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["service"] == "web")
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(web["incidents"], 1, "{report}");
    assert_eq!(web["rto_ms"], 1000, "{report}");
    assert_eq!(web["breached_rto"], 1, "{report}");
    assert!(web["recover_p50_ms"].as_i64().unwrap() > 1000, "{report}");
    assert_eq!(web["incident_ids"], serde_json::json!(["in-1"]), "{report}");
    let table = run_ok(&coordinator.rewindctl(&["report", "sla", "--since", "1h"]));
    assert!(
        table.contains("OVER RTO") && table.contains("web"),
        "{table}"
    );

    // Break-glass: the change runs inside the freeze and waits for a review that names it.
    let started = run_ok(&coordinator.rewindctl(&[
        "change",
        "start",
        "web",
        "v2",
        "--reason",
        "hotfix",
        "--break-glass",
    ]));
    assert!(started.contains("ch-3"), "{started}");
    let change = must_change_where(
        &client,
        "ch-3",
        "the break-glass change to start",
        |change| change.break_glass,
    )
    .await;
    assert_eq!(change.version, "v2");
    let review = run_ok(&coordinator.rewindctl(&["request", "show", "req-1"]));
    assert!(
        review.contains("inside web's freeze window (daily 00:00-24:00 UTC)"),
        "{review}"
    );
}
