//! Monitoring in the loop, with a real Prometheus Alertmanager: an alert labelled with a service
//! triggers its rollback through Alertmanager's own webhook, rewind silences the service's alerts
//! while the rollback runs and expires the silence after, bad or unsigned payloads are refused
//! with a reason and change nothing, and /metrics counts it all.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::*;

const TOKEN: &str = "alertmanager-bearer-token-for-tests";
const SECRET: &str = "generic-webhook-secret-for-tests";

async fn post(url: &str, headers: &[(&str, String)], body: &str) -> (u16, String) {
    let client = reqwest::Client::new();
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.expect("the coordinator answers HTTP");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

async fn get(url: &str) -> String {
    reqwest::get(url)
        .await
        .expect("GET")
        .text()
        .await
        .expect("a body")
}

/// Alertmanager's silences for `service`, as (state, createdBy).
async fn silences(alertmanager: &str, service: &str) -> Vec<(String, String)> {
    let text = get(&format!("{alertmanager}/api/v2/silences")).await;
    let silences: serde_json::Value = serde_json::from_str(&text).unwrap();
    silences
        .as_array()
        .unwrap()
        .iter()
        .filter(|silence| {
            silence["matchers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|matcher| matcher["name"] == "service" && matcher["value"] == service)
        })
        .map(|silence| {
            (
                silence["status"]["state"].as_str().unwrap().to_string(),
                silence["createdBy"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn trigger_count(
    client: &pb::control_service_client::ControlServiceClient<tonic::transport::Channel>,
) -> usize {
    client
        .clone()
        .list_triggers(pb::ListTriggersRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .triggers
        .len()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_alertmanager_alert_rolls_back_its_service_under_a_silence() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("am.token");
    std::fs::write(&token, TOKEN).unwrap();
    let secret = dir.path().join("webhook.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let alertmanager_port = free_port();
    let alertmanager = format!("http://127.0.0.1:{alertmanager_port}");
    let coordinator = Coordinator::must_start_with(
        &dir.path().join("coordinator"),
        &format!(
            r#"[http]
listen = "127.0.0.1:0"
alertmanager-token-file = "{token}"
webhook-secret-file = "{secret}"
[alertmanager]
url = "{alertmanager}"
silence-lease-s = 30
"#,
            token = token.display(),
            secret = secret.display(),
        ),
    );
    let http = format!("http://{}", coordinator.http_address);
    let _alertmanager = must_start_alertmanager(
        &dir.path().join("alertmanager"),
        alertmanager_port,
        &format!("{http}/v1/alertmanager"),
        &token,
    );
    let (hosts, mut client) = must_start_hosts(dir.path(), &coordinator, &["web-1", "web-2"]).await;
    must_deploy_v1_then_v2(&mut client, &hosts).await;

    // Bad and unsigned requests: a 4xx with the reason, and no trigger recorded.
    let am_url = format!("{http}/v1/alertmanager");
    let bearer = vec![("authorization", format!("Bearer {TOKEN}"))];
    let refusals = [
        (
            post(&am_url, &[], "{}").await,
            401,
            "missing `Authorization: Bearer",
        ),
        (
            post(&am_url, &[("authorization", "Bearer wrong".into())], "{}").await,
            401,
            "not the configured one",
        ),
        (
            post(&am_url, &bearer, "not json").await,
            400,
            "not an Alertmanager webhook payload",
        ),
        (
            post(&am_url, &bearer, r#"{"version":"3","alerts":[]}"#).await,
            400,
            "version \\\"3\\\" is not supported",
        ),
        (
            post(
                &format!("{http}/v1/webhook"),
                &[],
                r#"{"service":"web","reason":"x"}"#,
            )
            .await,
            401,
            "missing header x-rewind-timestamp",
        ),
    ];
    for ((status, body), expected_status, expected) in refusals {
        assert_eq!(status, expected_status, "{body}");
        assert!(body.contains(expected), "{expected:?} in {body}");
    }
    // Unusable alerts never stop the others of a notification (Alertmanager does not retry a
    // 4xx): they are skipped, named, and nothing is triggered for them.
    let (status, body) = post(
        &am_url,
        &bearer,
        r#"{"version":"4","alerts":[
            {"status":"firing","labels":{"alertname":"A","service":"Web!"}},
            {"status":"firing","labels":{"alertname":"B","service":"billing-legacy"}},
            {"status":"firing","labels":{"alertname":"C"}}]}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for expected in [
        "labels.service",
        "no service billing-legacy",
        "C: no `service` label",
    ] {
        assert!(body.contains(expected), "{expected:?} in {body}");
    }
    // Signed, but for a service rewind does not know.
    let body = r#"{"service":"ghost","reason":"probe"}"#;
    let now = rewind_shared::time::now_ms();
    let signed = vec![
        ("x-rewind-timestamp", now.to_string()),
        (
            "x-rewind-signature",
            webhook_signature(SECRET.as_bytes(), now, body.as_bytes()),
        ),
    ];
    let (status, answer) = post(&format!("{http}/v1/webhook"), &signed, body).await;
    assert_eq!(status, 422, "{answer}");
    assert!(answer.contains("no service ghost"), "{answer}");
    assert_eq!(
        trigger_count(&client).await,
        0,
        "refused requests change nothing"
    );

    // The real thing: an alert sent to Alertmanager, which calls rewind's receiver.
    let alert = serde_json::json!([{
        // No environment label: the service's latest change, wherever it ran (the test hosts
        // carry no environment either; an alert for another environment would be ignored).
        "labels": {"alertname": "HighErrorRate", "service": "web"},
        "annotations": {"summary": "5xx above 5% since v2"},
        "startsAt": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    }]);
    let (status, answer) = post(
        &format!("{alertmanager}/api/v2/alerts"),
        &[],
        &alert.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let rollback = must_wait_async(
        Duration::from_secs(180),
        "the alert to start a rollback",
        || {
            let mut client = client.clone();
            async move {
                client
                    .list_rollbacks(pb::ListRollbacksRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .rollbacks
                    .into_iter()
                    .next()
            }
        },
    )
    .await;
    assert_eq!(rollback.trigger, "automatic");
    assert_eq!(rollback.change_ids, vec!["ch-2"]);
    assert!(
        rollback
            .reason
            .starts_with("Alertmanager alert HighErrorRate firing since"),
        "{}",
        rollback.reason
    );
    // Active while the rollback runs (or already expired, if it ran faster than a look).
    let running = must_wait_async(Duration::from_secs(60), "a silence for web", || {
        let alertmanager = alertmanager.clone();
        async move {
            let found = silences(&alertmanager, "web").await;
            found.into_iter().next()
        }
    })
    .await;
    assert_eq!(running.1, "rewind");

    let ended = must_rollback_end(&client, &rollback.rollback_id).await;
    assert_eq!(
        ended.state,
        pb::RollbackState::Succeeded as i32,
        "{ended:?}"
    );
    must_wait_async(Duration::from_secs(60), "the silence to expire", || {
        let alertmanager = alertmanager.clone();
        async move {
            let found = silences(&alertmanager, "web").await;
            (!found.is_empty() && found.iter().all(|(state, _)| state == "expired")).then_some(())
        }
    })
    .await;

    // Alertmanager may notify again; the change is already rolled back, so nothing more starts.
    let triggers = client
        .list_triggers(pb::ListTriggersRequest {
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(triggers.triggers[0].source, "alertmanager");
    assert_eq!(triggers.triggers[0].outcome, "started");
    assert_eq!(triggers.triggers[0].rollback_id, rollback.rollback_id);

    let metrics = get(&format!("{http}/metrics")).await;
    for expected in [
        r#"rewind_rollbacks_total{outcome="succeeded",trigger="automatic"} 1"#,
        r#"rewind_triggers_total{source="alertmanager",outcome="started"} 1"#,
        r#"rewind_rollback_step_duration_seconds_count{kind="restore",outcome="succeeded"} 2"#,
        "rewind_is_leader 1",
    ] {
        assert!(metrics.contains(expected), "{expected} in:\n{metrics}");
    }
}
