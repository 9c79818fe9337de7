//! `rewindctl fleet`: the hosts the coordinator knows and how they are.

use std::process::ExitCode;

use clap::Subcommand;
use rewind_proto::v1 as pb;

use crate::client::{self, explain};
use crate::output::{Format, json, table};

#[derive(Clone, Subcommand)]
pub enum FleetCommand {
    /// Registered hosts, whether connected, and their latest health.
    List {
        #[command(flatten)]
        page: crate::commands::PageArgs,
    },
}

pub(crate) async fn fleet_list(
    client: &mut client::Client,
    format: Format,
    page: crate::commands::PageArgs,
) -> anyhow::Result<ExitCode> {
    let page_size = page.page_size;
    let hosts = client
        .list_hosts(pb::ListHostsRequest {
            page_token: page.page_token,
            page_size,
        })
        .await
        .map_err(explain)?
        .into_inner();
    if format.is_structured() {
        json(&hosts)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows = hosts
        .hosts
        .iter()
        .map(|host| {
            let labels = host.labels.clone().unwrap_or_default();
            let health = host.last_health.as_ref().map_or_else(
                || "-".to_string(),
                |report| {
                    let failing = report.probes.iter().filter(|probe| !probe.ok).count();
                    format!(
                        "{}/{} probes ok",
                        report.probes.len() - failing,
                        report.probes.len()
                    )
                },
            );
            // Drift from what rewind last put there, over the host's services.
            let drift = host.last_health.as_ref().map_or_else(
                || "-".to_string(),
                |report| {
                    let drifted: Vec<String> = report
                        .drift
                        .iter()
                        .filter(|drift| {
                            !drift.changes.is_empty() || drift.more > 0 || !drift.error.is_empty()
                        })
                        .map(|drift| {
                            if drift.error.is_empty() {
                                format!(
                                    "{} ({})",
                                    drift.service,
                                    drift.changes.len() + drift.more as usize
                                )
                            } else {
                                format!("{} (error)", drift.service)
                            }
                        })
                        .collect();
                    match (report.drift.is_empty(), drifted.is_empty()) {
                        (true, _) => "-".into(),
                        (false, true) => "none".into(),
                        (false, false) => drifted.join(","),
                    }
                },
            );
            vec![
                host.host_id.clone(),
                if host.connected {
                    "connected".into()
                } else {
                    "disconnected".into()
                },
                labels.region,
                labels.environment,
                host.services.join(","),
                health,
                drift,
            ]
        })
        .collect::<Vec<_>>();
    let mut headers = vec![
        "HOST", "AGENT", "REGION", "ENV", "SERVICES", "HEALTH", "DRIFT",
    ];
    let mut rows = rows;
    crate::output::with_wide_columns(
        format,
        &mut headers,
        &mut rows,
        &["ZONE", "AGENT VERSION", "IDENTITY", "REGISTERED"],
        |index| {
            let host = &hosts.hosts[index];
            vec![
                host.labels.clone().unwrap_or_default().zone,
                host.agent_version.clone(),
                host.identity.clone(),
                crate::output::time(host.registered_at_ms),
            ]
        },
    );
    table(&headers, rows);
    for host in hosts
        .hosts
        .iter()
        .filter(|host| !host.last_offline.is_empty())
    {
        say!("{} was {}", host.host_id, host.last_offline);
    }
    crate::commands::next_page("host list", page_size, &hosts.next_page_token);
    Ok(ExitCode::SUCCESS)
}

/// Most pages of hosts read at once (a page is at most 1,000 hosts and 2 MiB).
const MAX_HOST_PAGES: usize = 1000;

/// Every registered host, page after page.
pub(crate) async fn all_hosts(client: &mut client::Client) -> anyhow::Result<Vec<pb::Host>> {
    let mut hosts = Vec::new();
    let mut page_token = String::new();
    for _ in 0..MAX_HOST_PAGES {
        let page = client
            .list_hosts(pb::ListHostsRequest {
                page_token,
                page_size: 1000,
            })
            .await
            .map_err(explain)?
            .into_inner();
        hosts.extend(page.hosts);
        page_token = page.next_page_token;
        if page_token.is_empty() {
            return Ok(hosts);
        }
    }
    anyhow::bail!(
        "more hosts than {MAX_HOST_PAGES} pages hold ({} read): not all of them could be read",
        hosts.len()
    )
}

/// A host's environment, `default` when it carries none (as plans count it).
pub(crate) fn environment_of(host: &pb::Host) -> &str {
    match host
        .labels
        .as_ref()
        .map(|labels| labels.environment.as_str())
    {
        None | Some("") => "default",
        Some(environment) => environment,
    }
}
