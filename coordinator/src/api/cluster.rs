//! The cluster part of `ControlService`: list members, add, remove, hand leadership over.
//!
//! Adding a member is two audited Raft conf changes: it joins as a learner (it receives the log
//! but does not count toward quorum, so a member that never starts cannot stall the cluster),
//! and once it has caught up with the commit index it is promoted to voter.

use std::net::SocketAddr;
use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_proto::v1::member_service_client::MemberServiceClient;
use rewind_shared::names;
use tonic::Status;
use tracing::info;

use super::Context;
use super::status::{invalid, to_status};
use crate::errors::CoordinatorError;
use crate::state_machine::{Command, CommandKind, MemberRecord, MembershipChange, version};

/// Catch-up wait when the request does not say, and the most it may ask for.
const DEFAULT_CATCH_UP_S: u32 = 60;
const MAX_CATCH_UP_S: u32 = 600;
/// A learner this close to the leader's commit index counts as caught up.
const CAUGHT_UP_LAG: u64 = 10;
const CATCH_UP_POLL: Duration = Duration::from_millis(200);
/// How long `cluster list` waits for each member to say what it has applied.
const ASK_MEMBER_TIMEOUT: Duration = Duration::from_secs(1);

/// Members with their role and replication progress as this member (the leader) sees them, and
/// the applied index each reports when asked (at most a second each, all at once).
pub async fn list(context: &Context) -> pb::ListMembersResponse {
    let status = context.status.borrow().clone();
    let members = ask_members(context)
        .await
        .into_iter()
        .map(|(member, answer)| {
            let applied = answer.map(|answer| answer.applied_index);
            let progress = status.peers.iter().find(|peer| peer.id == member.id);
            let matched_index = progress.map_or(0, |peer| peer.matched_index);
            let role = match progress {
                _ if member.id == status.id => "leader",
                Some(peer) if peer.is_learner => "learner",
                Some(_) => "follower",
                None => "unknown",
            };
            pb::ClusterMember {
                id: member.id,
                address: member.address,
                region: member.region,
                role: role.into(),
                matched_index,
                lag: status.last_index.saturating_sub(matched_index),
                recently_active: progress.is_some_and(|peer| peer.recently_active),
                applied_index: applied.unwrap_or(0),
                answered: applied.is_some(),
                snapshot_in_flight: progress.is_some_and(|peer| peer.snapshot_in_flight),
            }
        })
        .collect();
    pb::ListMembersResponse {
        members,
        term: status.term,
        commit_index: status.commit_index,
        cluster_id: context.cluster_id.clone(),
    }
}

/// Every member of the registry with its brief status (this member's own, the others' asked
/// all at once, at most [`ASK_MEMBER_TIMEOUT`] each; `None` when one did not answer).
pub(super) async fn ask_members(
    context: &Context,
) -> Vec<(MemberRecord, Option<pb::MemberStatus>)> {
    let own_id = context.status.borrow().id;
    let members = context.directory.members();
    let answers = futures::future::join_all(members.iter().map(|member| async move {
        if member.id == own_id {
            return Some(super::member::brief_status(context));
        }
        tokio::time::timeout(ASK_MEMBER_TIMEOUT, member_status(context, member))
            .await
            .ok()
            .flatten()
    }))
    .await;
    members.into_iter().zip(answers).collect()
}

/// Asks a member for its brief status over `MemberService`, with this member's certificate.
async fn member_status(context: &Context, member: &MemberRecord) -> Option<pb::MemberStatus> {
    let connector = rewind_shared::member_tls::MemberConnector::for_member(
        &context.tls,
        member.id,
        context.gate.accepts_legacy(),
    )
    .ok()?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", member.address))
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector(connector)
        .await
        .ok()?;
    MemberServiceClient::new(channel)
        .get_member_status(pb::GetMemberStatusRequest { brief: true })
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

pub async fn add_member(
    context: &Context,
    identity: &str,
    request: pb::AddMemberRequest,
) -> Result<(), Status> {
    let member = member_record(&request)?;
    let catch_up = match request.catch_up_timeout_s {
        0 => DEFAULT_CATCH_UP_S,
        seconds if seconds <= MAX_CATCH_UP_S => seconds,
        seconds => {
            return Err(invalid(
                "catch_up_timeout_s",
                format!("is {seconds}, must be within 1..={MAX_CATCH_UP_S}"),
            ));
        }
    };
    let reason = request.reason;
    let known = context.directory.members();
    if let Some(clash) = known
        .iter()
        .find(|known| known.id != member.id && known.address == member.address)
    {
        return Err(invalid(
            "address",
            format!(
                "{} is already member {}'s address",
                member.address, clash.id
            ),
        ));
    }
    match known.iter().find(|known| known.id == member.id) {
        Some(existing) if *existing != member => {
            return Err(invalid(
                "member_id",
                format!(
                    "member {} is already in the cluster as {} in {} ({}); remove it first to change it",
                    existing.id, existing.address, existing.region, existing.name
                ),
            ));
        }
        Some(_) if !is_learner(context, member.id) => {
            // Already a voter: adding it again changes nothing.
            return Ok(());
        }
        Some(_) => {}
        None => {
            check_member_certificate(context, &member).await?;
            propose(
                context,
                identity,
                MembershipChange::AddLearner,
                &member,
                &reason,
            )
            .await?;
            info!(identity, id = member.id, address = %member.address, "Member added as a learner.");
        }
    }
    if request.learner_only {
        return Ok(());
    }
    wait_for_catch_up(context, member.id, Duration::from_secs(catch_up.into())).await?;
    propose(
        context,
        identity,
        MembershipChange::Promote,
        &member,
        &reason,
    )
    .await?;
    info!(identity, id = member.id, "Learner promoted to voter.");
    Ok(())
}

pub async fn remove_member(
    context: &Context,
    identity: &str,
    request: pb::RemoveMemberRequest,
) -> Result<(), Status> {
    super::validate::required_reason(
        &request.reason,
        "say why the member leaves: it goes into the audit log",
    )?;
    let Some(member) = context.directory.get(request.member_id) else {
        return Err(not_a_member(context, request.member_id));
    };
    let reason = request.reason;
    propose(
        context,
        identity,
        MembershipChange::Remove,
        &member,
        &reason,
    )
    .await?;
    info!(identity, id = member.id, "Member removed.");
    Ok(())
}

/// `member_id` names no member: say which ones there are.
pub fn not_a_member(context: &Context, id: u64) -> Status {
    let known: Vec<String> = context
        .directory
        .members()
        .iter()
        .map(|member| member.id.to_string())
        .collect();
    invalid(
        "member_id",
        format!("{id} is not a member: members are {}", known.join(", ")),
    )
}

/// Validates the request's member, naming the field at fault.
/// How long `cluster add` waits for the new member to answer.
const MEMBER_CHECK_WAIT: Duration = Duration::from_secs(10);

/// The member being added must already run at its address and present a certificate of kind
/// member for its own id: a certificate of another kind, or another member's, is refused before
/// anything is proposed.
/// Checks the member runs, presents its certificate, and applies the cluster's version: one that
/// cannot would skip (an older release) or stop at (a newer one) the entries it is sent.
async fn check_member_certificate(context: &Context, member: &MemberRecord) -> Result<(), Status> {
    let status = member_answer(context, member).await?;
    let running = context.node.read(|state| state.cluster_version());
    let supported = status.max_cluster_version.max(version::LEGACY);
    if supported < running {
        let release = if status.release.is_empty() {
            "from before cluster versions"
        } else {
            status.release.as_str()
        };
        return Err(Status::failed_precondition(format!(
            "member {} at {} runs release {release}, which applies cluster versions up to \
             {supported}, and the cluster runs version {running}: start it from this release",
            member.id, member.address
        )));
    }
    Ok(())
}

/// The member's brief status over its certificate, waiting a little for it to listen.
async fn member_answer(
    context: &Context,
    member: &MemberRecord,
) -> Result<pb::MemberStatus, Status> {
    let refused = |why: String| {
        Status::failed_precondition(format!(
            "member {} at {} must be running and present a certificate rewind://member/{}: {why}",
            member.id, member.address, member.id
        ))
    };
    let connector =
        rewind_shared::member_tls::MemberConnector::expecting_member(&context.tls, member.id)
            .map_err(|error| Status::internal(format!("this member's TLS files: {error}")))?;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", member.address))
        .map_err(|error| invalid("address", error.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    // A member started just before `cluster add` may not listen yet: a few tries, bounded.
    let deadline = tokio::time::Instant::now() + MEMBER_CHECK_WAIT;
    loop {
        let answer = match endpoint.connect_with_connector(connector.clone()).await {
            Ok(channel) => MemberServiceClient::new(channel)
                .get_member_status(pb::GetMemberStatusRequest { brief: true })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| status.message().to_string()),
            Err(error) => Err(rewind_shared::errors::error_chain(&error)),
        };
        match answer {
            Ok(status) => return Ok(status),
            Err(why) if tokio::time::Instant::now() >= deadline => return Err(refused(why)),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

fn member_record(request: &pb::AddMemberRequest) -> Result<MemberRecord, Status> {
    if request.member_id == 0 {
        return Err(invalid("member_id", "must be a positive number"));
    }
    let address = &request.address;
    let port_ok = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if address.parse::<SocketAddr>().is_err() && !port_ok {
        return Err(invalid(
            "address",
            format!("{address:?} must be host:port (the address peers and agents dial)"),
        ));
    }
    if !request.region.is_empty() {
        names::validate_name("region", &request.region).map_err(|error| to_status(error.into()))?;
    }
    let name = if request.name.is_empty() {
        format!("coordinator-{}", request.member_id)
    } else {
        request.name.clone()
    };
    names::validate_name("name", &name).map_err(|error| to_status(error.into()))?;
    super::validate::required_reason(
        &request.reason,
        "say why the member joins: it goes into the audit log",
    )?;
    Ok(MemberRecord {
        id: request.member_id,
        address: address.clone(),
        region: request.region.clone(),
        name,
    })
}

fn is_learner(context: &Context, id: u64) -> bool {
    context
        .status
        .borrow()
        .peers
        .iter()
        .any(|peer| peer.id == id && peer.is_learner)
}

async fn propose(
    context: &Context,
    identity: &str,
    change: MembershipChange,
    member: &MemberRecord,
    reason: &str,
) -> Result<(), Status> {
    if context.node.read(|state| state.members.is_empty()) {
        // Data written before the registry existed: a change would make the new member the
        // whole registry and cut routes to the others.
        return Err(to_status(CoordinatorError::MembershipConflict(
            "this cluster's state has no member registry (written by an older version); \
             membership changes need one"
                .into(),
        )));
    }
    let command = Command {
        at_ms: rewind_shared::time::now_ms(),
        identity: identity.to_string(),
        request_id: String::new(),
        audit_seed: String::new(),
        kind: CommandKind::ChangeMembership {
            change,
            member: member.clone(),
            reason: reason.to_string(),
        },
    };
    context
        .node
        .change_membership(command)
        .await
        .map(|_| ())
        .map_err(|error| context.refusal(error))
}

/// Waits until learner `id` holds the log up to (nearly) the leader's commit index.
async fn wait_for_catch_up(context: &Context, id: u64, timeout: Duration) -> Result<(), Status> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (matched, commit) = {
            let status = context.status.borrow();
            if !status.is_leader {
                let leader_id = status.leader_id;
                drop(status);
                return Err(context.refusal(CoordinatorError::NotLeader { leader_id }));
            }
            let matched = status
                .peers
                .iter()
                .find(|peer| peer.id == id)
                .map_or(0, |peer| peer.matched_index);
            (matched, status.commit_index)
        };
        if matched + CAUGHT_UP_LAG >= commit && matched > 0 {
            return Ok(());
        }
        if context.directory.get(id).is_none() {
            return Err(to_status(CoordinatorError::MembershipConflict(format!(
                "member {id} was removed while it was catching up"
            ))));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Status::deadline_exceeded(format!(
                "member {id} joined as a learner but has not caught up within {}s \
                 (it holds the log to {matched}, the cluster has committed {commit}); \
                 check that it runs with cluster.join = true and can reach the leader, \
                 then repeat the add to promote it",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(CATCH_UP_POLL).await;
    }
}
