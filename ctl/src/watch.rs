//! `rollback watch` (and `rollback start --watch`): a live view of a rollback until it ends;
//! `change start --watch`: the same for a change until it is deployed or fails. Each shows a
//! progress line (the current wave's hosts done of its total, its gate, the time taken) above
//! the transitions as they happen.

use std::collections::HashSet;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use rewind_proto::v1 as pb;
use tokio_stream::StreamExt;

use crate::client::{Client, explain};
use crate::commands::EXIT_ROLLBACK_FAILED;
use crate::output::{self, Format};

/// Follows the rollback's server stream; prints each step transition (or JSON snapshots) and
/// returns 0 only if the rollback succeeded.
pub async fn follow(
    client: &mut Client,
    format: Format,
    rollback_id: &str,
) -> anyhow::Result<ExitCode> {
    let mut stream = client
        .watch_rollback(pb::GetRollbackRequest {
            rollback_id: rollback_id.to_string(),
            changes_only: true,
            ..Default::default()
        })
        .await
        .map_err(explain)?
        .into_inner();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {prefix} [{bar:30}] {pos}/{len} steps, {elapsed} {msg}",
        )?
        .progress_chars("=> "),
    );
    if format.is_structured() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut seen: HashSet<(String, i32)> = HashSet::new();
    let mut last = None;
    let mut pending_steps = Vec::new();
    while let Some(update) = stream.next().await {
        let update = update.map_err(explain)?;
        let received = update.rollback.unwrap_or_default();
        if update.more_follows {
            // A page of an update's steps alone: the update's last message holds the rest.
            pending_steps.extend(received.steps);
            continue;
        }
        let received = pb::Rollback {
            steps: [std::mem::take(&mut pending_steps), received.steps].concat(),
            ..received
        };
        let rollback = match last.take() {
            Some(previous) if update.changes_only => with_changes(previous, received),
            _ => received,
        };
        if format.is_structured() {
            // The whole rollback each time, as before changes came alone: scripts read lines
            // (YAML: one document each).
            output::structured_line(&rollback)?;
        } else {
            report_transitions(&bar, &rollback, &mut seen);
        }
        last = Some(rollback);
    }
    bar.finish_and_clear();
    let rollback =
        last.ok_or_else(|| anyhow::anyhow!("the coordinator closed the watch without an update"))?;
    if format.is_table() {
        say!();
        output::print_rollback(&rollback);
    }
    let state = pb::RollbackState::try_from(rollback.state).unwrap_or_default();
    if !state.is_terminal() {
        anyhow::bail!(
            "the watch ended while {} was still {}",
            rollback.rollback_id,
            state.short_name()
        );
    }
    Ok(if state == pb::RollbackState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_ROLLBACK_FAILED)
    })
}

/// `previous` with a watch's update applied: changed steps replaced by id (new ones added), the
/// waves if the update carries them, every other field as the update has it.
fn with_changes(previous: pb::Rollback, changes: pb::Rollback) -> pb::Rollback {
    let mut steps = previous.steps;
    let position: std::collections::HashMap<String, usize> = steps
        .iter()
        .enumerate()
        .map(|(index, step)| (step.step_id.clone(), index))
        .collect();
    for step in changes.steps.iter().cloned() {
        match position.get(&step.step_id) {
            Some(&index) => steps[index] = step,
            None => steps.push(step),
        }
    }
    let waves = if changes.waves.is_empty() {
        previous.waves
    } else {
        changes.waves.clone()
    };
    pb::Rollback {
        steps,
        waves,
        ..changes
    }
}

fn report_transitions(
    bar: &ProgressBar,
    rollback: &pb::Rollback,
    seen: &mut HashSet<(String, i32)>,
) {
    bar.set_length(rollback.steps.len().max(rollback.steps_total as usize) as u64);
    bar.set_prefix(
        rewind_shared::names::for_terminal(&format!(
            "{} {}",
            rollback.rollback_id,
            output::rollback_state(rollback)
        ))
        .into_owned(),
    );
    let done = rollback.steps.iter().filter(|step| {
        pb::StepState::try_from(step.state).is_ok_and(|state| {
            matches!(
                state,
                pb::StepState::Succeeded | pb::StepState::Failed | pb::StepState::Skipped
            )
        })
    });
    bar.set_position(done.count() as u64);
    bar.set_message(rewind_shared::names::for_terminal(&wave_progress(rollback)).into_owned());
    for (index, wave) in rollback.waves.iter().enumerate() {
        let key = (format!("gate/{index}"), wave.gate);
        if wave.gate == pb::StepState::Pending as i32 || !seen.insert(key) {
            continue;
        }
        let line = format!(
            "{}  wave {} {} in {}: gate {} {}",
            output::time(wave.gate_finished_at_ms.max(wave.gate_started_at_ms)),
            index + 1,
            wave.service,
            wave.region,
            output::step_state(wave.gate),
            wave.gate_detail
        );
        print_line(bar, line);
    }
    if !rollback.paused_reason.is_empty() {
        let key = (format!("paused/{}", rollback.paused_reason), 0);
        if seen.insert(key) {
            print_line(
                bar,
                format!(
                    "PAUSED: {} (see: rewindctl rollback explain {})",
                    rollback.paused_reason, rollback.rollback_id
                ),
            );
        }
    }
    for step in &rollback.steps {
        let key = (step.step_id.clone(), step.state);
        if step.state == pb::StepState::Pending as i32 || !seen.insert(key) {
            continue;
        }
        let line = format!(
            "{}  {:<8} {:<8} {:<8} {:<10} {}",
            output::time(if step.finished_at_ms > 0 {
                step.finished_at_ms
            } else {
                step.started_at_ms
            }),
            step.service,
            step.host_id,
            step.kind,
            output::step_state(step.state),
            step.detail
        );
        print_line(bar, line);
    }
}

/// "wave 2/3 (web in eu): 4/10 hosts done, gate running": where the rollback is.
fn wave_progress(rollback: &pb::Rollback) -> String {
    let total = rollback.waves.len();
    let current = rollback.current_wave as usize;
    let Some(wave) = rollback.waves.get(current) else {
        return format!("all {total} waves done");
    };
    let ended = |state: i32| {
        pb::StepState::try_from(state).is_ok_and(|state| {
            matches!(
                state,
                pb::StepState::Succeeded | pb::StepState::Failed | pb::StepState::Skipped
            )
        })
    };
    let done = wave
        .hosts
        .iter()
        .filter(|host| {
            let mut steps = rollback
                .steps
                .iter()
                .filter(|step| step.wave as usize == current && step.host_id == **host)
                .peekable();
            steps.peek().is_some() && steps.all(|step| ended(step.state))
        })
        .count();
    let gate = match pb::StepState::try_from(wave.gate).unwrap_or_default() {
        pb::StepState::Pending => String::new(),
        state => format!(", gate {}", state.short_name()),
    };
    format!(
        "wave {}/{total} ({} in {}): {done}/{} hosts done{gate}",
        current + 1,
        wave.service,
        wave.region,
        wave.hosts.len()
    )
}

/// How often `change start --watch` asks where the change is.
const CHANGE_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// Follows a change until it is deployed (exit 0) or failed or rolled back (exit 1), with a
/// progress line: hosts activated and captured of the total, and the time taken.
pub async fn follow_change(
    client: &mut Client,
    format: Format,
    change_id: &str,
) -> anyhow::Result<ExitCode> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {prefix} [{bar:30}] {pos}/{len} hosts activated, {elapsed} {msg}",
        )?
        .progress_chars("=> "),
    );
    if format.is_structured() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut seen: HashSet<(String, i32, i32)> = HashSet::new();
    let mut last_printed: Option<pb::Change> = None;
    loop {
        let change = client
            .get_change(pb::GetChangeRequest {
                change_id: change_id.to_string(),
            })
            .await
            .map_err(explain)?
            .into_inner()
            .change
            .ok_or_else(|| anyhow::anyhow!("the coordinator answered without a change"))?;
        let state = pb::ChangeState::try_from(change.state).unwrap_or_default();
        let count = |done: fn(&pb::ChangeHost) -> bool| {
            change.hosts.iter().filter(|host| done(host)).count()
        };
        let activated = count(|host| host.activate == pb::StepState::Succeeded as i32);
        let captured = count(|host| host.capture == pb::StepState::Succeeded as i32);
        bar.set_length(change.hosts.len() as u64);
        bar.set_position(activated as u64);
        if state == pb::ChangeState::Unspecified {
            anyhow::bail!(
                "{} is in a state this rewindctl does not know: upgrade rewindctl",
                change.change_id
            );
        }
        bar.set_prefix(
            rewind_shared::names::for_terminal(&format!(
                "{} {}",
                change.change_id,
                state.short_name()
            ))
            .into_owned(),
        );
        bar.set_message(format!("{captured}/{} captured", change.hosts.len()));
        if format.is_structured() {
            // Each state of the change once, not every poll.
            if last_printed.as_ref() != Some(&change) {
                output::structured_line(&change)?;
                last_printed = Some(change.clone());
            }
        } else {
            for host in &change.hosts {
                let started = host.capture != pb::StepState::Pending as i32
                    || host.activate != pb::StepState::Pending as i32;
                if started && seen.insert((host.host_id.clone(), host.capture, host.activate)) {
                    print_line(
                        &bar,
                        format!(
                            "{}  capture {:<10} activate {}",
                            host.host_id,
                            output::step_state(host.capture),
                            output::step_state(host.activate)
                        ),
                    );
                }
            }
        }
        let ended = matches!(
            state,
            pb::ChangeState::Deployed | pb::ChangeState::Failed | pb::ChangeState::RolledBack
        );
        if ended {
            bar.finish_and_clear();
            if format.is_table() {
                say!();
                output::print_change(&change);
            }
            return Ok(if state == pb::ChangeState::Deployed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        tokio::time::sleep(CHANGE_POLL).await;
    }
}

fn print_line(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        say!("{line}")
    } else {
        bar.println(rewind_shared::names::for_terminal(&line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: &str, state: pb::StepState) -> pb::RollbackStep {
        pb::RollbackStep {
            step_id: id.into(),
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn an_update_replaces_the_steps_it_names_and_keeps_the_rest() {
        let wave = pb::RollbackWave {
            region: "eu".into(),
            ..Default::default()
        };
        let previous = pb::Rollback {
            state: pb::RollbackState::Running as i32,
            steps: vec![
                step("a", pb::StepState::Running),
                step("b", pb::StepState::Pending),
            ],
            waves: vec![wave.clone()],
            ..Default::default()
        };
        let changes = pb::Rollback {
            state: pb::RollbackState::Paused as i32,
            steps: vec![
                step("a", pb::StepState::Succeeded),
                step("c", pb::StepState::Pending),
            ],
            ..Default::default()
        };
        let merged = with_changes(previous, changes);
        assert_eq!(merged.state, pb::RollbackState::Paused as i32);
        assert_eq!(
            merged.steps,
            vec![
                step("a", pb::StepState::Succeeded),
                step("b", pb::StepState::Pending),
                step("c", pb::StepState::Pending),
            ]
        );
        assert_eq!(merged.waves, vec![wave], "no waves in an update: unchanged");
    }
}
