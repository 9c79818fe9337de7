//! `rewindctl change`: deploying a release, and following the change.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use rewind_proto::v1 as pb;

use crate::client::{self, explain, request_id};
use crate::commands::{NewestPageArgs, next_or_legacy, next_page};
use crate::output::{self, Format, json, table, time, with_archived_column};

#[derive(Clone, Subcommand)]
pub enum ChangeCommand {
    /// Deploy a release: snapshot every host, then switch it to the release.
    Start {
        service: String,
        version: String,
        /// Limit to these hosts (repeat); default: every host of the service.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
        /// A flag of the service this change turns on (repeat); its rollback turns it back first.
        #[arg(long = "flag-on", value_name = "FLAG")]
        flags_on: Vec<String>,
        /// A registered migration it applies, as database@version (repeat, in order): expand
        /// ones on every shard before activation, contract and data ones after, all or nothing.
        #[arg(long = "migration", value_name = "DATABASE@VERSION")]
        migrations: Vec<String>,
        /// Deploy at once where the policy asks for approvals (if it allows break-glass; needs
        /// --reason): escalated, and marked until someone else reviews it.
        #[arg(long)]
        break_glass: bool,
        /// Follow the change until it is deployed or fails: hosts captured and activated, and
        /// the time it has taken; exit 0 only if it deployed.
        #[arg(long)]
        watch: bool,
    },
    /// One change: its hosts, steps, snapshots and flags, and where it stands.
    #[command(alias = "status")]
    Show { change_id: String },
    /// Changes, newest first, a page at a time.
    List {
        #[arg(long, default_value = "")]
        service: String,
        /// List the archive instead: changes that ended before the audit retention and left
        /// the cluster's state.
        #[arg(long)]
        archived: bool,
        #[command(flatten)]
        page: NewestPageArgs,
    },
}

pub(crate) async fn change(
    client: &mut client::Client,
    format: Format,
    command: ChangeCommand,
) -> anyhow::Result<ExitCode> {
    let change = match command {
        ChangeCommand::Start {
            service,
            version,
            hosts,
            reason,
            flags_on,
            migrations,
            break_glass,
            watch,
        } => {
            let request = pb::StartChangeRequest {
                request_id: request_id(),
                service,
                version,
                host_ids: hosts,
                reason,
                flags_on,
                migrations,
                break_glass,
            };
            let answer = client
                .start_change(request)
                .await
                .map_err(explain)?
                .into_inner();
            if answer.change.is_none() {
                if format.is_structured() {
                    json(&answer)?;
                } else {
                    crate::requests::print_filed(answer.request)?;
                }
                // Filed for approval: nothing deployed yet, which --watch promised.
                if watch {
                    say_err!("not deployed: the change waits for approval (see above)");
                    return Ok(ExitCode::FAILURE);
                }
                return Ok(ExitCode::SUCCESS);
            }
            if watch && let Some(change) = &answer.change {
                return crate::watch::follow_change(client, format, &change.change_id).await;
            }
            answer.change
        }
        ChangeCommand::Show { change_id } => {
            client
                .get_change(pb::GetChangeRequest { change_id })
                .await
                .map_err(explain)?
                .into_inner()
                .change
        }
        ChangeCommand::List {
            service,
            archived,
            page,
        } => {
            let page = page.page();
            let mut command = "change list".to_string();
            if !service.is_empty() {
                command.push_str(&format!(" --service {service}"));
            }
            if archived {
                command.push_str(" --archived");
            }
            // The old fields too, for a coordinator before 0.3 (the new ones win on a newer).
            #[allow(deprecated)]
            let request = pb::ListChangesRequest {
                service,
                limit: page.page_size,
                before: page.page_token.clone(),
                page_size: page.page_size,
                page_token: page.page_token.clone(),
                archived,
            };
            let changes = client
                .list_changes(request)
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&changes)?;
            } else {
                let rows = changes
                    .changes
                    .iter()
                    .map(|change| {
                        vec![
                            change.change_id.clone(),
                            change.service.clone(),
                            output::versions_of(change),
                            output::change_state(change).into(),
                            change.hosts.len().to_string(),
                            time(change.started_at_ms),
                            change.rollback_id.clone(),
                        ]
                    })
                    .collect();
                let mut headers = vec![
                    "CHANGE", "SERVICE", "VERSIONS", "STATE", "HOSTS", "STARTED", "ROLLBACK",
                ];
                let mut rows = with_archived_column(archived, &mut headers, rows, |index| {
                    changes.changes[index].archived_at_ms
                });
                output::with_wide_columns(
                    format,
                    &mut headers,
                    &mut rows,
                    &["ENV", "STARTED BY", "DEPLOYED", "REASON"],
                    |index| {
                        let change = &changes.changes[index];
                        vec![
                            change.environment.clone(),
                            change.started_by.clone(),
                            time(change.deployed_at_ms),
                            change.reason.clone(),
                        ]
                    },
                );
                table(&headers, rows);
                #[allow(deprecated)]
                let next = next_or_legacy(&changes.next_page_token, &changes.next_before);
                next_page(&command, page.page_size, next);
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let change = change.context("the coordinator answered without a change")?;
    if format.is_structured() {
        json(&change)?;
    } else {
        output::print_change(&change);
    }
    Ok(ExitCode::SUCCESS)
}
