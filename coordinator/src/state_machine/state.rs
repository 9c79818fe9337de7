//! The replicated state: what every coordinator member agrees on.
//!
//! Only BTreeMaps and Vecs, so serialisation and iteration order are the same on every member.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::audit::AuditLog;
use super::command::Outcome;

/// Names an enum's values for audit text, errors and records, spelled out here rather than taken
/// from `Debug`: what reaches the replicated state and the audit chain must not change with a
/// refactor (a renamed variant), and these spellings are the ones logs already hold.
macro_rules! stable_names {
    ($type:ty { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $type {
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name),*
                }
            }
        }

        impl std::fmt::Display for $type {
            fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str(self.name())
            }
        }
    };
}
pub(crate) use stable_names;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Index of the last command applied.
    pub applied_index: u64,
    pub hosts: BTreeMap<String, HostRecord>,
    pub services: BTreeMap<String, ServiceRecord>,
    /// service -> version -> release. Releases are immutable, so shared like audit entries.
    pub releases: BTreeMap<String, BTreeMap<String, Arc<ReleaseRecord>>>,
    /// Keyed by the number in `ch-<n>`.
    pub changes: BTreeMap<u64, ChangeRecord>,
    /// Keyed by the number in `rb-<n>`.
    pub rollbacks: BTreeMap<u64, RollbackRecord>,
    pub audit: AuditLog,
    pub requests: RequestLog,
    /// The access policy in force.
    #[serde(default)]
    pub access: crate::access::AccessState,
    pub next_change: u64,
    pub next_rollback: u64,
    /// The coordinator members, by id: how to reach each and which certificate it presents.
    /// Founding members are written at bootstrap; later ones arrive with Raft conf changes.
    #[serde(default)]
    pub members: BTreeMap<u64, MemberRecord>,
    /// Calls for a person (paused rollbacks, throttled triggers), by id; bounded.
    #[serde(default)]
    pub escalations: BTreeMap<u64, EscalationRecord>,
    #[serde(default)]
    pub next_escalation: u64,
    /// Recent requests for an automatic rollback and what became of them; bounded.
    #[serde(default)]
    pub triggers: VecDeque<TriggerRecord>,
    /// Requests for an automatic rollback since the cluster began, by outcome (for /metrics).
    #[serde(default)]
    pub trigger_totals: BTreeMap<String, u64>,
    /// Set when many services asked for an automatic rollback at once: none starts until a
    /// person resets it (that smells like a monitoring fault, not N bad releases).
    #[serde(default)]
    pub breaker: Option<BreakerRecord>,
    /// Feature flags: environment -> service -> flag.
    #[serde(default)]
    pub flags: BTreeMap<String, BTreeMap<String, BTreeMap<String, FlagRecord>>>,
    /// Schema migrations: database -> version -> migration. Immutable once registered.
    #[serde(default)]
    pub migrations: BTreeMap<String, BTreeMap<String, Arc<MigrationRecord>>>,
    /// Schema transactions across a database's shards, keyed by the number in `st-<n>`.
    #[serde(default)]
    pub schema_txns: BTreeMap<u64, SchemaTxnRecord>,
    #[serde(default)]
    pub next_schema_txn: u64,
    /// Migration drills, keyed by the number in `dr-<n>`.
    #[serde(default)]
    pub drills: BTreeMap<u64, DrillRecord>,
    #[serde(default)]
    pub next_drill: u64,
    /// Requests for approval, keyed by the number in `req-<n>`; bounded.
    #[serde(default)]
    pub approval_requests: BTreeMap<u64, ApprovalRequest>,
    #[serde(default)]
    pub next_request: u64,
    /// One-time join tokens, keyed by the number in `jt-<n>`; bounded.
    #[serde(default)]
    pub join_tokens: BTreeMap<u64, JoinTokenRecord>,
    #[serde(default)]
    pub next_join_token: u64,
    /// Agents that joined with a token, and the environment it named: a host may register only
    /// in it.
    #[serde(default)]
    pub enrollments: BTreeMap<String, Enrollment>,
    /// The cluster version `apply()` follows (see `version.rs`); 0 in states from before
    /// versions existed, read as [`super::version::LEGACY`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cluster_version: u32,
}

impl State {
    /// The cluster version in force.
    pub fn cluster_version(&self) -> u32 {
        self.cluster_version.max(super::version::LEGACY)
    }
}

pub use super::join_tokens::{Enrollment, JoinTokenRecord, TokenScope, TokenStatus, join_token_id};

pub use super::approvals::{
    Approval, ApprovalRequest, Decision as RequestDecision, RequestStatus, request_id,
};

pub use super::schema::{
    DrillRecord, DrillStatus, SchemaDecision, SchemaOwner, SchemaStage, SchemaTxnRecord,
    SchemaTxnStatus, ShardPhase, ShardRecord, ShardReportRecord, StatementRecord, drill_id,
    schema_txn_id,
};

/// Whether the application version before a migration still works after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationClass {
    Expand,
    Contract,
    Data,
}

impl MigrationClass {
    pub fn name(self) -> &'static str {
        match self {
            Self::Expand => "expand",
            Self::Contract => "contract",
            Self::Data => "data",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub database: String,
    pub version: String,
    pub class: MigrationClass,
    pub up_sql: String,
    pub down_sql: String,
    pub verify_sql: String,
    /// `sha256:` over up, down and verify (see [`migration_checksum`]).
    pub checksum: String,
    pub registered_at_ms: u64,
    pub registered_by: String,
}

pub use rewind_shared::digest::migration_checksum;

/// Most script bytes the registry holds over every database: the registry is replicated state,
/// held in memory by every member and in every snapshot.
pub const MAX_REGISTRY_SCRIPT_BYTES: usize = 2 << 20;

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

/// Where a request for an automatic rollback came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TriggerSource {
    /// The service's health policy, judged by the engine.
    Policy,
    /// A Prometheus Alertmanager webhook.
    Alertmanager,
    /// A signed generic webhook.
    Webhook,
}

impl TriggerSource {
    pub fn name(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::Alertmanager => "alertmanager",
            Self::Webhook => "webhook",
        }
    }
}

/// What became of a request for an automatic rollback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TriggerOutcome {
    /// A rollback started.
    Started,
    /// Nothing to do (no change, or already being rolled back).
    Ignored,
    /// The environment's policy makes automatic rollbacks wait for approval: a request was filed.
    AwaitingApproval,
    /// A throttle refused it; a person was called when that needs one.
    Throttled,
}

impl TriggerOutcome {
    pub fn name(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Ignored => "ignored",
            Self::AwaitingApproval => "awaiting-approval",
            Self::Throttled => "throttled",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TriggerRecord {
    pub at_ms: u64,
    pub service: String,
    pub environment: String,
    pub source: TriggerSource,
    pub reason: String,
    pub outcome: TriggerOutcome,
    /// Why it was ignored or throttled, or which rollback started.
    pub detail: String,
    /// The rollback it started, 0 if none.
    pub rollback: u64,
    /// The change it asked to roll back, 0 if the service had none.
    pub change: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BreakerRecord {
    pub tripped_at_ms: u64,
    pub services: Vec<String>,
}

/// Bounds on automatic rollbacks. Stamped into each trigger command by the member that proposes
/// it, so every member judges the trigger the same way.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThrottleLimits {
    /// Automatic rollbacks per environment per `budget_window_s`.
    pub budget: u32,
    pub budget_window_s: u32,
    /// No second automatic rollback of a service within this.
    pub cooldown_s: u32,
    /// A service rolled back this many times within `flap_window_s` is flapping: it is no longer
    /// rolled back automatically, a person is called instead.
    pub flap_rollbacks: u32,
    pub flap_window_s: u32,
    /// This many distinct services triggering within `breaker_window_s` trips the breaker.
    pub breaker_services: u32,
    pub breaker_window_s: u32,
}

impl Default for ThrottleLimits {
    fn default() -> Self {
        Self {
            budget: 5,
            budget_window_s: 3600,
            cooldown_s: 600,
            flap_rollbacks: 3,
            flap_window_s: 86_400,
            breaker_services: 4,
            breaker_window_s: 120,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub id: u64,
    /// host:port other members, agents and rewindctl dial.
    pub address: String,
    pub region: String,
    /// Common name of the member's certificate.
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Labels {
    pub region: String,
    pub zone: String,
    pub environment: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub host_id: String,
    pub labels: Labels,
    pub services: Vec<String>,
    pub agent_version: String,
    pub identity: String,
    pub registered_at_ms: u64,
    /// What its agent reported of its latest window without a coordinator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_offline: Option<String>,
}

/// When a service's latest change is rolled back automatically: the probe failure ratio above
/// `max_probe_failure_ratio` for `for_s`, or any of `conditions` breached for its own window,
/// within `watch_s` of the change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthPolicy {
    pub max_probe_failure_ratio: f64,
    pub for_s: u32,
    pub watch_s: u32,
    pub auto_rollback: bool,
    #[serde(default)]
    pub conditions: Vec<PolicyCondition>,
}

impl HealthPolicy {
    /// Every condition, the probe failure ratio one first.
    pub fn all_conditions(&self) -> Vec<PolicyCondition> {
        let probes = PolicyCondition {
            figure: HealthFigure::ProbeFailureRatio,
            threshold: self.max_probe_failure_ratio,
            relative_to_baseline: false,
            for_s: self.for_s,
        };
        std::iter::once(probes)
            .chain(self.conditions.iter().cloned())
            .collect()
    }
}

/// A figure health is judged by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthFigure {
    ProbeFailureRatio,
    /// Failed requests over requests, from the service's own metrics.
    ErrorRatio,
    /// 99th percentile request latency, from the service's own histogram.
    P99LatencyMs,
}

impl From<HealthFigure> for rewind_proto::v1::HealthFigure {
    fn from(figure: HealthFigure) -> Self {
        match figure {
            HealthFigure::ProbeFailureRatio => Self::ProbeFailureRatio,
            HealthFigure::ErrorRatio => Self::ErrorRatio,
            HealthFigure::P99LatencyMs => Self::P99LatencyMs,
        }
    }
}

impl HealthFigure {
    /// As rewindctl writes it: `error_ratio`.
    pub fn name(self) -> &'static str {
        rewind_proto::v1::HealthFigure::from(self).short_name()
    }

    /// A value of this figure for people: ratios with 3 decimals, latency in whole ms.
    pub fn format(self, value: f64) -> String {
        match self {
            Self::ProbeFailureRatio | Self::ErrorRatio => format!("{value:.3}"),
            Self::P99LatencyMs => format!("{value:.0} ms"),
        }
    }

    /// Least margin above the baseline a relative limit allows.
    pub fn floor(self) -> f64 {
        match self {
            Self::ProbeFailureRatio | Self::ErrorRatio => 0.01,
            Self::P99LatencyMs => 5.0,
        }
    }

    pub fn format_option(self, value: Option<f64>) -> String {
        value.map_or_else(|| "unmeasured".to_string(), |value| self.format(value))
    }

    /// This figure in `health`; `None` when nothing measured it (no requests, no histogram).
    pub fn of(self, health: &HealthAggregate) -> Option<f64> {
        match self {
            Self::ProbeFailureRatio => (health.samples > 0).then_some(health.probe_failure_ratio),
            Self::ErrorRatio => health.error_ratio,
            Self::P99LatencyMs => health.p99_latency_ms,
        }
    }
}

/// `figure > threshold` (or `> threshold x baseline`) for `for_s` seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyCondition {
    pub figure: HealthFigure,
    pub threshold: f64,
    pub relative_to_baseline: bool,
    pub for_s: u32,
}

impl PolicyCondition {
    /// The limit the figure must exceed; `None` for a relative condition without a baseline
    /// figure (nothing measured it before the change, so nothing to compare with).
    pub fn limit(&self, baseline: &HealthAggregate) -> Option<f64> {
        if self.relative_to_baseline {
            // A multiple of a baseline near zero is near zero: a single error would breach
            // it. The limit is at least the baseline plus a floor (1 point of ratio, 5 ms).
            self.figure
                .of(baseline)
                .map(|before| (before * self.threshold).max(before + self.figure.floor()))
        } else {
            Some(self.threshold)
        }
    }

    /// Whether `now` breaches this condition: above its limit, and (for the probe failure ratio,
    /// which has no explicit baseline) worse than before the change.
    pub fn breached(&self, now: &HealthAggregate, baseline: &HealthAggregate) -> bool {
        let (Some(value), Some(limit)) = (self.figure.of(now), self.limit(baseline)) else {
            return false;
        };
        let worse_than_before = self.figure.of(baseline).is_none_or(|before| value > before);
        value > limit && worse_than_before
    }
}

impl std::fmt::Display for PolicyCondition {
    /// As `rewindctl service set --condition` takes it: `error_ratio > 2x baseline for 30s`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let threshold = if self.relative_to_baseline {
            format!("{}x baseline", self.threshold)
        } else {
            self.threshold.to_string()
        };
        write!(
            f,
            "{} > {threshold} for {}s",
            self.figure.name(),
            self.for_s
        )
    }
}

impl Default for HealthPolicy {
    /// "probe failure ratio > 0.5 for 10 s, within 10 minutes of a change", automatic.
    fn default() -> Self {
        Self {
            max_probe_failure_ratio: 0.5,
            for_s: 10,
            watch_s: 600,
            auto_rollback: true,
            conditions: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub name: String,
    pub depends_on: Vec<String>,
    pub policy: HealthPolicy,
    /// Journeys a rollback's gate runs after each wave of this service.
    #[serde(default)]
    pub synthetics: Vec<SyntheticCheck>,
    /// The steps each host goes through in a rollback; empty: the default recipe.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollback_steps: Vec<crate::recipe::RecipeStep>,
}

/// A synthetic transaction: one HTTP request and what its answer must be.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyntheticCheck {
    pub name: String,
    pub url: String,
    /// `GET` or `POST`.
    pub method: String,
    pub body: String,
    pub expect_status: u16,
    /// Empty: any body.
    pub body_contains: String,
    pub max_latency_ms: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub service: String,
    pub version: String,
    pub artifact_digest: String,
    pub commit: String,
    pub registered_at_ms: u64,
    /// Version of the API (or message schema) this release provides; 0 when not declared.
    #[serde(default)]
    pub api_version: u32,
    /// Provider service -> the lowest API version of it this release needs.
    #[serde(default)]
    pub requires: BTreeMap<String, u32>,
}

/// Per-service health figures over the coordinator's window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthAggregate {
    pub probe_failure_ratio: f64,
    pub samples: u32,
    pub hosts_reporting: u32,
    /// From the services' own metrics; `None` while no request was counted.
    #[serde(default)]
    pub error_ratio: Option<f64>,
    #[serde(default)]
    pub p99_latency_ms: Option<f64>,
    #[serde(default)]
    pub requests: f64,
    /// Scrapes of the services' own metrics that failed in the window.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub scrape_failures: u32,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
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

stable_names!(Trigger {
    Manual => "Manual",
    Automatic => "Automatic",
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
}

impl ChangeRecord {
    pub fn id(&self) -> String {
        change_id(self.number)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RollbackStatus {
    Running,
    Paused,
    Succeeded,
    Failed,
    Aborted,
}

stable_names!(RollbackStatus {
    Running => "Running",
    Paused => "Paused",
    Succeeded => "Succeeded",
    Failed => "Failed",
    Aborted => "Aborted",
});

impl RollbackStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Aborted)
    }
}

/// What a rollback step does on its host, in this order. `Verify` runs on the coordinator: it
/// waits for a health report, newer than the restart, in which every probe of the service passes.
/// `Drain`/`Undrain` run the service's drain hook on the agent (a no-op where none is set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RollbackStepKind {
    Drain,
    Restore,
    Restart,
    Verify,
    Undrain,
    /// Takes a host out of rotation for good: the circuit breaker of `rollback isolate`, which
    /// drains a failing service instead of reverting it.
    Isolate,
    // The rest of the agent's catalogue, for services whose recipe names them (see `recipe`).
    Reload,
    PauseJobs,
    ResumeJobs,
    PurgeCache,
    ScaleUp,
    Check,
    /// The n-th (from 1) `run:` step of the service's recipe, which holds its command.
    Run(u8),
}

impl RollbackStepKind {
    /// The default recipe.
    pub const ALL: [Self; 5] = [
        Self::Drain,
        Self::Restore,
        Self::Restart,
        Self::Verify,
        Self::Undrain,
    ];

    /// Every step a recipe may name (besides `run:`).
    pub const CATALOGUE: [Self; 11] = [
        Self::Drain,
        Self::Restore,
        Self::Restart,
        Self::Reload,
        Self::Verify,
        Self::Undrain,
        Self::PauseJobs,
        Self::ResumeJobs,
        Self::PurgeCache,
        Self::ScaleUp,
        Self::Check,
    ];

    pub fn name(self) -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed(match self {
            Self::Drain => "drain",
            Self::Restore => "restore",
            Self::Restart => "restart",
            Self::Verify => "verify",
            Self::Undrain => "undrain",
            Self::Isolate => "isolate",
            Self::Reload => "reload",
            Self::PauseJobs => "pause-jobs",
            Self::ResumeJobs => "resume-jobs",
            Self::PurgeCache => "purge-cache",
            Self::ScaleUp => "scale-up",
            Self::Check => "check",
            Self::Run(n) => return std::borrow::Cow::Owned(format!("run-{n}")),
        })
    }

    /// The step a host must still go through after this one, whatever else is skipped, so it
    /// is not left out of rotation or with its job processors paused.
    pub fn closed_by(self) -> Option<Self> {
        match self {
            Self::Drain => Some(Self::Undrain),
            Self::PauseJobs => Some(Self::ResumeJobs),
            _ => None,
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        if let Some(n) = name.strip_prefix("run-") {
            return n
                .parse()
                .ok()
                .filter(|n| (1..=crate::recipe::MAX_RUN_STEPS as u8).contains(n))
                .map(Self::Run);
        }
        Self::CATALOGUE
            .into_iter()
            .chain([Self::Isolate])
            .find(|kind| kind.name() == name)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RollbackStepRecord {
    /// Index into the rollback's waves.
    pub wave: u32,
    pub service: String,
    pub host_id: String,
    pub kind: RollbackStepKind,
    pub progress: StepProgress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trigger {
    Manual,
    Automatic,
}

/// How a plan is cut into waves and gated. Part of the plan's hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanOptions {
    /// Hosts of a wave reverted at once.
    pub max_parallel: u32,
    /// Hosts of a service allowed out of service at once, counting ones already down.
    pub max_unavailable: u32,
    /// Region reverted first for every service; empty: each service's smallest region.
    pub canary_region: String,
    /// Proceed although the plan would break a consumer's API needs (audited).
    pub force: bool,
    pub gate: GateOptions,
    /// Revert the changes' expand migrations too (by default they stay: the old app works
    /// with them). Left out of the JSON when false, so older plan hashes replay unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revert_expand: bool,
    /// Why losing data a schema revert destroys is accepted (those rows are exported first);
    /// empty: a revert that would destroy data is refused.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub accept_data_loss: String,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            max_parallel: 1,
            max_unavailable: 1,
            canary_region: String::new(),
            force: false,
            gate: GateOptions::default(),
            revert_expand: false,
            accept_data_loss: String::new(),
        }
    }
}

/// The health gate after each wave: the service's probe failure ratio and error ratio on the
/// wave's hosts must stay within `tolerance` of the change's baseline, and their p99 latency
/// within `latency_tolerance` (a fraction) above it, for `settle_s`, within `timeout_s`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateOptions {
    pub settle_s: u32,
    pub timeout_s: u32,
    pub tolerance: f64,
    /// Left out of the JSON at its default, so plan hashes of rollbacks started before it
    /// existed (replayed from the log) come out as they did then.
    #[serde(
        default = "default_latency_tolerance",
        skip_serializing_if = "is_default_latency_tolerance"
    )]
    pub latency_tolerance: f64,
}

pub const DEFAULT_LATENCY_TOLERANCE: f64 = 0.25;

fn default_latency_tolerance() -> f64 {
    DEFAULT_LATENCY_TOLERANCE
}

fn is_default_latency_tolerance(value: &f64) -> bool {
    *value == DEFAULT_LATENCY_TOLERANCE
}

impl Default for GateOptions {
    fn default() -> Self {
        Self {
            settle_s: 5,
            timeout_s: 120,
            tolerance: 0.05,
            latency_tolerance: DEFAULT_LATENCY_TOLERANCE,
        }
    }
}

/// One wave of a plan: a batch of one service's hosts in one region, then a gate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WaveRecord {
    pub service: String,
    pub change: u64,
    pub region: String,
    /// The first wave of its service.
    pub canary: bool,
    pub hosts: Vec<String>,
    pub gate: StepProgress,
    /// A wave added by `rollback isolate`: its hosts are drained, not reverted, and not gated.
    #[serde(default)]
    pub isolation: bool,
}

/// A call for a person: a rollback paused, or an automatic rollback was refused, and someone
/// must decide.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EscalationRecord {
    pub id: u64,
    pub opened_at_ms: u64,
    /// The paused rollback, 0 when the escalation is about a refused trigger.
    pub rollback: u64,
    /// Wave of that rollback.
    pub wave: u32,
    pub service: String,
    pub evidence: String,
    /// Webhook deliveries tried, and how the last one went.
    pub attempts: u32,
    pub delivered: bool,
    pub delivery_detail: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RollbackRecord {
    pub number: u64,
    /// The changes reverted, one per service.
    pub changes: Vec<u64>,
    pub services: Vec<String>,
    pub status: RollbackStatus,
    pub trigger: Trigger,
    pub reason: String,
    pub started_by: String,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    pub options: PlanOptions,
    /// sha256 of the plan it runs, as `rollback plan` showed it.
    pub plan_hash: String,
    pub waves: Vec<WaveRecord>,
    /// Per wave, per host, the steps of the service's recipe in order (by default drain,
    /// restore, restart, verify, undrain).
    pub steps: Vec<RollbackStepRecord>,
    /// Compatibility problems overridden with `force`.
    pub forced: Vec<String>,
    /// Why it is paused, when it is.
    pub paused_reason: String,
    /// Ids of its escalations in `State::escalations`.
    pub escalations: Vec<u64>,
    pub outcome_detail: String,
    pub failed_hosts: Vec<String>,
    /// Hosts an operator chose to leave unreverted.
    pub skipped_hosts: Vec<String>,
    /// Flags turned back when it started: `environment/service/flag -> on|off`.
    #[serde(default)]
    pub flags_reverted: Vec<String>,
    /// Services an operator isolated (drained) instead of reverting.
    #[serde(default)]
    pub isolated: Vec<String>,
    /// Services with their own recipe, as it was when the rollback started; the others ran
    /// the default one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub recipes: BTreeMap<String, Vec<crate::recipe::RecipeStep>>,
    /// Migrations it reverts, per database, once every wave is done.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schema: Vec<SchemaStage>,
    /// Approvers of its request, or the policy that let an automatic rollback run at once.
    #[serde(default)]
    pub approved_by: Vec<String>,
    /// The request it ran from (`req-<n>`), 0 if none.
    #[serde(default)]
    pub request: u64,
    /// Ran without the approvals its environments require.
    #[serde(default)]
    pub break_glass: bool,
}

impl RollbackRecord {
    pub fn id(&self) -> String {
        rollback_id(self.number)
    }

    /// The first wave not yet finished: its steps have not all ended, or its gate has not
    /// passed (a gate is skipped when an operator skipped all its hosts, and for isolation).
    pub fn current_wave(&self) -> Option<u32> {
        (0..self.waves.len() as u32).find(|&wave| {
            let gate_done = matches!(
                self.waves[wave as usize].gate.status,
                StepStatus::Succeeded | StepStatus::Skipped
            );
            !gate_done
                || self
                    .wave_steps(wave)
                    .any(|step| !step.progress.status.is_terminal())
        })
    }

    pub fn wave_steps(&self, wave: u32) -> impl Iterator<Item = &RollbackStepRecord> {
        self.steps.iter().filter(move |step| step.wave == wave)
    }

    /// Its schema stages (with their index) that still run: not those of a service an
    /// operator isolated, whose app was not reverted.
    pub fn schema_stages(&self) -> impl Iterator<Item = (usize, &SchemaStage)> {
        self.schema
            .iter()
            .enumerate()
            .filter(|(_, stage)| !self.isolated.contains(&stage.service))
    }
}

pub fn change_id(number: u64) -> String {
    format!("ch-{number}")
}

pub fn rollback_id(number: u64) -> String {
    format!("rb-{number}")
}

/// Parses `ch-<n>` / `rb-<n>`.
pub fn parse_numbered_id(prefix: &str, id: &str) -> Option<u64> {
    id.strip_prefix(prefix)?
        .strip_prefix('-')?
        .parse()
        .ok()
        .filter(|&number| number > 0)
}

/// Outcomes of recent client requests, so a retried request answers the same and acts once.
/// Bounded: when full, the oldest id of the identity holding the most is forgotten, so one
/// identity sending many requests (a webhook sender, a script) forgets its own, not others'.
/// Keys are `identity/request_id`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredRequestLog", into = "StoredRequestLog")]
pub struct RequestLog {
    outcomes: BTreeMap<String, Outcome>,
    order: VecDeque<String>,
    /// Derived from `order` (never stored): identity -> its keys, oldest first.
    by_identity: BTreeMap<String, VecDeque<String>>,
}

/// How a request log is stored in snapshots (the same as before it kept identities apart).
#[derive(Clone, Default, Serialize, Deserialize)]
struct StoredRequestLog {
    outcomes: BTreeMap<String, Outcome>,
    order: VecDeque<String>,
}

impl From<StoredRequestLog> for RequestLog {
    fn from(stored: StoredRequestLog) -> Self {
        let mut by_identity: BTreeMap<String, VecDeque<String>> = BTreeMap::new();
        for key in &stored.order {
            by_identity
                .entry(RequestLog::identity_of(key).to_string())
                .or_default()
                .push_back(key.clone());
        }
        Self {
            outcomes: stored.outcomes,
            order: stored.order,
            by_identity,
        }
    }
}

impl From<RequestLog> for StoredRequestLog {
    fn from(log: RequestLog) -> Self {
        Self {
            outcomes: log.outcomes,
            order: log.order,
        }
    }
}

/// Most escalations kept; the oldest settled ones (delivered or given up) go first.
pub const MAX_ESCALATIONS: usize = 1000;
/// Webhook deliveries tried per escalation.
pub const MAX_ESCALATION_ATTEMPTS: u32 = 5;
/// Most trigger records kept.
pub const MAX_TRIGGERS: usize = 1000;

impl State {
    pub fn flag(&self, environment: &str, service: &str, name: &str) -> Option<&FlagRecord> {
        self.flags.get(environment)?.get(service)?.get(name)
    }

    /// Sets a flag; its `changed_at_index` is stamped with the current log index.
    pub fn put_flag(&mut self, key: [&str; 3], mut record: FlagRecord) {
        let [environment, service, name] = key;
        record.changed_at_index = self.applied_index;
        self.flags
            .entry(environment.to_string())
            .or_default()
            .entry(service.to_string())
            .or_default()
            .insert(name.to_string(), record);
    }

    /// Opens an escalation and returns its id.
    pub fn escalate(
        &mut self,
        at_ms: u64,
        rollback: u64,
        wave: u32,
        service: &str,
        evidence: String,
    ) -> u64 {
        self.next_escalation += 1;
        let id = self.next_escalation;
        self.escalations.insert(
            id,
            EscalationRecord {
                id,
                opened_at_ms: at_ms,
                rollback,
                wave,
                service: service.to_string(),
                evidence,
                attempts: 0,
                delivered: false,
                delivery_detail: String::new(),
            },
        );
        while self.escalations.len() > MAX_ESCALATIONS {
            let settled = self
                .escalations
                .values()
                .find(|old| old.delivered || old.attempts >= MAX_ESCALATION_ATTEMPTS)
                .map(|old| old.id);
            let oldest = settled.or_else(|| self.escalations.keys().next().copied());
            if let Some(oldest) = oldest {
                self.escalations.remove(&oldest);
            }
        }
        id
    }
}

impl RequestLog {
    pub const CAPACITY: usize = 10_000;

    pub fn get(&self, request_id: &str) -> Option<&Outcome> {
        self.outcomes.get(request_id)
    }

    /// The identity part of a key (`identity/request_id`).
    fn identity_of(key: &str) -> &str {
        key.split_once('/').map_or(key, |(identity, _)| identity)
    }

    /// Remembers an outcome. `fair` (cluster version 2 on): when full, forget the busiest
    /// identity's oldest id; else the oldest id of all, as version 1 did.
    pub fn remember(&mut self, request_id: &str, outcome: Outcome, fair: bool) {
        if request_id.is_empty() || self.outcomes.contains_key(request_id) {
            return;
        }
        if self.order.len() >= Self::CAPACITY {
            if fair {
                self.forget_busiest();
            } else {
                self.forget_oldest();
            }
        }
        self.order.push_back(request_id.to_string());
        self.by_identity
            .entry(Self::identity_of(request_id).to_string())
            .or_default()
            .push_back(request_id.to_string());
        self.outcomes.insert(request_id.to_string(), outcome);
    }

    fn forget_oldest(&mut self) {
        let Some(oldest) = self.order.pop_front() else {
            return;
        };
        self.outcomes.remove(&oldest);
        let identity = Self::identity_of(&oldest).to_string();
        if let Some(keys) = self.by_identity.get_mut(&identity) {
            keys.pop_front();
            if keys.is_empty() {
                self.by_identity.remove(&identity);
            }
        }
    }

    /// Forgets the oldest key of the identity holding the most (the first such identity by
    /// name on a tie, so every member forgets the same).
    fn forget_busiest(&mut self) {
        let Some(identity) = self
            .by_identity
            .iter()
            .max_by(|(a_name, a), (b_name, b)| a.len().cmp(&b.len()).then(b_name.cmp(a_name)))
            .map(|(identity, _)| identity.clone())
        else {
            return;
        };
        let keys = self.by_identity.get_mut(&identity).expect("just found");
        let oldest = keys.pop_front().expect("identities hold at least one key");
        if keys.is_empty() {
            self.by_identity.remove(&identity);
        }
        self.outcomes.remove(&oldest);
        if let Some(position) = self.order.iter().position(|key| *key == oldest) {
            self.order.remove(position);
        }
    }
}

#[cfg(test)]
mod request_log_tests {
    use super::*;

    #[test]
    fn one_identity_flooding_the_request_log_forgets_only_its_own_ids() {
        let mut log = RequestLog::default();
        log.remember("user:alice/r-1", Outcome::Done, true);
        log.remember("automation:pager/r-1", Outcome::Done, true);
        for n in 0..RequestLog::CAPACITY * 2 {
            log.remember(&format!("agent:web-1/flood-{n}"), Outcome::Done, true);
        }
        assert_eq!(log.order.len(), RequestLog::CAPACITY);
        assert!(
            log.get("user:alice/r-1").is_some(),
            "alice's id was evicted"
        );
        assert!(log.get("automation:pager/r-1").is_some());
        assert!(
            log.get("agent:web-1/flood-0").is_none(),
            "the flood's oldest stays"
        );
        let last = format!("agent:web-1/flood-{}", RequestLog::CAPACITY * 2 - 1);
        assert!(log.get(&last).is_some());

        // Cluster version 1 forgets the oldest of all, as its release did.
        let mut legacy = RequestLog::default();
        legacy.remember("user:alice/r-1", Outcome::Done, false);
        for n in 0..RequestLog::CAPACITY {
            legacy.remember(&format!("agent:web-1/flood-{n}"), Outcome::Done, false);
        }
        assert!(legacy.get("user:alice/r-1").is_none());
        assert!(legacy.get("agent:web-1/flood-0").is_some());
        assert_eq!(legacy.by_identity.len(), 1, "the index follows");
    }

    #[test]
    fn a_request_log_reads_back_the_same_from_its_stored_form() {
        let mut log = RequestLog::default();
        for n in 0..50 {
            log.remember(&format!("user:u{}/r-{n}", n % 3), Outcome::Done, true);
        }
        let bytes = serde_json::to_vec(&log).unwrap();
        let stored: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            stored.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["order", "outcomes"],
            "the stored form is the one older members read"
        );
        let mut read: RequestLog = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(read, log);
        // Both forget the same ids from here on.
        for n in 0..RequestLog::CAPACITY {
            log.remember(&format!("user:u9/x-{n}"), Outcome::Done, true);
            read.remember(&format!("user:u9/x-{n}"), Outcome::Done, true);
        }
        assert_eq!(read, log);
    }
}
