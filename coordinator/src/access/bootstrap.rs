//! Puts a member's bootstrap policy in force when it leads a cluster that has none, so a new
//! cluster is never open: until then every person is refused.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::Policy;
use crate::node::NodeHandle;
use crate::node::raft::RaftStatus;
use crate::state_machine::{COORDINATOR_IDENTITY, Command, CommandKind};

/// Pause between tries when a proposal fails (not the leader any more, overloaded).
const RETRY: Duration = Duration::from_secs(1);

/// Runs until the cluster has a policy (or `stop`). Without a bootstrap policy of its own, it
/// only says, once, that people are refused.
pub async fn run(
    node: NodeHandle,
    mut status: watch::Receiver<RaftStatus>,
    bootstrap: Option<Arc<Policy>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let has_policy = node.read(|state| state.access.policy.is_some());
        if has_policy {
            return;
        }
        if status.borrow().is_leader {
            let Some(policy) = &bootstrap else {
                error!(
                    "This cluster has no access policy, and this member has no access.bootstrap-policy-file: every person and tool is refused until a member that has one leads."
                );
                return;
            };
            let command = Command {
                at_ms: rewind_shared::time::now_ms(),
                identity: COORDINATOR_IDENTITY.into(),
                request_id: String::new(),
                audit_seed: String::new(),
                kind: CommandKind::ApplyPolicy {
                    policy: Policy::clone(policy),
                    bootstrap: true,
                    expected_hash: String::new(),
                    reason: "the bootstrap policy from access.bootstrap-policy-file".into(),
                },
            };
            match node.propose(command).await {
                Ok(_) => {
                    info!(hash = policy.hash(), "Applied the bootstrap access policy.");
                    return;
                }
                Err(error) => {
                    warn!(%error, "Could not apply the bootstrap access policy yet; retrying.")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stop.changed() => return,
            }
            continue;
        }
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}
