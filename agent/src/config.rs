//! Agent configuration: TOML -> [`RawConfig`] -> `validate()` (every problem at once) -> [`Config`].
//!
//! ```toml
//! host-id = "web-1"
//! coordinators = ["127.0.0.1:7443"]
//! data-dir = "/var/lib/rewind/agent"
//! join-token-file = "/etc/rewind/join-token"   # first start: join with it (see README)
//! [tls]
//! ca = "/etc/rewind/ca.pem"
//! cert = "/etc/rewind/web-1.pem"   # written by the join, renewed before it expires
//! key = "/etc/rewind/web-1.key"
//! [labels]
//! region = "eu-west"
//! [[service]]
//! name = "web"
//! root = "/srv/web"            # holds releases/<version>/ and the `current` link
//! config-files = ["shared/config/app.toml"]
//! restart-command = ["systemctl", "restart", "web"]
//! [[service.probe]]
//! name = "health"
//! http = "http://127.0.0.1:8080/health"
//! [service.metrics]                   # the service's own Prometheus text endpoint
//! url = "http://127.0.0.1:8080/metrics"
//! requests = "http_requests_total"    # counter; samples whose `code` starts with 5 are errors
//! latency = "http_request_duration_seconds"   # histogram
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use rewind_shared::config::{Problems, load_toml};
use rewind_shared::names;
use rewind_shared::tls::TlsFiles;
use serde::Deserialize;

use crate::catalogue::{
    Catalogue, RawCheck, RawCommand, RawJobs, RawPurge, RawScaleUp, RawSections,
};
use crate::paths::check_relative;
use crate::self_revert::SelfRevertPolicy;

/// Most files one service's `drift-ignore` may name.
const MAX_DRIFT_IGNORED: usize = 256;
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawConfig {
    pub host_id: String,
    /// Coordinator members as host:port; the agent moves to the next when one fails.
    pub coordinators: Vec<String>,
    /// A name every coordinator's certificate must carry instead of the host dialled (older
    /// setups). Unset: each member's certificate must name the host the agent dials.
    pub coordinator_name: Option<String>,
    /// Accept coordinator certificates without a `rewind://member/<id>` identity (issued before
    /// kinds), for one release, to upgrade and re-enroll. Logged.
    pub legacy_certificates: bool,
    pub data_dir: Option<PathBuf>,
    pub tls: Option<TlsFiles>,
    /// A file holding a one-time join token: when the certificate in `tls` does not exist yet,
    /// the agent joins the cluster with it (its own key, a CSR, signed by a member) first.
    pub join_token_file: Option<PathBuf>,
    pub labels: RawLabels,
    /// Report interval used until a coordinator asks for another.
    pub health_interval_ms: Option<u64>,
    /// No longer used (earlier agents dropped their code pages from RSS every so often):
    /// accepted so that configs written for them still load, with a warning.
    pub code_release_interval_s: Option<u64>,
    /// How often each service's drift from its desired state is checked and reported (0: never).
    pub drift_check_interval_s: Option<u64>,
    /// How the agent's HTTP probes, metrics scrapes and hooks reach https:// URLs: a CA file
    /// besides the system's and public roots, a client certificate (see `rewind_shared::outbound`).
    pub https: rewind_shared::outbound::HttpsFiles,
    #[serde(rename = "service")]
    pub services: Vec<RawService>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawLabels {
    pub region: String,
    pub zone: String,
    pub environment: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawService {
    pub name: String,
    pub root: PathBuf,
    pub config_files: Vec<String>,
    /// Environment files (`KEY=value`, often with secrets): captured and restored like config
    /// files, shown as their own category, never with a content hash.
    pub env_files: Vec<String>,
    pub flags_file: Option<String>,
    /// Config or env files the service writes itself (a cursor, a cache): captured and
    /// restored, never counted as drift. The jobs checkpoint file is left out already.
    pub drift_ignore: Vec<String>,
    pub restart_command: Vec<String>,
    pub restart_timeout_s: Option<u64>,
    #[serde(rename = "probe")]
    pub probes: Vec<RawProbe>,
    /// Takes the service out of rotation before a rollback reverts it.
    pub drain: Option<RawHook>,
    /// Puts it back once it is verified healthy.
    pub undrain: Option<RawHook>,
    /// The service's own Prometheus endpoint, for error ratio and latency.
    pub metrics: Option<RawMetrics>,
    /// Its systemd unit, packages and container: recorded in snapshots (not restored).
    pub unit: Option<String>,
    pub packages: Vec<String>,
    pub container: Option<String>,
    /// The container is the service: captured and restored by image digest, activated from the
    /// release's digest (see `container`).
    pub manage_container: bool,
    /// The Docker Engine's socket (default /var/run/docker.sock).
    pub docker_socket: Option<String>,
    /// Releases kept in `releases/` (see `retention`); absent: all.
    pub keep_releases: Option<u32>,
    /// The optional steps of the reversion catalogue (see `catalogue`).
    pub reload_command: Option<Vec<String>>,
    #[serde(rename = "command")]
    pub commands: Vec<RawCommand>,
    pub jobs: Option<RawJobs>,
    /// Run by a recipe's `reconcile` step after a restore.
    pub reconcile: Option<RawHook>,
    /// Switched on by a recipe's `clear-client-caches` step, off after its window.
    pub client_cache: Option<crate::catalogue::RawClientCache>,
    #[serde(rename = "purge")]
    pub purges: Vec<RawPurge>,
    pub scale_up: Option<RawScaleUp>,
    #[serde(rename = "check")]
    pub checks: Vec<RawCheck>,
    /// Revert on its own while no coordinator answers (see `self_revert`); absent: never.
    pub self_revert: Option<RawSelfRevert>,
    /// The service's database, whose schema version snapshots record (see `schema`).
    pub database: Option<RawDatabase>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawDatabase {
    /// libpq connection string (`host=... port=... user=... dbname=...`).
    pub postgres: Option<String>,
    /// Or an SQLite database file (absolute path).
    pub sqlite: Option<String>,
    pub history_table: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawSelfRevert {
    pub failing_for_s: Option<u64>,
    pub offline_for_s: Option<u64>,
}

/// Where and what to scrape: a requests counter whose samples are errors when a label's value
/// starts with one of `error-values`, and optionally a latency histogram.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawMetrics {
    pub url: String,
    pub requests: String,
    /// Label telling a failed request (default `code`).
    pub error_label: Option<String>,
    /// Prefixes of that label's value counted as errors (default `["5"]`).
    pub error_values: Option<Vec<String>>,
    pub latency: Option<String>,
    /// `seconds` (default, as Prometheus recommends) or `milliseconds`.
    pub latency_unit: Option<String>,
    pub timeout_ms: Option<u64>,
}

/// A drain or undrain hook: a command, or an HTTP POST expecting a 2xx answer.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawHook {
    pub command: Option<Vec<String>>,
    pub http: Option<String>,
    pub timeout_ms: Option<u64>,
    /// Wait after the hook so open sessions can finish (drain only); with `sessions`, the most
    /// it waits for them (default 30 s).
    pub grace_ms: Option<u64>,
    /// Wait for the service's own count of active sessions instead of a fixed grace.
    pub sessions: Option<RawSessions>,
}

/// Where a drain reads the service's active sessions: a gauge on a Prometheus text page, or a
/// command printing the number.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawSessions {
    /// The page (`http://127.0.0.1:9090/metrics`) and the gauge on it, summed over its series.
    pub url: Option<String>,
    pub metric: Option<String>,
    /// Or a command printing the count on its first line.
    pub command: Option<Vec<String>>,
    /// Done once the count is at most this (default 0).
    pub below: Option<u64>,
    /// How often the count is read (default 500 ms).
    pub poll_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawProbe {
    pub name: String,
    /// URL for an HTTP GET.
    pub http: Option<String>,
    /// Expected HTTP status (default 200).
    pub expect_status: Option<u16>,
    /// host:port for a TCP connect.
    pub tcp: Option<String>,
    /// argv of a command that must exit 0.
    pub command: Option<Vec<String>>,
    pub timeout_ms: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub host_id: String,
    pub coordinators: Vec<String>,
    pub coordinator_name: Option<String>,
    pub legacy_certificates: bool,
    pub data_dir: PathBuf,
    pub tls: TlsFiles,
    pub join_token_file: Option<PathBuf>,
    pub labels: RawLabels,
    pub health_interval: Duration,
    /// The config still sets `code-release-interval-s`, which no longer does anything.
    pub obsolete_code_release_interval: bool,
    /// `None` when drift is never checked on its own (`host drift` still asks).
    pub drift_check_interval: Option<Duration>,
    /// The `[https]` section, read and checked.
    pub https: rewind_shared::outbound::HttpsTrust,
    pub services: Vec<ServiceConfig>,
}

#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub name: String,
    pub root: PathBuf,
    pub config_files: Vec<String>,
    pub env_files: Vec<String>,
    pub flags_file: Option<String>,
    /// Files drift leaves out (see `RawService::drift_ignore`).
    pub drift_ignore: Vec<String>,
    pub restart_command: Vec<String>,
    pub restart_timeout: Duration,
    pub probes: Vec<Probe>,
    pub drain: Option<Hook>,
    pub undrain: Option<Hook>,
    pub metrics: Option<MetricsConfig>,
    /// systemd unit whose `is-active`/`is-enabled` snapshots record.
    pub unit: Option<String>,
    /// Packages whose installed versions snapshots record.
    pub packages: Vec<String>,
    /// Container whose image snapshots record.
    pub container: Option<String>,
    /// The container is the service, managed by image digest (`manage-container = true`).
    pub manage_container: bool,
    /// Where the Docker Engine listens, for a managed container.
    pub docker_socket: std::path::PathBuf,
    /// How many recently live releases to keep besides the protected ones; `None` keeps all.
    pub keep_releases: Option<u32>,
    /// What the optional reversion steps run on this host.
    pub catalogue: Catalogue,
    /// When the host may revert the service on its own, offline; `None`: never.
    pub self_revert: Option<SelfRevertPolicy>,
    /// Its database, whose schema version snapshots record.
    pub database: Option<crate::schema::DatabaseConfig>,
}

impl ServiceConfig {
    /// A service at `root` with no config files, probes, hooks, metrics or facts, restarted by
    /// `true` within 5 s: the base tests and benchmarks add to.
    pub fn bare(name: &str, root: &Path) -> Self {
        Self {
            name: name.to_string(),
            root: root.to_path_buf(),
            config_files: vec![],
            env_files: vec![],
            flags_file: None,
            drift_ignore: vec![],
            restart_command: vec!["true".into()],
            restart_timeout: Duration::from_secs(5),
            probes: vec![],
            drain: None,
            undrain: None,
            metrics: None,
            unit: None,
            packages: vec![],
            container: None,
            manage_container: false,
            docker_socket: crate::container::DOCKER_SOCKET.into(),
            keep_releases: None,
            catalogue: Catalogue::default(),
            self_revert: None,
            database: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct MetricsConfig {
    pub url: String,
    pub requests: String,
    pub error_label: String,
    pub error_prefixes: Vec<String>,
    pub latency: Option<String>,
    /// Milliseconds per unit of the histogram's bucket bounds.
    pub latency_unit_ms: f64,
    pub timeout: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub enum HookKind {
    Command { argv: Vec<String> },
    HttpPost { url: String },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Hook {
    pub kind: HookKind,
    pub timeout: Duration,
    pub grace: Duration,
    /// Wait (at most `grace`) until the service's active sessions are at most `below`.
    pub sessions: Option<Sessions>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sessions {
    pub source: SessionsSource,
    pub below: u64,
    pub poll: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SessionsSource {
    Metric { url: String, name: String },
    Command { argv: Vec<String> },
}

#[derive(Clone, Debug, PartialEq)]
pub enum ProbeKind {
    Http { url: String, expect_status: u16 },
    Tcp { address: String },
    Command { argv: Vec<String> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Probe {
    pub name: String,
    pub kind: ProbeKind,
    pub timeout: Duration,
}

const MAX_TIMEOUT_MS: u64 = 600_000;

impl RawConfig {
    pub fn load(path: &Path) -> Result<(Self, Vec<String>), rewind_shared::SharedError> {
        let loaded = load_toml(path)?;
        Ok((loaded.value, loaded.unknown_keys))
    }

    pub fn validate(self) -> Result<Config, Vec<String>> {
        let mut problems = Problems::default();
        if let Err(error) = names::validate_name("host-id", &self.host_id) {
            problems.add_error(error);
        }
        if self.coordinators.is_empty() {
            problems.add(
                "coordinators",
                "name at least one coordinator address (host:port)",
            );
        }
        for address in &self.coordinators {
            if address.contains("://") || !address.contains(':') {
                problems.add("coordinators", format!("{address:?} must be host:port"));
            }
        }
        for (field, value) in [
            ("labels.region", &self.labels.region),
            ("labels.zone", &self.labels.zone),
            ("labels.environment", &self.labels.environment),
        ] {
            if value.len() > rewind_shared::bounds::MAX_LABEL_BYTES {
                problems.add(
                    field,
                    format!(
                        "is {} bytes, at most {}",
                        value.len(),
                        rewind_shared::bounds::MAX_LABEL_BYTES
                    ),
                );
            } else if !value.is_empty()
                && let Err(error) = names::validate_name(field, value)
            {
                problems.add_error(error);
            }
        }
        if self.data_dir.is_none() {
            problems.add("data-dir", "is required");
        }
        if self.tls.is_none() {
            problems.add("tls", "is required: ca, cert and key files");
        }
        let interval_ms = self.health_interval_ms.unwrap_or(2000);
        if !(100..=60_000).contains(&interval_ms) {
            problems.add(
                "health-interval-ms",
                format!("is {interval_ms}, must be within 100..=60000"),
            );
        }
        let drift_s = self.drift_check_interval_s.unwrap_or(60);
        if drift_s != 0 && !(5..=86_400).contains(&drift_s) {
            problems.add(
                "drift-check-interval-s",
                format!("is {drift_s}, must be 0 (never) or within 5..=86400"),
            );
        }
        let https =
            crate::catalogue::https_trust("https", &self.https, &mut problems).unwrap_or_default();
        let mut services = Vec::new();
        for (position, raw) in self.services.iter().enumerate() {
            let field = if raw.name.is_empty() {
                format!("service[{position}]")
            } else {
                format!("service.{}", raw.name)
            };
            if let Some(service) = validate_service(&field, raw, &mut problems) {
                if services
                    .iter()
                    .any(|known: &ServiceConfig| known.name == service.name)
                {
                    problems.add(&field, "is declared twice");
                }
                services.push(service);
            }
        }
        let bounds = [
            (
                "service",
                services.len(),
                rewind_shared::bounds::MAX_SERVICES_PER_HOST,
                "services",
            ),
            (
                "service.probe",
                services.iter().map(|service| service.probes.len()).sum(),
                rewind_shared::bounds::MAX_PROBES_PER_REPORT,
                "probes in all",
            ),
        ];
        for (field, count, max, what) in bounds {
            if count > max {
                problems.add(field, format!("{count} {what}, at most {max}"));
            }
        }
        problems.into_result()?;
        let (Some(data_dir), Some(tls)) = (self.data_dir, self.tls) else {
            unreachable!("missing values were reported as problems");
        };
        Ok(Config {
            host_id: self.host_id,
            coordinators: self.coordinators,
            coordinator_name: self.coordinator_name,
            legacy_certificates: self.legacy_certificates,
            data_dir,
            tls,
            join_token_file: self.join_token_file,
            labels: self.labels,
            health_interval: Duration::from_millis(interval_ms),
            obsolete_code_release_interval: self.code_release_interval_s.is_some(),
            drift_check_interval: (drift_s != 0).then(|| Duration::from_secs(drift_s)),
            https,
            services,
        })
    }
}

impl Config {
    /// What is allowed but unwise: a purge or check that sends a credential header
    /// (`Authorization`, an API key) over plain http:// off this machine. Logged at start,
    /// printed by `check-config`.
    pub fn warnings(&self) -> Vec<String> {
        use rewind_shared::outbound::is_credential_header;
        let mut warnings = Vec::new();
        for service in &self.services {
            let field = format!("service.{}", service.name);
            let purges = service
                .catalogue
                .purges
                .iter()
                .filter(|purge| purge.headers.keys().any(|name| is_credential_header(name)))
                .map(|purge| ("purge", &purge.url));
            let checks = service
                .catalogue
                .checks
                .iter()
                .filter(|check| {
                    check
                        .headers
                        .iter()
                        .any(|(name, _)| is_credential_header(name))
                })
                .map(|check| ("check", &check.url));
            for (kind, url) in purges.chain(checks) {
                warnings.extend(rewind_shared::outbound::plain_http_warning(
                    &format!("{field}.{kind} {url}"),
                    url,
                    "a credential header",
                ));
            }
        }
        warnings
    }
}

fn validate_service(
    field: &str,
    raw: &RawService,
    problems: &mut Problems,
) -> Option<ServiceConfig> {
    let before = problems.len();
    if let Err(error) = names::validate_name(&format!("{field}.name"), &raw.name) {
        problems.add_error(error);
    }
    if !raw.root.is_absolute() {
        problems.add(
            format!("{field}.root"),
            format!("{:?} must be an absolute directory", raw.root),
        );
    }
    for (key, paths) in [
        (
            "config-files",
            raw.config_files
                .iter()
                .chain(raw.flags_file.iter())
                .collect::<Vec<_>>(),
        ),
        ("env-files", raw.env_files.iter().collect()),
    ] {
        for path in paths {
            if let Err(error) = check_relative(&raw.name, path) {
                problems.add(format!("{field}.{key}"), error.to_string());
            }
        }
    }
    if raw.drift_ignore.len() > MAX_DRIFT_IGNORED {
        problems.add(
            format!("{field}.drift-ignore"),
            format!("names more than {MAX_DRIFT_IGNORED} files"),
        );
    }
    if let Some(unknown) = raw
        .drift_ignore
        .iter()
        .find(|path| !raw.config_files.contains(path) && !raw.env_files.contains(path))
    {
        problems.add(
            format!("{field}.drift-ignore"),
            format!(
                "{:?} is not one of the service's config-files or env-files",
                names::printable(unknown, 256)
            ),
        );
    }
    if let Some(both) = raw
        .env_files
        .iter()
        .find(|path| raw.config_files.contains(path))
    {
        problems.add(
            format!("{field}.env-files"),
            format!("{both:?} is also in config-files; list it once"),
        );
    }
    if raw.restart_command.is_empty() {
        problems.add(
            format!("{field}.restart-command"),
            "is required (argv list, e.g. [\"systemctl\", \"restart\", \"web\"])",
        );
    } else {
        crate::catalogue::check_program(
            &format!("{field}.restart-command"),
            &raw.root,
            &raw.restart_command,
            problems,
        );
    }
    for (key, hook) in [("drain", &raw.drain), ("undrain", &raw.undrain)] {
        if let Some(argv) = hook.as_ref().and_then(|hook| hook.command.as_ref()) {
            crate::catalogue::check_program(
                &format!("{field}.{key}.command"),
                &raw.root,
                argv,
                problems,
            );
        }
    }
    if let Some(argv) = raw
        .drain
        .as_ref()
        .and_then(|hook| hook.sessions.as_ref())
        .and_then(|sessions| sessions.command.as_ref())
    {
        crate::catalogue::check_program(
            &format!("{field}.drain.sessions.command"),
            &raw.root,
            argv,
            problems,
        );
    }
    if let Some(undrain) = &raw.undrain {
        refuse_sessions(&format!("{field}.undrain"), undrain, problems);
    }
    let restart_timeout_s = raw.restart_timeout_s.unwrap_or(60);
    if !(1..=3600).contains(&restart_timeout_s) {
        problems.add(
            format!("{field}.restart-timeout-s"),
            format!("is {restart_timeout_s}, must be within 1..=3600"),
        );
    }
    let mut probes = Vec::new();
    for (position, probe) in raw.probes.iter().enumerate() {
        let probe_field = format!("{field}.probe[{position}]");
        if let Some(probe) = validate_probe(&probe_field, probe, problems) {
            probes.push(probe);
        }
    }
    let drain = raw
        .drain
        .as_ref()
        .and_then(|hook| validate_hook(&format!("{field}.drain"), hook, problems));
    let undrain = raw
        .undrain
        .as_ref()
        .and_then(|hook| validate_hook(&format!("{field}.undrain"), hook, problems));
    if raw
        .undrain
        .as_ref()
        .is_some_and(|hook| hook.grace_ms.is_some())
    {
        problems.add(
            format!("{field}.undrain.grace-ms"),
            "only a drain waits for sessions; remove it here",
        );
    }
    let metrics = raw
        .metrics
        .as_ref()
        .and_then(|metrics| validate_metrics(&format!("{field}.metrics"), metrics, problems));
    // Handed to systemctl, dpkg-query/rpm and docker as single arguments: names, not options.
    let fact_name = |name: &str| {
        !name.is_empty()
            && !name.starts_with('-')
            && name.len() <= 255
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-:@+".contains(c))
    };
    for (key, name) in [("unit", &raw.unit), ("container", &raw.container)] {
        if let Some(name) = name.as_ref().filter(|name| !fact_name(name)) {
            problems.add(
                format!("{field}.{key}"),
                format!("{name:?} is not a {key} name (letters, digits, . _ - : @ +)"),
            );
        }
    }
    if raw.manage_container && raw.container.is_none() {
        problems.add(
            format!("{field}.manage-container"),
            "names no container: set container = \"NAME\" beside it",
        );
    }
    // A managed container's name goes into the engine's URLs: Docker's own rule.
    let docker_name = |name: &str| {
        name.len() >= 2
            && name.len() <= 128
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    };
    if let Some(name) = raw.container.as_ref().filter(|_| raw.manage_container)
        && !docker_name(name)
    {
        problems.add(
            format!("{field}.container"),
            format!(
                "{name:?} is not a container name Docker accepts (a letter or digit, then \
                 letters, digits, _ . -)"
            ),
        );
    }
    if let Some(socket) = &raw.docker_socket
        && !(socket.starts_with('/') && socket.len() <= 256 && !socket.contains('\0'))
    {
        problems.add(
            format!("{field}.docker-socket"),
            format!("{socket:?} is not an absolute path of at most 256 bytes"),
        );
    }
    if let Some(keep) = raw.keep_releases.filter(|keep| !(1..=1000).contains(keep)) {
        problems.add(
            format!("{field}.keep-releases"),
            format!("is {keep}, must be within 1..=1000"),
        );
    }
    for package in raw.packages.iter().filter(|package| !fact_name(package)) {
        problems.add(
            format!("{field}.packages"),
            format!("{package:?} is not a package name"),
        );
    }
    let catalogue = crate::catalogue::validate(
        field,
        &raw.root,
        RawSections {
            reload_command: raw.reload_command.as_ref(),
            reconcile: raw.reconcile.as_ref(),
            client_cache: raw.client_cache.as_ref(),
            commands: &raw.commands,
            jobs: raw.jobs.as_ref(),
            purges: &raw.purges,
            scale_up: raw.scale_up.as_ref(),
            checks: &raw.checks,
        },
        problems,
    );
    let self_revert = raw.self_revert.as_ref().map(|policy| {
        let failing_for_s = policy.failing_for_s.unwrap_or(60);
        let offline_for_s = policy.offline_for_s.unwrap_or(failing_for_s);
        for (key, value) in [
            ("failing-for-s", failing_for_s),
            ("offline-for-s", offline_for_s),
        ] {
            if !(1..=86_400).contains(&value) {
                problems.add(
                    format!("{field}.self-revert.{key}"),
                    format!("is {value}, must be within 1..=86400"),
                );
            }
        }
        if raw.probes.is_empty() {
            problems.add(
                format!("{field}.self-revert"),
                "needs at least one probe: it acts on failing probes",
            );
        }
        SelfRevertPolicy {
            failing_for: Duration::from_secs(failing_for_s),
            offline_for: Duration::from_secs(offline_for_s),
        }
    });
    let database = raw.database.as_ref().and_then(|database| {
        let history_table = database.history_table.as_deref();
        match (&database.postgres, &database.sqlite) {
            (Some(connection), None) => crate::schema::validate(connection, history_table),
            (None, Some(path)) => crate::schema::validate_sqlite(path, history_table),
            _ => Err("set one of postgres (a libpq connection string) or sqlite (a file)".into()),
        }
        .map_err(|problem| problems.add(format!("{field}.database"), problem))
        .ok()
    });
    if problems.len() != before {
        return None;
    }
    Some(ServiceConfig {
        name: raw.name.clone(),
        root: raw.root.clone(),
        config_files: raw.config_files.clone(),
        env_files: raw.env_files.clone(),
        flags_file: raw.flags_file.clone(),
        drift_ignore: raw.drift_ignore.clone(),
        restart_command: raw.restart_command.clone(),
        restart_timeout: Duration::from_secs(restart_timeout_s),
        probes,
        drain,
        undrain,
        metrics,
        unit: raw.unit.clone(),
        packages: raw.packages.clone(),
        container: raw.container.clone(),
        manage_container: raw.manage_container,
        docker_socket: raw
            .docker_socket
            .as_deref()
            .unwrap_or(crate::container::DOCKER_SOCKET)
            .into(),
        keep_releases: raw.keep_releases,
        catalogue,
        self_revert,
        database,
    })
}

/// Prometheus metric names: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_' || first == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// An `http://` or `https://` URL (https as the agent's `[https]` says).
fn check_http_url(field: &str, url: &str, problems: &mut Problems) {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        problems.add(field, format!("{url:?} must be an http:// or https:// URL"));
    }
}

fn validate_metrics(
    field: &str,
    raw: &RawMetrics,
    problems: &mut Problems,
) -> Option<MetricsConfig> {
    check_http_url(&format!("{field}.url"), &raw.url, problems);
    for (key, name) in [
        ("requests", Some(&raw.requests)),
        ("latency", raw.latency.as_ref()),
    ] {
        if let Some(name) = name.filter(|name| !is_metric_name(name)) {
            problems.add(
                format!("{field}.{key}"),
                format!("{name:?} is not a Prometheus metric name"),
            );
        }
    }
    let error_label = raw.error_label.clone().unwrap_or_else(|| "code".into());
    if !is_metric_name(&error_label) || error_label.contains(':') {
        problems.add(
            format!("{field}.error-label"),
            format!("{error_label:?} is not a Prometheus label name"),
        );
    }
    let error_prefixes = raw.error_values.clone().unwrap_or_else(|| vec!["5".into()]);
    if error_prefixes.is_empty() || error_prefixes.iter().any(String::is_empty) {
        problems.add(
            format!("{field}.error-values"),
            "name at least one non-empty value prefix (e.g. [\"5\"])",
        );
    }
    let latency_unit_ms = match raw.latency_unit.as_deref() {
        None | Some("seconds") => 1000.0,
        Some("milliseconds") => 1.0,
        Some(other) => {
            problems.add(
                format!("{field}.latency-unit"),
                format!("{other:?} must be seconds or milliseconds"),
            );
            1000.0
        }
    };
    let timeout_ms = raw.timeout_ms.unwrap_or(2000);
    if !(1..=60_000).contains(&timeout_ms) {
        problems.add(
            format!("{field}.timeout-ms"),
            format!("is {timeout_ms}, must be within 1..=60000"),
        );
    }
    Some(MetricsConfig {
        url: raw.url.clone(),
        requests: raw.requests.clone(),
        error_label,
        error_prefixes,
        latency: raw.latency.clone(),
        latency_unit_ms,
        timeout: Duration::from_millis(timeout_ms),
    })
}

pub(crate) fn validate_hook(field: &str, raw: &RawHook, problems: &mut Problems) -> Option<Hook> {
    let timeout_ms = raw.timeout_ms.unwrap_or(10_000);
    if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        problems.add(
            format!("{field}.timeout-ms"),
            format!("is {timeout_ms}, must be within 1..={MAX_TIMEOUT_MS}"),
        );
    }
    let grace_ms = raw
        .grace_ms
        .unwrap_or(if raw.sessions.is_some() { 30_000 } else { 0 });
    if grace_ms > MAX_TIMEOUT_MS {
        problems.add(
            format!("{field}.grace-ms"),
            format!("is {grace_ms}, at most {MAX_TIMEOUT_MS} is allowed"),
        );
    }
    let kind = match (&raw.command, &raw.http) {
        (Some(argv), None) => {
            if argv.is_empty() {
                problems.add(format!("{field}.command"), "must name a program");
            }
            HookKind::Command { argv: argv.clone() }
        }
        (None, Some(url)) => {
            check_http_url(&format!("{field}.http"), url, problems);
            HookKind::HttpPost { url: url.clone() }
        }
        _ => {
            problems.add(field, "set exactly one of command or http");
            return None;
        }
    };
    let sessions = raw
        .sessions
        .as_ref()
        .and_then(|sessions| validate_sessions(&format!("{field}.sessions"), sessions, problems));
    if let Some(sessions) = &sessions {
        if grace_ms == 0 {
            problems.add(
                format!("{field}.grace-ms"),
                "is 0: with sessions it is the most the drain waits for them",
            );
        } else if sessions.poll.as_millis() > u128::from(grace_ms) {
            problems.add(
                format!("{field}.sessions.poll-ms"),
                format!(
                    "is {} ms, longer than grace-ms ({grace_ms}): the count would be read once",
                    sessions.poll.as_millis()
                ),
            );
        }
    }
    Some(Hook {
        kind,
        timeout: Duration::from_millis(timeout_ms),
        grace: Duration::from_millis(grace_ms),
        sessions,
    })
}

/// Only a drain waits for sessions: after an undrain, or around jobs, the count would not fall.
pub(crate) fn refuse_sessions(field: &str, hook: &RawHook, problems: &mut Problems) {
    if hook.sessions.is_some() {
        problems.add(
            format!("{field}.sessions"),
            "only a drain waits for sessions to end",
        );
    }
}

fn validate_sessions(field: &str, raw: &RawSessions, problems: &mut Problems) -> Option<Sessions> {
    let poll_ms = raw.poll_ms.unwrap_or(500);
    if !(50..=60_000).contains(&poll_ms) {
        problems.add(
            format!("{field}.poll-ms"),
            format!("is {poll_ms}, must be within 50..=60000"),
        );
    }
    let source = match (&raw.url, &raw.metric, &raw.command) {
        (Some(url), Some(metric), None) => {
            check_http_url(&format!("{field}.url"), url, problems);
            if !is_metric_name(metric) {
                problems.add(
                    format!("{field}.metric"),
                    format!("{metric:?} is not a Prometheus metric name"),
                );
            }
            SessionsSource::Metric {
                url: url.clone(),
                name: metric.clone(),
            }
        }
        (None, None, Some(argv)) if !argv.is_empty() => {
            SessionsSource::Command { argv: argv.clone() }
        }
        _ => {
            problems.add(
                field,
                "set url and metric (a gauge on a Prometheus page), or command (printing the count)",
            );
            return None;
        }
    };
    Some(Sessions {
        source,
        below: raw.below.unwrap_or(0),
        poll: Duration::from_millis(poll_ms),
    })
}

fn validate_probe(field: &str, raw: &RawProbe, problems: &mut Problems) -> Option<Probe> {
    if raw.name.is_empty() {
        problems.add(format!("{field}.name"), "is required");
    } else if let Err(error) = names::validate_name(&format!("{field}.name"), &raw.name) {
        // Probe names travel in every health report, which the coordinator bounds.
        problems.add_error(error);
    }
    let timeout_ms = raw.timeout_ms.unwrap_or(2000);
    if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        problems.add(
            format!("{field}.timeout-ms"),
            format!("is {timeout_ms}, must be within 1..={MAX_TIMEOUT_MS}"),
        );
    }
    let kinds = [raw.http.is_some(), raw.tcp.is_some(), raw.command.is_some()]
        .iter()
        .filter(|&&set| set)
        .count();
    if kinds != 1 {
        problems.add(field, "set exactly one of http, tcp or command");
        return None;
    }
    let kind = if let Some(url) = &raw.http {
        check_http_url(&format!("{field}.http"), url, problems);
        ProbeKind::Http {
            url: url.clone(),
            expect_status: raw.expect_status.unwrap_or(200),
        }
    } else if let Some(address) = &raw.tcp {
        ProbeKind::Tcp {
            address: address.clone(),
        }
    } else {
        let argv = raw.command.clone().unwrap_or_default();
        if argv.is_empty() {
            problems.add(format!("{field}.command"), "must name a program");
        }
        ProbeKind::Command { argv }
    };
    Some(Probe {
        name: raw.name.clone(),
        kind,
        timeout: Duration::from_millis(timeout_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_in_a_bad_config_is_reported_at_once() {
        let text = r#"
host-id = "Web 1"
coordinators = ["https://x"]
health-interval-ms = 5
drift-check-interval-s = 2
[[service]]
name = "web"
root = "relative/dir"
config-files = ["../etc/passwd", "/abs"]
packages = ["--all"]
keep-releases = 0
env-files = ["/etc/env", "/abs"]
[service.self-revert]
failing-for-s = 0
[service.database]
postgres = "port=notaport"
[[service.probe]]
name = "h"
http = "ftp://x"
tcp = "127.0.0.1:1"
[service.drain]
command = ["a"]
http = "http://x"
[service.undrain]
http = "http://x"
grace-ms = 5
[service.metrics]
url = "ftp://x/metrics"
requests = "9requests"
error-label = "a-b"
error-values = []
latency-unit = "minutes"
timeout-ms = 0
[[service]]
name = "twice"
root = "/srv/twice"
restart-command = ["true"]
manage-container = true
docker-socket = "relative.sock"
[service.database]
postgres = "host=db"
sqlite = "/var/lib/twice.db"
[[service]]
name = "boxed"
root = "/srv/boxed"
restart-command = ["true"]
container = "+x"
manage-container = true
[service.database]
postgres = "host=db"
sqlite = "/var/lib/twice.db"
"#;
        let raw: RawConfig = rewind_shared::config::parse_toml(Path::new("a.toml"), text)
            .unwrap()
            .value;
        let problems = raw.validate().unwrap_err();
        let joined = problems.join("\n");
        for expected in [
            "host-id",
            "coordinators",
            "data-dir",
            "tls",
            "health-interval-ms",
            "drift-check-interval-s: is 2, must be 0 (never) or within 5..=86400",
            "service.web.root",
            "'..'",
            "absolute",
            "service.web.restart-command",
            "exactly one of http, tcp or command",
            "service.web.drain: set exactly one of command or http",
            "service.web.undrain.grace-ms",
            "service.web.metrics.url",
            "service.web.metrics.requests: \"9requests\" is not a Prometheus metric name",
            "service.web.metrics.error-label",
            "service.web.metrics.error-values",
            "service.web.metrics.latency-unit",
            "service.web.metrics.timeout-ms",
            "service.web.packages: \"--all\" is not a package name",
            "service.web.keep-releases: is 0",
            "service.web.env-files: path \"/etc/env\"",
            "service.web.env-files: \"/abs\" is also in config-files",
            "service.web.self-revert.failing-for-s: is 0",
            "service.web.database: postgres: not a libpq connection string",
            "service.twice.database: set one of postgres (a libpq connection string) or sqlite",
            "service.twice.manage-container: names no container",
            "service.twice.docker-socket: \"relative.sock\" is not an absolute path",
            "service.boxed.container: \"+x\" is not a container name Docker accepts",
        ] {
            assert!(
                joined.contains(expected),
                "{expected} missing from:\n{joined}"
            );
        }
    }

    #[test]
    fn a_config_of_an_earlier_agent_with_code_release_interval_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let text = std::fs::read_to_string(example).unwrap();
        let (head, rest) = text.split_once("\n[").unwrap();
        std::fs::write(
            &path,
            format!("{head}\ncode-release-interval-s = 300\n[{rest}"),
        )
        .unwrap();
        let (raw, unknown) = RawConfig::load(&path).unwrap();
        assert!(unknown.is_empty(), "{unknown:?}");
        assert!(raw.validate().unwrap().obsolete_code_release_interval);
    }

    #[test]
    fn https_files_must_be_absolute_and_usable_and_plain_http_headers_are_warned_about() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let text = std::fs::read_to_string(example).unwrap();
        let with = |added: &str| {
            let text = format!("{text}\n{added}");
            let raw: RawConfig = rewind_shared::config::parse_toml(Path::new("a.toml"), &text)
                .unwrap()
                .value;
            raw.validate()
        };
        let problems =
            with("[https]\nca-file = \"ca.pem\"\nclient-cert-file = \"/nonexistent.pem\"\n")
                .map(|_| ())
                .unwrap_err()
                .join("\n");
        assert!(
            problems.contains("https.ca-file: ca.pem must be an absolute path"),
            "{problems}"
        );
        let problems = with("[https]\nca-file = \"/nonexistent/ca.pem\"\n")
            .map(|_| ())
            .unwrap_err()
            .join("\n");
        assert!(
            problems.contains("https.ca-file: cannot read /nonexistent/ca.pem"),
            "{problems}"
        );
        let purge = "[[service.purge]]\nurl = \"http://cdn.internal/purge\"\n\
                     headers = { \"Authorization\" = \"Bearer t\" }\n";
        let config = with(purge).unwrap();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("purge http://cdn.internal/purge is plain http://"),
            "{warnings:?}"
        );
        let quiet = with(&purge.replace("http://", "https://")).unwrap();
        assert!(quiet.warnings().is_empty());
    }

    #[test]
    fn the_shipped_example_config_loads_without_unknown_keys() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let (raw, unknown) = RawConfig::load(&path).unwrap();
        assert!(unknown.is_empty(), "{unknown:?}");
        let config = raw.validate().unwrap();
        assert!(!config.obsolete_code_release_interval);
        assert_eq!(config.services[0].probes.len(), 3);
        assert_eq!(
            config.services[0].probes[0].kind,
            ProbeKind::Http {
                url: "http://127.0.0.1:8080/health".into(),
                expect_status: 200
            }
        );
    }
}
