//! Rollbacks: planning, starting, steering and watching them.

use super::*;

pub(super) async fn plan_rollback(
    control: &Control,
    request: Request<pb::PlanRollbackRequest>,
) -> Result<Response<pb::PlanRollbackResponse>, Status> {
    let caller = caller(&request)?;
    control.context.current().await?;
    let request = request.into_inner();
    let options = plans::options_from(request.options, 0, control.context.default_max_parallel)?;
    let view = plans::LiveHosts {
        sessions: &control.context.sessions,
        health: &control.context.health,
    };
    let plan = control.context.node.read(|state| {
        // A plan no start could run: say so now.
        let (needed, what) = options.required_version();
        version::require(state, needed, what).map_err(to_status)?;
        let changes = plans::selected_changes(state, request.selection, "")?;
        control
            .context
            .authorize(&caller, &targets::changes(state, &changes))?;
        plans::preview(state, &changes, &options, &view)
    })?;
    Ok(Response::new(pb::PlanRollbackResponse { plan: Some(plan) }))
}

pub(super) async fn start_rollback(
    control: &Control,
    request: Request<pb::StartRollbackRequest>,
) -> Result<Response<pb::StartRollbackResponse>, Status> {
    let caller = caller(&request)?;
    let identity = caller.id();
    let request = request.into_inner();
    required_reason(
        &request.reason,
        "say why you roll back: it goes into the rollback, its escalations and the audit log",
    )?;
    if !request.plan_hash.is_empty() {
        names::validate_digest("plan_hash", &request.plan_hash).map_err(field_error)?;
    }
    let options = plans::options_from(
        request.options,
        request.max_parallel,
        control.context.default_max_parallel,
    )?;
    control.context.current().await?;
    let (changes, targets) = control.context.node.read(|state| {
        let changes = plans::selected_changes(state, request.selection, &request.change_id)?;
        let targets = targets::changes(state, &changes);
        Ok::<_, Status>((changes, targets))
    })?;
    control.context.authorize(&caller, &targets)?;
    refuse_drifted_hosts(control, &changes, &options)?;
    let reason = request.reason;
    let kind = CommandKind::StartRollback(StartRollback {
        changes,
        options,
        plan_hash: request.plan_hash,
        reason,
        trigger: Trigger::Manual,
        break_glass: request.break_glass,
        planned: None,
    });
    match control
        .context
        .propose(&identity, &request.request_id, kind)
        .await?
    {
        Outcome::Rollback(number) => {
            info!(
                identity,
                rollback_id = rollback_id(number),
                break_glass = request.break_glass,
                "Rollback started."
            );
            let rollback = control.context.node.read(|state| {
                state
                    .rollbacks
                    .get(&number)
                    .map(|record| convert::rollback(state, record))
            });
            Ok(Response::new(pb::StartRollbackResponse {
                rollback,
                request: None,
            }))
        }
        Outcome::Request(number) => {
            info!(
                identity,
                request_id = request_id(number),
                "Rollback waits for approval."
            );
            let request = control.context.node.read(|state| {
                state
                    .approval_requests
                    .get(&number)
                    .map(|record| convert::approval_request(state, record, true))
            });
            Ok(Response::new(pb::StartRollbackResponse {
                rollback: None,
                request,
            }))
        }
        _ => Err(Status::internal("start rollback produced no rollback")),
    }
}

/// Refuses a rollback that would wipe a hand-made change: a host of the plan whose agent
/// reported drift, unless the rollback overwrites drift or leaves the host out. (The agent
/// itself refuses such a restore too, for drift found later.) From cluster version 10.
fn refuse_drifted_hosts(
    control: &Control,
    changes: &[u64],
    options: &crate::state_machine::PlanOptions,
) -> Result<(), Status> {
    if options.overwrite_drift {
        return Ok(());
    }
    let view = plans::LiveHosts {
        sessions: &control.context.sessions,
        health: &control.context.health,
    };
    let drifted = control.context.node.read(|state| {
        if state.cluster_version() < version::DRIFT_GUARD {
            return Vec::new();
        }
        // A plan the planner refuses is refused with its own reason by the proposal.
        crate::plan::build(state, changes, options, Trigger::Manual)
            .map(|plan| crate::plan::drifted_hosts(&plan, &view))
            .unwrap_or_default()
    });
    if drifted.is_empty() {
        return Ok(());
    }
    let hosts: Vec<&str> = drifted.iter().map(|(host, ..)| host.as_str()).collect();
    Err(Status::failed_precondition(format!(
        "{} changed since rewind last put {} there, and reverting would wipe that: {}. Look \
         (`rewindctl host drift HOST`), then leave {} out (--exclude-host {}), or let the \
         rollback wipe {} (--overwrite-drift, or `rewindctl host adopt` first; both audited)",
        crate::plan::plural(hosts.len(), "host"),
        if hosts.len() == 1 { "it" } else { "them" },
        names::printable(&crate::plan::drift_lines(&drifted).join(" | "), 2048),
        if hosts.len() == 1 { "it" } else { "them" },
        hosts.join(" --exclude-host "),
        if hosts.len() == 1 { "it" } else { "them" },
    )))
}

pub(super) async fn skip_host(
    control: &Control,
    request: Request<pb::RollbackActionRequest>,
) -> Result<Response<pb::GetRollbackResponse>, Status> {
    let named = |request: &pb::RollbackActionRequest| request.host_id.clone();
    control
        .decide_for(
            request,
            ("host_id", named),
            "say why the host is left unreverted: it goes into the audit log",
            |rollback, host_id, reason| CommandKind::SkipHost {
                rollback,
                host_id,
                reason,
            },
        )
        .await
}

pub(super) async fn isolate_service(
    control: &Control,
    request: Request<pb::RollbackActionRequest>,
) -> Result<Response<pb::GetRollbackResponse>, Status> {
    let named = |request: &pb::RollbackActionRequest| request.service.clone();
    let region = request.get_ref().region.clone();
    if !region.is_empty() {
        // Regions are host labels: names of at most 63 bytes.
        if region.len() > rewind_shared::bounds::MAX_LABEL_BYTES {
            return Err(invalid(
                "region",
                format!(
                    "is {} bytes, at most {}",
                    region.len(),
                    rewind_shared::bounds::MAX_LABEL_BYTES
                ),
            ));
        }
        names::validate_name("region", &region).map_err(field_error)?;
    }
    control
        .decide_for(
            request,
            ("service", named),
            "say why the service is isolated instead of reverted: it goes into the audit log",
            |rollback, service, reason| CommandKind::IsolateService {
                rollback,
                service,
                reason,
                region,
            },
        )
        .await
}

pub(super) async fn explain_rollback(
    control: &Control,
    request: Request<pb::GetRollbackRequest>,
) -> Result<Response<pb::ExplainRollbackResponse>, Status> {
    let number = control.visible_rollback(request).await?;
    let services = control.context.node.read(|state| {
        state
            .rollbacks
            .get(&number)
            .map(|record| record.services.clone())
            .ok_or_else(|| to_status(unknown_rollback(state, number)))
    })?;
    // Read outside the state lock: health aggregation reads the state too.
    let health: std::collections::BTreeMap<String, HealthAggregate> = services
        .into_iter()
        .map(|service| {
            let aggregate = control.context.service_health(&service);
            (service, aggregate)
        })
        .collect();
    let (rollback, explanation, next_commands) = control.context.node.read(|state| {
        let record = state
            .rollbacks
            .get(&number)
            .ok_or_else(|| to_status(unknown_rollback(state, number)))?;
        let (text, next) = plans::explain(state, record, |service| {
            health.get(service).copied().unwrap_or_default()
        });
        Ok::<_, Status>((convert::rollback(state, record), text, next))
    })?;
    Ok(Response::new(pb::ExplainRollbackResponse {
        rollback: Some(rollback),
        explanation,
        next_commands,
    }))
}

pub(super) async fn get_rollback(
    control: &Control,
    request: Request<pb::GetRollbackRequest>,
) -> Result<Response<pb::GetRollbackResponse>, Status> {
    let caller = caller(&request)?;
    let number = parse_id("rollback_id", "rb", &request.get_ref().rollback_id)?;
    control.context.current().await?;
    let archived = control.context.node.read(|state| {
        let Some(archived) = archive::rollback(state, number)? else {
            return Ok::<_, Status>(None);
        };
        let targets = targets::changes(state, &archived.rollback.changes);
        Ok(Some((targets, archive::rollback_view(state, &archived))))
    })?;
    if let Some((targets, rollback)) = archived {
        control.context.authorize_found(&caller, &targets, || {
            Status::not_found(format!("no rollback {}", rollback_id(number)))
        })?;
        return Ok(Response::new(pb::GetRollbackResponse {
            rollback: Some(rollback),
            changes_only: false,
        }));
    }
    let number = control.visible_rollback(request).await?;
    Ok(Response::new(pb::GetRollbackResponse {
        rollback: Some(control.context.rollback(number)?),
        changes_only: false,
    }))
}

pub(super) async fn list_rollbacks(
    control: &Control,
    request: Request<pb::ListRollbacksRequest>,
) -> Result<Response<pb::ListRollbacksResponse>, Status> {
    let caller = caller(&request)?;
    let request = request.into_inner();
    #[allow(deprecated)] // The names before 0.3, read for one release.
    let page = PageRequest::with_before(
        request.page_size,
        request.limit,
        &request.page_token,
        &request.before,
    );
    let (limit, before) = (page.size()?, page.before("rb")?);
    control.context.current().await?;
    if request.archived {
        let scanned = control.context.node.read(|state| {
            archive::scan(state, ArchiveKind::Rollback, before, limit + 1, |record| {
                let ArchivedRecord::Rollback(archived) = record else {
                    return Ok(None);
                };
                let visible = caller.may_see(&targets::changes(state, &archived.rollback.changes));
                Ok(visible.then(|| pb::Rollback {
                    steps: Vec::new(),
                    ..archive::rollback_view(state, &archived)
                }))
            })
        })?;
        let (rollbacks, next_page_token) = archive::page(scanned, limit, "rb");
        #[allow(deprecated)] // Set for clients before 0.3.
        return Ok(Response::new(pb::ListRollbacksResponse {
            rollbacks,
            next_before: next_page_token.clone(),
            next_page_token,
        }));
    }
    let (rollbacks, next_page_token) = control.context.node.read(|state| {
        let older = state
            .rollbacks
            .range(..before)
            .rev()
            .filter(|(number, _)| caller.may_see(&targets::rollback(state, **number)))
            .map(|(_, record)| pb::Rollback {
                steps: Vec::new(),
                ..convert::rollback(state, record)
            });
        one_page(limit, older, |rollback| rollback.rollback_id.clone())
    });
    #[allow(deprecated)] // Set for clients before 0.3.
    Ok(Response::new(pb::ListRollbacksResponse {
        rollbacks,
        next_before: next_page_token.clone(),
        next_page_token,
    }))
}

/// The most often a watch reads its rollback again: what changed meanwhile is one update.
const WATCH_UPDATE_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

pub(super) async fn watch_rollback(
    control: &Control,
    request: Request<pb::GetRollbackRequest>,
) -> Result<Response<WatchStream>, Status> {
    let watcher = caller(&request)?;
    let changes_only = request.get_ref().changes_only;
    let number = control.visible_rollback(request).await?;
    let first = control.context.rollback(number)?;
    let context = control.context.clone();
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut applied = context.node.subscribe();
        let mut last = first;
        let mut update = pb::GetRollbackResponse {
            rollback: Some(last.clone()),
            changes_only: false,
        };
        loop {
            let ended =
                pb::RollbackState::try_from(last.state).is_ok_and(|state| state.is_terminal());
            if sender.send(Ok(update)).await.is_err() || ended {
                return;
            }
            let mut read_at = std::time::Instant::now();
            // Wait for a change of this rollback; a closed client ends the task.
            loop {
                tokio::select! {
                    changed = applied.changed() => if changed.is_err() { return },
                    _ = sender.closed() => return,
                }
                // Reading the rollback costs its size (every step, under the state's lock the
                // Raft thread applies under), and a rollback moving at hundreds of entries a
                // second would be read that often: changes are gathered for a moment instead.
                let gather = WATCH_UPDATE_EVERY.saturating_sub(read_at.elapsed());
                if !gather.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(gather) => {}
                        _ = sender.closed() => return,
                    }
                }
                // The policy may have changed since the watch began: a watcher revoked or
                // moved out of this rollback's scope stops seeing it.
                if let Err(refusal) = still_allowed(&context, &watcher, number) {
                    let _ = sender.send(Err(context.gate.refuse(refusal))).await;
                    return;
                }
                let Ok(current) = context.rollback(number) else {
                    return;
                };
                // From the read, changed or not: entries of other work must not make a quiet
                // rollback be read again for each of them.
                read_at = std::time::Instant::now();
                if current != last {
                    update = if changes_only {
                        pb::GetRollbackResponse {
                            rollback: Some(changes_since(&last, &current)),
                            changes_only: true,
                        }
                    } else {
                        pb::GetRollbackResponse {
                            rollback: Some(current.clone()),
                            changes_only: false,
                        }
                    };
                    last = current;
                    break;
                }
            }
        }
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(receiver),
    )))
}

/// `now` with only the steps that differ from `before` (by id), and its waves only if any
/// changed: a watch's update costs what changed, not the fleet.
fn changes_since(before: &pb::Rollback, now: &pb::Rollback) -> pb::Rollback {
    let earlier: std::collections::HashMap<&str, &pb::RollbackStep> = before
        .steps
        .iter()
        .map(|step| (step.step_id.as_str(), step))
        .collect();
    pb::Rollback {
        steps: now
            .steps
            .iter()
            .filter(|step| earlier.get(step.step_id.as_str()) != Some(step))
            .cloned()
            .collect(),
        waves: if before.waves == now.waves {
            Vec::new()
        } else {
            now.waves.clone()
        },
        ..now.clone()
    }
}

/// Whether `caller` may still do its call's action on rollback `number` under the policy in
/// force now (not the one its call was admitted under).
fn still_allowed(
    context: &Context,
    caller: &crate::access::Caller,
    number: u64,
) -> Result<(), crate::access::Refusal> {
    context.node.read(|state| {
        let now = crate::access::Caller {
            policy: state.access.policy.clone(),
            ..caller.clone()
        };
        // The policy's decision refuses a denied identity first.
        now.authorize_all(&targets::rollback(state, number))
    })
}

impl Control {
    /// A person's decision about one named thing (a host, a service) in a rollback; the reason
    /// is required, since it goes into the audit log.
    pub(super) async fn decide_for(
        &self,
        request: Request<pb::RollbackActionRequest>,
        (field, named): (&str, fn(&pb::RollbackActionRequest) -> String),
        reason_needed: &str,
        kind: impl FnOnce(u64, String, String) -> CommandKind,
    ) -> Result<Response<pb::GetRollbackResponse>, Status> {
        let caller = caller(&request)?;
        let identity = caller.id();
        let request = request.into_inner();
        let number = parse_id("rollback_id", "rb", &request.rollback_id)?;
        let name = named(&request);
        names::validate_name(field, &name).map_err(field_error)?;
        required_reason(&request.reason, reason_needed)?;
        self.authorize_rollback(&caller, number).await?;
        let kind = kind(number, name.clone(), request.reason);
        let action = kind.action();
        let rollback = self
            .context
            .propose_and_read(&identity, &request.request_id, kind, |state, _| {
                crate::api::rollback_in(state, number)
            })
            .await??;
        info!(
            identity,
            rollback_id = rollback_id(number),
            action,
            name,
            "Rollback decision recorded."
        );
        Ok(Response::new(pb::GetRollbackResponse {
            rollback: Some(rollback),
            changes_only: false,
        }))
    }

    /// The rollback a read names, once the caller may see it.
    pub(super) async fn visible_rollback(
        &self,
        request: Request<pb::GetRollbackRequest>,
    ) -> Result<u64, Status> {
        let caller = caller(&request)?;
        let number = parse_id("rollback_id", "rb", &request.into_inner().rollback_id)?;
        self.authorize_rollback(&caller, number).await?;
        Ok(number)
    }

    /// Allows the caller's action on rollback `number` (after a read barrier, so a rollback
    /// committed before the call is seen), or answers `NOT_FOUND` / `PERMISSION_DENIED`.
    pub(super) async fn authorize_rollback(
        &self,
        caller: &crate::access::Caller,
        number: u64,
    ) -> Result<(), Status> {
        self.context.current().await?;
        self.context
            .node
            .read(|state| archive::refuse_archived(state, ArchiveKind::Rollback, number))?;
        let targets = self
            .context
            .node
            .read(|state| targets::rollback(state, number));
        self.context.authorize_found(caller, &targets, || {
            self.context
                .node
                .read(|state| to_status(unknown_rollback(state, number)))
        })
    }

    pub(super) async fn control(
        &self,
        request: Request<pb::RollbackActionRequest>,
        action: RollbackAction,
    ) -> Result<Response<pb::GetRollbackResponse>, Status> {
        let caller = caller(&request)?;
        let identity = caller.id();
        let request = request.into_inner();
        let number = parse_id("rollback_id", "rb", &request.rollback_id)?;
        required_reason(
            &request.reason,
            &format!(
                "say why you {} it: it goes into the audit log",
                action.name()
            ),
        )?;
        self.authorize_rollback(&caller, number).await?;
        let kind = CommandKind::ControlRollback {
            rollback: number,
            action,
            reason: request.reason,
        };
        let rollback = self
            .context
            .propose_and_read(&identity, &request.request_id, kind, |state, _| {
                crate::api::rollback_in(state, number)
            })
            .await??;
        info!(
            identity,
            rollback_id = rollback_id(number),
            action = action.name(),
            "Rollback controlled."
        );
        Ok(Response::new(pb::GetRollbackResponse {
            rollback: Some(rollback),
            changes_only: false,
        }))
    }
}
