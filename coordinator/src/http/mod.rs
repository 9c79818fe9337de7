//! The HTTP edge, beside gRPC: Prometheus `/metrics`, the Alertmanager webhook receiver and a
//! signed generic webhook for other monitors. Plain HTTP: bind it to loopback or a private
//! network, or put TLS in front; the receivers authenticate every request themselves.

mod hooks;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::sync::watch;
use tracing::info;

use crate::engine::EngineLimits;
use crate::node::NodeHandle;
use crate::node::raft::RaftStatus;
use crate::sessions::Sessions;

pub use hooks::{AlertmanagerPayload, WebhookRequest};

/// Largest request body accepted: Alertmanager groups alerts, but 1 MiB is plenty.
const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Clone)]
pub struct HttpState {
    pub node: NodeHandle,
    pub status: watch::Receiver<RaftStatus>,
    pub sessions: Arc<Sessions>,
    /// Plan options and throttles for the automatic rollbacks the receivers ask for.
    pub limits: EngineLimits,
    /// Bearer token Alertmanager must send; None: the receiver is off.
    pub alertmanager_token: Option<Arc<Vec<u8>>>,
    /// HMAC secret generic webhooks are signed with; None: the receiver is off.
    pub webhook_secret: Option<Arc<Vec<u8>>>,
    /// Snapshots this member sent and received.
    pub snapshots: Arc<crate::node::transport::SnapshotStats>,
    /// Audits refused webhooks like refused calls (rate-limited per identity).
    pub gate: crate::api::gate::Gate,
    /// The automation identities the receivers act as (names of `automation:<name>`).
    pub alertmanager_identity: Arc<str>,
    pub webhook_identity: Arc<str>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics::serve))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/alertmanager", post(hooks::alertmanager))
        .route("/v1/webhook", post(hooks::webhook))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let address: Option<SocketAddr> = listener.local_addr().ok();
    info!(address = ?address, "HTTP listening (/metrics, /v1/alertmanager, /v1/webhook).");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
