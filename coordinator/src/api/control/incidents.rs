//! Incidents: every rollback, automatic or manual, is one (`in-N` for `rb-N`). Its times,
//! people and timeline are read from the rollback, its changes, triggers and escalations and
//! the audit log; only what people add (notes, the root-cause analysis) is recorded for it.

use std::collections::BTreeSet;
use std::sync::Arc;

use rewind_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{Control, archive};
use crate::api::gate::caller;
use crate::api::status::{invalid, to_status};
use crate::api::targets;
use crate::api::validate::{PageRequest, within_bytes};
use crate::state_machine::archive::{ArchiveKind, ArchivedRecord, ArchivedRollback};
use crate::state_machine::*;

/// Most step-level and flag events an incident's timeline shows; the rest are counted, and the
/// audit log has them all. The rollback's own, its request's, its changes' and the incident's
/// entries are always shown.
const MAX_DETAIL_EVENTS: usize = 1000;

/// How far back a leader's clock may have stepped: the audit is searched from this long before
/// the impact began (entries are in index order; times only nearly so).
const CLOCK_SLACK_MS: u64 = 10 * 60 * 1000;

/// The incident of rollback `record`; `detailed` adds the timeline, notes and analysis.
pub fn incident(
    state: &State,
    record: &RollbackRecord,
    detailed: bool,
) -> Result<pb::Incident, Status> {
    let number = record.number;
    let changes: Vec<&ChangeRecord> = record
        .changes
        .iter()
        .filter_map(|change| state.changes.get(change))
        .collect();
    let impact_started_at_ms = changes
        .iter()
        .map(|change| change.started_at_ms)
        .min()
        .unwrap_or(record.started_at_ms);
    let environments: BTreeSet<String> = changes
        .iter()
        .map(|change| change.environment.clone())
        .collect();
    let scope = Scope::of(record, &environments, impact_started_at_ms);
    let alerts: Vec<&TriggerRecord> = state
        .triggers
        .iter()
        .filter(|trigger| trigger.rollback == number)
        .collect();
    let request = state.approval_requests.get(&record.request);
    let audit = &state.audit;
    let from = audit
        .partition_point(|entry| entry.at_ms.saturating_add(CLOCK_SLACK_MS) < impact_started_at_ms)
        .map_err(super::audit::store_unreadable)?;
    // A summary reads only the rollback's own stretch of the log; the detail reads on to the
    // incident's notes and close.
    let to = match (detailed, record.status.is_terminal()) {
        (false, true) => audit
            .partition_point(|entry| {
                entry.at_ms <= record.finished_at_ms.saturating_add(CLOCK_SLACK_MS)
            })
            .map_err(super::audit::store_unreadable)?,
        _ => audit.next_index(),
    }
    .max(from);
    let window = audit
        .range_all(from..to)
        .map_err(super::audit::store_unreadable)?;
    let window = window.as_slice();
    let thrown = |entry: &&Arc<AuditEntry>| {
        entry.action == "flag.kill" && scope.flag(&entry.target, entry.at_ms)
    };
    let kill_switch = window.iter().find(thrown);
    let isolated = window
        .iter()
        .find(|entry| entry.action == "rollback.isolate" && entry.target == scope.rollback);
    // Detected when something asked for the rollback, or a person threw a kill switch first.
    let detected_at_ms = alerts
        .iter()
        .map(|alert| alert.at_ms)
        .chain(request.map(|request| request.created_at_ms))
        .chain(kill_switch.map(|entry| entry.at_ms))
        .chain([record.started_at_ms])
        .min()
        .unwrap_or(record.started_at_ms);
    let (mitigated_at_ms, mitigated_by) = mitigation(record, kill_switch, isolated);
    // Recovered only when every host was reverted and verified: none skipped or isolated.
    let recovered_at_ms = if record.status == RollbackStatus::Succeeded
        && record.skipped_hosts.is_empty()
        && record.isolated.is_empty()
    {
        record.finished_at_ms
    } else {
        0
    };
    let mut hosts = BTreeSet::new();
    for step in &record.steps {
        hosts.insert(step.host_id.clone());
    }
    let (timeline, omitted) = if detailed {
        timeline(window, &scope)
    } else {
        (Vec::new(), 0)
    };
    let mut operators = BTreeSet::new();
    for identity in std::iter::once(&record.started_by)
        .chain(timeline.iter().map(|event| &event.identity))
        .chain(kill_switch.map(|entry| &entry.identity))
    {
        if is_person(identity) {
            operators.insert(identity.clone());
        }
    }
    let escalations = record
        .escalations
        .iter()
        .filter_map(|id| state.escalations.get(id))
        .map(|escalation| {
            format!(
                "wave {} of {}: {} ({})",
                escalation.wave + 1,
                escalation.service,
                escalation.evidence,
                if escalation.delivered {
                    "delivered".to_string()
                } else {
                    format!("not delivered after {} attempts", escalation.attempts)
                }
            )
        })
        .collect();
    let noted = state.incidents.get(&number);
    let closed = noted.is_some_and(|noted| noted.closed_at_ms != 0);
    let mut incident = pb::Incident {
        incident_id: incident_id(number),
        rollback_id: record.id(),
        status: if closed { "closed" } else { "open" }.into(),
        rollback_state: record.status.name().to_lowercase(),
        trigger: record.trigger.name().to_lowercase(),
        evidence: record.reason.clone(),
        alerts: alerts
            .iter()
            .map(|alert| {
                format!(
                    "{} at {} ms: {}",
                    alert.source.name().to_lowercase(),
                    alert.at_ms,
                    alert.reason
                )
            })
            .collect(),
        services: record.services.clone(),
        environments: environments.into_iter().collect(),
        change_ids: record
            .changes
            .iter()
            .map(|&change| change_id(change))
            .collect(),
        hosts: hosts.into_iter().collect(),
        impact_started_at_ms,
        detected_at_ms,
        mitigated_at_ms,
        recovered_at_ms,
        mitigated_by,
        operators: operators.into_iter().collect(),
        approvers: record.approved_by.clone(),
        escalations,
        closed_at_ms: noted.map_or(0, |noted| noted.closed_at_ms),
        closed_by: noted
            .map(|noted| noted.closed_by.clone())
            .unwrap_or_default(),
        action_items: noted
            .map(|noted| noted.action_items.clone())
            .unwrap_or_default(),
        lessons: noted.map(|noted| noted.lessons.clone()).unwrap_or_default(),
        timeline,
        timeline_omitted: omitted,
        notices: noted
            .map(|noted| noted.notices.iter().map(notice_view).collect())
            .unwrap_or_default(),
        ..pb::Incident::default()
    };
    if detailed && let Some(noted) = noted {
        incident.notes = noted
            .notes
            .iter()
            .map(|note| pb::IncidentNote {
                at_ms: note.at_ms,
                identity: note.identity.clone(),
                text: note.text.clone(),
            })
            .collect();
        incident.rca_markdown = noted.rca_markdown.clone();
    }
    Ok(incident)
}

/// What the view of an incident reads of the state, copied (with the audit log's head, which
/// shares or reads its entries), so that its timeline, from the impact to now, is read without
/// holding the state.
struct IncidentParts {
    state: State,
    record: RollbackRecord,
    /// When its rollback moved to the archive; 0 while the state holds it.
    archived_at_ms: u64,
}

/// The parts of incident `number`, from the state or (its rollback archived) the archive; None
/// if there is no such rollback.
fn detail_parts(state: &State, number: u64) -> Result<Option<IncidentParts>, Status> {
    match state.rollbacks.get(&number) {
        Some(record) => assemble(
            state,
            record.clone(),
            state.incidents.get(&number).cloned(),
            0,
        )
        .map(Some),
        None => match archive::rollback(state, number)? {
            Some(archived) => detail_parts_of(state, archived).map(Some),
            None => Ok(None),
        },
    }
}

/// The parts of an archived incident.
fn detail_parts_of(state: &State, archived: ArchivedRollback) -> Result<IncidentParts, Status> {
    assemble(
        state,
        archived.rollback,
        archived.incident,
        archived.archived_at_ms,
    )
}

fn assemble(
    state: &State,
    record: RollbackRecord,
    noted: Option<IncidentRecord>,
    archived_at_ms: u64,
) -> Result<IncidentParts, Status> {
    let number = record.number;
    let mut parts = State {
        cluster_version: state.cluster_version,
        audit: state.audit.clone(),
        ..State::default()
    };
    for &change in &record.changes {
        if let Some(found) = state
            .change_or_archived(change)
            .map_err(super::audit::store_unreadable)?
        {
            parts.changes.insert(change, found.into_owned());
        }
    }
    parts.triggers = state
        .triggers
        .iter()
        .filter(|trigger| trigger.rollback == number)
        .cloned()
        .collect();
    if let Some(request) = state.approval_requests.get(&record.request) {
        parts
            .approval_requests
            .insert(record.request, request.clone());
    }
    for id in &record.escalations {
        if let Some(escalation) = state.escalations.get(id) {
            parts.escalations.insert(*id, escalation.clone());
        }
    }
    if let Some(noted) = noted {
        parts.incidents.insert(number, noted);
    }
    Ok(IncidentParts {
        state: parts,
        record,
        archived_at_ms,
    })
}

impl IncidentParts {
    fn view(&self, detailed: bool) -> Result<pb::Incident, Status> {
        Ok(pb::Incident {
            archived_at_ms: self.archived_at_ms,
            ..incident(&self.state, &self.record, detailed)?
        })
    }
}

/// The detailed view of incident `number`, its timeline read off the state's lock.
fn detailed_incident(parts: Option<IncidentParts>, number: u64) -> Result<pb::Incident, Status> {
    parts
        .ok_or_else(|| Status::not_found(format!("no incident {}", incident_id(number))))?
        .view(true)
}

fn notice_view(notice: &NoticeRecord) -> pb::IncidentNotice {
    pb::IncidentNotice {
        event: notice.event.name().into(),
        attempts: notice.attempts,
        delivered_at_ms: notice.delivered_at_ms,
        given_up: notice.given_up,
        detail: notice.detail.clone(),
    }
}

/// What an incident's audit entries are about: its rollback, request, changes and itself, and
/// the flags of its services in its environments from the impact on.
struct Scope<'a> {
    rollback: String,
    rollback_steps: String,
    request: Option<String>,
    incident: String,
    changes: Vec<String>,
    services: &'a [String],
    environments: &'a BTreeSet<String>,
    since_ms: u64,
}

impl<'a> Scope<'a> {
    fn of(record: &'a RollbackRecord, environments: &'a BTreeSet<String>, since_ms: u64) -> Self {
        let rollback = record.id();
        Self {
            rollback_steps: format!("{rollback}/"),
            rollback,
            request: (record.request != 0).then(|| request_id(record.request)),
            incident: incident_id(record.number),
            changes: record
                .changes
                .iter()
                .map(|&change| change_id(change))
                .collect(),
            services: &record.services,
            environments,
            since_ms,
        }
    }

    /// A flag (`environment/service/name`) of this incident's, changed since the impact began.
    fn flag(&self, target: &str, at_ms: u64) -> bool {
        let mut parts = target.splitn(3, '/');
        let (Some(environment), Some(service)) = (parts.next(), parts.next()) else {
            return false;
        };
        at_ms >= self.since_ms
            && self.environments.contains(environment)
            && self.services.iter().any(|own| own == service)
    }

    /// Whether the entry is always shown (`Some(true)`), shown as a detail (`Some(false)`), or
    /// not about the incident.
    fn about(&self, entry: &AuditEntry) -> Option<bool> {
        let target = entry.target.as_str();
        if target == self.rollback
            || target == self.incident
            || self.request.as_deref() == Some(target)
            || self.changes.iter().any(|change| change == target)
            || (entry.action == "flag.kill" && self.flag(target, entry.at_ms))
        {
            return Some(true);
        }
        let detail = target.starts_with(&self.rollback_steps)
            || (entry.action.starts_with("flag.") && self.flag(target, entry.at_ms));
        detail.then_some(false)
    }
}

/// The audit entries about the incident, in order: every one that is always shown, and the
/// first [`MAX_DETAIL_EVENTS`] details; how many details were left out.
fn timeline(window: &[Arc<AuditEntry>], scope: &Scope<'_>) -> (Vec<pb::IncidentEvent>, u64) {
    let (mut events, mut details, mut omitted) = (Vec::new(), 0, 0);
    for entry in window {
        let Some(always) = scope.about(entry) else {
            continue;
        };
        if !always {
            if details == MAX_DETAIL_EVENTS {
                omitted += 1;
                continue;
            }
            details += 1;
        }
        events.push(pb::IncidentEvent {
            at_ms: entry.at_ms,
            audit_index: entry.index,
            identity: entry.identity.clone(),
            action: entry.action.clone(),
            target: entry.target.clone(),
            outcome: entry.readable_outcome(),
        });
    }
    (events, omitted)
}

/// When the harm was first reduced, and by what: a flag turned back as the rollback started, a
/// kill switch thrown, a service isolated, or the first host restored.
fn mitigation(
    record: &RollbackRecord,
    kill_switch: Option<&Arc<AuditEntry>>,
    isolated: Option<&Arc<AuditEntry>>,
) -> (u64, String) {
    let mut candidates: Vec<(u64, String)> = Vec::new();
    if !record.flags_reverted.is_empty() {
        candidates.push((
            record.started_at_ms,
            format!("flags turned back: {}", record.flags_reverted.join(", ")),
        ));
    }
    if let Some(kill) = kill_switch {
        candidates.push((kill.at_ms, format!("kill switch {}", kill.target)));
    }
    if let Some(isolated) = isolated {
        candidates.push((isolated.at_ms, "a service isolated (drained)".into()));
    }
    if let Some(step) = record
        .steps
        .iter()
        .filter(|step| {
            step.kind == RollbackStepKind::Restore && step.progress.status == StepStatus::Succeeded
        })
        .min_by_key(|step| step.progress.finished_at_ms)
    {
        candidates.push((
            step.progress.finished_at_ms,
            format!("{} restored on {}", step.service, step.host_id),
        ));
    }
    candidates
        .into_iter()
        .min_by_key(|(at_ms, _)| *at_ms)
        .unwrap_or_default()
}

/// The bullets under `## Action items` and `## Lessons` of a root-cause analysis (`-`, `*`, `+`
/// or numbered; checkboxes dropped), outside code fences; a template's `<...>` placeholders are
/// not kept.
pub fn lessons_of(rca_markdown: &str) -> (Vec<String>, Vec<String>) {
    let (mut action_items, mut lessons) = (Vec::new(), Vec::new());
    let mut section: Option<&mut Vec<String>> = None;
    let mut fenced = false;
    for line in rca_markdown.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let level = trimmed.chars().take_while(|&c| c == '#').count();
        if level > 0 && trimmed[level..].starts_with(' ') {
            let heading = trimmed[level..]
                .trim()
                .trim_end_matches(':')
                .to_ascii_lowercase();
            section = match heading.as_str() {
                "action items" => Some(&mut action_items),
                "lessons" | "lessons learned" | "lessons learnt" => Some(&mut lessons),
                _ => None,
            };
            continue;
        }
        let numbered = trimmed
            .split_once(". ")
            .filter(|(number, _)| !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()))
            .map(|(_, text)| text);
        let bullet = ["- ", "* ", "+ "]
            .iter()
            .find_map(|mark| trimmed.strip_prefix(mark))
            .or(numbered)
            .map(|text| {
                let text = text.trim();
                ["[ ]", "[x]", "[X]"]
                    .iter()
                    .find_map(|box_| text.strip_prefix(box_))
                    .unwrap_or(text)
                    .trim()
            });
        let placeholder = |text: &str| text.starts_with('<') && text.ends_with('>');
        if let (Some(section), Some(text)) = (section.as_deref_mut(), bullet)
            && !text.is_empty()
            && !placeholder(text)
            && section.len() < MAX_LESSONS
        {
            section.push(rewind_shared::names::truncate(text, MAX_LESSON_BYTES).to_string());
        }
    }
    (action_items, lessons)
}

fn parse_incident(text: &str) -> Result<u64, Status> {
    crate::api::validate::parse_id("incident_id", "in", text)
}

/// Allows the caller's action on incident `number` as on its rollback (after a read barrier),
/// or answers `NOT_FOUND` naming the incidents there are. An archived incident may be read
/// (`reading`), but takes no notes and is not closed: `FAILED_PRECONDITION`.
async fn authorize_incident(
    control: &Control,
    caller: &crate::access::Caller,
    number: u64,
    reading: bool,
) -> Result<(), Status> {
    control.context.current().await?;
    // One read of the archive: an archived rollback's scope is its changes'.
    let (targets, archived) = control.context.node.read(|state| {
        Ok::<_, Status>(match archive::rollback(state, number)? {
            Some(archived) => (targets::changes(state, &archived.rollback.changes), true),
            None => (targets::rollback(state, number), false),
        })
    })?;
    if archived && !reading {
        control.context.authorize(caller, &targets)?;
        return Err(Status::failed_precondition(format!(
            "{} is archived: its rollback ended before the audit retention and left the \
             cluster's state, so it takes no more notes and cannot be closed (rewindctl \
             incident show {} reads it)",
            incident_id(number),
            incident_id(number)
        )));
    }
    control.context.authorize_found(caller, &targets, || {
        control
            .context
            .node
            .read(|state| to_status(unknown_incident(state, number)))
    })
}

pub(super) async fn list_incidents(
    control: &Control,
    request: Request<pb::ListIncidentsRequest>,
) -> Result<Response<pb::ListIncidentsResponse>, Status> {
    let caller = caller(&request)?;
    let request = request.into_inner();
    let page = PageRequest::new(request.page_size, &request.page_token);
    let (limit, before) = (page.size()?, page.before("in")?);
    control.context.current().await?;
    let (mut incidents, mut next_page_token) = control.context.node.read(|state| {
        // The archived ones first, as far as a page may read; then those the state holds above
        // where that read stopped, so that the next page misses none of either.
        let archived = archived_incidents(state, before, limit + 1, |archived| {
            caller.may_see(&targets::changes(state, &archived.rollback.changes))
        })?;
        let floor = archived.resume.unwrap_or(0);
        // From the floor itself: the scan may have stopped on a record the state holds too.
        let held = state
            .rollbacks
            .range(floor..before)
            .rev()
            .filter(|(number, _)| caller.may_see(&targets::rollback(state, **number)))
            .take(limit + 1)
            .map(|(number, record)| incident(state, record, false).map(|view| (*number, view)));
        let merged = newest_of_both(held, archived.items.into_iter().map(Ok))
            .take(limit + 1)
            .collect::<Result<Vec<_>, Status>>()?;
        Ok::<_, Status>(archive::page(
            archive::Scanned {
                items: merged,
                resume: archived.resume,
            },
            limit,
            "in",
        ))
    })?;
    within_bytes(&mut incidents, &mut next_page_token, |incident| {
        incident.incident_id.clone()
    });
    Ok(Response::new(pb::ListIncidentsResponse {
        incidents,
        next_page_token,
    }))
}

pub(super) async fn get_incident(
    control: &Control,
    request: Request<pb::GetIncidentRequest>,
) -> Result<Response<pb::Incident>, Status> {
    let caller = caller(&request)?;
    let number = parse_incident(&request.get_ref().incident_id)?;
    authorize_incident(control, &caller, number, true).await?;
    let parts = control
        .context
        .node
        .read(|state| detail_parts(state, number))?;
    detailed_incident(parts, number).map(Response::new)
}

pub(super) async fn note_incident(
    control: &Control,
    request: Request<pb::NoteIncidentRequest>,
) -> Result<Response<pb::Incident>, Status> {
    let caller = caller(&request)?;
    let request = request.into_inner();
    let number = parse_incident(&request.incident_id)?;
    let text = request.text.trim();
    if text.is_empty() || text.len() > MAX_INCIDENT_NOTE_BYTES {
        return Err(invalid(
            "text",
            format!(
                "is {} bytes: a note says something, in at most {MAX_INCIDENT_NOTE_BYTES}",
                text.len()
            ),
        ));
    }
    if text
        .chars()
        .any(|c| c != '\n' && rewind_shared::names::unsafe_on_terminal(c))
    {
        return Err(invalid(
            "text",
            "holds control characters (other than new lines) or bidirectional overrides",
        ));
    }
    authorize_incident(control, &caller, number, false).await?;
    let kind = CommandKind::NoteIncident {
        incident: number,
        text: text.to_string(),
    };
    answer(control, &caller.id(), &request.request_id, kind, number).await
}

pub(super) async fn close_incident(
    control: &Control,
    request: Request<pb::CloseIncidentRequest>,
) -> Result<Response<pb::Incident>, Status> {
    let caller = caller(&request)?;
    let request = request.into_inner();
    let number = parse_incident(&request.incident_id)?;
    let rca = request.rca_markdown.trim();
    if rca.is_empty() || rca.len() > MAX_RCA_BYTES {
        return Err(invalid(
            "rca_markdown",
            format!(
                "is {} bytes: an incident closes with its root-cause analysis (rewindctl \
                 incident rca-template prints one), at most {MAX_RCA_BYTES}",
                rca.len()
            ),
        ));
    }
    let (action_items, lessons) = lessons_of(rca);
    authorize_incident(control, &caller, number, false).await?;
    let kind = CommandKind::CloseIncident {
        incident: number,
        rca_markdown: rca.to_string(),
        action_items,
        lessons,
    };
    answer(control, &caller.id(), &request.request_id, kind, number).await
}

async fn answer(
    control: &Control,
    identity: &str,
    request_id: &str,
    kind: CommandKind,
    number: u64,
) -> Result<Response<pb::Incident>, Status> {
    let parts = control
        .context
        .propose_and_read(identity, request_id, kind, |state, _| {
            detail_parts(state, number)
        })
        .await??;
    detailed_incident(parts, number).map(Response::new)
}

/// Most incidents a runbook lists.
const MAX_RUNBOOK_INCIDENTS: usize = 100;

/// An incident's number and summary, or why it could not be read.
type NumberedIncident = Result<(u64, pb::Incident), Status>;

/// Summaries of the archived incidents numbered below `before` that `wanted` keeps, newest
/// first: at most `want`, from at most [`archive::MAX_ARCHIVE_SCAN`] read.
fn archived_incidents(
    state: &State,
    before: u64,
    want: usize,
    wanted: impl Fn(&ArchivedRollback) -> bool,
) -> Result<archive::Scanned<pb::Incident>, Status> {
    archive::scan(state, ArchiveKind::Rollback, before, want, |record| {
        let ArchivedRecord::Rollback(archived) = record else {
            return Ok(None);
        };
        if !wanted(&archived) {
            return Ok(None);
        }
        detail_parts_of(state, *archived)?.view(false).map(Some)
    })
}

/// Two lists of incidents, each newest first, as one (an error first, as soon as met).
fn newest_of_both(
    held: impl Iterator<Item = NumberedIncident>,
    archived: impl Iterator<Item = NumberedIncident>,
) -> impl Iterator<Item = NumberedIncident> {
    let number = |item: &NumberedIncident| item.as_ref().map_or(u64::MAX, |(number, _)| *number);
    let (mut held, mut archived) = (held.peekable(), archived.peekable());
    std::iter::from_fn(move || match (held.peek(), archived.peek()) {
        (Some(a), Some(b)) if number(a) >= number(b) => held.next(),
        (Some(_), Some(_)) | (None, Some(_)) => archived.next(),
        (Some(_), None) => held.next(),
        (None, None) => None,
    })
}

pub(super) async fn get_runbook(
    control: &Control,
    request: Request<pb::GetRunbookRequest>,
) -> Result<Response<pb::Runbook>, Status> {
    let caller = caller(&request)?;
    let service = request.into_inner().service;
    rewind_shared::names::validate_name("service", &service)
        .map_err(|error| to_status(error.into()))?;
    control.context.current().await?;
    control
        .context
        .authorize(&caller, &[crate::access::Target::Service(service.clone())])?;
    control.context.node.read(|state| {
        let Some(record) = state.services.get(&service) else {
            return Err(to_status(crate::errors::CoordinatorError::UnknownService {
                service: service.clone(),
                known: crate::errors::known_list(state.services.keys().cloned()),
            }));
        };
        let consumers = state
            .services
            .values()
            .filter(|other| other.depends_on.contains(&service))
            .map(|other| other.name.clone())
            .collect();
        // Closed incidents of the service, newest first, where the caller may see them: those
        // the state holds, and the archived ones (of the newest MAX_ARCHIVE_SCAN).
        let held = state
            .incidents
            .iter()
            .rev()
            .filter(|(_, noted)| noted.closed_at_ms != 0)
            .filter_map(|(number, _)| state.rollbacks.get(number))
            .filter(|rollback| rollback.services.contains(&service))
            .filter(|rollback| caller.may_see(&targets::rollback(state, rollback.number)))
            .map(|rollback| incident(state, rollback, false).map(|view| (rollback.number, view)));
        let archived = archived_incidents(state, u64::MAX, MAX_RUNBOOK_INCIDENTS, |archived| {
            let closed = archived
                .incident
                .as_ref()
                .is_some_and(|noted| noted.closed_at_ms != 0);
            closed
                && archived.rollback.services.contains(&service)
                && caller.may_see(&targets::changes(state, &archived.rollback.changes))
        })?;
        let incidents = newest_of_both(held, archived.items.into_iter().map(Ok))
            .take(MAX_RUNBOOK_INCIDENTS)
            .map(|item| item.map(|(_, view)| view))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::Runbook {
            service: Some(crate::api::convert::service(record)),
            consumers,
            incidents,
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fleet::Fleet;

    #[test]
    fn an_incident_reads_its_own_scope_and_counts_an_earlier_kill_switch() {
        let mut fleet = Fleet::with_web();
        fleet.deploy_web("v1");
        let change = fleet.deploy_web("v2");
        let kill = |environment: &str| CommandKind::SetFlag {
            environment: environment.into(),
            service: "web".into(),
            name: "checkout".into(),
            enabled: false,
            kill: true,
            reason: "errors".into(),
        };
        let last_at = |fleet: &Fleet| fleet.state.audit.entries().last().unwrap().at_ms;
        // Another environment's kill switch is not this incident's.
        fleet.apply(kill("staging"));
        let staging_at = last_at(&fleet);
        fleet.apply(kill("default"));
        let killed_at = last_at(&fleet);
        let rollback = fleet.must_start_rollback(change, Trigger::Manual);
        let waves = fleet.state.rollbacks[&rollback].waves.len() as u32;
        for wave in 0..waves {
            let hosts: Vec<String> = fleet.state.rollbacks[&rollback]
                .steps
                .iter()
                .filter(|step| step.wave == wave)
                .map(|step| step.host_id.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            for host in hosts {
                for kind in RollbackStepKind::ALL {
                    let step = StepTarget::Rollback {
                        rollback,
                        service: "web".into(),
                        host_id: host.clone(),
                        kind,
                    };
                    fleet.finish(step, true);
                }
            }
            fleet.finish(StepTarget::Gate { rollback, wave }, true);
        }
        let record = &fleet.state.rollbacks[&rollback];
        assert_eq!(record.status, RollbackStatus::Succeeded);
        let detail = incident(&fleet.state, record, true).unwrap();
        // The view served (from a copy of what it reads, off the state's lock) is the same.
        assert_eq!(
            detailed_incident(detail_parts(&fleet.state, rollback).unwrap(), rollback).unwrap(),
            detail
        );
        assert!(detailed_incident(detail_parts(&fleet.state, 999).unwrap(), 999).is_err());
        // Thrown before the rollback was asked for: it detected and mitigated.
        assert_eq!(detail.detected_at_ms, killed_at);
        assert_eq!(detail.mitigated_at_ms, killed_at);
        assert_eq!(detail.mitigated_by, "kill switch default/web/checkout");
        assert_eq!(detail.recovered_at_ms, record.finished_at_ms);
        assert!(staging_at < killed_at);
        let targets: Vec<&str> = detail
            .timeline
            .iter()
            .map(|event| event.target.as_str())
            .collect();
        assert!(
            !targets.iter().any(|target| target.starts_with("staging/")),
            "{targets:?}"
        );
        assert!(
            !targets.iter().any(|target| target.starts_with("ch-2/")),
            "{targets:?}"
        );
        for expected in ["ch-2", "default/web/checkout", "rb-1"] {
            assert!(targets.contains(&expected), "{expected} in {targets:?}");
        }
        assert!(
            targets.iter().any(|target| target.starts_with("rb-1/")),
            "{targets:?}"
        );
        // A summary reads the same times without a timeline.
        let summary = incident(&fleet.state, record, false).unwrap();
        assert!(summary.timeline.is_empty());
        assert_eq!(
            (
                summary.detected_at_ms,
                summary.mitigated_at_ms,
                summary.recovered_at_ms
            ),
            (
                detail.detected_at_ms,
                detail.mitigated_at_ms,
                detail.recovered_at_ms
            )
        );
        // A host left unreverted: never recovered.
        let mut skipped = record.clone();
        skipped.skipped_hosts.push("web-2".into());
        assert_eq!(
            incident(&fleet.state, &skipped, false)
                .unwrap()
                .recovered_at_ms,
            0
        );
    }

    #[test]
    fn action_items_and_lessons_are_the_bullets_under_their_headings() {
        let rca = "# RCA in-3\n## Summary\n- not this\n## Action items:\n- [ ] add a canary \
                   gate\n* page the owner\n+ [X] done one\n2. numbered\n- [ ] <action, owner>\n\
                   ```\n# not a heading\n- not a bullet\n```\n## What went well\n- fast\n\
                   ### Lessons\n- flags first, then hosts\n-\n";
        let (action_items, lessons) = lessons_of(rca);
        assert_eq!(
            action_items,
            [
                "add a canary gate",
                "page the owner",
                "done one",
                "numbered"
            ]
        );
        assert_eq!(lessons, ["flags first, then hosts"]);
        let many = format!("## Lessons\n{}", "- again\n".repeat(80));
        assert_eq!(lessons_of(&many).1.len(), MAX_LESSONS);
    }
}
