//! The web view: read-only pages of changes and rollbacks for people, live while a rollback
//! moves (server-sent events), on the HTTP side.
//!
//! A person signs in with a viewer token (`http.viewer-tokens-file`), bound to an identity the
//! access policy judges as `user:<name>` with its groups, exactly as it judges that person's
//! certificate: every page is made from ControlService's own read handlers (GetRollback,
//! ExplainRollback, ListRollbacks, GetChange, ListChanges), each call admitted by the gate
//! first, refusals audited alike. The view changes nothing. Pages are rendered on the server
//! (maud escapes every value); a small hand-written script (`view.js`) swaps in the live part
//! of a rollback's page as the server sends it again.

mod pages;
mod viewers;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use maud::Markup;
use rewind_proto::v1::{self as pb, control_service_server::ControlService};
use tokio::sync::{Semaphore, watch};
use tokio_stream::StreamExt as _;
use tonic::Status;

use super::HttpState;
use crate::access::Principal;
use crate::api::control::Control;

pub use viewers::Viewers;

/// The cookie a signed-in browser sends its viewer token in.
pub const VIEWER_COOKIE: &str = "rewind_viewer";
/// Most live views (server-sent event streams) open at once on one member: they hold HTTP
/// connections, and Prometheus and Alertmanager need some left.
pub const MAX_LIVE_VIEWS: usize = 64;
/// Longest one live view streams before it is ended; the browser's `EventSource` connects
/// again by itself, so a tab left open holds no connection for days without being judged again.
pub const MAX_LIVE_VIEW: Duration = Duration::from_secs(30 * 60);
/// How long a sign-in lasts in the browser.
const SIGN_IN_LASTS_S: u64 = 12 * 3600;
/// The most often a live view renders its rollback again (as `WatchRollback` reads it).
const LIVE_UPDATE_EVERY: Duration = Duration::from_millis(250);
/// A comment sent on an idle live view, so proxies keep the connection.
const LIVE_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Most rollbacks and changes the overview lists.
const OVERVIEW_ROWS: u32 = 25;

/// What the web view needs besides the HTTP side's state.
#[derive(Clone)]
pub struct WebView {
    pub viewers: Arc<Viewers>,
    /// The gRPC API's handlers, called in-process with the viewer as the caller.
    pub control: Arc<Control>,
    /// Live views left (of [`MAX_LIVE_VIEWS`]).
    pub live_views: Arc<Semaphore>,
    /// This member's latest verification of its audit chain.
    pub audit_check: Arc<crate::audit_check::AuditCheck>,
    /// Becomes true as the member stops: live views end so the HTTP server can.
    pub stopping: watch::Receiver<bool>,
}

impl WebView {
    pub fn new(
        viewers: Arc<Viewers>,
        control: Control,
        audit_check: Arc<crate::audit_check::AuditCheck>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            viewers,
            control: Arc::new(control),
            live_views: Arc::new(Semaphore::new(MAX_LIVE_VIEWS)),
            audit_check,
            stopping,
        }
    }

    /// Calls a ControlService read as `viewer`: admitted by the gate as a call of `method`
    /// would be, then answered by the API's own handler.
    async fn call<Q, R, Answer>(
        &self,
        viewer: &Principal,
        method: &str,
        message: Q,
        handler: impl FnOnce(Arc<Control>, tonic::Request<Q>) -> Answer,
    ) -> Result<R, Status>
    where
        Answer: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let path = format!("/rewind.v1.ControlService/{method}");
        let caller = self
            .control
            .context
            .gate
            .admit_principal(&path, viewer.clone())?;
        let mut request = tonic::Request::new(message);
        request.extensions_mut().insert(caller);
        Ok(handler(Arc::clone(&self.control), request)
            .await?
            .into_inner())
    }

    /// The rollback's page's live part, and whether the rollback has ended.
    async fn rollback_live(
        &self,
        viewer: &Principal,
        rollback_id: &str,
    ) -> Result<(Markup, bool), Status> {
        let asked = pb::GetRollbackRequest {
            rollback_id: rollback_id.to_string(),
            ..Default::default()
        };
        let explained = self
            .call(
                viewer,
                "ExplainRollback",
                asked.clone(),
                |control, request| async move { control.explain_rollback(request).await },
            )
            .await?;
        let rollback = explained
            .rollback
            .clone()
            .ok_or_else(|| Status::not_found(format!("no rollback {rollback_id}")))?;
        let ended =
            pb::RollbackState::try_from(rollback.state).is_ok_and(|state| state.is_terminal());
        let audit = self.audit_status(viewer);
        let trace = rewind_shared::trace::TraceParent::of_operation(
            self.control.context.node.cluster_id(),
            &rollback.rollback_id,
        );
        Ok((
            pages::rollback_live(&rollback, &explained, audit.as_ref(), &trace.trace_id_hex()),
            ended,
        ))
    }

    /// This member's latest verification of its audit chain, for a viewer allowed to verify it.
    fn audit_status(&self, viewer: &Principal) -> Option<pages::AuditStatus> {
        let gate = &self.control.context.gate;
        if !gate.allows("/rewind.v1.ControlService/VerifyAudit", viewer.clone()) {
            return None;
        }
        Some(pages::AuditStatus::of(&self.audit_check))
    }
}

/// The web view's routes, under `/ui`.
pub fn routes() -> axum::Router<HttpState> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/ui", get(overview))
        .route("/ui/", get(|| async { Redirect::to("/ui") }))
        .route("/ui/sign-in", get(sign_in_form).post(sign_in))
        .route("/ui/sign-out", post(sign_out))
        .route("/ui/rollbacks/{id}", get(rollback_page))
        .route("/ui/rollbacks/{id}/live", get(rollback_live_stream))
        .route("/ui/changes/{id}", get(change_page))
        .route("/ui/static/view.js", get(script))
        .route("/ui/static/view.css", get(style))
        .layer(axum::middleware::map_response(secure_headers))
}

/// Every answer of the web view: no caching, no framing, no scripts or styles but its own.
async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let fixed = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Why a page is not shown, as the page that says so.
struct Problem {
    status: StatusCode,
    message: String,
}

impl Problem {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn off() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "The web view is off on this member: it needs http.viewer-tokens-file.",
        )
    }
}

impl From<Status> for Problem {
    fn from(status: Status) -> Self {
        let code = match status.code() {
            tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
            tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
            // Not the leader (the message names it), or no quorum.
            tonic::Code::Unavailable | tonic::Code::FailedPrecondition => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(code, status.message())
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        (self.status, pages::problem(self.status, &self.message)).into_response()
    }
}

/// Why a page is not shown to a request that names no viewer.
enum NotSignedIn {
    /// The web view is off on this member.
    Off,
    /// No token, or one that is no viewer's: to the sign-in page.
    SignIn,
}

impl IntoResponse for NotSignedIn {
    fn into_response(self) -> Response {
        match self {
            Self::Off => Problem::off().into_response(),
            Self::SignIn => Redirect::to("/ui/sign-in").into_response(),
        }
    }
}

/// The web view and the viewer the request's cookie (or `Authorization: Bearer`) names.
fn signed_in(state: &HttpState, headers: &HeaderMap) -> Result<(WebView, Principal), NotSignedIn> {
    let view = state.view.clone().ok_or(NotSignedIn::Off)?;
    match viewers::presented_token(headers).and_then(|token| view.viewers.find(token)) {
        Some(viewer) => Ok((view, viewer)),
        None => Err(NotSignedIn::SignIn),
    }
}

async fn overview(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    let (view, viewer) = match signed_in(&state, &headers) {
        Ok(signed_in) => signed_in,
        Err(not_signed_in) => return not_signed_in.into_response(),
    };
    let rollbacks = view
        .call(
            &viewer,
            "ListRollbacks",
            pb::ListRollbacksRequest {
                page_size: OVERVIEW_ROWS,
                ..Default::default()
            },
            |control, request| async move { control.list_rollbacks(request).await },
        )
        .await;
    let changes = view
        .call(
            &viewer,
            "ListChanges",
            pb::ListChangesRequest {
                page_size: OVERVIEW_ROWS,
                ..Default::default()
            },
            |control, request| async move { control.list_changes(request).await },
        )
        .await;
    match (rollbacks, changes) {
        (Ok(rollbacks), Ok(changes)) => pages::overview(
            &viewer,
            &rollbacks.rollbacks,
            &changes.changes,
            view.audit_status(&viewer).as_ref(),
        )
        .into_response(),
        (Err(status), _) | (_, Err(status)) => Problem::from(status).into_response(),
    }
}

async fn rollback_page(
    State(state): State<HttpState>,
    Path(rollback_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (view, viewer) = match signed_in(&state, &headers) {
        Ok(signed_in) => signed_in,
        Err(not_signed_in) => return not_signed_in.into_response(),
    };
    match view.rollback_live(&viewer, &rollback_id).await {
        Ok((live, ended)) => pages::rollback(&viewer, &rollback_id, live, ended).into_response(),
        Err(status) => Problem::from(status).into_response(),
    }
}

async fn change_page(
    State(state): State<HttpState>,
    Path(change_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (view, viewer) = match signed_in(&state, &headers) {
        Ok(signed_in) => signed_in,
        Err(not_signed_in) => return not_signed_in.into_response(),
    };
    let asked = pb::GetChangeRequest {
        change_id: change_id.clone(),
    };
    let answer = view
        .call(&viewer, "GetChange", asked, |control, request| async move {
            control.get_change(request).await
        })
        .await
        .and_then(|answer| {
            answer
                .change
                .ok_or_else(|| Status::not_found(format!("no change {change_id}")))
        });
    match answer {
        Ok(change) => pages::change(&viewer, &change).into_response(),
        Err(status) => Problem::from(status).into_response(),
    }
}

/// The live part of a rollback's page, sent again (event `live`) each time it changes, until
/// the rollback ends (event `end`), the viewer may no longer see it (event `problem`), the
/// member stops, or [`MAX_LIVE_VIEW`] passes.
async fn rollback_live_stream(
    State(state): State<HttpState>,
    Path(rollback_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(view) = state.view.clone() else {
        return Problem::off().into_response();
    };
    let Some(viewer) =
        viewers::presented_token(&headers).and_then(|token| view.viewers.find(token))
    else {
        return Problem::new(StatusCode::UNAUTHORIZED, "Sign in first.").into_response();
    };
    let Ok(slot) = Arc::clone(&view.live_views).try_acquire_owned() else {
        return Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_LIVE_VIEWS} live views are open on this member already: reload later."),
        )
        .into_response();
    };
    // Refused before any event: the page says why with the right status.
    let first = match view.rollback_live(&viewer, &rollback_id).await {
        Ok(first) => first,
        Err(status) => return Problem::from(status).into_response(),
    };
    let (events, receiver) = tokio::sync::mpsc::channel::<Event>(4);
    tokio::spawn(async move {
        let _slot = slot;
        let deadline = tokio::time::sleep(MAX_LIVE_VIEW);
        tokio::pin!(deadline);
        let mut applied = view.control.context.node.subscribe();
        let mut stopping = view.stopping.clone();
        let (mut markup, mut ended) = first;
        let mut sent = String::new();
        loop {
            let html = markup.into_string();
            if html != sent {
                if events
                    .send(Event::default().event("live").data(&html))
                    .await
                    .is_err()
                {
                    return;
                }
                sent = html;
            }
            if ended {
                let _ = events
                    .send(Event::default().event("end").data("ended"))
                    .await;
                return;
            }
            tokio::select! {
                changed = applied.changed() => if changed.is_err() { return },
                _ = stopping.changed() => return,
                _ = &mut deadline => return,
                _ = events.closed() => return,
            }
            // Changes in a burst are one update.
            tokio::select! {
                _ = tokio::time::sleep(LIVE_UPDATE_EVERY) => {}
                _ = events.closed() => return,
            }
            (markup, ended) = match view.rollback_live(&viewer, &rollback_id).await {
                Ok(live) => live,
                Err(status) => {
                    let said = Event::default().event("problem").data(status.message());
                    let _ = events.send(said).await;
                    return;
                }
            };
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(receiver)
        .map(Ok::<_, std::convert::Infallible>);
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(LIVE_KEEP_ALIVE))
        .into_response()
}

async fn sign_in_form(State(state): State<HttpState>) -> Response {
    if state.view.is_none() {
        return Problem::off().into_response();
    }
    pages::sign_in(None).into_response()
}

#[derive(serde::Deserialize)]
struct SignIn {
    token: String,
}

/// Checks the token against the viewers file and keeps it in an HttpOnly, SameSite=Strict
/// cookie for `/ui` (an `EventSource` cannot send a header).
async fn sign_in(State(state): State<HttpState>, Form(form): Form<SignIn>) -> Response {
    let Some(view) = state.view.clone() else {
        return Problem::off().into_response();
    };
    if let Err(problem) = viewers::check_token_text(&form.token) {
        return (StatusCode::UNAUTHORIZED, pages::sign_in(Some(&problem))).into_response();
    }
    let Some(viewer) = view.viewers.find(&form.token) else {
        tracing::warn!("Refused a web view sign-in: the token is no viewer's.");
        return (
            StatusCode::UNAUTHORIZED,
            pages::sign_in(Some("That token is not one of this cluster's viewers.")),
        )
            .into_response();
    };
    tracing::info!(viewer = %viewer.id(), "Signed in to the web view.");
    let cookie = format!(
        "{VIEWER_COOKIE}={}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={SIGN_IN_LASTS_S}",
        form.token
    );
    let mut response = Redirect::to("/ui").into_response();
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

async fn sign_out() -> Response {
    let mut response = Redirect::to("/ui/sign-in").into_response();
    let cookie = format!("{VIEWER_COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0");
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("view.js"),
    )
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("view.css"),
    )
}
