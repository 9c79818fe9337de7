//! The service's own metrics end to end: agents scrape a real Prometheus text endpoint, the
//! coordinator records the error ratio and p99 latency as the change's baseline, a policy
//! condition relative to that baseline rolls the change back, the rollback's gate holds both
//! figures to the baseline, and the report compares them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::*;

/// Counters of one host's service, advanced on every scrape as if it served 100 requests.
#[derive(Default)]
struct Counters {
    ok: u64,
    failed: u64,
    /// Requests at or under 50 ms, at or under 1 s, and in all.
    fast: u64,
    slow: u64,
    all: u64,
}

/// Serves `/metrics/<host>`: on v1 (what the host's `current` link says) 1 % of requests fail
/// and all take under 50 ms; on v2, 30 % fail and most take up to a second.
async fn start_service_metrics(hosts: &[&TestHost]) -> String {
    let roots: HashMap<String, std::path::PathBuf> = hosts
        .iter()
        .map(|host| (host.id.clone(), host.root.clone()))
        .collect();
    let counters: Arc<Mutex<HashMap<String, Counters>>> = Arc::default();
    let app = axum::Router::new().route(
        "/metrics/{host}",
        axum::routing::get(
            move |axum::extract::Path(host): axum::extract::Path<String>| {
                let counters = Arc::clone(&counters);
                let root = roots.get(&host).cloned();
                async move {
                    let root = root.ok_or(axum::http::StatusCode::NOT_FOUND)?;
                    let on_v2 = std::fs::read_link(root.join("current"))
                        .is_ok_and(|target| target.ends_with("v2"));
                    let mut counters = counters.lock().unwrap();
                    let c = counters.entry(host).or_default();
                    let (failed, fast) = if on_v2 { (30, 20) } else { (1, 100) };
                    c.ok += 100 - failed;
                    c.failed += failed;
                    c.fast += fast;
                    c.slow += 100;
                    c.all += 100;
                    Ok::<_, axum::http::StatusCode>(format!(
                        "# TYPE http_requests_total counter\n\
                     http_requests_total{{code=\"200\"}} {}\n\
                     http_requests_total{{code=\"503\"}} {}\n\
                     # TYPE http_request_duration_seconds histogram\n\
                     http_request_duration_seconds_bucket{{le=\"0.05\"}} {}\n\
                     http_request_duration_seconds_bucket{{le=\"1\"}} {}\n\
                     http_request_duration_seconds_bucket{{le=\"+Inf\"}} {}\n\
                     http_request_duration_seconds_count {}\n",
                        c.ok, c.failed, c.fast, c.slow, c.all, c.all
                    ))
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_ratio_breach_from_the_apps_own_metrics_rolls_back_and_the_gate_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start_with(
        &dir.path().join("coordinator"),
        "[health]\nreport-interval-ms = 300\nwindow-s = 4\n",
    );
    let mut hosts: Vec<TestHost> = ["web-1", "web-2"]
        .iter()
        .map(|id| TestHost::must_prepare(dir.path(), id, &coordinator))
        .collect();
    let metrics = start_service_metrics(&hosts.iter().collect::<Vec<_>>()).await;
    for host in &mut hosts {
        host.must_scrape_metrics(&format!("http://{metrics}/metrics/{}", host.id));
        host.must_start_agent();
    }
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, 2).await;
    must_register_web(&mut client, &hosts[0], true).await;
    // Probes alone never trigger (a ratio cannot exceed 1): only the app's error ratio can.
    run_ok(&coordinator.rewindctl(&[
        "service",
        "set",
        "web",
        "--max-probe-failure-ratio",
        "1",
        "--for-s",
        "1",
        "--condition",
        "error_ratio > 5x baseline for 2s",
    ]));
    let v1 = must_change(&mut client, "v1").await;
    must_change_where(&client, &v1, "v1 to deploy", |change| {
        change.state == pb::ChangeState::Deployed as i32
    })
    .await;

    // The baseline needs v1's figures: 1 % errors, p99 under 50 ms. A change's baseline counts
    // only reports sent since the previous change was deployed, so let a health window of them
    // (4 s) come in first; what `service show` shows before then may predate v1.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let health = must_wait(Duration::from_secs(60), "v1's figures", || {
        let text = run_ok(&coordinator.rewindctl(&["service", "show", "web"]));
        text.contains("from its own metrics: error ratio 0.010")
            .then_some(text)
    });
    assert!(health.contains("p99 latency 50 ms"), "{health}");
    let v2 = must_change(&mut client, "v2").await;
    let change = must_change_where(&client, &v2, "v2 to be rolled back", |change| {
        !change.rollback_id.is_empty()
    })
    .await;
    let baseline = change.baseline.unwrap();
    assert_eq!(baseline.error_ratio, Some(0.01), "{baseline:?}");
    // All of v1's requests fall in the first bucket (0, 50 ms]: interpolated, p99 is 49.5.
    assert_eq!(baseline.p99_latency_ms, Some(49.5), "{baseline:?}");

    let rollback = must_rollback_end(&client, &change.rollback_id).await;
    assert_eq!(
        rollback.state,
        pb::RollbackState::Succeeded as i32,
        "{rollback:?}"
    );
    assert!(
        rollback.reason.starts_with("error_ratio 0.")
            && rollback
                .reason
                .contains("breached `error_ratio > 5x baseline for 2s` (limit 0.050)"),
        "{}",
        rollback.reason
    );
    for host in &hosts {
        host.must_be_restored_to_v1();
    }
    // The gate judged the app's figures against the baseline.
    let gate = &rollback.waves[0].gate_detail;
    assert!(
        gate.contains("error ratio 0.010 (baseline 0.010")
            && gate.contains("p99 latency 50 ms (baseline 50 ms)"),
        "{gate}"
    );
    // Once v2's reports have left the window, the report says the service is back.
    must_wait(
        Duration::from_secs(60),
        "the report to show web back",
        || {
            let report =
                run_ok(&coordinator.rewindctl(&["rollback", "explain", &change.rollback_id]));
            report
                .lines()
                .any(|line| {
                    line.starts_with("Report: web now")
                        && line.contains("error ratio 0.010")
                        && line.contains("back within the gate's tolerance")
                })
                .then_some(())
        },
    );
}
