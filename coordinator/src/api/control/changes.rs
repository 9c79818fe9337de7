//! Changes: starting a deploy (or asking approval for it) and reading them.

use super::*;

pub(super) async fn start_change(
    control: &Control,
    request: Request<pb::StartChangeRequest>,
) -> Result<Response<pb::StartChangeResponse>, Status> {
    let caller = caller(&request)?;
    let identity = caller.id();
    let request = request.into_inner();
    names::validate_name("service", &request.service).map_err(field_error)?;
    names::validate_version("version", &request.version).map_err(field_error)?;
    if request.host_ids.len() > MAX_HOSTS_PER_REQUEST {
        return Err(invalid(
            "host_ids",
            format!(
                "names {} hosts, at most {MAX_HOSTS_PER_REQUEST} are allowed",
                request.host_ids.len()
            ),
        ));
    }
    for host_id in &request.host_ids {
        names::validate_name("host_ids", host_id).map_err(field_error)?;
    }
    required_reason(
        &request.reason,
        "say why this change: it goes into the change record and the audit log",
    )?;
    if request.flags_on.len() > MAX_FLAGS_PER_CHANGE {
        return Err(invalid(
            "flags_on",
            format!("names more than {MAX_FLAGS_PER_CHANGE} flags"),
        ));
    }
    for flag in &request.flags_on {
        names::validate_name("flags_on", flag).map_err(field_error)?;
    }
    if request.migrations.len() > MAX_MIGRATIONS_PER_CHANGE {
        return Err(invalid(
            "migrations",
            format!("names more than {MAX_MIGRATIONS_PER_CHANGE} migrations"),
        ));
    }
    let mut migrations = Vec::with_capacity(request.migrations.len());
    for named in &request.migrations {
        let Some((database, version)) = named.split_once('@') else {
            return Err(invalid(
                "migrations",
                format!("{named:?} is not database@version (e.g. orders-db@0004)"),
            ));
        };
        names::validate_name("migrations", database).map_err(field_error)?;
        names::validate_version("migrations", version).map_err(field_error)?;
        migrations.push((database.to_string(), version.to_string()));
    }
    control.context.current().await?;
    let targets = control
        .context
        .node
        .read(|state| targets::new_change(state, &request.service, &request.host_ids));
    control.context.authorize(&caller, &targets)?;
    let baseline = control.context.change_baseline(&request.service);
    let kind = CommandKind::StartChange(StartChange {
        break_glass: request.break_glass,
        migrations,
        service: request.service,
        version: request.version,
        host_ids: request.host_ids,
        reason: request.reason,
        baseline,
        flags_on: request.flags_on,
    });
    let number = match control
        .context
        .propose(&identity, &request.request_id, kind)
        .await?
    {
        Outcome::Change(number) => number,
        Outcome::Request(number) => {
            info!(
                identity,
                request_id = crate::state_machine::request_id(number),
                "Deploy waits for approval."
            );
            let request = control.context.node.read(|state| {
                state
                    .approval_requests
                    .get(&number)
                    .map(|record| convert::approval_request(state, record, false))
            });
            return Ok(Response::new(pb::StartChangeResponse {
                change: None,
                request,
            }));
        }
        other => {
            return Err(Status::internal(format!("start change produced {other:?}")));
        }
    };
    info!(identity, change_id = change_id(number), "Change started.");
    let change = control
        .context
        .node
        .read(|state| state.changes.get(&number).map(convert::change));
    Ok(Response::new(pb::StartChangeResponse {
        change,
        request: None,
    }))
}

pub(super) async fn get_change(
    control: &Control,
    request: Request<pb::GetChangeRequest>,
) -> Result<Response<pb::GetChangeResponse>, Status> {
    let caller = caller(&request)?;
    control.context.current().await?;
    let number = parse_id("change_id", "ch", &request.into_inner().change_id)?;
    let archived = control.context.node.read(|state| {
        Ok::<_, Status>(archive::change(state, number)?.map(|archived| {
            let targets = targets::of_change(state, &archived.change);
            (targets, archive::change_view(&archived))
        }))
    })?;
    if let Some((targets, change)) = archived {
        control.context.authorize_found(&caller, &targets, || {
            Status::not_found(format!("no change {}", change_id(number)))
        })?;
        return Ok(Response::new(pb::GetChangeResponse {
            change: Some(change),
        }));
    }
    let targets = control
        .context
        .node
        .read(|state| targets::change(state, number));
    control.context.authorize_found(&caller, &targets, || {
        control
            .context
            .node
            .read(|state| to_status(unknown_change(state, number)))
    })?;
    let change = control.context.node.read(|state| {
        state
            .changes
            .get(&number)
            .map(convert::change)
            .ok_or_else(|| to_status(unknown_change(state, number)))
    })?;
    Ok(Response::new(pb::GetChangeResponse {
        change: Some(change),
    }))
}

pub(super) async fn list_changes(
    control: &Control,
    request: Request<pb::ListChangesRequest>,
) -> Result<Response<pb::ListChangesResponse>, Status> {
    let caller = caller(&request)?;
    let request = request.into_inner();
    #[allow(deprecated)] // The names before 0.3, read for one release.
    let page = PageRequest::with_before(
        request.page_size,
        request.limit,
        &request.page_token,
        &request.before,
    );
    let (limit, before) = (page.size()?, page.before("ch")?);
    control.context.current().await?;
    let service = request.service;
    if request.archived {
        let scanned = control.context.node.read(|state| {
            archive::scan(state, ArchiveKind::Change, before, limit + 1, |record| {
                let ArchivedRecord::Change(archived) = record else {
                    return Ok(None);
                };
                let wanted = (service.is_empty() || archived.change.service == service)
                    && caller.may_see(&targets::of_change(state, &archived.change));
                Ok(wanted.then(|| archive::change_view(&archived)))
            })
        })?;
        let (changes, next_page_token) = archive::page(scanned, limit, "ch");
        #[allow(deprecated)] // Set for clients before 0.3.
        return Ok(Response::new(pb::ListChangesResponse {
            changes,
            next_before: next_page_token.clone(),
            next_page_token,
        }));
    }
    let (changes, next_page_token) = control.context.node.read(|state| {
        let matching = state
            .changes
            .range(..before)
            .rev()
            .map(|(_, change)| change)
            .filter(|change| service.is_empty() || change.service == service)
            .filter(|change| caller.may_see(&targets::change(state, change.number)))
            .map(convert::change);
        one_page(limit, matching, |change| change.change_id.clone())
    });
    #[allow(deprecated)] // Set for clients before 0.3.
    Ok(Response::new(pb::ListChangesResponse {
        changes,
        next_before: next_page_token.clone(),
        next_page_token,
    }))
}
