//! Rollbacks: their options, waves, steps and escalations.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::*;

stable_names!(Trigger {
    Manual => "Manual",
    Automatic => "Automatic",
});
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RollbackStatus {
    Running,
    Paused,
    Succeeded,
    Failed,
    Aborted,
}
stable_names!(RollbackStatus {
    Running => "Running",
    Paused => "Paused",
    Succeeded => "Succeeded",
    Failed => "Failed",
    Aborted => "Aborted",
});
impl RollbackStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Aborted)
    }
}
/// What a rollback step does on its host, in this order. `Verify` runs on the coordinator: it
/// waits for a health report, newer than the restart, in which every probe of the service passes.
/// `Drain`/`Undrain` run the service's drain hook on the agent (a no-op where none is set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RollbackStepKind {
    Drain,
    Restore,
    Restart,
    Verify,
    Undrain,
    /// Takes a host out of rotation for good: the circuit breaker of `rollback isolate`, which
    /// drains a failing service instead of reverting it.
    Isolate,
    // The rest of the agent's catalogue, for services whose recipe names them (see `recipe`).
    Reload,
    PauseJobs,
    ResumeJobs,
    PurgeCache,
    ScaleUp,
    Check,
    /// The n-th (from 1) `run:` step of the service's recipe, which holds its command.
    Run(u8),
    /// The service's reconcile hook after a restore: session stores and caches of state the
    /// reverted release wrote (from version 10).
    Reconcile,
    /// Makes clients drop what the reverted release had them cache: the service's client-cache
    /// hook switched on for a window (from version 10).
    ClearClientCaches,
}
impl RollbackStepKind {
    /// The default recipe.
    pub const ALL: [Self; 5] = [
        Self::Drain,
        Self::Restore,
        Self::Restart,
        Self::Verify,
        Self::Undrain,
    ];

    /// Every step a recipe may name (besides `run:`).
    pub const CATALOGUE: [Self; 13] = [
        Self::Drain,
        Self::Restore,
        Self::Restart,
        Self::Reload,
        Self::Verify,
        Self::Undrain,
        Self::PauseJobs,
        Self::ResumeJobs,
        Self::PurgeCache,
        Self::ScaleUp,
        Self::Check,
        Self::Reconcile,
        Self::ClearClientCaches,
    ];

    /// Whether cluster version 10 brought it: a member of an older release cannot read it.
    pub fn from_version_ten(self) -> bool {
        matches!(self, Self::Reconcile | Self::ClearClientCaches)
    }

    pub fn name(self) -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed(match self {
            Self::Drain => "drain",
            Self::Restore => "restore",
            Self::Restart => "restart",
            Self::Verify => "verify",
            Self::Undrain => "undrain",
            Self::Isolate => "isolate",
            Self::Reload => "reload",
            Self::PauseJobs => "pause-jobs",
            Self::ResumeJobs => "resume-jobs",
            Self::PurgeCache => "purge-cache",
            Self::ScaleUp => "scale-up",
            Self::Check => "check",
            Self::Reconcile => "reconcile",
            Self::ClearClientCaches => "clear-client-caches",
            Self::Run(n) => return std::borrow::Cow::Owned(format!("run-{n}")),
        })
    }

    /// The step a host must still go through after this one, whatever else is skipped, so it
    /// is not left out of rotation or with its job processors paused.
    pub fn closed_by(self) -> Option<Self> {
        match self {
            Self::Drain => Some(Self::Undrain),
            Self::PauseJobs => Some(Self::ResumeJobs),
            _ => None,
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        if let Some(n) = name.strip_prefix("run-") {
            return n
                .parse()
                .ok()
                .filter(|n| (1..=crate::recipe::MAX_RUN_STEPS as u8).contains(n))
                .map(Self::Run);
        }
        Self::CATALOGUE
            .into_iter()
            .chain([Self::Isolate])
            .find(|kind| kind.name() == name)
    }
}
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RollbackStepRecord {
    /// Index into the rollback's waves.
    pub wave: u32,
    pub service: String,
    pub host_id: String,
    pub kind: RollbackStepKind,
    pub progress: StepProgress,
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trigger {
    Manual,
    Automatic,
}
/// How a plan is cut into waves and gated. Part of the plan's hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanOptions {
    /// Hosts of a wave reverted at once.
    pub max_parallel: u32,
    /// Hosts of a service allowed out of service at once, counting ones already down.
    pub max_unavailable: u32,
    /// Region reverted first for every service; empty: each service's smallest region.
    pub canary_region: String,
    /// Proceed although the plan would break a consumer's API needs (audited).
    pub force: bool,
    pub gate: GateOptions,
    /// Revert the changes' expand migrations too (by default they stay: the old app works
    /// with them). Left out of the JSON when false, so older plan hashes replay unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revert_expand: bool,
    /// Why losing data a schema revert destroys is accepted (those rows are exported first);
    /// empty: a revert that would destroy data is refused.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub accept_data_loss: String,
    /// Revert every migration after the app waves (as before cluster version 9). Left out of
    /// the JSON when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub schema_after_waves: bool,
    /// Revert hosts that drifted since rewind last put them there, wiping the change (from
    /// version 10; the agents refuse such a restore otherwise). Left out of the JSON when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overwrite_drift: bool,
    /// Hosts left out of the plan, as they are (from version 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_hosts: Vec<String>,
}
impl PlanOptions {
    /// Whether these options use what cluster version 10 brought (drift overwritten, hosts
    /// left out): a member of an older release would drop them.
    pub fn drift_guarded(&self) -> bool {
        self.overwrite_drift || !self.exclude_hosts.is_empty()
    }

    /// The cluster version these options need (a member of an older release would drop what
    /// they use), with what needs it; `LEGACY` for options every release reads.
    pub fn required_version(&self) -> (u32, &'static str) {
        use crate::state_machine::version;
        if self.gate.settle_ms > 0 {
            (
                version::SUBSECOND_GATES,
                "a gate settle time in milliseconds",
            )
        } else if self.drift_guarded() {
            (
                version::DRIFT_GUARD,
                "hosts left out of a rollback or drift overwritten",
            )
        } else {
            (version::LEGACY, "")
        }
    }
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            max_parallel: 1,
            max_unavailable: 1,
            canary_region: String::new(),
            force: false,
            gate: GateOptions::default(),
            revert_expand: false,
            accept_data_loss: String::new(),
            schema_after_waves: false,
            overwrite_drift: false,
            exclude_hosts: Vec::new(),
        }
    }
}
/// The health gate after each wave: the service's probe failure ratio and error ratio on the
/// wave's hosts must stay within `tolerance` of the change's baseline, and their p99 latency
/// within `latency_tolerance` (a fraction) above it, for `settle_s` (or `settle_ms`), within
/// `timeout_s`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateOptions {
    pub settle_s: u32,
    /// The settle time in milliseconds when one under a second, or not a whole number of
    /// seconds, was asked (cluster version 12); 0: `settle_s`. Left out of the JSON at 0, so
    /// plans of earlier versions hash as they did.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub settle_ms: u32,
    pub timeout_s: u32,
    pub tolerance: f64,
    /// Left out of the JSON at its default, so plan hashes of rollbacks started before it
    /// existed (replayed from the log) come out as they did then.
    #[serde(
        default = "default_latency_tolerance",
        skip_serializing_if = "is_default_latency_tolerance"
    )]
    pub latency_tolerance: f64,
}
pub const DEFAULT_LATENCY_TOLERANCE: f64 = 0.25;
fn default_latency_tolerance() -> f64 {
    DEFAULT_LATENCY_TOLERANCE
}
fn is_default_latency_tolerance(value: &f64) -> bool {
    *value == DEFAULT_LATENCY_TOLERANCE
}
fn is_zero(value: &u32) -> bool {
    *value == 0
}
impl GateOptions {
    /// How long a wave's health must hold, in milliseconds.
    pub fn settle_ms(&self) -> u64 {
        if self.settle_ms > 0 {
            u64::from(self.settle_ms)
        } else {
            u64::from(self.settle_s) * 1000
        }
    }

    /// The settle time for people: "5 s", or "200 ms" when it was asked in milliseconds.
    pub fn settle_text(&self) -> String {
        if self.settle_ms > 0 {
            format!("{} ms", self.settle_ms)
        } else {
            format!("{} s", self.settle_s)
        }
    }
}
impl Default for GateOptions {
    fn default() -> Self {
        Self {
            settle_s: 5,
            settle_ms: 0,
            timeout_s: 120,
            tolerance: 0.05,
            latency_tolerance: DEFAULT_LATENCY_TOLERANCE,
        }
    }
}
/// One wave of a plan: a batch of one service's hosts in one region, then a gate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WaveRecord {
    pub service: String,
    pub change: u64,
    pub region: String,
    /// The first wave of its service.
    pub canary: bool,
    pub hosts: Vec<String>,
    pub gate: StepProgress,
    /// A wave added by `rollback isolate`: its hosts are drained, not reverted, and not gated.
    #[serde(default)]
    pub isolation: bool,
}
/// A call for a person: a rollback paused, or an automatic rollback was refused, and someone
/// must decide.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EscalationRecord {
    pub id: u64,
    pub opened_at_ms: u64,
    /// The paused rollback, 0 when the escalation is about a refused trigger.
    pub rollback: u64,
    /// Wave of that rollback.
    pub wave: u32,
    pub service: String,
    pub evidence: String,
    /// Webhook deliveries tried, and how the last one went.
    pub attempts: u32,
    pub delivered: bool,
    pub delivery_detail: String,
}
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RollbackRecord {
    pub number: u64,
    /// The changes reverted, one per service.
    pub changes: Vec<u64>,
    pub services: Vec<String>,
    pub status: RollbackStatus,
    pub trigger: Trigger,
    pub reason: String,
    pub started_by: String,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    pub options: PlanOptions,
    /// sha256 of the plan it runs, as `rollback plan` showed it.
    pub plan_hash: String,
    pub waves: Vec<WaveRecord>,
    /// Per wave, per host, the steps of the service's recipe in order (by default drain,
    /// restore, restart, verify, undrain).
    pub steps: Vec<RollbackStepRecord>,
    /// Compatibility problems overridden with `force`.
    pub forced: Vec<String>,
    /// Why it is paused, when it is.
    pub paused_reason: String,
    /// Ids of its escalations in `State::escalations`.
    pub escalations: Vec<u64>,
    pub outcome_detail: String,
    pub failed_hosts: Vec<String>,
    /// Hosts an operator chose to leave unreverted.
    pub skipped_hosts: Vec<String>,
    /// Flags turned back when it started: `environment/service/flag -> on|off`.
    #[serde(default)]
    pub flags_reverted: Vec<String>,
    /// Services an operator isolated (drained) instead of reverting.
    #[serde(default)]
    pub isolated: Vec<String>,
    /// Services with their own recipe, as it was when the rollback started; the others ran
    /// the default one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub recipes: BTreeMap<String, Vec<crate::recipe::RecipeStep>>,
    /// Migrations it reverts, per database, once every wave is done.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schema: Vec<SchemaStage>,
    /// Approvers of its request, or the policy that let an automatic rollback run at once.
    #[serde(default)]
    pub approved_by: Vec<String>,
    /// The request it ran from (`req-<n>`), 0 if none.
    #[serde(default)]
    pub request: u64,
    /// Ran without the approvals its environments require.
    #[serde(default)]
    pub break_glass: bool,
    /// Hosts of a region lost during it (cluster version 11): every agent of the region was
    /// gone while other regions' were there. Their unfinished steps wait, the waves go on
    /// without them, and they are reverted after the last wave once they return.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deferred_hosts: Vec<String>,
    /// Where each host's steps sit in `steps`: not replicated, not compared, built on use.
    #[serde(skip)]
    pub step_lookup: StepLookup,
}

/// Positions of each host's steps in a rollback's `steps`. `apply()` finds a step for every
/// `StepStarted` and `StepFinished`, and a scan of a 5,000-host rollback's 25,000 steps each
/// time made a rollback cost the square of its size. A hit is checked against the step itself
/// and a miss falls back to the scan (rebuilding the positions when the scan finds it). Steps
/// are only ever appended (an isolation adds some), never reordered or removed, so stored
/// positions stay right and a host's first match is the scan's first match: an empty or older
/// lookup changes how fast `apply()` finds a step, never which, and members agree whatever
/// each one's lookup holds. Clones start empty (a snapshot's copy need not carry it).
#[derive(Default)]
pub struct StepLookup(std::collections::HashMap<String, Vec<usize>>);

impl StepLookup {
    /// The position of the first step that `matches`, among `host_id`'s steps.
    pub fn find(
        &mut self,
        steps: &[RollbackStepRecord],
        host_id: &str,
        matches: impl Fn(&RollbackStepRecord) -> bool,
    ) -> Option<usize> {
        let hit = self.0.get(host_id).and_then(|positions| {
            positions
                .iter()
                .copied()
                .find(|&position| steps.get(position).is_some_and(&matches))
        });
        if hit.is_some() {
            return hit;
        }
        let found = steps.iter().position(&matches)?;
        self.0.clear();
        for (position, step) in steps.iter().enumerate() {
            self.0
                .entry(step.host_id.clone())
                .or_default()
                .push(position);
        }
        Some(found)
    }
}

impl Clone for StepLookup {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for StepLookup {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for StepLookup {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("StepLookup")
    }
}

impl RollbackRecord {
    pub fn id(&self) -> String {
        rollback_id(self.number)
    }

    /// The first wave not yet finished: its steps have not all ended, or its gate has not
    /// passed (a gate is skipped when an operator skipped all its hosts, and for isolation).
    pub fn current_wave(&self) -> Option<u32> {
        (0..self.waves.len() as u32).find(|&wave| {
            let gate_done = matches!(
                self.waves[wave as usize].gate.status,
                StepStatus::Succeeded | StepStatus::Skipped
            );
            !gate_done
                || self
                    .wave_steps(wave)
                    .any(|step| !step.progress.status.is_terminal() && !self.is_deferred(step))
        })
    }

    /// Whether `wave`, which still has a step to run, is the current wave (the engine drives no
    /// other): every wave before it is done. A wave's gate starts only once all its steps have
    /// ended, and steps left unended after it (deferred hosts') hold no wave up, so a gate that
    /// passed or was skipped means its wave is done; but an isolation's wave, put before the
    /// open waves with its gate skipped, is done only once its steps have ended. The same answer
    /// as `current_wave() == Some(wave)` without reading every step of every wave: `apply()`
    /// asks it for each result (cluster version 13).
    pub fn is_current_wave(&self, wave: u32) -> bool {
        (0..wave).all(|earlier| {
            let Some(record) = self.waves.get(earlier as usize) else {
                return false;
            };
            let gate_done = matches!(
                record.gate.status,
                StepStatus::Succeeded | StepStatus::Skipped
            );
            gate_done
                && (!record.isolation
                    || self
                        .wave_steps(earlier)
                        .all(|step| step.progress.status.is_terminal() || self.is_deferred(step)))
        })
    }

    /// Whether the step's host was deferred with its lost region: it waits for the host's
    /// return, after the last wave, and holds no wave up.
    pub fn is_deferred(&self, step: &RollbackStepRecord) -> bool {
        self.deferred_hosts.contains(&step.host_id)
    }

    /// Deferred hosts with steps left to take (waiting for their region, or being reverted
    /// since it returned).
    pub fn deferred_unfinished(&self) -> Vec<&str> {
        let mut hosts: Vec<&str> = self
            .steps
            .iter()
            .filter(|step| self.is_deferred(step) && !step.progress.status.is_terminal())
            .map(|step| step.host_id.as_str())
            .collect();
        hosts.sort_unstable();
        hosts.dedup();
        hosts
    }

    pub fn wave_steps(&self, wave: u32) -> impl Iterator<Item = &RollbackStepRecord> {
        self.steps.iter().filter(move |step| step.wave == wave)
    }

    /// Its schema stages (with their index) that still run: not those of a service an
    /// operator isolated, whose app was not reverted.
    pub fn schema_stages(&self) -> impl Iterator<Item = (usize, &SchemaStage)> {
        self.schema
            .iter()
            .enumerate()
            .filter(|(_, stage)| !self.isolated.contains(&stage.service))
    }
}
