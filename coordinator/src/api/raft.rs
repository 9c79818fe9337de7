//! `RaftService`: Raft messages from peer members, accepted only from their certificates.

use protobuf::Message as _;
use raft::eraftpb::Message;
use rewind_proto::v1::{RaftAck, RaftBatch, raft_service_server::RaftService};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use super::caller;

pub struct RaftPeers {
    pub cluster_id: String,
    /// Which certificate name each member must present.
    pub directory: crate::membership::Directory,
    pub inbox: mpsc::Sender<Message>,
}

#[tonic::async_trait]
impl RaftService for RaftPeers {
    async fn deliver(&self, request: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        let identity = caller(&request)?;
        let batch = request.into_inner();
        if batch.cluster_id != self.cluster_id {
            return Err(Status::failed_precondition(format!(
                "cluster_id: this member belongs to cluster {:?}, not {:?}",
                self.cluster_id, batch.cluster_id
            )));
        }
        match self.directory.get(batch.from_member) {
            Some(member) if member.name == identity => {}
            _ => {
                // Worth a warning: a joining member whose config does not list the current
                // leader refuses it here until it holds the member registry.
                warn!(
                    identity,
                    from_member = batch.from_member,
                    "Refused Raft messages from a certificate that is not that member's."
                );
                return Err(Status::permission_denied(format!(
                    "certificate {identity:?} is not member {} of this cluster",
                    batch.from_member
                )));
            }
        }
        for bytes in batch.messages {
            let message = Message::parse_from_bytes(&bytes).map_err(|error| {
                Status::invalid_argument(format!("messages: not a Raft message: {error}"))
            })?;
            if message.from != batch.from_member {
                return Err(Status::invalid_argument(format!(
                    "messages: a message from member {} in a batch from member {}",
                    message.from, batch.from_member
                )));
            }
            if self.inbox.try_send(message).is_err() {
                debug!("The Raft inbox is full; dropped a message (Raft retransmits).");
            }
        }
        Ok(Response::new(RaftAck {}))
    }
}
