//! Executes step commands exactly once per host.
//!
//! For each step: check the fence (a step from an older coordinator term than one already seen
//! for the same change or rollback is refused), answer from the journal if the step already ran,
//! otherwise journal "started" (flushed), act, journal the outcome (flushed), and answer. Steps on
//! one service run one at a time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rewind_proto::v1::{
    FlagUpdate, SchemaPhase, SchemaStep, StepCommand, StepResult, step_command::Action,
};
use rewind_shared::names::{self, truncate};
use rewind_shared::time::now_ms;
use tracing::{info, warn};

use crate::AgentError;
use crate::catalogue;
use crate::config::{Hook, ServiceConfig};
use crate::host::Host;
use crate::paths::ServiceRoot;
use crate::probes::Prober;
use crate::shard;
use crate::snapshot::{self, ProbeState, RELEASES_DIR};
use crate::store::{JournalRecord, StepOutcome, Store};

/// Longest step id accepted.
const MAX_STEP_ID_BYTES: usize = 512;
/// Bound on a step whose command names no timeout.
const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(300);

pub struct Executor {
    store: Store,
    services: BTreeMap<String, ServiceConfig>,
    host: Arc<dyn Host>,
    prober: Prober,
    service_locks: HashMap<String, tokio::sync::Mutex<()>>,
    in_flight: Mutex<HashSet<String>>,
    /// Per service: coordinator steps hold it shared, a self-revert exclusively, so none of
    /// them runs between the self-revert's steps.
    self_revert_locks: HashMap<String, tokio::sync::RwLock<()>>,
    /// Told when a service's desired state is recorded anew (an activation, a restore, an
    /// adoption): the drift check runs at once rather than report stale drift for a while.
    desired_changed: tokio::sync::Notify,
    /// Told at the same moments, for the watch of managed containers' images.
    releases_changed: tokio::sync::Notify,
}

impl Executor {
    pub fn new(store: Store, services: Vec<ServiceConfig>, host: Arc<dyn Host>) -> Self {
        let service_locks = services
            .iter()
            .map(|service| (service.name.clone(), tokio::sync::Mutex::new(())))
            .collect();
        let self_revert_locks = services
            .iter()
            .map(|service| (service.name.clone(), tokio::sync::RwLock::new(())))
            .collect();
        let services = services
            .into_iter()
            .map(|service| (service.name.clone(), service))
            .collect();
        Self {
            store,
            services,
            host,
            prober: Prober::default(),
            service_locks,
            in_flight: Mutex::new(HashSet::new()),
            self_revert_locks,
            desired_changed: tokio::sync::Notify::new(),
            releases_changed: tokio::sync::Notify::new(),
        }
    }

    /// Says a desired state was recorded anew (see `desired_changed`).
    pub fn desired_changed(&self) {
        self.desired_changed.notify_one();
        self.releases_changed.notify_one();
    }

    /// Resolves once an activation, restore or adoption happened since the last call.
    pub async fn releases_changed_since(&self) {
        self.releases_changed.notified().await;
    }

    /// Resolves once a desired state was recorded anew since the last call.
    pub async fn desired_changed_since(&self) {
        self.desired_changed.notified().await;
    }

    /// Waits for the service's step lock (adopting a service's state must not interleave with
    /// a step on it); `None` for a service this agent does not manage.
    pub async fn lock_service(&self, service: &str) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        Some(self.service_locks.get(service)?.lock().await)
    }

    /// Holds the service's step lock if no step runs on it now (a drift check must not read a
    /// service half-way through a restore); `None` while one runs.
    pub fn try_lock_service(&self, service: &str) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        self.service_locks.get(service)?.try_lock().ok()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceConfig> {
        self.services.values()
    }

    pub fn host(&self) -> &dyn Host {
        self.host.as_ref()
    }

    /// The executor with `prober` in place of the default one (the agent's `[https]`).
    pub fn with_prober(mut self, prober: Prober) -> Self {
        self.prober = prober;
        self
    }

    pub fn prober(&self) -> &Prober {
        &self.prober
    }

    /// Runs a step and returns its result; `None` when the same step is already running here
    /// (its result will be sent when it ends). Waits for a self-revert of the service to end.
    pub async fn execute(&self, command: StepCommand) -> Option<StepResult> {
        let _no_self_revert = match self.self_revert_locks.get(&command.service) {
            Some(lock) => Some(lock.read().await),
            None => None,
        };
        self.execute_unguarded(command).await
    }

    /// Holds off every coordinator step of `service` while the guard lives.
    pub(crate) async fn exclude_coordinator_steps(
        &self,
        service: &str,
    ) -> Option<tokio::sync::RwLockWriteGuard<'_, ()>> {
        match self.self_revert_locks.get(service) {
            Some(lock) => Some(lock.write().await),
            None => None,
        }
    }

    /// [`Executor::execute`] for a self-revert, which holds the service's exclusive guard.
    pub(crate) async fn execute_unguarded(&self, command: StepCommand) -> Option<StepResult> {
        let started_at_ms = now_ms();
        let step_id = command.step_id.clone();
        let refuse = |error: AgentError| StepResult {
            step_id: step_id.clone(),
            ok: false,
            detail: error.to_string(),
            snapshot_id: String::new(),
            started_at_ms,
            finished_at_ms: now_ms(),
            replayed: false,
            schema: None,
        };
        let key = match journal_key(&command) {
            Ok(key) => key,
            Err(error) => return Some(refuse(error)),
        };
        // Claim the step before looking at the journal, so two deliveries racing each other
        // cannot both decide to run it.
        let _claim = self.claim(&key)?;
        if let Err(error) = self.check_fence(&command) {
            return Some(refuse(error));
        }
        let earlier_runs = match self.store.journal(&key) {
            Err(error) => return Some(refuse(error)),
            Ok(Some(JournalRecord {
                outcome: Some(outcome),
                started_at_ms,
                ..
            })) if outcome.ok || !is_retried_after_failure(&command) => {
                info!(step_id, "Step already ran; answering from the journal.");
                return Some(result(&step_id, started_at_ms, outcome, true));
            }
            Ok(Some(JournalRecord {
                outcome: Some(_),
                runs,
                ..
            })) => {
                info!(
                    step_id,
                    "Step failed before; it is safe to run again, so it does."
                );
                runs
            }
            Ok(Some(unfinished)) => {
                warn!(
                    step_id,
                    "Step started before a restart and never ended; running it again (steps are idempotent)."
                );
                unfinished.runs
            }
            Ok(None) => {
                // Only on the first run: a journal record means an earlier run passed this
                // check and may have restored part of the state, which must be finished.
                if let Err(error) = self.refuse_drift(&command).await {
                    return Some(refuse(error));
                }
                0
            }
        };
        let record = JournalRecord {
            step_id: step_id.clone(),
            term: command.term,
            started_at_ms,
            outcome: None,
            runs: earlier_runs + 1,
        };
        if let Err(error) = self.store.put_journal(&key, &record) {
            return Some(refuse(error));
        }
        let acted = self.act(&command).await;
        if matches!(
            command.action,
            Some(Action::Activate(_) | Action::Restore(_))
        ) {
            // After `act` let go of the service's lock: the drift check, woken, can read it.
            self.desired_changed();
        }
        let outcome = match acted {
            Ok(Acted {
                detail,
                snapshot_id,
                schema,
            }) => StepOutcome {
                ok: true,
                detail,
                snapshot_id,
                finished_at_ms: now_ms(),
                schema,
            },
            Err(error) => StepOutcome {
                ok: false,
                detail: error.to_string(),
                snapshot_id: String::new(),
                finished_at_ms: now_ms(),
                schema: None,
            },
        };
        let finished = JournalRecord {
            outcome: Some(outcome.clone()),
            ..record
        };
        if let Err(error) = self.store.put_journal(&key, &finished) {
            warn!(%error, step_id, "Could not journal the step's outcome; a redelivery will run it again.");
        }
        info!(step_id, ok = outcome.ok, detail = %outcome.detail, "Step ended.");
        Some(result(&step_id, started_at_ms, outcome, false))
    }

    /// Refuses a step from an older term than one seen for the same change or rollback, and any
    /// step of a change that a restore on this host has superseded. A restore closes its change.
    fn check_fence(&self, command: &StepCommand) -> Result<(), AgentError> {
        let step_id = &command.step_id;
        let owner = step_id.split('/').next().unwrap_or(step_id);
        let owner_key = fence_key(&command.cluster_id, owner);
        let seen = self.store.raise_fence(&owner_key, command.term)?;
        if seen == CLOSED {
            return Err(AgentError::Superseded {
                step_id: step_id.clone(),
                owner: owner.to_string(),
            });
        }
        if command.term < seen {
            return Err(AgentError::Fenced {
                step_id: step_id.clone(),
                owner: owner.to_string(),
                term: command.term,
                seen,
            });
        }
        if let Some(Action::Restore(restore)) = &command.action
            && !restore.supersedes.is_empty()
        {
            names::validate_name("supersedes", &restore.supersedes)?;
            self.store
                .raise_fence(&fence_key(&command.cluster_id, &restore.supersedes), CLOSED)?;
        }
        Ok(())
    }

    /// Refuses a restore told to refuse drift when the service changed since rewind last put
    /// it there: restoring would wipe a hand-made change without a word.
    async fn refuse_drift(&self, command: &StepCommand) -> Result<(), AgentError> {
        let Some(Action::Restore(restore)) = &command.action else {
            return Ok(());
        };
        if !restore.refuse_drift {
            return Ok(());
        }
        let service = self.service(&command.service)?.clone();
        let store = self.store.clone();
        let lines = blocking(move || crate::drift::since_desired(&store, &service)).await?;
        if lines.is_empty() {
            return Ok(());
        }
        Err(AgentError::refused(
            "drift",
            format!(
                "{} changed since rewind last put it there, and restoring would wipe that: {}. \
                 Nothing was restored. Skip the host, or let the rollback wipe the change \
                 (`rewindctl host adopt`, then resume; or roll back with --overwrite-drift)",
                command.service,
                lines.join("; ")
            ),
        ))
    }

    /// Acts under the service's lock. The work is never abandoned half-way: commands carry
    /// their own timeouts (capped by the step's), and file work runs to completion.
    async fn act(&self, command: &StepCommand) -> Result<Acted, AgentError> {
        let service = self.service(&command.service)?;
        let action = command
            .action
            .as_ref()
            .ok_or_else(|| AgentError::invalid("action", "the step has none"))?;
        let step_timeout = if command.timeout_ms == 0 {
            DEFAULT_STEP_TIMEOUT
        } else {
            Duration::from_millis(command.timeout_ms)
        };
        let lock = &self.service_locks[&service.name];
        let _one_at_a_time = lock.lock().await;
        if let Action::Schema(step) = action {
            let acted = self.act_on_shard(service, command, step).await?;
            let (store, owned) = (self.store.clone(), service.clone());
            if let Err(error) =
                blocking(move || crate::drift::record_schema_version(&store, &owned)).await
            {
                warn!(%error, service = %service.name, "Could not record the schema version as desired; drift may show it.");
            }
            return Ok(acted);
        }
        let acted = |(detail, snapshot_id)| Acted {
            detail,
            snapshot_id,
            schema: None,
        };
        let act = self.act_on(
            service,
            action,
            service.restart_timeout.min(step_timeout),
            &command.step_id,
        );
        if !bounded_by_step_timeout(action) {
            let done = act.await;
            // What rewind left there is rewind's, not a hand-made change: after an activation
            // that succeeded (one whose restart failed recorded it at its switch), and after a
            // restore, even one that failed half-way if it passed the drift guard (there was
            // no hand-made change to adopt by mistake), so the next rollback does not take its
            // own half-done work for drift.
            let restored = match action {
                Action::Restore(restore) => done.is_ok() || restore.refuse_drift,
                Action::Activate(_) => done.is_ok(),
                _ => false,
            };
            if restored {
                self.record_desired(service, &command.step_id).await;
            }
            return done.map(acted);
        }
        // The catalogue's own steps (scale-up waits, checks and purges retry) and a drain
        // (waiting for sessions) are bounded by the step's timeout as a whole; a command still
        // running then is killed.
        tokio::time::timeout(step_timeout, act)
            .await
            .unwrap_or_else(|_| {
                Err(AgentError::refused(
                    "timeout_ms",
                    format!(
                        "did not finish within the step's {} ms and was stopped",
                        step_timeout.as_millis()
                    ),
                ))
            })
            .map(acted)
    }

    /// A schema transaction's step on this host's database (see `shard`). Not cut short by a
    /// timeout: a transaction abandoned half-way is rolled back by PostgreSQL anyway, and one
    /// being prepared must finish or fail, never be left behind by its step.
    async fn act_on_shard(
        &self,
        service: &ServiceConfig,
        command: &StepCommand,
        step: &SchemaStep,
    ) -> Result<Acted, AgentError> {
        let database = service.database.clone().ok_or_else(|| {
            AgentError::refused(
                "database",
                format!(
                    "service {} has no [service.database] on this host: it is not a shard",
                    service.name
                ),
            )
        })?;
        names::validate_name("txn_id", &step.txn_id)?;
        let migrations = step
            .migrations
            .iter()
            .map(|migration| crate::migrate::Migration {
                version: migration.version.clone(),
                checksum: migration.checksum.clone(),
                class: crate::migrate::class_name(migration.class).to_string(),
                up_sql: migration.up_sql.clone(),
                down_sql: migration.down_sql.clone(),
                verify_sql: migration.verify_sql.clone(),
            })
            .collect();
        let shard_step = shard::ShardStep {
            txn_id: step.txn_id.clone(),
            down: step.down,
            migrations,
            commit: step.commit,
            accept_data_loss: step.accept_data_loss,
            by: step.by.clone(),
        };
        let prepared = shard::prepared_name(&command.cluster_id, &step.txn_id);
        let prefix = shard::prepared_prefix(&command.cluster_id);
        let phase = SchemaPhase::try_from(step.phase).unwrap_or(SchemaPhase::Unspecified);
        let store = self.store.clone();
        if phase == SchemaPhase::Unspecified {
            return Err(AgentError::invalid("phase", "the schema step names none"));
        }
        let (detail, report) = blocking(move || {
            let mut connection = shard::open(&database);
            let engine = &mut connection;
            match phase {
                SchemaPhase::Check => shard::check(engine, &shard_step),
                SchemaPhase::Prepare => shard::prepare(engine, &shard_step, &prepared, &store),
                SchemaPhase::Resolve => shard::resolve(engine, &shard_step, &prepared, &store),
                _ => shard::verify(engine, &prefix),
            }
        })
        .await?;
        Ok(Acted {
            detail,
            snapshot_id: String::new(),
            schema: Some(report),
        })
    }

    async fn act_on(
        &self,
        service: &ServiceConfig,
        action: &Action,
        restart_timeout: Duration,
        step_id: &str,
    ) -> Result<(String, String), AgentError> {
        let owner = step_id.split('/').next().unwrap_or_default();
        match action {
            Action::Capture(_) => {
                let probes = self.probe_states(service).await;
                let (store, owned) = (self.store.clone(), service.clone());
                let record =
                    blocking(move || snapshot::capture(&store, &owned, probes, now_ms())).await?;
                let link = record
                    .manifest
                    .release_link
                    .clone()
                    .unwrap_or_else(|| "no release link".into());
                let detail = format!(
                    "captured {} ({link}, {} new bytes, {} ms)",
                    record.id, record.new_bytes, record.capture_ms
                );
                Ok((detail, record.id))
            }
            Action::Activate(activate) if service.manage_container => {
                names::validate_version("version", &activate.version)?;
                if activate.artifact_digest.is_empty() {
                    return Err(AgentError::Refused {
                        field: "artifact_digest".into(),
                        message: format!(
                            "{} is a container: its release {} must be registered with its \
                             image digest (sha256:<image id>)",
                            service.name, activate.version
                        ),
                    });
                }
                let (owned, store, image) = (
                    service.clone(),
                    self.store.clone(),
                    activate.artifact_digest.clone(),
                );
                let name = blocking(move || crate::container::switch_image(&owned, &store, &image))
                    .await?;
                self.store.put_container_version(
                    &service.name,
                    &activate.version,
                    &activate.artifact_digest,
                )?;
                // The container is rewind's now, whatever the restart does.
                self.record_desired(service, step_id).await;
                self.host
                    .run(&service.restart_command, restart_timeout)
                    .await?;
                Ok((
                    format!(
                        "container {name} re-created from {} ({})",
                        activate.artifact_digest, activate.version
                    ),
                    String::new(),
                ))
            }
            Action::Activate(activate) => {
                names::validate_version("version", &activate.version)?;
                let target = format!("{RELEASES_DIR}/{}", activate.version);
                // Missing (or not a real directory): refused by name.
                drop(crate::paths::ServiceRoot::open(service)?.open_release(&target)?);
                if !activate.artifact_digest.is_empty() {
                    // Through the capture's hash cache: the capture just before hashed the
                    // live release, and the next one will hash this one without reading it.
                    let (store, owned, release) =
                        (self.store.clone(), service.clone(), target.clone());
                    let (actual, _) =
                        blocking(move || snapshot::release_digest(&owned, &release, Some(&store)))
                            .await?;
                    if actual != activate.artifact_digest {
                        return Err(AgentError::DigestMismatch {
                            service: service.name.clone(),
                            version: activate.version.clone(),
                            expected: activate.artifact_digest.clone(),
                            actual,
                        });
                    }
                }
                let root = service.root.clone();
                let link_target = target.clone();
                blocking(move || snapshot::switch_link(&root, &link_target)).await?;
                // The link is rewind's now, whatever the restart does.
                self.record_desired(service, step_id).await;
                self.host
                    .run(&service.restart_command, restart_timeout)
                    .await?;
                // Retention after the switch: the release just left is now the last known good.
                let (store, owned) = (self.store.clone(), service.clone());
                let pruned = match blocking(move || crate::retention::prune(&owned, &store)).await {
                    Ok(removed) if removed.is_empty() => String::new(),
                    Ok(removed) => format!("; pruned {}", removed.join(", ")),
                    Err(error) => {
                        warn!(%error, service = %service.name, "Could not prune old releases.");
                        format!("; pruning failed: {error}")
                    }
                };
                Ok((
                    format!("current -> {target}, restarted{pruned}"),
                    String::new(),
                ))
            }
            Action::Restore(restore) => {
                names::validate_name("snapshot_id", &restore.snapshot_id)?;
                let (store, owned, id) = (
                    self.store.clone(),
                    service.clone(),
                    restore.snapshot_id.clone(),
                );
                let record = blocking(move || snapshot::restore(&store, &owned, &id)).await?;
                let container = record
                    .manifest
                    .container
                    .as_ref()
                    .map(|state| format!(", container {} from {}", state.name, state.image))
                    .unwrap_or_default();
                let link = record
                    .manifest
                    .release_link
                    .unwrap_or_else(|| "no release link".into());
                Ok((
                    format!(
                        "restored {} (current -> {link}, {} files{container})",
                        record.id,
                        record.manifest.files.len()
                    ),
                    String::new(),
                ))
            }
            Action::Restart(_) => {
                self.host
                    .run(&service.restart_command, restart_timeout)
                    .await?;
                Ok((
                    format!("ran {}", service.restart_command.join(" ")),
                    String::new(),
                ))
            }
            Action::Drain(_) => {
                self.run_optional_hook(service, "drain", service.drain.as_ref())
                    .await
            }
            Action::Undrain(_) => {
                self.run_optional_hook(service, "undrain", service.undrain.as_ref())
                    .await
            }
            Action::Reload(_) => {
                let argv = service.catalogue.reload_command.as_ref().ok_or_else(|| {
                    AgentError::refused(
                        "reload-command",
                        format!(
                            "service {} has no reload-command on this host",
                            service.name
                        ),
                    )
                })?;
                self.host.run(argv, restart_timeout).await?;
                Ok((format!("ran {}", argv.join(" ")), String::new()))
            }
            Action::Run(run) => {
                let (argv, timeout) = catalogue::render_command(service, &run.name, &run.args)?;
                self.host.run(&argv, timeout).await?;
                Ok((format!("ran {}", argv.join(" ")), String::new()))
            }
            Action::PauseJobs(_) => {
                let done =
                    catalogue::pause_jobs(self.host(), &self.prober, &self.store, service, owner)
                        .await?;
                Ok((done, String::new()))
            }
            Action::ResumeJobs(_) => {
                let done =
                    catalogue::resume_jobs(self.host(), &self.prober, &self.store, service, owner)
                        .await?;
                Ok((done, String::new()))
            }
            Action::PurgeCache(_) => Ok((
                catalogue::purge(&self.prober, service).await?,
                String::new(),
            )),
            Action::ScaleUp(_) => Ok((
                catalogue::scale_up(self.host(), &self.prober, service).await?,
                String::new(),
            )),
            Action::Checks(_) => Ok((
                catalogue::run_checks(&self.prober, service).await?,
                String::new(),
            )),
            Action::Reconcile(_) => Ok((
                catalogue::reconcile(self.host(), &self.prober, service).await?,
                String::new(),
            )),
            Action::ClearClientCaches(_) => Ok((
                catalogue::clear_client_caches(
                    self.host(),
                    &self.prober,
                    &self.store,
                    service,
                    now_ms(),
                )
                .await?,
                String::new(),
            )),
            // Taken by `act` to `act_on_shard` before this is reached.
            Action::Schema(_) => Err(AgentError::invalid(
                "action",
                "a schema step reached the service step path",
            )),
        }
    }

    /// Records what an activation or a restore just put on the service as its desired state
    /// (see `drift`). A failure to record does not fail the step, which is done: drift is then
    /// measured against the state before, and the log says why.
    async fn record_desired(&self, service: &ServiceConfig, step_id: &str) {
        let (store, owned, set_by) = (self.store.clone(), service.clone(), step_id.to_string());
        let recorded =
            blocking(move || crate::drift::record_desired(&store, &owned, &set_by, now_ms())).await;
        if let Err(error) = recorded {
            warn!(%error, service = %service.name, step_id, "Could not record the desired state; drift is measured against the one before.");
        }
    }

    /// Runs a drain or undrain hook, then waits its grace period. No hook: nothing to do.
    async fn run_optional_hook(
        &self,
        service: &ServiceConfig,
        what: &str,
        hook: Option<&Hook>,
    ) -> Result<(String, String), AgentError> {
        let Some(hook) = hook else {
            return Ok((
                format!(
                    "no {what} hook configured for {}: nothing to {what}",
                    service.name
                ),
                String::new(),
            ));
        };
        let done = catalogue::run_hook(self.host(), &self.prober, service, what, hook).await?;
        Ok((done, String::new()))
    }

    async fn probe_states(&self, service: &ServiceConfig) -> Vec<ProbeState> {
        let mut states = Vec::with_capacity(service.probes.len());
        for probe in &service.probes {
            let result = self
                .prober
                .probe(self.host.as_ref(), &service.name, probe)
                .await;
            states.push(ProbeState {
                probe: result.probe,
                ok: result.ok,
            });
        }
        states
    }

    /// Sets one flag in the service's flags file (a JSON object of booleans), atomically.
    pub fn set_flag(&self, update: &FlagUpdate) -> Result<(), AgentError> {
        names::validate_name("flag", &update.flag)?;
        let (root, relative) = self.flags_file(&update.service)?;
        // Read without following a link or opening a FIFO: it runs on the session's loop.
        let mut flags: BTreeMap<String, bool> =
            match root.read_regular(relative, crate::paths::MAX_SERVICE_FILE_BYTES)? {
                Some((bytes, _)) => serde_json::from_slice(&bytes).map_err(|error| {
                    AgentError::invalid(
                        "flags-file",
                        format!(
                            "flags file {} is not a JSON object of booleans: {error}",
                            root.path().join(relative).display()
                        ),
                    )
                })?,
                None => BTreeMap::new(),
            };
        flags.insert(update.flag.clone(), update.enabled);
        write_flags(&root, relative, &flags)
    }

    /// Replaces the service's flags file with exactly `flags`, atomically.
    pub fn replace_flags(
        &self,
        service: &str,
        flags: &std::collections::HashMap<String, bool>,
    ) -> Result<(), AgentError> {
        for name in flags.keys() {
            names::validate_name("flag", name)?;
        }
        let (root, relative) = self.flags_file(service)?;
        let sorted: BTreeMap<&String, &bool> = flags.iter().collect();
        write_flags(&root, relative, &sorted)
    }

    /// The service's root, opened, and its flags file's path within it.
    fn flags_file(&self, service: &str) -> Result<(ServiceRoot, &str), AgentError> {
        let service = self.service(service)?;
        let relative = service.flags_file.as_deref().ok_or_else(|| {
            AgentError::invalid(
                "flags-file",
                format!("service {} has no flags-file configured", service.name),
            )
        })?;
        Ok((ServiceRoot::open(service)?, relative))
    }

    fn service(&self, name: &str) -> Result<&ServiceConfig, AgentError> {
        self.services
            .get(name)
            .ok_or_else(|| AgentError::UnknownService {
                service: truncate(name, 128).to_string(),
                known: self.services.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    /// Marks the step as running here; `None` if it already is. The claim ends when dropped.
    fn claim(&self, key: &str) -> Option<Claim<'_>> {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        in_flight.insert(key.to_string()).then(|| Claim {
            in_flight: &self.in_flight,
            key: key.to_string(),
        })
    }
}

struct Claim<'a> {
    in_flight: &'a Mutex<HashSet<String>>,
    key: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.key);
    }
}

/// Fence value of a change superseded by a restore: no term is ever that high.
const CLOSED: u64 = u64::MAX;

/// Step ids are unique within one coordinator cluster, so the journal is keyed by both.
fn write_flags(
    root: &ServiceRoot,
    relative: &str,
    flags: &impl serde::Serialize,
) -> Result<(), AgentError> {
    let bytes = serde_json::to_vec_pretty(flags)
        .map_err(|error| AgentError::invalid("flags", error.to_string()))?;
    root.write_atomically(relative, &bytes, 0o644, None)
}

/// Steps of the optional catalogue, bounded as a whole by the step's timeout.
/// Steps run again when asked again after they failed, instead of answering the failure from
/// the journal: a schema transaction's check, resolve and verify are idempotent, and a resolve
/// must eventually succeed (a prepared transaction holds its locks until then).
fn is_retried_after_failure(command: &StepCommand) -> bool {
    matches!(
        &command.action,
        Some(Action::Schema(step)) if step.phase != SchemaPhase::Prepare as i32
    )
}

/// The catalogue's own steps, and a drain (which may wait for sessions): cut at the step's
/// timeout as a whole, so the coordinator never retries one the agent is still running.
fn bounded_by_step_timeout(action: &Action) -> bool {
    matches!(
        action,
        Action::Drain(_)
            | Action::Run(_)
            | Action::PauseJobs(_)
            | Action::ResumeJobs(_)
            | Action::PurgeCache(_)
            | Action::ScaleUp(_)
            | Action::Checks(_)
            | Action::Reconcile(_)
            | Action::ClearClientCaches(_)
    )
}

fn journal_key(command: &StepCommand) -> Result<String, AgentError> {
    let step_id = &command.step_id;
    if step_id.is_empty()
        || step_id.len() > MAX_STEP_ID_BYTES
        || !step_id.chars().all(|c| c.is_ascii_graphic())
    {
        return Err(AgentError::invalid(
            "step_id",
            format!("{:?} is not a valid step id", truncate(step_id, 64)),
        ));
    }
    if !command.cluster_id.is_empty() {
        names::validate_name("cluster_id", &command.cluster_id)?;
    }
    Ok(fence_key(&command.cluster_id, step_id))
}

fn fence_key(cluster_id: &str, name: &str) -> String {
    format!(
        "{}/{name}",
        if cluster_id.is_empty() {
            "-"
        } else {
            cluster_id
        }
    )
}

fn result(step_id: &str, started_at_ms: u64, outcome: StepOutcome, replayed: bool) -> StepResult {
    StepResult {
        step_id: step_id.to_string(),
        ok: outcome.ok,
        detail: outcome.detail,
        snapshot_id: outcome.snapshot_id,
        started_at_ms,
        finished_at_ms: outcome.finished_at_ms,
        replayed,
        schema: outcome.schema,
    }
}

/// What a step did, when it succeeded.
struct Acted {
    detail: String,
    /// Set by a capture.
    snapshot_id: String,
    /// Set by a schema step.
    schema: Option<rewind_proto::v1::ShardReport>,
}

/// File-system work runs on the blocking pool, off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| AgentError::invalid("step", format!("step task failed: {error}")))?
}

#[cfg(test)]
#[path = "steps_test.rs"]
mod tests;
