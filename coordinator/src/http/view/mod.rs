//! The web view: read-only pages of changes and rollbacks for people, live while a rollback
//! moves (server-sent events), on the HTTP side.
//!
//! A person signs in with a viewer token (`http.viewer-tokens-file`), bound to an identity the
//! access policy judges as `user:<name>` with its groups (the browser then holds a session
//! this member signed, not the token), exactly as it judges that person's
//! certificate: every page is made from ControlService's own read handlers (GetRollback,
//! ExplainRollback, ListRollbacks, GetChange, ListChanges), each call admitted by the gate
//! first, refusals audited alike. The view changes nothing. Pages are rendered on the server
//! (maud escapes every value); a small hand-written script (`view.js`) swaps in the live part
//! of a rollback's page as the server sends it again.

mod pages;
mod viewers;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Form, Path, Query, State};
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

pub use viewers::{Sessions, Viewers};

/// The cookie a signed-in browser sends its session in (see [`Sessions`]).
pub const VIEWER_COOKIE: &str = "rewind_viewer";
/// Most live views (server-sent event streams) open at once on one member, and at most half
/// the HTTP port's connections: they hold connections, and Prometheus and Alertmanager need
/// some left.
pub const MAX_LIVE_VIEWS: usize = 64;
/// Most live views one viewer holds at once: one person (or one script) cannot take them all.
pub const MAX_LIVE_VIEWS_PER_VIEWER: usize = 8;
/// How often an idle live view checks its session or token again (it does at every update
/// too): a viewer signed out stops seeing it.
const LIVE_CREDENTIAL_CHECK_EVERY: Duration = Duration::from_secs(60);
/// Longest one live view streams before it is ended; the browser's `EventSource` connects
/// again by itself, so a tab left open holds no connection for days without being judged again.
pub const MAX_LIVE_VIEW: Duration = Duration::from_secs(30 * 60);
/// At most one line about refused sign-ins and bearer tokens this often (with how many).
const SIGN_IN_REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(10);
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
    /// Sessions this member signed at sign-in.
    pub sessions: Arc<Sessions>,
    /// The gRPC API's handlers, called in-process with the viewer as the caller.
    pub control: Arc<Control>,
    /// Live views left (of [`MAX_LIVE_VIEWS`]).
    pub live_views: Arc<Semaphore>,
    /// This member's latest verification of its audit chain.
    pub audit_check: Arc<crate::audit_check::AuditCheck>,
    /// Becomes true as the member stops: live views end so the HTTP server can.
    pub stopping: watch::Receiver<bool>,
    /// Refused sign-ins and bearer tokens not logged yet.
    refused_sign_ins: Arc<std::sync::Mutex<Refused>>,
    /// Live views open per viewer name (at most [`MAX_LIVE_VIEWS_PER_VIEWER`] each).
    live_views_of: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// Now, in the Unix seconds sessions expire in.
fn now_s() -> u64 {
    rewind_shared::time::now_ms() / 1000
}

/// Refused credentials counted since the last line about them.
#[derive(Default)]
struct Refused {
    pending: u64,
    last_logged: Option<std::time::Instant>,
    flush_planned: bool,
}

impl Refused {
    fn log(&mut self, what: &str) {
        tracing::warn!(
            refused = self.pending,
            latest = what,
            "Refused web view credentials: tokens that are no viewer's."
        );
        self.pending = 0;
        self.last_logged = Some(std::time::Instant::now());
    }
}

/// A viewer's share of the live views, given back when the view ends.
struct LiveViewOf {
    name: String,
    counts: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl Drop for LiveViewOf {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = counts.get_mut(&self.name) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.name);
            }
        }
    }
}

impl WebView {
    /// `http_connections`: the HTTP port's connection budget, half of which live views may
    /// hold at most.
    pub fn new(
        viewers: Arc<Viewers>,
        control: Control,
        audit_check: Arc<crate::audit_check::AuditCheck>,
        http_connections: usize,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        let live_views = MAX_LIVE_VIEWS.min(http_connections / 2).max(1);
        Self {
            viewers,
            sessions: Arc::new(Sessions::default()),
            control: Arc::new(control),
            live_views: Arc::new(Semaphore::new(live_views)),
            audit_check,
            stopping,
            refused_sign_ins: Arc::default(),
            live_views_of: Arc::default(),
        }
    }

    /// One of `viewer`'s [`MAX_LIVE_VIEWS_PER_VIEWER`] live views, if it has one left.
    fn live_view_of(&self, viewer: &Principal) -> Option<LiveViewOf> {
        let mut counts = self
            .live_views_of
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = counts.entry(viewer.name.clone()).or_default();
        if *count >= MAX_LIVE_VIEWS_PER_VIEWER {
            return None;
        }
        *count += 1;
        Some(LiveViewOf {
            name: viewer.name.clone(),
            counts: Arc::clone(&self.live_views_of),
        })
    }

    /// The viewer a request's session cookie or bearer token names.
    fn viewer_of(&self, presented: &viewers::Presented) -> Option<Principal> {
        let viewer = presented.viewer(&self.viewers, &self.sessions, now_s());
        // A session may just have expired; a token that names no one was never good.
        if viewer.is_none() && presented.token.is_some() {
            self.refused("a bearer token");
        }
        viewer
    }

    /// Logs refused sign-ins and bearer tokens: one line per
    /// [`SIGN_IN_REFUSALS_LOGGED_EVERY`] at most, with how many there were, the last ones
    /// logged when that time is up.
    fn refused(&self, what: &'static str) {
        let mut refused = self
            .refused_sign_ins
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        refused.pending += 1;
        let due = refused
            .last_logged
            .is_none_or(|last| last.elapsed() >= SIGN_IN_REFUSALS_LOGGED_EVERY);
        if due {
            refused.log(what);
        } else if !refused.flush_planned {
            refused.flush_planned = true;
            let wait = refused.last_logged.map_or(Duration::ZERO, |last| {
                SIGN_IN_REFUSALS_LOGGED_EVERY.saturating_sub(last.elapsed())
            });
            let later = Arc::clone(&self.refused_sign_ins);
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let mut refused = later
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                refused.flush_planned = false;
                if refused.pending > 0 {
                    refused.log(what);
                }
            });
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
        let explained = match self
            .call(
                viewer,
                "ExplainRollback",
                asked.clone(),
                |control, request| async move { control.explain_rollback(request).await },
            )
            .await
        {
            Ok(explained) => explained,
            // An archived rollback is explained no more; GetRollback still reads it.
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                let kept = self
                    .call(
                        viewer,
                        "GetRollback",
                        asked,
                        |control, request| async move { control.get_rollback(request).await },
                    )
                    .await?;
                // Its own answer above (a rollback out of scope is not found there either);
                // another precondition is answered as it was.
                if kept
                    .rollback
                    .as_ref()
                    .is_none_or(|rollback| rollback.archived_at_ms == 0)
                {
                    return Err(status);
                }
                pb::ExplainRollbackResponse {
                    rollback: kept.rollback,
                    explanation: "Archived: its record is kept, its explanation is not.".into(),
                    next_commands: Vec::new(),
                }
            }
            Err(status) => return Err(status),
        };
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
        // Not no-referrer: with it a browser sends `Origin: null` on the view's own forms.
        (header::REFERRER_POLICY, "same-origin"),
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
            tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
            // Not the leader (the message names it), or no quorum.
            tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
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
    /// No token, or one that is no viewer's: to the sign-in page, then back to this page.
    SignIn(String),
    /// The same, for what a script fetches (a live view): 401.
    Unauthorized,
}

impl IntoResponse for NotSignedIn {
    fn into_response(self) -> Response {
        match self {
            Self::Off => Problem::off().into_response(),
            Self::SignIn(page) => {
                // Only a plain path goes along (nothing to escape in a query string).
                let plain = page
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || b"/-_.".contains(&byte));
                if plain {
                    Redirect::to(&format!("/ui/sign-in?next={page}")).into_response()
                } else {
                    Redirect::to("/ui/sign-in").into_response()
                }
            }
            Self::Unauthorized => {
                let mut response =
                    Problem::new(StatusCode::UNAUTHORIZED, "Sign in first.").into_response();
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"rewind\""),
                );
                response
            }
        }
    }
}

/// The web view and the viewer the request's cookie (or `Authorization: Bearer`) names.
fn signed_in(
    state: &HttpState,
    headers: &HeaderMap,
    page: &str,
) -> Result<(WebView, Principal), NotSignedIn> {
    let view = state.view.clone().ok_or(NotSignedIn::Off)?;
    let presented = viewers::Presented::of(headers);
    match view.viewer_of(&presented) {
        Some(viewer) => Ok((view, viewer)),
        // A script's token is wrong: say so, rather than send it to a form.
        None if presented.token.is_some() => Err(NotSignedIn::Unauthorized),
        None => Err(NotSignedIn::SignIn(page.to_string())),
    }
}

async fn overview(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    let (view, viewer) = match signed_in(&state, &headers, "/ui") {
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
    let (view, viewer) = match signed_in(&state, &headers, &format!("/ui/rollbacks/{rollback_id}"))
    {
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
    let (view, viewer) = match signed_in(&state, &headers, &format!("/ui/changes/{change_id}")) {
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
/// member stops, or [`MAX_LIVE_VIEW`] passes; a client that stops reading is let go then too.
async fn rollback_live_stream(
    State(state): State<HttpState>,
    Path(rollback_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (view, viewer) = match signed_in(&state, &headers, "") {
        Ok(signed_in) => signed_in,
        Err(NotSignedIn::SignIn(_)) => return NotSignedIn::Unauthorized.into_response(),
        Err(not_signed_in) => return not_signed_in.into_response(),
    };
    // Kept: checked again at every update, so signing out ends the view.
    let presented = viewers::Presented::of(&headers);
    let Some(viewers_share) = view.live_view_of(&viewer) else {
        return Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} has {MAX_LIVE_VIEWS_PER_VIEWER} live views open already: close one.",
                viewer.id()
            ),
        )
        .into_response();
    };
    let Ok(slot) = Arc::clone(&view.live_views).try_acquire_owned() else {
        return Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "As many live views as this member serves are open already: reload later.",
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
        let _held = (slot, viewers_share);
        let deadline = tokio::time::sleep(MAX_LIVE_VIEW);
        tokio::pin!(deadline);
        let mut stopping = view.stopping.clone();
        // Every wait, sends and reads included, ends at the deadline and when the member
        // stops: a client that reads nothing must not hold its slot for ever.
        macro_rules! or_end {
            ($wait:expr) => {
                tokio::select! {
                    waited = $wait => waited,
                    _ = &mut deadline => return,
                    _ = stopping.changed() => return,
                }
            };
        }
        let mut applied = view.control.context.node.subscribe();
        let (mut markup, mut ended) = first;
        let mut sent = String::new();
        loop {
            let html = markup.into_string();
            if html != sent {
                let event = Event::default().event("live").data(&html);
                if or_end!(events.send(event)).is_err() {
                    return;
                }
                sent = html;
            }
            if ended {
                let _ = or_end!(events.send(Event::default().event("end").data("ended")));
                return;
            }
            // The rollback changed, or it is time to check the session again.
            let go_on = or_end!(async {
                tokio::select! {
                    changed = applied.changed() => changed.is_ok(),
                    _ = tokio::time::sleep(LIVE_CREDENTIAL_CHECK_EVERY) => true,
                    _ = events.closed() => false,
                }
            });
            if !go_on {
                return;
            }
            // Changes in a burst are one update.
            or_end!(tokio::time::sleep(LIVE_UPDATE_EVERY));
            let still = view.viewer_of(&presented);
            if still.is_none_or(|still| still.id() != viewer.id()) {
                let said = Event::default()
                    .event("problem")
                    .data("signed out, or the session ended");
                let _ = or_end!(events.send(said));
                return;
            }
            (markup, ended) = match or_end!(view.rollback_live(&viewer, &rollback_id)) {
                Ok(live) => live,
                Err(status) => {
                    let said = Event::default().event("problem").data(status.message());
                    let _ = or_end!(events.send(said));
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

#[derive(serde::Deserialize)]
struct SignInQuery {
    /// The page to go to once signed in (a path of the web view).
    #[serde(default)]
    next: String,
}

async fn sign_in_form(
    State(state): State<HttpState>,
    Query(query): Query<SignInQuery>,
) -> Response {
    if state.view.is_none() {
        return Problem::off().into_response();
    }
    pages::sign_in(None, &next_page(&query.next)).into_response()
}

/// Where to go after signing in: a path of the web view, else the overview (never another
/// site: `//host` and `/\host` are refused).
fn next_page(next: &str) -> String {
    let ours = next.starts_with("/ui")
        && next.len() <= 256
        && !next.contains("//")
        && !next.contains('\\')
        && next
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && byte != b'"' && byte != b'<');
    if ours { next } else { "/ui" }.to_string()
}

/// Refuses a form posted from another site (its browser says where from, in `Origin`).
fn same_origin(headers: &HeaderMap) -> Result<(), Problem> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|origin| origin.split_once("://"))
        .map(|(_, host)| host);
    // The address the browser used: `Host`, or a proxy's `X-Forwarded-Host` when it rewrote
    // `Host` (another site's form cannot set either).
    let ours = [header::HOST.as_str(), "x-forwarded-host"]
        .into_iter()
        .filter_map(|name| headers.get(name)?.to_str().ok())
        .any(|host| Some(host) == origin_host);
    if ours {
        return Ok(());
    }
    Err(Problem::new(
        StatusCode::FORBIDDEN,
        "A form of the web view was posted from another site.",
    ))
}

/// `Secure` when a TLS proxy in front says the browser came over HTTPS.
fn secure_attribute(headers: &HeaderMap) -> &'static str {
    let over_https = headers
        .get("x-forwarded-proto")
        .and_then(|proto| proto.to_str().ok())
        .is_some_and(|proto| proto.eq_ignore_ascii_case("https"));
    if over_https { "; Secure" } else { "" }
}

#[derive(serde::Deserialize)]
struct SignIn {
    token: String,
    #[serde(default)]
    next: String,
}

/// Checks the token against the viewers file and hands the browser a session this member
/// signed, in an HttpOnly, SameSite=Lax cookie for `/ui` (an `EventSource` cannot send a
/// header); the token itself is not kept.
async fn sign_in(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Form(form): Form<SignIn>,
) -> Response {
    let Some(view) = state.view.clone() else {
        return Problem::off().into_response();
    };
    if let Err(problem) = same_origin(&headers) {
        return problem.into_response();
    }
    let next = next_page(&form.next);
    let viewer = match viewers::check_token_text(&form.token) {
        Err(problem) => Err(problem),
        Ok(()) => view
            .viewers
            .find(&form.token)
            .ok_or_else(|| "That token is not one of this cluster's viewers.".to_string()),
    };
    let viewer = match viewer {
        Ok(viewer) => viewer,
        Err(problem) => {
            view.refused("a sign-in");
            let page = pages::sign_in(Some(&problem), &next);
            return (StatusCode::UNAUTHORIZED, page).into_response();
        }
    };
    tracing::info!(viewer = %viewer.id(), "Signed in to the web view.");
    let session = view.sessions.sign(&viewer, now_s());
    redirect_setting_cookie(&next, &session, viewers::SESSION_LASTS_S, &headers)
}

/// Ends the session on this member (a copy of the cookie no longer works) and in the browser.
async fn sign_out(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    if let Err(problem) = same_origin(&headers) {
        return problem.into_response();
    }
    if let (Some(view), Some(cookie)) = (&state.view, viewers::Presented::of(&headers).session) {
        view.sessions.sign_out(&cookie, now_s());
    }
    redirect_setting_cookie("/ui/sign-in", "", 0, &headers)
}

/// A redirect to `to` that sets the viewer cookie to `session` for `max_age_s` (0: removes it).
fn redirect_setting_cookie(
    to: &str,
    session: &str,
    max_age_s: u64,
    headers: &HeaderMap,
) -> Response {
    let cookie = format!(
        "{VIEWER_COOKIE}={session}; Path=/ui; HttpOnly; SameSite=Lax; Max-Age={max_age_s}{}",
        secure_attribute(headers)
    );
    let mut response = Redirect::to(to).into_response();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_path_of_the_web_view_is_gone_to_after_signing_in() {
        assert_eq!(next_page("/ui/rollbacks/rb-3"), "/ui/rollbacks/rb-3");
        for elsewhere in [
            "",
            "//evil.example/ui",
            "/ui//evil.example",
            "/\\evil.example",
            "/ui/\\evil",
            "https://evil.example/ui",
            "/metrics",
            "/ui/\"><script>",
        ] {
            assert_eq!(next_page(elsewhere), "/ui", "{elsewhere:?}");
        }
    }

    #[test]
    fn a_form_from_another_site_is_refused() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(*name, value.parse().unwrap());
            }
            headers
        };
        let host = ("host", "rewind.internal:9443");
        assert!(same_origin(&headers(&[host])).is_ok());
        assert!(same_origin(&headers(&[host, ("origin", "http://rewind.internal:9443")])).is_ok());
        let elsewhere = same_origin(&headers(&[host, ("origin", "https://evil.example")]));
        assert_eq!(elsewhere.unwrap_err().status, StatusCode::FORBIDDEN);
        assert!(same_origin(&headers(&[host, ("origin", "null")])).is_err());
        // Behind a proxy that rewrote Host.
        let proxied = [
            ("host", "127.0.0.1:9443"),
            ("x-forwarded-host", "rewind.example.com"),
            ("origin", "https://rewind.example.com"),
        ];
        assert!(same_origin(&headers(&proxied)).is_ok());
    }

    #[test]
    fn an_api_refusal_becomes_the_http_status_that_says_the_same() {
        for (status, code) in [
            (Status::permission_denied("x"), StatusCode::FORBIDDEN),
            (Status::not_found("x"), StatusCode::NOT_FOUND),
            (Status::invalid_argument("x"), StatusCode::BAD_REQUEST),
            (Status::failed_precondition("x"), StatusCode::CONFLICT),
            (Status::unavailable("x"), StatusCode::SERVICE_UNAVAILABLE),
            (Status::internal("x"), StatusCode::INTERNAL_SERVER_ERROR),
        ] {
            assert_eq!(Problem::from(status).status, code);
        }
    }

    #[test]
    fn the_cookie_is_secure_when_a_tls_proxy_says_so() {
        let mut headers = HeaderMap::new();
        assert_eq!(secure_attribute(&headers), "");
        headers.insert("x-forwarded-proto", "https".parse().unwrap());
        assert_eq!(secure_attribute(&headers), "; Secure");
    }
}
