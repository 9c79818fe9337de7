//! What the fleet is made of: members, hosts, services with their health policies, releases and
//! migrations.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
    /// Recovery time objective, seconds; 0: none (from version 6).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub rto_s: u64,
    /// When changes are refused unless break-glass (from version 6).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freeze: Vec<rewind_shared::freeze::FreezeWindow>,
    /// What an automatic rollback does with a drifted host (from version 10).
    #[serde(default, skip_serializing_if = "DriftPolicy::is_default")]
    pub drift_policy: DriftPolicy,
    /// Trip the circuit breaker (isolate the service) once a rollback's wave of it failed this
    /// many times; 0: never (from version 10).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub isolate_after_failures: u32,
}

fn is_zero_u32(value: &u32) -> bool {
    *value == 0
}

/// What an automatic rollback does with a host whose service changed since rewind last put it
/// there (a hotfix by hand): its restore would wipe that change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriftPolicy {
    /// Revert the other hosts, leave the drifted ones untouched, and call a person.
    #[default]
    Skip,
    /// Revert it anyway, wiping the change.
    Overwrite,
}

impl DriftPolicy {
    pub fn is_default(&self) -> bool {
        *self == Self::Skip
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::Overwrite => "overwrite",
        }
    }

    /// Parses a policy as the API and the CLI take it; empty is the default.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "" | "skip" => Ok(Self::Skip),
            "overwrite" => Ok(Self::Overwrite),
            other => Err(format!(
                "is {:?}; it may be skip (the default) or overwrite",
                rewind_shared::names::printable(other, 40)
            )),
        }
    }
}

impl ServiceRecord {
    /// Whether it uses what cluster version 10 brought: a drift policy, or a recipe step a
    /// member of an older release cannot read.
    pub fn from_version_ten(&self) -> bool {
        !self.drift_policy.is_default()
            || self.isolate_after_failures != 0
            || self
                .rollback_steps
                .iter()
                .any(|step| step.kind.from_version_ten())
    }

    /// The freeze window holding `at_ms`, and when the freeze ends (windows that meet chained).
    pub fn frozen_at(&self, at_ms: u64) -> Option<(&str, u64)> {
        rewind_shared::freeze::frozen_until(&self.freeze, at_ms)
    }
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
    /// Topic -> the message schema version this release writes (from version 10).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub produces: BTreeMap<String, u32>,
    /// Topic -> the newest message schema version this release reads (from version 10).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consumes: BTreeMap<String, u32>,
}

impl ReleaseRecord {
    /// Whether it declares message topics, which cluster version 10 brought.
    pub fn declares_topics(&self) -> bool {
        !self.produces.is_empty() || !self.consumes.is_empty()
    }
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
pub(super) fn is_zero(value: &u32) -> bool {
    *value == 0
}

fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}
