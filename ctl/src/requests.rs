//! `rewindctl request`: rollbacks waiting for approval, and break-glass rollbacks to review.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use rewind_proto::v1 as pb;

use crate::client::{Client, explain, request_id};
use crate::output::{Format, json, table, time};

#[derive(Clone, Subcommand)]
pub enum RequestCommand {
    /// Requests, newest first.
    List {
        /// Only those waiting: pending, and break-glass rollbacks not yet reviewed.
        #[arg(long)]
        open: bool,
        #[command(flatten)]
        page: crate::commands::PageArgs,
    },
    /// One request: its plan, approvals, and whether the plan is still the one requested.
    Show { request_id: String },
    /// Approve the plan with this hash (from `request show`); the last approval needed starts
    /// the rollback. Approvers need `approver` on every environment and service of it and may
    /// not be its requester.
    Approve {
        request_id: String,
        #[arg(long)]
        plan_hash: String,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Refuse it: it will not run.
    Deny {
        request_id: String,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Review a break-glass rollback afterwards (someone other than who ran it).
    Review {
        request_id: String,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
}

pub async fn run(
    client: &mut Client,
    format: Format,
    command: RequestCommand,
) -> anyhow::Result<ExitCode> {
    let decision = |request_id_: String, plan_hash: String, reason: String| pb::RequestDecision {
        idempotency_key: request_id(),
        request_id: request_id_,
        plan_hash,
        reason,
    };
    let request = match command {
        RequestCommand::List { open, page } => {
            let command = if open {
                "request list --open"
            } else {
                "request list"
            };
            let listed = client
                .list_requests(pb::ListRequestsRequest {
                    open_only: open,
                    page_size: page.page_size,
                    page_token: page.page_token,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&listed)?;
            } else {
                let rows = listed
                    .requests
                    .iter()
                    .map(|request| {
                        vec![
                            request.request_id.clone(),
                            status_of(request),
                            if request.kind == "deploy" {
                                format!("deploy {}", request.services.join(","))
                            } else {
                                format!("rollback {}", request.change_ids.join(","))
                            },
                            request.environments.join(","),
                            format!("{}/{}", request.approvals.len(), request.approvals_needed),
                            request.requester.clone(),
                            time(request.created_at_ms),
                            format!("{}{}", request.rollback_id, request.change_id),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "REQUEST",
                        "STATUS",
                        "FOR",
                        "ENVIRONMENTS",
                        "APPROVALS",
                        "REQUESTER",
                        "CREATED",
                        "STARTED",
                    ],
                    rows,
                );
                crate::commands::next_page(command, page.page_size, &listed.next_page_token);
            }
            return Ok(ExitCode::SUCCESS);
        }
        RequestCommand::Show { request_id } => client
            .get_request(pb::GetRequestRequest { request_id })
            .await
            .map_err(explain)?
            .into_inner(),
        RequestCommand::Approve {
            request_id,
            plan_hash,
            reason,
        } => client
            .approve_request(decision(request_id, plan_hash, reason))
            .await
            .map_err(explain)?
            .into_inner(),
        RequestCommand::Deny { request_id, reason } => client
            .deny_request(decision(request_id, String::new(), reason))
            .await
            .map_err(explain)?
            .into_inner(),
        RequestCommand::Review { request_id, reason } => client
            .review_request(decision(request_id, String::new(), reason))
            .await
            .map_err(explain)?
            .into_inner(),
    };
    if format.is_structured() {
        json(&request)?;
    } else {
        print_request(&request);
    }
    Ok(ExitCode::SUCCESS)
}

/// "pending", or "break-glass, reviewed" / "break-glass, NOT REVIEWED".
fn status_of(request: &pb::ApprovalRequest) -> String {
    match (request.break_glass, &request.review) {
        (true, Some(_)) => "break-glass, reviewed".into(),
        (true, None) => "break-glass, NOT REVIEWED".into(),
        _ => request.status.clone(),
    }
}

pub fn print_request(request: &pb::ApprovalRequest) {
    let what = if request.kind == "deploy" {
        format!("deploy of {}", request.services.join(", "))
    } else {
        format!(
            "rollback of {} ({})",
            request.change_ids.join(", "),
            request.services.join(", ")
        )
    };
    say!(
        "{}  {}  {what} in {}",
        request.request_id,
        status_of(request),
        request.environments.join(", ")
    );
    say!(
        "requested by {} ({}) at {}: {}",
        request.requester,
        request.trigger,
        time(request.created_at_ms),
        request.reason
    );
    if !request.detail.is_empty() {
        say!("{}", request.detail);
    }
    say!("plan: {}", request.plan_hash);
    for wave in &request.plan {
        say!("  {wave}");
    }
    if !request.plan_now.is_empty() {
        say!("NOT APPROVABLE: {}", request.plan_now);
    }
    say!(
        "approvals: {} of {}",
        request.approvals.len(),
        request.approvals_needed
    );
    for approval in &request.approvals {
        say!(
            "  {} at {}: {}",
            approval.identity,
            time(approval.at_ms),
            approval.reason
        );
    }
    if request.status == "pending" {
        say!(
            "expires at {}; approve with: rewindctl request approve {} --plan-hash {} --reason \"...\"",
            time(request.expires_at_ms),
            request.request_id,
            request.plan_hash
        );
    }
    if let Some(review) = &request.review {
        say!(
            "reviewed by {} at {}: {}",
            review.identity,
            time(review.at_ms),
            review.reason
        );
    } else if request.break_glass {
        say!(
            "needs a review: rewindctl request review {} --reason TEXT",
            request.request_id
        );
    }
    if !request.rollback_id.is_empty() {
        say!("rollback: {}", request.rollback_id);
    }
    if !request.change_id.is_empty() {
        say!("change: {}", request.change_id);
    }
}

/// What `rollback start` and `change start` say when they wait for approval.
pub fn print_filed(request: Option<pb::ApprovalRequest>) -> anyhow::Result<()> {
    let request = request.context("the answer holds neither what started nor a request")?;
    say!(
        "{} waits for {} approvals ({} requires them); approvers run:\n  rewindctl request show {}",
        request.request_id,
        request.approvals_needed,
        request.environments.join(", "),
        request.request_id
    );
    print_request(&request);
    Ok(())
}
