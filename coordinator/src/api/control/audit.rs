//! The audit log: listing it a page at a time, verifying the chain, and exporting a range of
//! it for an archive outside the cluster (`rewindctl audit export`).

use std::pin::Pin;
use std::sync::Arc;

use rewind_proto::v1 as pb;
use rewind_shared::audit::{FORMAT_PLAIN, Field, Redaction};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::Control;
use crate::api::convert;
use crate::api::gate::caller;
use crate::api::status::invalid;
use crate::api::validate::{PageRequest, one_page, required_reason};
use crate::state_machine::{AuditEntry, AuditLog, AuditVerification, CommandKind};

pub(super) type ExportStream =
    Pin<Box<dyn Stream<Item = Result<pb::ExportAuditResponse, Status>> + Send>>;

/// Entries per message of an export, and the bytes a message holds (one entry more only if it
/// is the first): inside gRPC's 4 MiB.
const EXPORT_CHUNK: u64 = 256;
const MAX_EXPORT_MESSAGE_BYTES: usize = 2 << 20;

pub(super) async fn list_audit(
    control: &Control,
    request: Request<pb::ListAuditRequest>,
) -> Result<Response<pb::ListAuditResponse>, Status> {
    control.context.current().await?;
    let request = request.into_inner();
    #[allow(deprecated)] // The names before 0.3, read for one release.
    let (from_index, limit) = (request.from_index.to_string(), request.limit);
    let page = PageRequest {
        size: request.page_size,
        legacy_size: limit,
        token: &request.page_token,
        legacy_token: ("from_index", &from_index),
    };
    let size = page.size()?;
    // The token is the index (from 1) of the entry the page starts at.
    let first = match page.token() {
        (_, "") | (_, "0") => 1,
        (field, token) => token.parse::<u64>().map_err(|_| {
            invalid(
                field,
                format!("{token:?} is not an audit index (a number from 1)"),
            )
        })?,
    };
    // One page (and one more entry, so the page knows whether another follows), read under
    // the state's lock: shared entries, or a page of the store.
    let (held, first_index) = control.context.node.read(|state| {
        // Archived and pruned entries are no longer held: the page starts at the first held.
        let first = first.max(state.audit.first_index());
        let wanted = first.saturating_add(size as u64 + 1);
        (state.audit.range(first..wanted), state.audit.first_index())
    });
    let held = held.map_err(store_unreadable)?;
    let entries = held.iter().map(|entry| convert::audit_entry(entry));
    let (entries, next_page_token) = one_page(size, entries, |last| (last.index + 1).to_string());
    Ok(Response::new(pb::ListAuditResponse {
        entries,
        next_page_token,
        first_index,
    }))
}

pub(super) async fn verify_audit(
    control: &Control,
    _request: Request<pb::VerifyAuditRequest>,
) -> Result<Response<pb::VerifyAuditResponse>, Status> {
    control.context.current().await?;
    // A copy of the head: the entries are read from the store (or shared) without holding the
    // state, so a long chain does not hold up applying.
    let audit = control.context.node.read(|state| state.audit.clone());
    Ok(Response::new(verification_message(audit.verify())))
}

/// The audit store failed a read: the member's disk, not the request.
pub(in crate::api) fn store_unreadable(error: String) -> Status {
    Status::internal(format!("the audit store cannot be read: {error}"))
}

fn verification_message(verification: AuditVerification) -> pb::VerifyAuditResponse {
    pb::VerifyAuditResponse {
        ok: verification.first_broken.is_none(),
        entries: verification.entries,
        first_broken_index: verification.first_broken.unwrap_or(0),
        detail: verification.detail,
        head_hash: verification.head_hash,
        first_index: verification.first_index,
        anchor_hash: verification.anchor_hash,
        archived_through: verification.archived_through,
    }
}

pub(super) async fn confirm_audit_archive(
    control: &Control,
    request: Request<pb::ConfirmAuditArchiveRequest>,
) -> Result<Response<pb::VerifyAuditResponse>, Status> {
    let identity = caller(&request)?.id();
    let request = request.into_inner();
    required_reason(
        &request.reason,
        "say where the archive is kept: it goes into the audit log",
    )?;
    let manifest_hash = request.manifest_hash.trim().to_ascii_lowercase();
    if manifest_hash.len() != 64 || !manifest_hash.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid(
            "manifest_hash",
            "not a manifest hash (64 hex digits, the manifest's manifest_hash)",
        ));
    }
    let through = request.through_index;
    control.context.current().await?;
    // Which entry the export starts at: the cluster checks the hash against its own entries.
    let audit = control.context.node.read(|state| state.audit.clone());
    let first = audit
        .find_export_start(through, &manifest_hash)
        .map_err(store_unreadable)?;
    let Some(first) = first else {
        return Err(Status::failed_precondition(format!(
            "no export of this cluster's audit entries that ends at entry {through} and \
             continues what is archived has manifest hash {manifest_hash}: it is of another \
             range or chain, was altered, or leaves a gap after the last confirmed archive"
        )));
    };
    let kind = CommandKind::ConfirmAuditArchive {
        first,
        through,
        manifest_hash,
        reason: request.reason,
    };
    let verification = control
        .context
        .propose_and_read(&identity, &request.request_id, kind, |state, _| {
            state.audit.clone()
        })
        .await?
        .verify();
    Ok(Response::new(verification_message(verification)))
}

pub(super) async fn redact_audit(
    control: &Control,
    request: Request<pb::RedactAuditRequest>,
) -> Result<Response<pb::AuditEntry>, Status> {
    let identity = caller(&request)?.id();
    let request = request.into_inner();
    required_reason(
        &request.reason,
        "say why (the erasure request it answers): it goes into the audit log",
    )?;
    // Personal data only: erasing what was done, or to what, would hide the record itself.
    if request.fields.is_empty() || request.fields.len() > Field::ALL.len() {
        return Err(invalid(
            "fields",
            format!("name what to erase: {}", Redaction::NAMES),
        ));
    }
    let mut fields = Vec::new();
    for name in &request.fields {
        let field = Redaction::parse(name)
            .map_err(|why| invalid("fields", why))?
            .field();
        if !fields.contains(&field) {
            fields.push(field);
        }
    }
    let index = request.index;
    let kind = CommandKind::RedactAudit {
        index,
        fields,
        reason: request.reason,
    };
    let entry = control
        .context
        .propose_and_read(&identity, &request.request_id, kind, |state, _| {
            state.audit.get(index)
        })
        .await?
        .map_err(store_unreadable)?;
    entry
        .map(|entry| Response::new(convert::audit_entry(&entry)))
        .ok_or_else(|| Status::not_found(format!("audit entry {index} is no longer held")))
}

/// What an export request asks for, checked.
struct ExportRange {
    after_index: u64,
    since_ms: u64,
    until_ms: u64,
    redact: Vec<Field>,
}

fn export_range(request: &pb::ExportAuditRequest) -> Result<ExportRange, Status> {
    if request.until_ms != 0 && request.until_ms <= request.since_ms {
        return Err(invalid(
            "until_ms",
            format!(
                "{} is not after since_ms {}: the range would be empty",
                request.until_ms, request.since_ms
            ),
        ));
    }
    if request.redact.len() > Field::ALL.len() {
        return Err(invalid(
            "redact",
            format!(
                "{} values; name each of {} at most once",
                request.redact.len(),
                Redaction::NAMES
            ),
        ));
    }
    let mut redact = Vec::new();
    for text in &request.redact {
        let field = Redaction::parse(text)
            .map_err(|why| invalid("redact", why))?
            .field();
        if !redact.contains(&field) {
            redact.push(field);
        }
    }
    Ok(ExportRange {
        after_index: request.after_index,
        since_ms: request.since_ms,
        until_ms: request.until_ms,
        redact,
    })
}

/// The indexes (`start..end`) of the run of entries `range` selects among those held: after
/// `after_index`, from the first written at or after `since_ms`, up to the first written at or
/// after `until_ms` (found by binary search: entries are in time order, and where a leader's
/// clock stepped back it still finds a boundary). One run of consecutive entries, so it
/// verifies as a chain.
fn select(log: &AuditLog, range: &ExportRange) -> Result<std::ops::Range<u64>, Status> {
    let after = range.after_index;
    let start = log
        .partition_point(|entry| entry.index <= after || entry.at_ms < range.since_ms)
        .map_err(store_unreadable)?;
    let end = match range.until_ms {
        0 => log.next_index(),
        until => log
            .partition_point(|entry| entry.index < start || entry.at_ms < until)
            .map_err(store_unreadable)?,
    };
    Ok(start..end.max(start))
}

/// Refuses a redaction of entries written plain (before cluster version 5): their hashes cover
/// the fields as they are, so an export could not be both redacted and verifiable.
fn redactable(
    log: &AuditLog,
    indexes: std::ops::Range<u64>,
    redact: &[Field],
) -> Result<(), Status> {
    if redact.is_empty() {
        return Ok(());
    }
    let mut last_plain = None;
    log.for_each_page(indexes, |page| {
        if let Some(plain) = page.iter().rev().find(|entry| entry.format == FORMAT_PLAIN) {
            last_plain = Some(plain.index);
        }
        std::ops::ControlFlow::Continue(())
    })
    .map_err(store_unreadable)?;
    let Some(index) = last_plain else {
        return Ok(());
    };
    Err(Status::failed_precondition(format!(
        "entries up to {index} were written before cluster version 5: their fields are hashed \
         as they are, so they cannot be redacted without breaking the chain; export them \
         without redact, or redact from entry {} on (after_index {index})",
        index + 1
    )))
}

pub(super) async fn export_audit(
    control: &Control,
    request: Request<pb::ExportAuditRequest>,
) -> Result<Response<ExportStream>, Status> {
    let range = export_range(request.get_ref())?;
    control.context.current().await?;
    // The range is fixed here: entries appended while the export streams belong to the next.
    let audit = control.context.node.read(|state| state.audit.clone());
    let indexes = select(&audit, &range)?;
    redactable(&audit, indexes.clone(), &range.redact)?;
    let context = control.context.clone();
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        let mut next = indexes.start;
        while next < indexes.end {
            let chunk_end = (next + EXPORT_CHUNK).min(indexes.end);
            // A chunk of shared entries, or of the store, read under the state's lock.
            let chunk = context
                .node
                .read(|state| state.audit.range(next..chunk_end));
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(error) => {
                    let _ = sender.send(Err(store_unreadable(error))).await;
                    return;
                }
            };
            let chunk: Option<Vec<Arc<AuditEntry>>> =
                (chunk.first().map(|entry| entry.index) == Some(next)).then_some(chunk);
            let Some(chunk) = chunk else {
                let gone = Status::failed_precondition(format!(
                    "audit entry {next} was dropped by retention while the export ran: export \
                     again from after the archive that covers it"
                ));
                let _ = sender.send(Err(gone)).await;
                return;
            };
            // At most a message's worth: a change over many hosts makes a large entry.
            let mut entries = Vec::new();
            let mut bytes = 0;
            for entry in &chunk {
                let mut entry = AuditEntry::clone(entry);
                for field in &range.redact {
                    // Every entry was checked to be salted above.
                    let _ = entry.redact(*field);
                }
                let entry = convert::audit_entry(&entry);
                bytes += prost::Message::encoded_len(&entry);
                if bytes > MAX_EXPORT_MESSAGE_BYTES && !entries.is_empty() {
                    break;
                }
                entries.push(entry);
            }
            let sent = entries.len() as u64;
            if sender
                .send(Ok(pb::ExportAuditResponse { entries }))
                .await
                .is_err()
            {
                return; // The client went away.
            }
            next += sent;
        }
    }));
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(receiver),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::AuditLog;
    use rewind_shared::audit::Record;

    /// Entries at `times`, salted from the `salted_from`th on.
    fn log_salted_from(times: &[u64], salted_from: usize) -> AuditLog {
        let mut log = AuditLog::default();
        for (position, &at_ms) in times.iter().enumerate() {
            let record = Record {
                at_ms,
                action: "test",
                ..Record::default()
            };
            log.append(&record, (position >= salted_from).then_some(&[7u8; 32][..]));
        }
        log
    }

    fn log(times: &[u64]) -> AuditLog {
        log_salted_from(times, times.len())
    }

    #[test]
    fn a_redaction_is_refused_where_any_entry_is_plain_and_says_where_to_start() {
        let log = log_salted_from(&[1, 2, 3, 4, 5], 3);
        let redact = [Field::Identity];
        let error = redactable(&log, 1..6, &redact).unwrap_err();
        assert_eq!(error.code(), tonic::Code::FailedPrecondition);
        assert!(
            error.message().contains("entries up to 3")
                && error.message().contains("after_index 3"),
            "{error:?}"
        );
        assert!(redactable(&log, 4..6, &redact).is_ok());
        assert!(redactable(&log, 1..6, &[]).is_ok());
    }

    fn range(after_index: u64, since_ms: u64, until_ms: u64) -> ExportRange {
        ExportRange {
            after_index,
            since_ms,
            until_ms,
            redact: Vec::new(),
        }
    }

    fn select_ok(log: &AuditLog, range: &ExportRange) -> std::ops::Range<u64> {
        select(log, range).unwrap()
    }

    #[test]
    fn a_range_is_one_run_of_consecutive_entries() {
        // The fourth entry's leader clock stepped back.
        let log = log(&[10, 20, 30, 25, 40, 50]);
        assert_eq!(select_ok(&log, &range(0, 0, 0)), 1..7);
        assert_eq!(select_ok(&log, &range(2, 0, 0)), 3..7);
        assert_eq!(select_ok(&log, &range(0, 20, 40)), 2..5);
        // Past the end, or nothing at or after since: empty, not a panic.
        assert!(select_ok(&log, &range(9, 0, 0)).is_empty());
        assert!(select_ok(&log, &range(0, 60, 0)).is_empty());
        assert_eq!(select_ok(&log, &range(3, 0, 45)), 4..6);
    }

    #[test]
    fn a_bad_range_or_redaction_is_refused_naming_the_field() {
        let request = |since_ms, until_ms, redact: &[&str]| pb::ExportAuditRequest {
            after_index: 0,
            since_ms,
            until_ms,
            redact: redact.iter().map(|text| text.to_string()).collect(),
        };
        let error = export_range(&request(50, 40, &[])).err().unwrap();
        assert!(error.message().contains("until_ms"), "{error:?}");
        let error = export_range(&request(0, 0, &["salaries"])).err().unwrap();
        assert!(error.message().contains("salaries"), "{error:?}");
        let ok = export_range(&request(0, 0, &["identities", "reasons", "identity"])).unwrap();
        assert_eq!(ok.redact, vec![Field::Identity, Field::Reason]);
    }
}
