//! The access policy's RPCs: show, apply (admin, audited with what changed), and "may X do Y?".

use rewind_proto::v1 as pb;
use tonic::Status;

use super::Context;
use super::status::{invalid, to_status};
use crate::access::permissions;
use crate::access::policy::{MAX_POLICY_BYTES, ScopePattern};
use crate::access::{Caller, Policy, Principal, Target};
use crate::state_machine::{CommandKind, version};

/// The policy in force (an empty one with version 0 before the bootstrap policy).
pub fn show(context: &Context) -> pb::Policy {
    context.node.read(|state| {
        let policy = state.access.policy.as_deref().cloned().unwrap_or_default();
        pb::Policy {
            toml: policy.to_toml(),
            hash: if state.access.policy.is_some() {
                policy.hash()
            } else {
                String::new()
            },
            version: state.access.version,
            summary: String::new(),
        }
    })
}

pub async fn apply(
    context: &Context,
    caller: &Caller,
    request: pb::ApplyPolicyRequest,
) -> Result<pb::Policy, Status> {
    if request.toml.len() > MAX_POLICY_BYTES {
        return Err(invalid(
            "toml",
            format!(
                "is {} bytes, at most {MAX_POLICY_BYTES}",
                request.toml.len()
            ),
        ));
    }
    if request.dry_run {
        // A diff changes nothing and audits nothing: no reason to give.
        super::validate::validate_reason(&request.reason)?;
    } else {
        super::validate::required_reason(
            &request.reason,
            "say why the policy changes: it goes into the audit log",
        )?;
    }
    if !request.expected_hash.is_empty()
        && (request.expected_hash.len() != 64
            || !request.expected_hash.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(invalid(
            "expected_hash",
            "must be 64 hex digits (from `access policy show`)",
        ));
    }
    let policy = Policy::from_toml(&request.toml)
        .map_err(|problems| invalid("toml", problems.join("; ")))?;
    if !policy.host_rules.is_empty() {
        // Checked before proposing too: a member of an older release could not read it.
        context
            .node
            .read(|state| version::require(state, 2, "[[hosts]] rules in the access policy"))
            .map_err(to_status)?;
    }
    if request.dry_run {
        let summary = context.node.read(|state| match &state.access.policy {
            Some(before) => crate::access::policy::summarize_change(before, &policy),
            None => "the first policy".into(),
        });
        return Ok(pb::Policy {
            toml: policy.to_toml(),
            hash: policy.hash(),
            version: context.node.read(|state| state.access.version),
            summary,
        });
    }
    let reason = if request.reason.trim().is_empty() {
        format!("applied by {}", caller.id())
    } else {
        request.reason
    };
    let kind = CommandKind::ApplyPolicy {
        policy,
        bootstrap: false,
        expected_hash: request.expected_hash,
        reason,
    };
    let before = context.node.read(|state| state.access.policy.clone());
    context
        .propose(&caller.id(), &request.request_id, kind)
        .await?;
    // The next call, this caller's or anyone's, is judged by the policy just applied.
    context.gate.refresh_policy();
    let mut shown = show(context);
    if let (Some(before), Some(after)) = (
        before,
        context.node.read(|state| state.access.policy.clone()),
    ) {
        shown.summary = crate::access::policy::summarize_change(&before, &after);
    }
    Ok(shown)
}

pub fn check(
    context: &Context,
    request: &pb::CheckAccessRequest,
) -> Result<pb::CheckAccessResponse, Status> {
    let mut principal =
        Principal::parse(&request.identity).map_err(|problem| invalid("identity", problem))?;
    if request.groups.len() > rewind_shared::identity::MAX_GROUPS {
        return Err(invalid(
            "groups",
            format!("more than {} groups", rewind_shared::identity::MAX_GROUPS),
        ));
    }
    for group in &request.groups {
        rewind_shared::identity::validate_group(group)
            .map_err(|error| invalid("groups", error.to_string()))?;
    }
    principal.groups = request.groups.clone();
    let permission = permissions::by_action(&request.action).ok_or_else(|| {
        invalid(
            "action",
            format!(
                "{:?} is not an action; the actions are: {}",
                rewind_shared::names::truncate(&request.action, 64),
                permissions::actions().collect::<Vec<_>>().join(", ")
            ),
        )
    })?;
    let target = parse_target(&request.target)?;
    let decision = context.node.read(|state| {
        crate::access::decide(
            state.access.policy.as_deref(),
            &principal,
            permission.level,
            &target,
        )
    });
    Ok(pb::CheckAccessResponse {
        allowed: decision.allowed,
        binding: decision.binding.unwrap_or_default(),
        reason: decision.reason,
    })
}

/// `*` is the cluster; `SERVICE` a service in every environment; `ENVIRONMENT/SERVICE` one.
fn parse_target(text: &str) -> Result<Target, Status> {
    if text == ScopePattern::ANY {
        return Ok(Target::Cluster);
    }
    let field = |error: rewind_shared::SharedError| invalid("target", error.to_string());
    match text.split_once('/') {
        None => {
            rewind_shared::names::validate_name("target", text).map_err(field)?;
            Ok(Target::Service(text.to_string()))
        }
        Some((environment, service)) => {
            rewind_shared::names::validate_name("target", environment).map_err(field)?;
            rewind_shared::names::validate_name("target", service).map_err(field)?;
            Ok(Target::scoped(environment, service))
        }
    }
}
