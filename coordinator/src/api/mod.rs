//! The gRPC edge: `AgentService` and `ControlService` over mutual TLS.
//!
//! This is the only module that knows `tonic::Status`; errors are mapped in [`status`].

mod agent;
mod control;
pub mod convert;
pub mod status;

use std::sync::Arc;

use rewind_proto::MAX_MESSAGE_BYTES;
use rewind_proto::v1::agent_service_server::AgentServiceServer;
use rewind_proto::v1::control_service_server::ControlServiceServer;
use rewind_shared::tls::TlsFiles;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Status};
use tracing::warn;

use crate::errors::CoordinatorError;
use crate::health::HealthBook;
use crate::node::NodeHandle;
use crate::sessions::Sessions;
use crate::state_machine::{Command, CommandKind, HealthAggregate, Outcome, RollbackRecord};

/// What every handler needs. Cheap to clone.
#[derive(Clone)]
pub struct Context {
    pub node: NodeHandle,
    pub health: Arc<HealthBook>,
    pub sessions: Arc<Sessions>,
    pub default_max_parallel: u32,
    /// How often agents are asked to report.
    pub health_interval_ms: u64,
    /// Window over which service health is aggregated.
    pub health_window_ms: u64,
}

impl Context {
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
        let command = Command {
            at_ms: rewind_shared::time::now_ms(),
            identity: identity.to_string(),
            request_id: request_id.to_string(),
            kind,
        };
        self.node.propose(command).await.map_err(|error| {
            if matches!(error, CoordinatorError::Storage(_)) {
                warn!(%error, action, identity, "Command failed in storage.");
            }
            status::to_status(error)
        })
    }

    fn rollback(&self, number: u64) -> Result<rewind_proto::v1::Rollback, Status> {
        self.node.read(|state| {
            state
                .rollbacks
                .get(&number)
                .map(|record: &RollbackRecord| convert::rollback(record))
                .ok_or_else(|| {
                    status::to_status(crate::state_machine::unknown_rollback(state, number))
                })
        })
    }

    /// The service's health now, over every registered host that runs it.
    fn service_health(&self, service: &str) -> HealthAggregate {
        let hosts: Vec<String> = self.node.read(|state| {
            state
                .hosts
                .values()
                .filter(|host| host.services.iter().any(|name| name == service))
                .map(|host| host.host_id.clone())
                .collect()
        });
        let since = rewind_shared::time::now_ms().saturating_sub(self.health_window_ms);
        self.health.aggregate(service, &hosts, since)
    }
}

/// The caller's identity: the common name of its client certificate.
fn caller<T>(request: &Request<T>) -> Result<String, Status> {
    let certificates = request.peer_certs().ok_or_else(|| {
        Status::unauthenticated("no client certificate: every call needs mutual TLS")
    })?;
    rewind_shared::tls::identity_of(&certificates)
        .map_err(|error| Status::unauthenticated(error.to_string()))
}

/// Serves both services on `listener` with mutual TLS until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: &TlsFiles,
    context: Context,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    let tls_config = tls
        .server_config()
        .map_err(|error| CoordinatorError::Storage(format!("load TLS files: {error}")))?;
    let control = ControlServiceServer::new(control::Control {
        context: context.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let agents = AgentServiceServer::new(agent::Agents { context })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .tls_config(tls_config)
        .map_err(|error| CoordinatorError::Storage(format!("configure TLS: {error}")))?
        .add_service(control)
        .add_service(agents)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|error| CoordinatorError::Storage(format!("serve: {error}")))
}
