//! `rewindctl rollback`: planning, starting, watching and controlling rollbacks.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use rewind_proto::v1 as pb;

use crate::client::{self, explain, request_id};
use crate::commands::{EXIT_ROLLBACK_FAILED, NewestPageArgs, next_or_legacy, next_page};
use crate::output::{self, Format, json, table, time, with_archived_column};
use crate::watch;

/// The most steps a coordinator returns in one answer (its `MAX_STEPS_PAGE`).
const MAX_STEPS_PAGE: u32 = 10_000;

#[derive(Clone, Subcommand)]
pub enum RollbackCommand {
    /// Show what a rollback would do, without doing it: waves, hosts, steps, gates, readiness.
    Plan {
        #[command(flatten)]
        selection: crate::plans::SelectionArgs,
        #[command(flatten)]
        options: crate::plans::PlanArgs,
    },
    /// Roll changes back to the state captured before them, as `rollback plan` shows.
    Start {
        /// One change to roll back (the same as --change).
        change_id: Option<String>,
        #[command(flatten)]
        selection: crate::plans::SelectionArgs,
        #[command(flatten)]
        options: crate::plans::PlanArgs,
        /// Run only if the plan is still the one `rollback plan` showed with this hash.
        #[arg(long, default_value = "")]
        plan_hash: String,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
        /// Run at once where the policy requires approvals (needs --reason): escalated, marked
        /// in the audit and every listing, and left for an approver to review.
        #[arg(long, requires = "reason")]
        break_glass: bool,
        /// Follow it until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Where a rollback is, why it stopped, the evidence and the commands that move it on.
    Explain { rollback_id: String },
    /// Leave one host unreverted (audited); resume afterwards if the rollback is paused.
    SkipHost {
        rollback_id: String,
        host_id: String,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Circuit breaker: stop reverting a failing service and take its failing hosts out of
    /// rotation, within max_unavailable (audited); the rollback goes on with its other
    /// services. (Before cluster version 10: every host of the service at once.)
    Isolate {
        rollback_id: String,
        service: String,
        /// Also take this region's hosts of the service out (still within max_unavailable).
        #[arg(long, default_value = "")]
        region: String,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
    /// One rollback: its waves, hosts, steps and gates, and where it stands.
    #[command(alias = "status")]
    Show { rollback_id: String },
    /// Rollbacks, newest first, a page at a time (`show` shows one's steps).
    List {
        /// List the archive instead: rollbacks that ended before the audit retention and left
        /// the cluster's state.
        #[arg(long)]
        archived: bool,
        #[command(flatten)]
        page: NewestPageArgs,
    },
    /// Follow a rollback live until it ends; exit 0 only if it succeeded.
    Watch { rollback_id: String },
    /// Hold a rollback before its next step (audited); `resume` goes on.
    Pause {
        rollback_id: String,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Go on with a paused rollback (audited).
    Resume {
        rollback_id: String,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Stop a rollback for good: no further step starts (audited).
    Abort {
        rollback_id: String,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
}

pub(crate) async fn rollback(
    client: &mut client::Client,
    format: Format,
    command: RollbackCommand,
) -> anyhow::Result<ExitCode> {
    let action = |rollback_id: String, reason: String| pb::RollbackActionRequest {
        request_id: request_id(),
        rollback_id,
        reason,
        host_id: String::new(),
        service: String::new(),
        region: String::new(),
    };
    let rollback = match command {
        RollbackCommand::Plan { selection, options } => {
            let plan = client
                .plan_rollback(pb::PlanRollbackRequest {
                    selection: Some(selection.into_selection(None)?),
                    options: Some(options.into_options()),
                })
                .await
                .map_err(explain)?
                .into_inner()
                .plan
                .context("no plan in the answer")?;
            if format.is_structured() {
                json(&plan)?;
            } else {
                crate::plans::print_plan(&plan);
            }
            return Ok(if plan.runnable {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_ROLLBACK_FAILED)
            });
        }
        RollbackCommand::Explain { rollback_id } => {
            let answer = client
                .explain_rollback(pb::GetRollbackRequest {
                    rollback_id,
                    ..Default::default()
                })
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&answer)?;
            } else {
                say!("{}", answer.explanation);
                if !answer.next_commands.is_empty() {
                    say!("\nTo move it on:");
                    for command in &answer.next_commands {
                        say!("  {command}");
                    }
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        RollbackCommand::SkipHost {
            rollback_id,
            host_id,
            reason,
        } => client
            .skip_host(pb::RollbackActionRequest {
                host_id,
                ..action(rollback_id, reason)
            })
            .await
            .map_err(explain)?
            .into_inner()
            .rollback
            .context("no rollback")?,
        RollbackCommand::Isolate {
            rollback_id,
            service,
            region,
            reason,
        } => client
            .isolate_service(pb::RollbackActionRequest {
                service,
                region,
                ..action(rollback_id, reason)
            })
            .await
            .map_err(explain)?
            .into_inner()
            .rollback
            .context("no rollback")?,
        RollbackCommand::Start {
            change_id,
            selection,
            options,
            plan_hash,
            reason,
            break_glass,
            watch: follow,
        } => {
            let request = pb::StartRollbackRequest {
                request_id: request_id(),
                change_id: String::new(),
                reason,
                max_parallel: 0,
                selection: Some(selection.into_selection(change_id)?),
                options: Some(options.into_options()),
                plan_hash,
                break_glass,
            };
            let answer = client
                .start_rollback(request)
                .await
                .map_err(explain)?
                .into_inner();
            let Some(rollback) = answer.rollback else {
                if format.is_structured() {
                    json(&answer)?;
                } else {
                    crate::requests::print_filed(answer.request)?;
                }
                return Ok(ExitCode::SUCCESS);
            };
            if follow {
                return watch::follow(client, format, &rollback.rollback_id).await;
            }
            rollback
        }
        RollbackCommand::Show { rollback_id } => every_step(client, &rollback_id).await?,
        RollbackCommand::List { archived, page } => {
            let page = page.page();
            // The old fields too, for a coordinator before 0.3 (the new ones win on a newer).
            #[allow(deprecated)]
            let request = pb::ListRollbacksRequest {
                limit: page.page_size,
                before: page.page_token.clone(),
                page_size: page.page_size,
                page_token: page.page_token.clone(),
                archived,
            };
            let rollbacks = client
                .list_rollbacks(request)
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&rollbacks)?;
            } else {
                let rows = rollbacks
                    .rollbacks
                    .iter()
                    .map(|rollback| {
                        vec![
                            rollback.rollback_id.clone(),
                            rollback.change_ids.join(","),
                            rollback.services.join(","),
                            output::rollback_state(rollback).into(),
                            output::trigger_of(rollback),
                            time(rollback.started_at_ms),
                            time(rollback.finished_at_ms),
                        ]
                    })
                    .collect();
                let mut headers = vec![
                    "ROLLBACK", "CHANGES", "SERVICES", "STATE", "TRIGGER", "STARTED", "FINISHED",
                ];
                let mut rows = with_archived_column(archived, &mut headers, rows, |index| {
                    rollbacks.rollbacks[index].archived_at_ms
                });
                output::with_wide_columns(
                    format,
                    &mut headers,
                    &mut rows,
                    &["STARTED BY", "MAX PARALLEL", "WAVES", "REASON"],
                    |index| {
                        let rollback = &rollbacks.rollbacks[index];
                        vec![
                            rollback.started_by.clone(),
                            rollback.max_parallel.to_string(),
                            rollback.waves.len().to_string(),
                            rollback.reason.clone(),
                        ]
                    },
                );
                table(&headers, rows);
                #[allow(deprecated)]
                let next = next_or_legacy(&rollbacks.next_page_token, &rollbacks.next_before);
                let command = if archived {
                    "rollback list --archived"
                } else {
                    "rollback list"
                };
                next_page(command, page.page_size, next);
            }
            return Ok(ExitCode::SUCCESS);
        }
        RollbackCommand::Watch { rollback_id } => {
            return watch::follow(client, format, &rollback_id).await;
        }
        RollbackCommand::Pause {
            rollback_id,
            reason,
        } => client
            .pause_rollback(action(rollback_id, reason))
            .await
            .map_err(explain)?
            .into_inner()
            .rollback
            .context("no rollback")?,
        RollbackCommand::Resume {
            rollback_id,
            reason,
        } => client
            .resume_rollback(action(rollback_id, reason))
            .await
            .map_err(explain)?
            .into_inner()
            .rollback
            .context("no rollback")?,
        RollbackCommand::Abort {
            rollback_id,
            reason,
        } => client
            .abort_rollback(action(rollback_id, reason))
            .await
            .map_err(explain)?
            .into_inner()
            .rollback
            .context("no rollback")?,
    };
    if format.is_structured() {
        json(&rollback)?;
    } else {
        output::print_rollback(&rollback);
    }
    Ok(ExitCode::SUCCESS)
}

/// Rollback `rollback_id` with all its steps, read a page at a time (a 10,000-host rollback's
/// steps are more than one answer holds). Read again from the start when its waves change
/// meanwhile (an isolation renumbers later steps' waves), a few times at most.
async fn every_step(
    client: &mut client::Client,
    rollback_id: &str,
) -> anyhow::Result<pb::Rollback> {
    for _ in 0..3 {
        let mut rollback: Option<pb::Rollback> = None;
        let mut steps_page_token = String::new();
        loop {
            let answer = client
                .get_rollback(pb::GetRollbackRequest {
                    rollback_id: rollback_id.to_string(),
                    steps_page_size: MAX_STEPS_PAGE,
                    steps_page_token,
                    ..Default::default()
                })
                .await
                .map_err(explain)?
                .into_inner();
            let page = answer.rollback.context("no rollback in the answer")?;
            rollback = match rollback.take() {
                None => Some(page),
                Some(earlier) if wave_layout(&earlier) == wave_layout(&page) => {
                    let mut steps = earlier.steps;
                    steps.extend(page.steps);
                    // The rest as the last page has it: the rollback moves on while it is read.
                    Some(pb::Rollback { steps, ..page })
                }
                Some(_) => break,
            };
            if answer.next_steps_page_token.is_empty() {
                return rollback.context("no rollback in the answer");
            }
            steps_page_token = answer.next_steps_page_token;
        }
    }
    anyhow::bail!("{rollback_id}'s waves kept changing while it was read; show it again")
}

/// A rollback's waves without their gates: what numbers its steps' waves (gates move on while
/// the pages are read, and the last page has them as they are).
fn wave_layout(rollback: &pb::Rollback) -> Vec<pb::RollbackWave> {
    (rollback.waves.iter())
        .map(|wave| pb::RollbackWave {
            service: wave.service.clone(),
            change_id: wave.change_id.clone(),
            region: wave.region.clone(),
            canary: wave.canary,
            hosts: wave.hosts.clone(),
            isolation: wave.isolation,
            ..Default::default()
        })
        .collect()
}
