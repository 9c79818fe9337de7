//! An expand migration may only add to the schema: the release before it must keep working
//! against the schema after it, which is why a rollback leaves expand migrations applied. The
//! class is declared by whoever registers the migration; this checks it where the migration
//! first runs, from the catalog lines the shard's fingerprint is made of (`<kind> <name> ...`),
//! taken before and after its up script in the same transaction.
//!
//! Broken by: a line that is gone (a dropped column, table, index, constraint, view, trigger,
//! function or policy), a column or table whose description changed (type, nullability,
//! default), an enum that lost or reordered labels (adding labels is fine), and a `not null`
//! column without a default added to a table that already existed (the old release's inserts
//! leave it out and fail).

use std::collections::{BTreeMap, BTreeSet};

use rewind_shared::names::truncate;

/// At most this many findings are named; the rest are counted.
const MAX_NAMED: usize = 5;

/// Catalog lines whose object keeps its identity when its description changes: the kind and
/// name are the first two words (`column <table>.<column> <type> ...`). Other kinds' lines are
/// compared whole, so a changed index, constraint or view reads as dropped.
const NAMED_KINDS: [&str; 3] = ["column", "relation", "enum"];

fn key(line: &str) -> Option<&str> {
    let kind = line.split(' ').next()?;
    if !NAMED_KINDS.contains(&kind) {
        return None;
    }
    let mut spaces = line.match_indices(' ').map(|(at, _)| at);
    spaces.next()?;
    Some(spaces.next().map_or(line, |end| &line[..end]))
}

/// The table a `column <table>.<column>` key names.
fn table_of(key: &str) -> Option<&str> {
    let name = key.strip_prefix("column ")?;
    name.rsplit_once('.').map(|(table, _)| table)
}

/// An enum line's labels (`enum <type> 'a','b'`), in order.
fn labels(line: &str) -> Vec<&str> {
    line.splitn(3, ' ')
        .nth(2)
        .map(|labels| labels.split(',').collect())
        .unwrap_or_default()
}

/// What in `after` (the catalog once the migration ran) is not an expansion of `before`: one
/// finding per broken object, empty when the migration only added.
pub fn expand_breaks(before: &[String], after: &[String]) -> Vec<String> {
    let after_lines: BTreeSet<&str> = after.iter().map(String::as_str).collect();
    let after_by_key: BTreeMap<&str, &str> = after
        .iter()
        .filter_map(|line| Some((key(line)?, line.as_str())))
        .collect();
    let mut findings = Vec::new();
    for line in before {
        if after_lines.contains(line.as_str()) {
            continue;
        }
        match key(line).and_then(|key| Some((key, *after_by_key.get(key)?))) {
            Some((key, now)) if key.starts_with("enum ") => {
                let (old, new) = (labels(line), labels(now));
                // Labels only added: the old ones are still there, in the same order.
                let kept: Vec<&str> = new
                    .iter()
                    .copied()
                    .filter(|label| old.contains(label))
                    .collect();
                if kept != old {
                    findings.push(format!(
                        "changes {key}: labels {} -> {}",
                        old.join(","),
                        new.join(",")
                    ));
                }
            }
            Some((key, now)) => findings.push(format!(
                "changes {key} from `{}` to `{}`",
                line[key.len()..].trim(),
                now[key.len()..].trim()
            )),
            None => findings.push(format!("drops {line}")),
        }
    }
    let keys_before: BTreeSet<&str> = before.iter().filter_map(|line| key(line)).collect();
    // Tables the old release knew (by a relation line, or a column of it in SQLite).
    let existing: BTreeSet<&str> = keys_before
        .iter()
        .filter_map(|key| key.strip_prefix("relation ").or_else(|| table_of(key)))
        .collect();
    for line in after {
        let Some(key) = key(line) else { continue };
        let new_column = !keys_before.contains(key);
        let body = &line[key.len()..];
        if new_column
            && table_of(key).is_some_and(|table| existing.contains(table))
            && body.contains(" not null")
            && !(body.contains(" default ")
                || body.contains(" identity")
                || body.contains(" generated"))
        {
            findings.push(format!(
                "adds {key} not null without a default: the old release's inserts leave it out \
                 and fail"
            ));
        }
    }
    findings
}

/// The refusal of an "expand" migration that did more than add, naming what it broke.
pub fn describe(version: &str, findings: &[String]) -> String {
    let mut named: Vec<String> = findings
        .iter()
        .take(MAX_NAMED)
        .map(|finding| truncate(finding, 200).to_string())
        .collect();
    if findings.len() > MAX_NAMED {
        named.push(format!("{} more", findings.len() - MAX_NAMED));
    }
    format!(
        "{version} is declared expand but does more than add, so the release before it would \
         break against it: {}; register it as contract (or data) instead",
        named.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &[&str]) -> Vec<String> {
        text.iter().map(|line| line.to_string()).collect()
    }

    const BEFORE: [&str; 5] = [
        "column public.orders.id integer not null",
        "column public.orders.note text",
        "enum public.status 'new','paid'",
        "index CREATE INDEX orders_note ON public.orders USING btree (note)",
        "relation public.orders r p",
    ];

    #[test]
    fn adding_is_expand() {
        let mut after = lines(&BEFORE);
        after.push("column public.orders.total bigint not null default 0".into());
        after.push("column public.orders.ref text".into());
        after.push("relation public.audit r p".into());
        after.push("column public.audit.id integer not null".into());
        after[2] = "enum public.status 'new','paid','refunded'".into();
        assert_eq!(expand_breaks(&lines(&BEFORE), &after), Vec::<String>::new());
    }

    #[test]
    fn drops_changes_and_required_columns_are_not() {
        let after = lines(&[
            "column public.orders.id bigint not null",
            "column public.orders.due date not null",
            "enum public.status 'paid','new'",
            "relation public.orders r p",
        ]);
        let findings = expand_breaks(&lines(&BEFORE), &after);
        assert_eq!(
            findings,
            vec![
                "changes column public.orders.id from `integer not null` to `bigint not null`",
                "drops column public.orders.note text",
                "changes enum public.status: labels 'new','paid' -> 'paid','new'",
                "drops index CREATE INDEX orders_note ON public.orders USING btree (note)",
                "adds column public.orders.due not null without a default: the old release's \
                 inserts leave it out and fail",
            ]
        );
        let refusal = describe("2026_02_drop_note", &findings);
        assert!(refusal.starts_with("2026_02_drop_note is declared expand"));
        assert!(refusal.contains("drops column public.orders.note"));
    }

    #[test]
    fn many_findings_are_counted() {
        let before: Vec<String> = (0..9).map(|n| format!("column t.c{n} int")).collect();
        let refusal = describe("v", &expand_breaks(&before, &[]));
        assert!(
            refusal.contains("drops column t.c4 int; 4 more"),
            "{refusal}"
        );
    }
}
