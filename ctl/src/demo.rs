//! `rewindctl demo`: the whole loop on one machine, for real.
//!
//! Starts a dev coordinator and one agent process per host on loopback, each managing a small
//! sample web service that it serves from its `current` release (v1 answers 200 on /health, v2
//! answers 500). Deploys v1, then v2; the automatic trigger fires, the rollback restores every
//! host's exact previous state, health returns to baseline and the audit chain verifies. Every
//! run uses a fresh directory (printed at the end, kept for inspection).

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use rewind_proto::v1 as pb;
use rewind_shared::dev_ca::DevCa;
use tokio::process::{Child, Command};

use crate::client::{self, Client, ConnectOptions, explain, request_id};
use crate::output::time;

const SERVICE: &str = "web";
const V1_CONFIG: &str = "# written by release v1\nworkers = 4\nfeature_new_checkout = false\n";
const V2_CONFIG: &str = "# written by release v2\nworkers = 16\nfeature_new_checkout = true\n";
const CONFIG_FILE: &str = "shared/config/app.toml";

#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Directory for all the demo's data (default: a new one under the temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Number of hosts (agents), 1 to 9.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=9))]
    hosts: u8,
}

struct Host {
    id: String,
    root: PathBuf,
}

/// Child processes, killed when the demo ends however it ends.
#[derive(Default)]
struct Processes(Vec<(String, Child)>);

impl Processes {
    fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[&str],
        log: &Path,
    ) -> anyhow::Result<()> {
        self.start(name, program, args, Stdio::null(), log)
    }

    /// As [`Processes::spawn`], with its standard output written to `stdout`.
    fn spawn_with_stdout(
        &mut self,
        name: &str,
        program: &Path,
        args: &[&str],
        stdout: &Path,
        log: &Path,
    ) -> anyhow::Result<()> {
        let stdout_file = std::fs::File::create(stdout)
            .with_context(|| format!("create {}", stdout.display()))?;
        self.start(name, program, args, stdout_file.into(), log)
    }

    fn start(
        &mut self,
        name: &str,
        program: &Path,
        args: &[&str],
        stdout: Stdio,
        log: &Path,
    ) -> anyhow::Result<()> {
        let log_file =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .env("REWIND_LOG", "info")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        self.0.push((name.to_string(), child));
        Ok(())
    }

    /// Fails if any process already exited.
    fn check_alive(&mut self, logs: &Path) -> anyhow::Result<()> {
        for (name, child) in &mut self.0 {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{name} exited ({status}); see {}",
                    logs.join(format!("{name}.log")).display()
                );
            }
        }
        Ok(())
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = match args.dir {
        Some(dir) => dir,
        None => std::env::temp_dir().join(format!("rewind-demo-{}", rewind_shared::time::now_ms())),
    };
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "{} is not empty: give the demo a new --dir (or none, for a fresh one)",
            dir.display()
        );
    }
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
    let [coordinator_bin, agent_bin, app_bin] = binaries().await?;
    let mut processes = Processes::default();
    let outcome = run_loop(
        &dir,
        &logs,
        args.hosts,
        [&coordinator_bin, &agent_bin, &app_bin],
        &mut processes,
    )
    .await;
    drop(processes);
    match outcome {
        Ok(()) => {
            say!("\nData, logs and certificates are in {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            say_err!("\nDemo FAILED: {error:#}\nLogs are in {}", logs.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn run_loop(
    dir: &Path,
    logs: &Path,
    host_count: u8,
    [coordinator_bin, agent_bin, app_bin]: [&Path; 3],
    processes: &mut Processes,
) -> anyhow::Result<()> {
    say("Starting a stand-in for PagerDuty (Events API v2 rules, signed deliveries)");
    let pager = IncidentReceiver::start(dir).await?;
    say!("  listening on {}", pager.receiver.address);

    say("Starting a dev coordinator (single member, mutual TLS with a fresh CA)");
    let addr_file = dir.join("coordinator.addr");
    let coordinator_dir = dir.join("coordinator");
    let coordinator_args = [
        "--dev",
        "--config",
        path_str(&pager.config)?,
        "--data-dir",
        path_str(&coordinator_dir)?,
        "--listen",
        "127.0.0.1:0",
        "--addr-file",
        path_str(&addr_file)?,
    ];
    processes.spawn(
        "coordinator",
        coordinator_bin,
        &coordinator_args,
        &logs.join("coordinator.log"),
    )?;
    let address = wait_for(Duration::from_secs(30), "the coordinator to listen", || {
        processes.check_alive(logs)?;
        Ok(std::fs::read_to_string(&addr_file).ok())
    })
    .await?;
    let tls_dir = coordinator_dir.join("tls");
    let ca = DevCa::load(&tls_dir).context("load the dev CA")?;
    say!(
        "  coordinator at {address}, certificates in {}",
        tls_dir.display()
    );

    say(&format!(
        "Starting {host_count} agents, each managing a sample web service"
    ));
    let mut hosts = Vec::new();
    for number in 1..=host_count {
        let host = prepare_host(dir, number)?;
        let port = start_sample_app(processes, app_bin, &host, logs).await?;
        let subject =
            rewind_shared::dev_ca::Subject::new(rewind_shared::identity::Kind::Agent, &host.id);
        ca.write_identity(&tls_dir, &subject, &[])
            .with_context(|| format!("issue a certificate for {}", host.id))?;
        let config_path = write_agent_config(dir, &host, number, &address, &tls_dir, port)?;
        processes.spawn(
            &host.id,
            agent_bin,
            &["--config", path_str(&config_path)?, "run"],
            &logs.join(format!("{}.log", host.id)),
        )?;
        say!(
            "  {}: service root {}, app on 127.0.0.1:{port}",
            host.id,
            host.root.display()
        );
        hosts.push(host);
    }

    let options = ConnectOptions {
        coordinator: address.clone(),
        tls_dir: Some(tls_dir.clone()),
        identity: rewind_shared::dev_ca::OPERATOR.into(),
        ca: None,
        cert: None,
        key: None,
        server_name: "localhost".into(),
    };
    let mut client = client::connect(&options).await?;
    wait_for_async(Duration::from_secs(30), "every agent to connect", || {
        let mut client = client.clone();
        let alive = processes.check_alive(logs);
        async move {
            alive?;
            let hosts = client
                .list_hosts(pb::ListHostsRequest::default())
                .await
                .map_err(explain)?
                .into_inner()
                .hosts;
            Ok(
                (hosts.iter().filter(|host| host.connected).count() == usize::from(host_count))
                    .then_some(()),
            )
        }
    })
    .await?;

    say(
        "Registering the service (auto-rollback when > 50% of probes fail for 3 s) and releases v1, v2",
    );
    let policy = pb::HealthPolicy {
        max_probe_failure_ratio: 0.5,
        for_s: 3,
        watch_s: 300,
        auto_rollback: true,
        ..Default::default()
    };
    let service = pb::Service {
        name: SERVICE.into(),
        depends_on: vec![],
        policy: Some(policy),
        synthetics: vec![],
        rollback_steps: vec![],
        // A minute to recover: `rollback plan` measures its estimate against it.
        rto_s: 60,
        freeze_windows: vec![],
        drift_policy: String::new(),
        isolate_after_failures: 0,
    };
    client
        .put_service(pb::PutServiceRequest {
            request_id: request_id(),
            service: Some(service),
        })
        .await
        .map_err(explain)?;
    for version in ["v1", "v2"] {
        let artifact_digest =
            rewind_shared::digest::tree_digest(&hosts[0].root.join("releases").join(version))?;
        say!("  {SERVICE} {version}: {artifact_digest}");
        let release = pb::Release {
            service: SERVICE.into(),
            version: version.into(),
            artifact_digest,
            commit: format!("demo-{version}"),
            registered_at_ms: 0,
            ..Default::default()
        };
        client
            .register_release(pb::RegisterReleaseRequest {
                request_id: request_id(),
                release: Some(release),
            })
            .await
            .map_err(explain)?;
    }

    say("Deploying v1");
    let first = start_change(&mut client, "v1", "demo: first deploy").await?;
    wait_for_change(&client, &first, |change| {
        change.state == pb::ChangeState::Deployed as i32
    })
    .await?;
    let healthy = wait_healthy(&client, 0.0).await?;
    say!(
        "  v1 deployed on every host; probe failure ratio {:.2} over {} samples",
        healthy.probe_failure_ratio,
        healthy.samples
    );

    say("Deploying v2 (its /health answers 500)");
    let second = start_change(&mut client, "v2", "demo: release v2").await?;
    wait_for_change(&client, &second, |change| {
        change.state != pb::ChangeState::Capturing as i32
    })
    .await?;
    for host in &hosts {
        // What a deploy tool would do alongside the release: rewrite the app's config, and
        // tell rewind that is how the host should be (else a rollback would take it for a
        // hotfix made by hand, and leave the host alone rather than wipe it).
        std::fs::write(host.root.join(CONFIG_FILE), V2_CONFIG)?;
        client
            .adopt_host_state(pb::AdoptHostStateRequest {
                host_id: host.id.clone(),
                service: SERVICE.into(),
                reason: "demo: the deploy tool wrote v2's config".into(),
            })
            .await
            .map_err(explain)?;
    }
    say!("  the deploy tool rewrote {CONFIG_FILE} on every host (and told rewind: host adopt)");
    let deployed = wait_for_change(&client, &second, |change| {
        change.deployed_at_ms > 0 || !change.rollback_id.is_empty()
    })
    .await?;
    say!(
        "  v2 deployed at {}; waiting for the health policy to fire",
        time(deployed.deployed_at_ms)
    );

    let triggered =
        wait_for_change(&client, &second, |change| !change.rollback_id.is_empty()).await?;
    let rollback_id = triggered.rollback_id.clone();
    say(&format!(
        "Automatic rollback {rollback_id} started; following it"
    ));
    let code =
        crate::watch::follow(&mut client, crate::output::Format::Table, &rollback_id).await?;
    let rollback = client
        .get_rollback(pb::GetRollbackRequest {
            rollback_id: rollback_id.clone(),
            ..Default::default()
        })
        .await
        .map_err(explain)?
        .into_inner()
        .rollback
        .unwrap_or_default();
    ensure!(
        code == ExitCode::SUCCESS,
        "rollback {rollback_id} ended {}: {}",
        crate::output::rollback_state(&rollback),
        rollback.outcome_detail
    );
    ensure!(
        rollback.trigger == "automatic",
        "the rollback was not started by the trigger"
    );

    say("Checking every host is exactly back to its pre-change state");
    for host in &hosts {
        let link = std::fs::read_link(host.root.join("current"))?;
        ensure!(
            link == Path::new("releases/v1"),
            "{}: current -> {} instead of releases/v1",
            host.id,
            link.display()
        );
        let config = std::fs::read_to_string(host.root.join(CONFIG_FILE))?;
        ensure!(
            config == V1_CONFIG,
            "{}: {CONFIG_FILE} was not restored byte for byte",
            host.id
        );
        say!(
            "  {}: current -> releases/v1, {CONFIG_FILE} restored byte for byte",
            host.id
        );
    }
    let baseline = triggered.baseline.unwrap_or_default();
    let recovered = wait_healthy(&client, baseline.probe_failure_ratio).await?;
    let healthy_at = rewind_shared::time::now_ms();
    say!(
        "  health back to baseline: probe failure ratio {:.2} (baseline {:.2})",
        recovered.probe_failure_ratio,
        baseline.probe_failure_ratio
    );

    let audit = client
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .map_err(explain)?
        .into_inner();
    ensure!(
        audit.ok,
        "audit chain broken at entry {}: {}",
        audit.first_broken_index,
        audit.detail
    );

    say("Timeline");
    let since = |ms: u64| {
        format!(
            "+{:.1} s",
            ms.saturating_sub(deployed.deployed_at_ms) as f64 / 1000.0
        )
    };
    say!(
        "  {}  v2 deployed on {} hosts",
        time(deployed.deployed_at_ms),
        deployed.hosts.len()
    );
    say!(
        "  {}  {since_start}  bad health detected, rollback started: {}",
        time(rollback.started_at_ms),
        rollback.reason,
        since_start = since(rollback.started_at_ms)
    );
    for step in rollback.steps.iter().filter(|step| step.kind == "verify") {
        say!(
            "  {}  {}  {} reverted and verified healthy ({})",
            time(step.finished_at_ms),
            since(step.finished_at_ms),
            step.host_id,
            step.detail
        );
    }
    say!(
        "  {}  {}  rollback {} succeeded",
        time(rollback.finished_at_ms),
        since(rollback.finished_at_ms),
        rollback.rollback_id
    );
    say!(
        "  {}  {}  service health back to baseline",
        time(healthy_at),
        since(healthy_at)
    );
    say!(
        "\nAudit: {} entries, hash chain intact (head {})",
        audit.entries,
        audit.head_hash
    );
    let incident_id = rollback_id.replacen("rb-", "in-", 1);
    let incident = client
        .get_incident(pb::GetIncidentRequest {
            incident_id: incident_id.clone(),
        })
        .await
        .map_err(explain)?
        .into_inner();
    ensure!(
        incident.recovered_at_ms == rollback.finished_at_ms
            && incident.detected_at_ms >= incident.impact_started_at_ms
            && incident.mitigated_at_ms >= incident.detected_at_ms
            && incident.mitigated_at_ms <= incident.recovered_at_ms
            && incident
                .timeline
                .iter()
                .any(|event| event.action == "rollback.start"),
        "incident {incident_id} does not tell the rollback as it happened: {incident:?}"
    );
    let after = |at_ms: u64| {
        format!(
            "{:.1} s",
            at_ms.saturating_sub(incident.impact_started_at_ms) as f64 / 1000.0
        )
    };
    say!(
        "Incident {incident_id}: detected after {}, mitigated after {} ({}), recovered after {}; \
         {} timeline events (rewindctl incident export {incident_id})",
        after(incident.detected_at_ms),
        after(incident.mitigated_at_ms),
        incident.mitigated_by,
        after(incident.recovered_at_ms),
        incident.timeline.len()
    );
    let told = wait_for(
        Duration::from_secs(60),
        "the incident system to hear of the rollback's end",
        || {
            let events = pager.receiver.events();
            Ok(events
                .iter()
                .any(|event| event.action == "resolve")
                .then_some(events))
        },
    )
    .await?;
    let actions: Vec<&str> = told.iter().map(|event| event.action.as_str()).collect();
    ensure!(
        actions == ["trigger", "resolve"]
            && told[0].dedup_key.starts_with(&format!("{incident_id}@"))
            && told[1].dedup_key == told[0].dedup_key,
        "the incident system heard {told:?}, not a trigger then a resolve of {incident_id}"
    );
    say!(
        "PagerDuty stand-in: {} for {incident_id} (severity {}), then {}, both accepted under the \
         Events API v2 rules",
        told[0].action,
        told[0].severity,
        told[1].action
    );
    say!(
        "The demo stops its processes now. To look around afterwards:\n  rewind-coordinator --dev --data-dir {} --listen 127.0.0.1:7443 &\n  rewindctl --tls-dir {} audit list",
        coordinator_dir.display(),
        tls_dir.display()
    );
    Ok(())
}

/// The demo's incident system: a PagerDuty Events API v2 stand-in on loopback, and the
/// coordinator config that sends incidents to it.
struct IncidentReceiver {
    receiver: rewind_shared::pagerduty::Receiver,
    config: PathBuf,
}

impl IncidentReceiver {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let secret = rewind_shared::digest::sha256_hex(&rand::random::<[u8; 32]>());
        let receiver = rewind_shared::pagerduty::Receiver::start(secret.clone().into_bytes())
            .await
            .context("start the PagerDuty stand-in")?;
        let secret_file = dir.join("incident.secret");
        std::fs::write(&secret_file, &secret)?;
        let key_file = dir.join("pagerduty.key");
        // A made-up integration key: 32 letters and digits, as PagerDuty's are.
        std::fs::write(&key_file, "DEMO0000000000000000000000000KEY")?;
        let config = dir.join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "[incidents]\nwebhook-url = \"http://{}/v2/enqueue\"\nformat = \"pagerduty\"\n\
                 routing-key-file = {:?}\nsecret-file = {:?}\n",
                receiver.address,
                path_str(&key_file)?,
                path_str(&secret_file)?
            ),
        )?;
        Ok(Self { receiver, config })
    }
}

fn say(text: &str) {
    say!("\n==> {text}");
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not valid UTF-8", path.display()))
}

/// Lays out `<dir>/hosts/web-N/srv/web` with releases v1 (healthy) and v2 (unhealthy).
fn prepare_host(dir: &Path, number: u8) -> anyhow::Result<Host> {
    let id = format!("web-{number}");
    let root = dir.join("hosts").join(&id).join("srv").join(SERVICE);
    for (version, status) in [("v1", "200"), ("v2", "500")] {
        let release = root.join("releases").join(version);
        std::fs::create_dir_all(&release)?;
        std::fs::write(release.join("VERSION"), version)?;
        std::fs::write(release.join("health_status"), status)?;
    }
    std::fs::create_dir_all(root.join("shared/config"))?;
    std::fs::write(root.join(CONFIG_FILE), V1_CONFIG)?;
    Ok(Host { id, root })
}

fn write_agent_config(
    dir: &Path,
    host: &Host,
    number: u8,
    coordinator: &str,
    tls_dir: &Path,
    port: u16,
) -> anyhow::Result<PathBuf> {
    let region = if number == 1 { "eu-west" } else { "us-east" };
    let data_dir = dir.join("hosts").join(&host.id).join("agent");
    let toml = format!(
        r#"host-id = "{id}"
coordinators = ["{coordinator}"]
data-dir = "{data_dir}"
health-interval-ms = 1000

[tls]
ca = "{tls}/ca.pem"
cert = "{tls}/{id}.pem"
key = "{tls}/{id}.key"

[labels]
region = "{region}"
zone = "{region}-a"
environment = "demo"

[[service]]
name = "{SERVICE}"
root = "{root}"
config-files = ["{CONFIG_FILE}"]
restart-command = ["touch", "{root}/restarted"]
restart-timeout-s = 10

[[service.probe]]
name = "http-health"
http = "http://127.0.0.1:{port}/health"
timeout-ms = 1000
"#,
        id = host.id,
        data_dir = data_dir.display(),
        tls = tls_dir.display(),
        root = host.root.display(),
    );
    let path = dir.join("hosts").join(&host.id).join("agent.toml");
    std::fs::write(&path, toml)?;
    Ok(path)
}

/// Starts the sample service of `host` (`rewind-demo-app`, a process of its own) and returns
/// the port it listens on.
async fn start_sample_app(
    processes: &mut Processes,
    app_bin: &Path,
    host: &Host,
    logs: &Path,
) -> anyhow::Result<u16> {
    // Beside the host's service, not among the logs: it is not a log.
    let port_file = host
        .root
        .parent()
        .context("a service root has a parent")?
        .join("app.port");
    let name = format!("{}-app", host.id);
    processes.spawn_with_stdout(
        &name,
        app_bin,
        &[path_str(&host.root)?],
        &port_file,
        &logs.join(format!("{name}.log")),
    )?;
    wait_for(Duration::from_secs(10), "the sample app to listen", || {
        processes.check_alive(logs)?;
        Ok(std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<u16>().ok()))
    })
    .await
}

async fn start_change(client: &mut Client, version: &str, reason: &str) -> anyhow::Result<String> {
    let request = pb::StartChangeRequest {
        break_glass: false,
        request_id: request_id(),
        service: SERVICE.into(),
        version: version.into(),
        host_ids: vec![],
        reason: reason.into(),
        flags_on: vec![],
        migrations: vec![],
    };
    let change = client
        .start_change(request)
        .await
        .map_err(explain)?
        .into_inner()
        .change
        .context("no change in the answer")?;
    say!(
        "  {} started: snapshot every host, then switch to {version}",
        change.change_id
    );
    Ok(change.change_id)
}

async fn wait_for_change(
    client: &Client,
    change_id: &str,
    done: impl Fn(&pb::Change) -> bool,
) -> anyhow::Result<pb::Change> {
    wait_for_async(
        Duration::from_secs(60),
        &format!("change {change_id}"),
        || {
            let mut client = client.clone();
            let change_id = change_id.to_string();
            let done = &done;
            async move {
                let change = client
                    .get_change(pb::GetChangeRequest { change_id })
                    .await
                    .map_err(explain)?
                    .into_inner()
                    .change
                    .unwrap_or_default();
                if change.state == pb::ChangeState::Failed as i32 && change.rollback_id.is_empty() {
                    bail!("change {} failed: {}", change.change_id, change.reason);
                }
                Ok(done(&change).then_some(change))
            }
        },
    )
    .await
}

/// Waits until the service's probe failure ratio, over recent reports, is at most `at_most`.
async fn wait_healthy(client: &Client, at_most: f64) -> anyhow::Result<pb::HealthAggregate> {
    wait_for_async(Duration::from_secs(60), "the service to be healthy", || {
        let mut client = client.clone();
        async move {
            let health = client
                .get_service_health(pb::GetServiceHealthRequest {
                    service: SERVICE.into(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            let current = health.current.unwrap_or_default();
            Ok(
                (current.samples > 0 && current.probe_failure_ratio <= at_most + 1e-9)
                    .then_some(current),
            )
        }
    })
    .await
}

async fn wait_for<T>(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let started = Instant::now();
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if started.elapsed() > limit {
            bail!("timed out after {} s waiting for {what}", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_async<T, F: std::future::Future<Output = anyhow::Result<Option<T>>>>(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> anyhow::Result<T> {
    let started = Instant::now();
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if started.elapsed() > limit {
            bail!("timed out after {} s waiting for {what}", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Paths of `rewind-coordinator`, `rewind-agent` and `rewind-demo-app` next to this binary.
/// When run from the source tree (`cargo run`), they are built first with the same profile, so
/// they match it.
async fn binaries() -> anyhow::Result<[PathBuf; 3]> {
    let exe = std::env::current_exe().context("find this executable")?;
    let bin_dir = exe
        .parent()
        .context("this executable has no directory")?
        .to_path_buf();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if workspace.join("Cargo.toml").exists() {
        say("Building rewind-coordinator, rewind-agent and rewind-demo-app");
        let cargo = std::env::var_os("CARGO")
            .unwrap_or_else(|| option_env!("CARGO").unwrap_or("cargo").into());
        let mut build = Command::new(cargo);
        build.current_dir(&workspace).args([
            "build",
            "--bin",
            "rewind-coordinator",
            "--bin",
            "rewind-agent",
            "--bin",
            "rewind-demo-app",
        ]);
        if bin_dir.ends_with("release") {
            build.arg("--release");
        } else {
            // As the tests build them, so neither rebuilds (or replaces) the other's binaries.
            build.args(["--features", rewind_shared::failpoint::BUILD_FEATURES]);
        }
        let status = build.status().await.context("run cargo build")?;
        ensure!(
            status.success(),
            "cargo build of the coordinator, agent and sample app failed"
        );
    }
    let binaries =
        ["rewind-coordinator", "rewind-agent", "rewind-demo-app"].map(|name| bin_dir.join(name));
    for binary in &binaries {
        ensure!(
            binary.exists(),
            "{} is missing: build it (cargo build --release) or install it next to rewindctl",
            binary.display()
        );
    }
    Ok(binaries)
}
