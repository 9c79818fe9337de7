//! `cluster version` and `cluster upgrade-finalize`: the cluster version rises only once every
//! member's binary supports it, so no member meets an entry it cannot apply.

use rewind_proto::v1 as pb;
use tonic::Status;
use tracing::info;

use super::Context;
use super::status::invalid;
use super::validate::required_reason;
use crate::state_machine::{CommandKind, version};

/// The cluster version, what each member supports (asked now, a second at most each), and the
/// highest version all of them support.
pub async fn show(context: &Context) -> pb::ClusterVersion {
    let asked = super::cluster::ask_members(context).await;
    let answers: Vec<Option<(u32, u32, String)>> = asked
        .iter()
        .map(|(_, answer)| {
            answer.as_ref().map(|status| {
                // A release from before versions answers zeros: it applies version 1 only.
                let max = status.max_cluster_version.max(version::LEGACY);
                let min = status.min_cluster_version.max(version::LEGACY);
                let release = if status.release.is_empty() {
                    "before cluster versions".to_string()
                } else {
                    status.release.clone()
                };
                (min, max, release)
            })
        })
        .collect();
    let finalizable_to = answers
        .iter()
        .map(|answer| answer.as_ref().map_or(0, |(_, max, _)| *max))
        .min()
        .unwrap_or(0);
    let members = asked
        .into_iter()
        .zip(answers)
        .map(|((member, _), answer)| {
            let (min, max, release) = answer.clone().unwrap_or_default();
            pb::MemberVersion {
                id: member.id,
                address: member.address,
                answered: answer.is_some(),
                min_cluster_version: min,
                max_cluster_version: max,
                release,
            }
        })
        .collect();
    pb::ClusterVersion {
        cluster_version: context.node.read(|state| state.cluster_version()),
        finalizable_to,
        members,
        changes: version::CHANGES
            .iter()
            .map(|(version, summary)| pb::VersionChange {
                version: *version,
                summary: summary.to_string(),
            })
            .collect(),
    }
}

/// Raises the cluster version to `request.version` (0: the highest this binary supports),
/// refused while a member does not answer or runs a binary that does not support it.
pub async fn finalize(
    context: &Context,
    identity: &str,
    request: pb::FinalizeUpgradeRequest,
) -> Result<pb::ClusterVersion, Status> {
    required_reason(
        &request.reason,
        "say why the cluster's version is raised now: it goes into the audit log",
    )?;
    context.current().await?;
    let before = show(context).await;
    if let Some(silent) = before.members.iter().find(|member| !member.answered) {
        return Err(Status::failed_precondition(format!(
            "member {} ({}) did not answer: every member must say which versions its binary \
             supports before the cluster's version is raised",
            silent.id, silent.address
        )));
    }
    let target = match request.version {
        0 => version::CURRENT,
        asked => asked,
    };
    if target <= before.cluster_version {
        return Err(invalid(
            "version",
            format!(
                "the cluster already runs version {}: nothing to raise",
                before.cluster_version
            ),
        ));
    }
    if let Some(older) = before
        .members
        .iter()
        .find(|member| member.max_cluster_version < target || member.min_cluster_version > target)
    {
        let fix = if older.max_cluster_version < target {
            "upgrade it before raising the cluster to"
        } else {
            "it cannot run at"
        };
        let range = if older.min_cluster_version == older.max_cluster_version {
            format!("only cluster version {}", older.max_cluster_version)
        } else {
            format!(
                "cluster versions {} to {}",
                older.min_cluster_version, older.max_cluster_version
            )
        };
        return Err(Status::failed_precondition(format!(
            "member {} ({}) runs release {}, which applies {range}: {fix} version {target}",
            older.id, older.address, older.release
        )));
    }
    context
        .propose(
            identity,
            &request.request_id,
            CommandKind::SetClusterVersion {
                version: target,
                members: before.members.iter().map(|member| member.id).collect(),
                reason: request.reason,
            },
        )
        .await?;
    info!(
        identity,
        from = before.cluster_version,
        to = target,
        "Cluster version raised."
    );
    Ok(show(context).await)
}
