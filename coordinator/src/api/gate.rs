//! The gate every call passes before a handler runs (a tower layer around every service).
//!
//! It finds the method's permission in [`crate::access::permissions`], reads the caller from its
//! certificate, and refuses: a method not in the table; a certificate whose kind the method is
//! not for (an agent's key calling `ControlService`, a person's calling `RaftService`); an
//! identity on the deny list; a person no binding allows the method's level (on the cluster for
//! whole-cluster methods, anywhere for the rest, whose handlers then check their target). It
//! also sends agents and people to the leader. A refusal answers `PERMISSION_DENIED` naming the
//! identity, the action and why, and is audited.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use rewind_shared::identity::{Kind, PeerIdentity};
use tokio::sync::watch;
use tonic::Status;
use tracing::{debug, warn};

use crate::access::permissions::{self, CallerKind, Permission, Reach};
use crate::access::{Caller, Principal, Refusal, Target};
use crate::membership::Directory;
use crate::node::NodeHandle;
use crate::node::raft::RaftStatus;
use crate::state_machine::{Command, CommandKind};

/// Refusals audited per identity per minute; more are counted in the log, not audited, so a
/// hostile certificate cannot fill the replicated log.
const AUDITED_REFUSALS_PER_MINUTE: u32 = 5;
/// Identities whose refusals are being counted at once; past it, the count starts over.
const MAX_COUNTED_IDENTITIES: usize = 1024;
/// Certificates whose identity is kept parsed; past it, the cache starts over.
const MAX_CACHED_CERTIFICATES: usize = 4096;

/// What the gate reads and where it sends refusals. Cheap to clone.
#[derive(Clone)]
pub struct Gate {
    node: NodeHandle,
    status: watch::Receiver<RaftStatus>,
    directory: Directory,
    /// Agents' sessions: those of agents a new policy denies are closed.
    sessions: Arc<crate::sessions::Sessions>,
    /// Accept certificates without a kind, as the kind the method expects.
    legacy_certificates: bool,
    refusals: Arc<Mutex<RefusalCounts>>,
    /// The policy in force, kept here so a call never waits on the state lock the Raft thread
    /// holds while it applies (Raft's own messages pass the gate too).
    policy: Arc<std::sync::RwLock<CachedPolicy>>,
    /// Identities of certificates seen, by their DER: parsing X.509 on every call is waste.
    identities: Arc<Mutex<HashMap<Vec<u8>, PeerIdentity>>>,
    /// Calls refused for want of a certificate, logged by peer a while apart.
    anonymous_calls: Arc<crate::admission::PeerLog>,
}

#[derive(Default)]
struct CachedPolicy {
    version: u64,
    policy: Option<Arc<crate::access::Policy>>,
}

#[derive(Default)]
struct RefusalCounts {
    by_identity: HashMap<String, (Instant, u32)>,
    /// Legacy identities already warned about.
    legacy_warned: std::collections::HashSet<String>,
}

impl Gate {
    pub fn new(
        node: NodeHandle,
        status: watch::Receiver<RaftStatus>,
        directory: Directory,
        sessions: Arc<crate::sessions::Sessions>,
        legacy_certificates: bool,
    ) -> Self {
        Self {
            node,
            status,
            directory,
            sessions,
            legacy_certificates,
            refusals: Arc::default(),
            policy: Arc::default(),
            identities: Arc::default(),
            anonymous_calls: Arc::default(),
        }
    }

    /// Takes the policy in force from the state if it changed, and closes the sessions of
    /// agents it denies. Run after every applied batch by [`Gate::follow_policy`], and by
    /// `ApplyPolicy` before it answers, so the caller's next call is judged by the policy it
    /// just applied.
    pub fn refresh_policy(&self) {
        let cached = self
            .policy
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .version;
        let (version, policy) = self
            .node
            .read(|state| (state.access.version, state.access.policy.clone()));
        if version != cached {
            if let Some(policy) = &policy {
                crate::sessions::close_revoked(&self.sessions, policy);
            }
            *self
                .policy
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) =
                CachedPolicy { version, policy };
        }
    }

    /// Keeps the cached policy current until the node stops.
    pub async fn follow_policy(self) {
        let mut applied = self.node.subscribe();
        loop {
            self.refresh_policy();
            if applied.changed().await.is_err() {
                return;
            }
        }
    }

    /// The access policy in force here (as last applied), if the cluster has one.
    pub(crate) fn current_policy(&self) -> Option<Arc<crate::access::Policy>> {
        self.policy
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .policy
            .clone()
    }

    /// The identity `certificate` names, parsed once per certificate.
    fn identity(&self, certificate: &[u8]) -> Result<PeerIdentity, Status> {
        let mut cache = self
            .identities
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(identity) = cache.get(certificate) {
            return Ok(identity.clone());
        }
        let identity = rewind_shared::identity::certificate_identity(certificate)
            .map_err(|error| Status::unauthenticated(error.to_string()))?;
        if cache.len() >= MAX_CACHED_CERTIFICATES {
            cache.clear();
        }
        cache.insert(certificate.to_vec(), identity.clone());
        Ok(identity)
    }

    /// Whether certificates without a kind are accepted (the compatibility switch).
    pub fn accepts_legacy(&self) -> bool {
        self.legacy_certificates
    }

    /// Decides one call: the caller to hand the handler (none for a method anyone may call), or
    /// the status to answer with.
    pub fn admit<B>(&self, request: &http::Request<B>) -> Result<Option<Caller>, Status> {
        let method = request.uri().path();
        let permission = permissions::permission(method).ok_or_else(|| {
            Status::unimplemented(format!(
                "{:?} is not a method of this coordinator",
                rewind_shared::names::truncate(method, 128)
            ))
        })?;
        if permission.kind.needs_no_certificate() {
            if permission.kind.leader_only() {
                self.leader_only()?;
            }
            return Ok(None);
        }
        let peer = request.extensions().get::<super::listener::PeerInfo>();
        let Some(certificates) = peer.and_then(|info| info.certificates.clone()) else {
            // A client that forgot its certificate: visible on the server side, once a while.
            if let Some(remote) = peer.and_then(|info| info.remote)
                && let Some(not_logged) = self.anonymous_calls.admit(remote.ip(), "no_certificate")
            {
                warn!(
                    %remote,
                    method = rewind_shared::names::truncate(method, 128),
                    not_logged_since_last = not_logged,
                    "Refused a call without a client certificate (only joins and health checks may come without one)."
                );
            }
            return Err(Status::unauthenticated(
                "no client certificate: every call needs mutual TLS",
            ));
        };
        let leaf = certificates.first().ok_or_else(|| {
            Status::unauthenticated("no client certificate: every call needs mutual TLS")
        })?;
        let identity = self.identity(leaf.as_ref())?;
        let principal = self.principal(&identity, permission.kind)?;
        self.judge(method, permission, principal)
            .map(Some)
            .map_err(|judged| self.answer(judged))
    }

    /// Judges a principal the web view named by a viewer's token, as a call of `method` (one
    /// of ControlService's reads): the checks a certificate's holder passes once its
    /// certificate is read, refusals audited alike. `Err` with the status to answer with.
    pub fn admit_principal(&self, method: &str, principal: Principal) -> Result<Caller, Status> {
        let permission = permissions::permission(method)
            .ok_or_else(|| Status::unimplemented(format!("{method:?} is not a method")))?;
        self.judge(method, permission, principal)
            .map_err(|judged| self.answer(judged))
    }

    /// Whether `principal` may call `method`, with nothing audited or logged: for what a page
    /// shows only to those allowed (the audit chain's status), not for what they asked for.
    pub fn allows(&self, method: &str, principal: Principal) -> bool {
        permissions::permission(method)
            .is_some_and(|permission| self.judge(method, permission, principal).is_ok())
    }

    fn answer(&self, judged: Judged) -> Status {
        match judged {
            Judged::Answer(status) => status,
            Judged::Refused(refusal) => self.refuse(refusal),
        }
    }

    /// Everything [`Self::admit`] checks once it knows who is calling.
    fn judge(
        &self,
        method: &str,
        permission: &'static Permission,
        principal: Principal,
    ) -> Result<Caller, Judged> {
        if permission.kind.leader_only() {
            self.leader_only().map_err(Judged::Answer)?;
        }
        let policy = self.current_policy();
        let caller = Caller {
            principal,
            permission,
            policy,
        };
        if !permission.kind.admits(caller.principal.kind) {
            let service = method
                .trim_start_matches('/')
                .split('/')
                .next()
                .unwrap_or_default();
            let refusal = Refusal {
                identity: caller.id(),
                action: permission.action,
                target: service.to_string(),
                reason: format!(
                    "it presents {} certificate, and {service} takes {} only",
                    article(caller.principal.kind),
                    permission.kind.describe()
                ),
            };
            return Err(Judged::Refused(refusal));
        }
        if let Some(policy) = &caller.policy
            && policy.is_denied(&caller.principal)
        {
            let refusal = Refusal {
                identity: caller.id(),
                action: permission.action,
                target: "this cluster".into(),
                reason: "it is on the policy's deny list (revoked)".into(),
            };
            return Err(Judged::Refused(refusal));
        }
        if permission.kind == CallerKind::Person {
            let target = match permission.reach {
                Reach::Cluster => Target::Cluster,
                Reach::Service | Reach::Scoped | Reach::Listed => Target::Anywhere,
            };
            caller.authorize(&target).map_err(Judged::Refused)?;
        }
        Ok(caller)
    }

    /// The principal a certificate names. One without a kind is taken as the kind the method
    /// expects only behind the compatibility switch, and logged once per identity.
    fn principal(
        &self,
        identity: &PeerIdentity,
        expected: CallerKind,
    ) -> Result<Principal, Status> {
        let kind = match identity.kind {
            Some(kind) => kind,
            None if self.legacy_certificates => {
                let kind = match expected {
                    CallerKind::Member => Kind::Member,
                    CallerKind::Agent => Kind::Agent,
                    CallerKind::Person => Kind::User,
                    CallerKind::Holder => {
                        return Err(Status::permission_denied(format!(
                            "certificate {:?} has no rewind:// identity, so it cannot be \
                             renewed: join with a token for a new one",
                            identity.name
                        )));
                    }
                    CallerKind::Certified | CallerKind::Anyone | CallerKind::Prober => {
                        return Err(Status::permission_denied(format!(
                            "certificate {:?} has no rewind:// identity, and only a \
                             certificate with one may call this: re-enroll it",
                            identity.name
                        )));
                    }
                };
                self.warn_legacy(identity, kind);
                if kind == Kind::Member {
                    // A member's legacy certificate names it by its registered name.
                    let member = self
                        .directory
                        .members()
                        .into_iter()
                        .find(|member| member.name == identity.name)
                        .ok_or_else(|| {
                            Status::permission_denied(format!(
                                "legacy certificate {:?} names no member of this cluster",
                                identity.name
                            ))
                        })?;
                    return Ok(Principal::new(Kind::Member, &member.id.to_string()));
                }
                kind
            }
            None => {
                return Err(Status::permission_denied(format!(
                    "certificate {:?} has no rewind:// identity (it was issued before kinds \
                     existed): re-enroll it, or set access.legacy-certificates for this release",
                    identity.name
                )));
            }
        };
        Ok(Principal {
            kind,
            name: identity.name.clone(),
            // A certificate without kind may be an agent's: its O/OU must not reach a binding
            // meant for people. It is bound by name only.
            groups: if identity.kind.is_some() {
                identity.groups.clone()
            } else {
                Vec::new()
            },
        })
    }

    fn warn_legacy(&self, identity: &PeerIdentity, kind: Kind) {
        let mut counts = self
            .refusals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if counts.legacy_warned.len() >= MAX_COUNTED_IDENTITIES {
            counts.legacy_warned.clear();
        }
        if counts.legacy_warned.insert(identity.name.clone()) {
            warn!(
                common_name = identity.name,
                taken_as = %kind,
                "A certificate without a rewind:// identity was accepted (access.legacy-certificates); re-enroll it before the next release."
            );
        }
    }

    /// Agents and people are served by the leader only.
    fn leader_only(&self) -> Result<(), Status> {
        let status = self.status.borrow();
        if status.is_leader {
            return Ok(());
        }
        let leader_id = status.leader_id;
        drop(status);
        Err(super::not_leader(leader_id, &self.directory))
    }

    /// `PERMISSION_DENIED` for `refusal`, audited unless this identity was refused too often
    /// this minute.
    pub fn refuse(&self, refusal: Refusal) -> Status {
        let message = refusal.to_string();
        self.audit(refusal);
        Status::permission_denied(message)
    }

    /// Records a refusal in the audit log (on the leader), unless this identity was refused
    /// more than [`AUDITED_REFUSALS_PER_MINUTE`] times this minute: a hostile caller cannot
    /// fill the replicated log.
    pub fn audit(&self, refusal: Refusal) {
        if !self.count_refusal(&refusal.identity) {
            debug!(
                identity = refusal.identity,
                action = refusal.action,
                "Refused (not audited: too many this minute)."
            );
            return;
        }
        warn!(
            identity = refusal.identity,
            action = refusal.action,
            reason = refusal.reason,
            "Refused."
        );
        if !self.status.borrow().is_leader {
            return;
        }
        let node = self.node.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let command = Command {
                at_ms: rewind_shared::time::now_ms(),
                identity: refusal.identity,
                request_id: String::new(),
                audit_seed: String::new(),
                kind: CommandKind::RecordRefusal {
                    action: refusal.action.to_string(),
                    target: refusal.target,
                    reason: refusal.reason,
                },
            };
            if let Err(error) = node.propose(command).await {
                debug!(%error, "Could not audit a refusal.");
            }
        }));
    }

    /// Counts a refusal; true when it is to be audited.
    fn count_refusal(&self, identity: &str) -> bool {
        let mut counts = self
            .refusals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if counts.by_identity.len() >= MAX_COUNTED_IDENTITIES
            && !counts.by_identity.contains_key(identity)
        {
            counts.by_identity.clear();
        }
        let (since, count) = counts
            .by_identity
            .entry(identity.to_string())
            .or_insert((now, 0));
        if now.duration_since(*since) >= Duration::from_secs(60) {
            (*since, *count) = (now, 0);
        }
        *count += 1;
        *count <= AUDITED_REFUSALS_PER_MINUTE
    }
}

/// "an agent", "a member".
fn article(kind: Kind) -> String {
    match kind {
        Kind::Agent | Kind::Automation => format!("an {kind}"),
        Kind::Member | Kind::User => format!("a {kind}"),
    }
}

/// [`Gate`] as a tower layer.
#[derive(Clone)]
pub struct GateLayer {
    pub gate: Gate,
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Gated {
            inner,
            gate: self.gate.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Gated<S> {
    inner: S,
    gate: Gate,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Gated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, context: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // Every line logged for a call of a person, an agent or a probe names its trace (the
        // caller's traceparent, or a new one): members' Raft traffic goes without.
        let span = call_span(&request);
        let admitted = span.in_scope(|| self.gate.admit(&request));
        match admitted {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                // The clone is fresh and not ready; the ready one serves this call.
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                let answer = span.in_scope(|| ready.call(request));
                Box::pin(tracing::Instrument::instrument(answer, span))
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

/// Why [`Gate::judge`] did not admit a caller: an answer as it is (not the leader), or a
/// refusal to audit.
enum Judged {
    Answer(Status),
    Refused(Refusal),
}

/// The span a call's log lines are made in: its method and trace id, from its `traceparent`
/// (W3C Trace Context) or a new trace when it has none or one that does not parse (a call is
/// never refused for it). Members' calls (Raft) and health checks get none.
fn call_span<B>(request: &http::Request<B>) -> tracing::Span {
    let method = request.uri().path();
    // Members' Raft traffic and health probes (every few seconds from every load balancer)
    // would bury the calls worth following.
    let untraced = permissions::permission(method).is_some_and(|permission| {
        matches!(permission.kind, CallerKind::Member | CallerKind::Prober)
    });
    if untraced {
        return tracing::Span::none();
    }
    let trace = rewind_shared::trace::TraceParent::of_request(request.headers());
    // At WARN: enabled whenever refusals and warnings are logged (REWIND_LOG=warn too).
    let span = tracing::warn_span!(
        "call",
        method = rewind_shared::names::truncate(method, 128),
        trace_id = %trace.trace_id_hex()
    );
    trace.adopt(&span);
    span
}

/// The caller the gate admitted, for a handler.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::internal("the call did not pass the access gate"))
}
