//! `rewind-coordinator`: runs one coordinator member.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rewind_coordinator::config::RawConfig;
use rewind_coordinator::membership::{self, Directory};
use rewind_coordinator::{api, engine, health, node, sessions, storage};
use rewind_shared::{dev_ca, tls::TlsFiles};
use tracing::{error, info, warn};

/// Exit code for bad configuration (EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "rewind-coordinator", version, about = "The rewind coordinator")]
struct Cli {
    /// TOML config file.
    #[arg(long, env = "REWIND_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:7443 (port 0 picks a free one).
    #[arg(long, env = "REWIND_LISTEN")]
    listen: Option<String>,
    /// Directory for the log, snapshots and (with --dev) certificates.
    #[arg(long, env = "REWIND_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Single-member dev cluster: generates a CA and certificates in <data-dir>/tls.
    #[arg(long, env = "REWIND_DEV")]
    dev: bool,
    /// Write the bound address to this file once listening (for scripts using port 0).
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Address for /metrics and the webhooks (overrides http.listen), e.g. 127.0.0.1:9443.
    #[arg(long, env = "REWIND_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// Write the bound HTTP address to this file once listening.
    #[arg(long)]
    http_addr_file: Option<PathBuf>,
    /// Plaintext gRPC health checks alone, for Kubernetes' probes (overrides
    /// health.probe-listen), e.g. 0.0.0.0:7444.
    #[arg(long, env = "REWIND_PROBE_LISTEN")]
    probe_listen: Option<String>,
    /// Write the bound probe address to this file once listening.
    #[arg(long)]
    probe_addr_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check a config file, reporting every problem, unknown keys included, and the files it
    /// names (data directory, TLS files).
    CheckConfig {
        path: PathBuf,
        /// Check the config alone, not the files it names (before they are installed).
        #[arg(long)]
        no_files: bool,
    },
    /// Issue a certificate from the dev CA in <data-dir>/tls (dev and test clusters only).
    IssueCert {
        #[arg(long, env = "REWIND_DATA_DIR")]
        data_dir: PathBuf,
        /// What the holder is: member, agent, user or automation. Each may call only its own
        /// service (members Raft, agents the agent service, users and automation the control
        /// service, as the access policy allows).
        #[arg(long)]
        kind: String,
        /// The holder's name, also the certificate's common name and file name: an agent's host
        /// id, a person's or tool's name, a member's name.
        #[arg(long)]
        name: String,
        /// A member's id (its certificate names it `rewind://member/<id>`); members only.
        #[arg(long)]
        member_id: Option<u64>,
        /// A group the holder is in (written as the subject's O, then OU); at most two.
        #[arg(long)]
        group: Vec<String>,
        /// Subject alternative name (DNS name or IP) the certificate is valid for: a member's
        /// certificate needs the host of its address. Repeatable.
        #[arg(long)]
        san: Vec<String>,
        /// How long it is valid, e.g. "30d" (default: 14d for agents and automation, 7d for
        /// users, 90d for members).
        #[arg(long)]
        lifetime: Option<String>,
        /// Create the dev CA in <data-dir>/tls first when there is none.
        #[arg(long)]
        create_ca: bool,
        /// Replace the holder's certificate and key if they exist (a renewal by hand).
        #[arg(long)]
        force: bool,
    },
    /// Write an issuing CA under the dev CA as <data-dir>/tls/issuer.pem and issuer.key: the
    /// members sign joins and renewals with it (config [issuer]).
    IssueIssuingCa {
        #[arg(long, env = "REWIND_DATA_DIR")]
        data_dir: PathBuf,
        /// Create the dev CA in <data-dir>/tls first when there is none.
        #[arg(long)]
        create_ca: bool,
    },
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
    match cli.command {
        Some(Command::CheckConfig { ref path, no_files }) => check_config(path, no_files),
        Some(Command::IssueCert {
            ref data_dir,
            ref kind,
            ref name,
            member_id,
            ref group,
            ref san,
            ref lifetime,
            create_ca,
            force,
        }) => report(subject(kind, name, member_id, group).and_then(|subject| {
            let asked = Issue {
                sans: san,
                lifetime: lifetime.as_deref(),
                create_ca,
                force,
            };
            issue_cert(data_dir, &subject, &asked)
        })),
        Some(Command::IssueIssuingCa {
            ref data_dir,
            create_ca,
        }) => report(issue_issuing_ca(data_dir, create_ca)),
        None => run(cli),
    }
}

/// The runtime the Raft transport sends from: one worker thread, `raft-peers`. Shut down
/// without waiting when dropped, as a runtime must be inside another's async context.
struct PeerRuntime(Option<tokio::runtime::Runtime>);

impl PeerRuntime {
    fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("raft-peers")
            .enable_all()
            .build()?;
        Ok(Self(Some(runtime)))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("running until dropped")
            .handle()
            .clone()
    }
}

impl Drop for PeerRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &std::path::Path, no_files: bool) -> ExitCode {
    let (raw, unknown) = match RawConfig::load(path) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let mut problems: Vec<String> = unknown
        .iter()
        .map(|key| format!("{key}: unknown key"))
        .collect();
    match raw.validate() {
        Ok(config) => {
            for warning in &config.warnings {
                eprintln!("{}: warning: {warning}", path.display());
            }
            if !no_files {
                problems.extend(files_problems(&config));
            }
        }
        Err(more) => problems.extend(more),
    }
    if problems.is_empty() {
        println!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    }
    for problem in &problems {
        eprintln!("{}: {problem}", path.display());
    }
    ExitCode::from(EXIT_BAD_CONFIG)
}

/// What the config names on disk that cannot be used: the TLS files and the data directory,
/// each named with its path and problem. Checked before anything is created or bound, so a bad
/// file changes nothing.
fn files_problems(config: &rewind_coordinator::config::Config) -> Vec<String> {
    let mut problems =
        rewind_shared::tls::check_tls_files("tls", &config.tls, rewind_shared::tls::Needed::All);
    problems.extend(rewind_shared::config::data_dir_problem(
        "data-dir",
        &config.data_dir,
    ));
    problems
}

/// The subject `issue-cert` was asked for.
fn subject(
    kind: &str,
    name: &str,
    member_id: Option<u64>,
    groups: &[String],
) -> anyhow::Result<dev_ca::Subject> {
    use rewind_shared::identity::Kind;
    rewind_shared::names::validate_name("name", name)?;
    let kind = Kind::parse(kind)?;
    let subject = match (kind, member_id) {
        (Kind::Member, Some(id)) if id > 0 => dev_ca::Subject::member(id, name),
        (Kind::Member, _) => anyhow::bail!("--kind member needs --member-id N (above 0)"),
        (_, Some(_)) => anyhow::bail!("--member-id is for --kind member only"),
        (kind, None) => dev_ca::Subject::new(kind, name),
    };
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    Ok(subject.with_groups(&groups))
}

fn dev_ca_in(tls_dir: &std::path::Path, create_ca: bool) -> anyhow::Result<dev_ca::DevCa> {
    if create_ca {
        dev_ca::ensure_dev_pki(tls_dir).context("create the dev CA")
    } else {
        dev_ca::DevCa::load(tls_dir).context(
            "load the dev CA (start the coordinator with --dev first, or pass --create-ca)",
        )
    }
}

/// How `issue-cert` was asked to issue.
struct Issue<'a> {
    sans: &'a [String],
    lifetime: Option<&'a str>,
    create_ca: bool,
    force: bool,
}

/// Names whose files are the CA's own (`ca.pem`, `issuer.pem`): a holder of that name would
/// overwrite them.
const RESERVED_NAMES: [&str; 2] = ["ca", dev_ca::ISSUER];

fn issue_cert(
    data_dir: &std::path::Path,
    subject: &dev_ca::Subject,
    asked: &Issue<'_>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !RESERVED_NAMES.contains(&subject.common_name.as_str()),
        "--name {}: the dev CA's own files are named so; choose another name",
        subject.common_name
    );
    let tls_dir = data_dir.join("tls");
    let files = rewind_shared::tls::TlsFiles::in_dir(&tls_dir, &subject.common_name);
    if !asked.force {
        let existing: Vec<String> = [&files.cert, &files.key]
            .into_iter()
            .filter(|path| path.symlink_metadata().is_ok())
            .map(|path| path.display().to_string())
            .collect();
        anyhow::ensure!(
            existing.is_empty(),
            "{} already exist(s): pass --force to replace them",
            existing.join(" and ")
        );
    }
    let lifetime_s = match asked.lifetime {
        Some(text) => {
            let seconds = humantime::parse_duration(text)
                .with_context(|| format!("--lifetime {text:?} (e.g. \"30d\")"))?
                .as_secs();
            let kind = subject.kind.unwrap_or(rewind_shared::identity::Kind::User);
            let max = rewind_shared::pki::max_lifetime_s(kind);
            anyhow::ensure!(
                (rewind_shared::pki::MIN_LIFETIME_S..=max).contains(&seconds),
                "--lifetime {text:?}: a {kind} certificate lives {} s to {} days",
                rewind_shared::pki::MIN_LIFETIME_S,
                max / rewind_shared::pki::DAY_S
            );
            seconds
        }
        None => subject.default_lifetime_s(),
    };
    let ca = dev_ca_in(&tls_dir, asked.create_ca)?;
    let sans: Vec<&str> = asked.sans.iter().map(String::as_str).collect();
    let files = ca
        .write_identity_for(&tls_dir, subject, &sans, lifetime_s)
        .context("write the certificate")?;
    println!("{}\n{}", files.cert.display(), files.key.display());
    Ok(())
}

fn issue_issuing_ca(data_dir: &std::path::Path, create_ca: bool) -> anyhow::Result<()> {
    let tls_dir = data_dir.join("tls");
    let files = dev_ca_in(&tls_dir, create_ca)?
        .write_issuing_ca(&tls_dir)
        .context("write the issuing CA")?;
    println!("{}\n{}", files.cert.display(), files.key.display());
    Ok(())
}

fn run(cli: Cli) -> ExitCode {
    let mut raw = match &cli.config {
        Some(path) => match RawConfig::load(path) {
            Ok((raw, unknown)) => {
                for key in unknown {
                    warn!(key, path = %path.display(), "Unknown config key ignored.");
                }
                raw
            }
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
        },
        None => RawConfig::default(),
    };
    if cli.listen.is_some() {
        raw.listen = cli.listen.clone();
    }
    if cli.data_dir.is_some() {
        raw.data_dir = cli.data_dir.clone();
    }
    if cli.probe_listen.is_some() {
        raw.health.probe_listen = cli.probe_listen.clone();
    }
    if cli.http_listen.is_some() {
        raw.http.listen = cli.http_listen.clone();
    }
    if cli.dev
        && let Err(error) = prepare_dev(&mut raw)
    {
        eprintln!("error: {error:#}");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    let config = match raw.validate() {
        Ok(config) => config,
        Err(problems) => {
            for problem in problems {
                eprintln!("config: {problem}");
            }
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let problems = files_problems(&config);
    if !problems.is_empty() {
        for problem in problems {
            eprintln!("config: {problem}");
        }
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    for warning in &config.warnings {
        warn!("{warning}");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let files = AddressFiles {
        grpc: cli.addr_file,
        http: cli.http_addr_file,
        probes: cli.probe_addr_file,
    };
    match runtime.block_on(serve(config, files)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!(error = format!("{error:#}"), "Coordinator stopped.");
            ExitCode::FAILURE
        }
    }
}

/// `--dev`: a data dir under the temp dir unless given, a dev PKI in it, short intervals.
fn prepare_dev(raw: &mut RawConfig) -> anyhow::Result<()> {
    let data_dir = raw
        .data_dir
        .get_or_insert_with(|| std::env::temp_dir().join("rewind-dev"))
        .clone();
    let tls_dir = data_dir.join("tls");
    dev_ca::ensure_dev_pki(&tls_dir)
        .with_context(|| format!("create the dev PKI in {}", tls_dir.display()))?;
    raw.tls
        .get_or_insert_with(|| TlsFiles::in_dir(&tls_dir, dev_ca::COORDINATOR));
    if raw.issuer.cert.is_none() && raw.issuer.key.is_none() {
        let issuer = TlsFiles::in_dir(&tls_dir, dev_ca::ISSUER);
        raw.issuer.cert = Some(issuer.cert);
        raw.issuer.key = Some(issuer.key);
    }
    if raw.health.report_interval_ms == RawConfig::default().health.report_interval_ms {
        raw.health.report_interval_ms = 1000;
    }
    if raw.health.window_s == RawConfig::default().health.window_s {
        raw.health.window_s = 5;
    }
    if raw.access.bootstrap_policy_file.is_none() {
        let path = data_dir.join("dev-policy.toml");
        let policy = rewind_coordinator::access::Policy::dev(&format!("user:{}", dev_ca::OPERATOR));
        std::fs::write(&path, policy.to_toml())
            .with_context(|| format!("write {}", path.display()))?;
        raw.access.bootstrap_policy_file = Some(path);
    }
    warn!(
        certificate = %tls_dir.join(format!("{}.pem", dev_ca::OPERATOR)).display(),
        "DEV MODE: the `operator` certificate is ADMIN OF EVERYTHING, its key sits in the data dir, and the webhooks may roll back anything. Never use --dev for a real fleet."
    );
    if raw.cluster.members.is_empty() {
        let address = raw
            .listen
            .clone()
            .unwrap_or_else(|| rewind_coordinator::config::DEFAULT_LISTEN.to_string());
        raw.cluster.member_id = Some(1);
        raw.cluster.members = vec![rewind_coordinator::config::RawMember {
            id: 1,
            address,
            region: "dev".into(),
            name: Some(dev_ca::COORDINATOR.into()),
        }];
    }
    info!(data_dir = %data_dir.display(), "Dev mode: single member, certificates in {}.", tls_dir.display());
    Ok(())
}

/// Files each bound address is written to, once listening (for scripts using port 0).
struct AddressFiles {
    grpc: Option<PathBuf>,
    http: Option<PathBuf>,
    probes: Option<PathBuf>,
}

async fn serve(
    config: rewind_coordinator::config::Config,
    files: AddressFiles,
) -> anyhow::Result<()> {
    // The log, snapshots and the dev CA's keys: nobody else may read them.
    rewind_shared::config::make_private(&config.data_dir, 3)
        .with_context(|| format!("make data dir {} private", config.data_dir.display()))?;
    let budget = rewind_coordinator::admission::ConnectionBudget::from_open_files(
        rewind_coordinator::admission::raise_open_files_limit(),
    );
    info!(
        open_files = budget.open_files,
        grpc_connections = budget.grpc,
        http_connections = budget.http,
        "Connection bounds set from the open-files limit."
    );
    let connection_stats = rewind_coordinator::admission::ConnectionStats::default();
    let cluster = &config.cluster;
    let store =
        storage::RaftStore::open(&config.data_dir.join("raft")).context("open the Raft store")?;
    let cluster_id = store
        .cluster_id(cluster.id.as_deref())
        .context("settle the cluster id")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    let bound = listener.local_addr().context("read the bound address")?;

    let incoming_snapshots = store.incoming_snapshot_dir();
    let snapshot_stats = Arc::new(node::transport::SnapshotStats::default());
    let (peer_reports, peer_report_receiver) = node::peer_report_channel();
    // Member traffic goes out from a runtime of its own, so that a leader whose workers are busy
    // with thousands of agents' streams still sends heartbeats and appends on time.
    let peer_runtime = PeerRuntime::start().context("start the runtime for member traffic")?;
    let transport = node::transport::GrpcTransport::new(
        peer_runtime.handle(),
        node::transport::PeerTls {
            files: config.tls.clone(),
            accept_legacy: config.access.legacy_certificates,
        },
        cluster_id.clone(),
        cluster.member_id,
        peer_reports,
        store.snapshot_files(),
        Arc::clone(&snapshot_stats),
    );
    let mut settings = node::raft::RaftSettings::new(cluster.member_id);
    settings.tick = cluster.tick;
    settings.election_ticks = cluster.election_ticks;
    settings.snapshot_every = config.snapshot_every;
    settings.initial_cluster_version = config.initial_cluster_version;
    // A joining member founds nothing: it waits for the cluster to add it.
    let founding: &[rewind_coordinator::config::Member] =
        if cluster.join { &[] } else { &cluster.members };
    let member = match node::raft::start_member(
        settings,
        store,
        founding,
        transport.clone(),
        peer_report_receiver,
        cluster_id.as_str().into(),
    ) {
        Ok(member) => member,
        Err(error @ rewind_coordinator::errors::CoordinatorError::CannotApply { .. }) => {
            error!(%error, "This member cannot apply what its data directory holds; exiting ({}).", rewind_shared::config::EXIT_CANNOT_APPLY);
            std::process::exit(i32::from(rewind_shared::config::EXIT_CANNOT_APPLY));
        }
        Err(error) => return Err(error).context("start the Raft member"),
    };
    // A failed write or fsync stopped the Raft member: the process goes too (never retrying the
    // fsync, never serving on without a log), so its supervisor restarts it from what the disk
    // holds.
    let mut storage = member.status.clone();
    let data_dir = config.data_dir.clone();
    tokio::spawn(async move {
        if let Ok(status) = storage
            .wait_for(|status| status.storage_failed.is_some() || status.cannot_apply.is_some())
            .await
        {
            if let Some(why) = status.cannot_apply.as_deref() {
                error!(
                    error = why,
                    "This member cannot apply the cluster's log; exiting ({}).",
                    rewind_shared::config::EXIT_CANNOT_APPLY
                );
                std::process::exit(i32::from(rewind_shared::config::EXIT_CANNOT_APPLY));
            }
            error!(
                data_dir = %data_dir.display(),
                error = status.storage_failed.as_deref().unwrap_or_default(),
                "The Raft store failed; exiting ({}). Start the member again once its disk is healthy: it recovers from what the disk holds.",
                rewind_shared::config::EXIT_STORAGE_FAILED
            );
            std::process::exit(i32::from(rewind_shared::config::EXIT_STORAGE_FAILED));
        }
    });
    let directory = Directory::new(member.node.clone(), cluster.members.clone());
    tokio::spawn(membership::route_to_members(directory.clone(), transport));

    if !cluster.join && cluster.members.len() == 1 {
        // A single member serves as soon as it leads; scripts waiting on --addr-file can rely on it.
        let mut status = member.status.clone();
        let leading = status.wait_for(|status| status.is_leader);
        tokio::time::timeout(std::time::Duration::from_secs(10), leading)
            .await
            .context("become the leader of a single-member cluster")?
            .context("the Raft member stopped")?;
    }
    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let bootstrap = tokio::spawn(rewind_coordinator::access::bootstrap::run(
        member.node.clone(),
        member.status.clone(),
        config.access.bootstrap_policy.clone().map(Arc::new),
        stop.clone(),
    ));
    if !cluster.join && cluster.members.len() == 1 && config.access.bootstrap_policy.is_some() {
        // ... and with its policy in force, so the first call is not refused for want of one.
        tokio::time::timeout(std::time::Duration::from_secs(10), bootstrap)
            .await
            .context("apply the bootstrap access policy")?
            .context("the bootstrap task stopped")?;
    }
    let http_listener = match &config.http {
        Some(http) => {
            let listener = tokio::net::TcpListener::bind(http.listen)
                .await
                .with_context(|| format!("listen for HTTP on {}", http.listen))?;
            if let Some(path) = &files.http {
                write_address(path, listener.local_addr()?)?;
            }
            Some(listener)
        }
        None => None,
    };
    let probe_listener = match config.probe_listen {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("listen for health probes on {address}"))?;
            if let Some(path) = &files.probes {
                write_address(path, listener.local_addr()?)?;
            }
            Some(listener)
        }
        None => None,
    };
    if let Some(path) = &files.grpc {
        write_address(path, bound)?;
    }
    info!(address = %bound, member_id = cluster.member_id, cluster_id, data_dir = %config.data_dir.display(), "Coordinator listening.");

    let health = Arc::new(health::HealthBook::default());
    let sessions = Arc::new(sessions::Sessions::default());
    let engine = engine::Engine {
        node: member.node.clone(),
        status: member.status.clone(),
        sessions: Arc::clone(&sessions),
        health: Arc::clone(&health),
        limits: config.limits.clone(),
        tick: config.tick,
        escalation: config.escalation.clone(),
        incidents: config.incidents.clone(),
        synthetics_tls: config.synthetics_tls.clone(),
    };
    let mut engine_stop = stop.clone();
    let engine_task = tokio::spawn(engine.run(async move {
        let _ = engine_stop.changed().await;
    }));
    tokio::spawn(rewind_coordinator::flags::push_changes(
        member.node.clone(),
        member.status.clone(),
        Arc::clone(&sessions),
        stop.clone(),
    ));
    if let Some(alertmanager) = &config.alertmanager {
        let silencer = engine::silences::Silencer {
            node: member.node.clone(),
            status: member.status.clone(),
            config: alertmanager.clone(),
        };
        tokio::spawn(silencer.run(stop.clone()));
    }
    // Refusals of gRPC calls and of webhooks are counted (and audited) in one place.
    let gate = api::gate::Gate::new(
        member.node.clone(),
        member.status.clone(),
        directory.clone(),
        Arc::clone(&sessions),
        config.access.legacy_certificates,
    );
    tokio::spawn(gate.clone().follow_policy());
    let audit_check = Arc::new(rewind_coordinator::audit_check::AuditCheck::default());
    if let Some(every) = config.audit_verify_every {
        tokio::spawn(rewind_coordinator::audit_check::run(
            member.node.clone(),
            Arc::clone(&audit_check),
            every,
            stop.clone(),
        ));
    }
    let context = api::Context {
        node: member.node.clone(),
        status: member.status.clone(),
        directory: directory.clone(),
        cluster_id: cluster_id.clone(),
        tls: config.tls.clone(),
        health: Arc::clone(&health),
        sessions: Arc::clone(&sessions),
        default_max_parallel: config.limits.default_max_parallel,
        health_interval_ms: config.health_interval_ms,
        health_window_ms: config.health_window_ms,
        gate: gate.clone(),
        env_key_secret: Arc::new(rand::random()),
        issuer: config.issuer.clone(),
    };
    if let (Some(listener), Some(http)) = (http_listener, &config.http) {
        let state = rewind_coordinator::http::HttpState {
            node: member.node.clone(),
            status: member.status.clone(),
            sessions: Arc::clone(&sessions),
            health: Arc::clone(&health),
            limits: config.limits.clone(),
            alertmanager_token: http.alertmanager_token.clone().map(Arc::new),
            webhook_secret: http.webhook_secret.clone().map(Arc::new),
            snapshots: Arc::clone(&snapshot_stats),
            gate: gate.clone(),
            alertmanager_identity: config.access.alertmanager_identity.as_str().into(),
            webhook_identity: config.access.webhook_identity.as_str().into(),
            connections: connection_stats.clone(),
            audit_check: Arc::clone(&audit_check),
            view: http.viewers.clone().map(|viewers| {
                rewind_coordinator::http::view::WebView::new(
                    viewers,
                    api::control::Control {
                        context: context.clone(),
                    },
                    Arc::clone(&audit_check),
                    budget.http,
                    stop.clone(),
                )
            }),
        };
        let mut http_stop = stop.clone();
        let stats = connection_stats.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = http_stop.changed().await;
            };
            let served = rewind_coordinator::http::serve(listener, state, budget, stats, shutdown);
            if let Err(error) = served.await {
                error!(%error, "The HTTP server stopped.");
            }
        });
    }
    tokio::spawn(close_sessions_on_step_down(
        member.status.clone(),
        Arc::clone(&sessions),
    ));
    if config.access.legacy_certificates {
        warn!(
            "access.legacy-certificates is on: certificates without a rewind:// identity are accepted as the kind each service expects. Re-enroll them; the switch goes away in the next release."
        );
    }
    let raft_peers = api::raft::RaftPeers::new(
        cluster_id.clone(),
        directory,
        member.peer_messages.clone(),
        incoming_snapshots,
        snapshot_stats,
        gate,
        stop.clone(),
    );
    let mut api_stop = stop.clone();
    let listeners = api::Listeners {
        grpc: listener,
        probes: probe_listener,
    };
    let server = api::serve(
        listeners,
        &config.tls,
        context,
        raft_peers,
        budget,
        connection_stats,
        async move {
            let _ = api_stop.changed().await;
        },
    );
    tokio::spawn(async move {
        rewind_shared::signals::shutdown().await;
        info!("Shutting down.");
        let _ = stop_sender.send(true);
    });
    server.await.context("serve the API")?;
    let _ = engine_task.await;
    member.stop();
    Ok(())
}

/// Writes an address whole then renames it, so a reader never sees half of one.
fn write_address(path: &std::path::Path, address: std::net::SocketAddr) -> anyhow::Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, address.to_string()).context("write the address file")?;
    std::fs::rename(&partial, path).context("write the address file")?;
    Ok(())
}

/// Agents follow the leader: when this member stops leading, its agent sessions are closed so
/// the agents reconnect and are sent to the new leader.
async fn close_sessions_on_step_down(
    mut status: tokio::sync::watch::Receiver<node::raft::RaftStatus>,
    sessions: Arc<sessions::Sessions>,
) {
    let mut was_leader = status.borrow().is_leader;
    while status.changed().await.is_ok() {
        let is_leader = status.borrow().is_leader;
        if was_leader && !is_leader {
            info!("No longer the leader; closing agent sessions so agents move to the new one.");
            sessions.close_all();
        }
        was_leader = is_leader;
    }
}
