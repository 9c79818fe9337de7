//! `rewindctl incident`: each rollback as an incident (`in-N` for `rb-N`): its times, people and
//! timeline, notes, and a root-cause analysis to close it with.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use rewind_proto::v1 as pb;

use crate::client::{self, explain, request_id};
use crate::commands::{PageArgs, next_page};
use crate::output::{Format, json, table, time};

/// Largest analysis file read (the coordinator keeps at most 64 KiB).
const MAX_RCA_FILE_BYTES: u64 = 64 * 1024;
/// Timeline events the analysis template lists: it must stay well within that size.
const MAX_SUMMARY_EVENTS: usize = 100;

#[derive(Clone, Subcommand)]
pub enum IncidentCommand {
    /// Incidents, newest first: one per rollback, with its times to detect, mitigate and recover.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// An incident: trigger and evidence, scope, times, people, escalations, timeline, notes.
    Show { incident_id: String },
    /// Add a note to an incident's record (who and when are recorded).
    Note { incident_id: String, text: String },
    /// Print a root-cause analysis template for the incident, filled in with what is known.
    RcaTemplate { incident_id: String },
    /// Close the incident with its root-cause analysis (markdown, e.g. from rca-template); the
    /// bullets under "## Action items" and "## Lessons" are kept for the service's runbook.
    Close {
        incident_id: String,
        #[arg(long, value_name = "FILE")]
        rca: PathBuf,
    },
    /// The whole incident as markdown (a postmortem document) or JSON.
    Export {
        incident_id: String,
        #[arg(long, value_enum, default_value_t = ExportFormat::Markdown)]
        format: ExportFormat,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Markdown,
    Json,
}

pub(crate) async fn incident(
    client: &mut client::Client,
    format: Format,
    command: IncidentCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        IncidentCommand::List { page } => {
            let listed = client
                .list_incidents(pb::ListIncidentsRequest {
                    page_size: page.page_size,
                    page_token: page.page_token,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&listed)?;
                return Ok(ExitCode::SUCCESS);
            }
            let rows = listed
                .incidents
                .iter()
                .map(|incident| {
                    vec![
                        incident.incident_id.clone(),
                        incident.status.clone(),
                        incident.rollback_state.clone(),
                        incident.services.join(","),
                        incident.trigger.clone(),
                        since(incident.impact_started_at_ms, incident.detected_at_ms),
                        since(incident.impact_started_at_ms, incident.mitigated_at_ms),
                        since(incident.impact_started_at_ms, incident.recovered_at_ms),
                    ]
                })
                .collect();
            table(
                &[
                    "INCIDENT", "STATUS", "ROLLBACK", "SERVICES", "TRIGGER", "DETECT", "MITIGATE",
                    "RECOVER",
                ],
                rows,
            );
            next_page("incident list", page.page_size, &listed.next_page_token);
            Ok(ExitCode::SUCCESS)
        }
        IncidentCommand::Show { incident_id } => {
            let incident = fetch(client, incident_id).await?;
            if format.is_structured() {
                json(&incident)?;
            } else {
                say!("{}", markdown(&incident));
            }
            Ok(ExitCode::SUCCESS)
        }
        IncidentCommand::Note { incident_id, text } => {
            let incident = client
                .note_incident(pb::NoteIncidentRequest {
                    request_id: request_id(),
                    incident_id,
                    text,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&incident)?;
            } else {
                say!(
                    "{}: note {} recorded",
                    incident.incident_id,
                    incident.notes.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        IncidentCommand::RcaTemplate { incident_id } => {
            let incident = fetch(client, incident_id).await?;
            say!("{}", rca_template(&incident));
            Ok(ExitCode::SUCCESS)
        }
        IncidentCommand::Close { incident_id, rca } => {
            let rca_markdown = read_rca(&rca)?;
            let incident = client
                .close_incident(pb::CloseIncidentRequest {
                    request_id: request_id(),
                    incident_id,
                    rca_markdown,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&incident)?;
            } else {
                say!(
                    "{} closed: {} action items and {} lessons kept for the runbook of {}",
                    incident.incident_id,
                    incident.action_items.len(),
                    incident.lessons.len(),
                    incident.services.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        IncidentCommand::Export {
            incident_id,
            format: export,
        } => {
            let incident = fetch(client, incident_id).await?;
            match export {
                ExportFormat::Json => crate::output::print_json(&incident)?,
                ExportFormat::Markdown => say!("{}", markdown(&incident)),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn fetch(client: &mut client::Client, incident_id: String) -> anyhow::Result<pb::Incident> {
    let request = pb::GetIncidentRequest { incident_id };
    Ok(client
        .get_incident(request)
        .await
        .map_err(explain)?
        .into_inner())
}

fn read_rca(path: &PathBuf) -> anyhow::Result<String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_RCA_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("read {} (markdown, UTF-8)", path.display()))?;
    if text.len() as u64 > MAX_RCA_FILE_BYTES {
        anyhow::bail!(
            "{} is larger than {MAX_RCA_FILE_BYTES} bytes, the most an analysis may be",
            path.display()
        );
    }
    Ok(text)
}

/// How long after `start_ms` `at_ms` came, or `-` if it has not.
fn since(start_ms: u64, at_ms: u64) -> String {
    if at_ms == 0 || start_ms == 0 {
        return "-".into();
    }
    let seconds = at_ms.saturating_sub(start_ms) / 1000;
    humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string()
}

fn or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// The facts every document about the incident starts with.
fn facts(incident: &pb::Incident, out: &mut String) {
    let start = incident.impact_started_at_ms;
    let _ = writeln!(
        out,
        "- Rollback: {} ({}, {})",
        incident.rollback_id, incident.trigger, incident.rollback_state
    );
    if incident.archived_at_ms != 0 {
        let _ = writeln!(
            out,
            "- Archived: {} (read only: it takes no more notes)",
            time(incident.archived_at_ms)
        );
    }
    let _ = writeln!(out, "- Evidence: {}", incident.evidence);
    for alert in &incident.alerts {
        let _ = writeln!(out, "  - alert: {alert}");
    }
    let _ = writeln!(out, "- Services: {}", or_none(&incident.services));
    let _ = writeln!(out, "- Environments: {}", or_none(&incident.environments));
    let _ = writeln!(out, "- Changes: {}", or_none(&incident.change_ids));
    let _ = writeln!(out, "- Hosts: {}", or_none(&incident.hosts));
    let _ = writeln!(out, "- Impact began: {}", time(start));
    let _ = writeln!(
        out,
        "- Time to detect: {} (asked for at {})",
        since(start, incident.detected_at_ms),
        time(incident.detected_at_ms)
    );
    let mitigated = if incident.mitigated_at_ms == 0 {
        "not yet".to_string()
    } else {
        format!(
            "{} ({})",
            since(start, incident.mitigated_at_ms),
            incident.mitigated_by
        )
    };
    let _ = writeln!(out, "- Time to mitigate: {mitigated}");
    let recovered = if incident.recovered_at_ms == 0 {
        "not yet".to_string()
    } else {
        format!(
            "{} (every host verified)",
            since(start, incident.recovered_at_ms)
        )
    };
    let _ = writeln!(out, "- Time to recover: {recovered}");
    let _ = writeln!(out, "- Operators: {}", or_none(&incident.operators));
    let _ = writeln!(out, "- Approvers: {}", or_none(&incident.approvers));
    let _ = writeln!(out, "- Escalations: {}", or_none(&incident.escalations));
    let notices: Vec<String> = incident.notices.iter().map(notice).collect();
    let _ = writeln!(out, "- Incident system: {}", or_none(&notices));
}

/// How one event reached the incident webhook: `trigger delivered at ... (1 attempt)`.
fn notice(notice: &pb::IncidentNotice) -> String {
    let state = if notice.delivered_at_ms != 0 {
        format!("delivered at {}", time(notice.delivered_at_ms))
    } else if notice.given_up {
        format!("given up: {}", notice.detail)
    } else {
        format!("not yet delivered: {}", notice.detail)
    };
    let plural = if notice.attempts == 1 { "" } else { "s" };
    format!(
        "{} {state} ({} attempt{plural})",
        notice.event, notice.attempts
    )
}

/// A note's text, its lines after the first quoted, so that no line of it reads as a heading
/// or a bullet of the document it is in.
fn quoted(text: &str) -> String {
    text.replace('\n', "\n  > ")
}

/// The timeline; `summary` leaves out step-level events (the template must stay within what
/// `incident close` accepts) and stops after [`MAX_SUMMARY_EVENTS`].
fn timeline(incident: &pb::Incident, summary: bool, out: &mut String) {
    let steps = format!("{}/", incident.rollback_id);
    let shown: Vec<&pb::IncidentEvent> = incident
        .timeline
        .iter()
        .filter(|event| !summary || !event.target.starts_with(&steps))
        .collect();
    let cut = if summary {
        MAX_SUMMARY_EVENTS
    } else {
        usize::MAX
    };
    for event in shown.iter().take(cut) {
        let _ = writeln!(
            out,
            "- {} {} {} {}: {}",
            time(event.at_ms),
            event.identity,
            event.action,
            event.target,
            event.outcome
        );
    }
    if incident.timeline.is_empty() {
        let _ = writeln!(out, "- (no audit entries)");
    }
    let left_out =
        (incident.timeline.len() - shown.len().min(cut)) as u64 + incident.timeline_omitted;
    if left_out > 0 {
        let _ = writeln!(
            out,
            "- ... {left_out} more events (steps and flags): rewindctl incident export {}, or the audit log",
            incident.incident_id
        );
    }
}

/// The whole incident as a markdown document.
fn markdown(incident: &pb::Incident) -> String {
    let mut out = format!(
        "# Incident {} ({})\n\n",
        incident.incident_id, incident.status
    );
    facts(incident, &mut out);
    out.push_str("\n## Timeline\n\n");
    timeline(incident, false, &mut out);
    if !incident.notes.is_empty() {
        out.push_str("\n## Notes\n\n");
        for note in &incident.notes {
            let _ = writeln!(
                out,
                "- {} {}: {}",
                time(note.at_ms),
                note.identity,
                quoted(&note.text)
            );
        }
    }
    if incident.closed_at_ms != 0 {
        let _ = write!(
            out,
            "\n## Closed\n\nBy {} at {}.\n\n{}\n",
            incident.closed_by,
            time(incident.closed_at_ms),
            incident.rca_markdown
        );
    }
    out
}

/// A root-cause analysis to fill in (Google SRE's postmortem sections), with what is known.
fn rca_template(incident: &pb::Incident) -> String {
    let mut out = format!(
        "# Root-cause analysis: {} ({})\n\n## Summary\n\n<one paragraph: what broke, for whom, \
         and how it was ended>\n\n## Impact\n\n",
        incident.incident_id,
        incident.services.join(", ")
    );
    facts(incident, &mut out);
    out.push_str("\n## Timeline\n\n");
    timeline(incident, true, &mut out);
    for note in &incident.notes {
        let _ = writeln!(
            out,
            "- {} note by {}: {}",
            time(note.at_ms),
            note.identity,
            quoted(&note.text)
        );
    }
    out.push_str(
        "\n## Contributing causes\n\n- <cause>\n\n## What went well\n\n- <what helped>\n\n\
         ## What went wrong\n\n- <what hurt>\n\n## Action items\n\n- [ ] <action, owner>\n\n\
         ## Lessons\n\n- <what the next on-call should know about this service>\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_has_every_section_and_the_known_times() {
        let incident = pb::Incident {
            incident_id: "in-3".into(),
            rollback_id: "rb-3".into(),
            services: vec!["web".into()],
            impact_started_at_ms: 1_000,
            detected_at_ms: 61_000,
            mitigated_at_ms: 91_000,
            mitigated_by: "web restored on web-1".into(),
            ..pb::Incident::default()
        };
        let template = rca_template(&incident);
        for section in [
            "## Summary",
            "## Impact",
            "## Timeline",
            "## Contributing causes",
            "## What went well",
            "## What went wrong",
            "## Action items",
            "## Lessons",
        ] {
            assert!(template.contains(section), "{section}: {template}");
        }
        assert!(template.contains("Time to detect: 1m"), "{template}");
        assert!(
            template.contains("Time to mitigate: 1m 30s (web restored on web-1)"),
            "{template}"
        );
        assert!(template.contains("Time to recover: not yet"), "{template}");
    }
}
