//! Hosts: the fleet list, forgetting a host, and inspecting one live.

use super::*;

pub(super) async fn list_hosts(
    control: &Control,
    request: Request<pb::ListHostsRequest>,
) -> Result<Response<pb::ListHostsResponse>, Status> {
    let caller = caller(&request)?;
    control.context.current().await?;
    let request = request.into_inner();
    let page_size = PageRequest {
        size: request.page_size,
        legacy_size: 0,
        token: &request.page_token,
        legacy_token: ("", ""),
    }
    .size()?;
    if !request.page_token.is_empty() {
        names::validate_name("page_token", &request.page_token)
            .map_err(|error| invalid("page_token", error.to_string()))?;
    }
    let context = &control.context;
    let visible: Vec<crate::state_machine::HostRecord> = context.node.read(|state| {
        use std::ops::Bound;
        let after = match request.page_token.as_str() {
            "" => Bound::Unbounded,
            last => Bound::Excluded(last.to_string()),
        };
        state
            .hosts
            .range((after, Bound::Unbounded))
            .map(|(_, host)| host)
            .filter(|host| caller.may_see(&targets::host(host)))
            .take(page_size + 1)
            .cloned()
            .collect()
    });
    let mut hosts = Vec::new();
    let mut bytes = 0;
    let mut next_page_token = String::new();
    for host in &visible {
        let connected = context.sessions.generation(&host.host_id).is_some();
        let listed = convert::host(host, connected, context.health.latest(&host.host_id));
        let size = prost::Message::encoded_len(&listed);
        let full = hosts.len() == page_size || bytes + size > MAX_LIST_PAGE_BYTES;
        if full && !hosts.is_empty() {
            next_page_token = hosts
                .last()
                .map(|last: &pb::Host| last.host_id.clone())
                .unwrap_or_default();
            break;
        }
        bytes += size;
        hosts.push(listed);
    }
    Ok(Response::new(pb::ListHostsResponse {
        hosts,
        next_page_token,
    }))
}

pub(super) async fn forget_host(
    control: &Control,
    request: Request<pb::ForgetHostRequest>,
) -> Result<Response<pb::ForgetHostResponse>, Status> {
    let caller = caller(&request)?;
    let request = request.into_inner();
    names::validate_name("host_id", &request.host_id).map_err(field_error)?;
    required_reason(
        &request.reason,
        "say why the host leaves the fleet's record: it goes into the audit log",
    )?;
    // Checked before proposing too: a member of an older release could not read it.
    control
        .context
        .node
        .read(|state| version::require(state, 2, "host.forget"))
        .map_err(to_status)?;
    let outcome = control
        .context
        .propose(
            &caller.id(),
            &request.request_id,
            CommandKind::ForgetHost {
                host_id: request.host_id.clone(),
                release_name: request.release_name,
                reason: request.reason,
            },
        )
        .await?;
    let Outcome::HostForgotten {
        services,
        name_released,
    } = outcome
    else {
        return Err(Status::internal(format!(
            "host.forget answered {outcome:?}"
        )));
    };
    // Its agent, if it still runs, registers anew and is judged as a new host; unless it
    // did already (this is a retry answered from the request log).
    if !control
        .context
        .node
        .read(|state| state.hosts.contains_key(&request.host_id))
    {
        control.context.sessions.drop_host(&request.host_id);
        control.context.health.forget(&request.host_id);
    }
    info!(
        identity = caller.id(),
        host_id = request.host_id,
        "Host forgotten."
    );
    Ok(Response::new(pb::ForgetHostResponse {
        host_id: request.host_id,
        services,
        name_released,
    }))
}

pub(super) async fn inspect_host(
    control: &Control,
    request: Request<pb::InspectHostRequest>,
) -> Result<Response<pb::InspectHostResponse>, Status> {
    let caller = caller(&request)?;
    control.context.current().await?;
    let request = request.into_inner();
    names::validate_name("host_id", &request.host_id).map_err(field_error)?;
    if !request.service.is_empty() {
        names::validate_name("service", &request.service).map_err(field_error)?;
    }
    let mode = pb::InspectMode::try_from(request.mode)
        .map_err(|_| invalid("mode", format!("{} is not an inspect mode", request.mode)))?;
    if request.compare_token.len() > MAX_COMPARE_TOKEN_BYTES {
        return Err(invalid(
            "compare_token",
            format!("is longer than {MAX_COMPARE_TOKEN_BYTES} bytes"),
        ));
    }
    let Some(targets) = control
        .context
        .node
        .read(|state| state.hosts.get(&request.host_id).map(targets::host))
    else {
        return Err(Status::not_found(format!(
            "host {} is not registered",
            request.host_id
        )));
    };
    control.context.authorize(&caller, &targets)?;
    let answer = control
        .context
        .sessions
        .inspect(
            &request.host_id,
            &request.service,
            mode,
            control
                .context
                .env_key(&caller.id(), &request.compare_token),
            INSPECT_TIMEOUT,
        )
        .await
        .map_err(|error| match error {
            crate::sessions::SendError::NotConnected(_) => Status::failed_precondition(format!(
                "{error}: only a connected agent can describe its host"
            )),
            crate::sessions::SendError::NoAnswer(..) => {
                Status::deadline_exceeded(error.to_string())
            }
            _ => Status::resource_exhausted(error.to_string()),
        })?;
    if !answer.error.is_empty() {
        return Err(Status::failed_precondition(format!(
            "agent {}: {}",
            request.host_id, answer.error
        )));
    }
    Ok(Response::new(pb::InspectHostResponse {
        host_id: request.host_id,
        services: answer.services,
    }))
}

/// How long an agent has to describe its host (it may hash a release tree).
const INSPECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
