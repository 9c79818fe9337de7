//! Escalations by webhook: when a rollback pauses for a person, the leader POSTs what happened,
//! the evidence and the commands that would move it on, signed so the receiver can trust it.
//!
//! Signature: `X-Rewind-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>` with
//! the timestamp (ms since the epoch) in `X-Rewind-Timestamp`, so a receiver can also refuse
//! replays of old deliveries.

use std::time::Duration;

use hmac::{Hmac, Mac};
use rewind_shared::outbound::HttpsTrust;
use serde::Serialize;
use sha2::Sha256;
use tracing::{info, warn};

use crate::config::EscalationConfig;
use crate::health::HealthBook;
use crate::node::NodeHandle;
use crate::state_machine::{COORDINATOR_IDENTITY, Command, CommandKind};

pub const SIGNATURE_HEADER: &str = "x-rewind-signature";
pub const TIMESTAMP_HEADER: &str = "x-rewind-timestamp";
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// `sha256=<hex>` over `"<timestamp_ms>.<body>"`.
pub fn sign(secret: &[u8], timestamp_ms: u64, body: &[u8]) -> String {
    let mac = webhook_mac(secret, timestamp_ms, body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// HMAC-SHA256 of `"<timestamp_ms>.<body>"`: what escalations are signed with and generic
/// webhooks are checked against.
pub fn webhook_mac(secret: &[u8], timestamp_ms: u64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// POSTs `payload` as JSON signed with `secret`: the receiver's status, or why none came.
pub(super) async fn post_signed(
    url: &str,
    secret: &[u8],
    tls: &HttpsTrust,
    payload: &impl Serialize,
) -> Result<reqwest::StatusCode, String> {
    let body = serde_json::to_vec(payload)
        .map_err(|error| format!("cannot encode the payload: {error}"))?;
    let timestamp = rewind_shared::time::now_ms();
    // Never redirected (a redirect could carry the signed body elsewhere), https:// as `tls`
    // says (`rewind_shared::outbound`), bounded in time.
    tls.client()?
        .post(url)
        .timeout(DELIVERY_TIMEOUT)
        .header("content-type", "application/json")
        .header(TIMESTAMP_HEADER, timestamp.to_string())
        .header(SIGNATURE_HEADER, sign(secret, timestamp, &body))
        .body(body)
        .send()
        .await
        .map(|response| response.status())
        .map_err(|error| format!("{url}: {error}"))
}

#[derive(Serialize)]
struct Payload {
    kind: &'static str,
    cluster_id: String,
    escalation: u64,
    /// The paused rollback, empty when a trigger was refused.
    rollback_id: String,
    state: String,
    service: String,
    region: String,
    /// Wave of the rollback, numbered from 1; 0 without a rollback.
    wave: u32,
    evidence: String,
    opened_at_ms: u64,
    /// Command that explains the rollback, empty without one.
    explain: String,
    explanation: String,
    next_commands: Vec<String>,
}

pub struct Delivery {
    url: String,
    secret: Vec<u8>,
    tls: HttpsTrust,
    escalation: u64,
    payload: Payload,
}

impl Delivery {
    /// Reads what to say from the state; None if the escalation is gone.
    pub fn new(
        node: &NodeHandle,
        health: &HealthBook,
        config: &EscalationConfig,
        escalation: u64,
    ) -> Option<Self> {
        let services = node.read(|state| {
            let opened = state.escalations.get(&escalation)?;
            let services = state.rollbacks.get(&opened.rollback).map_or_else(
                || vec![opened.service.clone()],
                |record| record.services.clone(),
            );
            let hosts = |service: &String| -> Vec<String> {
                state
                    .hosts
                    .values()
                    .filter(|host| host.services.contains(service))
                    .map(|host| host.host_id.clone())
                    .collect()
            };
            Some(
                services
                    .iter()
                    .map(|service| (service.clone(), hosts(service)))
                    .collect::<Vec<_>>(),
            )
        })?;
        let since = rewind_shared::time::now_ms().saturating_sub(60_000);
        let aggregates: std::collections::BTreeMap<String, _> = services
            .iter()
            .map(|(service, hosts)| (service.clone(), health.aggregate(service, hosts, since)))
            .collect();
        let cluster_id = node.cluster_id().to_string();
        let payload = node.read(|state| {
            let opened = state.escalations.get(&escalation)?;
            let mut payload = Payload {
                kind: "rewind.escalation",
                cluster_id,
                escalation,
                rollback_id: String::new(),
                state: "throttled".into(),
                service: opened.service.clone(),
                region: String::new(),
                wave: 0,
                evidence: opened.evidence.clone(),
                opened_at_ms: opened.opened_at_ms,
                explain: String::new(),
                explanation: opened.evidence.clone(),
                next_commands: vec![
                    format!(
                        "rewindctl rollback plan --service {} --to last-good",
                        opened.service
                    ),
                    "rewindctl trigger list".to_string(),
                ],
            };
            if let Some(record) = state.rollbacks.get(&opened.rollback) {
                let (explanation, next_commands) =
                    crate::api::plans::explain(state, record, |service| {
                        aggregates.get(service).copied().unwrap_or_default()
                    });
                payload.rollback_id = record.id();
                payload.state = format!("{:?}", record.status).to_lowercase();
                payload.region = record
                    .waves
                    .get(opened.wave as usize)
                    .map(|wave| wave.region.clone())
                    .unwrap_or_default();
                payload.wave = opened.wave + 1;
                payload.explain = format!("rewindctl rollback explain {}", record.id());
                payload.explanation = explanation;
                payload.next_commands = next_commands;
            }
            Some(payload)
        })?;
        Some(Self {
            url: config.webhook_url.clone(),
            secret: config.secret.clone(),
            tls: config.tls.clone(),
            escalation,
            payload,
        })
    }

    /// Posts once and records the attempt; the engine asks again later if it failed.
    pub async fn run(self, node: NodeHandle) {
        let (ok, detail) = self.post().await;
        let id = self.payload.rollback_id.as_str();
        if ok {
            info!(
                rollback_id = id,
                escalation = self.escalation,
                "Escalation delivered."
            );
        } else {
            warn!(
                rollback_id = id,
                escalation = self.escalation,
                detail,
                "Escalation not delivered."
            );
        }
        let command = Command {
            at_ms: rewind_shared::time::now_ms(),
            identity: COORDINATOR_IDENTITY.to_string(),
            request_id: String::new(),
            audit_seed: String::new(),
            kind: CommandKind::EscalationDelivered {
                escalation: self.escalation,
                ok,
                detail,
            },
        };
        if let Err(error) = node.propose(command).await {
            warn!(%error, escalation = self.escalation, "Could not record the escalation delivery.");
        }
    }

    async fn post(&self) -> (bool, String) {
        let posted = post_signed(&self.url, &self.secret, &self.tls, &self.payload).await;
        match posted {
            Ok(status) => (
                status.is_success(),
                format!("{} answered {status}", self.url),
            ),
            Err(error) => (false, error),
        }
    }
}
