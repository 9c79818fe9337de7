//! The node: the Raft member that owns the replicated state, and the handle everything else
//! uses to propose commands and read state.
//!
//! A proposal goes to the member's thread ([`raft`]), becomes a Raft entry, is persisted by a
//! majority, and is applied by every member through the same `apply()`; the proposer is
//! answered when the entry is applied on its member. A member that is not the leader answers
//! `NotLeader` with the leader's id. Peers' messages travel over gRPC ([`transport`]).

pub mod raft;
pub mod transport;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, oneshot, watch};

use crate::errors::CoordinatorError;
use crate::state_machine::{Command, Outcome, State};

/// Proposals waiting for the node; more are refused as overloaded.
const PROPOSAL_QUEUE: usize = 1024;

struct Proposal {
    command: Command,
    reply: oneshot::Sender<Result<Outcome, CoordinatorError>>,
}

/// Cheap to clone; every API handler and the engine hold one.
#[derive(Clone)]
pub struct NodeHandle {
    proposals: mpsc::Sender<Proposal>,
    state: Arc<RwLock<State>>,
    applied: watch::Receiver<u64>,
    term: Arc<AtomicU64>,
    cluster_id: Arc<str>,
}

impl NodeHandle {
    /// Proposes a command and waits until it is committed and applied here.
    pub async fn propose(&self, command: Command) -> Result<Outcome, CoordinatorError> {
        let (reply, answer) = oneshot::channel();
        self.proposals
            .try_send(Proposal { command, reply })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => {
                    CoordinatorError::Overloaded(format!("{PROPOSAL_QUEUE} proposals are queued"))
                }
                mpsc::error::TrySendError::Closed(_) => CoordinatorError::ShuttingDown,
            })?;
        answer.await.map_err(|_| CoordinatorError::ShuttingDown)?
    }

    /// Reads the state as applied on this member. Callers that need the committed state serve
    /// reads on the leader only (see `api::Context::require_leader`).
    pub fn read<R>(&self, reader: impl FnOnce(&State) -> R) -> R {
        let state = self
            .state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        reader(&state)
    }

    /// Notified with the applied index after every applied batch.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// The current Raft term: the fencing token every step carries.
    pub fn generation(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }

    /// Id of the cluster this node belongs to.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }
}
