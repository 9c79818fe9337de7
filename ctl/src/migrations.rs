//! `rewindctl migration`: register a database's schema migrations (up, down, optional verify
//! scripts, classified expand, contract or data) and list them; `rewindctl schema`: the schema
//! transactions that apply and revert them across a database's shards.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use rewind_proto::v1 as pb;

use crate::client::{Client, explain, request_id};
use crate::output::{Format, json, table, time};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Class {
    /// Backward compatible: the application before it still works after it.
    Expand,
    /// Not backward compatible: removes, renames or narrows.
    Contract,
    /// Changes data, not schema.
    Data,
}

#[derive(Clone, Subcommand)]
pub enum MigrationCommand {
    /// Register a migration; refused without a down script, and immutable once registered.
    Register {
        database: String,
        version: String,
        #[arg(long, value_enum)]
        class: Class,
        /// File holding the up script.
        #[arg(long)]
        up: PathBuf,
        /// File holding the down script (required: what cannot be undone is refused).
        #[arg(long)]
        down: PathBuf,
        /// File holding a verify script, run after the down script (an error undoes the revert).
        #[arg(long)]
        verify: Option<PathBuf>,
    },
    /// Registered migrations, by database (with their scripts on request).
    List {
        #[arg(long, default_value = "")]
        database: String,
        /// Print the scripts too (JSON output).
        #[arg(long)]
        with_scripts: bool,
    },
}

fn read_script(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

pub async fn run(
    client: &mut Client,
    format: Format,
    command: MigrationCommand,
) -> anyhow::Result<ExitCode> {
    let migrations = match command {
        MigrationCommand::Register {
            database,
            version,
            class,
            up,
            down,
            verify,
        } => {
            let migration = pb::Migration {
                database,
                version,
                class: match class {
                    Class::Expand => pb::MigrationClass::Expand,
                    Class::Contract => pb::MigrationClass::Contract,
                    Class::Data => pb::MigrationClass::Data,
                }
                .into(),
                up_sql: read_script(&up)?,
                down_sql: read_script(&down)?,
                verify_sql: verify
                    .as_deref()
                    .map(read_script)
                    .transpose()?
                    .unwrap_or_default(),
                ..Default::default()
            };
            let response = client
                .register_migration(pb::RegisterMigrationRequest {
                    request_id: request_id(),
                    migration: Some(migration),
                })
                .await
                .map_err(explain)?
                .into_inner();
            response.migration.into_iter().collect()
        }
        MigrationCommand::List {
            database,
            with_scripts,
        } => {
            client
                .list_migrations(pb::ListMigrationsRequest {
                    database,
                    with_scripts,
                })
                .await
                .map_err(explain)?
                .into_inner()
                .migrations
        }
    };
    if format.is_structured() {
        json(&pb::ListMigrationsResponse { migrations })?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows = migrations
        .iter()
        .map(|migration| {
            let class = pb::MigrationClass::try_from(migration.class)
                .map(|class| {
                    class
                        .as_str_name()
                        .trim_start_matches("MIGRATION_CLASS_")
                        .to_lowercase()
                })
                .unwrap_or_else(|_| "?".into());
            vec![
                migration.database.clone(),
                migration.version.clone(),
                class,
                migration.checksum.clone(),
                format!(
                    "{} by {}",
                    time(migration.registered_at_ms),
                    migration.registered_by
                ),
            ]
        })
        .collect();
    table(
        &["DATABASE", "VERSION", "CLASS", "CHECKSUM", "REGISTERED"],
        rows,
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Clone, Subcommand)]
pub enum SchemaCommand {
    /// Schema transactions, newest first, a page at a time.
    List {
        #[command(flatten)]
        page: crate::commands::PageArgs,
    },
    /// One transaction: its decision, each shard's phases, versions and fingerprints, data at
    /// risk and exports, and every statement it ran with the rows affected.
    Show { txn_id: String },
    /// Say that a shard whose resolve keeps failing was resolved by hand (its prepared
    /// transaction committed or rolled back as decided, from psql say): the resolve stops being
    /// retried and verify judges the shard as it is.
    Resolved {
        txn_id: String,
        /// The shard's host.
        #[arg(long)]
        shard: String,
        /// What was done, and by whom (audited).
        #[arg(long)]
        reason: String,
    },
}

pub async fn schema(
    client: &mut Client,
    format: Format,
    command: SchemaCommand,
) -> anyhow::Result<ExitCode> {
    let (txn_id, detailed, page) = match command {
        SchemaCommand::List { page } => (String::new(), false, page),
        SchemaCommand::Show { txn_id } => (
            txn_id,
            true,
            crate::commands::PageArgs {
                page_size: 1,
                page_token: String::new(),
            },
        ),
        SchemaCommand::Resolved {
            txn_id,
            shard,
            reason,
        } => {
            let txn = client
                .resolved_by_hand(pb::ResolvedByHandRequest {
                    request_id: request_id(),
                    txn_id,
                    host_id: shard,
                    reason,
                })
                .await
                .map_err(explain)?
                .into_inner()
                .txn;
            match format {
                Format::Json | Format::Yaml => json(&pb::SchemaTxnResponse { txn })?,
                Format::Table | Format::Wide | Format::Junit => txn.iter().for_each(print_txn),
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let listed = client
        .list_schema_txns(pb::ListSchemaTxnsRequest {
            txn_id,
            detailed,
            page_size: page.page_size,
            page_token: page.page_token,
        })
        .await
        .map_err(explain)?
        .into_inner();
    if format.is_structured() {
        json(&listed)?;
        return Ok(ExitCode::SUCCESS);
    }
    let txns = listed.txns;
    if !detailed {
        let rows = txns
            .iter()
            .map(|txn| {
                vec![
                    txn.txn_id.clone(),
                    txn.owner.clone(),
                    format!("{} {}", txn.direction, txn.versions.join(", ")),
                    txn.database.clone(),
                    txn.shards.len().to_string(),
                    txn.status.clone(),
                    if txn.decision.is_empty() {
                        "-".into()
                    } else {
                        txn.decision.clone()
                    },
                    txn.detail.clone(),
                ]
            })
            .collect();
        table(
            &[
                "TXN",
                "OWNER",
                "MIGRATIONS",
                "DATABASE",
                "SHARDS",
                "STATUS",
                "DECISION",
                "DETAIL",
            ],
            rows,
        );
        crate::commands::next_page("schema list", page.page_size, &listed.next_page_token);
        return Ok(ExitCode::SUCCESS);
    }
    txns.iter().for_each(print_txn);
    Ok(ExitCode::SUCCESS)
}

/// One transaction in full: the decision, each shard's phases and every statement run.
fn print_txn(txn: &pb::SchemaTxn) {
    say!(
        "{}  {} {} on {} ({}) for {}: {}",
        txn.txn_id,
        txn.direction,
        txn.versions.join(", "),
        txn.database,
        txn.environment,
        txn.owner,
        txn.status
    );
    if !txn.decision.is_empty() {
        say!("decision: {}: {}", txn.decision, txn.decision_reason);
    }
    if !txn.detail.is_empty() {
        say!("outcome: {}", txn.detail);
    }
    say!("fingerprint before: {}", or_none(&txn.fingerprint_before));
    if !txn.expected_fingerprint.is_empty() {
        say!("expected after: {}", txn.expected_fingerprint);
    }
    if !txn.accept_data_loss.is_empty() {
        say!("data loss accepted: {}", txn.accept_data_loss);
    }
    let rows = txn
        .shards
        .iter()
        .map(|shard| {
            let mut row = vec![shard.host_id.clone()];
            row.extend(shard.steps.iter().map(|step| {
                let state = pb::StepState::try_from(step.state)
                    .map(|state| {
                        state
                            .as_str_name()
                            .trim_start_matches("STEP_STATE_")
                            .to_lowercase()
                    })
                    .unwrap_or_default();
                format!("{state} ({})", step.attempts)
            }));
            row.push(format!(
                "{} -> {}",
                or_none(&shard.version_before),
                or_none(&shard.version_after)
            ));
            row
        })
        .collect();
    table(
        &["SHARD", "CHECK", "PREPARE", "RESOLVE", "VERIFY", "VERSION"],
        rows,
    );
    for shard in &txn.shards {
        for step in &shard.steps {
            if !step.detail.is_empty() {
                say!("  {} {}: {}", shard.host_id, step.kind, step.detail);
            }
        }
        for loss in &shard.data_loss {
            say!("  {} data at risk: {loss}", shard.host_id);
        }
        for file in &shard.exported {
            say!("  {} exported to {file}", shard.host_id);
        }
        for statement in &shard.statements {
            say!(
                "  {} {}: {} ({} row{})",
                shard.host_id,
                statement.script,
                statement.statement,
                statement.rows,
                if statement.rows == 1 { "" } else { "s" }
            );
        }
        for gid in &shard.in_doubt {
            say!("  {} prepared transaction still open: {gid}", shard.host_id);
        }
    }
}

fn or_none(text: &str) -> &str {
    if text.is_empty() { "(none)" } else { text }
}

#[derive(Clone, Subcommand)]
pub enum DrillCommand {
    /// Apply a change's migrations, revert them and apply them again on another environment's
    /// shards (staging), each step all or nothing, checking the schema fingerprint after each:
    /// the revert must give back the schema before, the second apply the schema after the
    /// first. Prints the timings; exits 1 when the drill fails.
    #[command(alias = "migrations")]
    Start {
        /// The change whose migrations to drill.
        #[arg(long = "change", value_name = "CHANGE_ID")]
        change: String,
        /// The environment whose shards to drill on.
        #[arg(long = "env", value_name = "ENVIRONMENT")]
        environment: String,
        /// Start it and print its id without waiting for the end.
        #[arg(long)]
        no_wait: bool,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
    /// One drill: a migration drill (dr-N) with its steps and timings, or a rollback fire
    /// drill (rd-N) with its scorecard; exits 1 when it failed.
    #[command(alias = "status")]
    Show { drill_id: String },
    /// Rehearse the automatic rollback for real (cluster version 11): deploy a known-bad
    /// release to every host of the service in the environment (its policy must allow drills
    /// and need no approvals), let the service's health policy detect it and its automatic
    /// rollback revert it, then print a scorecard (times to detect, to the first host reverted,
    /// to every host verified; gates, retries, escalations) against the service's RTO and its
    /// previous drill. Exits 1 when the drill fails; `--output json|junit` for pipelines.
    Rollback {
        #[arg(long)]
        service: String,
        #[arg(long = "env", value_name = "ENVIRONMENT")]
        environment: String,
        /// The known-bad release to deploy (registered; not the one running).
        #[arg(long, value_name = "VERSION")]
        release: String,
        /// Why (required: it goes into the drill, its change and the audit log).
        #[arg(long)]
        reason: String,
        /// Start it and print its id without waiting for the end.
        #[arg(long)]
        no_wait: bool,
        /// Longest to wait for its end (it goes on after; follow it with drill show).
        #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        timeout_s: u64,
    },
    /// Rollback fire drills, newest first, with their times.
    List {
        #[arg(long)]
        service: Option<String>,
        #[command(flatten)]
        page: crate::commands::PageArgs,
    },
    /// Stop a rollback fire drill at once; what it deployed is reverted all the same (its
    /// rollback goes on if it began; if not, the engine starts one).
    Abort {
        drill_id: String,
        /// Why (required: it goes into the drill and the audit log).
        #[arg(long)]
        reason: String,
    },
}

/// Longest a drill is waited for.
const DRILL_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

pub async fn drill(
    client: &mut Client,
    format: Format,
    command: DrillCommand,
) -> anyhow::Result<ExitCode> {
    let (mut drill, no_wait) = match command {
        DrillCommand::Show { drill_id } if drill_id.starts_with("rd-") => {
            return crate::fire_drills::show(client, format, drill_id).await;
        }
        DrillCommand::Rollback {
            service,
            environment,
            release,
            reason,
            no_wait,
            timeout_s,
        } => {
            let request = crate::fire_drills::DrillRequest {
                service,
                environment,
                release,
                reason,
                no_wait,
                timeout: std::time::Duration::from_secs(timeout_s),
            };
            return crate::fire_drills::start(client, format, request).await;
        }
        DrillCommand::List { service, page } => {
            return crate::fire_drills::list(client, format, service, page).await;
        }
        DrillCommand::Abort { drill_id, reason } => {
            return crate::fire_drills::abort(client, format, drill_id, reason).await;
        }
        DrillCommand::Start {
            change,
            environment,
            no_wait,
            reason,
        } => {
            let started = client
                .start_drill(pb::StartDrillRequest {
                    request_id: request_id(),
                    change_id: change,
                    environment,
                    reason,
                })
                .await
                .map_err(explain)?;
            (started.into_inner().drill, no_wait)
        }
        DrillCommand::Show { drill_id } => {
            let shown = client
                .get_drill(pb::GetDrillRequest { drill_id })
                .await
                .map_err(explain)?;
            (shown.into_inner().drill, true)
        }
    };
    let mut drill = drill
        .take()
        .context("the coordinator answered without the drill")?;
    let started = std::time::Instant::now();
    while !no_wait && drill.status == "running" {
        if started.elapsed() > DRILL_WAIT {
            anyhow::bail!(
                "{} still runs after {} s; see rewindctl drill show {}",
                drill.drill_id,
                DRILL_WAIT.as_secs(),
                drill.drill_id
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        drill = client
            .get_drill(pb::GetDrillRequest {
                drill_id: drill.drill_id.clone(),
            })
            .await
            .map_err(explain)?
            .into_inner()
            .drill
            .context("the coordinator answered without the drill")?;
    }
    let failed = drill.status == "failed";
    if format.is_structured() {
        json(&pb::DrillResponse { drill: Some(drill) })?;
    } else {
        print_drill(&drill);
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_drill(drill: &pb::Drill) {
    say!(
        "{}  {} of {} on {}: {}",
        drill.drill_id,
        drill.status,
        drill.change_id,
        drill.environment,
        drill.detail
    );
    let rows = drill
        .steps
        .iter()
        .enumerate()
        .map(|(index, txn)| {
            let mut row = vec![
                (index + 1).to_string(),
                format!("{} {}", txn.direction, txn.versions.join(", ")),
                txn.database.clone(),
                txn.txn_id.clone(),
                txn.shards.len().to_string(),
                milliseconds(txn.finished_at_ms.saturating_sub(txn.started_at_ms)),
            ];
            // Each phase from its first shard's start to its last shard's end.
            for phase in 0..4 {
                let steps = txn.shards.iter().filter_map(|shard| shard.steps.get(phase));
                let begun = steps
                    .clone()
                    .map(|step| step.started_at_ms)
                    .filter(|&at| at > 0)
                    .min();
                let ended = steps.map(|step| step.finished_at_ms).max();
                row.push(match (begun, ended) {
                    (Some(begun), Some(ended)) if ended >= begun => milliseconds(ended - begun),
                    _ => "-".into(),
                });
            }
            row.push(if txn.verified {
                format!(
                    "ok {}",
                    short(
                        &txn.shards
                            .first()
                            .map(|shard| shard.fingerprint_after.clone())
                            .unwrap_or_default()
                    )
                )
            } else if txn.status == "done" {
                format!("FAILED: {}", txn.detail)
            } else {
                txn.status.clone()
            });
            row
        })
        .collect();
    table(
        &[
            "STEP",
            "MIGRATIONS",
            "DATABASE",
            "TXN",
            "SHARDS",
            "TOTAL",
            "CHECK",
            "PREPARE",
            "RESOLVE",
            "VERIFY",
            "FINGERPRINT",
        ],
        rows,
    );
}

fn milliseconds(ms: u64) -> String {
    format!("{ms} ms")
}

fn short(fingerprint: &str) -> &str {
    rewind_shared::names::truncate(fingerprint, 19)
}
