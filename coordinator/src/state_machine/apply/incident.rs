//! Notes on incidents, and their closing with a root-cause analysis (from version 5).

use super::*;

/// An incident's analysis, as the caller sent it (bounded at the API).
pub(super) struct Closure<'a> {
    pub rca_markdown: &'a str,
    pub action_items: &'a [String],
    pub lessons: &'a [String],
}

fn refused(number: u64, why: impl Into<String>) -> CoordinatorError {
    CoordinatorError::IncidentRefused {
        incident_id: incident_id(number),
        why: why.into(),
    }
}

/// The incident's record, made on its first note or close.
fn record_of(state: &mut State, number: u64) -> &mut IncidentRecord {
    state
        .incidents
        .entry(number)
        .or_insert_with(|| IncidentRecord {
            number,
            ..IncidentRecord::default()
        })
}

pub(super) fn note_incident(
    state: &mut State,
    number: u64,
    identity: &str,
    text: &str,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    if !state.rollbacks.contains_key(&number) {
        return Err(unknown_incident(state, number));
    }
    let record = record_of(state, number);
    if record.notes.len() >= MAX_INCIDENT_NOTES {
        return Err(refused(
            number,
            format!("it holds {MAX_INCIDENT_NOTES} notes, the most one keeps"),
        ));
    }
    record.notes.push(IncidentNote {
        at_ms,
        identity: identity.to_string(),
        text: text.to_string(),
    });
    let count = record.notes.len();
    // The note's text stays on the incident (it may name people); the audit says one was added.
    Ok((
        Outcome::Done,
        incident_id(number),
        format!("ok: note {count}"),
    ))
}

pub(super) fn close_incident(
    state: &mut State,
    number: u64,
    identity: &str,
    closure: Closure<'_>,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    let Some(rollback) = state.rollbacks.get(&number) else {
        return Err(unknown_incident(state, number));
    };
    if !rollback.status.is_terminal() {
        return Err(refused(
            number,
            format!(
                "its rollback {} is still {}: close it once the rollback has ended",
                rollback.id(),
                rollback.status.name().to_lowercase()
            ),
        ));
    }
    let record = record_of(state, number);
    if record.closed_at_ms != 0 {
        return Err(refused(
            number,
            format!("it was closed by {} already", record.closed_by),
        ));
    }
    record.closed_at_ms = at_ms;
    record.closed_by = identity.to_string();
    record.rca_markdown = closure.rca_markdown.to_string();
    record.action_items = closure.action_items.to_vec();
    record.lessons = closure.lessons.to_vec();
    Ok((
        Outcome::Done,
        incident_id(number),
        format!(
            "ok: closed with {} action items and {} lessons",
            closure.action_items.len(),
            closure.lessons.len()
        ),
    ))
}

/// How one delivery to the incident webhook went.
pub(super) struct Delivery<'a> {
    pub ok: bool,
    pub permanent: bool,
    pub detail: &'a str,
}

/// Records a delivery attempt of an incident's event (from version 6). A result that arrives
/// for an event already settled (a new leader resent it) changes nothing.
pub(super) fn incident_notified(
    state: &mut State,
    number: u64,
    event: NoticeEvent,
    delivery: Delivery<'_>,
    at_ms: u64,
) -> Result<(Outcome, String, String)> {
    if !state.rollbacks.contains_key(&number) {
        return Err(unknown_incident(state, number));
    }
    let record = record_of(state, number);
    let position = match record
        .notices
        .iter()
        .position(|notice| notice.event == event)
    {
        Some(position) => position,
        None => {
            record.notices.push(NoticeRecord {
                event,
                attempts: 0,
                last_attempt_at_ms: 0,
                delivered_at_ms: 0,
                given_up: false,
                detail: String::new(),
            });
            record.notices.len() - 1
        }
    };
    let notice = &mut record.notices[position];
    let detail = rewind_shared::names::truncate(delivery.detail, MAX_NOTICE_DETAIL_BYTES);
    if notice.settled() {
        return Ok((
            Outcome::Done,
            incident_id(number),
            format!("ok: {event} settled already; a later attempt answered {detail}"),
        ));
    }
    notice.attempts += 1;
    notice.last_attempt_at_ms = at_ms;
    notice.detail = detail.to_string();
    let outcome = if delivery.ok {
        notice.delivered_at_ms = at_ms;
        format!("ok: {event} delivered: {detail}")
    } else {
        notice.given_up = delivery.permanent || notice.attempts >= MAX_NOTICE_ATTEMPTS;
        let next = if notice.given_up {
            "given up"
        } else {
            "will retry"
        };
        format!(
            "failed: {event} attempt {} not delivered ({next}): {detail}",
            notice.attempts
        )
    };
    Ok((Outcome::Done, incident_id(number), outcome))
}
