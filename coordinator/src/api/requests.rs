//! Requests for approval over RPC: list, show, approve, deny, review. Who may decide is the
//! gate's and [`Context::authorize`]'s (an approver on every environment and service of the
//! request); what a decision may do (not the requester's, once per person, the exact plan) is
//! `apply()`'s, so every member judges alike.

use rewind_proto::v1 as pb;
use tonic::Status;

use super::status::{invalid, to_status};
use super::validate::{PageRequest, one_page, parse_id, required_reason};
use super::{Context, convert, targets};
use crate::access::Caller;
use crate::errors::CoordinatorError;
use crate::state_machine::{
    ApprovalRequest, CommandKind, Outcome, RequestDecision, State, request_id,
};

/// Everything a request acts on (see [`targets::request`]).
fn request_targets(state: &State, number: u64) -> Vec<crate::access::Target> {
    state
        .approval_requests
        .get(&number)
        .map(|request| targets::request(state, request))
        .unwrap_or_default()
}

fn unknown(number: u64) -> Status {
    to_status(CoordinatorError::UnknownRequest {
        request_id: request_id(number),
    })
}

fn converted(state: &State, record: &ApprovalRequest) -> pb::ApprovalRequest {
    convert::approval_request(state, record, true)
}

pub async fn list(
    context: &Context,
    caller: &Caller,
    request: pb::ListRequestsRequest,
) -> Result<pb::ListRequestsResponse, Status> {
    let page = PageRequest::new(request.page_size, &request.page_token);
    let (size, before) = (page.size()?, page.before("req")?);
    context.current().await?;
    let (requests, next_page_token) = context.node.read(|state| {
        let requests = state
            .approval_requests
            .range(..before)
            .rev()
            .map(|(_, record)| record)
            .filter(|record| {
                !request.open_only || (record.is_open() && !convert::is_overdue(record))
            })
            .filter(|record| caller.may_see(&targets::request(state, record)))
            .map(|record| convert::approval_request(state, record, false));
        one_page(size, requests, |listed| listed.request_id.clone())
    });
    Ok(pb::ListRequestsResponse {
        requests,
        next_page_token,
    })
}

pub async fn get(
    context: &Context,
    caller: &Caller,
    request: pb::GetRequestRequest,
) -> Result<pb::ApprovalRequest, Status> {
    let number = parse_id("request_id", "req", &request.request_id)?;
    context.current().await?;
    let targets = context.node.read(|state| request_targets(state, number));
    context.authorize_found(caller, &targets, || unknown(number))?;
    context.node.read(|state| {
        state
            .approval_requests
            .get(&number)
            .map(|record| converted(state, record))
            .ok_or_else(|| unknown(number))
    })
}

/// Approves, denies or reviews; answers the request as it is after. An approval that found the
/// request lapsed or expired is refused with why (and the request records it).
pub async fn decide(
    context: &Context,
    caller: &Caller,
    decision: RequestDecision,
    request: pb::RequestDecision,
) -> Result<pb::ApprovalRequest, Status> {
    let number = parse_id("request_id", "req", &request.request_id)?;
    required_reason(
        &request.reason,
        "say why: it goes into the audit log and the request",
    )?;
    if decision == RequestDecision::Approve {
        if request.plan_hash.is_empty() {
            return Err(invalid(
                "plan_hash",
                "name the plan you approve (its hash from `rewindctl request show`)",
            ));
        }
        rewind_shared::names::validate_digest("plan_hash", &request.plan_hash)
            .map_err(|error| to_status(error.into()))?;
    }
    context.current().await?;
    let targets = context.node.read(|state| request_targets(state, number));
    context.authorize_found(caller, &targets, || unknown(number))?;
    // A deploy starts from the health as it is when it is approved, not when it was asked for.
    let deploy_service = context.node.read(|state| {
        state
            .approval_requests
            .get(&number)
            .and_then(|record| record.deploy.as_ref())
            .map(|spec| spec.service.clone())
    });
    let baseline = match (&deploy_service, decision) {
        (Some(service), RequestDecision::Approve) => Some(context.change_baseline(service)),
        _ => None,
    };
    let kind = CommandKind::DecideRequest(crate::state_machine::DecideRequest {
        request: number,
        decision,
        plan_hash: request.plan_hash,
        reason: request.reason,
        baseline,
        planned: None,
    });
    let outcome = context
        .propose(&caller.id(), &request.idempotency_key, kind)
        .await?;
    if let Outcome::RequestRefused { why, .. } = outcome {
        return Err(to_status(CoordinatorError::RequestRefused {
            request_id: request_id(number),
            why,
        }));
    }
    context.node.read(|state| {
        state
            .approval_requests
            .get(&number)
            .map(|record| converted(state, record))
            .ok_or_else(|| unknown(number))
    })
}
