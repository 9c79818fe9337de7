//! The Raft node: one thread owns the raft-rs `RawNode` and the replicated state.
//!
//! Proposals (from [`NodeHandle`]) and peers' Raft messages arrive on bounded channels. The
//! thread ticks raft, and handles each `Ready` in the order raft-rs documents: send `messages`,
//! install a snapshot, apply committed entries, append new entries and the hard state, **flush**,
//! and only then send `persisted_messages`; then `advance`, apply and send what that returns.
//! A proposal is answered when its entry is applied on this member, so nothing is acknowledged
//! before a majority has it on disk.
//!
//! Membership changes are Raft conf changes whose context carries the audited
//! [`CommandKind::ChangeMembership`]; applying one updates Raft's voters, the replicated member
//! registry and the audit log together, then takes a snapshot so a member that joins receives
//! a snapshot that already counts it as a member.
//!
//! Kept in one file (over 700 lines): the Ready loop's ordering rules are the point, and they span
//! proposing, persisting, applying and snapshotting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, Snapshot,
};
use raft::{ProgressState, RawNode, SnapshotStatus, StateRole};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::{NodeHandle, PROPOSAL_QUEUE, PeerReport, Proposal, Request};
use crate::errors::CoordinatorError;
use crate::state_machine::decision;
use crate::state_machine::version::{self, Decoded};
use crate::state_machine::{
    CommandKind, MemberRecord, MembershipChange, Outcome, State, apply, apply_membership,
};
use crate::storage::{RaftStore, snapshot_codec};

/// Raft messages from peers waiting for the node; more are dropped (Raft retransmits).
const PEER_MESSAGE_QUEUE: usize = 4096;
/// Most proposals, and most peer messages, taken into one Ready.
const MAX_BATCH: usize = 256;
/// Readies handled back to back before the thread looks at its queues again.
const MAX_READIES_PER_WAKE: usize = 4;
/// A follower whose matched index has not moved for this long while it is behind is logged at
/// ERROR (once per episode): it is down, cut off, or cannot take what it is sent.
const STUCK_FOLLOWER_AFTER: Duration = Duration::from_secs(60);

/// Where outgoing Raft messages go. Must not block: queue or drop (Raft retransmits).
pub trait Transport: Send + 'static {
    fn send(&self, messages: Vec<Message>);
}

#[derive(Clone, Debug)]
pub struct RaftSettings {
    pub id: u64,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Applied entries between state snapshots (the log is compacted to each).
    pub snapshot_every: u64,
    /// The cluster version a cluster this member founds starts at.
    pub initial_cluster_version: u32,
}

impl RaftSettings {
    pub fn new(id: u64) -> Self {
        Self {
            id,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 3,
            snapshot_every: 10_000,
            initial_cluster_version: version::CURRENT,
        }
    }
}

/// What a member reports about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    /// Leading, with an entry of its own term committed and everything committed applied.
    pub is_leader: bool,
    pub applied_index: u64,
    pub commit_index: u64,
    /// Snapshots received from a leader since this member started.
    pub installed_snapshots: u64,
    /// Last index in this member's log.
    pub last_index: u64,
    /// Followers' replication progress, known on the leader only.
    pub peers: Vec<PeerProgress>,
    /// Set when the Raft store failed (a write or fsync): the member has stopped and the
    /// process must exit, to restart from what the disk holds.
    pub storage_failed: Option<String>,
    /// Set when a committed entry cannot be applied by this binary (written at a newer cluster
    /// version): the member has stopped and the process must exit.
    pub cannot_apply: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerProgress {
    pub id: u64,
    pub matched_index: u64,
    pub recently_active: bool,
    pub is_learner: bool,
    /// The leader is sending it a snapshot (and sends it nothing else until that ends).
    pub snapshot_in_flight: bool,
}

/// The transport's side of a member: deliver peers' messages, watch the status, stop it.
pub struct RaftMember {
    pub node: NodeHandle,
    pub peer_messages: mpsc::Sender<Message>,
    pub status: watch::Receiver<RaftStatus>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RaftMember {
    /// Stops the member's thread and waits for it. What it persisted stays on disk.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RaftMember {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Opens a member on `store`. A store never initialized is bootstrapped with
/// `founding_members` as voters and as the member registry (every founding member passes the
/// same list); with none, the member waits for a running cluster to add it. Once initialized,
/// the stored membership wins.
pub fn start_member(
    settings: RaftSettings,
    store: RaftStore,
    founding_members: &[MemberRecord],
    transport: impl Transport,
    peer_reports: mpsc::Receiver<PeerReport>,
    cluster_id: Arc<str>,
) -> Result<RaftMember, CoordinatorError> {
    if !store.is_initialized()? && !founding_members.is_empty() {
        // A new cluster starts at this binary's version (its founders run one release), unless
        // configured older.
        let mut initial = State {
            members: founding_members
                .iter()
                .map(|member| (member.id, member.clone()))
                .collect(),
            cluster_version: settings.initial_cluster_version,
            ..State::default()
        };
        if initial.cluster_version >= version::AUDIT_STORE {
            // Nothing to move yet: the log starts in its store.
            initial.audit.move_to_store();
        }
        let data = snapshot_codec::encode(&initial)?;
        let voters: Vec<u64> = founding_members.iter().map(|member| member.id).collect();
        store.bootstrap(&voters, data)?;
    }
    let snapshot = store.latest_snapshot()?;
    let mut state: State = if snapshot.get_data().is_empty() {
        State::default()
    } else {
        snapshot_codec::decode(snapshot.get_data())?
    };
    state.audit.attach(audit_store(&store));
    let config = raft::Config {
        id: settings.id,
        election_tick: settings.election_ticks,
        heartbeat_tick: settings.heartbeat_ticks,
        applied: snapshot.get_metadata().index,
        pre_vote: true,
        check_quorum: true,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        ..raft::Config::default()
    };
    config
        .validate()
        .map_err(|error| CoordinatorError::Raft(format!("config: {error}")))?;
    let raw = RawNode::new(
        &config,
        store.clone(),
        &rewind_shared::logging::slog_logger(),
    )
    .map_err(|error| CoordinatorError::Raft(format!("start: {error}")))?;
    let mut raw = raw;
    if raw
        .raft
        .prs()
        .conf()
        .voters()
        .ids()
        .iter()
        .eq([settings.id])
    {
        // Alone in the cluster: no one to wait for, lead at once.
        raw.campaign()
            .map_err(|error| CoordinatorError::Raft(format!("campaign: {error}")))?;
    }
    let term = Arc::new(AtomicU64::new(raw.raft.term));

    let (requests, request_receiver) = mpsc::channel(PROPOSAL_QUEUE);
    let (peer_messages, message_receiver) = mpsc::channel(PEER_MESSAGE_QUEUE);
    let (applied_sender, applied) = watch::channel(state.applied_index);
    let (status_sender, status) = watch::channel(RaftStatus {
        id: settings.id,
        ..RaftStatus::default()
    });
    let (stop, stop_receiver) = oneshot::channel();
    let state = Arc::new(RwLock::new(state));
    let driver = Driver {
        raw,
        store,
        settings: settings.clone(),
        state: Arc::clone(&state),
        transport,
        pending: HashMap::new(),
        next_proposal: 0,
        pending_reads: HashMap::new(),
        confirmed_reads: Vec::new(),
        next_read: 0,
        last_snapshot: snapshot.get_metadata().index,
        snapshot_due: false,
        snapshot_in_progress: None,
        flushed_term_and_vote: (0, 0),
        installed_snapshots: 0,
        stuck_watch: HashMap::new(),
        applied: applied_sender,
        status: status_sender,
        term: Arc::clone(&term),
    };
    let thread = std::thread::Builder::new()
        .name(format!("rewind-raft-{}", settings.id))
        .spawn(move || {
            driver.run(
                request_receiver,
                message_receiver,
                peer_reports,
                stop_receiver,
            )
        })
        .map_err(|error| CoordinatorError::Internal(format!("spawn the raft thread: {error}")))?;
    let node = NodeHandle {
        requests,
        state,
        applied,
        term,
        cluster_id,
        queue_full: Arc::default(),
    };
    Ok(RaftMember {
        node,
        peer_messages,
        status,
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// The most committed entries applied under one write lock of the state.
const MAX_APPLY_RUN: usize = 256;

struct Driver<T: Transport> {
    raw: RawNode<RaftStore>,
    store: RaftStore,
    settings: RaftSettings,
    state: Arc<RwLock<State>>,
    transport: T,
    /// Proposals of this member waiting for their entry to be applied, by proposal number.
    pending: HashMap<u64, oneshot::Sender<Result<Outcome, CoordinatorError>>>,
    next_proposal: u64,
    /// ReadIndex requests waiting for the quorum's confirmation, by request number.
    pending_reads: HashMap<u64, oneshot::Sender<Result<u64, CoordinatorError>>>,
    /// Confirmed reads waiting for this member to apply their index.
    confirmed_reads: Vec<(u64, oneshot::Sender<Result<u64, CoordinatorError>>)>,
    next_read: u64,
    last_snapshot: u64,
    /// Set by a membership change: snapshot now, so a joining member gets one that includes it.
    snapshot_due: bool,
    /// Term and vote as last written: a change of either must be flushed before the messages
    /// that depend on it are sent.
    flushed_term_and_vote: (u64, u64),
    /// A periodic snapshot being encoded and written on its own thread, and the index it covers:
    /// its cost grows with the state, so it stays off the path of every write.
    snapshot_in_progress: Option<(u64, std::thread::JoinHandle<Result<(), CoordinatorError>>)>,
    installed_snapshots: u64,
    /// Per follower, on the leader: its matched index, since when it has not moved, and whether
    /// that was already logged.
    stuck_watch: HashMap<u64, StuckWatch>,
    applied: watch::Sender<u64>,
    status: watch::Sender<RaftStatus>,
    term: Arc<AtomicU64>,
}

impl<T: Transport> Driver<T> {
    fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut messages: mpsc::Receiver<Message>,
        mut peer_reports: mpsc::Receiver<PeerReport>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                error!(%error, "Cannot start the raft thread's runtime.");
                return;
            }
        };
        runtime.block_on(async move {
            let mut ticker = tokio::time::interval(self.settings.tick);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = ticker.tick() => { self.raw.tick(); }
                    Some(request) = requests.recv() => self.handle_request(request),
                    Some(message) = messages.recv() => self.step(message),
                    Some(report) = peer_reports.recv() => self.take_report(report),
                }
                let woken = std::time::Instant::now();
                // Take whatever else is already waiting, so one Ready (one append, one flush,
                // one round of messages) carries many proposals: batching is what makes
                // concurrent writes cheap.
                for _ in 0..MAX_BATCH {
                    match requests.try_recv() {
                        Ok(request) => self.handle_request(request),
                        Err(_) => break,
                    }
                }
                for _ in 0..MAX_BATCH {
                    match messages.try_recv() {
                        Ok(message) => self.step(message),
                        Err(_) => break,
                    }
                }
                for _ in 0..MAX_BATCH {
                    match peer_reports.try_recv() {
                        Ok(report) => self.take_report(report),
                        Err(_) => break,
                    }
                }
                // Handling a Ready can make another (applying a conf change advances the
                // commit and queues messages); take those now rather than at the next tick.
                let mut failed = None;
                for _ in 0..MAX_READIES_PER_WAKE {
                    if !self.raw.has_ready() {
                        break;
                    }
                    if let Err(error) = self.handle_ready() {
                        failed = Some(error);
                        break;
                    }
                }
                if let Some(error @ CoordinatorError::CannotApply { .. }) = failed {
                    // An entry from a newer release: applying part of the log and skipping the
                    // rest would drift from the other members. The process exits on this status.
                    error!(%error, "This member cannot apply the log; it stops.");
                    let failure = error.to_string();
                    self.status
                        .send_modify(|status| status.cannot_apply = Some(failure));
                    break;
                }
                if let Some(error) = failed {
                    // The disk failed under Raft: stop rather than retry (after a failed fsync
                    // the kernel may have dropped the pages it did not write) and rather than
                    // act on state that is not persisted. A restart recovers from what the disk
                    // holds; the process exits on this status.
                    error!(%error, "Raft storage failed; this member stops.");
                    let failure = error.to_string();
                    self.status
                        .send_modify(|status| status.storage_failed = Some(failure));
                    break;
                }
                self.publish_status();
                // A wake that keeps this thread past half an election timeout delays its
                // heartbeats (or, on a follower, its votes) enough to lose leadership: say so.
                let busy = woken.elapsed();
                if busy > self.settings.tick * (self.settings.election_ticks as u32) / 2 {
                    warn!(
                        ms = busy.as_millis() as u64,
                        "The Raft thread was busy for long in one wake: heartbeats waited meanwhile."
                    );
                }
            }
            self.fail_pending(|| CoordinatorError::ShuttingDown);
            if let Err(error) = self.finish_snapshot() {
                warn!(%error, "The last snapshot was not written; the log still holds its entries.");
            }
            // The state and the transport hold the audit store: let go of the database.
            self.store.audit_store().close();
            info!(id = self.settings.id, "Raft member stopped.");
        });
    }

    /// Tells raft-rs what the transport found, so it retries a peer rather than wait for it.
    fn take_report(&mut self, report: PeerReport) {
        match report {
            PeerReport::Unreachable { peer } => self.raw.report_unreachable(peer),
            PeerReport::Snapshot {
                peer,
                index,
                delivered,
            } => {
                // raft-rs applies a report to whatever snapshot it waits for; one about an
                // older send (before leadership moved, or overtaken) must not finish a newer one.
                let awaited = self.raw.raft.prs().get(peer).is_some_and(|progress| {
                    progress.state == ProgressState::Snapshot && progress.pending_snapshot == index
                });
                if !awaited {
                    debug!(
                        peer,
                        index, delivered, "Ignored a report about a snapshot no longer awaited."
                    );
                    return;
                }
                let status = if delivered {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(peer, status);
            }
        }
    }

    fn step(&mut self, message: Message) {
        if let Err(error) = self.raw.step(message) {
            debug!(%error, "Raft refused a message.");
        }
    }

    fn handle_request(&mut self, request: Request) {
        match request {
            Request::Propose(proposal) => self.propose(proposal),
            Request::ChangeMembership(proposal) => self.propose_membership(proposal),
            Request::TransferLeader { to, reply } => {
                let _ = reply.send(self.transfer_leader(to));
            }
            Request::ReadIndex { reply } => self.read_index(reply),
        }
    }

    fn read_index(&mut self, reply: oneshot::Sender<Result<u64, CoordinatorError>>) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(CoordinatorError::NotLeader {
                leader_id: self.raw.raft.leader_id,
            }));
            return;
        }
        if self.pending_reads.len() >= PROPOSAL_QUEUE {
            let _ = reply.send(Err(CoordinatorError::Overloaded(format!(
                "{PROPOSAL_QUEUE} reads are waiting"
            ))));
            return;
        }
        self.next_read += 1;
        self.raw.read_index(self.next_read.to_be_bytes().to_vec());
        self.pending_reads.insert(self.next_read, reply);
    }

    /// Moves confirmed reads to wait for their index, and answers those already applied.
    fn settle_reads(&mut self, read_states: &[raft::ReadState]) {
        for read_state in read_states {
            let Ok(bytes) = <[u8; 8]>::try_from(read_state.request_ctx.as_slice()) else {
                continue;
            };
            if let Some(reply) = self.pending_reads.remove(&u64::from_be_bytes(bytes)) {
                self.confirmed_reads.push((read_state.index, reply));
            }
        }
        let applied = self.raw.raft.raft_log.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.confirmed_reads)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.confirmed_reads = waiting;
        for (index, reply) in ready {
            let _ = reply.send(Ok(index));
        }
    }

    fn transfer_leader(&mut self, to: u64) -> Result<(), CoordinatorError> {
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader {
            return Err(CoordinatorError::NotLeader {
                leader_id: raft.leader_id,
            });
        }
        if !raft.prs().conf().voters().ids().contains(to) {
            return Err(CoordinatorError::invalid(
                "member_id",
                format!("{to} is not a voting member of this cluster"),
            ));
        }
        if to == raft.id {
            return Err(CoordinatorError::invalid(
                "member_id",
                format!("member {to} already leads"),
            ));
        }
        self.raw.transfer_leader(to);
        info!(to, "Handing leadership over.");
        Ok(())
    }

    fn propose(&mut self, proposal: Proposal) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = proposal.reply.send(Err(CoordinatorError::NotLeader {
                leader_id: self.raw.raft.leader_id,
            }));
            return;
        }
        let Proposal { mut command, reply } = proposal;
        let data = {
            let state = self
                .state
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // The leader plans a rollback or judges a trigger here, on the state it has applied;
            // `apply()` checks that state has not moved by the time the entry applies.
            command.choose_audit_seed(state.cluster_version());
            // A member of an older release could not decode a newer kind: never proposed.
            version::proposable(&state, &command.kind)
                .and_then(|()| decision::prepare(&state, &mut command))
                .and_then(|()| version::encode_entry(&command, state.cluster_version()))
        };
        let data = match data {
            Ok(data) => data,
            Err(error) => {
                let _ = reply.send(Err(error));
                return;
            }
        };
        let proposal = Proposal { command, reply };
        let (number, context) = self.next_proposal_context();
        match self.raw.propose(context, data) {
            Ok(()) => {
                self.pending.insert(number, proposal.reply);
            }
            Err(error) => {
                let _ = proposal
                    .reply
                    .send(Err(CoordinatorError::Overloaded(format!(
                        "raft refused the proposal: {error}"
                    ))));
            }
        }
    }

    /// Proposes a conf change carrying `proposal.command` (a `ChangeMembership`). One change at
    /// a time: raft-rs would silently turn a second pending one into an empty entry.
    fn propose_membership(&mut self, mut proposal: Proposal) {
        let refuse = |proposal: Proposal, error: CoordinatorError| {
            let _ = proposal.reply.send(Err(error));
        };
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader {
            let leader_id = raft.leader_id;
            return refuse(proposal, CoordinatorError::NotLeader { leader_id });
        }
        let (change, member_id) = match &proposal.command.kind {
            CommandKind::ChangeMembership { change, member, .. } => (*change, member.id),
            other => {
                let action = other.action();
                return refuse(
                    proposal,
                    CoordinatorError::invalid(
                        "command",
                        format!("{action} is not a membership change"),
                    ),
                );
            }
        };
        if raft.has_pending_conf() {
            // A new leader counts its whole unapplied log as a possible conf change.
            let reason = if raft.raft_log.applied < raft.raft_log.committed {
                "this member has just been elected and is still applying its log; retry shortly"
            } else {
                "another membership change is still being applied; retry when it is"
            };
            return refuse(
                proposal,
                CoordinatorError::MembershipConflict(reason.into()),
            );
        }
        if change == MembershipChange::Remove && member_id == raft.id {
            return refuse(
                proposal,
                CoordinatorError::invalid(
                    "member_id",
                    format!(
                        "member {member_id} leads; hand leadership over first (cluster transfer-leader)"
                    ),
                ),
            );
        }
        let mut conf_change = ConfChange {
            change_type: match change {
                MembershipChange::AddLearner => ConfChangeType::AddLearnerNode,
                MembershipChange::Promote => ConfChangeType::AddNode,
                MembershipChange::Remove => ConfChangeType::RemoveNode,
            },
            node_id: member_id,
            ..ConfChange::default()
        };
        proposal.command.choose_audit_seed(self.cluster_version());
        match version::encode_entry(&proposal.command, self.cluster_version()) {
            Ok(context) => conf_change.context = context.into(),
            Err(error) => return refuse(proposal, error),
        }
        let (number, context) = self.next_proposal_context();
        match self.raw.propose_conf_change(context, conf_change) {
            Ok(()) => {
                self.pending.insert(number, proposal.reply);
            }
            Err(error) => refuse(
                proposal,
                CoordinatorError::MembershipConflict(format!(
                    "raft refused the membership change: {error}"
                )),
            ),
        }
    }

    /// One `Ready`, in raft-rs's documented order.
    fn handle_ready(&mut self) -> Result<(), CoordinatorError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone())?;
        }
        self.apply_committed(ready.take_committed_entries())?;
        let read_states = ready.take_read_states();
        // Flush only what promises depend on: new entries, and a new term or vote. A commit
        // index alone is learned again from the leader after a crash.
        let mut must_sync = !ready.entries().is_empty();
        if let Some(hard_state) = ready.hs() {
            must_sync |= (hard_state.term, hard_state.vote) != self.flushed_term_and_vote;
        }
        must_sync |= !ready.persisted_messages().is_empty();
        // The entries and the hard state: one write, one fdatasync.
        self.store.persist(ready.entries(), ready.hs(), must_sync)?;
        if let Some(hard_state) = ready.hs() {
            self.flushed_term_and_vote = (hard_state.term, hard_state.vote);
        }
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            // Recorded but not flushed on its own: a commit index lost in a crash is learned
            // again from the leader, and nothing is acknowledged on the strength of it (the
            // entries themselves were flushed above, on a majority).
            let mut hard_state = self.store.hard_state()?;
            hard_state.commit = commit;
            self.store.set_hard_state(&hard_state)?;
        }
        self.transport.send(light.take_messages());
        self.apply_committed(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.settle_reads(&read_states);
        self.maybe_snapshot()
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<(), CoordinatorError> {
        // A bundle (cluster version 7 on) carries the audit entries, and from version 8 the
        // archive, beside the state: they go to their store, and the state's data alone is kept
        // as the snapshot.
        let (state_data, bundled) = snapshot_codec::split_bundle(snapshot.get_data())?;
        let mut state = snapshot_codec::decode(state_data)?;
        let mut kept = Snapshot::default();
        kept.set_metadata(snapshot.get_metadata().clone());
        kept.set_data(state_data.to_vec().into());
        let index = snapshot.get_metadata().index;
        self.store.apply_snapshot(&kept, bundled.as_ref())?;
        self.store.flush()?;
        state.audit.attach(audit_store(&self.store));
        *self
            .state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = state;
        self.last_snapshot = index;
        self.installed_snapshots += 1;
        self.applied.send_replace(index);
        info!(index, "Installed a snapshot from the leader.");
        Ok(())
    }

    fn apply_committed(&mut self, entries: Vec<Entry>) -> Result<(), CoordinatorError> {
        let Some(last) = entries.last().map(|entry| entry.index) else {
            return Ok(());
        };
        let mut entries = entries.into_iter().peekable();
        while let Some(entry) = entries.next() {
            if entry.get_entry_type() != EntryType::EntryNormal {
                self.apply_conf_change(&entry)?;
                continue;
            }
            // A run of normal entries is applied under one write lock: taken per entry, each
            // would wait for the readers in between (a large fleet's engine, watches, reads),
            // and a batch of a thousand would keep this thread, and its heartbeats, that long.
            // At most MAX_APPLY_RUN at once: a member catching up applies thousands of
            // entries in one Ready, and readers (and the runtime's workers waiting on them)
            // get in between runs.
            let mut run = vec![entry];
            while run.len() < MAX_APPLY_RUN
                && let Some(next) =
                    entries.next_if(|next| next.get_entry_type() == EntryType::EntryNormal)
            {
                run.push(next);
            }
            let mut answers = Vec::with_capacity(run.len());
            let applied = {
                let mut state = self
                    .state
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                run.iter().try_for_each(|entry| {
                    let outcome = apply_normal(&mut state, entry)?;
                    answers.push((&entry.context, outcome));
                    Ok::<_, CoordinatorError>(())
                })
            };
            // Those applied before a failure are answered all the same.
            for (context, outcome) in answers {
                self.answer(context, outcome);
            }
            applied?;
        }
        self.applied.send_replace(last);
        Ok(())
    }

    fn cluster_version(&self) -> u32 {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .cluster_version()
    }

    /// Answers the caller waiting on this entry, if this member proposed it.
    fn answer(&mut self, entry_context: &[u8], outcome: Result<Outcome, CoordinatorError>) {
        if let Some(reply) = own_proposal(self.settings.id, entry_context)
            .and_then(|number| self.pending.remove(&number))
        {
            let _ = reply.send(outcome);
        }
    }

    /// The entry context for this member's next proposal, and its number.
    fn next_proposal_context(&mut self) -> (u64, Vec<u8>) {
        self.next_proposal += 1;
        (
            self.next_proposal,
            proposal_context(self.settings.id, self.next_proposal),
        )
    }

    fn apply_conf_change(&mut self, entry: &Entry) -> Result<(), CoordinatorError> {
        let (change, registry_context) =
            if entry.get_entry_type() == EntryType::EntryConfChangeV2 {
                ConfChangeV2::parse_from_bytes(&entry.data).map(|change| {
                    let context = change.context.to_vec();
                    (change, context)
                })
            } else {
                ConfChange::parse_from_bytes(&entry.data).map(|change| {
                    let context = change.context.to_vec();
                    (raft_proto::ConfChangeI::into_v2(change), context)
                })
            }
            .map_err(|error| {
                CoordinatorError::Storage(format!("decode conf change {}: {error}", entry.index))
            })?;
        // Read before Raft's voters change: a member that cannot read it stops before either.
        let decoded = version::decode_entry(entry.index, &registry_context)?;
        let conf_state = self.raw.apply_conf_change(&change).map_err(|error| {
            CoordinatorError::Raft(format!("apply conf change {}: {error}", entry.index))
        })?;
        self.store.set_conf_state(&conf_state)?;
        // Durable now: the store is flushed only when asked (sled's own flusher is off).
        self.store.flush()?;
        let outcome = {
            let mut state = self
                .state
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match decoded {
                Decoded::Command(command) => {
                    let outcome = apply_membership(&mut state, entry.index, &command);
                    audited(&state, entry.index)?;
                    outcome
                }
                Decoded::SkipLegacy(error) => {
                    // Raft's voters changed regardless; every member skips the same context.
                    state.applied_index = entry.index;
                    warn!(%error, index = entry.index, "A conf change carried no membership command.");
                    Err(CoordinatorError::Storage(format!(
                        "conf change {} carries no membership command: {error}",
                        entry.index
                    )))
                }
            }
        };
        self.answer(&entry.context, outcome);
        self.snapshot_due = true;
        info!(index = entry.index, voters = ?conf_state.voters, learners = ?conf_state.learners, "Membership changed.");
        Ok(())
    }

    fn maybe_snapshot(&mut self) -> Result<(), CoordinatorError> {
        if self
            .snapshot_in_progress
            .as_ref()
            .is_some_and(|(_, thread)| thread.is_finished())
        {
            self.finish_snapshot()?;
        }
        let applied = self.raw.raft.raft_log.applied;
        if self.snapshot_due && applied > self.last_snapshot {
            // A membership change: the snapshot a joining member is sent must count it, so it
            // is taken now, before this Ready's messages lead to one being sent.
            self.snapshot_due = false;
            self.finish_snapshot()?;
            let data = snapshot_codec::encode(
                &self
                    .state
                    .read()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            )?;
            let conf_state = self.raw.raft.prs().conf().to_conf_state();
            self.store.compact(applied, &conf_state, data)?;
            self.last_snapshot = applied;
            return Ok(());
        }
        if self.snapshot_in_progress.is_some()
            || applied.saturating_sub(self.last_snapshot) < self.settings.snapshot_every
        {
            return Ok(());
        }
        // A copy of the state is cheap next to encoding and writing it, which happen on their
        // own thread while this one goes on committing.
        let copying = std::time::Instant::now();
        let state = self
            .state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        debug!(
            applied,
            copy_ms = copying.elapsed().as_millis() as u64,
            "Copied the state for a snapshot."
        );
        let conf_state = self.raw.raft.prs().conf().to_conf_state();
        let store = self.store.clone();
        let thread = std::thread::Builder::new()
            .name(format!("rewind-snapshot-{}", self.settings.id))
            .spawn(move || {
                let started = std::time::Instant::now();
                let data = snapshot_codec::encode(&state)?;
                let bytes = data.len();
                store.compact(applied, &conf_state, data)?;
                // The snapshot is on disk: what it pruned is never read again. Only a clean-up:
                // on failure the entries go at the next snapshot.
                if let Err(error) = state.audit.drop_pruned() {
                    warn!(%error, "Pruned audit entries stay until the next snapshot.");
                }
                debug!(
                    applied,
                    bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "Took a snapshot and compacted the log."
                );
                Ok(())
            })
            .map_err(|error| {
                CoordinatorError::Internal(format!("spawn the snapshot thread: {error}"))
            })?;
        self.snapshot_in_progress = Some((applied, thread));
        Ok(())
    }

    /// Waits for the snapshot being written, if any; its failure is a storage failure.
    fn finish_snapshot(&mut self) -> Result<(), CoordinatorError> {
        let Some((index, thread)) = self.snapshot_in_progress.take() else {
            return Ok(());
        };
        match thread.join() {
            Ok(Ok(())) => {
                self.last_snapshot = self.last_snapshot.max(index);
                Ok(())
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(CoordinatorError::Internal(
                "the snapshot thread panicked".into(),
            )),
        }
    }

    fn publish_status(&mut self) {
        let raft = &self.raw.raft;
        // A new leader serves nothing until an entry of its own term is committed and everything
        // committed is applied here: before that its state may miss writes a past leader
        // acknowledged.
        let is_leader = raft.state == StateRole::Leader
            && raft.commit_to_current_term()
            && raft.raft_log.applied >= raft.raft_log.committed;
        if raft.state != StateRole::Leader
            && !(self.pending.is_empty() && self.pending_reads.is_empty())
        {
            // They may still commit under the new leader; a retry with the same request id is
            // answered from the request log and does not act twice.
            let leader_id = raft.leader_id;
            self.fail_pending(|| CoordinatorError::NotLeader { leader_id });
        }
        let raft = &self.raw.raft;
        self.term.store(raft.term, Ordering::Release);
        let status = RaftStatus {
            id: self.settings.id,
            leader_id: raft.leader_id,
            term: raft.term,
            is_leader,
            applied_index: raft.raft_log.applied,
            commit_index: raft.raft_log.committed,
            installed_snapshots: self.installed_snapshots,
            last_index: raft.raft_log.last_index(),
            peers: if raft.state == StateRole::Leader {
                peer_progress(raft)
            } else {
                Vec::new()
            },
            storage_failed: None,
            cannot_apply: None,
        };
        self.watch_for_stuck_followers(&status);
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }

    /// Logs, at ERROR and once per episode, a follower that has been behind without making
    /// progress for [`STUCK_FOLLOWER_AFTER`]; and at INFO when it moves again.
    fn watch_for_stuck_followers(&mut self, status: &RaftStatus) {
        let now = std::time::Instant::now();
        self.stuck_watch
            .retain(|id, _| status.peers.iter().any(|peer| peer.id == *id));
        for peer in status.peers.iter().filter(|peer| peer.id != status.id) {
            let watch = self.stuck_watch.entry(peer.id).or_insert(StuckWatch {
                matched_index: peer.matched_index,
                since: now,
                reported: false,
            });
            let behind = peer.matched_index < status.last_index;
            if peer.matched_index != watch.matched_index || !behind {
                if watch.reported {
                    info!(
                        peer = peer.id,
                        matched_index = peer.matched_index,
                        "A follower that was stuck makes progress again."
                    );
                }
                *watch = StuckWatch {
                    matched_index: peer.matched_index,
                    since: now,
                    reported: false,
                };
            } else if !watch.reported && now.duration_since(watch.since) >= STUCK_FOLLOWER_AFTER {
                watch.reported = true;
                error!(
                    peer = peer.id,
                    matched_index = peer.matched_index,
                    last_index = status.last_index,
                    snapshot_in_flight = peer.snapshot_in_flight,
                    stuck_s = STUCK_FOLLOWER_AFTER.as_secs(),
                    "A follower has not caught up for a minute: it is down, cut off, or cannot take what it is sent. The cluster has lost a member's redundancy; check it."
                );
            }
        }
    }

    /// Fails proposals and unconfirmed reads waiting on this member.
    fn fail_pending(&mut self, error: impl Fn() -> CoordinatorError) {
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(error()));
        }
        for (_, reply) in self.pending_reads.drain() {
            let _ = reply.send(Err(error()));
        }
    }
}

struct StuckWatch {
    matched_index: u64,
    since: std::time::Instant,
    reported: bool,
}

fn peer_progress(raft: &raft::Raft<RaftStore>) -> Vec<PeerProgress> {
    let learners = raft.prs().conf().learners().clone();
    let mut peers: Vec<PeerProgress> = raft
        .prs()
        .iter()
        .map(|(&id, progress)| PeerProgress {
            id,
            matched_index: progress.matched,
            recently_active: progress.recent_active || id == raft.id,
            is_learner: learners.contains(&id),
            snapshot_in_flight: progress.state == ProgressState::Snapshot,
        })
        .collect();
    peers.sort_by_key(|peer| peer.id);
    peers
}

/// This member's audit store, as the state carries it.
fn audit_store(store: &RaftStore) -> crate::state_machine::StoreHandle {
    crate::state_machine::StoreHandle(Arc::new(store.audit_store()))
}

/// Fails closed: an entry whose audit could not be written stops this member, under the
/// state's write lock, before it answers the proposer or anyone reads the state (reads of a
/// failed state refuse, see `NodeHandle::read`). The process exits on the storage failure and,
/// restarted, applies the entry again with its audit.
fn audited(state: &State, index: u64) -> Result<(), CoordinatorError> {
    match state.audit.failure() {
        None => Ok(()),
        Some(why) => Err(CoordinatorError::Storage(format!(
            "entry {index} cannot be audited ({why}); nothing acts on it unaudited"
        ))),
    }
}

/// Entry context: the proposing member and its proposal number, so only that member answers.
fn proposal_context(member: u64, number: u64) -> Vec<u8> {
    let mut context = member.to_be_bytes().to_vec();
    context.extend_from_slice(&number.to_be_bytes());
    context
}

fn own_proposal(member: u64, context: &[u8]) -> Option<u64> {
    let (proposer, number) = context.split_at_checked(8)?;
    (u64::from_be_bytes(proposer.try_into().ok()?) == member)
        .then_some(u64::from_be_bytes(number.try_into().ok()?))
}

/// Applies a normal entry to `state` and returns its outcome (a new leader's empty entry is
/// applied as done; nobody waits on it). One this binary cannot read (written at a newer cluster
/// version) is an error: the member stops rather than skip it and drift from the others.
fn apply_normal(
    state: &mut State,
    entry: &Entry,
) -> Result<Result<Outcome, CoordinatorError>, CoordinatorError> {
    if entry.data.is_empty() {
        // A new leader's empty entry: nothing to apply, but it is applied.
        state.applied_index = entry.index;
        return Ok(Ok(Outcome::Done));
    }
    Ok(match version::decode_entry(entry.index, &entry.data)? {
        Decoded::Command(command) => {
            version::check_command(&command, entry.index)?;
            let outcome = apply(state, entry.index, &command);
            audited(state, entry.index)?;
            outcome
        }
        Decoded::SkipLegacy(error) => {
            // Members of the legacy release skipped such an entry; so does this one.
            state.applied_index = entry.index;
            warn!(%error, index = entry.index, "Skipped a committed entry that does not decode.");
            Err(CoordinatorError::Storage(format!(
                "entry {} does not decode: {error}",
                entry.index
            )))
        }
    })
}

#[cfg(test)]
#[path = "raft_test.rs"]
mod tests;
