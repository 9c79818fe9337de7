//! Synthetic transactions for health gates: the leader makes each configured HTTP request and
//! checks the status, the body and the latency. Results are kept per gate in memory (a new leader
//! runs them again) and read by `decide()` through `Observations::synthetics`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, info};

use super::decide::SyntheticVerdict;
use crate::state_machine::{SyntheticCheck, rollback_id};

#[derive(Default)]
pub struct SyntheticRuns {
    results: Mutex<HashMap<(u64, u32), SyntheticVerdict>>,
    /// How https:// checks are made (`[synthetics]` in the config).
    tls: rewind_shared::outbound::HttpsTrust,
}

impl SyntheticRuns {
    pub fn new(tls: rewind_shared::outbound::HttpsTrust) -> Self {
        Self {
            results: Mutex::default(),
            tls,
        }
    }

    fn results(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u32), SyntheticVerdict>> {
        self.results
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The latest run for this gate that began at or after `since_ms`.
    pub fn latest(&self, rollback: u64, wave: u32, since_ms: u64) -> Option<SyntheticVerdict> {
        self.results()
            .get(&(rollback, wave))
            .filter(|verdict| verdict.at_ms >= since_ms)
            .cloned()
    }

    /// Keeps only the results `keep` wants (gates still running), so memory stays bounded.
    pub fn retain(&self, keep: impl Fn(u64, u32) -> bool) {
        self.results()
            .retain(|(rollback, wave), _| keep(*rollback, *wave));
    }

    /// Runs every check at once, in the background, and records the verdict.
    pub fn spawn_run(self: &Arc<Self>, rollback: u64, wave: u32, checks: Vec<SyntheticCheck>) {
        let runs = Arc::clone(self);
        tokio::spawn(async move {
            let at_ms = rewind_shared::time::now_ms();
            let client = match runs.tls.client() {
                Ok(client) => client,
                Err(error) => {
                    let verdict = SyntheticVerdict {
                        ok: false,
                        detail: error,
                        at_ms,
                    };
                    runs.results().insert((rollback, wave), verdict);
                    return;
                }
            };
            let outcomes =
                futures::future::join_all(checks.iter().map(|check| run_check(&client, check)))
                    .await;
            let ok = outcomes.iter().all(Result::is_ok);
            let detail = outcomes
                .into_iter()
                .map(|outcome| outcome.unwrap_or_else(|failure| failure))
                .collect::<Vec<_>>()
                .join("; ");
            if ok {
                debug!(
                    rollback_id = rollback_id(rollback),
                    wave, detail, "Synthetic checks pass."
                );
            } else {
                info!(
                    rollback_id = rollback_id(rollback),
                    wave, detail, "Synthetic checks fail."
                );
            }
            // A run that began earlier than the one recorded never replaces it.
            let mut results = runs.results();
            let newer = results
                .get(&(rollback, wave))
                .is_none_or(|recorded| recorded.at_ms <= at_ms);
            if newer {
                results.insert((rollback, wave), SyntheticVerdict { ok, detail, at_ms });
            }
        });
    }
}

/// One check: Ok with what passed, Err with what did not, each naming the check.
async fn run_check(client: &reqwest::Client, check: &SyntheticCheck) -> Result<String, String> {
    let name = &check.name;
    let limit = Duration::from_millis(u64::from(check.max_latency_ms));
    let http = rewind_shared::http_check::HttpCheck {
        url: &check.url,
        post_body: (check.method == "POST").then_some(check.body.as_str()),
        headers: &[],
        expect_status: check.expect_status,
        body_contains: Some(&check.body_contains),
        max_latency: Some(limit),
        // A little past the limit, so a slow answer is reported as slow rather than as a timeout.
        timeout: limit + Duration::from_secs(1),
    };
    let passed = rewind_shared::http_check::run(client, &http)
        .await
        .map_err(|why| format!("{name}: {why}"))?;
    Ok(format!(
        "{name}: {} in {} ms",
        passed.status,
        passed.latency.as_millis()
    ))
}
