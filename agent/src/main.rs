//! `rewind-agent`: the host agent.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rewind_agent::config::{Config, RawConfig};
use rewind_agent::connection::Agent;
use rewind_agent::host::LocalHost;
use rewind_agent::snapshot;
use rewind_agent::steps::Executor;
use rewind_agent::store::Store;
use tracing::warn;

/// Exit code for bad configuration (EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "rewind-agent", version, about = "The rewind host agent")]
struct Cli {
    /// Agent config file.
    #[arg(long, short, env = "REWIND_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// This host's id, instead of the config's `host-id`: one config for every node of a
    /// DaemonSet, each node's name given here.
    #[arg(long, env = "REWIND_HOST_ID", global = true)]
    host_id: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (joining the cluster first if its certificate does not exist yet and
    /// join-token-file is set).
    Run,
    /// Join the cluster with a one-time join token: make this host's key and a CSR, have a
    /// coordinator member sign it, and write both where [tls] says.
    Join {
        /// The file holding the token (default: the config's join-token-file).
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Check the config and report every problem at once (unknown keys too), and the files it
    /// names (data directory, TLS files).
    CheckConfig {
        /// Check the config alone, not the files it names (before they are installed).
        #[arg(long)]
        no_files: bool,
    },
    /// Inspect the local snapshot store.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Inspect the step journal (stop the agent first: the store is locked while it runs).
    #[command(subcommand)]
    Journal(JournalCommand),
    /// The releases each service root holds and what `keep-releases` does with them.
    #[command(subcommand)]
    Releases(ReleasesCommand),
    /// Reverts this host did on its own while offline that no coordinator has recorded yet
    /// (stop the agent first).
    SelfReverts,
}

#[derive(Subcommand)]
enum ReleasesCommand {
    /// Each release and whether retention keeps it, and why.
    List,
    /// Remove the releases retention does not keep (the agent does this after each activation).
    Prune,
}

#[derive(Subcommand)]
enum JournalCommand {
    /// Every step this host executed: id, term, runs, outcome. One JSON object per line with
    /// --json.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// List snapshots, oldest first.
    List,
    /// Show one snapshot as JSON.
    Show { id: String },
    /// What differs between two snapshots, or between one and the live state (`live`).
    Diff { from: String, to: String },
}

fn main() -> ExitCode {
    let code = start();
    // Spans still queued for export (REWIND_OTLP_ENDPOINT) leave before the process does.
    rewind_shared::logging::shutdown();
    code
}

fn start() -> ExitCode {
    rewind_shared::config::private_umask();
    rewind_shared::logging::init("info");
    rewind_shared::tls::install_crypto_provider();
    if let Err(error) = rewind_shared::failpoint::setup() {
        eprintln!("error: {error}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    let Some(path) = cli.config.clone() else {
        eprintln!("error: --config (or REWIND_AGENT_CONFIG) is required");
        return ExitCode::from(EXIT_BAD_CONFIG);
    };
    let strict = matches!(cli.command, Command::CheckConfig { .. });
    let config = match load_config(&path, strict, cli.host_id.as_deref())
        .and_then(|config| files_usable(config, &cli.command))
    {
        Ok(config) => config,
        Err(problems) => {
            for problem in problems {
                eprintln!("{}: {problem}", path.display());
            }
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let result = match cli.command {
        Command::CheckConfig { .. } => {
            for warning in config.warnings() {
                eprintln!("{}: warning: {warning}", path.display());
            }
            println!(
                "{}: ok ({} services)",
                path.display(),
                config.services.len()
            );
            Ok(())
        }
        Command::Run => run(config),
        Command::Join { token_file } => join(&config, token_file),
        Command::Snapshot(command) => inspect(&config, command),
        Command::Journal(JournalCommand::List { json }) => list_journal(&config, json),
        Command::Releases(command) => releases(&config, command),
        Command::SelfReverts => list_self_reverts(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn releases(config: &Config, command: ReleasesCommand) -> anyhow::Result<()> {
    let store = open_store(config)?;
    for service in &config.services {
        match command {
            ReleasesCommand::List => match rewind_agent::retention::plan(service, &store)? {
                None => println!("{}: keeps every release (no keep-releases)", service.name),
                Some(verdicts) => {
                    for (version, verdict) in verdicts {
                        let shown = match verdict {
                            rewind_agent::retention::Verdict::Remove => "would be removed",
                            kept => kept.describe(),
                        };
                        println!("{} {version}: {shown}", service.name);
                    }
                }
            },
            ReleasesCommand::Prune => {
                let removed = rewind_agent::retention::prune(service, &store)?;
                println!(
                    "{}: removed {}",
                    service.name,
                    if removed.is_empty() {
                        "nothing".to_string()
                    } else {
                        removed.join(", ")
                    }
                );
            }
        }
    }
    Ok(())
}

/// Loads and validates; `strict` also rejects unknown keys (for check-config).
fn load_config(path: &Path, strict: bool, host_id: Option<&str>) -> Result<Config, Vec<String>> {
    let (mut raw, unknown) = RawConfig::load(path).map_err(|error| vec![error.to_string()])?;
    if let Some(host_id) = host_id {
        raw.host_id = host_id.to_string();
    }
    let mut problems = Vec::new();
    for key in unknown {
        if strict {
            problems.push(format!("{key}: unknown key"));
        } else {
            warn!(key, "Unknown config key ignored.");
        }
    }
    match raw.validate() {
        Ok(config) if problems.is_empty() => Ok(config),
        Ok(_) => Err(problems),
        Err(more) => {
            problems.extend(more);
            Err(problems)
        }
    }
}

/// The files the command needs, checked before anything is created: the data directory always,
/// the TLS files for running (the CA only when the agent will join with its token first).
fn files_usable(config: Config, command: &Command) -> Result<Config, Vec<String>> {
    use rewind_shared::tls::{Needed, check_tls_files};
    let mut problems: Vec<String> =
        rewind_shared::config::data_dir_problem("data-dir", &config.data_dir)
            .into_iter()
            .collect();
    let joining = config
        .join_token_file
        .as_ref()
        .is_some_and(|token| token.exists());
    if let Command::CheckConfig { no_files: true } = command {
        return Ok(config);
    }
    let needed = match command {
        Command::Run | Command::CheckConfig { .. } if joining => Some(Needed::CaOnly),
        Command::Run | Command::CheckConfig { .. } => Some(Needed::All),
        Command::Join { .. } => Some(Needed::CaOnly),
        _ => None,
    };
    if let Some(needed) = needed {
        problems.extend(check_tls_files("tls", &config.tls, needed));
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

fn open_store(config: &Config) -> anyhow::Result<Store> {
    // The store holds env files (encrypted) and config files: nobody else may read it.
    rewind_shared::config::make_private(&config.data_dir, 3)
        .with_context(|| format!("make data dir {} private", config.data_dir.display()))?;
    Store::open(&config.data_dir.join("store")).context("open the local store")
}

fn run(config: Config) -> anyhow::Result<()> {
    let store = open_store(&config)?;
    // Two workers whatever the host's size: the agent's job is waiting, and every extra worker is
    // idle memory; but one is not enough, since journal writes flush (fsync) on the worker, and
    // a slow disk must not stall the session and health reports behind them.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the runtime")?;
    runtime.block_on(async move {
        rewind_agent::enroll::join_if_needed(&config).await?;
        tokio::spawn(rewind_agent::enroll::renew_when_due(config.clone()));
        if config.obsolete_code_release_interval {
            warn!(
                "code-release-interval-s is no longer used (the agent no longer drops its code \
                 pages from its resident memory): remove it from the config"
            );
        }
        for warning in config.warnings() {
            warn!("{warning}");
        }
        let prober = rewind_agent::probes::Prober::new(&config.https);
        let executor = Arc::new(
            Executor::new(store, config.services.clone(), Arc::new(LocalHost)).with_prober(prober),
        );
        let agent = Agent::new(config, executor);
        agent.run(rewind_shared::signals::shutdown()).await
    })
}

fn join(config: &Config, token_file: Option<PathBuf>) -> anyhow::Result<()> {
    let Some(path) = token_file.or_else(|| config.join_token_file.clone()) else {
        anyhow::bail!("name the token's file: --token-file, or join-token-file in the config");
    };
    let token = rewind_shared::enroll::read_token_file(&path)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the runtime")?;
    let enrolled = runtime.block_on(rewind_agent::enroll::join(config, &token))?;
    println!(
        "joined as {}; certificate {} valid until {} (unix seconds)",
        enrolled.identity,
        config.tls.cert.display(),
        enrolled.not_after_s
    );
    Ok(())
}

fn list_self_reverts(config: &Config) -> anyhow::Result<()> {
    let records = open_store(config)?.self_reverts()?;
    if records.is_empty() {
        println!("no self-revert waiting to be reported");
    }
    for record in records {
        println!(
            "{}  {}  {} -> {}  {}  {}; {}",
            record.id,
            record.service,
            record.change_id,
            record.snapshot_id,
            if record.ok { "ok" } else { "failed" },
            record.evidence,
            record.detail
        );
    }
    Ok(())
}

fn list_journal(config: &Config, json: bool) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let mut entries = store.journal_entries()?;
    entries.sort_by_key(|record| record.started_at_ms);
    for record in entries {
        if json {
            println!("{}", serde_json::to_string(&record)?);
            continue;
        }
        let outcome = match &record.outcome {
            Some(outcome) if outcome.ok => "ok".to_string(),
            Some(outcome) => format!("failed: {}", outcome.detail),
            None => "unfinished".to_string(),
        };
        println!(
            "{}  term {}  runs {}  {outcome}",
            record.step_id, record.term, record.runs
        );
    }
    Ok(())
}

fn inspect(config: &Config, command: SnapshotCommand) -> anyhow::Result<()> {
    let store = open_store(config)?;
    match command {
        SnapshotCommand::List => {
            let mut snapshots = store.snapshots()?;
            snapshots.sort_by_key(|record| record.captured_at_ms);
            for record in snapshots {
                let link = record
                    .manifest
                    .release_link
                    .as_deref()
                    .unwrap_or("(no link)");
                println!(
                    "{}  {}  {}  current -> {link}  {} files",
                    record.id,
                    record.captured_at_ms,
                    record.manifest.service,
                    record.manifest.files.len()
                );
            }
        }
        SnapshotCommand::Show { id } => {
            println!("{}", serde_json::to_string_pretty(&store.snapshot(&id)?)?)
        }
        SnapshotCommand::Diff { from, to } => {
            let from_record = store.snapshot(&from)?;
            let from_manifest = from_record.manifest;
            let (to_manifest, to_facts) = if to == "live" {
                let service = config
                    .services
                    .iter()
                    .find(|service| service.name == from_manifest.service)
                    .with_context(|| {
                        format!(
                            "service {} is no longer in the config",
                            from_manifest.service
                        )
                    })?;
                (
                    snapshot::live_manifest(service, Some(&store))?,
                    rewind_agent::facts::collect(service),
                )
            } else {
                let record = store.snapshot(&to)?;
                (record.manifest, record.facts)
            };
            let mut lines = snapshot::diff(&from_manifest, &to_manifest);
            lines.extend(rewind_agent::facts::diff(&from_record.facts, &to_facts));
            if lines.is_empty() {
                println!("no differences");
            }
            for line in lines {
                println!("{line}");
            }
        }
    }
    Ok(())
}
