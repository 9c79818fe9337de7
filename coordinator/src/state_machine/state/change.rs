//! Changes (deploys), their per-host steps, and the flags they own.

use serde::{Deserialize, Serialize};

use super::*;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlagRecord {
    pub enabled: bool,
    /// Last set by a kill switch.
    pub killed: bool,
    pub updated_at_ms: u64,
    pub updated_by: String,
    pub reason: String,
    /// Log index of its last change: the leader pushes flags changed after what it pushed.
    pub changed_at_index: u64,
    /// The change that last set it, 0 when a person did: a rollback turns back only the flags
    /// its change still owns, never a later kill switch.
    #[serde(default)]
    pub by_change: u64,
}
/// A flag a change turned on, and its value before (None: it did not exist).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlagChangeRecord {
    pub name: String,
    pub before: Option<bool>,
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
}
stable_names!(StepStatus {
    Pending => "Pending",
    Running => "Running",
    Succeeded => "Succeeded",
    Failed => "Failed",
    Skipped => "Skipped",
});
stable_names!(ChangeStatus {
    Capturing => "Capturing",
    Deploying => "Deploying",
    Deployed => "Deployed",
    Failed => "Failed",
    RolledBack => "RolledBack",
});
impl StepStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Skipped)
    }
}
/// One step's replicated progress. `attempts` counts dispatches, so retries stay bounded
/// across leader changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepProgress {
    pub status: StepStatus,
    pub attempts: u32,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    pub detail: String,
}
impl Default for StepProgress {
    fn default() -> Self {
        Self {
            status: StepStatus::Pending,
            attempts: 0,
            started_at_ms: 0,
            finished_at_ms: 0,
            detail: String::new(),
        }
    }
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeStatus {
    Capturing,
    Deploying,
    Deployed,
    Failed,
    RolledBack,
}
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeHostRecord {
    pub host_id: String,
    pub snapshot_id: String,
    pub capture: StepProgress,
    pub activate: StepProgress,
    /// Set when the host reverted this change on its own while offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_reverted: Option<SelfRevertNote>,
}
/// What an agent reported of a revert it did on its own, offline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelfRevertNote {
    /// `sr-<ms>`, unique per host.
    pub id: String,
    pub service: String,
    pub change_id: String,
    pub snapshot_id: String,
    pub at_ms: u64,
    pub offline_since_ms: u64,
    pub ok: bool,
    pub detail: String,
    pub evidence: String,
}
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub number: u64,
    pub service: String,
    pub version: String,
    pub previous_version: String,
    pub status: ChangeStatus,
    pub hosts: Vec<ChangeHostRecord>,
    pub baseline: HealthAggregate,
    pub started_at_ms: u64,
    pub deployed_at_ms: u64,
    pub started_by: String,
    pub reason: String,
    /// Number of the rollback reverting this change, 0 if none.
    pub rollback: u64,
    /// Environment of its hosts; flags it turns on live there.
    #[serde(default)]
    pub environment: String,
    /// Flags it turned on; its rollback turns them back before any wave.
    #[serde(default)]
    pub flags: Vec<FlagChangeRecord>,
    /// An automatic rollback of it was refused by a throttle: a person decides from now on.
    #[serde(default)]
    pub auto_refused: bool,
    /// Migrations it applies, per database: expand ones before its hosts are activated,
    /// contract and data ones after.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schema: Vec<SchemaStage>,
    /// Who approved it, where its environment's policy asked for approvals.
    #[serde(default)]
    pub approved_by: Vec<String>,
    /// The request it ran from (`req-<n>`), 0 if none.
    #[serde(default)]
    pub request: u64,
    /// Ran without the approvals its environment requires.
    #[serde(default)]
    pub break_glass: bool,
    /// The fire drill that deployed it (`rd-<n>`, from version 11), 0 if none.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub drill: u64,
}
fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}
impl ChangeRecord {
    pub fn id(&self) -> String {
        change_id(self.number)
    }
}
