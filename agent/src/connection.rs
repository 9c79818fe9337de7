//! The agent's side of the session: dial out to a coordinator, register, stream health reports
//! and step results up, run the steps that come down. On any failure, move to the next
//! coordinator address after a capped exponential backoff with jitter, forever: an agent must
//! keep trying, but never faster than the backoff allows. The backoff grows with each round
//! through the addresses, not with each address, so a dead leader among them does not push
//! the agent to the cap before it has tried the members that are still up.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use rewind_proto::MAX_MESSAGE_BYTES;
use rewind_proto::v1::{
    self as pb, agent_message, agent_service_client::AgentServiceClient, coordinator_message,
};
use rewind_shared::backoff::Backoff;
use rewind_shared::member_tls::MemberConnector;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::app_metrics::AppScraper;
use crate::config::Config;
use crate::host_metrics::MetricsReader;
use crate::steps::Executor;

/// Messages queued towards the coordinator; health reports are dropped when it is full.
const OUTBOUND_QUEUE: usize = 256;
/// Reports kept while disconnected (the newest win).
const HEALTH_HISTORY: usize = 720;
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// How often a managed container's releases still on the host are asked of the engine (and
/// after each activation, restore or adoption).
const CONTAINER_RELEASES_EVERY: Duration = Duration::from_secs(30);
/// Reconnects spread out, so a fleet does not come back in step after a coordinator restart.
const RECONNECT: Backoff = Backoff {
    first: BACKOFF_BASE,
    max: BACKOFF_CAP,
    jitter: true,
};
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Drift rides on a report at least this often even when unchanged, with when it was checked.
const DRIFT_RESEND: Duration = Duration::from_secs(300);
/// Inspections (host diff, drift) running at once.
const MAX_INSPECTIONS: usize = 2;
/// How often the agent reports while a service it was asked about (a verify) is not healthy yet.
const QUICK_REPORT_EVERY: Duration = Duration::from_millis(200);
/// The longest it keeps that pace for one ask, whatever the coordinator says.
const QUICK_REPORT_MAX: Duration = Duration::from_secs(60);

use rewind_shared::LEADER_METADATA_KEY as LEADER_KEY;

/// A member that is not the leader refused the session and named the leader's address.
#[derive(Debug)]
struct NotLeader(String);

impl std::fmt::Display for NotLeader {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "not the leader; the leader is at {}", self.0)
    }
}

impl std::error::Error for NotLeader {}

pub struct Agent {
    config: Config,
    executor: Arc<Executor>,
    interval_ms: AtomicU64,
    latest: watch::Sender<Option<pb::HealthReport>>,
    history: Mutex<VecDeque<pb::HealthReport>>,
    /// When the agent last lost its session, or started without one; 0 while registered.
    offline_since_ms: AtomicU64,
    /// The live session's outbound queue, for reporting a self-revert that ends mid-session.
    outbound: Mutex<Option<mpsc::Sender<pb::AgentMessage>>>,
    /// Inspections may hash release trees: a few at a time.
    inspections: Arc<tokio::sync::Semaphore>,
    /// Each service's latest drift finding (see `check_drift`).
    drift: watch::Sender<Vec<pb::ServiceDrift>>,
    /// Per managed container: the releases whose image is still on the host (see
    /// `watch_container_releases`).
    container_releases: Mutex<std::collections::BTreeMap<String, Vec<String>>>,
    /// Wakes the health loop for a report now (the coordinator asked: a verify began).
    report_now: tokio::sync::Notify,
    /// Services the coordinator asked about (a verify, a gate), with until when and the ask's
    /// id: reported every [`QUICK_REPORT_EVERY`] while their probes do not all pass, each report
    /// naming the ask. At most one entry per configured service.
    quick_reports: Mutex<HashMap<String, (tokio::time::Instant, u64)>>,
}

impl Agent {
    pub fn new(config: Config, executor: Arc<Executor>) -> Arc<Self> {
        let interval_ms = AtomicU64::new(config.health_interval.as_millis() as u64);
        Arc::new(Self {
            config,
            executor,
            interval_ms,
            latest: watch::channel(None).0,
            history: Mutex::new(VecDeque::new()),
            offline_since_ms: AtomicU64::new(rewind_shared::time::now_ms()),
            outbound: Mutex::new(None),
            inspections: Arc::new(tokio::sync::Semaphore::new(MAX_INSPECTIONS)),
            drift: watch::Sender::new(Vec::new()),
            container_releases: Mutex::new(std::collections::BTreeMap::new()),
            report_now: tokio::sync::Notify::new(),
            quick_reports: Mutex::new(HashMap::new()),
        })
    }

    /// Runs until `shutdown` resolves: health reporting always, the session whenever it can.
    /// Fails if it can never connect (its TLS files cannot be loaded).
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let reporter = tokio::spawn(Arc::clone(&self).report_health());
        let drift_checks = self
            .config
            .drift_check_interval
            .map(|interval| tokio::spawn(Arc::clone(&self).check_drift(interval)));
        let client_caches = tokio::spawn(Arc::clone(&self).close_client_cache_windows());
        let container_releases = tokio::spawn(Arc::clone(&self).watch_container_releases());
        tokio::pin!(shutdown);
        let result = tokio::select! {
            _ = &mut shutdown => Ok(()),
            stopped = Arc::clone(&self).stay_connected() => stopped,
        };
        reporter.abort();
        client_caches.abort();
        container_releases.abort();
        if let Some(checks) = drift_checks {
            checks.abort();
        }
        info!("Agent stopped.");
        result
    }

    async fn stay_connected(self: Arc<Self>) -> anyhow::Result<()> {
        let tls = rewind_shared::member_tls::MemberConnector::new(
            &self.config.tls,
            self.config.legacy_certificates,
        )
        .map(|connector| connector.with_server_name(self.config.coordinator_name.as_deref()))
        .map_err(|error| anyhow::anyhow!("cannot load the TLS files (tls.*): {error}"))?;
        let mut failures = 0u32;
        let mut next = 0usize;
        let mut redirect: Option<String> = None;
        loop {
            let address = redirect.take().unwrap_or_else(|| {
                next += 1;
                self.config.coordinators[(next - 1) % self.config.coordinators.len()].clone()
            });
            let span = info_span!("session", coordinator = %address);
            let registered = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let outcome = self
                .session(&address, tls.clone(), Arc::clone(&registered))
                .instrument(span)
                .await;
            if registered.load(Ordering::SeqCst) {
                failures = 0;
                self.offline_since_ms
                    .store(rewind_shared::time::now_ms(), Ordering::SeqCst);
                *lock(&self.outbound) = None;
            }
            match outcome {
                Ok(()) => info!(coordinator = %address, "Session ended; reconnecting."),
                Err(error) => match error.downcast_ref::<NotLeader>() {
                    // Straight to the leader, once, without waiting out a backoff.
                    Some(NotLeader(leader)) if failures < 2 => {
                        info!(coordinator = %address, leader = %leader, "Not the leader; moving to it.");
                        redirect = Some(leader.clone());
                        failures = failures.saturating_add(1);
                        continue;
                    }
                    _ => {
                        warn!(coordinator = %address, error = format!("{error:#}"), "Session failed; reconnecting.")
                    }
                },
            }
            tokio::time::sleep(round_backoff(failures, self.config.coordinators.len())).await;
            failures = failures.saturating_add(1);
        }
    }

    async fn session(
        &self,
        address: &str,
        tls: MemberConnector,
        registered: Arc<std::sync::atomic::AtomicBool>,
    ) -> anyhow::Result<()> {
        let channel = connect(address, tls).await?;
        let mut client = AgentServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (outbound, receiver) = mpsc::channel(OUTBOUND_QUEUE);
        outbound
            .send(message(agent_message::Body::Register(self.register())))
            .await
            .context("queue Register")?;
        let mut inbound = client
            .session(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .map_err(|status| {
                match status
                    .metadata()
                    .get(LEADER_KEY)
                    .and_then(|value| value.to_str().ok())
                {
                    Some(leader) => anyhow::Error::new(NotLeader(leader.to_string())),
                    None => anyhow::anyhow!("{}: {}", status.code(), status.message()),
                }
            })?
            .into_inner();
        let first = inbound
            .next()
            .await
            .context("the coordinator closed the session before answering")??;
        let Some(coordinator_message::Body::Registered(welcome)) = first.body else {
            bail!("the coordinator's first message was not Registered");
        };
        if welcome.health_interval_ms >= 100 {
            self.interval_ms
                .store(welcome.health_interval_ms, Ordering::Relaxed);
        }
        registered.store(true, Ordering::SeqCst);
        let offline_since = self.offline_since_ms.swap(0, Ordering::SeqCst);
        if offline_since != 0 {
            let history = self.health_history();
            let now = rewind_shared::time::now_ms();
            if let Some(summary) = crate::offline::summary(&history, offline_since, now) {
                info!(
                    reports = summary.reports,
                    failing = summary.failing_reports,
                    "Reporting the health history kept while offline."
                );
                outbound
                    .send(message(agent_message::Body::OfflineHealth(summary)))
                    .await
                    .context("queue the offline health summary")?;
            }
        }
        info!(host_id = %welcome.host_id, interval_ms = welcome.health_interval_ms, "Registered with the coordinator.");
        // What this host did on its own while offline, until the coordinator has recorded it.
        for record in self.executor.store().self_reverts()? {
            info!(id = %record.id, service = %record.service, "Reporting a self-revert.");
            outbound
                .send(message(agent_message::Body::SelfRevert(record.to_proto())))
                .await
                .context("queue a self-revert report")?;
        }
        *lock(&self.outbound) = Some(outbound.clone());

        let forwarder = tokio::spawn(forward_health(
            self.latest.subscribe(),
            self.drift.subscribe(),
            outbound.clone(),
        ));
        let result = self.serve_inbound(&mut inbound, &outbound).await;
        forwarder.abort();
        result
    }

    async fn serve_inbound(
        &self,
        inbound: &mut tonic::Streaming<pb::CoordinatorMessage>,
        outbound: &mpsc::Sender<pb::AgentMessage>,
    ) -> anyhow::Result<()> {
        // (service, flag) -> (enabled, log index) of each update this session applied: a
        // snapshot read before an update must not undo it.
        let mut updated: std::collections::HashMap<(String, String), (bool, u64)> =
            std::collections::HashMap::new();
        while let Some(received) = inbound.next().await {
            match received?.body {
                Some(coordinator_message::Body::Step(step)) => {
                    let executor = Arc::clone(&self.executor);
                    let outbound = outbound.clone();
                    let span = span_of_step(&step);
                    tokio::spawn(
                        async move {
                            if let Some(result) = executor.execute(step).await {
                                // If the session died meanwhile, the journal answers the redelivery.
                                let _ = outbound
                                    .send(message(agent_message::Body::StepResult(result)))
                                    .await;
                            }
                        }
                        .instrument(span),
                    );
                }
                Some(coordinator_message::Body::Flag(update)) => {
                    updated.insert(
                        (update.service.clone(), update.flag.clone()),
                        (update.enabled, update.index),
                    );
                    match self.executor.set_flag(&update) {
                        Ok(()) => {
                            info!(service = %update.service, flag = %update.flag, enabled = update.enabled, "Flag set.")
                        }
                        Err(error) => warn!(%error, flag = %update.flag, "Flag update refused."),
                    }
                }
                Some(coordinator_message::Body::Flags(mut snapshot)) => {
                    for ((service, flag), (enabled, index)) in &updated {
                        if *service == snapshot.service && *index > snapshot.index {
                            snapshot.flags.insert(flag.clone(), *enabled);
                        }
                    }
                    match self
                        .executor
                        .replace_flags(&snapshot.service, &snapshot.flags)
                    {
                        Ok(()) => {
                            info!(service = %snapshot.service, flags = snapshot.flags.len(), "Flags file written.")
                        }
                        Err(error) => {
                            warn!(%error, service = %snapshot.service, "Flag snapshot refused.")
                        }
                    }
                }
                Some(coordinator_message::Body::Inspect(request)) => {
                    let executor = Arc::clone(&self.executor);
                    let outbound = outbound.clone();
                    let Ok(permit) = Arc::clone(&self.inspections).try_acquire_owned() else {
                        let busy = pb::InspectAnswer {
                            request_id: request.request_id,
                            services: Vec::new(),
                            error: format!(
                                "busy: {MAX_INSPECTIONS} inspections are already running here"
                            ),
                        };
                        let _ = outbound.try_send(message(agent_message::Body::Inspected(busy)));
                        continue;
                    };
                    tokio::spawn(async move {
                        let answer = inspect(&executor, request).await;
                        drop(permit);
                        let _ = outbound
                            .send(message(agent_message::Body::Inspected(answer)))
                            .await;
                    });
                }
                Some(coordinator_message::Body::SelfRevertRecorded(recorded)) => {
                    match self.executor.store().forget_self_revert(&recorded.id) {
                        Ok(()) => {
                            info!(id = %recorded.id, "The coordinator recorded the self-revert.")
                        }
                        Err(error) => {
                            warn!(%error, id = %recorded.id, "Could not mark the self-revert reported; it will be reported again.")
                        }
                    }
                }
                Some(coordinator_message::Body::ReportNow(ask)) => self.ask_report(&ask),
                Some(coordinator_message::Body::Registered(_)) | None => {
                    debug!("Ignored an unexpected message.")
                }
            }
        }
        Ok(())
    }

    fn register(&self) -> pb::Register {
        let labels = &self.config.labels;
        pb::Register {
            host_id: self.config.host_id.clone(),
            labels: Some(pb::HostLabels {
                region: labels.region.clone(),
                zone: labels.zone.clone(),
                environment: labels.environment.clone(),
            }),
            services: self
                .config
                .services
                .iter()
                .map(|service| service.name.clone())
                .collect(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// Switches client-cache clearing off once each window a `clear-client-caches` step opened
    /// has passed: checked every second, connected or not, under the service's step lock. A
    /// failed `off` is tried again 30 s later, at most [`CLIENT_CACHE_OFF_ATTEMPTS`] times, then
    /// given up with an error naming the service (its switch must then be turned off by hand).
    async fn close_client_cache_windows(self: Arc<Self>) {
        let mut failures: HashMap<String, (u32, u64)> = HashMap::new();
        loop {
            let now_ms = rewind_shared::time::now_ms();
            let open = self
                .executor
                .store()
                .client_cache_offs()
                .unwrap_or_else(|error| {
                    warn!(%error, "Could not read the client-cache windows.");
                    Vec::new()
                });
            for (name, due_ms) in open {
                let store = self.executor.store();
                let Some(due_ms) = due_ms else {
                    warn!(service = %name, "A client-cache window's end could not be read; forgotten: switch it off by hand if it is on.");
                    let _ = store.remove_client_cache_off(&name);
                    continue;
                };
                let waiting = failures.get(&name).is_some_and(|(_, next)| *next > now_ms);
                if due_ms > now_ms || waiting {
                    continue;
                }
                let Some(service) = self
                    .executor
                    .services()
                    .find(|service| {
                        service.name == name && service.catalogue.client_cache.is_some()
                    })
                    .cloned()
                else {
                    warn!(service = %name, due_ms, "A client-cache window ended for a service whose client-cache this agent no longer has: its off hook cannot run; switch it off by hand.");
                    let _ = store.remove_client_cache_off(&name);
                    continue;
                };
                let Some(_no_step_meanwhile) = self.executor.lock_service(&name).await else {
                    continue;
                };
                let closed = crate::catalogue::close_client_cache_window(
                    self.executor.host(),
                    self.executor.prober(),
                    store,
                    &service,
                    due_ms,
                )
                .await;
                match closed {
                    Ok(Some(ran)) => {
                        failures.remove(&name);
                        info!(service = %name, "Client-cache window closed: {ran}");
                    }
                    Ok(None) => {
                        failures.remove(&name);
                    }
                    Err(error) => {
                        let attempts = failures.get(&name).map_or(0, |(attempts, _)| *attempts) + 1;
                        if attempts >= CLIENT_CACHE_OFF_ATTEMPTS {
                            tracing::error!(service = %name, %error, attempts, "The client-cache off hook kept failing; given up: switch it off by hand.");
                            failures.remove(&name);
                            let _ = store.remove_client_cache_off(&name);
                        } else {
                            warn!(service = %name, %error, attempts, "The client-cache off hook failed; trying again in 30 s.");
                            failures.insert(name, (attempts, now_ms + 30_000));
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Checks each service's drift every `drift-check-interval-s`, one service at a time on the
    /// blocking pool (it reads every tracked file, runs the fact commands, and hashes a release
    /// tree whose files changed), apart from the health reports so a slow check never delays
    /// one. A service a step is acting on is left for the next round (its last finding stays).
    async fn check_drift(self: Arc<Self>, interval: Duration) {
        let services: Vec<_> = self.executor.services().cloned().collect();
        loop {
            let mut found: Vec<pb::ServiceDrift> = self.drift.borrow().clone();
            for service in &services {
                let Some(_no_step_meanwhile) = self.executor.try_lock_service(&service.name) else {
                    continue;
                };
                let (store, owned) = (self.executor.store().clone(), service.clone());
                let checked = tokio::task::spawn_blocking(move || {
                    crate::drift::summary(&store, &owned, rewind_shared::time::now_ms())
                })
                .await;
                match checked {
                    Ok(summary) => {
                        found.retain(|earlier| earlier.service != summary.service);
                        found.push(summary);
                    }
                    Err(error) => {
                        warn!(%error, service = %service.name, "The drift check stopped.")
                    }
                }
            }
            found.sort_by(|a, b| a.service.cmp(&b.service));
            // Told to the reports only when a finding changed, not its time alone.
            let without_times = |drift: &[pb::ServiceDrift]| -> Vec<pb::ServiceDrift> {
                drift
                    .iter()
                    .map(|each| pb::ServiceDrift {
                        checked_at_ms: 0,
                        ..each.clone()
                    })
                    .collect()
            };
            self.drift.send_if_modified(|current| {
                let changed = without_times(current) != without_times(&found);
                *current = found;
                changed
            });
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.executor.desired_changed_since() => {}
            }
        }
    }

    /// Keeps `container_releases` up to date for the managed containers: asked of the engine
    /// every [`CONTAINER_RELEASES_EVERY`] and after each activation, restore or adoption; a
    /// service the engine did not answer for keeps its last list.
    async fn watch_container_releases(self: Arc<Self>) {
        let managed: Vec<_> = self
            .executor
            .services()
            .filter(|service| service.manage_container)
            .cloned()
            .collect();
        if managed.is_empty() {
            return;
        }
        loop {
            let (asked, store) = (managed.clone(), self.executor.store().clone());
            let found = tokio::task::spawn_blocking(move || {
                asked
                    .iter()
                    .filter_map(|service| {
                        let versions = crate::container::retained_versions(service, &store)?;
                        Some((service.name.clone(), versions))
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            self.container_releases
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .extend(found);
            tokio::select! {
                _ = tokio::time::sleep(CONTAINER_RELEASES_EVERY) => {}
                _ = self.executor.releases_changed_since() => {}
            }
        }
    }

    /// Probes and measures every interval, connected or not, keeping a bounded history.
    async fn report_health(self: Arc<Self>) {
        let mut metrics = MetricsReader::default();
        let mut app = AppScraper::new(self.executor.prober().http_client());
        let services: Vec<_> = self.executor.services().cloned().collect();
        let mut offline_watch = crate::self_revert::Watch::default();
        // Drift rides on a report when a check found something new, and again now and then
        // (with when it was checked): not on every report, which would crowd out the history.
        let mut drift = self.drift.subscribe();
        let mut drift_sent_at: Option<tokio::time::Instant> = None;
        loop {
            // Read before probing: a report whose probes ran before an ask came does not answer it.
            let answers_ask = self.open_ask();
            let (probes, app) = tokio::join!(
                self.executor
                    .prober()
                    .probe_all(self.executor.host(), &services),
                app.scrape_all(&services)
            );
            let retained = {
                // Asked of the engine on a clock of their own: a slow engine never holds a
                // report up.
                let images = self
                    .container_releases
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                services
                    .iter()
                    .filter_map(|service| {
                        let versions = if service.manage_container {
                            images.get(&service.name)?.clone()
                        } else {
                            crate::snapshot::retained_releases(&service.root)?
                        };
                        Some(pb::RetainedReleases {
                            service: service.name.clone(),
                            versions,
                        })
                    })
                    .collect()
            };
            let mut report = pb::HealthReport {
                at_ms: rewind_shared::time::now_ms(),
                metrics: Some(metrics.read()),
                probes,
                app,
                retained,
                drift: Vec::new(),
                answers_ask,
            };
            let resend_due = drift_sent_at.is_none_or(|at| at.elapsed() >= DRIFT_RESEND);
            if drift.has_changed().unwrap_or(false) || resend_due {
                report.drift = drift.borrow_and_update().clone();
                drift_sent_at = Some(tokio::time::Instant::now());
            }
            // Cut to what the coordinator accepts, so a long error is shortened, not refused.
            rewind_shared::bounds::fit_health_report(&mut report);
            {
                let mut history = self
                    .history
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if history.len() >= HEALTH_HISTORY {
                    history.pop_front();
                }
                history.push_back(report.clone());
            }
            self.consider_self_revert(&mut offline_watch, &services, &report)
                .await;
            let pause = if self.keep_reporting_quickly(&report) {
                QUICK_REPORT_EVERY
            } else {
                Duration::from_millis(self.interval_ms.load(Ordering::Relaxed))
            };
            self.latest.send_replace(Some(report));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.report_now.notified() => {}
            }
        }
    }

    /// The coordinator asks for a report now (a verify began on `ask.service`): one at once,
    /// then quickly until the service is healthy or the ask's time is up.
    fn ask_report(&self, ask: &pb::ReportHealthNow) {
        if !self
            .executor
            .services()
            .any(|service| service.name == ask.service)
        {
            debug!(service = %ask.service, "Asked to report on a service this host does not run.");
            return;
        }
        let within = Duration::from_millis(u64::from(ask.within_ms)).min(QUICK_REPORT_MAX);
        lock(&self.quick_reports).insert(
            ask.service.clone(),
            (tokio::time::Instant::now() + within, ask.ask_id),
        );
        self.report_now.notify_one();
    }

    /// The id of the latest ask still open here (0: none), for the next report to carry.
    fn open_ask(&self) -> u64 {
        lock(&self.quick_reports)
            .values()
            .map(|(_, ask_id)| *ask_id)
            .max()
            .unwrap_or(0)
    }

    /// Whether a service the coordinator asked about is still not healthy in `report` (and its
    /// ask's time not up): then the next report comes in [`QUICK_REPORT_EVERY`], not at the
    /// interval.
    fn keep_reporting_quickly(&self, report: &pb::HealthReport) -> bool {
        let now = tokio::time::Instant::now();
        let mut quick = lock(&self.quick_reports);
        quick.retain(|service, (until, _)| {
            // A service without probes has nothing to wait for.
            let healthy = report
                .probes
                .iter()
                .filter(|probe| probe.service == *service)
                .all(|probe| probe.ok);
            now < *until && !healthy
        });
        !quick.is_empty()
    }

    /// Feeds a report to the offline watch and reverts a service whose policy says so.
    async fn consider_self_revert(
        &self,
        offline_watch: &mut crate::self_revert::Watch,
        services: &[crate::config::ServiceConfig],
        report: &pb::HealthReport,
    ) {
        let offline_since =
            Some(self.offline_since_ms.load(Ordering::SeqCst)).filter(|since| *since != 0);
        for service in services
            .iter()
            .filter(|service| service.self_revert.is_some())
        {
            let failing: Vec<String> = report
                .probes
                .iter()
                .filter(|probe| probe.service == service.name && !probe.ok)
                .map(|probe| format!("{}: {}", probe.probe, probe.detail))
                .collect();
            let failure = (!failing.is_empty()).then(|| failing.join("; "));
            let Some(evidence) =
                offline_watch.observe(service, failure, offline_since, report.at_ms)
            else {
                continue;
            };
            offline_watch.reset(&service.name);
            let host_id = &self.config.host_id;
            let change = match crate::self_revert::last_revertible_change(
                &self.executor,
                service,
                host_id,
            ) {
                Ok(Some(change)) => change,
                Ok(None) => continue,
                Err(error) => {
                    warn!(%error, service = %service.name, "Cannot tell what to self-revert.");
                    continue;
                }
            };
            let still_offline = || self.offline_since_ms.load(Ordering::SeqCst) != 0;
            let reverted = crate::self_revert::revert(
                &self.executor,
                service,
                host_id,
                change,
                evidence,
                offline_since.unwrap_or_default(),
                rewind_shared::time::now_ms(),
                &still_offline,
            )
            .await;
            match reverted {
                Ok(None) => {}
                Ok(Some(record)) => {
                    let live = lock(&self.outbound).clone();
                    if let Some(outbound) = live {
                        let _ = outbound
                            .send(message(agent_message::Body::SelfRevert(record.to_proto())))
                            .await;
                    }
                }
                Err(error) => {
                    warn!(%error, service = %service.name, "Could not record the self-revert.")
                }
            }
        }
    }

    /// Reports kept locally, oldest first.
    pub fn health_history(&self) -> Vec<pb::HealthReport> {
        self.history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// How often a client-cache window's `off` hook is tried before the agent gives up on it.
const CLIENT_CACHE_OFF_ATTEMPTS: u32 = 20;

/// How long an adoption waits, in all, for steps on its services to end: well below the
/// coordinator's 30 s wait for the answer, leaving time to measure and record.
const ADOPT_LOCK_WAIT: Duration = Duration::from_secs(15);

/// Answers an inspect request from the blocking pool (it reads files and runs fact commands).
async fn inspect(executor: &Arc<Executor>, request: pb::InspectRequest) -> pb::InspectAnswer {
    let store = executor.store().clone();
    let services: Vec<_> = executor.services().cloned().collect();
    let mode = request.mode();
    let service = request.service.clone();
    let env_key = request.env_key.clone();
    // Adopting records a new desired state: not while a step works on the service. (Locks are
    // taken in the services' order, as nothing else takes more than one.)
    let mut held = Vec::new();
    if mode == pb::InspectMode::InspectAdopt {
        let deadline = tokio::time::Instant::now() + ADOPT_LOCK_WAIT;
        for name in &services {
            if !service.is_empty() && name.name != service {
                continue;
            }
            // Bounded below the coordinator's 30 s wait for the answer, so nothing is adopted
            // after it gave up (and audited nothing).
            match tokio::time::timeout_at(deadline, executor.lock_service(&name.name)).await {
                Ok(guard) => held.extend(guard),
                Err(_) => {
                    return pb::InspectAnswer {
                        request_id: request.request_id,
                        services: Vec::new(),
                        error: format!(
                            "a step was still running on {} after {} s: nothing was adopted; \
                             try again once it ends",
                            name.name,
                            ADOPT_LOCK_WAIT.as_secs()
                        ),
                    };
                }
            }
        }
    }
    let described = tokio::task::spawn_blocking(move || {
        crate::inspect::inspect(&store, &services, &service, mode, &env_key)
    })
    .await;
    let (services, error) = match described {
        Ok(Ok(services)) => (services, String::new()),
        Ok(Err(error)) => (Vec::new(), error.to_string()),
        Err(error) => (Vec::new(), format!("inspect task failed: {error}")),
    };
    drop(held);
    if mode == pb::InspectMode::InspectAdopt && error.is_empty() {
        executor.desired_changed();
    }
    pb::InspectAnswer {
        request_id: request.request_id,
        services,
        error,
    }
}

async fn forward_health(
    mut latest: watch::Receiver<Option<pb::HealthReport>>,
    drift: watch::Receiver<Vec<pb::ServiceDrift>>,
    outbound: mpsc::Sender<pb::AgentMessage>,
) {
    // A session's first report carries the latest drift, whatever the reports between sessions
    // carried: the coordinator on the other end may never have heard it.
    let mut first = true;
    while latest.changed().await.is_ok() {
        let Some(mut report) = latest.borrow_and_update().clone() else {
            continue;
        };
        if std::mem::take(&mut first) && report.drift.is_empty() {
            report.drift = drift.borrow().clone();
            rewind_shared::bounds::fit_health_report(&mut report);
        }
        // Health is soft state: when the queue is full a report is dropped, never a step result.
        if let Err(mpsc::error::TrySendError::Closed(_)) =
            outbound.try_send(message(agent_message::Body::Health(report)))
        {
            return;
        }
    }
}

/// Dials a member over TLS that accepts only a member's certificate naming `address`'s host.
async fn connect(address: &str, tls: MemberConnector) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .with_context(|| format!("coordinator address {address:?}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    endpoint
        .connect_with_connector(tls)
        .await
        .with_context(|| format!("connect to {address}"))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn message(body: agent_message::Body) -> pb::AgentMessage {
    pb::AgentMessage { body: Some(body) }
}

/// The wait before reconnecting after `failures` failed attempts.
pub fn backoff(failures: u32) -> Duration {
    RECONNECT.delay(failures)
}

/// The wait before the next address after `failures` failed attempts across `addresses`
/// coordinator addresses: it grows once per round through them.
fn round_backoff(failures: u32, addresses: usize) -> Duration {
    let addresses = u32::try_from(addresses.max(1)).unwrap_or(u32::MAX);
    backoff(failures / addresses)
}

/// The span a step's lines are made in: its id, its rollback's (or change's, or schema
/// transaction's) id and its trace, the one the coordinator sent (`traceparent`), or the same
/// derived from the cluster and the step id when an older coordinator sent none.
fn span_of_step(step: &pb::StepCommand) -> tracing::Span {
    use rewind_shared::trace::{TraceParent, of_step, step_span};
    let trace = TraceParent::parse(&step.traceparent)
        .unwrap_or_else(|| of_step(&step.cluster_id, &step.step_id));
    let span = step_span(&step.step_id, &trace);
    span.record("term", step.term);
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_stays_under_the_cap() {
        assert!(backoff(0) <= BACKOFF_BASE);
        assert!(backoff(3) >= BACKOFF_BASE * 4);
        for failures in [10, 20, 1000] {
            let delay = backoff(failures);
            assert!(
                delay >= BACKOFF_CAP / 2 && delay <= BACKOFF_CAP,
                "{delay:?}"
            );
        }
    }

    #[test]
    fn the_backoff_grows_per_round_through_the_addresses() {
        for failures in 0..3 {
            assert!(round_backoff(failures, 3) <= BACKOFF_BASE, "first round");
        }
        assert!(round_backoff(3, 3) > BACKOFF_BASE / 2 && round_backoff(3, 3) <= BACKOFF_BASE * 2);
        assert!(round_backoff(9, 3) >= BACKOFF_BASE * 4);
        assert!(
            round_backoff(3, 1) >= BACKOFF_BASE * 4,
            "one address: as before"
        );
        assert!(
            round_backoff(5, 0) >= BACKOFF_BASE * 8,
            "no address counts as one"
        );
    }
}
