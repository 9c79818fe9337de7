//! Services and their releases: registering them, listing them, their health.

use super::*;

pub(super) async fn put_service(
    control: &Control,
    request: Request<pb::PutServiceRequest>,
) -> Result<Response<pb::PutServiceResponse>, Status> {
    let caller = caller(&request)?;
    let request = request.into_inner();
    let service = request
        .service
        .ok_or_else(|| invalid("service", "is required"))?;
    let record = validate_service(service)?;
    let name = record.name.clone();
    // The target is the request's own: no read barrier (a quorum round per write).
    control
        .context
        .authorize(&caller, &[Target::Service(name.clone())])?;
    let kind = CommandKind::PutService { service: record };
    let service = control
        .context
        .propose_and_read(&caller.id(), &request.request_id, kind, |state, _| {
            state.services.get(&name).map(convert::service)
        })
        .await?;
    Ok(Response::new(pb::PutServiceResponse { service }))
}

pub(super) async fn list_services(
    control: &Control,
    request: Request<pb::ListServicesRequest>,
) -> Result<Response<pb::ListServicesResponse>, Status> {
    let caller = caller(&request)?;
    control.context.current().await?;
    let services = control.context.node.read(|state| {
        state
            .services
            .values()
            .filter(|service| caller.may_see(&[Target::Service(service.name.clone())]))
            .map(convert::service)
            .collect()
    });
    Ok(Response::new(pb::ListServicesResponse { services }))
}

/// Most topics a release may declare it produces, and most it consumes.
const MAX_TOPICS_PER_RELEASE: usize = 256;

pub(super) async fn register_release(
    control: &Control,
    request: Request<pb::RegisterReleaseRequest>,
) -> Result<Response<pb::RegisterReleaseResponse>, Status> {
    let caller = caller(&request)?;
    let identity = caller.id();
    let request = request.into_inner();
    let release = request
        .release
        .ok_or_else(|| invalid("release", "is required"))?;
    names::validate_name("release.service", &release.service).map_err(field_error)?;
    names::validate_version("release.version", &release.version).map_err(field_error)?;
    names::validate_digest("release.artifact_digest", &release.artifact_digest)
        .map_err(field_error)?;
    if release.commit.len() > names::MAX_NAME_LEN
        || !release.commit.chars().all(|c| c.is_ascii_graphic())
    {
        return Err(invalid(
            "release.commit",
            "must be at most 128 printable characters without spaces",
        ));
    }
    if release.requires.len() > 256 {
        return Err(invalid("release.requires", "names more than 256 providers"));
    }
    for provider in release.requires.keys() {
        names::validate_name("release.requires", provider).map_err(field_error)?;
    }
    for (field, topics) in [
        ("release.produces", &release.produces),
        ("release.consumes", &release.consumes),
    ] {
        if topics.len() > MAX_TOPICS_PER_RELEASE {
            return Err(invalid(
                field,
                format!("names more than {MAX_TOPICS_PER_RELEASE} topics"),
            ));
        }
        for (topic, &version) in topics {
            names::validate_name(field, topic).map_err(field_error)?;
            if version == 0 {
                return Err(invalid(
                    field,
                    format!("topic {topic}: a message schema version is 1 or more"),
                ));
            }
        }
    }
    let record = ReleaseRecord {
        service: release.service.clone(),
        version: release.version.clone(),
        artifact_digest: release.artifact_digest,
        commit: release.commit,
        registered_at_ms: 0,
        api_version: release.api_version,
        requires: release.requires.into_iter().collect(),
        produces: release.produces.into_iter().collect(),
        consumes: release.consumes.into_iter().collect(),
    };
    // The target is the request's own: no read barrier (a quorum round per write).
    control
        .context
        .authorize(&caller, &[Target::Service(release.service.clone())])?;
    control
        .context
        .propose(
            &identity,
            &request.request_id,
            CommandKind::RegisterRelease { release: record },
        )
        .await?;
    let release = control.context.node.read(|state| {
        state
            .releases
            .get(&release.service)
            .and_then(|versions| versions.get(&release.version))
            .map(|release| convert::release(release))
    });
    Ok(Response::new(pb::RegisterReleaseResponse { release }))
}

pub(super) async fn list_releases(
    control: &Control,
    request: Request<pb::ListReleasesRequest>,
) -> Result<Response<pb::ListReleasesResponse>, Status> {
    let caller = caller(&request)?;
    control.context.current().await?;
    let service = request.into_inner().service;
    if !service.is_empty() {
        names::validate_name("service", &service).map_err(field_error)?;
    }
    let releases = control.context.node.read(|state| {
        state
            .releases
            .iter()
            .filter(|(name, _)| service.is_empty() || **name == service)
            .filter(|(name, _)| caller.may_see(&[Target::Service(name.to_string())]))
            .flat_map(|(_, versions)| versions.values().map(|release| convert::release(release)))
            .collect()
    });
    Ok(Response::new(pb::ListReleasesResponse { releases }))
}

pub(super) async fn get_service_health(
    control: &Control,
    request: Request<pb::GetServiceHealthRequest>,
) -> Result<Response<pb::GetServiceHealthResponse>, Status> {
    let caller = caller(&request)?;
    control.context.current().await?;
    let service = request.into_inner().service;
    names::validate_name("service", &service).map_err(field_error)?;
    control
        .context
        .authorize(&caller, &[Target::Service(service.clone())])?;
    let known = control
        .context
        .node
        .read(|state| state.services.contains_key(&service));
    if !known {
        let error =
            control
                .context
                .node
                .read(|state| crate::errors::CoordinatorError::UnknownService {
                    service: service.clone(),
                    known: crate::errors::known_list(state.services.keys().cloned()),
                });
        return Err(to_status(error));
    }
    let current = control.context.service_health(&service);
    let latest = control.context.health.latest_all();
    let scrape_errors = latest
        .iter()
        .flat_map(|(host, report)| {
            report
                .app
                .iter()
                .filter(|app| app.service == service && !app.error.is_empty())
                .map(move |app| format!("{host}: {}", app.error))
        })
        .collect();
    let latest_probes = latest
        .into_values()
        .flat_map(|report| report.probes)
        .filter(|probe| probe.service == service)
        .collect();
    Ok(Response::new(pb::GetServiceHealthResponse {
        current: Some(convert::aggregate(&current)),
        latest_probes,
        scrape_errors,
    }))
}
