//! Alertmanager silences while a rollback runs, so on-call is not paged for the rollback's own
//! noise: one silence per service being reverted (matcher `service=<name>`), created by the
//! leader, renewed as a lease, and expired when the rollback ends. A silence a crashed leader
//! leaves behind ends with its lease.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::AlertmanagerConfig;
use crate::node::NodeHandle;
use crate::node::raft::RaftStatus;
use crate::state_machine::RollbackStatus;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

struct Held {
    id: String,
    renew_at: SystemTime,
}

pub struct Silencer {
    pub node: NodeHandle,
    pub status: watch::Receiver<RaftStatus>,
    pub config: AlertmanagerConfig,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Created {
    #[serde(rename = "silenceID")]
    silence_id: String,
}

impl Silencer {
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let client = match self
            .config
            .tls
            .client_builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
        {
            Ok(client) => client,
            Err(error) => {
                warn!(%error, "Cannot build an HTTP client: no Alertmanager silences.");
                return;
            }
        };
        // Checked a few times per lease, so a renewal is never late.
        let every =
            (self.config.silence_lease / 6).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let mut held: BTreeMap<(u64, String), Held> = BTreeMap::new();
        loop {
            if self.status.borrow().is_leader {
                self.reconcile(&client, &mut held).await;
            } else if !held.is_empty() {
                // The new leader takes over; ours end with their lease.
                held.clear();
            }
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
        for ((rollback, service), silence) in std::mem::take(&mut held) {
            self.expire(&client, rollback, &service, &silence.id).await;
        }
    }

    async fn reconcile(&self, client: &reqwest::Client, held: &mut BTreeMap<(u64, String), Held>) {
        // Only while a rollback runs: a paused one waits for a person, whom alerts should reach.
        let wanted: Vec<(u64, String, String, String)> = self.node.read(|state| {
            state
                .rollbacks
                .values()
                .filter(|rollback| rollback.status == RollbackStatus::Running)
                .flat_map(|rollback| {
                    rollback.waves.iter().map(|wave| {
                        let environment = state
                            .changes
                            .get(&wave.change)
                            .map(|change| crate::plan::environment_of(state, change))
                            .unwrap_or_default();
                        (
                            rollback.number,
                            wave.service.clone(),
                            environment,
                            rollback.id(),
                        )
                    })
                })
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        });
        let ended: Vec<(u64, String)> = held
            .keys()
            .filter(|key| !wanted.iter().any(|(n, s, _, _)| (n, s) == (&key.0, &key.1)))
            .cloned()
            .collect();
        for key in ended {
            if let Some(silence) = held.remove(&key) {
                self.expire(client, key.0, &key.1, &silence.id).await;
            }
        }
        let now = SystemTime::now();
        for (number, service, environment, rollback_id) in wanted {
            let key = (number, service.clone());
            let previous = held.get(&key);
            if previous.is_some_and(|silence| silence.renew_at > now) {
                continue;
            }
            // Scoped to the environment the change ran in, so staging never silences prod.
            let mut matchers = vec![
                json!({"name": "service", "value": service, "isRegex": false, "isEqual": true}),
            ];
            if environment != crate::plan::DEFAULT_ENVIRONMENT && !environment.is_empty() {
                matchers.push(json!({"name": "environment", "value": environment, "isRegex": false, "isEqual": true}));
            }
            let body = json!({
                "id": previous.map(|silence| silence.id.clone()),
                "matchers": matchers,
                "startsAt": humantime::format_rfc3339_seconds(now).to_string(),
                "endsAt": humantime::format_rfc3339_seconds(now + self.config.silence_lease).to_string(),
                "createdBy": "rewind",
                "comment": format!("rewind rollback {rollback_id} is reverting {service}: its own noise is expected"),
            });
            let url = format!("{}/api/v2/silences", self.config.url);
            let answer = client.post(&url).json(&body).send().await;
            match answer {
                Ok(response) if response.status().is_success() => {
                    match response.json::<Created>().await {
                        Ok(created) => {
                            if previous.is_none() {
                                info!(
                                    rollback_id,
                                    service,
                                    silence_id = created.silence_id,
                                    "Alertmanager silence created."
                                );
                            } else {
                                debug!(rollback_id, service, "Alertmanager silence renewed.");
                            }
                            held.insert(
                                key,
                                Held {
                                    id: created.silence_id,
                                    renew_at: now + self.config.silence_lease / 2,
                                },
                            );
                        }
                        Err(error) => {
                            warn!(%error, url, "Alertmanager answered without a silence id.")
                        }
                    }
                }
                Ok(response) => {
                    warn!(status = %response.status(), url, rollback_id, "Alertmanager refused the silence.")
                }
                Err(error) => {
                    warn!(%error, url, rollback_id, "Alertmanager unreachable: no silence.")
                }
            }
        }
    }

    async fn expire(&self, client: &reqwest::Client, rollback: u64, service: &str, id: &str) {
        let url = format!("{}/api/v2/silence/{id}", self.config.url);
        match client.delete(&url).send().await {
            Ok(response) if response.status().is_success() => {
                info!(
                    rollback = rollback,
                    service,
                    silence_id = id,
                    "Alertmanager silence expired."
                );
            }
            Ok(response) => {
                warn!(status = %response.status(), url, "Alertmanager did not expire the silence; it ends with its lease.")
            }
            Err(error) => {
                warn!(%error, url, "Alertmanager unreachable; the silence ends with its lease.")
            }
        }
    }
}
