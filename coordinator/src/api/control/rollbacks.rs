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
    let (_, page_size) = steps_page(request.get_ref())?;
    if !request.get_ref().steps_page_token.is_empty() {
        return Err(invalid(
            "steps_page_token",
            "is for GetRollback: an explanation holds the first page of steps",
        ));
    }
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
        let rollback = convert::rollback_page(state, record, 0, page_size);
        Ok::<_, Status>((rollback, text, next))
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
    let (from, page_size) = steps_page(request.get_ref())?;
    control.context.current().await?;
    let archived = control.context.node.read(|state| {
        let Some(archived) = archive::rollback(state, number)? else {
            return Ok::<_, Status>(None);
        };
        let targets = targets::changes(state, &archived.rollback.changes);
        let view = archive::rollback_view(state, &archived, from, page_size);
        Ok(Some((targets, view)))
    })?;
    let rollback = if let Some((targets, rollback)) = archived {
        control.context.authorize_found(&caller, &targets, || {
            Status::not_found(format!("no rollback {}", rollback_id(number)))
        })?;
        rollback
    } else {
        let number = control.visible_rollback(request).await?;
        control.context.node.read(|state| {
            let record = state
                .rollbacks
                .get(&number)
                .ok_or_else(|| to_status(unknown_rollback(state, number)))?;
            Ok::<_, Status>(convert::rollback_page(state, record, from, page_size))
        })?
    };
    if from > rollback.steps_total as usize {
        return Err(invalid(
            "steps_page_token",
            format!(
                "is past the last of {}'s {} steps",
                rollback.rollback_id, rollback.steps_total
            ),
        ));
    }
    Ok(Response::new(pb::GetRollbackResponse {
        next_steps_page_token: next_steps_page_token(&rollback, from),
        rollback: Some(rollback),
        ..Default::default()
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
                    archived_at_ms: archived.archived_at_ms,
                    ..convert::rollback_without_steps(state, &archived.rollback)
                }))
            })
        })?;
        let (mut rollbacks, mut next_page_token) = archive::page(scanned, limit, "rb");
        // A very large fleet's rollback lists every host in its waves: a page stops at ~2 MiB.
        within_bytes(&mut rollbacks, &mut next_page_token, |rollback| {
            rollback.rollback_id.clone()
        });
        #[allow(deprecated)] // Set for clients before 0.3.
        return Ok(Response::new(pb::ListRollbacksResponse {
            rollbacks,
            next_before: next_page_token.clone(),
            next_page_token,
        }));
    }
    let (mut rollbacks, mut next_page_token) = control.context.node.read(|state| {
        let older = state
            .rollbacks
            .range(..before)
            .rev()
            .filter(|(number, _)| caller.may_see(&targets::rollback(state, **number)))
            .map(|(_, record)| convert::rollback_without_steps(state, record));
        one_page(limit, older, |rollback| rollback.rollback_id.clone())
    });
    within_bytes(&mut rollbacks, &mut next_page_token, |rollback| {
        rollback.rollback_id.clone()
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
    let (from, page_size) = steps_page(request.get_ref())?;
    if from != 0 {
        return Err(invalid(
            "steps_page_token",
            "is for GetRollback: a watch starts from the first step",
        ));
    }
    let number = control.visible_rollback(request).await?;
    let (mut watched, first) = control
        .context
        .node
        .read(|state| WatchedRollback::start(state, number))?;
    let mut messages = watched.messages(first, page_size, changes_only)?;
    let context = control.context.clone();
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        let mut applied = context.node.subscribe();
        loop {
            let ended = pb::RollbackState::try_from(watched.rollback.state)
                .is_ok_and(|state| state.is_terminal());
            for message in messages {
                if sender.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            if ended {
                return;
            }
            let mut read_at = std::time::Instant::now();
            // Wait for a change of this rollback; a closed client ends the task.
            messages = loop {
                tokio::select! {
                    changed = applied.changed() => if changed.is_err() { return },
                    _ = sender.closed() => return,
                }
                // Reading the rollback costs its size (every step compared, under the state's
                // lock the Raft thread applies under), and a rollback moving at hundreds of
                // entries a second would be read that often: changes are gathered a moment.
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
                let Ok(changes) = context.node.read(|state| watched.update(state)) else {
                    return;
                };
                // From the read, changed or not: entries of other work must not make a quiet
                // rollback be read again for each of them.
                read_at = std::time::Instant::now();
                if let Some(changes) = changes {
                    match watched.messages(changes, page_size, changes_only) {
                        Ok(messages) => break messages,
                        Err(refusal) => {
                            let _ = sender.send(Err(refusal)).await;
                            return;
                        }
                    }
                }
            };
        }
    }));
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(receiver),
    )))
}

/// What a watch has sent of its rollback: the rollback without its steps and each step's
/// wave and progress as sent, so an update compares the record's steps in place and converts
/// only those that changed (a 10,000-host rollback has some 50,000 steps), and the whole
/// rollback for a watch without changes_only.
struct WatchedRollback {
    number: u64,
    rollback: pb::Rollback,
    steps: Vec<(u32, StepProgress)>,
    whole: Vec<pb::RollbackStep>,
    sent: bool,
}

impl WatchedRollback {
    /// The watch of rollback `number` and its first update: the rollback with every step.
    fn start(state: &State, number: u64) -> Result<(Self, pb::Rollback), Status> {
        let record = state
            .rollbacks
            .get(&number)
            .ok_or_else(|| to_status(unknown_rollback(state, number)))?;
        let mut first = convert::rollback_without_steps(state, record);
        first.steps = (record.steps.iter())
            .map(|step| convert::rollback_step(record, step))
            .collect();
        let watched = Self {
            number,
            rollback: pb::Rollback {
                steps: Vec::new(),
                ..first.clone()
            },
            steps: (record.steps.iter())
                .map(|step| (step.wave, step.progress.clone()))
                .collect(),
            whole: Vec::new(),
            sent: false,
        };
        Ok((watched, first))
    }

    /// What changed since the last update: the rollback as it is now with only its changed
    /// steps, and its waves only if any changed; None when nothing did, Err when the
    /// rollback left the state (archived).
    fn update(&mut self, state: &State) -> Result<Option<pb::Rollback>, ()> {
        let record = state.rollbacks.get(&self.number).ok_or(())?;
        let mut now = convert::rollback_without_steps(state, record);
        for (index, step) in record.steps.iter().enumerate() {
            let unchanged = self
                .steps
                .get(index)
                .is_some_and(|(wave, progress)| *wave == step.wave && *progress == step.progress);
            if unchanged {
                continue;
            }
            let seen = (step.wave, step.progress.clone());
            match self.steps.get_mut(index) {
                Some(sent) => *sent = seen,
                None => self.steps.push(seen),
            }
            now.steps.push(convert::rollback_step(record, step));
        }
        let changed_steps = std::mem::take(&mut now.steps);
        if changed_steps.is_empty() && now == self.rollback {
            return Ok(None);
        }
        let waves_changed = now.waves != self.rollback.waves;
        self.rollback = now.clone();
        if !waves_changed {
            now.waves.clear();
        }
        now.steps = changed_steps;
        Ok(Some(now))
    }

    /// The messages that send `update` (the first, whole, or a later one's changes). With
    /// changes_only: its steps in pages of at most `page_size` and an answer's size, all but
    /// the last holding steps alone (`more_follows`), every message of an update after the
    /// watch's first marked as changes. Without: the whole rollback in one message, or
    /// FAILED_PRECONDITION once it has grown past what one holds (details, an isolation).
    fn messages(
        &mut self,
        mut update: pb::Rollback,
        page_size: usize,
        changes_only: bool,
    ) -> Result<Vec<pb::GetRollbackResponse>, Status> {
        let first = !self.sent;
        self.sent = true;
        let steps = std::mem::take(&mut update.steps);
        if !changes_only {
            merge_steps(&mut self.whole, steps);
            if update.waves.is_empty() {
                update.waves = self.rollback.waves.clone();
            }
            update.steps = self.whole.clone();
            fits_one_message(&update)?;
            return Ok(vec![pb::GetRollbackResponse {
                rollback: Some(update),
                ..Default::default()
            }]);
        }
        // The last message holds the update's other fields and as many of its last steps as fit
        // beside them; the pages before it hold steps alone, cut against an answer's size.
        let mut tail_start = steps.len();
        let mut bytes = prost::Message::encoded_len(&update);
        while tail_start > 0 && steps.len() - tail_start < page_size {
            bytes += repeated_bytes(&steps[tail_start - 1..tail_start]);
            if bytes > MAX_ROLLBACK_BYTES {
                break;
            }
            tail_start -= 1;
        }
        let steps_alone = pb::Rollback {
            rollback_id: update.rollback_id.clone(),
            ..Default::default()
        };
        let alone_bytes = prost::Message::encoded_len(&steps_alone);
        let mut page_ends = Vec::new();
        let mut end = 0;
        while end < tail_start {
            let page = &steps[end..tail_start.min(end + page_size)];
            end += items_that_fit(alone_bytes, page);
            page_ends.push(end);
        }
        page_ends.push(steps.len());
        let pages = page_ends.len();
        let mut steps = steps.into_iter();
        let mut taken = 0;
        let messages = (page_ends.into_iter().enumerate())
            .map(|(index, page_end)| {
                let page: Vec<pb::RollbackStep> = steps.by_ref().take(page_end - taken).collect();
                taken = page_end;
                let more_follows = index + 1 < pages;
                let fields = if more_follows {
                    steps_alone.clone()
                } else {
                    std::mem::take(&mut update)
                };
                pb::GetRollbackResponse {
                    rollback: Some(pb::Rollback {
                        steps: page,
                        ..fields
                    }),
                    changes_only: !first,
                    more_follows,
                    ..Default::default()
                }
            })
            .collect();
        Ok(messages)
    }
}

/// A watch of whole rollbacks sends each in one message: refused, naming changes_only, for a
/// rollback of more steps or bytes than one answer holds.
fn fits_one_message(rollback: &pb::Rollback) -> Result<(), Status> {
    let steps = &rollback.steps;
    let base_bytes = prost::Message::encoded_len(rollback) - repeated_bytes(steps);
    if steps.len() > MAX_STEPS_PAGE as usize || items_that_fit(base_bytes, steps) < steps.len() {
        return Err(Status::failed_precondition(format!(
            "{} has {} steps, more than one message holds: watch with changes_only (rewindctl \
             does), or read it a page at a time with GetRollback",
            rollback.rollback_id,
            steps.len()
        )));
    }
    Ok(())
}

/// `whole` with `changes` put in place by step id (new steps added at the end).
fn merge_steps(whole: &mut Vec<pb::RollbackStep>, changes: Vec<pb::RollbackStep>) {
    let position: std::collections::HashMap<String, usize> = (whole.iter().enumerate())
        .map(|(index, step)| (step.step_id.clone(), index))
        .collect();
    for step in changes {
        match position.get(&step.step_id) {
            Some(&index) => whole[index] = step,
            None => whole.push(step),
        }
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
            next_steps_page_token: next_steps_page_token(&rollback, 0),
            rollback: Some(rollback),
            ..Default::default()
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
            next_steps_page_token: next_steps_page_token(&rollback, 0),
            rollback: Some(rollback),
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(count: usize, detail_bytes: usize) -> Vec<pb::RollbackStep> {
        (0..count)
            .map(|index| pb::RollbackStep {
                step_id: format!("rb-1/web/host-{index:05}/restart"),
                detail: "x".repeat(detail_bytes),
                ..Default::default()
            })
            .collect()
    }

    fn watched() -> WatchedRollback {
        WatchedRollback {
            number: 1,
            rollback: pb::Rollback {
                rollback_id: "rb-1".into(),
                ..Default::default()
            },
            steps: Vec::new(),
            whole: Vec::new(),
            sent: false,
        }
    }

    #[test]
    fn a_page_of_steps_ends_where_the_answer_would_pass_its_bytes() {
        // 1,000 steps with details at their bound would be 4 MiB: the page stops near 2 MiB.
        let many = steps(1000, rewind_shared::bounds::MAX_DETAIL_BYTES);
        let fit = items_that_fit(1000, &many);
        assert!(fit > 400 && fit < 1000, "{fit}");
        let with = |count: usize| {
            prost::Message::encoded_len(&pb::Rollback {
                steps: many[..count].to_vec(),
                ..Default::default()
            }) + 1000
        };
        assert!(with(fit) <= MAX_ROLLBACK_BYTES && with(fit + 1) > MAX_ROLLBACK_BYTES);
        // One step always fits, whatever else the rollback holds; none when there are none.
        assert_eq!(items_that_fit(MAX_ROLLBACK_BYTES, &many), 1);
        assert_eq!(items_that_fit::<pb::RollbackStep>(0, &[]), 0);
    }

    #[test]
    fn a_watch_sends_a_large_update_in_pages_the_last_holding_the_rest() {
        let mut watch = watched();
        let first = pb::Rollback {
            steps: steps(2500, 10),
            state: pb::RollbackState::Running as i32,
            waves: vec![pb::RollbackWave::default()],
            ..watch.rollback.clone()
        };
        let messages = watch.messages(first.clone(), 1000, true).unwrap();
        let sizes: Vec<usize> = (messages.iter())
            .map(|message| message.rollback.as_ref().unwrap().steps.len())
            .collect();
        assert_eq!(sizes, [1000, 500, 1000]);
        // The watch's first update, every message of it: the whole rollback, not changes.
        let marked: Vec<(bool, bool)> = (messages.iter())
            .map(|message| (message.changes_only, message.more_follows))
            .collect();
        assert_eq!(marked, [(false, true), (false, true), (false, false)]);
        // The pages before the last hold steps alone; the last holds everything else.
        let rest = |index: usize| pb::Rollback {
            steps: Vec::new(),
            ..messages[index].rollback.clone().unwrap()
        };
        let steps_alone = pb::Rollback {
            rollback_id: "rb-1".into(),
            ..Default::default()
        };
        assert_eq!((rest(0), rest(1)), (steps_alone.clone(), steps_alone));
        assert_eq!(
            rest(2),
            pb::Rollback {
                steps: Vec::new(),
                ..first.clone()
            }
        );
        let sent: Vec<pb::RollbackStep> = (messages.into_iter())
            .flat_map(|message| message.rollback.unwrap().steps)
            .collect();
        assert_eq!(sent, first.steps);
        // A later update of many changes is cut the same way, every message a change; one
        // without steps is one message.
        let later = watch.messages(first.clone(), 1000, true).unwrap();
        assert!(later.len() == 3 && later.iter().all(|message| message.changes_only));
        let quiet = watch.messages(pb::Rollback::default(), 1000, true).unwrap();
        assert!(quiet.len() == 1 && quiet[0].changes_only && !quiet[0].more_follows);
    }

    #[test]
    fn every_message_of_a_watch_stays_within_an_answer_beside_large_fields() {
        // Details at their bound and waves listing 20,000 hosts (about 1 MiB).
        let waves = vec![pb::RollbackWave {
            hosts: (0..20_000)
                .map(|index| format!("host-{index:05}.eu"))
                .collect(),
            ..Default::default()
        }];
        let update = pb::Rollback {
            steps: steps(2000, rewind_shared::bounds::MAX_DETAIL_BYTES),
            waves: waves.clone(),
            ..watched().rollback
        };
        let messages = watched().messages(update, 10_000, true).unwrap();
        assert!(messages.len() > 4, "{}", messages.len());
        for (index, message) in messages.iter().enumerate() {
            let rollback = message.rollback.as_ref().unwrap();
            assert!(prost::Message::encoded_len(rollback) <= MAX_ROLLBACK_BYTES);
            let last = index + 1 == messages.len();
            assert_eq!(message.more_follows, !last);
            assert_eq!(rollback.waves.is_empty(), !last, "fields only in the last");
        }
        let sent: usize = (messages.iter())
            .map(|message| message.rollback.as_ref().unwrap().steps.len())
            .sum();
        assert_eq!(sent, 2000);
    }

    #[test]
    fn a_watch_of_whole_rollbacks_merges_the_changes_into_every_update() {
        let mut watch = watched();
        let first = pb::Rollback {
            steps: steps(3, 0),
            ..watch.rollback.clone()
        };
        let sent = watch.messages(first.clone(), 10, false).unwrap();
        assert_eq!(sent[0].rollback.as_ref().unwrap().steps, first.steps);
        let mut changed = first.steps[1].clone();
        changed.attempts = 1;
        let update = pb::Rollback {
            steps: vec![changed.clone()],
            ..watch.rollback.clone()
        };
        let sent = watch.messages(update, 10, false).unwrap();
        let whole = &sent[0].rollback.as_ref().unwrap().steps;
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[1], changed);
        assert!(sent.len() == 1 && !sent[0].changes_only && !sent[0].more_follows);
        // Grown past one message (an isolation's details on every step): refused, by name.
        let grown = pb::Rollback {
            steps: (first.steps.iter())
                .map(|step| pb::RollbackStep {
                    detail: "y".repeat(1 << 20),
                    ..step.clone()
                })
                .collect(),
            ..watch.rollback.clone()
        };
        let refused = watch.messages(grown, 10, false).expect_err("too large now");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused.message().contains("changes_only"), "{refused:?}");
    }

    #[test]
    fn a_watch_of_whole_rollbacks_is_refused_beyond_one_message() {
        let rollback = |steps| pb::Rollback {
            rollback_id: "rb-1".into(),
            steps,
            ..Default::default()
        };
        assert!(fits_one_message(&rollback(steps(10_000, 0))).is_ok());
        for too_many in [
            steps(10_001, 0),
            steps(600, rewind_shared::bounds::MAX_DETAIL_BYTES),
        ] {
            let refused = fits_one_message(&rollback(too_many)).expect_err("too large");
            assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
            assert!(refused.message().contains("changes_only"), "{refused:?}");
        }
    }

    #[test]
    fn the_next_page_starts_after_the_steps_this_one_held() {
        let page = pb::Rollback {
            steps: steps(3, 0),
            steps_total: 10,
            ..Default::default()
        };
        assert_eq!(next_steps_page_token(&page, 5), "8");
        assert_eq!(next_steps_page_token(&page, 7), "");
    }
}
