//! The gRPC edge: `AgentService` and `ControlService` over mutual TLS.
//!
//! This is the only module that knows `tonic::Status`; errors are mapped in [`status`].

mod agent;
mod cluster;
pub mod control;
pub mod convert;
pub mod gate;
mod join;
pub mod listener;
mod member;
pub(crate) mod plans;
mod policy;
pub mod probes;
pub mod raft;
mod requests;
pub mod status;
mod targets;
mod upgrade;
mod validate;

use std::sync::Arc;

use rewind_proto::MAX_MESSAGE_BYTES;
use rewind_proto::v1::agent_service_server::AgentServiceServer;
use rewind_proto::v1::control_service_server::ControlServiceServer;
use rewind_proto::v1::member_service_server::MemberServiceServer;
use rewind_proto::v1::raft_service_server::RaftServiceServer;
use rewind_shared::tls::TlsFiles;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::Status;
use tracing::{info, warn};

use crate::access::{Caller, Target};
use crate::errors::CoordinatorError;
use crate::health::HealthBook;
use crate::membership::Directory;
use crate::node::NodeHandle;
use crate::node::raft::RaftStatus;
use crate::sessions::Sessions;
use crate::state_machine::{Command, CommandKind, HealthAggregate, Outcome, RollbackRecord};

/// Whether a command may start a change or a rollback (an approval may, a trigger may).
pub(crate) fn starts_an_operation(kind: &CommandKind) -> bool {
    matches!(
        kind,
        CommandKind::StartChange(_)
            | CommandKind::StartRollback(_)
            | CommandKind::DecideRequest(_)
            | CommandKind::AutoTrigger(_)
    )
}

/// The change or rollback a command's outcome names as started, if any (an approval's
/// decision is read from its request: what it started, if it did).
pub(crate) fn operation_started(
    state: &crate::state_machine::State,
    outcome: &Outcome,
) -> Option<String> {
    match outcome {
        Outcome::Change(number) => Some(crate::state_machine::change_id(*number)),
        Outcome::Rollback(number) => Some(crate::state_machine::rollback_id(*number)),
        Outcome::Triggered { rollback, .. } if *rollback != 0 => {
            Some(crate::state_machine::rollback_id(*rollback))
        }
        Outcome::Request(number) => {
            let request = state.approval_requests.get(number)?;
            if request.rollback != 0 {
                Some(crate::state_machine::rollback_id(request.rollback))
            } else if request.change != 0 {
                Some(crate::state_machine::change_id(request.change))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// A change or rollback runs long after the call or request that started it, in a trace of
/// its own (`rewind_shared::trace::of_step`): this line, in the call's span, ties the caller's
/// trace to it. Worded to stay true when a retried request is answered again.
pub(crate) fn log_operation_trace(node: &crate::node::NodeHandle, outcome: &Outcome) {
    let Some(operation) = node.read(|state| operation_started(state, outcome)) else {
        return;
    };
    let trace = rewind_shared::trace::TraceParent::of_operation(node.cluster_id(), &operation);
    info!(
        operation,
        operation_trace_id = %trace.trace_id_hex(),
        "{operation} runs in trace {}.",
        trace.trace_id_hex()
    );
}

/// What every handler needs. Cheap to clone.
#[derive(Clone)]
pub struct Context {
    pub node: NodeHandle,
    /// This member's Raft status: only the leader serves agents and people.
    pub status: watch::Receiver<RaftStatus>,
    /// The cluster's members, to point callers at the leader and list them.
    pub directory: Directory,
    pub cluster_id: String,
    /// This member's certificate, to ask other members about themselves.
    pub tls: TlsFiles,
    pub health: Arc<HealthBook>,
    pub sessions: Arc<Sessions>,
    pub default_max_parallel: u32,
    /// How often agents are asked to report.
    pub health_interval_ms: u64,
    /// Window over which service health is aggregated.
    pub health_window_ms: u64,
    /// Audits refusals; its checks ran before the handler.
    pub gate: gate::Gate,
    /// This member's secret for the keys of environment-file digests (random at start).
    pub env_key_secret: Arc<[u8; 32]>,
    /// The issuing CA joins and renewals are signed with; `None`: this member signs none.
    pub issuer: Option<crate::config::IssuerConfig>,
}

impl Context {
    /// Allows the caller's action on every target, or refuses (audited), naming the first
    /// target no binding allows.
    fn authorize(&self, caller: &Caller, targets: &[Target]) -> Result<(), Status> {
        caller
            .authorize_all(targets)
            .map_err(|refusal| self.gate.refuse(refusal))
    }

    /// The key an agent digests environment files with for `identity`'s inspection: derived
    /// from this member's secret, so no caller can test guesses of a file's contents; the same
    /// token gives the same key, so one caller's two inspections compare. An empty token gets a
    /// key of its own.
    fn env_key(&self, identity: &str, compare_token: &[u8]) -> Vec<u8> {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(self.env_key_secret.as_slice())
            .expect("HMAC takes a key of any length");
        mac.update(identity.as_bytes());
        mac.update(&[0]);
        if compare_token.is_empty() {
            mac.update(&rand::random::<[u8; 16]>());
        } else {
            mac.update(compare_token);
        }
        mac.finalize().into_bytes().to_vec()
    }

    /// Like [`Self::authorize`] for something named by id: no targets means it does not exist
    /// (answered with `missing`), never that nothing needs allowing.
    fn authorize_found(
        &self,
        caller: &Caller,
        targets: &[Target],
        missing: impl FnOnce() -> Status,
    ) -> Result<(), Status> {
        if targets.is_empty() {
            return Err(missing());
        }
        self.authorize(caller, targets)
    }

    /// Stamps and proposes a command on behalf of `identity`.
    async fn propose(
        &self,
        identity: &str,
        request_id: &str,
        kind: CommandKind,
    ) -> Result<Outcome, Status> {
        rewind_shared::names::validate_request_id(request_id)
            .map_err(|error| status::to_status(error.into()))?;
        let action = kind.action();
        let starts_one = starts_an_operation(&kind);
        let command = Command {
            at_ms: rewind_shared::time::now_ms(),
            identity: identity.to_string(),
            request_id: request_id.to_string(),
            audit_seed: String::new(),
            kind,
        };
        let outcome = self.node.propose(command).await.map_err(|error| {
            if error.is_failure() {
                warn!(%error, action, identity, "Command failed, not refused.");
            }
            self.refusal(error)
        })?;
        if starts_one {
            log_operation_trace(&self.node, &outcome);
        }
        Ok(outcome)
    }

    /// The skeleton of every write: proposes `kind` for `identity`, then answers from the state
    /// it left (`read` gets the command's outcome too), on this member, right after it applied.
    async fn propose_and_read<R>(
        &self,
        identity: &str,
        request_id: &str,
        kind: CommandKind,
        read: impl FnOnce(&crate::state_machine::State, &Outcome) -> R,
    ) -> Result<R, Status> {
        let outcome = self.propose(identity, request_id, kind).await?;
        Ok(self.node.read(|state| read(state, &outcome)))
    }

    /// The status for a refused proposal or read: a redirect to the leader, or the error.
    fn refusal(&self, error: CoordinatorError) -> Status {
        match error {
            CoordinatorError::NotLeader { leader_id } => not_leader(leader_id, &self.directory),
            other => status::to_status(other),
        }
    }

    /// A read barrier: after it, this member's state holds every write committed before the
    /// call (ReadIndex), or the call is refused because another member leads.
    async fn current(&self) -> Result<(), Status> {
        self.node
            .read_barrier()
            .await
            .map(|_| ())
            .map_err(|error| self.refusal(error))
    }

    /// The service's health now, over every registered host that runs it.
    fn service_health(&self, service: &str) -> HealthAggregate {
        self.health_since(service, |_| 0)
    }

    /// The health a new change of `service` is judged against: the service's health over the
    /// window, counting only what was reported since its last change or rollback ended. Reports
    /// from before that describe another version (or none yet, on a new host) and would make a
    /// broken release look no worse than "before"; with no report since, there is no baseline
    /// and the policy's absolute limits alone apply.
    fn change_baseline(&self, service: &str) -> HealthAggregate {
        self.health_since(service, |state| {
            let deployed = state
                .changes
                .values()
                .filter(|change| change.service == service)
                .map(|change| change.deployed_at_ms);
            let reverted = state
                .rollbacks
                .values()
                .filter(|rollback| rollback.services.iter().any(|name| name == service))
                .map(|rollback| rollback.finished_at_ms);
            deployed.chain(reverted).max().map_or(0, |last| last + 1)
        })
    }

    /// The service's health over the window on every host that runs it, from no earlier than
    /// what `not_before_ms` reads off the state.
    #[track_caller]
    fn health_since(
        &self,
        service: &str,
        not_before_ms: impl FnOnce(&crate::state_machine::State) -> u64,
    ) -> HealthAggregate {
        let (hosts, not_before_ms) = self.node.read(|state| {
            let hosts: Vec<String> = state
                .hosts
                .values()
                .filter(|host| host.services.iter().any(|name| name == service))
                .map(|host| host.host_id.clone())
                .collect();
            (hosts, not_before_ms(state))
        });
        let since = rewind_shared::time::now_ms()
            .saturating_sub(self.health_window_ms)
            .max(not_before_ms);
        self.health.aggregate(service, &hosts, since)
    }
}

/// `UNAVAILABLE` naming the leader, with its address in the `rewind-leader` metadata so clients
/// can follow it.
fn not_leader(leader_id: u64, directory: &Directory) -> Status {
    let leader = (leader_id != 0).then(|| directory.get(leader_id)).flatten();
    let address = leader.as_ref().map(|member| &member.address);
    let message = match address {
        Some(address) => {
            format!("this member is not the leader; the leader is member {leader_id} at {address}")
        }
        None => {
            "this member is not the leader and no leader is known yet; retry shortly".to_string()
        }
    };
    let mut status = Status::unavailable(message);
    if let Some(value) = address.and_then(|address| address.parse().ok()) {
        status.metadata_mut().insert(LEADER_KEY, value);
    }
    status
}

/// Most concurrent streams (calls) one connection may have open on the gRPC port.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// Metadata key carrying the leader's address on `UNAVAILABLE`.
pub use rewind_shared::LEADER_METADATA_KEY as LEADER_KEY;

/// Where a member listens: the gRPC port (mutual TLS), and the plaintext health probe port if
/// `health.probe-listen` asks for one.
pub struct Listeners {
    pub grpc: TcpListener,
    pub probes: Option<TcpListener>,
}

/// Serves the agent, control and Raft services, and the standard health and reflection ones
/// ([`probes`]), on the gRPC listener with mutual TLS (and health alone on the probe port)
/// until `shutdown`.
pub async fn serve(
    listeners: Listeners,
    tls: &TlsFiles,
    context: Context,
    raft_peers: raft::RaftPeers,
    budget: crate::admission::ConnectionBudget,
    stats: crate::admission::ConnectionStats,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    let Listeners {
        grpc: listener,
        probes: probe_listener,
    } = listeners;
    let tls_config = listener::server_config(tls)?;
    let gate = gate::GateLayer {
        gate: context.gate.clone(),
    };
    let control = ControlServiceServer::new(control::Control {
        context: context.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Join is the one call anyone may make: its message is a token and a CSR, bounded here
    // before it is decoded whole.
    let joins = rewind_proto::v1::join_service_server::JoinServiceServer::new(join::Joins {
        context: context.clone(),
    })
    .max_decoding_message_size(rewind_shared::pki::MAX_CSR_BYTES + 1024);
    let member = MemberServiceServer::new(member::Member {
        context: context.clone(),
    });
    let status = context.status.clone();
    let agents = AgentServiceServer::new(agent::Agents { context })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let raft = RaftServiceServer::new(raft_peers)
        .max_decoding_message_size(rewind_proto::MAX_RAFT_BATCH_BYTES);
    let reporter = tonic_health::server::HealthReporter::new();
    let health_server = || {
        tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        )
    };
    let health = health_server().max_decoding_message_size(probes::MAX_HEALTH_REQUEST_BYTES);
    let (stopping, stopped) = watch::channel(false);
    // The statuses are set before any probe can ask.
    let follower = probes::HealthFollower::start(reporter.clone(), status).await;
    // Plaintext health checks for Kubernetes' probes, if asked for; the same statuses.
    if let Some(listener) = probe_listener {
        let mut stopped = stopped.clone();
        let served = probes::serve_probe_port(listener, health_server(), async move {
            let _ = stopped.wait_for(|stopped| *stopped).await;
        });
        tokio::spawn(async move {
            if let Err(error) = served.await {
                warn!(%error, "The plaintext health probe port stopped.");
            }
        });
    }
    let mut follower_stop = stopped.clone();
    let following = tokio::spawn(follower.follow(async move {
        let _ = follower_stop.wait_for(|stopped| *stopped).await;
    }));
    let reflection = || {
        probes::DESCRIPTOR_SETS.iter().fold(
            tonic_reflection::server::Builder::configure().include_reflection_service(false),
            |builder, set| builder.register_encoded_file_descriptor_set(set),
        )
    };
    let reflection_error =
        |error| CoordinatorError::Internal(format!("the reflection service: {error}"));
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(reflection_error)?
        .max_decoding_message_size(probes::MAX_REFLECTION_REQUEST_BYTES);
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(reflection_error)?
        .max_decoding_message_size(probes::MAX_REFLECTION_REQUEST_BYTES);
    // The health statuses turn NOT_SERVING and are cleared as shutdown begins, so open Watch
    // streams end and do not hold up the graceful shutdown.
    let shutdown = async move {
        shutdown.await;
        let _ = stopping.send(true);
        let _ = following.await;
    };
    tonic::transport::Server::builder()
        // A peer that stops answering is noticed and its connection closed.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        // Advertised to every client: an agent holds one stream and makes a few calls, a
        // person's command a few; more than this at once is a client misbehaving.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // Every call passes the gate first: its method's permission, the caller's kind and
        // policy, and the leader for agents and people.
        .layer(gate)
        .add_service(control)
        .add_service(agents)
        .add_service(raft)
        .add_service(member)
        .add_service(joins)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            listener::incoming(listener, tls_config, budget, stats),
            shutdown,
        )
        .await
        .map_err(|error| CoordinatorError::Internal(format!("serve: {error}")))
}

/// Rollback `number` as the API shows it, or `NOT_FOUND` naming the known ones.
fn rollback_in(
    state: &crate::state_machine::State,
    number: u64,
) -> Result<rewind_proto::v1::Rollback, Status> {
    state
        .rollbacks
        .get(&number)
        .map(|record: &RollbackRecord| convert::rollback(state, record))
        .ok_or_else(|| status::to_status(crate::state_machine::unknown_rollback(state, number)))
}
