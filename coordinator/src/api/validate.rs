//! Validation of what arrives over the control API: every field checked and bounded, and
//! refused naming it, before anything is proposed. The bounds are named here.

use rewind_proto::v1 as pb;
use rewind_shared::{freeze, names};
use tonic::Status;

use super::status::{invalid, to_status};
use crate::state_machine::*;

/// Longest free-text reason accepted.
pub(super) const MAX_REASON_BYTES: usize = 1024;
/// Most hosts one change may name explicitly.
pub(super) const MAX_HOSTS_PER_REQUEST: usize = 10_000;
/// Most synthetic checks one service may have.
pub(super) const MAX_SYNTHETICS: usize = 16;
/// Most flags one change may turn on.
pub(super) const MAX_FLAGS_PER_CHANGE: usize = 64;
/// Longest `InspectHostRequest.compare_token`.
pub(super) const MAX_COMPARE_TOKEN_BYTES: usize = 64;
/// The most audit entries, changes, rollbacks or triggers one list answer holds.
pub(super) const MAX_LIST_PAGE: u32 = 1000;
/// A list page's size when the request names none.
pub(super) const DEFAULT_LIST_PAGE: usize = 100;
/// About the most bytes one `ListHosts` page holds (a single host larger than this still
/// gets a page of its own: its report is bounded well under the message limit).
pub(super) const MAX_LIST_PAGE_BYTES: usize = 2 << 20;
/// The most steps one rollback in an answer holds (`GetRollbackRequest.steps_page_size`).
pub(super) const MAX_STEPS_PAGE: u32 = 10_000;
/// The steps a rollback in an answer holds when the request names no page size.
pub(super) const DEFAULT_STEPS_PAGE: usize = 1000;
/// About the most bytes one rollback in an answer holds, steps included: a page of steps ends
/// there whatever its size (well under a client's default 4 MiB limit).
pub(super) const MAX_ROLLBACK_BYTES: usize = MAX_LIST_PAGE_BYTES;

pub(super) const MAX_CONDITIONS: usize = 8;
/// Longest recovery time objective a service may declare.
pub(super) const MAX_RTO_S: u64 = 30 * 86_400;

pub(super) fn validate_condition(
    position: usize,
    condition: &pb::PolicyCondition,
) -> Result<PolicyCondition, Status> {
    let field = |name: &str| format!("service.policy.conditions[{position}].{name}");
    let figure = match pb::HealthFigure::try_from(condition.figure) {
        Ok(pb::HealthFigure::ProbeFailureRatio) => HealthFigure::ProbeFailureRatio,
        Ok(pb::HealthFigure::ErrorRatio) => HealthFigure::ErrorRatio,
        Ok(pb::HealthFigure::P99LatencyMs) => HealthFigure::P99LatencyMs,
        _ => {
            return Err(invalid(
                &field("figure"),
                "name one: probe_failure_ratio, error_ratio or p99_latency_ms",
            ));
        }
    };
    let threshold = condition.threshold;
    let allowed = if condition.relative_to_baseline {
        (threshold > 0.0 && threshold <= 1000.0)
            .then_some(())
            .ok_or("as a multiple of the baseline it must be within (0, 1000]")
    } else if figure == HealthFigure::P99LatencyMs {
        (threshold > 0.0 && threshold <= 3_600_000.0)
            .then_some(())
            .ok_or("as milliseconds it must be within (0, 3600000]")
    } else {
        (0.0..=1.0)
            .contains(&threshold)
            .then_some(())
            .ok_or("as a ratio it must be within 0..=1")
    };
    if let Err(why) = allowed {
        return Err(invalid(
            &field("threshold"),
            format!("is {threshold}; {why}"),
        ));
    }
    if condition.for_s == 0 || condition.for_s > 3600 {
        return Err(invalid(
            &field("for_s"),
            format!("is {}, must be within 1..=3600 s", condition.for_s),
        ));
    }
    Ok(PolicyCondition {
        figure,
        threshold,
        relative_to_baseline: condition.relative_to_baseline,
        for_s: condition.for_s,
    })
}

pub(super) fn validate_service(service: pb::Service) -> Result<ServiceRecord, Status> {
    names::validate_name("service.name", &service.name).map_err(field_error)?;
    if service.depends_on.len() > 256 {
        return Err(invalid(
            "service.depends_on",
            "names more than 256 services",
        ));
    }
    for provider in &service.depends_on {
        names::validate_name("service.depends_on", provider).map_err(field_error)?;
    }
    let policy = match service.policy {
        None => HealthPolicy::default(),
        Some(policy) => {
            if !(0.0..=1.0).contains(&policy.max_probe_failure_ratio) {
                return Err(invalid(
                    "service.policy.max_probe_failure_ratio",
                    format!(
                        "is {}, must be within 0..=1",
                        policy.max_probe_failure_ratio
                    ),
                ));
            }
            if policy.for_s > 3600 {
                return Err(invalid(
                    "service.policy.for_s",
                    format!("is {}, at most 3600 s is allowed", policy.for_s),
                ));
            }
            if policy.watch_s == 0 || policy.watch_s > 7 * 86_400 {
                return Err(invalid(
                    "service.policy.watch_s",
                    format!("is {}, must be within 1..=604800 s", policy.watch_s),
                ));
            }
            if policy.conditions.len() > MAX_CONDITIONS {
                return Err(invalid(
                    "service.policy.conditions",
                    format!("names more than {MAX_CONDITIONS} conditions"),
                ));
            }
            let conditions = policy
                .conditions
                .iter()
                .enumerate()
                .map(|(position, condition)| validate_condition(position, condition))
                .collect::<Result<Vec<_>, Status>>()?;
            HealthPolicy {
                max_probe_failure_ratio: policy.max_probe_failure_ratio,
                for_s: policy.for_s,
                watch_s: policy.watch_s,
                auto_rollback: policy.auto_rollback,
                conditions,
            }
        }
    };
    if service.synthetics.len() > MAX_SYNTHETICS {
        return Err(invalid(
            "service.synthetics",
            format!("names more than {MAX_SYNTHETICS} checks"),
        ));
    }
    let synthetics = service
        .synthetics
        .into_iter()
        .map(validate_synthetic)
        .collect::<Result<Vec<_>, Status>>()?;
    let rollback_steps = crate::recipe::parse(&service.rollback_steps)
        .map_err(|problem| invalid("service.rollback_steps", problem))?;
    if service.rto_s > MAX_RTO_S {
        return Err(invalid(
            "service.rto_s",
            format!("is {} s, at most {MAX_RTO_S} s (30 days)", service.rto_s),
        ));
    }
    if service.freeze_windows.len() > freeze::MAX_WINDOWS {
        return Err(invalid(
            "service.freeze_windows",
            format!("names more than {} windows", freeze::MAX_WINDOWS),
        ));
    }
    let freeze = service
        .freeze_windows
        .iter()
        .map(|text| {
            freeze::FreezeWindow::parse(text).map_err(|problem| {
                invalid("service.freeze_windows", names::printable(&problem, 300))
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    let drift_policy = crate::state_machine::DriftPolicy::parse(&service.drift_policy)
        .map_err(|problem| invalid("service.drift_policy", problem))?;
    if service.isolate_after_failures > MAX_ISOLATE_AFTER_FAILURES {
        return Err(invalid(
            "service.isolate_after_failures",
            format!(
                "is {}, at most {MAX_ISOLATE_AFTER_FAILURES}",
                service.isolate_after_failures
            ),
        ));
    }
    Ok(ServiceRecord {
        isolate_after_failures: service.isolate_after_failures,
        drift_policy,
        name: service.name,
        depends_on: service.depends_on,
        policy,
        synthetics,
        rollback_steps,
        rto_s: service.rto_s,
        freeze,
    })
}

/// Most failures of a wave a service's policy may wait for before isolating it.
const MAX_ISOLATE_AFTER_FAILURES: u32 = 10;

/// Most migrations one change may apply.
pub(super) const MAX_MIGRATIONS_PER_CHANGE: usize = 64;

/// Largest script a migration may carry.
pub(super) const MAX_SCRIPT_BYTES: usize = 256 * 1024;

pub(super) fn validate_migration(migration: pb::Migration) -> Result<MigrationRecord, Status> {
    names::validate_name("migration.database", &migration.database).map_err(field_error)?;
    names::validate_version("migration.version", &migration.version).map_err(field_error)?;
    let class = match pb::MigrationClass::try_from(migration.class) {
        Ok(pb::MigrationClass::Expand) => MigrationClass::Expand,
        Ok(pb::MigrationClass::Contract) => MigrationClass::Contract,
        Ok(pb::MigrationClass::Data) => MigrationClass::Data,
        _ => {
            return Err(invalid(
                "migration.class",
                "must be expand, contract or data",
            ));
        }
    };
    for (field, script) in [
        ("migration.up_sql", &migration.up_sql),
        ("migration.down_sql", &migration.down_sql),
        ("migration.verify_sql", &migration.verify_sql),
    ] {
        if script.len() > MAX_SCRIPT_BYTES {
            return Err(invalid(
                field,
                format!("is {} bytes, at most {MAX_SCRIPT_BYTES}", script.len()),
            ));
        }
        // rewind runs every script inside its own transaction (prepared, across shards): a
        // script that commits on its own would escape the all-or-nothing.
        if let Some(statement) = rewind_shared::sql::transaction_control(script) {
            return Err(invalid(
                field,
                format!(
                    "ends or begins a transaction ({}): rewind runs the script inside its own \
                     transaction; remove the transaction control",
                    rewind_shared::names::truncate(&statement, 60)
                ),
            ));
        }
    }
    if migration.up_sql.trim().is_empty() {
        return Err(invalid("migration.up_sql", "is empty"));
    }
    if migration.down_sql.trim().is_empty() {
        return Err(invalid(
            "migration.down_sql",
            format!(
                "{}@{} has no down script: a migration that cannot be undone is refused",
                migration.database, migration.version
            ),
        ));
    }
    let checksum = migration_checksum(
        &migration.up_sql,
        &migration.down_sql,
        &migration.verify_sql,
    );
    Ok(MigrationRecord {
        database: migration.database,
        version: migration.version,
        class,
        up_sql: migration.up_sql,
        down_sql: migration.down_sql,
        verify_sql: migration.verify_sql,
        checksum,
        registered_at_ms: 0,
        registered_by: String::new(),
    })
}

pub(super) fn validate_synthetic(check: pb::SyntheticCheck) -> Result<SyntheticCheck, Status> {
    names::validate_name("service.synthetics.name", &check.name).map_err(field_error)?;
    let field = |what: &str| format!("service.synthetics[{}].{what}", check.name);
    if !check.url.starts_with("http://") || check.url.len() > 2048 {
        return Err(invalid(
            &field("url"),
            format!(
                "{:?} must be an http:// URL of at most 2048 bytes",
                check.url
            ),
        ));
    }
    let method = match check.method.to_ascii_uppercase().as_str() {
        "" | "GET" => "GET",
        "POST" => "POST",
        other => {
            return Err(invalid(
                &field("method"),
                format!("{other:?} is not GET or POST"),
            ));
        }
    };
    if check.body.len() > 65_536 || check.body_contains.len() > 1024 {
        return Err(invalid(
            &field("body"),
            "at most 64 KiB of body and 1 KiB of expected text",
        ));
    }
    let expect_status = match check.expect_status {
        0 => 200,
        status @ 100..=599 => status as u16,
        other => {
            return Err(invalid(
                &field("expect_status"),
                format!("{other} is not an HTTP status"),
            ));
        }
    };
    let max_latency_ms = match check.max_latency_ms {
        0 => 2000,
        latency @ 1..=60_000 => latency,
        other => {
            return Err(invalid(
                &field("max_latency_ms"),
                format!("is {other}, must be within 1..=60000"),
            ));
        }
    };
    Ok(SyntheticCheck {
        name: check.name,
        url: check.url,
        method: method.to_string(),
        body: check.body,
        expect_status,
        body_contains: check.body_contains,
        max_latency_ms,
    })
}

/// A reason that must be given (the action is audited): within bounds and not blank; `why`
/// tells the caller what to write.
pub(super) fn required_reason(reason: &str, why: &str) -> Result<(), Status> {
    validate_reason(reason)?;
    if reason.trim().is_empty() {
        return Err(invalid("reason", why));
    }
    Ok(())
}

pub(super) fn validate_reason(reason: &str) -> Result<(), Status> {
    if reason.len() > MAX_REASON_BYTES {
        return Err(invalid(
            "reason",
            format!(
                "is {} bytes, at most {MAX_REASON_BYTES} are allowed",
                reason.len()
            ),
        ));
    }
    // Reasons are shown on terminals and in the audit log: no escape sequences, one line.
    if reason.chars().any(char::is_control) {
        return Err(invalid(
            "reason",
            "must not hold control characters (newlines, tabs, escapes)",
        ));
    }
    Ok(())
}

/// One paging style for every list (as Google's AIP-158): `page_size` and the previous page's
/// `next_page_token` as `page_token`. The names before 0.3 (`limit`, `before`, `from_index`)
/// are still read when the new ones are unset, for one release.
pub(super) struct PageRequest<'a> {
    pub size: u32,
    pub legacy_size: u32,
    pub token: &'a str,
    pub legacy_token: (&'static str, &'a str),
}

impl<'a> PageRequest<'a> {
    /// A list newest first by number whose fields before 0.3 were `limit` and `before`.
    pub fn with_before(size: u32, limit: u32, token: &'a str, before: &'a str) -> Self {
        Self {
            size,
            legacy_size: limit,
            token,
            legacy_token: ("before", before),
        }
    }

    /// A list with no names before 0.3 to read.
    pub fn new(size: u32, token: &'a str) -> Self {
        Self {
            size,
            legacy_size: 0,
            token,
            legacy_token: ("", ""),
        }
    }

    /// The page's size: 0 means 100, at most [`MAX_LIST_PAGE`].
    pub fn size(&self) -> Result<usize, Status> {
        let (field, size) = match self.size {
            0 => ("limit", self.legacy_size),
            size => ("page_size", size),
        };
        match size {
            0 => Ok(DEFAULT_LIST_PAGE),
            size if size > MAX_LIST_PAGE => Err(invalid(
                field,
                format!("is {size}, at most {MAX_LIST_PAGE} are returned at once"),
            )),
            size => Ok(size as usize),
        }
    }

    /// The token the page continues from (the field it came in, and its text); empty: the first.
    pub fn token(&self) -> (&'static str, &str) {
        match self.token {
            "" => self.legacy_token,
            token => ("page_token", token),
        }
    }

    /// For lists newest first by number (`ch-12`): the number below which the page starts.
    /// [`one_page`] then takes the page and names the next.
    pub fn before(&self, prefix: &str) -> Result<u64, Status> {
        match self.token() {
            (_, "") => Ok(u64::MAX),
            (field, token) => parse_id(field, prefix, token),
        }
    }
}

/// Cuts a page where its encoded size passes [`MAX_LIST_PAGE_BYTES`] (keeping at least one
/// item, whose own size the transport bounds), and names the next page from the last kept.
pub(super) fn within_bytes<T: prost::Message>(
    page: &mut Vec<T>,
    next_page_token: &mut String,
    id: impl Fn(&T) -> String,
) {
    let fits = items_that_fit(0, page);
    if fits < page.len() {
        page.truncate(fits);
        *next_page_token = page.last().map(&id).unwrap_or_default();
    }
}

/// How many of `items`, in order, one answer holds beside `base_bytes` of its other fields: up
/// to [`MAX_LIST_PAGE_BYTES`] in all, and always one when there is one (each is bounded).
pub(super) fn items_that_fit<T: prost::Message>(base_bytes: usize, items: &[T]) -> usize {
    let mut bytes = base_bytes;
    items
        .iter()
        .take_while(|item| {
            bytes += repeated_bytes(std::slice::from_ref(*item));
            bytes <= MAX_LIST_PAGE_BYTES
        })
        .count()
        .max(1)
        .min(items.len())
}

/// What `items` add to a message as a repeated field: each with its tag (one byte: every
/// repeated field paged here is numbered below 16) and length prefix.
pub(super) fn repeated_bytes<T: prost::Message>(items: &[T]) -> usize {
    items
        .iter()
        .map(|item| {
            let length = item.encoded_len();
            1 + prost::encoding::encoded_len_varint(length as u64) + length
        })
        .sum()
}

/// A page of `items` (in list order, from where the page starts): the first `size`, and the
/// next page's token (the last one's `id`) when more follow.
pub(super) fn one_page<T>(
    size: usize,
    mut items: impl Iterator<Item = T>,
    id: impl Fn(&T) -> String,
) -> (Vec<T>, String) {
    let page: Vec<T> = items.by_ref().take(size).collect();
    let next_page_token = match page.last() {
        Some(last) if items.next().is_some() => id(last),
        _ => String::new(),
    };
    (page, next_page_token)
}

/// The page of a rollback's steps a `GetRollbackRequest` asks for: the index of its first
/// step and the most steps it may hold.
pub(super) fn steps_page(request: &pb::GetRollbackRequest) -> Result<(usize, usize), Status> {
    let size = match request.steps_page_size {
        0 => DEFAULT_STEPS_PAGE,
        size if size > MAX_STEPS_PAGE => {
            return Err(invalid(
                "steps_page_size",
                format!("is {size}, at most {MAX_STEPS_PAGE} steps are returned at once"),
            ));
        }
        size => size as usize,
    };
    let from = match request.steps_page_token.as_str() {
        "" => 0,
        token => token.parse::<u32>().map_err(|_| {
            invalid(
                "steps_page_token",
                "is not a token a GetRollback answer gave (next_steps_page_token)",
            )
        })? as usize,
    };
    Ok((from, size))
}

/// The token of the page of `rollback`'s steps after `page`, which began at `from`; empty
/// when none follows.
pub(super) fn next_steps_page_token(rollback: &pb::Rollback, from: usize) -> String {
    let next = from + rollback.steps.len();
    if next < rollback.steps_total as usize {
        next.to_string()
    } else {
        String::new()
    }
}

/// Parses `ch-12` / `rb-3`, naming the field and the expected shape when it is not one.
pub(super) fn parse_id(field: &str, prefix: &str, id: &str) -> Result<u64, Status> {
    if id.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if id.len() > names::MAX_NAME_LEN {
        return Err(invalid(
            field,
            format!("is {} bytes, not an id like {prefix}-12", id.len()),
        ));
    }
    parse_numbered_id(prefix, id)
        .ok_or_else(|| invalid(field, format!("{id:?} is not an id like {prefix}-12")))
}

pub(super) fn field_error(error: rewind_shared::SharedError) -> Status {
    to_status(error.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_migrations_are_refused_naming_the_field() {
        let good = pb::Migration {
            database: "orders".into(),
            version: "0001".into(),
            class: pb::MigrationClass::Expand.into(),
            up_sql: "ALTER TABLE t ADD COLUMN c int".into(),
            down_sql: "ALTER TABLE t DROP COLUMN c".into(),
            ..Default::default()
        };
        let record = validate_migration(good.clone()).unwrap();
        assert_eq!(
            record.checksum,
            migration_checksum(&good.up_sql, &good.down_sql, "")
        );
        for (migration, why) in [
            (
                pb::Migration {
                    class: 0,
                    ..good.clone()
                },
                "migration.class",
            ),
            (
                pb::Migration {
                    database: "Orders".into(),
                    ..good.clone()
                },
                "migration.database",
            ),
            (
                pb::Migration {
                    up_sql: " ".into(),
                    ..good.clone()
                },
                "migration.up_sql",
            ),
            (
                pb::Migration {
                    down_sql: String::new(),
                    ..good.clone()
                },
                "has no down script",
            ),
            (
                pb::Migration {
                    verify_sql: "x".repeat(MAX_SCRIPT_BYTES + 1),
                    ..good.clone()
                },
                "migration.verify_sql",
            ),
        ] {
            let status = validate_migration(migration).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(
                status.message().contains(why),
                "{why}: {}",
                status.message()
            );
        }
    }

    #[test]
    fn a_page_names_the_next_only_when_more_follow_and_stops_at_its_bytes() {
        let ids =
            |page: &[pb::Change]| page.iter().map(|c| c.change_id.clone()).collect::<Vec<_>>();
        let changes = |n: usize, detail_bytes: usize| {
            (1..=n).rev().map(move |number| pb::Change {
                change_id: format!("ch-{number}"),
                reason: "x".repeat(detail_bytes),
                ..Default::default()
            })
        };
        let (page, next) = one_page(2, changes(3, 0), |c| c.change_id.clone());
        assert_eq!(
            (ids(&page), next.as_str()),
            (vec!["ch-3".into(), "ch-2".into()], "ch-2")
        );
        let (page, next) = one_page(3, changes(3, 0), |c| c.change_id.clone());
        assert_eq!((page.len(), next.as_str()), (3, ""));
        // Three of 900 KiB each: the page keeps two and names the next from the second.
        let (mut page, mut next) = one_page(3, changes(3, 900 << 10), |c| c.change_id.clone());
        within_bytes(&mut page, &mut next, |c| c.change_id.clone());
        assert_eq!(
            (ids(&page), next.as_str()),
            (vec!["ch-3".into(), "ch-2".into()], "ch-2")
        );
        // One larger than a page is still answered, alone.
        let (mut page, mut next) = one_page(3, changes(3, 3 << 20), |c| c.change_id.clone());
        within_bytes(&mut page, &mut next, |c| c.change_id.clone());
        assert_eq!((ids(&page), next.as_str()), (vec!["ch-3".into()], "ch-3"));
    }
}
