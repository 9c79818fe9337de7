//! Tables for people, JSON (protobuf JSON mapping) for scripts.
//!
//! Everything rewindctl prints goes through [`say!`], [`say_inline!`], [`say_err!`] or
//! [`table`], which escape what a terminal would act on (escape sequences, other control
//! characters, bidirectional overrides): region labels, reasons, step details and errors come
//! from agents and other people, and must not reach a terminal raw.

/// `println!` for whatever may hold text from outside: see the module's documentation.
macro_rules! say {
    () => {
        println!()
    };
    ($($arg:tt)*) => {
        println!("{}", rewind_shared::names::for_terminal(&format!($($arg)*)))
    };
}

/// `print!`, escaped as [`say!`] is.
macro_rules! say_inline {
    ($($arg:tt)*) => {
        print!("{}", rewind_shared::names::for_terminal(&format!($($arg)*)))
    };
}

/// `eprintln!`, escaped as [`say!`] is.
macro_rules! say_err {
    ($($arg:tt)*) => {
        eprintln!("{}", rewind_shared::names::for_terminal(&format!($($arg)*)))
    };
}

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use rewind_proto::v1 as pb;
use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Tables for people.
    #[default]
    Table,
    /// Tables with more columns (lists of hosts, changes and rollbacks).
    Wide,
    /// The protobuf JSON mapping of the answer.
    Json,
    /// The same as JSON, in YAML.
    Yaml,
    /// A JUnit XML report: `drill rollback`, `drill show rd-N` and `drill list` only.
    Junit,
}

impl Format {
    /// JSON or YAML: the answer itself, for scripts.
    pub fn is_structured(self) -> bool {
        matches!(self, Self::Json | Self::Yaml)
    }

    /// A table for people (wide or not).
    pub fn is_table(self) -> bool {
        matches!(self, Self::Table | Self::Wide)
    }
}

/// The `--output` of this invocation, for [`json`].
static FORMAT: std::sync::OnceLock<Format> = std::sync::OnceLock::new();

/// Says which `--output` this invocation prints in (once, at start).
pub fn set_format(format: Format) {
    let _ = FORMAT.set(format);
}

/// The answer for scripts: JSON, or YAML under `--output yaml` (see [`yaml`]).
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    structured(value)
}

/// [`json`] under its other name, for code that serves both formats.
pub fn structured<T: Serialize>(value: &T) -> anyhow::Result<()> {
    if FORMAT.get() == Some(&Format::Yaml) {
        print!("{}", yaml(value)?);
        return Ok(());
    }
    print_json(value)
}

/// One answer of a stream for scripts: a JSON line, or a YAML document under `--output yaml`.
pub fn structured_line<T: Serialize>(value: &T) -> anyhow::Result<()> {
    if FORMAT.get() == Some(&Format::Yaml) {
        print!("---\n{}", yaml(value)?);
        return Ok(());
    }
    println!("{}", json_for_terminal(&serde_json::to_string(value)?));
    Ok(())
}

/// JSON whatever `--output` says (an export asked for in JSON).
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!(
        "{}",
        json_for_terminal(&serde_json::to_string_pretty(value)?)
    );
    Ok(())
}

/// `value` in YAML, as it may reach a terminal and still parse to the same value: the YAML
/// writer escapes C0 controls itself but writes bidirectional controls and C1 raw, so an answer
/// holding one is written as JSON instead (JSON is YAML), its strings `\uXXXX`-escaped.
pub(crate) fn yaml<T: Serialize>(value: &T) -> anyhow::Result<String> {
    let yaml = yaml_serde::to_string(value)?;
    let unsafe_char =
        |c: char| !matches!(c, '\n' | '\t') && rewind_shared::names::unsafe_on_terminal(c);
    if !yaml.chars().any(unsafe_char) {
        return Ok(yaml);
    }
    Ok(json_for_terminal(&serde_json::to_string_pretty(value)?) + "\n")
}

/// JSON as it may reach a terminal and still parse: serde_json escapes C0 controls itself; the
/// rest a terminal acts on (DEL, C1 controls, bidirectional overrides), which can only appear
/// inside strings, become `\uXXXX` escapes there.
pub fn json_for_terminal(json: &str) -> String {
    json.chars()
        .map(|c| {
            // C0 controls appear raw only as JSON's own whitespace (serde_json escapes them
            // inside strings): what remains is DEL and above.
            if u32::from(c) >= 0x7f && rewind_shared::names::unsafe_on_terminal(c) {
                format!("\\u{:04x}", u32::from(c))
            } else {
                c.to_string()
            }
        })
        .collect()
}

pub fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut table = Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_header(header.iter().map(|title| title.to_string()));
    for row in rows {
        table.add_row(
            row.iter()
                .map(|cell| rewind_shared::names::for_terminal(cell).into_owned()),
        );
    }
    say!("{table}");
}

/// Under `--output wide`, more columns: `extra` headers after `headers`, and `cells(index)`
/// after each row.
pub fn with_wide_columns(
    format: Format,
    headers: &mut Vec<&'static str>,
    rows: &mut [Vec<String>],
    extra: &[&'static str],
    cells: impl Fn(usize) -> Vec<String>,
) {
    if format != Format::Wide {
        return;
    }
    headers.extend_from_slice(extra);
    for (index, row) in rows.iter_mut().enumerate() {
        row.extend(cells(index));
    }
}

/// "1 host", "3 hosts".
pub fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// RFC 3339 UTC with milliseconds, or `-` for 0.
pub fn time(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

pub fn rollback_state(rollback: &pb::Rollback) -> &'static str {
    pb::RollbackState::try_from(rollback.state)
        .unwrap_or_default()
        .short_name()
}

pub fn change_state(change: &pb::Change) -> &'static str {
    pb::ChangeState::try_from(change.state)
        .unwrap_or_default()
        .short_name()
}

pub fn step_state(state: i32) -> &'static str {
    pb::StepState::try_from(state)
        .unwrap_or_default()
        .short_name()
}

/// "manual", "automatic", or "manual, BREAK-GLASS" for one that ran without its approvals;
/// ", DRILL rd-N" after it for one that reverts a fire drill's release.
pub fn trigger_of(rollback: &pb::Rollback) -> String {
    let mut trigger = rollback.trigger.clone();
    if rollback.break_glass {
        trigger += ", BREAK-GLASS";
    }
    if !rollback.drill_id.is_empty() {
        trigger += &format!(", DRILL {}", rollback.drill_id);
    }
    trigger
}

/// "v1 -> v2", with " (DRILL rd-N)" for a fire drill's known-bad release.
pub fn versions_of(change: &pb::Change) -> String {
    let versions = format!("{} -> {}", change.previous_version, change.version);
    if change.drill_id.is_empty() {
        versions
    } else {
        format!("{versions} (DRILL {})", change.drill_id)
    }
}

/// With `archived`, an ARCHIVED column (when each row's record moved to the archive, from
/// `archived_at_ms(row index)`) after the others.
pub fn with_archived_column(
    archived: bool,
    headers: &mut Vec<&str>,
    mut rows: Vec<Vec<String>>,
    archived_at_ms: impl Fn(usize) -> u64,
) -> Vec<Vec<String>> {
    if archived {
        headers.push("ARCHIVED");
        for (index, row) in rows.iter_mut().enumerate() {
            row.push(time(archived_at_ms(index)));
        }
    }
    rows
}

/// Says when a record moved to the archive, if it did.
fn say_archived(archived_at_ms: u64) {
    if archived_at_ms != 0 {
        say!(
            "archived at {} (it ended before the audit retention; read only)",
            time(archived_at_ms)
        );
    }
}

pub fn print_rollback(rollback: &pb::Rollback) {
    say!(
        "{}  {}  of {} ({})  trigger: {}  started by {} at {}",
        rollback.rollback_id,
        rollback_state(rollback),
        rollback.change_ids.join(", "),
        rollback.services.join(", "),
        trigger_of(rollback),
        rollback.started_by,
        time(rollback.started_at_ms)
    );
    say!("reason: {}", rollback.reason);
    say_archived(rollback.archived_at_ms);
    if !rollback.approved_by.is_empty() {
        say!(
            "approved by {}{}",
            rollback.approved_by.join(", "),
            if rollback.request_id.is_empty() {
                String::new()
            } else {
                format!(" ({})", rollback.request_id)
            }
        );
    }
    if rollback.break_glass {
        say!(
            "BREAK-GLASS: ran without its approvals; review: rewindctl request show {}",
            rollback.request_id
        );
    }
    if !rollback.plan_hash.is_empty() {
        say!("plan: {}", rollback.plan_hash);
    }
    if !rollback.paused_reason.is_empty() {
        say!("PAUSED: {}", rollback.paused_reason);
    }
    if !rollback.outcome_detail.is_empty() {
        say!("outcome: {}", rollback.outcome_detail);
    }
    if !rollback.deferred_hosts.is_empty() {
        say!(
            "deferred (their region was lost; reverted once back): {}",
            rollback.deferred_hosts.join(", ")
        );
    }
    for stage in &rollback.schema {
        say!("schema: {stage}");
    }
    let waves = rollback
        .waves
        .iter()
        .enumerate()
        .map(|(index, wave)| {
            vec![
                (index + 1).to_string(),
                wave.service.clone(),
                format!(
                    "{}{}",
                    wave.region,
                    if wave.canary { " (canary)" } else { "" }
                ),
                wave.hosts.join(","),
                step_state(wave.gate).to_string(),
                wave.gate_detail.clone(),
            ]
        })
        .collect();
    table(
        &["WAVE", "SERVICE", "REGION", "HOSTS", "GATE", "EVIDENCE"],
        waves,
    );
    let rows = rollback
        .steps
        .iter()
        .map(|step| {
            vec![
                (step.wave + 1).to_string(),
                step.service.clone(),
                step.host_id.clone(),
                step.kind.clone(),
                step_state(step.state).to_string(),
                step.attempts.to_string(),
                time(step.finished_at_ms),
                step.detail.clone(),
            ]
        })
        .collect();
    table(
        &[
            "WAVE", "SERVICE", "HOST", "STEP", "STATE", "ATTEMPTS", "FINISHED", "DETAIL",
        ],
        rows,
    );
    if rollback.steps.len() < rollback.steps_total as usize {
        say!(
            "the first {} of {} steps (all of them: rewindctl rollback show {})",
            rollback.steps.len(),
            rollback.steps_total,
            rollback.rollback_id
        );
    }
}

pub fn print_change(change: &pb::Change) {
    say!(
        "{}  {}  {} {} -> {}  started by {} at {}{}",
        change.change_id,
        change_state(change),
        change.service,
        if change.previous_version.is_empty() {
            "(none)"
        } else {
            &change.previous_version
        },
        change.version,
        change.started_by,
        time(change.started_at_ms),
        if change.rollback_id.is_empty() {
            String::new()
        } else {
            format!("  rolled back by {}", change.rollback_id)
        }
    );
    if !change.drill_id.is_empty() {
        say!(
            "DRILL {}: a known-bad release deployed on purpose (rewindctl drill show {})",
            change.drill_id,
            change.drill_id
        );
    }
    if !change.reason.is_empty() {
        say!("reason: {}", change.reason);
    }
    say_archived(change.archived_at_ms);
    if !change.approved_by.is_empty() {
        say!(
            "approved by {} ({})",
            change.approved_by.join(", "),
            change.request_id
        );
    }
    if change.break_glass {
        say!(
            "BREAK-GLASS: ran without its approvals; review: rewindctl request show {}",
            change.request_id
        );
    }
    for stage in &change.schema {
        say!("migrations: {stage}");
    }
    let rows = change
        .hosts
        .iter()
        .map(|host| {
            vec![
                host.host_id.clone(),
                host.snapshot_id.clone(),
                step_state(host.capture).into(),
                step_state(host.activate).into(),
            ]
        })
        .collect();
    table(&["HOST", "SNAPSHOT", "CAPTURE", "ACTIVATE"], rows);
    for host in change
        .hosts
        .iter()
        .filter(|host| !host.self_reverted.is_empty())
    {
        say!(
            "{} reverted itself while offline: {}",
            host.host_id,
            host.self_reverted
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_of_text_a_terminal_would_act_on_still_parses_to_the_same_value() {
        let hostile = serde_json::json!({"reason": "fine\u{202e}txt.exe", "ok": "plain"});
        let text = yaml(&hostile).unwrap();
        assert!(!text.contains('\u{202e}'), "{text}");
        let parsed: serde_json::Value = yaml_serde::from_str(&text).unwrap();
        assert_eq!(parsed, hostile);
        let plain = serde_json::json!({"reason": "fine"});
        assert_eq!(yaml(&plain).unwrap(), "reason: fine\n");
    }

    #[test]
    fn times_are_utc_calendar_dates() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1_795_700_587_120), "2026-11-26T13:43:07.120Z");
    }

    #[test]
    fn json_for_a_terminal_still_parses_and_holds_no_escapes() {
        let hostile = serde_json::json!({"reason": "a\u{9b}31m \u{202e}txt\u{7f} \u{1b}[2J"});
        for json in [
            serde_json::to_string(&hostile).unwrap(),
            serde_json::to_string_pretty(&hostile).unwrap(),
        ] {
            let shown = json_for_terminal(&json);
            assert!(
                !shown
                    .chars()
                    .any(|c| rewind_shared::names::unsafe_on_terminal(c) && !c.is_whitespace()),
                "{shown}"
            );
            let parsed: serde_json::Value = serde_json::from_str(&shown).unwrap();
            assert_eq!(parsed, hostile);
        }
    }
}
