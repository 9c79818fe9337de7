//! The web view's HTML, rendered on the server. maud escapes every value it is given, so text
//! from hosts, reasons and evidence reach the page as text, never as markup.

use axum::http::StatusCode;
use maud::{DOCTYPE, Markup, html};
use rewind_proto::v1::{self as pb, ChangeState, RollbackState, StepState};

use crate::access::Principal;

/// A member's latest verification of its audit chain, as a page shows it.
pub struct AuditStatus {
    intact: Option<bool>,
    entries: u64,
    at_ms: u64,
}

impl AuditStatus {
    pub fn of(check: &crate::audit_check::AuditCheck) -> Self {
        Self {
            intact: check.intact(),
            entries: check.entries(),
            at_ms: check.at_ms(),
        }
    }
}

fn time(ms: u64) -> String {
    if ms == 0 {
        return "—".into();
    }
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(at)
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

fn rollback_state(state: i32) -> &'static str {
    RollbackState::try_from(state).map_or("unknown", RollbackState::short_name)
}

fn step_state(state: i32) -> &'static str {
    StepState::try_from(state).map_or("unknown", StepState::short_name)
}

fn change_state(state: i32) -> &'static str {
    ChangeState::try_from(state).map_or("unknown", ChangeState::short_name)
}

fn layout(title: &str, viewer: Option<&Principal>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · rewind" }
                link rel="stylesheet" href="/ui/static/view.css";
                script src="/ui/static/view.js" defer {}
            }
            body {
                header {
                    a.brand href="/ui" { "rewind" }
                    @if let Some(viewer) = viewer {
                        span.viewer { "viewing as " (viewer.id()) }
                        form.sign-out method="post" action="/ui/sign-out" {
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn audit(status: Option<&AuditStatus>) -> Markup {
    html! {
        @if let Some(status) = status {
            p #audit .audit data-intact=(status.intact.map_or("unknown", |intact| if intact { "yes" } else { "no" })) {
                @match status.intact {
                    Some(true) => { "Audit chain intact: " (status.entries) @if status.entries == 1 { " entry" } @else { " entries" } ", verified by this member at " (time(status.at_ms)) "." }
                    Some(false) => { "AUDIT CHAIN BROKEN at this member's check of " (time(status.at_ms)) ": run rewindctl audit verify." }
                    None => { "Audit chain not verified by this member yet." }
                }
            }
        }
    }
}

pub fn sign_in(problem: Option<&str>, next: &str) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            h1 { "Sign in to the web view" }
            @if let Some(problem) = problem {
                p.problem #problem { (problem) }
            }
            form method="post" action="/ui/sign-in" {
                input type="hidden" name="next" value=(next);
                label for="token" { "Viewer token" }
                input #token type="password" name="token" autocomplete="off" required;
                button type="submit" { "Sign in" }
            }
            p.hint { "Tokens are listed, by their SHA-256, in the coordinator's http.viewer-tokens-file." }
        },
    )
}

pub fn problem(status: StatusCode, message: &str) -> Markup {
    layout(
        status.canonical_reason().unwrap_or("Problem"),
        None,
        html! {
            h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or_default()) }
            p.problem #problem { (message) }
            p { a href="/ui" { "Back to the overview" } }
        },
    )
}

pub fn overview(
    viewer: &Principal,
    rollbacks: &[pb::Rollback],
    changes: &[pb::Change],
    audit_status: Option<&AuditStatus>,
) -> Markup {
    layout(
        "Overview",
        Some(viewer),
        html! {
            h1 { "Rollbacks and changes" }
            (audit(audit_status))
            h2 { "Rollbacks" }
            @if rollbacks.is_empty() { p { "None you may see." } }
            @else {
                table #rollbacks {
                    thead { tr { th { "Rollback" } th { "State" } th { "Services" } th { "Changes" } th { "Started" } th { "By" } th { "Reason" } } }
                    tbody {
                        @for rollback in rollbacks {
                            tr {
                                td { a href={ "/ui/rollbacks/" (rollback.rollback_id) } { (rollback.rollback_id) } }
                                td { span class={ "state " (rollback_state(rollback.state)) } { (rollback_state(rollback.state)) } }
                                td { (rollback.services.join(", ")) }
                                td { (rollback.change_ids.join(", ")) }
                                td { (time(rollback.started_at_ms)) }
                                td { (rollback.started_by) }
                                td { (rollback.reason) }
                            }
                        }
                    }
                }
            }
            h2 { "Changes" }
            @if changes.is_empty() { p { "None you may see." } }
            @else {
                table #changes {
                    thead { tr { th { "Change" } th { "State" } th { "Service" } th { "Version" } th { "Environment" } th { "Started" } th { "By" } } }
                    tbody {
                        @for change in changes {
                            tr {
                                td { a href={ "/ui/changes/" (change.change_id) } { (change.change_id) } }
                                td { span class={ "state " (change_state(change.state)) } { (change_state(change.state)) } }
                                td { (change.service) }
                                td { (change.previous_version) " → " (change.version) }
                                td { (change.environment) }
                                td { (time(change.started_at_ms)) }
                                td { (change.started_by) }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// A rollback's page: its live part, and the script's cue to follow it while it runs.
pub fn rollback(viewer: &Principal, rollback_id: &str, live: Markup, ended: bool) -> Markup {
    layout(
        &format!("Rollback {rollback_id}"),
        Some(viewer),
        html! {
            p.stream { "Updates: " span #stream-status { @if ended { "ended" } @else { "connecting…" } } }
            @if ended {
                div #live { (live) }
            } @else {
                div #live data-stream={ "/ui/rollbacks/" (rollback_id) "/live" } { (live) }
            }
        },
    )
}

/// What of a rollback's page changes as it runs: everything but the frame.
pub fn rollback_live(
    rollback: &pb::Rollback,
    explained: &pb::ExplainRollbackResponse,
    audit_status: Option<&AuditStatus>,
    trace_id: &str,
) -> Markup {
    let state = rollback_state(rollback.state);
    html! {
        h1 { "Rollback " (rollback.rollback_id) " " span #state class={ "state " (state) } data-state=(state) { (state) } }
        dl.summary {
            dt { "Services" } dd { (rollback.services.join(", ")) }
            dt { "Reverts" } dd {
                @for (index, change) in rollback.change_ids.iter().enumerate() {
                    @if index > 0 { ", " }
                    a href={ "/ui/changes/" (change) } { (change) }
                }
            }
            dt { "Trigger" } dd { (rollback.trigger) }
            dt { "Reason" } dd { (rollback.reason) }
            dt { "Started by" } dd { (rollback.started_by) }
            dt { "Started" } dd { (time(rollback.started_at_ms)) }
            dt { "Finished" } dd { (time(rollback.finished_at_ms)) }
            dt { "Hosts at once" } dd { (rollback.max_parallel) }
            dt { "Plan" } dd { code { (rollback.plan_hash) } }
            dt { "Trace" } dd { code #trace { (trace_id) } }
            @if !rollback.paused_reason.is_empty() { dt { "Paused" } dd.problem { (rollback.paused_reason) } }
            @if !rollback.outcome_detail.is_empty() { dt { "Outcome" } dd { (rollback.outcome_detail) } }
            @if !rollback.failed_hosts.is_empty() { dt { "Failed hosts" } dd.problem { (rollback.failed_hosts.join(", ")) } }
        }
        (audit(audit_status))
        h2 { "Waves" }
        @for (index, wave) in rollback.waves.iter().enumerate() {
            (wave_section(rollback, index, wave))
        }
        @if rollback.steps.len() < rollback.steps_total as usize {
            p.hint { "Showing " (rollback.steps.len()) " of " (rollback.steps_total) " steps: rewindctl rollback status pages through the rest." }
        }
        h2 { "Explanation" }
        pre #explanation { (explained.explanation) }
        @if !explained.next_commands.is_empty() {
            h3 { "What you can do" }
            ul { @for command in &explained.next_commands { li { code { (command) } } } }
        }
        h2 { "Timeline" }
        ol #timeline {
            @for (at_ms, text) in timeline(rollback) {
                li { time { (time(at_ms)) } " " (text) }
            }
        }
    }
}

fn wave_section(rollback: &pb::Rollback, index: usize, wave: &pb::RollbackWave) -> Markup {
    let wave_number = u32::try_from(index).unwrap_or(u32::MAX);
    // Each cell looked up once: a wave of a thousand hosts renders in one pass.
    let mut kinds: Vec<&str> = Vec::new();
    let mut steps: std::collections::HashMap<(&str, &str), &pb::RollbackStep> =
        std::collections::HashMap::new();
    for step in rollback
        .steps
        .iter()
        .filter(|step| step.wave == wave_number && step.service == wave.service)
    {
        if !kinds.contains(&step.kind.as_str()) {
            kinds.push(&step.kind);
        }
        steps.insert((step.host_id.as_str(), step.kind.as_str()), step);
    }
    let current = rollback.current_wave == wave_number;
    html! {
        section.wave data-wave=(index) {
            h3 {
                "Wave " (index) ": " (wave.service)
                @if !wave.region.is_empty() { " in " (wave.region) }
                @if wave.canary { " (canary)" }
                @if wave.isolation { " (isolation)" }
                @if current && rollback.state == RollbackState::Running as i32 { " — current" }
            }
            table.steps {
                thead { tr { th { "Host" } @for kind in &kinds { th { (kind) } } } }
                tbody {
                    @for host in &wave.hosts {
                        tr data-host=(host) {
                            td { (host) }
                            @for kind in &kinds {
                                @let step = steps.get(&(host.as_str(), *kind));
                                @match step {
                                    Some(step) => {
                                        td class={ "step " (step_state(step.state)) } title=(step.detail) {
                                            (step_state(step.state))
                                            @if step.attempts > 1 { " ×" (step.attempts) }
                                        }
                                    }
                                    None => { td { "" } }
                                }
                            }
                        }
                    }
                }
            }
            @if !wave.isolation {
                p.gate {
                    "Health gate: "
                    span class={ "state " (step_state(wave.gate)) } { (step_state(wave.gate)) }
                    @if !wave.gate_detail.is_empty() { " — " span.evidence { (wave.gate_detail) } }
                }
            }
        }
    }
}

/// What happened when, from the rollback's record: its start and end, each step's and gate's,
/// and each escalation.
fn timeline(rollback: &pb::Rollback) -> Vec<(u64, String)> {
    let mut events = vec![(
        rollback.started_at_ms,
        format!("started by {}: {}", rollback.started_by, rollback.reason),
    )];
    for step in &rollback.steps {
        if step.started_at_ms != 0 {
            events.push((step.started_at_ms, format!("{} started", step.step_id)));
        }
        if step.finished_at_ms != 0 {
            let detail = if step.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", step.detail)
            };
            events.push((
                step.finished_at_ms,
                format!("{} {}{detail}", step.step_id, step_state(step.state)),
            ));
        }
    }
    for (index, wave) in rollback.waves.iter().enumerate() {
        if wave.gate_started_at_ms != 0 {
            events.push((
                wave.gate_started_at_ms,
                format!("wave {index}'s health gate started"),
            ));
        }
        if wave.gate_finished_at_ms != 0 {
            events.push((
                wave.gate_finished_at_ms,
                format!(
                    "wave {index}'s health gate {}: {}",
                    step_state(wave.gate),
                    wave.gate_detail
                ),
            ));
        }
    }
    for escalation in &rollback.escalations {
        events.push((
            escalation.opened_at_ms,
            format!(
                "escalated at wave {}: {}",
                escalation.wave, escalation.evidence
            ),
        ));
    }
    if rollback.finished_at_ms != 0 {
        events.push((
            rollback.finished_at_ms,
            rollback_state(rollback.state).to_string(),
        ));
    }
    // Stable: events of one moment keep the order above.
    events.sort_by_key(|(at_ms, _)| *at_ms);
    events
}

pub fn change(viewer: &Principal, change: &pb::Change) -> Markup {
    let state = change_state(change.state);
    layout(
        &format!("Change {}", change.change_id),
        Some(viewer),
        html! {
            h1 { "Change " (change.change_id) " " span #state class={ "state " (state) } data-state=(state) { (state) } }
            dl.summary {
                dt { "Service" } dd { (change.service) }
                dt { "Environment" } dd { (change.environment) }
                dt { "Version" } dd { (change.previous_version) " → " (change.version) }
                dt { "Reason" } dd { (change.reason) }
                dt { "Started by" } dd { (change.started_by) }
                dt { "Started" } dd { (time(change.started_at_ms)) }
                dt { "Deployed" } dd { (time(change.deployed_at_ms)) }
                @if !change.rollback_id.is_empty() {
                    dt { "Rolled back by" } dd { a href={ "/ui/rollbacks/" (change.rollback_id) } { (change.rollback_id) } }
                }
                @if !change.flags.is_empty() {
                    dt { "Flags" } dd { @for flag in &change.flags { (flag.name) " (was " (flag.before) ") " } }
                }
                @if !change.schema.is_empty() { dt { "Schema" } dd { (change.schema.join(", ")) } }
            }
            h2 { "Hosts" }
            table.steps {
                thead { tr { th { "Host" } th { "capture" } th { "activate" } th { "Snapshot" } th { "Reverted on its own" } } }
                tbody {
                    @for host in &change.hosts {
                        tr data-host=(host.host_id) {
                            td { (host.host_id) }
                            td class={ "step " (step_state(host.capture)) } { (step_state(host.capture)) }
                            td class={ "step " (step_state(host.activate)) } { (step_state(host.activate)) }
                            td { code { (host.snapshot_id) } }
                            td { (host.self_reverted) }
                        }
                    }
                }
            }
        },
    )
}
