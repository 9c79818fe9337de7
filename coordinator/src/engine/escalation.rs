//! Escalations by webhook: when a rollback pauses for a person, the leader POSTs what happened,
//! the evidence and the commands that would move it on, signed so the receiver can trust it.
//!
//! Signature: `X-Rewind-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>` with
//! the timestamp (ms since the epoch) in `X-Rewind-Timestamp`, so a receiver can also refuse
//! replays of old deliveries.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tracing::{info, warn};

use crate::config::EscalationConfig;
use crate::health::HealthBook;
use crate::node::NodeHandle;
use crate::state_machine::{COORDINATOR_IDENTITY, Command, CommandKind, rollback_id};

pub const SIGNATURE_HEADER: &str = "x-rewind-signature";
pub const TIMESTAMP_HEADER: &str = "x-rewind-timestamp";
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// `sha256=<hex>` over `"<timestamp_ms>.<body>"`.
pub fn sign(secret: &[u8], timestamp_ms: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Serialize)]
struct Payload {
    kind: &'static str,
    cluster_id: String,
    rollback_id: String,
    escalation: u32,
    state: String,
    service: String,
    region: String,
    wave: u32,
    evidence: String,
    opened_at_ms: u64,
    explain: String,
    explanation: String,
    next_commands: Vec<String>,
}

pub struct Delivery {
    url: String,
    secret: Vec<u8>,
    rollback: u64,
    escalation: u32,
    payload: Payload,
}

impl Delivery {
    /// Reads what to say from the state; None if the escalation is gone.
    pub fn new(
        node: &NodeHandle,
        health: &HealthBook,
        config: &EscalationConfig,
        rollback: u64,
        escalation: u32,
    ) -> Option<Self> {
        let services = node.read(|state| {
            let record = state.rollbacks.get(&rollback)?;
            let hosts = |service: &String| -> Vec<String> {
                state
                    .hosts
                    .values()
                    .filter(|host| host.services.contains(service))
                    .map(|host| host.host_id.clone())
                    .collect()
            };
            Some(
                record
                    .services
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
            let record = state.rollbacks.get(&rollback)?;
            let opened = record.escalations.get(escalation as usize)?;
            let wave = record.waves.get(opened.wave as usize)?;
            let (explanation, next_commands) =
                crate::api::plans::explain(state, record, |service| {
                    aggregates.get(service).copied().unwrap_or_default()
                });
            Some(Payload {
                kind: "rewind.escalation",
                cluster_id,
                rollback_id: record.id(),
                escalation,
                state: format!("{:?}", record.status).to_lowercase(),
                service: wave.service.clone(),
                region: wave.region.clone(),
                wave: opened.wave,
                evidence: opened.evidence.clone(),
                opened_at_ms: opened.opened_at_ms,
                explain: format!("rewindctl rollback explain {}", record.id()),
                explanation,
                next_commands,
            })
        })?;
        Some(Self {
            url: config.webhook_url.clone(),
            secret: config.secret.clone(),
            rollback,
            escalation,
            payload,
        })
    }

    /// Posts once and records the attempt; the engine asks again later if it failed.
    pub async fn run(self, node: NodeHandle) {
        let (ok, detail) = self.post().await;
        let id = rollback_id(self.rollback);
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
            kind: CommandKind::EscalationDelivered {
                rollback: self.rollback,
                escalation: self.escalation,
                ok,
                detail,
            },
        };
        if let Err(error) = node.propose(command).await {
            warn!(%error, rollback_id = id, "Could not record the escalation delivery.");
        }
    }

    async fn post(&self) -> (bool, String) {
        let body = match serde_json::to_vec(&self.payload) {
            Ok(body) => body,
            Err(error) => return (false, format!("cannot encode the payload: {error}")),
        };
        let timestamp = rewind_shared::time::now_ms();
        let client = match reqwest::Client::builder()
            .timeout(DELIVERY_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
        {
            Ok(client) => client,
            Err(error) => return (false, format!("cannot build an HTTP client: {error}")),
        };
        let response = client
            .post(&self.url)
            .header("content-type", "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, sign(&self.secret, timestamp, &body))
            .body(body)
            .send()
            .await;
        match response {
            Ok(response) if response.status().is_success() => {
                (true, format!("{} answered {}", self.url, response.status()))
            }
            Ok(response) => (
                false,
                format!("{} answered {}", self.url, response.status()),
            ),
            Err(error) => (false, format!("{}: {error}", self.url)),
        }
    }
}
