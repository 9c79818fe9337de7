//! What people add to an incident (in-N, the incident of rollback rb-N): notes while it runs,
//! and at close its root-cause analysis with the action items and lessons taken from it. The
//! rest of an incident (times, timeline, who) is read from the rollback and the audit log.

use serde::{Deserialize, Serialize};

use super::stable_names;

/// Most notes one incident keeps.
pub const MAX_INCIDENT_NOTES: usize = 200;
/// Longest note.
pub const MAX_INCIDENT_NOTE_BYTES: usize = 4096;
/// Longest root-cause analysis.
pub const MAX_RCA_BYTES: usize = 64 * 1024;
/// Most action items or lessons kept from one analysis, and the longest of each.
pub const MAX_LESSONS: usize = 50;
pub const MAX_LESSON_BYTES: usize = 1024;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IncidentRecord {
    pub number: u64,
    pub notes: Vec<IncidentNote>,
    /// 0 while open.
    pub closed_at_ms: u64,
    pub closed_by: String,
    pub rca_markdown: String,
    pub action_items: Vec<String>,
    pub lessons: Vec<String>,
    /// What the incident webhook was told and how it went (from version 6), one record per
    /// event, in the order they are sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<NoticeRecord>,
}

/// An incident system's event, as PagerDuty's Events API v2 names them: the incident opens when
/// its rollback starts, is acknowledged when a person acts on it, resolved when it succeeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoticeEvent {
    Trigger,
    Acknowledge,
    Resolve,
}

stable_names!(NoticeEvent {
    Trigger => "trigger",
    Acknowledge => "acknowledge",
    Resolve => "resolve",
});

impl NoticeEvent {
    /// In the order an incident system must receive them.
    pub const ALL: [NoticeEvent; 3] = [Self::Trigger, Self::Acknowledge, Self::Resolve];
}

/// Deliveries of one event to the incident webhook.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NoticeRecord {
    pub event: NoticeEvent,
    pub attempts: u32,
    /// When the last attempt's result was recorded: the backoff runs from it, on any leader.
    pub last_attempt_at_ms: u64,
    /// When the receiver accepted it; 0 while not delivered.
    pub delivered_at_ms: u64,
    /// No more attempts: the receiver refused it for good, or every attempt failed.
    pub given_up: bool,
    /// What the receiver last answered.
    pub detail: String,
}

impl NoticeRecord {
    /// Delivered or given up: the next event may go.
    pub fn settled(&self) -> bool {
        self.delivered_at_ms != 0 || self.given_up
    }
}

/// Deliveries tried per incident event before it is given up (about 11 hours of attempts, see
/// `engine::incident_webhook`).
pub const MAX_NOTICE_ATTEMPTS: u32 = 20;
/// Longest receiver answer kept with a delivery.
pub const MAX_NOTICE_DETAIL_BYTES: usize = 512;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IncidentNote {
    pub at_ms: u64,
    pub identity: String,
    pub text: String,
}

/// People and automation, not hosts or the coordinator itself: who an incident counts as its
/// operators, and whose action acknowledges it.
pub fn is_person(identity: &str) -> bool {
    identity.starts_with("user:") || identity.starts_with("automation:")
}

pub fn incident_id(number: u64) -> String {
    format!("in-{number}")
}
