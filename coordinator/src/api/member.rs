//! `MemberService`: what this member holds, served by every member (no leader check), so
//! operators and fault-injection runs can compare members. Read-only.

use rewind_proto::v1::{self as pb, member_service_server::MemberService};
use tonic::{Request, Response, Status};

use super::Context;
use crate::state_machine::version;

pub struct Member {
    pub context: Context,
}

#[tonic::async_trait]
impl MemberService for Member {
    async fn get_member_status(
        &self,
        request: Request<pb::GetMemberStatusRequest>,
    ) -> Result<Response<pb::MemberStatus>, Status> {
        let brief = brief_status(&self.context);
        if request.into_inner().brief {
            return Ok(Response::new(brief));
        }
        let (applied_index, state_digest, audit, archive) = self.context.node.read(|state| {
            let bytes = serde_json::to_vec(state).unwrap_or_default();
            (
                state.applied_index,
                rewind_shared::digest::sha256_digest(&bytes),
                state.audit.clone(),
                state.archive_snapshot(),
            )
        });
        // Verified off the state's lock: the entries are shared, or in the store.
        let audit = audit.verify();
        let archive_digest = archive
            .digest()
            .map_err(|error| Status::internal(format!("the archive cannot be read: {error}")))?;
        Ok(Response::new(pb::MemberStatus {
            // Applied index and digest from the same read, so they describe the same state.
            applied_index,
            state_digest,
            audit_ok: audit.first_broken.is_none(),
            audit_entries: audit.entries,
            audit_digest: audit.content_digest,
            archive_digest,
            ..brief
        }))
    }
}

/// What this member says of itself cheaply (id, role, term, indexes, versions).
pub(super) fn brief_status(context: &Context) -> pb::MemberStatus {
    let status = context.status.borrow().clone();
    pb::MemberStatus {
        member_id: status.id,
        is_leader: status.is_leader,
        term: status.term,
        applied_index: status.applied_index,
        commit_index: status.commit_index,
        cluster_id: context.cluster_id.clone(),
        min_cluster_version: version::LEGACY,
        max_cluster_version: version::CURRENT,
        release: env!("CARGO_PKG_VERSION").into(),
        cluster_version: context.node.read(|state| state.cluster_version()),
        ..pb::MemberStatus::default()
    }
}
