//! `rollback plan` / `rollback start` arguments, and printing a plan for a change review.

use clap::Args;
use rewind_proto::v1 as pb;

use crate::output::table;

/// What to roll back.
#[derive(Clone, Debug, Args)]
pub struct SelectionArgs {
    /// A change to roll back; repeat for several (one per service).
    #[arg(long = "change", value_name = "CHANGE_ID")]
    pub changes: Vec<String>,
    /// A service to take back to its last good version (before its latest change); repeatable.
    #[arg(long = "service", value_name = "SERVICE")]
    pub services: Vec<String>,
    /// Where --service goes: only `last-good` exists.
    #[arg(long, value_name = "TARGET")]
    pub to: Option<String>,
}

impl SelectionArgs {
    pub fn into_selection(
        self,
        positional: Option<String>,
    ) -> anyhow::Result<pb::RollbackSelection> {
        if let Some(target) = &self.to
            && target != "last-good"
        {
            anyhow::bail!("--to {target:?}: only `last-good` is supported");
        }
        if !self.services.is_empty() && self.to.is_none() {
            anyhow::bail!("--service needs --to last-good (the version before its latest change)");
        }
        let mut change_ids = self.changes;
        change_ids.extend(positional);
        Ok(pb::RollbackSelection {
            change_ids,
            services: self.services,
        })
    }
}

/// How the plan is cut into waves and gated; 0 keeps the coordinator's default.
#[derive(Clone, Debug, Args)]
pub struct PlanArgs {
    /// Hosts of a wave reverted at once.
    #[arg(long, default_value_t = 0)]
    pub max_parallel: u32,
    /// Hosts of a service out of service at once, counting ones already down.
    #[arg(long, default_value_t = 0)]
    pub max_unavailable: u32,
    /// Region reverted first (default: each service's smallest region).
    #[arg(long, default_value = "")]
    pub canary_region: String,
    /// Proceed although consumers would break (audited).
    #[arg(long)]
    pub force: bool,
    /// Seconds a wave's health must stay near the baseline before the next wave.
    #[arg(long, default_value_t = 0)]
    pub gate_settle_s: u32,
    /// The same in milliseconds, for a gate under a second (cluster version 12).
    #[arg(long, default_value_t = 0, conflicts_with = "gate_settle_s")]
    pub gate_settle_ms: u32,
    /// Seconds after which a gate that has not passed pauses the rollback.
    #[arg(long, default_value_t = 0)]
    pub gate_timeout_s: u32,
    /// How far above the baseline probe failure and error ratios a wave may be (0..=1).
    #[arg(long)]
    pub gate_tolerance: Option<f64>,
    /// How far above the baseline p99 latency a wave may be, as a fraction (0.25: 25 % slower).
    #[arg(long)]
    pub gate_latency_tolerance: Option<f64>,
    /// Revert the changes' expand migrations too (by default they stay: the old app works
    /// with them).
    #[arg(long)]
    pub revert_expand: bool,
    /// Proceed with a schema revert that destroys data written under the new schema, saying
    /// why (audited); the rows are exported to each shard agent's store first.
    #[arg(long, value_name = "REASON", default_value = "")]
    pub accept_data_loss: String,
    /// Revert every migration after the app waves (contract and data ones otherwise go before
    /// them): for a revert that cannot succeed first when the app must be reverted anyway.
    #[arg(long)]
    pub schema_after_waves: bool,
    /// Revert hosts whose service changed since rewind last put it there (a hotfix by hand),
    /// wiping that change (audited). Without it such hosts are refused.
    #[arg(long)]
    pub overwrite_drift: bool,
    /// Leave a host out of the plan, as it is (repeatable): a later rollback of the same
    /// change reverts the hosts left out.
    #[arg(long = "exclude-host", value_name = "HOST")]
    pub exclude_hosts: Vec<String>,
}

impl PlanArgs {
    pub fn into_options(self) -> pb::PlanOptions {
        pb::PlanOptions {
            max_parallel: self.max_parallel,
            max_unavailable: self.max_unavailable,
            canary_region: self.canary_region,
            force: self.force,
            revert_expand: self.revert_expand,
            accept_data_loss: self.accept_data_loss,
            schema_after_waves: self.schema_after_waves,
            overwrite_drift: self.overwrite_drift,
            exclude_hosts: self.exclude_hosts,
            gate: Some(pb::GateOptions {
                settle_s: self.gate_settle_s,
                settle_ms: self.gate_settle_ms,
                timeout_s: self.gate_timeout_s,
                tolerance: self.gate_tolerance.unwrap_or(0.0),
                zero_tolerance: self.gate_tolerance == Some(0.0),
                latency_tolerance: self.gate_latency_tolerance.unwrap_or(0.0),
                zero_latency_tolerance: self.gate_latency_tolerance == Some(0.0),
            }),
        }
    }
}

pub fn print_plan(plan: &pb::RollbackPlan) {
    let options = plan.options.clone().unwrap_or_default();
    let gate = options.gate.unwrap_or_default();
    say!(
        "Plan {}: revert {} ({}), in {} waves",
        plan.plan_hash,
        plan.change_ids.join(", "),
        plan.services.join(" then "),
        plan.waves.len()
    );
    say!(
        "max parallel {}, max unavailable {}; gate after each wave: ratios within {:.2} and p99 within {:.0} % of baseline for {} (timeout {} s)",
        options.max_parallel,
        options.max_unavailable,
        gate.tolerance,
        gate.latency_tolerance * 100.0,
        if gate.settle_ms > 0 {
            format!("{} ms", gate.settle_ms)
        } else {
            format!("{} s", gate.settle_s)
        },
        gate.timeout_s
    );
    if !plan.flags.is_empty() {
        say!("flags turned back first: {}", plan.flags.join(", "));
    }
    say!("steps per host: {}", plan.steps_per_host.join(" -> "));
    for recipe in &plan.recipes {
        say!(
            "steps per host of {}: {}",
            recipe.service,
            recipe.steps.join(" -> ")
        );
    }
    let (before_waves, after_waves): (Vec<_>, Vec<_>) = plan
        .schema
        .iter()
        .partition(|revert| revert.before_app_waves);
    for revert in before_waves {
        say_schema_revert("first", revert);
    }
    let rows = plan
        .waves
        .iter()
        .enumerate()
        .map(|(index, wave)| {
            vec![
                (index + 1).to_string(),
                wave.service.clone(),
                wave.change_id.clone(),
                format!(
                    "{}{}",
                    wave.region,
                    if wave.canary { " (canary)" } else { "" }
                ),
                wave.batches
                    .iter()
                    .map(|batch| batch.hosts.join(","))
                    .collect::<Vec<_>>()
                    .join(" | "),
            ]
        })
        .collect();
    table(
        &["WAVE", "SERVICE", "CHANGE", "REGION", "HOST BATCHES"],
        rows,
    );
    for revert in after_waves {
        say_schema_revert("then", revert);
    }
    if !options.accept_data_loss.is_empty() {
        say!("data loss accepted: {}", options.accept_data_loss);
    }
    say!("\nReadiness:");
    let lines = [
        ("hosts not connected", plan.disconnected_hosts.join(", ")),
        ("releases not registered", plan.missing_releases.join(", ")),
        (
            "artifacts no longer retained",
            plan.missing_artifacts.join(", "),
        ),
    ];
    for (label, value) in lines {
        say!(
            "  {label}: {}",
            if value.is_empty() { "none" } else { &value }
        );
    }
    // Each drifted host on a line of its own: what changed is what a person reads before
    // deciding to wipe it.
    if plan.drifted_hosts.is_empty() {
        say!("  changed by hand since rewind put them there: none");
    } else {
        say!(
            "  changed by hand since rewind put them there ({}):",
            if options.overwrite_drift {
                "--overwrite-drift: wiped"
            } else {
                "refused unless --overwrite-drift or --exclude-host"
            }
        );
        for line in &plan.drifted_hosts {
            say!("    {line}");
        }
    }
    let duration = |ms: u64| {
        humantime::format_duration(std::time::Duration::from_secs(ms.div_ceil(1000))).to_string()
    };
    match &plan.estimate {
        Some(estimate) => {
            say!(
                "  expected duration: about {} (p90 {}); {}",
                duration(plan.expected_duration_ms),
                duration(estimate.p90_ms),
                estimate.verdict
            );
            for line in &estimate.basis {
                say!("    {line}");
            }
        }
        // A coordinator from before estimates.
        None => say!(
            "  expected duration: about {}",
            duration(plan.expected_duration_ms)
        ),
    }
    for note in &plan.notes {
        say!("  note: {note}");
    }
    if plan.incompatibilities.is_empty() {
        say!("  consumers that would break: none");
    } else {
        say!("  consumers that would break:");
        for problem in &plan.incompatibilities {
            say!("    {problem}");
        }
    }
    if plan.runnable {
        say!(
            "\nRun exactly this plan: rewindctl rollback start --plan-hash {} --reason \"...\" <same selection and options>",
            plan.plan_hash
        );
    } else {
        say!("\nREFUSED: fix the incompatibilities above, or add --force (audited).");
    }
}

/// One schema revert of a plan: what, where, and why it sits before or after the app waves.
fn say_schema_revert(when: &str, revert: &pb::PlannedSchemaRevert) {
    say!(
        "{when} revert {} on {} ({} of {}), all or nothing across its shards {}; expects fingerprint {}",
        revert.versions.join(", "),
        revert.database,
        if revert.versions.len() == 1 {
            "migration"
        } else {
            "migrations"
        },
        revert.change_id,
        revert.shards.join(", "),
        if revert.expected_fingerprint.is_empty() {
            "(agreement only)"
        } else {
            &revert.expected_fingerprint
        }
    );
    if !revert.placement.is_empty() {
        say!("  {}", revert.placement);
    }
}
