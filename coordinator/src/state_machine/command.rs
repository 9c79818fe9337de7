//! Commands: the only way replicated state changes.
//!
//! A command carries everything `apply()` needs, including the time and who asked, stamped by
//! the member that proposed it, so applying the same log gives the same state everywhere.

use serde::{Deserialize, Serialize};

use super::state::{
    HealthAggregate, Labels, MemberRecord, MigrationRecord, PlanOptions, ReleaseRecord,
    RollbackStepKind, SchemaOwner, SelfRevertNote, ServiceRecord, ShardPhase, ShardReportRecord,
    ThrottleLimits, Trigger, TriggerOutcome, TriggerSource, change_id, parse_numbered_id,
    rollback_id, schema_txn_id,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub at_ms: u64,
    /// Certificate name of the caller, or `coordinator` for the engine's own decisions.
    pub identity: String,
    /// Client-chosen id; a repeat returns the recorded outcome. Empty: no de-duplication.
    pub request_id: String,
    /// Random bytes (hex) the proposer chose, from cluster version 5: the salts of the
    /// command's audit entries derive from them, so every member writes the same ones and no
    /// one can guess a redacted field from its salted hash (`rewind_shared::audit`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub audit_seed: String,
    pub kind: CommandKind,
}

/// Bytes of a command's audit seed.
const AUDIT_SEED_BYTES: usize = 32;

impl Command {
    /// Chooses the command's audit seed as its proposer, before it is replicated (as its time
    /// is), where the cluster salts its audit entries.
    pub fn choose_audit_seed(&mut self, cluster_version: u32) {
        if cluster_version >= super::version::SALTED_AUDIT && self.audit_seed.is_empty() {
            self.audit_seed = hex::encode(rand::random::<[u8; AUDIT_SEED_BYTES]>());
        }
    }

    /// The seed as bytes, if the proposer chose a well-formed one.
    pub fn audit_seed_bytes(&self) -> Option<Vec<u8>> {
        hex::decode(&self.audit_seed)
            .ok()
            .filter(|seed| seed.len() == AUDIT_SEED_BYTES)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CommandKind {
    RegisterHost {
        host_id: String,
        labels: Labels,
        services: Vec<String>,
        agent_version: String,
    },
    PutService {
        service: ServiceRecord,
    },
    RegisterRelease {
        release: ReleaseRecord,
    },
    /// Registers a schema migration (checksum computed by the caller, checked by apply).
    RegisterMigration {
        migration: MigrationRecord,
    },
    /// Deploys a release, or files it for approval.
    StartChange(StartChange),
    /// Drills a change's migrations on another environment's shards: up, down, up, with the
    /// fingerprints checked at each step.
    StartDrill {
        change: u64,
        environment: String,
        /// Why, audited from cluster version 4 (empty in entries of older releases).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// Begins the schema transaction of a change's or a rollback's stage (the engine asks when
    /// the stage is due).
    StartSchemaTxn {
        owner: SchemaOwner,
    },
    /// Records a schema transaction's decision: commit once every shard prepared, abort
    /// otherwise. The shards then resolve their prepared transactions as recorded here.
    DecideSchemaTxn {
        txn: u64,
        commit: bool,
        reason: String,
    },
    /// A shard's schema step ended, with what it reported (statements run and rows affected,
    /// version, fingerprint, data at risk, exports): kept in the log for a manual recovery.
    SchemaStepFinished {
        step: StepTarget,
        ok: bool,
        detail: String,
        report: ShardReportRecord,
    },
    /// Sets a feature flag; `kill` marks an emergency off (a kill switch).
    SetFlag {
        environment: String,
        service: String,
        name: String,
        enabled: bool,
        kill: bool,
        reason: String,
    },
    StepStarted {
        step: StepTarget,
    },
    StepFinished {
        step: StepTarget,
        ok: bool,
        detail: String,
        /// Set when a capture step finishes.
        snapshot_id: String,
    },
    /// Starts the rollback of `changes` on the plan the leader made (from cluster version 3;
    /// before, `apply()` plans it itself, see `crate::plan`).
    StartRollback(StartRollback),
    /// A person approves, denies or (after break-glass) reviews a request for approval.
    DecideRequest(DecideRequest),
    /// Asks for an automatic rollback of the service's latest change. `apply()` records what
    /// became of it: started, ignored (nothing to do) or throttled (and a person called).
    AutoTrigger(AutoTrigger),
    /// Closes the global breaker so automatic rollbacks may start again.
    ResetBreaker {
        reason: String,
    },
    /// The circuit breaker: stops reverting `service` and drains its hosts (before version 10
    /// every one; from 10 the failing ones and `region`'s, within max_unavailable), instead of
    /// reverting everything; the rollback goes on with its other services.
    IsolateService {
        rollback: u64,
        service: String,
        reason: String,
        /// From version 10: take this region's hosts of the service out too (besides the
        /// failing ones), within `max_unavailable`.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        region: String,
    },
    /// The engine found a wave that can neither go on nor fail (max_unavailable is used up by
    /// hosts that are down): the rollback pauses and calls a person.
    Stall {
        rollback: u64,
        evidence: String,
    },
    /// A rollback fire drill (version 11): deploys `start.version`, a known-bad release, to
    /// `environment`'s hosts of the service as a change marked as the drill's, so that the
    /// service's health policy detects it and its automatic rollback reverts it.
    StartFireDrill {
        environment: String,
        start: StartChange,
    },
    /// The engine saw a drill's end (its rollback ended, was refused, or its change failed):
    /// apply scores it from the records.
    FinishFireDrill {
        drill: u64,
    },
    /// A person stops a drill; what it deployed is reverted all the same.
    AbortFireDrill {
        drill: u64,
        reason: String,
    },
    /// Every agent of `region` in the rollback has been gone for two step timeouts while other
    /// regions' were there (cluster version 11): its unfinished `hosts` wait for their return
    /// and the rollback goes on with the other regions; the region's gates not yet passed are
    /// skipped (nothing there can be judged).
    DeferRegion {
        rollback: u64,
        region: String,
        hosts: Vec<String>,
        evidence: String,
    },
    /// A host reverted a service on its own while it could not reach a coordinator (its local
    /// policy allowed it); recorded on the change it reverted, and audited.
    RecordSelfRevert {
        host_id: String,
        report: SelfRevertNote,
    },
    /// What a host's agent recorded while it had no coordinator (a summary of its health
    /// history), kept on the host and audited.
    RecordOfflineHealth {
        host_id: String,
        summary: String,
    },
    /// A person resolved a shard's prepared transaction by hand after its resolve kept
    /// failing: the resolve is no longer retried, and verify judges the shard.
    ResolvedByHand {
        txn: u64,
        host_id: String,
        reason: String,
    },
    /// Leaves a host unreverted in a rollback: its steps that have not succeeded are skipped.
    SkipHost {
        rollback: u64,
        host_id: String,
        reason: String,
    },
    /// Records a delivery attempt of an incident's event to the incident webhook (from version
    /// 6). `permanent`: the receiver refused it for good, so it is not tried again.
    IncidentNotified {
        incident: u64,
        event: super::state::NoticeEvent,
        ok: bool,
        permanent: bool,
        detail: String,
    },
    /// Records a webhook delivery attempt of a rollback's escalation.
    EscalationDelivered {
        escalation: u64,
        ok: bool,
        detail: String,
    },
    ControlRollback {
        rollback: u64,
        action: RollbackAction,
        reason: String,
    },
    /// Records that leadership is being handed to member `to`. Changes nothing but the audit log:
    /// the hand-over itself is Raft's.
    TransferLeader {
        to: u64,
        reason: String,
    },
    /// Puts an access policy in force. `bootstrap`: the policy from a member's config, applied
    /// only while the cluster has none. Otherwise applied only if the policy in force still
    /// hashes to `expected_hash` (empty: whatever is in force).
    ApplyPolicy {
        policy: crate::access::Policy,
        bootstrap: bool,
        expected_hash: String,
        reason: String,
    },
    /// Creates a one-time join token; only the hash of its secret is replicated.
    CreateJoinToken {
        secret_sha256: String,
        scope: super::join_tokens::TokenScope,
        reason: String,
    },
    /// Counts one use of a join token by the identity a CSR asks for (checked here, so every
    /// member agrees); the member that proposed it then signs the CSR.
    UseJoinToken {
        token: u64,
        secret_sha256: String,
        kind: String,
        name: String,
        /// sha256 of the key the CSR asks to certify.
        #[serde(default)]
        key_sha256: String,
    },
    RevokeJoinToken {
        token: u64,
        reason: String,
    },
    /// A person accepted a host's drift: its agent records the state now as what rewind put
    /// there. Audit only (from version 10): `accepted` is the drift as the agent measured it
    /// just before, "service: what changed".
    AdoptHostState {
        host_id: String,
        accepted: Vec<String>,
        reason: String,
    },
    /// The proposer renewed its caller's certificate, valid until `not_after_s`; audit only.
    CertificateRenewed {
        not_after_s: i64,
    },
    /// Raises the cluster version `apply()` follows (an admin's call, once every member's binary
    /// supports it).
    SetClusterVersion {
        version: u32,
        /// The members asked whether they support it: refused if the registry differs now.
        members: Vec<u64>,
        reason: String,
    },
    /// Removes a host from the fleet's record (an admin's call); with `release_name`, also its
    /// join enrollment, so the name may be joined anew.
    ForgetHost {
        host_id: String,
        #[serde(default)]
        release_name: bool,
        reason: String,
    },
    /// Records a refused call in the audit log; changes nothing else.
    RecordRefusal {
        action: String,
        target: String,
        reason: String,
    },
    /// An admin confirms that the export of audit entries `first..=through` (its manifest hash)
    /// is archived outside the cluster: retention may then drop them (from version 5).
    ConfirmAuditArchive {
        first: u64,
        through: u64,
        manifest_hash: String,
        reason: String,
    },
    /// The leader's audit retention drops the archived entries up to `through` (from version
    /// 5).
    PruneAudit {
        through: u64,
    },
    /// An admin erases fields of a salted audit entry (a GDPR erasure); the chain still
    /// verifies (from version 5).
    RedactAudit {
        index: u64,
        fields: Vec<rewind_shared::audit::Field>,
        reason: String,
    },
    /// A note on incident `incident` (the incident of that rollback), from version 5.
    NoteIncident {
        incident: u64,
        text: String,
    },
    /// Closes an incident with its root-cause analysis, from version 5. Its action items and
    /// lessons (the analysis's bullets under those headings) are kept for the runbook.
    CloseIncident {
        incident: u64,
        rca_markdown: String,
        action_items: Vec<String>,
        lessons: Vec<String>,
    },
    /// Travels in the context of a Raft conf change and is applied with it, never as a normal
    /// entry: the member registry and Raft's own membership change together.
    ChangeMembership {
        change: MembershipChange,
        member: MemberRecord,
        reason: String,
    },
}

/// A deploy of a release to a service's hosts (or a request for approvals to run it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StartChange {
    pub service: String,
    pub version: String,
    /// Empty: every registered host that runs the service.
    pub host_ids: Vec<String>,
    pub reason: String,
    pub baseline: HealthAggregate,
    /// Flags of the service the change turns on.
    #[serde(default)]
    pub flags_on: Vec<String>,
    /// Registered migrations it applies: (database, version), in order per database.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migrations: Vec<(String, String)>,
    /// Run at once where the policy would ask for approvals (escalated, reviewed later).
    #[serde(default)]
    pub break_glass: bool,
}

/// A rollback of changes, as a person (or an approved request) asks for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StartRollback {
    pub changes: Vec<u64>,
    pub options: PlanOptions,
    /// Hash of the plan the operator was shown; apply refuses a plan that differs.
    /// Empty: run the plan as it is now (automatic rollbacks).
    pub plan_hash: String,
    pub reason: String,
    pub trigger: Trigger,
    /// Run at once where the policy would ask for approvals (escalated, reviewed later).
    #[serde(default)]
    pub break_glass: bool,
    /// The leader's plan (from cluster version 3; see `decision.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned: Option<Box<super::decision::LeaderPlan>>,
}

/// A person's decision on a request for approval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecideRequest {
    pub request: u64,
    pub decision: super::approvals::Decision,
    /// The plan hash the approver was shown; an approval must name the request's.
    pub plan_hash: String,
    pub reason: String,
    /// A deploy request's baseline, measured when the last approval is given (its health then,
    /// not when it was requested); `None` keeps the requested one.
    #[serde(default)]
    pub baseline: Option<HealthAggregate>,
    /// The leader's plan of an approved rollback request (from cluster version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned: Option<Box<super::decision::LeaderPlan>>,
}

/// A request for an automatic rollback of a service's latest change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AutoTrigger {
    pub service: String,
    pub environment: String,
    pub source: TriggerSource,
    pub reason: String,
    pub options: PlanOptions,
    pub throttle: ThrottleLimits,
    /// The leader's verdict (from cluster version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided: Option<Box<super::decision::TriggerDecision>>,
}

/// A step of a membership change. A member joins as a learner (it receives the log but does not
/// vote), is promoted to voter once it has caught up, and can be removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    AddLearner,
    Promote,
    Remove,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RollbackAction {
    Pause,
    Resume,
    Abort,
}

impl RollbackAction {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Abort => "abort",
        }
    }
}

/// Which step a start or a result is about. Its text form is the step id agents journal by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum StepTarget {
    Capture {
        change: u64,
        host_id: String,
    },
    Activate {
        change: u64,
        host_id: String,
    },
    Rollback {
        rollback: u64,
        service: String,
        host_id: String,
        kind: RollbackStepKind,
    },
    /// The health gate after a rollback's wave; runs on the coordinator.
    Gate {
        rollback: u64,
        wave: u32,
    },
    /// A shard's step of a schema transaction.
    Schema {
        txn: u64,
        phase: ShardPhase,
        host_id: String,
    },
}

impl StepTarget {
    /// `ch-3/capture/web-1`, `ch-3/activate/web-1`, `rb-2/web/restore/web-1`, `rb-2/gate/0`.
    pub fn step_id(&self) -> String {
        match self {
            Self::Capture { change, host_id } => {
                format!("{}/capture/{host_id}", change_id(*change))
            }
            Self::Activate { change, host_id } => {
                format!("{}/activate/{host_id}", change_id(*change))
            }
            Self::Rollback {
                rollback,
                service,
                host_id,
                kind,
            } => format!(
                "{}/{service}/{}/{host_id}",
                rollback_id(*rollback),
                kind.name()
            ),
            Self::Gate { rollback, wave } => format!("{}/gate/{wave}", rollback_id(*rollback)),
            Self::Schema {
                txn,
                phase,
                host_id,
            } => format!("{}/{}/{host_id}", schema_txn_id(*txn), phase.name()),
        }
    }

    pub fn parse(step_id: &str) -> Option<Self> {
        let parts: Vec<&str> = step_id.split('/').collect();
        if parts.iter().any(|part| part.is_empty()) {
            return None;
        }
        match parts[..] {
            [owner, "gate", wave] => {
                return Some(Self::Gate {
                    rollback: parse_numbered_id("rb", owner)?,
                    wave: wave.parse().ok()?,
                });
            }
            [owner, service, kind, host_id] => {
                return Some(Self::Rollback {
                    rollback: parse_numbered_id("rb", owner)?,
                    service: service.to_string(),
                    host_id: host_id.to_string(),
                    kind: RollbackStepKind::parse(kind)?,
                });
            }
            [_, _, _] => {}
            _ => return None,
        }
        let (owner, kind, host_id) = (parts[0], parts[1], parts[2].to_string());
        if owner.starts_with("st-") {
            return Some(Self::Schema {
                txn: parse_numbered_id("st", owner)?,
                phase: ShardPhase::parse(kind)?,
                host_id,
            });
        }
        match kind {
            "capture" => Some(Self::Capture {
                change: parse_numbered_id("ch", owner)?,
                host_id,
            }),
            "activate" => Some(Self::Activate {
                change: parse_numbered_id("ch", owner)?,
                host_id,
            }),
            _ => None,
        }
    }

    /// The host the step runs on; empty for a gate, which runs on the coordinator.
    pub fn host_id(&self) -> &str {
        match self {
            Self::Capture { host_id, .. }
            | Self::Activate { host_id, .. }
            | Self::Rollback { host_id, .. }
            | Self::Schema { host_id, .. } => host_id,
            Self::Gate { .. } => "",
        }
    }
}

/// What a successful command produced, returned to the proposer (and to a retried request).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    Change(u64),
    Rollback(u64),
    Drill(u64),
    /// A rollback fire drill (`rd-<n>`).
    FireDrill(u64),
    /// A request for approval was filed or decided (`req-<n>`).
    Request(u64),
    /// A join token was created or revoked (`jt-<n>`).
    JoinToken(u64),
    /// A join token admitted a CSR: the groups its certificate carries.
    Joined {
        groups: Vec<String>,
    },
    /// A decision found the request lapsed or expired, and recorded that.
    RequestRefused {
        request: u64,
        why: String,
    },
    /// A host left the fleet's record: the services it had, and whether its name was released.
    HostForgotten {
        services: Vec<String>,
        name_released: bool,
    },
    Triggered {
        outcome: TriggerOutcome,
        /// The rollback started, 0 if none.
        rollback: u64,
        detail: String,
    },
}

impl CommandKind {
    /// The reason the command carries (a person's, or the system's for a refusal), empty if
    /// none: from cluster version 5 its audit entry keeps it in a field of its own, so that it
    /// can be redacted.
    pub fn reason(&self) -> &str {
        match self {
            Self::StartChange(StartChange { reason, .. })
            | Self::StartRollback(StartRollback { reason, .. })
            | Self::DecideRequest(DecideRequest { reason, .. })
            | Self::AutoTrigger(AutoTrigger { reason, .. })
            | Self::StartDrill { reason, .. }
            | Self::DecideSchemaTxn { reason, .. }
            | Self::SetFlag { reason, .. }
            | Self::ResetBreaker { reason }
            | Self::IsolateService { reason, .. }
            | Self::ResolvedByHand { reason, .. }
            | Self::SkipHost { reason, .. }
            | Self::ControlRollback { reason, .. }
            | Self::TransferLeader { reason, .. }
            | Self::ApplyPolicy { reason, .. }
            | Self::CreateJoinToken { reason, .. }
            | Self::RevokeJoinToken { reason, .. }
            | Self::SetClusterVersion { reason, .. }
            | Self::ForgetHost { reason, .. }
            | Self::RecordRefusal { reason, .. }
            | Self::AdoptHostState { reason, .. }
            | Self::AbortFireDrill { reason, .. }
            | Self::StartFireDrill {
                start: StartChange { reason, .. },
                ..
            }
            | Self::ConfirmAuditArchive { reason, .. }
            | Self::RedactAudit { reason, .. }
            | Self::ChangeMembership { reason, .. } => reason,
            Self::RegisterHost { .. }
            | Self::PutService { .. }
            | Self::RegisterRelease { .. }
            | Self::RegisterMigration { .. }
            | Self::StartSchemaTxn { .. }
            | Self::SchemaStepFinished { .. }
            | Self::StepStarted { .. }
            | Self::StepFinished { .. }
            | Self::Stall { .. }
            | Self::DeferRegion { .. }
            | Self::FinishFireDrill { .. }
            | Self::RecordSelfRevert { .. }
            | Self::RecordOfflineHealth { .. }
            | Self::EscalationDelivered { .. }
            | Self::IncidentNotified { .. }
            | Self::UseJoinToken { .. }
            | Self::CertificateRenewed { .. }
            | Self::PruneAudit { .. }
            | Self::NoteIncident { .. }
            | Self::CloseIncident { .. } => "",
        }
    }

    /// The cluster version that introduced this kind: a member of an older release cannot
    /// decode it, so it is never proposed while the cluster runs below it.
    pub fn introduced_in(&self) -> u32 {
        match self {
            Self::ForgetHost { .. } => 2,
            Self::ConfirmAuditArchive { .. }
            | Self::PruneAudit { .. }
            | Self::RedactAudit { .. }
            | Self::NoteIncident { .. }
            | Self::CloseIncident { .. } => 5,
            Self::IncidentNotified { .. } => 6,
            Self::AdoptHostState { .. } => super::version::DRIFT_GUARD,
            Self::DeferRegion { .. } => super::version::REGION_LOSS,
            Self::StartFireDrill { .. }
            | Self::FinishFireDrill { .. }
            | Self::AbortFireDrill { .. } => super::version::FIRE_DRILLS,
            Self::ApplyPolicy { policy, .. }
                if policy.environments.values().any(|rules| !rules.drills) =>
            {
                super::version::FIRE_DRILLS
            }
            Self::IsolateService { region, .. } if !region.is_empty() => {
                super::version::ISOLATION_WITHIN_BUDGET
            }
            Self::RegisterRelease { release } if release.declares_topics() => {
                super::version::MESSAGE_TOPICS
            }
            Self::StartRollback(start)
                if start.options.required_version().0 > super::version::LEGACY =>
            {
                start.options.required_version().0
            }
            Self::AutoTrigger(trigger)
                if trigger.options.required_version().0 > super::version::LEGACY =>
            {
                trigger.options.required_version().0
            }
            Self::PutService { service } if service.from_version_ten() => {
                super::version::DRIFT_GUARD
            }
            // A member of an older release would drop these fields and keep the rest.
            Self::PutService { service } if service.rto_s != 0 || !service.freeze.is_empty() => 6,
            Self::StartRollback(start) if start.options.schema_after_waves => {
                super::version::SCHEMA_ORDER_BY_CLASS
            }
            _ => super::version::LEGACY,
        }
    }

    /// Audit action name.
    pub fn action(&self) -> &'static str {
        match self {
            Self::RegisterHost { .. } => "host.register",
            Self::PutService { .. } => "service.put",
            Self::RegisterRelease { .. } => "release.register",
            Self::RegisterMigration { .. } => "migration.register",
            Self::StartChange(_) => "change.start",
            Self::StartSchemaTxn { .. } => "schema.start",
            Self::StartDrill { .. } => "drill.start",
            Self::DecideSchemaTxn { commit: true, .. } => "schema.commit",
            Self::DecideSchemaTxn { .. } => "schema.abort",
            Self::SchemaStepFinished { .. } => "schema.step",
            Self::ResolvedByHand { .. } => "schema.resolved-by-hand",
            Self::StepStarted { .. } => "step.start",
            Self::StepFinished { .. } => "step.finish",
            Self::StartRollback(_) => "rollback.start",
            Self::DecideRequest(decide) => decide.decision.action(),
            Self::SkipHost { .. } => "rollback.skip-host",
            Self::RecordSelfRevert { .. } => "host.self-revert",
            Self::ForgetHost { .. } => "host.forget",
            Self::SetClusterVersion { .. } => "cluster.upgrade-finalize",
            Self::RecordOfflineHealth { .. } => "host.offline-health",
            Self::IsolateService { .. } => "rollback.isolate",
            Self::Stall { .. } => "rollback.stall",
            Self::DeferRegion { .. } => "rollback.defer-region",
            Self::StartFireDrill { .. } => "drill.rollback",
            Self::FinishFireDrill { .. } => "drill.finish",
            Self::AbortFireDrill { .. } => "drill.abort",
            Self::AutoTrigger(_) => "trigger",
            Self::SetFlag { kill: true, .. } => "flag.kill",
            Self::SetFlag { .. } => "flag.set",
            Self::ResetBreaker { .. } => "trigger.reset-breaker",
            Self::EscalationDelivered { .. } => "rollback.escalation",
            Self::TransferLeader { .. } => "cluster.transfer-leader",
            Self::ApplyPolicy {
                bootstrap: true, ..
            } => "policy.bootstrap",
            Self::ApplyPolicy { .. } => "policy.apply",
            Self::RecordRefusal { .. } => "access.refused",
            Self::CreateJoinToken { .. } => "join-token.create",
            Self::UseJoinToken { .. } => "join-token.use",
            Self::RevokeJoinToken { .. } => "join-token.revoke",
            Self::CertificateRenewed { .. } => "certificate.renew",
            Self::AdoptHostState { .. } => "host.adopt",
            Self::ConfirmAuditArchive { .. } => "audit.archived",
            Self::PruneAudit { .. } => "audit.prune",
            Self::RedactAudit { .. } => "audit.redact",
            Self::NoteIncident { .. } => "incident.note",
            Self::CloseIncident { .. } => "incident.close",
            Self::IncidentNotified { .. } => "incident.notify",
            Self::ChangeMembership { change, .. } => match change {
                MembershipChange::AddLearner => "cluster.add-learner",
                MembershipChange::Promote => "cluster.promote",
                MembershipChange::Remove => "cluster.remove",
            },
            Self::ControlRollback { action, .. } => match action {
                RollbackAction::Pause => "rollback.pause",
                RollbackAction::Resume => "rollback.resume",
                RollbackAction::Abort => "rollback.abort",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_ids_round_trip_and_reject_garbage() {
        let targets = [
            StepTarget::Capture {
                change: 3,
                host_id: "web-1".into(),
            },
            StepTarget::Activate {
                change: 3,
                host_id: "web-1".into(),
            },
            StepTarget::Rollback {
                rollback: 12,
                service: "db".into(),
                host_id: "db.eu-1".into(),
                kind: RollbackStepKind::Verify,
            },
            StepTarget::Gate {
                rollback: 12,
                wave: 3,
            },
            StepTarget::Schema {
                txn: 4,
                phase: ShardPhase::Prepare,
                host_id: "orders-db-2".into(),
            },
        ];
        for target in targets {
            assert_eq!(StepTarget::parse(&target.step_id()), Some(target));
        }
        for bad in [
            "",
            "ch-3",
            "ch-3/capture/",
            "ch-0/capture/a",
            "rb-1/explode/a",
            "ch-x/capture/a",
            "rb-1/restore/a",
            "rb-1/web/restore/a/b",
            "rb-1/gate/x",
            "rb-1//restore/a",
            "st-1/explode/a",
            "st-0/check/a",
        ] {
            assert_eq!(StepTarget::parse(bad), None, "{bad}");
        }
    }
}
