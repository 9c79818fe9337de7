//! Raft messages to peers over gRPC (`RaftService.Deliver`), with mutual TLS.
//!
//! One task per peer drains a bounded queue into batches. Peers follow the replicated member
//! registry (see `crate::membership`), so members added or removed at runtime are reached. A batch that cannot be delivered is
//! dropped: Raft retransmits what matters, and a full queue drops new messages the same way,
//! so a dead peer costs bounded memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::Message;
use rewind_proto::MAX_MESSAGE_BYTES;
use rewind_proto::v1::{RaftBatch, raft_service_client::RaftServiceClient};
use rewind_shared::tls::TlsFiles;
use tokio::sync::mpsc;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

use super::raft::Transport;

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Most messages in one delivery.
const MAX_BATCH: usize = 256;
/// Pause after a failed delivery, so a dead peer is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

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
    /// Peer id -> its address and the queue its sender task drains.
    peers: HashMap<u64, (String, mpsc::Sender<Message>)>,
}

impl GrpcTransport {
    /// A transport with no peers yet; see [`Self::set_peers`].
    pub fn new(
        runtime: tokio::runtime::Handle,
        tls: TlsFiles,
        cluster_id: String,
        own_id: u64,
    ) -> Self {
        Self {
            routes: Arc::new(Mutex::new(Routes {
                runtime,
                tls,
                cluster_id,
                own_id,
                peers: HashMap::new(),
            })),
        }
    }

    /// Makes `peers` the members messages go to: starts a sender task per new peer (or per
    /// changed address) and ends those of peers no longer listed. Each peer's certificate must
    /// name the host of its address; a peer whose TLS settings cannot be built is skipped with
    /// a warning (and retried on the next call).
    pub fn set_peers(&self, peers: &[Peer]) {
        let mut routes = self
            .routes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let own_id = routes.own_id;
        routes.peers.retain(|id, (address, _)| {
            peers
                .iter()
                .any(|peer| peer.id == *id && peer.address == *address)
        });
        for peer in peers.iter().filter(|peer| peer.id != own_id) {
            if routes.peers.contains_key(&peer.id) {
                continue;
            }
            let peer_tls = match routes.tls.client_config_for_address(&peer.address) {
                Ok(tls) => tls,
                Err(error) => {
                    warn!(%error, peer = peer.id, "Cannot set up TLS towards a Raft peer.");
                    continue;
                }
            };
            let (sender, receiver) = mpsc::channel(PEER_QUEUE);
            routes.peers.insert(peer.id, (peer.address.clone(), sender));
            info!(peer = peer.id, address = %peer.address, "Raft peer route set.");
            routes.runtime.spawn(deliver_to(
                peer.clone(),
                receiver,
                peer_tls,
                routes.cluster_id.clone(),
                own_id,
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
            .map(|(id, (address, _))| Peer {
                id: *id,
                address: address.clone(),
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
            match routes.peers.get(&message.to) {
                Some((_, queue)) => {
                    if queue.try_send(message).is_err() {
                        debug!("A peer's queue is full; dropped a Raft message.");
                    }
                }
                None => debug!(
                    to = message.to,
                    "No route to a Raft peer; dropped a message."
                ),
            }
        }
    }
}

async fn deliver_to(
    peer: Peer,
    mut queue: mpsc::Receiver<Message>,
    tls: ClientTlsConfig,
    cluster_id: String,
    own_id: u64,
) {
    let endpoint = match Endpoint::from_shared(format!("https://{}", peer.address))
        .and_then(|endpoint| endpoint.tls_config(tls))
    {
        Ok(endpoint) => endpoint
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5)),
        Err(error) => {
            warn!(%error, peer = peer.id, address = %peer.address, "Cannot reach a Raft peer at this address.");
            return;
        }
    };
    let mut client = RaftServiceClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    while let Some(first) = queue.recv().await {
        let mut messages = vec![first];
        while messages.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(message) => messages.push(message),
                Err(_) => break,
            }
        }
        let encoded = messages
            .iter()
            .filter_map(|message| message.write_to_bytes().ok())
            .collect();
        let batch = RaftBatch {
            cluster_id: cluster_id.clone(),
            from_member: own_id,
            messages: encoded,
        };
        if let Err(status) = client.deliver(batch).await {
            debug!(peer = peer.id, %status, "Could not deliver Raft messages; Raft will retransmit.");
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}
