//! `ControlService`: what people and tools call.
//!
//! Each handler validates its input first (naming the field at fault), then either reads the
//! state or proposes one command. Nothing is proposed for a request that fails validation.

use std::pin::Pin;

use rewind_proto::v1::{self as pb, control_service_server::ControlService};
use rewind_shared::names;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::info;

use super::gate::caller;
use super::status::{invalid, to_status};
use super::validate::*;
use super::{Context, convert, plans, targets};
use crate::access::Target;
use crate::state_machine::*;

pub struct Control {
    pub context: Context,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::GetRollbackResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ControlService for Control {
    async fn list_hosts(
        &self,
        request: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        let caller = caller(&request)?;
        self.context.current().await?;
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => MAX_HOSTS_PER_PAGE,
            size => (size as usize).min(MAX_HOSTS_PER_PAGE),
        };
        if !request.page_token.is_empty() {
            names::validate_name("page_token", &request.page_token)
                .map_err(|error| invalid("page_token", error.to_string()))?;
        }
        let context = &self.context;
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

    async fn forget_host(
        &self,
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
        self.context
            .node
            .read(|state| version::require(state, 2, "host.forget"))
            .map_err(to_status)?;
        let outcome = self
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
        if !self
            .context
            .node
            .read(|state| state.hosts.contains_key(&request.host_id))
        {
            self.context.sessions.drop_host(&request.host_id);
            self.context.health.forget(&request.host_id);
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

    async fn put_service(
        &self,
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
        self.context
            .authorize(&caller, &[Target::Service(name.clone())])?;
        self.context
            .propose(
                &caller.id(),
                &request.request_id,
                CommandKind::PutService { service: record },
            )
            .await?;
        let service = self
            .context
            .node
            .read(|state| state.services.get(&name).map(convert::service));
        Ok(Response::new(pb::PutServiceResponse { service }))
    }

    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let caller = caller(&request)?;
        self.context.current().await?;
        let services = self.context.node.read(|state| {
            state
                .services
                .values()
                .filter(|service| caller.may_see(&[Target::Service(service.name.clone())]))
                .map(convert::service)
                .collect()
        });
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn register_migration(
        &self,
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
        self.context
            .propose(
                &identity,
                &request.request_id,
                CommandKind::RegisterMigration { migration: record },
            )
            .await?;
        let migration = self.context.node.read(|state| {
            state
                .migrations
                .get(&database)
                .and_then(|versions| versions.get(&version))
                .map(|record| convert::migration(record, true))
        });
        Ok(Response::new(pb::RegisterMigrationResponse { migration }))
    }

    async fn list_schema_txns(
        &self,
        request: Request<pb::ListSchemaTxnsRequest>,
    ) -> Result<Response<pb::ListSchemaTxnsResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let wanted = if request.txn_id.is_empty() {
            None
        } else {
            Some(parse_id("txn_id", "st", &request.txn_id)?)
        };
        self.context.current().await?;
        let txns: Vec<pb::SchemaTxn> = self.context.node.read(|state| {
            state
                .schema_txns
                .values()
                .rev()
                .filter(|txn| wanted.is_none_or(|number| txn.number == number))
                .filter(|txn| caller.may_see(&targets::schema_txn(state, txn.number)))
                .take(MAX_LISTED_SCHEMA_TXNS)
                .map(|txn| convert::schema_txn(txn, request.detailed))
                .collect()
        });
        if let (Some(number), true) = (wanted, txns.is_empty()) {
            return Err(Status::not_found(format!(
                "no schema transaction {}",
                schema_txn_id(number)
            )));
        }
        Ok(Response::new(pb::ListSchemaTxnsResponse { txns }))
    }

    async fn resolved_by_hand(
        &self,
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
        self.context.current().await?;
        // A resolve running on a connected agent may still succeed: wait for it. One whose agent
        // is away (the host is being rebuilt) can be taken over.
        let running = self.context.node.read(|state| {
            state.schema_txns.get(&number).is_some_and(|txn| {
                txn.shards.iter().any(|shard| {
                    shard.host_id == request.host_id && shard.resolve.status == StepStatus::Running
                })
            })
        });
        if running && self.context.sessions.generation(&request.host_id).is_some() {
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
        self.context
            .propose(&identity, &request.request_id, kind)
            .await?;
        info!(
            identity,
            txn_id = schema_txn_id(number),
            host_id = request.host_id,
            "Shard resolved by hand."
        );
        let txn = self.context.node.read(|state| {
            state
                .schema_txns
                .get(&number)
                .map(|txn| convert::schema_txn(txn, true))
        });
        Ok(Response::new(pb::SchemaTxnResponse { txn }))
    }

    async fn start_drill(
        &self,
        request: Request<pb::StartDrillRequest>,
    ) -> Result<Response<pb::DrillResponse>, Status> {
        let caller = caller(&request)?;
        let identity = caller.id();
        let request = request.into_inner();
        let change = parse_id("change_id", "ch", &request.change_id)?;
        names::validate_name("environment", &request.environment).map_err(field_error)?;
        self.context.current().await?;
        let targets = self
            .context
            .node
            .read(|state| targets::drill_of(state, change, &request.environment));
        self.context.authorize_found(&caller, &targets, || {
            invalid("change_id", format!("no change {}", change_id(change)))
        })?;
        let kind = CommandKind::StartDrill {
            change,
            environment: request.environment,
        };
        let Outcome::Drill(number) = self
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
        let drill = self.context.node.read(|state| {
            state
                .drills
                .get(&number)
                .map(|drill| convert::drill(state, drill))
        });
        Ok(Response::new(pb::DrillResponse { drill }))
    }

    async fn get_drill(
        &self,
        request: Request<pb::GetDrillRequest>,
    ) -> Result<Response<pb::DrillResponse>, Status> {
        let caller = caller(&request)?;
        let number = parse_id("drill_id", "dr", &request.into_inner().drill_id)?;
        self.context.current().await?;
        let targets = self
            .context
            .node
            .read(|state| targets::drill(state, number));
        self.context.authorize_found(&caller, &targets, || {
            Status::not_found(format!("no drill {}", drill_id(number)))
        })?;
        let drill = self
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

    async fn list_migrations(
        &self,
        request: Request<pb::ListMigrationsRequest>,
    ) -> Result<Response<pb::ListMigrationsResponse>, Status> {
        self.context.current().await?;
        let request = request.into_inner();
        if !request.database.is_empty() {
            names::validate_name("database", &request.database).map_err(field_error)?;
        }
        let migrations = self.context.node.read(|state| {
            state
                .migrations
                .iter()
                .filter(|(database, _)| {
                    request.database.is_empty() || **database == request.database
                })
                .flat_map(|(_, versions)| versions.values())
                .map(|record| convert::migration(record, request.with_scripts))
                .collect()
        });
        Ok(Response::new(pb::ListMigrationsResponse { migrations }))
    }

    async fn register_release(
        &self,
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
        let record = ReleaseRecord {
            service: release.service.clone(),
            version: release.version.clone(),
            artifact_digest: release.artifact_digest,
            commit: release.commit,
            registered_at_ms: 0,
            api_version: release.api_version,
            requires: release.requires.into_iter().collect(),
        };
        // The target is the request's own: no read barrier (a quorum round per write).
        self.context
            .authorize(&caller, &[Target::Service(release.service.clone())])?;
        self.context
            .propose(
                &identity,
                &request.request_id,
                CommandKind::RegisterRelease { release: record },
            )
            .await?;
        let release = self.context.node.read(|state| {
            state
                .releases
                .get(&release.service)
                .and_then(|versions| versions.get(&release.version))
                .map(|release| convert::release(release))
        });
        Ok(Response::new(pb::RegisterReleaseResponse { release }))
    }

    async fn list_releases(
        &self,
        request: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        let caller = caller(&request)?;
        self.context.current().await?;
        let service = request.into_inner().service;
        if !service.is_empty() {
            names::validate_name("service", &service).map_err(field_error)?;
        }
        let releases = self.context.node.read(|state| {
            state
                .releases
                .iter()
                .filter(|(name, _)| service.is_empty() || **name == service)
                .filter(|(name, _)| caller.may_see(&[Target::Service(name.to_string())]))
                .flat_map(|(_, versions)| {
                    versions.values().map(|release| convert::release(release))
                })
                .collect()
        });
        Ok(Response::new(pb::ListReleasesResponse { releases }))
    }

    async fn start_change(
        &self,
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
        validate_reason(&request.reason)?;
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
        self.context.current().await?;
        let targets = self
            .context
            .node
            .read(|state| targets::new_change(state, &request.service, &request.host_ids));
        self.context.authorize(&caller, &targets)?;
        if request.break_glass && request.reason.trim().is_empty() {
            return Err(invalid(
                "reason",
                "say why break-glass is needed: it goes into the escalation and the audit log",
            ));
        }
        let baseline = self.context.change_baseline(&request.service);
        let kind = CommandKind::StartChange {
            break_glass: request.break_glass,
            migrations,
            service: request.service,
            version: request.version,
            host_ids: request.host_ids,
            reason: request.reason,
            baseline,
            flags_on: request.flags_on,
        };
        let number = match self
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
                let request = self.context.node.read(|state| {
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
        let change = self
            .context
            .node
            .read(|state| state.changes.get(&number).map(convert::change));
        Ok(Response::new(pb::StartChangeResponse {
            change,
            request: None,
        }))
    }

    async fn get_change(
        &self,
        request: Request<pb::GetChangeRequest>,
    ) -> Result<Response<pb::GetChangeResponse>, Status> {
        let caller = caller(&request)?;
        self.context.current().await?;
        let number = parse_id("change_id", "ch", &request.into_inner().change_id)?;
        let targets = self
            .context
            .node
            .read(|state| targets::change(state, number));
        self.context.authorize_found(&caller, &targets, || {
            self.context
                .node
                .read(|state| to_status(unknown_change(state, number)))
        })?;
        let change = self.context.node.read(|state| {
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

    async fn list_changes(
        &self,
        request: Request<pb::ListChangesRequest>,
    ) -> Result<Response<pb::ListChangesResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let (limit, before) = page(request.limit, "ch", &request.before)?;
        self.context.current().await?;
        let service = request.service;
        let (changes, more) = self.context.node.read(|state| {
            let mut matching = state
                .changes
                .range(..before)
                .rev()
                .map(|(_, change)| change)
                .filter(|change| service.is_empty() || change.service == service)
                .filter(|change| caller.may_see(&targets::change(state, change.number)));
            let changes: Vec<pb::Change> =
                matching.by_ref().take(limit).map(convert::change).collect();
            (changes, matching.next().is_some())
        });
        let next_before = match changes.last() {
            Some(last) if more => last.change_id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListChangesResponse {
            changes,
            next_before,
        }))
    }

    async fn plan_rollback(
        &self,
        request: Request<pb::PlanRollbackRequest>,
    ) -> Result<Response<pb::PlanRollbackResponse>, Status> {
        let caller = caller(&request)?;
        self.context.current().await?;
        let request = request.into_inner();
        let options = plans::options_from(request.options, 0, self.context.default_max_parallel)?;
        let view = plans::LiveHosts {
            sessions: &self.context.sessions,
            health: &self.context.health,
        };
        let plan = self.context.node.read(|state| {
            let changes = plans::selected_changes(state, request.selection, "")?;
            self.context
                .authorize(&caller, &targets::changes(state, &changes))?;
            plans::preview(state, &changes, &options, &view)
        })?;
        Ok(Response::new(pb::PlanRollbackResponse { plan: Some(plan) }))
    }

    async fn start_rollback(
        &self,
        request: Request<pb::StartRollbackRequest>,
    ) -> Result<Response<pb::StartRollbackResponse>, Status> {
        let caller = caller(&request)?;
        let identity = caller.id();
        let request = request.into_inner();
        validate_reason(&request.reason)?;
        if !request.plan_hash.is_empty() {
            names::validate_digest("plan_hash", &request.plan_hash).map_err(field_error)?;
        }
        let options = plans::options_from(
            request.options,
            request.max_parallel,
            self.context.default_max_parallel,
        )?;
        self.context.current().await?;
        let (changes, targets) = self.context.node.read(|state| {
            let changes = plans::selected_changes(state, request.selection, &request.change_id)?;
            let targets = targets::changes(state, &changes);
            Ok::<_, Status>((changes, targets))
        })?;
        if request.break_glass && request.reason.trim().is_empty() {
            return Err(invalid(
                "reason",
                "break-glass needs a reason: it goes into the escalation and the review",
            ));
        }
        self.context.authorize(&caller, &targets)?;
        let reason = if request.reason.is_empty() {
            "requested by an operator".to_string()
        } else {
            request.reason
        };
        let kind = CommandKind::StartRollback {
            changes,
            options,
            plan_hash: request.plan_hash,
            reason,
            trigger: Trigger::Manual,
            break_glass: request.break_glass,
            planned: None,
        };
        match self
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
                let rollback = self.context.node.read(|state| {
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
                let request = self.context.node.read(|state| {
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

    async fn skip_host(
        &self,
        request: Request<pb::RollbackActionRequest>,
    ) -> Result<Response<pb::GetRollbackResponse>, Status> {
        let named = |request: &pb::RollbackActionRequest| request.host_id.clone();
        self.decide_for(
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

    async fn isolate_service(
        &self,
        request: Request<pb::RollbackActionRequest>,
    ) -> Result<Response<pb::GetRollbackResponse>, Status> {
        let named = |request: &pb::RollbackActionRequest| request.service.clone();
        self.decide_for(
            request,
            ("service", named),
            "say why the service is isolated instead of reverted: it goes into the audit log",
            |rollback, service, reason| CommandKind::IsolateService {
                rollback,
                service,
                reason,
            },
        )
        .await
    }

    async fn explain_rollback(
        &self,
        request: Request<pb::GetRollbackRequest>,
    ) -> Result<Response<pb::ExplainRollbackResponse>, Status> {
        let number = self.visible_rollback(request).await?;
        let services = self.context.node.read(|state| {
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
                let aggregate = self.context.service_health(&service);
                (service, aggregate)
            })
            .collect();
        let (rollback, explanation, next_commands) = self.context.node.read(|state| {
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

    async fn get_rollback(
        &self,
        request: Request<pb::GetRollbackRequest>,
    ) -> Result<Response<pb::GetRollbackResponse>, Status> {
        let number = self.visible_rollback(request).await?;
        Ok(Response::new(pb::GetRollbackResponse {
            rollback: Some(self.context.rollback(number)?),
        }))
    }

    async fn list_rollbacks(
        &self,
        request: Request<pb::ListRollbacksRequest>,
    ) -> Result<Response<pb::ListRollbacksResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let (limit, before) = page(request.limit, "rb", &request.before)?;
        self.context.current().await?;
        let (rollbacks, more) = self.context.node.read(|state| {
            let mut older = state
                .rollbacks
                .range(..before)
                .rev()
                .filter(|(number, _)| caller.may_see(&targets::rollback(state, **number)));
            let rollbacks: Vec<pb::Rollback> = older
                .by_ref()
                .take(limit)
                .map(|(_, record)| pb::Rollback {
                    steps: Vec::new(),
                    ..convert::rollback(state, record)
                })
                .collect();
            (rollbacks, older.next().is_some())
        });
        let next_before = match rollbacks.last() {
            Some(last) if more => last.rollback_id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListRollbacksResponse {
            rollbacks,
            next_before,
        }))
    }

    type WatchRollbackStream = WatchStream;

    async fn watch_rollback(
        &self,
        request: Request<pb::GetRollbackRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let watcher = caller(&request)?;
        let number = self.visible_rollback(request).await?;
        let first = self.context.rollback(number)?;
        let context = self.context.clone();
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut applied = context.node.subscribe();
            let mut last = first;
            loop {
                let ended =
                    pb::RollbackState::try_from(last.state).is_ok_and(|state| state.is_terminal());
                if sender
                    .send(Ok(pb::GetRollbackResponse {
                        rollback: Some(last.clone()),
                    }))
                    .await
                    .is_err()
                    || ended
                {
                    return;
                }
                // Wait for a change of this rollback; a closed client ends the task.
                loop {
                    tokio::select! {
                        changed = applied.changed() => if changed.is_err() { return },
                        _ = sender.closed() => return,
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
                    if current != last {
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

    async fn pause_rollback(
        &self,
        request: Request<pb::RollbackActionRequest>,
    ) -> Result<Response<pb::GetRollbackResponse>, Status> {
        self.control(request, RollbackAction::Pause).await
    }

    async fn resume_rollback(
        &self,
        request: Request<pb::RollbackActionRequest>,
    ) -> Result<Response<pb::GetRollbackResponse>, Status> {
        self.control(request, RollbackAction::Resume).await
    }

    async fn abort_rollback(
        &self,
        request: Request<pb::RollbackActionRequest>,
    ) -> Result<Response<pb::GetRollbackResponse>, Status> {
        self.control(request, RollbackAction::Abort).await
    }

    async fn set_flag(
        &self,
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
        validate_reason(&request.reason)?;
        if request.kill && request.enabled {
            return Err(invalid("enabled", "a kill switch turns a flag off"));
        }
        // The target is the request's own: no read barrier (a quorum round per write).
        self.context
            .authorize(&caller, &[Target::scoped(&environment, &request.service)])?;
        let kind = CommandKind::SetFlag {
            environment: environment.clone(),
            service: request.service.clone(),
            name: request.name.clone(),
            enabled: request.enabled,
            kill: request.kill,
            reason: request.reason,
        };
        self.context
            .propose(&identity, &request.request_id, kind)
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
        let flag = self.context.node.read(|state| {
            state
                .flag(&environment, &request.service, &request.name)
                .map(|record| {
                    convert::flag([&environment, &request.service, &request.name], record)
                })
        });
        flag.map(Response::new)
            .ok_or_else(|| Status::internal("the flag was set but is not in the state"))
    }

    async fn list_flags(
        &self,
        request: Request<pb::ListFlagsRequest>,
    ) -> Result<Response<pb::ListFlagsResponse>, Status> {
        let caller = caller(&request)?;
        self.context.current().await?;
        let request = request.into_inner();
        let flags = self.context.node.read(|state| {
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

    async fn list_triggers(
        &self,
        request: Request<pb::ListTriggersRequest>,
    ) -> Result<Response<pb::ListTriggersResponse>, Status> {
        let caller = caller(&request)?;
        self.context.current().await?;
        let limit = match request.into_inner().limit {
            0 => 100,
            limit => limit.min(1000),
        } as usize;
        let mut answer = self
            .context
            .node
            .read(|state| convert::triggers(state, limit));
        answer.triggers.retain(|trigger| {
            caller.may_see(&[Target::scoped(&trigger.environment, &trigger.service)])
        });
        // Which services tripped the breaker is the whole cluster's business.
        if !caller.may_see(&[Target::Cluster]) {
            answer.breaker_services.clear();
        }
        Ok(Response::new(answer))
    }

    async fn reset_breaker(
        &self,
        request: Request<pb::ResetBreakerRequest>,
    ) -> Result<Response<pb::ListTriggersResponse>, Status> {
        let caller = caller(&request)?;
        let identity = caller.id();
        let request = request.into_inner();
        required_reason(
            &request.reason,
            "say why monitoring can be trusted again: it goes into the audit log",
        )?;
        self.context
            .propose(
                &identity,
                &request.request_id,
                CommandKind::ResetBreaker {
                    reason: request.reason,
                },
            )
            .await?;
        info!(identity, "Global breaker reset.");
        Ok(Response::new(
            self.context
                .node
                .read(|state| convert::triggers(state, 100)),
        ))
    }

    async fn list_members(
        &self,
        _request: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        Ok(Response::new(self.members().await))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let caller = caller(&request)?;
        let identity = caller.id();
        let request = request.into_inner();
        validate_reason(&request.reason)?;
        let to = request.member_id;
        if self.context.directory.get(to).is_none() {
            return Err(super::cluster::not_a_member(&self.context, to));
        }
        if to == self.context.status.borrow().id {
            return Err(invalid("member_id", format!("member {to} already leads")));
        }
        let reason = if request.reason.is_empty() {
            format!("requested by {identity}")
        } else {
            request.reason
        };
        self.context
            .propose(
                &identity,
                &request.request_id,
                CommandKind::TransferLeader { to, reason },
            )
            .await?;
        self.context
            .node
            .transfer_leader(to)
            .await
            .map_err(to_status)?;
        info!(identity, to, "Leadership hand-over requested.");
        Ok(Response::new(self.members().await))
    }

    async fn add_member(
        &self,
        request: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let caller = caller(&request)?;
        let identity = caller.id();
        super::cluster::add_member(&self.context, &identity, request.into_inner()).await?;
        Ok(Response::new(self.members().await))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let caller = caller(&request)?;
        let identity = caller.id();
        super::cluster::remove_member(&self.context, &identity, request.into_inner()).await?;
        Ok(Response::new(self.members().await))
    }

    async fn get_cluster_version(
        &self,
        _request: Request<pb::GetClusterVersionRequest>,
    ) -> Result<Response<pb::ClusterVersion>, Status> {
        self.context.current().await?;
        Ok(Response::new(super::upgrade::show(&self.context).await))
    }

    async fn finalize_upgrade(
        &self,
        request: Request<pb::FinalizeUpgradeRequest>,
    ) -> Result<Response<pb::ClusterVersion>, Status> {
        let caller = caller(&request)?;
        super::upgrade::finalize(&self.context, &caller.id(), request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.context.current().await?;
        let request = request.into_inner();
        let limit = page_limit(request.limit)?;
        let skip = request.from_index.saturating_sub(1) as usize;
        let entries = self.context.node.read(|state| {
            state
                .audit
                .entries()
                .iter()
                .skip(skip)
                .take(limit)
                .map(|entry| convert::audit_entry(entry))
                .collect()
        });
        Ok(Response::new(pb::ListAuditResponse { entries }))
    }

    async fn verify_audit(
        &self,
        _request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        self.context.current().await?;
        let verification = self.context.node.read(|state| state.audit.verify());
        Ok(Response::new(pb::VerifyAuditResponse {
            ok: verification.first_broken.is_none(),
            entries: verification.entries,
            first_broken_index: verification.first_broken.unwrap_or(0),
            detail: verification.detail,
            head_hash: verification.head_hash,
        }))
    }

    async fn inspect_host(
        &self,
        request: Request<pb::InspectHostRequest>,
    ) -> Result<Response<pb::InspectHostResponse>, Status> {
        let caller = caller(&request)?;
        self.context.current().await?;
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
        let Some(targets) = self
            .context
            .node
            .read(|state| state.hosts.get(&request.host_id).map(targets::host))
        else {
            return Err(Status::not_found(format!(
                "host {} is not registered",
                request.host_id
            )));
        };
        self.context.authorize(&caller, &targets)?;
        let answer = self
            .context
            .sessions
            .inspect(
                &request.host_id,
                &request.service,
                mode,
                self.context.env_key(&caller.id(), &request.compare_token),
                INSPECT_TIMEOUT,
            )
            .await
            .map_err(|error| match error {
                crate::sessions::SendError::NotConnected(_) => Status::failed_precondition(
                    format!("{error}: only a connected agent can describe its host"),
                ),
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

    async fn get_policy(
        &self,
        _request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        self.context.current().await?;
        Ok(Response::new(super::policy::show(&self.context)))
    }

    async fn apply_policy(
        &self,
        request: Request<pb::ApplyPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let caller = caller(&request)?;
        let policy = super::policy::apply(&self.context, &caller, request.into_inner()).await?;
        info!(
            identity = caller.id(),
            version = policy.version,
            "Access policy applied."
        );
        Ok(Response::new(policy))
    }

    async fn check_access(
        &self,
        request: Request<pb::CheckAccessRequest>,
    ) -> Result<Response<pb::CheckAccessResponse>, Status> {
        self.context.current().await?;
        super::policy::check(&self.context, request.get_ref()).map(Response::new)
    }

    async fn list_requests(
        &self,
        request: Request<pb::ListRequestsRequest>,
    ) -> Result<Response<pb::ListRequestsResponse>, Status> {
        let caller = caller(&request)?;
        super::requests::list(&self.context, &caller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_request(
        &self,
        request: Request<pb::GetRequestRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let caller = caller(&request)?;
        super::requests::get(&self.context, &caller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let caller = caller(&request)?;
        let created =
            super::join::create_token(&self.context, &caller, request.into_inner()).await?;
        info!(
            identity = caller.id(),
            token = created
                .details
                .as_ref()
                .map(|token| token.token_id.as_str()),
            "Join token created."
        );
        Ok(Response::new(created))
    }

    async fn list_join_tokens(
        &self,
        _request: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
        super::join::list_tokens(&self.context)
            .await
            .map(Response::new)
    }

    async fn revoke_join_token(
        &self,
        request: Request<pb::RevokeJoinTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        let caller = caller(&request)?;
        super::join::revoke_token(&self.context, &caller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn approve_request(
        &self,
        request: Request<pb::RequestDecision>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        self.decide_request(request, RequestDecision::Approve).await
    }

    async fn deny_request(
        &self,
        request: Request<pb::RequestDecision>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        self.decide_request(request, RequestDecision::Deny).await
    }

    async fn review_request(
        &self,
        request: Request<pb::RequestDecision>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        self.decide_request(request, RequestDecision::Review).await
    }

    async fn get_service_health(
        &self,
        request: Request<pb::GetServiceHealthRequest>,
    ) -> Result<Response<pb::GetServiceHealthResponse>, Status> {
        let caller = caller(&request)?;
        self.context.current().await?;
        let service = request.into_inner().service;
        names::validate_name("service", &service).map_err(field_error)?;
        self.context
            .authorize(&caller, &[Target::Service(service.clone())])?;
        let known = self
            .context
            .node
            .read(|state| state.services.contains_key(&service));
        if !known {
            let error =
                self.context
                    .node
                    .read(|state| crate::errors::CoordinatorError::UnknownService {
                        service: service.clone(),
                        known: crate::errors::known_list(state.services.keys().cloned()),
                    });
            return Err(to_status(error));
        }
        let current = self.context.service_health(&service);
        let latest = self.context.health.latest_all();
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
    async fn decide_for(
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
        self.context
            .propose(&identity, &request.request_id, kind)
            .await?;
        info!(
            identity,
            rollback_id = rollback_id(number),
            action,
            name,
            "Rollback decision recorded."
        );
        Ok(Response::new(pb::GetRollbackResponse {
            rollback: Some(self.context.rollback(number)?),
        }))
    }

    async fn decide_request(
        &self,
        request: Request<pb::RequestDecision>,
        decision: RequestDecision,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let caller = caller(&request)?;
        let decided =
            super::requests::decide(&self.context, &caller, decision, request.into_inner()).await?;
        info!(
            identity = caller.id(),
            request_id = decided.request_id,
            status = decided.status,
            "Request {}.",
            match decision {
                RequestDecision::Approve => "approved",
                RequestDecision::Deny => "denied",
                RequestDecision::Review => "reviewed",
            }
        );
        Ok(Response::new(decided))
    }

    /// The rollback a read names, once the caller may see it.
    async fn visible_rollback(
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
    async fn authorize_rollback(
        &self,
        caller: &crate::access::Caller,
        number: u64,
    ) -> Result<(), Status> {
        self.context.current().await?;
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

    async fn members(&self) -> pb::ListMembersResponse {
        super::cluster::list(&self.context).await
    }

    async fn control(
        &self,
        request: Request<pb::RollbackActionRequest>,
        action: RollbackAction,
    ) -> Result<Response<pb::GetRollbackResponse>, Status> {
        let caller = caller(&request)?;
        let identity = caller.id();
        let request = request.into_inner();
        let number = parse_id("rollback_id", "rb", &request.rollback_id)?;
        validate_reason(&request.reason)?;
        let reason = if request.reason.is_empty() {
            format!("{} requested by {identity}", action.name())
        } else {
            request.reason
        };
        self.authorize_rollback(&caller, number).await?;
        let kind = CommandKind::ControlRollback {
            rollback: number,
            action,
            reason,
        };
        self.context
            .propose(&identity, &request.request_id, kind)
            .await?;
        info!(
            identity,
            rollback_id = rollback_id(number),
            action = action.name(),
            "Rollback controlled."
        );
        Ok(Response::new(pb::GetRollbackResponse {
            rollback: Some(self.context.rollback(number)?),
        }))
    }
}

/// Most schema transactions one list answers (newest first).
const MAX_LISTED_SCHEMA_TXNS: usize = 200;

/// How long an agent has to describe its host (it may hash a release tree).
const INSPECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
