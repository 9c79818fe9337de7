//! How long a rollback should take, from this fleet's own history: p50 and p90 of each step kind
//! per service (the fleet's, then a fixed guess, when the service has none) and of its gates,
//! summed over the plan's waves and batches; and whether that fits the services' recovery time
//! objectives, with the `max_parallel` that would when it does not.
//!
//! The p90 is the sum of each step's p90: pessimistic, as an objective's check should be.

use std::collections::HashMap;

use super::*;
use crate::state_machine::archive::{ArchiveKind, ArchivedRecord};
use crate::state_machine::{RollbackRecord, StepProgress};

/// Step and gate durations kept per (service, kind): the most recent this many.
const MAX_SAMPLES: usize = 200;
/// Rollbacks read for history, newest first: bounds the work on a long history.
const MAX_ROLLBACKS_READ: usize = 500;
/// The most hosts at once a suggestion names (the API's bound on `max_parallel`).
const MAX_SUGGESTED_PARALLEL: usize = 1000;
/// Assumed per step when nothing in the history says (ms).
const DEFAULT_STEP_MS: u64 = 5_000;

/// Per step when the history has none, by kind (ms).
fn default_step_ms(kind: RollbackStepKind) -> u64 {
    match kind {
        RollbackStepKind::Drain | RollbackStepKind::Restore => 2_000,
        RollbackStepKind::Verify => 10_000,
        RollbackStepKind::Undrain => 1_000,
        _ => DEFAULT_STEP_MS,
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub p50_ms: u64,
    pub p90_ms: u64,
    /// The tightest recovery time objective among the plan's services (0: none declared), and
    /// whose it is.
    pub rto_ms: u64,
    pub rto_service: String,
    /// When the p90 does not fit the RTO: the smallest batch (`max_parallel` and
    /// `max_unavailable` both at least this) whose p90 would (0: none would, or it fits).
    pub suggested_max_parallel: u32,
    /// What the figures rest on, one line per service and kind.
    pub basis: Vec<String>,
    /// One sentence: fits, does not and what would, or no RTO.
    pub verdict: String,
}

impl Estimate {
    pub fn fits(&self) -> bool {
        self.rto_ms == 0 || self.p90_ms <= self.rto_ms
    }
}

/// p50 and p90 of one step kind or gate, and how many runs they come from (0: assumed).
#[derive(Clone, Copy)]
struct Typical {
    p50_ms: u64,
    p90_ms: u64,
    runs: usize,
}

impl Typical {
    fn of(mut samples: Vec<u64>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let rank = |fraction: f64| {
            let index = (fraction * samples.len() as f64).ceil() as usize;
            samples[index.clamp(1, samples.len()) - 1]
        };
        Some(Self {
            p50_ms: rank(0.5),
            p90_ms: rank(0.9),
            runs: samples.len(),
        })
    }

    fn assumed(ms: u64) -> Self {
        Self {
            p50_ms: ms,
            p90_ms: ms,
            runs: 0,
        }
    }
}

/// Succeeded step and gate durations from the most recent rollbacks.
#[derive(Default)]
struct History {
    steps: HashMap<(String, RollbackStepKind), Vec<u64>>,
    fleet_steps: HashMap<RollbackStepKind, Vec<u64>>,
    gates: HashMap<String, Vec<u64>>,
}

impl History {
    fn read(state: &State) -> Self {
        let mut history = Self::default();
        let took = |progress: &StepProgress| {
            (progress.status == StepStatus::Succeeded && progress.started_at_ms > 0).then(|| {
                progress
                    .finished_at_ms
                    .saturating_sub(progress.started_at_ms)
            })
        };
        // The rollbacks in the state, then (from cluster version 8) the archived ones, newest
        // first; an archive that cannot be read leaves the estimate to the state's history.
        let held: Vec<&RollbackRecord> = state
            .rollbacks
            .values()
            .rev()
            .take(MAX_ROLLBACKS_READ)
            .collect();
        let archived: Vec<RollbackRecord> = state
            .archived_before(
                ArchiveKind::Rollback,
                u64::MAX,
                MAX_ROLLBACKS_READ - held.len(),
            )
            .unwrap_or_else(|error| {
                tracing::warn!(%error, "The archive cannot be read: estimates use the state's history.");
                Vec::new()
            })
            .into_iter()
            .filter_map(|record| match record {
                // One the state holds too (a member that installed a snapshot bundle, until it
                // applies the log after it) is counted once.
                ArchivedRecord::Rollback(archived)
                    if !state.rollbacks.contains_key(&archived.rollback.number) =>
                {
                    Some(archived.rollback)
                }
                _ => None,
            })
            .collect();
        for rollback in held.into_iter().chain(&archived) {
            for step in &rollback.steps {
                let Some(ms) = took(&step.progress) else {
                    continue;
                };
                let key = (step.service.clone(), step.kind);
                let samples = history.steps.entry(key).or_default();
                if samples.len() < MAX_SAMPLES {
                    samples.push(ms);
                }
                let samples = history.fleet_steps.entry(step.kind).or_default();
                if samples.len() < MAX_SAMPLES {
                    samples.push(ms);
                }
            }
            for wave in rollback.waves.iter().filter(|wave| !wave.isolation) {
                if let Some(ms) = took(&wave.gate) {
                    let samples = history.gates.entry(wave.service.clone()).or_default();
                    if samples.len() < MAX_SAMPLES {
                        samples.push(ms);
                    }
                }
            }
        }
        history
    }

    fn step(&self, service: &str, kind: RollbackStepKind) -> (Typical, &'static str) {
        if let Some(typical) = self
            .steps
            .get(&(service.to_string(), kind))
            .and_then(|samples| Typical::of(samples.clone()))
        {
            return (typical, "its own");
        }
        match self
            .fleet_steps
            .get(&kind)
            .and_then(|samples| Typical::of(samples.clone()))
        {
            Some(typical) => (typical, "the fleet's"),
            None => (Typical::assumed(default_step_ms(kind)), "assumed"),
        }
    }

    fn gate(&self, service: &str, settle_ms: u64) -> (Typical, &'static str) {
        match self
            .gates
            .get(service)
            .and_then(|samples| Typical::of(samples.clone()))
        {
            Some(typical) => (typical, "its own"),
            None => (Typical::assumed(settle_ms), "assumed: the settle time"),
        }
    }
}

/// Per service: a host's steps and a wave's gate.
struct ServiceTimes {
    host: Typical,
    gate: Typical,
}

pub fn estimate(state: &State, plan: &Plan) -> Estimate {
    let history = History::read(state);
    let settle_ms = plan.options.gate.settle_ms();
    let mut basis = Vec::new();
    let mut times: BTreeMap<&str, ServiceTimes> = BTreeMap::new();
    for service in &plan.services {
        let kinds: Vec<RollbackStepKind> = match plan.recipes.get(service) {
            Some(recipe) => recipe.iter().map(|step| step.kind).collect(),
            None => plan.steps_per_host.clone(),
        };
        let mut host = Typical::assumed(0);
        for kind in kinds {
            let (step, source) = history.step(service, kind);
            host.p50_ms += step.p50_ms;
            host.p90_ms += step.p90_ms;
            basis.push(basis_line(service, &kind.name(), step, source));
        }
        let (gate, source) = history.gate(service, settle_ms);
        basis.push(basis_line(service, "gate", gate, source));
        times.insert(service, ServiceTimes { host, gate });
    }
    let total = |max_parallel: Option<u32>| -> (u64, u64) {
        let mut sum = (0, 0);
        for wave in &plan.waves {
            let Some(service) = times.get(wave.service.as_str()) else {
                continue;
            };
            let batches = match max_parallel {
                None => wave.batches.len() as u64,
                Some(parallel) => {
                    let hosts = wave.batches.iter().map(Vec::len).sum::<usize>() as u64;
                    hosts.div_ceil(u64::from(parallel.max(1)))
                }
            };
            sum.0 += batches * service.host.p50_ms + service.gate.p50_ms;
            sum.1 += batches * service.host.p90_ms + service.gate.p90_ms;
        }
        sum
    };
    let (p50_ms, p90_ms) = total(None);
    if !plan.schema.is_empty() {
        basis.push("schema reverts: not in the estimate".into());
    }
    let objective = plan
        .services
        .iter()
        .filter_map(|service| {
            let rto_s = state.services.get(service)?.rto_s;
            (rto_s > 0).then(|| (rto_s * 1000, service.clone()))
        })
        .min();
    let mut estimate = Estimate {
        p50_ms,
        p90_ms,
        basis,
        ..Estimate::default()
    };
    let Some((rto_ms, rto_service)) = objective else {
        estimate.verdict = "no RTO declared for its services".into();
        return estimate;
    };
    let rto = duration(rto_ms);
    estimate.rto_ms = rto_ms;
    estimate.rto_service = rto_service.clone();
    if p90_ms <= rto_ms {
        estimate.verdict = format!(
            "fits {rto_service}'s RTO of {rto} (p90 {})",
            duration(p90_ms)
        );
        return estimate;
    }
    let widest = plan
        .waves
        .iter()
        .map(|wave| wave.batches.iter().map(Vec::len).sum::<usize>())
        .max()
        .unwrap_or(1)
        .min(MAX_SUGGESTED_PARALLEL) as u32;
    // Batches are cut at the smaller of the two limits: a suggestion raises both.
    let batch = plan
        .options
        .max_parallel
        .min(plan.options.max_unavailable)
        .max(1);
    let suggestion = (batch.saturating_add(1)..=widest)
        .map(|parallel| (parallel, total(Some(parallel)).1))
        .find(|&(_, p90)| p90 <= rto_ms);
    estimate.verdict = match suggestion {
        Some((parallel, p90)) => {
            estimate.suggested_max_parallel = parallel;
            // Name only the limits that hold the batches below it (never lower one).
            let flags: Vec<String> = [
                ("--max-parallel", plan.options.max_parallel),
                ("--max-unavailable", plan.options.max_unavailable),
            ]
            .into_iter()
            .filter(|&(_, now)| now < parallel)
            .map(|(flag, _)| format!("{flag} {parallel}"))
            .collect();
            format!(
                "does NOT fit {rto_service}'s RTO of {rto} (p90 {}): {} would (p90 {})",
                duration(p90_ms),
                flags.join(" "),
                duration(p90)
            )
        }
        None => format!(
            "does NOT fit {rto_service}'s RTO of {rto} (p90 {}), not even with every host of a \
             wave at once (p90 {}): fewer waves or faster gates would",
            duration(p90_ms),
            duration(total(Some(widest)).1)
        ),
    };
    estimate
}

fn basis_line(service: &str, what: &str, typical: Typical, source: &str) -> String {
    let runs = if typical.runs == 0 {
        source.to_string()
    } else {
        format!("{source}, {} runs", typical.runs)
    };
    format!(
        "{service} {what}: p50 {}, p90 {} ({runs})",
        duration(typical.p50_ms),
        duration(typical.p90_ms)
    )
}

/// Whole seconds, as people read them: `4m 10s`.
fn duration(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(ms.div_ceil(1000))).to_string()
}
