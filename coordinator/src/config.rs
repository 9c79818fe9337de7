//! Coordinator configuration: TOML file -> [`RawConfig`] -> `validate()` -> [`Config`].
//!
//! Precedence: defaults < file < `REWIND_*` environment < flags (the binary applies the last two).
//!
//! Kept in one file (over 700 lines): the whole config file's schema, defaults and checks, section
//! by section, so the README's table and the code compare in one read.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rewind_shared::config::{Problems, load_toml};
use rewind_shared::tls::TlsFiles;
use serde::Deserialize;

use rewind_shared::outbound::{HttpsFiles, HttpsTrust};

use crate::engine::EngineLimits;

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub tls: Option<TlsFiles>,
    pub engine: RawEngine,
    pub health: RawHealth,
    pub storage: RawStorage,
    pub cluster: RawCluster,
    pub escalation: RawEscalation,
    pub incidents: RawIncidents,
    pub throttle: RawThrottle,
    pub http: RawHttp,
    pub alertmanager: RawAlertmanager,
    pub access: RawAccess,
    pub issuer: RawIssuer,
    pub audit: RawAudit,
    /// How health gates' synthetic checks reach https:// URLs.
    pub synthetics: HttpsFiles,
}

// `[escalation]`, `[incidents]` and `[alertmanager]` write out the three TLS keys beside
// their URL.
rewind_shared::https_files_of!(RawAlertmanager, RawEscalation, RawIncidents);

/// `[audit]`: how long archived audit entries stay in the cluster. Off unless set; the
/// leader's applies, so set it alike on every member. Nothing is dropped that no confirmed
/// export covers (`rewindctl audit archived`).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawAudit {
    /// Archived entries older than this many days go.
    pub retain_days: Option<u64>,
    /// The newest this many entries stay, archived or not.
    pub retain_entries: Option<u64>,
    /// How often this member re-verifies the chain it holds, for `rewind_audit_chain_ok`
    /// (default 300, at most 3600; 0: never).
    pub verify_every_s: Option<u64>,
}

/// The issuing CA this member signs joins and renewals with (an intermediate of the cluster's
/// root CA; its key lives only on the members). Without it, this member refuses joins.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawIssuer {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// How long issued certificates are valid, e.g. "14d", "12h".
    pub agent_lifetime: Option<String>,
    pub user_lifetime: Option<String>,
    pub automation_lifetime: Option<String>,
    pub member_lifetime: Option<String>,
}

/// The issuing CA, loaded, and the lifetimes it issues.
#[derive(Clone)]
pub struct IssuerConfig {
    pub issuing: Arc<rewind_shared::pki::IssuingCa>,
    pub lifetimes: rewind_shared::pki::Lifetimes,
}

impl std::fmt::Debug for IssuerConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("IssuerConfig")
            .field("lifetimes", &self.lifetimes)
            .finish_non_exhaustive()
    }
}

/// Who may do what (see `crate::access`).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawAccess {
    /// The policy a new cluster starts with: applied by the first leader while the cluster has
    /// none, ignored after. Without one, a new cluster refuses every person until a member that
    /// has one leads.
    pub bootstrap_policy_file: Option<PathBuf>,
    /// Accept certificates without a `rewind://` identity, taken as the kind each service
    /// expects (as before kinds existed). For one release, to upgrade and re-enroll; logged.
    pub legacy_certificates: bool,
    /// The automation identity Alertmanager's notifications act as (`automation:<name>`): the
    /// policy must let it operate where it asks for rollbacks. Default `alertmanager`.
    pub alertmanager_identity: Option<String>,
    /// The automation identity signed webhooks act as. Default `webhook`.
    pub webhook_identity: Option<String>,
}

#[derive(Clone, Debug)]
pub struct AccessConfig {
    pub bootstrap_policy: Option<crate::access::Policy>,
    pub legacy_certificates: bool,
    pub alertmanager_identity: String,
    pub webhook_identity: String,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            bootstrap_policy: None,
            legacy_certificates: false,
            alertmanager_identity: "alertmanager".into(),
            webhook_identity: "webhook".into(),
        }
    }
}

/// The HTTP edge: /metrics and the monitoring webhooks. Off unless `listen` is set.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawHttp {
    pub listen: Option<String>,
    /// Bearer token Alertmanager sends (its `http_config.authorization.credentials_file`).
    pub alertmanager_token_file: Option<PathBuf>,
    /// HMAC secret generic webhooks are signed with.
    pub webhook_secret_file: Option<PathBuf>,
    /// The web view's viewers: their names, groups and the SHA-256 of their tokens.
    pub viewer_tokens_file: Option<PathBuf>,
}

#[derive(Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub alertmanager_token: Option<Vec<u8>>,
    pub webhook_secret: Option<Vec<u8>>,
    /// The web view's viewers; None: the web view is off.
    pub viewers: Option<std::sync::Arc<crate::http::view::Viewers>>,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field(
                "alertmanager_token",
                &self.alertmanager_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "viewers",
                &self.viewers.as_ref().map(|viewers| viewers.len()),
            )
            .finish()
    }
}

/// The Alertmanager rewind silences alerts in while a rollback runs.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawAlertmanager {
    /// Base URL, e.g. http://127.0.0.1:9093 or https://alertmanager.internal:9093; silences
    /// are off without it.
    pub url: Option<String>,
    /// How long each silence lasts; it is renewed while the rollback runs.
    pub silence_lease_s: Option<u64>,
    /// PEM certificates an https:// server's chain may end in, besides the system's store and
    /// Mozilla's roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to a server that asks for one (mutual TLS).
    pub client_cert_file: Option<PathBuf>,
    /// Its PEM private key.
    pub client_key_file: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct AlertmanagerConfig {
    pub url: String,
    pub silence_lease: Duration,
    pub tls: HttpsTrust,
}

/// Bounds on automatic rollbacks; see `ThrottleLimits`.
#[derive(Debug, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawThrottle {
    pub budget: u32,
    pub budget_window_s: u32,
    pub cooldown_s: u32,
    pub flap_rollbacks: u32,
    pub flap_window_s: u32,
    pub breaker_services: u32,
    pub breaker_window_s: u32,
}

impl Default for RawThrottle {
    fn default() -> Self {
        let limits = crate::state_machine::ThrottleLimits::default();
        Self {
            budget: limits.budget,
            budget_window_s: limits.budget_window_s,
            cooldown_s: limits.cooldown_s,
            flap_rollbacks: limits.flap_rollbacks,
            flap_window_s: limits.flap_window_s,
            breaker_services: limits.breaker_services,
            breaker_window_s: limits.breaker_window_s,
        }
    }
}

impl RawThrottle {
    fn limits(&self) -> crate::state_machine::ThrottleLimits {
        crate::state_machine::ThrottleLimits {
            budget: self.budget,
            budget_window_s: self.budget_window_s,
            cooldown_s: self.cooldown_s,
            flap_rollbacks: self.flap_rollbacks,
            flap_window_s: self.flap_window_s,
            breaker_services: self.breaker_services,
            breaker_window_s: self.breaker_window_s,
        }
    }

    fn check(&self, problems: &mut Problems) {
        let week = 7 * 86_400;
        for (field, value, min, max) in [
            ("throttle.budget", self.budget, 1, 10_000),
            ("throttle.budget-window-s", self.budget_window_s, 1, week),
            ("throttle.cooldown-s", self.cooldown_s, 0, week),
            ("throttle.flap-rollbacks", self.flap_rollbacks, 1, 1000),
            ("throttle.flap-window-s", self.flap_window_s, 1, week),
            (
                "throttle.breaker-services",
                self.breaker_services,
                2,
                10_000,
            ),
            (
                "throttle.breaker-window-s",
                self.breaker_window_s,
                1,
                86_400,
            ),
        ] {
            check_range(problems, field, u64::from(value), min, max);
        }
    }
}

/// Where a paused rollback calls for a person: a webhook signed with HMAC-SHA256.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawEscalation {
    /// http:// or https:// URL that receives a JSON POST per escalation.
    pub webhook_url: Option<String>,
    /// File holding the shared secret the signature is made with (at least 16 bytes).
    pub secret_file: Option<PathBuf>,
    /// PEM certificates an https:// server's chain may end in, besides the system's store and
    /// Mozilla's roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to a server that asks for one (mutual TLS).
    pub client_cert_file: Option<PathBuf>,
    /// Its PEM private key.
    pub client_key_file: Option<PathBuf>,
}

/// `[incidents]`: where an incident system hears of incidents (trigger when a rollback starts,
/// acknowledge when a person acts on it, resolve when it succeeds).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawIncidents {
    /// http:// or https:// URL that receives a JSON POST per event.
    pub webhook_url: Option<String>,
    /// PEM certificates an https:// server's chain may end in, besides the system's store and
    /// Mozilla's roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to a server that asks for one (mutual TLS).
    pub client_cert_file: Option<PathBuf>,
    /// Its PEM private key.
    pub client_key_file: Option<PathBuf>,
    /// File holding the shared secret the signature is made with (at least 16 bytes).
    pub secret_file: Option<PathBuf>,
    /// `pagerduty` (Events API v2) or `json`.
    pub format: Option<String>,
    /// `pagerduty`: file holding the integration's routing key.
    pub routing_key_file: Option<PathBuf>,
    /// Environment -> PagerDuty severity (critical, error, warning, info). Unlisted: critical
    /// for `prod` and `production`, warning otherwise.
    pub severity: BTreeMap<String, String>,
}

/// The severities PagerDuty's Events API v2 accepts, gravest first.
pub const SEVERITIES: [&str; 4] = ["critical", "error", "warning", "info"];

#[derive(Clone)]
pub struct IncidentWebhookConfig {
    pub url: String,
    pub secret: Vec<u8>,
    /// How an https:// receiver is trusted and what this member presents to it.
    pub tls: HttpsTrust,
    pub format: IncidentFormat,
    pub severity: BTreeMap<String, String>,
}

#[derive(Clone)]
pub enum IncidentFormat {
    PagerDuty { routing_key: String },
    Json,
}

impl IncidentWebhookConfig {
    /// The gravest severity of `environments` (warning without one).
    pub fn severity_of<'a>(
        &self,
        environments: impl IntoIterator<Item = &'a String>,
    ) -> &'static str {
        let rank = |environment: &String| -> usize {
            let named = match self.severity.get(environment) {
                Some(severity) => severity.as_str(),
                None if matches!(environment.as_str(), "prod" | "production") => "critical",
                None => "warning",
            };
            SEVERITIES
                .iter()
                .position(|severity| *severity == named)
                .unwrap_or(2)
        };
        let gravest = environments.into_iter().map(rank).min().unwrap_or(2);
        SEVERITIES[gravest]
    }
}

impl std::fmt::Debug for IncidentWebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let format = match self.format {
            IncidentFormat::PagerDuty { .. } => "pagerduty",
            IncidentFormat::Json => "json",
        };
        f.debug_struct("IncidentWebhookConfig")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("format", &format)
            .field("severity", &self.severity)
            .finish()
    }
}

#[derive(Clone)]
pub struct EscalationConfig {
    pub webhook_url: String,
    pub secret: Vec<u8>,
    /// How an https:// receiver is trusted and what this member presents to it.
    pub tls: HttpsTrust,
}

impl std::fmt::Debug for EscalationConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EscalationConfig")
            .field("webhook_url", &self.webhook_url)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Membership at bootstrap. Every founding member lists the same members; later changes are
/// Raft configuration changes, and the stored membership wins over this list on restart.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawCluster {
    /// Names the cluster; agents journal steps per cluster. Generated for a dev cluster.
    pub id: Option<String>,
    /// This member's id; must be one of `member`.
    pub member_id: Option<u64>,
    #[serde(rename = "member")]
    pub members: Vec<RawMember>,
    pub tick_ms: Option<u64>,
    pub election_ticks: Option<usize>,
    /// Join a running cluster instead of founding one: `member` lists this member and every
    /// current member; the cluster adds it with `rewindctl cluster add`.
    pub join: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawMember {
    pub id: u64,
    /// host:port other members, agents and rewindctl dial.
    pub address: String,
    pub region: String,
    /// Common name of the member's certificate (default `coordinator-<id>`).
    pub name: Option<String>,
}

/// A member as configured; the same record the replicated registry holds.
pub use crate::state_machine::MemberRecord as Member;

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub id: Option<String>,
    pub member_id: u64,
    pub members: Vec<Member>,
    pub tick: Duration,
    pub election_ticks: usize,
    /// Wait to be added by a running cluster rather than bootstrap one.
    pub join: bool,
}

impl ClusterConfig {
    pub fn member(&self, id: u64) -> Option<&Member> {
        self.members.iter().find(|member| member.id == id)
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawEngine {
    pub step_timeout_s: u64,
    pub max_attempts: u32,
    pub verify_timeout_s: u64,
    pub default_max_parallel: u32,
    pub tick_ms: u64,
    /// Health gate after each wave, for rollbacks that do not set their own.
    pub gate_settle_s: u32,
    pub gate_timeout_s: u32,
    pub gate_tolerance: f64,
    pub gate_latency_tolerance: f64,
}

impl Default for RawEngine {
    fn default() -> Self {
        let gate = crate::state_machine::GateOptions::default();
        Self {
            step_timeout_s: 60,
            max_attempts: 3,
            verify_timeout_s: 60,
            default_max_parallel: 1,
            tick_ms: 250,
            gate_settle_s: gate.settle_s,
            gate_timeout_s: gate.timeout_s,
            gate_tolerance: gate.tolerance,
            gate_latency_tolerance: gate.latency_tolerance,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawHealth {
    pub report_interval_ms: u64,
    pub window_s: u64,
    /// A plaintext port serving `grpc.health.v1.Health` alone, for Kubernetes' gRPC probes
    /// (which cannot speak TLS); off unless set.
    pub probe_listen: Option<String>,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            report_interval_ms: 2000,
            window_s: 30,
            probe_listen: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawStorage {
    pub snapshot_every: u64,
    /// The cluster version a new cluster is founded at (0: this binary's). An older one for a
    /// cluster that must take members of an older release before it is raised, and for the
    /// benchmark that compares versions. Ignored once the cluster exists.
    pub initial_cluster_version: u32,
}

impl Default for RawStorage {
    fn default() -> Self {
        Self {
            snapshot_every: 10_000,
            initial_cluster_version: 0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tls: TlsFiles,
    pub limits: EngineLimits,
    pub tick: Duration,
    pub health_interval_ms: u64,
    pub health_window_ms: u64,
    pub snapshot_every: u64,
    /// The cluster version a new cluster is founded at.
    pub initial_cluster_version: u32,
    pub cluster: ClusterConfig,
    pub escalation: Option<EscalationConfig>,
    pub incidents: Option<IncidentWebhookConfig>,
    pub http: Option<HttpConfig>,
    pub alertmanager: Option<AlertmanagerConfig>,
    pub access: AccessConfig,
    pub issuer: Option<IssuerConfig>,
    /// How the synthetic checks of health gates reach https:// URLs.
    pub synthetics_tls: HttpsTrust,
    /// Where plaintext gRPC health checks are served (`health.probe-listen`); `None`: nowhere.
    pub probe_listen: Option<SocketAddr>,
    /// How often this member re-verifies its audit chain; `None`: never.
    pub audit_verify_every: Option<Duration>,
    /// What is allowed but unwise (plain http:// carrying a secret): logged at start, printed
    /// by `check-config`.
    pub warnings: Vec<String>,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";

impl RawConfig {
    /// Loads a file; unknown keys are returned for the caller to warn about (or reject).
    pub fn load(path: &Path) -> Result<(Self, Vec<String>), rewind_shared::SharedError> {
        let loaded = load_toml(path)?;
        Ok((loaded.value, loaded.unknown_keys))
    }

    /// Checks everything and reports every problem at once.
    pub fn validate(self) -> Result<Config, Vec<String>> {
        let mut problems = Problems::default();
        let listen_text = self.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = listen_text
            .parse::<SocketAddr>()
            .map_err(|error| problems.add("listen", format!("{listen_text:?}: {error}")))
            .ok();
        if self.data_dir.is_none() {
            problems.add("data-dir", "is required (or use --dev)");
        }
        if self.tls.is_none() {
            problems.add("tls", "is required: ca, cert and key files (or use --dev)");
        }
        let engine = &self.engine;
        check_range(
            &mut problems,
            "engine.step-timeout-s",
            engine.step_timeout_s,
            1,
            3600,
        );
        check_range(
            &mut problems,
            "engine.max-attempts",
            u64::from(engine.max_attempts),
            1,
            10,
        );
        check_range(
            &mut problems,
            "engine.verify-timeout-s",
            engine.verify_timeout_s,
            1,
            3600,
        );
        check_range(
            &mut problems,
            "engine.default-max-parallel",
            u64::from(engine.default_max_parallel),
            1,
            1000,
        );
        check_range(&mut problems, "engine.tick-ms", engine.tick_ms, 10, 10_000);
        check_range(
            &mut problems,
            "engine.gate-settle-s",
            u64::from(engine.gate_settle_s),
            1,
            3600,
        );
        check_range(
            &mut problems,
            "engine.gate-timeout-s",
            u64::from(engine.gate_timeout_s),
            u64::from(engine.gate_settle_s),
            86_400,
        );
        if !(0.0..=10.0).contains(&engine.gate_latency_tolerance) {
            problems.add(
                "engine.gate-latency-tolerance",
                format!(
                    "is {}, must be within 0..=10 (a fraction: 0.25 is 25 % above the baseline)",
                    engine.gate_latency_tolerance
                ),
            );
        }
        if !(0.0..=1.0).contains(&engine.gate_tolerance) {
            problems.add(
                "engine.gate-tolerance",
                format!("is {}, must be within 0..=1", engine.gate_tolerance),
            );
        }
        let escalation = validate_escalation(&self.escalation, &mut problems);
        let incidents = validate_incidents(&self.incidents, &mut problems);
        let http = validate_http(&self.http, &mut problems);
        let alertmanager = validate_alertmanager(&self.alertmanager, &mut problems);
        let synthetics_tls = self.synthetics.load_noting("synthetics", &mut problems);
        let probe_listen = self.health.probe_listen.as_ref().and_then(|text| {
            text.parse::<SocketAddr>()
                .map_err(|error| problems.add("health.probe-listen", format!("{text:?}: {error}")))
                .ok()
        });
        let audit_verify_every_s = self.audit.verify_every_s.unwrap_or(300);
        // At most an hour: the shipped alert calls an hour without a verification a problem.
        if audit_verify_every_s != 0 && !(10..=3_600).contains(&audit_verify_every_s) {
            problems.add(
                "audit.verify-every-s",
                format!("is {audit_verify_every_s}, must be 0 (never) or within 10..=3600"),
            );
        }
        let warnings = incidents
            .iter()
            .filter(|incidents| matches!(incidents.format, IncidentFormat::PagerDuty { .. }))
            .filter_map(|incidents| {
                rewind_shared::outbound::plain_http_warning(
                    "incidents.webhook-url",
                    &incidents.url,
                    "the PagerDuty routing key",
                )
            })
            .collect();
        let access = validate_access(&self.access, &mut problems);
        let issuer = validate_issuer(&self.issuer, &mut problems);
        self.throttle.check(&mut problems);
        check_range(
            &mut problems,
            "health.report-interval-ms",
            self.health.report_interval_ms,
            100,
            60_000,
        );
        check_range(
            &mut problems,
            "health.window-s",
            self.health.window_s,
            1,
            3600,
        );
        check_range(
            &mut problems,
            "storage.snapshot-every",
            self.storage.snapshot_every,
            10,
            1_000_000,
        );
        let current = crate::state_machine::version::CURRENT;
        if self.storage.initial_cluster_version != 0 {
            check_range(
                &mut problems,
                "storage.initial-cluster-version",
                u64::from(self.storage.initial_cluster_version),
                // Not 1: the legacy log, whose members skip what they cannot read.
                u64::from(crate::state_machine::version::LEGACY + 1),
                u64::from(current),
            );
        }
        let cluster = validate_cluster(&self.cluster, &mut problems);
        if let Some(days) = self.audit.retain_days {
            check_range(&mut problems, "audit.retain-days", days, 1, 36_500);
        }
        if let Some(entries) = self.audit.retain_entries {
            check_range(&mut problems, "audit.retain-entries", entries, 1, 1 << 40);
        }
        problems.into_result()?;
        let (Some(listen), Some(data_dir), Some(tls), Some(cluster)) =
            (listen, self.data_dir, self.tls, cluster)
        else {
            unreachable!("missing values were reported as problems");
        };
        Ok(Config {
            listen,
            data_dir,
            tls,
            limits: EngineLimits {
                step_timeout_ms: engine.step_timeout_s * 1000,
                max_attempts: engine.max_attempts,
                verify_timeout_ms: engine.verify_timeout_s * 1000,
                report_interval_ms: self.health.report_interval_ms,
                default_max_parallel: engine.default_max_parallel,
                default_gate: crate::state_machine::GateOptions {
                    settle_s: engine.gate_settle_s,
                    settle_ms: 0,
                    timeout_s: engine.gate_timeout_s,
                    tolerance: engine.gate_tolerance,
                    latency_tolerance: engine.gate_latency_tolerance,
                },
                escalation_webhook: escalation.is_some(),
                incident_webhook: incidents.is_some(),
                throttle: self.throttle.limits(),
                audit_retention: crate::state_machine::AuditRetention {
                    days: self.audit.retain_days,
                    entries: self.audit.retain_entries,
                },
            },
            tick: Duration::from_millis(engine.tick_ms),
            health_interval_ms: self.health.report_interval_ms,
            health_window_ms: self.health.window_s * 1000,
            snapshot_every: self.storage.snapshot_every,
            initial_cluster_version: match self.storage.initial_cluster_version {
                0 => current,
                version => version,
            },
            cluster,
            escalation,
            incidents,
            http,
            alertmanager,
            access,
            issuer,
            synthetics_tls,
            probe_listen,
            audit_verify_every: (audit_verify_every_s != 0)
                .then(|| Duration::from_secs(audit_verify_every_s)),
            warnings,
        })
    }
}

fn validate_issuer(raw: &RawIssuer, problems: &mut Problems) -> Option<IssuerConfig> {
    let defaults = rewind_shared::pki::Lifetimes::default();
    let mut lifetime = |field: &str, value: &Option<String>, default: u64| match value {
        Some(text) => humantime::parse_duration(text)
            .map(|duration| duration.as_secs())
            .map_err(|error| problems.add(field, format!("{text:?}: {error} (e.g. \"14d\")")))
            .unwrap_or(default),
        None => default,
    };
    let lifetimes = rewind_shared::pki::Lifetimes {
        agent_s: lifetime(
            "issuer.agent-lifetime",
            &raw.agent_lifetime,
            defaults.agent_s,
        ),
        user_s: lifetime("issuer.user-lifetime", &raw.user_lifetime, defaults.user_s),
        automation_s: lifetime(
            "issuer.automation-lifetime",
            &raw.automation_lifetime,
            defaults.automation_s,
        ),
        member_s: lifetime(
            "issuer.member-lifetime",
            &raw.member_lifetime,
            defaults.member_s,
        ),
    };
    if let Err(found) = lifetimes.validate() {
        for problem in found {
            problems.add_error(problem);
        }
    }
    match (&raw.cert, &raw.key) {
        (None, None) => None,
        (Some(cert), Some(key)) => match rewind_shared::pki::IssuingCa::load(cert, key) {
            Ok(issuing) => Some(IssuerConfig {
                issuing: Arc::new(issuing),
                lifetimes,
            }),
            Err(error) => {
                problems.add("issuer.cert", error.to_string());
                None
            }
        },
        (Some(_), None) => {
            problems.add("issuer.key", "is required with issuer.cert");
            None
        }
        (None, Some(_)) => {
            problems.add("issuer.cert", "is required with issuer.key");
            None
        }
    }
}

fn validate_access(raw: &RawAccess, problems: &mut Problems) -> AccessConfig {
    let bootstrap_policy = raw.bootstrap_policy_file.as_ref().and_then(|path| {
        let field = "access.bootstrap-policy-file";
        let text = std::fs::read_to_string(path)
            .map_err(|error| problems.add(field, format!("{}: {error}", path.display())))
            .ok()?;
        crate::access::Policy::from_toml(&text)
            .map_err(|found| {
                for problem in found {
                    problems.add(field, format!("{}: {problem}", path.display()));
                }
            })
            .ok()
    });
    let defaults = AccessConfig::default();
    let mut automation = |field: &str, value: &Option<String>, default: String| match value {
        Some(name) => {
            if let Err(error) = rewind_shared::names::validate_name(field, name) {
                problems.add_error(error);
            }
            name.clone()
        }
        None => default,
    };
    let alertmanager_identity = automation(
        "access.alertmanager-identity",
        &raw.alertmanager_identity,
        defaults.alertmanager_identity,
    );
    let webhook_identity = automation(
        "access.webhook-identity",
        &raw.webhook_identity,
        defaults.webhook_identity,
    );
    AccessConfig {
        bootstrap_policy,
        legacy_certificates: raw.legacy_certificates,
        alertmanager_identity,
        webhook_identity,
    }
}

fn validate_http(raw: &RawHttp, problems: &mut Problems) -> Option<HttpConfig> {
    let Some(listen_text) = &raw.listen else {
        if raw.alertmanager_token_file.is_some() || raw.webhook_secret_file.is_some() {
            problems.add("http.listen", "is required for the webhook receivers");
        }
        if raw.viewer_tokens_file.is_some() {
            problems.add("http.listen", "is required for the web view");
        }
        return None;
    };
    let listen = listen_text
        .parse::<SocketAddr>()
        .map_err(|error| problems.add("http.listen", format!("{listen_text:?}: {error}")))
        .ok();
    let alertmanager_token = raw
        .alertmanager_token_file
        .as_ref()
        .and_then(|path| read_secret("http.alertmanager-token-file", path, problems));
    let webhook_secret = raw
        .webhook_secret_file
        .as_ref()
        .and_then(|path| read_secret("http.webhook-secret-file", path, problems));
    let viewers = raw.viewer_tokens_file.as_ref().and_then(|path| {
        crate::http::view::Viewers::load(path)
            .map(std::sync::Arc::new)
            .map_err(|error| problems.add("http.viewer-tokens-file", error))
            .ok()
    });
    Some(HttpConfig {
        listen: listen?,
        alertmanager_token,
        webhook_secret,
        viewers,
    })
}

fn validate_alertmanager(
    raw: &RawAlertmanager,
    problems: &mut Problems,
) -> Option<AlertmanagerConfig> {
    let Some(url) = raw.url.as_ref() else {
        if !raw.https_files().is_empty() || raw.silence_lease_s.is_some() {
            problems.add(
                "alertmanager.url",
                "is required with the other alertmanager keys",
            );
        }
        return None;
    };
    let scheme_ends = ["http://", "https://"]
        .iter()
        .find(|scheme| url.starts_with(**scheme))
        .map(|scheme| scheme.len());
    if scheme_ends.is_none_or(|end| url.len() <= end) {
        problems.add(
            "alertmanager.url",
            format!("{url:?} must be an http:// or https:// URL"),
        );
    }
    let lease = raw.silence_lease_s.unwrap_or(300);
    check_range(problems, "alertmanager.silence-lease-s", lease, 30, 86_400);
    Some(AlertmanagerConfig {
        url: url.trim_end_matches('/').to_string(),
        silence_lease: Duration::from_secs(lease),
        tls: raw.https_files().load_noting("alertmanager", problems),
    })
}

/// Reads a secret file (trimmed); at least 16 bytes.
fn read_secret(field: &str, path: &Path, problems: &mut Problems) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let secret = bytes.trim_ascii().to_vec();
            if secret.len() < 16 {
                problems.add(
                    field,
                    format!(
                        "{} holds {} bytes; use a secret of at least 16",
                        path.display(),
                        secret.len()
                    ),
                );
                return None;
            }
            Some(secret)
        }
        Err(error) => {
            problems.add(field, format!("cannot read {}: {error}", path.display()));
            None
        }
    }
}

fn check_webhook_url(field: &str, url: &str, problems: &mut Problems) {
    let parsed = match reqwest::Url::parse(url) {
        Ok(parsed) => parsed,
        Err(error) => {
            problems.add(field, format!("{url:?} is not a URL: {error}"));
            return;
        }
    };
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        problems.add(
            field,
            format!("{url:?} must be an http:// or https:// URL with a host"),
        );
    }
    // Delivery details (in the replicated state, the audit, `incident show`) name the URL.
    if !parsed.username().is_empty() || parsed.password().is_some() {
        problems.add(
            field,
            "must not carry a user or password: the receiver checks the signature instead",
        );
    }
}

fn validate_escalation(raw: &RawEscalation, problems: &mut Problems) -> Option<EscalationConfig> {
    let Some(url) = &raw.webhook_url else {
        if raw.secret_file.is_some() || !raw.https_files().is_empty() {
            problems.add(
                "escalation.webhook-url",
                "is required with the other escalation keys",
            );
        }
        return None;
    };
    check_webhook_url("escalation.webhook-url", url, problems);
    let Some(path) = &raw.secret_file else {
        problems.add(
            "escalation.secret-file",
            "is required with a webhook-url: receivers check the signature made with it",
        );
        return None;
    };
    let tls = raw.https_files().load_noting("escalation", problems);
    let secret = read_secret("escalation.secret-file", path, problems)?;
    Some(EscalationConfig {
        webhook_url: url.clone(),
        secret,
        tls,
    })
}

fn validate_incidents(
    raw: &RawIncidents,
    problems: &mut Problems,
) -> Option<IncidentWebhookConfig> {
    for (environment, severity) in &raw.severity {
        if !SEVERITIES.contains(&severity.as_str()) {
            problems.add(
                format!("incidents.severity.{environment}"),
                format!("{severity:?} must be one of {}", SEVERITIES.join(", ")),
            );
        }
    }
    let Some(url) = &raw.webhook_url else {
        if raw.secret_file.is_some()
            || raw.format.is_some()
            || raw.routing_key_file.is_some()
            || !raw.https_files().is_empty()
        {
            problems.add(
                "incidents.webhook-url",
                "is required with the other incidents keys",
            );
        }
        return None;
    };
    check_webhook_url("incidents.webhook-url", url, problems);
    let format = match raw.format.as_deref().unwrap_or("pagerduty") {
        "pagerduty" => {
            let Some(path) = &raw.routing_key_file else {
                problems.add(
                    "incidents.routing-key-file",
                    "is required with format pagerduty: it names the PagerDuty integration",
                );
                return None;
            };
            let read = std::fs::File::open(path).and_then(|file| {
                use std::io::Read as _;
                // A key is 32 characters: a large file is not one, and is not read whole.
                let mut text = String::new();
                file.take(1024).read_to_string(&mut text).map(|_| text)
            });
            let routing_key = match read {
                Ok(text) => text.trim().to_string(),
                Err(error) => {
                    problems.add(
                        "incidents.routing-key-file",
                        format!("cannot read {}: {error}", path.display()),
                    );
                    return None;
                }
            };
            if routing_key.len() != 32 || !routing_key.bytes().all(|b| b.is_ascii_alphanumeric()) {
                problems.add(
                    "incidents.routing-key-file",
                    format!(
                        "{} must hold a PagerDuty integration key: 32 letters and digits",
                        path.display()
                    ),
                );
                return None;
            }
            IncidentFormat::PagerDuty { routing_key }
        }
        "json" => IncidentFormat::Json,
        other => {
            problems.add(
                "incidents.format",
                format!("{other:?} must be pagerduty or json"),
            );
            return None;
        }
    };
    let tls = raw.https_files().load_noting("incidents", problems);
    let Some(path) = &raw.secret_file else {
        problems.add(
            "incidents.secret-file",
            "is required with a webhook-url: receivers check the signature made with it",
        );
        return None;
    };
    let secret = read_secret("incidents.secret-file", path, problems)?;
    Some(IncidentWebhookConfig {
        url: url.clone(),
        secret,
        tls,
        format,
        severity: raw.severity.clone(),
    })
}

fn validate_cluster(raw: &RawCluster, problems: &mut Problems) -> Option<ClusterConfig> {
    let before = problems.len();
    if raw.members.is_empty() {
        problems.add("cluster.member", "list at least one member (or use --dev)");
    }
    let mut members: Vec<Member> = Vec::new();
    for (position, member) in raw.members.iter().enumerate() {
        let field = format!("cluster.member[{position}]");
        if member.id == 0 {
            problems.add(format!("{field}.id"), "must be a positive number");
        }
        if members.iter().any(|known| known.id == member.id) {
            problems.add(
                format!("{field}.id"),
                format!("{} is used twice", member.id),
            );
        }
        if member.address.parse::<SocketAddr>().is_err() && !member.address.contains(':') {
            problems.add(
                format!("{field}.address"),
                format!("{:?} must be host:port", member.address),
            );
        }
        let name = member
            .name
            .clone()
            .unwrap_or_else(|| format!("coordinator-{}", member.id));
        if let Err(error) = rewind_shared::names::validate_name(&format!("{field}.name"), &name) {
            problems.add_error(error);
        }
        members.push(Member {
            id: member.id,
            address: member.address.clone(),
            region: member.region.clone(),
            name,
        });
    }
    let member_id = raw.member_id.unwrap_or(0);
    if !members.iter().any(|member| member.id == member_id) {
        problems.add(
            "cluster.member-id",
            format!("{member_id} is not one of the listed members"),
        );
    }
    if let Some(id) = &raw.id
        && let Err(error) = rewind_shared::names::validate_name("cluster.id", id)
    {
        problems.add_error(error);
    }
    if raw.join {
        if raw.id.is_none() {
            problems.add(
                "cluster.id",
                "is required to join: it must match the running cluster's id",
            );
        }
        if members.len() < 2 {
            problems.add(
                "cluster.member",
                "to join, list this member and at least one running member to reach",
            );
        }
    }
    let tick_ms = raw.tick_ms.unwrap_or(100);
    check_range(problems, "cluster.tick-ms", tick_ms, 10, 1000);
    let election_ticks = raw.election_ticks.unwrap_or(10);
    check_range(
        problems,
        "cluster.election-ticks",
        election_ticks as u64,
        5,
        100,
    );
    (problems.len() == before).then(|| ClusterConfig {
        id: raw.id.clone(),
        member_id,
        members,
        tick: Duration::from_millis(tick_ms),
        election_ticks,
        join: raw.join,
    })
}

fn check_range(problems: &mut Problems, field: &str, value: u64, min: u64, max: u64) {
    if !(min..=max).contains(&value) {
        problems.add(field, format!("is {value}, must be within {min}..={max}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "listen = \"nowhere\"\n[engine]\nmax-attempts = 0\ntick-ms = 1\n[health]\nwindow-s = 0\n";
        let raw: RawConfig = rewind_shared::config::parse_toml(Path::new("c.toml"), text)
            .unwrap()
            .value;
        let problems = raw.validate().unwrap_err();
        let joined = problems.join("\n");
        for field in [
            "listen",
            "data-dir",
            "tls",
            "engine.max-attempts",
            "engine.tick-ms",
            "health.window-s",
        ] {
            assert!(joined.contains(field), "{field} missing from:\n{joined}");
        }
        assert_eq!(problems.len(), 8);
    }

    #[test]
    fn bad_monitoring_throttle_and_gate_settings_are_each_named() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short.secret");
        std::fs::write(&short, "too short").unwrap();
        let text = format!(
            r#"[engine]
gate-tolerance = 2.0
gate-latency-tolerance = -1.0
gate-settle-s = 10
gate-timeout-s = 5
[throttle]
budget = 0
breaker-services = 1
[escalation]
webhook-url = "ftp://pager.example"
[http]
listen = "nowhere"
alertmanager-token-file = "{short}"
webhook-secret-file = "/nonexistent/secret"
viewer-tokens-file = "/nonexistent/viewers.toml"
[alertmanager]
url = "ftp://am"
silence-lease-s = 1
"#,
            short = short.display()
        );
        let raw: RawConfig = rewind_shared::config::parse_toml(Path::new("c.toml"), &text)
            .unwrap()
            .value;
        let joined = raw.validate().unwrap_err().join("\n");
        for expected in [
            "engine.gate-tolerance: is 2, must be within 0..=1",
            "engine.gate-latency-tolerance: is -1",
            "engine.gate-timeout-s: is 5, must be within 10..=86400",
            "throttle.budget: is 0",
            "throttle.breaker-services: is 1",
            "escalation.webhook-url",
            "escalation.secret-file: is required with a webhook-url",
            "http.listen",
            "http.alertmanager-token-file",
            "use a secret of at least 16",
            "http.webhook-secret-file: cannot read /nonexistent/secret",
            "http.viewer-tokens-file: cannot read /nonexistent/viewers.toml",
            "alertmanager.url",
            "alertmanager.silence-lease-s: is 1",
        ] {
            assert!(
                joined.contains(expected),
                "{expected} missing from:\n{joined}"
            );
        }
    }

    #[test]
    fn an_initial_cluster_version_outside_what_this_binary_founds_is_named() {
        let validate = |version: u32| {
            let text = format!(
                "listen = \"127.0.0.1:7443\"\n[storage]\ninitial-cluster-version = {version}\n"
            );
            let raw: RawConfig = rewind_shared::config::parse_toml(Path::new("c.toml"), &text)
                .unwrap()
                .value;
            raw.validate().map(|_| ()).unwrap_err().join("\n")
        };
        let current = crate::state_machine::version::CURRENT;
        for refused in [1, current + 1] {
            let joined = validate(refused);
            assert!(
                joined.contains(&format!(
                    "storage.initial-cluster-version: is {refused}, must be within 2..={current}"
                )),
                "{joined}"
            );
        }
        // Within the range it is not among the problems (the others are the missing files).
        assert!(!validate(6).contains("initial-cluster-version"));
    }

    #[test]
    fn bad_incident_webhook_settings_are_each_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("pagerduty.key");
        std::fs::write(&key, "not-a-key").unwrap();
        let with = |incidents: &str| {
            let text = format!("[incidents]\n{incidents}");
            let raw: RawConfig = rewind_shared::config::parse_toml(Path::new("c.toml"), &text)
                .unwrap()
                .value;
            raw.validate().unwrap_err().join("\n")
        };
        let key = key.display();
        for (incidents, expected) in [
            (
                format!("webhook-url = \"http://h/\"\nrouting-key-file = \"{key}\"\n"),
                "incidents.routing-key-file: ",
            ),
            (
                "webhook-url = \"http://h/\"\n".to_string(),
                "incidents.routing-key-file: is required with format pagerduty",
            ),
            (
                "webhook-url = \"http://h/\"\nformat = \"opsgenie\"\n".to_string(),
                "incidents.format: \"opsgenie\" must be pagerduty or json",
            ),
            (
                "webhook-url = \"http://h/\"\nformat = \"json\"\n".to_string(),
                "incidents.secret-file: is required",
            ),
            (
                "webhook-url = \"ftp://events.pagerduty.com/v2/enqueue\"\nformat = \"json\"\n"
                    .to_string(),
                "incidents.webhook-url: ",
            ),
            (
                format!("webhook-url = \"https://h/\"\nformat = \"json\"\nca-file = \"{key}\"\n"),
                "incidents.ca-file: ",
            ),
            (
                "format = \"json\"\n".to_string(),
                "incidents.webhook-url: is required",
            ),
            (
                "webhook-url = \"https://bob:hunter2@h/\"\nformat = \"json\"\n".to_string(),
                "incidents.webhook-url: must not carry a user or password",
            ),
            (
                "webhook-url = \"http:///bob:pw@h/\"\nformat = \"json\"\n".to_string(),
                "incidents.webhook-url: must not carry a user or password",
            ),
            (
                "webhook-url = \"http://h:99999/\"\nformat = \"json\"\n".to_string(),
                "incidents.webhook-url: \"http://h:99999/\" is not a URL",
            ),
            (
                "[incidents.severity]\nprod = \"fatal\"\n".to_string(),
                "incidents.severity.prod: \"fatal\" must be one of critical, error, warning, info",
            ),
        ] {
            let joined = with(&incidents);
            assert!(
                joined.contains(expected),
                "{expected} missing from:\n{joined}"
            );
        }
    }

    #[test]
    fn joining_needs_the_cluster_id_and_a_member_to_reach() {
        let text = "data-dir = \"/d\"\n[tls]\nca = \"a\"\ncert = \"c\"\nkey = \"k\"\n[cluster]\njoin = true\nmember-id = 4\n[[cluster.member]]\nid = 4\naddress = \"h:1\"\nregion = \"r\"\n";
        let raw: RawConfig = rewind_shared::config::parse_toml(Path::new("c.toml"), text)
            .unwrap()
            .value;
        let joined = raw.validate().unwrap_err().join("\n");
        assert!(
            joined.contains("cluster.id: is required to join"),
            "{joined}"
        );
        assert!(joined.contains("at least one running member"), "{joined}");
    }

    #[test]
    fn unknown_keys_are_collected_not_fatal() {
        let text = "data-dir = \"/d\"\nfuture-knob = 1\n[engine]\nnew-thing = true\n\
                    [escalation]\nca-file = \"/ca.pem\"\ncert-file = \"/c.pem\"\n";
        let loaded =
            rewind_shared::config::parse_toml::<RawConfig>(Path::new("c.toml"), text).unwrap();
        let mut unknown = loaded.unknown_keys;
        unknown.sort();
        assert_eq!(
            unknown,
            vec![
                "engine.new-thing".to_string(),
                "escalation.cert-file".to_string(),
                "future-knob".to_string()
            ]
        );
    }

    #[test]
    fn outbound_https_files_are_checked_and_plain_http_carrying_a_key_is_warned_about() {
        rewind_shared::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = rewind_shared::dev_ca::DevCa::generate("outbound").unwrap();
        let subject =
            rewind_shared::dev_ca::Subject::new(rewind_shared::identity::Kind::Member, "c-1");
        let (cert, key) = ca.issue(&subject, &[]).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let (ca_file, cert_file, key_file) = (
            file("ca.pem", ca.cert_pem()),
            file("client.pem", &cert),
            file("client.key", &key),
        );
        let (routing_key, secret) = (file("pd.key", &"k".repeat(32)), file("s", &"s".repeat(32)));
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let shipped = std::fs::read_to_string(deploy.join("coordinator.toml"))
            .unwrap()
            .replace(
                "/etc/rewind/policy.toml",
                deploy.join("policy.toml").to_str().unwrap(),
            );
        let with = |sections: &str| {
            let text = format!("{shipped}\n{sections}");
            let raw: RawConfig = rewind_shared::config::parse_toml(Path::new("c.toml"), &text)
                .unwrap()
                .value;
            raw.validate()
        };
        let config = with(&format!(
            "[alertmanager]\nurl = \"https://am:9093\"\nca-file = \"{ca_file}\"\n\
             client-cert-file = \"{cert_file}\"\nclient-key-file = \"{key_file}\"\n\
             [incidents]\nwebhook-url = \"http://pd.internal/\"\nrouting-key-file = \"{routing_key}\"\n\
             secret-file = \"{secret}\"\n[synthetics]\nca-file = \"{ca_file}\"\n"
        ))
        .unwrap();
        assert!(config.alertmanager.unwrap().tls.has_client_certificate());
        assert!(!config.synthetics_tls.has_client_certificate());
        assert_eq!(
            config.warnings,
            [
                "incidents.webhook-url is plain http:// and carries the PagerDuty routing key: \
              anyone on the path can read it; use https://"
            ]
        );
        for (sections, expected) in [
            (
                format!(
                    "[alertmanager]\nurl = \"https://am\"\nclient-cert-file = \"{cert_file}\"\n"
                ),
                "alertmanager.client-key-file: is required with client-cert-file",
            ),
            (
                format!(
                    "[escalation]\nwebhook-url = \"https://p/\"\nsecret-file = \"{secret}\"\n\
                         client-cert-file = \"{cert_file}\"\nclient-key-file = \"{ca_file}\"\n"
                ),
                "escalation.client-key-file: ",
            ),
            (
                format!("[synthetics]\nca-file = \"{key_file}\"\n"),
                "synthetics.ca-file: ",
            ),
            (
                format!("[alertmanager]\nca-file = \"{ca_file}\"\n"),
                "alertmanager.url: is required with the other alertmanager keys",
            ),
            (
                "[alertmanager]\nsilence-lease-s = 60\n".to_string(),
                "alertmanager.url: is required with the other alertmanager keys",
            ),
        ] {
            let problems = with(&sections).map(|_| ()).unwrap_err().join("\n");
            assert!(problems.contains(expected), "{sections}: {problems}");
        }
    }

    #[test]
    fn the_shipped_example_config_loads_without_unknown_keys() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        // Its policy file is installed at /etc/rewind; here it is the shipped example.
        let text = std::fs::read_to_string(deploy.join("coordinator.toml")).unwrap();
        let policy = deploy.join("policy.toml");
        let text = text.replace("/etc/rewind/policy.toml", policy.to_str().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.toml");
        std::fs::write(&path, text).unwrap();
        let (raw, unknown) = RawConfig::load(&path).unwrap();
        assert!(unknown.is_empty(), "{unknown:?}");
        let config = raw.validate().unwrap();
        assert_eq!(config.limits.max_attempts, 3);
        let policy = config.access.bootstrap_policy.expect("the example policy");
        assert_eq!(policy.administrators()[0].name, "sre-admins");
    }
}
