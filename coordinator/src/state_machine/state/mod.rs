//! The replicated state: what every coordinator member agrees on.
//!
//! Only BTreeMaps and Vecs, so serialisation and iteration order are the same on every member.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::audit::AuditLog;
use super::command::Outcome;

mod change;
mod fire_drill;
mod fleet;
mod incident;
mod request_log;
mod rollback;
mod trigger;

pub use change::*;
pub use fire_drill::*;
use fleet::is_zero;
pub use fleet::*;
pub use incident::*;
pub use request_log::*;
pub use rollback::*;
pub use trigger::*;

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
    /// Notes and closures of incidents (from version 5), by rollback number.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub incidents: BTreeMap<u64, IncidentRecord>,
    /// How many changes and rollbacks moved to the archive beside the state (from version 8).
    #[serde(
        default,
        skip_serializing_if = "super::archive::ArchiveCounts::is_empty"
    )]
    pub archived: super::archive::ArchiveCounts,
    /// Rollback fire drills (from version 11), keyed by the number in `rd-<n>`; bounded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fire_drills: BTreeMap<u64, FireDrillRecord>,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub next_fire_drill: u64,
}
fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}

impl State {
    /// The cluster version in force.
    pub fn cluster_version(&self) -> u32 {
        self.cluster_version.max(super::version::LEGACY)
    }
}
pub use super::approvals::{
    Approval, ApprovalRequest, Decision as RequestDecision, RequestStatus, request_id,
};
pub use super::join_tokens::{Enrollment, JoinTokenRecord, TokenScope, TokenStatus, join_token_id};
pub use super::schema::{
    DrillRecord, DrillStatus, SchemaDecision, SchemaOwner, SchemaStage, SchemaTxnRecord,
    SchemaTxnStatus, ShardPhase, ShardRecord, ShardReportRecord, StatementRecord, drill_id,
    schema_txn_id,
};
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
