//! The node: the one task that owns the replicated state.
//!
//! Proposals arrive on a bounded channel. The node gives each an index, appends the batch to the
//! log and flushes it, then applies each command with `apply()` and answers the proposer: nothing
//! is acknowledged before it is durable. With one member, "committed" means "flushed here";
//! replication through raft-rs replaces exactly this module.

use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::errors::CoordinatorError;
use crate::state_machine::{Command, Outcome, State, apply};
use crate::storage::{LogEntry, LogStore};

pub mod raft;

/// Proposals waiting for the node; more are refused as overloaded.
const PROPOSAL_QUEUE: usize = 1024;
/// Largest batch written with one flush.
const MAX_BATCH: usize = 128;

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
    generation: u64,
    cluster_id: Arc<str>,
}

impl NodeHandle {
    /// Proposes a command and waits until it is durable and applied.
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

    /// Reads the applied state. With one member the local state is the committed state.
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

    /// Generation of this run: the fencing token steps carry.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Id of the cluster this node belongs to.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }
}

/// Recovers the state from `store` (snapshot + log) and starts the node thread.
pub fn start(
    mut store: impl LogStore,
    snapshot_every: u64,
) -> Result<NodeHandle, CoordinatorError> {
    let mut state = store.load_snapshot()?.unwrap_or_default();
    let replayed = store.entries_after(state.applied_index)?;
    let replay_count = replayed.len();
    for entry in replayed {
        // Rejections were rejections the first time too; replay only rebuilds the state.
        let _ = apply(&mut state, entry.index, &entry.command);
    }
    let generation = store.next_generation()?;
    let cluster_id: Arc<str> = store.cluster_id()?.into();
    info!(
        applied_index = state.applied_index,
        replay_count, generation, "State recovered."
    );

    let (proposals, receiver) = mpsc::channel(PROPOSAL_QUEUE);
    let (applied_sender, applied) = watch::channel(state.applied_index);
    let state = Arc::new(RwLock::new(state));
    let node_state = Arc::clone(&state);
    std::thread::Builder::new()
        .name("rewind-node".into())
        .spawn(move || run(store, node_state, receiver, applied_sender, snapshot_every))
        .map_err(|error| CoordinatorError::Storage(format!("spawn node thread: {error}")))?;
    Ok(NodeHandle {
        proposals,
        state,
        applied,
        generation,
        cluster_id,
    })
}

fn run(
    mut store: impl LogStore,
    state: Arc<RwLock<State>>,
    mut receiver: mpsc::Receiver<Proposal>,
    applied: watch::Sender<u64>,
    snapshot_every: u64,
) {
    let mut last_snapshot = read(&state).applied_index;
    while let Some(first) = receiver.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(proposal) => batch.push(proposal),
                Err(_) => break,
            }
        }
        // Only this thread changes the state, so the index read here still holds after the flush,
        // and readers are not blocked while the disk syncs.
        let first_index = read(&state).applied_index + 1;
        let entries: Vec<LogEntry> = batch
            .iter()
            .enumerate()
            .map(|(offset, proposal)| LogEntry {
                index: first_index + offset as u64,
                command: proposal.command.clone(),
            })
            .collect();
        if let Err(error) = store.append(&entries) {
            // The entries may or may not be on disk now; carrying on could apply them twice after
            // a restart or skip them. Stop taking writes: every later proposal is refused, and a
            // restart replays exactly what the disk holds.
            error!(%error, first_index, "Could not persist proposals; the node stops taking writes. Restart the coordinator.");
            for proposal in batch {
                let _ = proposal.reply.send(Err(error.clone()));
            }
            break;
        }
        let mut any_applied = false;
        {
            let mut state_guard = state
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for (entry, proposal) in entries.iter().zip(batch) {
                let outcome = apply(&mut state_guard, entry.index, &entry.command);
                any_applied |= outcome.is_ok();
                let _ = proposal.reply.send(outcome);
            }
        }
        let applied_index = first_index + entries.len() as u64 - 1;
        if applied_index - last_snapshot >= snapshot_every {
            // Serialise a copy outside the lock, so readers wait for a clone, not for the disk.
            let copy = read(&state).clone();
            match store.save_snapshot(&copy) {
                Ok(()) => last_snapshot = applied_index,
                Err(error) => {
                    warn!(%error, applied_index, "Could not save a snapshot; the log keeps growing.")
                }
            }
        }
        if any_applied {
            applied.send_replace(applied_index);
        }
    }
    info!("Node stopped.");
}

fn read(state: &RwLock<State>) -> std::sync::RwLockReadGuard<'_, State> {
    state
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
