//! Hosts, services, releases, migrations, the access policy and the cluster version.

use super::*;

/// Puts `policy` in force, audited with the hashes before and after and what changed.
pub(super) fn apply_policy(
    state: &mut State,
    policy: &crate::access::Policy,
    bootstrap: bool,
    expected_hash: &str,
    reason: &str,
) -> Result<(Outcome, String, String)> {
    let before = state.access.policy.clone();
    if bootstrap && before.is_some() {
        // Every member proposes its bootstrap policy when it first leads; the first one wins.
        return Ok((
            Outcome::Done,
            "access-policy".into(),
            "ignored: the cluster has a policy already".into(),
        ));
    }
    let before_hash = before
        .as_ref()
        .map(|policy| policy.hash())
        .unwrap_or_default();
    if !expected_hash.is_empty() && expected_hash != before_hash {
        return Err(CoordinatorError::PolicyChanged {
            expected: expected_hash.to_string(),
            actual: before_hash,
        });
    }
    // Checked again here so no log entry can leave the cluster without an administrator.
    if let Err(problems) = policy.validate() {
        return Err(CoordinatorError::invalid("policy", problems.join("; ")));
    }
    let summary = match &before {
        Some(before) => crate::access::policy::summarize_change(before, policy),
        None => "the first policy".to_string(),
    };
    state.access.policy = Some(std::sync::Arc::new(policy.clone()));
    state.access.version += 1;
    Ok((
        Outcome::Done,
        "access-policy".into(),
        format!(
            "ok: version {}, sha256 {} -> {}: {summary}: {reason}",
            state.access.version,
            if before_hash.is_empty() {
                "none"
            } else {
                &before_hash[..12]
            },
            &policy.hash()[..12],
        ),
    ))
}

pub(super) fn check_no_cycle(state: &State, service: &ServiceRecord) -> Result<()> {
    let mut graph = crate::plan::dependency_graph(state);
    graph.insert(service.name.clone(), service.depends_on.clone());
    match crate::plan::cycle_through(&graph, &service.name) {
        Some(cycle) => Err(CoordinatorError::DependencyCycle {
            service: service.name.clone(),
            path: cycle.join(" -> "),
        }),
        None => Ok(()),
    }
}

/// Registers a migration once; the same one again is a no-op, a different one under a version
/// already taken is refused (registered migrations are immutable: give it a new version).
pub(super) fn register_migration(
    state: &mut State,
    migration: &MigrationRecord,
    identity: &str,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    let target = format!("{}@{}", migration.database, migration.version);
    if migration.down_sql.trim().is_empty() {
        return Err(CoordinatorError::invalid(
            "migration.down_sql",
            format!("{target} has no down script: a migration that cannot be undone is refused"),
        ));
    }
    let checksum = migration_checksum(
        &migration.up_sql,
        &migration.down_sql,
        &migration.verify_sql,
    );
    if migration.checksum != checksum {
        return Err(CoordinatorError::invalid(
            "migration.checksum",
            format!(
                "{target}: {} does not match its scripts ({checksum})",
                migration.checksum
            ),
        ));
    }
    let script_bytes = |record: &MigrationRecord| {
        record.up_sql.len() + record.down_sql.len() + record.verify_sql.len()
    };
    let held: usize = state
        .migrations
        .values()
        .flat_map(|versions| versions.values())
        .map(|record| script_bytes(record))
        .sum();
    let already = state
        .migrations
        .get(&migration.database)
        .is_some_and(|versions| versions.contains_key(&migration.version));
    if !already && held + script_bytes(migration) > MAX_REGISTRY_SCRIPT_BYTES {
        return Err(CoordinatorError::invalid(
            "migration",
            format!(
                "{target}: the registry already holds {held} bytes of scripts and takes at most \
                 {MAX_REGISTRY_SCRIPT_BYTES} (it is replicated state)"
            ),
        ));
    }
    let versions = state
        .migrations
        .entry(migration.database.clone())
        .or_default();
    if let Some(existing) = versions.get(&migration.version) {
        if existing.checksum == migration.checksum && existing.class == migration.class {
            return Ok((Outcome::Done, target, "ok: already registered".into()));
        }
        return Err(CoordinatorError::invalid(
            "migration.version",
            format!(
                "{target} is already registered with checksum {} ({}): a registered migration \
                 never changes; register the new scripts under a new version",
                existing.checksum,
                existing.class.name()
            ),
        ));
    }
    versions.insert(
        migration.version.clone(),
        std::sync::Arc::new(MigrationRecord {
            registered_at_ms: at_ms,
            registered_by: identity.to_string(),
            ..migration.clone()
        }),
    );
    Ok((
        Outcome::Done,
        target,
        format!("ok: {} {}", migration.class.name(), migration.checksum),
    ))
}

pub(super) fn register_release(
    state: &mut State,
    release: &ReleaseRecord,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    require_service(state, &release.service)?;
    if release.declares_topics() {
        version::require(state, version::MESSAGE_TOPICS, "a release's message topics")?;
    }
    let target = format!("{}@{}", release.service, release.version);
    let versions = state.releases.entry(release.service.clone()).or_default();
    if let Some(existing) = versions.get(&release.version) {
        if existing.artifact_digest == release.artifact_digest && existing.commit == release.commit
        {
            return Ok((Outcome::Done, target, "ok: already registered".into()));
        }
        return Err(CoordinatorError::ReleaseConflict {
            service: release.service.clone(),
            version: release.version.clone(),
            existing: existing.artifact_digest.clone(),
        });
    }
    versions.insert(
        release.version.clone(),
        std::sync::Arc::new(ReleaseRecord {
            registered_at_ms: at_ms,
            ..release.clone()
        }),
    );
    Ok((
        Outcome::Done,
        target,
        format!("ok: {}", release.artifact_digest),
    ))
}

/// The service and its release `version` are registered.
pub(super) fn require_release(state: &State, service: &str, version: &str) -> Result<()> {
    require_service(state, service)?;
    let versions = state.releases.get(service);
    if !versions.is_some_and(|versions| versions.contains_key(version)) {
        return Err(CoordinatorError::UnknownRelease {
            service: service.to_string(),
            version: version.to_string(),
            known: known_list(
                versions
                    .into_iter()
                    .flat_map(|versions| versions.keys().cloned()),
            ),
        });
    }
    Ok(())
}

/// The services a host may register: with `[[hosts]]` rules, those they assign; without, those
/// it registered with before. The leader says so first, with the way out; this holds it on
/// every member, whatever state the leader read.
pub(super) fn check_service_pin(state: &State, host_id: &str, services: &[String]) -> Result<()> {
    if let Some(policy) = state
        .access
        .policy
        .as_ref()
        .filter(|policy| !policy.host_rules.is_empty())
    {
        return match services
            .iter()
            .find(|service| !policy.may_run(host_id, service))
        {
            Some(service) => Err(CoordinatorError::invalid(
                "services",
                format!(
                    "host {host_id} may not run service {service}: no [[hosts]] rule of the \
                     access policy assigns it"
                ),
            )),
            None => Ok(()),
        };
    }
    let Some(known) = state.hosts.get(host_id) else {
        return Ok(());
    };
    match services
        .iter()
        .find(|service| !known.services.contains(service))
    {
        Some(service) => Err(CoordinatorError::invalid(
            "services",
            format!(
                "host {host_id} is registered with services {} and may not add {service}: an \
                 admin forgets the host first (rewindctl host forget {host_id} --reason ...)",
                known.services.join(",")
            ),
        )),
        None => Ok(()),
    }
}

/// Raises the cluster version. A version this binary cannot apply never gets here: the member
/// stops before applying the entry (`version::check_command`).
pub(super) fn set_cluster_version(
    state: &mut State,
    to: u32,
    asked: &[u64],
    reason: &str,
) -> Result<(Outcome, String, String)> {
    let members: Vec<u64> = state.members.keys().copied().collect();
    if asked != members {
        return Err(CoordinatorError::invalid(
            "members",
            format!(
                "the members changed since they were asked (asked {asked:?}, now {members:?}): \
                 ask again"
            ),
        ));
    }
    let running = state.cluster_version();
    if to <= running {
        return Err(CoordinatorError::invalid(
            "version",
            format!("the cluster already runs version {running}; a version is only raised"),
        ));
    }
    state.cluster_version = to;
    if to >= version::AUDIT_STORE {
        // Every member moves its entries at this same entry of the log.
        state.audit.move_to_store();
    }
    Ok((
        Outcome::Done,
        "cluster".into(),
        format!("ok: cluster version {running} -> {to}: {reason}"),
    ))
}

/// Removes `host_id` from the fleet's record (and, with `release_name`, its enrollment), unless
/// something could still act on it by name: a change in progress or the latest change of one of
/// its services while that can still be rolled back (a rollback would restore it, judged
/// without its environment), a rollback in progress, or a schema transaction or drill on it.
pub(super) fn forget_host(
    state: &mut State,
    host_id: &str,
    release_name: bool,
    reason: &str,
) -> Result<(Outcome, String, String)> {
    let record = state.hosts.get(host_id);
    let enrolled = state.enrollments.contains_key(host_id);
    if record.is_none() && !(release_name && enrolled) {
        return Err(CoordinatorError::UnknownHost {
            host_id: host_id.to_string(),
        });
    }
    let in_use = |by: String| CoordinatorError::HostInUse {
        host_id: host_id.to_string(),
        by,
    };
    for change in state.changes.values() {
        if !change.hosts.iter().any(|host| host.host_id == host_id) {
            continue;
        }
        if matches!(
            change.status,
            ChangeStatus::Capturing | ChangeStatus::Deploying
        ) {
            return Err(in_use(format!(
                "change {}, still in progress: let it finish",
                change_id(change.number)
            )));
        }
        // As the planner judges it: a rollback of this change could start now and would act
        // on the host.
        if crate::plan::revertible_change(state, change.number, Trigger::Manual).is_ok()
            && crate::plan::revertible_hosts(change).any(|host| host == host_id)
        {
            return Err(in_use(format!(
                "change {} of {}, which a rollback would still restore there: roll it back, or \
                 deploy a newer change of {} to its other hosts",
                change_id(change.number),
                change.service,
                change.service
            )));
        }
    }
    let in_rollback = state.rollbacks.values().find(|rollback| {
        !rollback.status.is_terminal()
            && rollback
                .waves
                .iter()
                .any(|wave| wave.hosts.iter().any(|host| host == host_id))
    });
    if let Some(rollback) = in_rollback {
        return Err(in_use(format!(
            "rollback {}, still in progress: let it finish or abort it",
            rollback_id(rollback.number)
        )));
    }
    let in_schema = state.schema_txns.values().find(|txn| {
        txn.status != SchemaTxnStatus::Done
            && txn.shards.iter().any(|shard| shard.host_id == host_id)
    });
    if let Some(txn) = in_schema {
        return Err(in_use(format!(
            "schema transaction {}, still in progress: let it finish or resolve it by hand",
            schema_txn_id(txn.number)
        )));
    }
    let services = record.map(|host| host.services.clone()).unwrap_or_default();
    state.hosts.remove(host_id);
    let released = release_name && state.enrollments.remove(host_id).is_some();
    let listed = if services.is_empty() {
        "none".to_string()
    } else {
        services.join(",")
    };
    let name = if released {
        "; its name released for joining anew"
    } else {
        ""
    };
    Ok((
        Outcome::HostForgotten {
            services,
            name_released: released,
        },
        host_id.to_string(),
        format!("ok: forgotten (services {listed}){name}: {reason}"),
    ))
}

/// Records a host's offline self-revert on the change it reverted (once per report id) and
/// audits it. A report of a change this cluster does not know is audited all the same.
pub(super) fn record_self_revert(
    state: &mut State,
    host_id: &str,
    report: &SelfRevertNote,
) -> Result<(Outcome, String, String)> {
    if !state.hosts.contains_key(host_id) {
        return Err(CoordinatorError::UnknownHost {
            host_id: host_id.to_string(),
        });
    }
    let outcome = if report.ok {
        "reverted"
    } else {
        "tried to revert"
    };
    let mut message = format!(
        "ok: {host_id} {outcome} {} of {} to {} on its own ({}); {}",
        report.change_id, report.service, report.snapshot_id, report.evidence, report.detail
    );
    let change = parse_numbered_id("ch", &report.change_id)
        .and_then(|number| state.changes.get_mut(&number))
        .filter(|change| change.service == report.service);
    match change.and_then(|change| change.hosts.iter_mut().find(|host| host.host_id == host_id)) {
        Some(host)
            if host
                .self_reverted
                .as_ref()
                .is_some_and(|known| known.id == report.id) =>
        {
            message += " (already recorded)";
        }
        Some(host) => host.self_reverted = Some(report.clone()),
        None => message += "; this cluster has no such change on that host",
    }
    Ok((Outcome::Done, format!("{host_id}/{}", report.id), message))
}
