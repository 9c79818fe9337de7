//! Golden logs: a log written by a release, with the state digest and audit head it replays
//! to, checked in under `coordinator/tests/golden/`. Every build replays each of them; a change
//! to how `apply()` treats a command that is not gated on a new cluster version alters a
//! replay and fails here. Files are added with each release and never edited.
//!
//! `REWIND_WRITE_GOLDEN=1 cargo test -p rewind-coordinator golden` writes the current
//! release's file (`v<cluster version>.json.zst`, JSON compressed with zstd: `zstd -d` reads
//! it) when it does not exist yet. `v1.json.zst` was
//! written by the release before cluster versions (commit f2b3436, its own test harness), so it
//! checks that this binary applies a version-1 log as that release did.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::apply_test::{pass_gate, rollback_step};
use super::archive::ArchiveKind;
use super::*;
use crate::access::Policy;
use crate::errors::CoordinatorError;
use crate::test_fleet::{Fleet, rollback_of, start_change};

#[derive(Serialize, Deserialize)]
struct GoldenLog {
    /// The release that wrote it.
    release: String,
    /// The cluster version the log starts at (entries may raise it).
    initial_cluster_version: u32,
    /// Entries as the log holds them: each entry's bytes, which are JSON text.
    entries: Vec<GoldenEntry>,
    state_digest: String,
    audit_head: String,
    audit_entries: u64,
    /// The entries as stored (redactions included); from version 7's file on, where the state
    /// digest no longer covers them.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    audit_digest: String,
    /// The archived changes and rollbacks; from version 8's file on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    archive_digest: String,
}

#[derive(Serialize, Deserialize)]
struct GoldenEntry {
    index: u64,
    data: String,
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// What a member that applied `entries` from a state at `initial_cluster_version` holds: the
/// state's digest (as `MemberStatus` reports it), the audit head, its length and the digest of
/// the entries as stored.
fn replay(initial_cluster_version: u32, entries: &[GoldenEntry]) -> Replayed {
    let mut state = State {
        cluster_version: initial_cluster_version,
        ..State::default()
    };
    for entry in entries {
        // As the Raft member does: refused commands are outcomes, not failures.
        match version::decode_entry(entry.index, entry.data.as_bytes()).expect("entry reads") {
            version::Decoded::Command(command) => {
                version::check_command(&command, entry.index).expect("entry applies");
                let _ = apply_checked(&mut state, entry.index, &command);
            }
            version::Decoded::SkipLegacy(_) => state.applied_index = entry.index,
        }
    }
    let audit = state.audit.verify();
    assert!(audit.first_broken.is_none(), "{}", audit.detail);
    let archive_digest = state.archive_snapshot().digest().unwrap();
    (
        rewind_shared::digest::sha256_digest(&serde_json::to_vec(&state).unwrap()),
        audit.head_hash,
        audit.entries,
        audit.content_digest,
        archive_digest,
    )
}

/// What a replay ends with: the state's digest, the audit head, its length, the digest of its
/// entries as stored, and the digest of the archive.
type Replayed = (String, String, u64, String, String);

/// The current release's scenario, from a cluster of the release before versions: at version 1
/// what needs version 2 is refused and hosts still change services; the version is raised; then
/// a fleet deploys twice, flips a flag, rolls back with every step and gate, retries a request,
/// applies a policy with host rules, forgets a host, floods the request log, and is refused
/// along the way (refusals are in the log too).
/// Applies the scenario's policy (ada is admin; web-* hosts run web) with `extra` TOML after it.
fn apply_policy(harness: &mut Fleet, extra: &str, reason: &str) {
    let policy = Policy::from_toml(&format!(
        "[[binding]]\nname = \"admins\"\nrole = \"admin\"\nidentities = [\"user:ada\"]\n\
         scopes = [\"*\"]\n\n[[hosts]]\nnames = [\"web-*\"]\nservices = [\"web\"]\n{extra}"
    ))
    .expect("the scenario's policy");
    harness.apply(CommandKind::ApplyPolicy {
        policy,
        bootstrap: false,
        expected_hash: String::new(),
        reason: reason.into(),
    });
}

fn current_release_log() -> Fleet {
    let mut harness = Fleet::legacy().web();
    let forget = |host: &str| CommandKind::ForgetHost {
        host_id: host.into(),
        release_name: false,
        reason: "retired".into(),
    };
    // Refused at version 1.
    let _ = harness.run(forget("web-2"));
    let _ = harness.run(CommandKind::SetClusterVersion {
        version: 2,
        members: vec![9],
        reason: "a member list that is not the registry's".into(),
    });
    harness.apply(CommandKind::RegisterHost {
        host_id: "cache-1".into(),
        labels: Labels::default(),
        services: vec!["cache".into()],
        agent_version: "test".into(),
    });
    harness.apply(CommandKind::RegisterHost {
        host_id: "cache-1".into(),
        labels: Labels::default(),
        services: vec!["cache".into(), "payments".into()],
        agent_version: "test".into(),
    });
    harness.apply(CommandKind::SetClusterVersion {
        version: 2,
        members: vec![],
        reason: "every member on this release".into(),
    });
    // Refused at version 2: the pin.
    let _ = harness.run(CommandKind::RegisterHost {
        host_id: "web-1".into(),
        labels: Labels::default(),
        services: vec!["web".into(), "payments".into()],
        agent_version: "test".into(),
    });
    harness.deploy_web("v1");
    let change = harness.deploy_web("v2");
    harness.apply(CommandKind::SetFlag {
        environment: "default".into(),
        service: "web".into(),
        name: "new-checkout".into(),
        enabled: true,
        kill: false,
        reason: "launch".into(),
    });
    // A retried request acts once.
    for _ in 0..2 {
        let _ = harness.run_as(
            "user:ada",
            "req-1",
            CommandKind::ResetBreaker {
                reason: "nothing tripped".into(),
            },
        );
    }
    let rollback = harness.must_start_rollback(change, Trigger::Manual);
    for host in ["web-1", "web-2"] {
        for kind in RollbackStepKind::ALL {
            harness.finish(rollback_step(rollback, host, kind), true);
        }
    }
    pass_gate(&mut harness, rollback, 0);
    // Refused: the change was rolled back already.
    let _ = harness.run(rollback_of(change, Trigger::Automatic));
    apply_policy(&mut harness, "", "host rules");
    harness.register_host("web-3", "web");
    harness.apply(CommandKind::ForgetHost {
        host_id: "web-3".into(),
        release_name: false,
        reason: "retired".into(),
    });
    // Refused: unknown now.
    let _ = harness.run(CommandKind::ForgetHost {
        host_id: "web-3".into(),
        release_name: false,
        reason: "again".into(),
    });
    // Refused: no host rule assigns payments to web-1.
    let _ = harness.run(CommandKind::RegisterHost {
        host_id: "web-1".into(),
        labels: Labels::default(),
        services: vec!["web".into(), "payments".into()],
        agent_version: "test".into(),
    });
    // One identity floods the request log past its capacity: from version 2 it forgets its
    // own ids, so bob's retry is answered from the log and acts once.
    let noted = |reason: &str| CommandKind::RecordRefusal {
        action: "rollback.start".into(),
        target: "web".into(),
        reason: reason.into(),
    };
    let _ = harness.run_as("user:bob", "bob-1", noted("b"));
    for n in 0..(RequestLog::CAPACITY + 5) {
        let _ = harness.run_as("automation:pager", &format!("page-{n}"), noted("p"));
    }
    let _ = harness.run_as("user:bob", "bob-1", noted("b"));
    version_three(&mut harness);
    version_four(&mut harness);
    version_five(&mut harness);
    version_six(&mut harness);
    version_seven(&mut harness);
    version_eight(&mut harness);
    version_nine(&mut harness);
    version_ten(&mut harness);
    version_eleven(&mut harness);
    version_twelve(&mut harness);
    version_thirteen(&mut harness);
    harness
}

/// From version 3 the leader decides: a person's rollback and an automatic one run on the
/// leader's plan, a trigger opens the breaker by the leader's verdict, an approval starts the
/// plan the leader made of its request, and entries decided on a state that moved, or not
/// decided at all, are refused.
fn version_three(harness: &mut Fleet) {
    // Refused at version 2: a decision only version 3 records.
    let mut decided = rollback_of(1, Trigger::Manual);
    if let CommandKind::StartRollback(StartRollback { planned, .. }) = &mut decided {
        *planned = Some(Box::new(super::decision::LeaderPlan {
            plan: Err("decided by a leader of version 3".into()),
            drifted: Default::default(),
            basis: String::new(),
        }));
    }
    let refused = harness.run_raw(decided);
    assert!(
        matches!(refused, Err(CoordinatorError::NeedsClusterVersion { .. })),
        "{refused:?}"
    );
    harness.apply(CommandKind::SetClusterVersion {
        version: 3,
        members: vec![],
        reason: "every member on this release".into(),
    });
    // A person's rollback, run to the end on the leader's plan.
    let change = harness.deploy_web("v2");
    let rollback = harness.must_start_rollback(change, Trigger::Manual);
    for host in ["web-1", "web-2"] {
        for kind in RollbackStepKind::ALL {
            harness.finish(rollback_step(rollback, host, kind), true);
        }
    }
    pass_gate(harness, rollback, 0);
    let change = harness.deploy_web("v2");
    // A plan decided before a service changed: stale, refused without a trace.
    let mut stale = Command {
        at_ms: 0,
        identity: "operator".into(),
        request_id: String::new(),
        audit_seed: String::new(),
        kind: rollback_of(change, Trigger::Manual),
    };
    super::decision::prepare(&harness.state, &mut stale).expect("the leader plans it");
    harness.apply(CommandKind::PutService {
        service: ServiceRecord {
            rto_s: 0,
            freeze: Vec::new(),
            drift_policy: Default::default(),
            isolate_after_failures: 0,
            name: "cache".into(),
            depends_on: vec![],
            policy: HealthPolicy::default(),
            synthetics: vec![],
            rollback_steps: Vec::new(),
        },
    });
    let refused = harness.run_raw(stale.kind);
    assert!(
        matches!(refused, Err(CoordinatorError::StaleDecision { .. })),
        "{refused:?}"
    );
    // Not decided at all: refused.
    let refused = harness.run_raw(rollback_of(change, Trigger::Manual));
    assert!(
        matches!(refused, Err(CoordinatorError::StaleDecision { .. })),
        "{refused:?}"
    );
    // An automatic one, then a second alert ignored by the leader's verdict.
    let trigger = |breaker_services: u32| {
        CommandKind::AutoTrigger(AutoTrigger {
            service: "web".into(),
            environment: String::new(),
            source: TriggerSource::Alertmanager,
            reason: "error rate".into(),
            options: PlanOptions::default(),
            throttle: ThrottleLimits {
                breaker_services,
                ..ThrottleLimits::default()
            },
            decided: None,
        })
    };
    for expected in [TriggerOutcome::Started, TriggerOutcome::Ignored] {
        let judged = harness.apply(trigger(4));
        assert!(
            matches!(judged, Outcome::Triggered { outcome, .. } if outcome == expected),
            "{judged:?}"
        );
    }
    let automatic = harness.state.rollbacks.len() as u64;
    for host in ["web-1", "web-2"] {
        for kind in RollbackStepKind::ALL {
            harness.finish(rollback_step(automatic, host, kind), true);
        }
    }
    pass_gate(harness, automatic, 0);
    // One alert for a service opens the breaker when the limit is one service.
    harness.deploy_web("v1");
    let judged = harness.apply(trigger(1));
    assert!(harness.state.breaker.is_some(), "{judged:?}");
    harness.apply(CommandKind::ResetBreaker {
        reason: "monitoring fixed".into(),
    });
    // Approvals: the request carries the leader's plan, and so does its approval.
    let change = harness.deploy_web("v2");
    apply_policy(
        harness,
        "\n[environment.default]\napprovals = 1\n",
        "one approval",
    );
    let Outcome::Request(request) = harness.apply(rollback_of(change, Trigger::Manual)) else {
        panic!("a request for approval")
    };
    let plan_hash = harness.state.approval_requests[&request].plan_hash.clone();
    let approved = harness.run_as(
        "user:ada",
        "",
        CommandKind::DecideRequest(DecideRequest {
            request,
            decision: RequestDecision::Approve,
            plan_hash,
            reason: "looked at it".into(),
            baseline: None,
            planned: None,
        }),
    );
    assert!(
        matches!(approved, Ok(Outcome::Request(_)))
            && harness.state.approval_requests[&request].status == RequestStatus::Approved,
        "{approved:?}"
    );
}

/// From version 4 a person's rollback decided while its change was still deploying applies
/// although the deploy went on, as long as it went on only where the planner does not look.
fn version_four(harness: &mut Fleet) {
    // The approved rollback of version 3's scenario runs to its end first.
    let approved = harness.state.rollbacks.len() as u64;
    for host in ["web-1", "web-2"] {
        for kind in RollbackStepKind::ALL {
            harness.finish(rollback_step(approved, host, kind), true);
        }
    }
    pass_gate(harness, approved, 0);
    harness.apply(CommandKind::SetClusterVersion {
        version: 4,
        members: vec![],
        reason: "every member on this release".into(),
    });
    apply_policy(harness, "", "no approvals");
    harness.register_host("web-3", "web");
    let change = harness.deploy_web_half_way("v1", "v2", true);
    let mut decided = Command {
        at_ms: 0,
        identity: "operator".into(),
        request_id: String::new(),
        audit_seed: String::new(),
        kind: rollback_of(change, Trigger::Manual),
    };
    super::decision::prepare(&harness.state, &mut decided).expect("the leader plans it");
    harness.apply(CommandKind::StepFinished {
        step: StepTarget::Activate {
            change,
            host_id: "web-2".into(),
        },
        ok: true,
        detail: "done".into(),
        snapshot_id: String::new(),
    });
    let started = harness.run_raw(decided.kind);
    let Ok(Outcome::Rollback(rollback)) = started else {
        panic!("a rollback: {started:?}")
    };
    for host in ["web-1", "web-2"] {
        for kind in RollbackStepKind::ALL {
            harness.finish(rollback_step(rollback, host, kind), true);
        }
    }
    pass_gate(harness, rollback, 0);
    // Where automatic rollbacks wait for approval, a request that expires as its alert repeats
    // refuses the rollback: the repeat is ignored and files nothing.
    harness.deploy_web("v2");
    apply_policy(
        harness,
        "\n[environment.default]\napprovals = 1\nrequest-ttl-s = 60\nautomatic-rollbacks = \"await-approval\"\n",
        "automatic rollbacks wait",
    );
    let alert = || {
        CommandKind::AutoTrigger(AutoTrigger {
            service: "web".into(),
            environment: String::new(),
            source: TriggerSource::Alertmanager,
            reason: "error rate".into(),
            options: PlanOptions::default(),
            // The scenario rolled web back often: no flapping, budget or cooldown limit here.
            throttle: ThrottleLimits {
                budget: 100,
                flap_rollbacks: 100,
                cooldown_s: 0,
                ..ThrottleLimits::default()
            },
            decided: None,
        })
    };
    let asked = harness.apply(alert());
    assert!(
        matches!(asked, Outcome::Triggered { outcome, .. } if outcome == TriggerOutcome::AwaitingApproval),
        "{asked:?}"
    );
    let requests = harness.state.approval_requests.len();
    let later = 1_000 * (harness.index + 1) + 61_000;
    let repeated = harness.apply_at(later, alert());
    assert!(
        matches!(&repeated, Ok(Outcome::Triggered { outcome, .. }) if *outcome == TriggerOutcome::Ignored),
        "{repeated:?}"
    );
    assert_eq!(
        harness.state.approval_requests.len(),
        requests,
        "nothing filed again"
    );
}

/// From version 5 audit entries are salted with the proposer's seed and keep their reason
/// apart; an entry proposed before the raise (no seed) is still written plain. Then an archive
/// is confirmed, archived entries pruned, an entry redacted, and an incident noted and closed.
fn version_five(harness: &mut Fleet) {
    let flag = |enabled: bool, reason: &str| CommandKind::SetFlag {
        environment: "default".into(),
        service: "web".into(),
        name: "new-checkout".into(),
        enabled,
        kill: !enabled,
        reason: reason.into(),
    };
    harness.apply(flag(false, "checkout errors, INC-7"));
    let plain = harness.state.audit.len();
    harness.apply(CommandKind::SetClusterVersion {
        version: 5,
        members: vec![],
        reason: "every member on this release".into(),
    });
    harness
        .run_as("user:ada", "", flag(true, "fixed in INC-7"))
        .unwrap();
    // Proposed before the raise: no seed, so plain.
    harness.run_raw(flag(false, "again")).unwrap();
    // Refused, and the refusal audited with its reason apart.
    harness.apply(CommandKind::RecordRefusal {
        action: "rollback.start".into(),
        target: "web".into(),
        reason: "user:eve is not allowed".into(),
    });
    let entries = harness.state.audit.entries();
    let formats: Vec<u32> = entries[plain - 1..]
        .iter()
        .map(|entry| entry.format)
        .collect();
    // The raise itself was proposed at version 4.
    assert_eq!(formats, [1, 1, 2, 1, 2], "{formats:?}");
    let on = &entries[plain + 1];
    assert_eq!(on.identity, "user:ada");
    assert_eq!(on.reason, "fixed in INC-7");
    assert!(!on.outcome.contains("INC-7"), "{}", on.outcome);
    assert!(
        on.readable_outcome().ends_with(": fixed in INC-7"),
        "{on:?}"
    );
    let mut redacted = AuditEntry::clone(on);
    redacted
        .redact(rewind_shared::audit::Field::Reason)
        .unwrap();
    assert_eq!(redacted.compute_hash(), on.hash);
    let on_index = on.index;

    // An archive of the first entries confirmed, then only those pruned; an entry erased.
    let through = plain as u64;
    let manifest_hash = |state: &State, first: u64| {
        let anchor = match state.audit.get(first - 1).unwrap() {
            Some(before) => before.hash.clone(),
            None => rewind_shared::audit::GENESIS_HASH.to_string(),
        };
        let last = &state.audit.get(through).unwrap().unwrap().hash;
        rewind_shared::audit::manifest_hash(first, through, &anchor, last)
    };
    let confirm = |first: u64, hash: String| CommandKind::ConfirmAuditArchive {
        first,
        through,
        manifest_hash: hash,
        reason: "s3://audit/2026".into(),
    };
    // Refused: a gap before the export, then a hash of another range.
    let _ = harness.run(confirm(2, manifest_hash(&harness.state, 2)));
    let _ = harness.run(confirm(1, manifest_hash(&harness.state, 2)));
    // Refused: nothing is archived yet.
    let _ = harness.run(CommandKind::PruneAudit { through: 3 });
    harness.apply(confirm(1, manifest_hash(&harness.state, 1)));
    let _ = harness.run(CommandKind::PruneAudit {
        through: through + 1,
    });
    harness.apply(CommandKind::PruneAudit {
        through: through - 2,
    });
    harness.apply(CommandKind::RedactAudit {
        index: on_index,
        fields: vec![
            rewind_shared::audit::Field::Identity,
            rewind_shared::audit::Field::Reason,
        ],
        reason: "erasure request 1".into(),
    });
    // Incidents: a note and a close on the first rollback's; refused twice, and for one that
    // does not exist.
    harness
        .run_as(
            "user:ada",
            "",
            CommandKind::NoteIncident {
                incident: 1,
                text: "paged the web team".into(),
            },
        )
        .unwrap();
    let close = |incident: u64| CommandKind::CloseIncident {
        incident,
        rca_markdown: "## Action items\n- canary gate\n## Lessons\n- flags first\n".into(),
        action_items: vec!["canary gate".into()],
        lessons: vec!["flags first".into()],
    };
    harness.apply(close(1));
    let _ = harness.run(close(1));
    let _ = harness.run(close(999));
    assert_eq!(harness.state.incidents[&1].lessons, ["flags first"]);
    let audit = harness.state.audit.verify();
    assert_eq!(audit.first_broken, None, "{}", audit.detail);
    assert_eq!(audit.first_index, through - 1);
    assert_eq!(audit.archived_through, through);
    assert!(
        harness
            .state
            .audit
            .get(on_index)
            .unwrap()
            .unwrap()
            .identity
            .is_empty(),
        "redacted in the state"
    );
}

/// From version 6 the incident webhook's deliveries are recorded on the incident: refused
/// before the raise and for an incident that does not exist; a failure then a success; a
/// permanent refusal given up at once; a late result for a settled event changing nothing.
fn version_six(harness: &mut Fleet) {
    let notified = |incident: u64, event: NoticeEvent, ok: bool, permanent: bool| {
        CommandKind::IncidentNotified {
            incident,
            event,
            ok,
            permanent,
            detail: format!(
                "http://pager/v2/enqueue answered {}",
                if ok { 202 } else { 503 }
            ),
        }
    };
    // Objectives: an RTO and a freeze window over every moment of this log (its clock runs from
    // 1970-01-01, a Thursday).
    let mut web = harness.state.services["web"].clone();
    web.rto_s = 600;
    web.freeze = vec![rewind_shared::freeze::FreezeWindow::parse("Thu 00:00-24:00 UTC").unwrap()];
    let objectives = CommandKind::PutService { service: web };
    // Refused at version 5.
    let _ = harness.run(objectives.clone());
    let _ = harness.run(notified(1, NoticeEvent::Trigger, true, false));
    harness.apply(CommandKind::SetClusterVersion {
        version: 6,
        members: vec![],
        reason: "every member on this release".into(),
    });
    let _ = harness.run(notified(999, NoticeEvent::Trigger, true, false));
    harness.apply(notified(1, NoticeEvent::Trigger, false, false));
    harness.apply(notified(1, NoticeEvent::Trigger, true, false));
    harness.apply(notified(1, NoticeEvent::Resolve, false, true));
    harness.apply(notified(1, NoticeEvent::Resolve, true, false));
    // Frozen: a change is refused, a break-glass one starts and waits for review.
    harness.apply(objectives);
    let refused = harness.run(start_change("v1"));
    assert!(
        matches!(refused, Err(CoordinatorError::ServiceFrozen { .. })),
        "{refused:?}"
    );
    let CommandKind::StartChange(mut glass) = start_change("v1") else {
        unreachable!()
    };
    glass.break_glass = true;
    let Outcome::Change(change) = harness.apply(CommandKind::StartChange(glass)) else {
        panic!("a break-glass change starts in a freeze")
    };
    let record = &harness.state.changes[&change];
    assert!(record.break_glass && record.request != 0);
    let review = &harness.state.approval_requests[&record.request];
    assert!(
        review
            .detail
            .contains("inside web's freeze window (Thu 00:00-24:00 UTC)"),
        "{}",
        review.detail
    );
    let notices = &harness.state.incidents[&1].notices;
    let seen: Vec<(NoticeEvent, u32, bool, bool)> = notices
        .iter()
        .map(|notice| {
            (
                notice.event,
                notice.attempts,
                notice.delivered_at_ms != 0,
                notice.given_up,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (NoticeEvent::Trigger, 2, true, false),
            (NoticeEvent::Resolve, 1, false, true)
        ]
    );
}

/// From version 7 the audit entries move out of the state into its store at the raise: the
/// chain goes on from the same head; confirmation, pruning and redaction read and write the
/// store; the state keeps only the head.
fn version_seven(harness: &mut Fleet) {
    let before = harness.state.audit.verify();
    let held = harness.state.audit.entries();
    harness.apply(CommandKind::SetClusterVersion {
        version: 7,
        members: vec![],
        reason: "every member on this release".into(),
    });
    assert!(harness.state.audit.is_stored());
    let moved = harness.state.audit.entries();
    assert_eq!(moved[..held.len()], held[..], "moved as they were");
    assert_eq!(moved[held.len()].prev_hash, before.head_hash);
    let replicated = serde_json::to_value(&harness.state.audit).unwrap();
    assert_eq!(replicated["entries"], serde_json::json!([]), "{replicated}");
    for n in 0..3 {
        harness
            .run_as(
                "user:ada",
                "",
                CommandKind::SetFlag {
                    environment: "default".into(),
                    service: "web".into(),
                    name: "new-checkout".into(),
                    enabled: n % 2 == 0,
                    kill: false,
                    reason: format!("step {n} of INC-9"),
                },
            )
            .unwrap();
    }
    let audit = &harness.state.audit;
    let first = audit.archived_through() + 1;
    let through = audit.next_index() - 2;
    let anchor = audit.get(first - 1).unwrap().unwrap().hash.clone();
    let last = audit.get(through).unwrap().unwrap().hash.clone();
    let hash = rewind_shared::audit::manifest_hash(first, through, &anchor, &last);
    // Refused: an altered hash. Then confirmed, pruned, and the newest flag entry erased.
    let _ = harness.run(CommandKind::ConfirmAuditArchive {
        first,
        through,
        manifest_hash: "ab".repeat(32),
        reason: "s3://audit/2027".into(),
    });
    harness.apply(CommandKind::ConfirmAuditArchive {
        first,
        through,
        manifest_hash: hash,
        reason: "s3://audit/2027".into(),
    });
    harness.apply(CommandKind::PruneAudit {
        through: through - 1,
    });
    let erased = harness.state.audit.next_index() - 3;
    harness.apply(CommandKind::RedactAudit {
        index: erased,
        fields: vec![rewind_shared::audit::Field::Reason],
        reason: "erasure request 2".into(),
    });
    let audit = &harness.state.audit;
    assert_eq!(audit.first_index(), through);
    let store = audit.store();
    assert!(audit.get(through - 1).unwrap().is_none(), "pruned");
    audit.drop_pruned().unwrap();
    assert!(
        store.get(through - 1).unwrap().is_none(),
        "gone from the store once a snapshot covers the pruning"
    );
    assert!(store.get(erased).unwrap().unwrap().reason.is_empty());
    let verification = audit.verify();
    assert_eq!(verification.first_broken, None, "{}", verification.detail);
}

/// From version 8 a pruning moves the changes and rollbacks that ended by its last entry to the
/// archive: at version 7 it moves none.
fn version_eight(harness: &mut Fleet) {
    let through = harness.confirm_archive_all();
    harness.apply(CommandKind::PruneAudit { through });
    assert!(harness.state.archived.is_empty(), "nothing moves at 7");
    harness.apply(CommandKind::SetClusterVersion {
        version: 8,
        members: vec![],
        reason: "every member on this release".into(),
    });
    let changes = harness.state.changes.len() as u64;
    let rollbacks = harness.state.rollbacks.len() as u64;
    // Each service's newest change, which must stay: what a rollback of it reverts.
    let newest: std::collections::BTreeMap<String, u64> = harness
        .state
        .changes
        .values()
        .map(|change| (change.service.clone(), change.number))
        .collect();
    let through = harness.confirm_archive_all();
    harness.apply(CommandKind::PruneAudit { through });
    let archived = harness.state.archived.clone();
    assert!(
        archived.changes > 0 && archived.rollbacks > 0,
        "{archived:?}"
    );
    assert_eq!(
        harness.state.changes.len() as u64 + archived.changes,
        changes
    );
    assert_eq!(
        harness.state.rollbacks.len() as u64 + archived.rollbacks,
        rollbacks
    );
    for (service, number) in newest {
        assert!(
            harness.state.changes.contains_key(&number),
            "{service}'s newest change ch-{number} stays"
        );
    }
    let moved = harness
        .state
        .archived_before(ArchiveKind::Change, u64::MAX, usize::MAX)
        .unwrap();
    assert_eq!(moved.len() as u64, archived.changes);
    assert!(
        moved
            .iter()
            .all(|record| !harness.state.changes.contains_key(&record.number()))
    );
}

const SHARDS: [&str; 2] = ["db-1", "db-2"];

/// Deploys `version` of orders-db applying `migrations`, each stage's transaction committing
/// from fingerprint `fp-<n>` to `fp-<n+1>` as it goes; returns the change.
fn migrated_change(harness: &mut Fleet, version: &str, migrations: &[&str]) -> u64 {
    let Outcome::Change(change) = harness.apply(CommandKind::StartChange(StartChange {
        break_glass: false,
        service: "orders-db".into(),
        version: version.into(),
        host_ids: vec![],
        reason: "release".into(),
        baseline: HealthAggregate::default(),
        flags_on: vec![],
        migrations: migrations
            .iter()
            .map(|migration| ("orders-db".to_string(), migration.to_string()))
            .collect(),
    })) else {
        panic!("a change")
    };
    let stages = harness.state.changes[&change].schema.clone();
    for activate in [false, true] {
        for host in SHARDS {
            let host_id = host.to_string();
            harness.finish(
                if activate {
                    StepTarget::Activate { change, host_id }
                } else {
                    StepTarget::Capture { change, host_id }
                },
                true,
            );
        }
        for (stage, planned) in stages.iter().enumerate() {
            if planned.after_activation == activate {
                harness.apply(CommandKind::StartSchemaTxn {
                    owner: SchemaOwner::Change { change, stage },
                });
                let txn = harness.state.changes[&change].schema[stage].txn;
                let (before, after) = (format!("fp-{}", txn - 1), format!("fp-{txn}"));
                harness.commit_schema_txn(txn, &SHARDS, (&before, &after));
            }
        }
    }
    assert_eq!(
        harness.state.changes[&change].status,
        ChangeStatus::Deployed
    );
    change
}

fn shard_step(rollback: u64, host: &str, kind: RollbackStepKind) -> StepTarget {
    StepTarget::Rollback {
        rollback,
        service: "orders-db".into(),
        host_id: host.into(),
        kind,
    }
}

/// Reverts every host of orders-db in `rollback`'s only wave and passes its gate.
fn revert_shard_hosts(harness: &mut Fleet, rollback: u64) {
    for host in SHARDS {
        for kind in RollbackStepKind::ALL {
            harness.finish(shard_step(rollback, host, kind), true);
        }
    }
    pass_gate(harness, rollback, 0);
}

/// Begins the rollback's schema stage and commits its transaction back to the fingerprint
/// from before the transaction it undoes.
fn revert_schema(harness: &mut Fleet, rollback: u64, stage: usize) -> Result<(), CoordinatorError> {
    harness.run(CommandKind::StartSchemaTxn {
        owner: SchemaOwner::Rollback { rollback, stage },
    })?;
    let planned = harness.state.rollbacks[&rollback].schema[stage].clone();
    let txn = planned.txn;
    let before = harness.state.schema_txns[&(txn - 1)].shards[0]
        .after
        .fingerprint
        .clone();
    harness.commit_schema_txn(txn, &SHARDS, (&before, &planned.expected_fingerprint));
    Ok(())
}

/// From version 9 a rollback reverts contract migrations before its app waves: at 8 the revert
/// waits for the waves, at 9 the waves wait for it.
fn version_nine(harness: &mut Fleet) {
    apply_policy(
        harness,
        "\n[[hosts]]\nnames = [\"db-*\"]\nservices = [\"orders-db\"]\n",
        "shard hosts, no approvals",
    );
    for host in SHARDS {
        harness.register_host(host, "orders-db");
    }
    harness.service("orders-db", &[]);
    for version in ["v1", "v2", "v3"] {
        harness.release("orders-db", version, 0, &[]);
    }
    for (version, class) in [
        ("0001", MigrationClass::Expand),
        ("0002", MigrationClass::Contract),
        ("0003", MigrationClass::Contract),
    ] {
        let (up, down) = (format!("-- up {version}"), format!("-- down {version}"));
        harness.apply(CommandKind::RegisterMigration {
            migration: MigrationRecord {
                database: "orders-db".into(),
                version: version.into(),
                class,
                checksum: migration_checksum(&up, &down, ""),
                up_sql: up,
                down_sql: down,
                verify_sql: String::new(),
                registered_at_ms: 0,
                registered_by: String::new(),
            },
        });
    }
    harness.deploy("orders-db", "v1");

    // At 8: the contract revert waits until every wave passed its gate.
    let change = migrated_change(harness, "v2", &["0001", "0002"]);
    let rollback = harness.must_start_rollback(change, Trigger::Manual);
    let planned = &harness.state.rollbacks[&rollback].schema;
    assert_eq!(planned.len(), 1, "the expand migration stays");
    assert!(planned[0].after_activation);
    let early = revert_schema(harness, rollback, 0).unwrap_err().to_string();
    assert!(early.contains("not due"), "{early}");
    revert_shard_hosts(harness, rollback);
    revert_schema(harness, rollback, 0).unwrap();
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Succeeded
    );

    harness.apply(CommandKind::SetClusterVersion {
        version: 9,
        members: vec![],
        reason: "every member on this release".into(),
    });
    // At 9: the contract revert runs first, and no host step starts before it is done.
    let change = migrated_change(harness, "v3", &["0003"]);
    let rollback = harness.must_start_rollback(change, Trigger::Manual);
    assert!(!harness.state.rollbacks[&rollback].schema[0].after_activation);
    let first_step = StepTarget::Rollback {
        rollback,
        service: "orders-db".into(),
        host_id: "db-1".into(),
        kind: RollbackStepKind::ALL[0],
    };
    let held = harness
        .run(CommandKind::StepStarted {
            step: first_step.clone(),
        })
        .unwrap_err()
        .to_string();
    assert!(
        held.contains("reverts 0003 of orders-db before its app waves, and that is not done"),
        "{held}"
    );
    revert_schema(harness, rollback, 0).unwrap();
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Running
    );
    revert_shard_hosts(harness, rollback);
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Succeeded
    );
}

/// From version 10 a rollback leaves out the hosts it names (a later one reverts them), may be
/// told to overwrite drift, and an automatic one that leaves hosts out calls a person; a host's
/// drift is adopted (audited); a service may declare its drift policy.
fn version_ten(harness: &mut Fleet) {
    let change = harness.deploy("orders-db", "v2");
    let with_options = |trigger, options: PlanOptions| {
        CommandKind::StartRollback(StartRollback {
            options,
            ..match rollback_of(change, trigger) {
                CommandKind::StartRollback(start) => start,
                _ => unreachable!(),
            }
        })
    };
    let leave_out = |host: &str| PlanOptions {
        exclude_hosts: vec![host.into()],
        ..PlanOptions::default()
    };
    let adopt = CommandKind::AdoptHostState {
        host_id: "db-2".into(),
        accepted: vec!["orders-db: config/db.toml: content differs".into()],
        reason: "the hotfix stays".into(),
    };
    let with_topics = |version: &str| CommandKind::RegisterRelease {
        release: ReleaseRecord {
            service: "orders-db".into(),
            produces: [("orders.created".to_string(), 2)].into(),
            ..crate::test_fleet::release(version, 'd')
        },
    };
    let mut overwrite = harness.state.services["orders-db"].clone();
    overwrite.drift_policy = DriftPolicy::Overwrite;
    overwrite.rollback_steps = crate::recipe::parse(
        &[
            "drain",
            "restore",
            "restart",
            "reconcile",
            "clear-client-caches",
            "verify",
            "undrain",
        ]
        .map(String::from),
    )
    .unwrap();
    // At 9: each refused.
    let refused = harness
        .run(with_options(Trigger::Manual, leave_out("db-2")))
        .unwrap_err()
        .to_string();
    assert!(refused.contains("cluster version 10"), "{refused}");
    harness.run(adopt.clone()).unwrap_err();
    harness
        .run(CommandKind::PutService {
            service: overwrite.clone(),
        })
        .unwrap_err();
    harness.run(with_topics("v4")).unwrap_err();
    harness
        .run(CommandKind::IsolateService {
            rollback: 1,
            service: "orders-db".into(),
            reason: "a region out".into(),
            region: "eu".into(),
        })
        .unwrap_err();

    harness.apply(CommandKind::SetClusterVersion {
        version: 10,
        members: vec![],
        reason: "every member on this release".into(),
    });
    // db-2 left out: db-1 alone is reverted.
    let Outcome::Rollback(first) = harness.apply(with_options(Trigger::Manual, leave_out("db-2")))
    else {
        panic!("a rollback")
    };
    let hosts: Vec<&str> = harness.state.rollbacks[&first]
        .steps
        .iter()
        .map(|step| step.host_id.as_str())
        .collect();
    assert!(hosts.iter().all(|host| *host == "db-1"), "{hosts:?}");
    for kind in RollbackStepKind::ALL {
        harness.finish(shard_step(first, "db-1", kind), true);
    }
    pass_gate(harness, first, 0);
    let done = &harness.state.rollbacks[&first];
    assert_eq!(done.status, RollbackStatus::Succeeded);
    assert!(
        done.outcome_detail
            .contains("left out by its plan, as they were: db-2"),
        "{}",
        done.outcome_detail
    );
    // A second rollback of the change reverts what the first left out, wiping its drift.
    let Outcome::Rollback(second) = harness.apply(with_options(
        Trigger::Manual,
        PlanOptions {
            overwrite_drift: true,
            ..PlanOptions::default()
        },
    )) else {
        panic!("a rollback")
    };
    for kind in RollbackStepKind::ALL {
        harness.finish(shard_step(second, "db-2", kind), true);
    }
    pass_gate(harness, second, 0);
    assert_eq!(
        harness.state.rollbacks[&second].status,
        RollbackStatus::Succeeded
    );
    // Nothing is left out now: a third is refused.
    harness
        .run(with_options(Trigger::Manual, PlanOptions::default()))
        .unwrap_err();

    // An automatic rollback that leaves a drifted host out calls a person.
    let change = harness.deploy("orders-db", "v2");
    let escalations = harness.state.escalations.len();
    let Outcome::Rollback(automatic) = harness.apply(CommandKind::StartRollback(StartRollback {
        options: leave_out("db-1"),
        ..match rollback_of(change, Trigger::Automatic) {
            CommandKind::StartRollback(start) => start,
            _ => unreachable!(),
        }
    })) else {
        panic!("a rollback")
    };
    assert_eq!(harness.state.escalations.len(), escalations + 1);
    let escalation = harness.state.rollbacks[&automatic].escalations[0];
    assert!(
        harness.state.escalations[&escalation]
            .evidence
            .contains("left db-1 untouched"),
        "{:?}",
        harness.state.escalations[&escalation]
    );
    // The circuit breaker takes out a region's hosts within max_unavailable, not every host.
    harness.apply(CommandKind::ControlRollback {
        rollback: automatic,
        action: RollbackAction::Pause,
        reason: "look first".into(),
    });
    let region = crate::plan::region_of(&harness.state, "db-2");
    harness.apply(CommandKind::IsolateService {
        rollback: automatic,
        service: "orders-db".into(),
        reason: "take db-2's region out".into(),
        region,
    });
    assert_eq!(
        harness.state.rollbacks[&automatic].waves[0].hosts,
        vec!["db-2"]
    );
    harness.apply(adopt);
    harness.apply(CommandKind::PutService { service: overwrite });
    harness.apply(with_topics("v4"));
}

/// Version 11: a rollback loses a region and reverts it on return; fire drills are started,
/// scored, aborted, and refused where the policy forbids them.
fn version_eleven(harness: &mut Fleet) {
    let step = |rollback, host: &str, kind| StepTarget::Rollback {
        rollback,
        service: "shop".into(),
        host_id: host.into(),
        kind,
    };
    let hosts = "\n[[hosts]]\nnames = [\"db-*\"]\nservices = [\"orders-db\"]\n\
                 [[hosts]]\nnames = [\"shop-*\"]\nservices = [\"shop\"]\n";
    apply_policy(harness, hosts, "shop hosts");
    harness.service("shop", &[]);
    harness.host("shop-1", "north", &["shop"]);
    harness.host("shop-2", "south", &["shop"]);
    harness.host("shop-3", "south", &["shop"]);
    for version in ["v1", "v2"] {
        harness.release("shop", version, 0, &[]);
    }
    harness.deploy("shop", "v1");
    let change = harness.deploy("shop", "v2");
    let Outcome::Rollback(rollback) = harness.apply(rollback_of(change, Trigger::Manual)) else {
        panic!("a rollback")
    };
    let defer = CommandKind::DeferRegion {
        rollback,
        region: "south".into(),
        hosts: vec!["shop-2".into(), "shop-3".into()],
        evidence: "no agent of region south for 10 s".into(),
    };
    let drill = |version: &str, reason: &str| CommandKind::StartFireDrill {
        environment: crate::plan::DEFAULT_ENVIRONMENT.into(),
        start: StartChange {
            service: "shop".into(),
            version: version.into(),
            host_ids: ["shop-1", "shop-2", "shop-3"].map(String::from).to_vec(),
            reason: reason.into(),
            baseline: HealthAggregate::default(),
            flags_on: vec![],
            migrations: vec![],
            break_glass: false,
        },
    };
    // At 10: each refused.
    let refused = harness.run(defer.clone()).unwrap_err().to_string();
    assert!(refused.contains("cluster version 11"), "{refused}");
    harness.run(drill("v2", "too early")).unwrap_err();
    harness.apply(CommandKind::SetClusterVersion {
        version: 11,
        members: vec![],
        reason: "every member on this release".into(),
    });

    // The south is lost before its wave: deferred, the north goes on, the south on return.
    harness.apply(defer);
    // Refused: nothing left to defer.
    harness
        .run(CommandKind::DeferRegion {
            rollback,
            region: "south".into(),
            hosts: vec![],
            evidence: "again".into(),
        })
        .unwrap_err();
    for kind in RollbackStepKind::ALL {
        harness.finish(step(rollback, "shop-1", kind), true);
    }
    pass_gate(harness, rollback, 0);
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Running,
        "waits for the south"
    );
    for host in ["shop-2", "shop-3"] {
        for kind in RollbackStepKind::ALL {
            harness.finish(step(rollback, host, kind), true);
        }
    }
    let done = &harness.state.rollbacks[&rollback];
    assert_eq!(done.status, RollbackStatus::Succeeded);
    assert!(
        done.outcome_detail
            .contains("reverted after their region returned: shop-2, shop-3"),
        "{}",
        done.outcome_detail
    );

    // Refused while shop does not roll back on its own.
    let mut service = harness.state.services["shop"].clone();
    service.policy.auto_rollback = false;
    harness.apply(CommandKind::PutService {
        service: service.clone(),
    });
    harness.run(drill("v2", "not automatic")).unwrap_err();
    service.policy.auto_rollback = true;
    harness.apply(CommandKind::PutService { service });
    // A drill detected and rolled back passes.
    let Outcome::FireDrill(first) = harness.apply(drill("v2", "game day")) else {
        panic!("a drill")
    };
    let drilled = harness.state.fire_drills[&first].change;
    for capture in [true, false] {
        for host in ["shop-1", "shop-2", "shop-3"] {
            let host_id = host.to_string();
            harness.finish(
                if capture {
                    StepTarget::Capture {
                        change: drilled,
                        host_id,
                    }
                } else {
                    StepTarget::Activate {
                        change: drilled,
                        host_id,
                    }
                },
                true,
            );
        }
    }
    // Refused: it has not ended.
    harness
        .run(CommandKind::FinishFireDrill { drill: first })
        .unwrap_err();
    let Outcome::Rollback(reverting) = harness.apply(rollback_of(drilled, Trigger::Automatic))
    else {
        panic!("a rollback")
    };
    for (wave, hosts) in [(0, &["shop-1"][..]), (1, &["shop-2", "shop-3"][..])] {
        for host in hosts {
            for kind in RollbackStepKind::ALL {
                harness.finish(step(reverting, host, kind), true);
            }
        }
        pass_gate(harness, reverting, wave);
    }
    harness.apply(CommandKind::FinishFireDrill { drill: first });
    assert_eq!(
        harness.state.fire_drills[&first].status,
        FireDrillStatus::Passed,
        "{}",
        harness.state.fire_drills[&first].outcome
    );
    // Forbidden by the policy; then allowed again, started and aborted.
    apply_policy(
        harness,
        &format!("{hosts}[environment.default]\ndrills = false\n"),
        "no drills",
    );
    let refused = harness
        .run(drill("v2", "forbidden"))
        .unwrap_err()
        .to_string();
    assert!(refused.contains("forbids drills"), "{refused}");
    apply_policy(harness, hosts, "drills again");
    let Outcome::FireDrill(second) = harness.apply(drill("v2", "abort me")) else {
        panic!("a drill")
    };
    harness.apply(CommandKind::AbortFireDrill {
        drill: second,
        reason: "a real incident".into(),
    });
    assert_eq!(
        harness.state.fire_drills[&second].status,
        FireDrillStatus::Aborted
    );
}

/// From version 12 a rollback's gate may settle for a time in milliseconds.
fn version_twelve(harness: &mut Fleet) {
    let hosts = "\n[[hosts]]\nnames = [\"db-*\"]\nservices = [\"orders-db\"]\n\
                 [[hosts]]\nnames = [\"shop-*\"]\nservices = [\"shop\"]\n\
                 [[hosts]]\nnames = [\"cart-*\"]\nservices = [\"cart\"]\n";
    apply_policy(harness, hosts, "cart hosts");
    harness.service("cart", &[]);
    harness.host("cart-1", "north", &["cart"]);
    harness.host("cart-2", "south", &["cart"]);
    harness.host("cart-3", "south", &["cart"]);
    for version in ["v1", "v2"] {
        harness.release("cart", version, 0, &[]);
    }
    harness.deploy("cart", "v1");
    let change = harness.deploy("cart", "v2");
    let mut quick = rollback_of(change, Trigger::Manual);
    if let CommandKind::StartRollback(StartRollback { options, .. }) = &mut quick {
        options.max_parallel = 2;
        options.gate.settle_s = 1;
        options.gate.settle_ms = 300;
    }
    // At 11: refused.
    let refused = harness.run(quick.clone()).unwrap_err().to_string();
    assert!(refused.contains("cluster version 12"), "{refused}");
    harness.apply(CommandKind::SetClusterVersion {
        version: 12,
        members: vec![],
        reason: "every member on this release".into(),
    });
    let Outcome::Rollback(rollback) = harness.apply(quick) else {
        panic!("a rollback")
    };
    assert_eq!(
        harness.state.rollbacks[&rollback].options.gate.settle_ms(),
        300
    );
    for (wave, hosts) in [(0, &["cart-1"][..]), (1, &["cart-2", "cart-3"][..])] {
        for host in hosts {
            for kind in RollbackStepKind::ALL {
                harness.finish(
                    StepTarget::Rollback {
                        rollback,
                        service: "cart".into(),
                        host_id: host.to_string(),
                        kind,
                    },
                    true,
                );
            }
        }
        pass_gate(harness, rollback, wave);
    }
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Succeeded
    );
}

/// From version 13 a rollback step's success starts its host's next step of the wave in the
/// same entry; a failure, or a rollback that is not running, starts nothing.
fn version_thirteen(harness: &mut Fleet) {
    let cart = |rollback: u64, host: &str, kind: RollbackStepKind| StepTarget::Rollback {
        rollback,
        service: "cart".into(),
        host_id: host.into(),
        kind,
    };
    let status = |harness: &Fleet, step: &StepTarget| {
        let StepTarget::Rollback {
            rollback,
            host_id,
            kind,
            ..
        } = step
        else {
            unreachable!()
        };
        harness.rollback_step_progress(*rollback, host_id, *kind)
    };
    let change = harness.deploy("cart", "v2");
    let Outcome::Rollback(rollback) = harness.apply(rollback_of(change, Trigger::Manual)) else {
        panic!("a rollback")
    };
    // At 12 the next step waits for the engine.
    harness.finish(cart(rollback, "cart-1", RollbackStepKind::Drain), true);
    let restore = cart(rollback, "cart-1", RollbackStepKind::Restore);
    assert_eq!(status(harness, &restore), (StepStatus::Pending, 0));
    harness.apply(CommandKind::SetClusterVersion {
        version: 13,
        members: vec![],
        reason: "every member on this release".into(),
    });
    harness.apply(CommandKind::StepStarted {
        step: restore.clone(),
    });
    harness.apply(CommandKind::StepFinished {
        step: restore,
        ok: true,
        detail: "restored".into(),
        snapshot_id: String::new(),
    });
    let restart = cart(rollback, "cart-1", RollbackStepKind::Restart);
    assert_eq!(status(harness, &restart), (StepStatus::Running, 1));
    let outcome = harness
        .state
        .audit
        .entries()
        .last()
        .unwrap()
        .outcome
        .clone();
    assert!(
        outcome.contains("restored; started ") && outcome.contains("restart"),
        "{outcome}"
    );
    for kind in [
        RollbackStepKind::Restart,
        RollbackStepKind::Verify,
        RollbackStepKind::Undrain,
    ] {
        harness.finish(cart(rollback, "cart-1", kind), true);
    }
    pass_gate(harness, rollback, 0);
    // A failure starts nothing; a host begun before it is taken to the end of its steps (as the
    // engine takes it), until a person pauses the rollback.
    harness.finish(cart(rollback, "cart-3", RollbackStepKind::Drain), true);
    harness.finish(cart(rollback, "cart-2", RollbackStepKind::Drain), false);
    assert_eq!(
        status(
            harness,
            &cart(rollback, "cart-2", RollbackStepKind::Restore)
        ),
        (StepStatus::Pending, 0)
    );
    harness.finish(cart(rollback, "cart-3", RollbackStepKind::Restore), true);
    assert_eq!(
        status(
            harness,
            &cart(rollback, "cart-3", RollbackStepKind::Restart)
        ),
        (StepStatus::Running, 1)
    );
    harness.apply(CommandKind::ControlRollback {
        rollback,
        action: RollbackAction::Pause,
        reason: "look at cart-2".into(),
    });
    harness.finish(cart(rollback, "cart-3", RollbackStepKind::Restart), true);
    assert_eq!(
        status(harness, &cart(rollback, "cart-3", RollbackStepKind::Verify)),
        (StepStatus::Pending, 0)
    );
    assert_eq!(
        harness.state.rollbacks[&rollback].status,
        RollbackStatus::Paused
    );
    harness.apply(CommandKind::ControlRollback {
        rollback,
        action: RollbackAction::Abort,
        reason: "done with the scenario".into(),
    });
}

#[test]
fn the_current_release_scenario_does_what_it_says() {
    // Its assertions (what is refused, what starts) hold on every build, not only when written.
    let harness = current_release_log();
    assert_eq!(harness.state.cluster_version(), version::CURRENT);
}

#[test]
fn every_golden_log_replays_to_its_recorded_state_and_audit_head() {
    let current = golden_dir().join(format!("v{}.json.zst", version::CURRENT));
    if std::env::var_os("REWIND_WRITE_GOLDEN").is_some() {
        assert!(
            !current.exists(),
            "{} exists: a golden log is never rewritten (a new release adds one)",
            current.display()
        );
        let harness = current_release_log();
        let entries: Vec<GoldenEntry> = harness
            .log
            .iter()
            .map(|(index, data)| GoldenEntry {
                index: *index,
                data: String::from_utf8(data.clone()).expect("entries are JSON text"),
            })
            .collect();
        let (state_digest, audit_head, audit_entries, audit_digest, archive_digest) =
            replay(0, &entries);
        let golden = GoldenLog {
            release: env!("CARGO_PKG_VERSION").into(),
            initial_cluster_version: 0,
            entries,
            state_digest,
            audit_head,
            audit_entries,
            audit_digest,
            archive_digest,
        };
        std::fs::create_dir_all(golden_dir()).unwrap();
        let text = serde_json::to_string_pretty(&golden).unwrap() + "\n";
        std::fs::write(&current, zstd::encode_all(text.as_bytes(), 19).unwrap()).unwrap();
        panic!(
            "wrote {}: commit it and run again without REWIND_WRITE_GOLDEN",
            current.display()
        );
    }
    for version in version::LEGACY..=version::CURRENT {
        let path = golden_dir().join(format!("v{version}.json.zst"));
        assert!(
            path.exists(),
            "no golden log for cluster version {version} ({}): each release adds its own \
             (REWIND_WRITE_GOLDEN=1 cargo test -p rewind-coordinator golden) and none is removed",
            path.display()
        );
    }
    let mut replayed = 0;
    for file in std::fs::read_dir(golden_dir()).unwrap() {
        let path = file.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        let text = if name.ends_with(".json.zst") {
            // Large logs (the request log's capacity crossed) are kept compressed.
            zstd::decode_all(bytes.as_slice()).unwrap()
        } else if name.ends_with(".json") {
            bytes
        } else {
            panic!("{name}: golden logs are v<N>.json.zst (or .json)");
        };
        let golden: GoldenLog = serde_json::from_slice(&text).unwrap();
        let (state_digest, audit_head, audit_entries, audit_digest, archive_digest) =
            replay(golden.initial_cluster_version, &golden.entries);
        // Files before version 7's do not record the entries' digest (their state covers
        // them), nor files before version 8's the archive's.
        let recorded = |digest: String, golden: &str| {
            if golden.is_empty() {
                String::new()
            } else {
                digest
            }
        };
        let audit_digest = recorded(audit_digest, &golden.audit_digest);
        let archive_digest = recorded(archive_digest, &golden.archive_digest);
        assert_eq!(
            (
                state_digest,
                audit_head,
                audit_entries,
                audit_digest,
                archive_digest
            ),
            (
                golden.state_digest,
                golden.audit_head,
                golden.audit_entries,
                golden.audit_digest,
                golden.archive_digest
            ),
            "{} (written by release {}) replays differently: a change to apply() must be gated \
             on a new cluster version",
            path.display(),
            golden.release
        );
        replayed += 1;
    }
    assert!(replayed > version::CURRENT - version::LEGACY);
}
