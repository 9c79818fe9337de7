//! `rewindctl cluster`: members, leadership, membership changes and the cluster version.

use std::process::ExitCode;

use clap::Subcommand;
use rewind_proto::v1 as pb;

use crate::client::{self, explain, request_id};
use crate::output::{Format, json, table};

#[derive(Clone, Subcommand)]
pub enum ClusterCommand {
    /// Members with their role and replication lag, as the leader sees them.
    List,
    /// Hand leadership to another member (before maintenance on the leader's host).
    TransferLeader {
        member_id: u64,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Add a member: start it first with `cluster.join = true`. It joins as a learner and is
    /// promoted to voter once it has caught up; repeat the command to promote a learner.
    Add {
        member_id: u64,
        /// host:port the other members, agents and rewindctl dial.
        #[arg(long)]
        address: String,
        #[arg(long, default_value = "")]
        region: String,
        /// Common name of its certificate (default coordinator-<id>).
        #[arg(long, default_value = "")]
        name: String,
        /// Seconds to wait for it to catch up before promoting it (1..=600).
        #[arg(
            long = "catch-up-timeout-s",
            alias = "catch-up-timeout",
            default_value_t = 60
        )]
        catch_up_timeout: u32,
        /// Leave it a learner (it receives the log but does not vote).
        #[arg(long)]
        learner_only: bool,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Remove a member that does not lead (hand leadership over first). Stop its process
    /// afterwards and wipe its data directory before it ever rejoins.
    Remove {
        member_id: u64,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
    /// The cluster version the members apply the log at, and the versions each member's
    /// binary supports.
    Version,
    /// Raise the cluster version once every member runs a release that supports it (after a
    /// rolling upgrade); refused while a member is older or does not answer.
    UpgradeFinalize {
        /// The version to raise to (default: the highest the leader's release supports).
        #[arg(long, default_value_t = 0)]
        to: u32,
        /// Why (required: audited).
        #[arg(long)]
        reason: String,
    },
}

pub(crate) async fn cluster_list(
    client: &mut client::Client,
    format: Format,
    known: Option<pb::ListMembersResponse>,
) -> anyhow::Result<ExitCode> {
    let members = match known {
        Some(members) => members,
        None => client
            .list_members(pb::ListMembersRequest {})
            .await
            .map_err(explain)?
            .into_inner(),
    };
    if format.is_structured() {
        json(&members)?;
        return Ok(ExitCode::SUCCESS);
    }
    say!(
        "cluster {}  term {}  commit index {}",
        members.cluster_id,
        members.term,
        members.commit_index
    );
    let rows = members
        .members
        .iter()
        .map(|member| {
            vec![
                member.id.to_string(),
                member.address.clone(),
                member.region.clone(),
                member.role.clone(),
                member.matched_index.to_string(),
                if member.answered {
                    member.applied_index.to_string()
                } else {
                    "?".into()
                },
                member.lag.to_string(),
                if member.recently_active {
                    "yes".into()
                } else {
                    "no".into()
                },
                if member.snapshot_in_flight {
                    "sending".into()
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    table(
        &[
            "ID", "ADDRESS", "REGION", "ROLE", "MATCHED", "APPLIED", "LAG", "ACTIVE", "SNAPSHOT",
        ],
        rows,
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn run(
    client: &mut client::Client,
    format: Format,
    command: ClusterCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        ClusterCommand::List => cluster_list(client, format, None).await,
        ClusterCommand::TransferLeader { member_id, reason } => {
            let request = pb::TransferLeaderRequest {
                request_id: request_id(),
                member_id,
                reason,
            };
            let members = client
                .transfer_leader(request)
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_table() {
                say!("asked member {member_id} to take over; it leads within an election timeout");
            }
            cluster_list(client, format, Some(members)).await
        }
        ClusterCommand::Add {
            member_id,
            address,
            region,
            name,
            catch_up_timeout,
            learner_only,
            reason,
        } => {
            let request = pb::AddMemberRequest {
                member_id,
                address,
                region,
                name,
                reason,
                catch_up_timeout_s: catch_up_timeout,
                learner_only,
            };
            let members = client
                .add_member(request)
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_table() {
                let role = if learner_only { "learner" } else { "voter" };
                say!("member {member_id} added as a {role}");
            }
            cluster_list(client, format, Some(members)).await
        }
        ClusterCommand::Remove { member_id, reason } => {
            let request = pb::RemoveMemberRequest { member_id, reason };
            let members = client
                .remove_member(request)
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_table() {
                say!("member {member_id} removed; stop its process and wipe its data dir");
            }
            cluster_list(client, format, Some(members)).await
        }
        ClusterCommand::Version => crate::upgrade::show(client, format).await,
        ClusterCommand::UpgradeFinalize { to, reason } => {
            crate::upgrade::finalize(client, format, to, reason).await
        }
    }
}
