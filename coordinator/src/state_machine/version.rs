//! Cluster versions and how log entries are encoded: what lets members of two releases share a
//! log during a rolling upgrade without their states drifting apart.
//!
//! How `apply()` treats a command may change only behind a cluster version: the cluster runs at
//! the version every member supports until an admin raises it (`rewindctl cluster
//! upgrade-finalize`, refused while any member runs an older binary), and `apply()` asks
//! [`State::cluster_version`] before doing anything a member of an older release would not.
//! Entries written at a version carry it, so a member that meets one it cannot read stops with
//! an error that names both versions instead of guessing. The golden logs in
//! `coordinator/tests/golden/` pin how every released version replays.

use serde::{Deserialize, Serialize};

use super::command::Command;
use super::state::State;
use crate::errors::CoordinatorError;

/// The version of clusters that ran before versions existed (releases up to issue 17): entries
/// are bare JSON commands, and a member skips one it cannot decode.
pub const LEGACY: u32 = 1;

/// The highest cluster version this binary can apply.
pub const CURRENT: u32 = 13;

/// From this version a refused command takes back the requests for approval it expired or
/// lapsed on its way to the refusal.
pub const REFUSAL_UNDOES_EXPIRY: u32 = 3;

/// From this version a rollback, an approval or a trigger is decided on a change as the planner
/// reads it (`decision::plan_inputs`), so that the change's step progress elsewhere does not
/// make it stale.
pub const PLAN_BASIS_OF_INPUTS: u32 = 4;

/// From this version an automatic request for approval that expires while an alert repeats
/// refuses the rollback there and then: the alert does not file a new request.
pub const EXPIRY_REFUSES_AT_ONCE: u32 = 4;

/// From this version the reason a drill was started with goes into its audit entry.
pub const DRILL_REASON_AUDITED: u32 = 4;

/// From this version each audit entry commits to its fields through salts the proposer's seed
/// derives (`Command::audit_seed`), and keeps the command's reason in a field of its own, so
/// that an identity or a reason can be redacted and the chain still verifies.
pub const SALTED_AUDIT: u32 = 5;

/// From this version an admin can confirm an audit export archived, the leader's retention
/// drops archived entries (the log then starts from the last one's hash), and an admin can
/// redact a field of a salted entry in the cluster.
pub const AUDIT_ARCHIVE: u32 = 5;

/// From this version notes and root-cause analyses are recorded on incidents.
pub const INCIDENTS: u32 = 5;

/// From this version the deliveries of an incident's events to the incident webhook are
/// recorded on the incident.
pub const INCIDENT_NOTICES: u32 = 6;

/// From this version a service may declare a recovery time objective and freeze windows, and a
/// change inside one of its freeze windows is refused unless break-glass.
pub const SERVICE_OBJECTIVES: u32 = 6;

/// From this version the audit entries live in a store beside the state (the state keeps the
/// chain's head), so snapshots no longer grow with the history; raising to it moves them there.
pub const AUDIT_STORE: u32 = 7;

/// From this version finished changes and rollbacks whose audit entries were pruned move from
/// the state to the archive beside it (see `archive`), with the pruning that passes them.
pub const ARCHIVE: u32 = 8;

/// From this version a rollback reverts contract and data migrations before its app waves (the
/// release it restores needs what they removed) and expand ones after them (the release it
/// reverts needs what they added), each database's reverts still newest first.
pub const SCHEMA_ORDER_BY_CLASS: u32 = 9;

/// From this version a rollback leaves out hosts it is told to (`exclude_hosts`), may be told
/// to overwrite drift, and an automatic one leaves a drifted host untouched and calls a person
/// (a service's `drift_policy` may say overwrite instead); a host's drift can be adopted as its
/// desired state (audited).
pub const DRIFT_GUARD: u32 = 10;

/// From this version a release may declare the message schema versions it writes and reads per
/// topic, and a rollback plan that leaves a consumer reading less than a producer writes is
/// refused like one that breaks an API.
pub const MESSAGE_TOPICS: u32 = 10;

/// From this version isolating a service (the circuit breaker) takes out only its failing
/// hosts, or a region's, within `max_unavailable`, instead of every host at once; a service's
/// policy may trip it when a wave fails repeatedly.
pub const ISOLATION_WITHIN_BUDGET: u32 = 10;

/// From this version a rollback that loses a whole region (every agent of it gone while other
/// regions' are there) defers that region's hosts and goes on with the others, then reverts
/// them after its last wave once they return; a lost region's hosts do not count against
/// `max_unavailable`.
pub const REGION_LOSS: u32 = 11;

/// From this version a rollback fire drill deploys a known-bad release where the environment's
/// policy allows drills, lets detection and the automatic rollback run, and scores them.
pub const FIRE_DRILLS: u32 = 11;

/// From this version a rollback's health gate may settle for a time in milliseconds (under a
/// second, where asked).
pub const SUBSECOND_GATES: u32 = 12;
/// From this version a rollback step's success starts the same host's next step of its wave in
/// the same entry (`apply::step::start_next_of_host`), as the engine would have decided on the
/// next tick: a host's five steps take six entries (its first start, then each result), not ten.
pub const CHAINED_STEPS: u32 = 13;

/// What each version brought, for `rewindctl cluster version` and the README.
pub const CHANGES: &[(u32, &str)] = &[
    (1, "the log as released before cluster versions"),
    (
        2,
        "versioned log entries and snapshots (a member stops on one it cannot read); \
         host.forget; [[hosts]] rules in the access policy; a host keeps the services it \
         registered with, and host rules hold, in apply() too; a request log that forgets the \
         busiest identity's ids first",
    ),
    (
        3,
        "the leader plans a rollback, approves a request's plan and judges an automatic \
         trigger, and the log carries the result: apply() checks the state it was decided on is \
         unchanged and records it, never planning itself; a refused command takes back the \
         requests for approval it expired on its way to the refusal",
    ),
    (
        4,
        "a rollback, an approval or a trigger is checked against a change as the planner reads \
         it, so its deploy's step progress does not make the decision stale; an automatic request \
         that expires as its alert repeats refuses the rollback instead of asking again; a \
         drill's reason is audited",
    ),
    (
        5,
        "audit entries commit to each field through a random salt the proposer chose, and keep \
         the reason in a field of its own, so an identity or a reason can be redacted (in an \
         export or in the cluster) while the chain still verifies; confirmed audit archives, and \
         a retention that drops archived entries only; incident notes and root-cause analyses",
    ),
    (
        6,
        "incident webhook deliveries (PagerDuty Events API v2 or generic JSON) recorded on the \
         incident; a service's RTO and freeze windows, and changes refused inside a freeze \
         window unless break-glass",
    ),
    (
        7,
        "audit entries in a store of their own beside the state, which keeps the chain's head: \
         snapshots stay the same size however long the history; a snapshot sent to a member \
         that is behind carries the entries",
    ),
    (
        8,
        "finished changes and rollbacks whose audit entries were pruned move from the state to \
         an archive beside it (`change list`/`rollback list --archived`), except what the \
         cluster still acts on; a snapshot sent to a member that is behind carries the archive",
    ),
    (
        9,
        "a rollback reverts contract and data migrations before its app waves and expand ones \
         after them (a revert held after the waves by one applied later, or that every shard \
         would refuse, says why in the plan); `--schema-after-waves` puts every revert after",
    ),
    (
        10,
        "a host whose service changed since rewind last put it there (a hotfix by hand) is not \
         reverted without a word: a rollback leaves out the hosts it names (`--exclude-host`) \
         and is told to overwrite drift (`--overwrite-drift`, audited), agents refuse such a \
         restore otherwise, an automatic rollback leaves drifted hosts untouched and calls a \
         person (or overwrites, as the service's drift policy says); `host adopt` accepts a \
         host's drift as its desired state (audited); releases declare the message schemas \
         they write and read per topic, and a plan that leaves a consumer reading less than a \
         producer writes is refused; `reconcile` and `clear-client-caches` recipe steps; \
         isolating a service takes out only its failing hosts (or a region's) within \
         max_unavailable, and a service's policy may trip it after repeated wave failures",
    ),
    (
        11,
        "a rollback that loses a whole region goes on with the other regions (the lost \
         region's hosts no longer count against max_unavailable) and reverts the lost hosts \
         after its last wave once they return; rollback fire drills (a known-bad release \
         deployed where the environment allows drills, detected and rolled back for real, and \
         scored)",
    ),
    (
        12,
        "a rollback's health gate may settle for a time given in milliseconds (under a second \
         where asked), not only in whole seconds",
    ),
    (
        13,
        "a rollback step that succeeds starts its host's next step of the wave in the same log \
         entry (the engine used to decide it in an entry of its own): a host's five steps take \
         six entries, not ten; the finished step's audit entry names the step it started",
    ),
];

/// A log entry's bytes from version 2 on: the command inside an envelope naming the version it
/// was written at.
#[derive(Serialize)]
struct Envelope<'a> {
    v: u32,
    command: &'a serde_json::value::RawValue,
}

/// How an entry is recognised as versioned: any JSON object with a `v`, whatever else a later
/// release puts beside it (a bare command has no `v`). Read leniently so that a later envelope
/// this binary does not fully understand stops the member instead of being skipped.
#[derive(Deserialize)]
struct EnvelopeProbe<'a> {
    v: Option<u64>,
    #[serde(borrow)]
    command: Option<&'a serde_json::value::RawValue>,
}

/// Encodes `command` as a log entry for a cluster at `cluster_version`: bare JSON at the legacy
/// version (members of the older release read only that), an envelope after.
pub fn encode_entry(command: &Command, cluster_version: u32) -> Result<Vec<u8>, CoordinatorError> {
    let encode_error = |error: serde_json::Error| {
        CoordinatorError::Internal(format!("encode the command: {error}"))
    };
    let command = serde_json::to_vec(command).map_err(encode_error)?;
    if cluster_version <= LEGACY {
        return Ok(command);
    }
    let command =
        serde_json::from_slice::<&serde_json::value::RawValue>(&command).map_err(encode_error)?;
    serde_json::to_vec(&Envelope {
        v: cluster_version,
        command,
    })
    .map_err(encode_error)
}

/// What a member makes of a committed entry's bytes.
#[derive(Debug)]
pub enum Decoded {
    Command(Box<Command>),
    /// A legacy entry that does not decode: every member of the legacy release skipped it, so
    /// this one does too (replaying old logs the same way).
    SkipLegacy(String),
}

/// Decodes a committed entry. A versioned entry written at a version above [`CURRENT`], or one
/// whose command this binary does not know, is an error: the member must stop.
pub fn decode_entry(index: u64, data: &[u8]) -> Result<Decoded, CoordinatorError> {
    let cannot = |why: String| CoordinatorError::CannotApply {
        what: format!("entry {index}"),
        why,
    };
    if let Ok(EnvelopeProbe {
        v: Some(v),
        command,
    }) = serde_json::from_slice(data)
    {
        if v > u64::from(CURRENT) {
            return Err(cannot(format!(
                "it was written at cluster version {v}, and this binary applies versions up to \
                 {CURRENT}: run a release that supports version {v} on this member"
            )));
        }
        let Some(command) = command else {
            return Err(cannot(format!(
                "its envelope (cluster version {v}) carries no command"
            )));
        };
        return serde_json::from_str::<Command>(command.get())
            .map(|command| Decoded::Command(Box::new(command)))
            .map_err(|error| {
                cannot(format!(
                    "its command (cluster version {v}) does not decode here: {error}"
                ))
            });
    }
    Ok(match serde_json::from_slice::<Command>(data) {
        Ok(command) => Decoded::Command(Box::new(command)),
        Err(error) => Decoded::SkipLegacy(error.to_string()),
    })
}

/// Refuses a command that raises the cluster above what this binary applies: the member must
/// stop before it, not carry on at a version it does not know.
pub fn check_command(command: &Command, index: u64) -> Result<(), CoordinatorError> {
    match command.kind {
        super::CommandKind::SetClusterVersion { version, .. } if version > CURRENT => {
            Err(CoordinatorError::CannotApply {
                what: format!("entry {index}"),
                why: format!(
                    "it raises the cluster to version {version}, and this binary applies \
                     versions up to {CURRENT}: run a release that supports it on this member"
                ),
            })
        }
        _ => Ok(()),
    }
}

/// Refuses a snapshot whose state is at a cluster version above [`CURRENT`].
pub fn check_snapshot_version(cluster_version: u32) -> Result<(), CoordinatorError> {
    if cluster_version <= CURRENT {
        return Ok(());
    }
    Err(CoordinatorError::CannotApply {
        what: "a snapshot".into(),
        why: format!(
            "it is at cluster version {cluster_version}, and this binary applies versions up to \
             {CURRENT}: run a release that supports it on this member"
        ),
    })
}

/// Refuses to propose a kind the cluster's version does not have yet: members of the older
/// release would fail to decode the entry and stop.
pub fn proposable(state: &State, kind: &super::CommandKind) -> Result<(), CoordinatorError> {
    require(state, kind.introduced_in(), kind.action())
}

/// Refuses `what` while the cluster runs below `needed`, naming how to raise it.
pub fn require(state: &State, needed: u32, what: &str) -> Result<(), CoordinatorError> {
    let running = state.cluster_version();
    if running >= needed {
        return Ok(());
    }
    Err(CoordinatorError::NeedsClusterVersion {
        what: what.to_string(),
        needed,
        running,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::CommandKind;

    fn command() -> Command {
        Command {
            at_ms: 7,
            identity: "user:ada".into(),
            request_id: "r-1".into(),
            audit_seed: String::new(),
            kind: CommandKind::ResetBreaker {
                reason: "test".into(),
            },
        }
    }

    #[test]
    fn a_kind_of_a_later_version_is_not_proposed_before_the_cluster_runs_it() {
        let at = |cluster_version| State {
            cluster_version,
            ..State::default()
        };
        let note = CommandKind::NoteIncident {
            incident: 1,
            text: "x".into(),
        };
        let prune = CommandKind::PruneAudit { through: 1 };
        for kind in [&note, &prune] {
            let error = proposable(&at(4), kind).unwrap_err();
            assert!(
                matches!(
                    error,
                    CoordinatorError::NeedsClusterVersion {
                        needed: 5,
                        running: 4,
                        ..
                    }
                ),
                "{error:?}"
            );
            proposable(&at(5), kind).unwrap();
        }
        proposable(&at(1), &command().kind).unwrap();
        // A member of an older release would drop the option and keep the rest.
        let later = |schema_after_waves| {
            CommandKind::StartRollback(super::super::StartRollback {
                changes: vec![1],
                options: super::super::PlanOptions {
                    schema_after_waves,
                    ..Default::default()
                },
                plan_hash: String::new(),
                reason: "x".into(),
                trigger: super::super::Trigger::Manual,
                break_glass: false,
                planned: None,
            })
        };
        let error = proposable(&at(8), &later(true)).unwrap_err();
        assert!(
            matches!(
                error,
                CoordinatorError::NeedsClusterVersion { needed: 9, .. }
            ),
            "{error:?}"
        );
        proposable(&at(8), &later(false)).unwrap();
        proposable(&at(9), &later(true)).unwrap();
    }

    #[test]
    fn what_version_ten_brought_is_not_proposed_below_it() {
        use super::super::{DriftPolicy, PlanOptions, ReleaseRecord, ServiceRecord, StartRollback};
        let at = |cluster_version| State {
            cluster_version,
            ..State::default()
        };
        let rollback = |options: PlanOptions| {
            CommandKind::StartRollback(StartRollback {
                changes: vec![1],
                options,
                plan_hash: String::new(),
                reason: "x".into(),
                trigger: super::super::Trigger::Manual,
                break_glass: false,
                planned: None,
            })
        };
        let service = ServiceRecord {
            name: "web".into(),
            depends_on: vec![],
            policy: Default::default(),
            synthetics: vec![],
            rollback_steps: vec![],
            rto_s: 0,
            freeze: vec![],
            drift_policy: DriftPolicy::Overwrite,
            isolate_after_failures: 0,
        };
        let release = ReleaseRecord {
            consumes: [("orders.created".to_string(), 1)].into(),
            ..crate::test_fleet::release("v1", 'a')
        };
        let kinds = [
            rollback(PlanOptions {
                exclude_hosts: vec!["web-1".into()],
                ..Default::default()
            }),
            rollback(PlanOptions {
                overwrite_drift: true,
                ..Default::default()
            }),
            CommandKind::PutService {
                service: service.clone(),
            },
            CommandKind::PutService {
                service: ServiceRecord {
                    drift_policy: DriftPolicy::Skip,
                    isolate_after_failures: 2,
                    ..service
                },
            },
            CommandKind::RegisterRelease { release },
            CommandKind::IsolateService {
                rollback: 1,
                service: "web".into(),
                reason: "x".into(),
                region: "eu".into(),
            },
            CommandKind::AdoptHostState {
                host_id: "web-1".into(),
                accepted: vec![],
                reason: "x".into(),
            },
        ];
        for kind in &kinds {
            let error = proposable(&at(9), kind).unwrap_err();
            assert!(
                matches!(
                    error,
                    CoordinatorError::NeedsClusterVersion { needed: 10, .. }
                ),
                "{kind:?}: {error:?}"
            );
            proposable(&at(10), kind).unwrap();
        }
        proposable(&at(9), &rollback(PlanOptions::default())).unwrap();
    }

    #[test]
    fn legacy_entries_stay_bare_json_and_versioned_ones_carry_their_version() {
        let legacy = encode_entry(&command(), LEGACY).unwrap();
        assert_eq!(legacy, serde_json::to_vec(&command()).unwrap());
        let versioned = encode_entry(&command(), CURRENT).unwrap();
        let text = String::from_utf8(versioned.clone()).unwrap();
        assert!(text.starts_with(&format!("{{\"v\":{CURRENT},")), "{text}");
        for bytes in [legacy, versioned] {
            let Decoded::Command(decoded) = decode_entry(1, &bytes).unwrap() else {
                panic!("decodes")
            };
            assert_eq!(*decoded, command());
        }
    }

    #[test]
    fn an_entry_from_a_newer_version_or_an_unknown_command_stops_the_member() {
        let newer = format!(
            "{{\"v\":{},\"command\":{}}}",
            CURRENT + 1,
            serde_json::to_string(&command()).unwrap()
        );
        let error = decode_entry(9, newer.as_bytes()).unwrap_err().to_string();
        assert!(
            error.contains("entry 9")
                && error.contains(&format!("applies versions up to {CURRENT}")),
            "{error}"
        );
        let unknown = format!(
            "{{\"v\":{CURRENT},\"command\":{{\"at_ms\":1,\"identity\":\"x\",\"request_id\":\"\",\"kind\":{{\"FutureThing\":{{}}}}}}}}"
        );
        let error = decode_entry(10, unknown.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(error.contains("does not decode here"), "{error}");
        // A bare entry that does not decode is skipped, as the legacy release did.
        assert!(matches!(
            decode_entry(11, b"{\"kind\":{\"FutureThing\":{}}}").unwrap(),
            Decoded::SkipLegacy(_)
        ));
    }
}
