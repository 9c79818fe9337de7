//! `rewindctl migration`: register a database's schema migrations (up, down, optional verify
//! scripts, classified expand, contract or data) and list them.

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
