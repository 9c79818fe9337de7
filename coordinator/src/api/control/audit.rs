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
use crate::api::status::invalid;
use crate::api::validate::{PageRequest, one_page};
use crate::state_machine::AuditEntry;

pub(super) type ExportStream =
    Pin<Box<dyn Stream<Item = Result<pb::ExportAuditResponse, Status>> + Send>>;

/// Entries per message of an export: a few hundred KiB at most, well inside gRPC's 4 MiB.
const EXPORT_CHUNK: usize = 256;

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
    let skip = usize::try_from(first.saturating_sub(1)).unwrap_or(usize::MAX);
    let (entries, next_page_token) = control.context.node.read(|state| {
        let entries = state.audit.entries().iter().skip(skip);
        let entries = entries.map(|entry| convert::audit_entry(entry));
        one_page(size, entries, |last| (last.index + 1).to_string())
    });
    Ok(Response::new(pb::ListAuditResponse {
        entries,
        next_page_token,
    }))
}

pub(super) async fn verify_audit(
    control: &Control,
    _request: Request<pb::VerifyAuditRequest>,
) -> Result<Response<pb::VerifyAuditResponse>, Status> {
    control.context.current().await?;
    let verification = control.context.node.read(|state| state.audit.verify());
    Ok(Response::new(pb::VerifyAuditResponse {
        ok: verification.first_broken.is_none(),
        entries: verification.entries,
        first_broken_index: verification.first_broken.unwrap_or(0),
        detail: verification.detail,
        head_hash: verification.head_hash,
    }))
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

/// Positions (from 0) of the run of entries `range` selects: after `after_index`, from the first
/// written at or after `since_ms`, up to the first written at or after `until_ms`. One run of
/// consecutive entries even if a leader's clock stepped back, so it verifies as a chain.
fn select(entries: &[Arc<AuditEntry>], range: &ExportRange) -> std::ops::Range<usize> {
    let after = usize::try_from(range.after_index)
        .unwrap_or(usize::MAX)
        .min(entries.len());
    let start = entries[after..]
        .iter()
        .position(|entry| entry.at_ms >= range.since_ms)
        .map_or(entries.len(), |offset| after + offset);
    let end = match range.until_ms {
        0 => entries.len(),
        until => entries[start..]
            .iter()
            .position(|entry| entry.at_ms >= until)
            .map_or(entries.len(), |offset| start + offset),
    };
    start..end
}

/// Refuses a redaction of entries written plain (before cluster version 5): their hashes cover
/// the fields as they are, so an export could not be both redacted and verifiable.
fn redactable(entries: &[Arc<AuditEntry>], redact: &[Field]) -> Result<(), Status> {
    if redact.is_empty() {
        return Ok(());
    }
    let last_plain = entries
        .iter()
        .rev()
        .find(|entry| entry.format == FORMAT_PLAIN);
    let Some(index) = last_plain.map(|entry| entry.index) else {
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
    let positions = control.context.node.read(|state| {
        let entries = state.audit.entries();
        let positions = select(entries, &range);
        redactable(&entries[positions.clone()], &range.redact).map(|()| positions)
    })?;
    let context = control.context.clone();
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut next = positions.start;
        while next < positions.end {
            let chunk_end = (next + EXPORT_CHUNK).min(positions.end);
            // Shared entries: the read lock is held only to copy pointers.
            let chunk: Vec<Arc<AuditEntry>> = context
                .node
                .read(|state| state.audit.entries()[next..chunk_end].to_vec());
            let entries = chunk
                .iter()
                .map(|entry| {
                    let mut entry = AuditEntry::clone(entry);
                    for field in &range.redact {
                        // Every entry was checked to be salted above.
                        let _ = entry.redact(*field);
                    }
                    convert::audit_entry(&entry)
                })
                .collect();
            if sender
                .send(Ok(pb::ExportAuditResponse { entries }))
                .await
                .is_err()
            {
                return; // The client went away.
            }
            next = chunk_end;
        }
    });
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
        let entries = log.entries();
        let redact = [Field::Identity];
        let error = redactable(entries, &redact).unwrap_err();
        assert_eq!(error.code(), tonic::Code::FailedPrecondition);
        assert!(
            error.message().contains("entries up to 3")
                && error.message().contains("after_index 3"),
            "{error:?}"
        );
        assert!(redactable(&entries[3..], &redact).is_ok());
        assert!(redactable(entries, &[]).is_ok());
    }

    fn range(after_index: u64, since_ms: u64, until_ms: u64) -> ExportRange {
        ExportRange {
            after_index,
            since_ms,
            until_ms,
            redact: Vec::new(),
        }
    }

    #[test]
    fn a_range_is_one_run_of_consecutive_entries() {
        // The fourth entry's leader clock stepped back.
        let log = log(&[10, 20, 30, 25, 40, 50]);
        let entries = log.entries();
        assert_eq!(select(entries, &range(0, 0, 0)), 0..6);
        assert_eq!(select(entries, &range(2, 0, 0)), 2..6);
        assert_eq!(select(entries, &range(0, 20, 40)), 1..4);
        // Past the end, or nothing at or after since: empty, not a panic.
        assert!(select(entries, &range(9, 0, 0)).is_empty());
        assert!(select(entries, &range(0, 60, 0)).is_empty());
        assert_eq!(select(entries, &range(3, 0, 45)), 3..5);
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
