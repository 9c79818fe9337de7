//! Monitoring webhooks that ask for automatic rollbacks.
//!
//! - `POST /v1/alertmanager`: Prometheus Alertmanager's webhook (payload version 4), with the
//!   bearer token from `http.alertmanager-token-file` (Alertmanager's
//!   `http_config.authorization.credentials_file`). Each firing alert labelled `service` (and
//!   optionally `environment`) asks for a rollback of that service's latest change.
//! - `POST /v1/webhook`: `{"service", "environment", "reason"}` from any other monitor, signed
//!   like rewind's own escalations: `X-Rewind-Timestamp` (ms) and `X-Rewind-Signature:
//!   sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`, at most five minutes old.
//!
//! Every request for a rollback goes through the replicated throttles (`AutoTrigger`). A bad,
//! unsigned or unauthorised request gets a 4xx with the reason and changes nothing.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State as Extract;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::Mac;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::info;

use rewind_shared::identity::Kind;

use super::HttpState;
use crate::access::{Level, Principal, Target};
use crate::engine::{SIGNATURE_HEADER, TIMESTAMP_HEADER};
use crate::errors::CoordinatorError;
use crate::state_machine::{Command, CommandKind, Outcome, TriggerSource, rollback_id};

/// Oldest signed webhook accepted, against replays.
const MAX_WEBHOOK_AGE_MS: u64 = 5 * 60 * 1000;
/// Most distinct services one Alertmanager notification may ask about.
const MAX_SERVICES_PER_NOTIFICATION: usize = 64;

/// Alertmanager's webhook payload, version 4. Fields rewind does not use are ignored.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertmanagerPayload {
    pub version: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub receiver: String,
    #[serde(default)]
    pub group_key: String,
    #[serde(default)]
    pub external_url: String,
    pub alerts: Vec<Alert>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub status: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub starts_at: String,
    #[serde(default)]
    pub fingerprint: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    pub service: String,
    #[serde(default)]
    pub environment: String,
    pub reason: String,
}

/// What became of one request for a rollback.
#[derive(Debug, Serialize)]
struct TriggerAnswer {
    service: String,
    outcome: String,
    rollback_id: String,
    detail: String,
}

fn refuse(status: StatusCode, reason: impl Into<String>) -> Response {
    let reason = reason.into();
    info!(%status, reason, "Webhook refused.");
    (status, Json(serde_json::json!({ "error": reason }))).into_response()
}

pub async fn alertmanager(
    Extract(http): Extract<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(token) = &http.alertmanager_token else {
        return refuse(
            StatusCode::NOT_FOUND,
            "the Alertmanager receiver is off: set http.alertmanager-token-file",
        );
    };
    let presented = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let Some(presented) = presented else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "missing `Authorization: Bearer <token>` (Alertmanager http_config.authorization)",
        );
    };
    // Compare digests so the comparison time says nothing about the token.
    if Sha256::digest(presented.as_bytes()) != Sha256::digest(token.as_slice()) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "the bearer token is not the configured one",
        );
    }
    let payload: AlertmanagerPayload = match serde_json::from_slice(&body) {
        Ok(payload) => payload,
        Err(error) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("not an Alertmanager webhook payload: {error}"),
            );
        }
    };
    if payload.version != "4" {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "Alertmanager payload version {:?} is not supported: version \"4\" is",
                payload.version
            ),
        );
    }
    // One request per service, from its first firing alert.
    let mut wanted: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut skipped = Vec::new();
    for alert in payload
        .alerts
        .iter()
        .filter(|alert| alert.status == "firing")
    {
        let name = alert
            .labels
            .get("alertname")
            .map_or("(unnamed alert)", String::as_str);
        // One unusable alert never stops the others of the notification: it is skipped and
        // reported, and Alertmanager (which does not retry a 4xx) still gets its 200.
        let Some(service) = alert.labels.get("service") else {
            skipped.push(format!("{name}: no `service` label"));
            continue;
        };
        if let Err(error) = rewind_shared::names::validate_name("labels.service", service) {
            skipped.push(format!("{name}: {error}"));
            continue;
        }
        let environment = alert.labels.get("environment").cloned().unwrap_or_default();
        if !environment.is_empty()
            && let Err(error) =
                rewind_shared::names::validate_name("labels.environment", &environment)
        {
            skipped.push(format!("{name}: {error}"));
            continue;
        }
        let summary = alert
            .annotations
            .get("summary")
            .map(|summary| format!(": {summary}"))
            .unwrap_or_default();
        let reason = format!(
            "Alertmanager alert {name} firing since {}{summary}",
            alert.starts_at
        );
        // Escaped: an alert's summary is anyone's text, and it reaches the audit log.
        wanted
            .entry(service.clone())
            .or_insert((environment, rewind_shared::bounds::kept(&reason, 1024)));
    }
    if wanted.len() > MAX_SERVICES_PER_NOTIFICATION {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "the notification names {} services, at most {MAX_SERVICES_PER_NOTIFICATION} are accepted",
                wanted.len()
            ),
        );
    }
    let mut answers = Vec::new();
    for (service, (environment, reason)) in wanted {
        let asked = Asked {
            identity: &http.alertmanager_identity,
            source: TriggerSource::Alertmanager,
            service: &service,
            environment: &environment,
            request_id: String::new(),
        };
        match trigger(&http, asked, reason).await {
            Ok(answer) => answers.push(answer),
            // An unknown service is this alert's problem only.
            Err(Refusal::Unknown(why)) => skipped.push(why),
            // Not the leader, or overloaded: Alertmanager retries the whole notification,
            // and the triggers already recorded answer `ignored` the second time.
            Err(Refusal::Response(response)) => return response,
        }
    }
    (
        StatusCode::OK,
        Json(serde_json::json!({ "triggers": answers, "skipped": skipped })),
    )
        .into_response()
}

pub async fn webhook(
    Extract(http): Extract<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(secret) = &http.webhook_secret else {
        return refuse(
            StatusCode::NOT_FOUND,
            "the generic webhook is off: set http.webhook-secret-file",
        );
    };
    let mac = match check_signature(secret, &headers, &body, rewind_shared::time::now_ms()) {
        Ok(mac) => mac,
        Err(reason) => return refuse(StatusCode::UNAUTHORIZED, reason),
    };
    let request: WebhookRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"service\", \"environment\", \"reason\"}}: {error}"),
            );
        }
    };
    for (field, value) in [
        ("service", &request.service),
        ("environment", &request.environment),
    ] {
        if (field == "service" || !value.is_empty())
            && let Err(error) = rewind_shared::names::validate_name(field, value)
        {
            return refuse(StatusCode::BAD_REQUEST, error.to_string());
        }
    }
    if request.reason.trim().is_empty() || request.reason.len() > 1024 {
        return refuse(
            StatusCode::BAD_REQUEST,
            "reason: say why, in at most 1024 bytes: it goes into the audit log",
        );
    }
    let reason = format!(
        "webhook: {}",
        rewind_shared::bounds::kept(&request.reason, 1024)
    );
    // The verified MAC names this exact request (its timestamp and body): a replay within the
    // five minutes, however its header is spelled (upper-case hex, a zero-padded timestamp),
    // is answered from the request log and acts once.
    let asked = Asked {
        identity: &http.webhook_identity,
        source: TriggerSource::Webhook,
        service: &request.service,
        environment: &request.environment,
        request_id: format!("webhook-{}", hex::encode(mac)),
    };
    match trigger(&http, asked, reason).await {
        Ok(answer) => (StatusCode::OK, Json(answer)).into_response(),
        Err(Refusal::Unknown(why)) => refuse(StatusCode::UNPROCESSABLE_ENTITY, why),
        Err(Refusal::Response(response)) => response,
    }
}

/// Checks a generic webhook's timestamp and signature; the verified MAC's bytes on success.
fn check_signature(
    secret: &[u8],
    headers: &HeaderMap,
    body: &[u8],
    now_ms: u64,
) -> Result<Vec<u8>, String> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| format!("missing header {name}"))
    };
    let timestamp: u64 = header(TIMESTAMP_HEADER)?
        .parse()
        .map_err(|_| format!("{TIMESTAMP_HEADER} must be milliseconds since the epoch"))?;
    if now_ms.abs_diff(timestamp) > MAX_WEBHOOK_AGE_MS {
        return Err(format!(
            "{TIMESTAMP_HEADER} is more than five minutes from now: refused as a possible replay"
        ));
    }
    let signature = header(SIGNATURE_HEADER)?
        .strip_prefix("sha256=")
        .and_then(|hex_text| hex::decode(hex_text).ok())
        .ok_or_else(|| format!("{SIGNATURE_HEADER} must be sha256=<hex>"))?;
    crate::engine::webhook_mac(secret, timestamp, body)
        .verify_slice(&signature)
        .map_err(|_| "the signature does not match the body and the shared secret".to_string())?;
    Ok(signature)
}

/// Who asks for a rollback of what.
struct Asked<'a> {
    /// The automation identity's name.
    identity: &'a str,
    source: TriggerSource,
    service: &'a str,
    environment: &'a str,
    /// Empty: no de-duplication.
    request_id: String,
}

enum Refusal {
    /// The service is unknown: the caller's problem, named.
    Unknown(String),
    Response(Response),
}

/// Proposes one `AutoTrigger`; a member that does not lead answers 503 (monitors retry 5xx, and
/// may list every member).
async fn trigger(
    http: &HttpState,
    asked: Asked<'_>,
    reason: String,
) -> Result<TriggerAnswer, Refusal> {
    let principal = Principal::new(Kind::Automation, asked.identity);
    authorize(http, &principal, asked.service, asked.environment).await?;
    let options = http.node.read(|state| {
        crate::plan::with_drift_policy(
            state,
            asked.service,
            asked.environment,
            http.limits.automatic_plan(),
            |host, service| http.health.drift(host, service),
        )
    });
    let command = Command {
        at_ms: rewind_shared::time::now_ms(),
        identity: principal.id(),
        request_id: asked.request_id,
        audit_seed: String::new(),
        kind: CommandKind::AutoTrigger(crate::state_machine::AutoTrigger {
            service: asked.service.to_string(),
            // Empty: the service's latest change, wherever it ran.
            environment: asked.environment.to_string(),
            source: asked.source,
            reason,
            options,
            throttle: http.limits.throttle.clone(),
            decided: None,
        }),
    };
    let proposed = http.node.propose(command).await;
    if let Ok(outcome) = &proposed {
        crate::api::log_operation_trace(&http.node, outcome);
    }
    match proposed {
        Ok(Outcome::Triggered {
            outcome,
            rollback,
            detail,
        }) => Ok(TriggerAnswer {
            service: asked.service.to_string(),
            outcome: outcome.name().to_string(),
            rollback_id: if rollback == 0 {
                String::new()
            } else {
                rollback_id(rollback)
            },
            detail,
        }),
        Ok(other) => Err(Refusal::Response(refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected outcome {other:?}"),
        ))),
        Err(error @ CoordinatorError::UnknownService { .. }) => {
            Err(Refusal::Unknown(error.to_string()))
        }
        Err(CoordinatorError::NotLeader { leader_id }) => Err(Refusal::Response(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("this member does not lead; member {leader_id} does (0: unknown yet)"),
        ))),
        Err(error) if error.is_retriable() => Err(Refusal::Response(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            error.to_string(),
        ))),
        Err(error) => Err(Refusal::Response(refuse(
            StatusCode::BAD_REQUEST,
            error.to_string(),
        ))),
    }
}

/// The receiver's automation identity must be allowed to operate the service where the rollback
/// would run: the environment asked, or that of the service's latest change. A refusal answers
/// 403 naming why, and is audited.
async fn authorize(
    http: &HttpState,
    principal: &Principal,
    service: &str,
    environment: &str,
) -> Result<(), Refusal> {
    let (target, decision) = http.node.read(|state| {
        let environment = if environment.is_empty() {
            state
                .changes
                .values()
                .rev()
                .find(|change| change.service == service)
                .map(|change| change.environment.clone())
                .unwrap_or_default()
        } else {
            environment.to_string()
        };
        let target = Target::scoped(&environment, service);
        let decision = crate::access::decide(
            state.access.policy.as_deref(),
            principal,
            Level::Operate,
            &target,
        );
        (target, decision)
    });
    if decision.allowed {
        return Ok(());
    }
    http.gate.audit(crate::access::Refusal {
        identity: principal.id(),
        action: "trigger",
        target: target.to_string(),
        reason: decision.reason.clone(),
    });
    Err(Refusal::Response(refuse(
        StatusCode::FORBIDDEN,
        format!(
            "{} may not trigger a rollback of {target}: {}",
            principal.id(),
            decision.reason
        ),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(secret: &[u8], at: u64, body: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(TIMESTAMP_HEADER, at.to_string().parse().unwrap());
        headers.insert(
            SIGNATURE_HEADER,
            crate::engine::sign(secret, at, body).parse().unwrap(),
        );
        headers
    }

    #[test]
    fn signatures_are_checked_against_body_secret_and_age() {
        let body = br#"{"service":"web","reason":"x"}"#;
        let now = 1_800_000_000_000;
        let mac = check_signature(b"secret", &signed(b"secret", now, body), body, now).unwrap();
        // The same request with its hex upper-cased is the same request: the replay guard
        // keys on these bytes, not on the header's text.
        let mut shouted = signed(b"secret", now, body);
        let upper = shouted[SIGNATURE_HEADER]
            .to_str()
            .unwrap()
            .replace("sha256=", "")
            .to_uppercase();
        shouted.insert(SIGNATURE_HEADER, format!("sha256={upper}").parse().unwrap());
        assert_eq!(check_signature(b"secret", &shouted, body, now), Ok(mac));
        let wrong_secret = check_signature(b"other", &signed(b"secret", now, body), body, now);
        assert!(wrong_secret.unwrap_err().contains("does not match"));
        let tampered = check_signature(b"secret", &signed(b"secret", now, body), b"{}", now);
        assert!(tampered.is_err());
        let old = check_signature(
            b"secret",
            &signed(b"secret", now - MAX_WEBHOOK_AGE_MS - 1, body),
            body,
            now,
        );
        assert!(old.unwrap_err().contains("replay"));
        let missing = check_signature(b"secret", &HeaderMap::new(), body, now);
        assert!(missing.unwrap_err().contains("missing header"));
    }

    #[test]
    fn the_real_alertmanager_payload_parses() {
        // As Alertmanager 0.25 sends it.
        let body = r#"{"receiver":"rewind","status":"firing","alerts":[{"status":"firing",
            "labels":{"alertname":"HighErrorRate","service":"web","environment":"prod"},
            "annotations":{"summary":"5xx above 5%"},"startsAt":"2026-11-27T03:00:00Z",
            "endsAt":"0001-01-01T00:00:00Z","generatorURL":"http://prom/graph","fingerprint":"a1"}],
            "groupLabels":{"service":"web"},"commonLabels":{"service":"web"},
            "commonAnnotations":{},"externalURL":"http://am:9093","version":"4",
            "groupKey":"{}:{service=\"web\"}","truncatedAlerts":0}"#;
        let payload: AlertmanagerPayload = serde_json::from_str(body).unwrap();
        assert_eq!(payload.version, "4");
        assert_eq!(payload.alerts[0].labels["service"], "web");
    }
}
