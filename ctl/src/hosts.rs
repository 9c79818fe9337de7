//! `rewindctl host`: compare captured state between hosts (staging against production
//! parity, two replicas) and show where a host has drifted from its last snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use clap::Subcommand;
use rewind_proto::v1 as pb;

use crate::client::{Client, explain};
use crate::output::{Format, json, time};

#[derive(Clone, Subcommand)]
pub enum HostCommand {
    /// Registered hosts, whether connected, and their latest health, a page at a time.
    List {
        #[command(flatten)]
        page: crate::commands::PageArgs,
    },
    /// Compare two hosts' services: release, release digest, config files (content, mode,
    /// owner) and facts (unit, packages, container image). Exit 1 when they differ.
    Diff {
        first: String,
        second: String,
        /// Only this service.
        #[arg(long, default_value = "")]
        service: String,
        /// Compare the state on disk now instead of the latest snapshots.
        #[arg(long)]
        live: bool,
    },
    /// What changed on a host since rewind last put each service there (its latest activation
    /// or restore; before any, its latest snapshot): hotfixes by hand, edits outside rewind.
    /// Exit 1 when something drifted.
    Drift {
        host: String,
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Accept what changed on a host by hand as what rewind put there (audited, with the
    /// drift accepted): a rollback then no longer refuses the host for it (its restore still
    /// reverts the service to the snapshot taken before the change).
    Adopt {
        host: String,
        /// Only this service (default: every service of the host).
        #[arg(long, default_value = "")]
        service: String,
        /// Why (required: audited).
        #[arg(long)]
        reason: String,
    },
    /// Remove a host from the fleet's record (admin): it stops being a default target and may
    /// register anew with other services. Its certificate stays valid (revoke it with the
    /// policy's deny list). Refused while a change, rollback or schema transaction could still
    /// act on it by name.
    Forget {
        host: String,
        /// Why (required: audited).
        #[arg(long)]
        reason: String,
        /// Also remove its join enrollment (and so the environment it is pinned to), so the
        /// name may be joined anew with a pattern token.
        #[arg(long)]
        release_name: bool,
    },
}

pub async fn run(
    client: &mut Client,
    format: Format,
    command: HostCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        HostCommand::List { page } => crate::cmd::fleet::fleet_list(client, format, page).await,
        HostCommand::Diff {
            first,
            second,
            service,
            live,
        } => {
            let mode = if live {
                pb::InspectMode::InspectLive
            } else {
                pb::InspectMode::InspectCaptured
            };
            // One key for both, so their environment files' keyed digests compare.
            // One token for both: the coordinator keys both hosts' digests alike.
            let compare_token: [u8; 32] = rand::random();
            let left = inspect(client, &first, &service, mode, &compare_token).await?;
            let right = inspect(client, &second, &service, mode, &compare_token).await?;
            if format.is_structured() {
                json(&vec![left.clone(), right.clone()])?;
            }
            let lines = diff_hosts(&left, &right);
            if !format.is_structured() {
                let what = if live {
                    "live state"
                } else {
                    "latest snapshots"
                };
                if lines.is_empty() {
                    say!("{first} and {second} match ({what})");
                }
                for line in &lines {
                    say!("{line}");
                }
            }
            Ok(exit_for(lines.is_empty()))
        }
        HostCommand::Forget {
            host,
            reason,
            release_name,
        } => {
            let forgotten = client
                .forget_host(pb::ForgetHostRequest {
                    request_id: crate::client::request_id(),
                    host_id: host,
                    reason,
                    release_name,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&forgotten)?;
            } else {
                let services = if forgotten.services.is_empty() {
                    "none".to_string()
                } else {
                    forgotten.services.join(",")
                };
                let enrollment = if forgotten.name_released {
                    "; its name may be joined anew"
                } else {
                    ""
                };
                say!(
                    "{} forgotten (it ran {services}){enrollment}",
                    forgotten.host_id
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        HostCommand::Adopt {
            host,
            service,
            reason,
        } => {
            let adopted = client
                .adopt_host_state(pb::AdoptHostStateRequest {
                    host_id: host,
                    service,
                    reason,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&adopted)?;
            } else {
                for state in &adopted.services {
                    say!(
                        "{} on {}: its state now is what rewind put there",
                        state.service,
                        adopted.host_id
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        HostCommand::Drift { host, service } => {
            let answer =
                inspect(client, &host, &service, pb::InspectMode::InspectDrift, &[]).await?;
            if format.is_structured() {
                json(&answer)?;
            }
            let drifted = answer.services.iter().any(|state| !state.drift.is_empty());
            if !format.is_structured() {
                for state in &answer.services {
                    if !state.note.is_empty() {
                        say!("{}: {}", state.service, state.note);
                        continue;
                    }
                    // An agent of an earlier release compares with its latest snapshot only.
                    let against = if state.drift_against.is_empty() {
                        format!(
                            "{} (captured {})",
                            state.snapshot_id,
                            time(state.captured_at_ms)
                        )
                    } else {
                        format!(
                            "{}, {}",
                            state.drift_against,
                            time(state.drift_against_at_ms)
                        )
                    };
                    if state.drift.is_empty() {
                        say!("{}: no drift since {against}", state.service);
                    } else {
                        say!("{}: drifted since {against}:", state.service);
                        for line in &state.drift {
                            say!("  {line}");
                        }
                    }
                }
            }
            Ok(exit_for(!drifted))
        }
    }
}

fn exit_for(same: bool) -> ExitCode {
    if same {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn inspect(
    client: &mut Client,
    host_id: &str,
    service: &str,
    mode: pb::InspectMode,
    compare_token: &[u8],
) -> anyhow::Result<pb::InspectHostResponse> {
    Ok(client
        .inspect_host(pb::InspectHostRequest {
            host_id: host_id.to_string(),
            service: service.to_string(),
            mode: mode.into(),
            compare_token: compare_token.to_vec(),
        })
        .await
        .map_err(explain)?
        .into_inner())
}

/// One line per difference between two hosts' services, `service: what`.
pub fn diff_hosts(left: &pb::InspectHostResponse, right: &pb::InspectHostResponse) -> Vec<String> {
    let by_service = |answer: &pb::InspectHostResponse| -> BTreeMap<String, pb::ServiceState> {
        answer
            .services
            .iter()
            .map(|state| (state.service.clone(), state.clone()))
            .collect()
    };
    let (left_services, right_services) = (by_service(left), by_service(right));
    let (a, b) = (&left.host_id, &right.host_id);
    let mut lines = Vec::new();
    let names: BTreeSet<&String> = left_services.keys().chain(right_services.keys()).collect();
    for name in names {
        match (left_services.get(name), right_services.get(name)) {
            (Some(_), None) => lines.push(format!("{name}: only on {a}")),
            (None, Some(_)) => lines.push(format!("{name}: only on {b}")),
            (Some(left), Some(right)) => lines.extend(
                diff_service(left, right, a, b)
                    .into_iter()
                    .map(|line| format!("{name}: {line}")),
            ),
            (None, None) => {}
        }
    }
    lines
}

fn diff_service(
    left: &pb::ServiceState,
    right: &pb::ServiceState,
    a: &str,
    b: &str,
) -> Vec<String> {
    let mut lines = Vec::new();
    for (host, state) in [(a, left), (b, right)] {
        if !state.note.is_empty() {
            lines.push(format!("{host}: {}", state.note));
        }
    }
    if !lines.is_empty() {
        return lines;
    }
    let shown = |text: &str| {
        if text.is_empty() {
            "(none)".to_string()
        } else {
            text.to_string()
        }
    };
    if left.release_link != right.release_link {
        lines.push(format!(
            "current -> {} on {a}, {} on {b}",
            shown(&left.release_link),
            shown(&right.release_link)
        ));
    }
    if left.release_digest != right.release_digest {
        lines.push(format!(
            "release digest {} on {a}, {} on {b}",
            shown(&left.release_digest),
            shown(&right.release_digest)
        ));
    }
    let files = |state: &pb::ServiceState| -> BTreeMap<String, pb::ManagedFile> {
        state
            .files
            .iter()
            .map(|file| (file.path.clone(), file.clone()))
            .collect()
    };
    let (left_files, right_files) = (files(left), files(right));
    let paths: BTreeSet<&String> = left_files.keys().chain(right_files.keys()).collect();
    for path in paths {
        let env = [&left_files, &right_files]
            .iter()
            .any(|files| files.get(path).is_some_and(|file| file.env));
        let label = if env {
            format!("env {path}")
        } else {
            path.clone()
        };
        let present = |file: Option<&'_ pb::ManagedFile>| -> Option<pb::ManagedFile> {
            file.filter(|file| !file.sha256.is_empty()).cloned()
        };
        match (
            present(left_files.get(path)),
            present(right_files.get(path)),
        ) {
            (Some(_), None) => lines.push(format!("{label}: only on {a}")),
            (None, Some(_)) => lines.push(format!("{label}: only on {b}")),
            (Some(left), Some(right)) => {
                if left.sha256 != right.sha256 {
                    lines.push(format!(
                        "{label}: content differs ({} bytes on {a}, {} bytes on {b})",
                        left.size, right.size
                    ));
                }
                if left.mode != right.mode {
                    lines.push(format!(
                        "{label}: mode {:o} on {a}, {:o} on {b}",
                        left.mode, right.mode
                    ));
                }
                if (left.uid, left.gid) != (right.uid, right.gid) {
                    lines.push(format!(
                        "{label}: owner {}:{} on {a}, {}:{} on {b}",
                        left.uid, left.gid, right.uid, right.gid
                    ));
                }
            }
            (None, None) => {}
        }
    }
    let facts = |state: &pb::ServiceState| -> BTreeMap<String, String> {
        state
            .facts
            .iter()
            .map(|line| match line.split_once(": ") {
                Some((key, value)) => (key.to_string(), value.to_string()),
                None => (line.clone(), String::new()),
            })
            .collect()
    };
    let (left_facts, right_facts) = (facts(left), facts(right));
    let keys: BTreeSet<&String> = left_facts.keys().chain(right_facts.keys()).collect();
    for key in keys {
        let (l, r) = (left_facts.get(key), right_facts.get(key));
        if l != r {
            lines.push(format!(
                "{key}: {} on {a}, {} on {b}",
                l.map_or("(none)", String::as_str),
                r.map_or("(none)", String::as_str)
            ));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, sha: &str, mode: u32) -> pb::ManagedFile {
        pb::ManagedFile {
            path: path.into(),
            sha256: sha.into(),
            mode,
            uid: 0,
            gid: 0,
            size: 10,
            env: false,
        }
    }

    fn host(id: &str, services: Vec<pb::ServiceState>) -> pb::InspectHostResponse {
        pb::InspectHostResponse {
            host_id: id.into(),
            services,
        }
    }

    #[test]
    fn a_diff_names_every_difference_and_nothing_else() {
        let web = |link: &str, files: Vec<pb::ManagedFile>, facts: &[&str]| pb::ServiceState {
            service: "web".into(),
            release_link: link.into(),
            release_digest: format!("sha256:{link}"),
            files,
            facts: facts.iter().map(|fact| fact.to_string()).collect(),
            ..Default::default()
        };
        let staging = host(
            "stage-1",
            vec![web(
                "releases/v2",
                vec![file("app.toml", "aa", 0o644), file("env", "cc", 0o600)],
                &["package nginx: 1.22", "unit web.service: active, enabled"],
            )],
        );
        let production = host(
            "prod-1",
            vec![
                web(
                    "releases/v1",
                    vec![file("app.toml", "bb", 0o640), file("env", "", 0)],
                    &["package nginx: 1.24", "unit web.service: active, enabled"],
                ),
                pb::ServiceState {
                    service: "api".into(),
                    ..Default::default()
                },
            ],
        );
        let lines = diff_hosts(&staging, &production);
        assert_eq!(
            lines,
            [
                "api: only on prod-1",
                "web: current -> releases/v2 on stage-1, releases/v1 on prod-1",
                "web: release digest sha256:releases/v2 on stage-1, sha256:releases/v1 on prod-1",
                "web: app.toml: content differs (10 bytes on stage-1, 10 bytes on prod-1)",
                "web: app.toml: mode 644 on stage-1, 640 on prod-1",
                "web: env: only on stage-1",
                "web: package nginx: 1.22 on stage-1, 1.24 on prod-1",
            ]
        );
        assert!(diff_hosts(&staging, &staging).is_empty());
    }
}
