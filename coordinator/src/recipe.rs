//! Rollback recipes: the steps each host of a service goes through in a rollback, in order.
//!
//! The default is `drain, restore, restart, verify, undrain`. A service may name its own from
//! the agent's catalogue, e.g. `pause-jobs, drain, restore, reload, verify, purge-cache,
//! check, scale-up, undrain, resume-jobs, run:warm-cache region=eu-west`. The recipe names steps;
//! what each one executes is configured on the agents (the coordinator never sends a program).
//!
//! Rules, checked when the service is stored: exactly one `restore`, followed by a `restart` or
//! `reload`; `verify` after those; `reconcile` after the restart or reload, `clear-client-caches`
//! after the restore; `drain` and `undrain`, `pause-jobs` and `resume-jobs` come in
//! pairs around the restore; each step other than `run:` at most once.

use std::collections::BTreeMap;
use std::fmt;

use rewind_shared::names;
use serde::{Deserialize, Serialize};

use crate::state_machine::RollbackStepKind;

pub const MAX_STEPS: usize = 24;
pub const MAX_RUN_STEPS: usize = 8;
const MAX_ARGS: usize = 16;
const MAX_ARG_BYTES: usize = 256;

/// One step of a recipe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipeStep {
    pub kind: RollbackStepKind,
    /// For `run:` steps: the command the agent's allow-list names, and argument values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    pub command: String,
    pub args: BTreeMap<String, String>,
}

/// The recipe of a service that names none.
pub fn default_recipe() -> Vec<RecipeStep> {
    RollbackStepKind::ALL
        .into_iter()
        .map(|kind| RecipeStep { kind, run: None })
        .collect()
}

/// Parses and checks a recipe as written (`drain`, `run:warm-cache region=eu-west`, ...).
/// An empty list is the default recipe, stored as empty.
pub fn parse(texts: &[String]) -> Result<Vec<RecipeStep>, String> {
    if texts.is_empty() {
        return Ok(Vec::new());
    }
    if texts.len() > MAX_STEPS {
        return Err(format!("{} steps, at most {MAX_STEPS}", texts.len()));
    }
    let mut steps = Vec::with_capacity(texts.len());
    let mut runs = 0u8;
    for text in texts {
        let step = if let Some(spec) = text.strip_prefix("run:") {
            runs += 1;
            if usize::from(runs) > MAX_RUN_STEPS {
                return Err(format!("more than {MAX_RUN_STEPS} run: steps"));
            }
            RecipeStep {
                kind: RollbackStepKind::Run(runs),
                run: Some(parse_run(spec)?),
            }
        } else {
            let kind = RollbackStepKind::parse(text)
                .filter(|kind| !matches!(kind, RollbackStepKind::Isolate | RollbackStepKind::Run(_)))
                .ok_or_else(|| {
                    format!(
                        "{:?} is not a rollback step; the catalogue is {}, run:COMMAND [ARG=VALUE ...]",
                        names::truncate(text, 64),
                        RollbackStepKind::CATALOGUE
                            .iter()
                            .map(|kind| kind.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
            if steps.iter().any(|step: &RecipeStep| step.kind == kind) {
                return Err(format!("{} appears twice", kind.name()));
            }
            RecipeStep { kind, run: None }
        };
        steps.push(step);
    }
    check_order(&steps)?;
    Ok(steps)
}

fn parse_run(spec: &str) -> Result<RunSpec, String> {
    let mut words = spec.split_whitespace();
    let command = words.next().unwrap_or_default();
    names::validate_name("run: command", command).map_err(|error| error.to_string())?;
    let mut args = BTreeMap::new();
    for word in words {
        let (name, value) = word
            .split_once('=')
            .ok_or_else(|| format!("run:{command}: {word:?} must be ARG=VALUE"))?;
        names::validate_name(&format!("run:{command} argument"), name)
            .map_err(|error| error.to_string())?;
        if value.is_empty()
            || value.len() > MAX_ARG_BYTES
            || !value.chars().all(|c| c.is_ascii_graphic())
        {
            return Err(format!(
                "run:{command}: {name} must be 1 to {MAX_ARG_BYTES} printable characters without spaces"
            ));
        }
        if args.insert(name.to_string(), value.to_string()).is_some() {
            return Err(format!("run:{command}: {name} is given twice"));
        }
    }
    if args.len() > MAX_ARGS {
        return Err(format!("run:{command}: more than {MAX_ARGS} arguments"));
    }
    Ok(RunSpec {
        command: command.to_string(),
        args,
    })
}

fn check_order(steps: &[RecipeStep]) -> Result<(), String> {
    let position = |kind: RollbackStepKind| steps.iter().position(|step| step.kind == kind);
    let restore =
        position(RollbackStepKind::Restore).ok_or("a rollback recipe must restore: add restore")?;
    let before = |first: RollbackStepKind, then: usize, what: &str| match position(first) {
        Some(at) if at > then => Err(format!("{} must come {what}", first.name())),
        _ => Ok(()),
    };
    before(RollbackStepKind::Drain, restore, "before restore")?;
    before(RollbackStepKind::PauseJobs, restore, "before restore")?;
    for undoes in [
        RollbackStepKind::Reconcile,
        RollbackStepKind::ClearClientCaches,
    ] {
        if position(undoes).is_some_and(|at| at < restore) {
            return Err(format!(
                "{} must come after restore: it undoes what the reverted release left",
                undoes.name()
            ));
        }
    }
    // Sessions and caches are brought in line with the restored release once it runs.
    let running_again = [RollbackStepKind::Restart, RollbackStepKind::Reload]
        .into_iter()
        .filter_map(position)
        .min();
    if let (Some(reconcile), Some(running)) = (position(RollbackStepKind::Reconcile), running_again)
        && reconcile < running
    {
        return Err(
            "reconcile must come after restart or reload: the restored release runs by then".into(),
        );
    }
    let pairs = [
        (RollbackStepKind::Drain, RollbackStepKind::Undrain),
        (RollbackStepKind::PauseJobs, RollbackStepKind::ResumeJobs),
    ];
    let restarted = [RollbackStepKind::Restart, RollbackStepKind::Reload]
        .into_iter()
        .filter_map(position)
        .any(|at| at > restore);
    if !restarted {
        return Err(
            "restore needs a restart or reload after it, or the service keeps running the code \
             it is rolling away from"
                .into(),
        );
    }
    for (opening, closing) in pairs {
        match (position(opening), position(closing)) {
            (Some(_), None) => {
                return Err(format!(
                    "{} needs {} after restore, or hosts stay that way",
                    opening.name(),
                    closing.name()
                ));
            }
            (None, Some(_)) => {
                return Err(format!(
                    "{} needs {} before restore: there is nothing to put back",
                    closing.name(),
                    opening.name()
                ));
            }
            (_, Some(at)) if at < restore => {
                return Err(format!("{} must come after restore", closing.name()));
            }
            _ => {}
        }
    }
    if let Some(verify) = position(RollbackStepKind::Verify) {
        let applied = [
            RollbackStepKind::Restore,
            RollbackStepKind::Restart,
            RollbackStepKind::Reload,
        ]
        .into_iter()
        .filter_map(position)
        .max()
        .unwrap_or(restore);
        if verify < applied {
            return Err(format!(
                "verify must come after {}",
                steps[applied].kind.name()
            ));
        }
    }
    Ok(())
}

impl fmt::Display for RecipeStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.run {
            None => f.write_str(&self.kind.name()),
            Some(run) => {
                write!(f, "run:{}", run.command)?;
                for (name, value) in &run.args {
                    write!(f, " {name}={value}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(steps: &[&str]) -> Vec<String> {
        steps.iter().map(|step| step.to_string()).collect()
    }

    #[test]
    fn a_full_recipe_parses_and_prints_back_the_same() {
        let written = texts(&[
            "pause-jobs",
            "drain",
            "restore",
            "reload",
            "verify",
            "purge-cache",
            "check",
            "scale-up",
            "run:warm-cache region=eu-west zone=b",
            "undrain",
            "resume-jobs",
            "run:notify",
        ]);
        let recipe = parse(&written).unwrap();
        assert_eq!(recipe[8].kind, RollbackStepKind::Run(1));
        assert_eq!(recipe[11].kind, RollbackStepKind::Run(2));
        let printed: Vec<String> = recipe.iter().map(ToString::to_string).collect();
        assert_eq!(printed, written);
        assert!(parse(&[]).unwrap().is_empty(), "empty is the default");
    }

    #[test]
    fn bad_recipes_say_what_is_wrong() {
        for (recipe, expected) in [
            (vec!["drain", "restart"], "must restore"),
            (vec!["restore", "restore"], "restore appears twice"),
            (
                vec!["restore", "reboot"],
                "\"reboot\" is not a rollback step",
            ),
            (vec!["restore", "isolate"], "is not a rollback step"),
            (vec!["restore", "run-1"], "is not a rollback step"),
            (
                vec!["restore", "verify"],
                "restore needs a restart or reload",
            ),
            (
                vec!["restart", "restore"],
                "restore needs a restart or reload",
            ),
            (
                vec!["restore", "restart", "drain", "undrain"],
                "drain must come before restore",
            ),
            (vec!["drain", "restore", "restart"], "drain needs undrain"),
            (
                vec!["restore", "restart", "resume-jobs"],
                "resume-jobs needs pause-jobs",
            ),
            (
                vec!["pause-jobs", "resume-jobs", "restore", "restart"],
                "resume-jobs must come after restore",
            ),
            (
                vec!["restore", "verify", "restart"],
                "verify must come after restart",
            ),
            (
                vec!["reconcile", "restore", "restart"],
                "reconcile must come after restore",
            ),
            (
                vec!["restore", "reconcile", "restart"],
                "reconcile must come after restart or reload",
            ),
            (
                vec!["clear-client-caches", "restore", "restart"],
                "clear-client-caches must come after restore",
            ),
            (vec!["restore", "restart", "run:Bad"], "run: command"),
            (
                vec!["restore", "restart", "run:warm region"],
                "must be ARG=VALUE",
            ),
            (
                vec!["restore", "restart", "run:warm a=1 a=2"],
                "a is given twice",
            ),
        ] {
            let error = parse(&texts(&recipe)).unwrap_err();
            assert!(error.contains(expected), "{recipe:?}: {error}");
        }
        let too_many: Vec<String> = ["restore".to_string(), "restart".to_string()]
            .into_iter()
            .chain((0..9).map(|n| format!("run:c{n}")))
            .collect();
        assert!(
            parse(&too_many)
                .unwrap_err()
                .contains("more than 8 run: steps")
        );
    }
}
