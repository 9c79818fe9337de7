//! Pushing feature flags to agents. Flags live in the replicated state; the leader sends each
//! agent a snapshot of its services' flags when it registers, and every later change as it is
//! applied, so a kill switch reaches connected agents as fast as the log commits it.

use std::collections::BTreeMap;
use std::sync::Arc;

use rewind_proto::v1::{self as pb, coordinator_message};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::node::NodeHandle;
use crate::node::raft::RaftStatus;
use crate::plan::DEFAULT_ENVIRONMENT;
use crate::sessions::{SendError, Sessions};
use crate::state_machine::State;

fn environment(state: &State, host_id: &str) -> String {
    state
        .hosts
        .get(host_id)
        .map(|host| host.labels.environment.clone())
        .filter(|environment| !environment.is_empty())
        .unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_string())
}

/// One snapshot per service of the host that has flags in the host's environment.
pub fn snapshots_for(state: &State, host_id: &str) -> Vec<pb::FlagSnapshot> {
    let Some(host) = state.hosts.get(host_id) else {
        return Vec::new();
    };
    let Some(services) = state.flags.get(&environment(state, host_id)) else {
        return Vec::new();
    };
    host.services
        .iter()
        .filter_map(|service| {
            let flags = services.get(service)?;
            Some(pb::FlagSnapshot {
                service: service.clone(),
                flags: flags
                    .iter()
                    .map(|(name, flag)| (name.clone(), flag.enabled))
                    .collect(),
                index: state.applied_index,
            })
        })
        .collect()
}

/// Flag changes after `after_index`, as (host, update) pairs for every host they concern.
pub fn updates_since(state: &State, after_index: u64) -> Vec<(String, pb::FlagUpdate)> {
    // (environment, service) -> (flag, enabled, log index of the change)
    type Changed<'a> = BTreeMap<(&'a str, &'a str), Vec<(&'a str, bool, u64)>>;
    let mut changed: Changed<'_> = BTreeMap::new();
    for (environment, services) in &state.flags {
        for (service, flags) in services {
            for (name, flag) in flags {
                if flag.changed_at_index > after_index {
                    changed.entry((environment, service)).or_default().push((
                        name,
                        flag.enabled,
                        flag.changed_at_index,
                    ));
                }
            }
        }
    }
    if changed.is_empty() {
        return Vec::new();
    }
    let mut updates = Vec::new();
    for host in state.hosts.values() {
        let host_environment = environment(state, &host.host_id);
        for service in &host.services {
            let Some(flags) = changed.get(&(host_environment.as_str(), service.as_str())) else {
                continue;
            };
            for (name, enabled, index) in flags {
                updates.push((
                    host.host_id.clone(),
                    pb::FlagUpdate {
                        service: service.clone(),
                        flag: name.to_string(),
                        enabled: *enabled,
                        index: *index,
                    },
                ));
            }
        }
    }
    updates
}

/// On the leader: after every applied entry, sends agents the flags that changed.
pub async fn push_changes(
    node: NodeHandle,
    mut status: watch::Receiver<RaftStatus>,
    sessions: Arc<Sessions>,
    mut stop: watch::Receiver<bool>,
) {
    let mut applied = node.subscribe();
    // What was pushed up to; agents that register get a snapshot, so a new leader starts here.
    let mut pushed = node.read(|state| state.applied_index);
    loop {
        if status.borrow_and_update().is_leader {
            let (updates, now) =
                node.read(|state| (updates_since(state, pushed), state.applied_index));
            pushed = now;
            let count = updates.len();
            for (host_id, update) in updates {
                let message = pb::CoordinatorMessage {
                    body: Some(coordinator_message::Body::Flag(update)),
                };
                match sessions.send(&host_id, message) {
                    Ok(_) => {}
                    // A disconnected agent gets the snapshot when it registers again.
                    Err(SendError::NotConnected(_)) => {
                        debug!(host_id, "Flag update not sent: the agent is not connected.");
                    }
                    // Never leave an agent with a stale flag: end its session, so it
                    // reconnects and gets every flag afresh.
                    Err(error) => {
                        warn!(%error, host_id, "Flag update not queued; closing the session so the agent resyncs.");
                        sessions.drop_host(&host_id);
                    }
                }
            }
            if count > 0 {
                info!(updates = count, "Flag changes pushed to agents.");
            }
        } else {
            pushed = node.read(|state| state.applied_index);
        }
        tokio::select! {
            _ = stop.changed() => break,
            changed = applied.changed() => if changed.is_err() { break },
            changed = status.changed() => if changed.is_err() { break },
        }
    }
}
