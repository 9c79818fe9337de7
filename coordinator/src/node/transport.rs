//! Raft messages to peers over gRPC (`RaftService`), with mutual TLS.
//!
//! Two tasks per peer. One drains a bounded queue of ordinary messages into batches (bounded in
//! count and bytes) and sends them on one long-lived `DeliverStream` to the peer, at most
//! [`STREAM_WINDOW`] batches queued on it; to a member of an earlier release, which does not
//! know the stream, one `Deliver` call per batch. A batch that cannot be delivered is dropped
//! (as are those queued on a stream that fails), Raft retransmits what matters, and the peer is
//! reported unreachable so raft-rs probes it again instead of sending to it blindly. A full
//! queue drops new messages the same way, so a dead peer costs bounded memory. When a stream is
//! replaced, batches still queued on the old one may arrive after the new one's first: Raft
//! takes messages lost, repeated or out of order.
//!
//! The other streams state snapshots (`SendSnapshot`) over a connection of its own, in chunks,
//! so a snapshot of any size reaches a member that missed a compaction without holding up the
//! heartbeats. raft-rs's `MsgSnapshot` carries only the snapshot's metadata (see
//! `RaftStore::snapshot`); this task reads the data from the snapshot's file, hashes it and
//! streams it, so neither the Raft thread nor a queue ever holds it. A peer has one snapshot
//! slot: a newer `MsgSnapshot` replaces one not yet sent. At most
//! [`MAX_CONCURRENT_SNAPSHOT_SENDS`] run at once on this member. Every send ends with a report
//! to raft-rs (`Finish` or `Failure`, naming the snapshot's index): raft-rs sends a peer nothing
//! else until it hears, so a send that failed unreported would lose the member for good. After
//! a failure the next send to that peer waits (1 s, doubling to a minute). Failures are logged
//! at WARN once per episode, with the peer and the reason.
//!
//! Peers follow the replicated member registry (see `crate::membership`), so members added or
//! removed at runtime are reached.

use std::collections::HashMap;
use std::io::{Read as _, Seek as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use rewind_proto::v1::{
    RaftBatch, SnapshotChunk, SnapshotHeader, raft_service_client::RaftServiceClient,
};
use rewind_proto::{MAX_RAFT_BATCH_BYTES, MAX_SNAPSHOT_BYTES, SNAPSHOT_CHUNK_BYTES};
use rewind_shared::member_tls::MemberConnector;
use rewind_shared::tls::TlsFiles;
use sha2::Digest as _;
use tokio::io::AsyncReadExt as _;
use tokio::sync::{Semaphore, mpsc, watch};
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use super::PeerReport;
use super::raft::Transport;
use crate::storage::SnapshotFiles;

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Most messages in one delivery.
const MAX_BATCH: usize = 256;
/// Most bytes of messages in one delivery: a batch is cut before it would pass this (a single
/// message larger than this goes alone). Under the 4 MiB that members of earlier versions take.
const MAX_BATCH_BYTES: usize = 3 * 1024 * 1024;
/// Batches queued on a peer's stream before the sender waits for it to take them.
const STREAM_WINDOW: usize = 16;
/// A stream open this long (and still open) counts as delivering: only then does a failure
/// episode end.
const STREAM_PROVEN_AFTER: Duration = Duration::from_secs(1);
/// Longest wait for a peer to answer a batch, take a stream, or take a queued batch from it.
const UNARY_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer that did not know `DeliverStream` is asked again this long after (it may have been
/// upgraded).
const STREAM_PROBE_EVERY: Duration = Duration::from_secs(60);
/// HTTP/2 pings on a peer's message connection, and how long an answer may take before the
/// connection is given up (its stream fails, and the sender reconnects).
const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed delivery, so a dead peer is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Snapshots being sent at once by this member, to all peers together: each holds the whole
/// snapshot in memory and a share of the bandwidth.
pub const MAX_CONCURRENT_SNAPSHOT_SENDS: usize = 2;
/// Wait before the next snapshot to a peer after one failed, doubled after each failure.
const SNAPSHOT_RETRY: rewind_shared::backoff::Backoff = rewind_shared::backoff::Backoff {
    first: Duration::from_secs(1),
    max: Duration::from_secs(60),
    jitter: false,
};
/// A snapshot send may take this long, plus a second per MiB (a floor of 1 MiB/s).
const SNAPSHOT_SEND_BASE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub id: u64,
    pub address: String,
}

/// Cheap to clone: the Raft thread sends through one clone, the membership follower updates
/// the peers through another.
#[derive(Clone)]
pub struct GrpcTransport {
    routes: Arc<Mutex<Routes>>,
}

/// This member's TLS files, and whether peers' certificates without a kind are accepted (the
/// compatibility switch).
#[derive(Clone, Debug)]
pub struct PeerTls {
    pub files: TlsFiles,
    pub accept_legacy: bool,
}

struct Routes {
    runtime: tokio::runtime::Handle,
    tls: PeerTls,
    cluster_id: String,
    own_id: u64,
    /// Peer id -> its address and the queues its sender tasks drain.
    peers: HashMap<u64, PeerRoute>,
    reports: mpsc::Sender<PeerReport>,
    snapshot_slots: Arc<Semaphore>,
    snapshot_files: SnapshotFiles,
    stats: Arc<SnapshotStats>,
}

struct PeerRoute {
    address: String,
    messages: mpsc::Sender<Message>,
    /// The latest `MsgSnapshot` for this peer (metadata only): a newer one replaces one not
    /// yet sent. Dropping the route ends its sender task.
    snapshot: watch::Sender<Option<Message>>,
}

/// Snapshots sent and received by this member, and the batches of messages it sent, for
/// `/metrics`. The metric handles are shared, so a scrape registers clones of them.
#[derive(Debug)]
pub struct SnapshotStats {
    /// Batches of Raft messages sent, by how (`stream`, `unary`) or `failed`.
    pub message_batches: Family<OutcomeLabels, Counter>,
    pub sends: Family<OutcomeLabels, Counter>,
    pub sent_bytes: Counter,
    pub send_seconds: Histogram,
    pub receives: Family<OutcomeLabels, Counter>,
    pub received_bytes: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

impl Default for SnapshotStats {
    fn default() -> Self {
        Self {
            message_batches: Family::default(),
            sends: Family::default(),
            sent_bytes: Counter::default(),
            // 0.05 s to about 14 minutes.
            send_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.05, 2.0, 15),
            ),
            receives: Family::default(),
            received_bytes: Counter::default(),
        }
    }
}

impl SnapshotStats {
    pub fn outcome(family: &Family<OutcomeLabels, Counter>, outcome: &str) {
        family
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }
}

impl GrpcTransport {
    /// A transport with no peers yet; see [`Self::set_peers`]. What it learns about peers goes
    /// to `reports`, which the Raft member reads.
    pub fn new(
        runtime: tokio::runtime::Handle,
        tls: PeerTls,
        cluster_id: String,
        own_id: u64,
        reports: mpsc::Sender<PeerReport>,
        snapshot_files: SnapshotFiles,
        stats: Arc<SnapshotStats>,
    ) -> Self {
        Self {
            routes: Arc::new(Mutex::new(Routes {
                runtime,
                tls,
                cluster_id,
                own_id,
                peers: HashMap::new(),
                reports,
                snapshot_slots: Arc::new(Semaphore::new(MAX_CONCURRENT_SNAPSHOT_SENDS)),
                snapshot_files,
                stats,
            })),
        }
    }

    /// Makes `peers` the members messages go to: starts sender tasks per new peer (or per
    /// changed address) and ends those of peers no longer listed. Each peer's certificate must
    /// name the host of its address; a peer whose TLS settings cannot be built is skipped with
    /// a warning (and retried on the next call).
    pub fn set_peers(&self, peers: &[Peer]) {
        let mut routes = self
            .routes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let own_id = routes.own_id;
        // The channels made below start their connection tasks on the transport's runtime.
        let runtime = routes.runtime.clone();
        let _on_runtime = runtime.enter();
        routes.peers.retain(|id, route| {
            peers
                .iter()
                .any(|peer| peer.id == *id && peer.address == route.address)
        });
        for peer in peers.iter().filter(|peer| peer.id != own_id) {
            if routes.peers.contains_key(&peer.id) {
                continue;
            }
            let endpoint = match endpoint(&routes.tls, peer) {
                Ok(endpoint) => endpoint,
                Err(error) => {
                    warn!(%error, peer = peer.id, address = %peer.address, "Cannot set up a route to a Raft peer.");
                    continue;
                }
            };
            let (messages, message_queue) = mpsc::channel(PEER_QUEUE);
            let (snapshot, snapshot_slot) = watch::channel(None);
            routes.peers.insert(
                peer.id,
                PeerRoute {
                    address: peer.address.clone(),
                    messages,
                    snapshot,
                },
            );
            info!(peer = peer.id, address = %peer.address, "Raft peer route set.");
            let sender = PeerSender {
                peer: peer.clone(),
                cluster_id: routes.cluster_id.clone(),
                own_id,
                reports: routes.reports.clone(),
                stats: Arc::clone(&routes.stats),
            };
            routes.runtime.spawn(
                sender.clone().deliver(
                    // Lazy: the first delivery connects, and a failed connection is retried.
                    endpoint
                        .messages
                        .connect_with_connector_lazy(endpoint.connector.clone()),
                    message_queue,
                ),
            );
            routes.runtime.spawn(
                sender.send_snapshots(
                    // A connection of its own, so a long transfer does not hold up heartbeats.
                    endpoint
                        .snapshots
                        .connect_with_connector_lazy(endpoint.connector),
                    snapshot_slot,
                    SnapshotSending {
                        slots: Arc::clone(&routes.snapshot_slots),
                        files: routes.snapshot_files.clone(),
                        stats: Arc::clone(&routes.stats),
                    },
                ),
            );
        }
    }

    /// This member's id (never a peer of itself).
    pub fn own_id(&self) -> u64 {
        self.routes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .own_id
    }

    /// The peers messages go to now, by id.
    pub fn peers(&self) -> Vec<Peer> {
        let routes = self
            .routes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut peers: Vec<Peer> = routes
            .peers
            .iter()
            .map(|(id, route)| Peer {
                id: *id,
                address: route.address.clone(),
            })
            .collect();
        peers.sort_by_key(|peer| peer.id);
        peers
    }
}

impl Transport for GrpcTransport {
    fn send(&self, messages: Vec<Message>) {
        let routes = self
            .routes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for message in messages {
            let to = message.to;
            if message.get_msg_type() == MessageType::MsgSnapshot {
                match routes.peers.get(&to) {
                    Some(route) => {
                        route.snapshot.send_replace(Some(message));
                    }
                    None => {
                        // raft-rs waits for every snapshot's outcome: one that never leaves
                        // must be reported too, or the peer is never sent another. Reported
                        // from a task, which waits for room rather than drop it.
                        warn!(peer = to, "No route to a peer that needs a snapshot.");
                        let reports = routes.reports.clone();
                        let index = message.get_snapshot().get_metadata().index;
                        routes.runtime.spawn(async move {
                            let failed = PeerReport::Snapshot {
                                peer: to,
                                index,
                                delivered: false,
                            };
                            let _ = reports.send(failed).await;
                        });
                    }
                }
                continue;
            }
            let queued = routes
                .peers
                .get(&to)
                .is_some_and(|route| route.messages.try_send(message).is_ok());
            if !queued {
                debug!(
                    to,
                    "No route to a Raft peer, or its queue is full; dropped a message."
                );
            }
        }
    }
}

/// How to reach a peer: its address, and TLS that accepts only that member's certificate (read
/// again on each connection, so renewed certificates are used without a restart).
struct PeerEndpoint {
    messages: Endpoint,
    snapshots: Endpoint,
    connector: MemberConnector,
}

fn endpoint(tls: &PeerTls, peer: &Peer) -> Result<PeerEndpoint, String> {
    let connector = MemberConnector::for_member(&tls.files, peer.id, tls.accept_legacy)
        .map_err(|error| error.to_string())?;
    let snapshots = Endpoint::from_shared(format!("http://{}", peer.address))
        .map(|endpoint| endpoint.connect_timeout(Duration::from_secs(2)))
        .map_err(|error| error.to_string())?;
    Ok(PeerEndpoint {
        // No timeout on the channel: each call bounds its own wait (a channel-wide one would
        // bound only a stream's opening, not the batches after), and pings find a connection
        // that went silent under a stream.
        messages: snapshots
            .clone()
            .http2_keep_alive_interval(KEEPALIVE_EVERY)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true),
        snapshots,
        connector,
    })
}

/// What every snapshot send of this member shares.
struct SnapshotSending {
    slots: Arc<Semaphore>,
    files: SnapshotFiles,
    stats: Arc<SnapshotStats>,
}

/// What a peer's sender tasks share.
#[derive(Clone)]
struct PeerSender {
    peer: Peer,
    cluster_id: String,
    own_id: u64,
    reports: mpsc::Sender<PeerReport>,
    stats: Arc<SnapshotStats>,
}

impl PeerSender {
    /// Sends the peer's queued messages in batches, over one long-lived `DeliverStream` while
    /// the peer takes it, batch by batch with `Deliver` to a member of an earlier release.
    async fn deliver(self, channel: Channel, mut queue: mpsc::Receiver<Message>) {
        let mut client = RaftServiceClient::new(channel)
            .max_decoding_message_size(MAX_RAFT_BATCH_BYTES)
            .max_encoding_message_size(MAX_RAFT_BATCH_BYTES);
        let mut episode = FailureEpisode::default();
        let mut next = None;
        let mut stream: Option<OpenStream> = None;
        // Set while the peer does not know DeliverStream: batch by batch until then.
        let mut unary_until: Option<Instant> = None;
        while let Some(batch) = self.next_batch(&mut queue, &mut next).await {
            if unary_until.is_some_and(|until| Instant::now() < until) {
                self.deliver_unary(&mut client, batch, &mut episode).await;
                continue;
            }
            // A stream the peer ended cleanly (idle, or the peer stopping) hands the batch back
            // and is reopened at once, once; a new stream ended at once is a failure.
            let mut pending = Some(batch);
            for _ in 0..2 {
                let Some(batch) = pending.take() else { break };
                if stream.is_none() {
                    match OpenStream::open(&mut client).await {
                        Ok(opened) => {
                            unary_until = None;
                            stream = Some(opened);
                        }
                        Err(status) if status.code() == tonic::Code::Unimplemented => {
                            if unary_until.is_none() {
                                info!(
                                    peer = self.peer.id,
                                    "The peer does not take a stream of Raft messages (an earlier release); delivering batch by batch."
                                );
                            }
                            unary_until = Some(Instant::now() + STREAM_PROBE_EVERY);
                            self.deliver_unary(&mut client, batch, &mut episode).await;
                            break;
                        }
                        Err(status) => {
                            self.failed(&mut episode, &status.to_string()).await;
                            break;
                        }
                    }
                }
                let Some(open) = stream.as_mut() else { break };
                match open.send(batch).await {
                    Ok(()) => {
                        self.count("stream");
                        if open.proven() {
                            episode
                                .ended(&self.peer, "Raft messages are delivered to a peer again.");
                        }
                    }
                    Err(StreamEnded::Cleanly(returned)) => {
                        let young = open.opened_at.elapsed() < STREAM_PROVEN_AFTER;
                        stream = None;
                        if young {
                            self.failed(&mut episode, "the peer ended a new stream at once")
                                .await;
                        } else {
                            pending = returned;
                        }
                    }
                    Err(StreamEnded::Failed(reason)) => {
                        stream = None;
                        self.failed(&mut episode, &reason).await;
                    }
                }
            }
        }
    }

    /// One batch by `Deliver`, for a peer of an earlier release.
    async fn deliver_unary(
        &self,
        client: &mut RaftServiceClient<Channel>,
        batch: RaftBatch,
        episode: &mut FailureEpisode,
    ) {
        match tokio::time::timeout(UNARY_TIMEOUT, client.deliver(batch)).await {
            Ok(Ok(_)) => {
                self.count("unary");
                episode.ended(&self.peer, "Raft messages are delivered to a peer again.");
            }
            Ok(Err(status)) => self.failed(episode, &status.to_string()).await,
            Err(_) => {
                let reason = format!("no answer within {} s", UNARY_TIMEOUT.as_secs());
                self.failed(episode, &reason).await
            }
        }
    }

    /// The next batch from the queue (`None` once the route is gone): the first message waited
    /// for, then whatever else is queued, up to [`MAX_BATCH`] messages and [`MAX_BATCH_BYTES`].
    /// A message that would pass the byte bound is left in `next`, to start the next batch.
    async fn next_batch(
        &self,
        queue: &mut mpsc::Receiver<Message>,
        next: &mut Option<Message>,
    ) -> Option<RaftBatch> {
        let first = match next.take() {
            Some(message) => message,
            None => queue.recv().await?,
        };
        let mut encoded = Vec::new();
        let mut bytes = 0;
        let mut candidate = Some(first);
        while let Some(message) = candidate.take() {
            if let Ok(message_bytes) = message.write_to_bytes() {
                if !encoded.is_empty() && bytes + message_bytes.len() > MAX_BATCH_BYTES {
                    *next = Some(message);
                    break;
                }
                bytes += message_bytes.len();
                encoded.push(message_bytes);
            }
            if encoded.len() < MAX_BATCH {
                candidate = queue.try_recv().ok();
            }
        }
        Some(RaftBatch {
            cluster_id: self.cluster_id.clone(),
            from_member: self.own_id,
            messages: encoded,
        })
    }

    fn count(&self, outcome: &str) {
        SnapshotStats::outcome(&self.stats.message_batches, outcome);
    }

    /// A batch was lost: logged once per episode, the peer reported unreachable (so raft-rs
    /// probes it rather than stream to it blindly), and a pause before the next attempt.
    async fn failed(&self, episode: &mut FailureEpisode, reason: &str) {
        self.count("failed");
        episode.failed(&self.peer, "deliver Raft messages", reason);
        // Dropping the report when the queue is full is harmless: the next failure reports again.
        let _ = self
            .reports
            .try_send(PeerReport::Unreachable { peer: self.peer.id });
        tokio::time::sleep(RETRY_PAUSE).await;
    }

    async fn send_snapshots(
        self,
        channel: Channel,
        mut slot: watch::Receiver<Option<Message>>,
        sending: SnapshotSending,
    ) {
        let mut client = RaftServiceClient::new(channel)
            .max_decoding_message_size(MAX_RAFT_BATCH_BYTES)
            .max_encoding_message_size(SNAPSHOT_CHUNK_BYTES + 64 * 1024);
        let mut episode = FailureEpisode::default();
        let mut failures = 0;
        let mut not_before = tokio::time::Instant::now();
        // Ends when the route is dropped (the peer left the registry or moved).
        while slot.changed().await.is_ok() {
            // raft-rs waits for this snapshot's report, so waiting here is what bounds the
            // rate of retries to a peer that keeps failing.
            tokio::time::sleep_until(not_before).await;
            let Ok(_slot) = sending.slots.acquire().await else {
                return;
            };
            // The latest: one queued while this task waited replaces the older.
            let Some(message) = slot.borrow_and_update().clone() else {
                continue;
            };
            let index = message.get_snapshot().get_metadata().index;
            let started = Instant::now();
            let sent = self
                .stream_snapshot(&mut client, message, &sending.files)
                .await;
            let seconds = started.elapsed().as_secs_f64();
            let stats = &sending.stats;
            stats.send_seconds.observe(seconds);
            let delivered = sent.is_ok();
            match sent {
                Ok(bytes) => {
                    SnapshotStats::outcome(&stats.sends, "sent");
                    stats.sent_bytes.inc_by(bytes);
                    failures = 0;
                    episode.ended(&self.peer, "Snapshots reach a peer again.");
                    info!(
                        peer = self.peer.id,
                        index,
                        bytes,
                        ms = (seconds * 1000.0) as u64,
                        "Sent a snapshot."
                    );
                }
                Err(reason) => {
                    SnapshotStats::outcome(&stats.sends, "failed");
                    episode.failed(&self.peer, "send a snapshot", &reason);
                    let retry_wait = SNAPSHOT_RETRY.delay(failures);
                    failures += 1;
                    debug!(peer = self.peer.id, index, %reason, retry_in_ms = retry_wait.as_millis() as u64, "A snapshot send failed; it will be retried.");
                    not_before = tokio::time::Instant::now() + retry_wait;
                }
            }
            // Never dropped: raft-rs sends this peer nothing more until it hears.
            let report = PeerReport::Snapshot {
                peer: self.peer.id,
                index,
                delivered,
            };
            if self.reports.send(report).await.is_err() {
                return;
            }
        }
    }

    /// Streams one snapshot: a header (the Raft message, the data's size and checksum), then
    /// the data from its file in chunks. Returns the data's size once the peer has it whole.
    async fn stream_snapshot(
        &self,
        client: &mut RaftServiceClient<Channel>,
        message: Message,
        files: &SnapshotFiles,
    ) -> Result<u64, String> {
        let index = message.get_snapshot().get_metadata().index;
        let files = files.clone();
        // Opened and hashed off the runtime's threads (a large file takes a while). The open
        // file stays readable if a newer snapshot removes it meanwhile.
        let (file, data_bytes, data_sha256) = tokio::task::spawn_blocking(move || {
            let mut file = files.open(index)?;
            let mut hasher = sha2::Sha256::new();
            let data_bytes =
                std::io::copy(&mut (&mut file).take(MAX_SNAPSHOT_BYTES + 1), &mut hasher)?;
            file.rewind()?;
            Ok::<_, std::io::Error>((file, data_bytes, hex::encode(hasher.finalize())))
        })
        .await
        .map_err(|error| format!("read the snapshot at {index}: {error}"))?
        .map_err(|error| format!("read the snapshot at {index}: {error}"))?;
        if data_bytes > MAX_SNAPSHOT_BYTES {
            return Err(format!(
                "the snapshot at {index} is more than the {MAX_SNAPSHOT_BYTES} bytes a member accepts"
            ));
        }
        let header = SnapshotHeader {
            cluster_id: self.cluster_id.clone(),
            from_member: self.own_id,
            message: message
                .write_to_bytes()
                .map_err(|error| format!("encode the snapshot message: {error}"))?,
            data_bytes,
            data_sha256,
        };
        let first = SnapshotChunk {
            header: Some(header),
            data: Vec::new(),
        };
        // A read that fails part-way ends the stream short, which the peer refuses.
        let file = tokio::fs::File::from_std(file);
        let chunks = futures::stream::unfold((file, data_bytes), |(mut file, left)| async move {
            if left == 0 {
                return None;
            }
            let mut data = vec![0; (SNAPSHOT_CHUNK_BYTES as u64).min(left) as usize];
            file.read_exact(&mut data).await.ok()?;
            let left = left - data.len() as u64;
            Some((SnapshotChunk { header: None, data }, (file, left)))
        });
        let mut request = tonic::Request::new(futures::stream::iter([first]).chain(chunks));
        request.set_timeout(
            SNAPSHOT_SEND_BASE_TIMEOUT + Duration::from_secs(data_bytes.div_ceil(1 << 20)),
        );
        client
            .send_snapshot(request)
            .await
            .map(|_| data_bytes)
            .map_err(|status| status.to_string())
    }
}

/// An open `DeliverStream` to a peer: batches go into `batches`, which the call's request body
/// drains; `answer` reads the peer's answer until the stream ends, so the reason is known.
struct OpenStream {
    batches: mpsc::Sender<RaftBatch>,
    /// How the stream ended: `Ok` when the peer ended it cleanly.
    answer: tokio::task::JoinHandle<Result<(), String>>,
    opened_at: Instant,
}

/// Why a batch did not go on a stream.
enum StreamEnded {
    /// The peer ended the stream cleanly; the batch, if it was not lost, to send on a new one.
    Cleanly(Option<RaftBatch>),
    /// The stream failed; the reason.
    Failed(String),
}

impl OpenStream {
    /// Opens a stream and waits (at most [`UNARY_TIMEOUT`]) for the peer's response headers,
    /// which say it took the stream.
    async fn open(client: &mut RaftServiceClient<Channel>) -> Result<Self, tonic::Status> {
        let (batches, queued) = mpsc::channel(STREAM_WINDOW);
        let call = client.deliver_stream(tokio_stream::wrappers::ReceiverStream::new(queued));
        let mut answers = tokio::time::timeout(UNARY_TIMEOUT, call)
            .await
            .map_err(|_| {
                tonic::Status::deadline_exceeded(format!(
                    "the peer did not take the stream within {} s",
                    UNARY_TIMEOUT.as_secs()
                ))
            })??
            .into_inner();
        let answer = tokio::spawn(async move {
            loop {
                match answers.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(status.to_string()),
                }
            }
        });
        Ok(Self {
            batches,
            answer,
            opened_at: Instant::now(),
        })
    }

    /// Open long enough, and still open, to count as working (a peer that takes a stream and
    /// then refuses every batch must not end a failure episode each time).
    fn proven(&self) -> bool {
        self.opened_at.elapsed() >= STREAM_PROVEN_AFTER && !self.answer.is_finished()
    }

    /// Queues `batch` on the stream; why not, if the stream has ended or the peer has not taken
    /// [`STREAM_WINDOW`] queued batches for [`UNARY_TIMEOUT`].
    async fn send(&mut self, batch: RaftBatch) -> Result<(), StreamEnded> {
        if self.answer.is_finished() {
            return Err(self.ended(Some(batch)).await);
        }
        match tokio::time::timeout(UNARY_TIMEOUT, self.batches.send(batch)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(mpsc::error::SendError(batch))) => Err(self.ended(Some(batch)).await),
            Err(_) => Err(StreamEnded::Failed(format!(
                "the peer took no batch for {} s",
                UNARY_TIMEOUT.as_secs()
            ))),
        }
    }

    /// How the stream ended, once its answer is in (waiting a moment for it).
    async fn ended(&mut self, batch: Option<RaftBatch>) -> StreamEnded {
        match tokio::time::timeout(Duration::from_secs(1), &mut self.answer).await {
            Ok(Ok(Ok(()))) => StreamEnded::Cleanly(batch),
            Ok(Ok(Err(reason))) => StreamEnded::Failed(reason),
            _ => StreamEnded::Failed("the stream ended".to_string()),
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.answer.abort();
    }
}

/// Logs a run of failures towards one peer once, at WARN, and its end at INFO.
#[derive(Default)]
struct FailureEpisode {
    failing: bool,
}

impl FailureEpisode {
    fn failed(&mut self, peer: &Peer, action: &str, reason: &str) {
        if !self.failing {
            self.failing = true;
            warn!(peer = peer.id, address = %peer.address, %reason, "Could not {action}; retrying (logged once until it works again).");
        }
    }

    fn ended(&mut self, peer: &Peer, message: &str) {
        if std::mem::take(&mut self.failing) {
            info!(peer = peer.id, address = %peer.address, "{message}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_senders_and_connections_run_on_the_runtime_the_transport_was_given() {
        rewind_shared::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        rewind_shared::dev_ca::ensure_dev_pki(&dir.path().join("tls")).unwrap();
        let store = crate::storage::RaftStore::open(&dir.path().join("raft")).unwrap();
        let runtime = |name: &str| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(name)
                .enable_all()
                .build()
                .unwrap()
        };
        let (agents, members) = (runtime("agents"), runtime("members"));
        let (reports, _reports) = super::super::peer_report_channel();
        let transport = GrpcTransport::new(
            members.handle().clone(),
            PeerTls {
                files: TlsFiles::in_dir(
                    &dir.path().join("tls"),
                    rewind_shared::dev_ca::COORDINATOR,
                ),
                accept_legacy: false,
            },
            "cluster".into(),
            1,
            reports,
            store.snapshot_files(),
            Arc::default(),
        );
        // Routes are set from the server's runtime (membership changes), as in the coordinator.
        agents.block_on(async {
            transport.set_peers(&[Peer {
                id: 2,
                address: "127.0.0.1:9".into(),
            }]);
        });
        // The message sender, the snapshot sender, and each lazy channel's connection worker.
        let on_members = members.handle().metrics().num_alive_tasks();
        let on_agents = agents.handle().metrics().num_alive_tasks();
        assert!(
            on_members >= 3,
            "{on_members} tasks on the members' runtime"
        );
        assert_eq!(on_agents, 0, "nothing of the route on the agents' runtime");
        agents.shutdown_background();
        members.shutdown_background();
    }
}
