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

use tracing::warn;

use crate::errors::CoordinatorError;
use crate::state_machine::{Command, Outcome, State, decision};

/// Proposals waiting for the node; more are refused as overloaded.
const PROPOSAL_QUEUE: usize = 1024;
/// Transport reports waiting for the node. Few are ever in flight: one per snapshot sent, and
/// one per failed delivery to a peer (which pauses before it tries again). Snapshot reports
/// wait for room rather than be dropped; the node drains the queue at every wake.
const PEER_REPORT_QUEUE: usize = 1024;

/// What the transport tells raft-rs about a peer, so it retries rather than waits for ever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerReport {
    /// Messages to this peer could not be delivered (`report_unreachable`).
    Unreachable { peer: u64 },
    /// The snapshot at `index` sent to this peer arrived whole (`report_snapshot(Finish)`) or
    /// did not (`Failure`): raft-rs sends the peer nothing else until told. A report about
    /// another snapshot than the one raft-rs waits for is ignored.
    Snapshot {
        peer: u64,
        index: u64,
        delivered: bool,
    },
}

/// The channel the transport reports on and the Raft member reads.
pub fn peer_report_channel() -> (mpsc::Sender<PeerReport>, mpsc::Receiver<PeerReport>) {
    mpsc::channel(PEER_REPORT_QUEUE)
}

/// A command waiting for its entry to be applied.
struct Proposal {
    command: Command,
    reply: oneshot::Sender<Result<Outcome, CoordinatorError>>,
}

/// What the node's thread is asked to do.
enum Request {
    Propose(Proposal),
    /// A `ChangeMembership` command, proposed as a Raft conf change.
    ChangeMembership(Proposal),
    TransferLeader {
        to: u64,
        reply: oneshot::Sender<Result<(), CoordinatorError>>,
    },
    /// Answered with a read index once this member has applied it (Raft's ReadIndex).
    ReadIndex {
        reply: oneshot::Sender<Result<u64, CoordinatorError>>,
    },
}

/// Cheap to clone; every API handler and the engine hold one.
#[derive(Clone)]
pub struct NodeHandle {
    requests: mpsc::Sender<Request>,
    state: Arc<RwLock<State>>,
    applied: watch::Receiver<u64>,
    term: Arc<AtomicU64>,
    cluster_id: Arc<str>,
    /// Requests refused because the queue to the Raft thread was full, since this process
    /// began (`rewind_proposal_queue_full_total`), and when that was last logged.
    queue_full: Arc<QueueFull>,
}

/// Counts requests refused by a full proposal queue, and logs them at most every 10 s.
#[derive(Debug, Default)]
pub struct QueueFull {
    pub total: AtomicU64,
    logged_at_ms: AtomicU64,
}

/// A read of the state longer than this is logged (see [`NodeHandle::read`]).
const SLOW_READ: std::time::Duration = std::time::Duration::from_millis(100);

impl NodeHandle {
    /// Requests refused so far because the proposal queue was full.
    pub fn queue_full_total(&self) -> u64 {
        self.queue_full.total.load(Ordering::Relaxed)
    }

    /// Proposes a command and waits until it is committed and applied here. A rollback's plan
    /// or a trigger's verdict that went stale before its entry applied is decided again, a
    /// bounded number of times (see `state_machine::decision`).
    pub async fn propose(&self, command: Command) -> Result<Outcome, CoordinatorError> {
        if !decision::decided_on_leader(&command.kind) {
            return self.propose_once(command).await;
        }
        let mut retries = 0;
        loop {
            match self.propose_once(command.clone()).await {
                Err(CoordinatorError::StaleDecision { .. })
                    if retries < decision::DECISION_RETRIES =>
                {
                    // Let the entries that moved the state apply first; spread at random, so
                    // that two decisions that keep staling each other part.
                    tokio::time::sleep(decision::DECISION_BACKOFF.delay(retries)).await;
                    retries += 1;
                }
                outcome => return outcome,
            }
        }
    }

    async fn propose_once(&self, command: Command) -> Result<Outcome, CoordinatorError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Propose(Proposal { command, reply }))?;
        answer.await.map_err(|_| CoordinatorError::ShuttingDown)?
    }

    /// Proposes a membership change (a `ChangeMembership` command) as a Raft conf change and
    /// waits until it is applied here.
    pub async fn change_membership(&self, command: Command) -> Result<Outcome, CoordinatorError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::ChangeMembership(Proposal { command, reply }))?;
        answer.await.map_err(|_| CoordinatorError::ShuttingDown)?
    }

    /// Asks the leader to hand leadership to member `to` (a voter; the hand-over completes
    /// within an election timeout or is abandoned).
    pub async fn transfer_leader(&self, to: u64) -> Result<(), CoordinatorError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::TransferLeader { to, reply })?;
        answer.await.map_err(|_| CoordinatorError::ShuttingDown)?
    }

    /// Waits until this member's state holds every write committed before the call (Raft's
    /// ReadIndex: the leader confirms with a quorum that it still leads, then waits until it has
    /// applied its commit index). A deposed leader cannot pass it.
    pub async fn read_barrier(&self) -> Result<u64, CoordinatorError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::ReadIndex { reply })?;
        answer.await.map_err(|_| CoordinatorError::ShuttingDown)?
    }

    fn send(&self, request: Request) -> Result<(), CoordinatorError> {
        self.requests
            .try_send(request)
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => {
                    let total = self.queue_full.total.fetch_add(1, Ordering::Relaxed) + 1;
                    let now_ms = rewind_shared::time::now_ms();
                    let last = self.queue_full.logged_at_ms.load(Ordering::Relaxed);
                    if now_ms.saturating_sub(last) >= 10_000
                        && self
                            .queue_full
                            .logged_at_ms
                            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                            .is_ok()
                    {
                        warn!(
                            queued = PROPOSAL_QUEUE,
                            refused_total = total,
                            "The proposal queue is full: requests wait or are refused \
                             (logged at most every 10 s)."
                        );
                    }
                    CoordinatorError::Overloaded(format!("{PROPOSAL_QUEUE} requests are queued"))
                }
                mpsc::error::TrySendError::Closed(_) => CoordinatorError::ShuttingDown,
            })
    }

    /// Reads the state as applied on this member. Callers that need the committed state serve
    /// reads on the leader only (see `api::LeaderOnly`).
    ///
    /// Panics once the member has stopped because an entry could not be audited: nothing may
    /// read (and act on) a state that holds an unaudited command. The panic ends the calling
    /// task; the process exits on the Raft thread's storage failure.
    #[track_caller]
    pub fn read<R>(&self, reader: impl FnOnce(&State) -> R) -> R {
        let state = self
            .state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(why) = state.audit.failure() {
            panic!("this member stopped: its audit store failed ({why})");
        }
        let began = std::time::Instant::now();
        let read = reader(&state);
        drop(state);
        // The Raft thread waits for the lock to apply: a long read delays every write, and
        // past an election timeout the leadership. Named by the caller's place in the code.
        let held = began.elapsed();
        if held > SLOW_READ {
            tracing::warn!(
                ms = held.as_millis() as u64,
                at = %std::panic::Location::caller(),
                "A read held the state's lock for long: writes waited meanwhile."
            );
        }
        read
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
