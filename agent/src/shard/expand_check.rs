//! An expand migration may only add to the schema: the release before it must keep working
//! against the schema after it, which is why a rollback leaves expand migrations applied. The
//! class is declared by whoever registers the migration; this checks it where the migration
//! first runs, from the catalog lines the shard's fingerprint is made of (`<kind> <name> ...`),
//! taken before the transaction's first migration (the schema the release before knows) and
//! after each expand one, in the same transaction.
//!
//! Broken by: a line that is gone (a dropped column, table, index, constraint, trigger,
//! function or policy), a column or table whose description changed (type, identity, a default
//! changed or removed, `not null` added), an enum that lost or reordered labels, and a
//! `not null` column without a default added to a table that already existed (the old
//! release's inserts leave it out and fail). Allowed besides additions: enum labels added,
//! `not null` dropped or a default added to a column (the usual first steps of retiring it),
//! and in PostgreSQL a view redefined (its columns are lines of their own, checked as a
//! table's; SQLite's catalog has none, so there a redefined view is a break).
//!
//! Names are read as PostgreSQL prints them: an identifier with a space or a dot is double
//! quoted (`public."order items"."due at"`), an enum label single quoted (`'a,b'`); SQLite's
//! lines name objects unquoted, so there a name with a space or a dot may be misread. A
//! migration is blamed only for objects it changed itself. Not caught:
//! constraints or unique indexes added over existing columns (the old release's writes may
//! break them), and a column dropped and added again alike in one migration (its data is lost,
//! its line the same).

use std::collections::{BTreeMap, BTreeSet};

use rewind_shared::names::truncate;

/// At most this many findings are named; the rest are counted.
const MAX_NAMED: usize = 5;

/// Catalog lines whose object keeps its identity when its description changes: the kind and
/// name are the first two words (`column <table>.<column> <type> ...`). Other kinds' lines are
/// compared whole, so a changed index, constraint or trigger reads as dropped.
const NAMED_KINDS: [&str; 4] = ["column", "relation", "enum", "view"];

/// Where `text` may be cut at `separator`: not inside double quotes (identifiers) or single
/// quotes (literals), each escaped by doubling.
fn split_points(text: &str, separator: char) -> Vec<usize> {
    let mut points = Vec::new();
    let mut quote: Option<char> = None;
    for (at, character) in text.char_indices() {
        match quote {
            // A doubled quote inside a quoted part toggles twice: out and back in.
            Some(open) if character == open => quote = None,
            Some(_) => {}
            None if character == '"' || character == '\'' => quote = Some(character),
            None if character == separator => points.push(at),
            None => {}
        }
    }
    points
}

/// The kind and name of a line of a named kind (`column public."a b".c`).
fn key(line: &str) -> Option<&str> {
    let kind = line.split(' ').next()?;
    if !NAMED_KINDS.contains(&kind) {
        return None;
    }
    let spaces = split_points(line, ' ');
    Some(spaces.get(1).map_or(line, |&end| &line[..end]))
}

/// The table a `column <table>.<column>` key names.
fn table_of(key: &str) -> Option<&str> {
    let name = key.strip_prefix("column ")?;
    let dot = *split_points(name, '.').last()?;
    Some(&name[..dot])
}

/// An enum line's labels (`enum <type> 'a','b'`), in order.
fn labels(line: &str, key: &str) -> Vec<String> {
    let text = line[key.len()..].trim_start();
    let mut labels = Vec::new();
    let mut start = 0;
    for cut in split_points(text, ',').into_iter().chain([text.len()]) {
        labels.push(text[start..cut].to_string());
        start = cut + 1;
    }
    labels
}

/// A column's description: `<type>[ not null][ identity][ generated][ default <expr>]`.
struct Column<'a> {
    rest: &'a str,
    not_null: bool,
    default: Option<&'a str>,
}

fn column(body: &str) -> Column<'_> {
    let (rest, default) = match body.find(" default ") {
        Some(at) => (&body[..at], Some(&body[at + " default ".len()..])),
        None => (body, None),
    };
    let not_null = rest.contains(" not null");
    Column {
        rest,
        not_null,
        default,
    }
}

/// Whether a column's description only loosened: `not null` dropped, or a default added.
fn only_loosened(old: &str, new: &str) -> bool {
    let (old, new) = (column(old), column(new));
    let kept = |column: &Column<'_>| column.rest.replace(" not null", "");
    kept(&old) == kept(&new)
        && (old.not_null || !new.not_null)
        && (old.default.is_none() || old.default == new.default)
}

/// What in `after` (the catalog once the migration ran) is not an expansion of `before`: one
/// finding per broken object, empty when the migration only added.
#[cfg(test)]
pub fn expand_breaks(before: &[String], after: &[String]) -> Vec<String> {
    breaks(before, after, true)
        .into_iter()
        .map(|(_, finding)| finding)
        .collect()
}

/// What one expand migration broke: the breaks of `after` against `old_release` (the schema
/// before the transaction) on objects this migration itself changed (from `before_this` to
/// `after`), so an earlier migration of the transaction (a contract one a drill runs first) is
/// never blamed on it. `views_have_columns`: the catalog lists a view's columns (PostgreSQL),
/// so a redefined view is judged by them; without (SQLite) a redefined view is a break.
pub fn breaks_of_migration(
    old_release: &[String],
    before_this: &[String],
    after: &[String],
    views_have_columns: bool,
) -> Vec<String> {
    let touched = touched(before_this, after);
    breaks(old_release, after, views_have_columns)
        .into_iter()
        .filter(|(subject, _)| touched.contains(subject.as_str()))
        .map(|(_, finding)| finding)
        .collect()
}

/// The objects (keys of named kinds, whole lines of others) whose lines differ.
fn touched<'a>(before: &'a [String], after: &'a [String]) -> BTreeSet<&'a str> {
    let (old, new): (BTreeSet<&str>, BTreeSet<&str>) = (
        before.iter().map(String::as_str).collect(),
        after.iter().map(String::as_str).collect(),
    );
    old.symmetric_difference(&new)
        .map(|line| key(line).unwrap_or(line))
        .collect()
}

/// Each break with its subject (the key of a named kind, else the line).
fn breaks(before: &[String], after: &[String], views_have_columns: bool) -> Vec<(String, String)> {
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
        let finding = match key(line).and_then(|key| Some((key, *after_by_key.get(key)?))) {
            Some((key, now)) if key.starts_with("enum ") => {
                let (old, new) = (labels(line, key), labels(now, key));
                // Labels only added: the old ones are still there, in the same order.
                let kept: Vec<&String> = new.iter().filter(|label| old.contains(label)).collect();
                (kept != old.iter().collect::<Vec<_>>()).then(|| {
                    format!(
                        "changes {key}: labels {} -> {}",
                        old.join(","),
                        new.join(",")
                    )
                })
            }
            // Its columns are lines of their own.
            Some((key, _)) if key.starts_with("view ") && views_have_columns => None,
            Some((key, now))
                if key.starts_with("column ")
                    && only_loosened(line[key.len()..].trim(), now[key.len()..].trim()) =>
            {
                None
            }
            Some((key, now)) => Some(format!(
                "changes {key} from `{}` to `{}`",
                line[key.len()..].trim(),
                now[key.len()..].trim()
            )),
            None => Some(format!("drops {line}")),
        };
        if let Some(finding) = finding {
            findings.push((key(line).unwrap_or(line).to_string(), finding));
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
        let body = column(line[key.len()..].trim());
        if !keys_before.contains(key)
            && table_of(key).is_some_and(|table| existing.contains(table))
            && body.not_null
            && body.default.is_none()
            && !(body.rest.contains(" identity") || body.rest.contains(" generated"))
        {
            findings.push((
                key.to_string(),
                format!(
                    "adds {key} not null without a default: the old release's inserts leave it \
                     out and fail"
                ),
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

    const BEFORE: [&str; 7] = [
        "column public.orders.id integer not null",
        "column public.orders.note text",
        "column public.orders.state text not null",
        "enum public.status 'new','paid'",
        "index CREATE INDEX orders_note ON public.orders USING btree (note)",
        "relation public.orders r p",
        "view public.open_orders  SELECT id FROM orders",
    ];

    #[test]
    fn adding_and_loosening_is_expand() {
        let mut after = lines(&BEFORE);
        after.push("column public.orders.total bigint not null default 0".into());
        after.push("column public.orders.ref text".into());
        after.push("relation public.audit r p".into());
        after.push("column public.audit.id integer not null".into());
        after[2] = "column public.orders.state text default 'new'::text".into();
        after[3] = "enum public.status 'new','paid','refunded'".into();
        after[6] = "view public.open_orders  SELECT id, total FROM orders".into();
        after.push("column public.open_orders.total bigint".into());
        assert_eq!(expand_breaks(&lines(&BEFORE), &after), Vec::<String>::new());
    }

    #[test]
    fn drops_changes_and_required_columns_are_not() {
        let after = lines(&[
            "column public.orders.id bigint not null",
            "column public.orders.due date not null",
            "column public.orders.state text not null default 'x'::text",
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
                "drops view public.open_orders  SELECT id FROM orders",
                "adds column public.orders.due not null without a default: the old release's \
                 inserts leave it out and fail",
            ]
        );
        let refusal = describe("2026_02_drop_note", &findings);
        assert!(refusal.starts_with("2026_02_drop_note is declared expand"));
        assert!(refusal.contains("drops column public.orders.note"));
    }

    #[test]
    fn quoted_names_and_labels_are_read_whole() {
        let before = lines(&[
            "relation public.\"order items\" r p",
            "column public.\"order items\".\"due at\" date",
            "column public.\"order items\".\"a.b\" text",
            "enum public.kind 'a,b','c'",
        ]);
        let mut after = before.clone();
        // A label with a comma added between: still only an addition.
        after[3] = "enum public.kind 'a,b','x,y','c'".into();
        // A new column whose name shares a first word with an existing one.
        after.push("column public.\"order items\".\"due by\" date not null".into());
        assert_eq!(
            expand_breaks(&before, &after),
            vec![
                "adds column public.\"order items\".\"due by\" not null without a default: the \
                 old release's inserts leave it out and fail"
            ]
        );
        after.pop();
        after[3] = "enum public.kind 'a','b,c'".into();
        assert_eq!(
            expand_breaks(&before, &after),
            vec!["changes enum public.kind: labels 'a,b','c' -> 'a','b,c'"]
        );
    }

    /// Checked against the schema before the transaction: a table an earlier migration of it
    /// created is the new release's, so a required column added to it breaks nothing.
    #[test]
    fn what_the_same_transaction_created_is_the_new_releases() {
        let old_release = lines(&BEFORE);
        let mut after_both = old_release.clone();
        after_both.push("relation public.refunds r p".into());
        after_both.push("column public.refunds.id integer not null".into());
        after_both.push("column public.refunds.reason text not null".into());
        assert_eq!(
            expand_breaks(&old_release, &after_both),
            Vec::<String>::new()
        );
    }

    /// A drill runs a contract migration and then an expand one in one transaction: what the
    /// contract one dropped is not the expand one's doing. SQLite lists no view columns, so a
    /// redefined view is a break there.
    #[test]
    fn a_migration_is_blamed_only_for_what_it_changed() {
        let old_release = lines(&BEFORE);
        let mut after_contract = old_release.clone();
        after_contract.retain(|line| !line.starts_with("column public.orders.note"));
        let mut after_expand = after_contract.clone();
        after_expand.push("column public.orders.ref text".into());
        assert_eq!(
            breaks_of_migration(&old_release, &after_contract, &after_expand, true),
            Vec::<String>::new()
        );
        let mut narrowed = after_expand.clone();
        narrowed.retain(|line| !line.starts_with("column public.orders.ref"));
        narrowed.retain(|line| !line.starts_with("column public.orders.id"));
        assert_eq!(
            breaks_of_migration(&old_release, &after_expand, &narrowed, true),
            vec!["drops column public.orders.id integer not null"]
        );
        let sqlite_before = lines(&["view v on t CREATE VIEW v AS SELECT a, b FROM t"]);
        let sqlite_after = lines(&["view v on t CREATE VIEW v AS SELECT a FROM t"]);
        assert_eq!(
            breaks_of_migration(&sqlite_before, &sqlite_before, &sqlite_after, false).len(),
            1
        );
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
