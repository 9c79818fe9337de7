//! Automatic triggers: where they come from, what became of them, and their throttles.

use serde::{Deserialize, Serialize};

/// Where a request for an automatic rollback came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TriggerSource {
    /// The service's health policy, judged by the engine.
    Policy,
    /// A Prometheus Alertmanager webhook.
    Alertmanager,
    /// A signed generic webhook.
    Webhook,
}
impl TriggerSource {
    pub fn name(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::Alertmanager => "alertmanager",
            Self::Webhook => "webhook",
        }
    }
}
/// What became of a request for an automatic rollback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TriggerOutcome {
    /// A rollback started.
    Started,
    /// Nothing to do (no change, or already being rolled back).
    Ignored,
    /// The environment's policy makes automatic rollbacks wait for approval: a request was filed.
    AwaitingApproval,
    /// A throttle refused it; a person was called when that needs one.
    Throttled,
}
impl TriggerOutcome {
    pub fn name(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Ignored => "ignored",
            Self::AwaitingApproval => "awaiting-approval",
            Self::Throttled => "throttled",
        }
    }
}
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TriggerRecord {
    pub at_ms: u64,
    pub service: String,
    pub environment: String,
    pub source: TriggerSource,
    pub reason: String,
    pub outcome: TriggerOutcome,
    /// Why it was ignored or throttled, or which rollback started.
    pub detail: String,
    /// The rollback it started, 0 if none.
    pub rollback: u64,
    /// The change it asked to roll back, 0 if the service had none.
    pub change: u64,
}
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BreakerRecord {
    pub tripped_at_ms: u64,
    pub services: Vec<String>,
}
/// Bounds on automatic rollbacks. Stamped into each trigger command by the member that proposes
/// it, so every member judges the trigger the same way.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThrottleLimits {
    /// Automatic rollbacks per environment per `budget_window_s`.
    pub budget: u32,
    pub budget_window_s: u32,
    /// No second automatic rollback of a service within this.
    pub cooldown_s: u32,
    /// A service rolled back this many times within `flap_window_s` is flapping: it is no longer
    /// rolled back automatically, a person is called instead.
    pub flap_rollbacks: u32,
    pub flap_window_s: u32,
    /// This many distinct services triggering within `breaker_window_s` trips the breaker.
    pub breaker_services: u32,
    pub breaker_window_s: u32,
}
impl Default for ThrottleLimits {
    fn default() -> Self {
        Self {
            budget: 5,
            budget_window_s: 3600,
            cooldown_s: 600,
            flap_rollbacks: 3,
            flap_window_s: 86_400,
            breaker_services: 4,
            breaker_window_s: 120,
        }
    }
}
