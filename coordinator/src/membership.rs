//! Where the members are: the replicated member registry, or, until this member holds one (it
//! is joining and has not received the cluster's state yet), the members its config lists.
//!
//! Everything that needs an address or a certificate name of a member asks the [`Directory`]:
//! the Raft transport's routes, the check of a peer's certificate, the leader redirect given to
//! agents and rewindctl, and `cluster list`.

use std::sync::Arc;

use tracing::debug;

use crate::node::NodeHandle;
use crate::node::transport::{GrpcTransport, Peer};
use crate::state_machine::MemberRecord;

#[derive(Clone)]
pub struct Directory {
    node: NodeHandle,
    configured: Arc<Vec<MemberRecord>>,
}

impl Directory {
    pub fn new(node: NodeHandle, configured: Vec<MemberRecord>) -> Self {
        Self {
            node,
            configured: Arc::new(configured),
        }
    }

    /// Every member, by id.
    pub fn members(&self) -> Vec<MemberRecord> {
        let replicated: Vec<MemberRecord> = self
            .node
            .read(|state| state.members.values().cloned().collect());
        if replicated.is_empty() {
            self.configured.to_vec()
        } else {
            replicated
        }
    }

    pub fn get(&self, id: u64) -> Option<MemberRecord> {
        let replicated = self
            .node
            .read(|state| (!state.members.is_empty()).then(|| state.members.get(&id).cloned()));
        match replicated {
            Some(found) => found,
            None => self
                .configured
                .iter()
                .find(|member| member.id == id)
                .cloned(),
        }
    }
}

/// Keeps the transport's routes equal to the directory's members, checking after every applied
/// batch of entries and every few seconds (a peer skipped for a TLS error is retried). Runs
/// until the node stops.
pub async fn route_to_members(directory: Directory, transport: GrpcTransport) {
    let mut applied = directory.node.subscribe();
    let mut retry = tokio::time::interval(RETRY_ROUTES);
    loop {
        let own_id = transport.own_id();
        let mut wanted: Vec<Peer> = directory
            .members()
            .into_iter()
            .filter(|member| member.id != own_id)
            .map(|member| Peer {
                id: member.id,
                address: member.address,
            })
            .collect();
        wanted.sort_by_key(|peer| peer.id);
        if transport.peers() != wanted {
            transport.set_peers(&wanted);
        }
        tokio::select! {
            changed = applied.changed() => {
                if changed.is_err() {
                    debug!("The node stopped; no more route updates.");
                    return;
                }
            }
            _ = retry.tick() => {}
        }
    }
}

/// How often routes are compared with the registry even when nothing was applied.
const RETRY_ROUTES: std::time::Duration = std::time::Duration::from_secs(5);
