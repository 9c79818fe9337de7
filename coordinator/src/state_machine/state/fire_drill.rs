//! Rollback fire drills (rd-N, cluster version 11): a known-bad release deployed on purpose to
//! an environment that allows it, so that detection and the automatic rollback run for real,
//! and a scorecard of how they did.

use serde::{Deserialize, Serialize};

/// Most drills the state keeps; the oldest finished ones go first.
pub const MAX_FIRE_DRILLS: usize = 1000;

pub fn fire_drill_id(number: u64) -> String {
    format!("rd-{number}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FireDrillStatus {
    /// The bad release is on its way or live, or its rollback runs.
    Running,
    /// Detected, rolled back and verified, within the service's RTO if it has one.
    Passed,
    /// Not detected within the policy's watch, its rollback refused, aborted or needing a
    /// person, its change failed or superseded, or not within the RTO: the outcome says which.
    Failed,
    /// A person stopped it; what it deployed is reverted all the same.
    Aborted,
}

impl FireDrillStatus {
    pub fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Passed => "passed",
            Self::Failed => "failed",
            Self::Aborted => "aborted",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FireDrillRecord {
    pub number: u64,
    pub service: String,
    pub environment: String,
    /// The known-bad release it deployed, and the one it replaced.
    pub version: String,
    pub previous_version: String,
    /// The change that deployed it (marked as the drill's).
    pub change: u64,
    pub reason: String,
    pub started_by: String,
    pub started_at_ms: u64,
    pub status: FireDrillStatus,
    pub finished_at_ms: u64,
    /// Why it ended as it did.
    pub outcome: String,
    /// Who aborted it and why, if someone did.
    pub aborted_by: String,
    pub aborted_at_ms: u64,
    /// Measured when it ended.
    pub scorecard: Option<Scorecard>,
}

impl FireDrillRecord {
    pub fn id(&self) -> String {
        fire_drill_id(self.number)
    }
}

/// How detection and the rollback did, times from the moment the bad release went live on its
/// first host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scorecard {
    /// The rollback started automatically within the policy's watch (not the drill's own
    /// revert after the watch, nor a person's).
    pub detected: bool,
    /// The rollback that reverted it (0: none).
    pub rollback: u64,
    pub live_at_ms: u64,
    /// To the automatic rollback's start, when detected.
    pub detect_ms: Option<u64>,
    /// To the first host restored.
    pub first_reverted_ms: Option<u64>,
    /// To the last host verified healthy, once the rollback succeeded.
    pub all_verified_ms: Option<u64>,
    pub gates_passed: u32,
    pub gates: u32,
    /// Steps that needed more than one attempt.
    pub steps_retried: u32,
    /// Calls for a person (paused) during its rollback.
    pub escalations: u32,
    /// The service's recovery time objective when it ran (0: none).
    pub rto_s: u64,
    /// The service's previous finished drill in this environment, for comparison (0: none).
    pub previous: u64,
}
