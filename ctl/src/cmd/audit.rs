//! `rewindctl audit`: the hash-chained audit log.

use std::process::ExitCode;

use clap::Subcommand;
use rewind_proto::v1 as pb;

use crate::client::{self, explain};
use crate::output::{Format, json, table, time};

#[derive(Clone, Subcommand)]
pub enum AuditCommand {
    /// Audit entries in order, oldest first, a page at a time (`--page-token N` starts at entry
    /// N, numbered from 1).
    List {
        #[command(flatten)]
        page: crate::commands::PageArgs,
        /// The spelling before 0.3 of `--page-token N`.
        #[arg(long, hide = true, conflicts_with = "page_token")]
        from: Option<u64>,
    },
    /// Recompute the hash chain; exit 0 only if it is intact.
    Verify,
}

pub(crate) async fn audit(
    client: &mut client::Client,
    format: Format,
    command: AuditCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::List { page, from } => {
            let page_token = match from {
                Some(index) => index.to_string(),
                None => page.page_token,
            };
            // The old fields too, for a coordinator before 0.3 (the new ones win on a newer).
            #[allow(deprecated)]
            let request = pb::ListAuditRequest {
                from_index: page_token.parse().unwrap_or(1),
                limit: page.page_size,
                page_size: page.page_size,
                page_token,
            };
            let entries = client
                .list_audit(request)
                .await
                .map_err(explain)?
                .into_inner();
            if format == Format::Json {
                json(&entries)?;
            } else {
                let rows = entries
                    .entries
                    .iter()
                    .map(|entry| {
                        vec![
                            entry.index.to_string(),
                            time(entry.at_ms),
                            entry.identity.clone(),
                            entry.action.clone(),
                            entry.target.clone(),
                            entry.outcome.clone(),
                        ]
                    })
                    .collect();
                table(
                    &["#", "AT", "IDENTITY", "ACTION", "TARGET", "OUTCOME"],
                    rows,
                );
                crate::commands::next_page("audit list", page.page_size, &entries.next_page_token);
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify => {
            let verification = client
                .verify_audit(pb::VerifyAuditRequest {})
                .await
                .map_err(explain)?
                .into_inner();
            if format == Format::Json {
                json(&verification)?;
            } else if verification.ok {
                say!(
                    "audit chain intact: {} entries, head {}",
                    verification.entries,
                    verification.head_hash
                );
            } else {
                say!(
                    "audit chain BROKEN at entry {}: {}",
                    verification.first_broken_index,
                    verification.detail
                );
            }
            Ok(if verification.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
