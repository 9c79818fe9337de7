//! Rollback fire drills (cluster version 11): start, show, list, abort.

use super::*;

pub(super) async fn start_rollback_drill(
    control: &Control,
    request: Request<pb::StartRollbackDrillRequest>,
) -> Result<Response<pb::RollbackDrillResponse>, Status> {
    let caller = caller(&request)?;
    let identity = caller.id();
    let request = request.into_inner();
    names::validate_name("service", &request.service).map_err(field_error)?;
    names::validate_name("environment", &request.environment).map_err(field_error)?;
    names::validate_version("version", &request.version).map_err(field_error)?;
    required_reason(
        &request.reason,
        "say why you drill it: it goes into the drill, its change and the audit log",
    )?;
    control.context.current().await?;
    control.context.authorize(
        &caller,
        &[Target::scoped(&request.environment, &request.service)],
    )?;
    // The hosts it deploys to: every host of the service in the environment (apply checks
    // the list is exactly that).
    let host_ids = control.context.node.read(|state| {
        crate::plan::hosts_in_environment(state, &request.service, &request.environment)
    });
    let baseline = control.context.change_baseline(&request.service);
    let kind = CommandKind::StartFireDrill {
        environment: request.environment,
        start: StartChange {
            service: request.service,
            version: request.version,
            host_ids,
            reason: request.reason,
            baseline,
            flags_on: Vec::new(),
            migrations: Vec::new(),
            break_glass: false,
        },
    };
    let Outcome::FireDrill(number) = control
        .context
        .propose(&identity, &request.request_id, kind)
        .await?
    else {
        return Err(Status::internal("a drill start produced no drill"));
    };
    info!(
        identity,
        drill_id = fire_drill_id(number),
        "Rollback fire drill started."
    );
    drill_response(control, number)
}

pub(super) async fn get_rollback_drill(
    control: &Control,
    request: Request<pb::GetRollbackDrillRequest>,
) -> Result<Response<pb::RollbackDrillResponse>, Status> {
    let caller = caller(&request)?;
    let number = authorized_drill(control, &caller, &request.into_inner().drill_id).await?;
    drill_response(control, number)
}

/// The drill `drill_id` names, once the caller may act on it (unknown to those who may not).
async fn authorized_drill(
    control: &Control,
    caller: &crate::access::Caller,
    drill_id: &str,
) -> Result<u64, Status> {
    let number = parse_id("drill_id", "rd", drill_id)?;
    control.context.current().await?;
    let targets = control
        .context
        .node
        .read(|state| targets::fire_drill(state, number));
    control
        .context
        .authorize_found(caller, &targets, || unknown_drill(control, number))?;
    Ok(number)
}

pub(super) async fn list_rollback_drills(
    control: &Control,
    request: Request<pb::ListRollbackDrillsRequest>,
) -> Result<Response<pb::ListRollbackDrillsResponse>, Status> {
    let caller = caller(&request)?;
    let request = request.into_inner();
    if !request.service.is_empty() {
        names::validate_name("service", &request.service).map_err(field_error)?;
    }
    let page = PageRequest::new(request.page_size, &request.page_token);
    let (limit, before) = (page.size()?, page.before("rd")?);
    control.context.current().await?;
    let (drills, next_page_token) = control.context.node.read(|state| {
        let matching = state
            .fire_drills
            .range(..before)
            .rev()
            .map(|(_, drill)| drill)
            .filter(|drill| request.service.is_empty() || drill.service == request.service)
            .filter(|drill| caller.may_see(&targets::fire_drill(state, drill.number)))
            .map(|drill| convert::fire_drill(state, drill));
        one_page(limit, matching, |drill| drill.drill_id.clone())
    });
    Ok(Response::new(pb::ListRollbackDrillsResponse {
        drills,
        next_page_token,
    }))
}

pub(super) async fn abort_rollback_drill(
    control: &Control,
    request: Request<pb::AbortRollbackDrillRequest>,
) -> Result<Response<pb::RollbackDrillResponse>, Status> {
    let caller = caller(&request)?;
    let identity = caller.id();
    let request = request.into_inner();
    required_reason(
        &request.reason,
        "say why you stop the drill: it goes into the drill and the audit log",
    )?;
    let number = authorized_drill(control, &caller, &request.drill_id).await?;
    let kind = CommandKind::AbortFireDrill {
        drill: number,
        reason: request.reason,
    };
    control
        .context
        .propose(&identity, &request.request_id, kind)
        .await?;
    info!(
        identity,
        drill_id = fire_drill_id(number),
        "Rollback fire drill aborted."
    );
    drill_response(control, number)
}

fn unknown_drill(control: &Control, number: u64) -> Status {
    to_status(control.context.node.read(|state| {
        crate::errors::CoordinatorError::UnknownFireDrill {
            drill_id: fire_drill_id(number),
            known: crate::errors::known_list(state.fire_drills.values().map(FireDrillRecord::id)),
        }
    }))
}

fn drill_response(
    control: &Control,
    number: u64,
) -> Result<Response<pb::RollbackDrillResponse>, Status> {
    let drill = control
        .context
        .node
        .read(|state| {
            state
                .fire_drills
                .get(&number)
                .map(|drill| convert::fire_drill(state, drill))
        })
        .ok_or_else(|| unknown_drill(control, number))?;
    Ok(Response::new(pb::RollbackDrillResponse {
        drill: Some(drill),
    }))
}
