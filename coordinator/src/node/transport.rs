//! Raft messages to peers over gRPC (`RaftService`), with mutual TLS.
//!
//! Two tasks per peer. One drains a bounded queue of ordinary messages into batches
//! (`Deliver`, bounded in count and bytes); a batch that cannot be delivered is dropped, Raft
//! retransmits what matters, and the peer is reported unreachable so raft-rs probes it again
//! instead of streaming to it blindly. A full queue drops new messages the same way, so a dead
//! peer costs bounded memory.
//!
//! The other streams state snapshots (`SendSnapshot`) over a connection of its own, in chunks,
//! so a snapshot of any size reaches a member that missed a compaction without holding up the
//! heartbeats. At most [`MAX_CONCURRENT_SNAPSHOT_SENDS`] run at once per leader. Every snapshot
//! ends with a report to raft-rs (`Finish` or `Failure`): raft-rs sends a peer nothing else
//! until it hears, so a send that failed unreported would lose the member for good. After a
//! failure the next send to that peer waits (1 s, doubling to a minute). Failures are logged at
//! WARN once per episode, with the peer and the reason.
//!
//! Peers follow the replicated member registry (see `crate::membership`), so members added or
//! removed at runtime are reached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use rewind_shared::tls::TlsFiles;
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

use super::PeerReport;
use super::raft::Transport;

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Most messages in one delivery.
const MAX_BATCH: usize = 256;
/// Most bytes of messages in one delivery: a batch is cut before it would pass this, so it
/// always fits what the peer accepts (a single message larger than this goes alone).
const MAX_BATCH_BYTES: usize = MAX_RAFT_BATCH_BYTES / 2;
/// Pause after a failed delivery, so a dead peer is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Snapshots being sent at once by this member, to all peers together: each holds the whole
/// snapshot in memory and a share of the bandwidth.
pub const MAX_CONCURRENT_SNAPSHOT_SENDS: usize = 2;
/// Wait before the next snapshot to a peer after one failed, doubled after each failure.
const SNAPSHOT_RETRY_FIRST: Duration = Duration::from_secs(1);
const SNAPSHOT_RETRY_MAX: Duration = Duration::from_secs(60);
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

struct Routes {
    runtime: tokio::runtime::Handle,
    tls: TlsFiles,
    cluster_id: String,
    own_id: u64,
    /// Peer id -> its address and the queues its sender tasks drain.
    peers: HashMap<u64, PeerRoute>,
    reports: mpsc::Sender<PeerReport>,
    snapshot_slots: Arc<Semaphore>,
    stats: Arc<SnapshotStats>,
}

struct PeerRoute {
    address: String,
    messages: mpsc::Sender<Message>,
    /// Room for one: raft-rs sends a peer one snapshot at a time.
    snapshots: mpsc::Sender<Message>,
}

/// Snapshots sent and received by this member, for `/metrics`. The metric handles are shared,
/// so a scrape registers clones of them.
#[derive(Debug)]
pub struct SnapshotStats {
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
        tls: TlsFiles,
        cluster_id: String,
        own_id: u64,
        reports: mpsc::Sender<PeerReport>,
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
        routes.peers.retain(|id, route| {
            peers
                .iter()
                .any(|peer| peer.id == *id && peer.address == route.address)
        });
        for peer in peers.iter().filter(|peer| peer.id != own_id) {
            if routes.peers.contains_key(&peer.id) {
                continue;
            }
            let endpoint = match endpoint(&routes.tls, &peer.address) {
                Ok(endpoint) => endpoint,
                Err(error) => {
                    warn!(%error, peer = peer.id, address = %peer.address, "Cannot set up a route to a Raft peer.");
                    continue;
                }
            };
            let (messages, message_queue) = mpsc::channel(PEER_QUEUE);
            let (snapshots, snapshot_queue) = mpsc::channel(1);
            routes.peers.insert(
                peer.id,
                PeerRoute {
                    address: peer.address.clone(),
                    messages,
                    snapshots,
                },
            );
            info!(peer = peer.id, address = %peer.address, "Raft peer route set.");
            let sender = PeerSender {
                peer: peer.clone(),
                cluster_id: routes.cluster_id.clone(),
                own_id,
                reports: routes.reports.clone(),
            };
            routes.runtime.spawn(
                sender.clone().deliver(
                    // Lazy: the first delivery connects, and a failed connection is retried.
                    endpoint
                        .clone()
                        .timeout(Duration::from_secs(5))
                        .connect_lazy(),
                    message_queue,
                ),
            );
            routes.runtime.spawn(sender.send_snapshots(
                // A connection of its own, so a long transfer does not hold up heartbeats.
                endpoint.connect_lazy(),
                snapshot_queue,
                Arc::clone(&routes.snapshot_slots),
                Arc::clone(&routes.stats),
            ));
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
            let is_snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            let queued = match routes.peers.get(&to) {
                Some(route) if is_snapshot => route.snapshots.try_send(message).is_ok(),
                Some(route) => route.messages.try_send(message).is_ok(),
                None => false,
            };
            if queued {
                continue;
            }
            if is_snapshot {
                // raft-rs waits for every snapshot's outcome: one that never leaves must be
                // reported too, or the peer is never sent another.
                warn!(
                    peer = to,
                    "A snapshot for a peer could not be queued (no route, or one is already being sent)."
                );
                let _ = routes.reports.try_send(PeerReport::Snapshot {
                    peer: to,
                    delivered: false,
                });
            } else {
                debug!(
                    to,
                    "No route to a Raft peer, or its queue is full; dropped a message."
                );
            }
        }
    }
}

/// A gRPC endpoint for a peer's address, with its TLS settings.
fn endpoint(tls: &TlsFiles, address: &str) -> Result<Endpoint, String> {
    let peer_tls: ClientTlsConfig = tls
        .client_config_for_address(address)
        .map_err(|error| error.to_string())?;
    Endpoint::from_shared(format!("https://{address}"))
        .and_then(|endpoint| endpoint.tls_config(peer_tls))
        .map(|endpoint| endpoint.connect_timeout(Duration::from_secs(2)))
        .map_err(|error| error.to_string())
}

/// What a peer's sender tasks share.
#[derive(Clone)]
struct PeerSender {
    peer: Peer,
    cluster_id: String,
    own_id: u64,
    reports: mpsc::Sender<PeerReport>,
}

impl PeerSender {
    async fn deliver(self, channel: Channel, mut queue: mpsc::Receiver<Message>) {
        let mut client = RaftServiceClient::new(channel)
            .max_decoding_message_size(MAX_RAFT_BATCH_BYTES)
            .max_encoding_message_size(MAX_RAFT_BATCH_BYTES);
        let mut episode = FailureEpisode::default();
        let mut next = None;
        loop {
            let first = match next.take() {
                Some(message) => message,
                None => match queue.recv().await {
                    Some(message) => message,
                    None => return,
                },
            };
            let mut encoded = Vec::new();
            let mut bytes = 0;
            let mut candidate = Some(first);
            while let Some(message) = candidate.take() {
                if let Ok(message_bytes) = message.write_to_bytes() {
                    if !encoded.is_empty() && bytes + message_bytes.len() > MAX_BATCH_BYTES {
                        // The next batch starts with it.
                        next = Some(message);
                        break;
                    }
                    bytes += message_bytes.len();
                    encoded.push(message_bytes);
                }
                if encoded.len() < MAX_BATCH {
                    candidate = queue.try_recv().ok();
                }
            }
            let batch = RaftBatch {
                cluster_id: self.cluster_id.clone(),
                from_member: self.own_id,
                messages: encoded,
            };
            match client.deliver(batch).await {
                Ok(_) => episode.ended(&self.peer, "Raft messages are delivered to a peer again."),
                Err(status) => {
                    episode.failed(&self.peer, "deliver Raft messages", &status.to_string());
                    // Dropping the report when the queue is full is harmless: the next failure
                    // reports again.
                    let _ = self
                        .reports
                        .try_send(PeerReport::Unreachable { peer: self.peer.id });
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    async fn send_snapshots(
        self,
        channel: Channel,
        mut queue: mpsc::Receiver<Message>,
        slots: Arc<Semaphore>,
        stats: Arc<SnapshotStats>,
    ) {
        let mut client = RaftServiceClient::new(channel)
            .max_decoding_message_size(MAX_RAFT_BATCH_BYTES)
            .max_encoding_message_size(SNAPSHOT_CHUNK_BYTES + 64 * 1024);
        let mut episode = FailureEpisode::default();
        let mut retry_wait = SNAPSHOT_RETRY_FIRST;
        let mut not_before = tokio::time::Instant::now();
        while let Some(message) = queue.recv().await {
            // raft-rs waits for this snapshot's report, so waiting here is what bounds the
            // rate of retries to a peer that keeps failing.
            tokio::time::sleep_until(not_before).await;
            let Ok(_slot) = slots.acquire().await else {
                return;
            };
            let index = message.get_snapshot().get_metadata().index;
            let started = Instant::now();
            let sent = self.stream_snapshot(&mut client, message).await;
            let seconds = started.elapsed().as_secs_f64();
            let delivered = sent.is_ok();
            match sent {
                Ok(bytes) => {
                    SnapshotStats::outcome(&stats.sends, "sent");
                    stats.sent_bytes.inc_by(bytes);
                    stats.send_seconds.observe(seconds);
                    retry_wait = SNAPSHOT_RETRY_FIRST;
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
                    stats.send_seconds.observe(seconds);
                    episode.failed(&self.peer, "send a snapshot", &reason);
                    debug!(peer = self.peer.id, index, %reason, retry_in_ms = retry_wait.as_millis() as u64, "A snapshot send failed; it will be retried.");
                    not_before = tokio::time::Instant::now() + retry_wait;
                    retry_wait = (retry_wait * 2).min(SNAPSHOT_RETRY_MAX);
                }
            }
            // Never dropped: raft-rs sends this peer nothing more until it hears.
            if self
                .reports
                .send(PeerReport::Snapshot {
                    peer: self.peer.id,
                    delivered,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Streams one snapshot: a header (the Raft message without its data, the data's size and
    /// checksum), then the data in chunks. Returns the data's size once the peer has it whole.
    async fn stream_snapshot(
        &self,
        client: &mut RaftServiceClient<Channel>,
        mut message: Message,
    ) -> Result<u64, String> {
        let data: Vec<u8> = message.mut_snapshot().take_data().into();
        let data_bytes = data.len() as u64;
        if data_bytes > MAX_SNAPSHOT_BYTES {
            return Err(format!(
                "the snapshot is {data_bytes} bytes, more than the {MAX_SNAPSHOT_BYTES} a member accepts"
            ));
        }
        // Hashing a large snapshot takes a while: off the runtime's threads, so the heartbeats
        // and appends this member sends meanwhile are not held up.
        let (data, data_sha256) = tokio::task::spawn_blocking(move || {
            let checksum = rewind_shared::digest::sha256_hex(&data);
            (data, checksum)
        })
        .await
        .map_err(|error| format!("hash the snapshot: {error}"))?;
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
        let chunk_count = data.len().div_ceil(SNAPSHOT_CHUNK_BYTES);
        let chunks = (0..chunk_count).map(move |chunk| {
            let start = chunk * SNAPSHOT_CHUNK_BYTES;
            let end = (start + SNAPSHOT_CHUNK_BYTES).min(data.len());
            SnapshotChunk {
                header: None,
                data: data[start..end].to_vec(),
            }
        });
        let mut request =
            tonic::Request::new(futures::stream::iter(std::iter::once(first).chain(chunks)));
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
