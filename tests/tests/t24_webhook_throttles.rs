//! A signed generic webhook starts a rollback of a real fleet, and the throttles the config file
//! sets hold the automatic rollbacks that follow: the cooldown, then the budget, then flapping
//! (a person's rollbacks count towards it). Each refusal is recorded with its reason and starts
//! nothing.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_proto::v1::control_service_client::ControlServiceClient;
use rewind_tests::{
    Coordinator, must_change_where, must_deploy_v1_then_v2, must_rollback_end, must_start_hosts,
    post_webhook_as_signed, webhook_signature,
};
use tonic::transport::Channel;

const SECRET: &str = "webhook secret of t24";
const COOLDOWN_S: u64 = 45;

/// A signed generic webhook asking for a rollback of `web`: its body, timestamp and signature.
fn rollback_request(reason: &str) -> (String, u64, String) {
    let body = serde_json::json!({"service": "web", "reason": reason}).to_string();
    let now = rewind_shared::time::now_ms();
    let signature = webhook_signature(SECRET.as_bytes(), now, body.as_bytes());
    (body, now, signature)
}

/// POSTs a request; returns its status and answer.
async fn post(
    http: &str,
    (body, at_ms, signature): (String, u64, String),
) -> (u16, serde_json::Value) {
    let (status, text) = post_webhook_as_signed(http, at_ms, &signature, body).await;
    let answer = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, answer)
}

async fn ask_for_a_rollback(http: &str, reason: &str) -> (u16, serde_json::Value) {
    post(http, rollback_request(reason)).await
}

/// Deploys v2 again (a new change from v1), as a deploy tool would.
async fn must_redeploy_v2(client: &mut ControlServiceClient<Channel>, round: u32) -> String {
    let change = client
        .start_change(pb::StartChangeRequest {
            break_glass: false,
            request_id: format!("redeploy-{round}"),
            service: "web".into(),
            version: "v2".into(),
            reason: format!("try v2 again ({round})"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .change
        .unwrap();
    must_change_where(client, &change.change_id, "v2 deployed again", |change| {
        change.state == pb::ChangeState::Deployed as i32
    })
    .await;
    change.change_id
}

/// How many triggers are recorded.
async fn trigger_count(client: &mut ControlServiceClient<Channel>) -> usize {
    client
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

/// The latest recorded trigger's outcome and detail.
async fn latest_trigger(client: &mut ControlServiceClient<Channel>) -> (String, String) {
    let triggers = client
        .list_triggers(pb::ListTriggersRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .triggers;
    let latest = triggers
        .iter()
        .max_by_key(|trigger| trigger.at_ms)
        .expect("a trigger is recorded");
    (latest.outcome.clone(), latest.detail.clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signed_webhook_rolls_back_and_the_configured_throttles_hold_what_follows() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("webhook.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let coordinator = Coordinator::must_start_with(
        &dir.path().join("coordinator"),
        &format!(
            r#"[http]
listen = "127.0.0.1:0"
webhook-secret-file = "{secret}"
[throttle]
budget = 1
budget-window-s = 3600
cooldown-s = {COOLDOWN_S}
flap-rollbacks = 3
flap-window-s = 3600
"#,
            secret = secret.display(),
        ),
    );
    let http = format!("http://{}", coordinator.http_address);
    let (hosts, mut client) = must_start_hosts(dir.path(), &coordinator, &["web-1", "web-2"]).await;
    must_deploy_v1_then_v2(&mut client, &hosts).await;

    // The webhook starts the rollback of web's latest change, which restores every host.
    let first = rollback_request("error budget burning");
    let (status, answer) = post(&http, first.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outcome"], "started", "{answer}");
    let rollback_id = answer["rollback_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no rollback id in {answer}"))
        .to_string();
    let started_at = std::time::Instant::now();
    let ended = must_rollback_end(&client, &rollback_id).await;
    assert_eq!(
        ended.state,
        pb::RollbackState::Succeeded as i32,
        "{ended:?}"
    );
    assert_eq!(ended.trigger, "automatic");
    for host in &hosts {
        host.must_be_restored_to_v1();
    }

    // Within the cooldown: refused, the reason recorded, nothing started. A person rolls it
    // back (that counts towards flapping).
    let change = must_redeploy_v2(&mut client, 1).await;

    // The first request sent again, its signature's hex upper-cased: the same request (the
    // same MAC), answered from the request log, judging nothing anew against the new change.
    let triggers_before = trigger_count(&mut client).await;
    let (body, at_ms, signature) = first;
    let shouted = format!(
        "sha256={}",
        signature.trim_start_matches("sha256=").to_uppercase()
    );
    let (status, replayed) = post(&http, (body, at_ms, shouted)).await;
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(replayed["rollback_id"], rollback_id.as_str(), "{replayed}");
    let triggers_after = trigger_count(&mut client).await;
    assert_eq!(
        triggers_after, triggers_before,
        "the replay recorded nothing"
    );

    let (_, answer) = ask_for_a_rollback(&http, "again").await;
    let (outcome, detail) = latest_trigger(&mut client).await;
    assert_eq!(outcome, "throttled", "{answer}");
    assert!(
        detail.contains(&format!("within its {COOLDOWN_S} s cooldown")),
        "{detail}"
    );
    let refused = client
        .get_change(pb::GetChangeRequest {
            change_id: change.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .change
        .unwrap();
    assert_eq!(
        refused.state,
        pb::ChangeState::Deployed as i32,
        "no rollback"
    );
    must_roll_back_by_hand(&mut client, &change).await;

    // After the cooldown, the environment's budget of one automatic rollback is spent.
    let cooled = Duration::from_secs(COOLDOWN_S + 1).saturating_sub(started_at.elapsed());
    tokio::time::sleep(cooled).await;
    let change = must_redeploy_v2(&mut client, 2).await;
    ask_for_a_rollback(&http, "and again").await;
    let (outcome, detail) = latest_trigger(&mut client).await;
    assert_eq!(outcome, "throttled");
    assert!(
        detail.contains("budget of 1 automatic rollbacks per 3600 s"),
        "{detail}"
    );
    must_roll_back_by_hand(&mut client, &change).await;

    // Three rollbacks of web within the flap window: web is flapping, a person decides.
    must_redeploy_v2(&mut client, 3).await;
    ask_for_a_rollback(&http, "once more").await;
    let (outcome, detail) = latest_trigger(&mut client).await;
    assert_eq!(outcome, "throttled");
    assert!(
        detail.contains("flapping") && detail.contains("rolled back 3 times within 3600 s"),
        "{detail}"
    );
    let rollbacks = client
        .list_rollbacks(pb::ListRollbacksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .rollbacks;
    assert_eq!(
        rollbacks.len(),
        3,
        "only the webhook's and the person's rollbacks ran"
    );
    for host in &hosts {
        assert_eq!(host.current_link(), "releases/v2", "{}: untouched", host.id);
    }
}

/// A person rolls `change` back (a manual rollback), and it succeeds.
async fn must_roll_back_by_hand(client: &mut ControlServiceClient<Channel>, change: &str) {
    let rollback = client
        .start_rollback(pb::StartRollbackRequest {
            request_id: format!("by-hand-{change}"),
            change_id: change.to_string(),
            reason: "a person decides".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap();
    let ended = must_rollback_end(client, &rollback.rollback_id).await;
    assert_eq!(
        ended.state,
        pb::RollbackState::Succeeded as i32,
        "{ended:?}"
    );
}
