//! `rewindctl cluster version` and `cluster upgrade-finalize`.

use std::process::ExitCode;

use rewind_proto::v1 as pb;

use crate::client::{Client, explain, request_id};
use crate::output::{Format, json, table};

pub async fn show(client: &mut Client, format: Format) -> anyhow::Result<ExitCode> {
    let version = client
        .get_cluster_version(pb::GetClusterVersionRequest {})
        .await
        .map_err(explain)?
        .into_inner();
    print(&version, format)
}

pub async fn finalize(
    client: &mut Client,
    format: Format,
    to: u32,
    reason: String,
) -> anyhow::Result<ExitCode> {
    let before = client
        .get_cluster_version(pb::GetClusterVersionRequest {})
        .await
        .map_err(explain)?
        .into_inner()
        .cluster_version;
    let after = client
        .finalize_upgrade(pb::FinalizeUpgradeRequest {
            request_id: request_id(),
            version: to,
            reason,
        })
        .await
        .map_err(explain)?
        .into_inner();
    if !format.is_structured() {
        say!("cluster version {before} -> {}", after.cluster_version);
    }
    print(&after, format)
}

fn print(version: &pb::ClusterVersion, format: Format) -> anyhow::Result<ExitCode> {
    if format.is_structured() {
        json(version)?;
        return Ok(ExitCode::SUCCESS);
    }
    say!("cluster version {}", version.cluster_version);
    match version.finalizable_to {
        0 => say!("a member did not answer: the version cannot be raised now"),
        to if to > version.cluster_version => {
            say!(
                "every member supports {to}: `rewindctl cluster upgrade-finalize --reason ...` raises it"
            )
        }
        _ => say!("no member supports a higher version"),
    }
    let rows = version
        .members
        .iter()
        .map(|member| {
            let supports = if member.answered {
                format!(
                    "{}..{}",
                    member.min_cluster_version, member.max_cluster_version
                )
            } else {
                "no answer".into()
            };
            vec![
                member.id.to_string(),
                member.address.clone(),
                member.release.clone(),
                supports,
            ]
        })
        .collect();
    table(&["MEMBER", "ADDRESS", "RELEASE", "SUPPORTS"], rows);
    for change in &version.changes {
        say!("version {}: {}", change.version, change.summary);
    }
    Ok(ExitCode::SUCCESS)
}
