//! `ControlService`: what people and tools call.
//!
//! Each handler validates its input first (naming the field at fault; see `api/validate.rs`),
//! then either reads the state or proposes one command and answers from the state it left
//! (`Context::propose_and_read`). Nothing is proposed for a request that fails validation.
//!
//! The trait is implemented here in one place, each method handing over to the module of its
//! resource: `hosts`, `services` (and releases), `schema` (migrations, transactions, drills),
//! `changes`, `rollbacks`, `flags` (and triggers), `audit`. Cluster, policy, requests and join tokens have
//! their own modules beside this one (`api/cluster.rs`, `api/policy.rs`, ...).

use std::pin::Pin;

use rewind_proto::v1::{self as pb, control_service_server::ControlService};
use rewind_shared::names;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::info;

use super::gate::caller;
use super::status::{invalid, to_status};
use super::validate::*;
use super::{Context, convert, plans, targets};
use crate::access::Target;
use crate::state_machine::archive::{ArchiveKind, ArchivedRecord};
use crate::state_machine::*;

pub(super) mod archive;
mod audit;
mod changes;
mod drills;
mod flags;
mod hosts;
mod incidents;
mod rollbacks;
mod schema;
mod services;

pub struct Control {
    pub context: Context,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::GetRollbackResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ControlService for Control {
    async fn list_hosts(
        &self,
        request: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        hosts::list_hosts(self, request).await
    }

    async fn forget_host(
        &self,
        request: Request<pb::ForgetHostRequest>,
    ) -> Result<Response<pb::ForgetHostResponse>, Status> {
        hosts::forget_host(self, request).await
    }

    async fn put_service(
        &self,
        request: Request<pb::PutServiceRequest>,
    ) -> Result<Response<pb::PutServiceResponse>, Status> {
        services::put_service(self, request).await
    }

    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        services::list_services(self, request).await
    }

    async fn register_migration(
        &self,
        request: Request<pb::RegisterMigrationRequest>,
    ) -> Result<Response<pb::RegisterMigrationResponse>, Status> {
        schema::register_migration(self, request).await
    }

    async fn list_schema_txns(
        &self,
        request: Request<pb::ListSchemaTxnsRequest>,
    ) -> Result<Response<pb::ListSchemaTxnsResponse>, Status> {
        schema::list_schema_txns(self, request).await
    }

    async fn resolved_by_hand(
        &self,
        request: Request<pb::ResolvedByHandRequest>,
    ) -> Result<Response<pb::SchemaTxnResponse>, Status> {
        schema::resolved_by_hand(self, request).await
    }

    async fn start_drill(
        &self,
        request: Request<pb::StartDrillRequest>,
    ) -> Result<Response<pb::DrillResponse>, Status> {
        schema::start_drill(self, request).await
    }

    async fn start_rollback_drill(
        &self,
        request: Request<pb::StartRollbackDrillRequest>,
    ) -> Result<Response<pb::RollbackDrillResponse>, Status> {
        drills::start_rollback_drill(self, request).await
    }

    async fn get_rollback_drill(
        &self,
        request: Request<pb::GetRollbackDrillRequest>,
    ) -> Result<Response<pb::RollbackDrillResponse>, Status> {
        drills::get_rollback_drill(self, request).await
    }

    async fn list_rollback_drills(
        &self,
        request: Request<pb::ListRollbackDrillsRequest>,
    ) -> Result<Response<pb::ListRollbackDrillsResponse>, Status> {
        drills::list_rollback_drills(self, request).await
    }

    async fn abort_rollback_drill(
        &self,
        request: Request<pb::AbortRollbackDrillRequest>,
    ) -> Result<Response<pb::RollbackDrillResponse>, Status> {
        drills::abort_rollback_drill(self, request).await
    }

    async fn get_drill(
        &self,
        request: Request<pb::GetDrillRequest>,
    ) -> Result<Response<pb::DrillResponse>, Status> {
        schema::get_drill(self, request).await
    }

    async fn list_migrations(
        &self,
        request: Request<pb::ListMigrationsRequest>,
    ) -> Result<Response<pb::ListMigrationsResponse>, Status> {
        schema::list_migrations(self, request).await
    }

    async fn register_release(
        &self,
        request: Request<pb::RegisterReleaseRequest>,
    ) -> Result<Response<pb::RegisterReleaseResponse>, Status> {
        services::register_release(self, request).await
    }

    async fn list_releases(
        &self,
        request: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        services::list_releases(self, request).await
    }

    async fn start_change(
        &self,
        request: Request<pb::StartChangeRequest>,
    ) -> Result<Response<pb::StartChangeResponse>, Status> {
        changes::start_change(self, request).await
    }

    async fn get_change(
        &self,
        request: Request<pb::GetChangeRequest>,
    ) -> Result<Response<pb::GetChangeResponse>, Status> {
        changes::get_change(self, request).await
    }

    async fn list_changes(
        &self,
        request: Request<pb::ListChangesRequest>,
    ) -> Result<Response<pb::ListChangesResponse>, Status> {
        changes::list_changes(self, request).await
    }

    async fn plan_rollback(
        &self,
        request: Request<pb::PlanRollbackRequest>,
    ) -> Result<Response<pb::PlanRollbackResponse>, Status> {
        rollbacks::plan_rollback(self, request).await
    }

    async fn start_rollback(
        &self,
        request: Request<pb::StartRollbackRequest>,
    ) -> Result<Response<pb::StartRollbackResponse>, Status> {
        rollbacks::start_rollback(self, request).await
    }

    async fn skip_host(
        &self,
        request: Request<pb::RollbackActionRequest>,
    ) -> Result<Response<pb::GetRollbackResponse>, Status> {
        rollbacks::skip_host(self, request).await
    }

    async fn isolate_service(
        &self,
        request: Request<pb::RollbackActionRequest>,
    ) -> Result<Response<pb::GetRollbackResponse>, Status> {
        rollbacks::isolate_service(self, request).await
    }

    async fn explain_rollback(
        &self,
        request: Request<pb::GetRollbackRequest>,
    ) -> Result<Response<pb::ExplainRollbackResponse>, Status> {
        rollbacks::explain_rollback(self, request).await
    }

    async fn get_rollback(
        &self,
        request: Request<pb::GetRollbackRequest>,
    ) -> Result<Response<pb::GetRollbackResponse>, Status> {
        rollbacks::get_rollback(self, request).await
    }

    async fn list_rollbacks(
        &self,
        request: Request<pb::ListRollbacksRequest>,
    ) -> Result<Response<pb::ListRollbacksResponse>, Status> {
        rollbacks::list_rollbacks(self, request).await
    }

    type WatchRollbackStream = WatchStream;

    async fn watch_rollback(
        &self,
        request: Request<pb::GetRollbackRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        rollbacks::watch_rollback(self, request).await
    }

    async fn pause_rollback(
        &self,
        request: Request<pb::RollbackActionRequest>,
    ) -> Result<Response<pb::GetRollbackResponse>, Status> {
        self.control(request, RollbackAction::Pause).await
    }

    async fn resume_rollback(
        &self,
        request: Request<pb::RollbackActionRequest>,
    ) -> Result<Response<pb::GetRollbackResponse>, Status> {
        self.control(request, RollbackAction::Resume).await
    }

    async fn abort_rollback(
        &self,
        request: Request<pb::RollbackActionRequest>,
    ) -> Result<Response<pb::GetRollbackResponse>, Status> {
        self.control(request, RollbackAction::Abort).await
    }

    async fn set_flag(
        &self,
        request: Request<pb::SetFlagRequest>,
    ) -> Result<Response<pb::Flag>, Status> {
        flags::set_flag(self, request).await
    }

    async fn list_flags(
        &self,
        request: Request<pb::ListFlagsRequest>,
    ) -> Result<Response<pb::ListFlagsResponse>, Status> {
        flags::list_flags(self, request).await
    }

    async fn list_triggers(
        &self,
        request: Request<pb::ListTriggersRequest>,
    ) -> Result<Response<pb::ListTriggersResponse>, Status> {
        flags::list_triggers(self, request).await
    }

    async fn reset_breaker(
        &self,
        request: Request<pb::ResetBreakerRequest>,
    ) -> Result<Response<pb::ListTriggersResponse>, Status> {
        flags::reset_breaker(self, request).await
    }

    async fn list_members(
        &self,
        _request: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        Ok(Response::new(self.members().await))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let caller = caller(&request)?;
        let identity = caller.id();
        let request = request.into_inner();
        required_reason(
            &request.reason,
            "say why leadership moves: it goes into the audit log",
        )?;
        let to = request.member_id;
        if self.context.directory.get(to).is_none() {
            return Err(super::cluster::not_a_member(&self.context, to));
        }
        if to == self.context.status.borrow().id {
            return Err(invalid("member_id", format!("member {to} already leads")));
        }
        let reason = request.reason;
        self.context
            .propose(
                &identity,
                &request.request_id,
                CommandKind::TransferLeader { to, reason },
            )
            .await?;
        self.context
            .node
            .transfer_leader(to)
            .await
            .map_err(to_status)?;
        info!(identity, to, "Leadership hand-over requested.");
        Ok(Response::new(self.members().await))
    }

    async fn add_member(
        &self,
        request: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let caller = caller(&request)?;
        let identity = caller.id();
        super::cluster::add_member(&self.context, &identity, request.into_inner()).await?;
        Ok(Response::new(self.members().await))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let caller = caller(&request)?;
        let identity = caller.id();
        super::cluster::remove_member(&self.context, &identity, request.into_inner()).await?;
        Ok(Response::new(self.members().await))
    }

    async fn get_cluster_version(
        &self,
        _request: Request<pb::GetClusterVersionRequest>,
    ) -> Result<Response<pb::ClusterVersion>, Status> {
        self.context.current().await?;
        Ok(Response::new(super::upgrade::show(&self.context).await))
    }

    async fn finalize_upgrade(
        &self,
        request: Request<pb::FinalizeUpgradeRequest>,
    ) -> Result<Response<pb::ClusterVersion>, Status> {
        let caller = caller(&request)?;
        super::upgrade::finalize(&self.context, &caller.id(), request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        audit::list_audit(self, request).await
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        audit::verify_audit(self, request).await
    }

    async fn list_incidents(
        &self,
        request: Request<pb::ListIncidentsRequest>,
    ) -> Result<Response<pb::ListIncidentsResponse>, Status> {
        incidents::list_incidents(self, request).await
    }

    async fn get_incident(
        &self,
        request: Request<pb::GetIncidentRequest>,
    ) -> Result<Response<pb::Incident>, Status> {
        incidents::get_incident(self, request).await
    }

    async fn note_incident(
        &self,
        request: Request<pb::NoteIncidentRequest>,
    ) -> Result<Response<pb::Incident>, Status> {
        incidents::note_incident(self, request).await
    }

    async fn close_incident(
        &self,
        request: Request<pb::CloseIncidentRequest>,
    ) -> Result<Response<pb::Incident>, Status> {
        incidents::close_incident(self, request).await
    }

    async fn get_runbook(
        &self,
        request: Request<pb::GetRunbookRequest>,
    ) -> Result<Response<pb::Runbook>, Status> {
        incidents::get_runbook(self, request).await
    }

    async fn confirm_audit_archive(
        &self,
        request: Request<pb::ConfirmAuditArchiveRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        audit::confirm_audit_archive(self, request).await
    }

    async fn redact_audit(
        &self,
        request: Request<pb::RedactAuditRequest>,
    ) -> Result<Response<pb::AuditEntry>, Status> {
        audit::redact_audit(self, request).await
    }

    type ExportAuditStream = audit::ExportStream;

    async fn export_audit(
        &self,
        request: Request<pb::ExportAuditRequest>,
    ) -> Result<Response<audit::ExportStream>, Status> {
        audit::export_audit(self, request).await
    }

    async fn inspect_host(
        &self,
        request: Request<pb::InspectHostRequest>,
    ) -> Result<Response<pb::InspectHostResponse>, Status> {
        hosts::inspect_host(self, request).await
    }

    async fn adopt_host_state(
        &self,
        request: Request<pb::AdoptHostStateRequest>,
    ) -> Result<Response<pb::InspectHostResponse>, Status> {
        hosts::adopt_host_state(self, request).await
    }

    async fn get_policy(
        &self,
        _request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        self.context.current().await?;
        Ok(Response::new(super::policy::show(&self.context)))
    }

    async fn apply_policy(
        &self,
        request: Request<pb::ApplyPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let caller = caller(&request)?;
        let policy = super::policy::apply(&self.context, &caller, request.into_inner()).await?;
        info!(
            identity = caller.id(),
            version = policy.version,
            "Access policy applied."
        );
        Ok(Response::new(policy))
    }

    async fn check_access(
        &self,
        request: Request<pb::CheckAccessRequest>,
    ) -> Result<Response<pb::CheckAccessResponse>, Status> {
        self.context.current().await?;
        super::policy::check(&self.context, request.get_ref()).map(Response::new)
    }

    async fn list_requests(
        &self,
        request: Request<pb::ListRequestsRequest>,
    ) -> Result<Response<pb::ListRequestsResponse>, Status> {
        let caller = caller(&request)?;
        super::requests::list(&self.context, &caller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_request(
        &self,
        request: Request<pb::GetRequestRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let caller = caller(&request)?;
        super::requests::get(&self.context, &caller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let caller = caller(&request)?;
        let created =
            super::join::create_token(&self.context, &caller, request.into_inner()).await?;
        info!(
            identity = caller.id(),
            token = created
                .details
                .as_ref()
                .map(|token| token.token_id.as_str()),
            "Join token created."
        );
        Ok(Response::new(created))
    }

    async fn list_join_tokens(
        &self,
        request: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
        super::join::list_tokens(&self.context, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn revoke_join_token(
        &self,
        request: Request<pb::RevokeJoinTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        let caller = caller(&request)?;
        super::join::revoke_token(&self.context, &caller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn approve_request(
        &self,
        request: Request<pb::RequestDecision>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        self.decide_request(request, RequestDecision::Approve).await
    }

    async fn deny_request(
        &self,
        request: Request<pb::RequestDecision>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        self.decide_request(request, RequestDecision::Deny).await
    }

    async fn review_request(
        &self,
        request: Request<pb::RequestDecision>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        self.decide_request(request, RequestDecision::Review).await
    }

    async fn get_service_health(
        &self,
        request: Request<pb::GetServiceHealthRequest>,
    ) -> Result<Response<pb::GetServiceHealthResponse>, Status> {
        services::get_service_health(self, request).await
    }
}

impl Control {
    async fn decide_request(
        &self,
        request: Request<pb::RequestDecision>,
        decision: RequestDecision,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let caller = caller(&request)?;
        let decided =
            super::requests::decide(&self.context, &caller, decision, request.into_inner()).await?;
        info!(
            identity = caller.id(),
            request_id = decided.request_id,
            status = decided.status,
            "Request {}.",
            match decision {
                RequestDecision::Approve => "approved",
                RequestDecision::Deny => "denied",
                RequestDecision::Review => "reviewed",
            }
        );
        Ok(Response::new(decided))
    }

    async fn members(&self) -> pb::ListMembersResponse {
        super::cluster::list(&self.context).await
    }
}
