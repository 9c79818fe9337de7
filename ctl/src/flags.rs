//! `rewindctl flag`: feature flags and kill switches.

use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use rewind_proto::v1 as pb;

use crate::client::{Client, explain, request_id};
use crate::output::{Format, json, table, time};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Clone, Subcommand)]
pub enum FlagCommand {
    /// Turn a flag on or off.
    Set {
        service: String,
        flag: String,
        state: OnOff,
        /// Environment (default: `default`).
        #[arg(long = "env", default_value = "")]
        environment: String,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Show one flag; exit 1 when it is not set.
    #[command(alias = "get")]
    Show {
        service: String,
        flag: String,
        #[arg(long = "env", default_value = "")]
        environment: String,
    },
    /// Flags, by environment and service.
    List {
        #[arg(long = "env", default_value = "")]
        environment: String,
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Kill switch: turn a flag off now, on every agent of the service (audited as a kill).
    Kill {
        service: String,
        flag: String,
        #[arg(long = "env", default_value = "")]
        environment: String,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
}

pub async fn run(
    client: &mut Client,
    format: Format,
    command: FlagCommand,
) -> anyhow::Result<ExitCode> {
    let (flags, exit) = match command {
        FlagCommand::Set {
            service,
            flag,
            state,
            environment,
            reason,
        } => {
            let flag = set(
                client,
                environment,
                service,
                flag,
                matches!(state, OnOff::On),
                false,
                reason,
            )
            .await?;
            (vec![flag], ExitCode::SUCCESS)
        }
        FlagCommand::Kill {
            service,
            flag,
            environment,
            reason,
        } => {
            let flag = set(client, environment, service, flag, false, true, reason).await?;
            (vec![flag], ExitCode::SUCCESS)
        }
        FlagCommand::Show {
            service,
            flag,
            environment,
        } => {
            let environment = if environment.is_empty() {
                "default".to_string()
            } else {
                environment
            };
            let found: Vec<pb::Flag> = list(client, environment, service)
                .await?
                .into_iter()
                .filter(|candidate| candidate.name == flag)
                .collect();
            let exit = if found.is_empty() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
            (found, exit)
        }
        FlagCommand::List {
            environment,
            service,
        } => (list(client, environment, service).await?, ExitCode::SUCCESS),
    };
    if format.is_structured() {
        json(&pb::ListFlagsResponse { flags })?;
    } else {
        let rows = flags
            .iter()
            .map(|flag| {
                vec![
                    flag.environment.clone(),
                    flag.service.clone(),
                    flag.name.clone(),
                    match (flag.enabled, flag.killed) {
                        (true, _) => "on",
                        (false, true) => "off (killed)",
                        (false, false) => "off",
                    }
                    .to_string(),
                    time(flag.updated_at_ms),
                    flag.updated_by.clone(),
                    flag.reason.clone(),
                ]
            })
            .collect();
        table(
            &["ENV", "SERVICE", "FLAG", "STATE", "UPDATED", "BY", "REASON"],
            rows,
        );
    }
    Ok(exit)
}

async fn set(
    client: &mut Client,
    environment: String,
    service: String,
    name: String,
    enabled: bool,
    kill: bool,
    reason: String,
) -> anyhow::Result<pb::Flag> {
    let request = pb::SetFlagRequest {
        request_id: request_id(),
        environment,
        service,
        name,
        enabled,
        reason,
        kill,
    };
    Ok(client
        .set_flag(request)
        .await
        .map_err(explain)?
        .into_inner())
}

async fn list(
    client: &mut Client,
    environment: String,
    service: String,
) -> anyhow::Result<Vec<pb::Flag>> {
    Ok(client
        .list_flags(pb::ListFlagsRequest {
            environment,
            service,
        })
        .await
        .map_err(explain)?
        .into_inner()
        .flags)
}
