//! Feature flags, and the automatic triggers with their breaker.

use super::*;

pub(super) async fn set_flag(
    control: &Control,
    request: Request<pb::SetFlagRequest>,
) -> Result<Response<pb::Flag>, Status> {
    let caller = caller(&request)?;
    let identity = caller.id();
    let request = request.into_inner();
    let environment = if request.environment.is_empty() {
        crate::plan::DEFAULT_ENVIRONMENT.to_string()
    } else {
        request.environment
    };
    names::validate_name("environment", &environment).map_err(field_error)?;
    names::validate_name("service", &request.service).map_err(field_error)?;
    names::validate_name("name", &request.name).map_err(field_error)?;
    required_reason(
        &request.reason,
        "say why you set the flag: it goes into the audit log",
    )?;
    if request.kill && request.enabled {
        return Err(invalid("enabled", "a kill switch turns a flag off"));
    }
    // The target is the request's own: no read barrier (a quorum round per write).
    control
        .context
        .authorize(&caller, &[Target::scoped(&environment, &request.service)])?;
    let kind = CommandKind::SetFlag {
        environment: environment.clone(),
        service: request.service.clone(),
        name: request.name.clone(),
        enabled: request.enabled,
        kill: request.kill,
        reason: request.reason,
    };
    let flag = control
        .context
        .propose_and_read(&identity, &request.request_id, kind, |state, _| {
            state
                .flag(&environment, &request.service, &request.name)
                .map(|record| {
                    convert::flag([&environment, &request.service, &request.name], record)
                })
        })
        .await?;
    info!(
        identity,
        environment,
        service = request.service,
        flag = request.name,
        enabled = request.enabled,
        kill = request.kill,
        "Flag set."
    );
    flag.map(Response::new)
        .ok_or_else(|| Status::internal("the flag was set but is not in the state"))
}

pub(super) async fn list_flags(
    control: &Control,
    request: Request<pb::ListFlagsRequest>,
) -> Result<Response<pb::ListFlagsResponse>, Status> {
    let caller = caller(&request)?;
    control.context.current().await?;
    let request = request.into_inner();
    let flags = control.context.node.read(|state| {
        let mut flags = Vec::new();
        for (environment, services) in &state.flags {
            if !request.environment.is_empty() && *environment != request.environment {
                continue;
            }
            for (service, named) in services {
                if !request.service.is_empty() && *service != request.service {
                    continue;
                }
                if !caller.may_see(&[Target::scoped(environment, service)]) {
                    continue;
                }
                for (name, record) in named {
                    flags.push(convert::flag([environment, service, name], record));
                }
            }
        }
        flags
    });
    Ok(Response::new(pb::ListFlagsResponse { flags }))
}

pub(super) async fn list_triggers(
    control: &Control,
    request: Request<pb::ListTriggersRequest>,
) -> Result<Response<pb::ListTriggersResponse>, Status> {
    let caller = caller(&request)?;
    control.context.current().await?;
    let request = request.into_inner();
    #[allow(deprecated)] // The name before 0.3, read for one release.
    let limit = PageRequest {
        size: request.page_size,
        // Before 0.3 a larger limit was cut to the most, not refused.
        legacy_size: request.limit.min(MAX_LIST_PAGE),
        token: "",
        legacy_token: ("", ""),
    }
    .size()?;
    let answer = control
        .context
        .node
        .read(|state| visible_triggers(state, &caller, limit));
    Ok(Response::new(answer))
}

/// The newest `limit` triggers the caller may see, and the breaker.
fn visible_triggers(
    state: &State,
    caller: &crate::api::Caller,
    limit: usize,
) -> pb::ListTriggersResponse {
    let mut answer = convert::triggers(state, limit, |environment, service| {
        caller.may_see(&[Target::scoped(environment, service)])
    });
    // Which services tripped the breaker is the whole cluster's business.
    if !caller.may_see(&[Target::Cluster]) {
        answer.breaker_services.clear();
    }
    answer
}

pub(super) async fn reset_breaker(
    control: &Control,
    request: Request<pb::ResetBreakerRequest>,
) -> Result<Response<pb::ListTriggersResponse>, Status> {
    let caller = caller(&request)?;
    let identity = caller.id();
    let request = request.into_inner();
    required_reason(
        &request.reason,
        "say why monitoring can be trusted again: it goes into the audit log",
    )?;
    let kind = CommandKind::ResetBreaker {
        reason: request.reason,
    };
    let triggers = control
        .context
        .propose_and_read(&identity, &request.request_id, kind, |state, _| {
            visible_triggers(state, &caller, DEFAULT_LIST_PAGE)
        })
        .await?;
    info!(identity, "Global breaker reset.");
    Ok(Response::new(triggers))
}
