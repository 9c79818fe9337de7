//! What people add to an incident (in-N, the incident of rollback rb-N): notes while it runs,
//! and at close its root-cause analysis with the action items and lessons taken from it. The
//! rest of an incident (times, timeline, who) is read from the rollback and the audit log.

use serde::{Deserialize, Serialize};

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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IncidentNote {
    pub at_ms: u64,
    pub identity: String,
    pub text: String,
}

pub fn incident_id(number: u64) -> String {
    format!("in-{number}")
}
