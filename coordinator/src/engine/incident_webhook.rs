//! Incidents told to an incident system: every rollback is an incident (`in-N`), and the leader
//! sends its events to the incident webhook in PagerDuty's Events API v2 format or a generic
//! JSON one: `trigger` when the rollback starts, `acknowledge` when a person (a `user:`
//! identity) acts on it (starts it, approves, pauses, notes...), `resolve` when it succeeds. A
//! failed or aborted rollback is left triggered: someone has work to do.
//!
//! Each delivery is signed like an escalation (`X-Rewind-Signature`, `X-Rewind-Timestamp`),
//! tried at most [`MAX_NOTICE_ATTEMPTS`] times with a doubling wait (a 4xx other than 408 and 429
//! is not retried), and recorded on the incident, so `incident show` says how it went.
//! Events go in order: the next waits until the one before was delivered or given up.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::json;
use tracing::{info, warn};

use super::decide::Action;
use super::escalation::post_signed;
use crate::config::{IncidentFormat, IncidentWebhookConfig};
use crate::node::NodeHandle;
use crate::state_machine::version::INCIDENT_NOTICES;
use crate::state_machine::*;

/// Wait after an event's first failed delivery; it doubles with each failure, up to
/// [`MAX_NOTICE_RETRY_MS`], so [`MAX_NOTICE_ATTEMPTS`] ride out an outage of about 11 hours.
pub const NOTICE_RETRY_MS: u64 = 10_000;
pub const MAX_NOTICE_RETRY_MS: u64 = 60 * 60 * 1000;
/// How long after its rollback ended, or after its last delivery attempt, an incident is still
/// told of: a rollback that ended before the webhook was configured (or before the cluster
/// reached version 6) is not, beyond this; one whose trigger got through late still resolves.
pub const NOTICE_WINDOW_MS: u64 = 15 * 60 * 1000;
/// PagerDuty's bound on a trigger's summary.
const MAX_SUMMARY_BYTES: usize = 1024;
/// How far back a leader's clock may have stepped: a person's action on a rollback is looked for
/// in the audit from this long before it started.
const CLOCK_SLACK_MS: u64 = 60 * 1000;
/// Audit entries read a tick per incident waiting for a person to act.
const ACK_SCAN_PAGE: u64 = 1000;

/// What the leader remembers of incident deliveries (not replicated: a new leader may send an
/// event again, which the dedup key makes harmless).
#[derive(Default)]
pub struct NoticeMemory {
    /// (incident, event) -> when its delivery was last tried.
    tried: HashMap<(u64, NoticeEvent), u64>,
    /// incident -> the audit index read through looking for a person's action, and whether one
    /// was found: each tick reads only what was appended since.
    scanned: HashMap<u64, (u64, bool)>,
}

/// Wait before the next attempt after `attempts` failed ones: 10 s, doubling, at most an hour.
pub fn retry_after_ms(attempts: u32) -> u64 {
    NOTICE_RETRY_MS
        .saturating_mul(1 << attempts.saturating_sub(1).min(20))
        .min(MAX_NOTICE_RETRY_MS)
}

/// Asks for the next event of every incident that has one due.
pub fn due(state: &State, memory: &mut NoticeMemory, now_ms: u64, actions: &mut Vec<Action>) {
    if state.cluster_version() < INCIDENT_NOTICES {
        return;
    }
    let mut pending = HashSet::new();
    let mut considered = HashSet::new();
    for record in state.rollbacks.values() {
        let notices = state
            .incidents
            .get(&record.number)
            .map_or(&[][..], |incident| &incident.notices[..]);
        // Long over, and nothing tried for as long: not told (again).
        let last_activity = notices
            .iter()
            .map(|notice| notice.last_attempt_at_ms)
            .fold(record.finished_at_ms, u64::max);
        if record.status.is_terminal()
            && last_activity.saturating_add(NOTICE_WINDOW_MS) < now_ms
            && notices.iter().all(NoticeRecord::settled)
        {
            continue;
        }
        considered.insert(record.number);
        let Some(event) = next_event(state, record, notices, &mut memory.scanned) else {
            continue;
        };
        let key = (record.number, event);
        pending.insert(key);
        // The backoff runs from the last recorded attempt, so a new leader keeps it; this
        // leader's own memory only keeps it from sending again while an attempt is in flight.
        let backed_off = notices
            .iter()
            .find(|notice| notice.event == event)
            .is_none_or(|notice| {
                now_ms.saturating_sub(notice.last_attempt_at_ms) >= retry_after_ms(notice.attempts)
            });
        let in_flight = memory
            .tried
            .get(&key)
            .is_some_and(|&last| now_ms.saturating_sub(last) < NOTICE_RETRY_MS);
        let due = backed_off && !in_flight;
        if due {
            memory.tried.insert(key, now_ms);
            actions.push(Action::NotifyIncident {
                incident: record.number,
                event,
            });
        }
    }
    memory.tried.retain(|key, _| pending.contains(key));
    memory
        .scanned
        .retain(|number, _| considered.contains(number));
}

/// The first event the incident should have told and has not settled, if any.
fn next_event(
    state: &State,
    record: &RollbackRecord,
    notices: &[NoticeRecord],
    scanned: &mut HashMap<u64, (u64, bool)>,
) -> Option<NoticeEvent> {
    let notice = |event| notices.iter().find(|notice| notice.event == event);
    let resolve_sent = notice(NoticeEvent::Resolve).is_some();
    for event in NoticeEvent::ALL {
        let wanted = match event {
            NoticeEvent::Trigger => true,
            // Not after a resolve: an incident system drops an acknowledge of a resolved incident.
            NoticeEvent::Acknowledge => !resolve_sent && person_acted(state, record, scanned),
            NoticeEvent::Resolve => record.status == RollbackStatus::Succeeded,
        };
        if wanted && !notice(event).is_some_and(NoticeRecord::settled) {
            return Some(event);
        }
    }
    None
}

/// Whether a person (a `user:`, never automation such as an alert) started the rollback or acted
/// on it, its request or its incident since: what acknowledging means to an incident system,
/// whose escalation an acknowledgement stops.
fn person_acted(
    state: &State,
    record: &RollbackRecord,
    scanned: &mut HashMap<u64, (u64, bool)>,
) -> bool {
    let by_a_person = |identity: &str| identity.starts_with("user:");
    if by_a_person(&record.started_by) {
        return true;
    }
    let (through, found) = scanned.get(&record.number).copied().unwrap_or((0, false));
    if found {
        return true;
    }
    let targets = [
        record.id(),
        incident_id(record.number),
        request_id(record.request),
    ];
    let audit = &state.audit;
    let from = if through == 0 {
        audit.partition_point(|entry| {
            entry.at_ms.saturating_add(CLOCK_SLACK_MS) < record.started_at_ms
        })
    } else {
        Ok(through + 1)
    };
    // A bounded page a tick: the scan goes on from where it stopped.
    let page = from.and_then(|from| {
        // Pruned meanwhile: go on from the first entry held.
        let from = from.max(audit.first_index());
        audit.range(from..audit.next_index().min(from.saturating_add(ACK_SCAN_PAGE)))
    });
    let page = match page {
        Ok(page) => page,
        Err(error) => {
            tracing::warn!(%error, "The audit store cannot be read; no acknowledgement this tick.");
            return false;
        }
    };
    let acted = page.iter().any(|entry| {
        by_a_person(&entry.identity)
            && entry.action != "incident.notify"
            && targets.contains(&entry.target)
    });
    let read_through = page.last().map_or(through, |entry| entry.index);
    scanned.insert(record.number, (read_through, acted));
    acted
}

/// The dedup key of an incident: its id, the cluster's and when its rollback started, so that
/// two clusters on one integration, or a cluster rebuilt under the same id with its numbering
/// restarted, never merge incidents: `in-7@prod-eu/1764950400123`.
pub fn dedup_key(cluster_id: &str, record: &RollbackRecord) -> String {
    format!(
        "{}@{cluster_id}/{}",
        incident_id(record.number),
        record.started_at_ms
    )
}

/// One event of one incident, ready to post.
pub struct Notice {
    url: String,
    secret: Vec<u8>,
    tls: rewind_shared::outbound::HttpsTrust,
    incident: u64,
    event: NoticeEvent,
    body: serde_json::Value,
}

impl Notice {
    /// Reads what to say from the state; None if the rollback is gone.
    pub fn new(
        node: &NodeHandle,
        config: &IncidentWebhookConfig,
        incident: u64,
        event: NoticeEvent,
    ) -> Option<Self> {
        let cluster_id = node.cluster_id().to_string();
        let body = node.read(|state| {
            let record = state.rollbacks.get(&incident)?;
            Some(body(state, record, config, event, &cluster_id))
        })?;
        Some(Self {
            url: config.url.clone(),
            secret: config.secret.clone(),
            tls: config.tls.clone(),
            incident,
            event,
            body,
        })
    }

    /// Posts once and records the attempt on the incident; the engine asks again if it failed.
    pub async fn run(self, node: NodeHandle) {
        let delivery = self.post().await;
        let id = incident_id(self.incident);
        if delivery.ok {
            info!(incident_id = id, event = %self.event, "Incident event delivered.");
        } else {
            warn!(
                incident_id = id,
                event = %self.event,
                detail = delivery.detail,
                "Incident event not delivered."
            );
        }
        let command = Command {
            at_ms: rewind_shared::time::now_ms(),
            identity: COORDINATOR_IDENTITY.to_string(),
            request_id: String::new(),
            audit_seed: String::new(),
            kind: CommandKind::IncidentNotified {
                incident: self.incident,
                event: self.event,
                ok: delivery.ok,
                permanent: delivery.permanent,
                detail: delivery.detail,
            },
        };
        if let Err(error) = node.propose(command).await {
            warn!(%error, incident_id = id, "Could not record the incident event's delivery.");
        }
    }

    async fn post(&self) -> Posted {
        let posted = post_signed(&self.url, &self.secret, &self.tls, &self.body).await;
        match posted {
            Ok(status) => Posted {
                ok: status.is_success(),
                // The receiver refused this event as it is: sending it again cannot help.
                permanent: status.is_client_error() && !matches!(status.as_u16(), 408 | 429),
                detail: format!("{} answered {status}", self.url),
            },
            Err(detail) => Posted {
                ok: false,
                permanent: false,
                detail,
            },
        }
    }
}

struct Posted {
    ok: bool,
    permanent: bool,
    detail: String,
}

/// The event as the configured format has it.
fn body(
    state: &State,
    record: &RollbackRecord,
    config: &IncidentWebhookConfig,
    event: NoticeEvent,
    cluster_id: &str,
) -> serde_json::Value {
    let id = incident_id(record.number);
    let environments: Vec<String> = record
        .changes
        .iter()
        .filter_map(|change| state.changes.get(change))
        .map(|change| change.environment.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let severity = config.severity_of(&environments);
    let services = record.services.join(", ");
    let summary = rewind_shared::names::truncate(
        &format!(
            "Rollback {} of {services} in {}: {}",
            record.id(),
            environments.join(", "),
            record.reason
        ),
        MAX_SUMMARY_BYTES,
    )
    .to_string();
    let show = format!("rewindctl incident show {id}");
    match &config.format {
        IncidentFormat::PagerDuty { routing_key } => {
            let mut body = json!({
                "routing_key": routing_key,
                "event_action": event.name(),
                "dedup_key": dedup_key(cluster_id, record),
                "client": "rewind",
            });
            if event == NoticeEvent::Trigger {
                body["payload"] = json!({
                    "summary": summary,
                    "source": format!("rewind cluster {cluster_id}"),
                    "severity": severity,
                    "timestamp": rfc3339(record.started_at_ms),
                    "component": services,
                    "group": environments.join(", "),
                    "class": format!("rollback/{}", record.trigger.name().to_lowercase()),
                    "custom_details": {
                        "incident_id": id,
                        "rollback_id": record.id(),
                        "services": record.services,
                        "environments": environments,
                        "changes": record.changes.iter().map(|&change| change_id(change)).collect::<Vec<_>>(),
                        "evidence": record.reason,
                        "started_by": record.started_by,
                        "show": show,
                    },
                });
            }
            body
        }
        IncidentFormat::Json => json!({
            "kind": "rewind.incident",
            "event": event.name(),
            "cluster_id": cluster_id,
            "incident_id": id,
            "dedup_key": dedup_key(cluster_id, record),
            "rollback_id": record.id(),
            "rollback_state": record.status.name().to_lowercase(),
            "severity": severity,
            "summary": summary,
            "services": record.services,
            "environments": environments,
            "trigger": record.trigger.name().to_lowercase(),
            "evidence": record.reason,
            "started_at_ms": record.started_at_ms,
            "finished_at_ms": record.finished_at_ms,
            "show": show,
        }),
    }
}

fn rfc3339(at_ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(at_ms);
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
#[path = "incident_webhook_test.rs"]
mod tests;
