//! Raft messages to peers over gRPC (`RaftService.Deliver`), with mutual TLS.
//!
//! One task per peer drains a bounded queue into batches. A batch that cannot be delivered is
//! dropped: Raft retransmits what matters, and a full queue drops new messages the same way,
//! so a dead peer costs bounded memory.

use std::collections::HashMap;
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::Message;
use rewind_proto::MAX_MESSAGE_BYTES;
use rewind_proto::v1::{RaftBatch, raft_service_client::RaftServiceClient};
use rewind_shared::tls::TlsFiles;
use tokio::sync::mpsc;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tracing::{debug, warn};

use super::raft::Transport;

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Most messages in one delivery.
const MAX_BATCH: usize = 256;
/// Pause after a failed delivery, so a dead peer is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

pub struct Peer {
    pub id: u64,
    pub address: String,
}

pub struct GrpcTransport {
    queues: HashMap<u64, mpsc::Sender<Message>>,
}

impl GrpcTransport {
    /// Starts one sender task per peer on `runtime`. Each peer's certificate must name the host
    /// of its address.
    pub fn start(
        runtime: &tokio::runtime::Handle,
        peers: Vec<Peer>,
        tls: &TlsFiles,
        cluster_id: String,
        own_id: u64,
    ) -> Result<Self, rewind_shared::SharedError> {
        let mut queues = HashMap::new();
        for peer in peers {
            let host = peer
                .address
                .rsplit_once(':')
                .map_or(peer.address.as_str(), |(host, _)| host);
            let peer_tls = tls.client_config(host.trim_start_matches('[').trim_end_matches(']'))?;
            let (sender, receiver) = mpsc::channel(PEER_QUEUE);
            queues.insert(peer.id, sender);
            runtime.spawn(deliver_to(
                peer,
                receiver,
                peer_tls,
                cluster_id.clone(),
                own_id,
            ));
        }
        Ok(Self { queues })
    }
}

impl Transport for GrpcTransport {
    fn send(&self, messages: Vec<Message>) {
        for message in messages {
            match self.queues.get(&message.to) {
                Some(queue) => {
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
