//! `RaftService`: Raft messages and snapshots from peer members, accepted only from their
//! certificates.
//!
//! A snapshot arrives as a stream of chunks, from a member's certificate only, one stream per
//! sending member and two at most. Its data goes to a temporary file of its own (so a slow or
//! stalled sender holds disk, not memory); once whole it is read back, checked against the size
//! and sha256 its header declared and decoded once as a state, and only then is the Raft
//! message, data restored, handed to the member, which installs it atomically (see
//! `RaftStore::apply_snapshot`). A stream cut short leaves nothing behind: the file is removed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use rewind_proto::v1::{
    RaftAck, RaftBatch, SnapshotChunk, SnapshotHeader, raft_service_server::RaftService,
};
use rewind_proto::{MAX_RAFT_BATCH_BYTES, MAX_SNAPSHOT_BYTES};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{Semaphore, mpsc};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::gate::caller;
use crate::node::transport::SnapshotStats;
use crate::storage::snapshot_codec;

/// Snapshots this member receives at once; more are refused (the sender retries later).
const MAX_CONCURRENT_SNAPSHOT_RECEIVES: usize = 2;
/// Longest wait for a snapshot stream's header, which says who sends it.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a snapshot's next chunk before the transfer is abandoned.
const CHUNK_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the member to take a received snapshot.
const INBOX_TIMEOUT: Duration = Duration::from_secs(10);
/// A stream of Raft messages that carries nothing for this long is ended (cleanly: the sender
/// opens another when it has something to send), so an idle one holds nothing for ever.
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

pub struct RaftPeers {
    door: Door,
    /// Where snapshots being received are written (emptied at start).
    incoming_dir: PathBuf,
    receiving: Arc<Semaphore>,
    /// Members a snapshot is being received from now.
    receiving_from: Arc<Mutex<HashSet<u64>>>,
    /// Numbers each received snapshot's file.
    next_file: AtomicU64,
    stats: Arc<SnapshotStats>,
}

impl RaftPeers {
    /// `gate` gives the access policy in force (a member it denies is cut off mid-stream too);
    /// streams end when `stop` turns true, so a member shutting down is not held open by its
    /// peers' streams.
    pub fn new(
        cluster_id: String,
        directory: crate::membership::Directory,
        inbox: mpsc::Sender<Message>,
        incoming_dir: PathBuf,
        stats: Arc<SnapshotStats>,
        gate: super::gate::Gate,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            door: Door {
                cluster_id,
                directory,
                inbox,
                gate,
                streams: Arc::default(),
                stop,
            },
            incoming_dir,
            receiving: Arc::new(Semaphore::new(MAX_CONCURRENT_SNAPSHOT_RECEIVES)),
            receiving_from: Arc::default(),
            next_file: AtomicU64::new(0),
            stats,
        }
    }

    /// Receives one snapshot's data into a file, checks it, and returns the Raft message with
    /// its data restored.
    async fn receive_snapshot(
        &self,
        header: SnapshotHeader,
        chunks: &mut Streaming<SnapshotChunk>,
    ) -> Result<Message, Status> {
        let mut message = snapshot_message(&header)?;
        let index = message.get_snapshot().get_metadata().index;
        let number = self.next_file.fetch_add(1, Ordering::Relaxed);
        let path = self.incoming_dir.join(format!(
            "from-{}-at-{index}-{number}.partial",
            header.from_member
        ));
        let mut file = IncomingFile::create(path).await?;
        let mut received: u64 = 0;
        while let Some(chunk) = next_chunk(chunks, CHUNK_IDLE_TIMEOUT).await? {
            if chunk.header.is_some() {
                return Err(Status::invalid_argument(
                    "header: only the first chunk carries one",
                ));
            }
            received += chunk.data.len() as u64;
            if received > header.data_bytes {
                return Err(Status::invalid_argument(format!(
                    "data: more than the {} bytes the header declared",
                    header.data_bytes
                )));
            }
            file.write(&chunk.data).await?;
        }
        if received != header.data_bytes {
            return Err(Status::aborted(format!(
                "data: {received} of the {} bytes the header declared arrived",
                header.data_bytes
            )));
        }
        let data = file.read_back().await?;
        let expected = header.data_sha256;
        // Hashed as read back, so the checksum covers the bytes installed; decoded once here so
        // a snapshot this binary cannot read is refused to its sender, rather than stopping this
        // member when raft-rs hands it over for installing.
        let data = tokio::task::spawn_blocking(move || check_snapshot_data(data, &expected))
            .await
            .map_err(|error| Status::internal(format!("check the snapshot: {error}")))??;
        message.mut_snapshot().set_data(data.into());
        Ok(message)
    }

    /// Takes the received snapshot's place for member `from`: refused while one from it is
    /// being received, or while [`MAX_CONCURRENT_SNAPSHOT_RECEIVES`] are.
    fn claim_receive(&self, from: u64) -> Result<ReceiveClaim, Status> {
        let slot = Arc::clone(&self.receiving).try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this member is already receiving {MAX_CONCURRENT_SNAPSHOT_RECEIVES} snapshots; retry later"
            ))
        })?;
        let mut receiving = self
            .receiving_from
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !receiving.insert(from) {
            return Err(Status::resource_exhausted(format!(
                "this member is already receiving a snapshot from member {from}"
            )));
        }
        Ok(ReceiveClaim {
            from,
            receiving_from: Arc::clone(&self.receiving_from),
            _slot: slot,
        })
    }
}

/// Who may send Raft messages to this member and where they go: shared by `Deliver`, the
/// streams of `DeliverStream` and `SendSnapshot`.
#[derive(Clone)]
struct Door {
    cluster_id: String,
    /// Which certificate name each member must present.
    directory: crate::membership::Directory,
    inbox: mpsc::Sender<Message>,
    /// The policy in force: a stream outlives the gate's check at its start.
    gate: super::gate::Gate,
    /// One stream per sending certificate: a newer one ends the older.
    streams: Arc<StreamSlots>,
    stop: tokio::sync::watch::Receiver<bool>,
}

/// The live `DeliverStream` of each sending certificate, by a number each new stream takes.
#[derive(Default)]
struct StreamSlots {
    by_sender: Mutex<std::collections::HashMap<String, tokio::sync::watch::Sender<u64>>>,
    opened: AtomicU64,
}

/// A stream's place: it ends when its sender opens a newer one; freed when the stream ends.
struct StreamSlot {
    slots: Arc<StreamSlots>,
    sender: String,
    number: u64,
    newer: tokio::sync::watch::Receiver<u64>,
}

impl StreamSlots {
    fn claim(self: &Arc<Self>, sender: &str) -> StreamSlot {
        let mut by_sender = self
            .by_sender
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let number = self.opened.fetch_add(1, Ordering::Relaxed) + 1;
        let latest = by_sender
            .entry(sender.to_string())
            .or_insert_with(|| tokio::sync::watch::channel(0).0);
        latest.send_replace(number);
        StreamSlot {
            slots: Arc::clone(self),
            sender: sender.to_string(),
            number,
            newer: latest.subscribe(),
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut by_sender = self
            .slots
            .by_sender
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if by_sender
            .get(&self.sender)
            .is_some_and(|latest| *latest.borrow() == self.number)
        {
            by_sender.remove(&self.sender);
        }
    }
}

impl Door {
    /// The sender is member `from_member` of this cluster: its certificate is of kind member
    /// and names that id (the gate let only member certificates through), and the id is in the
    /// current configuration.
    fn check_sender(
        &self,
        caller: &crate::access::Caller,
        cluster_id: &str,
        from_member: u64,
    ) -> Result<(), Status> {
        if cluster_id != self.cluster_id {
            return Err(Status::failed_precondition(format!(
                "cluster_id: this member belongs to cluster {:?}, not {:?}",
                self.cluster_id, cluster_id
            )));
        }
        let identity = caller.id();
        let named = caller.principal.name == from_member.to_string();
        if named && self.directory.get(from_member).is_some() {
            return Ok(());
        }
        // Worth a warning: a joining member whose config does not list the current leader
        // refuses it here until it holds the member registry.
        warn!(
            identity,
            from_member, "Refused Raft traffic from a certificate that is not that member's."
        );
        Err(Status::permission_denied(if named {
            format!("member {from_member} is not in this cluster's configuration")
        } else {
            format!("certificate {identity} is not member {from_member}'s")
        }))
    }

    /// The batch's messages, decoded and checked: from a member of this cluster, each from the
    /// member whose certificate sent the batch.
    fn open_batch(
        &self,
        caller: &crate::access::Caller,
        batch: &RaftBatch,
    ) -> Result<Vec<Message>, Status> {
        self.check_sender(caller, &batch.cluster_id, batch.from_member)?;
        if let Some(policy) = self.gate.current_policy()
            && policy.is_denied(&caller.principal)
        {
            warn!(
                identity = caller.id(),
                "Refused Raft traffic from a member the policy denies (revoked)."
            );
            return Err(Status::permission_denied(format!(
                "{} is on the policy's deny list (revoked)",
                caller.id()
            )));
        }
        batch
            .messages
            .iter()
            .map(|bytes| {
                let message = decode_raft_message(bytes, MAX_RAFT_BATCH_BYTES, "messages")?;
                if message.from != batch.from_member {
                    return Err(Status::invalid_argument(format!(
                        "messages: a message from member {} in a batch from member {}",
                        message.from, batch.from_member
                    )));
                }
                Ok(message)
            })
            .collect()
    }

    /// Hands an ordinary message to the member; dropped when its inbox is full (Raft
    /// retransmits what matters).
    fn pass(&self, message: Message) {
        if self.inbox.try_send(message).is_err() {
            debug!("The Raft inbox is full; dropped a message (Raft retransmits).");
        }
    }
}

/// A snapshot being received from a member: frees its places when dropped.
struct ReceiveClaim {
    from: u64,
    receiving_from: Arc<Mutex<HashSet<u64>>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for ReceiveClaim {
    fn drop(&mut self) {
        self.receiving_from
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.from);
    }
}

/// Snapshot data whose sha256 is `expected` and that decodes as a state, or why not.
fn check_snapshot_data(data: Vec<u8>, expected: &str) -> Result<Vec<u8>, Status> {
    let checksum = rewind_shared::digest::sha256_hex(&data);
    if checksum != expected {
        return Err(Status::data_loss(format!(
            "data: sha256 {checksum} is not the {expected} the header declared"
        )));
    }
    snapshot_codec::check_received(&data)
        .map_err(|error| Status::invalid_argument(format!("data: {error}")))?;
    Ok(data)
}

/// Most nesting a Raft message is decoded through: eraftpb nests three deep (Message, Snapshot,
/// SnapshotMetadata, ConfState); anything deeper is not a Raft message.
const MAX_RAFT_MESSAGE_DEPTH: u32 = 8;
/// Largest Raft message inside a snapshot stream's header (the snapshot's data travels in
/// chunks; the header holds its metadata).
const MAX_SNAPSHOT_HEADER_MESSAGE_BYTES: usize = 1 << 20;

/// Decodes a Raft message from a member, bounded: raft-rs's codec is protobuf 2, unmaintained,
/// with an advisory (RUSTSEC-2024-0437, recursion on crafted input). Only an authenticated
/// member reaches this (its certificate checked against the sender it claims, by the gate and
/// `check_sender`), its size is bounded before decoding, and so is the nesting.
fn decode_raft_message(bytes: &[u8], max_bytes: usize, field: &str) -> Result<Message, Status> {
    if bytes.len() > max_bytes {
        return Err(Status::invalid_argument(format!(
            "{field}: a Raft message of {} bytes, at most {max_bytes}",
            bytes.len()
        )));
    }
    let mut input = protobuf::CodedInputStream::from_bytes(bytes);
    input.set_recursion_limit(MAX_RAFT_MESSAGE_DEPTH);
    let mut message = Message::new();
    message
        .merge_from(&mut input)
        .and_then(|()| input.check_eof())
        .map_err(|error| {
            Status::invalid_argument(format!("{field}: not a Raft message: {error}"))
        })?;
    Ok(message)
}

#[tonic::async_trait]
impl RaftService for RaftPeers {
    async fn deliver(&self, request: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        let caller = caller(&request)?;
        let batch = request.into_inner();
        for message in self.door.open_batch(&caller, &batch)? {
            if message.get_msg_type() == MessageType::MsgSnapshot {
                // A leader of an earlier version sends its snapshot inside a batch: taken only
                // if it decodes, and never dropped on a full inbox (raft-rs would wait for it).
                let data = message.get_snapshot().get_data().to_vec();
                let data_sha256 = rewind_shared::digest::sha256_hex(&data);
                tokio::task::spawn_blocking(move || check_snapshot_data(data, &data_sha256))
                    .await
                    .map_err(|error| Status::internal(format!("check the snapshot: {error}")))??;
                self.take_snapshot(message).await?;
                continue;
            }
            self.door.pass(message);
        }
        Ok(Response::new(RaftAck {}))
    }

    type DeliverStreamStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftAck, Status>> + Send + 'static>>;

    /// The batches are taken as they arrive, by the answer's body: the response headers go out
    /// at once (the sender's proof that the stream is open), the body yields nothing and ends
    /// with the status of the first batch refused or `ABORTED` when the same certificate opens a
    /// newer stream, or cleanly when the sender ends the stream, sends nothing for
    /// [`STREAM_IDLE_TIMEOUT`], or this member stops. A
    /// stream cut off by the sender's side ends here too, as its body is dropped.
    async fn deliver_stream(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<Self::DeliverStreamStream>, Status> {
        let caller = caller(&request)?;
        let mut batches = request.into_inner();
        let door = self.door.clone();
        let mut slot = door.streams.claim(&caller.id());
        let mut stop = door.stop.clone();
        let taking = async move {
            loop {
                let batch = tokio::select! {
                    next = tokio::time::timeout(STREAM_IDLE_TIMEOUT, batches.message()) => {
                        match next {
                            Ok(next) => next?,
                            Err(_) => None,
                        }
                    }
                    _ = slot.newer.changed() => {
                        return Err(Status::aborted(
                            "replaced by a newer stream from the same certificate",
                        ));
                    }
                    _ = stop.wait_for(|stopping| *stopping) => None,
                };
                let Some(batch) = batch else {
                    return Ok(());
                };
                for message in door.open_batch(&caller, &batch)? {
                    if message.get_msg_type() == MessageType::MsgSnapshot {
                        return Err(Status::invalid_argument(
                            "messages: a snapshot; snapshots travel by SendSnapshot",
                        ));
                    }
                    door.pass(message);
                }
            }
        };
        let answer = futures::stream::once(taking).filter_map(|taken: Result<(), Status>| {
            futures::future::ready(taken.err().map(|status| {
                debug!(%status, "A stream of Raft messages from a peer ended.");
                Err(status)
            }))
        });
        Ok(Response::new(Box::pin(answer)))
    }

    async fn send_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftAck>, Status> {
        let caller = caller(&request)?;
        let identity = caller.id();
        // Who sends is settled before anything is held for the stream.
        let sender: Option<u64> = caller.principal.name.parse().ok();
        if sender.is_none_or(|id| self.door.directory.get(id).is_none()) {
            return Err(Status::permission_denied(format!(
                "{identity} is not a member of this cluster: only members send snapshots"
            )));
        }
        let mut chunks = request.into_inner();
        let header = next_chunk(&mut chunks, HEADER_TIMEOUT)
            .await?
            .and_then(|chunk| chunk.header)
            .ok_or_else(|| {
                Status::invalid_argument("header: the first chunk must carry the header")
            })?;
        self.door
            .check_sender(&caller, &header.cluster_id, header.from_member)?;
        let _claim = self.claim_receive(header.from_member)?;
        let started = std::time::Instant::now();
        let message = match self.receive_snapshot(header, &mut chunks).await {
            Ok(message) => message,
            Err(status) => {
                SnapshotStats::outcome(&self.stats.receives, "failed");
                warn!(identity, %status, "A snapshot from a peer was refused or did not arrive whole; the peer will send it again.");
                return Err(status);
            }
        };
        let metadata = message.get_snapshot().get_metadata();
        let (index, bytes) = (metadata.index, message.get_snapshot().get_data().len());
        self.take_snapshot(message).await?;
        info!(
            identity,
            index,
            bytes,
            ms = started.elapsed().as_millis() as u64,
            "Received a snapshot from the leader."
        );
        Ok(Response::new(RaftAck {}))
    }
}

impl RaftPeers {
    /// Hands a checked snapshot to the member, waiting for room in its inbox (a dropped
    /// snapshot would leave raft-rs waiting for it), and counts it.
    async fn take_snapshot(&self, message: Message) -> Result<(), Status> {
        let bytes = message.get_snapshot().get_data().len() as u64;
        if !matches!(
            tokio::time::timeout(INBOX_TIMEOUT, self.door.inbox.send(message)).await,
            Ok(Ok(()))
        ) {
            SnapshotStats::outcome(&self.stats.receives, "failed");
            return Err(Status::unavailable(
                "this member did not take the snapshot in time; send it again",
            ));
        }
        SnapshotStats::outcome(&self.stats.receives, "received");
        self.stats.received_bytes.inc_by(bytes);
        Ok(())
    }
}

/// The next chunk, `None` at the end of the stream; a sender silent for
/// [`CHUNK_IDLE_TIMEOUT`] ends the transfer.
async fn next_chunk(
    chunks: &mut Streaming<SnapshotChunk>,
    timeout: Duration,
) -> Result<Option<SnapshotChunk>, Status> {
    tokio::time::timeout(timeout, chunks.message())
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!("no snapshot chunk for {} s", timeout.as_secs()))
        })?
}

/// The header's Raft message, checked: a snapshot from the sender, of a size this member takes.
fn snapshot_message(header: &SnapshotHeader) -> Result<Message, Status> {
    let message = decode_raft_message(
        &header.message,
        MAX_SNAPSHOT_HEADER_MESSAGE_BYTES,
        "header.message",
    )?;
    if message.get_msg_type() != MessageType::MsgSnapshot {
        return Err(Status::invalid_argument(format!(
            "header.message: a {:?}, not a snapshot",
            message.get_msg_type()
        )));
    }
    if message.from != header.from_member {
        return Err(Status::invalid_argument(format!(
            "header.message: from member {}, in a stream from member {}",
            message.from, header.from_member
        )));
    }
    if !message.get_snapshot().get_data().is_empty() {
        return Err(Status::invalid_argument(
            "header.message: carries data; the data follows in the chunks",
        ));
    }
    if header.data_bytes > MAX_SNAPSHOT_BYTES {
        return Err(Status::invalid_argument(format!(
            "header.data_bytes: {} is more than the {MAX_SNAPSHOT_BYTES} a member accepts",
            header.data_bytes
        )));
    }
    let is_sha256 = header.data_sha256.len() == 64
        && header
            .data_sha256
            .bytes()
            .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'));
    if !is_sha256 {
        return Err(Status::invalid_argument(
            "header.data_sha256: must be 64 lowercase hex digits",
        ));
    }
    Ok(message)
}

/// A snapshot being received: removed when dropped, whether it arrived whole or not.
struct IncomingFile {
    path: PathBuf,
    file: tokio::fs::File,
}

impl IncomingFile {
    async fn create(path: PathBuf) -> Result<Self, Status> {
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|error| disk_error("create", &path, error))?;
        Ok(Self { path, file })
    }

    async fn write(&mut self, data: &[u8]) -> Result<(), Status> {
        self.file
            .write_all(data)
            .await
            .map_err(|error| disk_error("write", &self.path, error))
    }

    async fn read_back(mut self) -> Result<Vec<u8>, Status> {
        self.file
            .flush()
            .await
            .map_err(|error| disk_error("write", &self.path, error))?;
        tokio::fs::read(&self.path)
            .await
            .map_err(|error| disk_error("read", &self.path, error))
    }
}

impl Drop for IncomingFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn disk_error(action: &str, path: &Path, error: std::io::Error) -> Status {
    warn!(%error, path = %path.display(), "Cannot {action} a snapshot being received.");
    Status::unavailable(format!(
        "the receiving member cannot {action} the snapshot on its disk"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A field of `number` holding `inner` as a length-delimited message.
    fn nested(number: u32, inner: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        let varint = |mut value: u64, out: &mut Vec<u8>| loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        };
        varint(u64::from(number << 3 | 2), &mut bytes);
        varint(inner.len() as u64, &mut bytes);
        bytes.extend_from_slice(inner);
        bytes
    }

    #[test]
    fn raft_messages_from_peers_are_bounded_before_and_while_decoding() {
        let mut good = Message::new();
        good.set_msg_type(MessageType::MsgHeartbeat);
        good.from = 2;
        let bytes = good.write_to_bytes().unwrap();
        assert_eq!(decode_raft_message(&bytes, 1024, "messages").unwrap(), good);
        let refused = decode_raft_message(&vec![0; 2048], 1024, "messages").unwrap_err();
        assert!(refused.message().contains("2048 bytes, at most 1024"));
        // A real snapshot message nests as deep as eraftpb goes (snapshot, metadata, conf
        // state) and decodes.
        let mut snapshot = Message::new();
        snapshot.set_msg_type(MessageType::MsgSnapshot);
        snapshot
            .mut_snapshot()
            .mut_metadata()
            .mut_conf_state()
            .voters = vec![1, 2, 3];
        let bytes = snapshot.write_to_bytes().unwrap();
        assert_eq!(decode_raft_message(&bytes, 1 << 20, "m").unwrap(), snapshot);
        // Groups opened 100,000 deep in an unknown field (the advisory's shape): refused, and
        // the stack survives.
        let mut bomb = nested(9, &[]);
        for _ in 0..100_000 {
            bomb.extend_from_slice(&[0xa3, 0x01]); // field 20, start group
        }
        let refused = decode_raft_message(&bomb, 1 << 20, "messages").unwrap_err();
        assert!(
            refused.message().contains("not a Raft message"),
            "{}",
            refused.message()
        );
        let garbage = decode_raft_message(&[0xff; 16], 1024, "messages").unwrap_err();
        assert!(garbage.message().contains("messages: not a Raft message"));
    }
}
