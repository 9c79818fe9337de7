//! Schema migrations, their transactions across shards, and drills.

use super::*;

pub(super) async fn register_migration(
    control: &Control,
    request: Request<pb::RegisterMigrationRequest>,
) -> Result<Response<pb::RegisterMigrationResponse>, Status> {
    let caller = caller(&request)?;
    let identity = caller.id();
    let request = request.into_inner();
    let migration = request
        .migration
        .ok_or_else(|| invalid("migration", "is required"))?;
    let record = validate_migration(migration)?;
    let (database, version) = (record.database.clone(), record.version.clone());
    let kind = CommandKind::RegisterMigration { migration: record };
    let migration = control
        .context
        .propose_and_read(&identity, &request.request_id, kind, |state, _| {
            state
                .migrations
                .get(&database)
                .and_then(|versions| versions.get(&version))
                .map(|record| convert::migration(record, true))
        })
        .await?;
    Ok(Response::new(pb::RegisterMigrationResponse { migration }))
}

pub(super) async fn list_schema_txns(
    control: &Control,
    request: Request<pb::ListSchemaTxnsRequest>,
) -> Result<Response<pb::ListSchemaTxnsResponse>, Status> {
    let caller = caller(&request)?;
    let request = request.into_inner();
    let wanted = if request.txn_id.is_empty() {
        None
    } else {
        Some(parse_id("txn_id", "st", &request.txn_id)?)
    };
    // One transaction asked for by id is the whole answer, whatever the page token says.
    let token = if wanted.is_some() {
        ""
    } else {
        &request.page_token
    };
    let page = PageRequest::new(request.page_size, token);
    let (size, before) = (page.size()?, page.before("st")?);
    control.context.current().await?;
    let (mut txns, mut next_page_token) = control.context.node.read(|state| {
        let txns = state
            .schema_txns
            .range(..before)
            .rev()
            .map(|(_, txn)| txn)
            .filter(|txn| wanted.is_none_or(|number| txn.number == number))
            .filter(|txn| caller.may_see(&targets::schema_txn(state, txn.number)))
            .map(|txn| convert::schema_txn(txn, request.detailed));
        one_page(size, txns, |txn| txn.txn_id.clone())
    });
    // With every shard's statements a transaction is large: a page also stops at ~2 MiB.
    within_bytes(&mut txns, &mut next_page_token, |txn| txn.txn_id.clone());
    if let (Some(number), true) = (wanted, txns.is_empty()) {
        return Err(Status::not_found(format!(
            "no schema transaction {}",
            schema_txn_id(number)
        )));
    }
    Ok(Response::new(pb::ListSchemaTxnsResponse {
        txns,
        next_page_token,
    }))
}

pub(super) async fn resolved_by_hand(
    control: &Control,
    request: Request<pb::ResolvedByHandRequest>,
) -> Result<Response<pb::SchemaTxnResponse>, Status> {
    let caller = caller(&request)?;
    let identity = caller.id();
    let request = request.into_inner();
    let number = parse_id("txn_id", "st", &request.txn_id)?;
    names::validate_name("host_id", &request.host_id).map_err(field_error)?;
    required_reason(
        &request.reason,
        "say what was done to the shard, and by whom: it goes into the audit log",
    )?;
    control.context.current().await?;
    // A resolve running on a connected agent may still succeed: wait for it. One whose agent
    // is away (the host is being rebuilt) can be taken over.
    let running = control.context.node.read(|state| {
        state.schema_txns.get(&number).is_some_and(|txn| {
            txn.shards.iter().any(|shard| {
                shard.host_id == request.host_id && shard.resolve.status == StepStatus::Running
            })
        })
    });
    if running
        && control
            .context
            .sessions
            .generation(&request.host_id)
            .is_some()
    {
        return Err(invalid(
            "host_id",
            format!(
                "a resolve of {} is running on {} now and its agent is connected: wait for \
                 it to end (rewindctl schema show {})",
                schema_txn_id(number),
                request.host_id,
                schema_txn_id(number)
            ),
        ));
    }
    let kind = CommandKind::ResolvedByHand {
        txn: number,
        host_id: request.host_id.clone(),
        reason: request.reason,
    };
    control
        .context
        .propose(&identity, &request.request_id, kind)
        .await?;
    info!(
        identity,
        txn_id = schema_txn_id(number),
        host_id = request.host_id,
        "Shard resolved by hand."
    );
    let txn = control.context.node.read(|state| {
        state
            .schema_txns
            .get(&number)
            .map(|txn| convert::schema_txn(txn, true))
    });
    Ok(Response::new(pb::SchemaTxnResponse { txn }))
}

pub(super) async fn start_drill(
    control: &Control,
    request: Request<pb::StartDrillRequest>,
) -> Result<Response<pb::DrillResponse>, Status> {
    let caller = caller(&request)?;
    let identity = caller.id();
    let request = request.into_inner();
    let change = parse_id("change_id", "ch", &request.change_id)?;
    names::validate_name("environment", &request.environment).map_err(field_error)?;
    required_reason(
        &request.reason,
        "say why you drill it: it goes into the audit log",
    )?;
    control.context.current().await?;
    control
        .context
        .node
        .read(|state| archive::refuse_archived(state, ArchiveKind::Change, change))?;
    let targets = control
        .context
        .node
        .read(|state| targets::drill_of(state, change, &request.environment));
    control.context.authorize_found(&caller, &targets, || {
        invalid("change_id", format!("no change {}", change_id(change)))
    })?;
    let kind = CommandKind::StartDrill {
        change,
        environment: request.environment,
        reason: request.reason,
    };
    let Outcome::Drill(number) = control
        .context
        .propose(&identity, &request.request_id, kind)
        .await?
    else {
        return Err(Status::internal("start drill produced no drill"));
    };
    info!(
        identity,
        drill_id = drill_id(number),
        "Migration drill started."
    );
    let drill = control.context.node.read(|state| {
        state
            .drills
            .get(&number)
            .map(|drill| convert::drill(state, drill))
    });
    Ok(Response::new(pb::DrillResponse { drill }))
}

pub(super) async fn get_drill(
    control: &Control,
    request: Request<pb::GetDrillRequest>,
) -> Result<Response<pb::DrillResponse>, Status> {
    let caller = caller(&request)?;
    let number = parse_id("drill_id", "dr", &request.into_inner().drill_id)?;
    control.context.current().await?;
    let targets = control
        .context
        .node
        .read(|state| targets::drill(state, number));
    control.context.authorize_found(&caller, &targets, || {
        Status::not_found(format!("no drill {}", drill_id(number)))
    })?;
    let drill = control
        .context
        .node
        .read(|state| {
            state
                .drills
                .get(&number)
                .map(|drill| convert::drill(state, drill))
        })
        .ok_or_else(|| Status::not_found(format!("no drill {}", drill_id(number))))?;
    Ok(Response::new(pb::DrillResponse { drill: Some(drill) }))
}

pub(super) async fn list_migrations(
    control: &Control,
    request: Request<pb::ListMigrationsRequest>,
) -> Result<Response<pb::ListMigrationsResponse>, Status> {
    control.context.current().await?;
    let request = request.into_inner();
    if !request.database.is_empty() {
        names::validate_name("database", &request.database).map_err(field_error)?;
    }
    let migrations = control.context.node.read(|state| {
        state
            .migrations
            .iter()
            .filter(|(database, _)| request.database.is_empty() || **database == request.database)
            .flat_map(|(_, versions)| versions.values())
            .map(|record| convert::migration(record, request.with_scripts))
            .collect()
    });
    Ok(Response::new(pb::ListMigrationsResponse { migrations }))
}
