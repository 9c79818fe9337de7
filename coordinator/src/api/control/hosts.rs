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
    let mode = match pb::InspectMode::try_from(request.mode) {
        // Adopting changes the host's desired state: AdoptHostState, a permission of its own.
        Ok(pb::InspectMode::InspectAdopt) | Err(_) => {
            return Err(invalid(
                "mode",
                format!(
                    "{} is not an inspect mode (captured, live or drift)",
                    request.mode
                ),
            ));
        }
        Ok(mode) => mode,
    };
    if request.compare_token.len() > MAX_COMPARE_TOKEN_BYTES {
        return Err(invalid(
            "compare_token",
            format!("is longer than {MAX_COMPARE_TOKEN_BYTES} bytes"),
        ));
    }
    authorize_host(control, &caller, &request.host_id, &request.service)?;
    let key = control
        .context
        .env_key(&caller.id(), &request.compare_token);
    let services = ask_agent(control, &request.host_id, &request.service, mode, key).await?;
    Ok(Response::new(pb::InspectHostResponse {
        host_id: request.host_id,
        services,
    }))
}

/// Accepts a host's drift: audited with the drift the agent measured just before, then the
/// agent records the state now as its desired state.
pub(super) async fn adopt_host_state(
    control: &Control,
    request: Request<pb::AdoptHostStateRequest>,
) -> Result<Response<pb::InspectHostResponse>, Status> {
    let caller = caller(&request)?;
    control.context.current().await?;
    let request = request.into_inner();
    required_reason(
        &request.reason,
        "say why the host's state is accepted as it is: it goes into the audit log",
    )?;
    authorize_host(control, &caller, &request.host_id, &request.service)?;
    // Checked before asking the agent anything: a member of an older release could not read
    // the audit entry.
    control
        .context
        .node
        .read(|state| version::require(state, version::DRIFT_GUARD, "host.adopt"))
        .map_err(to_status)?;
    // The agent measures and records under the service's lock in one go, and says what it
    // accepted: that is what the audit entry names.
    let key = control.context.env_key(&caller.id(), b"");
    let services = ask_agent(
        control,
        &request.host_id,
        &request.service,
        pb::InspectMode::InspectAdopt,
        key,
    )
    .await?;
    if let Some(old) = services.iter().find(|state| state.drift_against != ADOPTED) {
        return Err(Status::failed_precondition(format!(
            "agent {} did not adopt {} (an agent of a release before cluster version 10 cannot): \
             upgrade it",
            request.host_id, old.service
        )));
    }
    let accepted = accepted_drift(&services);
    for state in &services {
        control
            .context
            .health
            .clear_drift(&request.host_id, &state.service);
    }
    control
        .context
        .propose(
            &caller.id(),
            "",
            CommandKind::AdoptHostState {
                host_id: request.host_id.clone(),
                accepted,
                reason: request.reason,
            },
        )
        .await
        .map_err(|status| {
            Status::new(
                status.code(),
                format!(
                    "the agent adopted the state, but the audit entry could not be recorded: {}",
                    status.message()
                ),
            )
        })?;
    info!(
        identity = caller.id(),
        host_id = request.host_id,
        service = request.service,
        "Host state adopted as desired."
    );
    Ok(Response::new(pb::InspectHostResponse {
        host_id: request.host_id,
        services,
    }))
}

/// How an agent of this release marks a state it adopted (`ServiceState.drift_against`).
const ADOPTED: &str = "host adopt";

/// What an adoption accepted, one line per service that drifted, as the audit entry keeps it:
/// at most [`MAX_DRIFT_LINES_PER_SERVICE`] changes per service (the rest counted), each made
/// printable and cut to [`MAX_DRIFT_LINE_BYTES`], for at most [`MAX_SERVICES_PER_HOST`]
/// services (the agent's answer is not otherwise bounded).
fn accepted_drift(services: &[pb::ServiceState]) -> Vec<String> {
    use rewind_shared::bounds::{
        MAX_DRIFT_LINE_BYTES, MAX_DRIFT_LINES_PER_SERVICE, MAX_SERVICES_PER_HOST,
    };
    services
        .iter()
        .filter(|state| !state.drift.is_empty())
        .take(MAX_SERVICES_PER_HOST)
        .map(|state| {
            let mut lines: Vec<String> = state
                .drift
                .iter()
                .take(MAX_DRIFT_LINES_PER_SERVICE)
                // Cut after escaping: an escaped control character takes several bytes.
                .map(|line| {
                    names::truncate(&names::printable(line, usize::MAX), MAX_DRIFT_LINE_BYTES)
                        .to_string()
                })
                .collect();
            let more = state
                .drift
                .len()
                .saturating_sub(MAX_DRIFT_LINES_PER_SERVICE);
            if more > 0 {
                lines.push(format!("{more} more"));
            }
            format!(
                "{}: {}",
                names::truncate(&names::printable(&state.service, usize::MAX), 128),
                lines.join("; ")
            )
        })
        .collect()
}

/// Checks the host (and service) named, and that the caller may act on the host.
fn authorize_host(
    control: &Control,
    caller: &crate::access::Caller,
    host_id: &str,
    service: &str,
) -> Result<(), Status> {
    names::validate_name("host_id", host_id).map_err(field_error)?;
    if !service.is_empty() {
        names::validate_name("service", service).map_err(field_error)?;
    }
    let Some(targets) = control
        .context
        .node
        .read(|state| state.hosts.get(host_id).map(targets::host))
    else {
        return Err(Status::not_found(format!(
            "host {host_id} is not registered"
        )));
    };
    control.context.authorize(caller, &targets)
}

/// Asks the host's agent to describe (or, for ADOPT, accept) its services' state.
async fn ask_agent(
    control: &Control,
    host_id: &str,
    service: &str,
    mode: pb::InspectMode,
    env_key: Vec<u8>,
) -> Result<Vec<pb::ServiceState>, Status> {
    let answer = control
        .context
        .sessions
        .inspect(host_id, service, mode, env_key, INSPECT_TIMEOUT)
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
            "agent {host_id}: {}",
            answer.error
        )));
    }
    Ok(answer.services)
}

/// How long an agent has to describe its host (it may hash a release tree).
const INSPECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
