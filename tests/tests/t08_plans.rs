//! Rollback plans end to end: three dependent services over two regions reverted in plan order
//! (checked from the agents' journals), a compatibility refusal, a plan hash that must match, and
//! a failing health gate that pauses the rollback and escalates to a signed webhook.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use rewind_proto::v1 as pb;
use rewind_proto::v1::control_service_client::ControlServiceClient;
use rewind_tests::*;
use tonic::transport::Channel;

const SECRET: &str = "a-shared-secret-for-the-test-hook";

/// A webhook receiver that records every POST it gets.
struct Receiver {
    address: String,
    received: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
}

impl Receiver {
    async fn start() -> Self {
        let received: Arc<Mutex<Vec<(HeaderMap, Bytes)>>> = Arc::default();
        let store = Arc::clone(&received);
        let app = axum::Router::new()
            .route(
                "/hooks/rewind",
                axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                    let store = Arc::clone(&store);
                    async move {
                        store.lock().unwrap().push((headers, body));
                        StatusCode::OK
                    }
                }),
            )
            // A synthetic journey for web's gates to run.
            .route(
                "/journey/checkout",
                axum::routing::get(|| async { "checkout ok" }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { address, received }
    }
}

/// (host, region, service) in the order the plan must revert them: consumers first, the canary
/// region `us` first within each service.
const FLEET: [(&str, &str, &str); 5] = [
    ("web-us", "us", "web"),
    ("web-eu", "eu", "web"),
    ("api-us", "us", "api"),
    ("api-eu", "eu", "api"),
    ("db-eu", "eu", "db"),
];

async fn must_register(
    client: &mut ControlServiceClient<Channel>,
    hosts: &[TestHost],
    journey: &str,
) {
    for (service, depends_on) in [("db", vec![]), ("api", vec!["db"]), ("web", vec!["api"])] {
        client
            .put_service(pb::PutServiceRequest {
                request_id: format!("svc-{service}"),
                service: Some(pb::Service {
                    rto_s: 0,
                    freeze_windows: vec![],
                    drift_policy: String::new(),
                    isolate_after_failures: 0,
                    name: service.into(),
                    depends_on: depends_on.into_iter().map(String::from).collect(),
                    policy: Some(pb::HealthPolicy {
                        max_probe_failure_ratio: 0.5,
                        for_s: 1,
                        watch_s: 600,
                        auto_rollback: false,
                        ..Default::default()
                    }),
                    synthetics: if service == "web" {
                        vec![pb::SyntheticCheck {
                            name: "checkout".into(),
                            url: journey.to_string(),
                            body_contains: "checkout ok".into(),
                            ..Default::default()
                        }]
                    } else {
                        vec![]
                    },
                    rollback_steps: Vec::new(),
                }),
            })
            .await
            .expect("put service");
        let host = hosts
            .iter()
            .zip(FLEET)
            .find(|(_, (_, _, name))| *name == service)
            .unwrap()
            .0;
        for (version, api) in [("v1", 1u32), ("v2", 2)] {
            let dir = host.root.join("releases").join(version);
            let artifact_digest = rewind_shared::digest::tree_digest(&dir).unwrap();
            // web of each version needs the api of the same version; api says which it offers.
            // api writes its events in the schema of its version, web reads up to its own.
            let (api_version, requires) = match service {
                "api" => (api, BTreeMap::new()),
                "web" => (0, BTreeMap::from([("api".to_string(), api)])),
                _ => (0, BTreeMap::new()),
            };
            let topic = || BTreeMap::from([("orders.created".to_string(), api)]);
            let (produces, consumes) = match service {
                "api" => (topic(), BTreeMap::new()),
                "web" => (BTreeMap::new(), topic()),
                _ => (BTreeMap::new(), BTreeMap::new()),
            };
            client
                .register_release(pb::RegisterReleaseRequest {
                    request_id: format!("rel-{service}-{version}"),
                    release: Some(pb::Release {
                        service: service.into(),
                        version: version.into(),
                        artifact_digest,
                        api_version,
                        requires: requires.into_iter().collect(),
                        produces: produces.into_iter().collect(),
                        consumes: consumes.into_iter().collect(),
                        ..Default::default()
                    }),
                })
                .await
                .expect("register release");
        }
    }
}

async fn must_deploy(client: &mut ControlServiceClient<Channel>, service: &str, version: &str) {
    let change_id = client
        .start_change(pb::StartChangeRequest {
            break_glass: false,
            request_id: format!("change-{service}-{version}"),
            service: service.into(),
            version: version.into(),
            host_ids: vec![],
            reason: "test".into(),
            flags_on: vec![],
            migrations: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .change
        .unwrap()
        .change_id;
    must_change_where(client, &change_id, "the change to deploy", |change| {
        change.state == pb::ChangeState::Deployed as i32
    })
    .await;
}

fn verify_signature(headers: &HeaderMap, body: &[u8]) {
    let timestamp = headers["x-rewind-timestamp"].to_str().unwrap();
    let signature = headers["x-rewind-signature"].to_str().unwrap();
    let expected = webhook_signature(SECRET.as_bytes(), timestamp.parse().unwrap(), body);
    assert_eq!(
        signature, expected,
        "the escalation is signed with the secret"
    );
}

/// The journal's rollback steps of `rb-1` on a host: (step kind, started at).
fn rollback_steps(journal: &[serde_json::Value]) -> Vec<(String, u64)> {
    let mut steps: Vec<(String, u64)> = journal
        .iter()
        .filter_map(|record| {
            let step_id = record["step_id"].as_str()?;
            let kind = step_id.strip_prefix("rb-1/")?.split('/').nth(1)?;
            Some((kind.to_string(), record["started_at_ms"].as_u64()?))
        })
        .collect();
    steps.sort_by_key(|(_, at)| *at);
    steps
}

fn write_executable(path: &Path, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, script).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plan_reverts_consumers_first_region_by_region_and_a_failing_gate_escalates() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let coordinator = Coordinator::must_start_with(
        &dir.path().join("coordinator"),
        &format!(
            "[escalation]\nwebhook-url = \"http://{}/hooks/rewind\"\nsecret-file = \"{}\"\n",
            receiver.address,
            secret.display()
        ),
    );
    let ca = coordinator.ca();
    let addresses = [coordinator.address.clone()];
    let mut hosts: Vec<TestHost> = FLEET
        .iter()
        .map(|(id, region, service)| {
            TestHost::must_prepare_services(
                dir.path(),
                id,
                &ca,
                &coordinator.tls_dir(),
                &addresses,
                region,
                &[service],
            )
        })
        .collect();
    for host in &mut hosts {
        host.must_start_agent();
    }
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, hosts.len()).await;
    let journey = format!("http://{}/journey/checkout", receiver.address);
    must_register(&mut client, &hosts, &journey).await;
    for version in ["v1", "v2"] {
        for service in ["db", "api", "web"] {
            must_deploy(&mut client, service, version).await;
        }
    }
    // ch-4 db v2, ch-5 api v2, ch-6 web v2.

    // Reverting api alone would leave web v2 without the API it needs.
    let refused = coordinator.rewindctl(&["rollback", "plan", "--change", "ch-5"]);
    assert!(!refused.status.success());
    let text = String::from_utf8_lossy(&refused.stdout);
    assert!(
        text.contains("reverting api to v1 (API 1) breaks web v2, which needs api API 2"),
        "{text}"
    );
    let refused = coordinator.rewindctl(&["rollback", "start", "ch-5", "--reason", "test"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("the plan would break consumers"),
        "{refused:?}"
    );
    // Reverting web alone would leave it unable to read what api v2 writes to the topic.
    let refused = coordinator.rewindctl(&["rollback", "plan", "--change", "ch-6"]);
    assert!(!refused.status.success());
    let text = String::from_utf8_lossy(&refused.stdout);
    assert!(
        text.contains(
            "topic orders.created: web v1 reads message schema up to 1, but api v2 writes 2"
        ),
        "{text}"
    );

    let selection = [
        "--service",
        "web",
        "--service",
        "api",
        "--service",
        "db",
        "--to",
        "last-good",
        "--canary-region",
        "us",
        "--gate-settle-s",
        "2",
        "--gate-timeout-s",
        "5",
    ];
    let plan: serde_json::Value = serde_json::from_str(&run_ok(
        &coordinator.rewindctl(
            &[
                &["--output", "json", "rollback", "plan"][..],
                &selection[..],
            ]
            .concat(),
        ),
    ))
    .unwrap();
    let waves: Vec<(String, String)> = plan["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|wave| {
            (
                wave["service"].as_str().unwrap().to_string(),
                wave["region"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = FLEET
        .iter()
        .map(|(_, region, service)| (service.to_string(), region.to_string()))
        .collect();
    assert_eq!(waves, expected, "{plan}");
    let hash = plan["planHash"].as_str().unwrap().to_string();
    let table =
        run_ok(&coordinator.rewindctl(&[&["rollback", "plan"][..], &selection[..]].concat()));
    assert!(
        table.contains(&hash) && table.contains("expected duration"),
        "{table}"
    );
    // Both reverted: compatible, but what api v2 already queued may still be in the topic.
    assert!(
        table.contains(
            "topic orders.created: messages api v2 already queued may carry schema 2, which web \
             v1 does not read"
        ),
        "{table}"
    );
    // A host that pruned the release its restore would point at is named in the readiness.
    let pruned = hosts[1].root.join("releases/v1");
    let aside = hosts[1].root.join("v1-aside");
    std::fs::rename(&pruned, &aside).unwrap();
    must_wait(
        Duration::from_secs(30),
        "the pruned release in the readiness",
        || {
            let table = run_ok(
                &coordinator.rewindctl(&[&["rollback", "plan"][..], &selection[..]].concat()),
            );
            table
                .contains("artifacts no longer retained: web-eu: web release v1 is gone")
                .then_some(())
        },
    );
    std::fs::rename(&aside, &pruned).unwrap();

    // The last wave's service breaks once it is back in rotation: its gate must fail.
    let db = &hosts[4];
    write_executable(
        &db.root.join("on-undrain"),
        &format!(
            "#!/bin/sh\necho 500 > {}/current/health_status\n",
            db.root.display()
        ),
    );

    let stale_hash = format!("sha256:{}", "0".repeat(64));
    let stale = coordinator.rewindctl(
        &[
            &["rollback", "start", "--reason", "test", "--plan-hash"][..],
            &[stale_hash.as_str()][..],
            &selection[..],
        ]
        .concat(),
    );
    assert!(!stale.status.success());
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("the plan changed since it was shown"),
        "{stale:?}"
    );
    run_ok(
        &coordinator.rewindctl(
            &[
                &[
                    "rollback",
                    "start",
                    "--reason",
                    "bad release train",
                    "--plan-hash",
                ][..],
                &[hash.as_str()][..],
                &selection[..],
            ]
            .concat(),
        ),
    );

    // Generous: CI runs this beside clusters and containers on two cores.
    let paused = must_wait_async(Duration::from_secs(300), "the rollback to pause", || {
        let mut client = client.clone();
        async move {
            let rollback = client
                .get_rollback(pb::GetRollbackRequest {
                    rollback_id: "rb-1".into(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .rollback?;
            (rollback.state == pb::RollbackState::Paused as i32).then_some(rollback)
        }
    })
    .await;
    assert_eq!(paused.plan_hash, hash);
    assert!(
        paused
            .paused_reason
            .starts_with("gate after wave 5 (db in eu) failed: after 5 s, not within tolerance"),
        "{}",
        paused.paused_reason
    );
    let (headers, body) = must_wait(Duration::from_secs(30), "the escalation webhook", || {
        receiver.received.lock().unwrap().first().cloned()
    });
    verify_signature(&headers, &body);
    let escalation: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(escalation["rollback_id"], "rb-1");
    assert_eq!(escalation["service"], "db");
    assert_eq!(escalation["explain"], "rewindctl rollback explain rb-1");
    assert!(
        escalation["explanation"]
            .as_str()
            .unwrap()
            .contains("PAUSED"),
        "{escalation}"
    );

    let explanation = run_ok(&coordinator.rewindctl(&["rollback", "explain", "rb-1"]));
    for expected in [
        "Wave 5 of 5: db (ch-4) in region eu",
        "It is PAUSED and waits for a person: gate after wave 5",
        "Escalation: delivered.",
        "rewindctl rollback resume rb-1",
    ] {
        assert!(
            explanation.contains(expected),
            "{expected:?} in:\n{explanation}"
        );
    }

    // The on-call engineer fixes db and resumes: the gate is judged afresh and passes.
    std::fs::remove_file(db.root.join("on-undrain")).unwrap();
    std::fs::write(db.root.join("releases/v1/health_status"), "200").unwrap();
    run_ok(&coordinator.rewindctl(&["rollback", "resume", "rb-1", "--reason", "db fixed"]));
    let rollback = must_rollback_end(&client, "rb-1").await;
    assert_eq!(
        rollback.state,
        pb::RollbackState::Succeeded as i32,
        "{rollback:?}"
    );
    assert_eq!(rollback.escalations.len(), 1, "one pause, one escalation");
    for wave in rollback.waves.iter().filter(|wave| wave.service == "web") {
        assert!(
            wave.gate_detail
                .contains("synthetic checks pass: checkout: 200 in"),
            "web's gates ran its journey: {}",
            wave.gate_detail
        );
    }

    // After it, the report compares each service with its baseline (db's window still holds
    // its failing reports for a few seconds).
    must_wait(
        Duration::from_secs(90),
        "every service back near its baseline",
        || {
            let report = run_ok(&coordinator.rewindctl(&["rollback", "explain", "rb-1"]));
            ["web", "api", "db"]
                .iter()
                .all(|service| {
                    report.lines().any(|line| {
                        line.starts_with(&format!("Report: {service} now"))
                            && line.contains("probe failure ratio 0.000")
                            && line.contains("back within the gate's tolerance")
                    })
                })
                .then_some(())
        },
    );

    // The agents' journals show the plan's order: each wave starts after the previous ended,
    // and on each host drain, restore, restart and undrain ran once, in that order.
    let mut previous_wave_end = 0;
    for (host, (id, _, _)) in hosts.iter_mut().zip(FLEET) {
        let rotation = std::fs::read_to_string(host.root.join("rotation")).unwrap();
        assert_eq!(rotation, "drain\nundrain\n", "{id}");
        let steps = rollback_steps(&host.must_stop_and_read_journal());
        let kinds: Vec<&str> = steps.iter().map(|(kind, _)| kind.as_str()).collect();
        assert_eq!(kinds, ["drain", "restore", "restart", "undrain"], "{id}");
        let (first, last) = (steps[0].1, steps[3].1);
        assert!(
            first >= previous_wave_end,
            "{id} began at {first}, before the previous wave's last step at {previous_wave_end}"
        );
        previous_wave_end = last;
        host.must_be_restored_to_v1();
    }
}
