//! The optional steps of the agent's reversion catalogue: reload, named commands, job
//! processor pause/resume with a checkpoint, cache purges, stepped scale-up and synthetic checks.
//!
//! Everything a step executes comes from this host's config: the coordinator names a step (and,
//! for a named command, argument values each checked against the pattern the config declares),
//! never a program, URL or path. No step runs anything from inside a release: a rollback must not
//! depend on the code it is rolling away from.
//!
//! ```toml
//! [[service]]
//! name = "web"
//! reload-command = ["systemctl", "reload", "web"]
//! [[service.command]]
//! name = "warm-cache"
//! argv = ["/usr/local/bin/warm-cache", "--region", "{region}"]
//! args = { region = "[a-z]+-[a-z]+" }       # anchored: the whole value must match
//! [service.jobs]
//! pause = { command = ["/usr/local/bin/jobs", "pause"] }
//! resume = { http = "http://127.0.0.1:8080/jobs/resume" }
//! checkpoint-file = "shared/jobs.checkpoint"
//! [[service.purge]]
//! url = "http://127.0.0.1:6081/"
//! method = "BAN"
//! headers = { "X-Ban-Url" = "^/api/" }
//! [[service.purge]]                          # a CDN's purge API, over HTTPS
//! url = "https://api.cdn.example/v1/zones/web/purge"
//! method = "POST"
//! headers = { "Authorization" = "Bearer ...", "Content-Type" = "application/json" }
//! body = '{"tags": ["web-assets"]}'
//! ca-file = "/etc/rewind/cdn-ca.pem"         # only for a CA of its own
//! [service.reconcile]                       # after the restore: sessions, caches of its state
//! command = ["/usr/local/bin/reconcile-sessions"]
//! [service.client-cache]                    # clients drop what the reverted release cached
//! on = { http = "http://127.0.0.1:8080/admin/clear-site-data/on" }
//! off = { http = "http://127.0.0.1:8080/admin/clear-site-data/off" }
//! window-s = 3600
//! [service.scale-up]
//! command = ["/usr/local/bin/set-capacity", "{percent}"]
//! stages = [25, 50, 100]
//! wait-ms = 10000
//! [[service.check]]
//! name = "cart"
//! url = "http://127.0.0.1:8080/api/cart"
//! body-contains = "items"
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use regex::Regex;
use rewind_shared::config::Problems;
use rewind_shared::names::{self, truncate};
use rewind_shared::outbound::HttpsFiles;
use serde::Deserialize;

use crate::AgentError;
use crate::config::{
    Hook, HookKind, RawHook, ServiceConfig, Sessions, SessionsSource, validate_hook,
};
use crate::host::Host;
use crate::probes::Prober;
use crate::store::{KeptFile, Store};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// Bounds on what a config may declare, so one step stays bounded in time and memory.
const MAX_COMMANDS: usize = 32;
const MAX_ARG_BYTES: usize = 256;
const MAX_PURGES: usize = 32;
const MAX_CHECKS: usize = 32;
const MAX_STAGES: usize = 10;
const MAX_WAIT_MS: u64 = 600_000;
const MAX_CHECKPOINT_BYTES: u64 = 64 * 1024;
/// Attempts of one HTTP request (purge, check) before the step fails.
const MAX_HTTP_ATTEMPTS_LIMIT: u32 = 10;
/// Headers and body of one purge or check request.
const MAX_HTTP_HEADERS: usize = 32;
const MAX_HTTP_HEADER_BYTES: usize = 8 * 1024;
const MAX_HTTP_BODY_BYTES: usize = 64 * 1024;
const RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// Config of a service's optional steps, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawCommand {
    pub name: String,
    pub argv: Vec<String>,
    /// Placeholder -> pattern its value must match in full.
    pub args: BTreeMap<String, String>,
    pub timeout_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawJobs {
    pub pause: Option<RawHook>,
    pub resume: Option<RawHook>,
    /// Where the processors record completed work, relative to the service root.
    pub checkpoint_file: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawPurge {
    pub url: String,
    /// `PURGE` (default), `BAN`, or for a CDN's purge API `POST`, `PUT` or `DELETE`.
    pub method: Option<String>,
    pub headers: BTreeMap<String, String>,
    /// Sent with a `POST`, `PUT` or `DELETE` (a CDN's purge API takes the URLs or tags in JSON).
    pub body: Option<String>,
    /// A PEM file of CAs trusted for an `https://` URL besides the system's and public ones.
    pub ca_file: Option<std::path::PathBuf>,
    /// A PEM certificate chain and its key, presented to an endpoint that asks for one.
    pub client_cert_file: Option<std::path::PathBuf>,
    pub client_key_file: Option<std::path::PathBuf>,
    pub timeout_ms: Option<u64>,
    /// Attempts before the step fails (default 3).
    pub attempts: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawScaleUp {
    /// argv with `{percent}`, run once per stage.
    pub command: Vec<String>,
    pub stages: Vec<u32>,
    /// Wait after each stage before probing.
    pub wait_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawCheck {
    pub name: String,
    pub url: String,
    /// `GET` (default) or `POST`.
    pub method: Option<String>,
    pub body: Option<String>,
    pub headers: BTreeMap<String, String>,
    /// A PEM file of CAs trusted for an `https://` URL besides the system's and public ones.
    pub ca_file: Option<std::path::PathBuf>,
    /// A PEM certificate chain and its key, presented to an endpoint that asks for one.
    pub client_cert_file: Option<std::path::PathBuf>,
    pub client_key_file: Option<std::path::PathBuf>,
    pub expect_status: Option<u16>,
    pub body_contains: Option<String>,
    pub max_latency_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub attempts: Option<u32>,
}

/// The client-cache switch, as written: `on` makes the service (or its proxy) tell clients to
/// drop what they cached (a `Clear-Site-Data` header), `off` stops it after `window-s`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RawClientCache {
    pub on: Option<RawHook>,
    pub off: Option<RawHook>,
    pub window_s: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct ClientCache {
    pub on: Hook,
    pub off: Hook,
    pub window: Duration,
}

/// Longest client-cache window: a day.
const MAX_CLIENT_CACHE_WINDOW_S: u64 = 86_400;

/// A service's optional steps, validated.
#[derive(Clone, Debug, Default)]
pub struct Catalogue {
    pub reload_command: Option<Vec<String>>,
    /// Run after a restore (session stores, caches of the reverted release's state).
    pub reconcile: Option<Hook>,
    pub client_cache: Option<ClientCache>,
    pub commands: BTreeMap<String, NamedCommand>,
    pub jobs: Option<Jobs>,
    pub purges: Vec<Purge>,
    pub scale_up: Option<ScaleUp>,
    pub checks: Vec<Check>,
}

#[derive(Clone, Debug)]
pub struct NamedCommand {
    pub argv: Vec<String>,
    pub args: BTreeMap<String, Regex>,
    pub timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct Jobs {
    pub pause: Hook,
    pub resume: Hook,
    pub checkpoint_file: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Purge {
    pub url: String,
    pub method: reqwest::Method,
    pub headers: BTreeMap<String, String>,
    pub body: Option<String>,
    /// Its own client when it trusts a CA of its own (`ca-file`); else the prober's.
    pub client: Option<reqwest::Client>,
    pub timeout: Duration,
    pub attempts: u32,
}

#[derive(Clone, Debug)]
pub struct ScaleUp {
    pub command: Vec<String>,
    pub stages: Vec<u32>,
    pub wait: Duration,
    pub timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub url: String,
    pub post_body: Option<String>,
    pub headers: Vec<(String, String)>,
    /// Its own client when it trusts a CA of its own (`ca-file`); else the prober's.
    pub client: Option<reqwest::Client>,
    pub expect_status: u16,
    pub body_contains: Option<String>,
    pub max_latency: Option<Duration>,
    pub timeout: Duration,
    pub attempts: u32,
}

/// The optional-step sections of one service, as the config file holds them.
pub struct RawSections<'a> {
    pub reload_command: Option<&'a Vec<String>>,
    pub reconcile: Option<&'a RawHook>,
    pub client_cache: Option<&'a RawClientCache>,
    pub commands: &'a [RawCommand],
    pub jobs: Option<&'a RawJobs>,
    pub purges: &'a [RawPurge],
    pub scale_up: Option<&'a RawScaleUp>,
    pub checks: &'a [RawCheck],
}

/// Validates a service's optional steps, adding every problem found.
pub fn validate(
    field: &str,
    root: &Path,
    raw: RawSections<'_>,
    problems: &mut Problems,
) -> Catalogue {
    let mut catalogue = Catalogue::default();
    if let Some(argv) = raw.reload_command {
        check_program(&format!("{field}.reload-command"), root, argv, problems);
        catalogue.reload_command = Some(argv.clone());
    }
    if raw.commands.len() > MAX_COMMANDS {
        problems.add(
            format!("{field}.command"),
            format!("{} commands, at most {MAX_COMMANDS}", raw.commands.len()),
        );
    }
    for (position, command) in raw.commands.iter().enumerate() {
        let command_field = format!("{field}.command[{position}]");
        if let Err(error) = names::validate_name(&format!("{command_field}.name"), &command.name) {
            problems.add_error(error);
        }
        if catalogue.commands.contains_key(&command.name) {
            problems.add(
                &command_field,
                format!("{:?} is declared twice", command.name),
            );
        }
        check_program(
            &format!("{command_field}.argv"),
            root,
            &command.argv,
            problems,
        );
        let mut args = BTreeMap::new();
        for (name, pattern) in &command.args {
            // The pattern must stand on its own, so wrapping it cannot change what it means
            // (`a)|(.*` would otherwise escape the anchors).
            if let Err(error) = Regex::new(pattern) {
                problems.add(
                    format!("{command_field}.args.{name}"),
                    format!("{pattern:?} is not a valid pattern: {error}"),
                );
                continue;
            }
            match Regex::new(&format!("^(?:{pattern})$")) {
                Ok(regex) => {
                    args.insert(name.clone(), regex);
                }
                Err(error) => problems.add(
                    format!("{command_field}.args.{name}"),
                    format!("{pattern:?} is not a valid pattern: {error}"),
                ),
            }
        }
        let used = placeholders(&command.argv);
        for name in used.iter().filter(|name| !command.args.contains_key(*name)) {
            problems.add(
                format!("{command_field}.argv"),
                format!("uses {{{name}}}, which args does not declare"),
            );
        }
        for name in command.args.keys().filter(|name| !used.contains(name)) {
            problems.add(
                format!("{command_field}.args.{name}"),
                "is declared but argv never uses it",
            );
        }
        let timeout = bounded_ms(
            &format!("{command_field}.timeout-ms"),
            command.timeout_ms,
            60_000,
            problems,
        );
        catalogue.commands.insert(
            command.name.clone(),
            NamedCommand {
                argv: command.argv.clone(),
                args,
                timeout,
            },
        );
    }
    if let Some(jobs) = raw.jobs {
        catalogue.jobs = validate_jobs(&format!("{field}.jobs"), root, jobs, problems);
    }
    if let Some(reconcile) = raw.reconcile {
        catalogue.reconcile =
            validate_step_hook(&format!("{field}.reconcile"), root, reconcile, problems);
    }
    if let Some(client_cache) = raw.client_cache {
        catalogue.client_cache = validate_client_cache(
            &format!("{field}.client-cache"),
            root,
            client_cache,
            problems,
        );
    }
    if raw.purges.len() > MAX_PURGES {
        problems.add(
            format!("{field}.purge"),
            format!("{} purges, at most {MAX_PURGES}", raw.purges.len()),
        );
    }
    for (position, purge) in raw.purges.iter().enumerate() {
        let purge_field = format!("{field}.purge[{position}]");
        check_url(&format!("{purge_field}.url"), &purge.url, problems);
        let method_name = purge.method.as_deref().unwrap_or("PURGE");
        let method = match method_name {
            "PURGE" | "BAN" | "POST" | "PUT" | "DELETE" => {
                reqwest::Method::from_bytes(method_name.as_bytes())
            }
            other => {
                problems.add(
                    format!("{purge_field}.method"),
                    format!("{other:?} must be PURGE, BAN, POST, PUT or DELETE"),
                );
                reqwest::Method::from_bytes(b"PURGE")
            }
        }
        .expect("the purge methods are valid method tokens");
        check_headers(&purge_field, &purge.headers, problems);
        if purge.body.is_some() && !matches!(method_name, "POST" | "PUT" | "DELETE") {
            problems.add(
                format!("{purge_field}.body"),
                "only a POST, PUT or DELETE sends a body",
            );
        }
        check_body(&purge_field, purge.body.as_deref(), problems);
        catalogue.purges.push(Purge {
            url: purge.url.clone(),
            method,
            headers: purge.headers.clone(),
            body: purge.body.clone(),
            client: own_client(&purge_field, purge.https_files(), problems),
            timeout: bounded_ms(
                &format!("{purge_field}.timeout-ms"),
                purge.timeout_ms,
                5_000,
                problems,
            ),
            attempts: attempts(&format!("{purge_field}.attempts"), purge.attempts, problems),
        });
    }
    if let Some(scale) = raw.scale_up {
        let scale_field = format!("{field}.scale-up");
        check_program(
            &format!("{scale_field}.command"),
            root,
            &scale.command,
            problems,
        );
        if placeholders(&scale.command) != ["percent"] {
            problems.add(
                format!("{scale_field}.command"),
                "must use {percent} (and no other placeholder)",
            );
        }
        let rising = scale.stages.windows(2).all(|pair| pair[0] < pair[1]);
        if scale.stages.is_empty()
            || scale.stages.len() > MAX_STAGES
            || !rising
            || scale.stages.iter().any(|stage| !(1..=100).contains(stage))
        {
            problems.add(
                format!("{scale_field}.stages"),
                format!(
                    "{:?} must be 1 to {MAX_STAGES} rising percentages within 1..=100",
                    scale.stages
                ),
            );
        }
        let wait_ms = scale.wait_ms.unwrap_or(10_000);
        if wait_ms > MAX_WAIT_MS {
            problems.add(
                format!("{scale_field}.wait-ms"),
                format!("is {wait_ms}, at most {MAX_WAIT_MS}"),
            );
        }
        catalogue.scale_up = Some(ScaleUp {
            command: scale.command.clone(),
            stages: scale.stages.clone(),
            wait: Duration::from_millis(wait_ms),
            timeout: bounded_ms(
                &format!("{scale_field}.timeout-ms"),
                scale.timeout_ms,
                60_000,
                problems,
            ),
        });
    }
    if raw.checks.len() > MAX_CHECKS {
        problems.add(
            format!("{field}.check"),
            format!("{} checks, at most {MAX_CHECKS}", raw.checks.len()),
        );
    }
    for (position, check) in raw.checks.iter().enumerate() {
        let check_field = format!("{field}.check[{position}]");
        if let Err(error) = names::validate_name(&format!("{check_field}.name"), &check.name) {
            problems.add_error(error);
        }
        check_url(&format!("{check_field}.url"), &check.url, problems);
        let post_body = match (check.method.as_deref().unwrap_or("GET"), &check.body) {
            ("GET", None) => None,
            ("GET", Some(_)) => {
                problems.add(format!("{check_field}.body"), "only a POST sends a body");
                None
            }
            ("POST", body) => Some(body.clone().unwrap_or_default()),
            (other, _) => {
                problems.add(
                    format!("{check_field}.method"),
                    format!("{other:?} must be GET or POST"),
                );
                None
            }
        };
        check_headers(&check_field, &check.headers, problems);
        check_body(&check_field, post_body.as_deref(), problems);
        catalogue.checks.push(Check {
            name: check.name.clone(),
            url: check.url.clone(),
            post_body,
            headers: check
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
            client: own_client(&check_field, check.https_files(), problems),
            expect_status: check.expect_status.unwrap_or(200),
            body_contains: check.body_contains.clone(),
            max_latency: check.max_latency_ms.map(Duration::from_millis),
            timeout: bounded_ms(
                &format!("{check_field}.timeout-ms"),
                check.timeout_ms,
                5_000,
                problems,
            ),
            attempts: attempts(&format!("{check_field}.attempts"), check.attempts, problems),
        });
    }
    catalogue
}

/// A hook a catalogue step runs (a command or an HTTP POST), with no sessions to wait for.
fn validate_step_hook(
    field: &str,
    root: &Path,
    hook: &RawHook,
    problems: &mut Problems,
) -> Option<Hook> {
    if let Some(argv) = &hook.command {
        check_program(&format!("{field}.command"), root, argv, problems);
    }
    crate::config::refuse_sessions(field, hook, problems);
    validate_hook(field, hook, problems)
}

/// A section's required hook (`key`), validated.
fn required_hook(
    field: &str,
    root: &Path,
    key: &str,
    hook: Option<&RawHook>,
    problems: &mut Problems,
) -> Option<Hook> {
    let Some(hook) = hook else {
        problems.add(format!("{field}.{key}"), "is required (command or http)");
        return None;
    };
    validate_step_hook(&format!("{field}.{key}"), root, hook, problems)
}

fn validate_client_cache(
    field: &str,
    root: &Path,
    raw: &RawClientCache,
    problems: &mut Problems,
) -> Option<ClientCache> {
    let on = required_hook(field, root, "on", raw.on.as_ref(), problems);
    let off = required_hook(field, root, "off", raw.off.as_ref(), problems);
    let window_s = raw.window_s.unwrap_or(3_600);
    if !(1..=MAX_CLIENT_CACHE_WINDOW_S).contains(&window_s) {
        problems.add(
            format!("{field}.window-s"),
            format!("is {window_s}, must be within 1..={MAX_CLIENT_CACHE_WINDOW_S}"),
        );
    }
    Some(ClientCache {
        on: on?,
        off: off?,
        window: Duration::from_secs(window_s),
    })
}

fn validate_jobs(field: &str, root: &Path, raw: &RawJobs, problems: &mut Problems) -> Option<Jobs> {
    let mut hook =
        |key: &str, hook: Option<&RawHook>| required_hook(field, root, key, hook, problems);
    let pause = hook("pause", raw.pause.as_ref());
    let resume = hook("resume", raw.resume.as_ref());
    if let Some(path) = &raw.checkpoint_file
        && let Err(error) = crate::paths::check_relative("jobs", path)
    {
        problems.add(format!("{field}.checkpoint-file"), error.to_string());
    }
    Some(Jobs {
        pause: pause?,
        resume: resume?,
        checkpoint_file: raw.checkpoint_file.clone(),
    })
}

/// An argv must name a program, and nothing in it may point inside the service's releases (not
/// the program, nor a script handed to an interpreter): the agent reverts with its own code and
/// the host's, never with what the release being reverted shipped. Paths are compared after
/// resolving links where they exist, so a symlinked root or program does not hide one.
pub fn check_program(field: &str, root: &Path, argv: &[String], problems: &mut Problems) {
    let Some(program) = argv.first() else {
        problems.add(field, "must name a program");
        return;
    };
    if program.contains('{') {
        problems.add(
            field,
            format!("{program:?}: the program itself cannot be a placeholder"),
        );
    }
    let resolved_root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let release_dirs: Vec<std::path::PathBuf> = [root, resolved_root.as_path()]
        .iter()
        .flat_map(|root| {
            [crate::snapshot::RELEASES_DIR, crate::snapshot::CURRENT_LINK].map(|dir| root.join(dir))
        })
        .collect();
    let inside_release = |text: &str| {
        // Any absolute path in the element, e.g. `/srv/web/current/x.sh` or `--file=/srv/...`.
        text.split(['=', ':', ' '])
            .filter(|part| part.starts_with('/'))
            .map(Path::new)
            .any(|path| {
                let resolved = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
                release_dirs
                    .iter()
                    .any(|dir| path.starts_with(dir) || resolved.starts_with(dir))
            })
    };
    let relative_program = Path::new(program).is_relative() && program.contains('/');
    if relative_program || argv.iter().any(|part| inside_release(part)) {
        problems.add(
            field,
            format!(
                "{:?} runs or reads something from inside a release (or a relative path): a \
                 rollback must not run the code it reverts; name a program installed on the host",
                argv.join(" ")
            ),
        );
    }
}

fn check_url(field: &str, url: &str, problems: &mut Problems) {
    let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
    if !scheme_ok || reqwest::Url::parse(url).is_err() {
        problems.add(field, format!("{url:?} must be an http:// or https:// URL"));
    }
}

fn check_headers(field: &str, headers: &BTreeMap<String, String>, problems: &mut Problems) {
    if headers.len() > MAX_HTTP_HEADERS {
        problems.add(
            format!("{field}.headers"),
            format!("{} headers, at most {MAX_HTTP_HEADERS}", headers.len()),
        );
    }
    for (name, value) in headers {
        if name.len() + value.len() > MAX_HTTP_HEADER_BYTES {
            problems.add(
                format!("{field}.headers.{}", truncate(name, 64)),
                format!("is longer than {MAX_HTTP_HEADER_BYTES} bytes"),
            );
        } else if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
            || reqwest::header::HeaderValue::from_str(value).is_err()
        {
            problems.add(
                format!("{field}.headers.{name}"),
                "is not a valid HTTP header (name and visible ASCII value)",
            );
        }
    }
}

fn check_body(field: &str, body: Option<&str>, problems: &mut Problems) {
    if let Some(body) = body.filter(|body| body.len() > MAX_HTTP_BODY_BYTES) {
        problems.add(
            format!("{field}.body"),
            format!("is {} bytes, at most {MAX_HTTP_BODY_BYTES}", body.len()),
        );
    }
}

// The TLS files a purge or a check names.
rewind_shared::https_files_of!(RawPurge, RawCheck);

/// A client of its own for an endpoint with TLS files of its own (a private CA, a client
/// certificate); `None` without any (the prober's client serves, with the agent's `[https]`).
fn own_client(field: &str, files: HttpsFiles, problems: &mut Problems) -> Option<reqwest::Client> {
    if files.is_empty() {
        return None;
    }
    match https_trust(field, &files, problems)?.client() {
        Ok(client) => Some(client),
        Err(error) => {
            problems.add(field, error);
            None
        }
    }
}

/// `files` (`ca-file`, `client-cert-file`, `client-key-file` under `field`, absolute paths:
/// the agent may start from any directory) read and checked; `None` with the problems added.
pub(crate) fn https_trust(
    field: &str,
    files: &HttpsFiles,
    problems: &mut Problems,
) -> Option<rewind_shared::outbound::HttpsTrust> {
    let mut relative = false;
    for (key, path) in [
        ("ca-file", &files.ca_file),
        ("client-cert-file", &files.client_cert_file),
        ("client-key-file", &files.client_key_file),
    ] {
        if let Some(path) = path.as_ref().filter(|path| !path.is_absolute()) {
            problems.add(
                format!("{field}.{key}"),
                format!("{} must be an absolute path", path.display()),
            );
            relative = true;
        }
    }
    if relative {
        return None;
    }
    files
        .load(field)
        .map_err(|found| {
            for problem in found {
                problems.add_error(problem);
            }
        })
        .ok()
}

fn bounded_ms(field: &str, value: Option<u64>, default: u64, problems: &mut Problems) -> Duration {
    let ms = value.unwrap_or(default);
    if !(1..=MAX_WAIT_MS).contains(&ms) {
        problems.add(field, format!("is {ms}, must be within 1..={MAX_WAIT_MS}"));
    }
    Duration::from_millis(ms)
}

fn attempts(field: &str, value: Option<u32>, problems: &mut Problems) -> u32 {
    let attempts = value.unwrap_or(3);
    if !(1..=MAX_HTTP_ATTEMPTS_LIMIT).contains(&attempts) {
        problems.add(
            field,
            format!("is {attempts}, must be within 1..={MAX_HTTP_ATTEMPTS_LIMIT}"),
        );
    }
    attempts
}

/// `{name}` placeholders used in an argv, sorted and deduplicated.
fn placeholders(argv: &[String]) -> Vec<String> {
    let mut found: Vec<String> = argv
        .iter()
        .flat_map(|part| {
            part.split('{')
                .skip(1)
                .filter_map(|rest| rest.split_once('}').map(|(name, _)| name.to_string()))
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Fills `{name}` placeholders in one pass, left to right: a value is never expanded again.
fn substitute(argv: &[String], values: &HashMap<String, String>) -> Vec<String> {
    argv.iter()
        .map(|part| {
            let mut out = String::with_capacity(part.len());
            let mut rest = part.as_str();
            while let Some(open) = rest.find('{') {
                out.push_str(&rest[..open]);
                let after = &rest[open + 1..];
                match after.split_once('}') {
                    Some((name, tail)) if values.contains_key(name) => {
                        out.push_str(&values[name]);
                        rest = tail;
                    }
                    _ => {
                        out.push('{');
                        rest = after;
                    }
                }
            }
            out.push_str(rest);
            out
        })
        .collect()
}

/// The argv of a named command with `args` filled in, after checking every value against its
/// declared pattern. Unlisted commands, unknown or missing arguments and bad values are refused.
pub fn render_command(
    service: &ServiceConfig,
    name: &str,
    args: &HashMap<String, String>,
) -> Result<(Vec<String>, Duration), AgentError> {
    let command = service.catalogue.commands.get(name).ok_or_else(|| {
        let known: Vec<&str> = service
            .catalogue
            .commands
            .keys()
            .map(String::as_str)
            .collect();
        AgentError::refused(
            "command",
            format!(
                "command {:?} is not in the allow-list of {} (allowed: {})",
                truncate(name, 64),
                service.name,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
        )
    })?;
    if let Some(given) = args.keys().find(|key| !command.args.contains_key(*key)) {
        return Err(AgentError::refused(
            "argument",
            format!("command {name} takes no argument {:?}", truncate(given, 64)),
        ));
    }
    for (arg, pattern) in &command.args {
        let value = args.get(arg).ok_or_else(|| {
            AgentError::refused("argument", format!("command {name} needs argument {arg}"))
        })?;
        let problem = if value.len() > MAX_ARG_BYTES {
            Some(format!("is longer than {MAX_ARG_BYTES} bytes"))
        } else if value.contains(['\0', '\n']) {
            Some("contains a NUL or a newline".to_string())
        } else if !pattern.is_match(value) {
            Some(format!("does not match {}", pattern.as_str()))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(AgentError::refused(
                "argument",
                format!(
                    "argument {arg}={:?} of command {name} {problem}",
                    truncate(value, 64)
                ),
            ));
        }
    }
    Ok((substitute(&command.argv, args), command.timeout))
}

/// Runs the stages of a stepped scale-up: the command at each percentage, a wait, then every
/// probe of the service, which must pass before the next stage.
pub async fn scale_up(
    host: &dyn Host,
    prober: &Prober,
    service: &ServiceConfig,
) -> Result<String, AgentError> {
    let scale = not_configured(service, "scale-up", service.catalogue.scale_up.as_ref())?;
    for stage in &scale.stages {
        let values = HashMap::from([("percent".to_string(), stage.to_string())]);
        host.run(&substitute(&scale.command, &values), scale.timeout)
            .await?;
        tokio::time::sleep(scale.wait).await;
        for probe in &service.probes {
            let result = prober.probe(host, &service.name, probe).await;
            if !result.ok {
                return Err(AgentError::refused(
                    "scale-up",
                    format!(
                        "scale-up stopped at {stage}%: probe {} failed: {}",
                        result.probe, result.detail
                    ),
                ));
            }
        }
    }
    let shown: Vec<String> = scale
        .stages
        .iter()
        .map(|stage| format!("{stage}%"))
        .collect();
    Ok(format!(
        "scaled up in {} stages ({}), probes passing after each",
        scale.stages.len(),
        shown.join(" -> ")
    ))
}

/// Sends every configured purge, each retried up to its attempts.
pub async fn purge(prober: &Prober, service: &ServiceConfig) -> Result<String, AgentError> {
    let purges = &service.catalogue.purges;
    if purges.is_empty() {
        return Err(AgentError::refused(
            "purge",
            format!("service {} has no purge configured", service.name),
        ));
    }
    let shared = prober.http_client();
    let mut done = Vec::new();
    for purge in purges {
        let client = purge.client.as_ref().unwrap_or(&shared);
        let status = with_attempts(purge.attempts, || async {
            let mut request = client
                .request(purge.method.clone(), &purge.url)
                .timeout(purge.timeout);
            for (name, value) in &purge.headers {
                request = request.header(name, value);
            }
            if let Some(body) = &purge.body {
                request = request.body(body.clone());
            }
            let response = request
                .send()
                .await
                .map_err(|error| format!("{} {}: {error}", purge.method, purge.url))?;
            let status = response.status();
            if status.is_success() {
                Ok(status.as_u16())
            } else {
                Err(format!("{} {} answered {status}", purge.method, purge.url))
            }
        })
        .await
        .map_err(|why| AgentError::refused("purge", why))?;
        done.push(format!("{} {} -> {status}", purge.method, purge.url));
    }
    Ok(done.join("; "))
}

/// Runs every configured synthetic check; fails naming each one that failed.
pub async fn run_checks(prober: &Prober, service: &ServiceConfig) -> Result<String, AgentError> {
    let checks = &service.catalogue.checks;
    if checks.is_empty() {
        return Err(AgentError::refused(
            "checks",
            format!("service {} has no check configured", service.name),
        ));
    }
    let shared = prober.http_client();
    let mut passed = Vec::new();
    let mut failed = Vec::new();
    for check in checks {
        let client = check.client.as_ref().unwrap_or(&shared);
        match with_attempts(check.attempts, || run_check(client, check)).await {
            Ok(latency_ms) => passed.push(format!("{} ({latency_ms} ms)", check.name)),
            Err(error) => failed.push(format!("{}: {error}", check.name)),
        }
    }
    if failed.is_empty() {
        Ok(format!("checks passed: {}", passed.join(", ")))
    } else {
        Err(AgentError::refused(
            "checks",
            format!("checks failed: {}", failed.join("; ")),
        ))
    }
}

async fn run_check(client: &reqwest::Client, check: &Check) -> Result<u128, String> {
    let http = rewind_shared::http_check::HttpCheck {
        url: &check.url,
        post_body: check.post_body.as_deref(),
        headers: &check.headers,
        expect_status: check.expect_status,
        body_contains: check.body_contains.as_deref(),
        max_latency: check.max_latency,
        timeout: check.timeout,
    };
    let passed = rewind_shared::http_check::run(client, &http).await?;
    Ok(passed.latency.as_millis())
}

/// Pauses the job processors, then keeps a copy of their checkpoint (bytes, mode and owner)
/// for `owner`, the rollback doing it. The file is read without following a symlink and must
/// be a regular file: a release cannot point the agent at another file.
pub async fn pause_jobs(
    host: &dyn Host,
    prober: &Prober,
    store: &Store,
    service: &ServiceConfig,
    owner: &str,
) -> Result<String, AgentError> {
    let jobs = not_configured(service, "jobs", service.catalogue.jobs.as_ref())?;
    let ran = run_hook(host, prober, service, "jobs.pause", &jobs.pause).await?;
    let Some(relative) = &jobs.checkpoint_file else {
        return Ok(ran);
    };
    let root = crate::paths::ServiceRoot::open(service)?;
    let kept = match root.read_regular(relative, MAX_CHECKPOINT_BYTES)? {
        Some((bytes, _)) if bytes.len() as u64 > MAX_CHECKPOINT_BYTES => {
            return Err(AgentError::refused(
                "checkpoint",
                format!(
                    "checkpoint {} is {} bytes, more than {MAX_CHECKPOINT_BYTES}",
                    root.path().join(relative).display(),
                    bytes.len()
                ),
            ));
        }
        Some((bytes, metadata)) => Some(KeptFile {
            bytes,
            mode: metadata.permissions().mode() & 0o7777,
            uid: metadata.uid(),
            gid: metadata.gid(),
        }),
        None => None,
    };
    store.put_checkpoint(&service.name, owner, kept.as_ref())?;
    Ok(match kept {
        Some(kept) => format!(
            "{ran}; kept checkpoint {relative} ({} bytes)",
            kept.bytes.len()
        ),
        None => format!("{ran}; no checkpoint at {relative} yet (kept as absent)"),
    })
}

/// Puts back the checkpoint `owner` kept at pause when the file differs from it (a restore
/// rolled it back, or it was removed), with its mode and owner, then resumes the processors.
pub async fn resume_jobs(
    host: &dyn Host,
    prober: &Prober,
    store: &Store,
    service: &ServiceConfig,
    owner: &str,
) -> Result<String, AgentError> {
    let jobs = not_configured(service, "jobs", service.catalogue.jobs.as_ref())?;
    let mut restored = String::new();
    if let (Some(relative), Some(kept)) = (
        &jobs.checkpoint_file,
        store.checkpoint(&service.name, owner)?,
    ) {
        let root = crate::paths::ServiceRoot::open(service)?;
        let now = root
            .read_regular(relative, MAX_CHECKPOINT_BYTES)?
            .map(|(bytes, _)| bytes);
        if now != kept.as_ref().map(|kept| kept.bytes.clone()) {
            match &kept {
                Some(kept) => root.write_atomically(
                    relative,
                    &kept.bytes,
                    kept.mode,
                    Some((kept.uid, kept.gid)),
                )?,
                None => root.remove_file(relative)?,
            }
            restored = format!("put back the checkpoint kept at pause into {relative}; ");
        }
    }
    let ran = run_hook(host, prober, service, "jobs.resume", &jobs.resume).await?;
    store.remove_checkpoint(&service.name, owner)?;
    Ok(format!("{restored}{ran}"))
}

/// Runs the service's reconcile hook (after a restore).
pub async fn reconcile(
    host: &dyn Host,
    prober: &Prober,
    service: &ServiceConfig,
) -> Result<String, AgentError> {
    let hook = not_configured(service, "reconcile", service.catalogue.reconcile.as_ref())?;
    run_hook(host, prober, service, "reconcile", hook).await
}

/// Switches the service's client-cache clearing on, and records when its window ends: the
/// agent's timer runs `off` then ([`close_client_cache_window`]), across restarts.
pub async fn clear_client_caches(
    host: &dyn Host,
    prober: &Prober,
    store: &Store,
    service: &ServiceConfig,
    now_ms: u64,
) -> Result<String, AgentError> {
    let switch = not_configured(
        service,
        "client-cache",
        service.catalogue.client_cache.as_ref(),
    )?;
    // Recorded first: if the agent stops right after `on`, `off` still runs.
    let due_ms = now_ms + switch.window.as_millis() as u64;
    store.put_client_cache_off(&service.name, due_ms)?;
    let ran = run_hook(host, prober, service, "client-cache.on", &switch.on).await?;
    Ok(format!(
        "{ran}; clients told to drop their caches for {} s (off at {due_ms} ms)",
        switch.window.as_secs()
    ))
}

/// Closes `service`'s client-cache window that ends at `due_ms`: runs `off`, then forgets the
/// window, unless a later step moved its end (then nothing runs now). The caller holds the
/// service's step lock, so no `clear-client-caches` step runs in between.
pub async fn close_client_cache_window(
    host: &dyn Host,
    prober: &Prober,
    store: &Store,
    service: &ServiceConfig,
    due_ms: u64,
) -> Result<Option<String>, AgentError> {
    if store.client_cache_off(&service.name)? != Some(due_ms) {
        return Ok(None);
    }
    let switch = not_configured(
        service,
        "client-cache",
        service.catalogue.client_cache.as_ref(),
    )?;
    let ran = run_hook(host, prober, service, "client-cache.off", &switch.off).await?;
    store.clear_client_cache_off(&service.name, due_ms)?;
    Ok(Some(ran))
}

/// Runs a hook (command or HTTP POST), then waits its grace period.
pub async fn run_hook(
    host: &dyn Host,
    prober: &Prober,
    service: &ServiceConfig,
    what: &str,
    hook: &Hook,
) -> Result<String, AgentError> {
    let done = match &hook.kind {
        HookKind::Command { argv } => {
            host.run(argv, hook.timeout).await?;
            format!("ran {}", argv.join(" "))
        }
        HookKind::HttpPost { url } => {
            let status =
                prober
                    .post(url, hook.timeout)
                    .await
                    .map_err(|detail| AgentError::Hook {
                        what: what.to_string(),
                        service: service.name.clone(),
                        detail,
                    })?;
            format!("POST {url} answered {status}")
        }
    };
    if let Some(sessions) = &hook.sessions {
        let waited = wait_for_sessions(prober, sessions, hook).await;
        return Ok(format!("{done}; {waited}"));
    }
    if hook.grace.is_zero() {
        return Ok(done);
    }
    tokio::time::sleep(hook.grace).await;
    Ok(format!(
        "{done}, then waited {} ms for sessions",
        hook.grace.as_millis()
    ))
}

/// Reads the active sessions every `poll` until they are at most `below`, for at most the
/// hook's grace; then goes on either way, as a load balancer's connection draining does, and
/// says how it ended.
async fn wait_for_sessions(prober: &Prober, sessions: &Sessions, hook: &Hook) -> String {
    let started = tokio::time::Instant::now();
    let mut first: Option<u64> = None;
    let mut last_error = String::new();
    loop {
        // No read may outlast the grace: the drain as a whole takes at most the hook, then
        // grace-ms (and the step's timeout cuts it anyway).
        let left = hook.grace.saturating_sub(started.elapsed());
        let read_timeout = hook.timeout.min(left).max(Duration::from_millis(1));
        match count_sessions(prober, &sessions.source, read_timeout).await {
            Ok(count) => {
                let from = *first.get_or_insert(count);
                if count <= sessions.below {
                    return format!(
                        "sessions {from} -> {count} in {} ms",
                        started.elapsed().as_millis()
                    );
                }
                last_error.clear();
                if started.elapsed() + sessions.poll > hook.grace {
                    return format!(
                        "sessions {from} -> still {count} after {} ms (grace-ms), went on",
                        started.elapsed().as_millis()
                    );
                }
            }
            Err(error) => {
                last_error = error;
                if started.elapsed() + sessions.poll > hook.grace {
                    return format!(
                        "sessions could not be read ({}) for {} ms (grace-ms), went on",
                        truncate(&last_error, 256),
                        started.elapsed().as_millis()
                    );
                }
            }
        }
        tokio::time::sleep(sessions.poll).await;
    }
}

/// Most bytes of a sessions page read.
const MAX_SESSIONS_PAGE_BYTES: usize = 4 << 20;

async fn count_sessions(
    prober: &Prober,
    source: &SessionsSource,
    timeout: Duration,
) -> Result<u64, String> {
    match source {
        SessionsSource::Metric { url, name } => {
            let read = async {
                let mut response = prober
                    .http_client()
                    .get(url)
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status)
                    .map_err(|error| format!("GET {url}: {error}"))?;
                let mut page = Vec::new();
                while let Some(chunk) = response
                    .chunk()
                    .await
                    .map_err(|error| format!("GET {url}: {error}"))?
                {
                    page.extend_from_slice(&chunk);
                    if page.len() > MAX_SESSIONS_PAGE_BYTES {
                        return Err(format!(
                            "{url} answered more than {MAX_SESSIONS_PAGE_BYTES} bytes"
                        ));
                    }
                }
                sessions_on_page(&String::from_utf8_lossy(&page), name)
            };
            tokio::time::timeout(timeout, read)
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "GET {url}: no answer within {} ms",
                        timeout.as_millis()
                    ))
                })
        }
        SessionsSource::Command { argv } => {
            use tokio::io::AsyncBufReadExt;
            let mut child = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|error| format!("{}: {error}", argv[0]))?;
            let stdout = child.stdout.take().expect("stdout is piped");
            let read = async {
                // Only the first line, and only so much of it: the rest is never read.
                let mut line = Vec::new();
                let mut limited =
                    tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(stdout, 256));
                limited
                    .read_until(b'\n', &mut line)
                    .await
                    .map_err(|error| format!("{}: {error}", argv[0]))?;
                drop(limited);
                let status = child
                    .wait()
                    .await
                    .map_err(|error| format!("{}: {error}", argv[0]))?;
                Ok::<_, String>((line, status))
            };
            let (line, status) = tokio::time::timeout(timeout, read).await.map_err(|_| {
                format!(
                    "{} did not answer within {} ms",
                    argv[0],
                    timeout.as_millis()
                )
            })??;
            if !status.success() {
                return Err(format!("{} exited with {status}", argv[0]));
            }
            let text = String::from_utf8_lossy(&line);
            let line = text.trim();
            line.parse::<u64>()
                .map_err(|_| format!("{} printed {:?}, not a count", argv[0], truncate(line, 64)))
        }
    }
}

/// The sum of a gauge's series on a Prometheus text page (a fraction rounds up: a session is
/// open until it is not).
fn sessions_on_page(page: &str, name: &str) -> Result<u64, String> {
    let scrape = prometheus_parse::Scrape::parse(page.lines().map(|line| Ok(line.to_string())))
        .map_err(|error| format!("not a Prometheus text page: {error}"))?;
    let mut found = false;
    let mut total = 0.0;
    for sample in scrape.samples.iter().filter(|sample| sample.metric == name) {
        let value = match sample.value {
            prometheus_parse::Value::Gauge(value) | prometheus_parse::Value::Untyped(value) => {
                value
            }
            // A counter never falls: the drain would always wait out its grace.
            _ => {
                return Err(format!(
                    "{name} is not a gauge: it cannot count open sessions"
                ));
            }
        };
        if !value.is_finite() || value < 0.0 {
            return Err(format!("{name} is {value}, not a count"));
        }
        found = true;
        total += value;
    }
    if !found {
        return Err(format!("no {name} on the page"));
    }
    Ok(total.ceil() as u64)
}

fn not_configured<'a, T>(
    service: &ServiceConfig,
    what: &str,
    section: Option<&'a T>,
) -> Result<&'a T, AgentError> {
    section.ok_or_else(|| {
        AgentError::refused(
            what,
            format!("not configured for service {} on this host", service.name),
        )
    })
}

/// Tries `attempt` up to `attempts` times, 500 ms apart; the last error if all fail.
async fn with_attempts<T, F, Fut>(attempts: u32, mut attempt: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut last = String::new();
    for tried in 1..=attempts.max(1) {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) => last = format!("{error} (attempt {tried} of {attempts})"),
        }
        if tried < attempts {
            tokio::time::sleep(rewind_shared::backoff::Backoff::fixed(RETRY_BACKOFF).delay(tried))
                .await;
        }
    }
    Err(last)
}

#[cfg(test)]
#[path = "catalogue_test.rs"]
mod tests;
