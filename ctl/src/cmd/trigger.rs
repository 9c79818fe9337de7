//! `rewindctl trigger`: automatic rollback requests and the breaker.

use std::process::ExitCode;

use clap::Subcommand;
use rewind_proto::v1 as pb;

use crate::client::{self, explain, request_id};
use crate::output::{Format, json, table, time};

#[derive(Clone, Subcommand)]
pub enum TriggerCommand {
    /// Recent requests for an automatic rollback and what became of each.
    List {
        /// The newest this many (at most 1000; the cluster keeps a bounded window of them).
        #[arg(long, alias = "limit", default_value_t = 100)]
        page_size: u32,
    },
    /// Close the global breaker so automatic rollbacks may start again (audited).
    ResetBreaker {
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
}

pub(crate) async fn trigger(
    client: &mut client::Client,
    format: Format,
    command: TriggerCommand,
) -> anyhow::Result<ExitCode> {
    let answer = match command {
        TriggerCommand::List { page_size } => client
            .list_triggers({
                // The old field too, for a coordinator before 0.3.
                #[allow(deprecated)]
                let request = pb::ListTriggersRequest {
                    limit: page_size,
                    page_size,
                };
                request
            })
            .await
            .map_err(explain)?
            .into_inner(),
        TriggerCommand::ResetBreaker { reason } => client
            .reset_breaker(pb::ResetBreakerRequest {
                request_id: request_id(),
                reason,
            })
            .await
            .map_err(explain)?
            .into_inner(),
    };
    if format.is_structured() {
        json(&answer)?;
        return Ok(ExitCode::SUCCESS);
    }
    if answer.breaker_open {
        say!(
            "GLOBAL BREAKER OPEN since {} ({} triggered together): no automatic rollback starts \
             until `rewindctl trigger reset-breaker --reason ...`",
            time(answer.breaker_tripped_at_ms),
            answer.breaker_services.join(", ")
        );
    } else {
        say!("global breaker: closed");
    }
    let rows = answer
        .triggers
        .iter()
        .map(|event| {
            vec![
                time(event.at_ms),
                event.service.clone(),
                event.environment.clone(),
                event.source.clone(),
                event.outcome.clone(),
                event.change_id.clone(),
                event.rollback_id.clone(),
                event.detail.clone(),
            ]
        })
        .collect();
    table(
        &[
            "AT", "SERVICE", "ENV", "SOURCE", "OUTCOME", "CHANGE", "ROLLBACK", "DETAIL",
        ],
        rows,
    );
    Ok(ExitCode::SUCCESS)
}
