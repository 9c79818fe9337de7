//! `rewindctl env diff A B`: environment parity, service by service. For each service that runs
//! in either environment it compares what its hosts run now (asked of their agents, live: the
//! release `current` points at and its digest, each config and env file's content, the facts:
//! schema version, unit, packages, container image) and the flags set for it, and names every
//! difference with how many hosts hold each value. Env files are compared through one keyed
//! digest for every host asked, so no plain hash of a secret leaves a host.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use clap::Subcommand;
use rewind_proto::v1 as pb;

use crate::client::{self, explain};
use crate::output::{Format, json};

#[derive(Clone, Subcommand)]
pub enum EnvCommand {
    /// Compare two environments service by service (staging against prod, say): releases,
    /// config and env file contents, schema versions and other facts, flags. Exit 1 when they
    /// differ.
    Diff {
        first: String,
        second: String,
        /// Only this service.
        #[arg(long, default_value = "")]
        service: String,
        /// Hosts asked per service and environment (the first connected ones by name).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=200))]
        max_hosts: u32,
    },
}

pub(crate) async fn env(
    client: &mut client::Client,
    format: Format,
    command: EnvCommand,
) -> anyhow::Result<ExitCode> {
    let EnvCommand::Diff {
        first,
        second,
        service,
        max_hosts,
    } = command;
    let hosts = crate::cmd::fleet::all_hosts(client).await?;
    let environments = [first.as_str(), second.as_str()];
    let services: BTreeSet<String> = hosts
        .iter()
        .filter(|host| environments.contains(&crate::cmd::fleet::environment_of(host)))
        .flat_map(|host| host.services.iter().cloned())
        .filter(|name| service.is_empty() || *name == service)
        .collect();
    if services.is_empty() {
        anyhow::bail!(
            "no host of environment {first:?} or {second:?} runs {}",
            if service.is_empty() {
                "any service".to_string()
            } else {
                format!("service {service:?}")
            }
        );
    }
    // One key for every host asked, so their env files' keyed digests compare.
    let compare_token: [u8; 32] = rand::random();
    let mut report = Vec::new();
    for name in &services {
        let mut profiles = Vec::new();
        for environment in environments {
            let mut chosen: Vec<&pb::Host> = hosts
                .iter()
                .filter(|host| {
                    crate::cmd::fleet::environment_of(host) == environment
                        && host.services.contains(name)
                })
                .collect();
            chosen.sort_by_key(|host| (!host.connected, host.host_id.clone()));
            let total = chosen.len();
            chosen.truncate(max_hosts as usize);
            let mut profile = Profile {
                environment: environment.to_string(),
                hosts: total,
                ..Profile::default()
            };
            for host in chosen {
                let asked = client
                    .inspect_host(pb::InspectHostRequest {
                        host_id: host.host_id.clone(),
                        service: name.clone(),
                        mode: pb::InspectMode::InspectLive.into(),
                        compare_token: compare_token.to_vec(),
                    })
                    .await;
                match asked {
                    Ok(answer) => {
                        for state in answer.into_inner().services {
                            profile.add(&host.host_id, &state);
                        }
                    }
                    Err(status) => profile.unasked.push(format!(
                        "{} ({})",
                        host.host_id,
                        explain(status)
                            .to_string()
                            .lines()
                            .next()
                            .unwrap_or_default()
                    )),
                }
            }
            let flags = client
                .list_flags(pb::ListFlagsRequest {
                    environment: environment.to_string(),
                    service: name.clone(),
                })
                .await
                .map_err(explain)?
                .into_inner()
                .flags;
            for flag in flags {
                let value = if flag.enabled { "on" } else { "off" };
                profile.hold(&format!("flag {}", flag.name), value, "");
            }
            profiles.push(profile);
        }
        report.push((name.clone(), differences(&profiles), profiles));
    }
    let differ = report.iter().any(|(_, lines, _)| !lines.is_empty());
    if format.is_structured() {
        let shown: Vec<serde_json::Value> = report
            .iter()
            .map(|(name, lines, profiles)| {
                serde_json::json!({
                    "service": name,
                    "differences": lines,
                    "environments": profiles.iter().map(Profile::to_json).collect::<Vec<_>>(),
                })
            })
            .collect();
        json(&shown)?;
    } else {
        for (name, lines, profiles) in &report {
            let counts: Vec<String> = profiles
                .iter()
                .map(|profile| {
                    format!(
                        "{} {} of {} hosts",
                        profile.environment, profile.asked, profile.hosts
                    )
                })
                .collect();
            if lines.is_empty() {
                say!("{name}: same in both ({})", counts.join(", "));
            } else {
                say!("{name}: differs ({}):", counts.join(", "));
                for line in lines {
                    say!("  {line}");
                }
            }
            for profile in profiles
                .iter()
                .filter(|profile| !profile.unasked.is_empty())
            {
                say!(
                    "  not asked in {}: {}",
                    profile.environment,
                    profile.unasked.join(", ")
                );
            }
        }
    }
    Ok(if differ {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// What one environment's hosts of a service hold: per aspect (`release`, a file's path, a
/// fact, a flag), each value with the hosts holding it.
#[derive(Default)]
struct Profile {
    environment: String,
    /// Hosts of the service there, and how many answered.
    hosts: usize,
    asked: usize,
    aspects: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    unasked: Vec<String>,
}

impl Profile {
    fn hold(&mut self, aspect: &str, value: &str, host: &str) {
        let holders = self
            .aspects
            .entry(aspect.to_string())
            .or_default()
            .entry(value.to_string())
            .or_default();
        if !host.is_empty() {
            holders.push(host.to_string());
        }
    }

    fn add(&mut self, host: &str, state: &pb::ServiceState) {
        self.asked += 1;
        let or_none = |text: &str| {
            if text.is_empty() {
                "(none)".to_string()
            } else {
                text.to_string()
            }
        };
        self.hold("release", &or_none(&state.release_link), host);
        self.hold("release digest", &or_none(&state.release_digest), host);
        for file in &state.files {
            let aspect = if file.env {
                format!("env {}", file.path)
            } else {
                file.path.clone()
            };
            let value = match file.sha256.as_str() {
                "" => "absent".to_string(),
                digest => short(digest).to_string(),
            };
            self.hold(&aspect, &value, host);
        }
        for fact in &state.facts {
            let (aspect, value) = fact.split_once(": ").unwrap_or((fact, ""));
            // Flags are compared from the coordinator's record, not the file.
            if aspect != "flags" {
                self.hold(aspect, value, host);
            }
        }
    }

    /// `value (n hosts)` for each value of `aspect`, or `unset`.
    fn describe(&self, aspect: &str) -> String {
        let Some(values) = self.aspects.get(aspect) else {
            return "unset".into();
        };
        values
            .iter()
            .map(|(value, holders)| {
                if holders.is_empty() {
                    value.clone()
                } else {
                    format!("{value} ({})", crate::output::plural(holders.len(), "host"))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn values(&self, aspect: &str) -> BTreeSet<&String> {
        self.aspects
            .get(aspect)
            .map(|values| values.keys().collect())
            .unwrap_or_default()
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "environment": self.environment,
            "hosts": self.hosts,
            "asked": self.asked,
            "not_asked": self.unasked,
            "aspects": self.aspects,
        })
    }
}

/// Each aspect whose values differ between the two environments (or within one of them).
fn differences(profiles: &[Profile]) -> Vec<String> {
    let [first, second] = profiles else {
        return Vec::new();
    };
    let aspects: BTreeSet<&String> = first.aspects.keys().chain(second.aspects.keys()).collect();
    aspects
        .into_iter()
        .filter(|aspect| {
            let (a, b) = (first.values(aspect), second.values(aspect));
            a != b || a.len() > 1
        })
        .map(|aspect| {
            format!(
                "{aspect}: {} {} | {} {}",
                first.environment,
                first.describe(aspect),
                second.environment,
                second.describe(aspect)
            )
        })
        .collect()
}

/// A digest as people compare it by eye: its first 12 hex digits.
fn short(digest: &str) -> &str {
    let hex = digest.rsplit(':').next().unwrap_or(digest);
    rewind_shared::names::truncate(hex, 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(link: &str, config: &str) -> pb::ServiceState {
        pb::ServiceState {
            service: "web".into(),
            release_link: link.into(),
            files: vec![pb::ManagedFile {
                path: "config/app.toml".into(),
                sha256: config.into(),
                ..Default::default()
            }],
            facts: vec!["schema version: 0002 (sha256:ab)".into()],
            ..Default::default()
        }
    }

    #[test]
    fn only_what_differs_is_named_with_its_hosts() {
        let mut staging = Profile {
            environment: "staging".into(),
            ..Profile::default()
        };
        staging.add("s-1", &state("releases/v2", "aaaaaaaaaaaaaaaa"));
        staging.hold("flag new-checkout", "on", "");
        let mut prod = Profile {
            environment: "prod".into(),
            ..Profile::default()
        };
        prod.add("p-1", &state("releases/v1", "aaaaaaaaaaaaaaaa"));
        prod.add("p-2", &state("releases/v1", "bbbbbbbbbbbbbbbb"));
        assert_eq!(
            differences(&[staging, prod]),
            vec![
                "config/app.toml: staging aaaaaaaaaaaa (1 host) | prod aaaaaaaaaaaa (1 host), \
                 bbbbbbbbbbbb (1 host)",
                "flag new-checkout: staging on | prod unset",
                "release: staging releases/v2 (1 host) | prod releases/v1 (2 hosts)",
            ]
        );
    }
}
