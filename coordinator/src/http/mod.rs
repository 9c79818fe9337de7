//! The HTTP edge, beside gRPC: Prometheus `/metrics`, the Alertmanager webhook receiver, a
//! signed generic webhook for other monitors, and the web view for people (`/ui`, see
//! [`view`]). Plain HTTP: bind it to loopback or a private network, or put TLS in front; the
//! receivers and the web view authenticate every request themselves.

mod hooks;
mod metrics;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::admission::{self, Admission, ConnectionBudget, ConnectionStats, Refusals};

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
    /// Agents' latest reports: an automatic rollback follows the services' drift policy.
    pub health: Arc<crate::health::HealthBook>,
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
    /// Connections refused before they were served, on both ports.
    pub connections: ConnectionStats,
    /// This member's latest verification of its audit chain.
    pub audit_check: Arc<crate::audit_check::AuditCheck>,
    /// The web view of changes and rollbacks; None: off (no `http.viewer-tokens-file`).
    pub view: Option<view::WebView>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics::serve))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/alertmanager", post(hooks::alertmanager))
        .route("/v1/webhook", post(hooks::webhook))
        .merge(view::routes())
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(traced))
        .with_state(state)
}

/// Each request's log lines name its trace (its `traceparent`, or a new trace), as gRPC calls'
/// do: an Alertmanager or a webhook sender that traces finds rewind's side of its request.
async fn traced(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    // Scrapes and liveness checks come every few seconds and log nothing: no span (it would
    // be exported, a new trace each).
    if matches!(request.uri().path(), "/metrics" | "/healthz") {
        return next.run(request).await;
    }
    let trace = rewind_shared::trace::TraceParent::of_request(request.headers());
    let span = tracing::warn_span!(
        "request",
        path = rewind_shared::names::truncate(request.uri().path(), 128),
        trace_id = %trace.trace_id_hex()
    );
    trace.adopt(&span);
    tracing::Instrument::instrument(next.run(request), span).await
}

/// Longest a client may take to send a request's headers, and longest a kept-alive connection
/// may sit idle between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a request may take from its headers to its answer, body read included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves until `shutdown` resolves: at most `budget.http` connections, at most
/// [`admission::HTTP_CONNECTIONS_PER_ADDRESS`] from one address (further ones are closed at
/// once), headers within [`HEADER_READ_TIMEOUT`], each request's answer begun within
/// [`REQUEST_TIMEOUT`] (a live view's event stream then goes on, bounded by its own limits:
/// [`view::MAX_LIVE_VIEW`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    budget: ConnectionBudget,
    stats: ConnectionStats,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let address: Option<SocketAddr> = listener.local_addr().ok();
    info!(address = ?address, "HTTP listening (/metrics, /v1/alertmanager, /v1/webhook, /ui).");
    let router = router(state).layer(tower_http::timeout::TimeoutLayer::with_status_code(
        http::StatusCode::REQUEST_TIMEOUT,
        REQUEST_TIMEOUT,
    ));
    let service = hyper_util::service::TowerToHyperService::new(router);
    let connections = Admission::new(budget.http, admission::HTTP_CONNECTIONS_PER_ADDRESS);
    let refusals = Refusals::new("http", stats);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: wait rather than spin.
                    warn!(%error, "Cannot accept an HTTP connection.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let admitted = match connections.try_admit(remote.ip()) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                refusals.refuse(refusal, remote.ip(), "too many HTTP connections");
                continue;
            }
        };
        let connection = graceful
            .watch(builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), service.clone()));
        tokio::spawn(async move {
            // Timeouts and clients that go away end here; neither is worth a line.
            let _ = connection.await;
            drop(admitted);
        });
    }
    // Requests in flight finish; idle connections close at once.
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(REQUEST_TIMEOUT) => {}
    }
    Ok(())
}
