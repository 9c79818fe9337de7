//! The schema half of a plan: which migrations a rollback reverts, on which database, in which
//! order, and whether before the app waves or after them.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use super::*;
use crate::state_machine::version;

/// What one change applied on one database and its rollback may revert: its committed stages
/// there in the order they ran, what each reverts, and what the plan notes.
pub(super) struct Applied<'a> {
    change: &'a ChangeRecord,
    database: &'a str,
    /// The change's stages on this database that decided to commit (done, or still resolving:
    /// the revert waits for it), oldest first, with their transactions.
    stages: Vec<(&'a SchemaStage, &'a SchemaTxnRecord)>,
    /// The versions to revert (expand ones kept unless asked, and none an earlier rollback of
    /// the change already reverted).
    reverted: BTreeSet<&'a str>,
}

/// The migrations a change applied that its rollback reverts, per database. Expand migrations
/// stay unless `revert_expand`: the old app works with them, and the plan says so.
pub(super) fn applied_migrations<'a>(
    state: &'a State,
    change: &'a ChangeRecord,
    options: &PlanOptions,
    notes: &mut Vec<String>,
) -> Vec<Applied<'a>> {
    let mut databases: Vec<&str> = Vec::new();
    for stage in &change.schema {
        if !databases.contains(&stage.database.as_str()) {
            databases.push(&stage.database);
        }
    }
    let mut found = Vec::new();
    for database in databases {
        let mut stages: Vec<(&SchemaStage, &SchemaTxnRecord)> = change
            .schema
            .iter()
            .filter(|stage| stage.database == database)
            .filter_map(|stage| Some((stage, state.schema_txns.get(&stage.txn)?)))
            .filter(|(_, txn)| {
                txn.decision
                    .as_ref()
                    .is_some_and(|decision| decision.commit)
            })
            .collect();
        // In the order they ran (a change's stages are kept in the order its migrations were
        // named, and an expand stage runs before a contract one named earlier).
        stages.sort_by_key(|(_, txn)| txn.number);
        // What an earlier rollback of this change (aborted after its schema revert committed)
        // already reverted is not reverted again.
        let already: BTreeSet<&str> = state
            .schema_txns
            .values()
            .filter(|txn| txn.down && txn.database == database)
            .filter(|txn| {
                txn.decision
                    .as_ref()
                    .is_some_and(|decision| decision.commit)
            })
            .filter(|txn| match txn.owner {
                SchemaOwner::Rollback { rollback, .. } => state
                    .rollbacks
                    .get(&rollback)
                    .is_some_and(|record| record.changes.contains(&change.number)),
                _ => false,
            })
            .flat_map(|txn| txn.migrations.iter().map(String::as_str))
            .collect();
        let is_expand = |version: &str| {
            state
                .migrations
                .get(database)
                .and_then(|versions| versions.get(version))
                .is_some_and(|migration| migration.class == MigrationClass::Expand)
        };
        let all = stages.iter().flat_map(|(stage, _)| stage.versions.iter());
        let reverted: BTreeSet<&str> = all
            .clone()
            .filter(|version| options.revert_expand || !is_expand(version))
            .filter(|version| !already.contains(version.as_str()))
            .map(String::as_str)
            .collect();
        let kept: Vec<&str> = all
            .filter(|version| !options.revert_expand && is_expand(version))
            .map(String::as_str)
            .collect();
        if !kept.is_empty() {
            notes.push(format!(
                "expand migration{} {} of {database} ({}) stay{}: the old app works with them, so \
                 reverting the app is enough (--revert-expand reverts them too)",
                if kept.len() == 1 { "" } else { "s" },
                kept.join(", "),
                change.id(),
                if kept.len() == 1 { "s" } else { "" },
            ));
        }
        found.push(Applied {
            change,
            database,
            stages,
            reverted,
        });
    }
    found
}

/// The schema stages of a rollback: per database, what was applied last is reverted first.
/// Usually that is one stage per change and database, newer changes first, each reverting the
/// change's migrations there newest first in one transaction. When changes' migrations on a
/// database interleaved (one change's contract ran after another change's migrations), each
/// change's stages are cut where another change's ran, so the reverts still go newest first.
///
/// Where they sit: before cluster version 9 every revert runs after the app waves. From 9
/// (`version::SCHEMA_ORDER_BY_CLASS`) a change's contract and data migrations (the stage it ran
/// after activation) are reverted in a stage of their own before any wave, as the release the
/// waves restore needs what they removed, and its expand ones after the waves, as the release
/// being reverted needs what they added until its hosts are reverted. A contract revert that
/// would have to wait for an expand one applied after it on the same database, or that every
/// shard will refuse (a migration applied after it stays), stays after the waves, and the plan
/// says so; `all_after_waves` (`--schema-after-waves`) puts every revert there.
pub(super) fn schema_reverts(
    state: &State,
    applied: &[Applied<'_>],
    all_after_waves: bool,
    notes: &mut Vec<String>,
) -> Vec<SchemaStage> {
    // Runs of stages to revert together: (position of the change and database, stages).
    let mut runs: Vec<(usize, Vec<(&SchemaStage, &SchemaTxnRecord)>)> = Vec::new();
    // Databases whose reverts do not simply follow change order.
    let mut reordered: BTreeSet<&str> = BTreeSet::new();
    let mut databases: Vec<&str> = applied.iter().map(|each| each.database).collect();
    databases.sort_unstable();
    databases.dedup();
    for database in databases {
        let here: Vec<(usize, &Applied<'_>)> = applied
            .iter()
            .enumerate()
            .filter(|(_, each)| each.database == database)
            .collect();
        let span = |each: &Applied<'_>| {
            let numbers = each.stages.iter().map(|(_, txn)| txn.number);
            (numbers.clone().min(), numbers.max())
        };
        // Two changes' transactions overlap (interleaved), or an older change's all ran after a
        // newer one's (out of order): either way, change order is not the order to revert in.
        let (mut interleaved, mut out_of_order) = (false, false);
        for (i, (_, one)) in here.iter().enumerate() {
            for (_, other) in &here[i + 1..] {
                let ((Some(a0), Some(a1)), (Some(b0), Some(b1))) = (span(one), span(other)) else {
                    continue;
                };
                if a0 <= b1 && b0 <= a1 {
                    interleaved = true;
                } else if (one.change.number > other.change.number) != (a0 > b1) {
                    out_of_order = true;
                }
            }
        }
        if interleaved || out_of_order {
            reordered.insert(database);
        }
        if !interleaved {
            runs.extend(here.iter().map(|(at, each)| (*at, each.stages.clone())));
            continue;
        }
        // Newest first across the changes, cut wherever the change differs.
        let mut stages: Vec<(usize, (&SchemaStage, &SchemaTxnRecord))> = here
            .iter()
            .flat_map(|(at, each)| each.stages.iter().map(move |stage| (*at, *stage)))
            .collect();
        stages.sort_by_key(|(_, (_, txn))| std::cmp::Reverse(txn.number));
        let mut cut: Vec<(usize, Vec<(&SchemaStage, &SchemaTxnRecord)>)> = Vec::new();
        for (at, stage) in stages {
            match cut.last_mut() {
                Some((last, run)) if *last == at => run.insert(0, stage),
                _ => cut.push((at, vec![stage])),
            }
        }
        runs.extend(cut);
    }
    let by_class = state.cluster_version() >= version::SCHEMA_ORDER_BY_CLASS && !all_after_waves;
    if by_class {
        runs = runs
            .into_iter()
            .flat_map(|(at, run)| {
                run.chunk_by(|one, other| one.0.after_activation == other.0.after_activation)
                    .map(|part| (at, part.to_vec()))
                    .collect::<Vec<_>>()
            })
            .collect();
    }
    let mut reverts: Vec<(usize, u64, SchemaStage)> = runs
        .into_iter()
        .filter_map(|(at, run)| {
            let newest = run.iter().map(|(_, txn)| txn.number).max()?;
            // Everything this plan reverts on the run's database, whichever change applied it.
            let planned: BTreeSet<&str> = applied
                .iter()
                .filter(|each| each.database == applied[at].database)
                .flat_map(|each| each.reverted.iter().copied())
                .collect();
            let (mut stage, refused) = revert_stage(state, &applied[at], &run, &planned, notes)?;
            // The change ran these after activation: contract or data migrations. One every
            // shard will refuse (a later migration stays) would stop the rollback before any
            // host: it waits after the waves, where the app is reverted whatever it does.
            stage.after_activation = !(by_class && run[0].0.after_activation && !refused);
            Some((at, newest, stage))
        })
        .collect();
    // Newer changes first (each change's databases in the order it used them, and a change's
    // reverts on one database newest first), as plans always were; then, within each reordered
    // database, whatever was applied last goes first.
    reverts.sort_by_key(|(at, newest, _)| {
        (
            std::cmp::Reverse(applied[*at].change.number),
            *at,
            std::cmp::Reverse(*newest),
        )
    });
    let mut by_database: BTreeMap<String, Vec<(u64, SchemaStage)>> = BTreeMap::new();
    let mut slots = Vec::new();
    for (_, newest, stage) in reverts {
        slots.push(stage.database.clone());
        by_database
            .entry(stage.database.clone())
            .or_default()
            .push((newest, stage));
    }
    for (database, stages) in by_database.iter_mut() {
        if reordered.contains(database.as_str()) {
            // Popping takes the newest first.
            stages.sort_by_key(|(newest, _)| *newest);
        } else {
            // Popping keeps the change order.
            stages.reverse();
        }
    }
    let mut ordered: Vec<SchemaStage> = slots
        .into_iter()
        .filter_map(|database| Some(by_database.get_mut(&database)?.pop()?.1))
        .collect();
    if by_class {
        hold_behind_later_expands(&mut ordered, notes);
        // Stable: each database's reverts keep their order.
        ordered.sort_by_key(|stage| stage.after_activation);
    }
    ordered
}

/// Each database's reverts run newest first, so one placed before the app waves cannot wait
/// for one after them: a contract revert older than an expand revert on its database moves
/// after the waves too, with a note.
fn hold_behind_later_expands(ordered: &mut [SchemaStage], notes: &mut Vec<String>) {
    // Database -> the first revert placed after the waves.
    let mut after_waves: BTreeMap<String, String> = BTreeMap::new();
    for stage in ordered.iter_mut() {
        if let Some(later) = after_waves.get(&stage.database) {
            if !stage.after_activation {
                stage.after_activation = true;
                notes.push(format!(
                    "{} of {} ({}) is reverted after the app waves, not before them as a \
                     contract or data migration would be: {later}, applied after it, is \
                     reverted first, and only after the waves",
                    stage.versions.join(", "),
                    stage.database,
                    change_id(stage.change),
                ));
            }
        } else if stage.after_activation {
            after_waves.insert(stage.database.clone(), stage.versions.join(", "));
        }
    }
}

/// One revert of `run`, some of a change's stages on a database (oldest first): their versions
/// newest first, less those kept. It expects the fingerprint recorded before the first stage it
/// undoes in full; it only checks agreement when it undoes part of one. True besides when a
/// migration applied after it stays, so every shard will refuse it (the plan notes it).
fn revert_stage(
    state: &State,
    applied: &Applied<'_>,
    run: &[(&SchemaStage, &SchemaTxnRecord)],
    planned: &BTreeSet<&str>,
    notes: &mut Vec<String>,
) -> Option<(SchemaStage, bool)> {
    let versions: Vec<String> = run
        .iter()
        .flat_map(|(stage, _)| stage.versions.iter())
        .rev()
        .filter(|version| applied.reverted.contains(version.as_str()))
        .cloned()
        .collect();
    if versions.is_empty() {
        return None;
    }
    let reverted: BTreeSet<&str> = versions.iter().map(String::as_str).collect();
    let first_undone = (0..run.len()).find(|&first| {
        let undone: BTreeSet<&str> = run[first..]
            .iter()
            .flat_map(|(stage, _)| stage.versions.iter().map(String::as_str))
            .collect();
        undone == reverted
    });
    let expected_fingerprint = first_undone
        .map(|first| run[first].1.fingerprint_before.clone())
        .unwrap_or_default();
    let change = applied.change;
    // A migration applied after the oldest one reverted here that this plan leaves applied
    // (another change's, not rolled back, or an expand kept) makes every shard refuse the
    // revert at check: say so in the plan, before anyone starts it.
    let oldest = run
        .iter()
        .find(|(stage, _)| {
            stage
                .versions
                .iter()
                .any(|version| reverted.contains(version.as_str()))
        })
        .map(|(_, txn)| txn.number);
    let mut refused = false;
    if let (Some(oldest), Some((_, last))) = (oldest, run.last()) {
        // Version -> the transaction that applied it, as it stands after `oldest`.
        let mut staying: BTreeMap<&str, String> = BTreeMap::new();
        let after = (Bound::Excluded(oldest), Bound::Unbounded);
        for (_, txn) in state.schema_txns.range(after) {
            let committed = txn
                .decision
                .as_ref()
                .is_some_and(|decision| decision.commit);
            if !committed || txn.database != applied.database || txn.environment != last.environment
            {
                continue;
            }
            for version in &txn.migrations {
                if txn.down {
                    staying.remove(version.as_str());
                } else {
                    staying.insert(version, txn.id());
                }
            }
        }
        staying.retain(|version, _| !planned.contains(version));
        refused = !staying.is_empty();
        if refused {
            let named: Vec<String> = staying
                .iter()
                .map(|(version, txn)| format!("{version} ({txn})"))
                .collect();
            notes.push(format!(
                "{} of {} {} applied after {}'s {} and stay{}: every shard will refuse that \
                 revert until {} reverted first",
                named.join(", "),
                applied.database,
                if named.len() == 1 { "was" } else { "were" },
                change.id(),
                versions.join(", "),
                if named.len() == 1 { "s" } else { "" },
                if named.len() == 1 {
                    "it is"
                } else {
                    "they are"
                },
            ));
        }
    }
    let stage = SchemaStage {
        database: applied.database.to_string(),
        change: change.number,
        service: change.service.clone(),
        environment: environment_of(state, change),
        versions,
        down: true,
        after_activation: true,
        txn: 0,
        expected_fingerprint,
    };
    Some((stage, refused))
}
