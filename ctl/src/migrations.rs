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
    if format == Format::Json {
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
    /// Schema transactions, newest first.
    List,
    /// One transaction: its decision, each shard's phases, versions and fingerprints, data at
    /// risk and exports, and every statement it ran with the rows affected.
    Show { txn_id: String },
}

pub async fn schema(
    client: &mut Client,
    format: Format,
    command: SchemaCommand,
) -> anyhow::Result<ExitCode> {
    let (txn_id, detailed) = match command {
        SchemaCommand::List => (String::new(), false),
        SchemaCommand::Show { txn_id } => (txn_id, true),
    };
    let txns = client
        .list_schema_txns(pb::ListSchemaTxnsRequest { txn_id, detailed })
        .await
        .map_err(explain)?
        .into_inner()
        .txns;
    if format == Format::Json {
        json(&pb::ListSchemaTxnsResponse { txns })?;
        return Ok(ExitCode::SUCCESS);
    }
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
        return Ok(ExitCode::SUCCESS);
    }
    for txn in &txns {
        println!(
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
            println!("decision: {}: {}", txn.decision, txn.decision_reason);
        }
        if !txn.detail.is_empty() {
            println!("outcome: {}", txn.detail);
        }
        println!("fingerprint before: {}", or_none(&txn.fingerprint_before));
        if !txn.expected_fingerprint.is_empty() {
            println!("expected after: {}", txn.expected_fingerprint);
        }
        if !txn.accept_data_loss.is_empty() {
            println!("data loss accepted: {}", txn.accept_data_loss);
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
                    println!("  {} {}: {}", shard.host_id, step.kind, step.detail);
                }
            }
            for loss in &shard.data_loss {
                println!("  {} data at risk: {loss}", shard.host_id);
            }
            for file in &shard.exported {
                println!("  {} exported to {file}", shard.host_id);
            }
            for statement in &shard.statements {
                println!(
                    "  {} {}: {} ({} row{})",
                    shard.host_id,
                    statement.script,
                    statement.statement,
                    statement.rows,
                    if statement.rows == 1 { "" } else { "s" }
                );
            }
            for gid in &shard.in_doubt {
                println!("  {} prepared transaction still open: {gid}", shard.host_id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn or_none(text: &str) -> &str {
    if text.is_empty() { "(none)" } else { text }
}
