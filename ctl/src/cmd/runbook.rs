//! `rewindctl runbook`: a service's rollback runbook, generated from what the cluster knows of
//! it (recipe, policy, gates, dependencies) and what its past incidents taught.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use rewind_proto::v1 as pb;

use crate::client::{self, explain};
use crate::output::{Format, json, time};

/// The steps each host goes through when a service names none.
const DEFAULT_STEPS: [&str; 5] = ["drain", "restore", "restart", "verify", "undrain"];

#[derive(Clone, Subcommand)]
pub enum RunbookCommand {
    /// Print the service's rollback runbook (markdown).
    Show { service: String },
    /// Write the runbook to a file (markdown); refused if the file exists.
    Export {
        service: String,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

pub(crate) async fn runbook(
    client: &mut client::Client,
    format: Format,
    command: RunbookCommand,
) -> anyhow::Result<ExitCode> {
    let (service, out) = match command {
        RunbookCommand::Show { service } => (service, None),
        RunbookCommand::Export { service, out } => (service, Some(out)),
    };
    let runbook = client
        .get_runbook(pb::GetRunbookRequest { service })
        .await
        .map_err(explain)?
        .into_inner();
    let Some(out) = out else {
        if format.is_structured() {
            json(&runbook)?;
        } else {
            say!("{}", markdown(&runbook));
        }
        return Ok(ExitCode::SUCCESS);
    };
    let text = rewind_shared::names::for_terminal(&markdown(&runbook)).into_owned();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&out)
        .and_then(|mut file| {
            use std::io::Write as _;
            file.write_all(text.as_bytes())
        })
        .with_context(|| {
            format!(
                "write {} (an export never overwrites a file)",
                out.display()
            )
        })?;
    say!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// The runbook as markdown.
fn markdown(runbook: &pb::Runbook) -> String {
    let service = runbook.service.clone().unwrap_or_default();
    let name = &service.name;
    let mut out = format!("# Rollback runbook: {name}\n\n");
    out.push_str("## How a rollback of it runs\n\n");
    let steps: Vec<&str> = if service.rollback_steps.is_empty() {
        DEFAULT_STEPS.to_vec()
    } else {
        service.rollback_steps.iter().map(String::as_str).collect()
    };
    let _ = writeln!(
        out,
        "Each host, wave by wave, goes through: {}.",
        steps.join(" → ")
    );
    if service.synthetics.is_empty() {
        out.push_str(
            "After each wave, the gate compares health with the baseline from before the change.\n",
        );
    } else {
        let checks: Vec<String> = service
            .synthetics
            .iter()
            .map(|check| format!("{} ({})", check.name, check.url))
            .collect();
        let _ = writeln!(
            out,
            "After each wave, the gate compares health with the baseline and runs: {}.",
            checks.join(", ")
        );
    }
    out.push_str("\n## When it rolls back on its own\n\n");
    match &service.policy {
        Some(policy) if policy.auto_rollback => {
            let _ = writeln!(
                out,
                "- when more than {:.0} % of its probes fail for {} s, within {} s of a change",
                policy.max_probe_failure_ratio * 100.0,
                policy.for_s,
                policy.watch_s
            );
            for condition in &policy.conditions {
                let _ = writeln!(
                    out,
                    "- or when {} passes {}{} for {} s",
                    pb::HealthFigure::try_from(condition.figure)
                        .map(|figure| figure.as_str_name().to_lowercase())
                        .unwrap_or_else(|_| "a figure".into()),
                    condition.threshold,
                    if condition.relative_to_baseline {
                        " × the baseline"
                    } else {
                        ""
                    },
                    condition.for_s
                );
            }
        }
        _ => out.push_str("- never: automatic rollback is off; a person starts it.\n"),
    }
    out.push_str("\n## Before you roll back\n\n");
    let _ = writeln!(
        out,
        "- See the plan first: `rewindctl rollback plan --change ch-N` (waves, hosts, gates, \
         readiness), then `rewindctl rollback start ch-N --plan-hash H --reason \"...\"`."
    );
    if !service.depends_on.is_empty() {
        let _ = writeln!(out, "- It calls: {}.", service.depends_on.join(", "));
    }
    if !runbook.consumers.is_empty() {
        let _ = writeln!(
            out,
            "- Called by: {} (a rollback that breaks their API needs is refused unless forced).",
            runbook.consumers.join(", ")
        );
    }
    out.push_str(
        "- In doubt, `rewindctl rollback explain rb-N` says where a rollback is and what moves it on.\n",
    );
    out.push_str("\n## Lessons from past incidents (newest first)\n\n");
    let mut any = false;
    for incident in &runbook.incidents {
        for lesson in &incident.lessons {
            any = true;
            let _ = writeln!(
                out,
                "- {lesson} ({}, closed {})",
                incident.incident_id,
                time(incident.closed_at_ms)
            );
        }
    }
    if !any {
        out.push_str("- none recorded yet\n");
    }
    out.push_str("\n## Action items from past incidents\n\n");
    let mut any = false;
    for incident in &runbook.incidents {
        for item in &incident.action_items {
            any = true;
            let _ = writeln!(out, "- {item} ({})", incident.incident_id);
        }
    }
    if !any {
        out.push_str("- none recorded yet\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runbook_says_how_when_and_what_was_learnt_newest_first() {
        let incident = |number: u64, lesson: &str| pb::Incident {
            incident_id: format!("in-{number}"),
            closed_at_ms: number * 1_000,
            lessons: vec![lesson.into()],
            action_items: vec![format!("item {number}")],
            ..pb::Incident::default()
        };
        let runbook = pb::Runbook {
            service: Some(pb::Service {
                name: "web".into(),
                depends_on: vec!["db".into()],
                policy: Some(pb::HealthPolicy {
                    max_probe_failure_ratio: 0.5,
                    for_s: 30,
                    watch_s: 600,
                    auto_rollback: true,
                    conditions: vec![],
                }),
                ..pb::Service::default()
            }),
            consumers: vec!["api".into()],
            incidents: vec![incident(7, "flags first"), incident(3, "drain longer")],
        };
        let text = markdown(&runbook);
        assert!(
            text.contains("drain → restore → restart → verify → undrain"),
            "{text}"
        );
        assert!(
            text.contains("more than 50 % of its probes fail for 30 s"),
            "{text}"
        );
        assert!(text.contains("Called by: api"), "{text}");
        let newest = text.find("flags first (in-7").unwrap();
        let older = text.find("drain longer (in-3").unwrap();
        assert!(newest < older, "{text}");
        assert!(text.contains("- item 3 (in-3)"), "{text}");
    }
}
